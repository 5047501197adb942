// Helpers shared by the hand-written kernels in kernels/cuda/*.cu (include only from .cu files):
//
//  - float4 loads and stores, and the host-side alignment tests that choose between a kernel's
//    float4 path and its scalar fallback (a float4 access must be 16-byte aligned; tensors start
//    256-byte aligned, but a view or an odd offset need not);
//  - grid sizing for grid-stride loops: as many blocks as the device keeps resident at once (one
//    full wave, from the occupancy calculator, cached per kernel), never more than the work
//    needs, so every block loops over an equal share and no block waits for a second wave;
//  - DivWalk: i / d and i % d along a grid-stride loop without a 64-bit division per step
//    (a 64-bit division is a ~70-instruction software routine on the GPU; an elementwise kernel
//    that needs the channel c = i % C or the sample n = i / per_sample of each element would
//    spend more time dividing than moving bytes).
//
// Everything here lives in cnx::cuda::detail. Kernels and host helpers are templates or in an
// unnamed namespace, so each .cu file that includes this header gets its own copy.
#pragma once

#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>

#include "tensor/cuda_check.h"

namespace cnx::cuda::detail {

// Threads per block of the elementwise and column kernels: 8 warps, a multiple of every warp
// size in use, small enough that 8 blocks fit on an SM at full occupancy.
constexpr int kBlockThreads = 256;

// ---- alignment -------------------------------------------------------------------------------

inline bool aligned16(const void* p) { return (reinterpret_cast<uintptr_t>(p) & 15u) == 0; }

// True when every non-null pointer is 16-byte aligned (a null pointer is an operand that is
// not read or written, so it does not constrain the access width).
template <class... P> bool all_aligned16(const P*... p) {
  return ((p == nullptr || aligned16(p)) && ...);
}

// ---- float4 access ---------------------------------------------------------------------------

__device__ __forceinline__ float4 load4(const float* p) {  // p: 16-byte aligned
  return *reinterpret_cast<const float4*>(p);
}
__device__ __forceinline__ void store4(float* p, float4 v) {  // p: 16-byte aligned
  *reinterpret_cast<float4*>(p) = v;
}
__device__ __forceinline__ float4 make4(float v) { return make_float4(v, v, v, v); }

// f applied to each of the four lanes.
template <class F> __device__ __forceinline__ float4 map4(float4 a, F f) {
  return make_float4(f(a.x), f(a.y), f(a.z), f(a.w));
}
template <class F> __device__ __forceinline__ float4 map4(float4 a, float4 b, F f) {
  return make_float4(f(a.x, b.x), f(a.y, b.y), f(a.z, b.z), f(a.w, b.w));
}

// ---- grid-stride loops -----------------------------------------------------------------------

__device__ __forceinline__ int64_t global_thread() {
  return static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
}
__device__ __forceinline__ int64_t grid_threads() {
  return static_cast<int64_t>(gridDim.x) * blockDim.x;
}

// i / d and i % d for i = start, start + step, start + 2 step, ... (start, step >= 0, d >= 1):
// one division when constructed, then advance() is two adds and a compare.
struct DivWalk {
  int64_t q, r;        // i / d, i % d of the current i
  int64_t dq, dr, d;   // step / d, step % d, d
  __device__ DivWalk(int64_t start, int64_t step, int64_t divisor)
      : q(start / divisor), r(start % divisor), dq(step / divisor), dr(step % divisor),
        d(divisor) {}
  __device__ void advance() {
    q += dq;
    r += dr;           // r, dr < d, so one correction suffices
    if (r >= d) {
      r -= d;
      ++q;
    }
  }
};

// ---- grid sizing -----------------------------------------------------------------------------

// Streaming multiprocessors of the current device (cheap: no synchronisation).
inline int sm_count() {
  int dev = 0, sms = 0;
  CNX_CUDA_CHECK(cudaGetDevice(&dev));
  CNX_CUDA_CHECK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, dev));
  return sms;
}

// Blocks of kThreads threads (no dynamic shared memory) that one SM keeps resident for
// kKernel, from the occupancy calculator; computed on the first call and cached (one value per
// kernel: the process is assumed to use one kind of GPU).
template <auto kKernel, int kThreads>
int resident_blocks_per_sm() {
  static const int blocks = [] {
    int b = 0;
    CNX_CUDA_CHECK(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&b, kKernel, kThreads, 0));
    return std::max(b, 1);
  }();
  return blocks;
}

// The grid of a grid-stride kernel that has `work` independent items for blocks of kThreads
// threads, `items_per_block` items per block per step: one full wave of resident blocks, or
// fewer when the work is smaller. Always >= 1 (callers return early on empty work).
template <auto kKernel, int kThreads>
unsigned wave_grid(int64_t work, int64_t items_per_block = kThreads) {
  const int64_t needed = (work + items_per_block - 1) / items_per_block;
  const int64_t wave =
      static_cast<int64_t>(sm_count()) * resident_blocks_per_sm<kKernel, kThreads>();
  return static_cast<unsigned>(std::clamp<int64_t>(std::min(needed, wave), 1, INT32_MAX));
}

// ---- a generic elementwise map ---------------------------------------------------------------

// out[i] = f(a[i], b[i]) for i < n; b is null for a unary f (which then receives 0). With kVec
// (all of out, a, b 16-byte aligned) the first n / 4 * 4 elements move as float4 and the
// n % 4 left over are done by the first threads of the grid; otherwise one float per step.
// No __restrict__: out may alias a (add_inplace: dst += src). Each element is read before it
// is written by the same thread, so aliasing is safe.
template <bool kVec, class F>
__global__ void __launch_bounds__(kBlockThreads)
    map_kernel(float* out, const float* a, const float* b, int64_t n, F f) {
  const int64_t first = global_thread(), stride = grid_threads();
  int64_t done = 0;  // elements handled by the float4 loop
  if constexpr (kVec) {
    const int64_t n4 = n / 4;
    for (int64_t i = first; i < n4; i += stride) {
      const float4 x = load4(a + 4 * i);
      const float4 y = b ? load4(b + 4 * i) : make4(0.0f);
      store4(out + 4 * i, map4(x, y, f));
    }
    done = n4 * 4;
  }
  for (int64_t i = done + first; i < n; i += stride) out[i] = f(a[i], b ? b[i] : 0.0f);
}

// Launches map_kernel on `stream` (n >= 1), choosing the float4 path when the pointers allow.
template <class F>
void launch_map(float* out, const float* a, const float* b, int64_t n, F f, cudaStream_t stream) {
  if (all_aligned16(out, a, b)) {
    const unsigned grid = wave_grid<map_kernel<true, F>, kBlockThreads>(n / 4 + 1);
    map_kernel<true, F><<<grid, kBlockThreads, 0, stream>>>(out, a, b, n, f);
  } else {
    const unsigned grid = wave_grid<map_kernel<false, F>, kBlockThreads>(n);
    map_kernel<false, F><<<grid, kBlockThreads, 0, stream>>>(out, a, b, n, f);
  }
  CNX_CUDA_LAUNCH_CHECK();
}

}  // namespace cnx::cuda::detail
