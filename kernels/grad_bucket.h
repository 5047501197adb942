// The data-parallel gradient buckets on the GPU (train/dist/nccl_backend.cpp): a bucket's
// gradients copied into one flat f32 buffer before the all-reduce (pack), and the summed buffer
// scaled by 1 / world size and copied back into the gradients after it (unpack). Multi-tensor:
// one launch moves up to 96 gradients, however many buckets the model has.
//
//   pack     flat[i] = grad[i]                       for every slot, i < n
//   unpack   grad[i] = round(flat[i] * scale)        (one f32 multiply, never fused)
//
// The unpack's arithmetic is the CPU ranks' (train/dist/grad_reducer.cpp, MpiBackend::finish:
// `src[j] * inv` with inv = 1.0f / world size), so both backends turn the same sum into the same
// average, bit for bit. Nothing is saved: these are copies, outside autograd.
#pragma once

#include <cstdint>

#include "kernels/stream.h"

namespace cnx::cuda {

// One gradient of a bucket: n contiguous f32 elements at grad, and its place in the bucket's
// flat buffer (flat = the buffer + the gradient's offset), so that one launch can serve the slots
// of several buckets. A slot may alias its flat range exactly (grad == flat: unpack then scales
// in place; averaging a loss uses that); otherwise the two must not overlap.
struct BucketSlot {
  float* grad;  // (n)
  float* flat;  // (n) inside the bucket's buffer
  int64_t n;
};

// slot.flat[i] = slot.grad[i] for every slot (any count; n == 0 skipped). `slots` is a host
// array read before the call returns; the copies run asynchronously on `stream`.
void bucket_pack(const BucketSlot* slots, int64_t count, cudaStream_t stream);

// slot.grad[i] = slot.flat[i] * scale for every slot, asynchronously on `stream`.
void bucket_unpack(const BucketSlot* slots, int64_t count, float scale, cudaStream_t stream);

}  // namespace cnx::cuda
