// patchify_conv: k x k, stride k, no padding (kernels/patchify.h). k is weight.dim(1).
// Saves x (for dweight) and weight (for dx), each only when needed.
// Mixed precision, as linear (autograd/ops/linear.cpp): with a bf16 x, weight and bias stay fp32
// parameters; the GEMM's weight operand is a bf16 copy rounded once here in forward and saved
// for dx in the weight's place (or the caller's precomputed copy, weight_bf16, as linear);
// out and dx are bf16, dweight and dbias fp32.
#include "autograd/checks.h"
#include "autograd/dispatch.h"
#include "autograd/function.h"
#include "autograd/ops.h"
#include "kernels/patchify.h"

namespace cnx {

class PatchifyConv final : public Function {
 public:
  const char* name() const override { return "patchify_conv"; }

  // ---- forward ----
  static Tensor apply(const Tensor& x, const Tensor& weight, const Tensor& bias,
                      const Tensor& weight_bf16) {
    const char* op = "patchify_conv";
    check::activation(op, "x", x);
    check::rank(op, "x", x, 4);
    check::rank(op, "weight", weight, 4);
    check::params(op, {"x", x}, {{"weight", weight}, {"bias", bias}});
    const int64_t N = x.dim(0), H = x.dim(1), W = x.dim(2), Ci = x.dim(3);
    const int64_t Co = weight.dim(0), k = weight.dim(1);
    CNX_CHECK(k >= 1, op, ": weight ", weight.str(), " has kernel size ", k);
    check::shape(op, "weight", weight, Shape{Co, k, k, Ci},
                 "(Co, k, k, Ci) with Ci the channels of x " + x.str());
    if (bias.defined()) check::shape(op, "bias", bias, Shape{Co}, "Co of weight " + weight.str());
    const int64_t Ho = H / k, Wo = W / k;
    CNX_CHECK(Ho > 0 && Wo > 0, op, ": x ", x.str(), " is smaller than the ", k, "x", k,
              " patch of weight ", weight.str());
    Tensor out = Tensor::empty(Shape{N, Ho, Wo, Co}, x.dtype(), x.device());
    // The weight operand in x's dtype: the parameter, its bf16 cast, or the optimiser's copy.
    const Tensor w = check::gemm_weight_operand(op, x, weight, weight_bf16);
    dispatch_with_bf16(op, x, [&](auto tag) {
      using T = decltype(tag);
      cpu::patchify_forward<T>(out.data<T>(), x.data<T>(), w.data<T>(),
                               ptr_or_null<param_t<T>>(bias), N, H, W, Ci, Co, k);
    }, [&](auto tag, auto stream) {
      using T = decltype(tag);
      cuda::patchify_forward(out.data<T>(), x.data<T>(), w.data<T>(), ptr_or_null<float>(bias), N,
                             H, W, Ci, Co, k, stream);
    });
    if (wants_grad({x, weight, bias})) {
      auto fn = std::make_shared<PatchifyConv>();
      if (weight.requires_grad()) fn->x_ = x.detach();
      if (x.requires_grad()) fn->weight_ = w.detach();
      fn->x_shape_ = x.shape();
      fn->w_shape_ = weight.shape();
      record(fn, out, {x, weight, bias});
    }
    return out;
  }

  // ---- backward ----
  std::vector<Tensor> backward(const Tensor& grad_out) override {
    const int64_t N = x_shape_[0], H = x_shape_[1], W = x_shape_[2], Ci = x_shape_[3];
    const int64_t Co = w_shape_[0], k = w_shape_[1];
    const DType dt = grad_out.dtype();  // x's dtype; the parameters' gradients are param_dtype
    const Device dev = grad_out.device();
    Tensor dx, dw, db;
    if (needs_input_grad(0)) dx = Tensor::empty(x_shape_, dt, dev);
    if (needs_input_grad(1)) dw = Tensor::empty(w_shape_, param_dtype(dt), dev);
    if (needs_input_grad(2)) db = Tensor::empty(Shape{Co}, param_dtype(dt), dev);
    dispatch_with_bf16("patchify_conv backward", grad_out, [&](auto tag) {
      using T = decltype(tag);
      using P = param_t<T>;
      cpu::patchify_backward<T>(ptr_or_null<T>(dx), ptr_or_null<P>(dw), ptr_or_null<P>(db),
                                grad_out.data<T>(), ptr_or_null<T>(x_), ptr_or_null<T>(weight_),
                                N, H, W, Ci, Co, k);
    }, [&](auto tag, auto stream) {
      using T = decltype(tag);
      cuda::patchify_backward(ptr_or_null<T>(dx), ptr_or_null<float>(dw), ptr_or_null<float>(db),
                              grad_out.data<T>(), ptr_or_null<T>(x_), ptr_or_null<T>(weight_), N,
                              H, W, Ci, Co, k, stream);
    });
    return {dx, dw, db};
  }

 protected:
  void release_saved() override { x_ = weight_ = Tensor(); }

 private:
  Tensor x_;        // saved: (N, H, W, Ci), for dweight
  Tensor weight_;   // saved: (Co, k, k, Ci), for dx: weight, or its bf16 copy when x is bf16
  Shape x_shape_, w_shape_;
};

Tensor patchify_conv(const Tensor& x, const Tensor& weight, const Tensor& bias,
                     const Tensor& weight_bf16) {
  return PatchifyConv::apply(x, weight, bias, weight_bf16);
}

}  // namespace cnx
