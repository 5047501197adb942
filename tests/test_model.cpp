// The ConvNeXt models: official names, shapes and parameter counts, initialisation, layout
// conversions, strict state-dict loading, and parity with PyTorch on golden data made by
// tools/make_golden.py (tests/data/golden/<case>/).
#include <gtest/gtest.h>

#include <cmath>
#include <numeric>
#include <set>

#include "autograd/function.h"
#include "models/convnext.h"
#include "models/grads.h"
#include "models/safetensors.h"
#include "tests/golden.h"
#include "tests/testing.h"

using namespace cnx;
using cnx::test::expect_error;

namespace {

// Parameter count of a hierarchical ConvNeXt, from the architecture (independent of the
// model code): stem conv + LN; per later stage LN + 2x2 conv; per block dwconv 7x7 (49C + C),
// LN (2C), pwconv1 (4C^2 + 4C), pwconv2 (4C^2 + C), gamma (C); final LN; head.
int64_t expected_count(const std::vector<int64_t>& depths, const std::vector<int64_t>& dims,
                       int64_t in_chans, int64_t classes) {
  int64_t n = in_chans * dims[0] * 16 + dims[0] + 2 * dims[0];
  for (size_t i = 1; i < dims.size(); ++i) n += 2 * dims[i - 1] + dims[i - 1] * dims[i] * 4 + dims[i];
  for (size_t i = 0; i < dims.size(); ++i) n += depths[i] * (8 * dims[i] * dims[i] + 58 * dims[i]);
  return n + 2 * dims.back() + dims.back() * classes + classes;
}

ConvNeXt build(const std::string& name, uint64_t seed = 0) {
  Generator g(seed);
  return ConvNeXt(convnext_config(name), g);
}

}  // namespace

TEST(ConvNeXtModel, TinyHasTheOfficialTensorsAndCount) {
  ConvNeXt m = build("convnext_tiny");
  EXPECT_EQ(m.parameters().size(), 182u);
  EXPECT_EQ(m.num_parameters(), 28589128);
  EXPECT_EQ(expected_count({3, 3, 9, 3}, {96, 192, 384, 768}, 3, 1000), 28589128);
  EXPECT_EQ(m.parameter("downsample_layers.0.0.weight").official_shape, Shape({96, 3, 4, 4}));
  EXPECT_EQ(m.parameter("downsample_layers.0.0.weight").value.shape(), Shape({96, 4, 4, 3}));
  EXPECT_EQ(m.parameter("downsample_layers.0.1.weight").official_shape, Shape({96}));
  EXPECT_EQ(m.parameter("downsample_layers.1.0.bias").official_shape, Shape({96}));
  EXPECT_EQ(m.parameter("downsample_layers.3.1.weight").official_shape, Shape({768, 384, 2, 2}));
  EXPECT_EQ(m.parameter("stages.0.0.dwconv.weight").official_shape, Shape({96, 1, 7, 7}));
  EXPECT_EQ(m.parameter("stages.0.0.dwconv.weight").value.shape(), Shape({7, 7, 96}));
  EXPECT_EQ(m.parameter("stages.0.0.pwconv1.weight").official_shape, Shape({384, 96}));
  EXPECT_EQ(m.parameter("stages.0.0.gamma").official_shape, Shape({96}));
  EXPECT_EQ(m.parameter("stages.2.8.pwconv2.weight").official_shape, Shape({384, 1536}));
  EXPECT_EQ(m.parameter("norm.weight").official_shape, Shape({768}));
  EXPECT_EQ(m.parameter("head.weight").official_shape, Shape({1000, 768}));
  EXPECT_EQ(m.parameters().front().name, "downsample_layers.0.0.weight");
  EXPECT_EQ(m.parameters().back().name, "head.bias");
  expect_error([&] { m.parameter("stages.4.0.gamma"); }, {"no parameter named 'stages.4.0.gamma'"});
  std::set<std::string> names;
  for (const Parameter& p : m.parameters()) {
    EXPECT_TRUE(names.insert(p.name).second) << "duplicate " << p.name;
    EXPECT_EQ(p.official_shape.numel(), p.value.numel()) << p.name;
  }
}

TEST(ConvNeXtModel, NamedVariantCounts) {
  struct V { const char* name; std::vector<int64_t> depths, dims; };
  for (const V& v : {V{"convnext_atto", {2, 2, 6, 2}, {40, 80, 160, 320}},
                     V{"convnext_femto", {2, 2, 6, 2}, {48, 96, 192, 384}},
                     V{"convnext_pico", {2, 2, 6, 2}, {64, 128, 256, 512}},
                     V{"convnext_nano", {2, 2, 8, 2}, {80, 160, 320, 640}}}) {
    ConvNeXt m = build(v.name);
    EXPECT_EQ(m.num_parameters(), expected_count(v.depths, v.dims, 3, 1000)) << v.name;
    EXPECT_EQ(m.config().depths, v.depths) << v.name;
  }
  // The bigger ones: configuration and the architecture's count (building them is slow or
  // costs gigabytes; tiny, built above, shares their structure).
  EXPECT_EQ(convnext_config("convnext_small").depths, (std::vector<int64_t>{3, 3, 27, 3}));
  EXPECT_EQ(convnext_config("convnext_small").dims, (std::vector<int64_t>{96, 192, 384, 768}));
  EXPECT_EQ(expected_count({3, 3, 27, 3}, {96, 192, 384, 768}, 3, 1000), 50223688);  // paper: 50M
  EXPECT_EQ(convnext_config("convnext_base").dims, (std::vector<int64_t>{128, 256, 512, 1024}));
  EXPECT_EQ(convnext_config("convnext_large").dims, (std::vector<int64_t>{192, 384, 768, 1536}));
  EXPECT_EQ(convnext_config("convnext_xlarge").dims, (std::vector<int64_t>{256, 512, 1024, 2048}));
  EXPECT_EQ(convnext_config("convnext_xlarge").depths, (std::vector<int64_t>{3, 3, 27, 3}));
  EXPECT_EQ(expected_count({3, 3, 27, 3}, {128, 256, 512, 1024}, 3, 1000), 88591464);  // 89M
  EXPECT_EQ(convnext_model_names().size(), 12u);
}

TEST(ConvNeXtModel, IsotropicSmallNamesAndCount) {
  ConvNeXt m = build("convnext_isotropic_small");
  // stem 384*3*16*16 + 384; per block 49*384 + 384 + 2*384 + (4*384*384 + 4*384) +
  // (4*384*384 + 384) = 1,201,536 (no gamma: layer scale is off); 18 blocks; norm 768;
  // head 384*1000 + 1000. Total 295,296 + 21,627,648 + 768 + 385,000 (the paper's 22M).
  EXPECT_EQ(m.num_parameters(), 22308712);
  EXPECT_EQ(m.parameters().size(), 2u + 18 * 8 + 4);
  EXPECT_EQ(m.parameter("stem.weight").official_shape, Shape({384, 3, 16, 16}));
  EXPECT_EQ(m.parameter("blocks.17.pwconv2.weight").official_shape, Shape({384, 1536}));
  expect_error([&] { m.parameter("blocks.0.gamma"); }, {"no parameter named"});
  EXPECT_EQ(convnext_config("convnext_isotropic_large").dims, std::vector<int64_t>{1024});
  EXPECT_EQ(convnext_config("convnext_isotropic_large").depths, std::vector<int64_t>{36});
  EXPECT_EQ(convnext_config("convnext_isotropic_base").dims, std::vector<int64_t>{768});
}

TEST(ConvNeXtModel, UnknownModelAndBadConfig) {
  expect_error([] { convnext_config("convnext_huge"); },
               {"unknown model 'convnext_huge'", "convnext_tiny", "convnext_isotropic_small"});
  ConvNeXtConfig c;
  c.dims = {8, 16};
  Generator g(0);
  expect_error([&] { ConvNeXt m(c, g); }, {"depths (3,3,9,3)", "dims (8,16)"});
  c = ConvNeXtConfig{};
  c.drop_path_rate = 1.0;
  expect_error([&] { ConvNeXt m(c, g); }, {"drop_path_rate", "[0, 1)"});
}

TEST(ConvNeXtModel, LayerScaleZeroMeansNoGamma) {
  ConvNeXtConfig c = convnext_config("convnext_atto");
  c.layer_scale_init_value = 0;
  Generator g(0);
  ConvNeXt m(c, g);
  for (const Parameter& p : m.parameters()) EXPECT_EQ(p.name.find("gamma"), std::string::npos);
  EXPECT_EQ(m.num_parameters(),
            expected_count({2, 2, 6, 2}, {40, 80, 160, 320}, 3, 1000) - (2 + 2 + 6 + 2) * 0 -
                (2 * 40 + 2 * 80 + 6 * 160 + 2 * 320));
}

TEST(ConvNeXtModel, OfficialInitialisation) {
  ConvNeXtConfig c = convnext_config("convnext_atto");
  c.head_init_scale = 0.5;
  Generator g(3);
  ConvNeXt m(c, g);
  for (const Parameter& p : m.parameters()) {
    const std::vector<float> v = p.value.to_vector<float>();
    const bool is_bias = p.name.ends_with(".bias");
    if (p.name.ends_with("gamma")) {
      for (float x : v) ASSERT_EQ(x, 1e-6f) << p.name;
    } else if (is_bias) {
      for (float x : v) ASSERT_EQ(x, 0.0f) << p.name;
    } else if (p.official_shape.rank() == 1) {  // LayerNorm weights
      for (float x : v) ASSERT_EQ(x, 1.0f) << p.name;
    } else if (p.official_shape.numel() >= 10000) {  // trunc normal std 0.02 (head: * 0.5)
      double s = 0, s2 = 0;
      for (float x : v) { s += x; s2 += double(x) * x; }
      const double n = static_cast<double>(v.size()), std = std::sqrt(s2 / n - (s / n) * (s / n));
      const double want = p.name == "head.weight" ? 0.01 : 0.02;
      EXPECT_NEAR(std, want, want * 0.05) << p.name;
      EXPECT_NEAR(s / n, 0.0, want * 0.05) << p.name;
    }
    EXPECT_TRUE(p.value.requires_grad()) << p.name;
    EXPECT_EQ(p.decay, p.official_shape.rank() > 1) << p.name;  // no decay: 1-D and biases
  }
  // Same seed, same weights; another seed, others.
  Generator g1(3), g2(4);
  ConvNeXt a(c, g1), b(c, g2);
  EXPECT_EQ(a.parameter("stages.2.1.pwconv1.weight").value.to_vector<float>(),
            m.parameter("stages.2.1.pwconv1.weight").value.to_vector<float>());
  EXPECT_NE(b.parameter("stages.2.1.pwconv1.weight").value.to_vector<float>(),
            m.parameter("stages.2.1.pwconv1.weight").value.to_vector<float>());
}

TEST(ConvNeXtModel, DropPathRatesRiseLinearly) {
  ConvNeXtConfig c = convnext_config("convnext_tiny");
  c.dims = {8, 8, 8, 8};  // the rates depend on the depths only
  c.drop_path_rate = 0.1;
  Generator g(0);
  const std::vector<double> r = ConvNeXt(c, g).drop_path_rates();
  ASSERT_EQ(r.size(), 18u);
  for (size_t i = 0; i < r.size(); ++i) EXPECT_NEAR(r[i], 0.1 * i / 17.0, 1e-15);
}

TEST(ConvNeXtModel, LayoutConversionsAreInversePermutations) {
  Generator g(0);
  // patchify: official (Co, Ci, k, k) element [o, c, p, q] is internal [o, p, q, c].
  Tensor off = Tensor::randn({5, 3, 2, 2}, g);
  Tensor in = from_official_layout(off, ParamLayout::patchify);
  ASSERT_EQ(in.shape(), Shape({5, 2, 2, 3}));
  const float* o = off.data<float>();
  const float* i = in.data<float>();
  EXPECT_EQ(o[((4 * 3 + 1) * 2 + 0) * 2 + 1], i[((4 * 2 + 0) * 2 + 1) * 3 + 1]);
  EXPECT_EQ(to_official_layout(in, ParamLayout::patchify).to_vector<float>(), off.to_vector<float>());
  // depthwise: official (C, 1, k, k) element [c, 0, p, q] is internal [p, q, c].
  Tensor dw = Tensor::randn({4, 1, 3, 3}, g);
  Tensor dwi = from_official_layout(dw, ParamLayout::depthwise);
  ASSERT_EQ(dwi.shape(), Shape({3, 3, 4}));
  EXPECT_EQ(dw.data<float>()[(2 * 3 + 1) * 3 + 0], dwi.data<float>()[(1 * 3 + 0) * 4 + 2]);
  EXPECT_EQ(to_official_layout(dwi, ParamLayout::depthwise).to_vector<float>(), dw.to_vector<float>());
  // images: (N, C, H, W) [n, c, h, w] is (N, H, W, C) [n, h, w, c].
  Tensor img = Tensor::randn({2, 3, 4, 5}, g);
  Tensor nhwc = nchw_to_nhwc(img);
  ASSERT_EQ(nhwc.shape(), Shape({2, 4, 5, 3}));
  EXPECT_EQ(img.data<float>()[((1 * 3 + 2) * 4 + 3) * 5 + 1], nhwc.data<float>()[((1 * 4 + 3) * 5 + 1) * 3 + 2]);
}

TEST(ConvNeXtModel, StateDictRoundTripAndStrictLoad) {
  ConvNeXt a = build("convnext_atto", 1), b = build("convnext_atto", 2);
  NamedTensors sd = a.state_dict();
  ASSERT_EQ(sd.size(), a.parameters().size());
  EXPECT_EQ(sd[0].second.shape(), Shape({40, 3, 4, 4}));  // official layout
  b.load_state_dict(sd);
  for (size_t i = 0; i < sd.size(); ++i)
    ASSERT_EQ(b.parameters()[i].value.to_vector<float>(), a.parameters()[i].value.to_vector<float>())
        << sd[i].first;

  // Everything wrong at once is reported at once, and the model is left as it was.
  NamedTensors bad = sd;
  const std::vector<float> before = b.parameters()[0].value.to_vector<float>();
  bad[0].second = Tensor::zeros({40, 3, 2, 2});  // wrong shape
  bad[1].first = "downsample_layers.0.0.bais";   // renamed: missing + unexpected
  bad.erase(bad.begin() + 5);                    // missing
  bad[10].second = Tensor::zeros(bad[10].second.shape(), DType::i64);  // not floating point
  expect_error([&] { b.load_state_dict(bad); },
               {"convnext_atto", "missing (2): downsample_layers.0.0.bias", "unexpected (1): downsample_layers.0.0.bais",
                "wrong shape (1): downsample_layers.0.0.weight [40, 3, 2, 2] (expected [40, 3, 4, 4])",
                "not floating point (1)"});
  EXPECT_EQ(b.parameters()[0].value.to_vector<float>(), before);
  // Other float dtypes are converted.
  NamedTensors f64 = sd;
  for (auto& [name, t] : f64) t = t.to(DType::f64);
  b.load_state_dict(f64);
  EXPECT_EQ(b.parameters()[3].value.to_vector<float>(), a.parameters()[3].value.to_vector<float>());
}

TEST(ConvNeXtModel, ForwardShapesForAwkwardSizes) {
  Generator g(0), d(0);
  ConvNeXtConfig c;
  c.depths = {1, 1, 1, 1};
  c.dims = {8, 8, 16, 16};
  c.num_classes = 3;
  ConvNeXt m(c, g);
  NoGradGuard no_grad;
  EXPECT_EQ(m.forward(Tensor::randn({2, 72, 72, 3}, g), false, d).shape(), Shape({2, 3}));
  EXPECT_EQ(m.forward(Tensor::randn({1, 37, 45, 3}, g), false, d).shape(), Shape({1, 3}));
  expect_error([&] { m.forward(Tensor::randn({1, 32, 32, 1}, g), false, d); },
               {"images f32[1, 32, 32, 1] cpu must be (N, H, W, 3)"});
  expect_error([&] { m.forward(Tensor::randn({1, 16, 16, 3}, g), false, d); },
               {"input 16x16 is too small for this model: the smallest is 32x32"});  // 16 -> 4 -> 2 -> 1 -> 0
}

TEST(ConvNeXtModel, DropPathOnlyInTraining) {
  ConvNeXtConfig c = convnext_config("convnext_atto");
  c.num_classes = 4;
  c.drop_path_rate = 0.5;
  c.layer_scale_init_value = 1.0;  // so a dropped branch changes the output visibly
  Generator g(0);
  ConvNeXt m(c, g);
  NoGradGuard no_grad;
  Tensor x = Tensor::randn({4, 32, 32, 3}, g);
  Generator d1(7), d2(7), d3(8);
  const auto eval1 = m.forward(x, false, d1).to_vector<float>();
  EXPECT_EQ(d1.offset(), 0u);  // evaluation draws nothing
  const auto eval2 = m.forward(x, false, d1).to_vector<float>();
  EXPECT_EQ(eval1, eval2);
  const auto t1 = m.forward(x, true, d2).to_vector<float>();
  EXPECT_GT(d2.offset(), 0u);
  EXPECT_NE(t1, eval1);
  Generator d2b(7);
  EXPECT_EQ(m.forward(x, true, d2b).to_vector<float>(), t1);  // same seed, same masks
  EXPECT_NE(m.forward(x, true, d3).to_vector<float>(), t1);
}

// draw_drop_scales draws what a training forward would, in its order: a forward given them is
// bitwise the forward that draws, gradients included, and the generator ends in the same place.
// (A captured CUDA training step reads its multipliers this way: train/trainer.cpp.)
TEST(ConvNeXtModel, PreDrawnDropScalesEqualTheForwardsOwnDraws) {
  ConvNeXtConfig c = convnext_config("convnext_atto");
  c.num_classes = 4;
  c.drop_path_rate = 0.5;
  c.layer_scale_init_value = 1.0;
  Generator g(0);
  ConvNeXt m(c, g);
  // atto's depths 2,2,6,2: the first block's rate is 0, so it draws nothing.
  EXPECT_EQ(m.drop_path_blocks(), 11);
  const Tensor x = Tensor::randn({5, 32, 32, 3}, g);
  auto run = [&](Generator& d, const Tensor* scales) {
    m.zero_grad();
    const Tensor logits = m.forward(x, true, d, DType::f32, nullptr, scales);
    sum(mul(logits, logits)).backward();
    std::vector<float> out = logits.to_vector<float>();
    for (const Parameter& p : m.parameters()) {
      const std::vector<float> gv = p.value.grad().to_vector<float>();
      out.insert(out.end(), gv.begin(), gv.end());
    }
    return out;
  };
  Generator drawing(11), ahead(11);
  const std::vector<float> drawn = run(drawing, nullptr);
  const Tensor scales = m.draw_drop_scales(5, ahead, DType::f32);
  ASSERT_EQ(scales.shape(), Shape({11, 5}));
  EXPECT_EQ(ahead.offset(), drawing.offset());
  const std::vector<float> sv = scales.to_vector<float>();
  EXPECT_TRUE(std::count(sv.begin(), sv.end(), 0.0f) > 0 && std::count(sv.begin(), sv.end(), 2.0f) > 0);
  Generator untouched(99);
  EXPECT_EQ(run(untouched, &scales), drawn);
  EXPECT_EQ(untouched.offset(), 0u);  // the forward read the scales, it drew nothing
  // Another draw gives another result (the scales are really used).
  const Tensor other = m.draw_drop_scales(5, ahead, DType::f32);
  EXPECT_NE(run(untouched, &other), drawn);
  // Wrong shapes and evaluation mode are refused.
  const Tensor short_scales = Tensor::ones({10, 5});
  expect_error([&] { m.forward(x, true, untouched, DType::f32, nullptr, &short_scales); }, {"drop_scales", "[11, 5]"});
  expect_error([&] { m.forward(x, false, untouched, DType::f32, nullptr, &scales); }, {"drop_scales", "for training"});
}

// ---- parity with PyTorch -----------------------------------------------------------------------

class Golden : public ::testing::TestWithParam<std::string> {};

TEST_P(Golden, ForwardAndBackwardMatchPyTorch) {
  const test::GoldenCase g = test::load_golden(GetParam());
  Generator init(0);
  ConvNeXt model(g.config, init);
  model.load_state_dict(g.weights.tensors);
  const GradsResult r = compute_grads(model, g.batch.find("images"), g.batch.find("labels"));
  test::expect_matches_golden(g, r, g.name);
}

INSTANTIATE_TEST_SUITE_P(Cases, Golden, ::testing::ValuesIn(test::kGoldenCases));

TEST(Grads, RejectsBadBatches) {
  ConvNeXtConfig c;
  c.depths = {1, 1};
  c.dims = {8, 16};
  c.num_classes = 5;
  Generator g(0);
  ConvNeXt m(c, g);
  const Tensor labels = Tensor::from_data<int64_t>({2}, std::vector<int64_t>{1, 4});
  expect_error([&] { compute_grads(m, Tensor::randn({2, 1, 16, 16}, g), labels); },
               {"have 1 channels; the model expects 3"});
  expect_error([&] { compute_grads(m, Tensor::randn({2, 3, 16, 16}, g, DType::f64), labels); },
               {"must be float32 (N, C, H, W)"});
  expect_error([&] { compute_grads(m, Tensor::randn({3, 3, 16, 16}, g), labels); },
               {"labels i64[2] cpu must be int64 (N) with N = 3"});
  expect_error([&] {
    compute_grads(m, Tensor::randn({2, 3, 16, 16}, g),
                  Tensor::from_data<int64_t>({2}, std::vector<int64_t>{1, 5}));
  }, {"label 5 is outside [0, 5)"});
}
