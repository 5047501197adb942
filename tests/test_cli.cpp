// `convnext grads` as a user runs it: the process, its exit status, its stderr, its output.
// Every bad input gets one line on stderr and a non-zero exit, and --out is left alone: not
// created when absent, unchanged when present.
#include <gtest/gtest.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <unistd.h>

#include <csignal>

#include <chrono>
#include <cmath>
#include <filesystem>
#include <fstream>
#include <sstream>

#include "models/convnext.h"
#include "models/safetensors.h"
#include "tests/golden.h"
#include "tests/testing.h"

using namespace cnx;
namespace fs = std::filesystem;

namespace {

struct RunResult {
  int status;
  std::string err;
};

std::string slurp(const fs::path& p) {
  std::ifstream f(p, std::ios::binary);
  std::stringstream s;
  s << f.rdbuf();
  return s.str();
}

class Cli : public ::testing::Test {
 protected:
  void SetUp() override {
    const auto* info = ::testing::UnitTest::GetInstance()->current_test_info();
    dir_ = fs::temp_directory_path() / (std::string("cnx_cli_") + info->name());
    fs::remove_all(dir_);
    fs::create_directories(dir_);
  }
  void TearDown() override { fs::remove_all(dir_); }

  fs::path path(const std::string& name) const { return dir_ / name; }

  RunResult run(const std::string& args) const {
    const fs::path err = path("stderr.txt");
    const std::string cmd = std::string(CNX_CLI) + " " + args + " 2>" + err.string() + " >/dev/null";
    const int rc = std::system(cmd.c_str());
    return {WIFEXITED(rc) ? WEXITSTATUS(rc) : -1, slurp(err)};
  }

  // The golden case hierarchical_72 (tools/make_golden.py): model flags and its files.
  static std::string golden(const std::string& file) {
    return test::golden_path("hierarchical_72", file);
  }
  static constexpr const char* kModel = "--depths 2,1,2,1 --dims 8,16,24,32 --num_classes 10";

  // Runs a command that must fail: status != 0, exactly one line on stderr containing every
  // part, and --out (pre-filled with a sentinel) unchanged, no temporary file left beside it.
  void expect_failure(const std::string& args, const std::vector<std::string>& parts,
                      int status = 1) {
    const fs::path out = path("out.safetensors");
    { std::ofstream(out) << "sentinel"; }
    const RunResult r = run(args + " --out " + out.string());
    EXPECT_EQ(r.status, status) << args << "\nstderr: " << r.err;
    EXPECT_EQ(std::count(r.err.begin(), r.err.end(), '\n'), 1) << "not one line: " << r.err;
    for (const std::string& part : parts)
      EXPECT_NE(r.err.find(part), std::string::npos) << "stderr lacks '" << part << "': " << r.err;
    EXPECT_EQ(slurp(out), "sentinel") << "--out was written";
    EXPECT_FALSE(fs::exists(out.string() + ".tmp"));
    // And without a pre-existing file, none is created.
    fs::remove(out);
    run(args + " --out " + out.string());
    EXPECT_FALSE(fs::exists(out)) << args;
  }

  std::string weights_with(const std::function<void(NamedTensors&)>& edit) const {
    NamedTensors t = read_safetensors(golden("weights.safetensors")).tensors;
    edit(t);
    const fs::path p = path("weights_edited.safetensors");
    write_safetensors(p.string(), t);
    return p.string();
  }

  std::string batch_with(const Tensor& images, const Tensor& labels) const {
    const fs::path p = path("batch_edited.safetensors");
    write_safetensors(p.string(), {{"images", images}, {"labels", labels}});
    return p.string();
  }

  std::string bytes_file(const std::string& name, const std::string& bytes) const {
    const fs::path p = path(name);
    std::ofstream(p, std::ios::binary) << bytes;
    return p.string();
  }

  std::string base(const std::string& weights, const std::string& batch) const {
    return std::string("grads ") + kModel + " --weights " + weights + " --batch " + batch;
  }

  fs::path dir_;
};

}  // namespace

TEST_F(Cli, GradsMatchesTheGoldenData) {
  const fs::path out = path("out.safetensors");
  const RunResult r = run(base(golden("weights.safetensors"), golden("batch.safetensors")) + " --out " +
                    out.string());
  ASSERT_EQ(r.status, 0) << r.err;
  EXPECT_EQ(r.err, "");
  const Safetensors got = read_safetensors(out.string());
  const Safetensors want = read_safetensors(golden("expected.safetensors"));
  ASSERT_EQ(got.tensors.size(), want.tensors.size());
  for (const auto& [name, w] : want.tensors) {
    const Tensor g = got.find(name);
    ASSERT_TRUE(g.defined()) << name;
    ASSERT_EQ(g.shape(), w.shape()) << name;
    EXPECT_EQ(g.dtype(), DType::f32) << name;
    const std::vector<double> wv = test::values(w);
    double scale = 0;
    for (double v : wv) scale = std::max(scale, std::abs(v));
    // logits and loss: 1e-4 relative; gradients: 1e-3 of the largest element.
    const double tol = (name == "logits" || name == "loss" ? 1e-4 : 1e-3) * scale;
    test::expect_close(name, test::values(g), wv, tol, 0);
  }
}

TEST_F(Cli, GradsOnConvNeXtTinyAt72) {
  // The size the README promises runs well under a minute on a 2-core CPU.
  Generator g(0);
  ConvNeXt model(convnext_config("convnext_tiny"), g);
  const fs::path w = path("tiny.safetensors"), out = path("out.safetensors");
  write_safetensors(w.string(), model.state_dict());
  const std::string batch = batch_with(Tensor::randn({2, 3, 72, 72}, g),
                                       Tensor::from_data<int64_t>({2}, std::vector<int64_t>{3, 999}));
  const auto t0 = std::chrono::steady_clock::now();
  const RunResult r = run("grads --model convnext_tiny --weights " + w.string() + " --batch " + batch +
                    " --out " + out.string());
  const double seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  ASSERT_EQ(r.status, 0) << r.err;
  std::printf("convnext grads, convnext_tiny, 72x72, batch 2: %.2f s\n", seconds);
  const Safetensors o = read_safetensors(out.string());
  EXPECT_EQ(o.tensors.size(), 2u + 182u);
  EXPECT_EQ(o.find("logits").shape(), Shape({2, 1000}));
  EXPECT_TRUE(std::isfinite(o.find("loss").item()));
  EXPECT_NEAR(o.find("loss").item(), std::log(1000.0), 1.0);  // near chance at init
  EXPECT_EQ(o.find("grad.stages.0.0.dwconv.weight").shape(), Shape({96, 1, 7, 7}));
  EXPECT_EQ(o.find("grad.downsample_layers.0.0.weight").shape(), Shape({96, 3, 4, 4}));
  EXPECT_EQ(o.metadata.at("model"), "convnext_tiny");
}

TEST_F(Cli, MissingWeightsFile) {
  expect_failure(base(path("nope.safetensors").string(), golden("batch.safetensors")),
                 {"convnext grads:", "nope.safetensors", "cannot open"});
}

TEST_F(Cli, EmptyWeightsFile) {
  expect_failure(base(bytes_file("empty.safetensors", ""), golden("batch.safetensors")),
                 {"convnext grads:", "empty.safetensors"});
}

TEST_F(Cli, TruncatedWeightsFile) {
  const std::string good = slurp(golden("weights.safetensors"));
  expect_failure(base(bytes_file("cut.safetensors", good.substr(0, good.size() - 100)),
                      golden("batch.safetensors")),
                 {"convnext grads:", "cut.safetensors"});
}

TEST_F(Cli, CorruptWeightsFile) {
  std::string bytes = slurp(golden("weights.safetensors"));
  bytes[bytes.find("\":", 8) + 1] = '#';  // the first key's colon: the JSON header is invalid
  expect_failure(base(bytes_file("corrupt.safetensors", bytes), golden("batch.safetensors")),
                 {"convnext grads:", "corrupt.safetensors"});
  expect_failure(base(bytes_file("garbage.safetensors", std::string(64, '\xff')),
                      golden("batch.safetensors")),
                 {"convnext grads:", "garbage.safetensors"});
}

TEST_F(Cli, WrongTensorName) {
  const std::string w = weights_with([](NamedTensors& t) { t[3].first = "stem.norm.bias"; });
  expect_failure(base(w, golden("batch.safetensors")),
                 {"missing (1): downsample_layers.0.1.bias", "unexpected (1): stem.norm.bias"});
}

TEST_F(Cli, WrongTensorShape) {
  const std::string w = weights_with([](NamedTensors& t) { t[0].second = Tensor::zeros({8, 3, 2, 2}); });
  expect_failure(base(w, golden("batch.safetensors")),
                 {"wrong shape (1): downsample_layers.0.0.weight [8, 3, 2, 2] (expected [8, 3, 4, 4])"});
}

TEST_F(Cli, WrongTensorDtype) {
  const std::string w = weights_with([](NamedTensors& t) {
    t[1].second = Tensor::zeros(t[1].second.shape(), DType::i64);
  });
  expect_failure(base(w, golden("batch.safetensors")),
                 {"not floating point (1): downsample_layers.0.0.bias i64"});
}

TEST_F(Cli, LabelOutOfRange) {
  const Safetensors b = read_safetensors(golden("batch.safetensors"));
  const std::string batch = batch_with(b.find("images"),
                                       Tensor::from_data<int64_t>({2}, std::vector<int64_t>{0, 10}));
  expect_failure(base(golden("weights.safetensors"), batch), {"label 10 is outside [0, 10)"});
  const std::string negative = batch_with(
      b.find("images"), Tensor::from_data<int64_t>({2}, std::vector<int64_t>{-1, 0}));
  expect_failure(base(golden("weights.safetensors"), negative), {"label -1 is outside [0, 10)"});
}

TEST_F(Cli, ImagesWithTheWrongChannelCount) {
  Generator g(0);
  const std::string batch = batch_with(Tensor::randn({2, 1, 72, 72}, g),
                                       Tensor::from_data<int64_t>({2}, std::vector<int64_t>{0, 1}));
  expect_failure(base(golden("weights.safetensors"), batch),
                 {"images f32[2, 1, 72, 72] cpu have 1 channels; the model expects 3"});
}

TEST_F(Cli, BatchWithoutLabels) {
  const fs::path p = path("nolabels.safetensors");
  write_safetensors(p.string(), {{"images", read_safetensors(golden("batch.safetensors")).find("images")}});
  expect_failure(base(golden("weights.safetensors"), p.string()), {"no tensor named 'labels'"});
}

TEST_F(Cli, UnknownModelName) {
  expect_failure("grads --model convnext_huge --weights " + golden("weights.safetensors") +
                     " --batch " + golden("batch.safetensors"),
                 {"convnext grads: unknown model 'convnext_huge'", "convnext_tiny"});
}

TEST_F(Cli, BadCommandLines) {
  const std::string files =
      " --weights " + golden("weights.safetensors") + " --batch " + golden("batch.safetensors");
  expect_failure("grads --model convnext_tiny --depths 1,1 --dims 8,8" + files, {"excludes"}, 2);
  expect_failure("grads --depths 2,x,2,1 --dims 8,16,24,32" + files,
                 {"--depths: expected comma-separated positive integers, got '2,x,2,1'"});
  expect_failure("grads --depths 2,1,2,1" + files, {"--depths requires --dims"}, 2);
  expect_failure("grads" + files, {"give --model NAME, or --depths and --dims"});
  expect_failure(base(golden("weights.safetensors"), golden("batch.safetensors")) + " --device gpu",
                 {"device: expected cpu, cuda or cuda:N, got 'gpu'"});
  expect_failure("grads --num_classes ten --model convnext_tiny" + files, {"num_classes"}, 2);
  // --out is required: the run fails before anything (and there is no --out to protect).
  const RunResult r = run(base(golden("weights.safetensors"), golden("batch.safetensors")));
  EXPECT_EQ(r.status, 2);
  EXPECT_NE(r.err.find("--out is required"), std::string::npos) << r.err;
}

TEST_F(Cli, CudaRequestWithoutDevice) {
  if (cuda_device_count() > 0) GTEST_SKIP() << "a CUDA device is present";
  expect_failure(base(golden("weights.safetensors"), golden("batch.safetensors")) + " --device cuda",
                 {"convnext grads: --device cuda: no such CUDA device (0 visible"});
}

// ---- train, eval, predict ----------------------------------------------------------------------

namespace {
// Runs a command that must fail with one stderr line containing every part.
void expect_one_line_failure(const Cli* cli, const RunResult& r, const std::vector<std::string>& parts,
                             int status) {
  (void)cli;
  EXPECT_EQ(r.status, status) << r.err;
  EXPECT_EQ(std::count(r.err.begin(), r.err.end(), '\n'), 1) << "not one line: " << r.err;
  for (const std::string& part : parts)
    EXPECT_NE(r.err.find(part), std::string::npos) << "stderr lacks '" << part << "': " << r.err;
}
}  // namespace

TEST_F(Cli, TrainRefusesBadValues) {
  const std::string data = " --data_path " + path("none").string();
  expect_one_line_failure(this, run("train --batch_size -5"), {"convnext train: --batch_size must be positive, got -5"}, 1);
  expect_one_line_failure(this, run("train --epochs 0"), {"--epochs must be positive, got 0"}, 1);
  expect_one_line_failure(this, run("train --lr abc"), {"convnext train:", "--lr", "abc"}, 2);
  expect_one_line_failure(this, run("train --model convnext_huge"), {"unknown model 'convnext_huge'"}, 1);
  expect_one_line_failure(this, run("train --data_set imagenet"), {"imagenet", "fashion_mnist"}, 1);
  expect_one_line_failure(this, run("train --smoothing 1.5"), {"--smoothing must be in [0, 1), got 1.5"}, 1);
  expect_one_line_failure(this, run("train --depths 2,2 --dims 8"), {"depths (2,2) and dims (8)"}, 1);
  expect_one_line_failure(this, run("train --device tpu"), {"--device must be auto, cpu or cuda, got 'tpu'"}, 1);
  expect_one_line_failure(this, run("train" + data), {"fashion_mnist:", path("none").string(), "train-images-idx3-ubyte"}, 1);
  expect_one_line_failure(this, run("train --model_ema maybe"), {"--model_ema"}, 2);
  // Seeds are not wrapped into a uint64 (issue 13, item 7): -1 used to become 2^64 - 1.
  expect_one_line_failure(this, run("train --seed -1"), {"--seed must be an integer from 0 to 18446744073709551615, got '-1'"}, 1);
  expect_one_line_failure(this, run("train --seed 18446744073709551616"), {"--seed", "got '18446744073709551616'"}, 1);
  expect_one_line_failure(this, run("train --seed 12abc"), {"--seed", "got '12abc'"}, 1);
  expect_one_line_failure(this, run("train --lr 1e-3 --blr 1e-3"), {"give --lr", "or --blr", "not both"}, 1);
  expect_one_line_failure(this, run("train --blr -2"), {"--blr must be > 0, got -2"}, 1);
  expect_one_line_failure(this, run("train --crop_pct 0.001"), {"--crop_pct must be in [0.1, 1]", "0.001"}, 1);
  expect_one_line_failure(this, run("train --skip_nonfinite -1"), {"--skip_nonfinite must be >= 0, got -1"}, 1);
}

TEST_F(Cli, TrainRefusesBrokenDatasetFiles) {
  // Files with the right names but the wrong content: the labels file where the images belong.
  const fs::path d = path("broken");
  fs::create_directories(d);
  const std::string fm = "/usr/share/datasets/fashion-mnist/";
  if (!fs::exists(fm + "train-labels-idx1-ubyte.gz")) GTEST_SKIP() << "no Fashion-MNIST installed";
  fs::copy_file(fm + "train-labels-idx1-ubyte.gz", d / "train-images-idx3-ubyte.gz");
  fs::copy_file(fm + "train-labels-idx1-ubyte.gz", d / "train-labels-idx1-ubyte.gz");
  expect_one_line_failure(this, run("train --data_path " + d.string()), {"wrong magic", "0x00000803"}, 1);
}

TEST_F(Cli, EvalAndPredictRefuseBadInput) {
  expect_one_line_failure(this, run("eval --weights " + path("none.safetensors").string() + " --model convnext_atto"),
                          {"convnext eval:", "none.safetensors", "cannot open"}, 1);
  expect_one_line_failure(this, run("eval --weights " + golden("weights.safetensors")),
                          {"holds plain weights: give --model NAME or --depths and --dims"}, 1);
  const std::string not_image = bytes_file("x.pgm", "hello");
  expect_one_line_failure(this,
                          run("predict --weights " + golden("weights.safetensors") +
                              " --depths 2,1,2,1 --dims 8,16,24,32 --data_set cifar10 " + not_image),
                          {"convnext predict:", "x.pgm", "not a binary PGM/PPM image"}, 1);
}

namespace {
// A tiny Fashion-MNIST-format dataset in `data`: 256 train and 64 test noise images, 10 classes.
void write_noise_fashion_mnist(const fs::path& data) {
  fs::create_directories(data);
  for (const auto& [prefix, n] : {std::pair<std::string, int>{"train", 256}, {"t10k", 64}}) {
    std::string images = std::string("\0\0\x08\x03", 4), labels = std::string("\0\0\x08\x01", 4);
    auto be32 = [](std::string& s, uint32_t v) {
      for (int b = 24; b >= 0; b -= 8) s.push_back(static_cast<char>(v >> b));
    };
    be32(images, n); be32(images, 28); be32(images, 28); be32(labels, n);
    Generator g(7);
    for (int i = 0; i < n * 28 * 28; ++i) images.push_back(static_cast<char>(g.next_u32() & 0xff));
    for (int i = 0; i < n; ++i) labels.push_back(static_cast<char>(i % 10));
    std::ofstream(data / (prefix + "-images-idx3-ubyte"), std::ios::binary) << images;
    std::ofstream(data / (prefix + "-labels-idx1-ubyte"), std::ios::binary) << labels;
  }
}

// The loss of every "epoch E step S/T loss L ..." line of a training log, in order.
std::vector<double> step_losses(const std::string& log) {
  std::vector<double> losses;
  std::istringstream in(log);
  for (std::string line; std::getline(in, line);) {
    const size_t at = line.find(" loss ");
    if (line.rfind("epoch ", 0) == 0 && line.find(" step ") != std::string::npos && at != std::string::npos)
      losses.push_back(std::stod(line.substr(at + 6)));
  }
  return losses;
}
}  // namespace

// `convnext train --device cuda` as a user runs it, against the same command on the CPU: 20
// optimiser steps in fp32 and in bf16 mixed precision (--use_amp true on both devices: the CPU's
// bf16 kernels round as the GPU's do). The tolerances are those of
// CudaTraining.TrainLoopOnCudaMatchesTheCpu (the printed losses have 4 decimals).
TEST_F(Cli, CudaTrainTwentyStepsFollowTheCpu) {
  if (cuda_device_count() == 0) GTEST_SKIP() << "no CUDA device: cuda_device_count() is 0";
  const fs::path data = path("data");
  write_noise_fashion_mnist(data);
  for (const auto& [amp, rtol] : {std::pair<std::string, double>{"false", 1e-4}, {"true", 5e-3}}) {
    std::vector<double> losses[2];
    for (int d = 0; d < 2; ++d) {
      const std::string device = d == 0 ? "cpu" : "cuda";
      const fs::path log = path("train_" + device + "_" + amp + ".log");
      const std::string cmd = std::string(CNX_CLI) + " train --data_path " + data.string() +
                              " --depths 1,1 --dims 8,16 --batch_size 16 --epochs 2 --log_every 1"
                              " --drop_path 0.1 --max_steps 20 --use_amp " + amp +
                              " --device " + device + " > " + log.string() + " 2>&1";
      const int rc = std::system(cmd.c_str());
      ASSERT_TRUE(WIFEXITED(rc) && WEXITSTATUS(rc) == 0) << slurp(log);
      losses[d] = step_losses(slurp(log));
      ASSERT_EQ(losses[d].size(), 20u) << slurp(log);
    }
    for (size_t i = 0; i < 20; ++i)
      EXPECT_NEAR(losses[1][i], losses[0][i], rtol * std::abs(losses[0][i]) + 5e-5)
          << "use_amp " << amp << ", step " << i + 1;
  }
}

// SIGINT, SIGTERM and SIGHUP (a dropped SSH session) stop a run with a recovery checkpoint; while
// it runs, a second run on its folder is refused, naming its PID.
TEST_F(Cli, TrainStopsOnSigintWithARecoveryCheckpointAndResumes) {
  const fs::path data = path("data");
  write_noise_fashion_mnist(data);
  for (const int sig : {SIGINT, SIGHUP}) {
    const std::string tag = std::to_string(sig);
    const fs::path out = path("run" + tag), log = path("train" + tag + ".log");
    const std::string args = std::string(CNX_CLI) + " train --data_path " + data.string() +
                             " --depths 1,1 --dims 8,16 --batch_size 16 --epochs 1000 --log_every 1 "
                             "--output_dir " + out.string();
    const pid_t pid = fork();
    ASSERT_GE(pid, 0);
    if (pid == 0) {
      std::freopen(log.c_str(), "w", stdout);
      std::freopen("/dev/null", "w", stderr);
      execl("/bin/sh", "sh", "-c", ("exec " + args).c_str(), static_cast<char*>(nullptr));
      _exit(127);
    }
    // Wait until it has made a few steps, then interrupt it.
    for (int i = 0; i < 600 && slurp(log).find("step 3/") == std::string::npos; ++i) usleep(50000);
    ASSERT_NE(slurp(log).find("step 3/"), std::string::npos) << slurp(log);
    if (sig == SIGINT) {  // one run per folder
      const RunResult second = run("train --data_path " + data.string() + " --depths 1,1 --dims 8,16 --output_dir " +
                                   out.string());
      expect_one_line_failure(this, second, {"convnext train: --output_dir " + out.string() +
                                             " is in use by another training run (PID " + std::to_string(pid) + " holds"}, 1);
    }
    kill(pid, sig);
    int status = 0;
    ASSERT_EQ(waitpid(pid, &status, 0), pid);
    ASSERT_TRUE(WIFEXITED(status)) << "killed instead of stopping cleanly";
    EXPECT_EQ(WEXITSTATUS(status), 128 + sig);  // the shell's convention: 130, 129
    const std::string stopped = "stopped by signal " + tag + " at step ";
    const size_t at = slurp(log).find(stopped);
    ASSERT_NE(at, std::string::npos) << slurp(log);
    const int64_t stop_step = std::stoll(slurp(log).substr(at + stopped.size()));
    ASSERT_TRUE(fs::exists(out / "checkpoint-recovery.safetensors"));
    // The next run picks it up (auto_resume) and goes on; --max_steps bounds it here (some steps
    // past where the signal stopped it: how far it got depends on the machine's speed).
    const fs::path log2 = path("resume" + tag + ".log");
    const std::string until = std::to_string(stop_step + 5);
    const int rc = std::system((args + " --max_steps " + until + " > " + log2.string() + " 2>&1").c_str());
    EXPECT_TRUE(WIFEXITED(rc) && WEXITSTATUS(rc) == 0) << slurp(log2);
    EXPECT_NE(slurp(log2).find("resumed from " + (out / "checkpoint-recovery.safetensors").string()),
              std::string::npos) << slurp(log2);
    EXPECT_NE(slurp(log2).find("resumed from " + (out / "checkpoint-recovery.safetensors").string() +
                               ": epoch "), std::string::npos) << slurp(log2);
    EXPECT_NE(slurp(log2).find(", step " + std::to_string(stop_step) + "\n"), std::string::npos) << slurp(log2);
    EXPECT_NE(slurp(log2).find("stopped by --max_steps at step " + until), std::string::npos) << slurp(log2);
  }
}

TEST_F(Cli, EvalAndPredictUseATrainedCheckpoint) {
  // Train 2 epochs on a tiny one-channel CIFAR-shaped set? Fashion-MNIST format: 4 classes as
  // bright quadrants, so the model learns them.
  const fs::path data = path("data");
  fs::create_directories(data);
  auto be32 = [](std::string& s, uint32_t v) {
    for (int b = 24; b >= 0; b -= 8) s.push_back(static_cast<char>(v >> b));
  };
  std::string quadrant0;  // one image of class 0, kept for predict
  for (const auto& [prefix, n] : {std::pair<std::string, int>{"train", 128}, {"t10k", 32}}) {
    std::string images = std::string("\0\0\x08\x03", 4), labels = std::string("\0\0\x08\x01", 4);
    be32(images, n); be32(images, 28); be32(images, 28); be32(labels, n);
    for (int i = 0; i < n; ++i) {
      const int k = i % 4;
      std::string img;
      for (int y = 0; y < 28; ++y)
        for (int x = 0; x < 28; ++x) img.push_back(static_cast<char>((y / 14) * 2 + x / 14 == k ? 220 : 20));
      if (k == 0 && quadrant0.empty()) quadrant0 = img;
      images += img;
      labels.push_back(static_cast<char>(k));
    }
    std::ofstream(data / (prefix + "-images-idx3-ubyte"), std::ios::binary) << images;
    std::ofstream(data / (prefix + "-labels-idx1-ubyte"), std::ios::binary) << labels;
  }
  const fs::path out = path("run"), log = path("train.log");
  const int rc = std::system((std::string(CNX_CLI) + " train --data_path " + data.string() +
                              " --depths 1,1 --dims 8,16 --batch_size 16 --epochs 8 --warmup_epochs 0 --lr 0.0078125"
                              " --output_dir " + out.string() + " > " + log.string() + " 2>&1").c_str());
  ASSERT_TRUE(WIFEXITED(rc) && WEXITSTATUS(rc) == 0) << slurp(log);
  // eval of the best checkpoint prints the accuracy the training run reported for it.
  const std::string trained = slurp(log);
  const size_t at = trained.rfind("best test Acc@1 ");
  ASSERT_NE(at, std::string::npos) << trained;
  const std::string best = trained.substr(at + 16, 5);
  const fs::path eval_log = path("eval.log");
  std::system((std::string(CNX_CLI) + " eval --weights " + (out / "checkpoint-best.safetensors").string() +
               " > " + eval_log.string() + " 2>&1").c_str());
  EXPECT_NE(slurp(eval_log).find("fashion_mnist test (32 images): Acc@1 " + best), std::string::npos)
      << slurp(eval_log) << "\nexpected Acc@1 " << best;
  // predict names the class of a class-0 image first.
  const std::string pgm = bytes_file("q0.pgm", "P5\n# a comment\n28 28\n255\n" + quadrant0);
  const fs::path pred = path("predict.log");
  std::system((std::string(CNX_CLI) + " predict --weights " + (out / "checkpoint-best.safetensors").string() +
               " " + pgm + " > " + pred.string() + " 2>&1").c_str());
  EXPECT_EQ(slurp(pred).rfind(pgm + ": T-shirt/top ", 0), 0u) << slurp(pred);
}

TEST_F(Cli, TrainRefusesTruncatedDataAndBadLabels) {
  auto be32 = [](std::string& s, uint32_t v) {
    for (int b = 24; b >= 0; b -= 8) s.push_back(static_cast<char>(v >> b));
  };
  auto write_set = [&](const fs::path& d, int n, int bad_label, size_t cut) {
    fs::create_directories(d);
    for (const std::string prefix : {"train", "t10k"}) {
      std::string images = std::string("\0\0\x08\x03", 4), labels = std::string("\0\0\x08\x01", 4);
      be32(images, n); be32(images, 28); be32(images, 28); be32(labels, n);
      images += std::string(static_cast<size_t>(n) * 28 * 28, '\x40');
      for (int i = 0; i < n; ++i) labels.push_back(static_cast<char>(i == 5 ? bad_label : i % 10));
      std::ofstream(d / (prefix + "-images-idx3-ubyte"), std::ios::binary) << images.substr(0, images.size() - cut);
      std::ofstream(d / (prefix + "-labels-idx1-ubyte"), std::ios::binary) << labels;
    }
  };
  write_set(path("cut"), 32, 1, 100);
  expect_one_line_failure(this, run("train --data_path " + path("cut").string()),
                          {"convnext train: fashion_mnist:", "train-images-idx3-ubyte"}, 1);
  write_set(path("label"), 32, 12, 0);
  expect_one_line_failure(this, run("train --data_path " + path("label").string()),
                          {"convnext train: fashion_mnist:", "train-labels-idx1-ubyte", "12"}, 1);
}

// The data pipeline end to end: `convnext make-folder` writes a two-class ImageFolder of JPEGs
// (horizontal vs vertical stripes), one `convnext train` command with the paper's recipe
// (RandomResizedCrop, flip, RandAugment rand-m9-mstd0.5-inc1, Random Erasing 0.25, Mixup 0.8 /
// CutMix 1.0 soft targets with smoothing 0.1: every default of --data_set image_folder) learns
// to tell them apart, and eval / predict read the checkpoint and JPEGs.
TEST_F(Cli, TrainsOnAGeneratedImageFolderWithThePapersRecipe) {
  const fs::path data = path("stripes"), out = path("run"), log = path("train.log");
  const std::string cli = CNX_CLI;
  ASSERT_EQ(std::system((cli + " make-folder --out " + data.string() +
                         " --train_per_class 1000 --val_per_class 100 > /dev/null").c_str()), 0);
  // 15 epochs: with a shorter cosine schedule some seeds have not left the 50% plateau when the
  // lr has decayed (seen at 8 epochs); at 15, seeds 0, 1, 3 and 4 all ended at >= 99.5%.
  const int rc = std::system((cli + " train --data_set image_folder --data_path " + data.string() +
                              " --input_size 32 --depths 1,1,1,1 --dims 16,32,64,128 --batch_size 32"
                              " --epochs 15 --num_workers 2 --output_dir " + out.string() + " > " +
                              log.string() + " 2>&1").c_str());
  const std::string trained = slurp(log);
  ASSERT_TRUE(WIFEXITED(rc) && WEXITSTATUS(rc) == 0) << trained;
  EXPECT_NE(trained.find("image_folder: 2000 train / 200 test images, 2 classes"), std::string::npos) << trained;
  const size_t at = trained.find("epoch 14 test: Acc@1 ");
  ASSERT_NE(at, std::string::npos) << trained;
  const double final_acc = std::stod(trained.substr(at + 21, 6));
  EXPECT_GE(final_acc, 90.0) << trained;
  // The config records the recipe's resolved flags as given (-1: the dataset's default).
  const std::string config = slurp(out / "config.json");
  EXPECT_NE(config.find("\"aa\": \"rand-m9-mstd0.5-inc1\""), std::string::npos) << config;

  const std::string best = trained.substr(trained.rfind("best test Acc@1 ") + 16, 5);
  const fs::path eval_log = path("eval.log");
  std::system((cli + " eval --weights " + (out / "checkpoint-best.safetensors").string() + " > " +
               eval_log.string() + " 2>&1").c_str());
  EXPECT_NE(slurp(eval_log).find("image_folder test (200 images): Acc@1 " + best), std::string::npos)
      << slurp(eval_log) << "\nexpected Acc@1 " << best;
  // predict: a validation JPEG of each class, named first.
  for (const char* cls : {"horizontal", "vertical"}) {
    const std::string jpg = (data / "val" / cls / "00007.jpg").string();
    const fs::path pred = path("predict.log");
    std::system((cli + " predict --weights " + (out / "checkpoint-best.safetensors").string() + " " + jpg +
                 " > " + pred.string() + " 2>&1").c_str());
    EXPECT_EQ(slurp(pred).rfind(jpg + ": " + cls + " ", 0), 0u) << slurp(pred);
  }
  // A FIFO is refused at once (it used to block in open() until a writer came), and an image the
  // evaluation transform cannot take is named.
  const fs::path fifo = path("fifo.jpg");
  ASSERT_EQ(mkfifo(fifo.c_str(), 0600), 0);
  const std::string weights = " --weights " + (out / "checkpoint-best.safetensors").string();
  expect_one_line_failure(this, run("predict" + weights + " " + fifo.string()), {fifo.string() + ": ", "FIFO"}, 1);
  const fs::path strip = path("strip.pgm");  // 100000 x 1: resized to 36 rows, 3.6M columns
  std::ofstream(strip, std::ios::binary) << "P5 100000 1 255\n" << std::string(100000, '\x80');
  expect_one_line_failure(this, run("predict" + weights + " " + strip.string()),
                          {strip.string() + ": eval_transform", "89478485"}, 1);
}

TEST_F(Cli, ImageFolderBadInput) {
  const fs::path data = path("stripes");
  const std::string d = " --data_set image_folder --data_path ";
  expect_one_line_failure(this, run("train --data_set image_folder"), {"--data_set image_folder needs --data_path"}, 1);
  expect_one_line_failure(this, run("train" + d + path("missing").string()), {"image_folder:", "missing"}, 1);
  ASSERT_EQ(run("make-folder --train_per_class 4 --val_per_class 2 --out " + data.string()).status, 0);
  expect_one_line_failure(this, run("train" + d + data.string() + " --aa rand-m9-inc0"), {"--aa rand-m9-inc0", "inc1"}, 1);
  expect_one_line_failure(this, run("train" + d + data.string() + " --batch_size 3"), {"even batch size", "3"}, 1);
  expect_one_line_failure(this, run("train" + d + data.string() + " --input_size 16"), {"--input_size must be >= 32"}, 1);
  expect_one_line_failure(this, run("train" + d + data.string() + " --reprob 2"), {"--reprob must be in [0, 1]"}, 1);
  expect_one_line_failure(this, run("train" + d + data.string() + " --mixup_prob -1"), {"--mixup_prob must be in [0, 1]"}, 1);
  // An empty class folder is an error naming it.
  fs::create_directories(data / "train" / "zzz");
  fs::create_directories(data / "val" / "zzz");
  expect_one_line_failure(this, run("train" + d + data.string()), {"zzz"}, 1);
  // make-folder never writes into a folder that has something in it.
  expect_one_line_failure(this, run("make-folder --out " + data.string()), {"not an empty folder", "nothing was written"}, 1);
}
