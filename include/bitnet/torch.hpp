// bitnet/torch.hpp - BitNet b1.58 for libtorch module trees (the optional component bitnet::torch,
// present when CMake finds Torch).
//
//   auto model = torch::nn::Sequential(torch::nn::Linear(64, 256), torch::nn::ReLU(), torch::nn::Linear(256, 10));
//   bitnet::libtorch::replace_linear(*model);               // transfer::checked; or <bitnet::transfer::move>
//   model->train();  ... torch::optim::AdamW over model->parameters() ...   // STE through autograd
//   model->eval();  torch::NoGradGuard no_grad;  model->forward(x);        // bitnet's packed kernels
//
// The namespace is bitnet::libtorch, not bitnet::torch: a bitnet::torch would hide ::torch inside
// namespace bitnet (TORCH_MODULE and every unqualified torch:: there would break) and make torch::
// ambiguous for users who write `using namespace bitnet;`.
//
// BitLinear (a torch::nn::ModuleHolder of BitLinearImpl) registers "weight" (out x in) and "bias"
// exactly as torch::nn::Linear does, so named_parameters() and the keys torch::save writes do not
// change when a Linear is swapped for it. Its forward:
//   - training (is_training()) or gradients enabled: the published straight-through recipe in torch
//     ops, n + lambda * (q(n) - n).detach() for the activations n = RMSNorm(x) or x, and the same for
//     the weight, then torch::nn::functional::linear: autograd gives PyTorch's BitLinear gradients.
//     lambda is the warm-up strength (set_lambda); in eval mode the layer is the ternary layer (lambda 1);
//   - eval mode with gradients off (torch::NoGradGuard, torch::InferenceMode): bitnet's packed integer
//     kernels, bit-identical to bitnet::BitLinear<T>::forward. The weights are quantized and packed
//     once and again only when the weight or bias tensor changed (its version counter, storage or
//     data pointer: an optimizer step, a copy_, set_data or torch::load) and once after training
//     forwards (writes through p.data(), as libtorch's C++ SGD makes, leave the version counter as
//     it was), never per call.
// float32 and float64 CPU tensors only; other dtypes and devices are a bitnet::value_error, never a
// silent conversion.
//
// A BitLinear loaded from a packed checkpoint (bitnet/torch_state_dict.hpp) is packed-only: no latent
// weight ("weight" registered undefined), eval inference on the kernels, no training (packed_only()).
//
// replace_linear walks a module tree as named_modules() does and swaps every torch::nn::Linear for
// a BitLinear in every place that holds it: the parent's registry (replace_module) and the storage
// of Sequential, ModuleList and ModuleDict, which keep their own lists. All or nothing: any error
// leaves every module object in its slot and throws bitnet::transfer_error naming the path.
#pragma once

#include <torch/torch.h>

#include <cmath>
#include <cstdint>
#include <cstring>
#include <memory>
#include <mutex>
#include <optional>
#include <string>
#include <string_view>
#include <type_traits>
#include <unordered_map>
#include <unordered_set>
#include <utility>
#include <variant>
#include <vector>

#include "bit_linear.hpp"
#include "errors.hpp"
#include "layer_traits.hpp"
#include "matrix.hpp"
#include "replace_options.hpp"
#include "replace_report.hpp"
#include "transfer.hpp"

namespace bitnet::libtorch {

namespace detail {

struct module_state_access;  // bitnet/torch_state_dict.hpp: loads a packed layer into a BitLinear module

inline std::string dtype_name(const ::torch::Tensor& t) { return std::string(c10::toString(t.scalar_type())); }

/// Throws value_error unless `t` is a defined float32 / float64 CPU tensor.
inline void require_cpu_real(const ::torch::Tensor& t, std::string_view what) {
  if (!t.defined()) throw value_error(std::string(what) + " is an undefined tensor");
  if (!t.device().is_cpu())
    throw value_error(std::string(what) + " is on " + t.device().str() +
                      "; bitnet's kernels run on the CPU: move the module and its inputs with .to(torch::kCPU)");
  if (t.scalar_type() != ::torch::kFloat && t.scalar_type() != ::torch::kDouble)
    throw value_error(std::string(what) + " has dtype " + dtype_name(t) +
                      "; bitnet::libtorch::BitLinear computes in float32 or float64 (convert the module with "
                      ".to(torch::kFloat))");
}

/// What the packed cache was built from: a tensor's storage and data pointer (kept alive, so a new
/// tensor cannot reuse the address unnoticed) and its version counter.
struct tensor_stamp {
  c10::Storage storage;
  const void* data = nullptr;
  std::int64_t version = -1;
  bool defined = false;

  static tensor_stamp of(const ::torch::Tensor& t) {
    tensor_stamp s;
    if (!t.defined()) return s;
    s.defined = true;
    s.storage = t.storage();
    s.data = t.data_ptr();
    // Tensors created inside InferenceMode have no version counter; their storage and address still tell.
    s.version = t.is_inference() ? -1 : t._version();
    return s;
  }
  bool matches(const ::torch::Tensor& t) const {
    if (!t.defined()) return !defined;
    return defined && t.storage().unsafeGetStorageImpl() == storage.unsafeGetStorageImpl() && t.data_ptr() == data &&
           (t.is_inference() ? -1 : t._version()) == version;
  }
};

}  // namespace detail

/// The BitNet b1.58 linear layer as a libtorch module; see the top of this header.
class BitLinearImpl : public ::torch::nn::Cloneable<BitLinearImpl> {
 public:
  /// A new layer initialized as torch::nn::Linear initializes one (Kaiming-uniform weight, uniform
  /// bias), in float32 (use .to(torch::kDouble) for float64). Throws shape_error for in_features or
  /// out_features < 1 or in_features > bitnet::max_in_features, value_error for a bad rms_eps.
  BitLinearImpl(std::int64_t in_features, std::int64_t out_features, bool with_bias = true,
                bitlinear_options options = {})
      : in_features_(in_features), out_features_(out_features), with_bias_(with_bias), options_(validated(options)) {
    check_features(in_features, out_features);
    reset();
  }

  /// A layer whose parameters are the given tensors themselves (registered, not copied: the same
  /// storage and gradient, requires_grad kept): weight out x in, bias out or undefined. Throws
  /// value_error for a tensor that is not float32 / float64 on the CPU or dtypes that differ, and
  /// shape_error for wrong shapes.
  BitLinearImpl(::torch::Tensor weight_tensor, ::torch::Tensor bias_tensor, bitlinear_options options = {})
      : options_(validated(options)) {
    detail::require_cpu_real(weight_tensor, "bitnet::libtorch::BitLinear: weight");
    if (weight_tensor.dim() != 2)
      throw shape_error("bitnet::libtorch::BitLinear: weight has " + std::to_string(weight_tensor.dim()) +
                        " dimensions, expected 2 (out x in)");
    in_features_ = weight_tensor.size(1);
    out_features_ = weight_tensor.size(0);
    check_features(in_features_, out_features_);
    with_bias_ = bias_tensor.defined();
    if (with_bias_) {
      detail::require_cpu_real(bias_tensor, "bitnet::libtorch::BitLinear: bias");
      if (bias_tensor.scalar_type() != weight_tensor.scalar_type())
        throw value_error("bitnet::libtorch::BitLinear: bias has dtype " + detail::dtype_name(bias_tensor) +
                          ", the weight " + detail::dtype_name(weight_tensor));
      if (bias_tensor.dim() != 1 || bias_tensor.size(0) != out_features_)
        throw shape_error("bitnet::libtorch::BitLinear: bias has shape " + shape_of(bias_tensor) + ", expected [" +
                          std::to_string(out_features_) + "]");
    }
    const bool weight_grad = weight_tensor.requires_grad();
    weight = register_parameter("weight", std::move(weight_tensor), weight_grad);
    const bool bias_grad = with_bias_ && bias_tensor.requires_grad();
    bias = register_parameter("bias", std::move(bias_tensor), bias_grad);
  }

  /// Re-creates the parameters (Cloneable's protocol), initialized as torch::nn::Linear does. A
  /// packed-only layer keeps its packed weights and registers "weight" undefined again.
  void reset() override {
    if (fixed_) {
      weight = register_parameter("weight", ::torch::Tensor(), false);
      bias = register_parameter("bias",
                                with_bias_ ? ::torch::empty({out_features_}, ::torch::dtype(fixed_dtype()))
                                           : ::torch::Tensor(),
                                false);
      return;
    }
    weight = register_parameter("weight", ::torch::empty({out_features_, in_features_}));
    bias = register_parameter("bias", with_bias_ ? ::torch::empty({out_features_}) : ::torch::Tensor(), with_bias_);
    ::torch::NoGradGuard no_grad;
    ::torch::nn::init::kaiming_uniform_(weight, std::sqrt(5.0));
    if (with_bias_) {
      const double bound = 1.0 / std::sqrt(double(in_features_));
      ::torch::nn::init::uniform_(bias, -bound, bound);
    }
  }

  /// x: [..., in_features] -> [..., out_features]; see the top of this header for which path runs.
  /// Throws value_error for an input that is not float32 / float64 on the CPU, has another dtype than
  /// the weight, or (on the kernel path) is not finite; shape_error for a wrong feature count.
  ::torch::Tensor forward(const ::torch::Tensor& x) {
    if (fixed_ && (is_training() || ::torch::GradMode::is_enabled()))
      throw state_error("bitnet::libtorch::BitLinear::forward: the layer " + fixed_origin_ +
                        " holds only packed ternary weights (no latent weight to train or to differentiate): run "
                        "it in eval mode under torch::NoGradGuard or torch::InferenceMode, or load the online form "
                        "(latent weights) to fine-tune");
    if (!fixed_) detail::require_cpu_real(weight, "bitnet::libtorch::BitLinear: weight");
    detail::require_cpu_real(x, "bitnet::libtorch::BitLinear::forward: input");
    const ::torch::ScalarType type = dtype();
    if (fixed_ && bias.defined() && bias.scalar_type() != type)
      throw value_error("bitnet::libtorch::BitLinear::forward: the packed-only layer " + fixed_origin_ +
                        " computes in " + std::string(c10::toString(type)) + ", but its bias is " +
                        detail::dtype_name(bias) + " (a packed layer cannot change dtype)");
    if (x.scalar_type() != type)
      throw value_error("bitnet::libtorch::BitLinear::forward: input has dtype " + detail::dtype_name(x) +
                        ", the layer computes in " + std::string(c10::toString(type)));
    if (x.dim() < 1 || x.size(-1) != in_features_)
      throw shape_error("bitnet::libtorch::BitLinear::forward: input has shape " + shape_of(x) +
                        ", the layer expects [..., " + std::to_string(in_features_) + "]");
    if (!is_training() && !::torch::GradMode::is_enabled())
      return type == ::torch::kFloat ? kernel_forward<float>(x) : kernel_forward<double>(x);
    // A forward that records gradients is a training step coming: whatever the optimizer writes, and
    // however (libtorch's SGD bypasses the version counter), the next eval forward packs again.
    if (::torch::GradMode::is_enabled()) invalidate_packed();
    return straight_through_forward(x, is_training() ? lambda_ : 1.0);
  }

  /// The warm-up strength of training forwards, in [0, 1]: 0 is the float layer, 1 (the default) the
  /// ternary one; e.g. bitnet::quantization_warmup(step). Throws value_error outside [0, 1].
  void set_lambda(double lambda) {
    if (!(lambda >= 0 && lambda <= 1))
      throw value_error("bitnet::libtorch::BitLinear::set_lambda: lambda must be in [0, 1], got " +
                        std::to_string(lambda));
    lambda_ = lambda;
  }
  double lambda() const noexcept { return lambda_; }

  const bitlinear_options& options() const noexcept { return options_; }
  /// The dtype the layer computes in: the weight's, or a packed-only layer's packed one.
  ::torch::ScalarType dtype() const { return fixed_ ? fixed_dtype() : weight.scalar_type(); }
  /// Whether the layer holds only packed ternary weights: loaded from a packed checkpoint by
  /// bitnet::libtorch::load_state_dict (bitnet/torch_state_dict.hpp), with no dense weight on the
  /// way. Then "weight" is registered but undefined, so named_parameters() lists only "bias" (as
  /// torch::nn::Linear(bias=false) leaves out "bias"); the codes and scale live in the packed layer
  /// (packed<T>()). Eval forwards under no_grad run the kernels; training forwards, forwards that
  /// record gradients, torch::save and torch::load are a state_error naming the layer; loading the
  /// online form (latent weights) makes it a trainable layer again.
  bool packed_only() const noexcept { return fixed_ != nullptr; }
  std::int64_t in_features() const noexcept { return in_features_; }
  std::int64_t out_features() const noexcept { return out_features_; }
  /// Marks the packed weights stale: the next eval forward re-packs. Needed only after writes the
  /// version counter cannot see (through tensor.data() or a raw pointer) with no training forward
  /// since; a training forward does it (libtorch's C++ SGD, for one, writes through p.data()).
  void invalidate_packed() {
    std::lock_guard lock(cache_.mutex);
    cache_.layer.reset();  // a packed-only layer starts again from its packed weights
  }

  /// How many times the packed weights were built (tests and diagnostics: re-packing happens only
  /// when the weight or bias changed).
  std::int64_t pack_count() const noexcept { return cache_.packs; }

  void pretty_print(std::ostream& stream) const override {
    stream << "bitnet::libtorch::BitLinear(in_features=" << in_features_ << ", out_features=" << out_features_
           << ", bias=" << (with_bias_ ? "true" : "false") << ", rms_norm=" << (options_.rms_norm ? "true" : "false")
           << (fixed_ ? ", packed_only=true" : "") << ")";
  }

  /// torch::save of a packed-only layer is a state_error (its weights are no tensor torch::save
  /// knows); save the tree with bitnet::libtorch::save_state_dict instead.
  void save(::torch::serialize::OutputArchive& archive) const override {
    if (fixed_)
      throw state_error("bitnet::libtorch::BitLinear: torch::save cannot store the packed-only layer " +
                        fixed_origin_ + " (no latent weight): use bitnet::libtorch::save_state_dict with "
                        "bit_linear_storage::hf_packed");
    ::torch::nn::Module::save(archive);
  }
  /// torch::load into a packed-only layer is a state_error (it would load the bias and keep the old
  /// packed weights); bitnet::libtorch::load_state_dict loads either form.
  void load(::torch::serialize::InputArchive& archive) override {
    if (fixed_)
      throw state_error("bitnet::libtorch::BitLinear: torch::load cannot load into the packed-only layer " +
                        fixed_origin_ + ": use bitnet::libtorch::load_state_dict");
    ::torch::nn::Module::load(archive);
  }

  /// Hands an already packed layer, built from exactly these parameters, to the cache (replace_linear
  /// builds one to verify the transfer; this saves packing it again at the first eval forward).
  template <real_scalar T>
  void adopt_packed(bitnet::BitLinear<T>&& packed) {
    std::lock_guard lock(cache_.mutex);
    packed.release_latent_weights();
    cache_.layer = std::make_shared<const packed_variant>(std::in_place_type<bitnet::BitLinear<T>>, std::move(packed));
    cache_.weight = detail::tensor_stamp::of(weight);
    cache_.bias = detail::tensor_stamp::of(bias);
    ++cache_.packs;
  }

  /// The packed bitnet::BitLinear<T> the eval path computes with, built now if the parameters changed
  /// since the last one. Throws value_error when T is not the weight's dtype or a weight is not finite.
  template <real_scalar T>
  std::shared_ptr<const bitnet::BitLinear<T>> packed() {
    auto layer = packed_layer(std::is_same_v<T, float> ? ::torch::kFloat : ::torch::kDouble);
    return std::shared_ptr<const bitnet::BitLinear<T>>(layer, &std::get<bitnet::BitLinear<T>>(*layer));
  }

  ::torch::Tensor weight;
  ::torch::Tensor bias;  // undefined without bias (registered as such, like torch::nn::Linear)

 private:
  using packed_variant = std::variant<bitnet::BitLinear<float>, bitnet::BitLinear<double>>;

  // The packed layer and what it was built from. Copies (Cloneable::clone) start empty: a clone
  // gets new parameter tensors anyway.
  struct packed_cache {
    packed_cache() = default;
    packed_cache(const packed_cache&) noexcept {}
    packed_cache& operator=(const packed_cache&) noexcept {
      layer.reset();
      return *this;
    }
    std::mutex mutex;
    std::shared_ptr<const packed_variant> layer;
    detail::tensor_stamp weight, bias;
    std::int64_t packs = 0;
  };

  static bitlinear_options validated(bitlinear_options options) {
    if (!(options.rms_eps > 0) || !std::isfinite(options.rms_eps))
      throw value_error("bitnet::libtorch::BitLinear: rms_eps must be finite and > 0, got " +
                        std::to_string(options.rms_eps));
    // The module's autograd forward is the per-tensor b1.58 layer; unit scales are bitnet::BitLinear's.
    if (options.weight_scales != weight_scaling::per_tensor || options.group_size != 0 ||
        options.activation_scales != activation_scaling::per_token)
      throw value_error("bitnet::libtorch::BitLinear: only per_tensor weight scales and per_token activation scales "
                        "are supported (per_row / per_group layers are bitnet::BitLinear's)");
    if (options.rotation)
      throw value_error("bitnet::libtorch::BitLinear: no input rotation (rotated layers are bitnet::BitLinear's)");
    if (options.scale_update != weight_scale_update::absmean)
      throw value_error("bitnet::libtorch::BitLinear: only absmean scales (its autograd forward derives the scale from "
                        "the weight on every step; frozen scales are bitnet::BitLinear's)");
    return options;
  }

  static void check_features(std::int64_t in, std::int64_t out) {
    if (in < 1 || out < 1)
      throw shape_error("bitnet::libtorch::BitLinear: in_features and out_features must be >= 1, got " +
                        std::to_string(in) + " and " + std::to_string(out));
    if (in > max_in_features)
      throw shape_error("bitnet::libtorch::BitLinear: in_features " + std::to_string(in) +
                        " exceeds the exact-accumulation limit max_in_features = " + std::to_string(max_in_features));
  }

  static std::string shape_of(const ::torch::Tensor& t) {
    std::string s = "[";
    for (std::int64_t d = 0; d < t.dim(); ++d) s += (d ? ", " : "") + std::to_string(t.size(d));
    return s + "]";
  }

  ::torch::ScalarType fixed_dtype() const {
    return std::holds_alternative<bitnet::BitLinear<float>>(*fixed_) ? ::torch::kFloat : ::torch::kDouble;
  }

  std::shared_ptr<const packed_variant> packed_layer(::torch::ScalarType dtype) {
    if (this->dtype() != dtype)
      throw value_error("bitnet::libtorch::BitLinear::packed: the layer computes in " +
                        std::string(c10::toString(this->dtype())) + ", not in the dtype asked for");
    std::lock_guard lock(cache_.mutex);
    if (fixed_) {  // the packed weights never change; only the bias may
      if (!cache_.layer) {
        cache_.layer = fixed_;
        rebias(dtype);
        ++cache_.packs;
      } else if (!cache_.bias.matches(bias)) {
        rebias(dtype);
      }
      return cache_.layer;
    }
    const bool same_type = cache_.layer && (dtype == ::torch::kFloat) ==
                                               std::holds_alternative<bitnet::BitLinear<float>>(*cache_.layer);
    if (same_type && cache_.weight.matches(weight)) {
      if (!cache_.bias.matches(bias)) rebias(dtype);  // only the bias changed: nothing to re-pack
      return cache_.layer;
    }
    cache_.layer = dtype == ::torch::kFloat ? build<float>() : build<double>();
    cache_.weight = detail::tensor_stamp::of(weight);
    cache_.bias = detail::tensor_stamp::of(bias);
    ++cache_.packs;
    return cache_.layer;
  }

  template <real_scalar T>
  static std::optional<Vector<T>> bias_vector(const ::torch::Tensor& b) {
    if (!b.defined()) return std::nullopt;
    const ::torch::Tensor c = b.detach().contiguous();
    return Vector<T>(Eigen::Map<const Vector<T>>(c.data_ptr<T>(), c.size(0)));
  }

  template <real_scalar T>
  std::shared_ptr<const packed_variant> build() const {
    const ::torch::Tensor w = weight.detach().contiguous();
    Matrix<T> latent = Eigen::Map<const Matrix<T>>(w.data_ptr<T>(), out_features_, in_features_);
    bitnet::BitLinear<T> layer(std::move(latent), bias_vector<T>(bias), options_);
    layer.release_latent_weights();  // the parameter tensor is the latent weight: no second copy
    return std::make_shared<const packed_variant>(std::in_place_type<bitnet::BitLinear<T>>, std::move(layer));
  }

  void rebias(::torch::ScalarType dtype) {
    auto updated = std::make_shared<packed_variant>(*cache_.layer);
    if (dtype == ::torch::kFloat)
      std::get<bitnet::BitLinear<float>>(*updated).set_bias(bias_vector<float>(bias));
    else
      std::get<bitnet::BitLinear<double>>(*updated).set_bias(bias_vector<double>(bias));
    cache_.layer = std::move(updated);
    cache_.bias = detail::tensor_stamp::of(bias);
  }

  template <real_scalar T>
  ::torch::Tensor kernel_forward(const ::torch::Tensor& x) {
    const auto layer = packed<T>();
    const ::torch::Tensor input = x.contiguous();
    const std::int64_t batch = in_features_ == 0 ? 0 : input.numel() / in_features_;
    std::vector<std::int64_t> sizes(x.sizes().begin(), x.sizes().end());
    sizes.back() = out_features_;
    const auto options = ::torch::TensorOptions().dtype(x.scalar_type());
    if (batch == 0) return ::torch::empty(sizes, options);
    const Eigen::Map<const Matrix<T>> rows(input.data_ptr<T>(), batch, in_features_);
    // The result matrix becomes the tensor's memory (no copy); the tensor frees it.
    auto result = std::make_unique<Matrix<T>>(layer->forward(rows));
    Matrix<T>* owned = result.get();
    ::torch::Tensor y = ::torch::from_blob(owned->data(), sizes, [owned](void*) { delete owned; }, options);
    result.release();
    return y;
  }

  // PyTorch's BitLinear, op for op (its order of operations, so autograd matches Python's).
  ::torch::Tensor straight_through_forward(const ::torch::Tensor& x, double lambda) const {
    const ::torch::Tensor n =
        options_.rms_norm ? x * ::torch::rsqrt(x.pow(2).mean(-1, true) + double(options_.rms_eps)) : x;
    const ::torch::Tensor x_scale = n.detach().abs().amax(-1, true).clamp_min(1e-5).reciprocal() * 127.0;
    const ::torch::Tensor x_quant = (n.detach() * x_scale).round().clamp(-128, 127) / x_scale;
    const ::torch::Tensor w_scale = weight.detach().abs().mean().clamp_min(1e-5).reciprocal() * 1.0;
    const ::torch::Tensor w_quant = (weight.detach() * w_scale).round().clamp(-1, 1) / w_scale;
    const ::torch::Tensor x_mixed = n + (x_quant - n).detach() * lambda;
    const ::torch::Tensor w_mixed = weight + (w_quant - weight).detach() * lambda;
    return ::torch::nn::functional::linear(x_mixed, w_mixed, bias);
  }

  std::int64_t in_features_ = 0;
  std::int64_t out_features_ = 0;
  bool with_bias_ = true;
  bitlinear_options options_;
  double lambda_ = 1.0;
  packed_cache cache_;
  // A packed-only layer's packed weights, shared by its clones (never modified), and where they
  // came from (the layer's path and file, for messages).
  std::shared_ptr<const packed_variant> fixed_;
  std::string fixed_origin_;

  friend struct detail::module_state_access;
};

/// The module holder: bitnet::libtorch::BitLinear layer(in, out) or BitLinear(weight, bias, options).
TORCH_MODULE(BitLinear);

/// replace_linear's report: the graph version's, plus notes on what the caller must do next.
struct module_replace_report : replace_report {
  /// e.g. that an optimizer built before the swap holds the old parameters.
  std::vector<std::string> notes;

  std::string to_string() const {
    std::string text = replace_report::to_string();
    for (const std::string& note : notes) text += "note: " + note + "\n";
    return text;
  }
};

inline std::ostream& operator<<(std::ostream& out, const module_replace_report& report) {
  return out << report.to_string();
}

namespace detail {

using bitnet::detail::transfer_failure;

enum class container { none, sequential, module_list, module_dict };

/// One parent that holds a Linear: the registry names it is registered under and the positions in
/// the container's own storage (Sequential, ModuleList) or keys (ModuleDict).
struct holder {
  std::shared_ptr<::torch::nn::Module> parent;
  container kind = container::none;
  std::vector<std::string> names;
  std::vector<std::size_t> positions;
  std::vector<::torch::nn::AnyModule> staged_entries;  // Sequential: the new entries, built before commit
};

struct planned_linear {
  std::string path;  // the first path named_modules() gives it
  std::shared_ptr<::torch::nn::LinearImpl> source;
  std::vector<holder> holders;
  std::shared_ptr<BitLinearImpl> replacement;
};

inline container kind_of(const ::torch::nn::Module& m) {
  if (dynamic_cast<const ::torch::nn::SequentialImpl*>(&m)) return container::sequential;
  if (dynamic_cast<const ::torch::nn::ModuleListImpl*>(&m)) return container::module_list;
  if (dynamic_cast<const ::torch::nn::ModuleDictImpl*>(&m)) return container::module_dict;
  return container::none;
}

/// References to a Linear that its holders account for: one per registry name, one per container entry.
inline long expected_references(const planned_linear& p) {
  long count = 1;  // planned_linear::source
  for (const holder& h : p.holders) count += long(h.names.size() + h.positions.size());
  return count;
}

/// The walk: every module once (by address, as named_modules() deduplicates), every Linear with
/// every parent slot that holds it.
class planner {
 public:
  planner(const replace_options& options, module_replace_report& report) : options_(options), report_(report) {}

  std::vector<planned_linear>& layers() noexcept { return layers_; }

  void walk(const std::shared_ptr<::torch::nn::Module>& root) {
    if (dynamic_cast<const ::torch::nn::LinearImpl*>(root.get()))
      throw transfer_failure("", "the root module is a torch::nn::Linear: replace_linear replaces the children of "
                                 "a module (wrap the layer in a torch::nn::Sequential)");
    visited_.insert(root.get());
    visit(root, "");
  }

 private:
  void visit(const std::shared_ptr<::torch::nn::Module>& parent, const std::string& prefix) {
    const container kind = kind_of(*parent);
    for (const auto& item : parent->named_children()) {
      const std::string path = prefix.empty() ? item.key() : prefix + "." + item.key();
      const std::shared_ptr<::torch::nn::Module>& child = item.value();
      if (auto linear = std::dynamic_pointer_cast<::torch::nn::LinearImpl>(child)) {
        add_slot(parent, kind, item.key(), path, std::move(linear));
      } else if (visited_.insert(child.get()).second) {
        visit(child, path);
      }
    }
  }

  void add_slot(const std::shared_ptr<::torch::nn::Module>& parent, container kind, const std::string& name,
                const std::string& path, std::shared_ptr<::torch::nn::LinearImpl> linear) {
    const auto [found, first] = decisions_.try_emplace(linear.get(), -1);
    if (first) {
      if (kept(path, *linear)) return;
      found->second = long(layers_.size());
      layers_.push_back({path, linear, {}, nullptr});
    }
    if (found->second < 0) return;  // kept under its first path
    planned_linear& p = layers_[std::size_t(found->second)];
    holder* h = nullptr;
    for (holder& existing : p.holders)
      if (existing.parent == parent) h = &existing;
    if (!h) {
      h = &p.holders.emplace_back();
      h->parent = parent;
      h->kind = kind;
      h->positions = positions_in(*parent, kind, static_cast<const ::torch::nn::Module*>(linear.get()));
    }
    h->names.push_back(name);
  }

  // `linear` as a Module*: Module is a virtual base, so a LinearImpl* and its Module* differ as addresses.
  static std::vector<std::size_t> positions_in(::torch::nn::Module& parent, container kind,
                                               const ::torch::nn::Module* linear) {
    std::vector<std::size_t> positions;
    std::size_t i = 0;
    switch (kind) {
      case container::sequential:
        for (const auto& entry : dynamic_cast<::torch::nn::SequentialImpl&>(parent)) {
          if (entry.ptr().get() == linear) positions.push_back(i);
          ++i;
        }
        break;
      case container::module_list:
        for (const auto& entry : dynamic_cast<::torch::nn::ModuleListImpl&>(parent)) {
          if (entry.get() == linear) positions.push_back(i);
          ++i;
        }
        break;
      case container::module_dict:
        for (const auto& entry : dynamic_cast<::torch::nn::ModuleDictImpl&>(parent)) {
          if (entry.value().get() == linear) positions.push_back(i);
          ++i;
        }
        break;
      case container::none:
        break;
    }
    return positions;
  }

  bool kept(const std::string& path, const ::torch::nn::LinearImpl& linear) {
    for (const auto& rule : options_.exclude)
      if (rule.matches(path)) {
        report_.kept.push_back({path, "excluded by " + rule.describe()});
        return true;
      }
    if (options_.predicate) {
      const linear_info info{linear.weight.size(1), linear.weight.size(0), linear.bias.defined()};
      if (!options_.predicate(path, info)) {
        report_.kept.push_back({path, "rejected by the predicate"});
        return true;
      }
    }
    return false;
  }

  const replace_options& options_;
  module_replace_report& report_;
  std::vector<planned_linear> layers_;
  std::unordered_map<const void*, long> decisions_;  // Linear -> index in layers_, or -1 when kept
  std::unordered_set<const void*> visited_;
};

template <real_scalar T>
linear_view<T> view_of(const ::torch::Tensor& weight, const ::torch::Tensor& bias) {
  linear_view<T> view{Eigen::Map<const Matrix<T>>(weight.data_ptr<T>(), weight.size(0), weight.size(1)), std::nullopt};
  if (bias.defined()) view.bias.emplace(Eigen::Map<const Vector<T>>(bias.data_ptr<T>(), bias.size(0)));
  return view;
}

inline bool same_bits(const ::torch::Tensor& a, const ::torch::Tensor& b) {
  return a.sizes() == b.sizes() && a.scalar_type() == b.scalar_type() &&
         std::memcmp(a.data_ptr(), b.data_ptr(), std::size_t(a.numel()) * a.element_size()) == 0;
}

/// The torch-level checks of transfer::checked: parameters bit for bit, dtype, device and
/// requires_grad kept, and (for copies) storage not shared with the source.
inline void check_parameters(const std::string& path, const ::torch::nn::LinearImpl& source,
                             const BitLinearImpl& replacement, bool shares) {
  const auto check = [&](const ::torch::Tensor& from, const ::torch::Tensor& to, const char* name) {
    if (from.defined() != to.defined())
      throw transfer_failure(path, std::string("the new layer ") + (from.defined() ? "lost the " : "has a ") + name +
                                       (from.defined() ? "" : " the source lacks"));
    if (!from.defined()) return;
    if (to.scalar_type() != from.scalar_type() || to.device() != from.device())
      throw transfer_failure(path, std::string("the new layer's ") + name + " is " + dtype_name(to) + " on " +
                                       to.device().str() + ", the source's " + dtype_name(from) + " on " +
                                       from.device().str());
    if (to.requires_grad() != from.requires_grad())
      throw transfer_failure(path, std::string("the new layer's ") + name + " has requires_grad " +
                                       (to.requires_grad() ? "true" : "false") + ", the source's " +
                                       (from.requires_grad() ? "true" : "false"));
    if (!same_bits(from.contiguous(), to.contiguous()))
      throw transfer_failure(path, std::string("the new layer's ") + name + " differs from the source's");
    const bool same_storage = to.storage().unsafeGetStorageImpl() == from.storage().unsafeGetStorageImpl();
    if (same_storage != shares)
      throw transfer_failure(path, std::string("the new layer's ") + name +
                                       (shares ? " is not the source's tensor" : " shares the source's storage"));
  };
  check(source.weight, replacement.weight, "weight");
  check(source.bias, replacement.bias, "bias");
}

/// Builds and checks the new module of one Linear (the policy's prepare and verify); returns its report row.
template <class Policy, real_scalar T>
layer_report stage(planned_linear& p, Policy& policy, const bitlinear_options& options, bool share) {
  const ::torch::nn::LinearImpl& source = *p.source;
  const linear_view<T> view = view_of<T>(source.weight, source.bias);
  // The copy (or, for transfer::move, the very tensors) the new module registers.
  ::torch::Tensor weight, bias;
  {
    ::torch::NoGradGuard no_grad;
    if (share) {
      weight = source.weight;
      bias = source.bias;
    } else {
      weight = source.weight.detach().clone().set_requires_grad(source.weight.requires_grad());
      if (source.bias.defined()) bias = source.bias.detach().clone().set_requires_grad(source.bias.requires_grad());
    }
  }
  try {
    policy.prepare(layer_source<T>(p.path, view, options));
    p.replacement = std::make_shared<BitLinearImpl>(weight, bias, options);
    p.replacement->train(source.is_training());
    // The kernels' layer from the new module's parameters: what its eval forward computes with.
    const linear_view<T> new_view = view_of<T>(p.replacement->weight, p.replacement->bias);
    bitnet::BitLinear<T> packed(Matrix<T>(new_view.weight), new_view.bias ? std::optional<Vector<T>>(*new_view.bias)
                                                                            : std::nullopt,
                                options);
    policy.verify(layer_source<T>(p.path, view, options, share), packed);
    if constexpr (std::is_base_of_v<transfer::checked, Policy>) check_parameters(p.path, source, *p.replacement, share);
    layer_report row = describe_layer(p.path, packed);
    p.replacement->adopt_packed(std::move(packed));
    return row;
  } catch (const transfer_error&) {
    throw;
  } catch (const error& e) {
    throw transfer_failure(p.path, e.what());
  } catch (const c10::Error& e) {
    throw transfer_failure(p.path, e.what_without_backtrace());
  }
}

/// Puts the new module in every place that held the Linear. Nothing here allocates: the registry
/// keys exist, the Sequential entries were built in finish().
inline void commit(planned_linear& p) noexcept {
  for (holder& h : p.holders) {
    std::size_t staged = 0;
    switch (h.kind) {
      case container::sequential: {
        auto begin = dynamic_cast<::torch::nn::SequentialImpl&>(*h.parent).begin();
        for (std::size_t at : h.positions) std::swap(*(begin + std::ptrdiff_t(at)), h.staged_entries[staged++]);
        break;
      }
      case container::module_list: {
        auto begin = dynamic_cast<::torch::nn::ModuleListImpl&>(*h.parent).begin();
        for (std::size_t at : h.positions) *(begin + std::ptrdiff_t(at)) = p.replacement;
        break;
      }
      case container::module_dict: {
        auto begin = dynamic_cast<::torch::nn::ModuleDictImpl&>(*h.parent).begin();
        for (std::size_t at : h.positions) (begin + std::ptrdiff_t(at))->value() = p.replacement;
        break;
      }
      case container::none:
        break;
    }
    for (const std::string& name : h.names) h.parent->replace_module(name, p.replacement);
  }
}

}  // namespace detail

/// Checks a replacement made by hand (as transfer::checked checks its own): the new module's weight
/// and bias are bit-identical to the source's, with its dtype, device and requires_grad, and its
/// output (the packed kernels) on probe inputs equals the reference BitLinear of the source weights.
/// `path` names the layer in the error. Throws transfer_error; catches a swap that built a layer of the
/// right shape and never copied the weights. `shares` says whether the replacement should hold the
/// source's own tensors (transfer::move) or copies.
inline void verify_replacement(const std::string& path, const ::torch::nn::LinearImpl& source,
                               const BitLinearImpl& replacement, bool shares = false) {
  try {
    detail::check_parameters(path, source, replacement, shares);
    const auto verify = [&]<class T>(T) {
      const auto contiguous = [](const ::torch::Tensor& t) { return t.defined() ? t.contiguous() : t; };
      const ::torch::Tensor weight = contiguous(source.weight), bias = contiguous(source.bias);
      const ::torch::Tensor new_weight = contiguous(replacement.weight), new_bias = contiguous(replacement.bias);
      const linear_view<T> view = detail::view_of<T>(weight, bias);
      const linear_view<T> new_view = detail::view_of<T>(new_weight, new_bias);
      const bitnet::BitLinear<T> packed(Matrix<T>(new_view.weight),
                                        new_view.bias ? std::optional<Vector<T>>(*new_view.bias) : std::nullopt,
                                        replacement.options());
      transfer::checked{}.verify(layer_source<T>(path, view, replacement.options(), shares), packed);
    };
    detail::require_cpu_real(source.weight, "the source weight");
    if (source.weight.scalar_type() == ::torch::kFloat)
      verify(float{});
    else
      verify(double{});
  } catch (const transfer_error&) {
    throw;
  } catch (const error& e) {
    throw detail::transfer_failure(path, e.what());
  }
}

/// Replaces every torch::nn::Linear of the tree under `root` with a bitnet::libtorch::BitLinear
/// registered under the same name in every parent that holds it, so named_parameters() keys are
/// unchanged. Policies (bitnet::transfer): checked (the default: copies under NoGradGuard, then proves
/// every weight and bias bit for bit, dtype / device / requires_grad kept, storage not shared, and
/// each new layer's output on probe inputs against a reference BitLinear of the source), copy, move
/// (the new module registers the Linear's own parameter tensors: same storage, same gradients), or a
/// policy of the user's (docs/transfer-policies.md). A Linear shared by several parents becomes one
/// BitLinear in all of them. All or nothing: on any error (a non-finite weight, a throwing policy,
/// std::bad_alloc, a Linear in float16 or on a GPU, a Linear that something outside the tree's
/// registry and containers still holds, such as a typed member `torch::nn::Linear fc_` the parent's
/// forward would keep calling) every module stays in its slot, unchanged, and a transfer_error names
/// the path. Optimizers built before the call hold the old parameters (except with transfer::move);
/// the report's notes say so.
template <class Policy>
module_replace_report replace_linear(::torch::nn::Module& root, const replace_options& options, Policy& policy) {
  static_assert(transfer_policy<Policy, float> && transfer_policy<Policy, double>,
                "bitnet::libtorch::replace_linear: the policy is not a bitnet::transfer_policy for float and double: "
                "it needs `static constexpr bool takes_buffers`, `prepare(const layer_source<T>&)` and `verify(const "
                "layer_source<T>&, const BitLinear<T>&)`; derive from bitnet::transfer::checked to start; see "
                "docs/transfer-policies.md");
  module_replace_report report;
  report.dry_run = options.dry_run;
  // A non-owning handle: the root may live on the stack (no shared_from_this), and outlives the call.
  const std::shared_ptr<::torch::nn::Module> tree(std::shared_ptr<::torch::nn::Module>(), &root);
  detail::planner plan(options, report);
  plan.walk(tree);
  std::vector<detail::planned_linear>& layers = plan.layers();

  const bool share = Policy::takes_buffers && !options.dry_run;
  bool shared_modules = false;
  for (detail::planned_linear& p : layers) {
    const long extra = long(p.source.use_count()) - detail::expected_references(p);
    if (extra > 0)
      throw detail::transfer_failure(
          p.path, "this torch::nn::Linear is also held outside the module registry and the containers (" +
                      std::to_string(extra) +
                      " more reference(s): a typed member such as `torch::nn::Linear fc_`, an AnyModule, or a "
                      "handle the caller keeps); after the swap that holder would still see the old Linear. Reach "
                      "the layer through the registry or a Sequential / ModuleList / ModuleDict, drop the extra "
                      "handle, or exclude the layer");
    std::size_t places = 0;
    for (const detail::holder& h : p.holders) places += h.names.size();
    shared_modules = shared_modules || places > 1;
    const ::torch::Tensor& w = p.source->weight;
    if (!w.defined() || !w.device().is_cpu() || (w.scalar_type() != ::torch::kFloat && w.scalar_type() != ::torch::kDouble))
      throw detail::transfer_failure(p.path, "the weight is " +
                                                 (w.defined() ? detail::dtype_name(w) + " on " + w.device().str()
                                                              : std::string("undefined")) +
                                                 "; bitnet converts float32 / float64 CPU layers (exclude it, or "
                                                 ".to(torch::kCPU, torch::kFloat) first)");
    const auto contiguous_real = [&](const ::torch::Tensor& t) {
      return !t.defined() || (t.is_contiguous() && t.scalar_type() == w.scalar_type() && t.device().is_cpu());
    };
    if (!contiguous_real(w) || !contiguous_real(p.source->bias))
      throw detail::transfer_failure(p.path, "the weight and bias must be contiguous tensors of one dtype");
  }

  if (options.weights != ternary_import::quantize)
    throw value_error("bitnet::libtorch::replace_linear: ternary_import::exact needs unit scales, which the libtorch "
                      "BitLinear does not have; use bitnet::replace_linear on bitnet::BitLinear layers");
  if (options.layer_options_for)
    throw value_error("bitnet::libtorch::replace_linear: layer_options_for (per-layer options) is not supported by the "
                      "libtorch module, which takes one set of options (layer_options) without rotation or unit scales");
  for (detail::planned_linear& p : layers) {
    if (p.source->weight.scalar_type() == ::torch::kFloat)
      report.layers.push_back(detail::stage<Policy, float>(p, policy, options.layer_options, share));
    else
      report.layers.push_back(detail::stage<Policy, double>(p, policy, options.layer_options, share));
  }
  if (options.dry_run) return report;
  // The last step that can fail (it allocates): the Sequential entries. The tree is still untouched.
  for (detail::planned_linear& p : layers)
    for (detail::holder& h : p.holders)
      if (h.kind == detail::container::sequential)
        for (std::size_t i = 0; i < h.positions.size(); ++i) h.staged_entries.emplace_back(p.replacement);
  for (detail::planned_linear& p : layers) detail::commit(p);

  if (!layers.empty())
    report.notes.push_back(
        share ? "the new BitLinear modules hold the Linear layers' own parameter tensors: optimizers built before "
                "the swap keep updating them"
              : "the new BitLinear modules hold copies of the weights: rebuild any optimizer built before the swap "
                "(model->parameters())");
  if (shared_modules)
    report.notes.push_back(
        "some modules are shared and appear under several names in named_parameters(): build optimizers from "
        "parameters() deduplicated by tensor, or their steps apply twice");
  return report;
}

/// Policy chosen at compile time: replace_linear<bitnet::transfer::move>(*model).
template <class Policy = transfer::checked>
module_replace_report replace_linear(::torch::nn::Module& root, const replace_options& options = {}) {
  Policy policy{};
  return replace_linear(root, options, policy);
}

/// The same for a module holder: replace_linear(model) with model a torch::nn::Sequential etc.
template <class Policy = transfer::checked, class M>
module_replace_report replace_linear(::torch::nn::ModuleHolder<M>& root, const replace_options& options = {}) {
  return replace_linear<Policy>(*root, options);
}

}  // namespace bitnet::libtorch
