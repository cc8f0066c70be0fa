#include <bitnet/bit_linear.hpp>
#include <bitnet/kernels.hpp>
#include <bitnet/pack.hpp>

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <cstdlib>
#include <limits>
#include <random>
#include <string>
#include <thread>
#include <utility>
#include <vector>

#include <doctest/doctest.h>

#include "kernel_isas.hpp"
#include "reference.hpp"

using bitnet::Index;
using bitnet::isa;
using bitnet::Matrix;

namespace {

using kernel_isas::emulated_amx;
using kernel_isas::emulated_avx512;
using kernel_isas::runnable_isas;

// One kernel call the way BitLinear makes it: activations copied into zero-padded aligned rows,
// their sums, and an output of batch x out int32. min_work 0 splits any layer over the threads.
std::vector<std::int32_t> run_kernel(isa which, int threads, const bitnet::packed_ternary& packed,
                                     const Matrix<std::int8_t>& x) {
  const Index batch = x.rows(), stride = packed.padded_cols();
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
  bitnet::detail::ternary_gemm(which, args, packed.row_blocks(), threads, 0.0);
  CHECK(bitnet::last_isa() == which);
  return acc;
}

std::vector<std::int32_t> reference_product(const Matrix<std::int8_t>& w, const Matrix<std::int8_t>& x) {
  std::vector<std::int32_t> acc(std::size_t(x.rows() * w.rows()));
  bitnet::detail::ternary_gemm_reference(x.data(), x.rows(), w.data(), w.rows(), w.cols(), acc.data());
  return acc;
}

Matrix<std::int8_t> random_int8(Index rows, Index cols, int lo, int hi, std::mt19937& rng) {
  std::uniform_int_distribution<int> dist(lo, hi);
  Matrix<std::int8_t> m(rows, cols);
  for (Index i = 0; i < m.size(); ++i) m.data()[i] = std::int8_t(dist(rng));
  return m;
}

// Every runnable ISA with 1 and 2 threads gives exactly the reference's accumulators.
void check_all_kernels(const Matrix<std::int8_t>& w, const Matrix<std::int8_t>& x) {
  const bitnet::packed_ternary packed(w);
  const std::vector<std::int32_t> expected = reference_product(w, x);
  for (isa which : runnable_isas())
    for (int threads : {1, 2}) {
      CAPTURE(bitnet::isa_name(which));
      CAPTURE(threads);
      CHECK(run_kernel(which, threads, packed, x) == expected);
    }
}

}  // namespace

TEST_CASE("kernels: the AVX-512 VNNI kernels run only where the CPU has them") {
#ifndef BITNET_X86
  MESSAGE("not an x86 CPU: the x86 kernels are not compiled here (the ARM stage checks its own ISAs)");
  CHECK_FALSE(bitnet::isa_supported(isa::avx2));
  CHECK_FALSE(bitnet::isa_supported(isa::avx512));
  CHECK_FALSE(bitnet::isa_supported(isa::amx));
  return;
#endif
  if (bitnet::isa_supported(isa::avx512))
    MESSAGE("AVX-512 VNNI present: the avx512 kernels are compared with the reference in every kernel test");
  else if (emulated_avx512)
    MESSAGE("AVX-512 VNNI kernels run emulated (SIMDe) and are compared with the reference in every kernel test");
  else {
    const std::string note = std::string("AVX-512 VNNI kernels NOT run: this CPU lacks AVX-512 F/BW/VL/VNNI; only scalar") +
                             (bitnet::isa_supported(isa::avx2) ? " and avx2" : "") +
                             " were tested here (bitnet_x86_emulated_tests runs them through SIMDe)";
    WARN_MESSAGE(false, note);
  }
  if (bitnet::isa_supported(isa::amx))
    MESSAGE("AMX-INT8 present and permitted: the amx kernel is compared with the reference in every kernel test");
  else if (emulated_amx)
    MESSAGE("AMX-INT8 kernel runs on a model of the tile registers (tests/amx_emulation.hpp) in every kernel test");
  else
    WARN_MESSAGE(false, "AMX-INT8 kernel NOT run: this CPU or OS gives no AMX tiles (bitnet_x86_emulated_tests runs it "
                        "on a model of the tile registers)");
  CHECK(bitnet::isa_supported(isa::scalar));
}

// The emulated ARM stage (CMakePresets.json "arm") names the ISAs each emulated CPU must run in
// BITNET_TEST_EXPECT_ISAS, so a kernel that silently stops being compiled or detected fails here.
TEST_CASE("kernels: the ISAs the environment expects are the ones this CPU runs") {
  const char* expected = std::getenv("BITNET_TEST_EXPECT_ISAS");
  if (expected == nullptr || *expected == '\0') {
    std::string supported;
    for (isa which : bitnet::all_isas)
      if (bitnet::isa_supported(which)) supported += std::string(" ") + std::string(bitnet::isa_name(which));
    const std::string note = "ISAs this CPU runs:" + supported;
    MESSAGE(note);
    return;
  }
  std::string names = expected;
  std::string listed;
  for (isa which : bitnet::all_isas) {
    const std::string name(bitnet::isa_name(which));
    const bool wanted = ("," + names + ",").find("," + name + ",") != std::string::npos;
    CAPTURE(name);
    CHECK(bitnet::isa_supported(which) == wanted);
    if (wanted) listed += name + ",";
  }
  CHECK(listed.size() == names.size() + 1);  // every name in the list is an ISA
}

TEST_CASE("kernels: every ISA equals the int32 reference on ragged shapes") {
  std::mt19937 rng(7);
  // 1..3x the 32-byte plane and the 128-column tile, 2^k +- 1, the int16 widening periods
  // (512 and 1024 columns), primes and the model sizes.
  const Index ins[] = {1,   2,   31,  32,  33,  63,  64,  65,   96,   97,   127,  128,  129,  255,  256, 257,
                       383, 384, 385, 511, 512, 513, 640, 1023, 1024, 1025, 1031, 2047, 2049, 2560, 6912};
  // out: one to six 16-row blocks, ragged (the batch-1 kernel takes blocks in fours, AMX in pairs);
  // batch: every kernel variant (1-4 per-plane, 5-16 shared planes, AMX from 16, partial token tiles).
  for (Index in : ins)
    for (Index out : {1, 3, 5, 16, 17, 33, 83})
      for (Index batch : {1, 2, 3, 4, 5, 8, 9, 16, 17, 35})
        if (in * out * batch <= 2'000'000) {
          CAPTURE(in);
          CAPTURE(out);
          CAPTURE(batch);
          check_all_kernels(random_int8(out, in, -1, 1, rng), random_int8(batch, in, -128, 127, rng));
        }
}

TEST_CASE("kernels: every batch from 1 to 33") {
  std::mt19937 rng(8);
  for (Index batch = 1; batch <= 33; ++batch)
    for (Index in : {257, 1025}) {
      CAPTURE(batch);
      CAPTURE(in);
      check_all_kernels(random_int8(9, in, -1, 1, rng), random_int8(batch, in, -128, 127, rng));
    }
}

TEST_CASE("kernels: worst-case values (all +-127, all -128, all +1 / all -1 weights)") {
  std::mt19937 rng(9);
  for (Index in : {128, 1024, 2049, 6912}) {
    Matrix<std::int8_t> w(6, in);
    w.row(0).setConstant(1);
    w.row(1).setConstant(-1);
    w.row(2).setZero();
    for (Index k = 0; k < in; ++k) w(3, k) = std::int8_t(k % 2 ? 1 : -1);
    w.bottomRows(2) = random_int8(2, in, -1, 1, rng);
    for (int value : {127, -127, -128}) {
      CAPTURE(in);
      CAPTURE(value);
      for (Index batch : {1, 2, 5, 16}) check_all_kernels(w, Matrix<std::int8_t>::Constant(batch, in, std::int8_t(value)));
      const Matrix<std::int8_t> x = Matrix<std::int8_t>::Constant(5, in, std::int8_t(value));
      // and the value by hand: row 0 sums x, row 1 sums -x
      const std::vector<std::int32_t> acc = run_kernel(bitnet::best_isa(), 1, bitnet::packed_ternary(w), x);
      CHECK(acc[0] == value * std::int32_t(in));
      CHECK(acc[1] == -value * std::int32_t(in));
      CHECK(acc[2] == 0);
    }
  }
}

TEST_CASE("kernels: exact at max_in_features with extreme values") {
  // |sum x (w + 1)| reaches 256 * max_in_features here, the int32 limit the bound documents.
  const Index in = bitnet::max_in_features;
  CHECK(256.0 * double(in) < 2147483648.0);
  Matrix<std::int8_t> w(5, in);
  w.row(0).setConstant(1);
  w.row(1).setConstant(-1);
  w.row(2).setZero();
  for (Index k = 0; k < in; ++k) w(3, k) = std::int8_t(k % 3 - 1);
  w.row(4).setConstant(1);
  const bitnet::packed_ternary packed(w);
  // Batch 1 and 3 reach the per-plane kernels' runs of 2^14 tiles; 16 the AMX tiles. The scalar
  // kernel's loop does not depend on the batch, so it runs batch 1 only. The emulated tiles are
  // left out: what this checks is the hardware's int32 accumulation, which a model cannot show
  // (and 8.6e9 emulated multiply-adds would take minutes); the ragged and worst-case tests run them.
  for (int value : {-128, 127})
    for (Index batch : {1, 3, 16}) {
      const Matrix<std::int8_t> x = Matrix<std::int8_t>::Constant(batch, in, std::int8_t(value));
      const std::int64_t total = std::int64_t(value) * in;
      std::int64_t alternating = 0;
      for (Index k = 0; k < in; ++k) alternating += std::int64_t(value) * (k % 3 - 1);
      for (isa which : runnable_isas()) {
        if ((batch == 16 && which != isa::amx) || (batch == 3 && which == isa::scalar)) continue;
        if (which == isa::amx && emulated_amx) continue;
        CAPTURE(bitnet::isa_name(which));
        CAPTURE(value);
        CAPTURE(batch);
        const std::vector<std::int32_t> acc = run_kernel(which, 2, packed, x);
        bool exact = true;
        for (Index b = 0; b < batch; ++b) {
          const std::int32_t* row = acc.data() + b * 5;
          exact = exact && row[0] == total && row[1] == -total && row[2] == 0 && row[3] == alternating &&
                  row[4] == total;
        }
        CHECK(exact);
      }
    }
}

TEST_CASE("kernels: vectorized activation quantization equals the reference, ties included") {
  std::mt19937 rng(10);
  std::vector<Matrix<float>> inputs;
  for (Index cols : {1, 7, 8, 9, 31, 32, 33, 63, 64, 65, 100, 255, 256, 257, 2560})
    inputs.push_back(reference::random_matrix<float>(4, cols, rng, 3.0));
  // Exact .5 ties: absmax 127 gives scale 1; absmax 254 gives scale 0.5 (so 5 -> 2.5 -> 2).
  Matrix<float> ties(2, 40);
  for (Index c = 0; c < 40; ++c) {
    ties(0, c) = float(c) - 19.5f;          // -19.5 ... 19.5, every one a tie
    ties(1, c) = float(2 * c - 39) + 0.0f;  // odd integers times 0.5 -> ties
  }
  ties(0, 39) = 127.0f;
  ties(1, 0) = -254.0f;
  inputs.push_back(ties);
  inputs.push_back(Matrix<float>::Zero(2, 70));                        // scale floor, all zero codes
  inputs.push_back(Matrix<float>::Constant(1, 70, 1e-7f));             // below the scale floor
  inputs.push_back(Matrix<float>::Constant(1, 70, 1e-40f));            // subnormal
  inputs.push_back(Matrix<float>::Constant(1, 70, -3e38f));            // huge, finite
  for (const Matrix<float>& x : inputs) {
    const bitnet::quantized_activations<float> expected = bitnet::quantize_activations(x);
    const Index stride = (x.cols() + 127) / 128 * 128;
    for (isa which : runnable_isas()) {
      CAPTURE(x.cols());
      CAPTURE(bitnet::isa_name(which));
      std::vector<std::int8_t> q(std::size_t(x.rows() * stride), 99);
      std::vector<float> scales(std::size_t(x.rows()));
      std::vector<std::int32_t> sums(std::size_t(x.rows()));
      REQUIRE(bitnet::detail::quantize_rows(which, x.data(), x.cols(), x.rows(), x.cols(), q.data(), stride,
                                            scales.data(), sums.data()));
      for (Index r = 0; r < x.rows(); ++r) {
        CHECK(scales[std::size_t(r)] == expected.scales(r));
        CHECK(scales[std::size_t(r)] == reference::activation_scale(x, r));
        std::int32_t sum = 0;
        bool codes_equal = true, padding_zero = true;
        for (Index c = 0; c < stride; ++c) {
          const std::int8_t code = q[std::size_t(r * stride + c)];
          if (c < x.cols()) {
            codes_equal = codes_equal && code == expected.values(r, c) &&
                          code == std::int8_t(reference::clamp(
                                      reference::round_half_even(x(r, c) * reference::activation_scale(x, r)),
                                      -128.0f, 127.0f));
            sum += code;
          } else {
            padding_zero = padding_zero && code == 0;
          }
        }
        CHECK(codes_equal);
        CHECK(padding_zero);
        CHECK(sums[std::size_t(r)] == sum);
      }
    }
  }
  // the hand-computed ties: -19.5 -> -20, -18.5 -> -18, 0.5 -> 0, 1.5 -> 2; and 5 * 0.5 = 2.5 -> 2
  const bitnet::quantized_activations<float> tie_codes = bitnet::quantize_activations(ties);
  CHECK(tie_codes.values(0, 0) == -20);
  CHECK(tie_codes.values(0, 1) == -18);
  CHECK(tie_codes.values(0, 20) == 0);
  CHECK(tie_codes.values(0, 21) == 2);
  CHECK(tie_codes.values(1, 22) == 2);
}

TEST_CASE("kernels: activation quantization reports non-finite input") {
  for (float bad : {std::numeric_limits<float>::quiet_NaN(), std::numeric_limits<float>::infinity(),
                    -std::numeric_limits<float>::infinity()})
    for (Index position : {0, 5, 31, 40, 42}) {  // vector body and scalar tail of 43 columns
      Matrix<float> x = Matrix<float>::Ones(2, 43);
      x(1, position) = bad;
      std::vector<std::int8_t> q(256);
      std::vector<float> scales(2);
      std::vector<std::int32_t> sums(2);
      for (isa which : runnable_isas()) {
        CAPTURE(bitnet::isa_name(which));
        CAPTURE(position);
        CHECK_FALSE(bitnet::detail::quantize_rows(which, x.data(), x.cols(), x.rows(), x.cols(), q.data(), 128,
                                                  scales.data(), sums.data()));
      }
    }
}

// ---- batch 1 over several threads: every part quantizes the token itself (token_quantizer) ----

namespace {

// An epilogue that records, per output row, the int32 product and the activation scale its part
// used, and how often the row came by. Each part writes only its own rows.
struct recorded_rows {
  const std::int32_t* acc;
  const float* caller_scale;  // the call's scale when it has no quantizer
  std::vector<std::int32_t> products;
  std::vector<float> scales;
  std::vector<int> visits;

  recorded_rows(const std::int32_t* acc_, const float* caller_scale_, Index rows)
      : acc(acc_), caller_scale(caller_scale_), products(std::size_t(rows), -1), scales(std::size_t(rows), -1.0f),
        visits(std::size_t(rows), 0) {}

  static void run(const void* self, const void* token_scales, Index begin, Index end) noexcept {
    auto& r = *const_cast<recorded_rows*>(static_cast<const recorded_rows*>(self));
    const float sx = *(token_scales ? static_cast<const float*>(token_scales) : r.caller_scale);
    for (Index o = begin; o < end; ++o) {
      r.products[std::size_t(o)] = r.acc[o];
      r.scales[std::size_t(o)] = sx;
      ++r.visits[std::size_t(o)];
    }
  }
};

}  // namespace

TEST_CASE("kernels: batch 1 quantized in every part gives the reference's bits at every thread count") {
  namespace detail = bitnet::detail;
  std::mt19937 rng(61);
  // Ragged: rows past a block, columns past a 64-column block; min_work 0 splits 5 and 17 row
  // blocks into 2 and 3 parts.
  for (const auto& shape : {std::pair<Index, Index>{70, 300}, {257, 2047}, {33, 64}}) {
    const Index out = shape.first, in = shape.second;  // not a structured binding: clang 14 cannot capture one
    const Matrix<std::int8_t> w = random_int8(out, in, -1, 1, rng);
    const bitnet::packed_ternary packed(w);
    const Index stride = packed.padded_cols();
    const Matrix<float> x = reference::random_matrix<float>(1, in, rng, 3.0);
    const bitnet::quantized_activations<float> expected_codes = bitnet::quantize_activations(x);
    const std::vector<std::int32_t> expected = reference_product(w, expected_codes.values);
    std::vector<std::int32_t> acc(static_cast<std::size_t>(out));
    for (isa which : runnable_isas())
      for (int threads : {1, 2, 3}) {
        CAPTURE(out);
        CAPTURE(in);
        CAPTURE(bitnet::isa_name(which));
        CAPTURE(threads);
        const detail::token_quantization<float> token{which, x.data(), in, stride, 0, false};
        const detail::gemm_args args{packed.data(), packed.col_tiles(), out, nullptr, stride, nullptr, 1, acc.data()};
        recorded_rows seen(acc.data(), nullptr, out);
        std::fill(acc.begin(), acc.end(), std::numeric_limits<std::int32_t>::min());
        CHECK(detail::ternary_gemm(which, args, packed.row_blocks(), threads, 0.0, {recorded_rows::run, &seen},
                                   token.quantizer()));
        CHECK(bitnet::last_isa() == which);
        CHECK(seen.products == expected);
        CHECK(seen.visits == std::vector<int>(std::size_t(out), 1));
        CHECK(seen.scales == std::vector<float>(std::size_t(out), expected_codes.scales(0)));

        // A non-finite token: the call says so, and no part ran its epilogue.
        for (float bad : {std::numeric_limits<float>::quiet_NaN(), std::numeric_limits<float>::infinity(),
                          -std::numeric_limits<float>::infinity()})
          for (Index position : {Index{0}, in / 2, in - 1}) {
            CAPTURE(bad);
            CAPTURE(position);
            Matrix<float> x_bad = x;
            x_bad(0, position) = bad;
            const detail::token_quantization<float> bad_token{which, x_bad.data(), in, stride, 0, false};
            recorded_rows untouched(acc.data(), nullptr, out);
            CHECK_FALSE(detail::ternary_gemm(which, args, packed.row_blocks(), threads, 0.0,
                                             {recorded_rows::run, &untouched}, bad_token.quantizer()));
            CHECK(untouched.visits == std::vector<int>(std::size_t(out), 0));
          }
      }
  }
}

TEST_CASE("kernels: ISA choice, override and thread count API") {
  CHECK(bitnet::isa_name(isa::scalar) == "scalar");
  CHECK(bitnet::isa_name(isa::avx2) == "avx2");
  CHECK(bitnet::isa_name(isa::avx512) == "avx512");
  CHECK(bitnet::isa_name(isa::amx) == "amx");
  CHECK(bitnet::isa_name(isa::neon) == "neon");
  CHECK(bitnet::isa_name(isa::dotprod) == "dotprod");
  CHECK(bitnet::isa_name(isa::i8mm) == "i8mm");
  for (isa which : bitnet::all_isas) CHECK(bitnet::detail::parse_isa(bitnet::isa_name(which)) == which);
  CHECK(bitnet::detail::parse_isa("amx") == isa::amx);
  CHECK(bitnet::detail::parse_isa("i8mm") == isa::i8mm);
  CHECK(bitnet::isa_supported(bitnet::best_isa()));
  // best_isa: the first supported in this order of preference, per architecture.
  for (isa which : {isa::amx, isa::avx512, isa::avx2, isa::i8mm, isa::dotprod, isa::neon})
    if (bitnet::isa_supported(which)) {
      CHECK(bitnet::best_isa() == which);
      break;
    }
  // No CPU runs both architectures' kernels.
  const bool x86 = bitnet::isa_supported(isa::avx2) || bitnet::isa_supported(isa::avx512);
  const bool arm = bitnet::isa_supported(isa::neon) || bitnet::isa_supported(isa::dotprod);
  CHECK_FALSE((x86 && arm));
  // SMMLA needs SDOT (the i8mm ISA runs batch 1 on the SDOT kernel), SDOT needs NEON.
  if (bitnet::isa_supported(isa::i8mm)) CHECK(bitnet::isa_supported(isa::dotprod));
  if (bitnet::isa_supported(isa::dotprod)) CHECK(bitnet::isa_supported(isa::neon));
  const char* env = std::getenv("BITNET_ISA");
  if (env == nullptr || *env == '\0') {
    // This test binary is built without -march flags: the run-time choice still finds SIMD.
    CHECK(bitnet::active_isa() == bitnet::best_isa());
  } else {
    CHECK(bitnet::isa_name(bitnet::active_isa()) == env);
  }
  bitnet::force_isa(isa::scalar);
  CHECK(bitnet::active_isa() == isa::scalar);
  for (isa which : bitnet::all_isas)
    if (!bitnet::isa_supported(which)) {
      CHECK_THROWS_WITH_AS(bitnet::force_isa(which), doctest::Contains("this CPU does not support"),
                           bitnet::value_error);
      CHECK(bitnet::active_isa() == isa::scalar);  // unchanged
    }
  bitnet::clear_forced_isa();
  CHECK(bitnet::active_isa() == (env && *env ? *bitnet::detail::parse_isa(env) : bitnet::best_isa()));
  CHECK_FALSE(bitnet::detail::parse_isa("AVX2").has_value());

  const int before = bitnet::num_threads();
  CHECK(before >= 1);
  bitnet::set_num_threads(3);
  CHECK(bitnet::num_threads() == 3);
  CHECK_THROWS_AS(bitnet::set_num_threads(-1), bitnet::value_error);
  CHECK(bitnet::num_threads() == 3);
  bitnet::set_num_threads(0);
  CHECK(bitnet::num_threads() == before);
}

// The environment is read once per process, so ctest runs this file's env-dependent checks in
// extra registrations (tests/CMakeLists.txt): bitnet_tests.invalid_isa and bitnet_tests.threads_env.
TEST_CASE("kernels: environment overrides BITNET_ISA and BITNET_NUM_THREADS") {
  const char* isa_env = std::getenv("BITNET_ISA");
  if (isa_env != nullptr && *isa_env != '\0' && !bitnet::detail::parse_isa(isa_env)) {
    CHECK_THROWS_WITH_AS((void)bitnet::active_isa(), doctest::Contains("names no kernel ISA"), bitnet::value_error);
    const bitnet::BitLinear<float> layer(Matrix<float>::Ones(2, 3));
    CHECK_THROWS_AS((void)layer.forward(Matrix<float>::Ones(1, 3)), bitnet::value_error);
    bitnet::force_isa(isa::scalar);  // an explicit choice still works
    CHECK(layer.forward(Matrix<float>::Ones(1, 3)).cols() == 2);
    bitnet::clear_forced_isa();
  } else if (isa_env != nullptr && *isa_env != '\0' && !bitnet::isa_supported(*bitnet::detail::parse_isa(isa_env))) {
    // A real ISA this CPU lacks (the ARM stage asks for i8mm on a CPU without it): an error too.
    CHECK_THROWS_WITH_AS((void)bitnet::active_isa(), doctest::Contains("this CPU does not support it"),
                         bitnet::value_error);
    const bitnet::BitLinear<float> layer(Matrix<float>::Ones(2, 3));
    CHECK_THROWS_AS((void)layer.forward(Matrix<float>::Ones(1, 3)), bitnet::value_error);
  } else {
    MESSAGE("BITNET_ISA is unset or valid here; ctest's bitnet_tests.invalid_isa checks an invalid value");
  }
  const char* threads_env = std::getenv("BITNET_NUM_THREADS");
  if (threads_env != nullptr && *threads_env != '\0') {
    CHECK(bitnet::num_threads() == std::atoi(threads_env));
  } else {
    CHECK(bitnet::num_threads() == int(std::max(1u, std::thread::hardware_concurrency())));
  }
}

TEST_CASE("kernels: concurrent calls share the thread pool, every part runs exactly once") {
  // Run under ThreadSanitizer by the tsan preset. Callers outnumber the cores and ask for more
  // parts than the pool has workers, so parts are claimed by callers and workers alike.
  struct counts {
    mutable std::vector<std::atomic<int>> runs;
    explicit counts(Index parts) : runs(std::size_t(parts)) {}
    static void count(const void* self, Index part) noexcept {
      static_cast<const counts*>(self)->runs[std::size_t(part)].fetch_add(1);
    }
  };
  std::vector<int> wrong(6, 0);
  std::vector<std::thread> callers;
  for (int t = 0; t < 6; ++t)
    callers.emplace_back([&wrong, t] {
      for (int round = 0; round < 50; ++round) {
        const Index parts = 1 + (round + t) % 9;  // 1 (no pool) to 9
        counts c(parts);
        bitnet::detail::thread_pool::instance().run(parts, counts::count, &c);
        for (const std::atomic<int>& runs : c.runs) wrong[std::size_t(t)] += runs.load() != 1;
      }
    });
  for (std::thread& caller : callers) caller.join();
  CHECK(wrong == std::vector<int>(6, 0));

  // The kernels through the pool from several threads at once, split as finely as allowed.
  std::mt19937 rng(12);
  const Matrix<std::int8_t> w = random_int8(37, 1031, -1, 1, rng), x = random_int8(3, 1031, -128, 127, rng);
  const bitnet::packed_ternary packed(w);
  const std::vector<std::int32_t> expected = reference_product(w, x);
  std::vector<int> mismatches(3, 0);
  callers.clear();
  for (int t = 0; t < 3; ++t)
    callers.emplace_back([&, t] {
      for (int round = 0; round < 20; ++round)
        mismatches[std::size_t(t)] += run_kernel(bitnet::best_isa(), 4, packed, x) != expected;
    });
  for (std::thread& caller : callers) caller.join();
  CHECK(mismatches == std::vector<int>(3, 0));
}

namespace {

// Counts the runs of every part of one thread_pool::run call.
struct part_runs {
  mutable std::vector<std::atomic<int>> runs;
  explicit part_runs(Index parts) : runs(std::size_t(parts)) {}
  static void count(const void* self, Index part) noexcept {
    static_cast<const part_runs*>(self)->runs[std::size_t(part)].fetch_add(1);
  }
  bool each_once() const {
    return std::all_of(runs.begin(), runs.end(), [](const std::atomic<int>& n) { return n.load() == 1; });
  }
};

}  // namespace

TEST_CASE("thread pool: back-to-back calls from several threads reuse the job slots, every part once") {
  // The lock-free hand-off: a slot's next call must not be claimed under its previous call's
  // generation. Short calls back to back, as the layers of a model make them (tsan preset).
  std::vector<int> wrong(3, 0);
  std::vector<std::thread> callers;
  for (int t = 0; t < 3; ++t)
    callers.emplace_back([&wrong, t] {
      for (int round = 0; round < 1000; ++round) {
        const Index parts = 2 + round % 3;
        const part_runs c(parts);
        bitnet::detail::thread_pool::instance().run(parts, part_runs::count, &c);
        wrong[std::size_t(t)] += !c.each_once();
      }
    });
  for (std::thread& caller : callers) caller.join();
  CHECK(wrong == std::vector<int>(3, 0));
}

TEST_CASE("thread pool: calls nested deeper than the job slots still run every part once") {
  // Part 0 of each level (always the caller's own) calls the next level, so the chain holds one
  // slot a level; past thread_pool::slot_count levels the calls find none and run on their own.
  constexpr int levels = bitnet::detail::thread_pool::slot_count + 8;
  struct level {
    part_runs runs{3};
    const level* next = nullptr;
    static void task(const void* self, Index part) noexcept {
      const level& l = *static_cast<const level*>(self);
      part_runs::count(&l.runs, part);
      if (part == 0 && l.next != nullptr) bitnet::detail::thread_pool::instance().run(3, task, l.next);
    }
  };
  std::vector<level> chain(levels);
  for (int l = 0; l + 1 < levels; ++l) chain[std::size_t(l)].next = &chain[std::size_t(l) + 1];
  bitnet::detail::thread_pool::instance().run(3, level::task, chain.data());
  for (int l = 0; l < levels; ++l) CHECK_MESSAGE(chain[std::size_t(l)].runs.each_once(), "level " << l);
}

TEST_CASE("thread pool: a call completes on its own thread while every worker is busy") {
  // Caller a's parts 1..8 hold the workers (8 were started for 9 parts) until caller b's call of
  // 3 parts has returned: b gets no help from them and must run its parts itself.
  constexpr Index a_parts = 9;
  std::atomic<int> a_started{0};
  std::atomic<bool> b_returned{false};
  struct a_job {
    std::atomic<int>& started;
    std::atomic<bool>& b_returned;
    part_runs runs{a_parts};
  } a{a_started, b_returned};
  const auto a_task = [](const void* self, Index part) noexcept {
    const a_job& job = *static_cast<const a_job*>(self);
    part_runs::count(&job.runs, part);
    job.started.fetch_add(1);
    while (!job.b_returned.load()) std::this_thread::yield();
  };
  std::thread caller_a([&] { bitnet::detail::thread_pool::instance().run(a_parts, a_task, &a); });
  // Every part of a has started: each on its own thread (they block), so all helpers are taken.
  while (a_started.load() < a_parts) std::this_thread::yield();
  const part_runs b(3);
  bitnet::detail::thread_pool::instance().run(3, part_runs::count, &b);
  b_returned.store(true);
  caller_a.join();
  CHECK(b.each_once());
  CHECK(a.runs.each_once());
}
