// Readback's CUDA side (tensor/readback.h): a pool of page-locked 4 KiB slots, each with an
// event, kept for the life of the process (a handful: one per step in flight).
#include <cuda_runtime.h>

#include <cstdio>
#include <mutex>
#include <vector>

#include "tensor/cuda_check.h"
#include "tensor/cuda_context.h"
#include "tensor/readback.h"

namespace cnx::detail {

struct PinnedSlot {
  void* data = nullptr;        // kMaxBytes of page-locked memory
  cudaEvent_t event = nullptr;  // recorded after the copy into data
  bool recorded = false;
};

namespace {

std::mutex g_slots_mutex;
std::vector<PinnedSlot*>& free_slots() {
  static auto* slots = new std::vector<PinnedSlot*>();  // never destroyed (static order)
  return *slots;
}

}  // namespace

PinnedSlot* acquire_pinned_slot() {
  {
    std::lock_guard<std::mutex> lock(g_slots_mutex);
    if (!free_slots().empty()) {
      PinnedSlot* s = free_slots().back();
      free_slots().pop_back();
      return s;
    }
  }
  auto* s = new PinnedSlot();
  // Portable: page-locked for every device of the process.
  CNX_CUDA_CHECK(cudaHostAlloc(&s->data, static_cast<size_t>(Readback::kMaxBytes), cudaHostAllocPortable));
  CNX_CUDA_CHECK(cudaEventCreateWithFlags(&s->event, cudaEventDisableTiming));
  return s;
}

void release_pinned_slot(PinnedSlot* slot) noexcept {
  if (slot->recorded) {  // the DMA must not land in a slot that someone else already reads
    const cudaError_t e = cudaEventSynchronize(slot->event);
    if (e != cudaSuccess) std::fprintf(stderr, "cnx: cudaEventSynchronize failed: %s\n", cudaGetErrorString(e));
    slot->recorded = false;
  }
  std::lock_guard<std::mutex> lock(g_slots_mutex);
  free_slots().push_back(slot);
}

void* pinned_slot_data(PinnedSlot* slot) { return slot->data; }

void start_readback(PinnedSlot* slot, const void* src, Device device, int64_t nbytes) {
  cuda::DeviceGuard guard(device);
  const cudaStream_t s = cuda::device_stream(device);
  CNX_CUDA_CHECK(cudaMemcpyAsync(slot->data, src, static_cast<size_t>(nbytes), cudaMemcpyDeviceToHost, s));
  CNX_CUDA_CHECK(cudaEventRecord(slot->event, s));
  slot->recorded = true;
}

bool readback_ready(PinnedSlot* slot) {
  if (!slot->recorded) return true;
  const cudaError_t e = cudaEventQuery(slot->event);
  if (e == cudaErrorNotReady) return false;
  CNX_CUDA_CHECK(e);
  slot->recorded = false;
  return true;
}

void wait_readback(PinnedSlot* slot) {
  if (!slot->recorded) return;  // waited for already
  CNX_CUDA_CHECK(cudaEventSynchronize(slot->event));
  slot->recorded = false;  // complete: neither a second wait() nor the release waits again
}

}  // namespace cnx::detail
