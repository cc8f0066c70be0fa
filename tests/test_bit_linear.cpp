#include <bitnet/bit_linear.hpp>

#include <bit>
#include <cmath>
#include <cstdlib>
#include <cstdint>
#include <cstring>
#include <limits>
#include <random>
#include <string>
#include <thread>
#include <tuple>
#include <type_traits>
#include <vector>

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
        check_against_references(BitLinear<T>(w, b, rms), x, w, &b, reference::rms_norm(x, T(1e-6)));
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

namespace {

// Restores the run-time kernel choice and thread count when a test ends (also on failure).
struct kernel_settings_guard {
  ~kernel_settings_guard() {
    bitnet::clear_forced_isa();
    bitnet::set_num_threads(0);
  }
};

std::vector<bitnet::isa> runnable_isas() {
  std::vector<bitnet::isa> isas;
  for (bitnet::isa which : bitnet::all_isas)
    if (bitnet::isa_supported(which)) isas.push_back(which);
  return isas;
}

}  // namespace

TEST_CASE_TEMPLATE("BitLinear: forward is bit-identical for every ISA and thread count", T, float, double) {
  kernel_settings_guard guard;
  std::mt19937 rng(21);
  // 256 x 2048 at batch 8 is 4M multiply-adds: enough for the kernels to split it over 2 threads.
  // Batch 3 and 8 take the AVX-512 per-plane and shared-plane kernels, 33 the AMX tiles (with a
  // tail), 70 also quantizes its activations on two threads.
  for (Index batch : {1, 3, 8, 33, 70}) {
    const Matrix<T> w = reference::random_matrix<T>(257, 2048, rng, 0.05);
    const Vector<T> b = reference::random_matrix<T>(257, 1, rng);
    const Matrix<T> x = reference::random_matrix<T>(batch, 2048, rng, 4.0);
    const BitLinear<T> layer(w, b);
    bitnet::force_isa(bitnet::isa::scalar);
    bitnet::set_num_threads(1);
    const Matrix<T> expected = layer.forward(x);
    for (bitnet::isa which : runnable_isas())
      for (int threads : {1, 2}) {
        CAPTURE(bitnet::isa_name(which));
        CAPTURE(threads);
        bitnet::force_isa(which);
        bitnet::set_num_threads(threads);
        CHECK(layer.forward(x) == expected);
        CHECK(bitnet::last_isa() == which);
        // a non-finite value in the last row (the second thread's share of the quantization)
        Matrix<T> bad = x;
        bad(batch - 1, 2047) = std::numeric_limits<T>::infinity();
        const std::string message = "non-finite value (+inf) at row " + std::to_string(batch - 1);
        CHECK_THROWS_WITH_AS((void)layer.forward(bad), doctest::Contains(message.c_str()), bitnet::value_error);
      }
  }
}

TEST_CASE("BitLinear: a plain build runs the best kernels this CPU has") {
  const char* env = std::getenv("BITNET_ISA");
  if (env != nullptr && *env != '\0') {
    MESSAGE("BITNET_ISA is set: checking that it is obeyed instead");
    const BitLinear<float> layer(Matrix<float>::Ones(4, 300));
    (void)layer.forward(Matrix<float>::Ones(2, 300));
    CHECK(bitnet::isa_name(bitnet::last_isa()) == env);
    return;
  }
  const BitLinear<float> layer(Matrix<float>::Ones(4, 300));
  (void)layer.forward(Matrix<float>::Ones(2, 300));
  CHECK(bitnet::last_isa() == bitnet::best_isa());
}

TEST_CASE_TEMPLATE("BitLinear: releasing the latent weights keeps forward and shrinks the layer", T, float, double) {
  std::mt19937 rng(22);
  const Index out = 256, in = 2560;
  const Matrix<T> w = reference::random_matrix<T>(out, in, rng, 0.05);
  const Vector<T> b = reference::random_matrix<T>(out, 1, rng);
  const Matrix<T> x = reference::random_matrix<T>(3, in, rng);
  BitLinear<T> layer(w, b);
  const Matrix<T> y = layer.forward(x);
  const Matrix<std::int8_t> codes = layer.ternary_weight();
  const T scale = layer.weight_scale();
  CHECK(layer.has_latent_weights());
  CHECK(double(layer.memory_bytes()) >= double(out * in * sizeof(T)));

  layer.release_latent_weights();
  CHECK_FALSE(layer.has_latent_weights());
  CHECK(layer.forward(x) == y);
  CHECK(layer.ternary_weight() == codes);
  CHECK(layer.weight_scale() == scale);
  REQUIRE(layer.bias().has_value());
  CHECK(*layer.bias() == b);
  CHECK_THROWS_WITH_AS((void)layer.weight(), doctest::Contains("latent weights were released"), bitnet::state_error);

  // What remains: the packed codes (2 bits per weight) and the bias, measured from the buffers.
  const double bias_bytes = double(out * sizeof(T));
  const double weight_bits = (double(layer.memory_bytes()) - bias_bytes) * 8.0 / double(out * in);
  CAPTURE(weight_bits);
  CHECK(weight_bits <= 2.1);
  CHECK(weight_bits >= 2.0);
  CHECK(layer.packed_weight().capacity_bytes() == std::size_t(out * in / 4));

  // Copies stay inference-only; set_weight gives latent weights back.
  const BitLinear<T> copy = layer;
  CHECK_FALSE(copy.has_latent_weights());
  CHECK(copy.forward(x) == y);
  layer.set_weight(w);
  CHECK(layer.has_latent_weights());
  CHECK(layer.weight() == w);
  CHECK(layer.forward(x) == y);
}

TEST_CASE("BitLinear: in_features beyond max_in_features is rejected") {
  CHECK_THROWS_WITH_AS(BitLinear<float>(Matrix<float>(1, bitnet::max_in_features + 1)),
                       doctest::Contains("exceeds the exact-accumulation limit"), bitnet::shape_error);
}

TEST_CASE("BitLinear: concurrent forward on one layer") {
  // Several threads share one const layer (run under ThreadSanitizer by the tsan preset).
  std::mt19937 rng(23);
  const BitLinear<float> layer(reference::random_matrix<float>(300, 1024, rng, 0.05),
                               Vector<float>(reference::random_matrix<float>(300, 1, rng)));
  std::vector<Matrix<float>> inputs;
  for (Index batch : {1, 2, 7, 16}) inputs.push_back(reference::random_matrix<float>(batch, 1024, rng));
  std::vector<Matrix<float>> expected;
  for (const Matrix<float>& x : inputs) expected.push_back(layer.forward(x));
  bitnet::set_num_threads(2);  // each call may start its own worker too
  std::vector<int> mismatches(4, 0);
  std::vector<std::thread> callers;
  for (int t = 0; t < 4; ++t)
    callers.emplace_back([&, t] {
      for (int round = 0; round < 10; ++round)
        for (std::size_t i = 0; i < inputs.size(); ++i)
          if (layer.forward(inputs[(i + std::size_t(t)) % inputs.size()]) != expected[(i + std::size_t(t)) % inputs.size()])
            ++mismatches[std::size_t(t)];
    });
  for (std::thread& caller : callers) caller.join();
  bitnet::set_num_threads(0);
  CHECK(mismatches == std::vector<int>(4, 0));
}

// ---- batch 1 over several threads: each kernel part quantizes the token itself ----

namespace {

// The weight layouts whose batch-1 forward quantizes the token in every kernel part, on a ragged
// 700 x 2310 layer (700 rows: 43 row blocks and 12 rows; 2310 columns: past a 64-column block, a
// 20-column base-3 tile, a group of 128 and of 32). Its 1.6M multiply-adds split into 3 parts of
// more than min_work_per_thread (2^19), so 2 and 3 threads both split it.
struct batch1_layout {
  const char* name;
  bitnet::bitlinear_options options;
};

std::vector<batch1_layout> batch1_layouts() {
  using bitnet::activation_scaling;
  using bitnet::weight_scaling;
  return {
      {"per_tensor two_bit", {}},
      {"per_tensor two_bit rms_norm", {.rms_norm = true}},
      {"per_tensor base3", {.storage = bitnet::weight_storage::base3}},
      {"per_row", {.weight_scales = weight_scaling::per_row}},
      {"per_group 128 (fused on AVX-512 float)", {.weight_scales = weight_scaling::per_group, .group_size = 128}},
      {"per_group 128 per_block",
       {.weight_scales = weight_scaling::per_group, .group_size = 128, .activation_scales = activation_scaling::per_block}},
      {"per_group 32", {.weight_scales = weight_scaling::per_group, .group_size = 32}},
  };
}

constexpr Index batch1_out = 700, batch1_in = 2310;

template <class T>
bool same_bits(const Matrix<T>& a, const Matrix<T>& b) {
  return a.rows() == b.rows() && a.cols() == b.cols() &&
         std::memcmp(a.data(), b.data(), sizeof(T) * std::size_t(a.size())) == 0;
}

}  // namespace

TEST_CASE_TEMPLATE("BitLinear: batch 1 gives the one-thread bits at every thread count, layout and ISA", T, float,
                   double) {
  kernel_settings_guard guard;
  std::mt19937 rng(64);
  for (const batch1_layout& layout : batch1_layouts()) {
    const BitLinear<T> layer(reference::random_matrix<T>(batch1_out, batch1_in, rng, 0.05),
                             Vector<T>(reference::random_matrix<T>(batch1_out, 1, rng)), layout.options);
    const Matrix<T> x = reference::random_matrix<T>(1, batch1_in, rng, 4.0);
    bitnet::force_isa(bitnet::isa::scalar);
    bitnet::set_num_threads(1);
    const Matrix<T> expected = layer.forward(x);
    for (bitnet::isa which : runnable_isas()) {
      bitnet::force_isa(which);
      for (int threads : {1, 2, 3}) {
        CAPTURE(layout.name);
        CAPTURE(bitnet::isa_name(which));
        CAPTURE(threads);
        bitnet::set_num_threads(threads);
        Matrix<T> y;
        layer.forward(x, y);
        CHECK(same_bits(y, expected));
        layer.forward(x, y);  // again, into the same y: the parts' scratch is reused
        CHECK(same_bits(y, expected));
      }
    }
  }
}

TEST_CASE_TEMPLATE("BitLinear: batch 1 at every thread count: a non-finite input throws, naming it, and y keeps its values",
                   T, float, double) {
  kernel_settings_guard guard;
  std::mt19937 rng(65);
  for (const batch1_layout& layout : batch1_layouts()) {
    const BitLinear<T> layer(reference::random_matrix<T>(batch1_out, batch1_in, rng, 0.05), std::nullopt,
                             layout.options);
    const Matrix<T> x = reference::random_matrix<T>(1, batch1_in, rng, 4.0);
    for (bitnet::isa which : runnable_isas()) {
      bitnet::force_isa(which);
      for (int threads : {1, 2, 3}) {
        bitnet::set_num_threads(threads);
        for (T bad : {std::numeric_limits<T>::quiet_NaN(), std::numeric_limits<T>::infinity()})
          for (Index column : {Index{0}, batch1_in / 2, batch1_in - 1}) {
            CAPTURE(layout.name);
            CAPTURE(bitnet::isa_name(which));
            CAPTURE(threads);
            CAPTURE(column);
            Matrix<T> x_bad = x;
            x_bad(0, column) = bad;
            const std::string message = std::string("non-finite value (") + (std::isnan(bad) ? "nan" : "+inf") +
                                        ") at row 0, column " + std::to_string(column);
            const Matrix<T> sentinel = Matrix<T>::Constant(1, batch1_out, T(7.25));
            Matrix<T> y = sentinel;  // the right shape: the kernels' epilogues would write straight into it
            CHECK_THROWS_WITH_AS(layer.forward(x_bad, y), doctest::Contains(message.c_str()), bitnet::value_error);
            CHECK(same_bits(y, sentinel));
          }
        // and the layer still works
        Matrix<T> y;
        layer.forward(x, y);
        CHECK(y.allFinite());
      }
    }
  }
}

TEST_CASE("BitLinear: concurrent batch-1 forwards, each split over the pool") {
  // Several callers at once, each call quantizing its token in every part (tsan preset).
  std::mt19937 rng(66);
  std::vector<BitLinear<float>> layers;
  for (const batch1_layout& layout : batch1_layouts())
    layers.emplace_back(reference::random_matrix<float>(batch1_out, batch1_in, rng, 0.05), std::nullopt,
                        layout.options);
  const Matrix<float> x = reference::random_matrix<float>(1, batch1_in, rng, 4.0);
  bitnet::set_num_threads(1);
  std::vector<Matrix<float>> expected;
  for (const BitLinear<float>& layer : layers) expected.push_back(layer.forward(x));
  bitnet::set_num_threads(2);
  std::vector<int> mismatches(3, 0);
  std::vector<std::thread> callers;
  for (int t = 0; t < 3; ++t)
    callers.emplace_back([&, t] {
      Matrix<float> y;
      for (int round = 0; round < 4; ++round)
        for (std::size_t i = 0; i < layers.size(); ++i) {
          const std::size_t which = (i + std::size_t(t)) % layers.size();
          layers[which].forward(x, y);
          if (!same_bits(y, expected[which])) ++mismatches[std::size_t(t)];
        }
    });
  for (std::thread& caller : callers) caller.join();
  bitnet::set_num_threads(0);
  CHECK(mismatches == std::vector<int>(3, 0));
}

// ---- BitLinear::from_ternary: a layer from ternary codes and a scale, without latent weights ----

namespace {

template <class T>
auto bits_of(T value) {
  if constexpr (sizeof(T) == 4) return std::bit_cast<std::uint32_t>(value);
  else return std::bit_cast<std::uint64_t>(value);
}

}  // namespace

TEST_CASE_TEMPLATE("BitLinear::from_ternary: hand-computed forward", T, float, double) {
  // The codes of the tie test above, with a scale quantization would also give (sw = 1) and two
  // others: y = acc / (sx * sw) + b with acc = (254, -192) and sx = 1.
  Matrix<std::int8_t> codes(2, 4);
  codes << 1, -1, 0, 1,
           -1, 1, 1, 0;
  Vector<T> b(2);
  b << T(0.5), T(-1);
  Matrix<T> x(1, 4);
  x << 127, -127, T(62.5), 0;
  for (const std::tuple<T, T, T>& expected : {std::tuple<T, T, T>{1, 254.5, -193}, std::tuple<T, T, T>{4, 64, -49},
                                               std::tuple<T, T, T>{0.5, 508.5, -385}}) {
    const T scale = std::get<0>(expected);
    CAPTURE(scale);
    const BitLinear<T> layer = BitLinear<T>::from_ternary(codes, scale, b);
    CHECK(layer.weight_scale() == scale);
    CHECK(layer.ternary_weight() == codes);
    const Matrix<T> y = layer.forward(x);
    CHECK(y(0, 0) == std::get<1>(expected));
    CHECK(y(0, 1) == std::get<2>(expected));
  }
}

TEST_CASE_TEMPLATE("BitLinear::from_ternary: forward is bit-identical to the layer the codes and scale came from", T, float,
                   double) {
  std::mt19937 rng(43);
  for (Index in : {1, 3, 17, 64, 100, 127, 129, 257}) {
    for (Index out : {1, 2, 5, 33}) {
      for (const bool rms : {false, true}) {
        CAPTURE(in);
        CAPTURE(out);
        CAPTURE(rms);
        bitnet::bitlinear_options options;
        options.rms_norm = rms;
        const Matrix<T> w = reference::random_matrix<T>(out, in, rng, 0.02);
        const Vector<T> b = reference::random_matrix<T>(out, 1, rng, 0.5);
        const BitLinear<T> with_bias(w, b, options), without_bias(w, std::nullopt, options);
        const BitLinear<T> rebuilt_with_bias =
            BitLinear<T>::from_ternary(with_bias.ternary_weight(), with_bias.weight_scale(), b, options);
        const BitLinear<T> rebuilt_without_bias =
            BitLinear<T>::from_ternary(without_bias.ternary_weight(), without_bias.weight_scale(), std::nullopt, options);
        CHECK(rebuilt_with_bias.packed_weight() == with_bias.packed_weight());
        CHECK(bits_of(rebuilt_with_bias.weight_scale()) == bits_of(with_bias.weight_scale()));
        CHECK(rebuilt_with_bias.options().rms_norm == rms);
        for (Index batch : {1, 3, 8}) {
          CAPTURE(batch);
          const Matrix<T> x = reference::random_matrix<T>(batch, in, rng, 2.0);
          CHECK(rebuilt_with_bias.forward(x) == with_bias.forward(x));
          CHECK(rebuilt_without_bias.forward(x) == without_bias.forward(x));
        }
      }
    }
  }
}

TEST_CASE_TEMPLATE("BitLinear::from_ternary: bit-identical to a latent layer on every ISA and thread count", T, float,
                   double) {
  kernel_settings_guard guard;
  std::mt19937 rng(44);
  const Matrix<T> w = reference::random_matrix<T>(131, 1030, rng, 0.05);
  const Vector<T> b = reference::random_matrix<T>(131, 1, rng);
  const Matrix<T> x = reference::random_matrix<T>(9, 1030, rng, 4.0);
  const BitLinear<T> latent(w, b);
  const BitLinear<T> ternary = BitLinear<T>::from_ternary(latent.ternary_weight(), latent.weight_scale(), b);
  for (bitnet::isa which : runnable_isas())
    for (int threads : {1, 2}) {
      CAPTURE(bitnet::isa_name(which));
      CAPTURE(threads);
      bitnet::force_isa(which);
      bitnet::set_num_threads(threads);
      CHECK(ternary.forward(x) == latent.forward(x));
    }
}

TEST_CASE_TEMPLATE("BitLinear::from_ternary: no latent weights until set_weight, and weight() says why", T, float, double) {
  std::mt19937 rng(45);
  const Matrix<T> w = reference::random_matrix<T>(6, 10, rng);
  const Vector<T> b = reference::random_matrix<T>(6, 1, rng);
  const BitLinear<T> source(w, b);
  BitLinear<T> layer = BitLinear<T>::from_ternary(source.ternary_weight(), source.weight_scale(), b);
  CHECK_FALSE(layer.has_latent_weights());
  CHECK(layer.in_features() == 10);
  CHECK(layer.out_features() == 6);
  CHECK(layer.ternary_weight() == source.ternary_weight());
  CHECK(layer.weight_scale() == source.weight_scale());
  REQUIRE(layer.bias().has_value());
  CHECK(*layer.bias() == b);
  CHECK(layer.memory_bytes() == layer.packed_weight().capacity_bytes() + std::size_t(6) * sizeof(T));
  CHECK_THROWS_WITH_AS((void)layer.weight(), doctest::Contains("built from ternary weights (from_ternary"),
                       bitnet::state_error);
  // Releasing what was never there changes nothing, not even the message; copies keep the state.
  layer.release_latent_weights();
  CHECK_THROWS_WITH_AS((void)layer.weight(), doctest::Contains("built from ternary weights"), bitnet::state_error);
  const BitLinear<T> copy = layer;
  CHECK_FALSE(copy.has_latent_weights());
  CHECK_THROWS_WITH_AS((void)copy.weight(), doctest::Contains("built from ternary weights"), bitnet::state_error);

  // set_weight gives it latent weights (and their codes and scale); a release is then a release.
  layer.set_weight(w);
  CHECK(layer.has_latent_weights());
  CHECK(layer.weight() == w);
  layer.release_latent_weights();
  CHECK_THROWS_WITH_AS((void)layer.weight(), doctest::Contains("latent weights were released"), bitnet::state_error);
}

TEST_CASE_TEMPLATE("BitLinear::from_ternary: bad input is rejected with a clear error", T, float, double) {
  const Matrix<std::int8_t> codes = Matrix<std::int8_t>::Zero(3, 4);
  CHECK_THROWS_WITH_AS(BitLinear<T>::from_ternary(Matrix<std::int8_t>(0, 4), T(1)),
                       doctest::Contains("BitLinear::from_ternary: codes: empty (0x4)"), bitnet::shape_error);
  CHECK_THROWS_WITH_AS(BitLinear<T>::from_ternary(Matrix<std::int8_t>(2, 0), T(1)), doctest::Contains("empty (2x0)"),
                       bitnet::shape_error);
  CHECK_THROWS_WITH_AS(
      BitLinear<T>::from_ternary(Matrix<std::int8_t>::Zero(1, bitnet::max_in_features + 1), T(1)),
      doctest::Contains("codes: in_features 8388481 exceeds the exact-accumulation limit"), bitnet::shape_error);
  for (const int bad : {2, -2, 127, -128}) {
    CAPTURE(bad);
    Matrix<std::int8_t> wrong = codes;
    wrong(2, 1) = std::int8_t(bad);
    wrong(2, 3) = std::int8_t(bad);  // the first bad code is the one named
    CHECK_THROWS_WITH_AS(BitLinear<T>::from_ternary(wrong, T(1)),
                         doctest::Contains(("code " + std::to_string(bad) + " at row 2, column 1 is not -1, 0 or +1").c_str()),
                         bitnet::value_error);
  }
  for (const T bad : {T(0), -T(0), T(-1), std::numeric_limits<T>::infinity(), -std::numeric_limits<T>::infinity(),
                      std::numeric_limits<T>::quiet_NaN()}) {
    CAPTURE(bad);
    CHECK_THROWS_WITH_AS(BitLinear<T>::from_ternary(codes, bad), doctest::Contains("scale"), bitnet::value_error);
  }
  CHECK(BitLinear<T>::from_ternary(codes, std::numeric_limits<T>::denorm_min()).weight_scale() ==
        std::numeric_limits<T>::denorm_min());
  CHECK_THROWS_WITH_AS(BitLinear<T>::from_ternary(codes, T(1), Vector<T>::Ones(2)),
                       doctest::Contains("bias has 2 elements, the weight has 3 rows"), bitnet::shape_error);
  Vector<T> bad_bias = Vector<T>::Ones(3);
  bad_bias(2) = std::numeric_limits<T>::quiet_NaN();
  CHECK_THROWS_WITH_AS(BitLinear<T>::from_ternary(codes, T(1), bad_bias),
                       doctest::Contains("bias: non-finite value (nan) at index 2"), bitnet::value_error);
  bitnet::bitlinear_options options;
  options.rms_eps = -1;
  CHECK_THROWS_WITH_AS(BitLinear<T>::from_ternary(codes, T(1), std::nullopt, options), doctest::Contains("rms_eps"),
                       bitnet::value_error);
}

TEST_CASE_TEMPLATE("BitLinear::forward into a caller's matrix: same bits, storage reused, x may be y", T, float, double) {
  kernel_settings_guard guard;
  std::mt19937 rng(46);
  for (bool rms_norm : {false, true}) {
    bitnet::bitlinear_options options;
    options.rms_norm = rms_norm;
    const BitLinear<T> layer(reference::random_matrix<T>(40, 40, rng, 0.05), reference::random_matrix<T>(40, 1, rng),
                             options);
    const Matrix<T> x = reference::random_matrix<T>(5, 40, rng, 4.0);
    for (bitnet::isa which : runnable_isas()) {
      CAPTURE(bitnet::isa_name(which));
      CAPTURE(rms_norm);
      bitnet::force_isa(which);
      const Matrix<T> expected = layer.forward(x);
      Matrix<T> y(5, 40);
      const T* storage = y.data();
      layer.forward(x, y);
      CHECK(y == expected);
      CHECK(y.data() == storage);  // the right shape: written in place
      Matrix<T> wrong_shape(2, 3);
      layer.forward(x, wrong_shape);
      CHECK(wrong_shape == expected);
      Matrix<T> in_place = x;  // y is the input itself (a square layer)
      layer.forward(in_place, in_place);
      CHECK(in_place == expected);
      // an error leaves y as it was
      Matrix<T> bad = x;
      bad(3, 7) = std::numeric_limits<T>::quiet_NaN();
      Matrix<T> untouched = expected;
      CHECK_THROWS_WITH_AS(layer.forward(bad, untouched), doctest::Contains("non-finite value (nan) at row 3, column 7"),
                           bitnet::value_error);
      CHECK(untouched == expected);
    }
  }
}
