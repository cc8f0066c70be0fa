// Scale granularity (per_row, per_group), per-block activations and the exact import of ternary
// weights (issue 20, items 1 and 2): hand-computed cases and a naive reference of the numerics.
#include <bitnet/bit_linear.hpp>
#include <bitnet/replace.hpp>

#include <cmath>
#include <cstdint>
#include <limits>
#include <optional>
#include <random>
#include <string>

#include <doctest/doctest.h>

#include "graph_fixtures.hpp"
#include "reference.hpp"

using bitnet::activation_scaling;
using bitnet::BitLinear;
using bitnet::bitlinear_options;
using bitnet::Index;
using bitnet::Matrix;
using bitnet::Vector;
using bitnet::weight_scaling;

namespace {

bitlinear_options grouped(Index group_size, activation_scaling activations = activation_scaling::per_token) {
  bitlinear_options o;
  o.weight_scales = weight_scaling::per_group;
  o.group_size = group_size;
  o.activation_scales = activations;
  return o;
}

bitlinear_options per_row() {
  bitlinear_options o;
  o.weight_scales = weight_scaling::per_row;
  return o;
}

// Weights as Ternary Bonsai's unpacked folders hold them: each group of `group` inputs of a row is
// {-d, 0, +d} for one d (a multiple of 2^-14, so exact in FP16 and in T), about a third zeros.
template <class T>
Matrix<T> ternary_per_group(Index out, Index in, Index group, std::mt19937& rng) {
  std::uniform_int_distribution<int> code(-1, 1), step(1, 4000);
  Matrix<T> w(out, in);
  for (Index r = 0; r < out; ++r)
    for (Index first = 0; first < in; first += group) {
      const T d = T(std::ldexp(double(step(rng)), -14));
      for (Index c = first; c < std::min(in, first + group); ++c) w(r, c) = T(code(rng)) * d;
    }
  return w;
}

std::string message_of(auto&& f) {
  try {
    f();
  } catch (const std::exception& e) {
    return e.what();
  }
  return "no exception";
}

// ---- the numerics contract, written out naively ------------------------------------------------
// y[b,o] = T( sum_j double(acc_j) * double(d[o,j]) / double(sx) ) + bias[o], per_block: sx[b,j] inside.
// Quantizers from reference.hpp (hand-written round half to even), unit means in long double.
template <class T>
Matrix<T> naive_unit_forward(const Matrix<T>& x_in, const Matrix<T>& w, const std::optional<Vector<T>>& bias,
                             const bitlinear_options& o) {
  const Index in = w.cols(), unit = o.weight_scales == weight_scaling::per_row ? in : o.group_size;
  const Index groups = (in + unit - 1) / unit;
  const Matrix<T> x = o.rms_norm ? reference::rms_norm(x_in, T(o.rms_eps)) : x_in;
  // weights: d = max(T(mean |w|), 1e-5), code = clamp(round(w / d), -1, 1)
  Matrix<std::int8_t> codes(w.rows(), in);
  Matrix<T> d(w.rows(), groups);
  for (Index r = 0; r < w.rows(); ++r)
    for (Index j = 0; j < groups; ++j) {
      const Index first = j * unit, end = std::min(in, first + unit);
      long double sum = 0;
      for (Index c = first; c < end; ++c) sum += std::fabs((long double)w(r, c));
      d(r, j) = std::max(T(sum / (long double)(end - first)), T(1e-5));
      for (Index c = first; c < end; ++c)
        codes(r, c) = std::int8_t(reference::clamp(reference::round_half_even(w(r, c) / d(r, j)), T(-1), T(1)));
    }
  Matrix<T> y(x.rows(), w.rows());
  for (Index b = 0; b < x.rows(); ++b) {
    // activations: per token, or per block of `unit` columns
    const bool per_block = o.activation_scales == activation_scaling::per_block;
    std::vector<T> sx{};
    sx.resize(std::size_t(groups));
    std::vector<int> xq{};
    xq.resize(std::size_t(in));
    for (Index j = 0; j < groups; ++j) {
      const Index first = per_block ? j * unit : 0, end = per_block ? std::min(in, first + unit) : in;
      const Matrix<T> part = x.block(b, first, 1, end - first);
      sx[std::size_t(j)] = reference::activation_scale(part, 0);
    }
    for (Index c = 0; c < in; ++c)
      xq[std::size_t(c)] = int(reference::clamp(reference::round_half_even(x(b, c) * sx[std::size_t(c / unit)]),
                                                T(-128), T(127)));
    for (Index o2 = 0; o2 < w.rows(); ++o2) {
      double total = 0.0;
      for (Index j = 0; j < groups; ++j) {
        long long acc = 0;
        for (Index c = j * unit; c < std::min(in, (j + 1) * unit); ++c) acc += (long long)xq[std::size_t(c)] * codes(o2, c);
        total += per_block ? double(acc) * double(d(o2, j)) / double(sx[std::size_t(j)]) : double(acc) * double(d(o2, j));
      }
      if (!per_block) total /= double(sx[0]);
      y(b, o2) = T(total) + (bias ? (*bias)(o2) : T(0));
    }
  }
  return y;
}

}  // namespace

// ---- quantization per unit ----------------------------------------------------------------------

TEST_CASE_TEMPLATE("units: absmean per group, hand-computed, ragged last group over its real columns", T, float, double) {
  Matrix<T> w = Matrix<T>::Zero(2, 40);  // group 32: columns 0-31 and the ragged 32-39
  for (Index c = 0; c < 32; ++c) w(0, c) = c % 2 == 0 ? T(0.25) : T(-0.75);  // mean 0.5
  w(0, 32) = T(3);                                                          // mean 3 / 8, not 3 / 32
  // row 1 is all zero: d = 1e-5, codes 0
  const auto q = bitnet::quantize_weight_units(w, weight_scaling::per_group, 32);
  REQUIRE(q.scales.rows() == 2);
  REQUIRE(q.scales.cols() == 2);
  CHECK(q.unit_cols == 32);
  CHECK(q.scales(0, 0) == T(0.5));
  CHECK(q.scales(0, 1) == T(0.375));
  CHECK(q.scales(1, 0) == T(1e-5));
  CHECK(q.scales(1, 1) == T(1e-5));
  for (Index c = 0; c < 32; ++c) CHECK(q.values(0, c) == (c % 2 == 0 ? 0 : -1));  // 0.25 / 0.5 is a tie: 0
  CHECK(q.values(0, 32) == 1);
  for (Index c = 33; c < 40; ++c) CHECK(q.values(0, c) == 0);
  CHECK((q.values.row(1).array() == 0).all());
  const Matrix<T> fake = bitnet::weight_quant_units(w, weight_scaling::per_group, 32);
  CHECK(fake(0, 1) == T(-0.5));
  CHECK(fake(0, 32) == T(0.375));
  CHECK(fake(0, 0) == T(0));

  // per_row: one unit per row, mean over all 40 columns = (16 * 0.25 + 16 * 0.75 + 3) / 40 = 19 / 40
  const auto rows = bitnet::quantize_weight_units(w, weight_scaling::per_row);
  REQUIRE(rows.scales.cols() == 1);
  CHECK(rows.scales(0, 0) == T(19.0 / 40.0));
  CHECK(rows.values(0, 0) == 1);  // 0.25 / 0.475 = 0.526 -> 1
  CHECK(rows.values(0, 1) == -1);
}

TEST_CASE("units: invalid scalings and group sizes are refused by name") {
  const Matrix<float> w = Matrix<float>::Ones(2, 64);
  CHECK(message_of([&] { bitnet::quantize_weight_units(w, weight_scaling::per_tensor); }).find("per_tensor") !=
        std::string::npos);
  for (Index g : {0, 16, 48, 512, -64})
    CHECK_THROWS_AS(bitnet::quantize_weight_units(w, weight_scaling::per_group, g), bitnet::value_error);
  CHECK_THROWS_AS(bitnet::quantize_weight_units(w, weight_scaling::per_row, 64), bitnet::value_error);
  Matrix<float> bad = w;
  bad(1, 3) = std::numeric_limits<float>::quiet_NaN();
  CHECK(message_of([&] { bitnet::quantize_weight_units(bad, weight_scaling::per_row); }).find("row 1, column 3") !=
        std::string::npos);

  for (bitlinear_options o : {grouped(0), grouped(100), grouped(512)})
    CHECK_THROWS_AS(BitLinear<float>(w, std::nullopt, o), bitnet::value_error);
  bitlinear_options row_with_group = per_row();
  row_with_group.group_size = 64;
  CHECK_THROWS_AS(BitLinear<float>(w, std::nullopt, row_with_group), bitnet::value_error);
  bitlinear_options tensor_with_group;
  tensor_with_group.group_size = 64;
  CHECK_THROWS_AS(BitLinear<float>(w, std::nullopt, tensor_with_group), bitnet::value_error);
  bitlinear_options block_without_groups = per_row();
  block_without_groups.activation_scales = activation_scaling::per_block;
  CHECK(message_of([&] { BitLinear<float>(w, std::nullopt, block_without_groups); }).find("per_block") !=
        std::string::npos);
}

// ---- exact import -------------------------------------------------------------------------------

TEST_CASE_TEMPLATE("units: split_ternary_units recovers codes and scales with no rounding", T, float, double) {
  std::mt19937 rng(20);
  for (const Index in : {Index(96), Index(100), Index(300)}) {
    const Matrix<T> w = ternary_per_group<T>(5, in, 32, rng);
    const auto q = bitnet::split_ternary_units(w, weight_scaling::per_group, 32);
    CHECK(q.scales.cols() == (in + 31) / 32);
    const Matrix<T> back = bitnet::dequantize(q);
    CHECK(back == w);  // exact
    for (Index r = 0; r < w.rows(); ++r)
      for (Index c = 0; c < in; ++c) {
        CHECK(int(q.values(r, c)) == (w(r, c) > 0) - (w(r, c) < 0));
        if (w(r, c) != 0) CHECK(q.scales(r, c / 32) == std::abs(w(r, c)));
      }
    // A group of 128 from the same weights is not one unit (its four 32-groups have different d).
    CHECK_THROWS_AS(bitnet::split_ternary_units(w, weight_scaling::per_group, 128), bitnet::value_error);
  }
  // All-zero units and -0: codes 0, scale 1e-5, dequantized +0.
  Matrix<T> zeros = Matrix<T>::Zero(2, 64);
  zeros(1, 5) = T(-0.0);
  zeros(1, 40) = T(-2);
  const auto z = bitnet::split_ternary_units(zeros, weight_scaling::per_group, 32);
  CHECK(z.scales(0, 0) == T(1e-5));
  CHECK(z.scales(1, 0) == T(1e-5));
  CHECK(z.scales(1, 1) == T(2));
  CHECK(z.values(1, 5) == 0);
  CHECK(z.values(1, 40) == -1);
  CHECK(!std::signbit(bitnet::dequantize(z)(1, 5)));
}

TEST_CASE("units: an exact import refuses weights that are not ternary per unit, naming row, group and values") {
  std::mt19937 rng(21);
  Matrix<float> w = ternary_per_group<float>(3, 128, 32, rng);
  w(2, 70) = w(2, 70) == 0 ? 0.125f : w(2, 70) * 1.5f;
  const std::string m = message_of([&] { bitnet::split_ternary_units(w, weight_scaling::per_group, 32); });
  CHECK(m.find("row 2, group 2 (columns 64 to 95)") != std::string::npos);
  CHECK(m.find("column 70") != std::string::npos);
  CHECK(m.find(bitnet::detail::format_value(std::abs(w(2, 70)))) != std::string::npos);
  const std::string layer = message_of([&] {
    BitLinear<float>::from_exact_ternary(w, std::nullopt, grouped(32), "model.layers.0.mlp.up_proj");
  });
  CHECK(layer.rfind("model.layers.0.mlp.up_proj: ", 0) == 0);
  CHECK(layer.find("row 2, group 2") != std::string::npos);
  // per_tensor cannot hold d exactly
  CHECK_THROWS_AS(BitLinear<float>::from_exact_ternary(ternary_per_group<float>(2, 64, 64, rng)), bitnet::value_error);
}

TEST_CASE_TEMPLATE("units: from_exact_ternary holds the codes and scales and no latent weights", T, float, double) {
  std::mt19937 rng(22);
  const Matrix<T> w = ternary_per_group<T>(19, 200, 64, rng);  // ragged: 200 = 3 * 64 + 8
  const Vector<T> b = reference::random_matrix<T>(19, 1, rng);
  const auto layer = BitLinear<T>::from_exact_ternary(w, b, grouped(64));
  CHECK(!layer.has_latent_weights());
  CHECK(layer.groups() == 4);
  CHECK(layer.unit_scales().rows() == 19);
  CHECK(layer.unit_scales().cols() == 4);
  CHECK(layer.dequantized_weight() == w);
  CHECK(layer.ternary_weight() == bitnet::split_ternary_units(w, weight_scaling::per_group, 64).values);
  CHECK_THROWS_AS(layer.weight_scale(), bitnet::state_error);
  CHECK_THROWS_AS(layer.weight(), bitnet::state_error);
  CHECK(layer.memory_bytes() >= layer.packed_weight().capacity_bytes() + 19 * 4 * sizeof(T));

  const BitLinear<T> tensor(w);
  CHECK_THROWS_AS(tensor.unit_scales(), bitnet::state_error);
  CHECK(tensor.groups() == 1);
  CHECK(BitLinear<T>(w, std::nullopt, per_row()).groups() == 1);
}

TEST_CASE("units: from_ternary with unit scales validates shape, codes and scales by row and group") {
  Matrix<std::int8_t> codes = Matrix<std::int8_t>::Ones(3, 100);
  Matrix<float> scales = Matrix<float>::Constant(3, 4, 0.5f);  // group 32: ceil(100 / 32) = 4
  CHECK_NOTHROW(BitLinear<float>::from_ternary(codes, scales, std::nullopt, grouped(32)));
  CHECK_THROWS_AS(BitLinear<float>::from_ternary(codes, Matrix<float>(Matrix<float>::Ones(3, 3)), std::nullopt,
                                                 grouped(32)),
                  bitnet::shape_error);
  CHECK_THROWS_AS(BitLinear<float>::from_ternary(codes, scales, std::nullopt, per_row()), bitnet::shape_error);
  CHECK_THROWS_AS(BitLinear<float>::from_ternary(codes, scales), bitnet::value_error);  // per_tensor options
  CHECK_THROWS_AS(BitLinear<float>::from_ternary(codes, 1.0f, std::nullopt, grouped(32)), bitnet::value_error);
  Matrix<float> negative = scales;
  negative(2, 3) = -0.5f;
  CHECK(message_of([&] { BitLinear<float>::from_ternary(codes, negative, std::nullopt, grouped(32)); })
            .find("row 2, group 3 (columns 96 to 99)") != std::string::npos);
  Matrix<float> nan = scales;
  nan(1, 0) = std::numeric_limits<float>::quiet_NaN();
  CHECK_THROWS_AS(BitLinear<float>::from_ternary(codes, nan, std::nullopt, grouped(32)), bitnet::value_error);
  Matrix<float> zero = scales;
  zero(0, 1) = 0;  // a unit of zero weights, as a file may store it
  const auto with_zero = BitLinear<float>::from_ternary(codes, zero, std::nullopt, grouped(32));
  CHECK(with_zero.dequantized_weight()(0, 40) == 0.0f);
  codes(1, 7) = 2;
  CHECK(message_of([&] { BitLinear<float>::from_ternary(codes, scales, std::nullopt, grouped(32)); })
            .find("row 1, column 7") != std::string::npos);
  CHECK_THROWS_AS(BitLinear<float>::from_ternary(codes, scales, Vector<float>(Vector<float>::Zero(2)), grouped(32)),
                  bitnet::shape_error);
}
