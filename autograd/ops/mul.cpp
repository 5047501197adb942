// mul: elementwise product.  out = a * b;  da = dout * b,  db = dout * a.  Saves a and b.
#include "autograd/checks.h"
#include "autograd/dispatch.h"
#include "autograd/function.h"
#include "autograd/ops.h"
#include "kernels/mul.h"

namespace cnx {

class Mul final : public Function {
 public:
  const char* name() const override { return "mul"; }

  // ---- forward ----
  static Tensor apply(const Tensor& a, const Tensor& b) {
    check::floating("mul", "a", a);
    check::defined("mul", "b", b);
    check::same_kind("mul", {"a", a}, {{"b", b}});
    CNX_CHECK(a.shape() == b.shape(), "mul: a ", a.str(), " and b ", b.str(), " differ in shape");
    Tensor out = Tensor::empty(a.shape(), a.dtype(), a.device());
    dispatch("mul", a, [&](auto tag) {
      using T = decltype(tag);
      cpu::mul_forward<T>(out.data<T>(), a.data<T>(), b.data<T>(), a.numel());
    }, [&](auto stream) {
      cuda::mul_forward(out.data<float>(), a.data<float>(), b.data<float>(), a.numel(), stream);
    });
    if (wants_grad({a, b})) {
      auto fn = std::make_shared<Mul>();
      // da needs b and db needs a: save only what a wanted gradient needs.
      if (b.requires_grad()) fn->a_ = a.detach();
      if (a.requires_grad()) fn->b_ = b.detach();
      record(fn, out, {a, b});
    }
    return out;
  }

  // ---- backward ----
  std::vector<Tensor> backward(const Tensor& grad_out) override {
    Tensor da, db;
    if (needs_input_grad(0)) da = Tensor::empty(grad_out.shape(), grad_out.dtype(), grad_out.device());
    if (needs_input_grad(1)) db = Tensor::empty(grad_out.shape(), grad_out.dtype(), grad_out.device());
    dispatch("mul backward", grad_out, [&](auto tag) {
      using T = decltype(tag);
      cpu::mul_backward<T>(ptr_or_null<T>(da), ptr_or_null<T>(db), grad_out.data<T>(),
                           ptr_or_null<T>(a_), ptr_or_null<T>(b_), grad_out.numel());
    }, [&](auto stream) {
      cuda::mul_backward(ptr_or_null<float>(da), ptr_or_null<float>(db), grad_out.data<float>(),
                         ptr_or_null<float>(a_), ptr_or_null<float>(b_), grad_out.numel(), stream);
    });
    return {da, db};
  }

 protected:
  void release_saved() override { a_ = b_ = Tensor(); }

 private:
  Tensor a_, b_;  // saved: the inputs (each only if the other one's gradient is wanted)
};

Tensor mul(const Tensor& a, const Tensor& b) { return Mul::apply(a, b); }

}  // namespace cnx
