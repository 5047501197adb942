// CPU reference: ReLU (see kernels/relu.h). bf16 values are compared as floats and copied,
// which is exact (kernels/relu.h), so one template serves the three types.
#include "kernels/relu.h"

namespace cnx::cpu {

namespace {
// The value compared with 0: the element itself, or its float for bf16 (exact).
inline float compared(bf16 x) { return static_cast<float>(x); }
inline float compared(float x) { return x; }
inline double compared(double x) { return x; }
}  // namespace

// ================================ forward ================================
template <class T> void relu_forward(T* out, const T* in, int64_t n) {
  const T zero = T(0.0f);
#pragma omp parallel for schedule(static)
  for (int64_t i = 0; i < n; ++i) out[i] = compared(in[i]) <= 0 ? zero : in[i];
}

// ================================ backward ================================
template <class T> void relu_backward(T* din, const T* dout, const T* out, int64_t n) {
  const T zero = T(0.0f);
#pragma omp parallel for schedule(static)
  for (int64_t i = 0; i < n; ++i) din[i] = compared(out[i]) <= 0 ? zero : dout[i];
}

#define CNX_INSTANTIATE(T)                               \
  template void relu_forward<T>(T*, const T*, int64_t); \
  template void relu_backward<T>(T*, const T*, const T*, int64_t);
CNX_INSTANTIATE(float)
CNX_INSTANTIATE(double)
CNX_INSTANTIATE(bf16)
#undef CNX_INSTANTIATE

}  // namespace cnx::cpu
