// CUDA 2-D max pooling (see kernels/maxpool.h for the math, the tie and NaN rules and the
// argmax encoding):
//
//   out[n, oh, ow, c] = in[n, h0 + a / k, w0 + a % k, c],  a = argmax[n, oh, ow, c], the first
//                       cell (row-major) of the window with the largest value (the last NaN
//                       if there is one), h0 = oh s - p, w0 = ow s - p
//   din[n, h, w, c]   = sum of dout[n, oh, ow, c] over the windows holding (h, w) whose argmax
//                       is (h, w), in increasing (oh, ow) order
//
// Forward: one thread per output unit (n, oh, ow, V consecutive channels), a grid-stride loop
// over them, 256 threads a block, one wave of resident blocks (detail::wave_grid). The thread
// walks its window's cells inside the image in row-major order keeping, per channel, the best
// element (raw, compared in fp32) and its cell, and stores that element (bit for bit the CPU's)
// and the argmax. Consecutive threads take consecutive channel units of one pixel, so every
// load is coalesced along C.
// Backward: a gather, one thread per input unit (n, h, w, V channels): it visits the outputs
// whose windows hold (h, w) (at most ceil(k / s)^2 of them; their range from 32-bit divisions),
// in increasing (oh, ow) order, and adds the dout of those whose argmax names (h, w) in fp32;
// one store per element, no atomics, deterministic, and bitwise the CPU's scatter (the same
// additions in the same order).
// V = 4 floats or 8 bf16 (16-byte loads and stores, int32 argmax in 16-byte pieces) when
// C % V == 0 and every pointer is 16-byte aligned, else V = 1. The unit -> (n, row, col, c)
// decomposition is three detail::DivWalks (no 64-bit division per step).
#include <cuda_runtime.h>

#include <cmath>
#include <cstdint>

#include "kernels/cuda/launch.cuh"
#include "kernels/cuda/vec.cuh"
#include "kernels/maxpool.h"
#include "tensor/cuda_check.h"

namespace cnx::cuda {

namespace {

using detail::DivWalk;
using detail::from_float;
using detail::to_float;

// V consecutive elements of T, loaded and stored as one access (16 bytes when V > 1).
template <class T, int V> struct alignas(sizeof(T) * V) Lanes {
  T v[V];
};
// V consecutive argmax entries: 16-byte aligned pieces when V >= 4 (32 bytes for bf16's V = 8,
// two 16-byte accesses), one int32 when V == 1.
template <int V> struct alignas(V >= 4 ? 16 : 4 * V) Indices {
  int32_t v[V];
};

// The pooling geometry, passed to the kernels by value.
struct Geometry {
  int64_t N, H, W, C, Ho, Wo, k, stride, padding;
};

// Splits unit i of a (N, rows, cols, C / V) array into n, row, col and channel unit, walking
// along a grid-stride loop: three divisions when constructed, adds and compares per step.
struct UnitWalk {
  DivWalk by_units, by_cols, by_rows;  // divisors: CV, CV cols, CV cols rows
  int64_t cols, rows;
  __device__ UnitWalk(int64_t start, int64_t step, int64_t CV, int64_t rows_, int64_t cols_)
      : by_units(start, step, CV), by_cols(start, step, CV * cols_),
        by_rows(start, step, CV * cols_ * rows_), cols(cols_), rows(rows_) {}
  __device__ void advance() {
    by_units.advance();
    by_cols.advance();
    by_rows.advance();
  }
  __device__ int64_t unit() const { return by_units.r; }                        // c / V
  __device__ int64_t col() const { return by_units.q - by_cols.q * cols; }      // ow or w
  __device__ int64_t row() const { return by_cols.q - by_rows.q * rows; }       // oh or h
  __device__ int64_t n() const { return by_rows.q; }
};

// ---- forward ----
// out, argmax (N, Ho, Wo, C); in (N, H, W, C). argmax may be null. T float or __nv_bfloat16.
template <int V, class T>
__global__ void __launch_bounds__(detail::kBlockThreads)
    maxpool_forward_kernel(T* __restrict__ out, int32_t* __restrict__ argmax,
                           const T* __restrict__ in, Geometry g) {
  const int64_t CV = g.C / V, units = g.N * g.Ho * g.Wo * CV;
  const int64_t first = detail::global_thread(), stride = detail::grid_threads();
  UnitWalk at(first, stride, CV, g.Ho, g.Wo);
  for (int64_t i = first; i < units; i += stride, at.advance()) {
    const int64_t n = at.n(), oh = at.row(), ow = at.col(), c = at.unit() * V;
    const int64_t h0 = oh * g.stride - g.padding, w0 = ow * g.stride - g.padding;
    const int64_t hs = h0 > 0 ? h0 : 0, he = h0 + g.k < g.H ? h0 + g.k : g.H;
    const int64_t ws = w0 > 0 ? w0 : 0, we = w0 + g.k < g.W ? w0 + g.k : g.W;
    // The best element so far, raw (compared in fp32: exact for bf16, and keeping no fp32 copy
    // saves V registers), and its cell.
    Lanes<T, V> win;
    Indices<V> arg;
#pragma unroll
    for (int j = 0; j < V; ++j) {
      win.v[j] = from_float<T>(-INFINITY);  // exact (a window of -infs outputs -inf)
      arg.v[j] = static_cast<int32_t>((hs - h0) * g.k + (ws - w0));
    }
    for (int64_t h = hs; h < he; ++h) {
      const T* x = in + ((n * g.H + h) * g.W) * g.C + c;
      for (int64_t w = ws; w < we; ++w) {
        const Lanes<T, V> v = *reinterpret_cast<const Lanes<T, V>*>(x + w * g.C);
        const auto cell = static_cast<int32_t>((h - h0) * g.k + (w - w0));
#pragma unroll
        for (int j = 0; j < V; ++j) {
          const float f = to_float(v.v[j]);
          if (f > to_float(win.v[j]) || f != f) {  // f != f: NaN (PyTorch's isnan) wins
            win.v[j] = v.v[j];
            arg.v[j] = cell;
          }
        }
      }
    }
    const int64_t o = ((n * g.Ho + oh) * g.Wo + ow) * g.C + c;
    *reinterpret_cast<Lanes<T, V>*>(out + o) = win;
    if (argmax) *reinterpret_cast<Indices<V>*>(argmax + o) = arg;
  }
}

// ---- backward ----
// din (N, H, W, C); dout, argmax (N, Ho, Wo, C). T float or __nv_bfloat16.
template <int V, class T>
__global__ void __launch_bounds__(detail::kBlockThreads)
    maxpool_backward_kernel(T* __restrict__ din, const T* __restrict__ dout,
                            const int32_t* __restrict__ argmax, Geometry g) {
  const int64_t CV = g.C / V, units = g.N * g.H * g.W * CV;
  const int64_t first = detail::global_thread(), stride = detail::grid_threads();
  UnitWalk at(first, stride, CV, g.H, g.W);
  for (int64_t i = first; i < units; i += stride, at.advance()) {
    const int64_t n = at.n(), h = at.row(), w = at.col(), c = at.unit() * V;
    // Windows holding row h: oh s - p <= h <= oh s - p + k - 1, 0 <= oh < Ho. In 32-bit
    // unsigned arithmetic (H + 2p, W + 2p < 2^31, checked by the op): a 64-bit division is a
    // long software routine on the GPU, four of them per element would dominate this kernel.
    const auto hp = static_cast<uint32_t>(h + g.padding), wp = static_cast<uint32_t>(w + g.padding);
    const auto k = static_cast<uint32_t>(g.k), s = static_cast<uint32_t>(g.stride);
    const int64_t oh_lo = hp + 1 > k ? (hp + s - k) / s : 0;
    const int64_t ow_lo = wp + 1 > k ? (wp + s - k) / s : 0;
    const int64_t oh_hi = hp / s < g.Ho - 1 ? hp / s : g.Ho - 1;
    const int64_t ow_hi = wp / s < g.Wo - 1 ? wp / s : g.Wo - 1;
    float acc[V];
#pragma unroll
    for (int j = 0; j < V; ++j) acc[j] = 0.0f;
    for (int64_t oh = oh_lo; oh <= oh_hi; ++oh)
      for (int64_t ow = ow_lo; ow <= ow_hi; ++ow) {
        const int64_t o = ((n * g.Ho + oh) * g.Wo + ow) * g.C + c;
        const auto cell = static_cast<int32_t>((hp - oh * g.stride) * g.k + (wp - ow * g.stride));
        const Indices<V> a = *reinterpret_cast<const Indices<V>*>(argmax + o);
        const Lanes<T, V> d = *reinterpret_cast<const Lanes<T, V>*>(dout + o);
#pragma unroll
        for (int j = 0; j < V; ++j)
          if (a.v[j] == cell) acc[j] += to_float(d.v[j]);
      }
    Lanes<T, V> r;
#pragma unroll
    for (int j = 0; j < V; ++j) r.v[j] = from_float<T>(acc[j]);
    *reinterpret_cast<Lanes<T, V>*>(din + ((n * g.H + h) * g.W + w) * g.C + c) = r;
  }
}

// The vector width for C channels and these pointers: 16 bytes of T, or 1.
template <class T, class... P> int lanes_for(int64_t C, const P*... p) {
  constexpr int kV = static_cast<int>(16 / sizeof(T));
  return C % kV == 0 && detail::all_aligned16(p...) ? kV : 1;
}

}  // namespace

// ================================ forward ================================
template <class T>
void maxpool2d_forward(T* out, int32_t* argmax, const T* in, int64_t N, int64_t H, int64_t W,
                       int64_t C, int64_t k, int64_t stride, int64_t padding,
                       cudaStream_t stream) {
  const Geometry g{N, H, W, C, maxpool2d_out_size(H, k, stride, padding),
                   maxpool2d_out_size(W, k, stride, padding), k, stride, padding};
  if (N <= 0 || C <= 0 || g.Ho <= 0 || g.Wo <= 0) return;
  using D = detail::device_t<T>;
  constexpr int kV = static_cast<int>(16 / sizeof(T));
  auto* o = detail::dev(out);
  const auto* x = detail::dev(in);
  const int64_t pixels = N * g.Ho * g.Wo;
  if (lanes_for<T>(C, out, argmax, in) == kV) {
    const unsigned grid =
        detail::wave_grid<maxpool_forward_kernel<kV, D>, detail::kBlockThreads>(pixels * (C / kV));
    launch<maxpool_forward_kernel<kV, D>>(grid, detail::kBlockThreads, 0, stream, o, argmax, x, g);
  } else {
    const unsigned grid =
        detail::wave_grid<maxpool_forward_kernel<1, D>, detail::kBlockThreads>(pixels * C);
    launch<maxpool_forward_kernel<1, D>>(grid, detail::kBlockThreads, 0, stream, o, argmax, x, g);
  }
  CNX_CUDA_LAUNCH_CHECK();
}

// ================================ backward ================================
template <class T>
void maxpool2d_backward(T* din, const T* dout, const int32_t* argmax, int64_t N, int64_t H,
                        int64_t W, int64_t C, int64_t k, int64_t stride, int64_t padding,
                        cudaStream_t stream) {
  const Geometry g{N, H, W, C, maxpool2d_out_size(H, k, stride, padding),
                   maxpool2d_out_size(W, k, stride, padding), k, stride, padding};
  if (N <= 0 || C <= 0 || H <= 0 || W <= 0) return;  // Ho, Wo < 1: din is all zeros
  using D = detail::device_t<T>;
  constexpr int kV = static_cast<int>(16 / sizeof(T));
  auto* dx = detail::dev(din);
  const auto* dy = detail::dev(dout);
  const int64_t pixels = N * H * W;
  if (lanes_for<T>(C, din, dout, argmax) == kV) {
    const unsigned grid =
        detail::wave_grid<maxpool_backward_kernel<kV, D>, detail::kBlockThreads>(pixels * (C / kV));
    launch<maxpool_backward_kernel<kV, D>>(grid, detail::kBlockThreads, 0, stream, dx, dy, argmax,
                                           g);
  } else {
    const unsigned grid =
        detail::wave_grid<maxpool_backward_kernel<1, D>, detail::kBlockThreads>(pixels * C);
    launch<maxpool_backward_kernel<1, D>>(grid, detail::kBlockThreads, 0, stream, dx, dy, argmax,
                                          g);
  }
  CNX_CUDA_LAUNCH_CHECK();
}

#define CNX_INSTANTIATE(T)                                                                      \
  template void maxpool2d_forward<T>(T*, int32_t*, const T*, int64_t, int64_t, int64_t,        \
                                     int64_t, int64_t, int64_t, int64_t, cudaStream_t);         \
  template void maxpool2d_backward<T>(T*, const T*, const int32_t*, int64_t, int64_t, int64_t,  \
                                      int64_t, int64_t, int64_t, int64_t, cudaStream_t);
CNX_INSTANTIATE(float)
CNX_INSTANTIATE(bf16)
#undef CNX_INSTANTIATE

}  // namespace cnx::cuda
