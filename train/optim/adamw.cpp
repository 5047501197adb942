#include "train/optim/adamw.h"

#include <algorithm>
#include <cmath>
#include <limits>
#include <map>
#include <set>

#include "kernels/adamw.h"
#include "kernels/fusion.h"
#include "kernels/grad_norm.h"
#include "models/state_dict.h"
#include "tensor/cuda_context.h"
#include "tensor/cuda_memory.h"

namespace cnx {

namespace {

// Elementwise loops below this size run on one thread: the OpenMP fork costs more.
constexpr int64_t kParallelMin = 1 << 15;
// grad_norm sums the squares over chunks of this many elements, each in order, then the chunk
// sums in order: the same result for any number of threads.
constexpr int64_t kNormChunk = 1 << 16;

// Throws unless `t` is an f32 tensor on `device` (the optimiser works on CPU f32 or CUDA f32
// tensors, all on one device).
void check_f32_on(const Tensor& t, Device device, const std::string& what) {
  CNX_CHECK(t.defined(), what, " is undefined");
  CNX_CHECK(t.dtype() == DType::f32, what, " must be an f32 tensor (CPU f32 or CUDA f32), got ",
            t.str());
  CNX_CHECK(t.device() == device, what, " ", t.str(), " is not on ", device.str(),
            ", where the parameters are");
}

// The device of the parameters (all on one): the first one's, or the CPU when there is none.
Device params_device(const std::vector<Parameter>& params) {
  return params.empty() || !params.front().value.defined() ? Device::cpu()
                                                           : params.front().value.device();
}

// The gradient of `p` if it has one (checked: the value's shape, f32 on `device`), else
// undefined.
const Tensor* checked_grad(const Parameter& p, Device device, const char* op) {
  const Tensor& g = p.value.grad();
  if (!g.defined()) return nullptr;
  CNX_CHECK(g.shape() == p.value.shape(), op, ": the gradient of ", p.name, " has shape ",
            g.shape().str(), " but the parameter ", p.value.shape().str());
  check_f32_on(g, device, std::string(op) + ": the gradient of " + p.name);
  return &g;
}

// Throws unless this step's scheduled lr and weight decay are finite and >= 0.
void check_schedule(double lr, double weight_decay, const char* op) {
  CNX_CHECK(std::isfinite(lr) && lr >= 0, op, ": lr must be finite and >= 0, got ", lr);
  CNX_CHECK(std::isfinite(weight_decay) && weight_decay >= 0, op,
            ": weight_decay must be finite and >= 0, got ", weight_decay);
}

Tensor i64_scalar(int64_t v) { return Tensor::from_data<int64_t>(Shape{}, std::vector<int64_t>{v}); }

// The integer in a one-element i64 or i32 tensor, or nothing if it is not one.
bool read_int(const Tensor& t, int64_t& out) {
  if (t.numel() != 1 || !t.device().is_cpu()) return false;
  if (t.dtype() == DType::i64) out = t.data<int64_t>()[0];
  else if (t.dtype() == DType::i32) out = t.data<int32_t>()[0];
  else return false;
  return true;
}

}  // namespace

void AdamWOptions::validate() const {
  CNX_CHECK(beta1 >= 0 && beta1 < 1, "AdamW: beta1 must be in [0, 1), got ", beta1);
  CNX_CHECK(beta2 >= 0 && beta2 < 1, "AdamW: beta2 must be in [0, 1), got ", beta2);
  CNX_CHECK(eps >= 0 && std::isfinite(eps), "AdamW: eps must be >= 0, got ", eps);
}

// ---- AdamW -------------------------------------------------------------------------------------

AdamW::AdamW(const std::vector<Parameter>& params, const AdamWOptions& options,
             std::vector<double> lr_scales)
    : params_(params), options_(options), lr_scales_(std::move(lr_scales)),
      device_(params_device(params)) {
  options_.validate();
  if (lr_scales_.empty()) lr_scales_.assign(params_.size(), 1.0);
  CNX_CHECK(lr_scales_.size() == params_.size(), "AdamW: ", lr_scales_.size(),
            " lr scales for ", params_.size(), " parameters");
  std::set<std::string> names;
  for (size_t i = 0; i < params_.size(); ++i) {
    const Parameter& p = params_[i];
    CNX_CHECK(!p.name.empty(), "AdamW: parameter ", i, " has no name");
    CNX_CHECK(names.insert(p.name).second, "AdamW: parameter name ", p.name, " appears twice");
    check_f32_on(p.value, device_, "AdamW: parameter " + p.name);
    CNX_CHECK(p.official_shape.numel() == p.value.numel(), "AdamW: parameter ", p.name,
              " has official shape ", p.official_shape.str(), " but value ", p.value.str());
    CNX_CHECK(std::isfinite(lr_scales_[i]) && lr_scales_[i] >= 0, "AdamW: the lr scale of ",
              p.name, " must be finite and >= 0, got ", lr_scales_[i]);
    m_.push_back(Tensor::zeros(p.value.shape(), DType::f32, device_));
    v_.push_back(Tensor::zeros(p.value.shape(), DType::f32, device_));
  }
  param_steps_.assign(params_.size(), 0);
  bf16_.resize(params_.size());
  step_scalars_.assign(3 * params_.size(), 0.0f);
  step_decays_.assign(params_.size(), false);
  if (device_.is_cuda() && !params_.empty())
    step_scalars_device_ = Tensor::zeros(Shape{static_cast<int64_t>(params_.size()), 3},
                                         DType::f32, device_);
}

void AdamW::keep_bf16_copies(const std::vector<size_t>& which) {
  for (size_t i : which)
    CNX_CHECK(i < params_.size(), "AdamW.keep_bf16_copies: parameter index ", i, " but there are ",
              params_.size(), " parameters");
  // CNX_BF16_WEIGHT_COPIES=0 (kernels/fusion.h): no copies, so a bf16 forward casts each GEMM
  // weight itself, as it would without this optimiser (the unfused step, for comparisons).
  if (!fusion_enabled(Fusion::bf16_weight_copies)) return;
  for (size_t i : which)
    if (!bf16_[i].defined()) bf16_[i] = params_[i].value.detach().to(DType::bf16);
}

void AdamW::refresh_bf16_copies() {
  // In place: a caller that kept a handle to a copy sees the new values.
  for (size_t i = 0; i < params_.size(); ++i)
    if (bf16_[i].defined()) bf16_[i].copy_from(params_[i].value.detach().to(DType::bf16));
}

void AdamW::step(double lr, double weight_decay, const StepStatus* status) {
  // Everything is checked before anything is counted or queued: a refused step changes nothing.
  check_schedule(lr, weight_decay, "AdamW.step");
  std::vector<size_t> with_grad;
  for (size_t i = 0; i < params_.size(); ++i)
    if (checked_grad(params_[i], device_, "AdamW.step")) with_grad.push_back(i);
  if (status) status->check(device_, "AdamW.step");
  prepare(lr, weight_decay, std::move(with_grad));
  launch(status, "AdamW.step");
}

void AdamW::prepare_step(double lr, double weight_decay) {
  check_schedule(lr, weight_decay, "AdamW.prepare_step");
  std::vector<size_t> every(params_.size());
  for (size_t i = 0; i < every.size(); ++i) every[i] = i;
  prepare(lr, weight_decay, std::move(every));
}

void AdamW::launch_step(const StepStatus* status) { launch(status, "AdamW.launch_step"); }

void AdamW::prepare(double lr, double weight_decay, std::vector<size_t> which) {
  const double beta1 = options_.beta1, beta2 = options_.beta2;
  // Counted whether or not the device skips the step (uncount_step takes it back).
  ++step_count_;
  last_counted_ = std::move(which);
  can_uncount_ = true;
  for (size_t i : last_counted_) {
    const int64_t t = ++param_steps_[i];
    const double lr_p = lr * lr_scales_[i];
    const double wd_p = params_[i].decay ? weight_decay : 0.0;
    // As torch.optim.AdamW (_single_tensor_adamw), in double:
    const double bias_correction1 = 1 - std::pow(beta1, static_cast<double>(t));
    const double bias_correction2 = 1 - std::pow(beta2, static_cast<double>(t));
    const bool decay = wd_p != 0;
    float* const scalars = &step_scalars_[3 * i];  // the kernel's order (kernels/adamw.h)
    scalars[0] = static_cast<float>(-(lr_p / bias_correction1));      // neg_step_size
    scalars[1] = static_cast<float>(std::sqrt(bias_correction2));     // bias_correction2_sqrt
    scalars[2] = decay ? static_cast<float>(1 - lr_p * wd_p) : 1.0f;  // decay_mul
    step_decays_[i] = decay;
  }
  // The whole table, also the rows of parameters not counted (unused): one small copy, queued
  // behind whatever still reads the table (a replay of the last step).
  if (step_scalars_device_.defined())
    copy_bytes(step_scalars_device_.data<float>(), device_, step_scalars_.data(), Device::cpu(),
               static_cast<int64_t>(step_scalars_.size() * sizeof(float)));
  step_prepared_ = true;
}

void AdamW::launch(const StepStatus* status, const char* op) {
  CNX_CHECK(step_prepared_, op, ": no prepared step to launch (call prepare_step first, once "
            "before each launch_step; uncount_step and load_state_dict drop a prepared step)");
  std::vector<const Tensor*> grads(params_.size(), nullptr);
  for (size_t i : last_counted_) {
    grads[i] = checked_grad(params_[i], device_, op);
    CNX_CHECK(grads[i], op, ": parameter ", params_[i].name, " has no gradient, but the prepared "
              "step counted it (prepare_step counts every parameter)");
  }
  if (status) status->check(device_, op);
  step_prepared_ = false;
  // The CPU reads the skip decision now; a CUDA device reads it in the kernel (no host wait).
  if (status && device_.is_cpu() && status->skipped()) return;

  // PyTorch's Python scalars become f32 when they meet the f32 tensors.
  const double beta1 = options_.beta1, beta2 = options_.beta2;
  const float b1 = static_cast<float>(beta1), one_minus_b1 = static_cast<float>(1 - beta1);
  const float b2 = static_cast<float>(beta2), one_minus_b2 = static_cast<float>(1 - beta2);
  const float eps = static_cast<float>(options_.eps);

  if (device_.is_cuda()) {
#if defined(CNX_CUDA) && CNX_CUDA
    // One slot per counted parameter, pointing to its row of the device table, where the kernel
    // reads the scalars: the slots, and so the launches' parameters, are the same every step.
    // The inline scalars go unused; NaN, so that a kernel that read them could not go unnoticed.
    const float unused = std::numeric_limits<float>::quiet_NaN();
    std::vector<cuda::AdamWSlot> slots;
    for (size_t i : last_counted_)
      slots.push_back({params_[i].value.data<float>(), grads[i]->data<float>(), m_[i].data<float>(),
                       v_[i].data<float>(), params_[i].value.numel(), unused, unused, unused,
                       bf16_[i].defined() ? bf16_[i].data<bf16>() : nullptr,
                       step_scalars_device_.data<float>() + 3 * i});
    // The same f32 scalars and per-element expressions as the loop below (kernels/adamw.h).
    const cuda::AdamWScalars scalars{b1, one_minus_b1, b2, one_minus_b2, eps};
    cuda::DeviceGuard guard(device_);
    cuda::adamw_step(slots.data(), static_cast<int64_t>(slots.size()), scalars,
                     status ? status->skip_flag() : nullptr, cuda::device_stream(device_));
    return;
#else
    fail(op, ": parameters on ", device_.str(), " but this build has no CUDA backend");
#endif
  }
  for (size_t i : last_counted_) {
    const float neg_step_size = step_scalars_[3 * i];
    const float bias_correction2_sqrt = step_scalars_[3 * i + 1];
    const float decay_mul = step_scalars_[3 * i + 2];
    const bool decay = step_decays_[i];
    float* p = params_[i].value.data<float>();      // (numel)
    float* m = m_[i].data<float>();                 // (numel)
    float* v = v_[i].data<float>();                 // (numel)
    const float* g = grads[i]->data<float>();       // (numel)
    bf16* pb = bf16_[i].defined() ? bf16_[i].data<bf16>() : nullptr;  // (numel) or null
    const int64_t n = params_[i].value.numel();
#pragma omp parallel for schedule(static) if (n >= kParallelMin)
    for (int64_t k = 0; k < n; ++k) {
      float pk = p[k];
      if (decay) pk = pk * decay_mul;                       // param.mul_(1 - lr * wd)
      const float gk = g[k];
      const float mk = m[k] * b1 + one_minus_b1 * gk;       // exp_avg.mul_(b1).add_(g, alpha=1-b1)
      const float vk = v[k] * b2 + one_minus_b2 * gk * gk;  // exp_avg_sq.mul_(b2).addcmul_(g, g, 1-b2)
      const float denom = std::sqrt(vk) / bias_correction2_sqrt + eps;
      const float pn = pk + neg_step_size * mk / denom;     // param.addcdiv_(m, denom, -step_size)
      p[k] = pn;
      m[k] = mk;
      v[k] = vk;
      if (pb) pb[k] = bf16(pn);  // the cast op's rounding (tensor/dtype.h), in the same pass
    }
  }
}

void AdamW::uncount_step() {
  CNX_CHECK(can_uncount_, "AdamW.uncount_step: no step to undo (no step() since the optimiser was "
            "made or loaded, or the last one was already undone)");
  --step_count_;
  for (size_t i : last_counted_) --param_steps_[i];
  last_counted_.clear();
  can_uncount_ = false;
  step_prepared_ = false;  // a prepared step's scalars used the counts just taken back
}

NamedTensors AdamW::state_dict() const {
  NamedTensors out;
  out.emplace_back("adamw.step", i64_scalar(step_count_));
  for (size_t i = 0; i < params_.size(); ++i) {
    const Parameter& p = params_[i];
    out.emplace_back("adamw.m." + p.name, to_official_layout(m_[i], p.layout));
    out.emplace_back("adamw.v." + p.name, to_official_layout(v_[i], p.layout));
    out.emplace_back("adamw.step." + p.name, i64_scalar(param_steps_[i]));
  }
  return out;
}

void AdamW::load_state_dict(const NamedTensors& tensors) {
  StateDictMatcher match(tensors, "adamw.");
  auto check_step = [&](const std::string& name, int64_t& out) {
    const Tensor* t = match.find(name);
    if (!t) return;
    if (!read_int(*t, out)) match.note("wrong dtype", name + " " + t->str() + " (expected one integer)");
    else if (out < 0) match.note("negative step", name + " = " + std::to_string(out));
  };
  int64_t step_count = 0;
  check_step("adamw.step", step_count);
  std::vector<const Tensor*> ms, vs;
  std::vector<int64_t> steps(params_.size(), 0);
  for (size_t i = 0; i < params_.size(); ++i) {
    const Parameter& p = params_[i];
    ms.push_back(match.floating("adamw.m." + p.name, p.official_shape, "wrong dtype"));
    vs.push_back(match.floating("adamw.v." + p.name, p.official_shape, "wrong dtype"));
    check_step("adamw.step." + p.name, steps[i]);
  }
  match.finish("AdamW.load_state_dict: the optimiser state does not fit the parameters:");

  // Everything fits: convert first, assign after, so that a failure changes nothing.
  std::vector<Tensor> new_m, new_v;
  for (size_t i = 0; i < params_.size(); ++i) {
    new_m.push_back(from_official_layout(ms[i]->to(DType::f32), params_[i].layout));
    new_v.push_back(from_official_layout(vs[i]->to(DType::f32), params_[i].layout));
  }
  for (size_t i = 0; i < params_.size(); ++i) {
    m_[i].copy_from(new_m[i]);
    v_[i].copy_from(new_v[i]);
  }
  param_steps_ = std::move(steps);
  step_count_ = step_count;
  last_counted_.clear();
  can_uncount_ = false;  // the counts of the last step are not this state's
  step_prepared_ = false;  // nor the scalars of a prepared step
  // The values are unchanged here, but a resume loads the model's state just before this one:
  // refreshing covers that order without the caller knowing about the copies.
  refresh_bf16_copies();
}

// ---- gradient-norm clipping --------------------------------------------------------------------

namespace {

// The sum of the squares of every CPU gradient, in double: over chunks of kNormChunk elements,
// each in order, then the chunk sums in order (the same result for any number of threads).
double cpu_sum_squares(const std::vector<Parameter>& params, Device device) {
  struct Chunk {
    const float* g;  // (n)
    int64_t n;
  };
  std::vector<Chunk> chunks;
  for (const Parameter& p : params) {
    const Tensor* g = checked_grad(p, device, "grad_norm");
    if (!g) continue;
    const float* data = g->data<float>();
    for (int64_t begin = 0; begin < g->numel(); begin += kNormChunk)
      chunks.push_back({data + begin, std::min(kNormChunk, g->numel() - begin)});
  }
  std::vector<double> partial(chunks.size(), 0.0);
  const int64_t nchunks = static_cast<int64_t>(chunks.size());
#pragma omp parallel for schedule(static) if (nchunks > 1)
  for (int64_t c = 0; c < nchunks; ++c) {
    double s = 0;
    for (int64_t k = 0; k < chunks[c].n; ++k) {
      const double x = chunks[c].g[k];
      s += x * x;
    }
    partial[c] = s;
  }
  double total = 0;
  for (double s : partial) total += s;
  return total;
}

// clip_grad_norm_status; when `sum_squares` is not null it also gets the double sum of squares
// (for grad_norm and clip_grad_norm, which report the norm in double; on CUDA that is one read
// back, so only those host wrappers ask for it).
StepStatus clip_status(const std::vector<Parameter>& params, double max_norm, const Tensor& loss,
                       double* sum_squares) {
  const Device device = params_device(params);
  if (loss.defined()) {
    check_f32_on(loss, device, "clip_grad_norm_status: the loss");
    CNX_CHECK(loss.numel() == 1, "clip_grad_norm_status: the loss must be one number, got ",
              loss.str());
  }
  const bool clip = max_norm > 0;
  const float max_norm_f = static_cast<float>(max_norm);
  StepStatus status;
  if (device.is_cuda()) {
#if defined(CNX_CUDA) && CNX_CUDA
    std::vector<cuda::GradSlot> slots;
    for (const Parameter& p : params) {
      const Tensor* g = checked_grad(p, device, "clip_grad_norm_status");
      if (!g || g->numel() == 0) continue;
      Tensor handle = *g;  // shares the gradient's storage: scaled in place, as on the CPU
      slots.push_back({handle.data<float>(), handle.numel()});
    }
    const int64_t count = static_cast<int64_t>(slots.size());
    cuda::DeviceGuard guard(device);
    const cudaStream_t stream = cuda::device_stream(device);
    // The only allocations: the status and one scratch buffer (the partials, and the double sum
    // of squares after them), both from the caching allocator. The scratch goes back to the
    // cache at the end of this scope; what gets it next is queued after these kernels.
    status.values = Tensor::empty(Shape{4}, DType::f32, device);
    const int64_t partials = cuda::grad_norm_workspace_size(slots.data(), count);
    cuda::ScratchBuffer scratch((partials + 1) * static_cast<int64_t>(sizeof(double)), device);
    double* const total = scratch.as<double>() + partials;
    cuda::grad_norm_status(status.values.data<float>(), sum_squares ? total : nullptr,
                           scratch.as<double>(), slots.data(), count, clip, max_norm_f,
                           loss.defined() ? loss.data<float>() : nullptr, stream);
    if (clip) cuda::grad_scale(slots.data(), count, status.values.data<float>(), stream);
    if (sum_squares) copy_bytes(sum_squares, Device::cpu(), total, device, sizeof(double));  // waits
    return status;
#else
    fail("clip_grad_norm_status: parameters on ", device.str(),
         " but this build has no CUDA backend");
#endif
  }
  // The CPU: the same decisions as the device's grad_norm_finish_kernel, in the same f32 steps.
  const double total = cpu_sum_squares(params, device);
  if (sum_squares) *sum_squares = total;
  const float norm = static_cast<float>(std::sqrt(total));
  const float loss_value = loss.defined() ? loss.data<float>()[0] : NAN;
  const bool skip = !(std::isfinite(norm) && (!loss.defined() || std::isfinite(loss_value)));
  float coef = 1.0f;
  if (clip && !skip) {
    // clip_coef = max_norm / (total_norm + 1e-6), an f32 tensor in PyTorch.
    const float c = max_norm_f / (norm + 1e-6f);
    if (c < 1.0f) coef = c;
  }
  if (coef != 1.0f) {
    for (const Parameter& p : params) {
      Tensor g = p.value.grad();  // a handle: the gradient is scaled in place
      if (!g.defined()) continue;
      float* d = g.data<float>();  // (numel)
      const int64_t n = g.numel();
#pragma omp parallel for schedule(static) if (n >= kParallelMin)
      for (int64_t k = 0; k < n; ++k) d[k] *= coef;
    }
  }
  status.values = Tensor::from_data<float>(
      Shape{4}, std::vector<float>{norm, coef, skip ? 1.0f : 0.0f, loss_value});
  return status;
}

}  // namespace

StepStatus clip_grad_norm_status(const std::vector<Parameter>& params, double max_norm,
                                 const Tensor& loss) {
  return clip_status(params, max_norm, loss, nullptr);
}

double grad_norm(const std::vector<Parameter>& params) {
  const Device device = params_device(params);
  double total = 0;
  if (device.is_cuda()) clip_status(params, 0.0, Tensor(), &total);  // no clipping: reads only
  else total = cpu_sum_squares(params, device);
  return std::sqrt(total);
}

double clip_grad_norm(const std::vector<Parameter>& params, double max_norm) {
  double total = 0;
  clip_status(params, max_norm, Tensor(), &total);
  return std::sqrt(total);
}

// ---- layer-wise lr decay -----------------------------------------------------------------------

namespace {

std::vector<std::string> split_dots(const std::string& s) {
  std::vector<std::string> parts;
  size_t begin = 0;
  while (true) {
    const size_t dot = s.find('.', begin);
    parts.push_back(s.substr(begin, dot == std::string::npos ? std::string::npos : dot - begin));
    if (dot == std::string::npos) return parts;
    begin = dot + 1;
  }
}

// parts[i] as a non-negative index (Python's int() on the name's field), or an error.
int64_t index_field(const std::vector<std::string>& parts, size_t i, const std::string& name) {
  CNX_CHECK(i < parts.size() && !parts[i].empty() && parts[i].size() <= 9 &&
                std::all_of(parts[i].begin(), parts[i].end(), [](char c) { return c >= '0' && c <= '9'; }),
            "layer decay: parameter name ", name, " has no index in field ", i);
  return std::stoll(parts[i]);
}

}  // namespace

int convnext_layer_id(const std::string& name) {
  // The official optim_factory.get_num_layer_for_convnext:
  //   num_max_layer = 12
  //   if var_name.startswith("downsample_layers"):
  //       stage_id = int(var_name.split('.')[1])
  //       if stage_id == 0: layer_id = 0
  //       elif stage_id == 1 or stage_id == 2: layer_id = stage_id + 1
  //       elif stage_id == 3: layer_id = 12
  //       return layer_id
  //   elif var_name.startswith("stages"):
  //       stage_id = int(var_name.split('.')[1])
  //       block_id = int(var_name.split('.')[2])
  //       if stage_id == 0 or stage_id == 1: layer_id = stage_id + 1
  //       elif stage_id == 2: layer_id = 3 + block_id // 3
  //       elif stage_id == 3: layer_id = 12
  //       return layer_id
  //   else:
  //       return num_max_layer + 1
  const int num_max_layer = kConvNeXtLayerDecayLayers;
  if (name.starts_with("downsample_layers")) {
    const auto parts = split_dots(name);
    const int64_t stage = index_field(parts, 1, name);
    CNX_CHECK(stage <= 3, "layer decay: ", name, ": the official rule covers stages 0..3 only");
    if (stage == 0) return 0;
    if (stage == 1 || stage == 2) return static_cast<int>(stage) + 1;
    return 12;
  }
  if (name.starts_with("stages")) {
    const auto parts = split_dots(name);
    const int64_t stage = index_field(parts, 1, name);
    const int64_t block = index_field(parts, 2, name);
    CNX_CHECK(stage <= 3, "layer decay: ", name, ": the official rule covers stages 0..3 only");
    if (stage == 0 || stage == 1) return static_cast<int>(stage) + 1;
    if (stage == 2) {
      CNX_CHECK(block < 27, "layer decay: ", name,
                ": the official rule covers at most 27 blocks in stage 2");
      return 3 + static_cast<int>(block / 3);
    }
    return 12;
  }
  return num_max_layer + 1;
}

int convnext_isotropic_layer_id(const std::string& name, int64_t depth) {
  // BEiT's get_num_layer_for_vit with num_max_layer = depth + 2: the patch embedding (here the
  // stem) 0, "blocks.<j>" j + 1, the rest num_max_layer - 1.
  if (name.starts_with("stem.")) return 0;
  if (name.starts_with("blocks.")) {
    const int64_t block = index_field(split_dots(name), 1, name);
    CNX_CHECK(block < depth, "layer decay: ", name, ": block index past the depth ", depth);
    return static_cast<int>(block) + 1;
  }
  return static_cast<int>(depth) + 1;
}

int layer_decay_num_layers(const ConvNeXtConfig& config) {
  if (config.isotropic) return static_cast<int>(config.depths.at(0));
  return kConvNeXtLayerDecayLayers;
}

int layer_decay_layer_id(const ConvNeXtConfig& config, const std::string& name) {
  return config.isotropic ? convnext_isotropic_layer_id(name, config.depths.at(0))
                          : convnext_layer_id(name);
}

std::vector<double> layer_decay_lr_scales(const ConvNeXtConfig& config,
                                          const std::vector<Parameter>& params,
                                          double layer_decay) {
  CNX_CHECK(std::isfinite(layer_decay) && layer_decay > 0,
            "layer decay: the decay must be finite and > 0, got ", layer_decay);
  // The rule maps ConvNeXt's names to layers; a ResNet-style roadmap step has torchvision's.
  CNX_CHECK(layer_decay == 1.0 || !config.resnet_style(), "--layer_decay ", layer_decay,
            ": layer-wise decay is defined for ConvNeXt's parameter names; model ", config.name,
            " (a ResNet-style roadmap step) takes only --layer_decay 1");
  std::vector<double> scales;
  const int num_layers = layer_decay_num_layers(config);
  for (const Parameter& p : params) {
    if (layer_decay == 1.0) {  // the official code has no assigner then: lr_scale 1
      scales.push_back(1.0);
      continue;
    }
    const int id = layer_decay_layer_id(config, p.name);
    scales.push_back(std::pow(layer_decay, static_cast<double>(num_layers + 1 - id)));
  }
  return scales;
}

}  // namespace cnx
