// Host-to-device uploads of input batches on a copy stream of their own, so that the copy of
// step k + 1's images overlaps step k's kernels instead of waiting behind them on the compute
// stream (the device's library stream, tensor/cuda_context.h).
//
// Why not a block from the caching allocator: its blocks are safe to reuse because every user
// is on the one compute stream, in host order. A copy on another stream could land in a block
// whose previous tenant the compute stream still reads. So the uploads go to a ring of two
// staging buffers owned by this module, and two events per slot keep both streams honest:
//
//   copy stream:     wait consumed[i] -> memcpy host -> slot i -> record copied[i]
//   compute stream:  wait copied[i]   -> kernels that read slot i -> record consumed[i]
//
// The first wait keeps the copy into slot i behind the kernels that read its previous batch
// (two uploads ago); the second keeps those kernels behind their copy.
//
//   StagedUpload up = upload_async(buffer, nbytes, device);   // copy enqueued, compute waits for it
//   cuda::batch_finish(out, up.data<uint8_t>(), ..., cuda::device_stream(device));
//   up.release();   // slot i is free once the kernels enqueued so far have run
//
// The HostBuffer's block goes back to its pool only after the copy has completed (its event is
// recorded on the compute stream after the wait for copied[i]). Staging memory is cudaMalloc'd
// once per size (and grown when a larger batch comes); it is not counted by the caching
// allocator's statistics. CUDA builds only.
#pragma once

#include <cstdint>

#include "kernels/stream.h"
#include "tensor/device.h"
#include "tensor/pinned_memory.h"

namespace cnx {

// One upload's staging slot, held until the kernels that read it are enqueued. Move-only;
// release() (or the destructor) records the slot's "consumed" event on the compute stream.
class StagedUpload {
 public:
  StagedUpload() = default;
  ~StagedUpload() { release(); }
  StagedUpload(StagedUpload&& o) noexcept : device_(o.device_), slot_(o.slot_), data_(o.data_) { o.slot_ = -1; }
  StagedUpload& operator=(StagedUpload&&) = delete;
  StagedUpload(const StagedUpload&) = delete;
  StagedUpload& operator=(const StagedUpload&) = delete;

  // Device memory holding the uploaded bytes, for kernels on the compute stream.
  template <class T> const T* data() const { return static_cast<const T*>(data_); }
  void release() noexcept;

 private:
  friend StagedUpload upload_async(HostBuffer& src, int64_t nbytes, Device device);
  StagedUpload(Device device, int slot, void* data) : device_(device), slot_(slot), data_(data) {}
  Device device_ = Device::cpu();
  int slot_ = -1;
  void* data_ = nullptr;
};

// Enqueues the copy of src's first nbytes to `device` on its copy stream, and makes the
// device's compute stream wait for it. The caller enqueues the kernels that read the slot, then
// releases it.
StagedUpload upload_async(HostBuffer& src, int64_t nbytes, Device device);

// The copy stream of `device` (for tests that force it to run ahead of the compute stream).
cudaStream_t upload_stream(Device device);

}  // namespace cnx
