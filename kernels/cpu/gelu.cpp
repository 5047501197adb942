// CPU reference: exact-erf GELU (see kernels/gelu.h).
#include "kernels/gelu.h"

#include "kernels/cpu/bf16_emulation.h"

#include <cmath>
#include <numbers>

namespace cnx::cpu {

namespace {
template <class T> constexpr T kInvSqrt2 = static_cast<T>(std::numbers::sqrt2 / 2);
template <class T> constexpr T kInvSqrt2Pi = static_cast<T>(std::numbers::inv_sqrtpi / std::numbers::sqrt2);
}  // namespace

// ================================ forward ================================
template <class T> void gelu_forward(T* out, const T* in, int64_t n) {
#pragma omp parallel for schedule(static)
  for (int64_t i = 0; i < n; ++i) out[i] = T(0.5) * in[i] * (T(1) + std::erf(in[i] * kInvSqrt2<T>));
}

// ================================ backward ================================
template <class T> void gelu_backward(T* din, const T* dout, const T* in, int64_t n) {
#pragma omp parallel for schedule(static)
  for (int64_t i = 0; i < n; ++i) {
    const T x = in[i];
    const T cdf = T(0.5) * (T(1) + std::erf(x * kInvSqrt2<T>));  // Phi(x)
    const T pdf = kInvSqrt2Pi<T> * std::exp(T(-0.5) * x * x);    // phi(x)
    din[i] = dout[i] * (cdf + x * pdf);
  }
}

#define CNX_INSTANTIATE(T)                               \
  template void gelu_forward<T>(T*, const T*, int64_t); \
  template void gelu_backward<T>(T*, const T*, const T*, int64_t);
CNX_INSTANTIATE(float)
CNX_INSTANTIATE(double)
#undef CNX_INSTANTIATE

// bf16: the f32 kernels between a widening and one rounding (kernels/cpu/bf16_emulation.h).
template <> void gelu_forward<bf16>(bf16* out, const bf16* in, int64_t n) {
  const Widened x(in, n);
  Narrowed y(out, n);
  gelu_forward<float>(y.data(), x.data(), n);
  y.store();
}

template <> void gelu_backward<bf16>(bf16* din, const bf16* dout, const bf16* in, int64_t n) {
  const Widened dy(dout, n), x(in, n);
  Narrowed dx(din, n);
  gelu_backward<float>(dx.data(), dy.data(), x.data(), n);
  dx.store();
}

}  // namespace cnx::cpu
