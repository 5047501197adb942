// The autograd engine: shared inputs, the residual, accumulation, no-grad, freeing the graph.
#include <gtest/gtest.h>

#include <cmath>
#include <numbers>

#include "autograd/function.h"
#include "autograd/ops.h"
#include "tests/testing.h"

using namespace cnx;
using cnx::test::expect_close;
using cnx::test::expect_error;
using cnx::test::from_doubles;
using cnx::test::values;

TEST(Autograd, LeafGradientOfSum) {
  auto x = from_doubles({2, 3}, {1, 2, 3, 4, 5, 6}).set_requires_grad(true);
  sum(x).backward();
  EXPECT_EQ(values(x.grad()), std::vector<double>(6, 1.0));
}

TEST(Autograd, SharedInputGradientsAdd) {
  // y = sum(x * x): x feeds both inputs of mul, so dy/dx = 2x.
  auto x = from_doubles({4}, {1, -2, 3, 0.5}).set_requires_grad(true);
  sum(mul(x, x)).backward();
  EXPECT_EQ(values(x.grad()), (std::vector<double>{2, -4, 6, 1}));
}

TEST(Autograd, ResidualBranchAndSkipBothContribute) {
  // y = sum(x + gelu(x)) as in a block: dy/dx = 1 + gelu'(x).
  const std::vector<double> xs{-1.5, -0.2, 0.0, 0.7, 2.0};
  auto x = from_doubles({5}, xs).set_requires_grad(true);
  sum(add(x, gelu(x))).backward();
  std::vector<double> want;
  for (double v : xs) {
    const double cdf = 0.5 * (1 + std::erf(v / std::sqrt(2.0)));
    const double pdf = std::exp(-0.5 * v * v) / std::sqrt(2 * std::numbers::pi);
    want.push_back(1 + cdf + v * pdf);
  }
  expect_close("residual", values(x.grad()), want, 1e-14, 1e-14);
}

TEST(Autograd, IntermediateUsedTwiceInDiamond) {
  // h = gelu(x); y = sum(h * h + h): the engine must sum both consumers of h before going on.
  const std::vector<double> xs{0.3, -0.8, 1.1};
  auto x = from_doubles({3}, xs).set_requires_grad(true);
  auto h = gelu(x);
  sum(add(mul(h, h), h)).backward();
  std::vector<double> want;
  for (double v : xs) {
    const double cdf = 0.5 * (1 + std::erf(v / std::sqrt(2.0)));
    const double pdf = std::exp(-0.5 * v * v) / std::sqrt(2 * std::numbers::pi);
    const double hv = v * cdf, dh = cdf + v * pdf;
    want.push_back((2 * hv + 1) * dh);
  }
  expect_close("diamond", values(x.grad()), want, 1e-14, 1e-14);
}

TEST(Autograd, GradientsAccumulateAcrossBackwardCalls) {
  auto w = from_doubles({3}, {1, 2, 3}).set_requires_grad(true);
  auto x = from_doubles({3}, {4, 5, 6});
  sum(mul(w, x)).backward();
  sum(mul(w, x)).backward();  // a new graph: parameter gradients add up (+=)
  EXPECT_EQ(values(w.grad()), (std::vector<double>{8, 10, 12}));
  w.set_grad({});
  EXPECT_FALSE(w.grad().defined());
}

TEST(Autograd, InputsWithoutRequiresGradGetNoGradient) {
  auto w = from_doubles({2}, {1, 2}).set_requires_grad(true);
  auto x = from_doubles({2}, {3, 4});
  auto y = mul(w, x);
  EXPECT_TRUE(y.requires_grad());
  EXPECT_FALSE(y.is_leaf());
  EXPECT_STREQ(y.grad_fn()->name(), "mul");
  EXPECT_TRUE(y.grad_fn()->needs_input_grad(0));
  EXPECT_FALSE(y.grad_fn()->needs_input_grad(1));
  sum(y).backward();
  EXPECT_EQ(values(w.grad()), (std::vector<double>{3, 4}));
  EXPECT_FALSE(x.grad().defined());
}

TEST(Autograd, NoGradScopeRecordsNothing) {
  auto w = from_doubles({2}, {1, 2}).set_requires_grad(true);
  {
    NoGradGuard guard;
    EXPECT_FALSE(grad_enabled());
    auto y = sum(mul(w, w));
    EXPECT_FALSE(y.requires_grad());
    EXPECT_EQ(y.grad_fn(), nullptr);
    expect_error([&] { y.backward(); }, {"backward", "does not require grad"});
  }
  EXPECT_TRUE(grad_enabled());  // restored
  EXPECT_TRUE(sum(mul(w, w)).requires_grad());
}

TEST(Autograd, GraphIsFreedAfterBackward) {
  auto x = from_doubles({3}, {1, 2, 3}).set_requires_grad(true);
  auto h = gelu(x);
  auto loss = sum(mul(h, h));
  std::weak_ptr<Function> gelu_fn = h.grad_fn();
  ASSERT_FALSE(gelu_fn.expired());
  loss.backward();
  EXPECT_TRUE(loss.grad_fn()->released());
  EXPECT_TRUE(h.grad_fn()->released());
  EXPECT_TRUE(loss.grad_fn()->edges().empty());  // edges dropped: nothing upstream is kept
  expect_error([&] { loss.backward(); }, {"backward", "freed", "run the forward again"});
  // The saved input of gelu (a view of x) is gone: x's storage is held only by x again.
  EXPECT_EQ(x.impl_ptr().use_count(), 1);
  h = Tensor();
  loss = Tensor();
  EXPECT_TRUE(gelu_fn.expired());  // the whole tape is gone once the outputs are dropped
}

TEST(Autograd, BackwardNeedsOneElement) {
  auto x = from_doubles({2}, {1, 2}).set_requires_grad(true);
  expect_error([&] { gelu(x).backward(); }, {"backward", "one-element", "f64[2] cpu"});
}

TEST(Autograd, BackwardOfALeafSeedsItsGradient) {
  auto x = from_doubles({}, {3}).set_requires_grad(true);
  x.backward();
  EXPECT_EQ(values(x.grad()), std::vector<double>{1});
}

TEST(Autograd, DetachCutsTheGraph) {
  auto x = from_doubles({2}, {1, 2}).set_requires_grad(true);
  auto d = gelu(x).detach();
  EXPECT_FALSE(d.requires_grad());
  EXPECT_EQ(d.grad_fn(), nullptr);
}

TEST(Autograd, DeepChainDoesNotOverflowTheStack) {
  // 20000 ops in a row: the topological sort is iterative.
  auto x = from_doubles({1}, {0.5}).set_requires_grad(true);
  Tensor h = x;
  for (int i = 0; i < 20000; ++i) h = add(h, x);
  sum(h).backward();
  EXPECT_EQ(values(x.grad()), std::vector<double>{20001});
}

TEST(Autograd, DroppingADeepUnusedGraphDoesNotOverflowTheStack) {
  auto x = from_doubles({1}, {0.5}).set_requires_grad(true);
  Tensor h = x;
  for (int i = 0; i < 100000; ++i) h = gelu(h);
  std::weak_ptr<Function> last = h.grad_fn();
  h = Tensor();  // no backward: the whole chain is destroyed here
  EXPECT_TRUE(last.expired());
}

TEST(Autograd, LeafGradIsNotAliasedWithUpstreamBuffers) {
  // add passes its incoming gradient through unchanged; the leaf must still own its .grad,
  // so accumulating a later backward into it cannot change what another leaf received.
  auto a = from_doubles({2}, {1, 2}).set_requires_grad(true);
  auto b = from_doubles({2}, {3, 4}).set_requires_grad(true);
  sum(add(a, b)).backward();
  sum(add(a, a)).backward();  // a.grad += 2
  EXPECT_EQ(values(a.grad()), (std::vector<double>{3, 3}));
  EXPECT_EQ(values(b.grad()), (std::vector<double>{1, 1}));
}

// ---- the leaves' .grad: taken when fresh, copied when shared ------------------------------------
// The engine makes a leaf's first gradient its .grad without a copy when nothing else holds that
// memory, and copies it otherwise (autograd/engine.cpp, sole_owner). Later contributions, later
// backward calls and the optimiser's clipping write .grad in place, so a .grad that shared memory
// with another leaf's .grad, or with a gradient still on its way to another op, would change
// that one too. The tests below build each way a gradient can be shared and check the values;
// the first one checks, by address, which gradients are taken and which are copied.

namespace {

// y = x, with a backward that hands the gradient on in the way `how` says and notes the address
// of the memory it handed on.
class Probe : public Function {
 public:
  enum class How {
    kFresh,        // a new tensor nobody else holds: taken
    kPassThrough,  // grad_out itself, which the engine still holds: copied
    kView,         // a view of grad_out (shares its storage): copied
    kSaved,        // a tensor the op also keeps: copied
  };
  Probe(How how, const void** where) : how_(how), where_(where) {}
  const char* name() const override { return "probe"; }
  static Tensor apply(const Tensor& x, How how, const void** where) {
    Tensor y = x.detach().clone();
    if (wants_grad({x})) record(std::make_shared<Probe>(how, where), y, {x});
    return y;
  }
  std::vector<Tensor> backward(const Tensor& grad_out) override {
    Tensor g;
    switch (how_) {
      case How::kFresh: g = grad_out.clone(); break;
      case How::kPassThrough: g = grad_out; break;
      case How::kView: g = grad_out.view(grad_out.shape()); break;
      case How::kSaved: kept_ = grad_out.clone(); g = kept_; break;
    }
    *where_ = g.raw_data();
    return {g};
  }

 protected:
  void release_saved() override { kept_ = Tensor(); }

 private:
  How how_;
  const void** where_;
  Tensor kept_;
};

}  // namespace

TEST(Autograd, AFreshLeafGradientIsTakenAndASharedOneCopied) {
  using How = Probe::How;
  for (How how : {How::kFresh, How::kPassThrough, How::kView, How::kSaved}) {
    SCOPED_TRACE(static_cast<int>(how));
    auto w = from_doubles({3}, {1, 2, 3}).set_requires_grad(true);
    const void* handed_on = nullptr;
    sum(mul(Probe::apply(w, how, &handed_on), from_doubles({3}, {4, 5, 6}))).backward();
    EXPECT_EQ(values(w.grad()), (std::vector<double>{4, 5, 6}));
    if (how == How::kFresh) EXPECT_EQ(w.grad().raw_data(), handed_on) << "a fresh gradient was copied";
    else EXPECT_NE(w.grad().raw_data(), handed_on) << "a shared gradient became .grad";
  }
}

TEST(Autograd, ALeafGradientSharedWithAGradientStillOnItsWayIsCopied) {
  // add(f(w), x) hands its grad_out H to f(w) and, unchanged, to x = mul(v, c), whose backward
  // runs later; w gets a second gradient from mul(f(w), d) in between. Were H (f = identity) or
  // a view of it (f = reshape) w's .grad, that gradient's += would change H before x's backward
  // reads it, and v's gradient with it.
  //   loss = sum(x) + (sum(mul(f(w), d)) + sum(add(f(w), x)))
  // The engine's depth-first order reaches x first through sum(x), so it runs x's backward last,
  // after add and mul.
  for (bool through_reshape : {false, true}) {
    SCOPED_TRACE(through_reshape ? "f = reshape" : "f = identity");
    const Shape shape = through_reshape ? Shape{1, 2} : Shape{2};
    auto w = from_doubles(shape, {1, 2}).set_requires_grad(true);
    auto f = [&] { return through_reshape ? reshape(w, {2}) : w; };
    auto v = from_doubles({2}, {3, 4}).set_requires_grad(true);
    const auto c = from_doubles({2}, {5, 7}), d = from_doubles({2}, {10, 100});
    const Tensor x = mul(v, c);
    add(sum(x), add(sum(mul(f(), d)), sum(add(f(), x)))).backward();
    EXPECT_EQ(values(w.grad()), (std::vector<double>{11, 101}));  // d + 1
    EXPECT_EQ(values(v.grad()), (std::vector<double>{10, 14}));   // 2c
  }
}

TEST(Autograd, LeavesThatGetTheSameGradientGetTheirOwnCopies) {
  // add(a, b) gives a and b one tensor; a reshape passes a view of its grad_out. Each leaf's
  // .grad is then written in place, as the optimiser's clipping does: the others must not move.
  auto a = from_doubles({2}, {1, 2}).set_requires_grad(true);
  auto b = from_doubles({2}, {3, 4}).set_requires_grad(true);
  auto r = from_doubles({1, 2}, {5, 6}).set_requires_grad(true);
  sum(mul(add(add(a, b), reshape(r, {2})), from_doubles({2}, {2, 3}))).backward();
  Tensor ga = a.grad();
  Tensor gr = r.grad();
  add_(ga, from_doubles({2}, {100, 100}));
  add_(gr, from_doubles({1, 2}, {1000, 1000}));
  EXPECT_EQ(values(a.grad()), (std::vector<double>{102, 103}));
  EXPECT_EQ(values(b.grad()), (std::vector<double>{2, 3}));
  EXPECT_EQ(values(r.grad()), (std::vector<double>{1002, 1003}));
}

TEST(Autograd, FreshGradientsAccumulateOverMicroBatchesAsUpdateFreqDoes) {
  // The trainer's update_freq: each micro-batch's loss times 1/update_freq, backward after each,
  // the parameters' gradients summed in .grad (the first one taken, the others added in place).
  // w is used twice in each loss, so the second gradient of each backward is added too.
  auto w = from_doubles({3}, {1, 2, 3}).set_requires_grad(true);
  const auto half = from_doubles({}, {0.5});
  const std::vector<Tensor> xs = {from_doubles({3}, {1, 1, 1}), from_doubles({3}, {2, 4, 8})};
  Tensor first_grad;
  for (const Tensor& x : xs) {
    mul(add(sum(mul(w, x)), sum(mul(w, w))), half).backward();  // d/dw = (x + 2w) / 2
    if (!first_grad.defined()) first_grad = w.grad();  // a handle, as a caller may keep
  }
  // (x1 + 2w) / 2 + (x2 + 2w) / 2 = (x1 + x2 + 4w) / 2.
  EXPECT_EQ(values(w.grad()), (std::vector<double>{3.5, 6.5, 10.5}));
  EXPECT_EQ(first_grad.raw_data(), w.grad().raw_data());  // accumulated in place, as before
}

TEST(Autograd, GradcheckThroughAComposedBlock) {
  // A miniature ConvNeXt block on a 1x3x5x4 input: dwconv -> LN -> linear -> GELU -> linear ->
  // layer scale -> + residual, checked end to end against finite differences.
  Generator g(11);
  auto x = Tensor::randn({1, 3, 5, 4}, g, DType::f64).set_requires_grad(true);
  auto dw_w = Tensor::randn({3, 3, 4}, g, DType::f64, Device::cpu(), 0, 0.5).set_requires_grad(true);
  auto dw_b = Tensor::randn({4}, g, DType::f64).set_requires_grad(true);
  auto ln_w = Tensor::randn({4}, g, DType::f64, Device::cpu(), 1, 0.2).set_requires_grad(true);
  auto ln_b = Tensor::randn({4}, g, DType::f64, Device::cpu(), 0, 0.2).set_requires_grad(true);
  auto w1 = Tensor::randn({8, 4}, g, DType::f64, Device::cpu(), 0, 0.5).set_requires_grad(true);
  auto b1 = Tensor::randn({8}, g, DType::f64).set_requires_grad(true);
  auto w2 = Tensor::randn({4, 8}, g, DType::f64, Device::cpu(), 0, 0.5).set_requires_grad(true);
  auto b2 = Tensor::randn({4}, g, DType::f64).set_requires_grad(true);
  auto gamma = Tensor::randn({4}, g, DType::f64, Device::cpu(), 1, 0.2).set_requires_grad(true);
  auto block = [](const std::vector<Tensor>& p) {
    Tensor h = dwconv(p[0], p[1], p[2]);
    h = layer_norm(h, p[3], p[4], 1e-6);
    h = gelu(linear(h, p[5], p[6]));
    h = layer_scale(linear(h, p[7], p[8]), p[9]);
    return add(p[0], h);
  };
  cnx::test::expect_gradients_match("block", block, {x, dw_w, dw_b, ln_w, ln_b, w1, b1, w2, b2, gamma});
}
