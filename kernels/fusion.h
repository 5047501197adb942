// The fusions of the training step that can be switched off, one environment variable each, so
// that a benchmark or the cost model (bench/cost_model.cpp) can compare a fused step with the
// ops it replaces. Each "off" path runs ops that exist anyway (no kernel is written only for it),
// and gives the same results as the fused one (bitwise where the arithmetic is the same; the
// tests named in each line say how close otherwise):
//
//   CNX_LINEAR_BIAS=0          linear's forward: the plain GEMM, then a bias pass, instead of
//                              cuBLASLt's BIAS epilogue (CUDA; kernels/cuda/linear.cu's
//                              fallback path: bf16 goes through an fp32 scratch product).
//                              Bitwise (tests/test_cuda_fusion_switches.cpp,
//                              tests/test_cuda_gemm_paths.cpp).
//   CNX_LINEAR_BGRADB=0        linear's bias gradient by column-sum kernels instead of the
//                              weight-gradient GEMM's BGRADB epilogue (CUDA). Same sums, another
//                              order: within f32 rounding (tests/test_cuda_fusion_switches.cpp).
//   CNX_FUSE_DWCONV_LN=0       a block's depthwise conv and LayerNorm as two ops instead of
//                              dwconv_layer_norm's fused kernel (CUDA; the CPU always runs two).
//                              Bitwise or within rounding (tests/test_cuda_fusions.cpp).
//   CNX_FUSE_SCALED_RESIDUAL=0 the end of a block as layer_scale, drop_path and add (three ops)
//                              instead of scaled_residual (CPU and CUDA): bitwise in f32; bf16
//                              rounds three times instead of once (tests/test_fusion_switches.cpp).
//   CNX_BF16_WEIGHT_COPIES=0   mixed precision: AdamW keeps no bf16 copies of the GEMM weights
//                              (AdamW::keep_bf16_copies does nothing), so each bf16 forward casts
//                              every GEMM weight again (CPU and CUDA). Bitwise
//                              (tests/test_cuda_fusion_switches.cpp).
//
// Each is read once per process, the first time it is asked for; set_fusion_enabled overrides it
// from then on (tests switch one off for a scope, as set_cublaslt_enabled does for cuBLASLt).
// Unset, or any value but "0": on.
#pragma once

namespace cnx {

enum class Fusion : int {
  linear_bias = 0,
  linear_bgradb,
  dwconv_layernorm,
  scaled_residual,
  bf16_weight_copies,
};
inline constexpr int kFusionCount = 5;

// The environment variable of a fusion ("CNX_LINEAR_BIAS", ...).
const char* fusion_env_name(Fusion f);
// Whether the fusion is on: its environment variable (read once), or what set_fusion_enabled
// last said.
bool fusion_enabled(Fusion f);
void set_fusion_enabled(Fusion f, bool on);

// One fusion set on or off for a scope, then restored (tests).
class FusionSetting {
 public:
  FusionSetting(Fusion f, bool on) : f_(f), saved_(fusion_enabled(f)) { set_fusion_enabled(f, on); }
  ~FusionSetting() { set_fusion_enabled(f_, saved_); }
  FusionSetting(const FusionSetting&) = delete;
  FusionSetting& operator=(const FusionSetting&) = delete;

 private:
  Fusion f_;
  bool saved_;
};

}  // namespace cnx
