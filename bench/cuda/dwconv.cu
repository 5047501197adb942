// Benchmarks of the depthwise 7x7 convolution (kernels/cuda/dwconv.cu) beside cuDNN's, part
// of bench_cuda_kernels.
//
// One row per direction, implementation and ConvNeXt-T stage at batch 128, 224x224 (kStages;
// Arg = stage index, label = HxWxC), k = 7, fp32 unless the name says bf16:
//
//   BM_dwconv7x7_fwd/ours/<stage>                  out = dwconv(in, weight) + bias
//   BM_dwconv7x7_fwd/ours_bf16/<stage>             the same with bf16 in and out (mixed
//                                                  precision: fp32 weight and bias)
//   BM_dwconv7x7_fwd/cudnn/<stage>                 cudnnConvolutionForward (no bias: adding it
//                                                  would take cuDNN a second pass, so the
//                                                  baseline is given that advantage)
//   BM_dwconv7x7_grad_input/ours/<stage>           din (dwconv_backward with only din)
//   BM_dwconv7x7_grad_input/ours_bf16/<stage>      the same with bf16 dout and din
//   BM_dwconv7x7_grad_input/cudnn/<stage>          cudnnConvolutionBackwardData
//   BM_dwconv7x7_grad_weight/ours/<stage>          dweight and dbias, one pass over dout and in
//   BM_dwconv7x7_grad_weight/ours_bf16/<stage>     the same from bf16 dout and in (fp32 dweight,
//                                                  dbias and partial sums)
//   BM_dwconv7x7_grad_weight/cudnn/<stage>         cudnnConvolutionBackwardFilter +
//                                                  cudnnConvolutionBackwardBias (the same outputs)
//   BM_dwconv7x7_grad_weight/cudnn_filter_only/<stage>   cudnnConvolutionBackwardFilter alone
//
// "GB/s" counts the bytes that must move (bench_common.h's report_bytes), each tensor once, at
// its own element size (activations 2 bytes in the bf16 rows, parameters always 4):
//   forward      read in + write out + read weight and bias
//   grad-input   read dout + write din (+ read weight)
//   grad-weight  read dout + read in + write dweight and dbias; for ours also the partial sums
//                (workspace written once and read once), which are part of our algorithm
// and "of_copy_bw" is that over the device's measured copy bandwidth. The cuDNN baselines are
// fp32 only.
//
// cuDNN: NHWC activations (N, C, H, W descriptor with CUDNN_TENSOR_NHWC), an NHWC filter of
// C output channels x 1 input channel x 7 x 7, group count C, cross-correlation (as ours),
// pad 3, float data and compute, CUDNN_FMA_MATH (plain fp32 FMAs, no TF32 tensor cores, like
// ours). The algorithm is the fastest that cudnnFind* reports (an FMA-math one if any; the
// label says "math N" otherwise), chosen once per stage and direction, and its workspace is
// allocated outside the timed loop. cuDNN's filter layout is (C, 7, 7, 1), ours (7, 7, C): the
// data is random, so only the timing is compared here (tests/test_cuda_dwconv.cpp checks ours).
//
//   ./build/bench/bench_cuda_kernels --benchmark_filter=dwconv --benchmark_format=json
#include <cudnn.h>

#include <algorithm>
#include <cstdint>
#include <cstdio>
#include <string>
#include <type_traits>

#include "bench/cuda/bench_common.h"
#include "kernels/cast.h"
#include "kernels/dwconv.h"
#include "tensor/cuda_check.h"
#include "tensor/error.h"

namespace cnx::bench {
namespace {

constexpr int64_t kK = 7;   // ConvNeXt's kernel size
constexpr double kF = 4.0;  // bytes per float
const float kOne = 1.0f, kZero = 0.0f;

enum class Impl { ours, ours_bf16, cudnn, cudnn_filter_only };

int64_t filter_floats(const StageShape& s) { return kK * kK * s.C; }

// Activations of a row: T (float or bf16) per element, and their bytes.
template <Impl I> using act_t = std::conditional_t<I == Impl::ours_bf16, bf16, float>;
template <Impl I> constexpr double kActBytes = sizeof(act_t<I>);

// n activations of T: uniform in [-1, 1) (rounded to bf16 for bf16), or zeros.
template <class T>
DeviceBuffer activations(int64_t n, bool random = true) {
  if constexpr (std::is_same_v<T, float>) {
    return floats(n, random);
  } else {
    DeviceBuffer b(n * static_cast<int64_t>(sizeof(T)), false);
    if (random) {
      const DeviceBuffer f = floats(n);
      cuda::cast(b.as<bf16>(), f.as(), n, nullptr);
      CNX_CUDA_CHECK(cudaDeviceSynchronize());
    }
    return b;
  }
}

// ---- cuDNN ------------------------------------------------------------------------------------

// The algorithm picked for one direction and stage, and its workspace.
struct Algo {
  int algo = -1;
  size_t workspace_bytes = 0;
  cudnnMathType_t math = CUDNN_FMA_MATH;
};

// The fastest successful result of a cudnnFind* call (they come sorted by time), preferring
// plain FMA math.
template <class Perf>
Algo pick(const Perf* perf, int count, const char* what, const StageShape& s) {
  for (int pass = 0; pass < 2; ++pass)
    for (int i = 0; i < count; ++i)
      if (perf[i].status == CUDNN_STATUS_SUCCESS &&
          (pass == 1 || perf[i].mathType == CUDNN_FMA_MATH))
        return Algo{static_cast<int>(perf[i].algo), perf[i].memory, perf[i].mathType};
  fail("cuDNN: no ", what, " algorithm ran for the depthwise 7x7 conv at ", s.label());
}

// One stage's cuDNN handle and descriptors (RAII, move-less: one per benchmark run).
class CudnnDwconv {
 public:
  explicit CudnnDwconv(const StageShape& s) : shape_(s) {
    CNX_CUDNN_CHECK(cudnnCreate(&handle_));
    CNX_CUDNN_CHECK(cudnnSetStream(handle_, nullptr));
    CNX_CUDNN_CHECK(cudnnCreateTensorDescriptor(&act_));
    CNX_CUDNN_CHECK(cudnnSetTensor4dDescriptor(act_, CUDNN_TENSOR_NHWC, CUDNN_DATA_FLOAT,
                                               static_cast<int>(s.N), static_cast<int>(s.C),
                                               static_cast<int>(s.H), static_cast<int>(s.W)));
    CNX_CUDNN_CHECK(cudnnCreateTensorDescriptor(&bias_));
    CNX_CUDNN_CHECK(cudnnSetTensor4dDescriptor(bias_, CUDNN_TENSOR_NCHW, CUDNN_DATA_FLOAT, 1,
                                               static_cast<int>(s.C), 1, 1));
    CNX_CUDNN_CHECK(cudnnCreateFilterDescriptor(&filter_));
    CNX_CUDNN_CHECK(cudnnSetFilter4dDescriptor(filter_, CUDNN_DATA_FLOAT, CUDNN_TENSOR_NHWC,
                                               static_cast<int>(s.C), 1, static_cast<int>(kK),
                                               static_cast<int>(kK)));
    CNX_CUDNN_CHECK(cudnnCreateConvolutionDescriptor(&conv_));
    CNX_CUDNN_CHECK(cudnnSetConvolution2dDescriptor(conv_, kK / 2, kK / 2, 1, 1, 1, 1,
                                                    CUDNN_CROSS_CORRELATION, CUDNN_DATA_FLOAT));
    CNX_CUDNN_CHECK(cudnnSetConvolutionGroupCount(conv_, static_cast<int>(s.C)));
    CNX_CUDNN_CHECK(cudnnSetConvolutionMathType(conv_, CUDNN_FMA_MATH));
  }
  ~CudnnDwconv() {
    // Destructors log, never throw.
    if (conv_ && cudnnDestroyConvolutionDescriptor(conv_) != CUDNN_STATUS_SUCCESS)
      std::fprintf(stderr, "bench: cudnnDestroyConvolutionDescriptor failed\n");
    if (filter_ && cudnnDestroyFilterDescriptor(filter_) != CUDNN_STATUS_SUCCESS)
      std::fprintf(stderr, "bench: cudnnDestroyFilterDescriptor failed\n");
    if (bias_ && cudnnDestroyTensorDescriptor(bias_) != CUDNN_STATUS_SUCCESS)
      std::fprintf(stderr, "bench: cudnnDestroyTensorDescriptor failed\n");
    if (act_ && cudnnDestroyTensorDescriptor(act_) != CUDNN_STATUS_SUCCESS)
      std::fprintf(stderr, "bench: cudnnDestroyTensorDescriptor failed\n");
    if (handle_ && cudnnDestroy(handle_) != CUDNN_STATUS_SUCCESS)
      std::fprintf(stderr, "bench: cudnnDestroy failed\n");
  }
  CudnnDwconv(const CudnnDwconv&) = delete;
  CudnnDwconv& operator=(const CudnnDwconv&) = delete;

  // The algorithms, found once per stage (cudnnFind* runs each candidate, which is slow) and
  // remembered for the later runs of the same benchmark. Each also sets the math type.
  Algo forward_algo(int stage) {
    static Algo cache[kNumStages];
    if (cache[stage].algo < 0) {
      cudnnConvolutionFwdAlgoPerf_t perf[CUDNN_CONVOLUTION_FWD_ALGO_COUNT];
      int n = 0;
      CNX_CUDNN_CHECK(cudnnFindConvolutionForwardAlgorithm(
          handle_, act_, filter_, conv_, act_, CUDNN_CONVOLUTION_FWD_ALGO_COUNT, &n, perf));
      cache[stage] = pick(perf, n, "forward", shape_);
    }
    CNX_CUDNN_CHECK(cudnnSetConvolutionMathType(conv_, cache[stage].math));
    return cache[stage];
  }
  Algo backward_data_algo(int stage) {
    static Algo cache[kNumStages];
    if (cache[stage].algo < 0) {
      cudnnConvolutionBwdDataAlgoPerf_t perf[CUDNN_CONVOLUTION_BWD_DATA_ALGO_COUNT];
      int n = 0;
      CNX_CUDNN_CHECK(cudnnFindConvolutionBackwardDataAlgorithm(
          handle_, filter_, act_, conv_, act_, CUDNN_CONVOLUTION_BWD_DATA_ALGO_COUNT, &n, perf));
      cache[stage] = pick(perf, n, "backward-data", shape_);
    }
    CNX_CUDNN_CHECK(cudnnSetConvolutionMathType(conv_, cache[stage].math));
    return cache[stage];
  }
  Algo backward_filter_algo(int stage) {
    static Algo cache[kNumStages];
    if (cache[stage].algo < 0) {
      cudnnConvolutionBwdFilterAlgoPerf_t perf[CUDNN_CONVOLUTION_BWD_FILTER_ALGO_COUNT];
      int n = 0;
      CNX_CUDNN_CHECK(cudnnFindConvolutionBackwardFilterAlgorithm(
          handle_, act_, act_, conv_, filter_, CUDNN_CONVOLUTION_BWD_FILTER_ALGO_COUNT, &n, perf));
      cache[stage] = pick(perf, n, "backward-filter", shape_);
    }
    CNX_CUDNN_CHECK(cudnnSetConvolutionMathType(conv_, cache[stage].math));
    return cache[stage];
  }

  cudnnHandle_t handle() const { return handle_; }
  cudnnTensorDescriptor_t act() const { return act_; }      // in, out, dout, din
  cudnnTensorDescriptor_t bias() const { return bias_; }    // dbias (1, C, 1, 1)
  cudnnFilterDescriptor_t filter() const { return filter_; }
  cudnnConvolutionDescriptor_t conv() const { return conv_; }

 private:
  StageShape shape_;
  cudnnHandle_t handle_ = nullptr;
  cudnnTensorDescriptor_t act_ = nullptr, bias_ = nullptr;
  cudnnFilterDescriptor_t filter_ = nullptr;
  cudnnConvolutionDescriptor_t conv_ = nullptr;
};

// The label: the stage, and the cuDNN algorithm (with its math type when it is not FMA).
std::string label(const StageShape& s, const Algo* a = nullptr) {
  std::string l = s.label();
  if (a) {
    l += " algo " + std::to_string(a->algo);
    if (a->math != CUDNN_FMA_MATH) l += " math " + std::to_string(static_cast<int>(a->math));
  }
  return l;
}

// ---- the benchmarks ---------------------------------------------------------------------------

// Runs a benchmark body; a cnx::Error (a failed CUDA or cuDNN call, no usable cuDNN algorithm)
// ends that row with the message instead of aborting the whole binary.
template <void (*Body)(benchmark::State&)>
void guarded(benchmark::State& state) {
  try {
    Body(state);
  } catch (const Error& e) {
    state.SkipWithError(e.what());
  }
}

template <Impl I>
void BM_dwconv7x7_fwd(benchmark::State& state) {
  using T = act_t<I>;
  const int stage = static_cast<int>(state.range(0));
  const StageShape& s = kStages[stage];
  DeviceBuffer in = activations<T>(s.numel()), out = activations<T>(s.numel(), false);  // (N, H, W, C)
  DeviceBuffer weight = floats(filter_floats(s)), bias = floats(s.C);  // (7, 7, C), (C)
  double seconds = 0;
  if constexpr (I == Impl::ours || I == Impl::ours_bf16) {
    state.SetLabel(label(s));
    seconds = time_iterations(state, nullptr, [&] {
      cuda::dwconv_forward<T>(out.as<T>(), in.as<T>(), weight.as(), bias.as(), s.N, s.H, s.W,
                              s.C, kK, nullptr);
    });
  } else {
    CudnnDwconv dnn(s);
    const Algo a = dnn.forward_algo(stage);
    DeviceBuffer ws(std::max<int64_t>(static_cast<int64_t>(a.workspace_bytes), 256), false);
    state.SetLabel(label(s, &a));
    seconds = time_iterations(state, nullptr, [&] {
      CNX_CUDNN_CHECK(cudnnConvolutionForward(
          dnn.handle(), &kOne, dnn.act(), in.as(), dnn.filter(), weight.as(), dnn.conv(),
          static_cast<cudnnConvolutionFwdAlgo_t>(a.algo), ws.as<void>(), a.workspace_bytes,
          &kZero, dnn.act(), out.as()));
    });
  }
  report_bytes(state, kActBytes<I> * 2.0 * s.numel() + kF * (filter_floats(s) + s.C), seconds);
}

template <Impl I>
void BM_dwconv7x7_grad_input(benchmark::State& state) {
  using T = act_t<I>;
  const int stage = static_cast<int>(state.range(0));
  const StageShape& s = kStages[stage];
  DeviceBuffer dout = activations<T>(s.numel()), din = activations<T>(s.numel(), false);  // (N, H, W, C)
  DeviceBuffer weight = floats(filter_floats(s));                                         // (7, 7, C)
  double seconds = 0;
  if constexpr (I == Impl::ours || I == Impl::ours_bf16) {
    // din alone needs no workspace; pass one anyway, as the autograd layer would.
    const int64_t ws_floats = cuda::dwconv_backward_workspace_floats(s.N, s.H, s.W, s.C, kK);
    DeviceBuffer ws = floats(std::max<int64_t>(ws_floats, 64), false);
    state.SetLabel(label(s));
    seconds = time_iterations(state, nullptr, [&] {
      cuda::dwconv_backward<T>(din.as<T>(), nullptr, nullptr, dout.as<T>(), nullptr, weight.as(),
                               s.N, s.H, s.W, s.C, kK, ws.as(), nullptr);
    });
  } else {
    CudnnDwconv dnn(s);
    const Algo a = dnn.backward_data_algo(stage);
    DeviceBuffer ws(std::max<int64_t>(static_cast<int64_t>(a.workspace_bytes), 256), false);
    state.SetLabel(label(s, &a));
    seconds = time_iterations(state, nullptr, [&] {
      CNX_CUDNN_CHECK(cudnnConvolutionBackwardData(
          dnn.handle(), &kOne, dnn.filter(), weight.as(), dnn.act(), dout.as(), dnn.conv(),
          static_cast<cudnnConvolutionBwdDataAlgo_t>(a.algo), ws.as<void>(), a.workspace_bytes,
          &kZero, dnn.act(), din.as()));
    });
  }
  report_bytes(state, kActBytes<I> * 2.0 * s.numel() + kF * filter_floats(s), seconds);
}

template <Impl I>
void BM_dwconv7x7_grad_weight(benchmark::State& state) {
  using T = act_t<I>;
  const int stage = static_cast<int>(state.range(0));
  const StageShape& s = kStages[stage];
  DeviceBuffer dout = activations<T>(s.numel()), in = activations<T>(s.numel());  // (N, H, W, C)
  DeviceBuffer dweight = floats(filter_floats(s), false);                         // (7, 7, C)
  DeviceBuffer dbias = floats(s.C, false);                                         // (C)
  const double outputs = static_cast<double>(filter_floats(s) + s.C);
  double seconds = 0, bytes = kActBytes<I> * 2.0 * s.numel() + kF * outputs;
  if constexpr (I == Impl::ours || I == Impl::ours_bf16) {
    const int64_t ws_floats = cuda::dwconv_backward_workspace_floats(s.N, s.H, s.W, s.C, kK);
    DeviceBuffer ws = floats(std::max<int64_t>(ws_floats, 64), false);
    state.SetLabel(label(s));
    seconds = time_iterations(state, nullptr, [&] {
      cuda::dwconv_backward<T>(nullptr, dweight.as(), dbias.as(), dout.as<T>(), in.as<T>(),
                               nullptr, s.N, s.H, s.W, s.C, kK, ws.as(), nullptr);
    });
    bytes += kF * 2.0 * static_cast<double>(ws_floats);  // partials: written, then read
    state.counters["partials_MB"] = kF * static_cast<double>(ws_floats) / 1e6;
  } else {
    CudnnDwconv dnn(s);
    const Algo a = dnn.backward_filter_algo(stage);
    DeviceBuffer ws(std::max<int64_t>(static_cast<int64_t>(a.workspace_bytes), 256), false);
    state.SetLabel(label(s, &a));
    seconds = time_iterations(state, nullptr, [&] {
      CNX_CUDNN_CHECK(cudnnConvolutionBackwardFilter(
          dnn.handle(), &kOne, dnn.act(), in.as(), dnn.act(), dout.as(), dnn.conv(),
          static_cast<cudnnConvolutionBwdFilterAlgo_t>(a.algo), ws.as<void>(), a.workspace_bytes,
          &kZero, dnn.filter(), dweight.as()));
      if constexpr (I == Impl::cudnn)
        CNX_CUDNN_CHECK(cudnnConvolutionBackwardBias(dnn.handle(), &kOne, dnn.act(), dout.as(),
                                                     &kZero, dnn.bias(), dbias.as()));
    });
    if constexpr (I == Impl::cudnn_filter_only) bytes -= kF * static_cast<double>(s.C);
  }
  report_bytes(state, bytes, seconds);
}

// Registered in this order so the rows of one direction sit together: ours (fp32, bf16), then
// cuDNN.
#define CNX_DWCONV_BENCH(body, name) CNX_CUDA_BENCH_STAGES(guarded<body>)->Name(name)
CNX_DWCONV_BENCH(BM_dwconv7x7_fwd<Impl::ours>, "BM_dwconv7x7_fwd/ours");
CNX_DWCONV_BENCH(BM_dwconv7x7_fwd<Impl::ours_bf16>, "BM_dwconv7x7_fwd/ours_bf16");
CNX_DWCONV_BENCH(BM_dwconv7x7_fwd<Impl::cudnn>, "BM_dwconv7x7_fwd/cudnn");
CNX_DWCONV_BENCH(BM_dwconv7x7_grad_input<Impl::ours>, "BM_dwconv7x7_grad_input/ours");
CNX_DWCONV_BENCH(BM_dwconv7x7_grad_input<Impl::ours_bf16>, "BM_dwconv7x7_grad_input/ours_bf16");
CNX_DWCONV_BENCH(BM_dwconv7x7_grad_input<Impl::cudnn>, "BM_dwconv7x7_grad_input/cudnn");
CNX_DWCONV_BENCH(BM_dwconv7x7_grad_weight<Impl::ours>, "BM_dwconv7x7_grad_weight/ours");
CNX_DWCONV_BENCH(BM_dwconv7x7_grad_weight<Impl::ours_bf16>, "BM_dwconv7x7_grad_weight/ours_bf16");
CNX_DWCONV_BENCH(BM_dwconv7x7_grad_weight<Impl::cudnn>, "BM_dwconv7x7_grad_weight/cudnn");
CNX_DWCONV_BENCH(BM_dwconv7x7_grad_weight<Impl::cudnn_filter_only>,
                 "BM_dwconv7x7_grad_weight/cudnn_filter_only");
#undef CNX_DWCONV_BENCH

}  // namespace
}  // namespace cnx::bench
