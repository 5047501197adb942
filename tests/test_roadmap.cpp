// The paper's roadmap (models/convnext.h: the design space from ResNet-50 to ConvNeXt-T) against
// tools/roadmap_reference.py, an independent PyTorch definition of every step:
// - tests/data/roadmap/summary.json: each named step's parameters, multiply-adds at 224 x 224
//   and, for five steps, every state_dict name and shape in order (torchvision's ResNet-50 for
//   step 0);
// - tests/data/roadmap/<case>/: reduced-size versions of the steps (the same structure, small
//   widths and depths), weights far from init, one training-mode forward/backward (BatchNorm on
//   batch statistics): logits, loss, every parameter gradient, every buffer after the update, and
//   the eval-mode logits with the updated running statistics.
// Also: step 11 is convnext_tiny (the same logits for the same weights), BatchNorm's train/eval
// semantics at the model level, the initialisation, and the errors for bad input.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <filesystem>
#include <fstream>
#include <nlohmann/json.hpp>
#include <sstream>
#include <string>
#include <vector>

#include "autograd/function.h"
#include "autograd/ops.h"
#include "models/convnext.h"
#include "models/grads.h"
#include "models/safetensors.h"
#include "tests/golden.h"
#include "tests/testing.h"

namespace {

using namespace cnx;
using namespace cnx::test;
using json = nlohmann::json;

std::string roadmap_dir() { return std::string(CNX_TEST_DATA_DIR) + "/roadmap"; }

const json& summary() {
  static const json s = [] {
    std::ifstream in(roadmap_dir() + "/summary.json");
    EXPECT_TRUE(in.good()) << "tests/data/roadmap/summary.json is missing";
    return json::parse(in);
  }();
  return s;
}

// ---- the named steps: sizes, names, multiply-adds -------------------------------------------

TEST(Roadmap, NamedStepsInOrder) {
  const std::vector<std::string>& names = roadmap_step_names();
  ASSERT_EQ(names.size(), 15u);
  EXPECT_EQ(names.front(), "roadmap_00_resnet50");
  EXPECT_EQ(names.back(), "roadmap_11_convnext_tiny");
  for (const std::string& n : names) {
    const ConvNeXtConfig c = convnext_config(n);
    EXPECT_FALSE(c.description.empty()) << n;
    EXPECT_NO_THROW(c.validate()) << n;
  }
  EXPECT_EQ(*convnext_config("roadmap_00_resnet50").paper_top1, 78.8);
  EXPECT_EQ(*convnext_config("roadmap_11_convnext_tiny").paper_top1, 82.0);
  EXPECT_FALSE(convnext_config("roadmap_06_kernel9").paper_top1.has_value());
}

TEST(Roadmap, ParametersAndMacsMatchPyTorch) {
  const json& steps = summary().at("steps");
  size_t checked = 0;
  for (const std::string& n : roadmap_step_names()) {
    ASSERT_TRUE(steps.contains(n)) << n << " is not in summary.json";
    const json& want = steps.at(n);
    const ConvNeXt m(convnext_config(n), ConvNeXt::ShapesOnly{});
    EXPECT_EQ(m.num_parameters(), want.at("params").get<int64_t>()) << n;
    EXPECT_EQ(convnext_config(n).num_parameters(), want.at("params").get<int64_t>()) << n;
    EXPECT_EQ(m.macs(224, 224), want.at("macs").get<int64_t>()) << n;
    ++checked;
  }
  EXPECT_EQ(checked, 15u);
  // The anchors the paper and torchvision give.
  EXPECT_EQ(convnext_config("roadmap_00_resnet50").num_parameters(), 25557032);
  EXPECT_EQ(convnext_config("roadmap_11_convnext_tiny").num_parameters(), 28589128);
  const double resnet_g =
      ConvNeXt(convnext_config("roadmap_00_resnet50"), ConvNeXt::ShapesOnly{}).macs(224, 224) / 1e9;
  const double tiny_g =
      ConvNeXt(convnext_config("convnext_tiny"), ConvNeXt::ShapesOnly{}).macs(224, 224) / 1e9;
  EXPECT_NEAR(resnet_g, 4.1, 0.05);
  EXPECT_NEAR(tiny_g, 4.47, 0.03);
}

TEST(Roadmap, StateDictNamesAndShapesMatchPyTorch) {
  size_t lists = 0;
  for (const auto& [n, step] : summary().at("steps").items()) {
    if (!step.contains("state_dict")) continue;
    ++lists;
    const json& entries = step.at("state_dict");
    const ConvNeXt m(convnext_config(n), ConvNeXt::ShapesOnly{});
    const auto mine = m.state_dict_shapes();
    ASSERT_EQ(mine.size(), entries.size()) << n;
    for (size_t i = 0; i < mine.size(); ++i) {
      const std::string want_name = entries[i].at(0).get<std::string>();
      const std::vector<int64_t> want_shape = entries[i].at(1).get<std::vector<int64_t>>();
      EXPECT_EQ(mine[i].first, want_name) << n << " entry " << i;
      EXPECT_EQ(mine[i].second, Shape(want_shape)) << n << " " << want_name;
    }
  }
  EXPECT_EQ(lists, 5u) << "steps 00, 05, 09, 10 and 11 have their state_dict in summary.json";
}

// torchvision's ResNet-50 weights load as they are (names, shapes, order), and come back out
// bitwise: a state dict with every torchvision name and shape, random values.
TEST(Roadmap, TorchvisionResNet50StateDictLoadsAsIs) {
  const json& entries = summary().at("steps").at("roadmap_00_resnet50").at("state_dict");
  Generator g(5);
  NamedTensors sd;
  for (const json& e : entries) {
    const std::string name = e.at(0).get<std::string>();
    const Shape shape(e.at(1).get<std::vector<int64_t>>());
    if (name.ends_with("num_batches_tracked")) {
      Tensor t = Tensor::empty(shape, DType::i64);
      *t.data<int64_t>() = 12345;
      sd.emplace_back(name, t);
    } else {
      sd.emplace_back(name, Tensor::randn(shape, g));
    }
  }
  Generator init(0);
  ConvNeXt m(convnext_config("roadmap_00_resnet50"), init);
  EXPECT_EQ(m.num_parameters(), 25557032);
  m.load_state_dict(sd);
  const NamedTensors back = m.state_dict();
  ASSERT_EQ(back.size(), sd.size());
  for (size_t i = 0; i < sd.size(); ++i) {
    EXPECT_EQ(back[i].first, sd[i].first);
    if (sd[i].second.dtype() == DType::i64)
      EXPECT_EQ(back[i].second.to_vector<int64_t>(), sd[i].second.to_vector<int64_t>());
    else
      EXPECT_EQ(back[i].second.to_vector<float>(), sd[i].second.to_vector<float>()) << sd[i].first;
  }
}

// The knobs reach ResNeXt too: ResNet-50 with 32 groups in the 3x3 convs and hidden width
// dims / 2 is torchvision's resnext50_32x4d (25,028,904 parameters, 4.23 GFLOPs there).
TEST(Roadmap, GroupsAndExpansionGiveResNeXt50) {
  ConvNeXtConfig c = convnext_config("roadmap_00_resnet50");
  c.name = "resnext50_32x4d";
  c.groups = 32;
  c.expansion = 0.5;
  EXPECT_NO_THROW(c.validate());
  const ConvNeXt m(c, ConvNeXt::ShapesOnly{});
  EXPECT_EQ(m.num_parameters(), 25028904);
  EXPECT_NEAR(m.macs(224, 224) / 1e9, 4.23, 0.01);
  // The grouped conv's weight: (128, 128 / 32, 3, 3) in stage 1's first block.
  EXPECT_EQ(m.parameter("layer1.0.conv2.weight").official_shape, Shape({128, 4, 3, 3}));
  c.groups = 48;  // does not divide 128
  expect_error([&] { c.validate(); }, {"groups 48 must divide every hidden width"});
  c.groups = 32;
  c.expansion = 0.3;  // 256 * 0.3 is not whole
  expect_error([&] { c.validate(); }, {"must give whole hidden widths"});
}

// ---- golden forward and backward -------------------------------------------------------------

class RoadmapGolden : public ::testing::TestWithParam<std::string> {};

TEST_P(RoadmapGolden, ForwardBackwardBuffersAndEvalMatchPyTorch) {
  expect_roadmap_case_matches(load_roadmap_golden(GetParam()), Device::cpu(), GetParam());
}

INSTANTIATE_TEST_SUITE_P(Cases, RoadmapGolden, ::testing::ValuesIn(roadmap_golden_cases()));

// ---- step 11 is ConvNeXt-T -------------------------------------------------------------------

TEST(Roadmap, LastStepIsConvNeXtTiny) {
  ConvNeXtConfig step = convnext_config("roadmap_11_convnext_tiny");
  ConvNeXtConfig tiny = convnext_config("convnext_tiny");
  step.num_classes = tiny.num_classes = 10;
  Generator g1(3), g2(3);
  ConvNeXt a(step, g1), b(tiny, g2);
  ASSERT_EQ(a.num_parameters(), b.num_parameters());
  ASSERT_EQ(a.state_dict_shapes(), b.state_dict_shapes());
  // Weights far from init (layer scale 1, not 1e-6), loaded into both.
  Generator w(11);
  NamedTensors sd;
  for (const auto& [name, shape] : a.state_dict_shapes())
    sd.emplace_back(name, name.ends_with("gamma") ? Tensor::uniform(shape, w, 0.5, 1.5)
                                                  : Tensor::uniform(shape, w, -0.2, 0.2));
  a.load_state_dict(sd);
  b.load_state_dict(sd);
  NoGradGuard no_grad;
  Generator d(0);
  const Tensor x = Tensor::randn({2, 32, 32, 3}, w);
  EXPECT_EQ(a.forward(x, false, d).to_vector<float>(), b.forward(x, false, d).to_vector<float>());
}

// ---- BatchNorm at the model level ------------------------------------------------------------

ConvNeXtConfig small_step(const std::string& name) {
  ConvNeXtConfig c = convnext_config(name);
  c.num_classes = 5;
  c.depths = {2, 1, 1, 1};
  c.stem_width = 8;
  c.dims = c.block == BlockKind::bottleneck ? std::vector<int64_t>{16, 24, 32, 40}
                                            : std::vector<int64_t>{8, 16, 24, 32};
  return c;
}

TEST(Roadmap, BatchNormTrainUpdatesBuffersEvalDoesNot) {
  Generator g(0);
  ConvNeXt m(small_step("roadmap_00_resnet50"), g);
  ASSERT_TRUE(m.has_batch_norm());
  const Tensor x = Tensor::randn({3, 32, 32, 3}, g);
  auto buffers = [&] {
    std::vector<std::vector<double>> v;
    for (const auto& [name, t] : m.state_dict())
      if (name.find("running") != std::string::npos || name.ends_with("num_batches_tracked"))
        v.push_back(t.dtype() == DType::i64 ? std::vector<double>{double(t.to_vector<int64_t>()[0])}
                                            : values(t));
    return v;
  };
  const auto before = buffers();
  Generator d(0);
  {
    NoGradGuard no_grad;
    const Tensor e1 = m.forward(x, /*training=*/false, d);
    EXPECT_EQ(buffers(), before) << "eval mode must not touch the running statistics";
    const Tensor e2 = m.forward(x, false, d);
    EXPECT_EQ(e1.to_vector<float>(), e2.to_vector<float>());
  }
  m.forward(x, /*training=*/true, d);
  const auto after = buffers();
  ASSERT_EQ(after.size(), before.size());
  size_t changed = 0, counters = 0;
  for (size_t i = 0; i < after.size(); ++i) {
    if (after[i].size() == 1 && before[i].size() == 1 && after[i][0] == before[i][0] + 1) ++counters;
    changed += after[i] != before[i];
  }
  EXPECT_EQ(changed, after.size()) << "every running statistic and counter moves in training";
  EXPECT_EQ(counters * 3, after.size()) << "each BatchNorm counts one batch";
}

TEST(Roadmap, ResNetInitialisationIsTorchvisions) {
  Generator g(1);
  ConvNeXt m(convnext_config("roadmap_00_resnet50"), g);
  // conv1: (64, 3, 7, 7), kaiming normal, fan_out = 64 * 49.
  const std::vector<double> w = values(m.state_dict().front().second);
  double sq = 0;
  for (double v : w) sq += v * v;
  EXPECT_NEAR(std::sqrt(sq / w.size()), std::sqrt(2.0 / (64 * 49)), 0.05 * std::sqrt(2.0 / (64 * 49)));
  // fc: U(-1/sqrt(2048), 1/sqrt(2048)), the bias too.
  const Parameter& fc = m.parameter("fc.weight");
  double lo = 0, hi = 0;
  for (double v : values(fc.value)) lo = std::min(lo, v), hi = std::max(hi, v);
  EXPECT_LE(hi, 1 / std::sqrt(2048.0));
  EXPECT_GE(lo, -1 / std::sqrt(2048.0));
  EXPECT_GT(hi, 0.9 / std::sqrt(2048.0));
  for (const auto& [name, t] : m.state_dict()) {
    if (name.ends_with("running_var")) {
      EXPECT_EQ(values(t), std::vector<double>(t.numel(), 1.0)) << name;
    }
    if (name.ends_with("running_mean")) {
      EXPECT_EQ(values(t), std::vector<double>(t.numel(), 0.0)) << name;
    }
  }
  // No conv bias in a BatchNorm network; no gamma without layer scale.
  for (const Parameter& p : m.parameters()) {
    EXPECT_FALSE(p.name.starts_with("layer") && p.name.find(".conv") != std::string::npos &&
                 p.name.ends_with(".bias")) << p.name;
    EXPECT_FALSE(p.name.ends_with(".gamma")) << p.name;
  }
}

// ---- bad input -------------------------------------------------------------------------------

TEST(Roadmap, UnknownStepListsTheKnownOnes) {
  expect_error([] { convnext_config("roadmap_99_transformer"); },
               {"unknown model 'roadmap_99_transformer'", "roadmap_00_resnet50",
                "roadmap_06_kernel11", "roadmap_11_convnext_tiny", "convnext_tiny"});
}

TEST(Roadmap, BatchNormWithBatchOneSaysWhy) {
  Generator g(0);
  ConvNeXt m(small_step("roadmap_01_stage_ratio"), g);
  Generator d(0);
  // 32 x 32 reaches 1 x 1 in the last stage: one value per channel.
  expect_error([&] { m.forward(Tensor::randn({1, 32, 32, 3}, g), true, d); },
               {"BatchNorm in training mode needs more than one value per channel",
                "a batch of 1 image of 32x32 reaches a 1x1 map", "batch of at least 2"});
  NoGradGuard no_grad;
  EXPECT_NO_THROW(m.forward(Tensor::randn({1, 32, 32, 3}, g), false, d));  // eval is fine
  EXPECT_NO_THROW(m.forward(Tensor::randn({1, 64, 64, 3}, g), true, d));   // 2x2 at the end
}

TEST(Roadmap, WeightsOfAnotherStepAreRefusedNamingTheDifference) {
  Generator g(0);
  ConvNeXt five(small_step("roadmap_05_move_up_dwconv"), g);
  ConvNeXt nine(small_step("roadmap_09_fewer_norms"), g);
  expect_error([&] { nine.load_state_dict(five.state_dict()); },
               {"weights do not fit model", "unexpected", "layer1.0.bn2.weight"});
  ConvNeXt ten(small_step("roadmap_10_layer_norm"), g);
  expect_error([&] { ten.load_state_dict(nine.state_dict()); },
               {"missing", "layer1.0.ln1.weight", "unexpected", "layer1.0.bn1.running_mean"});
}

TEST(Roadmap, ConfigurationsRoundTripThroughJson) {
  for (const std::string& n : all_model_names()) {
    const ConvNeXtConfig c = convnext_config(n);
    const ConvNeXtConfig back = config_from_json(config_to_json(c));
    EXPECT_EQ(config_to_json(back), config_to_json(c)) << n;
  }
  expect_error([] { config_from_json(R"({"stem": "conv"})"); },
               {"unknown stem 'conv'", "patchify, resnet"});
  expect_error([] { config_from_json(R"({"depth": [1]})"); }, {"unknown key \"depth\""});
  expect_error([] { config_from_json(R"({"acts": "two"})"); }, {"acts must be \"all\" or \"one\""});
  ConvNeXtConfig bad = convnext_config("roadmap_07_gelu");
  bad.downsample_mode = Downsampling::separate;
  expect_error([&] { bad.validate(); }, {"separate downsampling layers come with ConvNeXt's"});
}

}  // namespace
