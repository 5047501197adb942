// AdamW, gradient-norm clipping and layer-wise learning-rate decay: the optimiser side of the
// official ConvNeXt training (facebookresearch/ConvNeXt main.py, engine.py, optim_factory.py,
// utils.py), with the update of torch.optim.AdamW (PyTorch 1.13; amsgrad, maximize and
// foreach off).
//
// AdamW, for each parameter p with gradient g, its own step count t (1 on its first update):
//   p <- p * (1 - lr_p * wd_p)                      decoupled weight decay (skipped if wd_p = 0)
//   m <- b1 m + (1 - b1) g
//   v <- b2 v + (1 - b2) g^2
//   p <- p - (lr_p / (1 - b1^t)) * m / (sqrt(v) / sqrt(1 - b2^t) + eps)
// with lr_p = lr * lr_scale(p) and wd_p = weight_decay if p.decay else 0, where lr and
// weight_decay are the scheduled values of this step (train/optim/schedule.h). These are the
// official parameter groups: weight decay only for Parameter::decay (not 1-D tensors, not
// biases), an lr scale per parameter from layer-wise lr decay (1 without it), and engine.py
// setting group lr = lr_schedule[it] * lr_scale and the decayed groups' wd = wd_schedule[it].
// A parameter without a gradient this step is skipped: not decayed, its m, v and step count
// unchanged (PyTorch skips p.grad is None the same way; its state['step'] is per parameter).
//
// Arithmetic: m, v and p are f32 and updated elementwise in f32, in PyTorch's order of
// operations, with the per-step scalars (bias corrections, step size) computed in double as
// PyTorch does in Python; so the result follows torch.optim.AdamW to f32 rounding. The update is
// elementwise, so it is the same for any number of OpenMP threads.
//
// Devices: the parameters, their gradients and the moments are f32 tensors on one device. On the
// CPU the update is the loop in adamw.cpp; on a CUDA device one cnx::cuda::adamw_step call per
// step updates every parameter (kernels/adamw.h: the same f32 expressions in the same order), and
// grad_norm / clip_grad_norm / clip_grad_norm_status run on the device too (multi-tensor kernels,
// kernels/grad_norm.h; deterministic, like the CPU path).
//
// Steps the device decides to skip (train/optim/step_status.h): step(lr, wd, &status) leaves
// every parameter and moment unchanged when the status says skip, decided on the device without
// the host reading it. The host cannot know at the call whether the step happened, so it counts
// the step either way; uncount_step() takes that count back once the host has read the status.
//
// CUDA graphs: step() is two halves that a caller may also call apart, so that the device half
// can be captured once into a CUDA graph and replayed every step:
//   prepare_step(lr, wd)   the host half, outside any capture: counts the step for every
//                          parameter, computes each parameter's per-step scalars in double (as
//                          step() does) and copies them, as floats, into a device table that the
//                          optimiser allocates once (at construction) and never moves;
//   launch_step(&status)   the device half: enqueues the multi-tensor update, whose kernels read
//                          the scalars from that table when they run. Its launches' parameters are
//                          the addresses of the parameters, gradients, moments, bf16 copies, the
//                          table and the status, nothing that changes from step to step.
// So a launch_step captured once replays correctly after each new prepare_step, as long as the
// gradients live in the same buffers (the graph holds their addresses), the status is the same
// tensor, and the parameters with a bf16 copy are the same as at capture:
//   opt.prepare_step(lr, wd);                  // before capture: launch_step needs a prepared step
//   cudaStreamBeginCapture(stream, ...); ... opt.launch_step(&status); ... cudaStreamEndCapture(...)
//   per step:  opt.prepare_step(lr_k, wd_k);  cudaGraphLaunch(exec, stream);
// In this mode prepare_step cannot see which gradients the captured backward will produce, so it
// counts every parameter: each must have a gradient by the time launch_step runs (launch_step
// checks). The table copy is queued on the device's stream from pageable memory (no host wait,
// tensor/cuda_memory.h), behind the previous replay that still reads the table. uncount_step()
// takes a prepare_step's counts back like a step()'s. On the CPU there is nothing to capture:
// prepare_step keeps the scalars on the host and launch_step runs the loop.
//
// bf16 copies (mixed precision): keep_bf16_copies() makes the optimiser keep a bf16 copy of
// chosen parameters (the GEMM weights a bf16 forward reads: ConvNeXt::bf16_gemm_weights()),
// rewritten by every step() in the same pass as the update (on CUDA in the AdamW kernel, on the
// CPU in its loop), so that the forward reads the copy instead of casting the fp32 weight again
// (a 4-byte read and a 2-byte write per weight element per forward saved; the step pays 2 bytes).
// The copy is always bitwise the cast op's bf16(value), round to nearest even, as long as
// nothing but step() writes the values; whoever else writes them must call
// refresh_bf16_copies() before the next forward: after ConvNeXt::load_state_dict (a resume, a
// fine-tune start), after any in-place write of a parameter. AdamW::load_state_dict refreshes
// them itself (it does not change the values, but a resume loads the model first).
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include "models/convnext.h"
#include "train/optim/step_status.h"

namespace cnx {

struct AdamWOptions {
  double beta1 = 0.9;
  double beta2 = 0.999;
  double eps = 1e-8;

  // Throws cnx::Error unless 0 <= beta < 1 and eps >= 0.
  void validate() const;
};

class AdamW {
 public:
  // `params` are the tensors to optimise with their official names, layouts and decay flags,
  // usually model.parameters(); the values are aliased (updated in place), not copied. Names
  // must be unique; values f32, all on one device (CPU or CUDA; m and v are made there). Move
  // the model to its device before making the optimiser. `lr_scales`: one per parameter
  // (layer_decay_lr_scales()), or empty for all 1. m and v start at zero, every step count at 0.
  explicit AdamW(const std::vector<Parameter>& params, const AdamWOptions& options = {},
                 std::vector<double> lr_scales = {});

  // One update of every parameter that has a gradient (see the top of the file). lr >= 0 and
  // weight_decay >= 0 are this step's scheduled values. Every gradient is checked (shape of
  // the value, f32 on the parameters' device) before any parameter changes.
  //
  // With a `status` (clip_grad_norm_status of this step's gradients, on the parameters' device),
  // the update is conditional on its skip flag: when values[2] != 0 no parameter or moment
  // changes. On CUDA the flag is read by the kernel, so the call does not wait for the device;
  // on the CPU it is read directly. Either way step_count() and the param_step() of every
  // parameter with a gradient go up by one, as for an applied step (the host does not know yet).
  void step(double lr, double weight_decay, const StepStatus* status = nullptr);

  // ---- the step in two halves (CUDA graphs, see the top of the file) -------------------------
  // step(lr, wd, status) is prepare_step for the parameters that have a gradient, then
  // launch_step(status); these two do the same for every parameter.
  //
  // The host half: checks lr >= 0 and weight_decay >= 0 (finite), counts the step for every
  // parameter (step_count() and every param_step() go up by one, as in step()), computes each
  // one's scalars as step() does and, on CUDA, queues their copy into the optimiser's device
  // table. No host wait, no allocation. Call it outside any stream capture (a copy from pageable
  // memory cannot be captured), once before each launch_step or each replay of a captured one.
  // Calling it again before the launch makes a new step (counted again).
  void prepare_step(double lr, double weight_decay);
  // The device half: updates the parameters the last prepare_step counted, with its scalars,
  // conditionally on `status` as step() is. On CUDA it only enqueues kernels, reading the
  // scalars from the device table when they run; it allocates nothing and does not wait, so it
  // can be captured. Throws cnx::Error, before anything is queued, when no prepare_step came
  // since the last launch_step (or since uncount_step or load_state_dict), when one of the
  // counted parameters has no gradient or a bad one (shape, dtype, device), or for a bad
  // status; the counts of that prepare_step then stand (uncount_step takes them back).
  void launch_step(const StepStatus* status = nullptr);

  // Undoes the step counts of the last step() or prepare_step() call: step_count() and the
  // param_step() of exactly the parameters that step counted (those with a gradient; every one
  // for prepare_step) go back by one, so the next step uses the bias corrections of a run that
  // never saw the skipped one. Nothing else changes, except that a prepared step not launched
  // yet is dropped (launch_step then throws). Contract: the trainer calls it once it has read
  // that the last step was skipped (status.skipped()), and before the next step() or
  // prepare_step(); calling it for an applied step would make the counts disagree with the
  // moments. Throws cnx::Error when there is no step to undo (no step yet, called twice, or
  // after load_state_dict).
  void uncount_step();

  // step() calls so far, less those taken back by uncount_step(); restored by load_state_dict.
  int64_t step_count() const { return step_count_; }
  // Updates parameter i has had (PyTorch's state[p]["step"]); equals step_count() unless the
  // parameter went without a gradient on some step.
  int64_t param_step(size_t i) const { return param_steps_.at(i); }

  size_t size() const { return params_.size(); }
  const std::vector<Parameter>& parameters() const { return params_; }
  double lr_scale(size_t i) const { return lr_scales_.at(i); }
  const AdamWOptions& options() const { return options_; }
  Device device() const { return device_; }
  // m and v of parameter i, internal layout (the value's shape).
  const Tensor& exp_avg(size_t i) const { return m_.at(i); }
  const Tensor& exp_avg_sq(size_t i) const { return v_.at(i); }

  // ---- bf16 copies (see the top of the file) ---------------------------------------------------
  // Keeps a bf16 copy of parameters `which` (indices into parameters(); repeats and indices
  // already kept are fine), made now by casting the values. Throws cnx::Error for an index out
  // of range. Does nothing (after the check) when CNX_BF16_WEIGHT_COPIES=0 (kernels/fusion.h):
  // bf16_copies() then stays all undefined, and the forward casts the weights.
  void keep_bf16_copies(const std::vector<size_t>& which);
  // Rewrites every kept copy as the cast of its parameter's current value. Call it after
  // anything but step() wrote the parameters (the top of the file says who).
  void refresh_bf16_copies();
  // One entry per parameter, in parameter order: the bf16 copy (same shape and device as the
  // value) or an undefined tensor where none is kept. Pass it to ConvNeXt::forward. The tensors
  // keep their storage for the optimiser's lifetime (step() and refresh write them in place).
  const std::vector<Tensor>& bf16_copies() const { return bf16_; }
  const Tensor& bf16_copy(size_t i) const { return bf16_.at(i); }

  // ---- checkpoints -----------------------------------------------------------------------------
  // The state as named CPU tensors in the official layouts (like the parameters at every file
  // boundary), in this order:
  //   "adamw.step"          i64 []             step_count()
  //   per parameter, in parameter order:
  //   "adamw.m.<name>"      f32 official shape  m
  //   "adamw.v.<name>"      f32 official shape  v
  //   "adamw.step.<name>"   i64 []             param_step()
  NamedTensors state_dict() const;
  // Restores state_dict()'s tensors. Only names that start with "adamw." are looked at, so a
  // whole checkpoint can be passed; among those, strict: every name above present, nothing
  // unexpected, no duplicates, the official shapes, floating m and v (converted to f32), integer
  // steps >= 0. Every problem is reported in one cnx::Error; the optimiser is unchanged if
  // anything is wrong.
  void load_state_dict(const NamedTensors& tensors);

 private:
  std::vector<Parameter> params_;
  AdamWOptions options_;
  std::vector<double> lr_scales_;
  std::vector<Tensor> m_, v_;  // internal layout, f32
  std::vector<Tensor> bf16_;   // bf16(value) or undefined, per parameter
  std::vector<int64_t> param_steps_;
  int64_t step_count_ = 0;
  // The parameters the last step() or prepare_step() counted, for launch_step() and
  // uncount_step(); valid only while can_uncount_.
  std::vector<size_t> last_counted_;
  bool can_uncount_ = false;
  // What prepare_step computed, for launch_step: per parameter (indexed by parameter, valid for
  // those in last_counted_), the kernel's three scalars {neg_step_size, bias_correction2_sqrt,
  // decay_mul} (kernels/adamw.h), and whether it decays this step (the CPU loop multiplies by
  // decay_mul only then, as PyTorch skips weight_decay == 0; decay_mul is exactly 1 otherwise).
  std::vector<float> step_scalars_;  // (size(), 3)
  std::vector<bool> step_decays_;    // (size())
  // The device copy of step_scalars_, f32 (size(), 3) on a CUDA device (undefined on the CPU):
  // allocated by the constructor and never reallocated, so that a captured launch_step's
  // pointers into it stay valid.
  Tensor step_scalars_device_;
  bool step_prepared_ = false;  // a prepare_step since the last launch_step
  Device device_;  // where the parameters, gradients and moments are

  // The host half of a step for the parameters `which` (increasing indices; lr and weight_decay
  // already checked), and the device half; `op` names the public call in error messages.
  void prepare(double lr, double weight_decay, std::vector<size_t> which);
  void launch(const StepStatus* status, const char* op);
};

// ---- gradient-norm clipping --------------------------------------------------------------------

// The total L2 norm of the gradients of `params` (those that have one; 0 if none has), the
// value that torch.nn.utils.clip_grad_norm_ and the official utils.get_grad_norm_ report. The
// squares are summed in double over fixed chunks in a fixed order, so the result is the same
// for any number of threads. Gradients must be f32 of their value's shape, on the parameters'
// device (the first parameter's). On a CUDA device the same double sum of squares is formed on
// the device in a fixed order too (kernels/grad_norm.h; it agrees with the CPU's to double
// rounding), and read back: this call waits for the device.
double grad_norm(const std::vector<Parameter>& params);

// torch.nn.utils.clip_grad_norm_(params, max_norm) for max_norm > 0: with norm = grad_norm(),
// coef = max_norm / (norm + 1e-6), and if coef < 1 every gradient is multiplied by coef (in
// f32, as PyTorch does). max_norm <= 0 means no clipping (the official --clip_grad None): the
// gradients are left alone. Returns the norm before clipping, for the training log. A non-finite
// norm is returned as is and the gradients are not touched (PyTorch would multiply them by
// max_norm / inf = 0, or by NaN); the caller decides what to do with such a step. (Non-finite
// means the norm rounded to f32, as clip_grad_norm_status decides it.) On CUDA this is
// clip_grad_norm_status plus one read of the norm: it waits for the device.
double clip_grad_norm(const std::vector<Parameter>& params, double max_norm);

// ---- layer-wise lr decay -----------------------------------------------------------------------
//
// Hierarchical models: the official optim_factory.get_num_layer_for_convnext, with
// num_layers = 12 ("Divide [3, 3, 27, 3] layers into 12 groups; each group is three consecutive
// blocks, including possible neighboring downsample layers"):
//   "downsample_layers.<s>.*": s = 0 -> 0;  s = 1 or 2 -> s + 1;  s = 3 -> 12
//   "stages.<s>.<b>.*":        s = 0 or 1 -> s + 1;  s = 2 -> 3 + b // 3;  s = 3 -> 12
//   anything else (norm.*, head.*) -> num_layers + 1 = 13
// Isotropic models: the official repository has no rule (its main.py allows layer decay only
// for convnext_small/base/large/xlarge). We use BEiT's get_num_layer_for_vit, which the
// ConvNeXt rule was adapted from, with num_layers = depth: "stem.*" -> 0, "blocks.<j>.*" -> j + 1,
// anything else -> depth + 1.
// The lr scale of a parameter with layer id i is layer_decay^(num_layers + 1 - i), as main.py's
// LayerDecayValueAssigner(list(layer_decay ** (num_layers + 1 - i) for i in range(num_layers + 2))).
//
// The official main.py refuses layer decay for convnext_tiny and the small variants (the rule
// was written for 27 blocks in stage 2); we apply the same function to them (tiny's stage 2
// gets ids 3..5, so ids 6..11 are unused). Names that the rule does not cover (a stage above 3,
// a stage-2 block past 26, a malformed index) throw cnx::Error.

constexpr int kConvNeXtLayerDecayLayers = 12;

int convnext_layer_id(const std::string& name);  // the hierarchical rule
int convnext_isotropic_layer_id(const std::string& name, int64_t depth);

// num_layers for the model: 12, or the depth for an isotropic model.
int layer_decay_num_layers(const ConvNeXtConfig& config);
// The layer id of a parameter of the model (the rule for its kind).
int layer_decay_layer_id(const ConvNeXtConfig& config, const std::string& name);
// One lr scale per parameter, in order, for AdamW. layer_decay > 0; 1 gives all 1 (the
// official code then uses no assigner and lr_scale 1).
std::vector<double> layer_decay_lr_scales(const ConvNeXtConfig& config,
                                          const std::vector<Parameter>& params,
                                          double layer_decay);

}  // namespace cnx
