// layer_norm over the last dimension (kernels/layernorm.h). Saves what the wanted gradients
// need: x and the per-row mean and rstd of the forward (dx, dweight), weight (dx).
#include "autograd/checks.h"
#include "autograd/dispatch.h"
#include "autograd/function.h"
#include "autograd/ops.h"
#include "kernels/layernorm.h"

namespace cnx {

class LayerNorm final : public Function {
 public:
  const char* name() const override { return "layer_norm"; }

  // ---- forward ----
  static Tensor apply(const Tensor& x, const Tensor& weight, const Tensor& bias, double eps) {
    const char* op = "layer_norm";
    check::floating(op, "x", x);
    check::min_rank(op, "x", x, 1);
    check::same_kind(op, {"x", x}, {{"weight", weight}, {"bias", bias}});
    const int64_t C = x.dim(-1);
    CNX_CHECK(C > 0, op, ": x ", x.str(), " has no channels");
    check::shape(op, "weight", weight, Shape{C}, "the channels of x " + x.str());
    check::shape(op, "bias", bias, Shape{C}, "the channels of x " + x.str());
    CNX_CHECK(eps > 0, op, ": eps must be positive, got ", eps);
    const int64_t rows = x.numel() / C;
    Tensor out = Tensor::empty(x.shape(), x.dtype(), x.device());
    Tensor mean = Tensor::empty(Shape{rows}, x.dtype(), x.device());
    Tensor rstd = Tensor::empty(Shape{rows}, x.dtype(), x.device());
    dispatch(op, x, [&](auto tag) {
      using T = decltype(tag);
      cpu::layernorm_forward<T>(out.data<T>(), mean.data<T>(), rstd.data<T>(), x.data<T>(),
                                weight.data<T>(), bias.data<T>(), rows, C, eps);
    }, [&](auto stream) {
      cuda::layernorm_forward(out.data<float>(), mean.data<float>(), rstd.data<float>(),
                              x.data<float>(), weight.data<float>(), bias.data<float>(), rows, C, eps,
                              stream);
    });
    if (wants_grad({x, weight, bias})) {
      auto fn = std::make_shared<LayerNorm>();
      // dbias needs only grad_out; dweight needs x and the statistics; dx needs all of them.
      if (x.requires_grad() || weight.requires_grad()) {
        fn->x_ = x.detach();
        fn->mean_ = mean;
        fn->rstd_ = rstd;
      }
      if (x.requires_grad()) fn->weight_ = weight.detach();
      fn->x_shape_ = x.shape();
      record(fn, out, {x, weight, bias});
    }
    return out;
  }

  // ---- backward ----
  std::vector<Tensor> backward(const Tensor& grad_out) override {
    const int64_t C = x_shape_[-1], rows = x_shape_.numel() / C;
    const DType dt = grad_out.dtype();
    const Device dev = grad_out.device();
    Tensor dx, dw, db;
    if (needs_input_grad(0)) dx = Tensor::empty(x_shape_, dt, dev);
    if (needs_input_grad(1)) dw = Tensor::empty(Shape{C}, dt, dev);
    if (needs_input_grad(2)) db = Tensor::empty(Shape{C}, dt, dev);
    dispatch("layer_norm backward", grad_out, [&](auto tag) {
      using T = decltype(tag);
      cpu::layernorm_backward<T>(ptr_or_null<T>(dx), ptr_or_null<T>(dw), ptr_or_null<T>(db),
                                 grad_out.data<T>(), ptr_or_null<T>(x_), ptr_or_null<T>(weight_),
                                 ptr_or_null<T>(mean_), ptr_or_null<T>(rstd_), rows, C);
    }, [&](auto stream) {
      Tensor ws = cuda_workspace(cuda::layernorm_backward_workspace_floats(rows, C), dev);
      cuda::layernorm_backward(ptr_or_null<float>(dx), ptr_or_null<float>(dw), ptr_or_null<float>(db),
                               grad_out.data<float>(), ptr_or_null<float>(x_),
                               ptr_or_null<float>(weight_), ptr_or_null<float>(mean_),
                               ptr_or_null<float>(rstd_), rows, C, ws.data<float>(), stream);
    });
    return {dx, dw, db};
  }

 protected:
  void release_saved() override { x_ = weight_ = mean_ = rstd_ = Tensor(); }

 private:
  Tensor x_;            // saved: (..., C), for dx and dweight
  Tensor weight_;       // saved: (C), for dx
  Tensor mean_, rstd_;  // saved: (rows) statistics from the forward, for dx and dweight
  Shape x_shape_;
};

Tensor layer_norm(const Tensor& x, const Tensor& weight, const Tensor& bias, double eps) {
  return LayerNorm::apply(x, weight, bias, eps);
}

}  // namespace cnx
