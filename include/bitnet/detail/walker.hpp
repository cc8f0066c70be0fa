// The walk over the user's graph: finds every linear layer, decides (exclude rules, predicate) and
// records one pending replacement per slot. It only reads the graph.
#pragma once

#include <memory>
#include <string>
#include <string_view>
#include <type_traits>
#include <unordered_set>
#include <utility>
#include <variant>
#include <vector>

#include "../layer_traits.hpp"
#include "../replace_options.hpp"
#include "../replace_report.hpp"
#include "transaction.hpp"

namespace bitnet::detail {

template <class>
inline constexpr bool always_false = false;

template <class B>
struct bit_linear_scalar;
template <class T>
struct bit_linear_scalar<BitLinear<T>> {
  using type = T;
};

template <class Base, class L, class T>
concept replaceable_with = requires(const L& linear, BitLinear<T>&& bit) {
  layer_traits<Base>::make_replacement(linear, std::move(bit));
};

/// The T of the BitLinear<T> bitnet_make_replacement accepts for L: L's own scalar type first.
template <class Base, class L>
consteval int replacement_scalar_choice() {
  if constexpr (real_scalar<linear_scalar_t<L>> && replaceable_with<Base, L, linear_scalar_t<L>>)
    return std::is_same_v<linear_scalar_t<L>, float> ? 1 : 2;
  else if constexpr (replaceable_with<Base, L, float>)
    return 1;
  else if constexpr (replaceable_with<Base, L, double>)
    return 2;
  else
    return 0;
}

template <class Policy>
class planner {
 public:
  planner(const replace_options& options, replace_report& report) : options_(options), report_(report) {}

  std::vector<std::unique_ptr<pending_layer<Policy>>>& layers() noexcept { return layers_; }

  template <class Node>
  void walk(Node& node) {
    if constexpr (is_bit_linear<Node>) {
      // already converted
    } else if constexpr (linear_layer<Node>) {
      fixed_linear(node);
    } else if constexpr (is_variant<Node>) {
      walk_variant(node);
    } else if constexpr (is_owning_pointer<Node>) {
      walk_pointer(node);
    } else if constexpr (layer_node<Node>) {
      auto visit = [this](std::string_view name, auto& child) {
        const std::size_t length = path_.size();
        if (!path_.empty()) path_ += '.';
        path_ += name;
        walk(child);
        path_.resize(length);
      };
      layer_traits<Node>::children(node, visit);
    } else {
      static_assert(always_false<Node>,
                    "bitnet::replace_linear cannot walk a type in this graph: give it bitnet_children(node, visit) "
                    "(or BITNET_LAYERS(Type, fields...)) if it has children, bitnet_linear(layer) if it is a linear "
                    "layer, or specialize bitnet::layer_traits; see docs/customization.md");
    }
  }

 private:
  // A linear layer in a place that cannot hold a BitLinear: an error unless the user keeps it.
  template <class L>
  void fixed_linear(L& layer) {
    if (kept(layer)) return;
    throw transfer_failure(path_, "this linear layer sits in a slot that cannot hold a BitLinear (a plain member or "
                                  "element); declare the slot as bitnet::linear_slot<...> or a std::variant listing "
                                  "BitLinear<T>, or exclude the layer; see docs/customization.md");
  }

  template <class Variant>
  void walk_variant(Variant& slot) {
    static_assert(!variant_lists_linear<Variant> || variant_bit_linear<Variant>::count > 0,
                  "bitnet::replace_linear: a std::variant slot lists a linear layer but no bitnet::BitLinear<T> "
                  "alternative to replace it with: add BitLinear<float> (or use bitnet::linear_slot<L>); see "
                  "docs/customization.md");
    static_assert(variant_bit_linear<Variant>::count <= 1,
                  "bitnet::replace_linear: a std::variant slot lists more than one bitnet::BitLinear<T> alternative; "
                  "list exactly one; see docs/customization.md");
    if (slot.valueless_by_exception()) return;
    std::visit(
        [&](auto& alternative) {
          using A = std::remove_cvref_t<decltype(alternative)>;
          if constexpr (linear_layer<A>) {
            if (!first_visit(&slot) || kept(alternative)) return;
            using T = typename bit_linear_scalar<std::variant_alternative_t<variant_bit_linear<Variant>::index, Variant>>::type;
            layers_.push_back(std::make_unique<variant_slot<Policy, Variant, A, T>>(path_, slot, alternative));
          } else if constexpr (layer_graph<A>) {
            walk(alternative);
          }
          // any other alternative (an activation, a norm without weights ...) is a leaf
        },
        slot);
  }

  template <class Pointer>
  void walk_pointer(Pointer& slot) {
    if (!slot) return;
    using base = typename Pointer::element_type;
    if constexpr (polymorphic_slot<Pointer>) {
      if (auto* linear = layer_traits<base>::as_linear(*slot)) {
        using L = std::remove_cvref_t<decltype(*linear)>;
        constexpr int choice = replacement_scalar_choice<base, L>();
        static_assert(choice != 0,
                      "bitnet::replace_linear: bitnet_as_linear recognizes a linear layer behind this base, but no "
                      "bitnet_make_replacement(const L&, bitnet::BitLinear<T>&&) builds the node that replaces it; "
                      "see docs/customization.md");
        if (!first_visit(&slot) || kept(*linear)) return;
        using T = std::conditional_t<choice == 1, float, double>;
        layers_.push_back(std::make_unique<pointer_slot<Policy, Pointer, L, T>>(path_, slot, const_cast<L&>(*linear)));
      } else if constexpr (layer_graph<base>) {
        walk(*slot);
      }
      // a base without children is a leaf in a polymorphic tree (an activation ...)
    } else {
      walk(*slot);
    }
  }

  bool first_visit(const void* slot) { return visited_.insert(slot).second; }

  // Whether an exclude rule or the predicate keeps this layer (recorded in the report).
  template <class L>
  bool kept(const L& layer) {
    for (const auto& rule : options_.exclude)
      if (rule.matches(path_)) {
        report_.kept.push_back({path_, "excluded by " + rule.describe()});
        return true;
      }
    if (options_.predicate) {
      const auto view = layer_traits<L>::linear(layer);
      const linear_info info{view.weight.cols(), view.weight.rows(), view.bias.has_value()};
      if (!options_.predicate(path_, info)) {
        report_.kept.push_back({path_, "rejected by the predicate"});
        return true;
      }
    }
    return false;
  }

  const replace_options& options_;
  replace_report& report_;
  std::string path_;
  std::vector<std::unique_ptr<pending_layer<Policy>>> layers_;
  std::unordered_set<const void*> visited_;
};

/// The whole transaction: plan, prepare, verify, commit, release (DESIGN.md section 4).
template <class Policy, class Graph>
replace_report run_transaction(Graph& graph, const replace_options& options, Policy& policy) {
  replace_report report;
  report.dry_run = options.dry_run;
  planner<Policy> plan(options, report);
  plan.walk(graph);
  auto& layers = plan.layers();
  report.layers.reserve(layers.size());
  const bool take_buffers = Policy::takes_buffers && !options.dry_run;
  try {
    for (auto& layer : layers) layer->stage(policy, options.layer_options, take_buffers);
    for (auto& layer : layers) layer->verify(policy);
    for (auto& layer : layers) report.layers.push_back(layer->describe());
    if (!options.dry_run)
      for (auto& layer : layers) layer->finish();
  } catch (...) {
    for (auto& layer : layers) layer->roll_back();
    throw;
  }
  if (options.dry_run)
    for (auto& layer : layers) layer->roll_back();
  else
    for (auto& layer : layers) layer->commit();
  return report;  // the plan goes out of scope here: the original layers are released
}

}  // namespace bitnet::detail
