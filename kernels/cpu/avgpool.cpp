// CPU reference: global average pool over H and W (see kernels/avgpool.h).
#include "kernels/avgpool.h"

#include <cstddef>
#include <vector>

namespace cnx::cpu {

// ================================ forward ================================
template <class T>
void global_avgpool_forward(T* out, const T* in, int64_t N, int64_t H, int64_t W, int64_t C) {
  const int64_t HW = H * W;
#pragma omp parallel for schedule(static)
  for (int64_t n = 0; n < N; ++n) {
    std::vector<double> acc(static_cast<size_t>(C), 0.0);
    for (int64_t s = 0; s < HW; ++s) {
      const T* x = in + (n * HW + s) * C;
      for (int64_t c = 0; c < C; ++c) acc[c] += x[c];
    }
    for (int64_t c = 0; c < C; ++c) out[n * C + c] = static_cast<T>(acc[c] / static_cast<double>(HW));
  }
}

// ================================ backward ================================
template <class T>
void global_avgpool_backward(T* din, const T* dout, int64_t N, int64_t H, int64_t W, int64_t C) {
  const int64_t HW = H * W;
  const T inv = static_cast<T>(1.0 / static_cast<double>(HW));
#pragma omp parallel for schedule(static)
  for (int64_t n = 0; n < N; ++n)
    for (int64_t s = 0; s < HW; ++s)
      for (int64_t c = 0; c < C; ++c) din[(n * HW + s) * C + c] = dout[n * C + c] * inv;
}

#define CNX_INSTANTIATE(T)                                                                      \
  template void global_avgpool_forward<T>(T*, const T*, int64_t, int64_t, int64_t, int64_t); \
  template void global_avgpool_backward<T>(T*, const T*, int64_t, int64_t, int64_t, int64_t);
CNX_INSTANTIATE(float)
CNX_INSTANTIATE(double)
#undef CNX_INSTANTIATE

}  // namespace cnx::cpu
