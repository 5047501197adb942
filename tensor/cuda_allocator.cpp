#include "tensor/cuda_allocator.h"

#include <algorithm>
#include <cstdio>
#include <exception>

#include "tensor/error.h"

namespace cnx {

namespace {

// "1.50 GiB", "512 B": for messages.
std::string format_bytes(int64_t n) {
  const char* units[] = {"B", "KiB", "MiB", "GiB", "TiB"};
  double v = static_cast<double>(n);
  int u = 0;
  while (v >= 1024 && u < 4) {
    v /= 1024;
    ++u;
  }
  char buf[64];
  if (u == 0) std::snprintf(buf, sizeof buf, "%lld B", static_cast<long long>(n));
  else std::snprintf(buf, sizeof buf, "%.2f %s", v, units[u]);
  return buf;
}

int64_t round_up(int64_t n, int64_t to) { return (n + to - 1) / to * to; }

}  // namespace

CachingAllocator::CachingAllocator(Backend backend, std::string name)
    : backend_(std::move(backend)), name_(std::move(name)) {
  CNX_CHECK(backend_.alloc && backend_.free, "CachingAllocator(", name_,
            "): the backend needs alloc and free");
}

CachingAllocator::~CachingAllocator() {
  std::lock_guard<std::mutex> lock(mutex_);
  try {
    // Pools still alive (their graphs leaked) hold segments too: give them to the general cache
    // so that they are released with it.
    capturing_ = nullptr;
    while (!pools_.empty()) release_pool_locked(pools_.begin()->second.get());
    release_cached_locked();
  } catch (const std::exception& e) {
    std::fprintf(stderr, "cnx: caching allocator for %s: releasing the cache failed: %s\n",
                 name_.c_str(), e.what());
  }
  if (!allocated_.empty())
    std::fprintf(stderr,
                 "cnx: caching allocator for %s destroyed with %zu blocks (%s) still allocated; "
                 "their memory is not released\n",
                 name_.c_str(), allocated_.size(), format_bytes(stats_.allocated_bytes).c_str());
}

// ---- allocate ----------------------------------------------------------------------------------

void* CachingAllocator::allocate(int64_t nbytes) {
  CNX_CHECK(nbytes >= 0, "CachingAllocator(", name_, "): negative size ", nbytes);
  if (nbytes == 0) return nullptr;
  std::lock_guard<std::mutex> lock(mutex_);
  return allocate_locked(nbytes);
}

void* CachingAllocator::allocate_locked(int64_t nbytes) {
  const int64_t size = round_size(nbytes);
  const bool small = size <= kSmallMax;
  ++stats_.allocations;

  // During a capture, only the capturing pool's blocks may be handed out (see the header).
  FreeLists& lists = free_lists(capturing_);
  Block* b = small ? take_small(lists, size) : take_large(lists, size);
  if (b) {
    ++stats_.cache_hits;
  } else {
    // A miss: a new segment. Large segments are rounded up to 2 MiB, so that the spare end can
    // serve a later request; if that much is not available, the exact size is tried.
    const int64_t segment = small ? size : round_up(size, kLargeSegmentRound);
    b = new_segment(segment, small);
    if (!b && segment > size) b = new_segment(size, small);
    // Out of memory: give the cache back to the driver and try once more. Not during a capture:
    // that synchronises the device and calls cudaFree, both of which break the capture.
    if (!b && !capturing_) {
      ++stats_.oom_retries;
      release_cached_locked();
      b = new_segment(segment, small);
      if (!b && segment > size) b = new_segment(size, small);
    }
    if (!b) fail_oom(nbytes, size);
    b->pool = capturing_;  // a segment made during capture is the pool's for good
    if (!small) {  // split the new segment as take_large would have
      lists.large.insert(b);
      b = take_large(lists, size);
    }
  }
  b->allocated = true;
  allocated_.emplace(b->addr, b);
  stats_.allocated_bytes += b->size;
  stats_.peak_allocated_bytes = std::max(stats_.peak_allocated_bytes, stats_.allocated_bytes);
  return reinterpret_cast<void*>(b->addr);
}

CachingAllocator::Block* CachingAllocator::take_small(FreeLists& lists, int64_t size) {
  auto it = lists.small.find(size);
  if (it == lists.small.end() || it->second.empty()) return nullptr;
  Block* b = it->second.back();  // LIFO: the most recently freed block is likely still in L2
  it->second.pop_back();
  return b;
}

CachingAllocator::Block* CachingAllocator::take_large(FreeLists& lists, int64_t size) {
  Block key;
  key.size = size;
  key.addr = 0;
  auto it = lists.large.lower_bound(&key);  // best fit: smallest size >= size, lowest address
  if (it == lists.large.end()) return nullptr;
  Block* b = *it;
  lists.large.erase(it);
  // Split when the rest is big enough to serve another large request.
  if (b->size - size > kSmallMax) {
    auto rest = std::make_unique<Block>();
    rest->addr = b->addr + static_cast<uintptr_t>(size);
    rest->size = b->size - size;
    rest->pool = b->pool;
    rest->prev = b;
    rest->next = b->next;
    if (b->next) b->next->prev = rest.get();
    b->next = rest.get();
    b->size = size;
    lists.large.insert(rest.get());
    Block* raw = rest.get();
    owned_.emplace(raw, std::move(rest));
  }
  return b;
}

CachingAllocator::Block* CachingAllocator::new_segment(int64_t segment_size, bool small) {
  void* p = backend_.alloc(segment_size);  // throws on errors other than out-of-memory
  if (!p) return nullptr;
  auto b = std::make_unique<Block>();
  b->addr = reinterpret_cast<uintptr_t>(p);
  b->size = segment_size;
  b->small = small;
  stats_.reserved_bytes += segment_size;
  ++stats_.device_mallocs;
  Block* raw = b.get();
  owned_.emplace(raw, std::move(b));
  return raw;
}

[[noreturn]] void CachingAllocator::fail_oom(int64_t requested, int64_t size) const {
  const int64_t cached = stats_.reserved_bytes - stats_.allocated_bytes;
  if (capturing_)
    fail("CUDA out of memory on ", name_, ": cannot allocate ", format_bytes(size),
         " (a request of ", requested, " bytes) during CUDA graph capture, where the cache cannot "
         "be returned to the driver; the allocator holds ", format_bytes(stats_.reserved_bytes),
         ", ", format_bytes(stats_.allocated_bytes), " in live tensors. Run the step uncaptured "
         "first, or use a smaller batch size.");
  fail("CUDA out of memory on ", name_, ": cannot allocate ", format_bytes(size), " (a request of ",
       requested, " bytes) even after returning the cache to the driver; the allocator holds ",
       format_bytes(stats_.reserved_bytes), ": ", format_bytes(stats_.allocated_bytes),
       " in live tensors and ", format_bytes(cached),
       " free but in segments that still hold live tensors. Try a smaller batch size.");
}

// ---- free --------------------------------------------------------------------------------------

void CachingAllocator::deallocate(void* ptr) noexcept {
  if (!ptr) return;
  std::lock_guard<std::mutex> lock(mutex_);
  auto it = allocated_.find(reinterpret_cast<uintptr_t>(ptr));
  if (it == allocated_.end()) {
    std::fprintf(stderr, "cnx: caching allocator for %s: free of unknown pointer %p ignored\n",
                 name_.c_str(), ptr);
    return;
  }
  Block* b = it->second;
  allocated_.erase(it);
  free_block_locked(b);
}

void CachingAllocator::free_block_locked(Block* b) {
  b->allocated = false;
  stats_.allocated_bytes -= b->size;
  // A block that is not the capturing pool's may have been used by kernels of this capture, so
  // whatever reuses it would be overwritten at each replay: hold it until the pool is released.
  // (A block of another pool would only go back to that pool, which captures no more; holding it
  // too keeps the rule simple.)
  if (capturing_ && b->pool != capturing_) {
    b->held = true;
    capturing_->held.push_back(b);
    return;
  }
  insert_free_locked(b);
}

void CachingAllocator::insert_free_locked(Block* b) {
  FreeLists& lists = free_lists(b->pool);
  if (b->small) {
    lists.small[b->size].push_back(b);
    return;
  }
  // Merge with free neighbours (never with held ones: they are in no free list). A neighbour
  // leaves the free set before its size changes (the set is ordered by size).
  if (Block* p = b->prev; p && !p->allocated && !p->held) {
    lists.large.erase(p);
    p->size += b->size;
    p->next = b->next;
    if (b->next) b->next->prev = p;
    owned_.erase(b);
    b = p;
  }
  if (Block* n = b->next; n && !n->allocated && !n->held) {
    lists.large.erase(n);
    b->size += n->size;
    b->next = n->next;
    if (n->next) n->next->prev = b;
    owned_.erase(n);
  }
  lists.large.insert(b);
}

// ---- graph pools -------------------------------------------------------------------------------

int64_t CachingAllocator::create_pool() {
  std::lock_guard<std::mutex> lock(mutex_);
  const int64_t id = next_pool_id_++;
  pools_.emplace(id, std::make_unique<Pool>());
  return id;
}

void CachingAllocator::begin_pool(int64_t id) {
  std::lock_guard<std::mutex> lock(mutex_);
  CNX_CHECK(!capturing_, "CachingAllocator(", name_, "): begin_pool(", id,
            ") while another pool is capturing (one capture at a time per device)");
  auto it = pools_.find(id);
  CNX_CHECK(it != pools_.end(), "CachingAllocator(", name_, "): begin_pool(", id,
            "): no such pool (released, or never created)");
  capturing_ = it->second.get();
}

void CachingAllocator::end_pool() noexcept {
  std::lock_guard<std::mutex> lock(mutex_);
  capturing_ = nullptr;
}

void CachingAllocator::release_pool(int64_t id) noexcept {
  std::lock_guard<std::mutex> lock(mutex_);
  auto it = pools_.find(id);
  if (it == pools_.end()) return;
  if (capturing_ == it->second.get()) {
    std::fprintf(stderr, "cnx: caching allocator for %s: pool %lld released while capturing; "
                 "the capture's allocations are no longer private\n", name_.c_str(),
                 static_cast<long long>(id));
    capturing_ = nullptr;
  }
  release_pool_locked(it->second.get());
}

void CachingAllocator::release_pool_locked(Pool* pool) {
  // Every block of the pool's segments becomes a general one: live blocks return to the general
  // cache when freed, free ones move over now. Segments are wholly the pool's, so none of them
  // can merge with a general neighbour.
  for (auto& [raw, block] : owned_)
    if (raw->pool == pool) raw->pool = nullptr;
  for (auto& [size, list] : pool->free.small)
    general_.small[size].insert(general_.small[size].end(), list.begin(), list.end());
  general_.large.insert(pool->free.large.begin(), pool->free.large.end());
  // The blocks it held back: now that no replay can touch them, they are ordinary free blocks
  // (of another pool, when they came from one that is still alive).
  for (Block* b : pool->held) {
    b->held = false;
    insert_free_locked(b);
  }
  for (auto it = pools_.begin(); it != pools_.end(); ++it)
    if (it->second.get() == pool) {
      pools_.erase(it);
      break;
    }
}

void CachingAllocator::empty_cache() {
  std::lock_guard<std::mutex> lock(mutex_);
  CNX_CHECK(!capturing_, "CachingAllocator(", name_,
            "): empty_cache() during CUDA graph capture (it synchronises the device and calls "
            "cudaFree, which break the capture)");
  release_cached_locked();
}

void CachingAllocator::release_cached_locked() {
  // Whole free segments of the general cache only (a graph pool's segments stay while its graph
  // may replay): a small free block is one; a large one is when it has no neighbours (its
  // segment is not split, or every piece has merged back).
  std::vector<Block*> release;
  for (auto& [size, list] : general_.small) release.insert(release.end(), list.begin(), list.end());
  for (Block* b : general_.large)
    if (!b->prev && !b->next) release.push_back(b);
  if (release.empty()) return;
  // A cached block may still be read or written by queued kernels: wait for the device first.
  if (backend_.synchronize) backend_.synchronize();
  general_.small.clear();
  for (Block* b : release) {
    if (!b->small) general_.large.erase(b);
    backend_.free(reinterpret_cast<void*>(b->addr));
    stats_.reserved_bytes -= b->size;
    ++stats_.device_frees;
    owned_.erase(b);
  }
}

// ---- stats -------------------------------------------------------------------------------------

AllocatorStats CachingAllocator::stats() const {
  std::lock_guard<std::mutex> lock(mutex_);
  AllocatorStats s = stats_;
  s.cached_bytes = s.reserved_bytes - s.allocated_bytes;
  return s;
}

void CachingAllocator::reset_peak() {
  std::lock_guard<std::mutex> lock(mutex_);
  stats_.peak_allocated_bytes = stats_.allocated_bytes;
}

}  // namespace cnx
