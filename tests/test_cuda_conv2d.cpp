// The CUDA conv2d (kernels/cuda/conv2d.cu) against the CPU reference loops
// (cnx::cpu::conv2d_forward / conv2d_backward, kernels/cpu/conv2d.cpp).
//
// Inputs are standard normal, copied to the device with Tensor::to; the launchers run on the
// library's stream (cnx::cuda::current_stream(): linear's GEMMs require it) with a workspace of
// the size conv2d_*_workspace_floats asks for, and results come back with .to(Device::cpu())
// after a device synchronisation. Device outputs are pre-filled with NaN, so an output the
// kernels forget to write fails the comparison; a gradient that is not requested is pre-filled
// with a sentinel and must keep it.
// Shapes: the tiny configurations of tests/test_conv2d.cpp (groups 1, 2, C; stride 1, 2, 4;
// padding 0, 1, 3; kernels 1x1, 3x3, 7x7, 4x4/4, non-square; odd sizes; batch 1 and 3) and
// ResNet-50-like layers at batch 2 on small images (the 7x7/2 stem, 1x1, 3x3 stride 1 and 2,
// the 1x1 stride-2 projection, ResNeXt's 32 groups, depthwise 3x3 stride 2, the patchify stem),
// which take the three paths: pointwise (a plain GEMM), im2col + GEMM, and the direct grouped
// kernels. Also: every subset of requested gradients, bf16 against the CPU's bf16 reference, the
// autograd op on device tensors, bitwise run-to-run determinism (with enough output pixels that
// the grouped parameter gradients take both passes of the column sums), empty sizes, and more
// pixels than one grid's y dimension covers (the kernels' row loops).
//
// Which path: cuda_forward / cuda_backward below route as autograd's conv2d does: through cuDNN
// (kernels/cuda/conv2d_cudnn.cu) when the build has it, its switch is on and it takes the shape
// (its workspace query is not -1), else the launchers of kernels/cuda/conv2d.cu; so these tests
// check whichever path is active (CNX_CONV_CUDNN=0 picks ours). CudnnAndOwnKernelsMatchCpu runs
// the main sweep on both; the long-grid tests are about our kernels' row loops and force ours.
// The emulator build never has cuDNN.
//
// Every test skips, saying why, when the library was built without CUDA or no device is
// visible; this file compiles either way.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <limits>
#include <sstream>
#include <string>
#include <vector>

#include "autograd/ops.h"
#include "kernels/conv2d.h"
#include "tensor/device.h"
#include "tensor/tensor.h"
#include "tests/testing.h"

#include "tests/cuda_testing.h"

#if CNX_TEST_CUDA
#include "tensor/cuda_context.h"

namespace {

using namespace cnx;
using namespace cnx::test;

// ---- tolerances ------------------------------------------------------------------------------
// tol_for_terms (tests/cuda_testing.h), as in tests/test_cuda_dwconv.cpp: each result is a sum
// of `terms` products, added in another order on each side, with mag the reference run on
// |inputs|.

// ---- problems --------------------------------------------------------------------------------
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

const Cfg kTiny[] = {
    {1, 5, 4, 2, 3, 3, 3, 1, 1, 1},        {3, 5, 7, 4, 2, 3, 3, 2, 1, 2},
    {1, 7, 6, 3, 3, 3, 3, 2, 1, 3},        {1, 5, 5, 2, 4, 3, 3, 1, 1, 2},
    {1, 9, 7, 2, 2, 7, 7, 2, 3, 1},        {2, 9, 10, 3, 4, 4, 4, 4, 0, 1},
    {1, 4, 5, 3, 5, 1, 1, 1, 0, 1},        {2, 5, 5, 4, 6, 1, 1, 2, 0, 1, false},
    {1, 6, 5, 4, 4, 3, 2, 1, 0, 2},        {3, 3, 4, 2, 3, 3, 3, 1, 3, 1, false},
};

// ResNet-50-like layers at batch 2, small images.
const Cfg kResNet[] = {
    {2, 32, 32, 3, 16, 7, 7, 2, 3, 1},     // stem 7x7/2 pad 3
    {2, 8, 8, 64, 64, 1, 1, 1, 0, 1},      // 1x1 (pointwise: no im2col)
    {2, 8, 8, 64, 64, 3, 3, 1, 1, 1},      // 3x3
    {2, 9, 9, 32, 64, 3, 3, 2, 1, 1},      // 3x3 stride 2, odd image
    {2, 9, 9, 64, 128, 1, 1, 2, 0, 1},     // 1x1 stride-2 projection
    {2, 8, 8, 64, 64, 3, 3, 1, 1, 32},     // ResNeXt 32 groups
    {2, 9, 9, 32, 32, 3, 3, 2, 1, 32},     // depthwise 3x3 stride 2
    {2, 16, 16, 3, 32, 4, 4, 4, 0, 1},     // patchify 4x4/4
};

std::vector<Cfg> all_problems() {
  std::vector<Cfg> v(std::begin(kTiny), std::end(kTiny));
  v.insert(v.end(), std::begin(kResNet), std::end(kResNet));
  return v;
}

// Host data: f32, standard normal.
struct HostData {
  Tensor x, w, b, dout;
};
HostData make_data(const Cfg& c, uint64_t seed) {
  Generator gen(seed);
  return {Tensor::randn(c.x_shape(), gen), Tensor::randn(c.w_shape(), gen),
          Tensor::randn(Shape{c.Co}, gen), Tensor::randn(c.out_shape(), gen)};
}

Tensor abs_of(const Tensor& t) {
  std::vector<float> v = t.to(Device::cpu()).to(DType::f32).to_vector<float>();
  for (float& x : v) x = std::abs(x);
  return Tensor::from_data<float>(t.shape(), v);
}

const Device kDev = Device::cuda(0);
constexpr float kSentinel = 1232.0f;  // exact in bf16 too (77 x 16)
const double kNaN = std::numeric_limits<double>::quiet_NaN();

Tensor device_full(const Shape& s, double value, DType dt = DType::f32) {
  return Tensor::full(s, value, dt, kDev);
}
template <class T> T* ptr(Tensor& t) { return t.defined() ? t.data<T>() : nullptr; }
template <class T> const T* ptr(const Tensor& t) { return t.defined() ? t.data<T>() : nullptr; }

void device_sync() { CNX_CUDA_CHECK(cudaDeviceSynchronize()); }

Tensor workspace(int64_t floats) { return Tensor::empty(Shape{std::max<int64_t>(floats, 1)}, DType::f32, kDev); }

// ---- the cuDNN switch -------------------------------------------------------------------------
// Sets cuda::conv2d_uses_cudnn's switch for a scope, and restores it.
class CudnnSwitch {
 public:
  explicit CudnnSwitch(bool on) : was_(cuda::conv2d_uses_cudnn()) {
    cuda::set_conv2d_cudnn_enabled(on);
  }
  ~CudnnSwitch() { cuda::set_conv2d_cudnn_enabled(was_); }
  CudnnSwitch(const CudnnSwitch&) = delete;
  CudnnSwitch& operator=(const CudnnSwitch&) = delete;

 private:
  bool was_;
};

// Whether cuda_forward / cuda_backward take the cuDNN path for this problem now.
bool cudnn_takes(const Cfg& c, DType dt) {
  return cuda::conv2d_cudnn_forward_workspace_floats(dt, c.shape()) >= 0;
}

// ---- running the CUDA launchers --------------------------------------------------------------
Tensor cuda_forward(const Cfg& c, const HostData& h, DType dt) {
  const Conv2dShape s = c.shape();
  const Tensor x = h.x.to(dt).to(kDev), w = h.w.to(dt).to(kDev), b = h.b.to(kDev);
  Tensor out = device_full(c.out_shape(), kNaN, dt);
  const float* bp = c.bias ? ptr<float>(b) : nullptr;
  const int64_t cudnn_ws = cuda::conv2d_cudnn_forward_workspace_floats(dt, s);
  if (cudnn_ws >= 0) {
    Tensor ws = workspace(cudnn_ws);
    device_sync();
    if (dt == DType::f32)
      cuda::conv2d_cudnn_forward(ptr<float>(out), ptr<float>(x), ptr<float>(w), bp, s,
                                 ptr<float>(ws), cuda::current_stream());
    else
      cuda::conv2d_cudnn_forward(ptr<bf16>(out), ptr<bf16>(x), ptr<bf16>(w), bp, s,
                                 ptr<float>(ws), cuda::current_stream());
    device_sync();
    return out.to(Device::cpu());
  }
  Tensor ws = workspace(cuda::conv2d_forward_workspace_floats(dt, s));
  device_sync();
  if (dt == DType::f32)
    cuda::conv2d_forward(ptr<float>(out), ptr<float>(x), ptr<float>(w), bp, s, ptr<float>(ws),
                         cuda::current_stream());
  else
    cuda::conv2d_forward(ptr<bf16>(out), ptr<bf16>(x), ptr<bf16>(w), bp, s, ptr<float>(ws),
                         cuda::current_stream());
  device_sync();
  return out.to(Device::cpu());
}

struct Wanted {
  bool din = true, dweight = true, dbias = true;
  std::string str() const {
    return std::string(din ? "din" : "-") + "," + (dweight ? "dweight" : "-") + "," +
           (dbias ? "dbias" : "-");
  }
};
struct Grads {
  Tensor din, dweight, dbias;  // on the host
};

// Gradients not requested get null pointers and so do the inputs no requested one reads (din
// reads weight, dweight reads x); their outputs start at `fill` (the sentinel) to check that.
Grads cuda_backward(const Cfg& c, const HostData& h, DType dt, Wanted want) {
  const Conv2dShape s = c.shape();
  const Tensor x = h.x.to(dt).to(kDev), w = h.w.to(dt).to(kDev), dy = h.dout.to(dt).to(kDev);
  const bool all = want.din && want.dweight && want.dbias;
  const double fill = all ? kNaN : kSentinel;
  Tensor din = device_full(c.x_shape(), fill, dt), dw = device_full(c.w_shape(), fill),
         db = device_full(Shape{c.Co}, fill);
  float* dwp = want.dweight ? ptr<float>(dw) : nullptr;
  float* dbp = want.dbias ? ptr<float>(db) : nullptr;
  const int64_t cudnn_ws =
      cuda::conv2d_cudnn_backward_workspace_floats(dt, s, want.din, want.dweight, want.dbias);
  if (cudnn_ws >= 0) {
    Tensor ws = workspace(cudnn_ws);
    device_sync();
    if (dt == DType::f32)
      cuda::conv2d_cudnn_backward(want.din ? ptr<float>(din) : nullptr, dwp, dbp, ptr<float>(dy),
                                  want.dweight ? ptr<float>(x) : nullptr,
                                  want.din ? ptr<float>(w) : nullptr, s, ptr<float>(ws),
                                  cuda::current_stream());
    else
      cuda::conv2d_cudnn_backward(want.din ? ptr<bf16>(din) : nullptr, dwp, dbp, ptr<bf16>(dy),
                                  want.dweight ? ptr<bf16>(x) : nullptr,
                                  want.din ? ptr<bf16>(w) : nullptr, s, ptr<float>(ws),
                                  cuda::current_stream());
    device_sync();
    return {din.to(Device::cpu()), dw.to(Device::cpu()), db.to(Device::cpu())};
  }
  Tensor ws = workspace(cuda::conv2d_backward_workspace_floats(dt, s, want.din, want.dweight, want.dbias));
  device_sync();
  if (dt == DType::f32)
    cuda::conv2d_backward(want.din ? ptr<float>(din) : nullptr, dwp, dbp, ptr<float>(dy),
                          want.dweight ? ptr<float>(x) : nullptr,
                          want.din ? ptr<float>(w) : nullptr, s, ptr<float>(ws),
                          cuda::current_stream());
  else
    cuda::conv2d_backward(want.din ? ptr<bf16>(din) : nullptr, dwp, dbp, ptr<bf16>(dy),
                          want.dweight ? ptr<bf16>(x) : nullptr, want.din ? ptr<bf16>(w) : nullptr,
                          s, ptr<float>(ws), cuda::current_stream());
  device_sync();
  return {din.to(Device::cpu()), dw.to(Device::cpu()), db.to(Device::cpu())};
}

// ---- the CPU reference (f32 loops; for bf16 the CPU's bf16 loops) ----------------------------
struct Ref {
  Tensor out, din, dweight, dbias;
};
Ref cpu_reference(const Cfg& c, const Tensor& x, const Tensor& w, const Tensor& b,
                  const Tensor& dout, DType dt) {
  const Conv2dShape s = c.shape();
  Ref r{Tensor::empty(c.out_shape(), dt), Tensor::empty(c.x_shape(), dt), Tensor::empty(c.w_shape()),
        Tensor::empty(Shape{c.Co})};
  const float* bp = c.bias ? ptr<float>(b) : nullptr;
  if (dt == DType::f32) {
    cpu::conv2d_forward<float>(ptr<float>(r.out), ptr<float>(x), ptr<float>(w), bp, s);
    cpu::conv2d_backward<float>(ptr<float>(r.din), ptr<float>(r.dweight), ptr<float>(r.dbias),
                                ptr<float>(dout), ptr<float>(x), ptr<float>(w), s);
  } else {
    const Tensor xb = x.to(dt), wb = w.to(dt), dyb = dout.to(dt);
    cpu::conv2d_forward<bf16>(ptr<bf16>(r.out), ptr<bf16>(xb), ptr<bf16>(wb), bp, s);
    cpu::conv2d_backward<bf16>(ptr<bf16>(r.din), ptr<float>(r.dweight), ptr<float>(r.dbias),
                               ptr<bf16>(dyb), ptr<bf16>(xb), ptr<bf16>(wb), s);
  }
  return r;
}

void expect_untouched(const std::string& what, const Tensor& t) {
  const std::vector<float> v = t.to(DType::f32).to_vector<float>();
  int64_t changed = 0;
  for (float x : v) changed += x != kSentinel;
  EXPECT_EQ(changed, 0) << what << ": a skipped output was written (" << changed << " of "
                        << v.size() << " values changed)";
}

// bf16: out and din are rounded once on each side from fp32 sums that differ by f32 rounding,
// so they may differ by one bf16 rounding (2^-8 relative to the result, which mag bounds);
// din of a groups-1 conv is rounded twice on the GPU (the column gradient, a bf16 GEMM output,
// then the col2im sum), hence 2 * 2^-8. dweight and dbias are fp32 from the same bf16 operands:
// f32 rounding only.
// On the cuDNN path (bf16 only; f32 keeps the f32 bounds, FFT and Winograd being excluded there)
// two roundings are the path's own, not a loosened check: out is rounded twice (cuDNN's bf16
// result, then with the bias added), hence 2 * 2^-8; dweight is cuDNN's bf16 filter gradient
// widened to fp32, hence one bf16 rounding, 2^-8.
void check(const Cfg& c, uint64_t seed, DType dt, Wanted want = {}) {
  const std::string what = c.str() + (dt == DType::bf16 ? " bf16" : " f32") + " " + want.str();
  SCOPED_TRACE(what);
  const Conv2dShape s = c.shape();
  const HostData h = make_data(c, seed);
  // For bf16 the reference and its magnitudes use the bf16-rounded inputs, as the GPU sees them.
  auto as_seen = [&](const Tensor& t) { return dt == DType::bf16 ? t.to(DType::bf16).to(DType::f32) : t; };
  const Tensor x = as_seen(h.x), w = as_seen(h.w), dy = as_seen(h.dout);
  const Ref ref = cpu_reference(c, x, w, h.b, dy, dt);
  const Ref mag = cpu_reference(c, abs_of(x), abs_of(w), abs_of(h.b), abs_of(dy), DType::f32);
  const double bf = dt == DType::bf16 ? std::ldexp(1.0, -8) : 0.0;
  const bool via_cudnn = cudnn_takes(c, dt);
  const int64_t terms_fwd = s.window() + 1, terms_din = s.kh * s.kw * s.Cog(), terms_dw = s.rows();
  const bool all = want.din && want.dweight && want.dbias;
  if (all) {
    const Tensor out = cuda_forward(c, h, dt);
    expect_close_mag(what + ": out", values(out), values(ref.out), values(mag.out),
                     tol_for_terms(terms_fwd) + (via_cudnn ? 2 : 1) * bf);
  }
  const Grads g = cuda_backward(c, h, dt, want);
  if (want.din)
    expect_close_mag(what + ": din", values(g.din), values(ref.din), values(mag.din),
                     tol_for_terms(terms_din) + (c.groups == 1 ? 2 : 1) * bf);
  else
    expect_untouched(what + ": din", g.din);
  if (want.dweight)
    expect_close_mag(what + ": dweight", values(g.dweight), values(ref.dweight),
                     values(mag.dweight), tol_for_terms(terms_dw) + (via_cudnn ? bf : 0.0));
  else
    expect_untouched(what + ": dweight", g.dweight);
  if (want.dbias)
    expect_close_mag(what + ": dbias", values(g.dbias), values(ref.dbias), values(mag.dbias),
                     tol_for_terms(terms_dw));
  else
    expect_untouched(what + ": dbias", g.dbias);
}

bool bitwise_equal(const Tensor& a, const Tensor& b) {
  const std::vector<float> x = a.to(DType::f32).to_vector<float>(), y = b.to(DType::f32).to_vector<float>();
  return x.size() == y.size() && std::memcmp(x.data(), y.data(), x.size() * sizeof(float)) == 0;
}

}  // namespace
#endif  // CNX_TEST_CUDA

// ================================ f32 ================================
TEST(CudaConv2d, MatchesCpuTinyShapes) {
#if CNX_TEST_CUDA
  CNX_SKIP_WITHOUT_DEVICE();
  uint64_t seed = 100;
  for (const Cfg& c : kTiny) check(c, seed++, DType::f32);
#else
  CNX_SKIP_BUILT_WITHOUT_CUDA();
#endif
}

TEST(CudaConv2d, MatchesCpuResNetShapes) {
#if CNX_TEST_CUDA
  CNX_SKIP_WITHOUT_DEVICE();
  uint64_t seed = 200;
  for (const Cfg& c : kResNet) check(c, seed++, DType::f32);
#else
  CNX_SKIP_BUILT_WITHOUT_CUDA();
#endif
}

// Each of the 8 subsets of {din, dweight, dbias}, on each of the three paths (im2col + GEMM,
// pointwise GEMM, direct grouped kernels).
TEST(CudaConv2d, BackwardWritesOnlyRequestedGradients) {
#if CNX_TEST_CUDA
  CNX_SKIP_WITHOUT_DEVICE();
  const Cfg cfgs[] = {{2, 7, 6, 4, 5, 3, 3, 2, 1, 1}, {2, 4, 5, 6, 3, 1, 1, 1, 0, 1},
                      {2, 7, 6, 4, 6, 3, 3, 2, 1, 2}};
  uint64_t seed = 300;
  for (const Cfg& c : cfgs)
    for (int mask = 0; mask < 8; ++mask)
      check(c, seed++, DType::f32, Wanted{(mask & 1) != 0, (mask & 2) != 0, (mask & 4) != 0});
#else
  CNX_SKIP_BUILT_WITHOUT_CUDA();
#endif
}

// ================================ bf16 ================================
TEST(CudaConv2d, Bf16MatchesCpuBf16) {
#if CNX_TEST_CUDA
  CNX_SKIP_WITHOUT_DEVICE();
  const Cfg cfgs[] = {kTiny[0], kTiny[1], kTiny[2], kTiny[4], kTiny[6], kTiny[9],
                      kResNet[0], kResNet[3], kResNet[5], kResNet[6]};
  uint64_t seed = 400;
  for (const Cfg& c : cfgs) check(c, seed++, DType::bf16);
  // Some gradients only, in bf16 too (the grouped kernels with din alone and dweight alone).
  check(kTiny[1], seed++, DType::bf16, Wanted{true, false, false});
  check(kTiny[1], seed++, DType::bf16, Wanted{false, true, false});
  check(kTiny[0], seed++, DType::bf16, Wanted{false, true, true});
#else
  CNX_SKIP_BUILT_WITHOUT_CUDA();
#endif
}

// ================================ the autograd op ================================
// conv2d on device tensors (f32 and bf16) against the same op on the CPU: the dispatch and the
// workspaces of autograd/ops/conv2d.cpp. The CPU's f32 may take the BLAS path, so f32 within
// rounding; bf16 within one bf16 rounding (two for din of groups 1, see check above).
TEST(CudaConv2d, AutogradOpMatchesCpu) {
#if CNX_TEST_CUDA
  CNX_SKIP_WITHOUT_DEVICE();
  const Cfg cfgs[] = {kTiny[1], kTiny[4], kTiny[6], kResNet[6]};
  uint64_t seed = 500;
  for (const Cfg& c : cfgs)
    for (DType dt : {DType::f32, DType::bf16}) {
      const std::string what = c.str() + (dt == DType::bf16 ? " bf16" : " f32");
      SCOPED_TRACE(what);
      const HostData h = make_data(c, seed++);
      auto run = [&](Device dev) {
        Tensor x = h.x.to(dt).to(dev).set_requires_grad(true);
        Tensor w = h.w.to(dev).set_requires_grad(true), b = h.b.to(dev).set_requires_grad(true);
        Tensor y = conv2d(x, w, b, c.stride, c.pad, c.groups);
        const Tensor yf = y.dtype() == DType::f32 ? y : cast(y, DType::f32);
        sum(mul(yf, h.dout.to(dev))).backward();
        return std::vector<std::vector<double>>{values(y), values(x.grad()), values(w.grad()),
                                                values(b.grad())};
      };
      const auto gpu = run(kDev), cpu_r = run(Device::cpu());
      const double tol = dt == DType::bf16 ? 2e-2 : 1e-4;  // bf16: 2^-8 relative, summed
      const char* names[] = {"out", "dx", "dw", "db"};
      for (int i = 0; i < 4; ++i) {
        double scale = 0;
        for (double v : cpu_r[static_cast<size_t>(i)]) scale = std::max(scale, std::abs(v));
        expect_close(what + " " + names[i], gpu[static_cast<size_t>(i)], cpu_r[static_cast<size_t>(i)],
                     tol * scale, tol);
      }
    }
#else
  CNX_SKIP_BUILT_WITHOUT_CUDA();
#endif
}

// ================================ determinism ================================
// Three runs give bitwise the same results, on the GEMM path and on the direct grouped path;
// the grouped problem has 2592 output pixels, so 81 partial rows: both passes of the column sums.
TEST(CudaConv2d, BackwardIsBitwiseDeterministic) {
#if CNX_TEST_CUDA
  CNX_SKIP_WITHOUT_DEVICE();
  const Cfg cfgs[] = {{2, 9, 9, 32, 64, 3, 3, 2, 1, 1}, {8, 18, 18, 16, 16, 3, 3, 1, 1, 16}};
  uint64_t seed = 600;
  for (const Cfg& c : cfgs) {
    SCOPED_TRACE(c.str());
    const HostData h = make_data(c, seed++);
    const Tensor out = cuda_forward(c, h, DType::f32);
    const Grads first = cuda_backward(c, h, DType::f32, Wanted{});
    for (int run = 1; run < 3; ++run) {
      EXPECT_TRUE(bitwise_equal(out, cuda_forward(c, h, DType::f32))) << "out, run " << run;
      const Grads again = cuda_backward(c, h, DType::f32, Wanted{});
      EXPECT_TRUE(bitwise_equal(first.din, again.din)) << "din, run " << run;
      EXPECT_TRUE(bitwise_equal(first.dweight, again.dweight)) << "dweight, run " << run;
      EXPECT_TRUE(bitwise_equal(first.dbias, again.dbias)) << "dbias, run " << run;
    }
    // and still the reference's values (the two-pass column sums included)
    check(c, seed - 1, DType::f32);
  }
#else
  CNX_SKIP_BUILT_WITHOUT_CUDA();
#endif
}

// ================================ empty sizes ================================
// No images: nothing to compute; dweight and dbias are empty sums, written as zeros, on every
// path. No output channels: nothing at all.
TEST(CudaConv2d, EmptySizes) {
#if CNX_TEST_CUDA
  CNX_SKIP_WITHOUT_DEVICE();
  const Cfg cfgs[] = {{0, 5, 5, 4, 6, 3, 3, 2, 1, 1}, {0, 5, 5, 4, 6, 1, 1, 1, 0, 1},
                      {0, 5, 5, 4, 6, 3, 3, 1, 1, 2}};
  for (const Cfg& c : cfgs) {
    SCOPED_TRACE(c.str());
    const Conv2dShape s = c.shape();
    EXPECT_EQ(cuda::conv2d_forward_workspace_floats(DType::f32, s), 0);
    Generator gen(1);
    Tensor w = Tensor::randn(c.w_shape(), gen).to(kDev);
    Tensor dw = device_full(c.w_shape(), kSentinel), db = device_full(Shape{c.Co}, kSentinel);
    Tensor ws = workspace(cuda::conv2d_backward_workspace_floats(DType::f32, s, true, true, true));
    device_sync();
    cuda::conv2d_forward(static_cast<float*>(nullptr), nullptr, ptr<float>(w), nullptr, s, nullptr,
                         cuda::current_stream());
    cuda::conv2d_backward(static_cast<float*>(nullptr), ptr<float>(dw), ptr<float>(db), nullptr,
                          nullptr, ptr<float>(w), s, ptr<float>(ws), cuda::current_stream());
    device_sync();
    for (float v : dw.to(Device::cpu()).to_vector<float>()) ASSERT_EQ(v, 0.f) << "dweight of an empty sum";
    for (float v : db.to(Device::cpu()).to_vector<float>()) ASSERT_EQ(v, 0.f) << "dbias of an empty sum";
  }
  const Conv2dShape none{2, 5, 5, 4, 0, 3, 3, 1, 1, 1};
  EXPECT_EQ(cuda::conv2d_backward_workspace_floats(DType::f32, none, true, true, true) >= 0, true);
  // Co = 0: out, dout, dweight, dbias are empty; din is a sum of nothing, so zeros.
  Tensor din = device_full(Shape{2, 5, 5, 4}, kSentinel);
  Tensor ws = workspace(cuda::conv2d_backward_workspace_floats(DType::f32, none, true, false, false));
  device_sync();
  cuda::conv2d_forward(static_cast<float*>(nullptr), nullptr, nullptr, nullptr, none, nullptr,
                       cuda::current_stream());
  cuda::conv2d_backward(ptr<float>(din), nullptr, nullptr, nullptr, nullptr, nullptr, none,
                        ptr<float>(ws), cuda::current_stream());
  device_sync();
  for (float v : din.to(Device::cpu()).to_vector<float>()) ASSERT_EQ(v, 0.f) << "din with Co = 0";
#else
  CNX_SKIP_BUILT_WITHOUT_CUDA();
#endif
}

// ================================ long grids ================================
// More output (and input) pixels than one grid's y can hold (65535 blocks x 8 rows = 524280):
// the 2-D kernels loop over rows. One row of pixels keeps it cheap on the emulator: the direct
// grouped kernels (1x1, groups 2) and the im2col + GEMM path (1x1 stride 2, so not pointwise).
TEST(CudaConv2d, GroupedMatchesCpuWhenRowsExceedOneGrid) {
#if CNX_TEST_CUDA
  CNX_SKIP_WITHOUT_DEVICE();
  const CudnnSwitch ours(false);  // our kernels' row loops are the point
  check({1, 1, 530000, 2, 2, 1, 1, 1, 0, 2}, 700, DType::f32);
#else
  CNX_SKIP_BUILT_WITHOUT_CUDA();
#endif
}

TEST(CudaConv2d, Im2colMatchesCpuWhenRowsExceedOneGrid) {
#if CNX_TEST_CUDA
  CNX_SKIP_WITHOUT_DEVICE();
  const CudnnSwitch ours(false);  // our kernels' row loops are the point
  check({1, 1, 1060001, 1, 1, 1, 1, 2, 0, 1}, 701, DType::f32);
#else
  CNX_SKIP_BUILT_WITHOUT_CUDA();
#endif
}

// ================================ cuDNN and our kernels ================================
// When the build has cuDNN: the main sweep (every tiny and ResNet shape in f32, the bf16 shapes
// of Bf16MatchesCpuBf16, some gradient subsets) with the cuDNN path on, then with it off (our
// kernels), each against the CPU reference; with it on, cuDNN must take the dense and grouped
// shapes (it offers no deterministic algorithm for a shape only in odd cases: then that shape
// falls back, which is allowed, but not for every shape). Without cuDNN in the build, skips.
TEST(CudaConv2d, CudnnAndOwnKernelsMatchCpu) {
#if CNX_TEST_CUDA
  if (!cuda::conv2d_cudnn_compiled())
    GTEST_SKIP() << "built without cuDNN (CNX_HAVE_CUDNN undefined: the emulator build, "
                    "CNX_WITH_CUDNN=OFF or cuDNN not found): only our kernels exist";
  CNX_SKIP_WITHOUT_DEVICE();
  for (bool on : {true, false}) {
    SCOPED_TRACE(on ? "cuDNN on" : "cuDNN off");
    const CudnnSwitch sw(on);
    ASSERT_EQ(cuda::conv2d_uses_cudnn(), on);
    int taken = 0, total = 0;
    uint64_t seed = 800;
    for (const Cfg& c : all_problems()) {
      taken += cudnn_takes(c, DType::f32) ? 1 : 0;
      ++total;
      check(c, seed++, DType::f32);
    }
    const Cfg bf_cfgs[] = {kTiny[0], kTiny[1], kTiny[2], kTiny[4], kTiny[6], kTiny[9],
                           kResNet[0], kResNet[3], kResNet[5], kResNet[6]};
    for (const Cfg& c : bf_cfgs) {
      taken += cudnn_takes(c, DType::bf16) ? 1 : 0;
      ++total;
      check(c, seed++, DType::bf16);
    }
    for (int mask = 0; mask < 8; ++mask) {
      check(kTiny[1], seed++, DType::f32, Wanted{(mask & 1) != 0, (mask & 2) != 0, (mask & 4) != 0});
      check(kTiny[0], seed++, DType::bf16, Wanted{(mask & 1) != 0, (mask & 2) != 0, (mask & 4) != 0});
    }
    std::printf("[ info ] cuDNN %s: cuDNN took %d of %d shapes\n", on ? "on" : "off", taken, total);
    if (on)
      EXPECT_GT(taken, total / 2) << "cuDNN took only " << taken << " of " << total << " shapes";
    else
      EXPECT_EQ(taken, 0) << "switched off, yet the cuDNN path answered";
  }
#else
  CNX_SKIP_BUILT_WITHOUT_CUDA();
#endif
}
