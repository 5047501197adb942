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

  Block* b = small ? take_small(size) : take_large(size);
  if (b) {
    ++stats_.cache_hits;
  } else {
    // A miss: a new segment. Large segments are rounded up to 2 MiB, so that the spare end can
    // serve a later request; if that much is not available, the exact size is tried.
    const int64_t segment = small ? size : round_up(size, kLargeSegmentRound);
    b = new_segment(segment, small);
    if (!b && segment > size) b = new_segment(size, small);
    if (!b) {  // out of memory: give the cache back to the driver and try once more
      ++stats_.oom_retries;
      release_cached_locked();
      b = new_segment(segment, small);
      if (!b && segment > size) b = new_segment(size, small);
    }
    if (!b) fail_oom(nbytes, size);
    if (!small) {  // split the new segment as take_large would have
      large_free_.insert(b);
      b = take_large(size);
    }
  }
  b->allocated = true;
  allocated_.emplace(b->addr, b);
  stats_.allocated_bytes += b->size;
  stats_.peak_allocated_bytes = std::max(stats_.peak_allocated_bytes, stats_.allocated_bytes);
  return reinterpret_cast<void*>(b->addr);
}

CachingAllocator::Block* CachingAllocator::take_small(int64_t size) {
  auto it = small_free_.find(size);
  if (it == small_free_.end() || it->second.empty()) return nullptr;
  Block* b = it->second.back();  // LIFO: the most recently freed block is likely still in L2
  it->second.pop_back();
  return b;
}

CachingAllocator::Block* CachingAllocator::take_large(int64_t size) {
  Block key;
  key.size = size;
  key.addr = 0;
  auto it = large_free_.lower_bound(&key);  // best fit: smallest size >= size, lowest address
  if (it == large_free_.end()) return nullptr;
  Block* b = *it;
  large_free_.erase(it);
  // Split when the rest is big enough to serve another large request.
  if (b->size - size > kSmallMax) {
    auto rest = std::make_unique<Block>();
    rest->addr = b->addr + static_cast<uintptr_t>(size);
    rest->size = b->size - size;
    rest->prev = b;
    rest->next = b->next;
    if (b->next) b->next->prev = rest.get();
    b->next = rest.get();
    b->size = size;
    large_free_.insert(rest.get());
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
  if (b->small) {
    small_free_[b->size].push_back(b);
    return;
  }
  // Merge with free neighbours. A neighbour leaves the free set before its size changes (the
  // set is ordered by size).
  if (Block* p = b->prev; p && !p->allocated) {
    large_free_.erase(p);
    p->size += b->size;
    p->next = b->next;
    if (b->next) b->next->prev = p;
    owned_.erase(b);
    b = p;
  }
  if (Block* n = b->next; n && !n->allocated) {
    large_free_.erase(n);
    b->size += n->size;
    b->next = n->next;
    if (n->next) n->next->prev = b;
    owned_.erase(n);
  }
  large_free_.insert(b);
}

void CachingAllocator::empty_cache() {
  std::lock_guard<std::mutex> lock(mutex_);
  release_cached_locked();
}

void CachingAllocator::release_cached_locked() {
  // Whole free segments only: a small free block is one; a large one is when it has no
  // neighbours (its segment is not split, or every piece has merged back).
  std::vector<Block*> release;
  for (auto& [size, list] : small_free_) release.insert(release.end(), list.begin(), list.end());
  for (Block* b : large_free_)
    if (!b->prev && !b->next) release.push_back(b);
  if (release.empty()) return;
  // A cached block may still be read or written by queued kernels: wait for the device first.
  if (backend_.synchronize) backend_.synchronize();
  small_free_.clear();
  for (Block* b : release) {
    if (!b->small) large_free_.erase(b);
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
