#include "train/data/augment.h"

#include <algorithm>
#include <cmath>

#include "tensor/error.h"
#include "train/data/dataset.h"
#include "train/data/draws.h"

namespace cnx {

namespace {

using draws::py_round;
using draws::randint;

void check_image(const char* op, size_t size, int64_t H, int64_t W, int64_t C) {
  CNX_CHECK(H > 0 && W > 0 && C > 0, op, ": image sizes must be positive, got H=", H, " W=", W,
            " C=", C);
  CNX_CHECK(static_cast<int64_t>(size) == H * W * C, op, ": buffer holds ", size,
            " values but H x W x C = ", H, " x ", W, " x ", C, " = ", H * W * C);
}

// The cubic convolution kernel with a = -0.5 (PIL's bicubic).
double cubic(double x) {
  constexpr double a = -0.5;
  x = std::abs(x);
  if (x < 1.0) return ((a + 2.0) * x - (a + 3.0)) * x * x + 1.0;
  if (x < 2.0) return (((x - 5.0) * x + 8.0) * x - 4.0) * a;
  return 0.0;
}

// The taps of one output coordinate: input indices [first, first + weights.size()).
struct Taps {
  int64_t first = 0;
  std::vector<double> weights;
};

// Taps for resizing the input range [start, start + in) to `out` samples (PIL's precompute_coeffs
// with the support fixed at 2: no antialiasing).
std::vector<Taps> bicubic_taps(int64_t start, int64_t in, int64_t out) {
  constexpr double support = 2.0;
  const double scale = static_cast<double>(in) / static_cast<double>(out);
  std::vector<Taps> taps(static_cast<size_t>(out));
  for (int64_t x = 0; x < out; ++x) {
    const double center = (static_cast<double>(x) + 0.5) * scale;  // in box coordinates
    const int64_t lo =
        std::max<int64_t>(0, static_cast<int64_t>(std::floor(center - support + 0.5)));
    const int64_t hi =
        std::min<int64_t>(in, static_cast<int64_t>(std::floor(center + support + 0.5)));
    Taps& t = taps[static_cast<size_t>(x)];
    t.first = start + lo;
    double total = 0.0;
    for (int64_t j = lo; j < hi; ++j) {
      const double w = cubic(static_cast<double>(j) + 0.5 - center);
      t.weights.push_back(w);
      total += w;
    }
    for (double& w : t.weights) w /= total;  // total > 0: the nearest tap has weight >= 0.5
  }
  return taps;
}

template <class T>
void hflip_impl(std::span<T> image, int64_t H, int64_t W, int64_t C) {
  check_image("hflip", image.size(), H, W, C);
  for (int64_t y = 0; y < H; ++y) {
    T* row = image.data() + y * W * C;
    for (int64_t x = 0; x < W / 2; ++x)
      std::swap_ranges(row + x * C, row + (x + 1) * C, row + (W - 1 - x) * C);
  }
}

}  // namespace

// ---- RandomResizedCrop -----------------------------------------------------------------------

CropBox random_resized_crop_box(int64_t H, int64_t W, Generator& gen,
                                const RandomResizedCropOptions& opt) {
  CNX_CHECK(H > 0 && W > 0, "random_resized_crop_box: image sizes must be positive, got ", H, " x ",
            W);
  CNX_CHECK(0 < opt.scale_min && opt.scale_min <= opt.scale_max && 0 < opt.ratio_min &&
                opt.ratio_min <= opt.ratio_max,
            "random_resized_crop_box: need 0 < scale_min <= scale_max and 0 < ratio_min <= "
            "ratio_max, got scale (",
            opt.scale_min, ", ", opt.scale_max, ") ratio (", opt.ratio_min, ", ", opt.ratio_max,
            ")");
  const double area = static_cast<double>(H) * static_cast<double>(W);
  const double log_lo = std::log(opt.ratio_min), log_hi = std::log(opt.ratio_max);
  for (int attempt = 0; attempt < 10; ++attempt) {
    const double target_area = area * gen.uniform(opt.scale_min, opt.scale_max);
    const double aspect = std::exp(gen.uniform(log_lo, log_hi));
    const int64_t w = py_round(std::sqrt(target_area * aspect));
    const int64_t h = py_round(std::sqrt(target_area / aspect));
    if (0 < w && w <= W && 0 < h && h <= H) {
      const int64_t top = randint(gen, 0, H - h);
      const int64_t left = randint(gen, 0, W - w);
      return {top, left, h, w};
    }
  }
  // Fallback: a central crop with the aspect clamped to the range.
  const double in_ratio = static_cast<double>(W) / static_cast<double>(H);
  int64_t w = W, h = H;
  if (in_ratio < opt.ratio_min) {
    h = py_round(static_cast<double>(w) / opt.ratio_min);
  } else if (in_ratio > opt.ratio_max) {
    w = py_round(static_cast<double>(h) * opt.ratio_max);
  }
  return {(H - h) / 2, (W - w) / 2, h, w};
}

std::vector<uint8_t> resize_bicubic(std::span<const uint8_t> image, int64_t H, int64_t W, int64_t C,
                                    const CropBox& box, int64_t out_h, int64_t out_w) {
  check_image("resize_bicubic", image.size(), H, W, C);
  CNX_CHECK(box.height > 0 && box.width > 0 && box.top >= 0 && box.left >= 0 &&
                box.top + box.height <= H && box.left + box.width <= W,
            "resize_bicubic: box (top ", box.top, ", left ", box.left, ", ", box.height, " x ",
            box.width, ") is not a non-empty box inside the ", H, " x ", W, " image");
  CNX_CHECK(out_h > 0 && out_w > 0, "resize_bicubic: output size must be positive, got ", out_h,
            " x ", out_w);
  const std::vector<Taps> tx = bicubic_taps(box.left, box.width, out_w);
  const std::vector<Taps> ty = bicubic_taps(box.top, box.height, out_h);
  // Horizontal pass over the box's rows: (box.height, out_w, C).
  std::vector<float> mid(static_cast<size_t>(box.height * out_w * C));
  for (int64_t y = 0; y < box.height; ++y) {
    const uint8_t* row = image.data() + (box.top + y) * W * C;
    for (int64_t x = 0; x < out_w; ++x) {
      const Taps& t = tx[static_cast<size_t>(x)];
      for (int64_t c = 0; c < C; ++c) {
        double s = 0.0;
        for (size_t k = 0; k < t.weights.size(); ++k)
          s += t.weights[k] * row[(t.first + static_cast<int64_t>(k)) * C + c];
        mid[static_cast<size_t>((y * out_w + x) * C + c)] = static_cast<float>(s);
      }
    }
  }
  // Vertical pass: (out_h, out_w, C).
  std::vector<uint8_t> out(static_cast<size_t>(out_h * out_w * C));
  for (int64_t y = 0; y < out_h; ++y) {
    const Taps& t = ty[static_cast<size_t>(y)];
    const int64_t first = t.first - box.top;  // in the box's rows
    for (int64_t x = 0; x < out_w; ++x) {
      for (int64_t c = 0; c < C; ++c) {
        double s = 0.0;
        for (size_t k = 0; k < t.weights.size(); ++k)
          s += t.weights[k] *
               mid[static_cast<size_t>(((first + static_cast<int64_t>(k)) * out_w + x) * C + c)];
        s = std::clamp(std::nearbyint(s), 0.0, 255.0);
        out[static_cast<size_t>((y * out_w + x) * C + c)] = static_cast<uint8_t>(s);
      }
    }
  }
  return out;
}

std::vector<uint8_t> random_resized_crop(std::span<const uint8_t> image, int64_t H, int64_t W,
                                         int64_t C, int64_t size, Generator& gen,
                                         const RandomResizedCropOptions& opt) {
  check_image("random_resized_crop", image.size(), H, W, C);
  const CropBox box = random_resized_crop_box(H, W, gen, opt);
  return resize_bicubic(image, H, W, C, box, size, size);
}

// ---- horizontal flip -------------------------------------------------------------------------

void hflip(std::span<uint8_t> image, int64_t H, int64_t W, int64_t C) {
  hflip_impl(image, H, W, C);
}
void hflip(std::span<float> image, int64_t H, int64_t W, int64_t C) { hflip_impl(image, H, W, C); }

bool random_hflip(std::span<uint8_t> image, int64_t H, int64_t W, int64_t C, Generator& gen,
                  double p) {
  const bool flip = gen.uniform() < p;
  if (flip) hflip(image, H, W, C);
  return flip;
}

// ---- evaluation transform --------------------------------------------------------------------

double default_crop_pct(int64_t input_size) { return input_size < 384 ? 224.0 / 256.0 : 1.0; }

int64_t eval_resize_size(int64_t input_size, double crop_pct) {
  CNX_CHECK(input_size > 0 && crop_pct > 0 && crop_pct <= 1.0,
            "eval_resize_size: need input_size > 0 and crop_pct in (0, 1], got ", input_size,
            " and ", crop_pct);
  // In double before any conversion: a tiny crop_pct makes the side arbitrarily large.
  const double side = static_cast<double>(input_size) / crop_pct;
  CNX_CHECK(side * side <= static_cast<double>(kMaxImagePixels), "eval_transform: input_size ",
            input_size, " / crop_pct ", crop_pct, " resizes to ", side, " pixels a side, above the limit of ",
            kMaxImagePixels, " pixels an image (", kMaxEvalResizeSide, " a side): crop_pct is too small");
  return static_cast<int64_t>(side);
}

CropBox center_crop_box(int64_t H, int64_t W, int64_t out_h, int64_t out_w) {
  CNX_CHECK(0 < out_h && out_h <= H && 0 < out_w && out_w <= W, "center_crop_box: crop ", out_h,
            " x ", out_w, " does not fit the ", H, " x ", W, " image");
  return {py_round(static_cast<double>(H - out_h) / 2.0),
          py_round(static_cast<double>(W - out_w) / 2.0), out_h, out_w};
}

std::vector<uint8_t> eval_transform(std::span<const uint8_t> image, int64_t H, int64_t W, int64_t C,
                                    int64_t input_size, double crop_pct) {
  check_image("eval_transform", image.size(), H, W, C);
  CNX_CHECK(input_size > 0, "eval_transform: input_size must be positive, got ", input_size);
  CNX_CHECK(input_size <= kMaxEvalResizeSide, "eval_transform: input_size ", input_size,
            " is above the limit of ", kMaxEvalResizeSide, " (", kMaxImagePixels, " pixels an image)");
  const CropBox whole{0, 0, H, W};
  if (crop_pct <= 0.0 && input_size >= 384)  // the official code warps, no cropping
    return resize_bicubic(image, H, W, C, whole, input_size, input_size);
  if (crop_pct <= 0.0) crop_pct = default_crop_pct(input_size);
  const int64_t s = eval_resize_size(input_size, crop_pct);
  const bool tall = H >= W;
  const int64_t short_side = tall ? W : H, long_side = tall ? H : W;
  const double long_d =
      static_cast<double>(s) * static_cast<double>(long_side) / static_cast<double>(short_side);
  // An elongated image (1 x 5000 pixels) keeps its aspect: its long side grows with it.
  CNX_CHECK(long_d * static_cast<double>(s) <= static_cast<double>(kMaxImagePixels),
            "eval_transform: resizing the ", W, "x", H, " image to a short side of ", s, " gives ",
            static_cast<int64_t>(long_d), " pixels on the long side, above the limit of ",
            kMaxImagePixels, " pixels an image");
  const int64_t new_long = static_cast<int64_t>(long_d);
  const int64_t rh = tall ? new_long : s, rw = tall ? s : new_long;
  const std::vector<uint8_t> resized = (rh == H && rw == W)
                                           ? std::vector<uint8_t>(image.begin(), image.end())
                                           : resize_bicubic(image, H, W, C, whole, rh, rw);
  const CropBox box = center_crop_box(rh, rw, input_size, input_size);
  std::vector<uint8_t> out(static_cast<size_t>(input_size * input_size * C));
  for (int64_t y = 0; y < input_size; ++y) {
    const auto src = resized.begin() + ((box.top + y) * rw + box.left) * C;
    std::copy(src, src + input_size * C, out.begin() + y * input_size * C);
  }
  return out;
}

// ---- Mixup / CutMix --------------------------------------------------------------------------

double sample_gamma(double shape, Generator& gen) {
  CNX_CHECK(shape > 0, "sample_gamma: shape must be positive, got ", shape);
  if (shape < 1.0) {
    const double g = sample_gamma(shape + 1.0, gen);
    const double u = 1.0 - gen.uniform();  // in (0, 1]
    return g * std::pow(u, 1.0 / shape);
  }
  const double d = shape - 1.0 / 3.0;
  const double c = 1.0 / std::sqrt(9.0 * d);
  for (;;) {
    const double x = gen.normal();
    double v = 1.0 + c * x;
    if (v <= 0.0) continue;
    v = v * v * v;
    const double u = 1.0 - gen.uniform();  // in (0, 1]: log is finite
    if (u < 1.0 - 0.0331 * x * x * x * x) return d * v;
    if (std::log(u) < 0.5 * x * x + d * (1.0 - v + std::log(v))) return d * v;
  }
}

double sample_beta(double a, double b, Generator& gen) {
  const double x = sample_gamma(a, gen);
  const double y = sample_gamma(b, gen);
  return x / (x + y);
}

MixupDraw draw_mixup_cutmix(int64_t H, int64_t W, Generator& gen, const MixupOptions& opt) {
  CNX_CHECK(H > 0 && W > 0, "draw_mixup_cutmix: image sizes must be positive, got ", H, " x ", W);
  CNX_CHECK(opt.mixup_alpha >= 0 && opt.cutmix_alpha >= 0,
            "mixup_cutmix: alphas must be >= 0, got mixup ", opt.mixup_alpha, " cutmix ",
            opt.cutmix_alpha);
  MixupDraw r;
  // timm's _params_per_batch.
  const bool enabled = opt.mixup_alpha > 0 || opt.cutmix_alpha > 0;
  if (enabled && gen.uniform() < opt.prob) {
    if (opt.mixup_alpha > 0 && opt.cutmix_alpha > 0) {
      r.cutmix = gen.uniform() < opt.switch_prob;
      const double alpha = r.cutmix ? opt.cutmix_alpha : opt.mixup_alpha;
      r.lam = sample_beta(alpha, alpha, gen);
    } else if (opt.mixup_alpha > 0) {
      r.lam = sample_beta(opt.mixup_alpha, opt.mixup_alpha, gen);
    } else {
      r.cutmix = true;
      r.lam = sample_beta(opt.cutmix_alpha, opt.cutmix_alpha, gen);
    }
  }
  if (r.lam == 1.0) {
    r.cutmix = false;
  } else if (r.cutmix) {
    // timm's rand_bbox (margin 0) and cutmix_bbox_and_lam.
    const double ratio = std::sqrt(1.0 - r.lam);
    const auto cut_h = static_cast<int64_t>(static_cast<double>(H) * ratio);
    const auto cut_w = static_cast<int64_t>(static_cast<double>(W) * ratio);
    const int64_t cy = randint(gen, 0, H - 1);
    const int64_t cx = randint(gen, 0, W - 1);
    const int64_t yl = std::clamp<int64_t>(cy - cut_h / 2, 0, H);
    const int64_t yh = std::clamp<int64_t>(cy + cut_h / 2, 0, H);
    const int64_t xl = std::clamp<int64_t>(cx - cut_w / 2, 0, W);
    const int64_t xh = std::clamp<int64_t>(cx + cut_w / 2, 0, W);
    r.box = {yl, xl, yh - yl, xh - xl};
    if (opt.correct_lam)
      r.lam = 1.0 - static_cast<double>((yh - yl) * (xh - xl)) / static_cast<double>(H * W);
  }
  return r;
}

std::vector<float> mixup_targets(std::span<const int64_t> labels, double lam, const MixupOptions& opt) {
  // timm's mixup_target.
  const int64_t N = static_cast<int64_t>(labels.size()), K = opt.num_classes;
  CNX_CHECK(K > 0, "mixup_cutmix: num_classes must be positive, got ", K);
  for (int64_t i = 0; i < N; ++i)
    CNX_CHECK(0 <= labels[i] && labels[i] < K, "mixup_cutmix: label ", labels[i], " of sample ", i,
              " is outside [0, ", K, ")");
  const double off = opt.label_smoothing / static_cast<double>(K);
  const double on = 1.0 - opt.label_smoothing + off;
  std::vector<float> targets(static_cast<size_t>(N * K), 0.0f);
  for (int64_t i = 0; i < N; ++i) {
    const int64_t l1 = labels[i], l2 = labels[N - 1 - i];
    for (int64_t k = 0; k < K; ++k) {
      const double y1 = k == l1 ? on : off, y2 = k == l2 ? on : off;
      targets[static_cast<size_t>(i * K + k)] = static_cast<float>(y1 * lam + y2 * (1.0 - lam));
    }
  }
  return targets;
}

MixParams mix_params(const MixupDraw& d) {
  MixParams p;
  if (d.lam == 1.0) return p;  // not mixed
  if (d.cutmix) {
    p.mode = MixMode::cutmix;
    p.top = static_cast<int32_t>(d.box.top);
    p.left = static_cast<int32_t>(d.box.left);
    p.height = static_cast<int32_t>(d.box.height);
    p.width = static_cast<int32_t>(d.box.width);
  } else {
    p.mode = MixMode::mixup;
    p.lam = static_cast<float>(d.lam);
    p.one_minus_lam = static_cast<float>(1.0 - d.lam);
  }
  return p;
}

MixupResult mixup_cutmix(std::span<const float> images, std::span<const int64_t> labels, int64_t N,
                         int64_t H, int64_t W, int64_t C, Generator& gen, const MixupOptions& opt) {
  CNX_CHECK(N > 0 && N % 2 == 0, "mixup_cutmix: batch size should be even (timm), got ", N);
  CNX_CHECK(H > 0 && W > 0 && C > 0, "mixup_cutmix: image sizes must be positive, got ", H, " x ",
            W, " x ", C);
  CNX_CHECK(static_cast<int64_t>(images.size()) == N * H * W * C, "mixup_cutmix: images hold ",
            images.size(), " values but N x H x W x C = ", N * H * W * C);
  CNX_CHECK(static_cast<int64_t>(labels.size()) == N, "mixup_cutmix: ", labels.size(),
            " labels for a batch of ", N);
  CNX_CHECK(opt.num_classes > 0, "mixup_cutmix: num_classes must be positive, got ", opt.num_classes);
  for (int64_t i = 0; i < N; ++i)
    CNX_CHECK(0 <= labels[i] && labels[i] < opt.num_classes, "mixup_cutmix: label ", labels[i],
              " of sample ", i, " is outside [0, ", opt.num_classes, ")");

  const MixupDraw d = draw_mixup_cutmix(H, W, gen, opt);
  MixupResult r;
  r.lam = d.lam;
  r.cutmix = d.cutmix;
  r.box = d.box;
  r.images.assign(images.begin(), images.end());
  const int64_t per_image = H * W * C;
  if (r.lam == 1.0) {
    // not mixed
  } else if (r.cutmix) {
    const int64_t yl = d.box.top, yh = d.box.top + d.box.height;
    const int64_t xl = d.box.left, xh = d.box.left + d.box.width;
    for (int64_t i = 0; i < N; ++i) {
      const float* src = images.data() + (N - 1 - i) * per_image;
      float* dst = r.images.data() + i * per_image;
      for (int64_t y = yl; y < yh; ++y)
        std::copy(src + (y * W + xl) * C, src + (y * W + xh) * C, dst + (y * W + xl) * C);
    }
  } else {
    const auto a = static_cast<float>(r.lam), b = static_cast<float>(1.0 - r.lam);
    for (int64_t i = 0; i < N; ++i) {
      const float* x = images.data() + i * per_image;
      const float* xf = images.data() + (N - 1 - i) * per_image;
      float* dst = r.images.data() + i * per_image;
      for (int64_t k = 0; k < per_image; ++k) dst[k] = x[k] * a + xf[k] * b;
    }
  }
  r.targets = mixup_targets(labels, r.lam, opt);
  return r;
}

// ---- Random Erasing --------------------------------------------------------------------------

EraseParams draw_random_erasing(int64_t H, int64_t W, Generator& gen, const RandomErasingOptions& opt) {
  CNX_CHECK(H > 0 && W > 0, "random_erasing: image sizes must be positive, got ", H, " x ", W);
  CNX_CHECK(0 < opt.min_area && opt.min_area <= opt.max_area && 0 < opt.min_aspect &&
                opt.min_aspect <= opt.max_aspect,
            "random_erasing: need 0 < min_area <= max_area and 0 < min_aspect <= max_aspect");
  if (gen.uniform() > opt.probability) return {};
  const double area = static_cast<double>(H) * static_cast<double>(W);
  const double log_lo = std::log(opt.min_aspect), log_hi = std::log(opt.max_aspect);
  for (int attempt = 0; attempt < opt.attempts; ++attempt) {
    const double target_area = gen.uniform(opt.min_area, opt.max_area) * area;
    const double aspect = std::exp(gen.uniform(log_lo, log_hi));
    const int64_t h = py_round(std::sqrt(target_area * aspect));
    const int64_t w = py_round(std::sqrt(target_area / aspect));
    if (w < W && h < H) {
      EraseParams e;
      e.top = static_cast<int32_t>(randint(gen, 0, H - h));
      e.left = static_cast<int32_t>(randint(gen, 0, W - w));
      e.height = static_cast<int32_t>(h);
      e.width = static_cast<int32_t>(w);
      if (e.height == 0 || e.width == 0) return {};  // an empty box erases nothing
      const uint64_t hi = gen.next_u32();  // two statements: the draw order is fixed
      const uint64_t lo = gen.next_u32();
      e.noise_key = (hi << 32) | lo;
      return e;
    }
  }
  return {};
}

CropBox random_erasing(std::span<float> image, int64_t H, int64_t W, int64_t C, Generator& gen,
                       const RandomErasingOptions& opt) {
  check_image("random_erasing", image.size(), H, W, C);
  const EraseParams e = draw_random_erasing(H, W, gen, opt);
  if (e.height == 0) return {};
  for (int64_t y = e.top; y < e.top + e.height; ++y)
    for (int64_t k = (y * W + e.left) * C; k < (y * W + e.left + e.width) * C; ++k)
      image[static_cast<size_t>(k)] = erase_noise(e.noise_key, k);
  return {e.top, e.left, e.height, e.width};
}

}  // namespace cnx
