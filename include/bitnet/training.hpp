// bitnet/training.hpp - fine-tuning BitLinear layers: a training forward, the straight-through
// backward, the quantization warm-up, and a walk over the graph's BitLinear layers for the optimizer.
//
// The published BitLinear trains with the straight-through estimator (STE): the quantizers are
// used as v + lambda * (q(v) - v) with the difference detached, so the forward multiplies the
// quantized operands and the backward is the float backward with those operands:
//
//   n  = norm(x)                      (RMSNorm without weight, or identity)
//   x~ = n + lambda * (activation_quant(n) - n)      W~ = W + lambda * (weight_quant(W) - W)
//   y  = x~ . W~^T + b
//   dW = dy^T . x~     db = sum over the batch of dy     dn = dy . W~     dx = RMSNorm'(dn)
//
// With one scale per unit (bitlinear_options::weight_scales per_row / per_group) weight_quant is
// taken per unit, (W / d).round().clamp(-1, 1) * d with d the unit's absmean (quant.hpp's
// weight_quant_units), and with per_block activations activation_quant per block of group_size.
// The scales are the layer's: with bitlinear_options::scale_update frozen (exact imports) d stays
// the imported one, so an imported model fine-tunes from exactly itself.
//
// lambda is the warm-up strength (Hugging Face's 1.58-bit fine-tuning: lambda = min(step / 1000, 1)).
// lambda = 0 is the float layer; lambda = 1 is the ternary layer, and then the output is
// BitLinear::forward() itself, bit for bit. The optimizer and the backward of the rest of the
// graph are the user's; see docs/fine-tuning.md.
//
//   auto [y, tape] = bitnet::train_forward(layer, x, lambda);   // keeps x~, W~ (and n) for backward
//   bitnet::bit_linear_gradients<float> g = bitnet::backward(tape, dy);
//   layer.set_weight(layer.weight() - lr * g.weight);            // re-quantizes and re-packs
#pragma once

#include <algorithm>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <optional>
#include <string>
#include <string_view>
#include <type_traits>
#include <utility>

#include "bit_linear.hpp"
#include "detail/validate.hpp"
#include "detail/walker.hpp"
#include "errors.hpp"
#include "layer_traits.hpp"
#include "matrix.hpp"
#include "quant.hpp"
#include "rotation.hpp"

namespace bitnet {

/// The warm-up strength of the Hugging Face recipe: lambda = min(step / warmup_steps, 1).
/// Throws value_error for step < 0 or warmup_steps <= 0.
inline double quantization_warmup(std::int64_t step, std::int64_t warmup_steps = 1000) {
  if (step < 0) throw value_error("bitnet::quantization_warmup: step must be >= 0, got " + std::to_string(step));
  if (warmup_steps <= 0)
    throw value_error("bitnet::quantization_warmup: warmup_steps must be > 0, got " + std::to_string(warmup_steps));
  return step >= warmup_steps ? 1.0 : double(step) / double(warmup_steps);
}

/// Gradients of the loss with respect to a BitLinear's input, latent weight and bias (STE).
template <real_scalar T>
struct bit_linear_gradients {
  Matrix<T> input;                // dL/dx, batch x in
  Matrix<T> weight;               // dL/dW for the latent weight, out x in
  std::optional<Vector<T>> bias;  // dL/db, out; none when the layer has no bias
};

template <real_scalar T>
class bit_linear_tape;

namespace detail {
struct tape_access;
}

/// What train_forward keeps for backward: the operands the forward multiplied (x~, W~) and, with
/// RMSNorm, the normalized input and the per-row 1/rms. It owns copies, so the layer may change
/// (an optimizer step) before backward runs without changing the gradients, as in PyTorch.
template <real_scalar T>
class bit_linear_tape {
 public:
  /// An empty tape, so that tapes can sit in maps (`tapes[name] = train_forward(...).tape`);
  /// backward on it throws state_error.
  bit_linear_tape() = default;

  T lambda() const noexcept { return lambda_; }
  Index batch() const noexcept { return input_.rows(); }
  Index in_features() const noexcept { return weight_.cols(); }
  Index out_features() const noexcept { return weight_.rows(); }
  bool has_bias() const noexcept { return has_bias_; }
  /// x~: the (fake-quantized, mixed by lambda) activations the forward multiplied, batch x in.
  const Matrix<T>& input_operand() const noexcept { return input_; }
  /// W~: the (ternary times 1 / sw, mixed by lambda) weights the forward multiplied, out x in.
  const Matrix<T>& weight_operand() const noexcept { return weight_; }
  /// Heap bytes held.
  std::size_t memory_bytes() const noexcept {
    return std::size_t(input_.size() + weight_.size() + normed_.size() + inv_rms_.size()) * sizeof(T);
  }

 private:
  friend struct detail::tape_access;

  T lambda_ = 0;
  bool has_bias_ = false;
  bool rms_norm_ = false;
  Matrix<T> input_;    // x~
  Matrix<T> weight_;   // W~; empty only in a default-constructed or moved-from tape
  Matrix<T> normed_;   // n = RMSNorm(x), with rms_norm
  Vector<T> inv_rms_;  // 1 / sqrt(mean(x^2) + eps) per row, with rms_norm
  std::optional<hadamard_rotation> rotation_;  // the layer's input rotation R: backward applies R^T
};

/// The output of train_forward and what backward needs.
template <real_scalar T>
struct training_forward_result {
  Matrix<T> output;  // batch x out
  bit_linear_tape<T> tape;
};

namespace detail {

struct tape_access {
  template <real_scalar T, class Derived>
  static training_forward_result<T> forward(const BitLinear<T>& layer, const Eigen::MatrixBase<Derived>& x_in,
                                            T lambda) {
    static_assert(std::is_same_v<typename Derived::Scalar, T>,
                  "bitnet::train_forward: the input's scalar type must be the layer's T");
    constexpr std::string_view what = "bitnet::train_forward";
    if (!std::isfinite(lambda) || lambda < T(0) || lambda > T(1))
      throw value_error(std::string(what) + ": lambda must be in [0, 1], got " + std::to_string(lambda));
    if (!layer.has_latent_weights())
      throw state_error(std::string(what) +
                        ": the layer has no latent weights (released by release_latent_weights(), or built by "
                        "from_ternary() / an exact import from a packed checkpoint), so it cannot be trained: "
                        "training updates the latent weights; give it some with set_weight() first "
                        "(set_weight(layer.dequantized_weight()) keeps a frozen layer exactly as it is)");
    if (x_in.cols() != layer.in_features())
      throw shape_error(std::string(what) + ": input has " + std::to_string(x_in.cols()) +
                        " features, the layer expects " + std::to_string(layer.in_features()));
    const Matrix<T> x = x_in;
    require_finite(x, "bitnet::train_forward: input");

    const bitlinear_options& options = layer.options();
    const Matrix<T>& latent = layer.weight();
    const Index batch = x.rows();
    bit_linear_tape<T> tape;
    tape.lambda_ = lambda;
    tape.has_bias_ = layer.bias().has_value();
    tape.rms_norm_ = options.rms_norm;

    // n: exactly what forward() normalizes (rms_norm), and 1 / rms for the backward.
    Matrix<T> normed;
    if (options.rms_norm && batch > 0) {
      const T eps = T(options.rms_eps);
      normed = rms_norm(x, eps);
      tape.inv_rms_.resize(batch);
      for (Index r = 0; r < batch; ++r) {
        double sum_squares = 0;
        for (Index c = 0; c < x.cols(); ++c) sum_squares += double(x(r, c)) * double(x(r, c));
        tape.inv_rms_(r) = T(1) / std::sqrt(static_cast<T>(sum_squares / double(x.cols())) + eps);
      }
    } else {
      normed = x;
    }
    // The operand the quantizer sees: R n with an input rotation (fixed; backward applies R^T).
    tape.rotation_ = options.rotation;
    const Matrix<T> rotated = options.rotation && batch > 0 ? options.rotation->apply(normed) : Matrix<T>();
    const Matrix<T>& operand = options.rotation && batch > 0 ? rotated : normed;

    Matrix<T> output;
    if (lambda == T(0)) {
      // The float layer: no quantizer at all (n + 0 * d could turn a -0 into +0).
      tape.weight_ = latent;
      tape.input_ = operand;
      output = float_output(layer, tape);
    } else {
      // weight_quant(W) with the layer's scale sw (no second mean|W|): the code clamp(round(v), -1, 1)
      // of v = W * sw is (v > 1/2) - (v < -1/2) (the ties +-1/2 round to 0, half to even), so this
      // is one vectorized pass, bit-identical to quant.hpp's weight_quant (codes / sw). Unit scales:
      // the layer's own codes times its d (set_weight derived those codes from these latent weights
      // and these d: absmean's weight_quant_units, or the frozen d's round-clip(W / d)).
      Matrix<T> quantized_weight;
      if (options.weight_scales == weight_scaling::per_tensor) {
        const T sw = layer.weight_scale();
        const auto scaled = latent.array() * sw;
        quantized_weight = ((scaled > T(0.5)).template cast<T>() - (scaled < T(-0.5)).template cast<T>()) / sw;
      } else {
        quantized_weight = layer.dequantized_weight();
      }
      Matrix<T> quantized_input =
          batch == 0 ? Matrix<T>(0, x.cols())
          : options.activation_scales == activation_scaling::per_block ? activation_quant_blocks(operand, options.group_size)
                                                                       : activation_quant(operand);
      if (lambda == T(1)) {
        tape.weight_ = std::move(quantized_weight);
        tape.input_ = std::move(quantized_input);
        output = layer.forward(x);  // the integer path, bit for bit
      } else {
        // PyTorch's order: v + lambda * (q(v) - v), each operation rounded in T.
        tape.weight_ = (latent.array() + lambda * (quantized_weight.array() - latent.array())).matrix();
        tape.input_ = (operand.array() + lambda * (quantized_input.array() - operand.array())).matrix();
        output = float_output(layer, tape);
      }
    }
    if (options.rms_norm) tape.normed_ = std::move(normed);
    return {std::move(output), std::move(tape)};
  }

  template <real_scalar T, class Derived>
  static bit_linear_gradients<T> backward(const bit_linear_tape<T>& tape, const Eigen::MatrixBase<Derived>& dy_in) {
    static_assert(std::is_same_v<typename Derived::Scalar, T>,
                  "bitnet::backward: the output gradient's scalar type must be the layer's T");
    if (tape.weight_.size() == 0)
      throw state_error("bitnet::backward: the tape is empty (default-constructed or moved from); use the tape train_forward returned");
    if (dy_in.rows() != tape.batch() || dy_in.cols() != tape.out_features())
      throw shape_error("bitnet::backward: output gradient is " + shape_string(dy_in.rows(), dy_in.cols()) +
                        ", the forward's output was " + shape_string(tape.batch(), tape.out_features()));
    const Matrix<T> dy = dy_in;
    require_finite(dy, "bitnet::backward: output gradient");

    bit_linear_gradients<T> grads;
    // noalias: the products go straight into the results (no temporary of the size of W).
    grads.weight.noalias() = dy.transpose() * tape.input_;
    // The bias gradient sums dy's rows; Eigen's colwise() of a 0-row matrix makes a block of a null
    // pointer (undefined behaviour, caught by Clang's UBSan), so an empty batch is zeros by hand.
    if (tape.has_bias_)
      grads.bias = dy.rows() == 0 ? Vector<T>(Vector<T>::Zero(dy.cols())) : Vector<T>(dy.colwise().sum().transpose());
    grads.input.noalias() = dy * tape.weight_;
    if (tape.rotation_ && grads.input.rows() > 0) grads.input = tape.rotation_->inverse(grads.input);  // R^T
    if (tape.rms_norm_) {
      // n = x * r, r = (mean(x^2) + eps)^-1/2:  dx = r * (dn - n * mean(dn . n)).
      const Index features = tape.in_features();
      for (Index r = 0; r < grads.input.rows(); ++r) {
        double dot = 0;
        for (Index c = 0; c < features; ++c) dot += double(grads.input(r, c)) * double(tape.normed_(r, c));
        const T mean_dot = static_cast<T>(dot / double(features));
        const T inv_rms = tape.inv_rms_(r);
        for (Index c = 0; c < features; ++c)
          grads.input(r, c) = inv_rms * (grads.input(r, c) - tape.normed_(r, c) * mean_dot);
      }
    }
    return grads;
  }

 private:
  // x~ . W~^T + b, the expression Linear::forward evaluates.
  template <real_scalar T>
  static Matrix<T> float_output(const BitLinear<T>& layer, const bit_linear_tape<T>& tape) {
    Matrix<T> y(tape.input_.rows(), tape.weight_.rows());
    y.noalias() = tape.input_ * tape.weight_.transpose();
    if (layer.bias()) y.rowwise() += layer.bias()->transpose();
    return y;
  }
};

/// The walk of for_each_bit_linear: every BitLinear with its path; plain linear layers (kept in
/// float, e.g. excluded from replace_linear) and leaves are skipped.
template <class F>
class bit_linear_visitor {
 public:
  static constexpr bool finds_bit_linear_nodes = true;
  static constexpr bool skips_opaque_pointees = true;

  template <class Node>
  static void unwalkable() {
    static_assert(always_false<Node>,
                  "bitnet::for_each_bit_linear cannot walk a type in this graph: give it bitnet_children(node, "
                  "visit) (or BITNET_LAYERS(Type, fields...)) if it has children, bitnet_linear(layer) if it is a "
                  "linear layer, or specialize bitnet::layer_traits; see docs/customization.md");
  }

  explicit bit_linear_visitor(F& fn) : fn_(fn) {}

  template <class L, class Slot>
  void linear(const std::string&, L&, const Slot&) {}
  template <class B, class Slot>
  void bit_linear(const std::string& path, B& layer, const Slot&) {
    fn_(std::string_view(path), layer);
  }

 private:
  F& fn_;
};

}  // namespace detail

/// The training forward of `layer` at warm-up strength `lambda` in [0, 1]: the output and the tape
/// backward needs. The input is normalized and quantized once for the tape; with lambda = 1 the
/// output is layer.forward(x), bit for bit. Throws value_error for lambda outside [0, 1] or a
/// non-finite input, shape_error for a wrong feature count, and state_error for a layer without
/// latent weights (after release_latent_weights(), or built by from_ternary()): it cannot be trained.
template <real_scalar T, class Derived>
training_forward_result<T> train_forward(const BitLinear<T>& layer, const Eigen::MatrixBase<Derived>& x,
                                         std::type_identity_t<T> lambda = T(1)) {
  return detail::tape_access::forward(layer, x, lambda);
}

/// The straight-through backward: from dL/dy (batch x out) the gradients for the input, the latent
/// weight and the bias, computed from the tape alone. Throws shape_error for a gradient of the wrong
/// shape, value_error for a non-finite one, state_error for a moved-from tape.
template <real_scalar T, class Derived>
bit_linear_gradients<T> backward(const bit_linear_tape<T>& tape, const Eigen::MatrixBase<Derived>& grad_output) {
  return detail::tape_access::backward(tape, grad_output);
}

/// Calls fn(path, layer) for every BitLinear of the graph, in the order replace_linear walks it
/// (paths like "blocks.3.mlp.down"), e.g. for an optimizer step over all layers. Linear layers that
/// stayed float are skipped.
template <class Graph, class F>
void for_each_bit_linear(Graph& graph, F&& fn) {
  static_assert(layer_graph<Graph>,
                "bitnet::for_each_bit_linear: the graph type is not a layer graph: give it bitnet_children(node, "
                "visit) (or BITNET_LAYERS(Type, fields...)), make it a std::vector / std::array / std::deque / "
                "string-keyed map of layers, or specialize bitnet::layer_traits; see docs/customization.md");
  detail::bit_linear_visitor<std::remove_reference_t<F>> visitor(fn);
  detail::graph_walker<detail::bit_linear_visitor<std::remove_reference_t<F>>>(visitor).walk(graph);
}

}  // namespace bitnet
