// cast: the same values in another floating dtype (mixed precision: f32 <-> bf16).
//   out = x.to(dtype)                 (to bf16: rounded to nearest even; to f32: exact)
//   din = dout.to(x's dtype)          (the gradient comes back in the input's dtype)
// Nothing is saved but the input's dtype. A cast to the dtype x already has returns x itself.
#include "autograd/checks.h"
#include "autograd/function.h"
#include "autograd/ops.h"

namespace cnx {

class Cast final : public Function {
 public:
  const char* name() const override { return "cast"; }

  // ---- forward ----
  static Tensor apply(const Tensor& x, DType dtype) {
    check::activation("cast", "x", x);
    CNX_CHECK(dtype == DType::f32 || dtype == DType::f64 || dtype == DType::bf16,
              "cast: target dtype must be f32, f64 or bf16, got ", dtype_name(dtype));
    if (dtype == x.dtype()) return x;
    Tensor out = x.to(dtype);
    if (wants_grad({x})) {
      auto fn = std::make_shared<Cast>();
      fn->in_dtype_ = x.dtype();
      record(fn, out, {x});
    }
    return out;
  }

  // ---- backward ----
  std::vector<Tensor> backward(const Tensor& grad_out) override { return {grad_out.to(in_dtype_)}; }

 protected:
  void release_saved() override {}

 private:
  DType in_dtype_ = DType::f32;  // saved: the input's dtype
};

Tensor cast(const Tensor& x, DType dtype) { return Cast::apply(x, dtype); }

}  // namespace cnx
