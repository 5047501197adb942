// CUDA multi-tensor EMA update (see kernels/ema.h for the update and the contract).
//
// Launch layout: kernels/cuda/multi_tensor.cuh, up to 96 slots per launch (~3.1 KB of kernel
// parameters, under the classic 4 KB limit), 4096 elements a block. ConvNeXt-T's 182 tensors
// take 2 launches. The skip flag is read by every block before it
// touches memory: a skipped step costs the launches and nothing else.
#include <cuda_runtime.h>

#include <algorithm>

#include "kernels/cuda/launch.cuh"
#include "kernels/cuda/multi_tensor.cuh"
#include "kernels/cuda/vec.cuh"
#include "kernels/ema.h"
#include "tensor/cuda_check.h"

namespace cnx::cuda {

namespace {

constexpr int kThreads = 256;
constexpr int kSlotsPerLaunch = 96;
constexpr int64_t kChunk = 4096;  // elements per block: 256 threads x 4 float4 x 4

struct EmaTable {  // a multi_tensor.cuh table
  EmaSlot slot[kSlotsPerLaunch];
  int64_t block_start[kSlotsPerLaunch + 1];  // block_start[count] = blocks of the launch
  const float* skip;                         // () or nullptr
  float decay, one_minus_decay;
  int count;
};
static_assert(sizeof(EmaTable) <= 4096, "kernel parameters must stay under 4 KB");

// ModelEma::update's loop body: e * d + (1 - d) * p, one rounding per operation.
__device__ __forceinline__ float ema_element(float e, float p, float d, float one_minus_d) {
  return __fadd_rn(__fmul_rn(e, d), __fmul_rn(one_minus_d, p));
}

__global__ void __launch_bounds__(kThreads) ema_kernel(const __grid_constant__ EmaTable table) {
  if (table.skip != nullptr && *table.skip != 0.0f) return;  // the whole grid leaves
  const float d = table.decay, omd = table.one_minus_decay;
  const int64_t blocks = table.block_start[table.count];
  for (int64_t b = blockIdx.x; b < blocks; b += gridDim.x) {  // uniform over the block
    const int s = detail::slot_of_block(table, b);
    const EmaSlot& slot = table.slot[s];
    const auto [begin, end] = detail::chunk_of_block(table, s, b, kChunk);
    float* const e = slot.ema;
    const float* const p = slot.param;
    int64_t i = begin + threadIdx.x;  // first scalar element of this thread
    if (((reinterpret_cast<uintptr_t>(e) | reinterpret_cast<uintptr_t>(p)) & 15u) == 0) {
      const int64_t end4 = begin + (end - begin) / 4 * 4;  // begin is a multiple of 4: aligned
      for (int64_t j = begin + 4 * threadIdx.x; j < end4; j += 4 * kThreads) {
        float4 e4 = detail::load4(e + j);
        const float4 p4 = detail::load4(p + j);
        e4.x = ema_element(e4.x, p4.x, d, omd);
        e4.y = ema_element(e4.y, p4.y, d, omd);
        e4.z = ema_element(e4.z, p4.z, d, omd);
        e4.w = ema_element(e4.w, p4.w, d, omd);
        detail::store4(e + j, e4);
      }
      i = end4 + threadIdx.x;
    }
    for (; i < end; i += kThreads) e[i] = ema_element(e[i], p[i], d, omd);
  }
}

}  // namespace

void ema_update(const EmaSlot* slots, int64_t count, float decay, float one_minus_decay,
                const float* skip, cudaStream_t stream) {
  EmaTable table{};
  table.skip = skip;
  table.decay = decay;
  table.one_minus_decay = one_minus_decay;
  detail::for_each_table(table, slots, count, kChunk, [&](const EmaTable& t) {
    launch<ema_kernel>(detail::grid_for(t), kThreads, 0, stream, t);
    CNX_CUDA_LAUNCH_CHECK();
  });
}

}  // namespace cnx::cuda
