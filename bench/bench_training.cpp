// Fine-tuning costs (bitnet/training.hpp), 1 thread, batch 32 and 128, for two BitNet b1.58 2B4T
// projection shapes, each against the float layer a user would keep, in the same run:
//   float_backward       Eigen float32 Linear backward: dx = dy . W, dW = dy^T . x, db = sum(dy)
//   bitlinear_backward   bitnet::backward: the same products with the quantized operands (x~, W~)
//   float_forward        bitnet::Linear<float>::forward
//   bitlinear_train_forward/.../lambda%   bitnet::train_forward at lambda 1 (BitLinear::forward plus
//                        the tape: x~ and W~) and 0.5 (the mixed operands, an Eigen float product)
//   bitlinear_set_weight re-quantizing and re-packing after an optimizer step (the copy of the new
//                        weight, which an optimizer makes anyway, is outside the timing)
// bench/training_ratios.py turns the JSON output into the table of docs/fine-tuning.md.
#include <bitnet/bitnet.hpp>

#include <random>

#include <benchmark/benchmark.h>

namespace {

using bitnet::Index;
using bitnet::Matrix;
using bitnet::Vector;

Matrix<float> random_matrix(Index rows, Index cols, unsigned seed, float scale = 1.0f) {
  std::mt19937 rng(seed);
  std::normal_distribution<float> dist(0.0f, scale);
  Matrix<float> m(rows, cols);
  for (Index i = 0; i < m.size(); ++i) m.data()[i] = dist(rng);
  return m;
}

void set_counters(benchmark::State& state, Index out, Index in, Index batch) {
  state.counters["MAC/s"] =
      benchmark::Counter(double(out * in * batch), benchmark::Counter::kIsIterationInvariantRate);
}

void float_forward(benchmark::State& state) {
  const Index out = state.range(0), in = state.range(1), batch = state.range(2);
  const bitnet::Linear<float> layer(random_matrix(out, in, 1, 0.02f), Vector<float>(random_matrix(out, 1, 2)));
  const Matrix<float> x = random_matrix(batch, in, 3);
  for (auto _ : state) benchmark::DoNotOptimize(layer.forward(x));
  set_counters(state, out, in, batch);
}

// What a user's float training loop computes for a Linear layer (two products and a column sum).
void float_backward(benchmark::State& state) {
  const Index out = state.range(0), in = state.range(1), batch = state.range(2);
  const Matrix<float> w = random_matrix(out, in, 1, 0.02f), x = random_matrix(batch, in, 3), dy = random_matrix(batch, out, 4);
  for (auto _ : state) {
    Matrix<float> dx = dy * w;
    Matrix<float> dw = dy.transpose() * x;
    Vector<float> db = dy.colwise().sum().transpose();
    benchmark::DoNotOptimize(dx.data());
    benchmark::DoNotOptimize(dw.data());
    benchmark::DoNotOptimize(db.data());
  }
  set_counters(state, out, in, 2 * batch);
}

void bitlinear_backward(benchmark::State& state) {
  const Index out = state.range(0), in = state.range(1), batch = state.range(2);
  bitnet::set_num_threads(1);
  const bitnet::BitLinear<float> layer(random_matrix(out, in, 1, 0.02f), Vector<float>(random_matrix(out, 1, 2)));
  const auto forward = bitnet::train_forward(layer, random_matrix(batch, in, 3), 1.0f);
  const Matrix<float> dy = random_matrix(batch, out, 4);
  for (auto _ : state) benchmark::DoNotOptimize(bitnet::backward(forward.tape, dy));
  set_counters(state, out, in, 2 * batch);
  bitnet::set_num_threads(0);
}

void bitlinear_train_forward(benchmark::State& state) {
  const Index out = state.range(0), in = state.range(1), batch = state.range(2);
  const float lambda = float(state.range(3)) / 100.0f;
  bitnet::set_num_threads(1);
  const bitnet::BitLinear<float> layer(random_matrix(out, in, 1, 0.02f), Vector<float>(random_matrix(out, 1, 2)));
  const Matrix<float> x = random_matrix(batch, in, 3);
  for (auto _ : state) benchmark::DoNotOptimize(bitnet::train_forward(layer, x, lambda));
  set_counters(state, out, in, batch);
  bitnet::set_num_threads(0);
}

void bitlinear_set_weight(benchmark::State& state) {
  const Index out = state.range(0), in = state.range(1);
  bitnet::BitLinear<float> layer(random_matrix(out, in, 1, 0.02f), Vector<float>(random_matrix(out, 1, 2)));
  const Matrix<float> next = random_matrix(out, in, 5, 0.02f);
  for (auto _ : state) {
    state.PauseTiming();
    Matrix<float> w = next;
    state.ResumeTiming();
    layer.set_weight(std::move(w));
  }
}

// out x in: the 2B4T attention projection and the MLP up projection.
constexpr Index shapes[][2] = {{2560, 2560}, {6912, 2560}};
constexpr Index batches[] = {32, 128};

}  // namespace

int main(int argc, char** argv) {
  for (const auto& shape : shapes) {
    for (Index batch : batches) {
      const auto args = {shape[0], shape[1], batch};
      benchmark::RegisterBenchmark("float_forward", float_forward)->Args(args)->Unit(benchmark::kMicrosecond);
      benchmark::RegisterBenchmark("float_backward", float_backward)->Args(args)->Unit(benchmark::kMicrosecond);
      benchmark::RegisterBenchmark("bitlinear_backward", bitlinear_backward)->Args(args)->Unit(benchmark::kMicrosecond);
      for (Index lambda_percent : {100, 50})
        benchmark::RegisterBenchmark("bitlinear_train_forward", bitlinear_train_forward)
            ->Args({shape[0], shape[1], batch, lambda_percent})
            ->Unit(benchmark::kMicrosecond);
    }
    benchmark::RegisterBenchmark("bitlinear_set_weight", bitlinear_set_weight)
        ->Args({shape[0], shape[1]})
        ->Unit(benchmark::kMicrosecond);
  }
  benchmark::Initialize(&argc, argv);
  if (benchmark::ReportUnrecognizedArguments(argc, argv)) return 1;
  benchmark::RunSpecifiedBenchmarks();
  benchmark::Shutdown();
  return 0;
}
