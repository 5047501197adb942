// global_avg_pool: (N, H, W, C) -> (N, C), the mean over H and W (kernels/avgpool.h).
// Saves only the input's sizes.
#include "autograd/checks.h"
#include "autograd/dispatch.h"
#include "autograd/function.h"
#include "autograd/ops.h"
#include "kernels/avgpool.h"

namespace cnx {

class GlobalAvgPool final : public Function {
 public:
  const char* name() const override { return "global_avg_pool"; }

  // ---- forward ----
  static Tensor apply(const Tensor& x) {
    check::floating("global_avg_pool", "x", x);
    check::rank("global_avg_pool", "x", x, 4);
    const int64_t N = x.dim(0), H = x.dim(1), W = x.dim(2), C = x.dim(3);
    CNX_CHECK(H > 0 && W > 0, "global_avg_pool: x ", x.str(), " has an empty image");
    Tensor out = Tensor::empty(Shape{N, C}, x.dtype(), x.device());
    dispatch("global_avg_pool", x, [&](auto tag) {
      using T = decltype(tag);
      cpu::global_avgpool_forward<T>(out.data<T>(), x.data<T>(), N, H, W, C);
    }, [&](auto stream) {
      cuda::global_avgpool_forward(out.data<float>(), x.data<float>(), N, H, W, C, stream);
    });
    if (wants_grad({x})) {
      auto fn = std::make_shared<GlobalAvgPool>();
      fn->in_shape_ = x.shape();
      record(fn, out, {x});
    }
    return out;
  }

  // ---- backward ----
  std::vector<Tensor> backward(const Tensor& grad_out) override {
    Tensor dx = Tensor::empty(in_shape_, grad_out.dtype(), grad_out.device());
    dispatch("global_avg_pool backward", grad_out, [&](auto tag) {
      using T = decltype(tag);
      cpu::global_avgpool_backward<T>(dx.data<T>(), grad_out.data<T>(), in_shape_[0],
                                      in_shape_[1], in_shape_[2], in_shape_[3]);
    }, [&](auto stream) {
      cuda::global_avgpool_backward(dx.data<float>(), grad_out.data<float>(), in_shape_[0],
                                    in_shape_[1], in_shape_[2], in_shape_[3], stream);
    });
    return {dx};
  }

 protected:
  void release_saved() override {}

 private:
  Shape in_shape_;  // saved: (N, H, W, C)
};

Tensor global_avg_pool(const Tensor& x) { return GlobalAvgPool::apply(x); }

}  // namespace cnx
