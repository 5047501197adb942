// CPU reference: LayerNorm over the last dimension (see kernels/layernorm.h for the math).
// Row statistics accumulate in double, two passes (mean, then centred squares): the
// reference is meant to be the accurate side of every comparison. The bf16 kernels (at the
// end) are the f32 ones between a widening of the bf16 activations and one rounding of each
// bf16 result; the statistics and the parameter gradients stay the f32 kernel's fp32 values.
#include "kernels/layernorm.h"

#include <cmath>

#include "kernels/cpu/bf16_emulation.h"

namespace cnx::cpu {

// ================================ forward ================================
template <class T>
void layernorm_forward(T* out, param_t<T>* mean, param_t<T>* rstd, const T* in,
                       const param_t<T>* weight, const param_t<T>* bias, int64_t rows, int64_t C,
                       double eps) {
#pragma omp parallel for schedule(static)
  for (int64_t r = 0; r < rows; ++r) {
    const T* x = in + r * C;
    double mu = 0;
    for (int64_t c = 0; c < C; ++c) mu += x[c];
    mu /= static_cast<double>(C);
    double var = 0;
    for (int64_t c = 0; c < C; ++c) var += (x[c] - mu) * (x[c] - mu);
    var /= static_cast<double>(C);  // biased, as in PyTorch's LayerNorm
    const double rs = 1.0 / std::sqrt(var + eps);
    for (int64_t c = 0; c < C; ++c)
      out[r * C + c] = static_cast<T>((x[c] - mu) * rs * weight[c] + bias[c]);
    mean[r] = static_cast<T>(mu);
    rstd[r] = static_cast<T>(rs);
  }
}

// ================================ backward ================================
template <class T>
void layernorm_backward(T* din, param_t<T>* dweight, param_t<T>* dbias, const T* dout,
                        const T* in, const param_t<T>* weight, const param_t<T>* mean,
                        const param_t<T>* rstd, int64_t rows, int64_t C) {
  if (din) {
#pragma omp parallel for schedule(static)
    for (int64_t r = 0; r < rows; ++r) {
      const T* x = in + r * C;
      const T* dy = dout + r * C;
      const double mu = mean[r], rs = rstd[r];
      double mean_g = 0, mean_gx = 0;  // mean_c(g), mean_c(g * xhat), with g = dy * weight
      for (int64_t c = 0; c < C; ++c) {
        const double g = static_cast<double>(dy[c]) * weight[c];
        mean_g += g;
        mean_gx += g * (x[c] - mu) * rs;
      }
      mean_g /= static_cast<double>(C);
      mean_gx /= static_cast<double>(C);
      for (int64_t c = 0; c < C; ++c) {
        const double g = static_cast<double>(dy[c]) * weight[c];
        const double xhat = (x[c] - mu) * rs;
        din[r * C + c] = static_cast<T>(rs * (g - mean_g - xhat * mean_gx));
      }
    }
  }
  if (dweight || dbias) {
    // One thread per channel, summing over rows in a fixed order (deterministic).
#pragma omp parallel for schedule(static)
    for (int64_t c = 0; c < C; ++c) {
      double dw = 0, db = 0;
      for (int64_t r = 0; r < rows; ++r) {
        const double dy = dout[r * C + c];
        if (dweight) dw += dy * (in[r * C + c] - static_cast<double>(mean[r])) * rstd[r];
        db += dy;
      }
      if (dweight) dweight[c] = static_cast<T>(dw);
      if (dbias) dbias[c] = static_cast<T>(db);
    }
  }
}

#define CNX_INSTANTIATE(T)                                                                     \
  template void layernorm_forward<T>(T*, T*, T*, const T*, const T*, const T*, int64_t,        \
                                     int64_t, double);                                         \
  template void layernorm_backward<T>(T*, T*, T*, const T*, const T*, const T*, const T*,      \
                                      const T*, int64_t, int64_t);
CNX_INSTANTIATE(float)
CNX_INSTANTIATE(double)
#undef CNX_INSTANTIATE

// bf16: the f32 kernels between a widening and one rounding (kernels/cpu/bf16_emulation.h).
// The statistics are computed from the widened (exact) row, as for f32 inputs; mean, rstd,
// dweight and dbias are fp32 and written directly, never rounded to bf16.
template <>
void layernorm_forward<bf16>(bf16* out, float* mean, float* rstd, const bf16* in,
                             const float* weight, const float* bias, int64_t rows, int64_t C,
                             double eps) {
  const Widened x(in, rows * C);
  Narrowed y(out, rows * C);
  layernorm_forward<float>(y.data(), mean, rstd, x.data(), weight, bias, rows, C, eps);
  y.store();
}

template <>
void layernorm_backward<bf16>(bf16* din, float* dweight, float* dbias, const bf16* dout,
                              const bf16* in, const float* weight, const float* mean,
                              const float* rstd, int64_t rows, int64_t C) {
  const Widened dy(dout, rows * C), x(in, rows * C);
  Narrowed dx(din, rows * C);
  layernorm_backward<float>(dx.data(), dweight, dbias, dy.data(), x.data(), weight, mean, rstd,
                            rows, C);
  dx.store();
}

}  // namespace cnx::cpu
