#include "tensor/device.h"

#include <cstdlib>

#include "tensor/cuda_context.h"
#include "tensor/cuda_graph.h"
#include "tensor/cuda_memory.h"
#include "tensor/error.h"

namespace cnx {

Device Device::parse(const std::string& s) {
  if (s == "cpu") return cpu();
  if (s == "cuda") return cuda(0);
  if (s.rfind("cuda:", 0) == 0 && s.size() > 5) {
    char* end = nullptr;
    long i = std::strtol(s.c_str() + 5, &end, 10);
    if (*end == '\0' && i >= 0 && i < 1024) return cuda(static_cast<int>(i));
  }
  fail("device: expected cpu, cuda or cuda:N, got '", s, "'");
}

#ifndef CNX_CUDA
// ---- CPU-only build: every CUDA service says so ---------------------------------------------
bool cuda_built() { return false; }
int cuda_device_count() { return 0; }

[[noreturn]] static void no_cuda(const char* what) {
  fail(what, ": this build has no CUDA backend (nvcc was not found at configure time)");
}
void* cuda_malloc(int64_t, Device) { no_cuda("cuda_malloc"); }
void cuda_free(void*, Device) noexcept {}
void cuda_copy(void*, Device, const void*, Device, int64_t) { no_cuda("cuda_copy"); }
void cuda_zero(void*, Device, int64_t) { no_cuda("cuda_zero"); }
void cuda_fill(void*, Device, int64_t, int, uint64_t) { no_cuda("cuda_fill"); }

namespace cuda {
CachingAllocator& device_allocator(Device) { no_cuda("device_allocator"); }
AllocatorStats memory_stats(Device) { no_cuda("memory_stats"); }
void reset_peak_memory_stats(Device) { no_cuda("reset_peak_memory_stats"); }
void empty_cache(Device) { no_cuda("empty_cache"); }
int current_device() { no_cuda("current_device"); }
cudaStream_t current_stream() { no_cuda("current_stream"); }
cudaStream_t device_stream(Device) { no_cuda("device_stream"); }
void synchronize(Device) { no_cuda("synchronize"); }
// No CUDA tensor can exist, so a guard is only ever made for the CPU (a no-op).
DeviceGuard::DeviceGuard(Device device) {
  if (device.is_cuda()) no_cuda("DeviceGuard");
}
DeviceGuard::~DeviceGuard() = default;
bool allow_tf32() { return false; }
void set_allow_tf32(bool) {}
bool caching_disabled() { return false; }
// GraphMemory and Graph: none can be made, so there is nothing to end, release or destroy.
GraphMemory::GraphMemory(Device) { no_cuda("GraphMemory"); }
void GraphMemory::begin_capture() { no_cuda("GraphMemory::begin_capture"); }
void GraphMemory::end_capture() noexcept {}
void GraphMemory::release() noexcept {}
Graph Graph::capture(Device, const std::function<void()>&) { no_cuda("cuda::Graph::capture"); }
void Graph::replay() const { no_cuda("cuda::Graph::replay"); }
void Graph::destroy() noexcept {}
bool is_capturing(Device) { no_cuda("cuda::is_capturing"); }
}  // namespace cuda
#endif

}  // namespace cnx
