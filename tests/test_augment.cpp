// The augmentation primitives of train/data/augment.h, each against its definition (torchvision
// / timm) on small synthetic images.
#include <gtest/gtest.h>

#include <cmath>
#include <numeric>
#include <vector>

#include "tensor/error.h"
#include "tests/testing.h"
#include "train/data/augment.h"

namespace cnx {
namespace {

using test::random_image;

std::vector<float> random_floats(int64_t n, uint64_t seed) {
  Generator gen(seed);
  std::vector<float> v(static_cast<size_t>(n));
  for (auto& x : v) x = static_cast<float>(gen.normal());
  return v;
}

// ---- RandomResizedCrop -----------------------------------------------------------------------

TEST(RandomResizedCrop, BoxInsideWithScaleAndAspectInRange) {
  for (auto [H, W] : {std::pair<int64_t, int64_t>{64, 64}, {48, 80}, {97, 33}}) {
    Generator gen(7);
    const double area = static_cast<double>(H * W);
    for (int i = 0; i < 2000; ++i) {
      const CropBox b = random_resized_crop_box(H, W, gen);
      ASSERT_GE(b.top, 0);
      ASSERT_GE(b.left, 0);
      ASSERT_GT(b.height, 0);
      ASSERT_GT(b.width, 0);
      ASSERT_LE(b.top + b.height, H);
      ASSERT_LE(b.left + b.width, W);
      // w and h are each rounded from sqrt(target_area * aspect^{+-1}): allow half a pixel of
      // rounding on each side (the exact bounds hold before rounding).
      const double h = static_cast<double>(b.height), w = static_cast<double>(b.width);
      EXPECT_GE((h + 0.5) * (w + 0.5), 0.08 * area)
          << H << "x" << W << " box " << b.height << "x" << b.width;
      EXPECT_LE(h * w, area);
      EXPECT_GE((w + 0.5) / (h - 0.5), 3.0 / 4.0);
      EXPECT_LE((w - 0.5) / (h + 0.5), 4.0 / 3.0);
    }
  }
}

TEST(RandomResizedCrop, SmallCropsAreRare) {
  // On a large image the rounding is negligible: fractions in [0.08, 1], aspects in [3/4, 4/3]
  // to 1%, and the mean fraction near the mean of U(0.08, 1) (attempts rejected when w or h
  // exceeds the side pull it down a bit, so only a loose check).
  Generator gen(11);
  double sum = 0;
  const int n = 4000;
  for (int i = 0; i < n; ++i) {
    const CropBox b = random_resized_crop_box(1000, 1000, gen);
    const double frac = static_cast<double>(b.height * b.width) / 1e6;
    const double aspect = static_cast<double>(b.width) / static_cast<double>(b.height);
    ASSERT_GE(frac, 0.08 * 0.99);
    ASSERT_LE(frac, 1.0);
    ASSERT_GE(aspect, 0.75 * 0.99);
    ASSERT_LE(aspect, 4.0 / 3.0 * 1.01);
    sum += frac;
  }
  EXPECT_GT(sum / n, 0.35);
  EXPECT_LT(sum / n, 0.56);
}

TEST(RandomResizedCrop, FallbackCentralCropOnExtremeAspect) {
  // 200 x 4: every attempt has w >= round(sqrt(0.08 * 800 * 3/4)) = 7 > 4, so the fallback:
  // w = 4, h = round(4 / (3/4)) = 5, at ((200 - 5) / 2, 0).
  Generator gen(3);
  for (int i = 0; i < 50; ++i)
    EXPECT_EQ(random_resized_crop_box(200, 4, gen), (CropBox{97, 0, 5, 4}));
  // 4 x 200: h = 4, w = round(4 * 4/3) = 5, at (0, (200 - 5) / 2).
  for (int i = 0; i < 50; ++i)
    EXPECT_EQ(random_resized_crop_box(4, 200, gen), (CropBox{0, 97, 4, 5}));
  // The fallback draws 10 attempts (4 words each) and nothing more.
  Generator g2(5);
  random_resized_crop_box(200, 4, g2);
  EXPECT_EQ(g2.offset(), 40u);
}

TEST(RandomResizedCrop, Deterministic) {
  const auto img = random_image(40, 50, 3, 1);
  Generator a(99), b(99), c(100);
  const auto ra = random_resized_crop(img, 40, 50, 3, 16, a);
  const auto rb = random_resized_crop(img, 40, 50, 3, 16, b);
  const auto rc = random_resized_crop(img, 40, 50, 3, 16, c);
  EXPECT_EQ(ra, rb);
  EXPECT_EQ(a.offset(), b.offset());
  EXPECT_NE(ra, rc);
  EXPECT_EQ(ra.size(), 16u * 16u * 3u);
}

// ---- bicubic resize --------------------------------------------------------------------------

TEST(ResizeBicubic, ConstantStaysConstant) {
  std::vector<uint8_t> img(23 * 31 * 3);
  for (size_t i = 0; i < img.size(); ++i) img[i] = static_cast<uint8_t>(10 + 100 * (i % 3));
  for (auto [oh, ow] : {std::pair<int64_t, int64_t>{7, 5}, {50, 61}, {23, 31}, {1, 1}}) {
    const auto out = resize_bicubic(img, 23, 31, 3, {2, 3, 17, 20}, oh, ow);
    ASSERT_EQ(out.size(), static_cast<size_t>(oh * ow * 3));
    for (size_t i = 0; i < out.size(); ++i) ASSERT_EQ(out[i], 10 + 100 * (i % 3)) << i;
  }
}

TEST(ResizeBicubic, IdentitySizeIsIdentity) {
  const auto img = random_image(13, 17, 3, 2);
  EXPECT_EQ(resize_bicubic(img, 13, 17, 3, {0, 0, 13, 17}, 13, 17), img);
  // A box resized to its own size is the box.
  const CropBox box{3, 4, 6, 9};
  const auto out = resize_bicubic(img, 13, 17, 3, box, 6, 9);
  for (int64_t y = 0; y < 6; ++y)
    for (int64_t x = 0; x < 9; ++x)
      for (int64_t c = 0; c < 3; ++c)
        ASSERT_EQ(out[(y * 9 + x) * 3 + c], img[((y + 3) * 17 + x + 4) * 3 + c]);
}

TEST(ResizeBicubic, LinearRampIsReproduced) {
  // v(x) = 20 + 5 x (pixel centres at x + 0.5). Cubic convolution with a = -0.5 reproduces
  // linear functions exactly where all 4 taps are inside; near the borders the renormalised
  // taps bend it a little, so only the interior is checked (to the uint8 rounding, 0.5, plus the
  // float intermediate).
  const int64_t H = 4, W = 40;
  std::vector<uint8_t> img(H * W);
  for (int64_t y = 0; y < H; ++y)
    for (int64_t x = 0; x < W; ++x) img[y * W + x] = static_cast<uint8_t>(20 + 5 * x);
  for (int64_t ow : {25, 40, 73}) {
    const auto out = resize_bicubic(img, H, W, 1, {0, 0, H, W}, 3, ow);
    const double scale = static_cast<double>(W) / static_cast<double>(ow);
    for (int64_t y = 0; y < 3; ++y)
      for (int64_t x = 0; x < ow; ++x) {
        const double src = (static_cast<double>(x) + 0.5) * scale - 0.5;  // in pixel indices
        if (src < 2.5 || src > static_cast<double>(W) - 3.5) continue;
        EXPECT_NEAR(out[y * ow + x], 20 + 5 * src, 0.5 + 1e-4) << "ow " << ow << " x " << x;
      }
  }
}

TEST(ResizeBicubic, ClampsAndRejectsBadBoxes) {
  // An edge 0 | 255 overshoots with a = -0.5: the result must be clamped, not wrapped.
  std::vector<uint8_t> img(1 * 8);
  for (int64_t x = 4; x < 8; ++x) img[x] = 255;
  const auto out = resize_bicubic(img, 1, 8, 1, {0, 0, 1, 8}, 1, 29);
  EXPECT_EQ(out.front(), 0);
  EXPECT_EQ(out.back(), 255);
  test::expect_error(
      [&] {
        resize_bicubic(img, 1, 8, 1, {0, 2, 1, 7}, 1, 4);
      },
      {"resize_bicubic", "box"});
  test::expect_error(
      [&] {
        resize_bicubic(img, 2, 8, 1, {0, 0, 1, 8}, 1, 4);
      },
      {"resize_bicubic", "buffer"});
}

// ---- flip ------------------------------------------------------------------------------------

TEST(Flip, MirrorsRowsKeepingChannels) {
  for (int64_t W : {1, 4, 5}) {
    const auto img = random_image(3, W, 3, static_cast<uint64_t>(W));
    auto f = img;
    hflip(std::span<uint8_t>(f), 3, W, 3);
    for (int64_t y = 0; y < 3; ++y)
      for (int64_t x = 0; x < W; ++x)
        for (int64_t c = 0; c < 3; ++c)
          ASSERT_EQ(f[(y * W + x) * 3 + c], img[(y * W + W - 1 - x) * 3 + c]);
    hflip(std::span<uint8_t>(f), 3, W, 3);
    EXPECT_EQ(f, img);
  }
  auto fl = random_floats(2 * 3 * 2, 4);
  const auto orig = fl;
  hflip(std::span<float>(fl), 2, 3, 2);
  EXPECT_EQ(fl[0], orig[4]);
  EXPECT_EQ(fl[1], orig[5]);
  EXPECT_EQ(fl[2], orig[2]);
}

TEST(Flip, RandomFlipProbabilityAndDeterminism) {
  const auto img = random_image(2, 3, 1, 5);
  Generator gen(12);
  int flips = 0;
  const int n = 10000;
  for (int i = 0; i < n; ++i) {
    auto f = img;
    const uint64_t before = gen.offset();
    const bool did = random_hflip(f, 2, 3, 1, gen);
    ASSERT_EQ(gen.offset(), before + 2);  // one uniform, always
    auto want = img;
    if (did) hflip(std::span<uint8_t>(want), 2, 3, 1);
    ASSERT_EQ(f, want);
    flips += did;
  }
  EXPECT_NEAR(flips / static_cast<double>(n), 0.5, 0.02);  // 4 sigma
  Generator never(1), always(1);
  auto f = img;
  EXPECT_FALSE(random_hflip(f, 2, 3, 1, never, 0.0));
  EXPECT_TRUE(random_hflip(f, 2, 3, 1, always, 1.0));
  Generator a(77), b(77);
  for (int i = 0; i < 20; ++i) {
    auto fa = img, fb = img;
    EXPECT_EQ(random_hflip(fa, 2, 3, 1, a), random_hflip(fb, 2, 3, 1, b));
  }
}

// ---- evaluation transform --------------------------------------------------------------------

TEST(EvalTransform, ResizeSizes) {
  EXPECT_EQ(default_crop_pct(224), 0.875);
  EXPECT_EQ(default_crop_pct(383), 0.875);
  EXPECT_EQ(default_crop_pct(384), 1.0);
  EXPECT_EQ(eval_resize_size(224, 0.875), 256);
  EXPECT_EQ(eval_resize_size(384, 1.0), 384);
  EXPECT_EQ(eval_resize_size(32, 0.875), 36);  // int(36.57...)
  EXPECT_EQ(eval_resize_size(224, default_crop_pct(224)), 256);
  test::expect_error([] { eval_resize_size(224, 0.0); }, {"eval_resize_size", "crop_pct"});
}

TEST(EvalTransform, CenterCropBox) {
  EXPECT_EQ(center_crop_box(256, 256, 224, 224), (CropBox{16, 16, 224, 224}));
  EXPECT_EQ(center_crop_box(256, 341, 224, 224), (CropBox{16, 58, 224, 224}));  // round(58.5) = 58
  EXPECT_EQ(center_crop_box(5, 8, 2, 5), (CropBox{2, 2, 2, 5}));  // round(1.5) = 2, round(1.5) = 2
  EXPECT_EQ(center_crop_box(7, 7, 7, 7), (CropBox{0, 0, 7, 7}));
  test::expect_error([] { center_crop_box(5, 5, 6, 5); }, {"center_crop_box", "does not fit"});
}

TEST(EvalTransform, ResizeShorterSideThenCenterCrop) {
  // 36 x 36 at input 32 (crop_pct 0.875: resize to int(32 / 0.875) = 36, i.e. none), then the
  // central 32 x 32 at (2, 2).
  const auto img = random_image(36, 36, 3, 8);
  const auto out = eval_transform(img, 36, 36, 3, 32);
  ASSERT_EQ(out.size(), 32u * 32u * 3u);
  for (int64_t y = 0; y < 32; ++y)
    for (int64_t x = 0; x < 32; ++x)
      for (int64_t c = 0; c < 3; ++c)
        ASSERT_EQ(out[(y * 32 + x) * 3 + c], img[((y + 2) * 36 + x + 2) * 3 + c]);
  // A 20 x 50 image at input 16: shorter side 20 -> 18, longer int(18 * 50 / 20) = 45; the crop
  // is the 16 x 16 at (1, round(14.5) = 14) of that resize.
  const auto wide = random_image(20, 50, 3, 9);
  const auto resized = resize_bicubic(wide, 20, 50, 3, {0, 0, 20, 50}, 18, 45);
  const auto ow = eval_transform(wide, 20, 50, 3, 16);
  for (int64_t y = 0; y < 16; ++y)
    for (int64_t x = 0; x < 16; ++x)
      for (int64_t c = 0; c < 3; ++c)
        ASSERT_EQ(ow[(y * 16 + x) * 3 + c], resized[((y + 1) * 45 + x + 14) * 3 + c]);
  // A constant image stays constant.
  const std::vector<uint8_t> flat(30 * 40 * 3, 77);
  for (uint8_t v : eval_transform(flat, 30, 40, 3, 24)) ASSERT_EQ(v, 77);
  // crop_pct 1.0 given: shorter side to the input size, then the central square.
  const auto o1 = eval_transform(wide, 20, 50, 3, 20, 1.0);
  for (int64_t y = 0; y < 20; ++y)
    for (int64_t x = 0; x < 20; ++x) ASSERT_EQ(o1[(y * 20 + x) * 3], wide[(y * 50 + x + 15) * 3]);
}

TEST(EvalTransform, WarpsAt384AndAbove) {
  // The official default at >= 384 warps the whole image (no crop): a horizontal ramp keeps its
  // ends.
  const int64_t H = 8, W = 500;
  std::vector<uint8_t> img(H * W);
  for (int64_t y = 0; y < H; ++y)
    for (int64_t x = 0; x < W; ++x) img[y * W + x] = static_cast<uint8_t>(x / 2);
  const auto out = eval_transform(img, H, W, 1, 384);
  ASSERT_EQ(out.size(), 384u * 384u);
  EXPECT_EQ(out, resize_bicubic(img, H, W, 1, {0, 0, H, W}, 384, 384));
  EXPECT_LE(out[0], 2);
  EXPECT_GE(out[383], 247);
}

// ---- Gamma / Beta ----------------------------------------------------------------------------

TEST(Mixup, GammaAndBetaMoments) {
  Generator gen(2024);
  const int n = 20000;
  for (double shape : {0.8, 1.0, 3.5}) {
    double s = 0, s2 = 0;
    for (int i = 0; i < n; ++i) {
      const double g = sample_gamma(shape, gen);
      ASSERT_GT(g, 0.0);
      s += g;
      s2 += g * g;
    }
    const double mean = s / n, var = s2 / n - mean * mean;
    // Gamma(k, 1): mean k, variance k; the mean's standard error is sqrt(k / n).
    EXPECT_NEAR(mean, shape, 5 * std::sqrt(shape / n)) << shape;
    EXPECT_NEAR(var, shape, 0.1 * shape) << shape;
  }
  for (auto [a, b] : {std::pair<double, double>{0.8, 0.8}, {1.0, 1.0}, {2.0, 5.0}}) {
    double s = 0, s2 = 0;
    for (int i = 0; i < n; ++i) {
      const double x = sample_beta(a, b, gen);
      ASSERT_GE(x, 0.0);
      ASSERT_LE(x, 1.0);
      s += x;
      s2 += x * x;
    }
    const double mean = s / n, var = s2 / n - mean * mean;
    const double want_mean = a / (a + b), want_var = a * b / ((a + b) * (a + b) * (a + b + 1));
    EXPECT_NEAR(mean, want_mean, 5 * std::sqrt(want_var / n)) << a << "," << b;
    EXPECT_NEAR(var, want_var, 0.05 * want_var) << a << "," << b;
  }
}

// ---- Mixup / CutMix --------------------------------------------------------------------------

struct MixBatch {
  int64_t N = 4, H = 6, W = 7, C = 3, K = 5;
  std::vector<float> x;
  std::vector<int64_t> labels{0, 3, 3, 1};
  MixBatch() : x(random_floats(4 * 6 * 7 * 3, 31)) {}
};

void expect_targets(const MixupResult& r, const std::vector<int64_t>& labels, int64_t K,
                    double smoothing) {
  const auto N = static_cast<int64_t>(labels.size());
  ASSERT_EQ(r.targets.size(), static_cast<size_t>(N * K));
  const double off = smoothing / static_cast<double>(K), on = 1.0 - smoothing + off;
  for (int64_t i = 0; i < N; ++i) {
    double sum = 0;
    for (int64_t k = 0; k < K; ++k) {
      const double y1 = k == labels[i] ? on : off, y2 = k == labels[N - 1 - i] ? on : off;
      const float want = static_cast<float>(y1 * r.lam + y2 * (1.0 - r.lam));
      EXPECT_EQ(r.targets[i * K + k], want) << i << "," << k;
      sum += r.targets[i * K + k];
    }
    EXPECT_NEAR(sum, 1.0, 1e-6);
  }
}

TEST(Mixup, MixupPixelsAndTargets) {
  MixBatch b;
  MixupOptions opt;
  opt.cutmix_alpha = 0.0;  // Mixup only
  opt.num_classes = b.K;
  Generator gen(5);
  const MixupResult r = mixup_cutmix(b.x, b.labels, b.N, b.H, b.W, b.C, gen, opt);
  EXPECT_FALSE(r.cutmix);
  EXPECT_GT(r.lam, 0.0);
  EXPECT_LT(r.lam, 1.0);
  const int64_t per = b.H * b.W * b.C;
  const auto la = static_cast<float>(r.lam), lb = static_cast<float>(1.0 - r.lam);
  for (int64_t i = 0; i < b.N; ++i)
    for (int64_t k = 0; k < per; ++k)
      ASSERT_EQ(r.images[i * per + k], b.x[i * per + k] * la + b.x[(b.N - 1 - i) * per + k] * lb);
  expect_targets(r, b.labels, b.K, 0.1);
  // The draws: prob (one uniform), then Beta; no switch draw with only Mixup on.
  Generator g2(5);
  g2.uniform();
  EXPECT_EQ(r.lam, sample_beta(0.8, 0.8, g2));
}

TEST(Mixup, CutMixBoxFromFlippedBatchAndCorrectedLambda) {
  MixBatch b;
  MixupOptions opt;
  opt.mixup_alpha = 0.0;  // CutMix only
  opt.num_classes = b.K;
  int nonempty = 0;
  for (uint64_t seed = 0; seed < 40; ++seed) {
    Generator gen(seed);
    const MixupResult r = mixup_cutmix(b.x, b.labels, b.N, b.H, b.W, b.C, gen, opt);
    ASSERT_TRUE(r.cutmix);
    const CropBox& box = r.box;
    ASSERT_GE(box.top, 0);
    ASSERT_GE(box.left, 0);
    ASSERT_LE(box.top + box.height, b.H);
    ASSERT_LE(box.left + box.width, b.W);
    EXPECT_DOUBLE_EQ(
        r.lam, 1.0 - static_cast<double>(box.height * box.width) / static_cast<double>(b.H * b.W));
    nonempty += box.height * box.width > 0;
    for (int64_t i = 0; i < b.N; ++i)
      for (int64_t y = 0; y < b.H; ++y)
        for (int64_t x = 0; x < b.W; ++x) {
          const bool in =
              y >= box.top && y < box.top + box.height && x >= box.left && x < box.left + box.width;
          const int64_t src = in ? b.N - 1 - i : i;
          for (int64_t c = 0; c < b.C; ++c)
            ASSERT_EQ(r.images[((i * b.H + y) * b.W + x) * b.C + c],
                      b.x[((src * b.H + y) * b.W + x) * b.C + c]);
        }
    expect_targets(r, b.labels, b.K, 0.1);
  }
  EXPECT_GT(nonempty, 20);
}

TEST(Mixup, DefaultsSwitchBetweenBothAndAreDeterministic) {
  MixBatch b;
  MixupOptions opt;  // mixup 0.8, cutmix 1.0, prob 1, switch 0.5, smoothing 0.1
  opt.num_classes = b.K;
  EXPECT_EQ(MixupOptions{}.num_classes, 1000);
  int cutmix = 0;
  const int n = 400;
  for (int s = 0; s < n; ++s) {
    Generator g1(1000 + s), g2(1000 + s);
    const MixupResult r1 = mixup_cutmix(b.x, b.labels, b.N, b.H, b.W, b.C, g1, opt);
    const MixupResult r2 = mixup_cutmix(b.x, b.labels, b.N, b.H, b.W, b.C, g2, opt);
    ASSERT_EQ(r1.images, r2.images);
    ASSERT_EQ(r1.targets, r2.targets);
    ASSERT_EQ(r1.lam, r2.lam);
    cutmix += r1.cutmix;
  }
  EXPECT_NEAR(cutmix / static_cast<double>(n), 0.5, 0.1);  // 4 sigma
  // prob 0: nothing mixed, targets are the smoothed one-hots, one uniform drawn.
  opt.prob = 0.0;
  Generator g(3);
  const MixupResult r = mixup_cutmix(b.x, b.labels, b.N, b.H, b.W, b.C, g, opt);
  EXPECT_EQ(r.lam, 1.0);
  EXPECT_EQ(r.images, b.x);
  EXPECT_EQ(g.offset(), 2u);
  expect_targets(r, b.labels, b.K, 0.1);
  EXPECT_FLOAT_EQ(r.targets[0], 0.92f);  // on = 1 - 0.1 + 0.1 / 5
  EXPECT_FLOAT_EQ(r.targets[1], 0.02f);
}

TEST(Mixup, RejectsBadInput) {
  MixBatch b;
  MixupOptions opt;
  opt.num_classes = b.K;
  Generator gen(1);
  test::expect_error(
      [&] {
        mixup_cutmix(std::span<const float>(b.x).first(3 * 6 * 7 * 3), {b.labels.data(), 3}, 3, 6,
                     7, 3, gen, opt);
      },
      {"mixup_cutmix", "even"});
  std::vector<int64_t> bad{0, 5, 1, 1};
  test::expect_error([&] { mixup_cutmix(b.x, bad, 4, 6, 7, 3, gen, opt); },
                     {"mixup_cutmix", "label 5", "[0, 5)"});
}

// ---- Random Erasing --------------------------------------------------------------------------

TEST(RandomErasing, AreaProbabilityAndUntouchedRest) {
  const int64_t H = 24, W = 20, C = 3;
  const double area = static_cast<double>(H * W);
  const auto img = random_floats(H * W * C, 17);
  Generator gen(42);
  int applied = 0;
  const int n = 4000;
  for (int t = 0; t < n; ++t) {
    auto e = img;
    const CropBox b = random_erasing(e, H, W, C, gen);
    if (b.height == 0) {
      ASSERT_EQ(e, img);
      continue;
    }
    ++applied;
    ASSERT_GE(b.top, 0);
    ASSERT_GE(b.left, 0);
    ASSERT_LT(b.height, H);
    ASSERT_LT(b.width, W);
    ASSERT_LE(b.top + b.height, H);
    ASSERT_LE(b.left + b.width, W);
    // h, w are rounded from sqrt(target * aspect^{+-1}) with target / area in [0.02, 1/3]:
    // |h w - target| <= (h + w + 1) / 2 + 1/4.
    const double hw = static_cast<double>(b.height * b.width);
    const double slack = 0.5 * static_cast<double>(b.height + b.width + 1) + 0.25;
    EXPECT_GE(hw + slack, 0.02 * area);
    EXPECT_LE(hw - slack, area / 3.0);
    for (int64_t y = 0; y < H; ++y)
      for (int64_t x = 0; x < W; ++x) {
        const bool in = y >= b.top && y < b.top + b.height && x >= b.left && x < b.left + b.width;
        for (int64_t c = 0; c < C; ++c) {
          const size_t k = static_cast<size_t>((y * W + x) * C + c);
          if (in)
            ASSERT_NE(e[k], img[k]);  // a fresh normal draw (equal with probability 0)
          else
            ASSERT_EQ(e[k], img[k]);
        }
      }
  }
  // Binomial(4000, 0.25): sd 0.0068; 4 sigma. On a 24 x 20 image some applications fail all
  // 10 attempts only when h or w reaches the side: rare (h <= sqrt(area/3 * 3.33) = 23 < 24).
  EXPECT_NEAR(applied / static_cast<double>(n), 0.25, 0.028);
}

TEST(RandomErasing, PixelValuesAreStandardNormalAndDeterministic) {
  const int64_t H = 64, W = 64, C = 3;
  const std::vector<float> zeros(H * W * C, 0.0f);
  RandomErasingOptions opt;
  opt.probability = 1.0;
  double s = 0, s2 = 0;
  int64_t count = 0;
  for (uint64_t seed = 0; seed < 20; ++seed) {
    auto a = zeros, b = zeros;
    Generator ga(seed), gb(seed);
    const CropBox ba = random_erasing(a, H, W, C, ga, opt);
    const CropBox bb = random_erasing(b, H, W, C, gb, opt);
    ASSERT_EQ(ba, bb);
    ASSERT_EQ(a, b);
    ASSERT_GT(ba.height, 0);
    for (float v : a)
      if (v != 0.0f) {
        s += v;
        s2 += static_cast<double>(v) * v;
        ++count;
      }
  }
  ASSERT_GT(count, 2000);
  const double mean = s / static_cast<double>(count);
  EXPECT_NEAR(mean, 0.0, 5 / std::sqrt(static_cast<double>(count)));
  EXPECT_NEAR(s2 / static_cast<double>(count) - mean * mean, 1.0, 0.05);
  // probability 0: one uniform drawn, nothing changed.
  opt.probability = 0.0;
  auto z = zeros;
  Generator g(1);
  EXPECT_EQ(random_erasing(z, H, W, C, g, opt).height, 0);
  EXPECT_EQ(z, zeros);
  EXPECT_EQ(g.offset(), 2u);
}

}  // namespace
}  // namespace cnx
