// Reading a small result of queued device work on the host without draining the stream.
//
// Tensor::to(Device::cpu()) copies on the device's stream and waits for it: everything enqueued
// before the copy must finish, including work enqueued after the value of interest was
// computed. A training step that reads its loss that way stalls the GPU: the host waits, the
// queue empties, and the GPU idles while the host enqueues the next step. A Readback instead
// enqueues the copy into page-locked host memory right after the value is computed, records an
// event after it, and lets the host read it later, waiting for that event only:
//
//   Readback r(status);            // step k: enqueued behind step k's kernels
//   ... enqueue step k + 1's forward and backward ...
//   const Tensor v = r.wait();     // waits for step k's tail only; step k + 1 keeps the GPU busy
//
// The page-locked slots (4 KiB each) and their events come from a small per-process pool:
// allocating page-locked memory synchronises the device, so it happens only while the pool
// grows. A CPU tensor is copied at once (ready() is true from the start).
#pragma once

#include <memory>

#include "tensor/tensor.h"

namespace cnx {

class Readback {
 public:
  // The largest tensor a Readback takes, in bytes.
  static constexpr int64_t kMaxBytes = 4096;

  Readback() = default;
  // Enqueues the copy of `t` (contiguous, at most kMaxBytes) on its device's stream.
  explicit Readback(const Tensor& t);

  bool defined() const { return impl_ != nullptr; }
  // Whether the copy has completed (never blocks; lets the device advance).
  bool ready() const;
  // Waits for the copy only (not for work enqueued after it) and returns the values: a CPU
  // tensor of t's shape and dtype. May be called again.
  Tensor wait() const;

  struct Impl;

 private:
  std::shared_ptr<Impl> impl_;
};

}  // namespace cnx
