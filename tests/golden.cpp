#include "tests/golden.h"

#include <gtest/gtest.h>

#include <algorithm>
#include <filesystem>
#include <cmath>
#include <set>
#include <sstream>

#include "autograd/function.h"
#include "tests/testing.h"

namespace cnx::test {

std::string golden_path(const std::string& golden_case, const std::string& file) {
  return std::string(CNX_TEST_DATA_DIR) + "/golden/" + golden_case + "/" + file;
}

namespace {

// "2,1,2" -> {2, 1, 2}
std::vector<int64_t> ints(const std::string& s) {
  std::vector<int64_t> v;
  size_t start = 0;
  while (true) {
    const size_t comma = s.find(',', start);
    v.push_back(std::stoll(s.substr(start, comma - start)));
    if (comma == std::string::npos) return v;
    start = comma + 1;
  }
}

double max_abs(const std::vector<double>& v) {
  double m = 0;
  for (double x : v) m = std::max(m, std::abs(x));
  return m;
}

}  // namespace

GoldenCase load_golden(const std::string& golden_case) {
  GoldenCase g;
  g.name = golden_case;
  g.expected = read_safetensors(golden_path(golden_case, "expected.safetensors"));
  g.weights = read_safetensors(golden_path(golden_case, "weights.safetensors"));
  g.batch = read_safetensors(golden_path(golden_case, "batch.safetensors"));
  const auto& md = g.expected.metadata;
  ConvNeXtConfig& cfg = g.config;
  cfg.name = golden_case;
  cfg.in_chans = std::stoll(md.at("in_chans"));
  cfg.num_classes = std::stoll(md.at("num_classes"));
  cfg.isotropic = md.at("isotropic") == "1";
  cfg.depths = ints(md.at("depths"));
  cfg.dims = ints(md.at("dims"));
  cfg.layer_scale_init_value = cfg.isotropic ? 0.0 : 1e-6;
  return g;
}

void expect_matches_golden(const GoldenCase& g, const GradsResult& r, const std::string& what) {
  // Logits and loss within 1e-4 relative (to the largest |logit|, and to the loss).
  const std::vector<double> want_logits = values(g.expected.find("logits"));
  ASSERT_EQ(r.logits.shape(), g.expected.find("logits").shape()) << what;
  expect_close(what + " logits", values(r.logits), want_logits, 1e-4 * max_abs(want_logits), 0);
  const double want_loss = g.expected.find("loss").item();
  EXPECT_EQ(r.loss.shape(), Shape{}) << what;
  EXPECT_NEAR(r.loss.item(), want_loss, 1e-4 * std::abs(want_loss)) << what;

  // Gradients that are zero by construction (the fixture's metadata "zero_grads": e.g. the
  // bias of a BatchNorm whose output goes through a 1x1 conv into another training-mode
  // BatchNorm is removed by the second one's mean) must be zero to 1e-3 of the largest
  // gradient element of the whole model.
  std::set<std::string> zero_grads;
  if (auto it = g.expected.metadata.find("zero_grads"); it != g.expected.metadata.end()) {
    std::stringstream list(it->second);
    for (std::string name; std::getline(list, name, ',');)
      if (!name.empty()) zero_grads.insert(name);
  }
  double model_scale = 0;
  for (const auto& [name, t] : g.expected.tensors)
    if (name.rfind("grad.", 0) == 0) model_scale = std::max(model_scale, max_abs(values(t)));

  // Every other parameter gradient within 1e-3 of its largest element.
  size_t checked = 0;
  for (const auto& [name, grad] : r.grads) {
    const Tensor want = g.expected.find("grad." + name);
    ASSERT_TRUE(want.defined()) << what << ": golden data has no grad." << name;
    ASSERT_EQ(grad.shape(), want.shape()) << what << " " << name;
    const std::vector<double> w = values(want);
    ++checked;
    if (zero_grads.count(name)) {
      EXPECT_EQ(max_abs(w), 0) << what << " " << name << ": listed as zero by construction";
      expect_close(what + " grad." + name + " (zero by construction)", values(grad), w,
                   1e-3 * model_scale, 0);
      continue;
    }
    const double scale = max_abs(w);
    ASSERT_GT(scale, 0) << what << " " << name << ": an all-zero gradient proves nothing";
    expect_close(what + " grad." + name, values(grad), w, 1e-3 * scale, 0);
  }
  size_t golden_grads = 0;  // (roadmap fixtures also hold buffers and eval logits)
  for (const auto& [name, t] : g.expected.tensors) golden_grads += name.rfind("grad.", 0) == 0;
  EXPECT_EQ(checked, golden_grads) << what << ": every golden gradient compared";
}

std::vector<std::string> roadmap_golden_cases() {
  std::vector<std::string> v;
  for (const auto& e : std::filesystem::directory_iterator(std::string(CNX_TEST_DATA_DIR) + "/roadmap"))
    if (e.is_directory()) v.push_back(e.path().filename().string());
  std::sort(v.begin(), v.end());
  return v;
}

GoldenCase load_roadmap_golden(const std::string& name) {
  GoldenCase g;
  g.name = name;
  const std::string dir = std::string(CNX_TEST_DATA_DIR) + "/roadmap/" + name + "/";
  g.expected = read_safetensors(dir + "expected.safetensors");
  g.weights = read_safetensors(dir + "weights.safetensors");
  g.batch = read_safetensors(dir + "batch.safetensors");
  g.config = config_from_json(g.expected.metadata.at("config"));
  g.config.name = name;
  return g;
}

void expect_roadmap_case_matches(const GoldenCase& g, Device device, const std::string& what) {
  Generator init(0);
  ConvNeXt model(g.config, init);
  model.load_state_dict(g.weights.tensors);
  const GradsResult r =
      compute_grads(model, g.batch.find("images"), g.batch.find("labels"), device);
  expect_matches_golden(g, r, what);

  // The buffers after the training forward: running statistics and counters.
  size_t buffers = 0;
  for (const auto& [name, t] : model.state_dict()) {
    const Tensor want = g.expected.find("buffer." + name);
    if (!want.defined()) continue;
    ++buffers;
    if (want.dtype() == DType::i64)
      EXPECT_EQ(t.to_vector<int64_t>(), want.to_vector<int64_t>()) << what << " " << name;
    else
      expect_close(what + " " + name, values(t), values(want), 1e-5, 1e-5);
  }
  size_t golden_buffers = 0;
  for (const auto& [name, t] : g.expected.tensors) golden_buffers += name.rfind("buffer.", 0) == 0;
  EXPECT_EQ(buffers, golden_buffers) << what << ": every golden buffer compared";
  EXPECT_EQ(buffers > 0, model.has_batch_norm()) << what;

  // Eval mode with the updated running statistics.
  NoGradGuard no_grad;
  Generator unused(0);
  const Tensor x = nchw_to_nhwc(g.batch.find("images")).to(device);
  const Tensor eval_logits = model.forward(x, /*training=*/false, unused).to(Device::cpu());
  const std::vector<double> want = values(g.expected.find("eval_logits"));
  expect_close(what + " eval logits", values(eval_logits), want, 1e-4 * max_abs(want), 0);
}

}  // namespace cnx::test
