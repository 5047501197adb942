// Elementwise product: out = a * b;  da = dout * b,  db = dout * a.
#pragma once

#include <cstdint>

#include "kernels/stream.h"

namespace cnx::cpu {

template <class T> void mul_forward(T* out, const T* a, const T* b, int64_t n);
// Writes each gradient whose pointer is non-null: da, db (n).
template <class T>
void mul_backward(T* da, T* db, const T* dout, const T* a, const T* b, int64_t n);

}  // namespace cnx::cpu

// CUDA launchers (kernels/cuda/mul.cu): f32, device pointers, asynchronous on `stream`.
namespace cnx::cuda {

void mul_forward(float* out, const float* a, const float* b, int64_t n, cudaStream_t stream);
// Writes each gradient whose pointer is non-null: da, db (n).
void mul_backward(float* da, float* db, const float* dout, const float* a, const float* b,
                  int64_t n, cudaStream_t stream);

}  // namespace cnx::cuda
