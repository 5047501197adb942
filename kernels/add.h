// Elementwise addition: the residual connection, and gradient accumulation.
//
//   out = a + b          (backward: da = dout, db = dout; no kernel needed)
//   dst += src           (add_inplace)
#pragma once

#include <cstdint>

#include "kernels/stream.h"

namespace cnx::cpu {

template <class T> void add_forward(T* out, const T* a, const T* b, int64_t n);
template <class T> void add_inplace(T* dst, const T* src, int64_t n);

}  // namespace cnx::cpu

// CUDA launchers (kernels/cuda/add.cu): f32, device pointers, asynchronous on `stream`.
namespace cnx::cuda {

void add_forward(float* out, const float* a, const float* b, int64_t n, cudaStream_t stream);
void add_inplace(float* dst, const float* src, int64_t n, cudaStream_t stream);

}  // namespace cnx::cuda
