// The CUDA depthwise convolution (kernels/cuda/dwconv.cu) against the CPU reference
// (cnx::cpu::dwconv_forward / dwconv_backward<float>, kernels/cpu/dwconv.cpp).
//
// Inputs are standard normal (cnx::Generator), copied to the device with Tensor::to; launches go
// to stream nullptr (the legacy default stream) between two cudaDeviceSynchronize calls (see
// device_sync), and results come back with .to(Device::cpu()).
// Device outputs are pre-filled with NaN, so an output the kernel forgets to write fails the
// comparison. Shapes: ConvNeXt-T's four stages at batch 2, and a sweep of awkward ones (H, W in
// {1, 5, 7, 9, 56}, C in {1, 3, 40, 96, 100}, batch 1 and 3, every k in {3, 5, 7, 9, 11}, with
// and without bias) that covers both register-block widths of the kernels (W = 9 and 1 take the
// 4-wide one), partial channel groups (C = 3, 40, 100) and the 4-byte copy path (C = 1, 3).
// Also: every combination of requested gradients (a skipped output must stay untouched, and
// the inputs no requested gradient needs are passed as null), tensors offset by one float from
// an aligned address (the float4 path must fall back), run-to-run bitwise determinism of the
// backward pass, a batch large enough that the grad-weight blocks loop over several images,
// and empty sizes.
//
// Every test skips, saying why, when the library was built without CUDA or no device is
// visible; this file compiles either way.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <sstream>
#include <string>
#include <vector>

#include "kernels/dwconv.h"
#include "tensor/device.h"
#include "tensor/tensor.h"
#include "tests/testing.h"

#include "tests/cuda_testing.h"

#if CNX_TEST_CUDA
namespace {

using namespace cnx;
using namespace cnx::test;

// ---- tolerances ------------------------------------------------------------------------------
// tol_for_terms (tests/cuda_testing.h): f32 sums of `terms` products in another order, measured
// against mag, the reference run on |inputs|.

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
  int64_t numel() const { return N * H * W * C; }
};

const Problem kStageProblems[] = {
    {2, 56, 56, 96, 7, true}, {2, 28, 28, 192, 7, true}, {2, 14, 14, 384, 7, true},
    {2, 7, 7, 768, 7, true}};

// The awkward sweep: every k x H x W, with C, N and the bias rotated so each value meets many
// others (125 problems).
std::vector<Problem> awkward_problems() {
  const int64_t ks[] = {3, 5, 7, 9, 11};
  const int64_t sizes[] = {1, 5, 7, 9, 56};
  const int64_t channels[] = {1, 3, 40, 96, 100};
  std::vector<Problem> v;
  for (int ik = 0; ik < 5; ++ik)
    for (int ih = 0; ih < 5; ++ih)
      for (int iw = 0; iw < 5; ++iw)
        v.push_back({(ih + iw) % 2 ? 3 : 1, sizes[ih], sizes[iw], channels[(ih + 2 * iw + ik) % 5],
                     ks[ik], (ih + iw + ik) % 2 == 0});
  return v;
}

// Host (CPU) inputs of a problem, standard normal, from Generator(seed).
struct HostData {
  Tensor in, weight, bias, dout;
};

HostData make_data(const Problem& p, uint64_t seed) {
  Generator gen(seed);
  HostData d;
  d.in = Tensor::randn(p.act(), gen);
  d.weight = Tensor::randn(Shape{p.k, p.k, p.C}, gen);
  d.bias = Tensor::randn(Shape{p.C}, gen);
  d.dout = Tensor::randn(p.act(), gen);
  return d;
}

Tensor abs_of(const Tensor& t) {
  std::vector<float> v = t.to(Device::cpu()).to_vector<float>();
  for (float& x : v) x = std::abs(x);
  return Tensor::from_data<float>(t.shape(), v);
}

const Device kDev = Device::cuda(0);
constexpr float kSentinel = 1234.5f;
const double kNaN = std::numeric_limits<double>::quiet_NaN();

// A device tensor filled with `value` (NaN: catches outputs that are never written).
Tensor device_full(const Shape& s, double value) {
  return Tensor::full(s, value, DType::f32, kDev);
}

float* ptr(Tensor& t) { return t.data<float>(); }
const float* ptr(const Tensor& t) { return t.data<float>(); }

// The workspace dwconv_backward needs (at least one float, so the pointer is never null).
Tensor workspace_for(const Problem& p) {
  const int64_t n = cuda::dwconv_backward_workspace_floats(p.N, p.H, p.W, p.C, p.k);
  EXPECT_GE(n, 0) << p.str();
  return Tensor::empty(Shape{std::max<int64_t>(n, 1)}, DType::f32, kDev);
}

// The library enqueues its copies and fills on a stream of its own (possibly non-blocking, so
// not ordered with the legacy default stream), while these tests launch on stream nullptr, the
// legacy default stream. So every launch sits between two device-wide synchronisations: the
// inputs are on the device before it starts, and it has finished before results are copied back.
void device_sync() { CNX_CUDA_CHECK(cudaDeviceSynchronize()); }

// ---- forward ---------------------------------------------------------------------------------
void check_forward(const Problem& p, uint64_t seed) {
  SCOPED_TRACE(p.str());
  const HostData h = make_data(p, seed);
  const Tensor in = h.in.to(kDev), weight = h.weight.to(kDev), bias = h.bias.to(kDev);
  Tensor out = device_full(p.act(), kNaN);
  device_sync();
  cuda::dwconv_forward(ptr(out), ptr(in), ptr(weight), p.bias ? ptr(bias) : nullptr, p.N, p.H, p.W,
                       p.C, p.k, nullptr);
  device_sync();

  Tensor want = Tensor::empty(p.act()), mag = Tensor::empty(p.act());
  cpu::dwconv_forward<float>(ptr(want), ptr(h.in), ptr(h.weight), p.bias ? ptr(h.bias) : nullptr,
                             p.N, p.H, p.W, p.C, p.k);
  const Tensor ain = abs_of(h.in), aw = abs_of(h.weight), ab = abs_of(h.bias);
  cpu::dwconv_forward<float>(ptr(mag), ptr(ain), ptr(aw), p.bias ? ptr(ab) : nullptr, p.N, p.H,
                             p.W, p.C, p.k);
  expect_close_mag(p.str() + " forward", values(out), values(want), values(mag),
                   tol_for_terms(p.k * p.k + 1));
}

// ---- backward --------------------------------------------------------------------------------
struct Wanted {
  bool din = true, dweight = true, dbias = true;
  std::string str() const {
    std::ostringstream os;
    os << (din ? "din" : "-") << "," << (dweight ? "dweight" : "-") << ","
       << (dbias ? "dbias" : "-");
    return os.str();
  }
};

// Runs the CUDA backward for the requested gradients. Outputs not requested are passed as
// null, and so are the inputs that no requested gradient needs (din needs weight, dweight
// needs in, dbias only dout). Device outputs start filled with `fill`.
struct DeviceGrads {
  Tensor din, dweight, dbias;
};

DeviceGrads run_backward(const Problem& p, const HostData& h, Wanted w, double fill) {
  const Tensor dout = h.dout.to(kDev), in = h.in.to(kDev), weight = h.weight.to(kDev);
  DeviceGrads g{device_full(p.act(), fill), device_full(Shape{p.k, p.k, p.C}, fill),
                device_full(Shape{p.C}, fill)};
  Tensor ws = workspace_for(p);
  device_sync();
  cuda::dwconv_backward(w.din ? ptr(g.din) : nullptr, w.dweight ? ptr(g.dweight) : nullptr,
                        w.dbias ? ptr(g.dbias) : nullptr, ptr(dout),
                        w.dweight ? ptr(in) : nullptr, w.din ? ptr(weight) : nullptr, p.N, p.H,
                        p.W, p.C, p.k, ptr(ws), nullptr);
  device_sync();
  return g;
}

// The CPU reference gradients and their magnitudes (the reference on |dout|, |in|, |weight|).
struct HostGrads {
  Tensor din, dweight, dbias;
};

HostGrads reference_backward(const Problem& p, const Tensor& dout, const Tensor& in,
                             const Tensor& weight) {
  HostGrads r{Tensor::empty(p.act()), Tensor::empty(Shape{p.k, p.k, p.C}),
              Tensor::empty(Shape{p.C})};
  cpu::dwconv_backward<float>(ptr(r.din), ptr(r.dweight), ptr(r.dbias), ptr(dout), ptr(in),
                              ptr(weight), p.N, p.H, p.W, p.C, p.k);
  return r;
}

void expect_untouched(const std::string& what, const Tensor& t) {
  const std::vector<float> v = t.to(Device::cpu()).to_vector<float>();
  int64_t changed = 0;
  for (float x : v) changed += x != kSentinel;
  EXPECT_EQ(changed, 0) << what << ": a skipped output was written (" << changed << " of "
                        << v.size() << " values changed)";
}

void check_backward(const Problem& p, uint64_t seed, Wanted w = {}) {
  const std::string what = p.str() + " backward " + w.str();
  SCOPED_TRACE(what);
  const HostData h = make_data(p, seed);
  const bool all = w.din && w.dweight && w.dbias;
  const DeviceGrads g = run_backward(p, h, w, all ? kNaN : kSentinel);

  const HostGrads want = reference_backward(p, h.dout, h.in, h.weight);
  const HostGrads mag = reference_backward(p, abs_of(h.dout), abs_of(h.in), abs_of(h.weight));
  const int64_t pixels = p.N * p.H * p.W;
  if (w.din)
    expect_close_mag(what + ": din", values(g.din), values(want.din), values(mag.din),
                     tol_for_terms(p.k * p.k));
  else
    expect_untouched(what + ": din", g.din);
  if (w.dweight)
    expect_close_mag(what + ": dweight", values(g.dweight), values(want.dweight),
                     values(mag.dweight), tol_for_terms(pixels));
  else
    expect_untouched(what + ": dweight", g.dweight);
  if (w.dbias)
    expect_close_mag(what + ": dbias", values(g.dbias), values(want.dbias), values(mag.dbias),
                     tol_for_terms(pixels));
  else
    expect_untouched(what + ": dbias", g.dbias);
}

// A device copy of t's values preceded by one float: t's data starts at (aligned base) + 4 bytes.
Tensor shifted_copy(const Tensor& t) {
  std::vector<float> v(static_cast<size_t>(t.numel()) + 1, 0.f);
  const std::vector<float> src = t.to(Device::cpu()).to_vector<float>();
  std::copy(src.begin(), src.end(), v.begin() + 1);
  return Tensor::from_data<float>(Shape{t.numel() + 1}, v, kDev);
}

// t's elements from index 1 on, as doubles (the shifted layout above).
std::vector<double> values_after_first(const Tensor& t) {
  std::vector<double> v = values(t);
  return std::vector<double>(v.begin() + 1, v.end());
}

std::vector<float> host_floats(const Tensor& t) { return t.to(Device::cpu()).to_vector<float>(); }

bool bitwise_equal(const std::vector<float>& a, const std::vector<float>& b) {
  return a.size() == b.size() && std::memcmp(a.data(), b.data(), a.size() * sizeof(float)) == 0;
}

}  // namespace
#endif  // CNX_TEST_CUDA

// ================================ forward ================================
TEST(CudaDwconv, ForwardMatchesCpuConvNeXtStages) {
#if CNX_TEST_CUDA
  CNX_SKIP_WITHOUT_DEVICE();
  uint64_t seed = 100;
  for (const Problem& p : kStageProblems) check_forward(p, seed++);
#else
  CNX_SKIP_BUILT_WITHOUT_CUDA();
#endif
}

TEST(CudaDwconv, ForwardMatchesCpuAwkwardShapes) {
#if CNX_TEST_CUDA
  CNX_SKIP_WITHOUT_DEVICE();
  uint64_t seed = 200;
  for (const Problem& p : awkward_problems()) check_forward(p, seed++);
#else
  CNX_SKIP_BUILT_WITHOUT_CUDA();
#endif
}

// ================================ backward ================================
TEST(CudaDwconv, BackwardMatchesCpuConvNeXtStages) {
#if CNX_TEST_CUDA
  CNX_SKIP_WITHOUT_DEVICE();
  uint64_t seed = 400;
  for (const Problem& p : kStageProblems) check_backward(p, seed++);
#else
  CNX_SKIP_BUILT_WITHOUT_CUDA();
#endif
}

TEST(CudaDwconv, BackwardMatchesCpuAwkwardShapes) {
#if CNX_TEST_CUDA
  CNX_SKIP_WITHOUT_DEVICE();
  uint64_t seed = 500;
  for (const Problem& p : awkward_problems()) check_backward(p, seed++);
#else
  CNX_SKIP_BUILT_WITHOUT_CUDA();
#endif
}

// A batch big enough that each grad-weight block sums several images (the kernels aim for
// ~2048 blocks, so 4100 single-tile images of one channel group give 3 images per block and a
// last block with 2), in the float4 and the 4-byte copy paths.
TEST(CudaDwconv, BackwardMatchesCpuWhenBlocksSpanSeveralImages) {
#if CNX_TEST_CUDA
  CNX_SKIP_WITHOUT_DEVICE();
  check_backward({4100, 7, 7, 32, 7, true}, 600);
  check_backward({4100, 5, 9, 3, 3, true}, 601);
#else
  CNX_SKIP_BUILT_WITHOUT_CUDA();
#endif
}

// Each of the 8 subsets of {din, dweight, dbias}: the requested ones match the reference, the
// others keep their sentinel, and inputs that no requested gradient needs are null.
TEST(CudaDwconv, BackwardWritesOnlyRequestedGradients) {
#if CNX_TEST_CUDA
  CNX_SKIP_WITHOUT_DEVICE();
  const Problem problems[] = {{2, 9, 14, 40, 7, true}, {1, 5, 56, 3, 3, true}};
  uint64_t seed = 700;
  for (const Problem& p : problems)
    for (int mask = 0; mask < 8; ++mask)
      check_backward(p, seed++, Wanted{(mask & 1) != 0, (mask & 2) != 0, (mask & 4) != 0});
#else
  CNX_SKIP_BUILT_WITHOUT_CUDA();
#endif
}

// ================================ alignment ================================
// C % 4 == 0 would take the float4 (16-byte cp.async) path, but every activation pointer here is
// 4 bytes past an aligned address: the kernels must notice and use 4-byte copies.
TEST(CudaDwconv, MisalignedPointersFallBackToScalarCopies) {
#if CNX_TEST_CUDA
  CNX_SKIP_WITHOUT_DEVICE();
  const Problem problems[] = {{2, 9, 14, 96, 7, true}, {1, 7, 7, 40, 3, false}};
  uint64_t seed = 800;
  for (const Problem& p : problems) {
    SCOPED_TRACE(p.str() + " misaligned");
    const HostData h = make_data(p, seed++);
    const Tensor in = shifted_copy(h.in), dout = shifted_copy(h.dout);
    const Tensor weight = h.weight.to(kDev), bias = h.bias.to(kDev);
    // The allocations are 16-byte aligned, so base + 1 float is not.
    ASSERT_EQ(reinterpret_cast<uintptr_t>(ptr(in)) % 16, 0u);
    ASSERT_EQ(reinterpret_cast<uintptr_t>(ptr(dout)) % 16, 0u);
    Tensor out = device_full(Shape{p.numel() + 1}, kNaN);
    Tensor din = device_full(Shape{p.numel() + 1}, kNaN);
    Tensor dweight = device_full(Shape{p.k, p.k, p.C}, kNaN), dbias = device_full(Shape{p.C}, kNaN);
    Tensor ws = workspace_for(p);
    device_sync();
    cuda::dwconv_forward(ptr(out) + 1, ptr(in) + 1, ptr(weight), p.bias ? ptr(bias) : nullptr, p.N,
                         p.H, p.W, p.C, p.k, nullptr);
    cuda::dwconv_backward(ptr(din) + 1, ptr(dweight), ptr(dbias), ptr(dout) + 1, ptr(in) + 1,
                          ptr(weight), p.N, p.H, p.W, p.C, p.k, ptr(ws), nullptr);
    device_sync();

    Tensor want = Tensor::empty(p.act()), mag = Tensor::empty(p.act());
    cpu::dwconv_forward<float>(ptr(want), ptr(h.in), ptr(h.weight), p.bias ? ptr(h.bias) : nullptr,
                               p.N, p.H, p.W, p.C, p.k);
    const Tensor ain = abs_of(h.in), aw = abs_of(h.weight), ab = abs_of(h.bias);
    cpu::dwconv_forward<float>(ptr(mag), ptr(ain), ptr(aw), p.bias ? ptr(ab) : nullptr, p.N, p.H,
                               p.W, p.C, p.k);
    expect_close_mag(p.str() + " misaligned forward", values_after_first(out), values(want),
                     values(mag), tol_for_terms(p.k * p.k + 1));

    const HostGrads gw = reference_backward(p, h.dout, h.in, h.weight);
    const HostGrads gm = reference_backward(p, abs_of(h.dout), ain, aw);
    const int64_t pixels = p.N * p.H * p.W;
    expect_close_mag(p.str() + " misaligned din", values_after_first(din), values(gw.din),
                     values(gm.din), tol_for_terms(p.k * p.k));
    expect_close_mag(p.str() + " misaligned dweight", values(dweight), values(gw.dweight),
                     values(gm.dweight), tol_for_terms(pixels));
    expect_close_mag(p.str() + " misaligned dbias", values(dbias), values(gw.dbias),
                     values(gm.dbias), tol_for_terms(pixels));
  }
#else
  CNX_SKIP_BUILT_WITHOUT_CUDA();
#endif
}

// ================================ determinism ================================
// The parameter gradients are reduced in a fixed order (no float atomics): three runs give
// bitwise the same dweight, dbias (and din), also for the dbias-only path.
TEST(CudaDwconv, BackwardIsBitwiseDeterministic) {
#if CNX_TEST_CUDA
  CNX_SKIP_WITHOUT_DEVICE();
  // The second: 3 images per grad-weight block, C = 100 in 4 groups (the last one partial).
  const Problem problems[] = {{2, 56, 56, 96, 7, true}, {1100, 7, 7, 100, 7, true}};
  uint64_t seed = 900;
  for (const Problem& p : problems) {
    SCOPED_TRACE(p.str());
    const HostData h = make_data(p, seed++);
    const DeviceGrads first = run_backward(p, h, Wanted{}, kNaN);
    const DeviceGrads bias_first = run_backward(p, h, Wanted{false, false, true}, kNaN);
    for (int run = 1; run < 3; ++run) {
      const DeviceGrads again = run_backward(p, h, Wanted{}, kNaN);
      EXPECT_TRUE(bitwise_equal(host_floats(first.dweight), host_floats(again.dweight)))
          << "dweight differs in run " << run;
      EXPECT_TRUE(bitwise_equal(host_floats(first.dbias), host_floats(again.dbias)))
          << "dbias differs in run " << run;
      EXPECT_TRUE(bitwise_equal(host_floats(first.din), host_floats(again.din)))
          << "din differs in run " << run;
      const DeviceGrads bias_again = run_backward(p, h, Wanted{false, false, true}, kNaN);
      EXPECT_TRUE(bitwise_equal(host_floats(bias_first.dbias), host_floats(bias_again.dbias)))
          << "dbias (alone) differs in run " << run;
    }
  }
#else
  CNX_SKIP_BUILT_WITHOUT_CUDA();
#endif
}

// ================================ empty sizes ================================
// No pixels: nothing to launch for the forward and din; dweight and dbias are empty sums, so
// they must be written as zeros. No channels: nothing at all.
TEST(CudaDwconv, EmptySizes) {
#if CNX_TEST_CUDA
  CNX_SKIP_WITHOUT_DEVICE();
  const Problem problems[] = {{0, 5, 5, 8, 3, true}, {2, 0, 5, 8, 5, true}, {2, 5, 0, 8, 7, true}};
  for (const Problem& p : problems) {
    SCOPED_TRACE(p.str());
    EXPECT_EQ(cuda::dwconv_backward_workspace_floats(p.N, p.H, p.W, p.C, p.k), 0);
    Generator gen(1);
    Tensor weight = Tensor::randn(Shape{p.k, p.k, p.C}, gen).to(kDev);
    Tensor dweight = device_full(Shape{p.k, p.k, p.C}, kSentinel);
    Tensor dbias = device_full(Shape{p.C}, kSentinel);
    device_sync();
    cuda::dwconv_forward(nullptr, nullptr, ptr(weight), nullptr, p.N, p.H, p.W, p.C, p.k, nullptr);
    cuda::dwconv_backward(nullptr, ptr(dweight), ptr(dbias), nullptr, nullptr, ptr(weight), p.N,
                          p.H, p.W, p.C, p.k, nullptr, nullptr);
    device_sync();
    for (float v : host_floats(dweight)) ASSERT_EQ(v, 0.f) << "dweight of an empty sum";
    for (float v : host_floats(dbias)) ASSERT_EQ(v, 0.f) << "dbias of an empty sum";
  }
  // C = 0: every tensor is empty; the launchers must return without touching anything.
  EXPECT_EQ(cuda::dwconv_backward_workspace_floats(2, 5, 5, 0, 7), 0);
  cuda::dwconv_forward(nullptr, nullptr, nullptr, nullptr, 2, 5, 5, 0, 7, nullptr);
  cuda::dwconv_backward(nullptr, nullptr, nullptr, nullptr, nullptr, nullptr, 2, 5, 5, 0, 7,
                        nullptr, nullptr);
  device_sync();
#else
  CNX_SKIP_BUILT_WITHOUT_CUDA();
#endif
}
