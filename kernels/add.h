// Elementwise addition: the residual connection, and gradient accumulation.
//
//   out = a + b          (backward: da = dout, db = dout; no kernel needed)
//   dst += src           (add_inplace)
#pragma once

#include <cstdint>

namespace cnx::cpu {

template <class T> void add_forward(T* out, const T* a, const T* b, int64_t n);
template <class T> void add_inplace(T* dst, const T* src, int64_t n);

}  // namespace cnx::cpu
