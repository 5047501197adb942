// CPU reference: patchify convolution (see kernels/patchify.h for the math and layouts).
//
// A patch row p of output pixel (i, j) is k*Ci contiguous input values,
// in[n, i*k + p, j*k .. j*k + k-1, :], and weight[o, p, :, :] is k*Ci contiguous values in the
// same order, so every inner loop below runs over one contiguous span of length k*Ci.
// bf16: the f32 loops between a widening of the bf16 operands and one rounding of the bf16
// results (kernels/cpu/bf16_emulation.h); the fp32 bias is used rounded to bf16 (as the GPU's
// GEMM epilogue reads it, kernels/linear.h); dweight and dbias are fp32 and never rounded.
#include "kernels/patchify.h"

#include "kernels/cpu/bf16_emulation.h"
#include "kernels/layout.h"

namespace cnx::cpu {

// ================================ forward ================================
template <class T>
void patchify_forward(T* out, const T* in, const T* weight, const param_t<T>* bias, int64_t N,
                      int64_t H, int64_t W, int64_t Ci, int64_t Co, int64_t k) {
  const int64_t Ho = H / k, Wo = W / k, span = k * Ci;
  const NHWC x{N, H, W, Ci}, y{N, Ho, Wo, Co};
#pragma omp parallel for collapse(2) schedule(static)
  for (int64_t n = 0; n < N; ++n)
    for (int64_t i = 0; i < Ho; ++i)
      for (int64_t j = 0; j < Wo; ++j)
        for (int64_t o = 0; o < Co; ++o) {
          T acc = bias ? bias[o] : T(0);
          for (int64_t p = 0; p < k; ++p) {
            const T* patch_row = in + x(n, i * k + p, j * k, 0);
            const T* w_row = weight + (o * k + p) * span;
#pragma omp simd reduction(+ : acc)
            for (int64_t t = 0; t < span; ++t) acc += patch_row[t] * w_row[t];
          }
          out[y(n, i, j, o)] = acc;
        }
}

// ================================ backward ================================
template <class T>
void patchify_backward(T* din, param_t<T>* dweight, param_t<T>* dbias, const T* dout, const T* in,
                       const T* weight, int64_t N, int64_t H, int64_t W, int64_t Ci, int64_t Co,
                       int64_t k) {
  const int64_t Ho = H / k, Wo = W / k, span = k * Ci;
  const NHWC x{N, H, W, Ci}, y{N, Ho, Wo, Co};

  if (din) {
    // Rows and columns past Ho*k, Wo*k were never read: their gradient is 0.
    for (int64_t e = 0; e < x.size(); ++e) din[e] = T(0);
    // Output row (n, i) reads input rows i*k .. i*k+k-1 only: threads never share a row.
#pragma omp parallel for collapse(2) schedule(static)
    for (int64_t n = 0; n < N; ++n)
      for (int64_t i = 0; i < Ho; ++i)
        for (int64_t j = 0; j < Wo; ++j)
          for (int64_t o = 0; o < Co; ++o) {
            const T g = dout[y(n, i, j, o)];
            for (int64_t p = 0; p < k; ++p) {
              T* d_row = din + x(n, i * k + p, j * k, 0);
              const T* w_row = weight + (o * k + p) * span;
#pragma omp simd
              for (int64_t t = 0; t < span; ++t) d_row[t] += g * w_row[t];
            }
          }
  }

  if (dweight) {
    // One thread per output channel, summing over (n, i, j) in a fixed order.
#pragma omp parallel for schedule(static)
    for (int64_t o = 0; o < Co; ++o) {
      T* dw = dweight + o * k * span;
      for (int64_t t = 0; t < k * span; ++t) dw[t] = T(0);
      for (int64_t n = 0; n < N; ++n)
        for (int64_t i = 0; i < Ho; ++i)
          for (int64_t j = 0; j < Wo; ++j) {
            const T g = dout[y(n, i, j, o)];
            for (int64_t p = 0; p < k; ++p) {
              const T* patch_row = in + x(n, i * k + p, j * k, 0);
#pragma omp simd
              for (int64_t t = 0; t < span; ++t) dw[p * span + t] += g * patch_row[t];
            }
          }
    }
  }

  if (dbias) {
#pragma omp parallel for schedule(static)
    for (int64_t o = 0; o < Co; ++o) {
      T acc = 0;
      for (int64_t r = 0; r < N * Ho * Wo; ++r) acc += dout[r * Co + o];
      dbias[o] = acc;
    }
  }
}

#define CNX_INSTANTIATE(T)                                                                  \
  template void patchify_forward<T>(T*, const T*, const T*, const T*, int64_t, int64_t,     \
                                    int64_t, int64_t, int64_t, int64_t);                    \
  template void patchify_backward<T>(T*, T*, T*, const T*, const T*, const T*, int64_t,     \
                                     int64_t, int64_t, int64_t, int64_t, int64_t);
CNX_INSTANTIATE(float)
CNX_INSTANTIATE(double)
#undef CNX_INSTANTIATE

// ================================ bf16 ================================
template <>
void patchify_forward<bf16>(bf16* out, const bf16* in, const bf16* weight, const float* bias,
                            int64_t N, int64_t H, int64_t W, int64_t Ci, int64_t Co, int64_t k) {
  const int64_t Ho = H / k, Wo = W / k;
  const Widened x(in, N * H * W * Ci), w(weight, Co * k * k * Ci);
  const RoundedToBf16 b(bias, Co);
  Narrowed y(out, N * Ho * Wo * Co);
  patchify_forward<float>(y.data(), x.data(), w.data(), b.data(), N, H, W, Ci, Co, k);
  y.store();
}

template <>
void patchify_backward<bf16>(bf16* din, float* dweight, float* dbias, const bf16* dout,
                             const bf16* in, const bf16* weight, int64_t N, int64_t H, int64_t W,
                             int64_t Ci, int64_t Co, int64_t k) {
  const int64_t Ho = H / k, Wo = W / k;
  // Operands that no requested gradient reads are not widened (null stays null).
  const Widened dy(dout, N * Ho * Wo * Co), x(dweight ? in : nullptr, N * H * W * Ci),
      w(din ? weight : nullptr, Co * k * k * Ci);
  Narrowed dx(din, N * H * W * Ci);
  patchify_backward<float>(dx.data(), dweight, dbias, dy.data(), x.data(), w.data(), N, H, W, Ci,
                           Co, k);
  dx.store();
}

}  // namespace cnx::cpu
