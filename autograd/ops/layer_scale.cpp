// layer_scale: x (..., C) * gamma (C) (kernels/layer_scale.h). Saves x (for dgamma) and gamma
// (for dx), each only when the other's gradient is wanted.
#include <algorithm>

#include "autograd/checks.h"
#include "autograd/dispatch.h"
#include "autograd/function.h"
#include "autograd/ops.h"
#include "kernels/layer_scale.h"

namespace cnx {

class LayerScale final : public Function {
 public:
  const char* name() const override { return "layer_scale"; }

  // ---- forward ----
  static Tensor apply(const Tensor& x, const Tensor& gamma) {
    check::activation("layer_scale", "x", x);
    check::min_rank("layer_scale", "x", x, 1);
    check::defined("layer_scale", "gamma", gamma);
    check::params("layer_scale", {"x", x}, {{"gamma", gamma}});
    check::shape("layer_scale", "gamma", gamma, Shape{x.dim(-1)}, "the channels of x " + x.str());
    const int64_t C = x.dim(-1), rows = x.numel() / std::max<int64_t>(C, 1);
    Tensor out = Tensor::empty(x.shape(), x.dtype(), x.device());
    dispatch_with_bf16("layer_scale", x, [&](auto tag) {
      using T = decltype(tag);
      cpu::layer_scale_forward<T>(out.data<T>(), x.data<T>(), gamma.data<param_t<T>>(), rows, C);
    }, [&](auto tag, auto stream) {
      using T = decltype(tag);
      cuda::layer_scale_forward<T>(out.data<T>(), x.data<T>(), gamma.data<float>(), rows, C,
                                   stream);
    });
    if (wants_grad({x, gamma})) {
      auto fn = std::make_shared<LayerScale>();
      if (gamma.requires_grad()) fn->x_ = x.detach();
      if (x.requires_grad()) fn->gamma_ = gamma.detach();
      fn->rows_ = rows;
      fn->C_ = C;
      record(fn, out, {x, gamma});
    }
    return out;
  }

  // ---- backward ----
  std::vector<Tensor> backward(const Tensor& grad_out) override {
    Tensor dx, dgamma;
    if (needs_input_grad(0)) dx = Tensor::empty(grad_out.shape(), grad_out.dtype(), grad_out.device());
    if (needs_input_grad(1))
      dgamma = Tensor::empty(Shape{C_}, param_dtype(grad_out.dtype()), grad_out.device());
    dispatch_with_bf16("layer_scale backward", grad_out, [&](auto tag) {
      using T = decltype(tag);
      using P = param_t<T>;
      cpu::layer_scale_backward<T>(ptr_or_null<T>(dx), ptr_or_null<P>(dgamma), grad_out.data<T>(),
                                   ptr_or_null<T>(x_), ptr_or_null<P>(gamma_), rows_, C_);
    }, [&](auto tag, auto stream) {
      using T = decltype(tag);
      Tensor ws = cuda_workspace(cuda::layer_scale_backward_workspace_floats(rows_, C_),
                                 grad_out.device());
      cuda::layer_scale_backward<T>(ptr_or_null<T>(dx), ptr_or_null<float>(dgamma),
                                    grad_out.data<T>(), ptr_or_null<T>(x_),
                                    ptr_or_null<float>(gamma_), rows_, C_, ws.data<float>(), stream);
    });
    return {dx, dgamma};
  }

 protected:
  void release_saved() override { x_ = gamma_ = Tensor(); }

 private:
  Tensor x_, gamma_;  // saved: x (..., C) for dgamma, gamma (C) for dx
  int64_t rows_ = 0, C_ = 0;
};

Tensor layer_scale(const Tensor& x, const Tensor& gamma) { return LayerScale::apply(x, gamma); }

}  // namespace cnx
