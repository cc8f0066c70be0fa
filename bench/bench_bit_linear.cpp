// BitLinear<float>::forward (activation quantization included) against the float layer a user
// would keep (Eigen float32, x * W^T + b with W row-major) built the same way (this target has no
// -march flags), for every kernel ISA this CPU supports and 1 and 2 threads. The Eigen baseline
// built with -march=native is bitnet_bench_eigen_native; bench/ratios.py reads both. Machine-readable output:
//   bitnet_bench --benchmark_format=json   or   --benchmark_out=results.json
// The sweep is long (minutes); select with --benchmark_filter, e.g. 'bitlinear/6912/2560/1/'.
#include <bitnet/bitnet.hpp>

#include <random>
#include <string>

#include <benchmark/benchmark.h>

#include "layer_shapes.hpp"

namespace {

using bench::Index;
using bench::Matrix;

// BitLinear<float>::forward into a preallocated output (forward(x, y): no allocation per call),
// the weights packed and the latent weights released, as an inference engine holds it.
void bitlinear(benchmark::State& state, bitnet::isa kernels) {
  const Index out = state.range(0), in = state.range(1), batch = state.range(2);
  bitnet::force_isa(kernels);
  bitnet::set_num_threads(int(state.range(3)));
  bitnet::BitLinear<float> layer(bench::random_matrix(out, in, 1), bench::random_matrix(out, 1, 2));
  layer.release_latent_weights();
  const Matrix<float> x = bench::random_matrix(batch, in, 3);
  Matrix<float> y(batch, out);
  for (auto _ : state) {
    layer.forward(x, y);
    benchmark::DoNotOptimize(y.data());
    benchmark::ClobberMemory();
  }
  if (bitnet::last_isa() != kernels) state.SkipWithError("the forced ISA did not run");
  bench::set_counters(state, out, in, batch);
  bitnet::clear_forced_isa();
  bitnet::set_num_threads(0);
}

}  // namespace

int main(int argc, char** argv) {
  bench::register_eigen_float32("eigen_float32");
  for (bitnet::isa kernels : {bitnet::isa::scalar, bitnet::isa::avx2, bitnet::isa::avx512, bitnet::isa::amx}) {
    if (!bitnet::isa_supported(kernels)) continue;
    const std::string name = "bitlinear_" + std::string(bitnet::isa_name(kernels));
    for (const auto& shape : bench::shapes)
      for (Index batch : bench::batches)
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
