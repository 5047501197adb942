// The pinned backend of the host buffer pool (see tensor/pinned_memory.h): page-locked memory
// from cudaHostAlloc, copies with cudaMemcpyAsync on the device's library stream, and one CUDA
// event per block to know when its copy has completed.
#include <cuda_runtime.h>

#include <cstdio>

#include "tensor/cuda_check.h"
#include "tensor/cuda_context.h"
#include "tensor/pinned_memory.h"

namespace cnx {

HostBufferPool::Backend HostBufferPool::pinned_backend() {
  CNX_CHECK(cuda_device_count() > 0, "HostBufferPool: pinned memory needs a CUDA device, and none is visible");
  Backend b;
  b.pinned = true;
  b.alloc = [](int64_t n) {
    void* p = nullptr;
    // Portable: page-locked for every device of the process, not only the current one.
    CNX_CUDA_CHECK(cudaHostAlloc(&p, static_cast<size_t>(n), cudaHostAllocPortable));
    return p;
  };
  b.free = [](void* p) {
    const cudaError_t e = cudaFreeHost(p);
    if (e != cudaSuccess) std::fprintf(stderr, "cnx: cudaFreeHost failed: %s\n", cudaGetErrorString(e));
  };
  b.copy_to_device = [](void* dst, Device device, const void* src, int64_t n) {
    cuda::DeviceGuard guard(device);
    const cudaStream_t s = cuda::device_stream(device);
    // Ordered after the kernels already on the stream that may still read dst's (reused) block.
    CNX_CUDA_CHECK(cudaMemcpyAsync(dst, src, static_cast<size_t>(n), cudaMemcpyHostToDevice, s));
    if (cuda_sync_after_launch()) CNX_CUDA_CHECK(cudaStreamSynchronize(s));  // CNX_CUDA_SYNC=1
  };
  b.record = [](void*& event, Device device) {
    cuda::DeviceGuard guard(device);
    if (!event) {
      cudaEvent_t e = nullptr;
      CNX_CUDA_CHECK(cudaEventCreateWithFlags(&e, cudaEventDisableTiming));
      event = e;
    }
    CNX_CUDA_CHECK(cudaEventRecord(static_cast<cudaEvent_t>(event), cuda::device_stream(device)));
  };
  b.done = [](void* event) {
    const cudaError_t e = cudaEventQuery(static_cast<cudaEvent_t>(event));
    if (e == cudaErrorNotReady) return false;
    CNX_CUDA_CHECK(e);
    return true;
  };
  b.wait = [](void* event) { CNX_CUDA_CHECK(cudaEventSynchronize(static_cast<cudaEvent_t>(event))); };
  b.destroy = [](void* event) {
    const cudaError_t e = cudaEventDestroy(static_cast<cudaEvent_t>(event));
    if (e != cudaSuccess) std::fprintf(stderr, "cnx: cudaEventDestroy failed: %s\n", cudaGetErrorString(e));
  };
  return b;
}

}  // namespace cnx
