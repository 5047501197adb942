// The training loop: it learns, it is reproducible, and it resumes exactly. Every test trains
// a tiny ConvNeXt on a tiny Fashion-MNIST-format dataset written here (idx .gz files).
#include <gtest/gtest.h>
#include <sys/wait.h>

#include <cmath>
#include <filesystem>
#include <fstream>
#include <limits>
#include <sstream>

#include "models/convnext.h"
#include "models/safetensors.h"
#include "tests/testing.h"
#include "train/checkpoint.h"
#include "train/trainer.h"

using namespace cnx;
namespace fs = std::filesystem;

namespace {

void write_split(const fs::path& dir, const std::string& prefix, int n, uint64_t seed) {
  test::write_quadrant_split(dir.string(), prefix, n, seed);
}

class Training : public ::testing::Test {
 protected:
  void SetUp() override {
    root_ = fs::temp_directory_path() /
            (std::string("cnx_train_") + ::testing::UnitTest::GetInstance()->current_test_info()->name());
    fs::remove_all(root_);
    fs::create_directories(root_ / "data");
    write_split(root_ / "data", "train", 64, 1);
    write_split(root_ / "data", "t10k", 32, 2);
  }
  void TearDown() override { fs::remove_all(root_); }

  // A tiny model and run: 64 images, batch 16 -> 4 optimiser steps per epoch.
  TrainConfig config() const {
    TrainConfig c;
    c.depths = {1, 1};
    c.dims = {8, 16};
    c.data_path = (root_ / "data").string();
    c.batch_size = 16;
    c.epochs = 2;
    c.augment = true;  // off by default; exercised here (crop and flip draws are in the state)
    c.lr = 0.5 * 16 / 4096.0;  // 2e-3 (0.5 per total batch 4096)
    c.warmup_epochs = 0;
    c.num_workers = 2;
    c.log_every = 1000;
    c.progress_bar = false;
    c.save_ckpt_num = 10;
    return c;
  }
  std::string out(const std::string& name) const { return (root_ / name).string(); }

  // The model of config(), for one-channel images, with `classes` outputs.
  static ConvNeXtConfig model_config(int64_t classes) {
    ConvNeXtConfig mc;
    mc.depths = {1, 1};
    mc.dims = {8, 16};
    mc.in_chans = 1;
    mc.num_classes = classes;
    return mc;
  }

  fs::path root_;
};

}  // namespace

// A diverged model (NaN or infinite logits) scores 0%, not 100% (issue 13, item 1: NaN rows
// used to count as hits, since no class compares >= NaN), and its loss is NaN.
TEST_F(Training, NonFiniteLogitsAreNeverCorrect) {
  Generator g(3);
  ConvNeXt model(model_config(10), g);
  const std::string data = (root_ / "data").string();
  const EvalResult healthy = evaluate(model, "fashion_mnist", data, 16, 1);
  ASSERT_EQ(healthy.images, 32);
  EXPECT_TRUE(std::isfinite(healthy.loss));
  for (const float bad : {std::numeric_limits<float>::quiet_NaN(), std::numeric_limits<float>::infinity()}) {
    for (Parameter& p : model.parameters())
      if (p.name == "head.bias") p.value.data<float>()[3] = bad;  // class 3's logit, every row
    const EvalResult r = evaluate(model, "fashion_mnist", data, 16, 1);
    EXPECT_EQ(r.acc1, 0.0) << bad;
    EXPECT_EQ(r.acc5, 0.0) << bad;
    EXPECT_TRUE(std::isnan(r.loss)) << bad;
  }
}

TEST_F(Training, OverfitsOneBatch) {
  // 16 images, batch 16: every step sees the same batch (in a new order).
  fs::create_directories(root_ / "one_batch");
  write_split(root_ / "one_batch", "train", 16, 3);
  write_split(root_ / "one_batch", "t10k", 16, 3);  // the same images
  TrainConfig c = config();
  c.data_path = (root_ / "one_batch").string();
  c.dims = {16, 32};
  c.epochs = 100;
  c.drop_path = 0;
  c.smoothing = 0;
  c.augment = false;
  c.weight_decay = 0;
  c.lr = 4.0 * 16 / 4096.0;  // 1.6e-2
  c.min_lr = 1e-3;
  const TrainResult r = train(c);
  ASSERT_EQ(r.losses.size(), 100u);
  EXPECT_NEAR(r.losses.front(), std::log(10.0), 0.7);  // chance over 10 classes at init
  EXPECT_LT(r.losses.back(), 0.02) << "first " << r.losses.front();
  EXPECT_EQ(r.last_acc1, 100.0);
}

TEST_F(Training, SameSeedGivesBitwiseTheSameLosses) {
  TrainConfig c = config();
  c.model_ema = true;
  c.model_ema_eval = true;
  const TrainResult a = train(c), b = train(c);
  ASSERT_EQ(a.losses.size(), 8u);
  EXPECT_EQ(a.losses, b.losses);
  EXPECT_EQ(a.last_acc1, b.last_acc1);
  c.seed = 1;
  EXPECT_NE(train(c).losses, a.losses);
}

TEST_F(Training, ResumedRunContinuesExactly) {
  // The full state: EMA, accumulation over 2 micro-batches, clipping, drop path, augmentation.
  TrainConfig c = config();
  c.epochs = 3;
  c.batch_size = 8;
  c.update_freq = 2;  // still 4 optimiser steps per epoch
  c.model_ema = true;
  c.clip_grad = 0.5;
  c.drop_path = 0.2;
  c.warmup_epochs = 1;
  c.output_dir = out("full");
  const TrainResult full = train(c);
  ASSERT_EQ(full.losses.size(), 12u);

  // Stopped mid-epoch (step 6 of 12), then resumed from the recovery checkpoint...
  c.output_dir = out("parts");
  c.max_steps = 6;
  const TrainResult part1 = train(c);
  ASSERT_TRUE(fs::exists(checkpoint_path(c.output_dir, "recovery")));
  // ... stopped again exactly at an epoch's end (step 8), then run to the end.
  c.max_steps = 8;
  const TrainResult part2 = train(c);
  c.max_steps = -1;
  const TrainResult part3 = train(c);

  std::vector<double> joined = part1.losses;
  joined.insert(joined.end(), part2.losses.begin(), part2.losses.end());
  joined.insert(joined.end(), part3.losses.begin(), part3.losses.end());
  EXPECT_EQ(joined, full.losses);  // bitwise
  EXPECT_EQ(part3.last_acc1, full.last_acc1);
  // The final weights are the same bits too.
  const Safetensors a = read_safetensors(checkpoint_path(out("full"), "2"));
  const Safetensors b = read_safetensors(checkpoint_path(out("parts"), "2"));
  ASSERT_EQ(a.tensors.size(), b.tensors.size());
  for (size_t i = 0; i < a.tensors.size(); ++i)
    EXPECT_EQ(test::values(a.tensors[i].second), test::values(b.tensors[i].second)) << a.tensors[i].first;
  EXPECT_FALSE(fs::exists(checkpoint_path(out("parts"), "recovery")));  // superseded
}

TEST_F(Training, LeftoverAccumulationBatchesAreSkipped) {
  // 64 images, batch 8 -> 8 batches; update_freq 3 -> 2 optimiser steps per epoch and 2
  // leftover batches. A checkpoint holds no gradients, so a run resumed from the end of epoch
  // 0 matches the uninterrupted one only if nothing of those leftovers reaches epoch 1.
  TrainConfig c = config();
  c.batch_size = 8;
  c.update_freq = 3;
  c.epochs = 2;
  c.output_dir = out("full");
  const TrainResult full = train(c);
  ASSERT_EQ(full.losses.size(), 4u);
  c.output_dir = out("resumed");
  c.resume = checkpoint_path(out("full"), "0");
  const TrainResult resumed = train(c);
  ASSERT_EQ(resumed.losses.size(), 2u);
  EXPECT_EQ(resumed.losses[0], full.losses[2]);
  EXPECT_EQ(resumed.losses[1], full.losses[3]);
}

TEST_F(Training, CheckpointsMetricsAndConfigAreWritten) {
  TrainConfig c = config();
  c.epochs = 3;
  c.save_ckpt_num = 2;
  c.output_dir = out("run");
  train(c);
  EXPECT_FALSE(fs::exists(checkpoint_path(c.output_dir, "0")));  // pruned: keep the newest 2
  EXPECT_TRUE(fs::exists(checkpoint_path(c.output_dir, "1")));
  EXPECT_TRUE(fs::exists(checkpoint_path(c.output_dir, "2")));
  EXPECT_TRUE(fs::exists(checkpoint_path(c.output_dir, "best")));
  EXPECT_TRUE(fs::exists(fs::path(c.output_dir) / "config.json"));
  std::ifstream metrics(fs::path(c.output_dir) / "metrics.jsonl");
  std::string line;
  int evals = 0;
  while (std::getline(metrics, line)) evals += line.find("\"type\":\"eval\"") != std::string::npos;
  EXPECT_EQ(evals, 3);
  // A finished run resumed again does nothing more.
  EXPECT_EQ(train(c).losses.size(), 0u);
}

TEST_F(Training, IncompatibleResumeIsRefused) {
  TrainConfig c = config();
  c.output_dir = out("run");
  c.max_steps = 2;
  train(c);
  c.batch_size = 8;
  test::expect_error([&] { train(c); }, {"cannot resume from", "batch_size 16, this run has 8"});
  c = config();
  c.output_dir = out("run");
  c.dims = {8, 24};
  test::expect_error([&] { train(c); }, {"cannot resume from", "dims [8,16], this run has [8,24]"});
}

TEST_F(Training, FinetuneReinitialisesAHeadOfAnotherSize) {
  Generator g(5);
  ConvNeXt pretrained(model_config(1000), g);
  const std::string w = out("pretrained.safetensors");
  write_safetensors(w, pretrained.state_dict());
  TrainConfig c = config();
  c.finetune = w;
  c.epochs = 1;
  c.max_steps = 1;
  c.output_dir = out("ft");
  testing::internal::CaptureStdout();
  train(c);
  const std::string printed = testing::internal::GetCapturedStdout();
  EXPECT_NE(printed.find("finetune: head.weight [1000, 16] does not fit 10 classes: re-initialised"),
            std::string::npos) << printed;
  // Everything but the head came from the file (before one step moved it: compare a norm).
  const Checkpoint ck = load_checkpoint(checkpoint_path(c.output_dir, "recovery"));
  for (const auto& [name, t] : ck.tensors)
    if (name == "model.head.weight") {
      EXPECT_EQ(t.shape(), Shape({10, 16}));
    }
}
