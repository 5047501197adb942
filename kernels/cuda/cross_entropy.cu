// CUDA softmax cross-entropy, mean over the batch (see kernels/cross_entropy.h for the math):
//
//   lse_n = max_k x[n, k] + log sum_k exp(x[n, k] - max)         (stable for any logits)
//   p[n, k] = exp(x[n, k] - lse_n)                                (saved for backward)
//   loss = (1/N) sum_n sum_{k: t[n,k] != 0} t[n, k] (lse_n - x[n, k])
//   dlogits[n, k] = (dloss / N) (p[n, k] sum_j t[n, j] - t[n, k])
//   t[n, k] = s/K + (1 - s) [k == label_n]  (hard labels, smoothing s)  or  targets[n, k] (soft)
//
// Forward, two kernels, deterministic:
//  1. one block of 128 threads per row (K = 10 .. 1000 in practice; any K works): block
//     reductions (reduce.cuh, fixed butterfly order) of the row max, of sum exp(x - max), then
//     of the row's loss, while writing p. The row's loss goes to workspace[n] (N floats).
//  2. one block adds the N row losses in double (strided per thread, then the butterfly),
//     divides by N and writes the loss.
// Backward: one block of 128 threads per row; soft targets need sum_j t[n, j] (a block
// reduction); hard labels have sum_j t = (1 - s) + K (s / K), computed on the host in double.
// fp32 throughout except stage 2 of the forward; expf and logf (not the fast intrinsics).
// A label outside [0, K) (not checked on the device: see kernels/cross_entropy.h)
// makes that row's loss and gradient NaN rather than reading out of bounds.
#include <cuda_runtime.h>

#include <algorithm>
#include <cmath>

#include "kernels/cross_entropy.h"
#include "kernels/cuda/launch.cuh"
#include "kernels/cuda/reduce.cuh"
#include "kernels/cuda/vec.cuh"
#include "tensor/cuda_check.h"

namespace cnx::cuda {

namespace {

constexpr int kThreads = 128;
constexpr int64_t kMaxGrid = 1 << 20;  // rows past this loop over blockIdx.x

// Hard-label targets: s / K everywhere, s / K + (1 - s) at the label (both rounded from
// double, as the CPU forms them), and their sum over k.
struct HardTargets {
  float other, at_label, sum;
};
HardTargets hard_targets(int64_t K, double smoothing) {
  const double other = smoothing / static_cast<double>(K);
  return {static_cast<float>(other), static_cast<float>(other + (1.0 - smoothing)),
          static_cast<float>(static_cast<double>(K) * other + (1.0 - smoothing))};
}

// row_loss (N); probs, logits (N, K); labels (N) or null; targets (N, K) or null.
__global__ void __launch_bounds__(kThreads)
    cross_entropy_rows_kernel(float* __restrict__ row_loss, float* __restrict__ probs,
                              const float* __restrict__ logits, const int64_t* __restrict__ labels,
                              const float* __restrict__ targets, int64_t N, int64_t K,
                              HardTargets hard) {
  __shared__ float scratch[32];
  for (int64_t n = blockIdx.x; n < N; n += gridDim.x) {  // uniform over the block
    const float* x = logits + n * K;
    float mx = -INFINITY;
    for (int64_t k = threadIdx.x; k < K; k += kThreads) mx = fmaxf(mx, x[k]);
    mx = detail::block_reduce(mx, detail::MaxOp{}, -INFINITY, scratch);
    float s = 0.0f;
    for (int64_t k = threadIdx.x; k < K; k += kThreads) s += expf(x[k] - mx);
    s = detail::block_reduce(s, detail::SumOp{}, 0.0f, scratch);
    const float lse = mx + logf(s);
    const int64_t label = labels ? labels[n] : -1;
    const bool bad_label = labels && (label < 0 || label >= K);
    float row = 0.0f;
    for (int64_t k = threadIdx.x; k < K; k += kThreads) {
      probs[n * K + k] = expf(x[k] - lse);
      const float t = targets ? targets[n * K + k] : (k == label ? hard.at_label : hard.other);
      if (t != 0.0f) row += t * (lse - x[k]);  // 0 * (-log p) is 0 even where p underflows
    }
    row = detail::block_reduce(row, detail::SumOp{}, 0.0f, scratch);
    if (threadIdx.x == 0) row_loss[n] = bad_label ? NAN : row;
  }
}

// loss[0] = sum_n row_loss[n] / N, the rows added in double in a fixed order.
__global__ void __launch_bounds__(kThreads)
    cross_entropy_mean_kernel(float* __restrict__ loss, const float* __restrict__ row_loss,
                              int64_t N) {
  __shared__ double scratch[32];
  double acc = 0.0;
  for (int64_t n = threadIdx.x; n < N; n += kThreads) acc += static_cast<double>(row_loss[n]);
  acc = detail::block_reduce(acc, detail::SumOp{}, 0.0, scratch);
  if (threadIdx.x == 0) loss[0] = static_cast<float>(acc / static_cast<double>(N));  // N = 0: NaN
}

// dlogits, probs (N, K); dloss (1); labels (N) or null; targets (N, K) or null.
__global__ void __launch_bounds__(kThreads)
    cross_entropy_backward_kernel(float* __restrict__ dlogits, const float* __restrict__ dloss,
                                  const float* __restrict__ probs,
                                  const int64_t* __restrict__ labels,
                                  const float* __restrict__ targets, int64_t N, int64_t K,
                                  HardTargets hard) {
  __shared__ float scratch[32];
  const float scale = dloss[0] / static_cast<float>(N);
  for (int64_t n = blockIdx.x; n < N; n += gridDim.x) {  // uniform over the block
    float t_sum = hard.sum;
    if (targets) {
      float s = 0.0f;
      for (int64_t k = threadIdx.x; k < K; k += kThreads) s += targets[n * K + k];
      t_sum = detail::block_reduce(s, detail::SumOp{}, 0.0f, scratch);
    }
    const int64_t label = labels ? labels[n] : -1;
    const bool bad_label = labels && (label < 0 || label >= K);
    for (int64_t k = threadIdx.x; k < K; k += kThreads) {
      const float t = targets ? targets[n * K + k] : (k == label ? hard.at_label : hard.other);
      const float d = scale * (probs[n * K + k] * t_sum - t);
      dlogits[n * K + k] = bad_label ? NAN : d;
    }
  }
}

}  // namespace

// ================================ forward ================================
int64_t cross_entropy_forward_workspace_floats(int64_t N, int64_t /*K*/) {
  return N > 0 ? N : 0;  // one loss per row
}

void cross_entropy_forward(float* loss, float* probs, const float* logits, const int64_t* labels,
                           const float* targets, int64_t N, int64_t K, double smoothing,
                           float* workspace, cudaStream_t stream) {
  if (N > 0) {
    const unsigned grid = static_cast<unsigned>(std::min<int64_t>(N, kMaxGrid));
    launch<cross_entropy_rows_kernel>(grid, kThreads, 0, stream, workspace, probs, logits, labels,
                                      targets, N, K, hard_targets(K, smoothing));
    CNX_CUDA_LAUNCH_CHECK();
  }
  // Also for N = 0: the mean over no rows is 0 / 0 = NaN, as the CPU reference.
  launch<cross_entropy_mean_kernel>(1, kThreads, 0, stream, loss, workspace, N);
  CNX_CUDA_LAUNCH_CHECK();
}

// ================================ backward ================================
void cross_entropy_backward(float* dlogits, const float* dloss, const float* probs,
                            const int64_t* labels, const float* targets, int64_t N, int64_t K,
                            double smoothing, cudaStream_t stream) {
  if (N <= 0 || K <= 0) return;
  const unsigned grid = static_cast<unsigned>(std::min<int64_t>(N, kMaxGrid));
  launch<cross_entropy_backward_kernel>(grid, kThreads, 0, stream, dlogits, dloss, probs, labels,
                                        targets, N, K, hard_targets(K, smoothing));
  CNX_CUDA_LAUNCH_CHECK();
}

}  // namespace cnx::cuda
