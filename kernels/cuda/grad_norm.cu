// CUDA gradient norm, clip decision and clip scaling, multi-tensor (see kernels/grad_norm.h for
// the math and the contract).
//
// Launch layout: kernels/cuda/multi_tensor.cuh (up to 128 slots per launch, ~3 KB of kernel
// parameters, under the classic 4 KB limit). ConvNeXt-T's 182 gradients take 2 launches of each
// kernel.
//
// The norm takes three steps, none of which reads anything back to the host:
//   1. grad_sumsq_kernel: block b sums the squares of its chunk (kGradNormChunk elements) in
//      double, each thread its strided elements in order, then the block's fixed butterfly
//      (detail::block_reduce), and writes one partial: partials[partial_base + b]. Partials are
//      numbered across launches in slot order, so their layout depends only on the sizes.
//   2. grad_norm_finish_kernel, one block of 1024 threads: thread t adds partials t, t + 1024,
//      t + 2048, ... in order (ConvNeXt-T has ~1900 partials: two or three each, rather than one
//      thread walking all of them), the block's butterfly adds the 1024 sums, and thread 0
//      computes norm, skip and coef from the total and writes the status.
//   3. grad_scale_kernel (only when asked): g *= status[1], every block first reading the status
//      and returning at once when there is nothing to do (skipped, or coef 1).
// No atomics anywhere: every addition happens in an order fixed by the sizes alone, so the
// result is bitwise the same on every run and under any block or thread schedule.
#include <cuda_runtime.h>

#include <algorithm>
#include <cfloat>
#include <cmath>

#include "kernels/cuda/launch.cuh"
#include "kernels/cuda/multi_tensor.cuh"
#include "kernels/cuda/reduce.cuh"
#include "kernels/cuda/vec.cuh"
#include "kernels/grad_norm.h"
#include "tensor/cuda_check.h"

namespace cnx::cuda {

namespace {

constexpr int kThreads = 256;
constexpr int kFinishThreads = 1024;
constexpr int kSlotsPerLaunch = 128;
constexpr int64_t kScaleChunk = 4096;  // elements per block of the scale: 256 x 16

struct GradTable {  // a multi_tensor.cuh table
  GradSlot slot[kSlotsPerLaunch];
  int64_t block_start[kSlotsPerLaunch + 1];  // block_start[count] = blocks of the launch
  int64_t partial_base;                      // the sum of squares: first partial of the launch
  int count;
};
static_assert(sizeof(GradTable) <= 4096, "kernel parameters must stay under 4 KB");

// isfinite for an f32, spelled so that both builds compile it (the emulator's host headers keep
// isfinite in std::): false for +-inf, and for NaN, which fails every comparison.
__device__ __forceinline__ bool finite(float x) { return fabsf(x) <= FLT_MAX; }

__device__ __forceinline__ double add_square(double acc, float x) {
  const double d = x;
  return __dadd_rn(acc, __dmul_rn(d, d));  // d * d is exact in double (24-bit mantissas)
}

// ---- 1. the partial sums of squares ------------------------------------------------------------

__global__ void __launch_bounds__(kThreads)
    grad_sumsq_kernel(double* partials, const __grid_constant__ GradTable table) {
  __shared__ double scratch[32];
  const int64_t blocks = table.block_start[table.count];
  for (int64_t b = blockIdx.x; b < blocks; b += gridDim.x) {  // uniform over the block
    const int s = detail::slot_of_block(table, b);
    const float* const g = table.slot[s].grad;
    const auto [begin, end] = detail::chunk_of_block(table, s, b, kGradNormChunk);
    double acc = 0;
    int64_t i = begin + threadIdx.x;  // first scalar element of this thread
    if ((reinterpret_cast<uintptr_t>(g) & 15u) == 0) {  // begin is a multiple of 4: aligned
      const int64_t end4 = begin + (end - begin) / 4 * 4;
      for (int64_t j = begin + 4 * threadIdx.x; j < end4; j += 4 * kThreads) {
        const float4 v = detail::load4(g + j);
        acc = add_square(add_square(add_square(add_square(acc, v.x), v.y), v.z), v.w);
      }
      i = end4 + threadIdx.x;
    }
    for (; i < end; i += kThreads) acc = add_square(acc, g[i]);
    const double total = detail::block_reduce(acc, detail::SumOp{}, 0.0, scratch);
    if (threadIdx.x == 0) partials[table.partial_base + b] = total;
  }
}

// ---- 2. the total, norm, skip and coefficient ----------------------------------------------------

__global__ void __launch_bounds__(kFinishThreads)
    grad_norm_finish_kernel(float* status, double* sum_squares, const double* partials,
                            int64_t count, int clip, float max_norm, const float* loss) {
  __shared__ double scratch[32];
  double acc = 0;
  for (int64_t i = threadIdx.x; i < count; i += kFinishThreads) acc = __dadd_rn(acc, partials[i]);
  const double total = detail::block_reduce(acc, detail::SumOp{}, 0.0, scratch);
  if (threadIdx.x != 0) return;
  // The host's formulas (train/optim/adamw.cpp, clip_grad_norm_status on the CPU), operation for
  // operation: sqrt in double (IEEE, correctly rounded on both), then f32 as PyTorch's norm.
  const float norm = static_cast<float>(sqrt(total));
  const float loss_value = loss != nullptr ? *loss : NAN;
  const bool skip = !(finite(norm) && (loss == nullptr || finite(loss_value)));
  float coef = 1.0f;
  if (clip && !skip) {
    const float c = __fdiv_rn(max_norm, __fadd_rn(norm, 1e-6f));
    if (c < 1.0f) coef = c;
  }
  status[0] = norm;
  status[1] = coef;
  status[2] = skip ? 1.0f : 0.0f;
  status[3] = loss_value;
  if (sum_squares != nullptr) *sum_squares = total;
}

// ---- 3. the scaling --------------------------------------------------------------------------------

__global__ void __launch_bounds__(kThreads)
    grad_scale_kernel(const float* status, const __grid_constant__ GradTable table) {
  const float coef = status[1];
  if (status[2] != 0.0f || coef == 1.0f) return;  // skipped or not clipped: the whole grid leaves
  const int64_t blocks = table.block_start[table.count];
  for (int64_t b = blockIdx.x; b < blocks; b += gridDim.x) {
    const int s = detail::slot_of_block(table, b);
    float* const g = table.slot[s].grad;
    const auto [begin, end] = detail::chunk_of_block(table, s, b, kScaleChunk);
    int64_t i = begin + threadIdx.x;
    if ((reinterpret_cast<uintptr_t>(g) & 15u) == 0) {
      const int64_t end4 = begin + (end - begin) / 4 * 4;
      for (int64_t j = begin + 4 * threadIdx.x; j < end4; j += 4 * kThreads) {
        float4 v = detail::load4(g + j);
        v.x = __fmul_rn(v.x, coef);
        v.y = __fmul_rn(v.y, coef);
        v.z = __fmul_rn(v.z, coef);
        v.w = __fmul_rn(v.w, coef);
        detail::store4(g + j, v);
      }
      i = end4 + threadIdx.x;
    }
    for (; i < end; i += kThreads) g[i] = __fmul_rn(g[i], coef);
  }
}

}  // namespace

int64_t grad_norm_workspace_size(const GradSlot* slots, int64_t count) {
  int64_t partials = 0;
  for (int64_t k = 0; k < count; ++k)
    if (slots[k].n > 0) partials += (slots[k].n + kGradNormChunk - 1) / kGradNormChunk;
  return std::max<int64_t>(partials, 1);
}

void grad_norm_status(float* status, double* sum_squares, double* workspace, const GradSlot* slots,
                      int64_t count, bool clip, float max_norm, const float* loss,
                      cudaStream_t stream) {
  GradTable table{};  // partial_base 0: the first launch's partials come first
  detail::for_each_table(table, slots, count, kGradNormChunk, [&](GradTable& t) {
    launch<grad_sumsq_kernel>(detail::grid_for(t), kThreads, 0, stream, workspace, t);
    CNX_CUDA_LAUNCH_CHECK();
    t.partial_base += t.block_start[t.count];  // the next launch's partials follow these
  });
  const int64_t partials = table.partial_base;
  launch<grad_norm_finish_kernel>(1, kFinishThreads, 0, stream, status, sum_squares,
                                  static_cast<const double*>(workspace), partials, clip ? 1 : 0,
                                  max_norm, loss);
  CNX_CUDA_LAUNCH_CHECK();
}

void grad_scale(const GradSlot* slots, int64_t count, const float* status, cudaStream_t stream) {
  GradTable table{};
  detail::for_each_table(table, slots, count, kScaleChunk, [&](const GradTable& t) {
    launch<grad_scale_kernel>(detail::grid_for(t), kThreads, 0, stream, status, t);
    CNX_CUDA_LAUNCH_CHECK();
  });
}

}  // namespace cnx::cuda
