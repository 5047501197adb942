// bf16 mixed precision for the elementwise ops of a ConvNeXt block (GELU, layer scale, drop path,
// the residual add and gradient accumulation) and the f32 <-> bf16 cast.
//
// The contract (tensor/dtype.h, kernels/cpu/bf16_emulation.h): bf16 activations in, every
// operation in fp32, each bf16 result rounded once to nearest even; parameters (layer-scale
// gamma, drop-path scales) and their gradients in fp32.
//
// CPU tests compare the bf16 ops, through autograd, with the f64 ops on the very same values
// (bf16 inputs are exact in f64). What may differ is one rounding of each bf16 result, at most
// half an ulp: |got - want| <= 2^-8 |want| (bf16 has 8 significant bits), plus the fp32
// arithmetic in front of it (~1e-7 relative, absorbed by a 1% margin on 2^-8 and a tiny atol).
// The fp32 parameter gradients are sums in fp32 of products of bf16 values: 1e-5 of the largest
// gradient, as the f32-vs-f64 checks of the f32 ops use.
//
// GPU tests run the same ops on the CUDA device and compare with the CPU bf16 ops on identical
// inputs: bf16 results within one bf16 ulp (2^-7 relative: the device's erff/expf differ from the
// C library's by an ulp or two of fp32, which may move a result across a bf16 rounding boundary),
// fp32 parameter gradients within fp32 summation-order tolerance.
#include <gtest/gtest.h>

#include <cmath>
#include <functional>
#include <vector>

#include "autograd/ops.h"
#include "kernels/add.h"
#include "kernels/cast.h"
#include "kernels/gelu.h"
#include "tests/cuda_testing.h"
#include "tests/testing.h"

#if CNX_TEST_CUDA
#include "tensor/cuda_context.h"
#endif

namespace cnx {
namespace {

using test::expect_close;
using test::expect_error;
using test::values;

constexpr double kBf16Rtol = 1.01 / 256;  // half an ulp of an 8-bit significand, plus fp32 slack
constexpr double kBf16Ulp = 1.0 / 128;    // one ulp, relative (GPU vs CPU)

// n standard-normal values that are exactly representable in bf16.
std::vector<double> bf16_values(int64_t n, uint64_t seed, double std = 1.0) {
  Generator gen(seed);
  std::vector<double> v(static_cast<size_t>(n));
  for (auto& x : v) x = static_cast<float>(bf16(static_cast<float>(gen.normal() * std)));
  return v;
}

double max_abs(const std::vector<double>& v) {
  double m = 0;
  for (double x : v) m = std::max(m, std::abs(x));
  return m;
}

// One input of an op under test: an activation (bf16 in the mixed-precision run) or a
// parameter (fp32 there), with its values and whether it gets a gradient.
struct Input {
  Shape shape;
  std::vector<double> v;
  bool activation = true;
  bool grad = true;
};

using Op = std::function<Tensor(const std::vector<Tensor>&)>;

struct Run {
  std::vector<double> out;
  std::vector<std::vector<double>> grads;  // one per input (empty when it gets none)
  std::vector<DType> grad_dtypes;
  DType out_dtype = DType::f32;
};

// Runs op on the inputs as `act` activations (params param_dtype(act)) on `device`, with the
// loss sum(cast(out, f32) * R) for bf16-representable R, so that the gradient reaching the op is
// R exactly in every dtype.
Run run(const Op& op, const std::vector<Input>& inputs, DType act, Device device, uint64_t seed) {
  std::vector<Tensor> ts;
  for (const Input& in : inputs) {
    Tensor t = test::make(in.shape, in.v, in.activation ? act : param_dtype(act)).to(device);
    if (in.grad) t.set_requires_grad(true);
    ts.push_back(t);
  }
  const Tensor out = op(ts);
  const Tensor out32 = cast(out, act == DType::f64 ? DType::f64 : DType::f32);
  const Tensor R = test::make(out.shape(), bf16_values(out.numel(), seed), out32.dtype()).to(device);
  sum(mul(out32, R)).backward();
  Run r;
  r.out = values(out);
  r.out_dtype = out.dtype();
  for (const Tensor& t : ts) {
    r.grads.push_back(t.grad().defined() ? values(t.grad()) : std::vector<double>{});
    r.grad_dtypes.push_back(t.grad().defined() ? t.grad().dtype() : DType::u8);
  }
  return r;
}

// The bf16 run on the CPU against the f64 run on the same values (see the top of the file).
// `roundings`: the bf16 roundings a result goes through in `op` (1 for one op; a chain of two
// ops rounds twice, and their half-ulp errors add up when the terms do not cancel).
void expect_bf16_matches_f64(const std::string& what, const Op& op,
                             const std::vector<Input>& inputs, int roundings = 1,
                             uint64_t seed = 99) {
  const double rtol = roundings * kBf16Rtol;
  const Run ref = run(op, inputs, DType::f64, Device::cpu(), seed);
  const Run got = run(op, inputs, DType::bf16, Device::cpu(), seed);
  EXPECT_EQ(got.out_dtype, DType::bf16) << what;
  expect_close(what + " forward", got.out, ref.out, 1e-6 * max_abs(ref.out), rtol);
  for (size_t i = 0; i < inputs.size(); ++i) {
    const std::string name = what + " grad of input " + std::to_string(i);
    ASSERT_EQ(got.grads[i].size(), ref.grads[i].size()) << name;
    if (!inputs[i].grad) continue;
    if (inputs[i].activation) {
      EXPECT_EQ(got.grad_dtypes[i], DType::bf16) << name;
      expect_close(name, got.grads[i], ref.grads[i], 1e-6 * max_abs(ref.grads[i]), rtol);
    } else {  // an fp32 parameter gradient: not rounded to bf16
      EXPECT_EQ(got.grad_dtypes[i], DType::f32) << name;
      expect_close(name, got.grads[i], ref.grads[i], 1e-5 * max_abs(ref.grads[i]), 1e-5);
    }
  }
}

Input act(const Shape& s, uint64_t seed, double std = 1.0) {
  return {s, bf16_values(s.numel(), seed, std), true, true};
}
Input param(const Shape& s, uint64_t seed, double std = 1.0) {
  return {s, bf16_values(s.numel(), seed, std), false, true};
}

// ConvNeXt-like shapes (channels-last activations) and awkward ones (odd channel counts, sizes
// that are not a multiple of a vector width).
const std::vector<Shape> kShapes = {{2, 7, 7, 96}, {3, 5, 5, 40}, {2, 3, 3, 7}, {1, 1, 1, 1}, {13}};

TEST(Bf16Ops, GeluMatchesTheF64Reference) {
  for (const Shape& s : kShapes)
    expect_bf16_matches_f64("gelu " + s.str(), [](const std::vector<Tensor>& t) { return gelu(t[0]); },
                            {act(s, 1, 2.0)});
}

TEST(Bf16Ops, LayerScaleMatchesTheF64ReferenceWithAnFp32Gamma) {
  for (const Shape& s : kShapes) {
    const Shape g{s[-1]};
    expect_bf16_matches_f64(
        "layer_scale " + s.str(),
        [](const std::vector<Tensor>& t) { return layer_scale(t[0], t[1]); },
        {act(s, 2), param(g, 3, 0.5)});
    // Only one of the two gradients wanted.
    Input gamma_frozen = param(g, 3, 0.5);
    gamma_frozen.grad = false;
    expect_bf16_matches_f64(
        "layer_scale, gamma frozen " + s.str(),
        [](const std::vector<Tensor>& t) { return layer_scale(t[0], t[1]); },
        {act(s, 2), gamma_frozen});
    Input x_frozen = act(s, 2);
    x_frozen.grad = false;
    expect_bf16_matches_f64(
        "layer_scale, x frozen " + s.str(),
        [](const std::vector<Tensor>& t) { return layer_scale(t[0], t[1]); },
        {x_frozen, param(g, 3, 0.5)});
  }
}

TEST(Bf16Ops, DropPathMatchesTheF64ReferenceWithFp32Scales) {
  for (const Shape& s : kShapes) {
    const int64_t N = s[0];
    std::vector<double> scale(static_cast<size_t>(N));
    for (int64_t n = 0; n < N; ++n) scale[static_cast<size_t>(n)] = n % 2 ? 0.0 : 1.0 / 0.7;
    expect_bf16_matches_f64(
        "drop_path " + s.str(), [](const std::vector<Tensor>& t) { return drop_path(t[0], t[1]); },
        {act(s, 4), Input{Shape{N}, scale, false, false}});
  }
  // The scale drawn for bf16 activations is fp32 (the multiplier 1/keep_prob is not rounded).
  Generator gen(7);
  Tensor x = test::make({4, 3}, bf16_values(12, 5), DType::bf16);
  const Tensor y = drop_path(x, 0.3, /*training=*/true, gen);
  EXPECT_EQ(y.dtype(), DType::bf16);
}

TEST(Bf16Ops, AddAndAccumulateMatchTheF64Reference) {
  for (const Shape& s : kShapes) {
    expect_bf16_matches_f64("add " + s.str(),
                            [](const std::vector<Tensor>& t) { return add(t[0], t[1]); },
                            {act(s, 6), act(s, 7, 3.0)});
    // A tensor used twice: its gradient is accumulated (engine: add_) in bf16. gelu(x) + x
    // rounds twice (GELU's result, then the sum; no cancellation: both terms share x's sign).
    expect_bf16_matches_f64("x used twice " + s.str(),
                            [](const std::vector<Tensor>& t) { return add(gelu(t[0]), t[0]); },
                            {act(s, 8)}, /*roundings=*/2);
  }
  // add_ itself: one rounding of the fp32 sum.
  Tensor a = test::make({5}, {1.0, 256.0, -3.5, 0.0, 1e-3}, DType::bf16);
  const Tensor b = test::make({5}, {1.0 / 512, 1.0, 3.5, -2.0, 1e-3}, DType::bf16);
  add_(a, b);
  const std::vector<double> got = values(a);
  // 1 + 2^-9 rounds to 1 (ties to even below half an ulp); 257 is not a bf16: 256 or 258, to even.
  EXPECT_EQ(got, (std::vector<double>{1.0, 256.0, 0.0, -2.0,
                                      static_cast<float>(bf16(static_cast<float>(bf16(1e-3f)) * 2))}));
}

TEST(Bf16Ops, FusedScaledResidualMatchesTheF64ReferenceRoundedOnce) {
  for (const Shape& s : kShapes) {
    if (s.rank() < 2) continue;  // (N, ..., C)
    const int64_t N = s[0];
    std::vector<double> scale(static_cast<size_t>(N));
    for (int64_t n = 0; n < N; ++n) scale[static_cast<size_t>(n)] = n % 2 ? 0.0 : 1.0 / 0.7;
    // x + (h * gamma) * scale computed in fp32, one rounding to bf16 (the unfused ops round three
    // times): half an ulp of the f64 result. The sum can cancel (x and the branch have any sign),
    // so the f64 comparison scales its tolerance with |want|, which the single rounding obeys.
    expect_bf16_matches_f64(
        "scaled_residual " + s.str(),
        [](const std::vector<Tensor>& t) { return scaled_residual(t[0], t[1], t[2], t[3]); },
        {act(s, 12), act(s, 13), param(Shape{s[-1]}, 14, 0.5), Input{Shape{N}, scale, false, false}});
  }
}

TEST(Bf16Ops, CastRoundsToNearestEvenAndItsGradientComesBack) {
  const std::vector<double> v{1.0, 1.0 + 1.0 / 256, 1.0 + 3.0 / 256, -2.0 - 1.0 / 128, 1e-40, 3.0e38};
  Tensor x = test::make({6}, v, DType::f32);
  x.set_requires_grad(true);
  const Tensor y = cast(x, DType::bf16);
  EXPECT_EQ(y.dtype(), DType::bf16);
  // 1 + 2^-8 is halfway between 1 and 1 + 2^-7: to even (1). 1 + 3 * 2^-8: halfway, to 1 + 2^-6.
  // -2 - 2^-7 is halfway between -2 and -2 - 2^-6: to even (-2).
  const std::vector<double> want{1.0, 1.0, 1.0 + 1.0 / 64, -2.0,
                                 static_cast<float>(bf16(1e-40f)),
                                 static_cast<float>(bf16(3.0e38f))};
  EXPECT_EQ(values(y), want);
  sum(mul(cast(y, DType::f32), test::make({6}, {1, 2, 3, 4, 5, 6}, DType::f32))).backward();
  ASSERT_TRUE(x.grad().defined());
  EXPECT_EQ(x.grad().dtype(), DType::f32);
  EXPECT_EQ(values(x.grad()), (std::vector<double>{1, 2, 3, 4, 5, 6}));
  // Casting to the dtype a tensor has is the tensor itself; integer targets are refused.
  EXPECT_EQ(cast(x, DType::f32).raw_data(), x.raw_data());
  expect_error([&] { cast(x, DType::i64); }, {"cast", "f32, f64 or bf16", "i64"});
}

TEST(Bf16Ops, ParametersOfBf16ActivationsMustBeFp32) {
  const Tensor x = test::make({2, 4}, bf16_values(8, 1), DType::bf16);
  const Tensor gamma_bf16 = test::make({4}, bf16_values(4, 2), DType::bf16);
  expect_error([&] { layer_scale(x, gamma_bf16); },
               {"layer_scale", "gamma", "must be f32", "bf16[2, 4]"});
  const Tensor scale_bf16 = test::make({2}, {1.0, 0.0}, DType::bf16);
  expect_error([&] { drop_path(x, scale_bf16); }, {"drop_path", "scale", "must be f32"});
  // Two activations must share their dtype.
  const Tensor x32 = test::make({2, 4}, bf16_values(8, 1), DType::f32);
  expect_error([&] { add(x, x32); }, {"add", "differ in dtype"});
}

// The bf16 CPU kernels are exactly the f32 kernels on the widened values, rounded once: checked
// here bitwise for GELU (the pattern every bf16 CPU kernel follows).
TEST(Bf16Ops, CpuBf16KernelIsTheF32KernelRoundedOnce) {
  const int64_t n = 1000;
  const std::vector<double> v = bf16_values(n, 11, 3.0);
  std::vector<bf16> xb(n);
  std::vector<float> xf(n);
  for (int64_t i = 0; i < n; ++i) {
    xb[i] = bf16(static_cast<float>(v[i]));
    xf[i] = static_cast<float>(v[i]);
  }
  std::vector<bf16> yb(n);
  std::vector<float> yf(n);
  cpu::gelu_forward<bf16>(yb.data(), xb.data(), n);
  cpu::gelu_forward<float>(yf.data(), xf.data(), n);
  for (int64_t i = 0; i < n; ++i) ASSERT_EQ(yb[i].bits, bf16(yf[i]).bits) << i;
}

// ---- GPU ------------------------------------------------------------------------------------

#if CNX_TEST_CUDA
const Device kGpu = Device::cuda(0);

// The same op on the CPU and the GPU, bf16 activations, identical inputs.
void expect_gpu_matches_cpu(const std::string& what, const Op& op,
                            const std::vector<Input>& inputs) {
  const Run cpu = run(op, inputs, DType::bf16, Device::cpu(), 99);
  const Run gpu = run(op, inputs, DType::bf16, kGpu, 99);
  EXPECT_EQ(gpu.out_dtype, DType::bf16) << what;
  expect_close(what + " forward", gpu.out, cpu.out, 1e-30, kBf16Ulp);
  for (size_t i = 0; i < inputs.size(); ++i) {
    const std::string name = what + " grad of input " + std::to_string(i);
    ASSERT_EQ(gpu.grads[i].size(), cpu.grads[i].size()) << name;
    EXPECT_EQ(gpu.grad_dtypes[i], cpu.grad_dtypes[i]) << name;
    if (inputs[i].activation)
      expect_close(name, gpu.grads[i], cpu.grads[i], 1e-30, kBf16Ulp);
    else
      expect_close(name, gpu.grads[i], cpu.grads[i], 1e-6 * max_abs(cpu.grads[i]), 1e-5);
  }
}
#endif

// GPU shapes: ConvNeXt-T's stage shapes at batch 2 plus odd ones (scalar paths).
const std::vector<Shape> kGpuShapes = {{2, 56, 56, 96}, {2, 14, 14, 384}, {2, 7, 7, 768},
                                       {3, 5, 5, 40},   {2, 3, 3, 7},     {1001}};

TEST(CudaBf16Ops, ElementwiseOpsMatchTheCpu) {
#if CNX_TEST_CUDA
  CNX_SKIP_WITHOUT_DEVICE();
  for (const Shape& s : kGpuShapes) {
    const Shape g{s[-1]};
    expect_gpu_matches_cpu("gelu " + s.str(), [](const std::vector<Tensor>& t) { return gelu(t[0]); },
                           {act(s, 1, 2.0)});
    expect_gpu_matches_cpu("layer_scale " + s.str(),
                           [](const std::vector<Tensor>& t) { return layer_scale(t[0], t[1]); },
                           {act(s, 2), param(g, 3, 0.5)});
    Input gamma_frozen = param(g, 3, 0.5);
    gamma_frozen.grad = false;
    expect_gpu_matches_cpu("layer_scale, gamma frozen " + s.str(),
                           [](const std::vector<Tensor>& t) { return layer_scale(t[0], t[1]); },
                           {act(s, 2), gamma_frozen});
    std::vector<double> scale(static_cast<size_t>(s[0]));
    for (size_t n = 0; n < scale.size(); ++n) scale[n] = n % 2 ? 0.0 : 1.0 / 0.7;
    expect_gpu_matches_cpu("drop_path " + s.str(),
                           [](const std::vector<Tensor>& t) { return drop_path(t[0], t[1]); },
                           {act(s, 4), Input{Shape{s[0]}, scale, false, false}});
    if (s.rank() >= 2)
      expect_gpu_matches_cpu("scaled_residual " + s.str(),
                           [](const std::vector<Tensor>& t) {
                             return scaled_residual(t[0], t[1], t[2], t[3]);
                           },
                           {act(s, 12), act(s, 13), param(g, 14, 0.5),
                            Input{Shape{s[0]}, scale, false, false}});
    expect_gpu_matches_cpu("add, x used twice " + s.str(),
                           [](const std::vector<Tensor>& t) { return add(add(t[0], t[1]), t[0]); },
                           {act(s, 6), act(s, 7, 3.0)});
  }
#else
  CNX_SKIP_BUILT_WITHOUT_CUDA();
#endif
}

TEST(CudaBf16Ops, CastMatchesTheCpuBitwiseAlsoMisaligned) {
#if CNX_TEST_CUDA
  CNX_SKIP_WITHOUT_DEVICE();
  Generator gen(3);
  for (int64_t n : {int64_t(1), int64_t(7), int64_t(8), int64_t(1000003)}) {
    const Tensor x = Tensor::randn({n}, gen);
    const Tensor want = x.to(DType::bf16);                 // CPU rounding
    const Tensor got = x.to(kGpu).to(DType::bf16);         // device rounding
    ASSERT_EQ(got.dtype(), DType::bf16);
    const std::vector<bf16> w = want.to_vector<bf16>(), g = got.to(Device::cpu()).to_vector<bf16>();
    for (int64_t i = 0; i < n; ++i) ASSERT_EQ(g[i].bits, w[i].bits) << "n " << n << " i " << i;
    EXPECT_EQ(got.to(DType::f32).to(Device::cpu()).to_vector<float>(), want.to(DType::f32).to_vector<float>());
  }
  // Pointers one element in: the packed path must not be taken.
  const Tensor x = Tensor::randn({1025}, gen);
  const Tensor xg = x.to(kGpu);
  Tensor outg = Tensor::zeros({1025}, DType::bf16, kGpu);
  cuda::cast(outg.data<bf16>() + 1, xg.data<float>() + 1, 1024, cuda::device_stream(kGpu));
  const std::vector<bf16> got = outg.to(Device::cpu()).to_vector<bf16>();  // waits for the stream
  const std::vector<float> host = x.to_vector<float>();
  EXPECT_EQ(got[0].bits, 0);
  for (int64_t i = 1; i < 1025; ++i) ASSERT_EQ(got[i].bits, bf16(host[i]).bits) << i;
  // And back, bf16 -> f32 one element in (exact: every bf16 is a float).
  Tensor back = Tensor::zeros({1025}, DType::f32, kGpu);
  cuda::cast(back.data<float>() + 1, outg.data<bf16>() + 1, 1024, cuda::device_stream(kGpu));
  const std::vector<float> widened = back.to(Device::cpu()).to_vector<float>();
  EXPECT_EQ(widened[0], 0.0f);
  for (int64_t i = 1; i < 1025; ++i) ASSERT_EQ(widened[i], static_cast<float>(got[i])) << i;
#else
  CNX_SKIP_BUILT_WITHOUT_CUDA();
#endif
}

// The bf16 elementwise kernels one element in (2-byte aligned, so the scalar loop instead of the
// 16-byte packs) give bitwise what the packed path gives on the aligned tensors: both compute
// each element in fp32 and round once.
TEST(CudaBf16Ops, ElementwiseScalarPathMatchesThePackedPath) {
#if CNX_TEST_CUDA
  CNX_SKIP_WITHOUT_DEVICE();
  const int64_t n = 1000;  // not a multiple of the 8-element pack either
  Generator gen(5);
  const Tensor a = Tensor::randn({n + 1}, gen).to(DType::bf16).to(kGpu);
  const Tensor b = Tensor::randn({n + 1}, gen).to(DType::bf16).to(kGpu);
  const cudaStream_t s = cuda::device_stream(kGpu);
  const auto run = [&](int64_t off, auto launcher) {
    Tensor out = Tensor::zeros({n + 1}, DType::bf16, kGpu);
    launcher(out.data<bf16>() + off, a.data<bf16>() + off, b.data<bf16>() + off);
    std::vector<bf16> v = out.to(Device::cpu()).to_vector<bf16>();
    return std::vector<bf16>(v.begin() + off, v.begin() + off + n);
  };
  const auto expect_same = [&](const char* what, auto launcher) {
    // Offset 0 starts 16-byte aligned (a fresh tensor), offset 1 does not: the inputs of the
    // two runs are different elements, so compare each with its own packed twin.
    const std::vector<bf16> scalar = run(1, launcher);
    Tensor a1 = Tensor::zeros({n + 1}, DType::bf16, kGpu), b1 = Tensor::zeros({n + 1}, DType::bf16, kGpu);
    CNX_CUDA_CHECK(cudaMemcpyAsync(a1.data<bf16>(), a.data<bf16>() + 1, n * 2, cudaMemcpyDeviceToDevice, s));
    CNX_CUDA_CHECK(cudaMemcpyAsync(b1.data<bf16>(), b.data<bf16>() + 1, n * 2, cudaMemcpyDeviceToDevice, s));
    Tensor out = Tensor::zeros({n + 1}, DType::bf16, kGpu);
    launcher(out.data<bf16>(), a1.data<bf16>(), b1.data<bf16>());
    const std::vector<bf16> packed = out.to(Device::cpu()).to_vector<bf16>();
    for (int64_t i = 0; i < n; ++i) ASSERT_EQ(scalar[i].bits, packed[i].bits) << what << " i " << i;
  };
  expect_same("gelu_forward", [&](bf16* o, const bf16* x, const bf16*) { cuda::gelu_forward(o, x, n, s); });
  expect_same("gelu_backward", [&](bf16* o, const bf16* dy, const bf16* x) { cuda::gelu_backward(o, dy, x, n, s); });
  expect_same("add_forward", [&](bf16* o, const bf16* x, const bf16* y) { cuda::add_forward(o, x, y, n, s); });
#else
  CNX_SKIP_BUILT_WITHOUT_CUDA();
#endif
}

}  // namespace
}  // namespace cnx
