// Host buffers for the input pipeline: a pool of equal-size blocks reused batch after batch,
// page-locked ("pinned") when the batches are bound for a CUDA device.
//
// Why pinned: a copy from ordinary (pageable) memory to the GPU is staged by the driver through
// its own pinned buffer, synchronously, at about half the bus speed; from page-locked memory
// cudaMemcpyAsync is a true DMA that overlaps with the kernels already queued. But cudaHostAlloc
// is slow (it maps and locks pages, and synchronises) and locked memory is a scarce resource, so
// the blocks are allocated once and reused: a pool.
//
// The catch of asynchrony: after cudaMemcpyAsync returns, the DMA may not have read the block
// yet, so the block must not be refilled until the copy has completed. Each block has a CUDA
// event, recorded on the stream right after its copy (copy_to_device); a released block whose
// event has not completed waits in the pool's "pending" list and is handed out again only once
// cudaEventQuery says it is done (or, when the pool is at its size, after cudaEventSynchronize).
//
//   auto pool = HostBufferPool::create(bytes, /*pinned=*/true, /*max_blocks=*/6);
//   HostBuffer buf = pool->acquire();            // a worker fills buf.data()
//   buf.copy_to_device(dev_ptr, Device::cuda(0), bytes);  // async, on the library stream
//   buf = HostBuffer();                          // back to the pool, reused after the copy
//
// Pageable pools (no CUDA device, or a CPU-only build) hand out ordinary 64-byte aligned host
// memory and need no events. Thread-safe: workers acquire, the consumer releases.
#pragma once

#include <cstdint>
#include <functional>
#include <memory>
#include <mutex>
#include <vector>

#include "tensor/device.h"

namespace cnx {

class HostBufferPool;

namespace detail {
struct HostBlock {
  void* data = nullptr;
  void* event = nullptr;  // the backend's event (cudaEvent_t), made on first use
  bool pending = false;   // an event was recorded after the last use and may not have completed
};
}  // namespace detail

// One block of a pool, held by one owner (move-only). Destroying it (or assigning over it)
// returns the block to its pool.
class HostBuffer {
 public:
  HostBuffer() = default;
  ~HostBuffer();
  HostBuffer(HostBuffer&& o) noexcept;
  HostBuffer& operator=(HostBuffer&& o) noexcept;
  HostBuffer(const HostBuffer&) = delete;
  HostBuffer& operator=(const HostBuffer&) = delete;

  bool defined() const { return block_ != nullptr; }
  void* data() const { return block_ ? block_->data : nullptr; }
  template <class T> T* as() const { return static_cast<T*>(data()); }
  int64_t nbytes() const;
  bool pinned() const;

  // Copies bytes [0, nbytes) to `dst`, device memory of CUDA device `device`, on that device's
  // library stream (tensor/cuda_context.h), and records the block's event after the copy: the
  // copy is asynchronous for a pinned block, and the block is not reused before it completes.
  void copy_to_device(void* dst, Device device, int64_t nbytes);
  // Marks the block as read by the work enqueued so far on `device`'s stream (records its event
  // there). copy_to_device does it; call it for any other asynchronous use. No-op when pageable.
  void record_use(Device device);

 private:
  friend class HostBufferPool;
  HostBuffer(std::shared_ptr<HostBufferPool> pool, detail::HostBlock* block)
      : pool_(std::move(pool)), block_(block) {}
  void release() noexcept;

  std::shared_ptr<HostBufferPool> pool_;
  detail::HostBlock* block_ = nullptr;
};

struct HostBufferPoolStats {
  int64_t blocks = 0;         // allocated (cudaHostAlloc calls for a pinned pool)
  int64_t acquires = 0;       // acquire() calls
  int64_t reuses = 0;         // of those, served by a block allocated earlier
  int64_t waits = 0;          // of those, that had to wait for a pending copy to complete
  int64_t pending_now = 0;    // released blocks whose copy may still be in flight
};

class HostBufferPool : public std::enable_shared_from_this<HostBufferPool> {
 public:
  // The raw memory and event source (injectable, so the pool's policy is unit-tested on the CPU
  // with a fake). The event functions are null for pageable memory, which needs no events.
  struct Backend {
    bool pinned = false;
    std::function<void*(int64_t nbytes)> alloc;  // throws cnx::Error on failure
    std::function<void(void* ptr)> free;         // never throws
    // Enqueues a copy of n bytes from host src to device memory dst on device's stream.
    std::function<void(void* dst, Device device, const void* src, int64_t n)> copy_to_device;
    std::function<void(void*& event, Device device)> record;  // creates the event on first use
    std::function<bool(void* event)> done;                     // cudaEventQuery == success
    std::function<void(void* event)> wait;                     // cudaEventSynchronize
    std::function<void(void* event)> destroy;                  // never throws
  };
  // Ordinary host memory (64-byte aligned); copies go through cuda_copy (staged by the driver).
  static Backend pageable_backend();
  // cudaHostAlloc / cudaFreeHost, cudaMemcpyAsync and CUDA events. Throws cnx::Error in a
  // CPU-only build.
  static Backend pinned_backend();

  // A pool of blocks of block_bytes. max_blocks: how many blocks the pool should need at most
  // (the consumer's batches in flight); beyond it, acquire() waits for a pending copy rather than
  // allocate (it still allocates when nothing is pending, so it never deadlocks).
  static std::shared_ptr<HostBufferPool> create(int64_t block_bytes, Backend backend, int max_blocks);
  static std::shared_ptr<HostBufferPool> create(int64_t block_bytes, bool pinned, int max_blocks) {
    return create(block_bytes, pinned ? pinned_backend() : pageable_backend(), max_blocks);
  }
  ~HostBufferPool();  // waits for pending copies, frees every block; logs, never throws
  HostBufferPool(const HostBufferPool&) = delete;
  HostBufferPool& operator=(const HostBufferPool&) = delete;

  // A block of block_bytes: a free one, else a pending one whose copy has completed, else a new
  // one (or, at max_blocks, the oldest pending one once its copy completes).
  HostBuffer acquire();

  int64_t block_bytes() const { return block_bytes_; }
  bool pinned() const { return backend_.pinned; }
  HostBufferPoolStats stats() const;

 private:
  friend class HostBuffer;
  HostBufferPool(int64_t block_bytes, Backend backend, int max_blocks);
  void release(detail::HostBlock* block) noexcept;

  int64_t block_bytes_;
  Backend backend_;
  int max_blocks_;
  mutable std::mutex mu_;
  std::vector<std::unique_ptr<detail::HostBlock>> blocks_;  // every block, for the destructor
  std::vector<detail::HostBlock*> free_;                    // ready for reuse
  std::vector<detail::HostBlock*> pending_;                 // released, copy maybe in flight (oldest first)
  HostBufferPoolStats stats_;
};

}  // namespace cnx
