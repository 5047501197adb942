// Sum of all elements: out[0] = sum_i in[i] (accumulated in double);  din[i] = dout[0].
#pragma once

#include <cstdint>

#include "kernels/stream.h"

namespace cnx::cpu {

template <class T> void sum_forward(T* out, const T* in, int64_t n);
template <class T> void sum_backward(T* din, const T* dout, int64_t n);

}  // namespace cnx::cpu

// CUDA launchers (kernels/cuda/sum.cu): f32, device pointers, asynchronous on `stream`.
// sum_forward accumulates in double, deterministically (fixed two-stage order), through
// `workspace`: sum_forward_workspace_floats(n) floats, 8-byte aligned (it holds doubles).
// dout of sum_backward is a device pointer to one float.
namespace cnx::cuda {

int64_t sum_forward_workspace_floats(int64_t n);
void sum_forward(float* out, const float* in, int64_t n, float* workspace, cudaStream_t stream);
void sum_backward(float* din, const float* dout, int64_t n, cudaStream_t stream);

}  // namespace cnx::cuda
