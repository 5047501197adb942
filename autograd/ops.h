// The differentiable ops of ConvNeXt. Each is recorded on the autograd tape when grad mode is
// on and an input requires grad. All activations are NHWC; (..., C) means any leading shape.
// Every op validates its arguments and throws cnx::Error naming the op and the shapes.
// Implementation: one file per op in autograd/ops/, with the Function's forward and backward
// side by side; the math lives in kernels/<op>.h.
#pragma once

#include "tensor/tensor.h"

namespace cnx {

// ---- convolutions ----------------------------------------------------------------------------
// Patchify conv: a k x k kernel with stride k and no padding (the 4x4/4 stem, the 2x2/2
// downsampling). x (N, H, W, Ci), weight (Co, k, k, Ci), bias (Co) or undefined
// -> (N, H/k, W/k, Co), sizes floored as in PyTorch (9x9 with k=2 gives 4x4).
// weight_bf16: as linear's.
Tensor patchify_conv(const Tensor& x, const Tensor& weight, const Tensor& bias,
                     const Tensor& weight_bf16 = Tensor());

// Depthwise conv, odd k, padding k/2, stride 1 (ConvNeXt: 7x7).
// x (N, H, W, C), weight (k, k, C), bias (C) or undefined -> (N, H, W, C).
Tensor dwconv(const Tensor& x, const Tensor& weight, const Tensor& bias);

// The depthwise conv and the LayerNorm after it in one op (a ConvNeXt block's first two):
// layer_norm(dwconv(x, dw_weight, dw_bias), ln_weight, ln_bias, eps), the same values and
// gradients as the two ops (kernels/dwconv_layernorm.h says how close on CUDA); one fused
// kernel on CUDA for k = 7. x (N, H, W, C), dw_weight (k, k, C), dw_bias (C) or undefined,
// ln_weight, ln_bias (C) -> (N, H, W, C).
Tensor dwconv_layer_norm(const Tensor& x, const Tensor& dw_weight, const Tensor& dw_bias,
                         const Tensor& ln_weight, const Tensor& ln_bias, double eps = 1e-6);

// Dense 2-D convolution (the roadmap's ResNet convs), NHWC, zero padding, the same stride and
// padding in both directions, `groups` dividing Ci and Co (1: dense, 32: ResNeXt, Ci: depthwise).
// x (N, H, W, Ci), weight (Co, kh, kw, Ci / groups), bias (Co) or undefined
// -> (N, Ho, Wo, Co) with Ho = (H + 2 padding - kh) / stride + 1 (floored), likewise Wo.
// The weight layout is the official (Co, Ci / groups, kh, kw) with the channels last, as
// patchify_conv's (ParamLayout::patchify converts it). kernels/conv2d.h has the math.
Tensor conv2d(const Tensor& x, const Tensor& weight, const Tensor& bias, int64_t stride,
              int64_t padding, int64_t groups = 1);

// Max pooling, k x k window, stride s, padding p: padded cells never win (they count as -inf),
// as in PyTorch. x (N, H, W, C) -> (N, Ho, Wo, C), Ho = (H + 2 padding - k) / stride + 1. The
// gradient goes to the first maximum of each window in row-major window order (PyTorch's
// choice); NaN propagates (a window with a NaN outputs NaN; its gradient goes to the last NaN,
// PyTorch's `val > max || isnan(val)` rule). ResNet's stem: max_pool2d(x, 3, 2, 1).
// f32, f64, bf16 (exact: the output is an element of x). Needs kernel >= 1, stride >= 1,
// 0 <= padding <= kernel / 2 (PyTorch's rule) and an output of at least 1 x 1. Saves an int32
// argmax per output (kernels/maxpool.h), not x.
Tensor max_pool2d(const Tensor& x, int64_t kernel, int64_t stride, int64_t padding);

// ---- normalisation and pointwise layers ------------------------------------------------------
// LayerNorm over the last dimension: (x - mean) / sqrt(var + eps) * weight + bias, with the
// biased variance. x (..., C), weight (C), bias (C). ConvNeXt uses eps = 1e-6.
Tensor layer_norm(const Tensor& x, const Tensor& weight, const Tensor& bias, double eps = 1e-6);

// BatchNorm over the channels of x (..., C) (NHWC: statistics over N, H and W):
// (x - mean) / sqrt(var + eps) * weight + bias, with weight, bias, running_mean and running_var
// (C) in the parameters' dtype (f32 for bf16 x, like LayerNorm's).
// training: mean and the biased variance of this batch; running_mean and running_var are
//   updated in place, not recorded: r = (1 - momentum) r + momentum s, with the unbiased
//   variance (count / (count - 1)) for running_var, as PyTorch. Needs more than one value per
//   channel (throws otherwise, as PyTorch does).
// eval: the running statistics; nothing is updated.
// The caller (the model) keeps num_batches_tracked. PyTorch's defaults: eps 1e-5, momentum 0.1.
// x has rank >= 2 ((N, C) works too); the running stats must be defined, in either mode.
// kernels/batchnorm.h has the math and what forward saves.
Tensor batch_norm(const Tensor& x, const Tensor& weight, const Tensor& bias,
                  const Tensor& running_mean, const Tensor& running_var, bool training,
                  double momentum = 0.1, double eps = 1e-5);

// x W^T + b over the last dimension: x (..., K), weight (N, K), bias (N) or undefined
// -> (..., N). The pointwise 1x1 convs of a block and the classifier head.
// weight_bf16 (optional): with a bf16 x, the GEMM reads a bf16 copy of the fp32 weight; by
// default forward casts it, and a caller that already has bf16(weight) (AdamW::bf16_copies())
// passes it here to skip that cast. It must be exactly that cast (bf16, weight's shape and
// device; checked, except the values); the gradient still goes to weight, in fp32. Ignored when
// x is not bf16.
Tensor linear(const Tensor& x, const Tensor& weight, const Tensor& bias,
              const Tensor& weight_bf16 = Tensor());

// ReLU: max(x, 0), gradient 0 at x <= 0 (PyTorch's). Any shape; f32, f64, bf16 (exact). NaN
// gives NaN, and its gradient passes through (PyTorch's threshold_backward). Saves the output.
Tensor relu(const Tensor& x);

// GELU, exact erf form: x * Phi(x) = 0.5 x (1 + erf(x / sqrt 2)). Any shape.
Tensor gelu(const Tensor& x);

// Layer scale: x (..., C) times gamma (C), per channel.
Tensor layer_scale(const Tensor& x, const Tensor& gamma);

// ---- drop path (stochastic depth) ------------------------------------------------------------
// Per-sample multipliers for drop path: scale[n] = 1/keep_prob with probability keep_prob,
// else 0, with keep_prob = 1 - drop_prob, drawn in order n = 0..N-1 from `gen` on the host (so
// that every device drops the same samples). Returns a (N) tensor of `dtype` on `device`.
Tensor drop_path_scale(int64_t N, double drop_prob, Generator& gen, DType dtype = DType::f32,
                       Device device = Device::cpu());
// x (N, ...) times scale[n] for each sample n. `scale` is a constant (no gradient).
Tensor drop_path(const Tensor& x, const Tensor& scale);
// Training: draws the scale from `gen` and applies it. Identity (returns x, draws nothing)
// when !training or drop_prob == 0.
Tensor drop_path(const Tensor& x, double drop_prob, bool training, Generator& gen);

// ---- the end of a block, fused ----------------------------------------------------------------
// x + drop_path(layer_scale(h, gamma), scale) in one pass (kernels/scaled_residual.h): x, h
// (N, ..., C); gamma (C) or undefined (no layer scale); scale (N), a drop_path_scale draw, or
// undefined (no drop path). Bitwise the unfused ops' result in f32 on the CPU; a dropped
// sample's h is not read.
Tensor scaled_residual(const Tensor& x, const Tensor& h, const Tensor& gamma, const Tensor& scale);

// ---- elementwise and reductions --------------------------------------------------------------
Tensor add(const Tensor& a, const Tensor& b);  // same shape: the residual connection
Tensor mul(const Tensor& a, const Tensor& b);  // same shape, elementwise
Tensor sum(const Tensor& x);                   // all elements -> one-element tensor, shape []
// Same elements, another shape of the same numel.
Tensor reshape(const Tensor& x, const Shape& shape);
// The same values in another floating dtype (f32, f64, bf16; on CUDA f32 <-> bf16): rounded
// to nearest even when narrowing. The gradient comes back in x's dtype. Returns x itself when it
// already has `dtype`. Mixed precision casts the input, the GEMM weights and the logits.
Tensor cast(const Tensor& x, DType dtype);
// Mean over H and W: x (N, H, W, C) -> (N, C).
Tensor global_avg_pool(const Tensor& x);

// ---- losses ----------------------------------------------------------------------------------
// Softmax cross-entropy with hard labels, mean over the batch. logits (N, K) floating,
// labels (N) i64 in [0, K). With label smoothing s the target is (1 - s) one_hot + s / K.
Tensor cross_entropy(const Tensor& logits, const Tensor& labels, double label_smoothing = 0.0);
// Softmax cross-entropy with soft targets (Mixup/CutMix), mean over the batch:
// mean_n sum_k -targets[n, k] * log_softmax(logits)[n, k]. logits, targets (N, K).
Tensor soft_cross_entropy(const Tensor& logits, const Tensor& targets);

// ---- not recorded ----------------------------------------------------------------------------
// dst += src in place (same shape, dtype, device). Used for gradient accumulation.
void add_(Tensor& dst, const Tensor& src);

}  // namespace cnx
