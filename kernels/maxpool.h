// 2-D max pooling, k x k window, stride s, padding p (ResNet's stem: k 3, s 2, p 1):
//
//   Ho = (H + 2p - k) / s + 1,  Wo = (W + 2p - k) / s + 1
//   window of (oh, ow): rows h0 = oh s - p .. h0 + k - 1, columns w0 = ow s - p .. w0 + k - 1
//   out[n, oh, ow, c] = max of in[n, h, w, c] over the window's cells inside the image
//   din[n, h, w, c]   = sum of dout[n, oh, ow, c] over the outputs whose argmax is (h, w)
//
// Padded cells never win (they count as -inf and are never read). The argmax of a window is
// chosen exactly as PyTorch's CPU kernel does: best = -inf and argmax = the window's first cell
// inside the image, then for each cell inside the image in row-major window order,
// `if (v > best || isnan(v)) { best = v; argmax = cell; }`. So:
//   - ties: the FIRST maximum wins (the gradient goes to one element);
//   - NaN propagates: a window with a NaN outputs NaN, and its gradient goes to the LAST NaN;
//   - a window of -infs outputs -inf, argmax its first cell.
// out is in[argmax] copied bit for bit (no arithmetic: exact in every type, NaN payloads kept;
// bf16 compares in fp32, which is exact).
//
// Layouts: in, din (N, H, W, C); out, dout, argmax (N, Ho, Wo, C), channels last.
// argmax (int32, saved by forward for backward): the cell's index WITHIN ITS WINDOW,
// (h - h0) * k + (w - w0), in [0, k k). It may be null in forward (no backward to come).
//
// Backward is a gather: each din element adds, in fp32 for bf16 (in T for float and double),
// the dout of the outputs whose window holds it and whose argmax is it, in increasing (oh, ow)
// order, starting from 0, and stores the sum (rounded once for bf16). The CPU reference scatters
// in that same order, so both devices give bitwise the same sums; the CUDA kernel needs no
// atomics and is deterministic.
//
// Preconditions (autograd/ops/max_pool2d.cpp checks them, the kernels assume them): k >= 1,
// s >= 1, 0 <= p <= k / 2, H + 2p >= k and W + 2p >= k, H, W >= 1, k k < 2^31, and (for the
// CUDA gather's 32-bit window arithmetic) s, H + 2p, W + 2p < 2^31. Then every window holds at
// least one cell of the image. N = 0 or C = 0: nothing to do.
#pragma once

#include <cstdint>

#include "kernels/stream.h"
#include "tensor/dtype.h"

namespace cnx {

// The output size of one spatial dimension: (size + 2 padding - kernel) / stride + 1.
constexpr int64_t maxpool2d_out_size(int64_t size, int64_t kernel, int64_t stride,
                                     int64_t padding) {
  return (size + 2 * padding - kernel) / stride + 1;
}

}  // namespace cnx

namespace cnx::cpu {

// T float, double or bf16.
template <class T>
void maxpool2d_forward(T* out, int32_t* argmax, const T* in, int64_t N, int64_t H, int64_t W,
                       int64_t C, int64_t k, int64_t stride, int64_t padding);
template <class T>
void maxpool2d_backward(T* din, const T* dout, const int32_t* argmax, int64_t N, int64_t H,
                        int64_t W, int64_t C, int64_t k, int64_t stride, int64_t padding);

}  // namespace cnx::cpu

// CUDA launchers (kernels/cuda/maxpool.cu): T float or bf16, device pointers, asynchronous on
// `stream`.
namespace cnx::cuda {

template <class T>
void maxpool2d_forward(T* out, int32_t* argmax, const T* in, int64_t N, int64_t H, int64_t W,
                       int64_t C, int64_t k, int64_t stride, int64_t padding,
                       cudaStream_t stream);
template <class T>
void maxpool2d_backward(T* din, const T* dout, const int32_t* argmax, int64_t N, int64_t H,
                        int64_t W, int64_t C, int64_t k, int64_t stride, int64_t padding,
                        cudaStream_t stream);

}  // namespace cnx::cuda
