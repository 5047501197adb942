// cnx::cuda::patchify_forward / patchify_backward (kernels/patchify.h): space-to-depth into a
// patch matrix, then the linear GEMMs (kernels/cuda/linear.cu); backward scatters the patch
// gradient back (depth-to-space). One templated implementation for T = float and bf16: the
// gather and scatter only move elements (16-byte packs: 4 floats or 8 bf16), and the GEMMs are
// linear's launchers of the same T.
#include <cstdint>

#include "kernels/cuda/launch.cuh"
#include "kernels/cuda/vec.cuh"
#include "kernels/linear.h"
#include "kernels/patchify.h"
#include "tensor/cuda_check.h"
#include "tensor/cuda_context.h"
#include "tensor/cuda_memory.h"

namespace cnx::cuda {

namespace {

// Where element `col` of patch row `r` lives in the NHWC image: row r = (n, i, j) over
// (N, Ho, Wo); col = (p * k + q) * Ci + c over (k, k, Ci), so for a fixed p the k * Ci values
// (q, c) are contiguous in the image too: in[n, i*k + p, j*k + q, c].
struct PatchLayout {
  int64_t H, W, Ci, k, Ho, Wo;
  __device__ int64_t patch_cols() const { return k * k * Ci; }
  __device__ int64_t image_offset(int64_t r, int64_t col) const {
    const int64_t kCi = k * Ci;
    const int64_t p = col / kCi, qc = col - p * kCi;  // qc = q * Ci + c
    const int64_t j = r % Wo, ni = r / Wo;            // ni = n * Ho + i
    const int64_t i = ni % Ho, n = ni / Ho;
    return ((n * H + i * k + p) * W + j * k) * Ci + qc;
  }
};

constexpr int kThreads = 256;

unsigned int blocks_for(int64_t count) {
  const int64_t blocks = (count + kThreads - 1) / kThreads;
  return static_cast<unsigned int>(blocks < 65536 ? (blocks > 0 ? blocks : 1) : 65536);
}

using detail::aligned16;
using detail::Pack;

// P (rows, k*k*Ci) from the image, T float or __nv_bfloat16. kVec moves 16-byte packs of
// V = Pack<T>::kN elements (needs Ci % V == 0, so that V consecutive columns are V consecutive
// channels of one pixel, and 16-byte aligned buffers); otherwise V = 1.
template <bool kVec, class T>
__global__ void space_to_depth(T* __restrict__ P, const T* __restrict__ in, PatchLayout L,
                               int64_t rows) {
  constexpr int64_t V = kVec ? Pack<T>::kN : 1;
  const int64_t cols = L.patch_cols();
  const int64_t total = rows * cols / V;
  for (int64_t v = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; v < total;
       v += int64_t(gridDim.x) * blockDim.x) {
    const int64_t e = v * V, r = e / cols, col = e - r * cols;
    const int64_t src = L.image_offset(r, col);
    if constexpr (kVec) {
      detail::store_pack(P + e, detail::load_pack(in + src));
    } else {
      P[e] = in[src];
    }
  }
}

// din (N, H, W, Ci) from dP (rows, k*k*Ci): every element written once, 0 for the rows and
// columns the conv ignores (h >= Ho*k or w >= Wo*k). kVec and V as above.
template <bool kVec, class T>
__global__ void depth_to_space(T* __restrict__ din, const T* __restrict__ dP, PatchLayout L,
                               int64_t N) {
  constexpr int64_t V = kVec ? Pack<T>::kN : 1;
  const int64_t total = N * L.H * L.W * L.Ci / V;
  const int64_t cols = L.patch_cols();
  for (int64_t v = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; v < total;
       v += int64_t(gridDim.x) * blockDim.x) {
    const int64_t e = v * V;
    const int64_t c = e % L.Ci, pix = e / L.Ci;  // pix = (n * H + h) * W + w
    const int64_t w = pix % L.W, nh = pix / L.W;
    const int64_t h = nh % L.H, n = nh / L.H;
    const bool inside = h < L.Ho * L.k && w < L.Wo * L.k;
    int64_t src = 0;
    if (inside) {
      const int64_t i = h / L.k, p = h - i * L.k, j = w / L.k, q = w - j * L.k;
      src = ((n * L.Ho + i) * L.Wo + j) * cols + (p * L.k + q) * L.Ci + c;
    }
    if constexpr (kVec) {
      detail::store_pack(din + e, inside ? detail::load_pack(dP + src) : Pack<T>{});  // {}: zeros
    } else {
      din[e] = inside ? dP[src] : detail::from_float<T>(0.0f);
    }
  }
}

// T is float or __nv_bfloat16 (detail::dev of the launcher's pointers).
template <class T>
void gather_patches(T* P, const T* in, const PatchLayout& L, int64_t rows, cudaStream_t stream) {
  constexpr int64_t V = Pack<T>::kN;
  const int64_t count = rows * L.k * L.k * L.Ci;
  if (count == 0) return;
  if (L.Ci % V == 0 && aligned16(P) && aligned16(in)) {
    launch<space_to_depth<true, T>>(blocks_for(count / V), kThreads, 0, stream, P, in, L, rows);
  } else {
    launch<space_to_depth<false, T>>(blocks_for(count), kThreads, 0, stream, P, in, L, rows);
  }
  CNX_CUDA_LAUNCH_CHECK();
}

template <class T>
void scatter_patches(T* din, const T* dP, const PatchLayout& L, int64_t N, cudaStream_t stream) {
  constexpr int64_t V = Pack<T>::kN;
  const int64_t count = N * L.H * L.W * L.Ci;
  if (count == 0) return;
  if (L.Ci % V == 0 && aligned16(din) && aligned16(dP)) {
    launch<depth_to_space<true, T>>(blocks_for(count / V), kThreads, 0, stream, din, dP, L, N);
  } else {
    launch<depth_to_space<false, T>>(blocks_for(count), kThreads, 0, stream, din, dP, L, N);
  }
  CNX_CUDA_LAUNCH_CHECK();
}

// =============================================================================================
// forward
// =============================================================================================

// T is float or cnx::bf16 (the launchers' types); the kernels get detail::dev pointers.
template <class T>
void forward(T* out, const T* in, const T* weight, const float* bias, int64_t N, int64_t H, int64_t W,
             int64_t Ci, int64_t Co, int64_t k, cudaStream_t stream) {
  const PatchLayout L{H, W, Ci, k, H / k, W / k};
  const int64_t rows = N * L.Ho * L.Wo, cols = k * k * Ci;
  if (rows == 0 || Co == 0) return;  // out has no elements
  // k == 1: the image (N*H*W, Ci) is the patch matrix itself.
  ScratchBuffer patches;
  const T* P = in;
  if (k != 1) {
    patches = ScratchBuffer(rows * cols * static_cast<int64_t>(sizeof(T)), Device::cuda(current_device()));
    gather_patches(detail::dev(patches.as<T>()), detail::dev(in), L, rows, stream);
    P = patches.as<T>();
  }
  linear_forward(out, P, weight, bias, rows, cols, Co, stream);  // out (rows, Co) = P W^T + b
}

// =============================================================================================
// backward
// =============================================================================================

template <class T>
void backward(T* din, float* dweight, float* dbias, const T* dout, const T* in, const T* weight,
              int64_t N, int64_t H, int64_t W, int64_t Ci, int64_t Co, int64_t k, cudaStream_t stream) {
  const PatchLayout L{H, W, Ci, k, H / k, W / k};
  const int64_t rows = N * L.Ho * L.Wo, cols = k * k * Ci;
  const Device device = Device::cuda(current_device());
  const int64_t patch_bytes = rows * cols * static_cast<int64_t>(sizeof(T));

  // dweight needs the patch matrix again (gathered, unless k == 1).
  ScratchBuffer patches;
  const T* P = nullptr;
  if (dweight) {
    P = in;
    if (k != 1) {
      patches = ScratchBuffer(patch_bytes, device);
      gather_patches(detail::dev(patches.as<T>()), detail::dev(in), L, rows, stream);
      P = patches.as<T>();
    }
  }
  // din goes through dP (rows, cols), scattered after; with k == 1 dP is din itself.
  ScratchBuffer dpatches;
  T* dP = nullptr;
  if (din) {
    dP = din;
    if (k != 1) {
      dpatches = ScratchBuffer(patch_bytes, device);
      dP = dpatches.as<T>();
    }
  }
  // dP = dout W; dweight = dout^T P; dbias = column sums of dout.
  linear_backward(dP, dweight, dbias, dout, P, weight, rows, cols, Co, stream);
  if (din && k != 1) scatter_patches(detail::dev(din), detail::dev(static_cast<const T*>(dP)), L, N, stream);
}

}  // namespace

void patchify_forward(float* out, const float* in, const float* weight, const float* bias,
                      int64_t N, int64_t H, int64_t W, int64_t Ci, int64_t Co, int64_t k,
                      cudaStream_t stream) {
  forward(out, in, weight, bias, N, H, W, Ci, Co, k, stream);
}

void patchify_forward(bf16* out, const bf16* in, const bf16* weight, const float* bias, int64_t N,
                      int64_t H, int64_t W, int64_t Ci, int64_t Co, int64_t k, cudaStream_t stream) {
  forward(out, in, weight, bias, N, H, W, Ci, Co, k, stream);
}

void patchify_backward(float* din, float* dweight, float* dbias, const float* dout, const float* in,
                       const float* weight, int64_t N, int64_t H, int64_t W, int64_t Ci, int64_t Co,
                       int64_t k, cudaStream_t stream) {
  backward(din, dweight, dbias, dout, in, weight, N, H, W, Ci, Co, k, stream);
}

void patchify_backward(bf16* din, float* dweight, float* dbias, const bf16* dout, const bf16* in,
                       const bf16* weight, int64_t N, int64_t H, int64_t W, int64_t Ci, int64_t Co,
                       int64_t k, cudaStream_t stream) {
  backward(din, dweight, dbias, dout, in, weight, N, H, W, Ci, Co, k, stream);
}

}  // namespace cnx::cuda
