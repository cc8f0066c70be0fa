// The 1.6-bit storage (pack_base3.hpp, detail/kernels/base3.hpp, kernels_base3.hpp): the layout
// written out byte by byte, every kernel against the int32 reference, and BitLinear with storage
// base3 against the same layer in 2 bits, bit for bit.
#include <bitnet/bit_linear.hpp>
#include <bitnet/hf.hpp>
#include <bitnet/kernels_base3.hpp>
#include <bitnet/pack.hpp>
#include <bitnet/pack_base3.hpp>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <limits>
#include <random>
#include <utility>
#include <vector>

#include <doctest/doctest.h>

#include "kernel_isas.hpp"

using bitnet::Index;
using bitnet::isa;
using bitnet::Matrix;
using bitnet::packed_base3;
using bitnet::weight_storage;

namespace {

Matrix<std::int8_t> random_int8(Index rows, Index cols, int lo, int hi, std::mt19937& rng) {
  std::uniform_int_distribution<int> dist(lo, hi);
  Matrix<std::int8_t> m(rows, cols);
  for (Index i = 0; i < m.size(); ++i) m.data()[i] = std::int8_t(dist(rng));
  return m;
}

// sum_k x[b, k] * w[o, k] in int64, written out with no shared code.
std::vector<std::int32_t> naive_product(const Matrix<std::int8_t>& w, const Matrix<std::int8_t>& x) {
  std::vector<std::int32_t> acc(std::size_t(x.rows() * w.rows()));
  for (Index b = 0; b < x.rows(); ++b)
    for (Index o = 0; o < w.rows(); ++o) {
      std::int64_t sum = 0;
      for (Index k = 0; k < w.cols(); ++k) sum += std::int64_t(x(b, k)) * std::int64_t(w(o, k));
      acc[std::size_t(b * w.rows() + o)] = std::int32_t(sum);
    }
  return acc;
}

// One kernel call the way BitLinear makes it: zero-padded rows of a multiple of 64 columns, their sums.
std::vector<std::int32_t> run_base3(isa which, int threads, const packed_base3& packed, const Matrix<std::int8_t>& x) {
  const Index batch = x.rows(), stride = (packed.padded_cols() + 63) / 64 * 64;
  bitnet::detail::aligned_vector<std::int8_t> xq(std::size_t(batch * stride), 0);
  std::vector<std::int32_t> sums(std::size_t(batch), 0);
  for (Index b = 0; b < batch; ++b)
    for (Index k = 0; k < x.cols(); ++k) {
      xq[std::size_t(b * stride + k)] = x(b, k);
      sums[std::size_t(b)] += x(b, k);
    }
  std::vector<std::int32_t> acc(std::size_t(batch * packed.rows()), std::numeric_limits<std::int32_t>::min());
  const bitnet::detail::gemm_args args{packed.data(), packed.col_tiles(), packed.rows(), xq.data(),
                                       stride,        sums.data(),         batch,          acc.data()};
  bitnet::detail::ternary_gemm_base3(which, args, packed.row_blocks(), threads, 0.0);
  CHECK(bitnet::last_isa() == which);
  return acc;
}

void check_all_base3(const Matrix<std::int8_t>& w, const Matrix<std::int8_t>& x) {
  const packed_base3 packed(w);
  const std::vector<std::int32_t> expected = naive_product(w, x);
  for (isa which : kernel_isas::runnable_isas())
    for (int threads : {1, 2}) {
      CAPTURE(bitnet::isa_name(which));
      CAPTURE(threads);
      CHECK(run_base3(which, threads, packed, x) == expected);
    }
}

}  // namespace

TEST_CASE("base3: pack then unpack is the identity for ragged shapes; 1.6 bits per weight") {
  std::mt19937 rng(31);
  for (Index rows : {1, 15, 16, 17, 40})
    for (Index cols : {1, 4, 19, 20, 21, 63, 64, 100, 2560, 6912}) {
      CAPTURE(rows);
      CAPTURE(cols);
      const Matrix<std::int8_t> codes = random_int8(rows, cols, -1, 1, rng);
      const packed_base3 packed(codes);
      CHECK(packed.unpack() == codes);
      CHECK(packed.padded_cols() == (cols + 19) / 20 * 20);
      CHECK(packed.size_bytes() == std::size_t(packed.padded_rows() * packed.padded_cols() / 5));
    }
  const packed_base3 model_shape(Matrix<std::int8_t>::Zero(2560, 2560));
  CHECK(double(model_shape.size_bytes()) * 8.0 / (2560.0 * 2560.0) == 1.6);
}

// The layout of pack_base3.hpp, checked byte by byte: a kernel and the writer must agree.
TEST_CASE("base3: each weight is the documented digit of the documented byte; padding is weight 0") {
  std::mt19937 rng(32);
  const Index rows = 21, cols = 47;  // two row blocks, three tiles, both padded
  const Matrix<std::int8_t> codes = random_int8(rows, cols, -1, 1, rng);
  const packed_base3 packed(codes);
  const Index tiles = 3;
  REQUIRE(packed.col_tiles() == tiles);
  REQUIRE(packed.size_bytes() == std::size_t(2 * tiles * 64));
  for (Index r = 0; r < 32; ++r)
    for (Index k = 0; k < tiles * 20; ++k) {
      const std::size_t byte = std::size_t((r / 16 * tiles + k / 20) * 64 + r % 16 * 4 + k % 4);
      int digit = packed.data()[byte];
      for (Index p = 0; p < k % 20 / 4; ++p) digit /= 3;
      const int expected = r < rows && k < cols ? codes(r, k) + 1 : 1;
      CAPTURE(r);
      CAPTURE(k);
      CHECK(digit % 3 == expected);
    }
  for (std::size_t i = 0; i < packed.size_bytes(); ++i) CHECK(packed.data()[i] <= 242);
}

TEST_CASE("base3: packing refuses codes outside {-1, 0, 1} and empty matrices") {
  Matrix<std::int8_t> codes = Matrix<std::int8_t>::Zero(3, 30);
  codes(2, 23) = 2;
  CHECK_THROWS_WITH_AS(packed_base3{codes}, "packed_base3: code 2 at row 2, column 23 is not -1, 0 or +1",
                       bitnet::value_error);
  CHECK_THROWS_AS(packed_base3{Matrix<std::int8_t>(0, 4)}, bitnet::shape_error);
}

TEST_CASE("base3: the decode table holds the four low digits of every r < 81 as a 2-bit byte") {
  for (int c0 = 0; c0 < 3; ++c0)
    for (int c1 = 0; c1 < 3; ++c1)
      for (int c2 = 0; c2 < 3; ++c2)
        for (int c3 = 0; c3 < 3; ++c3)
          CHECK(bitnet::detail::base3_low_digits[std::size_t(c0 + 3 * c1 + 9 * c2 + 27 * c3)] ==
                (c0 | c1 << 2 | c2 << 4 | c3 << 6));
  // 81 * its inverse is 1 modulo 2^32 (the AVX-512 kernel's exact division of plane 4).
  CHECK(std::uint32_t(81u * std::uint32_t(bitnet::detail::inverse_of_81)) == 1u);
}

TEST_CASE("base3 kernels: every ISA equals the int32 reference on ragged shapes") {
  std::mt19937 rng(33);
  // 1..3 tiles and their edges, an odd number of tiles (the AVX-512 loop takes pairs), the AVX2
  // int16 widening period (8 tiles: 160 columns), the model sizes.
  const Index ins[] = {1, 2, 4, 19, 20, 21, 39, 40, 41, 60, 64, 127, 159, 160, 161, 180, 321, 640, 1023, 2560, 6912};
  for (Index in : ins)
    for (Index out : {1, 3, 16, 17, 33, 83})
      for (Index batch : {1, 2, 3, 5, 16, 17, 35})
        if (in * out * batch <= 1'000'000) {
          CAPTURE(in);
          CAPTURE(out);
          CAPTURE(batch);
          check_all_base3(random_int8(out, in, -1, 1, rng), random_int8(batch, in, -128, 127, rng));
        }
}

TEST_CASE("base3 kernels: worst-case values (all +-127, all -128; all +1, all -1, alternating weights)") {
  std::mt19937 rng(34);
  for (Index in : {20, 160, 2049, 6912}) {
    Matrix<std::int8_t> w(6, in);
    w.row(0).setConstant(1);
    w.row(1).setConstant(-1);
    w.row(2).setZero();
    for (Index k = 0; k < in; ++k) w(3, k) = std::int8_t(k % 2 ? 1 : -1);
    w.bottomRows(2) = random_int8(2, in, -1, 1, rng);
    for (int value : {127, -127, -128}) {
      CAPTURE(in);
      CAPTURE(value);
      for (Index batch : {1, 2, 5, 16}) check_all_base3(w, Matrix<std::int8_t>::Constant(batch, in, std::int8_t(value)));
      const std::vector<std::int32_t> acc =
          run_base3(bitnet::best_isa(), 1, packed_base3(w), Matrix<std::int8_t>::Constant(1, in, std::int8_t(value)));
      CHECK(acc[0] == value * std::int32_t(in));  // by hand: row 0 sums x, row 1 sums -x
      CHECK(acc[1] == -value * std::int32_t(in));
      CHECK(acc[2] == 0);
    }
  }
}

TEST_CASE("base3 kernels: exact across the AVX-512 kernel's runs of 2^14 tiles and at max_in_features") {
  // Plane 4 is summed as 81 c (up to 162 x 128 x 4 per tile): runs of 2^14 tiles stay below 2^31.
  // Codes all 2 (weights +1) and activations -128 give the largest magnitudes in every plane.
  for (Index in : {Index{20} * (Index{1} << 14) + 40, bitnet::max_in_features}) {
    Matrix<std::int8_t> w(3, in);
    w.row(0).setConstant(1);
    w.row(1).setConstant(-1);
    for (Index k = 0; k < in; ++k) w(2, k) = std::int8_t(k % 3 - 1);
    const packed_base3 packed(w);
    for (int value : {-128, 127}) {
      CAPTURE(in);
      CAPTURE(value);
      const Matrix<std::int8_t> x = Matrix<std::int8_t>::Constant(1, in, std::int8_t(value));
      std::int64_t alternating = 0;
      for (Index k = 0; k < in; ++k) alternating += std::int64_t(value) * (k % 3 - 1);
      for (isa which : kernel_isas::runnable_isas()) {
        if (in == bitnet::max_in_features && which != bitnet::best_isa() && which != isa::scalar) continue;
        CAPTURE(bitnet::isa_name(which));
        const std::vector<std::int32_t> acc = run_base3(which, 1, packed, x);
        CHECK(acc[0] == std::int64_t(value) * in);
        CHECK(acc[1] == -std::int64_t(value) * in);
        CHECK(acc[2] == alternating);
      }
    }
  }
}

TEST_CASE("base3 kernels: batch 1 quantized in every part gives the reference's bits at every thread count") {
  namespace detail = bitnet::detail;
  // Per output row: the product and the scale the row's part used, and how often it came by.
  struct recorded_rows {
    const std::int32_t* acc;
    std::vector<std::int32_t> products;
    std::vector<float> scales;
    std::vector<int> visits;
    static void run(const void* self, const void* token_scales, Index begin, Index end) noexcept {
      auto& r = *const_cast<recorded_rows*>(static_cast<const recorded_rows*>(self));
      for (Index o = begin; o < end; ++o) {
        r.products[std::size_t(o)] = r.acc[o];
        r.scales[std::size_t(o)] = token_scales ? *static_cast<const float*>(token_scales) : -2.0f;
        ++r.visits[std::size_t(o)];
      }
    }
  };
  std::mt19937 rng(62);
  std::normal_distribution<float> normal(0.0f, 3.0f);
  // Ragged: rows past a block, columns past a 20-column tile; min_work 0 splits 5 and 17 row blocks.
  for (const auto& shape : {std::pair<Index, Index>{70, 301}, {257, 2047}, {33, 20}}) {
    const Index out = shape.first, in = shape.second;  // not a structured binding: clang 14 cannot capture one
    const Matrix<std::int8_t> w = random_int8(out, in, -1, 1, rng);
    const packed_base3 packed(w);
    const Index stride = (packed.padded_cols() + 63) / 64 * 64;
    Matrix<float> x(1, in);
    for (Index k = 0; k < in; ++k) x(0, k) = normal(rng);
    const bitnet::quantized_activations<float> expected_codes = bitnet::quantize_activations(x);
    const std::vector<std::int32_t> expected = naive_product(w, expected_codes.values);
    std::vector<std::int32_t> acc(static_cast<std::size_t>(out));
    for (isa which : kernel_isas::runnable_isas())
      for (int threads : {1, 2, 3}) {
        CAPTURE(out);
        CAPTURE(in);
        CAPTURE(bitnet::isa_name(which));
        CAPTURE(threads);
        const detail::token_quantization<float> token{which, x.data(), in, stride, 0, false};
        const detail::gemm_args args{packed.data(), packed.col_tiles(), out, nullptr, stride, nullptr, 1, acc.data()};
        recorded_rows seen{acc.data(), std::vector<std::int32_t>(std::size_t(out), -1),
                           std::vector<float>(std::size_t(out), -1.0f), std::vector<int>(std::size_t(out), 0)};
        std::fill(acc.begin(), acc.end(), std::numeric_limits<std::int32_t>::min());
        CHECK(detail::ternary_gemm_base3(which, args, packed.row_blocks(), threads, 0.0, {recorded_rows::run, &seen},
                                         token.quantizer()));
        CHECK(bitnet::last_isa() == which);
        CHECK(seen.products == expected);
        CHECK(seen.visits == std::vector<int>(std::size_t(out), 1));
        CHECK(seen.scales == std::vector<float>(std::size_t(out), expected_codes.scales(0)));

        for (float bad : {std::numeric_limits<float>::quiet_NaN(), std::numeric_limits<float>::infinity()})
          for (Index position : {Index{0}, in / 2, in - 1}) {
            CAPTURE(bad);
            CAPTURE(position);
            Matrix<float> x_bad = x;
            x_bad(0, position) = bad;
            const detail::token_quantization<float> bad_token{which, x_bad.data(), in, stride, 0, false};
            recorded_rows untouched{acc.data(), std::vector<std::int32_t>(std::size_t(out), -1),
                                    std::vector<float>(std::size_t(out), -1.0f), std::vector<int>(std::size_t(out), 0)};
            CHECK_FALSE(detail::ternary_gemm_base3(which, args, packed.row_blocks(), threads, 0.0,
                                                   {recorded_rows::run, &untouched}, bad_token.quantizer()));
            CHECK(untouched.visits == std::vector<int>(std::size_t(out), 0));
          }
      }
  }
}

TEST_CASE("base3 BitLinear: forward is bit-identical to the 2-bit layer on every ISA and thread count") {
  std::mt19937 rng(35);
  std::normal_distribution<float> normal(0.0f, 1.0f);
  for (Index in : {7, 20, 64, 130, 2560})
    for (Index out : {5, 16, 33}) {
      Matrix<float> weight(out, in), x(9, in);
      for (Index i = 0; i < weight.size(); ++i) weight.data()[i] = normal(rng);
      for (Index i = 0; i < x.size(); ++i) x.data()[i] = 3.0f * normal(rng);
      bitnet::Vector<float> bias(out);
      for (Index i = 0; i < out; ++i) bias[i] = normal(rng);
      for (bool rms_norm : {false, true}) {
        const bitnet::BitLinear<float> two_bit(weight, bias, {.rms_norm = rms_norm});
        const bitnet::BitLinear<float> base3(weight, bias, {.rms_norm = rms_norm, .storage = weight_storage::base3});
        REQUIRE(base3.ternary_weight() == two_bit.ternary_weight());
        REQUIRE(base3.weight_scale() == two_bit.weight_scale());
        for (isa which : kernel_isas::runnable_isas()) {
          if (!bitnet::isa_supported(which)) continue;  // BitLinear runs what the CPU has
          bitnet::force_isa(which);
          for (int threads : {1, 2}) {
            bitnet::set_num_threads(threads);
            for (Index batch : {1, 2, 9}) {
              CAPTURE(in);
              CAPTURE(out);
              CAPTURE(bitnet::isa_name(which));
              CAPTURE(threads);
              CAPTURE(batch);
              const Matrix<float> rows = x.topRows(batch);
              const Matrix<float> expected = two_bit.forward(rows), y = base3.forward(rows);
              CHECK(std::memcmp(expected.data(), y.data(), sizeof(float) * std::size_t(expected.size())) == 0);
            }
          }
        }
        bitnet::clear_forced_isa();
        bitnet::set_num_threads(0);
      }
    }
}

TEST_CASE("base3 BitLinear: from_ternary round trip, set_weight, memory, and what it refuses") {
  std::mt19937 rng(36);
  const Matrix<std::int8_t> codes = random_int8(48, 2560, -1, 1, rng);
  const bitnet::bitlinear_options base3{.storage = weight_storage::base3};
  auto layer = bitnet::BitLinear<float>::from_ternary(codes, 0.5f, std::nullopt, base3);
  CHECK(layer.ternary_weight() == codes);
  CHECK(layer.weight_scale() == 0.5f);
  CHECK(layer.in_features() == 2560);
  CHECK(layer.out_features() == 48);
  CHECK(layer.base3_weight().unpack() == codes);
  CHECK(layer.packed_bytes() == std::size_t(48 * 2560 / 5));
  // <= 1.65 bits per weight with the scale (and nothing else held).
  CHECK(double(layer.memory_bytes() + sizeof(float)) * 8.0 / double(codes.size()) <= 1.65);
  CHECK_THROWS_AS((void)layer.packed_weight(), bitnet::state_error);
  CHECK_THROWS_AS((void)bitnet::BitLinear<float>::from_ternary(codes, 0.5f).base3_weight(), bitnet::state_error);

  // set_weight keeps the storage; the codes are those of the 2-bit layer with the same weights.
  Matrix<float> weight(48, 2560);
  std::normal_distribution<float> normal(0.0f, 1.0f);
  for (Index i = 0; i < weight.size(); ++i) weight.data()[i] = normal(rng);
  layer.set_weight(weight);
  CHECK(layer.options().storage == weight_storage::base3);
  CHECK(layer.ternary_weight() == bitnet::BitLinear<float>(weight).ternary_weight());
  CHECK(layer.base3_weight() == packed_base3(layer.ternary_weight()));

  // Frozen scales (weight_scale_update::frozen): set_weight quantizes against the layer's scale and
  // keeps base 3; the codes and outputs are the 2-bit frozen layer's.
  {
    bitnet::bitlinear_options frozen = base3;
    frozen.scale_update = bitnet::weight_scale_update::frozen;
    auto kept = bitnet::BitLinear<float>::from_ternary(codes, 0.5f, std::nullopt, frozen);
    frozen.storage = weight_storage::two_bit;
    auto kept_two_bit = bitnet::BitLinear<float>::from_ternary(codes, 0.5f, std::nullopt, frozen);
    kept.set_weight(weight);
    kept_two_bit.set_weight(weight);
    CHECK(kept.weight_scale() == 0.5f);
    CHECK(kept.base3_weight() == packed_base3(kept_two_bit.ternary_weight()));
    Matrix<float> probe(2, 2560);
    for (Index i = 0; i < probe.size(); ++i) probe.data()[i] = normal(rng);
    const Matrix<float> a = kept.forward(probe), b = kept_two_bit.forward(probe);
    CHECK(std::memcmp(a.data(), b.data(), sizeof(float) * std::size_t(a.size())) == 0);
  }

  // 2 bits -> base 3 -> 2 bits through from_ternary / ternary_weight (how a loaded layer changes storage).
  bitnet::Vector<float> bias(48);
  for (Index i = 0; i < 48; ++i) bias[i] = normal(rng);
  const bitnet::BitLinear<float> two_bit(weight, bias);
  const auto converted =
      bitnet::BitLinear<float>::from_ternary(two_bit.ternary_weight(), two_bit.weight_scale(), two_bit.bias(), base3);
  const auto back = bitnet::BitLinear<float>::from_ternary(converted.ternary_weight(), converted.weight_scale(),
                                                           converted.bias());
  CHECK(back.packed_weight() == two_bit.packed_weight());
  CHECK(back.weight_scale() == two_bit.weight_scale());
  Matrix<float> x(3, 2560);
  for (Index i = 0; i < x.size(); ++i) x.data()[i] = normal(rng);
  const Matrix<float> expected = two_bit.forward(x), y = converted.forward(x);
  CHECK(std::memcmp(expected.data(), y.data(), sizeof(float) * std::size_t(y.size())) == 0);

  // In files: transformers' 2-bit form holds the codes and the scale; read back with base-3 options
  // (what load_state_dict passes from the slot's layer), the layer is base 3 again with the same
  // codes, scale, bias and outputs (bitlinear convention: the autobitlinear one stores b * s, whose
  // round trip may round the bias). The base-3 file form: tests/test_hf_base3.cpp.
  const bitnet::hf::packed_layer<float> file =
      bitnet::hf::to_packed(converted, bitnet::hf::scale_convention::bitlinear, weight_storage::two_bit);
  CHECK(file.storage == weight_storage::two_bit);
  const bitnet::BitLinear<float> loaded = bitnet::hf::to_bit_linear(file, base3);
  CHECK(loaded.options().storage == weight_storage::base3);
  CHECK(loaded.base3_weight() == converted.base3_weight());
  CHECK(loaded.weight_scale() == converted.weight_scale());
  const Matrix<float> reloaded = loaded.forward(x);
  CHECK(std::memcmp(expected.data(), reloaded.data(), sizeof(float) * std::size_t(y.size())) == 0);

  // Group- and row-scaled layers keep pack.hpp's 2-bit tiles: refused by name.
  bitnet::bitlinear_options grouped = base3;
  grouped.weight_scales = bitnet::weight_scaling::per_group;
  grouped.group_size = 128;
  CHECK_THROWS_WITH_AS(bitnet::BitLinear<float>(weight, std::nullopt, grouped),
                       doctest::Contains("storage base3 needs per_tensor weight scales, got per_group"),
                       bitnet::value_error);
  bitnet::bitlinear_options per_row = base3;
  per_row.weight_scales = bitnet::weight_scaling::per_row;
  CHECK_THROWS_WITH_AS(bitnet::BitLinear<float>(weight, std::nullopt, per_row),
                       doctest::Contains("storage base3 needs per_tensor weight scales, got per_row"),
                       bitnet::value_error);
  bitnet::bitlinear_options bad = base3;
  bad.storage = weight_storage(7);
  CHECK_THROWS_AS(bitnet::BitLinear<float>(weight, std::nullopt, bad), bitnet::value_error);
}
