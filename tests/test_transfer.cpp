// Transfer policies: transfer::checked's checks and a user policy derived from it.
#include <bitnet/transfer.hpp>

#include <bitnet/replace.hpp>

#include <cmath>
#include <limits>
#include <random>
#include <stdexcept>
#include <string>

#include <doctest/doctest.h>

#include "graph_fixtures.hpp"
#include "reference.hpp"

using namespace fixtures;

namespace {
// A user policy: everything transfer::checked does, plus a limit on the fraction of zero weights.
struct sparse_limited : bitnet::transfer::checked {
  double max_zero_fraction = 0.5;
  int verified = 0;
  template <bitnet::real_scalar T>
  void verify(const bitnet::layer_source<T>& source, const BitLinear<T>& staged) {
    checked::verify(source, staged);
    const double zeros = double((staged.ternary_weight().array() == 0).count()) / double(staged.ternary_weight().size());
    if (zeros > max_zero_fraction)
      throw bitnet::transfer_error(std::string(source.path()) + ": " + std::to_string(zeros) + " of the weights are zero");
    ++verified;
  }
};
static_assert(bitnet::transfer_policy<sparse_limited>);
static_assert(bitnet::transfer_policy<sparse_limited, double>);
static_assert(bitnet::transfer_policy<bitnet::transfer::move>);
static_assert(!bitnet::transfer_policy<int>);
}  // namespace

TEST_CASE("replace_linear: a user-written policy derived from transfer::checked adds its own check") {
  std::mt19937 rng(14);
  std::vector<slot> g{random_linear<float>(8, 4, rng), random_linear<float>(8, 4, rng)};
  auto& second = std::get<Linear<float>>(g[1]);
  second.weight.setZero();
  second.weight(0, 0) = 1;  // mean |w| is tiny, almost every code is 0
  const auto before = state_of("1", g[1]);
  sparse_limited policy;
  CHECK_THROWS_WITH_AS(bitnet::replace_linear(g, {}, policy), doctest::Contains("1: 0.968750 of the weights are zero"),
                       bitnet::transfer_error);
  CHECK(policy.verified == 1);
  CHECK(std::holds_alternative<Linear<float>>(g[0]));
  CHECK(state_of("1", g[1]) == before);
  policy.max_zero_fraction = 1.0;
  policy.verified = 0;
  CHECK(bitnet::replace_linear(g, {}, policy).layers.size() == 2);
  CHECK(policy.verified == 2);
}

TEST_CASE("transfer::checked: rejects a new layer that does not hold the source weights") {
  std::mt19937 rng(15);
  const Linear<float> source = random_linear<float>(6, 4, rng);
  const bitnet::linear_view<float> view{source.weight, source.bias};
  const bitnet::bitlinear_options options;
  const bitnet::layer_source<float> src("blocks.3.mlp.down", view, options);
  bitnet::transfer::checked checked;
  CHECK_NOTHROW(checked.verify(src, BitLinear<float>(source.weight, source.bias)));
  // the seed bug: a layer of the right shape with zeros or fresh random weights
  CHECK_THROWS_WITH_AS(checked.verify(src, BitLinear<float>(Matrix<float>::Zero(4, 6), source.bias)),
                       "bitnet::replace_linear: blocks.3.mlp.down: the new layer's latent weight differs from the source "
                       "at row 0, column 0",
                       bitnet::transfer_error);
  CHECK_THROWS_WITH_AS(checked.verify(src, BitLinear<float>(source.weight)),
                       "bitnet::replace_linear: blocks.3.mlp.down: the new layer lost the bias", bitnet::transfer_error);
  Vector<float> other_bias = *source.bias;
  other_bias(3) = std::nextafter(other_bias(3), 1.0f);
  CHECK_THROWS_WITH_AS(checked.verify(src, BitLinear<float>(source.weight, other_bias)),
                       doctest::Contains("bias differs from the source at index 3"), bitnet::transfer_error);
  CHECK_THROWS_WITH_AS(checked.verify(src, BitLinear<float>(reference::random_matrix<float>(3, 6, rng))),
                       doctest::Contains("the new layer is 3x6, the source is 4x6"), bitnet::transfer_error);
  // same latent weights but other options: the output differs from the reference of the source
  bitnet::bitlinear_options normed;
  normed.rms_norm = true;
  CHECK_THROWS_WITH_AS(checked.verify(src, BitLinear<float>(source.weight, source.bias, normed)),
                       doctest::Contains("output on the probe input differs from the reference BitLinear"),
                       bitnet::transfer_error);
}

TEST_CASE("transfer::checked: rejects empty layers and names the path") {
  const Matrix<float> empty(0, 3);
  const bitnet::linear_view<float> view{empty, std::nullopt};
  const bitnet::bitlinear_options options;
  bitnet::transfer::checked checked;
  CHECK_THROWS_WITH_AS(checked.prepare(bitnet::layer_source<float>("enc.0", view, options)),
                       "bitnet::replace_linear: enc.0: weight is empty (0x3)", bitnet::transfer_error);
}
