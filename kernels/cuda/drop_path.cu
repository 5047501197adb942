// CUDA drop path (see kernels/drop_path.h): every element of sample n is multiplied by
// scale[n] (0 for a dropped sample, 1/keep_prob for a kept one; drawn on the host by
// cnx::cpu::drop_path_scales, so CPU and GPU drop the same samples):
//
//   out[n, i] = in[n, i] * scale[n],   din[n, i] = dout[n, i] * scale[n]
//
// Launch: one grid-stride loop over the N * per_sample elements, 256 threads a block, one wave
// of resident blocks (vec.cuh). The sample of each element comes from a DivWalk (no 64-bit
// division per element). float4 when per_sample % 4 == 0 (so no group of four straddles two
// samples) and in, out are 16-byte aligned (for bf16 activations, 8-byte loads widened to fp32);
// one element a step otherwise. The N scales are read
// through the cache. One correctly rounded multiply per element: bitwise the CPU reference.
// (A dropped sample is still read: the kernel writes 0 * in, exactly as the CPU does, NaN and
// all; skipping the read would save bandwidth only when drop path is on.)
#include <cuda_runtime.h>

#include "kernels/cuda/launch.cuh"
#include "kernels/cuda/vec.cuh"
#include "kernels/drop_path.h"
#include "tensor/cuda_check.h"

namespace cnx::cuda {

namespace {

using detail::DivWalk;

// out, in (N, per_sample) of T (float or __nv_bfloat16); scale (N) fp32.
template <bool kVec, class T>
__global__ void __launch_bounds__(detail::kBlockThreads)
    drop_path_kernel(T* __restrict__ out, const T* __restrict__ in,
                     const float* __restrict__ scale, int64_t N, int64_t per_sample) {
  const int64_t first = detail::global_thread(), stride = detail::grid_threads();
  if constexpr (kVec) {
    const int64_t n4 = N * per_sample / 4;
    DivWalk sample(4 * first, 4 * stride, per_sample);  // sample.q: the sample of element 4 i
    for (int64_t i = first; i < n4; i += stride, sample.advance()) {
      const float s = __ldg(scale + sample.q);
      const float4 x = detail::load4f(in + 4 * i);
      detail::store4f(out + 4 * i, make_float4(x.x * s, x.y * s, x.z * s, x.w * s));
    }
  } else {
    const int64_t n = N * per_sample;
    DivWalk sample(first, stride, per_sample);
    for (int64_t i = first; i < n; i += stride, sample.advance())
      out[i] = detail::from_float<T>(detail::to_float(in[i]) * __ldg(scale + sample.q));
  }
}

template <class T>
void launch_drop_path(T* out, const T* in, const float* scale, int64_t N, int64_t per_sample,
                      cudaStream_t stream) {
  const int64_t n = N * per_sample;
  if (n <= 0) return;
  if (per_sample % 4 == 0 && detail::all_aligned16(out, in)) {
    const unsigned grid =
        detail::wave_grid<drop_path_kernel<true, T>, detail::kBlockThreads>(n / 4);
    launch<drop_path_kernel<true, T>>(grid, detail::kBlockThreads, 0, stream, out, in, scale, N,
                                      per_sample);
  } else {
    const unsigned grid = detail::wave_grid<drop_path_kernel<false, T>, detail::kBlockThreads>(n);
    launch<drop_path_kernel<false, T>>(grid, detail::kBlockThreads, 0, stream, out, in, scale, N,
                                       per_sample);
  }
  CNX_CUDA_LAUNCH_CHECK();
}

}  // namespace

// ================================ forward ================================
template <class T>
void drop_path_forward(T* out, const T* in, const float* scale, int64_t N, int64_t per_sample,
                       cudaStream_t stream) {
  launch_drop_path(detail::dev(out), detail::dev(in), scale, N, per_sample, stream);
}

// ================================ backward ================================
template <class T>
void drop_path_backward(T* din, const T* dout, const float* scale, int64_t N, int64_t per_sample,
                        cudaStream_t stream) {
  // the same scaling
  launch_drop_path(detail::dev(din), detail::dev(dout), scale, N, per_sample, stream);
}

#define CNX_INSTANTIATE(T)                                                                   \
  template void drop_path_forward<T>(T*, const T*, const float*, int64_t, int64_t,           \
                                     cudaStream_t);                                          \
  template void drop_path_backward<T>(T*, const T*, const float*, int64_t, int64_t, cudaStream_t);
CNX_INSTANTIATE(float)
CNX_INSTANTIATE(bf16)
#undef CNX_INSTANTIATE

}  // namespace cnx::cuda
