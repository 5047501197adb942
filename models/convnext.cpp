#include "models/convnext.h"

#include <algorithm>
#include <array>
#include <cstdlib>
#include <cstring>
#include <initializer_list>
#include <map>
#include <set>

#include "autograd/function.h"
#include "autograd/ops.h"
#include "models/state_dict.h"

namespace cnx {

namespace {
constexpr double kLayerNormEps = 1e-6;

// Whether a block on CUDA runs its depthwise conv and LayerNorm as one fused op
// (dwconv_layer_norm: one kernel, y stays in shared memory). On unless the environment sets
// CNX_FUSE_DWCONV_LN=0, which selects the two ops, so that a benchmark or a cost model can
// compare the two. Read once per process. The CPU always runs the two ops (the fused op's CPU
// path is the same two reference ops, so there is nothing to gain).
bool fuse_dwconv_layer_norm() {
  static const bool on = [] {
    const char* v = std::getenv("CNX_FUSE_DWCONV_LN");
    return v == nullptr || std::strcmp(v, "0") != 0;
  }();
  return on;
}
constexpr double kInitStd = 0.02;

std::string join(const std::vector<int64_t>& v) {
  std::string s;
  for (size_t i = 0; i < v.size(); ++i) {
    if (i) s += ',';
    s += std::to_string(v[i]);
  }
  return s;
}
}  // namespace

// ---- configurations ----------------------------------------------------------------------------

void ConvNeXtConfig::validate() const {
  const std::string what = "model " + name + ": ";
  CNX_CHECK(in_chans > 0, what, "in_chans must be positive, got ", in_chans);
  CNX_CHECK(num_classes > 0, what, "num_classes must be positive, got ", num_classes);
  CNX_CHECK(!depths.empty() && depths.size() == dims.size(), what, "depths (", join(depths),
            ") and dims (", join(dims), ") need the same, non-zero number of stages");
  CNX_CHECK(!isotropic || depths.size() == 1, what, "an isotropic model has one stage, got ",
            depths.size());
  for (size_t i = 0; i < depths.size(); ++i) {
    CNX_CHECK(depths[i] > 0, what, "depths must be positive, got ", join(depths));
    CNX_CHECK(dims[i] > 0, what, "dims must be positive, got ", join(dims));
  }
  CNX_CHECK(isotropic || depths.size() <= kMaxStages, what, depths.size(),
            " stages: at most ", kMaxStages, " (each one halves the input)");
  CNX_CHECK(drop_path_rate >= 0 && drop_path_rate < 1, what, "drop_path_rate must be in [0, 1), got ",
            drop_path_rate);
  CNX_CHECK(layer_scale_init_value >= 0, what, "layer_scale_init_value must be >= 0, got ",
            layer_scale_init_value);
  // Before anything is allocated: a typo like --depths 1,1,1,100000000 must not grow memory
  // until the machine gives up.
  const int64_t n = num_parameters();
  CNX_CHECK(n >= 0 && n <= kMaxParameters, what,
            n < 0 ? std::string("more than 2^63") : std::to_string(n), " parameters (depths ",
            join(depths), ", dims ", join(dims), ", in_chans ", in_chans, ", num_classes ",
            num_classes, ") exceed the maximum of ", kMaxParameters, " (2^31)");
}

namespace {
// A sum of products in int64_t that remembers whether anything overflowed.
class CheckedCount {
 public:
  // Adds the product of the factors.
  void add(std::initializer_list<int64_t> factors) {
    int64_t product = 1;
    for (int64_t f : factors) overflow_ = overflow_ || __builtin_mul_overflow(product, f, &product);
    overflow_ = overflow_ || __builtin_add_overflow(n_, product, &n_);
  }
  int64_t value() const { return overflow_ ? -1 : n_; }

 private:
  int64_t n_ = 0;
  bool overflow_ = false;
};
}  // namespace

int64_t ConvNeXtConfig::num_parameters() const {
  // The parameters the constructor adds, in the same order (see there for the shapes).
  CheckedCount n;
  const size_t S = dims.size();
  if (isotropic) {
    n.add({dims[0], in_chans, 16, 16});  // stem conv
    n.add({dims[0]});
  } else {
    n.add({dims[0], in_chans, 4, 4});  // stem conv
    n.add({dims[0]});
    n.add({2, dims[0]});  // its LayerNorm
    for (size_t i = 1; i < S; ++i) {
      n.add({2, dims[i - 1]});             // LayerNorm
      n.add({dims[i], dims[i - 1], 2, 2});  // 2x2/2 conv
      n.add({dims[i]});
    }
  }
  for (size_t i = 0; i < S; ++i) {
    const int64_t C = dims[i];
    CheckedCount block;
    if (layer_scale_init_value > 0) block.add({C});  // gamma
    block.add({C, 7, 7});                            // dwconv
    block.add({C});
    block.add({2, C});                               // LayerNorm
    block.add({4, C, C});                            // pwconv1
    block.add({4, C});
    block.add({C, 4, C});                            // pwconv2
    block.add({C});
    if (block.value() < 0) return -1;
    n.add({depths[i], block.value()});
  }
  n.add({2, dims.back()});              // final LayerNorm
  n.add({num_classes, dims.back()});    // head
  n.add({num_classes});
  return n.value();
}

int64_t ConvNeXtConfig::downsampling() const {
  return isotropic ? 16 : int64_t{4} << (dims.size() - 1);
}

namespace {
ConvNeXtConfig hierarchical(const std::string& name, std::vector<int64_t> depths,
                            std::vector<int64_t> dims) {
  ConvNeXtConfig c;
  c.name = name;
  c.depths = std::move(depths);
  c.dims = std::move(dims);
  return c;
}

ConvNeXtConfig isotropic(const std::string& name, int64_t depth, int64_t dim) {
  ConvNeXtConfig c;
  c.name = name;
  c.depths = {depth};
  c.dims = {dim};
  c.isotropic = true;
  c.layer_scale_init_value = 0;  // the official isotropic models train without layer scale
  return c;
}

const std::map<std::string, ConvNeXtConfig>& registry() {
  static const std::map<std::string, ConvNeXtConfig> models = [] {
    std::map<std::string, ConvNeXtConfig> m;
    auto add = [&](const ConvNeXtConfig& c) { m.emplace(c.name, c); };
    add(hierarchical("convnext_atto", {2, 2, 6, 2}, {40, 80, 160, 320}));
    add(hierarchical("convnext_femto", {2, 2, 6, 2}, {48, 96, 192, 384}));
    add(hierarchical("convnext_pico", {2, 2, 6, 2}, {64, 128, 256, 512}));
    add(hierarchical("convnext_nano", {2, 2, 8, 2}, {80, 160, 320, 640}));
    add(hierarchical("convnext_tiny", {3, 3, 9, 3}, {96, 192, 384, 768}));
    add(hierarchical("convnext_small", {3, 3, 27, 3}, {96, 192, 384, 768}));
    add(hierarchical("convnext_base", {3, 3, 27, 3}, {128, 256, 512, 1024}));
    add(hierarchical("convnext_large", {3, 3, 27, 3}, {192, 384, 768, 1536}));
    add(hierarchical("convnext_xlarge", {3, 3, 27, 3}, {256, 512, 1024, 2048}));
    add(isotropic("convnext_isotropic_small", 18, 384));
    add(isotropic("convnext_isotropic_base", 18, 768));
    add(isotropic("convnext_isotropic_large", 36, 1024));
    return m;
  }();
  return models;
}
}  // namespace

const std::vector<std::string>& convnext_model_names() {
  static const std::vector<std::string> names = [] {
    std::vector<std::string> v;
    for (const auto& [name, cfg] : registry()) v.push_back(name);
    return v;
  }();
  return names;
}

ConvNeXtConfig convnext_config(const std::string& name) {
  auto it = registry().find(name);
  if (it == registry().end()) {
    std::string known;
    for (const std::string& n : convnext_model_names()) known += (known.empty() ? "" : ", ") + n;
    fail("unknown model '", name, "' (known: ", known, ")");
  }
  return it->second;
}

// ---- layouts ---------------------------------------------------------------------------------

namespace {
// out[dst(i)] = in[i] for a permutation of a 4-D row-major tensor; shapes given as dims.
// `perm[d]` is the input dimension that becomes output dimension d.
Tensor permute4(const Tensor& in, const std::array<int, 4>& perm) {
  CNX_CHECK(in.rank() == 4, "permute: expected a rank-4 tensor, got ", in.str());
  const Tensor src = in.to(Device::cpu());
  const int64_t d[4] = {src.dim(0), src.dim(1), src.dim(2), src.dim(3)};
  const int64_t od[4] = {d[perm[0]], d[perm[1]], d[perm[2]], d[perm[3]]};
  int64_t in_stride[4];
  in_stride[3] = 1;
  for (int i = 2; i >= 0; --i) in_stride[i] = in_stride[i + 1] * d[i + 1];
  Tensor out = Tensor::empty(Shape{od[0], od[1], od[2], od[3]}, src.dtype());
  const int64_t es = dtype_size(src.dtype());
  const char* s = static_cast<const char*>(src.raw_data());
  char* o = static_cast<char*>(out.raw_data());
  int64_t k = 0;
  for (int64_t a = 0; a < od[0]; ++a)
    for (int64_t b = 0; b < od[1]; ++b)
      for (int64_t c = 0; c < od[2]; ++c)
        for (int64_t e = 0; e < od[3]; ++e, ++k) {
          const int64_t idx[4] = {a, b, c, e};
          int64_t off = 0;
          for (int q = 0; q < 4; ++q) off += idx[q] * in_stride[perm[q]];
          std::memcpy(o + k * es, s + off * es, static_cast<size_t>(es));
        }
  return out;
}
}  // namespace

Tensor to_official_layout(const Tensor& internal, ParamLayout layout) {
  switch (layout) {
    case ParamLayout::plain: return internal.to(Device::cpu()).clone();
    case ParamLayout::patchify: return permute4(internal, {0, 3, 1, 2});  // (Co,k,k,Ci)->(Co,Ci,k,k)
    case ParamLayout::depthwise: {  // (k, k, C) -> (C, 1, k, k)
      CNX_CHECK(internal.rank() == 3, "depthwise weight: expected (k, k, C), got ", internal.str());
      const int64_t k = internal.dim(0), C = internal.dim(2);
      return permute4(internal.view({k, k, C, 1}), {2, 3, 0, 1});
    }
  }
  return {};
}

Tensor from_official_layout(const Tensor& official, ParamLayout layout) {
  switch (layout) {
    case ParamLayout::plain: return official.to(Device::cpu()).clone();
    case ParamLayout::patchify: return permute4(official, {0, 2, 3, 1});  // (Co,Ci,k,k)->(Co,k,k,Ci)
    case ParamLayout::depthwise: {  // (C, 1, k, k) -> (k, k, C)
      CNX_CHECK(official.rank() == 4 && official.dim(1) == 1,
                "depthwise weight: expected (C, 1, k, k), got ", official.str());
      const int64_t C = official.dim(0), k = official.dim(2);
      return permute4(official, {2, 3, 0, 1}).view({k, k, C});
    }
  }
  return {};
}

Tensor nchw_to_nhwc(const Tensor& images) {
  CNX_CHECK(images.rank() == 4, "images: expected (N, C, H, W), got ", images.str());
  return permute4(images, {0, 2, 3, 1});
}

// ---- construction and initialisation ---------------------------------------------------------

namespace {
enum class Init { trunc_normal, zeros, ones, layer_scale };
}

int64_t ConvNeXt::add_param(const std::string& name, const Shape& official_shape,
                            ParamLayout layout, bool decay) {
  Parameter prm;
  prm.name = name;
  prm.official_shape = official_shape;
  prm.layout = layout;
  prm.decay = decay;
  params_.push_back(std::move(prm));
  return static_cast<int64_t>(params_.size()) - 1;
}

ConvNeXt::ConvNeXt(const ConvNeXtConfig& config, Generator& init) : config_(config) {
  config_.validate();
  const auto& dims = config_.dims;
  const int64_t total_blocks = [&] {
    int64_t t = 0;
    for (int64_t d : config_.depths) t += d;
    return t;
  }();

  std::vector<Init> inits;  // how each parameter starts, by index
  auto add = [&](const std::string& name, const Shape& shape, ParamLayout layout, Init how) {
    // The official weight-decay rule: no decay for 1-D tensors (norms, gamma) and biases.
    const bool decay = shape.rank() > 1 && !name.ends_with(".bias");
    inits.push_back(how);
    return add_param(name, shape, layout, decay);
  };
  auto conv = [&](const std::string& prefix, int64_t ci, int64_t co, int64_t k, Downsample& d) {
    d.conv_w = add(prefix + ".weight", {co, ci, k, k}, ParamLayout::patchify, Init::trunc_normal);
    d.conv_b = add(prefix + ".bias", {co}, ParamLayout::plain, Init::zeros);
  };
  auto norm = [&](const std::string& prefix, int64_t c, int64_t& w, int64_t& b) {
    w = add(prefix + ".weight", {c}, ParamLayout::plain, Init::ones);
    b = add(prefix + ".bias", {c}, ParamLayout::plain, Init::zeros);
  };

  // Stem and downsampling layers (registered before the stages in the official model).
  const size_t S = dims.size();
  downsample_.resize(S);
  if (config_.isotropic) {
    conv("stem", config_.in_chans, dims[0], 16, downsample_[0]);
  } else {
    conv("downsample_layers.0.0", config_.in_chans, dims[0], 4, downsample_[0]);
    norm("downsample_layers.0.1", dims[0], downsample_[0].ln_w, downsample_[0].ln_b);
    for (size_t i = 1; i < S; ++i) {
      const std::string prefix = "downsample_layers." + std::to_string(i);
      downsample_[i].norm_first = true;
      norm(prefix + ".0", dims[i - 1], downsample_[i].ln_w, downsample_[i].ln_b);
      conv(prefix + ".1", dims[i - 1], dims[i], 2, downsample_[i]);
    }
  }

  // Blocks. Drop path rates: linspace(0, drop_path_rate, total_blocks), as torch.linspace.
  stages_.resize(S);
  int64_t block_index = 0;
  for (size_t i = 0; i < S; ++i) {
    const int64_t C = dims[i];
    for (int64_t j = 0; j < config_.depths[i]; ++j, ++block_index) {
      const std::string prefix = config_.isotropic
                                     ? "blocks." + std::to_string(j)
                                     : "stages." + std::to_string(i) + "." + std::to_string(j);
      Block b{};
      b.drop_prob = total_blocks > 1 ? config_.drop_path_rate * static_cast<double>(block_index) /
                                           static_cast<double>(total_blocks - 1)
                                     : 0.0;
      // The block's own parameter (gamma) comes before its submodules' in a state_dict.
      b.gamma = config_.layer_scale_init_value > 0
                    ? add(prefix + ".gamma", {C}, ParamLayout::plain, Init::layer_scale)
                    : -1;
      b.dw_w = add(prefix + ".dwconv.weight", {C, 1, 7, 7}, ParamLayout::depthwise, Init::trunc_normal);
      b.dw_b = add(prefix + ".dwconv.bias", {C}, ParamLayout::plain, Init::zeros);
      norm(prefix + ".norm", C, b.ln_w, b.ln_b);
      b.pw1_w = add(prefix + ".pwconv1.weight", {4 * C, C}, ParamLayout::plain, Init::trunc_normal);
      b.pw1_b = add(prefix + ".pwconv1.bias", {4 * C}, ParamLayout::plain, Init::zeros);
      b.pw2_w = add(prefix + ".pwconv2.weight", {C, 4 * C}, ParamLayout::plain, Init::trunc_normal);
      b.pw2_b = add(prefix + ".pwconv2.bias", {C}, ParamLayout::plain, Init::zeros);
      stages_[i].push_back(b);
    }
  }

  norm("norm", dims.back(), norm_w_, norm_b_);
  head_w_ = add("head.weight", {config_.num_classes, dims.back()}, ParamLayout::plain, Init::trunc_normal);
  head_b_ = add("head.bias", {config_.num_classes}, ParamLayout::plain, Init::zeros);

  // Values, drawn in parameter order in the official layout, then converted.
  for (size_t i = 0; i < params_.size(); ++i) {
    Parameter& prm = params_[i];
    Tensor official;
    switch (inits[i]) {
      case Init::trunc_normal: {
        official = Tensor::empty(prm.official_shape);
        float* v = official.data<float>();
        // timm's trunc_normal_(std=.02) truncates at absolute +-2, i.e. +-100 std.
        for (int64_t e = 0; e < official.numel(); ++e)
          v[e] = static_cast<float>(init.trunc_normal(0.0, kInitStd, -2.0, 2.0));
        break;
      }
      case Init::zeros: official = Tensor::zeros(prm.official_shape); break;
      case Init::ones: official = Tensor::ones(prm.official_shape); break;
      case Init::layer_scale:
        official = Tensor::full(prm.official_shape, config_.layer_scale_init_value);
        break;
    }
    if (static_cast<int64_t>(i) == head_w_ || static_cast<int64_t>(i) == head_b_) {
      float* v = official.data<float>();
      for (int64_t e = 0; e < official.numel(); ++e)
        v[e] = static_cast<float>(v[e] * config_.head_init_scale);
    }
    prm.value = from_official_layout(official, prm.layout).set_requires_grad(true);
  }
}

// ---- device ----------------------------------------------------------------------------------

void ConvNeXt::to(Device device) {
  // Copy everything first, assign after: a failure (no such device, out of memory) leaves the
  // model as it was.
  std::vector<Tensor> moved(params_.size());
  for (size_t i = 0; i < params_.size(); ++i)
    if (params_[i].value.device() != device) moved[i] = params_[i].value.detach().to(device);
  for (size_t i = 0; i < params_.size(); ++i)
    if (moved[i].defined()) params_[i].value = moved[i].set_requires_grad(true);
}

Device ConvNeXt::device() const { return params_.empty() ? Device::cpu() : params_.front().value.device(); }

// ---- forward ---------------------------------------------------------------------------------

Tensor ConvNeXt::block_forward(const Block& b, const Tensor& x, bool training,
                               Generator& drop_gen, const std::vector<Tensor>* bf16_weights) const {
  Tensor h = x.device().is_cuda() && fuse_dwconv_layer_norm()
                 ? dwconv_layer_norm(x, p(b.dw_w), p(b.dw_b), p(b.ln_w), p(b.ln_b),
                                     kLayerNormEps)                 // (N, H, W, C)
                 : layer_norm(dwconv(x, p(b.dw_w), p(b.dw_b)), p(b.ln_w), p(b.ln_b),
                              kLayerNormEps);
  h = gelu(linear(h, p(b.pw1_w), p(b.pw1_b), bf16_of(bf16_weights, b.pw1_w)));  // (N, H, W, 4C)
  h = linear(h, p(b.pw2_w), p(b.pw2_b), bf16_of(bf16_weights, b.pw2_w));        // (N, H, W, C)
  // x + drop_path(layer_scale(h)) in one pass; the drop-path draw is drop_path()'s (the same
  // samples, from the same generator state, as the unfused ops).
  const Tensor gamma = b.gamma >= 0 ? p(b.gamma) : Tensor();
  const Tensor scale = training && b.drop_prob > 0
                           ? drop_path_scale(x.dim(0), b.drop_prob, drop_gen,
                                             param_dtype(h.dtype()), h.device())
                           : Tensor();
  return scaled_residual(x, h, gamma, scale);
}

void ConvNeXt::check_input_size(int64_t H, int64_t W) const {
  const int64_t s = config_.downsampling();
  CNX_CHECK(H >= s && W >= s, "model ", config_.name, ": input ", H, "x", W,
            " is too small for this model: the smallest is ", s, "x", s, " (it downsamples by ",
            s, ")");
}

std::vector<size_t> ConvNeXt::bf16_gemm_weights() const {
  std::vector<size_t> out;
  for (size_t i = 0; i < stages_.size(); ++i) {
    out.push_back(static_cast<size_t>(downsample_[i].conv_w));
    for (const Block& b : stages_[i]) {
      out.push_back(static_cast<size_t>(b.pw1_w));
      out.push_back(static_cast<size_t>(b.pw2_w));
    }
  }
  return out;
}

Tensor ConvNeXt::forward(const Tensor& images, bool training, Generator& drop_gen,
                         DType activations, const std::vector<Tensor>* bf16_weights) const {
  CNX_CHECK(images.rank() == 4 && images.dim(3) == config_.in_chans, "model ", config_.name,
            ": images ", images.str(), " must be (N, H, W, ", config_.in_chans, ")");
  check_input_size(images.dim(1), images.dim(2));
  CNX_CHECK(images.device() == device(), "model ", config_.name, ": images ", images.str(),
            " are not on the model's device ", device().str(), " (move them with .to())");
  const DType params = p(head_w_).dtype();
  CNX_CHECK(activations == params || (activations == DType::bf16 && params == DType::f32),
            "model ", config_.name, ": activations ", dtype_name(activations),
            " need f32 parameters (mixed precision) or parameters of that dtype; they are ",
            dtype_name(params));
  CNX_CHECK(!bf16_weights || bf16_weights->size() == params_.size(), "model ", config_.name,
            ": ", bf16_weights ? bf16_weights->size() : 0, " bf16 weights for ", params_.size(),
            " parameters (pass AdamW::bf16_copies() of an optimiser made on parameters())");
  if (activations != DType::bf16) bf16_weights = nullptr;  // no GEMM reads a bf16 weight then
  Tensor x = cast(images, activations);
  for (size_t i = 0; i < stages_.size(); ++i) {
    const Downsample& d = downsample_[i];
    if (d.norm_first) x = layer_norm(x, p(d.ln_w), p(d.ln_b), kLayerNormEps);
    x = patchify_conv(x, p(d.conv_w), p(d.conv_b), bf16_of(bf16_weights, d.conv_w));
    if (!d.norm_first && d.ln_w >= 0) x = layer_norm(x, p(d.ln_w), p(d.ln_b), kLayerNormEps);
    for (const Block& b : stages_[i]) x = block_forward(b, x, training, drop_gen, bf16_weights);
  }
  x = global_avg_pool(cast(x, params));  // (N, C), in the parameters' precision from here on
  x = layer_norm(x, p(norm_w_), p(norm_b_), kLayerNormEps);
  return linear(x, p(head_w_), p(head_b_));  // (N, num_classes)
}

// ---- parameters and state dicts --------------------------------------------------------------

const Parameter& ConvNeXt::parameter(const std::string& name) const {
  for (const Parameter& prm : params_)
    if (prm.name == name) return prm;
  fail("model ", config_.name, ": no parameter named '", name, "'");
}

int64_t ConvNeXt::num_parameters() const {
  int64_t n = 0;
  for (const Parameter& prm : params_) n += prm.value.numel();
  return n;
}

std::vector<double> ConvNeXt::drop_path_rates() const {
  std::vector<double> rates;
  for (const auto& stage : stages_)
    for (const Block& b : stage) rates.push_back(b.drop_prob);
  return rates;
}

NamedTensors ConvNeXt::state_dict() const {
  NamedTensors out;
  for (const Parameter& prm : params_)
    out.emplace_back(prm.name, to_official_layout(prm.value, prm.layout));
  return out;
}

void ConvNeXt::load_state_dict(const NamedTensors& tensors) {
  StateDictMatcher match(tensors);
  std::vector<const Tensor*> found;
  for (const Parameter& prm : params_) found.push_back(match.floating(prm.name, prm.official_shape));
  if (!match.ok()) {
    const std::string head = "load_state_dict: weights do not fit model " + config_.name + ":";
    const std::vector<std::string> missing = match.missing(), unexpected = match.unexpected();
    std::set<std::string> expected;
    for (const Parameter& prm : params_) expected.insert(prm.name);
    const std::string foreign = foreign_naming_hint(unexpected, expected, missing.size());
    if (!foreign.empty()) fail(head, " ", foreign);
    // Weights with and without layer scale differ only by the blocks' gamma tensors.
    auto all_gamma = [](const std::vector<std::string>& names) {
      return !names.empty() && std::all_of(names.begin(), names.end(), [](const std::string& n) {
        return n.ends_with(".gamma");
      });
    };
    std::string hint;
    if (all_gamma(missing) && unexpected.empty())
      hint = "the weights have no layer scale (no .gamma tensors): build the model with "
             "layer_scale_init_value 0 (--layer_scale_init_value 0)";
    else if (all_gamma(unexpected) && missing.empty())
      hint = "the weights have layer scale (.gamma tensors), the model, built with "
             "layer_scale_init_value 0, has none: build it with a positive value "
             "(--layer_scale_init_value 1e-6)";
    match.finish(head, hint);
  }

  // Everything fits: convert first, assign after, so a failure leaves the model unchanged.
  std::vector<Tensor> values;
  for (size_t i = 0; i < params_.size(); ++i)
    values.push_back(from_official_layout(found[i]->to(DType::f32), params_[i].layout));
  NoGradGuard no_grad;
  for (size_t i = 0; i < params_.size(); ++i) params_[i].value.copy_from(values[i]);
}

NamedTensors ConvNeXt::gradients() const {
  NamedTensors out;
  for (const Parameter& prm : params_) {
    const Tensor& g = prm.value.grad();
    out.emplace_back(prm.name, g.defined() ? to_official_layout(g, prm.layout)
                                           : Tensor::zeros(prm.official_shape));
  }
  return out;
}

void ConvNeXt::zero_grad() {
  for (Parameter& prm : params_) prm.value.set_grad({});
}

}  // namespace cnx
