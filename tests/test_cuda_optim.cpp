// The optimiser step on a CUDA device without host stalls (issue 15): the multi-tensor gradient
// norm, clip decision and clip scaling (kernels/grad_norm.h, clip_grad_norm_status), the
// multi-tensor EMA (kernels/ema.h, ModelEma::update) and the AdamW kernel's skip flag, against
// the CPU optimiser of train/optim (the independent reference: plain loops) and against the
// formulas written out here.
//
// What must hold, and how each test could fail:
//  - the norm is the CPU's to double rounding (a lost chunk, tail or slot moves it far more);
//  - the norm is bitwise the same under every emulated thread and block schedule (a reduction
//    whose order followed the schedule would differ);
//  - coef and the scaled gradients are exactly the formula applied to the device's own norm;
//  - the EMA is bitwise the CPU's;
//  - a NaN or Inf gradient, or a NaN loss, leaves every parameter, moment, EMA average and
//    gradient bitwise unchanged, and after uncount_step the run continues bitwise as one that
//    never saw the bad step;
//  - for 182 tensors (ConvNeXt-T's count) the whole optimiser step is a handful of launches,
//    allocates at most the status and one scratch buffer, and never makes the host wait.
//
// Every test skips, saying why, when the library was built without CUDA or no device is visible.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <map>
#include <string>
#include <vector>

#include "tests/cuda_testing.h"
#include "tests/testing.h"
#include "train/optim/adamw.h"
#include "train/optim/ema.h"
#include "train/optim/step_status.h"

#if CNX_TEST_CUDA
#include "kernels/grad_norm.h"
#include "tensor/cuda_context.h"
#include "tensor/cuda_memory.h"
#endif
#if defined(CNX_CUDA_EMULATOR)
#include "kernels/cuda/emulator/emulator.h"
#endif

using namespace cnx;

using cnx::test::normal_floats;

namespace {

#if CNX_TEST_CUDA
const Device kGpu = Device::cuda(0);


// The bits of every element (NaN-safe bitwise comparison).
std::vector<uint32_t> bits(const Tensor& t) {
  const std::vector<float> v = t.to_vector<float>();
  std::vector<uint32_t> out(v.size());
  std::memcpy(out.data(), v.data(), v.size() * sizeof(float));
  return out;
}

uint32_t bits_of(float x) {
  uint32_t u;
  std::memcpy(&u, &x, sizeof u);
  return u;
}

// Sizes with every case of the kernels: 1 element, n % 4 != 0, exactly one chunk of the norm
// (16384), one element more, several chunks, and small vectors like LayerNorm's and biases.
std::vector<int64_t> mixed_sizes(size_t count) {
  const int64_t cycle[] = {96, 384, 1, 4704, 5, 16384, 17, 16385, 1023, 40000, 3, 768};
  std::vector<int64_t> out;
  for (size_t i = 0; i < count; ++i) out.push_back(cycle[i % std::size(cycle)]);
  return out;
}

// One optimiser's worth of parameters on the CPU and the same values on the device: names
// p0, p1, ..., every other one decayed, gradients drawn from `seed`.
struct Twin {
  std::vector<Parameter> cpu, gpu;
};

Parameter make_param(size_t i, int64_t n, const std::vector<float>& v, Device device) {
  Parameter p;
  p.name = "p" + std::to_string(i);
  p.official_shape = Shape{n};
  p.value = Tensor::from_data<float>(Shape{n}, v).to(device);
  p.decay = i % 2 == 0;
  return p;
}

Twin make_twin(const std::vector<int64_t>& sizes, uint64_t seed) {
  Twin t;
  for (size_t i = 0; i < sizes.size(); ++i) {
    const std::vector<float> v = normal_floats(sizes[i], seed + 2 * i);
    t.cpu.push_back(make_param(i, sizes[i], v, Device::cpu()));
    t.gpu.push_back(make_param(i, sizes[i], v, kGpu));
  }
  return t;
}

// Gives every parameter of both lists the same fresh gradient (seeded by `seed`); parameters
// whose index is in `without` get none.
void set_grads(Twin& t, uint64_t seed, double std = 1.0, const std::vector<size_t>& without = {}) {
  for (size_t i = 0; i < t.cpu.size(); ++i) {
    const bool none = std::find(without.begin(), without.end(), i) != without.end();
    const int64_t n = t.cpu[i].value.numel();
    const Tensor g = Tensor::from_data<float>(Shape{n}, normal_floats(n, seed * 1000 + i, std));
    t.cpu[i].value.set_grad(none ? Tensor() : g);
    t.gpu[i].value.set_grad(none ? Tensor() : g.to(kGpu));
  }
}

void set_grads(std::vector<Parameter>& params, uint64_t seed, double std = 1.0) {
  for (size_t i = 0; i < params.size(); ++i) {
    const int64_t n = params[i].value.numel();
    params[i].value.set_grad(
        Tensor::from_data<float>(Shape{n}, normal_floats(n, seed * 1000 + i, std)).to(params[i].value.device()));
  }
}

// The exact sum of squares is not known, so the reference is the CPU's double sum (chunks of
// 65536 in order). Both sides add nonnegative terms in double; the CPU's longest serial run,
// 65536 terms, bounds its relative error by 65536 * 2^-53 ~ 7.3e-12, the device's tree far
// less: 1e-10 relative on the sum of squares covers both, and a lost or doubled chunk of even
// one element of magnitude ~1 among ~3e5 moves it by ~3e-6.
constexpr double kSumSquaresRtol = 1e-10;

// Restores the schedule this process started with (CNX_EMU_SCHEDULE, else in order).
void restore_schedule() {
#if defined(CNX_CUDA_EMULATOR)
  const char* env = std::getenv("CNX_EMU_SCHEDULE");
  ASSERT_TRUE(cnx::emu::set_schedule_for_testing(env && *env ? env : "inorder"));
#endif
}

// One device buffer of f32 gradients at chosen offsets, for calling the launchers directly.
struct RawGrads {
  Tensor storage;
  std::vector<cuda::GradSlot> slots;
  std::vector<std::vector<float>> host;  // the values of each slot
};

RawGrads raw_grads(const std::vector<int64_t>& sizes, int64_t misalign, uint64_t seed) {
  RawGrads r;
  std::vector<float> all;
  std::vector<int64_t> offsets;
  for (size_t i = 0; i < sizes.size(); ++i) {
    // Every other slot starts `misalign` floats past a 16-byte boundary (the scalar path).
    while (all.size() % 4 != 0) all.push_back(0.0f);
    if (i % 2 == 1) all.insert(all.end(), static_cast<size_t>(misalign), 0.0f);
    offsets.push_back(static_cast<int64_t>(all.size()));
    r.host.push_back(normal_floats(sizes[i], seed + i));
    all.insert(all.end(), r.host.back().begin(), r.host.back().end());
  }
  r.storage = Tensor::from_data<float>(Shape{static_cast<int64_t>(all.size())}, all).to(kGpu);
  for (size_t i = 0; i < sizes.size(); ++i)
    r.slots.push_back({r.storage.data<float>() + offsets[i], sizes[i]});
  return r;
}

// Runs grad_norm_status on the slots (no loss, no clipping) and returns the double sum of
// squares and the status, read back.
std::pair<double, std::vector<float>> device_norm(const RawGrads& r) {
  const int64_t count = static_cast<int64_t>(r.slots.size());
  Tensor status = Tensor::empty(Shape{4}, DType::f32, kGpu);
  Tensor work = Tensor::empty(Shape{cuda::grad_norm_workspace_size(r.slots.data(), count) * 2 + 2},
                              DType::f32, kGpu);  // doubles, as floats
  double* const ws = reinterpret_cast<double*>(work.data<float>());
  double* const total = ws + cuda::grad_norm_workspace_size(r.slots.data(), count);
  cuda::DeviceGuard guard(kGpu);
  cuda::grad_norm_status(status.data<float>(), total, ws, r.slots.data(), count, false, 0.0f,
                         nullptr, cuda::device_stream(kGpu));
  double sum = 0;
  copy_bytes(&sum, Device::cpu(), total, kGpu, sizeof sum);
  return {sum, status.to_vector<float>()};
}
#endif

}  // namespace

// ---- the norm --------------------------------------------------------------------------------

TEST(CudaOptim, GradNormMatchesTheCpu) {
#if CNX_TEST_CUDA
  CNX_SKIP_WITHOUT_DEVICE();
  Twin t = make_twin(mixed_sizes(182), 11);
  set_grads(t, 5, 0.01);
  t.cpu[7].value.set_grad(Tensor());  // a parameter without a gradient is left out on both
  t.gpu[7].value.set_grad(Tensor());
  const double cpu = grad_norm(t.cpu), gpu = grad_norm(t.gpu);
  EXPECT_NEAR(gpu * gpu, cpu * cpu, kSumSquaresRtol * cpu * cpu) << "gpu " << gpu << " cpu " << cpu;
  // The status holds the norm rounded to f32: the CPU's to one f32 rounding (they may round to
  // neighbours when the doubles straddle a rounding boundary).
  const StepStatus st = clip_grad_norm_status(t.gpu, 0.0, Tensor());
  EXPECT_NEAR(st.norm(), cpu, cpu * 0x1p-23);
  EXPECT_EQ(st.coef(), 1.0);
  EXPECT_FALSE(st.skipped());
  EXPECT_TRUE(std::isnan(st.loss()));
  std::printf("grad norm of 182 tensors: cpu %.17g gpu %.17g (relative %.3g)\n", cpu, gpu,
              std::abs(gpu - cpu) / cpu);

  // No gradient at all: norm 0, as on the CPU.
  for (Parameter& p : t.gpu) p.value.set_grad(Tensor());
  EXPECT_EQ(grad_norm(t.gpu), 0.0);
#else
  CNX_SKIP_BUILT_WITHOUT_CUDA();
#endif
}

TEST(CudaOptim, LauncherSumsEverySlotAlignedOrNot) {
#if CNX_TEST_CUDA
  CNX_SKIP_WITHOUT_DEVICE();
  // 300 slots: three launches of the sum of squares (128 a launch); every other slot misaligned.
  std::vector<int64_t> sizes = mixed_sizes(300);
  sizes[10] = 0;  // an empty slot is skipped, not a block that reads nothing
  for (int64_t misalign : {1, 2, 3}) {
    SCOPED_TRACE("misalign " + std::to_string(misalign));
    const RawGrads r = raw_grads(sizes, misalign, 100 + misalign);
    double ref = 0;
    for (const auto& v : r.host)
      for (float x : v) ref += double(x) * double(x);
    const auto [sum, status] = device_norm(r);
    EXPECT_NEAR(sum, ref, kSumSquaresRtol * ref);
    EXPECT_EQ(bits_of(status[0]), bits_of(static_cast<float>(std::sqrt(sum))));
  }
#else
  CNX_SKIP_BUILT_WITHOUT_CUDA();
#endif
}

TEST(CudaOptim, NormIsBitwiseTheSameUnderEverySchedule) {
#if CNX_TEST_CUDA
  CNX_SKIP_WITHOUT_DEVICE();
  const RawGrads r = raw_grads(mixed_sizes(150), 1, 7);
  // On the emulator each run uses another order of threads and blocks; on a GPU the hardware
  // picks its own each time.
  const char* const schedules[] = {"inorder", "reverse", "random:7", "random:12345"};
  std::vector<uint64_t> sums;
  std::vector<std::vector<float>> statuses;
  for (const char* schedule : schedules) {
#if defined(CNX_CUDA_EMULATOR)
    ASSERT_TRUE(cnx::emu::set_schedule_for_testing(schedule));
#else
    (void)schedule;
#endif
    const auto [sum, status] = device_norm(r);
    uint64_t u;
    std::memcpy(&u, &sum, sizeof u);
    sums.push_back(u);
    statuses.push_back(status);
  }
  restore_schedule();
  for (size_t i = 1; i < sums.size(); ++i) {
    EXPECT_EQ(sums[i], sums[0]) << "schedule " << schedules[i] << " vs " << schedules[0];
    EXPECT_EQ(bits_of(statuses[i][0]), bits_of(statuses[0][0])) << schedules[i];
  }
#else
  CNX_SKIP_BUILT_WITHOUT_CUDA();
#endif
}

// ---- clipping ------------------------------------------------------------------------------------

TEST(CudaOptim, ClipCoefficientAndScalingAreThePyTorchFormula) {
#if CNX_TEST_CUDA
  CNX_SKIP_WITHOUT_DEVICE();
  Twin t = make_twin(mixed_sizes(40), 21);
  // Gradients with a norm near 1.2 (~250k elements), where the 1e-6 of the formula is several
  // f32 ulps of the norm and so changes the f32 sum: that is what tells an f32 formula from one
  // in double (with a norm of hundreds, norm + 1e-6f == norm and both agree).
  constexpr double kStd = 0.0024;
  set_grads(t, 9, kStd);
  std::vector<std::vector<uint32_t>> before;
  for (const Parameter& p : t.gpu) before.push_back(bits(p.value.grad()));
  // The coefficient in f32 from the device's own norm, exactly. Several max_norms, because the
  // f32 chain (norm + 1e-6f, then the division) and a single double expression rounded once agree
  // on many inputs: over these, some must differ (counted below) for the test to tell them apart.
  int f32_differs_from_double = 0;
  for (double max_norm : {0.9, 0.7, 0.61, 0.5, 0.37, 0.3, 0.23, 0.011}) {
    SCOPED_TRACE("max_norm " + std::to_string(max_norm));
    set_grads(t, 9, kStd);
    const StepStatus st = clip_grad_norm_status(t.gpu, max_norm, Tensor());
    const StepStatus st_cpu = clip_grad_norm_status(t.cpu, max_norm, Tensor());
    const std::vector<float> v = st.values.to_vector<float>();
    // torch.nn.utils.clip_grad_norm_: clip_coef = max_norm / (total_norm + 1e-6), an f32 tensor.
    const float coef = static_cast<float>(max_norm) / (v[0] + 1e-6f);
    ASSERT_LT(coef, 1.0f);
    EXPECT_EQ(bits_of(v[1]), bits_of(coef));
    EXPECT_EQ(v[2], 0.0f);
    const double max_norm_f = static_cast<float>(max_norm);  // the f32 max_norm, divided in double
    f32_differs_from_double += coef != static_cast<float>(max_norm_f / (double(v[0]) + 1e-6));
    // The CPU's decision from its own norm: the same coefficient to one f32 rounding of the norm.
    EXPECT_NEAR(st_cpu.coef(), v[1], v[1] * 0x1p-22);
    for (size_t i = 0; i < t.gpu.size(); ++i) {
      const std::vector<uint32_t> got = bits(t.gpu[i].value.grad());
      for (size_t k = 0; k < got.size(); ++k) {
        float g;
        std::memcpy(&g, &before[i][k], sizeof g);
        ASSERT_EQ(got[k], bits_of(g * coef)) << t.gpu[i].name << " element " << k;
      }
    }
  }
  std::printf("the f32 coefficient differs from the double formula's for %d of 8 max_norms\n",
              f32_differs_from_double);
  EXPECT_GT(f32_differs_from_double, 0) << "the cases cannot tell the f32 formula from a double one";
  // Below max_norm: coefficient 1, gradients bitwise untouched (also with max_norm <= 0).
  for (double no_clip : {1e9, 0.0, -1.0}) {
    SCOPED_TRACE("max_norm " + std::to_string(no_clip));
    std::vector<std::vector<uint32_t>> now;
    for (const Parameter& p : t.gpu) now.push_back(bits(p.value.grad()));
    const StepStatus s = clip_grad_norm_status(t.gpu, no_clip, Tensor());
    EXPECT_EQ(s.coef(), 1.0);
    for (size_t i = 0; i < t.gpu.size(); ++i) EXPECT_EQ(bits(t.gpu[i].value.grad()), now[i]);
  }

  // clip_grad_norm (the host wrapper) on the same gradients again: the norm before clipping and
  // the same clipped gradients as the status's step.
  set_grads(t, 9, kStd);
  const float norm_f = static_cast<float>(clip_grad_norm_status(t.gpu, 0.0, Tensor()).norm());
  const float coef = 0.5f / (norm_f + 1e-6f);
  const double norm = clip_grad_norm(t.gpu, 0.5);
  EXPECT_EQ(static_cast<float>(norm), norm_f);
  for (size_t i = 0; i < t.gpu.size(); ++i) {
    const std::vector<uint32_t> got = bits(t.gpu[i].value.grad());
    for (size_t k = 0; k < got.size(); ++k) {
      float g;
      std::memcpy(&g, &before[i][k], sizeof g);
      ASSERT_EQ(got[k], bits_of(g * coef)) << t.gpu[i].name << " element " << k;
    }
  }
#else
  CNX_SKIP_BUILT_WITHOUT_CUDA();
#endif
}

// ---- EMA -------------------------------------------------------------------------------------------

TEST(CudaOptim, EmaIsBitwiseTheCpu) {
#if CNX_TEST_CUDA
  CNX_SKIP_WITHOUT_DEVICE();
  Twin t = make_twin(mixed_sizes(60), 31);
  ModelEma cpu(t.cpu, 0.9), gpu(t.gpu, 0.9);
  for (int step = 0; step < 3; ++step) {
    // New parameter values each time (as an optimiser step would give).
    Twin next = make_twin(mixed_sizes(60), 200 + step);
    for (size_t i = 0; i < t.cpu.size(); ++i) {
      t.cpu[i].value.copy_from(next.cpu[i].value);
      t.gpu[i].value.copy_from(next.cpu[i].value);
    }
    cpu.update(t.cpu);
    gpu.update(t.gpu);
    for (size_t i = 0; i < t.cpu.size(); ++i)
      ASSERT_EQ(bits(gpu.parameters()[i].value), bits(cpu.parameters()[i].value))
          << "step " << step << " " << t.cpu[i].name;
  }
#else
  CNX_SKIP_BUILT_WITHOUT_CUDA();
#endif
}

// ---- skipped steps -----------------------------------------------------------------------------------

#if CNX_TEST_CUDA
namespace {

// Everything a step may change, as bits.
struct Snapshot {
  std::vector<std::vector<uint32_t>> params, m, v, ema, grads;
  std::vector<int64_t> steps;
  int64_t step_count = 0;
  bool operator==(const Snapshot&) const = default;
};

Snapshot snapshot(const std::vector<Parameter>& params, const AdamW& opt, const ModelEma& ema) {
  Snapshot s;
  for (size_t i = 0; i < params.size(); ++i) {
    s.params.push_back(bits(params[i].value));
    s.m.push_back(bits(opt.exp_avg(i)));
    s.v.push_back(bits(opt.exp_avg_sq(i)));
    s.ema.push_back(bits(ema.parameters()[i].value));
    const Tensor& g = params[i].value.grad();
    s.grads.push_back(g.defined() ? bits(g) : std::vector<uint32_t>{});
    s.steps.push_back(opt.param_step(i));
  }
  s.step_count = opt.step_count();
  return s;
}

// The trainer's step against the new API: clip, update, average; the host reads the status last.
StepStatus train_step(std::vector<Parameter>& params, AdamW& opt, ModelEma& ema, const Tensor& loss,
                      double max_norm = 1.0) {
  StepStatus st = clip_grad_norm_status(params, max_norm, loss);
  opt.step(1e-2, 0.05, &st);
  ema.update(params, &st);
  return st;
}

}  // namespace
#endif

TEST(CudaOptim, NonFiniteGradientOrLossChangesNothing) {
#if CNX_TEST_CUDA
  CNX_SKIP_WITHOUT_DEVICE();
  const std::vector<int64_t> sizes = mixed_sizes(30);
  Twin t = make_twin(sizes, 41);
  AdamW opt(t.gpu);
  ModelEma ema(t.gpu, 0.9);
  set_grads(t.gpu, 1);
  const Tensor good_loss = Tensor::full(Shape{}, 2.5, DType::f32, kGpu);
  const StepStatus first = train_step(t.gpu, opt, ema, good_loss);
  EXPECT_FALSE(first.skipped());
  EXPECT_EQ(first.loss(), 2.5);

  const float nan = std::numeric_limits<float>::quiet_NaN();
  const float inf = std::numeric_limits<float>::infinity();
  struct Case {
    const char* what;
    float bad_grad;  // written into one element of parameter 9's gradient (0: none)
    float loss;
  };
  for (const Case c : {Case{"NaN gradient", nan, 1.0f}, Case{"Inf gradient", inf, 1.0f},
                       Case{"NaN loss", 0.0f, nan}, Case{"Inf loss", 0.0f, inf}}) {
    SCOPED_TRACE(c.what);
    set_grads(t.gpu, 2);
    if (c.bad_grad != 0.0f) {
      std::vector<float> g = t.gpu[9].value.grad().to_vector<float>();
      g[g.size() / 2] = c.bad_grad;
      t.gpu[9].value.set_grad(Tensor::from_data<float>(t.gpu[9].value.shape(), g).to(kGpu));
    }
    const Tensor loss = Tensor::full(Shape{}, c.loss, DType::f32, kGpu);
    Snapshot before = snapshot(t.gpu, opt, ema);
    const StepStatus st = train_step(t.gpu, opt, ema, loss, 1e-3);  // would clip hard
    EXPECT_TRUE(st.skipped());
    EXPECT_EQ(st.coef(), 1.0);
    Snapshot after = snapshot(t.gpu, opt, ema);
    // The counts went up on the host (it could not know); everything on the device is unchanged.
    EXPECT_EQ(after.step_count, before.step_count + 1);
    opt.uncount_step();
    after = snapshot(t.gpu, opt, ema);
    EXPECT_TRUE(after == before) << "a skipped step changed the parameters, moments, EMA, gradients "
                                    "or (after uncount_step) the step counts";
  }
#else
  CNX_SKIP_BUILT_WITHOUT_CUDA();
#endif
}

TEST(CudaOptim, AfterUncountStepTheRunIsOneThatNeverSawTheBadStep) {
#if CNX_TEST_CUDA
  CNX_SKIP_WITHOUT_DEVICE();
  const std::vector<int64_t> sizes = mixed_sizes(24);
  Twin a = make_twin(sizes, 51), b = make_twin(sizes, 51);
  AdamW opt_a(a.gpu), opt_b(b.gpu);
  ModelEma ema_a(a.gpu, 0.8), ema_b(b.gpu, 0.8);
  const Tensor loss = Tensor::full(Shape{}, 1.0, DType::f32, kGpu);
  // Gradients for the good steps, the same in both runs; parameter 3 has none on step 1 and
  // parameter 5 none on the bad step (so uncount_step must not take back a count it never gave).
  auto grads = [&](std::vector<Parameter>& ps, uint64_t seed, size_t without) {
    set_grads(ps, seed, 0.5);
    if (without < ps.size()) ps[without].value.set_grad(Tensor());
  };
  grads(a.gpu, 1, 3);
  train_step(a.gpu, opt_a, ema_a, loss);
  grads(b.gpu, 1, 3);
  train_step(b.gpu, opt_b, ema_b, loss);

  // Run a: a bad step (NaN in one gradient), noticed by the host afterwards.
  grads(a.gpu, 2, 5);
  {
    std::vector<float> g = a.gpu[0].value.grad().to_vector<float>();
    g[0] = std::numeric_limits<float>::quiet_NaN();
    a.gpu[0].value.set_grad(Tensor::from_data<float>(a.gpu[0].value.shape(), g).to(kGpu));
  }
  const StepStatus bad = train_step(a.gpu, opt_a, ema_a, loss);
  ASSERT_TRUE(bad.skipped());
  opt_a.uncount_step();
  EXPECT_EQ(opt_a.step_count(), 1);
  EXPECT_EQ(opt_a.param_step(3), 0);
  EXPECT_EQ(opt_a.param_step(5), 1);
  EXPECT_THROW(opt_a.uncount_step(), Error);  // once per step

  for (uint64_t seed : {3, 4}) {
    grads(a.gpu, seed, 99);
    train_step(a.gpu, opt_a, ema_a, loss);
    grads(b.gpu, seed, 99);
    train_step(b.gpu, opt_b, ema_b, loss);
  }
  for (Parameter& p : a.gpu) p.value.set_grad(Tensor());
  for (Parameter& p : b.gpu) p.value.set_grad(Tensor());
  EXPECT_TRUE(snapshot(a.gpu, opt_a, ema_a) == snapshot(b.gpu, opt_b, ema_b));
  EXPECT_EQ(opt_a.step_count(), 3);
#else
  CNX_SKIP_BUILT_WITHOUT_CUDA();
#endif
}

// ---- launches, allocations, host waits ------------------------------------------------------------

TEST(CudaOptim, AWholeStepOf182TensorsIsAHandfulOfLaunchesWithoutWaiting) {
#if CNX_TEST_CUDA
  CNX_SKIP_WITHOUT_DEVICE();
#if !defined(CNX_CUDA_EMULATOR)
  GTEST_SKIP() << "counts launches and host waits with the emulated device's instruments";
#else
  std::vector<int64_t> sizes = mixed_sizes(182);  // ConvNeXt-T's tensor count
  for (int64_t& n : sizes) n = std::min<int64_t>(n, 2000);
  Twin t = make_twin(sizes, 61);
  AdamW opt(t.gpu);
  ModelEma ema(t.gpu, 0.9);
  const Tensor loss = Tensor::full(Shape{}, 1.0, DType::f32, kGpu);
  set_grads(t.gpu, 1);
  train_step(t.gpu, opt, ema, loss, 1e-3);  // warms the caching allocator
  set_grads(t.gpu, 2);
  cuda::synchronize(kGpu);

  auto launches = [] {
    std::map<std::string, uint64_t> m;
    for (const auto& [name, n] : cnx::emu::kernel_launch_counts()) m[name] = n;
    return m;
  };
  auto delta = [](const std::map<std::string, uint64_t>& a, const std::map<std::string, uint64_t>& b) {
    uint64_t total = 0;
    for (const auto& [name, n] : b) total += n - (a.count(name) ? a.at(name) : 0);
    return total;
  };

  // A marker the host can see: a device-to-pinned copy queued before the step. The emulated
  // device runs queued work only when the host waits for it, so the marker still holds its old
  // value after the step exactly when nothing in the step made the host wait.
  float* pinned = nullptr;
  CNX_CUDA_CHECK(cudaMallocHost(reinterpret_cast<void**>(&pinned), sizeof(float)));
  *pinned = -1.0f;
  const Tensor seven = Tensor::full(Shape{1}, 7.0, DType::f32, kGpu);
  const cudaStream_t stream = cuda::device_stream(kGpu);
  CNX_CUDA_CHECK(cudaMemcpyAsync(pinned, seven.data<float>(), sizeof(float), cudaMemcpyDeviceToHost,
                                 stream));

  const auto l0 = launches();
  const int64_t a0 = cuda::memory_stats(kGpu).allocations;
  const StepStatus st = clip_grad_norm_status(t.gpu, 1e-3, loss);
  const auto l1 = launches();
  const int64_t a1 = cuda::memory_stats(kGpu).allocations;
  opt.step(1e-2, 0.05, &st);
  const auto l2 = launches();
  const int64_t a2 = cuda::memory_stats(kGpu).allocations;
  ema.update(t.gpu, &st);
  const auto l3 = launches();
  const int64_t a3 = cuda::memory_stats(kGpu).allocations;
  const float marker = *pinned;

  cuda::synchronize(kGpu);
  EXPECT_EQ(*pinned, 7.0f);  // the marker works: it lands once the host waits
  CNX_CUDA_CHECK(cudaFreeHost(pinned));
  // Without the caching allocator (CNX_CUDA_NO_CACHING=1, the sanitizer suite) every free of
  // the step's scratch is a cudaFree, which synchronises the device by definition.
  if (!cuda::caching_disabled())
    EXPECT_EQ(marker, -1.0f) << "the optimiser step made the host wait for the device";

  std::printf("182 tensors: clip %llu launches, AdamW %llu, EMA %llu; allocations %lld, %lld, %lld\n",
              static_cast<unsigned long long>(delta(l0, l1)),
              static_cast<unsigned long long>(delta(l1, l2)),
              static_cast<unsigned long long>(delta(l2, l3)), static_cast<long long>(a1 - a0),
              static_cast<long long>(a2 - a1), static_cast<long long>(a3 - a2));
  // 2 launches of the sum of squares (128 tensors each), 1 finish, 2 of the scaling; AdamW 4 (48
  // tensors a launch), EMA 2 (96 a launch). The old per-parameter code made ~3 launches per
  // tensor for the norm, 1 per tensor for the scaling, 3 per tensor for the EMA.
  EXPECT_LE(delta(l0, l1), 5u);
  EXPECT_LE(delta(l1, l2), 4u);
  EXPECT_LE(delta(l2, l3), 2u);
  if (cuda::caching_disabled()) {
    std::printf("CNX_CUDA_NO_CACHING: the allocator's counters are off, allocations not checked\n");
  } else {
    EXPECT_LE(a1 - a0, 2) << "clip_grad_norm_status: the status and one scratch buffer at most";
    EXPECT_EQ(a2 - a1, 0) << "AdamW.step allocates nothing";
    EXPECT_EQ(a3 - a2, 0) << "ModelEma.update allocates nothing";
  }
  EXPECT_TRUE(st.skipped() == false);
#endif
#else
  CNX_SKIP_BUILT_WITHOUT_CUDA();
#endif
}
