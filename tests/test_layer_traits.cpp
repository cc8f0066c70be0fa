#include <bitnet/layer_traits.hpp>

#include <string>
#include <utility>
#include <vector>

#include <doctest/doctest.h>

#include "graph_fixtures.hpp"

using bitnet::BitLinear;
using bitnet::Linear;
using bitnet::Matrix;
using namespace fixtures;

namespace {

struct not_a_layer {};

// Collects the names bitnet_children (or a layer_traits specialization) reports.
template <class Node>
std::vector<std::string> child_names(Node& node) {
  std::vector<std::string> names;
  auto visit = [&](std::string_view name, auto&) { names.emplace_back(name); };
  bitnet::layer_traits<Node>::children(node, visit);
  return names;
}

}  // namespace

// The public concepts, as a user would static_assert their own types.
static_assert(bitnet::linear_layer<Linear<float>>);
static_assert(bitnet::linear_layer<Linear<double>>);
static_assert(bitnet::linear_layer<user::dense_colmajor>);
static_assert(bitnet::linear_layer<user::flat_dense>);
static_assert(bitnet::linear_layer<thirdparty::Dense>);
static_assert(bitnet::linear_layer<linear_module>);
static_assert(!bitnet::linear_layer<BitLinear<float>>);
static_assert(!bitnet::linear_layer<not_a_layer>);
static_assert(std::is_same_v<bitnet::linear_scalar_t<user::dense_colmajor>, double>);

static_assert(bitnet::movable_linear_layer<Linear<float>, float>);
static_assert(!bitnet::movable_linear_layer<Linear<double>, float>);
static_assert(!bitnet::movable_linear_layer<user::flat_dense, float>);

static_assert(bitnet::layer_node<transformer>);
static_assert(bitnet::layer_node<std::vector<slot>>);
static_assert(bitnet::layer_node<std::array<block, 3>>);
static_assert(bitnet::layer_node<std::map<std::string, slot>>);
static_assert(!bitnet::layer_node<std::map<int, slot>>);
static_assert(bitnet::layer_node<module>);
static_assert(!bitnet::layer_node<not_a_layer>);

static_assert(bitnet::bit_linear_slot<slot>);
static_assert(bitnet::bit_linear_slot<std::variant<feed_forward, Linear<float>, BitLinear<float>>>);
static_assert(!bitnet::bit_linear_slot<std::variant<Linear<float>>>);
static_assert(!bitnet::bit_linear_slot<Linear<float>>);
static_assert(std::is_same_v<bitnet::linear_slot<Linear<double>>, std::variant<Linear<double>, BitLinear<double>>>);
static_assert(std::is_same_v<bitnet::linear_slot<user::flat_dense>, std::variant<user::flat_dense, BitLinear<float>>>);
static_assert(std::is_same_v<bitnet::linear_slot<user::dense_colmajor, float>,
                             std::variant<user::dense_colmajor, BitLinear<float>>>);

static_assert(bitnet::polymorphic_slot<std::unique_ptr<module>>);
static_assert(bitnet::polymorphic_slot<std::shared_ptr<module>>);
static_assert(!bitnet::polymorphic_slot<std::unique_ptr<feed_forward>>);

static_assert(bitnet::layer_graph<transformer>);
static_assert(bitnet::layer_graph<std::deque<slot>>);
static_assert(bitnet::layer_graph<std::unique_ptr<module>>);
static_assert(bitnet::layer_graph<Linear<float>>);
static_assert(!bitnet::layer_graph<not_a_layer>);
static_assert(!bitnet::layer_graph<int>);

TEST_CASE("BITNET_LAYERS names each member after the field") {
  transformer t = make_transformer(2, 4, 1);
  CHECK(child_names(t) == std::vector<std::string>{"blocks", "head"});
  CHECK(child_names(t.blocks[0]) == std::vector<std::string>{"attn", "mlp"});
  CHECK(child_names(t.blocks) == std::vector<std::string>{"0", "1"});
}

TEST_CASE("layer_traits: maps are named by key, sequences by index") {
  std::map<std::string, int> m{{"b", 1}, {"a", 2}};
  CHECK(child_names(m) == std::vector<std::string>{"a", "b"});
  std::deque<int> d(3);
  CHECK(child_names(d) == std::vector<std::string>{"0", "1", "2"});
}

TEST_CASE("layer_traits: the linear view refers to the layer's own storage") {
  std::mt19937 rng(1);
  const Linear<float> l = random_linear<float>(5, 3, rng);
  const auto view = bitnet::layer_traits<Linear<float>>::linear(l);
  CHECK(view.weight.data() == l.weight.data());
  REQUIRE(view.bias.has_value());
  CHECK(view.bias->data() == l.bias->data());

  const user::dense_colmajor d{Eigen::MatrixXd::Random(2, 3), Eigen::VectorXd::Random(2)};
  const auto dv = bitnet::layer_traits<user::dense_colmajor>::linear(d);
  CHECK(dv.weight.data() == d.weight.data());
  CHECK(dv.weight(1, 2) == d.weight(1, 2));

  const user::flat_dense f{3, 2, {1, 2, 3, 4, 5, 6}};
  const auto fv = bitnet::layer_traits<user::flat_dense>::linear(f);
  CHECK(fv.weight.data() == f.values.data());
  CHECK(fv.weight(1, 0) == 4);
  CHECK_FALSE(fv.bias.has_value());

  const thirdparty::Dense k{Eigen::MatrixXf::Random(4, 2)};
  const auto kv = bitnet::layer_traits<thirdparty::Dense>::linear(k);
  CHECK(kv.weight.rows() == 2);
  CHECK(kv.weight.cols() == 4);
  CHECK(kv.weight(1, 3) == k.kernel(3, 1));
  CHECK(kv.weight.data() == k.kernel.data());  // the transpose is a view, not a copy
}

TEST_CASE("layer_traits: the polymorphic hooks recognize a Linear behind a base and build its replacement") {
  auto root = make_module_tree(2);
  module& q = *root->children[0].second->children[0].second;
  module& act = *root->children[0].second->children[1].second;
  CHECK(bitnet::layer_traits<module>::as_linear(q) == &static_cast<linear_module&>(q));
  CHECK(bitnet::layer_traits<module>::as_linear(act) == nullptr);
  const auto& l = static_cast<linear_module&>(q);
  auto node = bitnet::layer_traits<module>::make_replacement(l, BitLinear<float>(l.linear.weight));
  REQUIRE(dynamic_cast<bit_module*>(node.get()) != nullptr);
  CHECK(static_cast<bit_module&>(*node).bit.weight() == l.linear.weight);
}
