// The depthwise convolution in mixed precision: bf16 activations (x, out, dout, din) with fp32
// parameters (weight, bias) and fp32 parameter gradients (dweight, dbias).
//
// CPU: the bf16 kernels (cnx::cpu::dwconv_forward / dwconv_backward<bf16>) and the autograd op
// on bf16 x, against the f64 reference (the same kernels in double) on the same values: the
// bf16 inputs are random values that bf16 represents exactly, the fp32 parameters random floats,
// so the reference needs no rounding model for its inputs. Also: the op's dtypes, which
// gradients it produces, and its errors for parameters of the wrong dtype.
//
// GPU (skipped without a device, and in a build without CUDA): the CUDA bf16 kernels against the
// CPU bf16 kernels on identical inputs, at ConvNeXt-T's four stages (batch 2) and a sweep of
// awkward shapes (every k, partial channel groups, C not a multiple of 8: the 2-byte load path),
// every subset of requested gradients, pointers that are not 16-byte aligned, a batch large
// enough that grad-weight blocks loop over several images, bitwise determinism, and the whole
// autograd op on the GPU against the CPU's.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <sstream>
#include <string>
#include <vector>

#include "autograd/ops.h"
#include "kernels/dwconv.h"
#include "tensor/device.h"
#include "tensor/tensor.h"
#include "tests/testing.h"

#include "tests/cuda_testing.h"

namespace {

using namespace cnx;
using namespace cnx::test;

// ---- tolerances ------------------------------------------------------------------------------
// u32 = 2^-24 is fp32's unit roundoff, u16 = 2^-8 bf16's (8 significant bits: rounding to
// nearest changes a value v by at most 2^-8 |v|; one ulp of v is at most 2^-7 |v|).
//
// Against the f64 reference (CPU tests). A bf16 output (out, din) is y32 rounded once, y32
// being the fp32 sum of `terms` products (k*k taps, plus the bias in the forward). y32 is within
// terms * u32 * mag of the exact value, where mag = sum |term| (the reference run on absolute
// values), and the rounding adds at most u16 |y32|. So
//     |got - want| <= u16 |want| + 2 * terms * u32 * mag
// (the factor 2 covers u16 * the fp32 error and leaves room). The parameter gradients are
// fp32 sums of N*H*W products of two bf16 values, and a product of two 8-bit significands is
// exact in fp32, so only the additions round:
//     |got - want| <= 2 * terms * u32 * mag          (terms = N*H*W)
// which is rigorous (the worst case of a sequential sum is (terms - 1) u32 mag), and far tighter
// than a bf16 rounding (u16 |want|): a gradient rounded to bf16 would fail it.
const double kU32 = std::ldexp(1.0, -24);
const double kU16 = std::ldexp(1.0, -8);

double fp32_sum_tol(int64_t terms) { return 2.0 * static_cast<double>(terms) * kU32; }

// EXPECTs |got[i] - want[i]| <= bound[i] (and no NaN) for all i; on failure prints the first
// mismatches and the worst error relative to its bound.
void expect_within(const std::string& what, const std::vector<double>& got,
                   const std::vector<double>& want, const std::vector<double>& bound) {
  ASSERT_EQ(got.size(), want.size()) << what << ": sizes differ";
  ASSERT_EQ(bound.size(), want.size()) << what << ": bound size";
  int64_t bad = 0;
  std::ostringstream report;
  double worst = 0;
  for (size_t i = 0; i < got.size(); ++i) {
    const double err = std::abs(got[i] - want[i]);
    const double ratio = err / std::max(bound[i], 1e-300);
    if (!(err <= bound[i])) {
      if (bad < 8)
        report << "\n  [" << i << "] got " << got[i] << " want " << want[i] << " (|err| " << err
               << ", bound " << bound[i] << ")";
      ++bad;
    }
    if (!(ratio <= worst)) worst = ratio;
  }
  EXPECT_EQ(bad, 0) << what << ": " << bad << " of " << got.size() << " values out of bounds"
                    << report.str() << "\n  worst |error| / bound " << worst;
}

// The bound for a bf16 result of `terms` fp32 products against the exact value (see above).
std::vector<double> bf16_bound(const std::vector<double>& want, const std::vector<double>& mag,
                               int64_t terms) {
  std::vector<double> b(want.size());
  for (size_t i = 0; i < b.size(); ++i)
    b[i] = kU16 * std::abs(want[i]) + fp32_sum_tol(terms) * mag[i];
  return b;
}

// The bound for an fp32 sum of `terms` exact products against the exact value.
std::vector<double> fp32_bound(const std::vector<double>& mag, int64_t terms) {
  std::vector<double> b(mag.size());
  for (size_t i = 0; i < b.size(); ++i) b[i] = fp32_sum_tol(terms) * mag[i];
  return b;
}

// ---- problems and data -----------------------------------------------------------------------
struct Problem {
  int64_t N, H, W, C, k;
  bool bias;
  std::string str() const {
    std::ostringstream os;
    os << "N" << N << " H" << H << " W" << W << " C" << C << " k" << k
       << (bias ? " bias" : " no-bias");
    return os.str();
  }
  Shape act() const { return Shape{N, H, W, C}; }
  Shape filter() const { return Shape{k, k, C}; }
  int64_t numel() const { return N * H * W * C; }
  int64_t pixels() const { return N * H * W; }
};

// ConvNeXt-T's stages at batch 2 (the first at batch 1 on the CPU, to keep the f64 reference
// quick), and awkward ones: every k, a single pixel, images smaller than the kernel, odd sizes,
// C = 1, 3, 13 and 40 (not a multiple of 8; one full channel group of 32 and a partial one).
const Problem kCpuProblems[] = {
    {1, 56, 56, 96, 7, true}, {2, 28, 28, 192, 7, true}, {2, 14, 14, 384, 7, false},
    {2, 7, 7, 768, 7, true},  {1, 1, 1, 1, 3, true},     {3, 5, 9, 3, 3, false},
    {2, 9, 7, 13, 5, true},   {1, 2, 3, 5, 9, true},     {1, 10, 9, 1, 11, false},
    {2, 4, 30, 40, 7, true}};

// Inputs as doubles: x and dout exactly representable in bf16, weight and bias in f32.
struct Inputs {
  std::vector<double> x, weight, bias, dout;
};

Inputs make_inputs(const Problem& p, uint64_t seed) {
  Generator gen(seed);
  Inputs in;
  in.x = values(Tensor::randn(p.act(), gen, DType::bf16));
  in.weight = values(Tensor::randn(p.filter(), gen, DType::f32));
  in.bias = values(Tensor::randn(Shape{p.C}, gen, DType::f32));
  in.dout = values(Tensor::randn(p.act(), gen, DType::bf16));
  return in;
}

template <class T> std::vector<T> as(const std::vector<double>& v) {
  std::vector<T> out(v.size());
  for (size_t i = 0; i < v.size(); ++i) out[i] = T(static_cast<float>(v[i]));
  return out;
}
template <class T> std::vector<double> doubles(const std::vector<T>& v) {
  std::vector<double> out(v.size());
  for (size_t i = 0; i < v.size(); ++i) out[i] = static_cast<double>(static_cast<float>(v[i]));
  return out;
}
std::vector<double> abs_of(std::vector<double> v) {
  for (double& x : v) x = std::abs(x);
  return v;
}

// Forward and every gradient in double (the reference), for these inputs.
struct Results {
  std::vector<double> out, din, dweight, dbias;
};

Results reference(const Problem& p, const Inputs& in) {
  Results r{std::vector<double>(p.numel()), std::vector<double>(p.numel()),
            std::vector<double>(p.k * p.k * p.C), std::vector<double>(p.C)};
  cpu::dwconv_forward<double>(r.out.data(), in.x.data(), in.weight.data(),
                              p.bias ? in.bias.data() : nullptr, p.N, p.H, p.W, p.C, p.k);
  cpu::dwconv_backward<double>(r.din.data(), r.dweight.data(), r.dbias.data(), in.dout.data(),
                               in.x.data(), in.weight.data(), p.N, p.H, p.W, p.C, p.k);
  return r;
}

// The reference on |inputs|: the scale of each result's rounding error.
Results magnitudes(const Problem& p, const Inputs& in) {
  return reference(p, Inputs{abs_of(in.x), abs_of(in.weight), abs_of(in.bias), abs_of(in.dout)});
}

// The CPU bf16 kernels on these inputs: out and din bf16, dweight and dbias fp32.
struct Bf16Results {
  std::vector<bf16> out, din;
  std::vector<float> dweight, dbias;
};

Bf16Results run_cpu_bf16(const Problem& p, const Inputs& in) {
  const std::vector<bf16> x = as<bf16>(in.x), dout = as<bf16>(in.dout);
  const std::vector<float> w = as<float>(in.weight), b = as<float>(in.bias);
  Bf16Results r{std::vector<bf16>(p.numel()), std::vector<bf16>(p.numel()),
                std::vector<float>(p.k * p.k * p.C), std::vector<float>(p.C)};
  cpu::dwconv_forward<bf16>(r.out.data(), x.data(), w.data(), p.bias ? b.data() : nullptr, p.N,
                            p.H, p.W, p.C, p.k);
  cpu::dwconv_backward<bf16>(r.din.data(), r.dweight.data(), r.dbias.data(), dout.data(),
                             x.data(), w.data(), p.N, p.H, p.W, p.C, p.k);
  return r;
}

// ================================ CPU kernels ================================
TEST(Bf16Dwconv, CpuKernelsMatchF64Reference) {
  uint64_t seed = 10;
  for (const Problem& p : kCpuProblems) {
    SCOPED_TRACE(p.str());
    const Inputs in = make_inputs(p, seed++);
    const Results want = reference(p, in), mag = magnitudes(p, in);
    const Bf16Results got = run_cpu_bf16(p, in);
    const int64_t taps = p.k * p.k;
    expect_within("forward", doubles(got.out), want.out,
                  bf16_bound(want.out, mag.out, taps + 1));
    expect_within("din", doubles(got.din), want.din, bf16_bound(want.din, mag.din, taps));
    expect_within("dweight", doubles(got.dweight), want.dweight,
                  fp32_bound(mag.dweight, p.pixels()));
    expect_within("dbias", doubles(got.dbias), want.dbias, fp32_bound(mag.dbias, p.pixels()));

    // The parameter gradients are the f32 kernel's on the (exactly) widened activations,
    // unrounded: bitwise the same floats.
    const std::vector<float> x = as<float>(in.x), dout = as<float>(in.dout),
                             w = as<float>(in.weight);
    std::vector<float> dw(got.dweight.size()), db(got.dbias.size());
    cpu::dwconv_backward<float>(nullptr, dw.data(), db.data(), dout.data(), x.data(), w.data(),
                                p.N, p.H, p.W, p.C, p.k);
    EXPECT_EQ(0, std::memcmp(dw.data(), got.dweight.data(), dw.size() * sizeof(float)))
        << "dweight differs from the f32 kernel's on the same values";
    EXPECT_EQ(0, std::memcmp(db.data(), got.dbias.data(), db.size() * sizeof(float)))
        << "dbias differs from the f32 kernel's on the same values";
  }
}

// Null gradients stay null: each subset of {din, dweight, dbias}, with the inputs no requested
// gradient needs passed as null (din needs weight, dweight needs x), matches the full run.
TEST(Bf16Dwconv, CpuBackwardWritesOnlyRequestedGradients) {
  const Problem p{2, 6, 9, 12, 5, true};
  const Inputs in = make_inputs(p, 30);
  const Bf16Results all = run_cpu_bf16(p, in);
  const std::vector<bf16> x = as<bf16>(in.x), dout = as<bf16>(in.dout);
  const std::vector<float> w = as<float>(in.weight);
  const bf16 sentinel(1024.0f);
  for (int mask = 0; mask < 8; ++mask) {
    const bool want_din = mask & 1, want_dw = mask & 2, want_db = mask & 4;
    SCOPED_TRACE("mask " + std::to_string(mask));
    std::vector<bf16> din(p.numel(), sentinel);
    std::vector<float> dw(p.k * p.k * p.C, 1024.0f), db(p.C, 1024.0f);
    cpu::dwconv_backward<bf16>(want_din ? din.data() : nullptr, want_dw ? dw.data() : nullptr,
                               want_db ? db.data() : nullptr, dout.data(),
                               want_dw ? x.data() : nullptr, want_din ? w.data() : nullptr, p.N,
                               p.H, p.W, p.C, p.k);
    for (size_t i = 0; i < din.size(); ++i)
      ASSERT_EQ(din[i].bits, want_din ? all.din[i].bits : sentinel.bits) << "din " << i;
    for (size_t i = 0; i < dw.size(); ++i)
      ASSERT_EQ(dw[i], want_dw ? all.dweight[i] : 1024.0f) << "dweight " << i;
    for (size_t i = 0; i < db.size(); ++i)
      ASSERT_EQ(db[i], want_db ? all.dbias[i] : 1024.0f) << "dbias " << i;
  }
}

// ================================ autograd op (CPU) ================================
// L = sum(cast(dwconv(x, weight, bias), f32) * R): dL/dout = R, which is bf16-representable, so
// the op's backward sees exactly R as its bf16 dout.
struct OpRun {
  Tensor out, dx, dweight, dbias;
};

OpRun run_op(const Problem& p, const Inputs& in, Device device, bool x_grad = true,
             bool w_grad = true, bool b_grad = true) {
  Tensor x = make(p.act(), in.x, DType::bf16).to(device);
  Tensor w = make(p.filter(), in.weight, DType::f32).to(device);
  Tensor b = p.bias ? make(Shape{p.C}, in.bias, DType::f32).to(device) : Tensor();
  const Tensor R = make(p.act(), in.dout, DType::f32).to(device);
  x.set_requires_grad(x_grad);
  w.set_requires_grad(w_grad);
  if (b.defined()) b.set_requires_grad(b_grad);
  const Tensor out = dwconv(x, w, b);
  if (x_grad || w_grad || (b.defined() && b_grad)) sum(mul(cast(out, DType::f32), R)).backward();
  return OpRun{out, x.grad(), w.grad(), b.defined() ? b.grad() : Tensor()};
}

TEST(Bf16Dwconv, AutogradOpMatchesF64Reference) {
  const Problem problems[] = {{2, 14, 14, 96, 7, true}, {1, 5, 9, 3, 3, true},
                              {2, 7, 6, 40, 5, false}};
  uint64_t seed = 40;
  for (const Problem& p : problems) {
    SCOPED_TRACE(p.str());
    const Inputs in = make_inputs(p, seed++);
    const Results want = reference(p, in), mag = magnitudes(p, in);
    const OpRun r = run_op(p, in, Device::cpu());
    ASSERT_EQ(r.out.dtype(), DType::bf16);
    ASSERT_EQ(r.out.shape(), p.act());
    ASSERT_TRUE(r.dx.defined() && r.dweight.defined());
    EXPECT_EQ(r.dx.dtype(), DType::bf16) << "dx has x's dtype";
    EXPECT_EQ(r.dweight.dtype(), DType::f32) << "dweight has weight's dtype";
    EXPECT_EQ(r.dweight.shape(), p.filter());
    const int64_t taps = p.k * p.k;
    expect_within("forward", values(r.out), want.out, bf16_bound(want.out, mag.out, taps + 1));
    expect_within("dx", values(r.dx), want.din, bf16_bound(want.din, mag.din, taps));
    expect_within("dweight", values(r.dweight), want.dweight,
                  fp32_bound(mag.dweight, p.pixels()));
    if (p.bias) {
      ASSERT_TRUE(r.dbias.defined());
      EXPECT_EQ(r.dbias.dtype(), DType::f32);
      expect_within("dbias", values(r.dbias), want.dbias, fp32_bound(mag.dbias, p.pixels()));
    }
  }
}

// Only the inputs that require grad get one (the op saves x only for dweight and weight only
// for dx), and what they get is what the full run gives.
TEST(Bf16Dwconv, AutogradOpOnlyRequestedGradients) {
  const Problem p{1, 6, 5, 16, 3, true};
  const Inputs in = make_inputs(p, 50);
  const OpRun all = run_op(p, in, Device::cpu());
  for (int mask = 1; mask < 8; ++mask) {
    const bool gx = mask & 1, gw = mask & 2, gb = mask & 4;
    SCOPED_TRACE("mask " + std::to_string(mask));
    const OpRun r = run_op(p, in, Device::cpu(), gx, gw, gb);
    EXPECT_EQ(r.dx.defined(), gx);
    EXPECT_EQ(r.dweight.defined(), gw);
    EXPECT_EQ(r.dbias.defined(), gb);
    if (gx) expect_close("dx", values(r.dx), values(all.dx), 0, 0);
    if (gw) expect_close("dweight", values(r.dweight), values(all.dweight), 0, 0);
    if (gb) expect_close("dbias", values(r.dbias), values(all.dbias), 0, 0);
  }
}

// bf16 x needs fp32 weight and bias (param_dtype), and f32 x needs f32 parameters: the message
// names the op, the parameter and x.
TEST(Bf16Dwconv, ParameterDtypeErrors) {
  const Tensor xb = Tensor::zeros({2, 5, 5, 3}, DType::bf16);
  const Tensor w = Tensor::zeros({7, 7, 3}), b = Tensor::zeros({3});
  EXPECT_EQ(dwconv(xb, w, b).dtype(), DType::bf16);  // sanity: the good arguments work
  EXPECT_EQ(dwconv(xb, w, Tensor()).dtype(), DType::bf16);
  expect_error([&] { dwconv(xb, Tensor::zeros({7, 7, 3}, DType::bf16), b); },
               {"dwconv", "weight bf16[7, 7, 3]", "must be f32", "x bf16[2, 5, 5, 3]"});
  expect_error([&] { dwconv(xb, w, Tensor::zeros({3}, DType::bf16)); },
               {"dwconv", "bias bf16[3]", "must be f32", "x bf16[2, 5, 5, 3]"});
  expect_error([&] { dwconv(xb, Tensor::zeros({7, 7, 3}, DType::f64), b); },
               {"dwconv", "weight f64[7, 7, 3]", "must be f32"});
  expect_error([&] { dwconv(Tensor::zeros({2, 5, 5, 3}), Tensor::zeros({7, 7, 3}, DType::bf16), b); },
               {"dwconv", "weight bf16[7, 7, 3]", "must be f32", "x f32[2, 5, 5, 3]"});
  // f16 is storage only, not an activation type.
  expect_error([&] { dwconv(Tensor::zeros({2, 5, 5, 3}, DType::f16), w, b); },
               {"dwconv", "f16[2, 5, 5, 3]", "f32, f64 or bf16"});
  // The shape checks still apply.
  expect_error([&] { dwconv(xb, Tensor::zeros({7, 7, 4}), b); }, {"dwconv", "[7, 7, 4]"});
}

// ================================ GPU ================================
#if CNX_TEST_CUDA

const Device kDev = Device::cuda(0);
const double kNaN = std::numeric_limits<double>::quiet_NaN();
constexpr float kSentinel = 1024.0f;  // exact in bf16

// Against the CPU bf16 kernels (same inputs): both sum the same fp32 products in different
// orders (the GPU with FMAs, and for the parameter gradients per thread, per block, then across
// blocks), so the fp32 sums differ by rounding only: within tol_for_terms(terms) * mag, the
// rule of tests/test_cuda_dwconv.cpp (2 u32 terms for short sums; 2 * 16 sqrt(terms) u32 for
// the long parameter-gradient sums, whose rounding errors are independent). A bf16 output is
// that sum rounded once, and two fp32 values that close round to the same bf16 or to
// neighbours, so bf16 outputs may differ by one bf16 ulp (<= 2^-7 |value|) on top:
//     bf16 outputs   |gpu - cpu| <= 2^-7 |cpu| + 2 tol_for_terms(terms) mag
//     fp32 outputs   |gpu - cpu| <= tol_for_terms(terms) mag

std::vector<double> gpu_bf16_bound(const std::vector<double>& cpu, const std::vector<double>& mag,
                                   int64_t terms) {
  std::vector<double> b(cpu.size());
  for (size_t i = 0; i < b.size(); ++i)
    b[i] = std::ldexp(std::abs(cpu[i]), -7) + 2.0 * tol_for_terms(terms) * mag[i];
  return b;
}
std::vector<double> gpu_fp32_bound(const std::vector<double>& mag, int64_t terms) {
  std::vector<double> b(mag.size());
  for (size_t i = 0; i < b.size(); ++i) b[i] = tol_for_terms(terms) * mag[i];
  return b;
}

// The tests launch on stream nullptr (the legacy default stream), while the library copies on
// a stream of its own: every launch sits between two device-wide synchronisations.
void device_sync() { CNX_CUDA_CHECK(cudaDeviceSynchronize()); }

// A device copy of v (as T) preceded by `offset` zero elements: the data starts `offset`
// elements past the (256-byte aligned) allocation.
template <class T> Tensor device_copy(const std::vector<double>& v, int64_t offset = 0) {
  std::vector<T> host(v.size() + static_cast<size_t>(offset), T(0.0f));
  const std::vector<T> src = as<T>(v);
  std::copy(src.begin(), src.end(), host.begin() + offset);
  return Tensor::from_data<T>(Shape{static_cast<int64_t>(host.size())}, host, kDev);
}

// n elements of T from `offset` on, as doubles.
template <class T> std::vector<double> host_values(const Tensor& t, int64_t offset = 0) {
  const std::vector<T> v = t.to(Device::cpu()).to_vector<T>();
  return doubles(std::vector<T>(v.begin() + offset, v.end()));
}

struct Wanted {
  bool din = true, dweight = true, dbias = true;
  std::string str() const {
    std::ostringstream os;
    os << (din ? "din" : "-") << "," << (dweight ? "dweight" : "-") << ","
       << (dbias ? "dbias" : "-");
    return os.str();
  }
};

// The CUDA bf16 kernels on `in`: out/din bf16 and dweight/dbias f32 as doubles. Outputs start
// as `fill`; gradients not wanted are null, and so are the inputs no wanted gradient needs.
// Activations (in, dout, out, din) start `offset` bf16 elements into their allocations.
struct GpuResults {
  std::vector<double> out, din, dweight, dbias;
};

GpuResults run_gpu_bf16(const Problem& p, const Inputs& in, Wanted w = {}, double fill = kNaN,
                        int64_t offset = 0) {
  const Tensor x = device_copy<bf16>(in.x, offset), dout = device_copy<bf16>(in.dout, offset);
  const Tensor weight = device_copy<float>(in.weight), bias = device_copy<float>(in.bias);
  const Shape act_alloc{p.numel() + offset};
  Tensor out = Tensor::full(act_alloc, fill, DType::bf16, kDev);
  Tensor din = Tensor::full(act_alloc, fill, DType::bf16, kDev);
  Tensor dweight = Tensor::full(p.filter(), fill, DType::f32, kDev);
  Tensor dbias = Tensor::full(Shape{p.C}, fill, DType::f32, kDev);
  const int64_t ws_floats = cuda::dwconv_backward_workspace_floats(p.N, p.H, p.W, p.C, p.k);
  Tensor ws = Tensor::empty(Shape{std::max<int64_t>(ws_floats, 1)}, DType::f32, kDev);
  device_sync();
  cuda::dwconv_forward<bf16>(out.data<bf16>() + offset, x.data<bf16>() + offset,
                             weight.data<float>(), p.bias ? bias.data<float>() : nullptr, p.N,
                             p.H, p.W, p.C, p.k, nullptr);
  cuda::dwconv_backward<bf16>(w.din ? din.data<bf16>() + offset : nullptr,
                              w.dweight ? dweight.data<float>() : nullptr,
                              w.dbias ? dbias.data<float>() : nullptr, dout.data<bf16>() + offset,
                              w.dweight ? x.data<bf16>() + offset : nullptr,
                              w.din ? weight.data<float>() : nullptr, p.N, p.H, p.W, p.C, p.k,
                              ws.data<float>(), nullptr);
  device_sync();
  return GpuResults{host_values<bf16>(out, offset), host_values<bf16>(din, offset),
                    host_values<float>(dweight), host_values<float>(dbias)};
}

void expect_untouched(const std::string& what, const std::vector<double>& v) {
  int64_t changed = 0;
  for (double x : v) changed += x != kSentinel;
  EXPECT_EQ(changed, 0) << what << ": a skipped output was written (" << changed << " of "
                        << v.size() << " values changed)";
}

void check_gpu(const Problem& p, uint64_t seed, Wanted w = {}, int64_t offset = 0) {
  const std::string what = p.str() + " " + w.str() + " offset " + std::to_string(offset);
  SCOPED_TRACE(what);
  const Inputs in = make_inputs(p, seed);
  const bool all = w.din && w.dweight && w.dbias;
  const GpuResults g = run_gpu_bf16(p, in, w, all ? kNaN : kSentinel, offset);
  const Bf16Results c = run_cpu_bf16(p, in);
  const Results mag = magnitudes(p, in);
  const int64_t taps = p.k * p.k;
  const std::vector<double> c_out = doubles(c.out), c_din = doubles(c.din);
  expect_within("forward", g.out, c_out, gpu_bf16_bound(c_out, mag.out, taps + 1));
  if (w.din)
    expect_within("din", g.din, c_din, gpu_bf16_bound(c_din, mag.din, taps));
  else
    expect_untouched("din", g.din);
  if (w.dweight)
    expect_within("dweight", g.dweight, doubles(c.dweight),
                  gpu_fp32_bound(mag.dweight, p.pixels()));
  else
    expect_untouched("dweight", g.dweight);
  if (w.dbias)
    expect_within("dbias", g.dbias, doubles(c.dbias), gpu_fp32_bound(mag.dbias, p.pixels()));
  else
    expect_untouched("dbias", g.dbias);
}

// Every k x H x W of tests/test_cuda_dwconv.cpp's sweep, with C rotating through 1, 3, 12, 40,
// 96, 100 (12, 100: not a multiple of 8, so the 2-byte loads; 40: a partial group on the pack
// path) and N and the bias rotated.
std::vector<Problem> awkward_problems() {
  const int64_t ks[] = {3, 5, 7, 9, 11};
  const int64_t sizes[] = {1, 5, 7, 9, 56};
  const int64_t channels[] = {1, 3, 12, 40, 96, 100};
  std::vector<Problem> v;
  for (int ik = 0; ik < 5; ++ik)
    for (int ih = 0; ih < 5; ++ih)
      for (int iw = 0; iw < 5; ++iw)
        v.push_back({(ih + iw) % 2 ? 3 : 1, sizes[ih], sizes[iw], channels[(ih + 2 * iw + ik) % 6],
                     ks[ik], (ih + iw + ik) % 2 == 0});
  return v;
}

const Problem kStageProblems[] = {
    {2, 56, 56, 96, 7, true}, {2, 28, 28, 192, 7, true}, {2, 14, 14, 384, 7, true},
    {2, 7, 7, 768, 7, true}};

#endif  // CNX_TEST_CUDA

TEST(CudaBf16Dwconv, MatchesCpuBf16ConvNeXtStages) {
#if CNX_TEST_CUDA
  CNX_SKIP_WITHOUT_DEVICE();
  uint64_t seed = 100;
  for (const Problem& p : kStageProblems) check_gpu(p, seed++);
#else
  CNX_SKIP_BUILT_WITHOUT_CUDA();
#endif
}

TEST(CudaBf16Dwconv, MatchesCpuBf16AwkwardShapes) {
#if CNX_TEST_CUDA
  CNX_SKIP_WITHOUT_DEVICE();
  uint64_t seed = 200;
  for (const Problem& p : awkward_problems()) check_gpu(p, seed++);
#else
  CNX_SKIP_BUILT_WITHOUT_CUDA();
#endif
}

// Each of the 8 subsets of {din, dweight, dbias}: the requested ones match, the others keep
// their sentinel, and inputs that no requested gradient needs are null.
TEST(CudaBf16Dwconv, BackwardWritesOnlyRequestedGradients) {
#if CNX_TEST_CUDA
  CNX_SKIP_WITHOUT_DEVICE();
  const Problem problems[] = {{2, 9, 14, 40, 7, true}, {1, 5, 56, 3, 3, true}};
  uint64_t seed = 300;
  for (const Problem& p : problems)
    for (int mask = 0; mask < 8; ++mask)
      check_gpu(p, seed++, Wanted{(mask & 1) != 0, (mask & 2) != 0, (mask & 4) != 0});
#else
  CNX_SKIP_BUILT_WITHOUT_CUDA();
#endif
}

// C % 8 == 0 would take the 16-byte (8 bf16) loads, but the activations start 1, 4 or 7 bf16
// elements (2, 8, 14 bytes) past an aligned address: the kernels must use 2-byte loads. At
// offset 8 (16 bytes) the pack path is legal again and is taken.
TEST(CudaBf16Dwconv, MisalignedPointersFallBackToScalarLoads) {
#if CNX_TEST_CUDA
  CNX_SKIP_WITHOUT_DEVICE();
  const Problem problems[] = {{2, 9, 14, 96, 7, true}, {1, 7, 7, 40, 3, false}};
  uint64_t seed = 400;
  for (const Problem& p : problems)
    for (int64_t offset : {1, 4, 7, 8}) check_gpu(p, seed++, Wanted{}, offset);
#else
  CNX_SKIP_BUILT_WITHOUT_CUDA();
#endif
}

// Each grad-weight block sums several images: ~2048 blocks are aimed for, so 2100 single-tile
// images of one channel group give 2 images per block and a last block with 1 (pack and 2-byte
// load paths).
TEST(CudaBf16Dwconv, MatchesCpuWhenBlocksSpanSeveralImages) {
#if CNX_TEST_CUDA
  CNX_SKIP_WITHOUT_DEVICE();
  check_gpu({2100, 7, 7, 32, 7, true}, 500);
  check_gpu({2100, 5, 9, 3, 3, true}, 501);
#else
  CNX_SKIP_BUILT_WITHOUT_CUDA();
#endif
}

// The fp32 parameter gradients are reduced in a fixed order: repeated runs are bitwise equal.
TEST(CudaBf16Dwconv, BackwardIsBitwiseDeterministic) {
#if CNX_TEST_CUDA
  CNX_SKIP_WITHOUT_DEVICE();
  const Problem problems[] = {{2, 56, 56, 96, 7, true}, {1100, 7, 7, 100, 7, true}};
  uint64_t seed = 600;
  for (const Problem& p : problems) {
    SCOPED_TRACE(p.str());
    const Inputs in = make_inputs(p, seed++);
    const GpuResults first = run_gpu_bf16(p, in);
    const GpuResults bias_first = run_gpu_bf16(p, in, Wanted{false, false, true}, kSentinel);
    for (int run = 1; run < 3; ++run) {
      const GpuResults again = run_gpu_bf16(p, in);
      EXPECT_TRUE(again.dweight == first.dweight) << "dweight differs in run " << run;
      EXPECT_TRUE(again.dbias == first.dbias) << "dbias differs in run " << run;
      EXPECT_TRUE(again.din == first.din) << "din differs in run " << run;
      const GpuResults bias_again = run_gpu_bf16(p, in, Wanted{false, false, true}, kSentinel);
      EXPECT_TRUE(bias_again.dbias == bias_first.dbias) << "dbias (alone) differs in run " << run;
    }
  }
#else
  CNX_SKIP_BUILT_WITHOUT_CUDA();
#endif
}

// The autograd op on CUDA bf16 tensors (dispatch, workspace, dtypes of the gradients) against
// the same op on the CPU.
TEST(CudaBf16Dwconv, AutogradOpMatchesCpu) {
#if CNX_TEST_CUDA
  CNX_SKIP_WITHOUT_DEVICE();
  const Problem problems[] = {{2, 56, 56, 96, 7, true}, {2, 7, 7, 768, 7, false},
                              {1, 9, 5, 12, 3, true}};
  uint64_t seed = 700;
  for (const Problem& p : problems) {
    SCOPED_TRACE(p.str());
    const Inputs in = make_inputs(p, seed++);
    const OpRun g = run_op(p, in, kDev), c = run_op(p, in, Device::cpu());
    const Results mag = magnitudes(p, in);
    ASSERT_EQ(g.out.dtype(), DType::bf16);
    ASSERT_EQ(g.dx.dtype(), DType::bf16);
    ASSERT_EQ(g.dweight.dtype(), DType::f32);
    const int64_t taps = p.k * p.k;
    const std::vector<double> c_out = values(c.out), c_dx = values(c.dx);
    expect_within("forward", values(g.out), c_out, gpu_bf16_bound(c_out, mag.out, taps + 1));
    expect_within("dx", values(g.dx), c_dx, gpu_bf16_bound(c_dx, mag.din, taps));
    expect_within("dweight", values(g.dweight), values(c.dweight),
                  gpu_fp32_bound(mag.dweight, p.pixels()));
    if (p.bias) {
      ASSERT_EQ(g.dbias.dtype(), DType::f32);
      expect_within("dbias", values(g.dbias), values(c.dbias),
                    gpu_fp32_bound(mag.dbias, p.pixels()));
    }
  }
#else
  CNX_SKIP_BUILT_WITHOUT_CUDA();
#endif
}

}  // namespace
