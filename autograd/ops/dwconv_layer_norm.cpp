// dwconv_layer_norm: the depthwise conv and the LayerNorm after it as one recorded op
// (kernels/dwconv_layernorm.h). Forward: on CUDA the fused kernel (k = 7, C <= 2048; otherwise
// the two CUDA ops), on the CPU the two reference ops. Backward: the LayerNorm's backward gives
// dy, the conv's backward takes it, so the gradients are the unfused ops' own kernels.
// Saves what the wanted gradients need: y (the conv's output), mean and rstd (for dy and
// dln_weight), ln_weight (dy), x (dw_weight's gradient), dw_weight (dx).
// Mixed precision as the two ops: x bf16 with fp32 parameters; y, out and dx bf16, statistics
// and parameter gradients fp32.
#include "autograd/checks.h"
#include "autograd/dispatch.h"
#include "autograd/function.h"
#include "autograd/ops.h"
#include "kernels/dwconv.h"
#include "kernels/dwconv_layernorm.h"
#include "kernels/layernorm.h"

namespace cnx {

class DwconvLayerNorm final : public Function {
 public:
  const char* name() const override { return "dwconv_layer_norm"; }

  // ---- forward ----
  static Tensor apply(const Tensor& x, const Tensor& dw_weight, const Tensor& dw_bias,
                      const Tensor& ln_weight, const Tensor& ln_bias, double eps) {
    const char* op = "dwconv_layer_norm";
    check::activation(op, "x", x);
    check::rank(op, "x", x, 4);
    check::rank(op, "dw_weight", dw_weight, 3);
    check::params(op, {"x", x},
                  {{"dw_weight", dw_weight}, {"dw_bias", dw_bias}, {"ln_weight", ln_weight},
                   {"ln_bias", ln_bias}});
    const int64_t N = x.dim(0), H = x.dim(1), W = x.dim(2), C = x.dim(3), k = dw_weight.dim(0);
    CNX_CHECK(C > 0, op, ": x ", x.str(), " has no channels");
    CNX_CHECK(k % 2 == 1, op, ": dw_weight ", dw_weight.str(), " has even kernel size ", k,
              "; padding k/2 keeps the size only for odd k");
    const std::string chans = "the channels of x " + x.str();
    check::shape(op, "dw_weight", dw_weight, Shape{k, k, C}, "(k, k, C) with C " + chans);
    if (dw_bias.defined()) check::shape(op, "dw_bias", dw_bias, Shape{C}, chans);
    check::shape(op, "ln_weight", ln_weight, Shape{C}, chans);
    check::shape(op, "ln_bias", ln_bias, Shape{C}, chans);
    CNX_CHECK(eps > 0, op, ": eps must be positive, got ", eps);

    const int64_t rows = N * H * W;
    const bool grad = wants_grad({x, dw_weight, dw_bias, ln_weight, ln_bias});
    // y and the statistics are written only when backward will read them.
    const bool keep_stats = grad && (x.requires_grad() || dw_weight.requires_grad() ||
                                     dw_bias.requires_grad() || ln_weight.requires_grad());
    const DType pt = param_dtype(x.dtype());
    Tensor out = Tensor::empty(x.shape(), x.dtype(), x.device());
    Tensor y, mean, rstd;
    if (keep_stats) {
      y = Tensor::empty(x.shape(), x.dtype(), x.device());
      mean = Tensor::empty(Shape{rows}, pt, x.device());
      rstd = Tensor::empty(Shape{rows}, pt, x.device());
    }
    dispatch_with_bf16(op, x, [&](auto tag) {
      using T = decltype(tag);
      using P = param_t<T>;
      cpu::dwconv_layernorm_forward<T>(out.data<T>(), ptr_or_null<T>(y), ptr_or_null<P>(mean),
                                       ptr_or_null<P>(rstd), x.data<T>(), dw_weight.data<P>(),
                                       ptr_or_null<P>(dw_bias), ln_weight.data<P>(),
                                       ln_bias.data<P>(), N, H, W, C, k, eps);
    }, [&](auto tag, auto stream) {
      using T = decltype(tag);
      if (cuda::dwconv_layernorm_supported(C, k)) {
        cuda::dwconv_layernorm_forward<T>(out.data<T>(), ptr_or_null<T>(y),
                                          ptr_or_null<float>(mean), ptr_or_null<float>(rstd),
                                          x.data<T>(), dw_weight.data<float>(),
                                          ptr_or_null<float>(dw_bias), ln_weight.data<float>(),
                                          ln_bias.data<float>(), N, H, W, C, k, eps, stream);
        return;
      }
      // Sizes the fused kernel does not take: the two ops (y and the statistics in scratch
      // tensors when backward does not keep them).
      Tensor ys = y.defined() ? y : Tensor::empty(x.shape(), x.dtype(), x.device());
      Tensor m = mean.defined() ? mean : Tensor::empty(Shape{rows}, pt, x.device());
      Tensor r = rstd.defined() ? rstd : Tensor::empty(Shape{rows}, pt, x.device());
      cuda::dwconv_forward<T>(ys.data<T>(), x.data<T>(), dw_weight.data<float>(),
                              ptr_or_null<float>(dw_bias), N, H, W, C, k, stream);
      cuda::layernorm_forward<T>(out.data<T>(), m.data<float>(), r.data<float>(), ys.data<T>(),
                                 ln_weight.data<float>(), ln_bias.data<float>(), rows, C, eps,
                                 stream);
    });
    if (grad) {
      auto fn = std::make_shared<DwconvLayerNorm>();
      fn->y_ = y;  // undefined when only ln_bias wants a gradient (it needs dout alone)
      fn->mean_ = mean;
      fn->rstd_ = rstd;
      const bool want_dy =
          x.requires_grad() || dw_weight.requires_grad() || dw_bias.requires_grad();
      if (want_dy) fn->ln_weight_ = ln_weight.detach();
      if (dw_weight.requires_grad()) fn->x_ = x.detach();
      if (x.requires_grad()) fn->dw_weight_ = dw_weight.detach();
      fn->x_shape_ = x.shape();
      fn->k_ = k;
      record(fn, out, {x, dw_weight, dw_bias, ln_weight, ln_bias});
    }
    return out;
  }

  // ---- backward ----
  std::vector<Tensor> backward(const Tensor& grad_out) override {
    const int64_t N = x_shape_[0], H = x_shape_[1], W = x_shape_[2], C = x_shape_[3];
    const int64_t rows = N * H * W;
    const DType dt = grad_out.dtype(), pt = param_dtype(dt);
    const Device dev = grad_out.device();
    const bool want_dy = needs_input_grad(0) || needs_input_grad(1) || needs_input_grad(2);
    Tensor dy, dx, ddw, ddb, dlnw, dlnb;
    if (want_dy) dy = Tensor::empty(x_shape_, dt, dev);
    if (needs_input_grad(0)) dx = Tensor::empty(x_shape_, dt, dev);
    if (needs_input_grad(1)) ddw = Tensor::empty(Shape{k_, k_, C}, pt, dev);
    if (needs_input_grad(2)) ddb = Tensor::empty(Shape{C}, pt, dev);
    if (needs_input_grad(3)) dlnw = Tensor::empty(Shape{C}, pt, dev);
    if (needs_input_grad(4)) dlnb = Tensor::empty(Shape{C}, pt, dev);
    dispatch_with_bf16("dwconv_layer_norm backward", grad_out, [&](auto tag) {
      using T = decltype(tag);
      using P = param_t<T>;
      cpu::layernorm_backward<T>(ptr_or_null<T>(dy), ptr_or_null<P>(dlnw), ptr_or_null<P>(dlnb),
                                 grad_out.data<T>(), ptr_or_null<T>(y_),
                                 ptr_or_null<P>(ln_weight_), ptr_or_null<P>(mean_),
                                 ptr_or_null<P>(rstd_), rows, C);
      if (want_dy)
        cpu::dwconv_backward<T>(ptr_or_null<T>(dx), ptr_or_null<P>(ddw), ptr_or_null<P>(ddb),
                                dy.data<T>(), ptr_or_null<T>(x_), ptr_or_null<P>(dw_weight_), N,
                                H, W, C, k_);
    }, [&](auto tag, auto stream) {
      using T = decltype(tag);
      Tensor ws_ln = cuda_workspace(cuda::layernorm_backward_workspace_floats(rows, C), dev);
      cuda::layernorm_backward<T>(ptr_or_null<T>(dy), ptr_or_null<float>(dlnw),
                                  ptr_or_null<float>(dlnb), grad_out.data<T>(),
                                  ptr_or_null<T>(y_), ptr_or_null<float>(ln_weight_),
                                  ptr_or_null<float>(mean_), ptr_or_null<float>(rstd_), rows, C,
                                  ws_ln.data<float>(), stream);
      if (want_dy) {
        Tensor ws_dw = cuda_workspace(cuda::dwconv_backward_workspace_floats(N, H, W, C, k_), dev);
        cuda::dwconv_backward<T>(ptr_or_null<T>(dx), ptr_or_null<float>(ddw),
                                 ptr_or_null<float>(ddb), dy.data<T>(), ptr_or_null<T>(x_),
                                 ptr_or_null<float>(dw_weight_), N, H, W, C, k_,
                                 ws_dw.data<float>(), stream);
      }
    });
    return {dx, ddw, ddb, dlnw, dlnb};
  }

 protected:
  void release_saved() override { y_ = mean_ = rstd_ = ln_weight_ = x_ = dw_weight_ = Tensor(); }

 private:
  Tensor y_;            // saved: (N, H, W, C), x's dtype: the conv's output, for dy and dln_weight
  Tensor mean_, rstd_;  // saved: (N*H*W), param dtype: y's statistics, for dy and dln_weight
  Tensor ln_weight_;    // saved: (C), for dy
  Tensor x_;            // saved: (N, H, W, C), for dw_weight's gradient
  Tensor dw_weight_;    // saved: (k, k, C), for dx
  Shape x_shape_;
  int64_t k_ = 0;
};

Tensor dwconv_layer_norm(const Tensor& x, const Tensor& dw_weight, const Tensor& dw_bias,
                         const Tensor& ln_weight, const Tensor& ln_bias, double eps) {
  return DwconvLayerNorm::apply(x, dw_weight, dw_bias, ln_weight, ln_bias, eps);
}

}  // namespace cnx
