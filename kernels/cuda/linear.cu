// cnx::cuda::linear_forward / linear_backward (kernels/linear.h): fp32 GEMMs through cuBLASLt
// on row-major buffers, seen as column-major matrices, with the bias in the epilogue; and the
// small kernels around them (bias rows when K = 0 or when no epilogue algorithm exists, a
// deterministic column sum for dbias).
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <map>
#include <mutex>
#include <tuple>

#include "kernels/linear.h"
#include "tensor/cuda_check.h"
#include "tensor/cuda_context.h"

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

// A column-major fp32 matrix of `rows` x `cols` with leading dimension `ld` (>= rows).
class MatrixLayout {
 public:
  MatrixLayout(int64_t rows, int64_t cols, int64_t ld) {
    CNX_CUBLAS_CHECK(cublasLtMatrixLayoutCreate(&l_, CUDA_R_32F, static_cast<uint64_t>(rows),
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

// D (m, n) = op(A) (m, k) . op(B) (k, n), column-major fp32, beta = 0, plus an epilogue:
//   BIAS    bias (m) is added to every column of D (read)
//   BGRADB  bias (n) = the sums of op(B) over k, i.e. over its rows (written)
struct Gemm {
  cublasOperation_t op_a = CUBLAS_OP_N, op_b = CUBLAS_OP_N;
  int64_t m = 0, n = 0, k = 0;
  const float* a = nullptr;
  int64_t lda = 0;
  const float* b = nullptr;
  int64_t ldb = 0;
  float* d = nullptr;
  int64_t ldd = 0;
  cublasLtEpilogue_t epilogue = CUBLASLT_EPILOGUE_DEFAULT;
  const void* bias = nullptr;
};

// The largest power of two (<= 256) that divides the address: cuBLASLt's heuristics assume 256
// unless told, and a tensor view at an offset may be less aligned.
uint32_t alignment_of(const void* p) {
  const uintptr_t a = reinterpret_cast<uintptr_t>(p);
  uint32_t align = 256;
  while (align > 1 && a % align != 0) align /= 2;
  return align;
}

// Everything the algorithm choice depends on. Pointer values matter only through alignment.
struct GemmKey {
  int device;
  int op_a, op_b;
  int64_t m, n, k, lda, ldb, ldd;
  int epilogue;
  uint32_t align_a, align_b, align_d, align_bias;
  bool tf32;
  auto tie() const {
    return std::tie(device, op_a, op_b, m, n, k, lda, ldb, ldd, epilogue, align_a, align_b, align_d,
                    align_bias, tf32);
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

// Runs g on `stream`. Returns false, having enqueued nothing, when cuBLASLt has no algorithm for
// it (possible for an epilogue on some shapes or alignments); throws on any other failure.
bool try_gemm(const Gemm& g, cudaStream_t stream) {
  const bool tf32 = allow_tf32();
  MatmulDesc desc(tf32 ? CUBLAS_COMPUTE_32F_FAST_TF32 : CUBLAS_COMPUTE_32F);
  desc.set(CUBLASLT_MATMUL_DESC_TRANSA, g.op_a);
  desc.set(CUBLASLT_MATMUL_DESC_TRANSB, g.op_b);
  desc.set(CUBLASLT_MATMUL_DESC_EPILOGUE, g.epilogue);
  if (g.epilogue != CUBLASLT_EPILOGUE_DEFAULT) {
    desc.set(CUBLASLT_MATMUL_DESC_BIAS_POINTER, g.bias);
    desc.set(CUBLASLT_MATMUL_DESC_BIAS_DATA_TYPE, CUDA_R_32F);
  }
  // The stored shapes: op(X) = X for N, X^T for T.
  const MatrixLayout la(g.op_a == CUBLAS_OP_N ? g.m : g.k, g.op_a == CUBLAS_OP_N ? g.k : g.m, g.lda);
  const MatrixLayout lb(g.op_b == CUBLAS_OP_N ? g.k : g.n, g.op_b == CUBLAS_OP_N ? g.n : g.k, g.ldb);
  const MatrixLayout ld(g.m, g.n, g.ldd);
  const cublasLtHandle_t handle = cublaslt_handle();

  const GemmKey key{current_device(), static_cast<int>(g.op_a), static_cast<int>(g.op_b), g.m, g.n,
                    g.k, g.lda, g.ldb, g.ldd, static_cast<int>(g.epilogue), alignment_of(g.a),
                    alignment_of(g.b), alignment_of(g.d), g.bias ? alignment_of(g.bias) : 0u, tf32};
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
  if (!chosen.supported) return false;

  const float alpha = 1.0f, beta = 0.0f;
  const cublasStatus_t status =
      cublasLtMatmul(handle, desc.get(), &alpha, g.a, la.get(), g.b, lb.get(), &beta, g.d, ld.get(),
                     g.d, ld.get(), &chosen.algo, cublas_workspace(), kCublasWorkspaceBytes, stream);
  if (unsupported(status, g)) {  // refused at launch after all: remember, and fall back
    std::lock_guard<std::mutex> lock(g_algo_mutex);
    algo_cache()[key].supported = false;
    return false;
  }
  CNX_CUBLAS_CHECK(status);
  CNX_CUDA_LAUNCH_CHECK();
  return true;
}

// A plain GEMM (no epilogue) that cannot be refused: cuBLASLt, or, should its heuristics offer
// nothing for these sizes and alignments, classic cuBLAS (cublasSgemm, any alignment) on the same
// stream and workspace, with the same math mode.
void gemm(const Gemm& g, cudaStream_t stream) {
  if (try_gemm(g, stream)) return;
  const cublasHandle_t h = cublas_handle();  // bound to the current device's stream
  cudaStream_t bound = nullptr;
  CNX_CUBLAS_CHECK(cublasGetStream(h, &bound));
  if (bound != stream) {  // not the library stream: follow the caller (and keep the workspace)
    CNX_CUBLAS_CHECK(cublasSetStream(h, stream));
    CNX_CUBLAS_CHECK(cublasSetWorkspace(h, cublas_workspace(), kCublasWorkspaceBytes));
  }
  const float alpha = 1.0f, beta = 0.0f;
  CNX_CUBLAS_CHECK(cublasSgemm_64(h, g.op_a, g.op_b, g.m, g.n, g.k, &alpha, g.a, g.lda, g.b, g.ldb,
                                  &beta, g.d, g.ldd));
  CNX_CUDA_LAUNCH_CHECK();
}

// CNX_LINEAR_BGRADB=0 replaces the bias-gradient epilogue with the column-sum kernels below
// (both are deterministic; the switch is for comparing them).
bool use_bgradb() {
  static const bool on = [] {
    const char* v = std::getenv("CNX_LINEAR_BGRADB");
    return v == nullptr || std::strcmp(v, "0") != 0;
  }();
  return on;
}

// ---- small kernels -----------------------------------------------------------------------------

constexpr int kThreads = 256;

// Blocks for a grid-stride loop over `count` items: enough to fill any GPU, within gridDim.x.
unsigned int blocks_for(int64_t count) {
  const int64_t blocks = (count + kThreads - 1) / kThreads;
  return static_cast<unsigned int>(blocks < 65536 ? (blocks > 0 ? blocks : 1) : 65536);
}

// out (M, N) = bias broadcast over the rows (0 where bias is null), or out += bias (accumulate).
__global__ void bias_rows_kernel(float* __restrict__ out, const float* __restrict__ bias, int64_t M,
                                 int64_t N, bool accumulate) {
  const int64_t total = M * N;
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < total;
       i += int64_t(gridDim.x) * blockDim.x) {
    const float v = bias ? bias[i % N] : 0.0f;
    out[i] = accumulate ? out[i] + v : v;
  }
}

void bias_rows(float* out, const float* bias, int64_t M, int64_t N, bool accumulate, cudaStream_t stream) {
  if (M * N == 0) return;
  bias_rows_kernel<<<blocks_for(M * N), kThreads, 0, stream>>>(out, bias, M, N, accumulate);
  CNX_CUDA_LAUNCH_CHECK();
}

// Column sums of a row-major (M, N) matrix in two passes with a fixed order (deterministic,
// no atomics). Pass 1: block (x, y) sums rows [y * rows_per_chunk, ...) of 32 columns; its
// 8 row lanes stride over the rows, then lane 0 adds the 8 partials in order.
// Pass 2: out[n] = the chunks' partial sums added in chunk order.
constexpr int kColTile = 32, kRowLanes = 8;

__global__ void column_sums_partial(float* __restrict__ partial, const float* __restrict__ x,
                                    int64_t M, int64_t N, int64_t rows_per_chunk) {
  __shared__ float lanes[kRowLanes][kColTile + 1];
  const int64_t n = blockIdx.x * int64_t(kColTile) + threadIdx.x;
  const int64_t begin = blockIdx.y * rows_per_chunk;
  const int64_t end = begin + rows_per_chunk < M ? begin + rows_per_chunk : M;
  float acc = 0.0f;
  if (n < N)
    for (int64_t m = begin + threadIdx.y; m < end; m += kRowLanes) acc += x[m * N + n];
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

// out (N) = sum over the M rows of x (M, N); zeros when M = 0. The partials (chunks x N floats)
// live in the cuBLAS workspace, which no GEMM uses while these two kernels run (same stream).
void column_sums(float* out, const float* x, int64_t M, int64_t N, cudaStream_t stream) {
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
  column_sums_partial<<<grid, dim3(kColTile, kRowLanes), 0, stream>>>(partial, x, M, N, rows_per_chunk);
  CNX_CUDA_LAUNCH_CHECK();
  if (chunks > 1) {
    column_sums_finish<<<static_cast<unsigned int>((N + kThreads - 1) / kThreads), kThreads, 0, stream>>>(
        out, partial, chunks, N);
    CNX_CUDA_LAUNCH_CHECK();
  }
}

}  // namespace

// =============================================================================================
// forward
// =============================================================================================

void linear_forward(float* out, const float* in, const float* weight, const float* bias, int64_t M,
                    int64_t K, int64_t N, cudaStream_t stream) {
  if (M == 0 || N == 0) return;  // out has no elements
  if (K == 0) {                  // empty products: out = bias (or 0) in every row
    bias_rows(out, bias, M, N, /*accumulate=*/false, stream);
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
  if (bias) {
    g.epilogue = CUBLASLT_EPILOGUE_BIAS;  // bias (N) added to every column of out^T: every row of out
    g.bias = bias;
    if (try_gemm(g, stream)) return;
    g.epilogue = CUBLASLT_EPILOGUE_DEFAULT;  // no algorithm with the epilogue: add it after
    g.bias = nullptr;
    gemm(g, stream);
    bias_rows(out, bias, M, N, /*accumulate=*/true, stream);
    return;
  }
  gemm(g, stream);
}

// =============================================================================================
// backward
// =============================================================================================

void linear_backward(float* din, float* dweight, float* dbias, const float* dout, const float* in,
                     const float* weight, int64_t M, int64_t K, int64_t N, cudaStream_t stream) {
  // din (M, K) = dout (M, N) W (N, K), i.e. din^T (K, M) = W^T (K, N) . dout^T (N, M):
  // W stored (K, N) column-major is W^T already (op N, ld K); dout stored (N, M) (op N, ld N).
  if (din && M * K > 0) {
    if (N == 0) {
      CNX_CUDA_CHECK(cudaMemsetAsync(din, 0, static_cast<size_t>(M * K) * sizeof(float), stream));
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
      gemm(g, stream);
    }
  }

  // dweight (N, K) = dout^T (N, M) in (M, K), i.e. dW^T (K, N) = in^T (K, M) . dout (M, N):
  // in stored (K, M) (op N, ld K); dout stored (N, M), so op T gives (M, N) (ld N). The GEMM's
  // k is M, so BGRADB (sums of op(B) over k) is exactly dbias = sum over rows of dout.
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
      if (dbias && use_bgradb()) {
        g.epilogue = CUBLASLT_EPILOGUE_BGRADB;
        g.bias = dbias;
        dbias_done = try_gemm(g, stream);
        g.epilogue = CUBLASLT_EPILOGUE_DEFAULT;
        g.bias = nullptr;
      }
      if (!dbias_done) gemm(g, stream);
    }
  }
  if (dbias && !dbias_done) column_sums(dbias, dout, M, N, stream);
}

}  // namespace cnx::cuda
