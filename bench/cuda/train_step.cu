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
// steps (bytes handed out, as torch.cuda.max_memory_allocated reports for PyTorch). The _graph
// rows replay the step as one CUDA graph (--cuda_graphs), the others launch it kernel by kernel.
#include "autograd/ops.h"
#include "bench/cuda/bench_common.h"
#include "models/convnext.h"
#include "tensor/cuda_context.h"
#include "tensor/cuda_graph.h"
#include "tensor/cuda_memory.h"
#include "tensor/readback.h"
#include "train/optim/adamw.h"
#include "train/optim/step_status.h"

namespace cnx::bench {
namespace {

// graphs: the step captured once (tensor/cuda_graph.h) and replayed, as `convnext train
// --cuda_graphs true` does: the drop-path multipliers drawn on the host and copied into the
// buffer the graph reads, AdamW's scalars set by prepare_step, one launch.
void train_step(benchmark::State& state, DType activations, bool graphs) {
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
    if (activations == DType::bf16) opt.keep_bf16_copies(model.bf16_gemm_weights());
    const Tensor images = Tensor::randn({batch, 224, 224, 3}, data).to(dev);
    std::vector<int64_t> y(static_cast<size_t>(batch));
    for (int64_t i = 0; i < batch; ++i) y[static_cast<size_t>(i)] = (i * 7919) % 1000;
    const Tensor labels = Tensor::from_data<int64_t>({batch}, y).to(dev);
    Tensor drop_scales = model.draw_drop_scales(batch, drop, activations).to(dev);
    Readback previous;  // the step before's status, read after this step is queued
    // Forward, backward, the status and AdamW's device half (its scalars set before).
    auto body = [&] {
      Tensor loss = cross_entropy(model.forward(images, /*training=*/true, drop, activations,
                                                &opt.bf16_copies(), &drop_scales),
                                  labels, 0.1);
      loss.backward();
      const StepStatus status = clip_grad_norm_status(model.parameters(), 0.0, loss.detach());
      opt.launch_step(&status);
      model.zero_grad();
      return status.values;
    };
    auto settle = [&] {
      if (previous.defined() && previous.wait().to_vector<float>()[2] != 0.0f) opt.uncount_step();
    };
    cuda::Graph graph;
    Tensor status;  // written by every replay
    int steps_run = 0;
    auto step = [&] {
      drop_scales.copy_from(model.draw_drop_scales(batch, drop, activations));
      settle();
      opt.prepare_step(4e-3, 0.05);
      if (graphs && graph.empty() && steps_run >= 3) {  // after 3 uncaptured warm-up steps
        cuda::empty_cache(dev);  // the uncaptured steps' blocks: the graph has its own pool
        graph = cuda::Graph::capture(dev, [&] { status = body(); });
      }
      if (!graph.empty()) graph.replay();
      else status = body();
      previous = Readback(status);
      ++steps_run;
    };
    // Warms the allocator's cache and cuBLASLt's choices; the graph rows capture at the next
    // step (time_iterations' own warm-up call).
    for (int i = 0; i < 3; ++i) step();
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
void BM_train_step_convnext_tiny_fp32(benchmark::State& state) { train_step(state, DType::f32, false); }
void BM_train_step_convnext_tiny_bf16(benchmark::State& state) { train_step(state, DType::bf16, false); }
void BM_train_step_convnext_tiny_fp32_graph(benchmark::State& state) { train_step(state, DType::f32, true); }
void BM_train_step_convnext_tiny_bf16_graph(benchmark::State& state) { train_step(state, DType::bf16, true); }
#define CNX_TRAIN_STEP_BENCH(fn)                                                                  \
  BENCHMARK(fn)->ArgName("batch")->Arg(128)->Arg(256)->UseManualTime()->Unit(benchmark::kMillisecond) \
      ->Iterations(10)
CNX_TRAIN_STEP_BENCH(BM_train_step_convnext_tiny_fp32);
CNX_TRAIN_STEP_BENCH(BM_train_step_convnext_tiny_bf16);
CNX_TRAIN_STEP_BENCH(BM_train_step_convnext_tiny_fp32_graph);
CNX_TRAIN_STEP_BENCH(BM_train_step_convnext_tiny_bf16_graph);

}  // namespace
}  // namespace cnx::bench
