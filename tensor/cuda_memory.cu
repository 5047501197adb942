// CUDA runtime services for the tensor core (built only with nvcc; see cuda_memory.h): one
// caching allocator per device over cudaMalloc/cudaFree (or, with CNX_CUDA_NO_CACHING=1, plain
// cudaMalloc/cudaFree and the small registry that keeps CUDA graphs' memory private), and copies
// and fills on the device's stream.
#include <algorithm>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <mutex>
#include <set>
#include <unordered_map>
#include <vector>

#include "kernels/cuda/launch.cuh"
#include "tensor/cuda_check.h"
#include "tensor/cuda_context.h"
#include "tensor/cuda_memory.h"

namespace cnx {

bool cuda_built() { return true; }

int cuda_device_count() {
  // Read once: the set of visible devices does not change while the process runs.
  static const int count = [] {
    int n = 0;
    // No driver or no device is not an error here: it means "run on the CPU".
    if (cudaGetDeviceCount(&n) != cudaSuccess) {
      cudaGetLastError();  // clear the error state
      return 0;
    }
    return n;
  }();
  return count;
}

namespace {
// True when the environment variable `name` is set to anything but "0".
bool env_switch(const char* name) {
  const char* v = std::getenv(name);
  return v && std::strcmp(v, "0") != 0;
}
}  // namespace

bool cuda_sync_after_launch() {
  static const bool on = env_switch("CNX_CUDA_SYNC");
  return on;
}

namespace {

// cudaMalloc on `device`: nullptr when out of memory, cnx::Error on any other failure.
void* device_alloc(int device, int64_t nbytes) {
  cuda::DeviceGuard guard(Device::cuda(device));
  void* p = nullptr;
  const cudaError_t e = cudaMalloc(&p, static_cast<size_t>(nbytes));
  if (e == cudaErrorMemoryAllocation) {
    cudaGetLastError();  // not sticky, but clear it so the next check does not see it
    return nullptr;
  }
  CNX_CUDA_CHECK(e);
  return p;
}

// cudaFree on `device`; logs, never throws.
void device_free(int device, void* p) noexcept {
  int previous = -1;
  if (cudaGetDevice(&previous) != cudaSuccess) previous = -1;
  if (previous != device) cudaSetDevice(device);
  const cudaError_t e = cudaFree(p);
  if (previous >= 0 && previous != device) cudaSetDevice(previous);
  if (e != cudaSuccess) std::fprintf(stderr, "cnx: cudaFree on cuda:%d failed: %s\n", device, cudaGetErrorString(e));
}

std::mutex g_allocators_mutex;

// One allocator per device, made on first use. Never destroyed (as the streams, cuda_context.cu):
// tensors may be freed during static destruction, after main returns.
CachingAllocator& allocator(int device) {
  const int count = cuda_device_count();
  CNX_CHECK(device >= 0 && device < count, "cuda:", device, ": no such CUDA device (", count,
            " visible)");
  std::lock_guard<std::mutex> lock(g_allocators_mutex);
  static auto* table = new std::vector<std::unique_ptr<CachingAllocator>>();
  if (table->size() <= static_cast<size_t>(device)) table->resize(static_cast<size_t>(device) + 1);
  auto& a = (*table)[static_cast<size_t>(device)];
  if (!a) {
    CachingAllocator::Backend backend;
    backend.alloc = [device](int64_t nbytes) { return device_alloc(device, nbytes); };
    backend.free = [device](void* p) { device_free(device, p); };
    backend.synchronize = [device] {
      cuda::DeviceGuard guard(Device::cuda(device));
      CNX_CUDA_CHECK(cudaDeviceSynchronize());
    };
    a = std::make_unique<CachingAllocator>(std::move(backend), Device::cuda(device).str());
  }
  return *a;
}

// CNX_CUDA_NO_CACHING=1's counterpart of the caching allocator's graph pools (see GraphMemory in
// cuda_memory.h): which addresses a capture allocated, and which cudaFree calls wait for pools to
// be released. An address freed during pool B's capture that pool A's capture allocated waits for
// both (the caching allocator holds such a block back for B, then returns it to A). One per
// device, made on first use, never destroyed (as the allocators). Thread-safe.
class UncachedGraphPools {
 public:
  explicit UncachedGraphPools(int device) : device_(device) {}

  int64_t create() {
    std::lock_guard<std::mutex> lock(mutex_);
    const int64_t id = next_id_++;
    live_.insert(id);
    return id;
  }

  void begin(int64_t id) {
    std::lock_guard<std::mutex> lock(mutex_);
    CNX_CHECK(capturing_ == 0, "cuda:", device_, ": a CUDA graph capture began while graph pool ",
              capturing_, " was capturing (one capture at a time per device)");
    CNX_CHECK(live_.count(id), "cuda:", device_, ": graph pool ", id, " does not exist");
    capturing_ = id;
  }

  void end() noexcept {
    std::lock_guard<std::mutex> lock(mutex_);
    capturing_ = 0;
  }

  // A cudaMalloc'd address: during a capture it belongs to the capturing pool.
  void note_alloc(void* p) {
    std::lock_guard<std::mutex> lock(mutex_);
    if (capturing_ != 0) owner_.emplace(p, capturing_);
  }

  // Frees p now (cudaFree), or once the pools that may still use it are released: the live pool
  // whose capture allocated it, and the pool capturing now.
  void free_or_defer(void* p) noexcept {
    {
      std::lock_guard<std::mutex> lock(mutex_);
      std::set<int64_t> holders;
      if (auto it = owner_.find(p); it != owner_.end()) {
        holders.insert(it->second);
        owner_.erase(it);
      }
      if (capturing_ != 0) holders.insert(capturing_);
      if (!holders.empty()) {
        waiting_.emplace(p, std::move(holders));
        return;
      }
    }
    device_free(device_, p);
  }

  // The pool's graph is gone: the addresses it allocated that are still in use become ordinary
  // ones, and those that waited for it alone are cudaFree'd (or, when another capture is on now,
  // wait for that one instead: no cudaFree during a capture). Unknown ids are ignored.
  void release(int64_t id) noexcept {
    std::vector<void*> frees;
    {
      std::lock_guard<std::mutex> lock(mutex_);
      if (!live_.erase(id)) return;
      if (capturing_ == id) capturing_ = 0;
      std::erase_if(owner_, [id](const auto& entry) { return entry.second == id; });
      for (auto it = waiting_.begin(); it != waiting_.end();) {
        std::set<int64_t>& holders = it->second;
        holders.erase(id);
        if (holders.empty() && capturing_ != 0) holders.insert(capturing_);
        if (holders.empty()) {
          frees.push_back(it->first);
          it = waiting_.erase(it);
        } else {
          ++it;
        }
      }
    }
    for (void* p : frees) device_free(device_, p);
  }

 private:
  const int device_;
  std::mutex mutex_;
  int64_t next_id_ = 1;
  int64_t capturing_ = 0;                                 // the pool capturing now; 0: none
  std::set<int64_t> live_;                                // pools not yet released
  std::unordered_map<void*, int64_t> owner_;              // in use, allocated in a live pool's capture
  std::unordered_map<void*, std::set<int64_t>> waiting_;  // freed; cudaFree once these are released
};

UncachedGraphPools& uncached_pools(int device) {
  const int count = cuda_device_count();
  CNX_CHECK(device >= 0 && device < count, "cuda:", device, ": no such CUDA device (", count,
            " visible)");
  std::lock_guard<std::mutex> lock(g_allocators_mutex);
  static auto* table = new std::vector<std::unique_ptr<UncachedGraphPools>>();
  if (table->size() <= static_cast<size_t>(device)) table->resize(static_cast<size_t>(device) + 1);
  auto& pools = (*table)[static_cast<size_t>(device)];
  if (!pools) pools = std::make_unique<UncachedGraphPools>(device);
  return *pools;
}

}  // namespace

namespace cuda {
bool caching_disabled() {
  static const bool off = env_switch("CNX_CUDA_NO_CACHING");
  return off;
}
}  // namespace cuda

void* cuda_malloc(int64_t nbytes, Device device) {
  CNX_CHECK(device.is_cuda(), "cuda_malloc: ", device.str(), " is not a CUDA device");
  CNX_CHECK(nbytes >= 0, "cuda_malloc: negative size ", nbytes);
  if (nbytes == 0) return nullptr;
  if (cuda::caching_disabled()) {
    CNX_CHECK(device.index >= 0 && device.index < cuda_device_count(), device.str(), ": no such CUDA device");
    void* p = device_alloc(device.index, nbytes);
    CNX_CHECK(p != nullptr, "CUDA out of memory: cudaMalloc of ", nbytes, " bytes on ", device.str(),
              " failed (CNX_CUDA_NO_CACHING=1)");
    try {
      uncached_pools(device.index).note_alloc(p);
    } catch (...) {
      device_free(device.index, p);
      throw;
    }
    return p;
  }
  return allocator(device.index).allocate(nbytes);
}

void cuda_free(void* ptr, Device device) noexcept {
  if (!ptr) return;
  // A non-null pointer came from cuda_malloc on this device, so its allocator (or registry)
  // exists and cannot throw here.
  try {
    if (cuda::caching_disabled()) uncached_pools(device.index).free_or_defer(ptr);
    else allocator(device.index).deallocate(ptr);
  } catch (const std::exception& e) {
    std::fprintf(stderr, "cnx: cuda_free: %s\n", e.what());
  }
}

void cuda_copy(void* dst, Device dst_device, const void* src, Device src_device, int64_t nbytes) {
  if (nbytes == 0) return;
  const size_t n = static_cast<size_t>(nbytes);
  if (src_device.is_cuda() && dst_device.is_cpu()) {
    // Device to host: enqueue after the kernels that produce src, then wait for them.
    cuda::DeviceGuard guard(src_device);
    const cudaStream_t s = cuda::device_stream(src_device);
    CNX_CUDA_CHECK(cudaMemcpyAsync(dst, src, n, cudaMemcpyDeviceToHost, s));
    CNX_CUDA_CHECK(cudaStreamSynchronize(s));
  } else if (src_device.is_cpu() && dst_device.is_cuda()) {
    // Host to device, from pageable memory (CPU storage is never pinned): the driver copies the
    // source to a staging buffer before the call returns, so the caller may free it at once
    // (PyTorch's non_blocking copies rely on the same). dst may be a reused cache block that
    // queued kernels still read: the copy is ordered after them on the stream.
    cuda::DeviceGuard guard(dst_device);
    const cudaStream_t s = cuda::device_stream(dst_device);
    CNX_CUDA_CHECK(cudaMemcpyAsync(dst, src, n, cudaMemcpyHostToDevice, s));
    if (cuda_sync_after_launch()) CNX_CUDA_CHECK(cudaStreamSynchronize(s));  // CNX_CUDA_SYNC=1
  } else if (src_device == dst_device) {
    cuda::DeviceGuard guard(dst_device);
    CNX_CUDA_CHECK(cudaMemcpyAsync(dst, src, n, cudaMemcpyDeviceToDevice, cuda::device_stream(dst_device)));
  } else {
    // Between two devices: dst's stream may still use the (reused) block, src's stream may
    // still be producing src. Wait for dst's stream, copy on src's, and wait for that too.
    CNX_CHECK(src_device.is_cuda() && dst_device.is_cuda(), "cuda_copy: ", src_device.str(), " -> ",
              dst_device.str(), " needs a CUDA device on one side");
    cuda::synchronize(dst_device);
    cuda::DeviceGuard guard(src_device);
    const cudaStream_t s = cuda::device_stream(src_device);
    CNX_CUDA_CHECK(cudaMemcpyPeerAsync(dst, dst_device.index, src, src_device.index, n, s));
    CNX_CUDA_CHECK(cudaStreamSynchronize(s));
  }
}

void cuda_zero(void* dst, Device device, int64_t nbytes) {
  if (nbytes == 0) return;
  cuda::DeviceGuard guard(device);
  CNX_CUDA_CHECK(cudaMemsetAsync(dst, 0, static_cast<size_t>(nbytes), cuda::device_stream(device)));
}

namespace {
// dst[i] = value for i < n, one element per thread of a grid-stride loop.
template <class Word>
__global__ void fill_kernel(Word* dst, int64_t n, Word value) {
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < n; i += int64_t(gridDim.x) * blockDim.x)
    dst[i] = value;
}

template <class Word>
void launch_fill(void* dst, int64_t count, uint64_t pattern, cudaStream_t stream) {
  constexpr int kThreads = 256;
  const int64_t blocks = std::min<int64_t>((count + kThreads - 1) / kThreads, 4096);
  cuda::launch<fill_kernel<Word>>(dim3(static_cast<unsigned>(blocks)), dim3(kThreads), 0, stream,
                                  static_cast<Word*>(dst), count, static_cast<Word>(pattern));
  CNX_CUDA_LAUNCH_CHECK();
}
}  // namespace

void cuda_fill(void* dst, Device device, int64_t count, int elem_bytes, uint64_t pattern) {
  CNX_CHECK(elem_bytes == 1 || elem_bytes == 2 || elem_bytes == 4 || elem_bytes == 8,
            "cuda_fill: elements of ", elem_bytes, " bytes (1, 2, 4 or 8)");
  if (count == 0) return;
  cuda::DeviceGuard guard(device);
  const cudaStream_t stream = cuda::device_stream(device);
  switch (elem_bytes) {
    case 1: launch_fill<uint8_t>(dst, count, pattern, stream); break;
    case 2: launch_fill<uint16_t>(dst, count, pattern, stream); break;
    case 4: launch_fill<uint32_t>(dst, count, pattern, stream); break;
    default: launch_fill<uint64_t>(dst, count, pattern, stream); break;
  }
}

namespace cuda {

CachingAllocator& device_allocator(Device device) {
  CNX_CHECK(device.is_cuda(), "device_allocator: ", device.str(), " is not a CUDA device");
  return allocator(device.index);
}

AllocatorStats memory_stats(Device device) {
  CNX_CHECK(device.is_cuda(), "memory_stats: ", device.str(), " is not a CUDA device");
  return allocator(device.index).stats();
}

void reset_peak_memory_stats(Device device) {
  CNX_CHECK(device.is_cuda(), "reset_peak_memory_stats: ", device.str(), " is not a CUDA device");
  allocator(device.index).reset_peak();
}

void empty_cache(Device device) {
  CNX_CHECK(device.is_cuda(), "empty_cache: ", device.str(), " is not a CUDA device");
  allocator(device.index).empty_cache();  // synchronises the device before releasing
}

// ---- GraphMemory: the allocator's graph pools, or the no-caching registry -----------------------

GraphMemory::GraphMemory(Device device) : device_(device) {
  CNX_CHECK(device.is_cuda(), "GraphMemory: ", device.str(), " is not a CUDA device");
  id_ = caching_disabled() ? uncached_pools(device.index).create() : allocator(device.index).create_pool();
}

void GraphMemory::begin_capture() {
  CNX_CHECK(id_ != 0, "GraphMemory::begin_capture: no pool (moved from, or default-constructed)");
  if (caching_disabled()) uncached_pools(device_.index).begin(id_);
  else allocator(device_.index).begin_pool(id_);
}

// The device's allocator (or registry) exists once a pool was made on it: no throw below.
void GraphMemory::end_capture() noexcept {
  if (id_ == 0) return;
  if (caching_disabled()) uncached_pools(device_.index).end();
  else allocator(device_.index).end_pool();
}

void GraphMemory::release() noexcept {
  if (id_ == 0) return;
  if (caching_disabled()) uncached_pools(device_.index).release(id_);
  else allocator(device_.index).release_pool(id_);
  id_ = 0;
}

}  // namespace cuda

}  // namespace cnx
