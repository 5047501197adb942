// The CPU ranks' gradient averaging (train/dist/grad_reducer.cpp, the MPI backend) through
// GradReducer, with the same parameters, gradients and exact expectations as the CUDA ranks' test
// (tests/dist_testing.h, tests/test_cuda_nccl.cpp): both backends must give every rank
// (sum over ranks) * (1.0f / W), bitwise.
//
// Run as it is, the binary is a world of one; ctest also runs it under mpirun with 2 ranks
// (tests/CMakeLists.txt, DistCpuGrad.two_ranks_mpirun) in every build with MPI. Every rank runs
// the same tests in the same order; a failed check is an EXPECT, never an early return before a
// collective.
#include <gtest/gtest.h>

#include <vector>

#include "tests/dist_testing.h"
#include "train/dist/communicator.h"
#include "train/dist/grad_reducer.h"

using namespace cnx;
using dist::Communicator;

namespace {

TEST(DistCpuGrad, GradReducerAveragesEveryBucketOverTheRanks) {
  Communicator& world = Communicator::world();
  std::vector<Parameter> params = test::make_dist_test_params(Device::cpu());
  dist::GradReducer reducer(world, params, Device::cpu(), test::kDistTestBucketBytes);
  ASSERT_EQ(reducer.buckets().size(), test::kDistTestBuckets) << reducer.describe();
  // Step 0 through the hook, in an odd order; step 1 (the same buffers) by finish() alone.
  test::set_rank_grads(params, world.rank(), 0);
  test::hook_in_odd_order(reducer, params);
  reducer.finish();
  test::expect_grads_averaged(params, 0, world);
  test::set_rank_grads(params, world.rank(), 1);
  reducer.finish();
  for (const dist::Bucket& b : reducer.buckets()) EXPECT_FALSE(b.started);
  test::expect_grads_averaged(params, 1, world);
}

TEST(DistCpuGrad, AverageOfALossIsTheMeanOverTheRanks) {
  Communicator& world = Communicator::world();
  std::vector<Parameter> params = test::make_dist_test_params(Device::cpu());
  dist::GradReducer reducer(world, params, Device::cpu());
  Tensor loss = Tensor::full(Shape{}, 0.75 * (world.rank() + 1));
  reducer.average(loss);
  float sum = 0.0f;
  for (int q = 0; q < world.size(); ++q) sum += 0.75f * static_cast<float>(q + 1);
  EXPECT_EQ(test::float_bits(loss.to_vector<float>()), test::float_bits({sum * (1.0f / static_cast<float>(world.size()))}));
}

}  // namespace
