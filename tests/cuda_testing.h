// Shared by the CUDA test files: CNX_TEST_CUDA (1 when the build has the CUDA backend) and the
// two skips every GPU test starts with, so the tests are listed and skip with a reason both in a
// CPU-only build and on a machine without a GPU.
//
//   TEST(CudaThing, MatchesCpu) {
//   #if CNX_TEST_CUDA
//     CNX_SKIP_WITHOUT_DEVICE();
//     ...
//   #else
//     CNX_SKIP_BUILT_WITHOUT_CUDA();
//   #endif
//   }
#pragma once

#include <gtest/gtest.h>

#include "tensor/cuda_memory.h"

#if defined(CNX_CUDA) && CNX_CUDA
#define CNX_TEST_CUDA 1
#include <cuda_runtime.h>

#include "tensor/cuda_check.h"
#else
#define CNX_TEST_CUDA 0
#endif

#if CNX_TEST_CUDA
// First statement of every test body built with CUDA.
#define CNX_SKIP_WITHOUT_DEVICE()                                                          \
  do {                                                                                     \
    if (::cnx::cuda_device_count() == 0)                                                   \
      GTEST_SKIP() << "no CUDA device: cuda_device_count() is 0, so there is nothing to "  \
                      "compare with the CPU reference";                                    \
  } while (0)
#endif
#define CNX_SKIP_BUILT_WITHOUT_CUDA() \
  GTEST_SKIP() << "built without CUDA (CNX_CUDA undefined): the CUDA kernels do not exist"
