// Global average pool over H and W, before ConvNeXt's final LayerNorm and head:
//
//   out[n, c] = sum_{h, w} in[n, h, w, c] / (H * W)
//   din[n, h, w, c] = dout[n, c] / (H * W)
//
// Layouts: in (N, H, W, C), out (N, C). Backward needs only the sizes.
#pragma once

#include <cstdint>

#include "kernels/stream.h"

namespace cnx::cpu {

template <class T>
void global_avgpool_forward(T* out, const T* in, int64_t N, int64_t H, int64_t W, int64_t C);
template <class T>
void global_avgpool_backward(T* din, const T* dout, int64_t N, int64_t H, int64_t W, int64_t C);

}  // namespace cnx::cpu

// CUDA launchers (kernels/cuda/avgpool.cu): f32, device pointers, asynchronous on `stream`.
namespace cnx::cuda {

void global_avgpool_forward(float* out, const float* in, int64_t N, int64_t H, int64_t W,
                            int64_t C, cudaStream_t stream);
void global_avgpool_backward(float* din, const float* dout, int64_t N, int64_t H, int64_t W,
                             int64_t C, cudaStream_t stream);

}  // namespace cnx::cuda
