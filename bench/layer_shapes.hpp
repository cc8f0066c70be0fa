// The layer shapes and batches every forward benchmark sweeps, and the Eigen float32 baseline, so
// the plain and the -march=native builds of it measure exactly the same cases.
#pragma once

#include <bitnet/linear.hpp>

#include <random>

#include <benchmark/benchmark.h>

namespace bench {

using bitnet::Index;
using bitnet::Matrix;

// out x in: the BitNet b1.58 2B4T projections (attention 2560x2560 and 640x2560 for k/v, MLP up
// 6912x2560 and down 2560x6912).
inline constexpr Index shapes[][2] = {{2560, 2560}, {640, 2560}, {6912, 2560}, {2560, 6912}};
inline constexpr Index batches[] = {1, 8, 32, 128};

inline Matrix<float> random_matrix(Index rows, Index cols, unsigned seed) {
  std::mt19937 rng(seed);
  std::normal_distribution<float> dist(0.0f, 1.0f);
  Matrix<float> m(rows, cols);
  for (Index i = 0; i < m.size(); ++i) m.data()[i] = dist(rng);
  return m;
}

inline void set_counters(benchmark::State& state, Index out, Index in, Index batch) {
  state.counters["MAC/s"] = benchmark::Counter(double(out * in * batch), benchmark::Counter::kIsIterationInvariantRate);
}

/// The float layer a user would keep: Eigen float32, x * W^T + b with W row-major, into a
/// preallocated output (as BitLinear's forward(x, y) is measured). Eigen 3.4 without OpenMP runs
/// one thread.
inline void eigen_float32(benchmark::State& state) {
  const Index out = state.range(0), in = state.range(1), batch = state.range(2);
  const Matrix<float> w = random_matrix(out, in, 1), x = random_matrix(batch, in, 3);
  const Eigen::RowVectorXf b = random_matrix(1, out, 2);
  Matrix<float> y(batch, out);
  for (auto _ : state) {
    y.noalias() = x * w.transpose();
    y.rowwise() += b;
    benchmark::DoNotOptimize(y.data());
    benchmark::ClobberMemory();
  }
  set_counters(state, out, in, batch);
}

inline void register_eigen_float32(const char* name) {
  for (const auto& shape : shapes)
    for (Index batch : batches)
      benchmark::RegisterBenchmark(name, eigen_float32)->Args({shape[0], shape[1], batch, 1})->Unit(benchmark::kMicrosecond);
}

}  // namespace bench
