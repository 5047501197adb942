// An exponential moving average of the model's parameters: timm's ModelEma (timm.utils
// .model_ema, v1), as the official main.py uses it (--model_ema, --model_ema_decay 0.9999):
// a copy of the model's parameters at creation, then after every optimiser step
//   ema <- ema * decay + (1 - decay) * param
// for every parameter (f32, PyTorch's order of operations: the Python scalars decay and
// 1 - decay rounded to f32). ConvNeXt has no buffers, so the parameters are the whole state.
// For evaluation the averages are copied into a second model (copy_to), or loaded with
// ConvNeXt::load_state_dict(model_state_dict()).
//
// The averages live where the parameters were at construction (CPU or CUDA, f32); update()
// needs the parameters there too. state_dict() copies to the host. On a CUDA device the update
// is one multi-tensor kernel (kernels/ema.h) that gives bitwise the CPU's result (each product
// and the sum rounded to f32, as on the CPU), in place, without allocating.
#pragma once

#include <vector>

#include "models/convnext.h"
#include "train/optim/step_status.h"

namespace cnx {

class ModelEma {
 public:
  // Copies the values of `params` (usually model.parameters()): names, official shapes and
  // layouts are kept, the copies do not require grad. 0 <= decay <= 1. Names must be unique.
  explicit ModelEma(const std::vector<Parameter>& params, double decay = 0.9999);

  // ema = ema * decay + (1 - decay) * param for each parameter. `params` must be the same list
  // (names, order, shapes) as at construction; else cnx::Error and nothing changes.
  // With a `status` (clip_grad_norm_status of this step, on the averages' device), nothing
  // changes when it says skip: read by the kernel on CUDA (the host does not wait), directly on
  // the CPU.
  void update(const std::vector<Parameter>& params, const StepStatus* status = nullptr);

  double decay() const { return decay_; }
  // The averages, internal layout, with the model's names, official shapes, layouts and decay.
  const std::vector<Parameter>& parameters() const { return ema_; }

  // Copies the averages into `params` (another model's parameters, e.g. an evaluation copy of
  // the same configuration): the same names, order and shapes, else cnx::Error and nothing
  // changes. Gradients are not touched.
  void copy_to(std::vector<Parameter>& params) const;

  // ---- checkpoints -----------------------------------------------------------------------------
  // "ema.<name>", official layout, f32 CPU copies, in parameter order.
  NamedTensors state_dict() const;
  // The averages under the official names without a prefix, for ConvNeXt::load_state_dict.
  NamedTensors model_state_dict() const;
  // Restores state_dict()'s tensors. Only names that start with "ema." are looked at (so a whole
  // checkpoint can be passed); among those, strict: every parameter present, nothing
  // unexpected, no duplicates, official shapes, floating dtypes (converted to f32). Every
  // problem is reported in one cnx::Error; the averages are unchanged if anything is wrong.
  void load_state_dict(const NamedTensors& tensors);

 private:
  // Throws unless `params` matches the averages one to one (names, order, value shapes).
  void check_same(const std::vector<Parameter>& params, const char* op) const;

  std::vector<Parameter> ema_;
  double decay_;
};

}  // namespace cnx
