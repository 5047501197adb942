// dwconv: depthwise k x k conv, odd k, padding k/2 (kernels/dwconv.h). k is weight.dim(0).
// Saves x (for dweight) and weight (for dx), each only when needed.
// Mixed precision: x bf16 takes fp32 weight and bias (param_dtype) and gives a bf16 output;
// backward gives a bf16 dx and fp32 dweight and dbias.
#include "autograd/checks.h"
#include "autograd/dispatch.h"
#include "autograd/function.h"
#include "autograd/ops.h"
#include "kernels/dwconv.h"

namespace cnx {

class Dwconv final : public Function {
 public:
  const char* name() const override { return "dwconv"; }

  // ---- forward ----
  static Tensor apply(const Tensor& x, const Tensor& weight, const Tensor& bias) {
    const char* op = "dwconv";
    check::activation(op, "x", x);
    check::rank(op, "x", x, 4);
    check::rank(op, "weight", weight, 3);
    check::params(op, {"x", x}, {{"weight", weight}, {"bias", bias}});
    const int64_t N = x.dim(0), H = x.dim(1), W = x.dim(2), C = x.dim(3), k = weight.dim(0);
    CNX_CHECK(k % 2 == 1, op, ": weight ", weight.str(), " has even kernel size ", k,
              "; padding k/2 keeps the size only for odd k");
    check::shape(op, "weight", weight, Shape{k, k, C}, "(k, k, C) with C the channels of x " + x.str());
    if (bias.defined()) check::shape(op, "bias", bias, Shape{C}, "the channels of x " + x.str());
    Tensor out = Tensor::empty(x.shape(), x.dtype(), x.device());
    dispatch_with_bf16(op, x, [&](auto tag) {
      using T = decltype(tag);
      using P = param_t<T>;
      cpu::dwconv_forward<T>(out.data<T>(), x.data<T>(), weight.data<P>(), ptr_or_null<P>(bias),
                             N, H, W, C, k);
    }, [&](auto tag, auto stream) {
      using T = decltype(tag);
      using P = param_t<T>;
      cuda::dwconv_forward<T>(out.data<T>(), x.data<T>(), weight.data<P>(), ptr_or_null<P>(bias),
                              N, H, W, C, k, stream);
    });
    if (wants_grad({x, weight, bias})) {
      auto fn = std::make_shared<Dwconv>();
      if (weight.requires_grad()) fn->x_ = x.detach();
      if (x.requires_grad()) fn->weight_ = weight.detach();
      fn->x_shape_ = x.shape();
      fn->k_ = k;
      record(fn, out, {x, weight, bias});
    }
    return out;
  }

  // ---- backward ----
  std::vector<Tensor> backward(const Tensor& grad_out) override {
    const int64_t N = x_shape_[0], H = x_shape_[1], W = x_shape_[2], C = x_shape_[3];
    const DType dt = grad_out.dtype();  // x's dtype: the activations'
    const Device dev = grad_out.device();
    Tensor dx, dw, db;
    if (needs_input_grad(0)) dx = Tensor::empty(x_shape_, dt, dev);
    if (needs_input_grad(1)) dw = Tensor::empty(Shape{k_, k_, C}, param_dtype(dt), dev);
    if (needs_input_grad(2)) db = Tensor::empty(Shape{C}, param_dtype(dt), dev);
    dispatch_with_bf16("dwconv backward", grad_out, [&](auto tag) {
      using T = decltype(tag);
      using P = param_t<T>;
      cpu::dwconv_backward<T>(ptr_or_null<T>(dx), ptr_or_null<P>(dw), ptr_or_null<P>(db),
                              grad_out.data<T>(), ptr_or_null<T>(x_), ptr_or_null<P>(weight_), N,
                              H, W, C, k_);
    }, [&](auto tag, auto stream) {
      using T = decltype(tag);
      using P = param_t<T>;
      Tensor ws = cuda_workspace(cuda::dwconv_backward_workspace_floats(N, H, W, C, k_), dev);
      cuda::dwconv_backward<T>(ptr_or_null<T>(dx), ptr_or_null<P>(dw), ptr_or_null<P>(db),
                               grad_out.data<T>(), ptr_or_null<T>(x_), ptr_or_null<P>(weight_),
                               N, H, W, C, k_, ws.data<float>(), stream);
    });
    return {dx, dw, db};
  }

 protected:
  void release_saved() override { x_ = weight_ = Tensor(); }

 private:
  Tensor x_;       // saved: (N, H, W, C), for dweight
  Tensor weight_;  // saved: (k, k, C), for dx
  Shape x_shape_;
  int64_t k_ = 0;
};

Tensor dwconv(const Tensor& x, const Tensor& weight, const Tensor& bias) {
  return Dwconv::apply(x, weight, bias);
}

}  // namespace cnx
