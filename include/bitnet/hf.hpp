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
#include <cmath>
#include <cstdint>
#include <limits>
#include <optional>
#include <string>
#include <utility>

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

/// The quantization_config block of a model's config.json for the given convention.
inline std::string quantization_config_json(scale_convention convention = default_scale_convention) {
  return std::string(R"({"quant_method": "bitnet", "linear_class": ")") + std::string(convention_name(convention)) +
         R"(", "quantization_mode": "offline"})";
}

/// One layer in the Hugging Face form, with values as they are stored in the file.
template <real_scalar T>
struct packed_layer {
  Matrix<std::uint8_t> weight;    // ceil(out/4) x in
  Index out_features = 0;
  T weight_scale = 1;             // in `convention`
  std::optional<Vector<T>> bias;  // as stored (autobitlinear: b * s, so that (.. + b_stored) * m = .. + b)
  scale_convention convention = default_scale_convention;
};

namespace detail {

/// The mean |w| that quantize_weights turns into `scale` (T(1) / mean == scale, mean >= 1e-5),
/// searched among the few values around 1 / scale; the closest one when none is exact.
template <real_scalar T>
T mean_for_scale(T scale) {
  T candidate = T(1) / scale;
  for (int i = 0; i < 4; ++i) candidate = std::nextafter(candidate, T(0));
  T best = std::max(T(1) / scale, scale_floor<T>);
  for (int i = 0; i < 9; ++i, candidate = std::nextafter(candidate, std::numeric_limits<T>::infinity())) {
    if (candidate < scale_floor<T>) continue;
    if (T(1) / candidate == scale) return candidate;
    if (std::fabs(T(1) / candidate - scale) < std::fabs(T(1) / best - scale)) best = candidate;
  }
  return best;
}

/// Latent weights whose BitNet quantization gives back the codes q and T(mean|w|) == mean (so
/// the scale 1 / mean): entries q * a with a = mean * N / nonzeros, then a few nonzero entries
/// nudged by whole ulps until the compensated mean rounds to `mean`. An all-zero q gives zeros.
template <real_scalar T>
Matrix<T> latent_weights(const Matrix<std::int8_t>& q, T mean) {
  const Index n = q.size();
  constexpr Index max_adjusters = 4096;
  std::vector<Index> nonzero;  // the first few non-zero entries: the ones nudged
  Index k = 0;
  for (Index i = 0; i < n; ++i)
    if (q.data()[i] != 0 && k++ < max_adjusters) nonzero.push_back(i);
  Matrix<T> w = q.template cast<T>();
  if (k == 0) return w;
  const T a = static_cast<T>(double(mean) * double(n) / double(k));
  w *= a;
  const T ulp = std::nextafter(a, std::numeric_limits<T>::infinity()) - a;
  const Index adjusters = Index(nonzero.size());
  // When no sum of magnitudes rounds exactly to `mean` (possible for double), keep the closest.
  Matrix<T> best = w;
  double best_error = std::numeric_limits<double>::infinity();
  for (int iteration = 0; iteration < 64; ++iteration) {
    const double exact = bitnet::detail::mean_abs(w);
    const double error = std::fabs(double(static_cast<T>(exact)) - double(mean));
    if (error < best_error) {
      best = w;
      best_error = error;
    }
    if (error == 0) break;
    // Whole ulps the magnitudes must grow (or shrink) in total, spread over the adjusters.
    double steps = std::nearbyint((double(mean) - exact) * double(n) / double(ulp));
    if (steps == 0) steps = double(mean) > exact ? 1 : -1;
    for (Index j = 0; j < adjusters; ++j) {
      const double share = std::trunc(steps / double(adjusters - j));
      steps -= share;
      T& v = w.data()[nonzero[std::size_t(j)]];
      const T magnitude = static_cast<T>(std::fabs(double(v)) + share * double(ulp));
      v = std::copysign(magnitude, v);
    }
  }
  return best;
}

}  // namespace detail

/// The Hugging Face form of a BitLinear: its ternary codes packed, its scale in `convention`
/// (autobitlinear: mean|W| exactly as quantization computed it, so loading gives back the same
/// scale), its bias as the convention stores it.
template <real_scalar T>
packed_layer<T> to_packed(const BitLinear<T>& layer, scale_convention convention = default_scale_convention) {
  packed_layer<T> result{pack_weights(layer.ternary_weight()), layer.out_features(), layer.weight_scale(),
                         layer.bias(), convention};
  if (convention == scale_convention::autobitlinear) {
    const T mean = std::max(static_cast<T>(bitnet::detail::mean_abs(layer.weight())), scale_floor<T>);
    result.weight_scale = mean;
    if (result.bias) *result.bias = *result.bias * layer.weight_scale();
  }
  return result;
}

/// A BitLinear that computes what the stored ternary layer says: ternary_weight() is exactly the
/// unpacked codes, and weight_scale() is exactly the stored scale (bitlinear) or T(1) / stored
/// mean (autobitlinear) whenever quantization can produce that value, else the nearest value it
/// can (see docs/safetensors.md). weight() is then a latent matrix built for that purpose: each
/// non-zero code times about mean * out * in / nonzeros, not the original training weights.
/// Throws value_error for a non-finite or non-positive scale.
template <real_scalar T>
BitLinear<T> to_bit_linear(const packed_layer<T>& packed, bitlinear_options options = {}) {
  const T stored = packed.weight_scale;
  if (!std::isfinite(stored) || !(stored > 0))
    throw value_error("hf::to_bit_linear: weight_scale " + std::to_string(stored) + " is not finite and > 0");
  const Matrix<std::int8_t> q = unpack_weights(packed.weight, packed.out_features);
  std::optional<Vector<T>> bias = packed.bias;
  T mean;
  if (packed.convention == scale_convention::autobitlinear) {
    mean = std::max(stored, scale_floor<T>);
    if (bias) *bias = *bias * stored;
  } else {
    mean = detail::mean_for_scale(stored);
  }
  return BitLinear<T>(detail::latent_weights(q, mean), std::move(bias), options);
}

}  // namespace bitnet::hf
