// What the device decided about one optimiser step: the gradient norm, the clip coefficient and
// whether the step must be skipped (a non-finite gradient norm or loss), computed where the
// parameters live and left there. A CUDA training step can then clip the gradients, update the
// parameters (AdamW::step) and the averages (ModelEma::update) conditionally on the device's
// decision, all queued without the host waiting; the host reads the four numbers later, when it
// logs (one small copy, after the step's work has been queued).
//
//   StepStatus st = clip_grad_norm_status(model.parameters(), max_norm, loss);  // queued
//   opt.step(lr, wd, &st);                  // no change on the device when st says skip
//   if (ema) ema->update(model.parameters(), &st);
//   ...
//   if (st.skipped()) opt.uncount_step();   // the host reads (waits) here, before the next step
//
// On the CPU the same functions run the plain loops and the status is a CPU tensor, read
// directly; the results are bitwise those of grad_norm / clip_grad_norm (train/optim/adamw.h).
#pragma once

#include <vector>

#include "models/convnext.h"

namespace cnx {

// What the device decided about one optimiser step, left where the parameters live until read.
struct StepStatus {
  Tensor values;  // f32 [4] on the parameters' device: [0] gradient norm (before clipping),
                  // [1] clip coefficient applied (1 when none), [2] 1 when the step is skipped
                  // (gradient norm or loss not finite) else 0, [3] the loss passed in (NaN if none)
  const float* skip_flag() const;  // device (or CPU) pointer to values[2]
  // Host reads (on CUDA these wait for the device):
  double norm() const;
  double coef() const;
  bool skipped() const;
  double loss() const;

  // Throws cnx::Error (naming `op`) unless `values` is an f32 [4] tensor on `device`.
  void check(Device device, const char* op) const;
};

// Gradient norm of every gradient, clipping to max_norm (<= 0: none), and the skip decision,
// all on the parameters' device. `loss` is an f32 [] tensor on the same device (or undefined).
//
// norm = the L2 norm of every gradient that exists (grad_norm's sum of squares in double), as
// f32; skip = !(isfinite(norm) && isfinite(loss)) (an undefined loss counts as finite);
// coef = f32(max_norm) / (norm + 1e-6f) (torch.nn.utils.clip_grad_norm_), and the gradients are
// multiplied by it in f32 when max_norm > 0, !skip and coef < 1; else they are not touched and
// values[1] is 1. On CUDA: a few multi-tensor launches (kernels/grad_norm.h), no per-parameter
// allocation, nothing read back. Gradients: f32, the value's shape, on the parameters' device.
StepStatus clip_grad_norm_status(const std::vector<Parameter>& params, double max_norm,
                                 const Tensor& loss);

}  // namespace cnx
