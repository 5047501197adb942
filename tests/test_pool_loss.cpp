// Global average pooling and the losses of autograd/ops.h: global_avg_pool, cross_entropy (hard
// labels, label smoothing) and soft_cross_entropy (Mixup/CutMix targets).
//
// Forwards are compared with hand-worked values (derived in the comments) and with plain loops
// in double written here; every differentiable input is checked against central finite
// differences in double (tests/testing.h); bad arguments must throw cnx::Error naming the op
// and the offending shape or value.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <string>
#include <vector>

#include "autograd/function.h"
#include "autograd/ops.h"
#include "tests/testing.h"

using namespace cnx;
using namespace cnx::test;

namespace {

const DType kFloatTypes[] = {DType::f32, DType::f64};

Tensor labels_of(const std::vector<int64_t>& v) {
  return Tensor::from_data<int64_t>({static_cast<int64_t>(v.size())}, v);
}

std::vector<int64_t> random_labels(int64_t N, int64_t K, uint64_t seed) {
  Generator gen(seed);
  std::vector<int64_t> v(static_cast<size_t>(N));
  for (auto& l : v) l = static_cast<int64_t>(gen.next_u32() % static_cast<uint32_t>(K));
  return v;
}

// Soft targets (N, K): uniform [0, 1) values from Generator(seed) in row-major order, each row
// divided by its sum when `normalised` (a distribution, as from Mixup/CutMix), else left as is.
std::vector<double> random_targets(int64_t N, int64_t K, uint64_t seed, bool normalised) {
  Generator gen(seed);
  std::vector<double> t(static_cast<size_t>(N * K));
  for (auto& v : t) v = gen.uniform();
  if (normalised)
    for (int64_t n = 0; n < N; ++n) {
      double s = 0;
      for (int64_t k = 0; k < K; ++k) s += t[n * K + k];
      for (int64_t k = 0; k < K; ++k) t[n * K + k] /= s;
    }
  return t;
}

// ---- independent references -----------------------------------------------------------------

// Targets (N, K) for hard labels with smoothing s: (1 - s) one_hot + s / K.
std::vector<double> smoothed_targets(const std::vector<int64_t>& labels, int64_t K, double s) {
  std::vector<double> t(labels.size() * static_cast<size_t>(K), s / static_cast<double>(K));
  for (size_t n = 0; n < labels.size(); ++n) t[n * K + static_cast<size_t>(labels[n])] += 1.0 - s;
  return t;
}

// log_softmax of each row, in long double via log-sum-exp around the row maximum.
std::vector<double> log_softmax_ref(const std::vector<double>& z, int64_t N, int64_t K) {
  std::vector<double> out(z.size());
  for (int64_t n = 0; n < N; ++n) {
    const double* row = z.data() + n * K;
    const double m = *std::max_element(row, row + K);
    long double s = 0;
    for (int64_t k = 0; k < K; ++k) s += std::exp(static_cast<long double>(row[k] - m));
    const long double lse = m + std::log(s);
    for (int64_t k = 0; k < K; ++k) out[n * K + k] = static_cast<double>(row[k] - lse);
  }
  return out;
}

// mean_n sum_k -t[n, k] log_softmax(z)[n, k]
double ce_ref(const std::vector<double>& z, const std::vector<double>& t, int64_t N, int64_t K) {
  const std::vector<double> lp = log_softmax_ref(z, N, K);
  long double total = 0;
  for (size_t i = 0; i < z.size(); ++i) total -= static_cast<long double>(t[i]) * lp[i];
  return static_cast<double>(total / N);
}

// d loss / d z[n, k] = (p[n, k] sum_j t[n, j] - t[n, k]) / N
std::vector<double> ce_grad_ref(const std::vector<double>& z, const std::vector<double>& t,
                                int64_t N, int64_t K) {
  const std::vector<double> lp = log_softmax_ref(z, N, K);
  std::vector<double> g(z.size());
  for (int64_t n = 0; n < N; ++n) {
    double tsum = 0;
    for (int64_t k = 0; k < K; ++k) tsum += t[n * K + k];
    for (int64_t k = 0; k < K; ++k)
      g[n * K + k] = (std::exp(lp[n * K + k]) * tsum - t[n * K + k]) / static_cast<double>(N);
  }
  return g;
}

// Loss tolerances. f64: a handful of roundings of values of order 1. f32: exp, log and a
// K-term sum in float on logits up to ~10, so a few ulps of the largest intermediate.
double loss_atol(DType dt) { return dt == DType::f64 ? 1e-13 : 2e-6; }
double loss_rtol(DType dt) { return dt == DType::f64 ? 1e-12 : 2e-6; }

// Hand-worked values of order 1: f64 a few ulps; f32 also the rounding of ln 2, ln 3 in the
// logits (~1e-8) and a few float ulps in exp/log.
double hand_tol(DType dt) { return dt == DType::f64 ? 1e-14 : 1e-6; }

const double kLn2 = 0.6931471805599453;  // math.log(2)
const double kLn3 = 1.0986122886681098;  // math.log(3)
const double kLn4 = 1.3862943611198906;  // math.log(4)
const double kLn6 = 1.791759469228055;   // math.log(6)
const double kLn8 = 2.0794415416798357;  // math.log(8)

}  // namespace

// =============================================================================================
// Global average pool
// =============================================================================================

TEST(GlobalAvgPool, MatchesLoop) {
  const std::vector<Shape> shapes = {{2, 3, 5, 4}, {1, 1, 1, 1}, {3, 1, 1, 5}, {1, 7, 5, 1},
                                     {2, 4, 4, 3}, {1, 2, 9, 3}, {2, 7, 9, 1}};
  uint64_t seed = 1;
  for (DType dt : kFloatTypes) {
    for (const Shape& s : shapes) {
      const int64_t N = s[0], H = s[1], W = s[2], C = s[3];
      const Tensor x = randn(s, seed++, dt);
      const Tensor y = global_avg_pool(x);
      ASSERT_EQ(y.shape(), Shape({N, C})) << s.str();
      ASSERT_EQ(y.dtype(), dt);
      const std::vector<double> xv = values(x);
      std::vector<double> want(static_cast<size_t>(N * C), 0.0);
      for (int64_t n = 0; n < N; ++n)
        for (int64_t h = 0; h < H; ++h)
          for (int64_t w = 0; w < W; ++w)
            for (int64_t c = 0; c < C; ++c)
              want[n * C + c] += xv[((n * H + h) * W + w) * C + c] / static_cast<double>(H * W);
      // f32 may accumulate in float: up to H*W = 63 terms of order 1, ~63 * 6e-8 / 63 each.
      expect_close(tag("global_avg_pool " + s.str(), dt), values(y), want,
                   dt == DType::f64 ? 1e-14 : 1e-6, dt == DType::f64 ? 1e-13 : 1e-6);
    }
  }
}

TEST(GlobalAvgPool, BackwardSpreadsEvenly) {
  // L = sum(pool(x) * w)  =>  dL/dx[n, h, w, c] = w[n, c] / (H * W).
  for (DType dt : kFloatTypes) {
    const int64_t N = 2, H = 3, W = 5, C = 4;
    Tensor x = randn({N, H, W, C}, 20, dt);
    x.set_requires_grad(true);
    const Tensor wt = randn({N, C}, 21, dt);
    sum(mul(global_avg_pool(x), wt)).backward();
    ASSERT_TRUE(x.grad().defined());
    ASSERT_EQ(x.grad().shape(), x.shape());
    const std::vector<double> wv = values(wt);
    std::vector<double> want(static_cast<size_t>(N * H * W * C));
    for (int64_t n = 0; n < N; ++n)
      for (int64_t p = 0; p < H * W; ++p)
        for (int64_t c = 0; c < C; ++c) want[(n * H * W + p) * C + c] = wv[n * C + c] / (H * W);
    expect_close(tag("global_avg_pool dx", dt), values(x.grad()), want,
                 dt == DType::f64 ? 1e-15 : 1e-7, dt == DType::f64 ? 1e-14 : 1e-6);
  }
}

TEST(GlobalAvgPool, Gradcheck) {
  const std::vector<Shape> shapes = {{1, 3, 5, 2}, {2, 1, 1, 3}, {1, 1, 1, 1}, {2, 3, 3, 1}};
  uint64_t seed = 30;
  for (const Shape& s : shapes)
    expect_gradients_match("global_avg_pool " + s.str(),
                           [](const std::vector<Tensor>& v) { return global_avg_pool(v[0]); },
                           {leaf(s, seed++)});
}

TEST(GlobalAvgPool, RejectsRankOtherThan4) {
  expect_error([] { global_avg_pool(Tensor::zeros({2, 3, 4})); }, {"global_avg_pool", "[2, 3, 4]"});
  expect_error([] { global_avg_pool(Tensor::zeros({1, 2, 3, 4, 5})); },
               {"global_avg_pool", "[1, 2, 3, 4, 5]"});
  expect_error([] { global_avg_pool(Tensor::zeros({6})); }, {"global_avg_pool", "[6]"});
}

// =============================================================================================
// Cross-entropy, hard labels
// =============================================================================================

TEST(CrossEntropy, HandWorkedValues) {
  for (DType dt : kFloatTypes) {
    // Row [0, ln 2, ln 3]: exp = [1, 2, 3], sum 6, p = [1/6, 1/3, 1/2].
    //   label 2: -log(1/2) = ln 2;  label 0: -log(1/6) = ln 6;  label 1: -log(1/3) = ln 3.
    // Batch of the first two: mean (ln 2 + ln 6) / 2 = 1.2424533248940002.
    const std::vector<double> row = {0, kLn2, kLn3};
    const Tensor two = make({2, 3}, {0, kLn2, kLn3, 0, kLn2, kLn3}, dt);
    const Tensor loss = cross_entropy(two, labels_of({2, 0}));
    EXPECT_EQ(loss.numel(), 1);
    EXPECT_EQ(loss.dtype(), dt);
    // f32: ln 2 and ln 3 rounded to float move the loss by ~1e-8.
    EXPECT_NEAR(loss.item(), 1.2424533248940002, hand_tol(dt));
    EXPECT_NEAR(cross_entropy(make({1, 3}, row, dt), labels_of({1})).item(), kLn3,
                hand_tol(dt));
    // Row [0, 0, ln 2, ln 4]: exp = [1, 1, 2, 4], sum 8: label 3 -> ln 2, label 0 -> ln 8.
    const Tensor four = make({2, 4}, {0, 0, kLn2, kLn4, 0, 0, kLn2, kLn4}, dt);
    EXPECT_NEAR(cross_entropy(four, labels_of({3, 0})).item(), (kLn2 + kLn8) / 2,
                hand_tol(dt));
    // Equal logits: p = 1/K whatever the label: ln 5.
    EXPECT_NEAR(cross_entropy(Tensor::full({3, 5}, 2.5, dt), labels_of({0, 4, 2})).item(),
                std::log(5.0), hand_tol(dt));
    // One class: p = 1, loss 0.
    EXPECT_NEAR(cross_entropy(make({2, 1}, {3.0, -7.0}, dt), labels_of({0, 0})).item(), 0.0,
                1e-7);
  }
}

TEST(CrossEntropy, StableForLargeLogits) {
  for (DType dt : kFloatTypes) {
    // [1000, 1001]: p = [1/(1+e), e/(1+e)]; label 0 -> ln(1 + e) = 1.3132616875182228,
    // label 1 -> ln(1 + 1/e) = 0.31326168751822286. A naive exp overflows (exp(1000) = inf).
    const Tensor z = make({2, 2}, {1000, 1001, 1000, 1001}, dt);
    const double l0 = 1.3132616875182228, l1 = 0.31326168751822286;
    EXPECT_NEAR(cross_entropy(z, labels_of({0, 0})).item(), l0, 1e-6) << dtype_name(dt);
    EXPECT_NEAR(cross_entropy(z, labels_of({1, 1})).item(), l1, 1e-6) << dtype_name(dt);
    EXPECT_NEAR(cross_entropy(z, labels_of({0, 1})).item(), (l0 + l1) / 2, 1e-6) << dtype_name(dt);
    // Very negative logits: exp underflows to 0 for every class unless shifted by the max.
    const Tensor zn = make({1, 2}, {-1000, -1001}, dt);
    EXPECT_NEAR(cross_entropy(zn, labels_of({1})).item(), l0, 1e-6) << dtype_name(dt);
    // [1000, 0], label 1: p[1] = e^-1000 underflows to 0 in f32 and f64, but
    // -log_softmax = 1000 + log(1 + e^-1000) = 1000 exactly in floating point: the loss must
    // come from log-sum-exp, not from log(p).
    const Tensor far = make({1, 2}, {1000, 0}, dt);
    const double got = cross_entropy(far, labels_of({1})).item();
    EXPECT_TRUE(std::isfinite(got)) << dtype_name(dt) << " loss " << got;
    EXPECT_NEAR(got, 1000.0, 1e-4) << dtype_name(dt);

    // The gradient stays finite: (p - onehot) / N.
    Tensor zg = make({2, 2}, {1000, 1001, 1000, 0}, dt);
    zg.set_requires_grad(true);
    cross_entropy(zg, labels_of({0, 1})).backward();
    ASSERT_TRUE(zg.grad().defined());
    const double e = std::exp(1.0);
    expect_close(tag("cross_entropy grad, large logits", dt), values(zg.grad()),
                 {(1 / (1 + e) - 1) / 2, (e / (1 + e)) / 2, 1.0 / 2, -1.0 / 2}, 1e-7, 1e-6);
  }
}

TEST(CrossEntropy, LabelSmoothingHandWorked) {
  for (DType dt : kFloatTypes) {
    // K = 3, logits [0, ln 2, ln 3] (so -log p = [ln 6, ln 3, ln 2]), label 2, s = 0.1:
    // t = [s/3, s/3, 1 - s + s/3]; loss = (s/3)(ln 6 + ln 3) + (1 - 2s/3) ln 2
    //   = 0.7432830937858211 (Python).
    const Tensor z = make({1, 3}, {0, kLn2, kLn3}, dt);
    EXPECT_NEAR(cross_entropy(z, labels_of({2}), 0.1).item(), 0.7432830937858211,
                hand_tol(dt));
    // s = 0 is the plain loss.
    EXPECT_NEAR(cross_entropy(z, labels_of({2}), 0.0).item(), kLn2, hand_tol(dt));
    // Equal logits: every -log p = ln K, and the targets sum to 1: ln K for any s.
    EXPECT_NEAR(cross_entropy(Tensor::full({2, 4}, -1.0, dt), labels_of({1, 3}), 0.3).item(),
                kLn4, hand_tol(dt));
    // Large logits with smoothing: [1000, 0], label 0, s = 0.1: t = [0.95, 0.05],
    // -log p = [log(1 + e^-1000), 1000 + log(1 + e^-1000)] = [0, 1000] -> loss = 50. Smoothing
    // puts weight on the class whose p underflows, so log(p) = -inf would give inf.
    const double got = cross_entropy(make({1, 2}, {1000, 0}, dt), labels_of({0}), 0.1).item();
    EXPECT_TRUE(std::isfinite(got)) << dtype_name(dt) << " loss " << got;
    EXPECT_NEAR(got, 50.0, 1e-4) << dtype_name(dt);
  }
}

TEST(CrossEntropy, MatchesReferenceLoop) {
  struct Case { int64_t N, K; double s; };
  const std::vector<Case> cases = {{5, 7, 0.0}, {5, 7, 0.1}, {1, 10, 0.0}, {1, 10, 0.3},
                                   {4, 1, 0.2}, {9, 3, 0.05}, {2, 1000, 0.1}};
  uint64_t seed = 100;
  for (DType dt : kFloatTypes) {
    for (const Case& c : cases) {
      const Tensor z = randn({c.N, c.K}, seed++, dt, 3.0);
      const std::vector<int64_t> lab = random_labels(c.N, c.K, seed++);
      const double want = ce_ref(values(z), smoothed_targets(lab, c.K, c.s), c.N, c.K);
      const std::string what = tag("cross_entropy N=" + std::to_string(c.N) +
                                       " K=" + std::to_string(c.K) + " s=" + std::to_string(c.s),
                                   dt);
      expect_close(what, {cross_entropy(z, labels_of(lab), c.s).item()}, {want}, loss_atol(dt),
                   loss_rtol(dt));
    }
  }
}

TEST(CrossEntropy, IsMeanOverBatch) {
  // The loss of a batch is the mean of the losses of its rows taken one at a time.
  for (double s : {0.0, 0.2}) {
    const int64_t N = 5, K = 4;
    const Tensor z = randn({N, K}, 150, DType::f64, 2.0);
    const std::vector<int64_t> lab = random_labels(N, K, 151);
    const std::vector<double> zv = values(z);
    double mean = 0;
    for (int64_t n = 0; n < N; ++n) {
      const Tensor row = from_doubles({1, K}, std::vector<double>(zv.begin() + n * K, zv.begin() + (n + 1) * K));
      mean += cross_entropy(row, labels_of({lab[n]}), s).item() / N;
    }
    EXPECT_NEAR(cross_entropy(z, labels_of(lab), s).item(), mean, 1e-13) << "smoothing " << s;
  }
}

TEST(CrossEntropy, BackwardIsSoftmaxMinusTargetOverN) {
  uint64_t seed = 200;
  for (DType dt : kFloatTypes) {
    for (double s : {0.0, 0.1, 0.5}) {
      const int64_t N = 3, K = 5;
      Tensor z = randn({N, K}, seed++, dt, 2.0);
      z.set_requires_grad(true);
      const std::vector<int64_t> lab = random_labels(N, K, seed++);
      cross_entropy(z, labels_of(lab), s).backward();
      ASSERT_TRUE(z.grad().defined());
      ASSERT_EQ(z.grad().shape(), z.shape());
      expect_close(tag("cross_entropy dlogits s=" + std::to_string(s), dt), values(z.grad()),
                   ce_grad_ref(values(z), smoothed_targets(lab, K, s), N, K),
                   dt == DType::f64 ? 1e-15 : 1e-7, dt == DType::f64 ? 1e-12 : 1e-5);
    }
  }
}

TEST(CrossEntropy, Gradcheck) {
  struct Case { int64_t N, K; double s; };
  const std::vector<Case> cases = {{1, 3, 0.0}, {3, 5, 0.0}, {3, 5, 0.1}, {2, 4, 0.5},
                                   {1, 1, 0.0}, {1, 7, 0.3}};
  uint64_t seed = 300;
  for (const Case& c : cases) {
    const Tensor lab = labels_of(random_labels(c.N, c.K, seed++));
    const double s = c.s;
    expect_gradients_match(
        "cross_entropy N=" + std::to_string(c.N) + " K=" + std::to_string(c.K) +
            " s=" + std::to_string(c.s),
        [lab, s](const std::vector<Tensor>& v) { return cross_entropy(v[0], lab, s); },
        {leaf({c.N, c.K}, seed++, 2.0)});
  }
}

TEST(CrossEntropy, RejectsBadArguments) {
  const Tensor z = Tensor::zeros({2, 3});
  const Tensor lab = labels_of({0, 2});
  // logits rank != 2
  expect_error([&] { cross_entropy(Tensor::zeros({3}), labels_of({0})); }, {"cross_entropy", "[3]"});
  expect_error([&] { cross_entropy(Tensor::zeros({2, 3, 1}), lab); },
               {"cross_entropy", "[2, 3, 1]"});
  // labels of the wrong length or rank
  expect_error([&] { cross_entropy(z, labels_of({0, 1, 2})); }, {"cross_entropy", "labels", "[3]"});
  expect_error([&] { cross_entropy(z, labels_of({0})); }, {"cross_entropy", "labels", "[1]"});
  expect_error([&] { cross_entropy(z, Tensor::from_data<int64_t>({2, 1}, std::vector<int64_t>{0, 1})); },
               {"cross_entropy", "labels", "[2, 1]"});
  // labels not i64
  expect_error([&] { cross_entropy(z, Tensor::zeros({2})); }, {"cross_entropy", "labels", "f32"});
  expect_error([&] { cross_entropy(z, Tensor::from_data<int32_t>({2}, std::vector<int32_t>{0, 1})); },
               {"cross_entropy", "labels", "i32"});
  // a label outside [0, K)
  expect_error([&] { cross_entropy(z, labels_of({0, -1})); }, {"cross_entropy", "label", "-1"});
  expect_error([&] { cross_entropy(z, labels_of({3, 0})); }, {"cross_entropy", "label", "3"});
  expect_error([&] { cross_entropy(z, labels_of({0, 17})); }, {"cross_entropy", "label", "17"});
  // smoothing outside [0, 1)
  expect_error([&] { cross_entropy(z, lab, -0.1); }, {"cross_entropy", "-0.1"});
  expect_error([&] { cross_entropy(z, lab, 1.0); }, {"cross_entropy", "1"});
  expect_error([&] { cross_entropy(z, lab, 1.5); }, {"cross_entropy", "1.5"});
  // logits not floating
  expect_error([&] { cross_entropy(Tensor::zeros({2, 3}, DType::i64), lab); },
               {"cross_entropy", "i64"});
}

// =============================================================================================
// Cross-entropy, soft targets
// =============================================================================================

TEST(SoftCrossEntropy, HandWorkedValues) {
  for (DType dt : kFloatTypes) {
    // logits [0, ln 2, ln 3] -> -log p = [ln 6, ln 3, ln 2]; targets [0.2, 0.3, 0.5]:
    // 0.2 ln 6 + 0.3 ln 3 + 0.5 ln 2 = 1.0345091707260166 (Python).
    const Tensor z = make({1, 3}, {0, kLn2, kLn3}, dt);
    const Tensor t = make({1, 3}, {0.2, 0.3, 0.5}, dt);
    const Tensor loss = soft_cross_entropy(z, t);
    EXPECT_EQ(loss.numel(), 1);
    EXPECT_EQ(loss.dtype(), dt);
    EXPECT_NEAR(loss.item(), 1.0345091707260166, hand_tol(dt));
    // Two rows, the second with targets [1, 0, 0] (ln 6): mean of the two.
    const Tensor z2 = make({2, 3}, {0, kLn2, kLn3, 0, kLn2, kLn3}, dt);
    const Tensor t2 = make({2, 3}, {0.2, 0.3, 0.5, 1, 0, 0}, dt);
    EXPECT_NEAR(soft_cross_entropy(z2, t2).item(), (1.0345091707260166 + kLn6) / 2,
                hand_tol(dt));
    // Targets that do not sum to 1 are taken as they are: 2 * [0, 0, 1] -> 2 ln 2.
    EXPECT_NEAR(soft_cross_entropy(z, make({1, 3}, {0, 0, 2}, dt)).item(), 2 * kLn2,
                hand_tol(dt));
  }
}

TEST(SoftCrossEntropy, OneHotAndSmoothedTargetsMatchHardLabels) {
  const int64_t N = 4, K = 6;
  for (DType dt : kFloatTypes) {
    const Tensor z = randn({N, K}, 400, dt, 2.0);
    const std::vector<int64_t> lab = random_labels(N, K, 401);
    for (double s : {0.0, 0.1, 0.4}) {
      const Tensor t = make({N, K}, smoothed_targets(lab, K, s), dt);
      expect_close(tag("soft(onehot smoothed) vs hard s=" + std::to_string(s), dt),
                   {soft_cross_entropy(z, t).item()}, {cross_entropy(z, labels_of(lab), s).item()},
                   loss_atol(dt), loss_rtol(dt));
    }
  }
}

TEST(SoftCrossEntropy, MatchesReferenceLoop) {
  struct Case { int64_t N, K; bool normalised; };
  const std::vector<Case> cases = {{5, 7, true}, {1, 10, true}, {3, 4, false}, {1, 1, true},
                                   {2, 1000, true}};
  uint64_t seed = 500;
  for (DType dt : kFloatTypes) {
    for (const Case& c : cases) {
      const Tensor z = randn({c.N, c.K}, seed++, dt, 3.0);
      const Tensor tt = make({c.N, c.K}, random_targets(c.N, c.K, seed++, c.normalised), dt);
      const double want = ce_ref(values(z), values(tt), c.N, c.K);
      expect_close(tag("soft_cross_entropy N=" + std::to_string(c.N) + " K=" + std::to_string(c.K), dt),
                   {soft_cross_entropy(z, tt).item()}, {want}, loss_atol(dt), loss_rtol(dt));
    }
  }
}

TEST(SoftCrossEntropy, StableForLargeLogits) {
  for (DType dt : kFloatTypes) {
    // [1000, 0, -1000] -> -log p = [~0, 1000, 2000]; targets [0.5, 0.25, 0.25]:
    // 0.25 * 1000 + 0.25 * 2000 = 750 (p[1], p[2] underflow: needs log-sum-exp).
    const double got =
        soft_cross_entropy(make({1, 3}, {1000, 0, -1000}, dt), make({1, 3}, {0.5, 0.25, 0.25}, dt))
            .item();
    EXPECT_TRUE(std::isfinite(got)) << dtype_name(dt) << " loss " << got;
    EXPECT_NEAR(got, 750.0, 1e-3) << dtype_name(dt);
    // [1000, 1001] with targets [0.5, 0.5]: 0.5 (ln(1+e) + ln(1+1/e)).
    EXPECT_NEAR(soft_cross_entropy(make({1, 2}, {1000, 1001}, dt), make({1, 2}, {0.5, 0.5}, dt)).item(),
                0.5 * (1.3132616875182228 + 0.31326168751822286), 1e-6)
        << dtype_name(dt);
  }
}

TEST(SoftCrossEntropy, BackwardMatchesFormula) {
  uint64_t seed = 600;
  for (DType dt : kFloatTypes) {
    for (bool normalised : {true, false}) {
      const int64_t N = 3, K = 4;
      Tensor z = randn({N, K}, seed++, dt, 2.0);
      z.set_requires_grad(true);
      const Tensor tt = make({N, K}, random_targets(N, K, seed++, normalised), dt);
      soft_cross_entropy(z, tt).backward();
      ASSERT_TRUE(z.grad().defined());
      expect_close(tag(std::string("soft_cross_entropy dlogits ") + (normalised ? "" : "un") + "normalised", dt),
                   values(z.grad()), ce_grad_ref(values(z), values(tt), N, K),
                   dt == DType::f64 ? 1e-15 : 1e-7, dt == DType::f64 ? 1e-12 : 1e-5);
    }
  }
}

TEST(SoftCrossEntropy, Gradcheck) {
  struct Case { int64_t N, K; bool normalised; };
  const std::vector<Case> cases = {{1, 3, true}, {3, 5, true}, {2, 4, false}, {1, 1, true}};
  uint64_t seed = 700;
  for (const Case& c : cases) {
    const Tensor targets = from_doubles({c.N, c.K}, random_targets(c.N, c.K, seed++, c.normalised));
    expect_gradients_match(
        "soft_cross_entropy N=" + std::to_string(c.N) + " K=" + std::to_string(c.K),
        [targets](const std::vector<Tensor>& v) { return soft_cross_entropy(v[0], targets); },
        {leaf({c.N, c.K}, seed++, 2.0)});
  }
}

TEST(SoftCrossEntropy, TargetsAreConstant) {
  // ops.h documents no gradient for the targets. Accepted: targets that require grad are
  // rejected with a cnx::Error, or they get no gradient. A gradient, if one is given anyway,
  // must at least be the right one: d loss / d t[n, k] = -log_softmax(z)[n, k] / N.
  const int64_t N = 2, K = 3;
  Tensor z = randn({N, K}, 800, DType::f64);
  z.set_requires_grad(true);
  Tensor t = from_doubles({N, K}, {0.2, 0.3, 0.5, 0.6, 0.4, 0.0});
  t.set_requires_grad(true);
  Tensor loss;
  try {
    loss = soft_cross_entropy(z, t);
  } catch (const Error& e) {
    SUCCEED() << "rejected: " << e.what();
    EXPECT_NE(std::string(e.what()).find("soft_cross_entropy"), std::string::npos) << e.what();
    return;
  }
  loss.backward();
  ASSERT_TRUE(z.grad().defined()) << "the logits got no gradient";
  expect_close("soft_cross_entropy dlogits with targets requiring grad", values(z.grad()),
               ce_grad_ref(values(z), values(t), N, K), 1e-15, 1e-12);
  if (t.grad().defined()) {
    ADD_FAILURE() << "soft_cross_entropy gave the (constant) targets a gradient; ops.h documents "
                     "none";
    std::vector<double> want = log_softmax_ref(values(z), N, K);
    for (double& v : want) v = -v / N;
    expect_close("soft_cross_entropy dtargets", values(t.grad()), want, 1e-15, 1e-12);
  }
}

TEST(SoftCrossEntropy, RejectsBadArguments) {
  const Tensor z = Tensor::zeros({2, 3});
  expect_error([&] { soft_cross_entropy(z, Tensor::zeros({2, 4})); },
               {"soft_cross_entropy", "[2, 4]"});
  expect_error([&] { soft_cross_entropy(z, Tensor::zeros({3, 2})); },
               {"soft_cross_entropy", "[3, 2]"});
  expect_error([&] { soft_cross_entropy(z, Tensor::zeros({6})); }, {"soft_cross_entropy", "[6]"});
  expect_error([&] { soft_cross_entropy(Tensor::zeros({3}), Tensor::zeros({3})); },
               {"soft_cross_entropy", "[3]"});
  expect_error([&] { soft_cross_entropy(Tensor::zeros({2, 3, 1}), Tensor::zeros({2, 3, 1})); },
               {"soft_cross_entropy", "[2, 3, 1]"});
  expect_error([&] { soft_cross_entropy(z, Tensor::zeros({2, 3}, DType::f64)); },
               {"soft_cross_entropy", "f32", "f64"});
  expect_error([&] { soft_cross_entropy(Tensor::zeros({2, 3}, DType::i64), Tensor::zeros({2, 3}, DType::i64)); },
               {"soft_cross_entropy", "i64"});
}
