// Tensor: a shape, a dtype, a device and a view on shared, contiguous storage, plus the
// autograd metadata (requires_grad, the accumulated .grad, and grad_fn, the Function that
// produced it).
//
// A Tensor is a cheap handle (a shared_ptr to TensorImpl): copying a Tensor aliases it, as in
// PyTorch. Storage is always contiguous and row-major; images are NHWC.
//
//   cnx::Generator gen(0);
//   auto x = cnx::Tensor::randn({2, 8, 8, 3}, gen);         // (N, H, W, C), f32 on the CPU
//   auto w = cnx::Tensor::zeros({5, 3}).set_requires_grad(true);
//   auto y = cnx::linear(x, w, {});                          // autograd op (autograd/ops.h)
//   cnx::sum(y).backward();                                  // w.grad() is now defined
#pragma once

#include <cstdint>
#include <functional>
#include <memory>
#include <span>
#include <string>
#include <vector>

#include "tensor/device.h"
#include "tensor/dtype.h"
#include "tensor/error.h"
#include "tensor/generator.h"
#include "tensor/shape.h"
#include "tensor/storage.h"

namespace cnx {

class Function;  // autograd/function.h
struct TensorImpl;

class Tensor {
 public:
  Tensor() = default;  // undefined: no storage; used for "no tensor" (an absent bias, no grad)

  // ---- factories -----------------------------------------------------------------------------
  static Tensor empty(const Shape& shape, DType dtype = DType::f32, Device device = Device::cpu());
  static Tensor zeros(const Shape& shape, DType dtype = DType::f32, Device device = Device::cpu());
  static Tensor ones(const Shape& shape, DType dtype = DType::f32, Device device = Device::cpu());
  static Tensor full(const Shape& shape, double value, DType dtype = DType::f32,
                     Device device = Device::cpu());
  // Standard normal * std + mean, drawn in row-major order from `gen`.
  static Tensor randn(const Shape& shape, Generator& gen, DType dtype = DType::f32,
                      Device device = Device::cpu(), double mean = 0.0, double std = 1.0);
  // Uniform in [lo, hi), drawn in row-major order from `gen`.
  static Tensor uniform(const Shape& shape, Generator& gen, double lo = 0.0, double hi = 1.0,
                        DType dtype = DType::f32, Device device = Device::cpu());
  // A copy of host data; the dtype is T's. data.size() must equal shape.numel().
  template <class T>
  static Tensor from_data(const Shape& shape, std::span<const T> data, Device device = Device::cpu());
  template <class T>
  static Tensor from_data(const Shape& shape, const std::vector<T>& data, Device device = Device::cpu()) {
    return from_data<T>(shape, std::span<const T>(data), device);
  }

  // ---- what it is ----------------------------------------------------------------------------
  bool defined() const { return impl_ != nullptr; }
  const Shape& shape() const;
  int rank() const { return shape().rank(); }
  int64_t dim(int i) const { return shape()[i]; }
  int64_t numel() const { return shape().numel(); }
  DType dtype() const;
  Device device() const;
  int64_t nbytes() const { return numel() * dtype_size(dtype()); }
  std::string str() const;  // "f32[2, 3] cpu"

  // ---- data ----------------------------------------------------------------------------------
  // Typed pointer to the first element (host or device memory). Throws if T is not the dtype.
  template <class T> T* data();
  template <class T> const T* data() const;
  void* raw_data();
  const void* raw_data() const;
  // A host copy of the elements; T must be the dtype.
  template <class T> std::vector<T> to_vector() const;
  // The single element of a one-element floating tensor, as double (copies from the device).
  double item() const;

  // ---- new tensors and views -----------------------------------------------------------------
  // A view with another shape of the same numel, sharing storage. Not recorded by autograd:
  // for a differentiable reshape use cnx::reshape (autograd/ops.h).
  Tensor view(const Shape& shape) const;
  Tensor clone() const;                 // deep copy, same device and dtype, no autograd history
  Tensor to(Device device) const;       // copy to another device (or this tensor if same)
  Tensor to(DType dtype) const;         // any two dtypes on the CPU, f32 <-> bf16 on CUDA; floats round to nearest even
  void copy_from(const Tensor& src);    // same shape and dtype, any devices
  void fill_(double value);
  void zero_();

  // ---- autograd ------------------------------------------------------------------------------
  bool requires_grad() const;
  // Marks a leaf tensor as a parameter/input whose gradient backward() should accumulate.
  Tensor& set_requires_grad(bool on = true);
  bool is_leaf() const;                 // no grad_fn
  const Tensor& grad() const;           // the accumulated gradient; undefined until backward
  void set_grad(const Tensor& g);       // replace (undefined clears it)
  const std::shared_ptr<Function>& grad_fn() const;
  // Same storage, no autograd history, requires_grad false.
  Tensor detach() const;
  // Reverse-mode: d(this)/d(leaf) accumulated (+=) into every leaf that requires grad.
  // This tensor must hold one element. Frees the graph's saved tensors afterwards.
  void backward() const;
  // The same, calling on_grad_ready(leaf) as soon as a leaf's gradient is complete (the last
  // op that uses it has added its part), while the rest of the backward still runs: the
  // data-parallel gradient buckets start their allreduce there (train/dist/grad_reducer.h).
  void backward(const std::function<void(TensorImpl* leaf)>& on_grad_ready) const;

  TensorImpl* impl() const { return impl_.get(); }
  const std::shared_ptr<TensorImpl>& impl_ptr() const { return impl_; }
  explicit Tensor(std::shared_ptr<TensorImpl> impl) : impl_(std::move(impl)) {}

 private:
  const TensorImpl& checked() const;
  std::shared_ptr<TensorImpl> impl_;
};

struct TensorImpl {
  std::shared_ptr<Storage> storage;
  int64_t offset = 0;  // in bytes from the start of storage
  Shape shape;
  DType dtype = DType::f32;

  // autograd
  bool requires_grad = false;
  Tensor grad;                        // accumulated by backward() on leaves
  std::shared_ptr<Function> grad_fn;  // the op that produced this tensor (null on a leaf)
};

}  // namespace cnx
