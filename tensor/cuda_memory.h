// The CUDA runtime services the tensor core needs: device memory from the caching allocator
// (tensor/cuda_allocator.h), copies and fills on the device's stream (tensor/cuda_context.h),
// and the allocator's statistics. Implemented in cuda_memory.cu when the library is built with
// CUDA; in device.cpp otherwise, where each call throws a cnx::Error that says the CUDA backend
// was not built (cuda_device_count() is then 0, so no CUDA tensor can exist).
//
// Ordering: every copy and fill is enqueued on the device's stream, after the kernels already
// there. A copy to the host waits for the stream (the bytes are on the host on return); a copy
// from the host is enqueued from pageable memory, which the driver stages before the call
// returns, so the source may be freed at once; device-to-device copies and fills are not waited
// for (whatever reads the result is on the same stream, after them). With CNX_CUDA_SYNC=1
// (tensor/cuda_check.h) a copy from the host waits for the stream too.
#pragma once

#include <cstdint>

#include "tensor/cuda_allocator.h"
#include "tensor/device.h"

namespace cnx {

// From / back to the device's caching allocator (no cudaMalloc or cudaFree once the cache is
// warm). cuda_malloc(0) is nullptr. cuda_free never throws. With the environment variable
// CNX_CUDA_NO_CACHING=1 every call goes straight to cudaMalloc / cudaFree with the exact size
// (slow; for memory checkers, which then see each tensor as its own allocation, as
// PYTORCH_NO_CUDA_MEMORY_CACHING does for PyTorch).
void* cuda_malloc(int64_t nbytes, Device device);
void cuda_free(void* ptr, Device device) noexcept;
// One side at least is a CUDA device.
void cuda_copy(void* dst, Device dst_device, const void* src, Device src_device, int64_t nbytes);
void cuda_zero(void* dst, Device device, int64_t nbytes);

namespace cuda {

// True when CNX_CUDA_NO_CACHING is set to anything but "0" (read once).
bool caching_disabled();

// The caching allocator's counters for `device` (see AllocatorStats).
AllocatorStats memory_stats(Device device = Device::cuda(0));
// Starts a new peak: peak_allocated_bytes = allocated_bytes.
void reset_peak_memory_stats(Device device = Device::cuda(0));
// Waits for the device's stream, then returns every cached segment that holds no live tensor to
// the driver (nvidia-smi then shows the memory free). Not during CUDA graph capture.
void empty_cache(Device device = Device::cuda(0));

// Scratch device memory for one launcher call, from the caching allocator, returned to it by the
// destructor: RAII, move-only. Freeing right after enqueuing the kernels that use it is safe,
// because whatever gets the block next is enqueued on the same stream, after them.
class ScratchBuffer {
 public:
  ScratchBuffer() = default;
  ScratchBuffer(int64_t nbytes, Device device) : ptr_(cuda_malloc(nbytes, device)), device_(device) {}
  ~ScratchBuffer() { cuda_free(ptr_, device_); }
  ScratchBuffer(ScratchBuffer&& o) noexcept : ptr_(o.ptr_), device_(o.device_) { o.ptr_ = nullptr; }
  ScratchBuffer& operator=(ScratchBuffer&& o) noexcept {
    if (this != &o) {
      cuda_free(ptr_, device_);
      ptr_ = o.ptr_;
      device_ = o.device_;
      o.ptr_ = nullptr;
    }
    return *this;
  }
  ScratchBuffer(const ScratchBuffer&) = delete;
  ScratchBuffer& operator=(const ScratchBuffer&) = delete;

  template <class T = float> T* as() const { return static_cast<T*>(ptr_); }

 private:
  void* ptr_ = nullptr;
  Device device_ = Device::cuda(0);
};

}  // namespace cuda
}  // namespace cnx
