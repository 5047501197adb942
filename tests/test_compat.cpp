// Weights and sizes from elsewhere (issue 13, items 3 and 8): how the model and `convnext grads`
// meet a configuration too big to build, an input too small for the model, weights with timm's
// names or a training checkpoint's wrapper, and weights without layer scale. Each gets one line
// that names the size or the command that fixes it, before anything is allocated or written.
#include <gtest/gtest.h>
#include <sys/wait.h>

#include <chrono>
#include <cmath>
#include <filesystem>
#include <fstream>
#include <regex>
#include <sstream>

#include "autograd/function.h"
#include "models/convnext.h"
#include "models/grads.h"
#include "models/safetensors.h"
#include "models/state_dict.h"
#include "tests/golden.h"
#include "tests/testing.h"
#include "train/checkpoint.h"

using namespace cnx;
using test::error_of;
using test::expect_error;
namespace fs = std::filesystem;

namespace {


ConvNeXtConfig custom(std::vector<int64_t> depths, std::vector<int64_t> dims, int64_t classes = 10) {
  ConvNeXtConfig c;
  c.depths = std::move(depths);
  c.dims = std::move(dims);
  c.num_classes = classes;
  return c;
}

// timm's name (timm 0.6 and later) for an official hierarchical-ConvNeXt name, written from
// timm's convnext.py module tree (stem, stages.i.downsample, stages.i.blocks.j, head.norm/fc).
std::string timm_name(const std::string& official) {
  static const std::vector<std::pair<std::regex, std::string>> rules{
      {std::regex(R"(downsample_layers\.0\.(\d)\.(\w+))"), "stem.$1.$2"},
      {std::regex(R"(downsample_layers\.(\d+)\.(\d)\.(\w+))"), "stages.$1.downsample.$2.$3"},
      {std::regex(R"(stages\.(\d+)\.(\d+)\.dwconv\.(\w+))"), "stages.$1.blocks.$2.conv_dw.$3"},
      {std::regex(R"(stages\.(\d+)\.(\d+)\.pwconv(\d)\.(\w+))"), "stages.$1.blocks.$2.mlp.fc$3.$4"},
      {std::regex(R"(stages\.(\d+)\.(\d+)\.(norm\.\w+|gamma))"), "stages.$1.blocks.$2.$3"},
      {std::regex(R"(norm\.(\w+))"), "head.norm.$1"},
      {std::regex(R"(head\.(\w+))"), "head.fc.$1"},
  };
  for (const auto& [rx, replacement] : rules)
    if (std::regex_match(official, rx)) return std::regex_replace(official, rx, replacement);
  ADD_FAILURE() << "no timm name for " << official;
  return official;
}

// How many of `names` occur in `text`.
int count_names(const std::string& text, const NamedTensors& names) {
  int n = 0;
  for (const auto& [name, t] : names) n += text.find(name) != std::string::npos;
  return n;
}

}  // namespace

// ---- model size, before allocation (issue 13, item 3) ------------------------------------------

TEST(ModelSize, CountFromTheConfigMatchesTheBuiltModel) {
  std::vector<ConvNeXtConfig> configs{convnext_config("convnext_atto"), custom({2, 1, 2, 1}, {8, 16, 24, 32}),
                                      custom({1}, {12}), custom({1, 3}, {5, 7}, 1)};
  ConvNeXtConfig iso = convnext_config("convnext_isotropic_small");
  iso.depths = {2};
  iso.dims = {24};
  iso.in_chans = 1;
  configs.push_back(iso);
  ConvNeXtConfig with_gamma = iso;
  with_gamma.layer_scale_init_value = 0.5;
  configs.push_back(with_gamma);
  ConvNeXtConfig no_gamma = configs[1];
  no_gamma.layer_scale_init_value = 0;
  no_gamma.in_chans = 4;
  configs.push_back(no_gamma);
  for (const ConvNeXtConfig& c : configs) {
    Generator g(0);
    const ConvNeXt m(c, g);
    EXPECT_EQ(c.num_parameters(), m.num_parameters()) << c.name << " depths " << c.depths.size();
  }
}

TEST(ModelSize, CountsOfTheNamedModels) {
  // The published counts (torchvision's and timm's model cards), computed without building.
  EXPECT_EQ(convnext_config("convnext_tiny").num_parameters(), 28589128);
  EXPECT_EQ(convnext_config("convnext_small").num_parameters(), 50223688);
  EXPECT_EQ(convnext_config("convnext_base").num_parameters(), 88591464);
  EXPECT_EQ(convnext_config("convnext_large").num_parameters(), 197767336);
  EXPECT_EQ(convnext_config("convnext_xlarge").num_parameters(), 350196968);
  // timm's convnext_xxlarge (846.47M) is within the limit.
  const ConvNeXtConfig xxl = custom({3, 4, 30, 3}, {384, 768, 1536, 3072}, 1000);
  EXPECT_EQ(xxl.num_parameters(), 846471016);
  EXPECT_NO_THROW(xxl.validate());
  EXPECT_EQ(ConvNeXtConfig::kMaxParameters, int64_t{1} << 31);
}

TEST(ModelSize, TooBigIsRefusedBeforeAnythingIsAllocated) {
  Generator g(0);
  const auto start = std::chrono::steady_clock::now();
  // The issue's example: 1.0e12 parameters (4 TB), which used to grow memory until it ran out.
  const ConvNeXtConfig huge = custom({1, 1, 1, 100000000}, {8, 16, 24, 32});
  EXPECT_EQ(huge.num_parameters(), 1004800016042);
  expect_error([&] { ConvNeXt m(huge, g); },
               {"model custom: 1004800016042 parameters (depths 1,1,1,100000000, dims 8,16,24,32",
                "exceed the maximum of 2147483648 (2^31)"});
  EXPECT_LT(std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count(), 2.0);

  // Just above the limit: one block of width 16384 has 8 * 16384^2 + 57 * 16384 > 2^31.
  expect_error([&] { ConvNeXt m(custom({1}, {16384}), g); }, {"2149466122 parameters"});
  // Counts that overflow int64_t anywhere: in a block, in depth * block, in the head, the stem.
  EXPECT_EQ(custom({1}, {int64_t{1} << 31}).num_parameters(), -1);
  EXPECT_EQ(custom({1, int64_t{1} << 62}, {8, 8}).num_parameters(), -1);
  EXPECT_EQ(custom({1}, {8}, int64_t{1} << 61).num_parameters(), -1);
  ConvNeXtConfig wide_input = custom({1}, {8});
  wide_input.in_chans = int64_t{1} << 60;
  EXPECT_EQ(wide_input.num_parameters(), -1);
  expect_error([&] { ConvNeXt m(custom({1, int64_t{1} << 62}, {8, 8}), g); },
               {"more than 2^63 parameters", "depths 1,4611686018427387904"});
  expect_error([&] { ConvNeXt m(custom({1}, {8}, int64_t{1} << 61), g); },
               {"more than 2^63 parameters", "num_classes 2305843009213693952"});
}

TEST(ModelSize, NonPositiveSizesAndTooManyStages) {
  Generator g(0);
  expect_error([&] { ConvNeXt m(custom({2, 0, 2, 1}, {8, 16, 24, 32}), g); },
               {"depths must be positive, got 2,0,2,1"});
  expect_error([&] { ConvNeXt m(custom({2, -1}, {8, 16}), g); }, {"depths must be positive"});
  expect_error([&] { ConvNeXt m(custom({1, 1}, {8, 0}), g); }, {"dims must be positive, got 8,0"});
  expect_error([&] { ConvNeXt m(custom(std::vector<int64_t>(25, 1), std::vector<int64_t>(25, 1)), g); },
               {"25 stages: at most 24"});
  const ConvNeXtConfig deepest = custom(std::vector<int64_t>(24, 1), std::vector<int64_t>(24, 1));
  EXPECT_NO_THROW(deepest.validate());
  EXPECT_EQ(deepest.downsampling(), int64_t{1} << 25);
}

// ---- the smallest input ------------------------------------------------------------------------

TEST(InputSize, TheSmallestIsTheDownsamplingAndAnyLargerSizeWorks) {
  struct Case {
    ConvNeXtConfig config;
    int64_t smallest;
  };
  ConvNeXtConfig iso = convnext_config("convnext_isotropic_small");
  iso.depths = {1};
  iso.dims = {8};
  iso.num_classes = 3;
  const std::vector<Case> cases{{custom({1, 1, 1, 1}, {8, 8, 16, 16}, 3), 32},
                                {custom({1, 1}, {8, 8}, 3), 8},
                                {custom({1}, {8}, 3), 4},
                                {iso, 16}};
  for (const Case& c : cases) {
    Generator g(0), d(0);
    const ConvNeXt m(c.config, g);
    EXPECT_EQ(c.config.downsampling(), c.smallest);
    NoGradGuard no_grad;
    const int64_t s = c.smallest;
    // The smallest, and sizes that are not multiples of it (the remainder is dropped).
    for (auto [H, W] : std::vector<std::pair<int64_t, int64_t>>{{s, s}, {s + 1, 2 * s - 1}, {3 * s + 5, s}})
      EXPECT_EQ(m.forward(Tensor::randn({2, H, W, 3}, g), false, d).shape(), Shape({2, 3}))
          << H << "x" << W << " for downsampling " << s;
    const std::string want = "input " + std::to_string(s - 1) + "x" + std::to_string(2 * s) +
                             " is too small for this model: the smallest is " + std::to_string(s) +
                             "x" + std::to_string(s) + " (it downsamples by " + std::to_string(s) + ")";
    expect_error([&] { m.forward(Tensor::randn({1, s - 1, 2 * s, 3}, g), false, d); },
                 {"model " + c.config.name + ": " + want});
    expect_error([&] { m.forward(Tensor::randn({1, 2 * s, s - 1, 3}, g), false, d); },
                 {"is too small for this model: the smallest is"});
  }
}

TEST(InputSize, GradsRefusesATooSmallBatchWithTheSize) {
  Generator g(0);
  ConvNeXt m(custom({1, 1, 1, 1}, {8, 8, 16, 16}, 5), g);
  const Tensor labels = Tensor::from_data<int64_t>({2}, std::vector<int64_t>{1, 4});
  const std::string msg = error_of([&] { compute_grads(m, Tensor::randn({2, 3, 16, 31}, g), labels); });
  EXPECT_NE(msg.find("input 16x31 is too small for this model: the smallest is 32x32 (it downsamples by 32)"),
            std::string::npos) << msg;
  EXPECT_EQ(msg.find("patchify"), std::string::npos) << "internal layouts in: " << msg;
  EXPECT_EQ(compute_grads(m, Tensor::randn({2, 3, 32, 35}, g), labels).logits.shape(), Shape({2, 5}));
}

// ---- names from elsewhere ----------------------------------------------------------------------

TEST(ForeignNames, RecognisesTimmNames) {
  for (const char* name : {"stem.0.weight", "stem.1.bias", "stages.0.blocks.0.conv_dw.weight",
                           "stages.12.downsample.1.weight", "head.fc.weight", "head.norm.bias",
                           "norm_pre.weight"})
    EXPECT_TRUE(is_timm_convnext_name(name)) << name;
  for (const char* name : {"stem.weight", "stages.0.0.dwconv.weight", "downsample_layers.0.0.weight",
                           "head.weight", "norm.weight", "stages.x.blocks.0", "stages..blocks.0",
                           "blocks.0.dwconv.weight"})
    EXPECT_FALSE(is_timm_convnext_name(name)) << name;
}

TEST(ForeignNames, TimmNamedWeightsGetTheConverterCommand) {
  Generator g(0);
  ConvNeXt a(convnext_config("convnext_atto"), g), b(convnext_config("convnext_atto"), g);
  NamedTensors timm = a.state_dict();
  for (auto& [name, t] : timm) name = timm_name(name);
  ASSERT_EQ(timm[0].first, "stem.0.weight");
  const std::vector<float> before = b.parameters()[0].value.to_vector<float>();
  const std::string msg = error_of([&] { b.load_state_dict(timm); });
  const std::string n = std::to_string(timm.size());
  for (const std::string& part : std::vector<std::string>{
           "load_state_dict: weights do not fit model convnext_atto: these are timm's parameter names",
           "(" + n + " of " + n + " unexpected names, e.g. stem.0.weight, stem.0.bias, stem.1.weight; " + n + " of the model's names missing)",
           "convert the file to the official names: python3 tools/convert_checkpoint.py INPUT "
        "OUTPUT.safetensors"})
    EXPECT_NE(msg.find(part), std::string::npos) << "lacks '" << part << "': " << msg;
  EXPECT_EQ(msg.find('\n'), std::string::npos);
  EXPECT_EQ(count_names(msg, timm), 3) << "at most 3 names: " << msg;
  EXPECT_EQ(count_names(msg, a.state_dict()), 0) << "no list of missing names: " << msg;
  EXPECT_LT(msg.size(), 400u) << msg;
  EXPECT_EQ(b.parameters()[0].value.to_vector<float>(), before);
}

TEST(ForeignNames, WrappedWeightsGetTheConverterCommand) {
  Generator g(0);
  ConvNeXt a(convnext_config("convnext_atto"), g);
  // The official main.py's checkpoint {"model": state_dict, "optimizer": ...} flattened to names.
  NamedTensors wrapped = a.state_dict();
  for (auto& [name, t] : wrapped) name = "model." + name;
  wrapped.emplace_back("optimizer.state.0.exp_avg", Tensor::zeros({2}));
  std::string msg = error_of([&] { a.load_state_dict(wrapped); });
  const std::string n = std::to_string(wrapped.size() - 1);
  for (const std::string& part : std::vector<std::string>{
           "the names have an extra 'model.' prefix (" + n + " of " + std::to_string(wrapped.size()) +
            " unexpected names, e.g. model.downsample_layers.0.0.weight, "
            "model.downsample_layers.0.0.bias, model.downsample_layers.0.1.weight; " + n +
            " of the model's names missing): ",
        "a training checkpoint's state dict, not a weights file; convert it to a weights file with "
        "the official names: python3 tools/convert_checkpoint.py INPUT OUTPUT.safetensors"})
    EXPECT_NE(msg.find(part), std::string::npos) << "lacks '" << part << "': " << msg;
  EXPECT_LE(count_names(msg, wrapped), 3) << msg;

  // DistributedDataParallel's module. over timm's names.
  NamedTensors ddp = a.state_dict();
  for (auto& [name, t] : ddp) name = "module." + timm_name(name);
  msg = error_of([&] { a.load_state_dict(ddp); });
  EXPECT_NE(msg.find("an extra 'module.' prefix over timm's names (" + n + " of " + n +
                     " unexpected names, e.g. module.stem.0.weight"),
            std::string::npos) << msg;
  EXPECT_NE(msg.find("python3 tools/convert_checkpoint.py"), std::string::npos) << msg;
}

TEST(ForeignNames, OrdinaryMismatchesKeepTheirLists) {
  Generator g(0);
  ConvNeXt a(convnext_config("convnext_atto"), g);
  NamedTensors sd = a.state_dict();
  sd[1].first = "downsample_layers.0.0.bais";
  sd[0].second = Tensor::zeros({40, 3, 2, 2});
  const std::string msg = error_of([&] { a.load_state_dict(sd); });
  EXPECT_NE(msg.find("missing (1): downsample_layers.0.0.bias; unexpected (1): downsample_layers.0.0.bais; "
                     "wrong shape (1)"),
            std::string::npos) << msg;
  EXPECT_EQ(msg.find("convert_checkpoint"), std::string::npos) << msg;
  EXPECT_EQ(msg.find("layer_scale"), std::string::npos) << msg;
  EXPECT_EQ(msg.back(), ')') << "no trailing separator: " << msg;
  // A name misspelt within the naming's own components is no wrapper.
  sd = a.state_dict();
  sd[3].first = "stem.norm.bias";  // norm.bias is a real name, stem. is no prefix
  const std::string misspelt = error_of([&] { a.load_state_dict(sd); });
  EXPECT_NE(misspelt.find("missing (1): downsample_layers.0.1.bias; unexpected (1): stem.norm.bias"),
            std::string::npos) << misspelt;
  EXPECT_EQ(misspelt.find("convert_checkpoint"), std::string::npos) << misspelt;
}

TEST(ForeignNames, LayerScaleMismatchNamesTheSetting) {
  Generator g(0);
  ConvNeXtConfig with = convnext_config("convnext_atto"), without = with;
  without.layer_scale_init_value = 0;
  ConvNeXt a(with, g), b(without, g);
  std::string msg = error_of([&] { a.load_state_dict(b.state_dict()); });
  EXPECT_NE(msg.find("missing (12): stages.0.0.gamma"), std::string::npos) << msg;
  EXPECT_NE(msg.find("; the weights have no layer scale (no .gamma tensors): build the model with "
                     "layer_scale_init_value 0 (--layer_scale_init_value 0)"),
            std::string::npos) << msg;
  msg = error_of([&] { b.load_state_dict(a.state_dict()); });
  EXPECT_NE(msg.find("unexpected (12): stages.0.0.gamma"), std::string::npos) << msg;
  EXPECT_NE(msg.find("the weights have layer scale (.gamma tensors)"), std::string::npos) << msg;
  EXPECT_NE(msg.find("(--layer_scale_init_value 1e-6)"), std::string::npos) << msg;
}

// ---- convnext grads ----------------------------------------------------------------------------

namespace {

class GradsCompat : public ::testing::Test {
 protected:
  void SetUp() override {
    const auto* info = ::testing::UnitTest::GetInstance()->current_test_info();
    dir_ = fs::temp_directory_path() / (std::string("cnx_compat_") + info->name());
    fs::remove_all(dir_);
    fs::create_directories(dir_);
  }
  void TearDown() override { fs::remove_all(dir_); }

  std::string path(const std::string& name) const { return (dir_ / name).string(); }

  struct Result {
    int status;
    std::string err;
  };
  Result run(const std::string& args) const {
    const std::string err = path("stderr.txt");
    const std::string cmd = std::string(CNX_CLI) + " " + args + " 2>" + err + " >/dev/null";
    const int rc = std::system(cmd.c_str());
    std::ifstream f(err);
    std::stringstream s;
    s << f.rdbuf();
    return {WIFEXITED(rc) ? WEXITSTATUS(rc) : -1, s.str()};
  }
  // A failing run: the status, one line on stderr holding every part, no --out written.
  void expect_failure(const std::string& args, const std::vector<std::string>& parts) const {
    const Result r = run(args + " --out " + path("out.safetensors"));
    EXPECT_EQ(r.status, 1) << args << "\n" << r.err;
    EXPECT_EQ(std::count(r.err.begin(), r.err.end(), '\n'), 1) << "not one line: " << r.err;
    for (const std::string& part : parts)
      EXPECT_NE(r.err.find(part), std::string::npos) << "stderr lacks '" << part << "': " << r.err;
    EXPECT_FALSE(fs::exists(path("out.safetensors")));
  }

  static std::string golden(const std::string& file) {
    return test::golden_path("hierarchical_72", file);
  }
  // The golden case's model; its weights have layer scale (gamma).
  static constexpr const char* kModel = "grads --depths 2,1,2,1 --dims 8,16,24,32 --num_classes 10";

  fs::path dir_;
};

}  // namespace

TEST_F(GradsCompat, LayerScaleZeroRunsWeightsWithoutGamma) {
  // The same network twice: with every gamma 1 (an exact identity), and without gamma tensors.
  NamedTensors ones = read_safetensors(golden("weights.safetensors")).tensors, none;
  for (auto& [name, t] : ones) {
    if (name.ends_with(".gamma")) t = Tensor::ones(t.shape());
    else none.emplace_back(name, t);
  }
  ASSERT_EQ(none.size(), ones.size() - 6);  // one gamma per block: 2 + 1 + 2 + 1
  write_safetensors(path("ones.safetensors"), ones);
  write_safetensors(path("none.safetensors"), none);
  const std::string batch = " --batch " + golden("batch.safetensors");

  Result r = run(std::string(kModel) + " --weights " + path("ones.safetensors") + batch + " --out " +
                 path("with.safetensors"));
  ASSERT_EQ(r.status, 0) << r.err;
  r = run(std::string(kModel) + " --layer_scale_init_value 0 --weights " + path("none.safetensors") +
          batch + " --out " + path("without.safetensors"));
  ASSERT_EQ(r.status, 0) << r.err;
  const Safetensors with = read_safetensors(path("with.safetensors"));
  const Safetensors without = read_safetensors(path("without.safetensors"));
  EXPECT_EQ(without.tensors.size(), with.tensors.size() - 6);
  for (const auto& [name, t] : without.tensors) {
    const Tensor w = with.find(name);
    ASSERT_TRUE(w.defined()) << name;
    // x + 1 * h is x + h exactly, forward and backward; the loss is not at its init value.
    test::expect_close(name, test::values(t), test::values(w), 1e-6, 1e-5);
  }
  EXPECT_GT(std::abs(with.find("loss").item() - std::log(10.0)), 1e-3);

  // Without the flag the model has gamma, and the message says which setting to change.
  expect_failure(std::string(kModel) + " --weights " + path("none.safetensors") + batch,
                 {"convnext grads: load_state_dict: weights do not fit model custom: missing (6): "
                  "stages.0.0.gamma",
                  "(--layer_scale_init_value 0)"});
  expect_failure(std::string(kModel) + " --layer_scale_init_value -1 --weights " +
                     path("none.safetensors") + batch,
                 {"layer_scale_init_value must be >= 0, got -1"});
}

TEST_F(GradsCompat, ReadsTheWeightsOfATrainingCheckpoint) {
  // `convnext train`'s checkpoints hold model.*, ema.* and adamw.* tensors; grads takes model.*.
  NamedTensors ck;
  for (const auto& [name, t] : read_safetensors(golden("weights.safetensors")).tensors) {
    ck.emplace_back("model." + name, t);
    ck.emplace_back("ema." + name, Tensor::zeros(t.shape()));
  }
  ck.emplace_back("adamw.step", Tensor::zeros({1}));
  write_safetensors(path("checkpoint.safetensors"), ck, {{"format", kCheckpointFormat}});
  const Result r = run(std::string(kModel) + " --weights " + path("checkpoint.safetensors") +
                       " --batch " + golden("batch.safetensors") + " --out " + path("o.safetensors"));
  ASSERT_EQ(r.status, 0) << r.err;
  const Tensor want = read_safetensors(golden("expected.safetensors")).find("logits");
  double scale = 0;
  for (double v : test::values(want)) scale = std::max(scale, std::abs(v));
  test::expect_close("logits", test::values(read_safetensors(path("o.safetensors")).find("logits")),
                     test::values(want), 1e-4 * scale, 0);
}

TEST_F(GradsCompat, TooSmallImagesNameTheSmallestSize) {
  Generator g(0);
  write_safetensors(path("small.safetensors"),
                    {{"images", Tensor::randn({2, 3, 24, 40}, g)},
                     {"labels", Tensor::from_data<int64_t>({2}, std::vector<int64_t>{0, 1})}});
  expect_failure(std::string(kModel) + " --weights " + golden("weights.safetensors") + " --batch " +
                     path("small.safetensors"),
                 {"convnext grads: model custom: input 24x40 is too small for this model: the "
                  "smallest is 32x32 (it downsamples by 32)"});
}

TEST_F(GradsCompat, HugeDepthsAreRefusedAtOnce) {
  const auto start = std::chrono::steady_clock::now();
  expect_failure("grads --depths 1,1,1,100000000 --dims 8,16,24,32 --num_classes 10 --weights " +
                     golden("weights.safetensors") + " --batch " + golden("batch.safetensors"),
                 {"convnext grads: model custom: 1004800016042 parameters", "exceed the maximum of "
                  "2147483648 (2^31)"});
  EXPECT_LT(std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count(), 10.0);
}

TEST_F(GradsCompat, TimmNamedWeightsFileGetsTheConverterCommand) {
  NamedTensors timm = read_safetensors(golden("weights.safetensors")).tensors;
  for (auto& [name, t] : timm) name = timm_name(name);
  write_safetensors(path("timm.safetensors"), timm);
  expect_failure(std::string(kModel) + " --weights " + path("timm.safetensors") + " --batch " +
                     golden("batch.safetensors"),
                 {"convnext grads: load_state_dict: weights do not fit model custom: these are "
                  "timm's parameter names",
                  "python3 tools/convert_checkpoint.py INPUT OUTPUT.safetensors"});
}
