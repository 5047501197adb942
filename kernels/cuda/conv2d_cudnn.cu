// cnx::cuda::conv2d_cudnn_* (kernels/conv2d.h): conv2d through cuDNN's legacy convolution API,
// for every groups (dense, grouped, depthwise), f32 and bf16 activations.
//
// Compiled to real code only when the build found cuDNN (CMake defines CNX_HAVE_CUDNN for the
// real nvcc build; never for the emulator, which does not emulate cuDNN). Otherwise this file
// is the run-time switch and stubs: the workspace queries answer -1 ("use the other kernels").
//
// Layouts need no copies: activations are NHWC tensors (N, C, H, W descriptors with
// CUDNN_TENSOR_NHWC) and our weight (Co, kh, kw, Cig) is cuDNN's NHWC filter format
// (K, C/groups, R, S with CUDNN_TENSOR_NHWC); cross-correlation, as ours; the group count set
// on the convolution descriptor.
//
// Determinism: the algorithms come from cudnnGet*Algorithm_v7 (heuristics, not cudnnFind*,
// which times the candidates and may pick differently from one run to the next), and only
// results with determinism == CUDNN_DETERMINISTIC, status SUCCESS, no FFT or Winograd transform
// (see transform_algo) and, for f32 while the library's TF32 switch (cuda::allow_tf32) is off,
// CUDNN_FMA_MATH are taken. When no such algorithm exists
// for a direction, the workspace query answers -1 and the caller uses the existing kernels.
// The bias is added by our own kernel after the convolution (one thread per element; for bf16 the
// bias rounded to bf16 and the sum rounded again, so out is rounded twice there); dbias is a
// two-stage fixed-order column sum of dout (kernels/cuda/reduce.cuh), as the grouped path's.
// Mixed precision: cuDNN's bf16 convolution takes a bf16 filter (the caller's bf16 weight copy)
// and produces a bf16 filter gradient, which is written to workspace and cast to the fp32
// dweight: dweight is rounded once to bf16 on this path (the other kernels keep it fp32).
//
// Cached per (device, shape, dtype, TF32 switch): the descriptors and each direction's algorithm
// (found on first use). One cuDNN handle per device, bound to the library stream at every call.
// The caches live for the whole process and are never destroyed: destroying cuDNN handles from
// static destructors, after the CUDA runtime may have shut down, fails.
#include <cstdio>
#include <cstdlib>
#include <cstring>

#include "kernels/conv2d.h"
#include "tensor/error.h"

#if defined(CNX_HAVE_CUDNN) && CNX_HAVE_CUDNN && !(defined(CNX_CUDA_EMULATOR) && CNX_CUDA_EMULATOR)
#define CNX_CONV2D_CUDNN 1
#else
#define CNX_CONV2D_CUDNN 0
#endif

#include <atomic>

#if CNX_CONV2D_CUDNN
#include <cudnn.h>

#include <algorithm>
#include <array>
#include <climits>
#include <map>
#include <memory>
#include <mutex>
#include <type_traits>

#include "kernels/cast.h"
#include "kernels/cuda/launch.cuh"
#include "kernels/cuda/reduce.cuh"
#include "kernels/cuda/vec.cuh"
#include "tensor/cuda_check.h"
#include "tensor/cuda_context.h"

#endif

namespace cnx::cuda {

// =============================================================================================
// the run-time switch (both builds)
// =============================================================================================
namespace {

// -1: not decided yet (read CNX_CONV_CUDNN on first use), 0 off, 1 on.
std::atomic<int> g_cudnn_switch{-1};

bool cudnn_switch() {
  int v = g_cudnn_switch.load(std::memory_order_relaxed);
  if (v < 0) {
    const char* env = std::getenv("CNX_CONV_CUDNN");
    const int from_env = (env && std::strcmp(env, "0") == 0) ? 0 : 1;
    int expected = -1;
    g_cudnn_switch.compare_exchange_strong(expected, from_env);
    v = g_cudnn_switch.load(std::memory_order_relaxed);
  }
  return v == 1;
}

}  // namespace

bool conv2d_cudnn_compiled() { return CNX_CONV2D_CUDNN != 0; }
bool conv2d_uses_cudnn() { return conv2d_cudnn_compiled() && cudnn_switch(); }
void set_conv2d_cudnn_enabled(bool on) { g_cudnn_switch.store(on ? 1 : 0); }

#if CNX_CONV2D_CUDNN

namespace {

using detail::from_float;
using detail::to_float;

// ---- RAII descriptors -------------------------------------------------------------------------
struct TensorDesc {
  cudnnTensorDescriptor_t d = nullptr;
  TensorDesc() { CNX_CUDNN_CHECK(cudnnCreateTensorDescriptor(&d)); }
  ~TensorDesc() {
    if (d && cudnnDestroyTensorDescriptor(d) != CUDNN_STATUS_SUCCESS)
      std::fprintf(stderr, "conv2d (cuDNN): cudnnDestroyTensorDescriptor failed\n");
  }
  TensorDesc(const TensorDesc&) = delete;
  TensorDesc& operator=(const TensorDesc&) = delete;
};
struct FilterDesc {
  cudnnFilterDescriptor_t d = nullptr;
  FilterDesc() { CNX_CUDNN_CHECK(cudnnCreateFilterDescriptor(&d)); }
  ~FilterDesc() {
    if (d && cudnnDestroyFilterDescriptor(d) != CUDNN_STATUS_SUCCESS)
      std::fprintf(stderr, "conv2d (cuDNN): cudnnDestroyFilterDescriptor failed\n");
  }
  FilterDesc(const FilterDesc&) = delete;
  FilterDesc& operator=(const FilterDesc&) = delete;
};
struct ConvDesc {
  cudnnConvolutionDescriptor_t d = nullptr;
  ConvDesc() { CNX_CUDNN_CHECK(cudnnCreateConvolutionDescriptor(&d)); }
  ~ConvDesc() {
    if (d && cudnnDestroyConvolutionDescriptor(d) != CUDNN_STATUS_SUCCESS)
      std::fprintf(stderr, "conv2d (cuDNN): cudnnDestroyConvolutionDescriptor failed\n");
  }
  ConvDesc(const ConvDesc&) = delete;
  ConvDesc& operator=(const ConvDesc&) = delete;
};

// One direction's algorithm: searched on first use; ok false when cuDNN offers no deterministic
// (and, for f32 without TF32, FMA-math) algorithm.
struct Algo {
  bool searched = false, ok = false;
  int algo = 0;
  size_t bytes = 0;
  cudnnMathType_t math = CUDNN_DEFAULT_MATH;
};

// Everything cached for one (device, shape, dtype, TF32) key.
struct Plan {
  TensorDesc x, y;  // in / din (N, Ci, H, W), out / dout (N, Co, Ho, Wo), both NHWC
  FilterDesc w;     // (Co, Cig, kh, kw) NHWC = our (Co, kh, kw, Cig)
  ConvDesc conv;
  bool fp32_no_tf32 = false;
  Algo fwd, bwd_data, bwd_filter;
};

using Key = std::array<int64_t, 13>;

struct Cache {
  std::mutex mu;
  std::map<int, cudnnHandle_t> handles;
  std::map<Key, std::unique_ptr<Plan>> plans;
};
// Never destroyed (see the top comment).
Cache& cache() {
  static Cache* c = new Cache;
  return *c;
}

cudnnHandle_t handle_locked(Cache& c, int device) {
  auto it = c.handles.find(device);
  if (it != c.handles.end()) return it->second;
  cudnnHandle_t h = nullptr;
  CNX_CUDNN_CHECK(cudnnCreate(&h));
  c.handles.emplace(device, h);
  return h;
}

cudnnDataType_t cudnn_type(DType dt) {
  return dt == DType::bf16 ? CUDNN_DATA_BFLOAT16 : CUDNN_DATA_FLOAT;
}

// The shapes cuDNN's int descriptors can describe, and nothing empty (the other kernels handle
// empty sizes).
bool describable(const Conv2dShape& s) {
  constexpr int64_t kMax = INT_MAX;
  if (s.N <= 0 || s.H <= 0 || s.W <= 0 || s.Ci <= 0 || s.Co <= 0) return false;
  if (s.Ho() <= 0 || s.Wo() <= 0) return false;
  return s.in_numel() < kMax && s.out_numel() < kMax && s.weight_numel() < kMax &&
         s.padding < kMax && s.stride < kMax && s.groups < kMax && s.kh < kMax && s.kw < kMax;
}

int to_int(int64_t v) { return static_cast<int>(v); }

// The plan for (current device, s, dt, TF32 switch), created on first use. c.mu held.
Plan& plan_locked(Cache& c, DType dt, const Conv2dShape& s) {
  const bool tf32 = dt == DType::f32 && allow_tf32();
  const Key key{current_device(), s.N, s.H, s.W, s.Ci, s.Co, s.kh, s.kw, s.stride, s.padding,
                s.groups, static_cast<int64_t>(dt), tf32 ? 1 : 0};
  auto it = c.plans.find(key);
  if (it != c.plans.end()) return *it->second;
  auto p = std::make_unique<Plan>();
  const cudnnDataType_t t = cudnn_type(dt);
  CNX_CUDNN_CHECK(cudnnSetTensor4dDescriptor(p->x.d, CUDNN_TENSOR_NHWC, t, to_int(s.N),
                                             to_int(s.Ci), to_int(s.H), to_int(s.W)));
  CNX_CUDNN_CHECK(cudnnSetTensor4dDescriptor(p->y.d, CUDNN_TENSOR_NHWC, t, to_int(s.N),
                                             to_int(s.Co), to_int(s.Ho()), to_int(s.Wo())));
  CNX_CUDNN_CHECK(cudnnSetFilter4dDescriptor(p->w.d, t, CUDNN_TENSOR_NHWC, to_int(s.Co),
                                             to_int(s.Cig()), to_int(s.kh), to_int(s.kw)));
  // Sums in fp32 for both dtypes.
  CNX_CUDNN_CHECK(cudnnSetConvolution2dDescriptor(p->conv.d, to_int(s.padding), to_int(s.padding),
                                                  to_int(s.stride), to_int(s.stride), 1, 1,
                                                  CUDNN_CROSS_CORRELATION, CUDNN_DATA_FLOAT));
  CNX_CUDNN_CHECK(cudnnSetConvolutionGroupCount(p->conv.d, to_int(s.groups)));
  p->fp32_no_tf32 = dt == DType::f32 && !tf32;
  CNX_CUDNN_CHECK(cudnnSetConvolutionMathType(
      p->conv.d, p->fp32_no_tf32 ? CUDNN_FMA_MATH
                                 : (dt == DType::f32 ? CUDNN_DEFAULT_MATH : CUDNN_TENSOR_OP_MATH)));
  int n = 0, c_ = 0, h = 0, w = 0;
  CNX_CUDNN_CHECK(cudnnGetConvolution2dForwardOutputDim(p->conv.d, p->x.d, p->w.d, &n, &c_, &h, &w));
  CNX_CHECK(n == s.N && c_ == s.Co && h == s.Ho() && w == s.Wo(), "conv2d (cuDNN): output ", n,
            "x", c_, "x", h, "x", w, " differs from ours ", s.N, "x", s.Co, "x", s.Ho(), "x", s.Wo());
  Plan& ref = *p;
  c.plans.emplace(key, std::move(p));
  return ref;
}

// FFT and Winograd algorithms are deterministic but not sums of the plain products: their
// errors exceed the f32 rounding bounds the tests hold every path to. Left out.
bool transform_algo(cudnnConvolutionFwdAlgo_t a) {
  return a == CUDNN_CONVOLUTION_FWD_ALGO_FFT || a == CUDNN_CONVOLUTION_FWD_ALGO_FFT_TILING ||
         a == CUDNN_CONVOLUTION_FWD_ALGO_WINOGRAD ||
         a == CUDNN_CONVOLUTION_FWD_ALGO_WINOGRAD_NONFUSED;
}
bool transform_algo(cudnnConvolutionBwdDataAlgo_t a) {
  return a == CUDNN_CONVOLUTION_BWD_DATA_ALGO_FFT ||
         a == CUDNN_CONVOLUTION_BWD_DATA_ALGO_FFT_TILING ||
         a == CUDNN_CONVOLUTION_BWD_DATA_ALGO_WINOGRAD ||
         a == CUDNN_CONVOLUTION_BWD_DATA_ALGO_WINOGRAD_NONFUSED;
}
bool transform_algo(cudnnConvolutionBwdFilterAlgo_t a) {
  return a == CUDNN_CONVOLUTION_BWD_FILTER_ALGO_FFT ||
         a == CUDNN_CONVOLUTION_BWD_FILTER_ALGO_FFT_TILING ||
         a == CUDNN_CONVOLUTION_BWD_FILTER_ALGO_WINOGRAD_NONFUSED;
}

// The first usable result of a cudnnGet*_v7 list (they come best first).
template <class Perf>
Algo pick(const Perf* perf, int count, bool fp32_no_tf32) {
  Algo a;
  a.searched = true;
  for (int i = 0; i < count; ++i) {
    if (perf[i].status != CUDNN_STATUS_SUCCESS) continue;
    if (transform_algo(perf[i].algo)) continue;
    if (perf[i].determinism != CUDNN_DETERMINISTIC) continue;
    if (fp32_no_tf32 && perf[i].mathType != CUDNN_FMA_MATH) continue;
    a.ok = true;
    a.algo = static_cast<int>(perf[i].algo);
    a.bytes = perf[i].memory;
    a.math = perf[i].mathType;
    return a;
  }
  return a;
}

const Algo& forward_algo(Plan& p, cudnnHandle_t h) {
  if (!p.fwd.searched) {
    cudnnConvolutionFwdAlgoPerf_t perf[CUDNN_CONVOLUTION_FWD_ALGO_COUNT];
    int n = 0;
    CNX_CUDNN_CHECK(cudnnGetConvolutionForwardAlgorithm_v7(
        h, p.x.d, p.w.d, p.conv.d, p.y.d, CUDNN_CONVOLUTION_FWD_ALGO_COUNT, &n, perf));
    p.fwd = pick(perf, n, p.fp32_no_tf32);
  }
  return p.fwd;
}
const Algo& backward_data_algo(Plan& p, cudnnHandle_t h) {
  if (!p.bwd_data.searched) {
    cudnnConvolutionBwdDataAlgoPerf_t perf[CUDNN_CONVOLUTION_BWD_DATA_ALGO_COUNT];
    int n = 0;
    CNX_CUDNN_CHECK(cudnnGetConvolutionBackwardDataAlgorithm_v7(
        h, p.w.d, p.y.d, p.conv.d, p.x.d, CUDNN_CONVOLUTION_BWD_DATA_ALGO_COUNT, &n, perf));
    p.bwd_data = pick(perf, n, p.fp32_no_tf32);
  }
  return p.bwd_data;
}
const Algo& backward_filter_algo(Plan& p, cudnnHandle_t h) {
  if (!p.bwd_filter.searched) {
    cudnnConvolutionBwdFilterAlgoPerf_t perf[CUDNN_CONVOLUTION_BWD_FILTER_ALGO_COUNT];
    int n = 0;
    CNX_CUDNN_CHECK(cudnnGetConvolutionBackwardFilterAlgorithm_v7(
        h, p.x.d, p.y.d, p.conv.d, p.w.d, CUDNN_CONVOLUTION_BWD_FILTER_ALGO_COUNT, &n, perf));
    // The determinism field already rules out ALGO_0 and ALGO_3 (atomics); check anyway, since
    // a run-to-run difference would be silent.
    Algo a = pick(perf, n, p.fp32_no_tf32);
    if (a.ok && (a.algo == CUDNN_CONVOLUTION_BWD_FILTER_ALGO_0 ||
                 a.algo == CUDNN_CONVOLUTION_BWD_FILTER_ALGO_3)) {
      a.ok = false;
      for (int i = 0; i < n; ++i) {
        if (perf[i].algo == CUDNN_CONVOLUTION_BWD_FILTER_ALGO_0 ||
            perf[i].algo == CUDNN_CONVOLUTION_BWD_FILTER_ALGO_3)
          continue;
        const Algo b = pick(&perf[i], 1, p.fp32_no_tf32);
        if (b.ok) {
          a = b;
          break;
        }
      }
    }
    p.bwd_filter = a;
  }
  return p.bwd_filter;
}

// ---- workspace layout -------------------------------------------------------------------------
// Pieces start at multiples of 64 floats (256 bytes).
int64_t round_up_floats(int64_t floats) { return (floats + 63) / 64 * 64; }
int64_t bytes_to_floats(size_t bytes) {
  return round_up_floats((static_cast<int64_t>(bytes) + 3) / 4);
}

// Backward: [cuDNN workspace][bf16 dweight (bf16 only)][dbias partials (P, Co)].
struct BackwardLayout {
  int64_t cudnn_floats = 0, dw16_floats = 0, partial_floats = 0;
  int64_t total() const { return cudnn_floats + dw16_floats + partial_floats; }
};

// ---- our kernels: bias and dbias --------------------------------------------------------------
constexpr int kThreads = 256;

// out (rows, Co) += bias, the fp32 bias rounded to T first (as the other paths read it).
template <class T>
__global__ void __launch_bounds__(kThreads)
    add_bias_kernel(T* __restrict__ out, const float* __restrict__ bias, int64_t n, int64_t Co) {
  const int64_t step = static_cast<int64_t>(gridDim.x) * kThreads;
  for (int64_t e = static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x; e < n; e += step) {
    const float b = to_float(from_float<T>(bias[e % Co]));
    out[e] = from_float<T>(to_float(out[e]) + b);
  }
}

// Stage 1 of dbias: partials[y, o] = sum of dout[r, o] over partition y's rows, in order.
template <class T>
__global__ void __launch_bounds__(kThreads)
    dbias_partials_kernel(float* __restrict__ partials, const T* __restrict__ dout, int64_t rows,
                          int64_t Co, int64_t rows_per) {
  const int64_t o = static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x;
  if (o >= Co) return;
  const int64_t r0 = static_cast<int64_t>(blockIdx.y) * rows_per;
  const int64_t r1 = r0 + rows_per < rows ? r0 + rows_per : rows;
  float acc = 0.0f;
  for (int64_t r = r0; r < r1; ++r) acc += to_float(dout[r * Co + o]);
  partials[static_cast<int64_t>(blockIdx.y) * Co + o] = acc;
}

template <class T>
void add_bias(T* out, const float* bias, const Conv2dShape& s, cudaStream_t stream) {
  const int64_t n = s.out_numel();
  const int64_t blocks = std::clamp<int64_t>((n + kThreads - 1) / kThreads, 1, 65535);
  launch<add_bias_kernel<detail::device_t<T>>>(dim3(static_cast<unsigned>(blocks)), dim3(kThreads),
                                                0, stream, detail::dev(out), bias, n, s.Co);
  CNX_CUDA_LAUNCH_CHECK();
}

template <class T>
void dbias_sums(float* dbias, const T* dout, const Conv2dShape& s, float* partials,
                cudaStream_t stream) {
  const int64_t rows = s.rows(), P = detail::row_partitions(rows);
  launch<dbias_partials_kernel<detail::device_t<T>>>(
      dim3(static_cast<unsigned>((s.Co + kThreads - 1) / kThreads), static_cast<unsigned>(P)),
      dim3(kThreads), 0, stream, partials, detail::dev(dout), rows, s.Co,
      detail::rows_per_partition(rows));
  CNX_CUDA_LAUNCH_CHECK();
  detail::launch_column_sums(dbias, nullptr, partials, P, s.Co, s.Co, stream);
}

template <class T>
constexpr DType dtype_of() {
  return std::is_same_v<T, float> ? DType::f32 : DType::bf16;
}

// Workspace sizes; -1 when cuDNN cannot take this conv. c.mu held.
int64_t forward_floats_locked(Cache& c, DType dt, const Conv2dShape& s) {
  if (!describable(s)) return -1;
  Plan& p = plan_locked(c, dt, s);
  const Algo& a = forward_algo(p, handle_locked(c, current_device()));
  return a.ok ? bytes_to_floats(a.bytes) : -1;
}

bool backward_layout_locked(Cache& c, DType dt, const Conv2dShape& s, bool din, bool dw, bool db,
                            BackwardLayout& out) {
  out = {};
  if (!din && !dw && !db) return true;
  if (!describable(s)) return false;
  Plan& p = plan_locked(c, dt, s);
  const cudnnHandle_t h = handle_locked(c, current_device());
  size_t bytes = 0;
  if (din) {
    const Algo& a = backward_data_algo(p, h);
    if (!a.ok) return false;
    bytes = std::max(bytes, a.bytes);
  }
  if (dw) {
    const Algo& a = backward_filter_algo(p, h);
    if (!a.ok) return false;
    bytes = std::max(bytes, a.bytes);
  }
  out.cudnn_floats = bytes > 0 ? bytes_to_floats(bytes) : 0;
  if (dw && dt == DType::bf16)
    out.dw16_floats = round_up_floats((s.weight_numel() * 2 + 3) / 4);
  if (db) out.partial_floats = round_up_floats(detail::row_partitions(s.rows()) * s.Co);
  return true;
}

const float kOne = 1.0f, kZero = 0.0f;

template <class T>
void forward(T* out, const T* in, const T* weight, const float* bias, const Conv2dShape& s,
             float* workspace, cudaStream_t stream) {
  {
    Cache& c = cache();
    std::lock_guard<std::mutex> lock(c.mu);
    CNX_CHECK(forward_floats_locked(c, dtype_of<T>(), s) >= 0,
              "conv2d (cuDNN): no deterministic forward algorithm for N ", s.N, " ", s.H, "x", s.W,
              " Ci ", s.Ci, " -> Co ", s.Co, " (ask conv2d_cudnn_forward_workspace_floats first)");
    Plan& p = plan_locked(c, dtype_of<T>(), s);
    const cudnnHandle_t h = handle_locked(c, current_device());
    const Algo& a = forward_algo(p, h);
    CNX_CUDNN_CHECK(cudnnSetStream(h, stream));
    CNX_CUDNN_CHECK(cudnnSetConvolutionMathType(p.conv.d, a.math));
    CNX_CUDNN_CHECK(cudnnConvolutionForward(h, &kOne, p.x.d, in, p.w.d, weight, p.conv.d,
                                            static_cast<cudnnConvolutionFwdAlgo_t>(a.algo),
                                            workspace, a.bytes, &kZero, p.y.d, out));
  }
  if (bias) add_bias(out, bias, s, stream);
}

template <class T>
void backward(T* din, float* dweight, float* dbias, const T* dout, const T* in, const T* weight,
              const Conv2dShape& s, float* workspace, cudaStream_t stream) {
  const DType dt = dtype_of<T>();
  BackwardLayout L;
  {
    Cache& c = cache();
    std::lock_guard<std::mutex> lock(c.mu);
    CNX_CHECK(backward_layout_locked(c, dt, s, din != nullptr, dweight != nullptr,
                                     dbias != nullptr, L),
              "conv2d (cuDNN): no deterministic backward algorithm for N ", s.N, " ", s.H, "x",
              s.W, " Ci ", s.Ci, " -> Co ", s.Co,
              " (ask conv2d_cudnn_backward_workspace_floats first)");
    if (!din && !dweight && !dbias) return;
    Plan& p = plan_locked(c, dt, s);
    const cudnnHandle_t h = handle_locked(c, current_device());
    CNX_CUDNN_CHECK(cudnnSetStream(h, stream));
    if (din) {
      const Algo& a = backward_data_algo(p, h);
      CNX_CUDNN_CHECK(cudnnSetConvolutionMathType(p.conv.d, a.math));
      CNX_CUDNN_CHECK(cudnnConvolutionBackwardData(
          h, &kOne, p.w.d, weight, p.y.d, dout, p.conv.d,
          static_cast<cudnnConvolutionBwdDataAlgo_t>(a.algo), workspace, a.bytes, &kZero, p.x.d,
          din));
    }
    if (dweight) {
      const Algo& a = backward_filter_algo(p, h);
      // bf16: cuDNN's filter gradient is bf16 like its filter; cast to the fp32 dweight below.
      void* dw = dt == DType::bf16 ? static_cast<void*>(workspace + L.cudnn_floats)
                                   : static_cast<void*>(dweight);
      CNX_CUDNN_CHECK(cudnnSetConvolutionMathType(p.conv.d, a.math));
      CNX_CUDNN_CHECK(cudnnConvolutionBackwardFilter(
          h, &kOne, p.x.d, in, p.y.d, dout, p.conv.d,
          static_cast<cudnnConvolutionBwdFilterAlgo_t>(a.algo), workspace, a.bytes, &kZero, p.w.d,
          dw));
    }
  }
  if (dweight && dt == DType::bf16)
    cast(dweight, reinterpret_cast<const bf16*>(workspace + L.cudnn_floats), s.weight_numel(),
         stream);
  if (dbias) dbias_sums(dbias, dout, s, workspace + L.cudnn_floats + L.dw16_floats, stream);
}

}  // namespace

int64_t conv2d_cudnn_forward_workspace_floats(DType dtype, const Conv2dShape& s) {
  if (!conv2d_uses_cudnn()) return -1;
  Cache& c = cache();
  std::lock_guard<std::mutex> lock(c.mu);
  return forward_floats_locked(c, dtype, s);
}

int64_t conv2d_cudnn_backward_workspace_floats(DType dtype, const Conv2dShape& s, bool want_din,
                                               bool want_dweight, bool want_dbias) {
  if (!conv2d_uses_cudnn()) return -1;
  Cache& c = cache();
  std::lock_guard<std::mutex> lock(c.mu);
  BackwardLayout L;
  if (!backward_layout_locked(c, dtype, s, want_din, want_dweight, want_dbias, L)) return -1;
  return L.total();
}

void conv2d_cudnn_forward(float* out, const float* in, const float* weight, const float* bias,
                          const Conv2dShape& s, float* workspace, cudaStream_t stream) {
  forward(out, in, weight, bias, s, workspace, stream);
}
void conv2d_cudnn_forward(bf16* out, const bf16* in, const bf16* weight, const float* bias,
                          const Conv2dShape& s, float* workspace, cudaStream_t stream) {
  forward(out, in, weight, bias, s, workspace, stream);
}
void conv2d_cudnn_backward(float* din, float* dweight, float* dbias, const float* dout,
                           const float* in, const float* weight, const Conv2dShape& s,
                           float* workspace, cudaStream_t stream) {
  backward(din, dweight, dbias, dout, in, weight, s, workspace, stream);
}
void conv2d_cudnn_backward(bf16* din, float* dweight, float* dbias, const bf16* dout,
                           const bf16* in, const bf16* weight, const Conv2dShape& s,
                           float* workspace, cudaStream_t stream) {
  backward(din, dweight, dbias, dout, in, weight, s, workspace, stream);
}

#else  // !CNX_CONV2D_CUDNN: stubs

int64_t conv2d_cudnn_forward_workspace_floats(DType, const Conv2dShape&) { return -1; }
int64_t conv2d_cudnn_backward_workspace_floats(DType, const Conv2dShape&, bool, bool, bool) {
  return -1;
}

namespace {
[[noreturn]] void not_available() {
  fail("conv2d: the cuDNN path is not available (built without cuDNN: CNX_HAVE_CUDNN undefined)");
}
}  // namespace

void conv2d_cudnn_forward(float*, const float*, const float*, const float*, const Conv2dShape&,
                          float*, cudaStream_t) {
  not_available();
}
void conv2d_cudnn_forward(bf16*, const bf16*, const bf16*, const float*, const Conv2dShape&,
                          float*, cudaStream_t) {
  not_available();
}
void conv2d_cudnn_backward(float*, float*, float*, const float*, const float*, const float*,
                           const Conv2dShape&, float*, cudaStream_t) {
  not_available();
}
void conv2d_cudnn_backward(bf16*, float*, float*, const bf16*, const bf16*, const bf16*,
                           const Conv2dShape&, float*, cudaStream_t) {
  not_available();
}

#endif  // CNX_CONV2D_CUDNN

}  // namespace cnx::cuda
