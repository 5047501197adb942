// The roadmap's golden cases (tests/test_roadmap.cpp, tools/make_roadmap_golden.py) on the CUDA
// device: the ResNet stem and max pool, dense and grouped convs (conv2d), BatchNorm in training
// and eval with its running statistics on the device, ReLU, and the ConvNeXt blocks, against
// PyTorch with the CPU's tolerances (fp32, TF32 off). On the emulated device where no GPU is.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <string>
#include <vector>

#include "autograd/ops.h"

#include "tensor/cuda_context.h"
#include "tests/cuda_testing.h"
#include "tests/golden.h"
#include "tests/testing.h"

namespace {

using namespace cnx;

class CudaRoadmapGolden : public ::testing::TestWithParam<std::string> {};

TEST_P(CudaRoadmapGolden, ForwardBackwardBuffersAndEvalMatchPyTorch) {
#if CNX_TEST_CUDA
  CNX_SKIP_WITHOUT_DEVICE();
  cuda::set_allow_tf32(false);
  test::expect_roadmap_case_matches(test::load_roadmap_golden(GetParam()), Device::cuda(0),
                                    GetParam() + " (cuda)");
#else
  CNX_SKIP_BUILT_WITHOUT_CUDA();
#endif
}

INSTANTIATE_TEST_SUITE_P(Cases, CudaRoadmapGolden, ::testing::ValuesIn(test::roadmap_golden_cases()));

}  // namespace

namespace {

using namespace cnx;

[[maybe_unused]] double cosine(const std::vector<double>& a, const std::vector<double>& b) {
  double ab = 0, aa = 0, bb = 0;
  for (size_t i = 0; i < a.size(); ++i) ab += a[i] * b[i], aa += a[i] * a[i], bb += b[i] * b[i];
  return aa == 0 && bb == 0 ? 1.0 : ab / std::sqrt(aa * bb);
}

// Mixed precision (bf16 activations, fp32 parameters: what `convnext train --device cuda` runs
// by default) on the device against the CPU's bf16 path, which rounds every stored activation
// the same way but sums in another order: the logits within 2% of the largest (a few bf16
// roundings through a dozen layers), every parameter gradient pointing the same way (cosine >=
// 0.99) and the BatchNorm running statistics within 1e-2. A wrong kernel gives garbage, not 2%.
class CudaRoadmapBf16 : public ::testing::TestWithParam<std::string> {};

TEST_P(CudaRoadmapBf16, DeviceMatchesTheCpuBf16Path) {
#if CNX_TEST_CUDA
  CNX_SKIP_WITHOUT_DEVICE();
  const test::GoldenCase g = test::load_roadmap_golden(GetParam());
  auto run = [&](Device device) {
    Generator init(0), drop(0);
    ConvNeXt model(g.config, init);
    model.load_state_dict(g.weights.tensors);
    model.to(device);
    const Tensor x = nchw_to_nhwc(g.batch.find("images")).to(device);
    Tensor logits = model.forward(x, /*training=*/true, drop, DType::bf16);
    Tensor loss = cross_entropy(logits, g.batch.find("labels").to(device));
    loss.backward();
    struct Out {
      std::vector<double> logits;
      double loss;
      NamedTensors grads, state;
    };
    return Out{test::values(logits.to(Device::cpu())), loss.to(Device::cpu()).item(),
               model.gradients(), model.state_dict()};
  };
  const auto cpu = run(Device::cpu());
  const auto gpu = run(Device::cuda(0));
  double scale = 0;
  for (double v : cpu.logits) scale = std::max(scale, std::abs(v));
  test::expect_close(GetParam() + " bf16 logits", gpu.logits, cpu.logits, 0.02 * scale, 0);
  EXPECT_NEAR(gpu.loss, cpu.loss, 0.02 * std::abs(cpu.loss)) << GetParam();
  ASSERT_EQ(gpu.grads.size(), cpu.grads.size());
  const auto listed = g.expected.metadata.find("zero_grads");
  const std::string zero_grads =
      "," + (listed == g.expected.metadata.end() ? std::string() : listed->second) + ",";
  for (size_t i = 0; i < cpu.grads.size(); ++i) {
    const std::vector<double> a = test::values(cpu.grads[i].second), b = test::values(gpu.grads[i].second);
    double norm = 0;
    for (double v : a) norm += v * v;
    // Zero by construction in exact arithmetic (the fixture lists them): rounding noise here.
    if (norm == 0 || zero_grads.find("," + cpu.grads[i].first + ",") != std::string::npos) continue;
    EXPECT_GE(cosine(a, b), 0.99) << GetParam() << " grad " << cpu.grads[i].first;
  }
  for (size_t i = 0; i < cpu.state.size(); ++i)
    if (cpu.state[i].first.find("running") != std::string::npos)
      test::expect_close(GetParam() + " " + cpu.state[i].first, test::values(gpu.state[i].second),
                         test::values(cpu.state[i].second), 1e-2, 1e-2);
#else
  CNX_SKIP_BUILT_WITHOUT_CUDA();
#endif
}

// The ResNet stem with max pool and BatchNorm, the grouped strided conv, LayerNorm, ConvNeXt.
INSTANTIATE_TEST_SUITE_P(Cases, CudaRoadmapBf16,
                         ::testing::Values("roadmap_00_resnet50", "roadmap_03_resnextify",
                                           "roadmap_10_layer_norm", "roadmap_11_convnext_tiny",
                                           "extra_inverted_middle_dense"));

}  // namespace
