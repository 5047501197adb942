// scaled_residual: the end of a ConvNeXt block, x + drop_path(layer_scale(h)), in one pass
// (kernels/scaled_residual.h). Saves h (for dgamma), gamma (for dh) and the drop-path scale.
#include <algorithm>

#include "autograd/checks.h"
#include "autograd/dispatch.h"
#include "autograd/function.h"
#include "autograd/ops.h"
#include "kernels/layer_scale.h"
#include "kernels/scaled_residual.h"

namespace cnx {

class ScaledResidual final : public Function {
 public:
  const char* name() const override { return "scaled_residual"; }

  // ---- forward ----
  static Tensor apply(const Tensor& x, const Tensor& h, const Tensor& gamma, const Tensor& scale) {
    const char* op = "scaled_residual";
    check::activation(op, "x", x);
    check::min_rank(op, "x", x, 2);
    check::defined(op, "h", h);
    check::same_kind(op, {"x", x}, {{"h", h}});
    CNX_CHECK(h.shape() == x.shape(), op, ": h ", h.str(), " and x ", x.str(), " differ in shape");
    check::params(op, {"x", x}, {{"gamma", gamma}, {"scale", scale}});
    const int64_t N = x.dim(0), C = x.dim(-1);
    const int64_t P = N > 0 && C > 0 ? x.numel() / (N * C) : 0;  // pixels per sample
    if (gamma.defined()) check::shape(op, "gamma", gamma, Shape{C}, "the channels of x " + x.str());
    if (scale.defined()) check::shape(op, "scale", scale, Shape{N}, "one per sample of x " + x.str());
    CNX_CHECK(!scale.defined() || !scale.requires_grad(), op, ": scale ", scale.str(),
              " is a constant (the drop-path draw) and cannot require grad");
    Tensor out = Tensor::empty(x.shape(), x.dtype(), x.device());
    dispatch_with_bf16(op, x, [&](auto tag) {
      using T = decltype(tag);
      using Pt = param_t<T>;
      cpu::scaled_residual_forward<T>(out.data<T>(), x.data<T>(), h.data<T>(),
                                      ptr_or_null<Pt>(gamma), ptr_or_null<Pt>(scale), N, P, C);
    }, [&](auto tag, auto stream) {
      using T = decltype(tag);
      cuda::scaled_residual_forward<T>(out.data<T>(), x.data<T>(), h.data<T>(),
                                       ptr_or_null<float>(gamma), ptr_or_null<float>(scale), N, P,
                                       C, stream);
    });
    if (wants_grad({x, h, gamma})) {
      auto fn = std::make_shared<ScaledResidual>();
      if (gamma.defined() && gamma.requires_grad()) fn->h_ = h.detach();
      if (h.requires_grad() && gamma.defined()) fn->gamma_ = gamma.detach();
      if (scale.defined()) fn->scale_ = scale.detach();
      fn->N_ = N;
      fn->P_ = P;
      fn->C_ = C;
      record(fn, out, {x, h, gamma});
    }
    return out;
  }

  // ---- backward: dx = dout; dh and dgamma in one pass ----
  std::vector<Tensor> backward(const Tensor& grad_out) override {
    const Device dev = grad_out.device();
    Tensor dh, dgamma;
    if (needs_input_grad(1)) dh = Tensor::empty(grad_out.shape(), grad_out.dtype(), dev);
    if (needs_input_grad(2)) dgamma = Tensor::empty(Shape{C_}, param_dtype(grad_out.dtype()), dev);
    if (dh.defined() || dgamma.defined()) {
      dispatch_with_bf16("scaled_residual backward", grad_out, [&](auto tag) {
        using T = decltype(tag);
        using Pt = param_t<T>;
        cpu::scaled_residual_backward<T>(ptr_or_null<T>(dh), ptr_or_null<Pt>(dgamma),
                                         grad_out.data<T>(), ptr_or_null<T>(h_),
                                         ptr_or_null<Pt>(gamma_), ptr_or_null<Pt>(scale_), N_, P_,
                                         C_);
      }, [&](auto tag, auto stream) {
        using T = decltype(tag);
        Tensor ws = cuda_workspace(
            dgamma.defined() ? cuda::layer_scale_backward_workspace_floats(N_ * P_, C_) : 0, dev);
        cuda::scaled_residual_backward<T>(ptr_or_null<T>(dh), ptr_or_null<float>(dgamma),
                                          grad_out.data<T>(), ptr_or_null<T>(h_),
                                          ptr_or_null<float>(gamma_), ptr_or_null<float>(scale_),
                                          N_, P_, C_, ptr_or_null<float>(ws), stream);
      });
    }
    return {needs_input_grad(0) ? grad_out : Tensor(), dh, dgamma};
  }

 protected:
  void release_saved() override { h_ = gamma_ = scale_ = Tensor(); }

 private:
  Tensor h_, gamma_, scale_;  // saved: h (for dgamma), gamma (for dh), the (N) drop-path scale
  int64_t N_ = 0, P_ = 0, C_ = 0;
};

Tensor scaled_residual(const Tensor& x, const Tensor& h, const Tensor& gamma, const Tensor& scale) {
  return ScaledResidual::apply(x, h, gamma, scale);
}

}  // namespace cnx
