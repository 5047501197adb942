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
#pragma once

#include <string>
#include <utility>
#include <vector>

#include "tensor/tensor.h"

namespace cnx {

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

// The named variants: convnext_{atto,femto,pico,nano,tiny,small,base,large,xlarge} and
// convnext_isotropic_{small,base,large}. Unknown names throw, listing the known ones.
ConvNeXtConfig convnext_config(const std::string& name);
const std::vector<std::string>& convnext_model_names();

// How a parameter's internal layout relates to the official one.
enum class ParamLayout {
  plain,      // the same
  patchify,   // official (Co, Ci, k, k)  <->  internal (Co, k, k, Ci)
  depthwise,  // official (C, 1, k, k)    <->  internal (k, k, C)
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

using NamedTensors = std::vector<std::pair<std::string, Tensor>>;

class ConvNeXt {
 public:
  // Builds the model with the official initialisation, drawn from `init` in parameter order
  // (truncated normal std 0.02 on [-2, 2] for conv and linear weights, zero biases, LayerNorm
  // ones and zeros, gamma = layer_scale_init_value, head weight and bias * head_init_scale).
  ConvNeXt(const ConvNeXtConfig& config, Generator& init);

  const ConvNeXtConfig& config() const { return config_; }

  // Moves every parameter to `device` (a no-op for those already there): each becomes a new
  // leaf on the device, requiring grad, without a gradient. Tensors aliasing the old values
  // (an AdamW or a ModelEma made before) no longer see the model's: move the model first.
  // The values are copied exactly (f32 bytes).
  void to(Device device);
  // Where the parameters are (the device of the first; to() keeps them together).
  Device device() const;

  // images (N, H, W, in_chans) on the model's device, already normalised -> logits
  // (N, num_classes). In training mode drop path draws its per-sample masks from `drop_gen` (on
  // the host, so every device drops the same samples); otherwise nothing is drawn.
  //
  // `activations` is the dtype of the activations between the stem and the global pool: the
  // parameters' own (f32: full precision), or bf16 for mixed precision (--use_amp): the images
  // are rounded to bf16 once, every layer from the stem to the last block reads and writes bf16
  // activations with its fp32 parameters (GEMMs on bf16 copies of their weights, fp32
  // accumulation; LayerNorm statistics in fp32), and the pooled features come back to fp32, so
  // the head's LayerNorm and linear, the logits and the loss are fp32. Gradients follow the same
  // dtypes backwards; every parameter gradient is fp32.
  // Throws cnx::Error, naming the smallest size, if an H x W input is smaller than the model
  // takes (config().downsampling() in each direction); forward() checks this first.
  //
  // `bf16_weights` (optional, mixed precision only): one tensor per parameter, in parameter
  // order, each the bf16 cast of that parameter or undefined: AdamW::bf16_copies() after
  // AdamW::keep_bf16_copies(bf16_gemm_weights()). The GEMMs read those copies instead of casting
  // their fp32 weights on every forward; the results are bitwise the same as without them, as
  // long as the copies are current (train/optim/adamw.h says who refreshes them). Ignored for
  // f32 activations.
  Tensor forward(const Tensor& images, bool training, Generator& drop_gen,
                 DType activations = DType::f32,
                 const std::vector<Tensor>* bf16_weights = nullptr) const;
  // The indices (into parameters()) of the weights that a bf16 forward casts to bf16: the
  // patchify convs' and the blocks' linear layers'. (Not the head's: it runs in fp32.)
  std::vector<size_t> bf16_gemm_weights() const;
  void check_input_size(int64_t H, int64_t W) const;

  // In official order (the order of the official model's state_dict()).
  std::vector<Parameter>& parameters() { return params_; }
  const std::vector<Parameter>& parameters() const { return params_; }
  const Parameter& parameter(const std::string& name) const;
  int64_t num_parameters() const;  // elements
  // The drop path probability of every block, in order.
  std::vector<double> drop_path_rates() const;

  // Official names and layouts, f32 CPU copies (from any device).
  NamedTensors state_dict() const;
  // Strict: every parameter present, nothing unexpected, official shapes, floating dtypes
  // (converted to f32), copied to the parameters' device. Reports every missing, unexpected and
  // mis-shaped name in one error; the model is unchanged if anything is wrong. Names from
  // elsewhere (timm's, or a training checkpoint's wrapper prefix) get a one-line diagnosis with
  // the tools/convert_checkpoint.py command instead of the lists; a file that differs only by
  // the layer scale (.gamma) tensors gets a hint about layer_scale_init_value.
  void load_state_dict(const NamedTensors& tensors);
  // The accumulated gradients in official names and layouts, CPU copies (zeros where none was
  // computed).
  NamedTensors gradients() const;
  void zero_grad();

 private:
  struct Block {
    int64_t dw_w, dw_b, ln_w, ln_b, pw1_w, pw1_b, pw2_w, pw2_b, gamma;  // parameter indices
    double drop_prob;
  };
  struct Downsample {  // a patchify conv with a LayerNorm before (or, for the stem, after) it
    int64_t conv_w, conv_b, ln_w = -1, ln_b = -1;
    bool norm_first = false;
  };

  int64_t add_param(const std::string& name, const Shape& official_shape, ParamLayout layout,
                    bool decay);
  Tensor block_forward(const Block& b, const Tensor& x, bool training, Generator& drop_gen,
                       const std::vector<Tensor>* bf16_weights) const;
  const Tensor& p(int64_t index) const { return params_[static_cast<size_t>(index)].value; }
  // The bf16 copy of parameter `index` from forward's bf16_weights, or an undefined tensor.
  static Tensor bf16_of(const std::vector<Tensor>* bf16_weights, int64_t index) {
    return bf16_weights ? (*bf16_weights)[static_cast<size_t>(index)] : Tensor();
  }

  ConvNeXtConfig config_;
  std::vector<Parameter> params_;
  std::vector<Downsample> downsample_;     // one per stage
  std::vector<std::vector<Block>> stages_;  // blocks per stage
  int64_t norm_w_ = -1, norm_b_ = -1, head_w_ = -1, head_b_ = -1;
};

// Images from PyTorch's layout to ours: (N, C, H, W) -> (N, H, W, C), a CPU copy.
Tensor nchw_to_nhwc(const Tensor& images);

}  // namespace cnx
