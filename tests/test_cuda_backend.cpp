// The CUDA infrastructure: the caching allocator (on the CPU, over a fake backend: these always
// run), then, on a CUDA device, tensors and copies on the library stream, the cuBLASLt linear
// and patchify launchers against the CPU reference, the whole model against the PyTorch golden
// data, AdamW training steps against the CPU, and no cudaMalloc in a steady-state step.
// Without a device (or without the CUDA backend) the GPU tests skip, saying why.
#include <gtest/gtest.h>

#include <cmath>
#include <cstring>
#include <filesystem>
#include <map>

#include "autograd/function.h"
#include "kernels/linear.h"
#include "kernels/patchify.h"
#include "models/convnext.h"
#include "models/grads.h"
#include "models/safetensors.h"
#include "tensor/cuda_allocator.h"
#include "tensor/cuda_context.h"
#include "tensor/cuda_memory.h"
#include "tests/golden.h"
#include "tests/testing.h"
#include "train/optim/adamw.h"
#include "train/optim/ema.h"
#include "train/trainer.h"

using namespace cnx;
using cnx::test::expect_error;
namespace fs = std::filesystem;

// =============================================================================================
// CachingAllocator over a fake backend (CPU)
// =============================================================================================
using cnx::test::normal_floats;

namespace {

constexpr int64_t KiB = 1024, MiB = 1024 * 1024;

// A pretend device: hands out addresses from an unused range (never dereferenced), with a
// capacity, and counts what the allocator asks of it.
class FakeDevice {
 public:
  explicit FakeDevice(int64_t capacity) : capacity_(capacity) {}

  CachingAllocator::Backend backend() {
    CachingAllocator::Backend b;
    b.alloc = [this](int64_t n) -> void* {
      if (used_ + n > capacity_) return nullptr;  // out of memory
      const uintptr_t addr = next_;
      next_ += static_cast<uintptr_t>((n + 4095) / 4096 * 4096 + 4096);  // segments never touch
      live_[addr] = n;
      used_ += n;
      return reinterpret_cast<void*>(addr);
    };
    b.free = [this](void* p) {
      auto it = live_.find(reinterpret_cast<uintptr_t>(p));
      ASSERT_NE(it, live_.end()) << "free of a pointer the fake device never gave";
      used_ -= it->second;
      live_.erase(it);
    };
    b.synchronize = [this] { ++syncs_; };
    return b;
  }

  int64_t used() const { return used_; }
  size_t segments() const { return live_.size(); }
  int syncs() const { return syncs_; }

 private:
  int64_t capacity_;
  int64_t used_ = 0;
  uintptr_t next_ = uintptr_t(1) << 32;
  std::map<uintptr_t, int64_t> live_;
  int syncs_ = 0;
};

uintptr_t addr(void* p) { return reinterpret_cast<uintptr_t>(p); }

}  // namespace

TEST(CachingAllocator, ZeroBytesIsNullAndNegativeIsAnError) {
  FakeDevice dev(64 * MiB);
  CachingAllocator a(dev.backend(), "fake:0");
  EXPECT_EQ(a.allocate(0), nullptr);
  a.deallocate(nullptr);  // ignored
  expect_error([&] { a.allocate(-1); }, {"fake:0", "negative size -1"});
  EXPECT_EQ(a.stats().allocations, 0);
  EXPECT_EQ(dev.segments(), 0u);
}

TEST(CachingAllocator, RoundsTo512AndReusesAFreedBlock) {
  FakeDevice dev(64 * MiB);
  CachingAllocator a(dev.backend(), "fake:0");
  void* p = a.allocate(1000);
  EXPECT_EQ(addr(p) % 512, 0u);
  EXPECT_EQ(a.stats().allocated_bytes, 1024);
  a.deallocate(p);
  EXPECT_EQ(a.stats().allocated_bytes, 0);
  EXPECT_EQ(a.stats().reserved_bytes, 1024);  // kept in the cache
  void* q = a.allocate(600);                  // rounds to 1024 too: the same block
  EXPECT_EQ(q, p);
  const AllocatorStats s = a.stats();
  EXPECT_EQ(s.device_mallocs, 1);
  EXPECT_EQ(s.allocations, 2);
  EXPECT_EQ(s.cache_hits, 1);
  EXPECT_EQ(s.cached_bytes, 0);
  a.deallocate(q);
}

TEST(CachingAllocator, SmallBinsAreExactSizes) {
  FakeDevice dev(64 * MiB);
  CachingAllocator a(dev.backend(), "fake:0");
  void* small = a.allocate(512);
  a.deallocate(small);
  void* bigger = a.allocate(1024);  // another bin: the 512-byte block is not split or grown
  EXPECT_NE(bigger, small);
  EXPECT_EQ(a.stats().device_mallocs, 2);
  a.deallocate(bigger);
  EXPECT_EQ(a.allocate(500), small);    // back to the 512 bin
  EXPECT_EQ(a.allocate(1024), bigger);  // and the 1024 one
  EXPECT_EQ(a.stats().device_mallocs, 2);
}

TEST(CachingAllocator, LargeBlocksSplitAndMerge) {
  FakeDevice dev(256 * MiB);
  CachingAllocator a(dev.backend(), "fake:0");
  void* whole = a.allocate(8 * MiB);
  a.deallocate(whole);
  // Two requests carved from the one cached 8 MiB segment.
  void* x = a.allocate(3 * MiB);
  void* y = a.allocate(4 * MiB);  // takes the 5 MiB rest whole (1 MiB to spare is not split off)
  EXPECT_EQ(x, whole);
  EXPECT_EQ(addr(y), addr(whole) + 3 * MiB);
  EXPECT_EQ(a.stats().device_mallocs, 1);
  EXPECT_EQ(a.stats().allocated_bytes, 8 * MiB);
  // Freed in either order, the pieces merge back: the whole segment serves 8 MiB again.
  a.deallocate(x);
  a.deallocate(y);
  EXPECT_EQ(a.allocate(8 * MiB), whole);
  EXPECT_EQ(a.stats().device_mallocs, 1);
  a.deallocate(whole);
  // The other order of frees merges too.
  x = a.allocate(3 * MiB);
  y = a.allocate(4 * MiB);
  a.deallocate(y);
  a.deallocate(x);
  EXPECT_EQ(a.allocate(8 * MiB), whole);
  EXPECT_EQ(a.stats().device_mallocs, 1);
  EXPECT_EQ(a.stats().cached_bytes, 0);
}

TEST(CachingAllocator, BestFitPrefersTheSmallestBlockThatFits) {
  FakeDevice dev(256 * MiB);
  CachingAllocator a(dev.backend(), "fake:0");
  void* big = a.allocate(8 * MiB);
  void* small = a.allocate(4 * MiB);
  EXPECT_EQ(a.stats().device_mallocs, 2);
  a.deallocate(big);
  a.deallocate(small);
  EXPECT_EQ(a.allocate(3 * MiB), small);
  EXPECT_EQ(a.allocate(6 * MiB), big);
  EXPECT_EQ(a.stats().device_mallocs, 2);
}

TEST(CachingAllocator, LargeSegmentsRoundTo2MiBAndTheRestIsUsable) {
  FakeDevice dev(256 * MiB);
  CachingAllocator a(dev.backend(), "fake:0");
  // 3 MiB + 1 B: a 4 MiB segment; the spare (< 1 MiB, too small for a large request) stays on
  // the block.
  void* p = a.allocate(3 * MiB + 1);
  EXPECT_EQ(a.stats().reserved_bytes, 4 * MiB);
  EXPECT_EQ(a.stats().allocated_bytes, 4 * MiB);
  a.deallocate(p);
  a.empty_cache();
  // 2 MiB + 512 B: a 4 MiB segment split; the rest (2 MiB - 512 B) serves the next request.
  void* q = a.allocate(2 * MiB + 512);
  EXPECT_EQ(a.stats().reserved_bytes, 4 * MiB);
  EXPECT_EQ(a.stats().allocated_bytes, 2 * MiB + 512);
  void* r = a.allocate(1 * MiB + 512 * KiB);
  EXPECT_EQ(addr(r), addr(q) + 2 * MiB + 512);
  EXPECT_EQ(a.stats().device_mallocs, 2);
  EXPECT_EQ(a.stats().allocated_bytes, 4 * MiB);  // the last 512 KiB - 512 B go with r
  a.deallocate(q);
  a.deallocate(r);
}

TEST(CachingAllocator, PeakAccounting) {
  FakeDevice dev(64 * MiB);
  CachingAllocator a(dev.backend(), "fake:0");
  void* p = a.allocate(2 * MiB);
  void* q = a.allocate(2 * MiB);
  EXPECT_EQ(a.stats().peak_allocated_bytes, 4 * MiB);
  a.deallocate(p);
  EXPECT_EQ(a.stats().allocated_bytes, 2 * MiB);
  EXPECT_EQ(a.stats().peak_allocated_bytes, 4 * MiB);
  a.reset_peak();
  EXPECT_EQ(a.stats().peak_allocated_bytes, 2 * MiB);
  void* r = a.allocate(512 * KiB);
  EXPECT_EQ(a.stats().peak_allocated_bytes, 2 * MiB + 512 * KiB);
  EXPECT_EQ(a.stats().reserved_bytes, 4 * MiB + 512 * KiB);
  a.deallocate(q);
  a.deallocate(r);
  EXPECT_EQ(a.stats().allocated_bytes, 0);
}

TEST(CachingAllocator, OutOfMemoryEmptiesTheCacheAndRetriesOnce) {
  FakeDevice dev(10 * MiB);
  CachingAllocator a(dev.backend(), "fake:0");
  void* p = a.allocate(6 * MiB);
  a.deallocate(p);  // cached: 6 MiB held, too small for the next request
  void* q = a.allocate(8 * MiB);  // 6 + 8 > 10: out of memory, the cache goes back, retried
  ASSERT_NE(q, nullptr);
  AllocatorStats s = a.stats();
  EXPECT_EQ(s.oom_retries, 1);
  EXPECT_EQ(s.device_frees, 1);
  EXPECT_EQ(s.reserved_bytes, 8 * MiB);
  EXPECT_EQ(dev.used(), 8 * MiB);
  EXPECT_EQ(dev.syncs(), 1);  // waited for the device before releasing

  // Nothing to release: the second failure is an error naming the request and the holdings.
  expect_error([&] { a.allocate(4 * MiB); },
               {"CUDA out of memory on fake:0", "cannot allocate 4.00 MiB", "a request of 4194304 bytes",
                "holds 8.00 MiB", "8.00 MiB in live tensors", "smaller batch size"});
  EXPECT_EQ(a.stats().oom_retries, 2);
  EXPECT_EQ(a.stats().allocated_bytes, 8 * MiB);  // unchanged by the failure
  a.deallocate(q);
}

TEST(CachingAllocator, OutOfMemoryFallsBackToTheExactSize) {
  FakeDevice dev(5 * MiB);
  CachingAllocator a(dev.backend(), "fake:0");
  void* p = a.allocate(3 * MiB);  // a 4 MiB segment (3 MiB rounded up to 2 MiB multiples)
  EXPECT_EQ(dev.used(), 4 * MiB);
  // 1.5 MiB fits neither as a 2 MiB segment nor at its exact size in the 1 MiB left.
  expect_error([&] { a.allocate(1 * MiB + 512 * KiB); }, {"cannot allocate 1.50 MiB"});
  a.deallocate(p);
  // 4.5 MiB: the cached 4 MiB block is too small, a 6 MiB segment does not fit the device; the
  // cache is released, and then the exact size fits.
  void* q = a.allocate(4 * MiB + 512 * KiB);
  ASSERT_NE(q, nullptr);
  EXPECT_EQ(dev.used(), 4 * MiB + 512 * KiB);
  a.deallocate(q);
}

TEST(CachingAllocator, EmptyCacheReleasesOnlyWholeFreeSegments) {
  FakeDevice dev(64 * MiB);
  CachingAllocator a(dev.backend(), "fake:0");
  void* seg = a.allocate(8 * MiB);
  a.deallocate(seg);
  void* held = a.allocate(3 * MiB);   // split: the 5 MiB rest is free but shares the segment
  void* small = a.allocate(4 * KiB);
  a.deallocate(small);
  a.empty_cache();
  AllocatorStats s = a.stats();
  EXPECT_EQ(s.device_frees, 1);  // the small block only
  EXPECT_EQ(s.reserved_bytes, 8 * MiB);
  EXPECT_EQ(dev.segments(), 1u);
  a.deallocate(held);  // merges back into the whole segment
  a.empty_cache();
  EXPECT_EQ(a.stats().reserved_bytes, 0);
  EXPECT_EQ(dev.segments(), 0u);
  EXPECT_EQ(dev.used(), 0);
  // The next request starts afresh.
  void* again = a.allocate(1 * MiB);
  EXPECT_EQ(a.stats().device_mallocs, 3);
  a.deallocate(again);
}

TEST(CachingAllocator, UnknownPointersAreIgnoredAndTheDestructorReturnsTheCache) {
  FakeDevice dev(64 * MiB);
  {
    CachingAllocator a(dev.backend(), "fake:0");
    void* p = a.allocate(2 * MiB);
    void* q = a.allocate(100);
    a.deallocate(q);
    a.deallocate(reinterpret_cast<void*>(0x1234));  // reported on stderr, otherwise ignored
    EXPECT_EQ(a.stats().allocated_bytes, 2 * MiB);
    a.deallocate(p);
    EXPECT_EQ(dev.segments(), 2u);
  }
  EXPECT_EQ(dev.segments(), 0u);
  EXPECT_EQ(dev.used(), 0);
}

TEST(CachingAllocator, ARepeatedPatternNeedsNoNewSegments) {
  // The shape of a training step: a varied sequence of allocations and frees, repeated. After
  // the first round every request is a cache hit.
  FakeDevice dev(1024 * MiB);
  CachingAllocator a(dev.backend(), "fake:0");
  const int64_t sizes[] = {40 * MiB, 3 * KiB, 10 * MiB, 10 * MiB, 700 * KiB, 40 * MiB, 5 * MiB, 512};
  auto round = [&] {
    std::vector<void*> live;
    for (int64_t n : sizes) live.push_back(a.allocate(n));
    a.deallocate(live[1]);
    a.deallocate(live[2]);
    live.push_back(a.allocate(12 * MiB));
    live.push_back(a.allocate(2 * KiB));
    for (size_t i = 0; i < live.size(); ++i)
      if (i != 1 && i != 2) a.deallocate(live[i]);
  };
  round();
  const int64_t mallocs = a.stats().device_mallocs;
  for (int i = 0; i < 5; ++i) round();
  EXPECT_EQ(a.stats().device_mallocs, mallocs);
  EXPECT_EQ(a.stats().allocated_bytes, 0);
}

// =============================================================================================
// Device flags (any build)
// =============================================================================================

TEST(CudaDevices, ResolveDeviceFlag) {
  EXPECT_EQ(resolve_device("cpu"), Device::cpu());
  EXPECT_EQ(resolve_device("auto"), Device::cpu());
  expect_error([] { resolve_device("gpu"); }, {"expected cpu, cuda or cuda:N, got 'gpu'"});
  if (!cuda_built()) {
    expect_error([] { resolve_device("cuda"); }, {"--device cuda", "no CUDA backend", "--device cpu"});
  } else if (cuda_device_count() == 0) {
    expect_error([] { resolve_device("cuda"); }, {"--device cuda", "no CUDA device found", "--device cpu"});
  } else {
    EXPECT_EQ(resolve_device("cuda"), Device::cuda(0));
    expect_error([] { resolve_device("cuda:99"); }, {"--device cuda:99", "no such CUDA device"});
  }
}

// =============================================================================================
// On a CUDA device
// =============================================================================================
namespace {

// Skips the test unless a CUDA device is visible, saying why.
#define CNX_REQUIRE_CUDA()                                                                 \
  do {                                                                                     \
    if (cuda_device_count() == 0)                                                          \
      GTEST_SKIP() << "no CUDA device visible (built with CUDA: "                          \
                   << (cuda_built() ? "yes" : "no") << ")";                               \
  } while (0)

const Device kGpu = Device::cuda(0);


[[maybe_unused]] std::vector<double> to_double(const std::vector<float>& v) { return {v.begin(), v.end()}; }

[[maybe_unused]] std::vector<double> abs_of(std::vector<double> v) {
  for (double& x : v) x = std::abs(x);
  return v;
}

// First-order bound on the rounding error of an f32 sum of k products (any order, FMAs or not)
// plus the final rounding and a bias, relative to the sum of the terms' magnitudes.
[[maybe_unused]] double gemm_tol(int64_t k) { return static_cast<double>(k + 3) * 0x1p-24; }


}  // namespace

TEST(CudaTensor, RoundTripsCopiesAndFillsOnTheStream) {
  CNX_REQUIRE_CUDA();
  Generator g(5);
  // Every dtype goes there and back unchanged.
  const Tensor f = Tensor::randn({3, 5, 7}, g);
  EXPECT_EQ(f.to(kGpu).to(Device::cpu()).to_vector<float>(), f.to_vector<float>());
  const Tensor d = Tensor::randn({11}, g, DType::f64);
  EXPECT_EQ(d.to(kGpu).to_vector<double>(), d.to_vector<double>());
  const std::vector<int64_t> labels{3, -1, 1ll << 40};
  EXPECT_EQ(Tensor::from_data<int64_t>({3}, labels, kGpu).to_vector<int64_t>(), labels);
  const std::vector<uint8_t> bytes{0, 7, 255, 128, 1};
  EXPECT_EQ(Tensor::from_data<uint8_t>({5}, bytes, kGpu).to_vector<uint8_t>(), bytes);
  EXPECT_EQ(Tensor::zeros({0}, DType::f32, kGpu).to_vector<float>(), std::vector<float>{});

  // A chain of device-side operations, each enqueued on the stream, read back once: the reads
  // must see every earlier write (8M floats: long enough for a race to show).
  const int64_t n = int64_t(8) << 20;
  const std::vector<float> host = normal_floats(n, 1);
  Tensor x = Tensor::from_data<float>({n}, host, kGpu);
  Tensor y = x.clone();       // device to device
  x.zero_();                  // memset after the copy: y keeps the values
  Tensor z = Tensor::empty({n}, DType::f32, kGpu);
  z.copy_from(y);             // device to device again
  y.fill_(2.5);               // host to device, after the copy out of y
  // (EXPECT_TRUE, not EXPECT_EQ: a failure should not print 8M values.)
  EXPECT_TRUE(z.to_vector<float>() == host);
  EXPECT_TRUE(x.to_vector<float>() == std::vector<float>(static_cast<size_t>(n), 0.0f));
  EXPECT_TRUE(y.to_vector<float>() == std::vector<float>(static_cast<size_t>(n), 2.5f));
  EXPECT_EQ(Tensor::full({}, -4.25, DType::f32, kGpu).item(), -4.25);

  // The library stream: one per device, not the legacy default stream.
  cuda::DeviceGuard guard(kGpu);
  EXPECT_NE(cuda::current_stream(), nullptr);
  EXPECT_EQ(cuda::current_stream(), cuda::device_stream(kGpu));
  cuda::synchronize(kGpu);
}

TEST(CudaTensor, StorageComesFromTheCachingAllocator) {
  CNX_REQUIRE_CUDA();
  if (cuda::caching_disabled()) GTEST_SKIP() << "CNX_CUDA_NO_CACHING=1: the caching allocator is bypassed";
  const AllocatorStats before = cuda::memory_stats(kGpu);
  {
    Tensor t = Tensor::empty({1000}, DType::f32, kGpu);  // 4000 bytes -> a 4096-byte block
    // A small block is a segment of its own: as aligned as cudaMalloc's (256 bytes); the 512
    // of kRound holds relative to a segment's start (tensor/cuda_allocator.h).
    EXPECT_EQ(reinterpret_cast<uintptr_t>(t.raw_data()) % 256, 0u);
    EXPECT_EQ(cuda::memory_stats(kGpu).allocated_bytes, before.allocated_bytes + 4096);
  }
  EXPECT_EQ(cuda::memory_stats(kGpu).allocated_bytes, before.allocated_bytes);
  const int64_t mallocs = cuda::memory_stats(kGpu).device_mallocs;
  for (int i = 0; i < 10; ++i) (void)Tensor::empty({1000}, DType::f32, kGpu);  // reused every time
  EXPECT_EQ(cuda::memory_stats(kGpu).device_mallocs, mallocs);
  // empty_cache gives the cached 4096-byte block (a segment of its own) back to the driver.
  const AllocatorStats cached = cuda::memory_stats(kGpu);
  cuda::empty_cache(kGpu);
  const AllocatorStats emptied = cuda::memory_stats(kGpu);
  EXPECT_LE(emptied.reserved_bytes, cached.reserved_bytes - 4096);
  EXPECT_GT(emptied.device_frees, cached.device_frees);
  EXPECT_EQ(emptied.allocated_bytes, cached.allocated_bytes);
  (void)Tensor::empty({1000}, DType::f32, kGpu);  // and allocation works after it
  EXPECT_EQ(cuda::memory_stats(kGpu).device_mallocs, emptied.device_mallocs + 1);
}

TEST(CudaDispatch, MixedDevicesAndOtherDtypesAreClearErrors) {
  CNX_REQUIRE_CUDA();
  Generator g(1);
  const Tensor x = Tensor::randn({2, 4}, g);
  const Tensor w = Tensor::randn({3, 4}, g).to(kGpu);
  expect_error([&] { linear(x, w, {}); }, {"linear", "weight f32[3, 4] cuda:0", "x f32[2, 4] cpu",
                                           "different devices"});
  expect_error([&] { add(x, x.to(kGpu)); }, {"add", "cuda:0", "cpu", "different devices"});
  expect_error([&] { gelu(Tensor::zeros({3}, DType::f64, kGpu)); },
               {"gelu", "the CUDA backend supports f32 and bf16", "f64[3] cuda:0"});
  ConvNeXtConfig c;
  c.depths = {1, 1};
  c.dims = {8, 16};
  c.num_classes = 3;
  ConvNeXt m(c, g);
  m.to(kGpu);
  expect_error([&] { m.forward(Tensor::randn({1, 32, 32, 3}, g), false, g); },
               {"images f32[1, 32, 32, 3] cpu", "not on the model's device cuda:0"});
}

// ---- linear (cuBLASLt) ------------------------------------------------------------------------

namespace {

// Device buffer of v, preceded by `pad` floats (so that the data pointer can be misaligned).
Tensor device_buffer(const std::vector<float>& v, int64_t pad) {
  std::vector<float> padded(static_cast<size_t>(pad), 0.0f);
  padded.insert(padded.end(), v.begin(), v.end());
  return Tensor::from_data<float>({static_cast<int64_t>(padded.size())}, padded, kGpu);
}
// An output buffer of n floats after `pad`, filled with NaN so that an unwritten element fails.
[[maybe_unused]] Tensor nan_buffer(int64_t n, int64_t pad) {
  return device_buffer(std::vector<float>(static_cast<size_t>(n), std::nanf("")), pad);
}
[[maybe_unused]] std::vector<double> read_back(const Tensor& t, int64_t pad) {
  const std::vector<float> v = t.to_vector<float>();
  return {v.begin() + pad, v.end()};
}

#if defined(CNX_CUDA) && CNX_CUDA
// The four linear products on the GPU against the double reference of the same f32 inputs.
void check_linear(int64_t M, int64_t K, int64_t N, bool with_bias, int64_t pad) {
  const std::string what = "linear M=" + std::to_string(M) + " K=" + std::to_string(K) +
                           " N=" + std::to_string(N) + (with_bias ? "" : " no bias") +
                           (pad ? " misaligned by " + std::to_string(pad) + " floats" : "");
  SCOPED_TRACE(what);
  const std::vector<float> x = normal_floats(M * K, 1), w = normal_floats(N * K, 2, 0.1), b = normal_floats(N, 3),
                           dy = normal_floats(M * N, 4);
  Tensor xd = device_buffer(x, pad), wd = device_buffer(w, pad), bd = device_buffer(b, pad),
         dyd = device_buffer(dy, pad);
  Tensor out = nan_buffer(M * N, pad), dx = nan_buffer(M * K, pad), dw = nan_buffer(N * K, pad),
         db = nan_buffer(N, pad);
  auto at = [pad](Tensor& t) { return t.data<float>() + pad; };
  {
    cuda::DeviceGuard guard(kGpu);
    const cudaStream_t s = cuda::current_stream();
    cuda::linear_forward(at(out), at(xd), at(wd), with_bias ? at(bd) : nullptr, M, K, N, s);
    cuda::linear_backward(at(dx), at(dw), at(db), at(dyd), at(xd), at(wd), M, K, N, s);
  }
  // Reference and magnitudes (the same products on |inputs|) in double.
  const std::vector<double> X = to_double(x), Wt = to_double(w), B = to_double(b), DY = to_double(dy);
  const std::vector<double> aX = abs_of(X), aW = abs_of(Wt), aB = abs_of(B), aDY = abs_of(DY);
  std::vector<double> ref(M * N), mag(M * N), rdx(M * K), mdx(M * K), rdw(N * K), mdw(N * K), rdb(N),
      mdb(N);
  cpu::linear_forward<double>(ref.data(), X.data(), Wt.data(), with_bias ? B.data() : nullptr, M, K, N);
  cpu::linear_forward<double>(mag.data(), aX.data(), aW.data(), with_bias ? aB.data() : nullptr, M, K, N);
  cpu::linear_backward<double>(rdx.data(), rdw.data(), rdb.data(), DY.data(), X.data(), Wt.data(), M, K, N);
  cpu::linear_backward<double>(mdx.data(), mdw.data(), mdb.data(), aDY.data(), aX.data(), aW.data(), M, K, N);
  test::expect_close_mag(what + " out", read_back(out, pad), ref, mag, gemm_tol(K));
  test::expect_close_mag(what + " din", read_back(dx, pad), rdx, mdx, gemm_tol(N));
  test::expect_close_mag(what + " dweight", read_back(dw, pad), rdw, mdw, gemm_tol(M));
  test::expect_close_mag(what + " dbias", read_back(db, pad), rdb, mdb, gemm_tol(M));
}
#endif

}  // namespace

TEST(CudaLinear, MatchesTheCpuReference) {
  CNX_REQUIRE_CUDA();
#if defined(CNX_CUDA) && CNX_CUDA
  cuda::set_allow_tf32(false);  // the tolerances are for fp32 products
  // Awkward sizes (not multiples of 4 or 8), then ConvNeXt-T's pointwise layers and head at
  // batch 2: stage 0 (56x56, 96 <-> 384), stage 3 (7x7, 768 <-> 3072), the head (768 -> 1000).
  const int64_t shapes[][3] = {{1, 1, 1},     {3, 5, 7},      {17, 33, 65},    {1, 7, 1},
                               {13, 1, 9},    {130, 97, 383}, {6272, 96, 384}, {6272, 384, 96},
                               {98, 768, 3072}, {98, 3072, 768}, {2, 768, 1000}};
  for (const auto& s : shapes) check_linear(s[0], s[1], s[2], /*with_bias=*/true, 0);
  check_linear(17, 33, 65, /*with_bias=*/false, 0);
  check_linear(17, 33, 65, true, /*pad=*/1);  // 4-byte aligned pointers only
  check_linear(64, 96, 384, true, /*pad=*/2);
  // A misaligned dbias leaves cuBLASLt's BGRADB out: linear.cu's column sums, in 3 chunks of
  // rows (more than 256 rows: the second, chunk-adding kernel runs too).
  check_linear(600, 9, 40, true, /*pad=*/1);
#endif
}

TEST(CudaLinear, EmptySizesAndNullOutputs) {
  CNX_REQUIRE_CUDA();
#if defined(CNX_CUDA) && CNX_CUDA
  cuda::DeviceGuard guard(kGpu);
  const cudaStream_t s = cuda::current_stream();
  // K = 0: the products are empty sums, out is the bias in every row; dweight has no elements,
  // din none either, dbias is still the column sums of dout.
  {
    const int64_t M = 3, N = 5;
    Tensor b = device_buffer(normal_floats(N, 1), 0), dy = device_buffer(normal_floats(M * N, 2), 0);
    Tensor out = nan_buffer(M * N, 0), db = nan_buffer(N, 0);
    cuda::linear_forward(out.data<float>(), nullptr, nullptr, b.data<float>(), M, 0, N, s);
    cuda::linear_backward(nullptr, nullptr, db.data<float>(), dy.data<float>(), nullptr, nullptr, M, 0, N, s);
    const std::vector<float> bias = b.to_vector<float>(), o = out.to_vector<float>(),
                             dyv = dy.to_vector<float>(), dbv = db.to_vector<float>();
    for (int64_t m = 0; m < M; ++m)
      for (int64_t n = 0; n < N; ++n) EXPECT_EQ(o[m * N + n], bias[n]);
    for (int64_t n = 0; n < N; ++n) {
      double want = 0, mag = 0;
      for (int64_t m = 0; m < M; ++m) want += dyv[m * N + n], mag += std::abs(dyv[m * N + n]);
      EXPECT_NEAR(dbv[n], want, gemm_tol(M) * mag);
    }
    Tensor out0 = nan_buffer(M * N, 0);
    cuda::linear_forward(out0.data<float>(), nullptr, nullptr, nullptr, M, 0, N, s);  // no bias: 0
    EXPECT_EQ(out0.to_vector<float>(), std::vector<float>(M * N, 0.0f));
  }
  // M = 0: no rows; dweight and dbias are zeros.
  {
    const int64_t K = 4, N = 6;
    Tensor w = device_buffer(normal_floats(N * K, 1), 0);
    Tensor dw = nan_buffer(N * K, 0), db = nan_buffer(N, 0);
    cuda::linear_forward(nullptr, nullptr, w.data<float>(), nullptr, 0, K, N, s);
    cuda::linear_backward(nullptr, dw.data<float>(), db.data<float>(), nullptr, nullptr, w.data<float>(),
                          0, K, N, s);
    EXPECT_EQ(dw.to_vector<float>(), std::vector<float>(N * K, 0.0f));
    EXPECT_EQ(db.to_vector<float>(), std::vector<float>(N, 0.0f));
  }
  // N = 0: din is zeros.
  {
    const int64_t M = 3, K = 4;
    Tensor dx = nan_buffer(M * K, 0);
    cuda::linear_backward(dx.data<float>(), nullptr, nullptr, nullptr, nullptr, nullptr, M, K, 0, s);
    EXPECT_EQ(dx.to_vector<float>(), std::vector<float>(M * K, 0.0f));
  }
  // Only dbias, only din, only dweight: the others stay untouched (NaN).
  {
    const int64_t M = 9, K = 5, N = 7;
    Tensor x = device_buffer(normal_floats(M * K, 1), 0), w = device_buffer(normal_floats(N * K, 2), 0),
           dy = device_buffer(normal_floats(M * N, 3), 0);
    Tensor dx = nan_buffer(M * K, 0), dw = nan_buffer(N * K, 0), db = nan_buffer(N, 0);
    cuda::linear_backward(nullptr, nullptr, db.data<float>(), dy.data<float>(), nullptr, nullptr, M, K, N, s);
    for (float v : dx.to_vector<float>()) EXPECT_TRUE(std::isnan(v));
    for (float v : dw.to_vector<float>()) EXPECT_TRUE(std::isnan(v));
    for (float v : db.to_vector<float>()) EXPECT_FALSE(std::isnan(v));
    cuda::linear_backward(nullptr, dw.data<float>(), nullptr, dy.data<float>(), x.data<float>(), nullptr,
                          M, K, N, s);
    for (float v : dw.to_vector<float>()) EXPECT_FALSE(std::isnan(v));
    for (float v : dx.to_vector<float>()) EXPECT_TRUE(std::isnan(v));
  }
#endif
}

// ---- patchify (space-to-depth + cuBLASLt) ------------------------------------------------------

namespace {

#if defined(CNX_CUDA) && CNX_CUDA
void check_patchify(int64_t N, int64_t H, int64_t W, int64_t Ci, int64_t Co, int64_t k) {
  const std::string what = "patchify N=" + std::to_string(N) + " H=" + std::to_string(H) +
                           " W=" + std::to_string(W) + " Ci=" + std::to_string(Ci) +
                           " Co=" + std::to_string(Co) + " k=" + std::to_string(k);
  SCOPED_TRACE(what);
  const int64_t Ho = H / k, Wo = W / k, KK = k * k * Ci, rows = N * Ho * Wo;
  const std::vector<float> x = normal_floats(N * H * W * Ci, 11), w = normal_floats(Co * KK, 12, 0.2),
                           b = normal_floats(Co, 13), dy = normal_floats(rows * Co, 14);
  Tensor xd = device_buffer(x, 0), wd = device_buffer(w, 0), bd = device_buffer(b, 0),
         dyd = device_buffer(dy, 0);
  Tensor out = nan_buffer(rows * Co, 0), dx = nan_buffer(N * H * W * Ci, 0), dw = nan_buffer(Co * KK, 0),
         db = nan_buffer(Co, 0);
  {
    cuda::DeviceGuard guard(kGpu);
    const cudaStream_t s = cuda::current_stream();
    cuda::patchify_forward(out.data<float>(), xd.data<float>(), wd.data<float>(), bd.data<float>(), N, H,
                           W, Ci, Co, k, s);
    cuda::patchify_backward(dx.data<float>(), dw.data<float>(), db.data<float>(), dyd.data<float>(),
                            xd.data<float>(), wd.data<float>(), N, H, W, Ci, Co, k, s);
  }
  const std::vector<double> X = to_double(x), Wt = to_double(w), B = to_double(b), DY = to_double(dy);
  const std::vector<double> aX = abs_of(X), aW = abs_of(Wt), aB = abs_of(B), aDY = abs_of(DY);
  std::vector<double> ref(rows * Co), mag(rows * Co), rdx(X.size()), mdx(X.size()), rdw(Wt.size()),
      mdw(Wt.size()), rdb(Co), mdb(Co);
  cpu::patchify_forward<double>(ref.data(), X.data(), Wt.data(), B.data(), N, H, W, Ci, Co, k);
  cpu::patchify_forward<double>(mag.data(), aX.data(), aW.data(), aB.data(), N, H, W, Ci, Co, k);
  cpu::patchify_backward<double>(rdx.data(), rdw.data(), rdb.data(), DY.data(), X.data(), Wt.data(), N, H,
                                 W, Ci, Co, k);
  cpu::patchify_backward<double>(mdx.data(), mdw.data(), mdb.data(), aDY.data(), aX.data(), aW.data(), N,
                                 H, W, Ci, Co, k);
  test::expect_close_mag(what + " out", read_back(out, 0), ref, mag, gemm_tol(KK));
  test::expect_close_mag(what + " din", read_back(dx, 0), rdx, mdx, gemm_tol(Co));  // 0 at borders
  test::expect_close_mag(what + " dweight", read_back(dw, 0), rdw, mdw, gemm_tol(rows));
  test::expect_close_mag(what + " dbias", read_back(db, 0), rdb, mdb, gemm_tol(rows));
}
#endif

}  // namespace

TEST(CudaPatchify, MatchesTheCpuReference) {
  CNX_REQUIRE_CUDA();
#if defined(CNX_CUDA) && CNX_CUDA
  cuda::set_allow_tf32(false);
  check_patchify(1, 4, 4, 3, 8, 4);      // one stem patch
  check_patchify(2, 9, 9, 5, 7, 2);      // odd sizes: the last row and column are ignored
  check_patchify(3, 8, 8, 4, 6, 2);      // Ci % 4 == 0: the float4 gather and scatter
  check_patchify(1, 5, 7, 3, 2, 4);      // one patch, borders on both sides
  check_patchify(2, 37, 45, 1, 8, 4);    // a grey image, awkward sizes (the golden case's stem)
  check_patchify(2, 6, 5, 8, 16, 1);     // k = 1: the image is the patch matrix
  check_patchify(1, 1, 3, 4, 5, 2);      // H < k: no output at all, din all zeros
  check_patchify(2, 224, 224, 3, 96, 4);  // ConvNeXt-T's stem at batch 2
  check_patchify(2, 56, 56, 96, 192, 2);  // its first downsampling layer
  check_patchify(2, 7, 7, 384, 768, 2);   // 7x7 -> 3x3: the odd last stage of a 112x112 input
#endif
}

// ---- the whole model ---------------------------------------------------------------------------

class CudaGolden : public ::testing::TestWithParam<std::string> {};

// The PyTorch golden data of tests/test_model.cpp (Golden), computed on the GPU, with the same
// tolerances: logits and loss 1e-4 relative, every gradient 1e-3 of its largest element.
TEST_P(CudaGolden, ForwardAndBackwardMatchPyTorch) {
  CNX_REQUIRE_CUDA();
  cuda::set_allow_tf32(false);
  const test::GoldenCase g = test::load_golden(GetParam());
  Generator init(0);
  ConvNeXt model(g.config, init);
  model.load_state_dict(g.weights.tensors);
  const GradsResult r = compute_grads(model, g.batch.find("images"), g.batch.find("labels"), kGpu);
  EXPECT_EQ(model.device(), kGpu);
  for (const Parameter& p : model.parameters()) ASSERT_TRUE(p.value.grad().device().is_cuda()) << p.name;
  EXPECT_TRUE(r.logits.device().is_cpu());
  test::expect_matches_golden(g, r, g.name + " (cuda)");
}

INSTANTIATE_TEST_SUITE_P(Cases, CudaGolden, ::testing::ValuesIn(test::kGoldenCases));

TEST(CudaModel, ToMovesEveryParameterExactly) {
  CNX_REQUIRE_CUDA();
  ConvNeXtConfig c = convnext_config("convnext_atto");
  c.num_classes = 10;
  Generator g(2);
  ConvNeXt m(c, g);
  const NamedTensors before = m.state_dict();
  m.to(kGpu);
  EXPECT_EQ(m.device(), kGpu);
  for (const Parameter& p : m.parameters()) {
    EXPECT_TRUE(p.value.device().is_cuda()) << p.name;
    EXPECT_TRUE(p.value.requires_grad()) << p.name;
    EXPECT_TRUE(p.value.is_leaf()) << p.name;
  }
  const NamedTensors after = m.state_dict();  // CPU copies, official layouts
  ASSERT_EQ(after.size(), before.size());
  for (size_t i = 0; i < before.size(); ++i) {
    EXPECT_TRUE(after[i].second.device().is_cpu());
    EXPECT_EQ(after[i].second.to_vector<float>(), before[i].second.to_vector<float>()) << before[i].first;
  }
  m.to(Device::cpu());
  EXPECT_EQ(m.parameters()[5].value.to_vector<float>(), before[5].second.to_vector<float>());
}

// ---- training steps ----------------------------------------------------------------------------

namespace {

constexpr double kMaxNorm = 0.05;  // small enough that every step clips

// One model, optimiser and EMA on one device; the training step of the trainer.
struct TrainingRun {
  ConvNeXt model;
  std::unique_ptr<AdamW> opt;
  std::unique_ptr<ModelEma> ema;
  Generator drop_gen{77};

  static ConvNeXt make_model(const ConvNeXtConfig& cfg) {
    Generator init(3);  // the same initial weights on every device
    return ConvNeXt(cfg, init);
  }

  TrainingRun(const ConvNeXtConfig& cfg, Device device) : model(make_model(cfg)) {
    model.to(device);
    opt = std::make_unique<AdamW>(model.parameters());
    ema = std::make_unique<ModelEma>(model.parameters(), 0.9);
  }

  // Returns the loss and the gradient norm before clipping.
  std::pair<double, double> step(const Tensor& images, const Tensor& labels) {
    const Device d = model.device();
    Tensor loss = cross_entropy(model.forward(images.to(d), true, drop_gen), labels.to(d), 0.1);
    const double value = loss.item();
    loss.backward();
    const double norm = clip_grad_norm(model.parameters(), kMaxNorm);
    opt->step(2e-3, 0.05);
    model.zero_grad();
    ema->update(model.parameters());
    return {value, norm};
  }
};

ConvNeXtConfig small_config() {
  ConvNeXtConfig c;
  c.depths = {1, 2};
  c.dims = {8, 16};
  c.num_classes = 5;
  c.layer_scale_init_value = 0.5;  // blocks that matter
  c.drop_path_rate = 0.3;          // drop path drawn on the host, applied on the device
  return c;
}

// ||a - b|| / ||b - base||: how far a's change from `base` is from b's.
double relative_change_error(const std::vector<float>& a, const std::vector<float>& b,
                             const std::vector<float>& base) {
  double err = 0, ref = 0;
  for (size_t i = 0; i < a.size(); ++i) {
    err += (double(a[i]) - b[i]) * (double(a[i]) - b[i]);
    ref += (double(b[i]) - base[i]) * (double(b[i]) - base[i]);
  }
  return ref > 0 ? std::sqrt(err / ref) : std::sqrt(err);
}

}  // namespace

TEST(CudaTraining, AdamWStepsMatchTheCpu) {
  CNX_REQUIRE_CUDA();
  cuda::set_allow_tf32(false);
  const ConvNeXtConfig cfg = small_config();
  TrainingRun cpu_run(cfg, Device::cpu()), gpu_run(cfg, kGpu);
  Generator g(9);
  const Tensor images = Tensor::randn({6, 32, 32, 3}, g);
  const Tensor labels = Tensor::from_data<int64_t>({6}, std::vector<int64_t>{0, 1, 2, 3, 4, 0});
  std::vector<std::vector<float>> initial;
  for (const Parameter& p : cpu_run.model.parameters()) initial.push_back(p.value.to_vector<float>());

  for (int step = 0; step < 5; ++step) {
    const auto [cpu_loss, cpu_norm] = cpu_run.step(images, labels);
    const auto [gpu_loss, gpu_norm] = gpu_run.step(images, labels);
    EXPECT_NEAR(gpu_loss, cpu_loss, 1e-4 * std::abs(cpu_loss)) << "step " << step;
    EXPECT_NEAR(gpu_norm, cpu_norm, 1e-3 * cpu_norm) << "step " << step;
    EXPECT_GT(cpu_norm, kMaxNorm) << "the test means to exercise clipping";
  }
  EXPECT_EQ(gpu_run.drop_gen.offset(), cpu_run.drop_gen.offset());  // the same masks were drawn
  EXPECT_EQ(gpu_run.opt->step_count(), 5);

  // Parameters and averages: Adam's step is ~lr for any gradient size, so a near-zero gradient
  // element may move either way on the two devices; compare the changes as a whole instead.
  const auto& cp = cpu_run.model.parameters();
  const auto& gp = gpu_run.model.parameters();
  for (size_t i = 0; i < cp.size(); ++i) {
    EXPECT_TRUE(gp[i].value.device().is_cuda());
    EXPECT_LT(relative_change_error(gp[i].value.to_vector<float>(), cp[i].value.to_vector<float>(),
                                    initial[i]), 1e-2) << cp[i].name;
    EXPECT_LT(relative_change_error(gpu_run.ema->parameters()[i].value.to_vector<float>(),
                                    cpu_run.ema->parameters()[i].value.to_vector<float>(), initial[i]),
              1e-2) << "ema " << cp[i].name;
    EXPECT_LT(relative_change_error(gpu_run.opt->exp_avg(i).to_vector<float>(),
                                    cpu_run.opt->exp_avg(i).to_vector<float>(),
                                    std::vector<float>(initial[i].size(), 0.0f)), 1e-2) << "m " << cp[i].name;
  }
  // Checkpoint state comes back to the host in the official layouts.
  const NamedTensors state = gpu_run.opt->state_dict();
  for (const auto& [name, t] : state) EXPECT_TRUE(t.device().is_cpu()) << name;
}

TEST(CudaTraining, SteadyStateStepsCallNoCudaMalloc) {
  CNX_REQUIRE_CUDA();
  if (cuda::caching_disabled()) GTEST_SKIP() << "CNX_CUDA_NO_CACHING=1: the caching allocator is bypassed";
  TrainingRun run(small_config(), kGpu);
  Generator g(4);
  const Tensor images = Tensor::randn({4, 32, 32, 3}, g);
  const Tensor labels = Tensor::from_data<int64_t>({4}, std::vector<int64_t>{0, 1, 2, 3});
  for (int i = 0; i < 3; ++i) run.step(images, labels);  // warm: the cache holds a step's blocks
  const AllocatorStats before = cuda::memory_stats(kGpu);
  for (int i = 0; i < 3; ++i) run.step(images, labels);
  const AllocatorStats after = cuda::memory_stats(kGpu);
  EXPECT_EQ(after.device_mallocs, before.device_mallocs) << "cudaMalloc inside a steady-state step";
  EXPECT_EQ(after.device_frees, before.device_frees);
  EXPECT_EQ(after.allocated_bytes, before.allocated_bytes) << "memory grows from step to step";
  EXPECT_GT(after.allocations, before.allocations);
}

// ---- the training loop ---------------------------------------------------------------------------

namespace {

void write_split(const fs::path& dir, const std::string& prefix, int n, uint64_t seed) {
  test::write_quadrant_split(dir.string(), prefix, n, seed);
}

}  // namespace

// The whole loop on the GPU against the same loop on the CPU, in fp32 and in bf16 mixed
// precision (`--use_amp true` on both devices: the CPU's bf16 kernels round every stored value
// as the GPU's do, so the two differ only by the order of additions in reductions).
TEST(CudaTraining, TrainLoopOnCudaMatchesTheCpu) {
  CNX_REQUIRE_CUDA();
  cuda::set_allow_tf32(false);
  const fs::path root = fs::temp_directory_path() / "cnx_cuda_train_loop";
  fs::remove_all(root);
  fs::create_directories(root / "data");
  write_split(root / "data", "train", 64, 1);
  write_split(root / "data", "t10k", 32, 2);
  TrainConfig c;
  c.depths = {1, 1};
  c.dims = {8, 16};
  c.data_path = (root / "data").string();
  c.batch_size = 16;
  c.epochs = 2;
  c.lr = 0.5 * 16 / 4096.0;  // 2e-3
  c.warmup_epochs = 0;
  c.num_workers = 1;
  c.log_every = 2;
  c.progress_bar = false;
  c.drop_path = 0.1;
  c.clip_grad = 1.0;
  c.update_freq = 2;  // gradient accumulation on the device
  c.model_ema = true;
  c.model_ema_eval = true;
  // bf16: a loss is a mean of bf16-rounded logits' terms; reductions that add in another order
  // flip a few roundings of 2^-8 relative, which the step's loss shows at the 1e-3 level.
  for (const auto& [amp, rtol] : {std::pair<std::string, double>{"false", 1e-4}, {"true", 5e-3}}) {
    SCOPED_TRACE("use_amp " + amp);
    c.use_amp = amp;
    c.device = "cpu";
    c.output_dir.clear();
    const TrainResult on_cpu = train(c);
    c.device = "cuda";
    c.output_dir = (root / ("out_amp_" + amp)).string();
    const TrainResult on_gpu = train(c);
    ASSERT_EQ(on_gpu.losses.size(), on_cpu.losses.size());
    ASSERT_EQ(on_gpu.losses.size(), 4u);
    for (size_t i = 0; i < on_cpu.losses.size(); ++i)
      EXPECT_NEAR(on_gpu.losses[i], on_cpu.losses[i], rtol * std::abs(on_cpu.losses[i])) << "step " << i;
    EXPECT_EQ(on_gpu.epochs_done, 2);
    // The checkpoint was written from host copies and loads back as weights.
    const NamedTensors weights = load_weights(c.output_dir + "/checkpoint-1.safetensors");
    EXPECT_FALSE(weights.empty());
  }
  fs::remove_all(root);
}
