// bitnet/hf_safetensors.hpp - Hugging Face BitNet layers in safetensors files.
//
// A layer at dotted path P is the tensors P.weight (U8 packed, see bitnet/hf.hpp),
// P.weight_scale (one element) and, optionally, P.bias. Needs nlohmann/json (bitnet::safetensors).
#pragma once

#include <optional>
#include <string>
#include <string_view>
#include <vector>

#include "bit_linear.hpp"
#include "errors.hpp"
#include "hf.hpp"
#include "matrix.hpp"
#include "safetensors.hpp"

namespace bitnet::hf {

/// Reads the packed layer at `path` (tensors path.weight, path.weight_scale, optional path.bias).
/// `out_features` is needed because the packed rows only give ceil(out/4); pass 0 to take it from
/// the bias, or 4 x packed rows when there is no bias. Throws io_error for missing or mis-typed
/// tensors and shape_error for inconsistent shapes; unpacking checks the codes later.
template <real_scalar T>
packed_layer<T> read_packed_layer(const safetensors::reader& file, std::string_view path, Index out_features = 0,
                                  scale_convention convention = default_scale_convention) {
  const std::string prefix(path);
  const safetensors::tensor_info& weight = file.info(prefix + ".weight");
  if (weight.type != safetensors::dtype::U8)
    throw io_error(safetensors::detail::message(file.source_name(), weight.name,
                                                "is " + std::string(safetensors::dtype_name(weight.type)) +
                                                    ", a packed BitNet weight must be U8"));
  packed_layer<T> layer;
  layer.convention = convention;
  layer.weight = file.read_matrix<std::uint8_t>(weight.name);
  const std::vector<T> scale = file.read_values<T>(prefix + ".weight_scale");
  if (scale.size() != 1)
    throw shape_error(safetensors::detail::message(file.source_name(), prefix + ".weight_scale",
                                                   "has " + std::to_string(scale.size()) + " elements, expected 1"));
  layer.weight_scale = scale[0];
  if (file.contains(prefix + ".bias")) layer.bias = file.read_vector<T>(prefix + ".bias");
  if (out_features == 0) out_features = layer.bias ? layer.bias->size() : values_per_byte * layer.weight.rows();
  if (packed_rows(out_features) != layer.weight.rows() || (layer.bias && layer.bias->size() != out_features))
    throw shape_error(safetensors::detail::message(
        file.source_name(), weight.name,
        "has " + std::to_string(layer.weight.rows()) + " packed rows" +
            (layer.bias ? " and the bias " + std::to_string(layer.bias->size()) + " elements" : std::string()) +
            ", inconsistent with " + std::to_string(out_features) + " output features"));
  layer.out_features = out_features;
  return layer;
}

/// Reads the layer at `path` and builds the BitLinear it describes (see hf::to_bit_linear).
template <real_scalar T>
BitLinear<T> load_bit_linear(const safetensors::reader& file, std::string_view path, Index out_features = 0,
                             scale_convention convention = default_scale_convention, bitlinear_options options = {}) {
  return to_bit_linear(read_packed_layer<T>(file, path, out_features, convention), options);
}

/// Declares the tensors of a packed layer (out x in) for a safetensors::writer: path.weight as
/// U8 ceil(out/4) x in, path.weight_scale as one `scale_type` element, path.bias if `bias`.
inline void declare_packed_layer(std::vector<safetensors::tensor_spec>& specs, std::string_view path, Index out_features,
                                 Index in_features, bool bias, safetensors::dtype scale_type = safetensors::dtype::F32,
                                 safetensors::dtype bias_type = safetensors::dtype::F32) {
  if (out_features <= 0 || in_features <= 0)
    throw shape_error("hf::declare_packed_layer: " + std::string(path) + ": empty layer " +
                      std::to_string(out_features) + "x" + std::to_string(in_features));
  const std::string prefix(path);
  specs.push_back({prefix + ".weight", safetensors::dtype::U8,
                   {std::uint64_t(packed_rows(out_features)), std::uint64_t(in_features)}});
  specs.push_back({prefix + ".weight_scale", scale_type, {1}});
  if (bias) specs.push_back({prefix + ".bias", bias_type, {std::uint64_t(out_features)}});
}

/// Writes a packed layer declared with declare_packed_layer.
template <real_scalar T>
void write_packed_layer(safetensors::writer& file, std::string_view path, const packed_layer<T>& layer) {
  const std::string prefix(path);
  file.write(prefix + ".weight", layer.weight);
  const T scale[1] = {layer.weight_scale};
  file.write_values<T>(prefix + ".weight_scale", scale);
  if (layer.bias) file.write(prefix + ".bias", *layer.bias);
}

}  // namespace bitnet::hf
