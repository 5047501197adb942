// CUDA GELU, the exact erf form (see kernels/gelu.h for the math):
//
//   out  = 0.5 x (1 + erf(x / sqrt 2))
//   din  = dout (Phi(x) + x phi(x)),   Phi(x) = 0.5 (1 + erf(x / sqrt 2)),
//                                      phi(x) = exp(-x^2 / 2) / sqrt(2 pi)
//
// The same float expressions as the CPU reference (kernels/cpu/gelu.cpp), with CUDA's erff and
// expf (both within 2 ulp) in place of the C library's.
//
// Launch: detail::launch_map (kernels/cuda/vec.cuh), a grid-stride loop over the n elements,
// 256 threads a block, one wave of resident blocks; 16-byte loads and stores (4 floats or 8
// bf16) when every pointer is 16-byte aligned (the tail done by scalar steps), one element a
// step otherwise. bf16 elements are widened to fp32, computed as floats, rounded once stored. Two
// streams (in, out) forward and three (dout, in, din) backward: memory-bound, erff included.
#include <cuda_runtime.h>

#include "kernels/cuda/vec.cuh"
#include "kernels/gelu.h"
#include "tensor/cuda_check.h"

namespace cnx::cuda {

namespace {

constexpr float kInvSqrt2 = 0.70710678118654752440f;    // 1 / sqrt(2)
constexpr float kInvSqrt2Pi = 0.39894228040143267794f;  // 1 / sqrt(2 pi)

struct GeluForward {
  __device__ float operator()(float x, float) const {
    return 0.5f * x * (1.0f + erff(x * kInvSqrt2));
  }
};

struct GeluBackward {  // (dout, x) -> din
  __device__ float operator()(float dy, float x) const {
    const float cdf = 0.5f * (1.0f + erff(x * kInvSqrt2));  // Phi(x)
    const float pdf = kInvSqrt2Pi * expf(-0.5f * x * x);    // phi(x)
    return dy * (cdf + x * pdf);
  }
};

}  // namespace

// ================================ forward ================================
template <class T> void gelu_forward(T* out, const T* in, int64_t n, cudaStream_t stream) {
  if (n <= 0) return;
  detail::launch_map(detail::dev(out), detail::dev(in), nullptr, n, GeluForward{}, stream);
}

// ================================ backward ================================
template <class T>
void gelu_backward(T* din, const T* dout, const T* in, int64_t n, cudaStream_t stream) {
  if (n <= 0) return;
  detail::launch_map(detail::dev(din), detail::dev(dout), detail::dev(in), n, GeluBackward{},
                     stream);
}

#define CNX_INSTANTIATE(T)                                                     \
  template void gelu_forward<T>(T*, const T*, int64_t, cudaStream_t);          \
  template void gelu_backward<T>(T*, const T*, const T*, int64_t, cudaStream_t);
CNX_INSTANTIATE(float)
CNX_INSTANTIATE(bf16)
#undef CNX_INSTANTIATE

}  // namespace cnx::cuda
