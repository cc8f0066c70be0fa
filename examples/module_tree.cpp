// A polymorphic module tree in the PyTorch style: modules own named children through
// std::unique_ptr<module>, and the library learns the tree from four small hooks next to it.
#include <bitnet/bitnet.hpp>

#include <cmath>
#include <iostream>
#include <memory>
#include <random>
#include <string>
#include <utility>
#include <vector>

namespace nn {

using bitnet::Matrix;

struct module {
  virtual ~module() = default;
  virtual Matrix<float> forward(const Matrix<float>& x) const = 0;
  std::vector<std::pair<std::string, std::unique_ptr<module>>> named_children;
};

struct linear : module {
  explicit linear(bitnet::Linear<float> l) : layer(std::move(l)) {}
  Matrix<float> forward(const Matrix<float>& x) const override { return layer.forward(x); }
  bitnet::Linear<float> layer;
};

struct bit_linear : module {
  explicit bit_linear(bitnet::BitLinear<float> l) : layer(std::move(l)) {}
  Matrix<float> forward(const Matrix<float>& x) const override { return layer.forward(x); }
  bitnet::BitLinear<float> layer;
};

struct gelu : module {
  Matrix<float> forward(const Matrix<float>& x) const override {
    return x.unaryExpr([](float v) { return 0.5f * v * (1.0f + std::erf(v / std::sqrt(2.0f))); });
  }
};

struct sequential : module {
  Matrix<float> forward(const Matrix<float>& x) const override {
    Matrix<float> h = x;
    for (const auto& [name, child] : named_children) h = child->forward(h);
    return h;
  }
  sequential& add(std::string name, std::unique_ptr<module> child) {
    named_children.emplace_back(std::move(name), std::move(child));
    return *this;
  }
};

// --- the hooks: how bitnet walks this tree ---------------------------------------------------------
template <class Visit>
void bitnet_children(module& m, Visit& visit) {  // like named_children()
  for (auto& [name, child] : m.named_children) visit(name, child);
}
inline bitnet::linear_view<float> bitnet_linear(const linear& l) { return {l.layer.weight, l.layer.bias}; }
inline linear* bitnet_as_linear(module& m) noexcept { return dynamic_cast<linear*>(&m); }
inline std::unique_ptr<module> bitnet_make_replacement(const linear&, bitnet::BitLinear<float>&& bit) {
  return std::make_unique<bit_linear>(std::move(bit));
}

}  // namespace nn

int main() {
  std::mt19937 rng(3);
  std::normal_distribution<float> normal(0.0f, 0.1f);
  const auto dense = [&](bitnet::Index in, bitnet::Index out) {
    bitnet::Linear<float> l(in, out);
    for (bitnet::Index i = 0; i < l.weight.size(); ++i) l.weight.data()[i] = normal(rng);
    return std::make_unique<nn::linear>(std::move(l));
  };
  auto encoder = std::make_unique<nn::sequential>();
  for (int i = 0; i < 2; ++i) {
    auto mlp = std::make_unique<nn::sequential>();
    mlp->add("fc1", dense(32, 128)).add("act", std::make_unique<nn::gelu>()).add("fc2", dense(128, 32));
    encoder->add("layer" + std::to_string(i), std::move(mlp));
  }
  nn::sequential model;
  model.add("encoder", std::move(encoder)).add("classifier", dense(32, 4));

  const auto run = [](const nn::module& m, const bitnet::Matrix<float>& x) { return m.forward(x); };
  const auto before = bitnet::record_outputs(model, run, std::vector<bitnet::Matrix<float>>{bitnet::Matrix<float>::Random(8, 32)});

  bitnet::replace_options options;
  options.exclude = {"classifier"};
  const auto report = bitnet::replace_linear<bitnet::transfer::copy>(model, options);
  std::cout << report << "\nmodel output: " << bitnet::compare_outputs(before, model, run) << "\n";

  const auto* fc2 = dynamic_cast<nn::bit_linear*>(
      model.named_children[0].second->named_children[1].second->named_children[2].second.get());
  const bool ok = report.layers.size() == 4 && fc2 != nullptr &&
                  dynamic_cast<nn::linear*>(model.named_children[1].second.get()) != nullptr;
  std::cout << (ok ? "encoder layers are BitLinear modules; the classifier stayed dense\n" : "error\n");
  return ok ? 0 : 1;
}
