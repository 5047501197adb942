// CPU reference: 2-D max pooling (see kernels/maxpool.h). Forward visits each window's cells in
// row-major order, all channels of a cell at once; backward scatters each output's gradient to
// its argmax, outputs in increasing (n, oh, ow) order, which is the order the CUDA gather adds
// them in.
#include "kernels/maxpool.h"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <vector>

#include "kernels/cpu/bf16_emulation.h"

namespace cnx::cpu {

namespace {
// The value compared: the element itself, or its float for bf16 (exact).
inline float compared(bf16 x) { return static_cast<float>(x); }
inline float compared(float x) { return x; }
inline double compared(double x) { return x; }
}  // namespace

// ================================ forward ================================
template <class T>
void maxpool2d_forward(T* out, int32_t* argmax, const T* in, int64_t N, int64_t H, int64_t W,
                       int64_t C, int64_t k, int64_t stride, int64_t padding) {
  using K = decltype(compared(T{}));
  const int64_t Ho = maxpool2d_out_size(H, k, stride, padding);
  const int64_t Wo = maxpool2d_out_size(W, k, stride, padding);
  if (N <= 0 || C <= 0 || Ho <= 0 || Wo <= 0) return;
#pragma omp parallel for schedule(static)
  for (int64_t row = 0; row < N * Ho; ++row) {  // row = n Ho + oh
    const int64_t n = row / Ho, oh = row % Ho;
    std::vector<K> best(static_cast<size_t>(C));
    std::vector<int32_t> arg(static_cast<size_t>(C));
    const int64_t h0 = oh * stride - padding;
    const int64_t hs = std::max<int64_t>(h0, 0), he = std::min(h0 + k, H);
    for (int64_t ow = 0; ow < Wo; ++ow) {
      const int64_t w0 = ow * stride - padding;
      const int64_t ws = std::max<int64_t>(w0, 0), we = std::min(w0 + k, W);
      std::fill(best.begin(), best.end(), -std::numeric_limits<K>::infinity());
      std::fill(arg.begin(), arg.end(), static_cast<int32_t>((hs - h0) * k + (ws - w0)));
      for (int64_t h = hs; h < he; ++h)
        for (int64_t w = ws; w < we; ++w) {
          const T* x = in + ((n * H + h) * W + w) * C;
          const auto cell = static_cast<int32_t>((h - h0) * k + (w - w0));
          for (int64_t c = 0; c < C; ++c) {
            const K v = compared(x[c]);
            if (v > best[c] || std::isnan(v)) {
              best[c] = v;
              arg[c] = cell;
            }
          }
        }
      T* y = out + ((n * Ho + oh) * Wo + ow) * C;
      for (int64_t c = 0; c < C; ++c) {  // the winner itself, copied
        const int64_t h = h0 + arg[c] / k, w = w0 + arg[c] % k;
        y[c] = in[((n * H + h) * W + w) * C + c];
      }
      if (argmax)
        std::memcpy(argmax + ((n * Ho + oh) * Wo + ow) * C, arg.data(), C * sizeof(int32_t));
    }
  }
}

// ================================ backward ================================
template <class T>
void maxpool2d_backward(T* din, const T* dout, const int32_t* argmax, int64_t N, int64_t H,
                        int64_t W, int64_t C, int64_t k, int64_t stride, int64_t padding) {
  const int64_t Ho = maxpool2d_out_size(H, k, stride, padding);
  const int64_t Wo = maxpool2d_out_size(W, k, stride, padding);
  std::fill(din, din + std::max<int64_t>(N * H * W * C, 0), T(0));
  if (N <= 0 || C <= 0 || Ho <= 0 || Wo <= 0) return;
#pragma omp parallel for schedule(static)
  for (int64_t n = 0; n < N; ++n)  // samples are disjoint in din
    for (int64_t oh = 0; oh < Ho; ++oh)
      for (int64_t ow = 0; ow < Wo; ++ow) {
        const int64_t o = ((n * Ho + oh) * Wo + ow) * C;
        const int64_t h0 = oh * stride - padding, w0 = ow * stride - padding;
        for (int64_t c = 0; c < C; ++c) {
          const int64_t h = h0 + argmax[o + c] / k, w = w0 + argmax[o + c] % k;
          din[((n * H + h) * W + w) * C + c] += dout[o + c];
        }
      }
}

#define CNX_INSTANTIATE(T)                                                                     \
  template void maxpool2d_forward<T>(T*, int32_t*, const T*, int64_t, int64_t, int64_t,       \
                                     int64_t, int64_t, int64_t, int64_t);                      \
  template void maxpool2d_backward<T>(T*, const T*, const int32_t*, int64_t, int64_t, int64_t, \
                                      int64_t, int64_t, int64_t, int64_t);
CNX_INSTANTIATE(float)
CNX_INSTANTIATE(double)
#undef CNX_INSTANTIATE

template void maxpool2d_forward<bf16>(bf16*, int32_t*, const bf16*, int64_t, int64_t, int64_t,
                                      int64_t, int64_t, int64_t, int64_t);

// bf16 backward: the float scatter between a widening and one rounding per din element
// (kernels/cpu/bf16_emulation.h).
template <>
void maxpool2d_backward<bf16>(bf16* din, const bf16* dout, const int32_t* argmax, int64_t N,
                              int64_t H, int64_t W, int64_t C, int64_t k, int64_t stride,
                              int64_t padding) {
  const int64_t Ho = maxpool2d_out_size(H, k, stride, padding);
  const int64_t Wo = maxpool2d_out_size(W, k, stride, padding);
  const Widened dy(dout, std::max<int64_t>(N * Ho * Wo * C, 0));
  Narrowed dx(din, std::max<int64_t>(N * H * W * C, 0));
  maxpool2d_backward<float>(dx.data(), dy.data(), argmax, N, H, W, C, k, stride, padding);
  dx.store();
}

}  // namespace cnx::cpu
