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
    } else if (path.size() == prefix_.size() + 1 && std::equal(prefix_.begin(), prefix_.end(), path.begin()) &&
               path.back() == "bitnet_rotation") {
      if (kind != bitnet::detail::json_container::object) fail("bitnet_rotation", "is not an object");
      config_.rotation.emplace();
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
    } else if (field == "bitnet_weight_scales" && depth == 1) {
      if (!text || (*text != "per_tensor" && *text != "per_row" && *text != "per_group"))
        fail(field, "must be \"per_tensor\", \"per_row\" or \"per_group\"");
      config_.weight_scales = *text == "per_group" ? weight_scaling::per_group
                              : *text == "per_row" ? weight_scaling::per_row
                                                   : weight_scaling::per_tensor;
    } else if (field == "bitnet_group_size" && depth == 1) {
      const auto* size = std::get_if<std::uint64_t>(&leaf.value);
      if (!size || *size > 4096) fail(field, "is not a group size (32, 64, 128 or 256)");
      config_.group_size = Index(*size);
    } else if (field == "bitnet_activation_scales" && depth == 1) {
      if (!text || (*text != "per_token" && *text != "per_block")) fail(field, "must be \"per_token\" or \"per_block\"");
      config_.activation_scales = *text == "per_block" ? activation_scaling::per_block : activation_scaling::per_token;
    } else if (field == "bitnet_rotation") {
      rotation_leaf(leaf, depth);
    } else if (field == "bitnet_weight_storage" && depth == 1) {
      if (!text || (*text != "two_bit" && *text != "base3")) fail(field, "must be \"two_bit\" or \"base3\"");
      config_.storage = *text == "base3" ? weight_storage::base3 : weight_storage::two_bit;
    } else if (field == "bitnet_in_features") {
      const auto* count = std::get_if<std::uint64_t>(&leaf.value);
      if (depth != 2 || !count || *count == 0 || *count > std::uint64_t(std::numeric_limits<Index>::max()))
        fail(field, "must map layer names to positive integers");
      config_.in_features[path[prefix_.size() + 1]] = Index(*count);
    }
  }

  /// The block, checked as a whole: a declaration bitnet cannot interpret is refused, never guessed.
  std::optional<quantization_config> result() const {
    if (!present_) return std::nullopt;
    if (config_.weight_scales == weight_scaling::per_group) {
      if (config_.group_size < min_group_size || config_.group_size > max_group_size ||
          (config_.group_size & (config_.group_size - 1)) != 0)
        fail("bitnet_group_size", "must be 32, 64, 128 or 256 with bitnet_weight_scales \"per_group\", got " +
                                      std::to_string(config_.group_size));
    } else if (config_.group_size != 0) {
      fail("bitnet_group_size", "is given, but bitnet_weight_scales is not \"per_group\"");
    }
    if (config_.activation_scales == activation_scaling::per_block && config_.weight_scales != weight_scaling::per_group)
      fail("bitnet_activation_scales", "\"per_block\" needs bitnet_weight_scales \"per_group\" (the blocks are the groups)");
    if (config_.weight_scales != weight_scaling::per_tensor && config_.linear_class &&
        *config_.linear_class != scale_convention::autobitlinear)
      fail("bitnet_weight_scales", "unit scales are magnitudes d (weight = code * d): linear_class must be "
                                   "\"autobitlinear\", not \"bitlinear\"");
    if (config_.storage == weight_storage::base3 && config_.weight_scales != weight_scaling::per_tensor)
      fail("bitnet_weight_storage", "\"base3\" needs per_tensor weight scales (bitlinear_options::storage base3), but "
                                    "bitnet_weight_scales is \"" + bitnet::detail::scaling_name(config_.weight_scales) + "\"");
    if (!config_.in_features.empty() && config_.storage != weight_storage::base3)
      fail("bitnet_in_features", "is given, but bitnet_weight_storage is not \"base3\" (a two_bit weight has "
                                 "in_features columns)");
    if (config_.rotation) {
      if (!rotation_transform_)
        fail("bitnet_rotation.transform", "is missing (bitnet reads \"" + std::string(hadamard_transform_name) + "\")");
      const Index b = config_.rotation->block_size;
      if (b < hadamard_rotation::min_block_size || b > hadamard_rotation::max_block_size || (b & (b - 1)) != 0)
        fail("bitnet_rotation.block_size", "must be a power of two in [2, 32768], got " + std::to_string(b));
    }
    quantization_config config = config_;
    if (config.rotation) std::sort(config.rotation->layers.begin(), config.rotation->layers.end());
    return config;
  }

 private:
  static std::optional<double> number_of(const bitnet::detail::json_leaf& leaf) {
    if (const auto* d = std::get_if<double>(&leaf.value)) return *d;
    if (const auto* i = std::get_if<std::int64_t>(&leaf.value)) return double(*i);
    if (const auto* u = std::get_if<std::uint64_t>(&leaf.value)) return double(*u);
    return std::nullopt;
  }
  void rotation_leaf(const bitnet::detail::json_leaf& leaf, std::size_t depth) {
    const std::string& key = depth >= 2 ? leaf.path[prefix_.size() + 1] : std::string();
    const auto* text = std::get_if<std::string>(&leaf.value);
    if (depth == 2 && key == "transform") {
      if (!text || *text != hadamard_transform_name)
        fail("bitnet_rotation.transform", "names a rotation bitnet cannot apply (it reads \"" +
                                              std::string(hadamard_transform_name) + "\")");
      rotation_transform_ = true;
    } else if (depth == 2 && key == "block_size") {
      const auto* size = std::get_if<std::uint64_t>(&leaf.value);
      if (!size || *size > std::uint64_t(hadamard_rotation::max_block_size))
        fail("bitnet_rotation.block_size", "must be a power of two in [2, 32768]");
      config_.rotation->block_size = Index(*size);
    } else if (depth == 3 && key == "layers" && text) {
      config_.rotation->layers.push_back(*text);
    } else {
      fail("bitnet_rotation" + (key.empty() ? std::string() : "." + key),
           "is not understood (bitnet reads {\"transform\", \"block_size\", \"layers\": [names]}): refusing a "
           "rotation it cannot interpret");
    }
  }

  [[noreturn]] void fail(std::string_view field, std::string_view rule) const {
    throw io_error(source_ + ": quantization_config" + (field.empty() ? std::string() : "." + std::string(field)) +
                   " " + std::string(rule));
  }

  std::vector<std::string> prefix_;
  std::string source_;
  quantization_config config_;
  bool present_ = false;
  bool rotation_transform_ = false;
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

/// The rotation of the layer at `path`: its P.rotation_signs when the declaration lists the layer.
/// A listed layer without its signs, or signs the declaration does not account for, is an io_error.
template <class Source>
std::optional<hadamard_rotation> read_rotation(const Source& file, std::string_view path, Index in_features,
                                               const std::optional<quantization_config>& declared,
                                               std::string_view where) {
  const std::string signs_name = std::string(path) + std::string(rotation_signs_suffix);
  const bool listed = declared && declared->rotation &&
                      std::binary_search(declared->rotation->layers.begin(), declared->rotation->layers.end(), path);
  const safetensors::tensor_info* signs = file.find(signs_name);
  if (!listed) {
    if (signs)
      throw io_error(safetensors::detail::message(
          file.source_name(), signs_name,
          "holds a rotation's signs, but " + std::string(where) + " declares no rotation for \"" + std::string(path) +
              "\" (quantization_config.bitnet_rotation.layers): refusing to guess whether the layer is rotated"));
    return std::nullopt;
  }
  if (!signs)
    throw io_error(std::string(where) + " declares \"" + std::string(path) + "\" rotated (bitnet_rotation), but " +
                   file.source_name() + " has no tensor \"" + signs_name + "\" with its signs");
  if (signs->type != safetensors::dtype::I8 || signs->shape != std::vector<std::uint64_t>{std::uint64_t(in_features)})
    throw io_error(safetensors::detail::message(file.source_name(), signs_name,
                                                "is " + std::string(safetensors::dtype_name(signs->type)) + " " +
                                                    safetensors::detail::shape_text(signs->shape) + ", the signs of a " +
                                                    std::to_string(in_features) + "-input layer are I8 [" +
                                                    std::to_string(in_features) + "]"));
  try {
    return hadamard_rotation(declared->rotation->block_size, file.template read_values<std::int8_t>(signs_name));
  } catch (const io_error&) {
    throw;
  } catch (const error& e) {
    throw io_error(safetensors::detail::message(file.source_name(), signs_name, e.what()));
  }
}

/// read_packed_layer over any source of named tensors (a reader, an hf::checkpoint whose layer may
/// span files), with the convention already resolved and the declaration (found at `where`) that
/// says how the layer's scales, activations and rotation are stored: the tensors must agree with it.
template <real_scalar T, class Source>
packed_layer<T> read_packed_from(const Source& file, std::string_view path, Index out_features,
                                 scale_convention convention, const std::optional<quantization_config>& declared,
                                 std::string_view where) {
  const std::string prefix(path);
  const auto refuse = [&](const std::string& tensor, const std::string& rule) {
    throw io_error(safetensors::detail::message(file.source_name(), tensor, rule));
  };
  const safetensors::tensor_info& weight = file.info(prefix + ".weight");
  if (weight.type != safetensors::dtype::U8)
    refuse(weight.name, "is " + std::string(safetensors::dtype_name(weight.type)) + ", a packed BitNet weight must be U8");
  const weight_storage storage = declared ? declared->storage : weight_storage::two_bit;
  const bool base3 = storage == weight_storage::base3;
  if (base3 && (weight.shape.size() != 2 || weight.shape[0] == 0 || weight.shape[1] == 0))
    refuse(weight.name, "is U8 " + safetensors::detail::shape_text(weight.shape) + ", but " + std::string(where) +
                            " declares bitnet_weight_storage \"base3\": a base-3 weight is U8 [out, ceil(in / 5)]");
  packed_layer<T> layer;
  layer.weight = file.template read_matrix<std::uint8_t>(weight.name);
  const Index in = base3 ? base3_in_features(*declared, path, layer.weight.cols()) : layer.weight.cols();
  if (base3 && base3_packed_cols(in) != layer.weight.cols())
    refuse(weight.name, "has " + std::to_string(layer.weight.cols()) + " packed columns, but " + std::string(where) +
                            " declares bitnet_in_features " + std::to_string(in) + " for \"" + std::string(path) +
                            "\" (base3: ceil(" + std::to_string(in) + " / 5) = " +
                            std::to_string(base3_packed_cols(in)) + " columns)");
  const std::string scale_name = prefix + ".weight_scale";
  const safetensors::tensor_info& scale_info = file.info(scale_name);
  const weight_scaling scaling = declared ? declared->weight_scales : weight_scaling::per_tensor;
  if (scaling == weight_scaling::per_tensor) {
    if (scale_info.element_count() != 1 && scale_info.shape.size() == 2)
      refuse(scale_name, "has shape " + safetensors::detail::shape_text(scale_info.shape) +
                             " (one scale per row or group), but " + std::string(where) +
                             " declares no bitnet_weight_scales (one weight_scale per tensor): the file does not say "
                             "how to read it");
    const std::vector<T> scale = file.template read_values<T>(scale_name);
    if (scale.size() != 1)
      throw shape_error(safetensors::detail::message(file.source_name(), scale_name,
                                                     "has " + std::to_string(scale.size()) + " elements, expected 1"));
    layer.weight_scale = scale[0];
  } else {
    const Index unit_cols = bitnet::detail::unit_columns(scaling, declared->group_size, in);
    const std::uint64_t groups = std::uint64_t(bitnet::detail::unit_count(in, unit_cols));
    const std::string declared_as = std::string(where) + " declares bitnet_weight_scales \"" +
                                    bitnet::detail::scaling_name(scaling) + "\"" +
                                    (scaling == weight_scaling::per_group
                                         ? " with bitnet_group_size " + std::to_string(declared->group_size)
                                         : std::string());
    if (scale_info.shape.size() != 2 || scale_info.shape[1] != groups || scale_info.shape[0] == 0 ||
        !safetensors::is_floating(scale_info.type))
      refuse(scale_name, "is " + std::string(safetensors::dtype_name(scale_info.type)) + " " +
                             safetensors::detail::shape_text(scale_info.shape) + ", but " + declared_as +
                             ": a " + std::to_string(in) + "-input layer needs floating [out, " + std::to_string(groups) + "]");
    layer.unit_scales = file.template read_matrix<T>(scale_name);
    if (out_features == 0) out_features = Index(scale_info.shape[0]);  // exact: one row of scales per output
    layer.weight_scales = scaling;
    layer.group_size = declared->group_size;
    layer.activation_scales = declared->activation_scales;
  }
  if (file.contains(prefix + ".bias")) layer.bias = file.template read_vector<T>(prefix + ".bias");
  if (out_features == 0 && declared) {
    const auto found = declared->out_features.find(path);
    if (found != declared->out_features.end()) out_features = found->second;
  }
  if (out_features == 0)
    out_features = base3        ? layer.weight.rows()  // exact: one packed row per output
                   : layer.bias ? layer.bias->size()
                                : values_per_byte * layer.weight.rows();
  const bool rows_fit = base3 ? layer.weight.rows() == out_features : packed_rows(out_features) == layer.weight.rows();
  if (!rows_fit || (layer.bias && layer.bias->size() != out_features) ||
      (layer.unit_scales.size() != 0 && layer.unit_scales.rows() != out_features))
    throw shape_error(safetensors::detail::message(
        file.source_name(), weight.name,
        "has " + std::to_string(layer.weight.rows()) + " packed rows" +
            (layer.bias ? " and the bias " + std::to_string(layer.bias->size()) + " elements" : std::string()) +
            (layer.unit_scales.size() != 0 ? " and " + std::to_string(layer.unit_scales.rows()) + " rows of unit scales"
                                           : std::string()) +
            ", inconsistent with " + std::to_string(out_features) + " output features" +
            (base3 ? " (bitnet_weight_storage \"base3\": one packed row per output)"
             : layer.weight.rows() == out_features
                 ? " (a base-3 weight, U8 [out, ceil(in / 5)], would have these rows, but " + std::string(where) +
                       " declares no bitnet_weight_storage \"base3\")"
                 : std::string())));
  if (base3) {  // the bytes are checked here, so that a bad one is reported with the file and tensor
    try {
      (void)unpack_weights_base3(layer.weight, in);
    } catch (const value_error& e) {
      refuse(weight.name, std::string(e.what()) + " (" + std::string(where) + " declares bitnet_weight_storage \"base3\")");
    }
    layer.storage = weight_storage::base3;
    layer.in_features = in;
  }
  layer.out_features = out_features;
  layer.convention = convention;
  layer.rotation = read_rotation(file, path, in, declared, where);
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
  // Shapes first, so a malformed layer is reported as such; then the convention.
  packed_layer<T> layer =
      detail::read_packed_from<T>(file, path, out_features, scale_convention::bitlinear, declared, file.source_name());
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
/// U8 ceil(out/4) x in (base3 `storage`: out x ceil(in/5)), path.weight_scale as one `scale_type`
/// element, path.bias if `bias`.
inline void declare_packed_layer(std::vector<safetensors::tensor_spec>& specs, std::string_view path, Index out_features,
                                 Index in_features, bool bias, safetensors::dtype scale_type = safetensors::dtype::F32,
                                 safetensors::dtype bias_type = safetensors::dtype::F32,
                                 weight_storage storage = weight_storage::two_bit) {
  if (out_features <= 0 || in_features <= 0)
    throw shape_error("hf::declare_packed_layer: " + std::string(path) + ": empty layer " +
                      std::to_string(out_features) + "x" + std::to_string(in_features));
  const std::string prefix(path);
  specs.push_back({prefix + ".weight", safetensors::dtype::U8, packed_weight_shape(storage, out_features, in_features)});
  specs.push_back({prefix + ".weight_scale", scale_type, {1}});
  if (bias) specs.push_back({prefix + ".bias", bias_type, {std::uint64_t(out_features)}});
}

/// Declares the tensors of `layer` (hf::to_packed) at `path`: those of declare_packed_layer, with
/// path.weight_scale as [out, groups] for a per_row / per_group layer, and path.rotation_signs (I8
/// [in]) for a rotated one. Record the layer in the file's quantization_config with declare_layer.
template <real_scalar T>
void declare_packed_layer(std::vector<safetensors::tensor_spec>& specs, std::string_view path,
                          const packed_layer<T>& layer, safetensors::dtype scale_type = safetensors::dtype::F32,
                          safetensors::dtype bias_type = safetensors::dtype::F32) {
  const Index in = layer.storage == weight_storage::base3 ? layer.in_features : layer.weight.cols();
  declare_packed_layer(specs, path, layer.out_features, in, layer.bias.has_value(), scale_type, bias_type,
                       layer.storage);
  const std::string prefix(path);
  if (layer.weight_scales != weight_scaling::per_tensor) {
    const auto scale = std::find_if(specs.begin(), specs.end(),
                                    [&](const safetensors::tensor_spec& t) { return t.name == prefix + ".weight_scale"; });
    scale->shape = {std::uint64_t(layer.unit_scales.rows()), std::uint64_t(layer.unit_scales.cols())};
  }
  if (layer.rotation)
    specs.push_back({prefix + std::string(rotation_signs_suffix), safetensors::dtype::I8, {std::uint64_t(in)}});
}

/// Records in `config` (the block every file of the model declares) how the packed layer at
/// `path` is stored: its scale granularity, activation scales and rotation block, which must be
/// those of the layers recorded before (one declaration per model: value_error naming the layer
/// otherwise), its rotation (bitnet_rotation.layers), its weight storage (bitnet_weight_storage, also
/// one per file), out_features when not a multiple of 4 and, base3, in_features when not a multiple of 5.
template <real_scalar T>
void declare_layer(quantization_config& config, std::string_view path, const packed_layer<T>& layer, bool first) {
  const std::string name(path);
  const auto differs = [&](const std::string& what) {
    throw value_error("hf::declare_layer: " + name + ": " + what +
                      " differs from the layers declared before; a file declares one for all its packed layers");
  };
  if (first) {
    config.weight_scales = layer.weight_scales;
    config.group_size = layer.group_size;
    config.activation_scales = layer.activation_scales;
    config.rotation.reset();
    config.storage = layer.storage;
    config.in_features.clear();
  } else if (config.weight_scales != layer.weight_scales || config.group_size != layer.group_size) {
    differs("the scale granularity (" + bitnet::detail::scaling_name(layer.weight_scales) + ", group_size " +
            std::to_string(layer.group_size) + ")");
  } else if (config.activation_scales != layer.activation_scales) {
    differs("the activation scaling");
  } else if (config.storage != layer.storage) {
    differs("the weight storage (" + storage_name(layer.storage) + ")");
  }
  if (layer.storage == weight_storage::base3) {
    if (layer.weight_scales != weight_scaling::per_tensor)
      throw value_error("hf::declare_layer: " + name + ": storage base3 needs per_tensor weight scales, got " +
                        bitnet::detail::scaling_name(layer.weight_scales));
    if (layer.in_features % base3_values_per_byte != 0) config.in_features[name] = layer.in_features;
  }
  if (layer.rotation) {
    if (!config.rotation) config.rotation = rotation_declaration{layer.rotation->block_size(), {}};
    if (config.rotation->block_size != layer.rotation->block_size())
      differs("the rotation block size (" + std::to_string(layer.rotation->block_size()) + ")");
    config.rotation->layers.insert(
        std::upper_bound(config.rotation->layers.begin(), config.rotation->layers.end(), name), name);
  }
  if (layer.storage == weight_storage::two_bit && layer.out_features % values_per_byte != 0)
    config.out_features[name] = layer.out_features;
}

/// Writes a packed layer declared with declare_packed_layer.
template <real_scalar T>
void write_packed_layer(safetensors::writer& file, std::string_view path, const packed_layer<T>& layer) {
  const std::string prefix(path);
  file.write(prefix + ".weight", layer.weight);
  if (layer.weight_scales != weight_scaling::per_tensor) {
    file.write(prefix + ".weight_scale", layer.unit_scales);
  } else {
    const T scale[1] = {layer.weight_scale};
    file.write_values<T>(prefix + ".weight_scale", scale);
  }
  if (layer.bias) file.write(prefix + ".bias", *layer.bias);
  if (layer.rotation)
    file.write_values<std::int8_t>(prefix + std::string(rotation_signs_suffix), layer.rotation->signs());
}

}  // namespace bitnet::hf
