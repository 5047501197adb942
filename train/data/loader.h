// DataLoader: turns a dataset into batches ready for the model, built ahead by worker threads
// and delivered strictly in order. Two kinds of dataset:
//
//  - an in-memory uint8 NHWC Dataset (Fashion-MNIST, CIFAR; train/data/dataset.h): the small-
//    image pipeline below;
//  - an ImageFolder (train/data/image_folder.h): JPEGs decoded by the workers, then the paper's
//    recipe (FolderTransform below).
//
//   Batch: images (B, S, S, C) f32 NHWC, normalised x -> (x / 255 - mean[c]) / std[c] (computed
//          in double, rounded once to float); labels (B) i64; with Mixup/CutMix on, also
//          targets (B, K) f32, the soft targets (smoothing folded in) that the loss must use.
//   Two stages: the workers build a uint8 batch (ByteBatch: the pixels after crop / flip /
//          RandAugment, and the drawn parameters of Random Erasing and Mixup/CutMix), and the
//          batch finish (kernels/batch_finish.h) turns it into the float images. With
//          output f32 (the default) the workers also finish on the host and Batch::images is
//          set; with output u8 Batch::bytes is set instead and the consumer finishes it where
//          the model runs (batch_images below: on a CUDA device, one copy of 1 byte a value
//          into device memory and the CUDA finish). The two give the same values (the erasing
//          noise up to the last bit of double log/cos/sin on each side).
//          In-memory datasets: S = 32 for 28x28 images (zero padding of 2 pixels each side:
//          pixel value 0, before normalisation), else S = H (and W for the width).
//          ImageFolder: S = input_size, C = 3.
//   Order: training shuffles every epoch with a Fisher-Yates permutation drawn from a Philox
//          Generator whose key is mixed (splitmix64) from (seed, epoch) alone (not from the
//          world size); evaluation keeps the dataset's order. The "global position" p of a
//          sample is its index in that order.
//          Data parallel (world_size W ranks, each with its own loader; PyTorch's
//          DistributedSampler): rank r takes the positions p = r, r + W, r + 2W, ... (strided),
//          its shard; shard entry j is global position p = r + W*j.
//           - training: the order is padded to T = ceil(N / W) * W positions by repeating its
//             own start (position p >= N holds the sample of position p - N; p mod N in
//             general, which is DistributedSampler's repetition also when N < W): every shard
//             has T / W samples, and batches_per_epoch() is the same on every rank.
//           - evaluation: no padding; rank r takes the dataset positions r, r + W, ... < N, so
//             across the ranks every sample is seen exactly once; shards differ in size by at
//             most one (empty when r >= N), and so may batches_per_epoch() (0 for an empty
//             shard with drop_last off).
//          Batch i of an epoch holds the shard entries [i*B, (i+1)*B) (with W = 1: the order's
//          positions [i*B, (i+1)*B)); drop_last drops a last, partial batch of the shard.
//          Every per-sample draw below is keyed by the global position p, never by the shard
//          index j: the sample at position p gets the same pixels whatever W, so with batch
//          size B / W the union of the ranks' batch i is the W = 1 batch i of size B (for
//          B divisible by W), in another order (Mixup/CutMix aside, which is per batch).
//   Augmentation, in-memory datasets (training only, `augment`): the image (already padded to
//          S) is zero-padded by kCropPadding = 4 on every side and an SxS window is cut at offset
//          (dy, dx) in [0, 8]^2, then flipped left-right with probability 1/2 (RandomCrop(S,
//          padding=4) then RandomHorizontalFlip, as torchvision). The three draws of a sample
//          come from one Philox block whose key is mixed from (seed, epoch) (a stream apart from
//          the permutation's) and whose counter is the sample's position in the epoch:
//          crop_flip().
//   Augmentation, ImageFolder (training only, `augment`), per sample, as timm's
//          create_transform(is_training=True) builds it for the official main.py:
//          RandomResizedCrop to input_size (bicubic) -> horizontal flip (p = hflip) ->
//          RandAugment (auto_augment) or, when that is "none", colour jitter -> normalise.
//          Evaluation: eval_transform (resize the short side to input_size / crop_pct, centre
//          crop). The draws of a sample come from a Generator keyed by (seed, epoch, position):
//          sample_generator().
//   Both kinds, training only, `augment`: Random Erasing (reprob > 0) on each normalised image
//          (after the steps above, same per-sample generator: for in-memory datasets one keyed
//          like sample_generator; draw_random_erasing, its noise keyed by a word pair drawn from
//          that generator), then Mixup/CutMix (mixup.mixup_alpha or cutmix_alpha > 0) on
//          the whole batch from a Generator keyed by (seed, epoch, batch index * W + rank)
//          (draw_mixup_cutmix, mixup_targets): with W = 1 the batch index, with W > 1 each
//          rank's batch i draws its own.
// So a batch depends only on (dataset, options, seed, epoch, batch index, rank, world size): not
// on the number of workers, the order in which they finish, or whether the epoch was resumed
// with start_epoch(epoch, first_batch).
//
// Files that do not decode (ImageFolder): each is skipped with a warning on stderr and counted.
// In training the sample is replaced by the next sample of the dataset that decodes (so batches
// keep their size and stay deterministic), searched in dataset order from the failed one,
// wrapping around, with the draws of the failed sample's global position; the replacement may
// lie outside the rank's shard (and be another rank's sample too): it depends only on the
// dataset and on which files decode, not on W or the rank. In evaluation the sample is left out
// of its batch. When the failures of an epoch exceed max_bad_fraction of the samples this loader
// visits in an epoch (its shard: the whole split when W = 1), the batch that crosses the line
// fails with a one-line error (rethrown by next()).
//
//   DataLoader loader(train_set, LoaderOptions::training(128, seed));
//   for (int64_t epoch = start; epoch < epochs; ++epoch) {
//     loader.start_epoch(epoch, epoch == start ? resume_batch : 0);
//     Batch b;
//     while (loader.next(b)) step(b.images, b.labels);
//   }
//
// Memory: the uint8 batches live in blocks of a HostBufferPool (tensor/pinned_memory.h), reused
// batch after batch; page-locked when `pinned` (and a CUDA device exists), so that the copy to
// the GPU is an asynchronous DMA; a block goes back to the pool when its ByteBatch is destroyed,
// and is refilled only once its copy has completed.
//
// Threads: one consumer thread calls start_epoch and next (a DataLoader is not shared between
// consumers); `workers` std::threads claim batch indices in order and build them; at most
// `prefetch` batches are claimed but not yet delivered. An exception while building batch i
// (e.g. a label outside [0, num_classes)) is rethrown by the next() that would have returned
// batch i, and by every next() after it until start_epoch. The destructor and start_epoch stop
// and join the workers, also mid-epoch.
#pragma once

#include <array>
#include <cstdint>
#include <memory>
#include <optional>
#include <span>
#include <vector>

#include "kernels/batch_finish.h"
#include "tensor/pinned_memory.h"
#include "tensor/tensor.h"
#include "train/data/augment.h"
#include "train/data/dataset.h"
#include "train/data/image_folder.h"
#include "train/data/rand_augment.h"

namespace cnx {

constexpr int kCropPadding = 4;

// The ImageFolder pipeline's settings (main.py's flags and defaults).
struct FolderTransform {
  int64_t input_size = 224;                          // --input_size
  double crop_pct = -1;                              // --crop_pct; <= 0: the official default
  RandomResizedCropOptions crop;                     // scale (0.08, 1), ratio (3/4, 4/3)
  double hflip = 0.5;
  std::string auto_augment = "rand-m9-mstd0.5-inc1";  // --aa; "none" or "": colour jitter
  double color_jitter = 0.4;                         // --color_jitter, when --aa is none
  std::array<float, 3> mean{0.485f, 0.456f, 0.406f};  // ImageNet's (timm's defaults)
  std::array<float, 3> std{0.229f, 0.224f, 0.225f};
  double max_bad_fraction = 0.01;  // of a split's files that may fail to decode in an epoch
};

// The ImageFolder per-image transform of a FolderTransform (what the loader's workers run on
// each decoded file; bench_loader times it): a decoded RGB image to a uint8 (S, S, 3) image,
// S = input_size, not yet normalised. train: RandomResizedCrop, flip, then RandAugment (or
// colour jitter when auto_augment is "none"), drawing from `gen`; otherwise the evaluation
// transform (no draws). Normalisation, Random Erasing and Mixup/CutMix come after it, in the
// batch finish.
class FolderImageTransform {
 public:
  // Throws cnx::Error on a bad auto_augment string or a std <= 0.
  explicit FolderImageTransform(const FolderTransform& t);
  void operator()(const DecodedImage& img, bool train, Generator& gen, uint8_t* dst) const;
  // The normalisation of the transform's output (mean, std).
  Normalization normalization() const;

 private:
  FolderTransform t_;
  std::optional<RandAugmentOptions> rand_augment_;
};

// What the loader hands out: float images finished by its workers, or the uint8 batch for the
// consumer to finish (on the GPU).
enum class LoaderOutput { f32, u8 };

struct LoaderOptions {
  int64_t batch_size = 128;
  bool train = true;      // shuffle every epoch (and allow augmentation)
  bool augment = true;    // random crop + flip; only when train (off for parity tests)
  bool drop_last = true;  // drop a last, partial batch
  uint64_t seed = 0;
  int workers = -1;   // -1: min(4, hardware_concurrency); 0: build on the calling thread
  int prefetch = -1;  // batches claimed ahead of the consumer; -1: 2 x workers
  FolderTransform folder;  // ImageFolder datasets only
  double reprob = 0.0;     // Random Erasing probability (training with augment)
  RandomErasingOptions erasing;  // its other settings; probability is reprob
  // Mixup/CutMix (training with augment) when either alpha > 0; num_classes is set by the
  // loader from the dataset. Needs an even batch size.
  MixupOptions mixup{.mixup_alpha = 0.0, .cutmix_alpha = 0.0};
  LoaderOutput output = LoaderOutput::f32;  // u8: Batch::bytes instead of Batch::images
  bool pinned = false;  // output u8: page-locked buffers (ignored without a CUDA device)
  // Data parallel: this loader delivers rank `rank`'s shard of `world_size` (see "Order:"
  // above); 0 <= rank < world_size. world_size 1: the whole dataset, as without sharding.
  int rank = 0;
  int world_size = 1;

  static LoaderOptions training(int64_t batch_size, uint64_t seed) {
    LoaderOptions o;
    o.batch_size = batch_size;
    o.seed = seed;
    return o;
  }
  static LoaderOptions evaluation(int64_t batch_size) {
    LoaderOptions o;
    o.batch_size = batch_size;
    o.train = o.augment = o.drop_last = false;
    return o;
  }
  bool mixing() const { return mixup.mixup_alpha > 0 || mixup.cutmix_alpha > 0; }
  // These options for a consumer on `device`: on a CUDA device uint8 batches in pinned memory,
  // finished on the device (batch_images); on the CPU float batches finished by the workers.
  LoaderOptions for_device(Device device) const {
    LoaderOptions o = *this;
    o.output = device.is_cuda() ? LoaderOutput::u8 : LoaderOutput::f32;
    o.pinned = device.is_cuda();
    return o;
  }
  // These options for rank `of_rank` of `ranks` data-parallel ranks (its shard: "Order:").
  LoaderOptions for_rank(int of_rank, int ranks) const {
    LoaderOptions o = *this;
    o.rank = of_rank;
    o.world_size = ranks;
    return o;
  }
};

// A batch before its finish (kernels/batch_finish.h): one block of the loader's pool holding the
// pixels (B, H, W, C) u8 at offset 0 and, when erasing is on, the B EraseParams at
// erase_offset (64-byte aligned), so that a single copy takes both to the device; the
// batch-wide MixParams and the Normalization travel by value.
struct ByteBatch {
  HostBuffer buffer;
  int64_t B = 0, H = 0, W = 0, C = 0;
  int64_t erase_offset = 0;  // bytes
  bool erasing = false;      // erase params present (some may have height 0: not erased)
  MixParams mix;
  Normalization norm;

  const uint8_t* pixels() const { return buffer.as<const uint8_t>(); }
  const EraseParams* erase() const {
    return erasing ? reinterpret_cast<const EraseParams*>(buffer.as<const uint8_t>() + erase_offset) : nullptr;
  }
  // The bytes a copy must move: the pixels, and the erase params when present.
  int64_t used_bytes() const {
    return erasing ? erase_offset + B * static_cast<int64_t>(sizeof(EraseParams)) : B * H * W * C;
  }
};

struct Batch {
  Tensor images;   // (B, S, S, C) f32 (output f32); undefined with output u8
  std::shared_ptr<ByteBatch> bytes;  // output u8: the batch to finish (batch_images)
  Tensor labels;   // (B) i64
  Tensor targets;  // (B, K) f32 soft targets when Mixup/CutMix is on; else undefined
  int64_t epoch = -1;
  int64_t index = -1;  // the batch's index in its epoch
};

// The output side for an HxW image: 32 for 28 (Fashion-MNIST), else the side itself.
int64_t loader_image_side(int64_t side);

// The order of epoch `epoch` when training: a permutation of [0, n) that depends only on
// (n, seed, epoch).
std::vector<int64_t> epoch_permutation(int64_t n, uint64_t seed, int64_t epoch);

// The augmentation of the sample at `position` in epoch `epoch`: crop offset (dy, dx), each in
// [0, 2 * kCropPadding], and flip. dy = r0 % 9, dx = r1 % 9, flip = r2 >= 2^31 where r0..r2 are
// the first three words of Philox block `position` under the epoch's augmentation key.
struct CropFlip {
  int dy = kCropPadding, dx = kCropPadding;  // the centre: no shift
  bool flip = false;
};
CropFlip crop_flip(uint64_t seed, int64_t epoch, int64_t position);

// The generator of the per-sample augmentation draws (ImageFolder pipeline, Random Erasing)
// of the sample at `position` in epoch `epoch`: its own key, mixed from (seed, epoch, position).
// `position` (here and in crop_flip) is the global position in the (padded) epoch order, the
// same whatever the world size.
Generator sample_generator(uint64_t seed, int64_t epoch, int64_t position);

// The float images of a ByteBatch on `device`: on the CPU the CPU finish; on a CUDA device an
// asynchronous copy of the block (pixels and erase params) to device memory on the device's
// stream, then the CUDA finish on that stream (the block returns to its pool only after the
// copy has completed). `into` (optional): an existing f32 (B, H, W, C) tensor on `device` to
// write the images into and return, instead of a new one (the captured training step's input
// buffer, train/trainer.cpp); cnx::Error if its shape, dtype or device differ.
Tensor finish_batch(ByteBatch& bytes, Device device, const Tensor& into = Tensor());
// The images of a loader's batch on `device`, whatever its output: images.to(device) for f32
// (copied into `into` when given), finish_batch(*bytes, device, into) for u8.
Tensor batch_images(const Batch& b, Device device, const Tensor& into = Tensor());
// The shape of batch_images(b, ...): (B, H, W, C).
Shape batch_image_shape(const Batch& b);

// One uint8 HxWxC image (C <= 3) normalised into a (1, S, S, C) f32 tensor exactly as the
// evaluation loader does (for `convnext predict`).
Tensor normalize_image(std::span<const uint8_t> hwc, int64_t H, int64_t W, int64_t C,
                       const std::array<float, 3>& mean, const std::array<float, 3>& std);

class DataLoader {
 public:
  // `dataset` must outlive the loader. Throws cnx::Error on an inconsistent dataset (sizes) or
  // bad options.
  DataLoader(const Dataset& dataset, LoaderOptions options);
  // `folder` (from scan_image_folder) must outlive the loader.
  DataLoader(const ImageFolder& folder, LoaderOptions options);
  ~DataLoader();
  DataLoader(const DataLoader&) = delete;
  DataLoader& operator=(const DataLoader&) = delete;

  // This rank's batches an epoch: the same on every rank in training; in evaluation it may
  // differ by one between ranks (and be 0 for an empty shard).
  int64_t batches_per_epoch() const;
  int64_t image_height() const;  // S
  int64_t image_width() const;
  int workers() const;   // resolved (-1 -> the default)
  int prefetch() const;
  const LoaderOptions& options() const;
  int64_t num_classes() const;
  // Files that failed to decode in the current epoch so far (ImageFolder; 0 otherwise).
  int64_t decode_failures() const;
  // The pool of the uint8 batch blocks: whether page-locked, and its counters.
  bool pinned() const;
  HostBufferPoolStats buffer_stats() const;

  // Starts (or restarts) epoch `epoch` at batch `first_batch` (resuming mid-epoch), dropping
  // whatever was being prefetched.
  void start_epoch(int64_t epoch, int64_t first_batch = 0);
  // The next batch of the epoch; false once the epoch is over.
  bool next(Batch& out);

 private:
  struct Impl;
  std::unique_ptr<Impl> impl_;
};

}  // namespace cnx
