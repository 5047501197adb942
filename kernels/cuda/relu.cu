// CUDA ReLU (see kernels/relu.h for the math):
//
//   out = x <= 0 ? 0 : x           din = out <= 0 ? 0 : dout
//
// Selection, no arithmetic: each stored element is an operand's element copied bit for bit (or
// zero), so results are bitwise the CPU reference's in float and bf16 (bf16 is compared with 0
// after an exact widening to fp32 and never rounded; NaN payloads survive).
//
// Launch: a grid-stride loop over the n elements, 256 threads a block, one wave of resident
// blocks (detail::wave_grid); 16-byte loads and stores (4 floats or 8 bf16, detail::Pack) when
// every pointer is 16-byte aligned, the last n % (4 or 8) elements done by the first threads,
// one element a step otherwise. Two streams forward (in, out), three backward (dout, out, din):
// memory-bound. No __restrict__: out may alias in (and din dout): each element is read before
// the same thread writes it.
#include <cuda_runtime.h>

#include "kernels/cuda/launch.cuh"
#include "kernels/cuda/vec.cuh"
#include "kernels/relu.h"
#include "tensor/cuda_check.h"

namespace cnx::cuda {

namespace {

using detail::from_float;
using detail::to_float;

// dst[i] = keep[i] <= 0 ? 0 : src[i]: forward (keep = src = in), backward (keep = out,
// src = dout). T is float or __nv_bfloat16.
template <class T> __device__ __forceinline__ T select(T keep, T src) {
  return to_float(keep) <= 0.0f ? from_float<T>(0.0f) : src;
}

// dst (n); keep (n); src (n).
template <bool kVec, class T>
__global__ void __launch_bounds__(detail::kBlockThreads)
    relu_kernel(T* dst, const T* keep, const T* src, int64_t n) {
  constexpr int kN = detail::Pack<T>::kN;
  const int64_t first = detail::global_thread(), stride = detail::grid_threads();
  int64_t done = 0;  // elements handled by the pack loop
  if constexpr (kVec) {
    const int64_t packs = n / kN;
    for (int64_t i = first; i < packs; i += stride) {
      const detail::Pack<T> k = detail::load_pack(keep + kN * i);
      const detail::Pack<T> s = keep == src ? k : detail::load_pack(src + kN * i);
      detail::Pack<T> o;
#pragma unroll
      for (int j = 0; j < kN; ++j) o.v[j] = select(k.v[j], s.v[j]);
      detail::store_pack(dst + kN * i, o);
    }
    done = packs * kN;
  }
  for (int64_t i = done + first; i < n; i += stride) dst[i] = select(keep[i], src[i]);
}

template <class T> void launch_relu(T* dst, const T* keep, const T* src, int64_t n,
                                    cudaStream_t stream) {
  if (detail::all_aligned16(dst, keep, src)) {
    const unsigned grid = detail::wave_grid<relu_kernel<true, T>, detail::kBlockThreads>(
        n / detail::Pack<T>::kN + 1);
    launch<relu_kernel<true, T>>(grid, detail::kBlockThreads, 0, stream, dst, keep, src, n);
  } else {
    const unsigned grid = detail::wave_grid<relu_kernel<false, T>, detail::kBlockThreads>(n);
    launch<relu_kernel<false, T>>(grid, detail::kBlockThreads, 0, stream, dst, keep, src, n);
  }
  CNX_CUDA_LAUNCH_CHECK();
}

}  // namespace

// ================================ forward ================================
template <class T> void relu_forward(T* out, const T* in, int64_t n, cudaStream_t stream) {
  if (n <= 0) return;
  launch_relu(detail::dev(out), detail::dev(in), detail::dev(in), n, stream);
}

// ================================ backward ================================
template <class T>
void relu_backward(T* din, const T* dout, const T* out, int64_t n, cudaStream_t stream) {
  if (n <= 0) return;
  launch_relu(detail::dev(din), detail::dev(out), detail::dev(dout), n, stream);
}

#define CNX_INSTANTIATE(T)                                             \
  template void relu_forward<T>(T*, const T*, int64_t, cudaStream_t); \
  template void relu_backward<T>(T*, const T*, const T*, int64_t, cudaStream_t);
CNX_INSTANTIATE(float)
CNX_INSTANTIATE(bf16)
#undef CNX_INSTANTIATE

}  // namespace cnx::cuda
