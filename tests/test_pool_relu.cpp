// relu and max_pool2d (autograd/ops.h; kernels/relu.h, kernels/maxpool.h), the two layers of
// ResNet's stem and blocks that ConvNeXt's roadmap starts from, on the CPU.
//
// Forwards and backwards are compared with independent references written here: relu by its
// definition, max pooling through an explicit -inf-padded copy of the input and a naive
// "first maximum" search per window, its gradient by a scatter to the argmax found there. Both
// ops are checked against central finite differences in double (inputs away from relu's kink
// and without ties in a window), for the tie and NaN rules (first maximum of a window gets the
// gradient; NaN propagates), over odd sizes, kernels 1, 2, 3, strides 1, 2, 3, padding 0 and 1;
// bf16 gives exactly the f32 results (there is no arithmetic but the gradient sums, which bf16
// rounds once); bad arguments throw errors naming the op and the shapes.
#include <gtest/gtest.h>

#include <algorithm>
#include <bit>
#include <cmath>
#include <cstdint>
#include <limits>
#include <sstream>
#include <string>
#include <vector>

#include "autograd/function.h"
#include "autograd/ops.h"
#include "kernels/maxpool.h"
#include "kernels/relu.h"
#include "tests/testing.h"

using namespace cnx;
using namespace cnx::test;

namespace {

const double kNaN = std::numeric_limits<double>::quiet_NaN();
const double kInf = std::numeric_limits<double>::infinity();

// The gradient of sum(op(x) * R) with respect to x, through autograd (f32 or f64 x).
Tensor grad_through(const std::function<Tensor(const Tensor&)>& op, const Tensor& x_in,
                    const Tensor& R) {
  Tensor x = x_in.detach().clone();
  x.set_requires_grad(true);
  sum(mul(op(x), R)).backward();
  return x.grad();
}

// Equal as doubles (so -0 == +0), NaN equal to NaN.
void expect_same(const std::string& what, const std::vector<double>& got,
                 const std::vector<double>& want) {
  ASSERT_EQ(got.size(), want.size()) << what;
  int64_t bad = 0;
  for (size_t i = 0; i < got.size(); ++i) {
    const bool same = (std::isnan(got[i]) && std::isnan(want[i])) || got[i] == want[i];
    if (!same && bad++ < 5)
      ADD_FAILURE() << what << ": element " << i << " is " << got[i] << ", want " << want[i];
  }
  EXPECT_EQ(bad, 0) << what << ": " << bad << " of " << got.size() << " elements differ";
}

// ---- max pooling: the independent reference ----------------------------------------------------
struct Pool {
  int64_t N, H, W, C, k, s, p;
  int64_t Ho() const { return (H + 2 * p - k) / s + 1; }
  int64_t Wo() const { return (W + 2 * p - k) / s + 1; }
  Shape in() const { return Shape{N, H, W, C}; }
  Shape out() const { return Shape{N, Ho(), Wo(), C}; }
  std::string str() const {
    std::ostringstream os;
    os << "x (" << N << ", " << H << ", " << W << ", " << C << ") k" << k << " s" << s << " p"
       << p;
    return os.str();
  }
};

// The naive pooling: the input copied into a (N, H + 2p, W + 2p, C) array of -inf, then every
// window's first maximum (strict >, NaN wins), as the position (h, w) in the input.
struct NaiveResult {
  std::vector<double> out;
  std::vector<int64_t> h, w;  // the winner of each output, input coordinates
};

NaiveResult naive_pool(const Pool& q, const std::vector<double>& x) {
  const int64_t Hp = q.H + 2 * q.p, Wp = q.W + 2 * q.p;
  std::vector<double> padded(static_cast<size_t>(q.N * Hp * Wp * q.C), -kInf);
  std::vector<bool> real(padded.size(), false);
  for (int64_t n = 0; n < q.N; ++n)
    for (int64_t h = 0; h < q.H; ++h)
      for (int64_t w = 0; w < q.W; ++w)
        for (int64_t c = 0; c < q.C; ++c) {
          const size_t j = static_cast<size_t>(((n * Hp + h + q.p) * Wp + w + q.p) * q.C + c);
          padded[j] = x[static_cast<size_t>(((n * q.H + h) * q.W + w) * q.C + c)];
          real[j] = true;
        }
  NaiveResult r;
  for (int64_t n = 0; n < q.N; ++n)
    for (int64_t oh = 0; oh < q.Ho(); ++oh)
      for (int64_t ow = 0; ow < q.Wo(); ++ow)
        for (int64_t c = 0; c < q.C; ++c) {
          double best = -kInf;
          int64_t bh = -1, bw = -1;
          for (int64_t i = 0; i < q.k; ++i)
            for (int64_t j = 0; j < q.k; ++j) {
              const int64_t ph = oh * q.s + i, pw = ow * q.s + j;
              const size_t at = static_cast<size_t>(((n * Hp + ph) * Wp + pw) * q.C + c);
              if (!real[at]) continue;  // a padded cell never wins
              if (bh < 0) bh = ph, bw = pw;  // the first real cell, for a window of -infs
              if (padded[at] > best || std::isnan(padded[at])) {
                best = padded[at];
                bh = ph;
                bw = pw;
              }
            }
          r.out.push_back(best);
          r.h.push_back(bh - q.p);
          r.w.push_back(bw - q.p);
        }
  return r;
}

// din of the naive pooling: dout scattered to each output's winner.
std::vector<double> naive_pool_grad(const Pool& q, const NaiveResult& r,
                                    const std::vector<double>& dout) {
  std::vector<double> din(static_cast<size_t>(q.N * q.H * q.W * q.C), 0.0);
  size_t o = 0;
  for (int64_t n = 0; n < q.N; ++n)
    for (int64_t oh = 0; oh < q.Ho(); ++oh)
      for (int64_t ow = 0; ow < q.Wo(); ++ow)
        for (int64_t c = 0; c < q.C; ++c, ++o)
          din[static_cast<size_t>(((n * q.H + r.h[o]) * q.W + r.w[o]) * q.C + c)] += dout[o];
  return din;
}

// Normal values without ties (continuous draws, rounded through float).
std::vector<double> untied(int64_t n, uint64_t seed) {
  Generator gen(seed);
  return randv(n, gen);
}

// The shapes of the forward and backward sweeps: 1x1, 2x2, 5x7, a 112x112 stem-like map, with
// kernels 1 to 3, strides 1 to 3 and padding 0 and 1.
const Pool kPools[] = {
    {1, 1, 1, 1, 1, 1, 0}, {2, 1, 1, 3, 1, 1, 0}, {1, 2, 2, 3, 2, 1, 0}, {1, 2, 2, 3, 2, 2, 1},
    {1, 2, 2, 2, 2, 2, 0}, {1, 2, 2, 1, 3, 1, 1}, {2, 5, 7, 3, 3, 2, 1}, {2, 5, 7, 4, 3, 1, 1},
    {2, 5, 7, 5, 2, 2, 0}, {1, 7, 5, 2, 3, 1, 0}, {1, 5, 7, 2, 2, 1, 1}, {3, 7, 5, 1, 3, 3, 1},
    {1, 5, 7, 3, 3, 3, 0}, {1, 1, 5, 2, 2, 1, 1}, {2, 112, 112, 3, 3, 2, 1},
    {1, 113, 111, 2, 2, 2, 0}};

}  // namespace

// ================================ relu ================================
TEST(Relu, ForwardIsMaxWithZeroInEveryDtype) {
  const std::vector<double> x = {-2.5, -1e-30, -0.0, 0.0, 1e-30, 0.75, 3.0, kInf, -kInf, kNaN};
  for (DType dt : {DType::f32, DType::f64, DType::bf16}) {
    const Tensor xt = make(Shape{10}, x, dt);
    const Tensor y = relu(xt);
    EXPECT_EQ(y.dtype(), dt);
    EXPECT_EQ(y.shape(), Shape{10});
    std::vector<double> want = values(xt);  // x as stored in dt
    for (double& v : want) v = v > 0 || std::isnan(v) ? v : 0.0;
    EXPECT_EQ(want[4] > 0, true) << "1e-30 is a positive " << dname(dt);
    expect_same(tag("relu forward", dt), values(y), want);
    // -0 and 0 both give +0.
    for (int i : {2, 3}) EXPECT_FALSE(std::signbit(values(y)[i])) << tag("relu(-0)", dt);
  }
}

TEST(Relu, GradientIsZeroWhereInputIsNotPositive) {
  // x <= 0 (including -0 and -inf): 0; x > 0: dout; NaN (NaN <= 0 is false): dout, as
  // PyTorch's threshold_backward.
  const std::vector<double> x = {-2.5, -0.0, 0.0, 1e-3, 4.0, -kInf, kInf, kNaN};
  const std::vector<double> R = {1.5, 2.0, -3.0, 0.25, -4.0, 5.0, 6.0, 7.0};
  const std::vector<double> want = {0, 0, 0, 0.25, -4.0, 0, 6.0, 7.0};
  for (DType dt : {DType::f32, DType::f64}) {
    const Tensor g = grad_through([](const Tensor& t) { return relu(t); }, make(Shape{8}, x, dt),
                                  make(Shape{8}, R, dt));
    ASSERT_TRUE(g.defined());
    EXPECT_EQ(g.dtype(), dt);
    expect_same(tag("relu backward", dt), values(g), want);
  }
  // The bf16 kernel directly (autograd's mul and sum in bf16 are not what is tested here).
  std::vector<bf16> y(x.size()), dy(x.size()), dx(x.size()), bx(x.size());
  for (size_t i = 0; i < x.size(); ++i) bx[i] = bf16(static_cast<float>(x[i]));
  for (size_t i = 0; i < x.size(); ++i) dy[i] = bf16(static_cast<float>(R[i]));
  cpu::relu_forward<bf16>(y.data(), bx.data(), 8);
  cpu::relu_backward<bf16>(dx.data(), dy.data(), y.data(), 8);
  std::vector<double> got;
  for (bf16 v : dx) got.push_back(static_cast<float>(v));
  expect_same("relu backward bf16", got, want);
}

TEST(Relu, GradientMatchesFiniteDifferences) {
  for (const Shape& s : {Shape{1}, Shape{7}, Shape{2, 3, 5}, Shape{2, 5, 7, 3}}) {
    Generator gen(11 + s.numel());
    std::vector<double> v = randv(s.numel(), gen);
    for (double& e : v) e = e < 0 ? e - 0.1 : e + 0.1;  // away from the kink at 0
    Tensor x = from_doubles(s, v);
    x.set_requires_grad(true);
    expect_gradients_match("relu " + s.str(),
                           [](const std::vector<Tensor>& in) { return relu(in[0]); }, {x});
  }
}

TEST(Relu, Bf16MatchesF32Exactly) {
  // Inputs representable in bf16: relu's bf16 and f32 results are then the same numbers.
  const Shape s{3, 5, 7, 11};
  Tensor x32 = randn(s, 21, DType::f32).to(DType::bf16).to(DType::f32);
  Tensor r32 = randn(s, 22, DType::f32).to(DType::bf16).to(DType::f32);
  const Tensor y16 = relu(x32.to(DType::bf16)), y32 = relu(x32);
  expect_same("relu forward bf16 vs f32", values(y16), values(y32));
  std::vector<bf16> dx(static_cast<size_t>(s.numel()));
  const Tensor r16 = r32.to(DType::bf16);
  cpu::relu_backward<bf16>(dx.data(), r16.data<bf16>(), y16.data<bf16>(), s.numel());
  std::vector<double> got;
  for (bf16 v : dx) got.push_back(static_cast<float>(v));
  expect_same("relu backward bf16 vs f32",
              got, values(grad_through([](const Tensor& t) { return relu(t); }, x32, r32)));
}

TEST(Relu, InPlaceKernelCallsAreAllowed) {
  // kernels/relu.h: out may be in, din may dout.
  std::vector<float> v = {-1.f, 2.f, 0.f, 3.f};
  cpu::relu_forward<float>(v.data(), v.data(), 4);
  EXPECT_EQ(v, (std::vector<float>{0.f, 2.f, 0.f, 3.f}));
  std::vector<float> d = {5.f, 6.f, 7.f, 8.f};
  cpu::relu_backward<float>(d.data(), d.data(), v.data(), 4);
  EXPECT_EQ(d, (std::vector<float>{0.f, 6.f, 0.f, 8.f}));
}

TEST(Relu, RejectsNonFloatingInput) {
  expect_error([] { relu(Tensor::zeros(Shape{2, 3}, DType::i64)); }, {"relu", "x", "i64[2, 3]"});
  expect_error([] { relu(Tensor()); }, {"relu", "undefined"});
}

// ================================ max_pool2d ================================
TEST(MaxPool2d, OutputSizeFormula) {
  EXPECT_EQ(maxpool2d_out_size(224, 3, 2, 1), 112);  // ResNet's stem... after its conv: 112 -> 56
  EXPECT_EQ(maxpool2d_out_size(112, 3, 2, 1), 56);
  EXPECT_EQ(maxpool2d_out_size(7, 2, 2, 0), 3);
  EXPECT_EQ(maxpool2d_out_size(5, 3, 1, 1), 5);
  EXPECT_EQ(maxpool2d_out_size(1, 1, 1, 0), 1);
  const Tensor y = max_pool2d(Tensor::zeros(Shape{2, 112, 112, 4}), 3, 2, 1);
  EXPECT_EQ(y.shape(), (Shape{2, 56, 56, 4}));
}

TEST(MaxPool2d, ForwardMatchesNaivePaddedPooling) {
  uint64_t seed = 100;
  for (const Pool& q : kPools)
    for (DType dt : {DType::f32, DType::f64}) {
      const std::vector<double> x = untied(q.N * q.H * q.W * q.C, seed++);
      const Tensor y = max_pool2d(make(q.in(), x, dt), q.k, q.s, q.p);
      ASSERT_EQ(y.shape(), q.out()) << q.str();
      ASSERT_EQ(y.dtype(), dt);
      expect_same(tag("max_pool2d forward " + q.str(), dt), values(y), naive_pool(q, x).out);
    }
}

TEST(MaxPool2d, BackwardMatchesNaiveScatterToTheMaximum) {
  uint64_t seed = 300;
  for (const Pool& q : kPools)
    for (DType dt : {DType::f32, DType::f64}) {
      const std::vector<double> x = untied(q.N * q.H * q.W * q.C, seed++);
      // dout: small integers, so that sums of several are exact in f32 and comparable exactly.
      Generator gen(seed++);
      std::vector<double> dout(static_cast<size_t>(q.out().numel()));
      for (double& d : dout) d = static_cast<double>(static_cast<int>(gen.next_u32() % 17) - 8);
      const Tensor g = grad_through([&](const Tensor& t) { return max_pool2d(t, q.k, q.s, q.p); },
                                    make(q.in(), x, dt), make(q.out(), dout, dt));
      ASSERT_TRUE(g.defined());
      ASSERT_EQ(g.shape(), q.in());
      expect_same(tag("max_pool2d backward " + q.str(), dt), values(g),
                  naive_pool_grad(q, naive_pool(q, x), dout));
    }
}

TEST(MaxPool2d, GradientMatchesFiniteDifferences) {
  // Random normal inputs have no ties; the central difference (eps 1e-6) never moves a maximum
  // past a neighbour (gaps are ~1e-2 at these sizes).
  const Pool pools[] = {{1, 1, 1, 1, 1, 1, 0}, {1, 2, 2, 2, 2, 1, 0}, {2, 5, 7, 3, 3, 2, 1},
                        {1, 5, 5, 2, 3, 1, 1}, {1, 4, 6, 2, 2, 2, 0}, {1, 7, 5, 1, 3, 3, 1}};
  uint64_t seed = 500;
  for (const Pool& q : pools) {
    Tensor x = from_doubles(q.in(), untied(q.N * q.H * q.W * q.C, seed++));
    x.set_requires_grad(true);
    expect_gradients_match("max_pool2d " + q.str(),
                           [&](const std::vector<Tensor>& in) {
                             return max_pool2d(in[0], q.k, q.s, q.p);
                           },
                           {x});
  }
}

TEST(MaxPool2d, TiesSendTheGradientToTheFirstMaximum) {
  // All equal: every window's first cell inside the image wins. 4x4, k 2, s 2: the top-left of
  // each 2x2 block; k 3, s 2, p 1: windows start at rows/cols -1, 1, so cells 0 and 1.
  for (DType dt : {DType::f32, DType::f64}) {
    {
      const Pool q{1, 4, 4, 1, 2, 2, 0};
      const Tensor g = grad_through([&](const Tensor& t) { return max_pool2d(t, 2, 2, 0); },
                                    Tensor::full(q.in(), 1.5, dt), Tensor::ones(q.out(), dt));
      const std::vector<double> want = {1, 0, 1, 0, 0, 0, 0, 0, 1, 0, 1, 0, 0, 0, 0, 0};
      expect_same(tag("all equal, k2 s2", dt), values(g), want);
    }
    {
      const Pool q{1, 4, 4, 1, 3, 2, 1};
      const std::vector<double> R = {1, 2, 3, 4};
      const Tensor g = grad_through([&](const Tensor& t) { return max_pool2d(t, 3, 2, 1); },
                                    Tensor::full(q.in(), -2.0, dt), make(q.out(), R, dt));
      // Output (0,0) window rows -1..1 -> first cell (0,0); (0,1) cols 1..3 -> (0,1);
      // (1,0) -> (1,0); (1,1) -> (1,1).
      const std::vector<double> want = {1, 2, 0, 0, 3, 4, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0};
      expect_same(tag("all equal, k3 s2 p1", dt), values(g), want);
    }
    {
      // A tie between a later and an earlier cell of one window: the earlier (row-major) wins.
      const std::vector<double> x = {0, 5, 5, 1};  // 2x2, one window
      const Tensor g = grad_through([&](const Tensor& t) { return max_pool2d(t, 2, 1, 0); },
                                    make(Shape{1, 2, 2, 1}, x, dt),
                                    Tensor::ones(Shape{1, 1, 1, 1}, dt));
      expect_same(tag("tie in one window", dt), values(g), {0, 1, 0, 0});
    }
    {
      // Overlapping windows that pick the same cell: its gradient is their sum.
      const std::vector<double> x = {9, 1, 2, 3, 4, 5, 6, 7, 8};  // 3x3, k 2, s 1, p 1
      const Tensor g = grad_through([&](const Tensor& t) { return max_pool2d(t, 2, 1, 1); },
                                    make(Shape{1, 3, 3, 1}, x, dt),
                                    Tensor::ones(Shape{1, 4, 4, 1}, dt));
      // k 2, s 1, p 1 on 3x3: 4x4 outputs; the 9 at (0,0) is in windows (0,0), (0,1), (1,0),
      // (1,1) and wins all four; 8 at (2,2) wins (2,2), (2,3), (3,2), (3,3); and so on.
      const NaiveResult r = naive_pool({1, 3, 3, 1, 2, 1, 1}, x);
      expect_same(tag("overlapping windows", dt), values(g),
                  naive_pool_grad({1, 3, 3, 1, 2, 1, 1}, r, std::vector<double>(16, 1.0)));
      EXPECT_EQ(values(g)[0], 4.0) << "the 9 wins four windows";
    }
  }
}

TEST(MaxPool2d, NanPropagatesAndInfinitiesAreValues) {
  for (DType dt : {DType::f32, DType::f64, DType::bf16}) {
    // 4x4, k 2, s 2: window (0,0) has a NaN, window (0,1) two NaNs, window (1,0) -inf only,
    // window (1,1) +inf and ordinary values.
    const std::vector<double> x = {1,    kNaN,  kNaN,  2,
                                   3,    4,     5,     kNaN,
                                   -kInf, -kInf, 6,    kInf,
                                   -kInf, -kInf, 7,    8};
    const Tensor y = max_pool2d(make(Shape{1, 4, 4, 1}, x, dt), 2, 2, 0);
    expect_same(tag("NaN and inf forward", dt), values(y), {kNaN, kNaN, -kInf, kInf});
    if (dt == DType::bf16) continue;
    const Tensor g = grad_through([&](const Tensor& t) { return max_pool2d(t, 2, 2, 0); },
                                  make(Shape{1, 4, 4, 1}, x, dt),
                                  make(Shape{1, 2, 2, 1}, {1, 10, 100, 1000}, dt));
    // (0,0): the NaN; (0,1): the LAST NaN (isnan replaces again); (1,0): the first -inf;
    // (1,1): the +inf.
    expect_same(tag("NaN and inf backward", dt), values(g),
                {0, 1, 0, 0, 0, 0, 0, 10, 100, 0, 0, 1000, 0, 0, 0, 0});
    // The naive reference agrees.
    expect_same(tag("NaN naive", dt), values(g),
                naive_pool_grad({1, 4, 4, 1, 2, 2, 0}, naive_pool({1, 4, 4, 1, 2, 2, 0}, x),
                                {1, 10, 100, 1000}));
  }
}

TEST(MaxPool2d, Bf16MatchesF32Exactly) {
  // Values representable in bf16: the forward selects one, so bf16 and f32 agree exactly, and
  // so do the argmaxes; the gradient sums are rounded once to bf16 from the fp32 sum, so bf16's
  // din is exactly bf16(f32's din).
  const Pool pools[] = {{2, 5, 7, 3, 3, 2, 1}, {1, 9, 9, 16, 3, 1, 1}, {2, 8, 6, 8, 2, 2, 0},
                        {1, 112, 112, 2, 3, 2, 1}};
  uint64_t seed = 700;
  for (const Pool& q : pools) {
    SCOPED_TRACE(q.str());
    const Tensor x32 = randn(q.in(), seed++, DType::f32).to(DType::bf16).to(DType::f32);
    const Tensor r32 = randn(q.out(), seed++, DType::f32).to(DType::bf16).to(DType::f32);
    const Tensor x16 = x32.to(DType::bf16), r16 = r32.to(DType::bf16);
    std::vector<float> y32(static_cast<size_t>(q.out().numel()));
    std::vector<bf16> y16(y32.size());
    std::vector<int32_t> a32(y32.size()), a16(y32.size());
    cpu::maxpool2d_forward<float>(y32.data(), a32.data(), x32.data<float>(), q.N, q.H, q.W, q.C,
                                  q.k, q.s, q.p);
    cpu::maxpool2d_forward<bf16>(y16.data(), a16.data(), x16.data<bf16>(), q.N, q.H, q.W, q.C,
                                 q.k, q.s, q.p);
    EXPECT_EQ(a16, a32) << "argmax";
    for (size_t i = 0; i < y32.size(); ++i)
      ASSERT_EQ(static_cast<float>(y16[i]), y32[i]) << "forward element " << i;
    std::vector<float> d32(static_cast<size_t>(q.in().numel()));
    std::vector<bf16> d16(d32.size());
    cpu::maxpool2d_backward<float>(d32.data(), r32.data<float>(), a32.data(), q.N, q.H, q.W, q.C,
                                   q.k, q.s, q.p);
    cpu::maxpool2d_backward<bf16>(d16.data(), r16.data<bf16>(), a16.data(), q.N, q.H, q.W, q.C,
                                  q.k, q.s, q.p);
    for (size_t i = 0; i < d32.size(); ++i)
      ASSERT_EQ(d16[i].bits, bf16(d32[i]).bits) << "backward element " << i;
    // Through autograd too (bf16 x): same forward.
    expect_same("autograd bf16 forward", values(max_pool2d(x16, q.k, q.s, q.p)),
                values(max_pool2d(x32, q.k, q.s, q.p)));
  }
}

TEST(MaxPool2d, ArgmaxIsTheCellWithinTheWindow) {
  // kernels/maxpool.h: argmax = (h - h0) k + (w - w0). 3x3 input, k 3, s 1, p 1 (3x3 output):
  // the maximum 9 at (1,1) is cell (1 - (oh - 1)) * 3 + (1 - (ow - 1)) of window (oh, ow).
  const std::vector<float> x = {1, 2, 3, 4, 9, 5, 6, 7, 8};
  std::vector<float> y(9);
  std::vector<int32_t> a(9);
  cpu::maxpool2d_forward<float>(y.data(), a.data(), x.data(), 1, 3, 3, 1, 3, 1, 1);
  EXPECT_EQ(a, (std::vector<int32_t>{8, 7, 6, 5, 4, 3, 2, 1, 0}));
  EXPECT_EQ(y, std::vector<float>(9, 9.f));
  // A null argmax (inference) is allowed and changes nothing else.
  std::vector<float> y2(9);
  cpu::maxpool2d_forward<float>(y2.data(), nullptr, x.data(), 1, 3, 3, 1, 3, 1, 1);
  EXPECT_EQ(y2, y);
}

TEST(MaxPool2d, WithoutGradRecordsNothingAndGivesTheSameOutput) {
  Tensor x = randn(Shape{2, 9, 9, 3}, 800, DType::f32);
  x.set_requires_grad(true);
  const Tensor with = max_pool2d(x, 3, 2, 1);
  EXPECT_TRUE(with.requires_grad());
  Tensor without;
  {
    NoGradGuard no_grad;
    without = max_pool2d(x, 3, 2, 1);
  }
  EXPECT_FALSE(without.requires_grad());
  EXPECT_EQ(values(with), values(without));
}

TEST(MaxPool2d, EmptyBatchOrChannels) {
  for (const Shape& s : {Shape{0, 5, 5, 3}, Shape{2, 5, 5, 0}}) {
    Tensor x = Tensor::zeros(s);
    x.set_requires_grad(true);
    const Tensor y = max_pool2d(x, 3, 2, 1);
    EXPECT_EQ(y.shape(), (Shape{s[0], 3, 3, s[3]}));
    sum(y).backward();
    ASSERT_TRUE(x.grad().defined());
    EXPECT_EQ(x.grad().shape(), s);
  }
}

TEST(MaxPool2d, RejectsBadArguments) {
  const Tensor x = Tensor::zeros(Shape{2, 5, 7, 3});
  expect_error([&] { max_pool2d(x, 0, 1, 0); }, {"max_pool2d", "kernel size 0", ">= 1"});
  expect_error([&] { max_pool2d(x, 3, 0, 1); }, {"max_pool2d", "stride 0", ">= 1"});
  expect_error([&] { max_pool2d(x, 3, -2, 1); }, {"max_pool2d", "stride -2"});
  expect_error([&] { max_pool2d(x, 3, 2, 2); },
               {"max_pool2d", "padding 2", "half the kernel size 3"});
  expect_error([&] { max_pool2d(x, 2, 2, -1); }, {"max_pool2d", "padding -1"});
  expect_error([&] { max_pool2d(x, 1, 1, 1); }, {"max_pool2d", "padding 1"});
  expect_error([&] { max_pool2d(x, 6, 1, 0); },
               {"max_pool2d", "f32[2, 5, 7, 3]", "too small for kernel 6", "padding 0"});
  expect_error([&] { max_pool2d(Tensor::zeros(Shape{1, 0, 4, 2}), 1, 1, 0); },
               {"max_pool2d", "f32[1, 0, 4, 2]", "too small"});
  expect_error([&] { max_pool2d(Tensor::zeros(Shape{1, 2, 9, 2}), 5, 1, 1); },
               {"max_pool2d", "too small for kernel 5"});
  expect_error([&] { max_pool2d(Tensor::zeros(Shape{5, 7, 3}), 3, 2, 1); },
               {"max_pool2d", "x", "f32[5, 7, 3]", "rank 4"});
  expect_error([&] { max_pool2d(Tensor::zeros(Shape{1, 5, 7, 3}, DType::i32), 3, 2, 1); },
               {"max_pool2d", "i32[1, 5, 7, 3]"});
  expect_error([&] { max_pool2d(x, 100000, 1, 0); }, {"max_pool2d", "kernel size 100000"});
  expect_error([&] { max_pool2d(x, 3, int64_t{1} << 31, 1); }, {"max_pool2d", "stride 2147483648"});
  // With the largest legal padding every input of at least 1 x 1 is big enough.
  EXPECT_EQ(max_pool2d(Tensor::zeros(Shape{1, 1, 1, 2}), 5, 1, 2).shape(), (Shape{1, 1, 1, 2}));
  EXPECT_EQ(max_pool2d(Tensor::zeros(Shape{1, 1, 2, 2}), 4, 3, 2).shape(), (Shape{1, 1, 1, 2}));
}
