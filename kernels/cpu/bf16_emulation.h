// bf16 on the CPU: the reference for the mixed-precision CUDA kernels.
//
// The CUDA bf16 kernels read bf16 activations, compute in fp32 and round each stored value once
// to bf16 (round to nearest even); parameters, statistics and parameter gradients stay fp32.
// A CPU bf16 kernel does the same with the f32 reference kernel in the middle:
//
//   template <> void gelu_forward<bf16>(bf16* out, const bf16* in, int64_t n) {
//     const Widened x(in, n);        // bf16 -> float, exact
//     Narrowed y(out, n);            // float scratch for the result
//     gelu_forward<float>(y.data(), x.data(), n);
//     y.store();                     // float -> bf16, rounded once
//   }
//
// The CPU's bf16 path is for tests and for checking the numerics of mixed precision (it is
// slower than f32 on the CPU: two extra passes). Null pointers stay null: an operand that is not
// read (or a gradient that is not wanted) widens to a null float pointer, and storing a Narrowed
// of a null destination does nothing.
#pragma once

#include <cstdint>
#include <vector>

#include "tensor/dtype.h"

namespace cnx::cpu {

// A float copy of n bf16 values (exact: every bf16 is a float).
class Widened {
 public:
  Widened(const bf16* src, int64_t n) {
    if (!src) return;
    v_.resize(static_cast<size_t>(n));
    for (int64_t i = 0; i < n; ++i) v_[static_cast<size_t>(i)] = static_cast<float>(src[i]);
    ptr_ = v_.data();
  }
  const float* data() const { return ptr_; }

 private:
  std::vector<float> v_;
  const float* ptr_ = nullptr;
};

// A float copy of n fp32 values, each rounded to bf16 (and so exact in float): an fp32 parameter
// that a bf16 op uses in bf16, as autocast casts it (the bias of linear and patchify_conv, which
// the GPU's GEMM epilogue reads in the output's type). Null stays null.
class RoundedToBf16 {
 public:
  RoundedToBf16(const float* src, int64_t n) {
    if (!src) return;
    v_.resize(static_cast<size_t>(n));
    for (int64_t i = 0; i < n; ++i) v_[static_cast<size_t>(i)] = static_cast<float>(bf16(src[i]));
    ptr_ = v_.data();
  }
  const float* data() const { return ptr_; }

 private:
  std::vector<float> v_;
  const float* ptr_ = nullptr;
};

// Float scratch for n results that store() rounds into the bf16 destination.
class Narrowed {
 public:
  Narrowed(bf16* dst, int64_t n) : dst_(dst) {
    if (!dst) return;
    v_.resize(static_cast<size_t>(n));
    ptr_ = v_.data();
  }
  float* data() { return ptr_; }
  void store() const {
    if (!dst_) return;
    for (size_t i = 0; i < v_.size(); ++i) dst_[i] = bf16(v_[i]);
  }

 private:
  bf16* dst_;
  std::vector<float> v_;
  float* ptr_ = nullptr;
};

}  // namespace cnx::cpu
