// The batch finish (kernels/batch_finish.h): uint8 batch -> normalised float batch with Random
// Erasing noise and Mixup/CutMix, on the CPU against references computed here by hand from the
// definitions; the DataLoader's two outputs (f32 = u8 batch + CPU finish); the host buffer pool
// (tensor/pinned_memory.h) with a fake backend whose events complete when the test says so; and,
// on a GPU, the CUDA finish against the CPU one, pinned buffers and the u8 loader on the device.
#include <gtest/gtest.h>

#include <cmath>
#include <cstring>
#include <filesystem>
#include <map>
#include <numbers>
#include <set>
#include <string>
#include <unistd.h>
#include <vector>

#include "kernels/batch_finish.h"
#include "tensor/cuda_context.h"
#include "tensor/generator.h"
#include "tensor/pinned_memory.h"
#include "tests/cuda_testing.h"
#include "tests/testing.h"
#include "train/data/augment.h"
#include "train/data/loader.h"
#include "train/data/synthetic_folder.h"

namespace cnx {
namespace {

namespace fs = std::filesystem;

// ---- references, written from the definitions in kernels/batch_finish.h ----------------------

// norm(c, v) in double, rounded once.
float ref_norm(int v, float mean, float std) {
  return static_cast<float>((v / 255.0 - static_cast<double>(mean)) / static_cast<double>(std));
}

// erase_noise(key, k) through cnx::Generator: Philox block k / 2 under `key` is the generator
// seeded with `key` at offset (k / 2) * 4; its first uniform is U(w0, w1), the second U(w2, w3).
float ref_noise(uint64_t key, int64_t k) {
  Generator g(key);
  g.set_state(key, static_cast<uint64_t>(k / 2) * 4);
  const double u1 = 1.0 - g.uniform();
  const double u2 = g.uniform();
  const double r = std::sqrt(-2.0 * std::log(u1));
  const double a = 2.0 * std::numbers::pi * u2;
  return static_cast<float>(k % 2 == 0 ? r * std::cos(a) : r * std::sin(a));
}

Normalization make_norm(float m0, float m1, float m2, float s0, float s1, float s2) {
  Normalization n;
  n.mean[0] = m0, n.mean[1] = m1, n.mean[2] = m2;
  n.std[0] = s0, n.std[1] = s1, n.std[2] = s2;
  return n;
}

struct Sizes {
  int64_t B, H, W, C;
  int64_t numel() const { return B * H * W * C; }
  int64_t at(int64_t i, int64_t y, int64_t x, int64_t c) const { return ((i * H + y) * W + x) * C + c; }
};

std::vector<float> cpu_finish(const std::vector<uint8_t>& in, const std::vector<EraseParams>& erase,
                              const MixParams& mix, const Normalization& norm, const Sizes& s) {
  std::vector<float> out(static_cast<size_t>(s.numel()));
  cpu::batch_finish(out.data(), in.data(), erase.empty() ? nullptr : erase.data(), mix, norm, s.B, s.H,
                    s.W, s.C);
  return out;
}

// The value val(j, y, x, c) of the definition, by hand.
float ref_val(const std::vector<uint8_t>& in, const std::vector<EraseParams>& erase,
              const Normalization& norm, const Sizes& s, int64_t j, int64_t y, int64_t x, int64_t c) {
  if (!erase.empty()) {
    const EraseParams& e = erase[static_cast<size_t>(j)];
    if (e.height > 0 && y >= e.top && y < e.top + e.height && x >= e.left && x < e.left + e.width)
      return ref_noise(e.noise_key, (y * s.W + x) * s.C + c);
  }
  return ref_norm(in[static_cast<size_t>(s.at(j, y, x, c))], norm.mean[c], norm.std[c]);
}

// ---- normalisation ----------------------------------------------------------------------------

TEST(BatchFinish, NormalisesKnownBytes) {
  // mean 0.5, std 0.25: 0 -> -2, 255 -> 2, 51 (= 0.2 * 255) -> -1.2, 153 (0.6) -> 0.4.
  const Normalization norm = make_norm(0.5f, 0.0f, 1.0f, 0.25f, 1.0f, 0.5f);
  const Sizes s{1, 1, 4, 3};
  const std::vector<uint8_t> in{0, 0, 0, 255, 255, 255, 51, 51, 51, 153, 153, 153};
  const auto out = cpu_finish(in, {}, MixParams{}, norm, s);
  // Channel 0 by hand; channels 1 (mean 0, std 1: v / 255) and 2 ((v / 255 - 1) / 0.5).
  const float want[12] = {-2.0f, 0.0f, -2.0f,
                          2.0f, 1.0f, 0.0f,
                          static_cast<float>(-0.3 / 0.25), static_cast<float>(0.2), static_cast<float>(-0.8 / 0.5),
                          static_cast<float>(0.1 / 0.25), static_cast<float>(0.6), static_cast<float>(-0.4 / 0.5)};
  for (int k = 0; k < 12; ++k) EXPECT_FLOAT_EQ(out[static_cast<size_t>(k)], want[k]) << "value " << k;
  // Every byte value of every channel: the double expression rounded once, bitwise.
  const Normalization n2 = make_norm(0.485f, 0.456f, 0.406f, 0.229f, 0.224f, 0.225f);
  std::vector<uint8_t> all(256 * 3);
  for (int v = 0; v < 256; ++v)
    for (int c = 0; c < 3; ++c) all[static_cast<size_t>(v * 3 + c)] = static_cast<uint8_t>(v);
  const auto o2 = cpu_finish(all, {}, MixParams{}, n2, Sizes{1, 16, 16, 3});
  for (int v = 0; v < 256; ++v)
    for (int c = 0; c < 3; ++c)
      ASSERT_EQ(o2[static_cast<size_t>(v * 3 + c)], ref_norm(v, n2.mean[c], n2.std[c])) << v << " " << c;
}

// ---- the erasing noise ------------------------------------------------------------------------

TEST(BatchFinish, EraseNoiseIsItsDefinitionAndStandardNormal) {
  for (uint64_t key : {uint64_t{0}, uint64_t{1}, uint64_t{0xDEADBEEFCAFEF00Dull}})
    for (int64_t k : {int64_t{0}, int64_t{1}, int64_t{2}, int64_t{3}, int64_t{150527}, int64_t{1} << 33})
      EXPECT_EQ(erase_noise(key, k), ref_noise(key, k)) << "key " << key << " k " << k;
  // Moments over 200k values of one key: mean 0, variance 1, and the two values of a pair
  // (cos and sin of the same draw) uncorrelated. sd of the mean 0.0022, of the variance 0.0032.
  const int64_t n = 200000;
  double s = 0, s2 = 0, s4 = 0, pair = 0;
  for (int64_t k = 0; k < n; k += 2) {
    const double a = erase_noise(7, k), b = erase_noise(7, k + 1);
    s += a + b;
    s2 += a * a + b * b;
    s4 += a * a * a * a + b * b * b * b;
    pair += a * b;
  }
  const double mean = s / n, var = s2 / n - mean * mean;
  EXPECT_NEAR(mean, 0.0, 0.011);
  EXPECT_NEAR(var, 1.0, 0.016);
  EXPECT_NEAR(s4 / n, 3.0, 0.1);  // a normal's fourth moment
  EXPECT_NEAR(pair / (n / 2), 0.0, 0.02);
  // Another key, another field.
  int same = 0;
  for (int64_t k = 0; k < 1000; ++k) same += erase_noise(7, k) == erase_noise(8, k);
  EXPECT_EQ(same, 0);
}

TEST(BatchFinish, EraseBoxGetsNoiseAndTheRestIsUntouched) {
  const Sizes s{3, 7, 9, 3};
  const auto in = test::random_bytes(s.numel(), 3);
  const Normalization norm = make_norm(0.25f, 0.5f, 0.75f, 0.5f, 0.25f, 0.125f);
  std::vector<EraseParams> erase(3);
  erase[0] = {2, 3, 4, 5, 0x1234567890ull};  // rows 2..5, columns 3..7
  erase[2] = {0, 0, 1, 1, 99};               // one pixel, top left
  const auto out = cpu_finish(in, erase, MixParams{}, norm, s);
  const auto plain = cpu_finish(in, {}, MixParams{}, norm, s);
  int64_t erased = 0;
  for (int64_t i = 0; i < s.B; ++i)
    for (int64_t y = 0; y < s.H; ++y)
      for (int64_t x = 0; x < s.W; ++x)
        for (int64_t c = 0; c < s.C; ++c) {
          const size_t k = static_cast<size_t>(s.at(i, y, x, c));
          const EraseParams& e = erase[static_cast<size_t>(i)];
          const bool in_box = e.height > 0 && y >= e.top && y < e.top + e.height && x >= e.left && x < e.left + e.width;
          if (in_box) {
            ASSERT_EQ(out[k], ref_noise(e.noise_key, (y * s.W + x) * s.C + c)) << i << " " << y << " " << x << " " << c;
            ++erased;
          } else {
            ASSERT_EQ(out[k], plain[k]);
            ASSERT_EQ(out[k], ref_norm(in[k], norm.mean[c], norm.std[c]));
          }
        }
  EXPECT_EQ(erased, (4 * 5 + 1) * 3);
}

// random_erasing (the float primitive) and the finish of draw_random_erasing agree.
TEST(BatchFinish, RandomErasingPrimitiveMatchesTheFinish) {
  const Sizes s{1, 20, 24, 3};
  const auto in = test::random_bytes(s.numel(), 5);
  const Normalization norm = make_norm(0.4f, 0.5f, 0.6f, 0.2f, 0.3f, 0.4f);
  RandomErasingOptions opt;
  opt.probability = 1.0;
  for (uint64_t seed = 0; seed < 10; ++seed) {
    auto a = cpu_finish(in, {}, MixParams{}, norm, s);
    Generator ga(seed), gb(seed);
    const CropBox box = random_erasing(a, s.H, s.W, s.C, ga, opt);
    const EraseParams e = draw_random_erasing(s.H, s.W, gb, opt);
    ASSERT_EQ(ga.offset(), gb.offset());
    ASSERT_EQ(box, (CropBox{e.top, e.left, e.height, e.width}));
    ASSERT_GT(e.height, 0);
    EXPECT_EQ(a, cpu_finish(in, {e}, MixParams{}, norm, s)) << "seed " << seed;
  }
}

// ---- Mixup and CutMix -------------------------------------------------------------------------

TEST(BatchFinish, MixupBlendsEachSampleWithItsFlippedPartner) {
  const Sizes s{4, 5, 6, 2};
  const auto in = test::random_bytes(s.numel(), 11);
  const Normalization norm = make_norm(0.3f, 0.6f, 0.0f, 0.2f, 0.4f, 1.0f);
  std::vector<EraseParams> erase(4);
  erase[3] = {1, 1, 2, 3, 4242};  // sample 3 erased: its partner 0 mixes the erased values
  MixParams mix;
  mix.mode = MixMode::mixup;
  const double lam = 0.3;
  mix.lam = static_cast<float>(lam);
  mix.one_minus_lam = static_cast<float>(1.0 - lam);
  const auto out = cpu_finish(in, erase, mix, norm, s);
  for (int64_t i = 0; i < s.B; ++i)
    for (int64_t y = 0; y < s.H; ++y)
      for (int64_t x = 0; x < s.W; ++x)
        for (int64_t c = 0; c < s.C; ++c) {
          const float a = ref_val(in, erase, norm, s, i, y, x, c);
          const float b = ref_val(in, erase, norm, s, s.B - 1 - i, y, x, c);
          const float want = a * 0.3f + b * static_cast<float>(1.0 - lam);
          ASSERT_EQ(out[static_cast<size_t>(s.at(i, y, x, c))], want) << i << " " << y << " " << x << " " << c;
        }
  // The same as the float primitive mixup_cutmix on the finished, unmixed batch.
  const auto unmixed = cpu_finish(in, erase, MixParams{}, norm, s);
  std::vector<int64_t> labels{0, 1, 2, 0};
  MixupOptions mo;
  mo.mixup_alpha = 0.8;
  mo.cutmix_alpha = 0.0;
  mo.num_classes = 3;
  Generator g1(5), g2(5);
  const MixupResult r = mixup_cutmix(unmixed, labels, s.B, s.H, s.W, s.C, g1, mo);
  const MixupDraw d = draw_mixup_cutmix(s.H, s.W, g2, mo);
  EXPECT_EQ(r.lam, d.lam);
  EXPECT_EQ(r.images, cpu_finish(in, erase, mix_params(d), norm, s));
  EXPECT_EQ(r.targets, mixup_targets(labels, d.lam, mo));
}

TEST(BatchFinish, CutMixCopiesTheBoxFromTheFlippedPartner) {
  const Sizes s{3, 8, 7, 3};  // odd batch: the middle sample is its own partner
  const auto in = test::random_bytes(s.numel(), 13);
  const Normalization norm = make_norm(0.485f, 0.456f, 0.406f, 0.229f, 0.224f, 0.225f);
  std::vector<EraseParams> erase(3);
  erase[2] = {0, 0, 3, 3, 77};  // overlaps the CutMix box: sample 0 takes erased values from 2
  MixParams mix;
  mix.mode = MixMode::cutmix;
  mix.top = 1, mix.left = 2, mix.height = 4, mix.width = 3;  // rows 1..4, columns 2..4
  const auto out = cpu_finish(in, erase, mix, norm, s);
  int64_t from_partner = 0;
  for (int64_t i = 0; i < s.B; ++i)
    for (int64_t y = 0; y < s.H; ++y)
      for (int64_t x = 0; x < s.W; ++x)
        for (int64_t c = 0; c < s.C; ++c) {
          const bool in_box = y >= 1 && y < 5 && x >= 2 && x < 5;
          const int64_t j = in_box ? s.B - 1 - i : i;
          from_partner += in_box;
          ASSERT_EQ(out[static_cast<size_t>(s.at(i, y, x, c))], ref_val(in, erase, norm, s, j, y, x, c))
              << i << " " << y << " " << x << " " << c;
        }
  EXPECT_EQ(from_partner, 3 * 4 * 3 * 3);
  // An empty box changes nothing.
  MixParams empty = mix;
  empty.height = 0;
  EXPECT_EQ(cpu_finish(in, erase, empty, norm, s), cpu_finish(in, erase, MixParams{}, norm, s));
}

TEST(BatchFinish, DeterministicAndChecksItsInputs) {
  const Sizes s{2, 5, 5, 1};
  const auto in = test::random_bytes(s.numel(), 17);
  const Normalization norm = make_norm(0.5f, 0, 0, 0.5f, 1, 1);
  std::vector<EraseParams> erase{{1, 1, 2, 2, 5}, {0, 0, 5, 4, 6}};
  MixParams mix;
  mix.mode = MixMode::mixup;
  mix.lam = 0.75f;
  mix.one_minus_lam = 0.25f;
  EXPECT_EQ(cpu_finish(in, erase, mix, norm, s), cpu_finish(in, erase, mix, norm, s));
  std::vector<float> out(static_cast<size_t>(s.numel()));
  test::expect_error([&] { cpu::batch_finish(out.data(), in.data(), nullptr, MixParams{}, norm, 2, 5, 5, 4); },
                     {"batch_finish", "C=4"});
  std::vector<EraseParams> bad{{4, 0, 2, 1, 1}, {}};
  test::expect_error([&] { cpu::batch_finish(out.data(), in.data(), bad.data(), MixParams{}, norm, 2, 5, 5, 1); },
                     {"batch_finish", "erase box of sample 0", "outside the 5x5"});
  MixParams cut;
  cut.mode = MixMode::cutmix;
  cut.left = 3, cut.width = 3, cut.height = 1;
  test::expect_error([&] { cpu::batch_finish(out.data(), in.data(), nullptr, cut, norm, 2, 5, 5, 1); },
                     {"batch_finish", "CutMix box"});
}

// ---- the loader's two outputs ---------------------------------------------------------------

Dataset small_dataset(int64_t n, int64_t side, int64_t c) {
  Dataset d;
  d.name = "synthetic";
  d.N = n;
  d.H = d.W = side;
  d.C = c;
  d.num_classes = 5;
  d.images = test::random_bytes(n * side * side * c, 23);
  for (int64_t i = 0; i < n; ++i) d.labels.push_back(i % 5);
  d.class_names.resize(5);
  d.mean = {0.25f, 0.5f, 0.75f};
  d.std = {0.5f, 0.25f, 0.125f};
  return d;
}

LoaderOptions augmenting_options(int64_t batch, int workers) {
  LoaderOptions o = LoaderOptions::training(batch, 3);
  o.workers = workers;
  o.reprob = 0.5;
  o.mixup = MixupOptions{};  // Mixup 0.8 / CutMix 1.0, switch 0.5
  return o;
}

// The f32 loader's images are exactly the u8 loader's batch finished on the CPU, with the same
// labels and targets, in training (erasing, mixing) and in evaluation.
void expect_outputs_agree(DataLoader& f32, DataLoader& u8, int64_t epochs, bool expect_mixing) {
  int cut = 0, mixed = 0, erased = 0;
  for (int64_t e = 0; e < epochs; ++e) {
    f32.start_epoch(e);
    u8.start_epoch(e);
    Batch a, b;
    while (f32.next(a)) {
      ASSERT_TRUE(u8.next(b));
      ASSERT_TRUE(a.images.defined());
      ASSERT_FALSE(a.bytes);
      ASSERT_FALSE(b.images.defined());
      ASSERT_TRUE(b.bytes);
      EXPECT_EQ(b.bytes->B, a.images.dim(0));
      EXPECT_EQ(a.images.to_vector<float>(), batch_images(b, Device::cpu()).to_vector<float>())
          << "epoch " << e << " batch " << a.index;
      // Into an existing tensor (the captured training step's buffer): the same images, there.
      const Tensor into = Tensor::empty(batch_image_shape(b), DType::f32);
      EXPECT_EQ(batch_images(b, Device::cpu(), into).raw_data(), into.raw_data());
      EXPECT_EQ(into.to_vector<float>(), a.images.to_vector<float>());
      const Tensor into_f32 = Tensor::empty(batch_image_shape(a), DType::f32);
      EXPECT_EQ(batch_images(a, Device::cpu(), into_f32).raw_data(), into_f32.raw_data());
      EXPECT_EQ(into_f32.to_vector<float>(), a.images.to_vector<float>());
      const Tensor wrong = Tensor::empty({1, 2, 3, 4}, DType::f32);
      test::expect_error([&] { batch_images(b, Device::cpu(), wrong); }, {"finish_batch", "[1, 2, 3, 4]"});
      test::expect_error([&] { batch_images(a, Device::cpu(), wrong); }, {"batch_images", "[1, 2, 3, 4]"});
      EXPECT_EQ(a.labels.to_vector<int64_t>(), b.labels.to_vector<int64_t>());
      EXPECT_EQ(a.targets.defined(), b.targets.defined());
      if (a.targets.defined()) {
        EXPECT_EQ(a.targets.to_vector<float>(), b.targets.to_vector<float>());
      }
      cut += b.bytes->mix.mode == MixMode::cutmix;
      mixed += b.bytes->mix.mode == MixMode::mixup;
      if (const EraseParams* er = b.bytes->erase())
        for (int64_t i = 0; i < b.bytes->B; ++i) erased += er[i].height > 0;
    }
    EXPECT_FALSE(u8.next(b));
  }
  if (expect_mixing) {
    EXPECT_GT(cut, 0);
    EXPECT_GT(mixed, 0);
    EXPECT_GT(erased, 0);
  }
}

TEST(LoaderU8Output, FloatBatchesAreTheU8BatchesFinishedOnTheCpu) {
  const Dataset d = small_dataset(48, 28, 1);  // padded to 32, cropped and flipped
  LoaderOptions o = augmenting_options(8, 2);
  DataLoader f32(d, o);
  o.output = LoaderOutput::u8;
  o.workers = 0;  // and a different worker count
  DataLoader u8(d, o);
  EXPECT_FALSE(u8.pinned());
  expect_outputs_agree(f32, u8, 4, /*expect_mixing=*/true);
  // Evaluation (no augmentation, a last partial batch).
  LoaderOptions ev = LoaderOptions::evaluation(10);
  ev.workers = 1;
  DataLoader ef(d, ev);
  ev.output = LoaderOutput::u8;
  DataLoader eu(d, ev);
  expect_outputs_agree(ef, eu, 1, false);
}

TEST(LoaderU8Output, FolderBatchesAgreeToo) {
  const fs::path root = fs::temp_directory_path() / ("cnx_test_batch_finish_" + std::to_string(::getpid()));
  fs::remove_all(root);
  SyntheticFolderOptions so;
  so.train_per_class = 6;
  so.val_per_class = 1;
  so.height = 40;
  so.width = 52;
  write_stripes_folder(root.string(), so);
  const ImageFolder train = scan_image_folder(root.string(), "train");
  LoaderOptions o = augmenting_options(4, 1);
  o.folder.input_size = 24;
  DataLoader f32(train, o);
  o.output = LoaderOutput::u8;
  o.pinned = true;  // no CUDA device here: ordinary memory (on a GPU machine: pinned)
  DataLoader u8(train, o);
  EXPECT_EQ(u8.pinned(), cuda_device_count() > 0);
  expect_outputs_agree(f32, u8, 3, false);
  fs::remove_all(root);
}

// The blocks are reused: a whole epoch needs no more than depth + 3 of them.
TEST(LoaderU8Output, BufferBlocksAreReused) {
  const Dataset d = small_dataset(64, 16, 3);
  LoaderOptions o = augmenting_options(4, 2);
  o.output = LoaderOutput::u8;
  o.prefetch = 2;
  DataLoader loader(d, o);
  for (int64_t e = 0; e < 2; ++e) {
    loader.start_epoch(e);
    Batch b;
    while (loader.next(b)) {
    }
  }
  const HostBufferPoolStats st = loader.buffer_stats();
  EXPECT_EQ(st.acquires, 32);
  EXPECT_LE(st.blocks, 2 + 3);
  EXPECT_EQ(st.reuses, st.acquires - st.blocks);
}

// ---- the host buffer pool, with a fake backend ------------------------------------------------

// Events are ints the test completes by hand; "copies" are memcpy into host memory.
struct FakeBackend {
  std::set<int*> live_events;
  std::map<void*, int> allocated;  // block -> size
  int64_t frees = 0, waits = 0;

  HostBufferPool::Backend make() {
    HostBufferPool::Backend b;
    b.pinned = true;
    b.alloc = [this](int64_t n) {
      void* p = ::operator new(static_cast<size_t>(n));
      allocated[p] = static_cast<int>(n);
      return p;
    };
    b.free = [this](void* p) {
      allocated.erase(p);
      ++frees;
      ::operator delete(p);
    };
    b.copy_to_device = [](void* dst, Device, const void* src, int64_t n) { std::memcpy(dst, src, static_cast<size_t>(n)); };
    b.record = [this](void*& ev, Device) {
      if (!ev) {
        ev = new int(0);
        live_events.insert(static_cast<int*>(ev));
      }
      *static_cast<int*>(ev) = 0;  // recorded: not done
    };
    b.done = [](void* ev) { return *static_cast<int*>(ev) == 1; };
    b.wait = [this](void* ev) {
      ++waits;
      *static_cast<int*>(ev) = 1;
    };
    b.destroy = [this](void* ev) {
      live_events.erase(static_cast<int*>(ev));
      delete static_cast<int*>(ev);
    };
    return b;
  }
  void complete_all() {
    for (int* e : live_events) *e = 1;
  }
};

TEST(HostBufferPool, ReusesBlocksOnlyAfterTheirCopyCompleted) {
  FakeBackend fake;
  {
    auto pool = HostBufferPool::create(100, fake.make(), /*max_blocks=*/2);
    std::vector<uint8_t> device(100);
    void* first = nullptr;
    {
      HostBuffer a = pool->acquire();
      first = a.data();
      std::memset(a.data(), 7, 100);
      a.copy_to_device(device.data(), Device::cuda(0), 100);  // records the event: pending
      EXPECT_EQ(device[99], 7);
    }
    EXPECT_EQ(pool->stats().pending_now, 1);
    // The copy has not completed: a new block, not the pending one.
    HostBuffer b = pool->acquire();
    EXPECT_NE(b.data(), first);
    EXPECT_EQ(pool->stats().blocks, 2);
    // Completed: the first block is free again and reused.
    fake.complete_all();
    HostBuffer c = pool->acquire();
    EXPECT_EQ(c.data(), first);
    EXPECT_EQ(pool->stats().pending_now, 0);
    // At max_blocks with a copy pending: acquire waits for it rather than allocate.
    c.record_use(Device::cuda(0));
    c = HostBuffer();  // released while pending
    HostBuffer d = pool->acquire();
    EXPECT_EQ(d.data(), first);
    EXPECT_EQ(fake.waits, 1);
    const HostBufferPoolStats st = pool->stats();
    EXPECT_EQ(st.blocks, 2);
    EXPECT_EQ(st.acquires, 4);
    EXPECT_EQ(st.reuses, 2);
    EXPECT_EQ(st.waits, 1);
    // Nothing pending and nothing free: past max_blocks it still allocates (never deadlocks).
    HostBuffer e = pool->acquire();
    EXPECT_EQ(pool->stats().blocks, 3);
    // A pending block when the pool goes: the destructor waits for it before freeing.
    e.record_use(Device::cuda(0));
    e = HostBuffer();
    b = HostBuffer();
    d = HostBuffer();
    pool.reset();
    EXPECT_EQ(fake.waits, 2);
  }
  EXPECT_TRUE(fake.allocated.empty());
  EXPECT_EQ(fake.frees, 3);
  EXPECT_TRUE(fake.live_events.empty());
}

TEST(HostBufferPool, PageableBlocksAndMovedHandles) {
  auto pool = HostBufferPool::create(1000, /*pinned=*/false, 1);
  EXPECT_FALSE(pool->pinned());
  HostBuffer a = pool->acquire();
  EXPECT_EQ(reinterpret_cast<uintptr_t>(a.data()) % 64, 0u);
  EXPECT_EQ(a.nbytes(), 1000);
  HostBuffer b = std::move(a);
  EXPECT_FALSE(a.defined());
  EXPECT_TRUE(b.defined());
  void* p = b.data();
  b = HostBuffer();
  EXPECT_EQ(pool->acquire().data(), p);  // back in the pool, reused
  test::expect_error([] { HostBufferPool::create(0, false, 1); }, {"HostBufferPool", "at least one byte"});
#if !CNX_TEST_CUDA
  test::expect_error([] { HostBufferPool::create(10, true, 1); }, {"pinned memory needs the CUDA backend"});
#endif
}

// ---- CUDA -------------------------------------------------------------------------------------

#if CNX_TEST_CUDA
// The CUDA finish of `in` (copied to the device at byte offset in_off, the output written at
// float offset out_off: misaligned pointers take the scalar path).
std::vector<float> cuda_finish(const std::vector<uint8_t>& in, const std::vector<EraseParams>& erase,
                               const MixParams& mix, const Normalization& norm, const Sizes& s,
                               int64_t in_off = 0, int64_t out_off = 0) {
  const Device dev = Device::cuda(0);
  Tensor din = Tensor::empty({static_cast<int64_t>(in.size()) + in_off}, DType::u8, dev);
  Tensor derase = Tensor::empty({std::max<int64_t>(1, static_cast<int64_t>(erase.size() * sizeof(EraseParams)))}, DType::u8, dev);
  Tensor dout = Tensor::empty({s.numel() + out_off}, DType::f32, dev);
  cuda::DeviceGuard guard(dev);
  const cudaStream_t stream = cuda::device_stream(dev);
  CNX_CUDA_CHECK(cudaMemcpyAsync(din.data<uint8_t>() + in_off, in.data(), in.size(), cudaMemcpyHostToDevice, stream));
  if (!erase.empty())
    CNX_CUDA_CHECK(cudaMemcpyAsync(derase.raw_data(), erase.data(), erase.size() * sizeof(EraseParams),
                                   cudaMemcpyHostToDevice, stream));
  cuda::batch_finish(dout.data<float>() + out_off, din.data<uint8_t>() + in_off,
                     erase.empty() ? nullptr : static_cast<const EraseParams*>(derase.raw_data()), mix, norm,
                     s.B, s.H, s.W, s.C, stream);
  const auto all = dout.to_vector<float>();
  return std::vector<float>(all.begin() + out_off, all.end());
}

std::vector<double> as_doubles(const std::vector<float>& v) { return {v.begin(), v.end()}; }
#endif

TEST(CudaBatchFinish, MatchesCpuOnRandomBatches) {
#if CNX_TEST_CUDA
  CNX_SKIP_WITHOUT_DEVICE();
  const Normalization norm = make_norm(0.485f, 0.456f, 0.406f, 0.229f, 0.224f, 0.225f);
  const Sizes shapes[] = {{8, 32, 32, 3}, {6, 17, 13, 3}, {5, 9, 11, 1}, {4, 12, 10, 2},
                          {1, 1, 1, 3},   {2, 224, 224, 3}, {3, 7, 4, 1}};
  uint64_t seed = 1;
  for (const Sizes& s : shapes) {
    const auto in = test::random_bytes(s.numel(), seed++);
    for (int mode = 0; mode < 3; ++mode) {
      // Erasing drawn as the loader does (probability 1), the mix drawn and forced to `mode`.
      RandomErasingOptions eo;
      eo.probability = 1.0;
      std::vector<EraseParams> erase(static_cast<size_t>(s.B));
      for (int64_t i = 0; i < s.B; ++i) {
        Generator g(seed * 100 + static_cast<uint64_t>(i));
        if (s.H > 2 && s.W > 2) erase[static_cast<size_t>(i)] = draw_random_erasing(s.H, s.W, g, eo);
      }
      MixupOptions mo;
      mo.mixup_alpha = mode == 1 ? 0.8 : 0.0;
      mo.cutmix_alpha = mode == 2 ? 1.0 : 0.0;
      Generator gm(seed);
      const MixParams mix = mode == 0 ? MixParams{} : mix_params(draw_mixup_cutmix(s.H, s.W, gm, mo));
      const auto want = cpu_finish(in, erase, mix, norm, s);
      const std::string what = "B" + std::to_string(s.B) + " " + std::to_string(s.H) + "x" +
                               std::to_string(s.W) + "x" + std::to_string(s.C) + " mode " + std::to_string(mode);
      // Erase noise: double log/cos/sin may differ in the last bit between the C library and
      // CUDA, which float rounding almost always hides; 1e-5 covers a rare one-ulp flip.
      test::expect_close(what, as_doubles(cuda_finish(in, erase, mix, norm, s)), as_doubles(want), 1e-5, 1e-5);
      test::expect_close(what + " misaligned", as_doubles(cuda_finish(in, erase, mix, norm, s, 1, 1)),
                         as_doubles(want), 1e-5, 1e-5);
      test::expect_close(what + " no erase", as_doubles(cuda_finish(in, {}, mix, norm, s, 3, 2)),
                         as_doubles(cpu_finish(in, {}, mix, norm, s)), 1e-5, 1e-5);
    }
  }
#else
  CNX_SKIP_BUILT_WITHOUT_CUDA();
#endif
}

TEST(CudaBatchFinish, PinnedPoolCopiesAndReuses) {
#if CNX_TEST_CUDA
  CNX_SKIP_WITHOUT_DEVICE();
  const Device dev = Device::cuda(0);
  auto pool = HostBufferPool::create(4097, /*pinned=*/true, 2);
  EXPECT_TRUE(pool->pinned());
  std::set<void*> seen;
  for (int round = 0; round < 20; ++round) {
    HostBuffer buf = pool->acquire();
    seen.insert(buf.data());
    cudaPointerAttributes attr{};
    CNX_CUDA_CHECK(cudaPointerGetAttributes(&attr, buf.data()));
    EXPECT_EQ(attr.type, cudaMemoryTypeHost);  // page-locked, known to CUDA
    auto* p = buf.as<uint8_t>();
    for (int k = 0; k < 4097; ++k) p[k] = static_cast<uint8_t>(k * 7 + round);
    Tensor d = Tensor::empty({4097}, DType::u8, dev);
    buf.copy_to_device(d.raw_data(), dev, 4097);
    buf = HostBuffer();  // released while the copy may be in flight
    const auto back = d.to_vector<uint8_t>();  // waits for the stream
    for (int k = 0; k < 4097; k += 409) ASSERT_EQ(back[static_cast<size_t>(k)], static_cast<uint8_t>(k * 7 + round));
  }
  const HostBufferPoolStats st = pool->stats();
  EXPECT_LE(st.blocks, 2);
  EXPECT_EQ(static_cast<int64_t>(seen.size()), st.blocks);
  EXPECT_EQ(st.reuses, 20 - st.blocks);
#else
  CNX_SKIP_BUILT_WITHOUT_CUDA();
#endif
}

TEST(CudaBatchFinish, LoaderU8BatchesFinishedOnTheDeviceMatchTheHost) {
#if CNX_TEST_CUDA
  CNX_SKIP_WITHOUT_DEVICE();
  const Dataset d = small_dataset(40, 28, 1);
  LoaderOptions o = augmenting_options(8, 2);
  DataLoader f32(d, o);
  DataLoader u8(d, o.for_device(Device::cuda(0)));
  EXPECT_TRUE(u8.pinned());
  for (int64_t e = 0; e < 3; ++e) {
    f32.start_epoch(e);
    u8.start_epoch(e);
    Batch a, b;
    while (f32.next(a)) {
      ASSERT_TRUE(u8.next(b));
      // Every other batch into an existing device tensor (the captured step's input buffer).
      const Tensor into = Tensor::empty(batch_image_shape(b), DType::f32, Device::cuda(0));
      const bool use_into = a.index % 2 == 1;
      const Tensor x = use_into ? batch_images(b, Device::cuda(0), into) : batch_images(b, Device::cuda(0));
      EXPECT_EQ(x.device(), Device::cuda(0));
      if (use_into) EXPECT_EQ(x.raw_data(), into.raw_data());
      test::expect_close("epoch " + std::to_string(e) + " batch " + std::to_string(a.index),
                         as_doubles(x.to_vector<float>()), as_doubles(a.images.to_vector<float>()), 1e-5, 1e-5);
    }
  }
  EXPECT_LE(u8.buffer_stats().blocks, u8.prefetch() + 3);
#else
  CNX_SKIP_BUILT_WITHOUT_CUDA();
#endif
}

}  // namespace
}  // namespace cnx
