// Builds a small model of dense layers with "pretrained" weights, turns each layer into a
// BitLinear that keeps its weights and bias, runs both models on the same input and prints, per
// layer, what the conversion did: shapes, weight scale, fraction of zero weights and the output
// difference against the float layer.
#include <bitnet/bitnet.hpp>

#include <cmath>
#include <cstdio>
#include <random>
#include <string>
#include <vector>

namespace {

using bitnet::Index;
using bitnet::Matrix;
using bitnet::Vector;

struct named_layer {
  std::string name;
  bitnet::Linear<float> layer;
};

// Gaussian weights with std 1/sqrt(in) (as trained layers roughly have) and small biases.
bitnet::Linear<float> make_layer(Index in, Index out, std::mt19937& rng) {
  std::normal_distribution<float> weight(0.0f, 1.0f / std::sqrt(float(in)));
  std::normal_distribution<float> bias(0.0f, 0.02f);
  bitnet::Linear<float> layer(in, out);
  for (Index i = 0; i < layer.weight.size(); ++i) layer.weight.data()[i] = weight(rng);
  for (Index i = 0; i < out; ++i) (*layer.bias)(i) = bias(rng);
  return layer;
}

Matrix<float> relu(Matrix<float> x) { return x.cwiseMax(0.0f); }

double relative_error(const Matrix<float>& got, const Matrix<float>& want) {
  return double((got - want).norm() / want.norm());
}

}  // namespace

int main() {
  std::mt19937 rng(2026);
  std::vector<named_layer> model;
  model.push_back({"mlp.up", make_layer(256, 1024, rng)});
  model.push_back({"mlp.down", make_layer(1024, 256, rng)});
  model.push_back({"head", make_layer(256, 64, rng)});

  std::vector<bitnet::BitLinear<float>> converted;
  bitnet::bitlinear_options options;
  options.rms_norm = true;  // BitNet b1.58 normalizes each BitLinear's input
  for (const auto& [name, linear] : model) converted.emplace_back(linear.weight, linear.bias, options);

  std::normal_distribution<float> input(0.0f, 1.0f);
  Matrix<float> x(8, 256);
  for (Index i = 0; i < x.size(); ++i) x.data()[i] = input(rng);

  std::printf("%-9s %11s %13s %8s %14s %14s\n", "layer", "in x out", "weight scale", "zeros", "layer rel.err",
              "model rel.err");
  Matrix<float> dense = x, ternary = x;
  for (std::size_t i = 0; i < model.size(); ++i) {
    const auto& linear = model[i].layer;
    const auto& bit = converted[i];
    const bool last = i + 1 == model.size();
    // the same input through both layers isolates this layer's error ...
    const Matrix<float> alone = bit.forward(dense);
    const Matrix<float> dense_out = linear.forward(bitnet::rms_norm(dense));
    // ... and chaining each model through itself shows the accumulated error.
    dense = last ? dense_out : relu(dense_out);
    const Matrix<float> ternary_out = bit.forward(ternary);
    ternary = last ? ternary_out : relu(ternary_out);

    const double zeros = double((bit.ternary_weight().array() == 0).count()) / double(bit.ternary_weight().size());
    const std::string shape = std::to_string(bit.in_features()) + "x" + std::to_string(bit.out_features());
    std::printf("%-9s %11s %13.4f %7.1f%% %14.4f %14.4f\n", model[i].name.c_str(), shape.c_str(),
                double(bit.weight_scale()), 100.0 * zeros, relative_error(alone, dense_out),
                relative_error(ternary, dense));
    if (!(bit.weight() == linear.weight) || !(*bit.bias() == *linear.bias)) {
      std::printf("error: %s lost its pretrained weights\n", model[i].name.c_str());
      return 1;
    }
  }
  std::printf("every BitLinear holds its layer's weights and bias bit for bit\n");
  return 0;
}
