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
