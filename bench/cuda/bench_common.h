// Shared by the CUDA kernel benchmarks: one binary, bench_cuda_kernels, built from every
// bench/cuda/*.cu (each file registers its benchmarks with BENCHMARK(...)).
//
// Conventions, so every row of bench/RESULTS.md reads the same way:
//  - Shapes are ConvNeXt-T's at batch 128, 224x224 input: kStages below.
//  - Time is measured with CUDA events around the launches of each iteration
//    (UseManualTime), not with the host clock.
//  - report_bytes(state, bytes, seconds) sets the counters "GB/s" (bytes that must move / time) and
//    "of_copy_bw" (that over the device's device-to-device copy bandwidth, measured once by
//    the BM_copy benchmark in bench_common.cu with the same event timing).
//  - The context (printed and in the JSON) names the GPU: see bench_common.cu.
//
//   ./build/bench/bench_cuda_kernels --benchmark_filter=dwconv --benchmark_format=json
#pragma once

#include <benchmark/benchmark.h>
#include <cuda_runtime.h>

#include <cstdint>
#include <string>

#include "tensor/cuda_check.h"

namespace cnx::bench {

// One ConvNeXt-T stage's activation shape at batch 128, 224x224: (N, H, W, C).
struct StageShape {
  int64_t N, H, W, C;
  int64_t pixels() const { return N * H * W; }
  int64_t numel() const { return N * H * W * C; }
  std::string label() const {
    return std::to_string(H) + "x" + std::to_string(W) + "x" + std::to_string(C);
  }
};
inline constexpr StageShape kStages[] = {
    {128, 56, 56, 96}, {128, 28, 28, 192}, {128, 14, 14, 384}, {128, 7, 7, 768}};
inline constexpr int kNumStages = 4;

// Registers a benchmark once per stage (Arg = stage index) with manual (event) timing.
#define CNX_CUDA_BENCH_STAGES(fn) \
  BENCHMARK(fn)->DenseRange(0, ::cnx::bench::kNumStages - 1)->UseManualTime()->Unit(benchmark::kMicrosecond)

// Device memory for a benchmark: RAII, move-only, filled with uniform values in [-1, 1)
// (deterministic), or zeros.
class DeviceBuffer {
 public:
  DeviceBuffer() = default;
  explicit DeviceBuffer(int64_t bytes, bool random = true);
  ~DeviceBuffer();
  DeviceBuffer(DeviceBuffer&& o) noexcept : ptr_(o.ptr_), bytes_(o.bytes_) { o.ptr_ = nullptr; }
  DeviceBuffer& operator=(DeviceBuffer&& o) noexcept;
  DeviceBuffer(const DeviceBuffer&) = delete;
  DeviceBuffer& operator=(const DeviceBuffer&) = delete;

  template <class T = float> T* as() const { return static_cast<T*>(ptr_); }
  int64_t bytes() const { return bytes_; }

 private:
  void* ptr_ = nullptr;
  int64_t bytes_ = 0;
};
inline DeviceBuffer floats(int64_t n, bool random = true) { return DeviceBuffer(n * 4, random); }

// Times `launch` (enqueues work on `stream`) once per iteration with CUDA events, after one
// warm-up call, feeds each elapsed time to Google Benchmark, and returns the mean seconds per
// iteration (for report_bytes / report_flops).
template <class Launch>
double time_iterations(benchmark::State& state, cudaStream_t stream, Launch&& launch) {
  cudaEvent_t start, stop;
  CNX_CUDA_CHECK(cudaEventCreate(&start));
  CNX_CUDA_CHECK(cudaEventCreate(&stop));
  launch();  // warm-up: first-touch, cuBLAS heuristics, caches
  CNX_CUDA_CHECK(cudaStreamSynchronize(stream));
  double total = 0;
  int64_t n = 0;
  for (auto _ : state) {
    CNX_CUDA_CHECK(cudaEventRecord(start, stream));
    launch();
    CNX_CUDA_CHECK(cudaEventRecord(stop, stream));
    CNX_CUDA_CHECK(cudaEventSynchronize(stop));
    float ms = 0;
    CNX_CUDA_CHECK(cudaEventElapsedTime(&ms, start, stop));
    state.SetIterationTime(ms * 1e-3);
    total += ms * 1e-3;
    ++n;
  }
  CNX_CUDA_CHECK(cudaEventDestroy(start));
  CNX_CUDA_CHECK(cudaEventDestroy(stop));
  return n > 0 ? total / static_cast<double>(n) : 0.0;
}

// The device-to-device copy bandwidth in GB/s (bytes read + bytes written per second) of a
// 1 GiB cudaMemcpyAsync, measured on the first call and cached.
double copy_bandwidth_gbs();

// Sets "GB/s" and "of_copy_bw" from the bytes one iteration must move (reads + writes) and the
// mean seconds per iteration that time_iterations returned.
void report_bytes(benchmark::State& state, double bytes_per_iteration, double seconds);

// Sets "TFLOP/s" from the floating-point operations of one iteration.
void report_flops(benchmark::State& state, double flops_per_iteration, double seconds);

}  // namespace cnx::bench
