// Naive, independent re-implementations of the BitNet b1.58 reference formulas, written with
// plain loops and std::vector so the library's code is checked against something it does not share.
#pragma once

#include <cmath>
#include <cstdint>
#include <random>
#include <vector>

#include <bitnet/matrix.hpp>

namespace reference {

using bitnet::Index;
using bitnet::Matrix;
using bitnet::Vector;

// torch.round: half to even, written out by hand (not via nearbyint).
template <class S>
S round_half_even(S v) {
  const S lower = std::floor(v);
  const S diff = v - lower;
  if (diff < S(0.5)) return lower;
  if (diff > S(0.5)) return lower + 1;
  return std::fmod(lower, S(2)) == 0 ? lower : lower + 1;
}

template <class S>
S clamp(S v, S lo, S hi) { return v < lo ? lo : (v > hi ? hi : v); }

// s = 1 / mean(|w|).clamp(min=1e-5), the mean accumulated in long double.
template <class S>
S weight_scale(const Matrix<S>& w) {
  long double sum = 0;
  for (Index r = 0; r < w.rows(); ++r)
    for (Index c = 0; c < w.cols(); ++c) sum += std::fabs((long double)w(r, c));
  S mean = S(sum / (long double)(w.rows() * w.cols()));
  if (mean < S(1e-5)) mean = S(1e-5);
  return S(1) / mean;
}

// Ternary codes of w for a given scale s: clamp(round(w * s), -1, 1).
template <class S>
Matrix<std::int8_t> weight_codes(const Matrix<S>& w, S s) {
  Matrix<std::int8_t> q(w.rows(), w.cols());
  for (Index r = 0; r < w.rows(); ++r)
    for (Index c = 0; c < w.cols(); ++c) q(r, c) = std::int8_t(clamp(round_half_even(w(r, c) * s), S(-1), S(1)));
  return q;
}

template <class S>
Matrix<S> weight_quant(const Matrix<S>& w) {
  const S s = weight_scale(w);
  Matrix<S> u(w.rows(), w.cols());
  for (Index r = 0; r < w.rows(); ++r)
    for (Index c = 0; c < w.cols(); ++c) u(r, c) = clamp(round_half_even(w(r, c) * s), S(-1), S(1)) / s;
  return u;
}

template <class S>
S activation_scale(const Matrix<S>& x, Index row) {
  S m = 0;
  for (Index c = 0; c < x.cols(); ++c)
    if (std::fabs(x(row, c)) > m) m = std::fabs(x(row, c));
  if (m < S(1e-5)) m = S(1e-5);
  // PyTorch evaluates `127.0 / tensor` as `tensor.reciprocal() * 127` (Tensor.__rtruediv__).
  const S reciprocal = S(1) / m;
  return reciprocal * S(127);
}

template <class S>
Matrix<S> activation_quant(const Matrix<S>& x) {
  Matrix<S> y(x.rows(), x.cols());
  for (Index r = 0; r < x.rows(); ++r) {
    const S s = activation_scale(x, r);
    for (Index c = 0; c < x.cols(); ++c) y(r, c) = clamp(round_half_even(x(r, c) * s), S(-128), S(127)) / s;
  }
  return y;
}

template <class S>
Matrix<S> rms_norm(const Matrix<S>& x, S eps) {
  Matrix<S> y(x.rows(), x.cols());
  for (Index r = 0; r < x.rows(); ++r) {
    long double ss = 0;
    for (Index c = 0; c < x.cols(); ++c) ss += (long double)x(r, c) * x(r, c);
    const S inv = S(1) / std::sqrt(S(ss / x.cols()) + eps);
    for (Index c = 0; c < x.cols(); ++c) y(r, c) = x(r, c) * inv;
  }
  return y;
}

// The fake-quant BitLinear of the paper: F.linear(activation_quant(norm(x)), weight_quant(W)) + b,
// evaluated in long double so its own rounding does not blur comparisons.
template <class S>
Matrix<long double> bitlinear_fake_quant(const Matrix<S>& x, const Matrix<S>& w, const Vector<S>* bias) {
  const Matrix<S> xq = activation_quant(x);
  const Matrix<S> wq = weight_quant(w);
  Matrix<long double> y(x.rows(), w.rows());
  for (Index b = 0; b < x.rows(); ++b)
    for (Index o = 0; o < w.rows(); ++o) {
      long double sum = 0;
      for (Index k = 0; k < x.cols(); ++k) sum += (long double)xq(b, k) * (long double)wq(o, k);
      y(b, o) = sum + (bias ? (long double)(*bias)(o) : 0.0L);
    }
  return y;
}

// Seeded random matrix with entries in [-scale, scale].
template <class S>
Matrix<S> random_matrix(Index rows, Index cols, std::mt19937& rng, double scale = 1.0) {
  std::uniform_real_distribution<double> dist(-scale, scale);
  Matrix<S> m(rows, cols);
  for (Index r = 0; r < rows; ++r)
    for (Index c = 0; c < cols; ++c) m(r, c) = S(dist(rng));
  return m;
}

}  // namespace reference
