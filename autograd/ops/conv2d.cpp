// conv2d: dense 2-D convolution with stride, zero padding and groups (kernels/conv2d.h). The
// kernel size (kh, kw) is weight.dim(1), weight.dim(2).
// Saves x (for dweight) and the weight operand (for dx), each only when needed.
// CPU f32 with groups == 1 takes the im2col + OpenBLAS path when cnx::blas::enabled(); f64,
// bf16 and grouped convs take the reference loops.
// CUDA: through cuDNN when the build has it and the switch allows it (cuda::conv2d_uses_cudnn(),
// env CNX_CONV_CUDNN=0 turns it off) and cuDNN takes the shape (its workspace query is not -1);
// otherwise the im2col + cuBLASLt and direct grouped kernels of kernels/cuda/conv2d.cu.
// Mixed precision, as patchify_conv and linear: with a bf16 x, weight and bias stay fp32
// parameters; the weight operand is a bf16 copy rounded once here in forward and saved for dx
// in the weight's place; out and dx are bf16, dweight and dbias fp32.
#include <type_traits>

#include "autograd/checks.h"
#include "autograd/dispatch.h"
#include "autograd/function.h"
#include "autograd/ops.h"
#include "kernels/conv2d.h"
#include "kernels/linear.h"

namespace cnx {

class Conv2d final : public Function {
 public:
  const char* name() const override { return "conv2d"; }

  // ---- forward ----
  static Tensor apply(const Tensor& x, const Tensor& weight, const Tensor& bias, int64_t stride,
                      int64_t padding, int64_t groups) {
    const char* op = "conv2d";
    check::activation(op, "x", x);
    check::rank(op, "x", x, 4);
    check::rank(op, "weight", weight, 4);
    check::params(op, {"x", x}, {{"weight", weight}, {"bias", bias}});
    CNX_CHECK(stride >= 1, op, ": stride ", stride, " must be >= 1 (x ", x.str(), ", weight ",
              weight.str(), ")");
    CNX_CHECK(padding >= 0, op, ": padding ", padding, " must be >= 0 (x ", x.str(), ", weight ",
              weight.str(), ")");
    CNX_CHECK(groups >= 1, op, ": groups ", groups, " must be >= 1 (x ", x.str(), ", weight ",
              weight.str(), ")");
    Conv2dShape s;
    s.N = x.dim(0), s.H = x.dim(1), s.W = x.dim(2), s.Ci = x.dim(3);
    s.Co = weight.dim(0), s.kh = weight.dim(1), s.kw = weight.dim(2);
    s.stride = stride, s.padding = padding, s.groups = groups;
    CNX_CHECK(s.kh >= 1 && s.kw >= 1, op, ": weight ", weight.str(), " has an empty ", s.kh, "x",
              s.kw, " kernel");
    CNX_CHECK(s.Ci % groups == 0, op, ": groups ", groups, " does not divide the ", s.Ci,
              " channels of x ", x.str());
    CNX_CHECK(s.Co % groups == 0, op, ": groups ", groups, " does not divide the ", s.Co,
              " output channels of weight ", weight.str());
    check::shape(op, "weight", weight, Shape{s.Co, s.kh, s.kw, s.Cig()},
                 "(Co, kh, kw, Ci / groups) with Ci the channels of x " + x.str() + " and groups " +
                     std::to_string(groups));
    if (bias.defined()) check::shape(op, "bias", bias, Shape{s.Co}, "Co of weight " + weight.str());
    CNX_CHECK(s.Ho() >= 1 && s.Wo() >= 1, op, ": x ", x.str(), " padded by ", padding,
              " is smaller than the ", s.kh, "x", s.kw, " kernel of weight ", weight.str(),
              " (output ", s.Ho(), "x", s.Wo(), ")");
    Tensor out = Tensor::empty(Shape{s.N, s.Ho(), s.Wo(), s.Co}, x.dtype(), x.device());
    // The weight operand in x's dtype: the parameter, or its bf16 cast.
    const Tensor w = check::gemm_weight_operand(op, x, weight, Tensor());
    dispatch_with_bf16(op, x, [&](auto tag) {
      using T = decltype(tag);
      using P = param_t<T>;
      if constexpr (std::is_same_v<T, float>) {
        if (blas::enabled())
          return blas::conv2d_forward(out.data<T>(), x.data<T>(), w.data<T>(),
                                      ptr_or_null<P>(bias), s);
      }
      cpu::conv2d_forward<T>(out.data<T>(), x.data<T>(), w.data<T>(), ptr_or_null<P>(bias), s);
    }, [&](auto tag, auto stream) {
      using T = decltype(tag);
      const int64_t cudnn_ws = cuda::conv2d_cudnn_forward_workspace_floats(x.dtype(), s);
      if (cudnn_ws >= 0) {
        Tensor ws = cuda_workspace(cudnn_ws, x.device());
        return cuda::conv2d_cudnn_forward(out.data<T>(), x.data<T>(), w.data<T>(),
                                          ptr_or_null<float>(bias), s, ws.data<float>(), stream);
      }
      Tensor ws = cuda_workspace(cuda::conv2d_forward_workspace_floats(x.dtype(), s), x.device());
      cuda::conv2d_forward(out.data<T>(), x.data<T>(), w.data<T>(), ptr_or_null<float>(bias), s,
                           ws.data<float>(), stream);
    });
    if (wants_grad({x, weight, bias})) {
      auto fn = std::make_shared<Conv2d>();
      if (weight.requires_grad()) fn->x_ = x.detach();
      if (x.requires_grad()) fn->weight_ = w.detach();
      fn->s_ = s;
      record(fn, out, {x, weight, bias});
    }
    return out;
  }

  // ---- backward ----
  std::vector<Tensor> backward(const Tensor& grad_out) override {
    const Conv2dShape& s = s_;
    const DType dt = grad_out.dtype();  // x's dtype; the parameters' gradients are param_dtype
    const Device dev = grad_out.device();
    Tensor dx, dw, db;
    if (needs_input_grad(0)) dx = Tensor::empty(Shape{s.N, s.H, s.W, s.Ci}, dt, dev);
    if (needs_input_grad(1)) dw = Tensor::empty(Shape{s.Co, s.kh, s.kw, s.Cig()}, param_dtype(dt), dev);
    if (needs_input_grad(2)) db = Tensor::empty(Shape{s.Co}, param_dtype(dt), dev);
    dispatch_with_bf16("conv2d backward", grad_out, [&](auto tag) {
      using T = decltype(tag);
      using P = param_t<T>;
      if constexpr (std::is_same_v<T, float>) {
        if (blas::enabled())
          return blas::conv2d_backward(ptr_or_null<T>(dx), ptr_or_null<P>(dw), ptr_or_null<P>(db),
                                       grad_out.data<T>(), ptr_or_null<T>(x_),
                                       ptr_or_null<T>(weight_), s);
      }
      cpu::conv2d_backward<T>(ptr_or_null<T>(dx), ptr_or_null<P>(dw), ptr_or_null<P>(db),
                              grad_out.data<T>(), ptr_or_null<T>(x_), ptr_or_null<T>(weight_), s);
    }, [&](auto tag, auto stream) {
      using T = decltype(tag);
      const int64_t cudnn_ws = cuda::conv2d_cudnn_backward_workspace_floats(
          dt, s, dx.defined(), dw.defined(), db.defined());
      if (cudnn_ws >= 0) {
        Tensor ws = cuda_workspace(cudnn_ws, dev);
        return cuda::conv2d_cudnn_backward(ptr_or_null<T>(dx), ptr_or_null<float>(dw),
                                           ptr_or_null<float>(db), grad_out.data<T>(),
                                           ptr_or_null<T>(x_), ptr_or_null<T>(weight_), s,
                                           ws.data<float>(), stream);
      }
      Tensor ws = cuda_workspace(
          cuda::conv2d_backward_workspace_floats(dt, s, dx.defined(), dw.defined(), db.defined()),
          dev);
      cuda::conv2d_backward(ptr_or_null<T>(dx), ptr_or_null<float>(dw), ptr_or_null<float>(db),
                            grad_out.data<T>(), ptr_or_null<T>(x_), ptr_or_null<T>(weight_), s,
                            ws.data<float>(), stream);
    });
    return {dx, dw, db};
  }

 protected:
  void release_saved() override { x_ = weight_ = Tensor(); }

 private:
  Tensor x_;       // saved: (N, H, W, Ci), for dweight
  Tensor weight_;  // saved: (Co, kh, kw, Ci / groups), for dx: weight, or its bf16 copy
  Conv2dShape s_;
};

Tensor conv2d(const Tensor& x, const Tensor& weight, const Tensor& bias, int64_t stride,
              int64_t padding, int64_t groups) {
  return Conv2d::apply(x, weight, bias, stride, padding, groups);
}

}  // namespace cnx
