// Benchmarks of the pointwise GEMMs of ConvNeXt-T (kernels/cuda/linear.cu, cuBLASLt), part of
// bench_cuda_kernels.
//
// Each block of a stage has two pointwise layers on M = N*H*W rows (batch 128, 224x224):
//   pw1  C -> 4C   (K = C,  N = 4C)
//   pw2  4C -> C   (K = 4C, N = C)
// and each layer three products:
//   fwd    out (M, N) = in (M, K) W^T + bias              cnx::cuda::linear_forward
//   dgrad  din (M, K) = dout (M, N) W                     cnx::cuda::linear_backward (din only)
//   wgrad  dW (N, K) = dout^T in, dbias = sum_m dout      cnx::cuda::linear_backward (dW, dbias)
// Rows BM_gemm_<layer>_<product>_cnx run our launchers; rows BM_gemm_<layer>_<product>_cublas
// run the same product as one plain cublasSgemm on the same buffers (no bias, no bias gradient:
// the baseline is the bare GEMM, so the _cnx rows also show what the epilogue costs or saves).
// Both fp32 with fp32 accumulation, no TF32 (unless CNX_ALLOW_TF32=1, which both honour).
// Rows ..._cnx_bf16 and ..._cublas_bf16 are the mixed-precision forms (kernels/linear.h): bf16
// activations and weight copy, fp32 bias, dweight and dbias; our launchers against one plain
// cublasGemmEx (A, B CUDA_R_16BF, CUBLAS_COMPUTE_32F; C CUDA_R_16BF, or CUDA_R_32F for wgrad,
// as ours), again without bias or bias gradient.
// Counters: TFLOP/s of the 2 M N K multiply-adds, GB/s of the bytes that must move (each
// operand read once, each result written once, at its own element size) and of_copy_bw
// (bench_common.h).
//
//   ./build/bench/bench_cuda_kernels --benchmark_filter=BM_gemm --benchmark_format=json
#include <cublas_v2.h>
#include <cuda_runtime.h>

#include <cstdint>
#include <string>

#include "bench/cuda/bench_common.h"
#include "kernels/cast.h"
#include "kernels/linear.h"
#include "tensor/cuda_context.h"

namespace cnx::bench {
namespace {

enum class Layer { pw1, pw2 };
enum class Product { fwd, dgrad, wgrad };
enum class Impl { cnx, cublas, cnx_bf16, cublas_bf16 };

bool is_bf16(Impl impl) { return impl == Impl::cnx_bf16 || impl == Impl::cublas_bf16; }

// n bf16 values: uniform [-1, 1) floats rounded to bf16 (random), or zeros.
DeviceBuffer bf16s(int64_t n, bool random = true) {
  DeviceBuffer b(n * 2, false);
  if (random) {
    const DeviceBuffer f = floats(n);
    cuda::cast(b.as<bf16>(), f.as(), n, nullptr);  // legacy stream, synchronised below
    CNX_CUDA_CHECK(cudaDeviceSynchronize());
  }
  return b;
}

struct GemmShape {
  int64_t M, K, N;
};

GemmShape gemm_shape(Layer layer, int stage) {
  const StageShape& s = kStages[stage];
  const int64_t M = s.pixels(), C = s.C;
  return layer == Layer::pw1 ? GemmShape{M, C, 4 * C} : GemmShape{M, 4 * C, C};
}

void run_gemm(benchmark::State& state, Layer layer, Product product, Impl impl) {
  const int stage = static_cast<int>(state.range(0));
  const GemmShape g = gemm_shape(layer, stage);
  const int64_t M = g.M, K = g.K, N = g.N;
  state.SetLabel(kStages[stage].label() + " M=" + std::to_string(M) + " K=" + std::to_string(K) +
                 " N=" + std::to_string(N));

  // Only the buffers this product touches (stage 0's activations are 150-600 MB each).
  // Activations and the weight operand in the impl's element type; bias, dw, dbias fp32.
  const bool half = is_bf16(impl);
  auto acts = [half](int64_t n, bool random = true) { return half ? bf16s(n, random) : floats(n, random); };
  DeviceBuffer w = acts(N * K);
  DeviceBuffer x, dout, out, din, dw, bias, dbias;
  if (product != Product::dgrad) x = acts(M * K);
  if (product != Product::fwd) dout = acts(M * N);
  if (product == Product::fwd) {
    out = acts(M * N, false);
    bias = floats(N);
  }
  if (product == Product::dgrad) din = acts(M * K, false);
  if (product == Product::wgrad) {
    dw = floats(N * K, false);
    dbias = floats(N, false);
  }

  const cudaStream_t stream = cuda::current_stream();
  const bool baseline = impl == Impl::cublas || impl == Impl::cublas_bf16;
  const cublasHandle_t handle = baseline ? cuda::cublas_handle() : nullptr;  // on `stream`
  const float one = 1.0f, zero = 0.0f;
  const int m = static_cast<int>(M), k = static_cast<int>(K), n = static_cast<int>(N);
  // bf16: the same three products as the f32 ones below (same shapes and transposes).
  auto launch_bf16 = [&] {
    constexpr cudaDataType_t B16 = CUDA_R_16BF;
    switch (product) {
      case Product::fwd:
        if (impl == Impl::cnx_bf16) {
          cuda::linear_forward(out.as<bf16>(), x.as<bf16>(), w.as<bf16>(), bias.as(), M, K, N, stream);
        } else {
          CNX_CUBLAS_CHECK(cublasGemmEx(handle, CUBLAS_OP_T, CUBLAS_OP_N, n, m, k, &one, w.as<bf16>(), B16,
                                        k, x.as<bf16>(), B16, k, &zero, out.as<bf16>(), B16, n,
                                        CUBLAS_COMPUTE_32F, CUBLAS_GEMM_DEFAULT));
        }
        break;
      case Product::dgrad:
        if (impl == Impl::cnx_bf16) {
          cuda::linear_backward(din.as<bf16>(), nullptr, nullptr, dout.as<bf16>(), nullptr, w.as<bf16>(),
                                M, K, N, stream);
        } else {
          CNX_CUBLAS_CHECK(cublasGemmEx(handle, CUBLAS_OP_N, CUBLAS_OP_N, k, m, n, &one, w.as<bf16>(), B16,
                                        k, dout.as<bf16>(), B16, n, &zero, din.as<bf16>(), B16, k,
                                        CUBLAS_COMPUTE_32F, CUBLAS_GEMM_DEFAULT));
        }
        break;
      case Product::wgrad:
        if (impl == Impl::cnx_bf16) {
          cuda::linear_backward(static_cast<bf16*>(nullptr), dw.as(), dbias.as(), dout.as<bf16>(),
                                x.as<bf16>(), nullptr, M, K, N, stream);
        } else {
          CNX_CUBLAS_CHECK(cublasGemmEx(handle, CUBLAS_OP_N, CUBLAS_OP_T, k, n, m, &one, x.as<bf16>(), B16,
                                        k, dout.as<bf16>(), B16, n, &zero, dw.as(), CUDA_R_32F, k,
                                        CUBLAS_COMPUTE_32F, CUBLAS_GEMM_DEFAULT));
        }
        break;
    }
    CNX_CUDA_LAUNCH_CHECK();
  };
  auto launch = [&] {
    if (half) return launch_bf16();
    switch (product) {
      case Product::fwd:
        if (impl == Impl::cnx) {
          cuda::linear_forward(out.as(), x.as(), w.as(), bias.as(), M, K, N, stream);
        } else {  // out^T (N, M) = W (N, K) . in^T (K, M), column-major
          CNX_CUBLAS_CHECK(cublasSgemm(handle, CUBLAS_OP_T, CUBLAS_OP_N, n, m, k, &one, w.as(), k,
                                       x.as(), k, &zero, out.as(), n));
        }
        break;
      case Product::dgrad:
        if (impl == Impl::cnx) {
          cuda::linear_backward(din.as(), nullptr, nullptr, dout.as(), nullptr, w.as(), M, K, N, stream);
        } else {  // din^T (K, M) = W^T (K, N) . dout^T (N, M)
          CNX_CUBLAS_CHECK(cublasSgemm(handle, CUBLAS_OP_N, CUBLAS_OP_N, k, m, n, &one, w.as(), k,
                                       dout.as(), n, &zero, din.as(), k));
        }
        break;
      case Product::wgrad:
        if (impl == Impl::cnx) {
          cuda::linear_backward(nullptr, dw.as(), dbias.as(), dout.as(), x.as(), nullptr, M, K, N, stream);
        } else {  // dW^T (K, N) = in^T (K, M) . dout (M, N)
          CNX_CUBLAS_CHECK(cublasSgemm(handle, CUBLAS_OP_N, CUBLAS_OP_T, k, n, m, &one, x.as(), k,
                                       dout.as(), n, &zero, dw.as(), k));
        }
        break;
    }
    CNX_CUDA_LAUNCH_CHECK();
  };
  const double seconds = time_iterations(state, stream, launch);

  // a: bytes of an activation or weight-operand element; p: of a parameter (gradient) element.
  const double a = half ? 2.0 : 4.0, p = 4.0;
  const double Md = static_cast<double>(M), Kd = static_cast<double>(K), Nd = static_cast<double>(N);
  double bytes = 0;
  switch (product) {
    case Product::fwd: bytes = a * (Md * Kd + Nd * Kd + Md * Nd) + p * Nd; break;  // in, W; out; b
    case Product::dgrad: bytes = a * (Md * Nd + Nd * Kd + Md * Kd); break;         // dout, W; din
    case Product::wgrad: bytes = a * (Md * Nd + Md * Kd) + p * (Nd * Kd + Nd); break;  // dout, in; dW, db
  }
  report_flops(state, 2.0 * Md * Nd * Kd, seconds);
  report_bytes(state, bytes, seconds);
}

#define CNX_GEMM_BENCH(layer, product, impl)                                         \
  void BM_gemm_##layer##_##product##_##impl(benchmark::State& state) {               \
    run_gemm(state, Layer::layer, Product::product, Impl::impl);                     \
  }                                                                                  \
  CNX_CUDA_BENCH_STAGES(BM_gemm_##layer##_##product##_##impl);

CNX_GEMM_BENCH(pw1, fwd, cnx)
CNX_GEMM_BENCH(pw1, fwd, cublas)
CNX_GEMM_BENCH(pw1, dgrad, cnx)
CNX_GEMM_BENCH(pw1, dgrad, cublas)
CNX_GEMM_BENCH(pw1, wgrad, cnx)
CNX_GEMM_BENCH(pw1, wgrad, cublas)
CNX_GEMM_BENCH(pw2, fwd, cnx)
CNX_GEMM_BENCH(pw2, fwd, cublas)
CNX_GEMM_BENCH(pw2, dgrad, cnx)
CNX_GEMM_BENCH(pw2, dgrad, cublas)
CNX_GEMM_BENCH(pw2, wgrad, cnx)
CNX_GEMM_BENCH(pw2, wgrad, cublas)
CNX_GEMM_BENCH(pw1, fwd, cnx_bf16)
CNX_GEMM_BENCH(pw1, fwd, cublas_bf16)
CNX_GEMM_BENCH(pw1, dgrad, cnx_bf16)
CNX_GEMM_BENCH(pw1, dgrad, cublas_bf16)
CNX_GEMM_BENCH(pw1, wgrad, cnx_bf16)
CNX_GEMM_BENCH(pw1, wgrad, cublas_bf16)
CNX_GEMM_BENCH(pw2, fwd, cnx_bf16)
CNX_GEMM_BENCH(pw2, fwd, cublas_bf16)
CNX_GEMM_BENCH(pw2, dgrad, cnx_bf16)
CNX_GEMM_BENCH(pw2, dgrad, cublas_bf16)
CNX_GEMM_BENCH(pw2, wgrad, cnx_bf16)
CNX_GEMM_BENCH(pw2, wgrad, cublas_bf16)

}  // namespace
}  // namespace cnx::bench
