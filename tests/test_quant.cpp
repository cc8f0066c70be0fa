#include <bitnet/quant.hpp>

#include <cmath>
#include <limits>
#include <random>

#include <doctest/doctest.h>

#include "reference.hpp"

using bitnet::Matrix;

TEST_CASE_TEMPLATE("weight_quant: hand-computed values, ties round half to even", S, float, double) {
  // mean|w| = 1, so s = 1 and w * s = w: 0.5 and -0.5 are ties that torch.round sends to 0
  // (std::round would give +-1); -1.5 rounds to -2 and is clamped to -1; 2 is clamped to 1.
  Matrix<S> w1(2, 2);
  w1 << S(0.5), S(-1.5), S(0), S(2);  // mean|w| = 1
  const auto q = bitnet::quantize_weights(w1);
  CHECK(q.scale == S(1));
  CHECK(q.values(0, 0) == 0);
  CHECK(q.values(0, 1) == -1);
  CHECK(q.values(1, 0) == 0);
  CHECK(q.values(1, 1) == 1);

  Matrix<S> w3(1, 4);
  w3 << S(2.5), S(-0.5), S(1.0), S(4.0);  // sum |w| = 8, mean 2, s = 0.5
  const Matrix<S> u = bitnet::weight_quant(w3);
  // w * s = 1.25 -> 1, -0.25 -> 0, 0.5 -> 0 (tie to even), 2 -> clamp 1; dequantized = q / 0.5
  CHECK(u(0, 0) == S(2));
  CHECK(u(0, 1) == S(0));
  CHECK(u(0, 2) == S(0));
  CHECK(u(0, 3) == S(2));
  CHECK(bitnet::weight_scale(w3) == S(0.5));
}

TEST_CASE_TEMPLATE("weight_quant: mean below the 1e-5 clamp and all-zero weights", S, float, double) {
  Matrix<S> tiny(1, 2);
  tiny << S(1e-7), S(8e-6);  // mean 4.05e-6 < 1e-5 -> s = 1 / 1e-5
  const auto q = bitnet::quantize_weights(tiny);
  CHECK(q.scale == S(1) / S(1e-5));
  CHECK(q.values(0, 0) == 0);  // 0.01 -> 0
  CHECK(q.values(0, 1) == 1);  // 0.8 -> 1

  const Matrix<S> zeros = Matrix<S>::Zero(3, 5);
  const auto z = bitnet::quantize_weights(zeros);
  CHECK(z.scale == S(1) / S(1e-5));
  CHECK((z.values.array() == 0).all());
  CHECK((bitnet::weight_quant(zeros).array() == S(0)).all());
}

TEST_CASE_TEMPLATE("activation_quant: hand-computed values, ties round half to even", S, float, double) {
  // Row 0: max|x| = 127 -> s = 1, so x * s = x: the .5 values are exact ties.
  // Row 1: max|x| = 63.5 -> s = 2: 0.25 * 2 = 0.5 -> 0, 0.75 * 2 = 1.5 -> 2, -1.25 * 2 = -2.5 -> -2.
  Matrix<S> x(2, 8);
  x << S(127), S(0.5), S(1.5), S(2.5), S(-0.5), S(-1.5), S(-2.5), S(126.5),
       S(63.5), S(0.25), S(0.75), S(-1.25), S(0), S(-63.5), S(10), S(-0.3);
  const auto q = bitnet::quantize_activations(x);
  CHECK(q.scales(0) == S(1));
  CHECK(q.scales(1) == S(2));
  const int row0[] = {127, 0, 2, 2, 0, -2, -2, 126};
  const int row1[] = {127, 0, 2, -2, 0, -127, 20, -1};
  for (int c = 0; c < 8; ++c) {
    CAPTURE(c);
    CHECK(q.values(0, c) == row0[c]);
    CHECK(q.values(1, c) == row1[c]);
  }
  const Matrix<S> y = bitnet::activation_quant(x);
  CHECK(y(1, 2) == S(1));     // 2 / 2
  CHECK(y(1, 3) == S(-1));    // -2 / 2
  CHECK(y(1, 7) == S(-0.5));  // -1 / 2
}

TEST_CASE_TEMPLATE("activation scale is PyTorch's 127.0 / m, i.e. m.reciprocal() * 127", S, float, double) {
  // Tensor.__rtruediv__ computes 1/m, rounds, multiplies by 127, rounds again. For m = 3 that is
  // 42.333336f (float) and 42.33333333333333 (double), while a direct 127 / 3 gives 42.333332f and
  // 42.333333333333336: one ulp apart, enough to change every dequantized value of the row.
  Matrix<S> x(1, 3);
  x << S(3), S(1), S(-2);
  const auto q = bitnet::quantize_activations(x);
  if constexpr (std::is_same_v<S, float>) {
    CHECK(q.scales(0) == 42.333335876464844f);
    CHECK(bitnet::activation_quant(x)(0, 1) == 0.992125928401947f);  // 42 / 42.333336f, not 0.99212599f
  } else {
    CHECK(q.scales(0) == 42.33333333333333);
  }
  CHECK(q.values(0, 0) == 127);
  CHECK(q.values(0, 1) == 42);
  CHECK(q.values(0, 2) == -85);
}

TEST_CASE_TEMPLATE("activation_quant: all-zero row and a row below the 1e-5 clamp", S, float, double) {
  Matrix<S> x(2, 3);
  x << S(0), S(0), S(0),
       S(1e-6), S(-4e-6), S(2e-6);  // max 4e-6 < 1e-5 -> s = 127 / 1e-5 = 1.27e7
  const auto q = bitnet::quantize_activations(x);
  // PyTorch's 127.0 / t is t.reciprocal() * 127: two roundings
  const S clamped_scale = (S(1) / S(1e-5)) * S(127);
  CHECK(q.scales(0) == clamped_scale);
  CHECK(q.scales(1) == clamped_scale);
  CHECK((q.values.row(0).array() == 0).all());
  CHECK(q.values(1, 0) == 13);   // 12.7
  CHECK(q.values(1, 1) == -51);  // -50.8
  CHECK(q.values(1, 2) == 25);   // 25.4
  const Matrix<S> y = bitnet::activation_quant(x);
  CHECK((y.row(0).array() == S(0)).all());
  CHECK(y.allFinite());
}

TEST_CASE_TEMPLATE("quantization agrees with the naive reference on seeded ragged inputs", S, float, double) {
  std::mt19937 rng(20261128);
  for (bitnet::Index rows : {1, 2, 7, 31}) {
    for (bitnet::Index cols : {1, 3, 16, 65, 255}) {
      CAPTURE(rows);
      CAPTURE(cols);
      const Matrix<S> w = reference::random_matrix<S>(rows, cols, rng, 0.05);
      const Matrix<S> x = reference::random_matrix<S>(rows, cols, rng, 4.0);
      // The mean is a long sum: the reference accumulates in long double, we in compensated double;
      // both are within an ulp of the exact mean, so the scales agree exactly for float and to an
      // ulp for double, and the ternary codes agree exactly.
      const S s = bitnet::weight_scale(w), s_ref = reference::weight_scale(w);
      if constexpr (std::is_same_v<S, float>)
        CHECK(s == s_ref);
      else
        CHECK(std::abs(s - s_ref) <= std::numeric_limits<S>::epsilon() * s_ref);
      CHECK(bitnet::quantize_weights(w).values == reference::weight_codes(w, s));
      if (s == s_ref) CHECK(bitnet::weight_quant(w) == reference::weight_quant(w));
      CHECK(bitnet::activation_quant(x) == reference::activation_quant(x));
      // The integer forms dequantize to the fake-quant values exactly.
      const auto qw = bitnet::quantize_weights(w);
      CHECK(Matrix<S>((qw.values.template cast<S>().array() / qw.scale).matrix()) == bitnet::weight_quant(w));
      CHECK(((qw.values.array() >= -1) && (qw.values.array() <= 1)).all());
      const auto qx = bitnet::quantize_activations(x);
      for (bitnet::Index r = 0; r < rows; ++r)
        CHECK(Matrix<S>(qx.values.row(r).template cast<S>() / qx.scales(r)) == bitnet::activation_quant(x).row(r));
    }
  }
}

TEST_CASE_TEMPLATE("fake-quant functions accept Eigen expressions", S, float, double) {
  std::mt19937 rng(7);
  const Matrix<S> a = reference::random_matrix<S>(5, 9, rng);
  const Matrix<S> doubled = a * S(2);
  CHECK(bitnet::weight_quant(a * S(2)) == bitnet::weight_quant(doubled));
  CHECK(bitnet::activation_quant(a.block(1, 2, 3, 4)) == bitnet::activation_quant(Matrix<S>(a.block(1, 2, 3, 4))));
  // A column-major input gives the same result as its row-major copy.
  const Eigen::Matrix<S, Eigen::Dynamic, Eigen::Dynamic> col_major = a;
  CHECK(bitnet::activation_quant(col_major) == bitnet::activation_quant(a));
}

TEST_CASE_TEMPLATE("rms_norm matches the naive reference", S, float, double) {
  std::mt19937 rng(11);
  const Matrix<S> x = reference::random_matrix<S>(6, 37, rng, 3.0);
  const Matrix<S> got = bitnet::rms_norm(x, S(1e-6));
  const Matrix<S> want = reference::rms_norm(x, S(1e-6));
  CHECK((got - want).cwiseAbs().maxCoeff() <= 4 * std::numeric_limits<S>::epsilon());
  // each row of the result has a mean square of ~1
  for (bitnet::Index r = 0; r < x.rows(); ++r) CHECK(got.row(r).squaredNorm() / S(37) == doctest::Approx(1.0).epsilon(1e-5));
  const Matrix<S> zeros = Matrix<S>::Zero(2, 3);
  CHECK((bitnet::rms_norm(zeros).array() == S(0)).all());
}

TEST_CASE_TEMPLATE("quantization rejects empty and non-finite input, naming where", S, float, double) {
  const Matrix<S> empty(0, 4);
  CHECK_THROWS_AS(bitnet::weight_quant(empty), bitnet::shape_error);
  CHECK_THROWS_AS(bitnet::activation_quant(empty), bitnet::shape_error);
  CHECK_THROWS_AS(bitnet::rms_norm(empty), bitnet::shape_error);

  Matrix<S> w = Matrix<S>::Ones(3, 4);
  w(1, 2) = std::numeric_limits<S>::quiet_NaN();
  CHECK_THROWS_WITH_AS(bitnet::quantize_weights(w), doctest::Contains("non-finite value (nan) at row 1, column 2"),
                       bitnet::value_error);
  w(1, 2) = -std::numeric_limits<S>::infinity();
  CHECK_THROWS_WITH_AS(bitnet::activation_quant(w), doctest::Contains("-inf) at row 1, column 2"),
                       bitnet::value_error);
  CHECK_THROWS_AS(bitnet::rms_norm(w), bitnet::value_error);
  CHECK_THROWS_AS(bitnet::rms_norm(Matrix<S>::Ones(2, 2), S(0)), bitnet::value_error);
  CHECK_THROWS_AS(bitnet::rms_norm(Matrix<S>::Ones(2, 2), std::numeric_limits<S>::quiet_NaN()), bitnet::value_error);

  if constexpr (std::is_same_v<S, double>) {
    const Matrix<S> huge = Matrix<S>::Constant(2, 2, std::numeric_limits<S>::max());
    CHECK_THROWS_WITH_AS(bitnet::weight_quant(huge), doctest::Contains("overflows"), bitnet::value_error);
  }
}
