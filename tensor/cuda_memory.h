// The few CUDA runtime services the tensor core needs: raw device memory, copies, fills.
// Implemented in cuda_memory.cu when the library is built with CUDA; in device.cpp otherwise,
// where each call throws a cnx::Error that says the CUDA backend was not built.
// (The caching allocator and streams arrive with the CUDA backend.)
#pragma once

#include <cstdint>

#include "tensor/device.h"

namespace cnx {

void* cuda_malloc(int64_t nbytes, Device device);
void cuda_free(void* ptr, Device device) noexcept;
// One side at least is a CUDA device.
void cuda_copy(void* dst, Device dst_device, const void* src, Device src_device, int64_t nbytes);
void cuda_zero(void* dst, Device device, int64_t nbytes);

}  // namespace cnx
