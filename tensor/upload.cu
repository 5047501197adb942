// The copy stream and its ring of staging slots (tensor/upload.h).
#include <cuda_runtime.h>

#include <array>
#include <cstdio>
#include <map>
#include <memory>
#include <mutex>

#include "tensor/cuda_check.h"
#include "tensor/cuda_context.h"
#include "tensor/upload.h"

namespace cnx {

namespace {

constexpr int kSlots = 2;  // the batch being read by the compute stream, and the next one

struct Slot {
  void* data = nullptr;
  int64_t capacity = 0;
  cudaEvent_t copied = nullptr;    // on the copy stream, after the copy into data
  cudaEvent_t consumed = nullptr;  // on the compute stream, after the kernels that read data
  bool consumed_recorded = false;
  bool held = false;  // a StagedUpload holds it: its readers are not all enqueued yet
};

struct Ring {
  cudaStream_t stream = nullptr;
  std::array<Slot, kSlots> slots;
  int next = 0;
};

std::mutex g_rings_mutex;
// One ring per device, made on first use and kept for the life of the process (never destroyed:
// the CUDA context may be gone by the time static destructors run).
Ring& ring(Device device) {
  static auto* rings = new std::map<int, std::unique_ptr<Ring>>();
  auto& r = (*rings)[device.index];
  if (!r) {
    cuda::DeviceGuard guard(device);
    auto made = std::make_unique<Ring>();
    // Non-blocking: no implicit ordering with the legacy default stream.
    CNX_CUDA_CHECK(cudaStreamCreateWithFlags(&made->stream, cudaStreamNonBlocking));
    for (Slot& s : made->slots) {
      CNX_CUDA_CHECK(cudaEventCreateWithFlags(&s.copied, cudaEventDisableTiming));
      CNX_CUDA_CHECK(cudaEventCreateWithFlags(&s.consumed, cudaEventDisableTiming));
    }
    r = std::move(made);
  }
  return *r;
}

}  // namespace

cudaStream_t upload_stream(Device device) {
  CNX_CHECK(device.is_cuda(), "upload_stream: ", device.str(), " is not a CUDA device");
  std::lock_guard<std::mutex> lock(g_rings_mutex);
  return ring(device).stream;
}

StagedUpload upload_async(HostBuffer& src, int64_t nbytes, Device device) {
  CNX_CHECK(device.is_cuda(), "upload_async: ", device.str(), " is not a CUDA device");
  CNX_CHECK(src.defined() && nbytes > 0 && nbytes <= src.nbytes(), "upload_async: ", nbytes,
            " bytes asked of a host buffer of ", src.nbytes());
  std::lock_guard<std::mutex> lock(g_rings_mutex);
  Ring& r = ring(device);
  cuda::DeviceGuard guard(device);
  const int i = r.next;
  r.next = (r.next + 1) % kSlots;
  Slot& slot = r.slots[static_cast<size_t>(i)];
  CNX_CHECK(!slot.held, "upload_async: both staging slots are held; release a StagedUpload once the "
            "kernels that read it are enqueued");
  if (slot.capacity < nbytes) {  // a larger batch: wait until the old buffer's readers are done
    if (slot.consumed_recorded) CNX_CUDA_CHECK(cudaEventSynchronize(slot.consumed));
    if (slot.data) CNX_CUDA_CHECK(cudaFree(slot.data));
    slot.data = nullptr;
    slot.capacity = 0;
    CNX_CUDA_CHECK(cudaMalloc(&slot.data, static_cast<size_t>(nbytes)));
    slot.capacity = nbytes;
  }
  // The copy stream: after the kernels that read this slot's previous batch, then the copy.
  if (slot.consumed_recorded) CNX_CUDA_CHECK(cudaStreamWaitEvent(r.stream, slot.consumed, 0));
  CNX_CUDA_CHECK(cudaMemcpyAsync(slot.data, src.data(), static_cast<size_t>(nbytes), cudaMemcpyHostToDevice, r.stream));
  CNX_CUDA_CHECK(cudaEventRecord(slot.copied, r.stream));
  // The compute stream: whatever comes next waits for the copy.
  const cudaStream_t compute = cuda::device_stream(device);
  CNX_CUDA_CHECK(cudaStreamWaitEvent(compute, slot.copied, 0));
  // The host block may go back to its pool once the compute stream is past that wait, i.e.
  // once the copy has completed.
  src.record_use(device);
  if (cuda_sync_after_launch()) CNX_CUDA_CHECK(cudaStreamSynchronize(r.stream));  // CNX_CUDA_SYNC=1
  slot.held = true;
  return StagedUpload(device, i, slot.data);
}

void StagedUpload::release() noexcept {
  if (slot_ < 0) return;
  std::lock_guard<std::mutex> lock(g_rings_mutex);
  Slot& slot = ring(device_).slots[static_cast<size_t>(slot_)];
  cuda::DeviceGuard guard(device_);
  const cudaError_t e = cudaEventRecord(slot.consumed, cuda::device_stream(device_));
  if (e != cudaSuccess) std::fprintf(stderr, "cnx: cudaEventRecord failed: %s\n", cudaGetErrorString(e));
  slot.consumed_recorded = e == cudaSuccess;
  slot.held = false;
  slot_ = -1;
}

}  // namespace cnx
