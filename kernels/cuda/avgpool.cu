// CUDA global average pool over H and W (see kernels/avgpool.h):
//
//   out[n, c] = sum_{h, w} in[n, h, w, c] / (H W)        din[n, h, w, c] = dout[n, c] / (H W)
//
// Forward: grid (column tiles, min(N, 65535)), 256 threads a block; block (t, n) reduces
// sample n's H W rows over its tile of channel units (float4 when C % 4 == 0 and in, out are
// 16-byte aligned, else floats): `tile` units side by side along C (coalesced) and `lanes`
// spatial positions at a time (detail::column_tiling: at most 32 units, so >= 8 lanes), in
// fp32 registers; the lanes are then added in lane order through shared memory
// (deterministic) and the sum divided by H W. Samples past 65535 loop over blockIdx.y.
// Backward: one grid-stride loop over din's N H W C elements (vec.cuh), the channel and the
// sample of each element from DivWalks; din = dout * (1 / (H W)), with 1 / (H W) rounded from
// double as the CPU does (bitwise the CPU reference). float4 under the same conditions.
#include <cuda_runtime.h>

#include <algorithm>
#include <type_traits>

#include "kernels/avgpool.h"
#include "kernels/cuda/launch.cuh"
#include "kernels/cuda/reduce.cuh"
#include "kernels/cuda/vec.cuh"
#include "tensor/cuda_check.h"

namespace cnx::cuda {

namespace {

using detail::DivWalk;
using detail::load4;
using detail::store4;

// out (N, C); in (N, HW, C).
template <bool kVec>
__global__ void __launch_bounds__(detail::kBlockThreads)
    avgpool_forward_kernel(float* __restrict__ out, const float* __restrict__ in, int64_t N,
                           int64_t HW, int64_t C, int tile, int lanes) {
  constexpr int kWidth = kVec ? 4 : 1;
  using T = std::conditional_t<kVec, float4, float>;
  __shared__ T lane_sums[detail::kBlockThreads];
  const int64_t units = C / kWidth;
  const int u_local = threadIdx.x % tile, lane = threadIdx.x / tile;
  const int64_t unit = static_cast<int64_t>(blockIdx.x) * tile + u_local;
  const int64_t c = unit * kWidth;
  const bool active = lane < lanes && unit < units;
  const float hw = static_cast<float>(HW);
  for (int64_t n = blockIdx.y; n < N; n += gridDim.y) {  // uniform over the block
    T acc{};
    if (active) {
      const float* x = in + n * HW * C + c;
      for (int64_t s = lane; s < HW; s += lanes) {
        if constexpr (kVec) {
          const float4 v = load4(x + s * C);
          acc.x += v.x;
          acc.y += v.y;
          acc.z += v.z;
          acc.w += v.w;
        } else {
          acc += x[s * C];
        }
      }
    }
    lane_sums[threadIdx.x] = acc;
    __syncthreads();
    if (lane == 0 && unit < units) {  // lanes added in order 0, 1, ...
      T total = lane_sums[u_local];
      for (int l = 1; l < lanes; ++l) {
        const T v = lane_sums[l * tile + u_local];
        if constexpr (kVec) {
          total.x += v.x;
          total.y += v.y;
          total.z += v.z;
          total.w += v.w;
        } else {
          total += v;
        }
      }
      if constexpr (kVec)
        store4(out + n * C + c,
               make_float4(total.x / hw, total.y / hw, total.z / hw, total.w / hw));
      else
        out[n * C + c] = total / hw;
    }
    __syncthreads();  // lane_sums is rewritten for the next sample
  }
}

// din (N, HW, C) as n = N HW C elements; dout (N, C).
template <bool kVec>
__global__ void __launch_bounds__(detail::kBlockThreads)
    avgpool_backward_kernel(float* __restrict__ din, const float* __restrict__ dout, int64_t n,
                            int64_t HW, int64_t C, float inv_hw) {
  const int64_t first = detail::global_thread(), stride = detail::grid_threads();
  const int64_t per_sample = HW * C;
  if constexpr (kVec) {
    const int64_t n4 = n / 4;
    DivWalk channel(4 * first, 4 * stride, C), sample(4 * first, 4 * stride, per_sample);
    for (int64_t i = first; i < n4; i += stride, channel.advance(), sample.advance()) {
      const float4 g = load4(dout + sample.q * C + channel.r);
      store4(din + 4 * i, make_float4(g.x * inv_hw, g.y * inv_hw, g.z * inv_hw, g.w * inv_hw));
    }
  } else {
    DivWalk channel(first, stride, C), sample(first, stride, per_sample);
    for (int64_t i = first; i < n; i += stride, channel.advance(), sample.advance())
      din[i] = dout[sample.q * C + channel.r] * inv_hw;
  }
}

}  // namespace

// ================================ forward ================================
void global_avgpool_forward(float* out, const float* in, int64_t N, int64_t H, int64_t W,
                            int64_t C, cudaStream_t stream) {
  if (N <= 0 || C <= 0) return;
  const int64_t HW = H * W;  // HW == 0 gives 0 / 0 = NaN, as the CPU reference
  const bool vec = C % 4 == 0 && detail::all_aligned16(out, in);
  const detail::ColumnTiling ct = detail::column_tiling(vec ? C / 4 : C);
  const dim3 grid(static_cast<unsigned>(ct.tiles),
                  static_cast<unsigned>(std::min<int64_t>(N, detail::kMaxGridY)));
  if (vec)
    launch<avgpool_forward_kernel<true>>(grid, detail::kBlockThreads, 0, stream, out, in, N, HW, C,
                                         ct.tile, ct.lanes);
  else
    launch<avgpool_forward_kernel<false>>(grid, detail::kBlockThreads, 0, stream, out, in, N, HW,
                                          C, ct.tile, ct.lanes);
  CNX_CUDA_LAUNCH_CHECK();
}

// ================================ backward ================================
void global_avgpool_backward(float* din, const float* dout, int64_t N, int64_t H, int64_t W,
                             int64_t C, cudaStream_t stream) {
  const int64_t HW = H * W, n = N * HW * C;
  if (n <= 0) return;
  const float inv_hw = static_cast<float>(1.0 / static_cast<double>(HW));  // as the CPU
  if (C % 4 == 0 && detail::all_aligned16(din, dout)) {
    const unsigned grid =
        detail::wave_grid<avgpool_backward_kernel<true>, detail::kBlockThreads>(n / 4);
    launch<avgpool_backward_kernel<true>>(grid, detail::kBlockThreads, 0, stream, din, dout, n, HW,
                                          C, inv_hw);
  } else {
    const unsigned grid =
        detail::wave_grid<avgpool_backward_kernel<false>, detail::kBlockThreads>(n);
    launch<avgpool_backward_kernel<false>>(grid, detail::kBlockThreads, 0, stream, din, dout, n,
                                           HW, C, inv_hw);
  }
  CNX_CUDA_LAUNCH_CHECK();
}

}  // namespace cnx::cuda
