// Linear layer over the last dimension (ConvNeXt's pointwise 1x1 convs and the head):
//
//   out[m, n] = bias[n] + sum_k in[m, k] * weight[n, k]          out = in W^T + b
//   din = dout W,   dweight = dout^T in,   dbias = sum_m dout[m, :]
//
// Layouts: in (M, K), weight (N, K) (the official layout of nn.Linear), bias (N), out (M, N).
// This is the plain reference (loops); the CUDA backend uses cuBLAS(Lt).
#pragma once

#include <cstdint>

namespace cnx::cpu {

// bias may be null.
template <class T>
void linear_forward(T* out, const T* in, const T* weight, const T* bias, int64_t M, int64_t K,
                    int64_t N);

// Writes each gradient whose pointer is non-null: din (M, K), dweight (N, K), dbias (N).
template <class T>
void linear_backward(T* din, T* dweight, T* dbias, const T* dout, const T* in, const T* weight,
                     int64_t M, int64_t K, int64_t N);

}  // namespace cnx::cpu
