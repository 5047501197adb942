// bench_common.h's helpers, the copy-bandwidth benchmark, and the device in the context.
#include "bench/cuda/bench_common.h"

#include <cstdio>
#include <vector>

#include "kernels/cuda/launch.cuh"

namespace cnx::bench {

namespace {
// Deterministic fill in [-1, 1): a hash of the index, so no host transfer is needed.
__global__ void fill_uniform(float* p, int64_t n) {
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < n;
       i += int64_t(gridDim.x) * blockDim.x) {
    uint32_t h = static_cast<uint32_t>(i) * 2654435761u;
    h ^= h >> 16;
    h *= 2246822519u;
    h ^= h >> 13;
    p[i] = static_cast<float>(h) * (2.0f / 4294967296.0f) - 1.0f;
  }
}
}  // namespace

DeviceBuffer::DeviceBuffer(int64_t bytes, bool random) : bytes_(bytes) {
  CNX_CUDA_CHECK(cudaMalloc(&ptr_, static_cast<size_t>(bytes)));
  if (random) {
    cuda::launch<fill_uniform>(1024, 256, 0, nullptr, static_cast<float*>(ptr_), bytes / 4);
    CNX_CUDA_LAUNCH_CHECK();
  } else {
    CNX_CUDA_CHECK(cudaMemset(ptr_, 0, static_cast<size_t>(bytes)));
  }
  CNX_CUDA_CHECK(cudaDeviceSynchronize());
}

DeviceBuffer::~DeviceBuffer() {
  if (ptr_ && cudaFree(ptr_) != cudaSuccess) std::fprintf(stderr, "bench: cudaFree failed\n");
}

DeviceBuffer& DeviceBuffer::operator=(DeviceBuffer&& o) noexcept {
  if (this != &o) {
    if (ptr_) cudaFree(ptr_);
    ptr_ = o.ptr_;
    bytes_ = o.bytes_;
    o.ptr_ = nullptr;
  }
  return *this;
}

namespace {
constexpr int64_t kCopyBytes = int64_t(1) << 30;

// Seconds per 1 GiB device-to-device copy: the best of 20 after a warm-up.
double time_copy() {
  DeviceBuffer src(kCopyBytes, false), dst(kCopyBytes, false);
  cudaEvent_t a, b;
  CNX_CUDA_CHECK(cudaEventCreate(&a));
  CNX_CUDA_CHECK(cudaEventCreate(&b));
  double best = 1e30;
  for (int i = 0; i < 21; ++i) {
    CNX_CUDA_CHECK(cudaEventRecord(a));
    CNX_CUDA_CHECK(cudaMemcpyAsync(dst.as<void>(), src.as<void>(), kCopyBytes,
                                   cudaMemcpyDeviceToDevice));
    CNX_CUDA_CHECK(cudaEventRecord(b));
    CNX_CUDA_CHECK(cudaEventSynchronize(b));
    float ms = 0;
    CNX_CUDA_CHECK(cudaEventElapsedTime(&ms, a, b));
    if (i > 0 && ms * 1e-3 < best) best = ms * 1e-3;
  }
  CNX_CUDA_CHECK(cudaEventDestroy(a));
  CNX_CUDA_CHECK(cudaEventDestroy(b));
  return best;
}
}  // namespace

double copy_bandwidth_gbs() {
  static const double gbs = 2.0 * kCopyBytes / time_copy() / 1e9;  // read + write
  return gbs;
}

// Plain counters computed here from the event-timed mean, rather than Google Benchmark's
// kIsRate, so the figures do not depend on which clock the library divides by.
void report_bytes(benchmark::State& state, double bytes_per_iteration, double seconds) {
  if (seconds <= 0) return;
  const double gbs = bytes_per_iteration / seconds / 1e9;
  state.counters["GB/s"] = gbs;
  state.counters["of_copy_bw"] = gbs / copy_bandwidth_gbs();
}

void report_flops(benchmark::State& state, double flops_per_iteration, double seconds) {
  if (seconds <= 0) return;
  state.counters["TFLOP/s"] = flops_per_iteration / seconds / 1e12;
}

namespace {
// The copy itself as a benchmark row: the 100% line of every "of_copy_bw".
void BM_copy_d2d_1GiB(benchmark::State& state) {
  DeviceBuffer src(kCopyBytes, false), dst(kCopyBytes, false);
  const double s = time_iterations(state, nullptr, [&] {
    CNX_CUDA_CHECK(cudaMemcpyAsync(dst.as<void>(), src.as<void>(), kCopyBytes,
                                   cudaMemcpyDeviceToDevice));
  });
  report_bytes(state, 2.0 * kCopyBytes, s);
}
BENCHMARK(BM_copy_d2d_1GiB)->UseManualTime()->Unit(benchmark::kMicrosecond);

// The GPU's name, compute capability and clocks in the benchmark context (JSON "context").
struct DeviceContext {
  DeviceContext() {
    int dev = 0;
    cudaDeviceProp p{};
    if (cudaGetDevice(&dev) != cudaSuccess || cudaGetDeviceProperties(&p, dev) != cudaSuccess) {
      cudaGetLastError();
      benchmark::AddCustomContext("cuda_device", "none");
      return;
    }
    benchmark::AddCustomContext("cuda_device", p.name);
    benchmark::AddCustomContext("cuda_cc", std::to_string(p.major) + "." + std::to_string(p.minor));
    benchmark::AddCustomContext("cuda_sms", std::to_string(p.multiProcessorCount));
    benchmark::AddCustomContext("cuda_memory_gib",
                                std::to_string(static_cast<double>(p.totalGlobalMem) / (1 << 30)));
  }
} const g_device_context;
}  // namespace

}  // namespace cnx::bench
