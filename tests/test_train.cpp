// The training loop: it learns, it is reproducible, and it resumes exactly. Every test trains
// a tiny ConvNeXt on a tiny Fashion-MNIST-format dataset written here (idx .gz files).
#include <gtest/gtest.h>
#include <sys/wait.h>
#include <unistd.h>

#include <csignal>
#include <functional>

#include <cmath>
#include <filesystem>
#include <fstream>
#include <limits>
#include <sstream>

#include <nlohmann/json.hpp>

#include "models/convnext.h"
#include "models/safetensors.h"
#include "tests/testing.h"
#include "train/checkpoint.h"
#include "train/run_dir.h"
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

// ---- issue 13: non-finite steps, validated resume state, the best file, the folder lock,
// signals, metrics replay, the meaning of --lr ------------------------------------------------

namespace {

// Rewrites a checkpoint with its state JSON edited by `edit`.
void edit_state(const std::string& path, const std::function<void(nlohmann::json&)>& edit) {
  Checkpoint ck = load_checkpoint(path);
  nlohmann::json state = nlohmann::json::parse(ck.state_json);
  edit(state);
  ck.state_json = state.dump();
  save_checkpoint(path, ck);
}

}  // namespace

// A step whose loss is NaN changes nothing (weights, moments, EMA) and is counted; training goes
// on; more than --skip_nonfinite in a row stop the run with one line, leaving the last good
// weights in a recovery checkpoint.
TEST_F(Training, NonFiniteStepsAreSkippedAndTooManyStopTheRun) {
  TrainConfig c = config();
  c.epochs = 1;
  c.max_steps = 1;
  c.model_ema = true;
  c.output_dir = out("one");
  train(c);  // the reference: the state after step 1
  c.max_steps = -1;

  // Steps 1 and 2 (0-based) poisoned: skipped, then step 3 trains again.
  c.output_dir = out("skip");
  c.poison_steps_for_testing = {1, 2};
  c.max_steps = 3;
  const TrainResult r = train(c);
  ASSERT_EQ(r.losses.size(), 3u);
  EXPECT_TRUE(std::isfinite(r.losses[0]));
  EXPECT_TRUE(std::isnan(r.losses[1]));
  EXPECT_TRUE(std::isnan(r.losses[2]));
  EXPECT_EQ(r.nonfinite_skipped, 2);
  // After two skipped steps the state is that of step 1: weights, AdamW moments and step count, EMA.
  {
    const Checkpoint a = load_checkpoint(checkpoint_path(out("one"), "recovery"));
    const Checkpoint b = load_checkpoint(checkpoint_path(out("skip"), "recovery"));
    ASSERT_EQ(a.tensors.size(), b.tensors.size());
    for (size_t i = 0; i < a.tensors.size(); ++i)
      EXPECT_EQ(test::values(a.tensors[i].second), test::values(b.tensors[i].second)) << a.tensors[i].first;
    const auto state = nlohmann::json::parse(b.state_json);
    EXPECT_EQ(state.at("nonfinite_skipped"), 2);
    EXPECT_EQ(state.at("nonfinite_streak"), 2);
  }
  // The resumed run trains step 3 normally: the streak resets.
  c.max_steps = 4;
  const TrainResult r2 = train(c);
  ASSERT_EQ(r2.losses.size(), 1u);
  EXPECT_TRUE(std::isfinite(r2.losses[0]));
  EXPECT_EQ(r2.nonfinite_skipped, 2);

  // Three in a row with --skip_nonfinite 2: the run stops at the third, with one line.
  c.output_dir = out("stop");
  c.max_steps = -1;
  c.skip_nonfinite = 2;
  c.poison_steps_for_testing = {1, 2, 3};
  test::expect_error([&] { train(c); },
                     {"training diverged: 3 optimiser steps in a row with a non-finite loss or gradient",
                      "--skip_nonfinite 2", "the weights are those of step 1"});
  const Checkpoint kept = load_checkpoint(checkpoint_path(out("stop"), "recovery"));
  EXPECT_EQ(kept.step, 4);
  EXPECT_FALSE(first_nonfinite(kept.tensors).has_value());
  // --skip_nonfinite 0: the first one stops it.
  c.output_dir = "";
  c.skip_nonfinite = 0;
  c.poison_steps_for_testing = {0};
  test::expect_error([&] { train(c); }, {"training diverged: 1 optimiser steps in a row"});
}

// Nothing non-finite is ever written: a NaN weight makes save_checkpoint refuse, and the file
// already there is kept as it was.
TEST_F(Training, SaveCheckpointRefusesNonFiniteTensors) {
  TrainConfig c = config();
  c.epochs = 1;
  c.output_dir = out("run");
  train(c);
  const std::string path = checkpoint_path(c.output_dir, "0");
  const auto before = read_safetensors(path);
  Checkpoint ck = load_checkpoint(path);
  for (auto& [name, t] : ck.tensors)
    if (name == "adamw.exp_avg_sq.stages.1.0.pwconv2.weight" || name == "model.head.bias")
      t.data<float>()[0] = std::numeric_limits<float>::infinity();
  test::expect_error([&] { save_checkpoint(path, ck); }, {"refusing to write", path, "holds a NaN or an infinity"});
  const auto after = read_safetensors(path);
  ASSERT_EQ(before.tensors.size(), after.tensors.size());
  for (size_t i = 0; i < before.tensors.size(); ++i)
    EXPECT_EQ(test::values(before.tensors[i].second), test::values(after.tensors[i].second));
}

// Every number of a checkpoint's state is checked before use: a negative step used to index the
// lr schedule out of bounds (a segfault at -10^12).
TEST_F(Training, CorruptResumeStateIsRefusedWithOneLine) {
  TrainConfig c = config();
  c.output_dir = out("run");
  c.max_steps = 2;
  train(c);
  const std::string good = out("good.safetensors");
  fs::copy_file(checkpoint_path(c.output_dir, "recovery"), good);
  c.max_steps = -1;
  c.output_dir = "";
  c.resume = out("bad.safetensors");
  struct Case {
    std::function<void(nlohmann::json&)> edit;
    std::vector<std::string> message;
  };
  const std::vector<Case> cases = {
      {[](auto& s) { s["step"] = -1; }, {"bad.safetensors", "\"step\" is -1, outside [0, "}},
      {[](auto& s) { s["step"] = -1000000000000LL; }, {"\"step\" is -1000000000000"}},
      {[](auto& s) { s["step"] = 7; }, {"\"step\" is 7, but epoch 0 batch 2 of this run", "is step 2"}},
      {[](auto& s) { s["epoch"] = 3; }, {"\"epoch\" is 3, outside [0, 2]"}},
      {[](auto& s) { s["epoch"] = "1"; }, {"\"epoch\" is not an integer"}},
      {[](auto& s) { s["batch"] = 9; }, {"\"batch\" is 9, outside [0, 4]"}},
      {[](auto& s) { s["batch"] = 18446744073709551615ULL; }, {"\"batch\" is 18446744073709551615"}},
      {[](auto& s) { s.erase("best_acc1"); }, {"lacks \"best_acc1\""}},
      {[](auto& s) { s["best_acc1"] = 250.0; }, {"\"best_acc1\" is not an accuracy in [0, 100]"}},
      {[](auto& s) { s["drop_gen"]["offset"] = -5; }, {"\"offset\" is missing or not an integer >= 0"}},
      {[](auto& s) { s["nonfinite_streak"] = 99; }, {"\"nonfinite_streak\" is 99"}},
      {[](auto& s) { s.erase("resume_key"); }, {"lacks the object \"resume_key\""}},
  };
  for (const Case& k : cases) {
    fs::copy_file(good, c.resume, fs::copy_options::overwrite_existing);
    edit_state(c.resume, k.edit);
    test::expect_error([&] { train(c); }, k.message);
  }
  // The metadata step too, and a state that is not JSON.
  Checkpoint ck = load_checkpoint(good);
  ck.step = -3;
  save_checkpoint(c.resume, ck);
  test::expect_error([&] { load_checkpoint(c.resume); }, {"\"step\" is not an integer >= 0 ('-3')"});
  ck = load_checkpoint(good);
  ck.state_json = "{\"epoch\": 0,";
  save_checkpoint(c.resume, ck);
  test::expect_error([&] { train(c); }, {"bad.safetensors: checkpoint state is not valid JSON"});
}

// checkpoint-best is written before the numbered checkpoint, and a best file older than the
// accuracy the resumed state records (killed between the two writes under the old order, or
// deleted) is rewritten from the resumed checkpoint when that is the best one.
TEST_F(Training, BestCheckpointIsKeptConsistentOnResume) {
  TrainConfig c = config();
  c.epochs = 1;
  c.output_dir = out("run");
  const TrainResult r = train(c);
  ASSERT_GT(r.best_acc1, 0);
  const std::string best = checkpoint_path(c.output_dir, "best");
  fs::remove(best);
  train(c);  // resumes from checkpoint-0 (nothing left to train)
  ASSERT_TRUE(fs::exists(best));
  test::expect_same_file_tensors(best, checkpoint_path(c.output_dir, "0"));
}

// A killed save's temporary is removed at start; a stray checkpoint-<20 digits> name is ignored
// (it used to end every epoch with "convnext train: stoll").
TEST_F(Training, StaleTemporariesAreRemovedAndStrayNamesIgnored) {
  TrainConfig c = config();
  c.output_dir = out("run");
  fs::create_directories(c.output_dir);
  const fs::path tmp = fs::path(c.output_dir) / "checkpoint-7.safetensors.tmp";
  const fs::path stray = fs::path(c.output_dir) / "checkpoint-99999999999999999999.safetensors";
  std::ofstream(tmp) << "half a checkpoint";
  std::ofstream(stray) << "not ours";
  c.save_ckpt_num = 1;
  const TrainResult r = train(c);
  EXPECT_EQ(r.epochs_done, 2);
  EXPECT_FALSE(fs::exists(tmp));
  EXPECT_TRUE(fs::exists(stray));  // left alone
  EXPECT_TRUE(fs::exists(checkpoint_path(c.output_dir, "1")));
  EXPECT_FALSE(fs::exists(checkpoint_path(c.output_dir, "0")));  // pruning still works
}

// One run per output folder: a second one is refused, naming the holder's PID.
TEST_F(Training, ASecondRunOnTheSameFolderIsRefused) {
  TrainConfig c = config();
  c.output_dir = out("run");
  {
    RunDir holder(c.output_dir);  // the first run
    test::expect_error([&] { train(c); }, {"--output_dir " + c.output_dir + " is in use by another training run",
                                           "(PID " + std::to_string(::getpid()) + " holds"});
    EXPECT_FALSE(fs::exists(checkpoint_path(c.output_dir, "0")));
  }
  c.epochs = 1;
  EXPECT_EQ(train(c).epochs_done, 1);  // the lock went with its holder
}

// A signal that arrives before training begins stops the run there (it used to train one step
// first); one during evaluation stops the evaluation at the next batch.
TEST_F(Training, SignalsAreActedOnBeforeTheFirstStepAndDuringEvaluation) {
  TrainConfig c = config();
  c.output_dir = out("run");
  stop_signal().store(SIGHUP);
  const TrainResult r = train(c);
  EXPECT_TRUE(r.interrupted);
  EXPECT_EQ(r.steps, 0);
  EXPECT_TRUE(r.losses.empty());
  EXPECT_FALSE(fs::exists(checkpoint_path(c.output_dir, "recovery")));

  Generator g(3);
  ConvNeXt model(model_config(10), g);
  const EvalResult e = evaluate(model, "fashion_mnist", (root_ / "data").string(), 8, 1);
  stop_signal().store(0);
  EXPECT_TRUE(e.interrupted);
  EXPECT_EQ(e.images, 0);
}

// metrics.jsonl holds every step and epoch once: the records a killed run logged after its last
// checkpoint are dropped when the run resumes from it.
TEST_F(Training, ResumedRunDoesNotLogReplayedStepsTwice) {
  TrainConfig c = config();
  c.log_every = 1;
  c.output_dir = out("run");
  train(c);  // 2 epochs, 8 steps: checkpoint-0 (step 4) and checkpoint-1 (step 8)
  // As if killed during epoch 1 with its records written: resume from checkpoint-0.
  fs::remove(checkpoint_path(c.output_dir, "1"));
  train(c);
  std::ifstream metrics(fs::path(c.output_dir) / "metrics.jsonl");
  std::string line;
  std::vector<int64_t> train_steps, eval_epochs;
  while (std::getline(metrics, line)) {
    const auto r = nlohmann::json::parse(line);
    if (r.at("type") == "train") train_steps.push_back(r.at("step"));
    if (r.at("type") == "eval") eval_epochs.push_back(r.at("epoch"));
  }
  EXPECT_EQ(train_steps, (std::vector<int64_t>{1, 2, 3, 4, 5, 6, 7, 8}));
  EXPECT_EQ(eval_epochs, (std::vector<int64_t>{0, 1}));
}

// --lr is the learning rate as given (main.py's meaning); --blr scales per 256 images; the
// default is main.py's 4e-3; a checkpoint made when --lr was scaled by total batch / 4096 resumes
// with the lr it trained with.
TEST_F(Training, LrMeansWhatItMeansInMainPy) {
  TrainConfig c;
  c.batch_size = 32;
  c.update_freq = 4;  // total batch 128
  EXPECT_EQ(resolve_lr(c).value, 4e-3);  // the default: blr 8e-3 x 128 / 256
  c.batch_size = 8;
  EXPECT_EQ(resolve_lr(c).value, 1e-3);
  c.batch_size = 32;
  c.lr = 4e-3;
  EXPECT_EQ(resolve_lr(c).value, 4e-3);  // not 4e-3 * 128 / 4096
  c.lr = -1;
  c.blr = 1e-3;
  EXPECT_DOUBLE_EQ(resolve_lr(c).value, 1e-3 * 128 / 256);
  EXPECT_NE(resolve_lr(c).description.find("--blr"), std::string::npos);
  // An old checkpoint's config (no lr_rule) with its lr for batch 4096.
  TrainConfig old = TrainConfig::from_json(R"({"lr": 0.256, "batch_size": 32, "update_freq": 4})");
  EXPECT_EQ(old.lr_rule, "per_4096");
  EXPECT_DOUBLE_EQ(resolve_lr(c, old).value, 0.256 * 128 / 4096);
  // A new one keeps the run's own flags.
  const TrainConfig now = TrainConfig::from_json(c.to_json());
  EXPECT_EQ(now.lr_rule, "absolute");
  EXPECT_DOUBLE_EQ(resolve_lr(c, now).value, 1e-3 * 128 / 256);

  // End to end: a checkpoint whose config predates lr_rule resumes at its own lr.
  TrainConfig t = config();
  t.lr = 0.5 * 16 / 4096.0;
  t.output_dir = out("full");
  const TrainResult full = train(t);
  t.output_dir = out("old");
  t.max_steps = 4;
  train(t);
  edit_state(checkpoint_path(t.output_dir, "recovery"), [](nlohmann::json& s) {
    s["config"].erase("lr_rule");
    s["config"]["lr"] = 0.5;  // the old meaning: 0.5 per total batch 4096
  });
  t.max_steps = -1;
  t.lr = 1.0;  // ignored: the checkpoint's lr wins
  const TrainResult resumed = train(t);
  ASSERT_EQ(resumed.losses.size(), 4u);
  EXPECT_EQ(resumed.losses, std::vector<double>(full.losses.begin() + 4, full.losses.end()));
}

// A failed metrics.jsonl write is reported once on stderr; training goes on and its checkpoints
// are written.
TEST_F(Training, MetricsWriteErrorsAreReported) {
  if (!fs::exists("/dev/full")) GTEST_SKIP() << "no /dev/full";
  TrainConfig c = config();
  c.epochs = 1;
  c.log_every = 1;
  c.output_dir = out("run");
  fs::create_directories(c.output_dir);
  fs::create_symlink("/dev/full", fs::path(c.output_dir) / "metrics.jsonl");
  testing::internal::CaptureStderr();
  const TrainResult r = train(c);
  const std::string err = testing::internal::GetCapturedStderr();
  EXPECT_EQ(r.epochs_done, 1);
  EXPECT_NE(err.find("metrics.jsonl: write failed"), std::string::npos) << err;
  EXPECT_EQ(err.find("write failed", err.find("write failed") + 1), std::string::npos) << "reported once: " << err;
  EXPECT_TRUE(fs::exists(checkpoint_path(c.output_dir, "0")));
}

// Weights recorded with another LayerNorm eps (tools/convert_checkpoint.py writes
// layer_norm_eps) are refused instead of loading and then mismatching (issue 13, item 8).
TEST_F(Training, WeightsWithAnotherLayerNormEpsAreRefused) {
  Generator g(5);
  ConvNeXt m(model_config(10), g);
  const std::string w = out("w.safetensors");
  write_safetensors(w, m.state_dict(), {{"layer_norm_eps", "1e-05"}});
  test::expect_error([&] { load_weights(w); }, {"w.safetensors: trained with LayerNorm eps 1e-05", "uses 1e-6"});
  write_safetensors(w, m.state_dict(), {{"layer_norm_eps", "1e-06"}});
  EXPECT_EQ(load_weights(w).size(), m.state_dict().size());
}

// A checkpoint's config with a field of the wrong type is refused naming the file and the field
// (it used to throw nlohmann's "type must be number, but is string").
TEST_F(Training, CheckpointConfigOfTheWrongTypeNamesTheField) {
  TrainConfig c = config();
  c.output_dir = out("run");
  c.max_steps = 1;
  train(c);
  const std::string path = checkpoint_path(c.output_dir, "recovery");
  edit_state(path, [](nlohmann::json& s) { s["config"]["depths"] = "1,1"; });
  test::expect_error([&] { checkpoint_config(path); },
                     {path + ": checkpoint config field \"depths\" has the wrong type: \"1,1\""});
  edit_state(path, [](nlohmann::json& s) { s["config"] = 5; });
  test::expect_error([&] { checkpoint_config(path); }, {path + ": checkpoint config is not a JSON object"});
  test::expect_error([] { TrainConfig::from_json("{\"seed\": -1}"); }, {"config field \"seed\" has the wrong type: -1"});
}

// The config a checkpoint records reads back as it was written (every field, through the
// file's text).
TEST_F(Training, CheckpointConfigRoundTrips) {
  TrainConfig c = config();
  c.output_dir = out("run");
  c.max_steps = 1;
  c.seed = 18446744073709551615ull;
  c.blr = 0.25;
  c.lr = -1;
  train(c);
  const std::optional<TrainConfig> back = checkpoint_config(checkpoint_path(c.output_dir, "recovery"));
  ASSERT_TRUE(back.has_value());
  EXPECT_EQ(back->to_json(), c.to_json());
}
