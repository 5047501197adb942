// Checkpoint files: format, atomicity, discovery for --auto_resume, pruning.
#include <gtest/gtest.h>

#include <filesystem>
#include <fstream>

#include "models/safetensors.h"
#include "tests/testing.h"
#include "train/checkpoint.h"

using namespace cnx;
namespace fs = std::filesystem;

namespace {
class Checkpoints : public ::testing::Test {
 protected:
  void SetUp() override {
    dir_ = fs::temp_directory_path() /
           (std::string("cnx_ckpt_") + ::testing::UnitTest::GetInstance()->current_test_info()->name());
    fs::remove_all(dir_);
    fs::create_directories(dir_);
  }
  void TearDown() override { fs::remove_all(dir_); }

  Checkpoint make(int64_t step, float value) const {
    Checkpoint c;
    c.tensors = {{"model.w", Tensor::full({2, 3}, value)}, {"adamw.step", Tensor::full({}, step, DType::i64)}};
    c.state_json = "{\"epoch\": " + std::to_string(step / 10) + "}";
    c.step = step;
    return c;
  }
  fs::path dir_;
};
}  // namespace

TEST_F(Checkpoints, RoundTrip) {
  const std::string p = checkpoint_path(dir_.string(), "3");
  EXPECT_EQ(fs::path(p).filename(), "checkpoint-3.safetensors");
  save_checkpoint(p, make(42, 1.5f));
  const Checkpoint c = load_checkpoint(p);
  EXPECT_EQ(c.step, 42);
  EXPECT_EQ(c.state_json, "{\"epoch\": 4}");
  ASSERT_EQ(c.tensors.size(), 2u);
  EXPECT_EQ(c.tensors[0].first, "model.w");
  EXPECT_EQ(c.tensors[0].second.to_vector<float>(), std::vector<float>(6, 1.5f));
}

TEST_F(Checkpoints, PlainWeightsAreNotACheckpoint) {
  const std::string p = (dir_ / "weights.safetensors").string();
  write_safetensors(p, {{"head.weight", Tensor::zeros({2, 2})}});
  test::expect_error([&] { load_checkpoint(p); }, {p, "not a convnext training checkpoint"});
}

TEST_F(Checkpoints, ResumePicksTheLatestStepAndSkipsBrokenFiles) {
  EXPECT_EQ(find_resume_checkpoint(dir_.string()), "");
  EXPECT_EQ(find_resume_checkpoint((dir_ / "missing").string()), "");
  save_checkpoint(checkpoint_path(dir_.string(), "1"), make(100, 1));
  save_checkpoint(checkpoint_path(dir_.string(), "2"), make(200, 2));
  save_checkpoint(checkpoint_path(dir_.string(), "best"), make(900, 3));  // never resumed from
  EXPECT_EQ(find_resume_checkpoint(dir_.string()), checkpoint_path(dir_.string(), "2"));
  save_checkpoint(checkpoint_path(dir_.string(), "recovery"), make(250, 4));
  EXPECT_EQ(find_resume_checkpoint(dir_.string()), checkpoint_path(dir_.string(), "recovery"));
  // A newer but half-written file (a crash mid-write without the atomic rename) is ignored.
  std::ofstream(checkpoint_path(dir_.string(), "3"), std::ios::binary) << "\x10\x00\x00";
  EXPECT_EQ(find_resume_checkpoint(dir_.string()), checkpoint_path(dir_.string(), "recovery"));
}

TEST_F(Checkpoints, InterruptedWriteLeavesThePreviousCheckpointLoadable) {
  const std::string p = checkpoint_path(dir_.string(), "5");
  save_checkpoint(p, make(50, 7));
  // A failed write (here: a tensor name the writer refuses) leaves the old file as it was and
  // no temporary behind.
  Checkpoint bad = make(60, 8);
  bad.tensors.emplace_back("", Tensor::zeros({1}));
  EXPECT_THROW(save_checkpoint(p, bad), Error);
  const Checkpoint c = load_checkpoint(p);
  EXPECT_EQ(c.step, 50);
  EXPECT_EQ(c.tensors[0].second.to_vector<float>(), std::vector<float>(6, 7.0f));
  EXPECT_FALSE(fs::exists(p + ".tmp"));
  // A writer killed mid-write leaves at most the temporary, never a half-written checkpoint
  // (the rename is the last step); discovery ignores the temporary.
  std::ofstream(p + ".tmp") << "partial";
  EXPECT_EQ(find_resume_checkpoint(dir_.string()), p);
}

TEST_F(Checkpoints, PruneKeepsTheNewestEpochs) {
  for (int e : {1, 2, 3, 10, 11}) save_checkpoint(checkpoint_path(dir_.string(), std::to_string(e)), make(e, 0));
  save_checkpoint(checkpoint_path(dir_.string(), "best"), make(1, 0));
  save_checkpoint(checkpoint_path(dir_.string(), "recovery"), make(1, 0));
  prune_checkpoints(dir_.string(), 3);
  std::vector<std::string> left;
  for (const auto& f : fs::directory_iterator(dir_)) left.push_back(f.path().filename().string());
  std::sort(left.begin(), left.end());
  EXPECT_EQ(left, (std::vector<std::string>{"checkpoint-10.safetensors", "checkpoint-11.safetensors",
                                            "checkpoint-3.safetensors", "checkpoint-best.safetensors",
                                            "checkpoint-recovery.safetensors"}));
  prune_checkpoints(dir_.string(), 0);  // keep all
  EXPECT_EQ(std::distance(fs::directory_iterator(dir_), fs::directory_iterator{}), 5);
}
