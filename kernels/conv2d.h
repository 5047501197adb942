// Dense 2-D convolution, NHWC, zero padding, the same stride and padding in both directions,
// channel groups (the roadmap's ResNet convs: the 7x7/2 pad 3 stem, 1x1, 3x3 stride 1 or 2,
// 1x1 stride-2 projections, grouped and depthwise 3x3, the 4x4/4 patchify stem).
//
// With Cig = Ci / groups input and Cog = Co / groups output channels per group, output channel
// o in group g = o / Cog, and h = i*stride - padding + p, w = j*stride - padding + q:
//
//   out[n, i, j, o] = bias[o] + sum_{p < kh, q < kw, c < Cig} in[n, h, w, g*Cig + c] * weight[o, p, q, c]
//
// (terms with h or w outside the image are zero), Ho = (H + 2 padding - kh) / stride + 1 and
// Wo = (W + 2 padding - kw) / stride + 1, floored (input rows and columns that no window reaches
// get a zero gradient). Backward:
//
//   din[n, h, w, g*Cig + c] = sum over the (i, j, p, q) with i*stride - padding + p = h,
//                             j*stride - padding + q = w, and o in group g, of
//                             dout[n, i, j, o] * weight[o, p, q, c]
//   dweight[o, p, q, c]     = sum_{n, i, j} dout[n, i, j, o] * in[n, h, w, g*Cig + c]
//   dbias[o]                = sum_{n, i, j} dout[n, i, j, o]
//
// Layouts: in (N, H, W, Ci), weight (Co, kh, kw, Cig) ("OHWI": the official (Co, Cig, kh, kw)
// with the channels last, as kernels/patchify.h's, so that a window flattened in (p, q, c)
// order is a row of the im2col matrix and a groups-1 conv is one GEMM), bias (Co), out
// (N, Ho, Wo, Co). Forward saves nothing extra: backward needs in (for dweight) and weight
// (for din).
//
// Mixed precision (T = bf16), exactly as patchify_conv and linear: in, out, dout, din are bf16;
// the weight operand is a bf16 copy of the fp32 parameter rounded once by the caller (autograd's
// conv2d, which keeps it for backward), for every groups (the direct grouped kernels read the
// same bf16 copy, so one rule covers both GPU paths); the fp32 bias is used rounded to bf16 (as
// the GEMM epilogue reads it); dweight and dbias are fp32 (param_t<bf16> = float). Sums in
// fp32; out and din rounded once, dweight and dbias not at all.
//
// Every entry point takes the sizes as one Conv2dShape (ten sizes are too many to pass
// positionally without mixing two of them up). Any of N, H, W, Ci, Co may be 0 (then there is
// nothing to compute, and dweight and dbias are written as zeros); the rest must be valid (the
// autograd op checks: kh, kw, stride, groups >= 1, padding >= 0, groups dividing Ci and Co,
// Ho, Wo >= 1).
#pragma once

#include <cstdint>

#include "kernels/stream.h"
#include "tensor/dtype.h"

// Conv2dShape's arithmetic runs in the CUDA kernels too: __host__ __device__ under nvcc
// (the same macro as tensor/philox.h's), nothing under g++.
#ifndef CNX_HOST_DEVICE
#if defined(__CUDACC__)
#define CNX_HOST_DEVICE __host__ __device__
#else
#define CNX_HOST_DEVICE
#endif
#endif

namespace cnx {

// The sizes of one conv2d and the index arithmetic they imply.
struct Conv2dShape {
  int64_t N = 0, H = 0, W = 0, Ci = 0, Co = 0;
  int64_t kh = 1, kw = 1, stride = 1, padding = 0, groups = 1;

  CNX_HOST_DEVICE constexpr int64_t Ho() const { return (H + 2 * padding - kh) / stride + 1; }
  CNX_HOST_DEVICE constexpr int64_t Wo() const { return (W + 2 * padding - kw) / stride + 1; }
  CNX_HOST_DEVICE constexpr int64_t Cig() const { return Ci / groups; }
  CNX_HOST_DEVICE constexpr int64_t Cog() const { return Co / groups; }
  // Rows and columns of the im2col matrix of a groups-1 conv: one row per output pixel, one
  // column per (p, q, c) of a window.
  CNX_HOST_DEVICE constexpr int64_t rows() const { return N * Ho() * Wo(); }
  CNX_HOST_DEVICE constexpr int64_t window() const { return kh * kw * Cig(); }
  CNX_HOST_DEVICE constexpr int64_t weight_numel() const { return Co * window(); }
  CNX_HOST_DEVICE constexpr int64_t in_numel() const { return N * H * W * Ci; }
  CNX_HOST_DEVICE constexpr int64_t out_numel() const { return rows() * Co; }
  // A 1x1, stride-1, unpadded, ungrouped conv is a plain GEMM over the last dimension: the
  // image (N*H*W, Ci) is its own im2col matrix.
  CNX_HOST_DEVICE constexpr bool is_pointwise() const {
    return kh == 1 && kw == 1 && stride == 1 && padding == 0 && groups == 1;
  }
};

}  // namespace cnx

// =============================================================================================
// CPU reference: nested loops, float, double and bf16 (kernels/cpu/conv2d.cpp)
// =============================================================================================
namespace cnx::cpu {

// out (N, Ho, Wo, Co), in (N, H, W, Ci), weight (Co, kh, kw, Cig), bias (Co) or null.
template <class T>
void conv2d_forward(T* out, const T* in, const T* weight, const param_t<T>* bias,
                    const Conv2dShape& s);

// Writes (overwrites) each gradient whose pointer is non-null: din (N, H, W, Ci),
// dweight (Co, kh, kw, Cig), dbias (Co); dout (N, Ho, Wo, Co). in is read only for dweight,
// weight only for din (either may be null otherwise).
template <class T>
void conv2d_backward(T* din, param_t<T>* dweight, param_t<T>* dbias, const T* dout, const T* in,
                     const T* weight, const Conv2dShape& s);

}  // namespace cnx::cpu

// =============================================================================================
// Fast CPU path, f32: im2col + OpenBLAS (kernels/cpu/conv2d.cpp, through kernels/linear.h)
// =============================================================================================
// groups == 1: the conv is cnx::blas::linear_forward / linear_backward on the im2col matrix
// (rows, window) (no im2col at all for is_pointwise(): the image is that matrix); din goes
// through the column gradient dcol = dout W and a col2im written as a gather (each input
// element adds the column entries that read it, in (p, q) order). The batch is cut into chunks
// of images whose im2col matrix stays under ~64 MiB; the chunking depends only on the shape,
// and every product is linear's (bitwise the same for any number of OpenMP threads), so the
// result is too. dweight and dbias add the chunks' products in chunk order.
// groups > 1: the reference loops (the grouped and depthwise convs of the roadmap are a small
// share of the work; a per-group GEMM would have to gather every group's output columns).
// Without OpenBLAS in the build, linear's blas functions run the loops, and so does this.
namespace cnx::blas {

void conv2d_forward(float* out, const float* in, const float* weight, const float* bias,
                    const Conv2dShape& s);
void conv2d_backward(float* din, float* dweight, float* dbias, const float* dout, const float* in,
                     const float* weight, const Conv2dShape& s);

}  // namespace cnx::blas

// =============================================================================================
// CUDA, fp32 and bf16 (kernels/cuda/conv2d.cu)
// =============================================================================================
// groups == 1: an im2col kernel into the workspace, then linear's cuBLASLt GEMMs
// (cnx::cuda::linear_forward / linear_backward, kernels/linear.h); is_pointwise() convs skip the
// im2col. Backward: dweight = dout^T col and dbias (one linear_backward, the column matrix
// gathered again), din = col2im(dout W) with the col2im a GATHER: one thread per input element
// adds the column-gradient entries that read it, in (p, q) order (deterministic, no atomics).
// groups > 1: direct kernels: forward and din one thread per output (input) element with the
// sums in a fixed order; dweight and dbias in two stages: per block of output pixels, one
// partial sum per weight element and bias (the workspace), then the partials of each added in
// a fixed order (kernels/cuda/reduce.cuh's launch_column_sums). Bitwise the same on every run.
//
// The workspace comes from the caller (autograd uses cuda_workspace): at least
// conv2d_*_workspace_floats(...) floats, 256-byte aligned (the caching allocator's blocks are),
// may be null when that is 0. It depends on the dtype (bf16 columns take half the room) and, for
// backward, on which gradients are wanted. `stream` must be the current device's library stream
// (cnx::cuda::current_stream()), as for linear, whose GEMMs run on it.
namespace cnx::cuda {

int64_t conv2d_forward_workspace_floats(DType dtype, const Conv2dShape& s);
int64_t conv2d_backward_workspace_floats(DType dtype, const Conv2dShape& s, bool want_din,
                                         bool want_dweight, bool want_dbias);

// out (N, Ho, Wo, Co), in (N, H, W, Ci), weight (Co, kh, kw, Cig), bias (Co) or null.
void conv2d_forward(float* out, const float* in, const float* weight, const float* bias,
                    const Conv2dShape& s, float* workspace, cudaStream_t stream);
// din (N, H, W, Ci), dweight (Co, kh, kw, Cig), dbias (Co), each written when non-null;
// dout (N, Ho, Wo, Co); in is needed for dweight, weight for din.
void conv2d_backward(float* din, float* dweight, float* dbias, const float* dout, const float* in,
                     const float* weight, const Conv2dShape& s, float* workspace,
                     cudaStream_t stream);

// bf16: the same shapes, bf16 activations and bf16 weight copy, fp32 bias (used rounded to
// bf16), dweight and dbias.
void conv2d_forward(bf16* out, const bf16* in, const bf16* weight, const float* bias,
                    const Conv2dShape& s, float* workspace, cudaStream_t stream);
void conv2d_backward(bf16* din, float* dweight, float* dbias, const bf16* dout, const bf16* in,
                     const bf16* weight, const Conv2dShape& s, float* workspace,
                     cudaStream_t stream);

}  // namespace cnx::cuda

// =============================================================================================
// CUDA through cuDNN, fp32 and bf16 (kernels/cuda/conv2d_cudnn.cu; optional at build time)
// =============================================================================================
// The same operation, shapes, dtypes and pointer contracts as the cnx::cuda launchers above,
// computed by cuDNN (NHWC tensors, our weight as cuDNN's NHWC filter, the group count; only
// algorithms cuDNN reports deterministic; TF32 for f32 only when cuda::allow_tf32() is on).
// Present only in a real nvcc build that found cuDNN (CMake: CNX_WITH_CUDNN, CNX_CUDNN_ROOT);
// never in the emulator build (cuDNN is not emulated). Differences from the launchers above:
// the bias is added after the convolution (for bf16, out is rounded twice: the convolution's
// result, then with the bias), and for bf16 dweight comes from cuDNN's bf16 filter gradient
// (rounded once to bf16, then widened to fp32).
//
// Use: ask the workspace size first; -1 means "not on this path" (built without cuDNN, the
// switch off, an empty or too large shape, or no deterministic algorithm): then call the
// launchers above. Otherwise pass a workspace of that many floats (256-byte aligned; may be
// null when 0) to the matching call, on the current device's library stream, with the same
// dtype, shape, requested gradients and cuda::allow_tf32() as the query.
namespace cnx::cuda {

// Whether this build has the cuDNN path at all.
bool conv2d_cudnn_compiled();
// Whether conv2d on the GPU goes through cuDNN now: compiled in and the switch on. The switch
// starts from the environment variable CNX_CONV_CUDNN, read once (unset or anything but "0":
// on); set_conv2d_cudnn_enabled overrides it (tests compare both paths).
bool conv2d_uses_cudnn();
void set_conv2d_cudnn_enabled(bool on);

int64_t conv2d_cudnn_forward_workspace_floats(DType dtype, const Conv2dShape& s);
int64_t conv2d_cudnn_backward_workspace_floats(DType dtype, const Conv2dShape& s, bool want_din,
                                               bool want_dweight, bool want_dbias);

void conv2d_cudnn_forward(float* out, const float* in, const float* weight, const float* bias,
                          const Conv2dShape& s, float* workspace, cudaStream_t stream);
void conv2d_cudnn_forward(bf16* out, const bf16* in, const bf16* weight, const float* bias,
                          const Conv2dShape& s, float* workspace, cudaStream_t stream);
void conv2d_cudnn_backward(float* din, float* dweight, float* dbias, const float* dout,
                           const float* in, const float* weight, const Conv2dShape& s,
                           float* workspace, cudaStream_t stream);
void conv2d_cudnn_backward(bf16* din, float* dweight, float* dbias, const bf16* dout,
                           const bf16* in, const bf16* weight, const Conv2dShape& s,
                           float* workspace, cudaStream_t stream);

}  // namespace cnx::cuda
