// Softmax cross-entropy, mean over the batch, for hard labels (with label smoothing) or soft
// targets (Mixup/CutMix):
//
//   p[n, :] = softmax(logits[n, :])   (computed as exp(x - max) / sum, stable)
//   t[n, k] = (1 - s) [k == label_n] + s / K      hard labels, smoothing s
//   t[n, k] = targets[n, k]                       soft targets
//   loss = (1/N) sum_n sum_k -t[n, k] * log p[n, k]
//   dlogits[n, k] = dloss * (p[n, k] * sum_j t[n, j] - t[n, k]) / N
//
// (sum_j t = 1 for proper targets; keeping it makes the gradient exact for any targets.)
// Layouts: logits, probs, targets (N, K); labels (N) int64 in [0, K). Forward saves probs.
// Exactly one of labels and targets is non-null.
#pragma once

#include <cstdint>

#include "kernels/stream.h"

namespace cnx::cpu {

template <class T>
void cross_entropy_forward(T* loss, T* probs, const T* logits, const int64_t* labels,
                           const T* targets, int64_t N, int64_t K, double smoothing);

template <class T>
void cross_entropy_backward(T* dlogits, const T* dloss, const T* probs, const int64_t* labels,
                            const T* targets, int64_t N, int64_t K, double smoothing);

}  // namespace cnx::cpu

// CUDA launchers (kernels/cuda/cross_entropy.cu): f32 (labels int64), device pointers,
// asynchronous on `stream`. The forward's mean over rows is a deterministic reduction through
// `workspace` (cross_entropy_forward_workspace_floats(N, K) floats). dloss is a device pointer
// to one float. Labels are not range-checked on the device (that would need a copy to the host and
// a wait; the DataLoader checks every label it delivers): a row whose label is outside [0, K)
// gets a NaN loss and NaN gradients, so it cannot pass unnoticed (the trainer stops on a
// non-finite loss). The CPU kernel throws instead.
namespace cnx::cuda {

int64_t cross_entropy_forward_workspace_floats(int64_t N, int64_t K);
void cross_entropy_forward(float* loss, float* probs, const float* logits, const int64_t* labels,
                           const float* targets, int64_t N, int64_t K, double smoothing,
                           float* workspace, cudaStream_t stream);

void cross_entropy_backward(float* dlogits, const float* dloss, const float* probs,
                            const int64_t* labels, const float* targets, int64_t N, int64_t K,
                            double smoothing, cudaStream_t stream);

}  // namespace cnx::cuda
