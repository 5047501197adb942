// The optimiser side of training: AdamW against a double-precision reference of its formula and
// against torch.optim.AdamW (tests/data/optim, made by tools/make_optim_reference.py), decay
// masks, lr scales, skipped parameters, checkpoint state; gradient-norm clipping; the official
// cosine schedule and numpy's linspace; the lr scaling rule; the EMA; and the official
// layer-wise lr decay ids for every parameter of convnext_tiny and convnext_small.
#include <gtest/gtest.h>
#include <omp.h>

#include <cmath>
#include <cstring>
#include <limits>
#include <map>
#include <numbers>
#include <sstream>

#include "models/convnext.h"
#include "models/safetensors.h"
#include "tests/testing.h"
#include "train/optim/adamw.h"
#include "train/optim/ema.h"
#include "train/optim/schedule.h"
#include "train/optim/step_status.h"

using namespace cnx;
using cnx::test::expect_close;
using cnx::test::expect_error;
using cnx::test::values;

namespace {

// ---- helpers -----------------------------------------------------------------------------------

const Safetensors& reference() {
  static const Safetensors file =
      read_safetensors(std::string(CNX_TEST_DATA_DIR) + "/optim/reference.safetensors");
  return file;
}

Tensor ref_tensor(const std::string& name) {
  Tensor t = reference().find(name);
  if (!t.defined()) ADD_FAILURE() << "reference.safetensors has no tensor " << name;
  return t;
}

std::vector<double> ref_values(const std::string& name) {
  const Tensor t = ref_tensor(name);
  if (!t.defined()) return {};
  if (t.dtype() == DType::i64) {
    std::vector<double> out;
    for (int64_t v : t.to_vector<int64_t>()) out.push_back(static_cast<double>(v));
    return out;
  }
  return values(t);
}

// A plain-layout parameter with an f32 value (requires_grad) holding `v`.
Parameter make_param(const std::string& name, const Shape& shape, const std::vector<double>& v,
                     bool decay) {
  Parameter p;
  p.name = name;
  p.official_shape = shape;
  p.value = test::make(shape, v, DType::f32);
  p.value.set_requires_grad(true);
  p.decay = decay;
  return p;
}

Tensor f32(const Shape& shape, const std::vector<double>& v) { return test::make(shape, v, DType::f32); }

std::vector<double> randv(int64_t n, uint64_t seed, double std = 1.0) {
  Generator g(seed);
  return test::randv(n, g, std);
}

// prefix + i (GCC 12 warns falsely, -Wrestrict, on "literal" + std::to_string(i)).
std::string numbered(const std::string& prefix, size_t i) {
  std::ostringstream s;
  s << prefix << i;
  return s.str();
}

int64_t i64_value(const Tensor& t) { return t.to_vector<int64_t>().at(0); }

Tensor find(const NamedTensors& tensors, const std::string& name) {
  for (const auto& [n, t] : tensors)
    if (n == name) return t;
  return {};
}

// A small hierarchical model: patchify and depthwise layouts, decayed and undecayed parameters.
ConvNeXtConfig small_config() {
  ConvNeXtConfig c;
  c.name = "optim_test";
  c.depths = {1, 2};
  c.dims = {8, 16};
  c.num_classes = 5;
  c.layer_scale_init_value = 0.5;
  return c;
}

// Random gradients on every parameter (internal layout), drawn from `seed`.
void random_grads(std::vector<Parameter>& params, uint64_t seed, double std = 0.1) {
  for (size_t i = 0; i < params.size(); ++i) {
    const Shape& s = params[i].value.shape();
    params[i].value.set_grad(f32(s, randv(s.numel(), seed * 1000 + i, std)));
  }
}

// ---- the AdamW formula in double -----------------------------------------------------------------

struct RefParam {
  std::vector<double> p, m, v;
  int64_t t = 0;
  bool decay;
  double lr_scale;
};

// One step of the formula in the brief / torch.optim.AdamW, in double.
void ref_adamw_step(RefParam& r, const std::vector<double>* g, double lr, double wd, double b1,
                    double b2, double eps) {
  if (!g) return;
  ++r.t;
  const double lr_p = lr * r.lr_scale, wd_p = r.decay ? wd : 0.0;
  const double bc1 = 1 - std::pow(b1, static_cast<double>(r.t));
  const double bc2 = 1 - std::pow(b2, static_cast<double>(r.t));
  for (size_t k = 0; k < r.p.size(); ++k) {
    r.p[k] *= 1 - lr_p * wd_p;
    r.m[k] = b1 * r.m[k] + (1 - b1) * (*g)[k];
    r.v[k] = b2 * r.v[k] + (1 - b2) * (*g)[k] * (*g)[k];
    r.p[k] -= (lr_p / bc1) * r.m[k] / (std::sqrt(r.v[k]) / std::sqrt(bc2) + eps);
  }
}

// =================================================================================================
// AdamW
// =================================================================================================

TEST(AdamW, MatchesDoublePrecisionFormulaOverSteps) {
  // A decayed matrix, an undecayed bias and an undecayed 1-D gamma with its own lr scale; the
  // lr and weight decay change every step (a zero weight decay included), and gradients of
  // different sizes so that eps and the bias corrections matter.
  struct Spec {
    const char* name;
    Shape shape;
    bool decay;
    double scale;
  };
  const std::vector<Spec> specs = {{"a.weight", {3, 5}, true, 1.0},
                                   {"a.bias", {3}, false, 1.0},
                                   {"c.gamma", {5}, false, 0.3}};
  const std::vector<double> lrs = {1e-3, 4e-3, 2e-3, 5e-4, 1e-2, 3e-3};
  const std::vector<double> wds = {0.05, 0.1, 0.0, 0.3, 0.05, 0.2};
  const std::vector<double> gstd = {1.0, 1e-3, 0.1, 10.0, 1e-2, 1.0};

  for (const auto& [b1, b2, eps] : std::vector<std::tuple<double, double, double>>{
           {0.9, 0.999, 1e-8}, {0.8, 0.95, 1e-3}}) {
    std::vector<Parameter> params;
    std::vector<RefParam> refs;
    std::vector<double> scales;
    for (size_t i = 0; i < specs.size(); ++i) {
      const auto init = randv(specs[i].shape.numel(), 10 + i);
      params.push_back(make_param(specs[i].name, specs[i].shape, init, specs[i].decay));
      const std::vector<double> zeros(init.size(), 0.0);
      refs.push_back({init, zeros, zeros, 0, specs[i].decay, specs[i].scale});
      scales.push_back(specs[i].scale);
    }
    AdamW opt(params, AdamWOptions{b1, b2, eps}, scales);
    for (size_t s = 0; s < lrs.size(); ++s) {
      for (size_t i = 0; i < params.size(); ++i) {
        const auto g = randv(specs[i].shape.numel(), 100 * s + i, gstd[s]);
        params[i].value.set_grad(f32(specs[i].shape, g));
        ref_adamw_step(refs[i], &g, lrs[s], wds[s], b1, b2, eps);
      }
      opt.step(lrs[s], wds[s]);
      for (size_t i = 0; i < params.size(); ++i) {
        std::ostringstream what;
        what << specs[i].name << " (betas " << b1 << ", " << b2 << ", eps " << eps << ") step " << s;
        // f32 storage rounds p, m and v every step (6e-8 relative each): a few 1e-7 after six
        // steps, against values of order 1.
        expect_close(what.str() + " param", values(params[i].value), refs[i].p, 1e-6, 1e-6);
        expect_close(what.str() + " m", values(opt.exp_avg(i)), refs[i].m, 1e-9, 1e-5);
        expect_close(what.str() + " v", values(opt.exp_avg_sq(i)), refs[i].v, 1e-12, 1e-5);
      }
    }
    EXPECT_EQ(opt.step_count(), static_cast<int64_t>(lrs.size()));
  }
}

TEST(AdamW, MatchesPyTorch) {
  // tools/make_optim_reference.py: torch.optim.AdamW, one group per tensor as the official
  // optim_factory + engine.py set them; "gamma" has no gradient on step 2, "late" none on step 0.
  struct Spec {
    const char* name;
    Shape shape;
    bool decay;
    double scale;
  };
  const std::vector<Spec> specs = {{"w", {4, 3}, true, 1.0},
                                   {"b", {4}, false, 1.0},
                                   {"conv", {2, 3, 2, 2}, true, 0.5},
                                   {"gamma", {3}, false, 0.25},
                                   {"late", {5, 7}, true, 1.0}};
  struct Case {
    const char* name;
    AdamWOptions options;
  };
  for (const Case& c : {Case{"default", {0.9, 0.999, 1e-8}}, Case{"custom", {0.8, 0.95, 1e-3}}}) {
    const std::string pre = std::string("adamw.") + c.name + ".";
    std::vector<Parameter> params;
    std::vector<double> scales;
    for (const Spec& s : specs) {
      params.push_back(make_param(s.name, s.shape, ref_values(pre + "init." + s.name), s.decay));
      scales.push_back(s.scale);
    }
    AdamW opt(params, c.options, scales);
    const auto lrs = ref_values(pre + "lr"), wds = ref_values(pre + "wd");
    ASSERT_EQ(lrs.size(), wds.size());
    ASSERT_FALSE(lrs.empty());
    for (size_t step = 0; step < lrs.size(); ++step) {
      for (Parameter& p : params) {
        const Tensor g = reference().find(pre + "grad." + std::to_string(step) + "." + p.name);
        p.value.set_grad(g.defined() ? g.clone() : Tensor());
      }
      opt.step(lrs[step], wds[step]);
      for (const Parameter& p : params)
        expect_close(pre + "param." + std::to_string(step) + "." + p.name, values(p.value),
                     ref_values(pre + "param." + std::to_string(step) + "." + p.name), 1e-7, 1e-6);
    }
    // The state, through state_dict(): m, v and PyTorch's per-parameter step counts.
    const NamedTensors state = opt.state_dict();
    EXPECT_EQ(i64_value(find(state, "adamw.step")), static_cast<int64_t>(lrs.size()));
    for (const Parameter& p : params) {
      expect_close(pre + "m." + p.name, values(find(state, "adamw.m." + p.name)),
                   ref_values(pre + "m." + p.name), 1e-9, 1e-6);
      expect_close(pre + "v." + p.name, values(find(state, "adamw.v." + p.name)),
                   ref_values(pre + "v." + p.name), 1e-12, 1e-6);
      EXPECT_EQ(i64_value(find(state, "adamw.step." + p.name)),
                i64_value(ref_tensor(pre + "step." + p.name)))
          << p.name;
    }
  }
}

TEST(AdamW, WeightDecayOnlyWhereTheModelSaysSo) {
  // With zero gradients m = v = 0 and the Adam term is exactly 0, so only the decoupled weight
  // decay moves a parameter: decayed ones become p * f32(1 - lr * wd), the others (1-D tensors
  // and biases, Parameter::decay false) stay bit for bit.
  Generator gen(1);
  ConvNeXt model(small_config(), gen);
  std::vector<Parameter>& params = model.parameters();
  int decayed = 0, undecayed = 0;
  for (Parameter& p : params) {
    EXPECT_EQ(p.decay, p.official_shape.rank() > 1 && !p.name.ends_with(".bias")) << p.name;
    (p.decay ? decayed : undecayed)++;
    p.value.set_grad(Tensor::zeros(p.value.shape()));
  }
  EXPECT_GT(decayed, 0);
  EXPECT_GT(undecayed, 0);
  std::vector<std::vector<float>> before;
  for (const Parameter& p : params) before.push_back(p.value.to_vector<float>());
  AdamW opt(params);
  const double lr = 0.1, wd = 0.5;
  opt.step(lr, wd);
  const float mul = static_cast<float>(1 - lr * wd);
  for (size_t i = 0; i < params.size(); ++i) {
    const auto after = params[i].value.to_vector<float>();
    bool same = true;
    for (size_t k = 0; k < after.size(); ++k)
      same &= after[k] == (params[i].decay ? before[i][k] * mul : before[i][k]);
    EXPECT_TRUE(same) << params[i].name << (params[i].decay ? " (decayed)" : " (not decayed)");
  }
}

TEST(AdamW, LrScalesScaleTheStep) {
  // On the first step m_hat / sqrt(v_hat) = g / |g| (up to eps), so p moves by -lr * scale *
  // sign(g): the lr scale of each parameter shows directly.
  const std::vector<double> scales = {1.0, 0.5, 0.125};
  std::vector<Parameter> params;
  for (size_t i = 0; i < scales.size(); ++i) {
    params.push_back(make_param(numbered("p", i), {6}, randv(6, 20 + i), false));
    params.back().value.set_grad(f32({6}, randv(6, 30 + i)));
  }
  std::vector<std::vector<double>> before, grads;
  for (const Parameter& p : params) {
    before.push_back(values(p.value));
    grads.push_back(values(p.value.grad()));
  }
  AdamW opt(params, {}, scales);
  EXPECT_EQ(opt.lr_scale(2), 0.125);
  const double lr = 0.01;
  opt.step(lr, 0.7);  // no parameter decays: wd must not matter
  for (size_t i = 0; i < params.size(); ++i) {
    std::vector<double> want;
    for (size_t k = 0; k < 6; ++k)
      want.push_back(before[i][k] - lr * scales[i] * (grads[i][k] > 0 ? 1 : -1));
    expect_close(params[i].name, values(params[i].value), want, 1e-7, 1e-6);
  }
}

TEST(AdamW, SkipsParametersWithoutGradient) {
  // No gradient: the parameter, its m, v and step count stay as they are (PyTorch skips it),
  // while the others update. Its first real update later uses t = 1, like a fresh optimiser.
  std::vector<Parameter> params = {make_param("a", {4}, randv(4, 1), true),
                                   make_param("b", {2, 3}, randv(6, 2), true)};
  const auto b_before = params[1].value.to_vector<float>();
  AdamW opt(params);
  params[0].value.set_grad(f32({4}, randv(4, 3)));
  opt.step(1e-2, 0.1);
  opt.step(1e-2, 0.1);
  EXPECT_EQ(opt.step_count(), 2);
  EXPECT_EQ(opt.param_step(0), 2);
  EXPECT_EQ(opt.param_step(1), 0);
  EXPECT_EQ(params[1].value.to_vector<float>(), b_before);
  for (double x : values(opt.exp_avg(1))) EXPECT_EQ(x, 0.0);
  for (double x : values(opt.exp_avg_sq(1))) EXPECT_EQ(x, 0.0);

  // Now b gets a gradient: its update is a first step, the same as a fresh optimiser's.
  const Tensor gb = f32({2, 3}, randv(6, 4));
  params[0].value.set_grad(Tensor());
  params[1].value.set_grad(gb);
  opt.step(3e-3, 0.2);
  EXPECT_EQ(opt.param_step(0), 2);
  EXPECT_EQ(opt.param_step(1), 1);
  std::vector<Parameter> fresh = {make_param("b", {2, 3}, randv(6, 2), true)};
  fresh[0].value.set_grad(gb);
  AdamW opt2(fresh);
  opt2.step(3e-3, 0.2);
  EXPECT_EQ(params[1].value.to_vector<float>(), fresh[0].value.to_vector<float>());
}

TEST(AdamW, StateDictRoundTripResumesExactly) {
  // Two optimisers on two copies of a model: one runs 4 steps; the other runs 2, saves its state
  // (through the safetensors bytes), a third optimiser loads it and runs the last 2. The
  // parameters and the state end bitwise equal. The model has patchify and depthwise layouts,
  // so the state is checked to be in the official ones.
  Generator g1(5), g2(5);
  ConvNeXt a(small_config(), g1), b(small_config(), g2);
  AdamW opt_a(a.parameters());
  {
    AdamW opt_b(b.parameters());
    for (int s = 0; s < 2; ++s) {
      random_grads(a.parameters(), s);
      random_grads(b.parameters(), s);
      opt_a.step(1e-3 * (s + 1), 0.05);
      opt_b.step(1e-3 * (s + 1), 0.05);
    }
    const NamedTensors state = opt_b.state_dict();
    for (const Parameter& p : b.parameters()) {
      EXPECT_EQ(find(state, "adamw.m." + p.name).shape(), p.official_shape) << p.name;
      EXPECT_EQ(find(state, "adamw.v." + p.name).shape(), p.official_shape) << p.name;
    }
    EXPECT_EQ(state.size(), 1 + 3 * b.parameters().size());
    EXPECT_EQ(state.front().first, "adamw.step");
    const std::string bytes = serialize_safetensors(state);
    AdamW opt_c(b.parameters());
    // Other tensors in the same checkpoint (the model's) are ignored.
    NamedTensors loaded = parse_safetensors(bytes, "state").tensors;
    for (auto& kv : b.state_dict()) loaded.push_back(kv);
    opt_c.load_state_dict(loaded);
    EXPECT_EQ(opt_c.step_count(), 2);
    for (int s = 2; s < 4; ++s) {
      random_grads(a.parameters(), s);
      random_grads(b.parameters(), s);
      opt_a.step(1e-3 * (s + 1), 0.05);
      opt_c.step(1e-3 * (s + 1), 0.05);
    }
    for (size_t i = 0; i < a.parameters().size(); ++i) {
      EXPECT_EQ(a.parameters()[i].value.to_vector<float>(), b.parameters()[i].value.to_vector<float>())
          << a.parameters()[i].name;
      EXPECT_EQ(opt_a.exp_avg(i).to_vector<float>(), opt_c.exp_avg(i).to_vector<float>());
      EXPECT_EQ(opt_a.exp_avg_sq(i).to_vector<float>(), opt_c.exp_avg_sq(i).to_vector<float>());
    }
    EXPECT_EQ(opt_c.step_count(), 4);
  }
}

TEST(AdamW, LoadStateDictRefusesWhatDoesNotFit) {
  std::vector<Parameter> params = {make_param("w", {2, 3}, randv(6, 1), true),
                                   make_param("b", {2}, randv(2, 2), false)};
  AdamW opt(params);
  params[0].value.set_grad(f32({2, 3}, randv(6, 3)));
  params[1].value.set_grad(f32({2}, randv(2, 4)));
  opt.step(1e-3, 0.05);
  const NamedTensors good = opt.state_dict();
  const auto m_before = opt.exp_avg(0).to_vector<float>();

  auto without = [&](const std::string& name) {
    NamedTensors t;
    for (const auto& kv : good)
      if (kv.first != name) t.push_back(kv);
    return t;
  };
  auto replaced = [&](const std::string& name, const Tensor& value) {
    NamedTensors t = good;
    for (auto& kv : t)
      if (kv.first == name) kv.second = value;
    return t;
  };
  expect_error([&] { opt.load_state_dict(without("adamw.v.b")); }, {"missing (1): adamw.v.b"});
  expect_error([&] { opt.load_state_dict(without("adamw.step")); }, {"missing", "adamw.step"});
  {
    NamedTensors t = good;
    t.emplace_back("adamw.m.extra", Tensor::zeros({1}));
    expect_error([&] { opt.load_state_dict(t); }, {"unexpected (1): adamw.m.extra"});
  }
  expect_error([&] { opt.load_state_dict(replaced("adamw.m.w", Tensor::zeros({3, 2}))); },
               {"wrong shape", "adamw.m.w [3, 2] (expected [2, 3])"});
  expect_error([&] { opt.load_state_dict(replaced("adamw.m.w", Tensor::zeros({2, 3}, DType::i64))); },
               {"wrong dtype", "adamw.m.w i64"});
  expect_error([&] { opt.load_state_dict(replaced("adamw.step.b", Tensor::zeros({}, DType::f32))); },
               {"wrong dtype", "adamw.step.b", "expected one integer"});
  expect_error(
      [&] {
        opt.load_state_dict(
            replaced("adamw.step", Tensor::from_data<int64_t>(Shape{}, std::vector<int64_t>{-1})));
      },
      {"negative step", "adamw.step = -1"});
  {
    NamedTensors t = good;
    t.push_back(good[1]);
    expect_error([&] { opt.load_state_dict(t); }, {"duplicate", good[1].first});
  }
  // Several problems in one message; nothing changed.
  {
    NamedTensors t = replaced("adamw.m.w", Tensor::zeros({7}));
    t.emplace_back("adamw.bogus", Tensor::zeros({1}));
    expect_error([&] { opt.load_state_dict(t); }, {"unexpected (1): adamw.bogus", "wrong shape (1): adamw.m.w"});
  }
  EXPECT_EQ(opt.exp_avg(0).to_vector<float>(), m_before);
  EXPECT_EQ(opt.step_count(), 1);
  // f64 moments and an i32 step are accepted (converted).
  NamedTensors converted = good;
  for (auto& [name, t] : converted) {
    if (name.starts_with("adamw.m.") || name.starts_with("adamw.v.")) t = t.to(DType::f64);
    if (name == "adamw.step") t = Tensor::from_data<int32_t>(Shape{}, std::vector<int32_t>{7});
  }
  opt.load_state_dict(converted);
  EXPECT_EQ(opt.step_count(), 7);
  EXPECT_EQ(opt.exp_avg(0).to_vector<float>(), m_before);
}

TEST(AdamW, RefusesBadInput) {
  std::vector<Parameter> params = {make_param("w", {2, 3}, randv(6, 1), true)};
  expect_error([&] { AdamW(params, {}, {1.0, 2.0}); }, {"AdamW", "2 lr scales for 1 parameters"});
  expect_error([&] { AdamW(params, {}, {-1.0}); }, {"lr scale of w"});
  expect_error([&] { AdamW(params, AdamWOptions{1.0, 0.999, 1e-8}); }, {"beta1"});
  expect_error([&] { AdamW(params, AdamWOptions{0.9, -0.1, 1e-8}); }, {"beta2"});
  expect_error([&] { AdamW(params, AdamWOptions{0.9, 0.999, -1}); }, {"eps"});
  {
    std::vector<Parameter> twice = {params[0], params[0]};
    expect_error([&] { AdamW{twice}; }, {"w appears twice"});
  }
  {
    std::vector<Parameter> f64 = {params[0]};
    f64[0].value = Tensor::zeros({2, 3}, DType::f64);
    expect_error([&] { AdamW{f64}; }, {"parameter w", "CPU f32", "f64[2, 3]"});
  }
  AdamW opt(params);
  expect_error([&] { opt.step(-1e-3, 0.0); }, {"lr must be finite and >= 0"});
  expect_error([&] { opt.step(1e-3, std::nan("")); }, {"weight_decay"});
  const auto before = params[0].value.to_vector<float>();
  params[0].value.impl()->grad = Tensor::zeros({3, 2});  // set_grad refuses this: force it
  expect_error([&] { opt.step(1e-3, 0.0); }, {"AdamW.step", "gradient of w has shape [3, 2]", "[2, 3]"});
  params[0].value.impl()->grad = Tensor::zeros({2, 3}, DType::f64);
  expect_error([&] { opt.step(1e-3, 0.0); }, {"gradient of w", "CPU f32"});
  EXPECT_EQ(params[0].value.to_vector<float>(), before);
  EXPECT_EQ(opt.step_count(), 0);
}

TEST(AdamW, SameResultForAnyThreadCount) {
  // Big enough for the OpenMP loops (and for several grad_norm chunks).
  const int64_t n = 300001;
  std::vector<std::vector<float>> results;
  std::vector<double> norms;
  const int saved = omp_get_max_threads();
  for (int threads : {1, 3}) {
    omp_set_num_threads(threads);
    std::vector<Parameter> params = {make_param("big", {n}, randv(n, 1), true)};
    params[0].value.set_grad(f32({n}, randv(n, 2)));
    norms.push_back(clip_grad_norm(params, 10.0));
    AdamW opt(params);
    opt.step(1e-3, 0.05);
    results.push_back(params[0].value.to_vector<float>());
  }
  omp_set_num_threads(saved);
  EXPECT_EQ(results[0], results[1]);
  EXPECT_EQ(norms[0], norms[1]);
}

// =================================================================================================
// Gradient-norm clipping
// =================================================================================================

TEST(GradNorm, EqualsTheDirectSumOfSquares) {
  // A parameter bigger than one summation chunk, one without gradient (left out), a small one.
  const int64_t big = 150000;
  std::vector<Parameter> params = {make_param("big", {big}, std::vector<double>(big, 0.0), true),
                                   make_param("none", {3}, {1, 2, 3}, true),
                                   make_param("small", {2, 2}, {0, 0, 0, 0}, true)};
  params[0].value.set_grad(f32({big}, randv(big, 7, 0.01)));
  params[2].value.set_grad(f32({2, 2}, {3, -4, 0.5, 12}));
  long double s = 0;
  for (int i : {0, 2})
    for (float x : params[i].value.grad().to_vector<float>()) s += static_cast<long double>(x) * x;
  const double want = std::sqrt(static_cast<double>(s));
  EXPECT_NEAR(grad_norm(params), want, 1e-14 * want);
  std::vector<Parameter> none = {params[1]};
  EXPECT_EQ(grad_norm(none), 0.0);
  EXPECT_EQ(grad_norm({}), 0.0);
}

TEST(GradNorm, ClipsOnlyAboveMaxNorm) {
  std::vector<Parameter> params = {make_param("a", {2, 2}, {0, 0, 0, 0}, true),
                                   make_param("b", {1}, {0}, false)};
  const std::vector<double> ga = {3, 4, 0, 0}, gb = {12};  // norm 13
  auto reset = [&] {
    params[0].value.set_grad(f32({2, 2}, ga));
    params[1].value.set_grad(f32({1}, gb));
  };
  // Above the norm, just above it, and "no clipping" (max_norm <= 0): the gradients stay bit
  // for bit.
  for (double max_norm : {20.0, 13.0 + 1e-3, 0.0, -1.0}) {
    reset();
    EXPECT_DOUBLE_EQ(clip_grad_norm(params, max_norm), 13.0) << max_norm;
    EXPECT_EQ(values(params[0].value.grad()), ga) << max_norm;
    EXPECT_EQ(values(params[1].value.grad()), gb) << max_norm;
  }
  // Below: scaled by max_norm / (norm + 1e-6), so the new norm is max_norm (to 1e-6 / 13).
  reset();
  EXPECT_DOUBLE_EQ(clip_grad_norm(params, 6.5), 13.0);
  const double coef = 6.5 / (13.0 + 1e-6);
  expect_close("clipped a", values(params[0].value.grad()), {3 * coef, 4 * coef, 0, 0}, 0, 1e-7);
  expect_close("clipped b", values(params[1].value.grad()), {12 * coef}, 0, 1e-7);
  EXPECT_NEAR(grad_norm(params), 6.5, 1e-6);
  // max_norm == norm: PyTorch's coef = max_norm / (norm + 1e-6) is just below 1 (in f32), and
  // PyTorch multiplies by it; so do we (the 1e-6 band where "norm > max_norm" would not).
  reset();
  clip_grad_norm(params, 13.0);
  const float coef32 = 13.0f / (13.0f + 1e-6f);
  ASSERT_LT(coef32, 1.0f);
  EXPECT_EQ(params[1].value.grad().to_vector<float>(), std::vector<float>{12.0f * coef32});
  EXPECT_NE(params[1].value.grad().to_vector<float>(), std::vector<float>{12.0f});
}

TEST(GradNorm, MatchesPyTorchClipGradNorm) {
  const std::vector<Shape> shapes = {{3, 4}, {5}, {2, 2, 2}};
  for (const std::string label : {"below", "above"}) {
    std::vector<Parameter> params;
    for (size_t i = 0; i < shapes.size(); ++i) {
      params.push_back(make_param(numbered("g", i), shapes[i],
                                  std::vector<double>(shapes[i].numel(), 0.0), true));
      params.back().value.set_grad(ref_tensor(numbered("clip.grad.", i)).clone());
    }
    const double max_norm = ref_values("clip." + label + ".max_norm").at(0);
    const double norm = clip_grad_norm(params, max_norm);
    // PyTorch sums in f32: its norm is good to f32 rounding, ours is the double one.
    EXPECT_NEAR(norm, ref_values("clip." + label + ".norm").at(0), 1e-6 * norm) << label;
    for (size_t i = 0; i < shapes.size(); ++i)
      expect_close("clip." + label + ".result." + std::to_string(i), values(params[i].value.grad()),
                   ref_values("clip." + label + ".result." + std::to_string(i)), 1e-8, 1e-6);
  }
}

// ---- the step status: the same decisions, readable later (train/optim/step_status.h) -------------

namespace {

std::vector<uint32_t> bits_of(const Tensor& t) {
  const std::vector<float> v = t.to_vector<float>();
  std::vector<uint32_t> out(v.size());
  std::memcpy(out.data(), v.data(), v.size() * sizeof(float));
  return out;
}

Tensor scalar_loss(double v) { return Tensor::full(Shape{}, v, DType::f32); }

}  // namespace

TEST(StepStatus, IsClipGradNormBitwiseWithTheNormCoefAndLoss) {
  // Every way clip_grad_norm can go: clipped, not clipped, no clipping asked for.
  for (double max_norm : {0.05, 1e6, 0.0}) {
    SCOPED_TRACE("max_norm " + std::to_string(max_norm));
    Generator init(5);
    ConvNeXt a(small_config(), init);
    Generator init2(5);
    ConvNeXt b(small_config(), init2);
    std::vector<Parameter> pa = a.parameters(), pb = b.parameters();
    random_grads(pa, 3);
    random_grads(pb, 3);
    const double norm = clip_grad_norm(pa, max_norm);
    const StepStatus st = clip_grad_norm_status(pb, max_norm, scalar_loss(1.25));
    for (size_t i = 0; i < pa.size(); ++i)
      ASSERT_EQ(bits_of(pb[i].value.grad()), bits_of(pa[i].value.grad())) << pa[i].name;
    EXPECT_TRUE(st.values.device().is_cpu());
    EXPECT_EQ(st.values.shape(), Shape{4});
    EXPECT_EQ(st.norm(), static_cast<double>(static_cast<float>(norm)));
    // PyTorch's clip_coef in f32; 1 when it is not applied.
    const float coef = static_cast<float>(max_norm) / (static_cast<float>(norm) + 1e-6f);
    EXPECT_EQ(st.coef(), max_norm > 0 && coef < 1.0f ? coef : 1.0f);
    EXPECT_EQ(st.coef() < 1.0, max_norm == 0.05);  // the small max_norm clips, the others do not
    EXPECT_FALSE(st.skipped());
    EXPECT_EQ(st.loss(), 1.25);
    EXPECT_EQ(*(st.skip_flag() - 2), static_cast<float>(st.norm()));  // skip_flag is values[2]
    EXPECT_EQ(*st.skip_flag(), 0.0f);
  }
  // No loss: NaN in values[3], and it does not decide anything.
  std::vector<Parameter> params = {make_param("a", {2}, {0, 0}, true)};
  params[0].value.set_grad(f32({2}, {3, 4}));
  const StepStatus st = clip_grad_norm_status(params, 1.0, Tensor());
  EXPECT_TRUE(std::isnan(st.loss()));
  EXPECT_FALSE(st.skipped());
  EXPECT_EQ(st.norm(), 5.0);
  EXPECT_EQ(st.coef(), 1.0f / (5.0f + 1e-6f));
}

TEST(StepStatus, SkipsANonFiniteGradientOrLossAndTouchesNothing) {
  const float nan = std::numeric_limits<float>::quiet_NaN();
  const float inf = std::numeric_limits<float>::infinity();
  struct Case {
    const char* what;
    float grad, loss;
  };
  for (const Case c : {Case{"NaN gradient", nan, 1.0f}, Case{"Inf gradient", -inf, 1.0f},
                       Case{"NaN loss", 0.5f, nan}, Case{"Inf loss", 0.5f, inf}}) {
    SCOPED_TRACE(c.what);
    std::vector<Parameter> params = {make_param("a", {3}, {1, 2, 3}, true),
                                     make_param("b", {2}, {4, 5}, false)};
    params[0].value.set_grad(f32({3}, {0.5, -0.25, 2.0}));
    params[1].value.set_grad(Tensor::from_data<float>(Shape{2}, std::vector<float>{c.grad, 1.0f}));
    const auto ga = bits_of(params[0].value.grad()), gb = bits_of(params[1].value.grad());
    const StepStatus st = clip_grad_norm_status(params, 1e-3, scalar_loss(c.loss));  // would clip
    EXPECT_TRUE(st.skipped());
    EXPECT_EQ(st.coef(), 1.0);
    EXPECT_EQ(bits_of(params[0].value.grad()), ga);  // not scaled
    EXPECT_EQ(bits_of(params[1].value.grad()), gb);
    EXPECT_EQ(std::isfinite(st.norm()), std::isfinite(c.grad));
  }
}

TEST(StepStatus, RefusesAMisshapenLossOrStatus) {
  std::vector<Parameter> params = {make_param("a", {2}, {0, 0}, true)};
  params[0].value.set_grad(f32({2}, {3, 4}));
  expect_error([&] { clip_grad_norm_status(params, 1.0, f32({2}, {1, 2})); },
               {"clip_grad_norm_status", "the loss must be one number", "[2]"});
  expect_error([&] { clip_grad_norm_status(params, 1.0, test::make({}, {1}, DType::f64)); },
               {"clip_grad_norm_status: the loss", "must be an f32 tensor"});
  AdamW opt(params);
  StepStatus bad;
  bad.values = f32({3}, {0, 1, 0});
  expect_error([&] { opt.step(1e-3, 0.0, &bad); }, {"AdamW.step", "step status", "f32 [4]"});
  ModelEma ema(params);
  expect_error([&] { ema.update(params, &bad); }, {"ModelEma.update", "step status"});
  EXPECT_EQ(opt.step_count(), 0);  // refused before counting
}

// A run with a skipped step, taken back with uncount_step, continues bitwise as one that never saw
// it: parameters, moments, step counts (also of a parameter without a gradient on the bad step)
// and the EMA.
TEST(AdamW, SkippedStepChangesNothingAndUncountStepRestoresTheCounts) {
  Generator init(8);
  ConvNeXt ma(small_config(), init);
  Generator init2(8);
  ConvNeXt mb(small_config(), init2);
  std::vector<Parameter> a = ma.parameters(), b = mb.parameters();
  AdamW opt_a(a), opt_b(b);
  ModelEma ema_a(a, 0.9), ema_b(b, 0.9);
  auto step = [](std::vector<Parameter>& ps, AdamW& opt, ModelEma& ema, uint64_t seed,
                 double loss, size_t without) {
    random_grads(ps, seed);
    if (without < ps.size()) ps[without].value.set_grad(Tensor());
    const StepStatus st = clip_grad_norm_status(ps, 0.5, scalar_loss(loss));
    opt.step(1e-2, 0.05, &st);
    ema.update(ps, &st);
    return st;
  };
  auto state = [](const std::vector<Parameter>& ps, const AdamW& opt, const ModelEma& ema) {
    std::vector<std::vector<uint32_t>> out;
    for (size_t i = 0; i < ps.size(); ++i) {
      out.push_back(bits_of(ps[i].value));
      out.push_back(bits_of(opt.exp_avg(i)));
      out.push_back(bits_of(opt.exp_avg_sq(i)));
      out.push_back(bits_of(ema.parameters()[i].value));
      out.push_back({static_cast<uint32_t>(opt.param_step(i))});
    }
    out.push_back({static_cast<uint32_t>(opt.step_count())});
    return out;
  };

  step(a, opt_a, ema_a, 1, 2.0, 3);  // parameter 3 without a gradient on the first step
  step(b, opt_b, ema_b, 1, 2.0, 3);
  const auto before = state(a, opt_a, ema_a);
  // The bad step: a NaN loss, parameter 5 without a gradient.
  const StepStatus bad = step(a, opt_a, ema_a, 2, std::nan(""), 5);
  ASSERT_TRUE(bad.skipped());
  EXPECT_EQ(opt_a.step_count(), 2);  // counted on the host, as on a CUDA device
  EXPECT_EQ(opt_a.param_step(3), 1);  // no gradient on step 1, counted on the bad step
  EXPECT_EQ(opt_a.param_step(5), 1);  // counted on step 1, no gradient on the bad step
  opt_a.uncount_step();
  EXPECT_EQ(state(a, opt_a, ema_a), before);
  EXPECT_EQ(opt_a.param_step(3), 0);
  EXPECT_EQ(opt_a.param_step(5), 1);
  expect_error([&] { opt_a.uncount_step(); }, {"AdamW.uncount_step", "no step to undo"});

  for (uint64_t seed : {3, 4}) {
    step(a, opt_a, ema_a, seed, 1.0, 99);
    step(b, opt_b, ema_b, seed, 1.0, 99);
  }
  EXPECT_EQ(state(a, opt_a, ema_a), state(b, opt_b, ema_b));

  // A status that does not skip changes nothing about the update: bitwise step(lr, wd).
  random_grads(a, 6);
  random_grads(b, 6);
  const StepStatus ok = clip_grad_norm_status(a, 0.0, Tensor());
  opt_a.step(1e-2, 0.05, &ok);
  opt_b.step(1e-2, 0.05);
  ema_a.update(a, &ok);
  ema_b.update(b);
  EXPECT_EQ(state(a, opt_a, ema_a), state(b, opt_b, ema_b));
}

TEST(AdamW, UncountStepRefusesWhenThereIsNothingToUndo) {
  std::vector<Parameter> params = {make_param("a", {2}, {1, 2}, true)};
  AdamW opt(params);
  expect_error([&] { opt.uncount_step(); }, {"AdamW.uncount_step", "no step to undo"});
  params[0].value.set_grad(f32({2}, {1, 1}));
  opt.step(1e-3, 0.0);
  const NamedTensors saved = opt.state_dict();
  opt.step(1e-3, 0.0);
  opt.load_state_dict(saved);  // the last step's counts are not the loaded state's
  expect_error([&] { opt.uncount_step(); }, {"AdamW.uncount_step", "no step to undo"});
  EXPECT_EQ(opt.step_count(), 1);
}

// =================================================================================================
// Schedules
// =================================================================================================

TEST(Schedule, LinspaceIsNumpys) {
  // Bit for bit against numpy.linspace (the fixture) and the rule it follows.
  const std::vector<std::tuple<std::string, double, double, int64_t>> cases = {
      {"a", 0.0, 4e-3, 7}, {"b", 1e-6, 3e-3, 1000}, {"c", 0.3, 0.3, 5},
      {"d", 2.0, -1.0, 1}, {"e", -1.5, 2.25, 2},    {"f", 0.1, 0.7, 3},
      {"g", 1e-6, 1.0, 8}, {"h", 1e-5, 0.05, 4}};
  for (const auto& [name, start, stop, num] : cases) {
    const auto got = linspace(start, stop, num);
    EXPECT_EQ(got, ref_values("linspace." + name)) << name;
    ASSERT_EQ(static_cast<int64_t>(got.size()), num);
    const double step = (stop - start) / static_cast<double>(num - 1);
    for (int64_t i = 0; i + 1 < num; ++i) EXPECT_EQ(got[i], static_cast<double>(i) * step + start);
  }
  EXPECT_EQ(linspace(0.0, 1.0, 1), std::vector<double>{0.0});  // num 1: start, not stop
  EXPECT_TRUE(linspace(0.0, 1.0, 0).empty());
  EXPECT_EQ(linspace(1e-6, 3e-3, 1000).back(), 3e-3);
  // Where i * step + start misses stop, numpy (and we) end exactly at stop.
  EXPECT_NE(7 * ((1.0 - 1e-6) / 7) + 1e-6, 1.0);
  EXPECT_EQ(linspace(1e-6, 1.0, 8).back(), 1.0);
  expect_error([] { linspace(0, 1, -1); }, {"linspace", "-1"});
}

TEST(Schedule, CosineAtChosenIterations) {
  // base 4e-3, final 1e-6, 6 epochs of 7 iterations, 2 warmup epochs from 0: 14 warmup values.
  const double base = 4e-3, final_ = 1e-6;
  const auto s = cosine_scheduler(base, final_, 6, 7, 2);
  ASSERT_EQ(s.size(), 42u);
  EXPECT_EQ(s[0], 0.0);                                  // the first warmup value
  EXPECT_EQ(s[1], 1 * (base / 13) + 0.0);               // linspace(0, base, 14)[1]
  EXPECT_EQ(s[13], base);                                // the last warmup value is base
  const auto cosine = [&](int64_t i, int64_t n) {
    return final_ + 0.5 * (base - final_) * (1 + std::cos(std::numbers::pi * i / n));
  };
  EXPECT_EQ(s[14], cosine(0, 28));                       // the first cosine value
  EXPECT_NEAR(s[14], base, 1e-18);
  EXPECT_EQ(s[20], cosine(6, 28));
  EXPECT_EQ(s[41], cosine(27, 28));                      // the last: not quite final
  EXPECT_GT(s[41], final_);
  EXPECT_EQ(s, ref_values("sched.a"));
}

TEST(Schedule, WarmupStepsOverrideWarmupEpochs) {
  // warmup_steps 7 > 0 replaces warmup_epochs 1 (5 iterations); warmup from 1e-5.
  const auto s = cosine_scheduler(1e-3, 1e-5, 4, 5, 1, 1e-5, 7);
  ASSERT_EQ(s.size(), 20u);
  EXPECT_EQ(s[0], 1e-5);
  EXPECT_EQ(s[6], 1e-3);
  EXPECT_EQ(s[7], 1e-5 + 0.5 * (1e-3 - 1e-5) * (1 + std::cos(0.0)));
  EXPECT_EQ(s, ref_values("sched.b"));
  // warmup_steps without warmup_epochs (the official function trips its assertion): a warmup of
  // warmup_steps iterations all the same.
  const auto t = cosine_scheduler(1e-3, 1e-5, 4, 5, 0, 1e-5, 7);
  EXPECT_EQ(t, s);
  // A one-step warmup is linspace(start, base, 1) = [start], as in the official code.
  const auto e = cosine_scheduler(2e-3, 1e-6, 3, 4, 1, 0, 1);
  EXPECT_EQ(e[0], 0.0);
  EXPECT_EQ(e[1], 2e-3);
  EXPECT_EQ(e, ref_values("sched.e"));
}

TEST(Schedule, NoWarmupAndConstant) {
  const auto c = cosine_scheduler(1.0, 0.1, 3, 5);
  ASSERT_EQ(c.size(), 15u);
  EXPECT_EQ(c[0], 1.0);
  EXPECT_EQ(c[14], 0.1 + 0.5 * (1.0 - 0.1) * (1 + std::cos(std::numbers::pi * 14 / 15)));
  EXPECT_EQ(c, ref_values("sched.c"));
  // The weight decay schedule with weight_decay_end = weight_decay: constant.
  const auto d = cosine_scheduler(0.05, 0.05, 3, 4);
  for (double x : d) EXPECT_EQ(x, 0.05);
  EXPECT_EQ(d, ref_values("sched.d"));
}

TEST(Schedule, MatchesTheOfficialFunction) {
  // A long schedule (100 epochs of 37, 20 warmup) and one that is all warmup, bit for bit.
  EXPECT_EQ(cosine_scheduler(4e-3, 1e-6, 100, 37, 20), ref_values("sched.f"));
  EXPECT_EQ(cosine_scheduler(5e-4, 2e-6, 5, 3, 5, 1e-6), ref_values("sched.g"));
  // The warmup ends exactly at base_value (linspace's end fix matters for this one).
  const auto h = cosine_scheduler(0.05, 1e-4, 3, 2, 2, 1e-5);
  EXPECT_EQ(h[3], 0.05);
  EXPECT_EQ(h, ref_values("sched.h"));
}

TEST(Schedule, RefusesImpossibleCounts) {
  EXPECT_TRUE(cosine_scheduler(1, 0, 0, 10).empty());
  expect_error([] { cosine_scheduler(1, 0, 2, 3, 3); }, {"9 warmup iterations", "6 iterations"});
  expect_error([] { cosine_scheduler(1, 0, 2, 3, 0, 0, 7); }, {"7 warmup iterations"});
  expect_error([] { cosine_scheduler(1, 0, -1, 3); }, {"cosine_scheduler", "-1"});
}

TEST(LrScaling, LinearInTheTotalBatch) {
  const ScaledValue v = scale_lr_linear(4e-3, 128);
  EXPECT_DOUBLE_EQ(v.value, 1.25e-4);
  EXPECT_EQ(v.description, "lr 4e-03 for batch 4096 -> 1.25e-04 for batch 128 (linear scaling)");
  EXPECT_EQ(scale_lr_linear(4e-3, 4096).value, 4e-3);
  const ScaledValue m = scale_lr_linear(1e-6, 8192, 4096, "min_lr");
  EXPECT_DOUBLE_EQ(m.value, 2e-6);
  EXPECT_EQ(m.description, "min_lr 1e-06 for batch 4096 -> 2e-06 for batch 8192 (linear scaling)");
  expect_error([] { scale_lr_linear(1e-3, 0); }, {"batch sizes must be > 0"});
  expect_error([] { scale_lr_linear(-1e-3, 64); }, {"lr must be finite and >= 0"});
}

// =================================================================================================
// EMA
// =================================================================================================

TEST(Ema, FollowsTheFormulaAndTimm) {
  // The fixture: timm ModelEma's update in float32 torch, decay 0.9, 4 updates.
  const double decay = 0.9;
  const std::vector<Shape> shapes = {{3, 2}, {4}};
  std::vector<Parameter> params;
  std::vector<std::vector<double>> want;
  for (size_t i = 0; i < shapes.size(); ++i) {
    params.push_back(make_param(numbered("t", i), shapes[i],
                                ref_values(numbered("ema.init.", i)), i == 0));
    want.push_back(ref_values(numbered("ema.init.", i)));
  }
  ModelEma ema(params, decay);
  EXPECT_EQ(ema.decay(), decay);
  for (int step = 0; step < 4; ++step) {
    for (size_t i = 0; i < shapes.size(); ++i) {
      const std::string key = std::to_string(step) + "." + std::to_string(i);
      params[i].value.copy_from(ref_tensor("ema.param." + key));
      const auto p = values(params[i].value);
      for (size_t k = 0; k < p.size(); ++k) want[i][k] = decay * want[i][k] + (1 - decay) * p[k];
    }
    ema.update(params);
    for (size_t i = 0; i < shapes.size(); ++i) {
      const std::string key = std::to_string(step) + "." + std::to_string(i);
      expect_close("ema formula " + key, values(ema.parameters()[i].value), want[i], 1e-7, 1e-6);
      expect_close("ema timm " + key, values(ema.parameters()[i].value),
                   ref_values("ema.avg." + key), 1e-7, 1e-6);
    }
  }
  // The averages are copies: changing the model does not change them until update().
  const auto before = values(ema.parameters()[0].value);
  params[0].value.fill_(100.0);
  EXPECT_EQ(values(ema.parameters()[0].value), before);
  EXPECT_FALSE(ema.parameters()[0].value.requires_grad());
}

TEST(Ema, IntoAnEvaluationModelAndCheckpoints) {
  Generator g1(3), g2(4);
  ConvNeXt model(small_config(), g1), eval_model(small_config(), g2);
  ModelEma ema(model.parameters(), 0.5);
  AdamW opt(model.parameters());
  for (int s = 0; s < 3; ++s) {
    random_grads(model.parameters(), s);
    opt.step(1e-2, 0.05);
    ema.update(model.parameters());
  }
  // copy_to a second model: its parameters are the averages.
  ema.copy_to(eval_model.parameters());
  for (size_t i = 0; i < model.parameters().size(); ++i)
    EXPECT_EQ(eval_model.parameters()[i].value.to_vector<float>(),
              ema.parameters()[i].value.to_vector<float>())
        << model.parameters()[i].name;
  // model_state_dict() is what ConvNeXt::load_state_dict takes; it equals the eval model's.
  const NamedTensors official = ema.model_state_dict();
  const NamedTensors eval_sd = eval_model.state_dict();
  ASSERT_EQ(official.size(), eval_sd.size());
  for (size_t i = 0; i < official.size(); ++i) {
    EXPECT_EQ(official[i].first, eval_sd[i].first);
    EXPECT_EQ(official[i].second.shape(), eval_sd[i].second.shape());
    EXPECT_EQ(official[i].second.to_vector<float>(), eval_sd[i].second.to_vector<float>());
  }
  Generator g3(9);
  ConvNeXt third(small_config(), g3);
  third.load_state_dict(official);
  EXPECT_EQ(third.parameters()[0].value.to_vector<float>(), ema.parameters()[0].value.to_vector<float>());

  // state_dict: "ema.<name>", official shapes; a fresh EMA loads it (other names ignored).
  const NamedTensors state = ema.state_dict();
  for (size_t i = 0; i < state.size(); ++i) {
    EXPECT_EQ(state[i].first, "ema." + model.parameters()[i].name);
    EXPECT_EQ(state[i].second.shape(), model.parameters()[i].official_shape);
  }
  ModelEma fresh(eval_model.parameters(), 0.5);
  NamedTensors file = parse_safetensors(serialize_safetensors(state), "ema").tensors;
  for (auto& kv : opt.state_dict()) file.push_back(kv);
  fresh.load_state_dict(file);
  for (size_t i = 0; i < state.size(); ++i)
    EXPECT_EQ(fresh.parameters()[i].value.to_vector<float>(), ema.parameters()[i].value.to_vector<float>());

  // Refusals: nothing changes.
  NamedTensors bad = state;
  bad.pop_back();
  bad[0].second = Tensor::zeros({1});
  bad.emplace_back("ema.nope", Tensor::zeros({1}));
  const auto before = fresh.parameters()[0].value.to_vector<float>();
  expect_error([&] { fresh.load_state_dict(bad); },
               {"ModelEma.load_state_dict", "missing (1): " + state.back().first,
                "unexpected (1): ema.nope", "wrong shape (1): " + state[0].first});
  EXPECT_EQ(fresh.parameters()[0].value.to_vector<float>(), before);
  std::vector<Parameter> fewer(model.parameters().begin(), model.parameters().end() - 1);
  expect_error([&] { ema.update(fewer); }, {"ModelEma.update", "parameters, the EMA has"});
  std::vector<Parameter> renamed = model.parameters();
  renamed[1].name = "other";
  expect_error([&] { ema.copy_to(renamed); }, {"ModelEma.copy_to", "parameter 1 is other"});
  expect_error([&] { ModelEma(model.parameters(), 1.5); }, {"decay must be in [0, 1]"});
}

// =================================================================================================
// Layer-wise lr decay
// =================================================================================================

TEST(LayerDecay, OfficialIdsSpotChecks) {
  EXPECT_EQ(convnext_layer_id("downsample_layers.0.0.weight"), 0);
  EXPECT_EQ(convnext_layer_id("downsample_layers.0.1.bias"), 0);
  EXPECT_EQ(convnext_layer_id("downsample_layers.1.0.weight"), 2);
  EXPECT_EQ(convnext_layer_id("downsample_layers.2.1.weight"), 3);
  EXPECT_EQ(convnext_layer_id("downsample_layers.3.1.bias"), 12);
  EXPECT_EQ(convnext_layer_id("stages.0.2.dwconv.weight"), 1);
  EXPECT_EQ(convnext_layer_id("stages.1.0.gamma"), 2);
  EXPECT_EQ(convnext_layer_id("stages.2.0.pwconv1.weight"), 3);
  EXPECT_EQ(convnext_layer_id("stages.2.2.norm.bias"), 3);
  EXPECT_EQ(convnext_layer_id("stages.2.3.norm.bias"), 4);
  EXPECT_EQ(convnext_layer_id("stages.2.8.pwconv2.bias"), 5);
  EXPECT_EQ(convnext_layer_id("stages.2.26.gamma"), 11);
  EXPECT_EQ(convnext_layer_id("stages.3.0.dwconv.bias"), 12);
  EXPECT_EQ(convnext_layer_id("norm.weight"), 13);
  EXPECT_EQ(convnext_layer_id("head.bias"), 13);
  expect_error([] { convnext_layer_id("stages.4.0.gamma"); }, {"stages.4.0.gamma", "stages 0..3"});
  expect_error([] { convnext_layer_id("stages.2.27.gamma"); }, {"at most 27 blocks"});
  expect_error([] { convnext_layer_id("stages.x.0.gamma"); }, {"stages.x.0.gamma", "no index"});
  expect_error([] { convnext_layer_id("downsample_layers"); }, {"no index"});
}

TEST(LayerDecay, EveryParameterOfTinyAndSmallMatchesTheOfficialFunction) {
  // The fixture: the official get_num_layer_for_convnext, the weight-decay rule of
  // get_parameter_groups and LayerDecayValueAssigner's scales (layer decay 0.8), for each
  // parameter of the PyTorch model in named_parameters() order. The C++ models are built with
  // the official depths; the widths do not change the names, so they are kept small for speed.
  for (const std::string name : {"convnext_tiny", "convnext_small"}) {
    ConvNeXtConfig c = convnext_config(name);
    c.dims = {4, 8, 8, 8};
    c.num_classes = 5;
    Generator gen(0);
    ConvNeXt model(c, gen);
    const auto& params = model.parameters();
    std::vector<std::string> ref_names;
    {
      std::stringstream ss(reference().metadata.at("layers." + name + ".names"));
      for (std::string s; std::getline(ss, s, ',');) ref_names.push_back(s);
    }
    const auto ids = ref_values("layers." + name + ".id");
    const auto decay = ref_values("layers." + name + ".decay");
    const auto scales = ref_values("layers." + name + ".scale");
    ASSERT_EQ(params.size(), ref_names.size()) << name;
    const auto got_scales = layer_decay_lr_scales(c, params, 0.8);
    for (size_t i = 0; i < params.size(); ++i) {
      EXPECT_EQ(params[i].name, ref_names[i]) << name << " parameter " << i;
      EXPECT_EQ(layer_decay_layer_id(c, params[i].name), ids[i]) << params[i].name;
      EXPECT_EQ(params[i].decay, decay[i] == 1) << params[i].name;
      EXPECT_EQ(got_scales[i], scales[i]) << params[i].name;  // the same pow(): bit for bit
    }
    EXPECT_EQ(layer_decay_num_layers(c), 12);
  }
}

TEST(LayerDecay, ConvNeXtTinyCountsPerLayerId) {
  // convnext_tiny: 4 parameters per downsample layer, 9 per block (dwconv, norm, pwconv1,
  // pwconv2 weight and bias, gamma). Id 0: the stem; 1: stage 0; 2: downsample 1 + stage 1;
  // 3, 4, 5: downsample 2 + stage 2 blocks 0-2, blocks 3-5, blocks 6-8; 12: downsample 3 +
  // stage 3; 13: norm and head. Ids 6..11 are used only by the 27-block models. The widths do
  // not change the names: small ones keep the test fast (the full model takes seconds to build).
  ConvNeXtConfig c = convnext_config("convnext_tiny");
  c.dims = {4, 8, 8, 8};
  Generator gen(0);
  ConvNeXt model(c, gen);
  std::map<int, int> count;
  for (const Parameter& p : model.parameters()) count[layer_decay_layer_id(c, p.name)]++;
  const std::map<int, int> want = {{0, 4}, {1, 27}, {2, 31}, {3, 31}, {4, 27}, {5, 27}, {12, 31}, {13, 4}};
  EXPECT_EQ(count, want);
  EXPECT_EQ(model.parameters().size(), 182u);
  // Scales: layer_decay^(13 - id); 1 for the head; 1 everywhere without decay.
  const auto scales = layer_decay_lr_scales(c, model.parameters(), 0.7);
  for (size_t i = 0; i < scales.size(); ++i)
    EXPECT_EQ(scales[i], std::pow(0.7, 13 - layer_decay_layer_id(c, model.parameters()[i].name)));
  EXPECT_EQ(scales.front(), std::pow(0.7, 13));
  EXPECT_EQ(scales.back(), 1.0);
  for (double s : layer_decay_lr_scales(c, model.parameters(), 1.0)) EXPECT_EQ(s, 1.0);
  expect_error([&] { layer_decay_lr_scales(c, model.parameters(), 0.0); }, {"layer decay", "> 0"});
}

TEST(LayerDecay, IsotropicFollowsBeitsRule) {
  // Not in the official repository (see adamw.h): stem 0, blocks.j j + 1, norm and head depth + 1.
  ConvNeXtConfig c = convnext_config("convnext_isotropic_small");
  c.dims = {8};
  c.num_classes = 5;
  Generator gen(0);
  ConvNeXt model(c, gen);
  EXPECT_EQ(layer_decay_num_layers(c), 18);
  EXPECT_EQ(layer_decay_layer_id(c, "stem.weight"), 0);
  EXPECT_EQ(layer_decay_layer_id(c, "blocks.0.dwconv.weight"), 1);
  EXPECT_EQ(layer_decay_layer_id(c, "blocks.17.pwconv2.bias"), 18);
  EXPECT_EQ(layer_decay_layer_id(c, "norm.weight"), 19);
  EXPECT_EQ(layer_decay_layer_id(c, "head.weight"), 19);
  const auto scales = layer_decay_lr_scales(c, model.parameters(), 0.9);
  for (size_t i = 0; i < scales.size(); ++i) {
    const std::string& n = model.parameters()[i].name;
    const int id = n.starts_with("stem.") ? 0
                   : n.starts_with("blocks.") ? std::stoi(n.substr(7)) + 1
                                              : 19;
    EXPECT_EQ(scales[i], std::pow(0.9, 19 - id)) << n;
  }
}

}  // namespace
