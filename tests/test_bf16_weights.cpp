// The optimiser's bf16 weight copies (issue 15): AdamW::keep_bf16_copies keeps bf16(p) of the
// GEMM weights, written by the AdamW update in the same pass (the CPU loop, the CUDA kernel of
// kernels/adamw.h), and ConvNeXt::forward reads them instead of casting every weight on every
// bf16 forward (autograd linear / patchify_conv's weight_bf16).
//
// The reference is the cast op itself (Tensor::to(DType::bf16), round to nearest even), applied
// here to the optimiser's fp32 parameters; and for the model, the same forward + backward
// without the copies (the cast per forward). What must hold, and how each could fail:
//  - after k steps every copy is bitwise the cast of its parameter (a copy written from the
//    value before the update, or truncated instead of rounded, or a missed float4 / tail /
//    second-launch element, differs);
//  - a skipped step (non-finite loss) leaves the copies bitwise unchanged;
//  - a bf16 model forward + backward with the copies gives bitwise the logits and every fp32
//    gradient of the one without (a copy used for the wrong weight, or a stale one, differs);
//  - with the copies no weight is cast: one cast launch fewer per GEMM weight per forward
//    (emulated device only: it counts launches);
//  - after ConvNeXt::load_state_dict, refresh_bf16_copies() brings the copies back to the cast;
//    AdamW::load_state_dict refreshes them itself.
// The CUDA variants run on the emulated device (or a real one) and skip without CUDA.
#include <gtest/gtest.h>

#include <cmath>
#include <cstdint>
#include <cstring>
#include <map>
#include <string>
#include <vector>

#include "autograd/ops.h"
#include "models/convnext.h"
#include "tests/cuda_testing.h"
#include "tests/testing.h"
#include "train/optim/adamw.h"
#include "train/optim/step_status.h"

#if defined(CNX_CUDA_EMULATOR)
#include "kernels/cuda/emulator/emulator.h"
#endif

using namespace cnx;
using cnx::test::expect_error;

namespace {

// The raw 16 bits of every element of a bf16 tensor (any device).
std::vector<uint16_t> bits16(const Tensor& t) {
  EXPECT_EQ(t.dtype(), DType::bf16);
  const Tensor c = t.to(Device::cpu());
  std::vector<uint16_t> out(static_cast<size_t>(c.numel()));
  std::memcpy(out.data(), c.data<bf16>(), out.size() * sizeof(uint16_t));
  return out;
}

// The raw bits of every element of an f32 tensor (any device).
std::vector<uint32_t> bits32(const Tensor& t) {
  const std::vector<float> v = t.to(Device::cpu()).to_vector<float>();
  std::vector<uint32_t> out(v.size());
  std::memcpy(out.data(), v.data(), v.size() * sizeof(float));
  return out;
}

// The reference: the cast op applied to the parameter's current value (on the CPU).
std::vector<uint16_t> cast_bits(const Tensor& value) {
  return bits16(value.to(Device::cpu()).to(DType::bf16));
}

// Parameters of sizes that reach every path of the update: 1 element, n % 4 != 0 (the scalar
// tail), exactly one 4096-element chunk, a chunk and a tail, several chunks; `count` of them so
// that a CUDA step takes more than one launch (48 slots a launch) when count > 48.
std::vector<Parameter> make_params(size_t count, uint64_t seed, Device device) {
  const int64_t cycle[] = {1, 5, 4096, 4101, 12000, 96, 7, 384};
  Generator g(seed);
  std::vector<Parameter> ps;
  for (size_t i = 0; i < count; ++i) {
    const int64_t n = cycle[i % 8];
    Parameter p;
    p.name = "p" + std::to_string(i);
    p.official_shape = Shape{n};
    p.decay = i % 2 == 0;
    p.value = Tensor::randn({n}, g).to(device);
    p.value.set_requires_grad(true);
    ps.push_back(p);
  }
  return ps;
}

void set_grads(std::vector<Parameter>& ps, uint64_t seed) {
  Generator g(seed);
  for (Parameter& p : ps) p.value.set_grad(Tensor::randn(p.value.shape(), g).to(p.value.device()));
}

// Every other parameter, from the second: some kept, some not.
std::vector<size_t> odd_indices(size_t count) {
  std::vector<size_t> out;
  for (size_t i = 1; i < count; i += 2) out.push_back(i);
  return out;
}

// After `steps` AdamW steps the kept copies are bitwise the cast of the parameters; the others
// stay undefined.
void expect_copies_track_steps(Device device, size_t count, int steps) {
  std::vector<Parameter> ps = make_params(count, 11, device);
  AdamW opt(ps);
  opt.keep_bf16_copies(odd_indices(count));
  for (size_t i = 0; i < count; ++i) {
    ASSERT_EQ(opt.bf16_copy(i).defined(), i % 2 == 1) << i;
    if (i % 2 == 1) {
      EXPECT_EQ(bits16(opt.bf16_copy(i)), cast_bits(ps[i].value)) << "made: " << i;
    }
  }
  for (int s = 0; s < steps; ++s) {
    set_grads(ps, 100 + static_cast<uint64_t>(s));
    // A large lr: every step moves every weight by many bf16 ulps, so a stale copy shows.
    opt.step(0.05, 0.1);
  }
  size_t checked = 0;
  for (size_t i = 1; i < count; i += 2) {
    const std::vector<uint16_t> got = bits16(opt.bf16_copy(i)), want = cast_bits(ps[i].value);
    ASSERT_EQ(got.size(), want.size());
    size_t bad = 0, first = got.size();
    for (size_t k = 0; k < got.size(); ++k)
      if (got[k] != want[k] && bad++ == 0) first = k;
    EXPECT_EQ(bad, 0u) << ps[i].name << " (" << got.size() << " elements): " << bad
                       << " copies differ from the cast, the first at " << first;
    checked += got.size();
  }
  std::printf("%s: %zu copied elements of %zu parameters bitwise the cast after %d steps\n",
              device.str().c_str(), checked, count / 2, steps);
}

TEST(Bf16Weights, CpuCopiesAreTheCastOfTheParametersAfterSteps) {
  expect_copies_track_steps(Device::cpu(), 16, 3);
}

TEST(Bf16Weights, CudaCopiesAreTheCastOfTheParametersAfterSteps) {
#if CNX_TEST_CUDA
  CNX_SKIP_WITHOUT_DEVICE();
  expect_copies_track_steps(Device::cuda(0), 60, 3);  // 60 tensors: two launches of the kernel
#else
  CNX_SKIP_BUILT_WITHOUT_CUDA();
#endif
}

// A step whose loss is NaN is skipped (on the CPU read by the host, on CUDA by the kernel): the
// parameters and the copies keep their bits.
void expect_skipped_step_leaves_copies(Device device) {
  std::vector<Parameter> ps = make_params(8, 21, device);
  AdamW opt(ps);
  opt.keep_bf16_copies({0, 2, 3, 4});
  set_grads(ps, 1);
  opt.step(0.05, 0.1);  // one applied step: the copies are the kernel's / loop's now
  std::vector<std::vector<uint16_t>> before;
  for (size_t i = 0; i < ps.size(); ++i)
    before.push_back(opt.bf16_copy(i).defined() ? bits16(opt.bf16_copy(i)) : std::vector<uint16_t>{});
  set_grads(ps, 2);
  const Tensor nan_loss = Tensor::full(Shape{}, std::nan(""), DType::f32, device);
  const StepStatus st = clip_grad_norm_status(ps, 1.0, nan_loss);
  opt.step(0.05, 0.1, &st);
  ASSERT_TRUE(st.skipped());
  for (size_t i : {0, 2, 3, 4}) {
    EXPECT_EQ(bits16(opt.bf16_copy(i)), before[i]) << "parameter " << i;
    EXPECT_EQ(bits16(opt.bf16_copy(i)), cast_bits(ps[i].value)) << "parameter " << i;
  }
}

TEST(Bf16Weights, CpuSkippedStepLeavesTheCopies) { expect_skipped_step_leaves_copies(Device::cpu()); }

TEST(Bf16Weights, CudaSkippedStepLeavesTheCopies) {
#if CNX_TEST_CUDA
  CNX_SKIP_WITHOUT_DEVICE();
  expect_skipped_step_leaves_copies(Device::cuda(0));
#else
  CNX_SKIP_BUILT_WITHOUT_CUDA();
#endif
}

// ---- the model --------------------------------------------------------------------------------

ConvNeXtConfig tiny_config() {
  ConvNeXtConfig c;
  c.name = "bf16_weights_test";
  c.in_chans = 3;
  c.num_classes = 5;
  c.depths = {1, 2};
  c.dims = {8, 16};
  c.layer_scale_init_value = 0.5;  // blocks that matter
  c.drop_path_rate = 0.0;
  return c;
}

struct Pass {
  std::vector<uint32_t> logits;
  std::vector<std::vector<uint32_t>> grads;  // per parameter
};

Pass forward_backward(ConvNeXt& model, const std::vector<Tensor>* copies, Device device) {
  Generator data(42), drop(7);
  const Tensor images = Tensor::randn({2, 17, 19, 3}, data).to(device);
  const Tensor labels = Tensor::from_data<int64_t>({2}, std::vector<int64_t>{1, 4}).to(device);
  model.zero_grad();
  const Tensor logits = model.forward(images, /*training=*/true, drop, DType::bf16, copies);
  Tensor loss = cross_entropy(logits, labels, 0.1);
  loss.backward();
  Pass p;
  p.logits = bits32(logits);
  for (const Parameter& prm : model.parameters()) {
    EXPECT_TRUE(prm.value.grad().defined()) << prm.name;
    p.grads.push_back(bits32(prm.value.grad()));
  }
  return p;
}

void expect_same_pass(const Pass& a, const Pass& b, const ConvNeXt& model, const char* when) {
  EXPECT_EQ(a.logits, b.logits) << when << ": logits";
  ASSERT_EQ(a.grads.size(), b.grads.size());
  for (size_t i = 0; i < a.grads.size(); ++i)
    EXPECT_EQ(a.grads[i], b.grads[i]) << when << ": gradient of " << model.parameters()[i].name;
}

void expect_model_same_with_copies(Device device) {
  Generator init(3);
  ConvNeXt model(tiny_config(), init);
  model.to(device);
  AdamW opt(model.parameters());
  opt.keep_bf16_copies(model.bf16_gemm_weights());
  EXPECT_EQ(model.bf16_gemm_weights().size(), 2u + 3 * 2u);  // 2 patchify + 3 blocks x 2 linears

  const Pass cast = forward_backward(model, nullptr, device);
  const Pass copied = forward_backward(model, &opt.bf16_copies(), device);
  expect_same_pass(cast, copied, model, "fresh copies");

  // Two optimiser steps: now the copies are the ones the update wrote.
  for (int s = 0; s < 2; ++s) {
    forward_backward(model, &opt.bf16_copies(), device);
    opt.step(0.05, 0.05);
  }
  const Pass cast2 = forward_backward(model, nullptr, device);
  const Pass copied2 = forward_backward(model, &opt.bf16_copies(), device);
  expect_same_pass(cast2, copied2, model, "after 2 steps");
  EXPECT_NE(cast.logits, cast2.logits) << "the steps must have changed the model";
}

TEST(Bf16Weights, CpuModelWithCopiesIsBitwiseTheModelThatCasts) {
  expect_model_same_with_copies(Device::cpu());
}

TEST(Bf16Weights, CudaModelWithCopiesIsBitwiseTheModelThatCasts) {
#if CNX_TEST_CUDA
  CNX_SKIP_WITHOUT_DEVICE();
  expect_model_same_with_copies(Device::cuda(0));
#else
  CNX_SKIP_BUILT_WITHOUT_CUDA();
#endif
}

TEST(Bf16Weights, CudaForwardWithCopiesCastsNoWeight) {
#if CNX_TEST_CUDA
  CNX_SKIP_WITHOUT_DEVICE();
#if !defined(CNX_CUDA_EMULATOR)
  GTEST_SKIP() << "counts launches with the emulated device's instruments";
#else
  const Device gpu = Device::cuda(0);
  Generator init(3);
  ConvNeXt model(tiny_config(), init);
  model.to(gpu);
  AdamW opt(model.parameters());
  opt.keep_bf16_copies(model.bf16_gemm_weights());
  // The f32 -> bf16 cast launches (both instantiations of the vector and scalar kernels).
  auto casts = [] {
    uint64_t n = 0;
    for (const auto& [name, count] : cnx::emu::kernel_launch_counts())
      if (name.find("cast_kernel") != std::string::npos &&
          name.find("__nv_bfloat16, float") != std::string::npos)
        n += count;
    return n;
  };
  Generator data(1), drop(2);
  const Tensor images = Tensor::randn({2, 16, 16, 3}, data).to(gpu);
  const uint64_t c0 = casts();
  model.forward(images, false, drop, DType::bf16);
  const uint64_t c1 = casts();
  model.forward(images, false, drop, DType::bf16, &opt.bf16_copies());
  const uint64_t c2 = casts();
  std::printf("f32 -> bf16 cast launches per forward: %llu casting, %llu with the copies\n",
              static_cast<unsigned long long>(c1 - c0), static_cast<unsigned long long>(c2 - c1));
  // The copies save exactly one cast per GEMM weight (8 here). What remains are the images'
  // cast and the GEMM launchers' own casts of the (N-element) biases to bf16
  // (kernels/cuda/linear.cu), at most one per GEMM.
  const uint64_t weights = model.bf16_gemm_weights().size();
  EXPECT_EQ(c1 - c0, c2 - c1 + weights);
  EXPECT_LE(c2 - c1, 1u + weights);
#endif
#else
  CNX_SKIP_BUILT_WITHOUT_CUDA();
#endif
}

// After anything but step() writes the parameters, refresh_bf16_copies() makes the copies the
// cast again; AdamW::load_state_dict does it itself.
void expect_refresh_after_loads(Device device) {
  Generator init(3), other_init(4);
  ConvNeXt model(tiny_config(), init);
  model.to(device);
  const ConvNeXt other(tiny_config(), other_init);
  AdamW opt(model.parameters());
  const std::vector<size_t> kept = model.bf16_gemm_weights();
  opt.keep_bf16_copies(kept);

  model.load_state_dict(other.state_dict());  // new values, stale copies
  EXPECT_NE(bits16(opt.bf16_copy(kept[0])), cast_bits(model.parameters()[kept[0]].value))
      << "the load must have changed the weights";
  opt.refresh_bf16_copies();
  for (size_t i : kept)
    EXPECT_EQ(bits16(opt.bf16_copy(i)), cast_bits(model.parameters()[i].value)) << "refresh: " << i;

  // A resume: the model's state, then the optimiser's (which refreshes).
  const NamedTensors opt_state = opt.state_dict();
  model.load_state_dict(ConvNeXt(tiny_config(), init).state_dict());
  opt.load_state_dict(opt_state);
  for (size_t i : kept)
    EXPECT_EQ(bits16(opt.bf16_copy(i)), cast_bits(model.parameters()[i].value))
        << "AdamW::load_state_dict: " << i;
}

TEST(Bf16Weights, CpuRefreshAfterLoadStateDict) { expect_refresh_after_loads(Device::cpu()); }

TEST(Bf16Weights, CudaRefreshAfterLoadStateDict) {
#if CNX_TEST_CUDA
  CNX_SKIP_WITHOUT_DEVICE();
  expect_refresh_after_loads(Device::cuda(0));
#else
  CNX_SKIP_BUILT_WITHOUT_CUDA();
#endif
}

TEST(Bf16Weights, OpsRejectAWrongCopy) {
  Generator g(5);
  const Tensor x = Tensor::randn({3, 8}, g).to(DType::bf16);
  const Tensor w = Tensor::randn({4, 8}, g);
  expect_error([&] { linear(x, w, Tensor(), Tensor::randn({4, 7}, g).to(DType::bf16)); },
               {"linear", "weight_bf16", "[4, 7]"});
  expect_error([&] { linear(x, w, Tensor(), w); }, {"linear", "weight_bf16", "bf16"});
  const Tensor xi = Tensor::randn({1, 4, 4, 2}, g).to(DType::bf16);
  const Tensor pw = Tensor::randn({3, 2, 2, 2}, g);
  expect_error([&] { patchify_conv(xi, pw, Tensor(), Tensor::randn({3, 2, 2, 1}, g).to(DType::bf16)); },
               {"patchify_conv", "weight_bf16"});
  // With an f32 x the copy is not used: the result is the plain f32 linear.
  const Tensor xf = Tensor::randn({3, 8}, g);
  EXPECT_EQ(bits32(linear(xf, w, Tensor(), w.to(DType::bf16))), bits32(linear(xf, w, Tensor())));
}

}  // namespace
