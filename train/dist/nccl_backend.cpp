// The CUDA ranks' BucketBackend (train/dist/grad_reducer.h): each bucket's gradients are summed
// over the ranks by ncclAllReduce on a communication stream of their own, overlapped with the
// rest of the backward, and the host never waits.
//
//   compute stream   ... backward kernels ... rec(ready) ..... backward ..... wait(reduced) AdamW
//   comm stream                          wait(ready) pack allreduce   ... unpack*1/W rec(reduced)
//
//   construction  rank 0 makes the NCCL id (ncclGetUniqueId), Communicator::broadcast (host MPI)
//                 gives it to every rank, and each calls ncclCommInitRank(size, id, rank) on its
//                 device (the trainer has made it current: cuda:local_rank). A non-blocking
//                 stream for the communication, two events.
//   start(k)      the comm stream waits for what the compute stream has queued so far (the
//                 bucket's gradients are complete there), copies the gradients into the bucket's
//                 flat f32 buffer (kernels/grad_bucket.h: one multi-tensor launch) and sums it in
//                 place with ncclAllReduce(ncclSum).
//   finish        on the comm stream, one multi-tensor launch writes flat * (1.0f / W) back into
//                 every gradient (the CPU ranks' formula, MpiBackend::finish: both backends give
//                 the same bits from the same sum); then the compute stream waits for it.
//   average(t)    the same round trip for a small tensor: the comm stream waits for the compute
//                 stream, sums t in place, scales it by 1/W, and the compute stream waits.
//                 Every NCCL call of the communicator is on the one comm stream, so its
//                 collectives run on the device in the order the host issued them.
//
// Why the sum and a separate multiply rather than ncclAvg: NCCL's ncclAvg on floats multiplies
// each rank's values by 1/W before the sum, which rounds differently from the CPU ranks'
// sum * (1/W) whenever W is not a power of two. The multiply costs nothing extra: it is part of
// the unpack copy.
//
// Memory and streams. The caching allocator (tensor/cuda_allocator.h) assumes every tensor is
// used on its device's one stream; here gradients, the flat buffers and t are also used on the
// comm stream, and the allocator has no record_stream. It is still safe:
//  - gradients and t: the comm stream reads and writes them only between a wait for the compute
//    stream and a wait of the compute stream for it (finish, average). A tensor freed after that
//    is reused by work queued on the compute stream later, which is ordered after the comm
//    stream's. (The gradients live in their Parameters for the whole step anyway.)
//  - the flat buffers are allocated once, at a bucket's first start(), after the comm stream's
//    wait for the compute stream was queued: whatever used that memory before it was freed was
//    queued on the compute stream before the wait, so the comm stream's first write comes after.
//    They are used by the comm stream alone from then on, and freed in the destructor after the
//    comm stream has finished.
//  - a backward abandoned between start() and finish() (an exception) leaves the comm stream
//    running; the destructor synchronises it before anything is freed.
//
// Errors: every NCCL call is checked (CNX_NCCL_CHECK: one line, with ncclGetErrorString); once one
// failed, the destructor aborts the communicator (ncclCommAbort) instead of destroying it, so it
// never waits for peers that may be gone. progress() (each gradient hook) and finish() poll
// ncclCommGetAsyncError, a read of a host flag, so a broken connection is reported at the next
// hook instead of hanging in the next collective.
//
// Built with NCCL only (CNX_HAVE_NCCL, set by CMakeLists.txt when the CUDA build finds nccl.h and
// libnccl, or for the emulated device when MPI is there: kernels/cuda/emulator/nccl.cpp); without
// it make_nccl_backend refuses with one line.
#include "tensor/error.h"
#include "train/dist/grad_reducer.h"

#if defined(CNX_HAVE_NCCL) && CNX_HAVE_NCCL
#include <cuda_runtime.h>
#include <nccl.h>

#include <cstdio>
#include <cstring>
#include <optional>
#include <span>
#include <vector>

#include "kernels/grad_bucket.h"
#include "tensor/cuda_check.h"
#include "tensor/cuda_context.h"
#endif

namespace cnx::dist {

#if defined(CNX_HAVE_NCCL) && CNX_HAVE_NCCL

namespace {

// ---- RAII handles: move-only; destructors log and never throw -------------------------------

class CommStream {
 public:
  CommStream() { CNX_CUDA_CHECK(cudaStreamCreateWithFlags(&s_, cudaStreamNonBlocking)); }
  ~CommStream() {
    if (!s_) return;
    const cudaError_t e = cudaStreamDestroy(s_);
    if (e != cudaSuccess) std::fprintf(stderr, "cnx: cudaStreamDestroy failed: %s\n", cudaGetErrorString(e));
  }
  CommStream(CommStream&& o) noexcept : s_(o.s_) { o.s_ = nullptr; }
  CommStream& operator=(CommStream&&) = delete;
  CommStream(const CommStream&) = delete;
  CommStream& operator=(const CommStream&) = delete;
  cudaStream_t get() const { return s_; }

 private:
  cudaStream_t s_ = nullptr;
};

class Event {
 public:
  Event() { CNX_CUDA_CHECK(cudaEventCreateWithFlags(&e_, cudaEventDisableTiming)); }
  ~Event() {
    if (!e_) return;
    const cudaError_t e = cudaEventDestroy(e_);
    if (e != cudaSuccess) std::fprintf(stderr, "cnx: cudaEventDestroy failed: %s\n", cudaGetErrorString(e));
  }
  Event(Event&& o) noexcept : e_(o.e_) { o.e_ = nullptr; }
  Event& operator=(Event&&) = delete;
  Event(const Event&) = delete;
  Event& operator=(const Event&) = delete;
  cudaEvent_t get() const { return e_; }

 private:
  cudaEvent_t e_ = nullptr;
};

// `to` waits for everything queued on `from` so far (the host does not wait).
void stream_waits(cudaStream_t to, cudaStream_t from, cudaEvent_t event) {
  CNX_CUDA_CHECK(cudaEventRecord(event, from));
  CNX_CUDA_CHECK(cudaStreamWaitEvent(to, event, 0));
}

class NcclBackend final : public BucketBackend {
 public:
  NcclBackend(Communicator& comm, const Device& device)
      : comm_(comm), device_(device), inv_world_(1.0f / static_cast<float>(comm.size())) {
    CNX_CHECK(device.is_cuda(), "make_nccl_backend: ", device.str(), " is not a CUDA device");
    const cuda::DeviceGuard guard(device_);
    compute_ = cuda::device_stream(device_);
    stream_.emplace();  // on device_: it is current now
    ready_.emplace();
    reduced_.emplace();
    ncclUniqueId id;
    std::memset(&id, 0, sizeof(id));
    if (comm_.is_root()) check(ncclGetUniqueId(&id), "ncclGetUniqueId(&id)", __LINE__);
    comm_.broadcast(std::as_writable_bytes(std::span<ncclUniqueId>(&id, 1)), 0);
    check(ncclCommInitRank(&nccl_, comm_.size(), id, comm_.rank()),
          "ncclCommInitRank(&nccl_, comm_.size(), id, comm_.rank())", __LINE__);
  }

  ~NcclBackend() override {
    try {
      const cuda::DeviceGuard guard(device_);
      if (failed_) {
        // The collectives may wait for a peer that is gone: abort them first (then the stream's
        // other work, packs and unpacks, can finish before the buffers go back to the cache).
        if (nccl_) log(ncclCommAbort(nccl_), "ncclCommAbort");
        const cudaError_t e = cudaStreamSynchronize(stream());
        if (e != cudaSuccess)
          std::fprintf(stderr, "cnx: cudaStreamSynchronize of the NCCL stream failed: %s\n", cudaGetErrorString(e));
      } else {
        // Nothing is freed while the comm stream may still use it (a step abandoned between
        // start and finish); a host wait is fine here, outside the step.
        const cudaError_t e = cudaStreamSynchronize(stream());
        if (e != cudaSuccess)
          std::fprintf(stderr, "cnx: cudaStreamSynchronize of the NCCL stream failed: %s\n", cudaGetErrorString(e));
        if (nccl_) log(e == cudaSuccess ? ncclCommDestroy(nccl_) : ncclCommAbort(nccl_), "ncclCommDestroy");
      }
      flat_.clear();
    } catch (const std::exception& e) {
      std::fprintf(stderr, "cnx: closing the NCCL communicator: %s\n", e.what());
    }
  }

  void start(size_t index, const Bucket& b) override {
    const cuda::DeviceGuard guard(device_);
    if (flat_.size() <= index) {
      flat_.resize(index + 1);
      slots_.resize(index + 1);
      started_.resize(index + 1, false);
    }
    CNX_CHECK(!started_[index], "NCCL backend: bucket ", index, " started twice in one step");
    // The comm stream waits first: see "Memory and streams" for why the flat buffer's first
    // allocation comes after this wait.
    stream_waits(stream(), compute_, ready_->get());
    Tensor& flat = flat_[index];
    if (!flat.defined() || flat.numel() != b.numel) flat = Tensor::empty({b.numel}, DType::f32, device_);
    std::vector<cuda::BucketSlot>& slots = slots_[index];
    slots.clear();
    float* base = flat.data<float>();
    for (size_t i = 0; i < b.params.size(); ++i) {
      Tensor g = b.params[i]->value.grad();
      CNX_CHECK(g.defined() && g.dtype() == DType::f32 && g.device() == device_ &&
                    g.numel() == b.params[i]->value.numel(),
                "NCCL backend: the gradient of ", b.params[i]->name, " is ", g.defined() ? g.str() : "missing",
                ", not f32 on ", device_.str(), " with ", b.params[i]->value.numel(), " elements");
      slots.push_back({g.data<float>(), base + b.offsets[i], g.numel()});
    }
    cuda::bucket_pack(slots.data(), static_cast<int64_t>(slots.size()), stream());
    check(ncclAllReduce(base, base, static_cast<size_t>(b.numel), ncclFloat32, ncclSum, nccl_, stream()),
          "ncclAllReduce(bucket)", __LINE__);
    started_[index] = true;
  }

  void progress() override { check_async_error(); }

  void finish(const std::vector<Bucket>& buckets) override {
    const cuda::DeviceGuard guard(device_);
    check_async_error();
    std::vector<cuda::BucketSlot> all;
    for (size_t k = 0; k < buckets.size(); ++k) {
      CNX_CHECK(k < started_.size() && started_[k], "NCCL backend: finish() before bucket ", k, " started");
      all.insert(all.end(), slots_[k].begin(), slots_[k].end());
      started_[k] = false;
    }
    // One launch (per 96 gradients) for every bucket: its slots point into their own buffers.
    cuda::bucket_unpack(all.data(), static_cast<int64_t>(all.size()), inv_world_, stream());
    stream_waits(compute_, stream(), reduced_->get());
  }

  void average(Tensor& t) override {
    CNX_CHECK(t.defined() && t.dtype() == DType::f32 && t.device() == device_, "average: needs an f32 tensor on ",
              device_.str(), ", got ", t.defined() ? t.str() : "an undefined tensor");
    const cuda::DeviceGuard guard(device_);
    check_async_error();
    float* v = t.data<float>();
    stream_waits(stream(), compute_, ready_->get());
    check(ncclAllReduce(v, v, static_cast<size_t>(t.numel()), ncclFloat32, ncclSum, nccl_, stream()),
          "ncclAllReduce(t)", __LINE__);
    const cuda::BucketSlot slot{v, v, t.numel()};  // in place: v = v * (1/W)
    cuda::bucket_unpack(&slot, 1, inv_world_, stream());
    stream_waits(compute_, stream(), reduced_->get());
  }

 private:
  // One line: the call, NCCL's text (and its detail, where it gives one), the line.
  void check(ncclResult_t r, const char* expr, int line) {
    if (r == ncclSuccess) return;
    failed_ = true;
#if NCCL_VERSION_CODE >= NCCL_VERSION(2, 13, 0)
    const char* detail = ncclGetLastError(nccl_);
#else
    const char* detail = nullptr;
#endif
    fail("NCCL error: ", ncclGetErrorString(r), detail && *detail ? std::string(" (") + detail + ")" : "", " in ",
         expr, " at ", __FILE__, ":", line, " (", comm_.describe(), ")");
  }
  void check_async_error() {
    ncclResult_t async = ncclSuccess;
    check(ncclCommGetAsyncError(nccl_, &async), "ncclCommGetAsyncError", __LINE__);
    if (async != ncclSuccess && async != ncclInProgress) check(async, "a collective in flight (asynchronous error)", __LINE__);
  }
  cudaStream_t stream() const { return stream_->get(); }
  static void log(ncclResult_t r, const char* what) {
    if (r != ncclSuccess) std::fprintf(stderr, "cnx: %s failed: %s\n", what, ncclGetErrorString(r));
  }

  Communicator& comm_;
  Device device_;
  float inv_world_;               // 1.0f / world size, as the CPU ranks' backend
  cudaStream_t compute_ = nullptr;  // the device's library stream (tensor/cuda_context.h)
  // Made in the constructor's body, once device_ is current (a stream belongs to the device that
  // was current when it was created).
  std::optional<CommStream> stream_;
  std::optional<Event> ready_, reduced_;  // compute -> comm, comm -> compute
  ncclComm_t nccl_ = nullptr;
  bool failed_ = false;           // an NCCL call failed: abort, do not destroy
  std::vector<Tensor> flat_;      // one f32 buffer per bucket, kept from step to step
  std::vector<std::vector<cuda::BucketSlot>> slots_;  // each bucket's gradients, as last started
  std::vector<bool> started_;     // in this step
};

}  // namespace

bool built_with_nccl() { return true; }

std::unique_ptr<BucketBackend> make_nccl_backend(Communicator& comm, const Device& device) {
  return std::make_unique<NcclBackend>(comm, device);
}

#else  // no NCCL

bool built_with_nccl() { return false; }

std::unique_ptr<BucketBackend> make_nccl_backend(Communicator& comm, const Device& device) {
  (void)comm;
  fail("data-parallel training on ", device.str(), " needs NCCL, which this build has not");
}

#endif

}  // namespace cnx::dist
