// Storage: one owned, untyped buffer on one device. Tensors share a Storage through
// std::shared_ptr, so a reshape or a detach is a new view on the same bytes.
// CPU buffers are 64-byte aligned (a cache line, and enough for any vector load); CUDA buffers
// come from the device's caching allocator (tensor/cuda_allocator.h), 512-byte aligned.
#pragma once

#include <cstdint>
#include <memory>

#include "tensor/device.h"

namespace cnx {

class Storage {
 public:
  Storage(int64_t nbytes, Device device);  // uninitialised
  ~Storage();
  Storage(const Storage&) = delete;
  Storage& operator=(const Storage&) = delete;

  void* data() { return data_; }
  const void* data() const { return data_; }
  int64_t nbytes() const { return nbytes_; }
  Device device() const { return device_; }

 private:
  void* data_ = nullptr;
  int64_t nbytes_ = 0;
  Device device_;
};

// Byte copies and fills across devices (cpu<->cpu, cpu<->cuda, cuda<->cuda). Synchronous as far
// as any caller can tell: a copy to the host has landed when the call returns; copies and fills
// on a device are enqueued on the device's stream (tensor/cuda_context.h), where everything
// that reads them later is also enqueued (tensor/cuda_memory.h says exactly what waits).
void copy_bytes(void* dst, Device dst_device, const void* src, Device src_device, int64_t nbytes);
void zero_bytes(void* dst, Device device, int64_t nbytes);

}  // namespace cnx
