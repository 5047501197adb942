// max_pool2d: k x k window, stride, padding over x (N, H, W, C) -> (N, Ho, Wo, C)
// (kernels/maxpool.h). Saves the argmax of each output (int32, the cell's index within its
// window, (h - h0) k + (w - w0)) and x's shape; not x itself.
// Mixed precision: bf16 in, bf16 out; the gradient is summed in fp32 and rounded once.
#include <cstdint>

#include "autograd/checks.h"
#include "autograd/dispatch.h"
#include "autograd/function.h"
#include "autograd/ops.h"
#include "kernels/maxpool.h"

namespace cnx {

class MaxPool2d final : public Function {
 public:
  const char* name() const override { return "max_pool2d"; }

  // ---- forward ----
  static Tensor apply(const Tensor& x, int64_t k, int64_t stride, int64_t padding) {
    const char* op = "max_pool2d";
    check::activation(op, "x", x);
    check::rank(op, "x", x, 4);
    const int64_t N = x.dim(0), H = x.dim(1), W = x.dim(2), C = x.dim(3);
    CNX_CHECK(k >= 1, op, ": kernel size ", k, " must be >= 1 (x ", x.str(), ")");
    CNX_CHECK(k <= 46340, op, ": kernel size ", k,
              " is too large (the argmax within a k x k window is an int32)");
    CNX_CHECK(stride >= 1, op, ": stride ", stride, " must be >= 1 (x ", x.str(), ")");
    // The CUDA gather works out the windows of an input cell in 32-bit arithmetic.
    constexpr int64_t kTwoTo31 = int64_t{1} << 31;
    CNX_CHECK(stride < kTwoTo31, op, ": stride ", stride, " must be below 2^31");
    CNX_CHECK(padding >= 0 && padding <= k / 2, op, ": padding ", padding,
              " must be between 0 and half the kernel size ", k, " (", k / 2, ")");
    CNX_CHECK(H >= 1 && W >= 1 && H + 2 * padding >= k && W + 2 * padding >= k, op, ": x ",
              x.str(), " is too small for kernel ", k, " with padding ", padding,
              ": the output would be empty");
    CNX_CHECK(H + 2 * padding < kTwoTo31 && W + 2 * padding < kTwoTo31, op, ": x ", x.str(),
              " is too large: H + 2 padding and W + 2 padding must be below 2^31");
    const int64_t Ho = maxpool2d_out_size(H, k, stride, padding);
    const int64_t Wo = maxpool2d_out_size(W, k, stride, padding);
    Tensor out = Tensor::empty(Shape{N, Ho, Wo, C}, x.dtype(), x.device());
    const bool grad = wants_grad({x});
    Tensor argmax;
    if (grad) argmax = Tensor::empty(Shape{N, Ho, Wo, C}, DType::i32, x.device());
    dispatch_with_bf16(op, x, [&](auto tag) {
      using T = decltype(tag);
      cpu::maxpool2d_forward<T>(out.data<T>(), ptr_or_null<int32_t>(argmax), x.data<T>(), N, H,
                                W, C, k, stride, padding);
    }, [&](auto tag, auto stream) {
      using T = decltype(tag);
      cuda::maxpool2d_forward<T>(out.data<T>(), ptr_or_null<int32_t>(argmax), x.data<T>(), N, H,
                                 W, C, k, stride, padding, stream);
    });
    if (grad) {
      auto fn = std::make_shared<MaxPool2d>();
      fn->argmax_ = argmax;
      fn->x_shape_ = x.shape();
      fn->k_ = k;
      fn->stride_ = stride;
      fn->padding_ = padding;
      record(fn, out, {x});
    }
    return out;
  }

  // ---- backward ----
  std::vector<Tensor> backward(const Tensor& grad_out) override {
    const int64_t N = x_shape_[0], H = x_shape_[1], W = x_shape_[2], C = x_shape_[3];
    Tensor dx = Tensor::empty(x_shape_, grad_out.dtype(), grad_out.device());
    dispatch_with_bf16("max_pool2d backward", grad_out, [&](auto tag) {
      using T = decltype(tag);
      cpu::maxpool2d_backward<T>(dx.data<T>(), grad_out.data<T>(), argmax_.data<int32_t>(), N, H,
                                 W, C, k_, stride_, padding_);
    }, [&](auto tag, auto stream) {
      using T = decltype(tag);
      cuda::maxpool2d_backward<T>(dx.data<T>(), grad_out.data<T>(), argmax_.data<int32_t>(), N,
                                  H, W, C, k_, stride_, padding_, stream);
    });
    return {dx};
  }

 protected:
  void release_saved() override { argmax_ = Tensor(); }

 private:
  Tensor argmax_;  // saved: (N, Ho, Wo, C) int32, each output's cell within its window
  Shape x_shape_;  // (N, H, W, C)
  int64_t k_ = 0, stride_ = 0, padding_ = 0;
};

Tensor max_pool2d(const Tensor& x, int64_t kernel, int64_t stride, int64_t padding) {
  return MaxPool2d::apply(x, kernel, stride, padding);
}

}  // namespace cnx
