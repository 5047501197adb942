// cnx::cuda::linear_forward / linear_backward (kernels/linear.h): fp32 and bf16 GEMMs through
// cuBLASLt on row-major buffers, seen as column-major matrices, with the bias in the epilogue;
// and the small kernels around them (bias rows when K = 0 or when no epilogue algorithm exists,
// a deterministic column sum for dbias).
//
// One templated implementation serves both element types T of the activations (float, bf16):
// a Gemm carries the cudaDataType of its A/B operands and of D, so the f32 calls build exactly
// the descriptors they always did, and the bf16 calls differ only in those types and in the
// compute type (CUBLAS_COMPUTE_32F always: the products of bf16 values are exact in fp32, and
// the accumulation is fp32). Parameters (bias) and parameter gradients (dweight, dbias) are fp32
// for both; the bf16 forward hands the BIAS epilogue a bf16 copy of the bias (the epilogue's
// bias has D's type).
//
// Every GEMM also records which path it took (note_gemm_path, kernels/linear.h): the fast paths
// are the epilogues, and a fallback (a separate bias pass, an fp32 copy of a bf16 output,
// classic cuBLAS) is correct but slower, so it should be visible rather than silent.
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <map>
#include <mutex>
#include <string>
#include <tuple>
#include <type_traits>

#include "kernels/cast.h"
#include "kernels/cuda/launch.cuh"
#include "kernels/cuda/vec.cuh"
#include "kernels/fusion.h"
#include "kernels/linear.h"
#include "tensor/cuda_check.h"
#include "tensor/cuda_context.h"
#include "tensor/cuda_memory.h"

namespace cnx::cuda {

namespace {

// ---- cuBLASLt descriptors: RAII, move-only, destructors log ----------------------------------

void log_status(const char* what, cublasStatus_t s) {
  if (s != CUBLAS_STATUS_SUCCESS) std::fprintf(stderr, "cnx: %s failed: %s\n", what, cublasGetStatusString(s));
}

class MatmulDesc {
 public:
  explicit MatmulDesc(cublasComputeType_t compute) {
    CNX_CUBLAS_CHECK(cublasLtMatmulDescCreate(&d_, compute, CUDA_R_32F));
  }
  ~MatmulDesc() {
    if (d_) log_status("cublasLtMatmulDescDestroy", cublasLtMatmulDescDestroy(d_));
  }
  MatmulDesc(const MatmulDesc&) = delete;
  MatmulDesc& operator=(const MatmulDesc&) = delete;
  template <class T> void set(cublasLtMatmulDescAttributes_t attr, const T& value) {
    CNX_CUBLAS_CHECK(cublasLtMatmulDescSetAttribute(d_, attr, &value, sizeof value));
  }
  cublasLtMatmulDesc_t get() const { return d_; }

 private:
  cublasLtMatmulDesc_t d_ = nullptr;
};

// A column-major matrix of `type` elements, `rows` x `cols`, leading dimension `ld` (>= rows).
class MatrixLayout {
 public:
  MatrixLayout(cudaDataType_t type, int64_t rows, int64_t cols, int64_t ld) {
    CNX_CUBLAS_CHECK(cublasLtMatrixLayoutCreate(&l_, type, static_cast<uint64_t>(rows),
                                                static_cast<uint64_t>(cols), ld));
  }
  ~MatrixLayout() {
    if (l_) log_status("cublasLtMatrixLayoutDestroy", cublasLtMatrixLayoutDestroy(l_));
  }
  MatrixLayout(const MatrixLayout&) = delete;
  MatrixLayout& operator=(const MatrixLayout&) = delete;
  cublasLtMatrixLayout_t get() const { return l_; }

 private:
  cublasLtMatrixLayout_t l_ = nullptr;
};

class MatmulPreference {
 public:
  MatmulPreference() { CNX_CUBLAS_CHECK(cublasLtMatmulPreferenceCreate(&p_)); }
  ~MatmulPreference() {
    if (p_) log_status("cublasLtMatmulPreferenceDestroy", cublasLtMatmulPreferenceDestroy(p_));
  }
  MatmulPreference(const MatmulPreference&) = delete;
  MatmulPreference& operator=(const MatmulPreference&) = delete;
  template <class T> void set(cublasLtMatmulPreferenceAttributes_t attr, const T& value) {
    CNX_CUBLAS_CHECK(cublasLtMatmulPreferenceSetAttribute(p_, attr, &value, sizeof value));
  }
  cublasLtMatmulPreference_t get() const { return p_; }

 private:
  cublasLtMatmulPreference_t p_ = nullptr;
};

// ---- one GEMM --------------------------------------------------------------------------------

// D (m, n) = op(A) (m, k) . op(B) (k, n), column-major, beta = 0, plus an epilogue:
//   BIAS    bias (m) is added to every column of D (read)
//   BGRADB  bias (n) = the sums of op(B) over k, i.e. over its rows (written)
// A and B hold type_ab elements (CUDA_R_32F or CUDA_R_16BF), D type_d elements, and the bias
// vector type_d elements too: cuBLASLt's rule (quoted in try_gemm).
// Here that is the fp32 bias for an fp32 D, the fp32 dbias for BGRADB's fp32 dweight, and the
// bias's bf16 copy for the bf16 forward.
struct Gemm {
  cublasOperation_t op_a = CUBLAS_OP_N, op_b = CUBLAS_OP_N;
  int64_t m = 0, n = 0, k = 0;
  const void* a = nullptr;
  int64_t lda = 0;
  const void* b = nullptr;
  int64_t ldb = 0;
  void* d = nullptr;
  int64_t ldd = 0;
  cudaDataType_t type_ab = CUDA_R_32F, type_d = CUDA_R_32F;
  cublasLtEpilogue_t epilogue = CUBLASLT_EPILOGUE_DEFAULT;
  const void* bias = nullptr;
};

// The cudaDataType of a launcher's element type.
template <class T> constexpr cudaDataType_t cuda_type();
template <> constexpr cudaDataType_t cuda_type<float>() { return CUDA_R_32F; }
template <> constexpr cudaDataType_t cuda_type<bf16>() { return CUDA_R_16BF; }

// The largest power of two (<= 256) that divides the address: cuBLASLt's heuristics assume 256
// unless told, and a tensor view at an offset may be less aligned.
uint32_t alignment_of(const void* p) {
  const uintptr_t a = reinterpret_cast<uintptr_t>(p);
  uint32_t align = 256;
  while (align > 1 && a % align != 0) align /= 2;
  return align;
}

// The epilogues' bias pointer must be 16-byte aligned. The documentation gives no figure, only
// that the alignment matters ("Routines that don't dereference this pointer, like
// cublasLtMatmulAlgoGetHeuristic() depend on its value to determine expected pointer alignment",
// cublasLt.h, CUBLASLT_MATMUL_DESC_BIAS_POINTER), and there is no preference to promise less, so
// the heuristic may well hand out an algorithm that then reads the bias with 16-byte vector
// loads. 16 is the alignment the documentation asks of pointers for vectorised (Tensor Core)
// access (https://docs.nvidia.com/cuda/cublas/index.html#tensor-core-usage); Marian's cuBLASLt
// code (src/tensors/gpu/prod.cpp) learned the same on an A100 ("changed this to 16 to avoid
// alignment error"). So a less aligned bias (a view at an odd float offset) never reaches
// cuBLASLt: the caller takes the plain GEMM and its own bias pass.
constexpr uint32_t kBiasAlignment = 16;

// Everything the algorithm choice depends on. Pointer values matter only through alignment.
struct GemmKey {
  int device;
  int op_a, op_b;
  int64_t m, n, k, lda, ldb, ldd;
  int type_ab, type_d;
  int epilogue;
  uint32_t align_a, align_b, align_d, align_bias;
  bool tf32;
  auto tie() const {
    return std::tie(device, op_a, op_b, m, n, k, lda, ldb, ldd, type_ab, type_d, epilogue, align_a,
                    align_b, align_d, align_bias, tf32);
  }
  bool operator<(const GemmKey& o) const { return tie() < o.tie(); }
};

struct CachedAlgo {
  bool supported = false;
  cublasLtMatmulAlgo_t algo{};
};

// The heuristic's first choice per key, asked once: the same algorithm every call, so a shape's
// results are bitwise the same run to run, and no heuristic query per call.
std::mutex g_algo_mutex;
std::map<GemmKey, CachedAlgo>& algo_cache() {
  static auto* cache = new std::map<GemmKey, CachedAlgo>();  // never destroyed (static order)
  return *cache;
}

// Whether a cuBLASLt status means "no algorithm for this call" rather than an error: NOT_SUPPORTED
// always; INVALID_VALUE too when an epilogue is asked for (a combination of epilogue, transposes
// and layouts the library does not take), so that the caller falls back to a plain GEMM, which
// reports a genuine error if there is one.
bool unsupported(cublasStatus_t status, const Gemm& g) {
  return status == CUBLAS_STATUS_NOT_SUPPORTED ||
         (status == CUBLAS_STATUS_INVALID_VALUE && g.epilogue != CUBLASLT_EPILOGUE_DEFAULT);
}

// What try_gemm did: ran the GEMM, or why not (having enqueued nothing).
enum class Lt { ran, disabled, bias_misaligned, no_algorithm };

// The reason a GEMM did not run on cuBLASLt (or without its epilogue), for the path records.
std::string why_not(Lt lt, const Gemm& g) {
  switch (lt) {
    case Lt::ran: return "";
    case Lt::disabled: return "cuBLASLt disabled (CNX_LINEAR_CUBLASLT=0 or set_cublaslt_enabled(false))";
    case Lt::bias_misaligned:
      return "bias pointer " + std::to_string(alignment_of(g.bias)) + "-byte aligned, the epilogue needs " +
             std::to_string(kBiasAlignment);
    case Lt::no_algorithm:
      return g.epilogue == CUBLASLT_EPILOGUE_DEFAULT
                 ? "cuBLASLt offered no algorithm for these sizes and alignments"
                 : "cuBLASLt offered no algorithm with the epilogue for these sizes and alignments";
  }
  return "";
}

// Runs g on `stream` through cuBLASLt. Returns Lt::ran, or, having enqueued nothing, why not:
// cuBLASLt switched off, an epilogue's bias less than 16-byte aligned (checked before asking the
// library), or no algorithm for the call (possible for an epilogue on some shapes or
// alignments). Throws on any other failure.
Lt try_gemm(const Gemm& g, cudaStream_t stream) {
  if (!cublaslt_enabled()) return Lt::disabled;
  if (g.epilogue != CUBLASLT_EPILOGUE_DEFAULT && alignment_of(g.bias) < kBiasAlignment)
    return Lt::bias_misaligned;
  // TF32 is a choice for fp32 operands only; bf16 operands always take CUBLAS_COMPUTE_32F.
  const bool tf32 = g.type_ab == CUDA_R_32F && allow_tf32();
  MatmulDesc desc(tf32 ? CUBLAS_COMPUTE_32F_FAST_TF32 : CUBLAS_COMPUTE_32F);
  desc.set(CUBLASLT_MATMUL_DESC_TRANSA, g.op_a);
  desc.set(CUBLASLT_MATMUL_DESC_TRANSB, g.op_b);
  desc.set(CUBLASLT_MATMUL_DESC_EPILOGUE, g.epilogue);
  if (g.epilogue != CUBLASLT_EPILOGUE_DEFAULT) {
    desc.set(CUBLASLT_MATMUL_DESC_BIAS_POINTER, g.bias);
    // "Bias vector elements are the same type as the elements of output matrix (Dtype) with the
    // following exceptions": IMMA kernels (an int8 C) and fp8 kernels (cublasLt.h of CUDA 13.0,
    // CUBLASLT_MATMUL_DESC_BIAS_DATA_TYPE; the same text in
    // https://docs.nvidia.com/cuda/cublas/index.html#cublasltmatmuldescattributes-t). Neither
    // exception applies to fp32 or bf16 outputs, so the bias has D's type, which is also the
    // attribute's default (-1); set explicitly so that the rule is visible here.
    desc.set(CUBLASLT_MATMUL_DESC_BIAS_DATA_TYPE, static_cast<int32_t>(g.type_d));
  }
  // The stored shapes: op(X) = X for N, X^T for T. C is D (beta = 0): same type and layout.
  const MatrixLayout la(g.type_ab, g.op_a == CUBLAS_OP_N ? g.m : g.k,
                        g.op_a == CUBLAS_OP_N ? g.k : g.m, g.lda);
  const MatrixLayout lb(g.type_ab, g.op_b == CUBLAS_OP_N ? g.k : g.n,
                        g.op_b == CUBLAS_OP_N ? g.n : g.k, g.ldb);
  const MatrixLayout ld(g.type_d, g.m, g.n, g.ldd);
  const cublasLtHandle_t handle = cublaslt_handle();

  const GemmKey key{current_device(), static_cast<int>(g.op_a), static_cast<int>(g.op_b), g.m, g.n,
                    g.k, g.lda, g.ldb, g.ldd, static_cast<int>(g.type_ab), static_cast<int>(g.type_d),
                    static_cast<int>(g.epilogue), alignment_of(g.a), alignment_of(g.b),
                    alignment_of(g.d), g.bias ? alignment_of(g.bias) : 0u, tf32};
  CachedAlgo chosen;
  bool cached = false;
  {
    std::lock_guard<std::mutex> lock(g_algo_mutex);
    auto it = algo_cache().find(key);
    if (it != algo_cache().end()) {
      chosen = it->second;
      cached = true;
    }
  }
  if (!cached) {
    MatmulPreference pref;
    pref.set(CUBLASLT_MATMUL_PREF_MAX_WORKSPACE_BYTES, static_cast<uint64_t>(kCublasWorkspaceBytes));
    pref.set(CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_A_BYTES, key.align_a);
    pref.set(CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_B_BYTES, key.align_b);
    pref.set(CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_C_BYTES, key.align_d);  // C is D (beta = 0)
    pref.set(CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_D_BYTES, key.align_d);
    cublasLtMatmulHeuristicResult_t result{};
    int count = 0;
    const cublasStatus_t status = cublasLtMatmulAlgoGetHeuristic(
        handle, desc.get(), la.get(), lb.get(), ld.get(), ld.get(), pref.get(), 1, &result, &count);
    if (!unsupported(status, g)) CNX_CUBLAS_CHECK(status);
    chosen.supported = status == CUBLAS_STATUS_SUCCESS && count > 0 && result.state == CUBLAS_STATUS_SUCCESS;
    if (chosen.supported) chosen.algo = result.algo;
    std::lock_guard<std::mutex> lock(g_algo_mutex);
    algo_cache().emplace(key, chosen);
  }
  if (!chosen.supported) return Lt::no_algorithm;

  const float alpha = 1.0f, beta = 0.0f;
  const cublasStatus_t status =
      cublasLtMatmul(handle, desc.get(), &alpha, g.a, la.get(), g.b, lb.get(), &beta, g.d, ld.get(),
                     g.d, ld.get(), &chosen.algo, cublas_workspace(), kCublasWorkspaceBytes, stream);
  if (unsupported(status, g)) {  // refused at launch after all: remember, and fall back
    std::lock_guard<std::mutex> lock(g_algo_mutex);
    algo_cache()[key].supported = false;
    return Lt::no_algorithm;
  }
  CNX_CUBLAS_CHECK(status);
  CNX_CUDA_LAUNCH_CHECK();
  return Lt::ran;
}

// The device's cuBLAS handle, bound to `stream` for one scope. The handle is shared (everything
// that calls cublas_handle() expects it on the device's stream with the library's workspace), so
// a call on another stream binds it and puts both back afterwards, also when the call throws.
// cublasSetStream "unconditionally resets the cuBLAS library workspace back to the default
// workspace pool" (https://docs.nvidia.com/cuda/cublas/index.html#cublassetstream), hence the
// cublasSetWorkspace after each cublasSetStream. (There is no getter for the workspace: the
// handle's is always the library's, cublas_workspace(), tensor/cuda_context.cu.)
class HandleOnStream {
 public:
  HandleOnStream(cublasHandle_t h, cudaStream_t stream) : h_(h), workspace_(cublas_workspace()) {
    CNX_CUBLAS_CHECK(cublasGetStream(h_, &previous_));
    if (previous_ == stream) return;
    CNX_CUBLAS_CHECK(cublasSetStream(h_, stream));
    rebound_ = true;
    try {
      CNX_CUBLAS_CHECK(cublasSetWorkspace(h_, workspace_, kCublasWorkspaceBytes));
    } catch (...) {
      restore();  // the destructor of a half-built object does not run
      throw;
    }
  }
  ~HandleOnStream() { restore(); }
  HandleOnStream(const HandleOnStream&) = delete;
  HandleOnStream& operator=(const HandleOnStream&) = delete;
  cublasHandle_t get() const { return h_; }

 private:
  void restore() noexcept {
    if (!rebound_) return;
    rebound_ = false;
    log_status("cublasSetStream (restoring the handle's stream)", cublasSetStream(h_, previous_));
    log_status("cublasSetWorkspace (restoring the handle's workspace)",
               cublasSetWorkspace(h_, workspace_, kCublasWorkspaceBytes));
  }

  cublasHandle_t h_;
  void* workspace_;
  cudaStream_t previous_ = nullptr;
  bool rebound_ = false;
};

// Which library ran a plain GEMM, and why it was not cuBLASLt.
struct Ran {
  bool cublaslt = true;
  std::string why;
  // "cuBLASLt" or "cuBLAS fallback": the first words of every path name (kernels/linear.h).
  std::string path() const { return cublaslt ? "cuBLASLt" : "cuBLAS fallback"; }
  // The reason an epilogue was refused (`epilogue_why`), and this GEMM's own if it is another.
  std::string why_with(const std::string& epilogue_why) const {
    if (why.empty() || why == epilogue_why) return epilogue_why;
    return epilogue_why.empty() ? why : epilogue_why + "; " + why;
  }
};

// A plain GEMM (no epilogue) that cannot be refused: cuBLASLt, or, should its heuristics offer
// nothing for these sizes and alignments (or cuBLASLt be switched off), classic cuBLAS
// (cublasSgemm for fp32, cublasGemmEx with CUBLAS_COMPUTE_32F for bf16 operands; any alignment)
// on the same stream and workspace, with the same math mode.
Ran gemm(const Gemm& g, cudaStream_t stream) {
  const Lt lt = try_gemm(g, stream);
  if (lt == Lt::ran) return {};
  const HandleOnStream bound(cublas_handle(), stream);
  const cublasHandle_t h = bound.get();
  const float alpha = 1.0f, beta = 0.0f;
  if (g.type_ab == CUDA_R_32F && g.type_d == CUDA_R_32F) {
    CNX_CUBLAS_CHECK(cublasSgemm_64(h, g.op_a, g.op_b, g.m, g.n, g.k, &alpha,
                                    static_cast<const float*>(g.a), g.lda,
                                    static_cast<const float*>(g.b), g.ldb, &beta,
                                    static_cast<float*>(g.d), g.ldd));
  } else {
    CNX_CUBLAS_CHECK(cublasGemmEx_64(h, g.op_a, g.op_b, g.m, g.n, g.k, &alpha, g.a, g.type_ab, g.lda,
                                     g.b, g.type_ab, g.ldb, &beta, g.d, g.type_d, g.ldd,
                                     CUBLAS_COMPUTE_32F, CUBLAS_GEMM_DEFAULT));
  }
  CNX_CUDA_LAUNCH_CHECK();
  return {false, why_not(lt, g)};
}

// Records the path of one GEMM of a linear layer (M, K, N: the layer's sizes).
template <class T>
void note(GemmPass pass, int64_t M, int64_t K, int64_t N, std::string path, std::string why = "") {
  note_gemm_path({pass, M, K, N, std::is_same_v<T, float> ? DType::f32 : DType::bf16, std::move(path),
                  std::move(why)});
}

// CNX_LINEAR_BGRADB=0 replaces the bias-gradient epilogue with the column-sum kernels below,
// CNX_LINEAR_BIAS=0 the forward's BIAS epilogue with the plain GEMM and bias_rows (the fallback
// path); both are deterministic, and the switches are for comparing the paths (kernels/fusion.h).
bool use_bgradb() { return fusion_enabled(Fusion::linear_bgradb); }
bool use_bias_epilogue() { return fusion_enabled(Fusion::linear_bias); }

// ---- small kernels -----------------------------------------------------------------------------

constexpr int kThreads = 256;

// Blocks for a grid-stride loop over `count` items: enough to fill any GPU, within gridDim.x.
unsigned int blocks_for(int64_t count) {
  const int64_t blocks = (count + kThreads - 1) / kThreads;
  return static_cast<unsigned int>(blocks < 65536 ? (blocks > 0 ? blocks : 1) : 65536);
}

// out (M, N) = bias broadcast over the rows (0 where bias is null), or, with an fp32 product
// `acc` (M, N), out = acc + bias; computed in fp32 and rounded once to T (float or
// __nv_bfloat16). The bias has out's type, as in the BIAS epilogue whose place this takes (the
// bf16 forward passes the bias's bf16 copy), so both paths give the same out. acc may be out
// itself (fp32: out += bias in place): no __restrict__ on them; each element is read before it is
// written by the same thread.
template <class T>
__global__ void bias_rows_kernel(T* out, const float* acc, const T* __restrict__ bias, int64_t M,
                                 int64_t N) {
  const int64_t total = M * N;
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < total;
       i += int64_t(gridDim.x) * blockDim.x) {
    float v = bias ? detail::to_float(bias[i % N]) : 0.0f;
    if (acc) v = acc[i] + v;
    out[i] = detail::from_float<T>(v);
  }
}

template <class T>
void bias_rows(T* out, const float* acc, const T* bias, int64_t M, int64_t N, cudaStream_t stream) {
  if (M * N == 0) return;
  launch<bias_rows_kernel<detail::device_t<T>>>(blocks_for(M * N), kThreads, 0, stream,
                                                 detail::dev(out), acc, detail::dev(bias), M, N);
  CNX_CUDA_LAUNCH_CHECK();
}

// Column sums of a row-major (M, N) matrix in two passes with a fixed order (deterministic,
// no atomics). Pass 1: block (x, y) sums rows [y * rows_per_chunk, ...) of 32 columns; its
// 8 row lanes stride over the rows, then lane 0 adds the 8 partials in order.
// Pass 2: out[n] = the chunks' partial sums added in chunk order.
constexpr int kColTile = 32, kRowLanes = 8;

// x is float or __nv_bfloat16; the sums are fp32 either way.
template <class T>
__global__ void column_sums_partial(float* __restrict__ partial, const T* __restrict__ x,
                                    int64_t M, int64_t N, int64_t rows_per_chunk) {
  __shared__ float lanes[kRowLanes][kColTile + 1];
  const int64_t n = blockIdx.x * int64_t(kColTile) + threadIdx.x;
  const int64_t begin = blockIdx.y * rows_per_chunk;
  const int64_t end = begin + rows_per_chunk < M ? begin + rows_per_chunk : M;
  float acc = 0.0f;
  if (n < N)
    for (int64_t m = begin + threadIdx.y; m < end; m += kRowLanes) acc += detail::to_float(x[m * N + n]);
  lanes[threadIdx.y][threadIdx.x] = acc;
  __syncthreads();
  if (threadIdx.y == 0 && n < N) {
    float t = lanes[0][threadIdx.x];
    for (int r = 1; r < kRowLanes; ++r) t += lanes[r][threadIdx.x];
    partial[blockIdx.y * N + n] = t;  // (chunks, N)
  }
}

__global__ void column_sums_finish(float* __restrict__ out, const float* __restrict__ partial,
                                   int64_t chunks, int64_t N) {
  const int64_t n = blockIdx.x * int64_t(blockDim.x) + threadIdx.x;
  if (n >= N) return;
  float t = 0.0f;
  for (int64_t c = 0; c < chunks; ++c) t += partial[c * N + n];
  out[n] = t;
}

// out (N) = sum over the M rows of x (M, N) (T float or bf16), in fp32; zeros when M = 0. The
// partials (chunks x N floats) live in the cuBLAS workspace, which no GEMM uses while these two
// kernels run (same stream).
template <class T>
void column_sums(float* out, const T* x, int64_t M, int64_t N, cudaStream_t stream) {
  if (N == 0) return;
  if (M == 0) {
    CNX_CUDA_CHECK(cudaMemsetAsync(out, 0, static_cast<size_t>(N) * sizeof(float), stream));
    return;
  }
  const int64_t workspace_floats = static_cast<int64_t>(kCublasWorkspaceBytes / sizeof(float));
  int64_t chunks = (M + 255) / 256;  // at least 256 rows (32 per lane) a chunk
  if (chunks > 256) chunks = 256;     // gridDim.y and the pass-2 loop stay small
  if (chunks > workspace_floats / N) chunks = workspace_floats / N;
  if (chunks < 1) chunks = 1;
  const int64_t rows_per_chunk = (M + chunks - 1) / chunks;
  chunks = (M + rows_per_chunk - 1) / rows_per_chunk;
  float* partial = chunks == 1 ? out : static_cast<float*>(cublas_workspace());
  const dim3 grid(static_cast<unsigned int>((N + kColTile - 1) / kColTile), static_cast<unsigned int>(chunks));
  launch<column_sums_partial<detail::device_t<T>>>(grid, dim3(kColTile, kRowLanes), 0, stream,
                                                    partial, detail::dev(x), M, N, rows_per_chunk);
  CNX_CUDA_LAUNCH_CHECK();
  if (chunks > 1) {
    const unsigned int finish_grid = static_cast<unsigned int>((N + kThreads - 1) / kThreads);
    launch<column_sums_finish>(finish_grid, kThreads, 0, stream, out, partial, chunks, N);
    CNX_CUDA_LAUNCH_CHECK();
  }
}

// =============================================================================================
// forward
// =============================================================================================

template <class T>
void forward(T* out, const T* in, const T* weight, const float* bias, int64_t M, int64_t K, int64_t N,
             cudaStream_t stream) {
  if (M == 0 || N == 0) return;  // out has no elements
  // The bias in out's type, as the BIAS epilogue takes it: the fp32 parameter itself, or for a
  // bf16 out a bf16 copy (N elements, one small cast kernel; the scratch block is aligned for
  // the epilogue whatever the parameter's alignment). torch.autocast rounds the bias to bf16 the
  // same way (F.linear casts weight and bias); the epilogue adds it to the fp32 accumulator and
  // rounds the sum once.
  ScratchBuffer bias_copy;
  const T* bias_t = nullptr;  // (N) or null
  if (bias) {
    if constexpr (std::is_same_v<T, float>) {
      bias_t = bias;
    } else {
      bias_copy = ScratchBuffer(N * static_cast<int64_t>(sizeof(bf16)), Device::cuda(current_device()));
      cast(bias_copy.as<bf16>(), bias, N, stream);
      bias_t = bias_copy.as<bf16>();
    }
  }
  if (K == 0) {  // empty products: out = bias (or 0) in every row; no GEMM to record
    bias_rows(out, nullptr, bias_t, M, N, stream);
    return;
  }
  // out^T (N, M) = W (N, K) . in^T (K, M): W is stored (K, N) column-major (ld K), so op T;
  // in is stored (K, M) column-major (ld K); out^T is (N, M) column-major (ld N).
  Gemm g;
  g.op_a = CUBLAS_OP_T;
  g.op_b = CUBLAS_OP_N;
  g.m = N;
  g.n = M;
  g.k = K;
  g.a = weight;
  g.lda = K;
  g.b = in;
  g.ldb = K;
  g.d = out;
  g.ldd = N;
  g.type_ab = g.type_d = cuda_type<T>();
  if (!bias) {
    const Ran ran = gemm(g, stream);
    note<T>(GemmPass::forward, M, K, N, ran.path(), ran.why);
    return;
  }
  std::string why = "CNX_LINEAR_BIAS=0";  // why the bias is not the epilogue's
  if (use_bias_epilogue()) {
    g.epilogue = CUBLASLT_EPILOGUE_BIAS;  // bias (N) added to every column of out^T: every row of out
    g.bias = bias_t;
    const Lt lt = try_gemm(g, stream);
    if (lt == Lt::ran) {
      note<T>(GemmPass::forward, M, K, N, "cuBLASLt+BIAS epilogue");
      return;
    }
    why = why_not(lt, g);
  }
  g.epilogue = CUBLASLT_EPILOGUE_DEFAULT;  // no epilogue for this call: add the bias after
  g.bias = nullptr;
  if constexpr (std::is_same_v<T, float>) {
    const Ran ran = gemm(g, stream);
    bias_rows(out, out, bias_t, M, N, stream);  // out += bias
    note<T>(GemmPass::forward, M, K, N, ran.path() + ", then bias pass", ran.why_with(why));
  } else {
    // Adding the bias to a bf16 product would round twice: the product goes to an fp32
    // scratch buffer instead (M x N floats: the slow path), and bias_rows rounds acc + bias once.
    ScratchBuffer acc(M * N * static_cast<int64_t>(sizeof(float)), Device::cuda(current_device()));
    g.d = acc.as<float>();
    g.type_d = CUDA_R_32F;
    const Ran ran = gemm(g, stream);
    bias_rows(out, acc.as<float>(), bias_t, M, N, stream);
    note<T>(GemmPass::forward, M, K, N, ran.path() + " to fp32 scratch, then bias pass", ran.why_with(why));
  }
}

// =============================================================================================
// backward
// =============================================================================================

template <class T>
void backward(T* din, float* dweight, float* dbias, const T* dout, const T* in, const T* weight,
              int64_t M, int64_t K, int64_t N, cudaStream_t stream) {
  // din (M, K) = dout (M, N) W (N, K), i.e. din^T (K, M) = W^T (K, N) . dout^T (N, M):
  // W stored (K, N) column-major is W^T already (op N, ld K); dout stored (N, M) (op N, ld N).
  if (din && M * K > 0) {
    if (N == 0) {
      CNX_CUDA_CHECK(cudaMemsetAsync(din, 0, static_cast<size_t>(M * K) * sizeof(T), stream));
    } else {
      Gemm g;
      g.op_a = CUBLAS_OP_N;
      g.op_b = CUBLAS_OP_N;
      g.m = K;
      g.n = M;
      g.k = N;
      g.a = weight;
      g.lda = K;
      g.b = dout;
      g.ldb = N;
      g.d = din;
      g.ldd = K;
      g.type_ab = g.type_d = cuda_type<T>();
      const Ran ran = gemm(g, stream);
      note<T>(GemmPass::dinput, M, K, N, ran.path(), ran.why);
    }
  }

  // dweight (N, K) = dout^T (N, M) in (M, K), i.e. dW^T (K, N) = in^T (K, M) . dout (M, N):
  // in stored (K, M) (op N, ld K); dout stored (N, M), so op T gives (M, N) (ld N). The GEMM's
  // k is M, so BGRADB (sums of op(B) over k) is exactly dbias = sum over rows of dout.
  // dweight is fp32 whatever T is (D CUDA_R_32F: bf16 operands, unrounded fp32 result).
  bool dbias_done = false;
  if (dweight && N * K > 0) {
    if (M == 0) {
      CNX_CUDA_CHECK(cudaMemsetAsync(dweight, 0, static_cast<size_t>(N * K) * sizeof(float), stream));
    } else {
      Gemm g;
      g.op_a = CUBLAS_OP_N;
      g.op_b = CUBLAS_OP_T;
      g.m = K;
      g.n = N;
      g.k = M;
      g.a = in;
      g.lda = K;
      g.b = dout;
      g.ldb = N;
      g.d = dweight;
      g.ldd = K;
      g.type_ab = cuda_type<T>();
      g.type_d = CUDA_R_32F;
      std::string why;  // why dbias is not BGRADB's
      if (dbias && use_bgradb()) {
        g.epilogue = CUBLASLT_EPILOGUE_BGRADB;
        g.bias = dbias;  // fp32, D's type
        const Lt lt = try_gemm(g, stream);
        dbias_done = lt == Lt::ran;
        if (!dbias_done) why = why_not(lt, g);
        g.epilogue = CUBLASLT_EPILOGUE_DEFAULT;
        g.bias = nullptr;
      } else if (dbias) {
        why = "CNX_LINEAR_BGRADB=0";
      }
      if (dbias_done) {
        note<T>(GemmPass::dweight, M, K, N, "cuBLASLt+BGRADB epilogue");
      } else {
        const Ran ran = gemm(g, stream);
        if (dbias)
          note<T>(GemmPass::dweight, M, K, N, ran.path() + ", then column sums", ran.why_with(why));
        else
          note<T>(GemmPass::dweight, M, K, N, ran.path(), ran.why);
      }
    }
  }
  if (dbias && !dbias_done) column_sums(dbias, dout, M, N, stream);
}

}  // namespace

void linear_forward(float* out, const float* in, const float* weight, const float* bias, int64_t M,
                    int64_t K, int64_t N, cudaStream_t stream) {
  forward(out, in, weight, bias, M, K, N, stream);
}

void linear_forward(bf16* out, const bf16* in, const bf16* weight, const float* bias, int64_t M,
                    int64_t K, int64_t N, cudaStream_t stream) {
  forward(out, in, weight, bias, M, K, N, stream);
}

void linear_backward(float* din, float* dweight, float* dbias, const float* dout, const float* in,
                     const float* weight, int64_t M, int64_t K, int64_t N, cudaStream_t stream) {
  backward(din, dweight, dbias, dout, in, weight, M, K, N, stream);
}

void linear_backward(bf16* din, float* dweight, float* dbias, const bf16* dout, const bf16* in,
                     const bf16* weight, int64_t M, int64_t K, int64_t N, cudaStream_t stream) {
  backward(din, dweight, dbias, dout, in, weight, M, K, N, stream);
}

}  // namespace cnx::cuda
