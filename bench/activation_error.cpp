// The error activation quantization adds, per token (BitNet b1.58) against per block of the weight
// groups (as llama.cpp quantizes activations for block formats), on a Qwen3-1.7B-shaped mlp.up_proj
// (2048 -> 6144) whose weights are exactly ternary per group of 128 (Ternary Bonsai's form): the
// weights are the same in both layers, so the difference is the activations' alone. Inputs: Gaussian
// tokens, and tokens with a few outlier channels (LLM activations have them). Prints, per case, the
// relative error ||y - y_float||_F / ||y_float||_F against the float product in double.
//
//   bitnet_activation_error            (numbers in docs/quantization.md)
#include <bitnet/bit_linear.hpp>

#include <cmath>
#include <cstdio>
#include <random>

using bitnet::BitLinear;
using bitnet::Index;
using bitnet::Matrix;

int main() {
  constexpr Index in = 2048, out = 6144, tokens = 32, group = 128;
  std::mt19937 rng(20);
  std::uniform_int_distribution<int> code(-1, 1);
  std::uniform_real_distribution<double> scale(0.01, 0.03);
  Matrix<float> w(out, in);
  for (Index r = 0; r < out; ++r)
    for (Index first = 0; first < in; first += group) {
      const float d = float(scale(rng));
      for (Index c = first; c < first + group; ++c) w(r, c) = float(code(rng)) * d;
    }
  bitnet::bitlinear_options per_token{.weight_scales = bitnet::weight_scaling::per_group, .group_size = group};
  bitnet::bitlinear_options per_block = per_token;
  per_block.activation_scales = bitnet::activation_scaling::per_block;
  const auto token_layer = BitLinear<float>::from_exact_ternary(w, std::nullopt, per_token);
  const auto block_layer = BitLinear<float>::from_exact_ternary(w, std::nullopt, per_block);

  std::printf("%-34s %14s %14s\n", "input (32 tokens, 2048 -> 6144)", "per_token", "per_block g128");
  std::normal_distribution<double> normal(0.0, 1.0);
  for (const int outliers : {0, 4, 16}) {
    Matrix<float> x(tokens, in);
    for (float& v : x.reshaped()) v = float(normal(rng));
    for (int k = 0; k < outliers; ++k) x.col(Index(k * 97 % in)) *= 50.0f;  // channels 50x the rest
    const Matrix<double> exact = x.cast<double>() * w.cast<double>().transpose();
    const auto relative = [&](const Matrix<float>& y) { return (y.cast<double>() - exact).norm() / exact.norm(); };
    char name[64];
    std::snprintf(name, sizeof name, "%s%d outlier channels (x50)", outliers == 0 ? "Gaussian, " : "Gaussian + ", outliers);
    std::printf("%-34s %14.3e %14.3e\n", name, relative(token_layer.forward(x)), relative(block_layer.forward(x)));
  }
  return 0;
}
