// CUDA LayerNorm over the channel (last) dimension of `rows` rows of C values (see
// kernels/layernorm.h for the math):
//
//   mean = sum_c x_c / C,  var = sum_c (x_c - mean)^2 / C (biased),  rstd = 1 / sqrt(var + eps)
//   out_c = (x_c - mean) rstd weight_c + bias_c                       (mean, rstd saved per row)
//   din_c = rstd (g_c - mean(g) - xhat_c mean(g xhat)),  g = dout weight,  xhat = (x - mean) rstd
//   dweight_c = sum_rows dout_c xhat_c,   dbias_c = sum_rows dout_c
//
// Statistics are fp32, two passes (the mean, then the centred squares) over the row held in
// registers: exact centring, no E[x^2] - E[x]^2 cancellation.
//
// Storage type T: float, or bf16 (mixed precision). Every kernel is a template on T that
// widens each element to fp32 as it is loaded and rounds each activation output (out, din)
// to T once as it is stored; weight, bias, mean, rstd and the parameter gradients are fp32
// for both, and the arithmetic is the same fp32 expressions for both. A pack is 16 bytes of T
// (detail::Pack: 4 floats or 8 bf16), held in registers as a Vec of kN fp32 values; the sums
// over a pack are pairwise, which for kN = 4 is (x + y) + (z + w), the float4 order.
//
// Fast path: C % kN == 0 (4 for float, 8 for bf16), C <= 1024, and the row pointers (in, out,
// weight, bias; dout, din) 16-byte aligned. A group of TPR lanes (8, 16 or 32: a quarter
// warp, a half warp or a warp) owns one row at a time and holds it in registers as VPT packs
// per lane: lane t of the group has the pack columns t, t + TPR, ..., so each load instruction
// of a warp covers whole 32-byte sectors. TPR and VPT are chosen from the packs per row so
// that every lane has ~3 packs in flight and few lanes idle: float C = 96 -> (8, 3),
// 192 -> (16, 3), 384 -> (32, 3), 768 -> (32, 6); bf16 C = 96 -> (8, 2), 192 -> (8, 3),
// 384 -> (16, 3), 768 -> (32, 3). A lane holds at most 32 fp32 values of a row either way
// (C <= 1024), so bf16 needs no more registers than float. Row sums are xor butterflies
// within the group (no shared memory, no __syncthreads).
//  - Forward: blocks of 256 threads (256 / TPR rows at a time), a grid-stride loop over the
//    rows with one wave of resident blocks. In, out: one read, one write of each row.
//  - Backward, one kernel: block p of P = detail::row_partitions(rows) takes the consecutive
//    rows [p R, (p + 1) R), R = ceil(rows / P) (>= 32 rows); each group computes din for its
//    rows (the row means of g and g xhat are group butterflies) and accumulates dout xhat and
//    dout per column in registers. Then the block adds its groups in a fixed order (butterfly
//    across the groups of a warp, then the warps in index order through shared memory) into
//    row p of the workspace, partials (P, 2C): [dweight partials | dbias partials]. Stage 2,
//    detail::launch_column_sums, adds the P rows of each column in a fixed order (groups of 64
//    rows on separate blocks, then the group sums; see reduce.cuh). Deterministic
//    (no atomics; P depends on rows only), and dout, in are read once, din written once.
// Generic path (any C >= 1, any alignment): one warp per row, one element at a time,
// re-reading the row from global memory (L1/L2) for each pass; for the parameter gradients a
// column-tiled kernel (grid (P, column tiles), as layer_scale's) writes the same partials, then
// the same stage 2.
#include <cuda_runtime.h>

#include <algorithm>

#include "kernels/cuda/launch.cuh"
#include "kernels/cuda/reduce.cuh"
#include "kernels/cuda/vec.cuh"
#include "kernels/layernorm.h"
#include "tensor/cuda_check.h"

namespace cnx::cuda {

namespace {

using detail::group_sum;
using detail::load4;
using detail::Pack;
using detail::store4;

constexpr int kThreads = 256;
constexpr int kWarps = kThreads / 32;
constexpr int64_t kFastMaxC = 1024;  // the fast path holds a row in registers: <= 32 floats a lane

// ---- packs in fp32 registers ------------------------------------------------------------------

// The fp32 values of one pack of T: kN = 4 for float (what a float4 holds), 8 for bf16.
template <int kN> struct Vec {
  float v[kN];
};
template <class T> constexpr int kPackN = Pack<T>::kN;

template <int kN> __device__ __forceinline__ Vec<kN> fill(float x) {
  Vec<kN> r;
#pragma unroll
  for (int e = 0; e < kN; ++e) r.v[e] = x;
  return r;
}

// f(0) + ... + f(kCount - 1) added pairwise: ((f0 + f1) + (f2 + f3)) + ((f4 + f5) + ...). For
// kCount = 4 that is the float4 order (x + y) + (z + w).
template <int kBegin, int kCount, class F> __device__ __forceinline__ float tree_sum(F f) {
  if constexpr (kCount == 1) {
    return f(kBegin);
  } else {
    return tree_sum<kBegin, kCount / 2>(f) + tree_sum<kBegin + kCount / 2, kCount / 2>(f);
  }
}
template <int kN> __device__ __forceinline__ float hsum(const Vec<kN>& a) {
  return tree_sum<0, kN>([&](int e) { return a.v[e]; });
}
template <int kN> __device__ __forceinline__ float dot(const Vec<kN>& a, const Vec<kN>& b) {
  return tree_sum<0, kN>([&](int e) { return a.v[e] * b.v[e]; });
}
template <int kN> __device__ __forceinline__ Vec<kN> add(const Vec<kN>& a, const Vec<kN>& b) {
  Vec<kN> r;
#pragma unroll
  for (int e = 0; e < kN; ++e) r.v[e] = a.v[e] + b.v[e];
  return r;
}
template <int kN> __device__ __forceinline__ Vec<kN> mul(const Vec<kN>& a, const Vec<kN>& b) {
  Vec<kN> r;
#pragma unroll
  for (int e = 0; e < kN; ++e) r.v[e] = a.v[e] * b.v[e];
  return r;
}
// x - mu per value.
template <int kN> __device__ __forceinline__ Vec<kN> centre(const Vec<kN>& x, float mu) {
  Vec<kN> r;
#pragma unroll
  for (int e = 0; e < kN; ++e) r.v[e] = x.v[e] - mu;
  return r;
}
// (x - mu) * rs per value.
template <int kN>
__device__ __forceinline__ Vec<kN> normalise(const Vec<kN>& x, float mu, float rs) {
  Vec<kN> r;
#pragma unroll
  for (int e = 0; e < kN; ++e) r.v[e] = (x.v[e] - mu) * rs;
  return r;
}

// One pack of T at p (16-byte aligned), widened to fp32.
__device__ __forceinline__ Vec<4> load_vec(const float* p) {
  const float4 q = load4(p);
  return {{q.x, q.y, q.z, q.w}};
}
__device__ __forceinline__ Vec<8> load_vec(const __nv_bfloat16* p) {
  const Pack<__nv_bfloat16> q = detail::load_pack(p);
  Vec<8> r;
#pragma unroll
  for (int e = 0; e < 8; ++e) r.v[e] = __bfloat162float(q.v[e]);
  return r;
}
// kN fp32 parameters at p (16-byte aligned): kN / 4 float4 loads.
template <int kN> __device__ __forceinline__ Vec<kN> load_params(const float* p) {
  Vec<kN> r;
#pragma unroll
  for (int i = 0; i < kN / 4; ++i) {
    const float4 q = load4(p + 4 * i);
    r.v[4 * i] = q.x;
    r.v[4 * i + 1] = q.y;
    r.v[4 * i + 2] = q.z;
    r.v[4 * i + 3] = q.w;
  }
  return r;
}
// Stores one pack at p (16-byte aligned), each value rounded once to T (nearest even for bf16).
__device__ __forceinline__ void store_vec(float* p, const Vec<4>& a) {
  store4(p, make_float4(a.v[0], a.v[1], a.v[2], a.v[3]));
}
__device__ __forceinline__ void store_vec(__nv_bfloat16* p, const Vec<8>& a) {
  Pack<__nv_bfloat16> q;
  __nv_bfloat162* pairs = reinterpret_cast<__nv_bfloat162*>(q.v);
#pragma unroll
  for (int i = 0; i < 4; ++i) pairs[i] = __floats2bfloat162_rn(a.v[2 * i], a.v[2 * i + 1]);
  detail::store_pack(p, q);
}

// Calls f.template operator()<TPR, VPT>() with the fast-path lane layout for a row of `packs`
// packs (1 <= packs <= 32 kMaxVPT): TPR lanes a row, VPT packs a lane, VPT * TPR >= packs (VPT
// rounded up to 1, 2, 3, 4, 6 or 8, and at most kMaxVPT, to bound the number of kernel
// instances).
template <int kMaxVPT, class F> void with_fast_layout(int64_t packs, F&& f) {
  if (packs <= 32) {
    switch ((packs + 7) / 8) {
      case 1: return f.template operator()<8, 1>();
      case 2: return f.template operator()<8, 2>();
      case 3: return f.template operator()<8, 3>();
      default: return f.template operator()<8, 4>();
    }
  }
  if (packs <= 48) return f.template operator()<16, 3>();
  if (packs <= 64) return f.template operator()<16, 4>();
  const int64_t v = (packs + 31) / 32;  // 3 .. kMaxVPT
  if (v <= 3) return f.template operator()<32, 3>();
  if constexpr (kMaxVPT <= 4) {
    return f.template operator()<32, 4>();
  } else {
    if (v <= 4) return f.template operator()<32, 4>();
    if (v <= 6) return f.template operator()<32, 6>();
    return f.template operator()<32, 8>();
  }
}

// =============================================================================================
// forward
// =============================================================================================

// Fast path. T float or __nv_bfloat16. out, in (rows, C); mean, rstd (rows); weight, bias (C).
template <class T, int TPR, int VPT>
__global__ void __launch_bounds__(kThreads)
    layernorm_forward_fast(T* __restrict__ out, float* __restrict__ mean,
                           float* __restrict__ rstd, const T* __restrict__ in,
                           const float* __restrict__ weight, const float* __restrict__ bias,
                           int64_t rows, int C, float eps) {
  constexpr int kN = kPackN<T>;
  constexpr int kRowsPerWarp = 32 / TPR, kRowsPerBlock = kThreads / TPR;
  const int CP = C / kN;                          // packs per row
  const int t = threadIdx.x % TPR;                // lane within the row's group
  const int sub = (threadIdx.x % 32) / TPR;       // group within the warp
  const int warp = threadIdx.x / 32;
  const float fC = static_cast<float>(C);
  // The loop condition depends on the warp only, so all 32 lanes reach the butterflies.
  for (int64_t base = static_cast<int64_t>(blockIdx.x) * kRowsPerBlock + warp * kRowsPerWarp;
       base < rows; base += static_cast<int64_t>(gridDim.x) * kRowsPerBlock) {
    const int64_t row = base + sub;
    const bool valid = row < rows;
    const int64_t off = (valid ? row : 0) * C;
    Vec<kN> v[VPT];
    float sum = 0.0f;
#pragma unroll
    for (int k = 0; k < VPT; ++k) {
      const int j = t + k * TPR;  // pack column
      v[k] = valid && j < CP ? load_vec(in + off + kN * j) : fill<kN>(0.0f);
      sum += hsum(v[k]);
    }
    const float mu = group_sum<TPR>(sum) / fC;
    float sq = 0.0f;
#pragma unroll
    for (int k = 0; k < VPT; ++k) {
      const int j = t + k * TPR;
      if (valid && j < CP) {
        const Vec<kN> d = centre(v[k], mu);
        sq += dot(d, d);
      }
    }
    const float var = group_sum<TPR>(sq) / fC;
    const float rs = 1.0f / sqrtf(var + eps);
#pragma unroll
    for (int k = 0; k < VPT; ++k) {
      const int j = t + k * TPR;
      if (valid && j < CP) {
        const Vec<kN> w = load_params<kN>(weight + kN * j), b = load_params<kN>(bias + kN * j);
        const Vec<kN> xh = normalise(v[k], mu, rs);
        Vec<kN> o;
#pragma unroll
        for (int e = 0; e < kN; ++e) o.v[e] = xh.v[e] * w.v[e] + b.v[e];
        store_vec(out + off + kN * j, o);
      }
    }
    if (valid && t == 0) {
      mean[row] = mu;
      rstd[row] = rs;
    }
  }
}

// Generic path: one warp per row, any C, one element at a time. Same arguments.
template <class T>
__global__ void __launch_bounds__(kThreads)
    layernorm_forward_generic(T* __restrict__ out, float* __restrict__ mean,
                              float* __restrict__ rstd, const T* __restrict__ in,
                              const float* __restrict__ weight, const float* __restrict__ bias,
                              int64_t rows, int64_t C, float eps) {
  using detail::from_float;
  using detail::to_float;
  const int lane = threadIdx.x % 32;
  const float fC = static_cast<float>(C);
  for (int64_t row = static_cast<int64_t>(blockIdx.x) * kWarps + threadIdx.x / 32; row < rows;
       row += static_cast<int64_t>(gridDim.x) * kWarps) {  // uniform over the warp
    const T* x = in + row * C;
    float sum = 0.0f;
    for (int64_t c = lane; c < C; c += 32) sum += to_float(x[c]);
    const float mu = group_sum(sum) / fC;
    float sq = 0.0f;
    for (int64_t c = lane; c < C; c += 32) {
      const float d = to_float(x[c]) - mu;
      sq += d * d;
    }
    const float rs = 1.0f / sqrtf(group_sum(sq) / fC + eps);
    for (int64_t c = lane; c < C; c += 32)
      out[row * C + c] = from_float<T>((to_float(x[c]) - mu) * rs * weight[c] + bias[c]);
    if (lane == 0) {
      mean[row] = mu;
      rstd[row] = rs;
    }
  }
}

// =============================================================================================
// backward
// =============================================================================================

// Fast path, stage 1. T float or __nv_bfloat16. din (rows, C) or null; partials (P, 2C) or null
// when neither dweight nor dbias is wanted; dout, in (rows, C); weight (C); mean, rstd (rows).
// in, mean, rstd may be null when only dbias is wanted (!din && !want_dw), weight when din is
// null.
template <class T, int TPR, int VPT>
__global__ void __launch_bounds__(kThreads)
    layernorm_backward_fast(T* __restrict__ din, float* __restrict__ partials,
                            const T* __restrict__ dout, const T* __restrict__ in,
                            const float* __restrict__ weight, const float* __restrict__ mean,
                            const float* __restrict__ rstd, int64_t rows, int C,
                            int64_t rows_per_block, bool want_dw, bool want_db) {
  constexpr int kN = kPackN<T>;
  constexpr int kRowsPerWarp = 32 / TPR, kRowsPerBlock = kThreads / TPR;
  __shared__ float block_sums[2 * kFastMaxC];  // [dweight | dbias] of the warps added so far
  const int CP = C / kN;
  const int t = threadIdx.x % TPR, sub = (threadIdx.x % 32) / TPR, warp = threadIdx.x / 32;
  const float fC = static_cast<float>(C);
  const bool want_din = din != nullptr;
  const bool need_xhat = want_din || want_dw;
  const int64_t r_begin = static_cast<int64_t>(blockIdx.x) * rows_per_block;
  const int64_t r_end = r_begin + rows_per_block < rows ? r_begin + rows_per_block : rows;

  Vec<kN> acc_dw[VPT], acc_db[VPT];  // this lane's columns, summed over its rows
#pragma unroll
  for (int k = 0; k < VPT; ++k) acc_dw[k] = acc_db[k] = fill<kN>(0.0f);

  for (int64_t base = r_begin + warp * kRowsPerWarp; base < r_end; base += kRowsPerBlock) {
    const int64_t row = base + sub;  // the loop condition is uniform over the warp
    const bool valid = row < r_end;
    const int64_t off = (valid ? row : 0) * C;
    float mu = 0.0f, rs = 0.0f;
    if (valid && need_xhat) {
      mu = mean[row];
      rs = rstd[row];
    }
    Vec<kN> dy[VPT], xh[VPT];  // dout and xhat of this lane's columns; 0 off the row
#pragma unroll
    for (int k = 0; k < VPT; ++k) {
      const int j = t + k * TPR;
      const bool on = valid && j < CP;
      dy[k] = on ? load_vec(dout + off + kN * j) : fill<kN>(0.0f);
      xh[k] = on && need_xhat ? normalise(load_vec(in + off + kN * j), mu, rs) : fill<kN>(0.0f);
    }
    if (want_din) {  // uniform over the grid
      float sg = 0.0f, sgx = 0.0f;
#pragma unroll
      for (int k = 0; k < VPT; ++k) {
        const int j = t + k * TPR;
        if (valid && j < CP) {
          const Vec<kN> g = mul(dy[k], load_params<kN>(weight + kN * j));
          sg += hsum(g);
          sgx += dot(g, xh[k]);
        }
      }
      const float mean_g = group_sum<TPR>(sg) / fC, mean_gx = group_sum<TPR>(sgx) / fC;
#pragma unroll
      for (int k = 0; k < VPT; ++k) {
        const int j = t + k * TPR;
        if (valid && j < CP) {
          const Vec<kN> g = mul(dy[k], load_params<kN>(weight + kN * j));
          Vec<kN> d;
#pragma unroll
          for (int e = 0; e < kN; ++e) d.v[e] = rs * (g.v[e] - mean_g - xh[k].v[e] * mean_gx);
          store_vec(din + off + kN * j, d);
        }
      }
    }
#pragma unroll
    for (int k = 0; k < VPT; ++k) {  // zeros off the row add nothing
      if (want_dw) acc_dw[k] = add(acc_dw[k], mul(dy[k], xh[k]));
      if (want_db) acc_db[k] = add(acc_db[k], dy[k]);
    }
  }
  if (!want_dw && !want_db) return;  // uniform over the grid: no __syncthreads is skipped

  // The groups of a warp own the same columns: add them with a butterfly over the groups.
#pragma unroll
  for (int k = 0; k < VPT; ++k) {
#pragma unroll
    for (int e = 0; e < kN; ++e) {
      acc_dw[k].v[e] = detail::across_groups_sum<TPR>(acc_dw[k].v[e]);
      acc_db[k].v[e] = detail::across_groups_sum<TPR>(acc_db[k].v[e]);
    }
  }
  // Then the warps, in index order, through shared memory: ((w0 + w1) + w2) + ...
  for (int w = 0; w < kWarps; ++w) {
    if (warp == w && sub == 0) {
#pragma unroll
      for (int k = 0; k < VPT; ++k) {
        const int j = t + k * TPR;
        if (j < CP) {
#pragma unroll
          for (int e = 0; e < kN; ++e) {
            const int c = kN * j + e;
            block_sums[c] = w == 0 ? acc_dw[k].v[e] : block_sums[c] + acc_dw[k].v[e];
            block_sums[C + c] = w == 0 ? acc_db[k].v[e] : block_sums[C + c] + acc_db[k].v[e];
          }
        }
      }
    }
    __syncthreads();
  }
  float* part = partials + static_cast<int64_t>(blockIdx.x) * 2 * C;
  for (int i = threadIdx.x; i < 2 * C; i += kThreads)
    if (i < C ? want_dw : want_db) part[i] = block_sums[i];
}

// Generic path, din: one warp per row, any C, one element at a time. din, dout, in (rows, C);
// weight (C); mean, rstd (rows).
template <class T>
__global__ void __launch_bounds__(kThreads)
    layernorm_backward_din_generic(T* __restrict__ din, const T* __restrict__ dout,
                                   const T* __restrict__ in, const float* __restrict__ weight,
                                   const float* __restrict__ mean, const float* __restrict__ rstd,
                                   int64_t rows, int64_t C) {
  using detail::from_float;
  using detail::to_float;
  const int lane = threadIdx.x % 32;
  const float fC = static_cast<float>(C);
  for (int64_t row = static_cast<int64_t>(blockIdx.x) * kWarps + threadIdx.x / 32; row < rows;
       row += static_cast<int64_t>(gridDim.x) * kWarps) {  // uniform over the warp
    const T* x = in + row * C;
    const T* dy = dout + row * C;
    const float mu = mean[row], rs = rstd[row];
    float sg = 0.0f, sgx = 0.0f;
    for (int64_t c = lane; c < C; c += 32) {
      const float g = to_float(dy[c]) * weight[c];
      sg += g;
      sgx += g * ((to_float(x[c]) - mu) * rs);
    }
    const float mean_g = group_sum(sg) / fC, mean_gx = group_sum(sgx) / fC;
    for (int64_t c = lane; c < C; c += 32) {
      const float g = to_float(dy[c]) * weight[c];
      const float xh = (to_float(x[c]) - mu) * rs;
      din[row * C + c] = from_float<T>(rs * (g - mean_g - xh * mean_gx));
    }
  }
}

// Generic path, stage 1 of dweight / dbias: grid (P, column tiles), block (p, t) sums its
// rows [p R, (p + 1) R) for the columns [t tile, (t + 1) tile), `lanes` rows at a time, and
// adds the lanes in order into partials[p, :] (dweight part) and partials[p, C + :] (dbias).
// partials (P, 2C); dout, in (rows, C); mean, rstd (rows); in, mean, rstd unused (may be null)
// unless want_dw.
template <class T>
__global__ void __launch_bounds__(kThreads)
    layernorm_backward_params_generic(float* __restrict__ partials, const T* __restrict__ dout,
                                      const T* __restrict__ in, const float* __restrict__ mean,
                                      const float* __restrict__ rstd, int64_t rows, int64_t C,
                                      int64_t rows_per_block, int tile, int lanes, int64_t tiles,
                                      bool want_dw, bool want_db) {
  using detail::to_float;
  __shared__ float lane_dw[kThreads], lane_db[kThreads];
  const int64_t p = blockIdx.x;
  const int64_t r_begin = p * rows_per_block;
  const int64_t r_end = r_begin + rows_per_block < rows ? r_begin + rows_per_block : rows;
  const int u_local = threadIdx.x % tile, lane = threadIdx.x / tile;
  for (int64_t t = blockIdx.y; t < tiles; t += gridDim.y) {  // uniform over the block
    const int64_t c = t * tile + u_local;
    float dw = 0.0f, db = 0.0f;
    if (lane < lanes && c < C) {
      for (int64_t r = r_begin + lane; r < r_end; r += lanes) {
        const float dy = to_float(dout[r * C + c]);
        if (want_dw) dw += dy * ((to_float(in[r * C + c]) - mean[r]) * rstd[r]);
        db += dy;
      }
    }
    lane_dw[threadIdx.x] = dw;
    lane_db[threadIdx.x] = db;
    __syncthreads();
    if (lane == 0 && c < C) {  // lanes added in order 0, 1, ...
      float sw = lane_dw[u_local], sb = lane_db[u_local];
      for (int l = 1; l < lanes; ++l) {
        sw += lane_dw[l * tile + u_local];
        sb += lane_db[l * tile + u_local];
      }
      if (want_dw) partials[p * 2 * C + c] = sw;
      if (want_db) partials[p * 2 * C + C + c] = sb;
    }
    __syncthreads();  // the lane sums are rewritten for the next tile
  }
}

}  // namespace

// ================================ forward ================================
template <class T>
void layernorm_forward(T* out, float* mean, float* rstd, const T* in, const float* weight,
                       const float* bias, int64_t rows, int64_t C, double eps,
                       cudaStream_t stream) {
  using D = detail::device_t<T>;  // float or __nv_bfloat16
  constexpr int kN = kPackN<D>;
  if (rows <= 0 || C <= 0) return;
  const float feps = static_cast<float>(eps);
  if (C % kN == 0 && C <= kFastMaxC && detail::all_aligned16(out, in, weight, bias)) {
    with_fast_layout<kFastMaxC / (32 * kN)>(C / kN, [&]<int TPR, int VPT>() {
      const unsigned grid = detail::wave_grid<layernorm_forward_fast<D, TPR, VPT>, kThreads>(
          rows, kThreads / TPR);
      launch<layernorm_forward_fast<D, TPR, VPT>>(
          grid, kThreads, 0, stream, detail::dev(out), mean, rstd, detail::dev(in), weight, bias,
          rows, static_cast<int>(C), feps);
    });
  } else {
    const unsigned grid =
        detail::wave_grid<layernorm_forward_generic<D>, kThreads>(rows, kWarps);
    launch<layernorm_forward_generic<D>>(grid, kThreads, 0, stream, detail::dev(out), mean, rstd,
                                         detail::dev(in), weight, bias, rows, C, feps);
  }
  CNX_CUDA_LAUNCH_CHECK();
}

// ================================ backward ================================
int64_t layernorm_backward_workspace_floats(int64_t rows, int64_t C) {
  if (rows <= 0 || C <= 0) return 0;
  return detail::row_partitions(rows) * 2 * C;
}

template <class T>
void layernorm_backward(std::type_identity_t<T>* din, float* dweight, float* dbias, const T* dout,
                        const std::type_identity_t<T>* in, const float* weight, const float* mean,
                        const float* rstd, int64_t rows, int64_t C, float* workspace,
                        cudaStream_t stream) {
  using D = detail::device_t<T>;  // float or __nv_bfloat16
  constexpr int kN = kPackN<D>;
  if (C <= 0) return;
  const bool want_dw = dweight != nullptr, want_db = dbias != nullptr;
  if (rows <= 0) {  // sums over no rows; din is empty
    if (want_dw) CNX_CUDA_CHECK(cudaMemsetAsync(dweight, 0, C * sizeof(float), stream));
    if (want_db) CNX_CUDA_CHECK(cudaMemsetAsync(dbias, 0, C * sizeof(float), stream));
    return;
  }
  if (!din && !want_dw && !want_db) return;
  const int64_t P = detail::row_partitions(rows);
  const int64_t rows_per_block = detail::rows_per_partition(rows);
  float* partials = want_dw || want_db ? workspace : nullptr;

  if (C % kN == 0 && C <= kFastMaxC && detail::all_aligned16(din, dout, in, weight)) {
    with_fast_layout<kFastMaxC / (32 * kN)>(C / kN, [&]<int TPR, int VPT>() {
      launch<layernorm_backward_fast<D, TPR, VPT>>(
          static_cast<unsigned>(P), kThreads, 0, stream, detail::dev(din), partials,
          detail::dev(dout), detail::dev(in), weight, mean, rstd, rows, static_cast<int>(C),
          rows_per_block, want_dw, want_db);
    });
    CNX_CUDA_LAUNCH_CHECK();
  } else {
    if (din) {
      const unsigned grid =
          detail::wave_grid<layernorm_backward_din_generic<D>, kThreads>(rows, kWarps);
      launch<layernorm_backward_din_generic<D>>(grid, kThreads, 0, stream, detail::dev(din),
                                                detail::dev(dout), detail::dev(in), weight, mean,
                                                rstd, rows, C);
      CNX_CUDA_LAUNCH_CHECK();
    }
    if (partials) {
      const detail::ColumnTiling ct = detail::column_tiling(C);
      const dim3 grid(static_cast<unsigned>(P),
                      static_cast<unsigned>(std::min<int64_t>(ct.tiles, detail::kMaxGridY)));
      launch<layernorm_backward_params_generic<D>>(
          grid, kThreads, 0, stream, partials, detail::dev(dout), detail::dev(in), mean, rstd,
          rows, C, rows_per_block, ct.tile, ct.lanes, ct.tiles, want_dw, want_db);
      CNX_CUDA_LAUNCH_CHECK();
    }
  }
  if (partials) detail::launch_column_sums(dweight, dbias, partials, P, 2 * C, C, stream);
}

#define CNX_INSTANTIATE(T)                                                                      \
  template void layernorm_forward<T>(T*, float*, float*, const T*, const float*, const float*,  \
                                     int64_t, int64_t, double, cudaStream_t);                   \
  template void layernorm_backward<T>(T*, float*, float*, const T*, const T*, const float*,     \
                                      const float*, const float*, int64_t, int64_t, float*,     \
                                      cudaStream_t);
CNX_INSTANTIATE(float)
CNX_INSTANTIATE(bf16)
#undef CNX_INSTANTIATE

}  // namespace cnx::cuda
