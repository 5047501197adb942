// The CUDA ranks' gradient averaging (train/dist/nccl_backend.cpp) through GradReducer, and the
// emulated device's NCCL (kernels/cuda/emulator/nccl.cpp).
//
// Run as it is, the binary is a world of one (every average is the rank's own value times 1.0f);
// ctest also runs it under mpirun with 2 ranks on the emulated device (tests/CMakeLists.txt,
// CudaNccl.two_ranks_mpirun), where each rank has its own emulated GPU and the averages are
// real. Every rank runs the same tests in the same order, so their collectives match; a check
// that fails is an EXPECT, never an early return before a collective.
//
// What must hold, and how each test could fail:
//  - every gradient becomes (sum over ranks) * (1.0f / W), bitwise, the CPU ranks' formula, with
//    values chosen so that every sum is exact and the expectation is computed here, on the host,
//    from the rank-dependent formula (a bucket unpacked into the wrong gradient, a lost tail, the
//    pack racing ahead of the compute stream's copies (on the emulated device the gradients'
//    memory would still hold its 0xFF fill: NaN), a scale applied twice or not at all);
//  - buckets start in index order whatever order the gradients arrive in, each as soon as it and
//    every bucket before it is complete, and (emulated device) its allreduce runs right then,
//    during the backward, not at finish();
//  - the host never waits: no synchronisation, blocking copy or free from the first hook to the
//    end of finish(), nor in average() (emulated device: its counters);
//  - a second step reuses the buffers, and finish() without any hook (a backward run without it)
//    starts every bucket itself; a reducer destroyed between its starts and finish() closes
//    cleanly, and a new one (a new communicator) works;
//  - the emulated NCCL: sum, avg (NCCL's pre-multiplied form), max, f32, bf16, int64; a buffer that
//    is not device memory, a null communicator and a capturing stream are refused; the collective
//    sees the work queued before it on its stream.
//
// Every test skips, saying why, when the library was built without CUDA or NCCL, or no device is
// visible.
#include <gtest/gtest.h>

#include <algorithm>
#include <bit>
#include <cstdint>
#include <cstring>
#include <string>
#include <vector>

#include "tests/cuda_testing.h"
#include "tests/dist_testing.h"
#include "train/dist/communicator.h"
#include "train/dist/grad_reducer.h"

#if CNX_TEST_CUDA
#include "tensor/cuda_context.h"
#endif
#if defined(CNX_CUDA_EMULATOR) && CNX_CUDA_EMULATOR
#include "kernels/cuda/emulator/emulator.h"
#if defined(CNX_TEST_NCCL) && CNX_TEST_NCCL
#include <nccl.h>
#define CNX_TEST_EMULATED_NCCL 1
#endif
#endif
#ifndef CNX_TEST_EMULATED_NCCL
#define CNX_TEST_EMULATED_NCCL 0
#endif

using namespace cnx;
using dist::Communicator;

namespace {

#if CNX_TEST_CUDA
#define CNX_SKIP_WITHOUT_NCCL()                                                                  \
  do {                                                                                          \
    if (!dist::built_with_nccl())                                                               \
      GTEST_SKIP() << "built without NCCL (CNX_HAVE_NCCL unset: no libnccl, or an emulator "    \
                      "build without MPI): make_nccl_backend refuses";                          \
  } while (0)

Communicator& world() { return Communicator::world(); }

// Each process drives its own GPU (on the emulated device: its own emulated GPU, cuda:0).
Device rank_device() { return Device::cuda(world().local_rank() % cuda_device_count()); }

using test::float_bits;

#if defined(CNX_CUDA_EMULATOR) && CNX_CUDA_EMULATOR
uint64_t collectives() { return emu::host_sync_counts().collectives; }
uint64_t host_waits() { return emu::host_sync_counts().total_blocking(); }
#endif
#endif  // CNX_TEST_CUDA

TEST(CudaNccl, GradReducerAveragesEveryBucketOverTheRanks) {
#if CNX_TEST_CUDA
  CNX_SKIP_WITHOUT_DEVICE();
  CNX_SKIP_WITHOUT_NCCL();
  const Device device = rank_device();
  const cuda::DeviceGuard guard(device);
  std::vector<Parameter> params = test::make_dist_test_params(device);
  dist::GradReducer reducer(world(), params, device, test::kDistTestBucketBytes);
  const std::vector<dist::Bucket>& buckets = reducer.buckets();
  ASSERT_EQ(buckets.size(), test::kDistTestBuckets) << reducer.describe();

  // Step 0: the hook, in an order unlike the backward's.
  test::set_rank_grads(params, world().rank(), 0);
#if defined(CNX_CUDA_EMULATOR) && CNX_CUDA_EMULATOR
  emu::reset_host_sync_counts();
  test::hook_in_odd_order(reducer, params, [](size_t started) {
    EXPECT_EQ(collectives(), started) << "each started bucket's allreduce runs at its start, in the backward";
  });
#else
  test::hook_in_odd_order(reducer, params);
#endif
  reducer.finish();
#if defined(CNX_CUDA_EMULATOR) && CNX_CUDA_EMULATOR
  EXPECT_EQ(host_waits(), 0u) << "the hooks and finish() made the host wait for the device";
  EXPECT_EQ(collectives(), buckets.size());
#endif
  test::expect_grads_averaged(params, 0, world());

  // Step 1: the same buffers, and finish() alone starts every bucket.
  test::set_rank_grads(params, world().rank(), 1);
#if defined(CNX_CUDA_EMULATOR) && CNX_CUDA_EMULATOR
  emu::reset_host_sync_counts();
#endif
  reducer.finish();
#if defined(CNX_CUDA_EMULATOR) && CNX_CUDA_EMULATOR
  EXPECT_EQ(host_waits(), 0u);
  EXPECT_EQ(collectives(), buckets.size());
#endif
  for (const dist::Bucket& b : buckets) EXPECT_FALSE(b.started) << "finish() leaves every bucket ready for the next step";
  test::expect_grads_averaged(params, 1, world());
#else
  CNX_SKIP_BUILT_WITHOUT_CUDA();
#endif
}

TEST(CudaNccl, AverageOfALossIsTheMeanOverTheRanks) {
#if CNX_TEST_CUDA
  CNX_SKIP_WITHOUT_DEVICE();
  CNX_SKIP_WITHOUT_NCCL();
  const Device device = rank_device();
  const cuda::DeviceGuard guard(device);
  std::vector<Parameter> params = test::make_dist_test_params(device);
  dist::GradReducer reducer(world(), params, device);
  const int W = world().size(), r = world().rank();
  const float inv = 1.0f / static_cast<float>(W);
  // A scalar loss, then three values (sums exact: multiples of 1/4).
  Tensor loss = Tensor::full(Shape{}, 0.75 * (r + 1), DType::f32, device);
  Tensor three = Tensor::from_data<float>(Shape{3}, std::vector<float>{1.25f * r, -2.0f, 3.5f + r}).to(device);
#if defined(CNX_CUDA_EMULATOR) && CNX_CUDA_EMULATOR
  emu::reset_host_sync_counts();
#endif
  reducer.average(loss);
  reducer.average(three);
#if defined(CNX_CUDA_EMULATOR) && CNX_CUDA_EMULATOR
  EXPECT_EQ(host_waits(), 0u) << "average() made the host wait";
#endif
  float loss_sum = 0.0f, a = 0.0f, b = 0.0f, c = 0.0f;
  for (int q = 0; q < W; ++q) {
    loss_sum += 0.75f * static_cast<float>(q + 1);
    a += 1.25f * static_cast<float>(q);
    b += -2.0f;
    c += 3.5f + static_cast<float>(q);
  }
  EXPECT_EQ(std::bit_cast<uint32_t>(loss.to_vector<float>()[0]), std::bit_cast<uint32_t>(loss_sum * inv));
  EXPECT_EQ(float_bits(three.to_vector<float>()), float_bits({a * inv, b * inv, c * inv}));
  // Wrong input: one line, no collective started (every rank refuses alike).
  Tensor cpu = Tensor::zeros(Shape{1});
  EXPECT_THROW(reducer.average(cpu), Error);
#else
  CNX_SKIP_BUILT_WITHOUT_CUDA();
#endif
}

TEST(CudaNccl, AStepAbandonedBeforeFinishClosesAndANewReducerWorks) {
#if CNX_TEST_CUDA
  CNX_SKIP_WITHOUT_DEVICE();
  CNX_SKIP_WITHOUT_NCCL();
  const Device device = rank_device();
  const cuda::DeviceGuard guard(device);
  std::vector<Parameter> params = test::make_dist_test_params(device);
  {
    // Every bucket started (its collective queued), then an exception would leave the step: the
    // destructor waits for the communication stream, then frees the buffers and the communicator.
    dist::GradReducer reducer(world(), params, device, test::kDistTestBucketBytes);
    test::set_rank_grads(params, world().rank(), 2);
    test::hook_in_odd_order(reducer, params);
  }
  dist::GradReducer reducer(world(), params, device, test::kDistTestBucketBytes);
  test::set_rank_grads(params, world().rank(), 3);
  reducer.finish();
  test::expect_grads_averaged(params, 3, world());
#else
  CNX_SKIP_BUILT_WITHOUT_CUDA();
#endif
}

// ---- the emulated NCCL itself -------------------------------------------------------------------

#if CNX_TEST_EMULATED_NCCL
// A communicator of every rank, as the backend makes it.
ncclComm_t make_comm() {
  ncclUniqueId id{};
  if (world().is_root()) {
    EXPECT_EQ(ncclGetUniqueId(&id), ncclSuccess);
  }
  world().broadcast(std::as_writable_bytes(std::span<ncclUniqueId>(&id, 1)), 0);
  ncclComm_t comm = nullptr;
  EXPECT_EQ(ncclCommInitRank(&comm, world().size(), id, world().rank()), ncclSuccess);
  return comm;
}

template <class T> T* device_copy(const std::vector<T>& v, cudaStream_t s) {
  void* p = nullptr;
  CNX_CUDA_CHECK(cudaMalloc(&p, v.size() * sizeof(T)));
  CNX_CUDA_CHECK(cudaMemcpyAsync(p, v.data(), v.size() * sizeof(T), cudaMemcpyHostToDevice, s));
  return static_cast<T*>(p);
}
template <class T> std::vector<T> host_copy(const T* p, size_t n) {
  std::vector<T> v(n);
  CNX_CUDA_CHECK(cudaMemcpy(v.data(), p, n * sizeof(T), cudaMemcpyDeviceToHost));
  return v;
}
uint16_t bf16_bits(float f) { return static_cast<uint16_t>(std::bit_cast<uint32_t>(f) >> 16); }  // exact values only
#endif

TEST(EmulatedNccl, AllReduceSumsAveragesAndTakesTheMaxInStreamOrder) {
#if CNX_TEST_EMULATED_NCCL
  const int W = world().size(), r = world().rank();
  ncclComm_t comm = make_comm();
  ASSERT_NE(comm, nullptr);
  cudaStream_t s = nullptr;
  CNX_CUDA_CHECK(cudaStreamCreateWithFlags(&s, cudaStreamNonBlocking));
  // The copies are queued on s, not run: the allreduce must run them first.
  const std::vector<float> mine = {0.3f * (r + 1), -1.0f, 1e-3f * r, 7.0f};
  float* f = device_copy(mine, s);
  float* avg = device_copy(mine, s);
  float* max = device_copy(mine, s);
  const std::vector<int64_t> ints = {int64_t{1} << 40, r, -3};
  int64_t* i64 = device_copy(ints, s);
  const std::vector<uint16_t> halves = {bf16_bits(1.5f * (r + 1)), bf16_bits(-0.25f)};
  uint16_t* bf = device_copy(halves, s);
  float* out = nullptr;
  CNX_CUDA_CHECK(cudaMalloc(&out, mine.size() * sizeof(float)));
  EXPECT_EQ(ncclAllReduce(f, out, mine.size(), ncclFloat32, ncclSum, comm, s), ncclSuccess);  // out of place
  EXPECT_EQ(ncclAllReduce(avg, avg, mine.size(), ncclFloat32, ncclAvg, comm, s), ncclSuccess);
  EXPECT_EQ(ncclAllReduce(max, max, mine.size(), ncclFloat32, ncclMax, comm, s), ncclSuccess);
  EXPECT_EQ(ncclAllReduce(i64, i64, ints.size(), ncclInt64, ncclSum, comm, s), ncclSuccess);
  EXPECT_EQ(ncclAllReduce(bf, bf, halves.size(), ncclBfloat16, ncclSum, comm, s), ncclSuccess);
  // The expectations, in rank order (MPI's order for two ranks; exact or commutative here).
  std::vector<float> sum(mine.size(), 0.0f), pre(mine.size(), 0.0f), most(mine.size());
  int64_t rank_sum = 0;
  float bf_sum = 0.0f;
  for (int q = 0; q < W; ++q) {
    const std::vector<float> theirs = {0.3f * (q + 1), -1.0f, 1e-3f * q, 7.0f};
    for (size_t j = 0; j < mine.size(); ++j) {
      sum[j] += theirs[j];
      pre[j] += theirs[j] * static_cast<float>(1.0 / W);  // NCCL's ncclAvg on floats
      most[j] = q == 0 ? theirs[j] : std::max(most[j], theirs[j]);
    }
    rank_sum += q;
    bf_sum += 1.5f * (q + 1);
  }
  EXPECT_EQ(float_bits(host_copy(out, mine.size())), float_bits(sum));
  EXPECT_EQ(float_bits(host_copy(f, mine.size())), float_bits(mine)) << "out of place: the send buffer is left alone";
  EXPECT_EQ(float_bits(host_copy(avg, mine.size())), float_bits(pre));
  EXPECT_EQ(float_bits(host_copy(max, mine.size())), float_bits(most));
  EXPECT_EQ(host_copy(i64, ints.size()), (std::vector<int64_t>{W * (int64_t{1} << 40), rank_sum, -3 * W}));
  EXPECT_EQ(host_copy(bf, halves.size()), (std::vector<uint16_t>{bf16_bits(bf_sum), bf16_bits(-0.25f * W)}));
  ncclResult_t async = ncclInternalError;
  EXPECT_EQ(ncclCommGetAsyncError(comm, &async), ncclSuccess);
  EXPECT_EQ(async, ncclSuccess);
  for (void* p : {static_cast<void*>(f), static_cast<void*>(avg), static_cast<void*>(max), static_cast<void*>(i64),
                  static_cast<void*>(bf), static_cast<void*>(out)})
    CNX_CUDA_CHECK(cudaFree(p));
  CNX_CUDA_CHECK(cudaStreamDestroy(s));
  EXPECT_EQ(ncclCommDestroy(comm), ncclSuccess);
#else
  GTEST_SKIP() << "tests the emulated device's NCCL (CNX_CUDA_EMULATOR builds with MPI)";
#endif
}

TEST(EmulatedNccl, RefusesHostMemoryANullCommunicatorAndACapturingStream) {
#if CNX_TEST_EMULATED_NCCL
  ncclComm_t comm = make_comm();
  ASSERT_NE(comm, nullptr);
  std::vector<float> host(4, 1.0f);
  float* dev = nullptr;
  CNX_CUDA_CHECK(cudaMalloc(&dev, 4 * sizeof(float)));
  EXPECT_EQ(ncclAllReduce(host.data(), host.data(), 4, ncclFloat32, ncclSum, comm, nullptr), ncclInvalidArgument);
  EXPECT_EQ(ncclAllReduce(dev, dev, 5, ncclFloat32, ncclSum, comm, nullptr), ncclInvalidArgument) << "past the end";
  EXPECT_EQ(ncclAllReduce(dev, dev, 4, ncclFloat32, ncclSum, nullptr, nullptr), ncclInvalidArgument);
  EXPECT_EQ(ncclAllReduce(dev, dev, 4, ncclFloat16, ncclSum, comm, nullptr), ncclInvalidArgument) << "not emulated";
  EXPECT_NE(std::string(ncclGetLastError(comm)), "");
  cudaStream_t s = nullptr;
  CNX_CUDA_CHECK(cudaStreamCreateWithFlags(&s, cudaStreamNonBlocking));
  CNX_CUDA_CHECK(cudaStreamBeginCapture(s, cudaStreamCaptureModeGlobal));
  EXPECT_EQ(ncclAllReduce(dev, dev, 4, ncclFloat32, ncclSum, comm, s), ncclUnhandledCudaError);
  cudaGraph_t graph = nullptr;
  EXPECT_EQ(cudaStreamEndCapture(s, &graph), cudaErrorStreamCaptureInvalidated);
  (void)cudaGetLastError();
  CNX_CUDA_CHECK(cudaStreamDestroy(s));
  CNX_CUDA_CHECK(cudaFree(dev));
  // A communicator whose size is not the job's.
  ncclUniqueId id{};
  ASSERT_EQ(ncclGetUniqueId(&id), ncclSuccess);
  ncclComm_t bad = nullptr;
  EXPECT_NE(ncclCommInitRank(&bad, world().size() + 1, id, world().rank()), ncclSuccess);
  EXPECT_EQ(bad, nullptr);
  EXPECT_EQ(ncclCommAbort(comm), ncclSuccess);
#else
  GTEST_SKIP() << "tests the emulated device's NCCL (CNX_CUDA_EMULATOR builds with MPI)";
#endif
}

}  // namespace
