// One pending replacement per slot: build the new BitLinear off to the side, check it, then swap it
// in with no chance of failure (commit) or undo everything (roll_back). See DESIGN.md section 4.
#pragma once

#include <memory>
#include <optional>
#include <string>
#include <utility>

#include "../bit_linear.hpp"
#include "../errors.hpp"
#include "../layer_traits.hpp"
#include "../replace_report.hpp"
#include "../transfer.hpp"

namespace bitnet::detail {

template <class Policy>
class pending_layer {
 public:
  explicit pending_layer(std::string path) : path_(std::move(path)) {}
  pending_layer(const pending_layer&) = delete;
  pending_layer& operator=(const pending_layer&) = delete;
  virtual ~pending_layer() = default;

  const std::string& path() const noexcept { return path_; }

  /// Prepare: build the new layer off to the side. May throw; the graph stays as it was, or (for
  /// adopted buffers) restorable by roll_back.
  virtual void stage(Policy& policy, const bitlinear_options& options, bool take_buffers) = 0;
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
};

/// The part every slot kind shares: building BitLinear<T> from a linear layer L of the graph.
template <class Policy, class L, real_scalar T>
class staged_linear : public pending_layer<Policy> {
  static_assert(transfer_policy<Policy, T>,
                "bitnet::replace_linear: the transfer policy does not provide, for BitLinear<T> of this graph's T, "
                "`static constexpr bool takes_buffers`, `prepare(const layer_source<T>&)` and "
                "`verify(const layer_source<T>&, const BitLinear<T>&)`; see docs/transfer-policies.md");

 public:
  staged_linear(std::string path, L& source) : pending_layer<Policy>(std::move(path)), source_(&source) {}

  void stage(Policy& policy, const bitlinear_options& options, bool take_buffers) override {
    options_ = options;
    if constexpr (movable_linear_layer<L, T>) {
      if (take_buffers) return adopt(policy);
    }
    const auto view = layer_traits<L>::linear(*source_);
    const layer_source<T> source(this->path(), view, options_);
    policy.prepare(source);
    build([&] { return BitLinear<T>(source.weight_matrix(), source.bias_vector(), options_); });
  }

  void verify(Policy& policy) override {
    if (adopted_) {
      const linear_view<T> view{staged_->weight(), staged_->bias()};
      policy.verify(layer_source<T>(this->path(), view, options_, true), *staged_);
    } else {
      const auto view = layer_traits<L>::linear(*source_);
      policy.verify(layer_source<T>(this->path(), view, options_), *staged_);
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
  std::optional<linear_buffers<T>> adopted_;
};

/// A std::variant slot holding L; the new layer goes into its BitLinear<T> alternative.
template <class Policy, class Variant, class L, real_scalar T>
class variant_slot final : public staged_linear<Policy, L, T> {
 public:
  variant_slot(std::string path, Variant& slot, L& source)
      : staged_linear<Policy, L, T>(std::move(path), source), slot_(&slot) {}

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
  pointer_slot(std::string path, Pointer& slot, L& source)
      : staged_linear<Policy, L, T>(std::move(path), source), slot_(&slot) {}

  // The new node is built from the staged layer, which then lives inside it; staging for a pointer
  // slot therefore always copies (adopted buffers could not be handed back out of a user's node).
  void stage(Policy& policy, const bitlinear_options& options, bool) override {
    staged_linear<Policy, L, T>::stage(policy, options, false);
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

}  // namespace bitnet::detail
