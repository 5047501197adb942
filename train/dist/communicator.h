// The ranks of a data-parallel job and the host-side collectives between them (MPI).
//
//   mpirun -np 2 ./build/convnext train ...     (or srun, or any MPI launcher)
//
// Each process asks Communicator::world() who it is: under an MPI launcher (the environment
// names a rank: OMPI_COMM_WORLD_SIZE, PMI_SIZE, PMIX_RANK) MPI is initialised and the world is
// MPI_COMM_WORLD; a process started without one is a world of one, never touches MPI, and
// behaves exactly as a build without MPI. A build without MPI (CNX_HAVE_MPI unset: libopenmpi-
// dev missing, or -DCNX_WITH_MPI=OFF) refuses a launcher's world size > 1 with one line.
//
//   rank        0 .. size-1, this process's place in the job (rank 0 prints, logs, saves)
//   local_rank  0 .. local_size-1, its place among the ranks of its machine: the GPU it takes
//
// The collectives work on host memory, are blocking unless named i*, and give the same result
// on every rank, deterministic for a fixed world size (MPI's reduction order depends only on
// the count and the world size). They carry what is small: evaluation counts, the stop flag,
// NCCL's unique id, each rank's RNG state for a checkpoint; and, for CPU ranks, the gradients
// (iallreduce_sum, overlapped with the backward: train/dist/grad_reducer.h).
//
// Faults. MPI errors are returned, not fatal, and thrown as cnx::Error. A watchdog thread
// (only with size > 1) ends the process (exit status 3, one line on stderr) when one
// collective has waited longer than timeout_seconds(): a rank that died or hangs never leaves
// the others waiting for ever (mpirun then ends the job). abort() ends every rank at once: a
// rank that fails calls it, so its peers do not wait for it.
#pragma once

#include <cstddef>
#include <cstdint>
#include <memory>
#include <span>
#include <string>
#include <vector>

namespace cnx::dist {

// A non-blocking collective in flight (iallreduce_sum). wait() is idempotent; a Request that
// was never started, or was moved from, is complete.
class Request {
 public:
  Request();
  ~Request();  // waits: the buffer must not be freed under MPI
  Request(Request&&) noexcept;
  Request& operator=(Request&&) noexcept;
  Request(const Request&) = delete;
  Request& operator=(const Request&) = delete;
  // Progresses the collective; true once it has completed (then wait() returns at once).
  bool test();
  void wait();

 private:
  friend class Communicator;
  struct Impl;
  std::unique_ptr<Impl> impl_;
};

class Communicator {
 public:
  // This process's world, made on first use (thread-safe). MPI is finalised at exit.
  static Communicator& world();
  // The world if world() has made it (nullptr before, or when making it failed): for an error
  // path that must not start MPI, or throw again.
  static Communicator* world_if_made();
  // A world of this process alone, whatever the launcher (MPI_COMM_SELF under MPI): a
  // one-process reference run inside an MPI job (the tests).
  static Communicator& self();
  ~Communicator();

  int rank() const { return rank_; }
  int size() const { return size_; }
  int local_rank() const { return local_rank_; }
  int local_size() const { return local_size_; }
  bool is_root() const { return rank_ == 0; }
  bool uses_mpi() const;  // false for a world of one made without MPI
  // "rank 1/2 (local 1/2) on <host>"
  std::string describe() const;

  // ---- host collectives (every rank calls each one, in the same order) ----
  void allreduce_sum(std::span<double> data);
  void allreduce_sum(std::span<float> data);
  void allreduce_sum(std::span<int64_t> data);
  void allreduce_max(std::span<int64_t> data);
  // Starts summing `data` in place over the ranks; the memory stays untouched until wait().
  Request iallreduce_sum(std::span<float> data);
  void broadcast(std::span<std::byte> data, int root);
  // Every rank's `mine`, in rank order (each may have its own length).
  std::vector<std::string> allgather(const std::string& mine);
  void barrier();
  // Ends every rank of the job: prints "rank R: <why>" on stderr, then MPI_Abort (exit status
  // 1). In a world of one: std::exit(1) after the line.
  [[noreturn]] void abort(const std::string& why);

  // The longest a collective may wait before the watchdog ends this process, in seconds:
  // CNX_DIST_TIMEOUT (default 600) or set_timeout_seconds (--dist_timeout).
  static double timeout_seconds();
  static void set_timeout_seconds(double seconds);

  struct Impl;  // MPI's handles (communicator.cpp)

 private:
  Communicator(std::unique_ptr<Impl> impl, int rank, int size, int local_rank, int local_size);
  std::unique_ptr<Impl> impl_;
  int rank_ = 0, size_ = 1, local_rank_ = 0, local_size_ = 1;
};

// Whether this build can run more than one rank (built with MPI).
bool built_with_mpi();

}  // namespace cnx::dist
