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

std::string message_of(const std::exception& e) { return e.what(); }

// The original layers, kept aside to compare against after the replacement.
struct original {
  Matrix<float> weight;
  std::optional<Vector<float>> bias;
  const void* weight_data;
};

std::vector<original> originals(transformer& t) {
  std::vector<original> all;
  for (slot* s : slots_of(t)) {
    const auto& l = std::get<Linear<float>>(*s);
    all.push_back({l.weight, l.bias, l.weight.data()});
  }
  return all;
}

// A replaced layer must compute with the source's weights: its output equals that of a BitLinear
// built directly from them, and agrees with the independent fake-quant reference of the paper.
void check_computes_with(const BitLinear<float>& layer, const original& source, const bitnet::bitlinear_options& opt) {
  std::mt19937 rng(11);
  const Matrix<float> x = reference::random_matrix<float>(3, source.weight.cols(), rng);
  const Matrix<float> y = layer.forward(x);
  CHECK(y == BitLinear<float>(source.weight, source.bias, opt).forward(x));
  const Matrix<float> normed = opt.rms_norm ? reference::rms_norm(x, float(opt.rms_eps)) : x;
  const Matrix<long double> fake =
      reference::bitlinear_fake_quant(normed, source.weight, source.bias ? &*source.bias : nullptr);
  for (Index i = 0; i < y.size(); ++i) CHECK(std::abs((long double)y.data()[i] - fake.data()[i]) < 1e-3L);
  CHECK(y.norm() > 0);
}

// Fails the n-th call of prepare or verify (0-based) on top of any policy.
template <class Base>
struct failing_policy : Base {
  int fail_prepare = -1, fail_verify = -1, prepares = 0, verifies = 0;
  template <bitnet::real_scalar T>
  void prepare(const bitnet::layer_source<T>& source) {
    if (prepares++ == fail_prepare) throw std::runtime_error("policy refused " + std::string(source.path()));
    Base::prepare(source);
  }
  template <bitnet::real_scalar T>
  void verify(const bitnet::layer_source<T>& source, const BitLinear<T>& staged) {
    if (verifies++ == fail_verify) throw std::runtime_error("policy refused " + std::string(source.path()));
    Base::verify(source, staged);
  }
};

}  // namespace

TEST_CASE_TEMPLATE("replace_linear: every layer of a plain-struct graph keeps its weights bit for bit", Policy,
                   POLICIES) {
  transformer t = make_transformer(3, 8, 1);
  const auto before = originals(t);
  bitnet::replace_options options;
  options.layer_options.rms_norm = true;
  const bitnet::replace_report report = bitnet::replace_linear<Policy>(t, options);

  const auto slots = slots_of(t);
  const auto paths = paths_of(t);
  REQUIRE(report.layers.size() == slots.size());
  CHECK_FALSE(report.dry_run);
  CHECK(report.kept.empty());
  for (std::size_t i = 0; i < slots.size(); ++i) {
    CAPTURE(paths[i]);
    REQUIRE(std::holds_alternative<BitLinear<float>>(*slots[i]));
    const auto& bit = std::get<BitLinear<float>>(*slots[i]);
    CHECK(bytes_of(bit.weight()) == bytes_of(before[i].weight));
    REQUIRE(bit.bias().has_value() == before[i].bias.has_value());
    if (bit.bias()) CHECK(bytes_of(*bit.bias()) == bytes_of(*before[i].bias));
    CHECK(bit.options().rms_norm);
    check_computes_with(bit, before[i], options.layer_options);
    CHECK(report.layers[i].path == paths[i]);
    // move takes the buffer (same address); copy and checked build a new one while the old one lives.
    if constexpr (Policy::takes_buffers)
      CHECK(bit.weight().data() == before[i].weight_data);
    else
      CHECK(bit.weight().data() != before[i].weight_data);
  }
  // converting again finds nothing left to do
  CHECK(bitnet::replace_linear<Policy>(t).layers.empty());
}

TEST_CASE("replace_linear: move takes the bias buffer too, copy does not") {
  std::mt19937 rng(2);
  std::vector<slot> moved{random_linear<float>(5, 4, rng)}, copied{random_linear<float>(5, 4, rng)};
  const void* moved_bias = std::get<0>(moved[0]).bias->data();
  const void* copied_bias = std::get<0>(copied[0]).bias->data();
  bitnet::replace_linear<bitnet::transfer::move>(moved);
  bitnet::replace_linear<bitnet::transfer::copy>(copied);
  CHECK(std::get<1>(moved[0]).bias()->data() == moved_bias);
  CHECK(std::get<1>(copied[0]).bias()->data() != copied_bias);
}

TEST_CASE_TEMPLATE("replace_linear: built-in containers name their children", Policy, POLICIES) {
  std::mt19937 rng(3);
  SUBCASE("std::vector") {
    std::vector<slot> g{random_linear<float>(4, 3, rng), random_linear<float>(3, 2, rng)};
    const auto w1 = std::get<0>(g[1]).weight;
    const auto report = bitnet::replace_linear<Policy>(g);
    REQUIRE(report.layers.size() == 2);
    CHECK(report.layers[0].path == "0");
    CHECK(report.layers[1].path == "1");
    CHECK(std::get<1>(g[1]).weight() == w1);
  }
  SUBCASE("std::array and std::deque") {
    std::array<slot, 2> a{random_linear<float>(4, 3, rng), random_linear<float>(3, 2, rng)};
    std::deque<slot> d{random_linear<float>(4, 3, rng)};
    CHECK(bitnet::replace_linear<Policy>(a).layers.size() == 2);
    CHECK(bitnet::replace_linear<Policy>(d).layers.at(0).path == "0");
    CHECK(std::holds_alternative<BitLinear<float>>(a[1]));
    CHECK(std::holds_alternative<BitLinear<float>>(d[0]));
  }
  SUBCASE("string-keyed maps") {
    std::map<std::string, slot> m;
    m.emplace("q_proj", random_linear<float>(4, 4, rng));
    m.emplace("k_proj", random_linear<float>(4, 4, rng));
    std::unordered_map<std::string, std::vector<slot>> u;
    u["experts"].push_back(random_linear<float>(4, 2, rng));
    const auto q = std::get<0>(m.at("q_proj")).weight;
    const auto report = bitnet::replace_linear<Policy>(m);
    REQUIRE(report.layers.size() == 2);
    CHECK(report.layers[0].path == "k_proj");
    CHECK(report.layers[1].path == "q_proj");
    CHECK(std::get<1>(m.at("q_proj")).weight() == q);
    CHECK(bitnet::replace_linear<Policy>(u).layers.at(0).path == "experts.0");
  }
  SUBCASE("double layers in a std::variant listing BitLinear<double>") {
    std::vector<std::variant<Linear<double>, BitLinear<double>>> g{random_linear<double>(6, 5, rng)};
    const auto w = std::get<0>(g[0]).weight;
    bitnet::replace_linear<Policy>(g);
    CHECK(bytes_of(std::get<1>(g[0]).weight()) == bytes_of(w));
  }
  SUBCASE("a variant whose other alternative is a node with children") {
    using node = std::variant<feed_forward, Linear<float>, BitLinear<float>>;
    std::vector<node> g;
    g.emplace_back(feed_forward{random_linear<float>(4, 8, rng), random_linear<float>(8, 4, rng)});
    g.emplace_back(random_linear<float>(4, 4, rng));
    const auto report = bitnet::replace_linear<Policy>(g);
    REQUIRE(report.layers.size() == 3);
    CHECK(report.layers[0].path == "0.up");
    CHECK(report.layers[1].path == "0.down");
    CHECK(report.layers[2].path == "1");
    CHECK(std::holds_alternative<BitLinear<float>>(std::get<feed_forward>(g[0]).down));
    CHECK(std::holds_alternative<BitLinear<float>>(g[1]));
  }
  SUBCASE("a std::unique_ptr to a node is walked through") {
    std::vector<std::unique_ptr<feed_forward>> g;
    g.push_back(std::make_unique<feed_forward>(feed_forward{random_linear<float>(4, 8, rng), random_linear<float>(8, 4, rng)}));
    g.push_back(nullptr);
    CHECK(bitnet::replace_linear<Policy>(g).layers.at(1).path == "0.down");
  }
}

TEST_CASE("replace_linear: a node reached twice through shared pointers is converted once") {
  std::mt19937 rng(4);
  auto shared = std::make_shared<feed_forward>(feed_forward{random_linear<float>(4, 8, rng), random_linear<float>(8, 4, rng)});
  std::map<std::string, std::shared_ptr<feed_forward>> g{{"a", shared}, {"b", shared}};
  const auto w = std::get<0>(shared->up).weight;
  const auto report = bitnet::replace_linear<bitnet::transfer::move>(g);
  REQUIRE(report.layers.size() == 2);
  CHECK(report.layers[0].path == "a.up");
  CHECK(std::get<1>(shared->up).weight() == w);
}

TEST_CASE_TEMPLATE("replace_linear: polymorphic module tree through unique_ptr and shared_ptr", Policy, POLICIES) {
  auto root = make_module_tree(5);
  const auto before = snapshot(*root);
  const auto report = bitnet::replace_linear<Policy>(*root);
  const auto after = snapshot(*root);
  REQUIRE(report.layers.size() == 5);
  REQUIRE(after.size() == before.size());
  const std::vector<std::string> expected{"layers.0.q", "layers.0.o", "layers.1.q", "layers.1.o", "lm_head"};
  for (std::size_t i = 0; i < before.size(); ++i) {
    CAPTURE(before[i].path);
    CHECK(report.layers[i].path == expected[i]);
    CHECK(after[i].path == before[i].path);
    CHECK(after[i].converted);
    CHECK(after[i].weight_bytes == before[i].weight_bytes);
    CHECK(after[i].bias_bytes == before[i].bias_bytes);
    CHECK(after[i].has_bias == before[i].has_bias);
  }
  // the activation node was left where it was
  CHECK(dynamic_cast<relu_module*>(root->children[0].second->children[1].second.get()) != nullptr);

  std::mt19937 rng(6);
  std::vector<std::shared_ptr<module>> shared{std::make_shared<linear_module>(random_linear<float>(3, 2, rng))};
  const auto w = static_cast<linear_module&>(*shared[0]).linear.weight;
  bitnet::replace_linear<Policy>(shared);
  const auto* bit = dynamic_cast<bit_module*>(shared[0].get());
  REQUIRE(bit != nullptr);
  CHECK(bit->bit.weight() == w);
}

TEST_CASE_TEMPLATE("replace_linear: user linear types with their own scalar type and storage", Policy, POLICIES) {
  std::mt19937 rng(7);
  using colmajor_slot = std::variant<user::dense_colmajor, BitLinear<float>>;
  using flat_slot = std::variant<user::flat_dense, BitLinear<float>>;
  using keras_slot = std::variant<thirdparty::Dense, BitLinear<float>>;
  struct graph {
    colmajor_slot a;
    flat_slot b;
    keras_slot c;
  };
  user::dense_colmajor a{Eigen::MatrixXd::Random(3, 5), Eigen::VectorXd::Random(3)};
  user::flat_dense b{4, 2, {}};
  for (int i = 0; i < 8; ++i) b.values.push_back(float(i) - 3.5f);
  thirdparty::Dense c{Eigen::MatrixXf::Random(5, 3)};
  graph g{a, b, c};
  std::map<std::string, colmajor_slot> ga{{"a", a}};
  std::map<std::string, flat_slot> gb{{"b", b}};
  std::map<std::string, keras_slot> gc{{"c", c}};
  bitnet::replace_linear<Policy>(ga);
  bitnet::replace_linear<Policy>(gb);
  bitnet::replace_linear<Policy>(gc);
  (void)g;

  const auto& bit_a = std::get<1>(ga.at("a"));
  for (Index r = 0; r < 3; ++r) {
    for (Index col = 0; col < 5; ++col) CHECK(bit_a.weight()(r, col) == static_cast<float>(a.weight(r, col)));
    CHECK((*bit_a.bias())(r) == static_cast<float>(a.bias(r)));
  }
  const auto& bit_b = std::get<1>(gb.at("b"));
  CHECK_FALSE(bit_b.bias().has_value());
  REQUIRE(bit_b.out_features() == 2);
  REQUIRE(bit_b.in_features() == 4);
  CHECK(bit_b.weight()(1, 3) == 3.5f);
  CHECK(bit_b.weight()(0, 1) == -2.5f);
  const auto& bit_c = std::get<1>(gc.at("c"));
  CHECK(bit_c.weight() == Matrix<float>(c.kernel.transpose()));
}

TEST_CASE_TEMPLATE("replace_linear: a non-finite weight in layer k of n fails and leaves the graph bit-identical",
                   Policy, POLICIES) {
  for (std::size_t k = 0; k < 7; ++k) {
    CAPTURE(k);
    transformer t = make_transformer(2, 6, 8);
    auto& target = std::get<Linear<float>>(*slots_of(t)[k]);
    target.weight(1, 2) = k % 2 ? std::numeric_limits<float>::infinity() : std::numeric_limits<float>::quiet_NaN();
    const auto before = snapshot(t);
    try {
      bitnet::replace_linear<Policy>(t);
      FAIL("no error for a non-finite weight");
    } catch (const bitnet::transfer_error& e) {
      CHECK(message_of(e).find(paths_of(t)[k] + ":") != std::string::npos);
      CHECK(message_of(e).find("finite") != std::string::npos);
    }
    CHECK(snapshot(t) == before);
  }
}

TEST_CASE_TEMPLATE("replace_linear: a policy that throws in prepare or verify of layer k rolls everything back",
                   Policy, POLICIES) {
  for (int phase = 0; phase < 2; ++phase)
    for (int k = 0; k < 7; ++k) {
      CAPTURE(phase);
      CAPTURE(k);
      transformer t = make_transformer(2, 6, 9);
      const auto before = snapshot(t);
      failing_policy<Policy> policy;
      (phase == 0 ? policy.fail_prepare : policy.fail_verify) = k;
      CHECK_THROWS_WITH_AS(bitnet::replace_linear(t, {}, policy), ("policy refused " + paths_of(t)[std::size_t(k)]).c_str(),
                           std::runtime_error);
      CHECK(snapshot(t) == before);
    }
}

TEST_CASE("replace_linear: a bias of the wrong length is rejected by name") {
  user::dense_colmajor bad{Eigen::MatrixXd::Random(3, 4), Eigen::VectorXd::Random(2)};
  std::map<std::string, std::variant<user::dense_colmajor, BitLinear<float>>> g{{"proj", bad}};
  CHECK_THROWS_WITH_AS(bitnet::replace_linear(g), "bitnet::replace_linear: proj: bias has 2 elements, the weight has 3 rows",
                       bitnet::transfer_error);
  CHECK_THROWS_WITH_AS(bitnet::replace_linear<bitnet::transfer::copy>(g),
                       doctest::Contains("bitnet::replace_linear: proj: BitLinear: bias has 2 elements"),
                       bitnet::transfer_error);
  CHECK(std::holds_alternative<user::dense_colmajor>(g.at("proj")));
}

TEST_CASE("replace_linear: a double weight that overflows float is caught") {
  user::dense_colmajor big{Eigen::MatrixXd::Constant(2, 2, 1e300), Eigen::VectorXd::Zero(2)};
  std::map<std::string, std::variant<user::dense_colmajor, BitLinear<float>>> g{{"big", big}};
  CHECK_THROWS_WITH_AS(bitnet::replace_linear(g), "bitnet::replace_linear: big: weight is not finite (+inf) at row 0, column 0",
                       bitnet::transfer_error);
}

namespace {
// A polymorphic tree whose replacement hook fails for one layer: by returning null or by throwing.
struct node {
  virtual ~node() = default;
  std::map<std::string, std::unique_ptr<node>> children;
};
struct dense_node : node {
  explicit dense_node(Linear<float> l) : linear(std::move(l)) {}
  Linear<float> linear;
};
struct bit_node : node {
  explicit bit_node(BitLinear<float> b) : bit(std::move(b)) {}
  BitLinear<float> bit;
};
template <class Visit>
void bitnet_children(node& n, Visit& visit) {
  for (auto& [name, child] : n.children) visit(name, child);
}
bitnet::linear_view<float> bitnet_linear(const dense_node& d) { return {d.linear.weight, d.linear.bias}; }
dense_node* bitnet_as_linear(node& n) noexcept { return dynamic_cast<dense_node*>(&n); }
std::unique_ptr<node> bitnet_make_replacement(const dense_node& d, BitLinear<float>&& bit) {
  if (d.linear.weight.rows() == 2) return nullptr;
  if (d.linear.weight.rows() == 3) throw std::logic_error("no replacement for 3 outputs");
  return std::make_unique<bit_node>(std::move(bit));
}
}  // namespace

TEST_CASE("replace_linear: a replacement hook that returns null or throws rolls the tree back") {
  for (Index failing_rows : {2, 3}) {
    CAPTURE(failing_rows);
    std::mt19937 rng(17);
    node root;
    root.children["a"] = std::make_unique<dense_node>(random_linear<float>(4, 5, rng));
    root.children["b"] = std::make_unique<dense_node>(random_linear<float>(4, failing_rows, rng));
    root.children["c"] = std::make_unique<dense_node>(random_linear<float>(4, 5, rng));
    const node* a = root.children["a"].get();
    const node* c = root.children["c"].get();
    if (failing_rows == 2)
      CHECK_THROWS_WITH_AS(bitnet::replace_linear(root), "bitnet::replace_linear: b: bitnet_make_replacement returned a null pointer",
                           bitnet::transfer_error);
    else
      CHECK_THROWS_WITH_AS(bitnet::replace_linear(root), "no replacement for 3 outputs", std::logic_error);
    CHECK(root.children["a"].get() == a);
    CHECK(root.children["c"].get() == c);
    CHECK(dynamic_cast<dense_node*>(root.children["b"].get()) != nullptr);
    root.children.erase("b");
    CHECK(bitnet::replace_linear(root).layers.size() == 2);
    CHECK(dynamic_cast<bit_node*>(root.children["c"].get()) != nullptr);
  }
}
