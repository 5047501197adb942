// GradReducer: the buckets and their order; the CPU ranks' backend (MPI).
#include "train/dist/grad_reducer.h"

#include <cstdio>
#include <cstring>

#include "tensor/error.h"

namespace cnx::dist {

namespace {

// CPU ranks: each bucket's gradients are packed into a host buffer and summed in place by
// MPI_Iallreduce while the backward goes on; finish() waits, divides by the world size and
// copies the averages back.
class MpiBackend final : public BucketBackend {
 public:
  explicit MpiBackend(Communicator& comm) : comm_(comm) {}

  void start(size_t index, const Bucket& b) override {
    if (flat_.size() <= index) {
      flat_.resize(index + 1);
      requests_.resize(index + 1);
    }
    std::vector<float>& flat = flat_[index];
    flat.resize(static_cast<size_t>(b.numel));
    for (size_t i = 0; i < b.params.size(); ++i) {
      const Tensor& g = b.params[i]->value.grad();
      std::memcpy(flat.data() + b.offsets[i], g.data<float>(), static_cast<size_t>(g.nbytes()));
    }
    requests_[index] = comm_.iallreduce_sum(flat);
  }

  // MPI progresses a non-blocking collective only inside MPI calls (without a progress
  // thread): a test now and then keeps the buckets moving during the backward.
  void progress() override {
    for (Request& r : requests_) r.test();
  }

  void finish(const std::vector<Bucket>& buckets) override {
    const float inv = 1.0f / static_cast<float>(comm_.size());
    for (size_t k = 0; k < buckets.size(); ++k) {
      requests_[k].wait();
      const Bucket& b = buckets[k];
      const float* flat = flat_[k].data();
      for (size_t i = 0; i < b.params.size(); ++i) {
        Tensor g = b.params[i]->value.grad();
        float* dst = g.data<float>();
        const float* src = flat + b.offsets[i];
        for (int64_t j = 0; j < g.numel(); ++j) dst[j] = src[j] * inv;
      }
    }
  }

  void average(Tensor& t) override {
    CNX_CHECK(t.dtype() == DType::f32 && t.device().is_cpu(), "average: needs an f32 CPU tensor, got ", t.str());
    float* v = t.data<float>();
    comm_.allreduce_sum(std::span<float>(v, static_cast<size_t>(t.numel())));
    const float inv = 1.0f / static_cast<float>(comm_.size());
    for (int64_t j = 0; j < t.numel(); ++j) v[j] *= inv;
  }

 private:
  Communicator& comm_;
  std::vector<std::vector<float>> flat_;  // one per bucket, kept from step to step
  std::vector<Request> requests_;
};

}  // namespace

std::unique_ptr<BucketBackend> make_mpi_backend(Communicator& comm) { return std::make_unique<MpiBackend>(comm); }

GradReducer::GradReducer(Communicator& comm, std::vector<Parameter>& params, const Device& device,
                         size_t bucket_bytes)
    : comm_(comm) {
  CNX_CHECK(bucket_bytes > 0, "GradReducer: the bucket size must be positive");
  // Reverse order: the backward produces the last layers' gradients first.
  Bucket b;
  size_t bytes = 0;
  for (auto it = params.rbegin(); it != params.rend(); ++it) {
    Parameter& p = *it;
    CNX_CHECK(p.value.dtype() == DType::f32 && p.value.device() == device, "GradReducer: ", p.name, " is ",
              p.value.str(), ", not f32 on ", device.str());
    b.offsets.push_back(b.numel);
    b.params.push_back(&p);
    b.numel += p.value.numel();
    bytes += static_cast<size_t>(p.value.nbytes());
    if (bytes >= bucket_bytes) {
      buckets_.push_back(std::move(b));
      b = Bucket();
      bytes = 0;
    }
  }
  if (!b.params.empty()) buckets_.push_back(std::move(b));
  for (size_t k = 0; k < buckets_.size(); ++k)
    for (Parameter* p : buckets_[k].params) bucket_of_[p->value.impl()] = k;
  backend_ = device.is_cuda() ? make_nccl_backend(comm, device) : make_mpi_backend(comm);
}

GradReducer::~GradReducer() = default;

std::function<void(TensorImpl*)> GradReducer::hook() {
  return [this](TensorImpl* leaf) { on_ready(leaf); };
}

void GradReducer::on_ready(TensorImpl* leaf) {
  const auto it = bucket_of_.find(leaf);
  if (it == bucket_of_.end()) return;  // a leaf that is not a parameter (an input)
  Bucket& b = buckets_[it->second];
  CNX_CHECK(!b.started, "GradReducer: a gradient of an already reduced bucket changed during the backward");
  ++b.ready;
  ++announced_;
  start_ready_buckets();
  backend_->progress();
}

// Buckets start in index order only, so every rank issues its collectives in the same order
// whatever order the gradients arrive in.
void GradReducer::start_ready_buckets() {
  while (next_to_start_ < buckets_.size()) {
    Bucket& b = buckets_[next_to_start_];
    if (b.ready < static_cast<int>(b.params.size())) return;
    b.started = true;
    b.announced_at_start = announced_;
    backend_->start(next_to_start_, b);
    ++next_to_start_;
  }
}

void GradReducer::finish() {
  // Gradients the hook did not announce (a backward run without it): every one must exist.
  for (Bucket& b : buckets_) {
    if (b.started) continue;
    b.announced_at_start = -1;
    for (Parameter* p : b.params)
      CNX_CHECK(p->value.grad().defined(), "GradReducer: ", p->name, " has no gradient to average");
    b.ready = static_cast<int>(b.params.size());
  }
  start_ready_buckets();
  backend_->finish(buckets_);
  for (Bucket& b : buckets_) {
    b.ready = 0;
    b.started = false;
  }
  next_to_start_ = 0;
  announced_ = 0;
}

void GradReducer::average(Tensor& t) { backend_->average(t); }

std::string GradReducer::describe() const {
  int64_t numel = 0;
  for (const Bucket& b : buckets_) numel += b.numel;
  char line[160];
  std::snprintf(line, sizeof(line), "%zu gradient bucket%s (%.1f MB in all) averaged over %d ranks", buckets_.size(),
                buckets_.size() == 1 ? "" : "s", static_cast<double>(numel) * 4.0 / 1e6, comm_.size());
  return line;
}

}  // namespace cnx::dist
