// The CPU reference gives bitwise the same results whatever the number of OpenMP threads:
// every output element (and every parameter-gradient element) is summed by one thread in a
// fixed order. Training reproducibility (same seed, same losses) rests on this.
#include <gtest/gtest.h>
#include <omp.h>

#include "autograd/ops.h"
#include "tests/testing.h"

using namespace cnx;

namespace {

// Forward and backward of a small ConvNeXt-like network; returns the loss and every gradient.
std::vector<std::vector<float>> run_network(int threads) {
  omp_set_num_threads(threads);
  Generator g(99);
  auto p = [&](const Shape& s, double mean, double std) {
    return Tensor::randn(s, g, DType::f32, Device::cpu(), mean, std).set_requires_grad(true);
  };
  Tensor x = Tensor::randn({3, 13, 11, 3}, g);
  Tensor stem_w = p({16, 2, 2, 3}, 0, 0.3), stem_b = p({16}, 0, 0.1);
  Tensor dw_w = p({7, 7, 16}, 0, 0.2), dw_b = p({16}, 0, 0.1);
  Tensor ln_w = p({16}, 1, 0.1), ln_b = p({16}, 0, 0.1);
  Tensor w1 = p({64, 16}, 0, 0.2), b1 = p({64}, 0, 0.1);
  Tensor w2 = p({16, 64}, 0, 0.2), b2 = p({16}, 0, 0.1);
  Tensor gamma = p({16}, 1, 0.1), head_w = p({5, 16}, 0, 0.2), head_b = p({5}, 0, 0.1);
  Tensor labels = Tensor::from_data<int64_t>({3}, std::vector<int64_t>{4, 0, 2});

  Tensor h = patchify_conv(x, stem_w, stem_b);  // (3, 6, 5, 16)
  Tensor r = dwconv(h, dw_w, dw_b);
  r = layer_norm(r, ln_w, ln_b, 1e-6);
  r = linear(gelu(linear(r, w1, b1)), w2, b2);
  r = drop_path(layer_scale(r, gamma), 0.3, true, g);
  h = add(h, r);
  Tensor logits = linear(global_avg_pool(h), head_w, head_b);
  Tensor loss = cross_entropy(logits, labels, 0.1);
  loss.backward();

  std::vector<std::vector<float>> out{loss.to_vector<float>()};
  for (const Tensor& t : {stem_w, stem_b, dw_w, dw_b, ln_w, ln_b, w1, b1, w2, b2, gamma, head_w, head_b})
    out.push_back(t.grad().to_vector<float>());
  return out;
}

}  // namespace

TEST(Determinism, SameBitsWithOneTwoAndFiveThreads) {
  const int saved = omp_get_max_threads();
  const auto one = run_network(1);
  const auto two = run_network(2);
  const auto five = run_network(5);
  omp_set_num_threads(saved);
  ASSERT_EQ(one.size(), two.size());
  for (size_t i = 0; i < one.size(); ++i) {
    EXPECT_EQ(one[i], two[i]) << "tensor " << i << " differs between 1 and 2 threads";
    EXPECT_EQ(one[i], five[i]) << "tensor " << i << " differs between 1 and 5 threads";
  }
  EXPECT_GT(std::abs(one[0][0]), 0.0f);  // a real loss was computed
}
