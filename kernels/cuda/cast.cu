// CUDA fp32 <-> bf16 conversion (kernels/cast.h): detail::launch_map with a per-element
// identity, since the map reads its operand into fp32 and stores its result as the output type.
// Mixed operand types are handled by a small kernel of its own below: 16-byte packs of the
// narrower side when both pointers are 16-byte aligned, scalars otherwise.
#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include "kernels/cast.h"
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
    for (int64_t i = first; i < groups; i += stride) {
      Out o[8];
      const In* src = in + 8 * i;
      In x[8];
      if constexpr (sizeof(In) == 2) {
        *reinterpret_cast<detail::Pack<In>*>(x) = detail::load_pack(src);
      } else {
        *reinterpret_cast<detail::Pack<In>*>(x) = detail::load_pack(src);
        *reinterpret_cast<detail::Pack<In>*>(x + 4) = detail::load_pack(src + 4);
      }
#pragma unroll
      for (int k = 0; k < 8; ++k) o[k] = detail::from_float<Out>(detail::to_float(x[k]));
      Out* dst = out + 8 * i;
      if constexpr (sizeof(Out) == 2) {
        detail::store_pack(dst, *reinterpret_cast<const detail::Pack<Out>*>(o));
      } else {
        detail::store_pack(dst, *reinterpret_cast<const detail::Pack<Out>*>(o));
        detail::store_pack(dst + 4, *reinterpret_cast<const detail::Pack<Out>*>(o + 4));
      }
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
    cast_kernel<true, Out, In><<<grid, kBlockThreads, 0, stream>>>(out, in, n);
  } else {
    const unsigned grid = detail::wave_grid<cast_kernel<false, Out, In>, kBlockThreads>(n);
    cast_kernel<false, Out, In><<<grid, kBlockThreads, 0, stream>>>(out, in, n);
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
