// Checked CUDA calls. Every CUDA runtime call goes through CNX_CUDA_CHECK, which throws a
// cnx::Error carrying the failed expression, the error string, the file and the line.
// CNX_CUDA_LAUNCH_CHECK() follows every kernel launch; with the environment variable
// CNX_CUDA_SYNC=1 it also synchronises, so an asynchronous fault is reported at the launch
// that caused it rather than at some later call.
#pragma once

#include <cuda_runtime.h>

#include "tensor/error.h"

namespace cnx {

[[noreturn]] inline void cuda_fail(cudaError_t err, const char* expr, const char* file, int line) {
  fail("CUDA error: ", cudaGetErrorString(err), " (", cudaGetErrorName(err), ") in ", expr,
       " at ", file, ":", line);
}

// True when CNX_CUDA_SYNC is set to anything but "0" (read once).
bool cuda_sync_after_launch();

}  // namespace cnx

#define CNX_CUDA_CHECK(expr)                                                  \
  do {                                                                        \
    cudaError_t cnx_err_ = (expr);                                            \
    if (cnx_err_ != cudaSuccess) ::cnx::cuda_fail(cnx_err_, #expr, __FILE__, __LINE__); \
  } while (0)

#define CNX_CUDA_LAUNCH_CHECK()                                                  \
  do {                                                                           \
    CNX_CUDA_CHECK(cudaGetLastError());                                          \
    if (::cnx::cuda_sync_after_launch()) CNX_CUDA_CHECK(cudaDeviceSynchronize()); \
  } while (0)

// Every cuDNN call (conv2d's cuDNN path, the dwconv baselines of bench/) goes through this:
// throws a cnx::Error naming the failed call, its status, the file and the line. Expand it
// only where <cudnn.h> is included.
#define CNX_CUDNN_CHECK(expr)                                                              \
  do {                                                                                     \
    const cudnnStatus_t cnx_st_ = (expr);                                                  \
    if (cnx_st_ != CUDNN_STATUS_SUCCESS)                                                   \
      ::cnx::fail("cuDNN error: ", cudnnGetErrorString(cnx_st_), " (", static_cast<int>(cnx_st_), \
                  ") in ", #expr, " at ", __FILE__, ":", __LINE__);                        \
  } while (0)
