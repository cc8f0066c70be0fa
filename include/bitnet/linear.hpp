// bitnet/linear.hpp - a plain dense layer, torch.nn.Linear-like: y = x W^T + b.
//
// It is the float layer users start from (and a ready-made node for replace_linear). Members are
// public like a torch module's parameters; forward() re-checks them on every call.
#pragma once

#include <optional>
#include <string>
#include <type_traits>
#include <utility>

#include "detail/validate.hpp"
#include "errors.hpp"
#include "matrix.hpp"

namespace bitnet {

template <real_scalar T>
struct Linear {
  /// A zero-initialized layer (torch draws random weights; load or assign real ones).
  Linear(Index in_features, Index out_features, bool bias = true)
      : weight(Matrix<T>::Zero(checked_dim(out_features, "out_features"),
                               checked_dim(in_features, "in_features"))) {
    if (bias) this->bias = Vector<T>::Zero(out_features);
  }

  /// A layer holding the given weight (out x in) and optional bias (out).
  explicit Linear(Matrix<T> weight_, std::optional<Vector<T>> bias_ = std::nullopt)
      : weight(std::move(weight_)), bias(std::move(bias_)) {
    validate_shapes();
  }

  Matrix<T> weight;              // out x in
  std::optional<Vector<T>> bias; // out, or none

  Index in_features() const noexcept { return weight.cols(); }
  Index out_features() const noexcept { return weight.rows(); }

  /// x: batch x in  ->  batch x out.
  template <class Derived>
  Matrix<T> forward(const Eigen::MatrixBase<Derived>& x) const {
    static_assert(std::is_same_v<typename Derived::Scalar, T>,
                  "Linear<T>::forward: the input's scalar type must be T");
    validate_shapes();
    if (x.cols() != in_features())
      throw shape_error("Linear::forward: input has " + std::to_string(x.cols()) +
                        " features, the layer expects " + std::to_string(in_features()));
    Matrix<T> y = x * weight.transpose();
    if (bias) y.rowwise() += bias->transpose();
    return y;
  }

 private:
  static Index checked_dim(Index n, const char* name) {
    if (n <= 0) throw shape_error(std::string("Linear: ") + name + " must be > 0, got " + std::to_string(n));
    return n;
  }

  void validate_shapes() const {
    detail::require_non_empty(weight, "Linear: weight");
    if (bias && bias->size() != weight.rows())
      throw shape_error("Linear: bias has " + std::to_string(bias->size()) +
                        " elements, the weight has " + std::to_string(weight.rows()) + " rows");
  }
};

}  // namespace bitnet
