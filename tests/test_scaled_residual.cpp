// The fused end of a block, scaled_residual(x, h, gamma, scale) = x + drop_path(layer_scale(h)):
// against the unfused ops it replaces (bitwise in f32 on the CPU: the same roundings in the
// same order), against finite differences in f64, its treatment of dropped samples, and the GPU
// kernels against the CPU.
#include <gtest/gtest.h>

#include <cmath>
#include <limits>
#include <vector>

#include "autograd/ops.h"
#include "tests/cuda_testing.h"
#include "tests/testing.h"

namespace cnx {
namespace {

using test::expect_error;
using test::values;

struct Grads {
  std::vector<double> out, dx, dh, dgamma;
};

// Forward and backward of the fused op or of layer_scale -> drop_path -> add, with the loss
// sum(out * R). gamma_on / scale_on: with layer scale / drop path.
Grads run(bool fused, DType dt, Device dev, const Shape& s, bool gamma_on, bool scale_on,
          uint64_t seed) {
  const int64_t N = s[0], C = s[-1];
  Tensor x = test::randn(s, seed, dt).to(dev).set_requires_grad(true);
  Tensor h = test::randn(s, seed + 1, dt).to(dev).set_requires_grad(true);
  Tensor gamma;
  if (gamma_on) gamma = test::randn(Shape{C}, seed + 2, dt, 0.5).to(dev).set_requires_grad(true);
  Tensor scale;
  if (scale_on) {  // every other sample dropped, the others scaled by 1 / 0.7
    std::vector<double> v(static_cast<size_t>(N));
    for (int64_t n = 0; n < N; ++n) v[static_cast<size_t>(n)] = n % 2 ? 0.0 : 1.0 / 0.7;
    scale = test::make(Shape{N}, v, dt).to(dev);
  }
  Tensor out;
  if (fused) {
    out = scaled_residual(x, h, gamma, scale);
  } else {
    Tensor b = gamma_on ? layer_scale(h, gamma) : h;
    if (scale_on) b = drop_path(b, scale);
    out = add(x, b);
  }
  const Tensor R = test::randn(s, seed + 3, dt).to(dev);
  sum(mul(out, R)).backward();
  Grads g;
  g.out = values(out);
  g.dx = values(x.grad());
  g.dh = values(h.grad());
  if (gamma_on) g.dgamma = values(gamma.grad());
  return g;
}

const std::vector<Shape> kShapes = {{2, 7, 7, 96}, {3, 5, 5, 40}, {4, 3, 3, 7}, {2, 1, 1, 1}, {3, 5}};

TEST(ScaledResidual, BitwiseTheUnfusedOpsOnTheCpu) {
  for (DType dt : {DType::f32, DType::f64})
    for (const Shape& s : kShapes)
      for (bool gamma_on : {true, false})
        for (bool scale_on : {true, false}) {
          SCOPED_TRACE(test::tag("scaled_residual", s, dt) + (gamma_on ? " gamma" : "") +
                       (scale_on ? " scale" : ""));
          const Grads f = run(true, dt, Device::cpu(), s, gamma_on, scale_on, 10);
          const Grads u = run(false, dt, Device::cpu(), s, gamma_on, scale_on, 10);
          // == on doubles: a dropped sample's dh is +0 fused and (dout * 0) * gamma = -0 or +0
          // unfused, which compare equal, as they should.
          EXPECT_EQ(f.out, u.out);
          EXPECT_EQ(f.dx, u.dx);
          EXPECT_EQ(f.dh, u.dh);
          EXPECT_EQ(f.dgamma, u.dgamma);
        }
}

TEST(ScaledResidual, GradientsMatchFiniteDifferences) {
  for (bool scale_on : {true, false}) {
    const Shape s{3, 2, 2, 5};
    Tensor scale;
    if (scale_on) scale = test::make(Shape{3}, {1.0 / 0.6, 0.0, 1.0 / 0.6}, DType::f64);
    test::expect_gradients_match(
        std::string("scaled_residual") + (scale_on ? " with drop path" : ""),
        [&](const std::vector<Tensor>& t) { return scaled_residual(t[0], t[1], t[2], scale); },
        {test::leaf(s, 1), test::leaf(s, 2), test::leaf(Shape{5}, 3)});
  }
}

TEST(ScaledResidual, ADroppedSampleIsXAndItsBranchIsNotRead) {
  // Sample 1 is dropped and its branch holds NaN: the output there is x, its dh is 0 and dgamma
  // stays finite (the unfused ops would pass the NaN on: NaN * 0 = NaN).
  const double nan = std::numeric_limits<double>::quiet_NaN();
  Tensor x = test::make({2, 3}, {1, 2, 3, 4, 5, 6}, DType::f32).set_requires_grad(true);
  Tensor h = test::make({2, 3}, {1, 1, 1, nan, nan, nan}, DType::f32).set_requires_grad(true);
  Tensor gamma = test::make({3}, {0.5, 2, -1}, DType::f32).set_requires_grad(true);
  const Tensor scale = test::make({2}, {2.0, 0.0}, DType::f32);
  const Tensor out = scaled_residual(x, h, gamma, scale);
  EXPECT_EQ(values(out), (std::vector<double>{2, 6, 1, 4, 5, 6}));
  sum(out).backward();
  EXPECT_EQ(values(x.grad()), (std::vector<double>{1, 1, 1, 1, 1, 1}));
  EXPECT_EQ(values(h.grad()), (std::vector<double>{1, 4, -2, 0, 0, 0}));
  EXPECT_EQ(values(gamma.grad()), (std::vector<double>{2, 2, 2}));
}

TEST(ScaledResidual, OnlyRequestedGradientsAndClearErrors) {
  Tensor x = test::randn({2, 4, 8}, 1, DType::f32);
  Tensor h = test::randn({2, 4, 8}, 2, DType::f32).set_requires_grad(true);
  Tensor gamma = test::randn({8}, 3, DType::f32);  // frozen
  sum(scaled_residual(x, h, gamma, Tensor())).backward();
  EXPECT_TRUE(h.grad().defined());
  EXPECT_FALSE(x.grad().defined());
  EXPECT_FALSE(gamma.grad().defined());

  expect_error([&] { scaled_residual(x, test::randn({2, 4, 7}, 2, DType::f32), Tensor(), Tensor()); },
               {"scaled_residual", "differ in shape"});
  expect_error([&] { scaled_residual(x, h, test::randn({7}, 3, DType::f32), Tensor()); },
               {"scaled_residual", "gamma", "the channels of x"});
  expect_error([&] { scaled_residual(x, h, Tensor(), test::randn({3}, 3, DType::f32)); },
               {"scaled_residual", "scale", "one per sample"});
  const Tensor xb = x.to(DType::bf16), hb = h.detach().to(DType::bf16);
  expect_error([&] { scaled_residual(xb, hb, gamma.to(DType::bf16), Tensor()); },
               {"scaled_residual", "gamma", "must be f32"});
}

// ---- GPU ------------------------------------------------------------------------------------

TEST(CudaScaledResidual, MatchesTheCpu) {
#if CNX_TEST_CUDA
  CNX_SKIP_WITHOUT_DEVICE();
  const Device gpu = Device::cuda(0);
  const std::vector<Shape> shapes = {{2, 56, 56, 96}, {4, 7, 7, 768}, {3, 5, 5, 40}, {4, 3, 3, 7}};
  for (const Shape& s : shapes)
    for (bool gamma_on : {true, false})
      for (bool scale_on : {true, false}) {
        SCOPED_TRACE(s.str() + (gamma_on ? " gamma" : "") + (scale_on ? " scale" : ""));
        const Grads c = run(true, DType::f32, Device::cpu(), s, gamma_on, scale_on, 20);
        const Grads g = run(true, DType::f32, gpu, s, gamma_on, scale_on, 20);
        // The same float products in the same order: bitwise.
        EXPECT_EQ(g.out, c.out);
        EXPECT_EQ(g.dx, c.dx);
        EXPECT_EQ(g.dh, c.dh);
        // dgamma: sums in another order.
        double mag = 0;
        for (double v : c.dgamma) mag = std::max(mag, std::abs(v));
        test::expect_close("dgamma", g.dgamma, c.dgamma, 1e-5 * mag, 1e-5);
      }
#else
  CNX_SKIP_BUILT_WITHOUT_CUDA();
#endif
}

}  // namespace
}  // namespace cnx
