// cnx::cpu::dwconv_layernorm_forward (kernels/dwconv_layernorm.h): the reference is the two ops
// one after the other, so the fused op's CPU path is bitwise the unfused ops' by construction.
#include "kernels/dwconv_layernorm.h"

#include <vector>

#include "kernels/dwconv.h"
#include "kernels/layernorm.h"

namespace cnx::cpu {

template <class T>
void dwconv_layernorm_forward(T* out, T* y, param_t<T>* mean, param_t<T>* rstd, const T* in,
                              const param_t<T>* dw_weight, const param_t<T>* dw_bias,
                              const param_t<T>* ln_weight, const param_t<T>* ln_bias, int64_t N,
                              int64_t H, int64_t W, int64_t C, int64_t k, double eps) {
  const int64_t rows = N * H * W;
  // Scratch for what the caller does not keep.
  std::vector<T> y_tmp(y ? 0 : static_cast<size_t>(rows * C));
  std::vector<param_t<T>> stats_tmp(mean && rstd ? 0 : static_cast<size_t>(2 * rows));
  T* ys = y ? y : y_tmp.data();
  param_t<T>* m = mean ? mean : stats_tmp.data();
  param_t<T>* r = rstd ? rstd : stats_tmp.data() + rows;
  dwconv_forward<T>(ys, in, dw_weight, dw_bias, N, H, W, C, k);
  layernorm_forward<T>(out, m, r, ys, ln_weight, ln_bias, rows, C, eps);
}

template void dwconv_layernorm_forward<float>(float*, float*, float*, float*, const float*,
                                              const float*, const float*, const float*,
                                              const float*, int64_t, int64_t, int64_t, int64_t,
                                              int64_t, double);
template void dwconv_layernorm_forward<double>(double*, double*, double*, double*, const double*,
                                               const double*, const double*, const double*,
                                               const double*, int64_t, int64_t, int64_t, int64_t,
                                               int64_t, double);
template void dwconv_layernorm_forward<bf16>(bf16*, bf16*, float*, float*, const bf16*,
                                             const float*, const float*, const float*,
                                             const float*, int64_t, int64_t, int64_t, int64_t,
                                             int64_t, double);

}  // namespace cnx::cpu
