// Shared by the tests of data-parallel gradient averaging on CPU ranks (test_dist_cpu_grad.cpp,
// the MPI backend) and CUDA ranks (test_cuda_nccl.cpp, the NCCL backend): parameters, each rank's
// known gradients, the exact expected averages, and the hook driven in an odd order.
//
// The gradients are multiples of 1/8 below 100 in magnitude, so every sum over a few ranks is
// exact in f32 whatever its order, and the expectation, (sum over ranks) * (1.0f / W), is
// computed here on the host from the formula, independently of either backend.
#pragma once

#include <gtest/gtest.h>

#include <cstdint>
#include <cstring>
#include <functional>
#include <string>
#include <vector>

#include "models/convnext.h"
#include "tensor/tensor.h"
#include "train/dist/communicator.h"
#include "train/dist/grad_reducer.h"

namespace cnx::test {

inline std::vector<uint32_t> float_bits(const std::vector<float>& v) {
  std::vector<uint32_t> out(v.size());
  std::memcpy(out.data(), v.data(), v.size() * sizeof(float));
  return out;
}

// Rank r's gradient of parameter i at step s, element j.
inline float rank_grad_value(int r, size_t i, int s, int64_t j) {
  const int64_t k = (j * 7 + static_cast<int64_t>(i) * 3 + s) % 17 - 8;
  return static_cast<float>(k) * 0.125f * static_cast<float>(r + 1) + 0.5f * static_cast<float>(r) -
         static_cast<float>(s);
}

// What every rank must hold after the reduction: the exact sum, times 1.0f / W (one rounding).
inline std::vector<float> expected_grad_average(size_t i, int s, int64_t n, int world_size) {
  const float inv = 1.0f / static_cast<float>(world_size);
  std::vector<float> out(static_cast<size_t>(n));
  for (int64_t j = 0; j < n; ++j) {
    float sum = 0.0f;
    for (int r = 0; r < world_size; ++r) sum += rank_grad_value(r, i, s, j);
    out[static_cast<size_t>(j)] = sum * inv;
  }
  return out;
}

// Nine parameters of assorted sizes (odd ones, a single element, ...), in model order. With
// kDistTestBucketBytes the reducer cuts them into five buckets, some of one gradient, some of two.
constexpr size_t kDistTestBucketBytes = 64;
constexpr size_t kDistTestBuckets = 5;
inline std::vector<Parameter> make_dist_test_params(Device device) {
  const std::vector<Shape> shapes = {{3}, {5, 2}, {17}, {1}, {4, 3, 2}, {40}, {2}, {33}, {6}};
  std::vector<Parameter> params;
  for (size_t i = 0; i < shapes.size(); ++i) {
    Parameter p;
    p.name = "p";  // (not "p" + to_string: g++ 12 warns falsely, -Wrestrict)
    p.name += std::to_string(i);
    p.official_shape = shapes[i];
    p.value = Tensor::zeros(shapes[i], DType::f32, device);
    params.push_back(std::move(p));
  }
  return params;
}

// Rank `rank`'s gradients of step s (on a CUDA device: copies queued on its stream).
inline void set_rank_grads(std::vector<Parameter>& params, int rank, int s) {
  for (size_t i = 0; i < params.size(); ++i) {
    const int64_t n = params[i].value.numel();
    std::vector<float> v(static_cast<size_t>(n));
    for (int64_t j = 0; j < n; ++j) v[static_cast<size_t>(j)] = rank_grad_value(rank, i, s, j);
    params[i].value.set_grad(Tensor::from_data<float>(params[i].value.shape(), v).to(params[i].value.device()));
  }
}

inline void expect_grads_averaged(const std::vector<Parameter>& params, int s, const dist::Communicator& comm) {
  for (size_t i = 0; i < params.size(); ++i) {
    const std::vector<float> want = expected_grad_average(i, s, params[i].value.numel(), comm.size());
    EXPECT_EQ(float_bits(params[i].value.grad().to_vector<float>()), float_bits(want))
        << params[i].name << " at step " << s << " on " << comm.describe();
  }
}

// Calls the reducer's hook for every parameter in an order unlike the backward's (the stem's
// gradient first) and checks after each call that exactly the longest prefix of complete buckets
// has started (buckets start in index order, each as soon as it can). after_each(prefix) adds the
// caller's checks (the CUDA test: how many collectives have run).
inline void hook_in_odd_order(dist::GradReducer& reducer, std::vector<Parameter>& params,
                              const std::function<void(size_t started)>& after_each = {}) {
  const std::vector<dist::Bucket>& buckets = reducer.buckets();
  std::vector<size_t> bucket_of(params.size());
  for (size_t k = 0; k < buckets.size(); ++k)
    for (const Parameter* p : buckets[k].params) bucket_of[static_cast<size_t>(p - params.data())] = k;
  std::vector<size_t> ready(buckets.size(), 0);
  const auto hook = reducer.hook();
  for (size_t i : {0u, 4u, 8u, 2u, 6u, 1u, 5u, 3u, 7u}) {
    hook(params[i].value.impl());
    ++ready[bucket_of[i]];
    size_t prefix = 0;
    while (prefix < buckets.size() && ready[prefix] == buckets[prefix].params.size()) ++prefix;
    for (size_t k = 0; k < buckets.size(); ++k)
      EXPECT_EQ(buckets[k].started, k < prefix) << "bucket " << k << " after the hook of " << params[i].name;
    if (after_each) after_each(prefix);
  }
}

}  // namespace cnx::test
