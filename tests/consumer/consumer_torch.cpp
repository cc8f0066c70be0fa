// The installed bitnet::torch component: a libtorch Sequential converted and run on the kernels.
#include <bitnet/torch.hpp>

#include <cstdio>

int main() {
  torch::manual_seed(0);
  auto model = torch::nn::Sequential(torch::nn::Linear(8, 16), torch::nn::ReLU(), torch::nn::Linear(16, 4));
  const auto report = bitnet::libtorch::replace_linear(model);
  model->eval();
  torch::NoGradGuard no_grad;
  const torch::Tensor y = model->forward(torch::randn({2, 8}));
  std::printf("%zu layers converted, output %lld x %lld\n", report.layers.size(), (long long)y.size(0),
              (long long)y.size(1));
  return report.layers.size() == 2 && y.size(1) == 4 ? 0 : 1;
}
