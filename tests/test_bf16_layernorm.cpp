// LayerNorm with bf16 activations (mixed precision): x, out, dout, dx in bf16; weight, bias,
// the saved mean and rstd, dweight and dbias in fp32 (kernels/layernorm.h).
//
// CPU: cpu::layernorm_forward/backward<bf16> and the autograd op layer_norm on bf16 x, against
// the f64 CPU kernels run on the same (bf16-representable) inputs, the fp32 parameters widened
// to double. Also, exactly, against the contract of kernels/cpu/bf16_emulation.h: the bf16
// kernel is the f32 kernel on the widened inputs with each bf16 result rounded once, so its
// bf16 outputs equal bf16(f32 kernel's) bitwise and its fp32 outputs equal the f32 kernel's.
//
// Tolerances. u16 = 2^-8 is the unit roundoff of bf16 (8 significant bits, round to nearest
// even: |bf16(v) - v| <= 2^-8 |v|), u32 = 2^-24 that of f32. A bf16 output is one rounding of
// an fp32 value that is itself within a few u32 of the exact result, relative to the scale
// `mag` of the terms that made it (cancellation: out = xhat w + b, din = rstd (g - mean g -
// xhat mean(g xhat)) can be far smaller than their terms). So
//     |got - exact| <= 2^-8 |exact| + k u32 mag,
// with k = 64 (the f32 reference's error is a handful of u32: mean and rstd rounded once to
// fp32 from double sums, then ~4 roundings of the output expression; 64 leaves a wide margin
// while staying ~4 orders of magnitude below a bf16 rounding, so a kernel that rounded an
// intermediate, e.g. the statistics or g, to bf16 fails). fp32 outputs (mean, rstd, dweight,
// dbias) get the fp32 tolerance k u32 mag: they are never rounded to bf16.
//
// GPU (skips without a device): cuda::layernorm_forward/backward<bf16> against the CPU bf16
// kernels on identical inputs. Both compute in fp32 with different summation orders, so their
// fp32 values differ by at most ln_tol(C) of the scale (as in tests/test_cuda_ops.cpp), and two
// values that close round to bf16 values at most one bf16 ulp apart, plus that difference:
// |gpu - cpu| <= ulp_bf16(max(|gpu|, |cpu|)) + ln_tol(C) mag. fp32 outputs: ln_tol(C) (mean,
// rstd) and kReduceTol (dweight, dbias, two-stage column sums), with the derivations of
// test_cuda_ops.cpp. Buffers carry sentinel guards; offsets of 1 element (2 bytes for bf16,
// 4 for the fp32 parameters) misalign the rows so the 16-byte pack paths must fall back to the
// generic ones, and an offset of 8 bf16 (16 bytes) keeps the pack path at a non-zero offset.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <sstream>
#include <string>
#include <vector>

#include "autograd/function.h"
#include "autograd/ops.h"
#include "kernels/layernorm.h"
#include "tensor/generator.h"
#include "tensor/tensor.h"
#include "tests/cuda_testing.h"
#include "tests/testing.h"

using namespace cnx;
using namespace cnx::test;

namespace {

const double kU16 = std::ldexp(1.0, -8);   // unit roundoff of bf16
const double kU32 = std::ldexp(1.0, -24);  // unit roundoff of f32
const double kRefK = 64;                   // fp32 error of the CPU kernels, in u32 x mag
constexpr double kEps = 1e-6;

template <class... A> std::string cat(const A&... a) {
  std::ostringstream s;
  (s << ... << a);
  return s.str();
}

// ---- data ------------------------------------------------------------------------------------

std::vector<float> widen(const std::vector<bf16>& v) {
  std::vector<float> r(v.size());
  for (size_t i = 0; i < v.size(); ++i) r[i] = static_cast<float>(v[i]);
  return r;
}
// float or bf16 values as doubles (exact).
template <class T> std::vector<double> dbl(const std::vector<T>& v) {
  std::vector<double> r(v.size());
  for (size_t i = 0; i < v.size(); ++i) r[i] = static_cast<double>(static_cast<float>(v[i]));
  return r;
}
std::vector<bf16> narrow(const std::vector<float>& v) {
  std::vector<bf16> r(v.size());
  for (size_t i = 0; i < v.size(); ++i) r[i] = bf16(v[i]);
  return r;
}

struct Case {
  int64_t rows, C;
  double mean = 0.0;  // of x: a large mean tests the centring
  std::string str() const { return cat("rows=", rows, " C=", C, " mean ", mean); }
};

// x and dout bf16 (random normals rounded to bf16: the kernels' inputs are exactly these),
// weight and bias fp32 (not rounded: fp32 parameters are what mixed precision keeps).
// integers: dout in {-2, ..., 2}, so every partial sum of dbias is exact in any order.
struct Inputs {
  std::vector<bf16> x, g;
  std::vector<float> w, b;
};
Inputs make_inputs(const Case& c, uint64_t seed, bool integers = false) {
  Generator gen(seed);
  const int64_t n = c.rows * c.C;
  Inputs in;
  in.x.resize(static_cast<size_t>(n));
  in.g.resize(static_cast<size_t>(n));
  for (bf16& v : in.x) v = bf16(static_cast<float>(c.mean + gen.normal()));
  in.w.resize(static_cast<size_t>(c.C));
  in.b.resize(static_cast<size_t>(c.C));
  for (float& v : in.w) v = static_cast<float>(1.0 + 0.5 * gen.normal());
  for (float& v : in.b) v = static_cast<float>(0.5 * gen.normal());
  for (bf16& v : in.g)
    v = integers ? bf16(static_cast<float>(static_cast<int>(gen.next_u32() % 5) - 2))
                 : bf16(static_cast<float>(gen.normal()));
  return in;
}

// The f64 kernels on the same values, and the scale of the rounding error of each result.
struct Ref {
  std::vector<double> out, mean, rstd, din, dw, db;
  std::vector<double> mag_out, mag_mean, mag_din, mag_dw, mag_db;
};
Ref f64_reference(const Case& c, const Inputs& in) {
  const int64_t rows = c.rows, C = c.C, n = rows * C;
  const std::vector<double> x = dbl(in.x), g = dbl(in.g), w = dbl(in.w), b = dbl(in.b);
  Ref r;
  r.out.resize(n);
  r.mean.resize(rows);
  r.rstd.resize(rows);
  r.din.resize(n);
  r.dw.resize(C);
  r.db.resize(C);
  cpu::layernorm_forward<double>(r.out.data(), r.mean.data(), r.rstd.data(), x.data(), w.data(),
                                 b.data(), rows, C, kEps);
  cpu::layernorm_backward<double>(r.din.data(), r.dw.data(), r.db.data(), g.data(), x.data(),
                                  w.data(), r.mean.data(), r.rstd.data(), rows, C);
  // out = xhat w + b: |xhat w| + |b|, with |xhat| taken as (|x| + mean |x|) rstd, the scale
  // of the rounding of (x - mean) rstd (mean |x| bounds |mean| and scales the error of a
  // computed mean). din: the scale of each of its three terms, the same |xhat|. dweight,
  // dbias: the sums of |terms|.
  r.mag_out.resize(n);
  r.mag_mean.resize(rows);
  r.mag_din.resize(n);
  r.mag_dw.assign(C, 0.0);
  r.mag_db.assign(C, 0.0);
  for (int64_t i = 0; i < rows; ++i) {
    double sx = 0;
    for (int64_t k = 0; k < C; ++k) sx += std::abs(x[i * C + k]);
    r.mag_mean[i] = sx / C + 1e-30;
    double mg = 0, mgx = 0;
    for (int64_t k = 0; k < C; ++k) {
      const double xh = (std::abs(x[i * C + k]) + r.mag_mean[i]) * r.rstd[i];
      const double gk = std::abs(g[i * C + k] * w[k]);
      mg += gk / C;
      mgx += gk * xh / C;
      r.mag_out[i * C + k] = xh * std::abs(w[k]) + std::abs(b[k]);
      r.mag_dw[k] += std::abs(g[i * C + k]) * xh;
      r.mag_db[k] += std::abs(g[i * C + k]);
    }
    for (int64_t k = 0; k < C; ++k) {
      const double xh = (std::abs(x[i * C + k]) + r.mag_mean[i]) * r.rstd[i];
      r.mag_din[i * C + k] = r.rstd[i] * (std::abs(g[i * C + k] * w[k]) + mg + xh * mgx) + 1e-30;
    }
  }
  return r;
}

// ---- checks ----------------------------------------------------------------------------------

// A bf16 result against the exact one: |got - want| <= 2^-8 |want| + kRefK u32 mag (see the
// top of the file), through expect_close_mag with the scale 2^-8 |want| + kRefK u32 mag.
void expect_bf16_vs_exact(const std::string& what, const std::vector<double>& got,
                          const std::vector<double>& want, const std::vector<double>& mag) {
  std::vector<double> scale(want.size());
  for (size_t i = 0; i < want.size(); ++i)
    scale[i] = std::abs(want[i]) + kRefK * kU32 / kU16 * mag[i];
  expect_close_mag(what, got, want, scale, kU16);
}
// An fp32 result against the exact one: kRefK u32 of its scale.
void expect_f32_vs_exact(const std::string& what, const std::vector<double>& got,
                         const std::vector<double>& want, const std::vector<double>& mag) {
  expect_close_mag(what, got, want, mag, kRefK * kU32);
}

template <class T> bool same_bits(const T& a, const T& b) {
  return std::memcmp(&a, &b, sizeof(T)) == 0;
}
template <class T>
void expect_bitwise(const std::string& what, const std::vector<T>& got,
                    const std::vector<T>& want) {
  ASSERT_EQ(got.size(), want.size()) << what;
  int64_t bad = 0;
  std::string report;
  for (size_t i = 0; i < got.size(); ++i)
    if (!same_bits(got[i], want[i])) {
      if (bad < 8)
        report += cat("\n  [", i, "] got ", static_cast<float>(got[i]), " want ",
                      static_cast<float>(want[i]));
      ++bad;
    }
  EXPECT_EQ(bad, 0) << what << ": " << bad << " of " << got.size() << " values differ" << report;
}

// ---- the CPU kernels -------------------------------------------------------------------------

struct Wanted {
  bool din = true, dw = true, db = true;
  std::string str() const {
    return std::string(din ? "din" : "-") + "," + (dw ? "dweight" : "-") + "," +
           (db ? "dbias" : "-");
  }
};

struct Bf16Results {  // what the bf16 kernels write
  std::vector<bf16> out, din;
  std::vector<float> mean, rstd, dw, db;
};

// cpu::layernorm_forward<bf16>, then cpu::layernorm_backward<bf16> with its mean and rstd, the
// gradients in `want` only (the inputs no wanted gradient needs passed as null).
Bf16Results run_cpu_bf16(const Case& c, const Inputs& in, Wanted want = {}) {
  const int64_t rows = c.rows, C = c.C, n = rows * C;
  Bf16Results r;
  r.out.resize(n);
  r.mean.resize(rows);
  r.rstd.resize(rows);
  cpu::layernorm_forward<bf16>(r.out.data(), r.mean.data(), r.rstd.data(), in.x.data(),
                               in.w.data(), in.b.data(), rows, C, kEps);
  r.din.assign(n, bf16(-777.0f));  // sentinels: an unrequested gradient stays as it was
  r.dw.assign(C, -777.0f);
  r.db.assign(C, -777.0f);
  const bool xhat = want.din || want.dw;
  cpu::layernorm_backward<bf16>(want.din ? r.din.data() : nullptr, want.dw ? r.dw.data() : nullptr,
                                want.db ? r.db.data() : nullptr, in.g.data(),
                                xhat ? in.x.data() : nullptr, want.din ? in.w.data() : nullptr,
                                xhat ? r.mean.data() : nullptr, xhat ? r.rstd.data() : nullptr,
                                rows, C);
  return r;
}

void check_cpu_kernels(const Case& c, uint64_t seed) {
  SCOPED_TRACE("cpu bf16 layernorm " + c.str());
  const Inputs in = make_inputs(c, seed);
  const int64_t rows = c.rows, C = c.C, n = rows * C;
  const Bf16Results r = run_cpu_bf16(c, in);
  const Ref ref = f64_reference(c, in);

  // Against the exact (f64) results on the same inputs.
  expect_f32_vs_exact("mean", dbl(r.mean), ref.mean, ref.mag_mean);
  expect_f32_vs_exact("rstd", dbl(r.rstd), ref.rstd, dbl(r.rstd));
  expect_bf16_vs_exact("out", dbl(r.out), ref.out, ref.mag_out);
  expect_bf16_vs_exact("din", dbl(r.din), ref.din, ref.mag_din);
  expect_f32_vs_exact("dweight", dbl(r.dw), ref.dw, ref.mag_dw);
  expect_f32_vs_exact("dbias", dbl(r.db), ref.db, ref.mag_db);

  // Exactly the f32 kernel on the widened inputs, bf16 outputs rounded once.
  const std::vector<float> x = widen(in.x), g = widen(in.g);
  std::vector<float> out(n), mean(rows), rstd(rows), din(n), dw(C), db(C);
  cpu::layernorm_forward<float>(out.data(), mean.data(), rstd.data(), x.data(), in.w.data(),
                                in.b.data(), rows, C, kEps);
  cpu::layernorm_backward<float>(din.data(), dw.data(), db.data(), g.data(), x.data(), in.w.data(),
                                 mean.data(), rstd.data(), rows, C);
  expect_bitwise("mean = f32 kernel's", r.mean, mean);
  expect_bitwise("rstd = f32 kernel's", r.rstd, rstd);
  expect_bitwise("out = bf16(f32 kernel's)", r.out, narrow(out));
  expect_bitwise("din = bf16(f32 kernel's)", r.din, narrow(din));
  expect_bitwise("dweight = f32 kernel's", r.dw, dw);
  expect_bitwise("dbias = f32 kernel's", r.db, db);

  // Every subset of the gradients: the wanted ones as with all three, the others untouched.
  for (int mask = 0; mask < 8; ++mask) {
    const Wanted w{(mask & 1) != 0, (mask & 2) != 0, (mask & 4) != 0};
    SCOPED_TRACE(w.str());
    const Bf16Results s = run_cpu_bf16(c, in, w);
    expect_bitwise("din", s.din, w.din ? r.din : std::vector<bf16>(n, bf16(-777.0f)));
    expect_bitwise("dweight", s.dw, w.dw ? r.dw : std::vector<float>(C, -777.0f));
    expect_bitwise("dbias", s.db, w.db ? r.db : std::vector<float>(C, -777.0f));
  }
}

// ConvNeXt-T's LayerNorms at batch 2 (the stages, rows = N H W; the head, rows = N) and
// awkward ones: one channel, C not a multiple of 8 (the bf16 pack), C over the fast path's
// 1024, a single row, a large mean.
const Case kConvNextCases[] = {{2 * 56 * 56, 96}, {2 * 28 * 28, 192}, {2 * 14 * 14, 384},
                               {2 * 7 * 7, 768},  {2, 768}};
const Case kAwkwardCases[] = {{1, 1},   {7, 1},         {5, 3},    {65, 8},   {9, 40},
                              {13, 100}, {300, 96, 3.0}, {1, 1024}, {7, 1032}, {3, 2052, 2.0}};

}  // namespace

TEST(Bf16LayerNormCpu, KernelsMatchF64ReferenceAndRoundTheF32KernelOnce) {
  uint64_t seed = 100;
  for (const Case& c : kConvNextCases) check_cpu_kernels(c, seed++);
  for (const Case& c : kAwkwardCases) check_cpu_kernels(c, seed++);
}

namespace {

// ---- the autograd op -------------------------------------------------------------------------

struct OpResult {
  Tensor out, dx, dw, db;
};

// layer_norm on bf16 x (shape xs) with fp32 weight and bias, then the loss
// sum(cast(out, f32) * R), R the f32 values of in.g (bf16-representable, so the gradient that
// comes back through the cast is exactly in.g). Only the inputs in `want` require grad.
OpResult run_op(const Shape& xs, const Inputs& in, Wanted want, Device dev = Device::cpu()) {
  const int64_t C = xs[-1];
  Tensor x = Tensor::from_data<bf16>(xs, in.x).to(dev);
  Tensor w = Tensor::from_data<float>(Shape{C}, in.w).to(dev);
  Tensor b = Tensor::from_data<float>(Shape{C}, in.b).to(dev);
  const Tensor R = Tensor::from_data<float>(xs, widen(in.g)).to(dev);
  x.set_requires_grad(want.din);
  w.set_requires_grad(want.dw);
  b.set_requires_grad(want.db);
  OpResult r;
  r.out = layer_norm(x, w, b, kEps);
  if (want.din || want.dw || want.db) {
    sum(mul(cast(r.out, DType::f32), R)).backward();
    r.dx = x.grad();
    r.dw = w.grad();
    r.db = b.grad();
  }
  return r;
}

std::vector<bf16> bf16_values(const Tensor& t) { return t.to(Device::cpu()).to_vector<bf16>(); }
std::vector<float> f32_values(const Tensor& t) { return t.to(Device::cpu()).to_vector<float>(); }

}  // namespace

TEST(Bf16LayerNormCpu, OpForwardAndGradientsMatchReference) {
  uint64_t seed = 200;
  for (const Shape& xs : {Shape{2, 7, 7, 768}, Shape{2, 14, 14, 384}, Shape{2, 768},
                          Shape{3, 5, 7, 100}, Shape{1, 1, 1, 3}, Shape{5}}) {
    SCOPED_TRACE("layer_norm bf16 x" + xs.str());
    const int64_t C = xs[-1];
    const Case c{xs.numel() / C, C};
    const Inputs in = make_inputs(c, seed++);
    const OpResult r = run_op(xs, in, {});
    const Bf16Results k = run_cpu_bf16(c, in);
    const Ref ref = f64_reference(c, in);

    EXPECT_EQ(r.out.dtype(), DType::bf16);
    EXPECT_EQ(r.out.shape(), xs);
    ASSERT_TRUE(r.dx.defined() && r.dw.defined() && r.db.defined());
    EXPECT_EQ(r.dx.dtype(), DType::bf16) << "dx is an activation gradient: x's dtype";
    EXPECT_EQ(r.dx.shape(), xs);
    EXPECT_EQ(r.dw.dtype(), DType::f32) << "parameter gradients stay fp32";
    EXPECT_EQ(r.db.dtype(), DType::f32) << "parameter gradients stay fp32";
    // The op is the kernel: bitwise the cpu:: results.
    expect_bitwise("op out = kernel's", bf16_values(r.out), k.out);
    expect_bitwise("op dx = kernel's", bf16_values(r.dx), k.din);
    expect_bitwise("op dweight = kernel's", f32_values(r.dw), k.dw);
    expect_bitwise("op dbias = kernel's", f32_values(r.db), k.db);
    // And within tolerance of the exact results.
    expect_bf16_vs_exact("op out", values(r.out), ref.out, ref.mag_out);
    expect_bf16_vs_exact("op dx", values(r.dx), ref.din, ref.mag_din);
    expect_f32_vs_exact("op dweight", values(r.dw), ref.dw, ref.mag_dw);
    expect_f32_vs_exact("op dbias", values(r.db), ref.db, ref.mag_db);
  }
}

TEST(Bf16LayerNormCpu, OpComputesOnlyRequestedGradients) {
  const Shape xs{2, 3, 3, 40};
  const Case c{18, 40};
  const Inputs in = make_inputs(c, 300);
  const OpResult all = run_op(xs, in, {});
  for (int mask = 1; mask < 8; ++mask) {
    const Wanted w{(mask & 1) != 0, (mask & 2) != 0, (mask & 4) != 0};
    SCOPED_TRACE(w.str());
    const OpResult r = run_op(xs, in, w);
    EXPECT_EQ(r.dx.defined(), w.din);
    EXPECT_EQ(r.dw.defined(), w.dw);
    EXPECT_EQ(r.db.defined(), w.db);
    if (w.din) expect_bitwise("dx", bf16_values(r.dx), bf16_values(all.dx));
    if (w.dw) expect_bitwise("dweight", f32_values(r.dw), f32_values(all.dw));
    if (w.db) expect_bitwise("dbias", f32_values(r.db), f32_values(all.db));
  }
}

TEST(Bf16LayerNormCpu, OpTakesFp32ParametersForBf16Activations) {
  const Tensor xb = Tensor::zeros({2, 3, 4}, DType::bf16);
  const Tensor w = Tensor::ones({4}), b = Tensor::zeros({4});
  const Tensor y = layer_norm(xb, w, b);
  EXPECT_EQ(y.dtype(), DType::bf16);
  EXPECT_EQ(y.shape(), Shape({2, 3, 4}));
  // bf16 x wants fp32 parameters, and says so.
  expect_error([&] { layer_norm(xb, Tensor::ones({4}, DType::bf16), b); },
               {"layer_norm", "weight bf16[4]", "must be f32", "x bf16[2, 3, 4]"});
  expect_error([&] { layer_norm(xb, w, Tensor::zeros({4}, DType::bf16)); },
               {"layer_norm", "bias bf16[4]", "must be f32", "x bf16[2, 3, 4]"});
  expect_error([&] { layer_norm(xb, Tensor::ones({4}, DType::f64), b); },
               {"layer_norm", "weight f64[4]", "must be f32", "x bf16[2, 3, 4]"});
  // f32 x keeps f32 parameters (bf16 ones are not silently widened).
  const Tensor xf = Tensor::zeros({2, 3, 4});
  expect_error([&] { layer_norm(xf, Tensor::ones({4}, DType::bf16), b); },
               {"layer_norm", "weight bf16[4]", "must be f32", "x f32[2, 3, 4]"});
  // Still checked: the channel count, and the activation dtypes.
  expect_error([&] { layer_norm(xb, Tensor::ones({5}), b); },
               {"layer_norm", "[5]", "bf16[2, 3, 4]"});
  expect_error([&] { layer_norm(Tensor::zeros({2, 4}, DType::f16), w, b); },
               {"layer_norm", "f16[2, 4]", "must be f32, f64 or bf16"});
}

// =============================================================================================
// GPU: the CUDA bf16 kernels against the CPU bf16 kernels
// =============================================================================================

#if CNX_TEST_CUDA
namespace {

const Device kDev = Device::cuda(0);
constexpr int64_t kGuard = 9;  // sentinel elements after every device buffer
// The two-stage column reductions' fp32 tolerance, derived in tests/test_cuda_ops.cpp.
const double kReduceTol = 1200 * kU32;

// The GPU's fp32 row sums against the CPU's: chains of at most C / 32 + 32 sequential adds
// (a lane's share of the row, the pairwise sums of its packs, a 5-level butterfly) around a
// handful of roundings, as in tests/test_cuda_ops.cpp.
double ln_tol(int64_t C) { return 2.0 * (static_cast<double>(C) / 32 + 40) * kU32; }

void device_sync() { CNX_CUDA_CHECK(cudaDeviceSynchronize()); }

template <class T> T sentinel() { return T(1234.5f); }

// n elements of T on the device, `offset` elements after a 256-byte aligned allocation,
// surrounded by sentinels (the offset elements before, kGuard after).
template <class T> class DevBuf {
 public:
  DevBuf(const std::vector<T>& v, int64_t offset = 0)
      : off_(offset), n_(static_cast<int64_t>(v.size())) {
    std::vector<T> h(static_cast<size_t>(off_ + n_ + kGuard), sentinel<T>());
    std::copy(v.begin(), v.end(), h.begin() + off_);
    t_ = Tensor::from_data<T>(Shape{off_ + n_ + kGuard}, h, kDev);
    device_sync();  // the upload runs on the library's stream, the kernels on the legacy one
  }
  static DevBuf out(int64_t n, int64_t offset = 0) {
    return DevBuf(std::vector<T>(static_cast<size_t>(n), sentinel<T>()), offset);
  }
  T* p() { return t_.data<T>() + off_; }
  std::vector<T> all() const { return t_.to(Device::cpu()).to_vector<T>(); }
  std::vector<T> get() const {
    const std::vector<T> a = all();
    return std::vector<T>(a.begin() + off_, a.begin() + off_ + n_);
  }
  void expect_guards(const std::string& what) const {
    const std::vector<T> a = all();
    int64_t changed = 0;
    for (int64_t i = 0; i < off_; ++i) changed += !same_bits(a[i], sentinel<T>());
    for (int64_t i = off_ + n_; i < off_ + n_ + kGuard; ++i)
      changed += !same_bits(a[i], sentinel<T>());
    EXPECT_EQ(changed, 0) << what << ": " << changed << " guard elements were written";
  }
  void expect_untouched(const std::string& what) const {
    int64_t changed = 0;
    for (const T& v : all()) changed += !same_bits(v, sentinel<T>());
    EXPECT_EQ(changed, 0) << what << ": a skipped output was written";
  }

 private:
  Tensor t_;
  int64_t off_ = 0, n_ = 0;
};

// The spacing of bf16 values at |v| (normal range): 2^(floor(log2 |v|) - 7).
double ulp_bf16(double v) {
  if (v == 0) return std::ldexp(1.0, -133);  // the smallest subnormal bf16
  int e = 0;
  std::frexp(std::abs(v), &e);  // |v| = m 2^e, m in [0.5, 1)
  return std::ldexp(1.0, e - 1 - 7);
}

// GPU bf16 against CPU bf16: |gpu - cpu| <= ulp_bf16(max(|gpu|, |cpu|)) + tol mag.
void expect_bf16_near(const std::string& what, const std::vector<bf16>& gpu,
                      const std::vector<bf16>& cpu, const std::vector<double>& mag, double tol) {
  ASSERT_EQ(gpu.size(), cpu.size()) << what;
  int64_t bad = 0;
  std::string report;
  for (size_t i = 0; i < gpu.size(); ++i) {
    const double a = static_cast<float>(gpu[i]), b = static_cast<float>(cpu[i]);
    const double allowed = ulp_bf16(std::max(std::abs(a), std::abs(b))) + tol * mag[i];
    if (!(std::abs(a - b) <= allowed)) {
      if (bad < 8) report += cat("\n  [", i, "] gpu ", a, " cpu ", b, " allowed ", allowed);
      ++bad;
    }
  }
  EXPECT_EQ(bad, 0) << what << ": " << bad << " of " << gpu.size() << " values out of tolerance"
                    << report;
}

// One GPU case: x, out, dout and din at offset `off` (elements), weight and bias at `off_p`.
struct GpuCase {
  Case c;
  int64_t off = 0, off_p = 0;
  std::string str() const { return cat(c.str(), " offsets ", off, ",", off_p); }
};

void check_gpu_forward(const GpuCase& gc, uint64_t seed) {
  SCOPED_TRACE("cuda bf16 layernorm forward " + gc.str());
  const Case& c = gc.c;
  const int64_t rows = c.rows, C = c.C, n = rows * C;
  const Inputs in = make_inputs(c, seed);
  const Bf16Results cpu = run_cpu_bf16(c, in, {false, false, false});
  const Ref ref = f64_reference(c, in);
  DevBuf<bf16> x(in.x, gc.off), out = DevBuf<bf16>::out(n, gc.off);
  DevBuf<float> w(in.w, gc.off_p), b(in.b, gc.off_p), mean = DevBuf<float>::out(rows),
      rstd = DevBuf<float>::out(rows);
  cuda::layernorm_forward(out.p(), mean.p(), rstd.p(), x.p(), w.p(), b.p(), rows, C, kEps,
                          nullptr);
  device_sync();
  out.expect_guards("out");
  mean.expect_guards("mean");
  rstd.expect_guards("rstd");
  expect_close_mag("mean", dbl(mean.get()), dbl(cpu.mean), ref.mag_mean, ln_tol(C));
  expect_close_mag("rstd", dbl(rstd.get()), dbl(cpu.rstd), dbl(cpu.rstd), ln_tol(C));
  expect_bf16_near("out", out.get(), cpu.out, ref.mag_out, ln_tol(C));
}

void check_gpu_backward(const GpuCase& gc, uint64_t seed, Wanted want = {}, bool integers = false) {
  SCOPED_TRACE("cuda bf16 layernorm backward " + gc.str() + " " + want.str() +
               (integers ? " integer dout" : ""));
  const Case& c = gc.c;
  const int64_t rows = c.rows, C = c.C, n = rows * C;
  const Inputs in = make_inputs(c, seed, integers);
  const Bf16Results cpu = run_cpu_bf16(c, in);  // all three gradients, the CPU's mean and rstd
  const Ref ref = f64_reference(c, in);
  DevBuf<bf16> x(in.x, gc.off), g(in.g, gc.off);
  DevBuf<float> w(in.w, gc.off_p), mean(cpu.mean), rstd(cpu.rstd);
  DevBuf<float> ws = DevBuf<float>::out(
      std::max<int64_t>(cuda::layernorm_backward_workspace_floats(rows, C), 1));
  const bool xhat = want.din || want.dw;
  std::vector<bf16> din_runs[2];
  std::vector<float> dw_runs[2], db_runs[2];
  for (int run = 0; run < 2; ++run) {  // twice: the results must be bitwise the same
    DevBuf<bf16> din = DevBuf<bf16>::out(n, gc.off);
    DevBuf<float> dw = DevBuf<float>::out(C), db = DevBuf<float>::out(C);
    cuda::layernorm_backward(want.din ? din.p() : nullptr, want.dw ? dw.p() : nullptr,
                             want.db ? db.p() : nullptr, g.p(), xhat ? x.p() : nullptr,
                             want.din ? w.p() : nullptr, xhat ? mean.p() : nullptr,
                             xhat ? rstd.p() : nullptr, rows, C, ws.p(), nullptr);
    device_sync();
    ws.expect_guards("workspace");
    if (want.din) din.expect_guards("din");
    else din.expect_untouched("din");
    if (want.dw) dw.expect_guards("dweight");
    else dw.expect_untouched("dweight");
    if (want.db) db.expect_guards("dbias");
    else db.expect_untouched("dbias");
    din_runs[run] = din.get();
    dw_runs[run] = dw.get();
    db_runs[run] = db.get();
  }
  expect_bitwise("din, second run", din_runs[1], din_runs[0]);
  expect_bitwise("dweight, second run", dw_runs[1], dw_runs[0]);
  expect_bitwise("dbias, second run", db_runs[1], db_runs[0]);
  if (want.din) expect_bf16_near("din", din_runs[0], cpu.din, ref.mag_din, ln_tol(C));
  if (want.dw) expect_close_mag("dweight", dbl(dw_runs[0]), dbl(cpu.dw), ref.mag_dw, kReduceTol);
  if (want.db) {
    // Integer dout: every partial sum is an integer below 2^24, exact in any order.
    if (integers) expect_bitwise("dbias (exact integers)", db_runs[0], cpu.db);
    else expect_close_mag("dbias", dbl(db_runs[0]), dbl(cpu.db), ref.mag_db, kReduceTol);
  }
}

// Every lane layout of the bf16 pack path (packs of 8: C = 8 .. 1024), its edges, the generic
// path (C % 8 != 0, C > 1024), ConvNeXt-T at batch 2, and misaligned / offset pointers.
std::vector<GpuCase> gpu_cases() {
  std::vector<GpuCase> v;
  for (const Case& c : kConvNextCases) v.push_back({c});
  for (const Case& c : kAwkwardCases) v.push_back({c});
  int i = 0;
  for (int64_t C : {4, 8, 16, 40, 64, 96, 100, 192, 256, 264, 384, 512, 520, 768, 1024, 1028})
    for (int64_t rows : {1, 7, 65, 300}) v.push_back({{rows, C, (i++ % 3) ? 0.0 : 3.0}});
  for (int64_t C : {96, 768}) {
    v.push_back({{65, C, 2.0}, 1, 0});  // x, out misaligned: generic path
    v.push_back({{65, C}, 0, 1});       // weight, bias misaligned: generic path
    v.push_back({{65, C}, 8, 0});       // 16 bytes in: the pack path at an offset
  }
  return v;
}

}  // namespace
#endif

TEST(Bf16LayerNormCuda, ForwardMatchesCpuBf16) {
#if CNX_TEST_CUDA
  CNX_SKIP_WITHOUT_DEVICE();
  uint64_t seed = 1000;
  for (const GpuCase& gc : gpu_cases()) check_gpu_forward(gc, seed++);
#else
  CNX_SKIP_BUILT_WITHOUT_CUDA();
#endif
}

TEST(Bf16LayerNormCuda, BackwardMatchesCpuBf16) {
#if CNX_TEST_CUDA
  CNX_SKIP_WITHOUT_DEVICE();
  uint64_t seed = 2000;
  for (const GpuCase& gc : gpu_cases()) check_gpu_backward(gc, seed++);
  check_gpu_backward({{100000, 8}}, seed++);  // many row blocks (P = 2048), pack path
  check_gpu_backward({{100000, 3}}, seed++);  // and generic path
#else
  CNX_SKIP_BUILT_WITHOUT_CUDA();
#endif
}

TEST(Bf16LayerNormCuda, BackwardGradientSubsetsAndExactSums) {
#if CNX_TEST_CUDA
  CNX_SKIP_WITHOUT_DEVICE();
  uint64_t seed = 3000;
  for (const GpuCase& gc : {GpuCase{{300, 96}}, GpuCase{{300, 100}}, GpuCase{{98, 768}},
                            GpuCase{{65, 40}, 1, 0}, GpuCase{{65, 96}, 0, 1}})
    for (int mask = 0; mask < 8; ++mask)
      check_gpu_backward(gc, seed++, {(mask & 1) != 0, (mask & 2) != 0, (mask & 4) != 0});
  for (const Case& c : kConvNextCases) check_gpu_backward({c}, seed++, {}, true);
  check_gpu_backward({{70001, 3}}, seed++, {}, true);
#else
  CNX_SKIP_BUILT_WITHOUT_CUDA();
#endif
}

TEST(Bf16LayerNormCuda, OpOnCudaMatchesOpOnCpu) {
#if CNX_TEST_CUDA
  CNX_SKIP_WITHOUT_DEVICE();
  uint64_t seed = 4000;
  for (const Shape& xs : {Shape{2, 14, 14, 384}, Shape{3, 5, 7, 100}, Shape{2, 768}}) {
    SCOPED_TRACE("layer_norm bf16 x" + xs.str() + " on cuda");
    const int64_t C = xs[-1];
    const Case c{xs.numel() / C, C};
    const Inputs in = make_inputs(c, seed++);
    const OpResult g = run_op(xs, in, {}, kDev), h = run_op(xs, in, {});
    const Ref ref = f64_reference(c, in);
    EXPECT_EQ(g.out.dtype(), DType::bf16);
    EXPECT_EQ(g.dx.dtype(), DType::bf16);
    EXPECT_EQ(g.dw.dtype(), DType::f32);
    EXPECT_EQ(g.db.dtype(), DType::f32);
    EXPECT_TRUE(g.out.device().is_cuda() && g.dx.device().is_cuda());
    expect_bf16_near("out", bf16_values(g.out), bf16_values(h.out), ref.mag_out, ln_tol(C));
    // dx on each device uses that device's own forward statistics, whose difference
    // (ln_tol(C) relative) adds to that of the backward itself: twice the tolerance.
    expect_bf16_near("dx", bf16_values(g.dx), bf16_values(h.dx), ref.mag_din, 2 * ln_tol(C));
    expect_close_mag("dweight", values(g.dw), values(h.dw), ref.mag_dw, kReduceTol);
    expect_close_mag("dbias", values(g.db), values(h.db), ref.mag_db, kReduceTol);
  }
#else
  CNX_SKIP_BUILT_WITHOUT_CUDA();
#endif
}
