// cuda::Graph (tensor/cuda_graph.h): capture the library's ops once, replay them with one launch.
//
// Every replay is compared bitwise with the same ops run eagerly on the same data: a replay runs
// the very kernels, with the very arguments, that the eager ops launch. Inputs are refilled in
// place between replays (copy_from outside the capture, same address), so a replay that reused
// stale data or skipped a kernel shows up as a mismatch. The memory tests compare device
// addresses: while a Graph lives, no eager allocation may get memory its replays write or read.
//
// Both modes of cuda_malloc are covered: the caching allocator's graph pools (the default), and
// CNX_CUDA_NO_CACHING=1 (the sanitizer suite, where each tensor is its own cudaMalloc and the
// frees around a capture are deferred; a replay that wrote freed memory would be reported by
// AddressSanitizer there). Where a check reads the caching allocator's counters, the no-caching
// mode checks the device's free memory instead (exact on the emulated device only).
//
// Every test skips, saying why, when the library was built without CUDA or no device is visible;
// this file compiles and links either way.
#include <gtest/gtest.h>

#include <cstdint>
#include <cstring>
#include <set>
#include <string>
#include <vector>

#include "autograd/ops.h"
#include "tensor/cuda_context.h"
#include "tensor/cuda_graph.h"
#include "tensor/error.h"
#include "tensor/generator.h"
#include "tensor/tensor.h"
#include "tests/testing.h"

#include "tests/cuda_testing.h"

#if CNX_TEST_CUDA
namespace {

using namespace cnx;
using namespace cnx::test;

const Device kDev = Device::cuda(0);
#if defined(CNX_CUDA_EMULATOR) && CNX_CUDA_EMULATOR
constexpr bool kEmulated = true;  // cudaMemGetInfo counts the bytes of every cudaMalloc exactly
#else
constexpr bool kEmulated = false;
#endif

std::vector<float> host(const Tensor& t) { return t.to_vector<float>(); }

// Bitwise equality, with the first differing element on failure.
void expect_bitwise(const std::string& what, const std::vector<float>& got, const std::vector<float>& want) {
  ASSERT_EQ(got.size(), want.size()) << what;
  for (size_t i = 0; i < got.size(); ++i)
    if (std::memcmp(&got[i], &want[i], sizeof(float)) != 0) {
      ADD_FAILURE() << what << ": element " << i << " is " << got[i] << ", want " << want[i];
      return;
    }
}

// New contents for a CUDA tensor, copied into its memory (outside any capture).
void refill(Tensor& t, Generator& gen) { t.copy_from(Tensor::randn(t.shape(), gen)); }

// The device bytes a tensor occupies.
struct Range {
  uintptr_t begin = 0, end = 0;
  bool overlaps(const Range& o) const { return begin < o.end && o.begin < end; }
};
Range range_of(const Tensor& t) {
  const auto p = reinterpret_cast<uintptr_t>(t.raw_data());
  return {p, p + static_cast<uintptr_t>(t.nbytes())};
}

// The device's free memory (cudaMemGetInfo): exact to the byte on the emulated device.
int64_t device_free_bytes() {
  size_t free = 0, total = 0;
  CNX_CUDA_CHECK(cudaMemGetInfo(&free, &total));
  return static_cast<int64_t>(free);
}

// After failed captures: every byte the captures allocated came back. With caching, the live
// tensors hold what they held before, and the graph pools are gone: their segments are ordinary
// cache, which empty_cache() returns to the driver (a pool's segments it would skip). The only
// live tensors are small ones, each its own segment, so nothing else stays reserved.
void expect_memory_returned(const AllocatorStats& before, int64_t free_before) {
  if (!cuda::caching_disabled()) {
    EXPECT_EQ(cuda::memory_stats(kDev).allocated_bytes, before.allocated_bytes);
    cuda::empty_cache(kDev);
    const AllocatorStats now = cuda::memory_stats(kDev);
    EXPECT_EQ(now.reserved_bytes, now.allocated_bytes) << "a graph pool outlived its failed capture";
  } else if (kEmulated) {
    EXPECT_EQ(device_free_bytes(), free_before) << "memory allocated or freed in a failed capture was not cudaFree'd";
  }
}

// A small block: LayerNorm, a linear through cuBLASLt with its bias, GELU, a gate (mul) and a
// residual (add). f32 throughout.
struct GatedMlp {
  Tensor x, ln_w, ln_b, w, b, gate;  // x (N, K); ln_w, ln_b (K); w (M, K); b (M); gate (N, M)
  Tensor run() const {
    const Tensor h = gelu(linear(layer_norm(x, ln_w, ln_b), w, b));
    return add(mul(h, gate), h);
  }
};

}  // namespace
#endif

TEST(CudaGraph, ReplaysOfLibraryOpsOnRefilledInputsEqualTheEagerOpsBitwise) {
#if CNX_TEST_CUDA
  CNX_SKIP_WITHOUT_DEVICE();
  constexpr int64_t N = 6, K = 40, M = 24;
  Generator gen(11);
  GatedMlp blk;
  blk.x = Tensor::randn({N, K}, gen, DType::f32, kDev);
  blk.ln_w = Tensor::randn({K}, gen, DType::f32, kDev, 1.0, 0.5);
  blk.ln_b = Tensor::randn({K}, gen, DType::f32, kDev);
  blk.w = Tensor::randn({M, K}, gen, DType::f32, kDev, 0.0, 0.2);
  blk.b = Tensor::randn({M}, gen, DType::f32, kDev);
  blk.gate = Tensor::randn({N, M}, gen, DType::f32, kDev);
  const std::vector<float> warm = host(blk.run());  // warm-up: makes the cuBLAS handles, workspace

  Tensor y;
  cuda::Graph g = cuda::Graph::capture(kDev, [&] { y = blk.run(); });
  ASSERT_FALSE(g.empty());
  ASSERT_TRUE(y.defined());
  g.replay();
  expect_bitwise("first replay, the capture's inputs", host(y), warm);

  std::vector<float> previous = warm;
  for (int k = 0; k < 4; ++k) {
    // Every input new, in place; some replays refill only x, the others everything.
    refill(blk.x, gen);
    if (k % 2 == 1)
      for (Tensor* t : {&blk.ln_w, &blk.ln_b, &blk.w, &blk.b, &blk.gate}) refill(*t, gen);
    g.replay();
    const std::vector<float> got = host(y);
    const std::vector<float> want = host(blk.run());
    expect_bitwise("replay " + std::to_string(k), got, want);
    EXPECT_NE(std::memcmp(want.data(), previous.data(), want.size() * sizeof(float)), 0)
        << "replay " << k << ": the new inputs give the old output, so the check proves nothing";
    previous = want;
  }
#else
  CNX_SKIP_BUILT_WITHOUT_CUDA();
#endif
}

TEST(CudaGraph, AnInPlaceAccumulationReplayedNTimesEqualsNEagerApplications) {
#if CNX_TEST_CUDA
  CNX_SKIP_WITHOUT_DEVICE();
  constexpr int n = 1000, times = 5;
  Generator gen(12);
  const Tensor start = Tensor::randn({n}, gen);  // on the host
  const Tensor d = Tensor::randn({n}, gen, DType::f32, kDev);
  const auto step = [&](Tensor& acc) { add_(acc, gelu(d)); };

  // Eagerly: the value after each application.
  Tensor eager = start.to(kDev);
  std::vector<std::vector<float>> want{host(eager)};
  for (int i = 0; i < times; ++i) {
    step(eager);
    want.push_back(host(eager));
  }

  Tensor acc = start.to(kDev);
  cuda::Graph g = cuda::Graph::capture(kDev, [&] { step(acc); });
  expect_bitwise("after capture, before any replay (captured work must not run)", host(acc), want[0]);
  for (int i = 1; i <= times; ++i) {
    g.replay();
    expect_bitwise("after replay " + std::to_string(i), host(acc), want[static_cast<size_t>(i)]);
  }
  // Replays queued back to back, read once: ordered on the stream like eager work.
  acc.copy_from(start);
  for (int i = 0; i < times; ++i) g.replay();
  expect_bitwise(std::to_string(times) + " replays queued at once", host(acc), want.back());
#else
  CNX_SKIP_BUILT_WITHOUT_CUDA();
#endif
}

TEST(CudaGraph, TheCapturesMemoryStaysPrivateWhileTheGraphLivesAndIsReusedAfter) {
#if CNX_TEST_CUDA
  CNX_SKIP_WITHOUT_DEVICE();
  const Shape shape{1000};
  Generator gen(13);
  const Tensor x = Tensor::randn(shape, gen, DType::f32, kDev);
  Tensor held = Tensor::randn(shape, gen, DType::f32, kDev);  // freed during the capture
  const auto body = [&](const Tensor& h) { return add(mul(gelu(x), h), x); };
  const std::vector<float> want = host(body(held));  // also warms the cache up

  // The body makes two temporaries (gelu, mul) and drops them, drops the last handle to `held`
  // (allocated before the capture, read by it), and keeps `out`. Replays write the temporaries
  // and `out` and read `held`: none of them may go to anyone else while the graph lives.
  const AllocatorStats before = cuda::memory_stats(kDev);
  Tensor out;
  std::vector<Range> graph_memory;  // t1, t2, held, out
  cuda::Graph g = cuda::Graph::capture(kDev, [&] {
    const Tensor t1 = gelu(x);
    const Tensor t2 = mul(t1, held);
    out = add(t2, x);
    graph_memory = {range_of(t1), range_of(t2), range_of(held), range_of(out)};
    held = Tensor();
  });
  if (!cuda::caching_disabled()) {
    // t1, t2 and held were freed, out is new: the same number of bytes in live tensors.
    EXPECT_EQ(cuda::memory_stats(kDev).allocated_bytes, before.allocated_bytes);
  }

  // Eager allocations of the same size while the graph lives: without the graph pool they would
  // be handed the temporaries' or held's memory (the cache's small bins are LIFO; cudaMalloc
  // reuses the lowest free address).
  std::vector<Tensor> eager;
  for (int i = 0; i < 8; ++i) {
    eager.push_back(Tensor::full(shape, 7.0, DType::f32, kDev));
    for (const Range& r : graph_memory)
      EXPECT_FALSE(range_of(eager.back()).overlaps(r)) << "eager tensor " << i << " got memory the graph uses";
  }
  for (int k = 0; k < 2; ++k) {
    g.replay();
    expect_bitwise("replay " + std::to_string(k) + " (reads held's memory, freed during the capture)",
                   host(out), want);
  }
  for (const Tensor& e : eager) expect_bitwise("an eager tensor after the replays", host(e), std::vector<float>(1000, 7.0f));
  eager.clear();

  // Destroying the graph gives its memory back: t1, t2 and held (out is still alive, now an
  // ordinary tensor).
  const AllocatorStats alive = cuda::memory_stats(kDev);
  const int64_t free_alive = device_free_bytes();
  g = cuda::Graph();
  if (!cuda::caching_disabled()) {
    // The three blocks are now the general cache's most recently freed of their size (release_pool
    // appends them to the LIFO bin): the next three allocations get them, without cudaMalloc.
    std::set<uintptr_t> got, freed{graph_memory[0].begin, graph_memory[1].begin, graph_memory[2].begin};
    std::vector<Tensor> again;
    for (int i = 0; i < 3; ++i) {
      again.push_back(Tensor::empty(shape, DType::f32, kDev));
      got.insert(range_of(again.back()).begin);
    }
    EXPECT_EQ(got, freed) << "the graph's freed blocks are not reused after the graph is destroyed";
    const AllocatorStats after = cuda::memory_stats(kDev);
    EXPECT_EQ(after.device_mallocs, alive.device_mallocs);
    EXPECT_EQ(after.cache_hits - alive.cache_hits, 3);
  } else if (kEmulated) {
    // No caching: the frees of t1, t2 and held were deferred to the graph's destruction.
    EXPECT_EQ(device_free_bytes() - free_alive, 3 * x.nbytes())
        << "destroying the graph did not cudaFree the memory its capture freed";
  }
  // `out` outlives the graph: an ordinary tensor, freed (or cached) like any other.
  expect_bitwise("out after the graph is gone", host(out), want);
#else
  CNX_SKIP_BUILT_WITHOUT_CUDA();
#endif
}

TEST(CudaGraph, MemoryOneCaptureMadeAndAnotherFreedWaitsForBothGraphs) {
#if CNX_TEST_CUDA
  CNX_SKIP_WITHOUT_DEVICE();
  const Shape shape{1000};
  Generator gen(16);
  const Tensor x = Tensor::randn(shape, gen, DType::f32, kDev);
  const std::vector<float> want_a = host(gelu(x));
  const std::vector<float> want_b = host(mul(gelu(x), x));

  // Graph a makes a_out; graph b reads it and drops the last handle to it during its capture.
  Tensor a_out, b_out;
  cuda::Graph a = cuda::Graph::capture(kDev, [&] { a_out = gelu(x); });
  a.replay();
  expect_bitwise("graph a's replay", host(a_out), want_a);
  const Range a_range = range_of(a_out);
  cuda::Graph b = cuda::Graph::capture(kDev, [&] {
    b_out = mul(a_out, x);
    a_out = Tensor();
  });
  // a is gone, b still reads a_out's memory: it must stay b's (and keep a's last replay's values).
  a = cuda::Graph();
  std::vector<Tensor> eager;
  for (int i = 0; i < 8; ++i) {
    eager.push_back(Tensor::full(shape, 7.0, DType::f32, kDev));
    EXPECT_FALSE(range_of(eager.back()).overlaps(a_range)) << "eager tensor " << i << " got the memory graph b reads";
  }
  b.replay();
  expect_bitwise("graph b's replay", host(b_out), want_b);
  for (const Tensor& e : eager) expect_bitwise("an eager tensor after b's replay", host(e), std::vector<float>(1000, 7.0f));
  eager.clear();

  // b gone too: a_out's memory is free.
  const int64_t free_b_alive = device_free_bytes();
  b = cuda::Graph();
  if (!cuda::caching_disabled()) {
    const Tensor again = Tensor::empty(shape, DType::f32, kDev);
    EXPECT_EQ(range_of(again).begin, a_range.begin) << "a_out's block is not reused once both graphs are gone";
  } else if (kEmulated) {
    EXPECT_EQ(device_free_bytes() - free_b_alive, x.nbytes()) << "a_out's memory was not cudaFree'd";
  }
#else
  CNX_SKIP_BUILT_WITHOUT_CUDA();
#endif
}

TEST(CudaGraph, ABodyMakingACallForbiddenInCaptureFailsItAndTheDeviceWorksAfter) {
#if CNX_TEST_CUDA
  CNX_SKIP_WITHOUT_DEVICE();
  Generator gen(14);
  const Tensor x = Tensor::randn({500}, gen, DType::f32, kDev);
  const std::vector<float> want = host(gelu(x));
  const AllocatorStats before = cuda::memory_stats(kDev);
  const int64_t free_before = device_free_bytes();

  // A copy to the host synchronises: the CUDA call fails, the library throws, the capture ends.
  expect_error([&] { (void)cuda::Graph::capture(kDev, [&] { (void)gelu(x).to(Device::cpu()); }); },
               {"cuda::Graph::capture on cuda:0: the capture failed", "the body threw",
                "not permitted when stream is capturing", "cudaStreamEndCapture"});
  // The same failure swallowed by the body: ending the capture reports it.
  expect_error([&] {
    (void)cuda::Graph::capture(kDev, [&] {
      try {
        cuda::synchronize(kDev);
      } catch (const Error&) {
      }
    });
  }, {"the capture failed", "cudaStreamEndCapture", "cudaErrorStreamCaptureInvalidated"});

  // The stream captures no more, no error is left behind, and the memory came back.
  EXPECT_FALSE(cuda::is_capturing(kDev));
  EXPECT_EQ(cudaGetLastError(), cudaSuccess);
  expect_memory_returned(before, free_before);
  // Eager work is correct, and so is a new capture.
  expect_bitwise("eager gelu after the failed captures", host(gelu(x)), want);
  Tensor y;
  cuda::Graph g = cuda::Graph::capture(kDev, [&] { y = gelu(x); });
  g.replay();
  expect_bitwise("a capture after the failed ones", host(y), want);
#else
  CNX_SKIP_BUILT_WITHOUT_CUDA();
#endif
}

TEST(CudaGraph, ABodyThatThrowsFailsTheCaptureWithItsMessageAndTheDeviceWorksAfter) {
#if CNX_TEST_CUDA
  CNX_SKIP_WITHOUT_DEVICE();
  Generator gen(15);
  const Tensor x = Tensor::randn({500}, gen, DType::f32, kDev);
  const std::vector<float> want = host(add(x, gelu(x)));
  const AllocatorStats before = cuda::memory_stats(kDev);
  const int64_t free_before = device_free_bytes();

  Tensor kept;  // made inside the failed capture and kept: an ordinary tensor afterwards
  expect_error([&] {
    (void)cuda::Graph::capture(kDev, [&] {
      kept = gelu(x);
      fail("the model said no (42)");
    });
  }, {"the capture failed", "the body threw: the model said no (42)"});
  expect_error([&] { (void)cuda::Graph::capture(kDev, [&] { throw 42; }); },
               {"the capture failed", "not a std::exception"});
  EXPECT_FALSE(cuda::is_capturing(kDev));
  EXPECT_EQ(cudaGetLastError(), cudaSuccess);
  kept = Tensor();
  expect_memory_returned(before, free_before);

  expect_bitwise("eager ops after the failed captures", host(add(x, gelu(x))), want);
  Tensor y;
  cuda::Graph g = cuda::Graph::capture(kDev, [&] { y = add(x, gelu(x)); });
  g.replay();
  expect_bitwise("a capture after the failed ones", host(y), want);
#else
  CNX_SKIP_BUILT_WITHOUT_CUDA();
#endif
}

TEST(CudaGraph, MisuseIsAnErrorThatNamesIt) {
#if CNX_TEST_CUDA
  CNX_SKIP_WITHOUT_DEVICE();
  cuda::Graph empty;
  EXPECT_TRUE(empty.empty());
  expect_error([&] { empty.replay(); }, {"cuda::Graph::replay", "empty"});
  expect_error([&] { (void)cuda::Graph::capture(Device::cpu(), [] {}); }, {"cuda::Graph::capture", "not a CUDA device"});

  // is_capturing: true inside the body only; a capture inside a capture is refused (and fails the
  // outer one, whose body then throws).
  bool inside = false;
  EXPECT_FALSE(cuda::is_capturing(kDev));
  expect_error([&] {
    (void)cuda::Graph::capture(kDev, [&] {
      inside = cuda::is_capturing(kDev);
      (void)cuda::Graph::capture(kDev, [] {});
    });
  }, {"the capture failed", "already capturing"});
  EXPECT_TRUE(inside);
  EXPECT_FALSE(cuda::is_capturing(kDev));

  // A moved-from graph is empty; the moved-to one replays.
  const Tensor x = Tensor::full({64}, 1.5, DType::f32, kDev);
  Tensor y;
  cuda::Graph a = cuda::Graph::capture(kDev, [&] { y = mul(x, x); });
  cuda::Graph b = std::move(a);
  EXPECT_TRUE(a.empty());
  EXPECT_FALSE(b.empty());
  b.replay();
  expect_bitwise("the moved graph's replay", host(y), std::vector<float>(64, 2.25f));
#else
  CNX_SKIP_BUILT_WITHOUT_CUDA();
#endif
}
