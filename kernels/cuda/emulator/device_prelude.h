// The CUDA device built-ins for a host compiler: force-included (g++ -include) before every .cu
// file of the emulator build (CMakeLists.txt, CNX_CUDA_EMULATOR), so that the unchanged kernel
// sources compile with g++ and run on the emulated device (README.md in this folder).
//
// What each CUDA construct becomes:
//   __global__ __device__ __host__ __launch_bounds__ __grid_constant__   nothing (host code)
//   __forceinline__                                                      inline
//   __shared__ T x[N];   static thread_local T x[N]: one array per host thread, shared by the
//                        fibers (threads) of the block that host thread is running; blocks run
//                        one after the other, so each block sees it as its own
//   threadIdx blockIdx blockDim gridDim   per-fiber values: thread_local variables that the
//                        scheduler sets before it switches to a fiber
//   __syncthreads  __syncwarp  __shfl_*_sync   switch fibers (scheduler.cpp)
//   __ldg  __f*_rn  __expf  rsqrtf ...      host arithmetic (see the notes on each)
// The bf16 conversions are cuda_bf16.h's own host functions (round to nearest even, exact).
#pragma once

#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include <cmath>
#include <cstdint>
#include <cstring>
#include <source_location>
#include <type_traits>

#include "kernels/cuda/emulator/emulator.h"

// ---- annotations: meaningless on the host ------------------------------------------------------
#undef __global__
#define __global__
#undef __device__
#define __device__
#undef __host__
#define __host__
#undef __forceinline__
#define __forceinline__ inline
#undef __launch_bounds__
#define __launch_bounds__(...)
#undef __grid_constant__
#define __grid_constant__
#undef __shared__
#define __shared__ static thread_local

// ---- built-in variables ------------------------------------------------------------------------
// constinit: no dynamic initialisation, so g++ reads them without a TLS wrapper call.
extern thread_local constinit uint3 threadIdx;
extern thread_local constinit uint3 blockIdx;
extern thread_local constinit uint3 blockDim;
extern thread_local constinit uint3 gridDim;
constexpr int warpSize = 32;

// ---- synchronisation ---------------------------------------------------------------------------
inline void __syncthreads(std::source_location where = std::source_location::current()) {
  ::cnx::emu::syncthreads(where);
}

namespace cnx::emu::detail {
template <class T>
T shuffle_as(unsigned mask, T var, int lane_arg, int width, ShuffleMode mode,
             std::source_location where) {
  static_assert(std::is_trivially_copyable_v<T> && sizeof(T) <= 8,
                "warp shuffles move 4 or 8 bytes (CUDA: 64-bit types are two 32-bit shuffles)");
  uint64_t bits = 0;
  std::memcpy(&bits, &var, sizeof(T));
  bits = shuffle(mask, bits, lane_arg, width, mode, where);
  T out;
  std::memcpy(&out, &bits, sizeof(T));
  return out;
}
}  // namespace cnx::emu::detail

template <class T>
T __shfl_sync(unsigned mask, T var, int src_lane, int width = warpSize,
              std::source_location where = std::source_location::current()) {
  return ::cnx::emu::detail::shuffle_as(mask, var, src_lane, width, ::cnx::emu::ShuffleMode::kIdx, where);
}
template <class T>
T __shfl_up_sync(unsigned mask, T var, unsigned delta, int width = warpSize,
                 std::source_location where = std::source_location::current()) {
  return ::cnx::emu::detail::shuffle_as(mask, var, static_cast<int>(delta), width,
                                        ::cnx::emu::ShuffleMode::kUp, where);
}
template <class T>
T __shfl_down_sync(unsigned mask, T var, unsigned delta, int width = warpSize,
                   std::source_location where = std::source_location::current()) {
  return ::cnx::emu::detail::shuffle_as(mask, var, static_cast<int>(delta), width,
                                        ::cnx::emu::ShuffleMode::kDown, where);
}
template <class T>
T __shfl_xor_sync(unsigned mask, T var, int lane_mask, int width = warpSize,
                  std::source_location where = std::source_location::current()) {
  return ::cnx::emu::detail::shuffle_as(mask, var, lane_mask, width, ::cnx::emu::ShuffleMode::kXor, where);
}
// __syncwarp(mask): every lane of the mask arrives before any leaves (a shuffle in which each
// lane reads itself: xor 0).
inline void __syncwarp(unsigned mask = 0xffffffffu,
                       std::source_location where = std::source_location::current()) {
  (void)::cnx::emu::shuffle(mask, 0, 0, warpSize, ::cnx::emu::ShuffleMode::kXor, where);
}

// ---- what cuda_runtime.h declares only for nvcc ---------------------------------------------------
template <class T>
cudaError_t cudaFuncSetAttribute(T* kernel, cudaFuncAttribute attr, int value) {
  return ::cudaFuncSetAttribute(reinterpret_cast<const void*>(kernel), attr, value);
}

// CUDA's integer and floating-point min/max overloads (math_functions.h) for the kernels.
template <class A, class B> std::common_type_t<A, B> min(A a, B b) {
  return b < a ? static_cast<std::common_type_t<A, B>>(b) : static_cast<std::common_type_t<A, B>>(a);
}
template <class A, class B> std::common_type_t<A, B> max(A a, B b) {
  return a < b ? static_cast<std::common_type_t<A, B>>(b) : static_cast<std::common_type_t<A, B>>(a);
}

// ---- memory ------------------------------------------------------------------------------------
// __ldg: a load through the read-only cache; the same value.
template <class T> T __ldg(const T* p) { return *p; }

// ---- arithmetic --------------------------------------------------------------------------------
// The _rn intrinsics are single IEEE operations rounded to nearest even: exactly what the host's
// SSE arithmetic does, as long as the compiler does not fuse a multiply and an add into an FMA
// (the emulator build compiles with -ffp-contract=off).
inline float __fadd_rn(float a, float b) { return a + b; }
inline float __fsub_rn(float a, float b) { return a - b; }
inline float __fmul_rn(float a, float b) { return a * b; }
inline float __fdiv_rn(float a, float b) { return a / b; }
inline float __fsqrt_rn(float a) { return std::sqrt(a); }
inline float __frcp_rn(float a) { return 1.0f / a; }
inline float __fmaf_rn(float a, float b, float c) { return std::fma(a, b, c); }
inline double __dadd_rn(double a, double b) { return a + b; }
inline double __dmul_rn(double a, double b) { return a * b; }
// Transcendentals: the host libm's, correctly rounded or within 1 ulp; the GPU's are within the
// bounds of the CUDA Programming Guide's tables (erff 2 ulp, expf 2 ulp, rsqrtf 2 ulp), so
// results agree to a few ulp, not bitwise. The fast intrinsics (__expf, __logf) are far less
// accurate on the GPU (2 + 1.16 * |x| ulp for __expf); here they are the accurate functions.
inline float rsqrtf(float a) { return 1.0f / std::sqrt(a); }
inline double rsqrt(double a) { return 1.0 / std::sqrt(a); }
inline float __expf(float a) { return std::exp(a); }
inline float __logf(float a) { return std::log(a); }
inline float __fdividef(float a, float b) { return a / b; }
inline float __saturatef(float a) { return a < 0.0f ? 0.0f : (a > 1.0f ? 1.0f : a); }
