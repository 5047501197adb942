// CUDA LayerNorm over the channel (last) dimension of `rows` rows of C floats (see
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
// Fast path: C % 4 == 0, C <= 1024, and the row pointers (in, out, weight, bias; dout, din)
// 16-byte aligned. A group of TPR lanes (8, 16 or 32: a quarter warp, a half warp or a warp)
// owns one row at a time and holds it in registers as VPT float4 per lane: lane t of the group
// has the float4 columns t, t + TPR, ..., so each load instruction of a warp covers whole
// 32-byte sectors. TPR and VPT are chosen so that every lane has ~3 float4 in flight and few
// lanes idle: C = 96 -> (8, 3), 192 -> (16, 3), 384 -> (32, 3), 768 -> (32, 6). Row sums are
// xor butterflies within the group (no shared memory, no __syncthreads).
//  - Forward: blocks of 256 threads (256 / TPR rows at a time), a grid-stride loop over the
//    rows with one wave of resident blocks. In, out: one read, one write of each row.
//  - Backward, one kernel: block p of P = detail::row_partitions(rows) takes the consecutive
//    rows [p R, (p + 1) R), R = ceil(rows / P) (>= 32 rows); each group computes din for its
//    rows (the row means of g and g xhat are group butterflies) and accumulates dout xhat and
//    dout per column in registers. Then the block adds its groups in a fixed order (butterfly
//    across the groups of a warp, then the warps in index order through shared memory) into
//    row p of the workspace, partials (P, 2C): [dweight partials | dbias partials]. Stage 2,
//    detail::launch_column_sums, adds the P rows of each column in index order. Deterministic
//    (no atomics; P depends on rows only), and dout, in are read once, din written once.
// Generic path (any C >= 1, any alignment): one warp per row, scalar, re-reading the row from
// global memory (L1/L2) for each pass; for the parameter gradients a column-tiled kernel
// (grid (P, column tiles), as layer_scale's) writes the same partials, then the same stage 2.
#include <cuda_runtime.h>

#include <algorithm>

#include "kernels/cuda/reduce.cuh"
#include "kernels/cuda/vec.cuh"
#include "kernels/layernorm.h"
#include "tensor/cuda_check.h"

namespace cnx::cuda {

namespace {

using detail::group_sum;
using detail::load4;
using detail::make4;
using detail::store4;

constexpr int kThreads = 256;
constexpr int kWarps = kThreads / 32;
constexpr int kMaxVec = 8;                       // float4 per lane on the fast path
constexpr int64_t kFastMaxC = 32 * 4 * kMaxVec;  // 1024 channels

__device__ __forceinline__ float hsum(float4 v) { return (v.x + v.y) + (v.z + v.w); }
__device__ __forceinline__ float4 add4(float4 a, float4 b) {
  return make_float4(a.x + b.x, a.y + b.y, a.z + b.z, a.w + b.w);
}
__device__ __forceinline__ float4 mul4(float4 a, float4 b) {
  return make_float4(a.x * b.x, a.y * b.y, a.z * b.z, a.w * b.w);
}
__device__ __forceinline__ float dot4(float4 a, float4 b) {
  return (a.x * b.x + a.y * b.y) + (a.z * b.z + a.w * b.w);
}
// (x - mu) * rs per lane.
__device__ __forceinline__ float4 normalise4(float4 x, float mu, float rs) {
  return make_float4((x.x - mu) * rs, (x.y - mu) * rs, (x.z - mu) * rs, (x.w - mu) * rs);
}

// Calls f.template operator()<TPR, VPT>() with the fast-path lane layout for C (C % 4 == 0,
// 4 <= C <= 1024): TPR lanes a row, VPT float4 a lane, VPT * TPR >= C / 4 (VPT rounded up to
// 1, 2, 3, 4, 6 or 8 to bound the number of kernel instances).
template <class F> void with_fast_layout(int64_t C, F&& f) {
  const int64_t C4 = C / 4;
  if (C4 <= 32) {
    switch ((C4 + 7) / 8) {
      case 1: return f.template operator()<8, 1>();
      case 2: return f.template operator()<8, 2>();
      case 3: return f.template operator()<8, 3>();
      default: return f.template operator()<8, 4>();
    }
  }
  if (C4 <= 48) return f.template operator()<16, 3>();
  if (C4 <= 64) return f.template operator()<16, 4>();
  const int64_t v = (C4 + 31) / 32;  // 3 .. 8
  if (v <= 3) return f.template operator()<32, 3>();
  if (v <= 4) return f.template operator()<32, 4>();
  if (v <= 6) return f.template operator()<32, 6>();
  return f.template operator()<32, 8>();
}

// =============================================================================================
// forward
// =============================================================================================

// Fast path. out, in (rows, C); mean, rstd (rows); weight, bias (C).
template <int TPR, int VPT>
__global__ void __launch_bounds__(kThreads)
    layernorm_forward_fast(float* __restrict__ out, float* __restrict__ mean,
                           float* __restrict__ rstd, const float* __restrict__ in,
                           const float* __restrict__ weight, const float* __restrict__ bias,
                           int64_t rows, int C, float eps) {
  constexpr int kRowsPerWarp = 32 / TPR, kRowsPerBlock = kThreads / TPR;
  const int C4 = C / 4;
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
    float4 v[VPT];
    float sum = 0.0f;
#pragma unroll
    for (int k = 0; k < VPT; ++k) {
      const int j = t + k * TPR;  // float4 column
      v[k] = valid && j < C4 ? load4(in + off + 4 * j) : make4(0.0f);
      sum += hsum(v[k]);
    }
    const float mu = group_sum<TPR>(sum) / fC;
    float sq = 0.0f;
#pragma unroll
    for (int k = 0; k < VPT; ++k) {
      const int j = t + k * TPR;
      if (valid && j < C4) {
        const float4 d = make_float4(v[k].x - mu, v[k].y - mu, v[k].z - mu, v[k].w - mu);
        sq += dot4(d, d);
      }
    }
    const float var = group_sum<TPR>(sq) / fC;
    const float rs = 1.0f / sqrtf(var + eps);
#pragma unroll
    for (int k = 0; k < VPT; ++k) {
      const int j = t + k * TPR;
      if (valid && j < C4) {
        const float4 w = load4(weight + 4 * j), b = load4(bias + 4 * j);
        const float4 xh = normalise4(v[k], mu, rs);
        store4(out + off + 4 * j, make_float4(xh.x * w.x + b.x, xh.y * w.y + b.y,
                                              xh.z * w.z + b.z, xh.w * w.w + b.w));
      }
    }
    if (valid && t == 0) {
      mean[row] = mu;
      rstd[row] = rs;
    }
  }
}

// Generic path: one warp per row, any C, scalar. Same arguments.
__global__ void __launch_bounds__(kThreads)
    layernorm_forward_generic(float* __restrict__ out, float* __restrict__ mean,
                              float* __restrict__ rstd, const float* __restrict__ in,
                              const float* __restrict__ weight, const float* __restrict__ bias,
                              int64_t rows, int64_t C, float eps) {
  const int lane = threadIdx.x % 32;
  const float fC = static_cast<float>(C);
  for (int64_t row = static_cast<int64_t>(blockIdx.x) * kWarps + threadIdx.x / 32; row < rows;
       row += static_cast<int64_t>(gridDim.x) * kWarps) {  // uniform over the warp
    const float* x = in + row * C;
    float sum = 0.0f;
    for (int64_t c = lane; c < C; c += 32) sum += x[c];
    const float mu = group_sum(sum) / fC;
    float sq = 0.0f;
    for (int64_t c = lane; c < C; c += 32) {
      const float d = x[c] - mu;
      sq += d * d;
    }
    const float rs = 1.0f / sqrtf(group_sum(sq) / fC + eps);
    for (int64_t c = lane; c < C; c += 32)
      out[row * C + c] = (x[c] - mu) * rs * weight[c] + bias[c];
    if (lane == 0) {
      mean[row] = mu;
      rstd[row] = rs;
    }
  }
}

// =============================================================================================
// backward
// =============================================================================================

// Fast path, stage 1. din (rows, C) or null; partials (P, 2C) or null when neither dweight nor
// dbias is wanted; dout, in (rows, C); weight (C); mean, rstd (rows). in, mean, rstd may be
// null when only dbias is wanted (!din && !want_dw), weight when din is null.
template <int TPR, int VPT>
__global__ void __launch_bounds__(kThreads)
    layernorm_backward_fast(float* __restrict__ din, float* __restrict__ partials,
                            const float* __restrict__ dout, const float* __restrict__ in,
                            const float* __restrict__ weight, const float* __restrict__ mean,
                            const float* __restrict__ rstd, int64_t rows, int C,
                            int64_t rows_per_block, bool want_dw, bool want_db) {
  constexpr int kRowsPerWarp = 32 / TPR, kRowsPerBlock = kThreads / TPR;
  __shared__ float block_sums[2 * kFastMaxC];  // [dweight | dbias] of the warps added so far
  const int C4 = C / 4;
  const int t = threadIdx.x % TPR, sub = (threadIdx.x % 32) / TPR, warp = threadIdx.x / 32;
  const float fC = static_cast<float>(C);
  const bool want_din = din != nullptr;
  const bool need_xhat = want_din || want_dw;
  const int64_t r_begin = static_cast<int64_t>(blockIdx.x) * rows_per_block;
  const int64_t r_end = r_begin + rows_per_block < rows ? r_begin + rows_per_block : rows;

  float4 acc_dw[VPT], acc_db[VPT];  // this lane's columns, summed over its rows
#pragma unroll
  for (int k = 0; k < VPT; ++k) acc_dw[k] = acc_db[k] = make4(0.0f);

  for (int64_t base = r_begin + warp * kRowsPerWarp; base < r_end; base += kRowsPerBlock) {
    const int64_t row = base + sub;  // the loop condition is uniform over the warp
    const bool valid = row < r_end;
    const int64_t off = (valid ? row : 0) * C;
    float mu = 0.0f, rs = 0.0f;
    if (valid && need_xhat) {
      mu = mean[row];
      rs = rstd[row];
    }
    float4 dy[VPT], xh[VPT];  // dout and xhat of this lane's columns; 0 off the row
#pragma unroll
    for (int k = 0; k < VPT; ++k) {
      const int j = t + k * TPR;
      const bool on = valid && j < C4;
      dy[k] = on ? load4(dout + off + 4 * j) : make4(0.0f);
      xh[k] = on && need_xhat ? normalise4(load4(in + off + 4 * j), mu, rs) : make4(0.0f);
    }
    if (want_din) {  // uniform over the grid
      float sg = 0.0f, sgx = 0.0f;
#pragma unroll
      for (int k = 0; k < VPT; ++k) {
        const int j = t + k * TPR;
        if (valid && j < C4) {
          const float4 g = mul4(dy[k], load4(weight + 4 * j));
          sg += hsum(g);
          sgx += dot4(g, xh[k]);
        }
      }
      const float mean_g = group_sum<TPR>(sg) / fC, mean_gx = group_sum<TPR>(sgx) / fC;
#pragma unroll
      for (int k = 0; k < VPT; ++k) {
        const int j = t + k * TPR;
        if (valid && j < C4) {
          const float4 g = mul4(dy[k], load4(weight + 4 * j));
          store4(din + off + 4 * j,
                 make_float4(rs * (g.x - mean_g - xh[k].x * mean_gx),
                             rs * (g.y - mean_g - xh[k].y * mean_gx),
                             rs * (g.z - mean_g - xh[k].z * mean_gx),
                             rs * (g.w - mean_g - xh[k].w * mean_gx)));
        }
      }
    }
#pragma unroll
    for (int k = 0; k < VPT; ++k) {  // zeros off the row add nothing
      if (want_dw) acc_dw[k] = add4(acc_dw[k], mul4(dy[k], xh[k]));
      if (want_db) acc_db[k] = add4(acc_db[k], dy[k]);
    }
  }
  if (!want_dw && !want_db) return;  // uniform over the grid: no __syncthreads is skipped

  // The groups of a warp own the same columns: add them with a butterfly over the groups.
#pragma unroll
  for (int k = 0; k < VPT; ++k) {
    acc_dw[k] = make_float4(detail::across_groups_sum<TPR>(acc_dw[k].x),
                            detail::across_groups_sum<TPR>(acc_dw[k].y),
                            detail::across_groups_sum<TPR>(acc_dw[k].z),
                            detail::across_groups_sum<TPR>(acc_dw[k].w));
    acc_db[k] = make_float4(detail::across_groups_sum<TPR>(acc_db[k].x),
                            detail::across_groups_sum<TPR>(acc_db[k].y),
                            detail::across_groups_sum<TPR>(acc_db[k].z),
                            detail::across_groups_sum<TPR>(acc_db[k].w));
  }
  // Then the warps, in index order, through shared memory: ((w0 + w1) + w2) + ...
  for (int w = 0; w < kWarps; ++w) {
    if (warp == w && sub == 0) {
#pragma unroll
      for (int k = 0; k < VPT; ++k) {
        const int j = t + k * TPR;
        if (j < C4) {
          const float dw[4] = {acc_dw[k].x, acc_dw[k].y, acc_dw[k].z, acc_dw[k].w};
          const float db[4] = {acc_db[k].x, acc_db[k].y, acc_db[k].z, acc_db[k].w};
#pragma unroll
          for (int e = 0; e < 4; ++e) {
            const int c = 4 * j + e;
            block_sums[c] = w == 0 ? dw[e] : block_sums[c] + dw[e];
            block_sums[C + c] = w == 0 ? db[e] : block_sums[C + c] + db[e];
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

// Generic path, din: one warp per row, any C, scalar. din, dout, in (rows, C); weight (C);
// mean, rstd (rows).
__global__ void __launch_bounds__(kThreads)
    layernorm_backward_din_generic(float* __restrict__ din, const float* __restrict__ dout,
                                   const float* __restrict__ in, const float* __restrict__ weight,
                                   const float* __restrict__ mean, const float* __restrict__ rstd,
                                   int64_t rows, int64_t C) {
  const int lane = threadIdx.x % 32;
  const float fC = static_cast<float>(C);
  for (int64_t row = static_cast<int64_t>(blockIdx.x) * kWarps + threadIdx.x / 32; row < rows;
       row += static_cast<int64_t>(gridDim.x) * kWarps) {  // uniform over the warp
    const float* x = in + row * C;
    const float* dy = dout + row * C;
    const float mu = mean[row], rs = rstd[row];
    float sg = 0.0f, sgx = 0.0f;
    for (int64_t c = lane; c < C; c += 32) {
      const float g = dy[c] * weight[c];
      sg += g;
      sgx += g * ((x[c] - mu) * rs);
    }
    const float mean_g = group_sum(sg) / fC, mean_gx = group_sum(sgx) / fC;
    for (int64_t c = lane; c < C; c += 32) {
      const float g = dy[c] * weight[c];
      const float xh = (x[c] - mu) * rs;
      din[row * C + c] = rs * (g - mean_g - xh * mean_gx);
    }
  }
}

// Generic path, stage 1 of dweight / dbias: grid (P, column tiles), block (p, t) sums its
// rows [p R, (p + 1) R) for the columns [t tile, (t + 1) tile), `lanes` rows at a time, and
// adds the lanes in order into partials[p, :] (dweight part) and partials[p, C + :] (dbias).
// partials (P, 2C); dout, in (rows, C); mean, rstd (rows); in, mean, rstd unused (may be null)
// unless want_dw.
__global__ void __launch_bounds__(kThreads)
    layernorm_backward_params_generic(float* __restrict__ partials, const float* __restrict__ dout,
                                      const float* __restrict__ in, const float* __restrict__ mean,
                                      const float* __restrict__ rstd, int64_t rows, int64_t C,
                                      int64_t rows_per_block, int tile, int lanes, int64_t tiles,
                                      bool want_dw, bool want_db) {
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
        const float dy = dout[r * C + c];
        if (want_dw) dw += dy * ((in[r * C + c] - mean[r]) * rstd[r]);
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
void layernorm_forward(float* out, float* mean, float* rstd, const float* in, const float* weight,
                       const float* bias, int64_t rows, int64_t C, double eps,
                       cudaStream_t stream) {
  if (rows <= 0 || C <= 0) return;
  const float feps = static_cast<float>(eps);
  if (C % 4 == 0 && C <= kFastMaxC && detail::all_aligned16(out, in, weight, bias)) {
    with_fast_layout(C, [&]<int TPR, int VPT>() {
      const unsigned grid =
          detail::wave_grid<layernorm_forward_fast<TPR, VPT>, kThreads>(rows, kThreads / TPR);
      layernorm_forward_fast<TPR, VPT><<<grid, kThreads, 0, stream>>>(
          out, mean, rstd, in, weight, bias, rows, static_cast<int>(C), feps);
    });
  } else {
    const unsigned grid = detail::wave_grid<layernorm_forward_generic, kThreads>(rows, kWarps);
    layernorm_forward_generic<<<grid, kThreads, 0, stream>>>(out, mean, rstd, in, weight, bias,
                                                             rows, C, feps);
  }
  CNX_CUDA_LAUNCH_CHECK();
}

// ================================ backward ================================
int64_t layernorm_backward_workspace_floats(int64_t rows, int64_t C) {
  if (rows <= 0 || C <= 0) return 0;
  return detail::row_partitions(rows) * 2 * C;
}

void layernorm_backward(float* din, float* dweight, float* dbias, const float* dout,
                        const float* in, const float* weight, const float* mean, const float* rstd,
                        int64_t rows, int64_t C, float* workspace, cudaStream_t stream) {
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

  if (C % 4 == 0 && C <= kFastMaxC && detail::all_aligned16(din, dout, in, weight)) {
    with_fast_layout(C, [&]<int TPR, int VPT>() {
      layernorm_backward_fast<TPR, VPT><<<static_cast<unsigned>(P), kThreads, 0, stream>>>(
          din, partials, dout, in, weight, mean, rstd, rows, static_cast<int>(C), rows_per_block,
          want_dw, want_db);
    });
    CNX_CUDA_LAUNCH_CHECK();
  } else {
    if (din) {
      const unsigned grid =
          detail::wave_grid<layernorm_backward_din_generic, kThreads>(rows, kWarps);
      layernorm_backward_din_generic<<<grid, kThreads, 0, stream>>>(din, dout, in, weight, mean,
                                                                    rstd, rows, C);
      CNX_CUDA_LAUNCH_CHECK();
    }
    if (partials) {
      const detail::ColumnTiling ct = detail::column_tiling(C);
      const dim3 grid(static_cast<unsigned>(P),
                      static_cast<unsigned>(std::min<int64_t>(ct.tiles, detail::kMaxGridY)));
      layernorm_backward_params_generic<<<grid, kThreads, 0, stream>>>(
          partials, dout, in, mean, rstd, rows, C, rows_per_block, ct.tile, ct.lanes, ct.tiles,
          want_dw, want_db);
      CNX_CUDA_LAUNCH_CHECK();
    }
  }
  if (partials) detail::launch_column_sums(dweight, dbias, partials, P, 2 * C, C, stream);
}

}  // namespace cnx::cuda
