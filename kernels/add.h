// Elementwise addition: the residual connection, and gradient accumulation.
//
//   out = a + b          (backward: da = dout, db = dout; no kernel needed)
//   dst += src           (add_inplace)
//
// T is float, double or bf16 on the CPU, float or bf16 on CUDA (bf16: the sum of the two
// widened values, rounded once).
#pragma once

#include <cstdint>

#include "kernels/stream.h"
#include "tensor/dtype.h"

namespace cnx::cpu {

template <class T> void add_forward(T* out, const T* a, const T* b, int64_t n);
template <class T> void add_inplace(T* dst, const T* src, int64_t n);

}  // namespace cnx::cpu

// CUDA launchers (kernels/cuda/add.cu): T float or bf16, device pointers, asynchronous on
// `stream`.
namespace cnx::cuda {

template <class T> void add_forward(T* out, const T* a, const T* b, int64_t n, cudaStream_t stream);
template <class T> void add_inplace(T* dst, const T* src, int64_t n, cudaStream_t stream);

}  // namespace cnx::cuda
