// CPU reference: BatchNorm over the channels of M rows (see kernels/batchnorm.h for the math).
// Per-channel statistics and sums accumulate in double, rows in order, the variance in two
// passes (the mean, then the centred squares): the reference is meant to be the accurate side
// of every comparison. The loops walk the rows in memory order with the channels innermost
// (channels-last), keeping C double accumulators. The bf16 kernels (at the end) are the f32
// ones between a widening of the bf16 activations and one rounding of each bf16 result; the
// statistics, the running statistics and the parameter gradients stay the f32 kernel's fp32
// values.
#include "kernels/batchnorm.h"

#include <cmath>
#include <vector>

#include "kernels/cpu/bf16_emulation.h"

namespace cnx::cpu {

namespace {

// Per-channel sums over the rows: sum_r f(r, c) for every c, rows in order.
template <class F> std::vector<double> channel_sums(int64_t M, int64_t C, F f) {
  std::vector<double> s(static_cast<size_t>(C), 0.0);
  for (int64_t r = 0; r < M; ++r)
    for (int64_t c = 0; c < C; ++c) s[static_cast<size_t>(c)] += f(r, c);
  return s;
}

}  // namespace

// ================================ forward ================================
template <class T>
void batchnorm_forward(T* out, param_t<T>* mean, param_t<T>* invstd, param_t<T>* running_mean,
                       param_t<T>* running_var, const T* in, const param_t<T>* weight,
                       const param_t<T>* bias, int64_t M, int64_t C, bool training,
                       double momentum, double eps) {
  using P = param_t<T>;
  std::vector<double> mu(static_cast<size_t>(C)), rs(static_cast<size_t>(C));
  if (training) {
    const double m = static_cast<double>(M);
    const std::vector<double> sum = channel_sums(
        M, C, [&](int64_t r, int64_t c) { return static_cast<double>(in[r * C + c]); });
    for (int64_t c = 0; c < C; ++c) mu[static_cast<size_t>(c)] = sum[static_cast<size_t>(c)] / m;
    const std::vector<double> sq = channel_sums(M, C, [&](int64_t r, int64_t c) {
      const double d = static_cast<double>(in[r * C + c]) - mu[static_cast<size_t>(c)];
      return d * d;
    });
    for (int64_t c = 0; c < C; ++c) {
      const size_t i = static_cast<size_t>(c);
      const double var = sq[i] / m;  // biased: the normalisation's
      rs[i] = 1.0 / std::sqrt(var + eps);
      const double unbiased = sq[i] / (m - 1.0);  // the running estimate's (M >= 2)
      running_mean[c] = static_cast<P>((1.0 - momentum) * running_mean[c] + momentum * mu[i]);
      running_var[c] = static_cast<P>((1.0 - momentum) * running_var[c] + momentum * unbiased);
    }
  } else {
    for (int64_t c = 0; c < C; ++c) {
      mu[static_cast<size_t>(c)] = running_mean[c];
      rs[static_cast<size_t>(c)] = 1.0 / std::sqrt(static_cast<double>(running_var[c]) + eps);
    }
  }
  for (int64_t c = 0; c < C; ++c) {
    mean[c] = static_cast<P>(mu[static_cast<size_t>(c)]);
    invstd[c] = static_cast<P>(rs[static_cast<size_t>(c)]);
  }
  for (int64_t r = 0; r < M; ++r)
    for (int64_t c = 0; c < C; ++c) {
      const size_t i = static_cast<size_t>(c);
      const double xhat = (static_cast<double>(in[r * C + c]) - mu[i]) * rs[i];
      out[r * C + c] = static_cast<T>(xhat * weight[c] + bias[c]);
    }
}

// ================================ backward ================================
template <class T>
void batchnorm_backward(T* din, param_t<T>* dweight, param_t<T>* dbias, const T* dout,
                        const T* in, const param_t<T>* weight, const param_t<T>* mean,
                        const param_t<T>* invstd, int64_t M, int64_t C, bool training) {
  using P = param_t<T>;
  const bool need_sums = dweight || dbias || (din && training);
  const bool need_xhat = dweight || (din && training);
  std::vector<double> sum_dy(static_cast<size_t>(C), 0.0), sum_dyx(static_cast<size_t>(C), 0.0);
  if (need_sums) {
    for (int64_t r = 0; r < M; ++r)
      for (int64_t c = 0; c < C; ++c) {
        const double dy = dout[r * C + c];
        sum_dy[static_cast<size_t>(c)] += dy;
        if (need_xhat)
          sum_dyx[static_cast<size_t>(c)] +=
              dy * ((static_cast<double>(in[r * C + c]) - mean[c]) * invstd[c]);
      }
  }
  if (dweight)
    for (int64_t c = 0; c < C; ++c) dweight[c] = static_cast<P>(sum_dyx[static_cast<size_t>(c)]);
  if (dbias)
    for (int64_t c = 0; c < C; ++c) dbias[c] = static_cast<P>(sum_dy[static_cast<size_t>(c)]);
  if (!din) return;
  const double m = static_cast<double>(M);
  for (int64_t r = 0; r < M; ++r)
    for (int64_t c = 0; c < C; ++c) {
      const double dy = dout[r * C + c];
      const double k = static_cast<double>(weight[c]) * invstd[c];
      if (training) {
        const size_t i = static_cast<size_t>(c);
        const double xhat = (static_cast<double>(in[r * C + c]) - mean[c]) * invstd[c];
        din[r * C + c] = static_cast<T>(k * (dy - sum_dy[i] / m - xhat * (sum_dyx[i] / m)));
      } else {
        din[r * C + c] = static_cast<T>(k * dy);
      }
    }
}

#define CNX_INSTANTIATE(T)                                                                     \
  template void batchnorm_forward<T>(T*, T*, T*, T*, T*, const T*, const T*, const T*, int64_t, \
                                     int64_t, bool, double, double);                           \
  template void batchnorm_backward<T>(T*, T*, T*, const T*, const T*, const T*, const T*,      \
                                      const T*, int64_t, int64_t, bool);
CNX_INSTANTIATE(float)
CNX_INSTANTIATE(double)
#undef CNX_INSTANTIATE

// bf16: the f32 kernels between a widening and one rounding (kernels/cpu/bf16_emulation.h).
// The statistics come from the widened (exact) inputs, as for f32 inputs; mean, invstd, the
// running statistics, dweight and dbias are fp32 and written directly, never rounded to bf16.
template <>
void batchnorm_forward<bf16>(bf16* out, float* mean, float* invstd, float* running_mean,
                             float* running_var, const bf16* in, const float* weight,
                             const float* bias, int64_t M, int64_t C, bool training,
                             double momentum, double eps) {
  const Widened x(in, M * C);
  Narrowed y(out, M * C);
  batchnorm_forward<float>(y.data(), mean, invstd, running_mean, running_var, x.data(), weight,
                           bias, M, C, training, momentum, eps);
  y.store();
}

template <>
void batchnorm_backward<bf16>(bf16* din, float* dweight, float* dbias, const bf16* dout,
                              const bf16* in, const float* weight, const float* mean,
                              const float* invstd, int64_t M, int64_t C, bool training) {
  const Widened dy(dout, M * C), x(in, M * C);
  Narrowed dx(din, M * C);
  batchnorm_backward<float>(dx.data(), dweight, dbias, dy.data(), x.data(), weight, mean, invstd,
                            M, C, training);
  dx.store();
}

}  // namespace cnx::cpu
