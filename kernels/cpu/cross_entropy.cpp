// CPU reference: softmax cross-entropy, mean over the batch (see kernels/cross_entropy.h).
// Per row: lse = max + log(sum exp(x - max)) (stable for any logits), log p_k = x_k - lse.
#include "kernels/cross_entropy.h"

#include <algorithm>
#include <cmath>

#include "tensor/error.h"

namespace cnx::cpu {

namespace {
// The target t[n, k] of the loss, for hard labels with smoothing or for soft targets.
template <class T>
double target(const int64_t* labels, const T* targets, int64_t n, int64_t k, int64_t K,
              double smoothing) {
  if (targets) return targets[n * K + k];
  return smoothing / static_cast<double>(K) + (labels[n] == k ? 1.0 - smoothing : 0.0);
}
}  // namespace

// ================================ forward ================================
template <class T>
void cross_entropy_forward(T* loss, T* probs, const T* logits, const int64_t* labels,
                           const T* targets, int64_t N, int64_t K, double smoothing) {
  if (labels)
    for (int64_t n = 0; n < N; ++n)
      CNX_CHECK(labels[n] >= 0 && labels[n] < K, "cross_entropy: label ", labels[n],
                " of sample ", n, " is outside [0, ", K, ")");
  double total = 0;  // summed serially over rows: reproducible
  for (int64_t n = 0; n < N; ++n) {
    const T* x = logits + n * K;
    const double mx = *std::max_element(x, x + K);
    double s = 0;
    for (int64_t k = 0; k < K; ++k) s += std::exp(x[k] - mx);
    const double lse = mx + std::log(s);
    double row = 0;
    for (int64_t k = 0; k < K; ++k) {
      probs[n * K + k] = static_cast<T>(std::exp(x[k] - lse));
      const double t = target(labels, targets, n, k, K, smoothing);
      if (t != 0) row += t * (lse - x[k]);  // skip 0 * (-log p), which is 0 even if p underflows
    }
    total += row;
  }
  loss[0] = static_cast<T>(total / static_cast<double>(N));
}

// ================================ backward ================================
template <class T>
void cross_entropy_backward(T* dlogits, const T* dloss, const T* probs, const int64_t* labels,
                            const T* targets, int64_t N, int64_t K, double smoothing) {
  const double scale = static_cast<double>(dloss[0]) / static_cast<double>(N);
#pragma omp parallel for schedule(static)
  for (int64_t n = 0; n < N; ++n) {
    double t_sum = 0;
    for (int64_t k = 0; k < K; ++k) t_sum += target(labels, targets, n, k, K, smoothing);
    for (int64_t k = 0; k < K; ++k) {
      const double t = target(labels, targets, n, k, K, smoothing);
      dlogits[n * K + k] = static_cast<T>(scale * (probs[n * K + k] * t_sum - t));
    }
  }
}

#define CNX_INSTANTIATE(T)                                                                   \
  template void cross_entropy_forward<T>(T*, T*, const T*, const int64_t*, const T*, int64_t, \
                                         int64_t, double);                                   \
  template void cross_entropy_backward<T>(T*, const T*, const T*, const int64_t*, const T*,   \
                                          int64_t, int64_t, double);
CNX_INSTANTIATE(float)
CNX_INSTANTIATE(double)
#undef CNX_INSTANTIATE

}  // namespace cnx::cpu
