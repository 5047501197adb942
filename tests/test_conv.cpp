// Tests of the two convolutions of ConvNeXt: patchify_conv (k x k, stride k, no padding: the
// stem and the downsampling layers) and dwconv (depthwise, odd k, padding k/2).
//
// The forward reference here is deliberately unlike the implementation: it works in NCHW with
// the official PyTorch weight layouts ((Co, Ci, k, k) for patchify, (C, 1, k, k) for dwconv),
// on an explicitly zero-padded copy of the input, as one general strided, grouped convolution
// accumulated in long double. The tests transpose NHWC -> NCHW, convert the weights to the
// op's layouts ((Co, k, k, Ci) and (k, k, C)), and transpose the result back: a mistake in
// the op's layout convention shows up as a mismatch.
//
// Backward is checked against central finite differences in double (tests/testing.h).
#include <gtest/gtest.h>

#include <cmath>
#include <string>
#include <vector>

#include "autograd/function.h"
#include "autograd/ops.h"
#include "tests/testing.h"

using namespace cnx;
using namespace cnx::test;

namespace {

// ---- the reference: NCHW, official weight layouts ------------------------------------------

std::vector<double> nhwc_to_nchw(const std::vector<double>& v, int64_t N, int64_t H, int64_t W,
                                 int64_t C) {
  std::vector<double> r(v.size());
  for (int64_t n = 0; n < N; ++n)
    for (int64_t h = 0; h < H; ++h)
      for (int64_t w = 0; w < W; ++w)
        for (int64_t c = 0; c < C; ++c)
          r[static_cast<size_t>(((n * C + c) * H + h) * W + w)] =
              v[static_cast<size_t>(((n * H + h) * W + w) * C + c)];
  return r;
}

std::vector<double> nchw_to_nhwc(const std::vector<double>& v, int64_t N, int64_t C, int64_t H,
                                 int64_t W) {
  std::vector<double> r(v.size());
  for (int64_t n = 0; n < N; ++n)
    for (int64_t c = 0; c < C; ++c)
      for (int64_t h = 0; h < H; ++h)
        for (int64_t w = 0; w < W; ++w)
          r[static_cast<size_t>(((n * H + h) * W + w) * C + c)] =
              v[static_cast<size_t>(((n * C + c) * H + h) * W + w)];
  return r;
}

// A zero-padded copy of an NCHW tensor: (N, C, H + 2 pad, W + 2 pad).
std::vector<double> zero_pad_nchw(const std::vector<double>& v, int64_t N, int64_t C, int64_t H,
                                  int64_t W, int64_t pad) {
  const int64_t Hp = H + 2 * pad, Wp = W + 2 * pad;
  std::vector<double> r(static_cast<size_t>(N * C * Hp * Wp), 0.0);
  for (int64_t nc = 0; nc < N * C; ++nc)
    for (int64_t h = 0; h < H; ++h)
      for (int64_t w = 0; w < W; ++w)
        r[static_cast<size_t>((nc * Hp + h + pad) * Wp + w + pad)] =
            v[static_cast<size_t>((nc * H + h) * W + w)];
  return r;
}

struct ConvResult {
  std::vector<double> out;  // (N, Co, Ho, Wo)
  std::vector<double> mag;  // sum of |terms| per output element
  int64_t Ho = 0, Wo = 0;
};

// A general "valid" convolution (cross-correlation, as in PyTorch) in NCHW with groups:
// x (N, Ci, H, W), w (Co, Ci / groups, k, k), bias (Co) or empty, stride s.
// out[n, o, i, j] = bias[o] + sum_{c, p, q} x[n, g*Cig + c, i*s + p, j*s + q] * w[o, c, p, q]
// with g = o / (Co / groups). Accumulates in long double.
ConvResult conv2d_nchw(const std::vector<double>& x, const std::vector<double>& w,
                       const std::vector<double>& bias, int64_t N, int64_t Ci, int64_t H,
                       int64_t W, int64_t Co, int64_t k, int64_t s, int64_t groups) {
  ConvResult r;
  r.Ho = (H - k) / s + 1;
  r.Wo = (W - k) / s + 1;
  const int64_t Cig = Ci / groups, Cog = Co / groups;
  r.out.assign(static_cast<size_t>(N * Co * r.Ho * r.Wo), 0.0);
  r.mag = r.out;
  for (int64_t n = 0; n < N; ++n)
    for (int64_t o = 0; o < Co; ++o) {
      const int64_t g = o / Cog;
      for (int64_t i = 0; i < r.Ho; ++i)
        for (int64_t j = 0; j < r.Wo; ++j) {
          long double acc = bias.empty() ? 0.0L : bias[static_cast<size_t>(o)];
          long double mag = bias.empty() ? 0.0L : std::abs(bias[static_cast<size_t>(o)]);
          for (int64_t c = 0; c < Cig; ++c)
            for (int64_t p = 0; p < k; ++p)
              for (int64_t q = 0; q < k; ++q) {
                const long double a =
                    x[static_cast<size_t>(((n * Ci + g * Cig + c) * H + i * s + p) * W + j * s + q)];
                const long double b = w[static_cast<size_t>(((o * Cig + c) * k + p) * k + q)];
                acc += a * b;
                mag += std::abs(a * b);
              }
          const size_t at = static_cast<size_t>(((n * Co + o) * r.Ho + i) * r.Wo + j);
          r.out[at] = static_cast<double>(acc);
          r.mag[at] = static_cast<double>(mag);
        }
    }
  return r;
}

// (Co, Ci, k, k) -> (Co, k, k, Ci): the official patchify weight to the op's layout.
std::vector<double> oihw_to_ohwi(const std::vector<double>& w, int64_t Co, int64_t Ci, int64_t k) {
  std::vector<double> r(w.size());
  for (int64_t o = 0; o < Co; ++o)
    for (int64_t c = 0; c < Ci; ++c)
      for (int64_t p = 0; p < k; ++p)
        for (int64_t q = 0; q < k; ++q)
          r[static_cast<size_t>(((o * k + p) * k + q) * Ci + c)] =
              w[static_cast<size_t>(((o * Ci + c) * k + p) * k + q)];
  return r;
}

// (C, 1, k, k) -> (k, k, C): the official depthwise weight to the op's layout.
std::vector<double> c1kk_to_kkc(const std::vector<double>& w, int64_t C, int64_t k) {
  std::vector<double> r(w.size());
  for (int64_t c = 0; c < C; ++c)
    for (int64_t p = 0; p < k; ++p)
      for (int64_t q = 0; q < k; ++q)
        r[static_cast<size_t>((p * k + q) * C + c)] = w[static_cast<size_t>((c * k + p) * k + q)];
  return r;
}

// ---- one forward comparison per op ---------------------------------------------------------

// patchify_conv on x (N, H, W, Ci) against the NCHW reference, in f32 and f64.
void check_patchify_forward(int64_t N, int64_t H, int64_t W, int64_t Ci, int64_t Co, int64_t k,
                            bool with_bias, uint64_t seed) {
  Generator gen(seed);
  const std::vector<double> x = randv(N * H * W * Ci, gen);
  const std::vector<double> w_oihw = randv(Co * Ci * k * k, gen);
  const std::vector<double> b = with_bias ? randv(Co, gen) : std::vector<double>{};

  const ConvResult ref = conv2d_nchw(nhwc_to_nchw(x, N, H, W, Ci), w_oihw, b, N, Ci, H, W, Co,
                                     k, /*stride=*/k, /*groups=*/1);
  ASSERT_EQ(ref.Ho, H / k);
  ASSERT_EQ(ref.Wo, W / k);
  const std::vector<double> want = nchw_to_nhwc(ref.out, N, Co, ref.Ho, ref.Wo);
  const std::vector<double> mag = nchw_to_nhwc(ref.mag, N, Co, ref.Ho, ref.Wo);

  for (DType dt : {DType::f32, DType::f64}) {
    const std::string what = "patchify_conv " + dname(dt) + " N" + std::to_string(N) + " H" +
                             std::to_string(H) + " W" + std::to_string(W) + " Ci" +
                             std::to_string(Ci) + " Co" + std::to_string(Co) + " k" +
                             std::to_string(k) + (with_bias ? " bias" : " no bias");
    const Tensor xt = make({N, H, W, Ci}, x, dt);
    const Tensor wt = make({Co, k, k, Ci}, oihw_to_ohwi(w_oihw, Co, Ci, k), dt);
    const Tensor bt = with_bias ? make({Co}, b, dt) : Tensor();
    const Tensor y = patchify_conv(xt, wt, bt);
    EXPECT_EQ(y.shape(), Shape({N, H / k, W / k, Co})) << what;
    EXPECT_EQ(y.dtype(), dt) << what;
    if (y.shape() != Shape({N, H / k, W / k, Co})) continue;
    expect_close_mag(what, values(y), want, mag, fwd_tol(dt));
  }
}

// dwconv on x (N, H, W, C) against the reference on a zero-padded NCHW copy, in f32 and f64.
void check_dwconv_forward(int64_t N, int64_t H, int64_t W, int64_t C, int64_t k, bool with_bias,
                          uint64_t seed) {
  Generator gen(seed);
  const std::vector<double> x = randv(N * H * W * C, gen);
  const std::vector<double> w_c1kk = randv(C * k * k, gen);
  const std::vector<double> b = with_bias ? randv(C, gen) : std::vector<double>{};

  const int64_t pad = k / 2;
  const std::vector<double> xp = zero_pad_nchw(nhwc_to_nchw(x, N, H, W, C), N, C, H, W, pad);
  const ConvResult ref = conv2d_nchw(xp, w_c1kk, b, N, C, H + 2 * pad, W + 2 * pad, C, k,
                                     /*stride=*/1, /*groups=*/C);
  ASSERT_EQ(ref.Ho, H);
  ASSERT_EQ(ref.Wo, W);
  const std::vector<double> want = nchw_to_nhwc(ref.out, N, C, H, W);
  const std::vector<double> mag = nchw_to_nhwc(ref.mag, N, C, H, W);

  for (DType dt : {DType::f32, DType::f64}) {
    const std::string what = "dwconv " + dname(dt) + " N" + std::to_string(N) + " H" +
                             std::to_string(H) + " W" + std::to_string(W) + " C" +
                             std::to_string(C) + " k" + std::to_string(k) +
                             (with_bias ? " bias" : " no bias");
    const Tensor xt = make({N, H, W, C}, x, dt);
    const Tensor wt = make({k, k, C}, c1kk_to_kkc(w_c1kk, C, k), dt);
    const Tensor bt = with_bias ? make({C}, b, dt) : Tensor();
    const Tensor y = dwconv(xt, wt, bt);
    EXPECT_EQ(y.shape(), Shape({N, H, W, C})) << what;
    EXPECT_EQ(y.dtype(), dt) << what;
    if (y.shape() != Shape({N, H, W, C})) continue;
    expect_close_mag(what, values(y), want, mag, fwd_tol(dt));
  }
}

}  // namespace

// =============================================================================================
// Patchify
// =============================================================================================

// A hand-worked case: one 4x4 single-channel image, k = 2, two output channels.
TEST(Patchify, HandComputed) {
  // in[h, w] = 4h + w:
  //    0  1  2  3
  //    4  5  6  7
  //    8  9 10 11
  //   12 13 14 15
  // Output channel 0, kernel [[1, 0], [0, 0]]: the top-left of each 2x2 patch, 0 2 / 8 10,
  //   plus bias 0.5 -> 0.5 2.5 / 8.5 10.5.
  // Output channel 1, kernel [[1, 2], [3, 4]]: for a patch whose top-left value is b,
  //   b + 2(b + 1) + 3(b + 4) + 4(b + 5) = 10b + 34 -> 34 54 / 114 134, plus bias -1
  //   -> 33 53 / 113 133.
  std::vector<double> x(16);
  for (int i = 0; i < 16; ++i) x[static_cast<size_t>(i)] = i;
  // (Co, k, k, Ci) with Ci = 1 is just the two kernels one after the other.
  const std::vector<double> w = {1, 0, 0, 0, 1, 2, 3, 4};
  const std::vector<double> b = {0.5, -1};
  const std::vector<double> want = {0.5, 33, 2.5, 53, 8.5, 113, 10.5, 133};  // (1, 2, 2, 2)
  for (DType dt : {DType::f32, DType::f64}) {
    const Tensor y = patchify_conv(make({1, 4, 4, 1}, x, dt), make({2, 2, 2, 1}, w, dt),
                                   make({2}, b, dt));
    ASSERT_EQ(y.shape(), Shape({1, 2, 2, 2}));
    expect_close("patchify hand " + dname(dt), values(y), want, 0, 0);  // small integers: exact
  }
}

// Two input channels pin down the (p, q, c) order inside the weight's last three dimensions.
TEST(Patchify, HandComputedTwoChannels) {
  // One 2x2 patch with two channels: x[h, w, c] stored NHWC as
  //   (0,0): 1, 10   (0,1): 2, 20   (1,0): 3, 30   (1,1): 4, 40
  // weight (1, 2, 2, 2) [p][q][c]: 1, 0 | 0, 0 | 0, 0 | 0, 1, i.e. channel 0 at (0,0) plus
  // channel 1 at (1,1): 1 + 40 = 41. No bias.
  const std::vector<double> x = {1, 10, 2, 20, 3, 30, 4, 40};
  const std::vector<double> w = {1, 0, 0, 0, 0, 0, 0, 1};
  const Tensor y = patchify_conv(make({1, 2, 2, 2}, x, DType::f64), make({1, 2, 2, 2}, w, DType::f64), {});
  ASSERT_EQ(y.shape(), Shape({1, 1, 1, 1}));
  EXPECT_EQ(values(y)[0], 41.0);
}

TEST(Patchify, ForwardMatchesNchwReferenceK4) {
  check_patchify_forward(2, 8, 12, 3, 5, 4, true, 1);
  check_patchify_forward(1, 8, 8, 3, 4, 4, false, 2);
  check_patchify_forward(1, 9, 11, 3, 5, 4, true, 3);   // 9x11 -> 2x2, last rows/cols ignored
  check_patchify_forward(3, 7, 4, 1, 1, 4, true, 4);    // Ci = Co = 1
  check_patchify_forward(1, 4, 4, 5, 7, 4, true, 5);    // a single patch
}

TEST(Patchify, ForwardMatchesNchwReferenceK2) {
  check_patchify_forward(1, 9, 9, 3, 4, 2, true, 11);   // 9x9 -> 4x4, as in PyTorch
  check_patchify_forward(2, 5, 7, 1, 3, 2, false, 12);  // odd H, W, batch 2
  check_patchify_forward(2, 6, 6, 7, 5, 2, true, 13);   // odd channel counts
  check_patchify_forward(1, 2, 3, 3, 2, 2, false, 14);  // 2x3 -> 1x1
}

TEST(Patchify, ForwardMatchesNchwReferenceOtherK) {
  check_patchify_forward(2, 7, 8, 2, 3, 3, true, 21);   // k = 3
  check_patchify_forward(1, 3, 5, 4, 3, 1, true, 22);   // k = 1 is a plain linear layer
}

// The rows and columns past Ho*k, Wo*k take no part: changing them changes nothing, and their
// input gradient is exactly 0 (while every other input element gets a gradient).
TEST(Patchify, IgnoredRowsAndColumnsGetZeroGradient) {
  const int64_t N = 2, H = 9, W = 9, Ci = 3, Co = 4, k = 2;
  for (DType dt : {DType::f32, DType::f64}) {
    Generator gen(31);
    const std::vector<double> xv = randv(N * H * W * Ci, gen);
    Tensor x = make({N, H, W, Ci}, xv, dt).set_requires_grad(true);
    Tensor w = make({Co, k, k, Ci}, randv(Co * k * k * Ci, gen), dt).set_requires_grad(true);
    Tensor b = make({Co}, randv(Co, gen), dt);
    Tensor y = patchify_conv(x, w, b);
    ASSERT_EQ(y.shape(), Shape({N, 4, 4, Co}));
    const Tensor R = make(y.shape(), randv(y.numel(), gen), dt);
    sum(mul(y, R)).backward();
    ASSERT_TRUE(x.grad().defined());
    const std::vector<double> g = values(x.grad());
    int64_t nonzero_ignored = 0, zero_used = 0;
    for (int64_t n = 0; n < N; ++n)
      for (int64_t h = 0; h < H; ++h)
        for (int64_t ww = 0; ww < W; ++ww)
          for (int64_t c = 0; c < Ci; ++c) {
            const double v = g[static_cast<size_t>(((n * H + h) * W + ww) * Ci + c)];
            if (h == 8 || ww == 8) nonzero_ignored += v != 0.0;
            else zero_used += v == 0.0;
          }
    EXPECT_EQ(nonzero_ignored, 0) << dname(dt) << ": the ignored last row/column got a gradient";
    EXPECT_EQ(zero_used, 0) << dname(dt) << ": an input inside the patches got no gradient";

    // The output does not depend on the ignored row and column.
    std::vector<double> xv2 = xv;
    for (int64_t n = 0; n < N; ++n)
      for (int64_t h = 0; h < H; ++h)
        for (int64_t ww = 0; ww < W; ++ww)
          if (h == 8 || ww == 8)
            for (int64_t c = 0; c < Ci; ++c) xv2[static_cast<size_t>(((n * H + h) * W + ww) * Ci + c)] = 1e3;
    NoGradGuard no_grad;
    expect_close("patchify ignores the last row/column " + dname(dt),
                 values(patchify_conv(make({N, H, W, Ci}, xv2, dt), w, b)), values(y), 0, 0);
  }
}

TEST(Patchify, GradientsMatchFiniteDifferences) {
  auto f = [](const std::vector<Tensor>& v) { return patchify_conv(v[0], v[1], v[2]); };
  {
    Generator gen(41);  // batch 1, odd H, W, Ci, Co; k = 2 with a leftover row and column
    expect_gradients_match("patchify k2 1x5x5x3 -> Co3",
                           f, {leaf({1, 5, 5, 3}, gen), leaf({3, 2, 2, 3}, gen), leaf({3}, gen)});
  }
  {
    Generator gen(42);  // k = 4, batch 2, 9x6 -> 2x1
    expect_gradients_match("patchify k4 2x9x6x1 -> Co5",
                           f, {leaf({2, 9, 6, 1}, gen), leaf({5, 4, 4, 1}, gen), leaf({5}, gen)});
  }
  {
    Generator gen(43);  // no bias
    expect_gradients_match("patchify k2 no bias 2x4x3x5 -> Co1",
                           f, {leaf({2, 4, 3, 5}, gen), leaf({1, 2, 2, 5}, gen), Tensor()});
  }
}

// The stem and a block's first op chained: gradients flow through an intermediate tensor
// (not a leaf) into patchify's weight and bias, with and without the image requiring grad.
TEST(Patchify, ChainIntoDwconvGradients) {
  auto f = [](const std::vector<Tensor>& v) {
    return dwconv(patchify_conv(v[0], v[1], v[2]), v[3], v[4]);
  };
  {
    Generator gen(44);
    Tensor image = from_doubles({1, 6, 9, 2}, randv(6 * 9 * 2, gen));  // no grad, as an image
    expect_gradients_match("patchify -> dwconv, image without grad", f,
                           {image, leaf({3, 2, 2, 2}, gen), leaf({3}, gen), leaf({3, 3, 3}, gen),
                            leaf({3}, gen)});
  }
  {
    Generator gen(45);
    expect_gradients_match("patchify -> dwconv, all with grad", f,
                           {leaf({2, 5, 4, 3}, gen), leaf({3, 2, 2, 3}, gen), Tensor(),
                            leaf({5, 5, 3}, gen), Tensor()});
  }
}

TEST(Patchify, F32BackwardMatchesF64) {
  // The op with its three tensor arguments (its optional bf16 weight left out).
  const test::Op3 op3 = [](const Tensor& x, const Tensor& w, const Tensor& b) { return patchify_conv(x, w, b); };
  check_f32_backward_matches_f64("patchify k2", op3, {2, 9, 7, 3}, {5, 2, 2, 3}, {5}, 51,
                                 /*check_grad_shapes=*/false);
  check_f32_backward_matches_f64("patchify k4", op3, {1, 8, 12, 3}, {6, 4, 4, 3}, {6}, 52,
                                 /*check_grad_shapes=*/false);
}

// Only the inputs that require grad get a .grad, and the gradient they get is the same as when
// everything requires grad.
TEST(Patchify, OnlyRequestedGradients) {
  // x (1, 5, 7, 3), weight (2, 2, 2, 3), bias (2); R of the output's shape (1, 2, 3, 2).
  check_only_requested_gradients(
      "patchify", [](const std::vector<Tensor>& t) { return patchify_conv(t[0], t[1], t[2]); },
      {1, 5, 7, 3}, {2, 2, 2, 3}, {2}, 61);
}

TEST(Patchify, NoGradModeRecordsNothing) {
  Generator gen(62);
  Tensor x = leaf({1, 4, 4, 2}, gen), w = leaf({3, 2, 2, 2}, gen), b = leaf({3}, gen);
  NoGradGuard no_grad;
  const Tensor y = patchify_conv(x, w, b);
  EXPECT_FALSE(y.requires_grad());
  EXPECT_EQ(y.grad_fn(), nullptr);
}

TEST(Patchify, BadInput) {
  const Tensor x = Tensor::zeros({2, 8, 8, 3});
  const Tensor w = Tensor::zeros({5, 4, 4, 3});
  const Tensor b = Tensor::zeros({5});
  // Sanity: the good arguments work.
  EXPECT_EQ(patchify_conv(x, w, b).shape(), Shape({2, 2, 2, 5}));

  // x of the wrong rank.
  expect_error([&] { patchify_conv(Tensor::zeros({8, 8, 3}), w, b); }, {"patchify_conv", "[8, 8, 3]"});
  // weight of the wrong rank.
  expect_error([&] { patchify_conv(x, Tensor::zeros({5, 16, 3}), b); }, {"patchify_conv", "[5, 16, 3]"});
  // weight with the wrong number of input channels.
  expect_error([&] { patchify_conv(x, Tensor::zeros({5, 4, 4, 2}), b); },
               {"patchify_conv", "[5, 4, 4, 2]", "[2, 8, 8, 3]"});
  // a non-square kernel.
  expect_error([&] { patchify_conv(x, Tensor::zeros({5, 4, 2, 3}), b); }, {"patchify_conv", "[5, 4, 2, 3]"});
  // bias of the wrong length or rank.
  expect_error([&] { patchify_conv(x, w, Tensor::zeros({4})); }, {"patchify_conv", "[4]", "[5, 4, 4, 3]"});
  expect_error([&] { patchify_conv(x, w, Tensor::zeros({1, 5})); }, {"patchify_conv", "[1, 5]"});
  // mixed dtypes.
  expect_error([&] { patchify_conv(x, Tensor::zeros({5, 4, 4, 3}, DType::f64), b); },
               {"patchify_conv", "f64[5, 4, 4, 3]", "f32[2, 8, 8, 3]"});
  expect_error([&] { patchify_conv(x, w, Tensor::zeros({5}, DType::f64)); },
               {"patchify_conv", "f64[5]"});
  // a non-floating x.
  expect_error([&] { patchify_conv(Tensor::zeros({2, 8, 8, 3}, DType::i64), w, b); },
               {"patchify_conv", "i64[2, 8, 8, 3]"});
  // undefined x or weight.
  expect_error([&] { patchify_conv(Tensor(), w, b); }, {"patchify_conv"});
  expect_error([&] { patchify_conv(x, Tensor(), b); }, {"patchify_conv"});
  // a kernel larger than the image: the output would be empty (3 / 4 = 0 rows).
  expect_error([&] { patchify_conv(Tensor::zeros({1, 3, 8, 3}), w, b); },
               {"patchify_conv", "[1, 3, 8, 3]", "[5, 4, 4, 3]"});
  expect_error([&] { patchify_conv(Tensor::zeros({1, 8, 2, 3}), w, b); },
               {"patchify_conv", "[1, 8, 2, 3]", "[5, 4, 4, 3]"});
}

// =============================================================================================
// Dwconv
// =============================================================================================

// A hand-worked case: a 3x3 image, k = 3, two channels.
TEST(Dwconv, HandComputed) {
  // Channel 0: in = 1 2 3 / 4 5 6 / 7 8 9 and the kernel
  //     0 10  0
  //     0  0  1
  //     0  0  0
  // so out[h, w] = in[h, w + 1] + 10 in[h - 1, w] (cross-correlation, zeros outside):
  //   in[h, w+1]   = 2 3 0 / 5 6 0 / 8 9 0
  //   10 in[h-1,w] = 0 0 0 / 10 20 30 / 40 50 60
  //   plus bias 0.5 -> 2.5 3.5 0.5 / 15.5 26.5 30.5 / 48.5 59.5 60.5
  // Channel 1: in all ones, kernel all ones: the number of taps inside the image (4 at a
  //   corner, 6 at an edge, 9 in the middle), plus bias -1 -> 3 5 3 / 5 8 5 / 3 5 3.
  const std::vector<double> in0 = {1, 2, 3, 4, 5, 6, 7, 8, 9};
  const std::vector<double> k0 = {0, 10, 0, 0, 0, 1, 0, 0, 0};
  const std::vector<double> out0 = {2.5, 3.5, 0.5, 15.5, 26.5, 30.5, 48.5, 59.5, 60.5};
  const std::vector<double> out1 = {3, 5, 3, 5, 8, 5, 3, 5, 3};
  std::vector<double> x, w, want;
  for (int i = 0; i < 9; ++i) {  // interleave the channels: NHWC and (k, k, C)
    x.insert(x.end(), {in0[static_cast<size_t>(i)], 1.0});
    w.insert(w.end(), {k0[static_cast<size_t>(i)], 1.0});
    want.insert(want.end(), {out0[static_cast<size_t>(i)], out1[static_cast<size_t>(i)]});
  }
  for (DType dt : {DType::f32, DType::f64}) {
    const Tensor y = dwconv(make({1, 3, 3, 2}, x, dt), make({3, 3, 2}, w, dt),
                            make({2}, {0.5, -1}, dt));
    ASSERT_EQ(y.shape(), Shape({1, 3, 3, 2}));
    expect_close("dwconv hand " + dname(dt), values(y), want, 0, 0);  // exact in binary
  }
}

// A 1x1 image with k = 7: only the centre tap sees the pixel.
TEST(Dwconv, SinglePixelUsesCentreTap) {
  // x = 2 (C = 1); weight 7x7 with tap (p, q) = 10 p + q, centre (3, 3) = 33 -> 66, + bias 1.
  std::vector<double> w(49);
  for (int p = 0; p < 7; ++p)
    for (int q = 0; q < 7; ++q) w[static_cast<size_t>(p * 7 + q)] = 10 * p + q;
  const Tensor y = dwconv(make({1, 1, 1, 1}, {2}, DType::f64), make({7, 7, 1}, w, DType::f64),
                          make({1}, {1}, DType::f64));
  ASSERT_EQ(y.shape(), Shape({1, 1, 1, 1}));
  EXPECT_EQ(values(y)[0], 67.0);
}

TEST(Dwconv, ForwardMatchesPaddedNchwReferenceEveryK) {
  uint64_t seed = 100;
  for (int64_t k : {3, 5, 7, 9, 11}) {
    SCOPED_TRACE("k = " + std::to_string(k));
    check_dwconv_forward(1, 9, 7, 3, k, true, seed++);    // batch 1, odd H, W, C
    check_dwconv_forward(2, 5, 6, 5, k, false, seed++);   // batch 2, no bias
    check_dwconv_forward(2, 2, 3, 5, k, true, seed++);    // smaller than the kernel (k >= 5)
    check_dwconv_forward(1, 1, 1, 4, k, true, seed++);    // a single pixel
    check_dwconv_forward(3, 12, 13, 1, k, true, seed++);  // C = 1, larger than the kernel
  }
}

TEST(Dwconv, ForwardMatchesReferenceConvNeXtLikeShape) {
  check_dwconv_forward(2, 14, 14, 24, 7, true, 150);
}

TEST(Dwconv, GradientsMatchFiniteDifferences) {
  auto f = [](const std::vector<Tensor>& v) { return dwconv(v[0], v[1], v[2]); };
  {
    Generator gen(201);  // k = 3, batch 1, odd H, W, C
    expect_gradients_match("dwconv k3 1x3x5x3",
                           f, {leaf({1, 3, 5, 3}, gen), leaf({3, 3, 3}, gen), leaf({3}, gen)});
  }
  {
    Generator gen(202);  // k = 7, image smaller than the kernel, batch 2
    expect_gradients_match("dwconv k7 2x2x3x2",
                           f, {leaf({2, 2, 3, 2}, gen), leaf({7, 7, 2}, gen), leaf({2}, gen)});
  }
  {
    Generator gen(203);  // k = 5, no bias, C = 1
    expect_gradients_match("dwconv k5 no bias 1x5x4x1",
                           f, {leaf({1, 5, 4, 1}, gen), leaf({5, 5, 1}, gen), Tensor()});
  }
  {
    Generator gen(204);  // k = 11 on 1x1: only the centre tap has a gradient
    expect_gradients_match("dwconv k11 1x1x1x2",
                           f, {leaf({1, 1, 1, 2}, gen), leaf({11, 11, 2}, gen), leaf({2}, gen)});
  }
  {
    Generator gen(205);  // k = 9, a larger image so that interior taps exist
    expect_gradients_match("dwconv k9 1x10x9x1",
                           f, {leaf({1, 10, 9, 1}, gen), leaf({9, 9, 1}, gen), leaf({1}, gen)});
  }
}

TEST(Dwconv, F32BackwardMatchesF64) {
  check_f32_backward_matches_f64("dwconv k7", dwconv, {2, 9, 8, 5}, {7, 7, 5}, {5}, 211,
                                 /*check_grad_shapes=*/false);
  check_f32_backward_matches_f64("dwconv k3", dwconv, {1, 4, 3, 7}, {3, 3, 7}, {7}, 212,
                                 /*check_grad_shapes=*/false);
}

TEST(Dwconv, OnlyRequestedGradients) {
  // x (1, 3, 5, 3), weight (3, 3, 3), bias (3); R of the output's (= x's) shape.
  check_only_requested_gradients(
      "dwconv", [](const std::vector<Tensor>& t) { return dwconv(t[0], t[1], t[2]); },
      {1, 3, 5, 3}, {3, 3, 3}, {3}, 221);
}

// Gradients accumulate (+=) into a leaf used twice.
TEST(Dwconv, GradientAccumulatesOverTwoUses) {
  Generator gen(231);
  Tensor x = leaf({1, 4, 5, 2}, gen), w = leaf({3, 3, 2}, gen), b = leaf({2}, gen);
  sum(dwconv(x, w, b)).backward();
  const std::vector<double> gw1 = values(w.grad()), gx1 = values(x.grad());
  w.set_grad({});
  x.set_grad({});
  sum(add(dwconv(x, w, b), dwconv(x, w, b))).backward();
  std::vector<double> gw2 = gw1, gx2 = gx1;
  for (double& g : gw2) g *= 2;
  for (double& g : gx2) g *= 2;
  expect_close("dwconv twice: dweight", values(w.grad()), gw2, 1e-13, 1e-13);
  expect_close("dwconv twice: dx", values(x.grad()), gx2, 1e-13, 1e-13);
}

TEST(Dwconv, NoGradModeRecordsNothing) {
  Generator gen(232);
  Tensor x = leaf({1, 4, 4, 2}, gen), w = leaf({3, 3, 2}, gen), b = leaf({2}, gen);
  NoGradGuard no_grad;
  const Tensor y = dwconv(x, w, b);
  EXPECT_FALSE(y.requires_grad());
  EXPECT_EQ(y.grad_fn(), nullptr);
}

TEST(Dwconv, BadInput) {
  const Tensor x = Tensor::zeros({2, 5, 5, 3});
  const Tensor w = Tensor::zeros({7, 7, 3});
  const Tensor b = Tensor::zeros({3});
  EXPECT_EQ(dwconv(x, w, b).shape(), Shape({2, 5, 5, 3}));  // sanity: the good arguments work

  // x of the wrong rank.
  expect_error([&] { dwconv(Tensor::zeros({5, 5, 3}), w, b); }, {"dwconv", "[5, 5, 3]"});
  expect_error([&] { dwconv(Tensor::zeros({1, 2, 5, 5, 3}), w, b); }, {"dwconv", "[1, 2, 5, 5, 3]"});
  // weight of the wrong rank (the official (C, 1, k, k) layout is not accepted as is).
  expect_error([&] { dwconv(x, Tensor::zeros({3, 1, 7, 7}), b); }, {"dwconv", "[3, 1, 7, 7]"});
  // weight with the wrong channel count.
  expect_error([&] { dwconv(x, Tensor::zeros({7, 7, 4}), b); }, {"dwconv", "[7, 7, 4]", "[2, 5, 5, 3]"});
  // even and non-square kernels.
  expect_error([&] { dwconv(x, Tensor::zeros({4, 4, 3}), b); }, {"dwconv", "[4, 4, 3]"});
  expect_error([&] { dwconv(x, Tensor::zeros({2, 2, 3}), b); }, {"dwconv", "[2, 2, 3]"});
  expect_error([&] { dwconv(x, Tensor::zeros({3, 5, 3}), b); }, {"dwconv", "[3, 5, 3]"});
  // bias of the wrong length.
  expect_error([&] { dwconv(x, w, Tensor::zeros({4})); }, {"dwconv", "[4]"});
  // mixed dtypes.
  expect_error([&] { dwconv(x, Tensor::zeros({7, 7, 3}, DType::f64), b); },
               {"dwconv", "f64[7, 7, 3]", "f32[2, 5, 5, 3]"});
  expect_error([&] { dwconv(Tensor::zeros({2, 5, 5, 3}, DType::f64), Tensor::zeros({7, 7, 3}, DType::f64), b); },
               {"dwconv", "f32[3]"});
  // a non-floating x.
  expect_error([&] { dwconv(Tensor::zeros({2, 5, 5, 3}, DType::i32), w, b); }, {"dwconv", "i32[2, 5, 5, 3]"});
  // undefined x or weight.
  expect_error([&] { dwconv(Tensor(), w, b); }, {"dwconv"});
  expect_error([&] { dwconv(x, Tensor(), b); }, {"dwconv"});
}
