// Deterministic reductions shared by the kernels in kernels/cuda/*.cu (include only from .cu
// files). Every reduction here adds in an order fixed by the launch shape alone (butterflies
// over lanes, then warps in index order, then partials in index order), never with atomics, so
// the same inputs and sizes give bitwise the same result on every run.
//
//  - warp / lane-group sums and maxima (xor butterflies: every lane ends with the total);
//  - block_reduce: a 1-D block's total, returned to every thread;
//  - the partial-sum layout of the two-stage parameter-gradient reductions (LayerNorm's dweight
//    and dbias, layer scale's dgamma): stage 1 writes one row of per-column partial sums per
//    block of rows into the workspace, (P, width) row-major; stage 2, launch_column_sums below,
//    adds the P rows of each column in a fixed order (groups of 64 rows in parallel, then the
//    group sums).
//  - row_partitions: how many blocks of rows stage 1 uses. A function of the row count only (not
//    of the device), so the caller can size the workspace and the result does not depend on
//    which GPU ran it.
#pragma once

#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>

#include "kernels/cuda/launch.cuh"
#include "kernels/cuda/vec.cuh"
#include "tensor/cuda_check.h"

namespace cnx::cuda::detail {

constexpr unsigned kFullMask = 0xffffffffu;

// ---- lanes and warps -------------------------------------------------------------------------

// Sum over each aligned group of kWidth lanes (kWidth a power of two <= 32); every lane of the
// group receives its group's total. All 32 lanes of the warp must call it.
template <int kWidth = 32, class T> __device__ __forceinline__ T group_sum(T v) {
#pragma unroll
  for (int offset = kWidth / 2; offset > 0; offset /= 2) v += __shfl_xor_sync(kFullMask, v, offset);
  return v;
}
template <int kWidth = 32> __device__ __forceinline__ float group_max(float v) {
#pragma unroll
  for (int offset = kWidth / 2; offset > 0; offset /= 2)
    v = fmaxf(v, __shfl_xor_sync(kFullMask, v, offset));
  return v;
}

// The sum over every block lane that has the same (lane % kWidth) position, i.e. across the
// 32 / kWidth groups of a warp: the butterfly over the offsets kWidth .. 16.
template <int kWidth, class T> __device__ __forceinline__ T across_groups_sum(T v) {
#pragma unroll
  for (int offset = kWidth; offset < 32; offset *= 2) v += __shfl_xor_sync(kFullMask, v, offset);
  return v;
}

// ---- blocks ----------------------------------------------------------------------------------

struct SumOp {
  template <class T> __device__ T operator()(T a, T b) const { return a + b; }
};
struct MaxOp {
  __device__ float operator()(float a, float b) const { return fmaxf(a, b); }
};

// The reduction of v over all threads of a 1-D block (blockDim.x a multiple of 32, <= 1024),
// returned to every thread. `scratch` is __shared__ T[32]; every thread of the block must call
// this (it synchronises), and the scratch may be reused as soon as it returns. `identity` is
// the neutral element (0 for a sum, -inf for a max).
template <class T, class Op>
__device__ T block_reduce(T v, Op op, T identity, T* scratch) {
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32, nwarps = blockDim.x / 32;
#pragma unroll
  for (int offset = 16; offset > 0; offset /= 2) v = op(v, __shfl_xor_sync(kFullMask, v, offset));
  if (lane == 0) scratch[warp] = v;
  __syncthreads();
  v = lane < nwarps ? scratch[lane] : identity;  // every warp reduces the warp totals alike
#pragma unroll
  for (int offset = 16; offset > 0; offset /= 2) v = op(v, __shfl_xor_sync(kFullMask, v, offset));
  __syncthreads();  // scratch may be rewritten after this
  return v;
}

// ---- two-stage reductions over rows ----------------------------------------------------------

// Stage 1 of a reduction over `rows` rows splits them into P blocks of rows_per_partition()
// consecutive rows (the last ones possibly short or empty). At least 32 rows per block keep
// the partials (P x width floats written and read again) under ~3% of the bytes of the main
// pass for LayerNorm and layer scale; at most 2048 blocks are plenty to fill any GPU
// (an H100 keeps 132 SMs x 2..8 blocks resident) with an even tail.
constexpr int64_t kMinRowsPerPartition = 32;
constexpr int64_t kMaxPartitions = 2048;

inline int64_t row_partitions(int64_t rows) {
  return std::clamp<int64_t>((rows + kMinRowsPerPartition - 1) / kMinRowsPerPartition, 1,
                             kMaxPartitions);
}
inline int64_t rows_per_partition(int64_t rows) {
  const int64_t P = row_partitions(rows);
  return (rows + P - 1) / P;
}

// How a block of kBlockThreads threads covers `units` columns (a unit is one float or one
// float4) while looping over rows: `tile` columns side by side, `lanes` rows at a time
// (thread t: column t % tile, row lane t / tile; threads past tile * lanes idle). A tile of at
// most 32 units keeps a warp on one row's contiguous bytes (coalesced) and leaves >= 8 row
// lanes for memory-level parallelism.
struct ColumnTiling {
  int tile, lanes;
  int64_t tiles;  // ceil(units / tile): blocks across the columns
};
inline ColumnTiling column_tiling(int64_t units, int max_tile = 32) {
  const int tile = static_cast<int>(std::min<int64_t>(units, max_tile));
  return {tile, kBlockThreads / tile, (units + tile - 1) / tile};
}

// The highest gridDim.y / gridDim.z; kernels whose y index may need more loop over it.
constexpr int64_t kMaxGridY = 65535;

namespace {

// Stage 2 adds the P partial rows of each column. One block per 32 columns walking all P rows
// would leave the GPU nearly idle (ceil(width / 32) blocks: 3 for layer scale at C = 96, each
// adding up to 2048 rows), so the rows are split across blocks too, in two passes:
//   pass 1: grid (column tiles, G), G = ceil(P / kColumnSumGroupRows): block (t, g) adds the
//           rows [g * 64, (g + 1) * 64) of its 32 columns and writes the group's sum over the
//           group's first row, partials[g * 64, :] (in place: only this block reads that group);
//   pass 2: grid (column tiles, 1): adds the G group sums (rows 0, 64, 128, ...) in order g = 0,
//           1, ... into the outputs.
// With P <= 64 pass 2 alone adds the P rows. Every sum has a fixed order (below), set by P and
// width alone, so the result is bitwise the same on every run, GPU and emulator schedule, and
// the longest chain of sequential adds is 64 / 8 + 8 + 32 / 8 + 8 = 28 (P <= 2048).
constexpr int64_t kColumnSumGroupRows = 64;

// One pass of stage 2. partials: (P, width) row-major. Block (t, y) adds, for its 32 columns
// j = 32 t + threadIdx.x, the `count` rows r_u = (y * count + u) * stride, u = 0 .. count - 1,
// that are < P: thread (x, ty) adds the rows u = ty, ty + 8, ... in order, then the 8 subsets are
// added in order ty = 0 .. 7. kFinal: the sum goes to out_a[j] for j < split, out_b[j - split]
// for j >= split; otherwise over the first of the block's rows, partials[r_0, j]. A column whose
// output is null is neither read nor written. Block (32, 8). (kUnused: see launch_column_sums.)
template <bool kFinal, int kUnused>
__global__ void __launch_bounds__(256)
    column_sums_kernel(float* __restrict__ out_a, float* __restrict__ out_b,
                       float* __restrict__ partials, int64_t P, int64_t width, int64_t split,
                       int64_t count, int64_t stride) {
  __shared__ float part[8][33];
  const int64_t j = static_cast<int64_t>(blockIdx.x) * 32 + threadIdx.x;
  float* const out = j < split ? out_a : out_b;
  const bool active = j < width && out != nullptr;
  const int64_t first = static_cast<int64_t>(blockIdx.y) * count;  // u of the block's row 0
  float acc = 0.0f;
  if (active)
    for (int64_t u = threadIdx.y; u < count && (first + u) * stride < P; u += 8)
      acc += partials[(first + u) * stride * width + j];
  part[threadIdx.y][threadIdx.x] = acc;
  __syncthreads();  // every read of the block's rows is done before row r_0 is overwritten
  if (threadIdx.y == 0 && active) {
    float total = part[0][threadIdx.x];
#pragma unroll
    for (int k = 1; k < 8; ++k) total += part[k][threadIdx.x];
    if constexpr (kFinal) {
      out[j < split ? j : j - split] = total;
    } else {
      partials[first * stride * width + j] = total;
    }
  }
}

// Stage 2: out_a[j] = sum_p partials[p, j] for j < split, out_b[j - split] = the same for
// j >= split (P >= 1, width >= 1; a null output's columns are skipped). partials is scratch:
// pass 1 overwrites some of its rows.
// (The kernel and this launcher are templates, and in an unnamed namespace, so that the .cu files
// that include this header without using them compile neither.)
template <int kUnused = 0>
void launch_column_sums(float* out_a, float* out_b, float* partials, int64_t P, int64_t width,
                        int64_t split, cudaStream_t stream) {
  const unsigned tiles = static_cast<unsigned>((width + 31) / 32);
  int64_t count = P, stride = 1;  // pass 2 alone: all P rows
  if (P > kColumnSumGroupRows) {
    const int64_t groups = (P + kColumnSumGroupRows - 1) / kColumnSumGroupRows;
    CNX_CHECK(groups <= kMaxGridY, "column sums: too many partial rows (", P, ")");
    launch<column_sums_kernel<false, kUnused>>(dim3(tiles, static_cast<unsigned>(groups)), dim3(32, 8), 0,
                                      stream, out_a, out_b, partials, P, width, split,
                                      kColumnSumGroupRows, int64_t{1});
    CNX_CUDA_LAUNCH_CHECK();
    count = groups;  // pass 2: the group sums, rows 0, 64, 128, ...
    stride = kColumnSumGroupRows;
  }
  launch<column_sums_kernel<true, kUnused>>(dim3(tiles, 1), dim3(32, 8), 0, stream, out_a, out_b,
                                   partials, P, width, split, count, stride);
  CNX_CUDA_LAUNCH_CHECK();
}

}  // namespace

}  // namespace cnx::cuda::detail
