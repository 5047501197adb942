// The fused depthwise conv + LayerNorm (kernels/dwconv_layernorm.h, autograd's
// dwconv_layer_norm) against the two ops it replaces, dwconv then layer_norm.
//
//  - CPU: the fused op's CPU path is the two reference ops, so forward and every gradient are
//    bitwise the unfused ops' (f32, f64, bf16); and a finite-difference gradient check in f64.
//  - CUDA kernel: y (the conv's output) is bitwise cuda::dwconv_forward's (the same fmaf chain
//    per output). out, mean and rstd are bitwise cuda::layernorm_forward's where that takes its
//    generic path (C % 4 != 0 for f32, C % 8 != 0 for bf16: the same per-warp summation order and
//    expressions); where it takes its fast path the row sums are added in another order, and the
//    results must agree within that rounding (bounds below). The optional outputs (y, mean,
//    rstd) may be skipped without changing out.
//  - CUDA block: a ConvNeXt block (fused or unfused front, then linear, GELU, linear, layer scale
//    and the residual), forward and backward, every gradient compared: bitwise in the generic
//    case, within a stated tolerance otherwise; and the fused f32 block against the CPU f64
//    reference of the unfused ops.
// Shapes: odd H and W, C not a multiple of 4 or 8 (3, 20, 30) and ConvNeXt's (96, 768), batch 1
// and 2, several tiles per image in both directions. On the emulated device run with
// CNX_EMU_RACECHECK=1 (each launch in two schedules, bitwise compared).
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <string>
#include <vector>

#include "autograd/ops.h"
#include "kernels/dwconv.h"
#include "kernels/dwconv_layernorm.h"
#include "kernels/layernorm.h"
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

const double kU = std::ldexp(1.0, -24);  // f32 unit roundoff

struct Dims {
  int64_t N, H, W, C;
  std::string str() const {
    char buf[96];
    std::snprintf(buf, sizeof buf, "N%lld H%lld W%lld C%lld", static_cast<long long>(N),
                  static_cast<long long>(H), static_cast<long long>(W), static_cast<long long>(C));
    return buf;
  }
};

// EXPECTs two equally long vectors bitwise equal (as doubles widened from f32, f64 or bf16:
// widening is exact, so equal doubles are equal bits up to the sign of zero, which == ignores;
// std::memcmp keeps it).
void expect_same(const std::string& what, const std::vector<double>& got,
                 const std::vector<double>& want) {
  ASSERT_EQ(got.size(), want.size()) << what;
  int64_t bad = 0;
  std::string report;
  for (size_t i = 0; i < got.size(); ++i)
    if (std::memcmp(&got[i], &want[i], sizeof(double)) != 0) {
      if (bad < 6)
        report += "\n  [" + std::to_string(i) + "] got " + std::to_string(got[i]) + " want " +
                  std::to_string(want[i]);
      ++bad;
    }
  EXPECT_EQ(bad, 0) << what << ": " << bad << " of " << got.size() << " values differ" << report;
}


// The parameters of one block: the conv's and LayerNorm's (param dtype), the two pointwise
// layers (C -> 4C -> C) and gamma; layer scale ~1 and LayerNorm weights far from 1, so that no
// part hides behind the residual.
struct BlockParams {
  std::vector<double> x, dw_w, dw_b, ln_w, ln_b, w1, b1, w2, b2, gamma, r;
};
BlockParams block_params(const Dims& d, int64_t k, uint64_t seed) {
  Generator gen(seed);
  const int64_t C = d.C, n = d.N * d.H * d.W * C;
  BlockParams p;
  p.x = randv(n, gen);
  p.dw_w = randv(k * k * C, gen, 0.3);
  p.dw_b = randv(C, gen, 0.5);
  p.ln_w = randv(C, gen, 0.5, 1.0);
  p.ln_b = randv(C, gen, 0.5);
  p.w1 = randv(4 * C * C, gen, 1.0 / std::sqrt(static_cast<double>(C)));
  p.b1 = randv(4 * C, gen, 0.1);
  p.w2 = randv(4 * C * C, gen, 0.5 / std::sqrt(static_cast<double>(C)));
  p.b2 = randv(C, gen, 0.1);
  p.gamma = randv(C, gen, 0.2, 1.0);
  p.r = randv(n, gen);  // the loss's projection
  return p;
}

// Forward and backward of the block on `device` with activations of `dt`; returns out (as
// doubles) then the gradients of x and of every parameter.
std::vector<std::vector<double>> run_block(const BlockParams& p, const Dims& d, int64_t k,
                                           DType dt, Device device, bool fused) {
  const DType pt = param_dtype(dt);
  const int64_t C = d.C;
  auto leaf_of = [&](const std::vector<double>& v, const Shape& s, DType t) {
    return make(s, v, t).to(device).set_requires_grad(true);
  };
  Tensor x = leaf_of(p.x, Shape{d.N, d.H, d.W, C}, dt);
  Tensor dw_w = leaf_of(p.dw_w, Shape{k, k, C}, pt), dw_b = leaf_of(p.dw_b, Shape{C}, pt);
  Tensor ln_w = leaf_of(p.ln_w, Shape{C}, pt), ln_b = leaf_of(p.ln_b, Shape{C}, pt);
  Tensor w1 = leaf_of(p.w1, Shape{4 * C, C}, pt), b1 = leaf_of(p.b1, Shape{4 * C}, pt);
  Tensor w2 = leaf_of(p.w2, Shape{C, 4 * C}, pt), b2 = leaf_of(p.b2, Shape{C}, pt);
  Tensor gamma = leaf_of(p.gamma, Shape{C}, pt);
  Tensor h = fused ? dwconv_layer_norm(x, dw_w, dw_b, ln_w, ln_b)
                   : layer_norm(dwconv(x, dw_w, dw_b), ln_w, ln_b);
  h = gelu(linear(h, w1, b1));  // (bf16 x takes the fp32 weights: linear rounds its own copy)
  h = linear(h, w2, b2);
  Tensor out = scaled_residual(x, h, gamma, Tensor());
  Tensor r = make(out.shape(), p.r, pt).to(device);
  sum(mul(cast(out, pt), r)).backward();
  std::vector<std::vector<double>> v{values(out)};
  for (const Tensor* t : {&x, &dw_w, &dw_b, &ln_w, &ln_b, &w1, &b1, &w2, &b2, &gamma})
    v.push_back(values(t->grad()));
  return v;
}

const char* kBlockNames[] = {"out",     "dx",     "ddw_weight", "ddw_bias", "dln_weight",
                             "dln_bias", "dw1",   "db1",        "dw2",      "db2",
                             "dgamma"};

// =============================================================================================
// CPU
// =============================================================================================

TEST(DwconvLayerNorm, CpuIsTheTwoOpsBitwise) {
  for (DType dt : {DType::f32, DType::f64, DType::bf16})
    for (const Dims& d : {Dims{1, 5, 7, 3}, Dims{2, 9, 4, 20}}) {
      SCOPED_TRACE(tag("cpu " + d.str(), dt));
      const BlockParams p = block_params(d, 7, 11);
      const auto fused = run_block(p, d, 7, dt, Device::cpu(), true);
      const auto plain = run_block(p, d, 7, dt, Device::cpu(), false);
      for (size_t i = 0; i < fused.size(); ++i) expect_same(kBlockNames[i], fused[i], plain[i]);
    }
}

TEST(DwconvLayerNorm, GradientsMatchFiniteDifferences) {
  Generator gen(21);
  const int64_t C = 3, k = 3;
  std::vector<Tensor> in{leaf(Shape{1, 4, 5, C}, gen), leaf(Shape{k, k, C}, gen, 0.5),
                         leaf(Shape{C}, gen), leaf(Shape{C}, gen, 0.5, 1.0), leaf(Shape{C}, gen)};
  expect_gradients_match(
      "dwconv_layer_norm f64",
      [](const std::vector<Tensor>& t) { return dwconv_layer_norm(t[0], t[1], t[2], t[3], t[4]); },
      in);
}

TEST(DwconvLayerNorm, RejectsBadShapes) {
  const Tensor x = Tensor::zeros(Shape{1, 5, 5, 4}), w = Tensor::zeros(Shape{7, 7, 4}),
               c4 = Tensor::zeros(Shape{4}), c3 = Tensor::zeros(Shape{3});
  expect_error([&] { dwconv_layer_norm(x, w, c4, c3, c4); }, {"dwconv_layer_norm", "ln_weight"});
  expect_error([&] { dwconv_layer_norm(x, Tensor::zeros(Shape{6, 6, 4}), c4, c4, c4); },
               {"dwconv_layer_norm", "even kernel size"});
}

#if CNX_TEST_CUDA

// =============================================================================================
// CUDA kernel against the two CUDA ops
// =============================================================================================

double max_abs(const std::vector<double>& v) {
  double m = 0;
  for (double x : v) m = std::max(m, std::abs(x));
  return m;
}

// Device tensor of dtype dt with the given values.
Tensor dev(const std::vector<double>& v, DType dt) {
  return make(Shape{static_cast<int64_t>(v.size())}, v, dt).to(Device::cuda(0));
}

template <class T>
void check_kernel(const Dims& d, DType dt, uint64_t seed) {
  SCOPED_TRACE(tag("kernel " + d.str(), dt));
  const BlockParams p = block_params(d, 7, seed);
  const int64_t N = d.N, H = d.H, W = d.W, C = d.C, rows = N * H * W, n = rows * C;
  Tensor x = dev(p.x, dt), dw_w = dev(p.dw_w, DType::f32), dw_b = dev(p.dw_b, DType::f32),
         ln_w = dev(p.ln_w, DType::f32), ln_b = dev(p.ln_b, DType::f32);
  auto empty = [&](int64_t count, DType t) {
    return Tensor::empty(Shape{count}, t, Device::cuda(0));
  };
  Tensor out = empty(n, dt), y = empty(n, dt), mean = empty(rows, DType::f32),
         rstd = empty(rows, DType::f32), out2 = empty(n, dt);
  Tensor ref_y = empty(n, dt), ref_out = empty(n, dt), ref_mean = empty(rows, DType::f32),
         ref_rstd = empty(rows, DType::f32);
  {
    cuda::DeviceGuard guard(Device::cuda(0));
    const cudaStream_t s = cuda::current_stream();
    cuda::dwconv_layernorm_forward<T>(out.data<T>(), y.data<T>(), mean.data<float>(),
                                      rstd.data<float>(), x.data<T>(), dw_w.data<float>(),
                                      dw_b.data<float>(), ln_w.data<float>(), ln_b.data<float>(),
                                      N, H, W, C, 7, 1e-6, s);
    // Inference: nothing saved for backward, the same out.
    cuda::dwconv_layernorm_forward<T>(out2.data<T>(), nullptr, nullptr, nullptr, x.data<T>(),
                                      dw_w.data<float>(), dw_b.data<float>(), ln_w.data<float>(),
                                      ln_b.data<float>(), N, H, W, C, 7, 1e-6, s);
    cuda::dwconv_forward<T>(ref_y.data<T>(), x.data<T>(), dw_w.data<float>(), dw_b.data<float>(),
                            N, H, W, C, 7, s);
    cuda::layernorm_forward<T>(ref_out.data<T>(), ref_mean.data<float>(), ref_rstd.data<float>(),
                               ref_y.data<T>(), ln_w.data<float>(), ln_b.data<float>(), rows, C,
                               1e-6, s);
  }
  const std::vector<double> got_y = values(y), want_y = values(ref_y), got_out = values(out),
                            want_out = values(ref_out), got_mean = values(mean),
                            want_mean = values(ref_mean), got_rstd = values(rstd),
                            want_rstd = values(ref_rstd);
  expect_same("y (the conv's output)", got_y, want_y);
  expect_same("out without y, mean, rstd", values(out2), got_out);
  const bool generic = C % (dt == DType::bf16 ? 8 : 4) != 0;  // the LayerNorm's generic path
  if (generic) {
    expect_same("out", got_out, want_out);
    expect_same("mean", got_mean, want_mean);
    expect_same("rstd", got_rstd, want_rstd);
    return;
  }
  // Fast path: the same values of y, added in another order. A row's sums are chains of at
  // most C / 32 + 40 adds on either side (layernorm.cu's lane sums and butterflies; the
  // kernel's lane sums and butterfly), so mean differs by <= 2 (C / 32 + 40) u mean|y| and rstd
  // by as much relatively; out = (y - mean) rstd w + b inherits both, at the scale
  // (|y| + mean|y|) rstd |w| + |b| (as tests/test_cuda_ops.cpp bounds the LayerNorm itself).
  // A bf16 out is rounded from fp32 values that close: the two roundings can land on
  // neighbouring bf16 values, one bf16 ulp (<= 2^-7 of the value: 8 significant bits) apart.
  const double tol = 2.0 * (static_cast<double>(C) / 32 + 40) * kU;
  std::vector<double> mag_mean(static_cast<size_t>(rows)), mag_out(static_cast<size_t>(n));
  for (int64_t r = 0; r < rows; ++r) {
    double s = 0;
    for (int64_t c = 0; c < C; ++c) s += std::abs(want_y[r * C + c]);
    mag_mean[r] = s / C;
    for (int64_t c = 0; c < C; ++c)
      mag_out[r * C + c] = (std::abs(want_y[r * C + c]) + mag_mean[r]) * want_rstd[r] *
                               std::abs(p.ln_w[c]) + std::abs(p.ln_b[c]) +
                           (dt == DType::bf16 ? std::abs(want_out[r * C + c]) / (128 * tol) : 0);
  }
  expect_close_mag("mean", got_mean, want_mean, mag_mean, tol);
  expect_close("rstd", got_rstd, want_rstd, 0.0, tol);
  expect_close_mag("out", got_out, want_out, mag_out, tol);
}

const Dims kKernelDims[] = {
    {1, 9, 11, 20},   // C % 8 != 0: generic for bf16; C % 4 == 0: fast for f32
    {1, 7, 5, 30},    // C % 4 != 0: generic for both
    {2, 13, 17, 3},   // tiny C, two tiles down, batch 2
    {1, 16, 30, 40},  // 8 x 2 tiles of 2 x 28
    {2, 6, 8, 96},    // ConvNeXt-T's stage-0 width
    {1, 7, 7, 768},   // stage 3: the tile shrinks to 3 x 7 to fit y in shared memory
};

TEST(CudaDwconvLayerNorm, KernelMatchesTheTwoOps) {
  CNX_SKIP_WITHOUT_DEVICE();
  uint64_t seed = 100;
  for (const Dims& d : kKernelDims) {
    check_kernel<float>(d, DType::f32, seed++);
    check_kernel<bf16>(d, DType::bf16, seed++);
  }
}

TEST(CudaDwconvLayerNorm, KernelRejectsWhatItDoesNotTake) {
  CNX_SKIP_WITHOUT_DEVICE();
  EXPECT_TRUE(cuda::dwconv_layernorm_supported(96, 7));
  EXPECT_FALSE(cuda::dwconv_layernorm_supported(96, 5));
  EXPECT_FALSE(cuda::dwconv_layernorm_supported(4096, 7));
  Tensor buf = Tensor::zeros(Shape{64}, DType::f32, Device::cuda(0));
  float* p = buf.data<float>();
  expect_error(
      [&] {
        cuda::dwconv_layernorm_forward<float>(p, nullptr, nullptr, nullptr, p, p, p, p, p, 1, 2,
                                              2, 4, 5, 1e-6, nullptr);
      },
      {"dwconv_layernorm", "k = 7", "k = 5"});
}

// =============================================================================================
// CUDA block: forward and backward, fused against unfused
// =============================================================================================

void check_block(const Dims& d, int64_t k, DType dt, uint64_t seed) {
  SCOPED_TRACE(tag("block " + d.str() + " k" + std::to_string(k), dt));
  const BlockParams p = block_params(d, k, seed);
  const Device gpu = Device::cuda(0);
  const auto fused = run_block(p, d, k, dt, gpu, true);
  const auto plain = run_block(p, d, k, dt, gpu, false);
  // Bitwise when the fused forward's arithmetic is the unfused ops' (the LayerNorm's generic
  // path), or when k != 7 (the fused op then runs the two CUDA ops); the backward is the same
  // kernels on the same saved tensors.
  const bool same = d.C % (dt == DType::bf16 ? 8 : 4) != 0 || k != 7;
  for (size_t i = 0; i < fused.size(); ++i) {
    if (same) {
      expect_same(kBlockNames[i], fused[i], plain[i]);
    } else {
      // mean and rstd differ by a few ulp (see check_kernel), which moves every later value by
      // a few ulp of f32 (relative 1e-6 of the largest value covers sums of ~100 such terms);
      // in bf16 an element of out may round to the neighbouring bf16 value (<= 2^-7 relative),
      // and the GEMMs sum ~4C such differences of either sign: 2e-2 of the largest value.
      const double rel = dt == DType::bf16 ? 2e-2 : 1e-5;
      expect_close(kBlockNames[i], fused[i], plain[i], rel * max_abs(plain[i]), rel);
    }
  }
  if (dt != DType::f32) return;
  // The fused f32 block on CUDA against the f64 CPU reference of the unfused ops (independent of
  // every CUDA kernel): f32 rounding through a block (~C-term sums, TF32-free fp32 GEMMs) stays
  // far below 1e-4 of the largest value.
  const auto ref = run_block(p, d, k, DType::f64, Device::cpu(), false);
  for (size_t i = 0; i < fused.size(); ++i)
    expect_close(std::string(kBlockNames[i]) + " vs CPU f64", fused[i], ref[i],
                 1e-4 * max_abs(ref[i]), 1e-4);
}

TEST(CudaDwconvLayerNorm, BlockForwardBackwardMatchesUnfused) {
  CNX_SKIP_WITHOUT_DEVICE();
  uint64_t seed = 200;
  for (const Dims& d : {Dims{1, 9, 11, 20}, Dims{1, 7, 5, 30}, Dims{2, 10, 9, 96}})
    for (DType dt : {DType::f32, DType::bf16}) check_block(d, 7, dt, seed++);
  check_block({1, 6, 5, 8}, 3, DType::f32, seed++);  // k = 3: the fused op's fallback
}

#endif  // CNX_TEST_CUDA

}  // namespace
