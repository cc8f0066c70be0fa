// A tiny app using the optional safetensors component: find_package(bitnet COMPONENTS safetensors)
// and bitnet::safetensors. Writes a packed BitNet layer, reads it back, checks it computes the same.
#include <bitnet/bitnet.hpp>
#include <bitnet/hf_safetensors.hpp>

#include <cstdio>
#include <filesystem>

int main() {
  bitnet::Matrix<float> w(2, 4);
  w << 1, -1, 0, 2,
       -2, 1, 1, 0;
  const bitnet::BitLinear<float> layer(w);
  const auto path = std::filesystem::temp_directory_path() / "bitnet_consumer.safetensors";
  std::vector<bitnet::safetensors::tensor_spec> specs;
  bitnet::hf::declare_packed_layer(specs, "fc", 2, 4, false);
  // The file declares its scale convention; readers take it from there.
  bitnet::safetensors::writer out(path, specs, {bitnet::hf::metadata_entry(bitnet::hf::quantization_config{})});
  bitnet::hf::write_packed_layer(out, "fc", bitnet::hf::to_packed(layer));
  out.finish();
  const bitnet::BitLinear<float> loaded =
      bitnet::hf::load_bit_linear<float>(bitnet::safetensors::reader(path), "fc", 2);
  std::filesystem::remove(path);
  bitnet::Matrix<float> x(1, 4);
  x << 127, -127, 62.5f, 0;
  std::printf("packed layer reloaded: %s\n", loaded.forward(x) == layer.forward(x) ? "same output" : "DIFFERENT");
  return loaded.forward(x) == layer.forward(x) ? 0 : 1;
}
