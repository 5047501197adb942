// CUDA multi-tensor AdamW (see kernels/adamw.h for the update and the contract).
//
// Launch: kernels/cuda/multi_tensor.cuh, up to 48 slots per launch in an AdamWTable (~3.8 KB of
// kernel parameters, under the classic 4 KB limit), chunks of 4096 elements a block. 256 threads
// a block, 16 elements a thread per chunk (float4 when the four f32 pointers of the slot are
// 16-byte aligned and the bf16 copy, if any, 8-byte aligned; the chunk's n % 4 tail scalar).
// ConvNeXt-T's 182 tensors take 4 launches. With a skip flag, every block reads it first and
// leaves at once when it is set: a skipped step costs the launches and nothing else.
//
// The bf16 copy: the new p is in a register already, so bf16(p) costs 2 bytes of writes per
// element here instead of a 4-byte read and a 2-byte write in a cast kernel per forward. The
// rounding is detail::from_float<__nv_bfloat16>, the cast kernel's (kernels/cuda/cast.cu).
//
// Arithmetic: the float operations of AdamW::step's loop (train/optim/adamw.cpp) one by one,
// with the _rn intrinsics so that nvcc cannot contract a multiply and an add into an FMA (the
// CPU build has no FMA), and IEEE sqrt and division: bitwise the CPU result.
#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include <algorithm>

#include "kernels/adamw.h"
#include "kernels/cuda/launch.cuh"
#include "kernels/cuda/multi_tensor.cuh"
#include "kernels/cuda/vec.cuh"
#include "tensor/cuda_check.h"

namespace cnx::cuda {

namespace {

constexpr int kThreads = 256;
constexpr int kSlotsPerLaunch = 48;
constexpr int64_t kChunk = 4096;  // elements per block: 256 threads x 4 float4 x 4

struct AdamWTable {  // a multi_tensor.cuh table
  AdamWSlot slot[kSlotsPerLaunch];
  int64_t block_start[kSlotsPerLaunch + 1];  // block_start[count] = blocks of the launch
  const float* skip;  // () or nullptr
  int count;
  AdamWScalars s;
};
static_assert(sizeof(AdamWTable) <= 4096, "kernel parameters must stay under 4 KB");

// The per-step scalars of one slot: from the device memory its `scalars` points to (rewritten
// before each replay of a captured step), else the inline fields (kernels/adamw.h).
struct StepScalars {
  float neg_step_size, bias_correction2_sqrt, decay_mul;
};
__device__ __forceinline__ StepScalars step_scalars(const AdamWSlot& slot) {
  if (slot.scalars != nullptr) return {slot.scalars[0], slot.scalars[1], slot.scalars[2]};
  return {slot.neg_step_size, slot.bias_correction2_sqrt, slot.decay_mul};
}

// One element: the loop body of AdamW::step, operation for operation.
__device__ __forceinline__ void adamw_element(float& p, float& m, float& v, float g,
                                              const StepScalars& step, const AdamWScalars& s) {
  const float pk = __fmul_rn(p, step.decay_mul);                          // param.mul_(1 - lr wd)
  const float mk = __fadd_rn(__fmul_rn(m, s.beta1), __fmul_rn(s.one_minus_beta1, g));
  const float vk = __fadd_rn(__fmul_rn(v, s.beta2),
                             __fmul_rn(__fmul_rn(s.one_minus_beta2, g), g));
  const float denom = __fadd_rn(__fdiv_rn(__fsqrt_rn(vk), step.bias_correction2_sqrt), s.eps);
  p = __fadd_rn(pk, __fdiv_rn(__fmul_rn(step.neg_step_size, mk), denom));  // addcdiv_(m, denom)
  m = mk;
  v = vk;
}

__global__ void __launch_bounds__(kThreads) adamw_kernel(const __grid_constant__ AdamWTable table) {
  if (table.skip != nullptr && *table.skip != 0.0f) return;  // the whole grid leaves
  const int64_t blocks = table.block_start[table.count];
  for (int64_t b = blockIdx.x; b < blocks; b += gridDim.x) {  // uniform over the block
    const int s = detail::slot_of_block(table, b);
    const AdamWSlot& slot = table.slot[s];
    const auto [begin, end] = detail::chunk_of_block(table, s, b, kChunk);
    const StepScalars step = step_scalars(slot);  // each thread reads them once per chunk
    float* const param = slot.param;
    const float* const grad = slot.grad;
    float* const m = slot.exp_avg;
    float* const v = slot.exp_avg_sq;
    __nv_bfloat16* const pb = reinterpret_cast<__nv_bfloat16*>(slot.param_bf16);  // (n) or null
    const bool vec = ((reinterpret_cast<uintptr_t>(param) | reinterpret_cast<uintptr_t>(grad) |
                       reinterpret_cast<uintptr_t>(m) | reinterpret_cast<uintptr_t>(v)) & 15u) == 0 &&
                     (reinterpret_cast<uintptr_t>(pb) & 7u) == 0;  // 4 bf16: one 8-byte store
    int64_t i = begin + threadIdx.x;  // first scalar element of this thread
    if (vec) {  // begin is a multiple of 4 (kChunk is), so every float4 here is aligned
      const int64_t end4 = begin + (end - begin) / 4 * 4;
      for (int64_t j = begin + 4 * threadIdx.x; j < end4; j += 4 * kThreads) {
        float4 p4 = detail::load4(param + j), m4 = detail::load4(m + j), v4 = detail::load4(v + j);
        const float4 g4 = detail::load4(grad + j);
        adamw_element(p4.x, m4.x, v4.x, g4.x, step, table.s);
        adamw_element(p4.y, m4.y, v4.y, g4.y, step, table.s);
        adamw_element(p4.z, m4.z, v4.z, g4.z, step, table.s);
        adamw_element(p4.w, m4.w, v4.w, g4.w, step, table.s);
        detail::store4(param + j, p4);
        detail::store4(m + j, m4);
        detail::store4(v + j, v4);
        if (pb != nullptr) {
          alignas(8) __nv_bfloat16 h[4] = {
              detail::from_float<__nv_bfloat16>(p4.x), detail::from_float<__nv_bfloat16>(p4.y),
              detail::from_float<__nv_bfloat16>(p4.z), detail::from_float<__nv_bfloat16>(p4.w)};
          *reinterpret_cast<uint2*>(pb + j) = *reinterpret_cast<const uint2*>(h);
        }
      }
      i = end4 + threadIdx.x;
    }
    for (; i < end; i += kThreads) {
      float pk = param[i], mk = m[i], vk = v[i];
      adamw_element(pk, mk, vk, grad[i], step, table.s);
      param[i] = pk;
      m[i] = mk;
      v[i] = vk;
      if (pb != nullptr) pb[i] = detail::from_float<__nv_bfloat16>(pk);
    }
  }
}

}  // namespace

void adamw_step(const AdamWSlot* slots, int64_t count, AdamWScalars s, const float* skip,
                cudaStream_t stream) {
  AdamWTable table{};
  table.s = s;
  table.skip = skip;
  detail::for_each_table(table, slots, count, kChunk, [&](const AdamWTable& t) {
    launch<adamw_kernel>(detail::grid_for(t), kThreads, 0, stream, t);
    CNX_CUDA_LAUNCH_CHECK();
  });
}

}  // namespace cnx::cuda
