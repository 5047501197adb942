// CUDA pack and unpack of the data-parallel gradient buckets (see kernels/grad_bucket.h for the
// math and the contract).
//
// Launch layout: kernels/cuda/multi_tensor.cuh, up to 96 slots per launch (~3.1 KB of kernel
// parameters, under the classic 4 KB limit), 4096 elements a block. A gradient's offset in its
// bucket need not be a multiple of 4, so each block takes the float4 path only when both of its
// slot's pointers are 16-byte aligned, and the scalar loop otherwise (the buffers themselves
// start 512-byte aligned, so most slots of a real model take the float4 path).
#include <cuda_runtime.h>

#include "kernels/cuda/launch.cuh"
#include "kernels/cuda/multi_tensor.cuh"
#include "kernels/cuda/vec.cuh"
#include "kernels/grad_bucket.h"
#include "tensor/cuda_check.h"

namespace cnx::cuda {

namespace {

constexpr int kThreads = 256;
constexpr int kSlotsPerLaunch = 96;
constexpr int64_t kChunk = 4096;  // elements per block: 256 threads x 4 float4 x 4

struct BucketTable {  // a multi_tensor.cuh table
  BucketSlot slot[kSlotsPerLaunch];
  int64_t block_start[kSlotsPerLaunch + 1];  // block_start[count] = blocks of the launch
  float scale;                               // unpack only
  int count;
};
static_assert(sizeof(BucketTable) <= 4096, "kernel parameters must stay under 4 KB");

// kPack: flat <- grad; otherwise grad <- flat * scale (one rounding: __fmul_rn, never an FMA).
template <bool kPack>
__global__ void __launch_bounds__(kThreads) bucket_kernel(const __grid_constant__ BucketTable table) {
  const int64_t blocks = table.block_start[table.count];
  const float scale = table.scale;
  for (int64_t b = blockIdx.x; b < blocks; b += gridDim.x) {  // uniform over the block
    const int s = detail::slot_of_block(table, b);
    const BucketSlot& slot = table.slot[s];
    const auto [begin, end] = detail::chunk_of_block(table, s, b, kChunk);
    float* const g = slot.grad;
    float* const f = slot.flat;
    int64_t i = begin + threadIdx.x;  // first scalar element of this thread
    if (((reinterpret_cast<uintptr_t>(g) | reinterpret_cast<uintptr_t>(f)) & 15u) == 0) {
      const int64_t end4 = begin + (end - begin) / 4 * 4;  // begin is a multiple of 4: aligned
      for (int64_t j = begin + 4 * threadIdx.x; j < end4; j += 4 * kThreads) {
        if constexpr (kPack) {
          detail::store4(f + j, detail::load4(g + j));
        } else {
          float4 v = detail::load4(f + j);
          v.x = __fmul_rn(v.x, scale);
          v.y = __fmul_rn(v.y, scale);
          v.z = __fmul_rn(v.z, scale);
          v.w = __fmul_rn(v.w, scale);
          detail::store4(g + j, v);
        }
      }
      i = end4 + threadIdx.x;
    }
    for (; i < end; i += kThreads) {
      if constexpr (kPack) f[i] = g[i];
      else g[i] = __fmul_rn(f[i], scale);
    }
  }
}

template <bool kPack>
void launch_bucket(const BucketSlot* slots, int64_t count, float scale, cudaStream_t stream) {
  BucketTable table{};
  table.scale = scale;
  detail::for_each_table(table, slots, count, kChunk, [&](const BucketTable& t) {
    launch<bucket_kernel<kPack>>(detail::grid_for(t), kThreads, 0, stream, t);
    CNX_CUDA_LAUNCH_CHECK();
  });
}

}  // namespace

void bucket_pack(const BucketSlot* slots, int64_t count, cudaStream_t stream) {
  launch_bucket<true>(slots, count, 1.0f, stream);
}

void bucket_unpack(const BucketSlot* slots, int64_t count, float scale, cudaStream_t stream) {
  launch_bucket<false>(slots, count, scale, stream);
}

}  // namespace cnx::cuda
