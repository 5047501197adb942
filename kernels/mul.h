// Elementwise product: out = a * b;  da = dout * b,  db = dout * a.
#pragma once

#include <cstdint>

namespace cnx::cpu {

template <class T> void mul_forward(T* out, const T* a, const T* b, int64_t n);
// Writes each gradient whose pointer is non-null: da, db (n).
template <class T>
void mul_backward(T* da, T* db, const T* dout, const T* a, const T* b, int64_t n);

}  // namespace cnx::cpu
