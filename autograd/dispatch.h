// Picks the kernel for a tensor's device and dtype.
//
//   dispatch("gelu", x,
//       [&](auto tag) {                                   // CPU: T is float or double
//         using T = decltype(tag);
//         cpu::gelu_forward<T>(y.data<T>(), x.data<T>(), x.numel());
//       },
//       [&](auto stream) {                                // CUDA, f32: the device's stream
//         cuda::gelu_forward(y.data<float>(), x.data<float>(), x.numel(), stream);
//       });
//
// CPU tensors run the reference kernels (templates on float and double). CUDA tensors run the
// cnx::cuda launchers, f32 only: the tensor's device is made current for the call and the
// lambda gets that device's library stream (tensor/cuda_context.h), on which everything of the
// library is enqueued. Any other dtype, on either device, is a cnx::Error naming the op and the
// tensor.
//
// Ops that also take bf16 activations (mixed precision, --use_amp) use dispatch_with_bf16: the
// CPU lambda is called with float, double or bf16 (the CPU's bf16 kernels compute in float and
// round each stored value: the reference for the GPU's), and the CUDA lambda with a tag too,
// float or bf16, and the stream:
//
//   dispatch_with_bf16("gelu", x,
//       [&](auto tag) { using T = decltype(tag); cpu::gelu_forward<T>(...); },
//       [&](auto tag, auto stream) { using T = decltype(tag); cuda::gelu_forward<T>(..., stream); });
//
// Parameters of such an op are param_t<T> (tensor/dtype.h): fp32 when T is bf16.
//
// The CUDA lambda is generic ([&](auto stream)) on purpose: a CPU-only build has no definitions
// of the cnx::cuda launchers, and there the lambda is never instantiated, so nothing refers to
// them.
#pragma once

#include "kernels/stream.h"
#include "tensor/cuda_context.h"
#include "tensor/tensor.h"

namespace cnx {

namespace detail {

// Runs cuda_kernel on t's device with its stream, as cuda_kernel(stream) (kWithTag false) or
// cuda_kernel(tag, stream) with tag float or bf16 (kWithTag true).
template <bool kWithTag, class CudaKernel>
void run_cuda(const char* op, const Tensor& t, CudaKernel& cuda_kernel) {
  if constexpr (kWithTag) {
    CNX_CHECK(t.dtype() == DType::f32 || t.dtype() == DType::bf16, op,
              ": the CUDA backend supports f32 and bf16, got ", t.str());
  } else {
    CNX_CHECK(t.dtype() == DType::f32, op, ": the CUDA backend supports f32 only for this op, got ",
              t.str());
  }
#if defined(CNX_CUDA) && CNX_CUDA
  cuda::DeviceGuard guard(t.device());
  const cudaStream_t stream = cuda::device_stream(t.device());
  if constexpr (kWithTag) {
    if (t.dtype() == DType::bf16) cuda_kernel(bf16{}, stream);
    else cuda_kernel(float{}, stream);
  } else {
    cuda_kernel(stream);
  }
#else
  (void)cuda_kernel;  // never instantiated with launcher calls in a CPU-only build
  fail(op, ": ", t.str(), " is a CUDA tensor but this build has no CUDA backend");
#endif
}

}  // namespace detail

template <class CpuKernel, class CudaKernel>
void dispatch(const char* op, const Tensor& t, CpuKernel&& cpu_kernel, CudaKernel&& cuda_kernel) {
  if (t.device().is_cuda()) return detail::run_cuda<false>(op, t, cuda_kernel);
  switch (t.dtype()) {
    case DType::f32: cpu_kernel(float{}); return;
    case DType::f64: cpu_kernel(double{}); return;
    default: fail(op, ": dtype ", dtype_name(t.dtype()), " is not supported (f32, f64): ", t.str());
  }
}

template <class CpuKernel, class CudaKernel>
void dispatch_with_bf16(const char* op, const Tensor& t, CpuKernel&& cpu_kernel,
                        CudaKernel&& cuda_kernel) {
  if (t.device().is_cuda()) return detail::run_cuda<true>(op, t, cuda_kernel);
  switch (t.dtype()) {
    case DType::f32: cpu_kernel(float{}); return;
    case DType::f64: cpu_kernel(double{}); return;
    case DType::bf16: cpu_kernel(bf16{}); return;
    default:
      fail(op, ": dtype ", dtype_name(t.dtype()), " is not supported (f32, f64, bf16): ", t.str());
  }
}

// A device scratch buffer for a CUDA launcher's `workspace` argument: `floats` f32 elements on
// `device`, from the caching allocator (undefined data; a 0-element tensor when none is needed,
// whose data pointer is null). Keep it alive until the launcher has been called: freeing it
// after that is safe (the next user of the block is enqueued after the launcher's kernels).
inline Tensor cuda_workspace(int64_t floats, Device device) {
  return Tensor::empty(Shape{floats}, DType::f32, device);
}

// Typed data pointer of an optional tensor: nullptr when undefined.
template <class T> T* ptr_or_null(Tensor& t) { return t.defined() ? t.data<T>() : nullptr; }
template <class T> const T* ptr_or_null(const Tensor& t) {
  return t.defined() ? t.data<T>() : nullptr;
}

}  // namespace cnx
