// bitnet::libtorch::BitLinear's eval forward (the packed kernels behind a torch module, under
// torch::NoGradGuard) against torch::nn::functional::linear in float32 on the same 6912x2560 layer,
// batch 1 and 32, one thread each (torch::set_num_threads(1), bitnet::set_num_threads(1)); and one
// training step (forward, backward, AdamW) of each.
#include <benchmark/benchmark.h>

#include <bitnet/torch.hpp>

namespace {

constexpr std::int64_t out_features = 6912, in_features = 2560;

void single_thread() {
  torch::set_num_threads(1);
  bitnet::set_num_threads(1);
}

void bitlinear_eval(benchmark::State& state) {
  single_thread();
  torch::manual_seed(0);
  bitnet::libtorch::BitLinear layer(in_features, out_features);
  layer->eval();
  torch::NoGradGuard no_grad;
  const torch::Tensor x = torch::randn({state.range(0), in_features});
  layer->forward(x);  // packs once
  for (auto _ : state) benchmark::DoNotOptimize(layer->forward(x).data_ptr());
}

void torch_linear_f32(benchmark::State& state) {
  single_thread();
  torch::manual_seed(0);
  torch::nn::Linear layer(in_features, out_features);
  layer->eval();
  torch::NoGradGuard no_grad;
  const torch::Tensor x = torch::randn({state.range(0), in_features});
  for (auto _ : state) benchmark::DoNotOptimize(layer->forward(x).data_ptr());
}

template <class Layer>
void training_step(benchmark::State& state, Layer layer) {
  single_thread();
  layer->train();
  torch::optim::AdamW optimizer(layer->parameters(), torch::optim::AdamWOptions(1e-4));
  const torch::Tensor x = torch::randn({state.range(0), in_features});
  for (auto _ : state) {
    optimizer.zero_grad();
    layer->forward(x).square().mean().backward();
    optimizer.step();
  }
}

void bitlinear_train_step(benchmark::State& state) {
  training_step(state, bitnet::libtorch::BitLinear(in_features, out_features));
}
void torch_linear_train_step(benchmark::State& state) {
  training_step(state, torch::nn::Linear(in_features, out_features));
}

BENCHMARK(bitlinear_eval)->Arg(1)->Arg(32)->Unit(benchmark::kMicrosecond);
BENCHMARK(torch_linear_f32)->Arg(1)->Arg(32)->Unit(benchmark::kMicrosecond);
BENCHMARK(bitlinear_train_step)->Arg(32)->Unit(benchmark::kMillisecond);
BENCHMARK(torch_linear_train_step)->Arg(32)->Unit(benchmark::kMillisecond);

}  // namespace

BENCHMARK_MAIN();
