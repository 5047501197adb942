#include "train/optim/ema.h"

#include <algorithm>
#include <cmath>
#include <map>
#include <set>

#include "autograd/function.h"
#include "kernels/ema.h"
#include "models/state_dict.h"
#include "tensor/cuda_context.h"

namespace cnx {

namespace {

constexpr int64_t kParallelMin = 1 << 15;  // below this, one thread (the fork costs more)

void check_f32(const Tensor& t, const std::string& what) {
  CNX_CHECK(t.defined() && t.dtype() == DType::f32, what, " must be an f32 tensor, got ",
            t.defined() ? t.str() : std::string("undefined"));
}

}  // namespace

ModelEma::ModelEma(const std::vector<Parameter>& params, double decay) : decay_(decay) {
  CNX_CHECK(decay >= 0 && decay <= 1, "ModelEma: decay must be in [0, 1], got ", decay);
  std::set<std::string> names;
  for (const Parameter& p : params) {
    CNX_CHECK(names.insert(p.name).second, "ModelEma: parameter name ", p.name, " appears twice");
    check_f32(p.value, "ModelEma: parameter " + p.name);
    Parameter copy = p;
    copy.value = p.value.detach().clone();  // no history, requires_grad off
    ema_.push_back(std::move(copy));
  }
}

void ModelEma::check_same(const std::vector<Parameter>& params, const char* op) const {
  CNX_CHECK(params.size() == ema_.size(), op, ": ", params.size(), " parameters, the EMA has ",
            ema_.size());
  for (size_t i = 0; i < params.size(); ++i) {
    CNX_CHECK(params[i].name == ema_[i].name, op, ": parameter ", i, " is ", params[i].name,
              ", the EMA has ", ema_[i].name);
    check_f32(params[i].value, std::string(op) + ": parameter " + params[i].name);
    CNX_CHECK(params[i].value.shape() == ema_[i].value.shape(), op, ": parameter ",
              params[i].name, " has shape ", params[i].value.shape().str(), ", the EMA ",
              ema_[i].value.shape().str());
  }
}

void ModelEma::update(const std::vector<Parameter>& params, const StepStatus* status) {
  check_same(params, "ModelEma.update");
  for (size_t i = 0; i < params.size(); ++i)
    CNX_CHECK(params[i].value.device() == ema_[i].value.device(), "ModelEma.update: parameter ",
              params[i].name, " ", params[i].value.str(), " is not on the EMA's device ",
              ema_[i].value.device().str());
  if (ema_.empty()) return;
  const Device device = ema_.front().value.device();
  if (status) status->check(device, "ModelEma.update");
  // timm: ema_v.copy_(ema_v * self.decay + (1. - self.decay) * model_v)
  const float d = static_cast<float>(decay_);
  const float one_minus_d = static_cast<float>(1. - decay_);
  if (device.is_cuda()) {
#if defined(CNX_CUDA) && CNX_CUDA
    // One multi-tensor update on the device, in place: round(e * d) + round((1 - d) * p), the
    // loop below's operations (kernels/ema.h), conditional on the status's skip flag there.
    std::vector<cuda::EmaSlot> slots;
    for (size_t i = 0; i < params.size(); ++i)
      slots.push_back({ema_[i].value.data<float>(), params[i].value.data<float>(),
                       ema_[i].value.numel()});
    cuda::DeviceGuard guard(device);
    cuda::ema_update(slots.data(), static_cast<int64_t>(slots.size()), d, one_minus_d,
                     status ? status->skip_flag() : nullptr, cuda::device_stream(device));
    return;
#else
    fail("ModelEma.update: averages on ", device.str(), " but this build has no CUDA backend");
#endif
  }
  if (status && status->skipped()) return;
  for (size_t i = 0; i < params.size(); ++i) {
    float* e = ema_[i].value.data<float>();             // (numel)
    const float* p = params[i].value.data<float>();     // (numel)
    const int64_t n = ema_[i].value.numel();
#pragma omp parallel for schedule(static) if (n >= kParallelMin)
    for (int64_t k = 0; k < n; ++k) e[k] = e[k] * d + one_minus_d * p[k];
  }
}

void ModelEma::copy_to(std::vector<Parameter>& params) const {
  check_same(params, "ModelEma.copy_to");
  NoGradGuard no_grad;
  for (size_t i = 0; i < params.size(); ++i) params[i].value.copy_from(ema_[i].value);
}

NamedTensors ModelEma::state_dict() const {
  NamedTensors out;
  for (const Parameter& p : ema_) out.emplace_back("ema." + p.name, to_official_layout(p.value, p.layout));
  return out;
}

NamedTensors ModelEma::model_state_dict() const {
  NamedTensors out;
  for (const Parameter& p : ema_) out.emplace_back(p.name, to_official_layout(p.value, p.layout));
  return out;
}

void ModelEma::load_state_dict(const NamedTensors& tensors) {
  StateDictMatcher match(tensors, "ema.");
  std::vector<const Tensor*> found;
  for (const Parameter& p : ema_) found.push_back(match.floating("ema." + p.name, p.official_shape));
  match.finish("ModelEma.load_state_dict: the EMA state does not fit the parameters:");

  // Convert first, assign after: a failure leaves the averages unchanged.
  std::vector<Tensor> values;
  for (size_t i = 0; i < ema_.size(); ++i)
    values.push_back(from_official_layout(found[i]->to(DType::f32), ema_[i].layout));
  for (size_t i = 0; i < ema_.size(); ++i) ema_[i].value.copy_from(values[i]);
}

}  // namespace cnx
