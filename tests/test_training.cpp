#include <bitnet/training.hpp>

#include <bitnet/replace.hpp>

#include <cmath>
#include <cstdlib>
#include <cstring>
#include <fstream>
#include <limits>
#include <map>
#include <memory>
#include <optional>
#include <random>
#include <sstream>
#include <string>
#include <string_view>
#include <variant>
#include <vector>

#include <doctest/doctest.h>

#include "graph_fixtures.hpp"
#include "reference.hpp"
#include "training_reference.hpp"

using bitnet::BitLinear;
using bitnet::Index;
using bitnet::Matrix;
using bitnet::Vector;

namespace {

template <class T>
bool same_bits(const Matrix<T>& a, const Matrix<T>& b) {
  if (a.rows() != b.rows() || a.cols() != b.cols()) return false;
  for (Index i = 0; i < a.size(); ++i)
    if (std::memcmp(a.data() + i, b.data() + i, sizeof(T)) != 0) return false;
  return true;
}

// ---- PyTorch reference vectors (tests/data/make_training_reference.py) --------------------------

using training_reference::read_reference;
using training_reference::reference_case;

template <class T>
Matrix<T> tensor(const reference_case& c, const std::string& name, Index rows, Index cols) {
  const auto it = c.tensors.find(name);
  REQUIRE_MESSAGE(it != c.tensors.end(), c.name << ": no tensor " << name);
  REQUIRE(Index(it->second.size()) == rows * cols);
  Matrix<T> m(rows, cols);
  for (Index i = 0; i < m.size(); ++i) m.data()[i] = T(it->second[std::size_t(i)]);  // exact: written from T
  return m;
}

// Elementwise |a - b| <= bound, reporting the worst element.
template <class T>
void check_within(const Matrix<T>& ours, const Matrix<T>& torch, const Matrix<long double>& bound, const std::string& what) {
  REQUIRE(ours.rows() == torch.rows());
  REQUIRE(ours.cols() == torch.cols());
  long double worst = 0;
  Index at = 0;
  for (Index i = 0; i < ours.size(); ++i) {
    const long double diff = std::fabs((long double)ours.data()[i] - (long double)torch.data()[i]);
    const long double ratio = bound.data()[i] > 0 ? diff / bound.data()[i] : (diff > 0 ? INFINITY : 0);
    if (ratio > worst) worst = ratio, at = i;
  }
  INFO(what << ": worst element " << at << ": ours " << double(ours.data()[at]) << ", torch " << double(torch.data()[at])
            << ", bound " << double(bound.data()[at]) << " (difference / bound = " << double(worst) << ")");
  CHECK(worst <= 1);
}

Matrix<long double> abs_ld(const auto& m) { return m.template cast<long double>().cwiseAbs(); }

// The comparison with PyTorch. Both sides evaluate the same formulas in T; they differ by
//  - the operands: PyTorch sums mean(x^2) and mean|w| in T (<= (K + 1) u relative error for K terms,
//    recursive-summation bound) and uses rsqrt; bitnet sums in double. n then differs by at most
//    eps_n = (in / 2 + 8) u relative, the activation scale and q = code / sx by eps_n + 4 u, and
//    the STE form n + lambda * (q - n) adds 3 roundings per side: |x~ - x~'| <= eps_x (|n| + |q|) with
//    eps_x = 2 eps_n + 10 u. Likewise |W~ - W~'| <= eps_w (|W| + |Wq|), eps_w = (out * in + 11) u.
//    No code differs: the generator keeps every quantizer input 1e-3 away from a rounding boundary
//    (checked again here on bitnet's side), far more than these few-ulp differences;
//  - the sums of each matrix product (K terms): at most 2 (K + 2) u times the sum of the magnitudes.
// So for z = sum_k a_k b_k with operands perturbed by eps_a m_a, eps_b m_b (m >= |a|, |b|):
//   |z - z'| <= (eps_a + eps_b + eps_a eps_b + 2 (K + 2) u) * sum_k m_a m_b,
// and through RMSNorm's backward dx = r (dn - n mean(dn n)) the perturbation of dn is carried with
// the magnitudes, plus (3 eps_n + 2 (in + 10) u) of the whole magnitude r (|dn| + |n| sum|dn||n| / in).
template <class T>
void check_against_torch(const reference_case& c) {
  INFO("case " << c.name);
  const long double u = std::numeric_limits<T>::epsilon() / 2;
  const Matrix<T> x = tensor<T>(c, "x", c.batch, c.in), w = tensor<T>(c, "w", c.out, c.in);
  const Matrix<T> dy = tensor<T>(c, "dy", c.batch, c.out);
  std::optional<Vector<T>> b;
  if (c.bias) b = Vector<T>(tensor<T>(c, "b", c.out, 1));
  // unit_training_reference.txt: scales per_row / per_group, group G, activations per_token / per_block
  bitnet::bitlinear_options options{.rms_norm = c.rms, .rms_eps = c.eps};
  if (const auto scales = c.keys.find("scales"); scales != c.keys.end()) {
    options.weight_scales = scales->second == "per_row" ? bitnet::weight_scaling::per_row : bitnet::weight_scaling::per_group;
    options.group_size = std::stoi(c.keys.at("group"));
    if (c.keys.at("activations") == "per_block") options.activation_scales = bitnet::activation_scaling::per_block;
  }
  const bool units = options.weight_scales != bitnet::weight_scaling::per_tensor;
  const bool blocks = options.activation_scales == bitnet::activation_scaling::per_block;
  const Index unit = options.weight_scales == bitnet::weight_scaling::per_group ? options.group_size : c.in;
  const BitLinear<T> layer(w, b, options);
  const T lambda = T(c.lambda);
  const auto [y, tape] = bitnet::train_forward(layer, x, lambda);
  const bitnet::bit_linear_gradients<T> grads = bitnet::backward(tape, dy);

  // Magnitudes, from bitnet's side.
  const Matrix<T> n = c.rms ? bitnet::rms_norm(x, T(c.eps)) : x;
  const Matrix<T> q = blocks ? bitnet::activation_quant_blocks(n, unit) : bitnet::activation_quant(n);
  const Matrix<T> qw = units ? bitnet::weight_quant_units(w, options.weight_scales, options.group_size) : bitnet::weight_quant(w);
  auto away_from_ties = [](long double v) { return std::fabs(std::fabs(v) - std::floor(std::fabs(v)) - 0.5L) > 5e-4L; };
  if (units) {
    const Matrix<T> d = bitnet::quantize_weight_units(w, options.weight_scales, options.group_size).scales;
    for (Index r = 0; r < w.rows(); ++r)
      for (Index k = 0; k < w.cols(); ++k) REQUIRE(away_from_ties((long double)w(r, k) / d(r, k / unit)));
  } else {
    const T sw = bitnet::weight_scale(w);
    for (Index i = 0; i < w.size(); ++i) REQUIRE(away_from_ties((long double)w.data()[i] * sw));
  }
  const Matrix<T> sx = blocks ? bitnet::quantize_activation_blocks(n, unit).scales : Matrix<T>(bitnet::activation_scales(n));
  for (Index r = 0; r < n.rows(); ++r)
    for (Index k = 0; k < n.cols(); ++k) REQUIRE(away_from_ties((long double)n(r, k) * sx(r, blocks ? k / unit : 0)));

  const long double eps_n = c.rms ? (long double)(c.in / 2 + 8) * u : 0;
  const long double eps_x = 2 * eps_n + 10 * u;
  const long double eps_w = (long double)(c.out * c.in + 11) * u;
  const Matrix<long double> m_x = abs_ld(n) + abs_ld(q), m_w = abs_ld(w) + abs_ld(qw), m_dy = abs_ld(dy);
  const Index batch = c.batch, in = c.in, out = c.out;

  Matrix<long double> y_bound = (eps_x + eps_w + eps_x * eps_w + 2 * (in + 3) * u) * (m_x * m_w.transpose());
  if (b) y_bound.rowwise() += ((eps_x + eps_w + 2 * (in + 3) * u) * abs_ld(Matrix<T>(b->transpose()))).row(0);
  check_within(y, tensor<T>(c, "y", batch, out), y_bound, "output");

  check_within(grads.weight, tensor<T>(c, "dw", out, in),
               Matrix<long double>((eps_x + 2 * (batch + 2) * u) * (m_dy.transpose() * m_x)), "weight gradient");
  REQUIRE(grads.bias.has_value() == c.bias);
  if (b)
    check_within(Matrix<T>(*grads.bias), tensor<T>(c, "db", out, 1),
                 Matrix<long double>(2 * (batch + 2) * u * m_dy.colwise().sum().transpose()), "bias gradient");

  const Matrix<long double> m_dn = m_dy * m_w;
  const Matrix<long double> e_dn = (eps_w + 2 * (out + 2) * u) * m_dn;
  Matrix<long double> dx_bound = e_dn;
  if (c.rms) {
    const Matrix<long double> m_n = abs_ld(n) * (1 + eps_n);
    const long double c_rms = 3 * eps_n + 2 * (in + 10) * u;
    for (Index r = 0; r < batch; ++r) {
      long double ss = 0;
      for (Index k = 0; k < in; ++k) ss += (long double)x(r, k) * x(r, k);
      const long double inv_rms = (1 + eps_n) / std::sqrt(ss / in + (long double)c.eps);
      const long double carried = (e_dn.row(r).array() * m_n.row(r).array()).sum() / in;
      const long double magnitude = (m_dn.row(r).array() * m_n.row(r).array()).sum() / in;
      for (Index k = 0; k < in; ++k)
        dx_bound(r, k) = inv_rms * (e_dn(r, k) + m_n(r, k) * carried) + c_rms * inv_rms * (m_dn(r, k) + m_n(r, k) * magnitude);
    }
  }
  check_within(grads.input, tensor<T>(c, "dx", batch, in), dx_bound, "input gradient");
}

}  // namespace

TEST_CASE("training: gradients match PyTorch autograd on the published BitLinear (STE, warm-up lambda)") {
  const std::vector<reference_case> cases = read_reference(BITNET_TEST_DATA_DIR "/training_reference.txt");
  REQUIRE(cases.size() == 9);
  for (const reference_case& c : cases) {
    if (c.dtype == "f32")
      check_against_torch<float>(c);
    else
      check_against_torch<double>(c);
  }
}

TEST_CASE("training: per-unit absmean and per-block activations match PyTorch autograd (STE, warm-up lambda)") {
  // The same bounds hold: d = mean|w| over a unit is rounded from a double mean on both sides.
  const std::vector<reference_case> cases = read_reference(BITNET_TEST_DATA_DIR "/unit_training_reference.txt");
  REQUIRE(cases.size() == 6);
  for (const reference_case& c : cases) {
    if (c.dtype == "f32")
      check_against_torch<float>(c);
    else
      check_against_torch<double>(c);
  }
}

// ---- hand-computed cases: every value exact --------------------------------------------------------

TEST_CASE_TEMPLATE("training: hand-computed forward and backward at lambda 1, 1/2 and 0", T, float, double) {
  // mean|W| = 8 / 8 = 1 -> sw = 1, Wq = [[1,-1,0,1],[-1,1,1,0]] (2 -> 1, -2 -> -1 clamped).
  Matrix<T> w(2, 4);
  w << 1, -1, 0, 2,
       -2, 1, 1, 0;
  Vector<T> b(2);
  b << T(0.5), T(-1);
  const BitLinear<T> layer(w, b);
  // max|x| = 127 -> sx = 1; 62.5 is a tie: q = 62 (half to even).
  Matrix<T> x(1, 4);
  x << 127, -127, T(62.5), 0;
  Matrix<T> dy(1, 2);
  dy << 2, -1;

  SUBCASE("lambda 1: x~ = q(x), W~ = Wq") {
    const auto [y, tape] = bitnet::train_forward(layer, x, 1.0);
    // acc0 = 127 + 127 = 254; acc1 = -127 - 127 + 62 = -192
    CHECK(y(0, 0) == T(254.5));
    CHECK(y(0, 1) == T(-193));
    const auto g = bitnet::backward(tape, dy);
    Matrix<T> dx(1, 4), dw(2, 4);
    dx << 3, -3, -1, 2;  // dy . Wq = 2 [1,-1,0,1] - [-1,1,1,0]
    dw << 254, -254, 124, 0,
          -127, 127, -62, 0;  // dy^T . q(x)
    CHECK(g.input == dx);
    CHECK(g.weight == dw);
    REQUIRE(g.bias);
    CHECK((*g.bias)(0) == T(2));
    CHECK((*g.bias)(1) == T(-1));
  }
  SUBCASE("lambda 1/2: halfway between the float and the ternary layer") {
    const auto [y, tape] = bitnet::train_forward(layer, x, 0.5);
    // x~ = x + (q - x) / 2 = [127, -127, 62.25, 0]; W~ = W + (Wq - W) / 2 = [[1,-1,0,1.5],[-1.5,1,1,0]]
    CHECK(tape.input_operand()(0, 2) == T(62.25));
    CHECK(tape.weight_operand()(0, 3) == T(1.5));
    CHECK(tape.weight_operand()(1, 0) == T(-1.5));
    CHECK(y(0, 0) == T(254.5));                      // 127 + 127 + 0.5
    CHECK(y(0, 1) == T(-256.25));                    // -1.5 * 127 - 127 + 62.25 - 1
    const auto g = bitnet::backward(tape, dy);
    Matrix<T> dx(1, 4);
    dx << T(3.5), -3, -1, 3;  // 2 [1,-1,0,1.5] - [-1.5,1,1,0]
    CHECK(g.input == dx);
    CHECK(g.weight(0, 2) == T(124.5));
    CHECK(g.weight(1, 2) == T(-62.25));
  }
  SUBCASE("lambda 0: the float layer") {
    const auto [y, tape] = bitnet::train_forward(layer, x, 0.0);
    const bitnet::Linear<T> dense(w, b);
    CHECK(same_bits(y, dense.forward(x)));
    const auto g = bitnet::backward(tape, dy);
    CHECK(g.input == Matrix<T>(dy * w));
    CHECK(g.weight == Matrix<T>(dy.transpose() * x));
  }
}

TEST_CASE_TEMPLATE("training: weight ties +-1/2 go to the even code 0 in W~", T, float, double) {
  // mean|W| = 4 / 4 = 1 -> sw = 1: W * sw = [0.5, -0.5, 1.5, -1.5] -> round half to even [0, 0, 2, -2]
  // -> clamped codes [0, 0, 1, -1].
  Matrix<T> w(1, 4);
  w << T(0.5), T(-0.5), T(1.5), T(-1.5);
  const BitLinear<T> layer(w);
  const Matrix<T> x = Matrix<T>::Ones(1, 4);
  Matrix<T> expected(1, 4);
  expected << 0, 0, 1, -1;
  CHECK(bitnet::train_forward(layer, x, 1.0).tape.weight_operand() == expected);
  // lambda 1/2: W + (Wq - W) / 2 = [0.25, -0.25, 1.25, -1.25]
  expected << T(0.25), T(-0.25), T(1.25), T(-1.25);
  CHECK(bitnet::train_forward(layer, x, 0.5).tape.weight_operand() == expected);
}

TEST_CASE_TEMPLATE("training: RMSNorm backward against a hand derivation", T, float, double) {
  // x = [3, 4]: mean(x^2) = 12.5, r = 1 / sqrt(12.5 + eps); W = I (mean|W| = 1/2, sw = 2, Wq = W / ...).
  // Use lambda 0 so the product is exact: dn = dy . W = dy; dx = r (dn - n mean(dn n)).
  Matrix<T> w = Matrix<T>::Identity(2, 2);
  const BitLinear<T> layer(w, std::nullopt, {.rms_norm = true, .rms_eps = 0.5f});  // mean(x^2) + eps = 13
  Matrix<T> x(1, 2);
  x << 3, 4;
  Matrix<T> dy(1, 2);
  dy << 1, 0;
  const auto [y, tape] = bitnet::train_forward(layer, x, 0.0);
  const auto g = bitnet::backward(tape, dy);
  // n = x / sqrt(13); dn = [1, 0]; mean(dn n) = 3 / (2 sqrt 13); dx = (1/sqrt13)([1,0] - x/sqrt13 * 3/(2 sqrt13))
  //    = (1/sqrt13) [1 - 9/26, -12/26] = [17/26, -6/13] / sqrt 13
  const double s13 = std::sqrt(13.0);
  CHECK(double(g.input(0, 0)) == doctest::Approx(17.0 / 26.0 / s13).epsilon(1e-6));
  CHECK(double(g.input(0, 1)) == doctest::Approx(-6.0 / 13.0 / s13).epsilon(1e-6));
  // Finite differences of L = y . dy through the whole layer (lambda 0: smooth).
  const double h = std::is_same_v<T, double> ? 1e-6 : 1e-2;
  for (Index k = 0; k < 2; ++k) {
    Matrix<T> xp = x, xm = x;
    xp(0, k) += T(h);
    xm(0, k) -= T(h);
    const double lp = double((bitnet::train_forward(layer, xp, 0.0).output.array() * dy.array()).sum());
    const double lm = double((bitnet::train_forward(layer, xm, 0.0).output.array() * dy.array()).sum());
    CHECK(double(g.input(0, k)) == doctest::Approx((lp - lm) / (2 * h)).epsilon(std::is_same_v<T, double> ? 1e-6 : 1e-3));
  }
}

// ---- exactness promises ----------------------------------------------------------------------------

TEST_CASE_TEMPLATE("training: lambda 1 is forward() bit for bit, also after optimizer steps", T, float, double) {
  std::mt19937 rng(17);
  for (const bool rms : {false, true})
    for (const Index in : {1, 7, 128, 129, 300}) {
      INFO("rms_norm " << rms << ", in " << in);
      const Index out = 5, batch = 9;
      BitLinear<T> layer(reference::random_matrix<T>(out, in, rng, 0.5),
                         Vector<T>(reference::random_matrix<T>(out, 1, rng, 0.1)), {.rms_norm = rms});
      const Matrix<T> x = reference::random_matrix<T>(batch, in, rng, 3.0);
      for (int step = 0; step < 3; ++step) {
        const auto [y, tape] = bitnet::train_forward(layer, x, 1.0);
        CHECK(same_bits(y, layer.forward(x)));
        // The tape's operands are the quantized ones, exactly.
        CHECK(same_bits(tape.weight_operand(), bitnet::weight_quant(layer.weight())));
        CHECK(same_bits(tape.input_operand(), bitnet::activation_quant(rms ? bitnet::rms_norm(x, T(1e-6)) : x)));
        const auto g = bitnet::backward(tape, reference::random_matrix<T>(batch, out, rng));
        layer.set_weight(layer.weight() - T(0.05) * g.weight);
        const BitLinear<T> fresh(layer.weight(), layer.bias(), layer.options());
        CHECK(same_bits(bitnet::train_forward(layer, x, 1.0).output, fresh.forward(x)));
      }
    }
}

TEST_CASE_TEMPLATE("training: lambda 0 is the float layer (on the normalized input)", T, float, double) {
  std::mt19937 rng(5);
  const Matrix<T> w = reference::random_matrix<T>(6, 11, rng, 0.5);
  const Vector<T> b = reference::random_matrix<T>(6, 1, rng, 0.1);
  const Matrix<T> x = reference::random_matrix<T>(4, 11, rng, 2.0);
  const bitnet::Linear<T> dense(w, b);
  CHECK(same_bits(bitnet::train_forward(BitLinear<T>(w, b), x, 0.0).output, dense.forward(x)));
  // The layer's eps is 1e-6 in T (bitlinear_options::rms_eps is a double): for double exactly what
  // rms_norm<double> and PyTorch float64 use, not the float 9.99999997e-7.
  CHECK(same_bits(bitnet::train_forward(BitLinear<T>(w, b, {.rms_norm = true}), x, 0.0).output,
                  dense.forward(bitnet::rms_norm(x, T(1e-6)))));
  CHECK(same_bits(BitLinear<T>(w, b, {.rms_norm = true}).forward(x),
                  BitLinear<T>(w, b).forward(bitnet::rms_norm(x))));
}

TEST_CASE("training: lambda mixes each operand in PyTorch's order, v + lambda * (q(v) - v)") {
  std::mt19937 rng(9);
  const Matrix<float> w = reference::random_matrix<float>(4, 10, rng, 0.5);
  const Matrix<float> x = reference::random_matrix<float>(3, 10, rng, 2.0);
  const BitLinear<float> layer(w);
  const float lambda = 0.3f;
  const auto [y, tape] = bitnet::train_forward(layer, x, lambda);
  const Matrix<float> qw = reference::weight_quant(w), qx = reference::activation_quant(x);
  for (Index i = 0; i < w.size(); ++i) {
    const float d = qw.data()[i] - w.data()[i];
    const float mixed = w.data()[i] + lambda * d;
    CHECK(tape.weight_operand().data()[i] == mixed);
  }
  for (Index i = 0; i < x.size(); ++i) {
    const float d = qx.data()[i] - x.data()[i];
    const float mixed = x.data()[i] + lambda * d;
    CHECK(tape.input_operand().data()[i] == mixed);
  }
  // The product itself: x~ . W~^T, summed in long double, within the rounding of a 10-term sum.
  for (Index r = 0; r < 3; ++r)
    for (Index o = 0; o < 4; ++o) {
      long double sum = 0, magnitude = 0;
      for (Index k = 0; k < 10; ++k) {
        const long double t = (long double)tape.input_operand()(r, k) * tape.weight_operand()(o, k);
        sum += t;
        magnitude += std::fabs(t);
      }
      CHECK(std::fabs((long double)y(r, o) - sum) <= 12 * (std::numeric_limits<float>::epsilon() / 2) * magnitude);
    }
}

TEST_CASE("training: the tape is independent of later changes to the layer") {
  std::mt19937 rng(21);
  BitLinear<float> layer(reference::random_matrix<float>(5, 8, rng, 0.5), Vector<float>::Zero(5), {.rms_norm = true});
  const Matrix<float> x = reference::random_matrix<float>(3, 8, rng), dy = reference::random_matrix<float>(3, 5, rng);
  const auto [y, tape] = bitnet::train_forward(layer, x, 0.5);
  const auto before = bitnet::backward(tape, dy);
  layer.set_weight(Matrix<float>::Constant(5, 8, 7.0f));
  layer.set_bias(std::nullopt);
  const auto after = bitnet::backward(tape, dy);
  CHECK(same_bits(before.input, after.input));
  CHECK(same_bits(before.weight, after.weight));
  CHECK(after.bias.has_value());
  CHECK(tape.memory_bytes() == (3 * 8 + 5 * 8 + 3 * 8 + 3) * sizeof(float));
}

TEST_CASE_TEMPLATE("training: a batch of 0 rows", T, float, double) {
  const BitLinear<T> layer(Matrix<T>::Ones(3, 4), Vector<T>::Ones(3), {.rms_norm = true});
  for (const double lambda : {0.0, 0.5, 1.0}) {
    const auto [y, tape] = bitnet::train_forward(layer, Matrix<T>(0, 4), lambda);
    CHECK(y.rows() == 0);
    CHECK(y.cols() == 3);
    const auto g = bitnet::backward(tape, Matrix<T>(0, 3));
    CHECK(g.input.rows() == 0);
    CHECK(g.input.cols() == 4);
    CHECK(g.weight == Matrix<T>::Zero(3, 4));
    CHECK(*g.bias == Vector<T>::Zero(3));
  }
}

// ---- errors ------------------------------------------------------------------------------------------

TEST_CASE("training: a layer without latent weights cannot be trained (state_error)") {
  BitLinear<float> released(Matrix<float>::Ones(2, 3));
  released.release_latent_weights();
  const Matrix<float> x = Matrix<float>::Ones(1, 3);
  CHECK_THROWS_WITH_AS(bitnet::train_forward(released, x), doctest::Contains("has no latent weights"), bitnet::state_error);
  CHECK_THROWS_WITH_AS(bitnet::train_forward(released, x), doctest::Contains("cannot be trained"), bitnet::state_error);
  const auto loaded = BitLinear<float>::from_ternary(Matrix<std::int8_t>::Ones(2, 3), 1.0f);
  CHECK_THROWS_WITH_AS(bitnet::train_forward(loaded, x, 0.0), doctest::Contains("cannot be trained"), bitnet::state_error);
  // set_weight gives it latent weights: then it trains.
  released.set_weight(Matrix<float>::Ones(2, 3));
  CHECK(bitnet::train_forward(released, x).output.rows() == 1);
}

TEST_CASE("training: bad lambda, input and output gradient are clear errors") {
  const BitLinear<float> layer(Matrix<float>::Ones(2, 3), Vector<float>::Zero(2));
  const Matrix<float> x = Matrix<float>::Ones(4, 3);
  for (const float lambda : {-0.1f, 1.5f, std::numeric_limits<float>::quiet_NaN(), INFINITY})
    CHECK_THROWS_WITH_AS(bitnet::train_forward(layer, x, lambda), doctest::Contains("lambda must be in [0, 1]"),
                         bitnet::value_error);
  CHECK_THROWS_WITH_AS(bitnet::train_forward(layer, Matrix<float>::Ones(4, 5)),
                       doctest::Contains("train_forward: input has 5 features, the layer expects 3"), bitnet::shape_error);
  Matrix<float> bad = x;
  bad(2, 1) = std::numeric_limits<float>::quiet_NaN();
  CHECK_THROWS_WITH_AS(bitnet::train_forward(layer, bad, 0.0),
                       doctest::Contains("train_forward: input: non-finite value (nan) at row 2, column 1"), bitnet::value_error);

  auto [y, tape] = bitnet::train_forward(layer, x);
  CHECK_THROWS_WITH_AS(bitnet::backward(tape, Matrix<float>::Ones(3, 2)),
                       doctest::Contains("output gradient is 3x2, the forward's output was 4x2"), bitnet::shape_error);
  CHECK_THROWS_WITH_AS(bitnet::backward(tape, Matrix<float>::Ones(4, 3)), doctest::Contains("output gradient is 4x3"),
                       bitnet::shape_error);
  Matrix<float> bad_dy = Matrix<float>::Ones(4, 2);
  bad_dy(3, 0) = -INFINITY;
  CHECK_THROWS_WITH_AS(bitnet::backward(tape, bad_dy),
                       doctest::Contains("output gradient: non-finite value (-inf) at row 3, column 0"), bitnet::value_error);
  const bitnet::bit_linear_tape<float> taken = std::move(tape);
  CHECK(bitnet::backward(taken, Matrix<float>::Ones(4, 2)).weight.rows() == 2);
  CHECK_THROWS_WITH_AS(bitnet::backward(tape, Matrix<float>::Ones(4, 2)), doctest::Contains("the tape is empty"),
                       bitnet::state_error);
}

TEST_CASE("training: tapes kept in a map by path, as the docs' loop does") {
  std::mt19937 rng(13);
  const BitLinear<float> layer(reference::random_matrix<float>(3, 5, rng, 0.5));
  const Matrix<float> x = reference::random_matrix<float>(2, 5, rng, 1.0);
  std::map<std::string, bitnet::bit_linear_tape<float>> tapes;
  CHECK_THROWS_WITH_AS(bitnet::backward(tapes["fc1"], Matrix<float>::Ones(2, 3)),
                       doctest::Contains("the tape is empty (default-constructed"), bitnet::state_error);
  auto [y, tape] = bitnet::train_forward(layer, x, 0.5);
  const auto expected = bitnet::backward(tape, Matrix<float>::Ones(2, 3));
  tapes["fc1"] = std::move(tape);
  const auto from_map = bitnet::backward(tapes["fc1"], Matrix<float>::Ones(2, 3));
  CHECK(from_map.weight == expected.weight);
  CHECK(from_map.input == expected.input);
}

TEST_CASE("training: quantization_warmup is min(step / warmup_steps, 1)") {
  CHECK(bitnet::quantization_warmup(0) == 0.0);
  CHECK(bitnet::quantization_warmup(250) == 0.25);
  CHECK(bitnet::quantization_warmup(999) == 0.999);
  CHECK(bitnet::quantization_warmup(1000) == 1.0);
  CHECK(bitnet::quantization_warmup(5000) == 1.0);
  CHECK(bitnet::quantization_warmup(3, 4) == 0.75);
  CHECK_THROWS_WITH_AS(bitnet::quantization_warmup(-1), doctest::Contains("step must be >= 0, got -1"), bitnet::value_error);
  CHECK_THROWS_WITH_AS(bitnet::quantization_warmup(1, 0), doctest::Contains("warmup_steps must be > 0, got 0"),
                       bitnet::value_error);
}

TEST_CASE("training: for_each_bit_linear visits every BitLinear with its path, skipping float layers") {
  fixtures::transformer t = fixtures::make_transformer(2, 4, 3);
  bitnet::replace_options options;
  options.exclude = {"head"};
  bitnet::replace_linear(t, options);
  std::vector<std::string> paths;
  bitnet::for_each_bit_linear(t, [&](std::string_view path, BitLinear<float>& layer) {
    paths.emplace_back(path);
    layer.set_bias(std::nullopt);  // a mutable reference into the graph
  });
  CHECK(paths == std::vector<std::string>{"blocks.0.attn", "blocks.0.mlp.up", "blocks.0.mlp.down", "blocks.1.attn",
                                          "blocks.1.mlp.up", "blocks.1.mlp.down"});
  CHECK(!std::get<BitLinear<float>>(t.blocks[1].mlp.down).bias().has_value());
  CHECK(std::holds_alternative<bitnet::Linear<float>>(t.head));

  // Polymorphic trees: the BitLinear behind a base pointer (bitnet_as_bit_linear).
  std::unique_ptr<fixtures::module> tree = fixtures::make_module_tree(4);
  bitnet::replace_linear(tree);
  paths.clear();
  bitnet::for_each_bit_linear(tree, [&](std::string_view path, BitLinear<float>&) { paths.emplace_back(path); });
  CHECK(paths == std::vector<std::string>{"layers.0.q", "layers.0.o", "layers.1.q", "layers.1.o", "lm_head"});
}

// ---- Frozen scales: fine-tuning an exactly imported ternary model (bitlinear_options::scale_update) ----

namespace {

// Weights ternary per unit of `unit` inputs, as Ternary Bonsai's unpacked folders hold them: each
// unit of a row is {-d, 0, +d} for one d (a multiple of 2^-14: exact in T), about a third zeros.
template <class T>
Matrix<T> ternary_per_unit(Index out, Index in, Index unit, std::mt19937& rng) {
  std::uniform_int_distribution<int> code(-1, 1), step(1, 4000);
  Matrix<T> w(out, in);
  for (Index r = 0; r < out; ++r)
    for (Index first = 0; first < in; first += unit) {
      const T d = T(std::ldexp(double(step(rng)), -14));
      for (Index c = first; c < std::min(in, first + unit); ++c) w(r, c) = T(code(rng)) * d;
    }
  return w;
}

bitnet::bitlinear_options unit_options(bitnet::weight_scaling scales, Index group,
                                       bitnet::activation_scaling activations = bitnet::activation_scaling::per_token) {
  bitnet::bitlinear_options o;
  o.weight_scales = scales;
  o.group_size = group;
  o.activation_scales = activations;
  return o;
}

// The sum over k of |a(., k)| |b(., k)| for each (i, j): the magnitude a product's rounding scales with.
template <class T>
Matrix<long double> magnitudes(const Matrix<T>& a, const Matrix<T>& b_transposed) {
  Matrix<long double> m(a.rows(), b_transposed.rows());
  for (Index i = 0; i < a.rows(); ++i)
    for (Index j = 0; j < b_transposed.rows(); ++j) {
      long double sum = 0;
      for (Index k = 0; k < a.cols(); ++k) sum += std::fabs((long double)a(i, k) * (long double)b_transposed(j, k));
      m(i, j) = sum;
    }
  return m;
}

}  // namespace

TEST_CASE_TEMPLATE("training: an exactly imported layer fine-tunes from exactly itself (frozen scales)", T, float,
                   double) {
  using bitnet::activation_scaling;
  using bitnet::weight_scale_update;
  using bitnet::weight_scaling;
  std::mt19937 rng(41);
  struct config {
    const char* name;
    bitnet::bitlinear_options options;
    Index in;
    bool rotated;
  };
  const config configs[] = {
      {"per_group 64, ragged last group", unit_options(weight_scaling::per_group, 64), 200, false},
      {"per_row, rms_norm", unit_options(weight_scaling::per_row, 0), 77, false},
      {"per_group 32, per_block activations, rotation block 32",
       unit_options(weight_scaling::per_group, 32, activation_scaling::per_block), 128, true},
  };
  for (config c : configs) {
    INFO(c.name);
    const Index out = 6, batch = 5;
    if (c.options.weight_scales == weight_scaling::per_row) c.options.rms_norm = true;
    if (c.rotated) c.options.rotation = bitnet::hadamard_rotation::random_signs(c.in, 32, 7);
    const Index unit = c.options.weight_scales == weight_scaling::per_row ? c.in : c.options.group_size;
    const Matrix<T> w = ternary_per_unit<T>(out, c.in, unit, rng);
    const Vector<T> b = reference::random_matrix<T>(out, 1, rng, 0.1);
    const Matrix<T> x = reference::random_matrix<T>(batch, c.in, rng, 2.0);

    // The import is frozen whatever the options said (their default is absmean).
    REQUIRE(c.options.scale_update == weight_scale_update::absmean);
    const BitLinear<T> imported = BitLinear<T>::from_exact_ternary(w, b, c.options);
    CHECK(imported.options().scale_update == weight_scale_update::frozen);
    const Matrix<T> y_imported = imported.forward(x);

    // Step 0: latent weights = the imported weights. Nothing changes, bit for bit.
    BitLinear<T> layer = imported;
    layer.set_weight(imported.dequantized_weight());
    CHECK(layer.ternary_weight() == imported.ternary_weight());
    CHECK(same_bits(layer.unit_scales(), imported.unit_scales()));
    CHECK(same_bits(layer.forward(x), y_imported));
    const auto [y1, tape1] = bitnet::train_forward(layer, x, T(1));
    CHECK(same_bits(y1, y_imported));
    CHECK(same_bits(tape1.weight_operand(), imported.dequantized_weight()));

    // lambda 0 is the float layer of the imported weights on the (normalized, rotated) input.
    Matrix<T> n = c.options.rms_norm ? bitnet::rms_norm(x, T(1e-6)) : x;
    if (c.options.rotation) n = c.options.rotation->apply(n);
    const bitnet::Linear<T> dense(imported.dequantized_weight(), b);
    const Matrix<T> y_float = dense.forward(n);
    CHECK(same_bits(bitnet::train_forward(layer, x, T(0)).output, y_float));

    // In between, W~ = W (the weights are their own quantization) and only x~ moves: the output is
    // within lambda times the activation-quantization error of the float layer, plus rounding.
    const T lambda = T(0.375);
    const Matrix<T> aq = c.options.activation_scales == activation_scaling::per_block
                             ? bitnet::activation_quant_blocks(n, c.options.group_size)
                             : bitnet::activation_quant(n);
    const auto [y_mixed, tape_mixed] = bitnet::train_forward(layer, x, lambda);
    CHECK(same_bits(tape_mixed.weight_operand(), imported.dequantized_weight()));
    const Matrix<T> wd = imported.dequantized_weight();
    const Matrix<long double> float_magnitude = magnitudes(n, wd), quant_magnitude = magnitudes(aq, wd);
    const long double u = std::numeric_limits<T>::epsilon();
    for (Index r = 0; r < batch; ++r)
      for (Index o = 0; o < out; ++o) {
        long double quant_error = 0;
        for (Index k = 0; k < c.in; ++k)
          quant_error += std::fabs((long double)wd(o, k)) * std::fabs((long double)n(r, k) - (long double)aq(r, k));
        const long double bound = (long double)lambda * quant_error +
                                  2 * (c.in + 4) * u * (float_magnitude(r, o) + quant_magnitude(r, o) + std::fabs(b(o)));
        CHECK(std::fabs((long double)y_mixed(r, o) - (long double)y_float(r, o)) <= bound);
      }

    // What absmean would have done at step 0 (the scales become d times the nonzero fraction): the
    // outputs jump. This is what frozen prevents.
    BitLinear<T> absmean_layer(imported.dequantized_weight(), b, c.options);
    CHECK(absmean_layer.options().scale_update == weight_scale_update::absmean);
    CHECK_FALSE(same_bits(absmean_layer.forward(x), y_imported));
  }
}

TEST_CASE_TEMPLATE("training: frozen scales quantize round-clip(w / d) against the kept d; gradients against a naive "
                   "reference",
                   T, float, double) {
  using bitnet::weight_scale_update;
  using bitnet::weight_scaling;
  std::mt19937 rng(43);
  const Index out = 5, in = 80, group = 32, batch = 6;  // groups of 32, 32 and a ragged 16
  const auto options = unit_options(weight_scaling::per_group, group);
  const Matrix<T> w = ternary_per_unit<T>(out, in, group, rng);
  const Vector<T> b = reference::random_matrix<T>(out, 1, rng, 0.1);
  BitLinear<T> layer = BitLinear<T>::from_exact_ternary(w, b, options);
  const Matrix<T> d = layer.unit_scales();

  // Latent weights after some optimizer steps: the imported ones moved by up to 0.8 d, some past
  // +-d/2, a few far past d, and the ties +-d/2 (which go to the even code 0).
  std::uniform_real_distribution<double> move(-0.8, 0.8);
  Matrix<T> latent(out, in);
  for (Index r = 0; r < out; ++r)
    for (Index c = 0; c < in; ++c) latent(r, c) = w(r, c) + T(move(rng)) * d(r, c / group);
  latent(0, 0) = d(0, 0) * T(0.5);
  latent(0, 1) = -d(0, 0) * T(0.5);
  latent(1, 40) = d(1, 1) * T(3);
  latent(2, 70) = -d(2, 2) * T(5);
  layer.set_weight(latent);
  CHECK(same_bits(layer.unit_scales(), d));  // kept, bit for bit
  Matrix<std::int8_t> codes(out, in);
  for (Index r = 0; r < out; ++r)
    for (Index c = 0; c < in; ++c)
      codes(r, c) = std::int8_t(reference::clamp(reference::round_half_even(latent(r, c) / d(r, c / group)), T(-1), T(1)));
  CHECK(layer.ternary_weight() == codes);
  CHECK(codes(0, 0) == 0);
  CHECK(codes(0, 1) == 0);
  CHECK(codes(1, 40) == 1);
  CHECK(codes(2, 70) == -1);
  // absmean would have derived new scales from the same latent weights.
  bitnet::bitlinear_options absmean = options;
  CHECK_FALSE(same_bits(BitLinear<T>(latent, b, absmean).unit_scales(), d));

  const Matrix<T> x = reference::random_matrix<T>(batch, in, rng, 2.0);
  const Matrix<T> dy = reference::random_matrix<T>(batch, out, rng);
  const Matrix<T> aq = reference::activation_quant(x);
  for (const T lambda : {T(1), T(0.375)}) {
    INFO("lambda " << double(lambda));
    // The naive operands: W~ = W + lambda (q(W) - W) with q(W) = code * d, x~ likewise (PyTorch's order).
    Matrix<T> w_mixed(out, in), x_mixed(batch, in);
    for (Index r = 0; r < out; ++r)
      for (Index c = 0; c < in; ++c) {
        const T q = T(codes(r, c)) * d(r, c / group);
        w_mixed(r, c) = lambda == T(1) ? q : latent(r, c) + lambda * (q - latent(r, c));
      }
    for (Index r = 0; r < batch; ++r)
      for (Index c = 0; c < in; ++c) x_mixed(r, c) = lambda == T(1) ? aq(r, c) : x(r, c) + lambda * (aq(r, c) - x(r, c));
    const auto [y, tape] = bitnet::train_forward(layer, x, lambda);
    CHECK(same_bits(tape.weight_operand(), w_mixed));
    CHECK(same_bits(tape.input_operand(), x_mixed));
    if (lambda == T(1)) CHECK(same_bits(y, layer.forward(x)));
    const auto g = bitnet::backward(tape, dy);

    // Products in long double against bitnet's in T: within 2 (K + 2) u of the term magnitudes (the
    // output: plus its bias, added in T).
    const long double u = std::numeric_limits<T>::epsilon();
    auto check_product = [&](const Matrix<T>& ours, const Matrix<T>& a, const Matrix<T>& bt, const Vector<T>* bias,
                             const char* what) {
      INFO(what);
      const Matrix<long double> m = magnitudes(a, bt);
      for (Index i = 0; i < ours.rows(); ++i)
        for (Index j = 0; j < ours.cols(); ++j) {
          long double exact = bias ? (long double)(*bias)(j) : 0;
          for (Index t = 0; t < a.cols(); ++t) exact += (long double)a(i, t) * (long double)bt(j, t);
          const long double magnitude = m(i, j) + (bias ? std::fabs((long double)(*bias)(j)) : 0);
          CHECK(std::fabs((long double)ours(i, j) - exact) <= 2 * (a.cols() + 3) * u * magnitude);
        }
    };
    check_product(y, x_mixed, w_mixed, &b, "y");
    check_product(g.weight, Matrix<T>(dy.transpose()), Matrix<T>(x_mixed.transpose()), nullptr, "dW");
    check_product(g.input, dy, Matrix<T>(w_mixed.transpose()), nullptr, "dx");
    REQUIRE(g.bias);
    for (Index o = 0; o < out; ++o) {
      long double sum = 0, magnitude = 0;
      for (Index r = 0; r < batch; ++r) sum += dy(r, o), magnitude += std::fabs((long double)dy(r, o));
      CHECK(std::fabs((long double)(*g.bias)(o) - sum) <= 2 * (batch + 2) * u * magnitude);
    }
  }
}

TEST_CASE("training: frozen per-tensor scale, frozen units of scale 0, and what absmean does instead") {
  using bitnet::weight_scale_update;
  std::mt19937 rng(47);
  const Matrix<float> w0 = reference::random_matrix<float>(4, 70, rng, 0.5);
  BitLinear<float> frozen(w0, std::nullopt, {.scale_update = weight_scale_update::frozen});
  BitLinear<float> absmean(w0);
  const float sw = reference::weight_scale(w0);  // the first quantization is absmean either way
  CHECK(frozen.weight_scale() == sw);
  CHECK(absmean.weight_scale() == sw);
  const Matrix<float> w1 = w0 * 3.0f;
  frozen.set_weight(w1);
  absmean.set_weight(w1);
  CHECK(frozen.weight_scale() == sw);
  CHECK(frozen.ternary_weight() == reference::weight_codes(w1, sw));
  CHECK(absmean.weight_scale() == reference::weight_scale(w1));
  CHECK(absmean.weight_scale() != sw);
  // A packed b1.58 checkpoint made frozen keeps its sw through set_weight(dequantized_weight()).
  const Matrix<std::int8_t> codes = reference::weight_codes(w0, sw);
  auto loaded = BitLinear<float>::from_ternary(codes, 2.5f, std::nullopt, {.scale_update = weight_scale_update::frozen});
  const Matrix<float> y = loaded.forward(w0);
  loaded.set_weight(loaded.dequantized_weight());
  CHECK(loaded.weight_scale() == 2.5f);
  CHECK(same_bits(loaded.forward(w0), y));

  // A unit whose imported scale is 0 (files store all-zero blocks so) stays zero: codes 0.
  bitnet::bitlinear_options grouped = unit_options(bitnet::weight_scaling::per_group, 32);
  grouped.scale_update = weight_scale_update::frozen;
  Matrix<float> scales(2, 2);
  scales << 0.5f, 0.0f, 0.25f, 0.125f;
  auto zero_unit = BitLinear<float>::from_ternary(Matrix<std::int8_t>::Ones(2, 64), scales, std::nullopt, grouped);
  zero_unit.set_weight(Matrix<float>::Constant(2, 64, 1.0f));
  const Matrix<std::int8_t> got = zero_unit.ternary_weight();
  CHECK(got.block(0, 0, 1, 32) == Matrix<std::int8_t>::Ones(1, 32));
  CHECK(got.block(0, 32, 1, 32) == Matrix<std::int8_t>::Zero(1, 32));
  CHECK(got.block(1, 0, 1, 64) == Matrix<std::int8_t>::Ones(1, 64));
  CHECK(same_bits(zero_unit.unit_scales(), scales));

  bitnet::bitlinear_options bad;
  bad.scale_update = static_cast<weight_scale_update>(7);
  CHECK_THROWS_WITH_AS(BitLinear<float>(w0, std::nullopt, bad), doctest::Contains("scale_update is not absmean or frozen"),
                       bitnet::value_error);
}
