// The CUDA kernels of LayerNorm, GELU, layer scale, drop path, add, mul, sum, global average
// pool, softmax cross-entropy (kernels/cuda/*.cu) and the multi-tensor AdamW step
// (kernels/cuda/adamw.cu) against their CPU references: cnx::cpu::<op><float> (or <double>
// where the float reference itself rounds a long sum) and train/optim's cnx::AdamW.
//
// Inputs are random (cnx::Generator, fixed seeds), copied to the device; every launcher runs on
// stream nullptr (the legacy default stream). The library's own copies run on its non-blocking
// stream, which does not wait for the legacy stream, so the tests synchronise the device after
// every upload and after every launch (device_sync()).
//
// Device buffers (DevBuf) carry sentinel guards after the data (and, with offset 1, before it):
// an out-of-bounds write shows up as a changed guard. Offset 1 also starts the data 4 bytes past
// a 16-byte boundary, so the float4 paths must fall back to their scalar ones. Outputs start as
// sentinels, so an element the kernel forgets to write fails the comparison, and a gradient
// that was not requested (null pointer) must leave its buffer untouched.
//
// Shapes: ConvNeXt-T's four stages at batch 1 or 2, the awkward sweep of the issue (H, W in
// {1, 5, 7, 9, 56}, C in {1, 3, 40, 96, 100}, batch 1 and 3), every lane layout of the
// LayerNorm fast path and its generic fallback (C up to 2052), n not a multiple of 4, and
// empty sizes. Reductions are also run on small-integer data, where every partial sum is an
// integer below 2^24 and therefore exact in any order: the GPU must then equal the CPU
// bitwise, which catches a lost or doubled row that a rounding tolerance would hide. Every
// reduction is run twice and must be bitwise equal (determinism).
//
// Tolerances (each explained where it is used) are in units of u = 2^-24, the relative
// rounding error of one f32 operation. Elementwise results that are one correctly rounded
// operation on the same inputs (add, mul, layer scale, drop path, the broadcast backward
// passes, AdamW) must be bitwise equal.
//
// Every test skips, saying why, when the library was built without CUDA or no device is
// visible; this file compiles and links either way.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <sstream>
#include <string>
#include <vector>

#include "kernels/adamw.h"
#include "kernels/add.h"
#include "kernels/avgpool.h"
#include "kernels/cross_entropy.h"
#include "kernels/drop_path.h"
#include "kernels/gelu.h"
#include "kernels/layer_scale.h"
#include "kernels/layernorm.h"
#include "kernels/mul.h"
#include "kernels/patchify.h"
#include "kernels/sum.h"
#include "models/convnext.h"
#include "tensor/cuda_context.h"
#include "tensor/device.h"
#include "tensor/generator.h"
#include "tensor/tensor.h"
#include "tests/testing.h"
#include "train/optim/adamw.h"

#include "tests/cuda_testing.h"

#if CNX_TEST_CUDA
namespace {

using namespace cnx;
using namespace cnx::test;

const Device kDev = Device::cuda(0);
constexpr float kSentinel = 1234.5f;
constexpr int64_t kGuard = 5;                 // sentinel floats after every device buffer
const double kU = std::ldexp(1.0, -24);       // unit roundoff of f32
// The two-stage column reductions (LayerNorm's dweight / dbias, layer scale's dgamma): their
// longest chain of sequential adds is < 600 for rows <= 100352 (see check_layer_scale and
// check_layernorm_backward), so the first-order rounding bound is 600 u of sum |terms|; twice
// that leaves a margin for the few roundings of each term.
const double kReduceTol = 1200 * kU;

void device_sync() { CNX_CUDA_CHECK(cudaDeviceSynchronize()); }

// The arguments streamed into one string (labels of failure messages).
template <class... A> std::string cat(const A&... a) {
  std::ostringstream s;
  (s << ... << a);
  return s.str();
}

// ---- data ------------------------------------------------------------------------------------

// n normal floats (mean, std) from gen.
std::vector<float> randf(int64_t n, Generator& gen, double std = 1.0, double mean = 0.0) {
  std::vector<float> v(static_cast<size_t>(n));
  for (float& x : v) x = static_cast<float>(mean + std * gen.normal());
  return v;
}
// n small integers in [-k, k] from gen (as floats: sums of < 2^24 / k of them are exact).
std::vector<float> randi(int64_t n, Generator& gen, int k = 2) {
  std::vector<float> v(static_cast<size_t>(n));
  for (float& x : v) x = static_cast<float>(static_cast<int>(gen.next_u32() % (2 * k + 1)) - k);
  return v;
}
std::vector<double> dbl(const std::vector<float>& v) {
  return std::vector<double>(v.begin(), v.end());
}
std::vector<float> abs_of(std::vector<float> v) {
  for (float& x : v) x = std::abs(x);
  return v;
}

// A device buffer of n floats placed `offset` floats after a 512-byte aligned allocation,
// surrounded by sentinels (the `offset` floats before it and kGuard after it).
class DevBuf {
 public:
  DevBuf() = default;
  DevBuf(const std::vector<float>& v, int64_t offset = 0)
      : off_(offset), n_(static_cast<int64_t>(v.size())) {
    std::vector<float> h(static_cast<size_t>(off_ + n_ + kGuard), kSentinel);
    std::copy(v.begin(), v.end(), h.begin() + off_);
    t_ = Tensor::from_data<float>(Shape{off_ + n_ + kGuard}, h, kDev);
    device_sync();  // the upload runs on the library's stream; the kernels on the legacy one
  }
  // An output: n sentinels.
  static DevBuf out(int64_t n, int64_t offset = 0) {
    return DevBuf(std::vector<float>(static_cast<size_t>(n), kSentinel), offset);
  }
  float* p() { return t_.data<float>() + off_; }
  const float* p() const { return t_.data<float>() + off_; }
  int64_t size() const { return n_; }

  // The whole allocation (guards included) and the n data floats, on the host.
  std::vector<float> all() const { return t_.to(Device::cpu()).to_vector<float>(); }
  std::vector<float> get() const {
    const std::vector<float> a = all();
    return std::vector<float>(a.begin() + off_, a.begin() + off_ + n_);
  }
  std::vector<double> values() const { return dbl(get()); }

  // EXPECTs the guards before and after the data to be intact.
  void expect_guards(const std::string& what) const {
    const std::vector<float> a = all();
    int64_t changed = 0;
    for (int64_t i = 0; i < off_; ++i) changed += a[i] != kSentinel;
    for (int64_t i = off_ + n_; i < off_ + n_ + kGuard; ++i) changed += a[i] != kSentinel;
    EXPECT_EQ(changed, 0) << what << ": " << changed
                          << " guard floats around the buffer were written";
  }
  // EXPECTs the whole buffer untouched (a gradient that was not requested).
  void expect_untouched(const std::string& what) const {
    const std::vector<float> a = all();
    int64_t changed = 0;
    for (float x : a) changed += x != kSentinel;
    EXPECT_EQ(changed, 0) << what << ": a skipped output was written (" << changed << " of "
                          << a.size() << " floats changed)";
  }

 private:
  Tensor t_;
  int64_t off_ = 0, n_ = 0;
};

// A workspace of at least one float (so the pointer is never null), 8-byte aligned.
DevBuf workspace(int64_t floats) { return DevBuf::out(std::max<int64_t>(floats, 1)); }

// EXPECTs got == want bit for bit (NaNs compared by their bits too).
void expect_bitwise(const std::string& what, const std::vector<float>& got,
                    const std::vector<float>& want) {
  ASSERT_EQ(got.size(), want.size()) << what;
  int64_t bad = 0;
  std::string report;
  for (size_t i = 0; i < got.size(); ++i) {
    if (std::memcmp(&got[i], &want[i], sizeof(float)) != 0) {
      if (bad < 8)
        report += cat("\n  [", i, "] got ", got[i], " want ", want[i]);
      ++bad;
    }
  }
  EXPECT_EQ(bad, 0) << what << ": " << bad << " of " << got.size() << " floats differ" << report;
}

// Distance in ulps between two finite floats (adjacent floats are 1 apart, +0 and -0 are 0).
int64_t ulp_distance(float a, float b) {
  auto key = [](float f) {
    int32_t i;
    std::memcpy(&i, &f, sizeof(i));
    return i < 0 ? -static_cast<int64_t>(i & 0x7fffffff) : static_cast<int64_t>(i);
  };
  return std::abs(key(a) - key(b));
}

// ---- shapes ----------------------------------------------------------------------------------

struct Act {  // an NHWC activation
  int64_t N, H, W, C;
  int64_t rows() const { return N * H * W; }
  int64_t numel() const { return N * H * W * C; }
  std::string str() const {
    return cat("N", N, " H", H, " W", W, " C", C);
  }
};

const Act kStages[] = {{1, 56, 56, 96}, {2, 28, 28, 192}, {2, 14, 14, 384}, {2, 7, 7, 768}};

// The awkward sweep: every H x W in {1, 5, 7, 9, 56}^2, C and the batch rotated so that each
// value meets many others (25 shapes).
std::vector<Act> awkward_acts() {
  const int64_t sizes[] = {1, 5, 7, 9, 56};
  const int64_t channels[] = {1, 3, 40, 96, 100};
  std::vector<Act> v;
  for (int ih = 0; ih < 5; ++ih)
    for (int iw = 0; iw < 5; ++iw)
      v.push_back({(ih + iw) % 2 ? 3 : 1, sizes[ih], sizes[iw], channels[(ih + 2 * iw) % 5]});
  return v;
}

std::vector<Act> all_acts() {
  std::vector<Act> v(std::begin(kStages), std::end(kStages));
  for (const Act& a : awkward_acts()) v.push_back(a);
  return v;
}

// Element counts for the flat elementwise ops: tiny, not multiples of 4, a partial block, and a
// ConvNeXt-sized tensor with a tail.
const int64_t kSizes[] = {1, 3, 4, 5, 7, 96, 1000, 4099, 56 * 56 * 96 + 3};

// =============================================================================================
// elementwise: add, mul, GELU
// =============================================================================================

void check_add(int64_t n, int64_t off_out, int64_t off_a, int64_t off_b, uint64_t seed) {
  const std::string what = cat("add n=", n, " offsets ", off_out, off_a, off_b);
  Generator gen(seed);
  const std::vector<float> a = randf(n, gen), b = randf(n, gen);
  std::vector<float> want(static_cast<size_t>(n));
  cpu::add_forward<float>(want.data(), a.data(), b.data(), n);
  DevBuf da(a, off_a), db(b, off_b), out = DevBuf::out(n, off_out);
  cuda::add_forward(out.p(), da.p(), db.p(), n, nullptr);
  device_sync();
  // One correctly rounded add of the same floats: bitwise.
  expect_bitwise(what, out.get(), want);
  out.expect_guards(what);

  std::vector<float> dst = a;
  cpu::add_inplace<float>(dst.data(), b.data(), n);
  cuda::add_inplace(da.p(), db.p(), n, nullptr);  // da += db
  device_sync();
  expect_bitwise(what + " inplace", da.get(), dst);
  da.expect_guards(what + " inplace");
}

void check_mul(int64_t n, int64_t off, uint64_t seed) {
  const std::string what = cat("mul n=", n, " offset ", off);
  Generator gen(seed);
  const std::vector<float> a = randf(n, gen), b = randf(n, gen), g = randf(n, gen);
  std::vector<float> want(static_cast<size_t>(n)), wa(want), wb(want);
  cpu::mul_forward<float>(want.data(), a.data(), b.data(), n);
  cpu::mul_backward<float>(wa.data(), wb.data(), g.data(), a.data(), b.data(), n);
  DevBuf da(a, off), db(b), dg(g, off), out = DevBuf::out(n, off);
  cuda::mul_forward(out.p(), da.p(), db.p(), n, nullptr);
  device_sync();
  expect_bitwise(what + " forward", out.get(), want);  // one correctly rounded multiply
  out.expect_guards(what + " forward");
  for (int mask = 1; mask < 4; ++mask) {  // da only, db only, both
    const bool want_a = mask & 1, want_b = mask & 2;
    DevBuf ga = DevBuf::out(n, off), gb = DevBuf::out(n);
    cuda::mul_backward(want_a ? ga.p() : nullptr, want_b ? gb.p() : nullptr, dg.p(), da.p(),
                       db.p(), n, nullptr);
    device_sync();
    const std::string w = cat(what, " backward mask ", mask);
    if (want_a) {
      expect_bitwise(w + " da", ga.get(), wa);
      ga.expect_guards(w + " da");
    } else {
      ga.expect_untouched(w + " da");
    }
    if (want_b) {
      expect_bitwise(w + " db", gb.get(), wb);
      gb.expect_guards(w + " db");
    } else {
      gb.expect_untouched(w + " db");
    }
  }
}

void check_gelu(int64_t n, int64_t off, uint64_t seed) {
  const std::string what = cat("gelu n=", n, " offset ", off);
  Generator gen(seed);
  const std::vector<float> x = randf(n, gen, 2.0), g = randf(n, gen);
  std::vector<float> y(static_cast<size_t>(n)), dx(y);
  cpu::gelu_forward<float>(y.data(), x.data(), n);
  cpu::gelu_backward<float>(dx.data(), g.data(), x.data(), n);
  DevBuf dxin(x, off), dg(g), out = DevBuf::out(n, off), din = DevBuf::out(n);
  cuda::gelu_forward(out.p(), dxin.p(), n, nullptr);
  cuda::gelu_backward(din.p(), dg.p(), dxin.p(), n, nullptr);
  device_sync();
  // The same float expressions with CUDA's erff / expf (<= 2 ulp) for the C library's (~1
  // ulp). For x < 0, 1 + erf(x / sqrt 2) cancels: the erf errors (<= 3 ulp of a value below 1,
  // 3 x 6e-8, both sides together) become an absolute error of 0.5 |x| 1.8e-7 in the result,
  // which the absolute part covers up to |x| = 16 (|x| < 11 here, std 2); elsewhere 64 u
  // relative covers the function errors plus the ~5 roundings of each side.
  expect_close(what + " forward", out.values(), dbl(y), 2e-6, 64 * kU);
  // din = dout (Phi + x phi): Phi carries the same absolute error, 0.5 x 1.8e-7, and x phi a
  // relative one of a few u on a value <= 0.25; times |dout| (< 6 here): < 1e-6 absolute, with
  // a 4x margin.
  expect_close(what + " backward", din.values(), dbl(dx), 4e-6, 64 * kU);
  out.expect_guards(what);
  din.expect_guards(what);
}

// =============================================================================================
// layer scale, drop path
// =============================================================================================

void check_layer_scale(const Act& s, int64_t off, bool want_din, bool want_dgamma, bool integers,
                       uint64_t seed) {
  const std::string what = cat("layer_scale ", s.str(), " offset ", off, want_din ? " din" : "",
                               want_dgamma ? " dgamma" : "", integers ? " integers" : "");
  SCOPED_TRACE(what);
  Generator gen(seed);
  const int64_t rows = s.rows(), C = s.C, n = s.numel();
  const std::vector<float> x = integers ? randi(n, gen) : randf(n, gen),
                           gamma = integers ? randi(C, gen) : randf(C, gen, 0.5, 1.0),
                           g = integers ? randi(n, gen) : randf(n, gen);
  std::vector<float> y(static_cast<size_t>(n)), dx(y);
  cpu::layer_scale_forward<float>(y.data(), x.data(), gamma.data(), rows, C);
  cpu::layer_scale_backward<float>(dx.data(), nullptr, g.data(), x.data(), gamma.data(), rows, C);

  DevBuf dxin(x, off), dgamma_in(gamma), dg(g, off), out = DevBuf::out(n, off);
  cuda::layer_scale_forward(out.p(), dxin.p(), dgamma_in.p(), rows, C, nullptr);
  device_sync();
  expect_bitwise("forward", out.get(), y);  // one correctly rounded multiply
  out.expect_guards("forward");

  DevBuf din = DevBuf::out(n, off), dgamma = DevBuf::out(C);
  DevBuf ws = workspace(cuda::layer_scale_backward_workspace_floats(rows, C));
  cuda::layer_scale_backward(want_din ? din.p() : nullptr, want_dgamma ? dgamma.p() : nullptr,
                             dg.p(), dxin.p(), dgamma_in.p(), rows, C, ws.p(), nullptr);
  device_sync();
  ws.expect_guards("workspace");  // the partials stay inside the advertised size
  if (want_din) {
    expect_bitwise("din", din.get(), dx);  // one correctly rounded multiply
    din.expect_guards("din");
  } else {
    din.expect_untouched("din");
  }
  if (!want_dgamma) {
    dgamma.expect_untouched("dgamma");
    return;
  }
  dgamma.expect_guards("dgamma");
  // dgamma[c] = sum over rows of dout * in, against the double reference. The rounding error
  // of any order of summation is at most (longest chain of sequential adds) * u * mag, with
  // mag = sum |dout * in| (first order). The GPU's chains: a block lane's rows
  // (<= ceil(rows / P) / 8 <= 7: P = min(2048, ceil(rows / 32)), >= 8 lanes), then the lanes in
  // order (<= 256, for C = 1), then the partials (groups of 64 rows: 64 / 8 + 8, then the
  // <= 32 group sums: 32 / 8 + 8; 28 in all): < 300, so kReduceTol.
  // Integer data is exact in any order: bitwise.
  std::vector<double> xd = dbl(x), gd = dbl(g), gammad = dbl(gamma), want(C), mag(C);
  cpu::layer_scale_backward<double>(nullptr, want.data(), gd.data(), xd.data(), gammad.data(), rows,
                                    C);
  const std::vector<double> ax = dbl(abs_of(x)), ag = dbl(abs_of(g));
  cpu::layer_scale_backward<double>(nullptr, mag.data(), ag.data(), ax.data(), gammad.data(), rows,
                                    C);
  if (integers) {
    std::vector<float> wantf(want.begin(), want.end());
    expect_bitwise("dgamma (exact integers)", dgamma.get(), wantf);
  } else {
    expect_close_mag("dgamma", dgamma.values(), want, mag, kReduceTol);
  }
}

void check_drop_path(int64_t N, int64_t per_sample, int64_t off, uint64_t seed) {
  const std::string what = cat("drop_path N=", N, " per_sample=", per_sample, " offset ", off);
  SCOPED_TRACE(what);
  Generator gen(seed);
  const int64_t n = N * per_sample;
  const std::vector<float> x = randf(n, gen), g = randf(n, gen);
  std::vector<float> scale(static_cast<size_t>(N));
  cpu::drop_path_scales<float>(scale.data(), N, 0.4, gen);  // some samples dropped, some kept
  std::vector<float> y(static_cast<size_t>(n)), dx(y);
  cpu::drop_path_forward<float>(y.data(), x.data(), scale.data(), N, per_sample);
  cpu::drop_path_backward<float>(dx.data(), g.data(), scale.data(), N, per_sample);
  DevBuf dxin(x, off), dg(g), dscale(scale), out = DevBuf::out(n, off), din = DevBuf::out(n);
  cuda::drop_path_forward(out.p(), dxin.p(), dscale.p(), N, per_sample, nullptr);
  cuda::drop_path_backward(din.p(), dg.p(), dscale.p(), N, per_sample, nullptr);
  device_sync();
  expect_bitwise("forward", out.get(), y);  // one correctly rounded multiply
  expect_bitwise("backward", din.get(), dx);
  out.expect_guards("forward");
  din.expect_guards("backward");
}

// =============================================================================================
// sum, global average pool
// =============================================================================================

void check_sum(int64_t n, int64_t off, bool integers, uint64_t seed) {
  const std::string what = cat("sum n=", n, " offset ", off, integers ? " integers" : "");
  SCOPED_TRACE(what);
  Generator gen(seed);
  const std::vector<float> x = integers ? randi(n, gen) : randf(n, gen, 1.0, 0.5);
  float want = 0;
  cpu::sum_forward<float>(&want, x.data(), n);
  DevBuf dx(x, off), out = DevBuf::out(1), ws = workspace(cuda::sum_forward_workspace_floats(n));
  cuda::sum_forward(out.p(), dx.p(), n, ws.p(), nullptr);
  device_sync();
  out.expect_guards("forward");
  ws.expect_guards("workspace");
  if (integers) {
    expect_bitwise("forward (exact integers)", out.get(), {want});
  } else {
    // Both sides add in double (error ~ n 1e-16 sum|x|, negligible) and round once to float:
    // the results may differ only where the two double sums straddle a rounding boundary, so
    // by at most 1 ulp of the result; plus 1e-12 of sum|x| for the double sums themselves.
    double mag = 0;
    for (float v : x) mag += std::abs(v);
    expect_close("forward", out.values(), {static_cast<double>(want)}, 1e-12 * mag, 2 * kU);
  }
  // Backward: din = dout[0] everywhere (a copy: bitwise).
  const float gval = 0.75f;
  DevBuf dout(std::vector<float>{gval}), din = DevBuf::out(n, off);
  cuda::sum_backward(din.p(), dout.p(), n, nullptr);
  device_sync();
  expect_bitwise("backward", din.get(), std::vector<float>(static_cast<size_t>(n), gval));
  din.expect_guards("backward");
}

void check_avgpool(const Act& s, int64_t off, bool integers, uint64_t seed) {
  const std::string what = cat("avgpool ", s.str(), " offset ", off, integers ? " integers" : "");
  SCOPED_TRACE(what);
  Generator gen(seed);
  const int64_t n = s.numel(), NC = s.N * s.C, HW = s.H * s.W;
  const std::vector<float> x = integers ? randi(n, gen) : randf(n, gen), g = randf(NC, gen);
  std::vector<float> y(static_cast<size_t>(NC)), dx(static_cast<size_t>(n));
  cpu::global_avgpool_forward<float>(y.data(), x.data(), s.N, s.H, s.W, s.C);
  cpu::global_avgpool_backward<float>(dx.data(), g.data(), s.N, s.H, s.W, s.C);
  DevBuf dxin(x, off), dg(g, off), out = DevBuf::out(NC, off), din = DevBuf::out(n, off);
  cuda::global_avgpool_forward(out.p(), dxin.p(), s.N, s.H, s.W, s.C, nullptr);
  cuda::global_avgpool_backward(din.p(), dg.p(), s.N, s.H, s.W, s.C, nullptr);
  device_sync();
  out.expect_guards("forward");
  din.expect_guards("backward");
  // Forward: the GPU sums HW floats in fp32 and divides; the CPU sums in double. The GPU's
  // longest chain of sequential adds is a lane's share of the HW positions (<= HW / 8: >= 8
  // lanes), then the lanes in order (<= min(HW, 256) nonzero terms, 256 lanes when C = 1), so
  // the error is <= (HW / 8 + min(HW, 256) + 1) u * mean |x| (first order); twice that leaves
  // a 2x margin. Integer sums are exact, so only the final division rounds: the CPU divides in
  // double and rounds to float, the GPU divides in float, which can differ by one ulp (double
  // rounding), never more.
  std::vector<double> mag(static_cast<size_t>(NC), 0.0);
  for (int64_t i = 0; i < n; ++i) mag[(i / (HW * s.C)) * s.C + i % s.C] += std::abs(x[i]) / HW;
  if (integers) {
    const std::vector<float> got = out.get();
    int64_t worst = 0;
    for (int64_t i = 0; i < NC; ++i) worst = std::max(worst, ulp_distance(got[i], y[i]));
    EXPECT_LE(worst, 1) << "forward (exact integer sums): worst ulp distance " << worst;
  } else {
    const double chain = static_cast<double>(HW / 8 + std::min<int64_t>(HW, 256) + 1);
    expect_close_mag("forward", out.values(), dbl(y), mag, 2.0 * chain * kU);
  }
  // Backward: dout * (1 / HW), the same float multiply on both sides: bitwise.
  expect_bitwise("backward", din.get(), dx);
}

// =============================================================================================
// LayerNorm
// =============================================================================================

struct LnCase {
  int64_t rows, C;
  int64_t off = 0;       // 1: every row pointer misaligned (generic path)
  double mean = 0.0;     // of the inputs: a large mean tests the centring
  std::string str() const {
    return cat("rows=", rows, " C=", C, " offset ", off, " mean ", mean);
  }
};

struct LnData {
  std::vector<float> x, w, b, g;  // in (rows, C), weight, bias (C), dout (rows, C)
  std::vector<float> mean, rstd;  // the CPU forward's
  std::vector<float> y;           // the CPU forward's output
};

LnData ln_data(const LnCase& c, Generator& gen, bool integers = false) {
  LnData d;
  const int64_t n = c.rows * c.C;
  d.x = randf(n, gen, 1.0, c.mean);
  d.w = randf(c.C, gen, 0.5, 1.0);
  d.b = randf(c.C, gen, 0.5);
  d.g = integers ? randi(n, gen) : randf(n, gen);
  d.mean.resize(static_cast<size_t>(c.rows));
  d.rstd.resize(static_cast<size_t>(c.rows));
  d.y.resize(static_cast<size_t>(n));
  cpu::layernorm_forward<float>(d.y.data(), d.mean.data(), d.rstd.data(), d.x.data(), d.w.data(),
                                d.b.data(), c.rows, c.C, 1e-6);
  return d;
}

// The GPU's row statistics and row sums (of g and g xhat for din) are chains of at most
// C / 32 + 32 sequential adds (a lane's columns, then a 5-level butterfly; C <= 2052 here) on
// each side of a handful of roundings: 2 (C / 32 + 40) u of the magnitude bounds the error
// (first order) with the factor 2 as margin.
double ln_tol(int64_t C) { return 2.0 * (static_cast<double>(C) / 32 + 40) * kU; }

void check_layernorm_forward(const LnCase& c, uint64_t seed) {
  SCOPED_TRACE("layernorm forward " + c.str());
  Generator gen(seed);
  const LnData d = ln_data(c, gen);
  const int64_t rows = c.rows, C = c.C, n = rows * C;
  DevBuf x(d.x, c.off), w(d.w, c.off), b(d.b, c.off), out = DevBuf::out(n, c.off),
      mean = DevBuf::out(rows), rstd = DevBuf::out(rows);
  cuda::layernorm_forward(out.p(), mean.p(), rstd.p(), x.p(), w.p(), b.p(), rows, C, 1e-6, nullptr);
  device_sync();
  out.expect_guards("out");
  mean.expect_guards("mean");
  rstd.expect_guards("rstd");
  // Magnitudes: the mean's error scales with mean |x|; rstd's is relative; out = xhat w + b
  // has the error of x - mean (scale |x| + mean |x|, which bounds |mean| and the mean's error)
  // times rstd |w|, plus b's rounding.
  std::vector<double> mag_mean(static_cast<size_t>(rows)), mag_out(static_cast<size_t>(n));
  for (int64_t r = 0; r < rows; ++r) {
    double s = 0;
    for (int64_t k = 0; k < C; ++k) s += std::abs(d.x[r * C + k]);
    mag_mean[r] = s / C;
    for (int64_t k = 0; k < C; ++k)
      mag_out[r * C + k] = (std::abs(d.x[r * C + k]) + mag_mean[r]) * d.rstd[r] *
                               std::abs(d.w[k]) + std::abs(d.b[k]);
  }
  expect_close_mag("mean", mean.values(), dbl(d.mean), mag_mean, ln_tol(C));
  expect_close("rstd", rstd.values(), dbl(d.rstd), 0.0, ln_tol(C));
  expect_close_mag("out", out.values(), dbl(d.y), mag_out, ln_tol(C));
}

struct LnWanted {
  bool din = true, dw = true, db = true;
  std::string str() const {
    return std::string(din ? "din" : "-") + "," + (dw ? "dweight" : "-") + "," +
           (db ? "dbias" : "-");
  }
};

// Runs the CUDA backward with the CPU forward's mean and rstd; the inputs no requested
// gradient needs are passed as null (in, mean, rstd only for din or dweight; weight for din).
struct LnGrads {
  DevBuf din, dw, db;
};
LnGrads run_layernorm_backward(const LnCase& c, const LnData& d, LnWanted want) {
  const int64_t rows = c.rows, C = c.C, n = rows * C;
  DevBuf x(d.x, c.off), w(d.w, c.off), g(d.g, c.off), mean(d.mean), rstd(d.rstd);
  LnGrads r{DevBuf::out(n, c.off), DevBuf::out(C), DevBuf::out(C)};
  DevBuf ws = workspace(cuda::layernorm_backward_workspace_floats(rows, C));
  const bool xhat = want.din || want.dw;
  cuda::layernorm_backward(want.din ? r.din.p() : nullptr, want.dw ? r.dw.p() : nullptr,
                           want.db ? r.db.p() : nullptr, g.p(), xhat ? x.p() : nullptr,
                           want.din ? w.p() : nullptr, xhat ? mean.p() : nullptr,
                           xhat ? rstd.p() : nullptr, rows, C, ws.p(), nullptr);
  device_sync();
  ws.expect_guards("workspace");  // the partials stay inside the advertised size
  return r;
}

void check_layernorm_backward(const LnCase& c, uint64_t seed, LnWanted want = {},
                              bool integers = false) {
  SCOPED_TRACE("layernorm backward " + c.str() + " " + want.str() +
               (integers ? " integer dout" : ""));
  Generator gen(seed);
  const LnData d = ln_data(c, gen, integers);
  const int64_t rows = c.rows, C = c.C, n = rows * C;
  const LnGrads r = run_layernorm_backward(c, d, want);

  // The reference: the CPU backward (double sums, rounded to float) on the same mean and rstd.
  std::vector<float> din(static_cast<size_t>(n)), dw(static_cast<size_t>(C)), db(dw);
  cpu::layernorm_backward<float>(din.data(), dw.data(), db.data(), d.g.data(), d.x.data(),
                                 d.w.data(), d.mean.data(), d.rstd.data(), rows, C);
  // Magnitudes: din = rstd (g - mean g - xhat mean(g xhat)): the scale of each term, with
  // |xhat| replaced by X = (|x| + |mean|) rstd, the scale of the rounding of (x - mean) rstd;
  // dweight = sum_rows dout xhat and dbias = sum_rows dout: sums of |terms| (X for |xhat|).
  std::vector<double> mag_din(static_cast<size_t>(n)), mag_dw(static_cast<size_t>(C), 0.0),
      mag_db(mag_dw);
  for (int64_t i = 0; i < rows; ++i) {
    double mg = 0, mgx = 0;
    for (int64_t k = 0; k < C; ++k) {
      const double gk = std::abs(static_cast<double>(d.g[i * C + k]) * d.w[k]);
      const double xh = (std::abs(d.x[i * C + k]) + std::abs(d.mean[i])) * d.rstd[i];
      mg += gk / C;
      mgx += gk * xh / C;
      mag_dw[k] += std::abs(d.g[i * C + k]) * xh;
      mag_db[k] += std::abs(d.g[i * C + k]);
    }
    for (int64_t k = 0; k < C; ++k) {
      const double gk = std::abs(static_cast<double>(d.g[i * C + k]) * d.w[k]);
      const double xh = (std::abs(d.x[i * C + k]) + std::abs(d.mean[i])) * d.rstd[i];
      mag_din[i * C + k] = d.rstd[i] * (gk + mg + xh * mgx + 1e-30);
    }
  }
  if (want.din) {
    expect_close_mag("din", r.din.values(), dbl(din), mag_din, ln_tol(C));
    r.din.expect_guards("din");
  } else {
    r.din.expect_untouched("din");
  }
  // dweight, dbias: the GPU's longest chain of sequential adds is, on the fast path, a group's
  // rows of a block (<= ceil(rows / P) <= 49), a butterfly across the groups (<= 2 levels), the
  // 8 warps, then the partials (<= 28 with P <= 2048: reduce.cuh's two passes): < 90; on the
  // generic path a lane's rows (<= 7), the lanes (<= 256, C = 1), the partials: < 300. Each term
  // carries a few u of its own (xhat). So kReduceTol of the magnitude. With integer dout,
  // every partial of dbias is an integer < 2^24: exact in any order, bitwise.
  const double tol_params = kReduceTol;
  if (want.dw) {
    expect_close_mag("dweight", r.dw.values(), dbl(dw), mag_dw, tol_params);
    r.dw.expect_guards("dweight");
  } else {
    r.dw.expect_untouched("dweight");
  }
  if (want.db) {
    if (integers) expect_bitwise("dbias (exact integers)", r.db.get(), db);
    else expect_close_mag("dbias", r.db.values(), dbl(db), mag_db, tol_params);
    r.db.expect_guards("dbias");
  } else {
    r.db.expect_untouched("dbias");
  }
}

// Every lane layout of the fast path (TPR, VPT) = (8, 1..4), (16, 3..4), (32, 3/4/6/8), its
// edges, and the generic path (C % 4 != 0, C > 1024).
const int64_t kLnChannels[] = {1,   3,   4,   10,  32,  40,  64,  96,  100, 128,  132,  192,
                               256, 260, 384, 512, 516, 768, 900, 1024, 1028, 1030, 2052};

std::vector<LnCase> layernorm_cases() {
  std::vector<LnCase> v;
  for (const Act& a : all_acts()) v.push_back({a.rows(), a.C});
  int i = 0;
  for (int64_t C : kLnChannels)
    for (int64_t rows : {1, 7, 65, 300}) v.push_back({rows, C, 0, (i++ % 3) ? 0.0 : 3.0});
  return v;
}

// =============================================================================================
// cross-entropy
// =============================================================================================

struct CeCase {
  int64_t N, K;
  bool soft;
  double smoothing;
  std::string str() const {
    return cat("N=", N, " K=", K, soft ? " soft" : " hard", " smoothing ", smoothing);
  }
};

struct CeData {
  std::vector<float> logits, targets;  // (N, K); targets empty for hard labels
  std::vector<int64_t> labels;         // (N); empty for soft targets
};

CeData ce_data(const CeCase& c, Generator& gen) {
  CeData d;
  d.logits = randf(c.N * c.K, gen, 3.0);
  if (c.N > 0) d.logits[0] += 60.0f;  // one very confident logit: exp underflows elsewhere
  if (c.soft) {
    d.targets.resize(static_cast<size_t>(c.N * c.K));
    for (int64_t n = 0; n < c.N; ++n) {
      double s = 0;
      for (int64_t k = 0; k < c.K; ++k) {
        const double t = gen.uniform() < 0.3 ? 0.0 : gen.uniform();  // some exact zeros
        d.targets[n * c.K + k] = static_cast<float>(t);
        s += t;
      }
      for (int64_t k = 0; k < c.K; ++k)
        d.targets[n * c.K + k] = s > 0 ? static_cast<float>(d.targets[n * c.K + k] / s) : 0.0f;
    }
  } else {
    for (int64_t n = 0; n < c.N; ++n)
      d.labels.push_back(static_cast<int64_t>(gen.next_u32() % c.K));
  }
  return d;
}

// Device copy of int64 labels (empty: a null pointer).
struct DevLabels {
  Tensor t;
  explicit DevLabels(const std::vector<int64_t>& v) {
    if (!v.empty()) {
      t = Tensor::from_data<int64_t>(Shape{static_cast<int64_t>(v.size())}, v, kDev);
      device_sync();
    }
  }
  const int64_t* p() const { return t.defined() ? t.data<int64_t>() : nullptr; }
};

void check_cross_entropy(const CeCase& c, uint64_t seed) {
  SCOPED_TRACE("cross_entropy " + c.str());
  Generator gen(seed);
  const CeData d = ce_data(c, gen);
  const int64_t N = c.N, K = c.K, n = N * K;
  const float* tgt = c.soft ? d.targets.data() : nullptr;
  const int64_t* lab = c.soft ? nullptr : d.labels.data();
  float loss = 0;
  std::vector<float> probs(static_cast<size_t>(n)), dlogits(probs);
  cpu::cross_entropy_forward<float>(&loss, probs.data(), d.logits.data(), lab, tgt, N, K,
                                    c.smoothing);
  const float dloss = 1.7f;
  cpu::cross_entropy_backward<float>(dlogits.data(), &dloss, probs.data(), lab, tgt, N, K,
                                     c.smoothing);

  DevBuf logits(d.logits), targets(d.targets), dprobs = DevBuf::out(n), dl = DevBuf::out(1);
  DevLabels labels(d.labels);
  DevBuf ws = workspace(cuda::cross_entropy_forward_workspace_floats(N, K));
  cuda::cross_entropy_forward(dl.p(), dprobs.p(), logits.p(), labels.p(),
                              c.soft ? targets.p() : nullptr, N, K, c.smoothing, ws.p(), nullptr);
  device_sync();
  ws.expect_guards("workspace");
  dprobs.expect_guards("probs");
  dl.expect_guards("loss");

  // The per-row targets t and the reference's lse, for the magnitudes.
  auto target = [&](int64_t r, int64_t k) {
    if (c.soft) return static_cast<double>(d.targets[r * K + k]);
    return c.smoothing / K + (d.labels[r] == k ? 1.0 - c.smoothing : 0.0);
  };
  double mag_loss = 0;
  for (int64_t r = 0; r < N; ++r) {
    const float* x = d.logits.data() + r * K;
    const double mx = *std::max_element(x, x + K);
    double s = 0;
    for (int64_t k = 0; k < K; ++k) s += std::exp(x[k] - mx);
    const double lse = mx + std::log(s);
    for (int64_t k = 0; k < K; ++k)
      mag_loss += target(r, k) * (std::abs(lse - x[k]) + std::abs(lse) + 1) / N;
  }
  // Loss: lse carries the error of a fp32 sum of K exponentials (chains <= K / 128 + 14 adds,
  // expf 2 ulp) and of logf; each term t (lse - x) one subtraction and one product more; the
  // row sums chains of <= K / 128 + 14 adds. All scale with sum t (|lse - x| + |lse| + 1): 64 u
  // (K <= 1000 gives chains < 30) of that magnitude, a 2x margin.
  expect_close_mag("loss", dl.values(), {static_cast<double>(loss)}, {mag_loss}, 64 * kU);
  // probs = exp(x - lse): relative error <= |absolute error of (x - lse)| + 2 ulp (expf), where
  // x - lse rounds with error u |x - lse| and lse carries u |lse| (its own rounding) plus the
  // ~30 u of log(sum); with the +60 logit of row 0, |x - lse| < 90 and |lse| < 80: < 200 u
  // relative, so 256 u. The absolute part covers probabilities that underflow into denormals.
  expect_close("probs", dprobs.values(), dbl(probs), 1e-37, 256 * kU);

  // Backward, on the CPU's probs: (dloss / N) (p sum t - t) in fp32 on the GPU (sum t of soft
  // targets a block sum, chains <= K / 128 + 14 adds), double on the CPU: 32 u of
  // |dloss / N| (p sum t + t).
  DevBuf p(probs), dloss_dev(std::vector<float>{dloss}), dlog = DevBuf::out(n);
  cuda::cross_entropy_backward(dlog.p(), dloss_dev.p(), p.p(), labels.p(),
                               c.soft ? targets.p() : nullptr, N, K, c.smoothing, nullptr);
  device_sync();
  dlog.expect_guards("dlogits");
  std::vector<double> mag(static_cast<size_t>(n));
  for (int64_t r = 0; r < N; ++r) {
    double ts = 0;
    for (int64_t k = 0; k < K; ++k) ts += target(r, k);
    for (int64_t k = 0; k < K; ++k)
      mag[r * K + k] = std::abs(dloss / N) * (probs[r * K + k] * ts + target(r, k)) + 1e-30;
  }
  expect_close_mag("dlogits", dlog.values(), dbl(dlogits), mag, 32 * kU);
}

// =============================================================================================
// AdamW
// =============================================================================================

// The host side of one multi-tensor step, computed as AdamW::step does (train/optim/adamw.cpp),
// for the parameters that have a gradient: one slot each.
struct AdamWHost {
  double beta1 = 0.9, beta2 = 0.999, eps = 1e-8;
  cuda::AdamWScalars scalars() const {
    return {static_cast<float>(beta1), static_cast<float>(1 - beta1), static_cast<float>(beta2),
            static_cast<float>(1 - beta2), static_cast<float>(eps)};
  }
  cuda::AdamWSlot slot(float* p, const float* g, float* m, float* v, int64_t n, int64_t t,
                       double lr, double lr_scale, double weight_decay, bool decay) const {
    const double lr_p = lr * lr_scale;
    const double wd_p = decay ? weight_decay : 0.0;
    const double bias_correction1 = 1 - std::pow(beta1, static_cast<double>(t));
    const double bias_correction2 = 1 - std::pow(beta2, static_cast<double>(t));
    const float decay_mul = static_cast<float>(1 - lr_p * wd_p);
    return {p, g, m, v, n, static_cast<float>(-(lr_p / bias_correction1)),
            static_cast<float>(std::sqrt(bias_correction2)), wd_p != 0 ? decay_mul : 1.0f};
  }
};

}  // namespace
#endif  // CNX_TEST_CUDA

// =============================================================================================
// the tests
// =============================================================================================

TEST(CudaOps, AddMatchesCpuBitwise) {
#if CNX_TEST_CUDA
  CNX_SKIP_WITHOUT_DEVICE();
  uint64_t seed = 1;
  for (int64_t n : kSizes) {
    check_add(n, 0, 0, 0, seed++);
    check_add(n, 1, 0, 0, seed++);  // each operand misaligned in turn: the scalar path
    check_add(n, 0, 1, 0, seed++);
    check_add(n, 0, 0, 1, seed++);
  }
#else
  CNX_SKIP_BUILT_WITHOUT_CUDA();
#endif
}

TEST(CudaOps, MulMatchesCpuBitwiseEveryGradientSubset) {
#if CNX_TEST_CUDA
  CNX_SKIP_WITHOUT_DEVICE();
  uint64_t seed = 100;
  for (int64_t n : kSizes)
    for (int64_t off : {0, 1}) check_mul(n, off, seed++);
#else
  CNX_SKIP_BUILT_WITHOUT_CUDA();
#endif
}

TEST(CudaOps, GeluMatchesCpu) {
#if CNX_TEST_CUDA
  CNX_SKIP_WITHOUT_DEVICE();
  uint64_t seed = 200;
  for (int64_t n : kSizes)
    for (int64_t off : {0, 1}) check_gelu(n, off, seed++);
  // The 4C hidden activation of stage 0 at batch 1.
  check_gelu(56 * 56 * 384, 0, seed++);
#else
  CNX_SKIP_BUILT_WITHOUT_CUDA();
#endif
}

TEST(CudaOps, LayerScaleMatchesCpu) {
#if CNX_TEST_CUDA
  CNX_SKIP_WITHOUT_DEVICE();
  uint64_t seed = 300;
  for (const Act& a : all_acts())
    for (int64_t off : {0, 1}) check_layer_scale(a, off, true, true, false, seed++);
  // rows large enough for every one of the 2048 row blocks (some empty at the end).
  check_layer_scale({1, 1, 100000, 8}, 0, true, true, false, seed++);
#else
  CNX_SKIP_BUILT_WITHOUT_CUDA();
#endif
}

TEST(CudaOps, LayerScaleBackwardGradientSubsetsAndExactSums) {
#if CNX_TEST_CUDA
  CNX_SKIP_WITHOUT_DEVICE();
  uint64_t seed = 400;
  for (const Act& a : {Act{1, 9, 9, 96}, Act{3, 7, 5, 100}, Act{1, 56, 56, 3}}) {
    check_layer_scale(a, 0, true, false, false, seed++);
    check_layer_scale(a, 0, false, true, false, seed++);
    check_layer_scale(a, 1, false, true, false, seed++);
  }
  // Integer data: dgamma is exact in any order, so it must equal the reference bitwise.
  for (const Act& a : all_acts()) check_layer_scale(a, 0, true, true, true, seed++);
  check_layer_scale({1, 1, 100000, 8}, 0, true, true, true, seed++);
  check_layer_scale({1, 1, 70001, 3}, 1, false, true, true, seed++);
#else
  CNX_SKIP_BUILT_WITHOUT_CUDA();
#endif
}

TEST(CudaOps, DropPathMatchesCpuBitwise) {
#if CNX_TEST_CUDA
  CNX_SKIP_WITHOUT_DEVICE();
  uint64_t seed = 500;
  for (const Act& a : all_acts())
    for (int64_t off : {0, 1}) check_drop_path(a.N, a.H * a.W * a.C, off, seed++);
  check_drop_path(128, 1, 0, seed++);     // per-sample size 1
  check_drop_path(7, 4 * 1001, 0, seed++);
  check_drop_path(5, 4 * 1001 + 2, 0, seed++);  // not a multiple of 4: scalar path
#else
  CNX_SKIP_BUILT_WITHOUT_CUDA();
#endif
}

TEST(CudaOps, SumMatchesCpu) {
#if CNX_TEST_CUDA
  CNX_SKIP_WITHOUT_DEVICE();
  uint64_t seed = 600;
  for (int64_t n : kSizes)
    for (int64_t off : {0, 1}) {
      check_sum(n, off, false, seed++);
      check_sum(n, off, true, seed++);
    }
  check_sum(3 * 1000 * 1000 + 1, 0, true, seed++);  // several chunks per block, exact
  check_sum(3 * 1000 * 1000 + 1, 1, false, seed++);
#else
  CNX_SKIP_BUILT_WITHOUT_CUDA();
#endif
}

TEST(CudaOps, GlobalAvgPoolMatchesCpu) {
#if CNX_TEST_CUDA
  CNX_SKIP_WITHOUT_DEVICE();
  uint64_t seed = 700;
  for (const Act& a : all_acts())
    for (int64_t off : {0, 1}) {
      check_avgpool(a, off, false, seed++);
      check_avgpool(a, off, true, seed++);
    }
  check_avgpool({4, 7, 7, 768}, 0, false, seed++);  // the ConvNeXt-T head input, batch 4
  check_avgpool({3, 2, 3, 1000}, 0, false, seed++);   // C past one column tile
#else
  CNX_SKIP_BUILT_WITHOUT_CUDA();
#endif
}

TEST(CudaOps, LayerNormForwardMatchesCpu) {
#if CNX_TEST_CUDA
  CNX_SKIP_WITHOUT_DEVICE();
  uint64_t seed = 800;
  for (const LnCase& c : layernorm_cases()) check_layernorm_forward(c, seed++);
  for (int64_t C : {96, 100, 768})
    check_layernorm_forward({9, C, 1, 2.0}, seed++);  // misaligned: generic path
#else
  CNX_SKIP_BUILT_WITHOUT_CUDA();
#endif
}

TEST(CudaOps, LayerNormBackwardMatchesCpu) {
#if CNX_TEST_CUDA
  CNX_SKIP_WITHOUT_DEVICE();
  uint64_t seed = 900;
  for (const LnCase& c : layernorm_cases()) check_layernorm_backward(c, seed++);
  for (int64_t C : {96, 100, 768}) check_layernorm_backward({9, C, 1, 2.0}, seed++);
  // Many row blocks (P = 2048, the last few empty) for both paths.
  check_layernorm_backward({100000, 8}, seed++);
  check_layernorm_backward({100000, 3}, seed++);
#else
  CNX_SKIP_BUILT_WITHOUT_CUDA();
#endif
}

TEST(CudaOps, LayerNormBackwardGradientSubsetsAndExactSums) {
#if CNX_TEST_CUDA
  CNX_SKIP_WITHOUT_DEVICE();
  uint64_t seed = 1000;
  for (const LnCase& c : {LnCase{300, 96}, LnCase{300, 100}, LnCase{49, 768}, LnCase{65, 40, 1}})
    for (int mask = 0; mask < 8; ++mask) {
      const LnWanted w{(mask & 1) != 0, (mask & 2) != 0, (mask & 4) != 0};
      check_layernorm_backward(c, seed++, w);
    }
  // Integer dout: every partial of dbias is exact, so dbias must equal the reference bitwise.
  for (const Act& a : all_acts()) check_layernorm_backward({a.rows(), a.C}, seed++, {}, true);
  check_layernorm_backward({100000, 8}, seed++, {}, true);
  check_layernorm_backward({70001, 3}, seed++, {}, true);
#else
  CNX_SKIP_BUILT_WITHOUT_CUDA();
#endif
}

// The second stage of the parameter-gradient reductions (reduce.cuh's launch_column_sums) at
// ConvNeXt's C = 96 with many partial rows: 40000 rows make P = 1250 partial rows, so the first
// pass runs 20 groups of 64 rows (the last one 34 rows) for each column tile and the second adds
// the 20 group sums; 2100 rows make P = 66, just past one group (a group of 2 rows). LayerNorm's
// dweight and dbias (width 2C = 192: 6 column tiles) and layer scale's dgamma (width 96) against
// the double reference, then on integer data, exact in any order, bitwise (a row lost or added
// twice by the split would show), and every result twice: bitwise equal. Under
// CNX_EMU_RACECHECK=1 every launch also runs in reverse block and thread order and must give the
// same bytes, so the result does not depend on the schedule.
TEST(CudaOps, ColumnSumsSplitRowsAcrossBlocks) {
#if CNX_TEST_CUDA
  CNX_SKIP_WITHOUT_DEVICE();
  uint64_t seed = 1300;
  for (int64_t rows : {int64_t{40000}, int64_t{2100}}) {
    check_layernorm_backward({rows, 96}, seed++);
    check_layernorm_backward({rows, 96}, seed++, {false, true, true}, true);
    check_layer_scale({1, 1, rows, 96}, 0, false, true, false, seed++);
    check_layer_scale({1, 1, rows, 96}, 0, false, true, true, seed++);
  }
  Generator gen(seed);
  const int64_t rows = 40000, C = 96;
  const LnData d = ln_data({rows, C}, gen);
  DevBuf x(d.x), w(d.w), g(d.g), mean(d.mean), rstd(d.rstd);
  DevBuf ws_ln = workspace(cuda::layernorm_backward_workspace_floats(rows, C));
  DevBuf ws_ls = workspace(cuda::layer_scale_backward_workspace_floats(rows, C));
  std::vector<std::vector<float>> runs[2];
  for (int run = 0; run < 2; ++run) {
    DevBuf dw = DevBuf::out(C), db = DevBuf::out(C), dgamma = DevBuf::out(C);
    cuda::layernorm_backward(nullptr, dw.p(), db.p(), g.p(), x.p(), w.p(), mean.p(), rstd.p(),
                             rows, C, ws_ln.p(), nullptr);
    cuda::layer_scale_backward(static_cast<float*>(nullptr), dgamma.p(), g.p(), x.p(), w.p(),
                               rows, C, ws_ls.p(), nullptr);
    device_sync();
    runs[run] = {dw.get(), db.get(), dgamma.get()};
  }
  const char* names[] = {"dweight", "dbias", "dgamma"};
  for (size_t k = 0; k < 3; ++k) expect_bitwise(names[k], runs[1][k], runs[0][k]);
#else
  CNX_SKIP_BUILT_WITHOUT_CUDA();
#endif
}

// =============================================================================================
// patchify: the gather (space-to-depth) and scatter (depth-to-space) move values exactly
// =============================================================================================

#if CNX_TEST_CUDA
// cuda::patchify_forward / backward with the identity as weight (Co = k k Ci, no bias), so that
// out is the patch matrix P itself and the patch gradient dP is dout itself: small integers,
// exact in fp32, TF32 and bf16, pass through the GEMMs unchanged, and the result must equal
// the index formula below bitwise. That checks the kernels' indexing (every element from the
// right place, the ignored rows and columns past Ho k, Wo k zero in din) independently of the
// GEMM's rounding. T: float or bf16 (the bf16 tensors are the same integers).
void check_patchify_exact(DType dt, int64_t N, int64_t H, int64_t W, int64_t Ci, int64_t k,
                          uint64_t seed) {
  const std::string what = cat("patchify exact ", dt == DType::bf16 ? "bf16" : "f32", " N", N,
                               " H", H, " W", W, " Ci", Ci, " k", k);
  SCOPED_TRACE(what);
  Generator gen(seed);
  const int64_t Ho = H / k, Wo = W / k, KK = k * k * Ci, rows = N * Ho * Wo;
  const std::vector<float> x = randi(N * H * W * Ci, gen), dy = randi(rows * KK, gen);
  std::vector<float> eye(static_cast<size_t>(KK * KK), 0.0f);
  for (int64_t o = 0; o < KK; ++o) eye[o * KK + o] = 1.0f;
  // The reference: P[(n, i, j), (p k + q) Ci + c] = x[n, i k + p, j k + q, c], and din the
  // same map backwards, 0 where no patch reads the pixel.
  std::vector<float> want_out(static_cast<size_t>(rows * KK));
  std::vector<float> want_din(x.size(), 0.0f);
  for (int64_t n = 0; n < N; ++n)
    for (int64_t i = 0; i < Ho; ++i)
      for (int64_t j = 0; j < Wo; ++j)
        for (int64_t p = 0; p < k; ++p)
          for (int64_t q = 0; q < k; ++q)
            for (int64_t c = 0; c < Ci; ++c) {
              const int64_t r = (n * Ho + i) * Wo + j, col = (p * k + q) * Ci + c;
              const int64_t pix = ((n * H + i * k + p) * W + j * k + q) * Ci + c;
              want_out[r * KK + col] = x[pix];
              want_din[pix] = dy[r * KK + col];
            }
  const auto dev = [&](const std::vector<float>& v) {
    Tensor t = Tensor::from_data<float>(Shape{static_cast<int64_t>(v.size())}, v).to(dt).to(kDev);
    device_sync();
    return t;
  };
  Tensor xd = dev(x), dyd = dev(dy), wd = dev(eye);
  // Outputs start as NaN (the fill of zeros' f32 bits would hide an unwritten 0 of din).
  Tensor out = dev(std::vector<float>(want_out.size(), NAN));
  Tensor din = dev(std::vector<float>(x.size(), NAN));
  {
    cuda::DeviceGuard guard(kDev);
    const cudaStream_t s = cuda::current_stream();
    if (dt == DType::bf16) {
      cuda::patchify_forward(out.data<bf16>(), xd.data<bf16>(), wd.data<bf16>(), nullptr, N, H,
                             W, Ci, KK, k, s);
      cuda::patchify_backward(din.data<bf16>(), nullptr, nullptr, dyd.data<bf16>(), nullptr,
                              wd.data<bf16>(), N, H, W, Ci, KK, k, s);
    } else {
      cuda::patchify_forward(out.data<float>(), xd.data<float>(), wd.data<float>(), nullptr, N, H,
                             W, Ci, KK, k, s);
      cuda::patchify_backward(din.data<float>(), nullptr, nullptr, dyd.data<float>(), nullptr,
                              wd.data<float>(), N, H, W, Ci, KK, k, s);
    }
  }
  const auto host = [](const Tensor& t) { return t.to(Device::cpu()).to(DType::f32).to_vector<float>(); };
  expect_bitwise("out (the patch matrix)", host(out), want_out);
  expect_bitwise("din (the scattered dout)", host(din), want_din);
}
#endif  // CNX_TEST_CUDA

TEST(CudaOps, PatchifyGatherAndScatterMoveValuesExactly) {
#if CNX_TEST_CUDA
  CNX_SKIP_WITHOUT_DEVICE();
  uint64_t seed = 1500;
  for (DType dt : {DType::f32, DType::bf16}) {
    check_patchify_exact(dt, 2, 16, 16, 3, 4, seed++);   // the stem: Ci = 3, one element a step
    check_patchify_exact(dt, 1, 23, 19, 3, 4, seed++);   // odd sizes: 3 rows, 3 columns ignored
    check_patchify_exact(dt, 3, 9, 11, 1, 4, seed++);    // a grey image, batch 3
    check_patchify_exact(dt, 1, 7, 13, 5, 3, seed++);    // k = 3, Ci = 5
    check_patchify_exact(dt, 2, 9, 7, 8, 2, seed++);     // Ci = 8: the 16-byte pack path (both)
    check_patchify_exact(dt, 1, 10, 6, 12, 2, seed++);   // Ci = 12: packs for f32 only
    check_patchify_exact(dt, 1, 3, 2, 4, 4, seed++);     // H, W < k: out empty, din all zeros
  }
#else
  CNX_SKIP_BUILT_WITHOUT_CUDA();
#endif
}

TEST(CudaOps, CrossEntropyMatchesCpu) {
#if CNX_TEST_CUDA
  CNX_SKIP_WITHOUT_DEVICE();
  uint64_t seed = 1100;
  for (int64_t N : {1, 3, 128})
    for (int64_t K : {1, 10, 1000})
      for (const auto& [soft, smoothing] : {std::pair{false, 0.0}, std::pair{false, 0.1},
                                            std::pair{true, 0.0}})
        check_cross_entropy({N, K, soft, smoothing}, seed++);
  check_cross_entropy({5, 1001, false, 0.1}, seed++);  // K not a multiple of the block
#else
  CNX_SKIP_BUILT_WITHOUT_CUDA();
#endif
}

TEST(CudaOps, CrossEntropyBadLabelGivesNaN) {
#if CNX_TEST_CUDA
  CNX_SKIP_WITHOUT_DEVICE();
  // The kernels cannot throw; a label outside [0, K) must poison its row, not read or write out
  // of bounds (the guards) or pass silently.
  const int64_t N = 3, K = 10;
  Generator gen(1200);
  DevBuf logits(randf(N * K, gen)), probs = DevBuf::out(N * K), loss = DevBuf::out(1);
  DevLabels labels(std::vector<int64_t>{2, K, 5});
  DevBuf ws = workspace(cuda::cross_entropy_forward_workspace_floats(N, K));
  cuda::cross_entropy_forward(loss.p(), probs.p(), logits.p(), labels.p(), nullptr, N, K, 0.1,
                              ws.p(), nullptr);
  device_sync();
  EXPECT_TRUE(std::isnan(loss.get()[0])) << "loss " << loss.get()[0];
  loss.expect_guards("loss");
  probs.expect_guards("probs");
  DevBuf dloss(std::vector<float>{1.0f}), dlog = DevBuf::out(N * K);
  cuda::cross_entropy_backward(dlog.p(), dloss.p(), probs.p(), labels.p(), nullptr, N, K, 0.1,
                               nullptr);
  device_sync();
  const std::vector<float> g = dlog.get();
  for (int64_t k = 0; k < K; ++k) {
    EXPECT_TRUE(std::isnan(g[1 * K + k])) << "row 1, k " << k;
    EXPECT_FALSE(std::isnan(g[0 * K + k]) || std::isnan(g[2 * K + k])) << "k " << k;
  }
  dlog.expect_guards("dlogits");
#else
  CNX_SKIP_BUILT_WITHOUT_CUDA();
#endif
}

TEST(CudaOps, AdamWMatchesCpuOptimiserToTheBit) {
#if CNX_TEST_CUDA
  CNX_SKIP_WITHOUT_DEVICE();
  // 53 tensors (two launches of 48 + 5 slots) of odd sizes, one empty, decay on and off,
  // layer-decay lr scales, 6 steps with a changing lr and weight decay; on step 3 one parameter
  // has no gradient (skipped: neither decayed nor moved, its step count unchanged). Two device
  // buffers start one float past an aligned address (the scalar path).
  const int64_t sizes[] = {1, 3, 5, 17, 96, 100, 4096, 4099, 12289, 0, 100001, 7, 384, 768, 9};
  Generator gen(1300);
  std::vector<Parameter> params;
  std::vector<double> lr_scales;
  for (int i = 0; i < 53; ++i) {
    const int64_t n = sizes[i % 15] + (i / 15);
    Parameter p;
    p.name = cat("p", i);
    p.official_shape = Shape{n};
    p.value = Tensor::from_data<float>(Shape{n}, randf(n, gen, 0.5));
    p.decay = i % 3 != 0;
    params.push_back(p);
    lr_scales.push_back(std::pow(0.7, i % 5));
  }
  AdamW cpu_opt(params, AdamWOptions{}, lr_scales);
  AdamWHost host;
  // The device state: param, m, v, grad of each tensor.
  std::vector<DevBuf> dp, dm, dv, dg;
  for (size_t i = 0; i < params.size(); ++i) {
    const int64_t n = params[i].value.numel(), off = (i == 4 || i == 20) ? 1 : 0;
    dp.emplace_back(params[i].value.to_vector<float>(), off);
    dm.emplace_back(std::vector<float>(static_cast<size_t>(n), 0.0f), off);
    dv.emplace_back(std::vector<float>(static_cast<size_t>(n), 0.0f));
    dg.emplace_back(std::vector<float>(static_cast<size_t>(n), 0.0f), off);
  }
  std::vector<int64_t> steps(params.size(), 0);
  for (int step = 1; step <= 6; ++step) {
    const double lr = 1e-3 * step, wd = step == 5 ? 0.0 : 0.05 * step;
    std::vector<cuda::AdamWSlot> slots;
    for (size_t i = 0; i < params.size(); ++i) {
      const int64_t n = params[i].value.numel();
      if (step == 3 && i == 7) {
        params[i].value.set_grad(Tensor());
        continue;
      }
      // Gradients of very different sizes, some exactly zero, so v spans a wide range.
      std::vector<float> g = randf(n, gen, std::pow(10.0, static_cast<double>(i % 7) - 4));
      for (int64_t k = 0; k < n; k += 11) g[k] = 0.0f;
      params[i].value.set_grad(Tensor::from_data<float>(Shape{n}, g));
      dg[i] = DevBuf(g, (i == 4 || i == 20) ? 1 : 0);
      slots.push_back(host.slot(dp[i].p(), dg[i].p(), dm[i].p(), dv[i].p(), n, ++steps[i], lr,
                                lr_scales[i], wd, params[i].decay));
    }
    cpu_opt.step(lr, wd);
    cuda::adamw_step(slots.data(), static_cast<int64_t>(slots.size()), host.scalars(), nullptr);
    device_sync();
    // Same inputs, the same float operations in the same order with correct rounding on both
    // sides (no FMA contraction, IEEE sqrt and division): the results should be identical. Up
    // to 2 ulp are tolerated in case a compiler evaluates one expression differently; the worst
    // distance is printed.
    int64_t worst = 0;
    for (size_t i = 0; i < params.size(); ++i) {
      EXPECT_EQ(cpu_opt.param_step(i), steps[i]) << params[i].name;
      const std::vector<float> cp = params[i].value.to_vector<float>(),
                               cm = cpu_opt.exp_avg(i).to_vector<float>(),
                               cv = cpu_opt.exp_avg_sq(i).to_vector<float>();
      const std::vector<float> gp = dp[i].get(), gm = dm[i].get(), gv = dv[i].get();
      for (size_t k = 0; k < cp.size(); ++k) {
        const int64_t d = std::max({ulp_distance(cp[k], gp[k]), ulp_distance(cm[k], gm[k]),
                                    ulp_distance(cv[k], gv[k])});
        worst = std::max(worst, d);
        if (d > 2) {
          ADD_FAILURE() << "step " << step << " " << params[i].name << "[" << k << "]: param "
                        << gp[k] << " want " << cp[k] << ", m " << gm[k] << " want " << cm[k]
                        << ", v " << gv[k] << " want " << cv[k];
          break;
        }
      }
      dp[i].expect_guards(params[i].name + " param");
      dm[i].expect_guards(params[i].name + " m");
      dv[i].expect_guards(params[i].name + " v");
    }
    std::printf("AdamW step %d: worst ulp distance GPU vs CPU %lld\n", step,
                static_cast<long long>(worst));
  }
#else
  CNX_SKIP_BUILT_WITHOUT_CUDA();
#endif
}

TEST(CudaOps, ReductionsAreDeterministic) {
#if CNX_TEST_CUDA
  CNX_SKIP_WITHOUT_DEVICE();
  // Each reduction twice on the same inputs: bitwise equal results (no atomics, a fixed order).
  Generator gen(1400);
  for (const Act& a : {Act{2, 56, 56, 96}, Act{3, 9, 7, 100}, Act{2, 7, 7, 768}}) {
    SCOPED_TRACE(a.str());
    const int64_t rows = a.rows(), C = a.C, n = a.numel();
    const LnData d = ln_data({rows, C}, gen);
    DevBuf x(d.x), w(d.w), b(d.b), g(d.g), mean(d.mean), rstd(d.rstd);
    DevBuf ws_ln = workspace(cuda::layernorm_backward_workspace_floats(rows, C));
    DevBuf ws_ls = workspace(cuda::layer_scale_backward_workspace_floats(rows, C));
    DevBuf ws_sum = workspace(cuda::sum_forward_workspace_floats(n));
    std::vector<std::vector<float>> runs[2];
    for (int run = 0; run < 2; ++run) {
      DevBuf din = DevBuf::out(n), dw = DevBuf::out(C), db = DevBuf::out(C),
             dgamma = DevBuf::out(C), ls_din = DevBuf::out(n), total = DevBuf::out(1),
             pooled = DevBuf::out(a.N * C), ln_out = DevBuf::out(n), ln_mean = DevBuf::out(rows),
             ln_rstd = DevBuf::out(rows);
      cuda::layernorm_forward(ln_out.p(), ln_mean.p(), ln_rstd.p(), x.p(), w.p(), b.p(), rows, C,
                              1e-6, nullptr);
      cuda::layernorm_backward(din.p(), dw.p(), db.p(), g.p(), x.p(), w.p(), mean.p(), rstd.p(),
                               rows, C, ws_ln.p(), nullptr);
      cuda::layer_scale_backward(ls_din.p(), dgamma.p(), g.p(), x.p(), w.p(), rows, C, ws_ls.p(),
                                 nullptr);
      cuda::sum_forward(total.p(), x.p(), n, ws_sum.p(), nullptr);
      cuda::global_avgpool_forward(pooled.p(), x.p(), a.N, a.H, a.W, C, nullptr);
      device_sync();
      runs[run] = {ln_out.get(), ln_mean.get(), ln_rstd.get(), din.get(), dw.get(), db.get(),
                   dgamma.get(), total.get(), pooled.get()};
    }
    const char* names[] = {"layernorm out", "mean", "rstd", "layernorm din", "dweight", "dbias",
                           "layer_scale dgamma", "sum", "avgpool"};
    for (size_t k = 0; k < runs[0].size(); ++k) expect_bitwise(names[k], runs[1][k], runs[0][k]);
  }
  // Cross-entropy's loss: a reduction over rows through the workspace.
  for (const CeCase& c : {CeCase{128, 1000, false, 0.1}, CeCase{37, 10, true, 0.0}}) {
    const CeData d = ce_data(c, gen);
    DevBuf logits(d.logits), targets(d.targets);
    DevLabels labels(d.labels);
    DevBuf ws = workspace(cuda::cross_entropy_forward_workspace_floats(c.N, c.K));
    std::vector<float> losses;
    for (int run = 0; run < 2; ++run) {
      DevBuf probs = DevBuf::out(c.N * c.K), loss = DevBuf::out(1);
      cuda::cross_entropy_forward(loss.p(), probs.p(), logits.p(), labels.p(),
                                  c.soft ? targets.p() : nullptr, c.N, c.K, c.smoothing, ws.p(),
                                  nullptr);
      device_sync();
      losses.push_back(loss.get()[0]);
    }
    expect_bitwise("cross_entropy loss " + c.str(), {losses[1]}, {losses[0]});
  }
#else
  CNX_SKIP_BUILT_WITHOUT_CUDA();
#endif
}

TEST(CudaOps, EmptySizesLaunchNothingAndEmptySumsAreZero) {
#if CNX_TEST_CUDA
  CNX_SKIP_WITHOUT_DEVICE();
  DevBuf a = DevBuf::out(4), b = DevBuf::out(4), c = DevBuf::out(4);
  // n = 0: nothing is written.
  cuda::add_forward(a.p(), b.p(), c.p(), 0, nullptr);
  cuda::add_inplace(a.p(), b.p(), 0, nullptr);
  cuda::mul_forward(a.p(), b.p(), c.p(), 0, nullptr);
  cuda::mul_backward(a.p(), b.p(), c.p(), c.p(), c.p(), 0, nullptr);
  cuda::gelu_forward(a.p(), b.p(), 0, nullptr);
  cuda::gelu_backward(a.p(), b.p(), c.p(), 0, nullptr);
  cuda::drop_path_forward(a.p(), b.p(), c.p(), 0, 5, nullptr);
  cuda::drop_path_backward(a.p(), b.p(), c.p(), 3, 0, nullptr);
  cuda::layer_scale_forward(a.p(), b.p(), c.p(), 0, 4, nullptr);
  cuda::sum_backward(a.p(), b.p(), 0, nullptr);
  cuda::global_avgpool_forward(a.p(), b.p(), 0, 3, 3, 4, nullptr);
  cuda::global_avgpool_backward(a.p(), b.p(), 2, 0, 3, 4, nullptr);
  cuda::layernorm_forward(a.p(), b.p(), c.p(), a.p(), b.p(), c.p(), 0, 4, 1e-6, nullptr);
  cuda::layernorm_backward(a.p(), nullptr, nullptr, b.p(), c.p(), c.p(), c.p(), c.p(), 0, 4,
                           nullptr, nullptr);
  cuda::adamw_step(nullptr, 0, {0.9f, 0.1f, 0.999f, 0.001f, 1e-8f}, nullptr);
  device_sync();
  a.expect_untouched("a");
  b.expect_untouched("b");
  c.expect_untouched("c");
  // Sums over no rows are zero (the CPU references write 0), and the mean over no rows is NaN.
  DevBuf dw = DevBuf::out(4), db = DevBuf::out(4), dgamma = DevBuf::out(4), total = DevBuf::out(1),
         loss = DevBuf::out(1);
  cuda::layernorm_backward(nullptr, dw.p(), db.p(), c.p(), c.p(), c.p(), c.p(), c.p(), 0, 4,
                           nullptr, nullptr);
  cuda::layer_scale_backward(static_cast<float*>(nullptr), dgamma.p(), c.p(), c.p(), c.p(), 0, 4, nullptr, nullptr);
  cuda::sum_forward(total.p(), c.p(), 0, nullptr, nullptr);
  cuda::cross_entropy_forward(loss.p(), nullptr, nullptr, nullptr, nullptr, 0, 10, 0.0, nullptr,
                              nullptr);
  device_sync();
  expect_bitwise("layernorm dweight, rows 0", dw.get(), std::vector<float>(4, 0.0f));
  expect_bitwise("layernorm dbias, rows 0", db.get(), std::vector<float>(4, 0.0f));
  expect_bitwise("layer_scale dgamma, rows 0", dgamma.get(), std::vector<float>(4, 0.0f));
  expect_bitwise("sum of nothing", total.get(), {0.0f});
  EXPECT_TRUE(std::isnan(loss.get()[0])) << "the mean over no rows is 0 / 0";
#else
  CNX_SKIP_BUILT_WITHOUT_CUDA();
#endif
}
