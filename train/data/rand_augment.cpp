#include "train/data/rand_augment.h"

#include <algorithm>
#include <cmath>
#include <limits>
#include <numbers>

#include "tensor/error.h"

namespace cnx {

namespace {

void check_image(const char* op, size_t size, int64_t H, int64_t W, int64_t C) {
  CNX_CHECK(H > 0 && W > 0 && (C == 1 || C == 3), op, ": need an H x W x C uint8 image with C 1 or 3, got H=",
            H, " W=", W, " C=", C);
  CNX_CHECK(static_cast<int64_t>(size) == H * W * C, op, ": buffer holds ", size,
            " bytes but H x W x C = ", H * W * C);
}

uint8_t clamp_trunc(double v) {  // PIL: clip to [0, 255], then truncate
  if (v <= 0.0) return 0;
  if (v >= 255.0) return 255;
  return static_cast<uint8_t>(v);
}

// Applies a per-channel table: out = lut[c][v].
void apply_lut(std::span<uint8_t> img, int64_t C, const std::vector<std::array<uint8_t, 256>>& lut) {
  const int64_t n = static_cast<int64_t>(img.size());
  for (int64_t i = 0; i < n; ++i) img[i] = lut[i % C][img[i]];
}

std::vector<std::array<uint8_t, 256>> same_lut(int64_t C, auto f) {
  std::array<uint8_t, 256> t{};
  for (int v = 0; v < 256; ++v) t[v] = f(v);
  return std::vector<std::array<uint8_t, 256>>(static_cast<size_t>(C), t);
}

// PIL's "L" conversion of one RGB pixel: (19595 R + 38470 G + 7471 B + 2^15) >> 16.
uint8_t grey(const uint8_t* p, int64_t C) {
  if (C == 1) return p[0];
  return static_cast<uint8_t>((p[0] * 19595u + p[1] * 38470u + p[2] * 7471u + 0x8000u) >> 16);
}

// Image.blend(degenerate, image, factor) in place: img = deg + factor * (img - deg).
void blend(std::span<uint8_t> img, std::span<const uint8_t> deg, double factor) {
  for (size_t i = 0; i < img.size(); ++i)
    img[i] = clamp_trunc(deg[i] + factor * (static_cast<double>(img[i]) - deg[i]));
}

// ---- the pixel ops ----

void auto_contrast(std::span<uint8_t> img, int64_t C) {
  std::vector<std::array<uint8_t, 256>> lut(static_cast<size_t>(C));
  for (int64_t c = 0; c < C; ++c) {
    int lo = 255, hi = 0;
    for (size_t i = c; i < img.size(); i += C) {
      lo = std::min<int>(lo, img[i]);
      hi = std::max<int>(hi, img[i]);
    }
    for (int v = 0; v < 256; ++v) {
      if (hi <= lo) {
        lut[c][v] = static_cast<uint8_t>(v);
      } else {
        const double scale = 255.0 / (hi - lo), offset = -lo * scale;
        const int ix = static_cast<int>(v * scale + offset);  // int(): toward zero
        lut[c][v] = static_cast<uint8_t>(std::clamp(ix, 0, 255));
      }
    }
  }
  apply_lut(img, C, lut);
}

void equalize(std::span<uint8_t> img, int64_t C) {
  std::vector<std::array<uint8_t, 256>> lut(static_cast<size_t>(C));
  for (int64_t c = 0; c < C; ++c) {
    std::array<int64_t, 256> h{};
    for (size_t i = c; i < img.size(); i += C) ++h[img[i]];
    int64_t total = 0, last = 0, nonzero = 0;
    for (int v = 0; v < 256; ++v)
      if (h[v]) {
        total += h[v];
        last = h[v];
        ++nonzero;
      }
    const int64_t step = nonzero <= 1 ? 0 : (total - last) / 255;
    int64_t n = step / 2;
    for (int v = 0; v < 256; ++v) {
      if (step == 0) {
        lut[c][v] = static_cast<uint8_t>(v);
      } else {
        lut[c][v] = static_cast<uint8_t>(std::min<int64_t>(255, n / step));
        n += h[v];
      }
    }
  }
  apply_lut(img, C, lut);
}

// PIL's ImageEnhance: Color (grey image), Contrast (mean grey level), Brightness (black),
// Sharpness (SMOOTH-filtered image).
void enhance(AugOp op, double factor, std::span<uint8_t> img, int64_t H, int64_t W, int64_t C) {
  std::vector<uint8_t> deg(img.size());
  const int64_t pixels = H * W;
  switch (op) {
    case AugOp::Color:
      for (int64_t p = 0; p < pixels; ++p)
        std::fill_n(deg.data() + p * C, C, grey(img.data() + p * C, C));
      break;
    case AugOp::Contrast: {
      double sum = 0;
      for (int64_t p = 0; p < pixels; ++p) sum += grey(img.data() + p * C, C);
      const auto mean = static_cast<uint8_t>(std::min(255.0, std::floor(sum / pixels + 0.5)));
      std::fill(deg.begin(), deg.end(), mean);
      break;
    }
    case AugOp::Brightness:
      std::fill(deg.begin(), deg.end(), uint8_t{0});
      break;
    case AugOp::Sharpness: {
      // SMOOTH: [[1,1,1],[1,5,1],[1,1,1]] / 13 inside; the border rows and columns unchanged.
      std::copy(img.begin(), img.end(), deg.begin());
      for (int64_t y = 1; y + 1 < H; ++y)
        for (int64_t x = 1; x + 1 < W; ++x)
          for (int64_t c = 0; c < C; ++c) {
            int s = 0;
            for (int dy = -1; dy <= 1; ++dy)
              for (int dx = -1; dx <= 1; ++dx)
                s += img[((y + dy) * W + (x + dx)) * C + c] * (dy == 0 && dx == 0 ? 5 : 1);
            deg[(y * W + x) * C + c] = static_cast<uint8_t>(std::min(255.0, std::floor(s / 13.0 + 0.5)));
          }
      break;
    }
    default:
      fail("enhance: not an enhance op: ", aug_op_name(op));
  }
  blend(img, deg, factor);
}

// PIL's bicubic transform filter: the cubic with a = -1 through 4 samples.
double cubic4(double v1, double v2, double v3, double v4, double d) {
  const double p1 = v2, p2 = -v1 + v3, p3 = 2 * (v1 - v2) + v3 - v4, p4 = -v1 + v2 - v3 + v4;
  return p1 + d * (p2 + d * (p3 + d * p4));
}

// Image.transform(AFFINE, (a, b, c, d, e, f), BICUBIC, fillcolor): output pixel (x, y) samples
// the input at (a x' + b y' + c, d x' + e y' + f) with x' = x + 0.5, y' = y + 0.5 (pixel
// centres); a sample outside [0, W) x [0, H) is `fill`; neighbours beyond the edge are clamped.
void affine(std::span<uint8_t> img, int64_t H, int64_t W, int64_t C, const std::array<double, 6>& m,
            const std::array<uint8_t, 3>& fill) {
  std::vector<uint8_t> src(img.begin(), img.end());
  auto at = [&](int64_t y, int64_t x, int64_t c) {
    y = std::clamp<int64_t>(y, 0, H - 1);
    x = std::clamp<int64_t>(x, 0, W - 1);
    return static_cast<double>(src[(y * W + x) * C + c]);
  };
  for (int64_t y = 0; y < H; ++y)
    for (int64_t x = 0; x < W; ++x) {
      const double xo = x + 0.5, yo = y + 0.5;
      double xin = m[0] * xo + m[1] * yo + m[2];
      double yin = m[3] * xo + m[4] * yo + m[5];
      uint8_t* out = img.data() + (y * W + x) * C;
      if (xin < 0 || yin < 0 || xin >= W || yin >= H) {
        for (int64_t c = 0; c < C; ++c) out[c] = fill[C == 1 ? 0 : c];
        continue;
      }
      xin -= 0.5;
      yin -= 0.5;
      const auto x0 = static_cast<int64_t>(std::floor(xin)), y0 = static_cast<int64_t>(std::floor(yin));
      const double dx = xin - x0, dy = yin - y0;
      for (int64_t c = 0; c < C; ++c) {
        double rows[4];
        for (int k = 0; k < 4; ++k) {
          const int64_t yy = y0 - 1 + k;
          rows[k] = cubic4(at(yy, x0 - 1, c), at(yy, x0, c), at(yy, x0 + 1, c), at(yy, x0 + 2, c), dx);
        }
        out[c] = static_cast<uint8_t>(std::clamp(std::nearbyint(cubic4(rows[0], rows[1], rows[2], rows[3], dy)), 0.0, 255.0));
      }
    }
}

bool signed_op(AugOp op) {
  switch (op) {
    case AugOp::Rotate: case AugOp::Color: case AugOp::Contrast: case AugOp::Brightness:
    case AugOp::Sharpness: case AugOp::ShearX: case AugOp::ShearY: case AugOp::TranslateXRel:
    case AugOp::TranslateYRel:
      return true;
    default:
      return false;
  }
}

}  // namespace

const char* aug_op_name(AugOp op) {
  static const char* names[kNumAugOps] = {
      "AutoContrast", "Equalize",  "Invert",   "Rotate",     "PosterizeIncreasing",
      "SolarizeIncreasing", "SolarizeAdd", "ColorIncreasing", "ContrastIncreasing",
      "BrightnessIncreasing", "SharpnessIncreasing", "ShearX", "ShearY", "TranslateXRel",
      "TranslateYRel"};
  return names[static_cast<int>(op)];
}

RandAugmentOptions parse_rand_augment(const std::string& config) {
  auto bad = [&](const std::string& why) {
    fail("--aa ", config, ": ", why, " (expected e.g. rand-m9-mstd0.5-inc1)");
  };
  RandAugmentOptions opt;
  size_t pos = config.find('-');
  if (config.substr(0, pos) != "rand") bad("only RandAugment ('rand-...') is implemented");
  while (pos != std::string::npos) {
    const size_t next = config.find('-', pos + 1);
    const std::string part = config.substr(pos + 1, next == std::string::npos ? std::string::npos : next - pos - 1);
    pos = next;
    std::string key, value;
    for (const char* k : {"mstd", "mmax", "inc", "m", "n", "p"})
      if (part.rfind(k, 0) == 0) {
        key = k;
        value = part.substr(key.size());
        break;
      }
    if (key.empty() || value.empty()) bad("unknown or empty part '" + part + "'");
    double v = 0;
    try {
      size_t used = 0;
      v = std::stod(value, &used);
      if (used != value.size()) throw std::invalid_argument(value);
    } catch (const std::exception&) {
      bad("'" + value + "' in '" + part + "' is not a number");
    }
    if (key == "m") opt.magnitude = v;
    else if (key == "n") opt.num_layers = static_cast<int>(v);
    else if (key == "mstd") opt.magnitude_std = v > 100 ? std::numeric_limits<double>::infinity() : v;
    else if (key == "mmax") opt.magnitude_max = v;
    else if (key == "p") opt.prob = v;
    else if (key == "inc" && v != 1) bad("only the increasing op set (inc1) is implemented");
  }
  if (opt.num_layers < 0 || opt.magnitude < 0 || opt.magnitude_std < 0 || opt.prob < 0 || opt.prob > 1 ||
      opt.magnitude_max <= 0)
    bad("n, m, mstd must be >= 0, p in [0, 1], mmax > 0");
  return opt;
}

double aug_op_argument(AugOp op, double magnitude, int64_t H, int64_t W, Generator& gen) {
  const double level = magnitude / 10.0;
  double arg = 0;
  switch (op) {
    case AugOp::AutoContrast: case AugOp::Equalize: case AugOp::Invert: return 0;
    case AugOp::Rotate: arg = level * 30.0; break;
    case AugOp::Posterize: return 4 - static_cast<int>(level * 4);
    case AugOp::Solarize: return 256 - static_cast<int>(level * 256);
    case AugOp::SolarizeAdd: return static_cast<int>(level * 110);
    case AugOp::Color: case AugOp::Contrast: case AugOp::Brightness: case AugOp::Sharpness:
      arg = level * 0.9;
      break;
    case AugOp::ShearX: case AugOp::ShearY: arg = level * 0.3; break;
    case AugOp::TranslateXRel: arg = level * 0.45; break;
    case AugOp::TranslateYRel: arg = level * 0.45; break;
  }
  if (signed_op(op) && gen.uniform() > 0.5) arg = -arg;
  switch (op) {
    case AugOp::Color: case AugOp::Contrast: case AugOp::Brightness: case AugOp::Sharpness:
      return 1.0 + arg;
    case AugOp::TranslateXRel: return arg * static_cast<double>(W);
    case AugOp::TranslateYRel: return arg * static_cast<double>(H);
    default: return arg;
  }
}

void apply_aug_op(AugOp op, double arg, std::span<uint8_t> img, int64_t H, int64_t W, int64_t C,
                  const std::array<uint8_t, 3>& fill) {
  check_image(aug_op_name(op), img.size(), H, W, C);
  switch (op) {
    case AugOp::AutoContrast: return auto_contrast(img, C);
    case AugOp::Equalize: return equalize(img, C);
    case AugOp::Invert:
      return apply_lut(img, C, same_lut(C, [](int v) { return static_cast<uint8_t>(255 - v); }));
    case AugOp::Posterize: {
      const int bits = static_cast<int>(arg);
      if (bits >= 8) return;
      const int mask = ~((1 << (8 - std::max(bits, 0))) - 1) & 0xFF;
      return apply_lut(img, C, same_lut(C, [&](int v) { return static_cast<uint8_t>(v & mask); }));
    }
    case AugOp::Solarize:
      return apply_lut(img, C, same_lut(C, [&](int v) { return static_cast<uint8_t>(v < arg ? v : 255 - v); }));
    case AugOp::SolarizeAdd:
      return apply_lut(img, C, same_lut(C, [&](int v) {
        return static_cast<uint8_t>(v < 128 ? std::min(255, v + static_cast<int>(arg)) : v);
      }));
    case AugOp::Color: case AugOp::Contrast: case AugOp::Brightness: case AugOp::Sharpness:
      return enhance(op, arg, img, H, W, C);
    case AugOp::Rotate: {
      // PIL rotate(degrees) about (W/2, H/2), counter-clockwise on screen: the output->input map
      // is x_in = cos t (x - cx) - sin t (y - cy) + cx, y_in = sin t (x - cx) + cos t (y - cy) + cy.
      const double t = arg * std::numbers::pi / 180.0, cs = std::cos(t), sn = std::sin(t);
      const double cx = W / 2.0, cy = H / 2.0;
      return affine(img, H, W, C, {cs, -sn, cx - cs * cx + sn * cy, sn, cs, cy - sn * cx - cs * cy}, fill);
    }
    case AugOp::ShearX: return affine(img, H, W, C, {1, arg, 0, 0, 1, 0}, fill);
    case AugOp::ShearY: return affine(img, H, W, C, {1, 0, 0, arg, 1, 0}, fill);
    case AugOp::TranslateXRel: return affine(img, H, W, C, {1, 0, arg, 0, 1, 0}, fill);
    case AugOp::TranslateYRel: return affine(img, H, W, C, {1, 0, 0, 0, 1, arg}, fill);
  }
}

std::vector<AugStep> rand_augment(std::span<uint8_t> img, int64_t H, int64_t W, int64_t C,
                                  const RandAugmentOptions& opt, Generator& gen) {
  check_image("rand_augment", img.size(), H, W, C);
  std::vector<AugStep> steps(static_cast<size_t>(opt.num_layers));
  for (AugStep& s : steps)
    s.op = static_cast<AugOp>(std::min<int>(kNumAugOps - 1, static_cast<int>(gen.uniform() * kNumAugOps)));
  for (AugStep& s : steps) {
    if (opt.prob < 1.0 && gen.uniform() > opt.prob) continue;
    double m = opt.magnitude;
    if (std::isinf(opt.magnitude_std)) m = gen.uniform(0.0, opt.magnitude);
    else if (opt.magnitude_std > 0) m = opt.magnitude + opt.magnitude_std * gen.normal();
    m = std::clamp(m, 0.0, opt.magnitude_max);
    s.arg = aug_op_argument(s.op, m, H, W, gen);
    s.applied = true;
    apply_aug_op(s.op, s.arg, img, H, W, C, opt.fill);
  }
  return steps;
}

void color_jitter(std::span<uint8_t> img, int64_t H, int64_t W, int64_t C, double strength,
                  Generator& gen) {
  check_image("color_jitter", img.size(), H, W, C);
  CNX_CHECK(strength >= 0, "color_jitter: strength must be >= 0, got ", strength);
  if (strength == 0) return;
  std::array<int, 4> order{0, 1, 2, 3};
  for (int i = 3; i > 0; --i)
    std::swap(order[i], order[std::min(i, static_cast<int>(gen.uniform() * (i + 1)))]);
  const double lo = std::max(0.0, 1.0 - strength), hi = 1.0 + strength;
  const double factors[3] = {gen.uniform(lo, hi), gen.uniform(lo, hi), gen.uniform(lo, hi)};
  static constexpr AugOp kOps[3] = {AugOp::Brightness, AugOp::Contrast, AugOp::Color};
  for (int k : order)
    if (k < 3) enhance(kOps[k], factors[k], img, H, W, C);  // k == 3: hue, 0
}

}  // namespace cnx
