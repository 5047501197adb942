// CUDA runtime services for the tensor core (built only with nvcc; see cuda_memory.h).
#include <cstdio>
#include <cstdlib>
#include <cstring>

#include "tensor/cuda_check.h"
#include "tensor/cuda_memory.h"

namespace cnx {

bool cuda_built() { return true; }

int cuda_device_count() {
  int n = 0;
  // No driver or no device is not an error here: it means "run on the CPU".
  if (cudaGetDeviceCount(&n) != cudaSuccess) {
    cudaGetLastError();  // clear the sticky error state
    return 0;
  }
  return n;
}

bool cuda_sync_after_launch() {
  static const bool on = [] {
    const char* v = std::getenv("CNX_CUDA_SYNC");
    return v && std::strcmp(v, "0") != 0;
  }();
  return on;
}

namespace {
// Makes `device` current for the lifetime of the guard, restoring the previous one after.
class DeviceGuard {
 public:
  explicit DeviceGuard(Device d) {
    CNX_CUDA_CHECK(cudaGetDevice(&prev_));
    if (d.index != prev_) CNX_CUDA_CHECK(cudaSetDevice(d.index));
  }
  ~DeviceGuard() { cudaSetDevice(prev_); }
  DeviceGuard(const DeviceGuard&) = delete;
  DeviceGuard& operator=(const DeviceGuard&) = delete;

 private:
  int prev_ = 0;
};
}  // namespace

void* cuda_malloc(int64_t nbytes, Device device) {
  DeviceGuard guard(device);
  void* p = nullptr;
  CNX_CUDA_CHECK(cudaMalloc(&p, static_cast<size_t>(nbytes)));
  return p;
}

void cuda_free(void* ptr, Device device) noexcept {
  int prev = 0;
  cudaGetDevice(&prev);
  cudaSetDevice(device.index);
  cudaError_t err = cudaFree(ptr);
  cudaSetDevice(prev);
  if (err != cudaSuccess)
    std::fprintf(stderr, "cnx: cudaFree failed: %s\n", cudaGetErrorString(err));
}

void cuda_copy(void* dst, Device dst_device, const void* src, Device src_device, int64_t nbytes) {
  DeviceGuard guard(dst_device.is_cuda() ? dst_device : src_device);
  CNX_CUDA_CHECK(cudaMemcpy(dst, src, static_cast<size_t>(nbytes), cudaMemcpyDefault));
}

void cuda_zero(void* dst, Device device, int64_t nbytes) {
  DeviceGuard guard(device);
  CNX_CUDA_CHECK(cudaMemset(dst, 0, static_cast<size_t>(nbytes)));
}

}  // namespace cnx
