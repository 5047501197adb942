// CUDA sum of all elements (see kernels/sum.h):
//
//   out[0] = sum_i in[i]          din[i] = dout[0]
//
// Forward, deterministic two-stage reduction accumulated in double (as the CPU reference; the
// 2x slower fp64 adds are free in a memory-bound kernel), through the workspace, which holds
// P doubles (2 P floats, 8-byte aligned):
//  1. P = clamp(ceil(n / 16384), 1, 1024) blocks of 256 threads; block p sums the elements
//     [p * chunk, min(n, (p + 1) * chunk)), chunk = ceil(n / P) rounded up to a multiple of 4:
//     each thread a strided subset in order (float4 when `in` is 16-byte aligned, which every
//     chunk then is too), then the block in a fixed butterfly order (reduce.cuh), into
//     partial[p]. P depends on n only, so the result is the same on every run and every GPU.
//  2. One block adds the P partials (strided per thread, then the butterfly) and writes the
//     total rounded to float.
// Backward: a grid-stride fill of din with the device scalar dout[0] (float4 when aligned).
#include <cuda_runtime.h>

#include <algorithm>

#include "kernels/cuda/launch.cuh"
#include "kernels/cuda/reduce.cuh"
#include "kernels/cuda/vec.cuh"
#include "kernels/sum.h"
#include "tensor/cuda_check.h"
#include "tensor/error.h"

namespace cnx::cuda {

namespace {

constexpr int kThreads = 256;
constexpr int64_t kMinChunk = 16384;
constexpr int64_t kMaxBlocks = 1024;

int64_t sum_blocks(int64_t n) {
  return std::clamp<int64_t>((n + kMinChunk - 1) / kMinChunk, 1, kMaxBlocks);
}
int64_t sum_chunk(int64_t n) {
  const int64_t P = sum_blocks(n);
  return ((n + P - 1) / P + 3) / 4 * 4;
}

// Stage 1: partial[p] = sum of chunk p of in (n).
template <bool kVec>
__global__ void __launch_bounds__(kThreads)
    sum_partials_kernel(double* __restrict__ partial, const float* __restrict__ in, int64_t n,
                        int64_t chunk) {
  __shared__ double scratch[32];
  const int64_t begin = static_cast<int64_t>(blockIdx.x) * chunk;
  const int64_t end = begin + chunk < n ? begin + chunk : n;
  double acc = 0.0;
  int64_t i = begin + threadIdx.x;  // the first scalar element of this thread
  if constexpr (kVec) {
    const int64_t end4 = begin < end ? begin + (end - begin) / 4 * 4 : begin;
    for (int64_t j = begin + 4 * threadIdx.x; j < end4; j += 4 * kThreads) {
      const float4 v = detail::load4(in + j);
      acc += static_cast<double>(v.x);
      acc += static_cast<double>(v.y);
      acc += static_cast<double>(v.z);
      acc += static_cast<double>(v.w);
    }
    i = end4 + threadIdx.x;  // the < 4 elements of a short last chunk
  }
  for (; i < end; i += kThreads) acc += static_cast<double>(in[i]);
  acc = detail::block_reduce(acc, detail::SumOp{}, 0.0, scratch);
  if (threadIdx.x == 0) partial[blockIdx.x] = acc;
}

// Stage 2: out[0] = sum_p partial[p], rounded to float.
__global__ void __launch_bounds__(kThreads)
    sum_final_kernel(float* __restrict__ out, const double* __restrict__ partial, int64_t P) {
  __shared__ double scratch[32];
  double acc = 0.0;
  for (int64_t p = threadIdx.x; p < P; p += kThreads) acc += partial[p];
  acc = detail::block_reduce(acc, detail::SumOp{}, 0.0, scratch);
  if (threadIdx.x == 0) out[0] = static_cast<float>(acc);
}

// din (n) = dout[0].
template <bool kVec>
__global__ void __launch_bounds__(detail::kBlockThreads)
    fill_kernel(float* __restrict__ din, const float* __restrict__ dout, int64_t n) {
  const float g = *dout;
  const int64_t first = detail::global_thread(), stride = detail::grid_threads();
  int64_t done = 0;
  if constexpr (kVec) {
    const int64_t n4 = n / 4;
    for (int64_t i = first; i < n4; i += stride) detail::store4(din + 4 * i, detail::make4(g));
    done = n4 * 4;
  }
  for (int64_t i = done + first; i < n; i += stride) din[i] = g;
}

}  // namespace

// ================================ forward ================================
int64_t sum_forward_workspace_floats(int64_t n) {
  return n <= 0 ? 0 : 2 * sum_blocks(n);  // P doubles
}

void sum_forward(float* out, const float* in, int64_t n, float* workspace, cudaStream_t stream) {
  if (n <= 0) {  // the empty sum
    CNX_CUDA_CHECK(cudaMemsetAsync(out, 0, sizeof(float), stream));
    return;
  }
  CNX_CHECK(reinterpret_cast<uintptr_t>(workspace) % alignof(double) == 0,
            "sum_forward (CUDA): the workspace must be 8-byte aligned (it holds doubles)");
  double* partial = reinterpret_cast<double*>(workspace);
  const int64_t P = sum_blocks(n), chunk = sum_chunk(n);
  if (detail::aligned16(in))
    launch<sum_partials_kernel<true>>(static_cast<unsigned>(P), kThreads, 0, stream, partial, in,
                                      n, chunk);
  else
    launch<sum_partials_kernel<false>>(static_cast<unsigned>(P), kThreads, 0, stream, partial, in,
                                       n, chunk);
  CNX_CUDA_LAUNCH_CHECK();
  launch<sum_final_kernel>(1, kThreads, 0, stream, out, partial, P);
  CNX_CUDA_LAUNCH_CHECK();
}

// ================================ backward ================================
void sum_backward(float* din, const float* dout, int64_t n, cudaStream_t stream) {
  if (n <= 0) return;
  if (detail::aligned16(din)) {
    const unsigned grid = detail::wave_grid<fill_kernel<true>, detail::kBlockThreads>(n / 4 + 1);
    launch<fill_kernel<true>>(grid, detail::kBlockThreads, 0, stream, din, dout, n);
  } else {
    const unsigned grid = detail::wave_grid<fill_kernel<false>, detail::kBlockThreads>(n);
    launch<fill_kernel<false>>(grid, detail::kBlockThreads, 0, stream, din, dout, n);
  }
  CNX_CUDA_LAUNCH_CHECK();
}

}  // namespace cnx::cuda
