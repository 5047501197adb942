// Elementwise ops and small reshapes of autograd/ops.h: gelu, layer_scale, drop_path (and
// drop_path_scale), add, mul, sum, reshape.
//
// Every forward is compared with an independent reference: literal values computed outside
// this code base (Python's math.erf) or a plain loop in double written here. Every
// differentiable input is checked against central finite differences in double
// (tests/testing.h), on tiny shapes with odd sizes and batch 1. Bad arguments must throw
// cnx::Error naming the op and the offending shape or value.
#include <gtest/gtest.h>

#include <cmath>
#include <cstdint>
#include <numbers>
#include <string>
#include <vector>

#include "autograd/function.h"
#include "autograd/ops.h"
#include "tests/testing.h"

using namespace cnx;
using namespace cnx::test;

namespace {

// One shape of each rank 1..5, odd sizes and size-1 dimensions (batch 1 included).
const std::vector<Shape> kShapesRank1To5 = {{7}, {3, 5}, {1, 3, 5}, {2, 3, 1, 5}, {1, 2, 3, 1, 3}};
// Tiny shapes for the finite-difference checks (each element costs two forward passes).
const std::vector<Shape> kGradShapes = {{1}, {7}, {1, 3, 5}, {2, 1, 3, 1, 3}};
const DType kFloatTypes[] = {DType::f32, DType::f64};

// Forward tolerances against a double reference for results that are one or two correctly
// rounded operations on the (already rounded) inputs: f32 ulp is 6e-8 relative.
double atol_for(DType dt) { return dt == DType::f64 ? 1e-14 : 1e-7; }
double rtol_for(DType dt) { return dt == DType::f64 ? 1e-13 : 1e-6; }

double gelu_erf(double x) { return 0.5 * x * (1.0 + std::erf(x / std::numbers::sqrt2)); }
double gelu_tanh(double x) {
  const double k = std::sqrt(2.0 / std::numbers::pi);
  return 0.5 * x * (1.0 + std::tanh(k * (x + 0.044715 * x * x * x)));
}
double gelu_grad(double x) {
  return 0.5 * (1.0 + std::erf(x / std::numbers::sqrt2)) +
         x * std::exp(-0.5 * x * x) / std::sqrt(2.0 * std::numbers::pi);
}

// GELU of f32 values: 1 + erf(x/sqrt2) cancels for negative x, so the absolute error is about
// ulp(1) * |x| / 2 rather than relative to the (tiny) result; 1e-6 covers |x| <= 8.
constexpr double kGeluF32Atol = 1e-6;

}  // namespace

// =============================================================================================
// GELU
// =============================================================================================

TEST(Gelu, MatchesLiteralValues) {
  // Expected values from Python: 0.5 * x * (1 + math.erf(x / math.sqrt(2))).
  const std::vector<double> x = {-6, -4, -3, -2.5, -2, -1.5, -1, -0.5, -0.1, 0,
                                 0.1, 0.5, 1, 1.5, 2, 2.5, 3, 4, 6};
  const std::vector<double> want = {
      -5.919525869479969e-09, -0.00012668496733247991, -0.00404969409489031,
      -0.015524163314440398,  -0.04550026389635842,    -0.10021080190328713,
      -0.15865525393145707,   -0.15426876936299344,    -0.0460172162722971,
      0.0,                    0.053982783727702904,    0.34573123063700656,
      0.8413447460685429,     1.399789198096713,       1.9544997361036416,
      2.4844758366855597,     2.99595030590511,        3.9998733150326675,
      5.999999994080474};
  for (DType dt : kFloatTypes) {
    const Tensor in = make({static_cast<int64_t>(x.size())}, x, dt);
    const Tensor y = gelu(in);
    EXPECT_EQ(y.dtype(), dt);
    EXPECT_EQ(y.shape(), in.shape());
    // f32: +-0.1 are not representable (0.1f = 0.1 + 1.5e-9), which moves gelu by < 1e-9.
    expect_close(tag("gelu literal values", dt), values(y), want,
                 dt == DType::f64 ? 1e-15 : kGeluF32Atol, dt == DType::f64 ? 1e-14 : 1e-6);
  }
}

TEST(Gelu, IsErfFormNotTanhApproximation) {
  // At these points the tanh approximation is off by 1.5e-4 .. 4.4e-4 (computed in Python), far
  // above the tolerance: an implementation of the tanh form fails here.
  const std::vector<double> x = {-3, -2.5, -1.5, -1, 1, 1.5, 2.5, 3};
  for (DType dt : kFloatTypes) {
    const std::vector<double> got = values(gelu(make({8}, x, dt)));
    for (size_t i = 0; i < x.size(); ++i) {
      ASSERT_GT(std::abs(gelu_erf(x[i]) - gelu_tanh(x[i])), 1.4e-4) << "test premise at " << x[i];
      EXPECT_NEAR(got[i], gelu_erf(x[i]), 2e-6) << dtype_name(dt) << " gelu(" << x[i] << ")";
      EXPECT_GT(std::abs(got[i] - gelu_tanh(x[i])), 1e-4)
          << dtype_name(dt) << " gelu(" << x[i] << ") equals the tanh approximation";
    }
  }
}

TEST(Gelu, MatchesLoopAllRanks) {
  uint64_t seed = 10;
  for (DType dt : kFloatTypes) {
    for (const Shape& s : kShapesRank1To5) {
      const Tensor x = randn(s, seed++, dt, 2.0);
      const Tensor y = gelu(x);
      ASSERT_EQ(y.shape(), s);
      ASSERT_EQ(y.dtype(), dt);
      std::vector<double> want;
      for (double v : values(x)) want.push_back(gelu_erf(v));
      expect_close(tag("gelu", s, dt), values(y), want,
                   dt == DType::f64 ? 1e-15 : kGeluF32Atol, dt == DType::f64 ? 1e-14 : 1e-6);
    }
  }
}

TEST(Gelu, BackwardIsPhiPlusXTimesDensity) {
  // d gelu / dx = Phi(x) + x phi(x); literal values from Python for 0, 1, -1, 2.
  const std::vector<double> x = {0, 1, -1, 2, -3, 0.5};
  const std::vector<double> literal = {0.5, 1.0833154705876864, -0.08331547058768629,
                                       1.085231801078197, -0.011945647204183918,
                                       0.8674951246561629};
  for (DType dt : kFloatTypes) {
    Tensor in = make({6}, x, dt);
    in.set_requires_grad(true);
    sum(gelu(in)).backward();
    ASSERT_TRUE(in.grad().defined());
    EXPECT_EQ(in.grad().shape(), in.shape());
    // f32: Phi(x) + x phi(x) in float, a few ulps of values of order 1.
    expect_close(tag("gelu' literal", dt), values(in.grad()), literal,
                 dt == DType::f64 ? 1e-14 : 1e-6, dt == DType::f64 ? 1e-13 : 1e-6);

    Tensor r = randn({2, 3, 5}, 77, dt, 2.0);
    r.set_requires_grad(true);
    sum(gelu(r)).backward();
    std::vector<double> want;
    for (double v : values(r)) want.push_back(gelu_grad(v));
    expect_close(tag("gelu' random", dt), values(r.grad()), want,
                 dt == DType::f64 ? 1e-14 : 1e-6, dt == DType::f64 ? 1e-13 : 1e-6);
  }
}

TEST(Gelu, Gradcheck) {
  uint64_t seed = 20;
  for (const Shape& s : kGradShapes) {
    expect_gradients_match("gelu " + s.str(),
                           [](const std::vector<Tensor>& v) { return gelu(v[0]); },
                           {leaf(s, seed++, 2.0)});
  }
}

TEST(Gelu, NoGradModeRecordsNothing) {
  Tensor x = leaf({3}, 1);
  {
    NoGradGuard guard;
    EXPECT_FALSE(gelu(x).requires_grad());
  }
  EXPECT_TRUE(gelu(x).requires_grad());
}

TEST(Gelu, RejectsNonFloating) {
  expect_error([] { gelu(Tensor::zeros({3}, DType::i64)); }, {"gelu", "i64"});
}

// =============================================================================================
// Layer scale
// =============================================================================================

TEST(LayerScale, MatchesLoopAllRanks) {
  uint64_t seed = 100;
  for (DType dt : kFloatTypes) {
    for (const Shape& s : kShapesRank1To5) {
      const int64_t C = s[-1];
      const Tensor x = randn(s, seed++, dt);
      const Tensor g = randn({C}, seed++, dt);
      const Tensor y = layer_scale(x, g);
      ASSERT_EQ(y.shape(), s);
      ASSERT_EQ(y.dtype(), dt);
      const std::vector<double> xv = values(x), gv = values(g);
      std::vector<double> want(xv.size());
      for (size_t i = 0; i < xv.size(); ++i) want[i] = xv[i] * gv[i % static_cast<size_t>(C)];
      expect_close(tag("layer_scale", s, dt), values(y), want, atol_for(dt), rtol_for(dt));
    }
  }
}

TEST(LayerScale, BackwardSumsOverRows) {
  // dL/dx[r, c] = gamma[c] and dL/dgamma[c] = sum_r x[r, c] for L = sum(layer_scale(x, gamma)).
  for (DType dt : kFloatTypes) {
    const Shape s = {2, 3, 1, 5};
    Tensor x = randn(s, 5, dt);
    Tensor g = randn({5}, 6, dt);
    x.set_requires_grad(true);
    g.set_requires_grad(true);
    sum(layer_scale(x, g)).backward();
    ASSERT_TRUE(x.grad().defined() && g.grad().defined());
    EXPECT_EQ(x.grad().shape(), s);
    EXPECT_EQ(g.grad().shape(), Shape({5}));
    const std::vector<double> xv = values(x), gv = values(g);
    std::vector<double> dx(xv.size()), dg(5, 0.0);
    for (size_t i = 0; i < xv.size(); ++i) {
      dx[i] = gv[i % 5];
      dg[i % 5] += xv[i];
    }
    expect_close(tag("layer_scale dx", dt), values(x.grad()), dx, atol_for(dt), rtol_for(dt));
    // f32: a sum of 6 rounded products.
    expect_close(tag("layer_scale dgamma", dt), values(g.grad()), dg,
                 dt == DType::f64 ? 1e-14 : 1e-6, rtol_for(dt));
  }
}

TEST(LayerScale, Gradcheck) {
  const std::vector<Shape> shapes = {{3}, {1, 5}, {1, 3, 3, 5}, {2, 1, 3, 1, 3}};
  uint64_t seed = 120;
  for (const Shape& s : shapes) {
    const auto f = [](const std::vector<Tensor>& v) { return layer_scale(v[0], v[1]); };
    expect_gradients_match("layer_scale x,gamma " + s.str(), f,
                           {leaf(s, seed, 1.0), leaf({s[-1]}, seed + 1, 1.0)});
    // Only one of them wanted.
    expect_gradients_match("layer_scale gamma only " + s.str(), f,
                           {randn(s, seed + 2), leaf({s[-1]}, seed + 3)});
    expect_gradients_match("layer_scale x only " + s.str(), f,
                           {leaf(s, seed + 4), randn({s[-1]}, seed + 5)});
    seed += 6;
  }
}

TEST(LayerScale, RejectsBadGamma) {
  const Tensor x = Tensor::zeros({2, 3, 4});
  expect_error([&] { layer_scale(x, Tensor::zeros({5})); }, {"layer_scale", "[5]"});
  expect_error([&] { layer_scale(x, Tensor::zeros({3})); }, {"layer_scale", "[3]"});
  expect_error([&] { layer_scale(x, Tensor::zeros({1, 4})); }, {"layer_scale", "[1, 4]"});
  expect_error([&] { layer_scale(x, Tensor::zeros({4}, DType::f64)); },
               {"layer_scale", "f64", "f32"});
}

// =============================================================================================
// Drop path
// =============================================================================================

TEST(DropPath, ScaleIsZeroOrInverseKeepProb) {
  for (DType dt : kFloatTypes) {
    for (double p : {0.1, 0.25, 0.5, 0.9}) {
      Generator gen(3);
      const int64_t N = 1000;
      const Tensor s = drop_path_scale(N, p, gen, dt);
      ASSERT_EQ(s.shape(), Shape({N}));
      ASSERT_EQ(s.dtype(), dt);
      ASSERT_TRUE(s.device().is_cpu());
      const double inv_keep = 1.0 / (1.0 - p);
      int64_t kept = 0, dropped = 0;
      for (double v : values(s)) {
        if (v == 0.0) {
          ++dropped;
        } else {
          // f32: 1/keep_prob rounded to float.
          EXPECT_NEAR(v, inv_keep, inv_keep * (dt == DType::f64 ? 1e-15 : 1e-7))
              << dtype_name(dt) << " drop_prob " << p;
          ++kept;
        }
      }
      // With N = 1000 both outcomes occur at every p here (the chance of not is < 1e-45).
      EXPECT_GT(kept, 0) << "drop_prob " << p;
      EXPECT_GT(dropped, 0) << "drop_prob " << p;
    }
  }
}

TEST(DropPath, ScaleWithZeroDropProbIsAllOnes) {
  Generator gen(4);
  const std::vector<double> got = values(drop_path_scale(50, 0.0, gen, DType::f64));
  expect_close("drop_path_scale p=0", got, std::vector<double>(50, 1.0), 0, 0);
}

TEST(DropPath, SameSeedSameMaskDifferentSeedDifferentMask) {
  const int64_t N = 1000;
  Generator a(7), b(7), c(8);
  const std::vector<double> sa = values(drop_path_scale(N, 0.5, a, DType::f32));
  const std::vector<double> sb = values(drop_path_scale(N, 0.5, b, DType::f32));
  const std::vector<double> sc = values(drop_path_scale(N, 0.5, c, DType::f32));
  EXPECT_EQ(sa, sb) << "same seed, different masks";
  EXPECT_EQ(a.offset(), b.offset());
  EXPECT_GT(a.offset(), 0u) << "drop_path_scale drew nothing from the generator";
  int64_t differ = 0;
  for (int64_t i = 0; i < N; ++i) differ += sa[static_cast<size_t>(i)] != sc[static_cast<size_t>(i)];
  // Independent masks at p = 0.5 differ in ~500 of 1000 places; <= 100 has probability < 1e-80.
  EXPECT_GT(differ, 100) << "seeds 7 and 8 give (nearly) the same mask";

  // The generator advances: the next draw from `a` is a new mask.
  const std::vector<double> sa2 = values(drop_path_scale(N, 0.5, a, DType::f32));
  int64_t differ2 = 0;
  for (int64_t i = 0; i < N; ++i) differ2 += sa[static_cast<size_t>(i)] != sa2[static_cast<size_t>(i)];
  EXPECT_GT(differ2, 100) << "two consecutive draws gave (nearly) the same mask";
}

TEST(DropPath, ScaleDrawnInSampleOrder) {
  // "drawn in order n = 0..N-1": the first 10 of 100 samples are the 10 samples of a batch of 10.
  Generator a(9), b(9);
  const std::vector<double> s10 = values(drop_path_scale(10, 0.5, a, DType::f64));
  const std::vector<double> s100 = values(drop_path_scale(100, 0.5, b, DType::f64));
  EXPECT_EQ(s10, std::vector<double>(s100.begin(), s100.begin() + 10));
}

TEST(DropPath, KeptFractionIsNearKeepProb) {
  const int64_t N = 100000;
  for (double p : {0.1, 0.5, 0.8}) {
    Generator gen(11);
    const std::vector<double> s = values(drop_path_scale(N, p, gen, DType::f64));
    const double keep = 1.0 - p;
    int64_t kept = 0;
    double total = 0;
    for (double v : s) {
      kept += v != 0.0;
      total += v;
    }
    const double frac = static_cast<double>(kept) / N;
    const double sigma = std::sqrt(keep * (1 - keep) / N);  // binomial standard deviation
    EXPECT_NEAR(frac, keep, 5 * sigma) << "drop_prob " << p;
    // The expectation of the scale is 1 (that is why kept samples are scaled by 1/keep_prob).
    EXPECT_NEAR(total / N, 1.0, 5 * sigma / keep) << "drop_prob " << p;
  }
}

TEST(DropPath, IdentityWhenNotTrainingOrZeroDropProb) {
  for (DType dt : kFloatTypes) {
    const Tensor x = randn({3, 2, 2, 5}, 12, dt);
    Generator gen(5);
    gen.set_state(5, 12);  // mid-stream: the offset must stay where it is
    const Tensor eval = drop_path(x, 0.5, /*training=*/false, gen);
    EXPECT_EQ(gen.offset(), 12u) << "drop_path(training=false) drew from the generator";
    ASSERT_EQ(eval.shape(), x.shape());
    EXPECT_EQ(values(eval), values(x));
    const Tensor zero = drop_path(x, 0.0, /*training=*/true, gen);
    EXPECT_EQ(gen.offset(), 12u) << "drop_path(drop_prob=0) drew from the generator";
    ASSERT_EQ(zero.shape(), x.shape());
    EXPECT_EQ(values(zero), values(x));
  }
}

TEST(DropPath, AppliesScalePerSampleAllRanks) {
  // Any multipliers, not only 0 and 1/keep_prob: out[n, ...] = x[n, ...] * scale[n].
  const std::vector<double> scale_values = {0.0, 1.25, -0.5, 2.0, 3.0};
  const std::vector<Shape> shapes = {{4}, {3, 5}, {1, 3, 5}, {3, 2, 1, 5}, {2, 1, 2, 3, 3}};
  uint64_t seed = 200;
  for (DType dt : kFloatTypes) {
    for (const Shape& s : shapes) {
      const int64_t N = s[0];
      const Tensor x = randn(s, seed++, dt);
      const Tensor scale =
          make({N}, std::vector<double>(scale_values.begin(), scale_values.begin() + N), dt);
      const Tensor y = drop_path(x, scale);
      ASSERT_EQ(y.shape(), s);
      ASSERT_EQ(y.dtype(), dt);
      const std::vector<double> xv = values(x);
      const size_t per = xv.size() / static_cast<size_t>(N);
      std::vector<double> want(xv.size());
      for (size_t i = 0; i < xv.size(); ++i) want[i] = xv[i] * scale_values[i / per];
      expect_close(tag("drop_path(x, scale)", s, dt), values(y), want, atol_for(dt), rtol_for(dt));
    }
  }
}

TEST(DropPath, TrainingDrawsScaleFromGenerator) {
  const double p = 0.3, inv_keep = 1.0 / (1.0 - p);
  const int64_t N = 64;
  for (DType dt : kFloatTypes) {
    Tensor x = randn({N, 2, 1, 3}, 13, dt);
    x.set_requires_grad(true);
    Generator a(21), b(21);
    const Tensor y = drop_path(x, p, /*training=*/true, a);
    const Tensor scale = drop_path_scale(N, p, b, dt);
    // Same draws as drop_path_scale from the same state, and the same number of them.
    EXPECT_EQ(a.offset(), b.offset());
    ASSERT_EQ(y.shape(), x.shape());
    expect_close(tag("drop_path(training) vs drop_path(x, scale)", dt), values(y),
                 values(drop_path(x.detach(), scale)), 0, 0);

    // Each sample is dropped whole (all zero) or kept whole and scaled by 1/keep_prob, and the
    // gradient is the same per-sample multiplier.
    sum(y).backward();
    ASSERT_TRUE(x.grad().defined());
    const std::vector<double> xv = values(x), yv = values(y), gv = values(x.grad());
    const size_t per = xv.size() / N;
    int64_t kept = 0;
    for (int64_t n = 0; n < N; ++n) {
      const double m = gv[n * per];
      const bool keep = m != 0.0;
      kept += keep;
      if (keep) {
        EXPECT_NEAR(m, inv_keep, 1e-6 * inv_keep) << dtype_name(dt) << " sample " << n;
      }
      for (size_t j = n * per; j < (n + 1) * per; ++j) {
        EXPECT_EQ(gv[j], m) << "sample " << n << " is not dropped whole";
        EXPECT_NEAR(yv[j], xv[j] * m, 1e-6 * std::abs(xv[j] * m)) << "sample " << n;
      }
    }
    EXPECT_GT(kept, 0);
    EXPECT_LT(kept, N);  // P(no drop among 64 at p=0.3) ~ 1e-10
  }
}

TEST(DropPath, GradientIsDoutTimesScale) {
  for (DType dt : kFloatTypes) {
    Tensor x = randn({3, 2, 5}, 14, dt);
    x.set_requires_grad(true);
    const std::vector<double> sv = {2.0, 0.0, 1.25};
    const Tensor scale = make({3}, sv, dt);
    const Tensor w = randn({3, 2, 5}, 15, dt);  // dout
    sum(mul(drop_path(x, scale), w)).backward();
    ASSERT_TRUE(x.grad().defined());
    const std::vector<double> wv = values(w);
    std::vector<double> want(wv.size());
    for (size_t i = 0; i < wv.size(); ++i) want[i] = wv[i] * sv[i / 10];
    expect_close(tag("drop_path dx", dt), values(x.grad()), want, atol_for(dt), rtol_for(dt));
  }
}

TEST(DropPath, Gradcheck) {
  const std::vector<Shape> shapes = {{1, 3}, {4}, {3, 2, 1, 3}, {2, 1, 3, 1, 3}};
  const std::vector<double> sv = {1.0 / 0.7, 0.0, 1.0 / 0.7, 1.0 / 0.7};
  uint64_t seed = 220;
  for (const Shape& s : shapes) {
    const Tensor scale = from_doubles({s[0]}, std::vector<double>(sv.begin(), sv.begin() + s[0]));
    expect_gradients_match(
        "drop_path " + s.str(),
        [&](const std::vector<Tensor>& v) { return drop_path(v[0], scale); }, {leaf(s, seed++)});
  }
}

TEST(DropPath, RejectsBadArguments) {
  const Tensor x = Tensor::zeros({3, 4});
  expect_error([&] { drop_path(x, Tensor::ones({4})); }, {"drop_path", "[4]"});
  expect_error([&] { drop_path(x, Tensor::ones({2})); }, {"drop_path", "[2]"});
  expect_error([&] { drop_path(x, Tensor::ones({3, 1})); }, {"drop_path", "[3, 1]"});
  expect_error([&] { drop_path(x, Tensor::ones({3}, DType::f64)); }, {"drop_path", "f64", "f32"});
  Generator gen(1);
  expect_error([&] { drop_path(x, 1.0, true, gen); }, {"drop_path", "1"});
  expect_error([&] { drop_path(x, 1.5, true, gen); }, {"drop_path", "1.5"});
  expect_error([&] { drop_path(x, -0.25, true, gen); }, {"drop_path", "-0.25"});
  expect_error([&] { drop_path_scale(10, 1.0, gen); }, {"drop_path", "1"});
  expect_error([&] { drop_path_scale(10, -0.5, gen); }, {"drop_path", "-0.5"});
  expect_error([&] { drop_path_scale(10, 2.5, gen); }, {"drop_path", "2.5"});
}

// =============================================================================================
// add, mul
// =============================================================================================

TEST(Add, MatchesLoopAllRanks) {
  uint64_t seed = 300;
  for (DType dt : kFloatTypes) {
    for (const Shape& s : kShapesRank1To5) {
      const Tensor a = randn(s, seed++, dt), b = randn(s, seed++, dt);
      const Tensor y = add(a, b);
      ASSERT_EQ(y.shape(), s);
      ASSERT_EQ(y.dtype(), dt);
      const std::vector<double> av = values(a), bv = values(b);
      std::vector<double> want(av.size());
      for (size_t i = 0; i < av.size(); ++i) want[i] = av[i] + bv[i];
      expect_close(tag("add", s, dt), values(y), want, atol_for(dt), rtol_for(dt));
    }
  }
}

TEST(Mul, MatchesLoopAllRanks) {
  uint64_t seed = 400;
  for (DType dt : kFloatTypes) {
    for (const Shape& s : kShapesRank1To5) {
      const Tensor a = randn(s, seed++, dt), b = randn(s, seed++, dt);
      const Tensor y = mul(a, b);
      ASSERT_EQ(y.shape(), s);
      ASSERT_EQ(y.dtype(), dt);
      const std::vector<double> av = values(a), bv = values(b);
      std::vector<double> want(av.size());
      for (size_t i = 0; i < av.size(); ++i) want[i] = av[i] * bv[i];
      expect_close(tag("mul", s, dt), values(y), want, atol_for(dt), rtol_for(dt));
    }
  }
}

TEST(Add, Gradcheck) {
  uint64_t seed = 320;
  const auto f = [](const std::vector<Tensor>& v) { return add(v[0], v[1]); };
  for (const Shape& s : kGradShapes) {
    expect_gradients_match("add " + s.str(), f, {leaf(s, seed), leaf(s, seed + 1)});
    expect_gradients_match("add b only " + s.str(), f, {randn(s, seed + 2), leaf(s, seed + 3)});
    // The same tensor twice: the engine must sum both gradients (d(x + x)/dx = 2).
    expect_gradients_match("add(x, x) " + s.str(),
                           [](const std::vector<Tensor>& v) { return add(v[0], v[0]); },
                           {leaf(s, seed + 4)});
    seed += 5;
  }
}

TEST(Mul, Gradcheck) {
  uint64_t seed = 420;
  const auto f = [](const std::vector<Tensor>& v) { return mul(v[0], v[1]); };
  for (const Shape& s : kGradShapes) {
    expect_gradients_match("mul " + s.str(), f, {leaf(s, seed), leaf(s, seed + 1)});
    expect_gradients_match("mul a only " + s.str(), f, {leaf(s, seed + 2), randn(s, seed + 3)});
    expect_gradients_match("mul b only " + s.str(), f, {randn(s, seed + 2), leaf(s, seed + 3)});
    // d(x * x)/dx = 2x: both edges point at the same leaf.
    expect_gradients_match("mul(x, x) " + s.str(),
                           [](const std::vector<Tensor>& v) { return mul(v[0], v[0]); },
                           {leaf(s, seed + 4)});
    seed += 5;
  }
}

TEST(Mul, BackwardIsOtherFactor) {
  for (DType dt : kFloatTypes) {
    Tensor a = randn({2, 3, 5}, 30, dt), b = randn({2, 3, 5}, 31, dt);
    a.set_requires_grad(true);
    sum(mul(a, b)).backward();
    ASSERT_TRUE(a.grad().defined());
    EXPECT_FALSE(b.grad().defined()) << "b does not require grad";
    expect_close(tag("mul da", dt), values(a.grad()), values(b), 0, 0);
  }
}

TEST(Add, BackwardIsOnesForBoth) {
  for (DType dt : kFloatTypes) {
    Tensor a = randn({3, 1, 5}, 32, dt), b = randn({3, 1, 5}, 33, dt);
    a.set_requires_grad(true);
    b.set_requires_grad(true);
    sum(add(a, b)).backward();
    ASSERT_TRUE(a.grad().defined() && b.grad().defined());
    expect_close(tag("add da", dt), values(a.grad()), std::vector<double>(15, 1.0), 0, 0);
    expect_close(tag("add db", dt), values(b.grad()), std::vector<double>(15, 1.0), 0, 0);
  }
}

TEST(Add, RejectsMismatchedShapesAndDtypes) {
  expect_error([] { add(Tensor::zeros({2, 3}), Tensor::zeros({3, 2})); }, {"add", "[2, 3]", "[3, 2]"});
  expect_error([] { add(Tensor::zeros({2, 3}), Tensor::zeros({2, 3, 1})); },
               {"add", "[2, 3]", "[2, 3, 1]"});
  expect_error([] { add(Tensor::zeros({6}), Tensor::zeros({7})); }, {"add", "[6]", "[7]"});
  expect_error([] { add(Tensor::zeros({2, 3}), Tensor::zeros({2, 3}, DType::f64)); },
               {"add", "f32", "f64"});
}

TEST(Mul, RejectsMismatchedShapesAndDtypes) {
  expect_error([] { mul(Tensor::zeros({2, 3}), Tensor::zeros({3, 2})); }, {"mul", "[2, 3]", "[3, 2]"});
  expect_error([] { mul(Tensor::zeros({1, 5}), Tensor::zeros({5})); }, {"mul", "[1, 5]", "[5]"});
  expect_error([] { mul(Tensor::zeros({4}, DType::f64), Tensor::zeros({4})); },
               {"mul", "f32", "f64"});
}

// =============================================================================================
// sum
// =============================================================================================

TEST(Sum, MatchesLoopAllRanks) {
  uint64_t seed = 500;
  for (DType dt : kFloatTypes) {
    for (const Shape& s : kShapesRank1To5) {
      const Tensor x = randn(s, seed++, dt);
      const Tensor y = sum(x);
      EXPECT_EQ(y.rank(), 0) << "sum returns shape [], got " << y.shape().str();
      ASSERT_EQ(y.numel(), 1);
      ASSERT_EQ(y.dtype(), dt);
      double want = 0, abs_sum = 0;
      for (double v : values(x)) {
        want += v;
        abs_sum += std::abs(v);
      }
      // f32: accumulated in double, so only the final rounding (relative to the terms' size).
      expect_close(tag("sum", s, dt), values(y), {want},
                   (dt == DType::f64 ? 1e-15 : 1e-7) * abs_sum, rtol_for(dt));
    }
  }
}

TEST(Sum, AccumulatesF32InDouble) {
  // 2^24 followed by 1000 ones: a float running sum stalls at 2^24 (2^24 + 1 rounds back to
  // 2^24), the true sum 16778216 is exactly representable in f32.
  std::vector<float> v(1001, 1.0f);
  v[0] = 16777216.0f;
  const Tensor x = Tensor::from_data<float>({1001}, v);
  EXPECT_EQ(sum(x).item(), 16778216.0);
}

TEST(Sum, BackwardIsOnes) {
  for (DType dt : kFloatTypes) {
    Tensor x = randn({1, 2, 3, 1, 3}, 40, dt);
    x.set_requires_grad(true);
    Tensor y = sum(x);
    EXPECT_TRUE(y.requires_grad());
    y.backward();
    ASSERT_TRUE(x.grad().defined());
    EXPECT_EQ(x.grad().shape(), x.shape());
    expect_close(tag("sum dx", dt), values(x.grad()), std::vector<double>(18, 1.0), 0, 0);
  }
}

TEST(Sum, Gradcheck) {
  uint64_t seed = 520;
  for (const Shape& s : kGradShapes)
    expect_gradients_match("sum " + s.str(),
                           [](const std::vector<Tensor>& v) { return sum(v[0]); },
                           {leaf(s, seed++)});
}

// =============================================================================================
// reshape
// =============================================================================================

TEST(Reshape, KeepsElementsInRowMajorOrder) {
  const std::vector<std::pair<Shape, Shape>> cases = {
      {{2, 3, 4}, {4, 6}}, {{2, 3, 4}, {24}}, {{2, 3, 4}, {1, 2, 1, 12, 1}},
      {{7}, {7, 1}},       {{1, 1}, Shape{}}, {{3, 1, 5}, {5, 3}}};
  uint64_t seed = 600;
  for (DType dt : kFloatTypes) {
    for (const auto& [from, to] : cases) {
      const Tensor x = randn(from, seed++, dt);
      const Tensor y = reshape(x, to);
      ASSERT_EQ(y.shape(), to) << from.str() << " -> " << to.str();
      ASSERT_EQ(y.dtype(), dt);
      expect_close(tag("reshape " + from.str() + " -> " + to.str(), dt), values(y), values(x), 0, 0);
    }
  }
}

TEST(Reshape, Gradcheck) {
  const std::vector<std::pair<Shape, Shape>> cases = {
      {{3, 5}, {5, 3}}, {{2, 3, 4}, {24}}, {{1, 1}, Shape{}}, {{2, 1, 3}, {1, 3, 1, 2, 1}}};
  uint64_t seed = 620;
  for (const auto& [from, to] : cases) {
    const Shape target = to;
    expect_gradients_match("reshape " + from.str() + " -> " + to.str(),
                           [target](const std::vector<Tensor>& v) { return reshape(v[0], target); },
                           {leaf(from, seed++)});
  }
  // Through a reshape into an op that mixes positions: the gradient must be mapped back to x's
  // layout, with x's shape.
  const Tensor g = leaf({4}, 640);
  expect_gradients_match(
      "layer_scale(reshape(x [2, 3, 4] -> [6, 4]), gamma)",
      [](const std::vector<Tensor>& v) { return layer_scale(reshape(v[0], {6, 4}), v[1]); },
      {leaf({2, 3, 4}, 641), g});
}

TEST(Reshape, GradientHasInputShape) {
  Tensor x = randn({2, 3, 4}, 650, DType::f32);
  x.set_requires_grad(true);
  sum(reshape(x, {4, 6})).backward();
  ASSERT_TRUE(x.grad().defined());
  EXPECT_EQ(x.grad().shape(), x.shape());
}

TEST(Reshape, RejectsDifferentNumel) {
  expect_error([] { reshape(Tensor::zeros({2, 3}), {7}); }, {"reshape", "[2, 3]", "[7]"});
  expect_error([] { reshape(Tensor::zeros({2, 3}), {3, 3}); }, {"reshape", "[2, 3]", "[3, 3]"});
  expect_error([] { reshape(Tensor::zeros({2}), Shape{}); }, {"reshape", "[2]", "[]"});
}
