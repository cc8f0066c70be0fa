#include <bitnet/linear.hpp>

#include <limits>

#include <doctest/doctest.h>

using bitnet::Matrix;
using bitnet::Vector;

TEST_CASE_TEMPLATE("Linear: y = x W^T + b, hand-computed", T, float, double) {
  Matrix<T> w(2, 3);
  w << 1, 2, 3,
       -1, 0, 4;
  Vector<T> b(2);
  b << T(0.5), T(-2);
  const bitnet::Linear<T> layer(w, b);
  CHECK(layer.in_features() == 3);
  CHECK(layer.out_features() == 2);
  Matrix<T> x(2, 3);
  x << 1, 1, 1,
       2, -1, 0;
  const Matrix<T> y = layer.forward(x);
  REQUIRE(y.rows() == 2);
  REQUIRE(y.cols() == 2);
  CHECK(y(0, 0) == T(6.5));   // 1 + 2 + 3 + 0.5
  CHECK(y(0, 1) == T(1));     // -1 + 0 + 4 - 2
  CHECK(y(1, 0) == T(0.5));   // 2 - 2 + 0 + 0.5
  CHECK(y(1, 1) == T(-4));    // -2 + 0 + 0 - 2
}

TEST_CASE_TEMPLATE("Linear: shape constructor is zero-initialized, optional bias", T, float, double) {
  const bitnet::Linear<T> with_bias(4, 3);
  CHECK(with_bias.weight.rows() == 3);
  CHECK(with_bias.weight.cols() == 4);
  REQUIRE(with_bias.bias.has_value());
  CHECK(with_bias.bias->size() == 3);
  CHECK(with_bias.weight.isZero(0));
  const bitnet::Linear<T> no_bias(4, 3, false);
  CHECK_FALSE(no_bias.bias.has_value());
  CHECK(no_bias.forward(Matrix<T>::Ones(5, 4)).isZero(0));
}

TEST_CASE_TEMPLATE("Linear: bad shapes are rejected with a clear message", T, float, double) {
  CHECK_THROWS_WITH_AS(bitnet::Linear<T>(0, 3), doctest::Contains("in_features must be > 0"), bitnet::shape_error);
  CHECK_THROWS_WITH_AS(bitnet::Linear<T>(3, -1), doctest::Contains("out_features must be > 0"), bitnet::shape_error);
  CHECK_THROWS_AS(bitnet::Linear<T>(Matrix<T>(0, 3)), bitnet::shape_error);
  CHECK_THROWS_WITH_AS(bitnet::Linear<T>(Matrix<T>::Ones(2, 3), Vector<T>::Ones(3)),
                       doctest::Contains("bias has 3 elements, the weight has 2 rows"), bitnet::shape_error);
  bitnet::Linear<T> layer(3, 2);
  CHECK_THROWS_WITH_AS(layer.forward(Matrix<T>::Ones(1, 4)),
                       doctest::Contains("input has 4 features, the layer expects 3"), bitnet::shape_error);
  layer.bias = Vector<T>::Ones(5);  // public members can be broken; forward re-checks
  CHECK_THROWS_AS(layer.forward(Matrix<T>::Ones(1, 3)), bitnet::shape_error);
}
