// Gradient-norm clipping on the GPU without the host: the total L2 norm of every gradient, the
// clip coefficient and the "skip this step" decision, computed and applied on the device in a
// handful of multi-tensor launches (train/optim/step_status.h is the optimiser-side API).
//
//   sum_sq = sum over every slot s, every element i of  double(g_s[i])^2
//   norm   = sqrt(sum_sq)                                              (double, then f32)
//   skip   = !(isfinite(norm_f32) && isfinite(loss))                   (loss: if given)
//   coef   = max_norm / (norm_f32 + 1e-6f)  in f32 (torch.nn.utils.clip_grad_norm_'s formula),
//            applied only when clip && !skip && coef < 1, else 1
//   g     *= coef                                                      (grad_scale; f32)
//
// Determinism: the squares are summed in double over fixed chunks (kGradNormChunk elements of
// one slot per block, each block's threads in a fixed order and a fixed butterfly), one partial
// per chunk in the workspace; a second one-block kernel adds the partials in a fixed order. No
// atomics: the same gradients give bitwise the same norm on every run, whatever the schedule.
// The order differs from the CPU's (train/optim/adamw.cpp sums chunks of 65536 in order), so
// the two norms agree to double rounding (relative ~1e-15), not bitwise.
//
// Status layout (f32 [4], device memory), as cnx::StepStatus::values:
//   [0] the norm before clipping   [1] the coefficient applied (1 when none)
//   [2] 1 when the step is skipped (norm or loss not finite), else 0
//   [3] the loss (NaN when none was given)
#pragma once

#include <cstdint>

#include "kernels/stream.h"

namespace cnx::cuda {

// One gradient of a multi-tensor call: n contiguous f32 elements in device memory.
struct GradSlot {
  float* grad;  // (n) read by grad_norm_status, scaled in place by grad_scale
  int64_t n;
};

// Elements one block sums into one partial (a slot of n elements has ceil(n / kGradNormChunk)
// partials).
constexpr int64_t kGradNormChunk = 16384;

// The doubles of workspace grad_norm_status needs for these slots: one per chunk (at least 1).
int64_t grad_norm_workspace_size(const GradSlot* slots, int64_t count);

// Writes status[0..3] (see the top of the file) and, when `sum_squares` is not null, the double
// sum of squares to sum_squares[0]. `workspace`: grad_norm_workspace_size(slots, count) doubles
// of device memory, overwritten. `loss`: a device f32 scalar, or nullptr (then the loss does not
// decide skip and status[3] is NaN). `clip` false: the coefficient is 1 whatever max_norm says.
// `slots` is a host array read before the call returns; everything runs asynchronously on
// `stream` (nothing is read back). Slots with n == 0 are ignored; no slots give norm 0.
void grad_norm_status(float* status,            // (4)
                      double* sum_squares,      // (1) or nullptr
                      double* workspace,        // (grad_norm_workspace_size)
                      const GradSlot* slots, int64_t count, bool clip, float max_norm,
                      const float* loss,        // () or nullptr
                      cudaStream_t stream);

// g *= status[1] in f32 for every slot, unless status[2] != 0 (skipped) or status[1] == 1 (no
// clipping): then the gradients are not touched. `status` is read on the device, in the kernel.
void grad_scale(const GradSlot* slots, int64_t count,
                const float* status,            // (4) as written by grad_norm_status
                cudaStream_t stream);

}  // namespace cnx::cuda
