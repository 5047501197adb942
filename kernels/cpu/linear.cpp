// CPU reference: linear layer, out = in W^T + b (see kernels/linear.h).
// Loop orders keep the innermost loop on contiguous memory: a dot product of two rows for the
// forward, a scaled row added to a row (axpy) for the gradients. Each output element is owned
// by one thread, so results do not depend on the thread count.
// bf16: the f32 loops between a widening of the bf16 operands and one rounding of the bf16
// results (kernels/cpu/bf16_emulation.h); the fp32 bias is rounded to bf16 first (as the GPU's
// epilogue reads it, and as autocast casts it) and added in f32 before the one rounding; the
// fp32 dweight, dbias are written by the f32 loops directly, never rounded.
#include "kernels/linear.h"

#include "kernels/cpu/bf16_emulation.h"

namespace cnx::cpu {

// ================================ forward ================================
template <class T>
void linear_forward(T* out, const T* in, const T* weight, const param_t<T>* bias, int64_t M,
                    int64_t K, int64_t N) {
#pragma omp parallel for schedule(static)
  for (int64_t m = 0; m < M; ++m) {
    const T* x = in + m * K;
    for (int64_t n = 0; n < N; ++n) {
      const T* w = weight + n * K;
      T acc = 0;
#pragma omp simd reduction(+ : acc)
      for (int64_t k = 0; k < K; ++k) acc += x[k] * w[k];
      out[m * N + n] = acc + (bias ? bias[n] : T(0));
    }
  }
}

// ================================ backward ================================
template <class T>
void linear_backward(T* din, param_t<T>* dweight, param_t<T>* dbias, const T* dout, const T* in,
                     const T* weight, int64_t M, int64_t K, int64_t N) {
  if (din) {  // din[m, :] = sum_n dout[m, n] * weight[n, :]
#pragma omp parallel for schedule(static)
    for (int64_t m = 0; m < M; ++m) {
      T* dx = din + m * K;
      for (int64_t k = 0; k < K; ++k) dx[k] = T(0);
      for (int64_t n = 0; n < N; ++n) {
        const T g = dout[m * N + n];
        const T* w = weight + n * K;
#pragma omp simd
        for (int64_t k = 0; k < K; ++k) dx[k] += g * w[k];
      }
    }
  }
  if (dweight) {  // dweight[n, :] = sum_m dout[m, n] * in[m, :]
#pragma omp parallel for schedule(static)
    for (int64_t n = 0; n < N; ++n) {
      T* dw = dweight + n * K;
      for (int64_t k = 0; k < K; ++k) dw[k] = T(0);
      for (int64_t m = 0; m < M; ++m) {
        const T g = dout[m * N + n];
        const T* x = in + m * K;
#pragma omp simd
        for (int64_t k = 0; k < K; ++k) dw[k] += g * x[k];
      }
    }
  }
  if (dbias) {
#pragma omp parallel for schedule(static)
    for (int64_t n = 0; n < N; ++n) {
      T acc = 0;
      for (int64_t m = 0; m < M; ++m) acc += dout[m * N + n];
      dbias[n] = acc;
    }
  }
}

#define CNX_INSTANTIATE(T)                                                                    \
  template void linear_forward<T>(T*, const T*, const T*, const T*, int64_t, int64_t, int64_t); \
  template void linear_backward<T>(T*, T*, T*, const T*, const T*, const T*, int64_t, int64_t, \
                                   int64_t);
CNX_INSTANTIATE(float)
CNX_INSTANTIATE(double)
#undef CNX_INSTANTIATE

// ================================ bf16 ================================
template <>
void linear_forward<bf16>(bf16* out, const bf16* in, const bf16* weight, const float* bias,
                          int64_t M, int64_t K, int64_t N) {
  const Widened x(in, M * K), w(weight, N * K);
  const RoundedToBf16 b(bias, N);
  Narrowed y(out, M * N);
  linear_forward<float>(y.data(), x.data(), w.data(), b.data(), M, K, N);
  y.store();
}

template <>
void linear_backward<bf16>(bf16* din, float* dweight, float* dbias, const bf16* dout,
                           const bf16* in, const bf16* weight, int64_t M, int64_t K, int64_t N) {
  // Operands that no requested gradient reads are not widened (null stays null).
  const Widened dy(dout, M * N), x(dweight ? in : nullptr, M * K),
      w(din ? weight : nullptr, N * K);
  Narrowed dx(din, M * K);
  linear_backward<float>(dx.data(), dweight, dbias, dy.data(), x.data(), w.data(), M, K, N);
  dx.store();
}

}  // namespace cnx::cpu
