#include <bitnet/verify.hpp>

#include <algorithm>
#include <cmath>
#include <limits>
#include <vector>

#include <doctest/doctest.h>

#include <bitnet/replace.hpp>

#include "graph_fixtures.hpp"

using bitnet::Matrix;

TEST_CASE("compare_outputs: hand-computed max abs error, relative error and cosine similarity") {
  Matrix<double> before(1, 2), after(1, 2);
  before << 3, 4;
  after << 3, 5;
  const auto d = bitnet::compare_outputs(before, after);
  CHECK(d.max_abs_error == 1);
  CHECK(d.relative_error == doctest::Approx(1.0 / 5.0));                   // |(0,1)| / |(3,4)|
  CHECK(d.cosine_similarity == doctest::Approx(29.0 / (5 * std::sqrt(34.0))));  // (9 + 20) / (5 sqrt 34)
  CHECK(d.values == 2);

  const auto same = bitnet::compare_outputs(before, before);
  CHECK(same.max_abs_error == 0);
  CHECK(same.relative_error == 0);
  CHECK(same.cosine_similarity == doctest::Approx(1.0));

  Matrix<double> opposite = -before;
  CHECK(bitnet::compare_outputs(before, opposite).cosine_similarity == doctest::Approx(-1.0));
  const Matrix<double> zero = Matrix<double>::Zero(1, 2);
  CHECK(bitnet::compare_outputs(zero, zero).cosine_similarity == 1);
  CHECK(bitnet::compare_outputs(before, zero).cosine_similarity == 0);
  CHECK(std::isinf(bitnet::compare_outputs(zero, before).relative_error));
}

TEST_CASE("compare_outputs: shape mismatch and non-finite outputs are errors") {
  const Matrix<float> a = Matrix<float>::Ones(2, 3);
  CHECK_THROWS_WITH_AS(bitnet::compare_outputs(a, Matrix<float>(Matrix<float>::Ones(3, 2))),
                       "compare_outputs: output: the output is 3x2, the reference is 2x3", bitnet::shape_error);
  Matrix<float> b = a;
  b(1, 2) = std::numeric_limits<float>::quiet_NaN();
  CHECK_THROWS_WITH_AS(bitnet::compare_outputs(a, b),
                       "compare_outputs: output: output: non-finite value (nan) at row 1, column 2", bitnet::value_error);
}

TEST_CASE("record_outputs / compare_outputs: a model before and after replace_linear, with the user's forward") {
  auto model = fixtures::make_transformer(2, 16, 3);
  const auto forward = [](fixtures::transformer& t, const Matrix<float>& x) {
    auto run = [](fixtures::slot& s, const Matrix<float>& in) {
      return std::visit([&](const auto& layer) { return Matrix<float>(layer.forward(in)); }, s);
    };
    Matrix<float> h = x;
    for (auto& b : t.blocks) {
      h += run(b.attn, h);
      h += run(b.mlp.down, Matrix<float>(run(b.mlp.up, h).cwiseMax(0.0f)));
    }
    return run(t.head, h);
  };
  std::mt19937 rng(4);
  std::vector<Matrix<float>> probes{reference::random_matrix<float>(4, 16, rng), reference::random_matrix<float>(2, 16, rng)};
  const auto before = bitnet::record_outputs(model, forward, probes);
  REQUIRE(before.outputs.size() == 2);
  CHECK(before.outputs[0] == forward(model, probes[0]));

  const auto unchanged = bitnet::compare_outputs(before, model, forward);
  CHECK(unchanged.max_abs_error == 0);
  CHECK(unchanged.values == 6 * 3);

  bitnet::replace_linear(model);
  const auto d = bitnet::compare_outputs(before, model, forward);
  CHECK(d.values == 18);
  // the same numbers computed naively over both probes' outputs
  double max_abs = 0, diff2 = 0, before2 = 0, after2 = 0, dot = 0;
  for (std::size_t p = 0; p < probes.size(); ++p) {
    const Matrix<float> after = forward(model, probes[p]);
    for (bitnet::Index i = 0; i < after.size(); ++i) {
      const double a = after.data()[i], b = before.outputs[p].data()[i];
      max_abs = std::max(max_abs, std::abs(a - b));
      diff2 += (a - b) * (a - b);
      before2 += b * b;
      after2 += a * a;
      dot += a * b;
    }
  }
  CHECK(d.max_abs_error == max_abs);
  CHECK(d.max_abs_error > 0);  // ternary weights change the outputs ...
  CHECK(d.relative_error == doctest::Approx(std::sqrt(diff2 / before2)));
  CHECK(d.cosine_similarity == doctest::Approx(dot / std::sqrt(before2 * after2)));
  CHECK(d.cosine_similarity > 0.5);  // ... but the pretrained weights keep them correlated
  CHECK_THROWS_AS(bitnet::record_outputs(model, forward, std::vector<Matrix<float>>{}), bitnet::shape_error);
}
