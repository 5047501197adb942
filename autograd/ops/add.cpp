// add: the residual connection.  out = a + b;  da = dout, db = dout.
#include "autograd/checks.h"
#include "autograd/dispatch.h"
#include "autograd/function.h"
#include "autograd/ops.h"
#include "kernels/add.h"

namespace cnx {

namespace {
void check_same(const char* op, const Tensor& a, const char* an, const Tensor& b, const char* bn) {
  check::activation(op, an, a);
  check::defined(op, bn, b);
  check::same_kind(op, {an, a}, {{bn, b}});
  CNX_CHECK(a.shape() == b.shape(), op, ": ", an, " ", a.str(), " and ", bn, " ", b.str(),
            " differ in shape");
}
}  // namespace

class Add final : public Function {
 public:
  const char* name() const override { return "add"; }

  // ---- forward ----
  static Tensor apply(const Tensor& a, const Tensor& b) {
    check_same("add", a, "a", b, "b");
    Tensor out = Tensor::empty(a.shape(), a.dtype(), a.device());
    dispatch_with_bf16("add", a, [&](auto tag) {
      using T = decltype(tag);
      cpu::add_forward<T>(out.data<T>(), a.data<T>(), b.data<T>(), a.numel());
    }, [&](auto tag, auto stream) {
      using T = decltype(tag);
      cuda::add_forward<T>(out.data<T>(), a.data<T>(), b.data<T>(), a.numel(), stream);
    });
    if (wants_grad({a, b})) record(std::make_shared<Add>(), out, {a, b});
    return out;
  }

  // ---- backward: the gradient passes through unchanged to both inputs ----
  std::vector<Tensor> backward(const Tensor& grad_out) override {
    return {needs_input_grad(0) ? grad_out : Tensor(), needs_input_grad(1) ? grad_out : Tensor()};
  }

 protected:
  void release_saved() override {}  // saves nothing
};

Tensor add(const Tensor& a, const Tensor& b) { return Add::apply(a, b); }

void add_(Tensor& dst, const Tensor& src) {
  check_same("add_", dst, "dst", src, "src");
  dispatch_with_bf16("add_", dst, [&](auto tag) {
    using T = decltype(tag);
    cpu::add_inplace<T>(dst.data<T>(), src.data<T>(), dst.numel());
  }, [&](auto tag, auto stream) {
    using T = decltype(tag);
    cuda::add_inplace<T>(dst.data<T>(), src.data<T>(), dst.numel(), stream);
  });
}

}  // namespace cnx
