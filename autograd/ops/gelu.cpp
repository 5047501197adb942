// gelu: exact erf GELU (kernels/gelu.h). Saves the input.
#include "autograd/checks.h"
#include "autograd/dispatch.h"
#include "autograd/function.h"
#include "autograd/ops.h"
#include "kernels/gelu.h"

namespace cnx {

class Gelu final : public Function {
 public:
  const char* name() const override { return "gelu"; }

  // ---- forward ----
  static Tensor apply(const Tensor& x) {
    check::activation("gelu", "x", x);
    Tensor out = Tensor::empty(x.shape(), x.dtype(), x.device());
    dispatch_with_bf16("gelu", x, [&](auto tag) {
      using T = decltype(tag);
      cpu::gelu_forward<T>(out.data<T>(), x.data<T>(), x.numel());
    }, [&](auto tag, auto stream) {
      using T = decltype(tag);
      cuda::gelu_forward<T>(out.data<T>(), x.data<T>(), x.numel(), stream);
    });
    if (wants_grad({x})) {
      auto fn = std::make_shared<Gelu>();
      fn->x_ = x.detach();
      record(fn, out, {x});
    }
    return out;
  }

  // ---- backward ----
  std::vector<Tensor> backward(const Tensor& grad_out) override {
    Tensor din = Tensor::empty(x_.shape(), x_.dtype(), x_.device());
    dispatch_with_bf16("gelu backward", x_, [&](auto tag) {
      using T = decltype(tag);
      cpu::gelu_backward<T>(din.data<T>(), grad_out.data<T>(), x_.data<T>(), x_.numel());
    }, [&](auto tag, auto stream) {
      using T = decltype(tag);
      cuda::gelu_backward<T>(din.data<T>(), grad_out.data<T>(), x_.data<T>(), x_.numel(), stream);
    });
    return {din};
  }

 protected:
  void release_saved() override { x_ = Tensor(); }

 private:
  Tensor x_;  // saved: the input
};

Tensor gelu(const Tensor& x) { return Gelu::apply(x); }

}  // namespace cnx
