// cnx::cuda::patchify_forward / patchify_backward (kernels/patchify.h): space-to-depth into a
// patch matrix, then the linear GEMMs (kernels/cuda/linear.cu); backward scatters the patch
// gradient back (depth-to-space).
#include <cstdint>

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

bool aligned16(const void* p) { return reinterpret_cast<uintptr_t>(p) % 16 == 0; }

// P (rows, k*k*Ci) from the image; V = 4 moves float4s (needs Ci % 4 == 0, so that four
// consecutive columns are four consecutive channels of one pixel, and 16-byte aligned buffers).
template <int V>
__global__ void space_to_depth(float* __restrict__ P, const float* __restrict__ in, PatchLayout L,
                               int64_t rows) {
  const int64_t cols = L.patch_cols();
  const int64_t total = rows * cols / V;
  for (int64_t v = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; v < total;
       v += int64_t(gridDim.x) * blockDim.x) {
    const int64_t e = v * V, r = e / cols, col = e - r * cols;
    const int64_t src = L.image_offset(r, col);
    if constexpr (V == 4) {
      reinterpret_cast<float4*>(P)[v] = *reinterpret_cast<const float4*>(in + src);
    } else {
      P[e] = in[src];
    }
  }
}

// din (N, H, W, Ci) from dP (rows, k*k*Ci): every element written once, 0 for the rows and
// columns the conv ignores (h >= Ho*k or w >= Wo*k). V = 4 as above.
template <int V>
__global__ void depth_to_space(float* __restrict__ din, const float* __restrict__ dP, PatchLayout L,
                               int64_t N) {
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
    if constexpr (V == 4) {
      reinterpret_cast<float4*>(din)[v] =
          inside ? *reinterpret_cast<const float4*>(dP + src) : make_float4(0.f, 0.f, 0.f, 0.f);
    } else {
      din[e] = inside ? dP[src] : 0.0f;
    }
  }
}

void gather_patches(float* P, const float* in, const PatchLayout& L, int64_t rows, cudaStream_t stream) {
  const int64_t count = rows * L.k * L.k * L.Ci;
  if (count == 0) return;
  if (L.Ci % 4 == 0 && aligned16(P) && aligned16(in)) {
    space_to_depth<4><<<blocks_for(count / 4), kThreads, 0, stream>>>(P, in, L, rows);
  } else {
    space_to_depth<1><<<blocks_for(count), kThreads, 0, stream>>>(P, in, L, rows);
  }
  CNX_CUDA_LAUNCH_CHECK();
}

void scatter_patches(float* din, const float* dP, const PatchLayout& L, int64_t N, cudaStream_t stream) {
  const int64_t count = N * L.H * L.W * L.Ci;
  if (count == 0) return;
  if (L.Ci % 4 == 0 && aligned16(din) && aligned16(dP)) {
    depth_to_space<4><<<blocks_for(count / 4), kThreads, 0, stream>>>(din, dP, L, N);
  } else {
    depth_to_space<1><<<blocks_for(count), kThreads, 0, stream>>>(din, dP, L, N);
  }
  CNX_CUDA_LAUNCH_CHECK();
}

}  // namespace

// =============================================================================================
// forward
// =============================================================================================

void patchify_forward(float* out, const float* in, const float* weight, const float* bias,
                      int64_t N, int64_t H, int64_t W, int64_t Ci, int64_t Co, int64_t k,
                      cudaStream_t stream) {
  const PatchLayout L{H, W, Ci, k, H / k, W / k};
  const int64_t rows = N * L.Ho * L.Wo, cols = k * k * Ci;
  if (rows == 0 || Co == 0) return;  // out has no elements
  // k == 1: the image (N*H*W, Ci) is the patch matrix itself.
  ScratchBuffer patches;
  const float* P = in;
  if (k != 1) {
    patches = ScratchBuffer(rows * cols * static_cast<int64_t>(sizeof(float)), Device::cuda(current_device()));
    gather_patches(patches.as<float>(), in, L, rows, stream);
    P = patches.as<float>();
  }
  linear_forward(out, P, weight, bias, rows, cols, Co, stream);  // out (rows, Co) = P W^T + b
}

// =============================================================================================
// backward
// =============================================================================================

void patchify_backward(float* din, float* dweight, float* dbias, const float* dout, const float* in,
                       const float* weight, int64_t N, int64_t H, int64_t W, int64_t Ci, int64_t Co,
                       int64_t k, cudaStream_t stream) {
  const PatchLayout L{H, W, Ci, k, H / k, W / k};
  const int64_t rows = N * L.Ho * L.Wo, cols = k * k * Ci;
  const Device device = Device::cuda(current_device());
  const int64_t patch_bytes = rows * cols * static_cast<int64_t>(sizeof(float));

  // dweight needs the patch matrix again (gathered, unless k == 1).
  ScratchBuffer patches;
  const float* P = nullptr;
  if (dweight) {
    P = in;
    if (k != 1) {
      patches = ScratchBuffer(patch_bytes, device);
      gather_patches(patches.as<float>(), in, L, rows, stream);
      P = patches.as<float>();
    }
  }
  // din goes through dP (rows, cols), scattered after; with k == 1 dP is din itself.
  ScratchBuffer dpatches;
  float* dP = nullptr;
  if (din) {
    dP = din;
    if (k != 1) {
      dpatches = ScratchBuffer(patch_bytes, device);
      dP = dpatches.as<float>();
    }
  }
  // dP = dout W; dweight = dout^T P; dbias = column sums of dout.
  linear_backward(dP, dweight, dbias, dout, P, weight, rows, cols, Co, stream);
  if (din && k != 1) scatter_patches(din, dP, L, N, stream);
}

}  // namespace cnx::cuda
