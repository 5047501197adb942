// CPU conv2d (see kernels/conv2d.h for the math and layouts): the reference loops (float,
// double, bf16) and the fast f32 path (im2col + linear's OpenBLAS GEMMs).
//
// In the loops, a window row (p, q) of output channel o in group g reads Cig contiguous input
// values, in[n, h, w, g*Cig .. g*Cig + Cig-1], against Cig contiguous weights,
// weight[o, p, q, :], so every inner loop runs over one contiguous span.
// Parallelism never changes a sum's order: forward and din give each thread whole rows (n, i)
// of the output or (n, h) of the input, written by that thread only; dweight and dbias give each
// thread whole output channels, each summed over (n, i, j) in order. So the results are bitwise
// the same for any number of threads.
// bf16: the f32 loops between a widening of the bf16 operands and one rounding of the bf16
// results (kernels/cpu/bf16_emulation.h); the fp32 bias is used rounded to bf16, dweight and
// dbias are fp32 and never rounded.
#include <algorithm>
#include <vector>

#include "kernels/conv2d.h"
#include "kernels/cpu/bf16_emulation.h"
#include "kernels/layout.h"
#include "kernels/linear.h"

namespace cnx::cpu {

namespace {

// The output index i whose window row p covers input row h (i * stride - padding + p == h), or
// -1 when there is none inside [0, Ho).
inline int64_t source_index(int64_t h, int64_t p, int64_t stride, int64_t padding, int64_t Ho) {
  const int64_t t = h + padding - p;
  if (t < 0 || t % stride != 0) return -1;
  const int64_t i = t / stride;
  return i < Ho ? i : -1;
}

}  // namespace

// ================================ forward ================================
template <class T>
void conv2d_forward(T* out, const T* in, const T* weight, const param_t<T>* bias,
                    const Conv2dShape& s) {
  const int64_t Ho = s.Ho(), Wo = s.Wo(), Cig = s.Cig(), Cog = s.Cog();
  const NHWC x{s.N, s.H, s.W, s.Ci}, y{s.N, Ho, Wo, s.Co};
#pragma omp parallel for collapse(2) schedule(static)
  for (int64_t n = 0; n < s.N; ++n)
    for (int64_t i = 0; i < Ho; ++i)
      for (int64_t j = 0; j < Wo; ++j)
        for (int64_t o = 0; o < s.Co; ++o) {
          const int64_t g = o / Cog;
          T acc = bias ? T(bias[o]) : T(0);
          for (int64_t p = 0; p < s.kh; ++p) {
            const int64_t h = i * s.stride - s.padding + p;
            if (h < 0 || h >= s.H) continue;
            for (int64_t q = 0; q < s.kw; ++q) {
              const int64_t w = j * s.stride - s.padding + q;
              if (w < 0 || w >= s.W) continue;
              const T* in_span = in + x(n, h, w, g * Cig);
              const T* w_span = weight + ((o * s.kh + p) * s.kw + q) * Cig;
              for (int64_t c = 0; c < Cig; ++c) acc += in_span[c] * w_span[c];
            }
          }
          out[y(n, i, j, o)] = acc;
        }
}

// ================================ backward ================================
template <class T>
void conv2d_backward(T* din, param_t<T>* dweight, param_t<T>* dbias, const T* dout, const T* in,
                     const T* weight, const Conv2dShape& s) {
  const int64_t Ho = s.Ho(), Wo = s.Wo(), Cig = s.Cig(), Cog = s.Cog();
  const NHWC x{s.N, s.H, s.W, s.Ci}, y{s.N, Ho, Wo, s.Co};

  if (din) {
    // A gather: input pixel (n, h, w) adds, in (p, q, o) order, every output pixel whose window
    // covers it. Threads own whole input rows (n, h).
#pragma omp parallel for collapse(2) schedule(static)
    for (int64_t n = 0; n < s.N; ++n)
      for (int64_t h = 0; h < s.H; ++h)
        for (int64_t w = 0; w < s.W; ++w) {
          T* d_pix = din + x(n, h, w, 0);
          for (int64_t c = 0; c < s.Ci; ++c) d_pix[c] = T(0);
          for (int64_t p = 0; p < s.kh; ++p) {
            const int64_t i = source_index(h, p, s.stride, s.padding, Ho);
            if (i < 0) continue;
            for (int64_t q = 0; q < s.kw; ++q) {
              const int64_t j = source_index(w, q, s.stride, s.padding, Wo);
              if (j < 0) continue;
              const T* g_pix = dout + y(n, i, j, 0);
              for (int64_t o = 0; o < s.Co; ++o) {
                const T g = g_pix[o];
                T* d_span = d_pix + (o / Cog) * Cig;
                const T* w_span = weight + ((o * s.kh + p) * s.kw + q) * Cig;
                for (int64_t c = 0; c < Cig; ++c) d_span[c] += g * w_span[c];
              }
            }
          }
        }
  }

  if (dweight) {
    // One thread per output channel, summing over (n, i, j) in a fixed order.
#pragma omp parallel for schedule(static)
    for (int64_t o = 0; o < s.Co; ++o) {
      const int64_t g = o / Cog;
      T* dw = dweight + o * s.window();
      for (int64_t t = 0; t < s.window(); ++t) dw[t] = T(0);
      for (int64_t n = 0; n < s.N; ++n)
        for (int64_t i = 0; i < Ho; ++i)
          for (int64_t j = 0; j < Wo; ++j) {
            const T gv = dout[y(n, i, j, o)];
            for (int64_t p = 0; p < s.kh; ++p) {
              const int64_t h = i * s.stride - s.padding + p;
              if (h < 0 || h >= s.H) continue;
              for (int64_t q = 0; q < s.kw; ++q) {
                const int64_t w = j * s.stride - s.padding + q;
                if (w < 0 || w >= s.W) continue;
                const T* in_span = in + x(n, h, w, g * Cig);
                T* dw_span = dw + (p * s.kw + q) * Cig;
                for (int64_t c = 0; c < Cig; ++c) dw_span[c] += gv * in_span[c];
              }
            }
          }
    }
  }

  if (dbias) {
#pragma omp parallel for schedule(static)
    for (int64_t o = 0; o < s.Co; ++o) {
      T acc = 0;
      for (int64_t r = 0; r < s.rows(); ++r) acc += dout[r * s.Co + o];
      dbias[o] = acc;
    }
  }
}

#define CNX_INSTANTIATE(T)                                                                   \
  template void conv2d_forward<T>(T*, const T*, const T*, const T*, const Conv2dShape&);     \
  template void conv2d_backward<T>(T*, T*, T*, const T*, const T*, const T*,                 \
                                   const Conv2dShape&);
CNX_INSTANTIATE(float)
CNX_INSTANTIATE(double)
#undef CNX_INSTANTIATE

// ================================ bf16 ================================
template <>
void conv2d_forward<bf16>(bf16* out, const bf16* in, const bf16* weight, const float* bias,
                          const Conv2dShape& s) {
  const Widened x(in, s.in_numel()), w(weight, s.weight_numel());
  const RoundedToBf16 b(bias, s.Co);
  Narrowed y(out, s.out_numel());
  conv2d_forward<float>(y.data(), x.data(), w.data(), b.data(), s);
  y.store();
}

template <>
void conv2d_backward<bf16>(bf16* din, float* dweight, float* dbias, const bf16* dout,
                           const bf16* in, const bf16* weight, const Conv2dShape& s) {
  // Operands that no requested gradient reads are not widened (null stays null).
  const Widened dy(dout, s.out_numel()), x(dweight ? in : nullptr, s.in_numel()),
      w(din ? weight : nullptr, s.weight_numel());
  Narrowed dx(din, s.in_numel());
  conv2d_backward<float>(dx.data(), dweight, dbias, dy.data(), x.data(), w.data(), s);
  dx.store();
}

}  // namespace cnx::cpu

// =============================================================================================
// Fast f32 path: im2col + linear's OpenBLAS GEMMs
// =============================================================================================
namespace cnx::blas {

namespace {

// Images per chunk: as many as keep one chunk's im2col matrix under ~64 MiB (at least one).
// A function of the shape only, so the chunking (and with it every sum's order) never depends
// on the machine or the thread count.
int64_t images_per_chunk(const Conv2dShape& s) {
  constexpr int64_t kChunkFloats = int64_t{16} << 20;  // 64 MiB of f32
  const int64_t per_image = s.Ho() * s.Wo() * s.window();
  if (per_image == 0) return std::max<int64_t>(s.N, 1);
  return std::clamp<int64_t>(kChunkFloats / per_image, 1, std::max<int64_t>(s.N, 1));
}

// col (n_img * Ho * Wo, window) of images [n0, n0 + n_img): row (n, i, j), column (p, q, c)
// holds in[n0 + n, i*stride - padding + p, j*stride - padding + q, c], 0 outside the image.
void im2col(float* col, const float* in, const Conv2dShape& s, int64_t n0, int64_t n_img) {
  const int64_t Ho = s.Ho(), Wo = s.Wo(), K = s.window();
  const NHWC x{s.N, s.H, s.W, s.Ci};
#pragma omp parallel for collapse(2) schedule(static)
  for (int64_t n = 0; n < n_img; ++n)
    for (int64_t i = 0; i < Ho; ++i)
      for (int64_t j = 0; j < Wo; ++j) {
        float* row = col + ((n * Ho + i) * Wo + j) * K;
        for (int64_t p = 0; p < s.kh; ++p) {
          const int64_t h = i * s.stride - s.padding + p;
          for (int64_t q = 0; q < s.kw; ++q) {
            const int64_t w = j * s.stride - s.padding + q;
            float* dst = row + (p * s.kw + q) * s.Ci;
            if (h < 0 || h >= s.H || w < 0 || w >= s.W) {
              std::fill(dst, dst + s.Ci, 0.0f);
            } else {
              const float* src = in + x(n0 + n, h, w, 0);
              std::copy(src, src + s.Ci, dst);
            }
          }
        }
      }
}

// din of images [n0, n0 + n_img) from their column gradient dcol (n_img * Ho * Wo, window): a
// gather, each input element adding the entries that read it in (p, q) order.
void col2im(float* din, const float* dcol, const Conv2dShape& s, int64_t n0, int64_t n_img) {
  const int64_t Ho = s.Ho(), Wo = s.Wo(), K = s.window();
  const NHWC x{s.N, s.H, s.W, s.Ci};
#pragma omp parallel for collapse(2) schedule(static)
  for (int64_t n = 0; n < n_img; ++n)
    for (int64_t h = 0; h < s.H; ++h)
      for (int64_t w = 0; w < s.W; ++w) {
        float* d = din + x(n0 + n, h, w, 0);
        std::fill(d, d + s.Ci, 0.0f);
        for (int64_t p = 0; p < s.kh; ++p) {
          const int64_t t = h + s.padding - p;
          if (t < 0 || t % s.stride != 0 || t / s.stride >= Ho) continue;
          const int64_t i = t / s.stride;
          for (int64_t q = 0; q < s.kw; ++q) {
            const int64_t u = w + s.padding - q;
            if (u < 0 || u % s.stride != 0 || u / s.stride >= Wo) continue;
            const int64_t j = u / s.stride;
            const float* src = dcol + ((n * Ho + i) * Wo + j) * K + (p * s.kw + q) * s.Ci;
            for (int64_t c = 0; c < s.Ci; ++c) d[c] += src[c];
          }
        }
      }
}

}  // namespace

void conv2d_forward(float* out, const float* in, const float* weight, const float* bias,
                    const Conv2dShape& s) {
  if (s.groups != 1) return cpu::conv2d_forward<float>(out, in, weight, bias, s);
  if (s.out_numel() == 0) return;
  if (s.is_pointwise()) return linear_forward(out, in, weight, bias, s.rows(), s.Ci, s.Co);
  const int64_t per_chunk = images_per_chunk(s), pix = s.Ho() * s.Wo(), K = s.window();
  std::vector<float> col(static_cast<size_t>(std::min(per_chunk, s.N) * pix * K));
  for (int64_t n0 = 0; n0 < s.N; n0 += per_chunk) {
    const int64_t n_img = std::min(per_chunk, s.N - n0);
    im2col(col.data(), in, s, n0, n_img);
    linear_forward(out + n0 * pix * s.Co, col.data(), weight, bias, n_img * pix, K, s.Co);
  }
}

void conv2d_backward(float* din, float* dweight, float* dbias, const float* dout, const float* in,
                     const float* weight, const Conv2dShape& s) {
  if (s.groups != 1)
    return cpu::conv2d_backward<float>(din, dweight, dbias, dout, in, weight, s);
  const int64_t pix = s.Ho() * s.Wo(), K = s.window();
  if (s.is_pointwise() || s.N <= images_per_chunk(s)) {
    // One chunk: dweight and dbias straight from linear_backward.
    if (s.is_pointwise())
      return linear_backward(din, dweight, dbias, dout, in, weight, s.rows(), s.Ci, s.Co);
    std::vector<float> col(dweight ? static_cast<size_t>(s.rows() * K) : 0);
    std::vector<float> dcol(din ? static_cast<size_t>(s.rows() * K) : 0);
    if (dweight) im2col(col.data(), in, s, 0, s.N);
    linear_backward(din ? dcol.data() : nullptr, dweight, dbias, dout,
                    dweight ? col.data() : nullptr, weight, s.rows(), K, s.Co);
    if (din) col2im(din, dcol.data(), s, 0, s.N);
    return;
  }
  // Several chunks: each chunk's dweight and dbias go to scratch and are added in chunk order.
  const int64_t per_chunk = images_per_chunk(s), chunk_rows = per_chunk * pix;
  std::vector<float> col(dweight ? static_cast<size_t>(chunk_rows * K) : 0);
  std::vector<float> dcol(din ? static_cast<size_t>(chunk_rows * K) : 0);
  std::vector<float> dw_part(dweight ? static_cast<size_t>(s.weight_numel()) : 0);
  std::vector<float> db_part(dbias ? static_cast<size_t>(s.Co) : 0);
  if (dweight) std::fill(dweight, dweight + s.weight_numel(), 0.0f);
  if (dbias) std::fill(dbias, dbias + s.Co, 0.0f);
  for (int64_t n0 = 0; n0 < s.N; n0 += per_chunk) {
    const int64_t n_img = std::min(per_chunk, s.N - n0), rows = n_img * pix;
    if (dweight) im2col(col.data(), in, s, n0, n_img);
    linear_backward(din ? dcol.data() : nullptr, dweight ? dw_part.data() : nullptr,
                    dbias ? db_part.data() : nullptr, dout + n0 * pix * s.Co,
                    dweight ? col.data() : nullptr, weight, rows, K, s.Co);
    if (din) col2im(din, dcol.data(), s, n0, n_img);
    for (size_t t = 0; t < dw_part.size(); ++t) dweight[t] += dw_part[t];
    for (size_t t = 0; t < db_part.size(); ++t) dbias[t] += db_part[t];
  }
}

}  // namespace cnx::blas
