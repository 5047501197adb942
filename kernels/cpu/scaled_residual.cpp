// CPU reference: layer scale + drop path + residual add in one pass (kernels/scaled_residual.h).
// Each product is rounded where the unfused ops round it, so the f32 result is bitwise theirs.
#include "kernels/scaled_residual.h"

#include "kernels/cpu/bf16_emulation.h"

namespace cnx::cpu {

// ================================ forward ================================
template <class T>
void scaled_residual_forward(T* out, const T* x, const T* h, const param_t<T>* gamma,
                             const param_t<T>* scale, int64_t N, int64_t P, int64_t C) {
  const int64_t per_sample = P * C;
#pragma omp parallel for schedule(static)
  for (int64_t n = 0; n < N; ++n) {
    const T s = scale ? static_cast<T>(scale[n]) : T(1);
    const T* xs = x + n * per_sample;
    T* os = out + n * per_sample;
    if (s == T(0)) {  // dropped: the branch is not read
      for (int64_t i = 0; i < per_sample; ++i) os[i] = xs[i];
      continue;
    }
    const T* hs = h + n * per_sample;
    for (int64_t p = 0; p < P; ++p)
      for (int64_t c = 0; c < C; ++c) {
        const int64_t i = p * C + c;
        const T scaled = gamma ? static_cast<T>(hs[i] * gamma[c]) : hs[i];  // layer_scale
        os[i] = xs[i] + (scale ? static_cast<T>(scaled * s) : scaled);    // drop_path, add
      }
  }
}

// ================================ backward ================================
template <class T>
void scaled_residual_backward(T* dh, param_t<T>* dgamma, const T* dout, const T* h,
                              const param_t<T>* gamma, const param_t<T>* scale, int64_t N,
                              int64_t P, int64_t C) {
  const int64_t per_sample = P * C;
  // g = dout * scale[n], rounded as drop_path's backward rounds it (dout itself without drop path).
  auto g_of = [&](int64_t n, int64_t i) {
    return scale ? static_cast<T>(dout[i] * static_cast<T>(scale[n])) : dout[i];
  };
  auto dropped = [&](int64_t n) { return scale && static_cast<T>(scale[n]) == T(0); };
  if (dh) {
#pragma omp parallel for schedule(static)
    for (int64_t n = 0; n < N; ++n) {
      T* d = dh + n * per_sample;
      if (dropped(n)) {
        for (int64_t i = 0; i < per_sample; ++i) d[i] = T(0);
        continue;
      }
      for (int64_t p = 0; p < P; ++p)
        for (int64_t c = 0; c < C; ++c) {
          const int64_t i = n * per_sample + p * C + c;
          const T g = g_of(n, i);
          d[p * C + c] = gamma ? static_cast<T>(g * gamma[c]) : g;  // layer_scale's backward
        }
    }
  }
  if (dgamma) {
    // One thread per channel, rows in order (deterministic; the order of layer_scale's), the
    // rows of dropped samples skipped.
#pragma omp parallel for schedule(static)
    for (int64_t c = 0; c < C; ++c) {
      T acc = 0;
      for (int64_t n = 0; n < N; ++n) {
        if (dropped(n)) continue;
        for (int64_t p = 0; p < P; ++p) {
          const int64_t i = n * per_sample + p * C + c;
          acc += g_of(n, i) * h[i];
        }
      }
      dgamma[c] = acc;
    }
  }
}

#define CNX_INSTANTIATE(T)                                                                    \
  template void scaled_residual_forward<T>(T*, const T*, const T*, const T*, const T*,        \
                                           int64_t, int64_t, int64_t);                        \
  template void scaled_residual_backward<T>(T*, T*, const T*, const T*, const T*, const T*,   \
                                            int64_t, int64_t, int64_t);
CNX_INSTANTIATE(float)
CNX_INSTANTIATE(double)
#undef CNX_INSTANTIATE

// bf16: the f32 kernel between a widening and one rounding; dgamma stays fp32.
template <>
void scaled_residual_forward<bf16>(bf16* out, const bf16* x, const bf16* h, const float* gamma,
                                   const float* scale, int64_t N, int64_t P, int64_t C) {
  const int64_t n = N * P * C;
  const Widened xw(x, n), hw(h, n);
  Narrowed y(out, n);
  scaled_residual_forward<float>(y.data(), xw.data(), hw.data(), gamma, scale, N, P, C);
  y.store();
}

template <>
void scaled_residual_backward<bf16>(bf16* dh, float* dgamma, const bf16* dout, const bf16* h,
                                   const float* gamma, const float* scale, int64_t N, int64_t P,
                                   int64_t C) {
  const int64_t n = N * P * C;
  const Widened dy(dout, n), hw(h, n);
  Narrowed dx(dh, n);
  scaled_residual_backward<float>(dx.data(), dgamma, dy.data(), hw.data(), gamma, scale, N, P, C);
  dx.store();
}

}  // namespace cnx::cpu
