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
#pragma once

#include <cstdint>

#include "kernels/stream.h"

namespace cnx::cpu {

// out, in (rows, C); weight, bias (C); mean, rstd (rows) are written for backward.
template <class T>
void layernorm_forward(T* out, T* mean, T* rstd, const T* in, const T* weight, const T* bias,
                       int64_t rows, int64_t C, double eps);

// Writes each gradient whose pointer is non-null: din (rows, C), dweight (C), dbias (C).
// in, mean and rstd may be null when only dbias is wanted; weight when din is not.
template <class T>
void layernorm_backward(T* din, T* dweight, T* dbias, const T* dout, const T* in, const T* weight,
                        const T* mean, const T* rstd, int64_t rows, int64_t C);

}  // namespace cnx::cpu

// CUDA launchers (kernels/cuda/layernorm.cu): f32, device pointers, asynchronous on `stream`.
// Statistics in fp32 (two passes over the row held in registers). dweight and dbias are
// reduced over rows in two deterministic stages through `workspace`
// (layernorm_backward_workspace_floats(rows, C) floats; unused when both are null).
namespace cnx::cuda {

void layernorm_forward(float* out, float* mean, float* rstd, const float* in, const float* weight,
                       const float* bias, int64_t rows, int64_t C, double eps,
                       cudaStream_t stream);

int64_t layernorm_backward_workspace_floats(int64_t rows, int64_t C);
// Writes each gradient whose pointer is non-null: din (rows, C), dweight (C), dbias (C).
// in, mean and rstd may be null when only dbias is wanted; weight when din is not.
void layernorm_backward(float* din, float* dweight, float* dbias, const float* dout,
                        const float* in, const float* weight, const float* mean, const float* rstd,
                        int64_t rows, int64_t C, float* workspace, cudaStream_t stream);

}  // namespace cnx::cuda
