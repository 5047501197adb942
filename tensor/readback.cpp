// Readback (tensor/readback.h): the CPU side, and the dispatch to the CUDA side in readback.cu.
#include "tensor/readback.h"

#include <cstring>

#include "tensor/error.h"

namespace cnx {

namespace detail {
// The CUDA side (readback.cu): a page-locked slot and its event, from the pool.
struct PinnedSlot;
PinnedSlot* acquire_pinned_slot();
void release_pinned_slot(PinnedSlot* slot) noexcept;  // waits for its copy first
void* pinned_slot_data(PinnedSlot* slot);
// Enqueues the copy of nbytes from device memory src on device's stream, then the slot's event.
void start_readback(PinnedSlot* slot, const void* src, Device device, int64_t nbytes);
bool readback_ready(PinnedSlot* slot);
void wait_readback(PinnedSlot* slot);
}  // namespace detail

struct Readback::Impl {
  Shape shape;
  DType dtype = DType::f32;
  int64_t nbytes = 0;
  Tensor host;                              // a CPU source's copy
  detail::PinnedSlot* slot = nullptr;       // a CUDA source's page-locked slot
  Impl() = default;
  Impl(const Impl&) = delete;
  Impl& operator=(const Impl&) = delete;
  ~Impl() {
    if (slot) detail::release_pinned_slot(slot);
  }
};

Readback::Readback(const Tensor& t) {
  CNX_CHECK(t.defined(), "Readback: the tensor is undefined");
  CNX_CHECK(t.nbytes() <= kMaxBytes, "Readback: ", t.str(), " has ", t.nbytes(),
            " bytes, more than the ", kMaxBytes, " a Readback takes (use Tensor::to for large tensors)");
  auto impl = std::make_shared<Impl>();
  impl->shape = t.shape();
  impl->dtype = t.dtype();
  impl->nbytes = t.nbytes();
  if (t.device().is_cpu()) {
    impl->host = t.clone();
  } else {
    impl->slot = detail::acquire_pinned_slot();
    detail::start_readback(impl->slot, t.raw_data(), t.device(), t.nbytes());
  }
  impl_ = std::move(impl);
}

bool Readback::ready() const {
  CNX_CHECK(impl_, "Readback::ready: nothing was read back");
  return impl_->slot == nullptr || detail::readback_ready(impl_->slot);
}

Tensor Readback::wait() const {
  CNX_CHECK(impl_, "Readback::wait: nothing was read back");
  if (!impl_->slot) return impl_->host;
  detail::wait_readback(impl_->slot);
  Tensor out = Tensor::empty(impl_->shape, impl_->dtype, Device::cpu());
  std::memcpy(out.raw_data(), detail::pinned_slot_data(impl_->slot), static_cast<size_t>(impl_->nbytes));
  return out;
}

#if !(defined(CNX_CUDA) && CNX_CUDA)
// A CPU-only build: no CUDA tensor exists, so none of these is reached.
namespace detail {
struct PinnedSlot {};
PinnedSlot* acquire_pinned_slot() { fail("Readback: this build has no CUDA backend"); }
void release_pinned_slot(PinnedSlot*) noexcept {}
void* pinned_slot_data(PinnedSlot*) { return nullptr; }
void start_readback(PinnedSlot*, const void*, Device, int64_t) { fail("Readback: this build has no CUDA backend"); }
bool readback_ready(PinnedSlot*) { return true; }
void wait_readback(PinnedSlot*) {}
}  // namespace detail
#endif

}  // namespace cnx
