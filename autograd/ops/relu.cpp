// relu: max(x, 0) (kernels/relu.h). Saves the OUTPUT (out > 0 exactly where x > 0), which the
// next layer keeps alive anyway; saving x instead would keep the previous layer's output too.
#include "autograd/checks.h"
#include "autograd/dispatch.h"
#include "autograd/function.h"
#include "autograd/ops.h"
#include "kernels/relu.h"

namespace cnx {

class Relu final : public Function {
 public:
  const char* name() const override { return "relu"; }

  // ---- forward ----
  static Tensor apply(const Tensor& x) {
    check::activation("relu", "x", x);
    Tensor out = Tensor::empty(x.shape(), x.dtype(), x.device());
    dispatch_with_bf16("relu", x, [&](auto tag) {
      using T = decltype(tag);
      cpu::relu_forward<T>(out.data<T>(), x.data<T>(), x.numel());
    }, [&](auto tag, auto stream) {
      using T = decltype(tag);
      cuda::relu_forward<T>(out.data<T>(), x.data<T>(), x.numel(), stream);
    });
    if (wants_grad({x})) {
      auto fn = std::make_shared<Relu>();
      fn->out_ = out.detach();
      record(fn, out, {x});
    }
    return out;
  }

  // ---- backward ----
  std::vector<Tensor> backward(const Tensor& grad_out) override {
    Tensor din = Tensor::empty(out_.shape(), out_.dtype(), out_.device());
    dispatch_with_bf16("relu backward", out_, [&](auto tag) {
      using T = decltype(tag);
      cpu::relu_backward<T>(din.data<T>(), grad_out.data<T>(), out_.data<T>(), out_.numel());
    }, [&](auto tag, auto stream) {
      using T = decltype(tag);
      cuda::relu_backward<T>(din.data<T>(), grad_out.data<T>(), out_.data<T>(), out_.numel(),
                             stream);
    });
    return {din};
  }

 protected:
  void release_saved() override { out_ = Tensor(); }

 private:
  Tensor out_;  // saved: the output, relu(x)
};

Tensor relu(const Tensor& x) { return Relu::apply(x); }

}  // namespace cnx
