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
#include <utility>

#include "tensor/cuda_allocator.h"
#include "tensor/device.h"

namespace cnx {

// From / back to the device's caching allocator (no cudaMalloc or cudaFree once the cache is
// warm). cuda_malloc(0) is nullptr. cuda_free never throws. With the environment variable
// CNX_CUDA_NO_CACHING=1 every call goes straight to cudaMalloc / cudaFree with the exact size
// (slow; for memory checkers, which then see each tensor as its own allocation, as
// PYTORCH_NO_CUDA_MEMORY_CACHING does for PyTorch); only around CUDA graphs is a cudaFree
// deferred (cuda::GraphMemory below).
void* cuda_malloc(int64_t nbytes, Device device);
void cuda_free(void* ptr, Device device) noexcept;
// One side at least is a CUDA device.
void cuda_copy(void* dst, Device dst_device, const void* src, Device src_device, int64_t nbytes);
void cuda_zero(void* dst, Device device, int64_t nbytes);
// Sets `count` elements of `elem_bytes` bytes (1, 2, 4 or 8) at dst to the low elem_bytes bytes
// of `pattern` (little-endian: the element's own bytes), with a kernel on the device's stream: no
// host memory is involved, so a CUDA graph can capture it (Tensor::full on a device uses it).
void cuda_fill(void* dst, Device device, int64_t count, int elem_bytes, uint64_t pattern);

namespace cuda {

// True when CNX_CUDA_NO_CACHING is set to anything but "0" (read once).
bool caching_disabled();

// The caching allocator of `device`, the one cuda_malloc and cuda_free use (unless
// caching_disabled(): then they bypass it, and it stays empty). Made on first use, never
// destroyed.
CachingAllocator& device_allocator(Device device);

// The caching allocator's counters for `device` (see AllocatorStats).
AllocatorStats memory_stats(Device device = Device::cuda(0));
// Starts a new peak: peak_allocated_bytes = allocated_bytes.
void reset_peak_memory_stats(Device device = Device::cuda(0));
// Waits for the device's stream, then returns every cached segment that holds no live tensor to
// the driver (nvidia-smi then shows the memory free). Not during CUDA graph capture.
void empty_cache(Device device = Device::cuda(0));

// The device memory of one CUDA graph (tensor/cuda_graph.h). A graph bakes in the addresses its
// kernels were captured with, so while it lives, no one else may be given the memory its capture
// allocated, nor the memory freed during its capture (captured kernels may have used it). Both
// modes of cuda_malloc keep that rule:
//  - caching (the default): a GraphPool of device_allocator(device) (see "CUDA graphs" in
//    tensor/cuda_allocator.h): blocks allocated during the capture come from the pool's own
//    segments, and blocks freed during it are held back, until the pool is released.
//  - CNX_CUDA_NO_CACHING=1: every cuda_malloc is its own cudaMalloc, and a cudaFree'd address
//    may be returned by the next cudaMalloc. cudaFree may not be called during a capture at all.
//    So cuda_memory.cu keeps a small registry per device, keyed by pool id as the allocator's
//    pools are: the cudaFree of an address is deferred while a pool that may use it lives: the
//    pool capturing when it is freed, and the pool whose capture allocated it. Releasing the
//    last of them cudaFrees it.
// Either way, memory allocated during the capture that is still in use when the pool is released
// (a tensor made inside the capture that outlives the graph) becomes ordinary memory: freeing it
// later returns it to the cache (or cudaFrees it) at once.
//
// RAII, move-only. Release happens in the destructor (never throws); destroy the graph's
// executable first.
class GraphMemory {
 public:
  GraphMemory() = default;  // no pool
  explicit GraphMemory(Device device);  // a new, empty pool on `device`
  ~GraphMemory() { release(); }
  GraphMemory(GraphMemory&& o) noexcept : device_(o.device_), id_(std::exchange(o.id_, 0)) {}
  GraphMemory& operator=(GraphMemory&& o) noexcept {
    if (this != &o) {
      release();
      device_ = o.device_;
      id_ = std::exchange(o.id_, 0);
    }
    return *this;
  }
  GraphMemory(const GraphMemory&) = delete;
  GraphMemory& operator=(const GraphMemory&) = delete;

  // From begin_capture() to end_capture(), every cuda_malloc and cuda_free of the device (from
  // any thread) follows the rules above. Call begin_capture just before cudaStreamBeginCapture
  // (so that its failure needs no capture ended) and end_capture right after
  // cudaStreamEndCapture. begin_capture throws when another pool of the device is capturing;
  // end_capture never throws.
  void begin_capture();
  void end_capture() noexcept;

 private:
  void release() noexcept;  // the pool's memory to everyone (see above); nothing when none

  Device device_ = Device::cuda(0);
  int64_t id_ = 0;  // the pool's id (the allocator's, or the no-caching registry's); 0: none
};

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
