// Google Benchmark: the CPU reference ops, forward and backward through autograd, on the
// stage shapes of ConvNeXt-T at a 72x72 input, batch 2 (the size the CPU parity checks use):
// 18x18x96, 9x9x192, 4x4x384, 2x2x768. The CPU reference is for correctness, not speed; these
// numbers say how long a CPU forward/backward takes, and catch accidental slowdowns.
//
//   ./build/bench/bench_cpu_reference --benchmark_filter=dwconv
#include <benchmark/benchmark.h>

#include "autograd/ops.h"

namespace {

using namespace cnx;

struct Stage {
  int64_t hw, c;
};
constexpr Stage kStages[] = {{18, 96}, {9, 192}, {4, 384}, {2, 768}};
constexpr int64_t kBatch = 2;

Tensor param(const Shape& s, Generator& g) { return Tensor::randn(s, g).set_requires_grad(true); }

// Runs loss = sum(f(x)) forward and backward each iteration; reports activation elements/s.
template <class F>
void run(benchmark::State& state, F&& f) {
  const Stage st = kStages[state.range(0)];
  Generator g(0);
  Tensor x = param({kBatch, st.hw, st.hw, st.c}, g);
  auto step = f(st, g);
  for (auto _ : state) {
    Tensor loss = sum(step(x));
    loss.backward();
    benchmark::DoNotOptimize(x.grad().raw_data());
    x.set_grad({});
  }
  state.SetItemsProcessed(state.iterations() * x.numel());
  state.SetLabel(std::to_string(st.hw) + "x" + std::to_string(st.hw) + "x" + std::to_string(st.c));
}

void BM_dwconv7x7(benchmark::State& state) {
  run(state, [](Stage st, Generator& g) {
    Tensor w = param({7, 7, st.c}, g), b = param({st.c}, g);
    return [=](const Tensor& x) { return dwconv(x, w, b); };
  });
}

void BM_layer_norm(benchmark::State& state) {
  run(state, [](Stage st, Generator& g) {
    Tensor w = param({st.c}, g), b = param({st.c}, g);
    return [=](const Tensor& x) { return layer_norm(x, w, b, 1e-6); };
  });
}

void BM_mlp(benchmark::State& state) {  // linear C->4C, GELU, linear 4C->C
  run(state, [](Stage st, Generator& g) {
    Tensor w1 = param({4 * st.c, st.c}, g), b1 = param({4 * st.c}, g);
    Tensor w2 = param({st.c, 4 * st.c}, g), b2 = param({st.c}, g);
    return [=](const Tensor& x) { return linear(gelu(linear(x, w1, b1)), w2, b2); };
  });
}

void BM_gelu(benchmark::State& state) {
  run(state, [](Stage, Generator&) { return [](const Tensor& x) { return gelu(x); }; });
}

}  // namespace

BENCHMARK(BM_dwconv7x7)->DenseRange(0, 3)->Unit(benchmark::kMillisecond);
BENCHMARK(BM_layer_norm)->DenseRange(0, 3)->Unit(benchmark::kMillisecond);
BENCHMARK(BM_mlp)->DenseRange(0, 3)->Unit(benchmark::kMillisecond);
BENCHMARK(BM_gelu)->DenseRange(0, 3)->Unit(benchmark::kMillisecond);
