// CPU reference: depthwise convolution (see kernels/dwconv.h for the math and layouts).
//
// With r = k/2, tap (p, q) of output (h, w) reads input (h + p - r, w + q - r); taps that
// fall outside the image read zeros, so they are skipped. The channel loop is innermost:
// activations and weight[p, q, :] are both contiguous along C.
//
// bf16 (mixed precision): the f32 kernels on widened copies of the bf16 activations, each bf16
// output rounded once (kernels/cpu/bf16_emulation.h); the fp32 parameters are used as they are
// and the fp32 parameter gradients are written directly, unrounded.
#include "kernels/dwconv.h"

#include <algorithm>

#include "kernels/cpu/bf16_emulation.h"
#include "kernels/layout.h"

namespace cnx::cpu {

// ================================ forward ================================
// (float and double: param_t<T> is T.)
template <class T>
void dwconv_forward(T* out, const T* in, const param_t<T>* weight, const param_t<T>* bias,
                    int64_t N, int64_t H, int64_t W, int64_t C, int64_t k) {
  const int64_t r = k / 2;
  const NHWC x{N, H, W, C};
#pragma omp parallel for collapse(2) schedule(static)
  for (int64_t n = 0; n < N; ++n)
    for (int64_t h = 0; h < H; ++h)
      for (int64_t w = 0; w < W; ++w) {
        T* o = out + x(n, h, w, 0);
        for (int64_t c = 0; c < C; ++c) o[c] = bias ? bias[c] : T(0);
        for (int64_t p = std::max<int64_t>(0, r - h); p < std::min(k, H + r - h); ++p)
          for (int64_t q = std::max<int64_t>(0, r - w); q < std::min(k, W + r - w); ++q) {
            const T* src = in + x(n, h + p - r, w + q - r, 0);
            const T* wt = weight + (p * k + q) * C;
#pragma omp simd
            for (int64_t c = 0; c < C; ++c) o[c] += src[c] * wt[c];
          }
      }
}

// ================================ backward ================================
template <class T>
void dwconv_backward(T* din, param_t<T>* dweight, param_t<T>* dbias, const T* dout, const T* in,
                     const param_t<T>* weight, int64_t N, int64_t H, int64_t W, int64_t C,
                     int64_t k) {
  const int64_t r = k / 2;
  const NHWC x{N, H, W, C};

  if (din) {
    // din[h, w] gathers dout[h', w'] over the outputs that read it: h' = h - p + r.
#pragma omp parallel for collapse(2) schedule(static)
    for (int64_t n = 0; n < N; ++n)
      for (int64_t h = 0; h < H; ++h)
        for (int64_t w = 0; w < W; ++w) {
          T* d = din + x(n, h, w, 0);
          for (int64_t c = 0; c < C; ++c) d[c] = T(0);
          for (int64_t p = std::max<int64_t>(0, h + r - (H - 1)); p < std::min(k, h + r + 1); ++p)
            for (int64_t q = std::max<int64_t>(0, w + r - (W - 1)); q < std::min(k, w + r + 1); ++q) {
              const T* g = dout + x(n, h - p + r, w - q + r, 0);
              const T* wt = weight + (p * k + q) * C;
#pragma omp simd
              for (int64_t c = 0; c < C; ++c) d[c] += g[c] * wt[c];
            }
        }
  }

  if (dweight) {
    // One thread per tap (p, q), summing over (n, h, w) in a fixed order.
#pragma omp parallel for collapse(2) schedule(static)
    for (int64_t p = 0; p < k; ++p)
      for (int64_t q = 0; q < k; ++q) {
        T* dw = dweight + (p * k + q) * C;
        for (int64_t c = 0; c < C; ++c) dw[c] = T(0);
        for (int64_t n = 0; n < N; ++n)
          for (int64_t h = std::max<int64_t>(0, r - p); h < std::min(H, H + r - p); ++h)
            for (int64_t w = std::max<int64_t>(0, r - q); w < std::min(W, W + r - q); ++w) {
              const T* g = dout + x(n, h, w, 0);
              const T* src = in + x(n, h + p - r, w + q - r, 0);
#pragma omp simd
              for (int64_t c = 0; c < C; ++c) dw[c] += g[c] * src[c];
            }
      }
  }

  if (dbias) {
    for (int64_t c = 0; c < C; ++c) dbias[c] = T(0);
    for (int64_t e = 0; e < N * H * W; ++e) {
#pragma omp simd
      for (int64_t c = 0; c < C; ++c) dbias[c] += dout[e * C + c];
    }
  }
}

#define CNX_INSTANTIATE(T)                                                                     \
  template void dwconv_forward<T>(T*, const T*, const T*, const T*, int64_t, int64_t, int64_t, \
                                  int64_t, int64_t);                                           \
  template void dwconv_backward<T>(T*, T*, T*, const T*, const T*, const T*, int64_t, int64_t, \
                                   int64_t, int64_t, int64_t);
CNX_INSTANTIATE(float)
CNX_INSTANTIATE(double)
#undef CNX_INSTANTIATE

// ================================ bf16 ================================
// weight, bias: fp32 (param_t<bf16>), read as they are.
template <>
void dwconv_forward<bf16>(bf16* out, const bf16* in, const float* weight, const float* bias,
                          int64_t N, int64_t H, int64_t W, int64_t C, int64_t k) {
  const int64_t n = N * H * W * C;
  const Widened x(in, n);
  Narrowed y(out, n);
  dwconv_forward<float>(y.data(), x.data(), weight, bias, N, H, W, C, k);
  y.store();
}

// din is rounded to bf16; dweight and dbias are fp32 sums of products of the (exactly widened)
// bf16 dout and in, written as they are.
template <>
void dwconv_backward<bf16>(bf16* din, float* dweight, float* dbias, const bf16* dout,
                           const bf16* in, const float* weight, int64_t N, int64_t H, int64_t W,
                           int64_t C, int64_t k) {
  const int64_t n = N * H * W * C;
  const Widened dy(dout, n), x(in, n);
  Narrowed dx(din, n);
  dwconv_backward<float>(dx.data(), dweight, dbias, dy.data(), x.data(), weight, N, H, W, C, k);
  dx.store();
}

}  // namespace cnx::cpu
