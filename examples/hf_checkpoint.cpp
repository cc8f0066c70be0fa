// Saves BitLinear layers as a Hugging Face BitNet checkpoint (the packed form transformers loads
// with quant_method "bitnet") and loads them back: the loaded layers hold the same ternary codes
// and scale and compute the same outputs. Prints the file's tensors and the config.json block.
#include <bitnet/bitnet.hpp>
#include <bitnet/hf_safetensors.hpp>
#include <bitnet/safetensors.hpp>

#include <cmath>
#include <cstdio>
#include <filesystem>
#include <random>
#include <string>
#include <vector>

namespace st = bitnet::safetensors;
namespace hf = bitnet::hf;
using bitnet::Index;
using bitnet::Matrix;

int main() {
  // Two "pretrained" projections of an MLP block (out x in), Gaussian weights.
  std::mt19937 rng(1);
  const auto random_layer = [&](Index out, Index in) {
    std::normal_distribution<float> dist(0.0f, 1.0f / std::sqrt(float(in)));
    Matrix<float> w(out, in);
    for (Index i = 0; i < w.size(); ++i) w.data()[i] = dist(rng);
    return bitnet::BitLinear<float>(w);
  };
  const std::vector<std::pair<std::string, bitnet::BitLinear<float>>> layers{
      {"model.layers.0.mlp.up_proj", random_layer(70, 32)},     // 70 rows: ceil(70/4) = 18 packed rows
      {"model.layers.0.mlp.down_proj", random_layer(32, 70)}};

  const auto path = std::filesystem::temp_directory_path() / "bitnet_example.safetensors";
  const auto convention = hf::scale_convention::autobitlinear;  // as microsoft/bitnet-b1.58-2B-4T
  {
    std::vector<st::tensor_spec> specs;
    for (const auto& [name, layer] : layers)
      hf::declare_packed_layer(specs, name, layer.out_features(), layer.in_features(), false);
    hf::quantization_config config;  // recorded in the file: readers take the convention from it
    config.linear_class = convention;
    st::writer out(path, specs, {{"format", "pt"}, hf::metadata_entry(config)});
    for (const auto& [name, layer] : layers) hf::write_packed_layer(out, name, hf::to_packed(layer, convention));
    out.finish();
  }

  const st::reader file(path);
  for (const st::tensor_info& t : file.tensors())
    std::printf("%-44s %-4s %s\n", t.name.c_str(), std::string(st::dtype_name(t.type)).c_str(),
                (t.shape.size() == 2 ? std::to_string(t.shape[0]) + "x" + std::to_string(t.shape[1])
                                     : std::to_string(t.shape[0]))
                    .c_str());
  std::printf("config.json: \"quantization_config\": %s\n", hf::quantization_config_json(convention).c_str());

  bool all_same = true;
  for (const auto& [name, layer] : layers) {
    // No convention given: the file's __metadata__ declares it (a contradicting one would throw).
    const bitnet::BitLinear<float> loaded = hf::load_bit_linear<float>(file, name, layer.out_features());
    Matrix<float> x = Matrix<float>::Random(3, layer.in_features());
    const bool same = loaded.ternary_weight() == layer.ternary_weight() &&
                      loaded.weight_scale() == layer.weight_scale() && loaded.forward(x) == layer.forward(x);
    std::printf("%s: reloaded, %s\n", name.c_str(), same ? "same codes, scale and outputs" : "DIFFERENT");
    all_same = all_same && same;
  }
  std::filesystem::remove(path);
  return all_same ? 0 : 1;
}
