#include "tensor/storage.h"

#include <cstdio>
#include <cstring>
#include <new>

#include "tensor/cuda_memory.h"
#include "tensor/error.h"

namespace cnx {

namespace {
constexpr std::align_val_t kCpuAlignment{64};
}

Storage::Storage(int64_t nbytes, Device device) : nbytes_(nbytes), device_(device) {
  CNX_CHECK(nbytes >= 0, "Storage: negative size ", nbytes);
  if (nbytes == 0) return;
  if (device.is_cpu()) {
    try {
      data_ = ::operator new(static_cast<size_t>(nbytes), kCpuAlignment);
    } catch (const std::bad_alloc&) {
      // A bare "std::bad_alloc" says neither how much nor what for: say how much. (Sizes read
      // from files are checked before they get here; this is a legitimately large request.)
      fail("Storage: cannot allocate ", nbytes, " bytes (", static_cast<double>(nbytes) / (1 << 30),
           " GiB) of CPU memory for a tensor: out of memory");
    }
  } else {
    data_ = cuda_malloc(nbytes, device);
  }
}

Storage::~Storage() {
  if (!data_) return;
  if (device_.is_cpu()) {
    ::operator delete(data_, kCpuAlignment);
  } else {
    cuda_free(data_, device_);  // logs, never throws
  }
}

void copy_bytes(void* dst, Device dst_device, const void* src, Device src_device, int64_t nbytes) {
  if (nbytes == 0) return;
  if (dst_device.is_cpu() && src_device.is_cpu()) {
    std::memcpy(dst, src, static_cast<size_t>(nbytes));
  } else {
    cuda_copy(dst, dst_device, src, src_device, nbytes);
  }
}

void zero_bytes(void* dst, Device device, int64_t nbytes) {
  if (nbytes == 0) return;
  if (device.is_cpu()) {
    std::memset(dst, 0, static_cast<size_t>(nbytes));
  } else {
    cuda_zero(dst, device, nbytes);
  }
}

}  // namespace cnx
