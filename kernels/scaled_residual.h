// The end of a ConvNeXt block in one pass: layer scale, drop path and the residual add
// (unfused: layer_scale, drop_path, add: three kernels and two intermediate tensors forward,
// two kernels and one intermediate backward).
//
//   out[n, p, c] = x[n, p, c] + (h[n, p, c] * gamma[c]) * scale[n]
//   dx           = dout                                  (passed through: no kernel)
//   dh[n, p, c]  = (dout[n, p, c] * scale[n]) * gamma[c]
//   dgamma[c]    = sum over n, p of (dout[n, p, c] * scale[n]) * h[n, p, c]
//
// x, h, out (N, P, C) channels-last (P = H*W pixels per sample), as rows = N*P rows of C;
// gamma (C); scale (N), the drop-path multipliers (0 or 1/keep_prob, drawn on the host by
// cpu::drop_path_scales). gamma null: no layer scale (gamma = 1); scale null: no drop path
// (scale = 1). Products are rounded in the order of the unfused ops, so in f32 the CPU result is
// bitwise that of layer_scale -> drop_path -> add.
//
// A dropped sample (scale[n] == 0) is not read from h: out = x, dh = 0 and it adds nothing to
// dgamma (the unfused ops would multiply by 0, so only a NaN or inf in a dropped branch, which
// they would pass on, differs).
//
// Mixed precision: T (x, h, out, dout, dh) is float, double or bf16 on the CPU, float or bf16 on
// CUDA; gamma, dgamma and scale are param_t<T> (fp32 for bf16). bf16 results are computed in
// fp32 and rounded once (one rounding instead of the unfused ops' three).
#pragma once

#include <cstdint>

#include "kernels/stream.h"
#include "tensor/dtype.h"

namespace cnx::cpu {

template <class T>
void scaled_residual_forward(T* out, const T* x, const T* h, const param_t<T>* gamma,
                             const param_t<T>* scale, int64_t N, int64_t P, int64_t C);
// Writes each gradient whose pointer is non-null: dh (N*P, C), dgamma (C). h is read only for
// dgamma, gamma only for dh.
template <class T>
void scaled_residual_backward(T* dh, param_t<T>* dgamma, const T* dout, const T* h,
                              const param_t<T>* gamma, const param_t<T>* scale, int64_t N,
                              int64_t P, int64_t C);

}  // namespace cnx::cpu

// CUDA launchers (kernels/cuda/layer_scale.cu, beside the layer-scale kernels whose column
// reduction the backward shares): T float or bf16, device pointers, asynchronous on `stream`.
// dgamma is reduced over rows in two deterministic stages through `workspace`
// (layer_scale_backward_workspace_floats(N * P, C) floats; unused when dgamma is null).
namespace cnx::cuda {

template <class T>
void scaled_residual_forward(T* out, const T* x, const T* h, const float* gamma,
                             const float* scale, int64_t N, int64_t P, int64_t C,
                             cudaStream_t stream);
template <class T>
void scaled_residual_backward(T* dh, float* dgamma, const T* dout, const T* h, const float* gamma,
                              const float* scale, int64_t N, int64_t P, int64_t C,
                              float* workspace, cudaStream_t stream);

}  // namespace cnx::cuda
