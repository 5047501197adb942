// DataLoader: ordered, prefetching, deterministic batches (see train/data/loader.h).
#include "train/data/loader.h"

#include <algorithm>
#include <cmath>
#include <condition_variable>
#include <exception>
#include <map>
#include <mutex>
#include <numeric>
#include <optional>
#include <string>
#include <thread>

#include "tensor/cuda_context.h"
#include "tensor/error.h"
#include "tensor/generator.h"
#include "tensor/upload.h"

namespace cnx {

namespace {

// ---- randomness: everything a batch draws is a pure function of (seed, epoch, position) -------

uint64_t splitmix64(uint64_t x) {
  x += 0x9E3779B97F4A7C15ull;
  x = (x ^ (x >> 30)) * 0xBF58476D1CE4E5B9ull;
  x = (x ^ (x >> 27)) * 0x94D049BB133111EBull;
  return x ^ (x >> 31);
}

// Separate streams, so the permutation and the augmentation of an epoch are unrelated.
constexpr uint64_t kPermutationStream = 1, kAugmentStream = 2, kSampleStream = 3, kMixStream = 4;

uint64_t mix_key(uint64_t seed, uint64_t stream, int64_t epoch) {
  return splitmix64(splitmix64(splitmix64(seed) ^ stream) ^ static_cast<uint64_t>(epoch));
}

// Uniform in [0, n), n >= 1, without modulo bias (rejection of the top 2^64 mod n values).
uint64_t uniform_below(Generator& gen, uint64_t n) {
  const uint64_t threshold = (0 - n) % n;  // 2^64 mod n
  for (;;) {
    const uint64_t hi = gen.next_u32();  // two statements: the draw order is fixed
    const uint64_t lo = gen.next_u32();
    const uint64_t r = (hi << 32) | lo;
    if (r >= threshold) return r % n;
  }
}

// ---- pixels: padding, crop and flip (in uint8; the normalisation is the batch finish's) --------

// The Normalization of a dataset's mean and std, checked (std > 0, 1 to 3 channels).
Normalization checked_normalization(int64_t C, const std::array<float, 3>& mean,
                                    const std::array<float, 3>& std, const std::string& who) {
  CNX_CHECK(C >= 1 && C <= 3, who, ": images have ", C, " channels; 1 to 3 are supported");
  Normalization n;
  for (int64_t ch = 0; ch < C; ++ch) {
    CNX_CHECK(std[ch] > 0, who, ": std of channel ", ch, " is ", std[ch], "; it must be > 0");
    n.mean[ch] = mean[ch];
    n.std[ch] = std[ch];
  }
  return n;
}

// In-memory datasets: an HxW image placed in its SxS frame, cropped and flipped.
struct PixelPlacer {
  int64_t H = 0, W = 0, C = 0;
  int64_t out_h = 0, out_w = 0;  // S
  int64_t pad_y = 0, pad_x = 0;  // where the HxW image sits inside SxS
  Normalization norm;

  PixelPlacer(int64_t h, int64_t w, int64_t c, const std::array<float, 3>& mean,
              const std::array<float, 3>& std, const std::string& who)
      : H(h), W(w), C(c) {
    CNX_CHECK(H > 0 && W > 0, who, ": images of ", H, "x", W, " have no pixels");
    norm = checked_normalization(C, mean, std, who);
    out_h = loader_image_side(H);
    out_w = loader_image_side(W);
    pad_y = (out_h - H) / 2;
    pad_x = (out_w - W) / 2;
  }

  // dst (out_h, out_w, C) from src (H, W, C): out(y, x) = padded(y + dy - 4, x' + dx - 4) with
  // x' = out_w - 1 - x when flipped (the crop, then the flip), padded = src placed at
  // (pad_y, pad_x) in zeros (byte value 0 of every channel).
  void write(uint8_t* dst, const uint8_t* src, const CropFlip& cf) const {
    for (int64_t y = 0; y < out_h; ++y) {
      const int64_t sy = y + cf.dy - kCropPadding - pad_y;
      const bool row_in = sy >= 0 && sy < H;
      for (int64_t x = 0; x < out_w; ++x) {
        const int64_t xs = cf.flip ? out_w - 1 - x : x;
        const int64_t sx = xs + cf.dx - kCropPadding - pad_x;
        uint8_t* d = dst + (y * out_w + x) * C;
        if (row_in && sx >= 0 && sx < W) {
          const uint8_t* p = src + (sy * W + sx) * C;
          for (int64_t c = 0; c < C; ++c) d[c] = p[c];
        } else {
          for (int64_t c = 0; c < C; ++c) d[c] = 0;
        }
      }
    }
  }
};

struct Slot {
  Batch batch;
  std::exception_ptr error;
};

constexpr int64_t kEraseAlignment = 64;  // where the erase params start in a ByteBatch block
// The most pixel bytes one batch may take: 16 GiB, 85 times an ImageNet batch of 1024 images
// of 224x224x3. Larger is a mistake (a batch size or an image size from a corrupt file), and
// the pool holds several such blocks.
constexpr int64_t kMaxBatchBytes = int64_t{1} << 34;

}  // namespace

int64_t loader_image_side(int64_t side) { return side == 28 ? 32 : side; }

std::vector<int64_t> epoch_permutation(int64_t n, uint64_t seed, int64_t epoch) {
  CNX_CHECK(n >= 0 && epoch >= 0, "epoch_permutation: need n >= 0 and epoch >= 0, got n=", n,
            " epoch=", epoch);
  std::vector<int64_t> p(static_cast<size_t>(n));
  std::iota(p.begin(), p.end(), int64_t{0});
  Generator gen(mix_key(seed, kPermutationStream, epoch));
  for (int64_t i = n - 1; i > 0; --i) {  // Fisher-Yates
    const int64_t j = static_cast<int64_t>(uniform_below(gen, static_cast<uint64_t>(i + 1)));
    std::swap(p[i], p[j]);
  }
  return p;
}

Generator sample_generator(uint64_t seed, int64_t epoch, int64_t position) {
  return Generator(splitmix64(mix_key(seed, kSampleStream, epoch) ^ static_cast<uint64_t>(position)));
}

CropFlip crop_flip(uint64_t seed, int64_t epoch, int64_t position) {
  const uint64_t key = mix_key(seed, kAugmentStream, epoch);
  Generator gen(key);
  gen.set_state(key, static_cast<uint64_t>(position) * 4);  // Philox block `position`
  const uint32_t r0 = gen.next_u32();
  const uint32_t r1 = gen.next_u32();
  const uint32_t r2 = gen.next_u32();
  constexpr uint32_t kOffsets = 2 * kCropPadding + 1;
  CropFlip cf;
  cf.dy = static_cast<int>(r0 % kOffsets);
  cf.dx = static_cast<int>(r1 % kOffsets);
  cf.flip = r2 >= 0x80000000u;
  return cf;
}

Tensor normalize_image(std::span<const uint8_t> hwc, int64_t H, int64_t W, int64_t C,
                       const std::array<float, 3>& mean, const std::array<float, 3>& std) {
  const PixelPlacer place(H, W, C, mean, std, "normalize_image");
  int64_t bytes = 0;  // checked: the sizes may come from a file's header
  CNX_CHECK(checked_product({H, W, C}, bytes) && static_cast<int64_t>(hwc.size()) == bytes,
            "normalize_image: ", hwc.size(), " bytes given for an image of ", H, "x", W, "x", C);
  std::vector<uint8_t> framed(static_cast<size_t>(place.out_h * place.out_w * C));
  place.write(framed.data(), hwc.data(), CropFlip{});
  Tensor out = Tensor::empty({1, place.out_h, place.out_w, C});
  cpu::batch_finish(out.data<float>(), framed.data(), nullptr, MixParams{}, place.norm, 1,
                    place.out_h, place.out_w, C);
  return out;
}

// ---- the batch finish, where the model runs -----------------------------------------------------

namespace {
// `into` if given (checked to be an f32 `shape` tensor on `device`), else a new one.
Tensor output_images(const Tensor& into, const Shape& shape, Device device, const char* op) {
  if (!into.defined()) return Tensor::empty(shape, DType::f32, device);
  CNX_CHECK(into.shape() == shape && into.dtype() == DType::f32 && into.device() == device, op,
            ": the output ", into.str(), " is not the batch's f32 ", shape.str(), " on ", device.str());
  return into;
}
}  // namespace

Shape batch_image_shape(const Batch& b) {
  if (b.images.defined()) return b.images.shape();
  CNX_CHECK(b.bytes, "batch_image_shape: the batch has neither images nor bytes");
  return Shape{b.bytes->B, b.bytes->H, b.bytes->W, b.bytes->C};
}

Tensor finish_batch(ByteBatch& bb, Device device, const Tensor& into) {
  CNX_CHECK(bb.buffer.defined(), "finish_batch: the batch holds no buffer");
  Tensor out = output_images(into, Shape{bb.B, bb.H, bb.W, bb.C}, device, "finish_batch");
  if (device.is_cpu()) {
    cpu::batch_finish(out.data<float>(), bb.pixels(), bb.erase(), bb.mix, bb.norm, bb.B, bb.H, bb.W, bb.C);
    return out;
  }
#if defined(CNX_CUDA) && CNX_CUDA
  // One copy of the pixels and the erase params into a staging slot, on the device's copy
  // stream (tensor/upload.h): it overlaps the kernels of the step before; the finish kernel on
  // the compute stream waits for it.
  const int64_t used = bb.used_bytes();
  StagedUpload staged = upload_async(bb.buffer, used, device);
  cuda::DeviceGuard guard(device);
  const uint8_t* dev = staged.data<uint8_t>();
  const EraseParams* erase = bb.erasing ? reinterpret_cast<const EraseParams*>(dev + bb.erase_offset) : nullptr;
  cuda::batch_finish(out.data<float>(), dev, erase, bb.mix, bb.norm, bb.B, bb.H, bb.W, bb.C,
                     cuda::device_stream(device));
  staged.release();  // the slot is reused once the finish kernel has run
  return out;
#else
  fail("finish_batch: ", device.str(), " is a CUDA device but this build has no CUDA backend");
#endif
}

Tensor batch_images(const Batch& b, Device device, const Tensor& into) {
  if (b.images.defined()) {
    if (!into.defined()) return b.images.to(device);
    Tensor out = output_images(into, b.images.shape(), device, "batch_images");
    out.copy_from(b.images);
    return out;
  }
  CNX_CHECK(b.bytes, "batch_images: the batch has neither images nor bytes");
  return finish_batch(*b.bytes, device, into);
}

// ---- the ImageFolder per-image transform -------------------------------------------------------

FolderImageTransform::FolderImageTransform(const FolderTransform& t) : t_(t) {
  (void)checked_normalization(3, t.mean, t.std, "FolderTransform");
  // The evaluation resize's size, checked once here rather than as every image fails: a tiny
  // crop_pct resizes every image to tens of thousands of pixels a side.
  CNX_CHECK(t.input_size > 0 && t.input_size <= kMaxEvalResizeSide, "FolderTransform: input_size ",
            t.input_size, " is not in [1, ", kMaxEvalResizeSide, "]");
  if (t.crop_pct > 0 || t.input_size < 384)
    (void)eval_resize_size(t.input_size, t.crop_pct > 0 ? t.crop_pct : default_crop_pct(t.input_size));
  if (!t.auto_augment.empty() && t.auto_augment != "none") {
    rand_augment_ = parse_rand_augment(t.auto_augment);
    for (int c = 0; c < 3; ++c)  // geometric ops fill with the mean colour (timm's img_mean)
      rand_augment_->fill[c] = static_cast<uint8_t>(std::min(255.0, std::nearbyint(255.0 * t.mean[c])));
  }
}

Normalization FolderImageTransform::normalization() const {
  return checked_normalization(3, t_.mean, t_.std, "FolderTransform");
}

void FolderImageTransform::operator()(const DecodedImage& img, bool train, Generator& gen,
                                      uint8_t* dst) const {
  const int64_t S = t_.input_size;
  std::vector<uint8_t> x;
  if (train) {
    const CropBox box = random_resized_crop_box(img.H, img.W, gen, t_.crop);
    x = resize_bicubic(img.rgb, img.H, img.W, 3, box, S, S);
    random_hflip(x, S, S, 3, gen, t_.hflip);
    if (rand_augment_) rand_augment(x, S, S, 3, *rand_augment_, gen);
    else color_jitter(x, S, S, 3, t_.color_jitter, gen);
  } else {
    x = eval_transform(img.rgb, img.H, img.W, 3, S, t_.crop_pct);
  }
  std::copy(x.begin(), x.end(), dst);  // (S, S, 3)
}

// ---- the loader ------------------------------------------------------------------------------

struct DataLoader::Impl {
  // Exactly one of ds and folder is set.
  const Dataset* ds = nullptr;
  const ImageFolder* folder = nullptr;
  LoaderOptions opt;
  std::string who;                 // "DataLoader: dataset 'name'" for messages
  int64_t N = 0, num_classes = 0;  // samples, classes
  int64_t out_h = 0, out_w = 0, C = 0;  // the batch's image shape
  std::optional<PixelPlacer> place;  // in-memory datasets
  std::optional<FolderImageTransform> folder_transform;  // ImageFolder
  Normalization norm;              // of either kind
  std::shared_ptr<HostBufferPool> pool;  // the blocks of the uint8 batches
  int64_t erase_offset = 0;        // where a block's erase params start
  int nworkers = 0, depth = 0;
  int64_t shard = 0;      // this rank's samples an epoch (N when world_size is 1)
  int64_t per_epoch = 0;  // this rank's batches an epoch
  mutable DecodeStats decode_stats;  // this epoch's decode attempts (ImageFolder)

  // The epoch being delivered. Written by the consumer only while no worker runs (workers are
  // joined before and started after), read by the workers.
  bool started = false;
  int64_t epoch = -1;
  std::vector<int64_t> order;  // dataset index of each shard entry in the epoch
  int64_t end = 0;             // one past the last batch index
  std::exception_ptr failed;   // a batch failed: every next() rethrows it (consumer only)

  // Shared with the workers, under mu.
  std::mutex mu;
  std::condition_variable work_cv;   // workers: room to claim, or stop
  std::condition_variable ready_cv;  // consumer: a batch arrived
  bool stop = false;
  int64_t next_claim = 0, next_deliver = 0;
  std::map<int64_t, Slot> ready;  // built batches (or their errors) by index
  std::vector<std::thread> threads;

  bool augmenting() const { return opt.train && opt.augment; }

  // The global position (in the padded epoch order, or the dataset's in evaluation) of shard
  // entry j: rank + world_size * j. All per-sample draws are keyed by it.
  int64_t global_position(int64_t j) const { return opt.rank + int64_t{opt.world_size} * j; }

  int64_t label_of(int64_t i) const {
    const int64_t label = ds ? ds->labels[static_cast<size_t>(i)] : folder->samples[static_cast<size_t>(i)].second;
    if (label < 0 || label >= num_classes)
      fail(who, ": sample ", i, " has label ", label, " outside [0, ", num_classes, ")");
    return label;
  }

  // ImageFolder: decodes sample i and writes its transformed uint8 image to dst
  // (out_h, out_w, 3). False when the file does not decode (warned and counted); throws when
  // this epoch's failures pass max_bad_fraction of the split.
  bool folder_sample(uint8_t* dst, int64_t i, Generator& gen) const {
    const std::string& path = folder->samples[static_cast<size_t>(i)].first;
    DecodedImage img;
    std::string error;
    bool ok = decode_jpeg(path, img, error);
    if (ok) {
      // The evaluation transform refuses an image so elongated that resizing it would pass the
      // pixel limit (a 1 x 5000 image with a short side of 256): a bad file like the others.
      try {
        (*folder_transform)(img, augmenting(), gen, dst);
      } catch (const Error& e) {
        ok = false;
        error = e.what();
      }
    }
    decode_stats.record(ok);
    if (!ok) {
      warn_skipped(path, error);
      // This epoch's failures vs the samples this loader visits (the split when unsharded).
      decode_stats.check(opt.folder.max_bad_fraction, shard);
    }
    return ok;
  }

  // Batch `index` of the epoch: the uint8 batch (pixels, erase and mix parameters, labels,
  // targets), then, with output f32, its CPU finish.
  Batch build(int64_t index) const {
    const int64_t lo = index * opt.batch_size;  // shard entries [lo, hi)
    const int64_t hi = std::min(lo + opt.batch_size, shard);
    const int64_t image = out_h * out_w * C;
    auto bytes = std::make_shared<ByteBatch>();
    ByteBatch& bb = *bytes;
    bb.buffer = pool->acquire();
    bb.H = out_h;
    bb.W = out_w;
    bb.C = C;
    bb.norm = norm;
    bb.erase_offset = erase_offset;
    bb.erasing = augmenting() && opt.reprob > 0;
    uint8_t* pixels = bb.buffer.as<uint8_t>();
    EraseParams* erase = reinterpret_cast<EraseParams*>(pixels + erase_offset);
    std::vector<int64_t> labels;
    labels.reserve(static_cast<size_t>(hi - lo));
    int64_t B = 0;  // samples written so far
    for (int64_t j = lo; j < hi; ++j) {
      int64_t i = order[static_cast<size_t>(j)];
      const int64_t pos = global_position(j);
      uint8_t* dst = pixels + B * image;
      Generator gen = sample_generator(opt.seed, epoch, pos);
      if (ds) {
        const CropFlip cf = augmenting() ? crop_flip(opt.seed, epoch, pos) : CropFlip{};
        place->write(dst, ds->images.data() + i * ds->H * ds->W * ds->C, cf);
      } else {
        bool ok = folder_sample(dst, i, gen);
        // Training: the next sample in dataset order that decodes takes its place (it may lie
        // outside this rank's shard), with the draws of this position.
        for (int64_t tries = 1; !ok && opt.train && tries < N; ++tries) {
          i = (i + 1) % N;
          gen = sample_generator(opt.seed, epoch, pos);
          ok = folder_sample(dst, i, gen);
        }
        if (!ok) continue;  // evaluation: left out
      }
      labels.push_back(label_of(i));
      if (bb.erasing) {
        RandomErasingOptions eo = opt.erasing;
        eo.probability = opt.reprob;
        erase[B] = draw_random_erasing(out_h, out_w, gen, eo);
      }
      ++B;
    }
    bb.B = B;  // fewer than hi - lo in evaluation with files left out
    Batch b;
    b.epoch = epoch;
    b.index = index;
    b.labels = Tensor::from_data<int64_t>({B}, labels);
    if (augmenting() && opt.mixing()) {
      MixupOptions mo = opt.mixup;
      mo.num_classes = num_classes;
      // Keyed by (batch index, rank): index * W + rank, the batch index itself when W = 1.
      const int64_t mix_index = index * opt.world_size + opt.rank;
      Generator gen(splitmix64(mix_key(opt.seed, kMixStream, epoch) ^ static_cast<uint64_t>(mix_index)));
      const MixupDraw d = draw_mixup_cutmix(out_h, out_w, gen, mo);
      bb.mix = mix_params(d);
      b.targets = Tensor::from_data<float>({B, num_classes}, mixup_targets(labels, d.lam, mo));
    }
    if (opt.output == LoaderOutput::f32) {
      b.images = finish_batch(bb, Device::cpu());  // the block goes back to the pool at return
    } else {
      b.bytes = std::move(bytes);
    }
    return b;
  }

  void worker() {
    for (;;) {
      int64_t index = 0;
      {
        std::unique_lock<std::mutex> lk(mu);
        work_cv.wait(lk, [&] {
          return stop || next_claim >= end || next_claim < next_deliver + depth;
        });
        if (stop || next_claim >= end) return;
        index = next_claim++;
      }
      Slot slot;
      try {
        slot.batch = build(index);
      } catch (...) {
        slot.error = std::current_exception();
      }
      {
        std::lock_guard<std::mutex> lk(mu);
        if (stop) return;
        ready.emplace(index, std::move(slot));
      }
      ready_cv.notify_one();
    }
  }

  void stop_workers() {
    {
      std::lock_guard<std::mutex> lk(mu);
      stop = true;
    }
    work_cv.notify_all();
    for (std::thread& t : threads) t.join();
    threads.clear();
    std::lock_guard<std::mutex> lk(mu);
    stop = false;
    ready.clear();
  }

  // Checks shared by both kinds of dataset and the worker/prefetch/epoch sizes.
  void finish_setup() {
    CNX_CHECK(opt.batch_size > 0, "DataLoader: batch size must be > 0, got ", opt.batch_size);
    CNX_CHECK(opt.world_size >= 1, "DataLoader: world_size must be >= 1, got ", opt.world_size);
    CNX_CHECK(opt.rank >= 0 && opt.rank < opt.world_size, "DataLoader: rank ", opt.rank,
              " is outside [0, world_size) = [0, ", opt.world_size, ")");
    CNX_CHECK(opt.workers >= -1, "DataLoader: workers must be >= 0 (or -1: default), got ", opt.workers);
    CNX_CHECK(opt.prefetch == -1 || opt.prefetch >= 1,
              "DataLoader: prefetch must be >= 1 (or -1: 2 x workers), got ", opt.prefetch);
    CNX_CHECK(opt.reprob >= 0 && opt.reprob <= 1, "DataLoader: --reprob must be in [0, 1], got ", opt.reprob);
    if (opt.train && opt.augment && opt.mixing())
      CNX_CHECK(opt.batch_size % 2 == 0 && opt.drop_last, "DataLoader: Mixup/CutMix mixes each batch with its "
                "reverse and needs an even batch size with drop_last, got ", opt.batch_size);
    if (opt.workers == -1) {
      const unsigned hw = std::thread::hardware_concurrency();
      nworkers = static_cast<int>(std::clamp(hw, 1u, 4u));
    } else {
      nworkers = opt.workers;
    }
    depth = opt.prefetch == -1 ? std::max(1, 2 * nworkers) : opt.prefetch;
    // The shard (loader.h, "Order:"): training pads the order to ceil(N / W) * W positions, so
    // every rank has ceil(N / W); evaluation takes the positions r, r + W, ... < N.
    const int64_t W = opt.world_size, r = opt.rank;
    shard = opt.train ? (N + W - 1) / W : (N - r + W - 1) / W;
    per_epoch = opt.drop_last ? shard / opt.batch_size : (shard + opt.batch_size - 1) / opt.batch_size;
    // An empty evaluation shard (N < W) has no batch; that is not an error without drop_last.
    CNX_CHECK(per_epoch > 0 || !opt.drop_last, who, ": batch size ", opt.batch_size,
              " is larger than its ", shard, " samples",
              W > 1 ? " (the shard of rank " + std::to_string(r) + " of " + std::to_string(W) +
                          "; " + std::to_string(N) + " in all)"
                    : std::string(),
              " and drop_last is on: an epoch would have no batch");
    // The pool of uint8 batch blocks: [pixels (batch, S, S, C) | erase params (batch)]. At most
    // `depth` batches are claimed but not delivered, the consumer holds one, and one or two may
    // still be copying to the device: depth + 3 blocks suffice in the steady state.
    // Checked: the batch size comes from the command line, the image sizes from files.
    int64_t pixel_bytes = 0;
    CNX_CHECK(checked_product({opt.batch_size, out_h, out_w, C}, pixel_bytes) &&
                  pixel_bytes <= kMaxBatchBytes,
              who, ": a batch of ", opt.batch_size, " images of ", out_h, "x", out_w, "x", C,
              " would take more than the limit of ", kMaxBatchBytes, " bytes");
    erase_offset = (pixel_bytes + kEraseAlignment - 1) / kEraseAlignment * kEraseAlignment;
    const int64_t block = erase_offset + opt.batch_size * static_cast<int64_t>(sizeof(EraseParams));
    const bool pinned = opt.output == LoaderOutput::u8 && opt.pinned && cuda_device_count() > 0;
    pool = HostBufferPool::create(block, pinned, depth + 3);
  }
};

DataLoader::DataLoader(const Dataset& ds, LoaderOptions opt) {
  const std::string who = "DataLoader: dataset '" + ds.name + "'";
  CNX_CHECK(ds.N > 0, who, " has no samples");
  CNX_CHECK(ds.num_classes > 0, who, " has ", ds.num_classes, " classes");
  CNX_CHECK(ds.H > 0 && ds.W > 0 && ds.C > 0, who, ": bad image shape ", ds.H, "x", ds.W, "x", ds.C);
  int64_t bytes = 0;  // checked: the sizes may come from a file's header
  CNX_CHECK(checked_product({ds.N, ds.H, ds.W, ds.C}, bytes), who, ": ", ds.N, " images of ", ds.H,
            "x", ds.W, "x", ds.C, " take more bytes than int64 can count");
  CNX_CHECK(static_cast<int64_t>(ds.images.size()) == bytes, who, " holds ", ds.images.size(),
            " pixel bytes for ", ds.N, " images of ", ds.H, "x", ds.W, "x", ds.C, " (", bytes, ")");
  CNX_CHECK(static_cast<int64_t>(ds.labels.size()) == ds.N, who, " holds ", ds.labels.size(),
            " labels for ", ds.N, " images");
  impl_ = std::make_unique<Impl>();
  Impl& m = *impl_;
  m.ds = &ds;
  m.opt = opt;
  m.who = who;
  m.N = ds.N;
  m.num_classes = ds.num_classes;
  m.place.emplace(ds.H, ds.W, ds.C, ds.mean, ds.std, who);
  m.norm = m.place->norm;
  m.out_h = m.place->out_h;
  m.out_w = m.place->out_w;
  m.C = ds.C;
  m.finish_setup();
}

DataLoader::DataLoader(const ImageFolder& folder, LoaderOptions opt) {
  const std::string who = "DataLoader: image folder '" + folder.root + "/" + folder.split + "'";
  CNX_CHECK(!folder.samples.empty(), who, " has no samples");
  CNX_CHECK(!folder.classes.empty(), who, " has no classes");
  const FolderTransform& t = opt.folder;
  CNX_CHECK(t.input_size >= 8, "--input_size must be >= 8, got ", t.input_size);
  CNX_CHECK(t.max_bad_fraction >= 0 && t.max_bad_fraction <= 1,
            "DataLoader: max_bad_fraction must be in [0, 1], got ", t.max_bad_fraction);
  CNX_CHECK(t.hflip >= 0 && t.hflip <= 1, "DataLoader: hflip must be in [0, 1], got ", t.hflip);
  CNX_CHECK(t.color_jitter >= 0, "--color_jitter must be >= 0, got ", t.color_jitter);
  CNX_CHECK(t.crop_pct <= 1, "--crop_pct must be in (0, 1] (or <= 0: the default), got ", t.crop_pct);
  impl_ = std::make_unique<Impl>();
  Impl& m = *impl_;
  m.folder = &folder;
  m.opt = opt;
  m.who = who;
  m.N = static_cast<int64_t>(folder.samples.size());
  m.num_classes = static_cast<int64_t>(folder.classes.size());
  m.out_h = m.out_w = t.input_size;
  m.C = 3;
  m.folder_transform.emplace(t);
  m.norm = m.folder_transform->normalization();
  m.finish_setup();
}

DataLoader::~DataLoader() {
  if (impl_) impl_->stop_workers();
}

int64_t DataLoader::batches_per_epoch() const { return impl_->per_epoch; }
int64_t DataLoader::image_height() const { return impl_->out_h; }
int64_t DataLoader::image_width() const { return impl_->out_w; }
int64_t DataLoader::num_classes() const { return impl_->num_classes; }
int64_t DataLoader::decode_failures() const { return impl_->decode_stats.failed(); }
int DataLoader::workers() const { return impl_->nworkers; }
int DataLoader::prefetch() const { return impl_->depth; }
const LoaderOptions& DataLoader::options() const { return impl_->opt; }
HostBufferPoolStats DataLoader::buffer_stats() const { return impl_->pool->stats(); }
bool DataLoader::pinned() const { return impl_->pool->pinned(); }

void DataLoader::start_epoch(int64_t epoch, int64_t first_batch) {
  Impl& m = *impl_;
  CNX_CHECK(epoch >= 0, "DataLoader::start_epoch: epoch must be >= 0, got ", epoch);
  CNX_CHECK(first_batch >= 0 && first_batch <= m.per_epoch, "DataLoader::start_epoch: batch ",
            first_batch, " is outside the epoch's [0, ", m.per_epoch, "]");
  m.stop_workers();
  m.started = true;
  m.failed = nullptr;
  m.epoch = epoch;
  m.decode_stats.reset();
  // The shard's dataset indices (loader.h, "Order:"): entry j is global position
  // p = rank + W*j; training: the epoch's permutation padded cyclically (p mod N, which is
  // DistributedSampler's indices += indices[:padding], repeated when the padding exceeds N);
  // evaluation: the dataset position p itself. With W = 1, the permutation / 0..N-1.
  if (m.opt.train) {
    std::vector<int64_t> perm = epoch_permutation(m.N, m.opt.seed, epoch);
    if (m.opt.world_size == 1) {
      m.order = std::move(perm);
    } else {
      m.order.resize(static_cast<size_t>(m.shard));
      for (int64_t j = 0; j < m.shard; ++j)
        m.order[static_cast<size_t>(j)] = perm[static_cast<size_t>(m.global_position(j) % m.N)];
    }
  } else if (static_cast<int64_t>(m.order.size()) != m.shard) {  // built once: it never changes
    m.order.resize(static_cast<size_t>(m.shard));
    for (int64_t j = 0; j < m.shard; ++j) m.order[static_cast<size_t>(j)] = m.global_position(j);
  }
  m.end = m.per_epoch;
  m.next_claim = m.next_deliver = first_batch;
  const int64_t n = std::min<int64_t>(m.nworkers, m.end - first_batch);
  for (int64_t t = 0; t < n; ++t) m.threads.emplace_back([&m] { m.worker(); });
}

bool DataLoader::next(Batch& out) {
  Impl& m = *impl_;
  CNX_CHECK(m.started, "DataLoader::next: call start_epoch first");
  if (m.failed) std::rethrow_exception(m.failed);
  if (m.next_deliver >= m.end) return false;
  if (m.nworkers == 0) {  // build on this thread
    try {
      out = m.build(m.next_deliver);
    } catch (...) {
      m.failed = std::current_exception();
      throw;
    }
    ++m.next_deliver;
    return true;
  }
  Slot slot;
  {
    std::unique_lock<std::mutex> lk(m.mu);
    m.ready_cv.wait(lk, [&] { return m.ready.count(m.next_deliver) > 0; });
    auto node = m.ready.extract(m.next_deliver);
    slot = std::move(node.mapped());
    ++m.next_deliver;
  }
  m.work_cv.notify_all();
  if (slot.error) {
    m.failed = slot.error;
    m.stop_workers();
    std::rethrow_exception(m.failed);
  }
  out = std::move(slot.batch);
  return true;
}

}  // namespace cnx
