// The one walk over the user's layer graph, shared by replace_linear (detail/transaction.hpp) and
// load_state_dict / save_state_dict (state_dict.hpp): it dispatches on the kind of each node and
// builds the dotted path; what happens at a layer is the visitor's. It only reads the graph.
// The shapes of graph it understands are those of docs/customization.md.
#pragma once

#include <cstddef>
#include <string>
#include <string_view>
#include <type_traits>
#include <variant>

#include "../layer_traits.hpp"

namespace bitnet::detail {

template <class>
inline constexpr bool always_false = false;

/// The place of a layer that no other layer can take: a plain member or element of a container.
struct fixed_place {};

template <class Visitor>
concept visits_parameters = Visitor::visits_parameters;

template <class Visitor, class Slot>
concept visits_optional_slots = requires(Visitor& v, const std::string& path, Slot& slot) {
  v.optional_bit_linear(path, slot);
};

template <class B>
concept has_bit_linear_hook = requires(B& base) {
  { layer_traits<B>::as_bit_linear(base) };
};

/// Walks a graph depth first, children in the order bitnet_children (or the container) gives them,
/// and tells the visitor about every layer with its dotted path ("blocks.3.mlp.down") and its slot:
/// the std::variant or the std::unique_ptr / std::shared_ptr that holds it, or fixed_place.
///
///   visitor.linear(path, layer, slot)        a linear-like layer (bitnet_linear, layer_traits)
///   visitor.bit_linear(path, layer, slot)    a BitLinear<T>
///   visitor.optional_bit_linear(path, slot)  a std::optional<BitLinear<T>> (if the visitor has it;
///                                            else its layer, when it holds one, as a BitLinear)
///   visitor.parameter(path, tensor)          a non-linear parameter: an Eigen child or one named by
///                                            bitnet_parameters (if Visitor::visits_parameters)
///   Visitor::unwalkable<Node>()              a node the walk cannot open: a static_assert naming
///                                            the entry point
///   Visitor::finds_bit_linear_nodes          pointer slots are asked bitnet_as_bit_linear first
///   Visitor::skips_opaque_pointees           the pointee of a non-polymorphic pointer that is not a
///                                            graph is a leaf rather than unwalkable
template <class Visitor>
class graph_walker {
 public:
  explicit graph_walker(Visitor& visitor) : visitor_(visitor) {}

  template <class Node>
  void walk(Node& node) {
    if constexpr (is_bit_linear<Node>) {
      visitor_.bit_linear(path_, node, fixed_);
    } else if constexpr (is_optional_bit_linear<Node>) {
      if constexpr (visits_optional_slots<Visitor, Node>)
        visitor_.optional_bit_linear(path_, node);
      else if (node)
        visitor_.bit_linear(path_, *node, fixed_);
    } else if constexpr (linear_layer<Node>) {
      visitor_.linear(path_, node, fixed_);
    } else if constexpr (parameter_tensor<Node>) {
      if constexpr (visits_parameters<Visitor>) visitor_.parameter(path_, node);
    } else if constexpr (is_variant<Node>) {
      walk_variant(node);
    } else if constexpr (is_owning_pointer<Node>) {
      walk_pointer(node);
    } else if constexpr (layer_node<Node> || parameter_node<Node>) {
      if constexpr (parameter_node<Node> && visits_parameters<Visitor>) {
        auto visit = [this](std::string_view name, auto& tensor) {
          static_assert(parameter_tensor<std::remove_cvref_t<decltype(tensor)>>,
                        "bitnet_parameters: visit(name, tensor) takes an Eigen matrix or vector of float or "
                        "double (or an Eigen::Map of one); see docs/customization.md");
          const std::size_t length = path_.size();
          if (!path_.empty()) path_ += '.';
          path_ += name;
          visitor_.parameter(path_, tensor);
          path_.resize(length);
        };
        layer_traits<Node>::parameters(node, visit);
      }
      if constexpr (layer_node<Node>) {
        auto visit = [this](std::string_view name, auto& child) {
          const std::size_t length = path_.size();
          if (!path_.empty()) path_ += '.';
          path_ += name;
          walk(child);
          path_.resize(length);
        };
        layer_traits<Node>::children(node, visit);
      }
    } else {
      Visitor::template unwalkable<Node>();
    }
  }

 private:
  template <class Variant>
  void walk_variant(Variant& slot) {
    if (slot.valueless_by_exception()) return;
    std::visit(
        [&](auto& alternative) {
          using A = std::remove_cvref_t<decltype(alternative)>;
          if constexpr (is_bit_linear<A>)
            visitor_.bit_linear(path_, alternative, slot);
          else if constexpr (linear_layer<A>)
            visitor_.linear(path_, alternative, slot);
          else if constexpr (layer_graph<A>)
            walk(alternative);
          // any other alternative (an activation, a norm without weights ...) is a leaf
        },
        slot);
  }

  template <class Pointer>
  void walk_pointer(Pointer& slot) {
    if (!slot) return;
    using base = typename Pointer::element_type;
    if constexpr (Visitor::finds_bit_linear_nodes && has_bit_linear_hook<base>) {
      if (auto* bit = layer_traits<base>::as_bit_linear(*slot)) return visitor_.bit_linear(path_, *bit, slot);
    }
    if constexpr (polymorphic_slot<Pointer>) {
      if (auto* linear = layer_traits<base>::as_linear(*slot)) {
        using L = std::remove_cvref_t<decltype(*linear)>;
        return visitor_.linear(path_, const_cast<L&>(*linear), slot);
      }
    }
    // a polymorphic base that is neither linear nor has children is a leaf (an activation ...)
    if constexpr (layer_graph<base> || !(polymorphic_slot<Pointer> || Visitor::skips_opaque_pointees)) walk(*slot);
  }

  Visitor& visitor_;
  std::string path_;
  fixed_place fixed_;
};

}  // namespace bitnet::detail
