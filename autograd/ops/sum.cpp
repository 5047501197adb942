// sum: all elements to a one-element tensor of shape [].  din = dout everywhere.
#include "autograd/checks.h"
#include "autograd/dispatch.h"
#include "autograd/function.h"
#include "autograd/ops.h"
#include "kernels/sum.h"

namespace cnx {

class Sum final : public Function {
 public:
  const char* name() const override { return "sum"; }

  // ---- forward ----
  static Tensor apply(const Tensor& x) {
    check::floating("sum", "x", x);
    Tensor out = Tensor::empty(Shape{}, x.dtype(), x.device());
    dispatch("sum", x, [&](auto tag) {
      using T = decltype(tag);
      cpu::sum_forward<T>(out.data<T>(), x.data<T>(), x.numel());
    }, [&](auto stream) {
      Tensor ws = cuda_workspace(cuda::sum_forward_workspace_floats(x.numel()), x.device());
      cuda::sum_forward(out.data<float>(), x.data<float>(), x.numel(), ws.data<float>(), stream);
    });
    if (wants_grad({x})) {
      auto fn = std::make_shared<Sum>();
      fn->in_shape_ = x.shape();
      record(fn, out, {x});
    }
    return out;
  }

  // ---- backward ----
  std::vector<Tensor> backward(const Tensor& grad_out) override {
    Tensor din = Tensor::empty(in_shape_, grad_out.dtype(), grad_out.device());
    dispatch("sum backward", grad_out, [&](auto tag) {
      using T = decltype(tag);
      cpu::sum_backward<T>(din.data<T>(), grad_out.data<T>(), din.numel());
    }, [&](auto stream) {
      cuda::sum_backward(din.data<float>(), grad_out.data<float>(), din.numel(), stream);
    });
    return {din};
  }

 protected:
  void release_saved() override {}

 private:
  Shape in_shape_;  // saved: only the input's shape
};

Tensor sum(const Tensor& x) { return Sum::apply(x); }

}  // namespace cnx
