// CPU reference: LayerNorm over the last dimension (see kernels/layernorm.h for the math).
// Row statistics accumulate in double, two passes (mean, then centred squares): the
// reference is meant to be the accurate side of every comparison.
#include "kernels/layernorm.h"

#include <cmath>

namespace cnx::cpu {

// ================================ forward ================================
template <class T>
void layernorm_forward(T* out, T* mean, T* rstd, const T* in, const T* weight, const T* bias,
                       int64_t rows, int64_t C, double eps) {
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
void layernorm_backward(T* din, T* dweight, T* dbias, const T* dout, const T* in, const T* weight,
                        const T* mean, const T* rstd, int64_t rows, int64_t C) {
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

}  // namespace cnx::cpu
