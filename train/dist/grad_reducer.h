// Data-parallel gradient averaging, overlapped with the backward (what PyTorch DDP does).
//
// The parameters are cut into buckets of about 25 MB, in reverse order of the model's parameter
// list (the order in which the backward produces their gradients: the head first, the stem
// last). During the backward of a step's last micro-batch, the engine tells the reducer when
// each parameter's gradient is complete (Tensor::backward's on_grad_ready); once every gradient
// of a bucket is, and every bucket before it has started, the bucket's averaging starts:
//
//   CPU ranks   the gradients are packed into the bucket's flat buffer and MPI_Iallreduce sums
//               it while the backward goes on (each later hook also progresses MPI);
//   CUDA ranks  the communication stream waits for the compute stream, packs, and runs
//               ncclAllReduce (train/dist/nccl_backend.h); the compute stream never waits.
//
// finish() (after backward) waits for every bucket (on the GPU: the compute stream waits for the
// communication stream, the host does not) and writes the averages, sum / world size, back into
// the .grad tensors, in place. So the clip, AdamW and the EMA see the same gradients on every rank,
// and every rank keeps bitwise the same weights. The order of every sum depends only on the world
// size and the bucket layout: the reduction is deterministic for a fixed world size.
//
//   GradReducer reducer(comm, model.parameters(), device);
//   for (micro-batch m of the step) {
//     if (m is the last) loss.backward(reducer.hook()); else loss.backward();
//   }
//   reducer.finish();                 // gradients averaged over the ranks
//   reducer.average(step_loss);       // a small tensor averaged in place (the logged loss)
#pragma once

#include <cstddef>
#include <functional>
#include <memory>
#include <unordered_map>
#include <vector>

#include "models/convnext.h"
#include "tensor/tensor.h"
#include "train/dist/communicator.h"

namespace cnx::dist {

constexpr size_t kDefaultBucketBytes = size_t{25} << 20;  // PyTorch DDP's bucket_cap_mb

// One bucket: parameters whose gradients are averaged in one collective.
struct Bucket {
  std::vector<Parameter*> params;  // in the order they are packed
  std::vector<int64_t> offsets;    // of each parameter's gradient in the flat buffer (elements)
  int64_t numel = 0;               // of the flat buffer
  int ready = 0;                   // gradients complete in this step
  bool started = false;
  // How many gradients of the whole model the backward had announced when this bucket started
  // in the last step (-1: finish() started it): the overlap, observable.
  int announced_at_start = -1;
};

// How a bucket is averaged: MPI on host memory (CPU ranks) or NCCL on a stream (CUDA ranks).
class BucketBackend {
 public:
  virtual ~BucketBackend() = default;
  // Starts averaging bucket `index` (its gradients are complete): pack, sum over the ranks.
  virtual void start(size_t index, const Bucket& bucket) = 0;
  // Lets started collectives progress (called from each gradient hook); may do nothing.
  virtual void progress() {}
  // Every started bucket summed, divided by the world size, unpacked into the gradients.
  virtual void finish(const std::vector<Bucket>& buckets) = 0;
  // A small f32 tensor (a loss) replaced by its mean over the ranks, ordered after the work
  // queued before it (CPU: at once).
  virtual void average(Tensor& t) = 0;
};

// CPU ranks: MPI_Iallreduce on host buffers.
std::unique_ptr<BucketBackend> make_mpi_backend(Communicator& comm);
// CUDA ranks: NCCL on a communication stream of `device` (train/dist/nccl_backend.cpp). Throws
// when the build has no NCCL.
std::unique_ptr<BucketBackend> make_nccl_backend(Communicator& comm, const Device& device);
// Whether make_nccl_backend can work in this build.
bool built_with_nccl();

class GradReducer {
 public:
  // params: the model's parameters (all f32, on `device`); their order defines the buckets,
  // the same on every rank.
  GradReducer(Communicator& comm, std::vector<Parameter>& params, const Device& device,
              size_t bucket_bytes = kDefaultBucketBytes);
  ~GradReducer();

  // The hook for the backward of the step's last micro-batch.
  std::function<void(TensorImpl*)> hook();
  // After that backward: starts what has not started (every gradient must exist: a parameter
  // without one is an error), waits, writes the averages into the gradients.
  void finish();
  // `t` (a one-element f32 tensor, e.g. the step's loss) becomes its mean over the ranks.
  void average(Tensor& t);

  const std::vector<Bucket>& buckets() const { return buckets_; }
  // "3 buckets of 25 MB (ConvNeXt-T: ...)" for the start-up line.
  std::string describe() const;

 private:
  void on_ready(TensorImpl* leaf);
  void start_ready_buckets();

  Communicator& comm_;
  std::vector<Bucket> buckets_;
  std::unordered_map<TensorImpl*, size_t> bucket_of_;  // parameter value -> bucket
  size_t next_to_start_ = 0;
  int announced_ = 0;  // gradients announced by the hook in this step
  std::unique_ptr<BucketBackend> backend_;
};

}  // namespace cnx::dist
