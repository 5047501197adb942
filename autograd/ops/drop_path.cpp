// drop_path: per-sample stochastic depth (kernels/drop_path.h). Saves the (N) scale.
#include "autograd/checks.h"
#include "autograd/dispatch.h"
#include "autograd/function.h"
#include "autograd/ops.h"
#include "kernels/drop_path.h"

namespace cnx {

Tensor drop_path_scale(int64_t N, double drop_prob, Generator& gen, DType dtype, Device device) {
  CNX_CHECK(N >= 0, "drop_path: negative batch size ", N);
  CNX_CHECK(drop_prob >= 0 && drop_prob < 1, "drop_path: drop_prob must be in [0, 1), got ",
            drop_prob);
  Tensor scale = Tensor::empty(Shape{N}, dtype, Device::cpu());  // drawn on the host, always
  dispatch("drop_path", scale, [&](auto tag) {
    using T = decltype(tag);
    cpu::drop_path_scales<T>(scale.data<T>(), N, drop_prob, gen);
  }, [](auto) {});  // never taken: `scale` is on the host
  return scale.to(device);  // the same samples are dropped on every device
}

class DropPath final : public Function {
 public:
  const char* name() const override { return "drop_path"; }

  // ---- forward ----
  static Tensor apply(const Tensor& x, const Tensor& scale) {
    check::activation("drop_path", "x", x);
    check::min_rank("drop_path", "x", x, 1);
    check::defined("drop_path", "scale", scale);
    check::params("drop_path", {"x", x}, {{"scale", scale}});
    check::shape("drop_path", "scale", scale, Shape{x.dim(0)}, "one per sample of x " + x.str());
    const int64_t N = x.dim(0), per_sample = N ? x.numel() / N : 0;
    Tensor out = Tensor::empty(x.shape(), x.dtype(), x.device());
    dispatch_with_bf16("drop_path", x, [&](auto tag) {
      using T = decltype(tag);
      cpu::drop_path_forward<T>(out.data<T>(), x.data<T>(), scale.data<param_t<T>>(), N,
                                per_sample);
    }, [&](auto tag, auto stream) {
      using T = decltype(tag);
      cuda::drop_path_forward<T>(out.data<T>(), x.data<T>(), scale.data<float>(), N, per_sample,
                                 stream);
    });
    if (wants_grad({x})) {  // scale is a constant: it gets no gradient
      auto fn = std::make_shared<DropPath>();
      fn->scale_ = scale.detach();
      record(fn, out, {x});
    }
    return out;
  }

  // ---- backward ----
  std::vector<Tensor> backward(const Tensor& grad_out) override {
    Tensor dx = Tensor::empty(grad_out.shape(), grad_out.dtype(), grad_out.device());
    const int64_t N = grad_out.dim(0), per_sample = N ? grad_out.numel() / N : 0;
    dispatch_with_bf16("drop_path backward", grad_out, [&](auto tag) {
      using T = decltype(tag);
      cpu::drop_path_backward<T>(dx.data<T>(), grad_out.data<T>(), scale_.data<param_t<T>>(), N,
                                 per_sample);
    }, [&](auto tag, auto stream) {
      using T = decltype(tag);
      cuda::drop_path_backward<T>(dx.data<T>(), grad_out.data<T>(), scale_.data<float>(), N,
                                  per_sample, stream);
    });
    return {dx};
  }

 protected:
  void release_saved() override { scale_ = Tensor(); }

 private:
  Tensor scale_;  // saved: (N) per-sample multipliers
};

Tensor drop_path(const Tensor& x, const Tensor& scale) { return DropPath::apply(x, scale); }

Tensor drop_path(const Tensor& x, double drop_prob, bool training, Generator& gen) {
  CNX_CHECK(drop_prob >= 0 && drop_prob < 1, "drop_path: drop_prob must be in [0, 1), got ",
            drop_prob);
  if (!training || drop_prob == 0.0) return x;
  check::min_rank("drop_path", "x", x, 1);
  return DropPath::apply(
      x, drop_path_scale(x.dim(0), drop_prob, gen, param_dtype(x.dtype()), x.device()));
}

}  // namespace cnx
