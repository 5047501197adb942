// ReLU, the activation of ResNet (the roadmap's starting point; ConvNeXt uses GELU):
//
//   out = x <= 0 ? 0 : x          (max(x, 0); NaN stays NaN, -0 becomes +0)
//   din = out <= 0 ? 0 : dout     (0 where x <= 0, dout where x > 0)
//
// Elementwise over n values. Backward reads the OUTPUT, not the input: out > 0 exactly where
// x > 0, and the output is what the next layer keeps alive anyway, so saving it costs no
// memory where saving x would keep the previous layer's output alive too. This is PyTorch's
// threshold_backward(grad, result, 0): a NaN input (NaN output, and NaN <= 0 is false) passes
// dout through.
//
// No arithmetic: each stored value is one of the operands (or 0) copied as is, so the results
// are exact in every type, and bf16 needs no fp32 detour (comparing a bf16 with 0 in fp32 and
// storing the selected bf16 is exactly "compute in fp32, round once": the value is
// representable, so rounding is the identity; NaN payloads are kept bitwise). T is float,
// double or bf16 on the CPU and float or bf16 on CUDA; in, out may be the same array (as may
// dout, din).
#pragma once

#include <cstdint>

#include "kernels/stream.h"
#include "tensor/dtype.h"

namespace cnx::cpu {

template <class T> void relu_forward(T* out, const T* in, int64_t n);
template <class T> void relu_backward(T* din, const T* dout, const T* out, int64_t n);

}  // namespace cnx::cpu

// CUDA launchers (kernels/cuda/relu.cu): T float or bf16, device pointers, asynchronous on
// `stream`; n <= 0 launches nothing.
namespace cnx::cuda {

template <class T> void relu_forward(T* out, const T* in, int64_t n, cudaStream_t stream);
template <class T>
void relu_backward(T* din, const T* dout, const T* out, int64_t n, cudaStream_t stream);

}  // namespace cnx::cuda
