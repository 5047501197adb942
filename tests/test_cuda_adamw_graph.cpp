// AdamW's step in two halves, for CUDA graphs (train/optim/adamw.h, "CUDA graphs"):
// prepare_step (host: counts, scalars, their copy into the optimiser's device table) and
// launch_step (device: the multi-tensor update, reading the scalars from that table).
//
// What must hold, and how each test could fail:
//  - prepare_step + launch_step is bitwise step(): parameters, moments, bf16 copies and step
//    counts, over steps with changing lr and weight decay, with a status that skips one step
//    (then uncount_step), on the CPU and on the device; on the device both are also bitwise the
//    CPU's step(). A difference in the scalars, the counts, the skip handling or the bf16 copies
//    shows in the bits.
//  - a launch_step captured once into a CUDA graph (raw runtime API) and replayed after each
//    prepare_step gives bitwise what an eager step() gives with the same gradients, on the device
//    and on the CPU. The captured launches keep the kernel arguments they had at capture, so a
//    kernel that took its scalars from anywhere but the device table when it runs (the unused
//    inline ones of the slots; a table that prepare_step moved or did not rewrite) goes wrong.
//  - launch_step refuses to run without a prepared step, and with a counted parameter that has
//    no gradient, before queuing anything.
//
// The device tests skip, saying why, when the library was built without CUDA or no device is
// visible; on the emulated device (kernels/cuda/emulator) they need no GPU.
#include <gtest/gtest.h>

#include <cstdint>
#include <cstring>
#include <iterator>
#include <string>
#include <vector>

#include "tests/cuda_testing.h"
#include "tests/testing.h"
#include "train/optim/adamw.h"
#include "train/optim/step_status.h"

#if CNX_TEST_CUDA
#include "tensor/cuda_context.h"
#include "tensor/cuda_memory.h"
#endif

using namespace cnx;

using cnx::test::normal_floats;

namespace {


// The bits of every element (bitwise comparison, NaN-safe), of an f32 or bf16 tensor.
std::vector<uint32_t> bits(const Tensor& t) {
  if (t.dtype() == DType::bf16) {
    std::vector<uint32_t> out;
    for (float x : t.to(DType::f32).to_vector<float>()) {  // bf16 -> f32 is exact
      uint32_t u;
      std::memcpy(&u, &x, sizeof u);
      out.push_back(u);
    }
    return out;
  }
  const std::vector<float> v = t.to_vector<float>();
  std::vector<uint32_t> out(v.size());
  std::memcpy(out.data(), v.data(), v.size() * sizeof(float));
  return out;
}

// 60 parameters (more than the 48 slots of one launch) of sizes with every case of the kernel:
// one element, n % 4 != 0, more than one chunk of 4096; every third one without weight decay,
// lr scales like layer decay's.
const int64_t kSizes[] = {96, 1, 4704, 5, 4097, 17, 384, 3, 768, 1023};
constexpr size_t kParams = 60;

std::vector<Parameter> make_params(Device device) {
  std::vector<Parameter> params;
  for (size_t i = 0; i < kParams; ++i) {
    const int64_t n = kSizes[i % std::size(kSizes)];
    Parameter p;
    p.name = "p" + std::to_string(i);
    p.official_shape = Shape{n};
    p.value = Tensor::from_data<float>(Shape{n}, normal_floats(n, 100 + i)).to(device);
    p.decay = i % 3 != 0;
    params.push_back(p);
  }
  return params;
}

std::vector<double> lr_scales() {
  std::vector<double> s;
  for (size_t i = 0; i < kParams; ++i) s.push_back(1.0 / static_cast<double>(1 + i % 4));
  return s;
}

// The gradient values of step `step` for parameter i.
Tensor grad_values(size_t i, int64_t n, int step) {
  return Tensor::from_data<float>(Shape{n}, normal_floats(n, 1000 * static_cast<uint64_t>(step) + i, 0.1));
}

// An optimiser over its own parameters, with bf16 copies of every other one.
struct AdamWRun {
  std::vector<Parameter> params;
  AdamW opt;
  explicit AdamWRun(Device device) : params(make_params(device)), opt(params, AdamWOptions{}, lr_scales()) {
    std::vector<size_t> which;
    for (size_t i = 0; i < kParams; i += 2) which.push_back(i);
    opt.keep_bf16_copies(which);
  }
};

// Everything a step changes, as bits, and the counts.
struct State {
  std::vector<std::vector<uint32_t>> params, m, v, bf16;
  std::vector<int64_t> steps;
  int64_t step_count = 0;
  bool operator==(const State&) const = default;
};

State state(const AdamWRun& r) {
  State s;
  for (size_t i = 0; i < r.params.size(); ++i) {
    s.params.push_back(bits(r.params[i].value));
    s.m.push_back(bits(r.opt.exp_avg(i)));
    s.v.push_back(bits(r.opt.exp_avg_sq(i)));
    const Tensor& copy = r.opt.bf16_copy(i);
    s.bf16.push_back(copy.defined() ? bits(copy) : std::vector<uint32_t>{});
    s.steps.push_back(r.opt.param_step(i));
  }
  s.step_count = r.opt.step_count();
  return s;
}

// A status as clip_grad_norm_status makes it, with the skip flag chosen.
StepStatus status_of(bool skip, Device device) {
  StepStatus st;
  st.values = Tensor::from_data<float>(Shape{4}, std::vector<float>{1.0f, 1.0f, skip ? 1.0f : 0.0f, 2.0f})
                  .to(device);
  return st;
}

// Per step: lr and weight decay (both change every step; step 3 has no weight decay at all),
// whether the status says skip, and whether a status is passed at all.
struct Schedule {
  double lr, wd;
  bool with_status, skip;
};
const Schedule kSteps[] = {{1e-2, 0.05, false, false}, {3e-3, 0.1, true, false},
                           {7e-3, 0.0, true, true},    {2e-3, 0.3, false, false},
                           {5e-4, 0.02, true, false}};

// Runs kSteps on `device` twice, with step() and with prepare_step + launch_step, and expects
// bitwise the same state after every step (every parameter has a gradient: the split step
// counts every one). On a CUDA device both must also be bitwise the CPU's step() (the kernel
// and the CPU loop do the same float operations, kernels/adamw.h): two device runs that went
// wrong the same way (say, a scalar table that was never copied) would still agree.
void expect_split_step_is_step(Device device) {
  AdamWRun eager(device), split(device), cpu(Device::cpu());
  for (int k = 0; k < static_cast<int>(std::size(kSteps)); ++k) {
    SCOPED_TRACE("step " + std::to_string(k));
    const Schedule& s = kSteps[k];
    for (AdamWRun* r : {&eager, &split, &cpu})
      for (size_t i = 0; i < kParams; ++i)
        r->params[i].value.set_grad(
            grad_values(i, r->params[i].value.numel(), k).to(r->params[i].value.device()));
    const StepStatus st = status_of(s.skip, device), cpu_st = status_of(s.skip, Device::cpu());
    eager.opt.step(s.lr, s.wd, s.with_status ? &st : nullptr);
    split.opt.prepare_step(s.lr, s.wd);
    split.opt.launch_step(s.with_status ? &st : nullptr);
    cpu.opt.step(s.lr, s.wd, s.with_status ? &cpu_st : nullptr);
    if (s.skip) {
      ASSERT_TRUE(st.skipped());
      for (AdamWRun* r : {&eager, &split, &cpu}) r->opt.uncount_step();
    }
    ASSERT_TRUE(state(eager) == state(split)) << "prepare_step + launch_step is not step()";
    ASSERT_TRUE(state(eager) == state(cpu)) << "step() on " << device.str() << " is not the CPU's";
  }
  EXPECT_EQ(split.opt.step_count(), static_cast<int64_t>(std::size(kSteps)) - 1);
}

}  // namespace

// ---- prepare_step + launch_step == step() --------------------------------------------------------

TEST(AdamWSplitStep, IsBitwiseStepOnTheCpu) { expect_split_step_is_step(Device::cpu()); }

TEST(CudaAdamWSplitStep, IsBitwiseStepOnTheDevice) {
#if CNX_TEST_CUDA
  CNX_SKIP_WITHOUT_DEVICE();
  expect_split_step_is_step(Device::cuda(0));
#else
  CNX_SKIP_BUILT_WITHOUT_CUDA();
#endif
}

// ---- a captured launch_step --------------------------------------------------------------------

TEST(CudaAdamWGraph, ACapturedLaunchStepReplaysEachPreparedStepBitwiseAsStep) {
#if CNX_TEST_CUDA
  CNX_SKIP_WITHOUT_DEVICE();
  const Device gpu = Device::cuda(0);
  // The references: step() on the device and on the CPU (bitwise the same, kernels/adamw.h; the
  // CPU one also catches a wrong scalar that would reach both device runs alike).
  AdamWRun graphed(gpu), eager(gpu), cpu(Device::cpu());
  // The graph holds the addresses of the gradients and of the status: they are made once, before
  // the capture, and only their values change (copies queued outside the graph).
  for (Parameter& p : graphed.params)
    p.value.set_grad(Tensor::zeros(p.value.shape(), DType::f32, gpu));
  StepStatus graphed_status = status_of(false, gpu);
  const State before = state(graphed);

  const cudaStream_t stream = cuda::device_stream(gpu);
  graphed.opt.prepare_step(kSteps[0].lr, kSteps[0].wd);  // launch_step needs a prepared step
  cuda::synchronize(gpu);
  const int64_t allocations = cuda::memory_stats(gpu).allocations;
  CNX_CUDA_CHECK(cudaStreamBeginCapture(stream, cudaStreamCaptureModeRelaxed));
  graphed.opt.launch_step(&graphed_status);
  cudaGraph_t graph = nullptr;
  CNX_CUDA_CHECK(cudaStreamEndCapture(stream, &graph));
  cudaGraphExec_t exec = nullptr;
  CNX_CUDA_CHECK(cudaGraphInstantiate(&exec, graph, 0));
  CNX_CUDA_CHECK(cudaGraphDestroy(graph));
  if (!cuda::caching_disabled()) {  // without the cache the counters are off
    EXPECT_EQ(cuda::memory_stats(gpu).allocations, allocations) << "launch_step allocated";
  }
  cuda::synchronize(gpu);
  ASSERT_TRUE(state(graphed).params == before.params) << "the captured update ran at capture";

  for (int k = 0; k < static_cast<int>(std::size(kSteps)); ++k) {
    SCOPED_TRACE("replay " + std::to_string(k));
    const Schedule& s = kSteps[k];
    // The graphed step first, up to its replay, so that nothing the references do can land in
    // memory the replay reads before it runs.
    if (k > 0) graphed.opt.prepare_step(s.lr, s.wd);
    for (size_t i = 0; i < kParams; ++i) {
      Tensor same_buffer = graphed.params[i].value.grad();  // a handle on the captured gradient
      same_buffer.copy_from(grad_values(i, same_buffer.numel(), k));
    }
    // The graph always passes its status; a step without one is a status that does not skip.
    graphed_status.values.copy_from(status_of(s.skip, Device::cpu()).values);
    CNX_CUDA_CHECK(cudaGraphLaunch(exec, stream));

    for (AdamWRun* r : {&eager, &cpu}) {
      const Device device = r->params[0].value.device();
      for (size_t i = 0; i < kParams; ++i)
        r->params[i].value.set_grad(grad_values(i, r->params[i].value.numel(), k).to(device));
      const StepStatus st = status_of(s.skip, device);
      r->opt.step(s.lr, s.wd, s.with_status ? &st : nullptr);
    }
    if (s.skip) {
      ASSERT_TRUE(graphed_status.skipped());
      for (AdamWRun* r : {&graphed, &eager, &cpu}) r->opt.uncount_step();  // also a prepare_step's
    }
    ASSERT_TRUE(state(graphed) == state(eager)) << "the replay is not the device's step()";
    ASSERT_TRUE(state(graphed) == state(cpu)) << "the replay is not the CPU's step()";
  }
  // The update did happen (the comparison is not between runs that changed nothing).
  EXPECT_FALSE(state(graphed).params == before.params);
  CNX_CUDA_CHECK(cudaGraphExecDestroy(exec));
#else
  CNX_SKIP_BUILT_WITHOUT_CUDA();
#endif
}

// ---- misuse --------------------------------------------------------------------------------------

namespace {

// launch_step without a prepared step, or with a counted parameter without a gradient, throws
// and changes nothing.
void expect_launch_step_refuses(Device device) {
  AdamWRun r(device);
  for (size_t i = 0; i < kParams; ++i)
    r.params[i].value.set_grad(grad_values(i, r.params[i].value.numel(), 0).to(device));
  const State fresh = state(r);
  test::expect_error([&] { r.opt.launch_step(); }, {"AdamW.launch_step", "no prepared step"});
  EXPECT_TRUE(state(r) == fresh);

  r.opt.prepare_step(1e-2, 0.05);
  r.opt.launch_step();
  const State once = state(r);
  EXPECT_FALSE(once.params == fresh.params);
  test::expect_error([&] { r.opt.launch_step(); }, {"AdamW.launch_step", "no prepared step"});
  r.opt.prepare_step(1e-2, 0.05);
  r.opt.uncount_step();  // drops the prepared step with its counts
  test::expect_error([&] { r.opt.launch_step(); }, {"AdamW.launch_step", "no prepared step"});
  EXPECT_TRUE(state(r) == once);

  // In the split mode every parameter is counted, so every one needs a gradient.
  r.params[5].value.set_grad(Tensor());
  r.opt.prepare_step(1e-2, 0.05);
  test::expect_error([&] { r.opt.launch_step(); },
                     {"AdamW.launch_step", "parameter p5 has no gradient"});
  r.opt.uncount_step();
  EXPECT_TRUE(state(r) == once);
  test::expect_error([&] { r.opt.prepare_step(-1.0, 0.0); },
                     {"AdamW.prepare_step", "lr must be finite and >= 0"});
  EXPECT_TRUE(state(r) == once);
}

}  // namespace

TEST(AdamWSplitStep, LaunchStepRefusesWithoutAPreparedStepOnTheCpu) {
  expect_launch_step_refuses(Device::cpu());
}

TEST(CudaAdamWSplitStep, LaunchStepRefusesWithoutAPreparedStepOnTheDevice) {
#if CNX_TEST_CUDA
  CNX_SKIP_WITHOUT_DEVICE();
  expect_launch_step_refuses(Device::cuda(0));
#else
  CNX_SKIP_BUILT_WITHOUT_CUDA();
#endif
}
