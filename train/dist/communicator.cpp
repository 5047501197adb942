// Communicator: MPI underneath when built with it (CNX_HAVE_MPI), a world of one otherwise.
#include "train/dist/communicator.h"

#include <unistd.h>

#include <atomic>
#include <chrono>
#include <condition_variable>
#include <cstdio>
#include <cstdlib>
#include <limits>
#include <mutex>
#include <thread>

#include "tensor/error.h"

#if CNX_HAVE_MPI
#include <mpi.h>
#endif

namespace cnx::dist {

namespace {

// The launcher's word on this process: a rank number is set by mpirun (OpenMPI: OMPI_COMM_
// WORLD_*), by MPICH / Intel MPI / srun --mpi=pmi2 (PMI_*) and by PMIx launchers (PMIX_RANK,
// srun --mpi=pmix). None: not launched as a rank.
bool launched_as_rank() {
  for (const char* v : {"OMPI_COMM_WORLD_SIZE", "PMI_SIZE", "PMI_RANK", "PMIX_RANK"})
    if (std::getenv(v) != nullptr) return true;
  return false;
}

[[maybe_unused]] int launcher_world_size() {
  for (const char* v : {"OMPI_COMM_WORLD_SIZE", "PMI_SIZE"})
    if (const char* s = std::getenv(v)) return std::atoi(s);
  return 0;  // unknown (PMIx names the rank only)
}

std::string host_name() {
  char buf[256] = {};
  if (::gethostname(buf, sizeof(buf) - 1) != 0) return "?";
  return buf;
}

// ---- the watchdog --------------------------------------------------------------------------
// One collective at a time waits on the calling thread (the training loop's); its start is
// recorded here, and a thread checks it once a second. A collective that waits longer than the
// timeout means a peer died or hangs: the process ends (status 3), and with it the job.
std::atomic<double> g_timeout_s{-1};

double timeout_from_env() {
  if (const char* s = std::getenv("CNX_DIST_TIMEOUT")) {
    char* end = nullptr;
    const double v = std::strtod(s, &end);
    if (end != s && *end == '\0' && v > 0) return v;
    std::fprintf(stderr, "warning: CNX_DIST_TIMEOUT=%s is not a positive number of seconds: using 600\n", s);
  }
  return 600;
}

class Watchdog {
 public:
  void start(int rank) {
    std::lock_guard<std::mutex> lock(mu_);
    if (thread_.joinable()) return;
    rank_ = rank;
    thread_ = std::thread([this] { loop(); });
  }
  ~Watchdog() {
    {
      std::lock_guard<std::mutex> lock(mu_);
      stop_ = true;
    }
    cv_.notify_all();
    if (thread_.joinable()) thread_.join();
  }
  void enter(const char* what) {
    what_.store(what);
    since_ns_.store(now_ns());
  }
  void leave() { since_ns_.store(0); }

 private:
  static int64_t now_ns() {
    return std::chrono::duration_cast<std::chrono::nanoseconds>(std::chrono::steady_clock::now().time_since_epoch())
        .count();
  }
  void loop() {
    std::unique_lock<std::mutex> lock(mu_);
    while (!cv_.wait_for(lock, std::chrono::milliseconds(250), [this] { return stop_; })) {
      const int64_t since = since_ns_.load();
      if (since == 0) continue;
      const double waited = static_cast<double>(now_ns() - since) * 1e-9;
      if (waited <= Communicator::timeout_seconds()) continue;
      std::fprintf(stderr,
                   "rank %d: %s has waited %.0f s for the other ranks (--dist_timeout %.0f s): one of them "
                   "died or hangs; ending this rank\n",
                   rank_, what_.load(), waited, Communicator::timeout_seconds());
      std::fflush(stderr);
      std::_Exit(3);
    }
  }
  std::mutex mu_;
  std::condition_variable cv_;
  std::thread thread_;
  bool stop_ = false;
  int rank_ = 0;
  std::atomic<int64_t> since_ns_{0};
  std::atomic<const char*> what_{""};
};

[[maybe_unused]] Watchdog& watchdog() {
  static Watchdog w;
  return w;
}

// Marks one blocking collective for the watchdog.
struct Waiting {
  explicit Waiting(const char* what) { watchdog().enter(what); }
  ~Waiting() { watchdog().leave(); }
};

}  // namespace

#if CNX_HAVE_MPI

namespace {

void check_mpi(int rc, const char* what) {
  if (rc == MPI_SUCCESS) return;
  char text[MPI_MAX_ERROR_STRING] = {};
  int len = 0;
  MPI_Error_string(rc, text, &len);
  fail(what, " failed: ", std::string(text, static_cast<size_t>(len)));
}

void finalize_mpi() {
  int initialized = 0, finalized = 0;
  MPI_Initialized(&initialized);
  MPI_Finalized(&finalized);
  if (initialized && !finalized) MPI_Finalize();
}

}  // namespace

struct Communicator::Impl {
  MPI_Comm comm = MPI_COMM_NULL;  // null: a world of one without MPI
};

struct Request::Impl {
  MPI_Request request = MPI_REQUEST_NULL;
};

bool built_with_mpi() { return true; }

#else  // no MPI

struct Communicator::Impl {};
struct Request::Impl {};
bool built_with_mpi() { return false; }

#endif

// ---- Request --------------------------------------------------------------------------------

Request::Request() = default;
Request::~Request() {
  try {
    wait();
  } catch (...) {  // a destructor does not throw: the error has been (or will be) seen elsewhere
  }
}
Request::Request(Request&&) noexcept = default;
Request& Request::operator=(Request&& o) noexcept {
  if (this != &o) {
    try {
      wait();
    } catch (...) {
    }
    impl_ = std::move(o.impl_);
  }
  return *this;
}

bool Request::test() {
  if (!impl_) return true;
#if CNX_HAVE_MPI
  int done = 0;
  check_mpi(MPI_Test(&impl_->request, &done, MPI_STATUS_IGNORE), "MPI_Test");
  if (done) impl_.reset();
  return done != 0;
#else
  return true;
#endif
}

void Request::wait() {
  if (!impl_) return;
#if CNX_HAVE_MPI
  Waiting w("an allreduce of the gradients");
  const int rc = MPI_Wait(&impl_->request, MPI_STATUS_IGNORE);
  impl_.reset();
  check_mpi(rc, "MPI_Wait");
#endif
}

// ---- Communicator ---------------------------------------------------------------------------

Communicator::Communicator(std::unique_ptr<Impl> impl, int rank, int size, int local_rank, int local_size)
    : impl_(std::move(impl)), rank_(rank), size_(size), local_rank_(local_rank), local_size_(local_size) {}

Communicator::~Communicator() = default;

namespace {
std::atomic<Communicator*> g_world{nullptr};
}  // namespace

Communicator* Communicator::world_if_made() { return g_world.load(); }

Communicator& Communicator::world() {
  static Communicator* w = [] {
    if (!launched_as_rank()) {
      return new Communicator(std::make_unique<Impl>(), 0, 1, 0, 1);
    }
#if CNX_HAVE_MPI
    int provided = 0;
    check_mpi(MPI_Init_thread(nullptr, nullptr, MPI_THREAD_FUNNELED, &provided), "MPI_Init_thread");
    std::atexit(finalize_mpi);
    auto impl = std::make_unique<Impl>();
    impl->comm = MPI_COMM_WORLD;
    // Errors come back as codes (thrown as cnx::Error) instead of ending the job silently.
    check_mpi(MPI_Comm_set_errhandler(MPI_COMM_WORLD, MPI_ERRORS_RETURN), "MPI_Comm_set_errhandler");
    int rank = 0, size = 1, local_rank = 0, local_size = 1;
    MPI_Comm_rank(MPI_COMM_WORLD, &rank);
    MPI_Comm_size(MPI_COMM_WORLD, &size);
    // The ranks that share this machine's memory: the local rank picks the GPU.
    MPI_Comm local = MPI_COMM_NULL;
    check_mpi(MPI_Comm_split_type(MPI_COMM_WORLD, MPI_COMM_TYPE_SHARED, rank, MPI_INFO_NULL, &local),
              "MPI_Comm_split_type");
    MPI_Comm_rank(local, &local_rank);
    MPI_Comm_size(local, &local_size);
    MPI_Comm_free(&local);
    if (size > 1) watchdog().start(rank);
    return new Communicator(std::move(impl), rank, size, local_rank, local_size);
#else
    const int n = launcher_world_size();
    if (n > 1)
      fail("this build has no MPI (install libopenmpi-dev and rebuild) and cannot run as one of ", n, " ranks");
    return new Communicator(std::make_unique<Impl>(), 0, 1, 0, 1);
#endif
  }();
  g_world.store(w);
  return *w;
}

Communicator& Communicator::self() {
  static Communicator* s = [] {
    const bool mpi = world().uses_mpi();
    auto impl = std::make_unique<Impl>();
#if CNX_HAVE_MPI
    if (mpi) impl->comm = MPI_COMM_SELF;
#else
    (void)mpi;
#endif
    return new Communicator(std::move(impl), 0, 1, 0, 1);
  }();
  return *s;
}

bool Communicator::uses_mpi() const {
#if CNX_HAVE_MPI
  return impl_->comm != MPI_COMM_NULL;
#else
  return false;
#endif
}

std::string Communicator::describe() const {
  return "rank " + std::to_string(rank_) + "/" + std::to_string(size_) + " (local " + std::to_string(local_rank_) +
         "/" + std::to_string(local_size_) + ") on " + host_name();
}

double Communicator::timeout_seconds() {
  double t = g_timeout_s.load();
  if (t <= 0) {
    t = timeout_from_env();
    g_timeout_s.store(t);
  }
  return t;
}

void Communicator::set_timeout_seconds(double seconds) {
  CNX_CHECK(seconds > 0, "--dist_timeout: needs a positive number of seconds, got ", seconds);
  g_timeout_s.store(seconds);
}

#if CNX_HAVE_MPI

namespace {
template <class T>
MPI_Datatype mpi_type();
template <>
MPI_Datatype mpi_type<double>() { return MPI_DOUBLE; }
template <>
MPI_Datatype mpi_type<float>() { return MPI_FLOAT; }
template <>
MPI_Datatype mpi_type<int64_t>() { return MPI_INT64_T; }

template <class T>
void allreduce(MPI_Comm comm, std::span<T> data, MPI_Op op, const char* what) {
  if (comm == MPI_COMM_NULL || data.empty()) return;
  CNX_CHECK(data.size() <= static_cast<size_t>(std::numeric_limits<int>::max()), what, ": ", data.size(),
            " values are more than one MPI call carries");
  Waiting w(what);
  check_mpi(MPI_Allreduce(MPI_IN_PLACE, data.data(), static_cast<int>(data.size()), mpi_type<T>(), op, comm), what);
}
}  // namespace

void Communicator::allreduce_sum(std::span<double> d) { allreduce(impl_->comm, d, MPI_SUM, "MPI_Allreduce"); }
void Communicator::allreduce_sum(std::span<float> d) { allreduce(impl_->comm, d, MPI_SUM, "MPI_Allreduce"); }
void Communicator::allreduce_sum(std::span<int64_t> d) { allreduce(impl_->comm, d, MPI_SUM, "MPI_Allreduce"); }
void Communicator::allreduce_max(std::span<int64_t> d) { allreduce(impl_->comm, d, MPI_MAX, "MPI_Allreduce"); }

Request Communicator::iallreduce_sum(std::span<float> data) {
  Request r;
  if (impl_->comm == MPI_COMM_NULL || data.empty()) return r;
  CNX_CHECK(data.size() <= static_cast<size_t>(std::numeric_limits<int>::max()), "MPI_Iallreduce: ", data.size(),
            " values are more than one MPI call carries");
  r.impl_ = std::make_unique<Request::Impl>();
  check_mpi(MPI_Iallreduce(MPI_IN_PLACE, data.data(), static_cast<int>(data.size()), MPI_FLOAT, MPI_SUM,
                           impl_->comm, &r.impl_->request),
            "MPI_Iallreduce");
  return r;
}

void Communicator::broadcast(std::span<std::byte> data, int root) {
  if (impl_->comm == MPI_COMM_NULL || data.empty()) return;
  CNX_CHECK(root >= 0 && root < size_, "broadcast: root ", root, " is not a rank of ", size_);
  Waiting w("MPI_Bcast");
  check_mpi(MPI_Bcast(data.data(), static_cast<int>(data.size()), MPI_BYTE, root, impl_->comm), "MPI_Bcast");
}

std::vector<std::string> Communicator::allgather(const std::string& mine) {
  if (impl_->comm == MPI_COMM_NULL) return {mine};
  Waiting w("MPI_Allgatherv");
  const int len = static_cast<int>(mine.size());
  std::vector<int> lens(static_cast<size_t>(size_)), offsets(static_cast<size_t>(size_));
  check_mpi(MPI_Allgather(&len, 1, MPI_INT, lens.data(), 1, MPI_INT, impl_->comm), "MPI_Allgather");
  int total = 0;
  for (int r = 0; r < size_; ++r) {
    offsets[static_cast<size_t>(r)] = total;
    total += lens[static_cast<size_t>(r)];
  }
  std::string all(static_cast<size_t>(total), '\0');
  check_mpi(MPI_Allgatherv(mine.data(), len, MPI_CHAR, all.data(), lens.data(), offsets.data(), MPI_CHAR,
                           impl_->comm),
            "MPI_Allgatherv");
  std::vector<std::string> out;
  for (int r = 0; r < size_; ++r)
    out.push_back(all.substr(static_cast<size_t>(offsets[static_cast<size_t>(r)]),
                             static_cast<size_t>(lens[static_cast<size_t>(r)])));
  return out;
}

void Communicator::barrier() {
  if (impl_->comm == MPI_COMM_NULL) return;
  Waiting w("MPI_Barrier");
  check_mpi(MPI_Barrier(impl_->comm), "MPI_Barrier");
}

void Communicator::abort(const std::string& why) {
  std::fprintf(stderr, "rank %d: %s\n", rank_, why.c_str());
  std::fflush(stderr);
  std::fflush(stdout);
  if (impl_->comm != MPI_COMM_NULL) MPI_Abort(MPI_COMM_WORLD, 1);
  std::exit(1);
}

#else  // a world of one: every collective is the identity

void Communicator::allreduce_sum(std::span<double>) {}
void Communicator::allreduce_sum(std::span<float>) {}
void Communicator::allreduce_sum(std::span<int64_t>) {}
void Communicator::allreduce_max(std::span<int64_t>) {}
Request Communicator::iallreduce_sum(std::span<float>) { return Request(); }
void Communicator::broadcast(std::span<std::byte>, int) {}
std::vector<std::string> Communicator::allgather(const std::string& mine) { return {mine}; }
void Communicator::barrier() {}
void Communicator::abort(const std::string& why) {
  std::fprintf(stderr, "rank %d: %s\n", rank_, why.c_str());
  std::fflush(stderr);
  std::fflush(stdout);
  std::exit(1);
}

#endif

}  // namespace cnx::dist
