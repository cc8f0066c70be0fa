// bitnet/quant.hpp - BitNet b1.58 quantization, exactly as the published PyTorch reference.
//
//   activation_quant(x): s = 127 / max(|x| over the row).clamp(min=1e-5)   (as reciprocal() * 127)
//                        y = (x * s).round().clamp(-128, 127) / s
//   weight_quant(w):     s = 1 / mean(|w|).clamp(min=1e-5)
//                        u = (w * s).round().clamp(-1, 1) / s
//
// round() is torch.round: half to even. We use std::nearbyint, which rounds half to even in the
// default floating-point environment (FE_TONEAREST); a caller that changes the rounding mode
// changes the activation codes, exactly as it would for the SIMD conversions. The ternary weight
// codes are computed by comparison with +-1/2 (the same values in the default mode, in every mode).
//
// The fake-quant functions (weight_quant, activation_quant) return dequantized values, like the
// reference. The integer forms (quantize_weights, quantize_activations) return the int8 codes and
// the scales, from which the fast path computes y = (xq . wq^T) / (sx * sw).
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <string>

#include <Eigen/Core>

#include "detail/validate.hpp"
#include "errors.hpp"
#include "matrix.hpp"

namespace bitnet {

/// Ternary weights: w ~ values / scale, values in {-1, 0, +1}, one scale per matrix.
template <real_scalar S>
struct ternary_weights {
  Matrix<std::int8_t> values;  // out x in
  S scale;                     // the reference's s = 1 / mean|w| (clamped)
};

/// Int8 activations: x.row(i) ~ values.row(i) / scales(i), values in [-128, 127].
template <real_scalar S>
struct quantized_activations {
  Matrix<std::int8_t> values;  // rows x features
  Vector<S> scales;            // one per row (token)
};

/// The clamp the reference applies to max|x| and mean|w| before taking the reciprocal.
template <real_scalar S>
inline constexpr S scale_floor = S(1e-5);

namespace detail {

/// torch.round: round half to even (in the default rounding mode).
template <real_scalar S>
inline S round_half_even(S v) noexcept {
  return std::nearbyint(v);
}

/// Mean of |w| over all elements, summed in double with Neumaier compensation so the result is
/// (very nearly) the correctly rounded mean, independent of the matrix size.
template <class Derived>
double mean_abs(const Eigen::DenseBase<Derived>& w) {
  double sum = 0.0, compensation = 0.0;
  for (Eigen::Index r = 0; r < w.rows(); ++r)
    for (Eigen::Index c = 0; c < w.cols(); ++c) {
      const double v = std::abs(static_cast<double>(w.coeff(r, c)));
      const double t = sum + v;
      compensation += std::abs(sum) >= v ? (sum - t) + v : (v - t) + sum;
      sum = t;
    }
  return (sum + compensation) / static_cast<double>(w.size());
}

template <class Derived>
using scalar_of = typename Derived::Scalar;

/// The activation scale for a row whose largest magnitude is absmax (see activation_scales).
/// The SIMD quantizers use this same function, so every path computes the same scale.
template <real_scalar S>
inline S activation_scale_of(S absmax) noexcept {
  return (S(1) / std::max(absmax, scale_floor<S>)) * S(127);
}

template <class Derived>
void require_real_matrix(const Eigen::MatrixBase<Derived>& m, const char* what) {
  require_non_empty(m, what);
  require_finite(m, what);
}

}  // namespace detail

namespace detail {
/// weight_scale of a w already checked non-empty and finite; `what` names it in the one error left.
template <class Derived>
scalar_of<Derived> weight_scale_of_finite(const Eigen::MatrixBase<Derived>& w, const char* what) {
  using S = scalar_of<Derived>;
  const S mean = static_cast<S>(mean_abs(w));
  if (!std::isfinite(mean)) throw value_error(std::string(what) + ": mean |w| overflows the scalar type");
  return S(1) / std::max(mean, scale_floor<S>);
}
}  // namespace detail

/// The per-matrix weight scale s = 1 / mean(|w|).clamp(min=1e-5). Throws for empty or non-finite w.
template <class Derived>
  requires real_scalar<detail::scalar_of<Derived>>
detail::scalar_of<Derived> weight_scale(const Eigen::MatrixBase<Derived>& w) {
  detail::require_real_matrix(w, "weight_quant: weight");
  return detail::weight_scale_of_finite(w, "weight_quant: weight");
}

/// The per-row activation scales s_i = 127 / max(|x_i|).clamp(min=1e-5), evaluated as PyTorch
/// evaluates `127.0 / tensor`: Tensor.__rtruediv__ is `tensor.reciprocal() * 127`, two roundings,
/// which can differ from a direct division in the last bit.
template <class Derived>
  requires real_scalar<detail::scalar_of<Derived>>
Vector<detail::scalar_of<Derived>> activation_scales(const Eigen::MatrixBase<Derived>& x) {
  using S = detail::scalar_of<Derived>;
  detail::require_real_matrix(x, "activation_quant: input");
  Vector<S> scales(x.rows());
  for (Index r = 0; r < x.rows(); ++r) {
    S absmax = 0;
    for (Index c = 0; c < x.cols(); ++c) absmax = std::max(absmax, std::abs(S(x.coeff(r, c))));
    scales(r) = detail::activation_scale_of(absmax);
  }
  return scales;
}

namespace detail {
/// quantize_weights of a w already checked non-empty and finite (BitLinear checks with its own
/// name, so set_weight scans the weights once).
template <class Derived>
ternary_weights<scalar_of<Derived>> quantize_finite_weights(const Eigen::MatrixBase<Derived>& w, const char* what) {
  using S = scalar_of<Derived>;
  const S s = weight_scale_of_finite(w, what);
  ternary_weights<S> q{Matrix<std::int8_t>(w.rows(), w.cols()), s};
  // clamp(round_half_even(v), -1, 1) of a finite v is (v > 1/2) - (v < -1/2): the ties +-1/2 go to
  // the even 0 and everything past +-3/2 clamps to +-1. Comparisons vectorize where nearbyint is a
  // libm call per weight (set_weight runs this after every optimizer step when fine-tuning).
  for (Index r = 0; r < w.rows(); ++r)
    for (Index c = 0; c < w.cols(); ++c) {
      const S v = S(w.coeff(r, c)) * s;
      q.values(r, c) = static_cast<std::int8_t>(int(v > S(0.5)) - int(v < S(-0.5)));
    }
  return q;
}
}  // namespace detail

/// Integer form of weight_quant: ternary codes and the scale. w ~ values / scale.
template <class Derived>
  requires real_scalar<detail::scalar_of<Derived>>
ternary_weights<detail::scalar_of<Derived>> quantize_weights(const Eigen::MatrixBase<Derived>& w) {
  detail::require_real_matrix(w, "weight_quant: weight");
  return detail::quantize_finite_weights(w, "weight_quant: weight");
}

/// Integer form of activation_quant: int8 codes and one scale per row. x.row(i) ~ values.row(i) / scales(i).
template <class Derived>
  requires real_scalar<detail::scalar_of<Derived>>
quantized_activations<detail::scalar_of<Derived>> quantize_activations(
    const Eigen::MatrixBase<Derived>& x) {
  using S = detail::scalar_of<Derived>;
  quantized_activations<S> q{Matrix<std::int8_t>(x.rows(), x.cols()), activation_scales(x)};
  for (Index r = 0; r < x.rows(); ++r) {
    const S s = q.scales(r);
    for (Index c = 0; c < x.cols(); ++c)
      q.values(r, c) = static_cast<std::int8_t>(
          std::clamp(detail::round_half_even(S(x.coeff(r, c)) * s), S(-128), S(127)));
  }
  return q;
}

/// Int8 activations with one scale per block of `block` consecutive features of a row (the last
/// block ragged): x(r, c) ~ values(r, c) / scales(r, c / block).
template <real_scalar S>
struct quantized_activation_blocks {
  Matrix<std::int8_t> values;  // rows x features
  Matrix<S> scales;            // rows x ceil(features / block)
  Index block = 0;
};

/// activation_quant per block (activation_scaling::per_block): each block of `block` features of a
/// row is quantized as activation_quant quantizes a row, s = 127 / max(|x| over the block).clamp(1e-5).
/// Throws for an empty or non-finite x and a block that is not in [1, max_in_features].
template <class Derived>
  requires real_scalar<detail::scalar_of<Derived>>
quantized_activation_blocks<detail::scalar_of<Derived>> quantize_activation_blocks(const Eigen::MatrixBase<Derived>& x,
                                                                                   Index block) {
  using S = detail::scalar_of<Derived>;
  if (block < 1) throw value_error("quantize_activation_blocks: block must be >= 1, got " + std::to_string(block));
  detail::require_real_matrix(x, "quantize_activation_blocks: input");
  const Index blocks = (x.cols() + block - 1) / block;
  quantized_activation_blocks<S> q{Matrix<std::int8_t>(x.rows(), x.cols()), Matrix<S>(x.rows(), blocks), block};
  for (Index r = 0; r < x.rows(); ++r)
    for (Index j = 0; j < blocks; ++j) {
      const Index first = j * block, end = std::min(first + block, x.cols());
      S absmax = 0;
      for (Index c = first; c < end; ++c) absmax = std::max(absmax, std::abs(S(x.coeff(r, c))));
      const S s = q.scales(r, j) = detail::activation_scale_of(absmax);
      for (Index c = first; c < end; ++c)
        q.values(r, c) =
            static_cast<std::int8_t>(std::clamp(detail::round_half_even(S(x.coeff(r, c)) * s), S(-128), S(127)));
    }
  return q;
}

/// Fake-quantized activations per block: values / scales of quantize_activation_blocks.
template <class Derived>
  requires real_scalar<detail::scalar_of<Derived>>
Matrix<detail::scalar_of<Derived>> activation_quant_blocks(const Eigen::MatrixBase<Derived>& x, Index block) {
  using S = detail::scalar_of<Derived>;
  const auto q = quantize_activation_blocks(x, block);
  Matrix<S> y(x.rows(), x.cols());
  for (Index r = 0; r < y.rows(); ++r)
    for (Index c = 0; c < y.cols(); ++c) y(r, c) = S(q.values(r, c)) / q.scales(r, c / block);
  return y;
}

/// Fake-quantized weights, the reference weight_quant: (w * s).round().clamp(-1, 1) / s.
template <class Derived>
  requires real_scalar<detail::scalar_of<Derived>>
Matrix<detail::scalar_of<Derived>> weight_quant(const Eigen::MatrixBase<Derived>& w) {
  using S = detail::scalar_of<Derived>;
  const auto q = quantize_weights(w);
  return (q.values.template cast<S>().array() / q.scale).matrix();
}

/// Fake-quantized activations, the reference activation_quant, one scale per row.
template <class Derived>
  requires real_scalar<detail::scalar_of<Derived>>
Matrix<detail::scalar_of<Derived>> activation_quant(const Eigen::MatrixBase<Derived>& x) {
  using S = detail::scalar_of<Derived>;
  const auto q = quantize_activations(x);
  Matrix<S> y = q.values.template cast<S>();
  for (Index r = 0; r < y.rows(); ++r) y.row(r) /= q.scales(r);
  return y;
}

/// How many weights share one scale (bitlinear_options::weight_scales). A "unit" is the set of
/// weights that share a scale: the whole matrix (per_tensor, BitNet b1.58), one output row
/// (per_row), or one group of group_size consecutive inputs of one row (per_group; the last group
/// of a row is ragged when group_size does not divide in_features, and it covers its real columns only).
enum class weight_scaling { per_tensor, per_row, per_group };

/// How many activations share one int8 scale (bitlinear_options::activation_scales): a whole token
/// (per_token, BitNet b1.58) or each block of group_size inputs of a token, aligned with the weight
/// groups (per_block, as llama.cpp's Q8_0 / Q8_K quantize activations for block formats).
enum class activation_scaling { per_token, per_block };

/// The group sizes per_group accepts.
inline constexpr Index min_group_size = 32;
inline constexpr Index max_group_size = 256;

/// Ternary weights with one scale per unit, in the magnitude convention of the files (GGUF d,
/// Ternary Bonsai's FP16 scales): w ~ values(o, c) * scales(o, c / unit_cols).
template <real_scalar S>
struct unit_ternary_weights {
  Matrix<std::int8_t> values;  // out x in, each -1, 0 or +1
  Matrix<S> scales;            // out x groups, groups = ceil(in / unit_cols); each d >= 0
  Index unit_cols = 0;         // columns per unit: in_features for per_row, group_size for per_group
};

namespace detail {

inline std::string scaling_name(weight_scaling s) {
  switch (s) {
    case weight_scaling::per_tensor: return "per_tensor";
    case weight_scaling::per_row: return "per_row";
    case weight_scaling::per_group: return "per_group";
  }
  return "weight_scaling(" + std::to_string(int(s)) + ")";
}

/// Throws value_error unless (scaling, group_size) is per_row / per_group with group_size 0 /
/// a power of two in [32, 256]. per_tensor is not a unit scaling: quantize_weights is its function.
inline void check_unit_scaling(weight_scaling scaling, Index group_size, std::string_view what) {
  if (scaling == weight_scaling::per_row) {
    if (group_size != 0)
      throw value_error(std::string(what) + ": group_size must be 0 with per_row scales, got " +
                        std::to_string(group_size));
    return;
  }
  if (scaling != weight_scaling::per_group)
    throw value_error(std::string(what) + ": one scale per unit needs weight_scaling per_row or per_group, got " +
                      scaling_name(scaling));
  if (group_size < min_group_size || group_size > max_group_size || (group_size & (group_size - 1)) != 0)
    throw value_error(std::string(what) + ": group_size must be 32, 64, 128 or 256 with per_group scales, got " +
                      std::to_string(group_size));
}

/// Columns per unit: the whole row for per_row, group_size for per_group.
inline Index unit_columns(weight_scaling scaling, Index group_size, Index in_features) noexcept {
  return scaling == weight_scaling::per_row ? in_features : group_size;
}

inline Index unit_count(Index in_features, Index unit_cols) noexcept { return (in_features + unit_cols - 1) / unit_cols; }

/// "row 3, group 1 (columns 128 to 255)": where an error points.
inline std::string unit_position(Index row, Index group, Index unit_cols, Index in_features) {
  const Index first = group * unit_cols, last = std::min(first + unit_cols, in_features) - 1;
  return "row " + std::to_string(row) + ", group " + std::to_string(group) + " (columns " + std::to_string(first) +
         " to " + std::to_string(last) + ")";
}

/// quantize_weight_units of a w already checked non-empty and finite, and a checked scaling:
/// d = max(T(mean |w| over the unit), 1e-5) (the mean in double, as mean_abs), code =
/// clamp(round_half_even(w / d), -1, 1), i.e. w / d compared with +-1/2.
template <class Derived>
unit_ternary_weights<scalar_of<Derived>> quantize_finite_weight_units(const Eigen::MatrixBase<Derived>& w,
                                                                      Index unit_cols) {
  using S = scalar_of<Derived>;
  const Index groups = unit_count(w.cols(), unit_cols);
  unit_ternary_weights<S> q{Matrix<std::int8_t>(w.rows(), w.cols()), Matrix<S>(w.rows(), groups), unit_cols};
  for (Index r = 0; r < w.rows(); ++r)
    for (Index g = 0; g < groups; ++g) {
      const Index first = g * unit_cols, width = std::min(unit_cols, w.cols() - first);
      // A mean of finite values is at most their largest magnitude: no overflow in S.
      const S d = std::max(static_cast<S>(mean_abs(w.block(r, first, 1, width))), scale_floor<S>);
      q.scales(r, g) = d;
      for (Index c = first; c < first + width; ++c) {
        const S v = S(w.coeff(r, c)) / d;
        q.values(r, c) = static_cast<std::int8_t>(int(v > S(0.5)) - int(v < S(-0.5)));
      }
    }
  return q;
}

/// split_ternary_units of a w already checked non-empty and finite, and a checked scaling; `what`
/// starts the error message (a layer's name).
template <class Derived>
unit_ternary_weights<scalar_of<Derived>> split_finite_ternary_units(const Eigen::MatrixBase<Derived>& w,
                                                                    Index unit_cols, std::string_view what) {
  using S = scalar_of<Derived>;
  const Index groups = unit_count(w.cols(), unit_cols);
  unit_ternary_weights<S> q{Matrix<std::int8_t>(w.rows(), w.cols()), Matrix<S>(w.rows(), groups), unit_cols};
  for (Index r = 0; r < w.rows(); ++r)
    for (Index g = 0; g < groups; ++g) {
      const Index first = g * unit_cols, end = std::min(first + unit_cols, w.cols());
      S magnitude = 0;
      Index magnitude_col = 0;
      for (Index c = first; c < end; ++c) {
        const S v = S(w.coeff(r, c));
        const S a = std::abs(v);
        if (a != S(0)) {
          if (magnitude == S(0)) {
            magnitude = a;
            magnitude_col = c;
          } else if (a != magnitude) {
            throw value_error(std::string(what) + ": the weights are not ternary at " +
                              unit_position(r, g, unit_cols, w.cols()) + ": |w| is " + format_value(magnitude) +
                              " at column " + std::to_string(magnitude_col) + " and " + format_value(a) +
                              " at column " + std::to_string(c) +
                              "; an exact import never re-quantizes (quantize from latent weights instead)");
          }
        }
        q.values(r, c) = static_cast<std::int8_t>(int(v > S(0)) - int(v < S(0)));
      }
      // An all-zero unit gets the scale absmean gives it (the 1e-5 floor): its codes are 0, so any
      // finite scale reproduces it, and this one is also what quantizing the same unit gives.
      q.scales(r, g) = magnitude == S(0) ? scale_floor<S> : magnitude;
    }
  return q;
}

}  // namespace detail

/// Ternary codes and one absmean scale per unit (per_row, or per_group of group_size inputs):
/// d = max(mean |w| over the unit, 1e-5), code = clamp(round_half_even(w / d), -1, 1);
/// w ~ values * d. Throws shape_error / value_error for an empty or non-finite w, per_tensor
/// scaling (use quantize_weights) or a group_size that does not fit the scaling.
template <class Derived>
  requires real_scalar<detail::scalar_of<Derived>>
unit_ternary_weights<detail::scalar_of<Derived>> quantize_weight_units(const Eigen::MatrixBase<Derived>& w,
                                                                       weight_scaling scaling, Index group_size = 0) {
  detail::check_unit_scaling(scaling, group_size, "quantize_weight_units");
  detail::require_real_matrix(w, "quantize_weight_units: weight");
  return detail::quantize_finite_weight_units(w, detail::unit_columns(scaling, group_size, w.cols()));
}

/// The exact import of weights that are already ternary per unit (within each unit every nonzero
/// |w| is the same value d): codes = sign(w) and scales = d with no rounding at all, so
/// values * scales reproduces w exactly (a -0 weight gives code 0, i.e. +0). An all-zero unit gets
/// codes 0 and scale 1e-5 (what quantize_weight_units gives it). Anything else throws value_error
/// naming the row, the group, its columns and the two differing magnitudes: never re-quantized.
template <class Derived>
  requires real_scalar<detail::scalar_of<Derived>>
unit_ternary_weights<detail::scalar_of<Derived>> split_ternary_units(const Eigen::MatrixBase<Derived>& w,
                                                                     weight_scaling scaling, Index group_size = 0) {
  detail::check_unit_scaling(scaling, group_size, "split_ternary_units");
  detail::require_real_matrix(w, "split_ternary_units: weight");
  return detail::split_finite_ternary_units(w, detail::unit_columns(scaling, group_size, w.cols()),
                                            "split_ternary_units");
}

/// The weights a unit layer computes with: values(o, c) * scales(o, c / unit_cols), in S (exact:
/// a code times a scale).
template <real_scalar S>
Matrix<S> dequantize(const unit_ternary_weights<S>& q) {
  Matrix<S> w(q.values.rows(), q.values.cols());
  for (Index r = 0; r < w.rows(); ++r)
    for (Index c = 0; c < w.cols(); ++c) w(r, c) = S(q.values(r, c)) * q.scales(r, c / q.unit_cols);
  return w;
}

/// Fake-quantized weights per unit, the training forward's weight operand: (w / d).round().clamp(-1, 1) * d.
template <class Derived>
  requires real_scalar<detail::scalar_of<Derived>>
Matrix<detail::scalar_of<Derived>> weight_quant_units(const Eigen::MatrixBase<Derived>& w, weight_scaling scaling,
                                                      Index group_size = 0) {
  return dequantize(quantize_weight_units(w, scaling, group_size));
}

namespace detail {
/// One row of rms_norm: out[c] = x[c] * (1 / sqrt(mean(x^2) + eps)), squares summed in double.
/// out may be x.
template <real_scalar S>
void rms_norm_row(const S* x, Index cols, S eps, S* out) noexcept {
  double sum_squares = 0;
  for (Index c = 0; c < cols; ++c) sum_squares += double(x[c]) * double(x[c]);
  const S mean_square = static_cast<S>(sum_squares / double(cols));
  const S inverse = S(1) / std::sqrt(mean_square + eps);
  for (Index c = 0; c < cols; ++c) out[c] = x[c] * inverse;
}
}  // namespace detail

/// RMSNorm without a learnable weight, per row: x * rsqrt(mean(x^2) + eps).
template <class Derived>
  requires real_scalar<detail::scalar_of<Derived>>
Matrix<detail::scalar_of<Derived>> rms_norm(const Eigen::MatrixBase<Derived>& x,
                                            detail::scalar_of<Derived> eps = 1e-6) {
  using S = detail::scalar_of<Derived>;
  if (!(eps > 0) || !std::isfinite(eps))
    throw value_error("rms_norm: eps must be finite and > 0, got " + std::to_string(eps));
  detail::require_real_matrix(x, "rms_norm: input");
  Matrix<S> y = x;
  for (Index r = 0; r < y.rows(); ++r) detail::rms_norm_row(y.data() + r * y.cols(), y.cols(), eps, y.data() + r * y.cols());
  return y;
}

}  // namespace bitnet
