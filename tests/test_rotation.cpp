#include <bitnet/kernels.hpp>
#include <bitnet/rotation.hpp>
#include <bitnet/training.hpp>

#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <random>
#include <string>
#include <vector>

#include <doctest/doctest.h>

#include "kernel_isas.hpp"

using bitnet::hadamard_rotation;
using bitnet::Index;
using bitnet::isa;
using bitnet::Matrix;

namespace {

// The dense rotation built independently of the library: Sylvester's H_b by its recursion
// H_2k = [[H_k, H_k], [H_k, -H_k]], normalized, repeated along the diagonal, times diag(signs).
Matrix<double> dense_rotation(Index n, Index b, const std::vector<std::int8_t>& signs) {
  Matrix<double> h = Matrix<double>::Ones(1, 1);
  while (h.rows() < b) {
    const Index k = h.rows();
    Matrix<double> next(2 * k, 2 * k);
    next << h, h, h, -h;
    h = next;
  }
  Matrix<double> r = Matrix<double>::Zero(n, n);
  for (Index s = 0; s < n; s += b) r.block(s, s, b, b) = h / std::sqrt(double(b));
  for (Index k = 0; k < n; ++k) r.col(k) *= double(signs[std::size_t(k)]);
  return r;
}

template <class T>
Matrix<T> random_matrix(Index rows, Index cols, unsigned seed) {
  std::mt19937 rng(seed);
  std::normal_distribution<double> dist(0.0, 1.0);
  Matrix<T> m(rows, cols);
  for (Index i = 0; i < m.size(); ++i) m.data()[i] = T(dist(rng));
  return m;
}

std::vector<std::int8_t> alternating_signs(Index n) {
  std::vector<std::int8_t> s(static_cast<std::size_t>(n));
  for (Index k = 0; k < n; ++k) s[std::size_t(k)] = (k * 7 / 3) % 2 == 0 ? 1 : -1;
  return s;
}

}  // namespace

TEST_CASE("rotation: hand-computed values, signs first, then the normalized Hadamard") {
  // b = 2, signs (+1, -1): R x = H_2 / sqrt(2) (3, -1) = (2, 4) / sqrt(2). The other order
  // (Hadamard first, then signs) would give (4, -2) / sqrt(2).
  const hadamard_rotation r(2, {1, -1});
  Matrix<double> x(1, 2);
  x << 3, 1;
  const Matrix<double> y = r.apply(x);
  CHECK(y(0, 0) == doctest::Approx(2 / std::sqrt(2.0)).epsilon(1e-15));
  CHECK(y(0, 1) == doctest::Approx(4 / std::sqrt(2.0)).epsilon(1e-15));
  // b = 4, identity signs, e_1 = (0, 1, 0, 0): row 1 of H_4 / 2 = (1, -1, 1, -1) / 2, exactly.
  const hadamard_rotation r4 = hadamard_rotation::identity_signs(4, 4);
  Matrix<float> e(1, 4);
  e << 0, 1, 0, 0;
  const Matrix<float> h = r4.apply(e);
  CHECK(h(0, 0) == 0.5f);
  CHECK(h(0, 1) == -0.5f);
  CHECK(h(0, 2) == 0.5f);
  CHECK(h(0, 3) == -0.5f);
}

TEST_CASE_TEMPLATE("rotation: the fast transform equals the dense orthonormal Hadamard product", T, float, double) {
  const double tol = std::is_same_v<T, float> ? 2e-6 : 1e-14;
  for (Index b : {2, 4, 8, 16, 32, 64, 512}) {
    for (Index blocks : {1, 3}) {
      const Index n = b * blocks;
      CAPTURE(b);
      CAPTURE(n);
      const std::vector<std::int8_t> signs = alternating_signs(n);
      const hadamard_rotation rot(b, signs);
      const Matrix<double> dense = dense_rotation(n, b, signs);
      const Matrix<T> x = random_matrix<T>(3, n, unsigned(b + n));
      const Matrix<double> expected = x.template cast<double>() * dense.transpose();
      const Matrix<double> got = rot.apply(x).template cast<double>();
      CHECK((got - expected).cwiseAbs().maxCoeff() <= tol * expected.cwiseAbs().maxCoeff());
      // The inverse is the transpose: z R.
      const Matrix<double> back = rot.inverse(x).template cast<double>();
      const Matrix<double> expected_back = x.template cast<double>() * dense;
      CHECK((back - expected_back).cwiseAbs().maxCoeff() <= tol * expected_back.cwiseAbs().maxCoeff());
    }
  }
}

TEST_CASE("rotation: orthogonal, inverse undoes apply, the norm of every token is kept") {
  const hadamard_rotation rot = hadamard_rotation::random_signs(3 * 256, 256, 7);
  // The rows of apply(I) are R e_i, the columns of R: apply(I) = R^T, and R^T R = I.
  const Matrix<double> rt = rot.apply(Matrix<double>(Matrix<double>::Identity(768, 768)));
  CHECK((rt * rt.transpose() - Matrix<double>::Identity(768, 768)).cwiseAbs().maxCoeff() < 1e-13);
  const Matrix<double> x = random_matrix<double>(4, 768, 3);
  const Matrix<double> y = rot.apply(x);
  for (Index r = 0; r < 4; ++r) CHECK(y.row(r).norm() == doctest::Approx(x.row(r).norm()).epsilon(1e-13));
  CHECK((rot.inverse(y) - x).cwiseAbs().maxCoeff() < 1e-13);
}

TEST_CASE_TEMPLATE("rotation: fold keeps the product, unfold undoes fold", T, float, double) {
  const double tol = std::is_same_v<T, float> ? 1e-5 : 1e-13;
  const hadamard_rotation rot = hadamard_rotation::random_signs(1024, 512, 11);
  const Matrix<T> w = random_matrix<T>(40, 1024, 1), x = random_matrix<T>(5, 1024, 2);
  const Matrix<T> folded = rot.fold(w, "layers.0.mlp");
  const Matrix<double> y = (x.template cast<double>() * w.template cast<double>().transpose());
  const Matrix<double> y_rot = rot.apply(x).template cast<double>() * folded.template cast<double>().transpose();
  CHECK((y_rot - y).cwiseAbs().maxCoeff() <= tol * y.cwiseAbs().maxCoeff());
  CHECK((rot.unfold(folded) - w).template cast<double>().cwiseAbs().maxCoeff() <= tol);
  // The fold is not the identity (a rotation that changed nothing would pass the lines above).
  CHECK((folded - w).template cast<double>().cwiseAbs().maxCoeff() > 0.1);
}

TEST_CASE_TEMPLATE("rotation: every ISA and thread count gives the scalar reference's bits", T, float, double) {
  // Block sizes 2..4096, row counts 1 and 5 (and 40 rows of 4096, enough values for two threads),
  // strides wider than a row, tails shorter than a register (small blocks, odd block counts), in
  // place and not.
  for (Index b = 2; b <= 4096; b *= 2) {
    const Index n = b <= 32 ? b * 13 : b * (b <= 512 ? 3 : 1);
    const hadamard_rotation rot = hadamard_rotation::random_signs(n, b, std::uint64_t(b));
    for (Index rows : {Index(1), Index(5), b == 4096 ? Index(40) : Index(0)}) {
      if (rows == 0) continue;
      const Index stride = n + 3;
      const Matrix<T> x = random_matrix<T>(rows, stride, unsigned(b * rows));
      for (bool inverse : {false, true}) {
        std::vector<T> expected(std::size_t(rows * stride), T(-7));
        if (inverse) rot.inverse_rows(isa::scalar, x.data(), rows, stride, expected.data(), stride);
        else rot.apply_rows(isa::scalar, x.data(), rows, stride, expected.data(), stride);
        for (isa which : kernel_isas::runnable_isas())
          for (int threads : {1, 2}) {
            CAPTURE(b);
            CAPTURE(rows);
            CAPTURE(inverse);
            CAPTURE(bitnet::isa_name(which));
            CAPTURE(threads);
            std::vector<T> got(std::size_t(rows * stride), T(-7));
            Matrix<T> in_place = x;
            if (inverse) {
              rot.inverse_rows(which, x.data(), rows, stride, got.data(), stride, threads);
              rot.inverse_rows(which, in_place.data(), rows, stride, in_place.data(), stride, threads);
            } else {
              rot.apply_rows(which, x.data(), rows, stride, got.data(), stride, threads);
              rot.apply_rows(which, in_place.data(), rows, stride, in_place.data(), stride, threads);
            }
            // Bits, padding untouched: memcmp over the whole buffers.
            CHECK(std::memcmp(got.data(), expected.data(), got.size() * sizeof(T)) == 0);
            for (Index r = 0; r < rows; ++r) {
              CHECK(std::memcmp(in_place.row(r).data(), expected.data() + r * stride, std::size_t(n) * sizeof(T)) == 0);
              CHECK(std::memcmp(in_place.row(r).data() + n, x.row(r).data() + n, 3 * sizeof(T)) == 0);
            }
          }
      }
    }
  }
}

TEST_CASE("rotation: random signs are reproducible and balanced") {
  const hadamard_rotation a = hadamard_rotation::random_signs(4096, 1024, 42);
  CHECK(a == hadamard_rotation::random_signs(4096, 1024, 42));
  CHECK_FALSE(a == hadamard_rotation::random_signs(4096, 1024, 43));
  CHECK_FALSE(a == hadamard_rotation::random_signs(4096, 512, 42));
  Index plus = 0;
  for (std::int8_t s : a.signs()) plus += s == 1;
  CHECK(plus > 1900);
  CHECK(plus < 2196);
  CHECK(a.in_features() == 4096);
  CHECK(a.block_size() == 1024);
}

TEST_CASE("rotation: refusals name what is wrong") {
  const auto message = [](auto&& call) {
    try {
      call();
    } catch (const bitnet::error& e) {
      return std::string(e.what());
    }
    return std::string("no error");
  };
  for (Index b : {0, 1, 3, 96, 65536}) {
    CAPTURE(b);
    CHECK_THROWS_AS(hadamard_rotation(b, std::vector<std::int8_t>(std::size_t(b > 0 ? b : 2), 1)), bitnet::value_error);
  }
  // 2560 = 2.5 blocks of 1024: refused, never a ragged block.
  CHECK_THROWS_AS(hadamard_rotation::identity_signs(2560, 1024), bitnet::shape_error);
  CHECK(message([] { hadamard_rotation::identity_signs(2560, 1024); }).find("2560 is not a multiple of block size 1024") !=
        std::string::npos);
  CHECK_THROWS_AS(hadamard_rotation(4, std::vector<std::int8_t>{}), bitnet::shape_error);
  CHECK_THROWS_AS(hadamard_rotation::random_signs(0, 4, 1), bitnet::shape_error);
  CHECK(message([] { hadamard_rotation(4, {1, -1, 0, 1}); }).find("sign 2 is 0") != std::string::npos);
  CHECK_THROWS_AS(hadamard_rotation(2, {1, 2}), bitnet::value_error);

  const hadamard_rotation rot = hadamard_rotation::identity_signs(8, 4);
  CHECK_THROWS_AS(rot.apply(Matrix<float>(2, 4)), bitnet::shape_error);
  CHECK(message([&] { rot.fold(Matrix<double>(3, 16), "blk.3.ffn_up"); }).find("blk.3.ffn_up has 16 columns") !=
        std::string::npos);
  Matrix<float> x = Matrix<float>::Zero(2, 8);
  x(1, 5) = std::numeric_limits<float>::quiet_NaN();
  CHECK_THROWS_AS(rot.apply(x), bitnet::value_error);
  CHECK(message([&] { rot.apply(x); }).find("row 1, column 5") != std::string::npos);
  x(1, 5) = std::numeric_limits<float>::infinity();
  CHECK_THROWS_AS(rot.inverse(x), bitnet::value_error);
  CHECK_THROWS_AS(rot.unfold(x), bitnet::value_error);
  // Finite inputs whose block sum passes the largest float: (4 * max / 2) overflows.
  Matrix<float> big = Matrix<float>::Constant(1, 8, std::numeric_limits<float>::max());
  CHECK(message([&] { rot.apply(big); }).find("overflow") != std::string::npos);
  CHECK(rot.apply(Matrix<float>(0, 8)).rows() == 0);
}

// ---------------------------------------------------------------------------------------------
// The rotation inside BitLinear (bitlinear_options::rotation) and its fine-tuning.

TEST_CASE("rotation in BitLinear: the layer computes the plain layer on R x (R n with RMSNorm), bit for bit") {
  using bitnet::BitLinear;
  using bitnet::bitlinear_options;
  const Index in = 256, out = 40;
  const hadamard_rotation rot = hadamard_rotation::random_signs(in, 64, 5);
  const Matrix<float> w = random_matrix<float>(out, in, 1);
  const Matrix<float> x = random_matrix<float>(3, in, 2);
  for (const bool grouped : {false, true}) {
    CAPTURE(grouped);
    bitlinear_options plain;
    if (grouped) {
      plain.weight_scales = bitnet::weight_scaling::per_group;
      plain.group_size = 64;
    }
    bitlinear_options rotated = plain;
    rotated.rotation = rot;
    const BitLinear<float> with(w, std::nullopt, rotated), without(w, std::nullopt, plain);
    for (isa which : kernel_isas::runnable_isas()) {
      if (!bitnet::isa_supported(which)) continue;  // forward runs the active (real) kernels
      CAPTURE(bitnet::isa_name(which));
      bitnet::force_isa(which);
      CHECK(with.forward(x) == without.forward(rot.apply(x)));
    }
    bitnet::clear_forced_isa();
    bitlinear_options normed = rotated;
    normed.rms_norm = true;
    CHECK(BitLinear<float>(w, std::nullopt, normed).forward(x) == without.forward(rot.apply(bitnet::rms_norm(x, 1e-6f))));
  }
  // A rotation of another width is refused by every way of building a layer.
  bitlinear_options wrong;
  wrong.rotation = hadamard_rotation::identity_signs(128, 64);
  CHECK_THROWS_WITH_AS(BitLinear<float>(w, std::nullopt, wrong), doctest::Contains("the rotation is for 128 inputs, the layer has 256"),
                       bitnet::shape_error);
  CHECK_THROWS_AS(BitLinear<float>::from_ternary(Matrix<std::int8_t>::Zero(out, in), 1.0f, std::nullopt, wrong),
                  bitnet::shape_error);
  // A finite input the rotation takes past the largest float is an error, not a silent infinity.
  bitlinear_options big;
  big.rotation = hadamard_rotation::identity_signs(in, 64);
  const Matrix<float> huge = Matrix<float>::Constant(1, in, 3e38f);
  CHECK_THROWS_WITH_AS(BitLinear<float>(w, std::nullopt, big).forward(huge), doctest::Contains("rotated input overflowed"),
                       bitnet::value_error);
}

TEST_CASE("rotation in BitLinear: a dense layer folded into the rotated basis keeps its product") {
  const Index in = 512, out = 64;
  const hadamard_rotation rot = hadamard_rotation::random_signs(in, 512, 9);
  const Matrix<float> w = random_matrix<float>(out, in, 3);
  const Matrix<float> x = random_matrix<float>(4, in, 4);
  bitnet::bitlinear_options options;
  options.rotation = rot;
  const bitnet::BitLinear<float> layer(rot.fold(w), std::nullopt, options);
  // (W R^T)(R x) = W x up to the ternary and int8 quantization: the same error as the unrotated
  // layer's against the float product, not a different function.
  const Matrix<float> exact = x * w.transpose();
  const double err_rotated = (layer.forward(x) - exact).norm() / exact.norm();
  const double err_plain = (bitnet::BitLinear<float>(w).forward(x) - exact).norm() / exact.norm();
  CHECK(err_rotated < 0.6);
  CHECK(err_rotated < 1.5 * err_plain);
  CHECK(err_plain < 1.5 * err_rotated);
}

TEST_CASE("rotation in BitLinear: training keeps R fixed and the gradients flow through it") {
  const Index in = 128, out = 24;
  const hadamard_rotation rot = hadamard_rotation::random_signs(in, 32, 21);
  bitnet::bitlinear_options options;
  options.rotation = rot;
  const Matrix<double> w = random_matrix<double>(out, in, 5);
  const Matrix<double> x = random_matrix<double>(3, in, 6);
  const Matrix<double> dy = random_matrix<double>(3, out, 7);
  const bitnet::BitLinear<double> layer(w, std::nullopt, options);
  // R^T as a dense matrix, from the transform of the identity's rows (apply(x) = x R^T).
  const Matrix<double> rt = rot.apply(Matrix<double>(Matrix<double>::Identity(in, in)));
  // lambda = 0: the float layer y = (R x) W^T, so dW = dy^T (R x) and dx = dy W R.
  auto [y, tape] = bitnet::train_forward(layer, x, 0.0);
  CHECK((y - x * rt * w.transpose()).cwiseAbs().maxCoeff() < 1e-12);
  const bitnet::bit_linear_gradients<double> g = bitnet::backward(tape, dy);
  CHECK((g.weight - dy.transpose() * (x * rt)).cwiseAbs().maxCoeff() < 1e-12);
  CHECK((g.input - dy * w * rt.transpose()).cwiseAbs().maxCoeff() < 1e-12);
  // lambda = 1: the integer forward on R x, and the input gradient through the quantized weights.
  auto [yq, tape_q] = bitnet::train_forward(layer, x, 1.0);
  CHECK(yq == layer.forward(x));
  CHECK(tape_q.input_operand() == bitnet::activation_quant(rot.apply(x)));
  const bitnet::bit_linear_gradients<double> gq = bitnet::backward(tape_q, dy);
  CHECK((gq.input - dy * tape_q.weight_operand() * rt.transpose()).cwiseAbs().maxCoeff() < 1e-12);
}
