// replace_linear's transaction (DESIGN.md section 4): the planner walks the graph and records one
// pending replacement per slot; each builds its new BitLinear off to the side and checks it, then
// all are swapped in with no chance of failure (commit), or everything is undone (roll_back).
#pragma once

#include <memory>
#include <optional>
#include <string>
#include <type_traits>
#include <unordered_set>
#include <utility>
#include <variant>
#include <vector>

#include "../bit_linear.hpp"
#include "../errors.hpp"
#include "../layer_traits.hpp"
#include "../replace_options.hpp"
#include "../replace_report.hpp"
#include "../transfer.hpp"
#include "walker.hpp"

namespace bitnet::detail {

template <class Policy>
class pending_layer {
 public:
  pending_layer(std::string path, bitlinear_options options) : path_(std::move(path)), options_(std::move(options)) {}
  pending_layer(const pending_layer&) = delete;
  pending_layer& operator=(const pending_layer&) = delete;
  virtual ~pending_layer() = default;

  const std::string& path() const noexcept { return path_; }
  /// The options this layer is built with (replace_options::layer_options, or layer_options_for's).
  const bitlinear_options& options() const noexcept { return options_; }

  /// Prepare: build the new layer off to the side. May throw; the graph stays as it was, or (for
  /// adopted buffers) restorable by roll_back.
  virtual void stage(Policy& policy, ternary_import weights, bool take_buffers) = 0;
  /// Verify: run the policy's checks on the built layer. May throw.
  virtual void verify(Policy& policy) = 0;
  virtual layer_report describe() const = 0;
  /// Last fallible step: build whatever node goes into the slot. May throw.
  virtual void finish() {}
  /// Swap the new node into its slot.
  virtual void commit() noexcept = 0;
  /// Undo stage(): hand adopted buffers back and drop the new layer. Safe to call in any state.
  virtual void roll_back() noexcept = 0;

 private:
  std::string path_;
  bitlinear_options options_;
};

/// The part every slot kind shares: building BitLinear<T> from a linear layer L of the graph.
template <class Policy, class L, real_scalar T>
class staged_linear : public pending_layer<Policy> {
  static_assert(transfer_policy<Policy, T>,
                "bitnet::replace_linear: the transfer policy does not provide, for BitLinear<T> of this graph's T, "
                "`static constexpr bool takes_buffers`, `prepare(const layer_source<T>&)` and "
                "`verify(const layer_source<T>&, const BitLinear<T>&)`; see docs/transfer-policies.md");

 public:
  staged_linear(std::string path, bitlinear_options options, L& source)
      : pending_layer<Policy>(std::move(path), std::move(options)), source_(&source) {}

  void stage(Policy& policy, ternary_import weights, bool take_buffers) override {
    options_ = this->options();
    exact_ = weights == ternary_import::exact;
    if (exact_) options_.scale_update = weight_scale_update::frozen;  // what from_exact_ternary builds
    if constexpr (movable_linear_layer<L, T>) {
      if (take_buffers && !exact_) return adopt(policy);  // an exact import keeps no latent weights to adopt
    }
    const auto view = layer_traits<L>::linear(*source_);
    const layer_source<T> source(this->path(), view, options_, false, exact_);
    policy.prepare(source);
    if (exact_)
      build([&] { return BitLinear<T>::from_exact_ternary(source.weight_matrix(), source.bias_vector(), options_, "weight"); });
    else
      build([&] { return BitLinear<T>(source.weight_matrix(), source.bias_vector(), options_); });
  }

  void verify(Policy& policy) override {
    if (adopted_) {
      const linear_view<T> view{staged_->weight(), staged_->bias()};
      policy.verify(layer_source<T>(this->path(), view, options_, true), *staged_);
    } else {
      const auto view = layer_traits<L>::linear(*source_);
      policy.verify(layer_source<T>(this->path(), view, options_, false, exact_), *staged_);
    }
  }

  layer_report describe() const override { return describe_layer(this->path(), *staged_); }

  void roll_back() noexcept override {
    if (staged_ && adopted_) {
      auto [weight, bias] = std::move(*staged_).release();
      *adopted_->weight = std::move(weight);
      if (adopted_->bias) *adopted_->bias = std::move(bias);
    }
    adopted_.reset();
    staged_.reset();
  }

 protected:
  L& source() const noexcept { return *source_; }
  std::optional<BitLinear<T>> staged_;

 private:
  // transfer::move: the new layer takes the weight buffer (and the bias, if exposed) only once it
  // cannot fail any more; roll_back hands them back.
  void adopt(Policy& policy) {
    const linear_buffers<T> buffers = layer_traits<L>::linear_buffers(*source_);
    std::optional<Vector<T>> copied_bias;
    if (!buffers.bias) copied_bias = layer_source<T>(this->path(), layer_traits<L>::linear(*source_), options_).bias_vector();
    std::optional<Vector<T>>& bias = buffers.bias ? *buffers.bias : copied_bias;
    {
      const linear_view<T> view{*buffers.weight, bias};
      policy.prepare(layer_source<T>(this->path(), view, options_));
    }
    build([&] { return BitLinear<T>(adopt_buffers, *buffers.weight, bias, options_); });
    adopted_ = buffers;
  }

  template <class Make>
  void build(Make make) {
    try {
      staged_.emplace(make());
    } catch (const transfer_error&) {
      throw;
    } catch (const error& e) {
      throw transfer_failure(this->path(), e.what());
    }
  }

  L* source_;
  bitlinear_options options_;
  bool exact_ = false;
  std::optional<linear_buffers<T>> adopted_;
};

/// A std::variant slot holding L; the new layer goes into its BitLinear<T> alternative.
template <class Policy, class Variant, class L, real_scalar T>
class variant_slot final : public staged_linear<Policy, L, T> {
 public:
  variant_slot(std::string path, bitlinear_options options, Variant& slot, L& source)
      : staged_linear<Policy, L, T>(std::move(path), std::move(options), source), slot_(&slot) {}

  void commit() noexcept override {
    slot_->template emplace<variant_bit_linear<Variant>::index>(std::move(*this->staged_));
    this->staged_.reset();
  }

 private:
  Variant* slot_;
};

/// A std::unique_ptr / std::shared_ptr slot of a polymorphic base pointing at L; the new node comes
/// from bitnet_make_replacement. The original node is released when the transaction ends.
template <class Policy, class Pointer, class L, real_scalar T>
class pointer_slot final : public staged_linear<Policy, L, T> {
 public:
  pointer_slot(std::string path, bitlinear_options options, Pointer& slot, L& source)
      : staged_linear<Policy, L, T>(std::move(path), std::move(options), source), slot_(&slot) {}

  // The new node is built from the staged layer, which then lives inside it; staging for a pointer
  // slot therefore always copies (adopted buffers could not be handed back out of a user's node).
  void stage(Policy& policy, ternary_import weights, bool) override {
    staged_linear<Policy, L, T>::stage(policy, weights, false);
  }

  void finish() override {
    using base = typename Pointer::element_type;
    replacement_ = layer_traits<base>::make_replacement(std::as_const(this->source()), std::move(*this->staged_));
    this->staged_.reset();
    if (!replacement_) throw transfer_failure(this->path(), "bitnet_make_replacement returned a null pointer");
  }

  void commit() noexcept override {
    original_ = std::move(*slot_);
    *slot_ = std::move(replacement_);
  }

  void roll_back() noexcept override {
    replacement_ = nullptr;
    staged_linear<Policy, L, T>::roll_back();
  }

 private:
  Pointer* slot_;
  Pointer replacement_;
  Pointer original_;
};

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

/// The graph_walker visitor of replace_linear: decides per slot (exclude rules, predicate) and
/// records one pending replacement for each linear layer to convert. It only reads the graph.
template <class Policy>
class planner {
 public:
  // A converted node needs nothing, and every pointee must be something the walk understands.
  static constexpr bool finds_bit_linear_nodes = false;
  static constexpr bool skips_opaque_pointees = false;

  template <class Node>
  static void unwalkable() {
    static_assert(always_false<Node>,
                  "bitnet::replace_linear cannot walk a type in this graph: give it bitnet_children(node, visit) "
                  "(or BITNET_LAYERS(Type, fields...)) if it has children, bitnet_linear(layer) if it is a linear "
                  "layer, or specialize bitnet::layer_traits; see docs/customization.md");
  }

  planner(const replace_options& options, replace_report& report) : options_(options), report_(report) {}

  std::vector<std::unique_ptr<pending_layer<Policy>>>& layers() noexcept { return layers_; }

  // A linear layer in a place that cannot hold a BitLinear: an error unless the user keeps it.
  template <class L>
  void linear(const std::string& path, L& layer, fixed_place) {
    if (kept(path, layer)) return;
    throw transfer_failure(path, "this linear layer sits in a slot that cannot hold a BitLinear (a plain member or "
                                 "element); declare the slot as bitnet::linear_slot<...> or a std::variant listing "
                                 "BitLinear<T>, or exclude the layer; see docs/customization.md");
  }

  template <class L, class... Alternatives>
  void linear(const std::string& path, L& layer, std::variant<Alternatives...>& slot) {
    using Variant = std::variant<Alternatives...>;
    check_variant<Variant>();
    if constexpr (bit_linear_slot<Variant>) {  // else check_variant's message is the only error
      if (!first_visit(&slot) || kept(path, layer)) return;
      using T = typename bit_linear_scalar<std::variant_alternative_t<variant_bit_linear<Variant>::index, Variant>>::type;
      layers_.push_back(std::make_unique<variant_slot<Policy, Variant, L, T>>(path, options_for(path, layer), slot, layer));
    }
  }

  template <class L, class Pointer>
    requires is_owning_pointer<Pointer>
  void linear(const std::string& path, L& layer, Pointer& slot) {
    using base = typename Pointer::element_type;
    constexpr int choice = replacement_scalar_choice<base, L>();
    static_assert(choice != 0,
                  "bitnet::replace_linear: bitnet_as_linear recognizes a linear layer behind this base, but no "
                  "bitnet_make_replacement(const L&, bitnet::BitLinear<T>&&) builds the node that replaces it; "
                  "see docs/customization.md");
    if (!first_visit(&slot) || kept(path, layer)) return;
    using T = std::conditional_t<choice == 1, float, double>;
    layers_.push_back(std::make_unique<pointer_slot<Policy, Pointer, L, T>>(path, options_for(path, layer), slot, layer));
  }

  // Already converted; a variant slot holding it must still be one replace_linear accepts.
  template <class B, class Slot>
  void bit_linear(const std::string&, B&, Slot&) {
    if constexpr (is_variant<Slot>) check_variant<Slot>();
  }

 private:
  template <class Variant>
  static void check_variant() {
    static_assert(!variant_lists_linear<Variant> || variant_bit_linear<Variant>::count > 0,
                  "bitnet::replace_linear: a std::variant slot lists a linear layer but no bitnet::BitLinear<T> "
                  "alternative to replace it with: add BitLinear<float> (or use bitnet::linear_slot<L>); see "
                  "docs/customization.md");
    static_assert(variant_bit_linear<Variant>::count <= 1,
                  "bitnet::replace_linear: a std::variant slot lists more than one bitnet::BitLinear<T> alternative; "
                  "list exactly one; see docs/customization.md");
  }

  bool first_visit(const void* slot) { return visited_.insert(slot).second; }

  template <class L>
  static linear_info info_of(const L& layer) {
    const auto view = layer_traits<L>::linear(layer);
    return {view.weight.cols(), view.weight.rows(), view.bias.has_value()};
  }

  // The options the layer at `path` is built with: replace_options::layer_options_for's, checked
  // against the layer's width here (before anything is built), or layer_options.
  template <class L>
  bitlinear_options options_for(const std::string& path, const L& layer) const {
    if (!options_.layer_options_for) return options_.layer_options;
    const linear_info info = info_of(layer);
    bitlinear_options chosen;
    try {
      chosen = options_.layer_options_for(path, info);
    } catch (const transfer_error&) {
      throw;
    } catch (const error& e) {
      throw transfer_failure(path, std::string("layer_options_for threw: ") + e.what());
    }
    if (chosen.rotation && chosen.rotation->in_features() != info.in_features)
      throw transfer_failure(path, "layer_options_for gave a rotation for " +
                                       std::to_string(chosen.rotation->in_features()) + " inputs, the layer has " +
                                       std::to_string(info.in_features));
    return chosen;
  }

  // Whether an exclude rule or the predicate keeps this layer (recorded in the report).
  template <class L>
  bool kept(const std::string& path, const L& layer) {
    for (const auto& rule : options_.exclude)
      if (rule.matches(path)) {
        report_.kept.push_back({path, "excluded by " + rule.describe()});
        return true;
      }
    if (options_.predicate) {
      if (!options_.predicate(path, info_of(layer))) {
        report_.kept.push_back({path, "rejected by the predicate"});
        return true;
      }
    }
    return false;
  }

  const replace_options& options_;
  replace_report& report_;
  std::vector<std::unique_ptr<pending_layer<Policy>>> layers_;
  std::unordered_set<const void*> visited_;
};

/// The whole transaction: plan, prepare, verify, commit, release (DESIGN.md section 4).
template <class Policy, class Graph>
replace_report run_transaction(Graph& graph, const replace_options& options, Policy& policy) {
  replace_report report;
  report.dry_run = options.dry_run;
  planner<Policy> plan(options, report);
  graph_walker<planner<Policy>>(plan).walk(graph);
  auto& layers = plan.layers();
  report.layers.reserve(layers.size());
  const bool take_buffers = Policy::takes_buffers && !options.dry_run;
  try {
    for (auto& layer : layers) layer->stage(policy, options.weights, take_buffers);
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
