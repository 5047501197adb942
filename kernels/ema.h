// The exponential moving average of the model's parameters on the GPU, multi-tensor: one kernel
// updates every average (in as few launches as there are groups of 96 tensors). Per element,
// the float operations of ModelEma::update's CPU loop (train/optim/ema.cpp), each rounded to f32
// and never fused into an FMA, so both devices give the same bits:
//
//   e = round(e * decay) + round(one_minus_decay * p)        (then the sum rounded)
//
// `skip` (device memory, may be nullptr): when *skip != 0 the kernel changes nothing, so that a
// step the device decided to skip (kernels/grad_norm.h, status[2]) leaves the averages alone
// without the host reading the decision.
#pragma once

#include <cstdint>

#include "kernels/stream.h"

namespace cnx::cuda {

// One parameter's average: n contiguous f32 elements in device memory; the two must not overlap.
struct EmaSlot {
  float* ema;          // (n) updated in place
  const float* param;  // (n)
  int64_t n;
};

// Updates every slot (any count; n == 0 skipped). `slots` is a host array read before the call
// returns; the update runs asynchronously on `stream`; no device memory is allocated.
void ema_update(const EmaSlot* slots, int64_t count, float decay, float one_minus_decay,
                const float* skip,  // () or nullptr: always update
                cudaStream_t stream);

}  // namespace cnx::cuda
