// LayerNorm over the channel (last) dimension of `rows` rows of C values (channels-last
// activations are rows = N*H*W; the head's norm is rows = N):
//
//   mean = sum_c x_c / C,   var = sum_c (x_c - mean)^2 / C   (biased),   rstd = 1/sqrt(var + eps)
//   xhat_c = (x_c - mean) * rstd,   out_c = xhat_c * weight_c + bias_c
//
// Forward saves mean and rstd per row (statistics accumulate in double on the CPU).
// Backward, with g_c = dout_c * weight_c:
//   din_c = rstd * (g_c - mean_c'(g) - xhat_c * mean_c'(g * xhat))
//   dweight_c = sum_rows dout_c * xhat_c,   dbias_c = sum_rows dout_c
//
// Types. T is the activation type of out, in, dout and din: float, double or bf16 on the CPU,
// float or bf16 on CUDA. weight, bias, the statistics mean and rstd, and the parameter
// gradients dweight and dbias are param_t<T> (tensor/dtype.h): T itself for float and double,
// fp32 for bf16 (mixed precision). With bf16 activations every value is computed in fp32 from
// the widened bf16 inputs, exactly as the f32 kernel computes it, and only the activation
// outputs (out, din) are rounded to bf16, once each; mean, rstd, dweight and dbias are the
// f32 kernel's fp32 results (dweight and dbias summed over rows in fp32 or better, never
// rounded to bf16).
#pragma once

#include <cstdint>
#include <type_traits>

#include "kernels/stream.h"
#include "tensor/dtype.h"

namespace cnx::cpu {

// out, in (rows, C); weight, bias (C); mean, rstd (rows) are written for backward.
template <class T>
void layernorm_forward(T* out, param_t<T>* mean, param_t<T>* rstd, const T* in,
                       const param_t<T>* weight, const param_t<T>* bias, int64_t rows, int64_t C,
                       double eps);

// Writes each gradient whose pointer is non-null: din (rows, C), dweight (C), dbias (C).
// in, mean and rstd may be null when only dbias is wanted; weight when din is not.
template <class T>
void layernorm_backward(T* din, param_t<T>* dweight, param_t<T>* dbias, const T* dout,
                        const T* in, const param_t<T>* weight, const param_t<T>* mean,
                        const param_t<T>* rstd, int64_t rows, int64_t C);

}  // namespace cnx::cpu

// CUDA launchers (kernels/cuda/layernorm.cu): T float or bf16 (the activations), fp32
// parameters, statistics and parameter gradients; device pointers, asynchronous on `stream`.
// Statistics in fp32 (two passes over the row held in registers). dweight and dbias are
// reduced over rows in fp32 in two deterministic stages through `workspace`
// (layernorm_backward_workspace_floats(rows, C) floats, whatever T; unused when both are null).
// T is deduced from `out` and `in` (forward) or `dout` (backward); din and in may be null.
namespace cnx::cuda {

template <class T>
void layernorm_forward(T* out, float* mean, float* rstd, const T* in, const float* weight,
                       const float* bias, int64_t rows, int64_t C, double eps,
                       cudaStream_t stream);

int64_t layernorm_backward_workspace_floats(int64_t rows, int64_t C);
// Writes each gradient whose pointer is non-null: din (rows, C), dweight (C), dbias (C).
// in, mean and rstd may be null when only dbias is wanted; weight when din is not.
template <class T>
void layernorm_backward(std::type_identity_t<T>* din, float* dweight, float* dbias, const T* dout,
                        const std::type_identity_t<T>* in, const float* weight, const float* mean,
                        const float* rstd, int64_t rows, int64_t C, float* workspace,
                        cudaStream_t stream);

}  // namespace cnx::cuda
