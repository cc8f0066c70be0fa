// bitnet/replace.hpp - replace every linear layer of the user's graph with a BitLinear that keeps
// its weights, all or nothing.
//
//   bitnet::replace_report report = bitnet::replace_linear(model);             // transfer::checked
//   bitnet::replace_linear<bitnet::transfer::move>(model, {.exclude = {"lm_head"}});
//   bitnet::replace_linear(model, options, my_policy{...});                     // a stateful policy
//
// The transaction: walk the graph and decide per slot; build every new BitLinear off to the side
// (the policy's prepare); check them (the policy's verify); then swap them in with noexcept moves
// and release the originals. Any exception before the swap - a failed check, a throwing policy,
// std::bad_alloc - leaves the graph bit-identical to before. Errors are bitnet::transfer_error
// naming the layer path and the reason. See docs/transfer-policies.md and docs/customization.md.
#pragma once

#include <type_traits>
#include <utility>

#include "detail/transaction.hpp"
#include "layer_traits.hpp"
#include "replace_options.hpp"
#include "replace_report.hpp"
#include "transfer.hpp"

namespace bitnet {

/// Object form: the policy is used as given (its state is kept, e.g. counters of a user policy).
template <class Graph, class Policy>
replace_report replace_linear(Graph& graph, const replace_options& options, Policy&& policy) {
  static_assert(layer_graph<Graph>,
                "bitnet::replace_linear: the graph type is not a layer graph: give it bitnet_children(node, visit) "
                "(or BITNET_LAYERS(Type, fields...)), make it a std::vector / std::array / std::deque / string-keyed "
                "map of layers, or specialize bitnet::layer_traits; see docs/customization.md");
  using policy_type = std::remove_cvref_t<Policy>;
  static_assert(transfer_policy<policy_type, float> || transfer_policy<policy_type, double>,
                "bitnet::replace_linear: the policy is not a bitnet::transfer_policy: it needs `static constexpr bool "
                "takes_buffers`, `prepare(const layer_source<T>&)` and `verify(const layer_source<T>&, const "
                "BitLinear<T>&)`; derive from bitnet::transfer::checked to start; see docs/transfer-policies.md");
  policy_type& used = policy;
  return detail::run_transaction(graph, options, used);
}

/// Policy chosen at compile time: replace_linear<transfer::move>(graph).
template <class Policy = transfer::checked, class Graph>
replace_report replace_linear(Graph& graph, const replace_options& options = {}) {
  Policy policy{};
  return replace_linear(graph, options, policy);
}

}  // namespace bitnet
