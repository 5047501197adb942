// Benchmarks of the ReLU and max-pooling kernels (kernels/cuda/relu.cu, kernels/cuda/maxpool.cu),
// part of bench_cuda_kernels: the two layers of ResNet-50, the roadmap's starting point.
//
// Shapes are ResNet-50's at batch 128, 224x224 (not ConvNeXt-T's kStages: ConvNeXt has neither
// layer): ReLU on the block outputs of the stem and the four stages (112x112x64, 56x56x256,
// 28x28x512, 14x14x1024, 7x7x2048); max pooling on the stem's 112x112x64 -> 56x56x64, k 3, s 2,
// p 1. Each row reports the event-timed mean, "GB/s" of the bytes that must move (every input
// read once, every output written once: for max pooling forward the input, the output and the
// int32 argmax; backward dout, the argmax and din) and "of_copy_bw" (bench_common.h).
//
// Baselines, "plain" versions written here as in bench/cuda/ops.cu: one thread per element,
// scalar loads; for max pooling one thread per output, and a backward that zeroes din and
// scatters with atomicAdd (non-deterministic, as a first version would be; the library's
// gathers instead). BM_<op>_<direction>_bf16 runs the library kernel on bf16 values (2 bytes).
//
//   ./build/bench/bench_cuda_kernels --benchmark_filter='relu|maxpool' --benchmark_format=json
#include <cuda_runtime.h>

#include <cmath>
#include <cstdint>
#include <string>

#include "bench/cuda/bench_common.h"
#include "kernels/cast.h"
#include "kernels/cuda/launch.cuh"
#include "kernels/maxpool.h"
#include "kernels/relu.h"
#include "tensor/cuda_check.h"

namespace cnx::bench {
namespace {

constexpr int kPlainThreads = 256;
constexpr double kF = 4.0;  // bytes per float (and per int32 argmax)
constexpr double kH = 2.0;  // bytes per bf16

// ResNet-50's activations at batch 128, 224x224: the stem's output and each stage's block output.
constexpr StageShape kResNetShapes[] = {{128, 112, 112, 64},
                                        {128, 56, 56, 256},
                                        {128, 28, 28, 512},
                                        {128, 14, 14, 1024},
                                        {128, 7, 7, 2048}};
constexpr int kNumResNetShapes = 5;
// The stem's pool: 112x112x64 -> 56x56x64.
constexpr StageShape kStemPoolIn{128, 112, 112, 64};
constexpr int64_t kPoolK = 3, kPoolStride = 2, kPoolPad = 1;

#define CNX_RESNET_BENCH(fn)                                                      \
  BENCHMARK(fn)->DenseRange(0, kNumResNetShapes - 1)->UseManualTime()->Unit(      \
      benchmark::kMicrosecond)
#define CNX_SINGLE_BENCH(fn) BENCHMARK(fn)->UseManualTime()->Unit(benchmark::kMicrosecond)

const StageShape& shape(const benchmark::State& state) { return kResNetShapes[state.range(0)]; }

// n bf16 values on the device: uniform in [-1, 1) rounded to bf16, or zeros.
DeviceBuffer bf16s(int64_t n, bool random = true) {
  DeviceBuffer b(n * 2, false);
  if (random) {
    const DeviceBuffer f = floats(n);
    cuda::cast(b.as<bf16>(), f.as(), n, nullptr);
    CNX_CUDA_CHECK(cudaStreamSynchronize(nullptr));
  }
  return b;
}

unsigned plain_grid(int64_t n) {
  return static_cast<unsigned>((n + kPlainThreads - 1) / kPlainThreads);
}

int64_t pooled(int64_t size) { return maxpool2d_out_size(size, kPoolK, kPoolStride, kPoolPad); }
int64_t pool_in_numel() { return kStemPoolIn.numel(); }
int64_t pool_out_numel() {
  return kStemPoolIn.N * pooled(kStemPoolIn.H) * pooled(kStemPoolIn.W) * kStemPoolIn.C;
}
std::string pool_label() {
  return kStemPoolIn.label() + " k3 s2 p1";
}

// =============================================================================================
// the plain baselines
// =============================================================================================

__global__ void plain_relu_forward(float* out, const float* in, int64_t n) {
  const int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x;
  if (i < n) out[i] = in[i] > 0.0f ? in[i] : 0.0f;
}
__global__ void plain_relu_backward(float* din, const float* dout, const float* out, int64_t n) {
  const int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x;
  if (i < n) din[i] = out[i] > 0.0f ? dout[i] : 0.0f;
}

// One thread per output element (n, oh, ow, c), scalar; argmax as the flat input index.
__global__ void plain_maxpool_forward(float* out, int32_t* argmax, const float* in, int64_t N,
                                      int64_t H, int64_t W, int64_t C, int64_t Ho, int64_t Wo) {
  const int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x;
  if (i >= N * Ho * Wo * C) return;
  const int64_t c = i % C, ow = (i / C) % Wo, oh = (i / (C * Wo)) % Ho, n = i / (C * Wo * Ho);
  float best = -INFINITY;
  int64_t arg = 0;
  for (int64_t h = oh * kPoolStride - kPoolPad; h < oh * kPoolStride - kPoolPad + kPoolK; ++h)
    for (int64_t w = ow * kPoolStride - kPoolPad; w < ow * kPoolStride - kPoolPad + kPoolK; ++w) {
      if (h < 0 || h >= H || w < 0 || w >= W) continue;
      const int64_t j = ((n * H + h) * W + w) * C + c;
      if (in[j] > best || in[j] != in[j]) {
        best = in[j];
        arg = j;
      }
    }
  out[i] = best;
  argmax[i] = static_cast<int32_t>(arg);
}
// One thread per output element: atomicAdd of its gradient into din[argmax] (din zeroed first).
__global__ void plain_maxpool_backward(float* din, const float* dout, const int32_t* argmax,
                                       int64_t n_out) {
  const int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x;
  if (i < n_out) atomicAdd(din + argmax[i], dout[i]);
}

// =============================================================================================
// ReLU
// =============================================================================================

void BM_relu_forward(benchmark::State& state) {
  const StageShape& s = shape(state);
  const int64_t n = s.numel();
  DeviceBuffer x = floats(n), out = floats(n, false);
  const double sec =
      time_iterations(state, nullptr, [&] { cuda::relu_forward(out.as(), x.as(), n, nullptr); });
  state.SetLabel(s.label());
  report_bytes(state, kF * 2.0 * n, sec);
}
CNX_RESNET_BENCH(BM_relu_forward);

void BM_relu_forward_plain(benchmark::State& state) {
  const StageShape& s = shape(state);
  const int64_t n = s.numel();
  DeviceBuffer x = floats(n), out = floats(n, false);
  const double sec = time_iterations(state, nullptr, [&] {
    cuda::launch<plain_relu_forward>(plain_grid(n), kPlainThreads, 0, nullptr, out.as(), x.as(), n);
    CNX_CUDA_LAUNCH_CHECK();
  });
  state.SetLabel(s.label());
  report_bytes(state, kF * 2.0 * n, sec);
}
CNX_RESNET_BENCH(BM_relu_forward_plain);

void BM_relu_forward_bf16(benchmark::State& state) {
  const StageShape& s = shape(state);
  const int64_t n = s.numel();
  DeviceBuffer x = bf16s(n), out = bf16s(n, false);
  const double sec = time_iterations(state, nullptr, [&] {
    cuda::relu_forward(out.as<bf16>(), x.as<bf16>(), n, nullptr);
  });
  state.SetLabel(s.label());
  report_bytes(state, kH * 2.0 * n, sec);
}
CNX_RESNET_BENCH(BM_relu_forward_bf16);

void BM_relu_backward(benchmark::State& state) {
  const StageShape& s = shape(state);
  const int64_t n = s.numel();
  DeviceBuffer y = floats(n), dy = floats(n), din = floats(n, false);
  const double sec = time_iterations(state, nullptr, [&] {
    cuda::relu_backward(din.as(), dy.as(), y.as(), n, nullptr);
  });
  state.SetLabel(s.label());
  report_bytes(state, kF * 3.0 * n, sec);
}
CNX_RESNET_BENCH(BM_relu_backward);

void BM_relu_backward_plain(benchmark::State& state) {
  const StageShape& s = shape(state);
  const int64_t n = s.numel();
  DeviceBuffer y = floats(n), dy = floats(n), din = floats(n, false);
  const double sec = time_iterations(state, nullptr, [&] {
    cuda::launch<plain_relu_backward>(plain_grid(n), kPlainThreads, 0, nullptr, din.as(), dy.as(),
                                      y.as(), n);
    CNX_CUDA_LAUNCH_CHECK();
  });
  state.SetLabel(s.label());
  report_bytes(state, kF * 3.0 * n, sec);
}
CNX_RESNET_BENCH(BM_relu_backward_plain);

void BM_relu_backward_bf16(benchmark::State& state) {
  const StageShape& s = shape(state);
  const int64_t n = s.numel();
  DeviceBuffer y = bf16s(n), dy = bf16s(n), din = bf16s(n, false);
  const double sec = time_iterations(state, nullptr, [&] {
    cuda::relu_backward(din.as<bf16>(), dy.as<bf16>(), y.as<bf16>(), n, nullptr);
  });
  state.SetLabel(s.label());
  report_bytes(state, kH * 3.0 * n, sec);
}
CNX_RESNET_BENCH(BM_relu_backward_bf16);

// =============================================================================================
// max pooling, ResNet's stem: 112x112x64 -> 56x56x64, k 3, s 2, p 1
// =============================================================================================

void BM_maxpool_forward(benchmark::State& state) {
  const StageShape& s = kStemPoolIn;
  DeviceBuffer x = floats(pool_in_numel()), out = floats(pool_out_numel(), false);
  DeviceBuffer argmax(pool_out_numel() * 4, false);
  const double sec = time_iterations(state, nullptr, [&] {
    cuda::maxpool2d_forward(out.as(), argmax.as<int32_t>(), x.as(), s.N, s.H, s.W, s.C, kPoolK,
                            kPoolStride, kPoolPad, nullptr);
  });
  state.SetLabel(pool_label());
  report_bytes(state, kF * (pool_in_numel() + 2.0 * pool_out_numel()), sec);
}
CNX_SINGLE_BENCH(BM_maxpool_forward);

void BM_maxpool_forward_plain(benchmark::State& state) {
  const StageShape& s = kStemPoolIn;
  const int64_t Ho = pooled(s.H), Wo = pooled(s.W);
  DeviceBuffer x = floats(pool_in_numel()), out = floats(pool_out_numel(), false);
  DeviceBuffer argmax(pool_out_numel() * 4, false);
  const double sec = time_iterations(state, nullptr, [&] {
    cuda::launch<plain_maxpool_forward>(plain_grid(pool_out_numel()), kPlainThreads, 0, nullptr,
                                        out.as(), argmax.as<int32_t>(), x.as(), s.N, s.H, s.W,
                                        s.C, Ho, Wo);
    CNX_CUDA_LAUNCH_CHECK();
  });
  state.SetLabel(pool_label());
  report_bytes(state, kF * (pool_in_numel() + 2.0 * pool_out_numel()), sec);
}
CNX_SINGLE_BENCH(BM_maxpool_forward_plain);

void BM_maxpool_forward_bf16(benchmark::State& state) {
  const StageShape& s = kStemPoolIn;
  DeviceBuffer x = bf16s(pool_in_numel()), out = bf16s(pool_out_numel(), false);
  DeviceBuffer argmax(pool_out_numel() * 4, false);
  const double sec = time_iterations(state, nullptr, [&] {
    cuda::maxpool2d_forward(out.as<bf16>(), argmax.as<int32_t>(), x.as<bf16>(), s.N, s.H, s.W,
                            s.C, kPoolK, kPoolStride, kPoolPad, nullptr);
  });
  state.SetLabel(pool_label());
  report_bytes(state, kH * (pool_in_numel() + pool_out_numel()) + kF * pool_out_numel(), sec);
}
CNX_SINGLE_BENCH(BM_maxpool_forward_bf16);

// The backward benchmarks read a real argmax: the library's forward runs once first (the plain
// backward gets the plain forward's flat indices).
void BM_maxpool_backward(benchmark::State& state) {
  const StageShape& s = kStemPoolIn;
  DeviceBuffer x = floats(pool_in_numel()), out = floats(pool_out_numel(), false);
  DeviceBuffer argmax(pool_out_numel() * 4, false), dy = floats(pool_out_numel());
  DeviceBuffer din = floats(pool_in_numel(), false);
  cuda::maxpool2d_forward(out.as(), argmax.as<int32_t>(), x.as(), s.N, s.H, s.W, s.C, kPoolK,
                          kPoolStride, kPoolPad, nullptr);
  const double sec = time_iterations(state, nullptr, [&] {
    cuda::maxpool2d_backward(din.as(), dy.as(), argmax.as<int32_t>(), s.N, s.H, s.W, s.C, kPoolK,
                             kPoolStride, kPoolPad, nullptr);
  });
  state.SetLabel(pool_label());
  report_bytes(state, kF * (pool_in_numel() + 2.0 * pool_out_numel()), sec);
}
CNX_SINGLE_BENCH(BM_maxpool_backward);

void BM_maxpool_backward_plain(benchmark::State& state) {
  const StageShape& s = kStemPoolIn;
  const int64_t Ho = pooled(s.H), Wo = pooled(s.W);
  DeviceBuffer x = floats(pool_in_numel()), out = floats(pool_out_numel(), false);
  DeviceBuffer argmax(pool_out_numel() * 4, false), dy = floats(pool_out_numel());
  DeviceBuffer din = floats(pool_in_numel(), false);
  cuda::launch<plain_maxpool_forward>(plain_grid(pool_out_numel()), kPlainThreads, 0, nullptr,
                                      out.as(), argmax.as<int32_t>(), x.as(), s.N, s.H, s.W, s.C,
                                      Ho, Wo);
  CNX_CUDA_LAUNCH_CHECK();
  const double sec = time_iterations(state, nullptr, [&] {
    CNX_CUDA_CHECK(cudaMemsetAsync(din.as(), 0, din.bytes(), nullptr));
    cuda::launch<plain_maxpool_backward>(plain_grid(pool_out_numel()), kPlainThreads, 0, nullptr,
                                         din.as(), dy.as(), argmax.as<int32_t>(), pool_out_numel());
    CNX_CUDA_LAUNCH_CHECK();
  });
  state.SetLabel(pool_label());
  report_bytes(state, kF * (pool_in_numel() + 2.0 * pool_out_numel()), sec);
}
CNX_SINGLE_BENCH(BM_maxpool_backward_plain);

void BM_maxpool_backward_bf16(benchmark::State& state) {
  const StageShape& s = kStemPoolIn;
  DeviceBuffer x = bf16s(pool_in_numel()), out = bf16s(pool_out_numel(), false);
  DeviceBuffer argmax(pool_out_numel() * 4, false), dy = bf16s(pool_out_numel());
  DeviceBuffer din = bf16s(pool_in_numel(), false);
  cuda::maxpool2d_forward(out.as<bf16>(), argmax.as<int32_t>(), x.as<bf16>(), s.N, s.H, s.W, s.C,
                          kPoolK, kPoolStride, kPoolPad, nullptr);
  const double sec = time_iterations(state, nullptr, [&] {
    cuda::maxpool2d_backward(din.as<bf16>(), dy.as<bf16>(), argmax.as<int32_t>(), s.N, s.H, s.W,
                             s.C, kPoolK, kPoolStride, kPoolPad, nullptr);
  });
  state.SetLabel(pool_label());
  report_bytes(state, kH * (pool_in_numel() + pool_out_numel()) + kF * pool_out_numel(), sec);
}
CNX_SINGLE_BENCH(BM_maxpool_backward_bf16);

}  // namespace
}  // namespace cnx::bench
