// The depthwise conv and the LayerNorm after it, fused (the first two ops of a ConvNeXt block):
//
//   y   = dwconv(in, dw_weight, dw_bias)              (kernels/dwconv.h: odd k, padding k/2)
//   out = layernorm(y, ln_weight, ln_bias, eps)      (kernels/layernorm.h: over C, biased var)
//
// Layouts as the two ops': in, y, out (N, H, W, C); dw_weight (k, k, C); dw_bias, ln_weight,
// ln_bias (C); mean, rstd (N*H*W), the per-pixel statistics of y. Element types: T for the
// activations (in, y, out), param_t<T> for the parameters and statistics (fp32 for bf16).
//
// Why fuse: unfused, y is written by the conv and read back by the LayerNorm. The fused CUDA
// kernel keeps a tile's y in shared memory, normalises it there and writes out: one read of in
// and one write of out (plus y, when backward needs it) instead of two reads and two writes.
//
// Forward saves for backward what the two ops save: y, mean and rstd (the LayerNorm's input and
// statistics); in and dw_weight are the conv's. Backward is the two existing backward ops in
// reverse order, called by autograd/ops/dwconv_layer_norm.cpp:
//   dy                     = layernorm_backward(dout; y, ln_weight, mean, rstd)  (+ dln_weight, dln_bias)
//   dx, ddw_weight, ddw_bias = dwconv_backward(dy; in, dw_weight)
// so there is no fused backward to get wrong.
//
// Numerics: y is rounded to T before it is normalised (a bf16 y is the bf16 tensor the unfused
// ops would pass on, and the saved y is exactly what the statistics were computed from); the
// statistics are fp32 (double on the CPU for T = double), eps as given (ConvNeXt: 1e-6).
#pragma once

#include <cstdint>
#include <type_traits>

#include "kernels/stream.h"
#include "tensor/dtype.h"

namespace cnx::cpu {

// The reference: cpu::dwconv_forward, then cpu::layernorm_forward (so bitwise theirs). y, mean
// and rstd may be null (not wanted); dw_bias may be null (no conv bias).
template <class T>
void dwconv_layernorm_forward(T* out, T* y, param_t<T>* mean, param_t<T>* rstd, const T* in,
                              const param_t<T>* dw_weight, const param_t<T>* dw_bias,
                              const param_t<T>* ln_weight, const param_t<T>* ln_bias, int64_t N,
                              int64_t H, int64_t W, int64_t C, int64_t k, double eps);

}  // namespace cnx::cpu

// CUDA (kernels/cuda/dwconv_layernorm.cu): T float or bf16, named (cuda::..._forward<bf16>);
// device pointers of any alignment, asynchronous on `stream`. out must not overlap in.
namespace cnx::cuda {

// Whether the fused kernel takes these sizes: k == 7 (ConvNeXt's; the filter lives in registers
// and the kernel is compiled for it) and C <= 2048 (one tile's y in shared memory). Otherwise use
// the two ops.
bool dwconv_layernorm_supported(int64_t C, int64_t k);

// out (N, H, W, C); y (N, H, W, C), mean, rstd (N*H*W) may each be null (not written). Throws
// cnx::Error when !dwconv_layernorm_supported(C, k).
//   - y is bitwise cuda::dwconv_forward<T>'s output (the same fma chain per output);
//   - mean, rstd and out are computed from y as the CUDA LayerNorm's generic path computes them
//     (one warp per pixel, lane c sums channels c, c + 32, ..., then a butterfly): bitwise
//     cuda::layernorm_forward's where that takes its generic path (C % 4 != 0 for float, C % 8
//     != 0 for bf16, or misaligned rows); its fast path sums in another order (a few ulp apart).
template <class T = float>
void dwconv_layernorm_forward(std::type_identity_t<T>* out, std::type_identity_t<T>* y,
                              float* mean, float* rstd, const std::type_identity_t<T>* in,
                              const float* dw_weight, const float* dw_bias,
                              const float* ln_weight, const float* ln_bias, int64_t N, int64_t H,
                              int64_t W, int64_t C, int64_t k, double eps, cudaStream_t stream);

}  // namespace cnx::cuda
