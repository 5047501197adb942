// Argument checks shared by the ops. Each throws cnx::Error with a message that starts with
// the op's name and shows the tensors involved as dtype[shape] device, e.g.
//   "linear: weight f32[5, 3] cpu must have 4 columns, the last dimension of x f32[2, 4] cpu"
#pragma once

#include <initializer_list>
#include <string>
#include <utility>

#include "tensor/tensor.h"

namespace cnx::check {

inline void defined(const char* op, const char* name, const Tensor& t) {
  CNX_CHECK(t.defined(), op, ": ", name, " is undefined");
}

inline void rank(const char* op, const char* name, const Tensor& t, int r) {
  defined(op, name, t);
  CNX_CHECK(t.rank() == r, op, ": ", name, " ", t.str(), " must have rank ", r);
}

inline void min_rank(const char* op, const char* name, const Tensor& t, int r) {
  defined(op, name, t);
  CNX_CHECK(t.rank() >= r, op, ": ", name, " ", t.str(), " must have rank ", r, " or more");
}

// t must have exactly `expected`; `why` says where the expectation comes from.
inline void shape(const char* op, const char* name, const Tensor& t, const Shape& expected,
                  const std::string& why) {
  defined(op, name, t);
  CNX_CHECK(t.shape() == expected, op, ": ", name, " ", t.str(), " must have shape ",
            expected.str(), " (", why, ")");
}

inline void floating(const char* op, const char* name, const Tensor& t) {
  defined(op, name, t);
  CNX_CHECK(t.dtype() == DType::f32 || t.dtype() == DType::f64, op, ": ", name, " ", t.str(),
            " must be f32 or f64");
}

// An activation of an op that also runs in mixed precision: f32, f64 or bf16.
inline void activation(const char* op, const char* name, const Tensor& t) {
  defined(op, name, t);
  CNX_CHECK(t.dtype() == DType::f32 || t.dtype() == DType::f64 || t.dtype() == DType::bf16, op,
            ": ", name, " ", t.str(), " must be f32, f64 or bf16");
}

// Every defined tensor in `params` is a parameter of the op whose activation is `x`: dtype
// param_dtype(x) (fp32 for bf16 activations, else x's own) and x's device.
inline void params(const char* op, std::pair<const char*, const Tensor&> x,
                   std::initializer_list<std::pair<const char*, const Tensor&>> params) {
  const DType want = param_dtype(x.second.dtype());
  for (const auto& [name, t] : params) {
    if (!t.defined()) continue;
    CNX_CHECK(t.dtype() == want, op, ": ", name, " ", t.str(), " must be ", dtype_name(want),
              " for ", x.first, " ", x.second.str());
    CNX_CHECK(t.device() == x.second.device(), op, ": ", name, " ", t.str(), " and ", x.first,
              " ", x.second.str(), " are on different devices");
  }
}

// Every defined tensor in `others` has the dtype and the device of `ref`.
inline void same_kind(const char* op, std::pair<const char*, const Tensor&> ref,
                      std::initializer_list<std::pair<const char*, const Tensor&>> others) {
  for (const auto& [name, t] : others) {
    if (!t.defined()) continue;
    CNX_CHECK(t.dtype() == ref.second.dtype(), op, ": ", name, " ", t.str(), " and ", ref.first,
              " ", ref.second.str(), " differ in dtype");
    CNX_CHECK(t.device() == ref.second.device(), op, ": ", name, " ", t.str(), " and ", ref.first,
              " ", ref.second.str(), " are on different devices");
  }
}

// The weight operand of a GEMM op (linear, patchify_conv) in x's dtype: the fp32 parameter
// itself, or, for a bf16 x, its bf16 copy, detached (no tape: the gradient goes to the fp32
// weight directly, as fp32). A precomputed copy (the optimiser's, kept equal to the cast, see
// AdamW::keep_bf16_copies) saves the cast; it is only a cheaper way to the same operand, and is
// checked to be one: bf16, weight's shape and device.
inline Tensor gemm_weight_operand(const char* op, const Tensor& x, const Tensor& weight,
                                  const Tensor& weight_bf16) {
  if (x.dtype() != DType::bf16) return weight;
  if (!weight_bf16.defined()) return weight.detach().to(DType::bf16);
  CNX_CHECK(weight_bf16.dtype() == DType::bf16 && weight_bf16.shape() == weight.shape() &&
                weight_bf16.device() == weight.device(),
            op, ": weight_bf16 ", weight_bf16.str(), " must be the bf16 copy of weight ",
            weight.str(), " (bf16, same shape and device)");
  return weight_bf16.detach();
}

}  // namespace cnx::check
