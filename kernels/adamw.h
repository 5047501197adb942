// The fused, multi-tensor AdamW update on the GPU: one kernel updates every parameter tensor
// (in as few launches as there are groups of 48 tensors), decoupled weight decay included.
// The optimiser (train/optim/adamw.h) computes the per-parameter scalars on the host, in
// double, exactly as AdamW::step does, and passes one AdamWSlot per parameter that has a
// gradient this step. Per element, in this order (the same float operations as the CPU loop of
// AdamW::step, never fused into FMAs, sqrt and division correctly rounded, so GPU and CPU agree
// to the last bit on the same inputs):
//
//   p  = p * decay_mul                         (decay_mul is exactly 1 when p does not decay)
//   m  = m * beta1 + one_minus_beta1 * g
//   v  = v * beta2 + one_minus_beta2 * g * g
//   p  = p + neg_step_size * m / (sqrt(v) / bias_correction2_sqrt + eps)
//
// and, when the slot has a bf16 copy of the parameter (param_bf16 not null):
//
//   param_bf16 = bf16(p)                       round to nearest even, as the cast op (kernels/cast.h)
//
// written in the same pass, so that a bf16 forward can read a copy that is always the cast of
// the fp32 master weight without casting it again (train/optim/adamw.h, AdamW::keep_bf16_copies).
//
// Where the per-step scalars come from. neg_step_size, bias_correction2_sqrt and decay_mul change
// every step (lr, weight decay and the step count go into them). They either travel inline in
// the slot, or, when the slot's `scalars` is not null, the kernel reads them from device memory
// there: three floats in the order {neg_step_size, bias_correction2_sqrt, decay_mul}, read when
// the kernel runs, not when it is launched. The second way is for CUDA graphs: a captured launch
// replays with the parameters it had at capture, so the slots (pointers and all) stay frozen,
// while the scalars are rewritten in that device memory before each replay
// (AdamW::prepare_step). The arithmetic is the same either way, bitwise.
//
// The four f32 pointers are device pointers to f32 tensors of n elements, param_bf16 to a bf16
// tensor of n elements; none of a slot's may overlap another. Layouts are irrelevant
// (elementwise).
#pragma once

#include <cstdint>

#include "kernels/stream.h"
#include "tensor/dtype.h"

namespace cnx::cuda {

// One parameter's slice of a multi-tensor AdamW step; the scalars are precomputed on the
// host exactly as train/optim/adamw.cpp computes them (see AdamW::prepare_step).
struct AdamWSlot {
  float* param;             // (n) updated in place
  const float* grad;        // (n)
  float* exp_avg;           // (n) m, updated in place
  float* exp_avg_sq;        // (n) v, updated in place
  int64_t n;
  float neg_step_size;          // -(lr_p / bias_correction1)
  float bias_correction2_sqrt;  // sqrt(1 - beta2^t)
  float decay_mul;              // 1 - lr_p * wd_p; exactly 1.0f when the parameter does not decay
  bf16* param_bf16 = nullptr;   // (n) or nullptr: gets bf16(new param), rounded to nearest even
  // (3) or nullptr: device memory holding {neg_step_size, bias_correction2_sqrt, decay_mul},
  // read by the kernel instead of the three inline fields above (which are then ignored).
  const float* scalars = nullptr;
};

struct AdamWScalars {
  float beta1, one_minus_beta1, beta2, one_minus_beta2, eps;
};

// Updates every slot (any count) with as few launches as possible: slots travel in the
// kernel's parameter block, in chunks; no device memory is allocated. `slots` is a host array
// (read before the call returns); the update runs asynchronously on `stream`. Slots with n == 0
// are skipped.
//
// `skip` (device memory, or nullptr: always update): when *skip != 0 the kernel changes
// nothing, neither parameters nor moments nor bf16 copies. The optimiser passes the flag its
// gradient-norm step computed on the device (kernels/grad_norm.h, status[2]), so a step with a
// non-finite gradient or loss is dropped without the host waiting to read that decision.
//
// The call only enqueues kernel launches (nothing allocated, no host wait), so it can be captured
// into a CUDA graph; the launches' parameters are the slots, `s` and `skip`, so a replay reads the
// scalars afresh only from slots whose `scalars` points to device memory (see the top).
void adamw_step(const AdamWSlot* slots, int64_t count, AdamWScalars s,
                const float* skip,  // () or nullptr
                cudaStream_t stream);
inline void adamw_step(const AdamWSlot* slots, int64_t count, AdamWScalars s, cudaStream_t stream) {
  adamw_step(slots, count, s, nullptr, stream);
}

}  // namespace cnx::cuda
