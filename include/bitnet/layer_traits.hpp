// bitnet/layer_traits.hpp - how the library sees the user's own layer graph.
//
// The library never owns the model: replace_linear walks the user's types. Two tiers, like {fmt}'s
// format_as / formatter<T>:
//
//   * ADL hooks written next to the user's type (the easy form), all prefixed bitnet_:
//       bitnet_children(node, visit)           calls visit(name, child) for each child
//       bitnet_linear(layer)                   returns a bitnet::linear_view of weight (out x in) and bias
//       bitnet_linear_buffers(layer)           optional: the Matrix<T> buffers transfer::move may take
//       bitnet_as_linear(base)                 polymorphic trees: the Linear behind a base, or nullptr
//       bitnet_make_replacement(linear, bit)   polymorphic trees: the node that replaces it in its slot
//       bitnet_as_bit_linear(base)             polymorphic trees: the BitLinear behind a base, or nullptr
//                                              (optional; lets load_state_dict/save_state_dict see it)
//       bitnet_parameters(node, visit)         calls visit(name, tensor) for each non-linear parameter
//                                              (a norm weight, an embedding ...): an Eigen matrix or
//                                              vector of float/double, or an Eigen::Map of one, so that
//                                              load_state_dict/save_state_dict cover the whole model
//   * the trait bitnet::layer_traits<T> (the full form) for types the user cannot touch. Its primary
//     template forwards to the hooks; specialize it to provide the same static functions.
//
// Built in: bitnet::Linear<T>, Eigen matrices and vectors of float/double as children (parameters
// named by their path), std::optional<BitLinear<T>> (a slot a packed checkpoint fills), std::vector / std::array / std::deque (children "0", "1", ...),
// string-keyed std::map / std::unordered_map (named by key), std::variant slots listing a BitLinear<T>
// alternative (bitnet::linear_slot<L>), std::unique_ptr / std::shared_ptr slots, and BITNET_LAYERS.
// See docs/customization.md.
#pragma once

#include <array>
#include <concepts>
#include <cstddef>
#include <deque>
#include <map>
#include <memory>
#include <optional>
#include <string>
#include <string_view>
#include <type_traits>
#include <unordered_map>
#include <utility>
#include <variant>
#include <vector>

#include <Eigen/Core>

#include "bit_linear.hpp"
#include "linear.hpp"
#include "matrix.hpp"

namespace bitnet {

/// What bitnet_linear(layer) returns: references to the layer's weight (out x in) and optional bias,
/// in the layer's own scalar type and storage order. Build it from Eigen matrices, maps (for a
/// std::vector<float> plus dimensions) or row/column-major blocks; it must refer to the layer's
/// storage, not to a temporary.
template <std::floating_point S, int StorageOrder = Eigen::RowMajor>
struct linear_view {
  using scalar = S;
  using weight_ref =
      Eigen::Ref<const Eigen::Matrix<S, Eigen::Dynamic, Eigen::Dynamic, StorageOrder>, 0, Eigen::OuterStride<>>;
  using bias_ref = Eigen::Ref<const Eigen::Matrix<S, Eigen::Dynamic, 1>>;

  weight_ref weight;             // out x in
  std::optional<bias_ref> bias;  // out, or none
};

/// What bitnet_linear_buffers(layer) returns: the layer's own weight buffer (and optionally its bias)
/// that transfer::move may take instead of copying. bias may be null: the bias is then copied.
template <real_scalar T>
struct linear_buffers {
  Matrix<T>* weight;
  std::optional<Vector<T>>* bias = nullptr;
};

// bitnet::Linear<T> is a linear layer out of the box, and gives its buffers to transfer::move.
template <real_scalar T>
linear_view<T> bitnet_linear(const Linear<T>& layer) {
  return {layer.weight, layer.bias};
}
template <real_scalar T>
linear_buffers<T> bitnet_linear_buffers(Linear<T>& layer) noexcept {
  return {&layer.weight, &layer.bias};
}

namespace detail {

/// Stands for the visitor replace_linear passes to bitnet_children when concepts check a node type.
struct child_visitor_archetype {
  template <class Child>
  void operator()(std::string_view name, Child& child) const;
};

/// Stands for the visitor load_state_dict passes to bitnet_parameters when concepts check a node type.
struct parameter_visitor_archetype {
  template <class Tensor>
  void operator()(std::string_view name, Tensor& tensor) const;
};

template <class T>
inline constexpr bool is_linear_view = false;
template <class S, int Order>
inline constexpr bool is_linear_view<linear_view<S, Order>> = true;

template <class P>
inline constexpr bool is_parameter_tensor = false;
template <class S, int R, int C, int O, int MR, int MC>
inline constexpr bool is_parameter_tensor<Eigen::Matrix<S, R, C, O, MR, MC>> = real_scalar<S>;
template <class S, int R, int C, int O, int MR, int MC, int MapOptions, class Stride>
inline constexpr bool is_parameter_tensor<Eigen::Map<Eigen::Matrix<S, R, C, O, MR, MC>, MapOptions, Stride>> =
    real_scalar<S>;

template <class T>
inline constexpr bool is_bit_linear = false;
template <class T>
inline constexpr bool is_bit_linear<BitLinear<T>> = true;

/// Children named "0", "1", ... of a sequence container.
template <class Range, class Visit>
void visit_indexed(Range& range, Visit& visit) {
  std::size_t i = 0;
  for (auto& element : range) {
    const std::string name = std::to_string(i++);
    visit(std::string_view(name), element);
  }
}

template <class Map, class Visit>
void visit_keyed(Map& map, Visit& visit) {
  for (auto& [key, value] : map) visit(std::string_view(key), value);
}

}  // namespace detail

/// The full customization point. The primary template forwards each function to the matching ADL
/// hook when that hook exists; specialize it for types you cannot touch and define the functions you
/// need (children, linear, linear_buffers, as_linear, as_bit_linear, make_replacement) with the same
// signatures.
template <class T>
struct layer_traits {
  template <class Visit>
    requires requires(T& node, Visit& visit) { bitnet_children(node, visit); }
  static void children(T& node, Visit& visit) {
    bitnet_children(node, visit);
  }

  static auto linear(const T& layer)
    requires requires { bitnet_linear(layer); }
  {
    return bitnet_linear(layer);
  }

  static auto linear_buffers(T& layer)
    requires requires { bitnet_linear_buffers(layer); }
  {
    return bitnet_linear_buffers(layer);
  }

  static auto as_linear(T& base)
    requires requires { bitnet_as_linear(base); }
  {
    return bitnet_as_linear(base);
  }

  static auto as_bit_linear(T& base)
    requires requires { bitnet_as_bit_linear(base); }
  {
    return bitnet_as_bit_linear(base);
  }

  template <class Visit>
    requires requires(T& node, Visit& visit) { bitnet_parameters(node, visit); }
  static void parameters(T& node, Visit& visit) {
    bitnet_parameters(node, visit);
  }

  template <class Linear, class Bit>
    requires requires(const Linear& linear, Bit&& bit) { bitnet_make_replacement(linear, std::move(bit)); }
  static auto make_replacement(const Linear& linear, Bit&& bit) {
    return bitnet_make_replacement(linear, std::move(bit));
  }
};

// Sequences: children "0", "1", ...
template <class E, class A>
struct layer_traits<std::vector<E, A>> {
  template <class Visit>
  static void children(std::vector<E, A>& node, Visit& visit) { detail::visit_indexed(node, visit); }
};
template <class E, std::size_t N>
struct layer_traits<std::array<E, N>> {
  template <class Visit>
  static void children(std::array<E, N>& node, Visit& visit) { detail::visit_indexed(node, visit); }
};
template <class E, class A>
struct layer_traits<std::deque<E, A>> {
  template <class Visit>
  static void children(std::deque<E, A>& node, Visit& visit) { detail::visit_indexed(node, visit); }
};

// String-keyed maps: children named by key.
template <class K, class V, class C, class A>
  requires std::is_convertible_v<const K&, std::string_view>
struct layer_traits<std::map<K, V, C, A>> {
  template <class Visit>
  static void children(std::map<K, V, C, A>& node, Visit& visit) { detail::visit_keyed(node, visit); }
};
template <class K, class V, class H, class E, class A>
  requires std::is_convertible_v<const K&, std::string_view>
struct layer_traits<std::unordered_map<K, V, H, E, A>> {
  template <class Visit>
  static void children(std::unordered_map<K, V, H, E, A>& node, Visit& visit) { detail::visit_keyed(node, visit); }
};

/// A linear-like layer: layer_traits<L>::linear (or the bitnet_linear hook) exposes its weight and bias.
template <class L>
concept linear_layer = !detail::is_bit_linear<L> && requires(const L& layer) {
  requires detail::is_linear_view<std::remove_cvref_t<decltype(layer_traits<L>::linear(layer))>>;
};

/// The scalar type of a linear layer's weights as it stores them.
template <linear_layer L>
using linear_scalar_t = typename std::remove_cvref_t<decltype(layer_traits<L>::linear(std::declval<const L&>()))>::scalar;

/// A linear layer whose buffers transfer::move can take (bitnet_linear_buffers or layer_traits).
template <class L, class T>
concept movable_linear_layer = linear_layer<L> && requires(L& layer) {
  { layer_traits<L>::linear_buffers(layer) } -> std::same_as<linear_buffers<T>>;
};

/// A node with named children (bitnet_children, BITNET_LAYERS, layer_traits, or a built-in container).
template <class N>
concept layer_node = requires(N& node, detail::child_visitor_archetype& visit) {
  layer_traits<N>::children(node, visit);
};

/// A non-linear parameter load_state_dict / save_state_dict can read and write in place: an Eigen
/// matrix or vector (or an Eigen::Map of one) of float or double with direct storage access. A
/// vector is a 1-D tensor, any other matrix a 2-D one.
template <class P>
concept parameter_tensor = detail::is_parameter_tensor<P>;

/// A node with non-linear parameters (bitnet_parameters or layer_traits<N>::parameters).
template <class N>
concept parameter_node = requires(N& node, detail::parameter_visitor_archetype& visit) {
  layer_traits<N>::parameters(node, visit);
};

namespace detail {

template <class V>
inline constexpr bool is_variant = false;
template <class... Alternatives>
inline constexpr bool is_variant<std::variant<Alternatives...>> = true;

template <class O>
inline constexpr bool is_optional_bit_linear = false;
template <class T>
inline constexpr bool is_optional_bit_linear<std::optional<BitLinear<T>>> = true;

template <class P>
inline constexpr bool is_owning_pointer = false;
template <class E, class D>
inline constexpr bool is_owning_pointer<std::unique_ptr<E, D>> = true;
template <class E>
inline constexpr bool is_owning_pointer<std::shared_ptr<E>> = true;

/// The one BitLinear<T> alternative of a variant, if any.
template <class V>
struct variant_bit_linear {
  static constexpr std::size_t count = 0;
};
template <class... Alternatives>
struct variant_bit_linear<std::variant<Alternatives...>> {
  static constexpr std::size_t count = (std::size_t(is_bit_linear<Alternatives>) + ... + 0);
  static constexpr std::size_t index = [] {
    constexpr bool flags[] = {is_bit_linear<Alternatives>...};
    std::size_t i = 0;
    while (i < sizeof...(Alternatives) && !flags[i]) ++i;
    return i;
  }();
};

template <class V>
inline constexpr bool variant_lists_linear = false;
template <class... Alternatives>
inline constexpr bool variant_lists_linear<std::variant<Alternatives...>> = (linear_layer<Alternatives> || ...);

}  // namespace detail

/// A std::variant slot that can hold a BitLinear: it lists exactly one BitLinear<T> alternative.
template <class V>
concept bit_linear_slot = detail::is_variant<V> && detail::variant_bit_linear<V>::count == 1;

/// A std::unique_ptr / std::shared_ptr slot of a polymorphic base whose linear nodes can be replaced:
/// bitnet_as_linear(base) recognizes a Linear behind the base, bitnet_make_replacement builds the new node.
template <class P>
concept polymorphic_slot = detail::is_owning_pointer<P> && requires(typename P::element_type& base) {
  requires linear_layer<
      std::remove_cvref_t<decltype(*layer_traits<typename P::element_type>::as_linear(base))>>;
};

/// Something replace_linear can walk: a node with children or parameters, a linear layer, a
/// BitLinear (or a std::optional<BitLinear<T>> slot), a parameter tensor, a variant slot, or an
/// owning pointer to one of these.
template <class G>
concept layer_graph = layer_node<G> || parameter_node<G> || linear_layer<G> || detail::is_bit_linear<G> ||
                      detail::is_optional_bit_linear<G> || parameter_tensor<G> || detail::is_variant<G> ||
                      detail::is_owning_pointer<G>;

namespace detail {
template <class L>
struct default_slot_scalar {
  using type = float;
};
template <class L>
  requires real_scalar<linear_scalar_t<L>>
struct default_slot_scalar<L> {
  using type = linear_scalar_t<L>;
};
}  // namespace detail

/// A slot for a plain struct member that starts as the linear layer L and can become a BitLinear<T>
/// (T defaults to L's own scalar type, or float).
template <linear_layer L, real_scalar T = typename detail::default_slot_scalar<L>::type>
using linear_slot = std::variant<L, BitLinear<T>>;

}  // namespace bitnet

// BITNET_LAYERS(Type, field1, field2, ...) writes bitnet_children for a plain struct: each listed
// member is a child named after the member. Write it in the namespace of Type, after its definition.
#define BITNET_DETAIL_PARENS ()
#define BITNET_DETAIL_EXPAND(...) BITNET_DETAIL_EXPAND3(BITNET_DETAIL_EXPAND3(BITNET_DETAIL_EXPAND3(__VA_ARGS__)))
#define BITNET_DETAIL_EXPAND3(...) BITNET_DETAIL_EXPAND2(BITNET_DETAIL_EXPAND2(BITNET_DETAIL_EXPAND2(__VA_ARGS__)))
#define BITNET_DETAIL_EXPAND2(...) BITNET_DETAIL_EXPAND1(BITNET_DETAIL_EXPAND1(BITNET_DETAIL_EXPAND1(__VA_ARGS__)))
#define BITNET_DETAIL_EXPAND1(...) __VA_ARGS__
#define BITNET_DETAIL_FOR_EACH(macro, ...) \
  __VA_OPT__(BITNET_DETAIL_EXPAND(BITNET_DETAIL_FOR_EACH_STEP(macro, __VA_ARGS__)))
#define BITNET_DETAIL_FOR_EACH_STEP(macro, first, ...) \
  macro(first) __VA_OPT__(BITNET_DETAIL_FOR_EACH_AGAIN BITNET_DETAIL_PARENS(macro, __VA_ARGS__))
#define BITNET_DETAIL_FOR_EACH_AGAIN() BITNET_DETAIL_FOR_EACH_STEP
#define BITNET_DETAIL_VISIT_FIELD(field) bitnet_visit(std::string_view(#field), bitnet_node.field);

#define BITNET_LAYERS(Type, ...)                                        \
  template <class BitnetVisit>                                          \
  void bitnet_children(Type& bitnet_node, BitnetVisit& bitnet_visit) { \
    BITNET_DETAIL_FOR_EACH(BITNET_DETAIL_VISIT_FIELD, __VA_ARGS__)      \
  }                                                                     \
  static_assert(true, "BITNET_LAYERS(" #Type ") needs a semicolon")
