// The whole training step of ConvNeXt-T on the GPU, the row to set beside
// tools/bench_pytorch.py: forward, backward (cross-entropy with smoothing 0.1, drop path 0.1,
// layer scale 1e-6, as the paper's recipe), the gradient norm and skip decision on the device
// (clip_grad_norm_status, no clipping: the recipe has none) and the AdamW update conditional on
// it, with the status read back one step late as the trainer does (train/trainer.cpp), on a
// random batch already on the device, 224x224, in fp32 and in bf16 mixed precision (--use_amp:
// bf16 activations, fp32 weights, AdamW state and loss; ConvNeXt::forward's `activations`).
//
//   ./build/bench/bench_cuda_kernels --benchmark_filter=train_step
//
// Reports images/s, ms/step and the peak GPU memory of the caching allocator over the timed
// steps (bytes handed out, as torch.cuda.max_memory_allocated reports for PyTorch).
#include "autograd/ops.h"
#include "bench/cuda/bench_common.h"
#include "models/convnext.h"
#include "tensor/cuda_context.h"
#include "tensor/cuda_memory.h"
#include "tensor/readback.h"
#include "train/optim/adamw.h"
#include "train/optim/step_status.h"

namespace cnx::bench {
namespace {

void train_step(benchmark::State& state, DType activations) {
  const int64_t batch = state.range(0);
  const Device dev = Device::cuda(0);
  try {
    Generator init(0), drop(1), data(2);
    ConvNeXtConfig cfg = convnext_config("convnext_tiny");
    cfg.drop_path_rate = 0.1;
    cfg.layer_scale_init_value = 1e-6;
    ConvNeXt model(cfg, init);
    model.to(dev);
    AdamW opt(model.parameters());
    const Tensor images = Tensor::randn({batch, 224, 224, 3}, data).to(dev);
    std::vector<int64_t> y(static_cast<size_t>(batch));
    for (int64_t i = 0; i < batch; ++i) y[static_cast<size_t>(i)] = (i * 7919) % 1000;
    const Tensor labels = Tensor::from_data<int64_t>({batch}, y).to(dev);
    Readback previous;  // the step before's status, read after this step is queued
    auto step = [&] {
      Tensor loss = cross_entropy(model.forward(images, /*training=*/true, drop, activations),
                                  labels, 0.1);
      loss.backward();
      const StepStatus status = clip_grad_norm_status(model.parameters(), 0.0, loss.detach());
      if (previous.defined() && previous.wait().to_vector<float>()[2] != 0.0f) opt.uncount_step();
      opt.step(4e-3, 0.05, &status);
      model.zero_grad();
      previous = Readback(status.values);
    };
    for (int i = 0; i < 3; ++i) step();  // warm the allocator's cache and cuBLASLt's choices
    cuda::reset_peak_memory_stats(dev);
    const double s = time_iterations(state, cuda::device_stream(dev), step);
    state.counters["images/s"] = s > 0 ? static_cast<double>(batch) / s : 0.0;
    state.counters["ms/step"] = s * 1e3;
    state.counters["peak_GiB"] =
        static_cast<double>(cuda::memory_stats(dev).peak_allocated_bytes) / (1024.0 * 1024 * 1024);
  } catch (const std::exception& e) {
    state.SkipWithError(e.what());
  }
}
void BM_train_step_convnext_tiny_fp32(benchmark::State& state) { train_step(state, DType::f32); }
void BM_train_step_convnext_tiny_bf16(benchmark::State& state) { train_step(state, DType::bf16); }
BENCHMARK(BM_train_step_convnext_tiny_fp32)->ArgName("batch")->Arg(128)->Arg(256)->UseManualTime()
    ->Unit(benchmark::kMillisecond)->Iterations(10);
BENCHMARK(BM_train_step_convnext_tiny_bf16)->ArgName("batch")->Arg(128)->Arg(256)->UseManualTime()
    ->Unit(benchmark::kMillisecond)->Iterations(10);

}  // namespace
}  // namespace cnx::bench
