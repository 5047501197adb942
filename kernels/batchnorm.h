// BatchNorm over the channels (last dimension) of M rows of C values: channels-last activations
// (N, H, W, C) are M = N*H*W rows, a (N, C) input is M = N rows. Statistics are per channel,
// over the M rows (as torch.nn.functional.batch_norm on NCHW).
//
// training:  mean_c = sum_r x_rc / M,   var_c = sum_r (x_rc - mean_c)^2 / M   (biased)
//            running_mean_c = (1 - momentum) running_mean_c + momentum mean_c
//            running_var_c  = (1 - momentum) running_var_c  + momentum var_c M / (M - 1)
//                             (the unbiased variance; needs M >= 2)
// eval:      mean_c = running_mean_c,  var_c = running_var_c; nothing is updated
// both:      invstd_c = 1 / sqrt(var_c + eps),  xhat_rc = (x_rc - mean_c) invstd_c
//            out_rc = xhat_rc weight_c + bias_c
//
// Forward saves mean and invstd per channel (C values each; in eval mode the running mean and
// 1 / sqrt(running_var + eps) as they were at the forward, so a later in-place update of the
// running statistics does not change the backward).
// Backward, with sum_dy_c = sum_r dout_rc and sum_dyx_c = sum_r dout_rc xhat_rc:
//   dweight_c = sum_dyx_c,   dbias_c = sum_dy_c               (both modes)
//   training: din_rc = weight_c invstd_c (dout_rc - sum_dy_c / M - xhat_rc sum_dyx_c / M)
//             (the full BatchNorm backward, through the batch statistics)
//   eval:     din_rc = dout_rc weight_c invstd_c              (the statistics are constants)
//
// Types. T is the activation type of out, in, dout and din: float, double or bf16 on the CPU,
// float or bf16 on CUDA. weight, bias, running_mean, running_var, the saved mean and invstd
// and the parameter gradients dweight and dbias are param_t<T> (tensor/dtype.h): T itself for
// float and double, fp32 for bf16 (mixed precision). With bf16 activations everything is
// computed in fp32 (CPU: double, as for f32) from the widened bf16 inputs and only the
// activation outputs (out, din) are rounded to bf16, once each.
#pragma once

#include <cstdint>
#include <type_traits>

#include "kernels/stream.h"
#include "tensor/dtype.h"

namespace cnx::cpu {

// CPU reference: statistics and the per-channel sums accumulate in double, the variance in
// two passes (the mean, then the centred squares). The running-stat update is computed in
// double from the double statistics and rounded once to param_t<T>.
//
// out, in (M, C); weight, bias (C); mean, invstd (C) are written (for backward);
// running_mean, running_var (C) are read, and in training updated in place (training needs
// M >= 2; the caller checks). M = 0 in eval mode writes mean and invstd only.
template <class T>
void batchnorm_forward(T* out, param_t<T>* mean, param_t<T>* invstd, param_t<T>* running_mean,
                       param_t<T>* running_var, const T* in, const param_t<T>* weight,
                       const param_t<T>* bias, int64_t M, int64_t C, bool training,
                       double momentum, double eps);

// Writes each gradient whose pointer is non-null: din (M, C), dweight (C), dbias (C).
// dout, in (M, C); weight, mean, invstd (C) as saved by the forward of the same mode.
// `in` and `mean` may be null unless dweight, or din in training, is wanted; invstd unless
// din or dweight is; weight unless din is.
template <class T>
void batchnorm_backward(T* din, param_t<T>* dweight, param_t<T>* dbias, const T* dout,
                        const T* in, const param_t<T>* weight, const param_t<T>* mean,
                        const param_t<T>* invstd, int64_t M, int64_t C, bool training);

}  // namespace cnx::cpu

// CUDA launchers (kernels/cuda/batchnorm.cu): T float or bf16 (the activations), fp32
// parameters, running statistics, saved statistics and parameter gradients; device pointers,
// asynchronous on `stream`, no host synchronisation (the running statistics are updated by a
// kernel). Per-channel sums over the M rows are deterministic: per-block partial sums over
// fixed blocks of rows, then a fixed-order second stage (kernels/cuda/reduce.cuh), no atomics.
// Both launchers need `workspace`: batchnorm_workspace_floats(M, C) floats (the same for
// forward and backward, whatever T).
//
// Statistics: one read of x. Each block sums d = x - s_c and d^2 over its rows, with the shift
// s_c = x[0, c] (the first row), and mean = s + sum d / M, var = sum d^2 / M - (sum d / M)^2
// (clamped at 0): the shift by a sample of the channel keeps the cancellation of the
// one-pass formula small (|mean - s| is of the order of the standard deviation unless x[0, c]
// is an outlier), unlike E[x^2] - E[x]^2 for a channel whose mean is large against its spread.
namespace cnx::cuda {

int64_t batchnorm_workspace_floats(int64_t M, int64_t C);

// Same contract as cpu::batchnorm_forward. T is deduced from `out` and `in`.
template <class T>
void batchnorm_forward(T* out, float* mean, float* invstd, float* running_mean,
                       float* running_var, const std::type_identity_t<T>* in,
                       const float* weight, const float* bias, int64_t M, int64_t C,
                       bool training, double momentum, double eps, float* workspace,
                       cudaStream_t stream);

// Same contract as cpu::batchnorm_backward. T is deduced from `dout`; din and in may be null.
template <class T>
void batchnorm_backward(std::type_identity_t<T>* din, float* dweight, float* dbias,
                        const T* dout, const std::type_identity_t<T>* in, const float* weight,
                        const float* mean, const float* invstd, int64_t M, int64_t C,
                        bool training, float* workspace, cudaStream_t stream);

}  // namespace cnx::cuda
