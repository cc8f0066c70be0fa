#include <bitnet/hf.hpp>

#include <algorithm>
#include <bit>
#include <cmath>
#include <limits>
#include <cstdint>
#include <random>
#include <type_traits>
#include <vector>

#include <doctest/doctest.h>

#include "reference.hpp"

using bitnet::BitLinear;
using bitnet::Index;
using bitnet::Matrix;
using bitnet::Vector;
namespace hf = bitnet::hf;

namespace {

// transformers' integrations/bitnet.py pack_weights, transcribed loop for loop on plain vectors:
//   row_dim = (rows + 3) // 4; codes = q + 1; it = min(4, rows // row_dim + 1)
//   for i in range(it): start = i * row_dim; end = min(start + row_dim, rows)
//                       packed[:end - start] |= codes[start:end] << 2 * i
std::vector<std::uint8_t> python_pack(const std::vector<int>& q, int rows, int cols) {
  const int row_dim = (rows + 3) / 4;
  std::vector<std::uint8_t> packed(std::size_t(row_dim * cols), 0);
  const int it = std::min(4, rows / row_dim + 1);
  for (int i = 0; i < it; ++i) {
    const int start = i * row_dim;
    const int end = std::min(start + row_dim, rows);
    for (int r = 0; r < end - start; ++r)
      for (int c = 0; c < cols; ++c)
        packed[std::size_t(r * cols + c)] |= std::uint8_t((q[std::size_t((start + r) * cols + c)] + 1) << (2 * i));
  }
  return packed;
}

// transformers' unpack_weights: rows = packed_rows * 4, unpacked[i*R:(i+1)*R] = (packed >> 2i) & 3, minus 1.
std::vector<int> python_unpack(const std::vector<std::uint8_t>& packed, int packed_rows, int cols) {
  std::vector<int> out(std::size_t(4 * packed_rows * cols));
  for (int i = 0; i < 4; ++i)
    for (int r = 0; r < packed_rows; ++r)
      for (int c = 0; c < cols; ++c)
        out[std::size_t((i * packed_rows + r) * cols + c)] = ((packed[std::size_t(r * cols + c)] >> (2 * i)) & 3) - 1;
  return out;
}

Matrix<std::int8_t> random_ternary(Index rows, Index cols, std::mt19937& rng) {
  std::uniform_int_distribution<int> dist(-1, 1);
  Matrix<std::int8_t> q(rows, cols);
  for (Index i = 0; i < q.size(); ++i) q.data()[i] = std::int8_t(dist(rng));
  return q;
}

template <class T>
Matrix<T> random_weights(Index rows, Index cols, std::mt19937& rng, double sigma = 0.05) {
  std::normal_distribution<double> dist(0.0, sigma);
  Matrix<T> w(rows, cols);
  for (Index i = 0; i < w.size(); ++i) w.data()[i] = T(dist(rng));
  return w;
}

template <class T>
auto bits_of(T value) {
  if constexpr (sizeof(T) == 4) return std::bit_cast<std::uint32_t>(value);
  else return std::bit_cast<std::uint64_t>(value);
}

// A positive finite T spread over `decades` around 1 (log-uniform).
template <class T>
T random_scale(std::mt19937& rng, double decades) {
  std::uniform_real_distribution<double> exponent(-decades, decades);
  return T(std::pow(10.0, exponent(rng)));
}

}  // namespace

TEST_CASE("hf: unpack_weights decodes transformers' docstring example") {
  // From the unpack_weights docstring in transformers/integrations/bitnet.py.
  Matrix<std::uint8_t> packed(2, 2);
  packed << 0b10100001, 0b00011000,
            0b10010000, 0b00001010;
  Matrix<std::int8_t> expected(8, 2);
  expected << 0, -1,  -1, 1,  -1, 1,  -1, 1,  1, 0,  0, -1,  1, -1,  1, -1;
  CHECK(hf::unpack_weights(packed, 8) == expected);
  CHECK(hf::pack_weights(expected) == packed);
}

TEST_CASE("hf: a hand-packed ragged layer (out = 5, R = 2)") {
  // Rows 0..4 -> (packed row, bit pair): 0->(0,0) 1->(1,0) 2->(0,1) 3->(1,1) 4->(0,2).
  // Values 1,-1,0,1,-1 -> codes 2,0,1,2,0: byte0 = 2 | 1<<2 | 0<<4 = 6, byte1 = 0 | 2<<2 = 8.
  Matrix<std::int8_t> q(5, 1);
  q << 1, -1, 0, 1, -1;
  const Matrix<std::uint8_t> packed = hf::pack_weights(q);
  REQUIRE(packed.rows() == 2);
  CHECK(int(packed(0, 0)) == 6);
  CHECK(int(packed(1, 0)) == 8);
  CHECK(hf::unpack_weights(packed, 5) == q);
}

TEST_CASE("hf: pack_weights matches the transcribed reference byte for byte for ragged sizes") {
  std::mt19937 rng(11);
  for (int rows = 1; rows <= 21; ++rows)
    for (int cols : {1, 3, 8}) {
      CAPTURE(rows);
      CAPTURE(cols);
      const Matrix<std::int8_t> q = random_ternary(rows, cols, rng);
      std::vector<int> flat(q.data(), q.data() + q.size());
      const std::vector<std::uint8_t> expected = python_pack(flat, rows, cols);
      const Matrix<std::uint8_t> packed = hf::pack_weights(q);
      REQUIRE(packed.rows() == hf::packed_rows(rows));
      REQUIRE(std::vector<std::uint8_t>(packed.data(), packed.data() + packed.size()) == expected);
      // transformers' unpack gives 4R rows; the first `rows` are q, the padding rows decode as -1
      // (code 0), which is why out_features must be known.
      const std::vector<int> unpacked = python_unpack(expected, int(packed.rows()), cols);
      for (int r = 0; r < 4 * packed.rows(); ++r)
        for (int c = 0; c < cols; ++c)
          REQUIRE(unpacked[std::size_t(r * cols + c)] == (r < rows ? int(q(r, c)) : -1));
      REQUIRE(hf::unpack_weights(packed, rows) == q);
    }
}

TEST_CASE("hf: unpack_weights rejects code 3, non-zero padding and wrong shapes") {
  Matrix<std::uint8_t> packed = Matrix<std::uint8_t>::Constant(2, 3, 0b01010101);  // all zeros for out = 8
  CHECK(hf::unpack_weights(packed, 8) == Matrix<std::int8_t>::Zero(8, 3));
  packed(1, 2) = 0b01110101;  // code 3 in bits 4-5
  CHECK_THROWS_WITH_AS(hf::unpack_weights(packed, 8), doctest::Contains("code 3 at packed row 1, column 2, bits 4-5"),
                       bitnet::value_error);
  // out = 7: bits 6-7 of packed row 0 are row 6; of packed row 1, row 7: padding, which must hold 0.
  packed.row(0).setConstant(0b01010101);
  packed.row(1).setConstant(0b00010101);
  CHECK(hf::unpack_weights(packed, 7) == Matrix<std::int8_t>::Zero(7, 3));
  packed(1, 1) = 0b01010101;
  CHECK_THROWS_WITH_AS(hf::unpack_weights(packed, 7), doctest::Contains("padding"), bitnet::value_error);
  CHECK_THROWS_AS(hf::unpack_weights(packed, 9), bitnet::shape_error);   // needs 3 packed rows
  CHECK_THROWS_AS(hf::unpack_weights(packed, 4), bitnet::shape_error);   // needs 1
  CHECK_THROWS_AS(hf::unpack_weights(packed, 0), bitnet::shape_error);
  CHECK_THROWS_AS(hf::unpack_weights(Matrix<std::uint8_t>(0, 3), 1), bitnet::shape_error);
  Matrix<std::int8_t> bad = Matrix<std::int8_t>::Zero(3, 3);
  bad(2, 1) = 2;
  CHECK_THROWS_WITH_AS(hf::pack_weights(bad), doctest::Contains("row 2, column 1"), bitnet::value_error);
  CHECK_THROWS_AS(hf::pack_weights(Matrix<std::int8_t>(0, 0)), bitnet::shape_error);
}

TEST_CASE_TEMPLATE("hf: both scale conventions round-trip a BitLinear exactly", T, float, double) {
  std::mt19937 rng(3);
  for (Index out : {1, 5, 64, 67}) {
    const Matrix<T> w = random_weights<T>(out, 37, rng);
    const BitLinear<T> original(w);
    for (auto convention : {hf::scale_convention::bitlinear, hf::scale_convention::autobitlinear}) {
      CAPTURE(out);
      CAPTURE(hf::convention_name(convention));
      const hf::packed_layer<T> packed = hf::to_packed(original, convention);
      CHECK(packed.weight.rows() == hf::packed_rows(out));
      if (convention == hf::scale_convention::bitlinear) CHECK(packed.weight_scale == original.weight_scale());
      else {
        CHECK(T(1) / packed.weight_scale == original.weight_scale());  // m = mean|W|, as quantization rounded it
        CHECK(double(packed.weight_scale) == doctest::Approx(1.0 / double(reference::weight_scale(w))).epsilon(1e-6));
      }
      const BitLinear<T> loaded = hf::to_bit_linear(packed);
      // The loaded layer holds the same ternary codes and the same scale, so it computes the same.
      CHECK(loaded.ternary_weight() == original.ternary_weight());
      CHECK(bits_of(loaded.weight_scale()) == bits_of(original.weight_scale()));
      const Matrix<T> x = random_weights<T>(4, 37, rng, 1.0);
      CHECK(loaded.forward(x) == original.forward(x));
      // It has no latent weights: weight() says so.
      CHECK_FALSE(loaded.has_latent_weights());
      CHECK_THROWS_WITH_AS((void)loaded.weight(), doctest::Contains("built from ternary weights"), bitnet::state_error);
      // Packed again (from the codes and scale alone) it reloads to the same layer once more.
      const hf::packed_layer<T> repacked = hf::to_packed(loaded, convention);
      CHECK(repacked.weight == packed.weight);
      if (convention == hf::scale_convention::bitlinear) CHECK(bits_of(repacked.weight_scale) == bits_of(packed.weight_scale));
      const BitLinear<T> reloaded = hf::to_bit_linear(repacked);
      CHECK(reloaded.ternary_weight() == original.ternary_weight());
      CHECK(bits_of(reloaded.weight_scale()) == bits_of(original.weight_scale()));
      CHECK(reloaded.forward(x) == original.forward(x));
    }
  }
}

TEST_CASE_TEMPLATE("hf: loaded layers compute what transformers' formulas say", T, float, double) {
  std::mt19937 rng(8);
  const Index out = 6, in = 16;
  const Matrix<std::int8_t> q = random_ternary(out, in, rng);
  Vector<T> bias(out);
  for (Index i = 0; i < out; ++i) bias(i) = T(0.25) * T(i) - T(0.5);
  const Matrix<T> x = random_weights<T>(3, in, rng, 1.0);
  const auto xq = bitnet::quantize_activations(x);
  const Matrix<std::int64_t> acc = xq.values.template cast<std::int64_t>() * q.template cast<std::int64_t>().transpose();

  SUBCASE("bitlinear: y = (xq . q) / (sx * s) + b") {
    const T s = T(20.5);
    const BitLinear<T> layer = hf::to_bit_linear(hf::packed_layer<T>{hf::pack_weights(q), out, s, bias, hf::scale_convention::bitlinear});
    CHECK(layer.ternary_weight() == q);
    CHECK(layer.weight_scale() == s);
    const Matrix<T> y = layer.forward(x);
    for (Index b = 0; b < 3; ++b)
      for (Index o = 0; o < out; ++o)
        CHECK(double(y(b, o)) == doctest::Approx(double(acc(b, o)) / (double(xq.scales(b)) * s) + double(bias(o))).epsilon(1e-6));
  }
  SUBCASE("autobitlinear: y = (x_fq . q + b) * m") {
    const T m = T(0.046875);
    const BitLinear<T> layer =
        hf::to_bit_linear(hf::packed_layer<T>{hf::pack_weights(q), out, m, bias, hf::scale_convention::autobitlinear});
    CHECK(layer.ternary_weight() == q);
    CHECK(layer.weight_scale() == T(1) / m);
    const Matrix<T> y = layer.forward(x);
    for (Index b = 0; b < 3; ++b)
      for (Index o = 0; o < out; ++o)
        CHECK(double(y(b, o)) == doctest::Approx((double(acc(b, o)) / double(xq.scales(b)) + double(bias(o))) * m).epsilon(1e-6));
  }
}

TEST_CASE_TEMPLATE("hf: every stored scale is reproduced exactly, in both conventions", T, float, double) {
  // bitlinear: weight_scale() is the stored s itself. autobitlinear: it is T(1) / m for the stored
  // m, one division in T (no clamp: m < 1e-5 is taken as stored). Before the layers were built from
  // the codes (BitLinear::from_ternary), a float s came back exactly only when some float's
  // reciprocal rounds to it: 37 of 300 such scales were 1 ulp off.
  std::mt19937 rng(21);
  const Matrix<std::int8_t> q = random_ternary(9, 13, rng);
  const int trials = 300;
  int exact_bitlinear = 0, exact_autobitlinear = 0, exact_resaved = 0;
  for (int t = 0; t < trials; ++t) {
    const T value = t < 30 ? random_scale<T>(rng, 30) : random_scale<T>(rng, 4);  // a few far from 1
    CAPTURE(value);
    const BitLinear<T> plain_layer = hf::to_bit_linear(
        hf::packed_layer<T>{hf::pack_weights(q), 9, value, std::nullopt, hf::scale_convention::bitlinear});
    const BitLinear<T> auto_layer = hf::to_bit_linear(
        hf::packed_layer<T>{hf::pack_weights(q), 9, value, std::nullopt, hf::scale_convention::autobitlinear});
    REQUIRE(plain_layer.ternary_weight() == q);
    REQUIRE(auto_layer.ternary_weight() == q);
    exact_bitlinear += bits_of(plain_layer.weight_scale()) == bits_of(value);
    exact_autobitlinear += bits_of(auto_layer.weight_scale()) == bits_of(T(1) / value);
    // Saved again in its convention (a layer without latent weights) and reloaded: the same scale.
    const auto resaved = [](const BitLinear<T>& layer, hf::scale_convention convention) {
      return hf::to_bit_linear(hf::to_packed(layer, convention)).weight_scale();
    };
    exact_resaved += bits_of(resaved(plain_layer, hf::scale_convention::bitlinear)) == bits_of(value) &&
                     bits_of(resaved(auto_layer, hf::scale_convention::autobitlinear)) == bits_of(T(1) / value);
  }
  MESSAGE("scales reproduced exactly: bitlinear " << exact_bitlinear << ", autobitlinear " << exact_autobitlinear
                                                   << ", saved again and reloaded " << exact_resaved << " of " << trials);
  CHECK(exact_bitlinear == trials);
  CHECK(exact_autobitlinear == trials);
  CHECK(exact_resaved == trials);
}

TEST_CASE_TEMPLATE("hf: autobitlinear means for scales: exact for every rounded reciprocal, else 1 ulp", T, float, double) {
  // to_packed of a layer without latent weights stores an m with T(1) / m == weight_scale(). Every
  // scale that is a rounded reciprocal (all that quantization or an autobitlinear file give) has
  // one. Other scales (a bitlinear file's, from_ternary's) may not: they come back 1 ulp off.
  std::mt19937 rng(22);
  const int trials = 20000;
  int reciprocal_exact = 0, other_exact = 0;
  double worst_ulps = 0;
  for (int t = 0; t < trials; ++t) {
    const T scale = T(1) / random_scale<T>(rng, 30);
    reciprocal_exact += T(1) / hf::detail::mean_for_scale(scale) == scale;
    const T other = random_scale<T>(rng, 30);
    const T back = T(1) / hf::detail::mean_for_scale(other);
    other_exact += back == other;
    worst_ulps = std::max(worst_ulps, std::fabs(double(back) - double(other)) /
                                          double(std::nextafter(other, std::numeric_limits<T>::infinity()) - other));
  }
  MESSAGE("rounded reciprocals reproduced: " << reciprocal_exact << " of " << trials << "; arbitrary scales: "
                                             << other_exact << " of " << trials << ", worst " << worst_ulps << " ulp");
  CHECK(reciprocal_exact == trials);
  CHECK(worst_ulps <= 1.0);
  CHECK_THROWS_AS(hf::detail::mean_for_scale(std::numeric_limits<T>::denorm_min()), bitnet::value_error);
}

TEST_CASE("hf: a layer of zeros and invalid scales") {
  const Matrix<std::int8_t> zeros = Matrix<std::int8_t>::Zero(4, 4);
  const BitLinear<float> layer = hf::to_bit_linear(hf::packed_layer<float>{hf::pack_weights(zeros), 4, 0.5f, std::nullopt, hf::scale_convention::bitlinear});
  CHECK(layer.ternary_weight() == zeros);
  CHECK(layer.forward(Matrix<float>::Ones(2, 4)) == Matrix<float>::Zero(2, 4));
  for (const auto convention : {hf::scale_convention::bitlinear, hf::scale_convention::autobitlinear})
    for (float bad : {0.0f, -1.0f, std::numeric_limits<float>::infinity(), std::numeric_limits<float>::quiet_NaN()}) {
      CAPTURE(bad);
      CHECK_THROWS_WITH_AS(hf::to_bit_linear(hf::packed_layer<float>{hf::pack_weights(zeros), 4, bad, std::nullopt, convention}),
                           doctest::Contains("is not finite and > 0"), bitnet::value_error);
    }
  // autobitlinear: a mean so small that 1 / mean overflows float.
  CHECK_THROWS_WITH_AS(hf::to_bit_linear(hf::packed_layer<float>{hf::pack_weights(zeros), 4, 1e-40f, std::nullopt,
                                                                 hf::scale_convention::autobitlinear}),
                       doctest::Contains("1 / weight_scale overflows"), bitnet::value_error);
  // ... while a mean below quantization's 1e-5 clamp is taken as stored.
  CHECK(hf::to_bit_linear(hf::packed_layer<float>{hf::pack_weights(zeros), 4, 1e-7f, std::nullopt,
                                                  hf::scale_convention::autobitlinear})
            .weight_scale() == 1.0f / 1e-7f);
}

TEST_CASE("hf: quantization_config snippets name the convention") {
  CHECK(hf::quantization_config_json() ==
        R"({"quant_method": "bitnet", "linear_class": "autobitlinear", "quantization_mode": "offline", )"
        R"("modules_to_not_convert": null, "use_rms_norm": false, "rms_norm_eps": 1e-06})");
  CHECK(hf::quantization_config_json(hf::scale_convention::bitlinear) ==
        R"({"quant_method": "bitnet", "linear_class": "bitlinear", "quantization_mode": "offline", )"
        R"("modules_to_not_convert": null, "use_rms_norm": false, "rms_norm_eps": 1e-06})");
  hf::quantization_config config;
  config.mode = hf::quantization_mode::online;
  config.modules_to_not_convert = {"lm_head", "a\"b\\c"};
  config.use_rms_norm = true;
  config.rms_norm_eps = 1e-5;
  config.out_features = {{"model.layers.0.mlp.down_proj", 2563}};
  CHECK(hf::to_json(config) ==
        R"({"quant_method": "bitnet", "linear_class": "autobitlinear", "quantization_mode": "online", )"
        R"("modules_to_not_convert": ["lm_head", "a\"b\\c"], "use_rms_norm": true, "rms_norm_eps": 1e-05, )"
        R"("bitnet_out_features": {"model.layers.0.mlp.down_proj": 2563}})");
}
