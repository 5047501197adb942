#include "models/convnext.h"

#include <algorithm>
#include <array>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <initializer_list>
#include <map>
#include <set>

#include <nlohmann/json.hpp>

#include "autograd/function.h"
#include "autograd/ops.h"
#include "kernels/fusion.h"
#include "models/state_dict.h"

namespace cnx {

namespace {
constexpr double kLayerNormEps = 1e-6;
constexpr double kBatchNormEps = 1e-5;      // PyTorch's BatchNorm2d defaults
constexpr double kBatchNormMomentum = 0.1;

// Whether a block on CUDA runs its depthwise conv and LayerNorm as one fused op
// (dwconv_layer_norm: one kernel, y stays in shared memory). On unless CNX_FUSE_DWCONV_LN=0
// (kernels/fusion.h), which selects the two ops, so that a benchmark or a cost model can compare
// the two. The CPU always runs the two ops (the fused op's CPU path is the same two reference
// ops, so there is nothing to gain).
bool fuse_dwconv_layer_norm() { return fusion_enabled(Fusion::dwconv_layernorm); }
// Whether a block ends with scaled_residual (one pass) or with layer_scale, drop_path and add
// (CNX_FUSE_SCALED_RESIDUAL=0), on either device.
bool fuse_scaled_residual() { return fusion_enabled(Fusion::scaled_residual); }
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

namespace {
int64_t count_blocks(const ConvNeXtConfig& c) {
  int64_t t = 0;
  for (int64_t d : c.depths) t += d;
  return t;
}
// Block `index` of `total`: linspace(0, rate, total), as torch.linspace.
double drop_path_rate_of(double rate, int64_t index, int64_t total) {
  return total > 1 ? rate * static_cast<double>(index) / static_cast<double>(total - 1) : 0.0;
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
  CNX_CHECK(kernel >= 3 && kernel <= 11 && kernel % 2 == 1, what,
            "kernel must be 3, 5, 7, 9 or 11, got ", kernel);
  CNX_CHECK(groups >= 0, what, "groups must be 0 (depthwise) or positive, got ", groups);
  CNX_CHECK(expansion >= 0 && expansion <= 64, what,
            "expansion must be 0 (the block's own) or in (0, 64], got ", expansion);
  CNX_CHECK(stem_width >= 0, what, "stem_width must be >= 0 (0: dims[0]), got ", stem_width);
  if (!resnet_style()) {
    // Separate downsampling layers are ConvNeXt's: its stem, block and norms come with them.
    const bool convnext_block = stem == StemKind::patchify && block == BlockKind::inverted &&
                                spatial == SpatialPosition::top && groups == 0 &&
                                act == ActKind::gelu && !all_acts && norm == NormKind::layer &&
                                !all_norms && (stem_width == 0 || stem_width == dims[0]) &&
                                (expansion == 0 || expansion == 4);
    CNX_CHECK(convnext_block, what,
              "separate downsampling layers come with ConvNeXt's stem and block (patchify stem, "
              "inverted block, depthwise conv on top, one GELU, one LayerNorm): use downsampling "
              "in_block for the other combinations");
  } else {
    CNX_CHECK(!isotropic, what, "an isotropic model has no downsampling to put in its blocks");
    for (int64_t d : dims) {
      CNX_CHECK(expansion > 0 || block == BlockKind::inverted || d % 4 == 0, what,
                "a bottleneck block's hidden width is dims / 4: dims must be multiples of 4, got ",
                join(dims));
      const double h = static_cast<double>(d) * expansion;
      CNX_CHECK(expansion == 0 || (h >= 1 && std::abs(h - std::round(h)) < 1e-9), what,
                "expansion ", expansion, " times dims ", join(dims),
                " must give whole hidden widths of at least 1");
      CNX_CHECK(spatial == SpatialPosition::top || groups <= 1 || hidden_width(d) % groups == 0,
                what, "groups ", groups, " must divide every hidden width (dims ", join(dims),
                ", hidden ", hidden_width(d), ")");
    }
    // (A spatial conv on top of the block is depthwise whatever groups says; acts one keeps
    // the activation after conv2, norms one the norm after conv1, wherever the spatial conv is.)
    // The blocks are built one by one below, so bound their number before counting.
    const int64_t blocks = count_blocks(*this);
    CNX_CHECK(blocks <= 10000, what, blocks, " blocks: a ResNet-style model takes at most 10000");
    for (int64_t d : dims)
      CNX_CHECK(d <= (int64_t{1} << 20), what, "dims must be at most 2^20, got ", join(dims));
  }
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
  // A ResNet-style model is counted from its structure (validate() bounds its size first).
  if (resnet_style()) return ConvNeXt(*this, ConvNeXt::ShapesOnly{}).num_parameters();
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
    CheckedCount per_block;
    if (layer_scale_init_value > 0) per_block.add({C});  // gamma
    per_block.add({C, kernel, kernel});                  // dwconv
    per_block.add({C});
    per_block.add({2, C});                               // LayerNorm
    per_block.add({4, C, C});                            // pwconv1
    per_block.add({4, C});
    per_block.add({C, 4, C});                            // pwconv2
    per_block.add({C});
    if (per_block.value() < 0) return -1;
    n.add({depths[i], per_block.value()});
  }
  n.add({2, dims.back()});              // final LayerNorm
  n.add({num_classes, dims.back()});    // head
  n.add({num_classes});
  return n.value();
}

int64_t ConvNeXtConfig::downsampling() const {
  return isotropic ? 16 : int64_t{4} << (dims.size() - 1);
}

ConvNeXtConfig ConvNeXtConfig::scaled(double width, double depth) const {
  CNX_CHECK(width > 0 && width <= 4 && depth > 0 && depth <= 4, "model ", name,
            ": width and depth multipliers must be in (0, 4], got ", width, " and ", depth);
  ConvNeXtConfig c = *this;
  if (width == 1 && depth == 1) return c;
  auto w = [&](int64_t d) {
    return std::max<int64_t>(8, 8 * std::llround(static_cast<double>(d) * width / 8));
  };
  for (int64_t& d : c.dims) d = w(d);
  if (c.stem_width > 0) c.stem_width = w(c.stem_width);
  for (int64_t& d : c.depths)
    d = std::max<int64_t>(1, std::llround(static_cast<double>(d) * depth));
  return c;
}

// ---- the knobs as words ----------------------------------------------------------------------

namespace {
template <class E, size_t N>
const char* knob_name(E v, const std::array<std::pair<E, const char*>, N>& table) {
  for (const auto& [e, word] : table)
    if (e == v) return word;
  return "?";
}
template <class E, size_t N>
void knob_parse(const std::string& word, E& v, const char* what,
                const std::array<std::pair<E, const char*>, N>& table) {
  std::string known;
  for (const auto& [e, w] : table) {
    if (word == w) {
      v = e;
      return;
    }
    known += (known.empty() ? "" : ", ") + std::string(w);
  }
  fail("unknown ", what, " '", word, "' (known: ", known, ")");
}
constexpr std::array<std::pair<StemKind, const char*>, 2> kStems{
    {{StemKind::patchify, "patchify"}, {StemKind::resnet, "resnet"}}};
constexpr std::array<std::pair<BlockKind, const char*>, 2> kBlocks{
    {{BlockKind::inverted, "inverted"}, {BlockKind::bottleneck, "bottleneck"}}};
constexpr std::array<std::pair<SpatialPosition, const char*>, 2> kSpatial{
    {{SpatialPosition::top, "top"}, {SpatialPosition::middle, "middle"}}};
constexpr std::array<std::pair<ActKind, const char*>, 2> kActs{
    {{ActKind::gelu, "gelu"}, {ActKind::relu, "relu"}}};
constexpr std::array<std::pair<NormKind, const char*>, 2> kNorms{
    {{NormKind::layer, "layer"}, {NormKind::batch, "batch"}}};
constexpr std::array<std::pair<Downsampling, const char*>, 2> kDownsampling{
    {{Downsampling::separate, "separate"}, {Downsampling::in_block, "in_block"}}};
}  // namespace

const char* name_of(StemKind v) { return knob_name(v, kStems); }
const char* name_of(BlockKind v) { return knob_name(v, kBlocks); }
const char* name_of(SpatialPosition v) { return knob_name(v, kSpatial); }
const char* name_of(ActKind v) { return knob_name(v, kActs); }
const char* name_of(NormKind v) { return knob_name(v, kNorms); }
const char* name_of(Downsampling v) { return knob_name(v, kDownsampling); }
void parse_knob(const std::string& w, StemKind& v) { knob_parse(w, v, "stem", kStems); }
void parse_knob(const std::string& w, BlockKind& v) { knob_parse(w, v, "block", kBlocks); }
void parse_knob(const std::string& w, SpatialPosition& v) { knob_parse(w, v, "spatial", kSpatial); }
void parse_knob(const std::string& w, ActKind& v) { knob_parse(w, v, "act", kActs); }
void parse_knob(const std::string& w, NormKind& v) { knob_parse(w, v, "norm", kNorms); }
void parse_knob(const std::string& w, Downsampling& v) {
  knob_parse(w, v, "downsampling", kDownsampling);
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

// ---- configurations as JSON ------------------------------------------------------------------

std::string config_to_json(const ConvNeXtConfig& c) {
  nlohmann::ordered_json j;
  j["name"] = c.name;
  j["in_chans"] = c.in_chans;
  j["num_classes"] = c.num_classes;
  j["depths"] = c.depths;
  j["dims"] = c.dims;
  j["isotropic"] = c.isotropic;
  j["stem"] = name_of(c.stem);
  j["stem_width"] = c.stem_width;
  j["block"] = name_of(c.block);
  j["spatial"] = name_of(c.spatial);
  j["groups"] = c.groups;
  j["expansion"] = c.expansion;
  j["kernel"] = c.kernel;
  j["act"] = name_of(c.act);
  j["acts"] = c.all_acts ? "all" : "one";
  j["norm"] = name_of(c.norm);
  j["norms"] = c.all_norms ? "all" : "one";
  j["downsampling"] = name_of(c.downsample_mode);
  j["layer_scale_init_value"] = c.layer_scale_init_value;
  j["drop_path_rate"] = c.drop_path_rate;
  j["head_init_scale"] = c.head_init_scale;
  return j.dump();
}

ConvNeXtConfig config_from_json(const std::string& text) {
  nlohmann::json j;
  try {
    j = nlohmann::json::parse(text);
  } catch (const std::exception& e) {
    fail("model configuration: not JSON (", e.what(), ")");
  }
  CNX_CHECK(j.is_object(), "model configuration: expected a JSON object");
  ConvNeXtConfig c;
  auto all_or_one = [](const std::string& key, const std::string& word) {
    CNX_CHECK(word == "all" || word == "one", "model configuration: ", key,
              " must be \"all\" or \"one\", got \"", word, "\"");
    return word == "all";
  };
  for (const auto& [key, v] : j.items()) {
    try {
      if (key == "name") c.name = v.get<std::string>();
      else if (key == "in_chans") c.in_chans = v.get<int64_t>();
      else if (key == "num_classes") c.num_classes = v.get<int64_t>();
      else if (key == "depths") c.depths = v.get<std::vector<int64_t>>();
      else if (key == "dims") c.dims = v.get<std::vector<int64_t>>();
      else if (key == "isotropic") c.isotropic = v.get<bool>();
      else if (key == "stem") parse_knob(v.get<std::string>(), c.stem);
      else if (key == "stem_width") c.stem_width = v.get<int64_t>();
      else if (key == "block") parse_knob(v.get<std::string>(), c.block);
      else if (key == "spatial") parse_knob(v.get<std::string>(), c.spatial);
      else if (key == "groups") c.groups = v.get<int64_t>();
      else if (key == "expansion") c.expansion = v.get<double>();
      else if (key == "kernel") c.kernel = v.get<int64_t>();
      else if (key == "act") parse_knob(v.get<std::string>(), c.act);
      else if (key == "acts") c.all_acts = all_or_one(key, v.get<std::string>());
      else if (key == "norm") parse_knob(v.get<std::string>(), c.norm);
      else if (key == "norms") c.all_norms = all_or_one(key, v.get<std::string>());
      else if (key == "downsampling") parse_knob(v.get<std::string>(), c.downsample_mode);
      else if (key == "layer_scale_init_value") c.layer_scale_init_value = v.get<double>();
      else if (key == "drop_path_rate") c.drop_path_rate = v.get<double>();
      else if (key == "head_init_scale") c.head_init_scale = v.get<double>();
      else if (key == "case" || key == "description" || key == "paper_top1") continue;
      else fail("model configuration: unknown key \"", key, "\"");
    } catch (const nlohmann::json::exception& e) {
      fail("model configuration: ", key, " has the wrong type (", e.what(), ")");
    }
  }
  return c;
}

// ---- the roadmap (paper section 3; seeds 000 and 001 give the top-1 of each step) ----------

namespace {
// Each step is the step before with one change.
std::vector<ConvNeXtConfig> roadmap_steps() {
  std::vector<ConvNeXtConfig> steps;
  ConvNeXtConfig c;
  c.depths = {3, 4, 6, 3};
  c.dims = {256, 512, 1024, 2048};
  c.stem = StemKind::resnet;
  c.stem_width = 64;
  c.block = BlockKind::bottleneck;
  c.spatial = SpatialPosition::middle;
  c.groups = 1;
  c.kernel = 3;
  c.act = ActKind::relu;
  c.all_acts = true;
  c.norm = NormKind::batch;
  c.all_norms = true;
  c.downsample_mode = Downsampling::in_block;
  c.layer_scale_init_value = 0;
  auto step = [&](const char* name, const char* description, std::optional<double> top1) {
    c.name = name;
    c.description = description;
    c.paper_top1 = top1;
    steps.push_back(c);
  };
  step("roadmap_00_resnet50", "ResNet-50 (torchvision's), trained with the modern recipe", 78.8);
  c.depths = {3, 3, 9, 3};
  step("roadmap_01_stage_ratio", "stage compute ratio 3:4:6:3 -> 3:3:9:3 (Swin-T's 1:1:3:1)",
       79.4);
  c.stem = StemKind::patchify;
  step("roadmap_02_patchify_stem", "stem: 7x7/2 conv + max pool -> 4x4/4 patchify conv", 79.5);
  c.groups = 0;
  c.dims = {384, 768, 1536, 3072};
  c.stem_width = 96;
  step("roadmap_03_resnextify", "ResNeXt-ify: depthwise 3x3 conv, width 64 -> 96", 80.5);
  c.block = BlockKind::inverted;
  c.dims = {96, 192, 384, 768};
  step("roadmap_04_inverted_bottleneck", "inverted bottleneck: 96 -> 384 -> 96 (MLP ratio 4)",
       80.6);
  c.spatial = SpatialPosition::top;
  step("roadmap_05_move_up_dwconv", "depthwise conv moved to the top of the block", 79.9);
  c.kernel = 5;
  step("roadmap_06_kernel5", "kernel size 3 -> 5 (a variant of step 6)", std::nullopt);
  c.kernel = 7;
  step("roadmap_06_kernel7", "kernel size 3 -> 7", 80.6);
  c.kernel = 9;
  step("roadmap_06_kernel9", "kernel size 3 -> 9 (a variant of step 6)", std::nullopt);
  c.kernel = 11;
  step("roadmap_06_kernel11", "kernel size 3 -> 11 (a variant of step 6)", std::nullopt);
  c.kernel = 7;
  c.act = ActKind::gelu;
  step("roadmap_07_gelu", "ReLU -> GELU", 80.6);
  c.all_acts = false;
  step("roadmap_08_fewer_activations", "one activation per block, between the 1x1 convs", 81.3);
  c.all_norms = false;
  step("roadmap_09_fewer_norms", "one norm per block, after the depthwise conv", 81.4);
  c.norm = NormKind::layer;
  step("roadmap_10_layer_norm", "BatchNorm -> LayerNorm", 81.5);
  ConvNeXtConfig t;  // ConvNeXt's defaults: the design space's end
  t.depths = {3, 3, 9, 3};
  t.dims = {96, 192, 384, 768};
  t.name = "roadmap_11_convnext_tiny";
  t.description =
      "separate downsampling layers (LN + 2x2/2 conv), LN after the stem and the pool, layer "
      "scale: ConvNeXt-T";
  t.paper_top1 = 82.0;
  steps.push_back(t);
  return steps;
}

const std::vector<ConvNeXtConfig>& roadmap() {
  static const std::vector<ConvNeXtConfig> steps = roadmap_steps();
  return steps;
}
}  // namespace

const std::vector<std::string>& roadmap_step_names() {
  static const std::vector<std::string> names = [] {
    std::vector<std::string> v;
    for (const ConvNeXtConfig& c : roadmap()) v.push_back(c.name);
    return v;
  }();
  return names;
}

std::vector<std::string> all_model_names() {
  std::vector<std::string> v = convnext_model_names();
  v.insert(v.end(), roadmap_step_names().begin(), roadmap_step_names().end());
  return v;
}

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
  if (it != registry().end()) return it->second;
  for (const ConvNeXtConfig& c : roadmap())
    if (c.name == name) return c;
  std::string known;
  for (const std::string& n : all_model_names()) known += (known.empty() ? "" : ", ") + n;
  fail("unknown model '", name, "' (known: ", known, ")");
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
    case ParamLayout::pointwise: {  // (Co, Ci) -> (Co, Ci, 1, 1): the same bytes
      CNX_CHECK(internal.rank() == 2, "pointwise weight: expected (Co, Ci), got ", internal.str());
      return internal.to(Device::cpu()).clone().view({internal.dim(0), internal.dim(1), 1, 1});
    }
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
    case ParamLayout::pointwise: {  // (Co, Ci, 1, 1) -> (Co, Ci)
      CNX_CHECK(official.rank() == 4 && official.dim(2) == 1 && official.dim(3) == 1,
                "pointwise weight: expected (Co, Ci, 1, 1), got ", official.str());
      return official.to(Device::cpu()).clone().view({official.dim(0), official.dim(1)});
    }
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

int64_t ConvNeXt::add_param(const std::string& name, const Shape& official_shape,
                            ParamLayout layout, Init how, std::vector<Init>& inits) {
  Parameter prm;
  prm.name = name;
  prm.official_shape = official_shape;
  prm.layout = layout;
  // The official weight-decay rule: no decay for 1-D tensors (norms, gamma) and biases.
  prm.decay = official_shape.rank() > 1 && !name.ends_with(".bias");
  params_.push_back(std::move(prm));
  inits.push_back(how);
  entries_.push_back({Entry::Kind::parameter, params_.size() - 1});
  return static_cast<int64_t>(params_.size()) - 1;
}

ConvNeXt::ConvNeXt(const ConvNeXtConfig& config, Generator& init) : ConvNeXt(config, &init) {}

ConvNeXt::ConvNeXt(const ConvNeXtConfig& config, ShapesOnly) : ConvNeXt(config, nullptr) {}

ConvNeXt::ConvNeXt(const ConvNeXtConfig& config, Generator* init) : config_(config) {
  shapes_only_ = init == nullptr;
  // validate() counts a ResNet-style model by building its shapes, so only a real build checks.
  if (!shapes_only_) config_.validate();
  std::vector<Init> inits;  // how each parameter starts, by index
  if (config_.resnet_style()) build_resnet_style(inits);
  else build_convnext(inits);
  if (!shapes_only_) init_values(inits, *init);
}


// The official ConvNeXt (and isotropic ConvNeXt), parameters in the official order.
void ConvNeXt::build_convnext(std::vector<Init>& inits) {
  const auto& dims = config_.dims;
  const int64_t K = config_.kernel;
  const int64_t total_blocks = count_blocks(config_);

  auto add = [&](const std::string& name, const Shape& shape, ParamLayout layout, Init how) {
    return add_param(name, shape, layout, how, inits);
  };
  auto conv = [&](const std::string& prefix, int64_t ci, int64_t co, int64_t k, Downsample& d) {
    d.conv_w = add(prefix + ".weight", {co, ci, k, k}, ParamLayout::patchify, Init::trunc_normal);
    d.conv_b = add(prefix + ".bias", {co}, ParamLayout::plain, Init::zeros);
    d.ci = ci;
    d.co = co;
    d.k = k;
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

  // Blocks, with drop path rates rising linearly over all of them.
  stages_.resize(S);
  int64_t block_index = 0;
  for (size_t i = 0; i < S; ++i) {
    const int64_t C = dims[i];
    for (int64_t j = 0; j < config_.depths[i]; ++j, ++block_index) {
      const std::string prefix = config_.isotropic
                                     ? "blocks." + std::to_string(j)
                                     : "stages." + std::to_string(i) + "." + std::to_string(j);
      Block b;
      b.drop_prob = drop_path_rate_of(config_.drop_path_rate, block_index, total_blocks);
      // The block's own parameter (gamma) comes before its submodules' in a state_dict.
      b.gamma = config_.layer_scale_init_value > 0
                    ? add(prefix + ".gamma", {C}, ParamLayout::plain, Init::layer_scale)
                    : -1;
      b.c1 = {Conv::Op::dwconv, -1, -1, C, C, K, 1, K / 2, C};
      b.c1.w = add(prefix + ".dwconv.weight", {C, 1, K, K}, ParamLayout::depthwise, Init::trunc_normal);
      b.c1.b = add(prefix + ".dwconv.bias", {C}, ParamLayout::plain, Init::zeros);
      b.n1.kind = NormKind::layer;
      norm(prefix + ".norm", C, b.n1.w, b.n1.b);
      b.c2 = {Conv::Op::linear, -1, -1, C, 4 * C, 1, 1, 0, 1};
      b.c2.w = add(prefix + ".pwconv1.weight", {4 * C, C}, ParamLayout::plain, Init::trunc_normal);
      b.c2.b = add(prefix + ".pwconv1.bias", {4 * C}, ParamLayout::plain, Init::zeros);
      b.act2 = true;
      b.c3 = {Conv::Op::linear, -1, -1, 4 * C, C, 1, 1, 0, 1};
      b.c3.w = add(prefix + ".pwconv2.weight", {C, 4 * C}, ParamLayout::plain, Init::trunc_normal);
      b.c3.b = add(prefix + ".pwconv2.bias", {C}, ParamLayout::plain, Init::zeros);
      stages_[i].push_back(b);
    }
  }

  norm("norm", dims.back(), norm_w_, norm_b_);
  head_w_ = add("head.weight", {config_.num_classes, dims.back()}, ParamLayout::plain, Init::trunc_normal);
  head_b_ = add("head.bias", {config_.num_classes}, ParamLayout::plain, Init::zeros);
}

// A ResNet of torchvision's layout and names with the roadmap's knobs (the header's picture).
void ConvNeXt::build_resnet_style(std::vector<Init>& inits) {
  const ConvNeXtConfig& c = config_;
  const int64_t total_blocks = count_blocks(c);
  const bool bn = c.norm == NormKind::batch;

  auto add = [&](const std::string& name, const Shape& shape, ParamLayout layout, Init how) {
    return add_param(name, shape, layout, how, inits);
  };
  // A conv of `ci` -> `co` channels; its bias only when no BatchNorm follows (`then_bn`).
  auto conv = [&](const std::string& prefix, int64_t ci, int64_t co, int64_t k, int64_t stride,
                  int64_t groups, bool then_bn) {
    Conv cv;
    cv.ci = ci;
    cv.co = co;
    cv.k = k;
    cv.stride = stride;
    cv.pad = (k == stride) ? 0 : k / 2;  // a patchify conv has none, the others keep the size
    cv.groups = groups;
    const bool depthwise = groups == ci && groups == co && groups > 1;
    if (k == 1 && stride == 1 && groups == 1) {
      cv.op = Conv::Op::linear;
      cv.w = add(prefix + ".weight", {co, ci, 1, 1}, ParamLayout::pointwise, Init::kaiming_fan_out);
    } else if (depthwise && stride == 1 && k % 2 == 1) {
      cv.op = Conv::Op::dwconv;
      cv.w = add(prefix + ".weight", {co, 1, k, k}, ParamLayout::depthwise, Init::kaiming_fan_out);
    } else {
      cv.op = (k == stride && groups == 1) ? Conv::Op::patchify : Conv::Op::conv2d;
      cv.w = add(prefix + ".weight", {co, ci / groups, k, k}, ParamLayout::patchify,
                 Init::kaiming_fan_out);
    }
    if (!then_bn) cv.b = add(prefix + ".bias", {co}, ParamLayout::plain, Init::zeros);
    return cv;
  };
  // A norm module called `prefix` ("layer1.0.bn1"): BatchNorm's weight, bias, running_mean,
  // running_var, num_batches_tracked in PyTorch's order, or LayerNorm's weight and bias.
  auto norm = [&](const std::string& prefix, int64_t ch) {
    Norm n;
    n.kind = c.norm;
    n.w = add(prefix + ".weight", {ch}, ParamLayout::plain, Init::ones);
    n.b = add(prefix + ".bias", {ch}, ParamLayout::plain, Init::zeros);
    if (bn) {
      BatchNormState st;
      st.name = prefix;
      buffers_.push_back({prefix + ".running_mean", Tensor()});
      st.running_mean = buffers_.size() - 1;
      entries_.push_back({Entry::Kind::buffer, st.running_mean});
      buffers_.push_back({prefix + ".running_var", Tensor()});
      st.running_var = buffers_.size() - 1;
      entries_.push_back({Entry::Kind::buffer, st.running_var});
      bn_.push_back(st);
      bn_batches_.push_back(0);
      n.bn = static_cast<int64_t>(bn_.size()) - 1;
      entries_.push_back({Entry::Kind::batches, bn_.size() - 1});
    }
    return n;
  };
  const std::string norm_word = bn ? "bn" : "ln";

  // Stem: conv1 -> bn1 (ln1) -> act [-> maxpool].
  const int64_t stem_ch = c.stem_channels();
  if (c.stem == StemKind::resnet) {
    stem_.conv = conv("conv1", c.in_chans, stem_ch, 7, 2, 1, bn);
    stem_.maxpool = true;
  } else {
    stem_.conv = conv("conv1", c.in_chans, stem_ch, 4, 4, 1, bn);
  }
  stem_.norm = norm(norm_word + "1", stem_ch);
  stem_.act = true;

  const size_t S = c.dims.size();
  stages_.resize(S);
  int64_t block_index = 0;
  int64_t in = stem_ch;
  for (size_t i = 0; i < S; ++i) {
    const int64_t out = c.dims[i], hidden = c.hidden_width(out);
    for (int64_t j = 0; j < c.depths[i]; ++j, ++block_index) {
      const std::string prefix = "layer" + std::to_string(i + 1) + "." + std::to_string(j);
      const int64_t stride = (i > 0 && j == 0) ? 2 : 1;
      Block b;
      b.drop_prob = drop_path_rate_of(c.drop_path_rate, block_index, total_blocks);
      b.gamma = c.layer_scale_init_value > 0
                    ? add(prefix + ".gamma", {out}, ParamLayout::plain, Init::layer_scale)
                    : -1;
      const bool n2 = c.all_norms, n3 = c.all_norms;  // norm1 always
      const int64_t K = c.kernel;
      if (c.spatial == SpatialPosition::middle) {
        b.c1 = conv(prefix + ".conv1", in, hidden, 1, 1, 1, bn);
        b.n1 = norm(prefix + "." + norm_word + "1", hidden);
        b.c2 = conv(prefix + ".conv2", hidden, hidden, K, stride, c.groups == 0 ? hidden : c.groups,
                    bn && n2);
        if (n2) b.n2 = norm(prefix + "." + norm_word + "2", hidden);
      } else {
        b.c1 = conv(prefix + ".conv1", in, in, K, stride, in, bn);
        b.n1 = norm(prefix + "." + norm_word + "1", in);
        b.c2 = conv(prefix + ".conv2", in, hidden, 1, 1, 1, bn && n2);
        if (n2) b.n2 = norm(prefix + "." + norm_word + "2", hidden);
      }
      b.c3 = conv(prefix + ".conv3", hidden, out, 1, 1, 1, bn && n3);
      if (n3) b.n3 = norm(prefix + "." + norm_word + "3", out);
      b.act1 = c.all_acts;
      b.act2 = true;
      b.act_out = c.all_acts;
      if (stride != 1 || in != out) {
        b.projection = true;
        b.proj = conv(prefix + ".downsample.0", in, out, 1, stride, 1, bn);
        b.proj_norm = norm(prefix + ".downsample.1", out);
      }
      stages_[i].push_back(b);
      in = out;
    }
  }
  head_w_ = add("fc.weight", {c.num_classes, in}, ParamLayout::plain, Init::linear_uniform);
  head_b_ = add("fc.bias", {c.num_classes}, ParamLayout::plain, Init::linear_uniform);
}

// Values, drawn in parameter order in the official layout, then converted; BatchNorm buffers
// start at mean 0, variance 1.
void ConvNeXt::init_values(const std::vector<Init>& inits, Generator& init) {
  for (size_t i = 0; i < params_.size(); ++i) {
    Parameter& prm = params_[i];
    const Shape& shape = prm.official_shape;
    Tensor official;
    switch (inits[i]) {
      case Init::trunc_normal: {
        official = Tensor::empty(shape);
        float* v = official.data<float>();
        // timm's trunc_normal_(std=.02) truncates at absolute +-2, i.e. +-100 std.
        for (int64_t e = 0; e < official.numel(); ++e)
          v[e] = static_cast<float>(init.trunc_normal(0.0, kInitStd, -2.0, 2.0));
        break;
      }
      case Init::kaiming_fan_out: {  // torchvision's kaiming_normal_(mode="fan_out", relu)
        official = Tensor::empty(shape);
        const double fan_out = static_cast<double>(shape[0] * shape[2] * shape[3]);
        const double std = std::sqrt(2.0 / fan_out);
        float* v = official.data<float>();
        for (int64_t e = 0; e < official.numel(); ++e) v[e] = static_cast<float>(std * init.normal());
        break;
      }
      case Init::linear_uniform: {  // nn.Linear's default: U(-1/sqrt(in), 1/sqrt(in))
        // (Only the head uses it: its weight's in features are the fan-in, also for the bias.)
        official = Tensor::empty(shape);
        const double fan_in =
            static_cast<double>(params_[static_cast<size_t>(head_w_)].official_shape[1]);
        const double bound = 1.0 / std::sqrt(fan_in);
        float* v = official.data<float>();
        for (int64_t e = 0; e < official.numel(); ++e)
          v[e] = static_cast<float>(init.uniform(-bound, bound));
        break;
      }
      case Init::zeros: official = Tensor::zeros(shape); break;
      case Init::ones: official = Tensor::ones(shape); break;
      case Init::layer_scale: official = Tensor::full(shape, config_.layer_scale_init_value); break;
    }
    if (static_cast<int64_t>(i) == head_w_ || static_cast<int64_t>(i) == head_b_) {
      float* v = official.data<float>();
      for (int64_t e = 0; e < official.numel(); ++e)
        v[e] = static_cast<float>(v[e] * config_.head_init_scale);
    }
    prm.value = from_official_layout(official, prm.layout).set_requires_grad(true);
  }
  for (const BatchNormState& st : bn_) {
    const Shape channels = entry_of({Entry::Kind::buffer, st.running_mean}).second;
    buffers_[st.running_mean].value = Tensor::zeros(channels);
    buffers_[st.running_var].value = Tensor::ones(channels);
  }
}

// ---- device ----------------------------------------------------------------------------------

void ConvNeXt::to(Device device) {
  // Copy everything first, assign after: a failure (no such device, out of memory) leaves the
  // model as it was.
  std::vector<Tensor> moved(params_.size()), moved_buffers(buffers_.size());
  for (size_t i = 0; i < params_.size(); ++i)
    if (params_[i].value.device() != device) moved[i] = params_[i].value.detach().to(device);
  for (size_t i = 0; i < buffers_.size(); ++i)
    if (buffers_[i].value.device() != device) moved_buffers[i] = buffers_[i].value.to(device);
  for (size_t i = 0; i < params_.size(); ++i)
    if (moved[i].defined()) params_[i].value = moved[i].set_requires_grad(true);
  for (size_t i = 0; i < buffers_.size(); ++i)
    if (moved_buffers[i].defined()) buffers_[i].value = moved_buffers[i];
}

Device ConvNeXt::device() const { return params_.empty() ? Device::cpu() : params_.front().value.device(); }

void ConvNeXt::copy_buffers_from(const ConvNeXt& other) {
  CNX_CHECK(other.buffers_.size() == buffers_.size() && other.bn_.size() == bn_.size(), "model ",
            config_.name, ": copy_buffers_from a model with other buffers (", other.config_.name, ")");
  NoGradGuard no_grad;
  for (size_t i = 0; i < buffers_.size(); ++i) buffers_[i].value.copy_from(other.buffers_[i].value);
  bn_batches_ = other.bn_batches_;
}

// ---- forward ---------------------------------------------------------------------------------

Tensor ConvNeXt::conv_forward(const Conv& c, const Tensor& x,
                              const std::vector<Tensor>* bf16_weights) const {
  const Tensor bias = c.b >= 0 ? p(c.b) : Tensor();
  switch (c.op) {
    case Conv::Op::linear: return linear(x, p(c.w), bias, bf16_of(bf16_weights, c.w));
    case Conv::Op::dwconv: return dwconv(x, p(c.w), bias);
    case Conv::Op::patchify: return patchify_conv(x, p(c.w), bias, bf16_of(bf16_weights, c.w));
    case Conv::Op::conv2d: return conv2d(x, p(c.w), bias, c.stride, c.pad, c.groups);
  }
  return {};
}

Tensor ConvNeXt::norm_forward(const Norm& n, const Tensor& x, bool training) const {
  if (n.kind == NormKind::layer) return layer_norm(x, p(n.w), p(n.b), kLayerNormEps);
  const BatchNormState& st = bn_[static_cast<size_t>(n.bn)];
  Tensor out = batch_norm(x, p(n.w), p(n.b), buffers_[st.running_mean].value,
                          buffers_[st.running_var].value, training, kBatchNormMomentum,
                          kBatchNormEps);
  if (training) ++bn_batches_[static_cast<size_t>(n.bn)];
  return out;
}

Tensor ConvNeXt::act_forward(const Tensor& x) const {
  return config_.act == ActKind::gelu ? gelu(x) : relu(x);
}

Tensor ConvNeXt::block_forward(const Block& b, const Tensor& x, bool training, Generator& drop_gen,
                               const std::vector<Tensor>* bf16_weights, const Tensor& drop_scale) const {
  Tensor h;  // the residual branch
  if (b.c1.op == Conv::Op::dwconv && b.n1.present() && b.n1.kind == NormKind::layer &&
      b.c1.k == 7 && x.device().is_cuda() && fuse_dwconv_layer_norm()) {
    const Tensor bias = b.c1.b >= 0 ? p(b.c1.b) : Tensor();
    h = dwconv_layer_norm(x, p(b.c1.w), bias, p(b.n1.w), p(b.n1.b), kLayerNormEps);
  } else {
    h = conv_forward(b.c1, x, bf16_weights);
    if (b.n1.present()) h = norm_forward(b.n1, h, training);
  }
  if (b.act1) h = act_forward(h);
  h = conv_forward(b.c2, h, bf16_weights);  // ConvNeXt: (N, H, W, 4C)
  if (b.n2.present()) h = norm_forward(b.n2, h, training);
  if (b.act2) h = act_forward(h);
  h = conv_forward(b.c3, h, bf16_weights);  // (N, H', W', C_out)
  if (b.n3.present()) h = norm_forward(b.n3, h, training);
  const Tensor shortcut =
      b.projection ? norm_forward(b.proj_norm, conv_forward(b.proj, x, bf16_weights), training) : x;
  // shortcut + drop_path(layer_scale(h)) in one pass (or as the three ops with
  // CNX_FUSE_SCALED_RESIDUAL=0, kernels/fusion.h); the drop-path draw is drop_path()'s (the same
  // samples, from the same generator state, as the unfused ops).
  const Tensor gamma = b.gamma >= 0 ? p(b.gamma) : Tensor();
  Tensor scale;
  if (training && b.drop_prob > 0)
    scale = drop_scale.defined() ? drop_scale
                                 : drop_path_scale(x.dim(0), b.drop_prob, drop_gen, param_dtype(h.dtype()),
                                                   h.device());
  Tensor out;
  if (fuse_scaled_residual()) {
    out = scaled_residual(shortcut, h, gamma, scale);
  } else {
    if (gamma.defined()) h = layer_scale(h, gamma);
    if (scale.defined()) h = drop_path(h, scale);
    out = add(shortcut, h);
  }
  return b.act_out ? act_forward(out) : out;
}

int64_t ConvNeXt::min_input_size() const {
  if (!config_.resnet_style()) return config_.downsampling();
  return config_.stem == StemKind::resnet ? 1 : 4;
}

void ConvNeXt::check_input_size(int64_t H, int64_t W) const {
  const int64_t s = min_input_size();
  CNX_CHECK(H >= s && W >= s, "model ", config_.name, ": input ", H, "x", W,
            " is too small for this model: the smallest is ", s, "x", s, " (it downsamples by ",
            config_.downsampling(), ")");
}

namespace {
int64_t conv_out(int64_t size, int64_t k, int64_t stride, int64_t pad) {
  return (size + 2 * pad - k) / stride + 1;
}
}  // namespace

// BatchNorm in training needs two values per channel; the last stage's map is the smallest.
void ConvNeXt::check_batch_norm_batch(int64_t N, int64_t H, int64_t W) const {
  if (bn_.empty() || N > 1) return;
  const ConvWalk last = walk_convs(H, W);
  const int64_t h = last.h, w = last.w;
  CNX_CHECK(h * w > 1, "model ", config_.name, ": BatchNorm in training mode needs more than one ",
            "value per channel, and a batch of 1 image of ", H, "x", W, " reaches a ", h, "x", w,
            " map in the last stage: train with a batch of at least 2 (per micro-batch) or "
            "larger images");
}

std::vector<size_t> ConvNeXt::bf16_gemm_weights() const {
  std::vector<size_t> out;
  auto gemm = [&](const Conv& c) {
    if (c.w >= 0 && (c.op == Conv::Op::linear || c.op == Conv::Op::patchify))
      out.push_back(static_cast<size_t>(c.w));
  };
  if (config_.resnet_style()) gemm(stem_.conv);
  for (size_t i = 0; i < stages_.size(); ++i) {
    if (!config_.resnet_style()) out.push_back(static_cast<size_t>(downsample_[i].conv_w));
    for (const Block& b : stages_[i]) {
      gemm(b.c1);
      gemm(b.c2);
      gemm(b.c3);
      if (b.projection) gemm(b.proj);
    }
  }
  return out;
}

int64_t ConvNeXt::drop_path_blocks() const {
  int64_t n = 0;
  for (const auto& stage : stages_)
    for (const Block& b : stage) n += b.drop_prob > 0;
  return n;
}

Tensor ConvNeXt::draw_drop_scales(int64_t N, Generator& drop_gen, DType activations) const {
  const DType dtype = param_dtype(activations);
  Tensor out = Tensor::empty(Shape{drop_path_blocks(), N}, dtype, Device::cpu());
  const int64_t row_bytes = N * dtype_size(dtype);
  int64_t k = 0;
  for (const auto& stage : stages_)
    for (const Block& b : stage) {
      if (b.drop_prob <= 0) continue;  // as block_forward: such a block draws nothing
      const Tensor row = drop_path_scale(N, b.drop_prob, drop_gen, dtype, Device::cpu());
      std::memcpy(static_cast<char*>(out.raw_data()) + k++ * row_bytes, row.raw_data(),
                  static_cast<size_t>(row_bytes));
    }
  return out;
}

namespace {
// Row r of a 2-D tensor, (cols): a view into its storage (no copy, no autograd history).
Tensor row_view(const Tensor& t, int64_t r) {
  auto impl = std::make_shared<TensorImpl>();
  impl->storage = t.impl()->storage;
  impl->offset = t.impl()->offset + r * t.dim(1) * dtype_size(t.dtype());
  impl->shape = Shape{t.dim(1)};
  impl->dtype = t.dtype();
  return Tensor(std::move(impl));
}
}  // namespace

Tensor ConvNeXt::forward(const Tensor& images, bool training, Generator& drop_gen,
                         DType activations, const std::vector<Tensor>* bf16_weights,
                         const Tensor* drop_scales) const {
  CNX_CHECK(!shapes_only_, "model ", config_.name, ": built with ShapesOnly, it has no values");
  CNX_CHECK(images.rank() == 4 && images.dim(3) == config_.in_chans, "model ", config_.name,
            ": images ", images.str(), " must be (N, H, W, ", config_.in_chans, ")");
  check_input_size(images.dim(1), images.dim(2));
  if (training) check_batch_norm_batch(images.dim(0), images.dim(1), images.dim(2));
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
  if (drop_scales) {
    const Shape want{drop_path_blocks(), images.dim(0)};
    CNX_CHECK(training && drop_scales->shape() == want && drop_scales->dtype() == param_dtype(activations) &&
                  drop_scales->device() == device(),
              "model ", config_.name, ": drop_scales ", drop_scales->str(), " must be ", want.str(), " ",
              dtype_name(param_dtype(activations)), " on ", device().str(), " (draw_drop_scales), for training");
  }
  // The block's pre-drawn multipliers, or undefined (block_forward draws them).
  int64_t drawing_block = 0;
  auto scale_of = [&](const Block& b) {
    return drop_scales && b.drop_prob > 0 ? row_view(*drop_scales, drawing_block++) : Tensor();
  };
  Tensor x = cast(images, activations);
  if (config_.resnet_style()) {
    x = norm_forward(stem_.norm, conv_forward(stem_.conv, x, bf16_weights), training);
    if (stem_.act) x = act_forward(x);
    if (stem_.maxpool) x = max_pool2d(x, 3, 2, 1);
    for (const auto& stage : stages_)
      for (const Block& b : stage) x = block_forward(b, x, training, drop_gen, bf16_weights, scale_of(b));
    x = global_avg_pool(cast(x, params));  // (N, C), in the parameters' precision from here on
    return linear(x, p(head_w_), p(head_b_));  // (N, num_classes)
  }
  for (size_t i = 0; i < stages_.size(); ++i) {
    const Downsample& d = downsample_[i];
    if (d.norm_first) x = layer_norm(x, p(d.ln_w), p(d.ln_b), kLayerNormEps);
    x = patchify_conv(x, p(d.conv_w), p(d.conv_b), bf16_of(bf16_weights, d.conv_w));
    if (!d.norm_first && d.ln_w >= 0) x = layer_norm(x, p(d.ln_w), p(d.ln_b), kLayerNormEps);
    for (const Block& b : stages_[i]) x = block_forward(b, x, training, drop_gen, bf16_weights, scale_of(b));
  }
  x = global_avg_pool(cast(x, params));  // (N, C), in the parameters' precision from here on
  x = layer_norm(x, p(norm_w_), p(norm_b_), kLayerNormEps);
  return linear(x, p(head_w_), p(head_b_));  // (N, num_classes)
}

// ---- multiply-adds ---------------------------------------------------------------------------

ConvNeXt::ConvWalk ConvNeXt::walk_convs(int64_t H, int64_t W) const {
  ConvWalk r{0, H, W};
  // One conv on an h x w map: its output pixels x Co x (Ci / groups) x k x k; h, w updated.
  auto conv = [&](int64_t& h, int64_t& w, int64_t ci, int64_t co, int64_t k, int64_t stride,
                  int64_t pad, int64_t groups) {
    h = conv_out(h, k, stride, pad);
    w = conv_out(w, k, stride, pad);
    r.macs += h * w * co * (ci / groups) * k * k;
  };
  auto run = [&](int64_t& h, int64_t& w, const Conv& c) {
    conv(h, w, c.ci, c.co, c.k, c.stride, c.pad, c.groups);
  };
  if (config_.resnet_style()) {
    run(r.h, r.w, stem_.conv);
    if (stem_.maxpool) r.h = conv_out(r.h, 3, 2, 1), r.w = conv_out(r.w, 3, 2, 1);
  }
  for (size_t i = 0; i < stages_.size(); ++i) {
    if (!config_.resnet_style()) {
      const Downsample& d = downsample_[i];
      conv(r.h, r.w, d.ci, d.co, d.k, d.k, 0, 1);
    }
    for (const Block& b : stages_[i]) {
      int64_t sh = r.h, sw = r.w;  // the shortcut's
      run(r.h, r.w, b.c1);
      run(r.h, r.w, b.c2);
      run(r.h, r.w, b.c3);
      if (b.projection) run(sh, sw, b.proj);
    }
  }
  return r;
}

int64_t ConvNeXt::macs(int64_t H, int64_t W) const {
  const Shape& head = params_[static_cast<size_t>(head_w_)].official_shape;
  return walk_convs(H, W).macs + head[0] * head[1];
}

// ---- parameters and state dicts --------------------------------------------------------------

const Parameter& ConvNeXt::parameter(const std::string& name) const {
  for (const Parameter& prm : params_)
    if (prm.name == name) return prm;
  fail("model ", config_.name, ": no parameter named '", name, "'");
}

int64_t ConvNeXt::num_parameters() const {
  int64_t n = 0;
  for (const Parameter& prm : params_) n += prm.official_shape.numel();  // also ShapesOnly
  return n;
}

std::vector<double> ConvNeXt::drop_path_rates() const {
  std::vector<double> rates;
  for (const auto& stage : stages_)
    for (const Block& b : stage) rates.push_back(b.drop_prob);
  return rates;
}

std::pair<std::string, Shape> ConvNeXt::entry_of(const Entry& e) const {
  switch (e.kind) {
    case Entry::Kind::parameter: return {params_[e.index].name, params_[e.index].official_shape};
    case Entry::Kind::buffer: {
      // A running statistic ("<module>.running_mean") has its norm's channels: the weight's shape.
      const std::string& name = buffers_[e.index].name;
      return {name, parameter(name.substr(0, name.rfind('.')) + ".weight").official_shape};
    }
    case Entry::Kind::batches: return {bn_[e.index].name + ".num_batches_tracked", Shape{}};
  }
  return {};
}

NamedTensors ConvNeXt::state_dict() const {
  NamedTensors out;
  for (const Entry& e : entries_) {
    std::string name = entry_of(e).first;
    switch (e.kind) {
      case Entry::Kind::parameter: {
        const Parameter& prm = params_[e.index];
        out.emplace_back(std::move(name), to_official_layout(prm.value, prm.layout));
        break;
      }
      case Entry::Kind::buffer:
        out.emplace_back(std::move(name), buffers_[e.index].value.to(Device::cpu()).clone());
        break;
      case Entry::Kind::batches: {
        Tensor n = Tensor::empty(Shape{}, DType::i64);
        *n.data<int64_t>() = bn_batches_[e.index];
        out.emplace_back(std::move(name), n);
        break;
      }
    }
  }
  return out;
}

std::vector<std::pair<std::string, Shape>> ConvNeXt::state_dict_shapes() const {
  std::vector<std::pair<std::string, Shape>> out;
  for (const Entry& e : entries_) out.push_back(entry_of(e));
  return out;
}

void ConvNeXt::load_state_dict(const NamedTensors& tensors) {
  StateDictMatcher match(tensors);
  std::vector<const Tensor*> found, found_buffers;
  std::vector<int64_t> batches(bn_.size(), 0);
  // Looked up in state_dict() order, so that "missing" lists the names in the model's order.
  found.resize(params_.size());
  found_buffers.resize(buffers_.size());
  for (const Entry& e : entries_) {
    const auto [name, shape] = entry_of(e);
    switch (e.kind) {
      case Entry::Kind::parameter: found[e.index] = match.floating(name, shape); break;
      case Entry::Kind::buffer: found_buffers[e.index] = match.floating(name, shape); break;
      case Entry::Kind::batches:
        if (const Tensor* t = match.find(name)) {
          if ((t->dtype() != DType::i64 && t->dtype() != DType::i32) || t->numel() != 1)
            match.note("not an integer scalar", name + " " + t->str());
          else
            batches[e.index] = t->dtype() == DType::i64 ? *t->to(Device::cpu()).data<int64_t>()
                                                        : *t->to(Device::cpu()).data<int32_t>();
        }
        break;
    }
  }
  if (!match.ok()) {
    const std::string head = "load_state_dict: weights do not fit model " + config_.name + ":";
    const std::vector<std::string> missing = match.missing(), unexpected = match.unexpected();
    std::set<std::string> expected;
    for (const Entry& e : entries_) expected.insert(entry_of(e).first);
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
  std::vector<Tensor> values, buffer_values;
  for (size_t i = 0; i < params_.size(); ++i)
    values.push_back(from_official_layout(found[i]->to(DType::f32), params_[i].layout));
  for (size_t i = 0; i < buffers_.size(); ++i)
    buffer_values.push_back(found_buffers[i]->to(Device::cpu()).to(DType::f32));
  NoGradGuard no_grad;
  for (size_t i = 0; i < params_.size(); ++i) params_[i].value.copy_from(values[i]);
  for (size_t i = 0; i < buffers_.size(); ++i) buffers_[i].value.copy_from(buffer_values[i]);
  bn_batches_ = batches;
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
