// CPU reference: drop path (see kernels/drop_path.h).
#include "kernels/drop_path.h"

#include "kernels/cpu/bf16_emulation.h"

#include "tensor/error.h"

namespace cnx::cpu {

template <class T> void drop_path_scales(T* scale, int64_t N, double drop_prob, Generator& gen) {
  CNX_CHECK(drop_prob >= 0 && drop_prob < 1, "drop_path: drop_prob must be in [0, 1), got ",
            drop_prob);
  const double keep = 1.0 - drop_prob;
  for (int64_t n = 0; n < N; ++n)  // serial, in sample order: the mask depends on the seed only
    scale[n] = gen.bernoulli(keep) ? static_cast<T>(1.0 / keep) : T(0);
}

// ================================ forward ================================
template <class T>
void drop_path_forward(T* out, const T* in, const param_t<T>* scale, int64_t N,
                       int64_t per_sample) {
#pragma omp parallel for schedule(static)
  for (int64_t n = 0; n < N; ++n)
    for (int64_t i = 0; i < per_sample; ++i)
      out[n * per_sample + i] = in[n * per_sample + i] * scale[n];
}

// ================================ backward ================================
template <class T>
void drop_path_backward(T* din, const T* dout, const param_t<T>* scale, int64_t N,
                        int64_t per_sample) {
  drop_path_forward(din, dout, scale, N, per_sample);  // the same per-sample scaling
}

#define CNX_INSTANTIATE(T)                                                         \
  template void drop_path_scales<T>(T*, int64_t, double, Generator&);              \
  template void drop_path_forward<T>(T*, const T*, const T*, int64_t, int64_t);    \
  template void drop_path_backward<T>(T*, const T*, const T*, int64_t, int64_t);
CNX_INSTANTIATE(float)
CNX_INSTANTIATE(double)
#undef CNX_INSTANTIATE

// bf16 activations, fp32 scales: the f32 kernel between a widening and one rounding.
template <>
void drop_path_forward<bf16>(bf16* out, const bf16* in, const float* scale, int64_t N,
                             int64_t per_sample) {
  const Widened x(in, N * per_sample);
  Narrowed y(out, N * per_sample);
  drop_path_forward<float>(y.data(), x.data(), scale, N, per_sample);
  y.store();
}

template <>
void drop_path_backward<bf16>(bf16* din, const bf16* dout, const float* scale, int64_t N,
                              int64_t per_sample) {
  drop_path_forward<bf16>(din, dout, scale, N, per_sample);  // the same per-sample scaling
}

}  // namespace cnx::cpu
