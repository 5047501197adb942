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
