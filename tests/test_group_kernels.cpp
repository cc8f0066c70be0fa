// The group-scaled kernels (issue 20): virtual blocks of G columns (kernels.hpp, gemm_args::groups),
// per-token and per-block activation quantization with per-group code sums, and the grouped
// rescale. Every ISA and thread count against naive references written here: per-group int32 dot
// products on the plain codes, the quantization formula written out (tests/reference.hpp), and the
// double formula of docs/quantization.md ("Group scales: kernels").
#include <bitnet/kernels.hpp>
#include <bitnet/pack.hpp>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <mutex>
#include <random>
#include <utility>
#include <vector>

#include <doctest/doctest.h>

#include "kernel_isas.hpp"
#include "reference.hpp"

using bitnet::Index;
using bitnet::isa;
using bitnet::Matrix;
using kernel_isas::runnable_isas;

namespace {

Index round_up(Index n, Index m) { return (n + m - 1) / m * m; }

struct grouped_shape {
  Index out, in, group;
  Index padded_cols() const { return round_up(in, std::max<Index>(64, group)); }
  Index kernel_groups() const { return padded_cols() / group; }
  Index groups() const { return (in + group - 1) / group; }
  Index row_blocks() const { return (out + 15) / 16; }
  Index virtual_rows() const { return row_blocks() * kernel_groups() * 16; }
};

// The ragged grid: a last group of 44 columns (300 = 2 x 128 + 44); G = 32 with 70 columns,
// padded to 128 = 4 kernel groups of which the last is all padding; one group of 256; 64-column
// groups with a 2-column tail; G = 32 whole; rows 1 past a block, a block and a half, 3 blocks.
const grouped_shape ragged_grid[] = {{19, 300, 128}, {33, 70, 32}, {17, 256, 256}, {5, 130, 64}, {48, 96, 32}};

Matrix<std::int8_t> random_int8(Index rows, Index cols, int lo, int hi, std::mt19937& rng) {
  std::uniform_int_distribution<int> dist(lo, hi);
  Matrix<std::int8_t> m(rows, cols);
  for (Index i = 0; i < m.size(); ++i) m.data()[i] = std::int8_t(dist(rng));
  return m;
}

// acc in the grouped call's layout: token b, row o, group j at b * virtual_rows + (o / 16 *
// kernel_groups + j) * 16 + o % 16, the plain dot product over group j's real columns; padding rows
// and all-padding groups 0.
std::vector<std::int32_t> reference_group_products(const grouped_shape& s, const Matrix<std::int8_t>& w,
                                                   const Matrix<std::int8_t>& x) {
  std::vector<std::int32_t> acc(std::size_t(x.rows() * s.virtual_rows()), 0);
  for (Index b = 0; b < x.rows(); ++b)
    for (Index o = 0; o < s.out; ++o)
      for (Index j = 0; j < s.groups(); ++j) {
        std::int32_t sum = 0;
        for (Index k = j * s.group; k < std::min((j + 1) * s.group, s.in); ++k) sum += std::int32_t(x(b, k)) * w(o, k);
        acc[std::size_t(b * s.virtual_rows() + (o / 16 * s.kernel_groups() + j) * 16 + o % 16)] = sum;
      }
  return acc;
}

// One grouped product the way BitLinear makes it: activations in zero-padded aligned rows, their
// per-group sums, every virtual block of every row block. Every accumulator starts as a sentinel,
// so a lane the kernel forgets fails the comparison.
std::vector<std::int32_t> run_grouped(isa which, int threads, const grouped_shape& s, const bitnet::packed_ternary& packed,
                                      const Matrix<std::int8_t>& x) {
  const Index batch = x.rows(), stride = packed.padded_cols(), kernel_groups = s.kernel_groups();
  REQUIRE(stride == s.padded_cols());
  bitnet::detail::aligned_vector<std::int8_t> xq(std::size_t(batch * stride), 0);
  std::vector<std::int32_t> sums(std::size_t(batch * kernel_groups), 0);
  for (Index b = 0; b < batch; ++b)
    for (Index k = 0; k < s.in; ++k) {
      xq[std::size_t(b * stride + k)] = x(b, k);
      sums[std::size_t(b * kernel_groups + k / s.group)] += x(b, k);
    }
  std::vector<std::int32_t> acc(std::size_t(batch * s.virtual_rows()), std::numeric_limits<std::int32_t>::min());
  bitnet::detail::gemm_args args{packed.data(), s.group / 16, s.virtual_rows(), xq.data(), stride,
                                 sums.data(),   batch,        acc.data()};
  args.groups = kernel_groups;
  bitnet::detail::ternary_gemm(which, args, packed.row_blocks() * kernel_groups, threads, 0.0);
  CHECK(bitnet::last_isa() == which);
  return acc;
}

void check_grouped_kernels(const grouped_shape& s, const Matrix<std::int8_t>& w, const Matrix<std::int8_t>& x) {
  const bitnet::packed_ternary packed(w, std::max<Index>(64, s.group));
  const std::vector<std::int32_t> expected = reference_group_products(s, w, x);
  for (isa which : runnable_isas())
    for (int threads : {1, 2}) {
      CAPTURE(bitnet::isa_name(which));
      CAPTURE(threads);
      CHECK(run_grouped(which, threads, s, packed, x) == expected);
    }
}

// Per-token or per-block quantization written out: reference::activation_scale over the row or
// over the block's real columns, then clamp(round_half_even(x s), -128, 127).
struct reference_quantized {
  Matrix<std::int8_t> codes;  // batch x in
  std::vector<float> scales;  // batch, or batch x groups
};

reference_quantized reference_quantize(const grouped_shape& s, const Matrix<float>& x, bool per_block) {
  reference_quantized r{Matrix<std::int8_t>(x.rows(), s.in), {}};
  for (Index b = 0; b < x.rows(); ++b)
    for (Index j = 0; j < (per_block ? s.groups() : 1); ++j) {
      const Index first = per_block ? j * s.group : 0, width = per_block ? std::min(s.group, s.in - first) : s.in;
      const Matrix<float> unit = x.block(b, first, 1, width);
      const float scale = reference::activation_scale(unit, 0);
      r.scales.push_back(scale);
      for (Index k = 0; k < width; ++k)
        r.codes(b, first + k) =
            std::int8_t(reference::clamp(reference::round_half_even(unit(0, k) * scale), -128.0f, 127.0f));
    }
  return r;
}

// y of the numerics contract, from the reference codes and the plain per-group products.
Matrix<float> reference_grouped_forward(const grouped_shape& s, const Matrix<std::int8_t>& w, const Matrix<float>& d,
                                        const std::vector<float>& bias, const reference_quantized& q, bool per_block) {
  Matrix<float> y(q.codes.rows(), s.out);
  for (Index b = 0; b < q.codes.rows(); ++b)
    for (Index o = 0; o < s.out; ++o) {
      double sum = 0.0;
      for (Index j = 0; j < s.groups(); ++j) {
        std::int32_t acc = 0;
        for (Index k = j * s.group; k < std::min((j + 1) * s.group, s.in); ++k)
          acc += std::int32_t(q.codes(b, k)) * w(o, k);
        const double term = double(acc) * double(d(o, j));
        sum += per_block ? term / double(q.scales[std::size_t(b * s.groups() + j)]) : term;
      }
      if (!per_block) sum /= double(q.scales[std::size_t(b)]);
      y(b, o) = float(sum) + bias[std::size_t(o)];
    }
  return y;
}

// quantize_rows_grouped, the grouped product and the grouped_rescale epilogue, as BitLinear chains
// them; y starts as NaN so a row the epilogue misses fails.
Matrix<float> grouped_forward(isa which, int threads, const grouped_shape& s, const bitnet::packed_ternary& packed,
                              const Matrix<float>& d, const std::vector<float>& bias, const Matrix<float>& x,
                              bool per_block) {
  namespace detail = bitnet::detail;
  const Index batch = x.rows(), stride = packed.padded_cols(), kernel_groups = s.kernel_groups();
  detail::aligned_vector<std::int8_t> xq(std::size_t(batch * stride), 99);
  std::vector<float> scales(std::size_t(batch * (per_block ? s.groups() : 1)));
  std::vector<std::int32_t> sums(std::size_t(batch * kernel_groups), 12345);
  REQUIRE(detail::quantize_rows_grouped(which, x.data(), s.in, batch, s.in, s.group, per_block, xq.data(), stride,
                                        scales.data(), sums.data(), threads));
  std::vector<std::int32_t> acc(std::size_t(batch * s.virtual_rows()));
  Matrix<float> y = Matrix<float>::Constant(batch, s.out, std::numeric_limits<float>::quiet_NaN());
  const detail::grouped_rescale<float> rescale{which, acc.data(), s.virtual_rows(), batch, s.out, kernel_groups,
                                               s.groups(), d.data(), scales.data(), per_block, bias.data(), y.data(),
                                               s.out};
  detail::gemm_args args{packed.data(), s.group / 16, s.virtual_rows(), xq.data(), stride, sums.data(), batch, acc.data()};
  args.groups = kernel_groups;
  detail::ternary_gemm(which, args, packed.row_blocks() * kernel_groups, threads, 0.0, rescale.epilogue());
  return y;
}

}  // namespace

TEST_CASE("group kernels: every ISA equals the per-group reference on the ragged grid, batch 1 to 17 and 33") {
  std::mt19937 rng(20);
  for (const grouped_shape& s : ragged_grid) {
    const Matrix<std::int8_t> w = random_int8(s.out, s.in, -1, 1, rng);
    for (Index batch = 1; batch <= 33; batch = batch < 17 ? batch + 1 : 33) {
      CAPTURE(s.out);
      CAPTURE(s.in);
      CAPTURE(s.group);
      CAPTURE(batch);
      check_grouped_kernels(s, w, random_int8(batch, s.in, -128, 127, rng));
      if (batch == 33) break;
    }
  }
}

TEST_CASE("group kernels: worst-case values (codes all +1 / all -1, activations all -128 / 127)") {
  std::mt19937 rng(21);
  for (const grouped_shape& s : {grouped_shape{20, 300, 128}, grouped_shape{20, 70, 32}, grouped_shape{4, 512, 256}}) {
    Matrix<std::int8_t> w(s.out, s.in);
    w.setConstant(1);
    w.row(1).setConstant(-1);
    w.row(2).setZero();
    for (Index k = 0; k < s.in; ++k) w(3, k) = std::int8_t(k % 2 ? 1 : -1);
    if (s.out > 4) w.bottomRows(s.out - 4) = random_int8(s.out - 4, s.in, -1, 1, rng);
    for (int value : {-128, 127})
      for (Index batch : {1, 3, 16, 17}) {
        CAPTURE(s.in);
        CAPTURE(s.group);
        CAPTURE(value);
        CAPTURE(batch);
        const Matrix<std::int8_t> x = Matrix<std::int8_t>::Constant(batch, s.in, std::int8_t(value));
        check_grouped_kernels(s, w, x);
        // and by hand: row 0 of group j sums its real columns' x, row 1 their -x, row 2 nothing
        const std::vector<std::int32_t> acc =
            run_grouped(bitnet::best_isa(), 1, s, bitnet::packed_ternary(w, std::max<Index>(64, s.group)), x);
        for (Index j = 0; j < s.kernel_groups(); ++j) {
          const std::int32_t width = std::int32_t(std::clamp<Index>(s.in - j * s.group, 0, s.group));
          CHECK(acc[std::size_t(j * 16)] == value * width);
          CHECK(acc[std::size_t(j * 16 + 1)] == -value * width);
          CHECK(acc[std::size_t(j * 16 + 2)] == 0);
        }
      }
  }
}

TEST_CASE("group kernels: the split gives each thread whole row blocks, every row to the epilogue once") {
  struct recorder {
    std::mutex mutex;
    std::vector<std::pair<Index, Index>> ranges;
    static void run(const void* self, Index begin, Index end) noexcept {
      auto& r = *const_cast<recorder*>(static_cast<const recorder*>(self));
      const std::lock_guard<std::mutex> lock(r.mutex);
      r.ranges.emplace_back(begin, end);
    }
  };
  std::mt19937 rng(22);
  const grouped_shape s{70, 300, 128};  // 5 row blocks of 3 kernel groups: 15 virtual blocks
  const bitnet::packed_ternary packed(random_int8(s.out, s.in, -1, 1, rng), 128);
  for (isa which : runnable_isas())
    for (Index batch : {1, 16})
      for (int threads : {2, 3}) {
        CAPTURE(bitnet::isa_name(which));
        CAPTURE(batch);
        CAPTURE(threads);
        const Matrix<std::int8_t> x = random_int8(batch, s.in, -128, 127, rng);
        bitnet::detail::aligned_vector<std::int8_t> xq(std::size_t(batch * packed.padded_cols()), 0);
        for (Index b = 0; b < batch; ++b)
          for (Index k = 0; k < s.in; ++k) xq[std::size_t(b * packed.padded_cols() + k)] = x(b, k);
        std::vector<std::int32_t> sums(std::size_t(batch * 3), 0), acc(std::size_t(batch * s.virtual_rows()));
        bitnet::detail::gemm_args args{packed.data(), 8,           s.virtual_rows(), xq.data(), packed.padded_cols(),
                                       sums.data(),   batch,       acc.data()};
        args.groups = 3;
        recorder seen;
        bitnet::detail::ternary_gemm(which, args, 15, threads, 0.0, {recorder::run, &seen});
        std::sort(seen.ranges.begin(), seen.ranges.end());
        REQUIRE(!seen.ranges.empty());
        CHECK(seen.ranges.size() == std::size_t(std::min(threads, 3)));  // 5 blocks in parts of 2 (AMX: pairs) or 2 / 1
        CHECK(seen.ranges.front().first == 0);
        CHECK(seen.ranges.back().second == 80);  // the padded rows of the last block: the epilogue clamps
        for (std::size_t i = 0; i < seen.ranges.size(); ++i) {
          CHECK(seen.ranges[i].first % (which == isa::amx && batch >= 16 ? 32 : 16) == 0);
          if (i > 0) CHECK(seen.ranges[i].first == seen.ranges[i - 1].second);
        }
      }
}

TEST_CASE("group kernels: per-token and per-block quantization, scales and group sums, every ISA and thread count") {
  std::mt19937 rng(23);
  // 40 x 4000 values: enough for quantize_rows_grouped to use 2 threads.
  for (const grouped_shape& s : {grouped_shape{1, 4000, 128}, grouped_shape{1, 70, 32}, grouped_shape{1, 300, 256}}) {
    const Index batch = s.in > 1000 ? 40 : 5;
    Matrix<float> x = reference::random_matrix<float>(batch, s.in, rng, 2.0);
    x(0, std::min<Index>(5, s.in - 1)) = 300.0f;  // an outlier: its block's scale differs from the others
    x(batch - 1, s.in - 1) = 0.5f * 127.0f / reference::activation_scale<float>(x.block(batch - 1, 0, 1, s.in), 0);
    for (bool per_block : {false, true}) {
      const reference_quantized expected = reference_quantize(s, x, per_block);
      for (isa which : runnable_isas())
        for (int threads : {1, 2}) {
          CAPTURE(s.in);
          CAPTURE(s.group);
          CAPTURE(per_block);
          CAPTURE(bitnet::isa_name(which));
          CAPTURE(threads);
          const Index stride = s.padded_cols(), kernel_groups = s.kernel_groups();
          bitnet::detail::aligned_vector<std::int8_t> q(std::size_t(batch * stride), 99);
          std::vector<float> scales(expected.scales.size(), -1.0f);
          std::vector<std::int32_t> sums(std::size_t(batch * kernel_groups), 12345);
          REQUIRE(bitnet::detail::quantize_rows_grouped(which, x.data(), s.in, batch, s.in, s.group, per_block,
                                                        q.data(), stride, scales.data(), sums.data(), threads));
          CHECK(scales == expected.scales);
          bool codes = true, padding = true, group_sums = true;
          for (Index b = 0; b < batch; ++b) {
            for (Index k = 0; k < stride; ++k) {
              const std::int8_t got = q[std::size_t(b * stride + k)];
              if (k < s.in) codes = codes && got == expected.codes(b, k);
              else padding = padding && got == 0;
            }
            for (Index j = 0; j < kernel_groups; ++j) {
              std::int32_t sum = 0;
              for (Index k = j * s.group; k < std::min((j + 1) * s.group, s.in); ++k) sum += expected.codes(b, k);
              group_sums = group_sums && sums[std::size_t(b * kernel_groups + j)] == sum;
            }
          }
          CHECK(codes);
          CHECK(padding);
          CHECK(group_sums);
        }
    }
  }
}

TEST_CASE("group kernels: quantize_rows_grouped reports non-finite input in any block") {
  const grouped_shape s{1, 300, 128};
  for (float bad : {std::numeric_limits<float>::quiet_NaN(), std::numeric_limits<float>::infinity()})
    for (Index at : {0, 130, 299})
      for (bool per_block : {false, true})
        for (isa which : runnable_isas()) {
          Matrix<float> x = Matrix<float>::Constant(2, s.in, 0.25f);
          x(1, at) = bad;
          bitnet::detail::aligned_vector<std::int8_t> q(std::size_t(2 * s.padded_cols()));
          std::vector<float> scales(2 * 3);
          std::vector<std::int32_t> sums(2 * 3);
          CAPTURE(at);
          CAPTURE(per_block);
          CHECK_FALSE(bitnet::detail::quantize_rows_grouped(which, x.data(), s.in, 2, s.in, s.group, per_block, q.data(),
                                                            s.padded_cols(), scales.data(), sums.data(), 1));
        }
}

TEST_CASE("group kernels: quantize, grouped product and rescale give the double formula bit for bit") {
  std::mt19937 rng(24);
  std::uniform_real_distribution<float> magnitude(0.001f, 0.1f);
  for (const grouped_shape& s : ragged_grid) {
    Matrix<std::int8_t> w = random_int8(s.out, s.in, -1, 1, rng);
    Matrix<float> d(s.out, s.groups());
    for (Index i = 0; i < d.size(); ++i) d.data()[i] = magnitude(rng);
    std::vector<float> bias(std::size_t(s.out));
    for (float& b : bias) b = magnitude(rng) - 0.05f;
    const bitnet::packed_ternary packed(w, std::max<Index>(64, s.group));
    for (Index batch : {1, 2, 5, 17}) {
      const Matrix<float> x = reference::random_matrix<float>(batch, s.in, rng, 3.0);
      for (bool per_block : {false, true}) {
        const Matrix<float> expected = reference_grouped_forward(s, w, d, bias, reference_quantize(s, x, per_block), per_block);
        for (isa which : runnable_isas())
          for (int threads : {1, 2}) {
            CAPTURE(s.in);
            CAPTURE(s.group);
            CAPTURE(batch);
            CAPTURE(per_block);
            CAPTURE(bitnet::isa_name(which));
            CAPTURE(threads);
            CHECK(grouped_forward(which, threads, s, packed, d, bias, x, per_block) == expected);
          }
      }
    }
  }
}

TEST_CASE("group kernels: the grouped rescale in double and without bias follows the same formula") {
  // rescale_rows_grouped on hand-made accumulators: 2 tokens, 18 rows (2 row blocks), 3 groups of
  // which 2 are real; rows [3, 17) only.
  const Index kernel_groups = 3, groups = 2, rows = 18, virtual_rows = 2 * kernel_groups * 16;
  std::vector<std::int32_t> acc(std::size_t(2 * virtual_rows));
  for (std::size_t i = 0; i < acc.size(); ++i) acc[i] = std::int32_t(i * 7919 % 2001) - 1000;
  Matrix<double> d(rows, groups);
  for (Index i = 0; i < d.size(); ++i) d.data()[i] = 0.01 * double(i + 1) / 3.0;
  const std::vector<double> sx_token{3.0, 7.0}, sx_block{3.0, 5.0, 7.0, 11.0};
  for (bool per_block : {false, true}) {
    Matrix<double> y = Matrix<double>::Zero(2, rows);
    bitnet::detail::rescale_rows_grouped<double>(isa::scalar, acc.data(), virtual_rows, 2, 3, 17, kernel_groups, groups,
                                                 d.data(), per_block ? sx_block.data() : sx_token.data(), per_block,
                                                 nullptr, y.data(), rows);
    for (Index b = 0; b < 2; ++b)
      for (Index o = 0; o < rows; ++o) {
        CAPTURE(per_block);
        CAPTURE(b);
        CAPTURE(o);
        if (o < 3 || o >= 17) {
          CHECK(y(b, o) == 0.0);
          continue;
        }
        const auto at = [&](Index j) { return double(acc[std::size_t(b * virtual_rows + (o / 16 * 3 + j) * 16 + o % 16)]); };
        // d is row-major in the call: d(o, j) = d.data()[o * groups + j]
        const auto dd = [&](Index j) { return d.data()[o * groups + j]; };
        const double expected = per_block ? 0.0 + at(0) * dd(0) / sx_block[std::size_t(2 * b)] +
                                                at(1) * dd(1) / sx_block[std::size_t(2 * b + 1)]
                                          : (0.0 + at(0) * dd(0) + at(1) * dd(1)) / sx_token[std::size_t(b)];
        CHECK(y(b, o) == expected);
      }
  }
}
