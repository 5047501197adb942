// Benchmarks of the LayerNorm, GELU, layer scale, drop path, add, mul, sum, global average
// pool, cross-entropy and AdamW kernels (kernels/cuda/*.cu), part of bench_cuda_kernels.
//
// One row per kernel and direction per ConvNeXt-T stage at batch 128, 224x224 (kStages:
// rows = N H W of the stage, C of the stage; GELU on the 4C hidden activation). Each row
// reports the event-timed mean, "GB/s" of the bytes that must move (every input read once,
// every output written once; workspace traffic is the kernel's own overhead and not counted)
// and "of_copy_bw", that over the device-to-device copy bandwidth (bench_common.h).
// Cross-entropy runs at N = 128, K = 1000; AdamW over ConvNeXt-T's 182 parameter tensors
// (28.59M parameters, the real shapes).
//
// Baselines: for LayerNorm and the elementwise kernels, a "plain" version written here: the
// simplest CUDA kernel, one thread per element (or per row for LayerNorm), scalar loads, and
// for the parameter gradients atomicAdd into the result (non-deterministic, as such a first
// version would be). Rows are named BM_<op>_<direction> and BM_<op>_<direction>_plain.
// Mixed precision: BM_<op>_<direction>_bf16 runs the same kernel on bf16 activations (fp32
// parameters and statistics), its bytes counted at 2 per bf16 value; compare its time with
// the f32 row of the same stage.
//
//   ./build/bench/bench_cuda_kernels --benchmark_filter='layernorm|gelu' --benchmark_format=json
#include <cuda_runtime.h>

#include <cstdint>
#include <vector>

#include "bench/cuda/bench_common.h"
#include "kernels/adamw.h"
#include "kernels/add.h"
#include "kernels/avgpool.h"
#include "kernels/cast.h"
#include "kernels/cross_entropy.h"
#include "kernels/cuda/launch.cuh"
#include "kernels/drop_path.h"
#include "kernels/gelu.h"
#include "kernels/layer_scale.h"
#include "kernels/layernorm.h"
#include "kernels/mul.h"
#include "kernels/sum.h"
#include "tensor/cuda_check.h"

namespace cnx::bench {
namespace {

constexpr int kPlainThreads = 256;
constexpr double kF = 4.0;  // bytes per float
constexpr double kH = 2.0;  // bytes per bf16

// n bf16 values on the device: uniform in [-1, 1) like floats(), rounded to bf16, or zeros.
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

const StageShape& stage(const benchmark::State& state) {
  const StageShape& s = kStages[state.range(0)];
  return s;
}

// =============================================================================================
// the plain baselines: one thread per element (per row for LayerNorm), scalar
// =============================================================================================

__global__ void plain_gelu_forward(float* out, const float* in, int64_t n) {
  const int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x;
  if (i < n) out[i] = 0.5f * in[i] * (1.0f + erff(in[i] * 0.70710678f));
}
__global__ void plain_gelu_backward(float* din, const float* dout, const float* in, int64_t n) {
  const int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x;
  if (i < n) {
    const float x = in[i];
    din[i] =
        dout[i] * (0.5f * (1.0f + erff(x * 0.70710678f)) + x * 0.39894228f * expf(-0.5f * x * x));
  }
}
__global__ void plain_add(float* out, const float* a, const float* b, int64_t n) {
  const int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x;
  if (i < n) out[i] = a[i] + b[i];
}
__global__ void plain_mul(float* out, const float* a, const float* b, int64_t n) {
  const int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x;
  if (i < n) out[i] = a[i] * b[i];
}
__global__ void plain_mul_backward(float* da, float* db, const float* dout, const float* a,
                                   const float* b, int64_t n) {
  const int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x;
  if (i < n) {
    da[i] = dout[i] * b[i];
    db[i] = dout[i] * a[i];
  }
}
__global__ void plain_layer_scale(float* out, const float* in, const float* gamma, int64_t n,
                                  int64_t C) {
  const int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x;
  if (i < n) out[i] = in[i] * gamma[i % C];
}
__global__ void plain_layer_scale_backward(float* din, float* dgamma, const float* dout,
                                           const float* in, const float* gamma, int64_t n,
                                           int64_t C) {
  const int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x;
  if (i < n) {
    din[i] = dout[i] * gamma[i % C];
    atomicAdd(dgamma + i % C, dout[i] * in[i]);
  }
}
__global__ void plain_drop_path(float* out, const float* in, const float* scale, int64_t n,
                                int64_t per_sample) {
  const int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x;
  if (i < n) out[i] = in[i] * scale[i / per_sample];
}
// LayerNorm, one thread per row, three passes over the row in global memory.
__global__ void plain_layernorm_forward(float* out, float* mean, float* rstd, const float* in,
                                        const float* w, const float* b, int64_t rows, int64_t C,
                                        float eps) {
  const int64_t r = blockIdx.x * int64_t(blockDim.x) + threadIdx.x;
  if (r >= rows) return;
  const float* x = in + r * C;
  float mu = 0;
  for (int64_t c = 0; c < C; ++c) mu += x[c];
  mu /= C;
  float var = 0;
  for (int64_t c = 0; c < C; ++c) var += (x[c] - mu) * (x[c] - mu);
  const float rs = 1.0f / sqrtf(var / C + eps);
  for (int64_t c = 0; c < C; ++c) out[r * C + c] = (x[c] - mu) * rs * w[c] + b[c];
  mean[r] = mu;
  rstd[r] = rs;
}
// LayerNorm backward, one thread per row; dweight and dbias by atomicAdd (zeroed before).
__global__ void plain_layernorm_backward(float* din, float* dw, float* db, const float* dout,
                                         const float* in, const float* w, const float* mean,
                                         const float* rstd, int64_t rows, int64_t C) {
  const int64_t r = blockIdx.x * int64_t(blockDim.x) + threadIdx.x;
  if (r >= rows) return;
  const float* x = in + r * C;
  const float* dy = dout + r * C;
  const float mu = mean[r], rs = rstd[r];
  float mg = 0, mgx = 0;
  for (int64_t c = 0; c < C; ++c) {
    const float g = dy[c] * w[c];
    mg += g;
    mgx += g * (x[c] - mu) * rs;
  }
  mg /= C;
  mgx /= C;
  for (int64_t c = 0; c < C; ++c) {
    const float xh = (x[c] - mu) * rs;
    din[r * C + c] = rs * (dy[c] * w[c] - mg - xh * mgx);
    atomicAdd(dw + c, dy[c] * xh);
    atomicAdd(db + c, dy[c]);
  }
}

// =============================================================================================
// LayerNorm: rows = N H W, C of the stage
// =============================================================================================

void BM_layernorm_forward(benchmark::State& state) {
  const StageShape& s = stage(state);
  DeviceBuffer x = floats(s.numel()), w = floats(s.C), b = floats(s.C),
               out = floats(s.numel(), false), mean = floats(s.pixels(), false),
               rstd = floats(s.pixels(), false);
  const double sec = time_iterations(state, nullptr, [&] {
    cuda::layernorm_forward(out.as(), mean.as(), rstd.as(), x.as(), w.as(), b.as(), s.pixels(), s.C,
                            1e-6, nullptr);
  });
  state.SetLabel(s.label());
  report_bytes(state, kF * (2.0 * s.numel() + 2.0 * s.pixels() + 2.0 * s.C), sec);
}
CNX_CUDA_BENCH_STAGES(BM_layernorm_forward);

void BM_layernorm_forward_plain(benchmark::State& state) {
  const StageShape& s = stage(state);
  DeviceBuffer x = floats(s.numel()), w = floats(s.C), b = floats(s.C),
               out = floats(s.numel(), false), mean = floats(s.pixels(), false),
               rstd = floats(s.pixels(), false);
  const double sec = time_iterations(state, nullptr, [&] {
    cuda::launch<plain_layernorm_forward>(plain_grid(s.pixels()), kPlainThreads, 0, nullptr,
                                          out.as(), mean.as(), rstd.as(), x.as(), w.as(), b.as(),
                                          s.pixels(), s.C, 1e-6f);
    CNX_CUDA_LAUNCH_CHECK();
  });
  state.SetLabel(s.label());
  report_bytes(state, kF * (2.0 * s.numel() + 2.0 * s.pixels() + 2.0 * s.C), sec);
}
CNX_CUDA_BENCH_STAGES(BM_layernorm_forward_plain);

// bf16 x and out; fp32 weight, bias, mean, rstd.
void BM_layernorm_forward_bf16(benchmark::State& state) {
  const StageShape& s = stage(state);
  DeviceBuffer x = bf16s(s.numel()), w = floats(s.C), b = floats(s.C),
               out = bf16s(s.numel(), false), mean = floats(s.pixels(), false),
               rstd = floats(s.pixels(), false);
  const double sec = time_iterations(state, nullptr, [&] {
    cuda::layernorm_forward(out.as<bf16>(), mean.as(), rstd.as(), x.as<bf16>(), w.as(), b.as(),
                            s.pixels(), s.C, 1e-6, nullptr);
  });
  state.SetLabel(s.label());
  report_bytes(state, kH * 2.0 * s.numel() + kF * (2.0 * s.pixels() + 2.0 * s.C), sec);
}
CNX_CUDA_BENCH_STAGES(BM_layernorm_forward_bf16);

// Backward, all three gradients: dout, in read; din written; mean, rstd, weight read;
// dweight, dbias written.
double layernorm_backward_bytes(const StageShape& s) {
  return kF * (3.0 * s.numel() + 2.0 * s.pixels() + 3.0 * s.C);
}

void BM_layernorm_backward(benchmark::State& state) {
  const StageShape& s = stage(state);
  DeviceBuffer x = floats(s.numel()), dy = floats(s.numel()), w = floats(s.C),
               mean = floats(s.pixels()), rstd = floats(s.pixels()), din = floats(s.numel(), false),
               dw = floats(s.C, false), db = floats(s.C, false),
               ws = floats(cuda::layernorm_backward_workspace_floats(s.pixels(), s.C), false);
  const double sec = time_iterations(state, nullptr, [&] {
    cuda::layernorm_backward(din.as(), dw.as(), db.as(), dy.as(), x.as(), w.as(), mean.as(),
                             rstd.as(), s.pixels(), s.C, ws.as(), nullptr);
  });
  state.SetLabel(s.label());
  report_bytes(state, layernorm_backward_bytes(s), sec);
}
CNX_CUDA_BENCH_STAGES(BM_layernorm_backward);

void BM_layernorm_backward_plain(benchmark::State& state) {
  const StageShape& s = stage(state);
  DeviceBuffer x = floats(s.numel()), dy = floats(s.numel()), w = floats(s.C),
               mean = floats(s.pixels()), rstd = floats(s.pixels()), din = floats(s.numel(), false),
               dw = floats(s.C, false), db = floats(s.C, false);
  const double sec = time_iterations(state, nullptr, [&] {
    CNX_CUDA_CHECK(cudaMemsetAsync(dw.as(), 0, s.C * sizeof(float)));
    CNX_CUDA_CHECK(cudaMemsetAsync(db.as(), 0, s.C * sizeof(float)));
    cuda::launch<plain_layernorm_backward>(plain_grid(s.pixels()), kPlainThreads, 0, nullptr,
                                           din.as(), dw.as(), db.as(), dy.as(), x.as(), w.as(),
                                           mean.as(), rstd.as(), s.pixels(), s.C);
    CNX_CUDA_LAUNCH_CHECK();
  });
  state.SetLabel(s.label());
  report_bytes(state, layernorm_backward_bytes(s), sec);
}
CNX_CUDA_BENCH_STAGES(BM_layernorm_backward_plain);

// bf16 dout, in and din; fp32 weight, mean, rstd, dweight, dbias.
void BM_layernorm_backward_bf16(benchmark::State& state) {
  const StageShape& s = stage(state);
  DeviceBuffer x = bf16s(s.numel()), dy = bf16s(s.numel()), w = floats(s.C),
               mean = floats(s.pixels()), rstd = floats(s.pixels()), din = bf16s(s.numel(), false),
               dw = floats(s.C, false), db = floats(s.C, false),
               ws = floats(cuda::layernorm_backward_workspace_floats(s.pixels(), s.C), false);
  const double sec = time_iterations(state, nullptr, [&] {
    cuda::layernorm_backward(din.as<bf16>(), dw.as(), db.as(), dy.as<bf16>(), x.as<bf16>(),
                             w.as(), mean.as(), rstd.as(), s.pixels(), s.C, ws.as(), nullptr);
  });
  state.SetLabel(s.label());
  report_bytes(state, kH * 3.0 * s.numel() + kF * (2.0 * s.pixels() + 3.0 * s.C), sec);
}
CNX_CUDA_BENCH_STAGES(BM_layernorm_backward_bf16);

// =============================================================================================
// GELU on the 4C hidden activation: n = N H W 4C
// =============================================================================================

int64_t hidden(const StageShape& s) { return 4 * s.numel(); }

void BM_gelu_forward(benchmark::State& state) {
  const StageShape& s = stage(state);
  const int64_t n = hidden(s);
  DeviceBuffer x = floats(n), out = floats(n, false);
  const double sec =
      time_iterations(state, nullptr, [&] { cuda::gelu_forward(out.as(), x.as(), n, nullptr); });
  state.SetLabel(s.label() + " x4");
  report_bytes(state, kF * 2.0 * n, sec);
}
CNX_CUDA_BENCH_STAGES(BM_gelu_forward);

void BM_gelu_forward_plain(benchmark::State& state) {
  const StageShape& s = stage(state);
  const int64_t n = hidden(s);
  DeviceBuffer x = floats(n), out = floats(n, false);
  const double sec = time_iterations(state, nullptr, [&] {
    cuda::launch<plain_gelu_forward>(plain_grid(n), kPlainThreads, 0, nullptr, out.as(), x.as(), n);
    CNX_CUDA_LAUNCH_CHECK();
  });
  state.SetLabel(s.label() + " x4");
  report_bytes(state, kF * 2.0 * n, sec);
}
CNX_CUDA_BENCH_STAGES(BM_gelu_forward_plain);

void BM_gelu_backward(benchmark::State& state) {
  const StageShape& s = stage(state);
  const int64_t n = hidden(s);
  DeviceBuffer x = floats(n), dy = floats(n), din = floats(n, false);
  const double sec = time_iterations(state, nullptr, [&] {
    cuda::gelu_backward(din.as(), dy.as(), x.as(), n, nullptr);
  });
  state.SetLabel(s.label() + " x4");
  report_bytes(state, kF * 3.0 * n, sec);
}
CNX_CUDA_BENCH_STAGES(BM_gelu_backward);

void BM_gelu_backward_plain(benchmark::State& state) {
  const StageShape& s = stage(state);
  const int64_t n = hidden(s);
  DeviceBuffer x = floats(n), dy = floats(n), din = floats(n, false);
  const double sec = time_iterations(state, nullptr, [&] {
    cuda::launch<plain_gelu_backward>(plain_grid(n), kPlainThreads, 0, nullptr, din.as(), dy.as(),
                                      x.as(), n);
    CNX_CUDA_LAUNCH_CHECK();
  });
  state.SetLabel(s.label() + " x4");
  report_bytes(state, kF * 3.0 * n, sec);
}
CNX_CUDA_BENCH_STAGES(BM_gelu_backward_plain);

// =============================================================================================
// layer scale (rows = N H W, C), drop path (N, H W C)
// =============================================================================================

void BM_layer_scale_forward(benchmark::State& state) {
  const StageShape& s = stage(state);
  DeviceBuffer x = floats(s.numel()), gamma = floats(s.C), out = floats(s.numel(), false);
  const double sec = time_iterations(state, nullptr, [&] {
    cuda::layer_scale_forward(out.as(), x.as(), gamma.as(), s.pixels(), s.C, nullptr);
  });
  state.SetLabel(s.label());
  report_bytes(state, kF * (2.0 * s.numel() + s.C), sec);
}
CNX_CUDA_BENCH_STAGES(BM_layer_scale_forward);

void BM_layer_scale_forward_plain(benchmark::State& state) {
  const StageShape& s = stage(state);
  DeviceBuffer x = floats(s.numel()), gamma = floats(s.C), out = floats(s.numel(), false);
  const double sec = time_iterations(state, nullptr, [&] {
    cuda::launch<plain_layer_scale>(plain_grid(s.numel()), kPlainThreads, 0, nullptr, out.as(),
                                    x.as(), gamma.as(), s.numel(), s.C);
    CNX_CUDA_LAUNCH_CHECK();
  });
  state.SetLabel(s.label());
  report_bytes(state, kF * (2.0 * s.numel() + s.C), sec);
}
CNX_CUDA_BENCH_STAGES(BM_layer_scale_forward_plain);

// Backward with din and dgamma: dout, in read, din written, gamma read, dgamma written.
void BM_layer_scale_backward(benchmark::State& state) {
  const StageShape& s = stage(state);
  DeviceBuffer x = floats(s.numel()), dy = floats(s.numel()), gamma = floats(s.C),
               din = floats(s.numel(), false), dgamma = floats(s.C, false),
               ws = floats(cuda::layer_scale_backward_workspace_floats(s.pixels(), s.C), false);
  const double sec = time_iterations(state, nullptr, [&] {
    cuda::layer_scale_backward(din.as(), dgamma.as(), dy.as(), x.as(), gamma.as(), s.pixels(), s.C,
                               ws.as(), nullptr);
  });
  state.SetLabel(s.label());
  report_bytes(state, kF * (3.0 * s.numel() + 2.0 * s.C), sec);
}
CNX_CUDA_BENCH_STAGES(BM_layer_scale_backward);

void BM_layer_scale_backward_plain(benchmark::State& state) {
  const StageShape& s = stage(state);
  DeviceBuffer x = floats(s.numel()), dy = floats(s.numel()), gamma = floats(s.C),
               din = floats(s.numel(), false), dgamma = floats(s.C, false);
  const double sec = time_iterations(state, nullptr, [&] {
    CNX_CUDA_CHECK(cudaMemsetAsync(dgamma.as(), 0, s.C * sizeof(float)));
    cuda::launch<plain_layer_scale_backward>(plain_grid(s.numel()), kPlainThreads, 0, nullptr,
                                             din.as(), dgamma.as(), dy.as(), x.as(), gamma.as(),
                                             s.numel(), s.C);
    CNX_CUDA_LAUNCH_CHECK();
  });
  state.SetLabel(s.label());
  report_bytes(state, kF * (3.0 * s.numel() + 2.0 * s.C), sec);
}
CNX_CUDA_BENCH_STAGES(BM_layer_scale_backward_plain);

// Forward and backward are the same kernel (out = in * scale[n]); one row each for the table.
void BM_drop_path_forward(benchmark::State& state) {
  const StageShape& s = stage(state);
  const int64_t per_sample = s.H * s.W * s.C;
  DeviceBuffer x = floats(s.numel()), scale = floats(s.N), out = floats(s.numel(), false);
  const double sec = time_iterations(state, nullptr, [&] {
    cuda::drop_path_forward(out.as(), x.as(), scale.as(), s.N, per_sample, nullptr);
  });
  state.SetLabel(s.label());
  report_bytes(state, kF * (2.0 * s.numel() + s.N), sec);
}
CNX_CUDA_BENCH_STAGES(BM_drop_path_forward);

void BM_drop_path_backward(benchmark::State& state) {
  const StageShape& s = stage(state);
  const int64_t per_sample = s.H * s.W * s.C;
  DeviceBuffer dy = floats(s.numel()), scale = floats(s.N), din = floats(s.numel(), false);
  const double sec = time_iterations(state, nullptr, [&] {
    cuda::drop_path_backward(din.as(), dy.as(), scale.as(), s.N, per_sample, nullptr);
  });
  state.SetLabel(s.label());
  report_bytes(state, kF * (2.0 * s.numel() + s.N), sec);
}
CNX_CUDA_BENCH_STAGES(BM_drop_path_backward);

void BM_drop_path_forward_plain(benchmark::State& state) {
  const StageShape& s = stage(state);
  const int64_t per_sample = s.H * s.W * s.C;
  DeviceBuffer x = floats(s.numel()), scale = floats(s.N), out = floats(s.numel(), false);
  const double sec = time_iterations(state, nullptr, [&] {
    cuda::launch<plain_drop_path>(plain_grid(s.numel()), kPlainThreads, 0, nullptr, out.as(),
                                  x.as(), scale.as(), s.numel(), per_sample);
    CNX_CUDA_LAUNCH_CHECK();
  });
  state.SetLabel(s.label());
  report_bytes(state, kF * (2.0 * s.numel() + s.N), sec);
}
CNX_CUDA_BENCH_STAGES(BM_drop_path_forward_plain);

// =============================================================================================
// add (the residual), add_inplace (gradient accumulation), mul
// =============================================================================================

void BM_add_forward(benchmark::State& state) {
  const StageShape& s = stage(state);
  DeviceBuffer a = floats(s.numel()), b = floats(s.numel()), out = floats(s.numel(), false);
  const double sec = time_iterations(state, nullptr, [&] {
    cuda::add_forward(out.as(), a.as(), b.as(), s.numel(), nullptr);
  });
  state.SetLabel(s.label());
  report_bytes(state, kF * 3.0 * s.numel(), sec);
}
CNX_CUDA_BENCH_STAGES(BM_add_forward);

void BM_add_forward_plain(benchmark::State& state) {
  const StageShape& s = stage(state);
  DeviceBuffer a = floats(s.numel()), b = floats(s.numel()), out = floats(s.numel(), false);
  const double sec = time_iterations(state, nullptr, [&] {
    cuda::launch<plain_add>(plain_grid(s.numel()), kPlainThreads, 0, nullptr, out.as(), a.as(),
                            b.as(), s.numel());
    CNX_CUDA_LAUNCH_CHECK();
  });
  state.SetLabel(s.label());
  report_bytes(state, kF * 3.0 * s.numel(), sec);
}
CNX_CUDA_BENCH_STAGES(BM_add_forward_plain);

void BM_add_inplace(benchmark::State& state) {
  const StageShape& s = stage(state);
  DeviceBuffer dst = floats(s.numel(), false), src = floats(s.numel());
  const double sec = time_iterations(state, nullptr, [&] {
    cuda::add_inplace(dst.as(), src.as(), s.numel(), nullptr);
  });
  state.SetLabel(s.label());
  report_bytes(state, kF * 3.0 * s.numel(), sec);  // dst read and written, src read
}
CNX_CUDA_BENCH_STAGES(BM_add_inplace);

void BM_add_inplace_plain(benchmark::State& state) {
  const StageShape& s = stage(state);
  DeviceBuffer dst = floats(s.numel(), false), src = floats(s.numel());
  const double sec = time_iterations(state, nullptr, [&] {
    cuda::launch<plain_add>(plain_grid(s.numel()), kPlainThreads, 0, nullptr, dst.as(), dst.as(),
                            src.as(), s.numel());
    CNX_CUDA_LAUNCH_CHECK();
  });
  state.SetLabel(s.label());
  report_bytes(state, kF * 3.0 * s.numel(), sec);
}
CNX_CUDA_BENCH_STAGES(BM_add_inplace_plain);

void BM_mul_forward(benchmark::State& state) {
  const StageShape& s = stage(state);
  DeviceBuffer a = floats(s.numel()), b = floats(s.numel()), out = floats(s.numel(), false);
  const double sec = time_iterations(state, nullptr, [&] {
    cuda::mul_forward(out.as(), a.as(), b.as(), s.numel(), nullptr);
  });
  state.SetLabel(s.label());
  report_bytes(state, kF * 3.0 * s.numel(), sec);
}
CNX_CUDA_BENCH_STAGES(BM_mul_forward);

void BM_mul_forward_plain(benchmark::State& state) {
  const StageShape& s = stage(state);
  DeviceBuffer a = floats(s.numel()), b = floats(s.numel()), out = floats(s.numel(), false);
  const double sec = time_iterations(state, nullptr, [&] {
    cuda::launch<plain_mul>(plain_grid(s.numel()), kPlainThreads, 0, nullptr, out.as(), a.as(),
                            b.as(), s.numel());
    CNX_CUDA_LAUNCH_CHECK();
  });
  state.SetLabel(s.label());
  report_bytes(state, kF * 3.0 * s.numel(), sec);
}
CNX_CUDA_BENCH_STAGES(BM_mul_forward_plain);

// Both gradients: dout, a, b read; da, db written.
void BM_mul_backward(benchmark::State& state) {
  const StageShape& s = stage(state);
  DeviceBuffer a = floats(s.numel()), b = floats(s.numel()), dy = floats(s.numel()),
               da = floats(s.numel(), false), db = floats(s.numel(), false);
  const double sec = time_iterations(state, nullptr, [&] {
    cuda::mul_backward(da.as(), db.as(), dy.as(), a.as(), b.as(), s.numel(), nullptr);
  });
  state.SetLabel(s.label());
  report_bytes(state, kF * 5.0 * s.numel(), sec);
}
CNX_CUDA_BENCH_STAGES(BM_mul_backward);

void BM_mul_backward_plain(benchmark::State& state) {
  const StageShape& s = stage(state);
  DeviceBuffer a = floats(s.numel()), b = floats(s.numel()), dy = floats(s.numel()),
               da = floats(s.numel(), false), db = floats(s.numel(), false);
  const double sec = time_iterations(state, nullptr, [&] {
    cuda::launch<plain_mul_backward>(plain_grid(s.numel()), kPlainThreads, 0, nullptr, da.as(),
                                     db.as(), dy.as(), a.as(), b.as(), s.numel());
    CNX_CUDA_LAUNCH_CHECK();
  });
  state.SetLabel(s.label());
  report_bytes(state, kF * 5.0 * s.numel(), sec);
}
CNX_CUDA_BENCH_STAGES(BM_mul_backward_plain);

// =============================================================================================
// sum (of a stage activation), global average pool (of a stage activation)
// =============================================================================================

void BM_sum_forward(benchmark::State& state) {
  const StageShape& s = stage(state);
  DeviceBuffer x = floats(s.numel()), out = floats(1, false),
               ws = floats(cuda::sum_forward_workspace_floats(s.numel()), false);
  const double sec = time_iterations(state, nullptr, [&] {
    cuda::sum_forward(out.as(), x.as(), s.numel(), ws.as(), nullptr);
  });
  state.SetLabel(s.label());
  report_bytes(state, kF * (s.numel() + 1.0), sec);
}
CNX_CUDA_BENCH_STAGES(BM_sum_forward);

void BM_sum_backward(benchmark::State& state) {
  const StageShape& s = stage(state);
  DeviceBuffer dy = floats(1), din = floats(s.numel(), false);
  const double sec = time_iterations(state, nullptr, [&] {
    cuda::sum_backward(din.as(), dy.as(), s.numel(), nullptr);
  });
  state.SetLabel(s.label());
  report_bytes(state, kF * (s.numel() + 1.0), sec);
}
CNX_CUDA_BENCH_STAGES(BM_sum_backward);

void BM_global_avgpool_forward(benchmark::State& state) {
  const StageShape& s = stage(state);
  DeviceBuffer x = floats(s.numel()), out = floats(s.N * s.C, false);
  const double sec = time_iterations(state, nullptr, [&] {
    cuda::global_avgpool_forward(out.as(), x.as(), s.N, s.H, s.W, s.C, nullptr);
  });
  state.SetLabel(s.label());
  report_bytes(state, kF * (s.numel() + double(s.N) * s.C), sec);
}
CNX_CUDA_BENCH_STAGES(BM_global_avgpool_forward);

void BM_global_avgpool_backward(benchmark::State& state) {
  const StageShape& s = stage(state);
  DeviceBuffer dy = floats(s.N * s.C), din = floats(s.numel(), false);
  const double sec = time_iterations(state, nullptr, [&] {
    cuda::global_avgpool_backward(din.as(), dy.as(), s.N, s.H, s.W, s.C, nullptr);
  });
  state.SetLabel(s.label());
  report_bytes(state, kF * (s.numel() + double(s.N) * s.C), sec);
}
CNX_CUDA_BENCH_STAGES(BM_global_avgpool_backward);

// =============================================================================================
// cross-entropy: N = 128, K = 1000, hard labels with smoothing 0.1
// =============================================================================================

constexpr int64_t kCeN = 128, kCeK = 1000;

__global__ void fill_labels(int64_t* labels, int64_t N, int64_t K) {
  const int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x;
  if (i < N) labels[i] = (i * 7919) % K;
}

void BM_cross_entropy_forward(benchmark::State& state) {
  DeviceBuffer logits = floats(kCeN * kCeK), probs = floats(kCeN * kCeK, false),
               loss = floats(1, false), labels(kCeN * int64_t(sizeof(int64_t)), false),
               ws = floats(cuda::cross_entropy_forward_workspace_floats(kCeN, kCeK), false);
  cuda::launch<fill_labels>(1, 128, 0, nullptr, labels.as<int64_t>(), kCeN, kCeK);
  CNX_CUDA_LAUNCH_CHECK();
  const double sec = time_iterations(state, nullptr, [&] {
    cuda::cross_entropy_forward(loss.as(), probs.as(), logits.as(), labels.as<int64_t>(), nullptr,
                                kCeN, kCeK, 0.1, ws.as(), nullptr);
  });
  state.SetLabel("N128 K1000");
  report_bytes(state, kF * 2.0 * kCeN * kCeK + 8.0 * kCeN, sec);  // logits read, probs written
}
BENCHMARK(BM_cross_entropy_forward)->UseManualTime()->Unit(benchmark::kMicrosecond);

void BM_cross_entropy_backward(benchmark::State& state) {
  DeviceBuffer probs = floats(kCeN * kCeK), dlogits = floats(kCeN * kCeK, false), dloss = floats(1),
               labels(kCeN * int64_t(sizeof(int64_t)), false);
  cuda::launch<fill_labels>(1, 128, 0, nullptr, labels.as<int64_t>(), kCeN, kCeK);
  CNX_CUDA_LAUNCH_CHECK();
  const double sec = time_iterations(state, nullptr, [&] {
    cuda::cross_entropy_backward(dlogits.as(), dloss.as(), probs.as(), labels.as<int64_t>(),
                                 nullptr, kCeN, kCeK, 0.1, nullptr);
  });
  state.SetLabel("N128 K1000");
  report_bytes(state, kF * 2.0 * kCeN * kCeK + 8.0 * kCeN, sec);  // probs read, dlogits written
}
BENCHMARK(BM_cross_entropy_backward)->UseManualTime()->Unit(benchmark::kMicrosecond);

// =============================================================================================
// AdamW over ConvNeXt-T's parameters: 182 tensors, 28,589,128 floats
// =============================================================================================

// The element counts of ConvNeXt-T's parameters in the official order: the stem (conv 4x4 and
// bias, LayerNorm), per stage the downsample (LayerNorm, conv 2x2 and bias) and the blocks
// (dwconv 7x7 and bias, LayerNorm, pwconv1 and bias, pwconv2 and bias, gamma), the final
// LayerNorm and the head.
std::vector<int64_t> convnext_tiny_sizes() {
  const int64_t depths[] = {3, 3, 9, 3}, dims[] = {96, 192, 384, 768};
  std::vector<int64_t> v = {96 * 3 * 4 * 4, 96, 96, 96};
  for (int s = 0; s < 4; ++s) {
    const int64_t C = dims[s];
    if (s > 0) {
      const int64_t Cp = dims[s - 1];
      v.insert(v.end(), {Cp, Cp, C * Cp * 2 * 2, C});
    }
    for (int64_t b = 0; b < depths[s]; ++b)
      v.insert(v.end(), {C * 49, C, C, C, 4 * C * C, 4 * C, C * 4 * C, C, C});
  }
  v.insert(v.end(), {768, 768, 1000 * 768, 1000});
  return v;
}

void BM_adamw_step(benchmark::State& state) {
  const std::vector<int64_t> sizes = convnext_tiny_sizes();
  int64_t total = 0;
  for (int64_t n : sizes) total += n;
  // One buffer per role, each tensor at a 16-byte aligned offset (as from the caching allocator).
  std::vector<int64_t> offset;
  int64_t padded = 0;
  for (int64_t n : sizes) {
    offset.push_back(padded);
    padded += (n + 3) / 4 * 4;
  }
  DeviceBuffer p = floats(padded), g = floats(padded), m = floats(padded, false),
               v = floats(padded, false);
  std::vector<cuda::AdamWSlot> slots;
  for (size_t i = 0; i < sizes.size(); ++i)
    slots.push_back({p.as() + offset[i], g.as() + offset[i], m.as() + offset[i], v.as() + offset[i],
                     sizes[i], -1e-3f, 0.03f, i % 2 ? 1.0f : 0.99995f});
  const cuda::AdamWScalars scalars{0.9f, 0.1f, 0.999f, 0.001f, 1e-8f};
  const double sec = time_iterations(state, nullptr, [&] {
    cuda::adamw_step(slots.data(), static_cast<int64_t>(slots.size()), scalars, nullptr);
  });
  state.SetLabel(std::to_string(sizes.size()) + " tensors, " + std::to_string(total) + " params");
  report_bytes(state, kF * 7.0 * total, sec);  // p, g, m, v read; p, m, v written
}
BENCHMARK(BM_adamw_step)->UseManualTime()->Unit(benchmark::kMicrosecond);

}  // namespace
}  // namespace cnx::bench
