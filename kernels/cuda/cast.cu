// CUDA fp32 <-> bf16 conversion (kernels/cast.h): detail::launch_map with a per-element
// identity, since the map reads its operand into fp32 and stores its result as the output type.
// Mixed operand types are handled by a small kernel of its own below: 16-byte packs of the
// narrower side when both pointers are 16-byte aligned, scalars otherwise.
#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include "kernels/cast.h"
#include "kernels/cuda/launch.cuh"
#include "kernels/cuda/vec.cuh"
#include "tensor/cuda_check.h"

namespace cnx::cuda {

namespace {

using detail::kBlockThreads;

// out[i] = Out(in[i]) through fp32. With kVec: 8 elements a step (one 16-byte pack of bf16,
// two of float), both pointers 16-byte aligned; the n % 8 tail by scalar steps.
template <bool kVec, class Out, class In>
__global__ void __launch_bounds__(kBlockThreads)
    cast_kernel(Out* __restrict__ out, const In* __restrict__ in, int64_t n) {
  const int64_t first = detail::global_thread(), stride = detail::grid_threads();
  int64_t done = 0;
  if constexpr (kVec) {
    const int64_t groups = n / 8;
    constexpr int kInN = detail::Pack<In>::kN, kOutN = detail::Pack<Out>::kN;  // 4 or 8
    for (int64_t i = first; i < groups; i += stride) {
      alignas(16) In x[8];
      alignas(16) Out o[8];
#pragma unroll
      for (int k = 0; k < 8 / kInN; ++k)  // one pack of bf16, two of float
        reinterpret_cast<detail::Pack<In>*>(x)[k] = detail::load_pack(in + 8 * i + k * kInN);
#pragma unroll
      for (int k = 0; k < 8; ++k) o[k] = detail::from_float<Out>(detail::to_float(x[k]));
#pragma unroll
      for (int k = 0; k < 8 / kOutN; ++k)
        detail::store_pack(out + 8 * i + k * kOutN,
                           reinterpret_cast<const detail::Pack<Out>*>(o)[k]);
    }
    done = groups * 8;
  }
  for (int64_t i = done + first; i < n; i += stride)
    out[i] = detail::from_float<Out>(detail::to_float(in[i]));
}

template <class Out, class In>
void launch_cast(Out* out, const In* in, int64_t n, cudaStream_t stream) {
  if (n <= 0) return;
  if (detail::all_aligned16(out, in)) {
    const unsigned grid = detail::wave_grid<cast_kernel<true, Out, In>, kBlockThreads>(n / 8 + 1);
    launch<cast_kernel<true, Out, In>>(grid, kBlockThreads, 0, stream, out, in, n);
  } else {
    const unsigned grid = detail::wave_grid<cast_kernel<false, Out, In>, kBlockThreads>(n);
    launch<cast_kernel<false, Out, In>>(grid, kBlockThreads, 0, stream, out, in, n);
  }
  CNX_CUDA_LAUNCH_CHECK();
}

}  // namespace

void cast(bf16* out, const float* in, int64_t n, cudaStream_t stream) {
  launch_cast(detail::dev(out), in, n, stream);
}

void cast(float* out, const bf16* in, int64_t n, cudaStream_t stream) {
  launch_cast(out, detail::dev(in), n, stream);
}

}  // namespace cnx::cuda
