// The host buffer pool's policy (see tensor/pinned_memory.h). The CUDA side of the pinned
// backend is in pinned_memory.cu; a CPU-only build gets the stub at the bottom.
#include "tensor/pinned_memory.h"

#include <algorithm>
#include <cstdio>
#include <exception>
#include <new>

#include "tensor/cuda_memory.h"
#include "tensor/error.h"

namespace cnx {

// ---- HostBuffer ---------------------------------------------------------------------------------

HostBuffer::~HostBuffer() { release(); }

HostBuffer::HostBuffer(HostBuffer&& o) noexcept : pool_(std::move(o.pool_)), block_(o.block_) {
  o.block_ = nullptr;
}

HostBuffer& HostBuffer::operator=(HostBuffer&& o) noexcept {
  if (this != &o) {
    release();
    pool_ = std::move(o.pool_);
    block_ = o.block_;
    o.block_ = nullptr;
  }
  return *this;
}

void HostBuffer::release() noexcept {
  if (block_) pool_->release(block_);
  block_ = nullptr;
  pool_.reset();
}

int64_t HostBuffer::nbytes() const { return block_ ? pool_->block_bytes() : 0; }
bool HostBuffer::pinned() const { return block_ && pool_->pinned(); }

void HostBuffer::copy_to_device(void* dst, Device device, int64_t nbytes) {
  CNX_CHECK(block_, "HostBuffer::copy_to_device: the buffer is empty");
  CNX_CHECK(device.is_cuda(), "HostBuffer::copy_to_device: ", device.str(), " is not a CUDA device");
  CNX_CHECK(nbytes >= 0 && nbytes <= pool_->block_bytes(), "HostBuffer::copy_to_device: ", nbytes,
            " bytes asked of a block of ", pool_->block_bytes());
  if (nbytes == 0) return;
  pool_->backend_.copy_to_device(dst, device, block_->data, nbytes);
  record_use(device);
}

void HostBuffer::record_use(Device device) {
  CNX_CHECK(block_, "HostBuffer::record_use: the buffer is empty");
  if (!pool_->backend_.record) return;  // pageable: every use was synchronous
  pool_->backend_.record(block_->event, device);
  block_->pending = true;
}

// ---- HostBufferPool -----------------------------------------------------------------------------

namespace {
constexpr std::align_val_t kHostAlignment{64};
}

HostBufferPool::Backend HostBufferPool::pageable_backend() {
  Backend b;
  b.pinned = false;
  b.alloc = [](int64_t n) { return ::operator new(static_cast<size_t>(n), kHostAlignment); };
  b.free = [](void* p) { ::operator delete(p, kHostAlignment); };
  // From pageable memory the driver stages the bytes before cudaMemcpyAsync returns: no event.
  b.copy_to_device = [](void* dst, Device device, const void* src, int64_t n) {
    cuda_copy(dst, device, src, Device::cpu(), n);
  };
  return b;
}

std::shared_ptr<HostBufferPool> HostBufferPool::create(int64_t block_bytes, Backend backend, int max_blocks) {
  CNX_CHECK(block_bytes > 0, "HostBufferPool: blocks must hold at least one byte, got ", block_bytes);
  CNX_CHECK(max_blocks >= 1, "HostBufferPool: max_blocks must be >= 1, got ", max_blocks);
  CNX_CHECK(backend.alloc && backend.free && backend.copy_to_device,
            "HostBufferPool: the backend needs alloc, free and copy_to_device");
  CNX_CHECK(!backend.record || (backend.done && backend.wait && backend.destroy),
            "HostBufferPool: a backend with events needs record, done, wait and destroy");
  return std::shared_ptr<HostBufferPool>(new HostBufferPool(block_bytes, std::move(backend), max_blocks));
}

HostBufferPool::HostBufferPool(int64_t block_bytes, Backend backend, int max_blocks)
    : block_bytes_(block_bytes), backend_(std::move(backend)), max_blocks_(max_blocks) {}

HostBufferPool::~HostBufferPool() {
  // No HostBuffer is alive (each holds the pool), so every block is free or pending.
  for (auto& b : blocks_) {
    try {
      if (b->pending) backend_.wait(b->event);  // never free memory a DMA may still read
    } catch (const std::exception& e) {
      std::fprintf(stderr, "cnx: HostBufferPool: waiting for a copy failed: %s\n", e.what());
    }
    if (b->event) backend_.destroy(b->event);
    backend_.free(b->data);
  }
}

HostBuffer HostBufferPool::acquire() {
  detail::HostBlock* block = nullptr;
  bool must_wait = false;
  {
    std::lock_guard<std::mutex> lk(mu_);
    ++stats_.acquires;
    // Pending blocks whose copy has completed become free (oldest first: most likely done).
    for (auto it = pending_.begin(); it != pending_.end();) {
      if (backend_.done((*it)->event)) {
        (*it)->pending = false;
        free_.push_back(*it);
        it = pending_.erase(it);
      } else {
        ++it;
      }
    }
    if (!free_.empty()) {
      block = free_.back();
      free_.pop_back();
    } else if (!pending_.empty() && static_cast<int64_t>(blocks_.size()) >= max_blocks_) {
      block = pending_.front();  // taken now, waited for below (outside the lock)
      pending_.erase(pending_.begin());
      must_wait = true;
      ++stats_.waits;
    }
    if (block) ++stats_.reuses;
  }
  if (must_wait) {
    try {
      backend_.wait(block->event);
    } catch (...) {
      release(block);  // still pending: back in the list, not lost
      throw;
    }
    block->pending = false;
  }
  if (!block) {  // allocate outside the lock: cudaHostAlloc is slow
    auto fresh = std::make_unique<detail::HostBlock>();
    fresh->data = backend_.alloc(block_bytes_);
    block = fresh.get();
    std::lock_guard<std::mutex> lk(mu_);
    blocks_.push_back(std::move(fresh));
    ++stats_.blocks;
  }
  return HostBuffer(shared_from_this(), block);
}

void HostBufferPool::release(detail::HostBlock* block) noexcept {
  std::lock_guard<std::mutex> lk(mu_);
  if (block->pending) pending_.push_back(block);
  else free_.push_back(block);
}

HostBufferPoolStats HostBufferPool::stats() const {
  std::lock_guard<std::mutex> lk(mu_);
  HostBufferPoolStats s = stats_;
  s.pending_now = static_cast<int64_t>(pending_.size());
  return s;
}

#ifndef CNX_CUDA
// ---- CPU-only build: no page-locked memory -------------------------------------------------------
HostBufferPool::Backend HostBufferPool::pinned_backend() {
  fail("HostBufferPool: pinned memory needs the CUDA backend, and this build has none (nvcc was "
       "not found at configure time)");
}
#endif

}  // namespace cnx
