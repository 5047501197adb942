// CPU reference: elementwise add (see kernels/add.h).
#include "kernels/add.h"

#include "kernels/cpu/bf16_emulation.h"

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

// bf16: each sum in fp32 (exact for two bf16 values of similar magnitude), rounded once.
template <> void add_forward<bf16>(bf16* out, const bf16* a, const bf16* b, int64_t n) {
#pragma omp parallel for schedule(static)
  for (int64_t i = 0; i < n; ++i) out[i] = bf16(static_cast<float>(a[i]) + static_cast<float>(b[i]));
}

template <> void add_inplace<bf16>(bf16* dst, const bf16* src, int64_t n) {
  add_forward<bf16>(dst, dst, src, n);  // each element read before it is written
}

}  // namespace cnx::cpu
