// The caching allocator behind every CUDA tensor: device memory is taken from the driver
// (cudaMalloc) only when the cache cannot serve a request, and a freed tensor's block goes back
// to the cache, not to the driver. After the first training step or two, every request is a
// cache hit: no cudaMalloc or cudaFree inside a steady-state step (both synchronise the device
// and cost far more than a kernel).
//
// This file is the bookkeeping only, plain C++ over an injectable Backend (raw alloc/free), so
// that the policy is unit-tested on the CPU with a fake backend (tests/test_cuda_backend.cpp;
// the graph pools in tests/test_allocator_pool.cpp).
// tensor/cuda_memory.cu gives each device one CachingAllocator over cudaMalloc/cudaFree.
//
// Policy (PyTorch's CUDACachingAllocator, much simplified):
//  - Sizes are rounded up to a multiple of kRound (512 B): every block is 512-byte aligned
//    (cudaMalloc returns 256-byte aligned segments), enough for any vector load and for
//    cuBLASLt's default alignment heuristics.
//  - Small requests (<= kSmallMax, 1 MiB) are served from exact-size bins: one free list per
//    rounded size, each block its own segment (never split, never merged).
//  - Large requests take the best fit (the smallest free block that is big enough, lowest
//    address on ties) among the free large blocks; a block with more than kSmallMax to spare is
//    split and the rest stays free. On a miss a new segment of the request rounded up to
//    kLargeSegmentRound (2 MiB) is allocated. A freed large block merges with its free
//    neighbours in the same segment.
//  - On an out-of-memory from the backend the whole cache is released (empty_cache) and the
//    allocation tried once more; if it fails again, allocate() throws cnx::Error naming the
//    request and what the allocator holds.
//
// Streams: the cache is per device, and a freed block may be handed out again at once, while
// kernels that used it may still be queued. That is safe because the library enqueues every
// launch and copy of a device on that device's one stream (tensor/cuda_context.h): whatever
// uses the block next is ordered after whatever used it before. Code that uses another stream
// must synchronise it before freeing tensors it used.
//
// CUDA graphs: a captured graph bakes in the address of every buffer its kernels touch, and
// replays later reading and writing those addresses. So, as PyTorch's graph-private memory
// pools do, the memory a capture allocates comes from a pool private to that graph
// (create_pool, begin_pool / end_pool around the capture, release_pool when the graph is
// destroyed; GraphPool and CapturePoolScope below do this by RAII):
//  - While a pool captures, every allocate() is served from that pool's own free blocks or a
//    new segment that belongs to the pool; blocks of the general cache are never handed out.
//  - A pool block freed (during the capture or after it) goes back to the pool only: a later
//    allocation of the same capture may reuse it, which is as safe as reuse is eagerly (the
//    graph replays its kernels in capture order on one stream), but no ordinary allocation
//    and no other graph gets it while the pool lives, because the graph may still write it.
//  - A general block freed during a capture may have been read or written by captured kernels,
//    so it is held back (by nobody reusable) until the pool is released.
//  - release_pool (the graph is gone) turns every block of the pool, free or still allocated,
//    into ordinary cache blocks. Pool segments are never returned to the backend while the
//    pool lives: empty_cache() skips them and throws while a pool captures (it would
//    synchronise, which is illegal during capture).
// A new segment during capture calls backend alloc (cudaMalloc). The CUDA runtime docs
// (cudaThreadExchangeStreamCaptureMode) say cudaMalloc "is not enqueued asynchronously to a
// stream, and is not observed by stream capture", which is why the default (global) capture
// mode forbids it; under cudaStreamCaptureModeRelaxed the call is permitted, and it is safe
// here because the graph needs the memory once, at capture time, and the pool keeps it until
// the graph is destroyed. The out-of-memory retry (empty_cache and try again) is skipped during
// capture: it would synchronise and cudaFree. Warming the cache up before capturing is still
// good practice. Only one pool captures at a time per allocator (the library has one stream
// per device); every thread's allocations go to it meanwhile.
//
// Thread-safe (one mutex): tensors may be freed on any thread.
#pragma once

#include <cstdint>
#include <functional>
#include <map>
#include <memory>
#include <mutex>
#include <set>
#include <string>
#include <unordered_map>
#include <vector>

namespace cnx {

struct AllocatorStats {
  int64_t allocated_bytes = 0;       // in blocks handed out and not yet freed (rounded sizes)
  int64_t peak_allocated_bytes = 0;  // the most allocated_bytes since construction/reset_peak()
  int64_t reserved_bytes = 0;        // held from the backend: allocated + cached
  int64_t cached_bytes = 0;          // reserved but free, ready for reuse
  int64_t allocations = 0;           // allocate() calls for one byte or more
  int64_t cache_hits = 0;            // of those, served without the backend
  int64_t device_mallocs = 0;        // successful backend alloc calls (cudaMalloc)
  int64_t device_frees = 0;          // backend free calls (cudaFree)
  int64_t oom_retries = 0;           // times an out-of-memory emptied the cache and retried
};

class CachingAllocator {
 public:
  static constexpr int64_t kRound = 512;                     // block sizes are multiples of this
  static constexpr int64_t kSmallMax = int64_t(1) << 20;     // 1 MiB: small blocks up to here
  static constexpr int64_t kLargeSegmentRound = int64_t(2) << 20;  // new large segments: 2 MiB multiples

  // The raw memory source. alloc returns nullptr when out of memory (and throws on any other
  // failure); free never throws. synchronize (optional) waits until the device is idle: called
  // before segments are returned to the backend, since a cached block may still be in use by
  // queued kernels (cudaFree happens to synchronise too, but this does not rely on it).
  struct Backend {
    std::function<void*(int64_t nbytes)> alloc;
    std::function<void(void* ptr)> free;
    std::function<void()> synchronize;
  };

  // `name` says which device in messages ("cuda:0").
  CachingAllocator(Backend backend, std::string name);
  // Returns the cached segments to the backend. Blocks still allocated are not freed (a message
  // on stderr says how many): their owners may still be alive.
  ~CachingAllocator();
  CachingAllocator(const CachingAllocator&) = delete;
  CachingAllocator& operator=(const CachingAllocator&) = delete;

  // At least nbytes, aligned to kRound (relative to the backend's segments). nbytes == 0 gives
  // nullptr; nbytes < 0 throws. Throws cnx::Error when the backend is out of memory even after
  // the cache was emptied.
  void* allocate(int64_t nbytes);
  // Returns a block from allocate() to the cache. nullptr is ignored; an unknown pointer is
  // reported on stderr and otherwise ignored (never throws: called from destructors).
  void deallocate(void* ptr) noexcept;

  // Releases every cached segment that holds no allocated block to the backend.
  void empty_cache();

  // ---- graph-private pools (see "CUDA graphs" above) ----
  // A new, empty pool; its id is never reused.
  int64_t create_pool();
  // From here until end_pool(), allocations come from pool `id`. Throws when another pool is
  // capturing or the id is unknown.
  void begin_pool(int64_t id);
  // Ends the current capture (nothing when none is active). Never throws.
  void end_pool() noexcept;
  // The graph that used pool `id` is gone: its blocks become ordinary cache blocks, and the
  // general blocks it held back are returned to the cache. Unknown ids are ignored. Never
  // throws (called from destructors); when the pool is still capturing, the capture is ended.
  void release_pool(int64_t id) noexcept;

  AllocatorStats stats() const;
  // peak_allocated_bytes = allocated_bytes now.
  void reset_peak();

  static int64_t round_size(int64_t nbytes) { return (nbytes + kRound - 1) / kRound * kRound; }

 private:
  // A contiguous range of one segment. Large blocks of a segment form a doubly linked list in
  // address order (prev/next), so a freed block can merge with its free neighbours.
  struct Pool;
  struct Block {
    uintptr_t addr = 0;
    int64_t size = 0;
    bool allocated = false;
    bool small = false;
    // Freed, but held back by a capturing pool (a general block freed during capture): in no
    // free list, and never merged with its neighbours until the pool is released.
    bool held = false;
    Pool* pool = nullptr;   // the graph pool its segment belongs to; nullptr: the general cache
    Block* prev = nullptr;  // neighbours in the same segment (large blocks only)
    Block* next = nullptr;
  };
  struct BySizeThenAddr {
    bool operator()(const Block* a, const Block* b) const {
      return a->size != b->size ? a->size < b->size : a->addr < b->addr;
    }
  };
  // The free blocks of the general cache, or of one pool. A whole segment belongs to one of
  // them, so a block only ever merges with neighbours of the same free lists.
  struct FreeLists {
    std::map<int64_t, std::vector<Block*>> small;  // rounded size -> free blocks (LIFO)
    std::set<Block*, BySizeThenAddr> large;
  };
  struct Pool {
    FreeLists free;
    std::vector<Block*> held;  // general blocks freed during this pool's capture
  };

  FreeLists& free_lists(Pool* pool) { return pool ? pool->free : general_; }
  void* allocate_locked(int64_t size);
  Block* take_small(FreeLists& lists, int64_t size);
  Block* take_large(FreeLists& lists, int64_t size);
  Block* new_segment(int64_t segment_size, bool small);  // nullptr when out of memory
  void free_block_locked(Block* b);
  void insert_free_locked(Block* b);  // into its free lists, merging with free neighbours
  void release_pool_locked(Pool* pool);
  void release_cached_locked();
  [[noreturn]] void fail_oom(int64_t requested, int64_t size) const;

  Backend backend_;
  std::string name_;
  mutable std::mutex mutex_;
  FreeLists general_;                                   // the ordinary cache
  std::map<int64_t, std::unique_ptr<Pool>> pools_;      // live graph pools by id
  Pool* capturing_ = nullptr;                           // the pool allocations go to now
  int64_t next_pool_id_ = 1;
  std::unordered_map<uintptr_t, Block*> allocated_;    // address -> block handed out
  std::unordered_map<Block*, std::unique_ptr<Block>> owned_;  // every live Block
  AllocatorStats stats_;
};

// A graph's private pool, as an RAII handle: keep it beside the graph and destroy it with (or
// after) the graph; the destructor returns the pool's blocks to the ordinary cache. Move-only.
// The allocator must outlive it (the per-device allocators of cuda_memory.cu are never
// destroyed).
class GraphPool {
 public:
  explicit GraphPool(CachingAllocator& allocator)
      : allocator_(&allocator), id_(allocator.create_pool()) {}
  ~GraphPool() {
    if (allocator_) allocator_->release_pool(id_);
  }
  GraphPool(GraphPool&& o) noexcept : allocator_(o.allocator_), id_(o.id_) { o.allocator_ = nullptr; }
  GraphPool& operator=(GraphPool&& o) noexcept {
    if (this != &o) {
      if (allocator_) allocator_->release_pool(id_);
      allocator_ = o.allocator_;
      id_ = o.id_;
      o.allocator_ = nullptr;
    }
    return *this;
  }
  GraphPool(const GraphPool&) = delete;
  GraphPool& operator=(const GraphPool&) = delete;

  CachingAllocator& allocator() const { return *allocator_; }
  int64_t id() const { return id_; }

 private:
  CachingAllocator* allocator_;
  int64_t id_;
};

// Allocations go to `pool` for the lifetime of the scope: open it right after
// cudaStreamBeginCapture and close it right after cudaStreamEndCapture. Not movable.
class CapturePoolScope {
 public:
  explicit CapturePoolScope(GraphPool& pool) : allocator_(&pool.allocator()) {
    allocator_->begin_pool(pool.id());
  }
  ~CapturePoolScope() { allocator_->end_pool(); }
  CapturePoolScope(const CapturePoolScope&) = delete;
  CapturePoolScope& operator=(const CapturePoolScope&) = delete;

 private:
  CachingAllocator* allocator_;
};

}  // namespace cnx
