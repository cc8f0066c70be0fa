// bitnet/hf.hpp - the Hugging Face transformers BitNet format ("quant_method": "bitnet").
//
// A ternary linear layer is stored as two tensors:
//   <path>.weight        U8, ceil(out/4) x in: 4 ternary values per byte, as code = value + 1 in
//                        {0, 1, 2}; row r of the layer is row (r mod R) of the packed matrix, in
//                        bits 2*(r div R)..2*(r div R)+1, with R = ceil(out/4) (transformers'
//                        integrations/bitnet.py pack_weights). Code 3 never occurs; the bits of
//                        the padding rows (r >= out) are 0.
//   <path>.weight_scale  one element, in one of two conventions:
//     bitlinear      (transformers' BitLinear)     stores s = 1 / mean|W|:  y = (xq . q) / (sx * s) + b
//     autobitlinear  (AutoBitLinear, used by microsoft/bitnet-b1.58-2B-4T) stores m = mean|W|:
//                    y = (x_fq . q + b) * m    (note: the bias is scaled too)
//
// Reading and writing layers in safetensors files: bitnet/hf_safetensors.hpp.
#pragma once

#include <algorithm>
#include <charconv>
#include <functional>
#include <map>
#include <cmath>
#include <cstdint>
#include <limits>
#include <optional>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

#include "bit_linear.hpp"
#include "detail/validate.hpp"
#include "errors.hpp"
#include "matrix.hpp"
#include "quant.hpp"

namespace bitnet::hf {

enum class scale_convention {
  bitlinear,      // weight_scale = s = 1 / mean|W|, divides the output
  autobitlinear,  // weight_scale = mean|W|, multiplies the output (microsoft/bitnet-b1.58-2B-4T)
};

/// What writers (hf::to_packed, save_state_dict, bitnet-convert) use when not told otherwise; they
/// always record the convention they used. Readers never fall back to it.
inline constexpr scale_convention default_scale_convention = scale_convention::autobitlinear;

inline constexpr std::string_view convention_name(scale_convention convention) noexcept {
  return convention == scale_convention::bitlinear ? "bitlinear" : "autobitlinear";
}

/// Ternary values per packed byte.
inline constexpr Index values_per_byte = 4;

/// Rows of the packed matrix for a layer with `out_features` outputs: ceil(out / 4).
constexpr Index packed_rows(Index out_features) noexcept {
  return (out_features + values_per_byte - 1) / values_per_byte;
}

/// Packs a ternary matrix (out x in, values in {-1, 0, 1}) into the transformers layout. Throws
/// shape_error for an empty matrix and value_error naming the first value outside {-1, 0, 1}.
inline Matrix<std::uint8_t> pack_weights(const Matrix<std::int8_t>& q) {
  detail::require_non_empty(q, "hf::pack_weights: ternary weights");
  const Index out = q.rows(), in = q.cols(), block = packed_rows(out);
  Matrix<std::uint8_t> packed = Matrix<std::uint8_t>::Zero(block, in);
  for (Index r = 0; r < out; ++r) {
    const int shift = int(2 * (r / block));
    for (Index c = 0; c < in; ++c) {
      const int value = q(r, c);
      if (value < -1 || value > 1)
        throw value_error("hf::pack_weights: value " + std::to_string(value) + " at row " + std::to_string(r) +
                          ", column " + std::to_string(c) + " is not ternary");
      packed(r % block, c) |= std::uint8_t((value + 1) << shift);
    }
  }
  return packed;
}

/// Unpacks `out_features` rows from the transformers layout. Throws shape_error when the packed
/// matrix does not have ceil(out/4) rows, and value_error for code 3 or for non-zero padding
/// bits (which pack_weights never writes), naming the byte.
inline Matrix<std::int8_t> unpack_weights(const Matrix<std::uint8_t>& packed, Index out_features) {
  detail::require_non_empty(packed, "hf::unpack_weights: packed weights");
  if (out_features <= 0 || packed.rows() != packed_rows(out_features))
    throw shape_error("hf::unpack_weights: " + std::to_string(out_features) + " output features need " +
                      std::to_string(std::max<Index>(packed_rows(out_features), 0)) + " packed rows, got " +
                      std::to_string(packed.rows()));
  const Index block = packed.rows(), in = packed.cols();
  const auto where = [&](Index j, Index c, Index plane) {
    return "packed row " + std::to_string(j) + ", column " + std::to_string(c) + ", bits " +
           std::to_string(2 * plane) + "-" + std::to_string(2 * plane + 1);
  };
  Matrix<std::int8_t> q(out_features, in);
  for (Index j = 0; j < block; ++j)
    for (Index c = 0; c < in; ++c) {
      const unsigned byte = packed(j, c);
      for (Index plane = 0; plane < values_per_byte; ++plane) {
        const unsigned code = (byte >> (2 * plane)) & 3u;
        const Index r = plane * block + j;
        if (r >= out_features) {
          if (code != 0)
            throw value_error("hf::unpack_weights: padding " + where(j, c, plane) + " holds code " +
                              std::to_string(code) + ", expected 0");
        } else if (code == 3) {
          throw value_error("hf::unpack_weights: invalid code 3 at " + where(j, c, plane));
        } else {
          q(r, c) = static_cast<std::int8_t>(int(code) - 1);
        }
      }
    }
  return q;
}

/// bitnet's own file layout of a base-3 layer (quantization_config "bitnet_weight_storage": "base3";
/// docs/safetensors.md): P.weight is U8 [out, ceil(in / 5)], row-major, one row per output; byte k of
/// row r holds the codes c = value + 1 of columns 5k .. 5k + 4 as base-3 digits, little-endian:
/// byte = c(5k) + 3 c(5k + 1) + 9 c(5k + 2) + 27 c(5k + 3) + 81 c(5k + 4), so every byte is <= 242. The
/// digits past in_features (the last byte of a row when in is not a multiple of 5) are 0. This is
/// not packed_base3's 16 x 20 tile order (an in-memory kernel layout): other tools read it with a
/// loop over bytes.
inline constexpr Index base3_values_per_byte = 5;

/// Bytes per row of the base-3 file layout for a layer with `in_features` inputs: ceil(in / 5).
constexpr Index base3_packed_cols(Index in_features) noexcept {
  return (in_features + base3_values_per_byte - 1) / base3_values_per_byte;
}

/// Packs a ternary matrix (out x in, values in {-1, 0, 1}) into the base-3 file layout (above).
/// Throws shape_error for an empty matrix and value_error naming the first value outside {-1, 0, 1}.
inline Matrix<std::uint8_t> pack_weights_base3(const Matrix<std::int8_t>& q) {
  detail::require_non_empty(q, "hf::pack_weights_base3: ternary weights");
  const Index out = q.rows(), in = q.cols();
  Matrix<std::uint8_t> packed(out, base3_packed_cols(in));
  for (Index r = 0; r < out; ++r)
    for (Index k = 0; k < packed.cols(); ++k) {
      int byte = 0;
      for (Index i = std::min(base3_values_per_byte, in - k * base3_values_per_byte) - 1; i >= 0; --i) {
        const Index c = k * base3_values_per_byte + i;
        const int value = q(r, c);
        if (value < -1 || value > 1)
          throw value_error("hf::pack_weights_base3: value " + std::to_string(value) + " at row " + std::to_string(r) +
                            ", column " + std::to_string(c) + " is not ternary");
        byte = 3 * byte + value + 1;
      }
      packed(r, k) = std::uint8_t(byte);
    }
  return packed;
}

/// Unpacks `in_features` columns from the base-3 file layout. Throws shape_error when the packed
/// matrix does not have ceil(in / 5) columns, and value_error for a byte above 242 (no five base-3
/// digits) or a non-zero padding digit (which pack_weights_base3 never writes), naming the byte; so
/// pack_weights_base3(unpack_weights_base3(p, in)) == p for every accepted p.
inline Matrix<std::int8_t> unpack_weights_base3(const Matrix<std::uint8_t>& packed, Index in_features) {
  detail::require_non_empty(packed, "hf::unpack_weights_base3: packed weights");
  if (in_features <= 0 || packed.cols() != base3_packed_cols(in_features))
    throw shape_error("hf::unpack_weights_base3: " + std::to_string(in_features) + " input features need " +
                      std::to_string(std::max<Index>(base3_packed_cols(in_features), 0)) +
                      " packed columns (5 codes a byte), got " + std::to_string(packed.cols()));
  constexpr unsigned max_byte = 242;  // 3^5 - 1: five digits 2
  Matrix<std::int8_t> q(packed.rows(), in_features);
  for (Index r = 0; r < packed.rows(); ++r)
    for (Index k = 0; k < packed.cols(); ++k) {
      unsigned byte = packed(r, k);
      const auto where = [&] { return "packed row " + std::to_string(r) + ", byte " + std::to_string(k); };
      if (byte > max_byte)
        throw value_error("hf::unpack_weights_base3: " + where() + " is " + std::to_string(byte) +
                          ", above 242 (five base-3 digits)");
      for (Index i = 0; i < base3_values_per_byte; ++i, byte /= 3) {
        const Index c = k * base3_values_per_byte + i;
        if (c < in_features) {
          q(r, c) = static_cast<std::int8_t>(int(byte % 3) - 1);
        } else if (byte % 3 != 0) {
          throw value_error("hf::unpack_weights_base3: padding digit " + std::to_string(i) + " of " + where() +
                            " (column " + std::to_string(c) + ", past the " + std::to_string(in_features) +
                            " inputs) holds code " + std::to_string(byte % 3) + ", expected 0");
        }
      }
    }
  return q;
}

/// The U8 shape of P.weight for an out x in layer stored as `storage`: [ceil(out/4), in] (two_bit,
/// transformers' layout) or [out, ceil(in/5)] (base3, bitnet's).
inline std::vector<std::uint64_t> packed_weight_shape(weight_storage storage, Index out_features, Index in_features) {
  if (storage == weight_storage::base3)
    return {std::uint64_t(out_features), std::uint64_t(base3_packed_cols(in_features))};
  return {std::uint64_t(packed_rows(out_features)), std::uint64_t(in_features)};
}

enum class quantization_mode {
  offline,  // packed ternary weights + weight_scale (what bitnet-convert writes by default)
  online,   // latent weights in their own dtype, quantized on the fly (AutoBitLinear; fine-tuning)
};

inline constexpr std::string_view mode_name(quantization_mode mode) noexcept {
  return mode == quantization_mode::online ? "online" : "offline";
}

/// The name of the rotation bitnet reads and writes: R x = H_b (s . x) / sqrt(b) per block
/// (rotation.hpp), as PrismML's hadamard_packing.json names it.
inline constexpr std::string_view hadamard_transform_name = "normalized-signed-sylvester-walsh-hadamard";

/// The tensor that holds a rotated layer's signs: P + rotation_signs_suffix (I8, in_features values).
inline constexpr std::string_view rotation_signs_suffix = ".rotation_signs";

/// How the packed layers of a file are rotated (quantization_config "bitnet_rotation").
struct rotation_declaration {
  Index block_size = 0;
  std::vector<std::string> layers{};  // module names ("model.layers.0.mlp.up_proj"), sorted
  friend bool operator==(const rotation_declaration&, const rotation_declaration&) = default;
};

/// The "quantization_config" block of a model's config.json, as transformers' BitNetQuantConfig
/// reads it (quant_method "bitnet"). bitnet writes it into config.json and, as a JSON string under
/// the same key, into the "__metadata__" of every safetensors file it writes packed layers to, so
/// the scale convention travels with the data. Readers take linear_class from there (or from an
/// explicit choice that must agree); they never assume one.
struct quantization_config {
  std::string quant_method = "bitnet";
  /// The scale convention. Empty only when read from a block that does not declare one
  /// (transformers then uses "bitlinear"; bitnet's readers refuse to guess).
  std::optional<scale_convention> linear_class = default_scale_convention;
  quantization_mode mode = quantization_mode::offline;
  /// Module names transformers leaves dense (matched as substrings of module names, as
  /// transformers' replace_with_bitnet_linear does). Written as null when empty.
  std::vector<std::string> modules_to_not_convert{};
  bool use_rms_norm = false;
  double rms_norm_eps = 1e-6;
  /// bitnet's own key "bitnet_out_features": the out_features of packed layers that are not a
  /// multiple of 4, which the packed rows (ceil(out/4)) cannot tell. transformers ignores it.
  std::map<std::string, Index, std::less<>> out_features{};
  /// bitnet's own keys for unit-scaled layers (transformers ignores them, and cannot load such a
  /// layer: docs/safetensors.md). "bitnet_weight_scales": "per_row" or "per_group" (absent: one
  /// weight_scale per tensor, the BitNet form); then P.weight_scale is [out, 1] or [out, ceil(in / G)]
  /// magnitudes d (weight = code * d), which needs linear_class "autobitlinear" (the multiplying one).
  weight_scaling weight_scales = weight_scaling::per_tensor;
  /// "bitnet_group_size": G for per_group (32, 64, 128 or 256), else absent.
  Index group_size = 0;
  /// "bitnet_activation_scales": "per_token" (absent) or "per_block".
  activation_scaling activation_scales = activation_scaling::per_token;
  /// "bitnet_rotation": the input rotation of rotated layers (rotation.hpp), {"transform":
  /// "normalized-signed-sylvester-walsh-hadamard", "block_size": b, "layers": [module names]}; each
  /// listed layer P stores its n signs as the I8 tensor P.rotation_signs. Empty: no layer is rotated.
  std::optional<rotation_declaration> rotation{};
  /// "bitnet_weight_storage": "two_bit" (absent: transformers' layout) or "base3" (every packed
  /// layer's P.weight is U8 [out, ceil(in / 5)], five codes a byte: pack_weights_base3; per_tensor
  /// scales only). transformers cannot load base3 files.
  weight_storage storage = weight_storage::two_bit;
  /// "bitnet_in_features" (base3 only): the in_features of layers whose in is not a multiple of 5,
  /// which the packed columns (ceil(in / 5)) cannot tell; absent: 5 x the packed columns.
  std::map<std::string, Index, std::less<>> in_features{};
};

/// The in_features of the base-3 layer `module` whose P.weight has `packed_cols` columns: the
/// declared bitnet_in_features, else 5 x packed_cols.
inline Index base3_in_features(const quantization_config& config, std::string_view module, Index packed_cols) {
  const auto found = config.in_features.find(module);
  return found != config.in_features.end() ? found->second : base3_values_per_byte * packed_cols;
}

namespace detail {

inline void append_json_string(std::string& out, std::string_view text) {
  out += '"';
  for (const char c : text) {
    const auto u = static_cast<unsigned char>(c);
    if (c == '"' || c == '\\') {
      out += '\\';
      out += c;
    } else if (u < 0x20) {
      constexpr char hex[] = "0123456789abcdef";
      out += "\\u00";
      out += hex[u >> 4];
      out += hex[u & 15];
    } else {
      out += c;
    }
  }
  out += '"';
}

/// The shortest text that reads back as `value` (1e-06 -> "1e-06"), as Python's json writes it.
inline std::string json_number(double value) {
  char text[64];
  const auto result = std::to_chars(text, text + sizeof text, value);
  std::string out(text, result.ptr);
  if (out.find_first_of(".eEn") == std::string::npos) out += ".0";  // a float stays a float
  return out;
}

}  // namespace detail

/// The JSON text of a quantization_config block, keys in the order BitNetQuantConfig lists them:
/// {"quant_method": "bitnet", "linear_class": ..., "quantization_mode": ..., "modules_to_not_convert":
/// null or [...], "use_rms_norm": false, "rms_norm_eps": 1e-06} (+ "bitnet_out_features" if any).
inline std::string to_json(const quantization_config& config) {
  std::string out = "{\"quant_method\": ";
  detail::append_json_string(out, config.quant_method);
  if (config.linear_class) {
    out += ", \"linear_class\": ";
    detail::append_json_string(out, convention_name(*config.linear_class));
  }
  out += ", \"quantization_mode\": ";
  detail::append_json_string(out, mode_name(config.mode));
  out += ", \"modules_to_not_convert\": ";
  if (config.modules_to_not_convert.empty()) {
    out += "null";
  } else {
    out += '[';
    for (std::size_t i = 0; i < config.modules_to_not_convert.size(); ++i) {
      if (i) out += ", ";
      detail::append_json_string(out, config.modules_to_not_convert[i]);
    }
    out += ']';
  }
  out += ", \"use_rms_norm\": ";
  out += config.use_rms_norm ? "true" : "false";
  out += ", \"rms_norm_eps\": " + detail::json_number(config.rms_norm_eps);
  // A per-layer width map ({"name": width, ...}) under `key`.
  const auto append_widths = [&out](const char* key, const std::map<std::string, Index, std::less<>>& widths) {
    out += ", \"";
    out += key;
    out += "\": {";
    bool first = true;
    for (const auto& [name, width] : widths) {
      if (!first) out += ", ";
      first = false;
      detail::append_json_string(out, name);
      out += ": " + std::to_string(width);
    }
    out += '}';
  };
  if (!config.out_features.empty()) append_widths("bitnet_out_features", config.out_features);
  if (config.weight_scales != weight_scaling::per_tensor) {
    out += ", \"bitnet_weight_scales\": ";
    detail::append_json_string(out, bitnet::detail::scaling_name(config.weight_scales));
    if (config.weight_scales == weight_scaling::per_group)
      out += ", \"bitnet_group_size\": " + std::to_string(config.group_size);
  }
  if (config.activation_scales == activation_scaling::per_block) out += ", \"bitnet_activation_scales\": \"per_block\"";
  if (config.rotation) {
    out += ", \"bitnet_rotation\": {\"transform\": ";
    detail::append_json_string(out, hadamard_transform_name);
    out += ", \"block_size\": " + std::to_string(config.rotation->block_size) + ", \"layers\": [";
    for (std::size_t i = 0; i < config.rotation->layers.size(); ++i) {
      if (i) out += ", ";
      detail::append_json_string(out, config.rotation->layers[i]);
    }
    out += "]}";
  }
  if (config.storage == weight_storage::base3) {  // absent for two_bit: those files stay as they were
    out += ", \"bitnet_weight_storage\": \"base3\"";
    if (!config.in_features.empty()) append_widths("bitnet_in_features", config.in_features);
  }
  return out += '}';
}

/// The quantization_config block for packed layers in the given convention (offline mode).
inline std::string quantization_config_json(scale_convention convention = default_scale_convention) {
  quantization_config config;
  config.linear_class = convention;
  return to_json(config);
}

/// One layer in the Hugging Face form, with values as they are stored in the file.
template <real_scalar T>
struct packed_layer {
  Matrix<std::uint8_t> weight;    // ceil(out/4) x in (two_bit); out x ceil(in/5) (base3)
  Index out_features = 0;
  T weight_scale = 1;             // in `convention`
  std::optional<Vector<T>> bias;  // as stored (per_tensor autobitlinear: b * s, so that (.. + b_stored) * m = .. + b)
  scale_convention convention = default_scale_convention;
  /// per_row / per_group (the file's bitnet_weight_scales): weight_scale is unused, and unit_scales
  /// holds the out x groups magnitudes d (weight = code * d; always the autobitlinear, multiplying,
  /// convention); the bias is stored as it is added (unscaled).
  weight_scaling weight_scales = weight_scaling::per_tensor;
  Index group_size = 0;
  Matrix<T> unit_scales{};
  activation_scaling activation_scales = activation_scaling::per_token;
  /// The layer's input rotation (the file's bitnet_rotation and P.rotation_signs).
  std::optional<hadamard_rotation> rotation{};
  /// How `weight` holds the codes (the file's bitnet_weight_storage): two_bit (pack_weights) or
  /// base3 (pack_weights_base3; per_tensor only).
  weight_storage storage = weight_storage::two_bit;
  /// base3: the layer's inputs (the packed columns are ceil(in / 5)). Unused for two_bit.
  Index in_features = 0;
};

/// The ternary codes (out x in) of a packed layer, in either storage; throws what unpack_weights /
/// unpack_weights_base3 throw.
template <real_scalar T>
Matrix<std::int8_t> unpack_codes(const packed_layer<T>& packed) {
  if (packed.storage != weight_storage::base3) return unpack_weights(packed.weight, packed.out_features);
  if (packed.weight.rows() != packed.out_features)
    throw shape_error("hf::unpack_codes: " + std::to_string(packed.out_features) +
                      " output features need as many base-3 packed rows, got " + std::to_string(packed.weight.rows()));
  return unpack_weights_base3(packed.weight, packed.in_features);
}

namespace detail {

/// A mean m with T(1) / m == scale: searches the 4 floats on each side of T(1) / scale (every such
/// m lies there) for the one nearest it that gives back `scale` exactly. Not every float is a
/// rounded reciprocal; for those, the m whose reciprocal is nearest `scale` (1 ulp off). Throws
/// value_error when 1 / scale overflows T.
template <real_scalar T>
T mean_for_scale(T scale) {
  const T guess = T(1) / scale;
  if (!std::isfinite(guess))
    throw value_error("hf::to_packed: the weight scale " + std::to_string(scale) +
                      " has no finite mean|W| = 1 / scale to store (autobitlinear convention)");
  const auto miss = [scale](T mean) { return std::fabs(T(1) / mean - scale); };
  T best = guess, below = guess, above = guess;
  for (int step = 1; step <= 4 && miss(best) != 0; ++step) {
    below = std::nextafter(below, T(0));
    above = std::nextafter(above, std::numeric_limits<T>::infinity());
    for (const T candidate : {below, above})
      if (miss(candidate) < miss(best)) best = candidate;
  }
  return best;
}

}  // namespace detail

/// The Hugging Face form of a BitLinear: its ternary codes packed, its scale in `convention`, its
/// bias as the convention stores it. bitlinear stores weight_scale() itself. autobitlinear stores a
/// mean m: with latent weights, mean|W| exactly as quantization computed it (clamped at 1e-5);
/// without (released, or built by from_ternary), the m nearest 1 / weight_scale() with
/// T(1) / m == weight_scale() (detail::mean_for_scale). Either way loading gives back the same
/// scale, except for the rare scale that is no float's rounded reciprocal (never one quantization
/// produced, nor one read from an autobitlinear file), which comes back 1 ulp off.
///
/// The file layout is `storage`, by default the layer's own (bitlinear_options::storage): base3 is
/// the base-3 file layout (pack_weights_base3), two_bit transformers' layout. Any per_tensor layer
/// packs in either; a per_row / per_group layer only in two_bit (value_error otherwise).
///
/// A per_row / per_group layer keeps its unit scales d and its bias as they are, in the
/// autobitlinear convention only (d multiplies; 1 / d is not exact): another convention is a
/// value_error. Its activation_scales and rotation travel with it (any layer's rotation does).
template <real_scalar T>
packed_layer<T> to_packed(const BitLinear<T>& layer, scale_convention convention = default_scale_convention,
                          std::optional<weight_storage> storage = std::nullopt) {
  const bitlinear_options& options = layer.options();
  if (options.weight_scales != weight_scaling::per_tensor) {
    if (storage == weight_storage::base3)
      throw value_error("hf::to_packed: storage base3 needs per_tensor weight scales, got " +
                        bitnet::detail::scaling_name(options.weight_scales));
    if (convention != scale_convention::autobitlinear)
      throw value_error("hf::to_packed: a " + bitnet::detail::scaling_name(options.weight_scales) +
                        " layer stores its unit scales d as magnitudes (the autobitlinear convention); the "
                        "bitlinear convention would store 1 / d, which does not give d back exactly");
    packed_layer<T> result{pack_weights(layer.ternary_weight()), layer.out_features(), T(0), layer.bias(), convention};
    result.weight_scales = options.weight_scales;
    result.group_size = options.group_size;
    result.unit_scales = layer.unit_scales();
    result.activation_scales = options.activation_scales;
    result.rotation = options.rotation;
    return result;
  }
  const weight_storage layout = storage.value_or(options.storage);
  if (layout != weight_storage::two_bit && layout != weight_storage::base3)
    throw value_error("hf::to_packed: storage is not two_bit or base3");
  const bool base3 = layout == weight_storage::base3;
  packed_layer<T> result{base3 ? pack_weights_base3(layer.ternary_weight()) : pack_weights(layer.ternary_weight()),
                         layer.out_features(), layer.weight_scale(), layer.bias(), convention};
  result.rotation = options.rotation;
  result.storage = layout;
  result.in_features = layer.in_features();
  if (convention == scale_convention::autobitlinear) {
    result.weight_scale = layer.has_latent_weights()
                              ? std::max(static_cast<T>(bitnet::detail::mean_abs(layer.weight())), scale_floor<T>)
                              : detail::mean_for_scale(layer.weight_scale());
    if (result.bias) *result.bias = *result.bias * layer.weight_scale();
  }
  return result;
}

/// The BitLinear the stored ternary layer describes, built with BitLinear::from_ternary: no latent
/// weights (weight() throws state_error; ternary_weight() and weight_scale() are the layer).
/// ternary_weight() is exactly the unpacked codes. weight_scale() is exactly the stored scale
/// (bitlinear), or T(1) / m for the stored mean m (autobitlinear): one division in T, rounded to
/// nearest, as weight_scale() in quant.hpp computes 1 / mean - but without its 1e-5 clamp, which
/// applies when quantizing, not to a stored m. The autobitlinear bias b_stored is read as
/// b_stored * m (one more rounding). Throws value_error for a scale that is not finite and > 0
/// (or an m whose reciprocal overflows T), and what unpack_weights and from_ternary throw.
///
/// The layer's weight_scales, group_size, activation_scales and rotation are the packed layer's
/// (the file's declaration); `options` gives the rest (rms_norm, rms_eps). A per_row / per_group
/// layer is from_ternary(codes, unit_scales) (its convention must be autobitlinear, else value_error).
/// A base3 packed layer gives a layer with storage base3; a two_bit one keeps the storage `options`
/// asks for (the in-memory storage is free: forward() is bit-identical in both).
template <real_scalar T>
BitLinear<T> to_bit_linear(const packed_layer<T>& packed, bitlinear_options options = {}) {
  options.weight_scales = packed.weight_scales;
  options.group_size = packed.group_size;
  options.activation_scales = packed.activation_scales;
  options.rotation = packed.rotation;
  if (packed.storage == weight_storage::base3) options.storage = weight_storage::base3;
  if (packed.weight_scales != weight_scaling::per_tensor) {
    if (packed.convention != scale_convention::autobitlinear)
      throw value_error("hf::to_bit_linear: unit scales are magnitudes d (autobitlinear); the bitlinear "
                        "convention has no unit-scaled form");
    return BitLinear<T>::from_ternary(unpack_codes(packed), packed.unit_scales, packed.bias, options);
  }
  const T stored = packed.weight_scale;
  if (!std::isfinite(stored) || !(stored > 0))
    throw value_error("hf::to_bit_linear: weight_scale " + std::to_string(stored) + " is not finite and > 0");
  std::optional<Vector<T>> bias = packed.bias;
  T scale = stored;
  if (packed.convention == scale_convention::autobitlinear) {
    scale = T(1) / stored;
    if (!std::isfinite(scale))
      throw value_error("hf::to_bit_linear: weight_scale (mean|W|) " + std::to_string(stored) +
                        " is too small: 1 / weight_scale overflows");
    if (bias) *bias = *bias * stored;
  }
  return BitLinear<T>::from_ternary(unpack_codes(packed), scale, std::move(bias), options);
}

}  // namespace bitnet::hf
