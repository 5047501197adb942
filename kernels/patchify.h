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
//
// Mixed precision (T = bf16), as for linear (kernels/linear.h): in, out, dout, din are bf16; the
// weight operand is a bf16 copy of the fp32 parameter rounded once by the caller (autograd's
// patchify_conv, which keeps it for backward); bias, dweight and dbias are fp32
// (param_t<bf16> = float), the forward using the bias rounded to bf16 as linear does. Sums in
// fp32; out and din rounded once, dweight and dbias not at all.
// The CPU kernels are templates on float, double and bf16.
#pragma once

#include <cstdint>

#include "kernels/stream.h"
#include "tensor/dtype.h"

namespace cnx::cpu {

// bias may be null.
template <class T>
void patchify_forward(T* out, const T* in, const T* weight, const param_t<T>* bias, int64_t N,
                      int64_t H, int64_t W, int64_t Ci, int64_t Co, int64_t k);

// Writes (overwrites) each gradient whose pointer is non-null:
// din (N, H, W, Ci), dweight (Co, k, k, Ci), dbias (Co).
template <class T>
void patchify_backward(T* din, param_t<T>* dweight, param_t<T>* dbias, const T* dout, const T* in,
                       const T* weight, int64_t N, int64_t H, int64_t W, int64_t Ci, int64_t Co,
                       int64_t k);

}  // namespace cnx::cpu

// =============================================================================================
// CUDA: space-to-depth + cuBLASLt, fp32 and bf16 (kernels/cuda/patchify.cu)
// =============================================================================================
// The conv is a GEMM on the patch matrix P (N*Ho*Wo, k*k*Ci), whose row (n, i, j) is the patch
// in[n, i*k : i*k+k, j*k : j*k+k, :] flattened in (p, q, c) order, with weight seen as
// (Co, k*k*Ci):
//   forward   gather P (space-to-depth), then out = P W^T + bias   (cnx::cuda::linear_forward)
//   backward  dP = dout W, then scatter dP into din (depth-to-space), writing 0 in the rows and
//             columns past Ho*k, Wo*k; dweight = dout^T P and dbias = column sums of dout
//             (cnx::cuda::linear_backward, P gathered again)
// P and dP live in scratch memory from the caching allocator (no cudaMalloc once warm; k == 1
// needs none: P is the input itself). Same semantics as cpu:: above; `stream` must be the
// current device's library stream (cnx::cuda::current_stream()), as for linear. With bf16, P and
// dP are bf16 (the gather and scatter move values, never round them) and the GEMMs are linear's
// bf16 ones.
namespace cnx::cuda {

// out (N, Ho, Wo, Co), in (N, H, W, Ci), weight (Co, k, k, Ci), bias (Co) or null.
void patchify_forward(float* out, const float* in, const float* weight, const float* bias,
                      int64_t N, int64_t H, int64_t W, int64_t Ci, int64_t Co, int64_t k,
                      cudaStream_t stream);

// din (N, H, W, Ci), dweight (Co, k, k, Ci), dbias (Co), each written when non-null;
// dout (N, Ho, Wo, Co); in is needed for dweight, weight for din.
void patchify_backward(float* din, float* dweight, float* dbias, const float* dout, const float* in,
                       const float* weight, int64_t N, int64_t H, int64_t W, int64_t Ci, int64_t Co,
                       int64_t k, cudaStream_t stream);

// bf16: the same shapes, bf16 activations (and bf16 weight copy), fp32 bias (used rounded to
// bf16, as linear does), dweight, dbias.
void patchify_forward(bf16* out, const bf16* in, const bf16* weight, const float* bias, int64_t N,
                      int64_t H, int64_t W, int64_t Ci, int64_t Co, int64_t k, cudaStream_t stream);
void patchify_backward(bf16* din, float* dweight, float* dbias, const bf16* dout, const bf16* in,
                       const bf16* weight, int64_t N, int64_t H, int64_t W, int64_t Ci, int64_t Co,
                       int64_t k, cudaStream_t stream);

}  // namespace cnx::cuda
