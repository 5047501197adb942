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

namespace cnx::cpu {

template <class T>
void cross_entropy_forward(T* loss, T* probs, const T* logits, const int64_t* labels,
                           const T* targets, int64_t N, int64_t K, double smoothing);

template <class T>
void cross_entropy_backward(T* dlogits, const T* dloss, const T* probs, const int64_t* labels,
                            const T* targets, int64_t N, int64_t K, double smoothing);

}  // namespace cnx::cpu
