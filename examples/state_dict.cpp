// Weights of a whole model in and out of safetensors files by dotted path, like PyTorch's
// state_dict: save a small transformer-like model, load it into a fresh one, convert it to
// BitLinear layers, save those in the Hugging Face packed BitNet form under "model.", and load
// that checkpoint into another converted model. Also shows a strict-mode error, which lists every
// problem at once and leaves the model as it was.
#include <bitnet/bitnet.hpp>
#include <bitnet/safetensors.hpp>
#include <bitnet/state_dict.hpp>

#include <cmath>
#include <cstdio>
#include <filesystem>
#include <random>
#include <string>
#include <vector>

namespace st = bitnet::safetensors;
using bitnet::Index;
using bitnet::Linear;
using bitnet::Matrix;
using slot = bitnet::linear_slot<Linear<float>>;

struct mlp {
  slot up_proj, down_proj;
};
BITNET_LAYERS(mlp, up_proj, down_proj);

struct decoder_layer {
  slot q_proj;
  mlp ffn;
};
BITNET_LAYERS(decoder_layer, q_proj, ffn);

struct model {
  std::vector<decoder_layer> layers;
};
BITNET_LAYERS(model, layers);

model make_model(unsigned seed) {
  std::mt19937 rng(seed);
  const auto linear = [&](Index in, Index out) {
    std::normal_distribution<float> dist(0.0f, 1.0f / std::sqrt(float(in)));
    Linear<float> layer(in, out);
    for (Index i = 0; i < layer.weight.size(); ++i) layer.weight.data()[i] = dist(rng);
    for (Index i = 0; i < out; ++i) (*layer.bias)(i) = dist(rng) / 8;
    return layer;
  };
  model m;
  m.layers.reserve(2);
  for (int i = 0; i < 2; ++i) {
    // Named parts, then one move: GCC 12 warns falsely (-Wmaybe-uninitialized) about a nested
    // temporary here, and Clang 14 has no parenthesized aggregate initialization for emplace_back.
    slot q_proj = linear(16, 16);
    mlp ffn{linear(16, 43), linear(43, 16)};
    m.layers.push_back(decoder_layer{std::move(q_proj), std::move(ffn)});
  }
  return m;
}

const Matrix<float>& weight_of(const slot& s) {
  return std::holds_alternative<Linear<float>>(s) ? std::get<Linear<float>>(s).weight
                                                  : std::get<bitnet::BitLinear<float>>(s).weight();
}

int main() {
  const auto dir = std::filesystem::temp_directory_path();
  const auto dense_file = dir / "bitnet_state_dict_dense.safetensors";
  const auto packed_file = dir / "bitnet_state_dict_packed.safetensors";
  bool ok = true;

  // 1. Dense weights: save, then load into a model with other weights.
  model trained = make_model(1);
  bitnet::save_state_dict(trained, dense_file);
  model fresh = make_model(2);
  const bitnet::state_dict_report report = bitnet::load_state_dict(fresh, dense_file);
  const bool same = weight_of(fresh.layers[1].ffn.down_proj) == weight_of(trained.layers[1].ffn.down_proj);
  std::printf("dense: loaded %zu tensors, layers.1.ffn.down_proj %s\n", report.loaded.size(),
              same ? "identical" : "DIFFERENT");
  ok = ok && same;

  // 2. Convert to BitLinear and save the Hugging Face packed form (U8 codes + weight_scale).
  bitnet::replace_linear(fresh);
  const bitnet::state_dict_options hf_options{.prefix = "model.", .bit_linear = bitnet::bit_linear_storage::hf_packed};
  bitnet::save_state_dict(fresh, packed_file, hf_options);
  const st::reader packed(packed_file);
  for (const st::tensor_info& t : packed.tensors())
    if (t.name.starts_with("model.layers.0."))
      std::printf("  %-36s %-4s %s\n", t.name.c_str(), std::string(st::dtype_name(t.type)).c_str(),
                  st::detail::shape_text(t.shape).c_str());

  // 3. Load the packed checkpoint into another converted model: same codes, scales and outputs.
  model other = make_model(3);
  bitnet::replace_linear(other);
  bitnet::load_state_dict(other, packed_file, hf_options);
  const auto& a = std::get<bitnet::BitLinear<float>>(fresh.layers[0].ffn.up_proj);
  const auto& b = std::get<bitnet::BitLinear<float>>(other.layers[0].ffn.up_proj);
  const Matrix<float> x = Matrix<float>::Random(2, 16);
  // The default (autobitlinear) convention stores the bias divided by the scale: outputs agree to
  // float rounding, the codes and the scale exactly.
  const bool packed_same = a.ternary_weight() == b.ternary_weight() && a.weight_scale() == b.weight_scale() &&
                           a.forward(x).isApprox(b.forward(x), 1e-6f);
  std::printf("packed: layers.0.ffn.up_proj %s\n", packed_same ? "same codes and scale, same outputs" : "DIFFERENT");
  ok = ok && packed_same;

  // 4. Strict mode: the packed file without the prefix matches nothing. One error lists it all.
  try {
    bitnet::load_state_dict(other, packed_file);
    ok = false;
  } catch (const bitnet::io_error& e) {
    const std::string text = e.what();
    std::printf("strict load without the prefix:\n%.400s\n  ...\n", text.c_str());
  }

  std::filesystem::remove(dense_file);
  std::filesystem::remove(packed_file);
  return ok ? 0 : 1;
}
