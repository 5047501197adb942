// The backward engine on a CUDA device: each parameter's gradient becomes its .grad without a
// device-to-device copy when the op that made it handed on a fresh tensor (autograd/engine.cpp,
// sole_owner; tests/test_autograd.cpp checks on the CPU which gradients are taken, which copied,
// and that no leaf's .grad shares memory with another gradient). Counted on the emulated device,
// whose trace records every copy (kernels/cuda/emulator/emulator.h): a ConvNeXt backward, f32 and
// bf16, makes none. When the engine copied every fresh gradient it made one per parameter
// (ConvNeXt-T: 182 copies, ~0.11 GB of reads and as many writes a step).
#include <gtest/gtest.h>

#include <cstdio>
#include <string>
#include <vector>

#include "autograd/ops.h"
#include "models/convnext.h"
#include "tests/cuda_testing.h"

#if defined(CNX_CUDA_EMULATOR)
#include "kernels/cuda/emulator/emulator.h"
#endif

using namespace cnx;

TEST(CudaAutograd, ABackwardTakesEveryParameterGradientWithoutACopy) {
#if CNX_TEST_CUDA
  CNX_SKIP_WITHOUT_DEVICE();
#if !defined(CNX_CUDA_EMULATOR)
  GTEST_SKIP() << "counts copies with the emulated device's trace";
#else
  const Device gpu = Device::cuda(0);
  ConvNeXtConfig config;
  config.name = "grad_ownership_test";
  config.num_classes = 5;
  config.depths = {1, 2};
  config.dims = {8, 16};
  config.drop_path_rate = 0.1;  // training: drop path and the scaled residual too
  Generator init(3);
  ConvNeXt model(config, init);
  model.to(gpu);
  Generator data(1);
  const Tensor images = Tensor::randn({2, 17, 19, 3}, data).to(gpu);
  const Tensor labels = Tensor::from_data<int64_t>({2}, std::vector<int64_t>{1, 4}).to(gpu);

  for (DType activations : {DType::f32, DType::bf16}) {
    SCOPED_TRACE(activations == DType::f32 ? "f32" : "bf16");
    model.zero_grad();
    Generator drop(7);
    const Tensor loss = cross_entropy(model.forward(images, true, drop, activations), labels, 0.1);
    ASSERT_TRUE(cnx::emu::start_trace(/*measure_traffic=*/false));
    loss.backward();
    const std::vector<cnx::emu::TraceRecord> trace = cnx::emu::stop_trace();
    int copies = 0;
    for (const cnx::emu::TraceRecord& r : trace)
      if (r.kind == cnx::emu::TraceKind::kCopy && r.name == "cudaMemcpyAsync DtoD") ++copies;
    for (const Parameter& p : model.parameters()) EXPECT_TRUE(p.value.grad().defined()) << p.name;
    std::printf("%s backward: %zu device work items, %d device-to-device copies, %zu parameters\n",
                activations == DType::f32 ? "f32" : "bf16", trace.size(), copies,
                model.parameters().size());
    EXPECT_EQ(copies, 0);
  }
#endif
#else
  CNX_SKIP_BUILT_WITHOUT_CUDA();
#endif
}
