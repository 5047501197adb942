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

#include <cmath>
#include <cstdint>

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

namespace cnx::test {

// The tolerance of a GPU result against the CPU reference, per unit of mag = sum |term| (the
// reference run on the absolute values of the inputs), for a result that is a sum of `terms`
// f32 products. The two sides add them in different orders (the GPU with fused multiply-adds
// and, for the parameter gradients, per thread, then per block, then across blocks), so they
// differ by rounding only. f32 rounds each operation with relative error <= u = 2^-24, so each
// side's error is at most about terms * u * mag: 2 * terms * u (both sides) is the rigorous
// bound for short sums. For long sums (parameter gradients add N*H*W terms) the rounding errors
// are independent and grow like sqrt(terms); 2 * 16 * sqrt(terms) * u (continuous with the
// first rule at 256 terms) leaves a wide margin there while still catching a missing row of
// pixels or a missing tile. Measured against mag, not |want|, results that cancel to near zero
// are not asked for more precision than their terms carry.
inline double tol_for_terms(int64_t terms) {
  const double u = std::ldexp(1.0, -24);
  const double n = static_cast<double>(terms);
  return 2.0 * u * (n <= 256 ? n : 16.0 * std::sqrt(n));
}

}  // namespace cnx::test
