// Training parity with PyTorch: 20 steps of a small ConvNeXt (in_chans 1, 10 classes, depths
// [1, 1, 2, 1], dims [8, 16, 24, 32], layer scale 1e-6) from the same initial weights, on the
// same batches, with the same label-smoothed loss, AdamW and warmup + cosine lr schedule, must
// give the same loss at every step (1e-4 relative) and the same final weights. The reference is
// the official recipe run by tools/make_train_parity.py in float64 PyTorch
// (tests/data/train_parity/; the script's docstring describes the run and the files).
//
// Two tests train:
//   TwentyStepsMatchPyTorch   the training step written out here, in train/trainer.cpp's order
//                             (forward in training mode, cross_entropy with smoothing, backward,
//                             gradient clipping off, AdamW step with this step's scheduled lr and
//                             the weight decay, zero_grad), on 2 epochs of 10 batches of 8 in the
//                             fixture's order; losses and final weights checked
//   RealTrainerMatchesPyTorch cnx::train itself (the loader, --finetune loading, the lr scaling
//                             rule, the schedule, the loop) on the same 80 images written as
//                             Fashion-MNIST files, one batch of all 80 per epoch for 20 epochs
//                             (its loader shuffles with its own generator, and only a whole-set
//                             batch is independent of the order); losses checked
#include <gtest/gtest.h>
#include <unistd.h>
#include <zlib.h>

#include <cmath>
#include <cstdio>
#include <filesystem>
#include <span>

#include "autograd/ops.h"
#include "models/convnext.h"
#include "models/safetensors.h"
#include "tests/testing.h"
#include "train/data/dataset.h"
#include "train/data/loader.h"
#include "train/optim/adamw.h"
#include "train/optim/schedule.h"
#include "train/trainer.h"

using namespace cnx;
namespace fs = std::filesystem;

namespace {

// Every step's loss within this of PyTorch's, relative (the bound, as the golden
// forward tests). float32 PyTorch lands 1.2e-7 from the float64 reference on this run (the
// fixture's metadata, f32_max_loss_rel_diff), this code 9e-8 (1.3e-7 through the trainer):
// the bound leaves orders of magnitude for rounding that Adam amplifies. What it catches,
// measured with the script's run: AdamW eps 1e-6 instead of 1e-8 moves the losses by 2.6e-4
// relative, beta2 0.99 or weight decay on every tensor by 1e-3, the lr schedule one step early
// by 3e-2.
constexpr double kLossRtol = 1e-4;
// Final weights: within this fraction of each tensor's largest |element|. This is the finer
// check of the optimiser (with layer scale 1e-6 the blocks barely touch the loss, their weights
// show everything). Adam divides every gradient element by its own running magnitude, so
// rounding in an element whose gradient nearly cancels is not damped as it is in plain SGD;
// float32 PyTorch ends 1e-5 of the largest element from the float64 reference
// (f32_max_final_weight_diff_of_tensor_max), this code 3.4e-6. 1e-3 is the golden tests'
// gradient bound and leaves 100x for another summation order (BLAS, threads).
constexpr double kWeightTol = 1e-3;

std::string fixture(const std::string& file) {
  return std::string(CNX_TEST_DATA_DIR) + "/train_parity/" + file;
}

const Safetensors& expected() {
  static const Safetensors f = read_safetensors(fixture("expected.safetensors"));
  return f;
}
const Safetensors& data() {
  static const Safetensors f = read_safetensors(fixture("data.safetensors"));
  return f;
}

Tensor need(const Safetensors& f, const std::string& name) {
  Tensor t = f.find(name);
  if (!t.defined()) throw std::runtime_error("train_parity fixture: no tensor " + name);
  return t;
}

const std::string& meta(const std::string& key) { return expected().metadata.at(key); }
double meta_double(const std::string& key) { return std::stod(meta(key)); }
int64_t meta_int(const std::string& key) { return std::stoll(meta(key)); }
std::vector<int64_t> meta_ints(const std::string& key) {
  std::vector<int64_t> v;
  const std::string& s = meta(key);
  for (size_t start = 0;;) {
    const size_t comma = s.find(',', start);
    v.push_back(std::stoll(s.substr(start, comma - start)));
    if (comma == std::string::npos) return v;
    start = comma + 1;
  }
}

ConvNeXtConfig model_config() {
  ConvNeXtConfig c;
  c.name = "train_parity";
  c.in_chans = meta_int("in_chans");
  c.num_classes = meta_int("num_classes");
  c.depths = meta_ints("depths");
  c.dims = meta_ints("dims");
  c.drop_path_rate = meta_double("drop_path");
  c.layer_scale_init_value = meta_double("layer_scale_init_value");
  c.head_init_scale = meta_double("head_init_scale");
  return c;
}

// The Fashion-MNIST normalisation of the C++ loader (the fixture was normalised the same way).
const Dataset& fashion_mnist_info() {
  static const Dataset d = dataset_info("fashion_mnist");
  return d;
}

// The batch at `step`: images (B, 32, 32, 1) f32 NHWC normalised by the loader's function, and
// labels (B) i64, from the dataset positions the fixture's order gives.
std::pair<Tensor, Tensor> batch(int64_t step) {
  const int64_t B = meta_int("batch_size"), per_epoch = meta_int("iters_per_epoch");
  const Tensor images = need(data(), "images");  // (N, 28, 28) u8
  const int64_t N = images.dim(0), H = images.dim(1), W = images.dim(2);
  const std::vector<uint8_t> px = images.to_vector<uint8_t>();
  const std::vector<int64_t> labels = need(data(), "labels").to_vector<int64_t>();
  const std::vector<int64_t> order = need(data(), "order").to_vector<int64_t>();  // (epochs, N)
  std::vector<float> out;
  std::vector<int64_t> lab;
  for (int64_t b = 0; b < B; ++b) {
    const int64_t i = order[static_cast<size_t>((step / per_epoch) * N + (step % per_epoch) * B + b)];
    const Tensor img = normalize_image(std::span<const uint8_t>(px).subspan(static_cast<size_t>(i * H * W),
                                                                           static_cast<size_t>(H * W)),
                                       H, W, 1, fashion_mnist_info().mean, fashion_mnist_info().std);
    const std::vector<float> v = img.to_vector<float>();
    out.insert(out.end(), v.begin(), v.end());
    lab.push_back(labels[static_cast<size_t>(i)]);
  }
  const int64_t S = loader_image_side(H);
  return {Tensor::from_data<float>({B, S, S, 1}, out), Tensor::from_data<int64_t>({B}, lab)};
}

std::vector<double> schedule() {
  return cosine_scheduler(meta_double("lr"), meta_double("min_lr"), meta_int("epochs"),
                          meta_int("iters_per_epoch"), meta_int("warmup_epochs"),
                          meta_double("warmup_lr"));
}

double max_abs(const std::vector<double>& v) {
  double m = 0;
  for (double x : v) m = std::max(m, std::abs(x));
  return m;
}

// Compares each step's loss with the reference, printing the table and the worst difference.
void expect_losses_match(const std::string& what, const std::vector<double>& got,
                         const std::vector<double>& want) {
  ASSERT_EQ(got.size(), want.size()) << what;
  double worst = 0;
  size_t worst_step = 0;
  for (size_t s = 0; s < got.size(); ++s) {
    const double rel = std::abs(got[s] - want[s]) / std::abs(want[s]);
    std::printf("%s step %2zu: loss %.9f, PyTorch %.9f, relative difference %.2e\n", what.c_str(), s,
                got[s], want[s], rel);
    EXPECT_LE(rel, kLossRtol) << what << " step " << s << ": loss " << got[s] << ", PyTorch " << want[s];
    if (rel > worst) worst = rel, worst_step = s;
  }
  std::printf("%s: worst loss difference %.3e relative (step %zu; bound %.0e)\n", what.c_str(), worst,
              worst_step, kLossRtol);
  // The run must learn, or agreeing losses would say little about the updates.
  EXPECT_LT(want.back(), want.front() - 0.3) << what;
}

void write_gz(const fs::path& p, const std::vector<uint8_t>& bytes) {
  gzFile f = gzopen(p.c_str(), "wb");
  ASSERT_NE(f, nullptr) << p;
  ASSERT_EQ(gzwrite(f, bytes.data(), static_cast<unsigned>(bytes.size())), static_cast<int>(bytes.size()));
  ASSERT_EQ(gzclose(f), Z_OK);
}

void be32(std::vector<uint8_t>& v, uint32_t x) {
  for (int s = 24; s >= 0; s -= 8) v.push_back(static_cast<uint8_t>(x >> s));
}

// The first n fixture images and labels as a Fashion-MNIST split (idx .gz files).
void write_split(const fs::path& dir, const std::string& prefix, int64_t n) {
  const Tensor images = need(data(), "images");
  const int64_t H = images.dim(1), W = images.dim(2);
  const std::vector<uint8_t> px = images.to_vector<uint8_t>();
  const std::vector<int64_t> labels = need(data(), "labels").to_vector<int64_t>();
  std::vector<uint8_t> im, lab;
  be32(im, 0x803); be32(im, static_cast<uint32_t>(n));
  be32(im, static_cast<uint32_t>(H)); be32(im, static_cast<uint32_t>(W));
  be32(lab, 0x801); be32(lab, static_cast<uint32_t>(n));
  im.insert(im.end(), px.begin(), px.begin() + n * H * W);
  for (int64_t i = 0; i < n; ++i) lab.push_back(static_cast<uint8_t>(labels[static_cast<size_t>(i)]));
  write_gz(dir / (prefix + "-images-idx3-ubyte.gz"), im);
  write_gz(dir / (prefix + "-labels-idx1-ubyte.gz"), lab);
}

}  // namespace

TEST(TrainParity, FixtureIsTheDocumentedRun) {
  EXPECT_EQ(meta("reference_dtype"), "float64");
  EXPECT_EQ(meta_int("steps"), 20);
  EXPECT_EQ(meta_int("steps"), meta_int("epochs") * meta_int("iters_per_epoch"));
  EXPECT_EQ(meta_int("iters_per_epoch") * meta_int("batch_size"), meta_int("dataset_size"));
  EXPECT_EQ(need(data(), "images").shape(), Shape({meta_int("dataset_size"), 28, 28}));
  EXPECT_EQ(need(data(), "order").shape(), Shape({meta_int("epochs"), meta_int("dataset_size")}));
  EXPECT_EQ(need(expected(), "lr").dtype(), DType::f64);
  EXPECT_EQ(need(expected(), "loss").shape(), Shape({meta_int("steps")}));
  EXPECT_EQ(need(expected(), "loss_full_batch").shape(), Shape({meta_int("steps")}));
  // train/trainer.cpp uses AdamWOptions{}: its defaults must be the run's (PyTorch's).
  const AdamWOptions adamw;
  EXPECT_EQ(adamw.beta1, meta_double("beta1"));
  EXPECT_EQ(adamw.beta2, meta_double("beta2"));
  EXPECT_EQ(adamw.eps, meta_double("eps"));
  EXPECT_EQ(fashion_mnist_info().mean[0], static_cast<float>(meta_double("mean")));
  EXPECT_EQ(fashion_mnist_info().std[0], static_cast<float>(meta_double("std")));
}

TEST(TrainParity, ScheduleIsTheOfficialCosineScheduler) {
  const std::vector<double> want = test::values(need(expected(), "lr"));
  const std::vector<double> got = schedule();
  ASSERT_EQ(got.size(), want.size());
  double worst = 0;
  for (size_t i = 0; i < got.size(); ++i) {
    EXPECT_LE(std::abs(got[i] - want[i]), 1e-12 * std::abs(want[i]))
        << "step " << i << ": " << got[i] << " vs numpy " << want[i];
    if (want[i] != 0) worst = std::max(worst, std::abs(got[i] - want[i]) / std::abs(want[i]));
  }
  std::printf("lr schedule: worst difference %.3e relative\n", worst);
  EXPECT_EQ(want.front(), 0.0);  // warmup from 0: step 0 moves only Adam's moments
  // The full-batch run: 20 epochs of 1 iteration, 10 of them warmup, give the same values.
  EXPECT_EQ(cosine_scheduler(meta_double("lr"), meta_double("min_lr"), meta_int("steps"), 1,
                             meta_int("steps") / 2, meta_double("warmup_lr")),
            got);
}

TEST(TrainParity, BatchesAreThePyTorchInputs) {
  // The loader's normalisation of step 0's images, bit for bit the fixture's float32 NCHW batch.
  const Tensor want = nchw_to_nhwc(need(data(), "images_step0"));
  const auto [images, labels] = batch(0);
  ASSERT_EQ(images.shape(), want.shape());
  EXPECT_EQ(images.to_vector<float>(), want.to_vector<float>());
  EXPECT_EQ(labels.numel(), meta_int("batch_size"));
}

TEST(TrainParity, TwentyStepsMatchPyTorch) {
  const ConvNeXtConfig cfg = model_config();
  Generator init(0);
  ConvNeXt model(cfg, init);
  model.load_state_dict(read_safetensors(fixture("weights_initial.safetensors")).tensors);

  // As train/trainer.cpp: default AdamW options, lr scales all 1 (no layer decay), the weight
  // decay of the parameters' decay flags, the lr of step i = schedule[i].
  AdamW opt(model.parameters());
  const std::vector<double> lr = schedule();
  const double weight_decay = meta_double("weight_decay"), smoothing = meta_double("smoothing");
  Generator drop_gen(0);  // drop path 0: nothing is drawn
  std::vector<double> losses;
  for (int64_t step = 0; step < meta_int("steps"); ++step) {
    const auto [images, labels] = batch(step);
    Tensor logits = model.forward(images, /*training=*/true, drop_gen);
    Tensor loss = cross_entropy(logits, labels, smoothing);
    losses.push_back(loss.item());
    loss.backward();
    opt.step(lr[static_cast<size_t>(step)], weight_decay);  // clip_grad 0: no clipping
    model.zero_grad();
  }
  EXPECT_EQ(drop_gen.offset(), 0u);
  expect_losses_match("steps", losses, test::values(need(expected(), "loss")));

  const Safetensors final_weights = read_safetensors(fixture("weights_final.safetensors"));
  const Safetensors initial = read_safetensors(fixture("weights_initial.safetensors"));
  const NamedTensors got = model.state_dict();
  ASSERT_EQ(got.size(), final_weights.tensors.size());
  double worst = 0;
  std::string worst_name;
  for (const auto& [name, value] : got) {
    const Tensor want = need(final_weights, name);
    ASSERT_EQ(value.shape(), want.shape()) << name;
    const std::vector<double> w = test::values(want), g = test::values(value);
    const double scale = max_abs(w);
    ASSERT_GT(scale, 0) << name;
    test::expect_close("final " + name, g, w, kWeightTol * scale, 0);
    for (size_t i = 0; i < w.size(); ++i)
      if (std::abs(g[i] - w[i]) / scale > worst) worst = std::abs(g[i] - w[i]) / scale, worst_name = name;
    // Training moved every tensor (so the comparison is not of two copies of the init).
    EXPECT_NE(test::values(need(initial, name)), w) << name;
  }
  std::printf("final weights: worst difference %.3e of the tensor's largest element (%s; bound %.0e)\n",
              worst, worst_name.c_str(), kWeightTol);
}

TEST(TrainParity, RealTrainerMatchesPyTorch) {
  const fs::path root =
      fs::temp_directory_path() / ("cnx_train_parity_" + std::to_string(::getpid()));
  fs::remove_all(root);
  fs::create_directories(root);
  struct RemoveAtExit {
    fs::path p;
    ~RemoveAtExit() {
      std::error_code ec;
      fs::remove_all(p, ec);
    }
  } cleanup{root};
  const int64_t n = meta_int("dataset_size"), steps = meta_int("steps");
  write_split(root, "train", n);
  write_split(root, "t10k", 10);

  const ConvNeXtConfig model = model_config();
  TrainConfig c;
  c.depths = model.depths;
  c.dims = model.dims;
  c.drop_path = model.drop_path_rate;
  c.layer_scale_init_value = model.layer_scale_init_value;
  c.head_init_scale = model.head_init_scale;
  c.data_set = "fashion_mnist";
  c.data_path = root.string();
  c.augment = false;
  c.num_workers = 0;
  c.batch_size = n;  // one batch per epoch: the whole set, in the loader's order
  c.epochs = steps;
  c.warmup_epochs = steps / 2;
  // --lr, --min_lr and --warmup_lr are used as given, as in main.py.
  c.lr = meta_double("lr");
  c.min_lr = meta_double("min_lr");
  c.warmup_lr = meta_double("warmup_lr");
  c.weight_decay = meta_double("weight_decay");
  c.smoothing = meta_double("smoothing");
  c.clip_grad = 0;
  c.finetune = fixture("weights_initial.safetensors");
  c.output_dir = "";
  c.progress_bar = false;
  c.log_every = 1000;
  const TrainResult r = train(c);
  ASSERT_EQ(r.steps, steps);
  expect_losses_match("trainer", r.losses, test::values(need(expected(), "loss_full_batch")));
}
