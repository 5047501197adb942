// The paper's augmentation primitives (ConvNeXt, Liu et al. 2022, as the official code builds
// them with timm / torchvision), as pure functions on images. The DataLoader
// (train/data/loader.h) runs the per-image ones on uint8 pixels, and only draws the parameters
// of Random Erasing and Mixup/CutMix (draw_random_erasing, draw_mixup_cutmix): the batch finish
// (kernels/batch_finish.h) applies them, on the host or on the GPU.
//
// Layout: an image is a row-major HWC buffer (H rows, W columns, C channels); uint8 before
// normalisation, float after (x -> (x / 255 - mean) / std). A batch is NHWC float.
//
// Randomness: every function that draws takes a cnx::Generator& and documents exactly what it
// draws and in which order, so a result depends only on the generator's state (seed, offset)
// and the inputs. The draws are the same in number and order as the Python reference (torch /
// numpy / random), but the streams differ, so results match the references in distribution,
// not value by value. Helpers used below:
//   uniform(a, b)   one gen.uniform(a, b) (two 32-bit words)
//   randint(a, b)   an integer in [a, b] INCLUSIVE: a + floor(gen.uniform() * (b - a + 1))
//   round(x)        Python's round: to nearest, ties to even (std::nearbyint)
#pragma once

#include <cstdint>
#include <span>
#include <vector>

#include "kernels/batch_finish.h"
#include "tensor/generator.h"

namespace cnx {

// A box of an image: rows [top, top + height), columns [left, left + width).
struct CropBox {
  int64_t top = 0, left = 0, height = 0, width = 0;
  bool operator==(const CropBox&) const = default;
};

// ---- RandomResizedCrop -----------------------------------------------------------------------

struct RandomResizedCropOptions {
  double scale_min = 0.08, scale_max = 1.0;             // fraction of the image's area
  double ratio_min = 3.0 / 4.0, ratio_max = 4.0 / 3.0;  // width / height, sampled log-uniformly
};

// torchvision.transforms.RandomResizedCrop.get_params for an H x W image. Up to 10 attempts,
// each drawing, in order:
//   target_area = H * W * uniform(scale_min, scale_max)
//   aspect      = exp(uniform(log ratio_min, log ratio_max))
//   w = round(sqrt(target_area * aspect)), h = round(sqrt(target_area / aspect))
// and, when 0 < w <= W and 0 < h <= H, top = randint(0, H - h), left = randint(0, W - w),
// returning {top, left, h, w}. After 10 failures the fallback is a central crop whose aspect is
// W / H clamped to [ratio_min, ratio_max] (w = W, h = round(W / ratio_min) when W / H is below
// the range; h = H, w = round(H * ratio_max) above it; else the whole image), at
// top = (H - h) / 2, left = (W - w) / 2 (floor), with no further draws.
CropBox random_resized_crop_box(int64_t H, int64_t W, Generator& gen,
                                const RandomResizedCropOptions& opt = {});

// Bicubic resize of `box` of an H x W x C uint8 image to out_h x out_w (x C), PIL-like: the
// cubic convolution kernel with a = -0.5, output pixel x samples the box at its centre
// left + (x + 0.5) * box.width / out_w, taps within 2 pixels of it (pixel centres), restricted
// to the box (torchvision's resized_crop: crop, then resize) with the weights renormalised to
// sum 1 at the borders; separable, rows first then columns, the intermediate kept in float
// (PIL rounds it to uint8); the result is rounded to nearest and clamped to [0, 255].
// NOT antialiased: when shrinking, PIL widens the kernel by the scale factor and this does not
// (a plain bicubic interpolation, as torch's F.interpolate(antialias=False)). An output of the
// box's size is the box itself exactly.
std::vector<uint8_t> resize_bicubic(std::span<const uint8_t> image, int64_t H, int64_t W, int64_t C,
                                    const CropBox& box, int64_t out_h, int64_t out_w);

// The training crop: random_resized_crop_box then resize_bicubic to size x size.
std::vector<uint8_t> random_resized_crop(std::span<const uint8_t> image, int64_t H, int64_t W,
                                         int64_t C, int64_t size, Generator& gen,
                                         const RandomResizedCropOptions& opt = {});

// ---- horizontal flip -------------------------------------------------------------------------

// Mirrors every row in place (column x <-> W - 1 - x, channels kept together).
void hflip(std::span<uint8_t> image, int64_t H, int64_t W, int64_t C);
void hflip(std::span<float> image, int64_t H, int64_t W, int64_t C);

// RandomHorizontalFlip(p): draws one gen.uniform() (always, whatever p) and flips when it is
// < p. Returns whether it flipped.
bool random_hflip(std::span<uint8_t> image, int64_t H, int64_t W, int64_t C, Generator& gen,
                  double p = 0.5);

// ---- evaluation transform --------------------------------------------------------------------

// The largest side eval_transform resizes to or crops: floor(sqrt(kMaxImagePixels)), the
// pixel limit of train/data/dataset.h as a square.
constexpr int64_t kMaxEvalResizeSide = 9459;

// The official build_transform's default crop_pct: 224 / 256 = 0.875 below 384, else 1.0.
double default_crop_pct(int64_t input_size);
// int(input_size / crop_pct): 224 -> 256 with 0.875, 384 -> 384 with 1.0. Throws cnx::Error
// when that side squared is above kMaxImagePixels (--crop_pct 0.001 would resize to 32000 x
// 32000 pixels for --input_size 32).
int64_t eval_resize_size(int64_t input_size, double crop_pct);
// torchvision's CenterCrop box: top = round((H - out_h) / 2), left = round((W - out_w) / 2)
// (ties to even). Requires out_h <= H and out_w <= W.
CropBox center_crop_box(int64_t H, int64_t W, int64_t out_h, int64_t out_w);

// The evaluation transform to input_size x input_size (no randomness). crop_pct <= 0 means the
// official default: below 384, crop_pct 0.875; at 384 or more the official code WARPS the whole
// image to input_size x input_size ("no cropping"). With a crop_pct in (0, 1] given, or by
// default below 384: resize the shorter side to s = eval_resize_size(input_size, crop_pct) with
// bicubic (the longer side to int(s * long / short), torchvision's Resize(int)), then
// center_crop_box to input_size x input_size. Throws cnx::Error (one line) when an image the
// transform makes would be above kMaxImagePixels: input_size above kMaxEvalResizeSide, too
// small a crop_pct, or an image so elongated that its resized long side is too long.
std::vector<uint8_t> eval_transform(std::span<const uint8_t> image, int64_t H, int64_t W, int64_t C,
                                    int64_t input_size, double crop_pct = -1.0);

// ---- Mixup / CutMix (timm.data.Mixup, mode "batch") --------------------------------------------

// Gamma(shape, 1) by Marsaglia-Tsang (2000): for shape >= 1, d = shape - 1/3, c = 1/sqrt(9d);
// repeat { x = gen.normal(); v = (1 + c x)^3; if v <= 0 retry; u = 1 - gen.uniform();
// accept d v if u < 1 - 0.0331 x^4 or log u < x^2/2 + d (1 - v + log v) }. For shape < 1:
// Gamma(shape + 1) * u^(1/shape), u = 1 - gen.uniform() drawn after it.
double sample_gamma(double shape, Generator& gen);
// Beta(a, b) = X / (X + Y), X ~ Gamma(a) drawn first, then Y ~ Gamma(b).
double sample_beta(double a, double b, Generator& gen);

struct MixupOptions {
  double mixup_alpha = 0.8;   // Beta(alpha, alpha) for Mixup; 0 turns Mixup off
  double cutmix_alpha = 1.0;  // Beta(alpha, alpha) for CutMix; 0 turns CutMix off
  double prob = 1.0;          // probability of mixing a batch at all
  double switch_prob = 0.5;   // probability of CutMix when both are on
  double label_smoothing = 0.1;
  bool correct_lam = true;  // CutMix: lambda = 1 - box area / image area (after clipping)
  int64_t num_classes = 1000;
};

// The draws of one batch's Mixup/CutMix (what mixup_cutmix below draws, without applying it).
struct MixupDraw {
  double lam = 1.0;     // the weight of the batch itself (1: not mixed)
  bool cutmix = false;  // whether CutMix (else Mixup, or nothing when lam == 1)
  CropBox box;          // CutMix's box (rows yl..yh, columns xl..xh); empty otherwise
};

struct MixupResult {
  std::vector<float> images;   // (N, H, W, C), mixed
  std::vector<float> targets;  // (N, K) soft targets, each row sums to 1
  double lam = 1.0;            // the weight of the batch itself (1: not mixed)
  bool cutmix = false;         // whether CutMix (else Mixup, or nothing when lam == 1)
  CropBox box;                 // CutMix's box (rows yl..yh, columns xl..xh); empty otherwise
};

// timm Mixup(mode="batch") on an NHWC float batch (N even, as timm asserts) with labels in
// [0, K). Draws, in order:
//   u = gen.uniform(); mixing only if u < prob (else lam = 1, nothing more drawn);
//   when both alphas > 0: cutmix = gen.uniform() < switch_prob; (only one on: that one, no draw)
//   lam = sample_beta(alpha, alpha) of the chosen method;
//   CutMix and lam != 1 (timm's rand_bbox): cut_h = int(H sqrt(1 - lam)), cut_w likewise,
//     cy = randint(0, H - 1), cx = randint(0, W - 1), then yl = clip(cy - cut_h / 2, 0, H),
//     yh = clip(cy + cut_h / 2, 0, H) (and x likewise); with correct_lam,
//     lam = 1 - (yh - yl)(xh - xl) / (H W).
// Images: the batch is mixed with its flip along N (sample i with sample N - 1 - i):
//   Mixup:  out[i] = x[i] * float(lam) + x[N-1-i] * float(1 - lam)   (in float, as torch does)
//   CutMix: out[i] = x[i], with the box copied from x[N-1-i].
// Targets: with off = smoothing / K, on = 1 - smoothing + off and y(l) the one-hot of l with
//   on / off values, targets[i] = y(labels[i]) * lam + y(labels[N-1-i]) * (1 - lam) (in double,
//   rounded to float once).
MixupResult mixup_cutmix(std::span<const float> images, std::span<const int64_t> labels, int64_t N,
                         int64_t H, int64_t W, int64_t C, Generator& gen,
                         const MixupOptions& opt = {});

// The draws of mixup_cutmix alone, for H x W images (same draws, same order, same lam and box).
MixupDraw draw_mixup_cutmix(int64_t H, int64_t W, Generator& gen, const MixupOptions& opt = {});
// mixup_cutmix's soft targets for labels in [0, opt.num_classes) mixed with weight lam: (N, K).
std::vector<float> mixup_targets(std::span<const int64_t> labels, double lam, const MixupOptions& opt);
// The MixParams of the batch finish (kernels/batch_finish.h) for a draw: float(lam) and
// float(1 - lam), and the CutMix box.
MixParams mix_params(const MixupDraw& d);

// ---- Random Erasing (timm.data.RandomErasing, mode "pixel", count 1) ---------------------------

struct RandomErasingOptions {
  double probability = 0.25;
  double min_area = 0.02, max_area = 1.0 / 3.0;     // fraction of the image's area
  double min_aspect = 0.3, max_aspect = 1.0 / 0.3;  // h / w, sampled log-uniformly
  int attempts = 10;
};

// The draws, for an H x W image, in order: u = gen.uniform(); nothing more (and nothing erased:
// height 0) if u > probability (timm's test). Then up to `attempts` times:
//   target_area = H * W * uniform(min_area, max_area), aspect = exp(uniform(log min, log max)),
//   h = round(sqrt(target_area * aspect)), w = round(sqrt(target_area / aspect));
//   if w < W and h < H: top = randint(0, H - h), left = randint(0, W - w), then the noise key
//   = (gen.next_u32() << 32) | gen.next_u32() (high word first); stop.
EraseParams draw_random_erasing(int64_t H, int64_t W, Generator& gen, const RandomErasingOptions& opt = {});

// On a normalised float H x W x C image, in place: draw_random_erasing, then every value k (HWC
// index) of the box becomes erase_noise(key, k) (kernels/batch_finish.h: a standard normal per
// pixel and channel, timm's mode "pixel", counter-based so the GPU finish gives the same values).
// Returns the erased box (height 0 when nothing was erased).
CropBox random_erasing(std::span<float> image, int64_t H, int64_t W, int64_t C, Generator& gen,
                       const RandomErasingOptions& opt = {});

}  // namespace cnx
