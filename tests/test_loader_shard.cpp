// The DataLoader's data-parallel sharding (LoaderOptions::rank / world_size; loader.h, "Order:"),
// on small in-memory datasets whose label i is sample i (labels show which sample came):
//  - rank r of W takes the global positions r, r + W, ... of the epoch order, padded in training
//    to ceil(N / W) * W by repeating the order's start (the expected lists are built here from
//    epoch_permutation, as DistributedSampler builds them);
//  - augmentation (crop, flip, Random Erasing) is keyed by the global position: the ranks' batch
//    i at batch size B together are, pixel for pixel, the unsharded batch i at batch size W*B;
//    a padded position's pixels follow the crop/flip definition at that position;
//  - evaluation: every sample exactly once across the ranks, no padding;
//  - Mixup/CutMix of rank r's batch i is the unsharded loader's draw for batch i*W + r;
//  - bad rank / world_size refused with one line.
#include <gtest/gtest.h>

#include <algorithm>
#include <cstdint>
#include <utility>
#include <vector>

#include "tensor/tensor.h"
#include "tests/testing.h"
#include "train/data/dataset.h"
#include "train/data/loader.h"

using namespace cnx;
using cnx::test::expect_error;

namespace {

// n images of side x side x c with random pixels; label of image i is i.
Dataset synthetic(int64_t n, int64_t side, int64_t c, uint64_t seed = 7) {
  Dataset d;
  d.name = "synthetic";
  d.N = n;
  d.H = d.W = side;
  d.C = c;
  d.num_classes = n;
  d.images = test::random_bytes(n * side * side * c, seed);
  for (int64_t i = 0; i < n; ++i) d.labels.push_back(i);
  d.class_names.resize(static_cast<size_t>(n));
  d.mean = {0.25f, 0.5f, 0.75f};
  d.std = {0.5f, 0.25f, 0.125f};
  return d;
}

LoaderOptions sharded(int64_t batch, bool train, bool drop_last, int rank, int world, int workers = 0,
                      uint64_t seed = 42) {
  LoaderOptions o = train ? LoaderOptions::training(batch, seed) : LoaderOptions::evaluation(batch);
  o.drop_last = drop_last;
  o.workers = workers;
  o.rank = rank;
  o.world_size = world;
  return o;
}

// One delivered sample: its label and its finished pixels.
using Sample = std::pair<int64_t, std::vector<float>>;

// An epoch's batches, each a list of samples in batch order.
std::vector<std::vector<Sample>> run_epoch(DataLoader& loader, int64_t epoch, int64_t first = 0) {
  std::vector<std::vector<Sample>> out;
  loader.start_epoch(epoch, first);
  Batch b;
  while (loader.next(b)) {
    EXPECT_EQ(b.index, first + static_cast<int64_t>(out.size()));
    const std::vector<int64_t> labels = b.labels.to_vector<int64_t>();
    const std::vector<float> images = b.images.to_vector<float>();
    const size_t image = labels.empty() ? 0 : images.size() / labels.size();
    std::vector<Sample> batch;
    for (size_t k = 0; k < labels.size(); ++k)
      batch.emplace_back(labels[k], std::vector<float>(images.begin() + k * image, images.begin() + (k + 1) * image));
    out.push_back(std::move(batch));
  }
  return out;
}

std::vector<int64_t> labels_of(const std::vector<std::vector<Sample>>& batches) {
  std::vector<int64_t> l;
  for (const auto& b : batches)
    for (const Sample& s : b) l.push_back(s.first);
  return l;
}

// DistributedSampler's training indices of rank r, written from its definition: the order padded
// with its own start (repeated while the padding exceeds it) to ceil(n / W) * W, then [r::W].
std::vector<int64_t> distributed_sampler(const std::vector<int64_t>& order, int rank, int world) {
  const size_t n = order.size(), total = (n + world - 1) / world * world;
  std::vector<int64_t> padded = order;
  while (padded.size() < total) {
    const size_t take = std::min(n, total - padded.size());
    padded.insert(padded.end(), order.begin(), order.begin() + static_cast<std::ptrdiff_t>(take));
  }
  std::vector<int64_t> mine;
  for (size_t p = static_cast<size_t>(rank); p < total; p += static_cast<size_t>(world)) mine.push_back(padded[p]);
  return mine;
}

// The finished (S, S, 1) image of sample `src` (side x side x 1, side != 28 so S = side) at
// global position p under the crop/flip definition of loader.h.
std::vector<float> expected_crop_flip(const Dataset& d, int64_t src, uint64_t seed, int64_t epoch, int64_t p) {
  const CropFlip cf = crop_flip(seed, epoch, p);
  const int64_t S = d.H;
  std::vector<float> out(static_cast<size_t>(S * S));
  for (int64_t y = 0; y < S; ++y)
    for (int64_t x = 0; x < S; ++x) {
      const int64_t sy = y + cf.dy - kCropPadding;
      const int64_t sx = (cf.flip ? S - 1 - x : x) + cf.dx - kCropPadding;
      const int v = sy >= 0 && sy < S && sx >= 0 && sx < S ? d.images[static_cast<size_t>((src * S + sy) * S + sx)] : 0;
      out[static_cast<size_t>(y * S + x)] =
          static_cast<float>((v / 255.0 - double(d.mean[0])) / double(d.std[0]));
    }
  return out;
}

// With W ranks at batch size B, rank r's batch i entry k is global position p = r + W*(i*B + k):
// the unsharded loader's (batch size W*B) sample p, same label and same pixels, for augmentation
// with crop, flip and Random Erasing; so the ranks' batch i together are the unsharded batch i.
TEST(LoaderShard, RanksTogetherAreTheUnshardedBatchPixelForPixel) {
  const Dataset d = synthetic(37, 8, 3);
  for (const int W : {2, 3}) {
    const int64_t B = 4;
    LoaderOptions whole_opt = sharded(W * B, true, true, 0, 1);
    whole_opt.reprob = 1.0;  // every image erased: the erasing draws are checked too
    DataLoader whole(d, whole_opt);
    for (const int64_t epoch : {0, 3}) {
      const auto want = run_epoch(whole, epoch);
      ASSERT_EQ(static_cast<int64_t>(want.size()), 37 / (W * B));
      std::vector<std::vector<std::vector<Sample>>> got(W);
      for (int r = 0; r < W; ++r) {
        LoaderOptions o = whole_opt;
        o.batch_size = B;
        o.rank = r;
        o.world_size = W;
        o.workers = r == 0 ? 0 : 2;  // the workers change nothing
        DataLoader loader(d, o);
        EXPECT_EQ(loader.batches_per_epoch(), (37 + W - 1) / W / B);
        got[r] = run_epoch(loader, epoch);
        ASSERT_EQ(got[r].size(), want.size()) << "W=" << W << " rank " << r;
      }
      for (size_t i = 0; i < want.size(); ++i) {
        std::vector<Sample> together;
        for (int r = 0; r < W; ++r) {
          ASSERT_EQ(static_cast<int64_t>(got[r][i].size()), B);
          for (int64_t k = 0; k < B; ++k) {
            const int64_t p = r + W * (static_cast<int64_t>(i) * B + k);  // global position
            const Sample& s = got[r][i][static_cast<size_t>(k)];
            const Sample& w = want[static_cast<size_t>(p / (W * B))][static_cast<size_t>(p % (W * B))];
            EXPECT_EQ(s.first, w.first) << "W=" << W << " rank " << r << " batch " << i << " entry " << k;
            EXPECT_EQ(s.second, w.second) << "W=" << W << " rank " << r << " batch " << i << " entry " << k;
            together.push_back(s);
          }
        }
        std::vector<Sample> whole_batch = want[i];
        std::sort(together.begin(), together.end());
        std::sort(whole_batch.begin(), whole_batch.end());
        EXPECT_TRUE(together == whole_batch) << "W=" << W << " epoch " << epoch << " batch " << i
                                             << ": the ranks' batches are not the unsharded batch";
      }
    }
  }
}

// N = 10 over W = 4: padded to 12, shards of 3, indices as DistributedSampler's; N = 2 over
// W = 5: the padding (3) exceeds N, the order repeats. The padded positions' pixels are the
// crop/flip of their own global position, not of the sample's first position.
TEST(LoaderShard, TrainingShardsArePaddedAndStridedAsDistributedSampler) {
  for (const auto& [n, W] : std::vector<std::pair<int64_t, int>>{{10, 4}, {2, 5}, {12, 4}, {7, 1}}) {
    const Dataset d = synthetic(n, 8, 1);
    const int64_t shard = (n + W - 1) / W;
    for (const int64_t epoch : {0, 1}) {
      const std::vector<int64_t> perm = epoch_permutation(n, 42, epoch);
      std::vector<int64_t> all;
      for (int r = 0; r < W; ++r) {
        const std::vector<int64_t> want = distributed_sampler(perm, r, W);
        ASSERT_EQ(static_cast<int64_t>(want.size()), shard);
        // Whole shard in one batch (drop_last on), and batches of 2 with the partial one kept.
        DataLoader one(d, sharded(shard, true, true, r, W));
        EXPECT_EQ(one.batches_per_epoch(), 1);
        const auto batches = run_epoch(one, epoch);
        EXPECT_EQ(labels_of(batches), want) << "n=" << n << " W=" << W << " rank " << r;
        DataLoader twos(d, sharded(2, true, false, r, W, 2));
        EXPECT_EQ(twos.batches_per_epoch(), (shard + 1) / 2);
        EXPECT_EQ(labels_of(run_epoch(twos, epoch)), want);
        for (int64_t j = 0; j < shard; ++j) {
          const int64_t p = r + int64_t{W} * j;
          EXPECT_EQ(batches[0][static_cast<size_t>(j)].second, expected_crop_flip(d, want[static_cast<size_t>(j)], 42, epoch, p))
              << "n=" << n << " W=" << W << " rank " << r << " position " << p;
        }
        all.insert(all.end(), want.begin(), want.end());
      }
      std::sort(all.begin(), all.end());
      for (int64_t i = 0; i < n; ++i)
        EXPECT_TRUE(std::binary_search(all.begin(), all.end(), i)) << "sample " << i << " is on no rank";
    }
  }
  // drop_last on the shard: 10 over 4 at batch 2 keeps 1 batch of the shard's 3 samples.
  const Dataset d = synthetic(10, 8, 1);
  DataLoader l(d, sharded(2, true, true, 3, 4));
  EXPECT_EQ(l.batches_per_epoch(), 1);
  EXPECT_EQ(labels_of(run_epoch(l, 0)),
            (std::vector<int64_t>{epoch_permutation(10, 42, 0)[3], epoch_permutation(10, 42, 0)[7]}));
}

// Resuming a shard mid-epoch continues it exactly; workers and prefetch change nothing.
TEST(LoaderShard, ResumedShardContinuesExactly) {
  const Dataset d = synthetic(41, 8, 3);
  LoaderOptions o = sharded(3, true, true, 1, 3);
  o.reprob = 0.5;
  DataLoader serial(d, o);
  const auto want = run_epoch(serial, 2);
  ASSERT_EQ(want.size(), 4u);  // 14 samples a shard
  o.workers = 3;
  o.prefetch = 1;
  DataLoader threaded(d, o);
  EXPECT_EQ(run_epoch(threaded, 2), want);
  const auto resumed = run_epoch(threaded, 2, 2);
  ASSERT_EQ(resumed.size(), 2u);
  EXPECT_EQ(resumed[0], want[2]);
  EXPECT_EQ(resumed[1], want[3]);
}

// Evaluation: rank r takes the dataset positions r, r + W, ...; no padding, every sample once,
// the same pixels as the unsharded evaluation; batch counts may differ; an empty shard has none.
TEST(LoaderShard, EvaluationCountsEverySampleOnce) {
  const Dataset d = synthetic(10, 8, 3);
  DataLoader whole(d, LoaderOptions::evaluation(4));
  const auto want = run_epoch(whole, 0);
  std::vector<Sample> want_flat;
  for (const auto& b : want) want_flat.insert(want_flat.end(), b.begin(), b.end());
  ASSERT_EQ(want_flat.size(), 10u);
  const int W = 3;
  const std::vector<std::vector<int64_t>> expected{{0, 3, 6, 9}, {1, 4, 7}, {2, 5, 8}};
  const std::vector<int64_t> batches{2, 1, 1};  // at batch size 3, the last partial one kept
  std::vector<Sample> together;
  for (int r = 0; r < W; ++r) {
    DataLoader loader(d, sharded(3, false, false, r, W, r));
    EXPECT_EQ(loader.batches_per_epoch(), batches[static_cast<size_t>(r)]) << "rank " << r;
    for (const int64_t epoch : {0, 1}) {  // the same every epoch
      const auto got = run_epoch(loader, epoch);
      EXPECT_EQ(labels_of(got), expected[static_cast<size_t>(r)]) << "rank " << r;
      for (const auto& b : got)
        for (const Sample& s : b) {
          EXPECT_EQ(s, want_flat[static_cast<size_t>(s.first)]) << "rank " << r << " sample " << s.first;
          if (epoch == 0) together.push_back(s);
        }
    }
  }
  std::sort(together.begin(), together.end());
  EXPECT_TRUE(together == want_flat) << "the ranks together are not the evaluation set, once each";

  // Fewer samples than ranks: rank 2 of 3 over 2 samples has no batch, and that is no error.
  const Dataset tiny = synthetic(2, 8, 1);
  DataLoader empty(tiny, sharded(4, false, false, 2, 3));
  EXPECT_EQ(empty.batches_per_epoch(), 0);
  EXPECT_TRUE(run_epoch(empty, 0).empty());
  DataLoader first(tiny, sharded(4, false, false, 1, 3, 2));
  EXPECT_EQ(labels_of(run_epoch(first, 0)), std::vector<int64_t>{1});
}

// Mixup/CutMix: rank r's batch i draws what the unsharded loader draws for batch i*W + r (its
// key); the ranks' draws differ. With W = 1 the key is the batch index (the other tests' batches
// are unchanged).
TEST(LoaderShard, MixupDrawsDifferBetweenRanks) {
  const Dataset d = synthetic(24, 8, 3);
  LoaderOptions o = sharded(4, true, true, 0, 1);
  o.mixup = MixupOptions{};  // Mixup 0.8, CutMix 1.0, switch 0.5
  o.output = LoaderOutput::u8;  // the batch's MixParams travel in Batch::bytes
  auto mixes = [&](const LoaderOptions& opt) {
    DataLoader loader(d, opt);
    loader.start_epoch(1);
    std::vector<MixParams> m;
    Batch b;
    while (loader.next(b)) m.push_back(b.bytes->mix);
    return m;
  };
  const std::vector<MixParams> whole = mixes(o);
  ASSERT_EQ(whole.size(), 6u);
  auto same = [](const MixParams& a, const MixParams& b) {
    return a.mode == b.mode && a.lam == b.lam && a.one_minus_lam == b.one_minus_lam && a.top == b.top &&
           a.left == b.left && a.height == b.height && a.width == b.width;
  };
  std::vector<std::vector<MixParams>> ranks;
  for (int r = 0; r < 2; ++r) {
    LoaderOptions s = o;
    s.rank = r;
    s.world_size = 2;
    ranks.push_back(mixes(s));
    ASSERT_EQ(ranks[r].size(), 3u);
    for (size_t i = 0; i < 3; ++i)
      EXPECT_TRUE(same(ranks[r][i], whole[i * 2 + r])) << "rank " << r << " batch " << i;
  }
  int differ = 0;
  for (size_t i = 0; i < 3; ++i) differ += !same(ranks[0][i], ranks[1][i]);
  EXPECT_EQ(differ, 3) << "the ranks draw the same Mixup/CutMix";
}

TEST(LoaderShard, BadRankOrWorldSize) {
  const Dataset d = synthetic(10, 4, 1);
  expect_error([&] { DataLoader l(d, sharded(2, true, true, 0, 0)); }, {"world_size must be >= 1", "got 0"});
  expect_error([&] { DataLoader l(d, sharded(2, true, true, 0, -3)); }, {"world_size must be >= 1", "got -3"});
  expect_error([&] { DataLoader l(d, sharded(2, true, true, -1, 2)); }, {"rank -1", "outside [0, world_size) = [0, 2)"});
  expect_error([&] { DataLoader l(d, sharded(2, false, false, 2, 2)); }, {"rank 2", "outside [0, world_size) = [0, 2)"});
  // A batch larger than the shard with drop_last: the message names the shard.
  expect_error([&] { DataLoader l(d, sharded(4, true, true, 1, 4)); },
               {"batch size 4", "3 samples", "rank 1 of 4", "10 in all", "drop_last"});
  const std::string one_line = test::error_of([&] { DataLoader l(d, sharded(2, true, true, 5, 4)); });
  EXPECT_EQ(one_line.find('\n'), std::string::npos) << one_line;
}

}  // namespace
