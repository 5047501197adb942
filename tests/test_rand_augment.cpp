// RandAugment's ops and its draws, and the colour jitter (train/data/rand_augment.h), each
// against its definition (PIL / timm / torchvision) on small synthetic images: exact values
// computed by hand where the op is a table, exact pixel permutations for the geometric ops at
// whole-pixel offsets, and the draw sequence of the full augmentation.
#include <gtest/gtest.h>

#include <cmath>
#include <vector>

#include "tests/testing.h"
#include "train/data/rand_augment.h"

namespace cnx {
namespace {

using test::random_image;

constexpr std::array<uint8_t, 3> kFill{124, 116, 104};

TEST(RandAugment, ParsesTheOfficialConfig) {
  const RandAugmentOptions o = parse_rand_augment("rand-m9-mstd0.5-inc1");
  EXPECT_EQ(o.num_layers, 2);
  EXPECT_EQ(o.magnitude, 9);
  EXPECT_EQ(o.magnitude_std, 0.5);
  EXPECT_EQ(o.magnitude_max, 10);
  EXPECT_EQ(o.prob, 0.5);
  const RandAugmentOptions p = parse_rand_augment("rand-n3-m7-p1-mmax12-inc1");
  EXPECT_EQ(p.num_layers, 3);
  EXPECT_EQ(p.magnitude, 7);
  EXPECT_EQ(p.prob, 1.0);
  EXPECT_EQ(p.magnitude_max, 12);
  EXPECT_TRUE(std::isinf(parse_rand_augment("rand-m9-mstd101-inc1").magnitude_std));
}

TEST(RandAugment, RefusesWhatItDoesNotImplement) {
  test::expect_error([] { parse_rand_augment("original-mstd0.5"); }, {"--aa original-mstd0.5", "RandAugment"});
  test::expect_error([] { parse_rand_augment("rand-m9-inc0"); }, {"increasing op set"});
  test::expect_error([] { parse_rand_augment("rand-mx"); }, {"'x'", "not a number"});
  test::expect_error([] { parse_rand_augment("rand-q3"); }, {"unknown", "'q3'"});
  test::expect_error([] { parse_rand_augment("rand-m9-p2"); }, {"p in [0, 1]"});
}

TEST(RandAugment, TableOpsMatchTheirDefinitions) {
  const auto img = random_image(5, 7, 3, 1);
  auto run = [&](AugOp op, double arg) {
    auto out = img;
    apply_aug_op(op, arg, out, 5, 7, 3, kFill);
    return out;
  };
  const auto inv = run(AugOp::Invert, 0), sol = run(AugOp::Solarize, 100),
             add = run(AugOp::SolarizeAdd, 60), post = run(AugOp::Posterize, 2),
             post0 = run(AugOp::Posterize, 0);
  for (size_t i = 0; i < img.size(); ++i) {
    const int v = img[i];
    EXPECT_EQ(inv[i], 255 - v);
    EXPECT_EQ(sol[i], v < 100 ? v : 255 - v);
    EXPECT_EQ(add[i], v < 128 ? std::min(255, v + 60) : v);
    EXPECT_EQ(post[i], v & 0xC0);
    EXPECT_EQ(post0[i], 0);
  }
}

TEST(RandAugment, AutoContrastStretchesEachChannel) {
  // Channel 0 spans [50, 100]: v -> int(v * s - 50 * s), s = 255 / 50; channel 1 is constant and
  // channel 2 already spans [0, 255]: both unchanged.
  std::vector<uint8_t> img;
  const int blue[4] = {0, 255, 7, 9};
  for (int i = 0; int v : {50, 60, 75, 100}) {
    img.push_back(static_cast<uint8_t>(v));
    img.push_back(33);
    img.push_back(static_cast<uint8_t>(blue[i++]));
  }
  apply_aug_op(AugOp::AutoContrast, 0, img, 2, 2, 3, kFill);
  // 100 maps to 254, not 255, in PIL too: 100 * 5.1 - 50 * 5.1 = 254.99999999999997 in double.
  const std::vector<uint8_t> want{0, 33, 0, 51, 33, 255, 127, 33, 7, 254, 33, 9};
  EXPECT_EQ(img, want);
}

TEST(RandAugment, EqualizeFollowsPilsHistogramRule) {
  // 1024 pixels, values 10/20/30/40 in equal numbers: step = (1024 - 256) // 255 = 3, n starts at
  // 1 and grows by 256 after each value: 10 -> 1//3 = 0, 20 -> 257//3 = 85, 30 -> 513//3 = 171,
  // 40 -> 769//3 = 256, clipped to 255.
  std::vector<uint8_t> img(1024);
  for (size_t i = 0; i < img.size(); ++i) img[i] = static_cast<uint8_t>(10 * (1 + i % 4));
  apply_aug_op(AugOp::Equalize, 0, img, 32, 32, 1, kFill);
  for (size_t i = 0; i < img.size(); ++i) {
    const int want[4] = {0, 85, 171, 255};
    ASSERT_EQ(img[i], want[i % 4]) << "pixel " << i;
  }
  // One value only: unchanged.
  std::vector<uint8_t> flat(12, 77);
  apply_aug_op(AugOp::Equalize, 0, flat, 2, 2, 3, kFill);
  EXPECT_EQ(flat, std::vector<uint8_t>(12, 77));
}

TEST(RandAugment, EnhanceOpsBlendWithTheirDegenerateImage) {
  const auto img = random_image(4, 6, 3, 2);
  auto run = [&](AugOp op, double f) {
    auto out = img;
    apply_aug_op(op, f, out, 4, 6, 3, kFill);
    return out;
  };
  for (AugOp op : {AugOp::Color, AugOp::Contrast, AugOp::Brightness, AugOp::Sharpness})
    EXPECT_EQ(run(op, 1.0), img) << aug_op_name(op) << " with factor 1 must be the identity";
  EXPECT_EQ(run(AugOp::Brightness, 0.0), std::vector<uint8_t>(img.size(), 0));
  const auto half = run(AugOp::Brightness, 0.5);
  const auto grey = run(AugOp::Color, 0.0);
  const auto flat = run(AugOp::Contrast, 0.0);
  double mean = 0;
  for (size_t p = 0; p < img.size() / 3; ++p) {
    const uint8_t* q = &img[p * 3];
    const int L = static_cast<int>((q[0] * 19595u + q[1] * 38470u + q[2] * 7471u + 0x8000u) >> 16);
    mean += L;
    for (int c = 0; c < 3; ++c) {
      EXPECT_EQ(half[p * 3 + c], static_cast<int>(q[c] * 0.5));  // truncated, as PIL
      EXPECT_EQ(grey[p * 3 + c], L);
    }
  }
  mean = std::floor(mean / (img.size() / 3) + 0.5);
  for (uint8_t v : flat) EXPECT_EQ(v, mean);
  // Sharpness keeps the border, and a constant image whatever the factor.
  const auto sharp = run(AugOp::Sharpness, 1.9);
  for (int64_t x = 0; x < 6 * 3; ++x) EXPECT_EQ(sharp[x], img[x]);
  std::vector<uint8_t> constant(4 * 6 * 3, 90);
  apply_aug_op(AugOp::Sharpness, 1.9, constant, 4, 6, 3, kFill);
  EXPECT_EQ(constant, std::vector<uint8_t>(4 * 6 * 3, 90));
}

TEST(RandAugment, GeometricOpsMoveWholePixels) {
  const int64_t H = 6, W = 6, C = 3;
  const auto img = random_image(H, W, C, 3);
  auto px = [&](const std::vector<uint8_t>& v, int64_t y, int64_t x, int64_t c) {
    return static_cast<int>(v[(y * W + x) * C + c]);
  };
  auto run = [&](AugOp op, double arg) {
    auto out = img;
    apply_aug_op(op, arg, out, H, W, C, kFill);
    return out;
  };
  const auto tx = run(AugOp::TranslateXRel, 2), ty = run(AugOp::TranslateYRel, -1),
             rot = run(AugOp::Rotate, 90), shear0 = run(AugOp::ShearX, 0);
  EXPECT_EQ(shear0, img);
  for (int64_t y = 0; y < H; ++y)
    for (int64_t x = 0; x < W; ++x)
      for (int64_t c = 0; c < C; ++c) {
        // out(y, x) = in(y, x + 2); past the right edge: the fill.
        EXPECT_EQ(px(tx, y, x, c), x + 2 < W ? px(img, y, x + 2, c) : kFill[c]) << y << "," << x;
        EXPECT_EQ(px(ty, y, x, c), y - 1 >= 0 ? px(img, y - 1, x, c) : kFill[c]) << y << "," << x;
        // 90 degrees counter-clockwise: the top-right corner comes to the top-left.
        EXPECT_EQ(px(rot, y, x, c), px(img, x, W - 1 - y, c)) << y << "," << x;
      }
  // A shear of 0.5 along x: row y samples x + 0.5 (y + 0.5); at y = 1 that is x + 0.75, not a
  // whole pixel: some values differ, the fill appears only on the right.
  const auto sh = run(AugOp::ShearX, 0.5);
  for (int64_t c = 0; c < C; ++c) EXPECT_EQ(px(sh, H - 1, W - 1, c), kFill[c]);
}

TEST(RandAugment, ArgumentsFollowTheLevelTable) {
  Generator gen(5);
  for (int trial = 0; trial < 50; ++trial) {
    const double r = aug_op_argument(AugOp::Rotate, 9, 10, 20, gen);
    EXPECT_NEAR(std::abs(r), 27.0, 1e-12);
    const double f = aug_op_argument(AugOp::Color, 9, 10, 20, gen);
    EXPECT_TRUE(std::abs(f - 1.81) < 1e-12 || std::abs(f - 0.19) < 1e-12) << f;
    EXPECT_NEAR(std::abs(aug_op_argument(AugOp::TranslateXRel, 10, 10, 20, gen)), 0.45 * 20, 1e-12);
    EXPECT_NEAR(std::abs(aug_op_argument(AugOp::TranslateYRel, 10, 10, 20, gen)), 0.45 * 10, 1e-12);
    EXPECT_NEAR(std::abs(aug_op_argument(AugOp::ShearY, 5, 10, 20, gen)), 0.15, 1e-12);
  }
  Generator g(1);
  EXPECT_EQ(aug_op_argument(AugOp::Posterize, 9, 8, 8, g), 1);   // 4 - int(3.6)
  EXPECT_EQ(aug_op_argument(AugOp::Solarize, 9, 8, 8, g), 26);   // 256 - int(230.4)
  EXPECT_EQ(aug_op_argument(AugOp::SolarizeAdd, 9, 8, 8, g), 99);  // int(99.0)
  EXPECT_EQ(g.offset(), 0u) << "unsigned ops draw nothing";
}

TEST(RandAugment, DrawsInTimmsOrder) {
  // With prob 1 and mstd 0 the layers are: 2 op choices, then per layer (no skip draw with
  // prob 1) only the sign of the signed ops. Replay the draws by hand.
  RandAugmentOptions opt;
  opt.prob = 1.0;
  opt.magnitude_std = 0;
  auto img = random_image(8, 8, 3, 4);
  Generator gen(77), replay(77);
  const auto steps = rand_augment(img, 8, 8, 3, opt, gen);
  ASSERT_EQ(steps.size(), 2u);
  for (const AugStep& s : steps)
    EXPECT_EQ(static_cast<int>(s.op), static_cast<int>(replay.uniform() * kNumAugOps));
  for (const AugStep& s : steps) {
    EXPECT_TRUE(s.applied);
    EXPECT_EQ(s.arg, aug_op_argument(s.op, 9, 8, 8, replay));
  }
  EXPECT_EQ(gen.offset(), replay.offset());
}

TEST(RandAugment, OpsAreUniformAndAppliedHalfTheTime) {
  RandAugmentOptions opt;  // the official rand-m9-mstd0.5-inc1
  std::vector<int> count(kNumAugOps, 0);
  int applied = 0, layers = 0;
  Generator gen(9);
  for (int i = 0; i < 3000; ++i) {
    auto img = random_image(4, 4, 3, static_cast<uint64_t>(i));
    for (const AugStep& s : rand_augment(img, 4, 4, 3, opt, gen)) {
      ++count[static_cast<int>(s.op)];
      applied += s.applied;
      ++layers;
    }
  }
  for (int k = 0; k < kNumAugOps; ++k)  // 6000 layers: 400 expected, sd ~19
    EXPECT_NEAR(count[k], 400, 100) << aug_op_name(static_cast<AugOp>(k));
  EXPECT_NEAR(static_cast<double>(applied) / layers, 0.5, 0.03);
}

TEST(RandAugment, SameGeneratorSameImage) {
  RandAugmentOptions opt;
  auto a = random_image(16, 12, 3, 6), b = a;
  Generator g1(123), g2(123);
  for (int i = 0; i < 20; ++i) {
    rand_augment(a, 16, 12, 3, opt, g1);
    rand_augment(b, 16, 12, 3, opt, g2);
  }
  EXPECT_EQ(a, b);
}

TEST(ColorJitter, GreyImageOnlyChangesBrightness) {
  // A uniform grey image: contrast (blend with its own mean) and saturation (blend with its own
  // grey) change nothing, so the result is clamp_trunc(v * brightness) whatever the order. The
  // brightness factor is the 4th uniform (after the permutation's 3).
  for (uint64_t seed = 0; seed < 20; ++seed) {
    std::vector<uint8_t> img(5 * 4 * 3, 100);
    Generator gen(seed), replay(seed);
    color_jitter(img, 5, 4, 3, 0.4, gen);
    for (int i = 0; i < 3; ++i) replay.uniform();
    const double b = replay.uniform(0.6, 1.4);
    for (int i = 0; i < 2; ++i) replay.uniform();
    EXPECT_EQ(gen.offset(), replay.offset());
    for (uint8_t v : img) ASSERT_EQ(v, static_cast<int>(std::min(255.0, 100 * b))) << "seed " << seed;
  }
  std::vector<uint8_t> img = random_image(3, 3, 3, 1), before = img;
  Generator gen(1);
  color_jitter(img, 3, 3, 3, 0.0, gen);
  EXPECT_EQ(img, before);
  EXPECT_EQ(gen.offset(), 0u);
}

TEST(ColorJitter, ChangesColourImages) {
  int changed = 0;
  for (uint64_t seed = 0; seed < 10; ++seed) {
    auto img = random_image(6, 6, 3, seed), before = img;
    Generator gen(seed);
    color_jitter(img, 6, 6, 3, 0.4, gen);
    changed += img != before;
  }
  EXPECT_GE(changed, 9);
}

}  // namespace
}  // namespace cnx
