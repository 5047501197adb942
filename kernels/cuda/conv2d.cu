// cnx::cuda::conv2d_forward / conv2d_backward (kernels/conv2d.h).
//
// groups == 1: im2col into the caller's workspace, then linear's GEMMs (kernels/cuda/linear.cu);
// backward's din goes through the column gradient and a col2im written as a gather.
// groups > 1: direct kernels, and a two-stage fixed-order reduction for dweight and dbias.
// One templated implementation for T = float and bf16: the kernels compute in fp32 and round
// each stored bf16 value once; im2col only moves values.
//
// Thread layout of the 2-D kernels (im2col, col2im, the grouped forward and din): blocks of
// (32, 8) threads; x runs over the contiguous inner dimension of one row (a window's columns,
// or the channels of a pixel) so that a warp reads and writes consecutive elements; y runs
// over rows (output or input pixels), 8 per block, the grid's y capped at 65535 and looped over.
// No thread shares an output element with another, and every sum has a fixed order, so the
// results are deterministic (and race-free) by construction.
#include <algorithm>
#include <cstdint>
#include <type_traits>

#include "kernels/conv2d.h"
#include "kernels/cuda/launch.cuh"
#include "kernels/cuda/reduce.cuh"
#include "kernels/cuda/vec.cuh"
#include "kernels/linear.h"
#include "tensor/cuda_check.h"

namespace cnx::cuda {

namespace {

using detail::from_float;
using detail::to_float;

constexpr int kTileX = 32, kTileY = 8;  // block (32, 8) of the 2-D kernels
constexpr int kThreads = kTileX * kTileY;

// The grid for `cols` x `rows` elements in blocks of (kTileX, kTileY); y capped at CUDA's limit
// (the kernels loop over the rest).
dim3 grid_2d(int64_t cols, int64_t rows) {
  const int64_t gx = (cols + kTileX - 1) / kTileX;
  const int64_t gy = std::clamp<int64_t>((rows + kTileY - 1) / kTileY, 1, detail::kMaxGridY);
  return dim3(static_cast<unsigned>(gx), static_cast<unsigned>(gy));
}

__device__ __forceinline__ int64_t first_row() {
  return static_cast<int64_t>(blockIdx.y) * kTileY + threadIdx.y;
}
__device__ __forceinline__ int64_t row_step() { return static_cast<int64_t>(gridDim.y) * kTileY; }

// Pixel r of an (N, rows_h, cols_w) grid as (n, y, x), in 32-bit arithmetic (a 64-bit division
// is a ~70-instruction routine on the GPU, and these run once per element): the launchers check
// that every pixel count fits (check_fits_32_bits).
struct Pixel {
  int64_t n, y, x;
};
__device__ __forceinline__ Pixel split_pixel(int64_t r, int64_t rows_h, int64_t cols_w) {
  const uint32_t ru = static_cast<uint32_t>(r), cw = static_cast<uint32_t>(cols_w),
                 rh = static_cast<uint32_t>(rows_h);
  const uint32_t t = ru / cw, n = t / rh;
  return {static_cast<int64_t>(n), static_cast<int64_t>(t - n * rh),
          static_cast<int64_t>(ru - t * cw)};
}

// The output index i whose window row p covers input row h (i * stride - padding + p == h), or
// -1 when there is none in [0, Ho).
__device__ __forceinline__ int64_t source_index(int64_t h, int64_t p, int64_t stride,
                                                int64_t padding, int64_t Ho) {
  const int64_t t = h + padding - p;
  if (t < 0 || t % stride != 0) return -1;
  const int64_t i = t / stride;
  return i < Ho ? i : -1;
}

// fp32 bias as the forward uses it: itself for f32, rounded to bf16 for bf16 activations (as the
// GEMM epilogue reads it, kernels/linear.h).
template <class T> __device__ __forceinline__ float bias_value(const float* bias, int64_t o) {
  return bias ? to_float(from_float<T>(bias[o])) : 0.0f;
}

// =============================================================================================
// groups == 1: im2col and col2im
// =============================================================================================

// col (rows, K = kh*kw*Ci): row r = (n, i, j), column (p, q, c) holds
// in[n, i*stride - padding + p, j*stride - padding + q, c], 0 outside the image.
template <class T>
__global__ void __launch_bounds__(kThreads)
    im2col_kernel(T* __restrict__ col, const T* __restrict__ in, Conv2dShape s) {
  const int64_t K = s.window(), kk = static_cast<int64_t>(blockIdx.x) * kTileX + threadIdx.x;
  if (kk >= K) return;  // no barriers below
  const int64_t c = kk % s.Ci, pq = kk / s.Ci, q = pq % s.kw, p = pq / s.kw;
  const int64_t Ho = s.Ho(), Wo = s.Wo(), rows = s.rows();
  for (int64_t r = first_row(); r < rows; r += row_step()) {
    const Pixel px = split_pixel(r, Ho, Wo);
    const int64_t n = px.n, i = px.y, j = px.x;
    const int64_t h = i * s.stride - s.padding + p, w = j * s.stride - s.padding + q;
    const bool inside = h >= 0 && h < s.H && w >= 0 && w < s.W;
    col[r * K + kk] = inside ? in[((n * s.H + h) * s.W + w) * s.Ci + c] : from_float<T>(0.0f);
  }
}

// din (N, H, W, Ci) from dcol (rows, K): a gather, each input element adding the column entries
// that read it in (p, q) order, in fp32, rounded once to T.
template <class T>
__global__ void __launch_bounds__(kThreads)
    col2im_kernel(T* __restrict__ din, const T* __restrict__ dcol, Conv2dShape s) {
  const int64_t c = static_cast<int64_t>(blockIdx.x) * kTileX + threadIdx.x;
  if (c >= s.Ci) return;
  const int64_t K = s.window(), Ho = s.Ho(), Wo = s.Wo(), pixels = s.N * s.H * s.W;
  for (int64_t x = first_row(); x < pixels; x += row_step()) {
    const Pixel px = split_pixel(x, s.H, s.W);
    const int64_t n = px.n, h = px.y, w = px.x;
    float acc = 0.0f;
    for (int64_t p = 0; p < s.kh; ++p) {
      const int64_t i = source_index(h, p, s.stride, s.padding, Ho);
      if (i < 0) continue;
      for (int64_t q = 0; q < s.kw; ++q) {
        const int64_t j = source_index(w, q, s.stride, s.padding, Wo);
        if (j < 0) continue;
        acc += to_float(dcol[((n * Ho + i) * Wo + j) * K + (p * s.kw + q) * s.Ci + c]);
      }
    }
    din[x * s.Ci + c] = from_float<T>(acc);
  }
}

// =============================================================================================
// groups > 1: direct kernels
// =============================================================================================

// out (rows, Co): thread (o, output pixel r), the sum in (p, q, c) order after the bias.
template <class T>
__global__ void __launch_bounds__(kThreads)
    grouped_forward_kernel(T* __restrict__ out, const T* __restrict__ in,
                           const T* __restrict__ weight, const float* __restrict__ bias,
                           Conv2dShape s) {
  const int64_t o = static_cast<int64_t>(blockIdx.x) * kTileX + threadIdx.x;
  if (o >= s.Co) return;
  const int64_t Cig = s.Cig(), g = o / s.Cog(), Ho = s.Ho(), Wo = s.Wo(), rows = s.rows();
  const T* w_o = weight + o * s.window();
  const float b = bias_value<T>(bias, o);
  for (int64_t r = first_row(); r < rows; r += row_step()) {
    const Pixel px = split_pixel(r, Ho, Wo);
    const int64_t n = px.n, i = px.y, j = px.x;
    float acc = b;
    for (int64_t p = 0; p < s.kh; ++p) {
      const int64_t h = i * s.stride - s.padding + p;
      if (h < 0 || h >= s.H) continue;
      for (int64_t q = 0; q < s.kw; ++q) {
        const int64_t w = j * s.stride - s.padding + q;
        if (w < 0 || w >= s.W) continue;
        const T* x = in + ((n * s.H + h) * s.W + w) * s.Ci + g * Cig;
        const T* wv = w_o + (p * s.kw + q) * Cig;
        for (int64_t c = 0; c < Cig; ++c) acc += to_float(x[c]) * to_float(wv[c]);
      }
    }
    out[r * s.Co + o] = from_float<T>(acc);
  }
}

// din (N, H, W, Ci): thread (channel c, input pixel), a gather over the (p, q) whose window
// covers the pixel, then the group's output channels in order.
template <class T>
__global__ void __launch_bounds__(kThreads)
    grouped_din_kernel(T* __restrict__ din, const T* __restrict__ dout,
                       const T* __restrict__ weight, Conv2dShape s) {
  const int64_t ch = static_cast<int64_t>(blockIdx.x) * kTileX + threadIdx.x;
  if (ch >= s.Ci) return;
  const int64_t Cig = s.Cig(), Cog = s.Cog(), g = ch / Cig, c = ch % Cig;
  const int64_t Ho = s.Ho(), Wo = s.Wo(), pixels = s.N * s.H * s.W;
  for (int64_t x = first_row(); x < pixels; x += row_step()) {
    const Pixel px = split_pixel(x, s.H, s.W);
    const int64_t n = px.n, h = px.y, w = px.x;
    float acc = 0.0f;
    for (int64_t p = 0; p < s.kh; ++p) {
      const int64_t i = source_index(h, p, s.stride, s.padding, Ho);
      if (i < 0) continue;
      for (int64_t q = 0; q < s.kw; ++q) {
        const int64_t j = source_index(w, q, s.stride, s.padding, Wo);
        if (j < 0) continue;
        const T* dy = dout + ((n * Ho + i) * Wo + j) * s.Co + g * Cog;
        const T* wv = weight + ((g * Cog * s.kh + p) * s.kw + q) * Cig + c;  // o = g Cog
        const int64_t w_step = s.window();                                   // to o + 1
        for (int64_t o = 0; o < Cog; ++o) acc += to_float(dy[o]) * to_float(wv[o * w_step]);
      }
    }
    din[x * s.Ci + ch] = from_float<T>(acc);
  }
}

// Stage 1 of dweight and dbias: partials (P, width), width = wcols + bcols, where the first
// wcols columns are the weight elements (o, p, q, c) (wcols = Co * window, or 0 when dweight is
// not wanted) and the next bcols the biases o (Co, or 0). Block (x, y) sums, for kThreads
// columns, the output pixels of partition y (rows_per rows in order) into partials[y, col].
template <class T>
__global__ void __launch_bounds__(kThreads)
    grouped_dparams_kernel(float* __restrict__ partials, const T* __restrict__ dout,
                           const T* __restrict__ in, Conv2dShape s, int64_t wcols, int64_t width,
                           int64_t rows_per) {
  const int64_t col = static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x;
  if (col >= width) return;
  const int64_t rows = s.rows(), r0 = static_cast<int64_t>(blockIdx.y) * rows_per;
  const int64_t r1 = r0 + rows_per < rows ? r0 + rows_per : rows;
  const int64_t Ho = s.Ho(), Wo = s.Wo();
  float acc = 0.0f;
  if (col >= wcols) {  // a bias
    const int64_t o = col - wcols;
    for (int64_t r = r0; r < r1; ++r) acc += to_float(dout[r * s.Co + o]);
  } else {
    const int64_t Cig = s.Cig(), window = s.window();
    const int64_t o = col / window, e = col % window, c = e % Cig, pq = e / Cig;
    const int64_t q = pq % s.kw, p = pq / s.kw, ch = (o / s.Cog()) * Cig + c;
    if (r0 < r1) {
      int64_t j = r0 % Wo, i = (r0 / Wo) % Ho, n = r0 / (Wo * Ho);
      for (int64_t r = r0; r < r1; ++r) {
        const int64_t h = i * s.stride - s.padding + p, w = j * s.stride - s.padding + q;
        if (h >= 0 && h < s.H && w >= 0 && w < s.W)
          acc += to_float(dout[r * s.Co + o]) * to_float(in[((n * s.H + h) * s.W + w) * s.Ci + ch]);
        if (++j == Wo) {
          j = 0;
          if (++i == Ho) i = 0, ++n;
        }
      }
    }
  }
  partials[static_cast<int64_t>(blockIdx.y) * width + col] = acc;
}

// =============================================================================================
// launchers
// =============================================================================================

// Workspace pieces start at multiples of 64 floats (256 bytes).
int64_t round_up_floats(int64_t floats) { return (floats + 63) / 64 * 64; }
int64_t elems_to_floats(int64_t elems, DType dtype) {
  return round_up_floats((elems * dtype_size(dtype) + 3) / 4);
}

template <class T>
DType dtype_of() {
  return std::is_same_v<T, float> ? DType::f32 : DType::bf16;
}

// The kernels split pixel indices in 32 bits (split_pixel): every pixel count must fit.
void check_fits_32_bits(const Conv2dShape& s) {
  constexpr int64_t kMax = int64_t{1} << 31;
  CNX_CHECK(s.rows() < kMax && s.N * s.H * s.W < kMax, "conv2d (CUDA): N ", s.N, " x ", s.H, "x",
            s.W, " -> ", s.Ho(), "x", s.Wo(), " has 2^31 pixels or more (the kernels index pixels in 32 bits)");
}

template <class T>
void im2col(T* col, const T* in, const Conv2dShape& s, cudaStream_t stream) {
  if (s.rows() == 0 || s.window() == 0) return;
  launch<im2col_kernel<detail::device_t<T>>>(grid_2d(s.window(), s.rows()), dim3(kTileX, kTileY),
                                             0, stream, detail::dev(col), detail::dev(in), s);
  CNX_CUDA_LAUNCH_CHECK();
}

// T is float or cnx::bf16 (the launchers' types); the kernels get detail::dev pointers.
template <class T>
void forward(T* out, const T* in, const T* weight, const float* bias, const Conv2dShape& s,
             float* workspace, cudaStream_t stream) {
  if (s.out_numel() == 0) return;
  check_fits_32_bits(s);
  if (s.groups == 1) {
    if (s.is_pointwise()) return linear_forward(out, in, weight, bias, s.rows(), s.Ci, s.Co, stream);
    T* col = reinterpret_cast<T*>(workspace);
    im2col(col, in, s, stream);
    return linear_forward(out, col, weight, bias, s.rows(), s.window(), s.Co, stream);
  }
  launch<grouped_forward_kernel<detail::device_t<T>>>(
      grid_2d(s.Co, s.rows()), dim3(kTileX, kTileY), 0, stream, detail::dev(out), detail::dev(in),
      detail::dev(weight), bias, s);
  CNX_CUDA_LAUNCH_CHECK();
}

template <class T>
void backward(T* din, float* dweight, float* dbias, const T* dout, const T* in, const T* weight,
              const Conv2dShape& s, float* workspace, cudaStream_t stream) {
  check_fits_32_bits(s);
  if (s.groups == 1) {
    if (s.is_pointwise())
      return linear_backward(din, dweight, dbias, dout, in, weight, s.rows(), s.Ci, s.Co, stream);
    // col (for dweight) then dcol (for din), each from a 256-byte boundary of the workspace.
    const int64_t col_floats = elems_to_floats(s.rows() * s.window(), dtype_of<T>());
    T* col = dweight ? reinterpret_cast<T*>(workspace) : nullptr;
    T* dcol = din ? reinterpret_cast<T*>(workspace + (dweight ? col_floats : 0)) : nullptr;
    if (dweight) im2col(col, in, s, stream);
    if (din || dweight || dbias)
      linear_backward(dcol, dweight, dbias, dout, col, weight, s.rows(), s.window(), s.Co, stream);
    if (din && s.in_numel() > 0) {
      launch<col2im_kernel<detail::device_t<T>>>(grid_2d(s.Ci, s.N * s.H * s.W),
                                                 dim3(kTileX, kTileY), 0, stream, detail::dev(din),
                                                 detail::dev(static_cast<const T*>(dcol)), s);
      CNX_CUDA_LAUNCH_CHECK();
    }
    return;
  }
  if (din && s.in_numel() > 0) {
    launch<grouped_din_kernel<detail::device_t<T>>>(
        grid_2d(s.Ci, s.N * s.H * s.W), dim3(kTileX, kTileY), 0, stream, detail::dev(din),
        detail::dev(dout), detail::dev(weight), s);
    CNX_CUDA_LAUNCH_CHECK();
  }
  const int64_t wcols = dweight ? s.weight_numel() : 0, bcols = dbias ? s.Co : 0;
  const int64_t width = wcols + bcols;
  if (width == 0) return;
  const int64_t P = detail::row_partitions(s.rows()), rows_per = detail::rows_per_partition(s.rows());
  launch<grouped_dparams_kernel<detail::device_t<T>>>(
      dim3(static_cast<unsigned>((width + kThreads - 1) / kThreads), static_cast<unsigned>(P)),
      dim3(kThreads), 0, stream, workspace, detail::dev(dout), detail::dev(in), s, wcols, width,
      rows_per);
  CNX_CUDA_LAUNCH_CHECK();
  // Column j < wcols is dweight[j], the rest dbias[j - wcols] (out_a is null when wcols is 0,
  // and then no column is below the split).
  detail::launch_column_sums(dweight, dbias, workspace, P, width, wcols, stream);
}

}  // namespace

// =============================================================================================
// public entry points
// =============================================================================================

int64_t conv2d_forward_workspace_floats(DType dtype, const Conv2dShape& s) {
  if (s.groups != 1 || s.is_pointwise() || s.out_numel() == 0) return 0;
  return elems_to_floats(s.rows() * s.window(), dtype);
}

int64_t conv2d_backward_workspace_floats(DType dtype, const Conv2dShape& s, bool want_din,
                                         bool want_dweight, bool want_dbias) {
  if (s.groups == 1) {
    if (s.is_pointwise()) return 0;
    const int64_t col = elems_to_floats(s.rows() * s.window(), dtype);
    return (want_dweight ? col : 0) + (want_din ? col : 0);
  }
  const int64_t width = (want_dweight ? s.weight_numel() : 0) + (want_dbias ? s.Co : 0);
  if (width == 0) return 0;
  return detail::row_partitions(s.rows()) * width;
}

void conv2d_forward(float* out, const float* in, const float* weight, const float* bias,
                    const Conv2dShape& s, float* workspace, cudaStream_t stream) {
  forward(out, in, weight, bias, s, workspace, stream);
}
void conv2d_forward(bf16* out, const bf16* in, const bf16* weight, const float* bias,
                    const Conv2dShape& s, float* workspace, cudaStream_t stream) {
  forward(out, in, weight, bias, s, workspace, stream);
}
void conv2d_backward(float* din, float* dweight, float* dbias, const float* dout, const float* in,
                     const float* weight, const Conv2dShape& s, float* workspace,
                     cudaStream_t stream) {
  backward(din, dweight, dbias, dout, in, weight, s, workspace, stream);
}
void conv2d_backward(bf16* din, float* dweight, float* dbias, const bf16* dout, const bf16* in,
                     const bf16* weight, const Conv2dShape& s, float* workspace,
                     cudaStream_t stream) {
  backward(din, dweight, dbias, dout, in, weight, s, workspace, stream);
}

}  // namespace cnx::cuda
