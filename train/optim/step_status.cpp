#include "train/optim/step_status.h"

namespace cnx {

namespace {

// values[i] on the host: a copy of the four floats (on CUDA it waits for the device's stream,
// so for the work that computed them).
float read_value(const StepStatus& s, int i, const char* what) {
  CNX_CHECK(s.values.defined() && s.values.numel() == 4 && s.values.dtype() == DType::f32,
            "StepStatus.", what, ": no status (values must be an f32 [4] tensor, got ",
            s.values.defined() ? s.values.str() : std::string("undefined"), ")");
  return s.values.to_vector<float>()[static_cast<size_t>(i)];
}

}  // namespace

void StepStatus::check(Device device, const char* op) const {
  CNX_CHECK(values.defined() && values.dtype() == DType::f32 && values.shape() == Shape{4}, op,
            ": the step status must be an f32 [4] tensor (clip_grad_norm_status), got ",
            values.defined() ? values.str() : std::string("undefined"));
  CNX_CHECK(values.device() == device, op, ": the step status ", values.str(), " is not on ",
            device.str(), ", where the parameters are");
}

const float* StepStatus::skip_flag() const {
  CNX_CHECK(values.defined() && values.numel() == 4 && values.dtype() == DType::f32,
            "StepStatus.skip_flag: no status (values must be an f32 [4] tensor)");
  return values.data<float>() + 2;
}

double StepStatus::norm() const { return read_value(*this, 0, "norm"); }
double StepStatus::coef() const { return read_value(*this, 1, "coef"); }
bool StepStatus::skipped() const { return read_value(*this, 2, "skipped") != 0.0f; }
double StepStatus::loss() const { return read_value(*this, 3, "loss"); }

}  // namespace cnx
