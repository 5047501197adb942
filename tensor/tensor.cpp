#include "tensor/tensor.h"

#include <cmath>
#include <cstring>

#include "kernels/cast.h"
#include "tensor/cuda_context.h"
#include "tensor/cuda_memory.h"

namespace cnx {

namespace {

// Calls f(T{}) with T the C++ type of `dtype`.
template <class F>
void visit_dtype(DType dtype, F&& f) {
  switch (dtype) {
    case DType::f32: f(float{}); return;
    case DType::f64: f(double{}); return;
    case DType::bf16: f(bf16{}); return;
    case DType::f16: f(f16{}); return;
    case DType::i64: f(int64_t{}); return;
    case DType::i32: f(int32_t{}); return;
    case DType::u8: f(uint8_t{}); return;
  }
}

template <class T> T from_double(double v) {
  if constexpr (std::is_same_v<T, bf16> || std::is_same_v<T, f16>) return T(static_cast<float>(v));
  else return static_cast<T>(v);
}
template <class T> double to_double(T v) {
  if constexpr (std::is_same_v<T, bf16> || std::is_same_v<T, f16>)
    return static_cast<double>(static_cast<float>(v));
  else return static_cast<double>(v);
}

// Fills a host buffer of n elements of `dtype` with make(i) for i in [0, n), in order.
template <class Make>
void fill_host(void* dst, DType dtype, int64_t n, Make&& make) {
  visit_dtype(dtype, [&](auto tag) {
    using T = decltype(tag);
    T* p = static_cast<T*>(dst);
    for (int64_t i = 0; i < n; ++i) p[i] = from_double<T>(make(i));
  });
}

// Builds the tensor on the CPU with `make`, then moves it to `device`.
template <class Make>
Tensor make_tensor(const Shape& shape, DType dtype, Device device, Make&& make) {
  Tensor host = Tensor::empty(shape, dtype, Device::cpu());
  fill_host(host.raw_data(), dtype, host.numel(), make);
  return host.to(device);
}

}  // namespace

// ---- factories -------------------------------------------------------------------------------

Tensor Tensor::empty(const Shape& shape, DType dtype, Device device) {
  auto impl = std::make_shared<TensorImpl>();
  int64_t nbytes = 0;
  CNX_CHECK(!__builtin_mul_overflow(shape.numel(), dtype_size(dtype), &nbytes), "Tensor::empty: ",
            shape.str(), " ", dtype_name(dtype), " overflows a byte count");
  try {
    impl->storage = std::make_shared<Storage>(nbytes, device);
  } catch (const Error& e) {  // out of memory: say for which tensor
    fail("tensor ", shape.str(), " ", dtype_name(dtype), " on ", device.str(), ": ", e.what());
  }
  impl->shape = shape;
  impl->dtype = dtype;
  return Tensor(std::move(impl));
}

Tensor Tensor::zeros(const Shape& shape, DType dtype, Device device) {
  Tensor t = empty(shape, dtype, device);
  t.zero_();
  return t;
}

Tensor Tensor::ones(const Shape& shape, DType dtype, Device device) {
  return full(shape, 1.0, dtype, device);
}

Tensor Tensor::full(const Shape& shape, double value, DType dtype, Device device) {
  if (!device.is_cuda()) return make_tensor(shape, dtype, device, [&](int64_t) { return value; });
  // On a device, filled there from one element's bytes: no copy from the host, so that a CUDA
  // graph can capture it (the constants ops make, e.g. backward's seed of ones).
  uint64_t pattern = 0;
  fill_host(&pattern, dtype, 1, [&](int64_t) { return value; });
  Tensor t = empty(shape, dtype, device);
  cuda_fill(t.raw_data(), device, t.numel(), static_cast<int>(dtype_size(dtype)), pattern);
  return t;
}

Tensor Tensor::randn(const Shape& shape, Generator& gen, DType dtype, Device device, double mean,
                     double std) {
  return make_tensor(shape, dtype, device, [&](int64_t) { return mean + std * gen.normal(); });
}

Tensor Tensor::uniform(const Shape& shape, Generator& gen, double lo, double hi, DType dtype,
                       Device device) {
  return make_tensor(shape, dtype, device, [&](int64_t) { return gen.uniform(lo, hi); });
}

template <class T>
Tensor Tensor::from_data(const Shape& shape, std::span<const T> data, Device device) {
  CNX_CHECK(static_cast<int64_t>(data.size()) == shape.numel(), "Tensor::from_data: ", data.size(),
            " values for shape ", shape.str(), " (", shape.numel(), " elements)");
  Tensor t = empty(shape, dtype_of<T>(), device);
  copy_bytes(t.raw_data(), device, data.data(), Device::cpu(), t.nbytes());
  return t;
}

// ---- what it is ------------------------------------------------------------------------------

const TensorImpl& Tensor::checked() const {
  CNX_CHECK(impl_ != nullptr, "Tensor: use of an undefined tensor");
  return *impl_;
}

const Shape& Tensor::shape() const { return checked().shape; }
DType Tensor::dtype() const { return checked().dtype; }
Device Tensor::device() const { return checked().storage->device(); }

std::string Tensor::str() const {
  if (!defined()) return "undefined";
  return std::string(dtype_name(dtype())) + shape().str() + " " + device().str();
}

// ---- data ------------------------------------------------------------------------------------

void* Tensor::raw_data() {
  const TensorImpl& t = checked();
  return static_cast<char*>(t.storage->data()) + t.offset;
}
const void* Tensor::raw_data() const {
  const TensorImpl& t = checked();
  return static_cast<const char*>(t.storage->data()) + t.offset;
}

template <class T> T* Tensor::data() {
  CNX_CHECK(dtype() == dtype_of<T>(), "Tensor::data: tensor is ", str(), ", asked for ",
            dtype_name(dtype_of<T>()));
  return static_cast<T*>(raw_data());
}
template <class T> const T* Tensor::data() const {
  CNX_CHECK(dtype() == dtype_of<T>(), "Tensor::data: tensor is ", str(), ", asked for ",
            dtype_name(dtype_of<T>()));
  return static_cast<const T*>(raw_data());
}

template <class T> std::vector<T> Tensor::to_vector() const {
  CNX_CHECK(dtype() == dtype_of<T>(), "Tensor::to_vector: tensor is ", str(), ", asked for ",
            dtype_name(dtype_of<T>()));
  std::vector<T> v(static_cast<size_t>(numel()));
  copy_bytes(v.data(), Device::cpu(), raw_data(), device(), nbytes());
  return v;
}

double Tensor::item() const {
  CNX_CHECK(numel() == 1, "Tensor::item: tensor ", str(), " has ", numel(), " elements, not 1");
  Tensor h = to(Device::cpu());
  double v = 0;
  visit_dtype(dtype(), [&](auto tag) { v = to_double(*static_cast<const decltype(tag)*>(h.raw_data())); });
  return v;
}

// ---- new tensors and views -------------------------------------------------------------------

Tensor Tensor::view(const Shape& shape) const {
  CNX_CHECK(shape.numel() == numel(), "view: cannot view ", str(), " as ", shape.str(), " (",
            numel(), " vs ", shape.numel(), " elements)");
  auto impl = std::make_shared<TensorImpl>();
  impl->storage = checked().storage;
  impl->offset = checked().offset;
  impl->shape = shape;
  impl->dtype = dtype();
  return Tensor(std::move(impl));
}

Tensor Tensor::detach() const { return view(shape()); }

Tensor Tensor::clone() const {
  Tensor t = empty(shape(), dtype(), device());
  t.copy_from(*this);
  return t;
}

Tensor Tensor::to(Device device) const {
  if (device == this->device()) return *this;
  Tensor t = empty(shape(), dtype(), device);
  t.copy_from(*this);
  return t;
}

Tensor Tensor::to(DType dtype) const {
  if (dtype == this->dtype()) return *this;
  Tensor t = empty(shape(), dtype, device());
  if (device().is_cuda()) {  // f32 <-> bf16 only (mixed precision), on the library stream
    const bool to_bf16 = this->dtype() == DType::f32 && dtype == DType::bf16;
    const bool to_f32 = this->dtype() == DType::bf16 && dtype == DType::f32;
    CNX_CHECK(to_bf16 || to_f32, "to(", dtype_name(dtype), "): on a CUDA device only f32 <-> bf16 "
              "conversions exist, got ", str());
#if defined(CNX_CUDA) && CNX_CUDA
    cuda::DeviceGuard guard(device());
    const cudaStream_t stream = cuda::device_stream(device());
    if (to_bf16) cuda::cast(t.data<bf16>(), data<float>(), numel(), stream);
    else cuda::cast(t.data<float>(), data<bf16>(), numel(), stream);
#else
    fail("to(", dtype_name(dtype), "): ", str(),
         " is a CUDA tensor but this build has no CUDA backend");
#endif
    return t;
  }
  visit_dtype(this->dtype(), [&](auto tag) {
    using S = decltype(tag);
    const S* src = static_cast<const S*>(raw_data());
    fill_host(t.raw_data(), dtype, numel(), [&](int64_t i) { return to_double(src[i]); });
  });
  return t;
}

void Tensor::copy_from(const Tensor& src) {
  CNX_CHECK(src.shape() == shape() && src.dtype() == dtype(), "copy_from: destination ", str(),
            " and source ", src.str(), " differ in shape or dtype");
  copy_bytes(raw_data(), device(), src.raw_data(), src.device(), nbytes());
}

void Tensor::fill_(double value) { copy_from(full(shape(), value, dtype(), device())); }

void Tensor::zero_() { zero_bytes(raw_data(), device(), nbytes()); }

// ---- autograd --------------------------------------------------------------------------------

bool Tensor::requires_grad() const { return checked().requires_grad; }

Tensor& Tensor::set_requires_grad(bool on) {
  CNX_CHECK(!on || is_floating(dtype()), "set_requires_grad: ", str(),
            " is not a floating-point tensor");
  CNX_CHECK(is_leaf() || on, "set_requires_grad(false): ", str(),
            " is the output of an op; use detach()");
  impl_->requires_grad = on;
  return *this;
}

bool Tensor::is_leaf() const { return checked().grad_fn == nullptr; }

const Tensor& Tensor::grad() const { return checked().grad; }

void Tensor::set_grad(const Tensor& g) {
  CNX_CHECK(!g.defined() || g.shape() == shape(), "set_grad: gradient ", g.str(),
            " does not match tensor ", str());
  impl_->grad = g;
}

const std::shared_ptr<Function>& Tensor::grad_fn() const { return checked().grad_fn; }

// ---- explicit instantiations -----------------------------------------------------------------
#define CNX_INSTANTIATE(T)                                                                   \
  template Tensor Tensor::from_data<T>(const Shape&, std::span<const T>, Device);           \
  template T* Tensor::data<T>();                                                             \
  template const T* Tensor::data<T>() const;                                                 \
  template std::vector<T> Tensor::to_vector<T>() const;
CNX_INSTANTIATE(float)
CNX_INSTANTIATE(double)
CNX_INSTANTIATE(bf16)
CNX_INSTANTIATE(f16)
CNX_INSTANTIATE(int64_t)
CNX_INSTANTIATE(int32_t)
CNX_INSTANTIATE(uint8_t)
#undef CNX_INSTANTIATE

}  // namespace cnx
