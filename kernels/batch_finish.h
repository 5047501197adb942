// Batch finish: the last step of the input pipeline, from the uint8 batch the loader's workers
// build (pixels after crop / flip / RandAugment) to the float batch the model eats. It does, in
// one pass, what the float pipeline did in three (normalise, Random Erasing, Mixup/CutMix), so
// that it can run on the GPU after a copy of 1 byte per value instead of 4.
//
// Shapes: in (B, H, W, C) u8 NHWC, C in 1..3; out (B, H, W, C) f32; erase (B) EraseParams or
// null (no sample erased); mix one MixParams for the whole batch.
//
//   norm(c, v)  = float((v / 255 - mean[c]) / std[c])       computed in double, rounded once
//                                                            (a per-channel table of 256 values)
//   val(j, y, x, c) = erase_noise(erase[j].noise_key, (y W + x) C + c)   inside sample j's erase
//                                                                        box (pixel mode)
//                   = norm(c, in[j, y, x, c])                            elsewhere
//   with the partner of sample i being p = B - 1 - i (timm's flipped batch):
//   out[i, y, x, c] = val(i) * lam + val(p) * one_minus_lam     Mixup (two float products and a
//                                                                float sum, no fused multiply-add)
//                   = val(p)   inside the CutMix box, val(i) outside it          CutMix
//                   = val(i)                                                     no mixing
//
// The erasing noise is counter-based, so a CPU and a GPU produce the same values and no sample
// depends on another: erase_noise(key, k) is element k of a standard normal field keyed by the
// sample's 64-bit key (drawn on the host from the sample's generator, train/data/augment.h):
// Philox4x32-10 block k / 2 under that key gives words w0..w3, u1 = 1 - U(w0, w1) in (0, 1],
// u2 = U(w2, w3) in [0, 1) (U: 53 bits, tensor/philox.h), r = sqrt(-2 ln u1), and element k is
// r cos(2 pi u2) when k is even, r sin(2 pi u2) when odd (Box-Muller, both values of a pair used).
// Computed in double, rounded to float: host and device agree up to the last-bit differences of
// their double log / cos / sin, which float rounding almost always hides.
//
// Nothing is saved for a backward: the input pipeline has no gradient.
#pragma once

#include <cmath>
#include <cstdint>

#include "kernels/stream.h"
#include "tensor/philox.h"

namespace cnx {

// Random Erasing of one sample: rows [top, top + height), columns [left, left + width) are
// replaced by noise keyed by noise_key. height == 0: the sample is not erased. Plain data, 24
// bytes, copied to the device as is.
struct EraseParams {
  int32_t top = 0, left = 0, height = 0, width = 0;
  uint64_t noise_key = 0;
};

enum class MixMode : int32_t { none = 0, mixup = 1, cutmix = 2 };

// Mixup/CutMix of a whole batch. lam and one_minus_lam are float(lam) and float(1 - lam) of the
// double lam drawn on the host; CutMix's box is rows [top, top + height), columns
// [left, left + width). Plain data, passed to the kernel by value.
struct MixParams {
  MixMode mode = MixMode::none;
  float lam = 1.0f, one_minus_lam = 0.0f;  // Mixup only
  int32_t top = 0, left = 0, height = 0, width = 0;  // CutMix only
};

// The per-channel mean and std of the normalisation (channels beyond C unused).
struct Normalization {
  float mean[3] = {0.0f, 0.0f, 0.0f};
  float std[3] = {1.0f, 1.0f, 1.0f};
};

// norm(c, v): byte value v of a channel with this mean and std. The same expression on host and
// device (IEEE double division and subtraction are correctly rounded on both).
CNX_HOST_DEVICE inline float normalize_byte(int v, float mean, float std) {
  return static_cast<float>((static_cast<double>(v) / 255.0 - static_cast<double>(mean)) /
                            static_cast<double>(std));
}

// erase_noise(key, k): element k of the standard normal noise field of `key` (see the top).
CNX_HOST_DEVICE inline float erase_noise(uint64_t key, int64_t k) {
  const uint64_t pair = static_cast<uint64_t>(k) >> 1;
  uint32_t w[4] = {static_cast<uint32_t>(pair), static_cast<uint32_t>(pair >> 32), 0u, 0u};
  philox4x32_10_inplace(w, static_cast<uint32_t>(key), static_cast<uint32_t>(key >> 32));
  const double u1 = 1.0 - philox_uniform53(w[0], w[1]);  // (0, 1]: the log is finite
  const double u2 = philox_uniform53(w[2], w[3]);
  const double r = ::sqrt(-2.0 * ::log(u1));
  const double angle = 6.283185307179586476925286766559 * u2;  // 2 pi u2
  return static_cast<float>((k & 1) ? r * ::sin(angle) : r * ::cos(angle));
}

}  // namespace cnx

namespace cnx::cpu {

// out (B, H, W, C) f32 from in (B, H, W, C) u8; erase (B) or null. Single-threaded: the loader's
// workers call it, one batch each.
void batch_finish(float* out, const uint8_t* in, const EraseParams* erase, const MixParams& mix,
                  const Normalization& norm, int64_t B, int64_t H, int64_t W, int64_t C);

}  // namespace cnx::cpu

// CUDA launcher (kernels/cuda/batch_finish.cu): device pointers (erase too: it travels in the same
// host buffer as the pixels and is copied with them), asynchronous on `stream`. Any alignment and
// size; equal to the CPU's values except for the last-bit differences of erase_noise.
namespace cnx::cuda {

void batch_finish(float* out, const uint8_t* in, const EraseParams* erase, const MixParams& mix,
                  const Normalization& norm, int64_t B, int64_t H, int64_t W, int64_t C,
                  cudaStream_t stream);

}  // namespace cnx::cuda
