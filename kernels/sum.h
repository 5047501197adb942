// Sum of all elements: out[0] = sum_i in[i] (accumulated in double);  din[i] = dout[0].
#pragma once

#include <cstdint>

namespace cnx::cpu {

template <class T> void sum_forward(T* out, const T* in, int64_t n);
template <class T> void sum_backward(T* din, const T* dout, int64_t n);

}  // namespace cnx::cpu
