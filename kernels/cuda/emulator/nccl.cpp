// The emulated NCCL: the functions train/dist/nccl_backend.cpp calls, compiled against the CUDA
// toolkit's nccl.h (its declarations, types and enums) and carried out by MPI between the
// processes of an MPI job, each with its own emulated device. Built only in the emulator build
// with MPI (CMakeLists.txt: without MPI the emulator build has no NCCL either).
//
// What is modelled:
//  - ncclGetUniqueId: 128 bytes that name the communicator (a magic word, the pid, a counter);
//    ncclCommInitRank checks that every rank was given the same id (an MPI allreduce of a hash);
//  - ncclCommInitRank(nranks, id, rank): a collective of every rank, like NCCL's. nranks 1 is a
//    communicator of this process alone, with or without MPI; nranks > 1 needs MPI initialised
//    (cnx::dist::Communicator::world() does it under a launcher), nranks == the size of
//    MPI_COMM_WORLD and rank == this process's rank in it; the communicator is a duplicate of
//    MPI_COMM_WORLD, so its collectives never match the host's own (train/dist/communicator.h);
//  - ncclAllReduce, in place or not: ncclSum, ncclProd, ncclMax, ncclMin on int32, uint32, int64,
//    uint64, float32, float64; ncclSum and ncclAvg on bfloat16; ncclAvg as NCCL computes it (for
//    floating types each rank's values are multiplied by 1/nranks before the sum, for integers
//    the sum is divided by nranks);
//  - stream order: the collective runs when it is called, after every item already queued on its
//    stream and what that stream waits for (emulator.h, run_in_stream_order); see there why not
//    at a later drain. The buffers must be device memory of the emulated device;
//  - errors: invalid arguments give ncclInvalidArgument or ncclInvalidUsage at the call (with a
//    line on stderr, and ncclGetLastError's text); a failed MPI call gives ncclSystemError and
//    becomes the communicator's asynchronous error (ncclCommGetAsyncError), as a failed
//    connection would in NCCL; a fault of the emulated device before the collective,
//    ncclUnhandledCudaError;
//  - ncclCommDestroy, ncclCommAbort (both free the duplicate; there is never work in flight, since
//    the collectives complete at the call), ncclGetErrorString, ncclGetLastError,
//    ncclCommGetAsyncError, ncclCommCount, ncclCommUserRank.
//
// Not modelled: groups (ncclGroupStart/End), other collectives, the non-blocking configuration
// (ncclCommInitRankConfig), user-defined reductions, float16 and float8, several devices per
// process, and NCCL's own reduction order (MPI's order is deterministic for a fixed world size,
// as NCCL's ring is).
#include <mpi.h>
#include <nccl.h>

#include <atomic>
#include <bit>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <memory>
#include <string>
#include <vector>

#include <unistd.h>

#include "kernels/cuda/emulator/emulator.h"

// The library's opaque handle (declared, never defined, by nccl.h).
struct ncclComm {
  MPI_Comm mpi = MPI_COMM_NULL;  // null: a communicator of one rank
  int nranks = 1;
  int rank = 0;
  ncclResult_t async_error = ncclSuccess;
  std::string last_error;
};

namespace cnx::emu {
namespace {

constexpr char kIdMagic[] = "cnx-emulated-nccl";

thread_local std::string t_last_error;  // ncclGetLastError(nullptr): the last failed call's text

ncclResult_t failed(ncclComm_t comm, ncclResult_t code, const std::string& why) {
  std::fprintf(stderr, "cnx emulator: %s\n", why.c_str());
  t_last_error = why;
  if (comm) comm->last_error = why;
  return code;
}

std::string mpi_text(int rc) {
  char text[MPI_MAX_ERROR_STRING] = {};
  int len = 0;
  MPI_Error_string(rc, text, &len);
  return std::string(text, static_cast<size_t>(len));
}

bool mpi_running() {
  int initialized = 0, finalized = 0;
  MPI_Initialized(&initialized);
  MPI_Finalized(&finalized);
  return initialized && !finalized;
}

uint64_t hash_id(const ncclUniqueId& id) {  // FNV-1a
  uint64_t h = 1469598103934665603ull;
  for (char c : id.internal) h = (h ^ static_cast<uint8_t>(c)) * 1099511628211ull;
  return h;
}

size_t type_bytes(ncclDataType_t t) {
  switch (t) {
    case ncclInt32: case ncclUint32: case ncclFloat32: return 4;
    case ncclInt64: case ncclUint64: case ncclFloat64: return 8;
    case ncclBfloat16: return 2;
    default: return 0;  // not modelled
  }
}

MPI_Datatype mpi_type(ncclDataType_t t) {
  switch (t) {
    case ncclInt32: return MPI_INT32_T;
    case ncclUint32: return MPI_UINT32_T;
    case ncclInt64: return MPI_INT64_T;
    case ncclUint64: return MPI_UINT64_T;
    case ncclFloat32: return MPI_FLOAT;
    case ncclFloat64: return MPI_DOUBLE;
    default: return MPI_UINT16_T;  // bfloat16: 16 bits, summed by bf16_sum
  }
}

// ---- bfloat16, summed in f32 and rounded to nearest even (what NCCL's bf16 kernels do per step) ----
float bf16_to_float(uint16_t b) { return std::bit_cast<float>(static_cast<uint32_t>(b) << 16); }
uint16_t float_to_bf16(float f) {
  const uint32_t u = std::bit_cast<uint32_t>(f);
  if ((u & 0x7fffffffu) > 0x7f800000u) return static_cast<uint16_t>((u >> 16) | 0x40u);  // quiet NaN
  return static_cast<uint16_t>((u + 0x7fffu + ((u >> 16) & 1u)) >> 16);
}
void bf16_sum(void* in, void* inout, int* len, MPI_Datatype*) {
  const auto* a = static_cast<const uint16_t*>(in);
  auto* b = static_cast<uint16_t*>(inout);
  for (int i = 0; i < *len; ++i) b[i] = float_to_bf16(bf16_to_float(a[i]) + bf16_to_float(b[i]));
}
MPI_Op bf16_sum_op() {
  static MPI_Op op = [] {
    MPI_Op o = MPI_OP_NULL;
    MPI_Op_create(&bf16_sum, /*commute=*/1, &o);
    return o;
  }();
  return op;
}

// ncclAvg on floating types: each rank's values times 1/nranks (rounded), then the sum.
template <class T> void pre_multiply(T* v, size_t n, double factor) {
  for (size_t i = 0; i < n; ++i) v[i] = static_cast<T>(v[i] * static_cast<T>(factor));
}
void pre_multiply_bf16(uint16_t* v, size_t n, float factor) {
  for (size_t i = 0; i < n; ++i) v[i] = float_to_bf16(bf16_to_float(v[i]) * factor);
}
// ncclAvg on integers: the sum divided by nranks (truncated, as NCCL's integer division).
template <class T> void post_divide(T* v, size_t n, int nranks) {
  for (size_t i = 0; i < n; ++i) v[i] = static_cast<T>(v[i] / static_cast<T>(nranks));
}

// The reduction of `n` elements in `host` (this rank's values in, the result out).
int reduce(std::vector<unsigned char>& host, size_t n, ncclDataType_t type, ncclRedOp_t op, ncclComm_t comm) {
  void* p = host.data();
  if (op == ncclAvg) {
    switch (type) {
      case ncclFloat32: pre_multiply(static_cast<float*>(p), n, 1.0 / comm->nranks); break;
      case ncclFloat64: pre_multiply(static_cast<double*>(p), n, 1.0 / comm->nranks); break;
      case ncclBfloat16: pre_multiply_bf16(static_cast<uint16_t*>(p), n, 1.0f / static_cast<float>(comm->nranks)); break;
      default: break;
    }
  }
  if (comm->mpi != MPI_COMM_NULL && n > 0) {
    const MPI_Op mop = type == ncclBfloat16 ? bf16_sum_op()
                       : op == ncclProd    ? MPI_PROD
                       : op == ncclMax     ? MPI_MAX
                       : op == ncclMin     ? MPI_MIN
                                           : MPI_SUM;
    if (const int rc = MPI_Allreduce(MPI_IN_PLACE, p, static_cast<int>(n), mpi_type(type), mop, comm->mpi);
        rc != MPI_SUCCESS)
      return rc;
  }
  if (op == ncclAvg) {
    switch (type) {
      case ncclInt32: post_divide(static_cast<int32_t*>(p), n, comm->nranks); break;
      case ncclUint32: post_divide(static_cast<uint32_t*>(p), n, comm->nranks); break;
      case ncclInt64: post_divide(static_cast<int64_t*>(p), n, comm->nranks); break;
      case ncclUint64: post_divide(static_cast<uint64_t*>(p), n, comm->nranks); break;
      default: break;
    }
  }
  return MPI_SUCCESS;
}

}  // namespace
}  // namespace cnx::emu

using namespace cnx::emu;

extern "C" {

ncclResult_t ncclGetVersion(int* version) {
  if (!version) return failed(nullptr, ncclInvalidArgument, "ncclGetVersion: version is null");
  *version = NCCL_VERSION_CODE;
  return ncclSuccess;
}

ncclResult_t ncclGetUniqueId(ncclUniqueId* id) {
  if (!id) return failed(nullptr, ncclInvalidArgument, "ncclGetUniqueId: uniqueId is null");
  static std::atomic<uint64_t> counter{0};
  std::memset(id->internal, 0, sizeof(id->internal));
  std::memcpy(id->internal, kIdMagic, sizeof(kIdMagic));
  const uint64_t words[2] = {static_cast<uint64_t>(::getpid()), ++counter};
  std::memcpy(id->internal + 32, words, sizeof(words));
  return ncclSuccess;
}

ncclResult_t ncclCommInitRank(ncclComm_t* comm, int nranks, ncclUniqueId id, int rank) {
  if (!comm) return failed(nullptr, ncclInvalidArgument, "ncclCommInitRank: comm is null");
  *comm = nullptr;
  if (nranks < 1 || rank < 0 || rank >= nranks)
    return failed(nullptr, ncclInvalidArgument,
                  "ncclCommInitRank: rank " + std::to_string(rank) + " of " + std::to_string(nranks) + " ranks");
  if (std::memcmp(id.internal, kIdMagic, sizeof(kIdMagic)) != 0)
    return failed(nullptr, ncclInvalidArgument, "ncclCommInitRank: the id was not made by ncclGetUniqueId");
  auto c = std::make_unique<ncclComm>();
  c->nranks = nranks;
  c->rank = rank;
  if (nranks > 1) {
    if (!mpi_running())
      return failed(nullptr, ncclInvalidUsage,
                    "ncclCommInitRank: " + std::to_string(nranks) +
                        " ranks on the emulated device need MPI (run under mpirun; MPI_Init not called)");
    int world_size = 0, world_rank = 0;
    MPI_Comm_size(MPI_COMM_WORLD, &world_size);
    MPI_Comm_rank(MPI_COMM_WORLD, &world_rank);
    if (nranks != world_size || rank != world_rank)
      return failed(nullptr, ncclInvalidArgument,
                    "ncclCommInitRank: rank " + std::to_string(rank) + " of " + std::to_string(nranks) +
                        ", but this is MPI rank " + std::to_string(world_rank) + " of " +
                        std::to_string(world_size) + " (the emulated NCCL spans MPI_COMM_WORLD)");
    if (const int rc = MPI_Comm_dup(MPI_COMM_WORLD, &c->mpi); rc != MPI_SUCCESS)
      return failed(nullptr, ncclSystemError, "ncclCommInitRank: MPI_Comm_dup failed: " + mpi_text(rc));
    MPI_Comm_set_errhandler(c->mpi, MPI_ERRORS_RETURN);
    // Every rank must have been given the same id (rank 0's, broadcast): compare hashes.
    const uint64_t mine = hash_id(id);
    uint64_t lo = mine, hi = mine;
    int rc = MPI_Allreduce(MPI_IN_PLACE, &lo, 1, MPI_UINT64_T, MPI_MIN, c->mpi);
    if (rc == MPI_SUCCESS) rc = MPI_Allreduce(MPI_IN_PLACE, &hi, 1, MPI_UINT64_T, MPI_MAX, c->mpi);
    if (rc != MPI_SUCCESS || lo != hi) {
      MPI_Comm_free(&c->mpi);
      return rc != MPI_SUCCESS
                 ? failed(nullptr, ncclSystemError, "ncclCommInitRank: MPI_Allreduce failed: " + mpi_text(rc))
                 : failed(nullptr, ncclInvalidArgument, "ncclCommInitRank: the ranks were given different ids");
    }
  }
  *comm = c.release();
  return ncclSuccess;
}

ncclResult_t ncclCommDestroy(ncclComm_t comm) {
  if (!comm) return ncclSuccess;  // NCCL accepts a null communicator here
  if (comm->mpi != MPI_COMM_NULL && mpi_running()) MPI_Comm_free(&comm->mpi);
  delete comm;
  return ncclSuccess;
}

// The collectives complete at their call (nothing is ever in flight), so abort is a destroy.
ncclResult_t ncclCommAbort(ncclComm_t comm) { return ncclCommDestroy(comm); }

ncclResult_t ncclCommCount(const ncclComm_t comm, int* count) {
  if (!comm || !count) return failed(comm, ncclInvalidArgument, "ncclCommCount: null argument");
  *count = comm->nranks;
  return ncclSuccess;
}

ncclResult_t ncclCommUserRank(const ncclComm_t comm, int* rank) {
  if (!comm || !rank) return failed(comm, ncclInvalidArgument, "ncclCommUserRank: null argument");
  *rank = comm->rank;
  return ncclSuccess;
}

ncclResult_t ncclCommGetAsyncError(ncclComm_t comm, ncclResult_t* async_error) {
  if (!comm || !async_error) return failed(comm, ncclInvalidArgument, "ncclCommGetAsyncError: null argument");
  *async_error = comm->async_error;
  return ncclSuccess;
}

const char* ncclGetErrorString(ncclResult_t result) {
  switch (result) {  // NCCL's own texts
    case ncclSuccess: return "no error";
    case ncclUnhandledCudaError: return "unhandled cuda error (run with NCCL_DEBUG=INFO for details)";
    case ncclSystemError: return "unhandled system error (run with NCCL_DEBUG=INFO for details)";
    case ncclInternalError: return "internal error - please report this issue to the NCCL developers";
    case ncclInvalidArgument: return "invalid argument (run with NCCL_DEBUG=WARN for details)";
    case ncclInvalidUsage: return "invalid usage (run with NCCL_DEBUG=WARN for details)";
    case ncclRemoteError: return "remote process exited or there was a network error";
    case ncclInProgress: return "NCCL operation in progress";
    default: return "unknown result code";
  }
}

const char* ncclGetLastError(ncclComm_t comm) {
  return comm ? comm->last_error.c_str() : t_last_error.c_str();
}

ncclResult_t ncclAllReduce(const void* sendbuff, void* recvbuff, size_t count, ncclDataType_t datatype,
                           ncclRedOp_t op, ncclComm_t comm, cudaStream_t stream) {
  if (!comm) return failed(nullptr, ncclInvalidArgument, "ncclAllReduce: comm is null");
  if (comm->async_error != ncclSuccess)
    return failed(comm, ncclInvalidUsage, "ncclAllReduce: the communicator has failed before (ncclCommGetAsyncError)");
  const size_t elem = type_bytes(datatype);
  if (elem == 0) return failed(comm, ncclInvalidArgument, "ncclAllReduce: data type " + std::to_string(datatype) + " is not emulated");
  if (op != ncclSum && op != ncclProd && op != ncclMax && op != ncclMin && op != ncclAvg)
    return failed(comm, ncclInvalidArgument, "ncclAllReduce: reduction " + std::to_string(op) + " is not emulated");
  if (datatype == ncclBfloat16 && op != ncclSum && op != ncclAvg)
    return failed(comm, ncclInvalidArgument, "ncclAllReduce: bfloat16 is emulated with ncclSum and ncclAvg only");
  if (count > static_cast<size_t>(INT32_MAX))
    return failed(comm, ncclInvalidArgument, "ncclAllReduce: more than 2^31 - 1 elements are not emulated");
  const size_t bytes = count * elem;
  if (count > 0 && (!is_device_range(sendbuff, bytes) || !is_device_range(recvbuff, bytes)))
    return failed(comm, ncclInvalidArgument,
                  "ncclAllReduce: the send and receive buffers must be " + std::to_string(bytes) +
                      " bytes of device memory each (a real GPU would fault)");
  // Staged through host memory: MPI never touches the arena, whose pages close again between
  // device work (emulator.h).
  int mpi_rc = MPI_SUCCESS;
  const cudaError_t e = run_in_stream_order(stream, "ncclAllReduce", [=, &mpi_rc] {
    std::vector<unsigned char> host(bytes);
    if (bytes) std::memcpy(host.data(), sendbuff, bytes);
    mpi_rc = reduce(host, count, datatype, op, comm);
    if (mpi_rc == MPI_SUCCESS && bytes) std::memcpy(recvbuff, host.data(), bytes);
  });
  if (e != cudaSuccess)
    return failed(comm, ncclUnhandledCudaError,
                  std::string("ncclAllReduce: the emulated device failed: ") + cudaGetErrorString(e));
  if (mpi_rc != MPI_SUCCESS) {
    comm->async_error = ncclSystemError;
    return failed(comm, ncclSystemError, "ncclAllReduce: MPI_Allreduce failed: " + mpi_text(mpi_rc));
  }
  return ncclSuccess;
}

}  // extern "C"
