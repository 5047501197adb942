// ImageFolder (train/data/image_folder.h): the listing of a small class tree written here
// (classes sorted, labels, sample order, hidden files ignored), JPEG decoding of images made
// with tjCompress2 (RGB, grayscale, CMYK; sizes, colours within JPEG error, orientation), every
// bad input (zero bytes, text named .jpg, random bytes, PNG, truncated in the header and in the
// data, missing files and folders, empty class folder, train/val class mismatch) and the
// DecodeStats threshold and its message.
#include <gtest/gtest.h>
#include <stdlib.h>
#include <turbojpeg.h>
#include <unistd.h>

#include <algorithm>
#include <array>
#include <cstdint>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <random>
#include <string>
#include <thread>
#include <vector>

#include "tests/testing.h"
#include "train/data/image_folder.h"

using namespace cnx;
using cnx::test::expect_error;
namespace fs = std::filesystem;

namespace {

using Bytes = std::vector<uint8_t>;

// A JPEG of `w` x `h` pixels in pixel format `pf` (TJPF_RGB, TJPF_GRAY or TJPF_CMYK).
Bytes encode(const std::vector<uint8_t>& px, int w, int h, int pf, int subsamp, int quality) {
  tjhandle tj = tjInitCompress();
  EXPECT_NE(tj, nullptr);
  unsigned char* jpeg = nullptr;
  unsigned long size = 0;
  const int r = tjCompress2(tj, px.data(), w, 0, h, pf, &jpeg, &size, subsamp, quality, 0);
  EXPECT_EQ(r, 0) << tjGetErrorStr2(tj);
  Bytes out(jpeg, jpeg + size);
  tjFree(jpeg);
  tjDestroy(tj);
  return out;
}

Bytes solid_rgb(int w, int h, uint8_t r, uint8_t g, uint8_t b) {
  std::vector<uint8_t> px;
  for (int i = 0; i < w * h; ++i) px.insert(px.end(), {r, g, b});
  return encode(px, w, h, TJPF_RGB, TJSAMP_444, 95);
}

Bytes solid_gray(int w, int h, uint8_t v) {
  return encode(std::vector<uint8_t>(size_t(w) * h, v), w, h, TJPF_GRAY, TJSAMP_GRAY, 95);
}

// Adobe's inverted CMYK of an RGB colour (libjpeg-turbo's cmyk.h, rgb_to_cmyk).
std::array<uint8_t, 4> rgb_to_cmyk(uint8_t r, uint8_t g, uint8_t b) {
  double c = 1 - r / 255.0, m = 1 - g / 255.0, y = 1 - b / 255.0;
  const double k = std::min({c, m, y});
  if (k == 1) {
    c = m = y = 0;
  } else {
    c = (c - k) / (1 - k);
    m = (m - k) / (1 - k);
    y = (y - k) / (1 - k);
  }
  auto q = [](double v) { return static_cast<uint8_t>(255.0 - v * 255.0 + 0.5); };
  return {q(c), q(m), q(y), q(k)};
}

Bytes solid_cmyk(int w, int h, uint8_t r, uint8_t g, uint8_t b) {
  const auto cmyk = rgb_to_cmyk(r, g, b);
  std::vector<uint8_t> px;
  for (int i = 0; i < w * h; ++i) px.insert(px.end(), cmyk.begin(), cmyk.end());
  return encode(px, w, h, TJPF_CMYK, TJSAMP_444, 95);
}

// Random pixels: a JPEG whose entropy-coded data fill most of the file.
Bytes noise_rgb(int w, int h, uint32_t seed) {
  std::mt19937 gen(seed);
  std::vector<uint8_t> px(size_t(w) * h * 3);
  for (auto& v : px) v = static_cast<uint8_t>(gen());
  return encode(px, w, h, TJPF_RGB, TJSAMP_444, 90);
}

void write_file(const fs::path& p, const Bytes& b) {
  fs::create_directories(p.parent_path());
  std::ofstream f(p, std::ios::binary);
  f.write(reinterpret_cast<const char*>(b.data()), static_cast<std::streamsize>(b.size()));
  ASSERT_TRUE(f.good()) << p;
}

void write_text(const fs::path& p, const std::string& s) {
  write_file(p, Bytes(s.begin(), s.end()));
}

// Every pixel of `im` within `tol` of (r, g, b).
void expect_solid(const std::string& what, const DecodedImage& im, int r, int g, int b, int tol) {
  ASSERT_EQ(im.rgb.size(), size_t(im.H * im.W * 3)) << what;
  int worst = 0;
  for (size_t i = 0; i < im.rgb.size(); i += 3) {
    worst = std::max(
        {worst, std::abs(im.rgb[i] - r), std::abs(im.rgb[i + 1] - g), std::abs(im.rgb[i + 2] - b)});
  }
  EXPECT_LE(worst, tol) << what << ": worst channel error " << worst << " from (" << r << ", " << g
                        << ", " << b << ")";
}

class ImageFolderTest : public ::testing::Test {
 protected:
  void SetUp() override {
    std::string tmpl = (fs::temp_directory_path() / "cnx_test_image_folder_XXXXXX").string();
    ASSERT_NE(mkdtemp(tmpl.data()), nullptr);
    dir_ = tmpl;
  }
  void TearDown() override {
    std::error_code ec;
    fs::remove_all(dir_, ec);
  }

  // root/{train,val}/{ant,cat,dog}: written in an order that is not the sorted one, with hidden
  // files and folders that must be ignored.
  fs::path make_tree() {
    const fs::path root = dir_ / "imagenet";
    const fs::path t = root / "train";
    write_file(t / "dog" / "d2.jpg", solid_cmyk(8, 8, 200, 60, 30));
    write_file(t / "dog" / "d1.JPEG", solid_rgb(8, 8, 10, 20, 200));
    write_file(t / "cat" / "c1.jpg", solid_gray(8, 8, 77));
    write_file(t / "ant" / "b.jpg", solid_rgb(16, 12, 200, 60, 30));
    write_file(t / "ant" / "a.jpg", solid_rgb(8, 8, 0, 255, 0));
    write_file(t / "ant" / "notes.txt", Bytes{'h', 'i'});  // listed; decoding refuses it
    write_file(t / "ant" / ".DS_Store", Bytes{0});
    write_file(t / ".cache" / "x.jpg", solid_rgb(8, 8, 0, 0, 0));
    write_file(t / "cat" / ".hidden" / "y.jpg", solid_rgb(8, 8, 0, 0, 0));
    const fs::path v = root / "val";
    for (const char* c : {"cat", "ant", "dog"})
      write_file(v / c / "v.jpg", solid_rgb(8, 8, 1, 2, 3));
    write_file(v / ".ipynb_checkpoints" / "z.jpg", solid_rgb(8, 8, 0, 0, 0));
    return root;
  }

  bool decode(const fs::path& p, DecodedImage& im, std::string& err) {
    return decode_jpeg(p.string(), im, err);
  }

  // decode_jpeg must fail on `p` with a reason containing `part`.
  void expect_decode_fails(const fs::path& p, const std::string& part) {
    DecodedImage im;
    std::string err;
    EXPECT_FALSE(decode(p, im, err)) << p;
    EXPECT_NE(err.find(part), std::string::npos)
        << p << ": reason \"" << err << "\" does not contain \"" << part << "\"";
  }

  fs::path dir_;
};

TEST_F(ImageFolderTest, ScanListsSortedClassesAndSamples) {
  const fs::path root = make_tree();
  const ImageFolder f = scan_image_folder(root.string(), "train");
  EXPECT_EQ(f.root, root.string());
  EXPECT_EQ(f.split, "train");
  EXPECT_EQ(f.classes, (std::vector<std::string>{"ant", "cat", "dog"}));
  const fs::path t = root / "train";
  const std::vector<std::pair<std::string, int64_t>> want = {
      {(t / "ant" / "a.jpg").string(), 0},     {(t / "ant" / "b.jpg").string(), 0},
      {(t / "ant" / "notes.txt").string(), 0}, {(t / "cat" / "c1.jpg").string(), 1},
      {(t / "dog" / "d1.JPEG").string(), 2},   {(t / "dog" / "d2.jpg").string(), 2}};
  EXPECT_EQ(f.samples, want);

  const ImageFolder v = scan_image_folder(root.string(), "val");
  EXPECT_EQ(v.classes, f.classes);
  ASSERT_EQ(v.samples.size(), 3u);
  for (int64_t c = 0; c < 3; ++c) {
    EXPECT_EQ(v.samples[c].second, c);
    EXPECT_EQ(v.samples[c].first, (root / "val" / f.classes[c] / "v.jpg").string());
  }
}

TEST_F(ImageFolderTest, DecodesRgbGrayAndCmyk) {
  const fs::path root = make_tree();
  const ImageFolder f = scan_image_folder(root.string(), "train");
  DecodedImage im;
  std::string err;

  // Solid colours at quality 95, 4:4:4: the error is the YCbCr round trip and quantisation of
  // the DC coefficient, a few levels.
  ASSERT_TRUE(decode(f.samples[1].first, im, err)) << err;  // ant/b.jpg, 16 wide, 12 high
  EXPECT_EQ(im.H, 12);
  EXPECT_EQ(im.W, 16);
  expect_solid("rgb", im, 200, 60, 30, 3);

  ASSERT_TRUE(decode(f.samples[3].first, im, err)) << err;  // cat/c1.jpg, grayscale
  EXPECT_EQ(im.H, 8);
  EXPECT_EQ(im.W, 8);
  for (size_t i = 0; i < im.rgb.size(); i += 3) {
    ASSERT_EQ(im.rgb[i], im.rgb[i + 1]) << "grayscale must decode to R = G = B";
    ASSERT_EQ(im.rgb[i], im.rgb[i + 2]) << "grayscale must decode to R = G = B";
  }
  expect_solid("gray", im, 77, 77, 77, 2);

  ASSERT_TRUE(decode(f.samples[5].first, im, err)) << err;  // dog/d2.jpg, CMYK (YCCK)
  EXPECT_EQ(im.H, 8);
  EXPECT_EQ(im.W, 8);
  // Two roundings (to CMYK bytes, then the JPEG) each move a channel by a level or so, and
  // R = C K / 255 multiplies two of them: a slightly wider tolerance than for RGB.
  expect_solid("cmyk", im, 200, 60, 30, 5);
}

TEST_F(ImageFolderTest, CmykFileIsReallyCmyk) {
  // The CMYK test image is a CMYK/YCCK JPEG, i.e. it exercises the CMYK path of decode_jpeg.
  const Bytes j = solid_cmyk(8, 8, 200, 60, 30);
  tjhandle tj = tjInitDecompress();
  int w, h, ss, cs;
  ASSERT_EQ(tjDecompressHeader3(tj, j.data(), j.size(), &w, &h, &ss, &cs), 0);
  EXPECT_TRUE(cs == TJCS_CMYK || cs == TJCS_YCCK) << "colorspace " << cs;
  tjDestroy(tj);
}

TEST_F(ImageFolderTest, DecodeKeepsRowsAndColumnsApart) {
  // 32 wide, 16 high; quadrants red (top left), green (top right), blue (bottom left), white.
  const int W = 32, H = 16;
  std::vector<uint8_t> px;
  for (int y = 0; y < H; ++y)
    for (int x = 0; x < W; ++x) {
      const bool right = x >= W / 2, bottom = y >= H / 2;
      if (!right && !bottom) px.insert(px.end(), {255, 0, 0});
      if (right && !bottom) px.insert(px.end(), {0, 255, 0});
      if (!right && bottom) px.insert(px.end(), {0, 0, 255});
      if (right && bottom) px.insert(px.end(), {255, 255, 255});
    }
  write_file(dir_ / "quad.jpg", encode(px, W, H, TJPF_RGB, TJSAMP_444, 100));
  DecodedImage im;
  std::string err;
  ASSERT_TRUE(decode(dir_ / "quad.jpg", im, err)) << err;
  ASSERT_EQ(im.H, H);
  ASSERT_EQ(im.W, W);
  auto at = [&](int y, int x, int c) { return int(im.rgb[(size_t(y) * W + x) * 3 + c]); };
  const int want[4][3] = {{255, 0, 0}, {0, 255, 0}, {0, 0, 255}, {255, 255, 255}};
  const int ys[4] = {4, 4, 12, 12}, xs[4] = {8, 24, 8, 24};
  for (int q = 0; q < 4; ++q)
    for (int c = 0; c < 3; ++c)
      EXPECT_NEAR(at(ys[q], xs[q], c), want[q][c], 8) << "quadrant " << q << " channel " << c;
}

TEST_F(ImageFolderTest, RefusesBadFiles) {
  write_file(dir_ / "zero.jpg", Bytes{});
  expect_decode_fails(dir_ / "zero.jpg", "empty file (0 bytes)");

  write_text(dir_ / "text.jpg", "this is not an image\n");
  expect_decode_fails(dir_ / "text.jpg", "not a JPEG file (no SOI marker");

  std::mt19937 gen(7);
  Bytes random(4096);
  for (auto& b : random) b = static_cast<uint8_t>(gen());
  random[0] = 0x12;  // (not FF: a random file that happens to start like a JPEG is below)
  write_file(dir_ / "random.jpg", random);
  expect_decode_fails(dir_ / "random.jpg", "not a JPEG file");

  // SOI marker followed by garbage: passes the content check, fails in libjpeg-turbo.
  Bytes soi_garbage = random;
  soi_garbage[0] = 0xFF;
  soi_garbage[1] = 0xD8;
  soi_garbage[2] = 0xFF;
  write_file(dir_ / "soi_garbage.jpg", soi_garbage);
  expect_decode_fails(dir_ / "soi_garbage.jpg", "corrupt");

  write_file(dir_ / "image.jpg", Bytes{0x89, 'P', 'N', 'G', '\r', '\n', 0x1a, '\n', 0, 0, 0, 13});
  expect_decode_fails(dir_ / "image.jpg", "a PNG file, not a JPEG");

  expect_decode_fails(dir_ / "missing.jpg", "cannot open");
  expect_decode_fails(dir_, "");  // a folder: cannot be read as a file, must not crash

  // Truncated inside the header (quantisation / Huffman tables, before the frame size): fails.
  const Bytes full = noise_rgb(64, 64, 3);
  for (size_t cut : {3, 20, 100, 300}) {
    ASSERT_LT(cut, full.size());
    write_file(dir_ / "cut_header.jpg", Bytes(full.begin(), full.begin() + cut));
    SCOPED_TRACE("cut after " + std::to_string(cut) + " bytes");
    expect_decode_fails(dir_ / "cut_header.jpg", "corrupt or truncated JPEG header");
  }
}

TEST_F(ImageFolderTest, TruncatedDataIsABadFile) {
  // The rule (image_folder.h, issue 13 item 7): a file cut inside its entropy-coded data is a bad
  // file, like a corrupt one; libjpeg-turbo would fill the missing rows with grey and warn.
  const Bytes full = noise_rgb(64, 64, 5);
  write_file(dir_ / "full.jpg", full);
  write_file(dir_ / "half.jpg", Bytes(full.begin(), full.begin() + full.size() / 2));
  DecodedImage a;
  std::string err;
  ASSERT_TRUE(decode(dir_ / "full.jpg", a, err)) << err;
  expect_decode_fails(dir_ / "half.jpg", "Premature end of JPEG file");
}

TEST_F(ImageFolderTest, DecodesFromSeveralThreads) {
  const fs::path root = make_tree();
  const ImageFolder f = scan_image_folder(root.string(), "train");
  DecodeStats stats;
  std::vector<std::thread> threads;
  std::vector<int> bad(4, 0);
  ::testing::internal::CaptureStderr();
  for (int t = 0; t < 4; ++t)
    threads.emplace_back([&, t] {
      for (int rep = 0; rep < 5; ++rep)
        for (const auto& s : f.samples) {
          DecodedImage im;
          if (!decode_jpeg_or_warn(s.first, im, &stats)) ++bad[t];
        }
    });
  for (auto& th : threads) th.join();
  const std::string log = ::testing::internal::GetCapturedStderr();
  EXPECT_EQ(stats.total(), 4 * 5 * int64_t(f.samples.size()));
  EXPECT_EQ(stats.failed(), 4 * 5);  // notes.txt, every time
  for (int t = 0; t < 4; ++t) EXPECT_EQ(bad[t], 5);
  // One whole line per skipped file.
  const std::string line = "image_folder: skipping " + f.samples[2].first +
                           ": not a JPEG file (no SOI marker FF D8 FF; the file starts with "
                           "68 69, 2 bytes)\n";
  size_t count = 0;
  for (size_t pos = log.find(line); pos != std::string::npos; pos = log.find(line, pos + 1))
    ++count;
  EXPECT_EQ(count, 20u) << log;
  EXPECT_EQ(log.size(), 20 * line.size()) << log;
}

TEST_F(ImageFolderTest, ScanErrors) {
  const fs::path root = make_tree();
  const std::string missing = (dir_ / "nope").string();
  expect_error([&] { scan_image_folder(missing, "train"); },
               {"image_folder: ", missing, ": missing root folder"});
  write_text(dir_ / "file", "x");
  expect_error([&] { scan_image_folder((dir_ / "file").string(), "train"); },
               {"image_folder: ", (dir_ / "file").string(), ": root is not a folder"});
  expect_error([&] { scan_image_folder(root.string(), "test"); },
               {"image_folder: ", (root / "test").string(), ": missing split folder"});

  // A split with no class folders (only files and hidden folders).
  write_text(root / "other" / "readme.txt", "x");
  fs::create_directories(root / "other" / ".git");
  expect_error([&] { scan_image_folder(root.string(), "other"); },
               {"image_folder: ", (root / "other").string(), ": no class folders"});

  // An empty class folder (hidden files do not count), named in the message.
  write_text(root / "other" / "bee" / ".keep", "");
  write_file(root / "other" / "ant" / "a.jpg", solid_rgb(8, 8, 1, 1, 1));
  expect_error([&] { scan_image_folder(root.string(), "other"); },
               {"image_folder: ", (root / "other" / "bee").string(), ": empty class folder"});

  // train and val with different classes: both directions are reported.
  fs::create_directories(root / "val" / "eel");
  write_file(root / "val" / "eel" / "e.jpg", solid_rgb(8, 8, 1, 1, 1));
  fs::remove_all(root / "val" / "cat");
  expect_error(
      [&] { scan_image_folder(root.string(), "train"); },
      {"image_folder: ", (root / "train").string(), ": class folders differ from those of ",
       (root / "val").string(), "(3 vs 3 classes; only in train: \"cat\"; only in val: \"eel\")"});
  expect_error([&] { scan_image_folder(root.string(), "val"); },
               {"image_folder: ", (root / "val").string(), "only in val: \"eel\"",
                "only in train: \"cat\""});
}

TEST(DecodeStats, ThresholdAndMessage) {
  DecodeStats s;
  s.check(0.0);  // nothing recorded: nothing to complain about
  for (int i = 0; i < 40; ++i) s.record(i >= 12);
  EXPECT_EQ(s.total(), 40);
  EXPECT_EQ(s.failed(), 12);
  expect_error([&] { s.check(0.1); },
               {"image_folder: 12 of 40 files (30%) could not be decoded, more than the allowed "
                "10%"});
  s.check(0.3);  // exactly at the limit: allowed
  s.check(1.0);
  DecodeStats t;
  for (int i = 0; i < 3; ++i) t.record(i != 0);
  expect_error([&] { t.check(0.05); }, {"1 of 3 files (33.3%)", "allowed 5%"});
  DecodeStats ok;
  ok.record(true);
  ok.check(0.0);
}

}  // namespace
