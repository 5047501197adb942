// The emulated CUDA device: what the rest of the emulator (launch<>, the device built-ins of
// device_prelude.h, the cuBLAS/cuBLASLt emulation) uses of its core. Built only with
// -DCNX_CUDA_EMULATOR=ON; see README.md in this folder for what is modelled and what is not.
//
// Host side. Work (a kernel launch, a copy, a fill, a GEMM) is queued on a stream and runs when
// the host synchronises with that stream (or the device), in the order it was queued, on the
// synchronising host thread, while device memory is made accessible. Outside that window the
// device arena is PROT_NONE: a host dereference of a device pointer faults, as on a real GPU.
//
// Device side. A kernel runs block after block; the threads of a block are cooperative fibers
// that switch only at __syncthreads(), warp shuffles, and exit. threadIdx, blockIdx, blockDim
// and gridDim are per fiber (thread_local variables the scheduler sets before each switch).
#pragma once

#include <cuda_runtime.h>

#include <cstddef>
#include <cstdint>
#include <functional>
#include <source_location>
#include <string>
#include <tuple>
#include <type_traits>
#include <utility>

namespace cnx::emu {

// ---- the work queue --------------------------------------------------------------------------

// Queues `work` on `stream` (nullptr: the legacy default stream). It runs when the stream is
// drained, inside the device-access window (device memory readable and writable). `what` names
// it in error messages ("cublasLtMatmul", "cudaMemcpyAsync DtoH", ...). A cnx::emu::DeviceFault
// thrown by `work` becomes the context's sticky error (as a fault in a kernel would).
void enqueue(cudaStream_t stream, std::string what, std::function<void()> work);

// Thrown by emulated device work (a kernel, a GEMM) that hits an error the real device would
// report asynchronously: the message becomes the sticky error's text, every later runtime call
// fails with `code`.
struct DeviceFault {
  cudaError_t code;
  std::string message;
};

// ---- device memory ---------------------------------------------------------------------------

// True when [p, p + bytes) lies inside one live cudaMalloc allocation.
bool is_device_range(const void* p, size_t bytes);

// ---- kernels ---------------------------------------------------------------------------------

struct KernelInfo {
  std::string name;     // e.g. "cnx::cuda::detail::map_kernel<true, float, ...>"
  const void* address;  // the kernel function (key of cudaFuncSetAttribute)
};
// Registers a kernel instantiation (at static-initialisation time; see KernelRegistration).
const KernelInfo* register_kernel(const char* pretty_function, const void* address);

// Checks the launch configuration against the device's limits (sets cudaGetLastError's error
// and queues nothing when it fails) and queues `body` on the stream: each emulated thread of
// each block runs body() once.
void launch_kernel(const KernelInfo* kernel, dim3 grid, dim3 block, size_t smem_bytes,
                   cudaStream_t stream, std::function<void()> body);

namespace detail {
template <auto kKernel> struct KernelRegistration {
  static const KernelInfo* info() {
    // __PRETTY_FUNCTION__ names kKernel; the registry cuts the kernel's name out of it.
    static const KernelInfo* const registered = register_kernel(__PRETTY_FUNCTION__,
                                                                reinterpret_cast<const void*>(kKernel));
    return registered;
  }
  // Forces registration at start-up of every instantiation that is compiled in (the coverage
  // count compares the kernels launched with the kernels that exist).
  static inline const KernelInfo* const at_startup = info();
};

template <class... Params, class... Args>
auto bind_params(void (*kernel)(Params...), Args&&... args) {
  // Parameters are converted to the kernel's types and copied when the launch is queued, as
  // cudaLaunchKernel copies them.
  return [kernel, params = std::tuple<std::decay_t<Params>...>(std::forward<Args>(args)...)]() {
    std::apply(kernel, params);
  };
}
}  // namespace detail

template <auto kKernel, class... Args>
void launch(dim3 grid, dim3 block, size_t smem_bytes, cudaStream_t stream, Args&&... args) {
  (void)detail::KernelRegistration<kKernel>::at_startup;
  launch_kernel(detail::KernelRegistration<kKernel>::info(), grid, block, smem_bytes, stream,
                detail::bind_params(kKernel, std::forward<Args>(args)...));
}

// ---- inside a kernel (called by device_prelude.h's built-ins) ----------------------------------

// This block's dynamic shared memory (exactly the launch's smem_bytes, filled with 0xFF bytes
// at the start of the block); nullptr when the launch asked for none.
void* dynamic_shared_memory();

// __syncthreads(): waits until every thread of the block has arrived.
void syncthreads(std::source_location where = std::source_location::current());

enum class ShuffleMode { kIdx, kUp, kDown, kXor };
// The shuffle primitive on 8 bytes: `value` is this lane's bits; returns the source lane's.
uint64_t shuffle(unsigned mask, uint64_t value, int lane_arg, int width, ShuffleMode mode,
                 std::source_location where);

// cp.async: queues a copy of `bytes` (4, 8 or 16) from global to shared memory; it lands at
// this thread's next cp_async_wait_all().
void cp_async(void* shared_dst, const void* global_src, int bytes,
              std::source_location where = std::source_location::current());
void cp_async_wait_all();

// Reports a device-side error in the running kernel (the kernel's name, block and thread are
// added): it becomes the sticky error, the block is abandoned.
[[noreturn]] void device_error(cudaError_t code, const std::string& message);

}  // namespace cnx::emu
