// The Eigen float32 baseline built with -O3 -march=native (bench/CMakeLists.txt): what a user who
// cares about speed builds, with every vector unit of this CPU. Compare with bitnet_bench (plain
// build) through bench/ratios.py.
#include <benchmark/benchmark.h>

#include "layer_shapes.hpp"

int main(int argc, char** argv) {
  bench::register_eigen_float32("eigen_float32_native");
  benchmark::Initialize(&argc, argv);
  if (benchmark::ReportUnrecognizedArguments(argc, argv)) return 1;
  benchmark::RunSpecifiedBenchmarks();
  benchmark::Shutdown();
  return 0;
}
