// reshape: the same elements under another shape (a view: no copy).  din = dout reshaped back.
#include "autograd/checks.h"
#include "autograd/function.h"
#include "autograd/ops.h"

namespace cnx {

class Reshape final : public Function {
 public:
  const char* name() const override { return "reshape"; }

  // ---- forward ----
  static Tensor apply(const Tensor& x, const Shape& shape) {
    check::defined("reshape", "x", x);
    CNX_CHECK(shape.numel() == x.numel(), "reshape: cannot reshape x ", x.str(), " to ",
              shape.str(), " (", x.numel(), " vs ", shape.numel(), " elements)");
    Tensor out = x.view(shape);
    if (wants_grad({x})) {
      auto fn = std::make_shared<Reshape>();
      fn->in_shape_ = x.shape();
      record(fn, out, {x});
    }
    return out;
  }

  // ---- backward ----
  std::vector<Tensor> backward(const Tensor& grad_out) override { return {grad_out.view(in_shape_)}; }

 protected:
  void release_saved() override {}

 private:
  Shape in_shape_;  // saved: only the input's shape
};

Tensor reshape(const Tensor& x, const Shape& shape) { return Reshape::apply(x, shape); }

}  // namespace cnx
