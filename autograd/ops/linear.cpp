// linear: x (..., K) W^T + b, W (N, K), b (N) (kernels/linear.h); the leading dimensions of x
// are flattened into M rows. Saves x (for dweight) and weight (for dx), each only when needed.
// f32 and bf16 on the CPU go through OpenBLAS when the build has it (cnx::blas, unless
// CNX_CPU_REFERENCE=1 or blas::set_cpu_reference(true) asks for the loops); f64 always takes
// the reference loops.
//
// Mixed precision: with a bf16 x, weight and bias stay fp32 parameters (check::params). The
// GEMM's weight operand is a bf16 copy of weight, rounded once here in forward and saved for
// dx in its place (what PyTorch's autocast does with fp32 master weights); out and dx are bf16,
// dweight and dbias fp32 (kernels/linear.h). When the caller passes that copy precomputed
// (weight_bf16: the optimiser writes it in its update, train/optim/adamw.h), forward uses and
// saves it instead of casting; the values, and so every result, are the same.
#include <type_traits>

#include "autograd/checks.h"
#include "autograd/dispatch.h"
#include "autograd/function.h"
#include "autograd/ops.h"
#include "kernels/linear.h"

namespace cnx {

class Linear final : public Function {
 public:
  const char* name() const override { return "linear"; }

  // ---- forward ----
  static Tensor apply(const Tensor& x, const Tensor& weight, const Tensor& bias,
                      const Tensor& weight_bf16) {
    const char* op = "linear";
    check::activation(op, "x", x);
    check::min_rank(op, "x", x, 1);
    check::rank(op, "weight", weight, 2);
    check::params(op, {"x", x}, {{"weight", weight}, {"bias", bias}});
    const int64_t K = x.dim(-1), N = weight.dim(0);
    CNX_CHECK(weight.dim(1) == K, op, ": weight ", weight.str(), " must have ", K,
              " columns, the last dimension of x ", x.str());
    if (bias.defined()) check::shape(op, "bias", bias, Shape{N}, "the rows of weight " + weight.str());
    std::vector<int64_t> out_dims = x.shape().vec();
    int64_t M = 1;  // the product of the leading dimensions (not numel / K: K may be 0)
    for (size_t i = 0; i + 1 < out_dims.size(); ++i) M *= out_dims[i];
    out_dims.back() = N;
    Tensor out = Tensor::empty(Shape(out_dims), x.dtype(), x.device());
    // The weight operand in x's dtype: the parameter, its bf16 cast, or the optimiser's copy.
    const Tensor w = check::gemm_weight_operand(op, x, weight, weight_bf16);
    dispatch_with_bf16(op, x, [&](auto tag) {
      using T = decltype(tag);
      using P = param_t<T>;
      if constexpr (!std::is_same_v<T, double>) {
        if (blas::enabled())
          return blas::linear_forward(out.data<T>(), x.data<T>(), w.data<T>(),
                                      ptr_or_null<P>(bias), M, K, N);
      }
      cpu::linear_forward<T>(out.data<T>(), x.data<T>(), w.data<T>(), ptr_or_null<P>(bias), M, K,
                             N);
    }, [&](auto tag, auto stream) {
      using T = decltype(tag);
      cuda::linear_forward(out.data<T>(), x.data<T>(), w.data<T>(), ptr_or_null<float>(bias), M,
                           K, N, stream);
    });
    if (wants_grad({x, weight, bias})) {
      auto fn = std::make_shared<Linear>();
      if (weight.requires_grad()) fn->x_ = x.detach();
      if (x.requires_grad()) fn->weight_ = w.detach();
      fn->x_shape_ = x.shape();
      fn->M_ = M;
      fn->K_ = K;
      fn->N_ = N;
      record(fn, out, {x, weight, bias});
    }
    return out;
  }

  // ---- backward ----
  std::vector<Tensor> backward(const Tensor& grad_out) override {
    const DType dt = grad_out.dtype();  // x's dtype; the parameters' gradients are param_dtype
    const Device dev = grad_out.device();
    Tensor dx, dw, db;
    if (needs_input_grad(0)) dx = Tensor::empty(x_shape_, dt, dev);
    if (needs_input_grad(1)) dw = Tensor::empty(Shape{N_, K_}, param_dtype(dt), dev);
    if (needs_input_grad(2)) db = Tensor::empty(Shape{N_}, param_dtype(dt), dev);
    dispatch_with_bf16("linear backward", grad_out, [&](auto tag) {
      using T = decltype(tag);
      using P = param_t<T>;
      if constexpr (!std::is_same_v<T, double>) {
        if (blas::enabled())
          return blas::linear_backward(ptr_or_null<T>(dx), ptr_or_null<P>(dw), ptr_or_null<P>(db),
                                       grad_out.data<T>(), ptr_or_null<T>(x_),
                                       ptr_or_null<T>(weight_), M_, K_, N_);
      }
      cpu::linear_backward<T>(ptr_or_null<T>(dx), ptr_or_null<P>(dw), ptr_or_null<P>(db),
                              grad_out.data<T>(), ptr_or_null<T>(x_), ptr_or_null<T>(weight_), M_,
                              K_, N_);
    }, [&](auto tag, auto stream) {
      using T = decltype(tag);
      cuda::linear_backward(ptr_or_null<T>(dx), ptr_or_null<float>(dw), ptr_or_null<float>(db),
                            grad_out.data<T>(), ptr_or_null<T>(x_), ptr_or_null<T>(weight_), M_,
                            K_, N_, stream);
    });
    return {dx, dw, db};
  }

 protected:
  void release_saved() override { x_ = weight_ = Tensor(); }

 private:
  Tensor x_;       // saved: (..., K), for dweight
  Tensor weight_;  // saved: (N, K), for dx: weight, or its bf16 copy when x is bf16
  Shape x_shape_;
  int64_t M_ = 0, K_ = 0, N_ = 0;
};

Tensor linear(const Tensor& x, const Tensor& weight, const Tensor& bias,
              const Tensor& weight_bf16) {
  return Linear::apply(x, weight, bias, weight_bf16);
}

}  // namespace cnx
