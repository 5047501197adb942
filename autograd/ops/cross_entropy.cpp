// cross_entropy / soft_cross_entropy: softmax cross-entropy, mean over the batch
// (kernels/cross_entropy.h). Saves the softmax probabilities and the targets (labels or
// soft targets); the targets are constants and get no gradient.
#include "autograd/checks.h"
#include "autograd/dispatch.h"
#include "autograd/function.h"
#include "autograd/ops.h"
#include "kernels/cross_entropy.h"

namespace cnx {

class CrossEntropy final : public Function {
 public:
  const char* name() const override { return "cross_entropy"; }

  // ---- forward: exactly one of labels (N) i64 and targets (N, K) is defined ----
  static Tensor apply(const char* op, const Tensor& logits, const Tensor& labels,
                      const Tensor& targets, double smoothing) {
    check::floating(op, "logits", logits);
    check::rank(op, "logits", logits, 2);
    const int64_t N = logits.dim(0), K = logits.dim(1);
    CNX_CHECK(N > 0 && K > 0, op, ": logits ", logits.str(), " is empty");
    if (labels.defined()) {
      check::shape(op, "labels", labels, Shape{N}, "one per row of logits " + logits.str());
      CNX_CHECK(labels.dtype() == DType::i64, op, ": labels ", labels.str(), " must be i64");
      CNX_CHECK(labels.device() == logits.device(), op, ": labels ", labels.str(), " and logits ",
                logits.str(), " are on different devices");
      CNX_CHECK(smoothing >= 0 && smoothing < 1, op, ": label_smoothing must be in [0, 1), got ",
                smoothing);
    } else {
      check::same_kind(op, {"logits", logits}, {{"targets", targets}});
      check::shape(op, "targets", targets, logits.shape(), "the shape of logits");
    }
    Tensor loss = Tensor::empty(Shape{}, logits.dtype(), logits.device());
    Tensor probs = Tensor::empty(logits.shape(), logits.dtype(), logits.device());
    dispatch(op, logits, [&](auto tag) {
      using T = decltype(tag);
      cpu::cross_entropy_forward<T>(loss.data<T>(), probs.data<T>(), logits.data<T>(),
                                    ptr_or_null<int64_t>(labels), ptr_or_null<T>(targets), N, K,
                                    smoothing);
    }, [&](auto stream) {
      Tensor ws = cuda_workspace(cuda::cross_entropy_forward_workspace_floats(N, K), logits.device());
      cuda::cross_entropy_forward(loss.data<float>(), probs.data<float>(), logits.data<float>(),
                                  ptr_or_null<int64_t>(labels), ptr_or_null<float>(targets), N, K,
                                  smoothing, ws.data<float>(), stream);
    });
    if (wants_grad({logits})) {
      auto fn = std::make_shared<CrossEntropy>();
      fn->probs_ = probs;
      fn->labels_ = labels.defined() ? labels.detach() : Tensor();
      fn->targets_ = targets.defined() ? targets.detach() : Tensor();
      fn->smoothing_ = smoothing;
      record(fn, loss, {logits});
    }
    return loss;
  }

  // ---- backward ----
  std::vector<Tensor> backward(const Tensor& grad_out) override {
    Tensor dlogits = Tensor::empty(probs_.shape(), probs_.dtype(), probs_.device());
    dispatch("cross_entropy backward", probs_, [&](auto tag) {
      using T = decltype(tag);
      cpu::cross_entropy_backward<T>(dlogits.data<T>(), grad_out.data<T>(), probs_.data<T>(),
                                     ptr_or_null<int64_t>(labels_), ptr_or_null<T>(targets_),
                                     probs_.dim(0), probs_.dim(1), smoothing_);
    }, [&](auto stream) {
      cuda::cross_entropy_backward(dlogits.data<float>(), grad_out.data<float>(), probs_.data<float>(),
                                   ptr_or_null<int64_t>(labels_), ptr_or_null<float>(targets_),
                                   probs_.dim(0), probs_.dim(1), smoothing_, stream);
    });
    return {dlogits};
  }

 protected:
  void release_saved() override { probs_ = labels_ = targets_ = Tensor(); }

 private:
  Tensor probs_;            // saved: softmax(logits) (N, K)
  Tensor labels_, targets_;  // saved: the constant targets, one of them
  double smoothing_ = 0;
};

Tensor cross_entropy(const Tensor& logits, const Tensor& labels, double label_smoothing) {
  check::defined("cross_entropy", "labels", labels);
  return CrossEntropy::apply("cross_entropy", logits, labels, Tensor(), label_smoothing);
}

Tensor soft_cross_entropy(const Tensor& logits, const Tensor& targets) {
  check::defined("soft_cross_entropy", "targets", targets);
  return CrossEntropy::apply("soft_cross_entropy", logits, Tensor(), targets, 0.0);
}

}  // namespace cnx
