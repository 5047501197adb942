// CUDA BatchNorm over the channels (last dimension) of M rows of C values (see
// kernels/batchnorm.h for the math):
//
//   training: mean, var (biased) of each channel over the M rows; running stats updated with
//             the unbiased variance var M / (M - 1);   eval: the running statistics
//   out = (x - mean) invstd weight + bias,  invstd = 1 / sqrt(var + eps)   (mean, invstd saved)
//   dweight = sum_rows dout xhat,  dbias = sum_rows dout
//   din = weight invstd (dout - dbias / M - xhat dweight / M)   (training)
//   din = dout weight invstd                                    (eval)
//
// Storage type T: float, or bf16 (mixed precision). Every kernel widens each element to fp32
// as it is loaded and rounds each activation output (out, din) to T once as it is stored;
// weight, bias, the statistics and the parameter gradients are fp32 for both.
//
// Layout of every pass over the activations: grid (P, column tiles), blocks of 256 threads.
// Block (p, t) takes the rows [p R, (p + 1) R) of detail::row_partitions(M) = P partitions
// (R = detail::rows_per_partition(M) >= 32) and the columns [t tile, (t + 1) tile) of
// detail::column_tiling(C) (tile = min(C, 32)); thread i has column i % tile and walks the
// rows lane, lane + lanes, ... (lane = i / tile, lanes = 256 / tile). A warp so reads whole
// runs of consecutive channels of a row (coalesced along C; for C < 32 several consecutive rows,
// which are contiguous too), and each thread keeps its channel's parameters and statistics in
// registers: no division per element, no per-element parameter loads. Each thread issues the
// loads of 4 of its rows before using them (walk_rows), for memory-level parallelism.
//
// Per-channel sums (the statistics; sum dout and sum dout xhat in backward) are two-stage and
// deterministic: each thread sums its rows in order, the block adds its lanes in index order
// into row p of the partials (P, 2C) in the workspace, and detail::launch_column_sums adds the
// P rows of each column in a fixed order (reduce.cuh). No atomics: the result depends on M and
// C only, bitwise, whatever the schedule.
//
// Forward, training (3 kernels and 1 or 2 column-sum passes; x read twice, out written once):
//   1. stats partials: sum (x - s) and sum (x - s)^2 per channel, s_c = x[0, c] (a shift by a
//      sample of the channel: the one-pass variance sum d^2 / M - (sum d / M)^2 then cancels
//      little, see kernels/batchnorm.h);
//   2. column sums into the workspace's last 2C floats;
//   3. finalize (one thread per channel): mean, var, invstd; the running statistics updated in
//      place on the device (no host synchronisation);
//   4. normalise.
// Forward, eval: finalize (mean = running_mean, invstd from running_var), normalise.
// Backward: partials of sum dout and sum dout xhat (only those wanted), column sums straight
// into dbias and dweight (into the workspace for a sum that din needs and nobody asked for),
// then the din kernel. Eval-mode din needs no sums and reads neither in nor mean.
#include <cuda_runtime.h>

#include <algorithm>

#include "kernels/batchnorm.h"
#include "kernels/cuda/launch.cuh"
#include "kernels/cuda/reduce.cuh"
#include "kernels/cuda/vec.cuh"
#include "tensor/cuda_check.h"

namespace cnx::cuda {

namespace {

using detail::from_float;
using detail::to_float;

constexpr int kThreads = detail::kBlockThreads;  // 256

// Where a thread of a (P, column tiles) block works: column c of the tile (valid when < C),
// and the rows lane, lane + lanes, ... of its block's [r_begin, r_end).
struct RowTile {
  int64_t r_begin, r_end;
  int u_local, lane;  // column within the tile, row lane
  __device__ RowTile(int64_t M, int64_t rows_per_block, int tile) {
    r_begin = static_cast<int64_t>(blockIdx.x) * rows_per_block;
    r_end = r_begin + rows_per_block < M ? r_begin + rows_per_block : M;
    u_local = static_cast<int>(threadIdx.x) % tile;
    lane = static_cast<int>(threadIdx.x) / tile;
  }
};

// Calls use(r, load(r)) for the rows r = first, first + step, ... < end, in that order, kRows
// rows at a time with the loads of a group issued before any of them is used: a thread so has
// kRows loads in flight instead of one (a loop whose next load waits for the add of the last
// would leave the memory system idle between them; with 8 resident blocks of 256 threads an SM
// needs ~4 loads in flight per thread to cover the latency at full bandwidth). The order of the
// uses, and so of every sum, is that of the plain loop.
template <int kRows = 4, class Load, class Use>
__device__ __forceinline__ void walk_rows(int64_t first, int64_t end, int64_t step, Load load,
                                          Use use) {
  int64_t r = first;
  for (; r + (kRows - 1) * step < end; r += kRows * step) {
    decltype(load(r)) v[kRows];
#pragma unroll
    for (int k = 0; k < kRows; ++k) v[k] = load(r + k * step);
#pragma unroll
    for (int k = 0; k < kRows; ++k) use(r + k * step, v[k]);
  }
  for (; r < end; r += step) use(r, load(r));
}

// Adds the per-thread values a and b of the lanes of one tile in lane order (0, 1, ...) and
// writes the totals to out_a[c] and out_b[c] (each when non-null) for the threads of lane 0.
// Every thread of the block must call it (it synchronises); lane_a, lane_b are
// __shared__ float[kThreads], reusable when it returns.
__device__ __forceinline__ void add_lanes(float a, float b, float* lane_a, float* lane_b,
                                          const RowTile& rt, int tile, int lanes, int64_t c,
                                          int64_t C, float* out_a, float* out_b) {
  lane_a[threadIdx.x] = a;
  lane_b[threadIdx.x] = b;
  __syncthreads();
  if (rt.lane == 0 && c < C) {
    float sa = lane_a[rt.u_local], sb = lane_b[rt.u_local];
    for (int l = 1; l < lanes; ++l) {
      sa += lane_a[l * tile + rt.u_local];
      sb += lane_b[l * tile + rt.u_local];
    }
    if (out_a) out_a[c] = sa;
    if (out_b) out_b[c] = sb;
  }
  __syncthreads();  // the lane values are rewritten for the next tile
}

// =============================================================================================
// forward
// =============================================================================================

// Stage 1 of the statistics. partials (P, 2C): [sum d | sum d^2] of each block's rows, with
// d = x - x[0, c]; in (M, C).
template <class T>
__global__ void __launch_bounds__(kThreads)
    batchnorm_stats_partials(float* __restrict__ partials, const T* __restrict__ in, int64_t M,
                             int64_t C, int64_t rows_per_block, int tile, int lanes,
                             int64_t tiles) {
  __shared__ float lane_s[kThreads], lane_q[kThreads];
  const RowTile rt(M, rows_per_block, tile);
  float* part = partials + static_cast<int64_t>(blockIdx.x) * 2 * C;
  for (int64_t t = blockIdx.y; t < tiles; t += gridDim.y) {  // uniform over the block
    const int64_t c = t * tile + rt.u_local;
    float s = 0.0f, q = 0.0f;
    if (rt.lane < lanes && c < C) {
      const float shift = to_float(in[c]);
      walk_rows(rt.r_begin + rt.lane, rt.r_end, lanes,
                [&](int64_t r) { return to_float(in[r * C + c]); },
                [&](int64_t, float x) {
                  const float d = x - shift;
                  s += d;
                  q += d * d;
                });
    }
    add_lanes(s, q, lane_s, lane_q, rt, tile, lanes, c, C, part, part + C);
  }
}

// Training: from sums (2C) = [sum d | sum d^2] (d = x - x[0, c]), writes mean and invstd (C)
// and updates running_mean and running_var (C) in place. in (M, C): its first row, the shift.
template <class T>
__global__ void __launch_bounds__(kThreads)
    batchnorm_finalize_train(float* __restrict__ mean, float* __restrict__ invstd,
                             float* __restrict__ running_mean, float* __restrict__ running_var,
                             const float* __restrict__ sums, const T* __restrict__ in, int64_t M,
                             int64_t C, float momentum, float eps) {
  const int64_t c = detail::global_thread();
  if (c >= C) return;
  const float m = static_cast<float>(M);
  const float md = sums[c] / m;                                // mean of d
  const float var = fmaxf(sums[C + c] / m - md * md, 0.0f);    // biased
  const float mu = to_float(in[c]) + md;
  mean[c] = mu;
  invstd[c] = 1.0f / sqrtf(var + eps);
  const float unbiased = var * (m / (m - 1.0f));
  running_mean[c] = (1.0f - momentum) * running_mean[c] + momentum * mu;
  running_var[c] = (1.0f - momentum) * running_var[c] + momentum * unbiased;
}

// Eval: mean = running_mean, invstd = 1 / sqrt(running_var + eps) (C each).
__global__ void __launch_bounds__(kThreads)
    batchnorm_finalize_eval(float* __restrict__ mean, float* __restrict__ invstd,
                            const float* __restrict__ running_mean,
                            const float* __restrict__ running_var, int64_t C, float eps) {
  const int64_t c = detail::global_thread();
  if (c >= C) return;
  mean[c] = running_mean[c];
  invstd[c] = 1.0f / sqrtf(running_var[c] + eps);
}

// out = (in - mean) invstd weight + bias. out, in (M, C); mean, invstd, weight, bias (C).
template <class T>
__global__ void __launch_bounds__(kThreads)
    batchnorm_normalise(T* __restrict__ out, const T* __restrict__ in,
                        const float* __restrict__ mean, const float* __restrict__ invstd,
                        const float* __restrict__ weight, const float* __restrict__ bias,
                        int64_t M, int64_t C, int64_t rows_per_block, int tile, int lanes,
                        int64_t tiles) {
  const RowTile rt(M, rows_per_block, tile);
  if (rt.lane >= lanes) return;  // no barriers below
  for (int64_t t = blockIdx.y; t < tiles; t += gridDim.y) {
    const int64_t c = t * tile + rt.u_local;
    if (c >= C) continue;
    const float mu = mean[c], rs = invstd[c], w = weight[c], b = bias[c];
    walk_rows(rt.r_begin + rt.lane, rt.r_end, lanes,
              [&](int64_t r) { return to_float(in[r * C + c]); },
              [&](int64_t r, float x) { out[r * C + c] = from_float<T>((x - mu) * rs * w + b); });
  }
}

// =============================================================================================
// backward
// =============================================================================================

// Stage 1 of the sums. partials (P, 2C): [sum dout | sum dout xhat] of each block's rows, the
// halves written only when want_dy / want_dyx. dout, in (M, C); mean, invstd (C); in, mean,
// invstd unused (may be null) unless want_dyx.
template <class T>
__global__ void __launch_bounds__(kThreads)
    batchnorm_backward_partials(float* __restrict__ partials, const T* __restrict__ dout,
                                const T* __restrict__ in, const float* __restrict__ mean,
                                const float* __restrict__ invstd, int64_t M, int64_t C,
                                int64_t rows_per_block, int tile, int lanes, int64_t tiles,
                                bool want_dy, bool want_dyx) {
  __shared__ float lane_a[kThreads], lane_b[kThreads];
  const RowTile rt(M, rows_per_block, tile);
  float* part = partials + static_cast<int64_t>(blockIdx.x) * 2 * C;
  for (int64_t t = blockIdx.y; t < tiles; t += gridDim.y) {  // uniform over the block
    const int64_t c = t * tile + rt.u_local;
    float sdy = 0.0f, sdyx = 0.0f;
    if (rt.lane < lanes && c < C) {
      const float mu = want_dyx ? mean[c] : 0.0f, rs = want_dyx ? invstd[c] : 0.0f;
      if (want_dyx) {  // uniform over the grid
        walk_rows(rt.r_begin + rt.lane, rt.r_end, lanes,
                  [&](int64_t r) {
                    return make_float2(to_float(dout[r * C + c]), to_float(in[r * C + c]));
                  },
                  [&](int64_t, float2 v) {
                    sdy += v.x;
                    sdyx += v.x * ((v.y - mu) * rs);
                  });
      } else {
        walk_rows(rt.r_begin + rt.lane, rt.r_end, lanes,
                  [&](int64_t r) { return to_float(dout[r * C + c]); },
                  [&](int64_t, float dy) { sdy += dy; });
      }
    }
    add_lanes(sdy, sdyx, lane_a, lane_b, rt, tile, lanes, c, C, want_dy ? part : nullptr,
              want_dyx ? part + C : nullptr);
  }
}

// din. training: weight invstd (dout - sum_dy / M - xhat sum_dyx / M); eval: dout weight
// invstd. din, dout, in (M, C); weight, mean, invstd, sum_dy, sum_dyx (C); in, mean, sum_dy
// and sum_dyx unused (may be null) in eval.
template <class T, bool kTraining>
__global__ void __launch_bounds__(kThreads)
    batchnorm_backward_din(T* __restrict__ din, const T* __restrict__ dout,
                           const T* __restrict__ in, const float* __restrict__ weight,
                           const float* __restrict__ mean, const float* __restrict__ invstd,
                           const float* __restrict__ sum_dy, const float* __restrict__ sum_dyx,
                           int64_t M, int64_t C, int64_t rows_per_block, int tile, int lanes,
                           int64_t tiles) {
  const RowTile rt(M, rows_per_block, tile);
  if (rt.lane >= lanes) return;  // no barriers below
  const float m = static_cast<float>(M);
  for (int64_t t = blockIdx.y; t < tiles; t += gridDim.y) {
    const int64_t c = t * tile + rt.u_local;
    if (c >= C) continue;
    const float rs = invstd[c], k = weight[c] * rs;
    if constexpr (kTraining) {
      const float mu = mean[c], mean_dy = sum_dy[c] / m, mean_dyx = sum_dyx[c] / m;
      walk_rows(rt.r_begin + rt.lane, rt.r_end, lanes,
                [&](int64_t r) {
                    return make_float2(to_float(dout[r * C + c]), to_float(in[r * C + c]));
                  },
                [&](int64_t r, float2 v) {
                  const float xhat = (v.y - mu) * rs;
                  din[r * C + c] = from_float<T>(k * (v.x - mean_dy - xhat * mean_dyx));
                });
    } else {
      walk_rows(rt.r_begin + rt.lane, rt.r_end, lanes,
                [&](int64_t r) { return to_float(dout[r * C + c]); },
                [&](int64_t r, float dy) { din[r * C + c] = from_float<T>(k * dy); });
    }
  }
}

// The launch shape of the passes over the activations (M >= 1, C >= 1).
struct Plan {
  int64_t P, rows_per_block;
  detail::ColumnTiling ct;
  dim3 grid() const {
    return dim3(static_cast<unsigned>(P),
                static_cast<unsigned>(std::min<int64_t>(ct.tiles, detail::kMaxGridY)));
  }
};
Plan plan_for(int64_t M, int64_t C) {
  return {detail::row_partitions(M), detail::rows_per_partition(M), detail::column_tiling(C)};
}

unsigned channel_grid(int64_t C) { return static_cast<unsigned>((C + kThreads - 1) / kThreads); }

}  // namespace

int64_t batchnorm_workspace_floats(int64_t M, int64_t C) {
  if (M <= 0 || C <= 0) return 0;
  return (detail::row_partitions(M) + 1) * 2 * C;  // partials (P, 2C), then the sums (2C)
}

// ================================ forward ================================
template <class T>
void batchnorm_forward(T* out, float* mean, float* invstd, float* running_mean,
                       float* running_var, const std::type_identity_t<T>* in,
                       const float* weight, const float* bias, int64_t M, int64_t C,
                       bool training, double momentum, double eps, float* workspace,
                       cudaStream_t stream) {
  using D = detail::device_t<T>;  // float or __nv_bfloat16
  if (C <= 0) return;
  CNX_CHECK(!training || M >= 2, "batchnorm_forward: training needs at least 2 rows, got ", M);
  const float feps = static_cast<float>(eps);
  if (!training) {
    launch<batchnorm_finalize_eval>(channel_grid(C), kThreads, 0, stream, mean, invstd,
                                    static_cast<const float*>(running_mean),
                                    static_cast<const float*>(running_var), C, feps);
    CNX_CUDA_LAUNCH_CHECK();
    if (M == 0) return;
  }
  const Plan pl = plan_for(M, C);
  if (training) {
    float* partials = workspace;
    float* sums = workspace + pl.P * 2 * C;
    launch<batchnorm_stats_partials<D>>(pl.grid(), kThreads, 0, stream, partials,
                                        detail::dev(in), M, C, pl.rows_per_block, pl.ct.tile,
                                        pl.ct.lanes, pl.ct.tiles);
    CNX_CUDA_LAUNCH_CHECK();
    detail::launch_column_sums(sums, sums + C, partials, pl.P, 2 * C, C, stream);
    launch<batchnorm_finalize_train<D>>(channel_grid(C), kThreads, 0, stream, mean, invstd,
                                        running_mean, running_var,
                                        static_cast<const float*>(sums), detail::dev(in), M, C,
                                        static_cast<float>(momentum), feps);
    CNX_CUDA_LAUNCH_CHECK();
  }
  launch<batchnorm_normalise<D>>(pl.grid(), kThreads, 0, stream, detail::dev(out),
                                 detail::dev(in), static_cast<const float*>(mean),
                                 static_cast<const float*>(invstd), weight, bias, M, C,
                                 pl.rows_per_block, pl.ct.tile, pl.ct.lanes, pl.ct.tiles);
  CNX_CUDA_LAUNCH_CHECK();
}

// ================================ backward ================================
template <class T>
void batchnorm_backward(std::type_identity_t<T>* din, float* dweight, float* dbias,
                        const T* dout, const std::type_identity_t<T>* in, const float* weight,
                        const float* mean, const float* invstd, int64_t M, int64_t C,
                        bool training, float* workspace, cudaStream_t stream) {
  using D = detail::device_t<T>;  // float or __nv_bfloat16
  if (C <= 0) return;
  if (M <= 0) {  // sums over no rows; din is empty
    if (dweight) CNX_CUDA_CHECK(cudaMemsetAsync(dweight, 0, C * sizeof(float), stream));
    if (dbias) CNX_CUDA_CHECK(cudaMemsetAsync(dbias, 0, C * sizeof(float), stream));
    return;
  }
  const Plan pl = plan_for(M, C);
  const bool din_sums = din != nullptr && training;  // training din needs both sums
  const bool want_dy = dbias != nullptr || din_sums, want_dyx = dweight != nullptr || din_sums;
  float* sums = workspace + pl.P * 2 * C;  // where a sum nobody asked for goes
  float* sum_dy = dbias ? dbias : sums;
  float* sum_dyx = dweight ? dweight : sums + C;
  if (want_dy || want_dyx) {
    float* partials = workspace;
    launch<batchnorm_backward_partials<D>>(pl.grid(), kThreads, 0, stream, partials,
                                           detail::dev(dout), detail::dev(in), mean, invstd, M, C,
                                           pl.rows_per_block, pl.ct.tile, pl.ct.lanes,
                                           pl.ct.tiles, want_dy, want_dyx);
    CNX_CUDA_LAUNCH_CHECK();
    detail::launch_column_sums(want_dy ? sum_dy : nullptr, want_dyx ? sum_dyx : nullptr,
                               partials, pl.P, 2 * C, C, stream);
  }
  if (!din) return;
  if (training) {
    launch<batchnorm_backward_din<D, true>>(
        pl.grid(), kThreads, 0, stream, detail::dev(din), detail::dev(dout), detail::dev(in),
        weight, mean, invstd, static_cast<const float*>(sum_dy),
        static_cast<const float*>(sum_dyx), M, C, pl.rows_per_block, pl.ct.tile, pl.ct.lanes,
        pl.ct.tiles);
  } else {
    launch<batchnorm_backward_din<D, false>>(
        pl.grid(), kThreads, 0, stream, detail::dev(din), detail::dev(dout), detail::dev(in),
        weight, mean, invstd, static_cast<const float*>(nullptr),
        static_cast<const float*>(nullptr), M, C, pl.rows_per_block, pl.ct.tile, pl.ct.lanes,
        pl.ct.tiles);
  }
  CNX_CUDA_LAUNCH_CHECK();
}

#define CNX_INSTANTIATE(T)                                                                      \
  template void batchnorm_forward<T>(T*, float*, float*, float*, float*, const T*, const float*, \
                                     const float*, int64_t, int64_t, bool, double, double,       \
                                     float*, cudaStream_t);                                      \
  template void batchnorm_backward<T>(T*, float*, float*, const T*, const T*, const float*,      \
                                      const float*, const float*, int64_t, int64_t, bool, float*, \
                                      cudaStream_t);
CNX_INSTANTIATE(float)
CNX_INSTANTIATE(bf16)
#undef CNX_INSTANTIATE

}  // namespace cnx::cuda
