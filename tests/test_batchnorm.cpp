// batch_norm (autograd/ops/batch_norm.cpp, kernels/cpu/batchnorm.cpp) on the CPU, against
// computations written out here independently (long double loops over the channels-last
// layout, PyTorch's definitions: biased variance for the normalisation, unbiased for the
// running estimate, r = (1 - momentum) r + momentum s):
//  - the training and eval outputs and the running-stat update, f64 and f32, several shapes
//    (NHWC, batch 1 with H*W > 1, rank 2 (N, C)), eps and momentum respected (defaults too);
//  - gradients of x, weight and bias against central finite differences in double, in both
//    modes (training: through the batch statistics), NHWC and rank 2;
//  - f32 backward against f64, only the requested gradients, eval's saved statistics are
//    copies (a later in-place update of the running stats leaves the backward unchanged);
//  - bf16 activations: bitwise the f32 kernel between a widening and one rounding (fp32
//    statistics, running stats and parameter gradients exactly the f32 run's), and within
//    bf16 rounding of the f64 result;
//  - errors: count 1 per channel when training (PyTorch's message, naming the op and the
//    shape), C mismatches, dtypes, devices, undefined running statistics, rank 1.
#include <gtest/gtest.h>

#include <cmath>
#include <cstdint>
#include <string>
#include <vector>

#include "autograd/ops.h"
#include "kernels/batchnorm.h"
#include "tensor/generator.h"
#include "tensor/tensor.h"
#include "tests/testing.h"

using namespace cnx;
using namespace cnx::test;

namespace {

// ---- the independent reference ---------------------------------------------------------------

struct Ref {
  std::vector<double> out, mean, var_biased, var_unbiased;
};

// Statistics over the leading dims (M rows of C), long double, two passes.
Ref reference(const std::vector<double>& x, const std::vector<double>& w,
              const std::vector<double>& b, int64_t M, int64_t C, bool training,
              const std::vector<double>& rm, const std::vector<double>& rv, double eps) {
  Ref r;
  r.out.resize(x.size());
  r.mean.assign(C, 0);
  r.var_biased.assign(C, 0);
  r.var_unbiased.assign(C, 0);
  for (int64_t c = 0; c < C; ++c) {
    long double mu, var;
    if (training) {
      long double s = 0;
      for (int64_t i = 0; i < M; ++i) s += x[i * C + c];
      mu = s / M;
      long double q = 0;
      for (int64_t i = 0; i < M; ++i) q += (x[i * C + c] - mu) * (x[i * C + c] - mu);
      var = q / M;
      r.var_unbiased[c] = static_cast<double>(q / (M - 1));
    } else {
      mu = rm[c];
      var = rv[c];
    }
    r.mean[c] = static_cast<double>(mu);
    r.var_biased[c] = static_cast<double>(var);
    for (int64_t i = 0; i < M; ++i)
      r.out[i * C + c] = static_cast<double>(
          (x[i * C + c] - mu) / std::sqrt(var + static_cast<long double>(eps)) * w[c] + b[c]);
  }
  return r;
}

int64_t rows_of(const Shape& s) {
  int64_t m = 1;
  for (int i = 0; i + 1 < s.rank(); ++i) m *= s[i];
  return m;
}

// Forward in one mode and dtype against the reference: out, and the running stats after.
void check_forward(const Shape& xs, bool training, DType dt, double momentum, double eps,
                   uint64_t seed, double std = 1.0, double mean = 0.0) {
  const int64_t C = xs[-1], M = rows_of(xs);
  Generator gen(seed);
  const std::vector<double> x = randv(xs.numel(), gen, std, mean), w = randv(C, gen),
                            b = randv(C, gen), rm = randv(C, gen, 0.5),
                            rv = randv(C, gen, 0.3, 1.5);  // positive (1.5 +- 0.3)
  const Ref ref = reference(x, w, b, M, C, training, rm, rv, eps);
  Tensor trm = make({C}, rm, dt), trv = make({C}, rv, dt);
  const Tensor y = batch_norm(make(xs, x, dt), make({C}, w, dt), make({C}, b, dt), trm, trv,
                              training, momentum, eps);
  const std::string what = tag(std::string(training ? "train" : "eval") + " x", xs, dt);
  // f64: the reference's long double within a few ulps of the values; f32: rounding of the
  // inputs is exact (randv), so only f32 arithmetic: ~1e-6 of the output's scale (|xhat w| + |b|
  // ~ a few) is far above it and far below any error of a formula.
  const double tol = dt == DType::f64 ? 1e-12 : 2e-5;
  expect_close(what + " out", values(y), ref.out, tol, tol);
  std::vector<double> want_rm = rm, want_rv = rv;
  if (training)
    for (int64_t c = 0; c < C; ++c) {
      want_rm[c] = (1 - momentum) * rm[c] + momentum * ref.mean[c];
      want_rv[c] = (1 - momentum) * rv[c] + momentum * ref.var_unbiased[c];
    }
  const double stol = dt == DType::f64 ? 1e-14 : 1e-6;
  expect_close(what + " running_mean", values(trm), want_rm, stol * std::max(1.0, std::abs(mean)),
               stol);
  expect_close(what + " running_var", values(trv), want_rv, stol * std * std, stol);
}

// ---- forward ---------------------------------------------------------------------------------

TEST(BatchNorm, TrainingForwardAndRunningStatsMatchReference) {
  for (DType dt : {DType::f64, DType::f32}) {
    check_forward({2, 3, 5, 4}, true, dt, 0.1, 1e-5, 1);    // NHWC, odd sizes
    check_forward({1, 4, 3, 7}, true, dt, 0.1, 1e-5, 2);    // batch 1, H*W = 12 > 1
    check_forward({6, 5}, true, dt, 0.3, 1e-3, 3);          // rank 2 (N, C), other momentum, eps
    check_forward({2, 2}, true, dt, 1.0, 1e-5, 4);          // 2 values per channel, momentum 1
    check_forward({3, 1, 2, 3}, true, dt, 0.0, 1e-5, 5);    // momentum 0: no update
    check_forward({4, 3, 3, 2}, true, dt, 0.1, 1e-5, 6, 2.0, 5.0);  // nonzero mean, wider
  }
}

TEST(BatchNorm, EvalForwardUsesRunningStatsAndLeavesThem) {
  for (DType dt : {DType::f64, DType::f32}) {
    check_forward({2, 3, 5, 4}, false, dt, 0.1, 1e-5, 11);
    check_forward({1, 1, 1, 6}, false, dt, 0.1, 1e-5, 12);  // one value per channel: fine in eval
    check_forward({3, 5}, false, dt, 0.1, 1e-2, 13);
    check_forward({0, 2, 2, 3}, false, dt, 0.1, 1e-5, 14);  // empty batch
  }
}

// Hand computed: channel 0 = {1, 3}, channel 1 = {2, 6}, defaults (momentum 0.1, eps 1e-5).
TEST(BatchNorm, HandComputedDefaults) {
  Tensor rm = make({2}, {0, 10}, DType::f64), rv = make({2}, {1, 4}, DType::f64);
  const Tensor y = batch_norm(make({2, 2}, {1, 2, 3, 6}, DType::f64),
                              make({2}, {1, 2}, DType::f64), make({2}, {0, 1}, DType::f64), rm,
                              rv, true);
  // means 2, 4; biased variances 1, 4; unbiased 2, 8.
  const double a = 1 / std::sqrt(1 + 1e-5), b = 2 / std::sqrt(4 + 1e-5);
  expect_close("hand out", values(y), {-a, -2 * b + 1, a, 2 * b + 1}, 1e-15, 1e-14);
  expect_close("hand running_mean", values(rm), {0.9 * 0 + 0.1 * 2, 0.9 * 10 + 0.1 * 4}, 1e-15, 0);
  expect_close("hand running_var", values(rv), {0.9 * 1 + 0.1 * 2, 0.9 * 4 + 0.1 * 8}, 1e-15, 0);
  // eval with those running stats: (x - rm) / sqrt(rv + eps) w + b
  const Tensor e = batch_norm(make({1, 2}, {1, 2}, DType::f64), make({2}, {1, 2}, DType::f64),
                              make({2}, {0, 1}, DType::f64), rm, rv, false);
  expect_close("hand eval", values(e),
               {(1 - 0.2) / std::sqrt(1.1 + 1e-5), (2 - 9.4) / std::sqrt(4.4 + 1e-5) * 2 + 1},
               1e-15, 1e-14);
  expect_close("eval leaves running_mean", values(rm), {0.2, 9.4}, 1e-15, 0);
}

// ---- gradients -------------------------------------------------------------------------------

void check_gradients(const Shape& xs, bool training, uint64_t seed) {
  const int64_t C = xs[-1];
  Generator gen(seed);
  const Tensor x = leaf(xs, gen), w = leaf({C}, gen), b = leaf({C}, gen);
  Tensor rm = make({C}, randv(C, gen, 0.5), DType::f64);
  Tensor rv = make({C}, randv(C, gen, 0.2, 1.2), DType::f64);
  expect_gradients_match(
      tag(std::string(training ? "train" : "eval") + " x", xs, DType::f64),
      [&](const std::vector<Tensor>& in) {
        return batch_norm(in[0], in[1], in[2], rm, rv, training, 0.1, 1e-3);
      },
      {x, w, b});
}

TEST(BatchNorm, GradientsMatchFiniteDifferencesTraining) {
  check_gradients({2, 3, 2, 3}, true, 21);
  check_gradients({1, 2, 3, 2}, true, 22);  // batch 1
  check_gradients({5, 4}, true, 23);        // rank 2
  check_gradients({2, 1}, true, 24);        // two values, one channel
}

TEST(BatchNorm, GradientsMatchFiniteDifferencesEval) {
  check_gradients({2, 3, 2, 3}, false, 31);
  check_gradients({1, 1, 1, 4}, false, 32);  // one value per channel
  check_gradients({5, 4}, false, 33);
}

Op3 bn_op(bool training) {
  return [training](const Tensor& x, const Tensor& w, const Tensor& b) {
    const int64_t C = x.dim(-1);
    Tensor rm = Tensor::full(Shape{C}, 0.3, w.dtype()), rv = Tensor::full(Shape{C}, 0.7, w.dtype());
    return batch_norm(x, w, b, rm, rv, training);
  };
}

TEST(BatchNorm, F32BackwardMatchesF64) {
  check_f32_backward_matches_f64("batch_norm train", bn_op(true), {3, 4, 5, 6}, {6}, {6}, 41);
  check_f32_backward_matches_f64("batch_norm eval", bn_op(false), {3, 4, 5, 6}, {6}, {6}, 42);
  check_f32_backward_matches_f64("batch_norm train rank 2", bn_op(true), {7, 3}, {3}, {3}, 43);
}

TEST(BatchNorm, OnlyRequestedGradients) {
  for (bool training : {true, false}) {
    const Op3 op = bn_op(training);
    check_only_requested_gradients(
        training ? "batch_norm train" : "batch_norm eval",
        [&](const std::vector<Tensor>& in) { return op(in[0], in[1], in[2]); }, {2, 3, 2, 4},
        {4}, {4}, 51);
  }
}

// Eval saves invstd and mean as they were: updating the running stats in place between the
// forward and the backward (another training forward) must not change the gradients.
TEST(BatchNorm, EvalBackwardUsesTheForwardsStatistics) {
  Generator gen(61);
  const Shape xs{2, 2, 3, 3};
  Tensor x = leaf(xs, gen), w = leaf({3}, gen), b = leaf({3}, gen);
  const Tensor r = make(xs, randv(xs.numel(), gen), DType::f64);
  auto grads = [&](bool disturb) {
    Tensor rm = make({3}, {0.1, -0.2, 0.3}, DType::f64);
    Tensor rv = make({3}, {1.0, 2.0, 0.5}, DType::f64);
    x.set_grad(Tensor());
    w.set_grad(Tensor());
    const Tensor y = batch_norm(x, w, b, rm, rv, false);
    if (disturb) {
      const Tensor other = make(xs, randv(xs.numel(), gen, 3.0, 2.0), DType::f64);
      const Tensor ignored = batch_norm(other, w.detach(), b.detach(), rm, rv, true, 0.9);
      EXPECT_NE(values(rm), (std::vector<double>{0.1, -0.2, 0.3}));
    }
    sum(mul(y, r)).backward();
    return std::vector<std::vector<double>>{values(x.grad()), values(w.grad())};
  };
  const auto clean = grads(false), disturbed = grads(true);
  expect_close("dx after an update", disturbed[0], clean[0], 0, 0);
  expect_close("dweight after an update", disturbed[1], clean[1], 0, 0);
}

TEST(BatchNorm, RunningStatsAreNotRecorded) {
  Generator gen(71);
  const Tensor x = leaf({4, 3}, gen), w = leaf({3}, gen), b = leaf({3}, gen);
  Tensor rm = Tensor::zeros(Shape{3}, DType::f64), rv = Tensor::ones(Shape{3}, DType::f64);
  const Tensor y = batch_norm(x, w, b, rm, rv, true);
  EXPECT_TRUE(y.requires_grad());
  EXPECT_FALSE(rm.requires_grad());
  EXPECT_FALSE(rv.requires_grad());
  sum(y).backward();
  EXPECT_FALSE(rm.grad().defined());
  // Inputs that need no gradient: nothing recorded, and the running stats still update.
  const std::vector<double> before = values(rm);
  const Tensor z = batch_norm(x.detach(), w.detach(), b.detach(), rm, rv, true);
  EXPECT_FALSE(z.requires_grad());
  EXPECT_NE(values(rm), before);
}

// ---- bf16 ------------------------------------------------------------------------------------

std::vector<double> rounded_to_bf16(const std::vector<double>& v) {
  std::vector<double> r(v.size());
  for (size_t i = 0; i < v.size(); ++i) r[i] = static_cast<float>(bf16(static_cast<float>(v[i])));
  return r;
}

// The bf16 op is the f32 op on the widened x with out and dx rounded once (bitwise), its fp32
// statistics, running stats and parameter gradients exactly the f32 op's; and its out is within
// one bf16 rounding (2^-8 relative) plus the f32 error (1e-5 of the scale) of the f64 result.
TEST(BatchNorm, Bf16IsTheF32KernelRoundedOnce) {
  for (bool training : {true, false}) {
    const Shape xs{2, 3, 4, 5};
    const int64_t C = 5;
    Generator gen(training ? 81 : 82);
    const std::vector<double> x = rounded_to_bf16(randv(xs.numel(), gen, 1.5, 0.5)),
                              dy = rounded_to_bf16(randv(xs.numel(), gen)), w = randv(C, gen),
                              b = randv(C, gen), rm = randv(C, gen, 0.3),
                              rv = randv(C, gen, 0.2, 1.0);
    const std::vector<double> r = rounded_to_bf16(dy);  // dL/dy, exact in bf16
    struct Run {
      std::vector<double> y, dx, dw, db, rm, rv;
    };
    auto run = [&](DType dt) {
      Tensor rmt = make({C}, rm, DType::f32), rvt = make({C}, rv, DType::f32);
      Tensor xt = make(xs, x, dt), wt = make({C}, w, DType::f32), bt = make({C}, b, DType::f32);
      xt.set_requires_grad();
      wt.set_requires_grad();
      bt.set_requires_grad();
      const Tensor y = batch_norm(xt, wt, bt, rmt, rvt, training);
      EXPECT_EQ(y.dtype(), dt);
      sum(mul(cast(y, DType::f32), make(xs, r, DType::f32))).backward();
      EXPECT_EQ(xt.grad().dtype(), dt);
      EXPECT_EQ(wt.grad().dtype(), DType::f32);
      EXPECT_EQ(bt.grad().dtype(), DType::f32);
      return Run{values(y), values(xt.grad()), values(wt.grad()), values(bt.grad()),
                 values(rmt), values(rvt)};
    };
    const Run f = run(DType::f32), h = run(DType::bf16);
    const std::string what = training ? "bf16 train" : "bf16 eval";
    expect_close(what + " out == bf16(f32 out)", h.y, rounded_to_bf16(f.y), 0, 0);
    expect_close(what + " dx == bf16(f32 dx)", h.dx, rounded_to_bf16(f.dx), 0, 0);
    expect_close(what + " dweight", h.dw, f.dw, 0, 0);
    expect_close(what + " dbias", h.db, f.db, 0, 0);
    expect_close(what + " running_mean", h.rm, f.rm, 0, 0);
    expect_close(what + " running_var", h.rv, f.rv, 0, 0);
    // Against f64: one bf16 rounding (2^-8 relative) plus the f32 error (1e-5 of the scale of
    // the outputs, |xhat w| + |b| ~ a few), so a kernel that rounded an intermediate (the
    // statistics, xhat) to bf16 would fail.
    const Ref ref = reference(x, w, b, xs.numel() / C, C, training, rm, rv, 1e-5);
    expect_close(what + " out vs f64", h.y, ref.out, 1e-5, std::ldexp(1.0, -8));
  }
}

// ---- errors ----------------------------------------------------------------------------------

TEST(BatchNorm, OneValuePerChannelThrowsWhenTraining) {
  Tensor rm = Tensor::zeros(Shape{3}), rv = Tensor::ones(Shape{3});
  const Tensor w = Tensor::ones(Shape{3}), b = Tensor::zeros(Shape{3});
  expect_error([&] { batch_norm(Tensor::ones(Shape{1, 1, 1, 3}), w, b, rm, rv, true); },
               {"batch_norm", "Expected more than 1 value per channel when training",
                "f32[1, 1, 1, 3]"});
  expect_error([&] { batch_norm(Tensor::ones(Shape{1, 3}), w, b, rm, rv, true); },
               {"batch_norm", "Expected more than 1 value per channel when training", "f32[1, 3]"});
  expect_error([&] { batch_norm(Tensor::ones(Shape{0, 2, 2, 3}), w, b, rm, rv, true); },
               {"batch_norm", "Expected more than 1 value per channel when training"});
  // The failed calls changed nothing; eval with one value per channel is fine.
  EXPECT_EQ(values(rm), std::vector<double>(3, 0.0));
  EXPECT_NO_THROW(batch_norm(Tensor::ones(Shape{1, 3}), w, b, rm, rv, false));
}

TEST(BatchNorm, BadInputNamesOpAndShapes) {
  const Tensor x = Tensor::ones(Shape{2, 2, 2, 3});
  const Tensor w = Tensor::ones(Shape{3}), b = Tensor::zeros(Shape{3});
  Tensor rm = Tensor::zeros(Shape{3}), rv = Tensor::ones(Shape{3});
  expect_error([&] { batch_norm(x, Tensor::ones(Shape{4}), b, rm, rv, true); },
               {"batch_norm", "weight", "f32[4]", "f32[2, 2, 2, 3]"});
  expect_error([&] { batch_norm(x, w, Tensor::ones(Shape{2}), rm, rv, true); },
               {"batch_norm", "bias", "f32[2]"});
  expect_error([&] { batch_norm(x, w, b, Tensor::zeros(Shape{4}), rv, false); },
               {"batch_norm", "running_mean", "f32[4]"});
  expect_error([&] { batch_norm(x, w, b, rm, Tensor(), true); },
               {"batch_norm", "running_var", "undefined"});
  expect_error([&] { batch_norm(x, w, b, rm, Tensor::ones(Shape{3}, DType::f64), true); },
               {"batch_norm", "running_var", "f64[3]", "must be f32"});
  expect_error([&] { batch_norm(x.to(DType::bf16), w.to(DType::bf16), b, rm, rv, true); },
               {"batch_norm", "weight", "bf16[3]", "must be f32"});
  expect_error([&] { batch_norm(Tensor::ones(Shape{3}), w, b, rm, rv, false); },
               {"batch_norm", "x", "f32[3]", "rank 2 or more"});
  expect_error([&] { batch_norm(x, w, b, rm, rv, true, 0.1, 0.0); }, {"batch_norm", "eps"});
  expect_error([&] { batch_norm(x, w, b, rm, rv, true, 1.5); }, {"batch_norm", "momentum"});
  expect_error([&] { batch_norm(Tensor::ones(Shape{2, 3}, DType::i32), w, b, rm, rv, true); },
               {"batch_norm", "x"});
}

}  // namespace
