// CUDA layer scale (see kernels/layer_scale.h):
//
//   out[r, c] = in[r, c] * gamma[c]
//   din[r, c] = dout[r, c] * gamma[c],   dgamma[c] = sum_r dout[r, c] * in[r, c]
//
// Forward, and backward without dgamma: one grid-stride loop over the rows * C elements, 256
// threads a block, one wave of resident blocks (vec.cuh); the channel of each element from a
// DivWalk (no 64-bit division per element). Groups of four elements (float4 arithmetic; for
// bf16 activations, 8-byte loads widened to fp32) when C % 4 == 0 and every pointer is 16-byte
// aligned (then a group of four never leaves its row and gamma + c is aligned too), one element
// a step otherwise. One correctly rounded multiply (then, for bf16, one rounding to bf16):
// bitwise the CPU reference.
//
// T is the activation storage type (float or __nv_bfloat16); gamma, dgamma and the partials are
// fp32 either way.
//
// Backward with dgamma, two stages (deterministic, no atomics; see kernels/cuda/reduce.cuh):
//  1. grid (P, column tiles), P = detail::row_partitions(rows) blocks of consecutive rows.
//     Block (p, t) walks its rows with `lanes` rows at a time and `tile` column units side by
//     side (detail::column_tiling), writes din = dout * gamma as it goes, and accumulates
//     dout * in per column in registers; the lanes' sums are then added in lane order through
//     shared memory into partials[p, c] (the workspace, (P, C) row-major). dout and in are read
//     once, din written once: the three streams of the elementwise kernel.
//  2. detail::launch_column_sums: dgamma[c] = sum_p partials[p, c] in a fixed order, the rows
//     split across blocks (groups of 64 rows, then the group sums; see reduce.cuh).
//
// The fused layer scale + drop path + residual add (kernels/scaled_residual.h) lives here too:
// its forward is an elementwise kernel of the same shape as the forward above (plus x and the
// per-sample scale), and its backward is stage 1 above with dout multiplied by the sample's
// drop-path scale first (rows of dropped samples skipped), then the same stage 2.
#include <cuda_runtime.h>

#include "kernels/cuda/launch.cuh"
#include "kernels/cuda/reduce.cuh"
#include "kernels/cuda/vec.cuh"
#include "kernels/layer_scale.h"
#include "kernels/scaled_residual.h"
#include "tensor/cuda_check.h"

namespace cnx::cuda {

namespace {

using detail::DivWalk;
using detail::load4;
using detail::store4;

__device__ __forceinline__ float4 mul4(float4 a, float4 b) {
  return make_float4(a.x * b.x, a.y * b.y, a.z * b.z, a.w * b.w);
}

// out, in (rows, C) as n = rows * C elements of T; gamma (C) fp32.
template <bool kVec, class T>
__global__ void __launch_bounds__(detail::kBlockThreads)
    layer_scale_forward_kernel(T* __restrict__ out, const T* __restrict__ in,
                               const float* __restrict__ gamma, int64_t n, int64_t C) {
  const int64_t first = detail::global_thread(), stride = detail::grid_threads();
  if constexpr (kVec) {
    const int64_t n4 = n / 4;
    DivWalk channel(4 * first, 4 * stride, C);  // channel.r: the channel of element 4 i
    for (int64_t i = first; i < n4; i += stride, channel.advance())
      detail::store4f(out + 4 * i, mul4(detail::load4f(in + 4 * i), load4(gamma + channel.r)));
  } else {
    DivWalk channel(first, stride, C);
    for (int64_t i = first; i < n; i += stride, channel.advance())
      out[i] = detail::from_float<T>(detail::to_float(in[i]) * gamma[channel.r]);
  }
}

template <class T>
void launch_forward(T* out, const T* in, const float* gamma, int64_t rows, int64_t C,
                    cudaStream_t stream) {
  const int64_t n = rows * C;
  if (n <= 0) return;
  if (C % 4 == 0 && detail::all_aligned16(out, in, gamma)) {
    const unsigned grid =
        detail::wave_grid<layer_scale_forward_kernel<true, T>, detail::kBlockThreads>(n / 4);
    launch<layer_scale_forward_kernel<true, T>>(grid, detail::kBlockThreads, 0, stream, out, in,
                                                gamma, n, C);
  } else {
    const unsigned grid =
        detail::wave_grid<layer_scale_forward_kernel<false, T>, detail::kBlockThreads>(n);
    launch<layer_scale_forward_kernel<false, T>>(grid, detail::kBlockThreads, 0, stream, out, in,
                                                 gamma, n, C);
  }
  CNX_CUDA_LAUNCH_CHECK();
}

// The unit of the column kernel: four channels in a float4 (kVec) or one in a float. X is the
// storage type of the activations (float or __nv_bfloat16); gamma and the sums are fp32.
template <bool kVec> struct Unit;
template <> struct Unit<true> {
  using V = float4;
  static constexpr int kWidth = 4;
  template <class X> __device__ static V load(const X* p) { return detail::load4f(p); }
  template <class X> __device__ static void store(X* p, V v) { detail::store4f(p, v); }
  __device__ static V zero() { return make_float4(0.f, 0.f, 0.f, 0.f); }
  __device__ static V splat(float s) { return make_float4(s, s, s, s); }
  __device__ static V mul(V a, V b) { return mul4(a, b); }
  __device__ static V add(V a, V b) {
    return make_float4(a.x + b.x, a.y + b.y, a.z + b.z, a.w + b.w);
  }
};
template <> struct Unit<false> {
  using V = float;
  static constexpr int kWidth = 1;
  template <class X> __device__ static V load(const X* p) { return detail::to_float(*p); }
  template <class X> __device__ static void store(X* p, V v) { *p = detail::from_float<X>(v); }
  __device__ static V zero() { return 0.f; }
  __device__ static V splat(float s) { return s; }
  __device__ static V mul(V a, V b) { return a * b; }
  __device__ static V add(V a, V b) { return a + b; }
};

// Stage 1 of the backward with dgamma (see the top of the file). din (rows, C) or null;
// partials (P, C) or null (din only); dout, in (rows, C); gamma (C) or null (= 1). Block (p, t):
// rows [p * rows_per_block, min(rows, (p + 1) * rows_per_block)), column units
// [t * tile, t * tile + tile) for t = blockIdx.y, blockIdx.y + gridDim.y, ...
// scale (rows / rows_per_sample), or null: the fused op's drop-path multipliers
// (kernels/scaled_residual.h): dout is first multiplied by the scale of its row's sample, and a
// row of a dropped sample (scale 0) writes din = 0 and adds nothing, without reading `in`.
template <bool kVec, class X>
__global__ void __launch_bounds__(detail::kBlockThreads)
    layer_scale_backward_kernel(X* __restrict__ din, float* __restrict__ partials,
                                const X* __restrict__ dout, const X* __restrict__ in,
                                const float* __restrict__ gamma, const float* __restrict__ scale,
                                int64_t rows_per_sample, int64_t rows, int64_t C,
                                int64_t rows_per_block, int tile, int lanes, int64_t tiles) {
  using U = Unit<kVec>;
  using T = typename U::V;
  __shared__ T lane_sums[detail::kBlockThreads];
  const int64_t units = C / U::kWidth;
  const int64_t p = blockIdx.x;
  const int64_t r_begin = p * rows_per_block;
  const int64_t r_end = r_begin + rows_per_block < rows ? r_begin + rows_per_block : rows;
  const int u_local = threadIdx.x % tile, lane = threadIdx.x / tile;
  for (int64_t t = blockIdx.y; t < tiles; t += gridDim.y) {  // uniform over the block
    const int64_t unit = t * tile + u_local;
    const int64_t c = unit * U::kWidth;  // first channel of this thread's unit
    const bool active = lane < lanes && unit < units;
    T acc = U::zero();
    if (active) {
      const T g = gamma ? U::load(gamma + c) : U::splat(1.0f);
      // sample.q: the sample of row r (a DivWalk: no 64-bit division per row).
      detail::DivWalk sample(r_begin + lane, lanes, rows_per_sample);
      for (int64_t r = r_begin + lane; r < r_end; r += lanes, sample.advance()) {
        T dy = U::load(dout + r * C + c);
        if (scale) {
          const float s = __ldg(scale + sample.q);
          if (s == 0.0f) {  // a dropped sample
            if (din) U::store(din + r * C + c, U::zero());
            continue;
          }
          dy = U::mul(dy, U::splat(s));
        }
        if (din) U::store(din + r * C + c, gamma ? U::mul(dy, g) : dy);
        if (partials) acc = U::add(acc, U::mul(dy, U::load(in + r * C + c)));
      }
    }
    if (!partials) continue;  // uniform over the block: din only
    lane_sums[threadIdx.x] = acc;
    __syncthreads();
    if (lane == 0 && unit < units) {  // lanes added in order 0, 1, ...: deterministic
      T total = lane_sums[u_local];
      for (int l = 1; l < lanes; ++l) total = U::add(total, lane_sums[l * tile + u_local]);
      U::store(partials + p * C + c, total);
    }
    __syncthreads();  // lane_sums is rewritten by the next tile
  }
}

// Launches stage 1 (layer_scale_backward_kernel) over rows x C: float4 units when C % 4 == 0
// and every pointer is 16-byte aligned, single channels otherwise.
template <class X>
void launch_backward(X* din, float* partials, const X* dout, const X* in, const float* gamma,
                     const float* scale, int64_t rows_per_sample, int64_t rows, int64_t C,
                     cudaStream_t stream) {
  const int64_t P = detail::row_partitions(rows);
  const int64_t rows_per_block = detail::rows_per_partition(rows);
  const bool vec = C % 4 == 0 && detail::all_aligned16(din, dout, in, gamma, partials);
  const detail::ColumnTiling ct = detail::column_tiling(vec ? C / 4 : C);
  const dim3 grid(static_cast<unsigned>(P),
                  static_cast<unsigned>(std::min<int64_t>(ct.tiles, detail::kMaxGridY)));
  if (vec)
    launch<layer_scale_backward_kernel<true, X>>(
        grid, detail::kBlockThreads, 0, stream, din, partials, dout, in, gamma, scale,
        rows_per_sample, rows, C, rows_per_block, ct.tile, ct.lanes, ct.tiles);
  else
    launch<layer_scale_backward_kernel<false, X>>(
        grid, detail::kBlockThreads, 0, stream, din, partials, dout, in, gamma, scale,
        rows_per_sample, rows, C, rows_per_block, ct.tile, ct.lanes, ct.tiles);
  CNX_CUDA_LAUNCH_CHECK();
}

// ---- the fused layer scale + drop path + residual add (kernels/scaled_residual.h) ----------

// out = x + (h * gamma[c]) * scale[n] over n = N * per_sample elements; gamma and scale may be
// null (1). The products in fp32, rounded as the unfused f32 ops round them; one rounding to T
// at the end. Channel and sample of each element by DivWalks; a dropped sample's h is not read.
template <bool kVec, class T>
__global__ void __launch_bounds__(detail::kBlockThreads)
    scaled_residual_forward_kernel(T* __restrict__ out, const T* __restrict__ x,
                                   const T* __restrict__ h, const float* __restrict__ gamma,
                                   const float* __restrict__ scale, int64_t n, int64_t C,
                                   int64_t per_sample) {
  const int64_t first = detail::global_thread(), stride = detail::grid_threads();
  if constexpr (kVec) {
    const int64_t n4 = n / 4;
    DivWalk channel(4 * first, 4 * stride, C), sample(4 * first, 4 * stride, per_sample);
    for (int64_t i = first; i < n4; i += stride, channel.advance(), sample.advance()) {
      const float s = scale ? __ldg(scale + sample.q) : 1.0f;
      float4 v = detail::load4f(x + 4 * i);
      if (s != 0.0f) {
        float4 b = detail::load4f(h + 4 * i);
        if (gamma) b = mul4(b, load4(gamma + channel.r));
        if (scale) b = mul4(b, detail::make4(s));
        v = make_float4(v.x + b.x, v.y + b.y, v.z + b.z, v.w + b.w);
      }
      detail::store4f(out + 4 * i, v);
    }
  } else {
    DivWalk channel(first, stride, C), sample(first, stride, per_sample);
    for (int64_t i = first; i < n; i += stride, channel.advance(), sample.advance()) {
      const float s = scale ? __ldg(scale + sample.q) : 1.0f;
      float v = detail::to_float(x[i]);
      if (s != 0.0f) {
        float b = detail::to_float(h[i]);
        if (gamma) b *= gamma[channel.r];
        if (scale) b *= s;
        v += b;
      }
      out[i] = detail::from_float<T>(v);
    }
  }
}

}  // namespace

// ================================ forward ================================
template <class T>
void layer_scale_forward(T* out, const T* in, const float* gamma, int64_t rows, int64_t C,
                         cudaStream_t stream) {
  launch_forward(detail::dev(out), detail::dev(in), gamma, rows, C, stream);
}

// ================================ backward ================================
int64_t layer_scale_backward_workspace_floats(int64_t rows, int64_t C) {
  if (rows <= 0 || C <= 0) return 0;
  return detail::row_partitions(rows) * C;
}

template <class T>
void layer_scale_backward(T* din_, float* dgamma, const T* dout_, const T* in_,
                          const float* gamma, int64_t rows, int64_t C, float* workspace,
                          cudaStream_t stream) {
  auto* din = detail::dev(din_);
  const auto* dout = detail::dev(dout_);
  const auto* in = detail::dev(in_);
  if (C <= 0) return;
  if (!dgamma) {
    if (din) launch_forward(din, dout, gamma, rows, C, stream);  // din = dout * gamma
    return;
  }
  if (rows <= 0) {  // a sum over no rows
    CNX_CUDA_CHECK(cudaMemsetAsync(dgamma, 0, static_cast<size_t>(C) * sizeof(float), stream));
    return;
  }
  const int64_t P = detail::row_partitions(rows);
  launch_backward(din, workspace, dout, in, gamma, nullptr, 1, rows, C, stream);
  detail::launch_column_sums(dgamma, nullptr, workspace, P, C, C, stream);
}

// ======================= fused layer scale + drop path + residual =======================
template <class T>
void scaled_residual_forward(T* out_, const T* x_, const T* h_, const float* gamma,
                             const float* scale, int64_t N, int64_t P, int64_t C,
                             cudaStream_t stream) {
  auto* out = detail::dev(out_);
  const auto* x = detail::dev(x_);
  const auto* h = detail::dev(h_);
  using D = std::remove_const_t<std::remove_pointer_t<decltype(out)>>;
  const int64_t n = N * P * C;
  if (n <= 0) return;
  if (C % 4 == 0 && detail::all_aligned16(out, x, h, gamma)) {
    const unsigned grid =
        detail::wave_grid<scaled_residual_forward_kernel<true, D>, detail::kBlockThreads>(n / 4);
    launch<scaled_residual_forward_kernel<true, D>>(grid, detail::kBlockThreads, 0, stream, out, x,
                                                    h, gamma, scale, n, C, P * C);
  } else {
    const unsigned grid =
        detail::wave_grid<scaled_residual_forward_kernel<false, D>, detail::kBlockThreads>(n);
    launch<scaled_residual_forward_kernel<false, D>>(grid, detail::kBlockThreads, 0, stream, out,
                                                     x, h, gamma, scale, n, C, P * C);
  }
  CNX_CUDA_LAUNCH_CHECK();
}

template <class T>
void scaled_residual_backward(T* dh_, float* dgamma, const T* dout_, const T* h_,
                              const float* gamma, const float* scale, int64_t N, int64_t P,
                              int64_t C, float* workspace, cudaStream_t stream) {
  auto* dh = detail::dev(dh_);
  const auto* dout = detail::dev(dout_);
  const auto* h = detail::dev(h_);
  const int64_t rows = N * P;
  if (C <= 0 || (!dh && !dgamma)) return;
  if (rows <= 0) {
    if (dgamma)
      CNX_CUDA_CHECK(cudaMemsetAsync(dgamma, 0, static_cast<size_t>(C) * sizeof(float), stream));
    return;
  }
  // Stage 1 writes dh as it goes and, for dgamma, the per-block partial sums.
  launch_backward(dh, dgamma ? workspace : nullptr, dout, h, gamma, scale, P, rows, C, stream);
  if (dgamma)
    detail::launch_column_sums(dgamma, nullptr, workspace, detail::row_partitions(rows), C, C,
                               stream);
}

#define CNX_INSTANTIATE(T)                                                                    \
  template void layer_scale_forward<T>(T*, const T*, const float*, int64_t, int64_t,          \
                                       cudaStream_t);                                         \
  template void layer_scale_backward<T>(T*, float*, const T*, const T*, const float*, int64_t, \
                                        int64_t, float*, cudaStream_t);
CNX_INSTANTIATE(float)
CNX_INSTANTIATE(bf16)
#undef CNX_INSTANTIATE

#define CNX_INSTANTIATE(T)                                                                     \
  template void scaled_residual_forward<T>(T*, const T*, const T*, const float*, const float*, \
                                           int64_t, int64_t, int64_t, cudaStream_t);           \
  template void scaled_residual_backward<T>(T*, float*, const T*, const T*, const float*,      \
                                            const float*, int64_t, int64_t, int64_t, float*,   \
                                            cudaStream_t);
CNX_INSTANTIATE(float)
CNX_INSTANTIATE(bf16)
#undef CNX_INSTANTIATE

}  // namespace cnx::cuda
