// The caching allocator's graph-private pools (tensor/cuda_allocator.h, "CUDA graphs"), against a
// fake backend: no device needed. What is checked is the rule that makes CUDA graph capture
// safe: a block a captured graph may touch is never handed to anyone else while the graph lives.
#include <gtest/gtest.h>

#include <map>
#include <set>

#include "tensor/cuda_allocator.h"
#include "tensor/error.h"

using namespace cnx;

namespace {

constexpr int64_t KiB = 1024, MiB = 1024 * 1024;

// A pretend device: hands out addresses from an unused range (never dereferenced) and counts
// what the allocator asks of it (as in test_cuda_backend.cpp).
class FakeDevice {
 public:
  explicit FakeDevice(int64_t capacity) : capacity_(capacity) {}

  CachingAllocator::Backend backend() {
    CachingAllocator::Backend b;
    b.alloc = [this](int64_t n) -> void* {
      if (used_ + n > capacity_) return nullptr;
      const uintptr_t addr = next_;
      next_ += static_cast<uintptr_t>((n + 4095) / 4096 * 4096 + 4096);
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

// reserved = allocated + cached, and reserved is exactly what the fake device has handed out.
void expect_consistent(const CachingAllocator& a, const FakeDevice& dev) {
  const AllocatorStats s = a.stats();
  EXPECT_EQ(s.reserved_bytes, s.allocated_bytes + s.cached_bytes);
  EXPECT_EQ(s.reserved_bytes, dev.used());
  EXPECT_EQ(s.device_mallocs - s.device_frees, static_cast<int64_t>(dev.segments()));
  EXPECT_GE(s.cached_bytes, 0);
}

// The sizes a training step asks for: small exact-size bins and large split blocks.
const int64_t kSizes[] = {4 * KiB, 100 * KiB, 1 * MiB, 3 * MiB, 8 * MiB};

}  // namespace

// Blocks freed outside a pool are not handed out inside it, and a pool's blocks (freed during
// the capture or after it) are not handed out outside it while the pool lives.
// Fails when allocate() ignores the capturing pool and takes from the general free lists (the
// first EXPECT_EQ(general.count(p), 0u)), or when a pool block freed is returned to the general
// lists (the second).
TEST(GraphPool, CaptureAndGeneralCacheNeverShareBlocks) {
  FakeDevice dev(1024 * MiB);
  CachingAllocator a(dev.backend(), "fake:0");
  std::set<void*> general;
  for (int64_t n : kSizes) general.insert(a.allocate(n));
  for (void* p : general) a.deallocate(p);  // all cached in the general cache now

  GraphPool pool(a);
  std::set<void*> captured;
  {
    CapturePoolScope scope(pool);
    for (int64_t n : kSizes) {
      void* p = a.allocate(n);
      EXPECT_EQ(general.count(p), 0u) << "a capture got a general block of " << n << " bytes";
      captured.insert(p);
    }
    for (void* p : captured) a.deallocate(p);  // freed inside the capture: back to the pool
  }
  // The capture is over but the graph (the pool) lives: ordinary allocations get the general
  // blocks again, never the pool's.
  for (int i = 0; i < 2; ++i) {
    std::set<void*> again;
    for (int64_t n : kSizes) {
      void* p = a.allocate(n);
      EXPECT_EQ(captured.count(p), 0u) << "an ordinary allocation got a pool block of " << n;
      again.insert(p);
    }
    EXPECT_EQ(again, general);
    for (void* p : again) a.deallocate(p);
  }
  expect_consistent(a, dev);
}

// A block freed during the capture serves a later allocation of the same capture (the replay
// runs in the same order, so this is as safe as eager reuse), with no new segment.
// Fails when a pool's freed block is not put back in the pool's lists (held or sent to the
// general cache): the second allocation then misses (a new device_malloc) and gets another
// address.
TEST(GraphPool, BlocksFreedDuringCaptureAreReusedByTheSameCapture) {
  FakeDevice dev(1024 * MiB);
  CachingAllocator a(dev.backend(), "fake:0");
  GraphPool pool(a);
  CapturePoolScope scope(pool);
  for (int64_t n : kSizes) {
    void* p = a.allocate(n);
    a.deallocate(p);
    const int64_t mallocs = a.stats().device_mallocs;
    EXPECT_EQ(a.allocate(n), p) << n << " bytes";
    EXPECT_EQ(a.stats().device_mallocs, mallocs) << n << " bytes";
    a.deallocate(p);
  }
  expect_consistent(a, dev);
}

// A general block freed during a capture may have been used by the captured kernels: nobody
// gets it (not the capture, not ordinary allocations after it) until the pool is released.
// Fails when free_block_locked returns it to the general lists during capture (the ordinary
// allocation after the capture gets it back).
TEST(GraphPool, GeneralBlocksFreedDuringCaptureAreHeldUntilThePoolIsReleased) {
  FakeDevice dev(1024 * MiB);
  CachingAllocator a(dev.backend(), "fake:0");
  std::map<int64_t, void*> before;  // size -> a live tensor made before the capture
  for (int64_t n : kSizes) before[n] = a.allocate(n);
  auto pool = std::make_unique<GraphPool>(a);
  {
    CapturePoolScope scope(*pool);
    for (auto& [n, p] : before) a.deallocate(p);  // the step frees an input it consumed
    for (auto& [n, p] : before) {
      void* q = a.allocate(n);
      EXPECT_NE(q, p) << "the capture reused a general block it freed, " << n << " bytes";
      a.deallocate(q);
    }
  }
  std::vector<void*> after;
  for (auto& [n, p] : before) {
    void* q = a.allocate(n);
    EXPECT_NE(q, p) << "an ordinary allocation got a block freed during capture, " << n;
    after.push_back(q);
  }
  for (void* q : after) a.deallocate(q);
  expect_consistent(a, dev);
  pool.reset();  // the graph is destroyed: the held blocks are ordinary cache blocks again
  for (auto& [n, p] : before) after.push_back(a.allocate(n));
  // Every block made before the capture serves ordinary allocations again (the large ones may
  // have merged with their free neighbours, so compare addresses as a set).
  std::set<void*> got(after.end() - std::size(kSizes), after.end());
  for (auto& [n, p] : before) EXPECT_EQ(got.count(p), 1u) << n << " bytes";
  for (auto it = after.end() - std::size(kSizes); it != after.end(); ++it) a.deallocate(*it);
  expect_consistent(a, dev);
}

// After the graph is gone its pool's blocks serve ordinary allocations: no new segments.
// Fails when release_pool does not move the pool's free blocks to the general lists (the
// ordinary allocations then cudaMalloc again).
TEST(GraphPool, AReleasedPoolsBlocksServeOrdinaryAllocations) {
  FakeDevice dev(1024 * MiB);
  CachingAllocator a(dev.backend(), "fake:0");
  std::set<void*> captured;
  void* still_live = nullptr;  // a graph output the caller keeps past the graph
  {
    GraphPool pool(a);
    CapturePoolScope scope(pool);
    for (int64_t n : kSizes) captured.insert(a.allocate(n));
    still_live = a.allocate(2 * MiB);
    for (void* p : captured) a.deallocate(p);
  }
  const AllocatorStats s0 = a.stats();
  std::set<void*> ordinary;
  for (int64_t n : kSizes) ordinary.insert(a.allocate(n));
  EXPECT_EQ(ordinary, captured);
  EXPECT_EQ(a.stats().device_mallocs, s0.device_mallocs);
  // The live block outlived its pool: freeing it returns it to the general cache.
  a.deallocate(still_live);
  EXPECT_EQ(a.allocate(2 * MiB), still_live);
  a.deallocate(still_live);
  for (void* p : ordinary) a.deallocate(p);
  expect_consistent(a, dev);
  // And empty_cache can now return it all to the device.
  a.empty_cache();
  EXPECT_EQ(dev.used(), 0);
  expect_consistent(a, dev);
}

// While the pool lives its segments stay, even free: empty_cache skips them. During the capture
// empty_cache throws (it would synchronise and cudaFree). The stats count pool blocks like any.
// Fails when release_cached_locked also walks the pool's free lists (dev.used() drops to 0).
TEST(GraphPool, EmptyCacheKeepsPoolSegmentsAndThrowsDuringCapture) {
  FakeDevice dev(1024 * MiB);
  CachingAllocator a(dev.backend(), "fake:0");
  a.deallocate(a.allocate(3 * MiB));  // one free general segment
  GraphPool pool(a);
  int64_t pool_bytes = 0;
  {
    CapturePoolScope scope(pool);
    std::vector<void*> ps;
    for (int64_t n : kSizes) ps.push_back(a.allocate(n));
    // Pool blocks count like any other: here every pool segment is wholly allocated (a block
    // keeps a spare end of 1 MiB or less unsplit), and the 4 MiB general one (3 MiB rounded
    // to 2 MiB multiples) is the only cache.
    EXPECT_EQ(a.stats().allocated_bytes, a.stats().reserved_bytes - 4 * MiB);
    EXPECT_EQ(a.stats().cached_bytes, 4 * MiB);
    EXPECT_THROW(a.empty_cache(), Error);
    for (void* p : ps) a.deallocate(p);
    pool_bytes = a.stats().reserved_bytes - 4 * MiB;
  }
  expect_consistent(a, dev);
  const int frees = static_cast<int>(a.stats().device_frees);
  a.empty_cache();  // only the general segment goes
  EXPECT_EQ(a.stats().device_frees, frees + 1);
  EXPECT_EQ(dev.used(), pool_bytes);
  EXPECT_EQ(a.stats().cached_bytes, pool_bytes);
  expect_consistent(a, dev);
}

// Out of memory during capture fails at once, without the retry that would synchronise and
// cudaFree the general cache. Fails when the retry runs during capture (syncs() grows).
TEST(GraphPool, OutOfMemoryDuringCaptureDoesNotEmptyTheCache) {
  FakeDevice dev(10 * MiB);
  CachingAllocator a(dev.backend(), "fake:0");
  a.deallocate(a.allocate(6 * MiB));  // cached, general
  GraphPool pool(a);
  CapturePoolScope scope(pool);
  EXPECT_THROW(a.allocate(6 * MiB), Error);
  EXPECT_EQ(dev.syncs(), 0);
  EXPECT_EQ(a.stats().oom_retries, 0);
  expect_consistent(a, dev);
}

// Two graphs, one after the other, each with its own pool: the second capture never gets the
// first one's blocks while the first graph lives, and one capture at a time.
// Fails when pools share free lists.
TEST(GraphPool, TwoGraphsDoNotShareBlocks) {
  FakeDevice dev(1024 * MiB);
  CachingAllocator a(dev.backend(), "fake:0");
  GraphPool g1(a), g2(a);
  std::set<void*> first;
  {
    CapturePoolScope scope(g1);
    for (int64_t n : kSizes) first.insert(a.allocate(n));
    for (void* p : first) a.deallocate(p);
    EXPECT_THROW(a.begin_pool(g2.id()), Error);  // one capture at a time
  }
  {
    CapturePoolScope scope(g2);
    std::vector<void*> second;
    for (int64_t n : kSizes) {
      second.push_back(a.allocate(n));
      EXPECT_EQ(first.count(second.back()), 0u) << n << " bytes";
    }
    for (void* p : second) a.deallocate(p);
  }
  expect_consistent(a, dev);
}
