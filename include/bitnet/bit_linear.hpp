// bitnet/bit_linear.hpp - the BitNet b1.58 linear layer.
//
//   forward(x) = (xq . wq^T) / (sx * sw) + b
//
// with xq the int8 per-row absmax quantization of norm(x), wq the ternary absmean quantization of
// the latent weight, int32 accumulation and one rescale per output. The ternary weights are
// computed once, when the weights are set, never in forward().
#pragma once

#include <cmath>
#include <cstdint>
#include <optional>
#include <string>
#include <type_traits>
#include <utility>
#include <vector>

#include "detail/kernels_scalar.hpp"
#include "detail/validate.hpp"
#include "errors.hpp"
#include "matrix.hpp"
#include "quant.hpp"

namespace bitnet {

/// The largest in_features for which the int32 accumulators are exact (128 * in < 2^31).
inline constexpr Index max_in_features = (Index{1} << 24) - 1;

struct bitlinear_options {
  bool rms_norm = false;  // apply RMSNorm (no learnable weight) to the input before quantizing
  float rms_eps = 1e-6f;  // RMSNorm epsilon, > 0
};

/// Tag of the BitLinear constructor that adopts the caller's buffers (see transfer::move).
struct adopt_buffers_t {
  explicit adopt_buffers_t() = default;
};
inline constexpr adopt_buffers_t adopt_buffers{};

template <real_scalar T>
class BitLinear {
 public:
  /// Takes the latent weight (out x in) and optional bias (out). Throws shape_error or
  /// value_error for empty, mis-shaped or non-finite input; nothing is kept then.
  explicit BitLinear(Matrix<T> weight, std::optional<Vector<T>> bias = std::nullopt,
                     bitlinear_options options = {})
      : options_(validated(options)),
        ternary_(quantize_checked(weight)),
        weight_(std::move(weight)),
        bias_(validated_bias(std::move(bias), weight_.rows())) {}

  /// Takes over the buffers of `weight` and `bias` without copying them, and only once nothing can
  /// fail any more: if this throws (bad shapes, non-finite values, bad_alloc), `weight` and `bias`
  /// are untouched. On success they are left empty. release() gives the buffers back.
  BitLinear(adopt_buffers_t, Matrix<T>& weight, std::optional<Vector<T>>& bias, bitlinear_options options = {})
      : options_(validated(options)),
        ternary_((check_bias(bias, weight.rows()), quantize_checked(weight))),
        weight_(std::move(weight)),
        bias_(std::move(bias)) {}

  /// Gives the latent weight and bias buffers back (the inverse of the adopting constructor). The
  /// layer is left empty: only destroy it or assign to it afterwards.
  std::pair<Matrix<T>, std::optional<Vector<T>>> release() && noexcept {
    return {std::move(weight_), std::move(bias_)};
  }

  Index in_features() const noexcept { return weight_.cols(); }
  Index out_features() const noexcept { return weight_.rows(); }
  const bitlinear_options& options() const noexcept { return options_; }

  /// Latent (master) weights, out x in, exactly as given.
  const Matrix<T>& weight() const noexcept { return weight_; }
  const std::optional<Vector<T>>& bias() const noexcept { return bias_; }

  /// Ternary codes {-1, 0, +1} (out x in) and the scale sw: weight ~ ternary_weight() / weight_scale().
  const Matrix<std::int8_t>& ternary_weight() const noexcept { return ternary_.values; }
  T weight_scale() const noexcept { return ternary_.scale; }

  /// Replaces the latent weight (same shape) and re-quantizes. Strong guarantee.
  void set_weight(Matrix<T> weight) {
    if (weight.rows() != weight_.rows() || weight.cols() != weight_.cols())
      throw shape_error("BitLinear::set_weight: weight is " +
                        detail::shape_string(weight.rows(), weight.cols()) + ", the layer is " +
                        detail::shape_string(weight_.rows(), weight_.cols()));
    ternary_weights<T> ternary = quantize_checked(weight);
    ternary_ = std::move(ternary);
    weight_ = std::move(weight);
  }

  /// Replaces the bias (or removes it with std::nullopt). Strong guarantee.
  void set_bias(std::optional<Vector<T>> bias) { bias_ = validated_bias(std::move(bias), out_features()); }

  /// x: batch x in  ->  batch x out. Throws shape_error for a wrong feature count and value_error
  /// for a non-finite input. A batch of 0 rows gives 0 rows.
  template <class Derived>
  Matrix<T> forward(const Eigen::MatrixBase<Derived>& x) const {
    static_assert(std::is_same_v<typename Derived::Scalar, T>,
                  "BitLinear<T>::forward: the input's scalar type must be T");
    if (x.cols() != in_features())
      throw shape_error("BitLinear::forward: input has " + std::to_string(x.cols()) +
                        " features, the layer expects " + std::to_string(in_features()));
    const Index batch = x.rows();
    Matrix<T> y(batch, out_features());
    if (batch == 0) return y;

    const quantized_activations<T> xq =
        options_.rms_norm ? quantize_activations(rms_norm(x, T(options_.rms_eps))) : quantize_activations(x);
    std::vector<std::int32_t> acc(static_cast<std::size_t>(batch * out_features()));
    detail::ternary_gemm_reference(xq.values.data(), batch, ternary_.values.data(), out_features(),
                                   in_features(), acc.data());
    for (Index b = 0; b < batch; ++b) {
      // sx * sw in double is exact for float scales; one rounding to T at the end.
      const double inverse_scale = 1.0 / (double(xq.scales(b)) * double(ternary_.scale));
      for (Index o = 0; o < out_features(); ++o)
        y(b, o) = static_cast<T>(double(acc[std::size_t(b * out_features() + o)]) * inverse_scale);
    }
    if (bias_) y.rowwise() += bias_->transpose();
    return y;
  }

 private:
  static bitlinear_options validated(bitlinear_options options) {
    if (!(options.rms_eps > 0) || !std::isfinite(options.rms_eps))
      throw value_error("BitLinear: rms_eps must be finite and > 0, got " + std::to_string(options.rms_eps));
    return options;
  }

  static ternary_weights<T> quantize_checked(const Matrix<T>& weight) {
    detail::require_non_empty(weight, "BitLinear: weight");
    if (weight.cols() > max_in_features)
      throw shape_error("BitLinear: in_features " + std::to_string(weight.cols()) +
                        " exceeds the exact-accumulation limit " + std::to_string(max_in_features));
    detail::require_finite(weight, "BitLinear: weight");
    return quantize_weights(weight);
  }

  static std::optional<Vector<T>> validated_bias(std::optional<Vector<T>> bias, Index out_features) {
    check_bias(bias, out_features);
    return bias;
  }

  static void check_bias(const std::optional<Vector<T>>& bias, Index out_features) {
    if (bias) {
      if (bias->size() != out_features)
        throw shape_error("BitLinear: bias has " + std::to_string(bias->size()) +
                          " elements, the weight has " + std::to_string(out_features) + " rows");
      detail::require_finite(*bias, "BitLinear: bias");
    }
  }

  bitlinear_options options_;
  ternary_weights<T> ternary_;
  Matrix<T> weight_;
  std::optional<Vector<T>> bias_;
};

static_assert(std::is_nothrow_move_constructible_v<BitLinear<float>> &&
              std::is_nothrow_move_assignable_v<BitLinear<float>> &&
              std::is_copy_constructible_v<BitLinear<float>>,
              "BitLinear must be copyable and nothrow-movable (replace_linear commits with noexcept swaps)");

}  // namespace bitnet
