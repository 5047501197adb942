// Helpers shared by the hand-written kernels in kernels/cuda/*.cu (include only from .cu files):
//
//  - bf16: the host type cnx::bf16 (tensor/dtype.h, what launchers take) and CUDA's
//    __nv_bfloat16 are the same 16 bits; dev() turns one pointer into the other, and
//    to_float/from_float move a float or a bf16 element to and from fp32 registers, so a kernel
//    templated on its storage type T computes in fp32 either way;
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

#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>
#include <type_traits>

#include "kernels/cuda/launch.cuh"
#include "tensor/cuda_check.h"
#include "tensor/dtype.h"

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

// ---- bf16 ------------------------------------------------------------------------------------

// The device type of a launcher's element type: __nv_bfloat16 for cnx::bf16, else itself.
template <class T>
using device_t = std::conditional_t<std::is_same_v<std::remove_const_t<T>, bf16>,
                                    std::conditional_t<std::is_const_v<T>, const __nv_bfloat16,
                                                       __nv_bfloat16>,
                                    T>;
static_assert(sizeof(bf16) == sizeof(__nv_bfloat16));

template <class T> device_t<T>* dev(T* p) { return reinterpret_cast<device_t<T>*>(p); }

__device__ __forceinline__ float to_float(float x) { return x; }
__device__ __forceinline__ float to_float(__nv_bfloat16 x) { return __bfloat162float(x); }
// fp32 -> T, rounding to nearest even for bf16.
template <class T> __device__ __forceinline__ T from_float(float x);
template <> __device__ __forceinline__ float from_float<float>(float x) { return x; }
template <> __device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float x) {
  return __float2bfloat16_rn(x);
}

// 16 bytes of T (4 floats or 8 bf16), the unit of a vectorised load or store.
template <class T> struct alignas(16) Pack {
  static constexpr int kN = 16 / static_cast<int>(sizeof(T));
  T v[kN];
};
template <class T> __device__ __forceinline__ Pack<T> load_pack(const T* p) {  // 16-byte aligned
  return *reinterpret_cast<const Pack<T>*>(p);
}
template <class T> __device__ __forceinline__ void store_pack(T* p, const Pack<T>& v) {
  *reinterpret_cast<Pack<T>*>(p) = v;
}

// Four consecutive elements of T as fp32 lanes, and back (the unit of kernels written with
// float4 arithmetic that also run on bf16). p must be aligned to 4 elements: 16 bytes for float,
// 8 for bf16 (a 16-byte-aligned base plus a multiple of 4 elements is).
__device__ __forceinline__ float4 load4f(const float* p) { return load4(p); }
__device__ __forceinline__ float4 load4f(const __nv_bfloat16* p) {
  const uint2 raw = *reinterpret_cast<const uint2*>(p);
  const float2 lo = __bfloat1622float2(*reinterpret_cast<const __nv_bfloat162*>(&raw.x));
  const float2 hi = __bfloat1622float2(*reinterpret_cast<const __nv_bfloat162*>(&raw.y));
  return make_float4(lo.x, lo.y, hi.x, hi.y);
}
__device__ __forceinline__ void store4f(float* p, float4 v) { store4(p, v); }
__device__ __forceinline__ void store4f(__nv_bfloat16* p, float4 v) {
  const __nv_bfloat162 lo = __floats2bfloat162_rn(v.x, v.y);
  const __nv_bfloat162 hi = __floats2bfloat162_rn(v.z, v.w);
  uint2 raw;
  raw.x = *reinterpret_cast<const uint32_t*>(&lo);
  raw.y = *reinterpret_cast<const uint32_t*>(&hi);
  *reinterpret_cast<uint2*>(p) = raw;
}

// ---- a generic elementwise map ---------------------------------------------------------------

// out[i] = f(a[i], b[i]) for i < n, computed in fp32 and stored as T (float or __nv_bfloat16);
// b is null for a unary f (which then receives 0). With kVec (all of out, a, b 16-byte aligned)
// the first n / kN * kN elements move as 16-byte packs (kN = 4 floats or 8 bf16) and the rest
// are done by the first threads of the grid; otherwise one element per step.
// No __restrict__: out may alias a (add_inplace: dst += src). Each element is read before it
// is written by the same thread, so aliasing is safe.
template <bool kVec, class T, class F>
__global__ void __launch_bounds__(kBlockThreads)
    map_kernel(T* out, const T* a, const T* b, int64_t n, F f) {
  constexpr int kN = Pack<T>::kN;
  const int64_t first = global_thread(), stride = grid_threads();
  int64_t done = 0;  // elements handled by the pack loop
  if constexpr (kVec) {
    const int64_t packs = n / kN;
    for (int64_t i = first; i < packs; i += stride) {
      const Pack<T> x = load_pack(a + kN * i);
      Pack<T> y{};
      if (b) y = load_pack(b + kN * i);
      Pack<T> o;
#pragma unroll
      for (int k = 0; k < kN; ++k)
        o.v[k] = from_float<T>(f(to_float(x.v[k]), b ? to_float(y.v[k]) : 0.0f));
      store_pack(out + kN * i, o);
    }
    done = packs * kN;
  }
  for (int64_t i = done + first; i < n; i += stride)
    out[i] = from_float<T>(f(to_float(a[i]), b ? to_float(b[i]) : 0.0f));
}

// Launches map_kernel on `stream` (n >= 1), choosing the pack path when the pointers allow.
// T is float or __nv_bfloat16.
template <class T, class F>
void launch_map(T* out, const T* a, const std::type_identity_t<T>* b, int64_t n, F f,
                cudaStream_t stream) {
  if (all_aligned16(out, a, b)) {
    const unsigned grid =
        wave_grid<map_kernel<true, T, F>, kBlockThreads>(n / Pack<T>::kN + 1);
    launch<map_kernel<true, T, F>>(grid, kBlockThreads, 0, stream, out, a, b, n, f);
  } else {
    const unsigned grid = wave_grid<map_kernel<false, T, F>, kBlockThreads>(n);
    launch<map_kernel<false, T, F>>(grid, kBlockThreads, 0, stream, out, a, b, n, f);
  }
  CNX_CUDA_LAUNCH_CHECK();
}

}  // namespace cnx::cuda::detail
