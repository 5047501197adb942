// CUDA depthwise convolution: forward, grad-input, grad-weight and grad-bias (NHWC; fp32, or
// bf16 activations with fp32 parameters). See kernels/dwconv.h for the launchers and
// kernels/cpu/dwconv.cpp for the reference.
//
// ---- the math (r = k/2, zero padding, stride 1) --------------------------------------------
//   forward      out[n,h,w,c] = bias[c] + sum_{p,q} in[n, h+p-r, w+q-r, c] * weight[p,q,c]
//   grad-input   din[n,h,w,c] = sum_{p,q} dout[n, h-p+r, w-q+r, c] * weight[p,q,c]
//                             = sum_{p,q} dout[n, h+p-r, w+q-r, c] * weight[k-1-p, k-1-q, c]
//                (substitute p -> k-1-p, q -> k-1-q and use k-1 = 2r): the forward conv of dout
//                with the spatially flipped filter and no bias, so both use one kernel.
//   grad-weight  dweight[p,q,c] = sum_{n,h,w} dout[n,h,w,c] * in[n, h+p-r, w+q-r, c]
//   grad-bias    dbias[c]       = sum_{n,h,w} dout[n,h,w,c]
//
// ---- why this tiling -------------------------------------------------------------------------
// The op is memory-bound but not by much: at k = 7 each output costs 49 FMAs, and on an H100
// the FMAs of ConvNeXt-T's stage 0 (38.5M outputs at batch 128) take ~60% of the time the DRAM
// traffic does. So the design has to read DRAM about once per element AND keep the FMA pipe
// busy with few shared-memory loads per FMA:
//
//  - A block owns a tile of TH x TW output pixels of one image and a group of 32 channels
//    (kGroup). It copies the (TH + k - 1) x (TW + k - 1) x 32 input tile (halo r on each side,
//    zeros outside the image) and its channels' k x k filter (and bias) into shared memory with
//    cp.async, so all of the block's global reads are in flight at once: 16-byte copies (float4
//    along C) when C % 4 == 0 and the tensor is 16-byte aligned, 4-byte copies otherwise. Halo
//    pixels shared with neighbouring tiles come from L2, so DRAM sees each input element about
//    once (the tiles of one image and channel group are neighbours in blockIdx.x).
//  - Block = 32 lanes (threadIdx.x, one channel each) x P <= 8 "pixel threads" (threadIdx.y, a
//    warp each). A warp therefore reads one pixel's 32 consecutive channels from shared memory
//    per load: 128 contiguous bytes, one wavefront, no bank conflicts. Global stores of the
//    output are likewise 128 contiguous bytes per warp.
//  - One channel per thread lets the thread keep its channel's whole k x k filter in registers
//    (49 for k = 7; a float4 of channels per thread would need 196). Each thread computes a
//    register block of RH x RW outputs (4 x 7 for k <= 7): it walks the RH + k - 1 input rows
//    of its window, loads each row's RW + k - 1 values into registers once, and applies every
//    (output row, filter row) pair that uses it. That is (RH+k-1)(RW+k-1) = 130 shared loads
//    for RH*RW*k*k = 1372 FMAs at k = 7, so shared memory is not the limit.
//  - RW = 7 divides ConvNeXt's widths (56, 28, 14, 7), so no FMAs are wasted on columns past the
//    image there; a 4-wide variant serves widths where it wastes less (8, 9, 32, ...).
//    Tiles: P pixel threads as PY x PX, TH = PY*RH, TW = PX*RW, chosen per shape (plan_tiles)
//    to minimise the pixels copied into shared memory (tile halos). <= 256 threads and, at
//    k <= 7, <= 128 registers per thread let two blocks share an SM, so one block's copy
//    overlaps the other's FMAs. At ConvNeXt-T's stages (k = 7): 56x56 -> 8 x 28 tiles (PY 2,
//    PX 4, 256 threads, 67 KB shared); 28x28 -> 16 x 14 (PY 4, PX 2); 14x14 -> one 16 x 14
//    tile; 7x7 -> one 8 x 7 tile (PY 2, PX 1, 64 threads).
//  - grad-weight uses the same tiles with the roles of filter and input swapped: the block
//    copies the input tile and the dout tile (TH x TW x 32) into shared memory; each thread
//    holds its RH x RW dout values in registers and accumulates the k x k filter gradient (and
//    the bias gradient) of its channel in registers. A block loops over a fixed run of images
//    (about 2048 blocks in all), then sums its P warps' partials in a fixed tree through shared
//    memory and writes k*k + 1 rows (taps, then bias) x 32 channels of partials to the
//    workspace. A second kernel sums the partials over blocks in a fixed order. No float
//    atomics anywhere: results are bitwise reproducible run to run.
//  - grad-bias alone (no grad-weight) is a plain two-pass column sum over dout.
//
// ---- bf16 (mixed precision) ---------------------------------------------------------------------
// Activations (in, dout, out, din) may be bf16; weight, bias, dweight, dbias and the partials
// stay fp32. The kernels are templated on the activations' storage type T (float or
// __nv_bfloat16), and a bf16 tile is widened to fp32 as it is staged into shared memory: the
// shared tiles, the register blocks and every inner loop are the fp32 ones, only the global
// traffic is halved, and each bf16 output is rounded once when stored (to nearest even). cp.async
// copies bytes and cannot convert, so bf16 values pass through registers: each thread issues a
// batch of loads (16-byte packs of 8 bf16 along C when C % 8 == 0 and the tensor is 16-byte
// aligned, single bf16 otherwise) before it widens and stores any of them, which keeps several
// loads in flight per thread as the cp.async copies do. The fp32 instantiations are unchanged.
//
// Sizes: offsets into tensors are int64_t; per-dimension sizes (H, W, C) and the number of
// blocks are checked to fit in int on the host. gridDim.y (channel groups, or k*k + 1 rows in
// the final sum) is checked to be <= 65535.
#include <cuda_bf16.h>

#include <algorithm>
#include <climits>
#include <cstdint>

#include "kernels/cuda/launch.cuh"
#include "kernels/cuda/vec.cuh"
#include "kernels/dwconv.h"
#include "tensor/cuda_check.h"
#include "tensor/error.h"

namespace cnx::cuda {

namespace {

using detail::from_float;
using detail::to_float;

constexpr int kGroup = 32;            // channels per block: one per lane of a warp
constexpr int kMaxPixelThreads = 8;   // warps per block (blockDim.y); 256 threads
constexpr int kMaxThreads = kGroup * kMaxPixelThreads;
constexpr int kReduceRows = 8;        // blockDim.y of the grad-bias-only first pass (256 threads)
constexpr int kFinalizeRows = 32;     // blockDim.y of the partials' final sum (1024 threads):
                                      // ~600 partials at stage 0 make ~19 loads per thread
// Grad-weight: how many blocks to aim for (each block then loops over N / split images).
// Enough for ~7 waves of 2 blocks on 132 SMs, so the tail wave costs little; few enough that
// the partials (k*k + 1 rows of 32 channels per block) stay a few % of the traffic.
constexpr int64_t kWgradTargetBlocks = 2048;
// Grad-bias alone: blocks to aim for in the first pass.
constexpr int64_t kBiasTargetBlocks = 1024;

// Register block: RH output rows per thread. 4 up to k = 7 (28 accumulators next to 49 filter
// taps); 2 for k = 9, 11, whose 81 / 121 taps leave less room.
template <int K> constexpr int kRowsPerThread = K <= 7 ? 4 : 2;
// Blocks per SM that the register budget must allow (__launch_bounds__): 2 up to k = 7
// (<= 128 registers), 1 above (k = 11 needs ~150 to keep its filter in registers).
template <int K> constexpr int kMinBlocks = K <= 7 ? 2 : 1;
// bf16 grad-weight: 16-byte loads in flight per thread while staging a tile (copy_rect): 2, so
// that at k = 7 the 49 partial sums, the staging and the walk fit the 128 registers of two
// blocks an SM (nvcc 13.0, sm_80 and sm_90: 128 registers, no spill;
// tools/check_kernel_resources.py checks sm_90 in every test run).
constexpr int kWgradPacks = 2;
constexpr int kWideRW = 7;    // outputs per thread along W: ConvNeXt widths are multiples of 7
constexpr int kNarrowRW = 4;  // ... or 4 where that wastes fewer columns

int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// ================================ cp.async helpers ================================
// Asynchronous global -> shared copies (sm_80+). The copies of one thread complete at
// cp_async_wait_all(); a __syncthreads() after it makes every thread's copies visible.
// Inline PTX, which a host compiler cannot take: the emulated device (kernels/cuda/emulator/,
// built by g++) gets the same contract from cnx::emu::cp_async, whose copy lands at the
// thread's next cp_async_wait_all(). nvcc compiles the PTX bodies below, as before.
#if defined(CNX_CUDA_EMULATOR) && CNX_CUDA_EMULATOR
__device__ __forceinline__ void cp_async16(float* smem, const float* gmem) {
  ::cnx::emu::cp_async(smem, gmem, 16);
}
__device__ __forceinline__ void cp_async4(float* smem, const float* gmem) {
  ::cnx::emu::cp_async(smem, gmem, 4);
}
__device__ __forceinline__ void cp_async_wait_all() { ::cnx::emu::cp_async_wait_all(); }
#else
__device__ __forceinline__ void cp_async16(float* smem, const float* gmem) {
  const unsigned s = static_cast<unsigned>(__cvta_generic_to_shared(smem));
  const size_t g = __cvta_generic_to_global(gmem);
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16;\n" ::"r"(s), "l"(g) : "memory");
}
__device__ __forceinline__ void cp_async4(float* smem, const float* gmem) {
  const unsigned s = static_cast<unsigned>(__cvta_generic_to_shared(smem));
  const size_t g = __cvta_generic_to_global(gmem);
  asm volatile("cp.async.ca.shared.global [%0], [%1], 4;\n" ::"r"(s), "l"(g) : "memory");
}
__device__ __forceinline__ void cp_async_wait_all() {
  asm volatile("cp.async.commit_group;\ncp.async.wait_group 0;\n" ::: "memory");
}
#endif

// ================================ tiles ================================
// Where a block's tile lies, shared by the conv and grad-weight kernels. Plain ints: the host
// checked that every size fits.
struct TileGeom {
  int H, W, C;        // image size, channels
  int TH, TW;         // output tile
  int in_h, in_w;     // input tile: TH + k - 1, TW + k - 1
  int PX;             // pixel threads along W (blockDim.y = PX * PY)
  int tiles_x;        // tiles along W
  int tiles;          // tiles per image
};

// Starts copying rows x cols pixels of image n, top-left pixel (h0, w0), channels
// [c0, c0 + 32), from src into dst (rows, cols, 32), with zeros where the pixel is outside the
// image or the channel >= C. VEC: 16-byte copies (C % 4 == 0 and src 16-byte aligned, so a
// float4 along C is wholly inside [0, C) or wholly outside; a warp copies 4 pixels x 128
// contiguous bytes); else 4-byte copies (a warp copies one pixel, 128 contiguous bytes when all
// 32 channels exist). The caller waits (cp_async_wait_all) and synchronises before reading.
//
// Element e (a float4 or a float) of the tile is pixel e / per_pix, part e % per_pix. Each thread
// starts at e = tid and strides by the block size, a multiple of 32 and so of per_pix: its part
// (channel) never changes and its pixel advances by a fixed step, so the pixel's (row, column)
// and source offset are updated by additions instead of a division and a 64-bit product per
// element.
template <bool VEC>
__device__ __forceinline__ void copy_rect_impl(float* dst,                     // (rows, cols, 32)
                                               const float* __restrict__ src,  // (N, H, W, C)
                                               const TileGeom& g, int n, int h0, int w0,
                                               int rows, int cols, int c0) {
  constexpr int per_pix = VEC ? kGroup / 4 : kGroup;  // float4s or floats per pixel
  const int tid = threadIdx.y * kGroup + threadIdx.x;
  const int step = blockDim.y * kGroup / per_pix;     // pixels per stride
  const int part = tid % per_pix;
  const int ch = c0 + (VEC ? 4 * part : part);        // this thread's (first) channel
  const bool ch_ok = ch < g.C;
  const int step_r = step / cols, step_c = step % cols;
  int r = (tid / per_pix) / cols, col = (tid / per_pix) % cols;
  const int64_t row_elems = static_cast<int64_t>(g.W) * g.C;  // one image row of src
  const int64_t step_off = step_r * row_elems + static_cast<int64_t>(step_c) * g.C;
  const int64_t wrap_off = row_elems - static_cast<int64_t>(cols) * g.C;
  // src offset of (h0 + r, w0 + col, ch) in image n (negative or past the end when outside:
  // only dereferenced inside the image).
  int64_t off = (static_cast<int64_t>(h0 + r) * g.W + (w0 + col)) * g.C + ch;
  const float* img = src + static_cast<int64_t>(n) * g.H * row_elems;
  float* d = dst + (r * cols + col) * kGroup + (VEC ? 4 * part : part);
  for (; r < rows; d += step * kGroup) {
    const int h = h0 + r, w = w0 + col;
    if (ch_ok && h >= 0 && h < g.H && w >= 0 && w < g.W) {
      if constexpr (VEC) cp_async16(d, img + off); else cp_async4(d, img + off);
    } else {
      if constexpr (VEC) *reinterpret_cast<float4*>(d) = make_float4(0.f, 0.f, 0.f, 0.f);
      else *d = 0.f;
    }
    col += step_c;
    r += step_r;
    off += step_off;
    if (col >= cols) {
      col -= cols;
      ++r;
      off += wrap_off;
    }
  }
}

// (kPacks matters only to the bf16 overload below: cp.async needs no register staging.)
template <int kPacks = 4>
__device__ __forceinline__ void copy_rect(float* dst, const float* __restrict__ src,
                                          const TileGeom& g, bool vec, int n, int h0, int w0,
                                          int rows, int cols, int c0) {
  if (vec)
    copy_rect_impl<true>(dst, src, g, n, h0, w0, rows, cols, c0);
  else
    copy_rect_impl<false>(dst, src, g, n, h0, w0, rows, cols, c0);
}

// bf16 source: the same rectangle, widened to fp32 on the way (see "bf16" at the top). VEC:
// 16-byte loads of 8 bf16 (C % 8 == 0 and src 16-byte aligned; a warp loads 8 pixels x 64
// contiguous bytes), each stored as two float4; else 2-byte loads (a warp loads one pixel's 32
// channels, 64 contiguous bytes). The walk over the tile is copy_rect_impl's. A thread loads
// kBatch elements (kPacks packs, or 2 kPacks scalars) into registers before it stores any, so
// that they are in flight together. The stores are ordinary shared-memory stores: the caller's
// cp_async_wait_all and barrier (there for the fp32 filter copies anyway) make them visible.
template <bool VEC, int kPacks>
__device__ __forceinline__ void widen_rect_impl(float* dst,                              // (rows, cols, 32)
                                                const __nv_bfloat16* __restrict__ src,  // (N, H, W, C)
                                                const TileGeom& g, int n, int h0, int w0,
                                                int rows, int cols, int c0) {
  using Pack = detail::Pack<__nv_bfloat16>;
  using Elem = std::conditional_t<VEC, Pack, __nv_bfloat16>;
  constexpr int kPer = VEC ? Pack::kN : 1;     // channels per element
  constexpr int per_pix = kGroup / kPer;       // elements per pixel
  constexpr int kBatch = VEC ? kPacks : 2 * kPacks;
  const int tid = threadIdx.y * kGroup + threadIdx.x;
  const int step = blockDim.y * kGroup / per_pix;     // pixels per stride
  const int part = tid % per_pix;
  const int ch = c0 + kPer * part;                    // this thread's (first) channel
  const bool ch_ok = ch < g.C;
  const int step_r = step / cols, step_c = step % cols;
  int r = (tid / per_pix) / cols, col = (tid / per_pix) % cols;
  const int64_t row_elems = static_cast<int64_t>(g.W) * g.C;  // one image row of src
  const int64_t step_off = step_r * row_elems + static_cast<int64_t>(step_c) * g.C;
  const int64_t wrap_off = row_elems - static_cast<int64_t>(cols) * g.C;
  int64_t off = (static_cast<int64_t>(h0 + r) * g.W + (w0 + col)) * g.C + ch;
  const __nv_bfloat16* img = src + static_cast<int64_t>(n) * g.H * row_elems;
  float* d = dst + (r * cols + col) * kGroup + kPer * part;
  const int d_step = step * kGroup;  // floats between a thread's consecutive elements
  while (r < rows) {
    Elem v[kBatch];
    int count = 0;  // elements of this batch inside the rectangle (the rest of the batch: none)
#pragma unroll
    for (int b = 0; b < kBatch; ++b) {
      if (r >= rows) break;
      const int h = h0 + r, w = w0 + col;
      if (ch_ok && h >= 0 && h < g.H && w >= 0 && w < g.W) {
        if constexpr (VEC) v[b] = detail::load_pack(img + off); else v[b] = img[off];
      } else {
        v[b] = Elem{};  // zero bits: +0.0
      }
      ++count;
      col += step_c;
      r += step_r;
      off += step_off;
      if (col >= cols) {
        col -= cols;
        ++r;
        off += wrap_off;
      }
    }
#pragma unroll
    for (int b = 0; b < kBatch; ++b) {
      if (b >= count) break;
      float* e = d + b * d_step;
      if constexpr (VEC) {
        *reinterpret_cast<float4*>(e) = make_float4(to_float(v[b].v[0]), to_float(v[b].v[1]),
                                                    to_float(v[b].v[2]), to_float(v[b].v[3]));
        *reinterpret_cast<float4*>(e + 4) = make_float4(to_float(v[b].v[4]), to_float(v[b].v[5]),
                                                        to_float(v[b].v[6]), to_float(v[b].v[7]));
      } else {
        *e = to_float(v[b]);
      }
    }
    d += count * d_step;
  }
}

// kPacks: 16-byte loads in flight per thread. The conv kernel stages before its filter and
// accumulators are live and can afford 4 (64 bytes a thread: at 256 threads and 2 blocks an SM,
// 32 KB in flight an SM, about what covers DRAM latency at full bandwidth); the grad-weight
// kernel stages while its k*k partial sums are live and takes kWgradPacks.
template <int kPacks = 4>
__device__ __forceinline__ void copy_rect(float* dst, const __nv_bfloat16* __restrict__ src,
                                          const TileGeom& g, bool vec, int n, int h0, int w0,
                                          int rows, int cols, int c0) {
  if (vec)
    widen_rect_impl<true, kPacks>(dst, src, g, n, h0, w0, rows, cols, c0);
  else
    widen_rect_impl<false, kPacks>(dst, src, g, n, h0, w0, rows, cols, c0);
}

// Starts copying the block's channels of weight (k*k, C) and bias (C) into dst (k*k + 1, 32):
// rows 0 .. k*k-1 the taps, row k*k the bias; zeros for channels >= C and for a null bias.
template <int K>
__device__ __forceinline__ void copy_filter(float* dst,                        // (K*K + 1, 32)
                                            const float* __restrict__ weight,  // (K, K, C)
                                            const float* __restrict__ bias,    // (C) or null
                                            int C, int c0) {
  const int tid = threadIdx.y * kGroup + threadIdx.x;
  const int nthreads = blockDim.y * kGroup;
  for (int e = tid; e < (K * K + 1) * kGroup; e += nthreads) {
    const int tap = e / kGroup, c = c0 + e % kGroup;
    if (c < C && tap < K * K)
      cp_async4(dst + e, weight + static_cast<int64_t>(tap) * C + c);
    else if (c < C && bias != nullptr)  // tap == K * K
      cp_async4(dst + e, bias + c);
    else
      dst[e] = 0.f;
  }
}

// ================================ forward and grad-input ================================
// out = conv(src, filter) [+ bias], the filter being weight[p, q] or, with flip,
// weight[k-1-p, k-1-q] (grad-input: src = dout, out = din, no bias). T: the activations' type,
// float or __nv_bfloat16; the filter and bias are fp32 either way.
template <class T>
struct ConvArgs {
  T* out;               // (N, H, W, C)
  const T* src;         // (N, H, W, C)
  const float* weight;  // (k, k, C)
  const float* bias;    // (C) or null
  bool flip;
  bool vec;             // src: C a multiple of a 16-byte pack (4 floats, 8 bf16), 16-byte aligned
  TileGeom g;
};

// grid: x = n * tiles + tile (tile = tile_y * tiles_x + tile_x), y = channel group.
// block: (32, P). Dynamic shared memory: (in_h * in_w + k*k + 1) * 32 floats (for either T).
template <class T, int K, int RH, int RW>
__global__ void __launch_bounds__(kMaxThreads, kMinBlocks<K>) dwconv_conv_kernel(ConvArgs<T> a) {
  constexpr int R = K / 2;
  CNX_EXTERN_SHARED(float4, smem_f4);  // float4: 16-byte alignment for the 16-byte copies
  const TileGeom& g = a.g;
  float* s_tile = reinterpret_cast<float*>(smem_f4);  // (in_h, in_w, 32)
  float* s_filt = s_tile + g.in_h * g.in_w * kGroup;  // (K*K + 1, 32)

  const int n = static_cast<int>(blockIdx.x / g.tiles);
  const int tile = static_cast<int>(blockIdx.x % g.tiles);
  const int oh0 = (tile / g.tiles_x) * g.TH, ow0 = (tile % g.tiles_x) * g.TW;  // tile origin
  const int c0 = blockIdx.y * kGroup;
  // Every global read of the block is in flight at once: the input tile and the filter.
  copy_rect(s_tile, a.src, g, a.vec, n, oh0 - R, ow0 - R, g.in_h, g.in_w, c0);
  copy_filter<K>(s_filt, a.weight, a.bias, g.C, c0);
  cp_async_wait_all();
  __syncthreads();  // the only barrier: threads with nothing to do may leave below

  // This thread's channel and register block: outputs (h0 .. h0+RH-1, w0 .. w0+RW-1). Its
  // input window starts at the same tile-local position (lh0, lw0), since the tile starts r
  // before the outputs.
  const int lane = threadIdx.x;
  const int c = c0 + lane;
  const int py = threadIdx.y / g.PX, px = threadIdx.y % g.PX;
  const int lh0 = py * RH, lw0 = px * RW;
  const int h0 = oh0 + lh0, w0 = ow0 + lw0;
  if (c >= g.C || h0 >= g.H || w0 >= g.W) return;

  float wr[K][K];
#pragma unroll
  for (int p = 0; p < K; ++p)
#pragma unroll
    for (int q = 0; q < K; ++q) {
      const int tap = a.flip ? (K - 1 - p) * K + (K - 1 - q) : p * K + q;
      wr[p][q] = s_filt[tap * kGroup + lane];
    }
  float acc[RH][RW];
#pragma unroll
  for (int i = 0; i < RH; ++i)
#pragma unroll
    for (int j = 0; j < RW; ++j) acc[i][j] = s_filt[K * K * kGroup + lane];  // bias (0 if none)

  // Input row ir of the window feeds output row i through filter row p = ir - i. Per output,
  // the terms are added in the reference's order: bias, then p ascending, then q ascending.
  const float* win = s_tile + (lh0 * g.in_w + lw0) * kGroup + lane;
#pragma unroll
  for (int ir = 0; ir < RH + K - 1; ++ir) {
    float x[RW + K - 1];
#pragma unroll
    for (int j = 0; j < RW + K - 1; ++j) x[j] = win[(ir * g.in_w + j) * kGroup];
#pragma unroll
    for (int i = 0; i < RH; ++i) {
      const int p = ir - i;
      if (p < 0 || p >= K) continue;  // resolved at compile time
#pragma unroll
      for (int q = 0; q < K; ++q)
#pragma unroll
        for (int j = 0; j < RW; ++j) acc[i][j] = fmaf(x[j + q], wr[p][q], acc[i][j]);
    }
  }

  T* o = a.out + ((static_cast<int64_t>(n) * g.H + h0) * g.W + w0) * g.C + c;
#pragma unroll
  for (int i = 0; i < RH; ++i) {
    if (h0 + i >= g.H) break;
#pragma unroll
    for (int j = 0; j < RW; ++j)
      if (w0 + j < g.W) o[(static_cast<int64_t>(i) * g.W + j) * g.C] = from_float<T>(acc[i][j]);
  }
}

// ================================ grad-weight (+ grad-bias) ================================
// T: the activations' type (float or __nv_bfloat16); the partials are fp32 either way.
template <class T>
struct WgradArgs {
  float* partials;     // (gridDim.x, k*k + 1, C_pad): per block, the k*k taps then the bias
  const T* dout;       // (N, H, W, C)
  const T* in;         // (N, H, W, C)
  int N;
  int images_per_block;  // block x covers images [split * ipb, min(N, (split+1) * ipb))
  int C_pad;             // channel groups * 32
  bool vec_in, vec_dout; // C a multiple of a 16-byte pack and that tensor 16-byte aligned
  TileGeom g;            // tiles of the output (= dout) with the input halo
};

// grid: x = split * tiles + tile, y = channel group; block (32, P). Dynamic shared memory:
// max(in_h * in_w + TH * TW, (P / 2) * (k*k + 1)) * 32 floats (for either T).
template <class T, int K, int RH, int RW>
__global__ void __launch_bounds__(kMaxThreads, kMinBlocks<K>)
    dwconv_wgrad_kernel(WgradArgs<T> a) {
  constexpr int R = K / 2;
  constexpr int KK = K * K;
  CNX_EXTERN_SHARED(float4, smem_f4);
  const TileGeom& g = a.g;
  float* s_tile = reinterpret_cast<float*>(smem_f4);  // (in_h, in_w, 32): in, with halo
  float* s_dout = s_tile + g.in_h * g.in_w * kGroup;  // (TH, TW, 32): dout (16-byte aligned)

  const int split = static_cast<int>(blockIdx.x / g.tiles);
  const int tile = static_cast<int>(blockIdx.x % g.tiles);
  const int oh0 = (tile / g.tiles_x) * g.TH, ow0 = (tile % g.tiles_x) * g.TW;
  const int c0 = blockIdx.y * kGroup;
  const int lane = threadIdx.x;
  const int py = threadIdx.y / g.PX, px = threadIdx.y % g.PX;
  const int lh0 = py * RH, lw0 = px * RW;
  // Threads whose register block lies outside the image, or whose channel does not exist,
  // still copy and synchronise; they just add nothing.
  const bool active = c0 + lane < g.C && oh0 + lh0 < g.H && ow0 + lw0 < g.W;

  float acc[K][K];  // this thread's partial dweight[p, q, c]
#pragma unroll
  for (int p = 0; p < K; ++p)
#pragma unroll
    for (int q = 0; q < K; ++q) acc[p][q] = 0.f;
  float db = 0.f;   // ... and dbias[c]

  const int n_begin = split * a.images_per_block;
  const int n_end = min(a.N, n_begin + a.images_per_block);
  for (int n = n_begin; n < n_end; ++n) {  // block-uniform bounds: the barriers are safe
    copy_rect<kWgradPacks>(s_tile, a.in, g, a.vec_in, n, oh0 - R, ow0 - R, g.in_h, g.in_w, c0);
    copy_rect<kWgradPacks>(s_dout, a.dout, g, a.vec_dout, n, oh0, ow0, g.TH, g.TW, c0);
    cp_async_wait_all();
    __syncthreads();

    if (active) {
      // dout at this thread's outputs (0 outside the image).
      float gr[RH][RW];
#pragma unroll
      for (int i = 0; i < RH; ++i)
#pragma unroll
        for (int j = 0; j < RW; ++j)
          gr[i][j] = s_dout[((lh0 + i) * g.TW + lw0 + j) * kGroup + lane];
#pragma unroll
      for (int i = 0; i < RH; ++i)
#pragma unroll
        for (int j = 0; j < RW; ++j) db += gr[i][j];

      const float* win = s_tile + (lh0 * g.in_w + lw0) * kGroup + lane;
#pragma unroll
      for (int ir = 0; ir < RH + K - 1; ++ir) {
        float x[RW + K - 1];
#pragma unroll
        for (int j = 0; j < RW + K - 1; ++j) x[j] = win[(ir * g.in_w + j) * kGroup];
#pragma unroll
        for (int i = 0; i < RH; ++i) {
          const int p = ir - i;
          if (p < 0 || p >= K) continue;  // resolved at compile time
#pragma unroll
          for (int q = 0; q < K; ++q)
#pragma unroll
            for (int j = 0; j < RW; ++j) acc[p][q] = fmaf(gr[i][j], x[j + q], acc[p][q]);
        }
      }
    }
    __syncthreads();  // everyone is done reading the tiles before they are overwritten
  }

  // Sum the P warps' partials in a fixed tree: each round, warps [half, live) hand theirs to
  // warps [0, live - half) through shared memory (slot = receiver), until warp 0 holds the sum.
  // The tree depends only on P, so the order of additions is the same on every run.
  float* red = s_tile;  // (P / 2, KK + 1, 32), reusing the tiles' memory
  const int pt = threadIdx.y;
  for (int live = blockDim.y; live > 1;) {
    const int half = (live + 1) / 2;
    if (pt >= half && pt < live) {
      float* slot = red + (pt - half) * (KK + 1) * kGroup + lane;
#pragma unroll
      for (int p = 0; p < K; ++p)
#pragma unroll
        for (int q = 0; q < K; ++q) slot[(p * K + q) * kGroup] = acc[p][q];
      slot[KK * kGroup] = db;
    }
    __syncthreads();
    if (pt < live - half) {
      const float* slot = red + pt * (KK + 1) * kGroup + lane;
#pragma unroll
      for (int p = 0; p < K; ++p)
#pragma unroll
        for (int q = 0; q < K; ++q) acc[p][q] += slot[(p * K + q) * kGroup];
      db += slot[KK * kGroup];
    }
    __syncthreads();  // the slots are read before the next round overwrites them
    live = half;
  }

  if (pt == 0) {
    // Every lane writes, channels >= C included (zeros): the finaliser reads whole groups.
    float* out = a.partials + static_cast<int64_t>(blockIdx.x) * (KK + 1) * a.C_pad + c0 + lane;
#pragma unroll
    for (int p = 0; p < K; ++p)
#pragma unroll
      for (int q = 0; q < K; ++q) out[static_cast<int64_t>(p * K + q) * a.C_pad] = acc[p][q];
    out[static_cast<int64_t>(KK) * a.C_pad] = db;
  }
}

// Grad-bias alone, first pass: partials[s, c] = sum of dout rows [s * rpb, (s+1) * rpb) of
// channel c (a row is one pixel's C channels), summed in fp32 for either T. grid: x = split s,
// y = channel group; block (32, kReduceRows).
template <class T>
__global__ void __launch_bounds__(kGroup * kReduceRows)
    dwconv_bias_partials_kernel(float* __restrict__ partials,     // (gridDim.x, C_pad)
                                const T* __restrict__ dout,       // (rows, C)
                                int64_t rows, int C, int C_pad, int64_t rows_per_block) {
  __shared__ float part[kReduceRows][kGroup];
  const int lane = threadIdx.x, ty = threadIdx.y;
  const int c = blockIdx.y * kGroup + lane;
  const int64_t r0 = static_cast<int64_t>(blockIdx.x) * rows_per_block;
  const int64_t r1 = r0 + rows_per_block < rows ? r0 + rows_per_block : rows;
  float s = 0.f;
  if (c < C)
    for (int64_t r = r0 + ty; r < r1; r += kReduceRows) s += to_float(__ldg(dout + r * C + c));
  part[ty][lane] = s;
  __syncthreads();
  if (ty == 0) {
    float total = 0.f;
#pragma unroll
    for (int j = 0; j < kReduceRows; ++j) total += part[j][lane];
    partials[static_cast<int64_t>(blockIdx.x) * C_pad + c] = total;
  }
}

// Second pass: sums partials (nparts, nrows, C_pad) over parts in a fixed order. Rows
// 0 .. nrows-2 are the taps of dweight (nrows - 1 = k*k of them), row nrows-1 is dbias.
// grid: x = channel group, y = row; block (32, kFinalizeRows): warp j sums parts j, j+32, ...
// in order, then warp 0 adds the 32 sums in order.
__global__ void __launch_bounds__(kGroup * kFinalizeRows)
    dwconv_wgrad_finalize_kernel(float* __restrict__ dweight,        // (k, k, C) or null
                                 float* __restrict__ dbias,          // (C) or null
                                 const float* __restrict__ partials, // (nparts, nrows, C_pad)
                                 int nparts, int nrows, int C, int C_pad) {
  __shared__ float part[kFinalizeRows][kGroup];
  const int lane = threadIdx.x, ty = threadIdx.y;
  const int c = blockIdx.x * kGroup + lane;
  const int row = blockIdx.y;
  float s = 0.f;
  for (int b = ty; b < nparts; b += kFinalizeRows)
    s += __ldg(partials + (static_cast<int64_t>(b) * nrows + row) * C_pad + c);
  part[ty][lane] = s;
  __syncthreads();
  if (ty == 0 && c < C) {
    float total = 0.f;
#pragma unroll
    for (int j = 0; j < kFinalizeRows; ++j) total += part[j][lane];
    if (row < nrows - 1) {
      if (dweight) dweight[static_cast<int64_t>(row) * C + c] = total;
    } else if (dbias) {
      dbias[c] = total;
    }
  }
}

// ================================ host: plans ================================
// The tiling for one shape: register-block variant, pixel-thread grid, tiles.
struct Plan {
  bool wide = true;  // RW = kWideRW, else kNarrowRW
  int RH = 4, RW = 7;
  int PX = 1, PY = 1;
  TileGeom g{};
  int64_t tiles = 0;   // per image
  int64_t groups = 0;  // channel groups of 32
  size_t tile_bytes() const { return size_t(g.in_h) * g.in_w * kGroup * sizeof(float); }
  size_t out_tile_bytes() const { return size_t(g.TH) * g.TW * kGroup * sizeof(float); }
};

Plan plan_tiles(int64_t H, int64_t W, int64_t C, int64_t k) {
  Plan pl;
  pl.RH = k <= 7 ? 4 : 2;
  // The RW that pads W the least (compute on padded columns is wasted); ties go to 7.
  pl.wide = ceil_div(W, kWideRW) * kWideRW <= ceil_div(W, kNarrowRW) * kNarrowRW;
  pl.RW = pl.wide ? kWideRW : kNarrowRW;
  const int64_t bx = ceil_div(W, pl.RW), by = ceil_div(H, pl.RH);  // register blocks per image
  // Fewest pixels copied into shared memory over all P = PX * PY <= 8 (the halo overhead),
  // then fewest tiles; deterministic.
  int64_t best_fill = -1, best_tiles = 0;
  for (int py = 1; py <= kMaxPixelThreads && py <= by; ++py)
    for (int px = 1; px * py <= kMaxPixelThreads && px <= bx; ++px) {
      const int64_t tiles = ceil_div(bx, px) * ceil_div(by, py);
      const int64_t fill = tiles * (py * pl.RH + k - 1) * (px * pl.RW + k - 1);
      if (best_fill < 0 || fill < best_fill || (fill == best_fill && tiles < best_tiles)) {
        best_fill = fill;
        best_tiles = tiles;
        pl.PX = px;
        pl.PY = py;
      }
    }
  pl.g.H = static_cast<int>(H);
  pl.g.W = static_cast<int>(W);
  pl.g.C = static_cast<int>(C);
  pl.g.TH = pl.PY * pl.RH;
  pl.g.TW = pl.PX * pl.RW;
  pl.g.in_h = pl.g.TH + static_cast<int>(k) - 1;
  pl.g.in_w = pl.g.TW + static_cast<int>(k) - 1;
  pl.g.PX = pl.PX;
  pl.g.tiles_x = static_cast<int>(ceil_div(W, pl.g.TW));
  pl.tiles = pl.g.tiles_x * ceil_div(H, pl.g.TH);
  pl.g.tiles = static_cast<int>(pl.tiles);
  pl.groups = ceil_div(C, kGroup);
  return pl;
}

// Grad-weight: the tiles above, plus how the batch is split over blocks.
struct WgradPlan {
  Plan tiles;
  int64_t images_per_block = 1;
  int64_t splits = 1;  // ceil(N / images_per_block)
  int64_t kk = 0;       // taps: k * k
  int64_t nparts() const { return splits * tiles.tiles; }  // blocks per channel group
  int64_t rows() const { return kk + 1; }                   // partial rows: the taps, the bias
  int64_t partial_floats() const { return nparts() * rows() * tiles.groups * kGroup; }
};

WgradPlan plan_wgrad(int64_t N, int64_t H, int64_t W, int64_t C, int64_t k) {
  WgradPlan wp;
  wp.tiles = plan_tiles(H, W, C, k);
  wp.kk = k * k;
  const int64_t per_image = wp.tiles.tiles * wp.tiles.groups;
  const int64_t target_splits = std::clamp<int64_t>(ceil_div(kWgradTargetBlocks, per_image), 1, N);
  wp.images_per_block = ceil_div(N, target_splits);
  wp.splits = ceil_div(N, wp.images_per_block);
  return wp;
}

// Grad-bias alone: rows (pixels) per block of the first pass, and the number of blocks.
struct BiasPlan {
  int64_t rows_per_block = 1, splits = 1;
};

BiasPlan plan_bias(int64_t rows, int64_t C) {
  BiasPlan bp;
  const int64_t groups = ceil_div(C, kGroup);
  const int64_t target_splits = std::clamp<int64_t>(ceil_div(kBiasTargetBlocks, groups), 1, rows);
  bp.rows_per_block = ceil_div(rows, target_splits);
  bp.splits = ceil_div(rows, bp.rows_per_block);
  return bp;
}

void check_sizes(const char* op, int64_t N, int64_t H, int64_t W, int64_t C, int64_t k) {
  CNX_CHECK(k >= 3 && k <= 11 && k % 2 == 1, op, ": CUDA kernel size ", k,
            " is not supported (odd k from 3 to 11)");
  CNX_CHECK(N >= 0 && H >= 0 && W >= 0 && C >= 0, op, ": negative size");
  CNX_CHECK(N <= INT_MAX / 2 && H <= INT_MAX / 2 && W <= INT_MAX / 2 && C <= INT_MAX, op,
            ": a dimension is too large for the CUDA kernels (N ", N, " H ", H, " W ", W, " C ", C,
            ")");
  CNX_CHECK(ceil_div(C, kGroup) <= 65535, op, ": C = ", C, " needs more than 65535 channel groups");
}

// Allows `bytes` of dynamic shared memory for `kernel` (needed above 48 KiB) on the current device.
template <class Kernel>
void allow_smem(Kernel kernel, size_t bytes) {
  if (bytes > 48 * 1024)
    CNX_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                        static_cast<int>(bytes)));
}

// True when a tensor of T with C channels starting at p can be copied in 16-byte packs: C a
// multiple of the pack (4 floats, 8 bf16) and p 16-byte aligned (then every pixel's first
// channel is too, and a pack along C is wholly inside [0, C) or wholly outside).
template <class T>
bool packs_ok(const T* p, int64_t C) {
  return C % detail::Pack<T>::kN == 0 && detail::aligned16(p);
}

// ================================ host: launches ================================
// T (here and below): float or __nv_bfloat16, the activations' type.
template <class T, int K, int RH, int RW>
void launch_conv(const ConvArgs<T>& a, const Plan& pl, int64_t N, cudaStream_t stream) {
  const int64_t blocks = N * pl.tiles;
  CNX_CHECK(blocks <= INT_MAX, "dwconv: too many blocks (", blocks, ")");
  const dim3 grid(static_cast<unsigned>(blocks), static_cast<unsigned>(pl.groups));
  const dim3 block(kGroup, static_cast<unsigned>(pl.PX * pl.PY));
  const size_t smem = pl.tile_bytes() + size_t(K * K + 1) * kGroup * sizeof(float);
  allow_smem(dwconv_conv_kernel<T, K, RH, RW>, smem);
  launch<dwconv_conv_kernel<T, K, RH, RW>>(grid, block, smem, stream, a);
  CNX_CUDA_LAUNCH_CHECK();
}

template <class T, int K>
void launch_conv_k(const ConvArgs<T>& a, const Plan& pl, int64_t N, cudaStream_t stream) {
  constexpr int RH = kRowsPerThread<K>;
  if (pl.wide)
    launch_conv<T, K, RH, kWideRW>(a, pl, N, stream);
  else
    launch_conv<T, K, RH, kNarrowRW>(a, pl, N, stream);
}

// out = conv(src, weight or its flip) [+ bias]: forward and grad-input.
template <class T>
void conv(T* out, const T* src, const float* weight, const float* bias, bool flip, int64_t N,
          int64_t H, int64_t W, int64_t C, int64_t k, cudaStream_t stream) {
  const Plan pl = plan_tiles(H, W, C, k);
  const ConvArgs<T> a{out, src, weight, bias, flip, packs_ok(src, C), pl.g};
  switch (k) {
    case 3: launch_conv_k<T, 3>(a, pl, N, stream); break;
    case 5: launch_conv_k<T, 5>(a, pl, N, stream); break;
    case 7: launch_conv_k<T, 7>(a, pl, N, stream); break;
    case 9: launch_conv_k<T, 9>(a, pl, N, stream); break;
    case 11: launch_conv_k<T, 11>(a, pl, N, stream); break;
    default: fail("dwconv: CUDA kernel size ", k, " is not supported");
  }
}

template <class T, int K, int RH, int RW>
void launch_wgrad(const WgradArgs<T>& a, const WgradPlan& wp, cudaStream_t stream) {
  const Plan& pl = wp.tiles;
  const int64_t blocks = wp.nparts();
  CNX_CHECK(blocks <= INT_MAX, "dwconv backward: too many blocks (", blocks, ")");
  const dim3 grid(static_cast<unsigned>(blocks), static_cast<unsigned>(pl.groups));
  const dim3 block(kGroup, static_cast<unsigned>(pl.PX * pl.PY));
  const size_t red_bytes = size_t(pl.PX * pl.PY / 2) * (K * K + 1) * kGroup * sizeof(float);
  const size_t smem = std::max(pl.tile_bytes() + pl.out_tile_bytes(), red_bytes);
  allow_smem(dwconv_wgrad_kernel<T, K, RH, RW>, smem);
  launch<dwconv_wgrad_kernel<T, K, RH, RW>>(grid, block, smem, stream, a);
  CNX_CUDA_LAUNCH_CHECK();
}

template <class T, int K>
void launch_wgrad_k(const WgradArgs<T>& a, const WgradPlan& wp, cudaStream_t stream) {
  constexpr int RH = kRowsPerThread<K>;
  if (wp.tiles.wide)
    launch_wgrad<T, K, RH, kWideRW>(a, wp, stream);
  else
    launch_wgrad<T, K, RH, kNarrowRW>(a, wp, stream);
}

void launch_finalize(float* dweight, float* dbias, const float* partials, int64_t nparts,
                     int64_t nrows, int64_t C, cudaStream_t stream) {
  const int64_t groups = ceil_div(C, kGroup);
  CNX_CHECK(nparts <= INT_MAX, "dwconv backward: too many partials (", nparts, ")");
  const dim3 grid(static_cast<unsigned>(groups), static_cast<unsigned>(nrows));
  const dim3 block(kGroup, kFinalizeRows);
  launch<dwconv_wgrad_finalize_kernel>(grid, block, 0, stream, dweight, dbias, partials,
                                       static_cast<int>(nparts), static_cast<int>(nrows),
                                       static_cast<int>(C), static_cast<int>(groups * kGroup));
  CNX_CUDA_LAUNCH_CHECK();
}

// ================================ host: the two directions ================================
// T: the activations' device type (float or __nv_bfloat16).
template <class T>
void forward(T* out, const T* in, const float* weight, const float* bias, int64_t N, int64_t H,
             int64_t W, int64_t C, int64_t k, cudaStream_t stream) {
  check_sizes("dwconv", N, H, W, C, k);
  if (N * H * W * C == 0) return;
  conv(out, in, weight, bias, /*flip=*/false, N, H, W, C, k, stream);
}

template <class T>
void backward(T* din, float* dweight, float* dbias, const T* dout, const T* in,
              const float* weight, int64_t N, int64_t H, int64_t W, int64_t C, int64_t k,
              float* workspace, cudaStream_t stream) {
  check_sizes("dwconv backward", N, H, W, C, k);
  if (C == 0) return;
  if (N * H * W == 0) {
    // Empty sums: the parameter gradients are zero (din has no elements).
    if (dweight)
      CNX_CUDA_CHECK(cudaMemsetAsync(dweight, 0, size_t(k * k * C) * sizeof(float), stream));
    if (dbias) CNX_CUDA_CHECK(cudaMemsetAsync(dbias, 0, size_t(C) * sizeof(float), stream));
    return;
  }

  if (din) conv(din, dout, weight, /*bias=*/nullptr, /*flip=*/true, N, H, W, C, k, stream);

  const int64_t groups = ceil_div(C, kGroup);
  const int64_t C_pad = groups * kGroup;
  CNX_CHECK(workspace != nullptr || (!dweight && !dbias), "dwconv backward: dweight/dbias need a ",
            "workspace of dwconv_backward_workspace_floats() floats, got null");
  if (dweight) {
    // Per-block partials of dweight and dbias, then their sum in a fixed order.
    const WgradPlan wp = plan_wgrad(N, H, W, C, k);
    const WgradArgs<T> a{workspace,
                         dout,
                         in,
                         static_cast<int>(N),
                         static_cast<int>(wp.images_per_block),
                         static_cast<int>(C_pad),
                         packs_ok(in, C),
                         packs_ok(dout, C),
                         wp.tiles.g};
    switch (k) {
      case 3: launch_wgrad_k<T, 3>(a, wp, stream); break;
      case 5: launch_wgrad_k<T, 5>(a, wp, stream); break;
      case 7: launch_wgrad_k<T, 7>(a, wp, stream); break;
      case 9: launch_wgrad_k<T, 9>(a, wp, stream); break;
      case 11: launch_wgrad_k<T, 11>(a, wp, stream); break;
      default: fail("dwconv backward: CUDA kernel size ", k, " is not supported");
    }
    launch_finalize(dweight, dbias, workspace, wp.nparts(), wp.rows(), C, stream);
  } else if (dbias) {
    // Bias alone: a column sum of dout (N*H*W, C), in two passes.
    const int64_t rows = N * H * W;
    const BiasPlan bp = plan_bias(rows, C);
    CNX_CHECK(bp.splits <= INT_MAX, "dwconv backward: too many blocks (", bp.splits, ")");
    const dim3 grid(static_cast<unsigned>(bp.splits), static_cast<unsigned>(groups));
    const dim3 block(kGroup, kReduceRows);
    launch<dwconv_bias_partials_kernel<T>>(grid, block, 0, stream, workspace, dout, rows,
                                           static_cast<int>(C), static_cast<int>(C_pad),
                                           bp.rows_per_block);
    CNX_CUDA_LAUNCH_CHECK();
    launch_finalize(nullptr, dbias, workspace, bp.splits, /*nrows=*/1, C, stream);
  }
}

}  // namespace

// ================================ launchers ================================
template <class T>
void dwconv_forward(std::type_identity_t<T>* out, const std::type_identity_t<T>* in,
                    const param_t<T>* weight, const param_t<T>* bias, int64_t N, int64_t H,
                    int64_t W, int64_t C, int64_t k, cudaStream_t stream) {
  forward(detail::dev(out), detail::dev(in), weight, bias, N, H, W, C, k, stream);
}

int64_t dwconv_backward_workspace_floats(int64_t N, int64_t H, int64_t W, int64_t C, int64_t k) {
  check_sizes("dwconv backward", N, H, W, C, k);
  if (N * H * W * C == 0) return 0;
  const int64_t wgrad = plan_wgrad(N, H, W, C, k).partial_floats();
  const int64_t bias_only = plan_bias(N * H * W, C).splits * ceil_div(C, kGroup) * kGroup;
  return std::max(wgrad, bias_only);
}

template <class T>
void dwconv_backward(std::type_identity_t<T>* din, param_t<T>* dweight, param_t<T>* dbias,
                     const std::type_identity_t<T>* dout, const std::type_identity_t<T>* in,
                     const param_t<T>* weight, int64_t N, int64_t H, int64_t W, int64_t C,
                     int64_t k, float* workspace, cudaStream_t stream) {
  backward(detail::dev(din), dweight, dbias, detail::dev(dout), detail::dev(in), weight, N, H, W,
           C, k, workspace, stream);
}

#define CNX_INSTANTIATE(T)                                                                      \
  template void dwconv_forward<T>(T*, const T*, const float*, const float*, int64_t, int64_t,   \
                                  int64_t, int64_t, int64_t, cudaStream_t);                     \
  template void dwconv_backward<T>(T*, float*, float*, const T*, const T*, const float*, int64_t, \
                                   int64_t, int64_t, int64_t, int64_t, float*, cudaStream_t);
CNX_INSTANTIATE(float)
CNX_INSTANTIATE(bf16)
#undef CNX_INSTANTIATE

}  // namespace cnx::cuda
