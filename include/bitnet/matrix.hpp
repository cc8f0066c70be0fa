// bitnet/matrix.hpp - the matrix vocabulary shared by every header.
#pragma once

#include <concepts>

#include <Eigen/Core>

namespace bitnet {

/// Row-major dynamic matrix: a weight is out_features x in_features, an activation batch x features.
template <class T>
using Matrix = Eigen::Matrix<T, Eigen::Dynamic, Eigen::Dynamic, Eigen::RowMajor>;

/// Dynamic column vector (bias, per-row scales).
template <class T>
using Vector = Eigen::Matrix<T, Eigen::Dynamic, 1>;

using Index = Eigen::Index;

/// The floating-point types a layer can hold: float and double.
template <class T>
concept real_scalar = std::same_as<T, float> || std::same_as<T, double>;

}  // namespace bitnet
