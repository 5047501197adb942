// The two CUDA constructs of the kernel sources that a host C++ compiler cannot parse, as thin
// wrappers, so that one kernel source builds both ways (include only from .cu files):
//
//  - the triple-chevron launch:   launch<kernel>(grid, block, smem_bytes, stream, args...)
//      nvcc:      kernel<<<grid, block, smem_bytes, stream>>>(args...)   (nothing else)
//      emulator:  the launch is checked against the device's limits and queued on the stream of
//                 the emulated device (kernels/cuda/emulator/README.md);
//  - dynamic shared memory:       CNX_EXTERN_SHARED(float4, smem);
//      nvcc:      extern __shared__ float4 smem[];
//      emulator:  float4* const smem = (this block's dynamic shared memory, sized by the launch).
//
// Every launcher of the project goes through launch<>: it is also where the emulator learns the
// kernel's name (for its error messages) and counts which kernel instantiations ran.
#pragma once

#include <cuda_runtime.h>

#include <cstddef>
#include <utility>

#if defined(CNX_CUDA_EMULATOR) && CNX_CUDA_EMULATOR
#include "kernels/cuda/emulator/emulator.h"
#endif

namespace cnx::cuda {

#if defined(CNX_CUDA_EMULATOR) && CNX_CUDA_EMULATOR

template <auto kKernel, class... Args>
void launch(dim3 grid, dim3 block, size_t smem_bytes, cudaStream_t stream, Args&&... args) {
  ::cnx::emu::launch<kKernel>(grid, block, smem_bytes, stream, std::forward<Args>(args)...);
}
#define CNX_EXTERN_SHARED(type, name) \
  type* const name = static_cast<type*>(::cnx::emu::dynamic_shared_memory())

#else

template <auto kKernel, class... Args>
void launch(dim3 grid, dim3 block, size_t smem_bytes, cudaStream_t stream, Args&&... args) {
  kKernel<<<grid, block, smem_bytes, stream>>>(std::forward<Args>(args)...);
}
#define CNX_EXTERN_SHARED(type, name) extern __shared__ type name[]

#endif

}  // namespace cnx::cuda
