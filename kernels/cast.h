// Element type conversion between fp32 and bf16 (mixed precision): the model's input and
// weights going into bf16 GEMMs, the logits coming back to fp32 for the loss, and the
// gradients of those conversions (the other direction).
//
//   f32 -> bf16: round to nearest even (NaN stays NaN)     bf16 -> f32: exact
//
// The CPU side is Tensor::to(DType) (tensor/tensor.cpp, the same rounding as cnx::bf16).
#pragma once

#include <cstdint>

#include "kernels/stream.h"
#include "tensor/dtype.h"

// CUDA launchers (kernels/cuda/cast.cu): device pointers, n elements, asynchronous on `stream`.
namespace cnx::cuda {

void cast(bf16* out, const float* in, int64_t n, cudaStream_t stream);
void cast(float* out, const bf16* in, int64_t n, cudaStream_t stream);

}  // namespace cnx::cuda
