// Layer graphs of every shape replace_linear supports, and a way to snapshot one bit for bit
// (weights, biases, buffer addresses, which alternative each slot holds) to prove "unchanged".
#pragma once

#include <array>
#include <cstring>
#include <deque>
#include <map>
#include <memory>
#include <optional>
#include <random>
#include <string>
#include <unordered_map>
#include <variant>
#include <vector>

#include <bitnet/layer_traits.hpp>

#include "reference.hpp"

// The transfer policies (bitnet/transfer.hpp) that TEST_CASE_TEMPLATEs run under.
#define POLICIES bitnet::transfer::copy, bitnet::transfer::move, bitnet::transfer::checked

namespace fixtures {

using bitnet::BitLinear;
using bitnet::Index;
using bitnet::Linear;
using bitnet::Matrix;
using bitnet::Vector;
using slot = bitnet::linear_slot<Linear<float>>;

template <class T>
Linear<T> random_linear(Index in, Index out, std::mt19937& rng, bool bias = true) {
  Linear<T> layer(reference::random_matrix<T>(out, in, rng, 0.5));
  if (bias) layer.bias = Vector<T>(reference::random_matrix<T>(out, 1, rng, 0.1));
  return layer;
}

// ---- one slot's state, bit for bit ------------------------------------------------------------
struct slot_state {
  std::string path;
  bool converted = false;
  std::vector<unsigned char> weight_bytes, bias_bytes;
  std::vector<unsigned char> ternary_bytes, scale_bytes;  // BitLinear only: the codes and the scale
  bool has_bias = false;
  const void* weight_data = nullptr;
  const void* bias_data = nullptr;
  Index rows = 0, cols = 0;
  bool operator==(const slot_state&) const = default;
};

template <class Derived>
std::vector<unsigned char> bytes_of(const Eigen::DenseBase<Derived>& m) {
  std::vector<unsigned char> bytes(std::size_t(m.size()) * sizeof(typename Derived::Scalar));
  if (!bytes.empty()) std::memcpy(bytes.data(), m.derived().data(), bytes.size());
  return bytes;
}

template <class W, class B>
slot_state state_of(std::string path, bool converted, const W& weight, const B& bias) {
  slot_state s;
  s.path = std::move(path);
  s.converted = converted;
  s.weight_bytes = bytes_of(weight);
  s.weight_data = weight.data();
  s.rows = weight.rows();
  s.cols = weight.cols();
  s.has_bias = bias.has_value();
  if (bias) {
    s.bias_bytes = bytes_of(*bias);
    s.bias_data = bias->data();
  }
  return s;
}

// A BitLinear: its latent weights when it has them (else none, and the packed codes' address),
// and always its ternary codes and scale (or unit scales).
template <class T>
slot_state state_of(std::string path, const BitLinear<T>& bit) {
  slot_state s = bit.has_latent_weights() ? state_of(std::move(path), true, bit.weight(), bit.bias())
                                          : state_of(std::move(path), true, Matrix<T>(), bit.bias());
  if (!bit.has_latent_weights()) s.weight_data = bit.packed_weight().data();
  s.rows = bit.out_features();
  s.cols = bit.in_features();
  s.ternary_bytes = bytes_of(bit.ternary_weight());
  if (bit.options().weight_scales != bitnet::weight_scaling::per_tensor) {
    s.scale_bytes = bytes_of(bit.unit_scales());
    return s;
  }
  const T scale = bit.weight_scale();
  s.scale_bytes.resize(sizeof scale);
  std::memcpy(s.scale_bytes.data(), &scale, sizeof scale);
  return s;
}

template <class T>
slot_state state_of(std::string path, const std::variant<Linear<T>, BitLinear<T>>& v) {
  if (const auto* linear = std::get_if<0>(&v)) return state_of(std::move(path), false, linear->weight, linear->bias);
  return state_of(std::move(path), std::get<1>(v));
}

// ---- a transformer-like plain-struct graph (BITNET_LAYERS) --------------------------------------
struct feed_forward {
  slot up, down;
};
BITNET_LAYERS(feed_forward, up, down);

struct block {
  slot attn;
  feed_forward mlp;
};
BITNET_LAYERS(block, attn, mlp);

struct transformer {
  std::vector<block> blocks;
  slot head;
};
BITNET_LAYERS(transformer, blocks, head);

inline transformer make_transformer(int n_blocks, Index dim, unsigned seed) {
  std::mt19937 rng(seed);
  transformer t{{}, random_linear<float>(dim, 3, rng)};
  for (int i = 0; i < n_blocks; ++i)
    t.blocks.push_back(block{random_linear<float>(dim, dim, rng, i % 2 == 0),
                             {random_linear<float>(dim, 2 * dim, rng), random_linear<float>(2 * dim, dim, rng)}});
  return t;
}

inline std::vector<slot*> slots_of(transformer& t) {
  std::vector<slot*> all;
  for (auto& b : t.blocks) {
    all.push_back(&b.attn);
    all.push_back(&b.mlp.up);
    all.push_back(&b.mlp.down);
  }
  all.push_back(&t.head);
  return all;
}

inline std::vector<std::string> paths_of(const transformer& t) {
  std::vector<std::string> all;
  for (std::size_t i = 0; i < t.blocks.size(); ++i)
    for (const char* name : {"attn", "mlp.up", "mlp.down"}) all.push_back("blocks." + std::to_string(i) + "." + name);
  all.push_back("head");
  return all;
}

inline std::vector<slot_state> snapshot(transformer& t) {
  std::vector<slot_state> states;
  const auto paths = paths_of(t);
  const auto slots = slots_of(t);
  for (std::size_t i = 0; i < slots.size(); ++i) states.push_back(state_of(paths[i], *slots[i]));
  return states;
}

// ---- a polymorphic module tree, PyTorch named_children style ------------------------------------
struct module {
  virtual ~module() = default;
  std::vector<std::pair<std::string, std::unique_ptr<module>>> children;
};
struct linear_module : module {
  explicit linear_module(Linear<float> l) : linear(std::move(l)) {}
  Linear<float> linear;
};
struct bit_module : module {
  explicit bit_module(BitLinear<float> b) : bit(std::move(b)) {}
  BitLinear<float> bit;
};
struct relu_module : module {};

template <class Visit>
void bitnet_children(module& m, Visit& visit) {
  for (auto& [name, child] : m.children) visit(name, child);
}
inline bitnet::linear_view<float> bitnet_linear(const linear_module& m) { return {m.linear.weight, m.linear.bias}; }
inline linear_module* bitnet_as_linear(module& m) noexcept { return dynamic_cast<linear_module*>(&m); }
inline BitLinear<float>* bitnet_as_bit_linear(module& m) noexcept {
  auto* b = dynamic_cast<bit_module*>(&m);
  return b ? &b->bit : nullptr;
}
inline std::unique_ptr<module> bitnet_make_replacement(const linear_module&, BitLinear<float>&& bit) {
  return std::make_unique<bit_module>(std::move(bit));
}

inline std::unique_ptr<module> make_module_tree(unsigned seed) {
  std::mt19937 rng(seed);
  auto root = std::make_unique<module>();
  for (int i = 0; i < 2; ++i) {
    auto layer = std::make_unique<module>();
    layer->children.emplace_back("q", std::make_unique<linear_module>(random_linear<float>(6, 6, rng)));
    layer->children.emplace_back("act", std::make_unique<relu_module>());
    layer->children.emplace_back("o", std::make_unique<linear_module>(random_linear<float>(6, 6, rng, false)));
    root->children.emplace_back("layers." + std::to_string(i), std::move(layer));
  }
  root->children.emplace_back("lm_head", std::make_unique<linear_module>(random_linear<float>(6, 4, rng)));
  return root;
}

inline void snapshot_modules(const module& m, const std::string& path, std::vector<slot_state>& out) {
  for (const auto& [name, child] : m.children) {
    const std::string child_path = path.empty() ? name : path + "." + name;
    if (const auto* l = dynamic_cast<const linear_module*>(child.get()))
      out.push_back(state_of(child_path, false, l->linear.weight, l->linear.bias));
    else if (const auto* b = dynamic_cast<const bit_module*>(child.get()))
      out.push_back(state_of(child_path, b->bit));
    snapshot_modules(*child, child_path, out);
  }
}

inline std::vector<slot_state> snapshot(const module& root) {
  std::vector<slot_state> out;
  snapshot_modules(root, "", out);
  return out;
}

// ---- user linear types with their own scalar type and storage -----------------------------------
namespace user {

// double weights in a column-major Eigen matrix, bias always present
struct dense_colmajor {
  Eigen::MatrixXd weight;  // out x in, column-major
  Eigen::VectorXd bias;
};
inline bitnet::linear_view<double, Eigen::ColMajor> bitnet_linear(const dense_colmajor& d) {
  return {d.weight, d.bias};
}

// float weights in a flat std::vector, row-major, plus dimensions; no bias
struct flat_dense {
  Index in = 0, out = 0;
  std::vector<float> values;  // out * in, row-major
};
inline bitnet::linear_view<float> bitnet_linear(const flat_dense& d) {
  return {Eigen::Map<const Matrix<float>>(d.values.data(), d.out, d.in), std::nullopt};
}

}  // namespace user

// a "third-party" type the user cannot touch: described through bitnet::layer_traits
namespace thirdparty {
struct Dense {
  Eigen::MatrixXf kernel;  // in x out (transposed, like Keras)
};
}  // namespace thirdparty

}  // namespace fixtures

template <>
struct bitnet::layer_traits<fixtures::thirdparty::Dense> {
  static bitnet::linear_view<float> linear(const fixtures::thirdparty::Dense& d) { return {d.kernel.transpose(), {}}; }
};
