// bf16 mixed precision for the whole model (ConvNeXt::forward with bf16 activations, the
// trainer's --use_amp): the dtypes at the boundaries, closeness to the fp32 model, fp32
// parameter gradients, training that still learns, and the flag.
//
// Tolerances here are for a chain of layers, not one op: each layer rounds its output to bf16
// (relative error up to 2^-8, ~0.4%), and the errors of ~20 roundings along the path of a logit
// add up roughly like a random walk. Measured on 2026-11-22 for the model below (CPU): logits
// 0.71% relative L2 error, all gradients 0.68%, every parameter's gradient at cosine >= 0.99996
// with the fp32 one; the overfitting run's last loss 0.014180 vs 0.014177. The limits are 3-4x
// those (cosine 0.9995 allows ~3% relative error).
#include <gtest/gtest.h>

#include <cmath>
#include <vector>

#include "autograd/ops.h"
#include "models/convnext.h"
#include "tests/cuda_testing.h"
#include "tests/testing.h"
#include "train/optim/adamw.h"
#include "train/trainer.h"

namespace cnx {
namespace {

using test::expect_error;
using test::values;

ConvNeXtConfig small_config() {
  ConvNeXtConfig c;
  c.name = "amp_test";
  c.in_chans = 3;
  c.num_classes = 10;
  c.depths = {1, 1, 2, 1};
  c.dims = {16, 32, 64, 128};
  c.layer_scale_init_value = 0.5;  // blocks that matter (1e-6 would hide their errors)
  c.drop_path_rate = 0.2;
  return c;
}

// ||a - b|| / ||b||.
double rel_l2(const std::vector<double>& a, const std::vector<double>& b) {
  double num = 0, den = 0;
  for (size_t i = 0; i < a.size(); ++i) {
    num += (a[i] - b[i]) * (a[i] - b[i]);
    den += b[i] * b[i];
  }
  return std::sqrt(num / std::max(den, 1e-300));
}

double cosine(const std::vector<double>& a, const std::vector<double>& b) {
  double ab = 0, aa = 0, bb = 0;
  for (size_t i = 0; i < a.size(); ++i) {
    ab += a[i] * b[i];
    aa += a[i] * a[i];
    bb += b[i] * b[i];
  }
  return ab / std::sqrt(std::max(aa * bb, 1e-300));
}

struct Pass {
  std::vector<double> logits;
  double loss = 0;
  std::vector<std::vector<double>> grads;  // per parameter, model order
  std::vector<DType> grad_dtypes;
  DType logits_dtype = DType::f32;
  uint64_t drop_offset = 0;
};

// One forward + backward of `model` in `act` on a fixed batch, training mode (drop path on).
Pass forward_backward(ConvNeXt& model, DType act, Device device) {
  Generator data(42), drop(7);
  const Tensor images = Tensor::randn({4, 64, 64, 3}, data).to(device);
  const Tensor labels = Tensor::from_data<int64_t>({4}, std::vector<int64_t>{1, 5, 9, 0}).to(device);
  model.zero_grad();
  const Tensor logits = model.forward(images, /*training=*/true, drop, act);
  Tensor loss = cross_entropy(logits, labels, 0.1);
  loss.backward();
  Pass p;
  p.logits = values(logits);
  p.logits_dtype = logits.dtype();
  p.loss = loss.item();
  for (const Parameter& prm : model.parameters()) {
    p.grads.push_back(prm.value.grad().defined() ? values(prm.value.grad()) : std::vector<double>{});
    p.grad_dtypes.push_back(prm.value.grad().defined() ? prm.value.grad().dtype() : DType::u8);
  }
  p.drop_offset = drop.offset();
  return p;
}

TEST(Amp, Bf16ModelIsCloseToTheFp32ModelWithFp32Gradients) {
  Generator init(3);
  ConvNeXt model(small_config(), init);
  const Pass f32 = forward_backward(model, DType::f32, Device::cpu());
  const Pass b16 = forward_backward(model, DType::bf16, Device::cpu());

  // The logits come back to fp32 (the head runs in fp32) and are close, not equal.
  EXPECT_EQ(b16.logits_dtype, DType::f32);
  const double logit_err = rel_l2(b16.logits, f32.logits);
  EXPECT_GT(logit_err, 0.0) << "the bf16 run must differ: was bf16 used at all?";
  EXPECT_LT(logit_err, 0.025) << "logits, relative L2 error of bf16 vs fp32";
  EXPECT_NEAR(b16.loss, f32.loss, 0.02 * std::abs(f32.loss));
  // Drop path drew the same masks (the draws do not depend on the dtype).
  EXPECT_EQ(b16.drop_offset, f32.drop_offset);

  // Every parameter has an fp32 gradient pointing the same way as the fp32 model's.
  std::vector<double> all_b16, all_f32;
  const auto& params = model.parameters();
  for (size_t i = 0; i < params.size(); ++i) {
    ASSERT_FALSE(b16.grads[i].empty()) << params[i].name;
    EXPECT_EQ(b16.grad_dtypes[i], DType::f32) << params[i].name;
    EXPECT_GT(cosine(b16.grads[i], f32.grads[i]), 0.9995) << params[i].name;
    all_b16.insert(all_b16.end(), b16.grads[i].begin(), b16.grads[i].end());
    all_f32.insert(all_f32.end(), f32.grads[i].begin(), f32.grads[i].end());
  }
  EXPECT_LT(rel_l2(all_b16, all_f32), 0.025) << "all gradients, relative L2 error";
  // The parameters themselves stay fp32.
  for (const Parameter& prm : params) EXPECT_EQ(prm.value.dtype(), DType::f32) << prm.name;
}

// Overfitting one batch: bf16 training follows the fp32 run's loss curve.
TEST(Amp, Bf16TrainingFollowsFp32) {
  auto train = [](DType act) {
    Generator init(5), data(6), drop(8);
    ConvNeXtConfig cfg = small_config();
    cfg.drop_path_rate = 0.0;
    ConvNeXt model(cfg, init);
    AdamW opt(model.parameters());
    const Tensor images = Tensor::randn({8, 32, 32, 3}, data);
    const Tensor labels =
        Tensor::from_data<int64_t>({8}, std::vector<int64_t>{0, 1, 2, 3, 4, 5, 6, 7});
    std::vector<double> losses;
    for (int step = 0; step < 30; ++step) {
      model.zero_grad();
      Tensor loss = cross_entropy(model.forward(images, true, drop, act), labels);
      loss.backward();
      opt.step(2e-3, 0.0);
      losses.push_back(loss.item());
    }
    return losses;
  };
  const std::vector<double> f32 = train(DType::f32), b16 = train(DType::bf16);
  EXPECT_LT(f32.back(), 0.5 * f32.front()) << "the fp32 run must learn for the comparison to mean anything";
  EXPECT_LT(b16.back(), 0.5 * b16.front());
  for (size_t i = 0; i < f32.size(); ++i)  // the whole curve, within 1% of the starting loss
    EXPECT_NEAR(b16[i], f32[i], 0.01 * f32.front()) << "step " << i;
  EXPECT_NEAR(b16.back(), f32.back(), 0.1 * f32.back()) << "the end of the curve, relative";
}

TEST(Amp, ActivationsMustBeTheParametersDtypeOrBf16OverFp32) {
  Generator init(3), drop(1);
  ConvNeXt model(small_config(), init);
  const Tensor images = Tensor::zeros({1, 32, 32, 3});
  expect_error([&] { model.forward(images, false, drop, DType::f64); },
               {"amp_test", "activations f64", "f32"});
  expect_error([&] { model.forward(images, false, drop, DType::i64); }, {"activations i64"});
}

TEST(Amp, UseAmpFlagResolvesByDevice) {
  TrainConfig c;
  EXPECT_EQ(c.use_amp, "auto");
  EXPECT_EQ(c.activations(Device::cpu()), DType::f32);
  EXPECT_EQ(c.activations(Device::cuda(0)), DType::bf16);
  c.use_amp = "false";
  EXPECT_EQ(c.activations(Device::cuda(0)), DType::f32);
  c.use_amp = "true";
  EXPECT_EQ(c.activations(Device::cpu()), DType::bf16);
  EXPECT_EQ(TrainConfig::from_json(c.to_json()).use_amp, "true");
  c.use_amp = "yes";
  expect_error([&] { c.validate(); }, {"--use_amp must be auto, true or false", "yes"});
}

// ---- GPU ------------------------------------------------------------------------------------

TEST(CudaAmp, Bf16ModelOnTheGpuMatchesTheCpuBf16Model) {
#if CNX_TEST_CUDA
  CNX_SKIP_WITHOUT_DEVICE();
  Generator init(3);
  ConvNeXt cpu_model(small_config(), init);
  Generator init2(3);
  ConvNeXt gpu_model(small_config(), init2);
  gpu_model.to(Device::cuda(0));
  const Pass cpu = forward_backward(cpu_model, DType::bf16, Device::cpu());
  const Pass gpu = forward_backward(gpu_model, DType::bf16, Device::cuda(0));
  // Both round every activation to bf16, from fp32 results that differ only in summation
  // order, so a value may land one bf16 ulp apart and that difference travels on: well below
  // the bf16-vs-fp32 difference (checked < 3% above).
  EXPECT_LT(rel_l2(gpu.logits, cpu.logits), 0.01);
  for (size_t i = 0; i < cpu.grads.size(); ++i) {
    EXPECT_EQ(gpu.grad_dtypes[i], DType::f32);
    EXPECT_GT(cosine(gpu.grads[i], cpu.grads[i]), 0.995) << cpu_model.parameters()[i].name;
  }
#else
  CNX_SKIP_BUILT_WITHOUT_CUDA();
#endif
}

}  // namespace
}  // namespace cnx
