// CPU reference: sum of all elements (see kernels/sum.h).
#include "kernels/sum.h"

namespace cnx::cpu {

// ================================ forward ================================
template <class T> void sum_forward(T* out, const T* in, int64_t n) {
  double acc = 0;  // serial, in double: a fixed order, so the result is reproducible
  for (int64_t i = 0; i < n; ++i) acc += static_cast<double>(in[i]);
  out[0] = static_cast<T>(acc);
}

// ================================ backward ================================
template <class T> void sum_backward(T* din, const T* dout, int64_t n) {
  const T g = dout[0];
#pragma omp parallel for simd schedule(static)
  for (int64_t i = 0; i < n; ++i) din[i] = g;
}

#define CNX_INSTANTIATE(T)                              \
  template void sum_forward<T>(T*, const T*, int64_t); \
  template void sum_backward<T>(T*, const T*, int64_t);
CNX_INSTANTIATE(float)
CNX_INSTANTIATE(double)
#undef CNX_INSTANTIATE

}  // namespace cnx::cpu
