// CPU reference: elementwise product (see kernels/mul.h).
#include "kernels/mul.h"

namespace cnx::cpu {

// ================================ forward ================================
template <class T> void mul_forward(T* out, const T* a, const T* b, int64_t n) {
#pragma omp parallel for simd schedule(static)
  for (int64_t i = 0; i < n; ++i) out[i] = a[i] * b[i];
}

// ================================ backward ================================
template <class T>
void mul_backward(T* da, T* db, const T* dout, const T* a, const T* b, int64_t n) {
  if (da) mul_forward(da, dout, b, n);
  if (db) mul_forward(db, dout, a, n);
}

#define CNX_INSTANTIATE(T)                                        \
  template void mul_forward<T>(T*, const T*, const T*, int64_t); \
  template void mul_backward<T>(T*, T*, const T*, const T*, const T*, int64_t);
CNX_INSTANTIATE(float)
CNX_INSTANTIATE(double)
#undef CNX_INSTANTIATE

}  // namespace cnx::cpu
