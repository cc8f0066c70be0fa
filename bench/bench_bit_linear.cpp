// BitLinear<float>::forward (activation quantization included) against the float layer a user
// would keep (Eigen float32, x * W^T + b with W row-major), measured in the same run, for every
// kernel ISA this CPU supports and 1 and 2 threads. Machine-readable output:
//   bitnet_bench --benchmark_format=json   or   --benchmark_out=results.json
// The sweep is long (minutes); select with --benchmark_filter, e.g. 'bitlinear/6912/2560/1/'.
#include <bitnet/bitnet.hpp>

#include <random>
#include <string>

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

// Eigen 3.4 without OpenMP runs one thread whatever the argument.
void eigen_float32(benchmark::State& state) {
  const Index out = state.range(0), in = state.range(1), batch = state.range(2);
  const bitnet::Linear<float> layer(random_matrix(out, in, 1), random_matrix(out, 1, 2));
  const Matrix<float> x = random_matrix(batch, in, 3);
  for (auto _ : state) benchmark::DoNotOptimize(layer.forward(x));
  set_counters(state, out, in, batch);
}

void bitlinear(benchmark::State& state, bitnet::isa kernels) {
  const Index out = state.range(0), in = state.range(1), batch = state.range(2);
  bitnet::force_isa(kernels);
  bitnet::set_num_threads(int(state.range(3)));
  bitnet::BitLinear<float> layer(random_matrix(out, in, 1), random_matrix(out, 1, 2));
  layer.release_latent_weights();
  const Matrix<float> x = random_matrix(batch, in, 3);
  for (auto _ : state) benchmark::DoNotOptimize(layer.forward(x));
  if (bitnet::last_isa() != kernels) state.SkipWithError("the forced ISA did not run");
  set_counters(state, out, in, batch);
  bitnet::clear_forced_isa();
  bitnet::set_num_threads(0);
}

// out x in: the BitNet b1.58 2B4T projections (attention 2560x2560 and 640x2560 for k/v, MLP up
// 6912x2560 and down 2560x6912).
constexpr Index shapes[][2] = {{2560, 2560}, {640, 2560}, {6912, 2560}, {2560, 6912}};
constexpr Index batches[] = {1, 8, 32, 128};

}  // namespace

int main(int argc, char** argv) {
  for (const auto& shape : shapes)
    for (Index batch : batches)
      benchmark::RegisterBenchmark("eigen_float32", eigen_float32)
          ->Args({shape[0], shape[1], batch, 1})
          ->Unit(benchmark::kMicrosecond);
  for (bitnet::isa kernels : bitnet::all_isas) {
    if (!bitnet::isa_supported(kernels)) continue;
    const std::string name = "bitlinear_" + std::string(bitnet::isa_name(kernels));
    for (const auto& shape : shapes)
      for (Index batch : batches)
        for (Index threads : {1, 2}) {
          // The scalar path only serves as a reference point; one shape is enough.
          if (kernels == bitnet::isa::scalar && (shape[0] != 2560 || shape[1] != 2560 || batch > 8)) continue;
          benchmark::RegisterBenchmark(name.c_str(), bitlinear, kernels)
              ->Args({shape[0], shape[1], batch, threads})
              ->Unit(benchmark::kMicrosecond);
        }
  }
  benchmark::Initialize(&argc, argv);
  if (benchmark::ReportUnrecognizedArguments(argc, argv)) return 1;
  benchmark::RunSpecifiedBenchmarks();
  benchmark::Shutdown();
  return 0;
}
