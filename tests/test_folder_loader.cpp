// The DataLoader over an ImageFolder of generated JPEGs (train/data/loader.h): shapes, labels,
// normalisation, the evaluation transform, determinism under a seed whatever the number of
// workers, Mixup/CutMix soft targets and Random Erasing in the batch, and bad files (zero-byte,
// truncated header, text, PNG) skipped and counted without a crash.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <filesystem>
#include <fstream>

#include "tests/testing.h"
#include "train/data/loader.h"
#include "train/data/synthetic_folder.h"

namespace cnx {
namespace {

namespace fs = std::filesystem;

class FolderLoaderTest : public ::testing::Test {
 protected:
  void SetUp() override {
    std::string tmpl = (fs::temp_directory_path() / "cnx_test_folder_loader_XXXXXX").string();
    ASSERT_NE(mkdtemp(tmpl.data()), nullptr);
    root_ = tmpl;
  }
  void TearDown() override { fs::remove_all(root_); }

  // root/{train,val}/{horizontal,vertical}: n_train / n_val stripes JPEGs of 40x48 per class.
  void make(int64_t n_train, int64_t n_val) {
    SyntheticFolderOptions o;
    o.train_per_class = n_train;
    o.val_per_class = n_val;
    o.height = 40;
    o.width = 48;
    fs::remove_all(root_);
    write_stripes_folder(root_, o);
  }

  static std::vector<Batch> epoch(DataLoader& loader, int64_t e) {
    loader.start_epoch(e);
    std::vector<Batch> out;
    Batch b;
    while (loader.next(b)) out.push_back(b);
    return out;
  }

  std::string root_;
};

LoaderOptions folder_training(int64_t batch, int64_t size, int workers) {
  LoaderOptions o = LoaderOptions::training(batch, 7);
  o.workers = workers;
  o.folder.input_size = size;
  return o;
}

TEST_F(FolderLoaderTest, EvaluationBatchesHaveLabelsInOrderAndNormalisedPixels) {
  make(2, 3);
  const ImageFolder val = scan_image_folder(root_, "val");
  LoaderOptions o = LoaderOptions::evaluation(4);
  o.folder.input_size = 32;
  o.workers = 2;
  DataLoader loader(val, o);
  EXPECT_EQ(loader.num_classes(), 2);
  EXPECT_EQ(loader.batches_per_epoch(), 2);  // 6 files, batch 4, last one partial
  const auto batches = epoch(loader, 0);
  ASSERT_EQ(batches.size(), 2u);
  EXPECT_EQ(batches[0].images.shape(), Shape({4, 32, 32, 3}));
  EXPECT_EQ(batches[1].images.shape(), Shape({2, 32, 32, 3}));
  EXPECT_FALSE(batches[0].targets.defined());
  std::vector<int64_t> labels;
  for (const Batch& b : batches)
    for (int64_t l : b.labels.to_vector<int64_t>()) labels.push_back(l);
  EXPECT_EQ(labels, (std::vector<int64_t>{0, 0, 0, 1, 1, 1}));

  // The first image by hand: decode, eval_transform, normalise with ImageNet's mean/std.
  DecodedImage img;
  std::string err;
  ASSERT_TRUE(decode_jpeg(val.samples[0].first, img, err)) << err;
  const auto x = eval_transform(img.rgb, img.H, img.W, 3, 32, -1.0);
  const float mean[3] = {0.485f, 0.456f, 0.406f}, sd[3] = {0.229f, 0.224f, 0.225f};
  const auto got = batches[0].images.to_vector<float>();
  for (size_t k = 0; k < x.size(); ++k) {
    const auto want = static_cast<float>((x[k] / 255.0 - double(mean[k % 3])) / double(sd[k % 3]));
    ASSERT_EQ(got[k], want) << "element " << k;
  }
}

TEST_F(FolderLoaderTest, TrainingIsDeterministicWhateverTheWorkers) {
  make(6, 1);
  const ImageFolder train = scan_image_folder(root_, "train");
  LoaderOptions o = folder_training(4, 24, 0);
  o.reprob = 0.25;
  o.mixup = MixupOptions{};  // Mixup 0.8, CutMix 1.0, switch 0.5, smoothing 0.1
  DataLoader serial(train, o);
  o.workers = 3;
  o.prefetch = 2;
  DataLoader threaded(train, o);
  for (int64_t e = 0; e < 2; ++e) {
    const auto a = epoch(serial, e), b = epoch(threaded, e);
    ASSERT_EQ(a.size(), 3u);
    ASSERT_EQ(b.size(), 3u);
    for (size_t i = 0; i < a.size(); ++i) {
      EXPECT_EQ(a[i].images.to_vector<float>(), b[i].images.to_vector<float>()) << "epoch " << e << " batch " << i;
      EXPECT_EQ(a[i].targets.to_vector<float>(), b[i].targets.to_vector<float>());
      EXPECT_EQ(a[i].labels.to_vector<int64_t>(), b[i].labels.to_vector<int64_t>());
    }
  }
  // Another epoch, other augmentation; resuming at batch 1 gives the same batch 1.
  const auto e0 = epoch(serial, 0), e1 = epoch(serial, 1);
  EXPECT_NE(e0[0].images.to_vector<float>(), e1[0].images.to_vector<float>());
  serial.start_epoch(1, 1);
  Batch b;
  ASSERT_TRUE(serial.next(b));
  EXPECT_EQ(b.index, 1);
  EXPECT_EQ(b.images.to_vector<float>(), e1[1].images.to_vector<float>());
}

TEST_F(FolderLoaderTest, MixupGivesSoftTargetsThatSumToOne) {
  make(4, 1);
  const ImageFolder train = scan_image_folder(root_, "train");
  LoaderOptions o = folder_training(4, 16, 1);
  o.mixup = MixupOptions{};
  DataLoader loader(train, o);
  int mixed = 0;
  for (int64_t e = 0; e < 4; ++e)
    for (const Batch& b : epoch(loader, e)) {
      ASSERT_EQ(b.targets.shape(), Shape({4, 2}));
      const auto t = b.targets.to_vector<float>();
      const auto y = b.labels.to_vector<int64_t>();
      for (int64_t i = 0; i < 4; ++i) {
        EXPECT_NEAR(t[i * 2] + t[i * 2 + 1], 1.0, 1e-6);
        // Smoothing 0.1 over 2 classes: every target is in [0.05, 0.95].
        EXPECT_GE(t[i * 2 + y[i]], 0.05 - 1e-6);
        EXPECT_LE(t[i * 2 + y[i]], 0.95 + 1e-6);
      }
      mixed += std::abs(t[y[0]] - 0.95f) > 1e-6;  // pair (0, 3) mixed unless lam = 1
    }
  EXPECT_GT(mixed, 0);
  // An odd batch size cannot be mixed with its reverse.
  LoaderOptions odd = folder_training(3, 16, 1);
  odd.mixup = MixupOptions{};
  test::expect_error([&] { DataLoader bad(train, odd); }, {"even batch size", "3"});
}

TEST_F(FolderLoaderTest, AugmentationChangesImagesAndKeepsShapes) {
  make(2, 1);
  const ImageFolder train = scan_image_folder(root_, "train");
  LoaderOptions aug = folder_training(2, 20, 1);
  LoaderOptions plain = aug;
  plain.augment = false;  // training order, evaluation transform
  DataLoader a(train, aug), p(train, plain);
  const auto ba = epoch(a, 0), bp = epoch(p, 0);
  ASSERT_EQ(ba.size(), 2u);
  for (size_t i = 0; i < ba.size(); ++i) {
    EXPECT_EQ(ba[i].images.shape(), Shape({2, 20, 20, 3}));
    EXPECT_EQ(ba[i].labels.to_vector<int64_t>(), bp[i].labels.to_vector<int64_t>());
    EXPECT_NE(ba[i].images.to_vector<float>(), bp[i].images.to_vector<float>());
  }
  // With colour jitter instead of RandAugment it still runs, and differs from RandAugment.
  LoaderOptions cj = aug;
  cj.folder.auto_augment = "none";
  DataLoader c(train, cj);
  EXPECT_NE(epoch(c, 0)[0].images.to_vector<float>(), ba[0].images.to_vector<float>());
  LoaderOptions bad = aug;
  bad.folder.auto_augment = "rand-m9-inc0";
  test::expect_error([&] { DataLoader d(train, bad); }, {"--aa rand-m9-inc0"});
}

TEST_F(FolderLoaderTest, BadFilesAreSkippedAndCounted) {
  make(4, 3);
  const fs::path tr = fs::path(root_) / "train" / "horizontal", va = fs::path(root_) / "val" / "vertical";
  std::ofstream(tr / "zero.jpg").close();                                  // zero bytes
  std::ofstream(tr / "text.jpg") << "not an image at all\n";               // not a JPEG
  std::ofstream(va / "image.png", std::ios::binary) << "\x89PNG\r\n\x1a\n";  // a PNG signature
  {
    std::ifstream in(tr / "00000.jpg", std::ios::binary);
    std::string bytes((std::istreambuf_iterator<char>(in)), {});
    std::ofstream(va / "cut.jpg", std::ios::binary) << bytes.substr(0, 40);  // cut in its header
  }
  const ImageFolder train = scan_image_folder(root_, "train");
  ASSERT_EQ(train.samples.size(), 10u);
  LoaderOptions o = folder_training(5, 16, 2);
  o.folder.max_bad_fraction = 0.5;
  DataLoader loader(train, o);
  const auto batches = epoch(loader, 0);
  ASSERT_EQ(batches.size(), 2u);
  for (const Batch& b : batches) EXPECT_EQ(b.images.dim(0), 5);  // replaced: full batches
  // Attempts are counted: each bad file once when drawn, and "text.jpg" is followed by
  // "zero.jpg" in dataset order, so the search for text's replacement may fail on zero too.
  EXPECT_GE(loader.decode_failures(), 2);
  EXPECT_LE(loader.decode_failures(), 3);

  const ImageFolder val = scan_image_folder(root_, "val");
  LoaderOptions e = LoaderOptions::evaluation(100);
  e.folder.input_size = 16;
  e.folder.max_bad_fraction = 0.5;
  DataLoader eval(val, e);
  const auto vb = epoch(eval, 0);
  ASSERT_EQ(vb.size(), 1u);
  EXPECT_EQ(vb[0].images.dim(0), 6);  // 8 files, 2 left out
  EXPECT_EQ(eval.decode_failures(), 2);

  // Over the allowed fraction: a one-line error from next(), no crash.
  e.folder.max_bad_fraction = 0.1;
  DataLoader strict(val, e);
  strict.start_epoch(0);
  Batch b;
  test::expect_error([&] { strict.next(b); }, {"could not be decoded", "allowed 10%"});
}

// Data-parallel shards of an ImageFolder (loader.h, "Order:"): with W = 2 at batch size 2, the
// ranks' batch i together are the unsharded batch i at batch size 4, image for image (the
// RandomResizedCrop / flip / RandAugment / erasing draws are keyed by the global position), also
// when bad files are replaced (the replacement, searched in dataset order, may come from the
// other rank's shard, and is the same as unsharded). Evaluation: every file once across ranks.
TEST_F(FolderLoaderTest, ShardsTogetherAreTheUnshardedBatches) {
  make(5, 3);
  const fs::path tr = fs::path(root_) / "train" / "horizontal";
  std::ofstream(tr / "00001a.jpg") << "not an image at all\n";  // sorted after 00001.jpg
  const ImageFolder train = scan_image_folder(root_, "train");
  ASSERT_EQ(train.samples.size(), 11u);
  LoaderOptions o = folder_training(4, 16, 0);
  o.reprob = 0.5;
  o.folder.max_bad_fraction = 0.5;
  DataLoader whole(train, o);
  int64_t replaced = 0;  // the bad file drawn among the compared positions (checked below)
  for (int64_t e = 0; e < 3; ++e) {
    const auto want = epoch(whole, e);
    ASSERT_EQ(want.size(), 2u);  // 11 files at batch 4, drop_last
    replaced += whole.decode_failures();
    std::vector<std::vector<Batch>> got;
    for (int r = 0; r < 2; ++r) {
      LoaderOptions s = o;
      s.batch_size = 2;
      s.rank = r;
      s.world_size = 2;
      s.workers = r;
      DataLoader loader(train, s);
      EXPECT_EQ(loader.batches_per_epoch(), 3);  // 6 of the 12 padded positions at batch 2
      got.push_back(epoch(loader, e));
      ASSERT_EQ(got[r].size(), 3u);
    }
    const int64_t image = 16 * 16 * 3;
    for (size_t i = 0; i < want.size(); ++i) {
      const auto w_img = want[i].images.to_vector<float>();
      const auto w_lab = want[i].labels.to_vector<int64_t>();
      for (int r = 0; r < 2; ++r) {
        const auto g_img = got[r][i].images.to_vector<float>();
        const auto g_lab = got[r][i].labels.to_vector<int64_t>();
        ASSERT_EQ(g_lab.size(), 2u);  // a bad file is replaced: the batch stays full
        for (int64_t k = 0; k < 2; ++k) {
          const int64_t q = r + 2 * k;  // the global position 4i + q, entry q of the whole batch
          EXPECT_EQ(g_lab[k], w_lab[q]) << "epoch " << e << " batch " << i << " rank " << r;
          EXPECT_TRUE(std::equal(g_img.begin() + k * image, g_img.begin() + (k + 1) * image,
                                 w_img.begin() + q * image))
              << "epoch " << e << " batch " << i << " rank " << r << " entry " << k;
        }
      }
    }
  }
  EXPECT_GT(replaced, 0) << "the bad file was never drawn: the replacement is not tested";

  const ImageFolder val = scan_image_folder(root_, "val");
  LoaderOptions ev = LoaderOptions::evaluation(2);
  ev.folder.input_size = 16;
  std::vector<int64_t> labels(6, -1);
  for (int r = 0; r < 4; ++r) {
    LoaderOptions s = ev;
    s.rank = r;
    s.world_size = 4;
    DataLoader loader(val, s);
    EXPECT_EQ(loader.batches_per_epoch(), 1);  // 2, 2, 1, 1 files
    int64_t j = 0;
    for (const Batch& b : epoch(loader, 0))
      for (int64_t l : b.labels.to_vector<int64_t>()) labels.at(static_cast<size_t>(r + 4 * j++)) = l;
    EXPECT_EQ(j, r < 2 ? 2 : 1);
  }
  EXPECT_EQ(labels, (std::vector<int64_t>{0, 0, 0, 1, 1, 1}));
}

TEST(SyntheticFolder, RefusesANonEmptyFolder) {
  std::string tmpl = (fs::temp_directory_path() / "cnx_test_synth_XXXXXX").string();
  ASSERT_NE(mkdtemp(tmpl.data()), nullptr);
  std::ofstream(fs::path(tmpl) / "keep.txt") << "precious";
  test::expect_error([&] { write_stripes_folder(tmpl); }, {"not an empty folder", "nothing was written"});
  EXPECT_TRUE(fs::exists(fs::path(tmpl) / "keep.txt"));
  EXPECT_FALSE(fs::exists(fs::path(tmpl) / "train"));
  fs::remove_all(tmpl);
}

}  // namespace
}  // namespace cnx
