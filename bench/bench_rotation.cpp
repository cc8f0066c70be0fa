// The input rotation of rotated ternary models (rotation.hpp) against the layer it feeds:
//   rotation_<isa>/n/b        one token of n values (a user's Eigen row) rotated into a 64-byte aligned
//                             buffer (as BitLinear's scratch), blocks of b, per kernel ISA;
//   bitlinear_best/out/in/1   BitLinear<float>::forward of one token on the best kernels, one
//                             thread, the layer a rotation of width `in` precedes;
//   quant_error/in/b/outliers the relative output error of BitLinear's int8 per-token activation
//                             quantization on a layer with (outliers = 1) or without (0) outlier
//                             input channels, without and with the rotation folded in (counters;
//                             the time is not the point).
// Widths and blocks: 2560 (BitNet b1.58 2B-4T, Qwen3-4B hidden size) can only take blocks up to
// 512 (2560 = 5 * 512); 4096 (Qwen3-8B) blocks 1024 (Ternary Bonsai 2's block) and 4096; 6912
// (2B-4T's MLP width, 27 * 256) blocks up to 256.
//   bitnet_bench_rotation --benchmark_format=json   or   --benchmark_out=results.json
#include <bitnet/bitnet.hpp>
#include <bitnet/rotation.hpp>

#include <array>
#include <string>
#include <utility>

#include <benchmark/benchmark.h>

#include "layer_shapes.hpp"

namespace {

using bench::Index;
using bench::Matrix;

void rotation(benchmark::State& state, bitnet::isa kernels) {
  const Index n = state.range(0), b = state.range(1);
  const bitnet::hadamard_rotation rot = bitnet::hadamard_rotation::random_signs(n, b, 1);
  const Matrix<float> x = bench::random_matrix(1, n, 3);
  bitnet::detail::aligned_vector<float> out(static_cast<std::size_t>(n));
  for (auto _ : state) {
    rot.apply_rows(kernels, x.data(), 1, n, out.data(), n);
    benchmark::DoNotOptimize(out.data());
    benchmark::ClobberMemory();
  }
  state.counters["values/s"] = benchmark::Counter(double(n), benchmark::Counter::kIsIterationInvariantRate);
}

void bitlinear_best(benchmark::State& state) {
  const Index out = state.range(0), in = state.range(1), batch = state.range(2);
  bitnet::set_num_threads(1);
  bitnet::BitLinear<float> layer(bench::random_matrix(out, in, 1), bench::random_matrix(out, 1, 2));
  layer.release_latent_weights();
  const Matrix<float> x = bench::random_matrix(batch, in, 3);
  Matrix<float> y(batch, out);
  for (auto _ : state) {
    layer.forward(x, y);
    benchmark::DoNotOptimize(y.data());
    benchmark::ClobberMemory();
  }
  bench::set_counters(state, out, in, batch);
  bitnet::set_num_threads(0);
}

// ||a - b||_F / ||b||_F in double.
double relative_error(const Matrix<float>& a, const Matrix<double>& b) {
  return (a.cast<double>() - b).norm() / b.norm();
}

// A square layer (Gaussian weights) and 32 Gaussian tokens; with outliers, 1% of the input
// channels (fixed ones, the same in every token, as in LLM activations) are 30 times larger.
// Counters: err_act_* is the error of the int8 activation quantization alone (BitLinear's output
// against the float product of the same ternary weights), err_total_* against the float layer
// W x (ternary weights included); *_plain without rotation, *_rotated with W R^T and R x.
void quant_error(benchmark::State& state) {
  const Index n = state.range(0), b = state.range(1), batch = 32;
  const bool outliers = state.range(2) != 0;
  const Matrix<float> w = bench::random_matrix(n, n, 1);
  Matrix<float> x = bench::random_matrix(batch, n, 2);
  if (outliers)
    for (Index k = 0; k < n / 100; ++k) x.col((k * 97) % n) *= 30.0f;
  const bitnet::hadamard_rotation rot = bitnet::hadamard_rotation::random_signs(n, b, 5);
  const Matrix<double> exact = x.cast<double>() * w.cast<double>().transpose();
  const auto errors = [&](const Matrix<float>& weight, const Matrix<float>& input) {
    const bitnet::BitLinear<float> layer(weight);
    const Matrix<float> y = layer.forward(input);
    // Dequantized ternary weights: codes / sw (BitLinear's reciprocal scale convention).
    const Matrix<double> wq = layer.ternary_weight().cast<double>() / double(layer.weight_scale());
    const Matrix<double> float_act = input.cast<double>() * wq.transpose();
    return std::pair{relative_error(y, float_act), relative_error(y, exact)};
  };
  std::pair<double, double> plain, rotated;
  for (auto _ : state) {
    plain = errors(w, x);
    rotated = errors(rot.fold(w), rot.apply(x));
  }
  state.counters["err_act_plain"] = plain.first;
  state.counters["err_act_rotated"] = rotated.first;
  state.counters["err_total_plain"] = plain.second;
  state.counters["err_total_rotated"] = rotated.second;
}

}  // namespace

int main(int argc, char** argv) {
  constexpr Index rotations[][2] = {{2560, 512}, {4096, 1024}, {4096, 4096}, {6912, 256}};
  for (bitnet::isa kernels : bitnet::all_isas) {
    if (!bitnet::isa_supported(kernels) || kernels == bitnet::isa::amx) continue;  // amx runs the avx512 code
    const std::string name = "rotation_" + std::string(bitnet::isa_name(kernels));
    for (const auto& shape : rotations)
      benchmark::RegisterBenchmark(name.c_str(), rotation, kernels)->Args({shape[0], shape[1]})->Unit(benchmark::kMicrosecond);
  }
  // The layers each rotated width feeds: 2B-4T's attention (2560 x 2560, k/v 640 x 2560) and MLP up
  // (6912 x 2560) and down (2560 x 6912); a 4096-wide model's 4096 x 4096 and k/v 1024 x 4096.
  constexpr Index layers[][2] = {{2560, 2560}, {640, 2560}, {6912, 2560}, {2560, 6912}, {4096, 4096}, {1024, 4096}};
  for (const auto& shape : layers)
    benchmark::RegisterBenchmark("bitlinear_best", bitlinear_best)->Args({shape[0], shape[1], 1})->Unit(benchmark::kMicrosecond);
  for (const auto& shape : {std::array<Index, 2>{2560, 512}, std::array<Index, 2>{4096, 1024}})
    for (Index outliers : {0, 1})
      benchmark::RegisterBenchmark("quant_error", quant_error)
          ->Args({shape[0], shape[1], outliers})
          ->Iterations(1)
          ->Unit(benchmark::kMillisecond);
  benchmark::Initialize(&argc, argv);
  if (benchmark::ReportUnrecognizedArguments(argc, argv)) return 1;
  benchmark::RunSpecifiedBenchmarks();
  benchmark::Shutdown();
  return 0;
}
