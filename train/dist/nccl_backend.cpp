// The CUDA ranks' BucketBackend: NCCL on a communication stream (train/dist/grad_reducer.h).
// Not written yet: this build refuses CUDA ranks with one line.
#include "tensor/error.h"
#include "train/dist/grad_reducer.h"

namespace cnx::dist {

bool built_with_nccl() { return false; }

std::unique_ptr<BucketBackend> make_nccl_backend(Communicator& comm, const Device& device) {
  (void)comm;
  fail("data-parallel training on ", device.str(), " needs NCCL, which this build has not");
}

}  // namespace cnx::dist
