// Tensor, Shape, dtypes, the Philox generator and device copies.
#include <gtest/gtest.h>

#include <cstring>

#include <cmath>
#include <numeric>

#include "tensor/cuda_context.h"
#include "tensor/cuda_memory.h"
#include "tensor/tensor.h"
#include "tests/testing.h"

using namespace cnx;
using cnx::test::expect_error;

TEST(Shape, BasicsAndNegativeIndex) {
  Shape s{2, 3, 4};
  EXPECT_EQ(s.rank(), 3);
  EXPECT_EQ(s.numel(), 24);
  EXPECT_EQ(s[0], 2);
  EXPECT_EQ(s[-1], 4);
  EXPECT_EQ(s.str(), "[2, 3, 4]");
  EXPECT_EQ(Shape{}.numel(), 1);  // a scalar
  EXPECT_EQ(Shape{}.str(), "[]");
  EXPECT_EQ(Shape({1, 2, 3, 4, 5}).numel(), 120);
  EXPECT_NE(Shape({2, 3}), Shape({3, 2}));
  EXPECT_NE(Shape({6}), Shape({6, 1}));
}

TEST(Shape, RejectsRankAboveFiveAndNegativeSizes) {
  expect_error([] { Shape({1, 2, 3, 4, 5, 6}); }, {"Shape", "rank 6", "maximum of 5"});
  expect_error([] { Shape({2, -1}); }, {"Shape", "negative dimension -1"});
  expect_error([] { (void)Shape({2, 3})[2]; }, {"index 2", "[2, 3]"});
}

TEST(DType, SizesAndNames) {
  EXPECT_EQ(dtype_size(DType::f32), 4);
  EXPECT_EQ(dtype_size(DType::f64), 8);
  EXPECT_EQ(dtype_size(DType::bf16), 2);
  EXPECT_EQ(dtype_size(DType::i64), 8);
  EXPECT_EQ(dtype_size(DType::u8), 1);
  EXPECT_STREQ(dtype_name(DType::bf16), "bf16");
}

TEST(BFloat16, RoundsToNearestEven) {
  // 1 + 2^-8 lies exactly between the bf16 neighbours 1 and 1 + 2^-7: ties go to even (1).
  EXPECT_EQ(static_cast<float>(bf16(1.0f + 0x1.0p-8f)), 1.0f);
  // 1 + 3*2^-8 lies between 1 + 2^-7 (odd mantissa) and 1 + 2^-6 (even): goes to 1 + 2^-6.
  EXPECT_EQ(static_cast<float>(bf16(1.0f + 3 * 0x1.0p-8f)), 1.0f + 0x1.0p-6f);
  // Slightly above the tie rounds up.
  EXPECT_EQ(static_cast<float>(bf16(1.0f + 0x1.0p-8f + 0x1.0p-20f)), 1.0f + 0x1.0p-7f);
  EXPECT_EQ(bf16(1.0f).bits, 0x3f80);
  EXPECT_EQ(bf16(-2.0f).bits, 0xc000);
  EXPECT_TRUE(std::isnan(static_cast<float>(bf16(std::nanf("")))));
  EXPECT_TRUE(std::isinf(static_cast<float>(bf16(INFINITY))));
}

TEST(Philox, MatchesRandom123KnownAnswers) {
  // Known-answer vectors of Philox4x32-10 from the Random123 distribution (tests/kat_vectors).
  EXPECT_EQ(philox4x32_10({0, 0, 0, 0}, {0, 0}),
            (std::array<uint32_t, 4>{0x6627e8d5, 0xe169c58d, 0xbc57ac4c, 0x9b00dbd8}));
  EXPECT_EQ(philox4x32_10({0xffffffff, 0xffffffff, 0xffffffff, 0xffffffff}, {0xffffffff, 0xffffffff}),
            (std::array<uint32_t, 4>{0x408f276d, 0x41c83b0e, 0xa20bc7c6, 0x6d5451fd}));
  EXPECT_EQ(philox4x32_10({0x243f6a88, 0x85a308d3, 0x13198a2e, 0x03707344}, {0xa4093822, 0x299f31d0}),
            (std::array<uint32_t, 4>{0xd16cfe09, 0x94fdcceb, 0x5001e420, 0x24126ea1}));
}

TEST(Generator, StreamIsTheCounterSequence) {
  Generator g(0);
  // Words 0..3 are block 0 with key 0 (the first KAT), word 4 starts block 1.
  EXPECT_EQ(g.next_u32(), 0x6627e8d5u);
  EXPECT_EQ(g.next_u32(), 0xe169c58du);
  EXPECT_EQ(g.next_u32(), 0xbc57ac4cu);
  EXPECT_EQ(g.next_u32(), 0x9b00dbd8u);
  EXPECT_EQ(g.offset(), 4u);
  EXPECT_EQ(g.next_u32(), philox4x32_10({1, 0, 0, 0}, {0, 0})[0]);
}

TEST(Generator, SameSeedSameDrawsAndStateRestores) {
  Generator a(42), b(42), c(43);
  std::vector<double> va, vb, vc;
  for (int i = 0; i < 100; ++i) {
    va.push_back(a.normal());
    vb.push_back(b.normal());
    vc.push_back(c.normal());
  }
  EXPECT_EQ(va, vb);
  EXPECT_NE(va, vc);
  // Saving (seed, offset) and restoring it replays the stream bitwise.
  const uint64_t seed = a.seed(), offset = a.offset();
  const double next = a.uniform();
  Generator d;
  d.set_state(seed, offset);
  EXPECT_EQ(d.uniform(), next);
}

TEST(Generator, MomentsOfUniformNormalAndTruncNormal) {
  Generator g(7);
  const int n = 200000;
  double su = 0, sn = 0, sn2 = 0, st = 0, st2 = 0, umin = 1, umax = 0, tmax = 0;
  for (int i = 0; i < n; ++i) {
    const double u = g.uniform(), z = g.normal(), t = g.trunc_normal(0, 0.02, -0.04, 0.04);
    su += u;
    umin = std::min(umin, u);
    umax = std::max(umax, u);
    sn += z;
    sn2 += z * z;
    st += t;
    st2 += t * t;
    tmax = std::max(tmax, std::abs(t));
  }
  // Standard errors: uniform mean sqrt(1/12/n) ~ 6.5e-4; normal mean 2.2e-3, variance ~3.2e-3.
  EXPECT_NEAR(su / n, 0.5, 4e-3);
  EXPECT_GE(umin, 0.0);
  EXPECT_LT(umax, 1.0);
  EXPECT_NEAR(sn / n, 0.0, 0.012);
  EXPECT_NEAR(sn2 / n, 1.0, 0.02);
  // N(0, 0.02) truncated to +-2 std has variance 0.02^2 * 0.7737 (standard result for +-2 sigma).
  EXPECT_LE(tmax, 0.04);
  EXPECT_NEAR(st / n, 0.0, 2e-4);
  EXPECT_NEAR(st2 / n, 0.0004 * 0.7737, 0.0004 * 0.02);
}

TEST(Tensor, FactoriesFillValues) {
  auto z = Tensor::zeros({2, 3});
  auto o = Tensor::ones({2, 3}, DType::f64);
  auto f = Tensor::full({4}, 2.5);
  EXPECT_EQ(z.to_vector<float>(), std::vector<float>(6, 0.0f));
  EXPECT_EQ(o.to_vector<double>(), std::vector<double>(6, 1.0));
  EXPECT_EQ(f.to_vector<float>(), std::vector<float>(4, 2.5f));
  EXPECT_EQ(z.str(), "f32[2, 3] cpu");
  EXPECT_EQ(o.nbytes(), 48);
  auto i = Tensor::full({3}, 7, DType::i64);
  EXPECT_EQ(i.to_vector<int64_t>(), (std::vector<int64_t>{7, 7, 7}));
}

TEST(Tensor, RandnIsSeededAndInRowMajorOrder) {
  Generator g1(5), g2(5);
  auto a = Tensor::randn({3, 4}, g1);
  auto b = Tensor::randn({3, 4}, g2);
  EXPECT_EQ(a.to_vector<float>(), b.to_vector<float>());
  Generator g3(5);
  EXPECT_EQ(a.to_vector<float>()[0], static_cast<float>(g3.normal()));
  auto u = Tensor::uniform({1000}, g1, -2, 3);
  for (float v : u.to_vector<float>()) {
    EXPECT_GE(v, -2.0f);
    EXPECT_LT(v, 3.0f);
  }
}

TEST(Tensor, FromDataToVectorRoundTripAndChecks) {
  std::vector<float> v{1, 2, 3, 4, 5, 6};
  auto t = Tensor::from_data<float>({2, 3}, v);
  EXPECT_EQ(t.to_vector<float>(), v);
  EXPECT_EQ(t.dtype(), DType::f32);
  expect_error([&] { Tensor::from_data<float>({4}, v); }, {"from_data", "6 values", "[4]"});
  expect_error([&] { t.to_vector<double>(); }, {"to_vector", "f32[2, 3] cpu", "f64"});
  expect_error([&] { t.data<int64_t>(); }, {"data", "i64"});
  EXPECT_EQ(Tensor::from_data<double>({}, std::vector<double>{3.5}).item(), 3.5);
  expect_error([&] { (void)t.item(); }, {"item", "6 elements"});
}

TEST(Tensor, ViewSharesStorageCloneDoesNot) {
  auto t = Tensor::from_data<float>({2, 3}, std::vector<float>{1, 2, 3, 4, 5, 6});
  auto v = t.view({3, 2});
  auto c = t.clone();
  t.data<float>()[0] = 42;
  EXPECT_EQ(v.to_vector<float>()[0], 42.0f);
  EXPECT_EQ(c.to_vector<float>()[0], 1.0f);
  EXPECT_EQ(v.shape(), Shape({3, 2}));
  expect_error([&] { t.view({4, 2}); }, {"view", "[4, 2]", "6 vs 8"});
}

TEST(Tensor, DtypeConversions) {
  auto t = Tensor::from_data<float>({3}, std::vector<float>{1.5f, -2.25f, 1.0f + 0x1.0p-10f});
  auto d = t.to(DType::f64);
  EXPECT_EQ(d.to_vector<double>(), (std::vector<double>{1.5, -2.25, 1.0 + 0x1.0p-10}));
  auto b = t.to(DType::bf16);
  EXPECT_EQ(b.nbytes(), 6);
  // bf16 keeps 8 mantissa bits: 1 + 2^-10 rounds to 1.
  EXPECT_EQ(b.to(DType::f32).to_vector<float>(), (std::vector<float>{1.5f, -2.25f, 1.0f}));
}

TEST(Tensor, UndefinedTensorUseIsAnError) {
  Tensor t;
  EXPECT_FALSE(t.defined());
  expect_error([&] { (void)t.shape(); }, {"undefined tensor"});
}

TEST(Tensor, RequiresGradOnlyForFloatingTensors) {
  auto i = Tensor::zeros({2}, DType::i64);
  expect_error([&] { i.set_requires_grad(true); }, {"set_requires_grad", "i64[2] cpu"});
  auto f = Tensor::zeros({2});
  EXPECT_TRUE(f.set_requires_grad(true).requires_grad());
  EXPECT_TRUE(f.is_leaf());
}

TEST(Device, ParseAndBuildInfo) {
  EXPECT_EQ(Device::parse("cpu"), Device::cpu());
  EXPECT_EQ(Device::parse("cuda"), Device::cuda(0));
  EXPECT_EQ(Device::parse("cuda:1"), Device::cuda(1));
  expect_error([] { Device::parse("gpu"); }, {"device", "'gpu'"});
  expect_error([] { Device::parse("cuda:x"); }, {"device", "'cuda:x'"});
  if (!cuda_built()) {
    EXPECT_EQ(cuda_device_count(), 0);
    expect_error([] { Tensor::zeros({2}, DType::f32, Device::cuda()); }, {"no CUDA backend"});
    expect_error([] { cuda::memory_stats(Device::cuda()); }, {"memory_stats", "no CUDA backend"});
    expect_error([] { cuda::current_stream(); }, {"current_stream", "no CUDA backend"});
  }
}

TEST(Device, CudaRoundTrip) {
  if (cuda_device_count() == 0)
    GTEST_SKIP() << "no CUDA device visible (built with CUDA: " << (cuda_built() ? "yes" : "no") << ")";
  Generator g(3);
  auto h = Tensor::randn({5, 7, 3}, g);
  auto d = h.to(Device::cuda());
  EXPECT_TRUE(d.device().is_cuda());
  EXPECT_EQ(d.to(Device::cpu()).to_vector<float>(), h.to_vector<float>());
  auto z = Tensor::zeros({9}, DType::f64, Device::cuda());
  EXPECT_EQ(z.to_vector<double>(), std::vector<double>(9, 0.0));
  auto f = Tensor::full({4}, -1.5, DType::f32, Device::cuda());
  EXPECT_EQ(f.to_vector<float>(), std::vector<float>(4, -1.5f));
  // full on a device is filled there (cuda_fill, one kernel per element size): every dtype
  // gives the bytes of the host's full, for an odd count.
  for (DType t : {DType::u8, DType::bf16, DType::f16, DType::f32, DType::i32, DType::f64, DType::i64}) {
    const Tensor on_device = Tensor::full({3, 1001}, 7.0 - 0.375 * (t != DType::u8 && t != DType::i32 && t != DType::i64), t,
                                          Device::cuda()).to(Device::cpu());
    const Tensor on_host = Tensor::full({3, 1001}, 7.0 - 0.375 * (t != DType::u8 && t != DType::i32 && t != DType::i64), t);
    ASSERT_EQ(on_device.nbytes(), on_host.nbytes());
    EXPECT_EQ(std::memcmp(on_device.raw_data(), on_host.raw_data(), static_cast<size_t>(on_host.nbytes())), 0)
        << dtype_name(t);
  }
}

TEST(Float16, KnownValuesAndRounding) {
  EXPECT_EQ(f16(1.0f).bits, 0x3c00);
  EXPECT_EQ(f16(-2.0f).bits, 0xc000);
  EXPECT_EQ(f16(65504.0f).bits, 0x7bff);            // the largest finite half
  EXPECT_EQ(f16(65519.0f).bits, 0x7bff);            // below the midpoint to 65536: rounds down
  EXPECT_EQ(f16(65520.0f).bits, 0x7c00);            // the midpoint ties to even: infinity
  EXPECT_EQ(f16(0x1.0p-14f).bits, 0x0400);          // the smallest normal
  EXPECT_EQ(f16(0x1.0p-24f).bits, 0x0001);          // the smallest subnormal
  EXPECT_EQ(f16(0x1.0p-25f).bits, 0x0000);          // half of it: ties to even (0)
  EXPECT_EQ(f16(3 * 0x1.0p-25f).bits, 0x0002);      // 1.5 ulp: ties to even (2)
  EXPECT_EQ(f16(1.0f + 0x1.0p-11f).bits, 0x3c00);   // tie between 1 and 1 + 2^-10: even
  EXPECT_EQ(f16(1.0f + 3 * 0x1.0p-11f).bits, 0x3c02);
  EXPECT_EQ(f16(0.1f).bits, 0x2e66);
  EXPECT_EQ(static_cast<float>(f16(0.1f)), 0.0999755859375f);
  EXPECT_TRUE(std::isnan(static_cast<float>(f16(std::nanf("")))));
  EXPECT_EQ(f16(-INFINITY).bits, 0xfc00);
}

TEST(Float16, EveryHalfRoundTripsThroughFloat) {
  // float holds every half exactly, so half -> float -> half is the identity (NaNs stay NaN).
  for (uint32_t b = 0; b < 0x10000; ++b) {
    f16 h;
    h.bits = static_cast<uint16_t>(b);
    const float f = static_cast<float>(h);
    if (std::isnan(f)) {
      EXPECT_EQ(b & 0x7c00u, 0x7c00u);
      continue;
    }
    ASSERT_EQ(f16(f).bits, b) << "bits 0x" << std::hex << b << " float " << f;
  }
  // Spot-check the decoding against the definition: (-1)^s 2^(e-15) (1 + m/1024).
  f16 h;
  h.bits = 0x5a3c;  // s 0, e 22, m 0x23c = 572
  EXPECT_EQ(static_cast<float>(h), std::ldexp(1.0f + 572.0f / 1024.0f, 22 - 15));
}

TEST(Tensor, Float16Conversion) {
  auto t = Tensor::from_data<float>({3}, std::vector<float>{1.0f, 65504.0f, 0.1f});
  auto h = t.to(DType::f16);
  EXPECT_EQ(h.dtype(), DType::f16);
  EXPECT_EQ(h.nbytes(), 6);
  EXPECT_EQ(h.to(DType::f32).to_vector<float>(), (std::vector<float>{1.0f, 65504.0f, 0.0999755859375f}));
}
