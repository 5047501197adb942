// DataLoader: ordered, prefetching, deterministic batches (see train/data/loader.h).
#include "train/data/loader.h"

#include <algorithm>
#include <condition_variable>
#include <exception>
#include <map>
#include <mutex>
#include <numeric>
#include <thread>

#include "tensor/error.h"
#include "tensor/generator.h"

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
constexpr uint64_t kPermutationStream = 1, kAugmentStream = 2;

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

// ---- pixels: normalisation, padding, crop and flip --------------------------------------------

struct Normalizer {
  int64_t H = 0, W = 0, C = 0;
  int64_t out_h = 0, out_w = 0;  // S
  int64_t pad_y = 0, pad_x = 0;  // where the HxW image sits inside SxS
  std::vector<float> lut;        // (C, 256): the normalised value of each byte value

  Normalizer(int64_t h, int64_t w, int64_t c, const std::array<float, 3>& mean,
             const std::array<float, 3>& std, const std::string& who)
      : H(h), W(w), C(c) {
    CNX_CHECK(H > 0 && W > 0, who, ": images of ", H, "x", W, " have no pixels");
    CNX_CHECK(C >= 1 && C <= 3, who, ": images have ", C, " channels; 1 to 3 are supported");
    out_h = loader_image_side(H);
    out_w = loader_image_side(W);
    pad_y = (out_h - H) / 2;
    pad_x = (out_w - W) / 2;
    lut.resize(static_cast<size_t>(C * 256));
    for (int64_t ch = 0; ch < C; ++ch) {
      CNX_CHECK(std[ch] > 0, who, ": std of channel ", ch, " is ", std[ch], "; it must be > 0");
      for (int v = 0; v < 256; ++v)
        lut[ch * 256 + v] = static_cast<float>((v / 255.0 - static_cast<double>(mean[ch])) /
                                               static_cast<double>(std[ch]));
    }
  }

  // dst (out_h, out_w, C) from src (H, W, C): out(y, x) = padded(y + dy - 4, x' + dx - 4) with
  // x' = out_w - 1 - x when flipped (the crop, then the flip), padded = src placed at
  // (pad_y, pad_x) in zeros.
  void write(float* dst, const uint8_t* src, const CropFlip& cf) const {
    const float* zero = lut.data();  // byte value 0 of each channel: lut[c * 256]
    for (int64_t y = 0; y < out_h; ++y) {
      const int64_t sy = y + cf.dy - kCropPadding - pad_y;
      const bool row_in = sy >= 0 && sy < H;
      for (int64_t x = 0; x < out_w; ++x) {
        const int64_t xs = cf.flip ? out_w - 1 - x : x;
        const int64_t sx = xs + cf.dx - kCropPadding - pad_x;
        float* d = dst + (y * out_w + x) * C;
        if (row_in && sx >= 0 && sx < W) {
          const uint8_t* s = src + (sy * W + sx) * C;
          for (int64_t c = 0; c < C; ++c) d[c] = lut[c * 256 + s[c]];
        } else {
          for (int64_t c = 0; c < C; ++c) d[c] = zero[c * 256];
        }
      }
    }
  }
};

struct Slot {
  Batch batch;
  std::exception_ptr error;
};

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
  const Normalizer norm(H, W, C, mean, std, "normalize_image");
  CNX_CHECK(static_cast<int64_t>(hwc.size()) == H * W * C, "normalize_image: ", hwc.size(),
            " bytes given for an image of ", H, "x", W, "x", C, " (", H * W * C, " bytes)");
  Tensor out = Tensor::empty({1, norm.out_h, norm.out_w, C});
  norm.write(out.data<float>(), hwc.data(), CropFlip{});
  return out;
}

// ---- the loader ------------------------------------------------------------------------------

struct DataLoader::Impl {
  const Dataset& ds;
  LoaderOptions opt;
  Normalizer norm;
  int nworkers = 0, depth = 0;
  int64_t per_epoch = 0;

  // The epoch being delivered. Written by the consumer only while no worker runs (workers are
  // joined before and started after), read by the workers.
  bool started = false;
  int64_t epoch = -1;
  std::vector<int64_t> order;  // dataset index of each position in the epoch
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

  Impl(const Dataset& d, const LoaderOptions& o)
      : ds(d), opt(o), norm(d.H, d.W, d.C, d.mean, d.std, "DataLoader: dataset '" + d.name + "'") {}

  Batch build(int64_t index) const {
    const int64_t lo = index * opt.batch_size;
    const int64_t hi = std::min(lo + opt.batch_size, ds.N);
    const int64_t B = hi - lo, image_bytes = ds.H * ds.W * ds.C;
    const int64_t out_image = norm.out_h * norm.out_w * ds.C;
    const bool augment = opt.train && opt.augment;
    Batch b;
    b.epoch = epoch;
    b.index = index;
    b.images = Tensor::empty({B, norm.out_h, norm.out_w, ds.C});
    b.labels = Tensor::empty({B}, DType::i64);
    float* images = b.images.data<float>();
    int64_t* labels = b.labels.data<int64_t>();
    for (int64_t k = 0; k < B; ++k) {
      const int64_t pos = lo + k, i = order[static_cast<size_t>(pos)];
      const int64_t label = ds.labels[static_cast<size_t>(i)];
      if (label < 0 || label >= ds.num_classes)
        fail("DataLoader: dataset '", ds.name, "': sample ", i, " has label ", label,
             " outside [0, ", ds.num_classes, ")");
      labels[k] = label;
      const CropFlip cf = augment ? crop_flip(opt.seed, epoch, pos) : CropFlip{};
      norm.write(images + k * out_image, ds.images.data() + i * image_bytes, cf);
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
};

DataLoader::DataLoader(const Dataset& ds, LoaderOptions opt) {
  const std::string who = "DataLoader: dataset '" + ds.name + "'";
  CNX_CHECK(ds.N > 0, who, " has no samples");
  CNX_CHECK(ds.num_classes > 0, who, " has ", ds.num_classes, " classes");
  CNX_CHECK(ds.H > 0 && ds.W > 0 && ds.C > 0, who, ": bad image shape ", ds.H, "x", ds.W, "x", ds.C);
  CNX_CHECK(static_cast<int64_t>(ds.images.size()) == ds.N * ds.H * ds.W * ds.C, who, " holds ",
            ds.images.size(), " pixel bytes for ", ds.N, " images of ", ds.H, "x", ds.W, "x", ds.C,
            " (", ds.N * ds.H * ds.W * ds.C, ")");
  CNX_CHECK(static_cast<int64_t>(ds.labels.size()) == ds.N, who, " holds ", ds.labels.size(),
            " labels for ", ds.N, " images");
  CNX_CHECK(opt.batch_size > 0, "DataLoader: batch size must be > 0, got ", opt.batch_size);
  CNX_CHECK(opt.workers >= -1, "DataLoader: workers must be >= 0 (or -1: default), got ", opt.workers);
  CNX_CHECK(opt.prefetch == -1 || opt.prefetch >= 1,
            "DataLoader: prefetch must be >= 1 (or -1: 2 x workers), got ", opt.prefetch);
  impl_ = std::make_unique<Impl>(ds, opt);
  Impl& m = *impl_;
  if (opt.workers == -1) {
    const unsigned hw = std::thread::hardware_concurrency();
    m.nworkers = static_cast<int>(std::clamp(hw, 1u, 4u));
  } else {
    m.nworkers = opt.workers;
  }
  m.depth = opt.prefetch == -1 ? std::max(1, 2 * m.nworkers) : opt.prefetch;
  m.per_epoch = opt.drop_last ? ds.N / opt.batch_size : (ds.N + opt.batch_size - 1) / opt.batch_size;
  CNX_CHECK(m.per_epoch > 0, who, ": batch size ", opt.batch_size, " is larger than its ", ds.N,
            " samples and drop_last is on: an epoch would have no batch");
}

DataLoader::~DataLoader() {
  if (impl_) impl_->stop_workers();
}

int64_t DataLoader::batches_per_epoch() const { return impl_->per_epoch; }
int64_t DataLoader::image_height() const { return impl_->norm.out_h; }
int64_t DataLoader::image_width() const { return impl_->norm.out_w; }
int DataLoader::workers() const { return impl_->nworkers; }
int DataLoader::prefetch() const { return impl_->depth; }
const LoaderOptions& DataLoader::options() const { return impl_->opt; }

void DataLoader::start_epoch(int64_t epoch, int64_t first_batch) {
  Impl& m = *impl_;
  CNX_CHECK(epoch >= 0, "DataLoader::start_epoch: epoch must be >= 0, got ", epoch);
  CNX_CHECK(first_batch >= 0 && first_batch <= m.per_epoch, "DataLoader::start_epoch: batch ",
            first_batch, " is outside the epoch's [0, ", m.per_epoch, "]");
  m.stop_workers();
  m.started = true;
  m.failed = nullptr;
  m.epoch = epoch;
  if (m.opt.train) {
    m.order = epoch_permutation(m.ds.N, m.opt.seed, epoch);
  } else if (static_cast<int64_t>(m.order.size()) != m.ds.N) {
    m.order.resize(static_cast<size_t>(m.ds.N));
    std::iota(m.order.begin(), m.order.end(), int64_t{0});
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
