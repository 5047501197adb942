// The fusion switches (kernels/fusion.h): a whole training step with a fusion switched off gives
// the fused step's results. One small ConvNeXt (two stages, two blocks each, layer scale 1 so the
// residual branch matters, drop path 0.5 so that samples are dropped), one step: forward in
// training mode, cross-entropy, backward, AdamW; compared: the logits, every parameter gradient
// and every parameter after the update. The switch is flipped in-process (set_fusion_enabled),
// as CNX_...=0 would set it at start.
//
//   CNX_LINEAR_BIAS=0          CUDA, f32 and bf16: bitwise (the plain GEMM's product plus the
//                              bias, rounded once, is what the epilogue computes)
//   CNX_FUSE_SCALED_RESIDUAL=0 CPU and CUDA f32: bitwise (the fused kernel rounds its products in
//                              the order of the three ops); bf16: the three ops round h * gamma
//                              and the drop-path product to bf16 before the add, so within the
//                              tolerance below
//   CNX_BF16_WEIGHT_COPIES=0   CPU and CUDA bf16: bitwise (the copy is the cast)
//   CNX_LINEAR_BGRADB=0        CUDA f32: the column sums add in another order than the epilogue:
//                              within the tolerance below
//   every switch off at once   CUDA f32 and bf16: within the tolerance below
//
// Tolerance where not bitwise: |a - b| <= atol + rtol |b|, f32 atol 1e-5 / rtol 1e-4, bf16 atol
// 3e-3 / rtol 3e-2 (a few bf16 ulps, 2^-8 each). The logits and gradients differ by rounding only;
// the parameters after AdamW can differ by more: its first step moves a parameter by about
// lr g / |g|, so a gradient near zero whose last bits flip its sign moves it by up to 2 lr = 2e-3
// the other way, which bf16's atol covers (seen: 0.002 in bf16; 1.5e-7 in f32 with every switch
// off). The test prints the largest difference of each comparison.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <memory>
#include <string>
#include <vector>

#include "autograd/ops.h"
#include "kernels/fusion.h"
#include "kernels/linear.h"
#include "models/convnext.h"
#include "tensor/generator.h"
#include "tensor/tensor.h"
#include "tests/cuda_testing.h"
#include "tests/testing.h"
#include "train/optim/adamw.h"

namespace {

using namespace cnx;
using namespace cnx::test;

// What one step leaves: the logits, each parameter's gradient and value after AdamW.
struct StepOutcome {
  std::vector<double> logits;
  std::vector<std::vector<double>> grads, params;
  std::vector<std::string> names;
};

StepOutcome one_step(Device device, DType activations) {
  ConvNeXtConfig cfg;
  cfg.num_classes = 10;
  cfg.depths = {2, 2};
  cfg.dims = {8, 16};
  cfg.drop_path_rate = 0.5;
  cfg.layer_scale_init_value = 1.0;
  Generator init(7);
  ConvNeXt model(cfg, init);
  model.to(device);
  AdamW opt(model.parameters());
  if (activations == DType::bf16) opt.keep_bf16_copies(model.bf16_gemm_weights());
  const int64_t N = 4, S = 16;
  Tensor images = randn(Shape{N, S, S, 3}, 11, DType::f32).to(device);
  Tensor labels = Tensor::from_data<int64_t>({N}, {3, 1, 4, 1}).to(device);
  Generator drop_gen(5);
  Tensor logits = model.forward(images, /*training=*/true, drop_gen, activations, &opt.bf16_copies());
  Tensor loss = cross_entropy(logits, labels, 0.1);
  loss.backward();
  StepOutcome r;
  r.logits = values(logits);
  for (const Parameter& p : model.parameters()) {
    r.names.push_back(p.name);
    r.grads.push_back(p.value.grad().defined() ? values(p.value.grad()) : std::vector<double>{});
  }
  opt.step(1e-3, 0.05);
  for (const Parameter& p : model.parameters()) r.params.push_back(values(p.value.detach()));
  return r;
}

// Bitwise when rtol and atol are 0.
void expect_same_step(const StepOutcome& got, const StepOutcome& want, double atol, double rtol,
                      const std::string& what) {
  ASSERT_EQ(got.names, want.names);
  if (atol == 0 && rtol == 0) {
    EXPECT_EQ(got.logits, want.logits) << what << ": logits";
    for (size_t i = 0; i < got.names.size(); ++i) {
      EXPECT_EQ(got.grads[i], want.grads[i]) << what << ": gradient of " << got.names[i];
      EXPECT_EQ(got.params[i], want.params[i]) << what << ": " << got.names[i] << " after AdamW";
    }
    return;
  }
  // The largest difference, printed: how far from bitwise the two steps are.
  double worst = 0, worst_rel = 0;
  auto track = [&](const std::vector<double>& a, const std::vector<double>& b) {
    for (size_t i = 0; i < a.size() && i < b.size(); ++i) {
      worst = std::max(worst, std::abs(a[i] - b[i]));
      if (b[i] != 0) worst_rel = std::max(worst_rel, std::abs(a[i] - b[i]) / std::abs(b[i]));
    }
  };
  track(got.logits, want.logits);
  for (size_t i = 0; i < got.names.size(); ++i) {
    track(got.grads[i], want.grads[i]);
    track(got.params[i], want.params[i]);
  }
  std::printf("%s: largest difference %.3g (relative %.3g) over logits, gradients, parameters\n",
              what.c_str(), worst, worst_rel);
  expect_close(what + ": logits", got.logits, want.logits, atol, rtol);
  for (size_t i = 0; i < got.names.size(); ++i) {
    expect_close(what + ": gradient of " + got.names[i], got.grads[i], want.grads[i], atol, rtol);
    expect_close(what + ": " + got.names[i] + " after AdamW", got.params[i], want.params[i], atol, rtol);
  }
}

// The step with `off` switched off (all else on), against the step with everything on.
void compare_switch(const std::vector<Fusion>& off, Device device, DType activations, double atol,
                    double rtol) {
  std::vector<std::unique_ptr<FusionSetting>> on_all;
  for (int f = 0; f < kFusionCount; ++f)
    on_all.push_back(std::make_unique<FusionSetting>(static_cast<Fusion>(f), true));
  const StepOutcome fused = one_step(device, activations);
  std::string what;
  std::vector<std::unique_ptr<FusionSetting>> settings;
  for (Fusion f : off) {
    settings.push_back(std::make_unique<FusionSetting>(f, false));
    what += std::string(what.empty() ? "" : " ") + fusion_env_name(f) + "=0";
  }
  what += std::string(" on ") + (device.is_cuda() ? "cuda" : "cpu") + ", " + dtype_name(activations);
  const StepOutcome unfused = one_step(device, activations);
  expect_same_step(unfused, fused, atol, rtol, what);
}

constexpr double kF32Atol = 1e-5, kF32Rtol = 1e-4, kBf16Atol = 3e-3, kBf16Rtol = 3e-2;

[[maybe_unused]] std::vector<Fusion> every_fusion() {  // (used by the CUDA tests only)
  std::vector<Fusion> all;
  for (int f = 0; f < kFusionCount; ++f) all.push_back(static_cast<Fusion>(f));
  return all;
}

TEST(FusionSwitches, ReadFromTheEnvironmentAndOverridable) {
  EXPECT_STREQ(fusion_env_name(Fusion::linear_bias), "CNX_LINEAR_BIAS");
  EXPECT_STREQ(fusion_env_name(Fusion::scaled_residual), "CNX_FUSE_SCALED_RESIDUAL");
  EXPECT_STREQ(fusion_env_name(Fusion::bf16_weight_copies), "CNX_BF16_WEIGHT_COPIES");
  const bool before = fusion_enabled(Fusion::scaled_residual);
  {
    FusionSetting off(Fusion::scaled_residual, false);
    EXPECT_FALSE(fusion_enabled(Fusion::scaled_residual));
  }
  EXPECT_EQ(fusion_enabled(Fusion::scaled_residual), before);
}

TEST(FusionSwitches, ScaledResidualOffIsBitwiseOnTheCpu) {
  compare_switch({Fusion::scaled_residual}, Device::cpu(), DType::f32, 0, 0);
  compare_switch({Fusion::scaled_residual}, Device::cpu(), DType::bf16, kBf16Atol, kBf16Rtol);
}

TEST(FusionSwitches, Bf16WeightCopiesOffIsBitwiseOnTheCpu) {
  compare_switch({Fusion::bf16_weight_copies}, Device::cpu(), DType::bf16, 0, 0);
  FusionSetting off(Fusion::bf16_weight_copies, false);
  ConvNeXtConfig cfg;
  cfg.depths = {1, 1};
  cfg.dims = {8, 16};
  Generator init(1);
  ConvNeXt model(cfg, init);
  AdamW opt(model.parameters());
  opt.keep_bf16_copies(model.bf16_gemm_weights());
  for (const Tensor& t : opt.bf16_copies()) EXPECT_FALSE(t.defined()) << "a copy was kept";
}

#if CNX_TEST_CUDA
TEST(CudaFusionSwitches, LinearBiasOffIsBitwise) {
  CNX_SKIP_WITHOUT_DEVICE();
  compare_switch({Fusion::linear_bias}, Device::cuda(0), DType::f32, 0, 0);
  compare_switch({Fusion::linear_bias}, Device::cuda(0), DType::bf16, 0, 0);
  // And the off step did take the other path: every forward GEMM (each has a bias) a plain GEMM
  // and a bias pass, for the switch's reason.
  cuda::clear_gemm_paths();
  {
    FusionSetting off(Fusion::linear_bias, false);
    (void)one_step(Device::cuda(0), DType::bf16);
  }
  int forwards = 0;
  for (const cuda::GemmPathRecord& r : cuda::gemm_paths()) {
    if (r.pass != cuda::GemmPass::forward) continue;
    ++forwards;
    EXPECT_NE(r.path.find("then bias pass"), std::string::npos) << r.path;
    EXPECT_EQ(r.why, "CNX_LINEAR_BIAS=0");
  }
  EXPECT_GT(forwards, 0);
  cuda::clear_gemm_paths();
}

TEST(CudaFusionSwitches, ScaledResidualOff) {
  CNX_SKIP_WITHOUT_DEVICE();
  compare_switch({Fusion::scaled_residual}, Device::cuda(0), DType::f32, 0, 0);
  compare_switch({Fusion::scaled_residual}, Device::cuda(0), DType::bf16, kBf16Atol, kBf16Rtol);
}

TEST(CudaFusionSwitches, Bf16WeightCopiesOffIsBitwise) {
  CNX_SKIP_WITHOUT_DEVICE();
  compare_switch({Fusion::bf16_weight_copies}, Device::cuda(0), DType::bf16, 0, 0);
}

TEST(CudaFusionSwitches, LinearBgradbOff) {
  CNX_SKIP_WITHOUT_DEVICE();
  compare_switch({Fusion::linear_bgradb}, Device::cuda(0), DType::f32, kF32Atol, kF32Rtol);
}

TEST(CudaFusionSwitches, EverySwitchOffAtOnce) {
  CNX_SKIP_WITHOUT_DEVICE();
  compare_switch(every_fusion(), Device::cuda(0), DType::f32, kF32Atol, kF32Rtol);
  compare_switch(every_fusion(), Device::cuda(0), DType::bf16, kBf16Atol, kBf16Rtol);
}
#else
TEST(CudaFusionSwitches, LinearBiasOffIsBitwise) { CNX_SKIP_BUILT_WITHOUT_CUDA(); }
#endif

}  // namespace
