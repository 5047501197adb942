// CPU reference of the batch finish (see kernels/batch_finish.h for the math): normalise by a
// per-channel table, Random Erasing noise inside each sample's box, then Mixup/CutMix against the
// flipped batch. Row by row: the row of sample i is written into out, and the partner's row,
// when mixing needs it, into a scratch row.
#include <algorithm>
#include <vector>

#include "kernels/batch_finish.h"
#include "tensor/error.h"

namespace cnx::cpu {

namespace {

// The values val(j, y, .) of one row of sample j (W * C floats) into dst.
struct RowSource {
  const uint8_t* in;            // (B, H, W, C)
  const EraseParams* erase;     // (B) or null
  const float* lut;             // (C, 256)
  int64_t H, W, C;

  void row(float* dst, int64_t j, int64_t y) const {
    const int64_t WC = W * C;
    const uint8_t* src = in + (j * H + y) * WC;
    for (int64_t x = 0; x < W; ++x)
      for (int64_t c = 0; c < C; ++c) dst[x * C + c] = lut[c * 256 + src[x * C + c]];
    if (!erase) return;
    const EraseParams& e = erase[j];
    if (e.height <= 0 || y < e.top || y >= e.top + e.height) return;
    const int64_t first = (y * W + e.left) * C;  // element index in the sample's image
    for (int64_t k = e.left * C; k < (e.left + e.width) * C; ++k)
      dst[k] = erase_noise(e.noise_key, first + (k - e.left * C));
  }
};

}  // namespace

void batch_finish(float* out, const uint8_t* in, const EraseParams* erase, const MixParams& mix,
                  const Normalization& norm, int64_t B, int64_t H, int64_t W, int64_t C) {
  CNX_CHECK(B >= 0 && H > 0 && W > 0 && C >= 1 && C <= 3, "batch_finish: bad sizes B=", B, " H=", H,
            " W=", W, " C=", C, " (C must be 1 to 3)");
  if (erase)
    for (int64_t i = 0; i < B; ++i) {
      const EraseParams& e = erase[i];
      CNX_CHECK(e.height == 0 || (e.top >= 0 && e.left >= 0 && e.height > 0 && e.width > 0 &&
                                  e.top + e.height <= H && e.left + e.width <= W),
                "batch_finish: the erase box of sample ", i, " (", e.top, ", ", e.left, ", ", e.height,
                "x", e.width, ") is outside the ", H, "x", W, " image");
    }
  if (mix.mode == MixMode::cutmix)
    CNX_CHECK(mix.top >= 0 && mix.left >= 0 && mix.height >= 0 && mix.width >= 0 &&
                  mix.top + mix.height <= H && mix.left + mix.width <= W,
              "batch_finish: the CutMix box (", mix.top, ", ", mix.left, ", ", mix.height, "x",
              mix.width, ") is outside the ", H, "x", W, " image");
  std::vector<float> lut(static_cast<size_t>(C * 256));
  for (int64_t c = 0; c < C; ++c)
    for (int v = 0; v < 256; ++v) lut[static_cast<size_t>(c * 256 + v)] = normalize_byte(v, norm.mean[c], norm.std[c]);
  const RowSource src{in, erase, lut.data(), H, W, C};
  const int64_t WC = W * C;
  std::vector<float> partner(static_cast<size_t>(WC));
  for (int64_t i = 0; i < B; ++i) {
    const int64_t p = B - 1 - i;
    for (int64_t y = 0; y < H; ++y) {
      float* dst = out + (i * H + y) * WC;
      src.row(dst, i, y);
      if (mix.mode == MixMode::mixup) {
        src.row(partner.data(), p, y);
        const float a = mix.lam, b = mix.one_minus_lam;
        // Two products and a sum, each rounded (the build does not contract them into an FMA:
        // ISO C++ mode); the CUDA kernel writes the same with __fmul_rn / __fadd_rn.
        for (int64_t k = 0; k < WC; ++k) dst[k] = dst[k] * a + partner[static_cast<size_t>(k)] * b;
      } else if (mix.mode == MixMode::cutmix && y >= mix.top && y < mix.top + mix.height && mix.width > 0) {
        src.row(partner.data(), p, y);
        std::copy(partner.begin() + mix.left * C, partner.begin() + (mix.left + mix.width) * C, dst + mix.left * C);
      }
    }
  }
}

}  // namespace cnx::cpu
