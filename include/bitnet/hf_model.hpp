// bitnet/hf_model.hpp - a Hugging Face model's weights: one safetensors file, or a model folder
// (config.json, model.safetensors or shards listed in model.safetensors.index.json), read as one
// set of named tensors with the quantization_config the folder and its files declare.
//
//   const bitnet::hf::checkpoint model("path/to/model");            // a folder or a .safetensors file
//   bitnet::load_state_dict(graph, model, {.prefix = "model."});    // bitnet/state_dict.hpp
//
// Needs nlohmann/json (CMake target bitnet::safetensors).
#pragma once

#include <charconv>
#include <cstddef>
#include <cstdint>
#include <filesystem>
#include <fstream>
#include <map>
#include <optional>
#include <set>
#include <variant>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

#include "detail/json_leaves.hpp"
#include "errors.hpp"
#include "hf.hpp"
#include "hf_safetensors.hpp"
#include "matrix.hpp"
#include "safetensors.hpp"

namespace bitnet::hf {

inline constexpr std::string_view config_file_name = "config.json";
inline constexpr std::string_view single_file_name = "model.safetensors";
inline constexpr std::string_view index_file_name = "model.safetensors.index.json";
/// PrismML's declaration of the rotations folded into a folder's weights (docs/rotation.md).
inline constexpr std::string_view hadamard_packing_file_name = "hadamard_packing.json";

/// What a folder's hadamard_packing.json declares: the rotation R = H_b diag(s) / sqrt(b) per block
/// (rotation.hpp) folded into listed tensors. "fold-before-matmul": a linear weight stored as
/// W R^T, whose layer must rotate its input (bitlinear_options::rotation); "inverse-after-lookup":
/// a table whose looked-up rows must be multiplied by R^T.
struct folded_rotations {
  std::string source;  // the file, for messages
  Index block_size = 0;
  bool identity_signs = false;                                      // sign_mode "identity"
  std::map<Index, std::vector<std::int8_t>> signs{};                // sign_mode "explicit": by input width
  std::map<std::string, std::string, std::less<>> roles{};          // tensor name -> role
};

namespace detail {

/// The text of a small JSON file (config.json, an index), at most 100 MB as a safetensors header.
inline std::string read_text_file(const std::filesystem::path& path) {
  std::error_code ec;
  const auto size = std::filesystem::file_size(path, ec);
  if (ec) throw io_error(path.string() + ": cannot get the file size: " + ec.message());
  if (size > safetensors::max_header_length) throw io_error(path.string() + ": larger than 100 MB, not a JSON config");
  std::ifstream in(path, std::ios::binary);
  std::string text(static_cast<std::size_t>(size), '\0');
  in.read(text.data(), static_cast<std::streamsize>(size));
  if (!in || static_cast<std::uint64_t>(in.gcount()) != size) throw io_error(path.string() + ": cannot read the file");
  return text;
}

/// A shard name from an index must be a plain file name in the model folder.
inline bool plain_file_name(std::string_view name) {
  return !name.empty() && name != "." && name != ".." && name.find_first_of("/\\") == std::string_view::npos &&
         name.find('\0') == std::string_view::npos;
}

}  // namespace detail

namespace detail {

/// Parses hadamard_packing.json (schema_version 1 or 2, kind "hadamard-weight-fold"). Everything
/// bitnet applies must be understood: another kind, transform, sign mode, axis or role, a sign that
/// is not +-1, an explicit width without signs: io_error naming the file and the key.
inline folded_rotations parse_hadamard_packing(const std::filesystem::path& path) {
  folded_rotations result;
  result.source = path.string();
  const auto fail = [&](const std::string& key, const std::string& rule) -> void {
    throw io_error(result.source + ": " + key + " " + rule + " (bitnet refuses a rotation it cannot interpret)");
  };
  std::optional<std::uint64_t> schema;
  std::string kind, transform, sign_mode;
  struct entry {
    std::string name, role;
    std::optional<std::int64_t> axis;
  };
  std::vector<entry> tensors;
  bitnet::detail::parse_json_leaves(
      read_text_file(path), result.source,
      [&](const bitnet::detail::json_leaf& leaf) {
        const std::vector<std::string>& at = leaf.path;
        const auto* text = std::get_if<std::string>(&leaf.value);
        const auto* count = std::get_if<std::uint64_t>(&leaf.value);
        const auto* negative = std::get_if<std::int64_t>(&leaf.value);
        if (at.size() == 1 && at[0] == "schema_version") {
          if (!count) fail("schema_version", "is not an integer");
          schema = *count;
        } else if (at.size() == 1 && at[0] == "kind") {
          if (!text) fail("kind", "is not a string");
          kind = *text;
        } else if (at.size() == 2 && at[0] == "transform") {
          if (at[1] == "name" && text) transform = *text;
          else if (at[1] == "block_size" && count && *count <= std::uint64_t(hadamard_rotation::max_block_size)) result.block_size = Index(*count);
          else if (at[1] == "sign_mode" && text) sign_mode = *text;
          else fail("transform." + at[1], "is not understood");
        } else if (at.size() == 3 && at[0] == "signs" && at[2] == "[]") {
          const std::int64_t value = count ? std::int64_t(*count) : negative ? *negative : 0;
          if (value != 1 && value != -1) fail("signs." + at[1], "holds a value that is not +1 or -1");
          Index width = 0;
          const auto parsed = std::from_chars(at[1].data(), at[1].data() + at[1].size(), width);
          if (parsed.ec != std::errc() || parsed.ptr != at[1].data() + at[1].size() || width <= 0)
            fail("signs." + at[1], "is not keyed by an input width");
          result.signs[width].push_back(std::int8_t(value));
        } else if (at.size() == 3 && at[0] == "tensors" && at[1] == "[]") {
          if (tensors.empty()) fail("tensors", "is not a list of objects");
          if (at[2] == "name" && text) tensors.back().name = *text;
          else if (at[2] == "role" && text) tensors.back().role = *text;
          else if (at[2] == "axis" && (negative || count)) tensors.back().axis = negative ? *negative : std::int64_t(*count);
          else fail("tensors[]." + at[2], "is not understood");
        } else if (!at.empty() && (at[0] == "signs" || at[0] == "tensors" || at[0] == "transform")) {
          fail(at[0], "is malformed");
        }
      },
      [&](const std::vector<std::string>& at, bitnet::detail::json_container kind_of) {
        if (at.size() == 2 && at[0] == "tensors" && at[1] == "[]" && kind_of == bitnet::detail::json_container::object)
          tensors.emplace_back();
      });
  if (!schema || (*schema != 1 && *schema != 2)) fail("schema_version", "must be 1 or 2");
  if (kind != "hadamard-weight-fold") fail("kind", "must be \"hadamard-weight-fold\", got \"" + kind + "\"");
  if (transform != hadamard_transform_name)
    fail("transform.name", "must be \"" + std::string(hadamard_transform_name) + "\", got \"" + transform + "\"");
  if (result.block_size < hadamard_rotation::min_block_size || (result.block_size & (result.block_size - 1)) != 0)
    fail("transform.block_size", "must be a power of two in [2, 32768]");
  if (sign_mode != "identity" && sign_mode != "explicit")
    fail("transform.sign_mode", "must be \"identity\" or \"explicit\", got \"" + sign_mode + "\"");
  result.identity_signs = sign_mode == "identity";
  if (result.identity_signs && !result.signs.empty()) fail("signs", "are given with sign_mode \"identity\"");
  for (const auto& [width, values] : result.signs)
    if (Index(values.size()) != width)
      fail("signs." + std::to_string(width), "holds " + std::to_string(values.size()) + " values");
  for (const entry& t : tensors) {
    if (t.name.empty()) fail("tensors[]", "has an entry without a name");
    if (!t.axis || *t.axis != -1) fail("tensors[" + t.name + "].axis", "must be -1 (the input axis)");
    if (t.role != "fold-before-matmul" && t.role != "inverse-after-lookup")
      fail("tensors[" + t.name + "].role", "must be \"fold-before-matmul\" or \"inverse-after-lookup\", got \"" +
                                               t.role + "\"");
    if (!result.roles.emplace(t.name, t.role).second) fail("tensors[" + t.name + "]", "is listed twice");
  }
  return result;
}

}  // namespace detail

/// The weights of a model, from one safetensors file or a model folder. Opening validates every
/// file header and, for a folder, that the index and the shards agree exactly (every listed tensor
/// is in its shard, every tensor of a shard is listed there, no tensor is in two shards), and that
/// config.json and the files do not declare different quantization settings. Tensors are read on
/// demand. Throws io_error naming the file and the reason.
class checkpoint {
 public:
  /// `path` is a .safetensors file or a model folder.
  explicit checkpoint(const std::filesystem::path& path) : name_(path.string()) {
    std::error_code ec;
    if (!std::filesystem::is_directory(path, ec)) {
      add_shard(safetensors::reader(path));
      declare(declared_quantization(shards_.back()), shards_.back().source_name());
      return;
    }
    folder_ = true;
    const auto packing = path / hadamard_packing_file_name;
    if (std::filesystem::exists(packing, ec)) folded_ = detail::parse_hadamard_packing(packing);
    const auto config = path / config_file_name;
    if (std::filesystem::exists(config, ec)) {
      config_path_ = config;
      declare(config_json_quantization(detail::read_text_file(config), config.string()), config.string());
    }
    const auto single = path / single_file_name, index = path / index_file_name;
    const bool has_single = std::filesystem::exists(single, ec), has_index = std::filesystem::exists(index, ec);
    if (has_single && has_index)  // transformers' rule (from_pretrained): the single file wins
      notes_.push_back(name_ + " holds both " + std::string(single_file_name) + " and " + std::string(index_file_name) +
                       ": " + std::string(single_file_name) + " is the model, as transformers loads it; the index " +
                       "and the files it lists are not read");
    if (!has_single && !has_index)
      throw io_error(name_ + ": no " + std::string(single_file_name) + " and no " + std::string(index_file_name) +
                     ": not a Hugging Face model folder");
    if (has_single) {
      add_shard(safetensors::reader(single));
    } else {
      uses_index_ = true;
      open_index(path, index);
    }
    for (const safetensors::reader& shard : shards_) declare(declared_quantization(shard), shard.source_name());
    if (folded_)
      for (const auto& [tensor, role] : folded_->roles)
        if (!contains(tensor))
          throw io_error(folded_->source + ": lists tensor \"" + tensor + "\", which the model does not hold");
  }

  /// One open file (copies of a reader share the open file).
  explicit checkpoint(safetensors::reader file) : name_(file.source_name()) {
    add_shard(std::move(file));
    declare(declared_quantization(shards_.back()), shards_.back().source_name());
  }

  /// The folder or the file, for messages.
  const std::string& source_name() const noexcept { return name_; }
  bool is_folder() const noexcept { return folder_; }
  const std::optional<std::filesystem::path>& config_path() const noexcept { return config_path_; }
  /// Whether the model is the shards model.safetensors.index.json lists (else one file).
  bool uses_index() const noexcept { return uses_index_; }
  /// What opening decided that a user should know (which of two candidate files is the model).
  const std::vector<std::string>& notes() const noexcept { return notes_; }
  /// The files, in the order of their names (the index's shards) or the one file.
  const std::vector<safetensors::reader>& shards() const noexcept { return shards_; }

  const safetensors::tensor_info* find(std::string_view name) const noexcept {
    const auto found = where_.find(name);
    return found == where_.end() ? nullptr : shards_[found->second].find(name);
  }
  bool contains(std::string_view name) const noexcept { return find(name) != nullptr; }
  const safetensors::tensor_info& info(std::string_view name) const { return shard_of(name).info(name); }
  /// The file that holds tensor `name`; io_error when none does.
  const safetensors::reader& shard_of(std::string_view name) const {
    const auto found = where_.find(name);
    if (found == where_.end())
      throw io_error(name_ + ": no tensor " + safetensors::detail::quote(name));
    return shards_[found->second];
  }
  /// Every tensor: file by file, each in data order.
  std::vector<const safetensors::tensor_info*> tensors() const {
    std::vector<const safetensors::tensor_info*> all;
    for (const safetensors::reader& shard : shards_)
      for (const safetensors::tensor_info& t : shard.tensors()) all.push_back(&t);
    return all;
  }

  template <safetensors::element T>
  std::vector<T> read_values(std::string_view name) const {
    return shard_of(name).template read_values<T>(name);
  }
  template <safetensors::element T>
  Matrix<T> read_matrix(std::string_view name) const {
    return shard_of(name).template read_matrix<T>(name);
  }
  template <safetensors::element T>
  Vector<T> read_vector(std::string_view name) const {
    return shard_of(name).template read_vector<T>(name);
  }

  /// The quantization_config declared by config.json or the files (merged; they never disagree).
  const std::optional<quantization_config>& quantization() const noexcept { return declared_; }
  /// Where quantization() was declared (config.json or a file), for messages.
  const std::string& quantization_source() const noexcept { return declared_where_; }
  /// The scale convention of the packed layers (hf::resolve_scale_convention).
  scale_convention convention(std::optional<scale_convention> requested) const {
    return resolve_scale_convention(declared_, declared_where_.empty() ? name_ : declared_where_, requested);
  }
  /// The folder's hadamard_packing.json, when it has one.
  const std::optional<folded_rotations>& folded() const noexcept { return folded_; }
  /// The role hadamard_packing.json gives tensor `name` ("fold-before-matmul", "inverse-after-lookup"),
  /// empty when it lists no such tensor.
  std::string_view folded_role(std::string_view name) const noexcept {
    if (!folded_) return {};
    const auto found = folded_->roles.find(name);
    return found == folded_->roles.end() ? std::string_view() : std::string_view(found->second);
  }
  /// The rotation a layer whose weight `name` is folded ("fold-before-matmul") must apply to its
  /// `in_features` inputs; empty when the tensor is not folded. Throws io_error when the file has no
  /// signs of that width (explicit mode) or the block does not divide it.
  std::optional<hadamard_rotation> folded_rotation(std::string_view name, Index in_features) const {
    if (folded_role(name) != "fold-before-matmul") return std::nullopt;
    try {
      if (folded_->identity_signs) return hadamard_rotation::identity_signs(in_features, folded_->block_size);
      const auto found = folded_->signs.find(in_features);
      if (found == folded_->signs.end())
        throw io_error("signs has no vector of width " + std::to_string(in_features));
      return hadamard_rotation(folded_->block_size, found->second);
    } catch (const error& e) {
      throw io_error(folded_->source + ": tensor \"" + std::string(name) + "\" (" + std::to_string(in_features) +
                     " inputs): " + e.what());
    }
  }

  /// The out_features a declaration gives for a packed layer (bitnet_out_features), or 0.
  Index declared_out_features(std::string_view layer) const {
    if (!declared_) return 0;
    const auto found = declared_->out_features.find(layer);
    return found == declared_->out_features.end() ? 0 : found->second;
  }

 private:
  void add_shard(safetensors::reader shard) {
    const std::size_t index = shards_.size();
    for (const safetensors::tensor_info& t : shard.tensors()) {
      const auto [it, inserted] = where_.emplace(t.name, index);
      if (!inserted)
        throw io_error(name_ + ": tensor " + safetensors::detail::quote(t.name) + " is in both " +
                       shards_[it->second].source_name() + " and " + shard.source_name());
    }
    shards_.push_back(std::move(shard));
  }

  void open_index(const std::filesystem::path& folder, const std::filesystem::path& index) {
    const std::string source = index.string();
    std::map<std::string, std::string, std::less<>> weight_map;
    bool has_map = false;
    bitnet::detail::parse_json_leaves(
        detail::read_text_file(index), source,
        [&](const bitnet::detail::json_leaf& leaf) {
          if (leaf.path.empty() || leaf.path[0] != "weight_map") return;
          const auto* shard = std::get_if<std::string>(&leaf.value);
          if (leaf.path.size() != 2 || !shard || !detail::plain_file_name(*shard))
            throw io_error(source + ": weight_map must map tensor names to file names in the folder");
          weight_map[leaf.path[1]] = *shard;
        },
        [&](const std::vector<std::string>& path, bitnet::detail::json_container kind) {
          if (path.size() == 1 && path[0] == "weight_map") {
            if (kind != bitnet::detail::json_container::object) throw io_error(source + ": weight_map is not an object");
            has_map = true;
          }
        });
    if (!has_map) throw io_error(source + ": no weight_map");
    std::set<std::string, std::less<>> files;
    for (const auto& [tensor, file] : weight_map) files.insert(file);
    std::map<std::string, std::size_t, std::less<>> file_index;
    for (const std::string& file : files) {
      file_index[file] = shards_.size();
      add_shard(safetensors::reader(folder / file));
    }
    for (const auto& [tensor, file] : weight_map) {
      const auto found = where_.find(tensor);
      if (found == where_.end() || found->second != file_index.at(file))
        throw io_error(source + ": lists tensor " + safetensors::detail::quote(tensor) + " in " + file +
                       ", which does not hold it");
    }
    for (const auto& [tensor, shard] : where_)
      if (!weight_map.contains(tensor))
        throw io_error(shards_[shard].source_name() + ": holds tensor " + safetensors::detail::quote(tensor) +
                       ", which " + source + " does not list");
  }

  // Merges one declaration; two that name different settings are an io_error naming both.
  void declare(const std::optional<quantization_config>& config, const std::string& where) {
    if (!config) return;
    if (!declared_) {
      declared_ = config;
      declared_where_ = where;
      return;
    }
    const auto conflict = [&](std::string_view what, std::string_view mine, std::string_view theirs) {
      throw io_error(declared_where_ + " declares " + std::string(what) + " \"" + std::string(mine) + "\", but " +
                     where + " declares \"" + std::string(theirs) + "\"");
    };
    if (config->quant_method != declared_->quant_method)
      conflict("quant_method", declared_->quant_method, config->quant_method);
    if (config->linear_class && declared_->linear_class && *config->linear_class != *declared_->linear_class)
      conflict("linear_class", convention_name(*declared_->linear_class), convention_name(*config->linear_class));
    if (config->mode != declared_->mode) conflict("quantization_mode", mode_name(declared_->mode), mode_name(config->mode));
    if (config->weight_scales != declared_->weight_scales || config->group_size != declared_->group_size)
      conflict("bitnet_weight_scales / bitnet_group_size",
               bitnet::detail::scaling_name(declared_->weight_scales) + " " + std::to_string(declared_->group_size),
               bitnet::detail::scaling_name(config->weight_scales) + " " + std::to_string(config->group_size));
    if (config->activation_scales != declared_->activation_scales)
      conflict("bitnet_activation_scales",
               declared_->activation_scales == activation_scaling::per_block ? "per_block" : "per_token",
               config->activation_scales == activation_scaling::per_block ? "per_block" : "per_token");
    if (config->rotation != declared_->rotation)
      conflict("bitnet_rotation", declared_->rotation ? to_json(*declared_) : "none", config->rotation ? to_json(*config) : "none");
    if (config->storage != declared_->storage)
      conflict("bitnet_weight_storage", storage_name(declared_->storage), storage_name(config->storage));
    if (!declared_->linear_class) declared_->linear_class = config->linear_class;
    for (const auto& [layer, in] : config->in_features) {
      const auto [it, inserted] = declared_->in_features.emplace(layer, in);
      if (!inserted && it->second != in) conflict("in_features of " + layer, std::to_string(it->second), std::to_string(in));
    }
    for (const auto& [layer, out] : config->out_features) {
      const auto [it, inserted] = declared_->out_features.emplace(layer, out);
      if (!inserted && it->second != out)
        conflict("out_features of " + layer, std::to_string(it->second), std::to_string(out));
    }
  }

  std::string name_;
  bool folder_ = false;
  bool uses_index_ = false;
  std::vector<std::string> notes_;
  std::optional<std::filesystem::path> config_path_;
  std::vector<safetensors::reader> shards_;
  std::map<std::string, std::size_t, std::less<>> where_;
  std::optional<quantization_config> declared_;
  std::string declared_where_;
  std::optional<folded_rotations> folded_;
};

/// Reads the packed layer at `path` from the files of `model` that hold its tensors, in the convention the
/// model declares (config.json or the files; `convention` must agree, or stands in when nothing
/// declares one), with out_features from the declaration when 0 is given (see read_packed_layer).
template <real_scalar T>
packed_layer<T> read_packed_layer(const checkpoint& model, std::string_view path, Index out_features = 0,
                                  std::optional<scale_convention> convention = std::nullopt) {
  const scale_convention resolved = model.convention(convention);
  return detail::read_packed_from<T>(model, path, out_features, resolved, model.quantization(),
                                     model.quantization_source().empty() ? model.source_name()
                                                                         : model.quantization_source());
}

/// The BitLinear the packed layer at `path` of `model` describes (hf::to_bit_linear).
template <real_scalar T>
BitLinear<T> load_bit_linear(const checkpoint& model, std::string_view path, Index out_features = 0,
                             std::optional<scale_convention> convention = std::nullopt, bitlinear_options options = {}) {
  return to_bit_linear(read_packed_layer<T>(model, path, out_features, convention), options);
}

}  // namespace bitnet::hf
