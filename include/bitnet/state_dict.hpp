// bitnet/state_dict.hpp - load and save the weights of the user's layer graph by dotted path, as
// PyTorch's load_state_dict / state_dict do, in safetensors files.
//
//   bitnet::load_state_dict(model, "model.safetensors", {.prefix = "model."});
//   bitnet::save_state_dict(model, "out.safetensors");
//
// The walk is the one replace_linear does (docs/customization.md): every linear-like layer and
// every BitLinear at path P owns the tensors P.weight (out x in) and, when the layer has a bias,
// P.bias. A BitLinear may also be stored in the Hugging Face packed form: P.weight (U8, packed as
// bitnet/hf.hpp says) plus P.weight_scale, in the scale convention the file or folder declares
// (never a default). Loading that form gives a BitLinear with exactly the file's codes and scale
// and no latent weights (hf::to_bit_linear): its weight() throws state_error, and saving it again
// needs bit_linear_storage::hf_packed. The whole model's state is covered: non-linear parameters
// (Eigen members, bitnet_parameters) are the tensors named by their path, and an empty
// std::optional<BitLinear<T>> slot is filled from the file with the file's shapes. The source may
// be one file or a Hugging Face model folder (hf::checkpoint, bitnet/hf_model.hpp).
//
// Loading is all or nothing: every tensor is read, converted and checked off to the side first;
// only then are they moved into the graph with operations that cannot fail. On any error -
// missing or unexpected keys (strict mode, all listed in one bitnet::io_error), a shape or dtype
// mismatch, a malformed file, a non-finite weight for a BitLinear, std::bad_alloc - the graph is
// bit-identical to before. This header needs nlohmann/json (CMake target bitnet::safetensors).
#pragma once

#include <algorithm>
#include <cstdint>
#include <filesystem>
#include <functional>
#include <map>
#include <memory>
#include <optional>
#include <set>
#include <string>
#include <string_view>
#include <type_traits>
#include <utility>
#include <variant>
#include <vector>

#include "bit_linear.hpp"
#include "detail/walker.hpp"
#include "errors.hpp"
#include "hf.hpp"
#include "hf_model.hpp"
#include "hf_safetensors.hpp"
#include "layer_traits.hpp"
#include "matrix.hpp"
#include "replace_options.hpp"
#include "safetensors.hpp"

namespace bitnet {

/// How save_state_dict stores a BitLinear.
enum class bit_linear_storage {
  latent,     // P.weight: the latent (master) weights, as weight() holds them
  hf_packed,  // P.weight U8 packed + P.weight_scale, the Hugging Face BitNet form (bitnet/hf.hpp)
};

struct state_dict_options {
  /// Put in front of every key: "model." maps the layer "layers.0.mlp" to "model.layers.0.mlp.weight".
  /// When loading, tensors whose names do not start with the prefix belong to another part of the
  /// checkpoint and are ignored.
  std::string prefix{};
  /// Loading: missing and unexpected keys are errors (all reported in one io_error). Shape and
  /// dtype mismatches are errors in either mode, as in PyTorch.
  bool strict = true;
  /// The meaning of P.weight_scale in the Hugging Face packed form. Loading: empty (the default)
  /// takes it from the file's declaration (its "__metadata__" quantization_config, or a model
  /// folder's config.json); a choice that contradicts the declaration is an io_error naming both,
  /// and packed layers that nothing declares need a choice. Saving (hf_packed): empty is
  /// hf::default_scale_convention; the file records the one used.
  std::optional<hf::scale_convention> scale_convention{};
  /// Saving: the form of BitLinear layers.
  bit_linear_storage bit_linear = bit_linear_storage::latent;
  /// Saving: the dtype of floating tensors (F32, F64, F16 or BF16); empty: the layer's own type,
  /// which keeps every bit. F16/BF16 round to nearest even; a value out of range is a value_error.
  std::optional<safetensors::dtype> dtype{};
  /// Saving: the "__metadata__" of the file.
  std::map<std::string, std::string> metadata{};
  /// Loading: the options of the BitLinear layers built in empty std::optional<BitLinear<T>> slots.
  bitlinear_options new_layers{};
  /// Loading floating (latent) weights into BitLinear layers: quantize them (the default), or import
  /// them exactly (ternary_import::exact: weights already ternary per unit, as Ternary Bonsai's
  /// unpacked folders; BitLinear::from_exact_ternary with the layer's options, or new_layers for an
  /// empty slot, which must be per_row or per_group). A layer that is not exactly ternary per unit
  /// is an io_error naming its key, row and group, and the graph is unchanged. Packed layers are
  /// exact either way.
  ternary_import weights = ternary_import::quantize;
};

/// What load_state_dict did. In strict mode `missing` and `unexpected` are always empty.
struct state_dict_report {
  std::vector<std::string> loaded;      // keys read into the graph
  std::vector<std::string> missing;     // keys the graph expects that the file lacks (kept as they were)
  std::vector<std::string> unexpected;  // keys under the prefix that no layer uses (ignored)
};

namespace detail {

/// The graph_walker visitor of load_state_dict and save_state_dict: every linear-like layer and
/// every BitLinear goes to handler.linear(path, layer) / handler.bit_linear(path, layer), wherever
/// it sits, including BitLinear nodes of polymorphic trees (bitnet_as_bit_linear).
template <class Handler>
class state_visitor {
 public:
  // A pointee that is neither a layer nor a graph holds no weights to load or save.
  static constexpr bool finds_bit_linear_nodes = true;
  static constexpr bool skips_opaque_pointees = true;
  static constexpr bool visits_parameters = true;

  template <class Node>
  static void unwalkable() {
    static_assert(always_false<Node>,
                  "bitnet::load_state_dict/save_state_dict cannot walk a type in this graph: give it "
                  "bitnet_children(node, visit) (or BITNET_LAYERS(Type, fields...)) if it has children, "
                  "bitnet_linear(layer) if it is a linear layer, or specialize bitnet::layer_traits; see "
                  "docs/customization.md");
  }

  explicit state_visitor(Handler& handler) : handler_(handler) {}

  template <class L, class Slot>
  void linear(const std::string& path, L& layer, const Slot&) {
    handler_.linear(path, layer);
  }
  template <class B, class Slot>
  void bit_linear(const std::string& path, B& layer, const Slot&) {
    handler_.bit_linear(path, layer);
  }
  template <real_scalar T>
  void optional_bit_linear(const std::string& path, std::optional<BitLinear<T>>& slot) {
    if (slot)
      handler_.bit_linear(path, *slot);
    else
      handler_.empty_bit_linear(path, slot);
  }
  template <class P>
  void parameter(const std::string& path, P& tensor) {
    handler_.parameter(path, tensor);
  }

 private:
  Handler& handler_;
};

template <class Handler, class Graph>
void walk_state(Graph& graph, Handler& handler) {
  state_visitor<Handler> visitor(handler);
  graph_walker<state_visitor<Handler>>(visitor).walk(graph);
}

inline std::string quote_key(std::string_view key) { return safetensors::detail::quote(key); }

inline std::string state_key(std::string_view prefix, std::string_view path, std::string_view tensor) {
  std::string key(prefix);
  if (!path.empty()) (key += path) += '.';
  return key += tensor;
}

/// The dotted module name of the layer at `path` ("model." + "layers.0.fc" = "model.layers.0.fc").
inline std::string layer_name(std::string_view prefix, std::string_view path) {
  std::string name(prefix);
  if (path.empty()) {
    if (name.ends_with('.')) name.pop_back();
    return name;
  }
  return name += path;
}

/// One layer's new state, staged off to the side; commit() moves it in without failing.
class staged_state {
 public:
  virtual ~staged_state() = default;
  virtual void commit() noexcept = 0;
};

/// A linear-like layer: the new values are copied into the storage its view refers to.
template <class View>
class staged_linear_state final : public staged_state {
  using S = typename View::scalar;
  static constexpr int Order = View::weight_ref::IsRowMajor ? Eigen::RowMajor : Eigen::ColMajor;

 public:
  using weight_map = Eigen::Map<Eigen::Matrix<S, Eigen::Dynamic, Eigen::Dynamic, Order>, 0, Eigen::OuterStride<>>;
  using bias_map = Eigen::Map<Vector<S>>;

  staged_linear_state(const View& view, std::optional<Matrix<S>> weight, std::optional<Vector<S>> bias)
      : weight_target_(const_cast<S*>(view.weight.data()), view.weight.rows(), view.weight.cols(),
                       Eigen::OuterStride<>(view.weight.outerStride())),
        bias_target_(view.bias ? const_cast<S*>(view.bias->data()) : nullptr, view.bias ? view.bias->size() : 0),
        weight_(std::move(weight)),
        bias_(std::move(bias)) {}

  void commit() noexcept override {
    if (weight_) weight_target_ = *weight_;  // same shape (checked): no allocation
    if (bias_) bias_target_ = *bias_;
  }

 private:
  weight_map weight_target_;
  bias_map bias_target_;
  std::optional<Matrix<S>> weight_;
  std::optional<Vector<S>> bias_;
};

template <real_scalar T>
class staged_bit_linear_state final : public staged_state {
 public:
  staged_bit_linear_state(BitLinear<T>& target, BitLinear<T> staged) : target_(&target), staged_(std::move(staged)) {}
  void commit() noexcept override { *target_ = std::move(staged_); }

 private:
  BitLinear<T>* target_;
  BitLinear<T> staged_;
};

/// An empty std::optional<BitLinear<T>> slot: the layer built from the file goes in.
template <real_scalar T>
class staged_new_bit_linear final : public staged_state {
 public:
  staged_new_bit_linear(std::optional<BitLinear<T>>& target, BitLinear<T> staged)
      : target_(&target), staged_(std::move(staged)) {}
  void commit() noexcept override { target_->emplace(std::move(staged_)); }  // BitLinear's move cannot throw

 private:
  std::optional<BitLinear<T>>* target_;
  BitLinear<T> staged_;
};

/// Where a parameter's new values go: a plain Eigen object by address (it lives in the graph); an
/// Eigen::Map by value, since a bitnet_parameters hook may pass a Map it built for the call, which
/// is gone when the hook returns (the copy views the same memory).
template <class P>
class parameter_target {
 public:
  explicit parameter_target(P& tensor) : held_(hold(tensor)) {}
  P& get() noexcept {
    if constexpr (plain_object) return *held_;
    else return held_;
  }

 private:
  static constexpr bool plain_object = std::is_same_v<P, typename P::PlainObject>;
  static auto hold(P& tensor) {
    if constexpr (plain_object) return &tensor;
    else return P(tensor);
  }
  std::conditional_t<plain_object, P*, P> held_;
};

/// A parameter tensor: a plain Eigen object takes the staged one by swap (an empty dynamic one
/// thereby takes the file's shape); a Map is assigned (same shape, checked: no allocation).
template <class P>
class staged_parameter final : public staged_state {
 public:
  using plain = typename P::PlainObject;
  staged_parameter(parameter_target<P> target, plain staged) : target_(std::move(target)), staged_(std::move(staged)) {}
  void commit() noexcept override {
    if constexpr (std::is_same_v<P, plain>)
      target_.get().swap(staged_);
    else
      target_.get() = staged_;
  }

 private:
  parameter_target<P> target_;
  plain staged_;
};

/// Plans and stages a load: first every key is checked against the file (no tensor read), then
/// every tensor is read and the new layer states are built. Nothing touches the graph.
class state_loader {
 public:
  state_loader(const hf::checkpoint& file, const state_dict_options& options) : file_(file), options_(options) {}

  template <class L>
  void linear(const std::string& path, L& layer) {
    auto view = layer_traits<L>::linear(layer);
    using view_type = decltype(view);
    using S = typename view_type::scalar;
    require_writable(path, view, layer_traits<L>::linear(layer));
    const Index out = view.weight.rows(), in = view.weight.cols();
    const std::string weight_key = key(path, "weight");
    const std::string bias_key = key(path, "bias");
    const bool load_weight = expect_floating(weight_key, {std::uint64_t(out), std::uint64_t(in)});
    const bool load_bias = view.bias && expect_floating(bias_key, {std::uint64_t(out)});
    if (file_.contains(key(path, "weight_scale")))
      packed_hint(path);
    if (!file_.folded_role(weight_key).empty())
      problems_.push_back(quote_key(weight_key) + ": " + file_.folded()->source + " declares it stored rotated (" +
                          std::string(file_.folded_role(weight_key)) + "), but the graph holds a plain linear layer "
                          "there, which cannot rotate its input (convert it with replace_linear first)");
    if (!load_weight && !load_bias) return;
    jobs_.push_back([this, view, weight_key, bias_key, load_weight, load_bias]() {
      std::optional<Matrix<S>> weight;
      std::optional<Vector<S>> bias;
      if (load_weight) weight = read([&] { return file_.read_matrix<S>(weight_key); }, weight_key);
      if (load_bias) bias = read([&] { return file_.read_vector<S>(bias_key); }, bias_key);
      staged_.push_back(std::make_unique<staged_linear_state<view_type>>(view, std::move(weight), std::move(bias)));
    });
  }

  template <real_scalar T>
  void bit_linear(const std::string& path, BitLinear<T>& layer) {
    const Index out = layer.out_features(), in = layer.in_features();
    const std::string weight_key = key(path, "weight");
    const std::string scale_key = key(path, "weight_scale");
    const std::string bias_key = key(path, "bias");
    const bool has_bias = layer.bias().has_value();

    if (file_.contains(scale_key)) {  // the Hugging Face packed form
      bool ok = packed_convention();
      ok = expect(weight_key, safetensors::dtype::U8, hf::packed_weight_shape(file_storage(), out, in), "packed ") && ok;
      ok = expect_packed_scale(scale_key, out, in) && ok;
      expect_signs(path);
      const bool load_bias = has_bias && expect_floating(bias_key, {std::uint64_t(out)});
      const std::string module = layer_name(options_.prefix, path);
      const Index declared = file_.declared_out_features(module);
      if (declared && declared != out) {
        problems_.push_back("size mismatch for " + quote_key(weight_key) + ": the file declares " +
                            std::to_string(declared) + " output features, the layer has " + std::to_string(out));
        ok = false;
      }
      if (const Index declared_in = base3_declared_in(module, hf::base3_packed_cols(in)); declared_in && declared_in != in) {
        problems_.push_back("size mismatch for " + quote_key(weight_key) + ": the file declares " +
                            std::to_string(declared_in) + " input features (bitnet_weight_storage \"base3\"), the "
                            "layer has " + std::to_string(in));
        ok = false;
      }
      if (!ok) return;
      jobs_.push_back([this, &layer, path, bias_key, load_bias]() {
        hf::packed_layer<T> packed = read_packed<T>(path, layer.out_features(), layer.in_features());
        if (load_bias) packed.bias = read([&] { return file_.read_vector<T>(bias_key); }, bias_key);
        BitLinear<T> staged = read(
            [&] {
              BitLinear<T> built = hf::to_bit_linear(packed, layer.options());
              if (!load_bias) built.set_bias(layer.bias());  // kept as it was (no bias, or missing)
              return built;
            },
            key(path, "weight"));
        staged_.push_back(std::make_unique<staged_bit_linear_state<T>>(layer, std::move(staged)));
      });
      return;
    }

    const bool load_weight = expect_floating(weight_key, {std::uint64_t(out), std::uint64_t(in)});
    const bool load_bias = has_bias && expect_floating(bias_key, {std::uint64_t(out)});
    if (!load_weight && !load_bias) return;
    std::optional<bitlinear_options> latent_options;
    if (load_weight && !(latent_options = options_for_latent(path, layer.options(), in))) return;
    jobs_.push_back([this, &layer, path, weight_key, bias_key, load_weight, load_bias, latent_options]() {
      std::optional<Vector<T>> bias =
          load_bias ? std::optional<Vector<T>>(read([&] { return file_.read_vector<T>(bias_key); }, bias_key))
                    : layer.bias();
      const auto build = [&]() -> BitLinear<T> {
        if (load_weight && layer.options().scale_update == weight_scale_update::frozen &&
            options_.weights == ternary_import::quantize)
          return frozen_latent<T>(path, layer, std::move(bias), *latent_options);
        if (load_weight) return build_latent<T>(path, std::move(bias), *latent_options);
        BitLinear<T> kept = layer;  // only the bias is loaded: the weights stay as they are, latent or not
        read([&] { kept.set_bias(std::move(bias)); }, bias_key);
        return kept;
      };
      staged_.push_back(std::make_unique<staged_bit_linear_state<T>>(layer, build()));
    });
  }

  /// A non-linear parameter at `path` is the tensor of that name (prefix + path). Same shape as the
  /// graph's, except that an empty resizable one takes the file's shape.
  template <class P>
  void parameter(const std::string& path, P& tensor) {
    using S = typename P::Scalar;
    const std::string name = layer_name(options_.prefix, path);
    constexpr bool vector = P::IsVectorAtCompileTime;
    constexpr bool resizable = std::is_same_v<P, typename P::PlainObject> &&
                               (P::RowsAtCompileTime == Eigen::Dynamic || P::ColsAtCompileTime == Eigen::Dynamic);
    std::vector<std::uint64_t> shape = vector ? std::vector<std::uint64_t>{std::uint64_t(tensor.size())}
                                              : std::vector<std::uint64_t>{std::uint64_t(tensor.rows()),
                                                                           std::uint64_t(tensor.cols())};
    if (resizable && tensor.size() == 0) {  // shape from the file, rank from the type
      const safetensors::tensor_info* t = file_.find(name);
      if (t && t->shape.size() == shape.size()) shape = t->shape;
    }
    if (!file_.folded_role(name).empty()) {
      used_.insert(name);
      problems_.push_back(quote_key(name) + ": " + file_.folded()->source + " declares it stored rotated (" +
                          std::string(file_.folded_role(name)) + "): a parameter is loaded as stored, so the graph "
                          "would compute with rotated values; bitnet refuses rather than load it silently wrong "
                          "(read it with hf::checkpoint and apply folded_rotation's inverse to the looked-up rows)");
      return;
    }
    if (!expect_floating(name, shape)) return;
    jobs_.push_back([this, target = parameter_target<P>(tensor), name, shape]() {
      typename P::PlainObject staged;
      if constexpr (vector) {
        const Vector<S> values = read([&] { return file_.read_vector<S>(name); }, name);
        staged.resize(values.size());
        std::copy(values.data(), values.data() + values.size(), staged.data());
      } else {
        staged = read([&] { return file_.read_matrix<S>(name); }, name);
      }
      staged_.push_back(std::make_unique<staged_parameter<P>>(target, std::move(staged)));
    });
  }

  /// An empty BitLinear slot is filled from the file, with the file's shapes: the packed form
  /// (out_features from the declaration, else the bias, else 4 x packed rows, transformers' rule),
  /// or latent weights.
  template <real_scalar T>
  void empty_bit_linear(const std::string& path, std::optional<BitLinear<T>>& slot) {
    const std::string weight_key = key(path, "weight"), scale_key = key(path, "weight_scale"),
                      bias_key = key(path, "bias");
    const safetensors::tensor_info* weight = file_.find(weight_key);
    const safetensors::tensor_info* bias = file_.find(bias_key);
    used_.insert(weight_key);
    if (!weight) {
      report_.missing.push_back(weight_key);
      return;
    }
    const bool packed = file_.contains(scale_key);
    if (weight->shape.size() != 2 || weight->shape[0] == 0 || weight->shape[1] == 0 ||
        (packed ? weight->type != safetensors::dtype::U8 : !safetensors::is_floating(weight->type))) {
      problems_.push_back("size mismatch for " + quote_key(weight_key) + ": the file has " +
                          std::string(safetensors::dtype_name(weight->type)) + " " +
                          safetensors::detail::shape_text(weight->shape) + ", an empty BitLinear slot needs " +
                          (packed ? "packed U8" : "floating") + " [out, in]");
      return;
    }
    Index out = Index(weight->shape[0]);
    Index in = Index(weight->shape[1]);
    const safetensors::tensor_info* scale = file_.find(scale_key);
    std::optional<bitlinear_options> latent_options;
    if (packed) {
      if (!packed_convention()) return;
      const Index declared = file_.declared_out_features(layer_name(options_.prefix, path));
      const Index rows = Index(weight->shape[0]);
      if (file_storage() == weight_storage::base3) {  // [out, ceil(in / 5)]: out exact, in declared when ragged
        in = base3_declared_in(layer_name(options_.prefix, path), in);
        if (declared && declared != out) {
          problems_.push_back("size mismatch for " + quote_key(weight_key) + ": the file declares " +
                              std::to_string(declared) + " output features, its base-3 weight has " +
                              std::to_string(out) + " rows");
          return;
        }
        if (hf::base3_packed_cols(in) != Index(weight->shape[1])) {
          problems_.push_back("size mismatch for " + quote_key(weight_key) + ": " + std::to_string(weight->shape[1]) +
                              " base-3 packed columns cannot hold the " + std::to_string(in) +
                              " input features the file declares (bitnet_in_features)");
          return;
        }
      } else {
        out = unit_declared() && scale->shape.size() == 2 ? Index(scale->shape[0])  // one row of scales per output
              : declared                                  ? declared
              : bias && bias->shape.size() == 1           ? Index(bias->shape[0])
                                                          : hf::values_per_byte * rows;
      }
      if (file_storage() == weight_storage::two_bit && hf::packed_rows(out) != rows) {
        problems_.push_back("size mismatch for " + quote_key(weight_key) + ": " + std::to_string(rows) +
                            " packed rows cannot hold " + std::to_string(out) + " output features (" +
                            (declared ? "declared by the file" : "the bias size") + ")");
        return;
      }
      if (!expect_packed_scale(scale_key, out, in)) return;
      expect_signs(path);
    } else if (!(latent_options = options_for_latent(path, options_.new_layers, in))) {
      return;
    }
    loaded_.push_back(weight_key);
    const bool load_bias = bias && expect_floating(bias_key, {std::uint64_t(out)});
    if (bias && !load_bias) return;
    jobs_.push_back([this, &slot, path, weight_key, bias_key, load_bias, packed, out, in, latent_options]() {
      std::optional<Vector<T>> b;
      if (load_bias) b = read([&] { return file_.read_vector<T>(bias_key); }, bias_key);
      BitLinear<T> built = [&] {
        if (!packed) return build_latent<T>(path, std::move(b), *latent_options);
        hf::packed_layer<T> layer = read_packed<T>(path, out, in);
        layer.bias = std::move(b);
        return read([&] { return hf::to_bit_linear(layer, options_.new_layers); }, weight_key);
      }();
      staged_.push_back(std::make_unique<staged_new_bit_linear<T>>(slot, std::move(built)));
    });
  }

  /// After the walk: the unexpected keys, then one io_error for every problem found so far.
  void check() {
    for (const safetensors::tensor_info* t : file_.tensors())
      if (t->name.starts_with(options_.prefix) && !used_.contains(t->name)) report_.unexpected.push_back(t->name);
    std::sort(report_.unexpected.begin(), report_.unexpected.end());
    std::vector<std::string> all;
    if (options_.strict) {
      for (const std::string& k : report_.missing) all.push_back("missing key " + quote_key(k));
      for (const std::string& k : report_.unexpected) all.push_back("unexpected key " + quote_key(k));
    }
    all.insert(all.end(), problems_.begin(), problems_.end());
    if (all.empty()) return;
    std::string text = "load_state_dict: " + file_.source_name() + ": " + std::to_string(all.size()) +
                       " error(s) in loading the state dict" +
                       (options_.prefix.empty() ? std::string() : " (prefix " + quote_key(options_.prefix) + ")") +
                       "; the graph is unchanged:";
    for (const std::string& line : all) text += "\n  " + line;
    throw io_error(text);
  }

  /// Reads every tensor and builds the staged states (may throw; the graph is untouched).
  void stage() {
    staged_.reserve(jobs_.size());
    for (auto& job : jobs_) job();
  }

  void commit() noexcept {
    for (auto& state : staged_) state->commit();
  }

  state_dict_report take_report() {
    for (const std::string& k : loaded_) report_.loaded.push_back(k);
    return std::move(report_);
  }

 private:
  std::string key(std::string_view path, std::string_view tensor) const {
    return state_key(options_.prefix, path, tensor);
  }
  static std::string describe(const std::string& path) {
    return path.empty() ? std::string("(the root)") : quote_key(path);
  }

  // The view must refer to the layer's own storage: a view that copies (storage whose layout the
  // view cannot describe) gives a new buffer on each call and cannot be written through.
  template <class View>
  void require_writable(const std::string& path, const View& first, const View& second) {
    const bool same_weight = first.weight.data() == second.weight.data();
    const bool same_bias = !first.bias || first.bias->data() == second.bias->data();
    if (!same_weight || !same_bias)
      problems_.push_back("layer " + describe(path) +
                          ": bitnet_linear returns a copy of its " + (same_weight ? "bias" : "weight") +
                          ", not a view of the layer's storage, so it cannot be loaded (return a linear_view with "
                          "the storage order of the layer, see docs/customization.md)");
  }

  // Records `key` as expected; false when it is missing or mismatched (the problem is recorded).
  bool expect(const std::string& key, std::optional<safetensors::dtype> type, const std::vector<std::uint64_t>& shape,
              std::string_view what = "") {
    used_.insert(key);
    const safetensors::tensor_info* t = file_.find(key);
    if (!t) {
      report_.missing.push_back(key);
      return false;
    }
    const bool type_ok = type ? t->type == *type : safetensors::is_floating(t->type);
    if (!type_ok || t->shape != shape) {
      problems_.push_back("size mismatch for " + quote_key(key) + ": the file has " +
                          std::string(safetensors::dtype_name(t->type)) + " " + safetensors::detail::shape_text(t->shape) +
                          ", the layer needs " + std::string(what) +
                          (type ? std::string(safetensors::dtype_name(*type)) : std::string("floating")) + " " +
                          safetensors::detail::shape_text(shape));
      return false;
    }
    loaded_.push_back(key);
    return true;
  }
  bool expect_floating(const std::string& key, const std::vector<std::uint64_t>& shape) {
    return expect(key, std::nullopt, shape);
  }
  bool expect_scale(const std::string& key) {
    used_.insert(key);
    const safetensors::tensor_info* t = file_.find(key);
    if (t->element_count() != 1 || !safetensors::is_floating(t->type)) {
      problems_.push_back("size mismatch for " + quote_key(key) + ": the file has " +
                          std::string(safetensors::dtype_name(t->type)) + " " + safetensors::detail::shape_text(t->shape) +
                          ", a weight_scale is one floating element");
      return false;
    }
    loaded_.push_back(key);
    return true;
  }
  bool unit_declared() const {
    return file_.quantization() && file_.quantization()->weight_scales != weight_scaling::per_tensor;
  }
  weight_storage file_storage() const {
    return file_.quantization() ? file_.quantization()->storage : weight_storage::two_bit;
  }
  // base3 files: the in_features of `module` whose weight has `packed_cols` columns (declared, or
  // 5 x packed_cols); 0 for two_bit files.
  Index base3_declared_in(const std::string& module, Index packed_cols) const {
    return file_storage() == weight_storage::base3 ? hf::base3_in_features(*file_.quantization(), module, packed_cols) : 0;
  }
  // The weight_scale of a packed layer: one element, or [out, groups] unit scales when the file
  // declares them (hf_safetensors.hpp); a 2-D scale tensor the file does not declare is refused.
  bool expect_packed_scale(const std::string& scale_key, Index out, Index in) {
    if (!unit_declared()) {
      const safetensors::tensor_info* t = file_.find(scale_key);
      if (t->shape.size() == 2 && t->element_count() != 1) {
        used_.insert(scale_key);
        problems_.push_back(quote_key(scale_key) + ": the file has " + safetensors::detail::shape_text(t->shape) +
                            " (one scale per row or group), but " + declaration_source() +
                            " declares no bitnet_weight_scales (one weight_scale per tensor)");
        return false;
      }
      return expect_scale(scale_key);
    }
    const hf::quantization_config& declared = *file_.quantization();
    const Index groups = bitnet::detail::unit_count(in, bitnet::detail::unit_columns(declared.weight_scales, declared.group_size, in));
    return expect_floating(scale_key, {std::uint64_t(out), std::uint64_t(groups)});
  }
  // A rotated packed layer's signs are its own tensor: accounted for here, checked when read.
  void expect_signs(const std::string& path) {
    const std::string signs_key = key(path, "rotation_signs");
    if (file_.contains(signs_key)) {
      used_.insert(signs_key);
      loaded_.push_back(signs_key);
    }
  }
  std::string declaration_source() const {
    return file_.quantization_source().empty() ? file_.source_name() : file_.quantization_source();
  }

  // The packed layer at `path` (out x in, shapes checked), as the declaration says it is stored:
  // its scale or unit scales, its rotation (P.rotation_signs when bitnet_rotation lists the layer).
  template <real_scalar T>
  hf::packed_layer<T> read_packed(const std::string& path, Index out, Index in) {
    const std::string weight_key = key(path, "weight"), scale_key = key(path, "weight_scale");
    hf::packed_layer<T> packed;
    packed.convention = *convention_;
    packed.out_features = out;
    packed.storage = file_storage();
    packed.in_features = in;
    packed.weight = read([&] { return file_.read_matrix<std::uint8_t>(weight_key); }, weight_key);
    if (unit_declared()) {
      const hf::quantization_config& declared = *file_.quantization();
      packed.weight_scales = declared.weight_scales;
      packed.group_size = declared.group_size;
      packed.activation_scales = declared.activation_scales;
      packed.unit_scales = read([&] { return file_.read_matrix<T>(scale_key); }, scale_key);
    } else {
      packed.weight_scale = read([&] { return file_.read_values<T>(scale_key); }, scale_key)[0];
    }
    const std::string module = layer_name(options_.prefix, path), signs_key = key(path, "rotation_signs");
    const std::optional<hf::quantization_config>& declared = file_.quantization();
    const bool listed = declared && declared->rotation &&
                        std::binary_search(declared->rotation->layers.begin(), declared->rotation->layers.end(), module);
    const bool has_signs = file_.contains(signs_key);
    if (listed != has_signs)
      throw io_error("load_state_dict: " + file_.source_name() + ": " + quote_key(signs_key) + ": " +
                     (listed ? declaration_source() + " declares layer " + quote_key(module) +
                                   " rotated (bitnet_rotation), but the file has no such tensor with its signs"
                             : "holds a rotation's signs, but " + declaration_source() + " declares no rotation for " +
                                   quote_key(module) + " (bitnet_rotation.layers): refusing to guess") +
                     "; the graph is unchanged");
    if (listed)
      packed.rotation = read(
          [&] {
            const safetensors::tensor_info& t = file_.info(signs_key);
            if (t.type != safetensors::dtype::I8 || t.shape != std::vector<std::uint64_t>{std::uint64_t(in)})
              throw value_error("the signs of a " + std::to_string(in) + "-input layer are I8 [" + std::to_string(in) +
                                "], the file has " + std::string(safetensors::dtype_name(t.type)) + " " +
                                safetensors::detail::shape_text(t.shape));
            return hadamard_rotation(declared->rotation->block_size, file_.read_values<std::int8_t>(signs_key));
          },
          signs_key);
    return packed;
  }

  // The options of a BitLinear built from the latent weights at `path`: `base`, with the rotation
  // a hadamard_packing.json declares for the weight. Empty when that declaration cannot be applied
  // (the problem is recorded).
  std::optional<bitlinear_options> options_for_latent(const std::string& path, bitlinear_options base, Index in) {
    const std::string weight_key = key(path, "weight");
    try {
      if (std::optional<hadamard_rotation> folded = file_.folded_rotation(weight_key, in)) base.rotation = std::move(folded);
    } catch (const io_error& e) {
      problems_.push_back(e.what());
      return std::nullopt;
    }
    return base;
  }

  // A BitLinear from the latent weights at `path`: quantized, or imported exactly (options_.weights).
  template <real_scalar T>
  BitLinear<T> build_latent(const std::string& path, std::optional<Vector<T>> bias, const bitlinear_options& options) {
    const std::string weight_key = key(path, "weight");
    Matrix<T> weight = read([&] { return file_.read_matrix<T>(weight_key); }, weight_key);
    return read(
        [&] {
          if (options_.weights == ternary_import::exact)
            return BitLinear<T>::from_exact_ternary(weight, std::move(bias), options,
                                                    "exact import of " + layer_name(options_.prefix, path));
          return BitLinear<T>(std::move(weight), std::move(bias), options);
        },
        weight_key);
  }

  // Latent weights into a slot whose scales are frozen (an exact import being fine-tuned): the
  // file holds no scales, and absmean would replace the imported ones, so the slot's layer keeps
  // its scales and rotation and takes the weights through set_weight (codes against those scales).
  template <real_scalar T>
  BitLinear<T> frozen_latent(const std::string& path, const BitLinear<T>& slot, std::optional<Vector<T>> bias,
                             const bitlinear_options& declared) {
    const std::string weight_key = key(path, "weight");
    Matrix<T> weight = read([&] { return file_.read_matrix<T>(weight_key); }, weight_key);
    BitLinear<T> layer = slot;
    read(
        [&] {
          if (declared.rotation != slot.options().rotation)
            throw value_error("the layer's scales are frozen and the checkpoint declares another rotation for this "
                              "weight than the layer has");
          layer.set_weight(std::move(weight));
        },
        weight_key);
    read([&] { layer.set_bias(std::move(bias)); }, key(path, "bias"));
    return layer;
  }

  // The scale convention of the packed layers, resolved at the first one (so files without packed
  // layers need no declaration); false when it cannot be (the problem is recorded once).
  bool packed_convention() {
    if (convention_) return true;
    if (convention_problem_) return false;
    try {
      convention_ = file_.convention(options_.scale_convention);
      return true;
    } catch (const io_error& e) {
      problems_.push_back(e.what());
      convention_problem_ = true;
      return false;
    }
  }

  void packed_hint(const std::string& path) {
    const std::string scale_key = key(path, "weight_scale");
    used_.insert(scale_key);
    problems_.push_back(quote_key(scale_key) + ": the file stores " + describe(path) +
                        " in the packed BitNet form, but the graph holds a plain linear layer there (convert it "
                        "with replace_linear first)");
  }

  // Runs a read or a build; a bitnet::error becomes an io_error naming the file and the key.
  template <class Read>
  auto read(Read&& run, const std::string& key) -> decltype(run()) {
    try {
      return run();
    } catch (const io_error&) {
      throw;
    } catch (const error& e) {
      throw io_error("load_state_dict: " + file_.source_name() + ": " + quote_key(key) + ": " + e.what() +
                     "; the graph is unchanged");
    }
  }

  const hf::checkpoint& file_;
  const state_dict_options& options_;
  std::optional<hf::scale_convention> convention_;
  bool convention_problem_ = false;
  std::set<std::string, std::less<>> used_;
  std::vector<std::string> loaded_;
  std::vector<std::string> problems_;
  state_dict_report report_;
  std::vector<std::function<void()>> jobs_;
  std::vector<std::unique_ptr<staged_state>> staged_;
};

}  // namespace detail

namespace detail {

/// A save in two walks over the graph: the first declares every tensor (the writer needs the whole
/// header first), the second writes each one straight from the layer, so nothing is copied.
class state_saver {
 public:
  explicit state_saver(const state_dict_options& options) : options_(options) {
    if (options.dtype && !safetensors::is_floating(*options.dtype))
      throw value_error("save_state_dict: dtype " + std::string(safetensors::dtype_name(*options.dtype)) +
                        " is not a floating dtype (use F32, F64, F16 or BF16)");
  }

  template <class L>
  void linear(const std::string& path, L& layer) {
    const auto view = layer_traits<L>::linear(layer);
    using S = typename decltype(view)::scalar;
    put<S>(key(path, "weight"), view.weight);
    if (view.bias) put<S>(key(path, "bias"), *view.bias);
  }

  template <real_scalar T>
  void bit_linear(const std::string& path, BitLinear<T>& layer) {
    if (options_.bit_linear == bit_linear_storage::latent) {
      if (!layer.has_latent_weights())  // checked in the first walk: nothing is written
        throw state_error("save_state_dict: the BitLinear at " +
                          (path.empty() ? std::string("(the root)") : quote_key(path)) +
                          " has no latent weights (released, or built from ternary weights, e.g. loaded from a "
                          "packed checkpoint), so it cannot be saved as bit_linear_storage::latent; save it as "
                          "bit_linear_storage::hf_packed");
      put<T>(key(path, "weight"), layer.weight());
      if (layer.bias()) put<T>(key(path, "bias"), *layer.bias());
      return;
    }
    const std::string weight_key = key(path, "weight"), scale_key = key(path, "weight_scale");
    const std::string signs_key = key(path, "rotation_signs");
    const bool units = layer.options().weight_scales != weight_scaling::per_tensor;
    if (!out_) {  // first walk: declare, and refuse before anything is written
      const std::string where = path.empty() ? std::string("(the root)") : quote_key(path);
      if (units && convention() != hf::scale_convention::autobitlinear)
        throw state_error("save_state_dict: the BitLinear at " + where + " has one scale per " +
                          bitnet::detail::scaling_name(layer.options().weight_scales).substr(4) +
                          ": its unit scales d are stored as magnitudes (scale_convention autobitlinear), and "
                          "bitlinear (1 / d) would not give them back exactly");
      hf::packed_layer<T> shape_only;  // what declare_layer reads: no weights packed twice
      shape_only.out_features = layer.out_features();
      shape_only.weight_scales = layer.options().weight_scales;
      shape_only.group_size = layer.options().group_size;
      shape_only.activation_scales = layer.options().activation_scales;
      shape_only.rotation = layer.options().rotation;
      shape_only.storage = layer.options().storage;
      shape_only.in_features = layer.in_features();
      try {
        hf::declare_layer(config_, layer_name(options_.prefix, path), shape_only, !packed_);
      } catch (const value_error& e) {
        throw state_error("save_state_dict: the BitLinear at " + where + " cannot share the file's declaration: " +
                          e.what() + " (save such layers to separate files)");
      }
      packed_ = true;
      specs_.push_back({weight_key, safetensors::dtype::U8,
                        hf::packed_weight_shape(layer.options().storage, layer.out_features(), layer.in_features())});
      specs_.push_back({scale_key, floating_type<T>(),
                        units ? std::vector<std::uint64_t>{std::uint64_t(layer.out_features()), std::uint64_t(layer.groups())}
                              : std::vector<std::uint64_t>{1}});
      if (layer.bias()) specs_.push_back({key(path, "bias"), floating_type<T>(), {std::uint64_t(layer.out_features())}});
      if (layer.options().rotation)
        specs_.push_back({signs_key, safetensors::dtype::I8, {std::uint64_t(layer.in_features())}});
      return;
    }
    const hf::packed_layer<T> packed = hf::to_packed(layer, convention());
    out_->write(weight_key, packed.weight);
    if (units) {
      out_->write(scale_key, packed.unit_scales);
    } else {
      const T scale[1] = {packed.weight_scale};
      out_->write_values<T>(scale_key, scale);
    }
    if (packed.bias) out_->write(key(path, "bias"), *packed.bias);
    if (packed.rotation) out_->write_values<std::int8_t>(signs_key, packed.rotation->signs());
  }

  template <class P>
  void parameter(const std::string& path, P& tensor) {
    put<typename P::Scalar>(layer_name(options_.prefix, path), tensor);
  }

  template <real_scalar T>
  void empty_bit_linear(const std::string& path, std::optional<BitLinear<T>>&) {
    throw state_error("save_state_dict: the BitLinear slot " + (path.empty() ? std::string("(the root)") : quote_key(path)) +
                      " holds no layer (an empty std::optional), so there is nothing to save for it");
  }

  template <class Graph>
  void save(Graph& graph, const std::filesystem::path& file) {
    walk_state(graph, *this);
    std::map<std::string, std::string> metadata = options_.metadata;
    if (packed_) {  // the convention travels with the data
      if (metadata.contains(std::string(hf::metadata_key)))
        throw value_error("save_state_dict: metadata key \"" + std::string(hf::metadata_key) +
                          "\" is written by save_state_dict for packed layers; set scale_convention instead");
      config_.linear_class = convention();
      metadata.insert(hf::metadata_entry(config_));
    }
    safetensors::writer out(file, std::move(specs_), std::move(metadata));
    out_ = &out;
    walk_state(graph, *this);
    out.finish();
  }

 private:
  std::string key(std::string_view path, std::string_view tensor) const {
    return state_key(options_.prefix, path, tensor);
  }

  template <real_scalar S>
  safetensors::dtype floating_type() const {
    return options_.dtype ? *options_.dtype : safetensors::dtype_of<S>();
  }

  template <real_scalar S, class Values>
  void put(const std::string& key, const Values& values) {
    if (out_)
      out_->write(key, values);
    else if (Values::IsVectorAtCompileTime)
      specs_.push_back({key, floating_type<S>(), {std::uint64_t(values.size())}});
    else
      specs_.push_back({key, floating_type<S>(), {std::uint64_t(values.rows()), std::uint64_t(values.cols())}});
  }

  hf::scale_convention convention() const { return options_.scale_convention.value_or(hf::default_scale_convention); }

  const state_dict_options& options_;
  std::vector<safetensors::tensor_spec> specs_;
  safetensors::writer* out_ = nullptr;
  bool packed_ = false;
  hf::quantization_config config_;
};

template <class Graph>
void check_state_graph() {
  static_assert(layer_graph<Graph>,
                "bitnet::load_state_dict/save_state_dict: the graph type is not a layer graph: give it "
                "bitnet_children(node, visit) (or BITNET_LAYERS(Type, fields...)), make it a std::vector / "
                "std::array / std::deque / string-keyed map of layers, or specialize bitnet::layer_traits; see "
                "docs/customization.md");
}

}  // namespace detail

/// Loads the weights and biases of every linear layer and BitLinear of `graph` from `file`, by
/// dotted path (see the top of this header). All or nothing: on any exception the graph is
/// bit-identical to before. Throws io_error listing every missing key, unexpected key and size
/// mismatch at once (missing/unexpected only when options.strict), and io_error naming the key for
/// a tensor that cannot be read or converted (a value out of range, a non-finite BitLinear weight,
/// an invalid packed code).
template <class Graph>
state_dict_report load_state_dict(Graph& graph, const hf::checkpoint& file, const state_dict_options& options = {}) {
  detail::check_state_graph<Graph>();
  detail::state_loader loader(file, options);
  detail::walk_state(graph, loader);
  loader.check();
  loader.stage();
  state_dict_report report = loader.take_report();  // built before the commit: nothing may fail after it
  loader.commit();
  return report;
}

/// Loads from one open file.
template <class Graph>
state_dict_report load_state_dict(Graph& graph, const safetensors::reader& file, const state_dict_options& options = {}) {
  return load_state_dict(graph, hf::checkpoint(file), options);
}

/// Opens and validates `path` - a .safetensors file or a Hugging Face model folder (single file or
/// shards with model.safetensors.index.json; config.json's quantization_config is read) - then
/// loads it as above.
template <class Graph>
state_dict_report load_state_dict(Graph& graph, const std::filesystem::path& path,
                                  const state_dict_options& options = {}) {
  return load_state_dict(graph, hf::checkpoint(path), options);
}

/// Writes the weight and bias of every linear layer and BitLinear of `graph` to `file` (replaced
/// whole or not at all, through safetensors::writer), by dotted path. Linear layers store their
/// weights as they are; BitLinear layers their latent weights, or with
/// options.bit_linear = bit_linear_storage::hf_packed the Hugging Face packed form. A BitLinear
/// without latent weights (released, or loaded from a packed checkpoint) can only be saved packed:
/// in latent mode it is a state_error naming its path, thrown before the file is touched.
template <class Graph>
void save_state_dict(const Graph& graph, const std::filesystem::path& file, const state_dict_options& options = {}) {
  detail::check_state_graph<Graph>();
  detail::state_saver saver(options);
  // The walk hands out non-const references (it is shared with load and replace_linear); saving
  // only reads through them.
  saver.save(const_cast<Graph&>(graph), file);
}

}  // namespace bitnet
