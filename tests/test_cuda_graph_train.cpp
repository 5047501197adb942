// --cuda_graphs: the training step captured once and replayed gives bitwise the run of the
// uncaptured step: the same losses, weights, AdamW moments and EMA, whatever the step holds
// (gradient accumulation, drop path, clipping, the EMA, bf16 mixed precision, Mixup, a skipped
// non-finite step, a stop and a resume). Run on the emulated CUDA device in CI, where the
// replay is the emulator's cudaGraphLaunch of the recorded launches (kernels/cuda/emulator/).
#include <gtest/gtest.h>

#include <unistd.h>

#include <cstdlib>
#include <filesystem>
#include <string>

#include "cuda_testing.h"
#include "models/safetensors.h"
#include "testing.h"
#include "train/checkpoint.h"
#include "train/trainer.h"

// The runs below go through train() alone, which builds without CUDA: a CPU-only build lists
// the tests and skips them, saying why.
#if !CNX_TEST_CUDA
#define CNX_SKIP_WITHOUT_DEVICE() CNX_SKIP_BUILT_WITHOUT_CUDA()
#endif

namespace cnx {
namespace {

namespace fs = std::filesystem;

class CudaGraphTraining : public ::testing::Test {
 protected:
  void SetUp() override {
    root_ = fs::temp_directory_path() / ("cnx_graph_train_" + std::to_string(::getpid()));
    fs::remove_all(root_);
    fs::create_directories(root_ / "data");
    test::write_quadrant_split((root_ / "data").string(), "train", 48, 1);
    test::write_quadrant_split((root_ / "data").string(), "t10k", 16, 2);
  }
  void TearDown() override { fs::remove_all(root_); }

  // A tiny model on the quadrant images: batch 8, update_freq 2, so 3 optimiser steps an epoch;
  // drop path in its second block, clipping, the EMA, bf16 mixed precision (on by default).
  TrainConfig config(const std::string& graphs, const std::string& out) const {
    TrainConfig c;
    c.device = "cuda";
    c.cuda_graphs = graphs;
    c.depths = {1, 1};
    c.dims = {8, 16};
    c.data_path = (root_ / "data").string();
    c.batch_size = 8;
    c.update_freq = 2;
    c.epochs = 2;
    c.lr = 2e-3;
    c.warmup_epochs = 0;
    c.num_workers = 1;
    c.log_every = 2;
    c.progress_bar = false;
    c.drop_path = 0.3;
    c.clip_grad = 0.5;
    c.model_ema = true;
    c.model_ema_decay = 0.9;
    c.output_dir = (root_ / out).string();
    return c;
  }

  fs::path root_;
};

TEST_F(CudaGraphTraining, ACapturedRunIsBitwiseTheUncapturedRun) {
  CNX_SKIP_WITHOUT_DEVICE();
  const TrainResult plain = train(config("false", "plain"));
  const TrainResult graphs = train(config("true", "graphs"));
  ASSERT_EQ(plain.steps, 6);
  ASSERT_EQ(graphs.steps, 6);
  EXPECT_EQ(plain.graph_replays, 0);
  EXPECT_EQ(graphs.graph_replays, 5);  // the first step runs uncaptured, the second is captured
  EXPECT_EQ(graphs.losses, plain.losses);
  EXPECT_EQ(graphs.last_acc1, plain.last_acc1);
  EXPECT_EQ(graphs.last_loss, plain.last_loss);
  for (const char* ck : {"0", "1"})
    test::expect_same_file_tensors(checkpoint_path((root_ / "plain").string(), ck),
                        checkpoint_path((root_ / "graphs").string(), ck));
  // The steps really changed the weights (a graph that replayed nothing would not).
  EXPECT_NE(plain.losses.front(), plain.losses.back());
}

// Mixup/CutMix soft targets and a non-finite step: the poisoned step is skipped on the device
// in both runs (weights untouched, AdamW's counts taken back), and the runs stay equal.
TEST_F(CudaGraphTraining, MixupAndASkippedStepReplayBitwise) {
  CNX_SKIP_WITHOUT_DEVICE();
  TrainConfig a = config("false", "plain"), b = config("true", "graphs");
  for (TrainConfig* c : {&a, &b}) {
    c->mixup = 0.8;
    c->cutmix = 1.0;
    c->poison_steps_for_testing = {3};
  }
  const TrainResult plain = train(a), graphs = train(b);
  ASSERT_EQ(plain.nonfinite_skipped, 1);
  EXPECT_EQ(graphs.nonfinite_skipped, 1);
  EXPECT_EQ(graphs.graph_replays, 5);
  EXPECT_EQ(graphs.losses.size(), plain.losses.size());
  for (size_t i = 0; i < plain.losses.size(); ++i) {
    if (std::isnan(plain.losses[i])) EXPECT_TRUE(std::isnan(graphs.losses[i])) << "step " << i;
    else EXPECT_EQ(graphs.losses[i], plain.losses[i]) << "step " << i;
  }
  test::expect_same_file_tensors(checkpoint_path((root_ / "plain").string(), "1"),
                      checkpoint_path((root_ / "graphs").string(), "1"));
}

// Stopped after 4 steps (--max_steps: a recovery checkpoint mid-epoch) and resumed, a captured
// run ends bitwise where an uninterrupted captured run does; the resumed run warms up and
// captures again.
TEST_F(CudaGraphTraining, AStoppedAndResumedCapturedRunContinuesBitwise) {
  CNX_SKIP_WITHOUT_DEVICE();
  const TrainResult whole = train(config("true", "whole"));
  TrainConfig c = config("true", "parts");
  c.max_steps = 4;
  const TrainResult first = train(c);
  ASSERT_EQ(first.steps, 4);
  c.max_steps = -1;
  const TrainResult second = train(c);  // resumes from the recovery checkpoint
  EXPECT_EQ(second.steps, 6);
  std::vector<double> joined = first.losses;
  joined.insert(joined.end(), second.losses.begin(), second.losses.end());
  EXPECT_EQ(joined, whole.losses);
  test::expect_same_file_tensors(checkpoint_path((root_ / "whole").string(), "1"),
                      checkpoint_path((root_ / "parts").string(), "1"));
}

// A capture that fails (here a copy to the host inside the step, which synchronises) is not
// fatal: the run says so and goes on uncaptured, bitwise the run that never tried.
TEST_F(CudaGraphTraining, AFailedCaptureFallsBackToTheUncapturedStep) {
  CNX_SKIP_WITHOUT_DEVICE();
  const TrainResult plain = train(config("false", "plain"));
  TrainConfig c = config("true", "fallback");
  c.fail_capture_for_testing = true;
  const TrainResult fallback = train(c);
  EXPECT_EQ(fallback.graph_replays, 0);
  EXPECT_EQ(fallback.losses, plain.losses);
  test::expect_same_file_tensors(checkpoint_path((root_ / "plain").string(), "1"),
                      checkpoint_path((root_ / "fallback").string(), "1"));
}

TEST(CudaGraphTrainingFlags, GraphsNeedACudaDeviceAndAModelWithoutBatchNorm) {
  TrainConfig c;
  c.cuda_graphs = "maybe";
  test::expect_error([&] { c.validate(); }, {"--cuda_graphs must be auto, true or false", "maybe"});
  c.cuda_graphs = "true";
  test::expect_error([&] { (void)c.use_cuda_graphs(Device::cpu(), false); }, {"--cuda_graphs true needs a CUDA device"});
  test::expect_error([&] { (void)c.use_cuda_graphs(Device::cuda(0), true); }, {"BatchNorm", "--cuda_graphs false"});
  EXPECT_TRUE(c.use_cuda_graphs(Device::cuda(0), false));
  c.cuda_graphs = "auto";
  EXPECT_FALSE(c.use_cuda_graphs(Device::cpu(), false));
  EXPECT_FALSE(c.use_cuda_graphs(Device::cuda(0), true));
  EXPECT_TRUE(c.use_cuda_graphs(Device::cuda(0), false));
  ::setenv("CNX_CUDA_SYNC", "1", 1);  // a synchronisation after every launch: no capture
  EXPECT_FALSE(c.use_cuda_graphs(Device::cuda(0), false));
  c.cuda_graphs = "true";
  test::expect_error([&] { (void)c.use_cuda_graphs(Device::cuda(0), false); }, {"CNX_CUDA_SYNC=1"});
  ::unsetenv("CNX_CUDA_SYNC");
  c.cuda_graphs = "false";
  EXPECT_FALSE(c.use_cuda_graphs(Device::cuda(0), false));
  EXPECT_EQ(TrainConfig::from_json(TrainConfig{}.to_json()).cuda_graphs, "auto");
}

}  // namespace
}  // namespace cnx
