// RandAugment as timm builds it for the paper's recipe (--aa rand-m9-mstd0.5-inc1), and the
// colour jitter used when RandAugment is off (--color_jitter 0.4). Both work on uint8 HWC
// images (C = 3 RGB, or C = 1) before normalisation, like the PIL images timm works on.
//
// RandAugment (timm.data.auto_augment.RandAugment with the "increasing" op set): for each of
// num_layers layers an op is chosen uniformly (with replacement) from the 15 ops below; each
// chosen op is then applied with probability `prob` at a magnitude drawn around m:
//
//   magnitude = clip(Normal(m, mstd), 0, mmax)        (mstd = 0: m itself; mstd = inf: U(0, m))
//   level     = magnitude / 10
//
//   op              argument from level                    what it does (PIL semantics)
//   AutoContrast    -                                       stretch each channel to [0, 255]
//   Equalize        -                                       histogram-equalise each channel
//   Invert          -                                       255 - v
//   Rotate          +-30 * level degrees                    rotate about the centre
//   Posterize       4 - int(4 * level) bits                 keep the top bits
//   Solarize        256 - int(256 * level) threshold        v >= t ? 255 - v : v
//   SolarizeAdd     int(110 * level) added below 128        v < 128 ? min(255, v + a) : v
//   Color           1 +- 0.9 * level                        blend with the grey image
//   Contrast        1 +- 0.9 * level                        blend with the mean grey level
//   Brightness      1 +- 0.9 * level                        blend with black
//   Sharpness       1 +- 0.9 * level                        blend with the 3x3 SMOOTH filter
//   ShearX, ShearY  +-0.3 * level                           shear along x / y
//   TranslateXRel   +-0.45 * level * width pixels           shift along x
//   TranslateYRel   +-0.45 * level * height pixels          shift along y
//
// ("+-": the sign is negated with probability 1/2.) Geometric ops sample the input with PIL's
// bicubic transform filter (a = -1 cubic, at pixel centres) and fill what falls outside the
// image with `fill` (timm: the dataset mean in 0..255, (124, 116, 104) for ImageNet). Blends
// follow PIL's Image.blend: out = deg + factor * (img - deg), clamped to [0, 255] and truncated.
//
// Draws, in order (the same draws as timm's Python, from our generator):
//   one uniform per layer: op index floor(u * 15)          (np.random.choice)
//   then per layer: u = uniform(); skip the op if u > prob  (random.random() > prob)
//     if mstd > 0: magnitude = m + mstd * normal()         (random.gauss)
//     for the signed ops: one uniform, negate if > 0.5     (_randomly_negate)
#pragma once

#include <array>
#include <cstdint>
#include <span>
#include <string>
#include <vector>

#include "tensor/generator.h"

namespace cnx {

enum class AugOp {
  AutoContrast, Equalize, Invert, Rotate, Posterize, Solarize, SolarizeAdd, Color, Contrast,
  Brightness, Sharpness, ShearX, ShearY, TranslateXRel, TranslateYRel
};
constexpr int kNumAugOps = 15;
const char* aug_op_name(AugOp op);

struct RandAugmentOptions {
  int num_layers = 2;          // n
  double magnitude = 9;        // m
  double magnitude_std = 0.5;  // mstd (inf: uniform in [0, m])
  double magnitude_max = 10;   // mmax
  double prob = 0.5;           // p
  std::array<uint8_t, 3> fill{124, 116, 104};  // geometric ops' fill (ImageNet mean * 255)
};

// Parses timm's config string: "rand" then "-"-separated keys m<float>, n<int>, mstd<float>,
// mmax<float>, p<float>, inc<0|1> (e.g. "rand-m9-mstd0.5-inc1"). Only the increasing op set is
// implemented, so inc0 is refused; "rand-..." strings with other keys are refused too. Throws a
// one-line cnx::Error naming the string and what is wrong.
RandAugmentOptions parse_rand_augment(const std::string& config);

// Applies one op with its argument (degrees, bits, threshold, amount, factor, shear or
// pixels, as in the table; ignored by the three ops without one) to `image` in place.
void apply_aug_op(AugOp op, double arg, std::span<uint8_t> image, int64_t H, int64_t W, int64_t C,
                  const std::array<uint8_t, 3>& fill);

// The op's argument at `magnitude` (clipped already), drawing the sign where the op has one.
double aug_op_argument(AugOp op, double magnitude, int64_t H, int64_t W, Generator& gen);

// What rand_augment did, layer by layer (for tests and debugging).
struct AugStep {
  AugOp op;
  bool applied = false;
  double arg = 0;
};

// RandAugment in place, with the draws above. Returns the layers.
std::vector<AugStep> rand_augment(std::span<uint8_t> image, int64_t H, int64_t W, int64_t C,
                                  const RandAugmentOptions& opt, Generator& gen);

// ---- colour jitter (torchvision ColorJitter(b, c, s), hue 0) ----------------------------------

// Draws, in order: a random order of the four adjustments (Fisher-Yates with three uniforms,
// torch.randperm(4)), then the brightness, contrast and saturation factors, each
// uniform(max(0, 1 - x), 1 + x) for x = strength (one draw each, whatever the order). Applies
// brightness (Brightness), contrast (Contrast) and saturation (Color) in the drawn order, PIL
// blends as above; the hue slot does nothing (hue 0, as timm passes it). strength 0: nothing is
// drawn or changed.
void color_jitter(std::span<uint8_t> image, int64_t H, int64_t W, int64_t C, double strength,
                  Generator& gen);

}  // namespace cnx
