// Per-device CUDA state: the library's stream, the cuBLAS and cuBLASLt handles and their
// workspace. One of each per device, created lazily on first use, RAII (destructors log, never
// throw), kept for the life of the process.
//
// One stream per device. Every launch and copy of the library goes to the stream of the device
// it works on (created with cudaStreamNonBlocking, so it never synchronises with the legacy
// default stream): the order of the calls on the host is the order on the device, which is what
// makes the caching allocator's immediate reuse of freed blocks safe, and what lets copies to
// the host simply wait for that one stream (tensor/cuda_memory.h).
//
//   cnx::cuda::DeviceGuard guard(t.device());          // make t's device current
//   cudaStream_t s = cnx::cuda::current_stream();       // its stream
//   cnx::cuda::gelu_forward(out, in, n, s);
//
// The first part of this header needs no CUDA headers (CPU-only builds compile it too; there the
// functions throw "no CUDA backend", and no CUDA tensor can exist to call them). The second part,
// with the cuBLAS handles and CNX_CUBLAS_CHECK, is for code built with CUDA (CNX_CUDA).
#pragma once

#include <cstddef>

#include "kernels/stream.h"
#include "tensor/device.h"

namespace cnx::cuda {

// The current CUDA device (cudaGetDevice) and its library stream.
int current_device();
cudaStream_t current_stream();
// The library stream of `device` (a CUDA device).
cudaStream_t device_stream(Device device);
// Waits until everything enqueued on `device`'s stream has finished (checked).
void synchronize(Device device);

// Makes `device` current for the guard's lifetime and restores the previous device after
// (a no-op when it already is current). A CPU device leaves the current device alone.
class DeviceGuard {
 public:
  explicit DeviceGuard(Device device);
  ~DeviceGuard();
  DeviceGuard(const DeviceGuard&) = delete;
  DeviceGuard& operator=(const DeviceGuard&) = delete;

 private:
  int previous_ = -1;  // -1: nothing to restore
};

// TF32 tensor-core math for the fp32 GEMMs (cuBLAS/cuBLASLt): faster, but only ~10 bits of
// mantissa in the products, outside the parity tolerances (1e-4 logits, 1e-3 gradients), so it
// is off by default. The environment variable CNX_ALLOW_TF32=1 turns it on at start-up;
// set_allow_tf32 changes it for the calls that follow.
bool allow_tf32();
void set_allow_tf32(bool on);

}  // namespace cnx::cuda

#if defined(CNX_CUDA) && CNX_CUDA
// ---- built with CUDA: the cuBLAS handles ------------------------------------------------------
#include <cublasLt.h>
#include <cublas_v2.h>

#include "tensor/cuda_check.h"

namespace cnx {

[[noreturn]] inline void cublas_fail(cublasStatus_t status, const char* expr, const char* file,
                                     int line) {
  fail("cuBLAS error: ", cublasGetStatusString(status), " (", cublasGetStatusName(status),
       ") in ", expr, " at ", file, ":", line);
}

}  // namespace cnx

// Every cuBLAS and cuBLASLt call goes through this: on failure, a cnx::Error with the
// expression, the status, the file and the line.
#define CNX_CUBLAS_CHECK(expr)                                                            \
  do {                                                                                    \
    cublasStatus_t cnx_status_ = (expr);                                                  \
    if (cnx_status_ != CUBLAS_STATUS_SUCCESS)                                             \
      ::cnx::cublas_fail(cnx_status_, #expr, __FILE__, __LINE__);                         \
  } while (0)

namespace cnx::cuda {

// The cuBLAS(Lt) workspace of each device: 32 MiB (what cuBLAS recommends for Hopper), shared
// by the two handles of the device. Sharing is safe because both are used only on the device's
// stream, one call after the other. Linear's bias-gradient reduction also uses it as scratch
// between GEMMs (kernels/cuda/linear.cu).
inline constexpr size_t kCublasWorkspaceBytes = size_t(32) << 20;

// The current device's cuBLASLt handle (cublasLtMatmul takes the stream and workspace per call).
cublasLtHandle_t cublaslt_handle();
// The current device's cuBLAS handle, bound to the device's stream and workspace, with the math
// mode of allow_tf32(). For baselines and plain GEMMs.
cublasHandle_t cublas_handle();
// The current device's workspace (kCublasWorkspaceBytes, 256-byte aligned).
void* cublas_workspace();

}  // namespace cnx::cuda
#endif
