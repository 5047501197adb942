// The ConvNeXt family (Liu et al., "A ConvNet for the 2020s", CVPR 2022), built from the
// autograd ops, with the official parameter names, shapes and initialisation.
//
// Hierarchical models (convnext_tiny ... xlarge, atto ... nano), all NHWC:
//   images (N, H, W, in_chans)
//   stem: patchify 4x4/4 -> LayerNorm                 downsample_layers.0.{0: conv, 1: norm}
//   stage i: depths[i] blocks of width dims[i]        stages.i.j.*
//   between stages: LayerNorm -> patchify 2x2/2       downsample_layers.i.{0: norm, 1: conv}
//   mean over H, W -> LayerNorm -> linear head        norm.*, head.*
// Isotropic models (convnext_isotropic_*): a 16x16/16 patchify stem (stem.*), depth blocks of
// one width (blocks.j.*), no downsampling, then the same mean, norm and head.
//
// A block (stages.i.j or blocks.j), with x (N, H, W, C):
//   h = dwconv 7x7 (x) -> LayerNorm -> linear C->4C -> GELU -> linear 4C->C -> * gamma
//   x + drop_path(h)
// where gamma (layer scale) exists only when layer_scale_init_value > 0, as in the official
// code, and the drop path rates rise linearly from 0 to drop_path_rate over all blocks.
// Every LayerNorm uses eps 1e-6.
//
// Parameters are stored in the layouts the kernels want (patchify (Co, k, k, Ci), depthwise
// (k, k, C)) and converted to the official ones ((Co, Ci, k, k), (C, 1, k, k)) at every file
// boundary: state_dict(), load_state_dict(), gradients().
//
// The same class is the paper's design space (section 3, "Modernizing a ConvNet: a Roadmap"):
// the configuration's roadmap knobs (stem, block, spatial conv position, groups, kernel size,
// activation and how many, norm and how many, downsampling) turn torchvision's ResNet-50 into
// ConvNeXt-T one step at a time. Their defaults are ConvNeXt's; the named steps are
// roadmap_00_resnet50 ... roadmap_11_convnext_tiny (roadmap_config()). With in-block
// downsampling (steps 0 to 10) the model is a ResNet of torchvision's layout and names:
//   stem: conv1 (7x7/2 pad 3, or a 4x4/4 patchify) -> norm bn1 (or ln1) -> act [-> maxpool 3/2/1]
//   stage i: depths[i] blocks layer{i+1}.{j}, output width dims[i]; the first block of stages
//   1..3 has stride 2 on its spatial conv and a projection shortcut (downsample.0 conv 1x1,
//   downsample.1 norm), as has any block whose input width differs from its output's
//   block, hidden width h (dims/4 bottleneck, 4 dims inverted), spatial conv k x k:
//     spatial middle: conv1 1x1 -> h, conv2 k x k at h (stride, groups), conv3 1x1 h -> out
//     spatial top:    conv1 k x k depthwise at the input width (stride), conv2 1x1 -> h,
//                     conv3 1x1 h -> out
//     a norm after each conv (norms all) or after conv1 only (norms one); an activation after
//     the first two convs and after the residual add (acts all) or between the 1x1s only
//     (acts one); * gamma (layer scale) and drop path on the branch
//   global mean -> fc
// A conv has a bias unless a BatchNorm follows it. BatchNorm layers keep running statistics,
// which are buffers (running_mean, running_var, num_batches_tracked): in state_dict() and
// checkpoints, not in parameters(). tools/roadmap_reference.py is the independent PyTorch
// definition the tests compare against.
#pragma once

#include <optional>
#include <string>
#include <utility>
#include <vector>

#include "tensor/tensor.h"

namespace cnx {

// The roadmap's knobs (ConvNeXtConfig). The first value of each is ConvNeXt's.
enum class StemKind { patchify, resnet };        // 4x4/4 patchify conv | ResNet 7x7/2 + maxpool
enum class BlockKind { inverted, bottleneck };   // hidden width 4 x dims | dims / 4
enum class SpatialPosition { top, middle };      // the k x k conv first | between the 1x1s
enum class ActKind { gelu, relu };
enum class NormKind { layer, batch };            // LayerNorm eps 1e-6 | BatchNorm eps 1e-5
enum class Downsampling { separate, in_block };  // LN + 2x2/2 conv layers | stride 2 in a block

struct ConvNeXtConfig {
  std::string name = "custom";
  int64_t in_chans = 3;
  int64_t num_classes = 1000;
  std::vector<int64_t> depths{3, 3, 9, 3};  // blocks per stage; isotropic: one entry
  std::vector<int64_t> dims{96, 192, 384, 768};  // width per stage; isotropic: one entry
  bool isotropic = false;
  double drop_path_rate = 0.0;
  double layer_scale_init_value = 1e-6;  // 0: no gamma parameters at all
  double head_init_scale = 1.0;

  // ---- the design space (the paper's roadmap; the defaults are ConvNeXt's) ----
  StemKind stem = StemKind::patchify;
  int64_t stem_width = 0;  // the stem's output channels; 0: dims[0]
  BlockKind block = BlockKind::inverted;
  SpatialPosition spatial = SpatialPosition::top;
  int64_t groups = 0;      // of a middle spatial conv: 0 depthwise (groups = channels), 1
                           // dense, or g groups (ResNeXt: 32); a spatial conv on top is always
                           // depthwise
  double expansion = 0;    // hidden width / dims; 0: the block's own (1/4 bottleneck, 4
                           // inverted). ResNeXt-50 32x4d: bottleneck, groups 32, expansion 0.5
  int64_t kernel = 7;      // the spatial conv's size: 3, 5, 7, 9 or 11 (padding kernel / 2)
  ActKind act = ActKind::gelu;
  bool all_acts = false;   // acts "all" (ResNet: after conv1, conv2 and the add) or "one"
  NormKind norm = NormKind::layer;
  bool all_norms = false;  // norms "all" (one per conv) or "one" (after conv1 only)
  Downsampling downsample_mode = Downsampling::separate;  // "downsampling" in files
  // A named configuration's one-line description (a roadmap step: what it changes) and the
  // paper's ImageNet-1K top-1 for it, where the paper gives one.
  std::string description;
  std::optional<double> paper_top1;

  // The same design with every width (dims, stem_width) times `width` and every depth times
  // `depth`: widths rounded to a multiple of 8 (at least 8), depths to the nearest integer (at
  // least 1). The roadmap's way to shrink every step alike for small images and CPUs. 1 and 1
  // give the configuration unchanged. Throws unless both are in (0, 4].
  ConvNeXtConfig scaled(double width, double depth) const;

  // ResNet-style (in-block downsampling): the roadmap's steps 0 to 10.
  bool resnet_style() const { return downsample_mode == Downsampling::in_block; }
  int64_t stem_channels() const { return stem_width > 0 ? stem_width : dims.at(0); }
  // The hidden width of a block of output width `dim`.
  int64_t hidden_width(int64_t dim) const {
    if (expansion > 0) return static_cast<int64_t>(static_cast<double>(dim) * expansion + 0.5);
    return block == BlockKind::inverted ? 4 * dim : dim / 4;
  }

  // The most parameters a model may have: 2^31 (8 GiB of f32 weights), comfortably above the
  // largest ConvNeXt known (timm's convnext_xxlarge, 846M). The constructor refuses a bigger
  // configuration before it allocates anything.
  static constexpr int64_t kMaxParameters = int64_t{1} << 31;
  // The most stages a hierarchical model may have (it then downsamples by 2^25).
  static constexpr size_t kMaxStages = 24;

  // Checks sizes and rates (positive depths and dims, at most kMaxStages stages, at most
  // kMaxParameters parameters); throws cnx::Error naming the bad field.
  void validate() const;
  // The number of parameters (elements) the model will have, from the sizes alone, with
  // overflow-checked arithmetic: -1 if it does not fit in int64_t. Expects positive sizes.
  int64_t num_parameters() const;
  // How much the model downsamples: 4 (the stem) times 2 per downsampling layer, 32 for four
  // stages; 16 for the isotropic stem. The smallest input is downsampling() x downsampling();
  // any larger size works, not only multiples (each patchify conv drops the remainder rows and
  // columns, as PyTorch's strided conv does). Expects a validated configuration.
  int64_t downsampling() const;
};

// The named variants: convnext_{atto,femto,pico,nano,tiny,small,base,large,xlarge},
// convnext_isotropic_{small,base,large} and the roadmap's steps (roadmap_step_names()). Unknown
// names throw, listing the known ones.
ConvNeXtConfig convnext_config(const std::string& name);
const std::vector<std::string>& convnext_model_names();  // the ConvNeXt family only
// The paper's roadmap in order: roadmap_00_resnet50 (torchvision's ResNet-50), ...,
// roadmap_06_kernel7 (with its variants roadmap_06_kernel5, _kernel9, _kernel11 after it), ...,
// roadmap_11_convnext_tiny (exactly convnext_tiny). Each differs from the step before by what
// its description says.
const std::vector<std::string>& roadmap_step_names();
// Every name convnext_config() knows: the family, then the roadmap.
std::vector<std::string> all_model_names();

// The configuration as a JSON object with the keys of tools/roadmap_reference.py's config dicts
// (name, in_chans, num_classes, depths, dims, stem, stem_width, block, spatial, groups,
// expansion, kernel, act, acts ("all" | "one"), norm, norms, downsampling, layer_scale_init_value,
// drop_path_rate, isotropic, head_init_scale), and back: keys left out keep ConvNeXt's
// defaults; an unknown key or word throws naming it ("case", "description" and "paper_top1"
// are accepted and ignored). The result is not validated (ConvNeXtConfig::validate()).
std::string config_to_json(const ConvNeXtConfig& config);
ConvNeXtConfig config_from_json(const std::string& text);

// The knobs as the words the configuration files and tools/roadmap_reference.py use
// ("patchify", "bottleneck", "middle", ...), and back (throws on an unknown word, listing the
// known ones).
const char* name_of(StemKind v);
const char* name_of(BlockKind v);
const char* name_of(SpatialPosition v);
const char* name_of(ActKind v);
const char* name_of(NormKind v);
const char* name_of(Downsampling v);
void parse_knob(const std::string& word, StemKind& v);
void parse_knob(const std::string& word, BlockKind& v);
void parse_knob(const std::string& word, SpatialPosition& v);
void parse_knob(const std::string& word, ActKind& v);
void parse_knob(const std::string& word, NormKind& v);
void parse_knob(const std::string& word, Downsampling& v);

// How a parameter's internal layout relates to the official one.
enum class ParamLayout {
  plain,      // the same
  patchify,   // official (Co, Ci, k, k)  <->  internal (Co, k, k, Ci)
  depthwise,  // official (C, 1, k, k)    <->  internal (k, k, C)
  pointwise,  // official (Co, Ci, 1, 1)  <->  internal (Co, Ci): a 1x1 conv run as linear
};

// Official <-> internal layout conversions (CPU copies; any floating dtype).
Tensor to_official_layout(const Tensor& internal, ParamLayout layout);
Tensor from_official_layout(const Tensor& official, ParamLayout layout);

struct Parameter {
  std::string name;     // the official checkpoint name, e.g. "stages.0.0.dwconv.weight"
  Shape official_shape;  // e.g. [96, 1, 7, 7]
  ParamLayout layout = ParamLayout::plain;
  Tensor value;          // internal layout; requires_grad
  // AdamW's weight decay applies (the official rule: not to 1-D tensors, not to biases).
  bool decay = true;
};

// A BatchNorm's running statistic (running_mean or running_var, (C) f32 on the model's device):
// state, not a parameter (no gradient, not optimised), updated in place by each training
// forward. (num_batches_tracked is a host counter, written out as an i64 scalar.)
struct Buffer {
  std::string name;  // e.g. "layer1.0.bn1.running_mean"
  Tensor value;
};

using NamedTensors = std::vector<std::pair<std::string, Tensor>>;

class ConvNeXt {
 public:
  // Builds the model with its family's initialisation, drawn from `init` in parameter order.
  // ConvNeXt (separate downsampling): the official one (truncated normal std 0.02 on [-2, 2] for
  // conv and linear weights, zero biases, LayerNorm ones and zeros, gamma =
  // layer_scale_init_value, head weight and bias * head_init_scale). ResNet-style (the roadmap's
  // steps 0 to 10): torchvision's (conv weights normal with std sqrt(2 / fan_out), fan_out =
  // Co k k; norms ones and zeros, running mean 0 and variance 1; fc weight and bias uniform in
  // +-1/sqrt(in features); conv biases zero; gamma = layer_scale_init_value).
  ConvNeXt(const ConvNeXtConfig& config, Generator& init);
  // The structure only: every parameter's name, official shape and layout, no values (each
  // Parameter::value undefined, nothing allocated, no buffers). For counting parameters and
  // multiply-adds of a configuration (num_parameters(), macs()); not for forward.
  struct ShapesOnly {};
  ConvNeXt(const ConvNeXtConfig& config, ShapesOnly);

  const ConvNeXtConfig& config() const { return config_; }

  // Moves every parameter and buffer to `device` (a no-op for those already there): each
  // parameter becomes a new leaf on the device, requiring grad, without a gradient. Tensors
  // aliasing the old values (an AdamW or a ModelEma made before) no longer see the model's:
  // move the model first. The values are copied exactly (f32 bytes).
  void to(Device device);
  // Where the parameters are (the device of the first; to() keeps them together).
  Device device() const;

  // images (N, H, W, in_chans) on the model's device, already normalised -> logits
  // (N, num_classes). In training mode drop path draws its per-sample masks from `drop_gen` (on
  // the host, so every device drops the same samples); otherwise nothing is drawn. In training
  // mode every BatchNorm normalises with the batch's statistics and updates its running ones
  // (and num_batches_tracked); otherwise it uses the running ones.
  //
  // `activations` is the dtype of the activations between the stem and the global pool: the
  // parameters' own (f32: full precision), or bf16 for mixed precision (--use_amp): the images
  // are rounded to bf16 once, every layer from the stem to the last block reads and writes bf16
  // activations with its fp32 parameters (GEMMs on bf16 copies of their weights, fp32
  // accumulation; LayerNorm and BatchNorm statistics in fp32), and the pooled features come back
  // to fp32, so the head's LayerNorm and linear, the logits and the loss are fp32. Gradients
  // follow the same dtypes backwards; every parameter gradient is fp32.
  // Throws cnx::Error, naming the smallest size, if an H x W input is smaller than the model
  // takes (min_input_size()); and, for a model with BatchNorm in training mode, if some
  // BatchNorm would see one value per channel (batch 1 and a 1x1 map). forward() checks both
  // first.
  //
  // `bf16_weights` (optional, mixed precision only): one tensor per parameter, in parameter
  // order, each the bf16 cast of that parameter or undefined: AdamW::bf16_copies() after
  // AdamW::keep_bf16_copies(bf16_gemm_weights()). The GEMMs read those copies instead of casting
  // their fp32 weights on every forward; the results are bitwise the same as without them, as
  // long as the copies are current (train/optim/adamw.h says who refreshes them). Ignored for
  // f32 activations.
  //
  // `drop_scales` (optional, training only): the drop-path multipliers drawn ahead of the
  // forward by draw_drop_scales() and moved to the model's device, (drop_path_blocks(), N) in
  // param_dtype(activations). The forward then reads them instead of drawing from drop_gen,
  // which it leaves untouched. A captured training step (CUDA graphs) needs this: its kernels
  // read the multipliers from a buffer the trainer refills before each replay.
  Tensor forward(const Tensor& images, bool training, Generator& drop_gen,
                 DType activations = DType::f32,
                 const std::vector<Tensor>* bf16_weights = nullptr,
                 const Tensor* drop_scales = nullptr) const;
  // The blocks whose drop-path rate is above 0: those that draw multipliers in training.
  int64_t drop_path_blocks() const;
  // The multipliers a training forward of N images would draw from drop_gen, drawn now, in the
  // same order and from the same generator states: row k is the k-th drawing block's (N), in
  // forward order; a CPU tensor (drop_path_blocks(), N) of param_dtype(activations). A forward
  // given them (drop_scales) is bitwise the forward that draws them itself, and drop_gen ends
  // where that forward would leave it.
  Tensor draw_drop_scales(int64_t N, Generator& drop_gen, DType activations) const;
  // The indices (into parameters()) of the weights that a bf16 forward casts to bf16: the
  // patchify convs' and the linear (1x1) layers' of the blocks. (Not the head's: it runs in
  // fp32; not those of the general convs, conv2d, which cast their own.)
  std::vector<size_t> bf16_gemm_weights() const;
  // The smallest input side the model takes: downsampling() for ConvNeXt; for a ResNet-style
  // model 4 with the patchify stem (its 4x4/4 conv), 1 with the ResNet stem (every later
  // conv and pool is padded).
  int64_t min_input_size() const;
  void check_input_size(int64_t H, int64_t W) const;
  // Multiply-adds of the convolutions and linear layers for one H x W image (what papers call
  // FLOPs: ResNet-50 4.1 G and ConvNeXt-T 4.5 G at 224 x 224). Norms, activations, pools and
  // the residual adds are not counted. Works on a ShapesOnly model.
  int64_t macs(int64_t H, int64_t W) const;
  // Whether the model has BatchNorm layers (and so buffers).
  bool has_batch_norm() const { return !bn_.empty(); }

  // In official order (the order of the official model's state_dict(), buffers left out).
  std::vector<Parameter>& parameters() { return params_; }
  const std::vector<Parameter>& parameters() const { return params_; }
  const Parameter& parameter(const std::string& name) const;
  int64_t num_parameters() const;  // elements
  // The BatchNorm running statistics (running_mean, running_var of each, in order); empty for
  // ConvNeXt.
  const std::vector<Buffer>& buffers() const { return buffers_; }
  // Copies the running statistics and counters of `other`, a model of the same configuration
  // (the EMA's evaluation copy takes the live model's: EMA averages parameters only).
  void copy_buffers_from(const ConvNeXt& other);
  // The drop path probability of every block, in order.
  std::vector<double> drop_path_rates() const;

  // Official names and layouts, f32 CPU copies (from any device), parameters and buffers
  // interleaved as PyTorch's state_dict() orders them (num_batches_tracked an i64 scalar).
  NamedTensors state_dict() const;
  // The names and official shapes of state_dict()'s entries, in its order, without copying
  // anything (also for a ShapesOnly model).
  std::vector<std::pair<std::string, Shape>> state_dict_shapes() const;
  // Strict: every parameter and buffer present, nothing unexpected, official shapes, floating
  // dtypes (converted to f32; num_batches_tracked integer), copied to the parameters' device.
  // Reports every missing, unexpected and mis-shaped name in one error; the model is unchanged
  // if anything is wrong. Names from elsewhere (timm's, or a training checkpoint's wrapper
  // prefix) get a one-line diagnosis with the tools/convert_checkpoint.py command instead of the
  // lists; a file that differs only by the layer scale (.gamma) tensors gets a hint about
  // layer_scale_init_value.
  void load_state_dict(const NamedTensors& tensors);
  // The accumulated gradients in official names and layouts, CPU copies (zeros where none was
  // computed). Parameters only.
  NamedTensors gradients() const;
  void zero_grad();

 private:
  // A conv or linear layer and the op forward runs it with.
  struct Conv {
    enum class Op { linear, dwconv, patchify, conv2d } op = Op::linear;
    int64_t w = -1, b = -1;  // parameter indices (b -1: no bias)
    int64_t ci = 0, co = 0, k = 1, stride = 1, pad = 0, groups = 1;
  };
  // A LayerNorm or BatchNorm; w -1: none.
  struct Norm {
    NormKind kind = NormKind::layer;
    int64_t w = -1, b = -1;
    int64_t bn = -1;  // BatchNorm: index into bn_
    bool present() const { return w >= 0; }
  };
  struct BatchNormState {
    size_t running_mean, running_var;  // indices into buffers_
    std::string name;                  // the module's, e.g. "layer1.0.bn1"
  };
  // Any block of the design space. ConvNeXt's: c1 dwconv, n1 LayerNorm, c2 linear C -> 4C,
  // act2 GELU, c3 linear 4C -> C, identity shortcut.
  struct Block {
    Conv c1, c2, c3;
    Norm n1, n2, n3;
    bool act1 = false, act2 = false, act_out = false;
    bool projection = false;  // shortcut: proj then proj_norm, else identity
    Conv proj;
    Norm proj_norm;
    int64_t gamma = -1;
    double drop_prob = 0;
  };
  // ConvNeXt: a patchify conv with a LayerNorm before (or, for the stem, after) it.
  struct Downsample {
    int64_t conv_w, conv_b, ln_w = -1, ln_b = -1;
    bool norm_first = false;
    int64_t ci = 0, co = 0, k = 1;
  };
  // ResNet-style: the stem (conv -> norm -> act [-> maxpool]).
  struct Stem {
    Conv conv;
    Norm norm;
    bool act = false, maxpool = false;
  };
  // How each entry of state_dict() is found, in order.
  struct Entry {
    enum class Kind { parameter, buffer, batches } kind;
    size_t index;  // into params_, buffers_ or bn_
  };
  enum class Init { trunc_normal, zeros, ones, layer_scale, kaiming_fan_out, linear_uniform };

  ConvNeXt(const ConvNeXtConfig& config, Generator* init);
  void build_convnext(std::vector<Init>& inits);
  void build_resnet_style(std::vector<Init>& inits);
  void init_values(const std::vector<Init>& inits, Generator& init);
  // Registers a parameter (its value comes later, from init_values) and how it starts.
  int64_t add_param(const std::string& name, const Shape& official_shape, ParamLayout layout,
                    Init how, std::vector<Init>& inits);
  // `drop_scale`: this block's pre-drawn multipliers (N), or undefined to draw them from
  // drop_gen (when training and the block's rate is above 0).
  Tensor block_forward(const Block& b, const Tensor& x, bool training, Generator& drop_gen,
                       const std::vector<Tensor>* bf16_weights, const Tensor& drop_scale) const;
  Tensor conv_forward(const Conv& c, const Tensor& x, const std::vector<Tensor>* bf16_weights) const;
  Tensor norm_forward(const Norm& n, const Tensor& x, bool training) const;
  Tensor act_forward(const Tensor& x) const;
  void check_batch_norm_batch(int64_t N, int64_t H, int64_t W) const;
  // An H x W image through the convolutions: their multiply-adds, and the last stage's map size.
  struct ConvWalk {
    int64_t macs = 0, h = 0, w = 0;
  };
  ConvWalk walk_convs(int64_t H, int64_t W) const;
  // The official name and shape of a state_dict() entry.
  std::pair<std::string, Shape> entry_of(const Entry& e) const;
  const Tensor& p(int64_t index) const { return params_[static_cast<size_t>(index)].value; }
  // The bf16 copy of parameter `index` from forward's bf16_weights, or an undefined tensor.
  static Tensor bf16_of(const std::vector<Tensor>* bf16_weights, int64_t index) {
    return bf16_weights ? (*bf16_weights)[static_cast<size_t>(index)] : Tensor();
  }

  ConvNeXtConfig config_;
  std::vector<Parameter> params_;
  std::vector<Buffer> buffers_;
  std::vector<BatchNormState> bn_;
  mutable std::vector<int64_t> bn_batches_;  // num_batches_tracked of each BatchNorm
  std::vector<Entry> entries_;               // state_dict() order
  bool shapes_only_ = false;
  std::vector<Downsample> downsample_;      // ConvNeXt: one per stage
  Stem stem_;                               // ResNet-style
  std::vector<std::vector<Block>> stages_;  // blocks per stage
  int64_t norm_w_ = -1, norm_b_ = -1, head_w_ = -1, head_b_ = -1;
};

// Images from PyTorch's layout to ours: (N, C, H, W) -> (N, H, W, C), a CPU copy.
Tensor nchw_to_nhwc(const Tensor& images);

}  // namespace cnx
