// CUDA batch finish (see kernels/batch_finish.h for the math): uint8 NHWC pixels to the float
// batch, with normalisation, Random Erasing noise and Mixup/CutMix in one pass.
//
// Launch: a grid-stride loop over the B * H image rows (one block handles a whole row at a time,
// so the per-row facts, "is this row inside sample i's erase box, inside the CutMix box", are
// decided once per row), one wave of resident blocks of 256 threads (vec.cuh). Each block first
// builds the (C, 256) normalisation table in shared memory with the same double expression as
// the CPU (normalize_byte), so the normalised values are bitwise the CPU's. The channel count is
// a template parameter (1, 2 or 3), so x = k / C is a multiply, not a division.
// Vector path: when a row holds a multiple of 4 values and `in` is 4-byte, `out` 16-byte aligned,
// each thread moves 4 consecutive values (one 4-byte load per source row, one float4 store);
// otherwise one value per step. Mixup is written with __fmul_rn / __fadd_rn so nvcc does not fuse
// it into an FMA: the same roundings as the CPU. The erase noise (erase_noise, tensor/philox.h's
// Philox and Box-Muller in double) runs only for values inside an erase box.
// Memory-bound: 1 byte read (2 with Mixup) and 4 bytes written per value.
#include <cuda_runtime.h>

#include "kernels/batch_finish.h"
#include "kernels/cuda/launch.cuh"
#include "kernels/cuda/vec.cuh"
#include "tensor/cuda_check.h"
#include "tensor/error.h"

namespace cnx::cuda {

namespace {

constexpr int kThreads = detail::kBlockThreads;

// out, in (B, H, W, kC); erase (B) or null. kG values per thread per step (4: vector path).
template <int kC, int kG>
__global__ void __launch_bounds__(kThreads)
    batch_finish_kernel(float* __restrict__ out, const uint8_t* __restrict__ in,
                        const EraseParams* __restrict__ erase, MixParams mix, Normalization norm,
                        int64_t B, int64_t H, int64_t W) {
  __shared__ float lut[kC * 256];  // (C, 256): norm(c, v)
  for (int t = threadIdx.x; t < kC * 256; t += blockDim.x)
    lut[t] = normalize_byte(t & 255, norm.mean[t >> 8], norm.std[t >> 8]);
  __syncthreads();

  const int64_t WC = W * kC, rows = B * H;
  for (int64_t row = blockIdx.x; row < rows; row += gridDim.x) {
    const int64_t i = row / H, y = row - i * H, p = B - 1 - i;  // sample, row, partner
    const EraseParams ei = erase ? erase[i] : EraseParams{};
    const EraseParams ep = erase ? erase[p] : EraseParams{};
    const bool erase_i = ei.height > 0 && y >= ei.top && y < ei.top + ei.height;
    const bool erase_p = ep.height > 0 && y >= ep.top && y < ep.top + ep.height;
    const bool cut_row = mix.mode == MixMode::cutmix && y >= mix.top && y < mix.top + mix.height;
    const uint8_t* src_i = in + row * WC;
    const uint8_t* src_p = in + (p * H + y) * WC;
    float* dst = out + row * WC;
    const int64_t first_value = y * WC;  // the row's first element index in its image

    for (int64_t k0 = static_cast<int64_t>(threadIdx.x) * kG; k0 < WC; k0 += static_cast<int64_t>(blockDim.x) * kG) {
      uint8_t bi[kG], bp[kG];
      if constexpr (kG == 4) {
        const uchar4 q = *reinterpret_cast<const uchar4*>(src_i + k0);
        bi[0] = q.x, bi[1] = q.y, bi[2] = q.z, bi[3] = q.w;
        if (mix.mode == MixMode::mixup || cut_row) {
          const uchar4 r = *reinterpret_cast<const uchar4*>(src_p + k0);
          bp[0] = r.x, bp[1] = r.y, bp[2] = r.z, bp[3] = r.w;
        }
      } else {
        bi[0] = src_i[k0];
        if (mix.mode == MixMode::mixup || cut_row) bp[0] = src_p[k0];
      }
      float v[kG];
#pragma unroll
      for (int g = 0; g < kG; ++g) {
        const int64_t k = k0 + g, x = k / kC, c = k - x * kC;
        // val(i, y, x, c)
        float vi = lut[c * 256 + bi[g]];
        if (erase_i && x >= ei.left && x < ei.left + ei.width) vi = erase_noise(ei.noise_key, first_value + k);
        if (mix.mode == MixMode::mixup || (cut_row && x >= mix.left && x < mix.left + mix.width)) {
          // val(p, y, x, c)
          float vp = lut[c * 256 + bp[g]];
          if (erase_p && x >= ep.left && x < ep.left + ep.width) vp = erase_noise(ep.noise_key, first_value + k);
          vi = mix.mode == MixMode::mixup
                   ? __fadd_rn(__fmul_rn(vi, mix.lam), __fmul_rn(vp, mix.one_minus_lam))
                   : vp;
        }
        v[g] = vi;
      }
      if constexpr (kG == 4) {
        detail::store4(dst + k0, make_float4(v[0], v[1], v[2], v[3]));
      } else {
        dst[k0] = v[0];
      }
    }
  }
}

template <int kC, int kG>
void launch_cg(float* out, const uint8_t* in, const EraseParams* erase, const MixParams& mix,
               const Normalization& norm, int64_t B, int64_t H, int64_t W, cudaStream_t stream) {
  constexpr auto kernel = batch_finish_kernel<kC, kG>;
  const unsigned grid = detail::wave_grid<kernel, kThreads>(B * H, /*items_per_block=*/1);
  launch<kernel>(grid, kThreads, 0, stream, out, in, erase, mix, norm, B, H, W);
  CNX_CUDA_LAUNCH_CHECK();
}

template <int kC>
void launch_c(float* out, const uint8_t* in, const EraseParams* erase, const MixParams& mix,
              const Normalization& norm, int64_t B, int64_t H, int64_t W, cudaStream_t stream) {
  const bool vec = (W * kC) % 4 == 0 && detail::aligned16(out) &&
                   (reinterpret_cast<uintptr_t>(in) & 3u) == 0;
  if (vec) launch_cg<kC, 4>(out, in, erase, mix, norm, B, H, W, stream);
  else launch_cg<kC, 1>(out, in, erase, mix, norm, B, H, W, stream);
}

}  // namespace

void batch_finish(float* out, const uint8_t* in, const EraseParams* erase, const MixParams& mix,
                  const Normalization& norm, int64_t B, int64_t H, int64_t W, int64_t C,
                  cudaStream_t stream) {
  CNX_CHECK(B >= 0 && H > 0 && W > 0 && C >= 1 && C <= 3, "cuda::batch_finish: bad sizes B=", B,
            " H=", H, " W=", W, " C=", C, " (C must be 1 to 3)");
  // The erase boxes are on the device and are checked by the host code that drew them
  // (train/data/augment.cpp); the CutMix box is here.
  if (mix.mode == MixMode::cutmix)
    CNX_CHECK(mix.top >= 0 && mix.left >= 0 && mix.height >= 0 && mix.width >= 0 &&
                  mix.top + mix.height <= H && mix.left + mix.width <= W,
              "cuda::batch_finish: the CutMix box (", mix.top, ", ", mix.left, ", ", mix.height,
              "x", mix.width, ") is outside the ", H, "x", W, " image");
  if (B == 0) return;
  switch (C) {
    case 1: launch_c<1>(out, in, erase, mix, norm, B, H, W, stream); break;
    case 2: launch_c<2>(out, in, erase, mix, norm, B, H, W, stream); break;
    default: launch_c<3>(out, in, erase, mix, norm, B, H, W, stream); break;
  }
}

}  // namespace cnx::cuda
