// Fine-tuning a libtorch model into BitNet b1.58 (bitnet::torch): train a small float model, swap
// its Linear layers for BitLinear modules that keep the weights (replace_linear, transfer::checked),
// measure the plain ternary model, then fine-tune it through autograd with torch::optim::AdamW and
// the quantization warm-up until it is back within 1 point of the float model; inference then runs
// on bitnet's packed kernels (eval mode under torch::NoGradGuard). Exits 1 if it does not recover.
#include <bitnet/torch.hpp>
#include <bitnet/training.hpp>

#include <cstdio>
#include <sstream>

namespace {

struct dataset {
  torch::Tensor x, y;
};

// Ten classes, each a mixture of four Gaussian clusters in 16 dimensions that overlap: a task a
// two-hidden-layer network learns well but not perfectly.
dataset make_data(const torch::Tensor& centers, std::int64_t n, std::uint64_t seed) {
  torch::manual_seed(seed);
  const torch::Tensor cluster = torch::randint(centers.size(0), {n});
  return {centers.index_select(0, cluster) + torch::randn({n, centers.size(1)}), cluster % 10};
}

double accuracy(torch::nn::Sequential& model, const dataset& data) {
  model->eval();
  torch::NoGradGuard no_grad;
  return model->forward(data.x).argmax(1).eq(data.y).to(torch::kDouble).mean().item<double>() * 100;
}

void train(torch::nn::Sequential& model, const dataset& data, int steps, double lr, int warmup_steps) {
  torch::optim::AdamW optimizer(model->parameters(), torch::optim::AdamWOptions(lr).weight_decay(0.01));
  const std::int64_t batch = 128;
  model->train();
  for (int step = 0; step < steps; ++step) {
    if (warmup_steps > 0)  // lambda = min(step / warmup, 1): from the float layer to the ternary one
      for (const auto& m : model->modules(false))
        if (auto* layer = m->as<bitnet::libtorch::BitLinearImpl>())
          layer->set_lambda(bitnet::quantization_warmup(step, warmup_steps));
    const torch::Tensor index = torch::randint(data.x.size(0), {batch});
    optimizer.zero_grad();
    const torch::Tensor loss =
        torch::nn::functional::cross_entropy(model->forward(data.x.index_select(0, index)), data.y.index_select(0, index));
    loss.backward();
    optimizer.step();
  }
}

}  // namespace

int main() {
  torch::set_num_threads(1);  // small matrices: threads cost more than they give
  torch::manual_seed(0);
  const torch::Tensor centers = torch::randn({40, 16}) * 0.9;
  const dataset train_set = make_data(centers, 8192, 1), test_set = make_data(centers, 4096, 2);

  torch::manual_seed(3);
  auto model = torch::nn::Sequential(torch::nn::Linear(16, 128), torch::nn::ReLU(), torch::nn::Linear(128, 128),
                                     torch::nn::ReLU(), torch::nn::Linear(128, 10));
  train(model, train_set, 800, 3e-3, 0);
  const double float_accuracy = accuracy(model, test_set);
  std::printf("float model:              %.2f%% test accuracy\n", float_accuracy);

  // The swap: every Linear becomes a BitLinear holding a verified copy of its weights. The optimizer
  // above held the old parameters: the fine-tuning below builds a new one, as the report notes.
  const auto report = bitnet::libtorch::replace_linear(model);
  std::printf("\n%s\n", report.to_string().c_str());
  const double ternary_accuracy = accuracy(model, test_set);  // eval: the packed kernels
  std::printf("ternary, no fine-tuning:  %.2f%%\n", ternary_accuracy);

  train(model, train_set, 800, 1e-3, 200);
  const double tuned_accuracy = accuracy(model, test_set);
  std::printf("ternary, fine-tuned:      %.2f%% (float %.2f%%: %+.2f points)\n", tuned_accuracy, float_accuracy,
              tuned_accuracy - float_accuracy);

  // Inference on the kernels, bit for bit what bitnet::BitLinear computes.
  model->eval();
  torch::NoGradGuard no_grad;
  const torch::Tensor logits = model->forward(test_set.x.slice(0, 0, 4));
  std::ostringstream predictions;
  predictions << logits.argmax(1).view({1, -1});
  std::printf("first predictions %s, labels %s\n", predictions.str().c_str(),
              (std::ostringstream() << test_set.y.slice(0, 0, 4).view({1, -1})).str().c_str());
  if (tuned_accuracy < float_accuracy - 1.0) {
    std::printf("the fine-tuned ternary model did not recover to within 1 point of the float model\n");
    return 1;
  }
  return 0;
}
