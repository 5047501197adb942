// conv2d (kernels/conv2d.h, autograd/ops/conv2d.cpp) on the CPU.
//
// The reference here is deliberately unlike the implementation: it works in NCHW with the
// official PyTorch weight layout (Co, Ci / groups, kh, kw) on an explicitly zero-padded copy of
// the input, in long double, and its backward is the scatter form (every product's gradient
// added to the input element it read), where the op's din is a gather. The tests transpose
// NHWC <-> NCHW and convert the weight to the op's (Co, kh, kw, Ci / groups): a mistake in the
// layout convention shows up as a mismatch.
//
// Checked: the reference loops (f64) forward and backward against that reference; the autograd
// op against central finite differences in double (groups 1, 2, C; stride 1, 2, 4; padding 0, 1,
// 3; kernels 1x1, 3x3, 7x7, 4x4/4, non-square; odd non-square images; batch 1 and 3); f32
// backward against f64; only the requested gradients; the im2col + OpenBLAS path against the
// loops (f32, including a batch cut into several chunks) and bitwise the same for any thread
// count; bf16 against f32; equality with patchify_conv and dwconv where they coincide; the
// error messages.
#include <gtest/gtest.h>

#include <omp.h>

#include <cmath>
#include <sstream>
#include <string>
#include <vector>

#include "autograd/function.h"
#include "autograd/ops.h"
#include "kernels/conv2d.h"
#include "kernels/linear.h"
#include "tests/testing.h"

using namespace cnx;
using namespace cnx::test;

namespace {

// ---- problems ----------------------------------------------------------------------------------
struct Cfg {
  int64_t N, H, W, Ci, Co, kh, kw, stride, pad, groups;
  bool bias = true;
  Conv2dShape shape() const { return {N, H, W, Ci, Co, kh, kw, stride, pad, groups}; }
  Shape x_shape() const { return Shape{N, H, W, Ci}; }
  Shape w_shape() const { return Shape{Co, kh, kw, Ci / groups}; }
  Shape out_shape() const { return Shape{N, shape().Ho(), shape().Wo(), Co}; }
  std::string str() const {
    std::ostringstream os;
    os << "N" << N << " " << H << "x" << W << " Ci" << Ci << " -> Co" << Co << " k" << kh << "x"
       << kw << " s" << stride << " p" << pad << " g" << groups << (bias ? "" : " no-bias");
    return os.str();
  }
};

// Tiny problems for the finite differences and the reference comparisons.
const Cfg kTiny[] = {
    {1, 5, 4, 2, 3, 3, 3, 1, 1, 1},          // 3x3 pad 1, groups 1
    {3, 5, 7, 4, 2, 3, 3, 2, 1, 2},          // groups 2, stride 2, batch 3
    {1, 7, 6, 3, 3, 3, 3, 2, 1, 3},          // depthwise 3x3 stride 2 (groups = C)
    {1, 5, 5, 2, 4, 3, 3, 1, 1, 2},          // groups = Ci with a channel multiplier of 2
    {1, 9, 7, 2, 2, 7, 7, 2, 3, 1},          // the ResNet stem: 7x7/2 pad 3
    {2, 9, 10, 3, 4, 4, 4, 4, 0, 1},         // patchify 4x4/4, the last row/col ignored
    {1, 4, 5, 3, 5, 1, 1, 1, 0, 1},          // pointwise (no im2col)
    {2, 5, 5, 4, 6, 1, 1, 2, 0, 1, false},   // 1x1 stride-2 projection, no bias
    {1, 6, 5, 4, 4, 3, 2, 1, 0, 2},          // non-square kernel, groups 2, no padding
    {3, 3, 4, 2, 3, 3, 3, 1, 3, 1, false},   // padding larger than the image needs
};

// ---- the NCHW reference ----------------------------------------------------------------------
size_t at4(int64_t a, int64_t b, int64_t c, int64_t d, int64_t B, int64_t C, int64_t D) {
  return static_cast<size_t>(((a * B + b) * C + c) * D + d);
}

std::vector<double> nhwc_to_nchw(const std::vector<double>& v, int64_t N, int64_t H, int64_t W,
                                 int64_t C) {
  std::vector<double> r(v.size());
  for (int64_t n = 0; n < N; ++n)
    for (int64_t h = 0; h < H; ++h)
      for (int64_t w = 0; w < W; ++w)
        for (int64_t c = 0; c < C; ++c) r[at4(n, c, h, w, C, H, W)] = v[at4(n, h, w, c, H, W, C)];
  return r;
}

std::vector<double> nchw_to_nhwc(const std::vector<double>& v, int64_t N, int64_t C, int64_t H,
                                 int64_t W) {
  std::vector<double> r(v.size());
  for (int64_t n = 0; n < N; ++n)
    for (int64_t c = 0; c < C; ++c)
      for (int64_t h = 0; h < H; ++h)
        for (int64_t w = 0; w < W; ++w) r[at4(n, h, w, c, H, W, C)] = v[at4(n, c, h, w, C, H, W)];
  return r;
}

// (Co, Cig, kh, kw) <-> (Co, kh, kw, Cig)
std::vector<double> oihw_to_ohwi(const std::vector<double>& w, int64_t Co, int64_t Cig,
                                 int64_t kh, int64_t kw) {
  std::vector<double> r(w.size());
  for (int64_t o = 0; o < Co; ++o)
    for (int64_t c = 0; c < Cig; ++c)
      for (int64_t p = 0; p < kh; ++p)
        for (int64_t q = 0; q < kw; ++q) r[at4(o, p, q, c, kh, kw, Cig)] = w[at4(o, c, p, q, Cig, kh, kw)];
  return r;
}
std::vector<double> ohwi_to_oihw(const std::vector<double>& w, int64_t Co, int64_t Cig,
                                 int64_t kh, int64_t kw) {
  std::vector<double> r(w.size());
  for (int64_t o = 0; o < Co; ++o)
    for (int64_t c = 0; c < Cig; ++c)
      for (int64_t p = 0; p < kh; ++p)
        for (int64_t q = 0; q < kw; ++q) r[at4(o, c, p, q, Cig, kh, kw)] = w[at4(o, p, q, c, kh, kw, Cig)];
  return r;
}

// Everything in the op's layouts (NHWC, OHWI), computed through NCHW / OIHW on a zero-padded
// image in long double: out = conv(x, w) + b, and for a given dout the scatter-form gradients.
struct Reference {
  std::vector<double> out, dx, dw, db;
};

Reference reference(const Cfg& c, const std::vector<double>& x_nhwc,
                    const std::vector<double>& w_ohwi, const std::vector<double>& b,
                    const std::vector<double>& dout_nhwc) {
  const int64_t Cig = c.Ci / c.groups, Cog = c.Co / c.groups;
  const int64_t Hp = c.H + 2 * c.pad, Wp = c.W + 2 * c.pad;
  const int64_t Ho = (Hp - c.kh) / c.stride + 1, Wo = (Wp - c.kw) / c.stride + 1;
  const std::vector<double> x = nhwc_to_nchw(x_nhwc, c.N, c.H, c.W, c.Ci);
  const std::vector<double> w = ohwi_to_oihw(w_ohwi, c.Co, Cig, c.kh, c.kw);
  const std::vector<double> dy = nhwc_to_nchw(dout_nhwc, c.N, Ho, Wo, c.Co);
  std::vector<long double> xp(static_cast<size_t>(c.N * c.Ci * Hp * Wp), 0.0L);
  for (int64_t n = 0; n < c.N; ++n)
    for (int64_t ci = 0; ci < c.Ci; ++ci)
      for (int64_t h = 0; h < c.H; ++h)
        for (int64_t ww = 0; ww < c.W; ++ww)
          xp[at4(n, ci, h + c.pad, ww + c.pad, c.Ci, Hp, Wp)] = x[at4(n, ci, h, ww, c.Ci, c.H, c.W)];
  std::vector<long double> out(static_cast<size_t>(c.N * c.Co * Ho * Wo), 0.0L);
  std::vector<long double> dxp(xp.size(), 0.0L), dw(w.size(), 0.0L), db(static_cast<size_t>(c.Co), 0.0L);
  for (int64_t n = 0; n < c.N; ++n)
    for (int64_t o = 0; o < c.Co; ++o) {
      const int64_t g = o / Cog;
      for (int64_t i = 0; i < Ho; ++i)
        for (int64_t j = 0; j < Wo; ++j) {
          const size_t yo = at4(n, o, i, j, c.Co, Ho, Wo);
          long double acc = b.empty() ? 0.0L : b[static_cast<size_t>(o)];
          const long double gy = dy.empty() ? 0.0L : dy[yo];
          db[static_cast<size_t>(o)] += gy;
          for (int64_t ci = 0; ci < Cig; ++ci)
            for (int64_t p = 0; p < c.kh; ++p)
              for (int64_t q = 0; q < c.kw; ++q) {
                const size_t xi = at4(n, g * Cig + ci, i * c.stride + p, j * c.stride + q, c.Ci, Hp, Wp);
                const size_t wi = at4(o, ci, p, q, Cig, c.kh, c.kw);
                acc += xp[xi] * w[wi];
                dxp[xi] += gy * w[wi];  // scatter: each product's gradient to what it read
                dw[wi] += gy * xp[xi];
              }
          out[yo] = acc;
        }
    }
  Reference r;
  std::vector<double> o64(out.begin(), out.end()), dx(static_cast<size_t>(c.N * c.Ci * c.H * c.W));
  for (int64_t n = 0; n < c.N; ++n)
    for (int64_t ci = 0; ci < c.Ci; ++ci)
      for (int64_t h = 0; h < c.H; ++h)
        for (int64_t ww = 0; ww < c.W; ++ww)
          dx[at4(n, ci, h, ww, c.Ci, c.H, c.W)] =
              static_cast<double>(dxp[at4(n, ci, h + c.pad, ww + c.pad, c.Ci, Hp, Wp)]);
  r.out = nchw_to_nhwc(o64, c.N, c.Co, Ho, Wo);
  r.dx = nchw_to_nhwc(dx, c.N, c.Ci, c.H, c.W);
  r.dw = oihw_to_ohwi(std::vector<double>(dw.begin(), dw.end()), c.Co, Cig, c.kh, c.kw);
  r.db.assign(db.begin(), db.end());
  return r;
}

template <class T> std::vector<T> cast_vec(const std::vector<double>& v) {
  return std::vector<T>(v.begin(), v.end());
}
template <class T> std::vector<double> to_double(const std::vector<T>& v) {
  std::vector<double> r(v.size());
  for (size_t i = 0; i < v.size(); ++i) r[i] = static_cast<double>(v[i]);
  return r;
}

struct Data {
  std::vector<double> x, w, b, dout;
};
Data make_data(const Cfg& c, uint64_t seed) {
  Generator gen(seed);
  const Conv2dShape s = c.shape();
  Data d;
  d.x = randv(s.in_numel(), gen);
  d.w = randv(s.weight_numel(), gen);
  d.b = c.bias ? randv(c.Co, gen) : std::vector<double>{};
  d.dout = randv(s.out_numel(), gen);
  return d;
}

// ================================ the loops against the reference ================================
TEST(Conv2d, LoopsMatchNchwReferenceF64) {
  std::vector<Cfg> cfgs(std::begin(kTiny), std::end(kTiny));
  cfgs.push_back({2, 12, 11, 8, 16, 3, 3, 2, 1, 4});   // ResNeXt-like grouped 3x3/2
  cfgs.push_back({1, 13, 9, 3, 8, 7, 7, 2, 3, 1});     // the stem on an odd image
  uint64_t seed = 10;
  for (const Cfg& c : cfgs) {
    SCOPED_TRACE(c.str());
    const Data d = make_data(c, seed++);
    const Reference r = reference(c, d.x, d.w, d.b, d.dout);
    const Conv2dShape s = c.shape();
    std::vector<double> out(static_cast<size_t>(s.out_numel())), dx(d.x.size()), dw(d.w.size()),
        db(static_cast<size_t>(c.Co));
    cpu::conv2d_forward<double>(out.data(), d.x.data(), d.w.data(), c.bias ? d.b.data() : nullptr, s);
    cpu::conv2d_backward<double>(dx.data(), dw.data(), db.data(), d.dout.data(), d.x.data(),
                                 d.w.data(), s);
    expect_close(c.str() + " out", out, r.out, 1e-12, 1e-12);
    expect_close(c.str() + " dx", dx, r.dx, 1e-12, 1e-12);
    expect_close(c.str() + " dw", dw, r.dw, 1e-12, 1e-12);
    expect_close(c.str() + " db", db, r.db, 1e-12, 1e-12);
    // The op gives the same as the loops, in the shape (N, Ho, Wo, Co).
    const Tensor y = conv2d(make(c.x_shape(), d.x, DType::f64), make(c.w_shape(), d.w, DType::f64),
                            c.bias ? make(Shape{c.Co}, d.b, DType::f64) : Tensor(), c.stride, c.pad,
                            c.groups);
    EXPECT_EQ(y.shape(), c.out_shape());
    expect_close(c.str() + " op", values(y), r.out, 1e-12, 1e-12);
  }
}

TEST(Conv2d, HandComputedStrideAndPadding) {
  // 1 image 3x3, one channel, a 2x2 kernel of ones, stride 2, padding 1: output 2x2, each the
  // sum of the pixels its window covers (the padded ring is zero).
  const std::vector<double> x{1, 2, 3, 4, 5, 6, 7, 8, 9};
  const Tensor y = conv2d(make({1, 3, 3, 1}, x, DType::f64), Tensor::ones({1, 2, 2, 1}, DType::f64),
                          make({1}, {0.5}, DType::f64), 2, 1, 1);
  ASSERT_EQ(y.shape(), Shape({1, 2, 2, 1}));
  // windows: rows {-1,0} x cols {-1,0} -> 1; {-1,0}x{1,2} -> 2+3; {1,2}x{-1,0} -> 4+7; -> 5+6+8+9
  expect_close("hand", values(y), {1.5, 5.5, 11.5, 28.5}, 0, 0);
}

// ================================ finite differences ================================
TEST(Conv2d, GradientsMatchFiniteDifferences) {
  uint64_t seed = 100;
  for (const Cfg& c : kTiny) {
    Generator gen(seed++);
    std::vector<Tensor> inputs{leaf(c.x_shape(), gen), leaf(c.w_shape(), gen)};
    if (c.bias) inputs.push_back(leaf(Shape{c.Co}, gen));
    auto f = [c](const std::vector<Tensor>& v) {
      return conv2d(v[0], v[1], v.size() > 2 ? v[2] : Tensor(), c.stride, c.pad, c.groups);
    };
    expect_gradients_match("conv2d " + c.str(), f, inputs);
  }
}

TEST(Conv2d, F32BackwardMatchesF64) {
  // Both the BLAS path (groups 1) and the loops (groups > 1), whichever the build has.
  const Cfg cfgs[] = {{2, 9, 7, 3, 5, 3, 3, 2, 1, 1}, {1, 8, 12, 4, 6, 3, 3, 1, 1, 2},
                      {2, 11, 9, 3, 4, 7, 7, 2, 3, 1}, {2, 6, 5, 6, 6, 3, 3, 2, 1, 6},
                      {2, 5, 6, 8, 4, 1, 1, 1, 0, 1}};
  uint64_t seed = 200;
  for (const Cfg& c : cfgs) {
    const Op3 op = [c](const Tensor& x, const Tensor& w, const Tensor& b) {
      return conv2d(x, w, b, c.stride, c.pad, c.groups);
    };
    check_f32_backward_matches_f64("conv2d " + c.str(), op, c.x_shape(), c.w_shape(), Shape{c.Co},
                                   seed++);
  }
}

TEST(Conv2d, OnlyRequestedGradients) {
  const Cfg cfgs[] = {{2, 5, 6, 4, 6, 3, 3, 2, 1, 2}, {1, 5, 4, 3, 2, 3, 3, 1, 1, 1},
                      {1, 4, 4, 3, 2, 1, 1, 1, 0, 1}};
  uint64_t seed = 300;
  for (const Cfg& c : cfgs)
    check_only_requested_gradients(
        "conv2d " + c.str(),
        [c](const std::vector<Tensor>& t) { return conv2d(t[0], t[1], t[2], c.stride, c.pad, c.groups); },
        c.x_shape(), c.w_shape(), Shape{c.Co}, seed++);
}

TEST(Conv2d, NoGradModeRecordsNothing) {
  Generator gen(5);
  const Tensor x = leaf({1, 5, 5, 2}, gen), w = leaf({3, 3, 3, 2}, gen), b = leaf({3}, gen);
  NoGradGuard guard;
  const Tensor y = conv2d(x, w, b, 1, 1);
  EXPECT_FALSE(y.requires_grad());
}

// ================================ the fast f32 path ================================
// im2col + OpenBLAS against the loops: the same sums in another order, so within f32 rounding:
// |fast - loops| <= 4 terms 2^-24 mag, mag the result of the loops on |inputs| (each side's
// error is at most terms u mag; a factor 2 of margin).
struct F32Result {
  std::vector<float> out, dx, dw, db;
};

F32Result run_f32(const Cfg& c, const Data& d, bool fast, bool abs_inputs = false) {
  const Conv2dShape s = c.shape();
  auto f = [&](const std::vector<double>& v) {
    std::vector<float> r = cast_vec<float>(v);
    if (abs_inputs)
      for (float& e : r) e = std::abs(e);
    return r;
  };
  const std::vector<float> x = f(d.x), w = f(d.w), b = f(d.b), dy = f(d.dout);
  F32Result r{std::vector<float>(static_cast<size_t>(s.out_numel())), std::vector<float>(x.size()),
              std::vector<float>(w.size()), std::vector<float>(static_cast<size_t>(c.Co))};
  const float* bp = c.bias ? b.data() : nullptr;
  if (fast) {
    blas::conv2d_forward(r.out.data(), x.data(), w.data(), bp, s);
    blas::conv2d_backward(r.dx.data(), r.dw.data(), r.db.data(), dy.data(), x.data(), w.data(), s);
  } else {
    cpu::conv2d_forward<float>(r.out.data(), x.data(), w.data(), bp, s);
    cpu::conv2d_backward<float>(r.dx.data(), r.dw.data(), r.db.data(), dy.data(), x.data(), w.data(), s);
  }
  return r;
}

void check_fast_against_loops(const Cfg& c, uint64_t seed) {
  SCOPED_TRACE(c.str());
  const Data d = make_data(c, seed);
  const Conv2dShape s = c.shape();
  const F32Result fast = run_f32(c, d, true), loops = run_f32(c, d, false),
                  mag = run_f32(c, d, false, true);
  const double u = std::ldexp(1.0, -24);
  const double terms_fwd = static_cast<double>(s.window() + 1);
  const double terms_dx = static_cast<double>(s.kh * s.kw * s.Cog());
  const double terms_dw = static_cast<double>(s.rows());
  expect_close_mag(c.str() + " out", to_double(fast.out), to_double(loops.out), to_double(mag.out),
                   4 * terms_fwd * u);
  expect_close_mag(c.str() + " dx", to_double(fast.dx), to_double(loops.dx), to_double(mag.dx),
                   4 * terms_dx * u);
  expect_close_mag(c.str() + " dw", to_double(fast.dw), to_double(loops.dw), to_double(mag.dw),
                   4 * terms_dw * u);
  expect_close_mag(c.str() + " db", to_double(fast.db), to_double(loops.db), to_double(mag.db),
                   4 * terms_dw * u);
}

const Cfg kResNetLike[] = {
    {2, 32, 32, 3, 16, 7, 7, 2, 3, 1},     // stem
    {2, 14, 14, 16, 32, 1, 1, 1, 0, 1},    // 1x1 (pointwise: no im2col)
    {2, 14, 14, 16, 16, 3, 3, 1, 1, 1},    // 3x3
    {2, 15, 13, 16, 24, 3, 3, 2, 1, 1},    // 3x3 stride 2, odd sizes
    {2, 15, 13, 16, 32, 1, 1, 2, 0, 1},    // 1x1 stride-2 projection
    {2, 16, 16, 3, 24, 4, 4, 4, 0, 1},     // patchify stem
    {2, 9, 9, 8, 8, 3, 3, 2, 1, 8},        // depthwise (groups > 1: the loops)
    {1, 7, 5, 5, 3, 2, 3, 1, 2, 1, false}, // non-square kernel, no bias
};

TEST(Conv2d, BlasPathMatchesLoops) {
  if (!blas::available()) GTEST_SKIP() << "built without OpenBLAS: " << blas::describe();
  uint64_t seed = 400;
  for (const Cfg& c : kResNetLike) check_fast_against_loops(c, seed++);
}

// A batch whose im2col matrix exceeds one chunk (64 MiB): 2.36 M floats per image, 6 images per
// chunk, so 8 images take two chunks, the second short; dweight and dbias add the chunks.
TEST(Conv2d, BlasPathMatchesLoopsOverSeveralChunks) {
  if (!blas::available()) GTEST_SKIP() << "built without OpenBLAS: " << blas::describe();
  check_fast_against_loops({8, 64, 64, 64, 4, 3, 3, 1, 1, 1}, 450);
}

TEST(Conv2d, BlasPathIsBitwiseTheSameForAnyThreadCount) {
  if (!blas::available()) GTEST_SKIP() << "built without OpenBLAS: " << blas::describe();
  const Cfg c{3, 17, 15, 8, 12, 3, 3, 2, 1, 1};
  const Data d = make_data(c, 500);
  const int saved = omp_get_max_threads();
  omp_set_num_threads(1);
  const F32Result one = run_f32(c, d, true);
  for (int threads : {2, 3, 5}) {
    omp_set_num_threads(threads);
    const F32Result many = run_f32(c, d, true);
    EXPECT_EQ(many.out, one.out) << threads << " threads";
    EXPECT_EQ(many.dx, one.dx) << threads << " threads";
    EXPECT_EQ(many.dw, one.dw) << threads << " threads";
    EXPECT_EQ(many.db, one.db) << threads << " threads";
  }
  omp_set_num_threads(saved);
}

// The autograd op takes the BLAS path for f32 unless the reference loops are forced; both agree.
TEST(Conv2d, OpUsesEitherPathWithTheSameResult) {
  const Cfg c{2, 11, 9, 4, 6, 3, 3, 2, 1, 1};
  const Data d = make_data(c, 600);
  auto run = [&] {
    Tensor x = make(c.x_shape(), d.x, DType::f32).set_requires_grad(true);
    Tensor w = make(c.w_shape(), d.w, DType::f32).set_requires_grad(true);
    Tensor b = make(Shape{c.Co}, d.b, DType::f32).set_requires_grad(true);
    Tensor y = conv2d(x, w, b, c.stride, c.pad, c.groups);
    sum(mul(y, make(y.shape(), d.dout, DType::f32))).backward();
    return std::vector<std::vector<double>>{values(y), values(x.grad()), values(w.grad()),
                                            values(b.grad())};
  };
  const auto fast = run();
  std::vector<std::vector<double>> loops;
  {
    blas::ScopedCpuReference ref(true);
    loops = run();
  }
  const char* names[] = {"out", "dx", "dw", "db"};
  for (int i = 0; i < 4; ++i) expect_close(names[i], fast[i], loops[i], 1e-4, 1e-4);
}

// ================================ bf16 ================================
// bf16 operands (the inputs rounded to bf16 first, so both runs see the same values): the bf16
// kernels compute in f32 and round each stored value once, so out and dx are exactly the f32
// loops' results (on the same operands, with the bias rounded to bf16) rounded to bf16, and
// dweight and dbias exactly the f32 ones.
TEST(Conv2d, Bf16IsTheF32LoopsRoundedOnce) {
  const Cfg cfgs[] = {{2, 9, 7, 3, 5, 3, 3, 2, 1, 1}, {1, 8, 6, 4, 6, 3, 3, 1, 1, 2},
                      {1, 9, 9, 3, 4, 7, 7, 2, 3, 1}, {2, 6, 5, 6, 6, 3, 3, 2, 1, 6}};
  uint64_t seed = 700;
  for (const Cfg& c : cfgs) {
    SCOPED_TRACE(c.str());
    const Conv2dShape s = c.shape();
    Data d = make_data(c, seed++);
    for (auto* v : {&d.x, &d.w, &d.b, &d.dout})
      for (double& e : *v) e = static_cast<double>(static_cast<float>(bf16(static_cast<float>(e))));
    const std::vector<float> xf = cast_vec<float>(d.x), wf = cast_vec<float>(d.w),
                             bf = cast_vec<float>(d.b), dyf = cast_vec<float>(d.dout);
    const std::vector<bf16> xb = cast_vec<bf16>(d.x), wb = cast_vec<bf16>(d.w),
                            dyb = cast_vec<bf16>(d.dout);
    std::vector<float> out(static_cast<size_t>(s.out_numel())), dx(xf.size()), dw(wf.size()), db(bf.size());
    cpu::conv2d_forward<float>(out.data(), xf.data(), wf.data(), bf.data(), s);
    cpu::conv2d_backward<float>(dx.data(), dw.data(), db.data(), dyf.data(), xf.data(), wf.data(), s);
    std::vector<bf16> outb(out.size()), dxb(dx.size());
    std::vector<float> dwb(dw.size()), dbb(db.size());
    cpu::conv2d_forward<bf16>(outb.data(), xb.data(), wb.data(), bf.data(), s);
    cpu::conv2d_backward<bf16>(dxb.data(), dwb.data(), dbb.data(), dyb.data(), xb.data(), wb.data(), s);
    for (size_t i = 0; i < out.size(); ++i)
      ASSERT_EQ(static_cast<float>(outb[i]), static_cast<float>(bf16(out[i]))) << "out " << i;
    for (size_t i = 0; i < dx.size(); ++i)
      ASSERT_EQ(static_cast<float>(dxb[i]), static_cast<float>(bf16(dx[i]))) << "dx " << i;
    EXPECT_EQ(dwb, dw);
    EXPECT_EQ(dbb, db);
  }
}

// Through the op, with unrounded f32 inputs: bf16 differs from f32 by the roundings of x, the
// weight, the bias and the result, each at most 2^-9 relative: |bf16 - f32| <= 4 * 2^-9 * mag
// (mag: the sum of the |terms|, from the f32 op on |inputs|), plus 2^-8 of the result's own
// rounding, which the bound on mag already covers since |out| <= mag.
TEST(Conv2d, Bf16OpMatchesF32WithinRounding) {
  const Cfg c{2, 9, 8, 4, 6, 3, 3, 2, 1, 2};
  const Data d = make_data(c, 800);
  const Tensor x = make(c.x_shape(), d.x, DType::f32), w = make(c.w_shape(), d.w, DType::f32),
               b = make(Shape{c.Co}, d.b, DType::f32);
  const Tensor y32 = conv2d(x, w, b, c.stride, c.pad, c.groups);
  const Tensor y16 = conv2d(x.to(DType::bf16), w, b, c.stride, c.pad, c.groups);
  EXPECT_EQ(y16.dtype(), DType::bf16);
  auto absd = [](std::vector<double> v) {
    for (double& e : v) e = std::abs(e);
    return v;
  };
  const Tensor mag = conv2d(make(c.x_shape(), absd(d.x), DType::f32),
                            make(c.w_shape(), absd(d.w), DType::f32),
                            make(Shape{c.Co}, absd(d.b), DType::f32), c.stride, c.pad, c.groups);
  expect_close_mag("bf16 vs f32", values(y16), values(y32), values(mag), 4 * std::ldexp(1.0, -9));
}

// ================================ where other ops coincide ================================
// k x k, stride k, no padding, groups 1 is patchify_conv.
TEST(Conv2d, EqualsPatchifyConv) {
  const Cfg cfgs[] = {{2, 9, 10, 3, 4, 4, 4, 4, 0, 1}, {1, 7, 7, 5, 3, 2, 2, 2, 0, 1}};
  uint64_t seed = 900;
  for (const Cfg& c : cfgs) {
    SCOPED_TRACE(c.str());
    Generator gen(seed++);
    Tensor x = leaf(c.x_shape(), gen), w = leaf(c.w_shape(), gen), b = leaf(Shape{c.Co}, gen);
    const Tensor R = randn(c.out_shape(), seed + 50);
    Tensor y1 = conv2d(x, w, b, c.stride, 0, 1);
    sum(mul(y1, R)).backward();
    const auto g1 = std::vector<std::vector<double>>{values(x.grad()), values(w.grad()), values(b.grad())};
    x.set_grad(Tensor()), w.set_grad(Tensor()), b.set_grad(Tensor());
    Tensor y2 = patchify_conv(x, w, b);
    sum(mul(y2, R)).backward();
    expect_close("out", values(y1), values(y2), 1e-13, 1e-13);
    expect_close("dx", g1[0], values(x.grad()), 1e-13, 1e-13);
    expect_close("dw", g1[1], values(w.grad()), 1e-13, 1e-13);
    expect_close("db", g1[2], values(b.grad()), 1e-13, 1e-13);
  }
}

// groups = C, stride 1, padding k/2 (odd k) is dwconv, with the weight (C, k, k, 1) as (k, k, C).
TEST(Conv2d, EqualsDwconv) {
  const int64_t problems[][4] = {{2, 7, 9, 5}, {1, 6, 5, 3}};  // N, H, W, C
  const int64_t ks[] = {3, 7};
  uint64_t seed = 1000;
  for (const auto& pr : problems)
    for (int64_t k : ks) {
      const int64_t N = pr[0], H = pr[1], W = pr[2], C = pr[3];
      SCOPED_TRACE("dwconv N" + std::to_string(N) + " C" + std::to_string(C) + " k" + std::to_string(k));
      Generator gen(seed++);
      const std::vector<double> xv = randv(N * H * W * C, gen), wv = randv(C * k * k, gen),
                                bv = randv(C, gen);
      std::vector<double> wkkc(wv.size());  // (C, k, k, 1) -> (k, k, C)
      for (int64_t c = 0; c < C; ++c)
        for (int64_t t = 0; t < k * k; ++t) wkkc[static_cast<size_t>(t * C + c)] = wv[static_cast<size_t>(c * k * k + t)];
      const Tensor R = randn(Shape{N, H, W, C}, seed + 77);
      Tensor x1 = make({N, H, W, C}, xv, DType::f64).set_requires_grad(true);
      Tensor w1 = make({C, k, k, 1}, wv, DType::f64).set_requires_grad(true);
      Tensor b1 = make({C}, bv, DType::f64).set_requires_grad(true);
      Tensor y1 = conv2d(x1, w1, b1, 1, k / 2, C);
      sum(mul(y1, R)).backward();
      Tensor x2 = make({N, H, W, C}, xv, DType::f64).set_requires_grad(true);
      Tensor w2 = make({k, k, C}, wkkc, DType::f64).set_requires_grad(true);
      Tensor b2 = make({C}, bv, DType::f64).set_requires_grad(true);
      Tensor y2 = dwconv(x2, w2, b2);
      sum(mul(y2, R)).backward();
      expect_close("out", values(y1), values(y2), 1e-13, 1e-13);
      expect_close("dx", values(x1.grad()), values(x2.grad()), 1e-13, 1e-13);
      std::vector<double> dw1 = values(w1.grad()), dw1_kkc(dw1.size());
      for (int64_t c = 0; c < C; ++c)
        for (int64_t t = 0; t < k * k; ++t)
          dw1_kkc[static_cast<size_t>(t * C + c)] = dw1[static_cast<size_t>(c * k * k + t)];
      expect_close("dw", dw1_kkc, values(w2.grad()), 1e-13, 1e-13);
      expect_close("db", values(b1.grad()), values(b2.grad()), 1e-13, 1e-13);
    }
}

// ================================ errors ================================
TEST(Conv2d, BadInput) {
  const Tensor x = Tensor::zeros({2, 8, 8, 4}), w = Tensor::zeros({6, 3, 3, 2}), b = Tensor::zeros({6});
  EXPECT_EQ(conv2d(x, w, b, 2, 1, 2).shape(), Shape({2, 4, 4, 6}));
  EXPECT_EQ(conv2d(x, Tensor::zeros({6, 3, 3, 4}), Tensor(), 1, 0).shape(), Shape({2, 6, 6, 6}));
  // ranks
  expect_error([&] { conv2d(Tensor::zeros({8, 8, 4}), w, b, 1, 1, 2); }, {"conv2d", "x", "[8, 8, 4]", "rank 4"});
  expect_error([&] { conv2d(x, Tensor::zeros({6, 9, 2}), b, 1, 1, 2); }, {"conv2d", "weight", "[6, 9, 2]"});
  // stride, padding, groups
  expect_error([&] { conv2d(x, w, b, 0, 1, 2); }, {"conv2d", "stride 0", "[2, 8, 8, 4]", "[6, 3, 3, 2]"});
  expect_error([&] { conv2d(x, w, b, 1, -1, 2); }, {"conv2d", "padding -1", "[2, 8, 8, 4]"});
  expect_error([&] { conv2d(x, w, b, 1, 1, 0); }, {"conv2d", "groups 0"});
  expect_error([&] { conv2d(x, Tensor::zeros({6, 3, 3, 1}), b, 1, 1, 3); },
               {"conv2d", "groups 3", "4 channels", "[2, 8, 8, 4]"});
  expect_error([&] { conv2d(x, Tensor::zeros({5, 3, 3, 2}), Tensor(), 1, 1, 2); },
               {"conv2d", "groups 2", "5 output channels", "[5, 3, 3, 2]"});
  // weight's last dimension must be Ci / groups
  expect_error([&] { conv2d(x, Tensor::zeros({6, 3, 3, 4}), b, 1, 1, 2); },
               {"conv2d", "weight", "[6, 3, 3, 4]", "[6, 3, 3, 2]", "groups 2"});
  expect_error([&] { conv2d(x, Tensor::zeros({6, 0, 3, 2}), b, 1, 1, 2); }, {"conv2d", "[6, 0, 3, 2]", "kernel"});
  // bias
  expect_error([&] { conv2d(x, w, Tensor::zeros({5}), 1, 1, 2); }, {"conv2d", "bias", "[5]", "[6, 3, 3, 2]"});
  // output smaller than 1x1
  expect_error([&] { conv2d(Tensor::zeros({1, 2, 9, 4}), w, b, 1, 0, 2); },
               {"conv2d", "[1, 2, 9, 4]", "smaller", "3x3", "output 0x7"});
  // dtypes and devices
  expect_error([&] { conv2d(x, Tensor::zeros({6, 3, 3, 2}, DType::f64), b, 1, 1, 2); }, {"conv2d", "weight", "f64"});
  expect_error([&] { conv2d(x.to(DType::bf16), w.to(DType::bf16), b, 1, 1, 2); }, {"conv2d", "weight", "bf16", "f32"});
  expect_error([&] { conv2d(Tensor::zeros({1, 4, 4, 4}, DType::i64), w, b, 1, 1, 2); }, {"conv2d", "x", "i64"});
}

TEST(Conv2d, EmptyBatchGivesEmptyOutputAndZeroParameterGradients) {
  Generator gen(3);
  Tensor x = Tensor::zeros({0, 5, 5, 2}, DType::f64).set_requires_grad(true);
  Tensor w = leaf({3, 3, 3, 2}, gen), b = leaf({3}, gen);
  Tensor y = conv2d(x, w, b, 2, 1);
  EXPECT_EQ(y.shape(), Shape({0, 3, 3, 3}));
  sum(y).backward();
  for (double v : values(w.grad())) EXPECT_EQ(v, 0.0);
  for (double v : values(b.grad())) EXPECT_EQ(v, 0.0);
  EXPECT_EQ(x.grad().shape(), Shape({0, 5, 5, 2}));
}

}  // namespace
