// Which layers replace_linear converts: slots, exclude rules, the predicate, dry runs.
#include <bitnet/replace_options.hpp>

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
struct with_plain_member {
  slot first;
  Linear<float> fixed;
};
BITNET_LAYERS(with_plain_member, first, fixed);
}  // namespace

TEST_CASE_TEMPLATE("replace_linear: a Linear in a slot that cannot hold a BitLinear is an error unless excluded", Policy,
                   POLICIES) {
  std::mt19937 rng(10);
  with_plain_member g{random_linear<float>(3, 3, rng), random_linear<float>(3, 3, rng)};
  CHECK_THROWS_WITH_AS(bitnet::replace_linear<Policy>(g),
                       doctest::Contains("bitnet::replace_linear: fixed: this linear layer sits in a slot that cannot hold"),
                       bitnet::transfer_error);
  CHECK(std::holds_alternative<Linear<float>>(g.first));
  bitnet::replace_options options;
  options.exclude = {"fixed"};
  const auto report = bitnet::replace_linear<Policy>(g, options);
  CHECK(std::holds_alternative<BitLinear<float>>(g.first));
  REQUIRE(report.kept.size() == 1);
  CHECK(report.kept[0].path == "fixed");
  CHECK(report.kept[0].reason == "excluded by components \"fixed\"");
}

TEST_CASE("exclude_rule: exact, dotted prefix, substring and whole components") {
  using rule = bitnet::exclude_rule;
  CHECK(rule::exact("lm_head").matches("lm_head"));
  CHECK_FALSE(rule::exact("lm_head").matches("model.lm_head"));
  CHECK(rule::prefix("blocks.0").matches("blocks.0"));
  CHECK(rule::prefix("blocks.0").matches("blocks.0.mlp.up"));
  CHECK_FALSE(rule::prefix("blocks.0").matches("blocks.01.mlp"));
  CHECK_FALSE(rule::prefix("blocks.0").matches("x.blocks.0"));
  CHECK(rule::contains("proj").matches("attn.q_proj"));
  CHECK_FALSE(rule::contains("proj").matches("attn.q"));
  CHECK(rule("lm_head").matches("lm_head"));
  CHECK(rule("lm_head").matches("model.lm_head"));
  CHECK(rule("mlp").matches("blocks.0.mlp.up"));
  CHECK(rule("mlp.up").matches("blocks.0.mlp.up"));
  CHECK_FALSE(rule("head").matches("lm_head"));
  CHECK_FALSE(rule("mlp").matches("blocks.0.mlp_up"));
  CHECK_FALSE(rule("").matches("a"));
}

TEST_CASE_TEMPLATE("replace_linear: exclude rules and the predicate keep layers as they are", Policy, POLICIES) {
  transformer t = make_transformer(3, 6, 12);
  const auto before = snapshot(t);
  bitnet::replace_options options;
  options.exclude = {"head", bitnet::exclude_rule::prefix("blocks.1"), bitnet::exclude_rule::contains("attn")};
  std::vector<std::string> asked;
  options.predicate = [&](std::string_view path, const bitnet::linear_info& info) {
    asked.emplace_back(path);
    CHECK(info.in_features > 0);
    return info.out_features != 12;  // keeps every mlp.up (6 -> 12)
  };
  const auto report = bitnet::replace_linear<Policy>(t, options);
  CHECK(asked == std::vector<std::string>{"blocks.0.mlp.up", "blocks.0.mlp.down", "blocks.2.mlp.up", "blocks.2.mlp.down"});
  REQUIRE(report.layers.size() == 2);
  CHECK(report.layers[0].path == "blocks.0.mlp.down");
  CHECK(report.layers[1].path == "blocks.2.mlp.down");
  const auto after = snapshot(t);
  for (std::size_t i = 0; i < after.size(); ++i) {
    CAPTURE(after[i].path);
    const bool converted = after[i].path == "blocks.0.mlp.down" || after[i].path == "blocks.2.mlp.down";
    CHECK(after[i].converted == converted);
    if (!converted) CHECK(after[i] == before[i]);
  }
  std::vector<std::string> kept;
  for (const auto& k : report.kept) kept.push_back(k.path + " / " + k.reason);
  CHECK(kept == std::vector<std::string>{
                    "blocks.0.attn / excluded by contains \"attn\"", "blocks.0.mlp.up / rejected by the predicate",
                    "blocks.1.attn / excluded by prefix \"blocks.1\"", "blocks.1.mlp.up / excluded by prefix \"blocks.1\"",
                    "blocks.1.mlp.down / excluded by prefix \"blocks.1\"", "blocks.2.attn / excluded by contains \"attn\"",
                    "blocks.2.mlp.up / rejected by the predicate", "head / excluded by components \"head\""});
}

TEST_CASE_TEMPLATE("replace_linear: a dry run reports and changes nothing", Policy, POLICIES) {
  transformer t = make_transformer(2, 6, 13);
  const auto before = snapshot(t);
  bitnet::replace_options options;
  options.dry_run = true;
  const auto report = bitnet::replace_linear<Policy>(t, options);
  CHECK(report.dry_run);
  CHECK(report.layers.size() == 7);
  CHECK(snapshot(t) == before);
  CHECK(report.to_string().rfind("dry run: nothing was changed", 0) == 0);
  // and a dry run still reports errors
  std::get<Linear<float>>(t.head).weight(0, 0) = std::numeric_limits<float>::quiet_NaN();
  CHECK_THROWS_AS(bitnet::replace_linear<Policy>(t, options), bitnet::transfer_error);
}

// ---- Per-layer options (replace_options::layer_options_for) -------------------------------------

namespace {
// A rotation per input width, as a rotated model stores one sign vector per width.
bitnet::bitlinear_options rotated_for(const bitnet::linear_info& info) {
  bitnet::bitlinear_options o;
  o.rms_norm = info.in_features == 16;  // a per-layer choice the default options do not make
  o.rotation = info.in_features == 8 ? bitnet::hadamard_rotation::random_signs(8, 4, 1)
                                     : bitnet::hadamard_rotation::random_signs(info.in_features, 8, 2);
  return o;
}
}  // namespace

TEST_CASE_TEMPLATE("replace_linear: layer_options_for gives each layer its own options (a rotation per width)", Policy,
                   POLICIES) {
  transformer t = make_transformer(2, 8, 21);  // attn 8 -> 8, mlp.up 8 -> 16, mlp.down 16 -> 8, head 8 -> 3
  std::vector<Linear<float>> sources;
  for (slot* s : slots_of(t)) sources.push_back(std::get<Linear<float>>(*s));
  bitnet::replace_options options;
  options.exclude = {"head"};
  std::vector<std::string> asked;
  options.layer_options_for = [&](std::string_view path, const bitnet::linear_info& info) {
    asked.push_back(std::string(path) + " " + std::to_string(info.out_features) + "x" + std::to_string(info.in_features));
    return rotated_for(info);
  };
  const auto report = bitnet::replace_linear<Policy>(t, options);
  CHECK(asked == std::vector<std::string>{"blocks.0.attn 8x8", "blocks.0.mlp.up 16x8", "blocks.0.mlp.down 8x16",
                                          "blocks.1.attn 8x8", "blocks.1.mlp.up 16x8", "blocks.1.mlp.down 8x16"});
  CHECK(report.layers.size() == 6);
  CHECK(std::holds_alternative<Linear<float>>(t.head));
  std::mt19937 rng(3);
  const auto slots = slots_of(t);
  for (std::size_t i = 0; i + 1 < slots.size(); ++i) {
    CAPTURE(i);
    const auto& layer = std::get<BitLinear<float>>(*slots[i]);
    const bitnet::linear_info info{sources[i].weight.cols(), sources[i].weight.rows(), sources[i].bias.has_value()};
    const bitnet::bitlinear_options expected = rotated_for(info);
    REQUIRE(layer.options().rotation);
    CHECK(*layer.options().rotation == *expected.rotation);
    CHECK(layer.options().rms_norm == expected.rms_norm);
    // The same layer built by hand from the source weights with those options, bit for bit.
    const BitLinear<float> direct(sources[i].weight, sources[i].bias, expected);
    const Matrix<float> x = reference::random_matrix<float>(3, info.in_features, rng, 2.0);
    CHECK(layer.forward(x) == direct.forward(x));
  }
}

TEST_CASE_TEMPLATE("replace_linear: a per-layer rotation of the wrong width, or a throwing layer_options_for, changes "
                   "nothing and names the layer",
                   Policy, POLICIES) {
  transformer t = make_transformer(2, 8, 22);
  const auto before = snapshot(t);
  bitnet::replace_options options;
  options.layer_options_for = [](std::string_view, const bitnet::linear_info&) {
    bitnet::bitlinear_options o;
    o.rotation = bitnet::hadamard_rotation::identity_signs(8, 4);  // fits every layer but the 16-wide mlp.down
    return o;
  };
  CHECK_THROWS_WITH_AS(bitnet::replace_linear<Policy>(t, options),
                       "bitnet::replace_linear: blocks.0.mlp.down: layer_options_for gave a rotation for 8 inputs, the "
                       "layer has 16",
                       bitnet::transfer_error);
  CHECK(snapshot(t) == before);
  options.dry_run = true;
  CHECK_THROWS_AS(bitnet::replace_linear<Policy>(t, options), bitnet::transfer_error);
  options.dry_run = false;

  options.layer_options_for = [](std::string_view path, const bitnet::linear_info& info) {
    if (path == "blocks.1.mlp.up") throw bitnet::value_error("no options for this one");
    return rotated_for(info);
  };
  CHECK_THROWS_WITH_AS(bitnet::replace_linear<Policy>(t, options),
                       "bitnet::replace_linear: blocks.1.mlp.up: layer_options_for threw: no options for this one",
                       bitnet::transfer_error);
  CHECK(snapshot(t) == before);

  // Options the layer refuses (group_size with per_tensor scales) fail when it is built: rolled back too.
  options.layer_options_for = [](std::string_view path, const bitnet::linear_info& info) {
    bitnet::bitlinear_options o = rotated_for(info);
    if (path == "head") o.group_size = 64;
    return o;
  };
  CHECK_THROWS_WITH_AS(bitnet::replace_linear<Policy>(t, options),
                       doctest::Contains("bitnet::replace_linear: head: BitLinear: group_size must be 0"),
                       bitnet::transfer_error);
  CHECK(snapshot(t) == before);

  // Not a bitnet::error: it propagates as it is, and the graph is unchanged.
  options.layer_options_for = [](std::string_view, const bitnet::linear_info&) -> bitnet::bitlinear_options {
    throw std::runtime_error("user code failed");
  };
  CHECK_THROWS_WITH_AS(bitnet::replace_linear<Policy>(t, options), "user code failed", std::runtime_error);
  CHECK(snapshot(t) == before);
}

TEST_CASE("replace_linear: layer_options_for with an exact import (per-layer group sizes, frozen scales)") {
  transformer t = make_transformer(1, 64, 23);  // attn 64 -> 64, up 64 -> 128, down 128 -> 64, head 64 -> 3
  // Make every layer ternary per group of 32 inputs.
  for (slot* s : slots_of(t)) {
    Matrix<float>& w = std::get<Linear<float>>(*s).weight;
    for (Index r = 0; r < w.rows(); ++r)
      for (Index c = 0; c < w.cols(); ++c) w(r, c) = float((r + c) % 3 - 1) * float(1 + (r * 7 + c / 32) % 5) * 0.25f;
  }
  bitnet::replace_options options;
  options.weights = bitnet::ternary_import::exact;
  options.layer_options_for = [](std::string_view path, const bitnet::linear_info&) {
    bitnet::bitlinear_options o;
    o.weight_scales = bitnet::weight_scaling::per_group;
    o.group_size = path == "blocks.0.mlp.down" ? 64 : 32;  // down's groups of 64 hold two d: refused
    return o;
  };
  const auto before = snapshot(t);
  CHECK_THROWS_WITH_AS(bitnet::replace_linear(t, options),
                       doctest::Contains("bitnet::replace_linear: blocks.0.mlp.down: weight: the weights are not ternary"),
                       bitnet::transfer_error);
  CHECK(snapshot(t) == before);
  options.layer_options_for = [](std::string_view, const bitnet::linear_info&) {
    bitnet::bitlinear_options o;
    o.weight_scales = bitnet::weight_scaling::per_group;
    o.group_size = 32;
    return o;
  };
  bitnet::replace_linear(t, options);
  for (slot* s : slots_of(t)) {
    const auto& layer = std::get<BitLinear<float>>(*s);
    CHECK(layer.options().group_size == 32);
    CHECK(layer.options().scale_update == bitnet::weight_scale_update::frozen);
    CHECK_FALSE(layer.has_latent_weights());
  }
}
