// Depthwise convolution: one k x k filter per channel, odd k (3..11; ConvNeXt uses 7),
// zero padding k/2, stride 1, so the output has the input's size.
//
//   out[n, h, w, c] = bias[c] + sum_{p, q} in[n, h + p - k/2, w + q - k/2, c] * weight[p, q, c]
//
// (terms outside the image are 0). Layouts: in and out (N, H, W, C), weight (k, k, C) so that
// a tap's weights are contiguous along C like the activations (the official checkpoint stores
// (C, 1, k, k): convert at the file boundary), bias (C). Backward needs in and weight.
//
// Element types: T is the activations' type (in, out, dout, din): float or double on the CPU,
// float on CUDA, and bf16 on both (mixed precision). The parameters and their gradients
// (weight, bias, dweight, dbias) are param_t<T> (tensor/dtype.h): T itself for float and
// double, float for bf16. A bf16 op computes in fp32, sums the parameter gradients in fp32 and
// writes them unrounded; each bf16 output (out, din) is rounded once, to nearest even.
#pragma once

#include <cstdint>
#include <type_traits>

#include "kernels/stream.h"
#include "tensor/dtype.h"

namespace cnx::cpu {

// bias may be null.
template <class T>
void dwconv_forward(T* out, const T* in, const param_t<T>* weight, const param_t<T>* bias,
                    int64_t N, int64_t H, int64_t W, int64_t C, int64_t k);

// Writes each gradient whose pointer is non-null: din (N, H, W, C), dweight (k, k, C), dbias (C).
template <class T>
void dwconv_backward(T* din, param_t<T>* dweight, param_t<T>* dbias, const T* dout, const T* in,
                     const param_t<T>* weight, int64_t N, int64_t H, int64_t W, int64_t C,
                     int64_t k);

}  // namespace cnx::cpu

// CUDA launchers (kernels/cuda/dwconv.cu; defined only when the library is built with CUDA):
// the cpu functions' parameters plus a trailing stream; asynchronous on `stream`. T is float
// or bf16 and is named, not deduced: cuda::dwconv_forward<bf16>(...). It defaults to float, so
// cuda::dwconv_forward(...) is the fp32 kernel (no argument deduces T because every pointer
// may be null for empty sizes).
// Pointers are device pointers; any alignment is accepted (16-byte-aligned in/dout with
// C % 4 == 0 for float, C % 8 == 0 for bf16, take the 16-byte load path). Outputs must not
// overlap inputs (no in-place). k must be odd, 3..11 (other k throw cnx::Error).
namespace cnx::cuda {

// out (N, H, W, C) = dwconv(in (N, H, W, C), weight (k, k, C)) + bias (C); bias may be null.
template <class T = float>
void dwconv_forward(std::type_identity_t<T>* out, const std::type_identity_t<T>* in,
                    const param_t<T>* weight, const param_t<T>* bias, int64_t N, int64_t H,
                    int64_t W, int64_t C, int64_t k, cudaStream_t stream);

// Floats of scratch memory dwconv_backward needs for these sizes (0 when none), whatever T:
// the per-block fp32 partial sums of dweight and dbias, reduced in a fixed order by a second
// kernel.
int64_t dwconv_backward_workspace_floats(int64_t N, int64_t H, int64_t W, int64_t C, int64_t k);

// Writes each gradient whose pointer is non-null: din (N, H, W, C), dweight (k, k, C),
// dbias (C), from dout (N, H, W, C). Besides dout, din needs weight (k, k, C), dweight needs
// in (N, H, W, C), dbias nothing: an input that no requested gradient needs may be null.
// workspace: dwconv_backward_workspace_floats(N, H, W, C, k) floats (may be null when that is 0).
// Deterministic: the same inputs give bitwise the same outputs run to run.
template <class T = float>
void dwconv_backward(std::type_identity_t<T>* din, param_t<T>* dweight, param_t<T>* dbias,
                     const std::type_identity_t<T>* dout, const std::type_identity_t<T>* in,
                     const param_t<T>* weight, int64_t N, int64_t H, int64_t W, int64_t C,
                     int64_t k, float* workspace, cudaStream_t stream);

}  // namespace cnx::cuda
