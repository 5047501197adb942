// Tests of linear (x W^T + b over the last dimension) and layer_norm (over the last dimension,
// biased variance).
//
// Forward references are written here independently of the kernels: linear is a plain triple
// loop over (rows, N, K) in long double; layer_norm is a two-pass mean then variance in long
// double. Backward is checked against central finite differences in double
// (tests/testing.h), and the f32 backward against the f64 one.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <string>
#include <vector>

#include "autograd/function.h"
#include "autograd/ops.h"
#include "tests/testing.h"

using namespace cnx;
using namespace cnx::test;

namespace {

// ---- names in failure messages ---------------------------------------------------------------

std::string shape_name(const Shape& s) { return s.str(); }

// ---- references ------------------------------------------------------------------------------

struct Ref {
  std::vector<double> out, mag;
};

// out[m, n] = b[n] + sum_k x[m, k] w[n, k], a plain triple loop in long double.
Ref linear_ref(const std::vector<double>& x, const std::vector<double>& w,
               const std::vector<double>& b, int64_t M, int64_t K, int64_t N) {
  Ref r;
  r.out.resize(static_cast<size_t>(M * N));
  r.mag.resize(r.out.size());
  for (int64_t m = 0; m < M; ++m)
    for (int64_t n = 0; n < N; ++n) {
      long double acc = 0, mag = 0;
      for (int64_t k = 0; k < K; ++k) {
        const long double t = static_cast<long double>(x[static_cast<size_t>(m * K + k)]) *
                              w[static_cast<size_t>(n * K + k)];
        acc += t;
        mag += std::abs(t);
      }
      if (!b.empty()) {
        acc += b[static_cast<size_t>(n)];
        mag += std::abs(b[static_cast<size_t>(n)]);
      }
      r.out[static_cast<size_t>(m * N + n)] = static_cast<double>(acc);
      r.mag[static_cast<size_t>(m * N + n)] = static_cast<double>(mag);
    }
  return r;
}

// Two-pass LayerNorm in long double over rows of C. mag: the scale of the rounding error of an
// output, |w| (|xhat| + 1 + |mean| rstd) + |b|: the error of xhat = (x - mean) rstd is a few
// ulps of |xhat|, plus the rounding of mean and of x relative to the spread of the row.
Ref layer_norm_ref(const std::vector<double>& x, const std::vector<double>& w,
                   const std::vector<double>& b, int64_t rows, int64_t C, double eps) {
  Ref r;
  r.out.resize(x.size());
  r.mag.resize(x.size());
  for (int64_t i = 0; i < rows; ++i) {
    const double* row = x.data() + i * C;
    long double mean = 0;
    for (int64_t c = 0; c < C; ++c) mean += row[c];
    mean /= C;
    long double var = 0;
    for (int64_t c = 0; c < C; ++c) var += (row[c] - mean) * (row[c] - mean);
    var /= C;
    const long double rstd = 1.0L / std::sqrt(var + static_cast<long double>(eps));
    for (int64_t c = 0; c < C; ++c) {
      const long double xhat = (row[c] - mean) * rstd;
      const size_t at = static_cast<size_t>(i * C + c);
      r.out[at] = static_cast<double>(xhat * w[static_cast<size_t>(c)] + b[static_cast<size_t>(c)]);
      r.mag[at] = static_cast<double>(std::abs(w[static_cast<size_t>(c)]) *
                                          (std::abs(xhat) + 1 + std::abs(mean) * rstd) +
                                      std::abs(b[static_cast<size_t>(c)]));
    }
  }
  return r;
}

// linear on x of shape `xs` (..., K) with weight (N, K) against the triple loop, f32 and f64.
void check_linear_forward(const Shape& xs, int64_t N, bool with_bias, uint64_t seed) {
  const int64_t K = xs[-1], M = xs.numel() / K;
  Generator gen(seed);
  const std::vector<double> x = randv(xs.numel(), gen), w = randv(N * K, gen);
  const std::vector<double> b = with_bias ? randv(N, gen) : std::vector<double>{};
  const Ref ref = linear_ref(x, w, b, M, K, N);
  std::vector<int64_t> ys = xs.vec();
  ys.back() = N;
  for (DType dt : {DType::f32, DType::f64}) {
    const std::string what = "linear " + dname(dt) + " x" + shape_name(xs) + " N" +
                             std::to_string(N) + (with_bias ? " bias" : " no bias");
    const Tensor y = linear(make(xs, x, dt), make({N, K}, w, dt),
                            with_bias ? make({N}, b, dt) : Tensor());
    EXPECT_EQ(y.shape(), Shape(ys)) << what;
    EXPECT_EQ(y.dtype(), dt) << what;
    if (y.shape() != Shape(ys)) continue;
    expect_close_mag(what, values(y), ref.out, ref.mag, fwd_tol(dt));
  }
}

// layer_norm on x of shape `xs` (..., C) against the two-pass reference, f32 and f64.
void check_layer_norm_forward(const Shape& xs, double eps, uint64_t seed, double std = 1.0,
                              double mean = 0.0,
                              std::vector<DType> dtypes = {DType::f32, DType::f64}) {
  const int64_t C = xs[-1], rows = xs.numel() / C;
  Generator gen(seed);
  const std::vector<double> x = randv(xs.numel(), gen, std, mean), w = randv(C, gen),
                            b = randv(C, gen);
  const Ref ref = layer_norm_ref(x, w, b, rows, C, eps);
  for (DType dt : dtypes) {
    const std::string what = "layer_norm " + dname(dt) + " x" + shape_name(xs) +
                             " eps " + std::to_string(eps);
    const Tensor y = layer_norm(make(xs, x, dt), make({C}, w, dt), make({C}, b, dt), eps);
    EXPECT_EQ(y.shape(), xs) << what;
    EXPECT_EQ(y.dtype(), dt) << what;
    if (y.shape() != xs) continue;
    expect_close_mag(what, values(y), ref.out, ref.mag, fwd_tol(dt));
  }
}

}  // namespace

// =============================================================================================
// Linear
// =============================================================================================

TEST(Linear, HandComputed) {
  // x = [1 2 3; 4 5 6], W = [1 0 -1; 2 1 0], b = [0.5, -0.5]:
  //   row 0: [1 - 3 + 0.5, 2 + 2 - 0.5] = [-1.5, 3.5]
  //   row 1: [4 - 6 + 0.5, 8 + 5 - 0.5] = [-1.5, 12.5]
  // and without the bias: [-2, 4; -2, 13].
  const std::vector<double> x = {1, 2, 3, 4, 5, 6}, w = {1, 0, -1, 2, 1, 0};
  for (DType dt : {DType::f32, DType::f64}) {
    const Tensor y = linear(make({2, 3}, x, dt), make({2, 3}, w, dt), make({2}, {0.5, -0.5}, dt));
    ASSERT_EQ(y.shape(), Shape({2, 2}));
    expect_close("linear hand " + dname(dt), values(y), {-1.5, 3.5, -1.5, 12.5}, 0, 0);
    const Tensor y0 = linear(make({2, 3}, x, dt), make({2, 3}, w, dt), Tensor());
    ASSERT_EQ(y0.shape(), Shape({2, 2}));
    expect_close("linear hand no bias " + dname(dt), values(y0), {-2, 4, -2, 13}, 0, 0);
  }
}

TEST(Linear, ForwardMatchesTripleLoopRank2) {
  check_linear_forward({5, 7}, 3, true, 1);
  check_linear_forward({5, 7}, 3, false, 2);
  check_linear_forward({1, 1}, 1, true, 3);      // K = N = 1, batch 1
  check_linear_forward({3, 1}, 5, true, 4);      // K = 1
  check_linear_forward({4, 9}, 1, false, 5);     // N = 1
  check_linear_forward({33, 96}, 65, true, 6);   // sizes past any small blocking
}

TEST(Linear, ForwardMatchesTripleLoopRank4) {
  check_linear_forward({2, 3, 5, 7}, 4, true, 11);  // (N, H, W, K), odd H, W, K
  check_linear_forward({1, 5, 3, 7}, 9, false, 12);
  check_linear_forward({2, 1, 1, 6}, 3, true, 13);
}

TEST(Linear, ForwardMatchesTripleLoopRank1And3) {
  check_linear_forward({7}, 3, true, 21);  // a single vector (K) -> (N)
  check_linear_forward({2, 5, 3}, 4, true, 22);
}

// K = 0: every dot product is empty, so the output is the bias in every row (as with PyTorch's
// nn.Linear(0, N)) and dbias is the row sum of dout, or else the op must refuse with an error
// naming it. Not a ConvNeXt shape, but the header's formula covers it.
TEST(Linear, EmptyInnerDimensionGivesBias) {
  const Tensor x = Tensor::zeros({3, 0}, DType::f64);
  const Tensor w = Tensor::zeros({2, 0}, DType::f64);
  Tensor b = from_doubles({2}, {1, 2}).set_requires_grad(true);
  Tensor y;
  try {
    y = linear(x, w, b);
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("linear"), std::string::npos) << e.what();
    return;
  }
  ASSERT_EQ(y.shape(), Shape({3, 2}));
  expect_close("linear K=0 forward", values(y), {1, 2, 1, 2, 1, 2}, 0, 0);
  sum(y).backward();
  ASSERT_TRUE(b.grad().defined());
  expect_close("linear K=0 dbias", values(b.grad()), {3, 3}, 0, 0);
}

TEST(Linear, GradientsMatchFiniteDifferences) {
  auto f = [](const std::vector<Tensor>& v) { return linear(v[0], v[1], v[2]); };
  {
    Generator gen(31);
    expect_gradients_match("linear 3x5 -> 4", f, {leaf({3, 5}, gen), leaf({4, 5}, gen), leaf({4}, gen)});
  }
  {
    Generator gen(32);  // (N, H, W, K) with batch 1 and odd sizes
    expect_gradients_match("linear 1x3x1x5 -> 3",
                           f, {leaf({1, 3, 1, 5}, gen), leaf({3, 5}, gen), leaf({3}, gen)});
  }
  {
    Generator gen(33);  // no bias
    expect_gradients_match("linear no bias 2x3x3x3 -> 2",
                           f, {leaf({2, 3, 3, 3}, gen), leaf({2, 3}, gen), Tensor()});
  }
  {
    Generator gen(34);  // K = 1, N = 1
    expect_gradients_match("linear 4x1 -> 1", f, {leaf({4, 1}, gen), leaf({1, 1}, gen), leaf({1}, gen)});
  }
}

TEST(Linear, F32BackwardMatchesF64) {
  // The op with its three tensor arguments (its optional bf16 weight left out).
  const test::Op3 op3 = [](const Tensor& x, const Tensor& w, const Tensor& b) { return linear(x, w, b); };
  check_f32_backward_matches_f64("linear", op3, {2, 3, 5, 7}, {9, 7}, {9}, 41);
  check_f32_backward_matches_f64("linear", op3, {17, 48}, {33, 48}, {33}, 42);
}

TEST(Linear, OnlyRequestedGradients) {
  check_only_requested_gradients(
      "linear", [](const std::vector<Tensor>& t) { return linear(t[0], t[1], t[2]); },
      {2, 3, 5}, {4, 5}, {4}, 51);
}

TEST(Linear, NoGradModeRecordsNothing) {
  Generator gen(52);
  Tensor x = leaf({2, 3}, gen), w = leaf({4, 3}, gen), b = leaf({4}, gen);
  NoGradGuard no_grad;
  const Tensor y = linear(x, w, b);
  EXPECT_FALSE(y.requires_grad());
  EXPECT_EQ(y.grad_fn(), nullptr);
}

TEST(Linear, BadInput) {
  const Tensor x = Tensor::zeros({2, 3, 3, 7});
  const Tensor w = Tensor::zeros({5, 7});
  const Tensor b = Tensor::zeros({5});
  EXPECT_EQ(linear(x, w, b).shape(), Shape({2, 3, 3, 5}));  // sanity: the good arguments work

  // weight with the wrong number of columns (K).
  expect_error([&] { linear(x, Tensor::zeros({5, 8}), b); }, {"linear", "[5, 8]", "[2, 3, 3, 7]"});
  // the transposed weight (K, N).
  expect_error([&] { linear(x, Tensor::zeros({7, 5}), b); }, {"linear", "[7, 5]", "[2, 3, 3, 7]"});
  // weight of the wrong rank.
  expect_error([&] { linear(x, Tensor::zeros({7}), b); }, {"linear", "[7]"});
  expect_error([&] { linear(x, Tensor::zeros({5, 7, 1}), b); }, {"linear", "[5, 7, 1]"});
  // bias of the wrong length or rank.
  expect_error([&] { linear(x, w, Tensor::zeros({7})); }, {"linear", "[7]", "[5, 7]"});
  expect_error([&] { linear(x, w, Tensor::zeros({1, 5})); }, {"linear", "[1, 5]"});
  // x with no dimensions.
  expect_error([&] { linear(Tensor::zeros({}), w, b); }, {"linear", "f32[] cpu"});
  // mixed dtypes.
  expect_error([&] { linear(x, Tensor::zeros({5, 7}, DType::f64), b); },
               {"linear", "f64[5, 7]", "f32[2, 3, 3, 7]"});
  expect_error([&] { linear(x, w, Tensor::zeros({5}, DType::f64)); }, {"linear", "f64[5]"});
  // a non-floating x.
  expect_error([&] { linear(Tensor::zeros({2, 7}, DType::i64), w, b); }, {"linear", "i64[2, 7]"});
  // undefined x or weight.
  expect_error([&] { linear(Tensor(), w, b); }, {"linear"});
  expect_error([&] { linear(x, Tensor(), b); }, {"linear"});
}

// =============================================================================================
// LayerNorm
// =============================================================================================

TEST(LayerNorm, HandComputed) {
  // Rows of C = 3 with eps = 1/3:
  //   [1, 2, 3]: mean 2, biased variance (1 + 0 + 1) / 3 = 2/3, var + eps = 1,
  //              xhat = [-1, 0, 1]; with weight [2, 3, 4], bias [1, 1, 1]: [-1, 1, 5].
  //   [5, 5, 5]: var 0, xhat = 0: the bias [1, 1, 1].
  //   [3, 2, 1]: xhat = [1, 0, -1]: [3, 1, -3].
  const std::vector<double> x = {1, 2, 3, 5, 5, 5, 3, 2, 1};
  const std::vector<double> want = {-1, 1, 5, 1, 1, 1, 3, 1, -3};
  for (DType dt : {DType::f32, DType::f64}) {
    const Tensor y = layer_norm(make({3, 3}, x, dt), make({3}, {2, 3, 4}, dt),
                                make({3}, {1, 1, 1}, dt), 1.0 / 3.0);
    ASSERT_EQ(y.shape(), Shape({3, 3}));
    // 2/3 and 1/3 are not exact in binary: a few ulps of the type.
    expect_close("layer_norm hand " + dname(dt), values(y), want,
                 dt == DType::f32 ? 1e-6 : 1e-14, dt == DType::f32 ? 1e-6 : 1e-14);
  }
}

TEST(LayerNorm, HandComputedExact) {
  // [1, 1, 7, 7]: mean 4, deviations -3 -3 3 3, biased variance 9; eps = 7 -> var + eps = 16,
  // rstd = 1/4, xhat = [-0.75, -0.75, 0.75, 0.75]. Weight [1, 2, 3, 4], bias [0, 0, 0, 0.5]:
  // [-0.75, -1.5, 2.25, 3.5]. Every step is exact in binary, in f32 too.
  for (DType dt : {DType::f32, DType::f64}) {
    const Tensor y = layer_norm(make({1, 4}, {1, 1, 7, 7}, dt), make({4}, {1, 2, 3, 4}, dt),
                                make({4}, {0, 0, 0, 0.5}, dt), 7.0);
    ASSERT_EQ(y.shape(), Shape({1, 4}));
    expect_close("layer_norm exact " + dname(dt), values(y), {-0.75, -1.5, 2.25, 3.5}, 0, 0);
  }
}

TEST(LayerNorm, HandComputedDefaultEps) {
  // [1, 2, 3] with the default eps 1e-6, weight 1, bias 0: xhat = (x - 2) / sqrt(2/3 + 1e-6)
  // = [-a, 0, a] with a = 1.224743952833969 (1.2247448713915890 without eps: eps is used).
  const double a = 1.224743952833969;
  const Tensor y = layer_norm(make({1, 3}, {1, 2, 3}, DType::f64), make({3}, {1, 1, 1}, DType::f64),
                              make({3}, {0, 0, 0}, DType::f64));
  expect_close("layer_norm default eps", values(y), {-a, 0, a}, 1e-15, 1e-14);
}

TEST(LayerNorm, ForwardMatchesTwoPassReference) {
  check_layer_norm_forward({6, 7}, 1e-6, 1);           // (rows, C)
  check_layer_norm_forward({1, 9}, 1e-6, 2);           // a single row
  check_layer_norm_forward({2, 3, 5, 9}, 1e-6, 3);     // (N, H, W, C), odd sizes
  check_layer_norm_forward({1, 5, 3, 96}, 1e-6, 4);    // ConvNeXt-T's first width
  check_layer_norm_forward({3, 2, 1, 2}, 1e-6, 5);     // C = 2
  check_layer_norm_forward({13}, 1e-6, 15);            // a single vector (C)
  check_layer_norm_forward({4, 11}, 1e-6, 6, 3.0, -2.0);  // larger spread, nonzero mean
}

// Rows whose mean is large compared with their spread (mean 1e4, std 1e-2): a one-pass
// E[x^2] - E[x]^2 in double loses ~12 of its 16 digits of the variance here (relative error
// ~1e-16 * 1e8 / 1e-4 = 1e-4); a two-pass mean then variance does not. f64 only: in f32 the
// mean itself, saved as float for backward, carries an error of half an ulp of 1e4 (5e-4),
// i.e. 0.05 of the spread, so f32 has no digits to test with here.
TEST(LayerNorm, ForwardLargeMeanSmallSpread) {
  check_layer_norm_forward({5, 16}, 1e-6, 7, 1e-2, 1e4, {DType::f64});
  // A milder case for f32 too: mean 10, std 1 (the scale includes |mean| rstd, see layer_norm_ref).
  check_layer_norm_forward({5, 16}, 1e-6, 17, 1.0, 10.0);
}

// eps is the argument's, not a constant: with a variance comparable to eps the outputs differ.
TEST(LayerNorm, EpsIsRespected) {
  check_layer_norm_forward({3, 8}, 0.5, 8);
  check_layer_norm_forward({3, 8}, 1e-2, 9, 0.1);
  // The default is 1e-6 (ConvNeXt's), not PyTorch's 1e-5: data with variance ~1e-6 tells.
  Generator gen(10);
  const std::vector<double> x = randv(4 * 8, gen, 1e-3), w = randv(8, gen), b = randv(8, gen);
  const Ref ref = layer_norm_ref(x, w, b, 4, 8, 1e-6);
  const Tensor y = layer_norm(make({4, 8}, x, DType::f64), make({8}, w, DType::f64),
                              make({8}, b, DType::f64));
  expect_close_mag("layer_norm default eps is 1e-6", values(y), ref.out, ref.mag, 1e-12);
  const Ref ref5 = layer_norm_ref(x, w, b, 4, 8, 1e-5);
  double diff = 0;
  for (size_t i = 0; i < ref.out.size(); ++i) diff = std::max(diff, std::abs(ref.out[i] - ref5.out[i]));
  EXPECT_GT(diff, 0.1) << "the data do not tell eps 1e-6 from 1e-5";
}

// C = 1: each row is its own mean, xhat = 0, so the output is the bias and x gets no gradient.
TEST(LayerNorm, SingleChannelGivesBias) {
  for (DType dt : {DType::f32, DType::f64}) {
    Generator gen(11);
    Tensor x = make({2, 3, 1, 1}, randv(6, gen), dt).set_requires_grad(true);
    Tensor w = make({1}, {1.5}, dt).set_requires_grad(true);
    Tensor b = make({1}, {-0.25}, dt).set_requires_grad(true);
    Tensor y = layer_norm(x, w, b);
    ASSERT_EQ(y.shape(), Shape({2, 3, 1, 1}));
    expect_close("layer_norm C=1 " + dname(dt), values(y), std::vector<double>(6, -0.25), 0, 0);
    sum(mul(y, make(y.shape(), randv(6, gen), dt))).backward();
    ASSERT_TRUE(x.grad().defined());
    expect_close("layer_norm C=1 dx " + dname(dt), values(x.grad()), std::vector<double>(6, 0.0), 0, 0);
    expect_close("layer_norm C=1 dweight " + dname(dt), values(w.grad()), {0.0}, 0, 0);
  }
  Generator gen(12);
  expect_gradients_match(
      "layer_norm C=1", [](const std::vector<Tensor>& v) { return layer_norm(v[0], v[1], v[2]); },
      {leaf({4, 1}, gen), leaf({1}, gen), leaf({1}, gen)});
}

TEST(LayerNorm, GradientsMatchFiniteDifferences) {
  auto f = [](const std::vector<Tensor>& v) { return layer_norm(v[0], v[1], v[2]); };
  {
    Generator gen(21);  // (rows, C)
    expect_gradients_match("layer_norm 3x5", f, {leaf({3, 5}, gen), leaf({5}, gen), leaf({5}, gen)});
  }
  {
    Generator gen(22);  // (N, H, W, C), batch 1, odd sizes
    expect_gradients_match("layer_norm 1x3x1x5",
                           f, {leaf({1, 3, 1, 5}, gen), leaf({5}, gen), leaf({5}, gen)});
  }
  {
    Generator gen(23);  // batch 2, C = 2
    expect_gradients_match("layer_norm 2x1x3x2",
                           f, {leaf({2, 1, 3, 2}, gen), leaf({2}, gen), leaf({2}, gen)});
  }
  {
    Generator gen(24);  // a large eps, where dropping eps from backward would show
    auto f_eps = [](const std::vector<Tensor>& v) { return layer_norm(v[0], v[1], v[2], 0.7); };
    expect_gradients_match("layer_norm eps 0.7 3x4",
                           f_eps, {leaf({3, 4}, gen), leaf({4}, gen), leaf({4}, gen)});
  }
}

TEST(LayerNorm, F32BackwardMatchesF64) {
  auto ln = [](const Tensor& x, const Tensor& w, const Tensor& b) { return layer_norm(x, w, b); };
  check_f32_backward_matches_f64("layer_norm", ln, {2, 3, 5, 9}, {9}, {9}, 31);
  check_f32_backward_matches_f64("layer_norm", ln, {7, 96}, {96}, {96}, 32);
}

TEST(LayerNorm, OnlyRequestedGradients) {
  check_only_requested_gradients(
      "layer_norm", [](const std::vector<Tensor>& t) { return layer_norm(t[0], t[1], t[2]); },
      {2, 3, 5}, {5}, {5}, 41);
}

TEST(LayerNorm, NoGradModeRecordsNothing) {
  Generator gen(42);
  Tensor x = leaf({2, 3}, gen), w = leaf({3}, gen), b = leaf({3}, gen);
  NoGradGuard no_grad;
  const Tensor y = layer_norm(x, w, b);
  EXPECT_FALSE(y.requires_grad());
  EXPECT_EQ(y.grad_fn(), nullptr);
}

TEST(LayerNorm, BadInput) {
  const Tensor x = Tensor::zeros({2, 3, 3, 4});
  const Tensor w = Tensor::ones({4});
  const Tensor b = Tensor::zeros({4});
  EXPECT_EQ(layer_norm(x, w, b).shape(), Shape({2, 3, 3, 4}));  // sanity

  // weight or bias with the wrong channel count.
  expect_error([&] { layer_norm(x, Tensor::ones({5}), b); }, {"layer_norm", "[5]", "[2, 3, 3, 4]"});
  expect_error([&] { layer_norm(x, w, Tensor::zeros({3})); }, {"layer_norm", "[3]", "[2, 3, 3, 4]"});
  // weight of the wrong rank.
  expect_error([&] { layer_norm(x, Tensor::ones({1, 4}), b); }, {"layer_norm", "[1, 4]"});
  // x with no dimensions.
  expect_error([&] { layer_norm(Tensor::zeros({}), Tensor::ones({1}), Tensor::zeros({1})); },
               {"layer_norm", "f32[] cpu"});
  // x with no channels: no row statistics exist.
  expect_error([&] { layer_norm(Tensor::zeros({2, 0}), Tensor::ones({0}), Tensor::zeros({0})); },
               {"layer_norm", "[2, 0]"});
  // mixed dtypes.
  expect_error([&] { layer_norm(x, Tensor::ones({4}, DType::f64), b); },
               {"layer_norm", "f64[4]", "f32[2, 3, 3, 4]"});
  expect_error([&] { layer_norm(x, w, Tensor::zeros({4}, DType::f64)); }, {"layer_norm", "f64[4]"});
  // a non-floating x.
  expect_error([&] { layer_norm(Tensor::zeros({2, 4}, DType::i64), w, b); }, {"layer_norm", "i64[2, 4]"});
  // undefined tensors.
  expect_error([&] { layer_norm(Tensor(), w, b); }, {"layer_norm"});
  expect_error([&] { layer_norm(x, Tensor(), b); }, {"layer_norm"});
}
