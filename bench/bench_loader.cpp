// Google Benchmark: the ImageFolder data pipeline on JPEGs of ImageNet size (500x375, the
// typical ImageNet photo; written once into a temporary folder by write_stripes_folder: stripes
// plus noise, quality 90, ~100 KB per file), in images per second:
//
//   BM_decode              decode_jpeg only, one thread
//   BM_train_transform     decode + RandomResizedCrop 224 + flip + RandAugment rand-m9-mstd0.5-inc1
//                          + normalise + Random Erasing 0.25, one thread: the per-core cost of
//                          the paper's training recipe (Mixup/CutMix, per batch, is in the next)
//   BM_train_transform_u8  the same without the host finish (normalise + erase): what a worker
//                          does per image when the GPU finishes the batch (LoaderOutput::u8)
//   BM_eval_transform      decode + resize 256 + centre crop 224 + normalise, one thread
//   BM_stage_*             the train transform's stages alone, on images decoded beforehand:
//                          crop_resize_flip, rand_augment (on the 224x224 crop), normalise_erase
//   BM_loader/workers:N    the DataLoader end to end (batch 16, Mixup/CutMix on), N worker threads
//   BM_loader_u8/workers:N the same with output u8: uint8 batches, no host finish (normalise,
//                          erase, mix happen on the GPU); buffers pageable here (no GPU)
//
//   ./build/bench/bench_loader --benchmark_counters_tabular=true
// The per-core training figure tells how many cores keep a GPU fed: cores = GPU images/s
// divided by BM_train_transform's images/s (see bench/RESULTS.md).
#include <benchmark/benchmark.h>

#include <unistd.h>

#include <filesystem>
#include <string>

#include "kernels/batch_finish.h"
#include "tensor/generator.h"
#include "train/data/augment.h"
#include "train/data/image_folder.h"
#include "train/data/loader.h"
#include "train/data/rand_augment.h"
#include "train/data/synthetic_folder.h"

namespace {

using namespace cnx;
namespace fs = std::filesystem;

// 2 classes x 48 files of 500x375, written on first use and removed at exit.
const ImageFolder& folder() {
  struct Holder {
    std::string root;
    ImageFolder f;
    Holder() {
      root = (fs::temp_directory_path() / ("cnx_bench_loader_" + std::to_string(::getpid()))).string();
      SyntheticFolderOptions o;
      o.train_per_class = 48;
      o.val_per_class = 1;
      o.height = 375;
      o.width = 500;
      write_stripes_folder(root, o);
      f = scan_image_folder(root, "train");
    }
    ~Holder() { fs::remove_all(root); }
  };
  static Holder h;
  return h.f;
}

const std::string& sample_path(int64_t i) {
  const ImageFolder& f = folder();
  return f.samples[static_cast<size_t>(i) % f.samples.size()].first;
}

void BM_decode(benchmark::State& state) {
  folder();  // write the files before timing
  DecodedImage img;
  std::string err;
  int64_t i = 0, bytes = 0;
  for (auto _ : state) {
    if (!decode_jpeg(sample_path(i++), img, err)) state.SkipWithError(err.c_str());
    bytes += static_cast<int64_t>(fs::file_size(sample_path(i - 1)));
  }
  state.SetItemsProcessed(state.iterations());
  state.counters["KB/file"] = static_cast<double>(bytes) / 1024.0 / static_cast<double>(state.iterations());
}
BENCHMARK(BM_decode)->Unit(benchmark::kMillisecond);

// Decode + the loader's per-image transform (FolderImageTransform) at 224, and for training
// the Random Erasing 0.25 draw after it, as the loader does; with `finish`, the host finish of the
// image too (normalise, erase: cpu::batch_finish of a batch of one, the LoaderOutput::f32 path).
// One image per iteration.
void run_transform(benchmark::State& state, bool train, bool finish = true) {
  folder();  // write the files before timing
  const FolderImageTransform transform{FolderTransform{}};
  const Normalization norm = transform.normalization();
  const RandomErasingOptions re;  // probability 0.25
  DecodedImage img;
  std::string err;
  std::vector<uint8_t> pixels(224 * 224 * 3);
  std::vector<float> out(224 * 224 * 3);
  int64_t i = 0;
  for (auto _ : state) {
    Generator gen(static_cast<uint64_t>(i));
    if (!decode_jpeg(sample_path(i++), img, err)) state.SkipWithError(err.c_str());
    transform(img, train, gen, pixels.data());
    const EraseParams erase = train ? draw_random_erasing(224, 224, gen, re) : EraseParams{};
    if (finish) cpu::batch_finish(out.data(), pixels.data(), &erase, MixParams{}, norm, 1, 224, 224, 3);
    benchmark::DoNotOptimize(pixels.data());
    benchmark::DoNotOptimize(out.data());
  }
  state.SetItemsProcessed(state.iterations());
}

void BM_train_transform(benchmark::State& state) { run_transform(state, /*train=*/true); }
BENCHMARK(BM_train_transform)->Unit(benchmark::kMillisecond);

void BM_train_transform_u8(benchmark::State& state) { run_transform(state, /*train=*/true, /*finish=*/false); }
BENCHMARK(BM_train_transform_u8)->Unit(benchmark::kMillisecond);

void BM_eval_transform(benchmark::State& state) { run_transform(state, /*train=*/false); }
BENCHMARK(BM_eval_transform)->Unit(benchmark::kMillisecond);

// The images decoded once, for the per-stage rows.
const std::vector<DecodedImage>& decoded() {
  static const std::vector<DecodedImage> images = [] {
    std::vector<DecodedImage> v(folder().samples.size());
    std::string err;
    for (size_t i = 0; i < v.size(); ++i) decode_jpeg(folder().samples[i].first, v[i], err);
    return v;
  }();
  return images;
}

// 224x224 crops of the decoded images, for the rows after the crop.
std::vector<uint8_t> crop_of(int64_t i) {
  const DecodedImage& img = decoded()[static_cast<size_t>(i) % decoded().size()];
  Generator gen(static_cast<uint64_t>(i));
  const CropBox box = random_resized_crop_box(img.H, img.W, gen);
  return resize_bicubic(img.rgb, img.H, img.W, 3, box, 224, 224);
}

void BM_stage_crop_resize_flip(benchmark::State& state) {
  decoded();
  int64_t i = 0;
  for (auto _ : state) {
    const DecodedImage& img = decoded()[static_cast<size_t>(i) % decoded().size()];
    Generator gen(static_cast<uint64_t>(i++));
    const CropBox box = random_resized_crop_box(img.H, img.W, gen);
    std::vector<uint8_t> x = resize_bicubic(img.rgb, img.H, img.W, 3, box, 224, 224);
    random_hflip(x, 224, 224, 3, gen);
    benchmark::DoNotOptimize(x.data());
  }
  state.SetItemsProcessed(state.iterations());
}
BENCHMARK(BM_stage_crop_resize_flip)->Unit(benchmark::kMillisecond);

void BM_stage_rand_augment(benchmark::State& state) {
  const RandAugmentOptions ra = parse_rand_augment("rand-m9-mstd0.5-inc1");
  std::vector<std::vector<uint8_t>> crops;
  for (int64_t i = 0; i < 32; ++i) crops.push_back(crop_of(i));
  int64_t i = 0;
  for (auto _ : state) {
    std::vector<uint8_t> x = crops[static_cast<size_t>(i) % crops.size()];
    Generator gen(static_cast<uint64_t>(i++));
    rand_augment(x, 224, 224, 3, ra, gen);
    benchmark::DoNotOptimize(x.data());
  }
  state.SetItemsProcessed(state.iterations());
}
BENCHMARK(BM_stage_rand_augment)->Unit(benchmark::kMillisecond);

void BM_stage_normalise_erase(benchmark::State& state) {
  const Normalization norm = FolderImageTransform{FolderTransform{}}.normalization();
  const std::vector<uint8_t> x = crop_of(0);
  std::vector<float> out(x.size());
  RandomErasingOptions re;
  int64_t i = 0;
  for (auto _ : state) {
    Generator gen(static_cast<uint64_t>(i++));
    const EraseParams erase = draw_random_erasing(224, 224, gen, re);
    cpu::batch_finish(out.data(), x.data(), &erase, MixParams{}, norm, 1, 224, 224, 3);
    benchmark::DoNotOptimize(out.data());
  }
  state.SetItemsProcessed(state.iterations());
}
BENCHMARK(BM_stage_normalise_erase)->Unit(benchmark::kMillisecond);

// Whole epochs of the loader (96 images = 6 batches of 16 per epoch): images/s. `output`: f32
// (finished by the workers) or u8 (left for the GPU: the batch is only built, never finished).
void run_loader(benchmark::State& state, LoaderOutput output) {
  folder();  // write the files before timing
  LoaderOptions o = LoaderOptions::training(16, 0);
  o.workers = static_cast<int>(state.range(0));
  o.reprob = 0.25;
  o.mixup = MixupOptions{};
  o.output = output;
  DataLoader loader(folder(), o);
  int64_t epoch = 0, images = 0;
  for (auto _ : state) {
    loader.start_epoch(epoch++);
    Batch b;
    while (loader.next(b)) images += b.labels.numel();
  }
  state.SetItemsProcessed(images);
}

void BM_loader(benchmark::State& state) { run_loader(state, LoaderOutput::f32); }
BENCHMARK(BM_loader)->ArgName("workers")->Arg(1)->Arg(2)->UseRealTime()->Unit(benchmark::kMillisecond);

void BM_loader_u8(benchmark::State& state) { run_loader(state, LoaderOutput::u8); }
BENCHMARK(BM_loader_u8)->ArgName("workers")->Arg(1)->Arg(2)->UseRealTime()->Unit(benchmark::kMillisecond);

}  // namespace
