// CPU reference: elementwise add (see kernels/add.h).
#include "kernels/add.h"

namespace cnx::cpu {

template <class T> void add_forward(T* out, const T* a, const T* b, int64_t n) {
#pragma omp parallel for simd schedule(static)
  for (int64_t i = 0; i < n; ++i) out[i] = a[i] + b[i];
}

template <class T> void add_inplace(T* dst, const T* src, int64_t n) {
#pragma omp parallel for simd schedule(static)
  for (int64_t i = 0; i < n; ++i) dst[i] += src[i];
}

#define CNX_INSTANTIATE(T)                                        \
  template void add_forward<T>(T*, const T*, const T*, int64_t); \
  template void add_inplace<T>(T*, const T*, int64_t);
CNX_INSTANTIATE(float)
CNX_INSTANTIATE(double)
#undef CNX_INSTANTIATE

}  // namespace cnx::cpu
