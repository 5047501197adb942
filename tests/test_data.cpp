// Datasets and the data loader: the readers against tiny files written here (idx, gzipped with
// zlib or not; CIFAR-10/100 binary records laid out by hand), every bad file refused with a
// message naming the file and the problem; the loader's normalisation, padding, crop and flip
// against the definitions in train/data/loader.h, its determinism (worker count, resume), epoch
// coverage, drop_last, exceptions from workers and shutdown mid-epoch. One test reads the real
// Fashion-MNIST when Debian's dataset-fashion-mnist is installed.
#include <gtest/gtest.h>
#include <stdlib.h>
#include <zlib.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <functional>
#include <future>
#include <numeric>
#include <set>
#include <string>
#include <thread>
#include <vector>

#include "tensor/tensor.h"
#include "tests/testing.h"
#include "train/data/dataset.h"
#include "train/data/loader.h"

using namespace cnx;
using cnx::test::expect_error;
namespace fs = std::filesystem;

namespace {

using Bytes = std::vector<uint8_t>;

// ---- files, written independently of train/data/datasets.cpp ---------------------------------

void put_be32(Bytes& b, uint32_t v) {
  for (int shift = 24; shift >= 0; shift -= 8) b.push_back(static_cast<uint8_t>(v >> shift));
}

Bytes idx_images(uint32_t n, uint32_t rows, uint32_t cols, const Bytes& pixels,
                 uint32_t magic = 0x00000803) {
  Bytes b;
  put_be32(b, magic);
  put_be32(b, n);
  put_be32(b, rows);
  put_be32(b, cols);
  b.insert(b.end(), pixels.begin(), pixels.end());
  return b;
}

Bytes idx_labels(const Bytes& labels, uint32_t magic = 0x00000801) {
  Bytes b;
  put_be32(b, magic);
  put_be32(b, static_cast<uint32_t>(labels.size()));
  b.insert(b.end(), labels.begin(), labels.end());
  return b;
}

void write_plain(const fs::path& path, const Bytes& b) {
  std::ofstream out(path, std::ios::binary);
  out.write(reinterpret_cast<const char*>(b.data()), static_cast<std::streamsize>(b.size()));
  ASSERT_TRUE(out.good()) << path;
}

void write_gz(const fs::path& path, const Bytes& b) {
  gzFile f = gzopen(path.c_str(), "wb");
  ASSERT_NE(f, nullptr) << path;
  if (!b.empty()) {
    ASSERT_EQ(gzwrite(f, b.data(), static_cast<unsigned>(b.size())), static_cast<int>(b.size()));
  }
  ASSERT_EQ(gzclose(f), Z_OK);
}

Bytes read_plain(const fs::path& path) {
  std::ifstream in(path, std::ios::binary);
  return Bytes(std::istreambuf_iterator<char>(in), std::istreambuf_iterator<char>());
}

using test::random_bytes;

// A planar CIFAR record: label bytes, then R, G, B planes of 32x32 with value pixel(c, y, x).
template <class F>
Bytes cifar_record(const Bytes& label_bytes, F pixel) {
  Bytes r = label_bytes;
  for (int c = 0; c < 3; ++c)
    for (int y = 0; y < 32; ++y)
      for (int x = 0; x < 32; ++x) r.push_back(static_cast<uint8_t>(pixel(c, y, x)));
  return r;
}

Bytes concat(const std::vector<Bytes>& parts) {
  Bytes b;
  for (const Bytes& p : parts) b.insert(b.end(), p.begin(), p.end());
  return b;
}

// A pixel value that differs between channels, rows and columns of record r.
int planar_value(int r, int c, int y, int x) { return (r * 31 + c * 85 + y * 7 + x * 3) % 256; }

class DataFiles : public ::testing::Test {
 protected:
  void SetUp() override {
    std::string pattern = (fs::path(::testing::TempDir()) / "cnx_data_XXXXXX").string();
    ASSERT_NE(::mkdtemp(pattern.data()), nullptr) << pattern;
    dir_ = pattern;
  }
  void TearDown() override {
    std::error_code ec;
    fs::remove_all(dir_, ec);
  }

  // Fashion-MNIST-style files for split "train" or "t10k".
  void write_fmnist(const std::string& split, uint32_t n, uint32_t rows, uint32_t cols,
                    const Bytes& pixels, const Bytes& labels, bool gz = true) {
    const fs::path img = dir_ / (split + "-images-idx3-ubyte" + (gz ? ".gz" : ""));
    const fs::path lab = dir_ / (split + "-labels-idx1-ubyte" + (gz ? ".gz" : ""));
    if (gz) {
      write_gz(img, idx_images(n, rows, cols, pixels));
      write_gz(lab, idx_labels(labels));
    } else {
      write_plain(img, idx_images(n, rows, cols, pixels));
      write_plain(lab, idx_labels(labels));
    }
  }

  std::string path(const std::string& name) const { return (dir_ / name).string(); }

  fs::path dir_;
};

const std::vector<std::string> kFashionClasses = {"T-shirt/top", "Trouser", "Pullover", "Dress",
                                                  "Coat", "Sandal", "Shirt", "Sneaker", "Bag",
                                                  "Ankle boot"};

// ---- Fashion-MNIST ---------------------------------------------------------------------------

TEST_F(DataFiles, FashionMnistGzipRoundTrip) {
  const Bytes train_px = random_bytes(5 * 28 * 28, 1), test_px = random_bytes(3 * 28 * 28, 2);
  const Bytes train_lab = {3, 0, 9, 9, 1}, test_lab = {7, 2, 5};
  write_fmnist("train", 5, 28, 28, train_px, train_lab);
  write_fmnist("t10k", 3, 28, 28, test_px, test_lab);

  const Dataset tr = load_dataset("fashion_mnist", dir_.string(), true);
  EXPECT_EQ(tr.name, "fashion_mnist");
  EXPECT_EQ(tr.N, 5);
  EXPECT_EQ(tr.H, 28);
  EXPECT_EQ(tr.W, 28);
  EXPECT_EQ(tr.C, 1);
  EXPECT_EQ(tr.num_classes, 10);
  EXPECT_EQ(tr.images, train_px);
  EXPECT_EQ(tr.labels, (std::vector<int64_t>{3, 0, 9, 9, 1}));
  EXPECT_EQ(tr.class_names, kFashionClasses);
  EXPECT_FLOAT_EQ(tr.mean[0], 0.2860f);
  EXPECT_FLOAT_EQ(tr.std[0], 0.3530f);

  const Dataset te = load_dataset("fashion_mnist", dir_.string(), false);
  EXPECT_EQ(te.N, 3);
  EXPECT_EQ(te.images, test_px);
  EXPECT_EQ(te.labels, (std::vector<int64_t>{7, 2, 5}));
}

TEST_F(DataFiles, FashionMnistUncompressedAndOtherSizes) {
  const Bytes px = random_bytes(2 * 5 * 7, 3);
  write_fmnist("train", 2, 5, 7, px, {4, 8}, /*gz=*/false);
  const Dataset d = load_dataset("fashion_mnist", dir_.string(), true);
  EXPECT_EQ(d.N, 2);
  EXPECT_EQ(d.H, 5);
  EXPECT_EQ(d.W, 7);
  EXPECT_EQ(d.images, px);
  EXPECT_EQ(d.labels, (std::vector<int64_t>{4, 8}));
}

TEST_F(DataFiles, FashionMnistBadFiles) {
  const Bytes px = random_bytes(4 * 28 * 28, 4);
  const std::string img = path("train-images-idx3-ubyte.gz"), lab = path("train-labels-idx1-ubyte.gz");
  auto load = [&] { load_dataset("fashion_mnist", dir_.string(), true); };

  // Missing folder, missing files.
  expect_error([&] { load_dataset("fashion_mnist", path("nowhere"), true); },
               {path("nowhere"), "missing data folder"});
  expect_error(load, {img, "missing file"});
  write_gz(img, idx_images(4, 28, 28, px));
  expect_error(load, {lab, "missing file"});

  // Wrong magic numbers (the two kinds swapped).
  write_gz(lab, idx_images(4, 28, 28, px));
  expect_error(load, {lab, "wrong magic", "expected 0x00000801", "found 0x00000803"});
  write_gz(img, idx_labels({1, 2, 3, 4}));
  expect_error(load, {img, "wrong magic", "expected 0x00000803", "found 0x00000801"});

  // Truncated: fewer pixels or labels than the header promises; a short header; a cut gzip stream.
  write_gz(img, idx_images(5, 28, 28, px));
  expect_error(load, {img, "truncated", "5 images of 28x28", "3920 bytes", "only 3136"});
  write_gz(img, Bytes{0, 0, 8, 3, 0, 0});
  expect_error(load, {img, "truncated", "6 bytes"});
  write_gz(img, idx_images(4, 28, 28, px));
  write_gz(lab, idx_labels({1, 2, 3, 4}));
  const Bytes whole = read_plain(img);
  write_plain(img, Bytes(whole.begin(), whole.begin() + static_cast<long>(whole.size() / 2)));
  expect_error(load, {img, "truncated", "gzip stream ends early"});
  write_plain(img, {});
  expect_error(load, {img, "empty file"});
  write_gz(img, idx_images(4, 28, 28, px));
  Bytes short_labels = idx_labels({1, 2, 3, 4});
  short_labels.pop_back();
  write_gz(lab, short_labels);
  expect_error(load, {lab, "truncated", "4 labels", "only 3"});

  // Bytes beyond what the header promises.
  Bytes long_px = px;
  long_px.push_back(0);
  write_gz(img, idx_images(4, 28, 28, long_px));
  write_gz(lab, idx_labels({1, 2, 3, 4}));
  expect_error(load, {img, "1 bytes after"});

  // Count mismatch between images and labels.
  write_gz(img, idx_images(4, 28, 28, px));
  write_gz(lab, idx_labels({1, 2, 3}));
  expect_error(load, {lab, "count mismatch", "3 labels", img, "4 images"});

  // A label outside [0, 10).
  write_gz(lab, idx_labels({1, 2, 10, 4}));
  expect_error(load, {lab, "label 10", "image 2", "outside [0, 10)"});

  // Not gzip data at all after a gzip header: corrupt.
  Bytes corrupt = read_plain(img);
  for (size_t i = 12; i < corrupt.size(); ++i) corrupt[i] ^= 0x5a;
  write_plain(img, corrupt);
  write_gz(lab, idx_labels({1, 2, 3, 4}));
  expect_error(load, {img, "gzip"});
}

TEST(Datasets, UnknownNameListsTheKnownOnes) {
  expect_error([] { load_dataset("imagenet", "", true); },
               {"unknown dataset 'imagenet'", "fashion_mnist", "cifar10", "cifar100"});
  expect_error([] { dataset_info("mnist"); }, {"unknown dataset 'mnist'"});
  EXPECT_EQ(known_datasets(), (std::vector<std::string>{"fashion_mnist", "cifar10", "cifar100"}));
}

TEST(Datasets, InfoWithoutFiles) {
  const Dataset f = dataset_info("fashion_mnist");
  EXPECT_EQ(f.num_classes, 10);
  EXPECT_EQ(f.class_names, kFashionClasses);
  const Dataset c10 = dataset_info("cifar10");
  EXPECT_EQ(c10.num_classes, 10);
  EXPECT_EQ(c10.class_names.front(), "airplane");
  EXPECT_EQ(c10.class_names.back(), "truck");
  EXPECT_FLOAT_EQ(c10.mean[2], 0.4465f);
  EXPECT_FLOAT_EQ(c10.std[1], 0.2435f);
  const Dataset c100 = dataset_info("cifar100");
  EXPECT_EQ(c100.num_classes, 100);
  EXPECT_EQ(c100.class_names[0], "apple");
  EXPECT_EQ(c100.class_names[99], "worm");
  EXPECT_EQ(c100.class_names[58], "pickup_truck");
  EXPECT_FLOAT_EQ(c100.mean[0], 0.5071f);
  EXPECT_FLOAT_EQ(c100.std[2], 0.2762f);
  EXPECT_EQ(std::set<std::string>(c100.class_names.begin(), c100.class_names.end()).size(), 100u);
}

// ---- CIFAR -----------------------------------------------------------------------------------

TEST_F(DataFiles, Cifar10PlanarToNhwcAndSplits) {
  // data_batch_k.bin holds k % 2 + 1 records; record r overall has label r % 10.
  int r = 0;
  std::vector<int64_t> want_labels;
  for (int k = 1; k <= 5; ++k) {
    std::vector<Bytes> recs;
    for (int i = 0; i < k % 2 + 1; ++i, ++r) {
      recs.push_back(cifar_record({static_cast<uint8_t>(r % 10)},
                                  [r](int c, int y, int x) { return planar_value(r, c, y, x); }));
      want_labels.push_back(r % 10);
    }
    write_plain(dir_ / ("data_batch_" + std::to_string(k) + ".bin"), concat(recs));
  }
  write_plain(dir_ / "test_batch.bin",
              cifar_record({9}, [](int c, int y, int x) { return planar_value(100, c, y, x); }));

  const Dataset d = load_dataset("cifar10", dir_.string(), true);
  EXPECT_EQ(d.name, "cifar10");
  ASSERT_EQ(d.N, r);
  EXPECT_EQ(d.H, 32);
  EXPECT_EQ(d.W, 32);
  EXPECT_EQ(d.C, 3);
  EXPECT_EQ(d.num_classes, 10);
  EXPECT_EQ(d.labels, want_labels);
  ASSERT_EQ(d.images.size(), static_cast<size_t>(r) * 3072);
  int bad = 0;
  for (int n = 0; n < r; ++n)
    for (int y = 0; y < 32; ++y)
      for (int x = 0; x < 32; ++x)
        for (int c = 0; c < 3; ++c)
          bad += d.images[((n * 32 + y) * 32 + x) * 3 + c] != planar_value(n, c, y, x);
  EXPECT_EQ(bad, 0) << "pixels not converted from planar RGB to NHWC";
  EXPECT_EQ(d.class_names.front(), "airplane");  // built in: no batches.meta.txt

  const Dataset t = load_dataset("cifar10", dir_.string(), false);
  ASSERT_EQ(t.N, 1);
  EXPECT_EQ(t.labels[0], 9);
  EXPECT_EQ(t.images[(5 * 32 + 7) * 3 + 2], planar_value(100, 2, 5, 7));

  // A hand-made record: R plane all 10, G plane all 20, B plane 30 except B(0, 1) = 99.
  write_plain(dir_ / "test_batch.bin", cifar_record({4}, [](int c, int y, int x) {
                return c == 2 && y == 0 && x == 1 ? 99 : 10 * (c + 1);
              }));
  const Dataset h = load_dataset("cifar10", dir_.string(), false);
  EXPECT_EQ(Bytes(h.images.begin(), h.images.begin() + 9), (Bytes{10, 20, 30, 10, 20, 99, 10, 20, 30}));
}

TEST_F(DataFiles, Cifar10SubfolderAndClassNames) {
  const fs::path sub = dir_ / "cifar-10-batches-bin";
  fs::create_directory(sub);
  const Bytes rec = cifar_record({2}, [](int c, int y, int x) { return c + y + x; });
  write_plain(sub / "test_batch.bin", rec);
  std::ofstream(sub / "batches.meta.txt") << "a0\nb1\nc2\nd3\ne4\nf5\ng6\nh7\ni8\nj9\n\n";
  const Dataset d = load_dataset("cifar10", dir_.string(), false);  // the parent
  EXPECT_EQ(d.N, 1);
  EXPECT_EQ(d.class_names[2], "c2");
  EXPECT_EQ(d.class_names.size(), 10u);
  EXPECT_EQ(load_dataset("cifar10", sub.string(), false).N, 1);  // the folder itself

  std::ofstream(sub / "batches.meta.txt") << "a\nb\nc\n";
  expect_error([&] { load_dataset("cifar10", sub.string(), false); },
               {(sub / "batches.meta.txt").string(), "expected 10 class names", "found 3"});
}

TEST_F(DataFiles, Cifar100FineLabels) {
  const fs::path sub = dir_ / "cifar-100-binary";
  fs::create_directory(sub);
  std::vector<Bytes> recs;
  for (int r = 0; r < 3; ++r)
    recs.push_back(cifar_record({static_cast<uint8_t>(19 - r), static_cast<uint8_t>(97 + r)},
                                [r](int c, int y, int x) { return planar_value(r, c, y, x); }));
  write_plain(sub / "train.bin", concat(recs));
  write_plain(sub / "test.bin", recs[1]);

  const Dataset d = load_dataset("cifar100", dir_.string(), true);
  EXPECT_EQ(d.name, "cifar100");
  ASSERT_EQ(d.N, 3);
  EXPECT_EQ(d.num_classes, 100);
  EXPECT_EQ(d.labels, (std::vector<int64_t>{97, 98, 99}));
  int bad = 0;
  for (int n = 0; n < 3; ++n)
    for (int y = 0; y < 32; ++y)
      for (int x = 0; x < 32; ++x)
        for (int c = 0; c < 3; ++c)
          bad += d.images[((n * 32 + y) * 32 + x) * 3 + c] != planar_value(n, c, y, x);
  EXPECT_EQ(bad, 0);
  EXPECT_EQ(d.class_names[97], "wolf");  // built in

  std::ofstream names(sub / "fine_label_names.txt");
  for (int k = 0; k < 100; ++k) names << "class" << k << "\r\n";  // CRLF lines too
  names.close();
  const Dataset t = load_dataset("cifar100", sub.string(), false);
  EXPECT_EQ(t.N, 1);
  EXPECT_EQ(t.labels[0], 98);
  EXPECT_EQ(t.class_names[98], "class98");
}

TEST_F(DataFiles, CifarBadFiles) {
  const Bytes rec10 = cifar_record({1}, [](int, int, int) { return 7; });
  auto load10 = [&] { load_dataset("cifar10", dir_.string(), true); };

  expect_error([] { load_dataset("cifar10", "", true); }, {"cifar10", "no data path"});
  expect_error([&] { load_dataset("cifar10", path("nowhere"), true); },
               {path("nowhere"), "missing data folder"});
  for (int k = 1; k <= 5; ++k)
    if (k != 3) write_plain(dir_ / ("data_batch_" + std::to_string(k) + ".bin"), rec10);
  expect_error(load10, {path("data_batch_3.bin"), "missing file"});

  // Not a whole number of records (a cut file).
  Bytes cut = concat({rec10, rec10});
  cut.resize(cut.size() - 100);
  write_plain(dir_ / "data_batch_3.bin", cut);
  expect_error(load10, {path("data_batch_3.bin"), "6046 bytes", "not a whole number of 3073-byte",
                        "1 records and 2973 bytes left over"});
  write_plain(dir_ / "data_batch_3.bin", {});
  expect_error(load10, {path("data_batch_3.bin"), "empty"});

  // Label outside [0, 10).
  write_plain(dir_ / "data_batch_3.bin",
              concat({rec10, cifar_record({10}, [](int, int, int) { return 0; })}));
  expect_error(load10, {path("data_batch_3.bin"), "label 10", "record 1", "outside [0, 10)"});

  // CIFAR-100: record size, fine label, coarse label.
  auto load100 = [&] { load_dataset("cifar100", dir_.string(), false); };
  expect_error(load100, {path("test.bin"), "missing file"});
  write_plain(dir_ / "test.bin", rec10);  // a CIFAR-10 record is one byte short
  expect_error(load100, {path("test.bin"), "3073 bytes", "not a whole number of 3074-byte"});
  write_plain(dir_ / "test.bin", cifar_record({3, 100}, [](int, int, int) { return 0; }));
  expect_error(load100, {path("test.bin"), "fine label 100", "outside [0, 100)"});
  write_plain(dir_ / "test.bin", cifar_record({20, 5}, [](int, int, int) { return 0; }));
  expect_error(load100, {path("test.bin"), "coarse label 20", "outside [0, 20)"});
}

// The real Fashion-MNIST, where Debian's dataset-fashion-mnist installed it.
TEST(Datasets, RealFashionMnistIfInstalled) {
  const std::string dir = "/usr/share/datasets/fashion-mnist";
  if (!fs::exists(dir + "/train-images-idx3-ubyte.gz"))
    GTEST_SKIP() << dir << " is absent (Debian package dataset-fashion-mnist not installed)";
  for (const bool train : {true, false}) {
    const Dataset d = load_dataset("fashion_mnist", "", train);
    ASSERT_EQ(d.N, train ? 60000 : 10000);
    EXPECT_EQ(d.H, 28);
    EXPECT_EQ(d.W, 28);
    EXPECT_EQ(d.C, 1);
    EXPECT_EQ(d.num_classes, 10);
    std::vector<int64_t> count(10, 0);
    for (int64_t l : d.labels) {
      ASSERT_TRUE(l >= 0 && l < 10) << l;
      ++count[static_cast<size_t>(l)];
    }
    for (int k = 0; k < 10; ++k) {
      EXPECT_GT(count[k], d.N / 10 * 8 / 10) << "class " << k;
      EXPECT_LT(count[k], d.N / 10 * 12 / 10) << "class " << k;
    }
    if (train) {  // the built-in statistics are the training set's (rounded to 4 decimals)
      double s = 0, s2 = 0;
      for (uint8_t v : d.images) {
        s += v;
        s2 += double(v) * v;
      }
      const double n = double(d.images.size()), mean = s / n / 255;
      const double sd = std::sqrt(s2 / n / (255.0 * 255.0) - mean * mean);
      EXPECT_NEAR(mean, d.mean[0], 5e-5);
      EXPECT_NEAR(sd, d.std[0], 5e-5);
    }
  }
}

// ---- the loader ------------------------------------------------------------------------------

// n images of side x side x c with random pixels; label of image i is i (so labels show order).
Dataset synthetic(int64_t n, int64_t side, int64_t c, uint64_t seed = 7) {
  Dataset d;
  d.name = "synthetic";
  d.N = n;
  d.H = d.W = side;
  d.C = c;
  d.num_classes = n;
  d.images = random_bytes(static_cast<size_t>(n * side * side * c), seed);
  for (int64_t i = 0; i < n; ++i) d.labels.push_back(i);
  d.class_names.resize(static_cast<size_t>(n));
  d.mean = {0.25f, 0.5f, 0.75f};
  d.std = {0.5f, 0.25f, 0.125f};
  return d;
}

LoaderOptions opts(int64_t batch, bool train, bool augment, bool drop_last, int workers,
                   int prefetch = -1, uint64_t seed = 42) {
  LoaderOptions o;
  o.batch_size = batch;
  o.train = train;
  o.augment = augment;
  o.drop_last = drop_last;
  o.seed = seed;
  o.workers = workers;
  o.prefetch = prefetch;
  return o;
}

struct Got {
  std::vector<std::vector<float>> images;
  std::vector<std::vector<int64_t>> labels;
  std::vector<int64_t> index;
};

Got run_epoch(DataLoader& loader, int64_t epoch, int64_t first = 0) {
  Got g;
  loader.start_epoch(epoch, first);
  Batch b;
  while (loader.next(b)) {
    EXPECT_EQ(b.epoch, epoch);
    g.images.push_back(b.images.to_vector<float>());
    g.labels.push_back(b.labels.to_vector<int64_t>());
    g.index.push_back(b.index);
  }
  return g;
}

float normalised(int v, float mean, float std) {
  return static_cast<float>((v / 255.0 - double(mean)) / double(std));
}

TEST(Loader, NormalisationIsExact) {
  Dataset d = dataset_info("cifar10");
  d.N = 1;
  d.H = d.W = 32;
  d.C = 3;
  d.images = random_bytes(32 * 32 * 3, 11);
  d.images[0] = 0;
  d.images[1] = 128;
  d.images[2] = 255;
  d.labels = {6};
  DataLoader loader(d, LoaderOptions::evaluation(4));
  ASSERT_EQ(loader.batches_per_epoch(), 1);
  loader.start_epoch(0);
  Batch b;
  ASSERT_TRUE(loader.next(b));
  EXPECT_EQ(b.images.shape(), Shape({1, 32, 32, 3}));
  EXPECT_EQ(b.images.dtype(), DType::f32);
  EXPECT_EQ(b.labels.dtype(), DType::i64);
  EXPECT_EQ(b.labels.to_vector<int64_t>(), std::vector<int64_t>{6});
  const std::vector<float> v = b.images.to_vector<float>();
  EXPECT_EQ(v[0], normalised(0, 0.4914f, 0.2470f));
  EXPECT_EQ(v[1], normalised(128, 0.4822f, 0.2435f));
  EXPECT_EQ(v[2], normalised(255, 0.4465f, 0.2616f));
  EXPECT_NEAR(v[2], (1.0 - 0.4465) / 0.2616, 1e-6);
  int bad = 0;
  for (size_t i = 0; i < v.size(); ++i) bad += v[i] != normalised(d.images[i], d.mean[i % 3], d.std[i % 3]);
  EXPECT_EQ(bad, 0);
  EXPECT_FALSE(loader.next(b));

  // normalize_image (for predict) gives the evaluation loader's values.
  const Tensor one = normalize_image(d.images, 32, 32, 3, d.mean, d.std);
  EXPECT_EQ(one.shape(), Shape({1, 32, 32, 3}));
  EXPECT_EQ(one.to_vector<float>(), v);
  expect_error([&] { normalize_image(d.images, 32, 31, 3, d.mean, d.std); },
               {"normalize_image", "3072 bytes", "32x31x3"});
}

TEST(Loader, Pads28To32WithZeroPixels) {
  Dataset d = dataset_info("fashion_mnist");
  d.N = 2;
  d.H = d.W = 28;
  d.C = 1;
  d.images.assign(2 * 28 * 28, 255);
  d.images[28 * 28 + 0] = 17;  // image 1, pixel (0, 0)
  d.labels = {1, 2};
  DataLoader loader(d, LoaderOptions::evaluation(2));
  EXPECT_EQ(loader.image_height(), 32);
  EXPECT_EQ(loader.image_width(), 32);
  loader.start_epoch(0);
  Batch b;
  ASSERT_TRUE(loader.next(b));
  ASSERT_EQ(b.images.shape(), Shape({2, 32, 32, 1}));
  const std::vector<float> v = b.images.to_vector<float>();
  const float zero = normalised(0, 0.2860f, 0.3530f), full = normalised(255, 0.2860f, 0.3530f);
  int bad = 0;
  for (int n = 0; n < 2; ++n)
    for (int y = 0; y < 32; ++y)
      for (int x = 0; x < 32; ++x) {
        const bool inside = y >= 2 && y < 30 && x >= 2 && x < 30;
        float want = inside ? full : zero;
        if (n == 1 && y == 2 && x == 2) want = normalised(17, 0.2860f, 0.3530f);
        bad += v[(n * 32 + y) * 32 + x] != want;
      }
  EXPECT_EQ(bad, 0);
  EXPECT_EQ(normalize_image(std::span<const uint8_t>(d.images.data(), 28 * 28), 28, 28, 1, d.mean, d.std)
                .shape(),
            Shape({1, 32, 32, 1}));
}

// Crop and flip on a gradient image: channel 0 holds row + 1, channel 1 column + 1 (0 = padding),
// mean 0 and std 1, so every output pixel says where it came from.
void check_crop_flip(int64_t side) {
  const int64_t n = 60, S = loader_image_side(side), pad = (S - side) / 2;
  Dataset d;
  d.name = "gradient";
  d.N = n;
  d.H = d.W = side;
  d.C = 3;
  d.num_classes = 1;
  d.labels.assign(n, 0);
  d.mean = {0, 0, 0};
  d.std = {1, 1, 1};
  for (int64_t i = 0; i < n; ++i)
    for (int64_t y = 0; y < side; ++y)
      for (int64_t x = 0; x < side; ++x) {
        d.images.push_back(static_cast<uint8_t>(y + 1));
        d.images.push_back(static_cast<uint8_t>(x + 1));
        d.images.push_back(static_cast<uint8_t>(i));  // which image
      }
  const uint64_t seed = 5;
  const int64_t epoch = 3;
  DataLoader loader(d, opts(n, true, true, false, 2, -1, seed));
  loader.start_epoch(epoch);
  Batch b;
  ASSERT_TRUE(loader.next(b));
  ASSERT_EQ(b.images.shape(), Shape({n, S, S, 3}));
  const std::vector<float> v = b.images.to_vector<float>();
  std::set<int> dys, dxs;
  int flips = 0, bad = 0;
  bool checked_example = false;
  for (int64_t p = 0; p < n; ++p) {
    const CropFlip cf = crop_flip(seed, epoch, p);
    ASSERT_TRUE(cf.dy >= 0 && cf.dy <= 8 && cf.dx >= 0 && cf.dx <= 8);
    dys.insert(cf.dy);
    dxs.insert(cf.dx);
    flips += cf.flip;
    const float* img = v.data() + p * S * S * 3;
    // Which image is at position p: the centre pixel's channel 2 (always inside for |shift| <= 4).
    const int64_t i = std::lround(img[((S / 2) * S + S / 2) * 3 + 2] * 255);
    EXPECT_EQ(i, epoch_permutation(n, seed, epoch)[p]);
    for (int64_t y = 0; y < S; ++y)
      for (int64_t x = 0; x < S; ++x) {
        // Definition: pad the SxS image by 4, cut SxS at (dy, dx), then mirror the columns.
        const int64_t cx = cf.flip ? S - 1 - x : x;
        const int64_t sy = y + cf.dy - 4 - pad, sx = cx + cf.dx - 4 - pad;
        const bool inside = sy >= 0 && sy < side && sx >= 0 && sx < side;
        const float* px = img + (y * S + x) * 3;
        const int want_r = inside ? int(sy + 1) : 0, want_c = inside ? int(sx + 1) : 0;
        bad += std::lround(px[0] * 255) != want_r || std::lround(px[1] * 255) != want_c ||
               px[0] != normalised(want_r, 0, 1);
      }
    // A worked example, flipped with dx = 0: output column S - 1 is crop column 0, which is
    // padded column -4, i.e. padding; output column 0 is crop column S - 1, padded column S - 5,
    // source column S - 5 - pad (stored as that + 1).
    if (cf.flip && cf.dx == 0) {
      checked_example = true;
      EXPECT_EQ(std::lround(img[((S / 2) * S + S - 1) * 3 + 1] * 255), 0);
      EXPECT_EQ(std::lround(img[((S / 2) * S + 0) * 3 + 1] * 255), S - 5 - pad + 1);
    }
  }
  EXPECT_TRUE(checked_example) << "no sample flipped with dx = 0: pick another seed";
  EXPECT_EQ(bad, 0) << "pixels differ from the crop-then-flip definition";
  EXPECT_EQ(dys.size(), 9u) << "every vertical offset in [0, 8] occurs in 60 samples";
  EXPECT_EQ(dxs.size(), 9u);
  EXPECT_GT(flips, 15);
  EXPECT_LT(flips, 45);

  // Without augmentation (or when evaluating) nothing moves.
  DataLoader plain(d, opts(n, true, false, false, 2, -1, seed));
  plain.start_epoch(epoch);
  ASSERT_TRUE(plain.next(b));
  const std::vector<float> u = b.images.to_vector<float>();
  for (int64_t y = 0; y < S; ++y)
    for (int64_t x = 0; x < S; ++x) {
      const bool inside = y >= pad && y < pad + side && x >= pad && x < pad + side;
      EXPECT_EQ(std::lround(u[(y * S + x) * 3 + 1] * 255), inside ? x - pad + 1 : 0);
    }
}

TEST(Loader, CropAndFlipFollowTheDefinition32) { check_crop_flip(32); }
TEST(Loader, CropAndFlipFollowTheDefinition28) { check_crop_flip(28); }

TEST(Loader, CropFlipDrawsDependOnSeedEpochPosition) {
  EXPECT_EQ(crop_flip(1, 2, 3).dy, crop_flip(1, 2, 3).dy);
  int same_seed = 0, same_epoch = 0;
  for (int p = 0; p < 50; ++p) {
    const CropFlip a = crop_flip(1, 2, p), b = crop_flip(9, 2, p), c = crop_flip(1, 3, p);
    same_seed += a.dy == b.dy && a.dx == b.dx && a.flip == b.flip;
    same_epoch += a.dy == c.dy && a.dx == c.dx && a.flip == c.flip;
  }
  EXPECT_LT(same_seed, 10);
  EXPECT_LT(same_epoch, 10);
}

TEST(Loader, SameBatchesWhateverTheWorkersAndWhenResumed) {
  const Dataset d = synthetic(37, 8, 3);
  DataLoader serial(d, opts(5, true, true, true, 0));
  const Got want = run_epoch(serial, 2);
  ASSERT_EQ(want.images.size(), 7u);
  for (const auto& [workers, prefetch] : std::vector<std::pair<int, int>>{{1, 1}, {3, -1}, {3, 1}, {4, 20}}) {
    DataLoader loader(d, opts(5, true, true, true, workers, prefetch));
    EXPECT_EQ(loader.workers(), workers);
    for (int rep = 0; rep < 2; ++rep) {  // and again on the same loader
      const Got got = run_epoch(loader, 2);
      EXPECT_EQ(got.images, want.images) << workers << " workers, prefetch " << prefetch;
      EXPECT_EQ(got.labels, want.labels) << workers << " workers, prefetch " << prefetch;
      EXPECT_EQ(got.index, (std::vector<int64_t>{0, 1, 2, 3, 4, 5, 6}));
    }
    // Resumed at batch 3 of epoch 2: the uninterrupted run's batches 3..6.
    const Got resumed = run_epoch(loader, 2, 3);
    ASSERT_EQ(resumed.images.size(), 4u);
    for (size_t k = 0; k < 4; ++k) {
      EXPECT_EQ(resumed.index[k], int64_t(k + 3));
      EXPECT_EQ(resumed.images[k], want.images[k + 3]);
      EXPECT_EQ(resumed.labels[k], want.labels[k + 3]);
    }
    EXPECT_TRUE(run_epoch(loader, 2, 7).images.empty());  // resumed at the end of the epoch
  }
  // A different seed gives other batches.
  DataLoader other(d, opts(5, true, true, true, 2, -1, 43));
  EXPECT_NE(run_epoch(other, 2).labels, want.labels);
}

TEST(Loader, EpochsVisitEverySampleOnceInNewOrders) {
  const Dataset d = synthetic(37, 4, 1);
  DataLoader loader(d, opts(5, true, true, /*drop_last=*/false, 3));
  EXPECT_EQ(loader.batches_per_epoch(), 8);
  std::set<std::vector<int64_t>> orders;
  for (int64_t e = 0; e < 4; ++e) {
    const Got g = run_epoch(loader, e);
    ASSERT_EQ(g.labels.size(), 8u);
    EXPECT_EQ(g.labels.back().size(), 2u);  // the partial last batch is kept
    std::vector<int64_t> order;
    for (const auto& l : g.labels) order.insert(order.end(), l.begin(), l.end());
    EXPECT_EQ(order, epoch_permutation(37, 42, e));
    std::vector<int64_t> sorted = order;
    std::sort(sorted.begin(), sorted.end());
    std::vector<int64_t> all(37);
    std::iota(all.begin(), all.end(), 0);
    EXPECT_EQ(sorted, all) << "epoch " << e << " does not visit every sample exactly once";
    orders.insert(order);
  }
  EXPECT_EQ(orders.size(), 4u) << "epochs repeat an order";

  // Evaluation keeps the dataset's order and needs no start_epoch other than 0.
  DataLoader eval(d, LoaderOptions::evaluation(10));
  const Got g = run_epoch(eval, 0);
  ASSERT_EQ(g.labels.size(), 4u);
  EXPECT_EQ(g.labels[3], (std::vector<int64_t>{30, 31, 32, 33, 34, 35, 36}));
  EXPECT_EQ(g.labels[0][0], 0);
}

TEST(Loader, DropLastDropsThePartialBatch) {
  const Dataset d = synthetic(37, 4, 1);
  DataLoader loader(d, opts(5, true, false, /*drop_last=*/true, 2));
  EXPECT_EQ(loader.batches_per_epoch(), 7);
  const Got g = run_epoch(loader, 1);
  ASSERT_EQ(g.labels.size(), 7u);
  std::set<int64_t> seen;
  for (const auto& l : g.labels) {
    EXPECT_EQ(l.size(), 5u);
    seen.insert(l.begin(), l.end());
  }
  EXPECT_EQ(seen.size(), 35u);
  const std::vector<int64_t> perm = epoch_permutation(37, 42, 1);
  EXPECT_EQ(seen.count(perm[35]) + seen.count(perm[36]), 0u) << "the last two of the order are dropped";
}

TEST(Loader, EpochPermutationIsAPermutationOfSeedAndEpoch) {
  const std::vector<int64_t> p = epoch_permutation(1000, 3, 0);
  std::vector<int64_t> s = p;
  std::sort(s.begin(), s.end());
  for (int64_t i = 0; i < 1000; ++i) ASSERT_EQ(s[i], i);
  EXPECT_EQ(p, epoch_permutation(1000, 3, 0));
  EXPECT_NE(p, epoch_permutation(1000, 3, 1));
  EXPECT_NE(p, epoch_permutation(1000, 4, 0));
  int fixed = 0;
  for (int64_t i = 0; i < 1000; ++i) fixed += p[i] == i;
  EXPECT_LT(fixed, 10);  // about 1 expected
  EXPECT_EQ(epoch_permutation(1, 3, 0), std::vector<int64_t>{0});
  EXPECT_TRUE(epoch_permutation(0, 3, 0).empty());
}

TEST(Loader, WorkerExceptionsReachNextInOrder) {
  for (const int workers : {0, 1, 3}) {
    Dataset d = synthetic(40, 4, 1);
    d.labels[12] = 99;  // batch 2 in evaluation order (batch size 5)
    DataLoader loader(d, opts(5, false, false, false, workers, 4));
    loader.start_epoch(0);
    Batch b;
    ASSERT_TRUE(loader.next(b));
    ASSERT_TRUE(loader.next(b));
    EXPECT_EQ(b.index, 1);
    expect_error([&] { loader.next(b); }, {"synthetic", "sample 12", "label 99", "outside [0, 40)"});
    expect_error([&] { loader.next(b); }, {"sample 12"});  // again, until start_epoch
    loader.start_epoch(0, 3);  // past the bad batch: the rest of the epoch is fine
    int64_t count = 0;
    while (loader.next(b)) ++count;
    EXPECT_EQ(count, 5) << workers << " workers";
  }
}

TEST(Loader, BadDatasetsAndOptions) {
  Dataset d = synthetic(10, 4, 1);
  d.labels.pop_back();
  expect_error([&] { DataLoader l(d, LoaderOptions::evaluation(2)); }, {"synthetic", "9 labels for 10 images"});
  d = synthetic(10, 4, 1);
  d.images.pop_back();
  expect_error([&] { DataLoader l(d, LoaderOptions::evaluation(2)); }, {"synthetic", "159 pixel bytes"});
  d = synthetic(10, 4, 1);
  expect_error([&] { DataLoader l(d, LoaderOptions::training(16, 0)); },
               {"batch size 16", "10 samples", "drop_last"});
  expect_error([&] { DataLoader l(d, LoaderOptions::training(0, 0)); }, {"batch size must be > 0"});
  d.std[0] = 0;
  expect_error([&] { DataLoader l(d, LoaderOptions::training(2, 0)); }, {"std of channel 0"});
  d = synthetic(10, 4, 1);
  DataLoader l(d, LoaderOptions::evaluation(4));
  EXPECT_EQ(l.batches_per_epoch(), 3);
  Batch b;
  expect_error([&] { l.next(b); }, {"start_epoch first"});
  expect_error([&] { l.start_epoch(0, 4); }, {"batch 4", "[0, 3]"});
  expect_error([&] { l.start_epoch(-1); }, {"epoch must be >= 0"});
}

// Runs fn on another thread; false if it has not returned after `seconds` (a hang).
bool finishes_within(double seconds, std::function<void()> fn) {
  auto done = std::make_shared<std::promise<void>>();
  std::future<void> f = done->get_future();
  std::thread([fn = std::move(fn), done] {
    fn();
    done->set_value();
  }).detach();
  return f.wait_for(std::chrono::duration<double>(seconds)) == std::future_status::ready;
}

TEST(Loader, StoppingMidEpochDoesNotHang) {
  const Dataset d = synthetic(3000, 8, 3);
  const bool ok = finishes_within(30, [&d] {
    {
      DataLoader never_started(d, opts(4, true, true, true, 3, 2));
    }
    {
      DataLoader not_consumed(d, opts(4, true, true, true, 3, 2));
      not_consumed.start_epoch(0);  // workers fill the queue and wait for room
      std::this_thread::sleep_for(std::chrono::milliseconds(20));
    }
    {
      DataLoader partly(d, opts(4, true, true, true, 4, 3));
      partly.start_epoch(0);
      Batch b;
      for (int k = 0; k < 5; ++k) partly.next(b);
      partly.start_epoch(1, 10);  // restart mid-epoch
      partly.next(b);
      EXPECT_EQ(b.index, 10);
      EXPECT_EQ(b.epoch, 1);
    }
  });
  if (!ok) {
    ADD_FAILURE() << "a DataLoader did not shut down within 30 s";
    std::abort();  // the hung thread holds the loader: nothing sane is left to do
  }
}

// Random Erasing and Mixup/CutMix on an in-memory dataset (training with augment): soft targets
// appear, erased pixels are not the loader's normalised values, and the batches stay the same for
// any number of workers.
TEST(Loader, ErasingAndMixingOnInMemoryData) {
  const Dataset d = synthetic(24, 8, 3);
  LoaderOptions o = opts(6, /*train=*/true, /*augment=*/true, /*drop_last=*/true, /*workers=*/0);
  o.reprob = 1.0;  // every image erased
  o.mixup = MixupOptions{};
  o.mixup.num_classes = 0;  // set by the loader from the dataset
  DataLoader serial(d, o);
  o.workers = 3;
  DataLoader threaded(d, o);
  LoaderOptions plain_opt = opts(6, true, true, true, 0);
  DataLoader plain(d, plain_opt);
  for (DataLoader* l : {&serial, &threaded, &plain}) l->start_epoch(2);
  Batch a, b, p;
  int batches = 0;
  while (serial.next(a)) {
    ASSERT_TRUE(threaded.next(b));
    ASSERT_TRUE(plain.next(p));
    ++batches;
    EXPECT_EQ(a.images.to_vector<float>(), b.images.to_vector<float>());
    EXPECT_EQ(a.targets.to_vector<float>(), b.targets.to_vector<float>());
    ASSERT_EQ(a.targets.shape(), Shape({6, 24}));
    EXPECT_FALSE(p.targets.defined());
    EXPECT_EQ(a.labels.to_vector<int64_t>(), p.labels.to_vector<int64_t>());  // same order
    EXPECT_NE(a.images.to_vector<float>(), p.images.to_vector<float>());
    const auto t = a.targets.to_vector<float>();
    for (int64_t i = 0; i < 6; ++i) {
      double row = 0;
      for (int64_t k = 0; k < 24; ++k) row += t[i * 24 + k];
      EXPECT_NEAR(row, 1.0, 1e-5);
    }
  }
  EXPECT_EQ(batches, 4);
}

}  // namespace
