// CUDA depthwise 7x7 conv + LayerNorm over C in one kernel (kernels/dwconv_layernorm.h):
//
//   y[n,h,w,c] = bias[c] + sum_{p,q} in[n, h+p-3, w+q-3, c] * weight[p,q,c]   (zero padding)
//   out[n,h,w,:] = (y - mean) * rstd * ln_weight + ln_bias,   statistics over the C channels
//
// ---- why this shape ----------------------------------------------------------------------------
// A LayerNorm needs all C channels of a pixel, a depthwise conv works channel by channel. So a
// block owns whole pixels: a tile of TH x TW output pixels of one image, across all C channels.
//  - Phase 1, for each group of 32 channels in turn: stage the group's input tile (TH + 6) x
//    (TW + 6) x 32 and its 7x7 filter (and bias) in shared memory, then each thread computes 7
//    consecutive outputs of one output row for one channel, as dwconv.cu's conv kernel does (the
//    channel's 49 taps in registers, each input row's 13 values loaded once for all 7 outputs,
//    the same fmaf chain per output: bias, then p ascending, then q ascending, so y is bitwise
//    dwconv_forward's). y goes to shared memory, rounded to T (a bf16 y is what the unfused ops
//    would have stored), as the tile's (TH * TW, C) matrix.
//  - Phase 2: one warp per pixel reads its C values of y from shared memory and computes mean,
//    the centred variance and the affine output exactly as layernorm.cu's generic path does
//    (lane l sums channels l, l + 32, ..., then an xor butterfly; the same expressions), and
//    writes out, and y, mean and rstd when wanted.
// Block: 32 lanes (threadIdx.x: the channel within the group in phase 1) x PY * PX warps
// (threadIdx.y: in phase 1 the warp at output row py = y / PX and columns [7 px, 7 px + 7)
// of the tile; in phase 2 a warp walks pixels). TH = PY, TW = 7 PX. The tile is chosen on the
// host (plan) so that the shared memory, dominated by y's TH TW C floats, stays <= ~100 KB: two
// blocks an SM at C = 96 and 192; at ConvNeXt-T's stages, 56x56x96 -> 2 x 28 tiles (8 warps),
// 28x28x192 -> 2 x 28, 14x14x384 -> 2 x 14 (4 warps), 7x7x768 -> 3 x 7 (3 warps).
// The input halo (6 rows and 6 columns) is re-read from L2 by neighbouring tiles; DRAM sees
// each input about once, as for the conv alone.
//
// T: float or __nv_bfloat16 activations; weights, statistics and all arithmetic fp32.
#include <cuda_bf16.h>

#include <algorithm>
#include <climits>
#include <cstdint>

#include "kernels/cuda/launch.cuh"
#include "kernels/cuda/reduce.cuh"
#include "kernels/cuda/vec.cuh"
#include "kernels/dwconv_layernorm.h"
#include "tensor/cuda_check.h"
#include "tensor/error.h"

namespace cnx::cuda {

namespace {

using detail::from_float;
using detail::group_sum;
using detail::to_float;

constexpr int kK = 7, kR = kK / 2;  // ConvNeXt's kernel size; padding 3
constexpr int kRW = 7;              // outputs per thread along W (ConvNeXt widths: multiples of 7)
constexpr int kGroup = 32;          // channels per phase-1 step: one per lane
constexpr int kMaxWarps = 8;        // 256 threads
constexpr int64_t kMaxC = 2048;     // y of a 1 x 7 tile: 56 KB
constexpr size_t kSmemBudget = 100 * 1024;  // two blocks an SM (227 KB) where the tile allows

struct Geom {
  int H, W, C;
  int TH, TW, PX;      // tile: TH x TW pixels, PX warps along W (PY = TH)
  int in_h, in_w;      // input tile: TH + 6, TW + 6
  int tiles_x, tiles;  // tiles along W, per image
};

template <class T>
struct Args {
  T* out;                  // (N, H, W, C)
  T* y;                    // (N, H, W, C) or null
  float* mean;             // (N*H*W) or null
  float* rstd;             // (N*H*W) or null
  const T* in;             // (N, H, W, C)
  const float* dw_weight;  // (7, 7, C)
  const float* dw_bias;    // (C) or null
  const float* ln_weight;  // (C)
  const float* ln_bias;    // (C)
  float eps;
  Geom g;
};

// Shared memory: the input tile (in_h, in_w, 32), the filter (49 taps + bias, 32), y (TH*TW, C).
size_t smem_floats(const Geom& g) {
  return size_t(g.in_h) * g.in_w * kGroup + size_t(kK * kK + 1) * kGroup +
         size_t(g.TH) * g.TW * g.C;
}

// grid: x = n * tiles + tile (tile = tile_y * tiles_x + tile_x). block: (32, TH * PX).
// Dynamic shared memory: smem_floats(g) floats.
template <class T>
__global__ void __launch_bounds__(kGroup * kMaxWarps) dwconv_layernorm_kernel(Args<T> a) {
  CNX_EXTERN_SHARED(float, smem);
  const Geom& g = a.g;
  float* s_in = smem;                                    // (in_h, in_w, 32)
  float* s_filt = s_in + g.in_h * g.in_w * kGroup;       // (49 + 1, 32)
  float* s_y = s_filt + (kK * kK + 1) * kGroup;          // (TH * TW, C)
  const int n = static_cast<int>(blockIdx.x / g.tiles);
  const int tile = static_cast<int>(blockIdx.x % g.tiles);
  const int oh0 = (tile / g.tiles_x) * g.TH, ow0 = (tile % g.tiles_x) * g.TW;
  const int lane = threadIdx.x, warp = threadIdx.y, nwarps = blockDim.y;
  const int py = warp / g.PX, px = warp % g.PX;
  const int64_t img = static_cast<int64_t>(n) * g.H * g.W;  // the image's first pixel

  // ---- phase 1: y for the tile, 32 channels at a time ----
  for (int c0 = 0; c0 < g.C; c0 += kGroup) {
    const int c = c0 + lane;
    const bool c_ok = c < g.C;
    __syncthreads();  // the previous group's tile and filter are no longer read
    // Stage the input tile: a warp copies one pixel's 32 channels (zeros outside the image).
    for (int r = 0; r < g.in_h; ++r) {
      const int h = oh0 - kR + r;
      for (int col = warp; col < g.in_w; col += nwarps) {
        const int w = ow0 - kR + col;
        const bool inside = c_ok && h >= 0 && h < g.H && w >= 0 && w < g.W;
        s_in[(r * g.in_w + col) * kGroup + lane] =
            inside ? to_float(a.in[(img + static_cast<int64_t>(h) * g.W + w) * g.C + c]) : 0.0f;
      }
    }
    for (int tap = warp; tap <= kK * kK; tap += nwarps) {  // the taps, then the bias (row 49)
      float v = 0.0f;
      if (c_ok && tap < kK * kK) v = a.dw_weight[static_cast<int64_t>(tap) * g.C + c];
      else if (c_ok && a.dw_bias != nullptr) v = a.dw_bias[c];
      s_filt[tap * kGroup + lane] = v;
    }
    __syncthreads();

    const int h = oh0 + py, w0 = ow0 + px * kRW;
    if (c_ok && h < g.H && w0 < g.W) {  // no barrier inside: idle threads skip ahead
      float wr[kK][kK];
#pragma unroll
      for (int p = 0; p < kK; ++p)
#pragma unroll
        for (int q = 0; q < kK; ++q) wr[p][q] = s_filt[(p * kK + q) * kGroup + lane];
      float acc[kRW];
#pragma unroll
      for (int j = 0; j < kRW; ++j) acc[j] = s_filt[kK * kK * kGroup + lane];  // bias (0 if none)
      // Output (py, 7 px + j) reads input-tile rows py .. py + 6, columns 7 px + j .. + 6.
      const float* win = s_in + (py * g.in_w + px * kRW) * kGroup + lane;
#pragma unroll
      for (int p = 0; p < kK; ++p) {
        float x[kRW + kK - 1];
#pragma unroll
        for (int j = 0; j < kRW + kK - 1; ++j) x[j] = win[(p * g.in_w + j) * kGroup];
#pragma unroll
        for (int q = 0; q < kK; ++q)
#pragma unroll
          for (int j = 0; j < kRW; ++j) acc[j] = fmaf(x[j + q], wr[p][q], acc[j]);
      }
      float* ys = s_y + (py * g.TW + px * kRW) * g.C + c;
#pragma unroll
      for (int j = 0; j < kRW; ++j)  // rounded to T: the y the LayerNorm (and backward) sees
        if (w0 + j < g.W) ys[j * g.C] = to_float(from_float<T>(acc[j]));
    }
  }
  __syncthreads();  // every channel of y is in shared memory

  // ---- phase 2: LayerNorm of each pixel, one warp per pixel (layernorm.cu's generic path) ----
  const float fC = static_cast<float>(g.C);
  for (int lh = 0; lh < g.TH; ++lh) {
    const int h = oh0 + lh;
    if (h >= g.H) break;
    for (int lw = warp; lw < g.TW; lw += nwarps) {  // uniform over the warp
      const int w = ow0 + lw;
      if (w >= g.W) break;
      const float* ys = s_y + (lh * g.TW + lw) * g.C;
      const int64_t row = img + static_cast<int64_t>(h) * g.W + w;
      float sum = 0.0f;
      for (int c = lane; c < g.C; c += 32) sum += ys[c];
      const float mu = group_sum(sum) / fC;
      float sq = 0.0f;
      for (int c = lane; c < g.C; c += 32) {
        const float d = ys[c] - mu;
        sq += d * d;
      }
      const float rs = 1.0f / sqrtf(group_sum(sq) / fC + a.eps);
      T* o = a.out + row * g.C;
      for (int c = lane; c < g.C; c += 32)
        o[c] = from_float<T>((ys[c] - mu) * rs * a.ln_weight[c] + a.ln_bias[c]);
      if (a.y != nullptr)
        for (int c = lane; c < g.C; c += 32) a.y[row * g.C + c] = from_float<T>(ys[c]);  // exact
      if (lane == 0 && a.mean != nullptr) a.mean[row] = mu;
      if (lane == 0 && a.rstd != nullptr) a.rstd[row] = rs;
    }
  }
}

// The tile: PX warps across (enough 7-wide column blocks for W, at most 4), PY = TH rows so that
// the block has <= 8 warps, then fewer rows (and columns) until the shared memory fits the budget.
Geom plan(int64_t H, int64_t W, int64_t C) {
  Geom g{};
  g.H = static_cast<int>(H);
  g.W = static_cast<int>(W);
  g.C = static_cast<int>(C);
  g.PX = static_cast<int>(std::min<int64_t>((W + kRW - 1) / kRW, 4));
  g.TH = static_cast<int>(std::min<int64_t>(H, kMaxWarps / g.PX));
  const auto fit = [&] {
    g.TW = g.PX * kRW;
    g.in_h = g.TH + kK - 1;
    g.in_w = g.TW + kK - 1;
    return smem_floats(g) * sizeof(float) <= kSmemBudget;
  };
  while (!fit() && g.TH > 1) --g.TH;
  while (!fit() && g.PX > 1) --g.PX;
  g.tiles_x = (g.W + g.TW - 1) / g.TW;
  g.tiles = ((g.H + g.TH - 1) / g.TH) * g.tiles_x;
  return g;
}

}  // namespace

bool dwconv_layernorm_supported(int64_t C, int64_t k) { return k == kK && C >= 1 && C <= kMaxC; }

template <class T>
void dwconv_layernorm_forward(std::type_identity_t<T>* out, std::type_identity_t<T>* y,
                              float* mean, float* rstd, const std::type_identity_t<T>* in,
                              const float* dw_weight, const float* dw_bias,
                              const float* ln_weight, const float* ln_bias, int64_t N, int64_t H,
                              int64_t W, int64_t C, int64_t k, double eps, cudaStream_t stream) {
  const char* op = "dwconv_layernorm";
  CNX_CHECK(dwconv_layernorm_supported(C, k), op, ": the fused CUDA kernel takes k = 7 and ",
            "1 <= C <= ", kMaxC, ", got k = ", k, ", C = ", C, " (use dwconv and layer_norm)");
  CNX_CHECK(N >= 0 && H >= 0 && W >= 0, op, ": negative size (N ", N, " H ", H, " W ", W, ")");
  if (N == 0 || H == 0 || W == 0) return;
  CNX_CHECK(H <= INT_MAX / 2 && W <= INT_MAX / 2, op, ": H ", H, " or W ", W, " too large");
  using D = detail::device_t<T>;  // float or __nv_bfloat16
  const Geom g = plan(H, W, C);
  const int64_t blocks = N * g.tiles;
  CNX_CHECK(blocks <= INT_MAX, op, ": too many blocks (", blocks, ")");
  const Args<D> a{detail::dev(out), detail::dev(y), mean,    rstd,    detail::dev(in),
                  dw_weight,        dw_bias,        ln_weight, ln_bias, static_cast<float>(eps),
                  g};
  const size_t smem = smem_floats(g) * sizeof(float);
  if (smem > 48 * 1024)  // above 48 KB a kernel must ask for it
    CNX_CUDA_CHECK(cudaFuncSetAttribute(dwconv_layernorm_kernel<D>,
                                        cudaFuncAttributeMaxDynamicSharedMemorySize,
                                        static_cast<int>(smem)));
  launch<dwconv_layernorm_kernel<D>>(static_cast<unsigned>(blocks),
                                     dim3(kGroup, static_cast<unsigned>(g.TH * g.PX)), smem,
                                     stream, a);
  CNX_CUDA_LAUNCH_CHECK();
}

template void dwconv_layernorm_forward<float>(float*, float*, float*, float*, const float*,
                                              const float*, const float*, const float*,
                                              const float*, int64_t, int64_t, int64_t, int64_t,
                                              int64_t, double, cudaStream_t);
template void dwconv_layernorm_forward<bf16>(bf16*, bf16*, float*, float*, const bf16*,
                                             const float*, const float*, const float*,
                                             const float*, int64_t, int64_t, int64_t, int64_t,
                                             int64_t, double, cudaStream_t);

}  // namespace cnx::cuda
