// CUDA elementwise addition (see kernels/add.h): the residual connection and gradient
// accumulation.
//
//   out = a + b          add_forward
//   dst += src           add_inplace (dst is read and written by the same thread)
//
// Launch: detail::launch_map (kernels/cuda/vec.cuh), a grid-stride loop, 256 threads a block,
// one wave of resident blocks; 16-byte packs (4 floats, 8 bf16) when every pointer is 16-byte
// aligned (the tail in scalar steps), one element a step otherwise. Three streams of n elements
// either way. One correctly rounded add per element (then one rounding to bf16 for bf16):
// bitwise the CPU reference.
#include <cuda_runtime.h>

#include "kernels/add.h"
#include "kernels/cuda/vec.cuh"
#include "tensor/cuda_check.h"

namespace cnx::cuda {

namespace {
struct Add {
  __device__ float operator()(float a, float b) const { return a + b; }
};
}  // namespace

template <class T> void add_forward(T* out, const T* a, const T* b, int64_t n, cudaStream_t stream) {
  if (n <= 0) return;
  detail::launch_map(detail::dev(out), detail::dev(a), detail::dev(b), n, Add{}, stream);
}

template <class T> void add_inplace(T* dst, const T* src, int64_t n, cudaStream_t stream) {
  if (n <= 0) return;
  // dst[i] = dst[i] + src[i]
  detail::launch_map(detail::dev(dst), detail::dev(dst), detail::dev(src), n, Add{}, stream);
}

#define CNX_INSTANTIATE(T)                                                    \
  template void add_forward<T>(T*, const T*, const T*, int64_t, cudaStream_t); \
  template void add_inplace<T>(T*, const T*, int64_t, cudaStream_t);
CNX_INSTANTIATE(float)
CNX_INSTANTIATE(bf16)
#undef CNX_INSTANTIATE

}  // namespace cnx::cuda
