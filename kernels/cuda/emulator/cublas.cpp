// The emulated cuBLAS and cuBLASLt: the library calls the project makes (tensor/cuda_context.cu,
// kernels/cuda/linear.cu), carried out on the CPU with their documented semantics.
//
// What is modelled:
//  - column-major GEMM, D = alpha * op(A) op(B) + beta * C, with the layouts' rows, columns and
//    leading dimensions, N/T transposes, A/B/C/D in CUDA_R_32F or CUDA_R_16BF (the combinations
//    the documentation lists for CUBLAS_COMPUTE_32F and _FAST_TF32), an fp32 accumulator fed in a
//    fixed k order (bitwise reproducible), TF32 inputs rounded to nearest even where the compute
//    type or the math mode asks for TF32;
//  - the epilogues DEFAULT, BIAS and BGRADB;
//  - the work runs on a stream of the emulated device (cnx::emu::enqueue), in order with the
//    kernels; arguments are validated when the function is called and the status is returned at
//    once, as the library does; alpha and beta are host scalars (CUBLAS_POINTER_MODE_HOST, the
//    default), read at the call;
//  - every buffer the GEMM touches must be device memory over exactly the extent it touches
//    (a real GPU would fault): otherwise CUBLAS_STATUS_INVALID_VALUE and a message on stderr;
//  - what the documentation says cuBLASLt does not support is refused the way the library
//    refuses it (the heuristic returns CUBLAS_STATUS_NOT_SUPPORTED and no algorithm; the matmul
//    returns CUBLAS_STATUS_NOT_SUPPORTED or CUBLAS_STATUS_INVALID_VALUE), so the caller's
//    fallback runs. Each rule cites the cuBLAS documentation (docs.nvidia.com/cuda/cublas,
//    CUDA 13) next to the code that enforces it.
//
// What is not: any other compute or data type, epilogue, pointer mode, matrix order or batching
// (refused with CUBLAS_STATUS_NOT_SUPPORTED, saying "not modelled"), the real heuristics and
// their algorithm choice (there is one emulated algorithm, which needs no workspace), split-K
// and any other summation order of the hardware.
//
// Messages on stderr: a documented refusal (CUBLAS_STATUS_NOT_SUPPORTED) is a normal outcome, the
// caller falls back, so it is printed only with CUBLASLT_LOG_LEVEL >= 1, as the library logs its
// errors; CUBLAS_STATUS_INVALID_VALUE means a bug in the caller, and "not modelled" a gap in the
// emulator: both are always printed.
#include <cublasLt.h>
#include <cublas_v2.h>
#include <cuda_bf16.h>

#include <algorithm>
#include <bit>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <mutex>
#include <optional>
#include <string>
#include <unordered_map>
#include <vector>

#include "kernels/cuda/emulator/emulator.h"

// The library's opaque handles (declared, never defined, by the headers).
struct cublasContext {
  cudaStream_t stream = nullptr;  // cublasSetStream; nullptr: the legacy default stream
  cublasMath_t math_mode = CUBLAS_DEFAULT_MATH;
};
struct cublasLtContext {};  // a cuBLASLt handle holds nothing the emulation needs

namespace cnx::emu {
namespace {

// ---- reporting ---------------------------------------------------------------------------------

cublasStatus_t invalid_value(const char* function, const std::string& why) {
  std::fprintf(stderr, "cnx emulator: %s: CUBLAS_STATUS_INVALID_VALUE: %s\n", function, why.c_str());
  return CUBLAS_STATUS_INVALID_VALUE;
}

bool log_refusals() {
  static const bool on = [] {
    const char* level = std::getenv("CUBLASLT_LOG_LEVEL");
    return level != nullptr && std::atoi(level) >= 1;
  }();
  return on;
}

cublasStatus_t not_supported(const char* function, const std::string& why) {
  if (log_refusals())
    std::fprintf(stderr, "cnx emulator: %s: CUBLAS_STATUS_NOT_SUPPORTED: %s\n", function, why.c_str());
  return CUBLAS_STATUS_NOT_SUPPORTED;
}

// Something the library may well support but the emulator does not implement.
cublasStatus_t not_modelled(const char* function, const std::string& what) {
  std::fprintf(stderr, "cnx emulator: %s: CUBLAS_STATUS_NOT_SUPPORTED: %s is not modelled by the emulator\n",
               function, what.c_str());
  return CUBLAS_STATUS_NOT_SUPPORTED;
}

std::string type_name(cudaDataType_t type) {
  switch (type) {
    case CUDA_R_32F: return "CUDA_R_32F";
    case CUDA_R_16BF: return "CUDA_R_16BF";
    default: return "cudaDataType " + std::to_string(static_cast<int>(type));
  }
}

// ---- elements ------------------------------------------------------------------------------------

bool is_modelled_type(cudaDataType_t type) { return type == CUDA_R_32F || type == CUDA_R_16BF; }

size_t element_size(cudaDataType_t type) { return type == CUDA_R_16BF ? 2 : 4; }

float load(const void* base, cudaDataType_t type, int64_t index) {
  if (type == CUDA_R_16BF) return __bfloat162float(static_cast<const __nv_bfloat16*>(base)[index]);
  return static_cast<const float*>(base)[index];
}

// fp32 to the stored type, rounding to nearest even for bf16.
void store(void* base, cudaDataType_t type, int64_t index, float value) {
  if (type == CUDA_R_16BF)
    static_cast<__nv_bfloat16*>(base)[index] = __float2bfloat16_rn(value);
  else
    static_cast<float*>(base)[index] = value;
}

// fp32 rounded to TF32 (10 explicit mantissa bits), to nearest even: "Note that input conversions
// round to nearest even." (https://docs.nvidia.com/cuda/cublas/index.html#cublascomputetype-t,
// CUBLAS_COMPUTE_32F_FAST_TF32). Infinities and NaNs pass unchanged.
float round_to_tf32(float x) {
  if (!std::isfinite(x)) return x;
  uint32_t bits = std::bit_cast<uint32_t>(x);
  bits += 0xFFFu + ((bits >> 13) & 1u);  // just under half of the 13 dropped bits, + the kept lsb: ties to even
  bits &= ~0x1FFFu;
  return std::bit_cast<float>(bits);
}

// The largest power of two (at most 256) that divides the address; 256 for nullptr.
uint32_t alignment_of(const void* p) {
  const uintptr_t address = reinterpret_cast<uintptr_t>(p);
  uint32_t alignment = 256;
  while (alignment > 1 && address % alignment != 0) alignment /= 2;
  return alignment;
}

// ---- the GEMM --------------------------------------------------------------------------------

// A column-major matrix in device memory: element (r, c) at data[r + c * ld].
struct Matrix {
  const void* data = nullptr;
  cudaDataType_t type = CUDA_R_32F;
  int64_t rows = 0, cols = 0, ld = 0;

  // The bytes from data that the matrix spans (0 when it has no elements).
  size_t bytes() const {
    if (rows == 0 || cols == 0) return 0;
    return static_cast<size_t>((cols - 1) * ld + rows) * element_size(type);
  }
  float get(int64_t r, int64_t c) const { return load(data, type, r + c * ld); }
  // Only D is written; it is held as const like the inputs so that one type serves all four.
  void set(int64_t r, int64_t c, float v) const { store(const_cast<void*>(data), type, r + c * ld, v); }
};

// A packed vector in device memory (the bias, or the bias gradient).
struct Vector {
  const void* data = nullptr;
  cudaDataType_t type = CUDA_R_32F;
  int64_t length = 0;

  size_t bytes() const { return static_cast<size_t>(length) * element_size(type); }
};

// One GEMM, everything resolved: D (m, n) = alpha * op(A) (m, k) op(B) (k, n) + beta * C (m, n),
// then the epilogue.
struct Gemm {
  bool trans_a = false, trans_b = false;
  int64_t m = 0, n = 0, k = 0;
  Matrix a, b, c, d;  // as stored; C is not read when beta == 0
  float alpha = 1.0f, beta = 0.0f;
  bool tf32 = false;  // round the A and B inputs to TF32
  cublasLtEpilogue_t epilogue = CUBLASLT_EPILOGUE_DEFAULT;
  Vector bias;  // BIAS: m values added to the rows of D; BGRADB: n values written
};

float op_a(const Gemm& g, int64_t i, int64_t l) { return g.trans_a ? g.a.get(l, i) : g.a.get(i, l); }
float op_b(const Gemm& g, int64_t l, int64_t j) { return g.trans_b ? g.b.get(j, l) : g.b.get(l, j); }

// op(X) as fp32 (TF32-rounded if asked), `outer` runs of `inner` values (packed[o * inner + i]
// = value(o, i)), in the order the inner loop of run() reads them.
template <class Value>
std::vector<float> pack(const Gemm& g, int64_t outer, int64_t inner, Value value) {
  std::vector<float> packed(outer * inner);
  for (int64_t o = 0; o < outer; ++o)
    for (int64_t i = 0; i < inner; ++i) {
      const float v = value(o, i);
      packed[o * inner + i] = g.tf32 ? round_to_tf32(v) : v;
    }
  return packed;
}
// op(A): k rows of m values; op(B): n columns of k values.
std::vector<float> pack_op_a(const Gemm& g) {
  return pack(g, g.k, g.m, [&g](int64_t l, int64_t i) { return op_a(g, i, l); });
}
std::vector<float> pack_op_b(const Gemm& g) {
  return pack(g, g.n, g.k, [&g](int64_t j, int64_t l) { return op_b(g, l, j); });
}

// BIAS: "Bias vector is broadcast to all columns and added before applying the final
// postprocessing" (https://docs.nvidia.com/cuda/cublas/index.html#cublasltepilogue-t), i.e. to the
// fp32 value, before the conversion to D's type.
std::vector<float> bias_values(const Gemm& g) {
  std::vector<float> values;
  if (g.epilogue != CUBLASLT_EPILOGUE_BIAS) return values;
  for (int64_t i = 0; i < g.bias.length; ++i) values.push_back(load(g.bias.data, g.bias.type, i));
  return values;
}

// BGRADB: "The bias size corresponds to the number of columns of the matrix D. The reduction
// happens over the GEMM's "k" dimension." (same page): bias[j] = sum over l of op(B)(l, j), in
// fp32, l ascending. The documentation does not say whether alpha scales it or whether TF32
// rounding applies; the emulation sums the stored B values, unscaled (the project passes
// alpha = 1 and bf16 or fp32 B, where this is exact either way).
void write_bias_gradient(const Gemm& g) {
  for (int64_t j = 0; j < g.n; ++j) {
    float sum = 0.0f;
    for (int64_t l = 0; l < g.k; ++l) sum += op_b(g, l, j);
    store(const_cast<void*>(g.bias.data), g.bias.type, j, sum);
  }
}

// Runs on the CPU, inside the device-access window of the stream drain. Each element of D is
// one fp32 accumulator fed with std::fma in the order l = 0 .. k-1, so the result does not depend
// on anything but the inputs. "If beta == 0, C does not have to be a valid input."
// (https://docs.nvidia.com/cuda/cublas/index.html#cublas-t-gemm): C is not read then.
// acc[i] += a[i] * b for i < m, fused. Compiled twice: with the FMA instruction where the CPU
// has it (chosen at load time), else std::fma's software routine, ~10x slower; both round once.
__attribute__((target_clones("fma", "default")))
void fma_column(float* acc, const float* a, float b, int64_t m) {
  for (int64_t i = 0; i < m; ++i) acc[i] = std::fma(a[i], b, acc[i]);
}

void run(const Gemm& g) {
  const std::vector<float> a = pack_op_a(g), b = pack_op_b(g), bias = bias_values(g);
  std::vector<float> acc(g.m);  // column j of op(A) op(B)
  for (int64_t j = 0; j < g.n; ++j) {
    std::fill(acc.begin(), acc.end(), 0.0f);
    for (int64_t l = 0; l < g.k; ++l) {
      fma_column(acc.data(), &a[l * g.m], b[j * g.k + l], g.m);
    }
    for (int64_t i = 0; i < g.m; ++i) {
      float v = g.alpha * acc[i];
      if (g.beta != 0.0f) v += g.beta * g.c.get(i, j);
      if (!bias.empty()) v += bias[i];
      g.d.set(i, j, v);
    }
  }
  if (g.epilogue == CUBLASLT_EPILOGUE_BGRADB) write_bias_gradient(g);
}

// ---- device memory and launch ----------------------------------------------------------------

struct Buffer {
  const char* name;
  const void* data;
  size_t bytes;
  size_t element_bytes;
};

// Every buffer the GEMM reads or writes, with the exact extent it touches.
std::vector<Buffer> buffers(const Gemm& g) {
  std::vector<Buffer> list = {{"A", g.a.data, g.a.bytes(), element_size(g.a.type)},
                              {"B", g.b.data, g.b.bytes(), element_size(g.b.type)},
                              {"D", g.d.data, g.d.bytes(), element_size(g.d.type)}};
  if (g.beta != 0.0f) list.push_back({"C", g.c.data, g.c.bytes(), element_size(g.c.type)});
  if (g.epilogue != CUBLASLT_EPILOGUE_DEFAULT)
    list.push_back({"the bias vector", g.bias.data, g.bias.bytes(), element_size(g.bias.type)});
  return list;
}

std::string describe(const Buffer& b) {
  char text[160];
  std::snprintf(text, sizeof text, "%s (%zu bytes at %p)", b.name, b.bytes, b.data);
  return text;
}

// A real GPU faults on a pointer that is not device memory, or not aligned to its element type;
// the emulator refuses the call instead, naming the operand.
cublasStatus_t check_buffers(const char* function, const Gemm& g) {
  for (const Buffer& b : buffers(g)) {
    if (b.bytes == 0) continue;  // nothing is accessed
    if (reinterpret_cast<uintptr_t>(b.data) % b.element_bytes != 0)
      return invalid_value(function, describe(b) + " is not aligned to its " +
                                         std::to_string(b.element_bytes) + "-byte elements");
    if (!is_device_range(b.data, b.bytes))
      return invalid_value(function, describe(b) + " is not (entirely) device memory from cudaMalloc");
  }
  return CUBLAS_STATUS_SUCCESS;
}

// What a launch trace (emulator.h, start_trace) records of g: its shape and the bytes of the
// buffers it reads (A, B, C when beta != 0, a BIAS vector) and writes (D, a BGRADB vector).
GemmTraceInfo trace_info(const Gemm& g) {
  const auto short_name = [](cudaDataType_t t) { return t == CUDA_R_16BF ? "bf16" : "f32"; };
  GemmTraceInfo info{g.m, g.n, g.k,
                     std::string(short_name(g.a.type)) + "*" + short_name(g.b.type) + "->" +
                         short_name(g.d.type) + (g.tf32 ? " +tf32" : ""),
                     g.epilogue == CUBLASLT_EPILOGUE_BIAS     ? "BIAS"
                     : g.epilogue == CUBLASLT_EPILOGUE_BGRADB ? "BGRADB"
                                                              : "DEFAULT"};
  for (const Buffer& b : buffers(g)) {
    const bool written = std::strcmp(b.name, "D") == 0 ||
                         (g.epilogue == CUBLASLT_EPILOGUE_BGRADB && b.data == g.bias.data);
    (written ? info.bytes_written : info.bytes_read) += b.bytes;
  }
  return info;
}

// Queues g on the stream. The buffers are checked again when the work runs: one freed in between
// would be a use-after-free on the GPU.
cublasStatus_t launch_gemm(const char* function, cudaStream_t stream, const Gemm& g) {
  const cublasStatus_t status = check_buffers(function, g);
  if (status != CUBLAS_STATUS_SUCCESS) return status;
  enqueue(stream, function, [g, name = std::string(function)] {
    for (const Buffer& b : buffers(g))
      if (b.bytes > 0 && !is_device_range(b.data, b.bytes))
        throw DeviceFault{cudaErrorIllegalAddress,
                          name + ": " + describe(b) + " is no longer device memory when the GEMM runs"};
    run(g);
  }, trace_info(g));
  return CUBLAS_STATUS_SUCCESS;
}

// ---- cuBLASLt descriptors --------------------------------------------------------------------

// Live descriptors of one kind and their state, so that a destroyed or foreign descriptor is
// refused (CUBLAS_STATUS_INVALID_VALUE) instead of being read.
template <class Opaque, class State>
class Registry {
 public:
  Opaque* create(const State& state) {
    auto* handle = new Opaque{};
    std::lock_guard<std::mutex> lock(mutex_);
    states_.emplace(handle, state);
    return handle;
  }
  bool destroy(Opaque* handle) {
    std::lock_guard<std::mutex> lock(mutex_);
    if (states_.erase(handle) == 0) return false;
    delete handle;
    return true;
  }
  std::optional<State> find(const Opaque* handle) const {
    std::lock_guard<std::mutex> lock(mutex_);
    const auto it = states_.find(handle);
    if (it == states_.end()) return std::nullopt;
    return it->second;
  }
  template <class Update>
  bool update(const Opaque* handle, Update&& change) {
    std::lock_guard<std::mutex> lock(mutex_);
    const auto it = states_.find(handle);
    if (it == states_.end()) return false;
    change(it->second);
    return true;
  }

 private:
  mutable std::mutex mutex_;
  std::unordered_map<const Opaque*, State> states_;
};

struct MatmulDesc {
  cublasComputeType_t compute = CUBLAS_COMPUTE_32F;
  cudaDataType_t scale = CUDA_R_32F;
  cublasOperation_t trans_a = CUBLAS_OP_N, trans_b = CUBLAS_OP_N;
  cublasLtEpilogue_t epilogue = CUBLASLT_EPILOGUE_DEFAULT;
  const void* bias = nullptr;
  // "If unset (or set to the default value of -1), the bias vector elements are the same type as
  // the elements of the output matrix (Dtype)"
  // (https://docs.nvidia.com/cuda/cublas/index.html#cublasltmatmuldescattributes-t).
  int32_t bias_type = -1;
};

struct Layout {
  cudaDataType_t type = CUDA_R_32F;
  uint64_t rows = 0, cols = 0;
  int64_t ld = 0;
};

enum Operand { kA, kB, kC, kD };
constexpr const char* kOperandName[] = {"A", "B", "C", "D"};

struct Preference {
  // "Minimum buffer alignment for matrix A (in bytes). [...] Default is 256 bytes." (and B, C, D)
  // (https://docs.nvidia.com/cuda/cublas/index.html#cublasltmatmulpreferenceattributes-t)
  uint32_t min_alignment[4] = {256, 256, 256, 256};
};

// Never destroyed: descriptors may be destroyed by other static objects at exit.
Registry<cublasLtMatmulDescOpaque_t, MatmulDesc>& matmul_descs() {
  static auto* registry = new Registry<cublasLtMatmulDescOpaque_t, MatmulDesc>();
  return *registry;
}
Registry<cublasLtMatrixLayoutOpaque_t, Layout>& layouts() {
  static auto* registry = new Registry<cublasLtMatrixLayoutOpaque_t, Layout>();
  return *registry;
}
Registry<cublasLtMatmulPreferenceOpaque_t, Preference>& preferences() {
  static auto* registry = new Registry<cublasLtMatmulPreferenceOpaque_t, Preference>();
  return *registry;
}

// An attribute's value from SetAttribute's buffer: "CUBLAS_STATUS_INVALID_VALUE if buf is NULL or
// sizeInBytes doesn't match the size of the internal storage for the selected attribute"
// (https://docs.nvidia.com/cuda/cublas/index.html#cublasltmatmuldescsetattribute).
template <class T>
cublasStatus_t read_attribute(const char* function, const char* attribute, const void* buf, size_t size,
                              T* value) {
  if (buf == nullptr || size != sizeof(T))
    return invalid_value(function, std::string(attribute) + " takes " + std::to_string(sizeof(T)) +
                                       " bytes, got " + std::to_string(size) +
                                       (buf ? "" : " and a null buffer"));
  std::memcpy(value, buf, sizeof(T));
  return CUBLAS_STATUS_SUCCESS;
}

// An attribute documented as an integer of type Stored, kept as an enum.
template <class Stored, class Field>
cublasStatus_t read_enum_attribute(const char* function, const char* attribute, const void* buf, size_t size,
                                   Field* field) {
  Stored value{};
  const cublasStatus_t status = read_attribute(function, attribute, buf, size, &value);
  if (status == CUBLAS_STATUS_SUCCESS) *field = static_cast<Field>(value);
  return status;
}

// The attributes the project sets, with the types the documentation gives them.
cublasStatus_t set_matmul_attribute(MatmulDesc& desc, cublasLtMatmulDescAttributes_t attr, const void* buf,
                                    size_t size) {
  const char* f = "cublasLtMatmulDescSetAttribute";
  switch (attr) {
    case CUBLASLT_MATMUL_DESC_TRANSA:
      return read_enum_attribute<int32_t>(f, "CUBLASLT_MATMUL_DESC_TRANSA", buf, size, &desc.trans_a);
    case CUBLASLT_MATMUL_DESC_TRANSB:
      return read_enum_attribute<int32_t>(f, "CUBLASLT_MATMUL_DESC_TRANSB", buf, size, &desc.trans_b);
    case CUBLASLT_MATMUL_DESC_EPILOGUE:
      return read_enum_attribute<uint32_t>(f, "CUBLASLT_MATMUL_DESC_EPILOGUE", buf, size, &desc.epilogue);
    case CUBLASLT_MATMUL_DESC_BIAS_POINTER:
      return read_attribute(f, "CUBLASLT_MATMUL_DESC_BIAS_POINTER", buf, size, &desc.bias);
    case CUBLASLT_MATMUL_DESC_BIAS_DATA_TYPE:
      return read_attribute(f, "CUBLASLT_MATMUL_DESC_BIAS_DATA_TYPE", buf, size, &desc.bias_type);
    default:
      return not_modelled(f, "matmul descriptor attribute " + std::to_string(static_cast<int>(attr)));
  }
}

cublasStatus_t set_preference_attribute(Preference& pref, cublasLtMatmulPreferenceAttributes_t attr,
                                        const void* buf, size_t size) {
  const char* f = "cublasLtMatmulPreferenceSetAttribute";
  switch (attr) {
    case CUBLASLT_MATMUL_PREF_MAX_WORKSPACE_BYTES: {  // uint64_t
      uint64_t bytes = 0;  // any limit admits the emulated algorithm, which needs no workspace
      return read_attribute(f, "CUBLASLT_MATMUL_PREF_MAX_WORKSPACE_BYTES", buf, size, &bytes);
    }
    case CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_A_BYTES:  // uint32_t, and B, C, D below
      return read_attribute(f, "CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_A_BYTES", buf, size, &pref.min_alignment[kA]);
    case CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_B_BYTES:
      return read_attribute(f, "CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_B_BYTES", buf, size, &pref.min_alignment[kB]);
    case CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_C_BYTES:
      return read_attribute(f, "CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_C_BYTES", buf, size, &pref.min_alignment[kC]);
    case CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_D_BYTES:
      return read_attribute(f, "CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_D_BYTES", buf, size, &pref.min_alignment[kD]);
    default:
      return not_modelled(f, "preference attribute " + std::to_string(static_cast<int>(attr)));
  }
}

// ---- cuBLASLt: one matmul's configuration ------------------------------------------------------

// A matmul as the descriptors describe it (pointers aside).
struct LtMatmul {
  MatmulDesc desc;
  Layout layout[4];  // A, B, C, D
  int64_t m = 0, n = 0, k = 0;
  cudaDataType_t bias_type = CUDA_R_32F;
};

bool is_valid_op(cublasOperation_t op) { return op == CUBLAS_OP_N || op == CUBLAS_OP_T || op == CUBLAS_OP_C; }

// For real types CUBLAS_OP_C is the transpose.
bool transposed(cublasOperation_t op) { return op != CUBLAS_OP_N; }

// The descriptors' states; CUBLAS_STATUS_INVALID_VALUE when one is not a live descriptor.
// "If Cdesc is omitted, this function assumes it to be equal to Ddesc."
// (https://docs.nvidia.com/cuda/cublas/index.html#cublasltmatmul)
cublasStatus_t gather(const char* function, cublasLtMatmulDesc_t desc, cublasLtMatrixLayout_t a,
                      cublasLtMatrixLayout_t b, cublasLtMatrixLayout_t c, cublasLtMatrixLayout_t d,
                      LtMatmul* out) {
  const std::optional<MatmulDesc> found = matmul_descs().find(desc);
  if (!found) return invalid_value(function, "the matmul descriptor is not a live cublasLtMatmulDesc_t");
  out->desc = *found;
  const cublasLtMatrixLayout_t handles[4] = {a, b, c ? c : d, d};
  for (int x = kA; x <= kD; ++x) {
    const std::optional<Layout> layout = layouts().find(handles[x]);
    if (!layout)
      return invalid_value(function, std::string("the layout of ") + kOperandName[x] +
                                         " is not a live cublasLtMatrixLayout_t");
    out->layout[x] = *layout;
  }
  return CUBLAS_STATUS_SUCCESS;
}

// Sizes that agree, and layouts the library can address: CUBLAS_STATUS_INVALID_VALUE ("If the
// parameters are unexpectedly NULL, in conflict or in an impossible configuration.",
// https://docs.nvidia.com/cuda/cublas/index.html#cublasltmatmul) otherwise. Sets m, n, k.
cublasStatus_t check_shapes(const char* function, LtMatmul& mm) {
  if (!is_valid_op(mm.desc.trans_a) || !is_valid_op(mm.desc.trans_b))
    return invalid_value(function, "CUBLASLT_MATMUL_DESC_TRANSA/TRANSB must be CUBLAS_OP_N, _T or _C");
  for (int x = kA; x <= kD; ++x) {
    const Layout& l = mm.layout[x];
    // "Currently only non-negative values are supported. Must be large enough so that matrix
    // memory locations are not overlapping (e.g., greater or equal to CUBLASLT_MATRIX_LAYOUT_ROWS
    // in case of CUBLASLT_ORDER_COL)."
    // (https://docs.nvidia.com/cuda/cublas/index.html#cublasltmatrixlayoutattribute-t, _LD)
    if (l.ld < 0 || static_cast<uint64_t>(l.ld) < l.rows)
      return invalid_value(function, std::string(kOperandName[x]) + ": leading dimension " +
                                         std::to_string(l.ld) + " < rows " + std::to_string(l.rows));
  }
  const Layout &a = mm.layout[kA], &b = mm.layout[kB], &c = mm.layout[kC], &d = mm.layout[kD];
  const uint64_t a_rows = transposed(mm.desc.trans_a) ? a.cols : a.rows;  // op(A) is a_rows x a_cols
  const uint64_t a_cols = transposed(mm.desc.trans_a) ? a.rows : a.cols;
  const uint64_t b_rows = transposed(mm.desc.trans_b) ? b.cols : b.rows;  // op(B) is b_rows x b_cols
  const uint64_t b_cols = transposed(mm.desc.trans_b) ? b.rows : b.cols;
  if (a_rows != d.rows || b_cols != d.cols || a_cols != b_rows)
    return invalid_value(function, "op(A) is " + std::to_string(a_rows) + "x" + std::to_string(a_cols) +
                                       ", op(B) " + std::to_string(b_rows) + "x" + std::to_string(b_cols) +
                                       ", D " + std::to_string(d.rows) + "x" + std::to_string(d.cols) +
                                       ": they do not make a matrix product");
  // C and D: "both matrices must have the same data type, number of rows, number of columns,
  // batch size, and memory order" (https://docs.nvidia.com/cuda/cublas/index.html#cublasltmatmul).
  if (c.type != d.type || c.rows != d.rows || c.cols != d.cols)
    return invalid_value(function, "C and D must have the same type, rows and columns");
  mm.m = static_cast<int64_t>(d.rows);
  mm.n = static_cast<int64_t>(d.cols);
  mm.k = static_cast<int64_t>(a_cols);
  return CUBLAS_STATUS_SUCCESS;
}

// The documented support, restricted to what the emulator models: CUBLAS_STATUS_NOT_SUPPORTED
// ("If the current implementation on the selected device doesn't support the configured
// operation.", https://docs.nvidia.com/cuda/cublas/index.html#cublasltmatmul) otherwise.
// Sets the bias type.
cublasStatus_t check_supported(const char* function, LtMatmul& mm) {
  const MatmulDesc& desc = mm.desc;
  const cudaDataType_t ab = mm.layout[kA].type, d = mm.layout[kD].type;
  for (int x = kA; x <= kD; ++x) {
    // "Describes the number of rows in the matrix. Normally only values that can be expressed
    // as int32_t are supported." (and columns)
    // (https://docs.nvidia.com/cuda/cublas/index.html#cublasltmatrixlayoutattribute-t); read strictly.
    const uint64_t int32_max = static_cast<uint64_t>(std::numeric_limits<int32_t>::max());
    if (mm.layout[x].rows > int32_max || mm.layout[x].cols > int32_max)
      return not_supported(function, std::string(kOperandName[x]) + " has more than INT32_MAX rows or columns");
  }
  if (desc.compute != CUBLAS_COMPUTE_32F && desc.compute != CUBLAS_COMPUTE_32F_FAST_TF32)
    return not_modelled(function, "compute type " + std::to_string(static_cast<int>(desc.compute)));
  for (int x = kA; x <= kD; ++x)
    if (!is_modelled_type(mm.layout[x].type))
      return not_modelled(function, std::string(kOperandName[x]) + " of type " + type_name(mm.layout[x].type));
  if (desc.epilogue != CUBLASLT_EPILOGUE_DEFAULT && desc.epilogue != CUBLASLT_EPILOGUE_BIAS &&
      desc.epilogue != CUBLASLT_EPILOGUE_BGRADB)
    return not_modelled(function, "epilogue " + std::to_string(static_cast<int>(desc.epilogue)));
  // "cublasLtMatmul() supports the following computeType, scaleType, Atype/Btype, and Ctype":
  //   CUBLAS_COMPUTE_32F, CUDA_R_32F:   CUDA_R_16BF/CUDA_R_16BF, CUDA_R_16BF/CUDA_R_32F,
  //                                     CUDA_R_32F/CUDA_R_32F (16F, 8I and complex rows aside)
  //   CUBLAS_COMPUTE_32F_FAST_TF32, CUDA_R_32F: CUDA_R_32F/CUDA_R_32F
  // (https://docs.nvidia.com/cuda/cublas/index.html#cublasltmatmul, "Datatypes Supported").
  // A and B share a column of the table (one type); C and D agree (checked with the shapes).
  if (desc.scale != CUDA_R_32F)
    return not_supported(function, "scale type " + type_name(desc.scale) + " with compute type " +
                                       std::to_string(static_cast<int>(desc.compute)));
  if (mm.layout[kB].type != ab)
    return not_supported(function, "A is " + type_name(ab) + ", B " + type_name(mm.layout[kB].type) +
                                       ": Atype and Btype must be the same");
  const bool listed = desc.compute == CUBLAS_COMPUTE_32F
                          ? (ab == CUDA_R_16BF && (d == CUDA_R_16BF || d == CUDA_R_32F)) ||
                                (ab == CUDA_R_32F && d == CUDA_R_32F)
                          : ab == CUDA_R_32F && d == CUDA_R_32F;
  if (!listed)
    return not_supported(function, "Atype/Btype " + type_name(ab) + " with Ctype " + type_name(d) +
                                       " and compute type " + std::to_string(static_cast<int>(desc.compute)));
  // "Bias vector elements are the same type as alpha and beta [...] when matrix D datatype is
  // CUDA_R_8I and same as matrix D datatype otherwise."
  // (https://docs.nvidia.com/cuda/cublas/index.html#cublasltmatmuldescattributes-t,
  // CUBLASLT_MATMUL_DESC_BIAS_POINTER); the datatypes table of cublasLtMatmul() lists the "Bias
  // Type" as D's type in every row modelled here (e.g. CUDA_R_16BF for a CUDA_R_16BF D). So an
  // fp32 bias with a bf16 D is refused, for BIAS and BGRADB alike.
  mm.bias_type = desc.bias_type == -1 ? d : static_cast<cudaDataType_t>(desc.bias_type);
  if (desc.epilogue != CUBLASLT_EPILOGUE_DEFAULT && mm.bias_type != d)
    return not_supported(function, "bias type " + type_name(mm.bias_type) + " with D of type " + type_name(d) +
                                       ": the bias must have D's type");
  return CUBLAS_STATUS_SUCCESS;
}

// The bias pointer's alignment. The documentation names no figure, only that the alignment
// matters: "Routines that don't dereference this pointer, like cublasLtMatmulAlgoGetHeuristic()
// depend on its value to determine expected pointer alignment."
// (/usr/local/cuda/include/cublasLt.h, CUBLASLT_MATMUL_DESC_BIAS_POINTER), and no preference
// covers it (the MIN_ALIGNMENT_* preferences are for A, B, C and D only). Read strictly: the only
// alignment the documentation states for fast vectorised access is 16 bytes ("intptr_t(A) % 16
// == 0", https://docs.nvidia.com/cuda/cublas/index.html#tensor-core-usage), so a bias vector
// aligned to less than 16 bytes is refused. (Real kernels do assume it: pytorch/pytorch#194497
// reports "misaligned address" faults with a bias slice on sm_75.)
constexpr uintptr_t kBiasAlignment = 16;

cublasStatus_t check_bias_alignment(const char* function, const MatmulDesc& desc) {
  if (desc.epilogue == CUBLASLT_EPILOGUE_DEFAULT) return CUBLAS_STATUS_SUCCESS;
  if (reinterpret_cast<uintptr_t>(desc.bias) % kBiasAlignment != 0)
    return not_supported(function, "the bias vector is " + std::to_string(alignment_of(desc.bias)) +
                                       "-byte aligned, not 16 (the strict reading)");
  return CUBLAS_STATUS_SUCCESS;
}

cublasStatus_t configure(const char* function, cublasLtMatmulDesc_t desc, cublasLtMatrixLayout_t a,
                         cublasLtMatrixLayout_t b, cublasLtMatrixLayout_t c, cublasLtMatrixLayout_t d,
                         LtMatmul* mm) {
  cublasStatus_t s = gather(function, desc, a, b, c, d, mm);
  if (s == CUBLAS_STATUS_SUCCESS) s = check_shapes(function, *mm);
  if (s == CUBLAS_STATUS_SUCCESS) s = check_supported(function, *mm);
  if (s == CUBLAS_STATUS_SUCCESS) s = check_bias_alignment(function, mm->desc);
  return s;
}

// ---- cuBLASLt: the emulated algorithm ----------------------------------------------------------

// What an algorithm from the heuristic records in cublasLtMatmulAlgo_t::data: the configuration it
// was chosen for and the alignments the preference promised for A, B, C, D.
struct AlgoConfig {
  int32_t compute, scale, trans_a, trans_b, epilogue, bias_type;
  int32_t type[4];
  bool operator==(const AlgoConfig&) const = default;
};
struct AlgoData {
  uint64_t magic;
  AlgoConfig config;
  uint32_t alignment[4];
};
static_assert(sizeof(AlgoData) <= sizeof(cublasLtMatmulAlgo_t));
constexpr uint64_t kAlgoMagic = 0x434e58454d55414cull;  // "CNXEMUAL"

AlgoConfig algo_config(const LtMatmul& mm) {
  AlgoConfig c{};
  c.compute = mm.desc.compute;
  c.scale = mm.desc.scale;
  c.trans_a = transposed(mm.desc.trans_a);
  c.trans_b = transposed(mm.desc.trans_b);
  c.epilogue = mm.desc.epilogue;
  c.bias_type = mm.bias_type;
  for (int x = kA; x <= kD; ++x) c.type[x] = mm.layout[x].type;
  return c;
}

// The heuristic's single result. "Selecting a smaller value will exclude algorithms that can not
// work with matrix A, which is not as strictly aligned as the algorithms need."
// (https://docs.nvidia.com/cuda/cublas/index.html#cublasltmatmulpreferenceattributes-t): no
// algorithm works on elements that are not aligned to their own size, so such a preference leaves
// none. Otherwise "there are no longer any restrictions on matrix dimensions and memory
// alignments" (https://docs.nvidia.com/cuda/cublas/index.html#tensor-core-usage), and the
// algorithm records the promised alignments, which cublasLtMatmul then holds the pointers to.
cublasStatus_t choose_algo(const char* function, const LtMatmul& mm, const Preference& pref,
                           cublasLtMatmulAlgo_t* algo) {
  AlgoData data{kAlgoMagic, algo_config(mm), {}};
  for (int x = kA; x <= kD; ++x) {
    const size_t element = element_size(mm.layout[x].type);
    if (pref.min_alignment[x] < element)
      return not_supported(function, std::string("CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_") + kOperandName[x] +
                                         "_BYTES = " + std::to_string(pref.min_alignment[x]) + " is below the " +
                                         std::to_string(element) + "-byte elements");
    data.alignment[x] = pref.min_alignment[x];
  }
  *algo = cublasLtMatmulAlgo_t{};
  std::memcpy(algo->data, &data, sizeof data);
  return CUBLAS_STATUS_SUCCESS;
}

// An algorithm is used for the configuration it was chosen for, with pointers at least as aligned
// as its preference promised: anything else is "in conflict" (CUBLAS_STATUS_INVALID_VALUE,
// https://docs.nvidia.com/cuda/cublas/index.html#cublasltmatmul). Read strictly: the real library
// might run an algorithm on a related configuration, or on pointers aligned to 16 bytes though
// 256 were promised; the emulation refuses both, so that a stale algorithm cache shows.
cublasStatus_t check_algo(const char* function, const LtMatmul& mm, const cublasLtMatmulAlgo_t& algo,
                          const void* const pointers[4]) {
  AlgoData data;
  std::memcpy(&data, algo.data, sizeof data);
  if (data.magic != kAlgoMagic)
    return invalid_value(function, "algo does not come from cublasLtMatmulAlgoGetHeuristic");
  if (!(data.config == algo_config(mm)))
    return invalid_value(function, "algo was chosen for another configuration (types, transposes, "
                                   "compute type or epilogue)");
  for (int x = kA; x <= kD; ++x)
    if (alignment_of(pointers[x]) < data.alignment[x])
      return invalid_value(function, std::string(kOperandName[x]) + " is " + std::to_string(alignment_of(pointers[x])) +
                                         "-byte aligned but the algorithm was chosen for "
                                         "CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_" + kOperandName[x] + "_BYTES = " +
                                         std::to_string(data.alignment[x]));
  return CUBLAS_STATUS_SUCCESS;
}

// "The workspace pointer must be aligned to at least a multiple of 256 bytes."
// (https://docs.nvidia.com/cuda/cublas/index.html#cublasltmatmul). The emulated algorithm needs
// no workspace, but the library may use all of it: it must be device memory.
cublasStatus_t check_workspace(const char* function, const void* workspace, size_t bytes) {
  if (bytes == 0) return CUBLAS_STATUS_SUCCESS;
  if (workspace == nullptr) return invalid_value(function, "workspace is NULL with a non-zero size");
  if (reinterpret_cast<uintptr_t>(workspace) % 256 != 0)
    return invalid_value(function, "the workspace pointer is not aligned to 256 bytes");
  if (!is_device_range(workspace, bytes))
    return invalid_value(function, "the workspace (" + std::to_string(bytes) + " bytes) is not device memory");
  return CUBLAS_STATUS_SUCCESS;
}

Matrix matrix(const void* data, const Layout& layout) {
  return Matrix{data, layout.type, static_cast<int64_t>(layout.rows), static_cast<int64_t>(layout.cols),
                layout.ld};
}

Gemm lt_gemm(const LtMatmul& mm, float alpha, const void* a, const void* b, float beta, const void* c, void* d) {
  Gemm g;
  g.trans_a = transposed(mm.desc.trans_a);
  g.trans_b = transposed(mm.desc.trans_b);
  g.m = mm.m;
  g.n = mm.n;
  g.k = mm.k;
  g.a = matrix(a, mm.layout[kA]);
  g.b = matrix(b, mm.layout[kB]);
  g.c = matrix(c, mm.layout[kC]);
  g.d = matrix(d, mm.layout[kD]);
  g.alpha = alpha;
  g.beta = beta;
  g.tf32 = mm.desc.compute == CUBLAS_COMPUTE_32F_FAST_TF32;
  g.epilogue = mm.desc.epilogue;
  // BIAS: "Input vector with length that matches the number of rows of matrix D"; BGRADB:
  // "Output vector with length that matches the number of columns of matrix D"
  // (https://docs.nvidia.com/cuda/cublas/index.html#cublasltmatmuldescattributes-t).
  const int64_t bias_length = g.epilogue == CUBLASLT_EPILOGUE_BIAS ? g.m : g.n;
  if (g.epilogue != CUBLASLT_EPILOGUE_DEFAULT) g.bias = Vector{mm.desc.bias, mm.bias_type, bias_length};
  return g;
}

// ---- classic cuBLAS --------------------------------------------------------------------------

// "CUBLAS_TF32_TENSOR_OP_MATH: Enable acceleration of single-precision routines using TF32 tensor
// cores. Note that input conversions round to nearest even."
// (https://docs.nvidia.com/cuda/cublas/index.html#cublasmath-t). A GEMM with fp32 A and B and
// CUBLAS_COMPUTE_32F is taken to be such a single-precision routine.
bool uses_tf32(const cublasContext& handle, cudaDataType_t ab, cublasComputeType_t compute) {
  if (compute == CUBLAS_COMPUTE_32F_FAST_TF32) return true;
  return compute == CUBLAS_COMPUTE_32F && ab == CUDA_R_32F &&
         (handle.math_mode & 0xF) == CUBLAS_TF32_TENSOR_OP_MATH;
}

// The argument checks of cublas<t>gemm and cublasGemmEx: "CUBLAS_STATUS_INVALID_VALUE: If m < 0
// or n < 0 or k < 0, or if transa and transb are not one of CUBLAS_OP_N, CUBLAS_OP_C,
// CUBLAS_OP_T, or if lda < max(1, m) when transa == CUBLAS_OP_N and lda < max(1, k) otherwise, or
// if ldb < max(1, k) when transb == CUBLAS_OP_N and ldb < max(1, n) otherwise, or if
// ldc < max(1, m), or if alpha or beta are NULL, or if C is NULL when beta is not zero"
// (https://docs.nvidia.com/cuda/cublas/index.html#cublas-t-gemm).
cublasStatus_t check_gemm_arguments(const char* function, cublasOperation_t transa, cublasOperation_t transb,
                                    int64_t m, int64_t n, int64_t k, const void* alpha, int64_t lda,
                                    int64_t ldb, const void* beta, int64_t ldc) {
  if (m < 0 || n < 0 || k < 0) return invalid_value(function, "m, n and k must be >= 0");
  if (!is_valid_op(transa) || !is_valid_op(transb))
    return invalid_value(function, "transa and transb must be CUBLAS_OP_N, _T or _C");
  const int64_t min_lda = std::max<int64_t>(1, transposed(transa) ? k : m);
  const int64_t min_ldb = std::max<int64_t>(1, transposed(transb) ? n : k);
  if (lda < min_lda) return invalid_value(function, "lda " + std::to_string(lda) + " < " + std::to_string(min_lda));
  if (ldb < min_ldb) return invalid_value(function, "ldb " + std::to_string(ldb) + " < " + std::to_string(min_ldb));
  if (ldc < std::max<int64_t>(1, m))
    return invalid_value(function, "ldc " + std::to_string(ldc) + " < max(1, m)");
  if (alpha == nullptr || beta == nullptr) return invalid_value(function, "alpha or beta is NULL");
  return CUBLAS_STATUS_SUCCESS;
}

// "cublasGemmEx() supports the following computeType, scaleType, Atype/Btype, and Ctype":
//   CUBLAS_COMPUTE_32F, CUDA_R_32F: CUDA_R_16BF/CUDA_R_16BF, CUDA_R_16BF/CUDA_R_32F,
//                                   CUDA_R_32F/CUDA_R_32F (and 16F, 8I, complex: not modelled)
//   CUBLAS_COMPUTE_32F_FAST_TF32, CUDA_R_32F: CUDA_R_32F/CUDA_R_32F
// "CUBLAS_STATUS_NOT_SUPPORTED: the combination of the parameters Atype, Btype and Ctype or the
// algorithm, algo is not supported" (https://docs.nvidia.com/cuda/cublas/index.html#cublasgemmex).
cublasStatus_t check_gemm_types(const char* function, cudaDataType_t at, cudaDataType_t bt, cudaDataType_t ct,
                                cublasComputeType_t compute) {
  if (compute != CUBLAS_COMPUTE_32F && compute != CUBLAS_COMPUTE_32F_FAST_TF32)
    return not_modelled(function, "compute type " + std::to_string(static_cast<int>(compute)));
  if (!is_modelled_type(at) || !is_modelled_type(bt) || !is_modelled_type(ct))
    return not_modelled(function, "Atype " + type_name(at) + ", Btype " + type_name(bt) + ", Ctype " + type_name(ct));
  const bool listed = at == bt && (compute == CUBLAS_COMPUTE_32F
                                       ? (at == CUDA_R_16BF && (ct == CUDA_R_16BF || ct == CUDA_R_32F)) ||
                                             (at == CUDA_R_32F && ct == CUDA_R_32F)
                                       : at == CUDA_R_32F && ct == CUDA_R_32F);
  if (!listed)
    return not_supported(function, "Atype " + type_name(at) + ", Btype " + type_name(bt) + ", Ctype " +
                                       type_name(ct) + " with compute type " +
                                       std::to_string(static_cast<int>(compute)));
  return CUBLAS_STATUS_SUCCESS;
}

// cublas<t>gemm and cublasGemmEx: C (m, n) = alpha * op(A) op(B) + beta * C on the handle's stream.
cublasStatus_t classic_gemm(const char* function, cublasHandle_t handle, cublasOperation_t transa,
                            cublasOperation_t transb, int64_t m, int64_t n, int64_t k, const void* alpha,
                            const void* a, cudaDataType_t at, int64_t lda, const void* b, cudaDataType_t bt,
                            int64_t ldb, const void* beta, void* c, cudaDataType_t ct, int64_t ldc,
                            cublasComputeType_t compute) {
  if (handle == nullptr) return CUBLAS_STATUS_NOT_INITIALIZED;
  cublasStatus_t s = check_gemm_arguments(function, transa, transb, m, n, k, alpha, lda, ldb, beta, ldc);
  if (s == CUBLAS_STATUS_SUCCESS) s = check_gemm_types(function, at, bt, ct, compute);
  if (s != CUBLAS_STATUS_SUCCESS) return s;
  // Scale type CUDA_R_32F in every modelled row: alpha and beta are host floats, read now.
  const float alpha_value = *static_cast<const float*>(alpha), beta_value = *static_cast<const float*>(beta);
  if (c == nullptr && beta_value != 0.0f) return invalid_value(function, "C is NULL and beta is not zero");
  Gemm g;
  g.trans_a = transposed(transa);
  g.trans_b = transposed(transb);
  g.m = m;
  g.n = n;
  g.k = k;
  g.a = Matrix{a, at, g.trans_a ? k : m, g.trans_a ? m : k, lda};
  g.b = Matrix{b, bt, g.trans_b ? n : k, g.trans_b ? k : n, ldb};
  g.c = g.d = Matrix{c, ct, m, n, ldc};
  g.alpha = alpha_value;
  g.beta = beta_value;
  g.tf32 = uses_tf32(*handle, at, compute);
  return launch_gemm(function, handle->stream, g);
}

const char* status_name(cublasStatus_t status) {
  switch (status) {
    case CUBLAS_STATUS_SUCCESS: return "CUBLAS_STATUS_SUCCESS";
    case CUBLAS_STATUS_NOT_INITIALIZED: return "CUBLAS_STATUS_NOT_INITIALIZED";
    case CUBLAS_STATUS_ALLOC_FAILED: return "CUBLAS_STATUS_ALLOC_FAILED";
    case CUBLAS_STATUS_INVALID_VALUE: return "CUBLAS_STATUS_INVALID_VALUE";
    case CUBLAS_STATUS_ARCH_MISMATCH: return "CUBLAS_STATUS_ARCH_MISMATCH";
    case CUBLAS_STATUS_MAPPING_ERROR: return "CUBLAS_STATUS_MAPPING_ERROR";
    case CUBLAS_STATUS_EXECUTION_FAILED: return "CUBLAS_STATUS_EXECUTION_FAILED";
    case CUBLAS_STATUS_INTERNAL_ERROR: return "CUBLAS_STATUS_INTERNAL_ERROR";
    case CUBLAS_STATUS_NOT_SUPPORTED: return "CUBLAS_STATUS_NOT_SUPPORTED";
    case CUBLAS_STATUS_LICENSE_ERROR: return "CUBLAS_STATUS_LICENSE_ERROR";
  }
  return "CUBLAS_STATUS_UNKNOWN";
}

const char* status_string(cublasStatus_t status) {
  switch (status) {
    case CUBLAS_STATUS_SUCCESS: return "success";
    case CUBLAS_STATUS_NOT_INITIALIZED: return "the library was not initialized";
    case CUBLAS_STATUS_ALLOC_FAILED: return "the resource allocation failed";
    case CUBLAS_STATUS_INVALID_VALUE: return "an invalid numeric value was used as an argument";
    case CUBLAS_STATUS_ARCH_MISMATCH: return "an absent device architectural feature is required";
    case CUBLAS_STATUS_MAPPING_ERROR: return "an access to GPU memory space failed";
    case CUBLAS_STATUS_EXECUTION_FAILED: return "the GPU program failed to execute";
    case CUBLAS_STATUS_INTERNAL_ERROR: return "an internal operation failed";
    case CUBLAS_STATUS_NOT_SUPPORTED: return "the requested functionality is not supported";
    case CUBLAS_STATUS_LICENSE_ERROR: return "error detected trying to check the license";
  }
  return "unknown error";
}

}  // namespace
}  // namespace cnx::emu

using namespace cnx::emu;

extern "C" {

// =============================================================================================
// cuBLAS
// =============================================================================================

const char* cublasGetStatusName(cublasStatus_t status) { return status_name(status); }
const char* cublasGetStatusString(cublasStatus_t status) { return status_string(status); }

cublasStatus_t cublasCreate_v2(cublasHandle_t* handle) {
  if (handle == nullptr) return invalid_value("cublasCreate", "handle is NULL");
  *handle = new cublasContext();
  return CUBLAS_STATUS_SUCCESS;
}

cublasStatus_t cublasDestroy_v2(cublasHandle_t handle) {
  if (handle == nullptr) return CUBLAS_STATUS_NOT_INITIALIZED;
  delete handle;
  return CUBLAS_STATUS_SUCCESS;
}

// The real call also "unconditionally resets the cuBLAS library workspace back to the default
// workspace pool" (https://docs.nvidia.com/cuda/cublas/index.html#cublassetstream); the emulated
// GEMMs use no workspace, so that is not observable here.
cublasStatus_t cublasSetStream_v2(cublasHandle_t handle, cudaStream_t stream) {
  if (handle == nullptr) return CUBLAS_STATUS_NOT_INITIALIZED;
  handle->stream = stream;
  return CUBLAS_STATUS_SUCCESS;
}

cublasStatus_t cublasGetStream_v2(cublasHandle_t handle, cudaStream_t* stream) {
  if (handle == nullptr) return CUBLAS_STATUS_NOT_INITIALIZED;
  if (stream == nullptr) return invalid_value("cublasGetStream", "streamId is NULL");
  *stream = handle->stream;
  return CUBLAS_STATUS_SUCCESS;
}

// "The workspace pointer has to be aligned to at least 256 bytes, otherwise
// CUBLAS_STATUS_INVALID_VALUE error is returned."
// (https://docs.nvidia.com/cuda/cublas/index.html#cublassetworkspace). The emulated GEMMs use no
// workspace, so the call only validates it; the library may use all of it: it must be device
// memory.
cublasStatus_t cublasSetWorkspace_v2(cublasHandle_t handle, void* workspace, size_t bytes) {
  if (handle == nullptr) return CUBLAS_STATUS_NOT_INITIALIZED;
  if (reinterpret_cast<uintptr_t>(workspace) % 256 != 0)
    return invalid_value("cublasSetWorkspace", "the workspace pointer is not aligned to 256 bytes");
  if (bytes > 0 && !is_device_range(workspace, bytes))
    return invalid_value("cublasSetWorkspace", "the workspace (" + std::to_string(bytes) +
                                                   " bytes) is not device memory");
  return CUBLAS_STATUS_SUCCESS;
}

cublasStatus_t cublasSetMathMode(cublasHandle_t handle, cublasMath_t mode) {
  if (handle == nullptr) return CUBLAS_STATUS_NOT_INITIALIZED;
  handle->math_mode = mode;
  return CUBLAS_STATUS_SUCCESS;
}

cublasStatus_t cublasSgemm_v2_64(cublasHandle_t handle, cublasOperation_t transa, cublasOperation_t transb,
                                 int64_t m, int64_t n, int64_t k, const float* alpha, const float* A,
                                 int64_t lda, const float* B, int64_t ldb, const float* beta, float* C,
                                 int64_t ldc) {
  return classic_gemm("cublasSgemm", handle, transa, transb, m, n, k, alpha, A, CUDA_R_32F, lda, B, CUDA_R_32F,
                      ldb, beta, C, CUDA_R_32F, ldc, CUBLAS_COMPUTE_32F);
}

cublasStatus_t cublasSgemm_v2(cublasHandle_t handle, cublasOperation_t transa, cublasOperation_t transb, int m,
                              int n, int k, const float* alpha, const float* A, int lda, const float* B, int ldb,
                              const float* beta, float* C, int ldc) {
  return cublasSgemm_v2_64(handle, transa, transb, m, n, k, alpha, A, lda, B, ldb, beta, C, ldc);
}

// CUBLAS_GEMM_DEFAULT only: the other algorithms (CUBLAS_GEMM_ALGO0.., the _TENSOR_OP ones) are
// not modelled.
cublasStatus_t cublasGemmEx_64(cublasHandle_t handle, cublasOperation_t transa, cublasOperation_t transb,
                               int64_t m, int64_t n, int64_t k, const void* alpha, const void* A,
                               cudaDataType Atype, int64_t lda, const void* B, cudaDataType Btype, int64_t ldb,
                               const void* beta, void* C, cudaDataType Ctype, int64_t ldc,
                               cublasComputeType_t computeType, cublasGemmAlgo_t algo) {
  if (handle != nullptr && algo != CUBLAS_GEMM_DEFAULT)
    return not_modelled("cublasGemmEx", "algo " + std::to_string(static_cast<int>(algo)));
  return classic_gemm("cublasGemmEx", handle, transa, transb, m, n, k, alpha, A, Atype, lda, B, Btype, ldb, beta,
                      C, Ctype, ldc, computeType);
}

cublasStatus_t cublasGemmEx(cublasHandle_t handle, cublasOperation_t transa, cublasOperation_t transb, int m,
                            int n, int k, const void* alpha, const void* A, cudaDataType Atype, int lda,
                            const void* B, cudaDataType Btype, int ldb, const void* beta, void* C,
                            cudaDataType Ctype, int ldc, cublasComputeType_t computeType, cublasGemmAlgo_t algo) {
  return cublasGemmEx_64(handle, transa, transb, m, n, k, alpha, A, Atype, lda, B, Btype, ldb, beta, C, Ctype,
                         ldc, computeType, algo);
}

// =============================================================================================
// cuBLASLt
// =============================================================================================

cublasStatus_t cublasLtCreate(cublasLtHandle_t* handle) {
  if (handle == nullptr) return invalid_value("cublasLtCreate", "lightHandle is NULL");
  *handle = new cublasLtContext();
  return CUBLAS_STATUS_SUCCESS;
}

cublasStatus_t cublasLtDestroy(cublasLtHandle_t handle) {
  if (handle == nullptr) return CUBLAS_STATUS_NOT_INITIALIZED;
  delete handle;
  return CUBLAS_STATUS_SUCCESS;
}

cublasStatus_t cublasLtMatmulDescCreate(cublasLtMatmulDesc_t* desc, cublasComputeType_t computeType,
                                        cudaDataType_t scaleType) {
  if (desc == nullptr) return invalid_value("cublasLtMatmulDescCreate", "matmulDesc is NULL");
  MatmulDesc state;
  state.compute = computeType;
  state.scale = scaleType;
  *desc = matmul_descs().create(state);
  return CUBLAS_STATUS_SUCCESS;
}

cublasStatus_t cublasLtMatmulDescDestroy(cublasLtMatmulDesc_t desc) {
  if (!matmul_descs().destroy(desc))
    return invalid_value("cublasLtMatmulDescDestroy", "not a live cublasLtMatmulDesc_t");
  return CUBLAS_STATUS_SUCCESS;
}

cublasStatus_t cublasLtMatmulDescSetAttribute(cublasLtMatmulDesc_t desc, cublasLtMatmulDescAttributes_t attr,
                                              const void* buf, size_t sizeInBytes) {
  cublasStatus_t status = CUBLAS_STATUS_SUCCESS;
  const bool live = matmul_descs().update(
      desc, [&](MatmulDesc& state) { status = set_matmul_attribute(state, attr, buf, sizeInBytes); });
  if (!live) return invalid_value("cublasLtMatmulDescSetAttribute", "not a live cublasLtMatmulDesc_t");
  return status;
}

cublasStatus_t cublasLtMatrixLayoutCreate(cublasLtMatrixLayout_t* layout, cudaDataType type, uint64_t rows,
                                          uint64_t cols, int64_t ld) {
  if (layout == nullptr) return invalid_value("cublasLtMatrixLayoutCreate", "matLayout is NULL");
  *layout = layouts().create(Layout{type, rows, cols, ld});
  return CUBLAS_STATUS_SUCCESS;
}

cublasStatus_t cublasLtMatrixLayoutDestroy(cublasLtMatrixLayout_t layout) {
  if (!layouts().destroy(layout))
    return invalid_value("cublasLtMatrixLayoutDestroy", "not a live cublasLtMatrixLayout_t");
  return CUBLAS_STATUS_SUCCESS;
}

cublasStatus_t cublasLtMatmulPreferenceCreate(cublasLtMatmulPreference_t* pref) {
  if (pref == nullptr) return invalid_value("cublasLtMatmulPreferenceCreate", "pref is NULL");
  *pref = preferences().create(Preference{});
  return CUBLAS_STATUS_SUCCESS;
}

cublasStatus_t cublasLtMatmulPreferenceDestroy(cublasLtMatmulPreference_t pref) {
  if (!preferences().destroy(pref))
    return invalid_value("cublasLtMatmulPreferenceDestroy", "not a live cublasLtMatmulPreference_t");
  return CUBLAS_STATUS_SUCCESS;
}

cublasStatus_t cublasLtMatmulPreferenceSetAttribute(cublasLtMatmulPreference_t pref,
                                                    cublasLtMatmulPreferenceAttributes_t attr, const void* buf,
                                                    size_t sizeInBytes) {
  cublasStatus_t status = CUBLAS_STATUS_SUCCESS;
  const bool live = preferences().update(
      pref, [&](Preference& state) { status = set_preference_attribute(state, attr, buf, sizeInBytes); });
  if (!live) return invalid_value("cublasLtMatmulPreferenceSetAttribute", "not a live cublasLtMatmulPreference_t");
  return status;
}

// "CUBLAS_STATUS_INVALID_VALUE if requestedAlgoCount is less or equal to zero;
// CUBLAS_STATUS_NOT_SUPPORTED if no heuristic function is available for current configuration"
// (https://docs.nvidia.com/cuda/cublas/index.html#cublasltmatmulalgogetheuristic). The library
// answers an unsupported configuration with NOT_SUPPORTED and no result, and so does the
// emulation; a supported one gets one algorithm, needing no workspace (so any
// CUBLASLT_MATMUL_PREF_MAX_WORKSPACE_BYTES admits it).
cublasStatus_t cublasLtMatmulAlgoGetHeuristic(cublasLtHandle_t handle, cublasLtMatmulDesc_t operationDesc,
                                              cublasLtMatrixLayout_t Adesc, cublasLtMatrixLayout_t Bdesc,
                                              cublasLtMatrixLayout_t Cdesc, cublasLtMatrixLayout_t Ddesc,
                                              cublasLtMatmulPreference_t preference, int requestedAlgoCount,
                                              cublasLtMatmulHeuristicResult_t heuristicResultsArray[],
                                              int* returnAlgoCount) {
  const char* f = "cublasLtMatmulAlgoGetHeuristic";
  if (handle == nullptr) return CUBLAS_STATUS_NOT_INITIALIZED;
  if (requestedAlgoCount <= 0) return invalid_value(f, "requestedAlgoCount <= 0");
  if (heuristicResultsArray == nullptr || returnAlgoCount == nullptr)
    return invalid_value(f, "heuristicResultsArray or returnAlgoCount is NULL");
  *returnAlgoCount = 0;
  const std::optional<Preference> pref = preferences().find(preference);
  if (!pref) return invalid_value(f, "the preference is not a live cublasLtMatmulPreference_t");
  LtMatmul mm;
  cublasStatus_t s = configure(f, operationDesc, Adesc, Bdesc, Cdesc, Ddesc, &mm);
  cublasLtMatmulHeuristicResult_t result{};
  if (s == CUBLAS_STATUS_SUCCESS) s = choose_algo(f, mm, *pref, &result.algo);
  if (s != CUBLAS_STATUS_SUCCESS) return s;
  result.workspaceSize = 0;
  result.state = CUBLAS_STATUS_SUCCESS;
  result.wavesCount = 1.0f;
  heuristicResultsArray[0] = result;
  *returnAlgoCount = 1;
  return CUBLAS_STATUS_SUCCESS;
}

// algo == NULL: "an implicit heuristics query with default search preferences will be performed"
// (https://docs.nvidia.com/cuda/cublas/index.html#cublasltmatmul); the emulation then holds the
// pointers to nothing more than their element alignment.
cublasStatus_t cublasLtMatmul(cublasLtHandle_t handle, cublasLtMatmulDesc_t computeDesc, const void* alpha,
                              const void* A, cublasLtMatrixLayout_t Adesc, const void* B,
                              cublasLtMatrixLayout_t Bdesc, const void* beta, const void* C,
                              cublasLtMatrixLayout_t Cdesc, void* D, cublasLtMatrixLayout_t Ddesc,
                              const cublasLtMatmulAlgo_t* algo, void* workspace, size_t workspaceSizeInBytes,
                              cudaStream_t stream) {
  const char* f = "cublasLtMatmul";
  if (handle == nullptr) return CUBLAS_STATUS_NOT_INITIALIZED;
  if (alpha == nullptr || beta == nullptr) return invalid_value(f, "alpha or beta is NULL");
  LtMatmul mm;
  cublasStatus_t s = configure(f, computeDesc, Adesc, Bdesc, Cdesc, Ddesc, &mm);
  if (s != CUBLAS_STATUS_SUCCESS) return s;
  if (mm.desc.epilogue != CUBLASLT_EPILOGUE_DEFAULT && mm.desc.bias == nullptr)
    return invalid_value(f, "the epilogue needs CUBLASLT_MATMUL_DESC_BIAS_POINTER, which is NULL");
  const void* const pointers[4] = {A, B, C, D};
  if (algo != nullptr && (s = check_algo(f, mm, *algo, pointers)) != CUBLAS_STATUS_SUCCESS) return s;
  if ((s = check_workspace(f, workspace, workspaceSizeInBytes)) != CUBLAS_STATUS_SUCCESS) return s;
  // Scale type CUDA_R_32F (checked): alpha and beta are host floats, read now.
  const Gemm g = lt_gemm(mm, *static_cast<const float*>(alpha), A, B, *static_cast<const float*>(beta), C, D);
  return launch_gemm(f, stream, g);
}

}  // extern "C"
