// Layer scale: a learned per-channel multiplier on a block's output (init 1e-6 in ConvNeXt).
//
//   out[r, c] = in[r, c] * gamma[c]
//   din[r, c] = dout[r, c] * gamma[c],   dgamma[c] = sum_r dout[r, c] * in[r, c]
//
// Layouts: in, out (rows, C) with rows = N*H*W, gamma (C). Backward needs in and gamma.
// Mixed precision: T (the activations) is float, double or bf16 on the CPU, float or bf16 on
// CUDA; gamma and dgamma are param_t<T> (fp32 for bf16), every product and sum in fp32 or better.
#pragma once

#include <cstdint>

#include "kernels/stream.h"
#include "tensor/dtype.h"

namespace cnx::cpu {

template <class T>
void layer_scale_forward(T* out, const T* in, const param_t<T>* gamma, int64_t rows, int64_t C);

// Writes each gradient whose pointer is non-null: din (rows, C), dgamma (C).
template <class T>
void layer_scale_backward(T* din, param_t<T>* dgamma, const T* dout, const T* in,
                          const param_t<T>* gamma, int64_t rows, int64_t C);

}  // namespace cnx::cpu

// CUDA launchers (kernels/cuda/layer_scale.cu): T float or bf16, gamma fp32, device pointers,
// asynchronous on `stream`.
// dgamma is reduced over rows in two deterministic stages through `workspace`
// (layer_scale_backward_workspace_floats(rows, C) floats; unused when dgamma is null).
namespace cnx::cuda {

template <class T>
void layer_scale_forward(T* out, const T* in, const float* gamma, int64_t rows, int64_t C,
                         cudaStream_t stream);

int64_t layer_scale_backward_workspace_floats(int64_t rows, int64_t C);
// Writes each gradient whose pointer is non-null: din (rows, C), dgamma (C).
template <class T>
void layer_scale_backward(T* din, float* dgamma, const T* dout, const T* in, const float* gamma,
                          int64_t rows, int64_t C, float* workspace, cudaStream_t stream);

}  // namespace cnx::cuda
