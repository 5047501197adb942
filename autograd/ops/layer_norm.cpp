// layer_norm over the last dimension (kernels/layernorm.h). Saves what the wanted gradients
// need: x and the per-row mean and rstd of the forward (dx, dweight), weight (dx).
// Mixed precision: x may be bf16, with fp32 weight and bias (param_dtype); then out and dx are
// bf16, and mean, rstd, dweight and dbias fp32.
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
    check::activation(op, "x", x);
    check::min_rank(op, "x", x, 1);
    check::params(op, {"x", x}, {{"weight", weight}, {"bias", bias}});
    const int64_t C = x.dim(-1);
    CNX_CHECK(C > 0, op, ": x ", x.str(), " has no channels");
    check::shape(op, "weight", weight, Shape{C}, "the channels of x " + x.str());
    check::shape(op, "bias", bias, Shape{C}, "the channels of x " + x.str());
    CNX_CHECK(eps > 0, op, ": eps must be positive, got ", eps);
    const int64_t rows = x.numel() / C;
    Tensor out = Tensor::empty(x.shape(), x.dtype(), x.device());
    const DType pt = param_dtype(x.dtype());  // of the statistics: fp32 for bf16 x
    Tensor mean = Tensor::empty(Shape{rows}, pt, x.device());
    Tensor rstd = Tensor::empty(Shape{rows}, pt, x.device());
    dispatch_with_bf16(op, x, [&](auto tag) {
      using T = decltype(tag);
      using P = param_t<T>;
      cpu::layernorm_forward<T>(out.data<T>(), mean.data<P>(), rstd.data<P>(), x.data<T>(),
                                weight.data<P>(), bias.data<P>(), rows, C, eps);
    }, [&](auto tag, auto stream) {
      using T = decltype(tag);
      cuda::layernorm_forward<T>(out.data<T>(), mean.data<float>(), rstd.data<float>(),
                                 x.data<T>(), weight.data<float>(), bias.data<float>(), rows, C,
                                 eps, stream);
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
    const DType dt = grad_out.dtype();  // x's: dx is an activation gradient
    const DType pt = param_dtype(dt);   // dweight, dbias: fp32 for bf16 x
    const Device dev = grad_out.device();
    Tensor dx, dw, db;
    if (needs_input_grad(0)) dx = Tensor::empty(x_shape_, dt, dev);
    if (needs_input_grad(1)) dw = Tensor::empty(Shape{C}, pt, dev);
    if (needs_input_grad(2)) db = Tensor::empty(Shape{C}, pt, dev);
    dispatch_with_bf16("layer_norm backward", grad_out, [&](auto tag) {
      using T = decltype(tag);
      using P = param_t<T>;
      cpu::layernorm_backward<T>(ptr_or_null<T>(dx), ptr_or_null<P>(dw), ptr_or_null<P>(db),
                                 grad_out.data<T>(), ptr_or_null<T>(x_), ptr_or_null<P>(weight_),
                                 ptr_or_null<P>(mean_), ptr_or_null<P>(rstd_), rows, C);
    }, [&](auto tag, auto stream) {
      using T = decltype(tag);
      Tensor ws = cuda_workspace(cuda::layernorm_backward_workspace_floats(rows, C), dev);
      cuda::layernorm_backward<T>(ptr_or_null<T>(dx), ptr_or_null<float>(dw),
                                  ptr_or_null<float>(db), grad_out.data<T>(), ptr_or_null<T>(x_),
                                  ptr_or_null<float>(weight_), ptr_or_null<float>(mean_),
                                  ptr_or_null<float>(rstd_), rows, C, ws.data<float>(), stream);
    });
    return {dx, dw, db};
  }

 protected:
  void release_saved() override { x_ = weight_ = mean_ = rstd_ = Tensor(); }

 private:
  Tensor x_;            // saved: (..., C), x's dtype, for dx and dweight
  Tensor weight_;       // saved: (C), param_dtype(x), for dx
  Tensor mean_, rstd_;  // saved: (rows), param_dtype(x), statistics of the forward, for dx, dweight
  Shape x_shape_;
};

Tensor layer_norm(const Tensor& x, const Tensor& weight, const Tensor& bias, double eps) {
  return LayerNorm::apply(x, weight, bias, eps);
}

}  // namespace cnx
