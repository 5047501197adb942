// CUDA elementwise addition (see kernels/add.h): the residual connection and gradient
// accumulation.
//
//   out = a + b          add_forward
//   dst += src           add_inplace (dst is read and written by the same thread)
//
// Launch: detail::launch_map (kernels/cuda/vec.cuh), a grid-stride loop, 256 threads a block,
// one wave of resident blocks; float4 when every pointer is 16-byte aligned (the n % 4 tail in
// scalar steps), one float a step otherwise. Three streams of n floats either way.
// One correctly rounded add per element: bitwise the CPU reference.
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

void add_forward(float* out, const float* a, const float* b, int64_t n, cudaStream_t stream) {
  if (n <= 0) return;
  detail::launch_map(out, a, b, n, Add{}, stream);
}

void add_inplace(float* dst, const float* src, int64_t n, cudaStream_t stream) {
  if (n <= 0) return;
  detail::launch_map(dst, dst, src, n, Add{}, stream);  // dst[i] = dst[i] + src[i]
}

}  // namespace cnx::cuda
