// Drop path (stochastic depth) on a residual branch: each sample of the batch is dropped whole
// with probability drop_prob, and kept samples are scaled by 1/keep_prob so the expectation is
// unchanged. The multipliers are drawn on the host (drop_path_scales) from the seeded
// generator, in sample order, so every device drops the same samples:
//
//   scale[n] = 1/keep_prob with probability keep_prob, else 0      (keep_prob = 1 - drop_prob)
//   out[n, ...] = in[n, ...] * scale[n],   din[n, ...] = dout[n, ...] * scale[n]
//
// Layouts: in, out (N, per_sample), scale (N). T is float, double or bf16 on the CPU, float or
// bf16 on CUDA; the scales are param_t<T> (fp32 for bf16 activations).
#pragma once

#include <cstdint>

#include "kernels/stream.h"
#include "tensor/dtype.h"
#include "tensor/generator.h"

namespace cnx::cpu {

// Draws N multipliers; drop_prob in [0, 1).
template <class T> void drop_path_scales(T* scale, int64_t N, double drop_prob, Generator& gen);

template <class T>
void drop_path_forward(T* out, const T* in, const param_t<T>* scale, int64_t N,
                       int64_t per_sample);
template <class T>
void drop_path_backward(T* din, const T* dout, const param_t<T>* scale, int64_t N,
                        int64_t per_sample);

}  // namespace cnx::cpu

// CUDA launchers (kernels/cuda/drop_path.cu): T float or bf16, device pointers (scale too: drawn on the
// host with cnx::cpu::drop_path_scales and copied to the device), asynchronous on `stream`.
namespace cnx::cuda {

template <class T>
void drop_path_forward(T* out, const T* in, const float* scale, int64_t N, int64_t per_sample,
                       cudaStream_t stream);
template <class T>
void drop_path_backward(T* din, const T* dout, const float* scale, int64_t N, int64_t per_sample,
                        cudaStream_t stream);

}  // namespace cnx::cuda
