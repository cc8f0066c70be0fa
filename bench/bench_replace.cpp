// The cost of replace_linear per policy on a model of 8 layers of 1024 x 1024 (32 MiB of float
// weights), against the least any copying transfer must do: copy the latent weights (measured in
// the same run). Graph construction is excluded from the timings. Run with --benchmark_format=json.
#include <bitnet/replace.hpp>

#include <random>
#include <vector>

#include <benchmark/benchmark.h>

namespace {

using bitnet::Index;
using bitnet::Linear;
using bitnet::Matrix;
using model = std::vector<bitnet::linear_slot<Linear<float>>>;

constexpr Index dim = 1024;
constexpr int depth = 8;

const model& pretrained() {
  static const model m = [] {
    std::mt19937 rng(1);
    std::normal_distribution<float> dist(0.0f, 1.0f / 32);
    model built;
    for (int i = 0; i < depth; ++i) {
      Linear<float> l(dim, dim);
      for (Index k = 0; k < l.weight.size(); ++k) l.weight.data()[k] = dist(rng);
      built.push_back(std::move(l));
    }
    return built;
  }();
  return m;
}

void set_counters(benchmark::State& state) {
  state.counters["weights/s"] =
      benchmark::Counter(double(dim * dim * depth), benchmark::Counter::kIsIterationInvariantRate);
}

// Baseline: copying every latent weight matrix once.
void copy_weights(benchmark::State& state) {
  for (auto _ : state) {
    std::vector<Matrix<float>> copies;
    copies.reserve(depth);
    for (const auto& slot : pretrained()) copies.push_back(std::get<Linear<float>>(slot).weight);
    benchmark::DoNotOptimize(copies.data());
  }
  set_counters(state);
}

template <class Policy>
void replace(benchmark::State& state) {
  for (auto _ : state) {
    state.PauseTiming();
    model m = pretrained();
    state.ResumeTiming();
    benchmark::DoNotOptimize(bitnet::replace_linear<Policy>(m).layers.data());
    state.PauseTiming();
    m = model();  // freeing the converted model is not part of the transfer
    state.ResumeTiming();
  }
  set_counters(state);
}

}  // namespace

BENCHMARK(copy_weights)->Unit(benchmark::kMillisecond);
BENCHMARK(replace<bitnet::transfer::copy>)->Name("replace_linear<copy>")->Unit(benchmark::kMillisecond);
BENCHMARK(replace<bitnet::transfer::move>)->Name("replace_linear<move>")->Unit(benchmark::kMillisecond);
BENCHMARK(replace<bitnet::transfer::checked>)->Name("replace_linear<checked>")->Unit(benchmark::kMillisecond);
BENCHMARK_MAIN();
