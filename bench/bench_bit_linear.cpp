// BitLinear::forward against the float layer a user would keep (Eigen float32, x * W^T + b with W
// row-major), measured in the same run. Run with --benchmark_format=json for machine-readable output.
#include <bitnet/bitnet.hpp>

#include <random>

#include <benchmark/benchmark.h>

namespace {

using bitnet::Index;
using bitnet::Matrix;

Matrix<float> random_matrix(Index rows, Index cols, unsigned seed) {
  std::mt19937 rng(seed);
  std::normal_distribution<float> dist(0.0f, 1.0f);
  Matrix<float> m(rows, cols);
  for (Index i = 0; i < m.size(); ++i) m.data()[i] = dist(rng);
  return m;
}

void set_counters(benchmark::State& state, Index out, Index in, Index batch) {
  state.counters["MAC/s"] = benchmark::Counter(double(out * in * batch), benchmark::Counter::kIsIterationInvariantRate);
}

void eigen_float32(benchmark::State& state) {
  const Index out = state.range(0), in = state.range(1), batch = state.range(2);
  const bitnet::Linear<float> layer(random_matrix(out, in, 1), random_matrix(out, 1, 2));
  const Matrix<float> x = random_matrix(batch, in, 3);
  for (auto _ : state) benchmark::DoNotOptimize(layer.forward(x));
  set_counters(state, out, in, batch);
}

void bitlinear(benchmark::State& state) {
  const Index out = state.range(0), in = state.range(1), batch = state.range(2);
  const bitnet::BitLinear<float> layer(random_matrix(out, in, 1), random_matrix(out, 1, 2));
  const Matrix<float> x = random_matrix(batch, in, 3);
  for (auto _ : state) benchmark::DoNotOptimize(layer.forward(x));
  set_counters(state, out, in, batch);
}

// out, in, batch
void shapes(benchmark::internal::Benchmark* b) {
  for (Index batch : {1, 8}) {
    b->Args({2560, 2560, batch});
    b->Args({6912, 2560, batch});
  }
  b->Unit(benchmark::kMicrosecond);
}

}  // namespace

BENCHMARK(eigen_float32)->Apply(shapes);
BENCHMARK(bitlinear)->Apply(shapes);
BENCHMARK_MAIN();
