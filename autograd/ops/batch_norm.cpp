// batch_norm over the channels (last dimension) of x (kernels/batchnorm.h), as
// torch.nn.functional.batch_norm. Training: batch statistics, running_mean and running_var
// updated in place (not recorded on the tape: they are buffers, not inputs of the graph);
// eval: the running statistics. Saves what the wanted gradients need: the per-channel mean and
// invstd of the forward (dx, dweight), x (dweight; dx in training, through the batch
// statistics), weight (dx). Eval-mode dx needs neither x nor the mean.
// Mixed precision: x may be bf16, with fp32 weight, bias and running statistics
// (param_dtype); then out and dx are bf16, and the statistics, dweight and dbias fp32.
#include "autograd/checks.h"
#include "autograd/dispatch.h"
#include "autograd/function.h"
#include "autograd/ops.h"
#include "kernels/batchnorm.h"

namespace cnx {

class BatchNorm final : public Function {
 public:
  const char* name() const override { return "batch_norm"; }

  // ---- forward ----
  static Tensor apply(const Tensor& x, const Tensor& weight, const Tensor& bias,
                      const Tensor& running_mean, const Tensor& running_var, bool training,
                      double momentum, double eps) {
    const char* op = "batch_norm";
    check::activation(op, "x", x);
    check::min_rank(op, "x", x, 2);
    const std::string channels = "the channels of x " + x.str();
    const int64_t C = x.dim(-1);
    check::shape(op, "weight", weight, Shape{C}, channels);
    check::shape(op, "bias", bias, Shape{C}, channels);
    check::shape(op, "running_mean", running_mean, Shape{C}, channels);
    check::shape(op, "running_var", running_var, Shape{C}, channels);
    check::params(op, {"x", x},
                  {{"weight", weight}, {"bias", bias}, {"running_mean", running_mean},
                   {"running_var", running_var}});
    CNX_CHECK(eps > 0, op, ": eps must be positive, got ", eps);
    CNX_CHECK(momentum >= 0 && momentum <= 1, op, ": momentum must be in [0, 1], got ", momentum);
    int64_t M = 1;  // values per channel: the product of the leading dimensions
    for (int i = 0; i + 1 < x.rank(); ++i) M *= x.dim(i);
    CNX_CHECK(!training || M > 1, op,
              ": Expected more than 1 value per channel when training, got x ", x.str(), " (",
              M, " value", M == 1 ? "" : "s", " per channel)");
    Tensor out = Tensor::empty(x.shape(), x.dtype(), x.device());
    const DType pt = param_dtype(x.dtype());
    Tensor mean = Tensor::empty(Shape{C}, pt, x.device());
    Tensor invstd = Tensor::empty(Shape{C}, pt, x.device());
    // The running statistics are written through their storage (const Tensor& shares it).
    Tensor rm = running_mean, rv = running_var;
    dispatch_with_bf16(op, x, [&](auto tag) {
      using T = decltype(tag);
      using P = param_t<T>;
      cpu::batchnorm_forward<T>(out.data<T>(), mean.data<P>(), invstd.data<P>(), rm.data<P>(),
                                rv.data<P>(), x.data<T>(), weight.data<P>(), bias.data<P>(), M,
                                C, training, momentum, eps);
    }, [&](auto tag, auto stream) {
      using T = decltype(tag);
      Tensor ws = cuda_workspace(cuda::batchnorm_workspace_floats(M, C), x.device());
      cuda::batchnorm_forward<T>(out.data<T>(), mean.data<float>(), invstd.data<float>(),
                                 rm.data<float>(), rv.data<float>(), x.data<T>(),
                                 weight.data<float>(), bias.data<float>(), M, C, training,
                                 momentum, eps, ws.data<float>(), stream);
    });
    if (wants_grad({x, weight, bias})) {
      auto fn = std::make_shared<BatchNorm>();
      // dbias needs only grad_out; dweight needs x, mean and invstd; dx needs weight and
      // invstd, and in training also x and mean (xhat, through the batch statistics).
      const bool need_x = weight.requires_grad() || (training && x.requires_grad());
      if (need_x) {
        fn->x_ = x.detach();
        fn->mean_ = mean;
      }
      if (need_x || x.requires_grad()) fn->invstd_ = invstd;
      if (x.requires_grad()) fn->weight_ = weight.detach();
      fn->x_shape_ = x.shape();
      fn->training_ = training;
      record(fn, out, {x, weight, bias});
    }
    return out;
  }

  // ---- backward ----
  std::vector<Tensor> backward(const Tensor& grad_out) override {
    const int64_t C = x_shape_[-1];
    int64_t M = 1;
    for (int i = 0; i + 1 < x_shape_.rank(); ++i) M *= x_shape_[i];
    const DType dt = grad_out.dtype();  // x's: dx is an activation gradient
    const DType pt = param_dtype(dt);   // dweight, dbias: fp32 for bf16 x
    const Device dev = grad_out.device();
    Tensor dx, dw, db;
    if (needs_input_grad(0)) dx = Tensor::empty(x_shape_, dt, dev);
    if (needs_input_grad(1)) dw = Tensor::empty(Shape{C}, pt, dev);
    if (needs_input_grad(2)) db = Tensor::empty(Shape{C}, pt, dev);
    dispatch_with_bf16("batch_norm backward", grad_out, [&](auto tag) {
      using T = decltype(tag);
      using P = param_t<T>;
      cpu::batchnorm_backward<T>(ptr_or_null<T>(dx), ptr_or_null<P>(dw), ptr_or_null<P>(db),
                                 grad_out.data<T>(), ptr_or_null<T>(x_), ptr_or_null<P>(weight_),
                                 ptr_or_null<P>(mean_), ptr_or_null<P>(invstd_), M, C, training_);
    }, [&](auto tag, auto stream) {
      using T = decltype(tag);
      Tensor ws = cuda_workspace(cuda::batchnorm_workspace_floats(M, C), dev);
      cuda::batchnorm_backward<T>(ptr_or_null<T>(dx), ptr_or_null<float>(dw),
                                  ptr_or_null<float>(db), grad_out.data<T>(), ptr_or_null<T>(x_),
                                  ptr_or_null<float>(weight_), ptr_or_null<float>(mean_),
                                  ptr_or_null<float>(invstd_), M, C, training_, ws.data<float>(),
                                  stream);
    });
    return {dx, dw, db};
  }

 protected:
  void release_saved() override { x_ = weight_ = mean_ = invstd_ = Tensor(); }

 private:
  Tensor x_;              // saved: (..., C), x's dtype, for dweight, and dx in training
  Tensor weight_;         // saved: (C), param_dtype(x), for dx
  Tensor mean_, invstd_;  // saved: (C), param_dtype(x), the statistics the forward used
  Shape x_shape_;
  bool training_ = false;
};

Tensor batch_norm(const Tensor& x, const Tensor& weight, const Tensor& bias,
                  const Tensor& running_mean, const Tensor& running_var, bool training,
                  double momentum, double eps) {
  return BatchNorm::apply(x, weight, bias, running_mean, running_var, training, momentum, eps);
}

}  // namespace cnx
