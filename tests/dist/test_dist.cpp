// Data-parallel training on CPU ranks: run under an MPI launcher with two ranks,
//
//   mpiexec -np 2 --oversubscribe build/test_dist
//
// (ctest runs it so: the dist.* tests of tests/CMakeLists.txt). Every rank runs every test, in
// the same order, so the collectives inside meet; a test that fails on one rank fails the job.
// Each test trains a tiny ConvNeXt on a tiny Fashion-MNIST-format dataset (four classes, a
// bright square in one quadrant) written here.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <filesystem>
#include <numeric>

#include <nlohmann/json.hpp>

#include "autograd/ops.h"
#include "models/convnext.h"
#include "tests/testing.h"
#include "train/checkpoint.h"
#include "train/dist/communicator.h"
#include "train/dist/grad_reducer.h"
#include "tensor/device.h"
#include "train/trainer.h"

using namespace cnx;
using cnx::dist::Communicator;
namespace fs = std::filesystem;

namespace {

Communicator& world() { return Communicator::world(); }

// A folder every rank sees (rank 0 makes it, the others wait), removed at the end.
class DistTest : public ::testing::Test {
 protected:
  void SetUp() override {
    root_ = fs::temp_directory_path() /
            ("cnx_dist_" + std::string(::testing::UnitTest::GetInstance()->current_test_info()->name()));
    if (world().is_root()) {
      fs::remove_all(root_);
      fs::create_directories(root_ / "data");
      test::write_quadrant_split((root_ / "data").string(), "train", kTrainImages, 1);
      test::write_quadrant_split((root_ / "data").string(), "t10k", kTestImages, 2);
    }
    world().barrier();
  }
  void TearDown() override {
    world().barrier();
    if (world().is_root()) fs::remove_all(root_);
  }

  // 1280 training images: 10 steps an epoch at a total batch of 128. 101 test images: the two
  // ranks' evaluation shards differ in size (51 and 50), and the last batches are partial.
  static constexpr int kTrainImages = 1280, kTestImages = 101;

  TrainConfig config(int64_t batch_size) const {
    TrainConfig c;
    c.depths = {1, 1};
    c.dims = {8, 16};
    c.data_path = (root_ / "data").string();
    c.batch_size = batch_size;
    c.epochs = 2;
    c.augment = true;  // the crop and flip draws are keyed by the global position: same pixels
    c.lr = 2e-3;
    c.warmup_epochs = 0;
    c.num_workers = 1;
    c.log_every = 1000;
    c.progress_bar = false;
    c.save_ckpt_num = 10;
    return c;
  }
  std::string dir(const std::string& name) const { return (root_ / name).string(); }

  fs::path root_;
};

// The tiny ConvNeXt of config() (one-channel images) with `classes` outputs.
ConvNeXtConfig tiny_model(int64_t classes) {
  ConvNeXtConfig mc;
  mc.depths = {1, 1};
  mc.dims = {8, 16};
  mc.in_chans = 1;
  mc.num_classes = classes;
  return mc;
}

// The model's parameters in a checkpoint, as doubles, by name.
std::map<std::string, std::vector<double>> checkpoint_weights(const std::string& path) {
  std::map<std::string, std::vector<double>> out;
  for (const auto& [name, t] : load_checkpoint(path).tensors)
    if (name.rfind("model.", 0) == 0) out[name] = test::values(t);
  return out;
}

// Largest |a - b| over every weight, relative to max(1, |b|).
double max_weight_difference(const std::string& a_path, const std::string& b_path) {
  const auto a = checkpoint_weights(a_path), b = checkpoint_weights(b_path);
  EXPECT_EQ(a.size(), b.size());
  double worst = 0;
  for (const auto& [name, va] : a) {
    const auto it = b.find(name);
    if (it == b.end()) {
      ADD_FAILURE() << name << " missing";
      continue;
    }
    EXPECT_EQ(va.size(), it->second.size()) << name;
    for (size_t i = 0; i < std::min(va.size(), it->second.size()); ++i)
      worst = std::max(worst, std::abs(va[i] - it->second[i]) / std::max(1.0, std::abs(it->second[i])));
  }
  return worst;
}

}  // namespace

// ---- the collectives ---------------------------------------------------------------------------

TEST(DistCommunicator, CollectivesCombineEveryRank) {
  Communicator& w = world();
  ASSERT_EQ(w.size(), 2) << "run under mpiexec -np 2";
  const int r = w.rank();
  std::vector<double> d{1.5 + r, -2.0 * r};
  w.allreduce_sum(d);
  EXPECT_EQ(d, (std::vector<double>{4.0, -2.0}));
  std::vector<int64_t> m{r == 0 ? 7 : 3, r == 1 ? 9 : -1};
  w.allreduce_max(m);
  EXPECT_EQ(m, (std::vector<int64_t>{7, 9}));
  std::vector<float> f(1000);
  std::iota(f.begin(), f.end(), static_cast<float>(r));  // rank 0: 0, 1, ...; rank 1: 1, 2, ...
  dist::Request req = w.iallreduce_sum(f);
  req.wait();
  for (size_t i = 0; i < f.size(); ++i) ASSERT_EQ(f[i], static_cast<float>(2 * i + 1)) << i;
  const std::vector<std::string> all = w.allgather(std::string(static_cast<size_t>(r) * 3 + 1, 'a' + r));
  ASSERT_EQ(all.size(), 2u);
  EXPECT_EQ(all[0], "a");
  EXPECT_EQ(all[1], "bbbb");
  std::array<std::byte, 4> id{};
  if (r == 0) std::memcpy(id.data(), "nccl", 4);
  w.broadcast(id, 0);
  EXPECT_EQ(std::memcmp(id.data(), "nccl", 4), 0);
  // A world of one inside the job: the identity.
  std::vector<double> one{3.0};
  Communicator::self().allreduce_sum(one);
  EXPECT_EQ(one[0], 3.0);
  EXPECT_EQ(Communicator::self().size(), 1);
}

// ---- the gradient buckets ----------------------------------------------------------------------

// Each rank's gradients are known values; the hook is called in an order other than the
// buckets' (the buckets still start in index order on both ranks, or the collectives would not
// meet); after finish() every gradient is the mean of the two ranks' values, exactly.
TEST(DistGradReducer, AveragesEveryGradientOverTheRanks) {
  Communicator& w = world();
  std::vector<Parameter> params;
  const std::vector<int64_t> sizes{5, 300, 7, 1000, 1, 64};
  for (size_t i = 0; i < sizes.size(); ++i) {
    Parameter p;
    p.name = std::string(1, 'p') + std::to_string(i);  // (not "p" + ...: a false -Wrestrict in g++ 12)
    p.value = Tensor::zeros({sizes[i]}).set_requires_grad(true);
    params.push_back(std::move(p));
  }
  // Buckets of at least 1 KB: {p5 p4 p3}, {p2 p1}, {p0} (reverse order).
  dist::GradReducer reducer(w, params, Device::cpu(), 1024);
  ASSERT_EQ(reducer.buckets().size(), 3u);
  auto grad_value = [](int rank, size_t p, int64_t i) {
    return static_cast<float>(0.25 * static_cast<double>(rank + 1) * static_cast<double>(p + 1) + 1e-3 * i);
  };
  for (int step = 0; step < 2; ++step) {  // twice: the reducer resets between steps
    for (size_t p = 0; p < params.size(); ++p) {
      std::vector<float> g(static_cast<size_t>(sizes[p]));
      for (int64_t i = 0; i < sizes[p]; ++i) g[static_cast<size_t>(i)] = grad_value(w.rank(), p, i) + static_cast<float>(step);
      params[p].value.set_grad(Tensor::from_data<float>({sizes[p]}, g));
    }
    auto hook = reducer.hook();
    for (size_t p : {0, 2, 1, 5, 3, 4}) hook(params[p].value.impl());
    reducer.finish();
    for (size_t p = 0; p < params.size(); ++p) {
      const std::vector<float> got = params[p].value.grad().to_vector<float>();
      for (int64_t i = 0; i < sizes[p]; ++i) {
        const float g0 = grad_value(0, p, i) + static_cast<float>(step);
        const float g1 = grad_value(1, p, i) + static_cast<float>(step);
        const float want = (g0 + g1) * 0.5f;  // the sum of the two (either order), halved
        ASSERT_EQ(got[static_cast<size_t>(i)], want) << "p" << p << "[" << i << "] step " << step;
      }
    }
  }
  Tensor loss = Tensor::full({}, w.rank() == 0 ? 1.0 : 2.0);
  reducer.average(loss);
  EXPECT_EQ(loss.item(), 1.5);
}

// In a real backward the buckets start while it runs: the first (the head's end of the model)
// after only its own gradients, long before the stem's arrive; and the averaged gradients equal
// the mean of the two ranks' own (each rank feeds its own images).
TEST(DistGradReducer, BucketsStartDuringTheBackward) {
  Communicator& w = world();
  Generator init(5);
  ConvNeXt model(tiny_model(4), init);
  dist::GradReducer reducer(w, model.parameters(), Device::cpu(), 2048);
  const size_t n = reducer.buckets().size();
  ASSERT_GE(n, 3u);
  Generator data(100 + static_cast<uint64_t>(w.rank()));
  const Tensor x = Tensor::randn({4, 16, 16, 1}, data);
  const Tensor y = Tensor::from_data<int64_t>({4}, std::vector<int64_t>{0, 1, 2, w.rank() == 0 ? 3 : 1});
  Generator unused(0);
  cross_entropy(model.forward(x, /*training=*/true, unused), y, 0.0).backward(reducer.hook());
  // This rank's own gradients, before the averaging writes over them.
  std::vector<std::vector<float>> own;
  for (Parameter& p : model.parameters()) own.push_back(p.value.grad().to_vector<float>());
  reducer.finish();
  const int total = static_cast<int>(model.parameters().size());
  for (size_t k = 0; k < n; ++k) {
    const int at = reducer.buckets()[k].announced_at_start;
    EXPECT_GE(at, static_cast<int>(reducer.buckets()[k].params.size())) << "bucket " << k;
    EXPECT_LE(at, total) << "bucket " << k;
    if (k > 0) {
      EXPECT_GE(at, reducer.buckets()[k - 1].announced_at_start) << "bucket " << k;
    }
  }
  EXPECT_LT(reducer.buckets()[0].announced_at_start, total / 2) << "the first bucket started late";
  // Each averaged gradient is (own + other) / 2, with the other rank's own gradient gathered.
  for (size_t i = 0; i < own.size(); ++i) {
    std::vector<float> sum = own[i];
    w.allreduce_sum(sum);
    const std::vector<float> got = model.parameters()[i].value.grad().to_vector<float>();
    for (size_t j = 0; j < got.size(); ++j) ASSERT_EQ(got[j], sum[j] * 0.5f) << model.parameters()[i].name;
  }
}

// ---- training ----------------------------------------------------------------------------------

// Two ranks at batch 64 against one process at batch 128, from the same weights and the same
// data order: each step's images are the same 128 (the union of the two ranks' shards of it),
// so the losses and the weights agree up to float32 summation order. Also: every rank ends with
// bitwise the same weights (the trainer checks it after each epoch and fails otherwise), and the
// sharded evaluation counts what the single process counts.
// Trains `two` on both ranks and `one` (the one-process reference, in each rank's own folder,
// no collective in it) and compares: every step's loss, every weight of the checkpoint `tag`,
// and the accuracy; the 2-rank losses must be the same on both ranks.
void expect_two_ranks_train_as_one_process(const TrainConfig& two, const TrainConfig& one, size_t steps,
                                           const std::string& tag, const std::string& what) {
  Communicator& w = world();
  const TrainResult r2 = train(two, w);
  const TrainResult r1 = train(one, Communicator::self());

  EXPECT_EQ(r2.world_size, 2);
  EXPECT_EQ(r1.world_size, 1);
  ASSERT_EQ(r2.losses.size(), steps);
  ASSERT_EQ(r1.losses.size(), steps);
  double worst_loss = 0;
  for (size_t i = 0; i < r1.losses.size(); ++i) {
    worst_loss = std::max(worst_loss, std::abs(r2.losses[i] - r1.losses[i]) / std::abs(r1.losses[i]));
    EXPECT_NEAR(r2.losses[i], r1.losses[i], 1e-4 * std::abs(r1.losses[i])) << "step " << i + 1;
  }
  const double worst_weight =
      max_weight_difference(checkpoint_path(two.output_dir, tag), checkpoint_path(one.output_dir, tag));
  EXPECT_LT(worst_weight, 1e-4);
  EXPECT_LT(r1.losses.back(), 0.95 * r1.losses.front()) << "it learns: " << ::testing::PrintToString(r1.losses);
  EXPECT_EQ(r2.last_acc1, r1.last_acc1);
  if (w.is_root())
    std::printf("%s over %zu steps: largest relative loss difference %.3g, largest weight difference %.3g "
                "(relative to max(1, |w|)); Acc@1 %.2f vs %.2f\n",
                what.c_str(), steps, worst_loss, worst_weight, r2.last_acc1, r1.last_acc1);
  const std::vector<std::string> all = w.allgather(nlohmann::json(r2.losses).dump());
  EXPECT_EQ(all[0], all[1]);
}

TEST_F(DistTest, TwoRanksOfHalfTheBatchTrainAsOneProcess) {
  TrainConfig two = config(64);
  two.output_dir = dir("two_ranks");
  TrainConfig one = config(128);
  one.output_dir = dir("one_process_rank" + std::to_string(world().rank()));
  expect_two_ranks_train_as_one_process(two, one, 20, "1", "2 ranks x 64 vs 1 x 128");
}

// With --update_freq 2 only the step's second micro-batch reduces (the first accumulates
// locally): 2 ranks x 32 x 2 micro-batches see each step the 128 images one process sees.
TEST_F(DistTest, TwoRanksWithGradientAccumulationTrainAsOneProcess) {
  TrainConfig two = config(32);
  two.update_freq = 2;
  two.output_dir = dir("two_ranks");
  TrainConfig one = config(128);
  one.output_dir = dir("one_process_rank" + std::to_string(world().rank()));
  expect_two_ranks_train_as_one_process(two, one, 20, "1", "2 ranks x 32 x update_freq 2 vs 1 x 128");
}

// A 2-rank checkpoint resumed by one process: it goes on (with a warning on stderr) from the
// same epoch and batch, with the weights and optimiser state of the 2-rank run.
TEST_F(DistTest, ResumedWithAnotherWorldSizeGoesOnWithAWarning) {
  Communicator& w = world();
  TrainConfig c = config(64);
  c.output_dir = dir("two_ranks");
  c.max_steps = 7;
  const TrainResult a = train(c, w);
  ASSERT_EQ(a.steps, 7);
  TrainConfig one = config(64);
  one.output_dir = dir("one_rank" + std::to_string(w.rank()));
  one.resume = checkpoint_path(dir("two_ranks"), "recovery");
  ::testing::internal::CaptureStderr();
  const TrainResult b = train(one, Communicator::self());
  const std::string err = ::testing::internal::GetCapturedStderr();
  EXPECT_NE(err.find("was trained by 2 ranks, this run has 1"), std::string::npos) << err;
  // One process at batch 64 has 20 steps an epoch: the rest of epoch 0 (batches 7..19), then 20.
  EXPECT_EQ(b.steps, 7 + 13 + 20);
  EXPECT_EQ(b.losses.size(), 33u);
  w.barrier();
}

// The CUDA ranks: the same comparison with --device cuda, the gradients averaged by NCCL
// (train/dist/nccl_backend.cpp). On the emulated device each process is a GPU of its own and
// NCCL's collectives are served by MPI; a real build without a GPU skips it (two GPUs run it).
TEST_F(DistTest, CudaTwoRanksTrainAsOneProcess) {
  if (cuda_device_count() == 0) GTEST_SKIP() << "no CUDA device";
  if (!dist::built_with_nccl()) GTEST_SKIP() << "built without NCCL";
  Communicator& w = world();
  TrainConfig two = config(32);
  two.device = "cuda";
  two.use_amp = "false";
  two.max_steps = 6;
  two.output_dir = dir("two_ranks");
  TrainConfig one = config(64);
  one.device = "cuda";
  one.use_amp = "false";
  one.max_steps = 6;
  one.output_dir = dir("one_process_rank" + std::to_string(w.rank()));
  expect_two_ranks_train_as_one_process(two, one, 6, "recovery", "cuda: 2 ranks x 32 vs 1 x 64");
}

// The sharded evaluation (51 + 50 images, partial batches) counts exactly what one process
// counts, for a model that is far from perfect (freshly initialised: about chance).
TEST_F(DistTest, ShardedEvaluationEqualsOneProcess) {
  Communicator& w = world();
  Generator init(3);
  ConvNeXt model(tiny_model(10), init);
  // The data's four classes get a head start, so that the predictions spread over them (about
  // chance, 25%) instead of all falling on one of the six classes the data never has.
  for (Parameter& p : model.parameters())
    if (p.name == "head.bias")
      p.value.copy_from(Tensor::from_data<float>({10}, std::vector<float>{3, 3, 3, 3, 0, 0, 0, 0, 0, 0}));
  const std::string data = (root_ / "data").string();
  const EvalResult sharded = evaluate(model, "fashion_mnist", data, 16, 1, 224, -1, &w);
  const EvalResult whole = evaluate(model, "fashion_mnist", data, 16, 1, 224, -1);
  EXPECT_EQ(sharded.images, kTestImages);
  EXPECT_EQ(whole.images, kTestImages);
  EXPECT_EQ(sharded.acc1, whole.acc1);
  EXPECT_EQ(sharded.acc5, whole.acc5);
  EXPECT_NEAR(sharded.loss, whole.loss, 1e-12 * std::abs(whole.loss));
  EXPECT_GT(whole.acc1, 0.0);
  EXPECT_LT(whole.acc1, 100.0);
}

// A 2-rank run stopped after 7 steps (a recovery checkpoint, as a signal leaves) and resumed is
// bitwise the uninterrupted 2-rank run: losses and every tensor of the final checkpoint. Drop
// path is on, so each rank's generator must come back as it was.
TEST_F(DistTest, StoppedAndResumedIsBitwiseTheUninterruptedRun) {
  Communicator& w = world();
  TrainConfig c = config(64);
  c.drop_path = 0.2;
  c.depths = {2, 1};
  c.output_dir = dir("whole");
  const TrainResult whole = train(c, w);

  TrainConfig first = c;
  first.output_dir = dir("parts");
  first.max_steps = 7;
  const TrainResult a = train(first, w);
  ASSERT_EQ(a.steps, 7);
  // The recovery checkpoint holds both ranks' drop-path generators: their own seeds (rank 0's
  // a one-process run's, recorded as "drop_gen" too), at the same position.
  const nlohmann::json state =
      nlohmann::json::parse(load_checkpoint(checkpoint_path(dir("parts"), "recovery")).state_json);
  // (EXPECT, not ASSERT, before the next collective: a rank that left the test early would leave
  // the other waiting in it until the watchdog ends the job.)
  EXPECT_EQ(state.at("world_size"), 2);
  const nlohmann::json& gens = state.at("drop_gens");
  EXPECT_EQ(gens.size(), 2u);
  EXPECT_EQ(gens[0].at("seed").get<uint64_t>(), drop_path_seed(c.seed, 0));
  EXPECT_EQ(gens[1].at("seed").get<uint64_t>(), drop_path_seed(c.seed, 1));
  EXPECT_NE(gens[0].at("seed"), gens[1].at("seed"));
  EXPECT_EQ(gens[0].at("offset"), gens[1].at("offset"));
  EXPECT_GT(gens[0].at("offset").get<uint64_t>(), 0u);
  EXPECT_EQ(state.at("drop_gen"), gens[0]);
  TrainConfig rest = c;
  rest.output_dir = dir("parts");
  rest.auto_resume = true;
  const TrainResult b = train(rest, w);

  std::vector<double> losses = a.losses;
  losses.insert(losses.end(), b.losses.begin(), b.losses.end());
  ASSERT_EQ(losses.size(), whole.losses.size());
  for (size_t i = 0; i < losses.size(); ++i) EXPECT_EQ(losses[i], whole.losses[i]) << "step " << i + 1;
  if (w.is_root()) test::expect_same_file_tensors(checkpoint_path(dir("whole"), "1"), checkpoint_path(dir("parts"), "1"));
  w.barrier();
}

namespace {
class RankFailures : public ::testing::EmptyTestEventListener {
 public:
  explicit RankFailures(int rank) : rank_(rank) {}
  void OnTestPartResult(const ::testing::TestPartResult& r) override {
    if (r.failed())
      std::fprintf(stderr, "rank %d: %s:%d: failure\n%s\n", rank_, r.file_name() ? r.file_name() : "?",
                   r.line_number(), r.summary());
  }

 private:
  int rank_;
};
}  // namespace

int main(int argc, char** argv) {
  ::testing::InitGoogleTest(&argc, argv);
  Communicator& w = Communicator::world();
  // One report: rank 0's. The other ranks print their failures only, each line marked.
  if (!w.is_root()) {
    ::testing::TestEventListeners& listeners = ::testing::UnitTest::GetInstance()->listeners();
    delete listeners.Release(listeners.default_result_printer());
    listeners.Append(new RankFailures(w.rank()));
  }
  return RUN_ALL_TESTS();
}
