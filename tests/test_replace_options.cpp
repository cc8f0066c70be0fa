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
