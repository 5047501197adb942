// Mixed precision (bf16) of the two GEMM ops, linear and patchify_conv (kernels/linear.h,
// kernels/patchify.h, autograd/ops/linear.cpp, autograd/ops/patchify_conv.cpp).
//
// The bf16 form, as PyTorch's autocast with fp32 master weights: x bf16; weight and bias fp32
// parameters; the GEMM's weight operand is the weight rounded once to bf16, and the forward's
// bias is the bias rounded to bf16 (autocast's F.linear casts both; cuBLASLt's epilogue takes
// the bias in the output's type); every sum in fp32;
//   out = bf16(x W_bf16^T + b_bf16) din = bf16(dout W_bf16)            (bf16, rounded once)
//   dweight = dout^T x              dbias = sum over rows of dout        (fp32, not rounded)
//
// CPU (runs everywhere): the cpu:: bf16 kernels and the autograd ops (through OpenBLAS when the
// build has it, and through the loops with CNX_CPU_REFERENCE) on bf16-representable random
// inputs against the f64 reference computed on the same values (with the weight and the bias
// rounded to bf16, as the op rounds them); the cpu:: kernels are also checked to be exactly the
// f32 reference kernels (fed the rounded bias) with one rounding of each bf16 result; on inputs
// whose sums are exact, out is bitwise bf16(acc + bf16(b)) on every path (not bf16(acc + b));
// dtypes of every output and gradient; clear errors for non-fp32 parameters.
//
// GPU (skips itself without CUDA or a device): the CUDA bf16 launchers against the CPU bf16
// kernels on identical inputs, ConvNeXt-T shapes at batch 2, awkward sizes, misaligned (offset)
// pointers, every combination of requested gradients, empty sizes; and the autograd ops on CUDA
// tensors against the same ops on the CPU.
//
// Tolerances. u = 2^-24 is the unit roundoff of f32, b = 2^-8 that of bf16 (8 significant bits,
// round to nearest even: |bf16(v) - v| <= b |v|). The product of two bf16 values is exact in
// f32 (16 significant bits), so an fp32 sum s of n such products (plus the bias) differs from
// the exact sum r by at most about n u mag, where mag = the sum of the absolute values of the
// terms (f32 recursive summation, first order; blocked or FMA orders are no worse); we allow
// acc_tol(n) = (n + 3) u of mag, the margin covering the bias and the second-order terms.
//   fp32 results (dweight, dbias):  |got - r| <= acc_tol(n) mag
//   bf16 results (out, din):        |got - r| <= |bf16(s) - s| + |s - r|
//                                             <= b |s| + acc_tol(n) mag
//                                             <= b |r| + 2 acc_tol(n) mag     (b < 1)
// The GPU and CPU bf16 results come from two fp32 sums s1, s2 of the same terms (in different
// orders): |s1 - s2| <= 2 acc_tol(n) mag, and rounding each to bf16 moves it by at most half a
// bf16 ulp, so |bf16(s1) - bf16(s2)| <= 2 acc_tol(n) mag + ulp_bf16(max(|s1|, |s2|)): one bf16
// ulp where the sums straddle a rounding boundary, more only where a sum cancels far below its
// terms (then the fp32 term dominates, as it must). fp32 results: 2 acc_tol(n) mag.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <sstream>
#include <string>
#include <tuple>
#include <vector>

#include "autograd/ops.h"
#include "kernels/linear.h"
#include "kernels/patchify.h"
#include "tensor/generator.h"
#include "tensor/tensor.h"
#include "tests/cuda_testing.h"
#include "tests/testing.h"

#if CNX_TEST_CUDA
#include "tensor/cuda_context.h"
#endif

namespace {

using namespace cnx;
using namespace cnx::test;

constexpr double kU = 0x1p-24;  // f32 unit roundoff
constexpr double kB = 0x1p-8;   // bf16 unit roundoff

// The fp32 accumulation tolerance of a sum of n terms, relative to the sum of their magnitudes.
double acc_tol(int64_t n) { return static_cast<double>(n + 3) * kU; }

template <class... A> std::string cat(const A&... a) {
  std::ostringstream s;
  (s << ... << a);
  return s.str();
}

// ---- data ------------------------------------------------------------------------------------

float round_bf16(float v) { return static_cast<float>(bf16(v)); }

// n normal(0, std) values, rounded to f32 (randf) or to bf16 (randb: exactly representable in
// f32, f64 and bf16, so every dtype of the op and of the reference sees the same numbers).
std::vector<float> randf(int64_t n, Generator& gen, double std = 1.0) {
  std::vector<float> v(static_cast<size_t>(n));
  for (float& x : v) x = static_cast<float>(std * gen.normal());
  return v;
}
std::vector<float> randb(int64_t n, Generator& gen, double std = 1.0) {
  std::vector<float> v = randf(n, gen, std);
  for (float& x : v) x = round_bf16(x);
  return v;
}
std::vector<float> rounded(std::vector<float> v) {
  for (float& x : v) x = round_bf16(x);
  return v;
}
std::vector<bf16> to_b16(const std::vector<float>& v) {
  std::vector<bf16> b(v.size());
  for (size_t i = 0; i < v.size(); ++i) b[i] = bf16(v[i]);
  return b;
}
std::vector<float> from_b16(const std::vector<bf16>& b) {
  std::vector<float> v(b.size());
  for (size_t i = 0; i < b.size(); ++i) v[i] = static_cast<float>(b[i]);
  return v;
}
std::vector<double> dbl(const std::vector<float>& v) { return {v.begin(), v.end()}; }
std::vector<double> absd(std::vector<double> v) {
  for (double& x : v) x = std::abs(x);
  return v;
}
const double* ptr(const std::vector<double>& v, bool on = true) { return on ? v.data() : nullptr; }
const float* ptr(const std::vector<float>& v, bool on = true) { return on ? v.data() : nullptr; }

Tensor f32_tensor(const Shape& s, const std::vector<float>& v) { return Tensor::from_data<float>(s, v); }
Tensor bf16_tensor(const Shape& s, const std::vector<float>& v) {
  return Tensor::from_data<float>(s, v).to(DType::bf16);
}

// ---- checks ----------------------------------------------------------------------------------

// EXPECTs |got[i] - want[i]| <= allowed[i]; prints the first mismatches and the count.
void expect_within(const std::string& what, const std::vector<double>& got,
                   const std::vector<double>& want, const std::vector<double>& allowed) {
  ASSERT_EQ(got.size(), want.size()) << what;
  ASSERT_EQ(allowed.size(), want.size()) << what;
  int64_t bad = 0;
  std::string report;
  double worst = 0;
  for (size_t i = 0; i < got.size(); ++i) {
    const double err = std::abs(got[i] - want[i]);
    if (!(err <= allowed[i])) {  // NaN fails
      if (bad < 6) report += cat("\n  [", i, "] got ", got[i], " want ", want[i], " allowed ", allowed[i]);
      ++bad;
      worst = std::max(worst, err / std::max(allowed[i], 1e-300));
    }
  }
  EXPECT_EQ(bad, 0) << what << ": " << bad << " of " << got.size()
                    << " elements out of tolerance (worst " << worst << "x)" << report;
}

// A bf16 result against the exact value on the same inputs: b |r| + 2 acc_tol(n) mag.
void expect_bf16_result(const std::string& what, const std::vector<double>& got,
                        const std::vector<double>& ref, const std::vector<double>& mag, int64_t n) {
  std::vector<double> allowed(ref.size());
  for (size_t i = 0; i < ref.size(); ++i)
    allowed[i] = kB * std::abs(ref[i]) + 2 * acc_tol(n) * mag[i] + 1e-300;
  expect_within(what, got, ref, allowed);
}

// An fp32 result (a parameter gradient, never rounded to bf16): acc_tol(n) mag.
void expect_f32_result(const std::string& what, const std::vector<double>& got,
                       const std::vector<double>& ref, const std::vector<double>& mag, int64_t n) {
  expect_close_mag(what, got, ref, mag, acc_tol(n));
}

void expect_bitwise(const std::string& what, const std::vector<float>& got,
                    const std::vector<float>& want) {
  ASSERT_EQ(got.size(), want.size()) << what;
  int64_t bad = 0;
  std::string report;
  for (size_t i = 0; i < got.size(); ++i)
    if (std::memcmp(&got[i], &want[i], sizeof(float)) != 0) {
      if (bad < 6) report += cat("\n  [", i, "] got ", got[i], " want ", want[i]);
      ++bad;
    }
  EXPECT_EQ(bad, 0) << what << ": " << bad << " of " << got.size() << " differ" << report;
}

// How many values are not bf16 numbers (an fp32 gradient that was rounded to bf16 has none).
int64_t not_bf16(const std::vector<float>& v) {
  return std::count_if(v.begin(), v.end(), [](float x) { return round_bf16(x) != x; });
}

// ---- the f64 references ----------------------------------------------------------------------

// Exact results (f64 on bf16-representable operands) and their magnitudes (the same products
// on absolute values): ref_* and mag_* of each output.
struct Reference {
  std::vector<double> out, dx, dw, db, mag_out, mag_dx, mag_dw, mag_db;
};

// x (M, K), wr (N, K) the bf16-rounded weight, b (N) or empty, dy (M, N).
Reference linear_reference(const std::vector<float>& x, const std::vector<float>& wr,
                           const std::vector<float>& b, const std::vector<float>& dy, int64_t M,
                           int64_t K, int64_t N) {
  const std::vector<double> X = dbl(x), W = dbl(wr), B = dbl(b), DY = dbl(dy);
  const std::vector<double> aX = absd(X), aW = absd(W), aB = absd(B), aDY = absd(DY);
  const bool hb = !b.empty();
  Reference r;
  r.out.resize(M * N), r.mag_out.resize(M * N), r.dx.resize(M * K), r.mag_dx.resize(M * K);
  r.dw.resize(N * K), r.mag_dw.resize(N * K), r.db.resize(N), r.mag_db.resize(N);
  cpu::linear_forward<double>(r.out.data(), X.data(), W.data(), ptr(B, hb), M, K, N);
  cpu::linear_forward<double>(r.mag_out.data(), aX.data(), aW.data(), ptr(aB, hb), M, K, N);
  cpu::linear_backward<double>(r.dx.data(), r.dw.data(), r.db.data(), DY.data(), X.data(), W.data(),
                               M, K, N);
  cpu::linear_backward<double>(r.mag_dx.data(), r.mag_dw.data(), r.mag_db.data(), aDY.data(),
                               aX.data(), aW.data(), M, K, N);
  return r;
}

struct PatchShape {
  int64_t N, H, W, Ci, Co, k;
  int64_t Ho() const { return H / k; }
  int64_t Wo() const { return W / k; }
  int64_t x_numel() const { return N * H * W * Ci; }
  int64_t w_numel() const { return Co * k * k * Ci; }
  int64_t rows() const { return N * Ho() * Wo(); }
  int64_t out_numel() const { return rows() * Co; }
  std::string str() const { return cat("N", N, " H", H, " W", W, " Ci", Ci, " Co", Co, " k", k); }
};

Reference patchify_reference(const std::vector<float>& x, const std::vector<float>& wr,
                             const std::vector<float>& b, const std::vector<float>& dy,
                             const PatchShape& s) {
  const std::vector<double> X = dbl(x), W = dbl(wr), B = dbl(b), DY = dbl(dy);
  const std::vector<double> aX = absd(X), aW = absd(W), aB = absd(B), aDY = absd(DY);
  const bool hb = !b.empty();
  Reference r;
  r.out.resize(s.out_numel()), r.mag_out.resize(s.out_numel());
  r.dx.resize(s.x_numel()), r.mag_dx.resize(s.x_numel());
  r.dw.resize(s.w_numel()), r.mag_dw.resize(s.w_numel()), r.db.resize(s.Co), r.mag_db.resize(s.Co);
  cpu::patchify_forward<double>(r.out.data(), X.data(), W.data(), ptr(B, hb), s.N, s.H, s.W, s.Ci,
                                s.Co, s.k);
  cpu::patchify_forward<double>(r.mag_out.data(), aX.data(), aW.data(), ptr(aB, hb), s.N, s.H, s.W,
                                s.Ci, s.Co, s.k);
  cpu::patchify_backward<double>(r.dx.data(), r.dw.data(), r.db.data(), DY.data(), X.data(),
                                 W.data(), s.N, s.H, s.W, s.Ci, s.Co, s.k);
  cpu::patchify_backward<double>(r.mag_dx.data(), r.mag_dw.data(), r.mag_db.data(), aDY.data(),
                                 aX.data(), aW.data(), s.N, s.H, s.W, s.Ci, s.Co, s.k);
  return r;
}

// ---- running an op through autograd -----------------------------------------------------------

// The output and the gradients of L = sum(cast(op(x, w, b), f32) * r): the cast's backward
// hands op the gradient r.to(bf16) = r (r is bf16-representable). Gradients are computed for
// the inputs whose bit is set in `wanted` (1: x, 2: w, 4: b) and are undefined for the others.
struct OpRun {
  Tensor y, dx, dw, db;
};

OpRun run_op(const Op3& op, const Tensor& x, const Tensor& w, const Tensor& b, const Tensor& r,
             unsigned wanted = 7) {
  Tensor xl = x.detach(), wl = w.detach(), bl = b.defined() ? b.detach() : Tensor();
  xl.set_requires_grad((wanted & 1) != 0);
  wl.set_requires_grad((wanted & 2) != 0);
  if (bl.defined()) bl.set_requires_grad((wanted & 4) != 0);
  OpRun run;
  run.y = op(xl, wl, bl);
  sum(mul(cast(run.y, DType::f32), r)).backward();
  run.dx = xl.grad();
  run.dw = wl.grad();
  if (bl.defined()) run.db = bl.grad();
  return run;
}

const Op3 kLinear = [](const Tensor& x, const Tensor& w, const Tensor& b) { return linear(x, w, b); };
const Op3 kPatchify = [](const Tensor& x, const Tensor& w, const Tensor& b) {
  return patchify_conv(x, w, b);
};

std::vector<float> floats_of(const Tensor& t) { return t.to(DType::f32).to_vector<float>(); }

// =============================================================================================
// linear, CPU
// =============================================================================================

// x of shape xs (..., K), weight (N, K); the cpu:: kernels and the autograd op against the f64
// reference; the cpu:: kernels bitwise against the f32 kernels with one rounding.
void check_linear_cpu(const Shape& xs, int64_t N, bool with_bias, uint64_t seed) {
  const int64_t K = xs[-1];
  int64_t M = 1;
  for (int i = 0; i + 1 < xs.rank(); ++i) M *= xs[i];
  std::vector<int64_t> ys = xs.vec();
  ys.back() = N;
  const std::string what = cat("linear bf16 x", xs.str(), " N ", N, with_bias ? "" : " no bias");
  SCOPED_TRACE(what);
  Generator gen(seed);
  // x and dout are bf16 activations; the weight and the bias are fp32 parameters that are NOT
  // bf16-exact (the op rounds both for the forward: the reference gets them rounded).
  const std::vector<float> x = randb(M * K, gen), w = randf(N * K, gen, 0.5),
                           b = with_bias ? randf(N, gen) : std::vector<float>{},
                           dy = randb(M * N, gen);
  const std::vector<float> wr = rounded(w), br = rounded(b);
  const Reference ref = linear_reference(x, wr, br, dy, M, K, N);

  // cpu:: kernels.
  const std::vector<bf16> xb = to_b16(x), wb = to_b16(w), dyb = to_b16(dy);
  std::vector<bf16> out(M * N), dx(M * K);
  std::vector<float> dw(N * K, NAN), db(N, NAN);
  cpu::linear_forward<bf16>(out.data(), xb.data(), wb.data(), ptr(b, with_bias), M, K, N);
  cpu::linear_backward<bf16>(dx.data(), dw.data(), db.data(), dyb.data(), xb.data(), wb.data(), M,
                             K, N);
  expect_bf16_result("cpu out", dbl(from_b16(out)), ref.out, ref.mag_out, K);
  expect_bf16_result("cpu din", dbl(from_b16(dx)), ref.dx, ref.mag_dx, N);
  expect_f32_result("cpu dweight", dbl(dw), ref.dw, ref.mag_dw, M);
  expect_f32_result("cpu dbias", dbl(db), ref.db, ref.mag_db, M);

  // Exactly the f32 kernels on the widened operands and the rounded bias, each bf16 result
  // rounded once, the fp32 gradients not rounded at all.
  std::vector<float> yf(M * N), dxf(M * K), dwf(N * K), dbf(N);
  cpu::linear_forward<float>(yf.data(), x.data(), wr.data(), ptr(br, with_bias), M, K, N);
  cpu::linear_backward<float>(dxf.data(), dwf.data(), dbf.data(), dy.data(), x.data(), wr.data(), M,
                              K, N);
  expect_bitwise("cpu out = bf16(f32 kernel)", from_b16(out), rounded(yf));
  expect_bitwise("cpu din = bf16(f32 kernel)", from_b16(dx), rounded(dxf));
  expect_bitwise("cpu dweight = f32 kernel", dw, dwf);
  expect_bitwise("cpu dbias = f32 kernel", db, dbf);
  if (M * K > 8 && N * K > 8) {
    EXPECT_GT(not_bf16(dw), 0) << "dweight looks rounded to bf16";
  }

  // The autograd op: through OpenBLAS when the build has it (f32 summation order differs from
  // the loops: the f64 tolerance), then through the loops (bitwise the cpu:: kernels).
  const Tensor xt = bf16_tensor(xs, x), wt = f32_tensor({N, K}, w),
               bt = with_bias ? f32_tensor({N}, b) : Tensor(), rt = f32_tensor(Shape(ys), dy);
  for (bool reference_loops : {false, true}) {
    SCOPED_TRACE(reference_loops ? "autograd, reference loops" : "autograd, default CPU path");
    blas::ScopedCpuReference loops(reference_loops);
    const OpRun run = run_op(kLinear, xt, wt, bt, rt);
    ASSERT_EQ(run.y.dtype(), DType::bf16);
    ASSERT_EQ(run.dx.dtype(), DType::bf16);
    ASSERT_EQ(run.dw.dtype(), DType::f32);
    EXPECT_EQ(run.y.shape(), Shape(ys));
    EXPECT_EQ(run.dx.shape(), xs);
    EXPECT_EQ(run.dw.shape(), Shape({N, K}));
    expect_bf16_result("op out", values(run.y), ref.out, ref.mag_out, K);
    expect_bf16_result("op din", values(run.dx), ref.dx, ref.mag_dx, N);
    expect_f32_result("op dweight", values(run.dw), ref.dw, ref.mag_dw, M);
    if (with_bias) {
      ASSERT_EQ(run.db.dtype(), DType::f32);
      expect_f32_result("op dbias", values(run.db), ref.db, ref.mag_db, M);
    }
    if (reference_loops) {
      expect_bitwise("op out = cpu kernel", floats_of(run.y), from_b16(out));
      expect_bitwise("op din = cpu kernel", floats_of(run.dx), from_b16(dx));
      expect_bitwise("op dweight = cpu kernel", run.dw.to_vector<float>(), dw);
      if (with_bias) expect_bitwise("op dbias = cpu kernel", run.db.to_vector<float>(), db);
    }
  }
}

TEST(Bf16Linear, CpuMatchesTheF64ReferenceConvNeXtShapes) {
  check_linear_cpu({2, 7, 7, 96}, 384, true, 1);    // pw1 of stage 0 (7x7 instead of 56x56)
  check_linear_cpu({2, 7, 7, 384}, 96, true, 2);    // pw2 of stage 0
  check_linear_cpu({2, 7, 7, 384}, 1536, true, 3);  // pw1 of stage 2 at 7x7
  check_linear_cpu({2, 768}, 1000, true, 4);        // the head
}

TEST(Bf16Linear, CpuMatchesTheF64ReferenceAwkwardShapes) {
  check_linear_cpu({1, 1}, 1, true, 11);
  check_linear_cpu({3, 5}, 7, true, 12);
  check_linear_cpu({17, 33}, 65, true, 13);
  check_linear_cpu({17, 33}, 65, false, 14);  // no bias
  check_linear_cpu({2, 3, 1, 9}, 4, true, 15);
  check_linear_cpu({1, 5, 13, 97}, 383, true, 16);
}

TEST(Bf16Linear, CpuEmptySizes) {
  // K = 0: out is the bias rounded once to bf16, dweight has no elements, dbias the column sums.
  // M = 0: no rows; dweight and dbias are zeros. N = 0: din is zeros.
  for (const auto& [xs, N] : std::vector<std::pair<Shape, int64_t>>{
           {Shape{3, 0}, 5}, {Shape{0, 4}, 6}, {Shape{2, 0, 3, 4}, 6}, {Shape{3, 4}, 0}}) {
    check_linear_cpu(xs, N, true, 21);
  }
}

TEST(Bf16Linear, OnlyRequestedGradientsAndTheSameValues) {
  Generator gen(31);
  const int64_t M = 6, K = 9, N = 5;
  const Tensor x = bf16_tensor({2, 3, K}, randb(M * K, gen)), w = f32_tensor({N, K}, randf(N * K, gen)),
               b = f32_tensor({N}, randf(N, gen)), r = f32_tensor({2, 3, N}, randb(M * N, gen));
  const OpRun all = run_op(kLinear, x, w, b, r, 7);
  for (unsigned wanted = 1; wanted < 8; ++wanted) {
    SCOPED_TRACE(cat("wanted ", wanted));
    const OpRun got = run_op(kLinear, x, w, b, r, wanted);
    EXPECT_EQ(got.dx.defined(), (wanted & 1) != 0);
    EXPECT_EQ(got.dw.defined(), (wanted & 2) != 0);
    EXPECT_EQ(got.db.defined(), (wanted & 4) != 0);
    if (got.dx.defined()) expect_bitwise("dx", floats_of(got.dx), floats_of(all.dx));
    if (got.dw.defined()) expect_bitwise("dw", got.dw.to_vector<float>(), all.dw.to_vector<float>());
    if (got.db.defined()) expect_bitwise("db", got.db.to_vector<float>(), all.db.to_vector<float>());
  }
}

TEST(Bf16Linear, ParametersMustBeF32) {
  const Tensor x = Tensor::zeros({2, 3, 7}, DType::bf16);
  const Tensor w = Tensor::zeros({5, 7}), b = Tensor::zeros({5});
  EXPECT_EQ(linear(x, w, b).dtype(), DType::bf16);  // sanity: the good arguments work
  EXPECT_EQ(linear(x, w, Tensor()).dtype(), DType::bf16);
  expect_error([&] { linear(x, Tensor::zeros({5, 7}, DType::bf16), b); },
               {"linear", "weight bf16[5, 7] cpu", "must be f32", "x bf16[2, 3, 7] cpu"});
  expect_error([&] { linear(x, w, Tensor::zeros({5}, DType::bf16)); },
               {"linear", "bias bf16[5] cpu", "must be f32", "x bf16[2, 3, 7] cpu"});
  expect_error([&] { linear(x, Tensor::zeros({5, 7}, DType::f64), b); },
               {"linear", "weight f64[5, 7] cpu", "must be f32"});
  // f32 activations keep f32 parameters: a bf16 weight is an error there too.
  expect_error([&] { linear(Tensor::zeros({2, 7}), Tensor::zeros({5, 7}, DType::bf16), b); },
               {"linear", "weight bf16[5, 7] cpu", "must be f32", "x f32[2, 7] cpu"});
  // f16 is storage only.
  expect_error([&] { linear(Tensor::zeros({2, 7}, DType::f16), w, b); },
               {"linear", "x f16[2, 7] cpu", "must be f32, f64 or bf16"});
}

// ---- the bias: rounded to bf16, added in fp32, the sum rounded once ---------------------------

// Operands whose products and partial sums are all exact in f32 (x a multiple of 1/64, w of 1/16,
// at most 8 terms: at most 15 significant bits), so that every summation order gives the same
// acc; the bias an fp32 value that is not bf16-exact. The one result the bf16 form allows is then
// out = bf16(acc + bf16(b)), the add done in f32, bitwise. The unrounded-bias form bf16(acc + b)
// differs from it in some elements (checked by exact_bias_expected's caller), so a kernel that
// adds the fp32 bias fails.
struct ExactBiasCase {
  int64_t M, K, N;
  std::vector<float> x, w, b;  // (M, K) bf16-exact, (N, K) bf16-exact, (N) not bf16-exact
};

ExactBiasCase exact_bias_case(int64_t M, int64_t K, int64_t N, uint64_t seed) {
  Generator gen(seed);
  ExactBiasCase c{M, K, N, {}, {}, randf(N, gen)};
  for (int64_t i = 0; i < M * K; ++i) c.x.push_back(static_cast<float>(std::nearbyint(16 * gen.normal()) / 64));
  for (int64_t i = 0; i < N * K; ++i) c.w.push_back(static_cast<float>(std::nearbyint(8 * gen.normal()) / 16));
  return c;
}

// bf16(acc + bias) with the bias rounded to bf16 first (round_bias) or not, as floats.
std::vector<float> exact_bias_expected(const ExactBiasCase& c, bool round_bias) {
  std::vector<float> out(static_cast<size_t>(c.M * c.N));
  for (int64_t m = 0; m < c.M; ++m)
    for (int64_t n = 0; n < c.N; ++n) {
      double acc = 0;  // exact (see above), and so is its conversion to float
      for (int64_t k = 0; k < c.K; ++k) acc += double(c.x[m * c.K + k]) * c.w[n * c.K + k];
      const float bias = round_bias ? round_bf16(c.b[n]) : c.b[n];
      out[m * c.N + n] = round_bf16(static_cast<float>(acc) + bias);  // one f32 add, one rounding
    }
  return out;
}

// How many elements differ between the two forms (the case must tell them apart).
int64_t forms_differ(const ExactBiasCase& c) {
  const std::vector<float> a = exact_bias_expected(c, true), b = exact_bias_expected(c, false);
  int64_t n = 0;
  for (size_t i = 0; i < a.size(); ++i) n += a[i] != b[i];
  return n;
}

TEST(Bf16Linear, BiasIsRoundedToBf16AddedInFp32AndTheSumRoundedOnce) {
  for (const auto& [M, K, N, seed] : std::vector<std::tuple<int64_t, int64_t, int64_t, uint64_t>>{
           {37, 5, 24, 1}, {64, 8, 96, 2}, {3, 1, 130, 3}}) {
    SCOPED_TRACE(cat("M ", M, " K ", K, " N ", N));
    const ExactBiasCase c = exact_bias_case(M, K, N, seed);
    ASSERT_GT(forms_differ(c), 0) << "the case cannot tell a rounded bias from an fp32 one";
    const std::vector<float> want = exact_bias_expected(c, true);
    const std::vector<bf16> xb = to_b16(c.x), wb = to_b16(c.w);
    std::vector<bf16> out(static_cast<size_t>(M * N));
    cpu::linear_forward<bf16>(out.data(), xb.data(), wb.data(), c.b.data(), M, K, N);
    expect_bitwise("cpu::linear_forward<bf16>", from_b16(out), want);
    std::fill(out.begin(), out.end(), bf16(0.0f));
    blas::linear_forward(out.data(), xb.data(), wb.data(), c.b.data(), M, K, N);  // loops without BLAS
    expect_bitwise("blas::linear_forward (bf16)", from_b16(out), want);
    // patchify_conv with k = 1 is the same product (its patch matrix is the image).
    std::fill(out.begin(), out.end(), bf16(0.0f));
    cpu::patchify_forward<bf16>(out.data(), xb.data(), wb.data(), c.b.data(), 1, 1, M, K, N, 1);
    expect_bitwise("cpu::patchify_forward<bf16>, k = 1", from_b16(out), want);
    // The op, whose weight copy is exact here (w is bf16-exact), both CPU paths.
    for (bool reference_loops : {false, true}) {
      blas::ScopedCpuReference loops(reference_loops);
      const Tensor y = linear(bf16_tensor({M, K}, c.x), f32_tensor({N, K}, c.w), f32_tensor({N}, c.b));
      expect_bitwise(reference_loops ? "op, reference loops" : "op, default CPU path", floats_of(y), want);
    }
  }
}

// =============================================================================================
// patchify_conv, CPU
// =============================================================================================

void check_patchify_cpu(const PatchShape& s, bool with_bias, uint64_t seed) {
  const std::string what = cat("patchify bf16 ", s.str(), with_bias ? "" : " no bias");
  SCOPED_TRACE(what);
  Generator gen(seed);
  const std::vector<float> x = randb(s.x_numel(), gen), w = randf(s.w_numel(), gen, 0.3),
                           b = with_bias ? randf(s.Co, gen) : std::vector<float>{},
                           dy = randb(s.out_numel(), gen);
  const std::vector<float> wr = rounded(w), br = rounded(b);  // the op rounds both (forward)
  const Reference ref = patchify_reference(x, wr, br, dy, s);
  const int64_t depth = s.k * s.k * s.Ci;  // terms of an output; din: Co terms; params: rows

  const std::vector<bf16> xb = to_b16(x), wb = to_b16(w), dyb = to_b16(dy);
  std::vector<bf16> out(s.out_numel()), dx(s.x_numel());
  std::vector<float> dw(s.w_numel(), NAN), db(s.Co, NAN);
  cpu::patchify_forward<bf16>(out.data(), xb.data(), wb.data(), ptr(b, with_bias), s.N, s.H, s.W,
                              s.Ci, s.Co, s.k);
  cpu::patchify_backward<bf16>(dx.data(), dw.data(), db.data(), dyb.data(), xb.data(), wb.data(),
                               s.N, s.H, s.W, s.Ci, s.Co, s.k);
  expect_bf16_result("cpu out", dbl(from_b16(out)), ref.out, ref.mag_out, depth);
  expect_bf16_result("cpu din", dbl(from_b16(dx)), ref.dx, ref.mag_dx, s.Co);  // 0 at the borders
  expect_f32_result("cpu dweight", dbl(dw), ref.dw, ref.mag_dw, s.rows());
  expect_f32_result("cpu dbias", dbl(db), ref.db, ref.mag_db, s.rows());

  std::vector<float> yf(s.out_numel()), dxf(s.x_numel()), dwf(s.w_numel()), dbf(s.Co);
  cpu::patchify_forward<float>(yf.data(), x.data(), wr.data(), ptr(br, with_bias), s.N, s.H, s.W,
                               s.Ci, s.Co, s.k);
  cpu::patchify_backward<float>(dxf.data(), dwf.data(), dbf.data(), dy.data(), x.data(), wr.data(),
                                s.N, s.H, s.W, s.Ci, s.Co, s.k);
  expect_bitwise("cpu out = bf16(f32 kernel)", from_b16(out), rounded(yf));
  expect_bitwise("cpu din = bf16(f32 kernel)", from_b16(dx), rounded(dxf));
  expect_bitwise("cpu dweight = f32 kernel", dw, dwf);
  expect_bitwise("cpu dbias = f32 kernel", db, dbf);

  const Tensor xt = bf16_tensor({s.N, s.H, s.W, s.Ci}, x), wt = f32_tensor({s.Co, s.k, s.k, s.Ci}, w),
               bt = with_bias ? f32_tensor({s.Co}, b) : Tensor(),
               rt = f32_tensor({s.N, s.Ho(), s.Wo(), s.Co}, dy);
  const OpRun run = run_op(kPatchify, xt, wt, bt, rt);
  ASSERT_EQ(run.y.dtype(), DType::bf16);
  ASSERT_EQ(run.dx.dtype(), DType::bf16);
  ASSERT_EQ(run.dw.dtype(), DType::f32);
  expect_bitwise("op out = cpu kernel", floats_of(run.y), from_b16(out));
  expect_bitwise("op din = cpu kernel", floats_of(run.dx), from_b16(dx));
  expect_bitwise("op dweight = cpu kernel", run.dw.to_vector<float>(), dw);
  if (with_bias) {
    ASSERT_EQ(run.db.dtype(), DType::f32);
    expect_bitwise("op dbias = cpu kernel", run.db.to_vector<float>(), db);
  }
}

TEST(Bf16Patchify, CpuMatchesTheF64ReferenceConvNeXtShapes) {
  check_patchify_cpu({2, 32, 32, 3, 96, 4}, true, 1);    // the stem (32x32 instead of 224x224)
  check_patchify_cpu({2, 14, 14, 96, 192, 2}, true, 2);  // downsampling 96 -> 192
  check_patchify_cpu({2, 7, 7, 192, 384, 2}, true, 3);   // 7x7 -> 3x3: the last row/col ignored
}

TEST(Bf16Patchify, CpuMatchesTheF64ReferenceAwkwardShapes) {
  check_patchify_cpu({1, 9, 11, 3, 5, 4}, true, 11);  // 9x11 -> 2x2
  check_patchify_cpu({2, 5, 7, 1, 3, 2}, false, 12);  // odd sizes, no bias
  check_patchify_cpu({3, 7, 4, 1, 1, 4}, true, 13);   // Ci = Co = 1
  check_patchify_cpu({2, 6, 5, 8, 16, 1}, true, 14);  // k = 1
  check_patchify_cpu({1, 4, 4, 5, 7, 4}, true, 15);   // one patch
}

TEST(Bf16Patchify, ParametersMustBeF32) {
  const Tensor x = Tensor::zeros({2, 8, 8, 3}, DType::bf16);
  const Tensor w = Tensor::zeros({5, 4, 4, 3}), b = Tensor::zeros({5});
  EXPECT_EQ(patchify_conv(x, w, b).dtype(), DType::bf16);
  expect_error([&] { patchify_conv(x, Tensor::zeros({5, 4, 4, 3}, DType::bf16), b); },
               {"patchify_conv", "weight bf16[5, 4, 4, 3] cpu", "must be f32", "x bf16[2, 8, 8, 3] cpu"});
  expect_error([&] { patchify_conv(x, w, Tensor::zeros({5}, DType::bf16)); },
               {"patchify_conv", "bias bf16[5] cpu", "must be f32"});
  expect_error([&] { patchify_conv(Tensor::zeros({2, 8, 8, 3}), Tensor::zeros({5, 4, 4, 3}, DType::bf16), b); },
               {"patchify_conv", "weight bf16[5, 4, 4, 3] cpu", "must be f32", "x f32[2, 8, 8, 3] cpu"});
  expect_error([&] { patchify_conv(Tensor::zeros({2, 8, 8, 3}, DType::f16), w, b); },
               {"patchify_conv", "x f16[2, 8, 8, 3] cpu", "must be f32, f64 or bf16"});
}

// =============================================================================================
// CUDA against the CPU bf16 kernels
// =============================================================================================

#if CNX_TEST_CUDA

const Device kDev = Device::cuda(0);
constexpr int64_t kGuard = 7;  // sentinel elements after every device buffer

// A device buffer of `n` elements of T placed `offset` elements into an allocation of
// offset + n + kGuard elements, all of which start as `fill` except the data (when given).
// An offset of 1, 2 or 3 misaligns the data pointer from the allocation's 256-byte boundary.
template <class T> class DevBuf {
 public:
  DevBuf(const std::vector<T>& data, int64_t offset, T fill) : off_(offset), n_(static_cast<int64_t>(data.size())) {
    std::vector<T> h(static_cast<size_t>(off_ + n_ + kGuard), fill);
    std::copy(data.begin(), data.end(), h.begin() + off_);
    t_ = Tensor::from_data<T>(Shape{off_ + n_ + kGuard}, h, kDev);
  }
  T* p() { return t_.data<T>() + off_; }
  std::vector<T> all() const { return t_.to_vector<T>(); }
  std::vector<T> get() const {
    const std::vector<T> a = all();
    return {a.begin() + off_, a.begin() + off_ + n_};
  }

 private:
  Tensor t_;
  int64_t off_, n_;
};

float as_float(float v) { return v; }
float as_float(bf16 v) { return static_cast<float>(v); }
bool same_bits(float a, float b) { return std::memcmp(&a, &b, sizeof a) == 0; }
bool same_bits(bf16 a, bf16 b) { return a.bits == b.bits; }

// EXPECTs every element of the allocation outside the data to still be `fill` (guards), or,
// with whole, every element (an output that was not requested).
template <class T>
void expect_untouched(const std::string& what, const DevBuf<T>& buf, int64_t offset, int64_t n, T fill,
                      bool whole) {
  const std::vector<T> a = buf.all();
  int64_t changed = 0;
  for (int64_t i = 0; i < static_cast<int64_t>(a.size()); ++i) {
    const bool data = i >= offset && i < offset + n;
    if ((whole || !data) && !same_bits(a[i], fill)) ++changed;
  }
  EXPECT_EQ(changed, 0) << what << (whole ? ": an output that was not requested was written"
                                          : ": guard elements around the data were written");
}

// One bf16 ulp of |v| (the spacing of bf16 numbers at v's binade; the smallest normal's below).
double ulp_bf16(double v) {
  int e = 0;
  std::frexp(std::max(std::abs(v), 0x1p-126), &e);  // |v| = m 2^e, m in [0.5, 1)
  return std::ldexp(1.0, e - 8);
}

// GPU vs CPU, bf16 results: 2 acc_tol(n) mag + one bf16 ulp (see the top of the file).
void expect_bf16_vs_cpu(const std::string& what, const std::vector<bf16>& gpu,
                        const std::vector<bf16>& cpu, const std::vector<double>& mag, int64_t n) {
  const std::vector<double> g = dbl(from_b16(gpu)), c = dbl(from_b16(cpu));
  std::vector<double> allowed(c.size());
  for (size_t i = 0; i < c.size(); ++i)
    allowed[i] = 2 * acc_tol(n) * mag[i] + ulp_bf16(std::max(std::abs(g[i]), std::abs(c[i])));
  expect_within(what, g, c, allowed);
}

// GPU vs CPU, fp32 results: 2 acc_tol(n) mag.
void expect_f32_vs_cpu(const std::string& what, const std::vector<float>& gpu,
                       const std::vector<float>& cpu, const std::vector<double>& mag, int64_t n) {
  std::vector<double> allowed(mag.size());
  for (size_t i = 0; i < mag.size(); ++i) allowed[i] = 2 * acc_tol(n) * mag[i] + 1e-300;
  expect_within(what, dbl(gpu), dbl(cpu), allowed);
}

const bf16 kFill16 = [] {  // a bf16 quiet NaN: an element the kernel forgets fails every check
  bf16 v;
  v.bits = 0x7fc1;
  return v;
}();
const float kFill32 = std::nanf("");

// The operands and the CPU bf16 results of one linear or patchify case.
struct Case {
  std::vector<bf16> x, w, dy;  // bf16 activations and weight copy
  std::vector<float> b;        // fp32 bias (empty: none)
  std::vector<bf16> out, dx;   // CPU results
  std::vector<float> dw, db;
  Reference mag;               // magnitudes (only the mag_* members are used)
};

// Runs the CUDA launchers (through `forward` and `backward`, given device pointers) on copies of
// c's operands at element offset `off`, requesting the gradients in `wanted` (1: din,
// 2: dweight, 4: dbias), and compares with c. n_out, n_dx, n_param: the terms of each sum.
template <class Forward, class Backward>
void compare_with_cpu(const std::string& what, const Case& c, int64_t off, unsigned wanted,
                      int64_t n_out, int64_t n_dx, int64_t n_param, Forward&& forward,
                      Backward&& backward) {
  SCOPED_TRACE(cat(what, " offset ", off, " gradients ", wanted));
  const bool has_b = !c.b.empty();
  DevBuf<bf16> x(c.x, off, kFill16), w(c.w, off, kFill16), dy(c.dy, off, kFill16);
  DevBuf<float> b(c.b, off, kFill32);
  DevBuf<bf16> out(std::vector<bf16>(c.out.size(), kFill16), off, kFill16),
      dx(std::vector<bf16>(c.dx.size(), kFill16), off, kFill16);
  DevBuf<float> dw(std::vector<float>(c.dw.size(), kFill32), off, kFill32),
      db(std::vector<float>(c.db.size(), kFill32), off, kFill32);
  {
    cuda::DeviceGuard guard(kDev);
    const cudaStream_t s = cuda::current_stream();
    forward(out.p(), x.p(), w.p(), has_b ? b.p() : nullptr, s);
    backward((wanted & 1) ? dx.p() : nullptr, (wanted & 2) ? dw.p() : nullptr,
             (wanted & 4) ? db.p() : nullptr, dy.p(), (wanted & 2) ? x.p() : nullptr,
             (wanted & 1) ? w.p() : nullptr, s);
    CNX_CUDA_CHECK(cudaStreamSynchronize(s));
  }
  const int64_t n_x = static_cast<int64_t>(c.dx.size()), n_w = static_cast<int64_t>(c.dw.size()),
                n_b = static_cast<int64_t>(c.db.size()), n_y = static_cast<int64_t>(c.out.size());
  expect_bf16_vs_cpu("out", out.get(), c.out, c.mag.mag_out, n_out);
  expect_untouched("out", out, off, n_y, kFill16, false);
  if (wanted & 1) {
    expect_bf16_vs_cpu("din", dx.get(), c.dx, c.mag.mag_dx, n_dx);
    expect_untouched("din", dx, off, n_x, kFill16, false);
  } else {
    expect_untouched("din", dx, off, n_x, kFill16, true);
  }
  if (wanted & 2) {
    expect_f32_vs_cpu("dweight", dw.get(), c.dw, c.mag.mag_dw, n_param);
    expect_untouched("dweight", dw, off, n_w, kFill32, false);
  } else {
    expect_untouched("dweight", dw, off, n_w, kFill32, true);
  }
  if (wanted & 4) {
    expect_f32_vs_cpu("dbias", db.get(), c.db, c.mag.mag_db, n_param);
    expect_untouched("dbias", db, off, n_b, kFill32, false);
  } else {
    expect_untouched("dbias", db, off, n_b, kFill32, true);
  }
}

Case linear_case(int64_t M, int64_t K, int64_t N, bool with_bias, uint64_t seed) {
  Generator gen(seed);
  const std::vector<float> x = randb(M * K, gen), wr = randb(N * K, gen, 0.3),
                           b = with_bias ? randf(N, gen) : std::vector<float>{}, dy = randb(M * N, gen);
  Case c;
  c.x = to_b16(x), c.w = to_b16(wr), c.dy = to_b16(dy), c.b = b;
  c.out.resize(M * N), c.dx.resize(M * K), c.dw.resize(N * K), c.db.resize(N);
  cpu::linear_forward<bf16>(c.out.data(), c.x.data(), c.w.data(), ptr(b, with_bias), M, K, N);
  cpu::linear_backward<bf16>(c.dx.data(), c.dw.data(), c.db.data(), c.dy.data(), c.x.data(),
                             c.w.data(), M, K, N);
  c.mag = linear_reference(x, wr, b, dy, M, K, N);  // (the exact values are not used here)
  return c;
}

void check_linear_gpu(int64_t M, int64_t K, int64_t N, bool with_bias, std::vector<int64_t> offsets,
                      std::vector<unsigned> gradient_sets, uint64_t seed) {
  const Case c = linear_case(M, K, N, with_bias, seed);
  const std::string what = cat("linear bf16 M=", M, " K=", K, " N=", N, with_bias ? "" : " no bias");
  auto fwd = [&](bf16* out, const bf16* x, const bf16* w, const float* b, cudaStream_t s) {
    cuda::linear_forward(out, x, w, b, M, K, N, s);
  };
  auto bwd = [&](bf16* dx, float* dw, float* db, const bf16* dy, const bf16* x, const bf16* w,
                 cudaStream_t s) { cuda::linear_backward(dx, dw, db, dy, x, w, M, K, N, s); };
  for (int64_t off : offsets)
    for (unsigned wanted : gradient_sets) compare_with_cpu(what, c, off, wanted, K, N, M, fwd, bwd);
}

const std::vector<unsigned> kAllGradients = {7};
const std::vector<unsigned> kEveryGradientSet = {0, 1, 2, 3, 4, 5, 6, 7};

TEST(Bf16CudaLinear, MatchesTheCpuBf16Kernels) {
  CNX_SKIP_WITHOUT_DEVICE();
  // ConvNeXt-T's pointwise layers and head at batch 2: stage 0 (56x56, 96 <-> 384), stage 3
  // (7x7, 768 <-> 3072), the head (768 -> 1000).
  check_linear_gpu(6272, 96, 384, true, {0}, kAllGradients, 1);
  check_linear_gpu(6272, 384, 96, true, {0}, kAllGradients, 2);
  check_linear_gpu(98, 768, 3072, true, {0}, kAllGradients, 3);
  check_linear_gpu(98, 3072, 768, true, {0}, kAllGradients, 4);
  check_linear_gpu(2, 768, 1000, true, {0}, kAllGradients, 5);
  // Awkward sizes (not multiples of 8: no 16-byte rows), without bias, and misaligned pointers
  // (offsets of 1 and 3 elements: 2 and 6 bytes for bf16), with every set of gradients.
  check_linear_gpu(1, 1, 1, true, {0, 1}, kEveryGradientSet, 11);
  check_linear_gpu(3, 5, 7, true, {0, 3}, kEveryGradientSet, 12);
  check_linear_gpu(17, 33, 65, true, {0, 1}, kEveryGradientSet, 13);
  check_linear_gpu(17, 33, 65, false, {0, 1}, kEveryGradientSet, 14);
  check_linear_gpu(130, 97, 383, true, {0, 3}, kAllGradients, 15);
  check_linear_gpu(64, 96, 384, true, {1, 2}, kEveryGradientSet, 16);  // aligned shapes, odd pointers
  // Empty sizes: K = 0 (out = bias), M = 0 (dweight, dbias zeros), N = 0 (din zeros).
  check_linear_gpu(3, 0, 5, true, {0}, kEveryGradientSet, 21);
  check_linear_gpu(0, 4, 6, true, {0}, kEveryGradientSet, 22);
  check_linear_gpu(3, 4, 0, true, {0}, kEveryGradientSet, 23);
}

Case patchify_case(const PatchShape& s, bool with_bias, uint64_t seed) {
  Generator gen(seed);
  const std::vector<float> x = randb(s.x_numel(), gen), wr = randb(s.w_numel(), gen, 0.3),
                           b = with_bias ? randf(s.Co, gen) : std::vector<float>{},
                           dy = randb(s.out_numel(), gen);
  Case c;
  c.x = to_b16(x), c.w = to_b16(wr), c.dy = to_b16(dy), c.b = b;
  c.out.resize(s.out_numel()), c.dx.resize(s.x_numel()), c.dw.resize(s.w_numel()), c.db.resize(s.Co);
  cpu::patchify_forward<bf16>(c.out.data(), c.x.data(), c.w.data(), ptr(b, with_bias), s.N, s.H,
                              s.W, s.Ci, s.Co, s.k);
  cpu::patchify_backward<bf16>(c.dx.data(), c.dw.data(), c.db.data(), c.dy.data(), c.x.data(),
                               c.w.data(), s.N, s.H, s.W, s.Ci, s.Co, s.k);
  c.mag = patchify_reference(x, wr, b, dy, s);
  return c;
}

void check_patchify_gpu(const PatchShape& s, bool with_bias, std::vector<int64_t> offsets,
                        std::vector<unsigned> gradient_sets, uint64_t seed) {
  const Case c = patchify_case(s, with_bias, seed);
  const std::string what = cat("patchify bf16 ", s.str(), with_bias ? "" : " no bias");
  auto fwd = [&](bf16* out, const bf16* x, const bf16* w, const float* b, cudaStream_t st) {
    cuda::patchify_forward(out, x, w, b, s.N, s.H, s.W, s.Ci, s.Co, s.k, st);
  };
  auto bwd = [&](bf16* dx, float* dw, float* db, const bf16* dy, const bf16* x, const bf16* w,
                 cudaStream_t st) {
    cuda::patchify_backward(dx, dw, db, dy, x, w, s.N, s.H, s.W, s.Ci, s.Co, s.k, st);
  };
  for (int64_t off : offsets)
    for (unsigned wanted : gradient_sets)
      compare_with_cpu(what, c, off, wanted, s.k * s.k * s.Ci, s.Co, s.rows(), fwd, bwd);
}

TEST(Bf16CudaPatchify, MatchesTheCpuBf16Kernels) {
  CNX_SKIP_WITHOUT_DEVICE();
  // ConvNeXt-T at batch 2: the stem and the three downsampling layers.
  check_patchify_gpu({2, 224, 224, 3, 96, 4}, true, {0}, kAllGradients, 1);
  check_patchify_gpu({2, 56, 56, 96, 192, 2}, true, {0}, kAllGradients, 2);
  check_patchify_gpu({2, 28, 28, 192, 384, 2}, true, {0}, kAllGradients, 3);
  check_patchify_gpu({2, 14, 14, 384, 768, 2}, true, {0}, kAllGradients, 4);
  // Awkward sizes; Ci % 8 == 0 (the 16-byte gather and scatter of bf16) at aligned and
  // misaligned offsets (the scalar fallback); every set of gradients.
  check_patchify_gpu({2, 9, 9, 5, 7, 2}, true, {0, 1}, kEveryGradientSet, 11);
  check_patchify_gpu({3, 8, 8, 8, 6, 2}, true, {0, 1, 4}, kEveryGradientSet, 12);
  check_patchify_gpu({1, 5, 7, 3, 2, 4}, false, {0, 3}, kEveryGradientSet, 13);
  check_patchify_gpu({2, 37, 45, 1, 8, 4}, true, {0}, kAllGradients, 14);
  check_patchify_gpu({2, 6, 5, 8, 16, 1}, true, {0, 1}, kEveryGradientSet, 15);  // k = 1
  check_patchify_gpu({1, 1, 3, 4, 5, 2}, true, {0}, kEveryGradientSet, 16);      // H < k: no output
  check_patchify_gpu({2, 7, 7, 384, 768, 2}, true, {0}, kAllGradients, 17);      // 7x7 -> 3x3
}

// The autograd ops on CUDA bf16 tensors (the weight cast to bf16 on the GPU, the dispatch, the
// dtypes of the gradients) against the same ops on the CPU.
TEST(Bf16CudaOps, LinearAndPatchifyMatchTheCpuOps) {
  CNX_SKIP_WITHOUT_DEVICE();
  // linear: x (M, K) as (2, M / 2, K); patchify: its PatchShape.
  struct OpCase {
    const char* name;
    bool is_linear;
    int64_t M, K, N;
    PatchShape p;
  };
  const OpCase cases[] = {
      {"linear pw1", true, 98, 96, 384, {}},
      {"linear head", true, 2, 768, 1000, {}},
      {"patchify stem", false, 0, 0, 0, {2, 64, 64, 3, 96, 4}},
      {"patchify downsample", false, 0, 0, 0, {2, 9, 9, 96, 192, 2}},
  };
  uint64_t seed = 100;
  for (const OpCase& oc : cases) {
    SCOPED_TRACE(oc.name);
    const PatchShape& p = oc.p;
    const Shape xs = oc.is_linear ? Shape{2, oc.M / 2, oc.K} : Shape{p.N, p.H, p.W, p.Ci};
    const Shape ws = oc.is_linear ? Shape{oc.N, oc.K} : Shape{p.Co, p.k, p.k, p.Ci};
    const Shape ys = oc.is_linear ? Shape{2, oc.M / 2, oc.N} : Shape{p.N, p.Ho(), p.Wo(), p.Co};
    const int64_t Co = ws[0];
    Generator gen(++seed);
    const std::vector<float> x = randb(xs.numel(), gen), w = randf(ws.numel(), gen, 0.3),
                             b = randf(Co, gen), r = randb(ys.numel(), gen);
    const Tensor xt = bf16_tensor(xs, x), wt = f32_tensor(ws, w), bt = f32_tensor({Co}, b),
                 rt = f32_tensor(ys, r);
    const Op3& op = oc.is_linear ? kLinear : kPatchify;
    const OpRun cpu_run = run_op(op, xt, wt, bt, rt);
    const OpRun gpu_run = run_op(op, xt.to(kDev), wt.to(kDev), bt.to(kDev), rt.to(kDev));
    ASSERT_EQ(gpu_run.y.dtype(), DType::bf16);
    ASSERT_EQ(gpu_run.dx.dtype(), DType::bf16);
    ASSERT_EQ(gpu_run.dw.dtype(), DType::f32);
    ASSERT_EQ(gpu_run.db.dtype(), DType::f32);
    EXPECT_EQ(gpu_run.y.device(), kDev);
    // Magnitudes of every sum (the bf16-rounded weight, as the op uses it).
    const Reference mag = oc.is_linear ? linear_reference(x, rounded(w), b, r, oc.M, oc.K, oc.N)
                                       : patchify_reference(x, rounded(w), b, r, p);
    const int64_t n_out = oc.is_linear ? oc.K : p.k * p.k * p.Ci;
    const int64_t n_param = oc.is_linear ? oc.M : p.rows();
    auto b16 = [](const Tensor& t) { return to_b16(floats_of(t)); };
    expect_bf16_vs_cpu("out", b16(gpu_run.y), b16(cpu_run.y), mag.mag_out, n_out);
    expect_bf16_vs_cpu("din", b16(gpu_run.dx), b16(cpu_run.dx), mag.mag_dx, Co);
    expect_f32_vs_cpu("dweight", gpu_run.dw.to_vector<float>(), cpu_run.dw.to_vector<float>(),
                      mag.mag_dw, n_param);
    expect_f32_vs_cpu("dbias", gpu_run.db.to_vector<float>(), cpu_run.db.to_vector<float>(),
                      mag.mag_db, n_param);
  }
}

#endif  // CNX_TEST_CUDA

}  // namespace

#if !CNX_TEST_CUDA
// Listed (and skipped, saying why) in a build without CUDA too.
TEST(Bf16CudaLinear, MatchesTheCpuBf16Kernels) { CNX_SKIP_BUILT_WITHOUT_CUDA(); }
TEST(Bf16CudaPatchify, MatchesTheCpuBf16Kernels) { CNX_SKIP_BUILT_WITHOUT_CUDA(); }
TEST(Bf16CudaOps, LinearAndPatchifyMatchTheCpuOps) { CNX_SKIP_BUILT_WITHOUT_CUDA(); }
#endif
