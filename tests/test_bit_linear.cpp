#include <bitnet/bit_linear.hpp>

#include <cmath>
#include <cstdint>
#include <limits>
#include <random>
#include <type_traits>

#include <doctest/doctest.h>

#include "reference.hpp"

using bitnet::BitLinear;
using bitnet::Index;
using bitnet::Matrix;
using bitnet::Vector;

static_assert(std::is_nothrow_move_constructible_v<BitLinear<double>>);
static_assert(std::is_copy_assignable_v<BitLinear<double>>);

TEST_CASE_TEMPLATE("BitLinear: hand-computed forward with a tie", T, float, double) {
  // mean|W| = 8 / 8 = 1 -> sw = 1, Wq = W clamped: [[1,-1,0,1],[-1,1,1,0]]
  Matrix<T> w(2, 4);
  w << 1, -1, 0, 2,
       -2, 1, 1, 0;
  Vector<T> b(2);
  b << T(0.5), T(-1);
  const BitLinear<T> layer(w, b);
  CHECK(layer.weight_scale() == T(1));
  // max|x| = 127 -> sx = 1; 62.5 is a tie that rounds to the even 62 (std::round gives 63).
  Matrix<T> x(1, 4);
  x << 127, -127, T(62.5), 0;
  const Matrix<T> y = layer.forward(x);
  // acc0 = 127 + 127 + 0 + 0 = 254; acc1 = -127 - 127 + 62 + 0 = -192
  CHECK(y(0, 0) == T(254.5));
  CHECK(y(0, 1) == T(-193));
}

TEST_CASE_TEMPLATE("BitLinear: keeps the latent weights and bias bit for bit", T, float, double) {
  std::mt19937 rng(3);
  const Matrix<T> w = reference::random_matrix<T>(7, 13, rng, 0.1);
  const Vector<T> b = reference::random_matrix<T>(7, 1, rng);
  const BitLinear<T> layer(w, b);
  CHECK(layer.weight() == w);
  REQUIRE(layer.bias().has_value());
  CHECK(*layer.bias() == b);
  CHECK(layer.in_features() == 13);
  CHECK(layer.out_features() == 7);
  CHECK(layer.ternary_weight() == bitnet::quantize_weights(w).values);
  CHECK(layer.weight_scale() == reference::weight_scale(w));
  const BitLinear<T> copy = layer;  // deep copy
  CHECK(copy.weight() == w);
  CHECK(copy.weight().data() != layer.weight().data());
}

// The integer path must equal the exact value of (xq . wq) / (sx * sw) + b, rounded once, with the
// accumulators computed independently in int64 from the naive reference quantizers; and it must agree
// with the fake-quant reference BitLinear within the rounding of the reference's dequantized operands.
template <class T>
void check_against_references(const BitLinear<T>& layer, const Matrix<T>& x, const Matrix<T>& w,
                              const Vector<T>* bias, const Matrix<T>& normed_x) {
  const Matrix<T> y = layer.forward(x);
  REQUIRE(y.rows() == x.rows());
  REQUIRE(y.cols() == w.rows());
  const T sw = reference::weight_scale(w);
  const Matrix<long double> fake = reference::bitlinear_fake_quant(normed_x, w, bias);
  const T eps = std::numeric_limits<T>::epsilon();
  for (Index b = 0; b < x.rows(); ++b) {
    const T sx = reference::activation_scale(normed_x, b);
    for (Index o = 0; o < w.rows(); ++o) {
      std::int64_t acc = 0;
      long double magnitude = 0;
      for (Index k = 0; k < x.cols(); ++k) {
        const auto xq = (std::int64_t)reference::clamp(reference::round_half_even(normed_x(b, k) * sx), T(-128), T(127));
        const auto wq = (std::int64_t)reference::clamp(reference::round_half_even(w(o, k) * sw), T(-1), T(1));
        acc += xq * wq;
        magnitude += std::fabs((long double)xq * wq);
      }
      const long double scale = (long double)sx * (long double)sw;
      const long double exact = (long double)acc / scale + (bias ? (long double)(*bias)(o) : 0.0L);
      const long double term_bound = magnitude / scale;
      CAPTURE(b);
      CAPTURE(o);
      // one rounding of the product plus one of the bias addition
      CHECK(std::fabs((long double)y(b, o) - exact) <= eps * (std::fabs(exact) + term_bound + 1e-30L));
      // the reference rounds each dequantized operand once (relative eps/2 each)
      CHECK(std::fabs((long double)y(b, o) - fake(b, o)) <= 2 * eps * (term_bound + std::fabs(fake(b, o))) + 1e-30L);
    }
  }
}

TEST_CASE_TEMPLATE("BitLinear: integer forward agrees with the references on seeded ragged shapes", T, float, double) {
  std::mt19937 rng(42);
  for (Index in : {1, 3, 17, 64, 100, 257}) {
    for (Index out : {1, 2, 5, 33}) {
      for (Index batch : {1, 3, 8}) {
        CAPTURE(in);
        CAPTURE(out);
        CAPTURE(batch);
        const Matrix<T> w = reference::random_matrix<T>(out, in, rng, 0.02);
        const Vector<T> b = reference::random_matrix<T>(out, 1, rng, 0.5);
        const Matrix<T> x = reference::random_matrix<T>(batch, in, rng, 2.0);
        check_against_references(BitLinear<T>(w, b), x, w, &b, x);
        check_against_references(BitLinear<T>(w), x, w, static_cast<const Vector<T>*>(nullptr), x);
        bitnet::bitlinear_options rms;
        rms.rms_norm = true;
        check_against_references(BitLinear<T>(w, b, rms), x, w, &b, reference::rms_norm(x, T(1e-6f)));
      }
    }
  }
}

TEST_CASE_TEMPLATE("BitLinear: forward takes Eigen expressions and empty batches", T, float, double) {
  std::mt19937 rng(5);
  const Matrix<T> w = reference::random_matrix<T>(4, 6, rng);
  const Matrix<T> x = reference::random_matrix<T>(5, 6, rng);
  const BitLinear<T> layer(w);
  CHECK(layer.forward(x.topRows(2)) == layer.forward(Matrix<T>(x.topRows(2))));
  CHECK(layer.forward(x * T(3)) == layer.forward(Matrix<T>(x * T(3))));
  const Matrix<T> none = layer.forward(Matrix<T>(0, 6));
  CHECK(none.rows() == 0);
  CHECK(none.cols() == 4);
  // A zero input row gives exactly the bias (here: none), not NaN.
  CHECK(layer.forward(Matrix<T>::Zero(1, 6)).isZero(0));
}

TEST_CASE_TEMPLATE("BitLinear: bad input is rejected with a clear error and nothing changes", T, float, double) {
  const T nan = std::numeric_limits<T>::quiet_NaN();
  CHECK_THROWS_WITH_AS(BitLinear<T>(Matrix<T>(0, 4)), doctest::Contains("BitLinear: weight: empty"), bitnet::shape_error);
  Matrix<T> bad = Matrix<T>::Ones(3, 3);
  bad(2, 1) = nan;
  CHECK_THROWS_WITH_AS(BitLinear<T>{bad}, doctest::Contains("BitLinear: weight: non-finite value (nan) at row 2, column 1"),
                       bitnet::value_error);
  CHECK_THROWS_WITH_AS(BitLinear<T>(Matrix<T>::Ones(3, 3), Vector<T>::Ones(2)),
                       doctest::Contains("bias has 2 elements, the weight has 3 rows"), bitnet::shape_error);
  Vector<T> bad_bias = Vector<T>::Ones(3);
  bad_bias(1) = std::numeric_limits<T>::infinity();
  CHECK_THROWS_WITH_AS(BitLinear<T>(Matrix<T>::Ones(3, 3), bad_bias), doctest::Contains("bias: non-finite value (+inf) at index 1"),
                       bitnet::value_error);
  bitnet::bitlinear_options options;
  options.rms_eps = 0;
  CHECK_THROWS_AS(BitLinear<T>(Matrix<T>::Ones(3, 3), std::nullopt, options), bitnet::value_error);

  BitLinear<T> layer(Matrix<T>::Ones(3, 4), Vector<T>::Zero(3));
  CHECK_THROWS_WITH_AS(layer.forward(Matrix<T>::Ones(2, 5)), doctest::Contains("input has 5 features, the layer expects 4"),
                       bitnet::shape_error);
  Matrix<T> x = Matrix<T>::Ones(2, 4);
  x(1, 3) = nan;
  CHECK_THROWS_AS(layer.forward(x), bitnet::value_error);

  // set_weight / set_bias: on failure the layer is exactly as before (strong guarantee).
  const Matrix<T> before = layer.weight();
  const auto codes_before = layer.ternary_weight();
  Matrix<T> wrong = Matrix<T>::Constant(3, 4, T(2));
  wrong(0, 0) = nan;
  CHECK_THROWS_AS(layer.set_weight(wrong), bitnet::value_error);
  CHECK_THROWS_AS(layer.set_weight(Matrix<T>::Ones(4, 4)), bitnet::shape_error);
  CHECK_THROWS_AS(layer.set_bias(Vector<T>::Ones(4)), bitnet::shape_error);
  CHECK(layer.weight() == before);
  CHECK(layer.ternary_weight() == codes_before);
  REQUIRE(layer.bias().has_value());
  CHECK(layer.bias()->isZero(0));

  // and on success both the latent weights and the ternary codes follow
  Matrix<T> next = Matrix<T>::Ones(3, 4);
  next(1, 2) = T(-1);
  layer.set_weight(next);
  CHECK(layer.weight() == next);
  CHECK(layer.ternary_weight()(1, 2) == -1);
  layer.set_bias(std::nullopt);
  CHECK_FALSE(layer.bias().has_value());
}
