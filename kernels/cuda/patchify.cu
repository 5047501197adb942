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

// The patch matrix P (rows, cols), row r = (n, i, j) over (N, Ho, Wo), col = (p * k + q) * Ci + c
// over (k, k, Ci), holds P[r, col] = in[n, i*k + p, j*k + q, c]. For a fixed (n, i, p) the
// values of all j, q, c form one contiguous run of the image, its row h = i*k + p from column 0:
// element e = j * (k Ci) + q Ci + c of the run lies at in[n, h, 0, 0] + e and goes to
// P[(n, i, j), p * k Ci + (e - j k Ci)]. The kernels below are built on that run: a thread owns
// one position e of it (so one division, e / (k Ci), per thread and not per element; in 32 bits,
// the host having checked that an image row fits) and walks the (n, i, p) runs of its block
// with the 3-D grid: blockIdx.y the patch row i, blockIdx.z the image n, p a loop. No 64-bit
// division anywhere (each is a ~70-instruction routine on the GPU, and the stem's gather, Ci =
// 3 and so one element a step, used to do five of them per element).
struct PatchLayout {
  int64_t N, H, W, Ci, k, Ho, Wo;
  __host__ __device__ int64_t kCi() const { return k * Ci; }
  __host__ __device__ int64_t patch_cols() const { return k * k * Ci; }
};

constexpr int kThreads = 256;

// Grid (x: runs of kThreads units along an image row, y: patch rows, z: images); y and z are
// capped at CUDA's 65535 and the kernels loop over the rest.
dim3 run_grid(int64_t units, int64_t rows_y, int64_t images) {
  const auto cap = [](int64_t v) { return static_cast<unsigned>(v < 1 ? 1 : (v < 65535 ? v : 65535)); };
  return dim3(static_cast<unsigned>((units + kThreads - 1) / kThreads), cap(rows_y), cap(images));
}

using detail::aligned16;
using detail::Pack;

// P (rows, k*k*Ci) from the image, T float or __nv_bfloat16. kVec moves 16-byte packs of
// V = Pack<T>::kN elements (needs Ci % V == 0, so that V consecutive elements of a run are V
// consecutive channels of one pixel, and 16-byte aligned buffers); otherwise V = 1.
// Thread unit u = blockIdx.x * blockDim.x + threadIdx.x is element e = u V of every run.
template <bool kVec, class T>
__global__ void __launch_bounds__(kThreads)
    space_to_depth(T* __restrict__ P, const T* __restrict__ in, PatchLayout L) {
  constexpr int64_t V = kVec ? Pack<T>::kN : 1;
  const uint32_t kCi = static_cast<uint32_t>(L.kCi());
  const uint32_t e = (blockIdx.x * blockDim.x + threadIdx.x) * static_cast<uint32_t>(V);
  if (e >= static_cast<uint32_t>(L.Wo) * kCi) return;  // past the patches of a row (no barriers)
  const uint32_t j = e / kCi, qc = e - j * kCi;         // patch column j, (q, c) inside it
  const int64_t cols = L.patch_cols();
  for (int64_t n = blockIdx.z; n < L.N; n += gridDim.z) {
    for (int64_t i = blockIdx.y; i < L.Ho; i += gridDim.y) {
      const T* src = in + ((n * L.H + i * L.k) * L.W) * L.Ci + e;  // row h = i k, element e
      T* dst = P + ((n * L.Ho + i) * L.Wo + j) * cols + qc;         // row (n, i, j), p = 0
      for (int64_t p = 0; p < L.k; ++p, src += L.W * L.Ci, dst += kCi) {
        if constexpr (kVec) {
          detail::store_pack(dst, detail::load_pack(src));
        } else {
          *dst = *src;
        }
      }
    }
  }
}

// din (N, H, W, Ci) from dP (rows, k*k*Ci): every element written once, 0 for the rows and
// columns the conv ignores (h >= Ho*k or w >= Wo*k). kVec and V as above; here a thread's unit
// is element e of a whole image row (W Ci elements), and blockIdx.y runs over the ceil(H / k)
// groups of k image rows (the rows of patch row i, and the ignored rows past Ho k).
template <bool kVec, class T>
__global__ void __launch_bounds__(kThreads)
    depth_to_space(T* __restrict__ din, const T* __restrict__ dP, PatchLayout L) {
  constexpr int64_t V = kVec ? Pack<T>::kN : 1;
  const uint32_t kCi = static_cast<uint32_t>(L.kCi());
  const uint32_t e = (blockIdx.x * blockDim.x + threadIdx.x) * static_cast<uint32_t>(V);
  if (e >= static_cast<uint32_t>(L.W * L.Ci)) return;  // past the image row (no barriers)
  const bool in_cols = e < static_cast<uint32_t>(L.Wo) * kCi;  // w < Wo k
  const uint32_t j = in_cols ? e / kCi : 0, qc = e - j * kCi;
  const int64_t cols = L.patch_cols(), groups = (L.H + L.k - 1) / L.k;
  for (int64_t n = blockIdx.z; n < L.N; n += gridDim.z) {
    for (int64_t i = blockIdx.y; i < groups; i += gridDim.y) {
      T* dst = din + ((n * L.H + i * L.k) * L.W) * L.Ci + e;           // row h = i k
      const T* src = dP + ((n * L.Ho + i) * L.Wo + j) * cols + qc;     // read only if inside
      const bool inside = in_cols && i < L.Ho;
      for (int64_t p = 0; p < L.k && i * L.k + p < L.H; ++p, dst += L.W * L.Ci, src += kCi) {
        if constexpr (kVec) {
          detail::store_pack(dst, inside ? detail::load_pack(src) : Pack<T>{});  // {}: zeros
        } else {
          *dst = inside ? *src : detail::from_float<T>(0.0f);
        }
      }
    }
  }
}

// The run positions fit the kernels' 32-bit arithmetic (an image row of < 2^31 elements).
void check_row_fits(const PatchLayout& L, const char* op) {
  CNX_CHECK(L.W * L.Ci < (int64_t{1} << 31), op, ": an image row of W = ", L.W, " x Ci = ", L.Ci,
            " elements is too long (the kernel indexes a row in 32 bits)");
}

// T is float or __nv_bfloat16 (detail::dev of the launcher's pointers).
template <class T>
void gather_patches(T* P, const T* in, const PatchLayout& L, cudaStream_t stream) {
  constexpr int64_t V = Pack<T>::kN;
  if (L.N * L.Ho * L.Wo * L.Ci == 0) return;
  check_row_fits(L, "patchify forward");
  const int64_t run = L.Wo * L.kCi();  // elements of one (n, i, p) run
  if (L.Ci % V == 0 && aligned16(P) && aligned16(in)) {
    launch<space_to_depth<true, T>>(run_grid(run / V, L.Ho, L.N), kThreads, 0, stream, P, in, L);
  } else {
    launch<space_to_depth<false, T>>(run_grid(run, L.Ho, L.N), kThreads, 0, stream, P, in, L);
  }
  CNX_CUDA_LAUNCH_CHECK();
}

template <class T>
void scatter_patches(T* din, const T* dP, const PatchLayout& L, cudaStream_t stream) {
  constexpr int64_t V = Pack<T>::kN;
  if (L.N * L.H * L.W * L.Ci == 0) return;
  check_row_fits(L, "patchify backward");
  const int64_t row = L.W * L.Ci, groups = (L.H + L.k - 1) / L.k;
  if (L.Ci % V == 0 && aligned16(din) && aligned16(dP)) {
    launch<depth_to_space<true, T>>(run_grid(row / V, groups, L.N), kThreads, 0, stream, din, dP, L);
  } else {
    launch<depth_to_space<false, T>>(run_grid(row, groups, L.N), kThreads, 0, stream, din, dP, L);
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
  const PatchLayout L{N, H, W, Ci, k, H / k, W / k};
  const int64_t rows = N * L.Ho * L.Wo, cols = k * k * Ci;
  if (rows == 0 || Co == 0) return;  // out has no elements
  // k == 1: the image (N*H*W, Ci) is the patch matrix itself.
  ScratchBuffer patches;
  const T* P = in;
  if (k != 1) {
    patches = ScratchBuffer(rows * cols * static_cast<int64_t>(sizeof(T)), Device::cuda(current_device()));
    gather_patches(detail::dev(patches.as<T>()), detail::dev(in), L, stream);
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
  const PatchLayout L{N, H, W, Ci, k, H / k, W / k};
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
      gather_patches(detail::dev(patches.as<T>()), detail::dev(in), L, stream);
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
  if (din && k != 1) scatter_patches(detail::dev(din), detail::dev(static_cast<const T*>(dP)), L, stream);
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
