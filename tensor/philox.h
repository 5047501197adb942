// Philox4x32-10 (Salmon et al., "Parallel random numbers: as easy as 1, 2, 3", SC'11) as one
// inline function that compiles for the host (g++) and for the device (nvcc), so that the CPU and
// a CUDA kernel draw bitwise the same words from the same (counter, key). cnx::Generator
// (tensor/generator.h) is built on it; the Random Erasing noise of the batch finish
// (kernels/batch_finish.h) calls it per pixel on both sides.
//
// CNX_HOST_DEVICE marks such functions: __host__ __device__ under nvcc, nothing under g++.
#pragma once

#include <cstdint>

#if defined(__CUDACC__)
#define CNX_HOST_DEVICE __host__ __device__
#else
#define CNX_HOST_DEVICE
#endif

namespace cnx {

// One Philox4x32-10 block, in place: counter c (4 words) and key (k0, k1) to 4 random words.
// Ten rounds of two 32x32->64-bit multiplies, the key bumped by the Weyl constants each round.
CNX_HOST_DEVICE inline void philox4x32_10_inplace(uint32_t c[4], uint32_t k0, uint32_t k1) {
  constexpr uint32_t kMul0 = 0xD2511F53u, kMul1 = 0xCD9E8D57u;    // round multipliers
  constexpr uint32_t kWeyl0 = 0x9E3779B9u, kWeyl1 = 0xBB67AE85u;  // key schedule increments
  for (int round = 0; round < 10; ++round) {
    const uint64_t p0 = static_cast<uint64_t>(kMul0) * c[0];
    const uint64_t p1 = static_cast<uint64_t>(kMul1) * c[2];
    const uint32_t hi0 = static_cast<uint32_t>(p0 >> 32), lo0 = static_cast<uint32_t>(p0);
    const uint32_t hi1 = static_cast<uint32_t>(p1 >> 32), lo1 = static_cast<uint32_t>(p1);
    const uint32_t n0 = hi1 ^ c[1] ^ k0, n2 = hi0 ^ c[3] ^ k1;
    c[0] = n0;
    c[1] = lo1;
    c[2] = n2;
    c[3] = lo0;
    k0 += kWeyl0;
    k1 += kWeyl1;
  }
}

// A double in [0, 1) from two words, 53 random bits: (hi >> 5) * 2^26 + (lo >> 6), times 2^-53
// (the same as Generator::uniform).
CNX_HOST_DEVICE inline double philox_uniform53(uint32_t hi, uint32_t lo) {
  const uint64_t a = hi >> 5, b = lo >> 6;  // 27 and 26 bits
  return static_cast<double>((a << 26) | b) * 0x1.0p-53;
}

}  // namespace cnx
