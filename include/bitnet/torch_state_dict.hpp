// bitnet/torch_state_dict.hpp - load and save a libtorch module tree (after
// bitnet::libtorch::replace_linear) in the Hugging Face forms bitnet writes: one safetensors file or
// a model folder (config.json + model.safetensors), packed or online. Part of bitnet::torch; needs
// nlohmann/json (bitnet::safetensors) as well.
//
//   bitnet::libtorch::save_pretrained(*model, "out", {.bit_linear = bitnet::bit_linear_storage::hf_packed});
//   bitnet::libtorch::load_state_dict(*model, "out");            // a folder or a .safetensors file
//
// The keys are the tree's state dict: every parameter and buffer under its named_parameters() /
// named_buffers() key, in its dtype. A BitLinear module at path P is stored
//   - online (bit_linear_storage::latent, the default): P.weight (latent, out x in) and P.bias, as
//     torch::save would; the files and config.json declare quantization_config "online" with the
//     autobitlinear convention, as convert_model's online mode does;
//   - packed (bit_linear_storage::hf_packed): P.weight U8 packed + P.weight_scale + P.bias in the
//     chosen scale convention, declared in every file's "__metadata__" and in config.json exactly as
//     save_state_dict (bitnet/state_dict.hpp) declares it; hf::to_packed does the packing.
// Loading is load_state_dict's discipline: conventions read from the declaration (never assumed),
// strict by default (missing and unexpected keys all listed in one io_error), shape and dtype
// mismatches named by key, and all or nothing: every tensor is read and converted off to the side,
// then copied in (copy_ under no_grad, so tensors shared with an optimizer or another module stay
// shared); on any error every tensor and module is as it was. A packed layer goes into its
// BitLinear module with no dense weight on the way (hf::to_bit_linear): the module becomes
// packed-only (BitLinearImpl::packed_only(): eval inference on the kernels, no training).
#pragma once

#include <nlohmann/json.hpp>

#include <algorithm>
#include <bit>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <functional>
#include <map>
#include <memory>
#include <optional>
#include <set>
#include <span>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

#include "errors.hpp"
#include "hf.hpp"
#include "hf_model.hpp"
#include "hf_safetensors.hpp"
#include "safetensors.hpp"
#include "state_dict.hpp"
#include "torch.hpp"

namespace bitnet::libtorch {

namespace detail {

static_assert(std::endian::native == std::endian::little,
              "bitnet/torch_state_dict.hpp copies tensor bytes as they are: safetensors files are little-endian");

/// What load_state_dict needs of BitLinearImpl's internals: committing a staged layer cannot fail.
struct module_state_access {
  template <real_scalar T>
  static std::shared_ptr<const BitLinearImpl::packed_variant> hold(bitnet::BitLinear<T>&& layer) {
    return std::make_shared<const BitLinearImpl::packed_variant>(std::in_place_type<bitnet::BitLinear<T>>,
                                                                 std::move(layer));
  }

  /// The module becomes packed-only with `packed` (whose bias is `staged_bias`, copied into the bias).
  static void make_packed(BitLinearImpl& m, std::shared_ptr<const BitLinearImpl::packed_variant> packed,
                          const ::torch::Tensor& staged_bias, std::string origin) noexcept {
    ::torch::NoGradGuard no_grad;
    if (staged_bias.defined()) m.bias.copy_(staged_bias);
    m.weight = ::torch::Tensor();
    m.parameters_["weight"] = m.weight;
    m.fixed_ = std::move(packed);
    m.fixed_origin_ = std::move(origin);
    std::lock_guard lock(m.cache_.mutex);
    m.cache_.layer = m.fixed_;
    m.cache_.weight = {};
    m.cache_.bias = libtorch::detail::tensor_stamp::of(m.bias);
    ++m.cache_.packs;
  }

  /// The module takes latent weights: copied in, or (a packed-only module) registered anew.
  static void make_latent(BitLinearImpl& m, const ::torch::Tensor& staged_weight, const ::torch::Tensor& staged_bias) noexcept {
    ::torch::NoGradGuard no_grad;
    if (staged_weight.defined()) {
      if (m.fixed_) {
        m.weight = staged_weight;
        m.weight.set_requires_grad(true);
        m.parameters_["weight"] = m.weight;
        m.fixed_.reset();
        m.fixed_origin_.clear();
        if (m.bias.defined()) m.bias.set_requires_grad(true);
      } else {
        m.weight.copy_(staged_weight);
      }
    }
    if (staged_bias.defined()) m.bias.copy_(staged_bias);
    m.invalidate_packed();
  }
};

inline std::optional<::torch::ScalarType> torch_type(safetensors::dtype type) {
  using st = safetensors::dtype;
  switch (type) {
    case st::BOOL: return ::torch::kBool;
    case st::U8: return ::torch::kUInt8;
    case st::I8: return ::torch::kInt8;
    case st::I16: return ::torch::kInt16;
    case st::F16: return ::torch::kHalf;
    case st::BF16: return ::torch::kBFloat16;
    case st::I32: return ::torch::kInt32;
    case st::F32: return ::torch::kFloat;
    case st::F64: return ::torch::kDouble;
    case st::I64: return ::torch::kLong;
    default: return std::nullopt;  // F8, U16, U32, U64: no libtorch 1.13 dtype
  }
}

inline std::optional<safetensors::dtype> file_type(::torch::ScalarType type) {
  using st = safetensors::dtype;
  switch (type) {
    case ::torch::kBool: return st::BOOL;
    case ::torch::kUInt8: return st::U8;
    case ::torch::kInt8: return st::I8;
    case ::torch::kInt16: return st::I16;
    case ::torch::kHalf: return st::F16;
    case ::torch::kBFloat16: return st::BF16;
    case ::torch::kInt32: return st::I32;
    case ::torch::kFloat: return st::F32;
    case ::torch::kDouble: return st::F64;
    case ::torch::kLong: return st::I64;
    default: return std::nullopt;
  }
}

inline std::vector<std::uint64_t> shape_of(const ::torch::Tensor& t) {
  return std::vector<std::uint64_t>(t.sizes().begin(), t.sizes().end());
}

/// The tree's state, in named_modules() order: BitLinear modules by path, every other registered
/// parameter and buffer by key. Walked with named_children(), so the root may live on the stack.
struct tree_state {
  std::vector<std::pair<std::string, BitLinearImpl*>> bit_linears;
  std::vector<std::pair<std::string, ::torch::Tensor>> tensors;
};

inline std::string join(const std::string& path, const std::string& name) {
  return path.empty() ? name : path + "." + name;
}

inline void collect(const ::torch::nn::Module& m, const std::string& path, tree_state& state) {
  if (auto* bit = dynamic_cast<BitLinearImpl*>(const_cast<::torch::nn::Module*>(&m))) {
    state.bit_linears.emplace_back(path, bit);
    return;
  }
  for (const auto& p : m.named_parameters(false)) state.tensors.emplace_back(join(path, p.key()), p.value());
  for (const auto& b : m.named_buffers(false)) state.tensors.emplace_back(join(path, b.key()), b.value());
  for (const auto& child : m.named_children()) collect(*child.value(), join(path, child.key()), state);
}

inline tree_state state_of(const ::torch::nn::Module& root) {
  tree_state state;
  collect(root, "", state);
  return state;
}

inline std::string quote_key(std::string_view key) { return safetensors::detail::quote(key); }

/// The bytes of a CPU tensor in `type` (a floating tensor converted when `type` differs).
inline ::torch::Tensor stored_tensor(const ::torch::Tensor& t, safetensors::dtype type) {
  const ::torch::ScalarType wanted = *torch_type(type);
  return t.detach().to(wanted).contiguous();
}

/// Plans a save: every key with its dtype and shape, and the packed layers built first (hf::to_packed),
/// so that nothing is written unless everything can be.
class tree_saver {
 public:
  tree_saver(const ::torch::nn::Module& root, const state_dict_options& options) : options_(options) {
    if (options.dtype && !safetensors::is_floating(*options.dtype))
      throw value_error("bitnet::libtorch::save_state_dict: dtype " +
                        std::string(safetensors::dtype_name(*options.dtype)) +
                        " is not a floating dtype (use F32, F64, F16 or BF16)");
    const tree_state state = state_of(root);
    for (const auto& [path, module] : state.bit_linears) plan_bit_linear(path, *module);
    for (const auto& [key, tensor] : state.tensors) plan_tensor(options_.prefix + key, tensor);
    if (!state.bit_linears.empty()) {
      const bool packed = options.bit_linear == bit_linear_storage::hf_packed;
      config_.emplace(config_of_layers_);
      config_->mode = packed ? hf::quantization_mode::offline : hf::quantization_mode::online;
      config_->linear_class =
          packed ? options.scale_convention.value_or(hf::default_scale_convention) : hf::scale_convention::autobitlinear;
    }
  }

  /// The quantization_config the files and config.json declare; empty for a tree without BitLinear.
  const std::optional<hf::quantization_config>& config() const noexcept { return config_; }

  void write(const std::filesystem::path& file) {
    std::map<std::string, std::string> metadata = options_.metadata;
    if (config_) {
      if (metadata.contains(std::string(hf::metadata_key)))
        throw value_error("bitnet::libtorch::save_state_dict: metadata key \"" + std::string(hf::metadata_key) +
                          "\" is written for BitLinear layers; set scale_convention / bit_linear instead");
      metadata.insert(hf::metadata_entry(*config_));
    }
    safetensors::writer out(file, specs_, std::move(metadata));
    for (const auto& job : writes_) job(out);
    out.finish();
  }

 private:
  safetensors::dtype floating_or(safetensors::dtype own) const {
    return options_.dtype ? *options_.dtype : own;
  }

  void plan_tensor(const std::string& key, const ::torch::Tensor& t) {
    if (!t.device().is_cpu())
      throw value_error("bitnet::libtorch::save_state_dict: " + quote_key(key) + " is on " + t.device().str() +
                        ": move the module to the CPU first");
    const std::optional<safetensors::dtype> own = file_type(t.scalar_type());
    if (!own)
      throw value_error("bitnet::libtorch::save_state_dict: " + quote_key(key) + " has dtype " +
                        libtorch::detail::dtype_name(t) + ", which safetensors cannot hold");
    const safetensors::dtype type = t.is_floating_point() ? floating_or(*own) : *own;
    specs_.push_back({key, type, shape_of(t)});
    writes_.push_back([key, t, type](safetensors::writer& out) {
      const ::torch::Tensor bytes = stored_tensor(t, type);
      out.write_bytes(key, std::span(static_cast<const std::byte*>(bytes.data_ptr()),
                                     std::size_t(bytes.numel()) * bytes.element_size()));
    });
  }

  void plan_bit_linear(const std::string& path, BitLinearImpl& m) {
    const std::string name = path.empty() ? std::string("(the root)") : quote_key(path);
    if (options_.bit_linear == bit_linear_storage::latent) {
      if (m.packed_only())  // nothing is written: the planning comes first
        throw state_error("bitnet::libtorch::save_state_dict: the BitLinear at " + name +
                          " is packed-only (loaded from a packed checkpoint): it has no latent weights to save as "
                          "bit_linear_storage::latent; save it as bit_linear_storage::hf_packed");
      plan_tensor(options_.prefix + join(path, "weight"), m.weight);
      if (m.bias.defined()) plan_tensor(options_.prefix + join(path, "bias"), m.bias);
      return;
    }
    if (m.dtype() == ::torch::kFloat)
      plan_packed<float>(path, m);
    else
      plan_packed<double>(path, m);
  }

  template <real_scalar T>
  void plan_packed(const std::string& path, BitLinearImpl& m) {
    const std::string module_name = bitnet::detail::layer_name(options_.prefix, path);
    const hf::scale_convention convention = options_.scale_convention.value_or(hf::default_scale_convention);
    auto packed = std::make_shared<hf::packed_layer<T>>([&] {
      try {
        // transformers' 2-bit layout, whatever the layer's in-memory storage (the shapes declared below).
        if (m.packed_only()) return hf::to_packed(*m.packed<T>(), convention, weight_storage::two_bit);
        // With the latent weights, as save_state_dict packs a graph BitLinear (autobitlinear stores mean|W|).
        const ::torch::Tensor w = m.weight.detach().contiguous();
        std::optional<Vector<T>> bias;
        if (m.bias.defined()) {
          const ::torch::Tensor b = m.bias.detach().contiguous();
          bias = Vector<T>(Eigen::Map<const Vector<T>>(b.data_ptr<T>(), b.size(0)));
        }
        const bitnet::BitLinear<T> layer(Matrix<T>(Eigen::Map<const Matrix<T>>(w.data_ptr<T>(), w.size(0), w.size(1))),
                                         std::move(bias), m.options());
        return hf::to_packed(layer, convention, weight_storage::two_bit);
      } catch (const error& e) {
        throw value_error("bitnet::libtorch::save_state_dict: the BitLinear at " +
                          (path.empty() ? std::string("(the root)") : quote_key(path)) + ": " + e.what() +
                          "; nothing was written");
      }
    }());
    const Index out = m.out_features(), in = m.in_features();
    if (out % hf::values_per_byte != 0) config_of_layers_.out_features[module_name] = out;  // the rows cannot tell it
    const std::string weight_key = options_.prefix + join(path, "weight");
    const std::string scale_key = options_.prefix + join(path, "weight_scale");
    const std::string bias_key = options_.prefix + join(path, "bias");
    const safetensors::dtype floating = floating_or(safetensors::dtype_of<T>());
    specs_.push_back({weight_key, safetensors::dtype::U8, {std::uint64_t(hf::packed_rows(out)), std::uint64_t(in)}});
    specs_.push_back({scale_key, floating, {1}});
    if (packed->bias) specs_.push_back({bias_key, floating, {std::uint64_t(out)}});
    writes_.push_back([packed, weight_key, scale_key, bias_key](safetensors::writer& file) {
      file.write(weight_key, packed->weight);
      const T scale[1] = {packed->weight_scale};
      file.write_values<T>(scale_key, scale);
      if (packed->bias) file.write(bias_key, *packed->bias);
    });
  }

  const state_dict_options& options_;
  std::vector<safetensors::tensor_spec> specs_;
  std::vector<std::function<void(safetensors::writer&)>> writes_;
  hf::quantization_config config_of_layers_;
  std::optional<hf::quantization_config> config_;
};

/// Plans, stages and commits a load (see the top of this header).
class tree_loader {
 public:
  tree_loader(const hf::checkpoint& file, const state_dict_options& options) : file_(file), options_(options) {}

  void plan(const ::torch::nn::Module& root) {
    const tree_state state = state_of(root);
    for (const auto& [path, module] : state.bit_linears) plan_bit_linear(path, *module);
    for (const auto& [key, tensor] : state.tensors) plan_tensor(options_.prefix + key, tensor);
  }

  /// The unexpected keys, then one io_error for every problem found.
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
    std::string text = "bitnet::libtorch::load_state_dict: " + file_.source_name() + ": " +
                       std::to_string(all.size()) + " error(s) in loading the state dict" +
                       (options_.prefix.empty() ? std::string() : " (prefix " + quote_key(options_.prefix) + ")") +
                       "; the module tree is unchanged:";
    for (const std::string& line : all) text += "\n  " + line;
    throw io_error(text);
  }

  void stage() {
    for (auto& job : jobs_) job();
  }
  void commit() noexcept {
    for (auto& step : commits_) step();
  }
  state_dict_report take_report() { return std::move(report_); }

 private:
  // Records `key` as used; false when missing or of the wrong shape / dtype (the problem recorded).
  // `floating`: any floating dtype converts; otherwise the file's dtype must be `type` exactly.
  bool expect(const std::string& key, std::optional<::torch::ScalarType> type, const std::vector<std::uint64_t>& shape,
              std::string_view what) {
    used_.insert(key);
    const safetensors::tensor_info* t = file_.find(key);
    if (!t) {
      report_.missing.push_back(key);
      return false;
    }
    const std::optional<::torch::ScalarType> has = torch_type(t->type);
    const bool type_ok = has && (type ? *has == *type
                                      : ::torch::isFloatingType(*has));
    if (!type_ok || t->shape != shape) {
      problems_.push_back("size mismatch for " + quote_key(key) + ": the file has " +
                          std::string(safetensors::dtype_name(t->type)) + " " +
                          safetensors::detail::shape_text(t->shape) + ", the module needs " + std::string(what) + " " +
                          safetensors::detail::shape_text(shape));
      return false;
    }
    report_.loaded.push_back(key);
    return true;
  }

  // The tensor `key` of the file, converted to `type` (a new CPU tensor, not shared with anything).
  ::torch::Tensor read_tensor(const std::string& key, ::torch::ScalarType type) const {
    return guarded(key, [&] {
      const safetensors::tensor_info& info = file_.info(key);
      const std::vector<std::byte> bytes = file_.shard_of(key).read_bytes(key);
      std::vector<std::int64_t> sizes(info.shape.begin(), info.shape.end());
      ::torch::Tensor t = ::torch::empty(sizes, ::torch::dtype(*torch_type(info.type)));
      std::memcpy(t.data_ptr(), bytes.data(), bytes.size());
      return t.to(type);
    });
  }

  template <class Run>
  auto guarded(const std::string& key, Run&& run) const -> decltype(run()) {
    try {
      return run();
    } catch (const io_error&) {
      throw;
    } catch (const error& e) {
      throw io_error("bitnet::libtorch::load_state_dict: " + file_.source_name() + ": " + quote_key(key) + ": " +
                     e.what() + "; the module tree is unchanged");
    } catch (const c10::Error& e) {
      throw io_error("bitnet::libtorch::load_state_dict: " + file_.source_name() + ": " + quote_key(key) + ": " +
                     e.what_without_backtrace() + "; the module tree is unchanged");
    }
  }

  static std::string dtype_text(::torch::ScalarType type) { return std::string(c10::toString(type)); }

  void plan_tensor(const std::string& key, const ::torch::Tensor& target) {
    if (key.ends_with("weight") && file_.contains(key + "_scale")) {
      used_.insert(key + "_scale");
      problems_.push_back(quote_key(key + "_scale") + ": the file stores this layer in the packed BitNet form, but "
                          "the tree holds a plain module there (convert it with bitnet::libtorch::replace_linear "
                          "first)");
    }
    const bool floating = target.is_floating_point();
    if (!expect(key, floating ? std::nullopt : std::optional(target.scalar_type()), shape_of(target),
                floating ? "floating" : dtype_text(target.scalar_type())))
      return;
    jobs_.push_back([this, key, target] {
      const ::torch::Tensor staged = read_tensor(key, target.scalar_type());
      commits_.push_back([target, staged]() mutable {
        ::torch::NoGradGuard no_grad;
        target.copy_(staged);
      });
    });
  }

  bool packed_convention() {
    if (convention_) return true;
    if (convention_problem_) return false;
    try {
      convention_ = file_.convention(options_.scale_convention);
      // The module computes per tensor, unrotated: a file that declares otherwise is refused, never
      // loaded without its unit scales or rotation.
      if (const auto& declared = file_.quantization();
          declared && (declared->weight_scales != weight_scaling::per_tensor || declared->rotation))
        throw io_error(file_.quantization_source() + " declares " +
                       (declared->rotation ? std::string("rotated layers (bitnet_rotation)")
                                           : "bitnet_weight_scales \"" + bitnet::detail::scaling_name(declared->weight_scales) + "\"") +
                       ", which bitnet::libtorch::BitLinear cannot compute (one scale per tensor, no rotation); load "
                       "the file into bitnet::BitLinear layers (bitnet/state_dict.hpp)");
      // Its loader reads transformers' 2-bit layout; a base-3 file goes to bitnet::BitLinear layers.
      if (const auto& declared = file_.quantization(); declared && declared->storage == weight_storage::base3)
        throw io_error(file_.quantization_source() + " declares bitnet_weight_storage \"base3\" (five codes a byte), "
                       "which bitnet::libtorch's loader does not read; load the file into bitnet::BitLinear layers "
                       "(bitnet/state_dict.hpp)");
      return true;
    } catch (const io_error& e) {
      problems_.push_back(e.what());
      convention_problem_ = true;
      return false;
    }
  }

  void plan_bit_linear(const std::string& path, BitLinearImpl& m) {
    if (m.dtype() == ::torch::kFloat)
      plan_bit_linear<float>(path, m);
    else
      plan_bit_linear<double>(path, m);
  }

  template <real_scalar T>
  void plan_bit_linear(const std::string& path, BitLinearImpl& m) {
    const std::string weight_key = options_.prefix + join(path, "weight");
    const std::string scale_key = options_.prefix + join(path, "weight_scale");
    const std::string bias_key = options_.prefix + join(path, "bias");
    const Index out = m.out_features(), in = m.in_features();
    const ::torch::ScalarType type = m.dtype();
    const bool has_bias = m.bias.defined();
    const std::vector<std::uint64_t> bias_shape{std::uint64_t(out)};

    if (file_.contains(scale_key)) {  // the Hugging Face packed form
      bool ok = packed_convention();
      ok = expect(weight_key, ::torch::kUInt8, {std::uint64_t(hf::packed_rows(out)), std::uint64_t(in)},
                  "packed U8") && ok;
      used_.insert(scale_key);
      const safetensors::tensor_info& scale = file_.info(scale_key);
      if (scale.element_count() != 1 || !safetensors::is_floating(scale.type)) {
        problems_.push_back("size mismatch for " + quote_key(scale_key) + ": the file has " +
                            std::string(safetensors::dtype_name(scale.type)) + " " +
                            safetensors::detail::shape_text(scale.shape) + ", a weight_scale is one floating element");
        ok = false;
      } else {
        report_.loaded.push_back(scale_key);
      }
      const bool load_bias = has_bias && expect(bias_key, std::nullopt, bias_shape, "floating");
      const std::string module_name = bitnet::detail::layer_name(options_.prefix, path);
      const Index declared = file_.declared_out_features(module_name);
      if (declared && declared != out) {
        problems_.push_back("size mismatch for " + quote_key(weight_key) + ": the file declares " +
                            std::to_string(declared) + " output features, the module has " + std::to_string(out));
        ok = false;
      }
      if (!ok) return;
      jobs_.push_back([this, &m, path, weight_key, scale_key, bias_key, load_bias, out] {
        hf::packed_layer<T> packed;
        packed.convention = *convention_;
        packed.out_features = out;
        packed.weight = guarded(weight_key, [&] { return file_.read_matrix<std::uint8_t>(weight_key); });
        packed.weight_scale = guarded(scale_key, [&] { return file_.read_values<T>(scale_key); })[0];
        if (load_bias) packed.bias = guarded(bias_key, [&] { return file_.read_vector<T>(bias_key); });
        bitnet::BitLinear<T> built = guarded(weight_key, [&] { return hf::to_bit_linear(packed, m.options()); });
        ::torch::Tensor staged_bias;
        if (load_bias) {
          const Vector<T>& b = *built.bias();  // the layer's bias (autobitlinear stores it scaled)
          staged_bias = ::torch::from_blob(const_cast<T*>(b.data()), {b.size()}, ::torch::dtype(m.dtype())).clone();
        } else if (m.bias.defined()) {  // missing (not strict): kept as it is
          const ::torch::Tensor b = m.bias.detach().contiguous();
          built.set_bias(Vector<T>(Eigen::Map<const Vector<T>>(b.data_ptr<T>(), b.size(0))));
        }
        auto held = module_state_access::hold(std::move(built));
        std::string origin = (path.empty() ? std::string("(the root)") : quote_key(path)) + " (packed, from " +
                             file_.source_name() + ")";
        commits_.push_back([&m, held, staged_bias, origin]() mutable {
          module_state_access::make_packed(m, std::move(held), staged_bias, std::move(origin));
        });
      });
      return;
    }

    const bool load_weight =
        expect(weight_key, std::nullopt, {std::uint64_t(out), std::uint64_t(in)}, "floating");
    const bool load_bias = has_bias && expect(bias_key, std::nullopt, bias_shape, "floating");
    if (!load_weight && !load_bias) return;
    jobs_.push_back([this, &m, weight_key, bias_key, load_weight, load_bias, type] {
      ::torch::Tensor staged_weight, staged_bias;
      if (load_weight) {
        staged_weight = read_tensor(weight_key, type);
        if (!::torch::isfinite(staged_weight).all().item<bool>())
          throw io_error("bitnet::libtorch::load_state_dict: " + file_.source_name() + ": " + quote_key(weight_key) +
                         ": the latent weight of a BitLinear holds a value that is not finite; the module tree is "
                         "unchanged");
      }
      if (load_bias) staged_bias = read_tensor(bias_key, type);
      commits_.push_back([&m, staged_weight, staged_bias] {
        module_state_access::make_latent(m, staged_weight, staged_bias);
      });
    });
  }

  const hf::checkpoint& file_;
  const state_dict_options& options_;
  std::optional<hf::scale_convention> convention_;
  bool convention_problem_ = false;
  std::set<std::string, std::less<>> used_;
  std::vector<std::string> problems_;
  state_dict_report report_;
  std::vector<std::function<void()>> jobs_;
  std::vector<std::function<void()>> commits_;
};

/// Writes `text` to `path` through a temporary file in the same folder and a rename.
inline void replace_text_file(const std::filesystem::path& path, const std::string& text) {
  const std::filesystem::path temporary = path.string() + ".bitnet-tmp";
  {
    std::ofstream out(temporary, std::ios::binary | std::ios::trunc);
    out << text;
    out.flush();
    if (!out) throw io_error(temporary.string() + ": cannot write the file");
  }
  std::error_code ec;
  std::filesystem::rename(temporary, path, ec);
  if (ec) {
    std::filesystem::remove(temporary, ec);
    throw io_error(path.string() + ": cannot replace the file: " + ec.message());
  }
}

}  // namespace detail

/// Loads every parameter and buffer of the module tree under `root` from `file` (one safetensors
/// file or a Hugging Face model folder), by state-dict key (options.prefix in front). BitLinear
/// modules take either form: latent weights (P.weight, P.bias) or the packed form (P.weight U8,
/// P.weight_scale, P.bias) in the convention the file or folder declares (options.scale_convention
/// must agree with it, or stands in for none), which makes the module packed-only. Shape and dtype
/// are checked per key (floating tensors convert between floating dtypes, others must match);
/// options.strict (default) makes missing and unexpected keys errors too, all listed in one
/// io_error. All or nothing: on any exception every tensor and module of the tree is as it was.
/// options.new_layers, bit_linear, dtype and metadata do not apply to loading.
inline state_dict_report load_state_dict(::torch::nn::Module& root, const hf::checkpoint& file,
                                         const state_dict_options& options = {}) {
  detail::tree_loader loader(file, options);
  loader.plan(root);
  loader.check();
  loader.stage();
  state_dict_report report = loader.take_report();  // before the commit: nothing may fail after it
  loader.commit();
  return report;
}

/// Opens `path` (a .safetensors file or a model folder, hf::checkpoint) and loads it as above.
inline state_dict_report load_state_dict(::torch::nn::Module& root, const std::filesystem::path& path,
                                         const state_dict_options& options = {}) {
  return load_state_dict(root, hf::checkpoint(path), options);
}

/// Writes every parameter and buffer of the tree under `root` to the safetensors file `file`
/// (replaced whole or not at all), BitLinear modules in the form options.bit_linear names (see the
/// top of this header). A packed-only BitLinear can only be saved packed: in latent mode it is a
/// state_error naming its path, thrown before the file is touched. options.dtype converts the
/// floating tensors (F32, F64, F16, BF16); every other tensor keeps its dtype. Throws value_error
/// for a tensor that is not on the CPU or has a dtype safetensors cannot hold, naming its key.
inline void save_state_dict(const ::torch::nn::Module& root, const std::filesystem::path& file,
                            const state_dict_options& options = {}) {
  detail::tree_saver(root, options).write(file);
}

/// Writes the tree as a Hugging Face model folder: `folder`/model.safetensors as save_state_dict
/// writes it, and `folder`/config.json: `config_json` (the model's own config, a JSON object; "{}"
/// by default) with "quantization_config" set to the block the file declares (when the tree holds
/// BitLinear modules). Throws io_error when the folder holds a sharded model's index (its shards
/// would shadow nothing and confuse readers), value_error for a config that is not a JSON object.
inline void save_pretrained(const ::torch::nn::Module& root, const std::filesystem::path& folder,
                            const state_dict_options& options = {}, std::string_view config_json = "{}") {
  nlohmann::ordered_json config;
  try {
    config = nlohmann::ordered_json::parse(config_json);
  } catch (const nlohmann::json::exception& e) {
    throw value_error(std::string("bitnet::libtorch::save_pretrained: config_json is not JSON: ") + e.what());
  }
  if (!config.is_object()) throw value_error("bitnet::libtorch::save_pretrained: config_json is not a JSON object");
  std::error_code ec;
  if (std::filesystem::exists(folder / hf::index_file_name, ec))
    throw io_error((folder / hf::index_file_name).string() +
                   ": the folder holds a sharded model; save_pretrained writes one model.safetensors: choose an "
                   "empty folder");
  detail::tree_saver saver(root, options);
  if (saver.config()) config["quantization_config"] = nlohmann::ordered_json::parse(hf::to_json(*saver.config()));
  std::filesystem::create_directories(folder);
  saver.write(folder / hf::single_file_name);
  detail::replace_text_file(folder / hf::config_file_name, config.dump(2) + "\n");
}

}  // namespace bitnet::libtorch
