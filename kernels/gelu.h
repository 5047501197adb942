// GELU, the exact erf form used by the paper's model (not the tanh approximation):
//
//   out = x * Phi(x) = 0.5 * x * (1 + erf(x / sqrt(2)))
//   dout/dx = Phi(x) + x * phi(x),   phi(x) = exp(-x^2 / 2) / sqrt(2 pi)
//
// Elementwise over n values. Backward needs the input. T is float, double or bf16 on the CPU
// and float or bf16 on CUDA; bf16 values are computed in fp32 and rounded once when stored.
#pragma once

#include <cstdint>

#include "kernels/stream.h"
#include "tensor/dtype.h"

namespace cnx::cpu {

template <class T> void gelu_forward(T* out, const T* in, int64_t n);
template <class T> void gelu_backward(T* din, const T* dout, const T* in, int64_t n);

}  // namespace cnx::cpu

// CUDA launchers (kernels/cuda/gelu.cu): T float or bf16, device pointers, asynchronous on
// `stream`.
namespace cnx::cuda {

template <class T> void gelu_forward(T* out, const T* in, int64_t n, cudaStream_t stream);
template <class T>
void gelu_backward(T* din, const T* dout, const T* in, int64_t n, cudaStream_t stream);

}  // namespace cnx::cuda
