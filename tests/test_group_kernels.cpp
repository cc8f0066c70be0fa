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
#include <cstring>
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
    static void run(const void* self, const void*, Index begin, Index end) noexcept {
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

namespace {

// rescale_rows_grouped on hand-made accumulators: 2 tokens, 18 rows (2 row blocks), 7 kernel groups
// of which 6 are real (the AVX2 rescale reads scales 4 groups at a time, then one by one); row ranges that start and end off the SIMD rescales' 4- and 2-row steps.
template <class T>
void check_rescale_by_hand(isa which) {
  const Index kernel_groups = 7, groups = 6, rows = 18, virtual_rows = 2 * kernel_groups * 16;
  std::vector<std::int32_t> acc(std::size_t(2 * virtual_rows));
  for (std::size_t i = 0; i < acc.size(); ++i) acc[i] = std::int32_t(i * 7919 % 60001) - 30000;
  Matrix<T> d(rows, groups);
  // Dyadic scales: every product is exact in double, so no compiler's fused multiply-add (AArch64
  // contracts by default) can round the test's expression differently from the library's.
  for (Index i = 0; i < d.size(); ++i) d.data()[i] = T(i + 1) / T(1024);
  std::vector<T> bias(static_cast<std::size_t>(rows));
  for (Index o = 0; o < rows; ++o) bias[std::size_t(o)] = T(0.1) * T(o % 5) - T(0.2);
  const std::vector<T> sx_token{T(3.5), T(7.25)};
  std::vector<T> sx_block;
  for (int i = 0; i < 2 * 6; ++i) sx_block.push_back(T(3.5) + T(i) * T(1.375));
  for (const std::pair<Index, Index>& range : {std::pair<Index, Index>{3, 17}, {0, 18}, {5, 6}, {16, 18}, {1, 4}, {0, 12}, {8, 13}, {2, 15}})
    for (bool per_block : {false, true})
      for (bool with_bias : {false, true}) {
        const Index begin = range.first, end = range.second;
        Matrix<T> y = Matrix<T>::Constant(2, rows, T(-7));
        bitnet::detail::rescale_rows_grouped<T>(which, acc.data(), virtual_rows, 2, begin, end, kernel_groups, groups,
                                                d.data(), per_block ? sx_block.data() : sx_token.data(), per_block,
                                                with_bias ? bias.data() : nullptr, y.data(), rows);
        bool exact = true;
        for (Index b = 0; b < 2; ++b)
          for (Index o = 0; o < rows; ++o) {
            if (o < begin || o >= end) {
              exact = exact && y(b, o) == T(-7);  // rows outside the range are not written
              continue;
            }
            double sum = 0.0;
            for (Index j = 0; j < groups; ++j) {
              const double term =
                  double(acc[std::size_t(b * virtual_rows + (o / 16 * kernel_groups + j) * 16 + o % 16)]) * double(d(o, j));
              sum += per_block ? term / double(sx_block[std::size_t(b * groups + j)]) : term;
            }
            if (!per_block) sum /= double(sx_token[std::size_t(b)]);
            const T expected = with_bias ? T(sum) + bias[std::size_t(o)] : T(sum);
            exact = exact && y(b, o) == expected;
          }
        CAPTURE(begin);
        CAPTURE(end);
        CAPTURE(per_block);
        CAPTURE(with_bias);
        CHECK(exact);
      }
}

}  // namespace

TEST_CASE("group kernels: the grouped rescale by hand, float on every ISA and double, any row range") {
  for (isa which : runnable_isas()) {
    CAPTURE(bitnet::isa_name(which));
    check_rescale_by_hand<float>(which);
  }
  check_rescale_by_hand<double>(isa::scalar);
}

// ---- the fused batch-1 kernel (ternary_gemv_grouped): per-token activations, scales in kernel order ----

namespace {

// One token through ternary_gemv_grouped from its int8 codes and scale sx, as BitLinear calls it.
// y has 16 guard lanes past the layer's rows, NaN like the rest, that must stay NaN.
std::vector<float> run_fused(isa which, int threads, const grouped_shape& s, const bitnet::packed_ternary& packed,
                             const bitnet::detail::kernel_unit_scales& d, const float* bias,
                             const Matrix<std::int8_t>& x, float sx) {
  namespace detail = bitnet::detail;
  const Index stride = packed.padded_cols(), groups = s.kernel_groups();
  REQUIRE(groups == s.groups());  // G >= 64: no all-padding groups
  detail::aligned_vector<std::int8_t> xq(std::size_t(stride), 0);
  std::vector<std::int32_t> sums(std::size_t(groups), 0);
  for (Index k = 0; k < s.in; ++k) {
    xq[std::size_t(k)] = x(0, k);
    sums[std::size_t(k / s.group)] += x(0, k);
  }
  std::vector<float> y(std::size_t(s.out + 16), std::numeric_limits<float>::quiet_NaN());
  const detail::grouped_gemv_args args{packed.data(), s.group / 16, groups, s.out, xq.data(), sums.data(),
                                       d.data(),      d.half(),     sx,     bias,  y.data()};
  detail::ternary_gemv_grouped(which, args, packed.row_blocks(), threads, 0.0);
  CHECK(bitnet::last_isa() == which);
  for (Index o = s.out; o < s.out + 16; ++o) CHECK(std::isnan(y[std::size_t(o)]));
  y.resize(std::size_t(s.out));
  return y;
}

// The contract's per-token formula written out on plain codes (docs/quantization.md).
std::vector<float> reference_fused(const grouped_shape& s, const Matrix<std::int8_t>& w, const Matrix<float>& d,
                                   const float* bias, const Matrix<std::int8_t>& x, float sx) {
  std::vector<float> y(std::size_t(s.out));
  for (Index o = 0; o < s.out; ++o) {
    double sum = 0.0;
    for (Index j = 0; j < s.groups(); ++j) {
      std::int32_t acc = 0;
      for (Index k = j * s.group; k < std::min((j + 1) * s.group, s.in); ++k) acc += std::int32_t(x(0, k)) * w(o, k);
      sum += double(acc) * double(d(o, j));
    }
    sum /= double(sx);
    y[std::size_t(o)] = bias ? float(sum) + bias[o] : float(sum);
  }
  return y;
}

bool same_bits(const std::vector<float>& a, const std::vector<float>& b) {
  return a.size() == b.size() && std::memcmp(a.data(), b.data(), a.size() * sizeof(float)) == 0;
}

// Random binary16 magnitudes: every finite non-negative bit pattern, subnormals and zero included.
Matrix<float> random_half_scales(Index out, Index groups, std::mt19937& rng) {
  std::uniform_int_distribution<int> bits(0, 0x7bff);
  Matrix<float> d(out, groups);
  for (Index i = 0; i < d.size(); ++i) d.data()[i] = bitnet::detail::half_to_float(std::uint16_t(bits(rng)));
  return d;
}

void check_fused(const grouped_shape& s, const Matrix<std::int8_t>& w, const Matrix<float>& d,
                 const std::vector<float>& bias, const Matrix<std::int8_t>& x, float sx, bool expect_half) {
  const bitnet::packed_ternary packed(w, std::max<Index>(64, s.group));
  const bitnet::detail::kernel_unit_scales scales(d.data(), s.out, s.groups(), s.kernel_groups());
  REQUIRE(scales.half() == expect_half);
  for (const float* b : {bias.data(), static_cast<const float*>(nullptr)}) {
    const std::vector<float> expected = reference_fused(s, w, d, b, x, sx);
    for (isa which : runnable_isas()) {
      if (!bitnet::detail::fused_grouped_gemv(which, s.group)) continue;
      for (int threads : {1, 2}) {
        CAPTURE(bitnet::isa_name(which));
        CAPTURE(threads);
        CAPTURE(b != nullptr);
        CHECK(same_bits(run_fused(which, threads, s, packed, scales, b, x, sx), expected));
      }
    }
  }
}

// G >= 64 (the fused kernel's groups): a 44-column last group, one group of 256, a 2-column tail
// at 64, a model row of 2560 in 20 groups, 11 groups of 64; rows 1 past a block to 3 blocks.
const grouped_shape fused_grid[] = {{19, 300, 128}, {17, 256, 256}, {5, 130, 64}, {33, 2560, 128}, {48, 704, 64}};

}  // namespace

TEST_CASE("group kernels: the fused batch-1 kernel runs on AVX-512 and AMX for G >= 64 only") {
#ifdef BITNET_X86
  constexpr bool x86 = true;
#else
  constexpr bool x86 = false;
#endif
  CHECK(bitnet::detail::fused_grouped_gemv(isa::avx512, 64) == x86);
  CHECK(bitnet::detail::fused_grouped_gemv(isa::amx, 256) == x86);
  CHECK_FALSE(bitnet::detail::fused_grouped_gemv(isa::avx512, 32));
  for (isa which : {isa::scalar, isa::avx2, isa::neon, isa::dotprod, isa::i8mm})
    CHECK_FALSE(bitnet::detail::fused_grouped_gemv(which, 128));
}

TEST_CASE("group kernels: kernel_unit_scales holds d in the kernel's order, binary16 only when exact") {
  namespace detail = bitnet::detail;
  std::mt19937 rng(41);
  const grouped_shape s{19, 300, 128};  // 2 row blocks (13 padding rows), 3 groups
  Matrix<float> d = random_half_scales(s.out, s.groups(), rng);
  const detail::kernel_unit_scales half(d.data(), s.out, s.groups(), s.kernel_groups());
  REQUIRE(half.half());
  REQUIRE(half.bytes() == std::size_t(2 * 3 * 16 * 2));
  std::vector<std::uint16_t> h(half.bytes() / 2);
  std::memcpy(h.data(), half.data(), half.bytes());
  for (Index rb = 0; rb < 2; ++rb)
    for (Index j = 0; j < 3; ++j)
      for (Index r = 0; r < 16; ++r) {
        const Index o = rb * 16 + r;
        const float value = detail::half_to_float(h[std::size_t((rb * 3 + j) * 16 + r)]);
        CHECK(value == (o < s.out ? d(o, j) : 0.0f));
      }
  d(18, 2) = 0.1f;  // not a binary16 value: the whole layer's scales stay float
  const detail::kernel_unit_scales single(d.data(), s.out, s.groups(), s.kernel_groups());
  REQUIRE_FALSE(single.half());
  REQUIRE(single.bytes() == std::size_t(2 * 3 * 16 * 4));
  std::vector<float> f(single.bytes() / 4);
  std::memcpy(f.data(), single.data(), single.bytes());
  CHECK(f[std::size_t((1 * 3 + 2) * 16 + 2)] == 0.1f);
  CHECK(f[std::size_t((0 * 3 + 1) * 16 + 5)] == d(5, 1));
  CHECK(f[std::size_t((1 * 3 + 0) * 16 + 3)] == 0.0f);  // padding row 19
  CHECK(detail::kernel_unit_scales().empty());
}

TEST_CASE("group kernels: the fused batch-1 kernel gives the per-token formula bit for bit, every ISA running it") {
  std::mt19937 rng(43);
  std::uniform_real_distribution<float> spread(1e-3f, 1.0f);
  for (const grouped_shape& s : fused_grid) {
    CAPTURE(s.out);
    CAPTURE(s.in);
    CAPTURE(s.group);
    const Matrix<std::int8_t> w = random_int8(s.out, s.in, -1, 1, rng);
    const Matrix<std::int8_t> x = random_int8(1, s.in, -128, 127, rng);
    std::vector<float> bias(std::size_t(s.out));
    for (float& b : bias) b = spread(rng) - 0.5f;
    check_fused(s, w, random_half_scales(s.out, s.groups(), rng), bias, x, 0.37f, true);
    Matrix<float> d(s.out, s.groups());
    for (Index i = 0; i < d.size(); ++i) d.data()[i] = spread(rng);
    d(0, 0) = 0.1f;  // certainly not a binary16 value
    check_fused(s, w, d, bias, x, 127.0f / 3.3f, false);
  }
}

TEST_CASE("group kernels: the fused batch-1 kernel at worst-case values (codes +-1, activations -128 / 127, d 65504)") {
  std::mt19937 rng(47);
  for (const grouped_shape& s : fused_grid)
    for (int code : {1, -1})
      for (int value : {-128, 127}) {
        CAPTURE(s.in);
        CAPTURE(code);
        CAPTURE(value);
        const Matrix<std::int8_t> w = Matrix<std::int8_t>::Constant(s.out, s.in, std::int8_t(code));
        const Matrix<std::int8_t> x = Matrix<std::int8_t>::Constant(1, s.in, std::int8_t(value));
        const std::vector<float> bias(std::size_t(s.out), -0.0f);
        check_fused(s, w, Matrix<float>::Constant(s.out, s.groups(), 65504.0f), bias, x, 1e-5f, true);
        Matrix<float> d = random_half_scales(s.out, s.groups(), rng);
        d(s.out - 1, s.groups() - 1) = 3e30f;
        check_fused(s, w, d, bias, x, 127.0f, false);
      }
}

// ---- batch 1 over several threads: every part quantizes the token itself (token_quantizer) ----

namespace {

constexpr float untouched_output = 7.25f;

// The grouped product of one float token with the call quantizing it in every part (BitLinear's
// batch-1 path); y starts at untouched_output. Returns whether the token was finite.
bool grouped_forward_own_token(isa which, int threads, const grouped_shape& s, const bitnet::packed_ternary& packed,
                               const Matrix<float>& d, const std::vector<float>& bias, const Matrix<float>& x,
                               bool per_block, Matrix<float>& y) {
  namespace detail = bitnet::detail;
  const Index stride = packed.padded_cols(), kernel_groups = s.kernel_groups();
  std::vector<std::int32_t> acc(std::size_t(s.virtual_rows()));
  y = Matrix<float>::Constant(1, s.out, untouched_output);
  const detail::grouped_rescale<float> rescale{which, acc.data(), s.virtual_rows(), 1, s.out, kernel_groups,
                                               s.groups(), d.data(), nullptr, per_block, bias.data(), y.data(),
                                               s.out};
  const detail::token_quantization<float> token{which, x.data(), s.in, stride, s.group, per_block};
  detail::gemm_args args{packed.data(), s.group / 16, s.virtual_rows(), nullptr, stride, nullptr, 1, acc.data()};
  args.groups = kernel_groups;
  return detail::ternary_gemm(which, args, packed.row_blocks() * kernel_groups, threads, 0.0, rescale.epilogue(),
                              token.quantizer());
}

// The fused kernel on one float token: quantized by the caller (own_token false, one thread's
// quantize_rows_grouped, as before) or in every part. y starts at untouched_output.
bool fused_forward(isa which, int threads, const grouped_shape& s, const bitnet::packed_ternary& packed,
                   const bitnet::detail::kernel_unit_scales& d, const std::vector<float>& bias, const Matrix<float>& x,
                   bool own_token, std::vector<float>& y) {
  namespace detail = bitnet::detail;
  const Index stride = packed.padded_cols(), groups = s.kernel_groups();
  detail::aligned_vector<std::int8_t> xq(std::size_t(stride), 99);
  std::vector<std::int32_t> sums(std::size_t(groups), 12345);
  float sx = -1.0f;
  y.assign(std::size_t(s.out), untouched_output);
  if (!own_token)
    REQUIRE(detail::quantize_rows_grouped(which, x.data(), s.in, 1, s.in, s.group, false, xq.data(), stride, &sx,
                                          sums.data()));
  const detail::grouped_gemv_args args{packed.data(), s.group / 16, groups, s.out, xq.data(), sums.data(),
                                       d.data(),      d.half(),     sx,     bias.data(), y.data()};
  const detail::token_quantization<float> token{which, x.data(), s.in, stride, s.group, false};
  return detail::ternary_gemv_grouped(which, args, packed.row_blocks(), threads, 0.0,
                                      own_token ? token.quantizer() : detail::token_quantizer{});
}

std::vector<Matrix<float>> non_finite_tokens(const Matrix<float>& x) {
  std::vector<Matrix<float>> tokens;
  for (float bad : {std::numeric_limits<float>::quiet_NaN(), std::numeric_limits<float>::infinity()})
    for (Index position : {Index{0}, x.cols() / 2, x.cols() - 1}) {
      tokens.push_back(x);
      tokens.back()(0, position) = bad;
    }
  return tokens;
}

}  // namespace

TEST_CASE("group kernels: batch 1 quantized in every part: the caller-quantized bits at every thread count; non-finite writes nothing") {
  std::mt19937 rng(63);
  std::uniform_real_distribution<float> spread(1e-3f, 1.0f);
  for (const grouped_shape& s : ragged_grid) {
    const Matrix<std::int8_t> w = random_int8(s.out, s.in, -1, 1, rng);
    const bitnet::packed_ternary packed(w, std::max<Index>(64, s.group));
    Matrix<float> d(s.out, s.groups());
    for (Index i = 0; i < d.size(); ++i) d.data()[i] = spread(rng);
    std::vector<float> bias(std::size_t(s.out));
    for (float& b : bias) b = spread(rng) - 0.5f;
    Matrix<float> x = reference::random_matrix<float>(1, s.in, rng, 2.0);
    x(0, s.in - 1) = 40.0f;  // an outlier: the last block's scale differs from the others
    for (bool per_block : {false, true})
      for (isa which : runnable_isas()) {
        const Matrix<float> expected = grouped_forward(which, 1, s, packed, d, bias, x, per_block);
        for (int threads : {1, 2, 3}) {
          CAPTURE(s.out);
          CAPTURE(s.in);
          CAPTURE(s.group);
          CAPTURE(per_block);
          CAPTURE(bitnet::isa_name(which));
          CAPTURE(threads);
          Matrix<float> y;
          CHECK(grouped_forward_own_token(which, threads, s, packed, d, bias, x, per_block, y));
          CHECK(std::memcmp(y.data(), expected.data(), sizeof(float) * std::size_t(s.out)) == 0);
          for (const Matrix<float>& bad : non_finite_tokens(x)) {
            CHECK_FALSE(grouped_forward_own_token(which, threads, s, packed, d, bias, bad, per_block, y));
            CHECK(y == Matrix<float>::Constant(1, s.out, untouched_output));
          }
        }
      }
  }
  for (const grouped_shape& s : fused_grid) {
    const Matrix<std::int8_t> w = random_int8(s.out, s.in, -1, 1, rng);
    const bitnet::packed_ternary packed(w, std::max<Index>(64, s.group));
    const bitnet::detail::kernel_unit_scales scales(random_half_scales(s.out, s.groups(), rng).data(), s.out,
                                                    s.groups(), s.kernel_groups());
    std::vector<float> bias(std::size_t(s.out));
    for (float& b : bias) b = spread(rng) - 0.5f;
    const Matrix<float> x = reference::random_matrix<float>(1, s.in, rng, 2.0);
    for (isa which : runnable_isas()) {
      if (!bitnet::detail::fused_grouped_gemv(which, s.group)) continue;
      std::vector<float> expected, y;
      REQUIRE(fused_forward(which, 1, s, packed, scales, bias, x, false, expected));
      for (int threads : {1, 2, 3}) {
        CAPTURE(s.out);
        CAPTURE(s.in);
        CAPTURE(s.group);
        CAPTURE(bitnet::isa_name(which));
        CAPTURE(threads);
        CHECK(fused_forward(which, threads, s, packed, scales, bias, x, true, y));
        CHECK(same_bits(y, expected));
        for (const Matrix<float>& bad : non_finite_tokens(x)) {
          CHECK_FALSE(fused_forward(which, threads, s, packed, scales, bias, bad, true, y));
          CHECK(y == std::vector<float>(std::size_t(s.out), untouched_output));
        }
      }
    }
  }
}
