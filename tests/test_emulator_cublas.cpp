// The emulated cuBLAS and cuBLASLt (kernels/cuda/emulator/cublas.cpp), built only with
// -DCNX_CUDA_EMULATOR=ON: the GEMMs against a double-precision reference, and the calls the
// cuBLASLt documentation says are unsupported, refused the way the library refuses them.
//
// Most inputs lie on a 1/64 grid in [-1, 1]: exact in bf16, and every sum of up to 64 products
// of them is exact in fp32, whatever the order. The fp32 results must then equal the reference
// exactly, and the bf16 ones equal it rounded once to bf16, so a wrong index, transpose, leading
// dimension or epilogue cannot hide in a tolerance. Padding between columns (ld > rows) holds NaN
// in the inputs, which must not be read, and a marker in D, which must not be written.
#include <gtest/gtest.h>

#if defined(CNX_CUDA_EMULATOR) && CNX_CUDA_EMULATOR

#include <cublasLt.h>
#include <cublas_v2.h>
#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <random>
#include <string>
#include <vector>

namespace {

constexpr float kNaN = std::numeric_limits<float>::quiet_NaN();
constexpr float kUnwritten = 0.75f;  // in D's padding; on the grid, so exact in bf16

// ---- host matrices -------------------------------------------------------------------------------

// A column-major matrix on the host, as fp32 values that the device type represents exactly.
struct HostMatrix {
  int64_t rows = 0, cols = 0, ld = 1;
  std::vector<float> values;  // ld * cols; the padding rows (rows .. ld-1) of each column included

  HostMatrix(int64_t r, int64_t c, int64_t pad, float padding)
      : rows(r), cols(c), ld(r + pad), values(static_cast<size_t>(ld * c), padding) {}
  float& at(int64_t i, int64_t j) { return values[static_cast<size_t>(i + j * ld)]; }
  float at(int64_t i, int64_t j) const { return values[static_cast<size_t>(i + j * ld)]; }
};

// Values k / 64, |k| <= 64: exact in bf16, and their products sum exactly in fp32 (k <= 64 terms).
float grid_value(std::mt19937& rng) { return static_cast<float>(static_cast<int>(rng() % 129) - 64) / 64.0f; }

HostMatrix grid_matrix(int64_t rows, int64_t cols, int64_t pad, std::mt19937& rng) {
  HostMatrix m(rows, cols, pad, kNaN);
  for (int64_t j = 0; j < cols; ++j)
    for (int64_t i = 0; i < rows; ++i) m.at(i, j) = grid_value(rng);
  return m;
}

std::vector<float> grid_vector(int64_t n, std::mt19937& rng) {
  std::vector<float> v(static_cast<size_t>(n));
  for (float& x : v) x = grid_value(rng);
  return v;
}

float round_to(cudaDataType_t type, float v) {
  return type == CUDA_R_16BF ? __bfloat162float(__float2bfloat16_rn(v)) : v;
}

// ---- device memory -------------------------------------------------------------------------------

size_t element_size(cudaDataType_t type) { return type == CUDA_R_16BF ? 2 : 4; }

// cudaMalloc'd bytes, freed on destruction.
class DeviceBuffer {
 public:
  explicit DeviceBuffer(size_t bytes) : bytes_(bytes) {
    EXPECT_EQ(cudaMalloc(&data_, bytes == 0 ? 1 : bytes), cudaSuccess);
  }
  ~DeviceBuffer() { EXPECT_EQ(cudaFree(data_), cudaSuccess); }
  DeviceBuffer(const DeviceBuffer&) = delete;
  DeviceBuffer& operator=(const DeviceBuffer&) = delete;

  // `values` stored as `type` (fp32 or bf16), from byte `offset` on.
  void upload(const std::vector<float>& values, cudaDataType_t type, size_t offset = 0) {
    std::vector<unsigned char> bytes(values.size() * element_size(type));
    for (size_t i = 0; i < values.size(); ++i) {
      if (type == CUDA_R_16BF) {
        const __nv_bfloat16 b = __float2bfloat16_rn(values[i]);
        std::memcpy(&bytes[2 * i], &b, 2);
      } else {
        std::memcpy(&bytes[4 * i], &values[i], 4);
      }
    }
    ASSERT_LE(offset + bytes.size(), bytes_);
    ASSERT_EQ(cudaMemcpy(at(offset), bytes.data(), bytes.size(), cudaMemcpyHostToDevice), cudaSuccess);
  }
  // `count` values of `type` from byte `offset` on, as fp32 (waits for the device first).
  std::vector<float> download(size_t count, cudaDataType_t type, size_t offset = 0) const {
    std::vector<unsigned char> bytes(count * element_size(type));
    EXPECT_EQ(cudaDeviceSynchronize(), cudaSuccess);
    EXPECT_EQ(cudaMemcpy(bytes.data(), at(offset), bytes.size(), cudaMemcpyDeviceToHost), cudaSuccess);
    std::vector<float> values(count);
    for (size_t i = 0; i < count; ++i) {
      if (type == CUDA_R_16BF) {
        __nv_bfloat16 b;
        std::memcpy(&b, &bytes[2 * i], 2);
        values[i] = __bfloat162float(b);
      } else {
        std::memcpy(&values[i], &bytes[4 * i], 4);
      }
    }
    return values;
  }
  void* at(size_t offset) const { return static_cast<unsigned char*>(data_) + offset; }

 private:
  void* data_ = nullptr;
  size_t bytes_ = 0;
};

// ---- cuBLASLt descriptors, RAII --------------------------------------------------------------------

struct LtHandle {
  cublasLtHandle_t h = nullptr;
  LtHandle() { EXPECT_EQ(cublasLtCreate(&h), CUBLAS_STATUS_SUCCESS); }
  ~LtHandle() { EXPECT_EQ(cublasLtDestroy(h), CUBLAS_STATUS_SUCCESS); }
};

struct Desc {
  cublasLtMatmulDesc_t d = nullptr;
  explicit Desc(cublasComputeType_t compute) {
    EXPECT_EQ(cublasLtMatmulDescCreate(&d, compute, CUDA_R_32F), CUBLAS_STATUS_SUCCESS);
  }
  ~Desc() { EXPECT_EQ(cublasLtMatmulDescDestroy(d), CUBLAS_STATUS_SUCCESS); }
  template <class T> cublasStatus_t set(cublasLtMatmulDescAttributes_t attr, const T& value) {
    return cublasLtMatmulDescSetAttribute(d, attr, &value, sizeof value);
  }
};

struct LayoutDesc {
  cublasLtMatrixLayout_t l = nullptr;
  LayoutDesc(cudaDataType_t type, int64_t rows, int64_t cols, int64_t ld) {
    EXPECT_EQ(cublasLtMatrixLayoutCreate(&l, type, static_cast<uint64_t>(rows), static_cast<uint64_t>(cols), ld),
              CUBLAS_STATUS_SUCCESS);
  }
  ~LayoutDesc() { EXPECT_EQ(cublasLtMatrixLayoutDestroy(l), CUBLAS_STATUS_SUCCESS); }
};

struct Pref {
  cublasLtMatmulPreference_t p = nullptr;
  Pref() { EXPECT_EQ(cublasLtMatmulPreferenceCreate(&p), CUBLAS_STATUS_SUCCESS); }
  ~Pref() { EXPECT_EQ(cublasLtMatmulPreferenceDestroy(p), CUBLAS_STATUS_SUCCESS); }
  template <class T> cublasStatus_t set(cublasLtMatmulPreferenceAttributes_t attr, const T& value) {
    return cublasLtMatmulPreferenceSetAttribute(p, attr, &value, sizeof value);
  }
};

// ---- one GEMM case and its reference ---------------------------------------------------------------

// D (m, n) = alpha * op(A) op(B) + beta * C, then the epilogue; ld = rows + pad for every matrix.
struct Case {
  cublasOperation_t op_a = CUBLAS_OP_N, op_b = CUBLAS_OP_N;
  int64_t m = 1, n = 1, k = 1, pad = 0;
  cudaDataType_t type_ab = CUDA_R_32F, type_d = CUDA_R_32F;
  cublasLtEpilogue_t epilogue = CUBLASLT_EPILOGUE_DEFAULT;
  float alpha = 1.0f, beta = 0.0f;

  std::string str() const {
    return "op " + std::to_string(op_a) + std::to_string(op_b) + " m " + std::to_string(m) + " n " +
           std::to_string(n) + " k " + std::to_string(k) + " pad " + std::to_string(pad) + " ab " +
           std::to_string(type_ab) + " d " + std::to_string(type_d) + " epilogue " + std::to_string(epilogue) +
           " beta " + std::to_string(beta);
  }
  int64_t a_rows() const { return op_a == CUBLAS_OP_N ? m : k; }
  int64_t a_cols() const { return op_a == CUBLAS_OP_N ? k : m; }
  int64_t b_rows() const { return op_b == CUBLAS_OP_N ? k : n; }
  int64_t b_cols() const { return op_b == CUBLAS_OP_N ? n : k; }
};

struct Inputs {
  HostMatrix a, b, c;
  std::vector<float> bias;  // BIAS: m values (D's type)
};

Inputs grid_inputs(const Case& t, std::mt19937& rng) {
  Inputs in{grid_matrix(t.a_rows(), t.a_cols(), t.pad, rng), grid_matrix(t.b_rows(), t.b_cols(), t.pad, rng),
            grid_matrix(t.m, t.n, t.pad, rng), grid_vector(t.m, rng)};
  for (float& v : in.c.values)  // C is also D: its padding is D's
    if (std::isnan(v)) v = kUnwritten;
  return in;
}

double op_a(const Case& t, const HostMatrix& a, int64_t i, int64_t l) {
  return t.op_a == CUBLAS_OP_N ? a.at(i, l) : a.at(l, i);
}
double op_b(const Case& t, const HostMatrix& b, int64_t l, int64_t j) {
  return t.op_b == CUBLAS_OP_N ? b.at(l, j) : b.at(j, l);
}

// D as it must be stored (padding included), from a double-precision product.
HostMatrix reference_d(const Case& t, const Inputs& in) {
  HostMatrix d = in.c;
  for (int64_t j = 0; j < t.n; ++j)
    for (int64_t i = 0; i < t.m; ++i) {
      double sum = 0.0;
      for (int64_t l = 0; l < t.k; ++l) sum += op_a(t, in.a, i, l) * op_b(t, in.b, l, j);
      double v = t.alpha * sum + t.beta * in.c.at(i, j);
      if (t.epilogue == CUBLASLT_EPILOGUE_BIAS) v += in.bias[static_cast<size_t>(i)];
      d.at(i, j) = round_to(t.type_d, static_cast<float>(v));
    }
  return d;
}

// BGRADB: the sums of op(B) over k, one per column of D.
std::vector<float> reference_bias_gradient(const Case& t, const Inputs& in) {
  std::vector<float> grad(static_cast<size_t>(t.n));
  for (int64_t j = 0; j < t.n; ++j) {
    double sum = 0.0;
    for (int64_t l = 0; l < t.k; ++l) sum += op_b(t, in.b, l, j);
    grad[static_cast<size_t>(j)] = round_to(t.type_d, static_cast<float>(sum));
  }
  return grad;
}

void expect_same(const std::vector<float>& got, const std::vector<float>& want, const std::string& what) {
  ASSERT_EQ(got.size(), want.size()) << what;
  for (size_t i = 0; i < got.size(); ++i) ASSERT_EQ(got[i], want[i]) << what << "[" << i << "]";
}

// Runs the case through the heuristic and cublasLtMatmul (C = D in place, as linear.cu does) and
// compares D, and the bias gradient, with the reference.
void check_lt(const Case& t, const Inputs& in, cublasComputeType_t compute = CUBLAS_COMPUTE_32F) {
  SCOPED_TRACE(t.str());
  DeviceBuffer a(in.a.values.size() * element_size(t.type_ab)), b(in.b.values.size() * element_size(t.type_ab)),
      d(in.c.values.size() * element_size(t.type_d)), bias(static_cast<size_t>(std::max(t.m, t.n)) * 4);
  a.upload(in.a.values, t.type_ab);
  b.upload(in.b.values, t.type_ab);
  d.upload(in.c.values, t.type_d);
  if (t.epilogue == CUBLASLT_EPILOGUE_BIAS) bias.upload(in.bias, t.type_d);

  LtHandle lt;
  Desc desc(compute);
  EXPECT_EQ(desc.set(CUBLASLT_MATMUL_DESC_TRANSA, t.op_a), CUBLAS_STATUS_SUCCESS);
  EXPECT_EQ(desc.set(CUBLASLT_MATMUL_DESC_TRANSB, t.op_b), CUBLAS_STATUS_SUCCESS);
  EXPECT_EQ(desc.set(CUBLASLT_MATMUL_DESC_EPILOGUE, t.epilogue), CUBLAS_STATUS_SUCCESS);
  const void* bias_pointer = bias.at(0);
  EXPECT_EQ(desc.set(CUBLASLT_MATMUL_DESC_BIAS_POINTER, bias_pointer), CUBLAS_STATUS_SUCCESS);
  const LayoutDesc la(t.type_ab, in.a.rows, in.a.cols, in.a.ld), lb(t.type_ab, in.b.rows, in.b.cols, in.b.ld),
      ld(t.type_d, t.m, t.n, in.c.ld);
  Pref pref;
  EXPECT_EQ(pref.set(CUBLASLT_MATMUL_PREF_MAX_WORKSPACE_BYTES, uint64_t{0}), CUBLAS_STATUS_SUCCESS);
  cublasLtMatmulHeuristicResult_t result{};
  int count = 0;
  ASSERT_EQ(cublasLtMatmulAlgoGetHeuristic(lt.h, desc.d, la.l, lb.l, ld.l, ld.l, pref.p, 1, &result, &count),
            CUBLAS_STATUS_SUCCESS);
  ASSERT_EQ(count, 1);
  ASSERT_EQ(result.state, CUBLAS_STATUS_SUCCESS);
  ASSERT_EQ(cublasLtMatmul(lt.h, desc.d, &t.alpha, a.at(0), la.l, b.at(0), lb.l, &t.beta, d.at(0), ld.l, d.at(0),
                           ld.l, &result.algo, nullptr, 0, nullptr),
            CUBLAS_STATUS_SUCCESS);

  expect_same(d.download(in.c.values.size(), t.type_d), reference_d(t, in).values, "D");
  if (t.epilogue == CUBLASLT_EPILOGUE_BGRADB)
    expect_same(bias.download(static_cast<size_t>(t.n), t.type_d), reference_bias_gradient(t, in), "bias gradient");
}

constexpr int64_t kSizes[] = {1, 3, 17, 64};
constexpr cublasOperation_t kOps[] = {CUBLAS_OP_N, CUBLAS_OP_T};

// ---- a small fixture for the refusals ------------------------------------------------------------

// A 16 x 8 x 32 fp32 GEMM, buffers 256-byte aligned with room for offsets; everything the
// refusal tests vary is a member.
struct LtSetup {
  static constexpr int64_t m = 16, n = 8, k = 32;
  DeviceBuffer a{(m * k + 64) * 4}, b{(k * n + 64) * 4}, d{(m * n + 64) * 4}, bias{(m + n + 64) * 4};
  DeviceBuffer workspace{1 << 16};
  LtHandle lt;
  Desc desc{CUBLAS_COMPUTE_32F};
  LayoutDesc la{CUDA_R_32F, m, k, m}, lb{CUDA_R_32F, k, n, k}, ld{CUDA_R_32F, m, n, m};
  Pref pref;
  float alpha = 1.0f, beta = 0.0f;

  LtSetup() {
    std::mt19937 rng(7);
    a.upload(grid_vector(m * k, rng), CUDA_R_32F);
    b.upload(grid_vector(k * n, rng), CUDA_R_32F);
    bias.upload(grid_vector(m + n, rng), CUDA_R_32F);
  }
  cublasStatus_t heuristic(cublasLtMatmulHeuristicResult_t* result, int* count) {
    return heuristic(desc.d, la.l, lb.l, ld.l, result, count);
  }
  cublasStatus_t heuristic(cublasLtMatmulDesc_t op, cublasLtMatrixLayout_t a_layout,
                           cublasLtMatrixLayout_t b_layout, cublasLtMatrixLayout_t d_layout,
                           cublasLtMatmulHeuristicResult_t* result, int* count) {
    *count = -1;
    return cublasLtMatmulAlgoGetHeuristic(lt.h, op, a_layout, b_layout, d_layout, d_layout, pref.p, 1, result,
                                          count);
  }
  cublasStatus_t matmul(const void* a_ptr, const void* b_ptr, void* d_ptr, const cublasLtMatmulAlgo_t* algo,
                        void* ws = nullptr, size_t ws_bytes = 0) {
    return cublasLtMatmul(lt.h, desc.d, &alpha, a_ptr, la.l, b_ptr, lb.l, &beta, d_ptr, ld.l, d_ptr, ld.l, algo, ws,
                          ws_bytes, nullptr);
  }
  cublasStatus_t matmul(const cublasLtMatmulAlgo_t* algo) { return matmul(a.at(0), b.at(0), d.at(0), algo); }
};

}  // namespace

// =============================================================================================
// cuBLASLt: results
// =============================================================================================

TEST(EmulatorCublasLt, Fp32EveryShapeAndTransposeMatchesTheReferenceExactly) {
  std::mt19937 rng(1);
  for (int64_t m : kSizes)
    for (int64_t n : kSizes)
      for (int64_t k : kSizes)
        for (cublasOperation_t op_a : kOps)
          for (cublasOperation_t op_b : kOps) {
            Case t;
            t.op_a = op_a;
            t.op_b = op_b;
            t.m = m;
            t.n = n;
            t.k = k;
            t.pad = (m + n + k) % 2 == 0 ? 3 : 0;  // half the cases with ld > rows
            check_lt(t, grid_inputs(t, rng));
            if (testing::Test::HasFatalFailure()) return;
          }
}

TEST(EmulatorCublasLt, Bf16InputsWithBf16AndFp32OutputMatchTheReference) {
  std::mt19937 rng(2);
  for (cudaDataType_t type_d : {CUDA_R_16BF, CUDA_R_32F})
    for (int64_t m : kSizes)
      for (int64_t k : kSizes)
        for (cublasOperation_t op_a : kOps)
          for (cublasOperation_t op_b : kOps) {
            Case t;
            t.op_a = op_a;
            t.op_b = op_b;
            t.m = m;
            t.n = 17;
            t.k = k;
            t.pad = 2;
            t.type_ab = CUDA_R_16BF;
            t.type_d = type_d;
            check_lt(t, grid_inputs(t, rng));
            if (testing::Test::HasFatalFailure()) return;
          }
}

// The bias is added to every column of D before the conversion to D's type; bf16 D with a bf16
// bias (the documented bias type for a bf16 D).
TEST(EmulatorCublasLt, BiasEpilogueAddsTheBiasToEveryColumn) {
  std::mt19937 rng(3);
  for (cudaDataType_t type : {CUDA_R_32F, CUDA_R_16BF})
    for (int64_t m : kSizes)
      for (cublasOperation_t op_a : kOps) {
        Case t;
        t.op_a = op_a;
        t.op_b = CUBLAS_OP_N;
        t.m = m;
        t.n = 3;
        t.k = 17;
        t.pad = 1;
        t.type_ab = t.type_d = type;
        t.epilogue = CUBLASLT_EPILOGUE_BIAS;
        check_lt(t, grid_inputs(t, rng));
        if (testing::Test::HasFatalFailure()) return;
      }
}

// BGRADB writes the sums of op(B) over k (one per column of D), as linear.cu's dbias expects,
// for fp32 and bf16 B with an fp32 D, whatever the transposes.
TEST(EmulatorCublasLt, BgradbEpilogueWritesTheColumnSumsOfOpB) {
  std::mt19937 rng(4);
  for (cudaDataType_t type_ab : {CUDA_R_32F, CUDA_R_16BF})
    for (int64_t n : kSizes)
      for (cublasOperation_t op_a : kOps)
        for (cublasOperation_t op_b : kOps) {
          Case t;
          t.op_a = op_a;
          t.op_b = op_b;
          t.m = 17;
          t.n = n;
          t.k = 64;
          t.pad = 2;
          t.type_ab = type_ab;
          t.type_d = CUDA_R_32F;
          t.epilogue = CUBLASLT_EPILOGUE_BGRADB;
          check_lt(t, grid_inputs(t, rng));
          if (testing::Test::HasFatalFailure()) return;
        }
}

TEST(EmulatorCublasLt, AlphaAndBetaScaleTheProductAndC) {
  std::mt19937 rng(5);
  Case t;
  t.m = 17;
  t.n = 3;
  t.k = 17;
  t.pad = 1;
  t.alpha = 0.5f;
  t.beta = -2.0f;
  check_lt(t, grid_inputs(t, rng));
}

// Values off the grid: fp32 accumulation, within a bound on the rounding of k products.
TEST(EmulatorCublasLt, RandomFp32ValuesAgreeWithDoublePrecision) {
  std::mt19937 rng(6);
  std::uniform_real_distribution<float> uniform(-1.0f, 1.0f);
  Case t;
  t.op_a = CUBLAS_OP_T;
  t.m = 64;
  t.n = 17;
  t.k = 64;
  Inputs in{HostMatrix(t.k, t.m, 0, 0.0f), HostMatrix(t.k, t.n, 0, 0.0f), HostMatrix(t.m, t.n, 0, 0.0f), {}};
  for (float& v : in.a.values) v = uniform(rng);
  for (float& v : in.b.values) v = uniform(rng);
  DeviceBuffer a(in.a.values.size() * 4), b(in.b.values.size() * 4), d(in.c.values.size() * 4);
  a.upload(in.a.values, CUDA_R_32F);
  b.upload(in.b.values, CUDA_R_32F);
  LtHandle lt;
  Desc desc(CUBLAS_COMPUTE_32F);
  EXPECT_EQ(desc.set(CUBLASLT_MATMUL_DESC_TRANSA, t.op_a), CUBLAS_STATUS_SUCCESS);
  const LayoutDesc la(CUDA_R_32F, t.k, t.m, t.k), lb(CUDA_R_32F, t.k, t.n, t.k), ld(CUDA_R_32F, t.m, t.n, t.m);
  ASSERT_EQ(cublasLtMatmul(lt.h, desc.d, &t.alpha, a.at(0), la.l, b.at(0), lb.l, &t.beta, d.at(0), ld.l, d.at(0),
                           ld.l, nullptr, nullptr, 0, nullptr),
            CUBLAS_STATUS_SUCCESS);
  const std::vector<float> got = d.download(in.c.values.size(), CUDA_R_32F);
  for (int64_t j = 0; j < t.n; ++j)
    for (int64_t i = 0; i < t.m; ++i) {
      double sum = 0.0, magnitude = 0.0;
      for (int64_t l = 0; l < t.k; ++l) {
        sum += op_a(t, in.a, i, l) * op_b(t, in.b, l, j);
        magnitude += std::fabs(op_a(t, in.a, i, l) * op_b(t, in.b, l, j));
      }
      EXPECT_NEAR(got[static_cast<size_t>(i + j * t.m)], sum, 2.0 * t.k * 0x1p-24 * magnitude) << i << "," << j;
    }
}

// CUBLAS_COMPUTE_32F_FAST_TF32 rounds A and B to 10 mantissa bits, to nearest even; _32F does not.
TEST(EmulatorCublasLt, FastTf32RoundsTheInputsToNearestEven) {
  const float one_plus_half_ulp = 1.0f + 0x1p-11f;                  // a tie: to even, 1
  const float one_plus_ulp_and_a_half = 1.0f + 0x1p-10f + 0x1p-11f;  // a tie: to even, 1 + 2^-9
  const float above_half = 1.0f + 0x1p-11f + 0x1p-20f;              // above the tie: 1 + 2^-10
  const std::vector<float> a = {one_plus_half_ulp, one_plus_ulp_and_a_half, above_half};  // 3 x 1
  const std::vector<float> b = {1.0f};                                                     // 1 x 1
  DeviceBuffer da(12), db(4), dd(12);
  da.upload(a, CUDA_R_32F);
  db.upload(b, CUDA_R_32F);
  LtHandle lt;
  const LayoutDesc la(CUDA_R_32F, 3, 1, 3), lb(CUDA_R_32F, 1, 1, 1), ld(CUDA_R_32F, 3, 1, 3);
  const float alpha = 1.0f, beta = 0.0f;
  for (cublasComputeType_t compute : {CUBLAS_COMPUTE_32F, CUBLAS_COMPUTE_32F_FAST_TF32}) {
    Desc desc(compute);
    ASSERT_EQ(cublasLtMatmul(lt.h, desc.d, &alpha, da.at(0), la.l, db.at(0), lb.l, &beta, dd.at(0), ld.l, dd.at(0),
                             ld.l, nullptr, nullptr, 0, nullptr),
              CUBLAS_STATUS_SUCCESS);
    const std::vector<float> want = compute == CUBLAS_COMPUTE_32F
                                        ? a
                                        : std::vector<float>{1.0f, 1.0f + 0x1p-9f, 1.0f + 0x1p-10f};
    expect_same(dd.download(3, CUDA_R_32F), want, compute == CUBLAS_COMPUTE_32F ? "fp32" : "tf32");
  }
}

// =============================================================================================
// cuBLASLt: what the documentation says it does not support, refused as the library refuses it
// =============================================================================================

TEST(EmulatorCublasLt, TheSetupItselfIsSupported) {
  LtSetup s;
  cublasLtMatmulHeuristicResult_t result{};
  int count = 0;
  ASSERT_EQ(s.heuristic(&result, &count), CUBLAS_STATUS_SUCCESS);
  ASSERT_EQ(count, 1);
  EXPECT_EQ(s.matmul(&result.algo), CUBLAS_STATUS_SUCCESS);
  EXPECT_EQ(s.matmul(nullptr), CUBLAS_STATUS_SUCCESS);
  EXPECT_EQ(cudaDeviceSynchronize(), cudaSuccess);
}

// The bias has D's type; an fp32 bias with a bf16 D (what linear.cu's bf16 forward once asked
// for) is refused by the heuristic and by the matmul. linear.cu now hands a bf16 D's epilogue a
// bf16 copy of the bias (tests/test_cuda_gemm_paths.cpp).
TEST(EmulatorCublasLt, Fp32BiasWithBf16OutputIsNotSupported) {
  LtSetup s;
  const LayoutDesc la(CUDA_R_16BF, s.m, s.k, s.m), lb(CUDA_R_16BF, s.k, s.n, s.k), ld(CUDA_R_16BF, s.m, s.n, s.m);
  ASSERT_EQ(s.desc.set(CUBLASLT_MATMUL_DESC_EPILOGUE, CUBLASLT_EPILOGUE_BIAS), CUBLAS_STATUS_SUCCESS);
  const void* bias = s.bias.at(0);
  ASSERT_EQ(s.desc.set(CUBLASLT_MATMUL_DESC_BIAS_POINTER, bias), CUBLAS_STATUS_SUCCESS);
  ASSERT_EQ(s.desc.set(CUBLASLT_MATMUL_DESC_BIAS_DATA_TYPE, CUDA_R_32F), CUBLAS_STATUS_SUCCESS);
  cublasLtMatmulHeuristicResult_t result{};
  int count = 0;
  EXPECT_EQ(s.heuristic(s.desc.d, la.l, lb.l, ld.l, &result, &count), CUBLAS_STATUS_NOT_SUPPORTED);
  EXPECT_EQ(count, 0);
  EXPECT_EQ(cublasLtMatmul(s.lt.h, s.desc.d, &s.alpha, s.a.at(0), la.l, s.b.at(0), lb.l, &s.beta, s.d.at(0), ld.l,
                           s.d.at(0), ld.l, nullptr, nullptr, 0, nullptr),
            CUBLAS_STATUS_NOT_SUPPORTED);
  // The same with the bias in D's type (the default, -1) is supported.
  ASSERT_EQ(s.desc.set(CUBLASLT_MATMUL_DESC_BIAS_DATA_TYPE, int32_t{-1}), CUBLAS_STATUS_SUCCESS);
  EXPECT_EQ(s.heuristic(s.desc.d, la.l, lb.l, ld.l, &result, &count), CUBLAS_STATUS_SUCCESS);
  EXPECT_EQ(count, 1);
}

TEST(EmulatorCublasLt, BgradbWithABiasTypeOtherThanDsIsNotSupported) {
  LtSetup s;
  ASSERT_EQ(s.desc.set(CUBLASLT_MATMUL_DESC_EPILOGUE, CUBLASLT_EPILOGUE_BGRADB), CUBLAS_STATUS_SUCCESS);
  const void* bias = s.bias.at(0);
  ASSERT_EQ(s.desc.set(CUBLASLT_MATMUL_DESC_BIAS_POINTER, bias), CUBLAS_STATUS_SUCCESS);
  ASSERT_EQ(s.desc.set(CUBLASLT_MATMUL_DESC_BIAS_DATA_TYPE, CUDA_R_16BF), CUBLAS_STATUS_SUCCESS);
  cublasLtMatmulHeuristicResult_t result{};
  int count = 0;
  EXPECT_EQ(s.heuristic(&result, &count), CUBLAS_STATUS_NOT_SUPPORTED);
  EXPECT_EQ(count, 0);
}

// A bias vector less than 16-byte aligned (a view at an offset) gets no algorithm, and is refused
// by the matmul too.
TEST(EmulatorCublasLt, MisalignedBiasIsNotSupported) {
  LtSetup s;
  ASSERT_EQ(s.desc.set(CUBLASLT_MATMUL_DESC_EPILOGUE, CUBLASLT_EPILOGUE_BIAS), CUBLAS_STATUS_SUCCESS);
  const void* bias = s.bias.at(4);
  ASSERT_EQ(s.desc.set(CUBLASLT_MATMUL_DESC_BIAS_POINTER, bias), CUBLAS_STATUS_SUCCESS);
  cublasLtMatmulHeuristicResult_t result{};
  int count = 0;
  EXPECT_EQ(s.heuristic(&result, &count), CUBLAS_STATUS_NOT_SUPPORTED);
  EXPECT_EQ(count, 0);
  EXPECT_EQ(s.matmul(nullptr), CUBLAS_STATUS_NOT_SUPPORTED);
  const void* aligned = s.bias.at(16);
  ASSERT_EQ(s.desc.set(CUBLASLT_MATMUL_DESC_BIAS_POINTER, aligned), CUBLAS_STATUS_SUCCESS);
  EXPECT_EQ(s.heuristic(&result, &count), CUBLAS_STATUS_SUCCESS);
  EXPECT_EQ(s.matmul(&result.algo), CUBLAS_STATUS_SUCCESS);
  EXPECT_EQ(cudaDeviceSynchronize(), cudaSuccess);
}

TEST(EmulatorCublasLt, TypeCombinationsOutsideTheTableAreNotSupported) {
  LtSetup s;
  cublasLtMatmulHeuristicResult_t result{};
  int count = 0;
  {  // fp32 A and B with a bf16 D: not a row of the table for CUBLAS_COMPUTE_32F
    const LayoutDesc ld(CUDA_R_16BF, s.m, s.n, s.m);
    EXPECT_EQ(s.heuristic(s.desc.d, s.la.l, s.lb.l, ld.l, &result, &count), CUBLAS_STATUS_NOT_SUPPORTED);
    EXPECT_EQ(count, 0);
  }
  {  // A and B of different types
    const LayoutDesc lb(CUDA_R_16BF, s.k, s.n, s.k);
    EXPECT_EQ(s.heuristic(s.desc.d, s.la.l, lb.l, s.ld.l, &result, &count), CUBLAS_STATUS_NOT_SUPPORTED);
  }
  {  // TF32 compute takes fp32 inputs only
    Desc tf32(CUBLAS_COMPUTE_32F_FAST_TF32);
    const LayoutDesc la(CUDA_R_16BF, s.m, s.k, s.m), lb(CUDA_R_16BF, s.k, s.n, s.k);
    EXPECT_EQ(s.heuristic(tf32.d, la.l, lb.l, s.ld.l, &result, &count), CUBLAS_STATUS_NOT_SUPPORTED);
  }
}

// A preference that allows less alignment than an element needs leaves no algorithm; an algorithm
// chosen for 256-byte aligned buffers is refused for a less aligned one.
TEST(EmulatorCublasLt, AlignmentBelowThePreferenceIsRefused) {
  LtSetup s;
  cublasLtMatmulHeuristicResult_t result{};
  int count = 0;
  ASSERT_EQ(s.heuristic(&result, &count), CUBLAS_STATUS_SUCCESS);  // default: 256 bytes promised
  EXPECT_EQ(s.matmul(s.a.at(4), s.b.at(0), s.d.at(0), &result.algo), CUBLAS_STATUS_INVALID_VALUE);
  EXPECT_EQ(s.matmul(s.a.at(0), s.b.at(16), s.d.at(0), &result.algo), CUBLAS_STATUS_INVALID_VALUE);
  EXPECT_EQ(s.matmul(s.a.at(0), s.b.at(0), s.d.at(8), &result.algo), CUBLAS_STATUS_INVALID_VALUE);

  ASSERT_EQ(s.pref.set(CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_A_BYTES, uint32_t{4}), CUBLAS_STATUS_SUCCESS);
  ASSERT_EQ(s.heuristic(&result, &count), CUBLAS_STATUS_SUCCESS);
  EXPECT_EQ(s.matmul(s.a.at(4), s.b.at(0), s.d.at(0), &result.algo), CUBLAS_STATUS_SUCCESS);

  ASSERT_EQ(s.pref.set(CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_A_BYTES, uint32_t{2}), CUBLAS_STATUS_SUCCESS);
  EXPECT_EQ(s.heuristic(&result, &count), CUBLAS_STATUS_NOT_SUPPORTED);
  EXPECT_EQ(count, 0);
  EXPECT_EQ(cudaDeviceSynchronize(), cudaSuccess);
}

// An algorithm is for the configuration it was chosen for.
TEST(EmulatorCublasLt, AnAlgorithmForAnotherConfigurationIsRefused) {
  LtSetup s;
  cublasLtMatmulHeuristicResult_t result{};
  int count = 0;
  ASSERT_EQ(s.heuristic(&result, &count), CUBLAS_STATUS_SUCCESS);
  ASSERT_EQ(s.desc.set(CUBLASLT_MATMUL_DESC_EPILOGUE, CUBLASLT_EPILOGUE_BIAS), CUBLAS_STATUS_SUCCESS);
  const void* bias = s.bias.at(0);
  ASSERT_EQ(s.desc.set(CUBLASLT_MATMUL_DESC_BIAS_POINTER, bias), CUBLAS_STATUS_SUCCESS);
  EXPECT_EQ(s.matmul(&result.algo), CUBLAS_STATUS_INVALID_VALUE);
  cublasLtMatmulAlgo_t foreign{};
  EXPECT_EQ(s.matmul(&foreign), CUBLAS_STATUS_INVALID_VALUE);
}

// Every buffer must be device memory over the whole extent the layout gives it.
TEST(EmulatorCublasLt, HostMemoryAndOverrunsAreInvalidValues) {
  LtSetup s;
  std::vector<float> host(static_cast<size_t>(s.m * s.k));
  EXPECT_EQ(s.matmul(host.data(), s.b.at(0), s.d.at(0), nullptr), CUBLAS_STATUS_INVALID_VALUE);
  const LayoutDesc too_long(CUDA_R_32F, s.m, s.k, s.m + 64);  // (k - 1) * ld + m floats: past the end
  EXPECT_EQ(cublasLtMatmul(s.lt.h, s.desc.d, &s.alpha, s.a.at(0), too_long.l, s.b.at(0), s.lb.l, &s.beta, s.d.at(0),
                           s.ld.l, s.d.at(0), s.ld.l, nullptr, nullptr, 0, nullptr),
            CUBLAS_STATUS_INVALID_VALUE);
  ASSERT_EQ(s.desc.set(CUBLASLT_MATMUL_DESC_EPILOGUE, CUBLASLT_EPILOGUE_BGRADB), CUBLAS_STATUS_SUCCESS);
  std::vector<float> host_bias(static_cast<size_t>(s.n) + 16);
  const void* bias = host_bias.data() + (reinterpret_cast<uintptr_t>(host_bias.data()) % 16 == 0 ? 0 : 2);
  ASSERT_EQ(s.desc.set(CUBLASLT_MATMUL_DESC_BIAS_POINTER, bias), CUBLAS_STATUS_SUCCESS);
  EXPECT_EQ(s.matmul(nullptr), CUBLAS_STATUS_INVALID_VALUE);
}

TEST(EmulatorCublasLt, InconsistentDescriptorsAreInvalidValues) {
  LtSetup s;
  cublasLtMatmulHeuristicResult_t result{};
  int count = 0;
  const LayoutDesc wrong_k(CUDA_R_32F, s.k + 1, s.n, s.k + 1);
  EXPECT_EQ(s.heuristic(s.desc.d, s.la.l, wrong_k.l, s.ld.l, &result, &count), CUBLAS_STATUS_INVALID_VALUE);
  const LayoutDesc ld_below_rows(CUDA_R_32F, s.m, s.k, s.m - 1);
  EXPECT_EQ(s.heuristic(s.desc.d, ld_below_rows.l, s.lb.l, s.ld.l, &result, &count), CUBLAS_STATUS_INVALID_VALUE);
  EXPECT_EQ(cublasLtMatmulAlgoGetHeuristic(s.lt.h, s.desc.d, s.la.l, s.lb.l, s.ld.l, s.ld.l, s.pref.p, 0, &result,
                                           &count),
            CUBLAS_STATUS_INVALID_VALUE);
  EXPECT_EQ(s.desc.set(CUBLASLT_MATMUL_DESC_TRANSA, int64_t{CUBLAS_OP_T}), CUBLAS_STATUS_INVALID_VALUE);  // 8 bytes
  EXPECT_EQ(s.pref.set(CUBLASLT_MATMUL_PREF_MAX_WORKSPACE_BYTES, uint32_t{0}), CUBLAS_STATUS_INVALID_VALUE);
  ASSERT_EQ(s.desc.set(CUBLASLT_MATMUL_DESC_EPILOGUE, CUBLASLT_EPILOGUE_BIAS), CUBLAS_STATUS_SUCCESS);
  EXPECT_EQ(s.matmul(nullptr), CUBLAS_STATUS_INVALID_VALUE);  // no bias pointer
}

TEST(EmulatorCublasLt, AMisalignedOrHostWorkspaceIsAnInvalidValue) {
  LtSetup s;
  EXPECT_EQ(s.matmul(s.a.at(0), s.b.at(0), s.d.at(0), nullptr, s.workspace.at(0), 1 << 16), CUBLAS_STATUS_SUCCESS);
  EXPECT_EQ(s.matmul(s.a.at(0), s.b.at(0), s.d.at(0), nullptr, s.workspace.at(16), 1 << 12),
            CUBLAS_STATUS_INVALID_VALUE);
  std::vector<unsigned char> host(1 << 13);
  void* host_aligned = host.data() + (256 - reinterpret_cast<uintptr_t>(host.data()) % 256) % 256;
  EXPECT_EQ(s.matmul(s.a.at(0), s.b.at(0), s.d.at(0), nullptr, host_aligned, 1 << 12), CUBLAS_STATUS_INVALID_VALUE);
  EXPECT_EQ(cudaDeviceSynchronize(), cudaSuccess);
}

TEST(EmulatorCublasLt, DestroyedDescriptorsAreInvalidValues) {
  LtSetup s;
  cublasLtMatmulDesc_t gone = nullptr;
  ASSERT_EQ(cublasLtMatmulDescCreate(&gone, CUBLAS_COMPUTE_32F, CUDA_R_32F), CUBLAS_STATUS_SUCCESS);
  ASSERT_EQ(cublasLtMatmulDescDestroy(gone), CUBLAS_STATUS_SUCCESS);
  EXPECT_EQ(cublasLtMatmulDescDestroy(gone), CUBLAS_STATUS_INVALID_VALUE);
  cublasLtMatmulHeuristicResult_t result{};
  int count = 0;
  EXPECT_EQ(s.heuristic(gone, s.la.l, s.lb.l, s.ld.l, &result, &count), CUBLAS_STATUS_INVALID_VALUE);
}

// =============================================================================================
// classic cuBLAS: cublasSgemm and cublasGemmEx (linear.cu's fallback)
// =============================================================================================

namespace {

struct BlasHandle {
  cublasHandle_t h = nullptr;
  BlasHandle() { EXPECT_EQ(cublasCreate(&h), CUBLAS_STATUS_SUCCESS); }
  ~BlasHandle() { EXPECT_EQ(cublasDestroy(h), CUBLAS_STATUS_SUCCESS); }
};

// cublasGemmEx_64 (or cublasSgemm_64 for fp32) on the handle's stream, compared with the reference.
void check_classic(const Case& t, const Inputs& in, cublasHandle_t h) {
  SCOPED_TRACE(t.str());
  DeviceBuffer a(in.a.values.size() * element_size(t.type_ab)), b(in.b.values.size() * element_size(t.type_ab)),
      c(in.c.values.size() * element_size(t.type_d));
  a.upload(in.a.values, t.type_ab);
  b.upload(in.b.values, t.type_ab);
  c.upload(in.c.values, t.type_d);
  if (t.type_ab == CUDA_R_32F && t.type_d == CUDA_R_32F) {
    ASSERT_EQ(cublasSgemm_64(h, t.op_a, t.op_b, t.m, t.n, t.k, &t.alpha, static_cast<const float*>(a.at(0)),
                             in.a.ld, static_cast<const float*>(b.at(0)), in.b.ld, &t.beta,
                             static_cast<float*>(c.at(0)), in.c.ld),
              CUBLAS_STATUS_SUCCESS);
  } else {
    ASSERT_EQ(cublasGemmEx_64(h, t.op_a, t.op_b, t.m, t.n, t.k, &t.alpha, a.at(0), t.type_ab, in.a.ld, b.at(0),
                              t.type_ab, in.b.ld, &t.beta, c.at(0), t.type_d, in.c.ld, CUBLAS_COMPUTE_32F,
                              CUBLAS_GEMM_DEFAULT),
              CUBLAS_STATUS_SUCCESS);
  }
  expect_same(c.download(in.c.values.size(), t.type_d), reference_d(t, in).values, "C");
}

}  // namespace

TEST(EmulatorCublas, SgemmAndGemmExMatchTheReference) {
  std::mt19937 rng(8);
  BlasHandle blas;
  cudaStream_t stream = nullptr;
  ASSERT_EQ(cudaStreamCreate(&stream), cudaSuccess);
  ASSERT_EQ(cublasSetStream(blas.h, stream), CUBLAS_STATUS_SUCCESS);
  cudaStream_t bound = nullptr;
  ASSERT_EQ(cublasGetStream(blas.h, &bound), CUBLAS_STATUS_SUCCESS);
  EXPECT_EQ(bound, stream);
  const std::pair<cudaDataType_t, cudaDataType_t> types[] = {
      {CUDA_R_32F, CUDA_R_32F}, {CUDA_R_16BF, CUDA_R_16BF}, {CUDA_R_16BF, CUDA_R_32F}};
  for (const auto& [type_ab, type_d] : types)
    for (int64_t m : kSizes)
      for (cublasOperation_t op_a : kOps)
        for (cublasOperation_t op_b : kOps) {
          Case t;
          t.op_a = op_a;
          t.op_b = op_b;
          t.m = m;
          t.n = 3;
          t.k = 17;
          t.pad = 2;
          t.type_ab = type_ab;
          t.type_d = type_d;
          t.beta = m == 3 ? 0.5f : 0.0f;
          check_classic(t, grid_inputs(t, rng), blas.h);
          if (testing::Test::HasFatalFailure()) return;
        }
  EXPECT_EQ(cudaStreamDestroy(stream), cudaSuccess);
}

// CUBLAS_TF32_TENSOR_OP_MATH makes cublasSgemm round its inputs to TF32; the default math does not.
TEST(EmulatorCublas, SgemmFollowsTheMathMode) {
  BlasHandle blas;
  DeviceBuffer a(4), b(4), c(4);
  a.upload({1.0f + 0x1p-11f + 0x1p-20f}, CUDA_R_32F);
  b.upload({1.0f}, CUDA_R_32F);
  const float alpha = 1.0f, beta = 0.0f;
  for (cublasMath_t mode : {CUBLAS_DEFAULT_MATH, CUBLAS_TF32_TENSOR_OP_MATH}) {
    ASSERT_EQ(cublasSetMathMode(blas.h, mode), CUBLAS_STATUS_SUCCESS);
    ASSERT_EQ(cublasSgemm_64(blas.h, CUBLAS_OP_N, CUBLAS_OP_N, 1, 1, 1, &alpha, static_cast<const float*>(a.at(0)), 1,
                             static_cast<const float*>(b.at(0)), 1, &beta, static_cast<float*>(c.at(0)), 1),
              CUBLAS_STATUS_SUCCESS);
    const float want = mode == CUBLAS_DEFAULT_MATH ? 1.0f + 0x1p-11f + 0x1p-20f : 1.0f + 0x1p-10f;
    expect_same(c.download(1, CUDA_R_32F), {want}, mode == CUBLAS_DEFAULT_MATH ? "default math" : "tf32 math");
  }
}

TEST(EmulatorCublas, RefusesWhatTheDocumentationRefuses) {
  BlasHandle blas;
  DeviceBuffer a(64 * 4), b(64 * 4), c(64 * 4);
  const float alpha = 1.0f, beta = 0.0f;
  // Types outside cublasGemmEx's table: fp32 A and B with a bf16 C.
  EXPECT_EQ(cublasGemmEx_64(blas.h, CUBLAS_OP_N, CUBLAS_OP_N, 4, 4, 4, &alpha, a.at(0), CUDA_R_32F, 4, b.at(0),
                            CUDA_R_32F, 4, &beta, c.at(0), CUDA_R_16BF, 4, CUBLAS_COMPUTE_32F, CUBLAS_GEMM_DEFAULT),
            CUBLAS_STATUS_NOT_SUPPORTED);
  // lda < max(1, m), a negative size, and host memory.
  EXPECT_EQ(cublasSgemm_64(blas.h, CUBLAS_OP_N, CUBLAS_OP_N, 4, 4, 4, &alpha, static_cast<const float*>(a.at(0)), 3,
                           static_cast<const float*>(b.at(0)), 4, &beta, static_cast<float*>(c.at(0)), 4),
            CUBLAS_STATUS_INVALID_VALUE);
  EXPECT_EQ(cublasSgemm_64(blas.h, CUBLAS_OP_N, CUBLAS_OP_N, -1, 4, 4, &alpha, static_cast<const float*>(a.at(0)),
                           4, static_cast<const float*>(b.at(0)), 4, &beta, static_cast<float*>(c.at(0)), 4),
            CUBLAS_STATUS_INVALID_VALUE);
  std::vector<float> host(16);
  EXPECT_EQ(cublasSgemm_64(blas.h, CUBLAS_OP_N, CUBLAS_OP_N, 4, 4, 4, &alpha, host.data(), 4,
                           static_cast<const float*>(b.at(0)), 4, &beta, static_cast<float*>(c.at(0)), 4),
            CUBLAS_STATUS_INVALID_VALUE);
  // The workspace is 256-byte aligned device memory.
  EXPECT_EQ(cublasSetWorkspace(blas.h, a.at(0), 64 * 4), CUBLAS_STATUS_SUCCESS);
  EXPECT_EQ(cublasSetWorkspace(blas.h, a.at(16), 64), CUBLAS_STATUS_INVALID_VALUE);
  EXPECT_EQ(cudaDeviceSynchronize(), cudaSuccess);
}

TEST(EmulatorCublas, StatusNamesAndStrings) {
  EXPECT_STREQ(cublasGetStatusName(CUBLAS_STATUS_NOT_SUPPORTED), "CUBLAS_STATUS_NOT_SUPPORTED");
  EXPECT_STREQ(cublasGetStatusString(CUBLAS_STATUS_SUCCESS), "success");
}

#else

TEST(EmulatorCublas, NeedsTheEmulatorBuild) {
  GTEST_SKIP() << "built without the emulated CUDA device (CNX_CUDA_EMULATOR undefined): this tests its "
                  "cuBLAS/cuBLASLt emulation";
}

#endif
