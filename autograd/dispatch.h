// Picks the kernel for a tensor's device and dtype.
//
//   dispatch("gelu", x, [&](auto tag) {
//     using T = decltype(tag);                       // float or double
//     cpu::gelu_forward<T>(y.data<T>(), x.data<T>(), x.numel());
//   });
//
// The CPU reference kernels are templates on float and double. CUDA kernels are added here
// by the CUDA backend; until then a CUDA tensor gets a clear error.
#pragma once

#include "tensor/tensor.h"

namespace cnx {

template <class CpuKernel>
void dispatch(const char* op, const Tensor& t, CpuKernel&& cpu_kernel) {
  CNX_CHECK(t.device().is_cpu(), op, ": no CUDA kernel in this build yet for ", t.str());
  switch (t.dtype()) {
    case DType::f32: cpu_kernel(float{}); return;
    case DType::f64: cpu_kernel(double{}); return;
    default: fail(op, ": dtype ", dtype_name(t.dtype()), " is not supported (f32, f64): ", t.str());
  }
}

// Typed data pointer of an optional tensor: nullptr when undefined.
template <class T> T* ptr_or_null(Tensor& t) { return t.defined() ? t.data<T>() : nullptr; }
template <class T> const T* ptr_or_null(const Tensor& t) {
  return t.defined() ? t.data<T>() : nullptr;
}

}  // namespace cnx
