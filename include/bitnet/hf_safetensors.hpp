// bitnet/hf_safetensors.hpp - Hugging Face BitNet layers in safetensors files.
//
// A layer at dotted path P is the tensors P.weight (U8 packed, see bitnet/hf.hpp),
// P.weight_scale (one element) and, optionally, P.bias. Needs nlohmann/json (bitnet::safetensors).
//
// The scale convention is read, never assumed: a file bitnet writes declares it in its
// "__metadata__" (key "quantization_config", the JSON block of config.json); readers take it from
// there, from a model folder's config.json (bitnet/hf_model.hpp), or from an explicit choice that
// must agree with any declaration. Packed layers with no declaration and no choice are an io_error.
#pragma once

#include <map>
#include <algorithm>
#include <cstdint>
#include <limits>
#include <optional>
#include <string>
#include <string_view>
#include <utility>
#include <variant>
#include <vector>

#include "bit_linear.hpp"
#include "detail/json_leaves.hpp"
#include "errors.hpp"
#include "hf.hpp"
#include "matrix.hpp"
#include "safetensors.hpp"

namespace bitnet::hf {

namespace detail {

/// Collects the quantization_config block found at `prefix` of a JSON document.
class quantization_config_collector {
 public:
  quantization_config_collector(std::vector<std::string> prefix, std::string source)
      : prefix_(std::move(prefix)), source_(std::move(source)) {
    config_.linear_class.reset();
    config_.quant_method.clear();
  }

  void container(const std::vector<std::string>& path, bitnet::detail::json_container kind) {
    if (path == prefix_) {
      if (kind != bitnet::detail::json_container::object) fail("", "is not an object");
      present_ = true;
    }
  }

  void leaf(const bitnet::detail::json_leaf& leaf) {
    const std::vector<std::string>& path = leaf.path;
    if (path.size() < prefix_.size() || !std::equal(prefix_.begin(), prefix_.end(), path.begin())) return;
    if (path.size() == prefix_.size()) {  // "quantization_config": null is no block; another scalar is wrong
      if (!std::holds_alternative<std::nullptr_t>(leaf.value)) fail("", "is not an object");
      return;
    }
    const std::string& field = path[prefix_.size()];
    const std::size_t depth = path.size() - prefix_.size();
    const auto* text = std::get_if<std::string>(&leaf.value);
    const bool is_null = std::holds_alternative<std::nullptr_t>(leaf.value);
    if (field == "quant_method" && depth == 1) {
      if (!text) fail(field, "is not a string");
      config_.quant_method = *text;
    } else if (field == "linear_class" && depth == 1) {
      if (is_null) return;
      if (!text || (*text != "bitlinear" && *text != "autobitlinear"))
        fail(field, "must be \"bitlinear\" or \"autobitlinear\"");
      config_.linear_class = *text == "bitlinear" ? scale_convention::bitlinear : scale_convention::autobitlinear;
    } else if (field == "quantization_mode" && depth == 1) {
      if (is_null) return;
      if (!text || (*text != "offline" && *text != "online")) fail(field, "must be \"offline\" or \"online\"");
      config_.mode = *text == "online" ? quantization_mode::online : quantization_mode::offline;
    } else if (field == "use_rms_norm" && depth == 1) {
      if (is_null) return;
      const bool* flag = std::get_if<bool>(&leaf.value);
      if (!flag) fail(field, "is not a boolean");
      config_.use_rms_norm = *flag;
    } else if (field == "rms_norm_eps" && depth == 1) {
      if (is_null) return;
      const std::optional<double> number = number_of(leaf);
      if (!number || !(*number > 0)) fail(field, "is not a positive number");
      config_.rms_norm_eps = *number;
    } else if (field == "modules_to_not_convert") {
      if (depth == 1 && is_null) return;
      if (depth != 2 || !text) fail(field, "must be null or a list of strings");
      config_.modules_to_not_convert.push_back(*text);
    } else if (field == "bitnet_out_features") {
      const auto* count = std::get_if<std::uint64_t>(&leaf.value);
      if (depth != 2 || !count || *count == 0 || *count > std::uint64_t(std::numeric_limits<Index>::max()))
        fail(field, "must map layer names to positive integers");
      config_.out_features[path[prefix_.size() + 1]] = Index(*count);
    }
  }

  std::optional<quantization_config> result() const {
    if (!present_) return std::nullopt;
    return config_;
  }

 private:
  static std::optional<double> number_of(const bitnet::detail::json_leaf& leaf) {
    if (const auto* d = std::get_if<double>(&leaf.value)) return *d;
    if (const auto* i = std::get_if<std::int64_t>(&leaf.value)) return double(*i);
    if (const auto* u = std::get_if<std::uint64_t>(&leaf.value)) return double(*u);
    return std::nullopt;
  }
  [[noreturn]] void fail(std::string_view field, std::string_view rule) const {
    throw io_error(source_ + ": quantization_config" + (field.empty() ? std::string() : "." + std::string(field)) +
                   " " + std::string(rule));
  }

  std::vector<std::string> prefix_;
  std::string source_;
  quantization_config config_;
  bool present_ = false;
};

inline std::optional<quantization_config> parse_block(std::string_view json, std::string_view source,
                                                      std::vector<std::string> prefix) {
  quantization_config_collector collector(std::move(prefix), std::string(source));
  bitnet::detail::parse_json_leaves(
      json, source, [&](const bitnet::detail::json_leaf& leaf) { collector.leaf(leaf); },
      [&](const std::vector<std::string>& path, bitnet::detail::json_container kind) { collector.container(path, kind); });
  return collector.result();
}

}  // namespace detail

/// Parses the JSON text of a quantization_config block (as hf::to_json writes it). Throws io_error
/// naming `source` for malformed JSON, a block that is not an object, or a field of the wrong type
/// or value (linear_class other than "bitlinear" / "autobitlinear", ...). Unknown keys are ignored,
/// as transformers does; a missing linear_class leaves it empty.
inline quantization_config parse_quantization_config(std::string_view json, std::string_view source) {
  std::optional<quantization_config> config = detail::parse_block(json, source, {});
  if (!config) throw io_error(std::string(source) + ": quantization_config is not an object");
  return *config;
}

/// The quantization_config block of a config.json's text; empty when it has none (or null).
inline std::optional<quantization_config> config_json_quantization(std::string_view config_json,
                                                                   std::string_view source) {
  return detail::parse_block(config_json, source, {"quantization_config"});
}

/// The key of a safetensors file's "__metadata__" that holds the quantization_config block.
inline constexpr std::string_view metadata_key = "quantization_config";

/// The quantization_config a safetensors file declares in its "__metadata__"; empty when none.
inline std::optional<quantization_config> declared_quantization(const safetensors::reader& file) {
  const auto& metadata = file.metadata();
  const auto found = metadata.find(std::string(metadata_key));
  if (found == metadata.end()) return std::nullopt;
  return parse_quantization_config(found->second, file.source_name() + ": __metadata__");
}

/// The scale convention of packed layers: the declared one (`declared`, found at `where`), or the
/// caller's `requested` one when nothing declares it. Throws io_error when both are given and
/// differ (naming both), when the declaration is not a BitNet one or has no linear_class and the
/// caller chose nothing, and when neither exists: never a default.
inline scale_convention resolve_scale_convention(const std::optional<quantization_config>& declared,
                                                 std::string_view where,
                                                 std::optional<scale_convention> requested) {
  const auto name = [](scale_convention c) { return "\"" + std::string(convention_name(c)) + "\""; };
  if (declared && declared->quant_method != "bitnet")
    throw io_error(std::string(where) + " declares quant_method \"" + declared->quant_method +
                   "\", not \"bitnet\": these are not BitNet packed layers");
  if (declared && declared->linear_class) {
    if (requested && *requested != *declared->linear_class)
      throw io_error(std::string(where) + " declares linear_class " + name(*declared->linear_class) +
                     ", but the caller asked for the scale convention " + name(*requested) +
                     ": one of them is wrong (the scales differ by a factor of about 1 / mean|W|^2)");
    return *declared->linear_class;
  }
  if (requested) return *requested;
  throw io_error(std::string(where) + (declared ? " has a quantization_config without linear_class (transformers "
                                                  "would read it as \"bitlinear\")"
                                                : " declares no scale convention (no quantization_config with a "
                                                  "linear_class)") +
                 ", and none was given: pass it explicitly (bitlinear: weight_scale = 1 / mean|W|, "
                 "transformers' BitLinear; autobitlinear: weight_scale = mean|W|, AutoBitLinear, "
                 "microsoft/bitnet-b1.58-2B-4T); bitnet never guesses it");
}

/// Reads the packed layer at `path` (tensors path.weight, path.weight_scale, optional path.bias).
/// `out_features` is needed because the packed rows only give ceil(out/4); pass 0 to take it from
/// the file's declaration (bitnet_out_features), the bias, or 4 x packed rows (transformers' rule).
/// The scale convention is the file's (resolve_scale_convention; `convention` must agree with it,
/// or stands in for a file that declares none). Throws io_error for missing or mis-typed tensors
/// and convention problems, shape_error for inconsistent shapes; unpacking checks the codes later.
namespace detail {

/// read_packed_layer over any source of named tensors (a reader, an hf::checkpoint whose layer may
/// span files), with the convention already resolved and the declared out_features (or 0).
template <real_scalar T, class Source>
packed_layer<T> read_packed_from(const Source& file, std::string_view path, Index out_features,
                                 scale_convention convention, Index declared_out_features) {
  const std::string prefix(path);
  const safetensors::tensor_info& weight = file.info(prefix + ".weight");
  if (weight.type != safetensors::dtype::U8)
    throw io_error(safetensors::detail::message(file.source_name(), weight.name,
                                                "is " + std::string(safetensors::dtype_name(weight.type)) +
                                                    ", a packed BitNet weight must be U8"));
  packed_layer<T> layer;
  layer.weight = file.template read_matrix<std::uint8_t>(weight.name);
  const std::vector<T> scale = file.template read_values<T>(prefix + ".weight_scale");
  if (scale.size() != 1)
    throw shape_error(safetensors::detail::message(file.source_name(), prefix + ".weight_scale",
                                                   "has " + std::to_string(scale.size()) + " elements, expected 1"));
  layer.weight_scale = scale[0];
  if (file.contains(prefix + ".bias")) layer.bias = file.template read_vector<T>(prefix + ".bias");
  if (out_features == 0) out_features = declared_out_features;
  if (out_features == 0) out_features = layer.bias ? layer.bias->size() : values_per_byte * layer.weight.rows();
  if (packed_rows(out_features) != layer.weight.rows() || (layer.bias && layer.bias->size() != out_features))
    throw shape_error(safetensors::detail::message(
        file.source_name(), weight.name,
        "has " + std::to_string(layer.weight.rows()) + " packed rows" +
            (layer.bias ? " and the bias " + std::to_string(layer.bias->size()) + " elements" : std::string()) +
            ", inconsistent with " + std::to_string(out_features) + " output features"));
  layer.out_features = out_features;
  layer.convention = convention;
  return layer;
}

}  // namespace detail

/// Reads the packed layer at `path` (tensors path.weight, path.weight_scale, optional path.bias).
/// `out_features` is needed because the packed rows only give ceil(out/4); pass 0 to take it from
/// the file's declaration (bitnet_out_features), the bias, or 4 x packed rows (transformers' rule).
/// The scale convention is the file's (resolve_scale_convention; `convention` must agree with it,
/// or stands in for a file that declares none). Throws io_error for missing or mis-typed tensors
/// and convention problems, shape_error for inconsistent shapes; unpacking checks the codes later.
template <real_scalar T>
packed_layer<T> read_packed_layer(const safetensors::reader& file, std::string_view path, Index out_features = 0,
                                  std::optional<scale_convention> convention = std::nullopt) {
  const std::optional<quantization_config> declared = declared_quantization(file);
  Index declared_out = 0;
  if (declared) {
    const auto found = declared->out_features.find(path);
    if (found != declared->out_features.end()) declared_out = found->second;
  }
  // Shapes first, so a malformed layer is reported as such; then the convention.
  packed_layer<T> layer = detail::read_packed_from<T>(file, path, out_features, scale_convention::bitlinear, declared_out);
  layer.convention = resolve_scale_convention(declared, file.source_name(), convention);
  return layer;
}

/// Reads the layer at `path` and builds the BitLinear it describes (see hf::to_bit_linear).
template <real_scalar T>
BitLinear<T> load_bit_linear(const safetensors::reader& file, std::string_view path, Index out_features = 0,
                             std::optional<scale_convention> convention = std::nullopt,
                             bitlinear_options options = {}) {
  return to_bit_linear(read_packed_layer<T>(file, path, out_features, convention), options);
}

/// The "__metadata__" entry that declares `config` (pass it to safetensors::writer with the packed
/// layers it describes).
inline std::pair<std::string, std::string> metadata_entry(const quantization_config& config) {
  return {std::string(metadata_key), to_json(config)};
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
