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
#include <type_traits>

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
// Quantizers from reference.hpp (hand-written round half to even). The unit scales d are passed in
// (naive_unit_scales computes them; a double mean can differ from bitnet's compensated one in the
// last bit, so the double test takes the layer's after checking them to 1 ulp), and the input is
// already normalized.
template <class T>
Matrix<T> naive_unit_scales(const Matrix<T>& w, Index unit) {
  const Index in = w.cols(), groups = (in + unit - 1) / unit;
  Matrix<T> d(w.rows(), groups);  // max(T(mean |w| over the unit), 1e-5), the mean in long double
  for (Index r = 0; r < w.rows(); ++r)
    for (Index j = 0; j < groups; ++j) {
      const Index first = j * unit, end = std::min(in, first + unit);
      long double sum = 0;
      for (Index c = first; c < end; ++c) sum += std::fabs((long double)w(r, c));
      d(r, j) = std::max(T(sum / (long double)(end - first)), T(1e-5));
    }
  return d;
}

template <class T>
Matrix<T> naive_unit_forward(const Matrix<T>& x, const Matrix<T>& w, const Matrix<T>& d,
                             const std::optional<Vector<T>>& bias, const bitlinear_options& o) {
  const Index in = w.cols(), unit = o.weight_scales == weight_scaling::per_row ? in : o.group_size;
  const Index groups = (in + unit - 1) / unit;
  // code = clamp(round(w / d), -1, 1)
  Matrix<std::int8_t> codes(w.rows(), in);
  for (Index r = 0; r < w.rows(); ++r)
    for (Index c = 0; c < in; ++c)
      codes(r, c) = std::int8_t(reference::clamp(reference::round_half_even(w(r, c) / d(r, c / unit)), T(-1), T(1)));
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

// ---- forward ------------------------------------------------------------------------------------

TEST_CASE_TEMPLATE("units: hand-computed forward, per token and per block (with a tie)", T, float, double) {
  Matrix<T> w = Matrix<T>::Zero(2, 40);  // the weights of the first test: d = 0.5 and 0.375 in row 0
  for (Index c = 0; c < 32; ++c) w(0, c) = c % 2 == 0 ? T(0.25) : T(-0.75);
  w(0, 32) = T(3);
  Vector<T> b(2);
  b << T(0.5), T(-1);
  Matrix<T> x = Matrix<T>::Zero(1, 40);
  for (Index c = 0; c < 32; ++c) x(0, c) = c % 2 == 0 ? T(2) : T(1);
  x(0, 32) = T(127);
  // Per token: sx = 127 / 127 = 1, xq = x. Row 0: group 0 sums the 16 odd columns times -1 = -16,
  // group 1 is 127 * 1: y = -16 * 0.5 + 127 * 0.375 + 0.5 = 40.125. Row 1 is all zero: the bias.
  const BitLinear<T> tokens(w, b, grouped(32));
  const Matrix<T> y = tokens.forward(x);
  CHECK(y(0, 0) == T(40.125));
  CHECK(y(0, 1) == T(-1));
  // Per block: group 0's absmax is 2, sx0 = 63.5, so x = 1 gives 63.5, a tie, rounded to the even 64;
  // group 1 keeps sx1 = 1. y = -16 * 64 * 0.5 / 63.5 + 127 * 0.375 / 1, summed in double.
  const BitLinear<T> blocks(w, b, grouped(32, activation_scaling::per_block));
  const Matrix<T> yb = blocks.forward(x);
  CHECK(yb(0, 0) == T(-1024.0 * 0.5 / 63.5 + 127.0 * 0.375 / 1.0) + T(0.5));
  CHECK(yb(0, 1) == T(-1));
  // per_row: d = 19 / 40 for row 0, codes [1, -1, ...] then 1 at column 32; acc = 16 * 2 - 16 + 127 = 143.
  const BitLinear<T> rows(w, b, per_row());
  CHECK(rows.forward(x)(0, 0) == T(143.0 * double(T(19.0 / 40.0)) / 1.0) + T(0.5));
}

TEST_CASE_TEMPLATE("units: forward equals the naive numerics on every ISA and thread count", T, float, double) {
  std::mt19937 rng(23);
  struct shape {
    Index in, out;
    bitlinear_options options;
  };
  bitlinear_options rms_block = grouped(32, activation_scaling::per_block);
  rms_block.rms_norm = true;
  bitlinear_options rms_row = per_row();
  rms_row.rms_norm = true;
  const shape shapes[] = {
      {70, 5, grouped(32)},                                 // G = 32: 128 padded columns, an all-padding group
      {70, 17, rms_block},                                  // ragged 6-column last block
      {300, 33, grouped(128, activation_scaling::per_block)},
      {256, 16, grouped(256)},
      {200, 9, grouped(64, activation_scaling::per_block)},
      {77, 9, rms_row},
      {64, 3, per_row()},
  };
  const int thread_counts[] = {1, 2};
  for (const shape& s : shapes) {
    Matrix<T> w = reference::random_matrix<T>(s.out, s.in, rng, 0.5);
    w.col(1) *= T(8);  // a column of large weights: group scales differ from the row's
    const Vector<T> b = reference::random_matrix<T>(s.out, 1, rng);
    const BitLinear<T> layer(w, b, s.options);
    const Index unit = s.options.weight_scales == weight_scaling::per_row ? s.in : s.options.group_size;
    const Matrix<T> d = naive_unit_scales(w, unit);
    if constexpr (std::is_same_v<T, float>)  // a long double mean rounds to float as the exact one does
      CHECK(layer.unit_scales() == d);
    else
      CHECK(((layer.unit_scales() - d).array().abs() <= d.array() * std::numeric_limits<T>::epsilon()).all());
    for (const Index batch : {Index(1), Index(3), Index(17)}) {
      Matrix<T> x = reference::random_matrix<T>(batch, s.in, rng, 2.0);
      x.col(s.in - 1) *= T(30);  // an outlier channel in the last block
      const Matrix<T> normed = s.options.rms_norm ? bitnet::rms_norm(x, T(s.options.rms_eps)) : x;
      const Matrix<T> expected = naive_unit_forward<T>(normed, w, layer.unit_scales(), b, s.options);
      for (const bitnet::isa which : bitnet::all_isas) {
        if (!bitnet::isa_supported(which)) continue;
        bitnet::force_isa(which);
        for (const int threads : thread_counts) {
          bitnet::set_num_threads(threads);
          INFO("in " << s.in << ", out " << s.out << ", batch " << batch << ", " << bitnet::isa_name(which) << ", "
                     << threads << " threads");
          CHECK(layer.forward(x) == expected);
        }
      }
      bitnet::clear_forced_isa();
      bitnet::set_num_threads(0);
    }
  }
}

TEST_CASE("units: binary16 scales (a file's) at batch 1 take the fused kernel and give the naive numerics, every ISA") {
  std::mt19937 rng(29);
  std::uniform_int_distribution<int> code(-1, 1), half_bits(0x0400, 0x7bff);  // normal binary16 magnitudes
  for (const Index group : {Index(64), Index(128), Index(256)})
    for (const Index in : {Index(300), Index(512)}) {
      const Index out = 21, groups = (in + group - 1) / group;
      Matrix<std::int8_t> codes(out, in);
      for (Index i = 0; i < codes.size(); ++i) codes.data()[i] = std::int8_t(code(rng));
      Matrix<float> d(out, groups);
      for (Index i = 0; i < d.size(); ++i) d.data()[i] = bitnet::detail::half_to_float(std::uint16_t(half_bits(rng)));
      const Vector<float> b = reference::random_matrix<float>(out, 1, rng);
      const BitLinear<float> layer = BitLinear<float>::from_ternary(codes, d, b, grouped(group));
      // the kernel's copy: 16 rows x groups binary16 scales per row block, beside the float d
      const std::size_t kernel_copy = std::size_t((out + 15) / 16 * 16 * groups) * 2;
      CHECK(layer.memory_bytes() == layer.packed_weight().capacity_bytes() + std::size_t(d.size() + out) * 4 + kernel_copy);
      // Fine-tuning it (frozen scales: set_weight quantizes against d) keeps the kernel's copy.
      bitnet::bitlinear_options frozen = grouped(group);
      frozen.scale_update = bitnet::weight_scale_update::frozen;
      BitLinear<float> tuned = BitLinear<float>::from_ternary(codes, d, b, frozen);
      tuned.set_weight(tuned.dequantized_weight());
      CHECK(tuned.unit_scales() == d);
      CHECK(tuned.memory_bytes() ==
            tuned.packed_weight().capacity_bytes() + std::size_t(out * in + d.size() + out) * 4 + kernel_copy);
      const Matrix<float> x = reference::random_matrix<float>(1, in, rng, 2.0);
      const Matrix<float> expected = naive_unit_forward<float>(x, layer.dequantized_weight(), d, b, grouped(group));
      for (const bitnet::isa which : bitnet::all_isas) {
        if (!bitnet::isa_supported(which)) continue;
        bitnet::force_isa(which);
        for (const int threads : {1, 2}) {
          bitnet::set_num_threads(threads);
          INFO("G " << group << ", in " << in << ", " << bitnet::isa_name(which) << ", " << threads << " threads");
          CHECK(layer.forward(x) == expected);
        }
      }
      bitnet::clear_forced_isa();
      bitnet::set_num_threads(0);
    }
}

// ---- replace_linear: granularity and exact import ------------------------------------------------

namespace {
// A transformer-like graph whose layers are ternary per group of 32 inputs (an unpacked folder).
fixtures::transformer ternary_transformer(unsigned seed) {
  fixtures::transformer t = fixtures::make_transformer(2, 96, seed);
  std::mt19937 rng(seed);
  for (fixtures::slot* s : fixtures::slots_of(t)) {
    auto& linear = std::get<bitnet::Linear<float>>(*s);
    linear.weight = ternary_per_group<float>(linear.weight.rows(), linear.weight.cols(), 32, rng);
  }
  return t;
}
}  // namespace

TEST_CASE_TEMPLATE("units: replace_linear imports ternary-per-group layers exactly under every policy", Policy, POLICIES) {
  fixtures::transformer t = ternary_transformer(30);
  std::vector<Matrix<float>> weights;
  std::vector<std::optional<Vector<float>>> biases;
  for (fixtures::slot* s : fixtures::slots_of(t)) {
    weights.push_back(std::get<bitnet::Linear<float>>(*s).weight);
    biases.push_back(std::get<bitnet::Linear<float>>(*s).bias);
  }
  bitnet::replace_options options;
  options.layer_options = grouped(32, activation_scaling::per_block);
  options.weights = bitnet::ternary_import::exact;
  const bitnet::replace_report report = bitnet::replace_linear<Policy>(t, options);
  REQUIRE(report.layers.size() == weights.size());
  CHECK(report.layers[0].scales == "g32");
  CHECK(report.layers[0].reconstruction_error == 0);
  CHECK(report.to_string().find("per g32") != std::string::npos);
  std::mt19937 rng(31);
  std::size_t i = 0;
  for (fixtures::slot* s : fixtures::slots_of(t)) {
    const auto& layer = std::get<BitLinear<float>>(*s);
    CHECK(!layer.has_latent_weights());
    CHECK(layer.dequantized_weight() == weights[i]);  // codes x unit scales, bit for bit
    const Matrix<float> x = reference::random_matrix<float>(2, layer.in_features(), rng);
    CHECK(layer.forward(x) == BitLinear<float>::from_exact_ternary(weights[i], biases[i], options.layer_options).forward(x));
    ++i;
  }
}

TEST_CASE_TEMPLATE("units: an exact import refuses a layer that is not ternary per group and leaves the graph as it was",
                   Policy, POLICIES) {
  fixtures::transformer t = ternary_transformer(32);
  auto& up = std::get<bitnet::Linear<float>>(t.blocks[1].mlp.up);
  up.weight(5, 40) = up.weight(5, 40) == 0 ? 0.5f : -3 * up.weight(5, 40);
  const auto before = fixtures::snapshot(t);
  bitnet::replace_options options;
  options.layer_options = grouped(32);
  options.weights = bitnet::ternary_import::exact;
  const std::string m = message_of([&] { bitnet::replace_linear<Policy>(t, options); });
  CHECK(m.find("blocks.1.mlp.up") != std::string::npos);
  CHECK(m.find("row 5, group 1 (columns 32 to 63)") != std::string::npos);
  CHECK(fixtures::snapshot(t) == before);
  // per_tensor cannot be imported exactly: refused before anything changes
  options.layer_options = {};
  CHECK_THROWS_AS(bitnet::replace_linear<Policy>(t, options), bitnet::transfer_error);
  CHECK(fixtures::snapshot(t) == before);
}

TEST_CASE("units: replace_linear quantizes per group (checked) and dry runs leave the graph as it was") {
  fixtures::transformer t = fixtures::make_transformer(1, 80, 33);
  const auto before = fixtures::snapshot(t);
  bitnet::replace_options options;
  options.layer_options = grouped(64, activation_scaling::per_block);
  options.dry_run = true;
  CHECK(bitnet::replace_linear(t, options).layers.size() == 4);
  CHECK(fixtures::snapshot(t) == before);
  options.dry_run = false;
  const Matrix<float> w = std::get<bitnet::Linear<float>>(t.blocks[0].attn).weight;
  bitnet::replace_linear(t, options);
  const auto& attn = std::get<BitLinear<float>>(t.blocks[0].attn);
  CHECK(attn.weight() == w);
  CHECK(attn.unit_scales() == bitnet::quantize_weight_units(w, weight_scaling::per_group, 64).scales);
}

TEST_CASE("units: transfer::checked catches unit scales that do not reproduce the source") {
  // A policy that swaps in a layer with one scale changed must be caught by the exact comparison.
  std::mt19937 rng(34);
  const Matrix<float> w = ternary_per_group<float>(4, 64, 32, rng);
  const bitnet::linear_view<float> view{w, std::nullopt};
  const bitlinear_options options = grouped(32);
  const bitnet::layer_source<float> source("layer", view, options, false, true);
  auto split = bitnet::split_ternary_units(w, weight_scaling::per_group, 32);
  CHECK_NOTHROW(bitnet::transfer::checked{}.verify(source, BitLinear<float>::from_ternary(split.values, split.scales,
                                                                                           std::nullopt, options)));
  split.scales(3, 1) = std::nextafter(split.scales(3, 1), 1.0f);
  const std::string m = message_of([&] {
    bitnet::transfer::checked{}.verify(source, BitLinear<float>::from_ternary(split.values, split.scales, std::nullopt, options));
  });
  Index first_nonzero = 32;
  while (w(3, first_nonzero) == 0) ++first_nonzero;
  CHECK(m.find("row 3, column " + std::to_string(first_nonzero)) != std::string::npos);
}
