// The launch layout shared by the multi-tensor kernels (kernels/cuda/adamw.cu, ema.cu,
// grad_norm.cu): many tensors of different sizes updated by one launch, with no device memory
// allocated for the bookkeeping. (Include only from .cu files.)
//
// A launch's tensors ("slots") travel to the kernel by value, in a table that is the kernel's
// only parameter (or one of them), passed __grid_constant__ so that indexing it with a run-time
// slot number reads the parameter space directly instead of copying the table to local memory.
// The classic limit on kernel parameters is 4 KB, so a table holds a few dozen slots and a long
// list of tensors takes several launches.
//
// Every slot is cut into chunks of a fixed number of elements; block_start is the prefix sum of
// the chunks per slot, and block b of the launch works on chunk b - block_start[s] of the slot
// s with block_start[s] <= b < block_start[s + 1]: a binary search over block_start, the same
// for every thread of the block (uniform: no divergence). Grids are capped at kMaxGrid blocks;
// a larger launch has its blocks loop over b (b += gridDim.x).
//
// A table type is any struct with these members (plus whatever else its kernel needs):
//   Slot slot[kCapacity];                  each slot has an `int64_t n` (its elements)
//   int64_t block_start[kCapacity + 1];    block_start[count] = blocks of the launch
//   int count;                             slots in use
#pragma once

#include <algorithm>
#include <cstdint>

#include "kernels/cuda/launch.cuh"

namespace cnx::cuda::detail {

constexpr int64_t kMaxGrid = int64_t(1) << 24;  // larger launches loop over blockIdx.x

// The slot that block b works on: the last one that starts at or before b (slots without
// elements never reach a table, so the starts strictly increase).
template <class Table>
__device__ __forceinline__ int slot_of_block(const Table& table, int64_t b) {
  int lo = 0, hi = table.count - 1;
  while (lo < hi) {
    const int mid = (lo + hi + 1) / 2;
    if (table.block_start[mid] <= b) lo = mid;
    else hi = mid - 1;
  }
  return lo;
}

// The element range [begin, end) of slot `s` that block b works on, `chunk` elements a block.
struct ChunkRange {
  int64_t begin, end;
};
template <class Table>
__device__ __forceinline__ ChunkRange chunk_of_block(const Table& table, int s, int64_t b,
                                                     int64_t chunk) {
  const int64_t begin = (b - table.block_start[s]) * chunk;
  const int64_t n = table.slot[s].n;
  return {begin, begin + chunk < n ? begin + chunk : n};
}

// The grid of a launch of `table`: one block per chunk, at most kMaxGrid.
template <class Table> unsigned grid_for(const Table& table) {
  return static_cast<unsigned>(std::min<int64_t>(table.block_start[table.count], kMaxGrid));
}

// Fills `table` (its other members already set by the caller) with the non-empty slots of
// `slots`, `chunk` elements a block, and calls launch_table(table) each time it is full and once
// for the rest. The launch copies the parameters, so the table is reused; launch_table may
// change the table's own members (grad_norm.cu advances its partial offset), never the slots.
template <class Table, class Slot, class Launch>
void for_each_table(Table& table, const Slot* slots, int64_t count, int64_t chunk,
                    Launch&& launch_table) {
  constexpr int kCapacity = static_cast<int>(sizeof(table.slot) / sizeof(table.slot[0]));
  table.count = 0;
  table.block_start[0] = 0;
  for (int64_t k = 0; k < count; ++k) {
    if (slots[k].n <= 0) continue;
    table.slot[table.count] = slots[k];
    table.block_start[table.count + 1] =
        table.block_start[table.count] + (slots[k].n + chunk - 1) / chunk;
    if (++table.count == kCapacity) {
      launch_table(table);
      table.count = 0;
    }
  }
  if (table.count > 0) launch_table(table);
}

}  // namespace cnx::cuda::detail
