// CPU reference: layer scale (see kernels/layer_scale.h).
#include "kernels/layer_scale.h"

#include "kernels/cpu/bf16_emulation.h"

namespace cnx::cpu {

// ================================ forward ================================
template <class T>
void layer_scale_forward(T* out, const T* in, const param_t<T>* gamma, int64_t rows, int64_t C) {
#pragma omp parallel for schedule(static)
  for (int64_t r = 0; r < rows; ++r)
    for (int64_t c = 0; c < C; ++c) out[r * C + c] = in[r * C + c] * gamma[c];
}

// ================================ backward ================================
template <class T>
void layer_scale_backward(T* din, param_t<T>* dgamma, const T* dout, const T* in,
                          const param_t<T>* gamma, int64_t rows, int64_t C) {
  if (din) layer_scale_forward(din, dout, gamma, rows, C);
  if (dgamma) {
    // One thread per channel: the sum over rows runs in a fixed order (deterministic).
#pragma omp parallel for schedule(static)
    for (int64_t c = 0; c < C; ++c) {
      T acc = 0;
      for (int64_t r = 0; r < rows; ++r) acc += dout[r * C + c] * in[r * C + c];
      dgamma[c] = acc;
    }
  }
}

#define CNX_INSTANTIATE(T)                                                              \
  template void layer_scale_forward<T>(T*, const T*, const T*, int64_t, int64_t); \
  template void layer_scale_backward<T>(T*, T*, const T*, const T*, const T*, int64_t, int64_t);
CNX_INSTANTIATE(float)
CNX_INSTANTIATE(double)
#undef CNX_INSTANTIATE

// bf16: the f32 kernels between a widening and one rounding (kernels/cpu/bf16_emulation.h);
// dgamma stays fp32.
template <>
void layer_scale_forward<bf16>(bf16* out, const bf16* in, const float* gamma, int64_t rows,
                               int64_t C) {
  const Widened x(in, rows * C);
  Narrowed y(out, rows * C);
  layer_scale_forward<float>(y.data(), x.data(), gamma, rows, C);
  y.store();
}

template <>
void layer_scale_backward<bf16>(bf16* din, float* dgamma, const bf16* dout, const bf16* in,
                                const float* gamma, int64_t rows, int64_t C) {
  const Widened dy(dout, rows * C), x(in, rows * C);
  Narrowed dx(din, rows * C);
  layer_scale_backward<float>(dx.data(), dgamma, dy.data(), x.data(), gamma, rows, C);
  dx.store();
}

}  // namespace cnx::cpu
