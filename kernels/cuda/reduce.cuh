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
//    adds the P rows of each column in index order.
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

// out_a[j] = sum_p partials[p, j] for j < split, out_b[j - split] = the same for j >= split,
// the P rows added in index order p = 0, 1, ... (each thread adds a strided subset of the rows
// in order, then the 8 subsets are added in order). A null output is skipped and its columns
// are not read. partials: (P, width) row-major. Block (32, 8): 32 columns x 8 row subsets.
// (This and its launcher are templates only so that the .cu files that include this header
// without using them compile neither.)
template <int kUnused = 0>
__global__ void __launch_bounds__(256)
    column_sums_kernel(float* __restrict__ out_a, float* __restrict__ out_b,
                       const float* __restrict__ partials, int64_t P, int64_t width,
                       int64_t split) {
  __shared__ float part[8][33];
  const int64_t j = static_cast<int64_t>(blockIdx.x) * 32 + threadIdx.x;
  float* const out = j < split ? out_a : out_b;
  const bool active = j < width && out != nullptr;
  float acc = 0.0f;
  if (active)
    for (int64_t p = threadIdx.y; p < P; p += 8) acc += partials[p * width + j];
  part[threadIdx.y][threadIdx.x] = acc;
  __syncthreads();
  if (threadIdx.y == 0 && active) {
    float total = part[0][threadIdx.x];
#pragma unroll
    for (int k = 1; k < 8; ++k) total += part[k][threadIdx.x];
    out[j < split ? j : j - split] = total;
  }
}

// Stage 2: launches column_sums_kernel (P >= 1, width >= 1).
template <int kUnused = 0>
void launch_column_sums(float* out_a, float* out_b, const float* partials, int64_t P,
                               int64_t width, int64_t split, cudaStream_t stream) {
  const unsigned grid = static_cast<unsigned>((width + 31) / 32);
  launch<column_sums_kernel<kUnused>>(grid, dim3(32, 8), 0, stream, out_a, out_b, partials, P,
                                      width, split);
  CNX_CUDA_LAUNCH_CHECK();
}

}  // namespace

}  // namespace cnx::cuda::detail
