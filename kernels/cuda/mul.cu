// CUDA elementwise product (see kernels/mul.h):
//
//   out = a * b;   da = dout * b,   db = dout * a
//
// Launch: grid-stride loops, 256 threads a block, one wave of resident blocks (vec.cuh);
// float4 when every pointer is 16-byte aligned (the n % 4 tail in scalar steps), one float a
// step otherwise. Forward and a single gradient use detail::launch_map (three streams); both
// gradients come from one kernel that reads dout, a and b once (five streams, not six).
// One correctly rounded multiply per element: bitwise the CPU reference.
#include <cuda_runtime.h>

#include "kernels/cuda/launch.cuh"
#include "kernels/cuda/vec.cuh"
#include "kernels/mul.h"
#include "tensor/cuda_check.h"

namespace cnx::cuda {

namespace {

using detail::load4;
using detail::store4;

struct Mul {
  __device__ float operator()(float a, float b) const { return a * b; }
};

// da = dout * b and db = dout * a, both; da, db, dout, a, b (n).
template <bool kVec>
__global__ void __launch_bounds__(detail::kBlockThreads)
    mul_backward_both_kernel(float* __restrict__ da, float* __restrict__ db,
                             const float* __restrict__ dout, const float* __restrict__ a,
                             const float* __restrict__ b, int64_t n) {
  const int64_t first = detail::global_thread(), stride = detail::grid_threads();
  int64_t done = 0;
  if constexpr (kVec) {
    const int64_t n4 = n / 4;
    for (int64_t i = first; i < n4; i += stride) {
      const float4 g = load4(dout + 4 * i), x = load4(a + 4 * i), y = load4(b + 4 * i);
      store4(da + 4 * i, make_float4(g.x * y.x, g.y * y.y, g.z * y.z, g.w * y.w));
      store4(db + 4 * i, make_float4(g.x * x.x, g.y * x.y, g.z * x.z, g.w * x.w));
    }
    done = n4 * 4;
  }
  for (int64_t i = done + first; i < n; i += stride) {
    const float g = dout[i];
    da[i] = g * b[i];
    db[i] = g * a[i];
  }
}

}  // namespace

// ================================ forward ================================
void mul_forward(float* out, const float* a, const float* b, int64_t n, cudaStream_t stream) {
  if (n <= 0) return;
  detail::launch_map(out, a, b, n, Mul{}, stream);
}

// ================================ backward ================================
void mul_backward(float* da, float* db, const float* dout, const float* a, const float* b,
                  int64_t n, cudaStream_t stream) {
  if (n <= 0) return;
  if (da && db) {
    if (detail::all_aligned16(da, db, dout, a, b)) {
      const unsigned grid =
          detail::wave_grid<mul_backward_both_kernel<true>, detail::kBlockThreads>(n / 4 + 1);
      launch<mul_backward_both_kernel<true>>(grid, detail::kBlockThreads, 0, stream, da, db,
                                             dout, a, b, n);
    } else {
      const unsigned grid =
          detail::wave_grid<mul_backward_both_kernel<false>, detail::kBlockThreads>(n);
      launch<mul_backward_both_kernel<false>>(grid, detail::kBlockThreads, 0, stream, da, db,
                                              dout, a, b, n);
    }
    CNX_CUDA_LAUNCH_CHECK();
  } else if (da) {
    detail::launch_map(da, dout, b, n, Mul{}, stream);
  } else if (db) {
    detail::launch_map(db, dout, a, n, Mul{}, stream);
  }
}

}  // namespace cnx::cuda
