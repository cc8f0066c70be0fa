// bitnet/transfer.hpp - how replace_linear moves a layer's weights into its new BitLinear.
//
// A transfer policy is a small class chosen at compile time (replace_linear<transfer::move>(graph))
// or passed as an object (replace_linear(graph, options, my_policy{...})). Its protocol:
//
//   static constexpr bool takes_buffers;   // adopt the source's buffers instead of copying them
//   void prepare(const layer_source<T>&);  // before the new layer is built; may throw
//   void verify(const layer_source<T>&, const BitLinear<T>&);  // after it is built, before commit; may throw
//
// Both hooks run while the graph is still untouched (or, for adopted buffers, restorable): any
// exception rolls every layer back. Derive from transfer::checked to add a check of your own.
// See docs/transfer-policies.md.
#pragma once

#include <cmath>
#include <concepts>
#include <cstdint>
#include <cstring>
#include <limits>
#include <optional>
#include <string>
#include <string_view>
#include <utility>

#include "bit_linear.hpp"
#include "errors.hpp"
#include "layer_traits.hpp"
#include "matrix.hpp"
#include "quant.hpp"

namespace bitnet {

/// Read-only access to the layer being transferred, whatever its scalar type and storage: what a
/// policy inspects. Values are given converted to T, the scalar type of the new BitLinear<T>. Once
/// a policy that takes buffers has built the new layer, the source is that layer's adopted buffers.
template <real_scalar T>
class layer_source {
 public:
  template <class S, int Order>
  layer_source(std::string_view path, const linear_view<S, Order>& view, const bitlinear_options& options,
               bool adopted = false, bool exact_import = false) noexcept
      : path_(path),
        view_(&view),
        access_(&access_for<linear_view<S, Order>>),
        options_(&options),
        adopted_(adopted),
        exact_import_(exact_import) {}

  /// The dotted path of the layer in the graph, e.g. "blocks.3.mlp.down".
  std::string_view path() const noexcept { return path_; }
  Index out_features() const noexcept { return access_->rows(view_); }
  Index in_features() const noexcept { return access_->cols(view_); }
  T weight(Index row, Index col) const noexcept { return access_->weight_at(view_, row, col); }
  bool has_bias() const noexcept { return access_->has_bias(view_); }
  Index bias_size() const noexcept { return access_->bias_size(view_); }
  T bias(Index i) const noexcept { return access_->bias_at(view_, i); }
  /// The weight (out x in) as a row-major Matrix<T>: a copy.
  Matrix<T> weight_matrix() const {
    Matrix<T> w;
    access_->copy_weight(view_, w);
    return w;
  }
  /// The bias as a Vector<T> (a copy), or none.
  std::optional<Vector<T>> bias_vector() const {
    std::optional<Vector<T>> b;
    if (has_bias()) access_->copy_bias(view_, b.emplace());
    return b;
  }
  /// The first weight (row, column) that is not finite once converted to T, if any.
  std::optional<std::pair<Index, Index>> first_non_finite_weight() const noexcept {
    return access_->first_non_finite_weight(view_);
  }
  /// The first bias element that is not finite once converted to T, if any.
  std::optional<Index> first_non_finite_bias() const noexcept { return access_->first_non_finite_bias(view_); }
  /// The options the new BitLinear is built with.
  const bitlinear_options& options() const noexcept { return *options_; }
  /// True when the new layer adopted the source's buffers instead of copying them.
  bool adopted() const noexcept { return adopted_; }
  /// True for ternary_import::exact: the new layer holds the source's codes and unit scales and no
  /// latent weights (BitLinear::from_exact_ternary).
  bool exact_import() const noexcept { return exact_import_; }

 private:
  struct access {
    Index (*rows)(const void*) noexcept;
    Index (*cols)(const void*) noexcept;
    T (*weight_at)(const void*, Index, Index) noexcept;
    bool (*has_bias)(const void*) noexcept;
    Index (*bias_size)(const void*) noexcept;
    T (*bias_at)(const void*, Index) noexcept;
    void (*copy_weight)(const void*, Matrix<T>&);
    void (*copy_bias)(const void*, Vector<T>&);
    std::optional<std::pair<Index, Index>> (*first_non_finite_weight)(const void*) noexcept;
    std::optional<Index> (*first_non_finite_bias)(const void*) noexcept;
  };

  template <class View>
  static std::optional<std::pair<Index, Index>> scan_weight(const void* v) noexcept {
    const auto& w = as<View>(v).weight;
    for (Index r = 0; r < w.rows(); ++r)
      for (Index c = 0; c < w.cols(); ++c)
        if (!std::isfinite(static_cast<T>(w(r, c)))) return std::pair{r, c};
    return std::nullopt;
  }

  template <class View>
  static std::optional<Index> scan_bias(const void* v) noexcept {
    const auto& b = as<View>(v).bias;
    if (b)
      for (Index i = 0; i < b->size(); ++i)
        if (!std::isfinite(static_cast<T>((*b)(i)))) return i;
    return std::nullopt;
  }

  template <class View>
  static const View& as(const void* view) noexcept {
    return *static_cast<const View*>(view);
  }

  template <class View>
  static constexpr access access_for = {
      [](const void* v) noexcept { return as<View>(v).weight.rows(); },
      [](const void* v) noexcept { return as<View>(v).weight.cols(); },
      [](const void* v, Index r, Index c) noexcept { return static_cast<T>(as<View>(v).weight(r, c)); },
      [](const void* v) noexcept { return as<View>(v).bias.has_value(); },
      [](const void* v) noexcept { return as<View>(v).bias ? as<View>(v).bias->size() : Index{0}; },
      [](const void* v, Index i) noexcept { return static_cast<T>((*as<View>(v).bias)(i)); },
      [](const void* v, Matrix<T>& out) { out = as<View>(v).weight.template cast<T>(); },
      [](const void* v, Vector<T>& out) { out = as<View>(v).bias->template cast<T>(); },
      &scan_weight<View>,
      &scan_bias<View>,
  };

  std::string_view path_;
  const void* view_;
  const access* access_;
  const bitlinear_options* options_;
  bool adopted_;
  bool exact_import_;
};

namespace detail {

/// A transfer_error whose message names the layer path and the reason.
inline transfer_error transfer_failure(std::string_view path, std::string_view reason) {
  std::string message = "bitnet::replace_linear: ";
  message += path.empty() ? std::string_view("<root>") : path;
  message += ": ";
  message += reason;
  return transfer_error(message);
}

template <class T>
bool same_bits(T a, T b) noexcept {
  return std::memcmp(&a, &b, sizeof(T)) == 0;
}

inline std::string position(Index row, Index col) {
  return "row " + std::to_string(row) + ", column " + std::to_string(col);
}

template <class T>
std::string describe_non_finite(T v) {
  return std::isnan(v) ? "nan" : (v > 0 ? "+inf" : "-inf");
}

/// A deterministic probe input, values in [-1, 1] with no structure a transposition could hide.
template <real_scalar T>
Matrix<T> probe_input(Index rows, Index cols) {
  Matrix<T> x(rows, cols);
  std::uint64_t state = 0x9E3779B97F4A7C15ull;
  for (Index i = 0; i < x.size(); ++i) {
    state = state * 6364136223846793005ull + 1442695040888963407ull;
    x.data()[i] = T(double(state >> 11) / double(1ull << 53) * 2.0 - 1.0);
  }
  return x;
}

}  // namespace detail

/// The policy protocol (see the top of this header), checked for one scalar type of BitLinear<T>.
template <class P, class T = float>
concept transfer_policy =
    std::is_class_v<P> && real_scalar<T> &&
    requires(P& policy, const layer_source<T>& source, const BitLinear<T>& staged) {
      { P::takes_buffers } -> std::convertible_to<bool>;
      policy.prepare(source);
      policy.verify(source, staged);
    };

namespace transfer {

/// Copies: the new layer's latent weights and bias are bit-identical copies of the source (converted
/// to T if the source stores another scalar type); the source is untouched until the commit.
struct copy {
  static constexpr bool takes_buffers = false;
  template <real_scalar T>
  void prepare(const layer_source<T>&) {}
  template <real_scalar T>
  void verify(const layer_source<T>&, const BitLinear<T>&) {}
};

/// Takes the source's buffers where its type allows it (bitnet::Linear<T> of the same T, or any layer
/// with bitnet_linear_buffers) so peak memory never holds two copies of those latent weights; copies
/// otherwise. On rollback the buffers are handed back, so the graph is again bit-identical.
struct move {
  static constexpr bool takes_buffers = true;
  template <real_scalar T>
  void prepare(const layer_source<T>&) {}
  template <real_scalar T>
  void verify(const layer_source<T>&, const BitLinear<T>&) {}
};

/// The default: copies, validates every layer first (non-empty, within the exact-accumulation limit,
/// bias length, every value finite), then proves the new layer's latent weights and bias are
/// bit-identical to the source and that its output on a probe input matches the reference BitLinear
/// computed from the source weights.
struct checked {
  static constexpr bool takes_buffers = false;

  template <real_scalar T>
  void prepare(const layer_source<T>& source) {
    const Index out = source.out_features(), in = source.in_features();
    if (out == 0 || in == 0)
      throw detail::transfer_failure(source.path(), "weight is empty (" + detail::shape_string(out, in) + ")");
    if (in > max_in_features)
      throw detail::transfer_failure(source.path(), "in_features " + std::to_string(in) +
                                                        " exceeds the exact-accumulation limit " +
                                                        std::to_string(max_in_features));
    if (source.has_bias() && source.bias_size() != out)
      throw detail::transfer_failure(source.path(), "bias has " + std::to_string(source.bias_size()) +
                                                        " elements, the weight has " + std::to_string(out) +
                                                        " rows");
    if (const auto at = source.first_non_finite_weight())
      throw detail::transfer_failure(source.path(), "weight is not finite (" +
                                                        detail::describe_non_finite(source.weight(at->first, at->second)) +
                                                        ") at " + detail::position(at->first, at->second));
    if (const auto at = source.first_non_finite_bias())
      throw detail::transfer_failure(source.path(), "bias is not finite (" + detail::describe_non_finite(source.bias(*at)) +
                                                        ") at index " + std::to_string(*at));
  }

  template <real_scalar T>
  void verify(const layer_source<T>& source, const BitLinear<T>& staged) {
    const Index out = source.out_features(), in = source.in_features();
    if (staged.out_features() != out || staged.in_features() != in)
      throw detail::transfer_failure(source.path(), "the new layer is " +
                                                        detail::shape_string(staged.out_features(), staged.in_features()) +
                                                        ", the source is " + detail::shape_string(out, in));
    const Matrix<T> source_weight = source.weight_matrix();
    if (source.exact_import())
      check_exact_weights(source, source_weight, staged);
    else if (std::memcmp(staged.weight().data(), source_weight.data(), sizeof(T) * std::size_t(source_weight.size())) != 0)
      for (Index r = 0; r < out; ++r)
        for (Index c = 0; c < in; ++c)
          if (!detail::same_bits(staged.weight()(r, c), source_weight(r, c)))
            throw detail::transfer_failure(source.path(),
                                           "the new layer's latent weight differs from the source at " +
                                               detail::position(r, c));
    if (staged.bias().has_value() != source.has_bias())
      throw detail::transfer_failure(source.path(), source.has_bias() ? "the new layer lost the bias"
                                                                      : "the new layer has a bias the source lacks");
    if (source.has_bias())
      for (Index i = 0; i < out; ++i)
        if (!detail::same_bits((*staged.bias())(i), source.bias(i)))
          throw detail::transfer_failure(source.path(),
                                         "the new layer's bias differs from the source at index " + std::to_string(i));
    check_probe_output(source, source_weight, staged);
  }

 private:
  // An exact import: codes times unit scales must be the source weights bit for bit (a -0 weight
  // may come back as +0: a ternary code has no signed zero).
  template <real_scalar T>
  static void check_exact_weights(const layer_source<T>& source, const Matrix<T>& source_weight,
                                  const BitLinear<T>& staged) {
    if (staged.options().weight_scales == weight_scaling::per_tensor)
      throw detail::transfer_failure(source.path(), "an exact import needs per_row or per_group weight scales");
    const Matrix<T> imported = staged.dequantized_weight();
    for (Index r = 0; r < source_weight.rows(); ++r)
      for (Index c = 0; c < source_weight.cols(); ++c)
        if (!detail::same_bits(imported(r, c), source_weight(r, c)) &&
            !(source_weight(r, c) == T(0) && imported(r, c) == T(0)))
          throw detail::transfer_failure(source.path(), "the new layer's codes times unit scales give " +
                                                            detail::format_value(imported(r, c)) + " at " +
                                                            detail::position(r, c) + ", the source weight is " +
                                                            detail::format_value(source_weight(r, c)));
  }

  // The new layer's output on a probe input must equal what is computed here from the source weights:
  // sum over units j of acc_j * scale_j + b, with acc_j the exact integer sum of unit j (the whole row
  // for per_tensor) and scale_j = 1 / (sx * sw) (per_tensor) or d_j / sx_j (units), up to the rounding
  // of the final operations in T. An exact import must also stay within the activation-quantization
  // bound of the float layer of the source weights: |y - (n . w + b)| <= sum_k |w_k| |n_k - xq_k / sx_k|.
  template <real_scalar T>
  static void check_probe_output(const layer_source<T>& source, const Matrix<T>& source_weight,
                                 const BitLinear<T>& staged) {
    const bitlinear_options& options = source.options();
    const Index out = source.out_features(), in = source.in_features();
    const Matrix<T> x = detail::probe_input<T>(2, in);
    const Matrix<T> y = staged.forward(x);
    const Matrix<T> normed = options.rms_norm ? rms_norm(x, T(options.rms_eps)) : x;
    const bool per_tensor = options.weight_scales == weight_scaling::per_tensor;
    const Index unit_cols = per_tensor ? in : detail::unit_columns(options.weight_scales, options.group_size, in);
    const Index groups = detail::unit_count(in, unit_cols);

    Matrix<std::int8_t> xq;
    Matrix<T> sx;  // batch x groups
    if (options.activation_scales == activation_scaling::per_block) {
      quantized_activation_blocks<T> q = quantize_activation_blocks(normed, unit_cols);
      xq = std::move(q.values);
      sx = std::move(q.scales);
    } else {
      quantized_activations<T> q = quantize_activations(normed);
      xq = std::move(q.values);
      sx = q.scales.replicate(1, groups);
    }
    Matrix<std::int8_t> codes;
    Matrix<double> unit_factor;  // out x groups: 1 / sw (per_tensor) or d
    if (per_tensor) {
      ternary_weights<T> wq = quantize_weights(source_weight);
      codes = std::move(wq.values);
      unit_factor = Matrix<double>::Constant(out, 1, 1.0 / double(wq.scale));
    } else {
      unit_ternary_weights<T> wq = source.exact_import()
                                       ? split_ternary_units(source_weight, options.weight_scales, options.group_size)
                                       : quantize_weight_units(source_weight, options.weight_scales, options.group_size);
      codes = std::move(wq.values);
      unit_factor = wq.scales.template cast<double>();
    }

    const double eps = std::numeric_limits<T>::epsilon();
    for (Index b = 0; b < x.rows(); ++b)
      for (Index o = 0; o < out; ++o) {
        double sum = 0, magnitude = 0;
        for (Index j = 0; j < groups; ++j) {
          double acc = 0, acc_magnitude = 0;
          for (Index k = j * unit_cols; k < std::min(in, (j + 1) * unit_cols); ++k) {
            const double term = double(xq(b, k)) * double(codes(o, k));
            acc += term;
            acc_magnitude += std::abs(term);
          }
          const double scale = unit_factor(o, j) / double(sx(b, j));
          sum += acc * scale;
          magnitude += acc_magnitude * scale;
        }
        const double bias = source.has_bias() ? double(source.bias(o)) : 0.0;
        const double expected = sum + bias;
        const double rounding = 4 * eps * (magnitude + std::abs(bias)) + 4 * double(std::numeric_limits<T>::min());
        if (!(std::abs(double(y(b, o)) - expected) <= rounding))
          throw detail::transfer_failure(
              source.path(), "the new layer's output on the probe input differs from the reference BitLinear of the "
                             "source weights at output " + std::to_string(o) + " (" + std::to_string(double(y(b, o))) +
                             " instead of " + std::to_string(expected) + ")");
        if (source.exact_import()) {
          double exact = bias, bound = rounding, float_magnitude = std::abs(bias);
          for (Index k = 0; k < in; ++k) {
            const double w = double(source_weight(o, k)), n = double(normed(b, k));
            exact += n * w;
            float_magnitude += std::abs(n * w);
            bound += std::abs(w) * std::abs(n - double(xq(b, k)) / double(sx(b, k / unit_cols)));
          }
          bound += 4 * eps * float_magnitude;
          if (!(std::abs(double(y(b, o)) - exact) <= bound))
            throw detail::transfer_failure(
                source.path(), "the new layer's output on the probe input is " + std::to_string(double(y(b, o))) +
                                   " at output " + std::to_string(o) + ", farther from the float layer of the source "
                                   "weights (" + std::to_string(exact) + ") than activation quantization allows (" +
                                   std::to_string(bound) + ")");
        }
      }
  }
};

}  // namespace transfer

}  // namespace bitnet
