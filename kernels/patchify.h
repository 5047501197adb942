// Patchify convolution: k x k kernel, stride k, no padding (ConvNeXt's 4x4/4 stem and 2x2/2
// downsampling layers). Output sizes are floored: Ho = H / k, Wo = W / k; the input rows and
// columns past Ho*k, Wo*k are ignored (their gradient is 0).
//
//   out[n, i, j, o] = bias[o] + sum_{p, q, c} in[n, i*k + p, j*k + q, c] * weight[o, p, q, c]
//
// Layouts: in (N, H, W, Ci), weight (Co, k, k, Ci) ("OHWI": a patch flattened in the same
// (p, q, c) order is a row of the space-to-depth matrix, so the conv is one GEMM), bias (Co),
// out (N, Ho, Wo, Co). The official checkpoint stores weight as (Co, Ci, k, k): convert at the
// file boundary. Forward saves nothing extra: backward needs in and weight.
#pragma once

#include <cstdint>

namespace cnx::cpu {

// bias may be null.
template <class T>
void patchify_forward(T* out, const T* in, const T* weight, const T* bias, int64_t N, int64_t H,
                      int64_t W, int64_t Ci, int64_t Co, int64_t k);

// Writes (overwrites) each gradient whose pointer is non-null:
// din (N, H, W, Ci), dweight (Co, k, k, Ci), dbias (Co).
template <class T>
void patchify_backward(T* din, T* dweight, T* dbias, const T* dout, const T* in, const T* weight,
                       int64_t N, int64_t H, int64_t W, int64_t Ci, int64_t Co, int64_t k);

}  // namespace cnx::cpu
