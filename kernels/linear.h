// Linear layer over the last dimension (ConvNeXt's pointwise 1x1 convs and the head):
//
//   out[m, n] = bias[n] + sum_k in[m, k] * weight[n, k]          out = in W^T + b
//   din = dout W,   dweight = dout^T in,   dbias = sum_m dout[m, :]
//
// Layouts: in (M, K), weight (N, K) (the official layout of nn.Linear), bias (N), out (M, N).
// cnx::cpu is the plain reference (loops), f32, f64 and bf16; cnx::blas (below) is the fast CPU
// path for f32 and bf16 through OpenBLAS when the build found it; cnx::cuda (at the end) runs the
// products on the GPU with cuBLASLt, f32 and bf16.
//
// Mixed precision (T = bf16), as PyTorch's autocast does it with fp32 master weights: in, out,
// dout and din are bf16; the GEMM's weight operand is bf16 too, a copy of the fp32 parameter
// rounded once by the caller (autograd's linear makes it in forward and keeps it for backward);
// the bias is passed as the fp32 parameter, and the forward uses it rounded to bf16 (as
// autocast's F.linear casts weight and bias to bf16; on the GPU this is the bias type cuBLASLt's
// epilogue takes with a bf16 output, see the CUDA section below); dweight, dbias are fp32
// (param_t<bf16> = float, tensor/dtype.h). Every product accumulates in fp32;
// out = bf16(in W^T + bf16(b)) (the rounded bias added in fp32, the sum rounded once) and
// din = bf16(dout W) are rounded once, dweight = dout^T in and dbias = sum_m dout are not
// rounded at all. For T = float or double every pointer is T, as before.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include "kernels/stream.h"
#include "tensor/dtype.h"

namespace cnx::cpu {

// bias may be null.
template <class T>
void linear_forward(T* out, const T* in, const T* weight, const param_t<T>* bias, int64_t M,
                    int64_t K, int64_t N);

// Writes each gradient whose pointer is non-null: din (M, K), dweight (N, K), dbias (N).
template <class T>
void linear_backward(T* din, param_t<T>* dweight, param_t<T>* dbias, const T* dout, const T* in,
                     const T* weight, int64_t M, int64_t K, int64_t N);

}  // namespace cnx::cpu

// =============================================================================================
// Fast CPU path: f32 through OpenBLAS (kernels/cpu/linear_blas.cpp)
// =============================================================================================
// The same three products as cpu:: above, through cblas_sgemm, with the same semantics (outputs
// overwritten, a null gradient pointer skips that gradient, any of M, K, N may be 0). Results
// differ from the loops only by f32 rounding (another summation order) and are bitwise the same
// run to run and for any number of OpenMP threads: OpenBLAS runs single-threaded, and the output
// is cut into tiles whose boundaries depend only on M, K, N, one sgemm over the whole reduction
// per tile. autograd's linear takes this path for f32 CPU tensors when enabled() is true; f64
// always takes the loops. Built only when CMake found OpenBLAS (it then defines CNX_HAVE_BLAS);
// otherwise available() is false and these functions run the loops.
namespace cnx::blas {

// True when the build links OpenBLAS.
bool available();

// "OpenBLAS 0.3.21 ... (SapphireRapids)", or a sentence saying the build has no BLAS.
std::string describe();

// Forces the reference loops for f32 too: starts as the environment variable CNX_CPU_REFERENCE
// (set and neither empty nor "0"; read once, at the first use), then whatever
// set_cpu_reference last said. Thread-safe; meant to be flipped between ops, not during one.
bool cpu_reference();
void set_cpu_reference(bool on);

// available() && !cpu_reference(): whether autograd's f32 linear goes through the BLAS.
bool enabled();

// set_cpu_reference(on) for one scope, then back to what it was (tests, benchmarks).
class ScopedCpuReference {
 public:
  explicit ScopedCpuReference(bool on = true) : saved_(cpu_reference()) { set_cpu_reference(on); }
  ~ScopedCpuReference() { set_cpu_reference(saved_); }
  ScopedCpuReference(const ScopedCpuReference&) = delete;
  ScopedCpuReference& operator=(const ScopedCpuReference&) = delete;

 private:
  bool saved_;
};

// out (M, N) = in (M, K) weight^T (K, N) + bias (N); bias may be null.
void linear_forward(float* out, const float* in, const float* weight, const float* bias,
                    int64_t M, int64_t K, int64_t N);

// din (M, K) = dout (M, N) weight (N, K); dweight (N, K) = dout^T in (M, K);
// dbias (N) = column sums of dout. Each written only when its pointer is non-null.
void linear_backward(float* din, float* dweight, float* dbias, const float* dout,
                     const float* in, const float* weight, int64_t M, int64_t K, int64_t N);

// bf16 (mixed precision, see the top of this file): the f32 products above on the widened bf16
// operands, out and din rounded once to bf16, dweight and dbias left in fp32. The same results
// as cpu::linear_forward<bf16> / linear_backward<bf16> up to f32 summation order.
void linear_forward(bf16* out, const bf16* in, const bf16* weight, const float* bias, int64_t M,
                    int64_t K, int64_t N);
void linear_backward(bf16* din, float* dweight, float* dbias, const bf16* dout, const bf16* in,
                     const bf16* weight, int64_t M, int64_t K, int64_t N);

}  // namespace cnx::blas

// =============================================================================================
// CUDA: cuBLASLt, fp32 and bf16 (kernels/cuda/linear.cu)
// =============================================================================================
// The same products and semantics as cpu:: above (outputs overwritten, a null gradient pointer
// skips that gradient, any of M, K, N may be 0), enqueued on `stream` of the current device.
// Row-major (M, K) memory is a column-major (K, M) matrix, so each product is one column-major
// GEMM on the same buffers, no transposes copied:
//   forward   out^T (N, M) = W (N, K) . in^T (K, M)     + bias per row: the BIAS epilogue
//   din       din^T (K, M) = W^T (K, N) . dout^T (N, M)
//   dweight   dW^T (K, N)  = in^T (K, M) . dout (M, N)  + dbias = sum over M of dout: the BGRADB
//             epilogue when cuBLASLt offers it for the call, else a two-pass column sum in fixed
//             order (deterministic, no atomics)
// fp32 inputs and outputs with CUBLAS_COMPUTE_32F (no TF32 unless cnx::cuda::allow_tf32(),
// tensor/cuda_context.h). cuBLAS's algorithm for a shape is chosen once per process and then
// cached, so results are bitwise the same run to run on the same GPU and library. Where cuBLASLt
// offers no algorithm with an epilogue (or at all, for odd alignments), the product falls back
// to a plain GEMM (cublasSgemm / cublasGemmEx as the last resort) plus a small kernel for the
// bias. The library's 32 MiB cuBLAS workspace of the current device is used (no workspace
// argument): `stream` must be that device's library stream (cnx::cuda::current_stream()). f32
// allocates no device memory.
//
// The epilogues' bias vector has D's type (cuBLASLt's rule for these type combinations), must be
// 16-byte aligned (checked here before cuBLASLt is asked: an unaligned bias, e.g. a view at an
// odd float offset, takes the plain GEMM and the bias pass).
//
// bf16 (T = bf16): A and B are CUDA_R_16BF, the compute type CUBLAS_COMPUTE_32F (fp32
// accumulation; TF32 does not apply), and
//   forward   D = out, CUDA_R_16BF; the fp32 bias is first cast to a bf16 copy (N elements, in
//             scratch from the caching allocator, so always aligned), which the BIAS epilogue
//             adds in fp32 before the one rounding: out = bf16(acc + bf16(b)). Where cuBLASLt
//             offers no algorithm with the epilogue, the product goes to an fp32 scratch buffer
//             (M x N floats) and a small kernel adds the bf16 bias and rounds once: the same
//             result, slower.
//   din       D = din, CUDA_R_16BF
//   dweight   D = dweight, CUDA_R_32F (bf16 A, B with an fp32 D: written unrounded), with
//             BGRADB writing the fp32 dbias, else our column sum of the bf16 dout in fp32.
//
// Which path each distinct GEMM took is recorded (gemm_paths() at the end of this file).
namespace cnx::cuda {

// out (M, N), in (M, K), weight (N, K), bias (N) or null.
void linear_forward(float* out, const float* in, const float* weight, const float* bias, int64_t M,
                    int64_t K, int64_t N, cudaStream_t stream);

// din (M, K), dweight (N, K), dbias (N), each written when non-null; dout (M, N); in (M, K) is
// needed for dweight, weight (N, K) for din.
void linear_backward(float* din, float* dweight, float* dbias, const float* dout, const float* in,
                     const float* weight, int64_t M, int64_t K, int64_t N, cudaStream_t stream);

// bf16 (overloads rather than templates, so that the f32 calls above may pass a bare nullptr for
// an unused operand): the same shapes, bf16 activations, fp32 bias, dweight and dbias.
void linear_forward(bf16* out, const bf16* in, const bf16* weight, const float* bias, int64_t M,
                    int64_t K, int64_t N, cudaStream_t stream);
void linear_backward(bf16* din, float* dweight, float* dbias, const bf16* dout, const bf16* in,
                     const bf16* weight, int64_t M, int64_t K, int64_t N, cudaStream_t stream);

// ---- which path each GEMM takes ---------------------------------------------------------------
// A fallback is correct but slow (an extra pass over the output, or an fp32 copy of it), so the
// launchers above record, once per distinct GEMM, which path it took; the trainer prints the list
// after its first step. With the environment variable CNX_LOG_GEMM=1 each new record is also
// printed to stderr as it happens. The records live in kernels/cpu/linear_paths.cpp, compiled
// in every build: in a build without CUDA the list is simply empty.
//
// Paths (`path` below):
//   "cuBLASLt+BIAS epilogue"           forward, the bias added by the GEMM (the fast path)
//   "cuBLASLt+BGRADB epilogue"         dweight, dbias written by the GEMM (the fast path)
//   "cuBLASLt"                         a GEMM with nothing else to do (no bias, din, dweight
//                                      without dbias)
//   "cuBLASLt, then bias pass"         forward, fp32: the epilogue refused (or switched off,
//                                      CNX_LINEAR_BIAS=0), out += bias after
//   "cuBLASLt to fp32 scratch, then bias pass"
//                                      forward, bf16: the epilogue refused (or switched off);
//                                      an fp32 (M, N) copy
//   "cuBLASLt, then column sums"       dweight: BGRADB refused (or CNX_LINEAR_BGRADB=0), dbias
//                                      by column_sums
// and each of them with "cuBLAS fallback" in place of "cuBLASLt" where cuBLASLt offered no
// algorithm at all and classic cuBLAS (cublasSgemm / cublasGemmEx) ran the product.
enum class GemmPass { forward, dinput, dweight };
const char* gemm_pass_name(GemmPass pass);  // "forward", "dinput", "dweight"

struct GemmPathRecord {
  GemmPass pass = GemmPass::forward;
  int64_t M = 0, K = 0, N = 0;  // the layer's sizes: in (M, K), weight (N, K), out (M, N)
  DType dtype = DType::f32;     // the activations' dtype (f32 or bf16)
  std::string path;             // one of the paths above
  std::string why;              // for a path other than the fast one: why (the first time seen)
};

// Records `r` unless a record with the same pass, sizes, dtype and path exists (`why` is not
// part of the key); prints it to stderr when new and CNX_LOG_GEMM=1. Returns true when new.
// Thread-safe. Called by the launchers; public for the tests.
bool note_gemm_path(const GemmPathRecord& r);
// Every record so far, in the order they were first seen. Thread-safe.
std::vector<GemmPathRecord> gemm_paths();
// Forgets every record (tests, or a trainer that wants the paths of a later step).
void clear_gemm_paths();
// One line per record, e.g.
//   "  forward  M=25088 K=96 N=384 bf16: cuBLASLt+BIAS epilogue\n"
// with " (why)" after a fallback's path; "" for no records.
std::string format_gemm_paths(const std::vector<GemmPathRecord>& records);
inline std::string format_gemm_paths() { return format_gemm_paths(gemm_paths()); }

// Whether the launchers may use cuBLASLt: true unless the environment variable
// CNX_LINEAR_CUBLASLT=0 (read once), then whatever set_cublaslt_enabled last said. false sends
// every GEMM to the classic-cuBLAS fallback and every bias to its separate pass: the fallback
// paths on demand, for the tests and for comparing the two libraries. Thread-safe; meant to be
// flipped between calls, not during one.
bool cublaslt_enabled();
void set_cublaslt_enabled(bool on);

}  // namespace cnx::cuda
