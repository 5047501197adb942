// Depthwise convolution: one k x k filter per channel, odd k (3..11; ConvNeXt uses 7),
// zero padding k/2, stride 1, so the output has the input's size.
//
//   out[n, h, w, c] = bias[c] + sum_{p, q} in[n, h + p - k/2, w + q - k/2, c] * weight[p, q, c]
//
// (terms outside the image are 0). Layouts: in and out (N, H, W, C), weight (k, k, C) so that
// a tap's weights are contiguous along C like the activations (the official checkpoint stores
// (C, 1, k, k): convert at the file boundary), bias (C). Backward needs in and weight.
#pragma once

#include <cstdint>

#include "kernels/stream.h"

namespace cnx::cpu {

// bias may be null.
template <class T>
void dwconv_forward(T* out, const T* in, const T* weight, const T* bias, int64_t N, int64_t H,
                    int64_t W, int64_t C, int64_t k);

// Writes each gradient whose pointer is non-null: din (N, H, W, C), dweight (k, k, C), dbias (C).
template <class T>
void dwconv_backward(T* din, T* dweight, T* dbias, const T* dout, const T* in, const T* weight,
                     int64_t N, int64_t H, int64_t W, int64_t C, int64_t k);

}  // namespace cnx::cpu

// CUDA launchers (kernels/cuda/dwconv.cu; defined only when the library is built with CUDA).
// fp32, the cpu functions' parameters plus a trailing stream; asynchronous on `stream`.
// Pointers are device pointers; any alignment is accepted (16-byte-aligned in/dout with
// C % 4 == 0 take the float4 load path). Outputs must not overlap inputs (no in-place).
// k must be odd, 3..11 (other k throw cnx::Error).
namespace cnx::cuda {

// out (N, H, W, C) = dwconv(in (N, H, W, C), weight (k, k, C)) + bias (C); bias may be null.
void dwconv_forward(float* out, const float* in, const float* weight, const float* bias, int64_t N,
                    int64_t H, int64_t W, int64_t C, int64_t k, cudaStream_t stream);

// Floats of scratch memory dwconv_backward needs for these sizes (0 when none): the per-block
// partial sums of dweight and dbias, reduced in a fixed order by a second kernel.
int64_t dwconv_backward_workspace_floats(int64_t N, int64_t H, int64_t W, int64_t C, int64_t k);

// Writes each gradient whose pointer is non-null: din (N, H, W, C), dweight (k, k, C),
// dbias (C), from dout (N, H, W, C). Besides dout, din needs weight (k, k, C), dweight needs
// in (N, H, W, C), dbias nothing: an input that no requested gradient needs may be null.
// workspace: dwconv_backward_workspace_floats(N, H, W, C, k) floats (may be null when that is 0).
// Deterministic: the same inputs give bitwise the same outputs run to run.
void dwconv_backward(float* din, float* dweight, float* dbias, const float* dout, const float* in,
                     const float* weight, int64_t N, int64_t H, int64_t W, int64_t C, int64_t k,
                     float* workspace, cudaStream_t stream);

}  // namespace cnx::cuda
