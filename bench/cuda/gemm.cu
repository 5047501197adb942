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
// Counters: TFLOP/s of the 2 M N K multiply-adds, GB/s of the bytes that must move (each
// operand read once, each result written once) and of_copy_bw (bench_common.h).
//
//   ./build/bench/bench_cuda_kernels --benchmark_filter=BM_gemm --benchmark_format=json
#include <cublas_v2.h>
#include <cuda_runtime.h>

#include <cstdint>
#include <string>

#include "bench/cuda/bench_common.h"
#include "kernels/linear.h"
#include "tensor/cuda_context.h"

namespace cnx::bench {
namespace {

enum class Layer { pw1, pw2 };
enum class Product { fwd, dgrad, wgrad };
enum class Impl { cnx, cublas };

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
  DeviceBuffer w = floats(N * K);
  DeviceBuffer x, dout, out, din, dw, bias, dbias;
  if (product != Product::dgrad) x = floats(M * K);
  if (product != Product::fwd) dout = floats(M * N);
  if (product == Product::fwd) {
    out = floats(M * N, false);
    bias = floats(N);
  }
  if (product == Product::dgrad) din = floats(M * K, false);
  if (product == Product::wgrad) {
    dw = floats(N * K, false);
    dbias = floats(N, false);
  }

  const cudaStream_t stream = cuda::current_stream();
  const cublasHandle_t handle = impl == Impl::cublas ? cuda::cublas_handle() : nullptr;  // on `stream`
  const float one = 1.0f, zero = 0.0f;
  const int m = static_cast<int>(M), k = static_cast<int>(K), n = static_cast<int>(N);
  auto launch = [&] {
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

  const double f = 4.0, Md = static_cast<double>(M), Kd = static_cast<double>(K), Nd = static_cast<double>(N);
  double bytes = 0;
  switch (product) {
    case Product::fwd: bytes = f * (Md * Kd + Nd * Kd + Nd + Md * Nd); break;    // in, W, b; out
    case Product::dgrad: bytes = f * (Md * Nd + Nd * Kd + Md * Kd); break;       // dout, W; din
    case Product::wgrad: bytes = f * (Md * Nd + Md * Kd + Nd * Kd + Nd); break;  // dout, in; dW, db
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

}  // namespace
}  // namespace cnx::bench
