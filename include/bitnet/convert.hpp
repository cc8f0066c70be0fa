// bitnet/convert.hpp - converts a safetensors checkpoint (one file, or a Hugging Face model folder)
// into the Hugging Face BitNet packed form, or a Llama- or BitNet-architecture folder into one GGUF file for
// llama.cpp-family engines, in-process: what the bitnet-convert tool runs.
//
//   bitnet::convert_report report = bitnet::convert_model("Llama-3.2-1B", "Llama-3.2-1B-bitnet");
//   std::cout << report.layers.size() << " layers converted\n";
//
//   bitnet::convert_options gguf;                  // arch "llama", ternary layers as TQ2_0
//   gguf.format = bitnet::output_format::gguf;
//   bitnet::convert_model("TinyLlama-1.1B", "tinyllama-tq2_0.gguf", gguf);
//
// The promises, for files and folders alike:
//   - nothing is written outside OUT, except the staging folder beside it (".OUT.bitnet-convert-<pid>-<n>"),
//     which is renamed into place at the end; a failure, a cancel or an exception removes it, and the
//     next run removes ones left by a killed process;
//   - OUT appears complete or not at all; an existing OUT is replaced only when it is an earlier
//     output of this converter (or with force);
//   - linked input files (a Hugging Face hub cache snapshot links every file into ../../blobs) are
//     read through their links and written into OUT as regular files;
//   - the output is reopened and verified before it is committed: codes, scales and copied bytes,
//     and each converted layer's outputs (bias included) against the source layer (GGUF: with
//     bitnet's GGUF reader; every block scale, every float tensor, each layer's outputs within the
//     rounding of its fp16 / float32 scale, which the report gives per layer).
// Needs nlohmann/json (CMake target bitnet::safetensors).
#pragma once

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cerrno>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <functional>
#include <limits>
#include <map>
#include <optional>
#include <random>
#include <regex>
#include <set>
#include <span>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

#include <nlohmann/json.hpp>

#include "bit_linear.hpp"
#include "detail/float_formats.hpp"
#include "errors.hpp"
#include "gguf.hpp"
#include "hf.hpp"
#include "hf_model.hpp"
#include "hf_safetensors.hpp"
#include "matrix.hpp"
#include "quant.hpp"
#include "replace_options.hpp"
#include "safetensors.hpp"

#if __has_include(<unistd.h>)
#include <unistd.h>
#endif
#if defined(__linux__)
#include <fcntl.h>   // AT_FDCWD
#include <signal.h>  // kill(pid, 0)
#include <stdio.h>   // renameat2
#endif

namespace bitnet {

/// What convert_model writes: the Hugging Face BitNet packed form (safetensors, a file for a file and
/// a folder for a folder), or one GGUF file for llama.cpp-family engines (from a model folder).
enum class output_format { hf_packed, gguf };

/// What convert_model does. The defaults are bitnet-convert's.
struct convert_options {
  /// A 2-D F32/F16/BF16 tensor named "*.weight" is converted unless its name contains one of these
  /// (substrings, as transformers matches modules_to_not_convert).
  std::vector<std::string> exclude{"embed", "norm", "lm_head"};
  /// offline: packed ternary weights (U8) + weight_scale; online: the latent weights kept, for
  /// transformers' AutoBitLinear online mode (always the autobitlinear convention).
  hf::quantization_mode mode = hf::quantization_mode::offline;
  hf::scale_convention scale_convention = hf::default_scale_convention;
  /// The element type of weight_scale: F32 (exact), BF16 or F16 (rounded; the report says by how much).
  safetensors::dtype scale_dtype = safetensors::dtype::F32;
  /// Replace an existing OUT that is not an earlier output of this converter.
  bool force = false;
  /// Asked between tensors and files; true stops the conversion (io_error, nothing left behind).
  std::function<bool()> cancelled{};
  /// What to write: the packed safetensors form (default) or one GGUF file (the gguf_* fields).
  output_format format = output_format::hf_packed;
  /// Packed output: the scale granularity of the converted layers. per_tensor (the default) is the
  /// transformers BitNet form, one weight_scale per tensor. per_row, or per_group with group_size
  /// 32, 64, 128 or 256, is bitnet's group-scaled form (docs/safetensors.md): P.weight_scale holds
  /// [out, groups] F32 magnitudes d (autobitlinear convention, scale_dtype F32), and config.json /
  /// every file declare bitnet_weight_scales and bitnet_group_size. transformers cannot load it.
  weight_scaling weight_scales = weight_scaling::per_tensor;
  Index group_size = 0;
  /// Recorded in the declaration for the layers built from the files (per_block needs per_group).
  activation_scaling activation_scales = activation_scaling::per_token;
  /// Packed output: how P.weight holds the codes. two_bit (the default) is transformers' layout;
  /// base3 is bitnet's 1.6-bit one (five codes a byte, U8 [out, ceil(in / 5)], declared as
  /// bitnet_weight_storage "base3"; docs/safetensors.md), per_tensor scales only. transformers cannot
  /// load base3 files; bitnet's readers build base-3 layers from them.
  weight_storage storage = weight_storage::two_bit;
  /// quantize: absmean per unit. exact: the weights are already ternary per unit (Ternary Bonsai's
  /// unpacked FP16 / BF16 folders): codes and scales are read off with no rounding and checked
  /// (codes x scales == the source weights bit for bit); any other layer is refused naming it, its
  /// row and group, and nothing is written. Needs per_row or per_group. A weight the folder's
  /// hadamard_packing.json declares folded ("fold-before-matmul") is converted with that rotation
  /// either way, declared in bitnet_rotation with its signs in P.rotation_signs.
  ternary_import weights = ternary_import::quantize;
  /// GGUF: the type of the ternary layers: TQ2_0 or TQ1_0 (mainline llama.cpp), I2_S (ik_llama.cpp,
  /// bitnet.cpp). Their block scale d = 1 / s is fp16 (TQ types) or float32 (I2_S).
  gguf::tensor_type gguf_ternary_type = gguf::tensor_type::TQ2_0;
  /// GGUF: the type of the 2-D tensors kept dense (embedding, an excluded lm_head or projection):
  /// F32, F16 or BF16 (rounded to nearest even); none keeps each tensor's own type (exact). Norms are
  /// always F32, as the engines' converters write them.
  std::optional<gguf::tensor_type> gguf_float_type{};
  /// GGUF: a GGUF file whose tokenizer.* entries are copied verbatim (a vocabulary file of the same
  /// model, as `convert_hf_to_gguf.py --vocab-only` writes it, or any GGUF of the same base model);
  /// its token count must equal the model's vocab_size. Without it the tokenizer is not carried
  /// (tokenizer.ggml.model "none", and a note says what the engine then needs): bitnet does not
  /// derive tokenizer metadata from tokenizer.json itself, because llama.cpp's converter names the
  /// pre-tokenizer by running the Hugging Face tokenizer, which a C++ library cannot do exactly.
  std::optional<std::filesystem::path> gguf_tokenizer_from{};
  /// GGUF: the arch to write. Unset: "llama" for a Llama-architecture folder, and a BitNet folder
  /// (BitNetForCausalLM) is refused, because the engines name its graph differently. bitnet_b158
  /// (or its older name bitnet_25): a BitNet folder as bitnet.cpp and ik_llama.cpp read it (arch
  /// "bitnet-b1.58" / "bitnet-25", sub-norms, relu^2, I2_S ternary layers). Mainline llama.cpp's
  /// "bitnet" is not written (see docs/gguf.md).
  std::optional<gguf::model_arch> gguf_arch{};
};

/// One converted layer, as the report and the progress callback show it.
struct converted_layer {
  std::string name;  // the module path, "model.layers.0.mlp.down_proj"
  std::string file;  // the output file that holds it
  Index out_features = 0, in_features = 0;
  double weight_scale = 0;      // as stored, in the output's convention and scale_dtype (GGUF: d = 1 / s)
                                // (per_row / per_group layers: the mean of their unit scales d)
  double scale_rounding = 0;    // relative change of the scale by scale_dtype (GGUF: of d by fp16 / float32)
  double zero_fraction = 0;     // of the ternary codes
  double relative_error = 0;    // ||W - q / s|| / ||W|| (0 for a layer that was packed already)
  bool has_bias = false;        // stored as the convention defines it (hf.hpp)
  std::string gguf_name{};      // GGUF: the tensor in the file, "blk.0.ffn_down.weight" (else empty)
};

/// What convert_model did.
struct convert_report {
  std::filesystem::path input, output;
  bool folder = false;
  hf::quantization_config config;                     // written to config.json and every file's __metadata__
  std::vector<std::string> model_files;               // the input files that hold the model, in order
  std::vector<converted_layer> layers;
  std::vector<std::string> copied_tensors;            // byte for byte (norms, embeddings, online latent weights)
  std::vector<std::string> copied_files;              // folder files that are not the model, relative paths
  std::vector<std::pair<std::string, std::vector<std::string>>> exclude_matches;  // rule -> the weights it kept dense
  std::vector<std::string> notes;                     // warnings and decisions the user should know about
  std::uint64_t bytes_in = 0, bytes_out = 0;
  std::size_t tensors_in = 0;
  double seconds = 0;
};

/// Progress, reported after every tensor and file.
struct convert_progress {
  std::uint64_t bytes_done = 0, bytes_total = 0;
  std::size_t tensors_done = 0, tensors_total = 0;
  const converted_layer* layer = nullptr;  // the layer just converted, or none
};

/// The metadata key every file written by convert_model carries; an OUT whose files carry it may be
/// replaced without convert_options::force.
inline constexpr std::string_view converter_metadata_key = "bitnet_converter";

namespace detail {

namespace fs = std::filesystem;
namespace st = safetensors;
using ordered_json = nlohmann::ordered_json;

/// FNV-1a over 8-byte words (then the tail bytes): lets the verification compare the file with
/// what was computed without keeping the tensors. Whole tensors are fed in chunks that are
/// multiples of 8 bytes, so the result does not depend on the chunking.
struct fingerprint {
  std::uint64_t value = 1469598103934665603ull;
  void add(std::span<const std::byte> bytes) {
    std::size_t i = 0;
    for (; i + 8 <= bytes.size(); i += 8) {
      std::uint64_t word;
      std::memcpy(&word, bytes.data() + i, 8);
      value = (value ^ word) * 1099511628211ull;
    }
    for (; i < bytes.size(); ++i) value = (value ^ std::uint64_t(bytes[i])) * 1099511628211ull;
  }
};

inline std::uint64_t fingerprint_of(const st::reader& file, const std::string& name) {
  const std::uint64_t size = file.info(name).byte_size();
  fingerprint f;
  std::vector<std::byte> chunk(std::size_t(std::min<std::uint64_t>(size, 1 << 20)));
  for (std::uint64_t done = 0; done < size; done += chunk.size()) {
    const auto n = std::size_t(std::min<std::uint64_t>(chunk.size(), size - done));
    file.read_bytes(name, done, std::span(chunk.data(), n));
    f.add(std::span(chunk.data(), n));
  }
  return f.value;
}

/// `value` rounded as storing it in `type` (F32, BF16 or F16) rounds it.
inline float stored_value(float value, st::dtype type, const std::string& layer) {
  const float_format format = type == st::dtype::BF16 ? bfloat16 : type == st::dtype::F16 ? binary16 : binary32;
  const std::optional<double> rounded = round_to_format(value, format);
  if (!rounded || !(*rounded > 0))
    throw value_error(layer + ": weight_scale " + std::to_string(value) + " cannot be stored as " +
                      std::string(st::dtype_name(type)));
  return static_cast<float>(*rounded);
}

inline bool is_linear_weight(const st::tensor_info& t) {
  return t.name.size() > 7 && t.name.ends_with(".weight") && t.shape.size() == 2 && t.shape[0] > 0 &&
         t.shape[1] > 0 && (t.type == st::dtype::F32 || t.type == st::dtype::F16 || t.type == st::dtype::BF16);
}

inline std::string module_of(const std::string& tensor_name) {
  const auto dot = tensor_name.rfind('.');
  return dot == std::string::npos ? std::string() : tensor_name.substr(0, dot);
}

/// Whether transformers keeps `module` dense given modules_to_not_convert `keys`, by either rule it
/// has used: substring of the dotted path (integrations/bitnet.py, 4.4x-4.5x), or
/// quantizers_utils.should_convert_module (re.match(key + "\."), re.match(key), or a suffix).
inline bool transformers_keeps_dense(const std::string& module, const std::vector<std::string>& keys) {
  for (const std::string& key : keys) {
    if (module.find(key) != std::string::npos || module.ends_with(key)) return true;
    try {
      if (std::regex_search(module, std::regex(key), std::regex_constants::match_continuous)) return true;
    } catch (const std::regex_error&) {
      throw value_error("modules_to_not_convert entry \"" + key + "\" is not a valid regular expression");
    }
  }
  return false;
}

/// A path with no trailing separator and no "." / ".." parts: "out/" and "out" are one folder.
inline fs::path normalized(const fs::path& path) {
  fs::path p = fs::absolute(path).lexically_normal();
  while (!p.has_filename() && p.has_parent_path() && p != p.root_path()) p = p.parent_path();
  return p;
}

inline bool is_inside(const fs::path& inner, const fs::path& outer) {
  const auto [o, i] = std::mismatch(outer.begin(), outer.end(), inner.begin(), inner.end());
  return o == outer.end();
}

/// IN and OUT must be different files or folders (also through symlinks and hard links), and
/// neither folder inside the other.
inline void refuse_same_place(const fs::path& in, const fs::path& out, bool folder) {
  std::error_code ec;
  if (fs::exists(out, ec) && fs::equivalent(in, out, ec))
    throw io_error(in.string() + " and " + out.string() + " are the same " + (folder ? "folder" : "file") +
                   " (directly, through a symlink or a hard link): refusing to overwrite the source");
  if (folder) {
    const fs::path ci = fs::weakly_canonical(in), co = fs::weakly_canonical(out);
    if (is_inside(co, ci) || is_inside(ci, co))
      throw io_error(in.string() + " and " + out.string() + ": one folder is inside the other; refusing");
    if (fs::exists(out, ec) && !fs::is_directory(out, ec))
      throw io_error(out.string() + " exists and is not a folder");
  } else if (fs::is_directory(out, ec)) {
    throw io_error(out.string() + " is a folder; the input is a single file");
  }
}

inline bool written_by_converter(const st::reader& file) {
  return file.metadata().find(std::string(converter_metadata_key)) != file.metadata().end();
}

/// An existing OUT may be replaced when it is empty or an earlier output of convert_model (every
/// model file carries converter_metadata_key), or with force.
inline void refuse_foreign_output(const fs::path& out, bool folder, bool force) {
  std::error_code ec;
  if (force || !fs::exists(out, ec)) return;
  if (folder && fs::is_empty(out, ec)) return;
  bool ours = false;
  try {
    const hf::checkpoint old(out);
    ours = std::all_of(old.shards().begin(), old.shards().end(), written_by_converter);
  } catch (const error&) {
    ours = false;
  }
  if (!ours)
    throw io_error(out.string() + " exists and is not an earlier bitnet-convert output: refusing to replace it "
                   "(choose another OUT, remove it, or pass --force / convert_options::force)");
}

/// The first non-finite element of a weight, named by tensor, row and column.
inline void require_finite(const Matrix<float>& w, const st::reader& file, const std::string& name) {
  for (Index r = 0; r < w.rows(); ++r)
    for (Index c = 0; c < w.cols(); ++c)
      if (!std::isfinite(w(r, c)))
        throw value_error(file.source_name() + ": tensor \"" + name + "\": non-finite value (" +
                          (std::isnan(w(r, c)) ? "nan" : w(r, c) > 0 ? "inf" : "-inf") + ") at row " +
                          std::to_string(r) + ", column " + std::to_string(c) + "; nothing was written");
}

inline ordered_json read_json(const fs::path& path) {
  try {
    return ordered_json::parse(hf::detail::read_text_file(path));
  } catch (const nlohmann::json::exception& e) {
    throw io_error(path.string() + ": invalid JSON: " + e.what());
  }
}

inline void write_text(const fs::path& path, const std::string& text) {
  std::ofstream out(path, std::ios::binary);
  out << text;
  out.close();
  if (!out) throw io_error(path.string() + ": cannot write the file");
}

/// A layer's output on a fixed probe, as the source layer computes it: kept to compare the written
/// layer with (2 rows; the bias included).
struct probe_record {
  std::uint32_t seed = 0;
  Matrix<float> expected;
};

inline Matrix<float> probe_input(std::uint32_t seed, Index in_features) {
  std::mt19937 rng(seed);
  std::normal_distribution<float> dist(0.0f, 1.0f);
  Matrix<float> x(2, in_features);
  for (Index i = 0; i < x.size(); ++i) x.data()[i] = dist(rng);
  return x;
}

struct layer_record {
  converted_layer layer;
  float stored_scale = 0;
  std::uint64_t codes_fingerprint = 0;
  std::uint64_t unit_scales_fingerprint = 0;  // per_row / per_group layers: of the F32 scales as stored
  std::optional<hadamard_rotation> rotation;
  probe_record probe;
};

template <class T>
std::uint64_t fingerprint_values(const T* data, Index count) {
  fingerprint f;
  f.add(std::as_bytes(std::span(data, std::size_t(count))));
  return f.value;
}

/// The whole conversion, one object per call.
class converter {
 public:
  converter(const fs::path& input, const fs::path& output, convert_options options,
            std::function<void(const convert_progress&)> on_progress)
      : opt_(std::move(options)), on_progress_(std::move(on_progress)) {
    report_.input = normalized(input);
    report_.output = normalized(output);
  }

  convert_report run() {
    const auto start = std::chrono::steady_clock::now();
    if (opt_.format == output_format::gguf) {
      convert_to_gguf();
      report_.seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
      return std::move(report_);
    }
    const fs::path& in_path = report_.input;
    const fs::path& out_path = report_.output;
    std::error_code ec;
    if (!fs::exists(in_path, ec)) throw io_error(in_path.string() + ": no such file or folder");
    report_.folder = fs::is_directory(in_path, ec);
    refuse_same_place(in_path, out_path, report_.folder);
    refuse_foreign_output(out_path, report_.folder, opt_.force);
    const hf::checkpoint in(in_path);
    for (const std::string& note : in.notes()) report_.notes.push_back(note);
    if (const auto& declared = in.quantization())  // an online model's dense modules stay dense
      opt_.exclude.insert(opt_.exclude.end(), declared->modules_to_not_convert.begin(),
                          declared->modules_to_not_convert.end());
    plan(in);
    for (const st::reader& shard : in.shards()) {
      report_.bytes_in += shard.file_size();
      report_.tensors_in += shard.tensors().size();
      report_.model_files.push_back(fs::path(shard.source_name()).filename().string());
    }
    progress_.bytes_total = report_.bytes_in;
    progress_.tensors_total = report_.tensors_in;

    if (!report_.folder) {
      convert_file(in, in.shards().front(), out_path);
      verify(out_path);
    } else {
      convert_folder(in);
    }
    report_.seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
    return std::move(report_);
  }

 private:
  bool offline() const { return opt_.mode == hf::quantization_mode::offline; }
  bool units() const { return opt_.weight_scales != weight_scaling::per_tensor; }
  bool base3() const { return opt_.storage == weight_storage::base3; }

  void check_cancel() const {
    if (opt_.cancelled && opt_.cancelled())
      throw io_error("conversion cancelled; nothing was written to " + report_.output.string());
  }

  void tick(std::uint64_t bytes, const converted_layer* layer = nullptr) {
    progress_.bytes_done += bytes;
    ++progress_.tensors_done;
    progress_.layer = layer;
    if (on_progress_) on_progress_(progress_);
    check_cancel();
  }

  bool converts(const st::tensor_info& t) const {
    return is_linear_weight(t) && std::none_of(opt_.exclude.begin(), opt_.exclude.end(), [&](const std::string& rule) {
             return t.name.find(rule) != std::string::npos;
           });
  }

  /// Decides every layer from the headers alone; refuses converted input and settings transformers
  /// would misread.
  void plan(const hf::checkpoint& in) {
    // Latent weights declared for AutoBitLinear's online mode (microsoft/bitnet-b1.58-2B-4T-bf16) are
    // what we convert from; any other declaration means the weights are already quantized.
    if (const auto& declared = in.quantization();
        declared && !(declared->quant_method == "bitnet" && declared->mode == hf::quantization_mode::online))
      throw io_error(in.quantization_source() + " declares a quantization_config (quant_method \"" +
                     declared->quant_method + "\"" +
                     (declared->quant_method == "bitnet" ? ", quantization_mode \"offline\"" : "") +
                     "): the model is already quantized" +
                     (declared->quant_method == "bitnet" ? " (converted by bitnet-convert?)" : "") +
                     "; convert the dense model instead");
    hf::quantization_config& config = report_.config;
    config.linear_class = offline() ? opt_.scale_convention : hf::scale_convention::autobitlinear;
    config.mode = opt_.mode;
    config.weight_scales = opt_.weight_scales;
    config.group_size = opt_.group_size;
    config.activation_scales = opt_.activation_scales;
    config.storage = opt_.storage;
    if (in.folded())
      report_.notes.push_back(in.folded()->source + ": the rotation it declares is applied to the converted layers "
                              "it folds (bitnet_rotation); the file is copied, so tensors kept dense stay as it "
                              "describes them");
    std::vector<std::string> converted;
    std::set<std::string> kept;
    for (const std::string& rule : opt_.exclude) report_.exclude_matches.push_back({rule, {}});
    for (const st::tensor_info* t : in.tensors()) {
      if (t->name.ends_with(".weight_scale")) {
        const std::string layer = module_of(t->name);
        const st::tensor_info* weight = in.find(layer + ".weight");
        if (weight && weight->type == st::dtype::U8)
          throw io_error(in.source_name() + ": " + layer + " is a packed BitNet layer (U8 weight + weight_scale): "
                         "the model is already converted; convert the dense model instead");
      }
      if (!is_linear_weight(*t)) {
        if (t->name.size() > 7 && t->name.ends_with(".weight") && t->shape.size() == 2 && st::is_floating(t->type))
          kept.insert(module_of(t->name));  // an F64 matrix, say: copied, and transformers must keep it too
        continue;
      }
      for (auto& [rule, matches] : report_.exclude_matches)
        if (t->name.find(rule) != std::string::npos) matches.push_back(module_of(t->name));
      if (!converts(*t)) {
        kept.insert(module_of(t->name));
        continue;
      }
      const std::string module = module_of(t->name);
      converted.push_back(module);
      if (offline() && in.folded_role(t->name) == "fold-before-matmul") {
        (void)in.folded_rotation(t->name, Index(t->shape[1]));  // refused now if it cannot be built
        if (!config.rotation) config.rotation = hf::rotation_declaration{in.folded()->block_size, {}};
        config.rotation->layers.push_back(module);
      } else if (!in.folded_role(t->name).empty()) {
        throw io_error(in.folded()->source + ": declares the linear weight \"" + t->name + "\" " +
                       std::string(in.folded_role(t->name)) + ", which a converted layer cannot apply");
      }
      if (base3() && t->shape[1] % hf::base3_values_per_byte != 0) config.in_features[module] = Index(t->shape[1]);
      if (offline() && !base3() && t->shape[0] % 4 != 0) {
        config.out_features[module] = Index(t->shape[0]);
        report_.notes.push_back("warning: " + module + ": out_features " + std::to_string(t->shape[0]) +
                                " is not a multiple of 4: transformers' BitLinear / AutoBitLinear cannot load this "
                                "layer (they size the packed rows as out_features // 4); bitnet loads it (the file "
                                "records out_features)");
      }
    }
    // A tied output head has no tensor of its own (tie_word_embeddings: BitNet 2B-4T, Llama 3.2 1B), yet
    // transformers builds an lm_head Linear that reads the embedding; a modules_to_not_convert list
    // replaces transformers' defaults (which would have kept it), so it must name lm_head itself.
    if (!in.contains("lm_head.weight") && ties_embeddings(in)) {
      kept.insert("lm_head");
      report_.notes.push_back("lm_head has no tensor (tied to the embedding): listed in modules_to_not_convert so that "
                              "transformers keeps it dense");
    }
    config.modules_to_not_convert.assign(kept.begin(), kept.end());
    if (config.rotation) std::sort(config.rotation->layers.begin(), config.rotation->layers.end());  // as files read back
    if (offline())
      for (const std::string& layer : converted)
        if (transformers_keeps_dense(layer, config.modules_to_not_convert))
          throw io_error("the converted layer \"" + layer + "\" matches a kept-dense module of modules_to_not_convert (" +
                         nlohmann::json(config.modules_to_not_convert).dump() +
                         "): transformers (substring, prefix or suffix rules) would leave it dense and fail to load "
                         "its packed weight; exclude it as well");
  }

  /// Whether transformers would build an lm_head tied to the embedding: config.json's
  /// tie_word_embeddings (true when absent, PretrainedConfig's default); without a config.json,
  /// whether there is an embedding table at all.
  static bool ties_embeddings(const hf::checkpoint& in) {
    if (in.config_path()) {
      const ordered_json config = read_json(*in.config_path());
      const auto found = config.is_object() ? config.find("tie_word_embeddings") : config.end();
      return found == config.end() || !found->is_boolean() || found->get<bool>();
    }
    const auto tensors = in.tensors();
    return std::any_of(tensors.begin(), tensors.end(),
                       [](const st::tensor_info* t) { return t->name.find("embed_tokens") != std::string::npos; });
  }

  /// Converts (or, online, checks and copies) the tensors of one file of `model` into `output`.
  void convert_file(const hf::checkpoint& model, const st::reader& in, const fs::path& output) {
    std::vector<st::tensor_spec> specs;
    for (const st::tensor_info& t : in.tensors()) {
      if (offline() && converts(t))
        declare_layer(model, specs, t);
      else if (scaled_bias(model, t))
        specs.push_back({t.name, st::dtype::F32, t.shape});
      else
        specs.push_back({t.name, t.type, t.shape});
    }
    std::map<std::string, std::string> metadata(in.metadata().begin(), in.metadata().end());
    metadata.insert_or_assign(std::string(hf::metadata_key), hf::to_json(report_.config));
    metadata.insert_or_assign(std::string(converter_metadata_key), "bitnet-convert");
    const std::string shard = output.filename().string();
    st::writer out(output, std::move(specs), std::move(metadata));
    for (const st::tensor_info& t : in.tensors()) {
      if (offline() && converts(t)) {
        convert_layer(model, in, t, out, shard);
      } else if (scaled_bias(model, t)) {
        // (x.q + b s) * m = x.q m + b: AutoBitLinear's bias times its weight scale is the layer's bias.
        const std::string module = module_of(t.name);
        const Vector<float> bias = read_bias(model, module, Index(model.info(module + ".weight").shape[0]));
        out.write(t.name, Vector<float>(bias * scale_of(model, module)));
        tick(t.byte_size());
      } else {
        if (converts(t)) require_finite(in.read_matrix<float>(t.name), in, t.name);  // online: latent weights
        out.copy_tensor(t.name, in, t.name);
        copies_[t.name] = fingerprint_of(in, t.name);
        report_.copied_tensors.push_back(t.name);
        tick(t.byte_size());
      }
    }
    out.finish();
  }

  /// The tensors of the converted layer of weight `t`: packed codes, its scale (one, or [out, groups]),
  /// its rotation's signs when the folder folds it.
  void declare_layer(const hf::checkpoint& model, std::vector<st::tensor_spec>& specs, const st::tensor_info& t) const {
    const std::string module = module_of(t.name);
    const Index out = Index(t.shape[0]), in = Index(t.shape[1]);
    hf::declare_packed_layer(specs, module, out, in, false, opt_.scale_dtype, st::dtype::F32, opt_.storage);
    if (units())
      specs[specs.size() - 1].shape = {std::uint64_t(out), std::uint64_t(bitnet::detail::unit_count(
                                                               in, bitnet::detail::unit_columns(opt_.weight_scales,
                                                                                                opt_.group_size, in)))};
    if (model.folded_role(t.name) == "fold-before-matmul")
      specs.push_back({module + std::string(hf::rotation_signs_suffix), st::dtype::I8, {std::uint64_t(in)}});
  }

  /// The bias of a converted layer in the autobitlinear convention (stored as b * s, in F32);
  /// the bitlinear convention stores b itself (a byte-for-byte copy).
  bool scaled_bias(const hf::checkpoint& model, const st::tensor_info& t) const {
    if (!offline() || units() || opt_.scale_convention != hf::scale_convention::autobitlinear || !t.name.ends_with(".bias"))
      return false;  // unit layers store the bias as it is added
    const st::tensor_info* weight = model.find(module_of(t.name) + ".weight");
    return weight && converts(*weight);
  }

  std::optional<Vector<float>> read_bias_if_any(const hf::checkpoint& model, const std::string& module, Index out) const {
    if (!model.contains(module + ".bias")) return std::nullopt;
    return read_bias(model, module, out);
  }

  Vector<float> read_bias(const hf::checkpoint& model, const std::string& module, Index out) const {
    const std::string name = module + ".bias";
    const st::tensor_info& info = model.info(name);
    if (info.shape.size() != 1 || info.shape[0] != std::uint64_t(out))
      throw shape_error(model.shard_of(name).source_name() + ": " + name + " has shape " +
                        safetensors::detail::shape_text(info.shape) + ", the layer has " + std::to_string(out) +
                        " outputs");
    Vector<float> bias = model.read_vector<float>(name);
    for (Index i = 0; i < bias.size(); ++i)
      if (!std::isfinite(bias(i)))
        throw value_error(model.shard_of(name).source_name() + ": tensor \"" + name + "\": non-finite value at " +
                          std::to_string(i) + "; nothing was written");
    return bias;
  }

  /// A layer's weight_scale in its convention (exact: as float), as stored (scale_dtype), and the s
  /// the stored value stands for, as hf::to_bit_linear computes it.
  struct layer_scale {
    float exact, stored, scale;
  };
  layer_scale stored_scale(const Matrix<float>& w, const std::string& module, float quantized_scale) const {
    const bool autobitlinear = opt_.scale_convention == hf::scale_convention::autobitlinear;
    const float mean = std::max(static_cast<float>(bitnet::detail::mean_abs(w)), scale_floor<float>);
    const float exact = autobitlinear ? mean : quantized_scale;
    const float stored = stored_value(exact, opt_.scale_dtype, module);
    return {exact, stored, autobitlinear ? 1.0f / stored : stored};
  }

  /// s of a converted layer: from its conversion, or (a bias in a shard before its weight's) from the weight.
  float scale_of(const hf::checkpoint& model, const std::string& module) {
    if (const auto found = scales_.find(module); found != scales_.end()) return found->second;
    const Matrix<float> w = model.read_matrix<float>(module + ".weight");
    require_finite(w, model.shard_of(module + ".weight"), module + ".weight");
    const float scale = stored_scale(w, module, quantize_weights(w).scale).scale;
    scales_.emplace(module, scale);
    return scale;
  }

  void convert_layer(const hf::checkpoint& model, const st::reader& in, const st::tensor_info& t, st::writer& out,
                     const std::string& shard) {
    const std::string module = module_of(t.name);
    const Matrix<float> w = in.read_matrix<float>(t.name);
    require_finite(w, in, t.name);
    const std::optional<Vector<float>> bias = read_bias_if_any(model, module, w.rows());
    if (units() || model.folded_role(t.name) == "fold-before-matmul")
      return convert_unit_layer(model, in, t, w, bias, out, shard);
    const auto q = quantize_weights(w);
    const auto [exact, stored, scale] = stored_scale(w, module, q.scale);
    scales_.emplace(module, scale);
    double error2 = 0, norm2 = 0;
    Index zeros = 0;
    for (Index i = 0; i < w.size(); ++i) {
      const double v = w.data()[i], r = double(q.values.data()[i]) / double(scale);
      error2 += (v - r) * (v - r);
      norm2 += v * v;
      zeros += q.values.data()[i] == 0;
    }
    hf::packed_layer<float> packed{base3() ? hf::pack_weights_base3(q.values) : hf::pack_weights(q.values), w.rows(),
                                   stored, std::nullopt, opt_.scale_convention};
    packed.storage = opt_.storage;
    packed.in_features = w.cols();
    hf::write_packed_layer(out, module, packed);
    layer_record record;
    record.layer = {module, shard, w.rows(), w.cols(), double(stored), double(stored) / double(exact) - 1,
                    double(zeros) / double(w.size()), norm2 > 0 ? std::sqrt(error2 / norm2) : 0.0, bias.has_value()};
    record.stored_scale = stored;
    fingerprint f;
    f.add(std::as_bytes(std::span(q.values.data(), std::size_t(q.values.size()))));
    record.codes_fingerprint = f.value;
    // The source layer with the scale as stored: what the written layer must compute.
    record.probe.seed = std::uint32_t(records_.size() + 1);
    record.probe.expected =
        BitLinear<float>::from_ternary(q.values, scale, bias).forward(probe_input(record.probe.seed, w.cols()));
    records_.push_back(std::move(record));
    report_.layers.push_back(records_.back().layer);
    tick(t.byte_size(), &report_.layers.back());
  }

  /// A layer with unit scales or a rotation: quantized per unit, or imported exactly (checked:
  /// codes x scales == w bit for bit), written with hf::to_packed.
  void convert_unit_layer(const hf::checkpoint& model, const st::reader& in, const st::tensor_info& t,
                          const Matrix<float>& w, const std::optional<Vector<float>>& bias, st::writer& out,
                          const std::string& shard) {
    const std::string module = module_of(t.name);
    bitlinear_options options;
    options.weight_scales = opt_.weight_scales;
    options.group_size = opt_.group_size;
    options.activation_scales = opt_.activation_scales;
    options.rotation = model.folded_rotation(t.name, w.cols());
    const bool exact = opt_.weights == ternary_import::exact;
    const BitLinear<float> layer = [&] {
      try {
        if (exact) return BitLinear<float>::from_exact_ternary(w, bias, options, module);
        BitLinear<float> quantized(w, bias, options);
        quantized.release_latent_weights();
        return quantized;
      } catch (const value_error& e) {
        throw value_error(in.source_name() + ": tensor \"" + t.name + "\": " + e.what() + "; nothing was written");
      }
    }();
    const Matrix<float> dequantized = layer.dequantized_weight();
    if (exact && !(dequantized == w))  // from_exact_ternary promises it; the converter proves it
      throw value_error(in.source_name() + ": tensor \"" + t.name + "\": the exact import does not reproduce the "
                        "weights; nothing was written");
    hf::packed_layer<float> packed = hf::to_packed(layer, opt_.scale_convention, opt_.storage);
    packed.bias.reset();  // the bias tensor is written where the file has it (convert_file)
    hf::write_packed_layer(out, module, packed);
    double error2 = 0, norm2 = 0;
    Index zeros = 0;
    const Matrix<std::int8_t> codes = layer.ternary_weight();
    for (Index i = 0; i < w.size(); ++i) {
      const double v = w.data()[i], r = dequantized.data()[i];
      error2 += (v - r) * (v - r);
      norm2 += v * v;
      zeros += codes.data()[i] == 0;
    }
    layer_record record;
    double mean_scale = 0;
    if (units()) mean_scale = double(packed.unit_scales.cast<double>().mean());
    else mean_scale = double(packed.weight_scale);
    record.layer = {module, shard, w.rows(), w.cols(), mean_scale, 0.0, double(zeros) / double(w.size()),
                    norm2 > 0 ? std::sqrt(error2 / norm2) : 0.0, bias.has_value()};
    record.stored_scale = units() ? 0.0f : packed.weight_scale;
    record.codes_fingerprint = fingerprint_values(codes.data(), codes.size());
    if (units()) record.unit_scales_fingerprint = fingerprint_values(packed.unit_scales.data(), packed.unit_scales.size());
    else scales_.emplace(module, layer.weight_scale());
    record.rotation = options.rotation;
    record.probe.seed = std::uint32_t(records_.size() + 1);
    record.probe.expected = layer.forward(probe_input(record.probe.seed, w.cols()));
    records_.push_back(std::move(record));
    report_.layers.push_back(records_.back().layer);
    tick(t.byte_size(), &report_.layers.back());
  }

  /// Reopens the output (full validation, index and config.json included) and checks it: the declared
  /// quantization_config is the one used, every converted layer unpacks to the computed codes and
  /// scale and computes the source layer's outputs (bias included) from what any reader finds in the
  /// files, every copied tensor is byte-identical.
  void verify(const fs::path& output) {
    const hf::checkpoint check(output);
    report_.bytes_out = 0;
    for (const st::reader& shard : check.shards()) report_.bytes_out += shard.file_size();
    const auto& declared = check.quantization();
    if (!declared || hf::to_json(*declared) != hf::to_json(report_.config))
      throw io_error(output.string() + ": verification failed: the quantization_config read back differs");
    for (const layer_record& record : records_) {
      const converted_layer& layer = record.layer;
      // The convention as any reader finds it: declared by the files, never passed in.
      const hf::packed_layer<float> packed = hf::read_packed_layer<float>(check, layer.name);
      const Matrix<std::int8_t> codes = hf::unpack_codes(packed);
      fingerprint f;
      f.add(std::as_bytes(std::span(codes.data(), std::size_t(codes.size()))));
      const bool scales_differ =
          packed.weight_scales != report_.config.weight_scales ||
          (packed.weight_scales == weight_scaling::per_tensor
               ? packed.weight_scale != record.stored_scale
               : fingerprint_values(packed.unit_scales.data(), packed.unit_scales.size()) != record.unit_scales_fingerprint);
      if (f.value != record.codes_fingerprint || scales_differ || packed.rotation != record.rotation ||
          codes.cols() != layer.in_features || packed.out_features != layer.out_features || packed.storage != opt_.storage ||
          packed.convention != *report_.config.linear_class || packed.bias.has_value() != layer.has_bias)
        throw io_error(output.string() + ": verification failed for layer " + layer.name + ": codes, scale or shape differ");
      const BitLinear<float> loaded = hf::to_bit_linear(packed);
      const Matrix<float> y = loaded.forward(probe_input(record.probe.seed, layer.in_features));
      // Only the bias may round (autobitlinear stores b * s and reads it back times m: two roundings),
      // and the output's sum with it; a bias stored in the wrong convention is off by |b| (1 - m).
      const Matrix<float>& expected = record.probe.expected;
      constexpr float eps = std::numeric_limits<float>::epsilon();
      for (Index i = 0; i < y.size(); ++i) {
        const Index column = i % layer.out_features;
        const float bias = loaded.bias() ? std::fabs((*loaded.bias())(column)) : 0.0f;
        const float bound = 4 * eps * (std::fabs(expected.data()[i]) + bias);
        if (!(std::fabs(y.data()[i] - expected.data()[i]) <= bound))
          throw io_error(output.string() + ": verification failed for layer " + layer.name + ": output " +
                         std::to_string(i % layer.out_features) + " is " + std::to_string(y.data()[i]) +
                         " as the file is read, " + std::to_string(expected.data()[i]) + " from the source" +
                         (layer.has_bias ? " (bias included)" : ""));
      }
    }
    for (const auto& [name, expected] : copies_)
      if (fingerprint_of(check.shard_of(name), name) != expected)
        throw io_error(output.string() + ": verification failed for tensor " + name);
  }

  // -------------------------------------------------------------------------------------------
  // GGUF output: one file, arch "llama" (llama.cpp's loader; convert_hf_to_gguf.py LlamaModel) or
  // "bitnet-25" (ik_llama.cpp / bitnet.cpp: BitNet b1.58 2B-4T's graph)

  /// One tensor of the GGUF file, decided from the headers before anything is written.
  struct gguf_planned {
    const st::tensor_info* source = nullptr;
    std::string gguf_name;
    Index rows = 0, cols = 0;  // as the arch needs it (a norm: 1 x n)
    bool norm = false, ternary = false;
    bool packed = false;       // ternary already: a packed BitNet layer (U8 codes + weight_scale), copied exactly
    Index rope_heads = 0;      // q / k: rows permuted within each of these heads (llama's rope); else 0
    gguf::tensor_type type = gguf::tensor_type::F32;
  };

  /// What the verification compares the file with.
  struct gguf_record {
    std::size_t planned = 0;
    std::uint64_t fingerprint = 0;  // ternary: the codes as written (rows permuted); float: the values as stored
    float d = 0;                    // ternary: the block scale every block must hold
    double requested_d = 0;         // ternary: 1 / s in double
    probe_record probe;             // ternary: the source layer's outputs (rows in source order)
  };

  /// A positive count from config.json, or `fallback` (LlamaConfig's default) when it is absent.
  static std::uint32_t config_count(const ordered_json& config, const fs::path& file, const char* key,
                                    std::optional<std::uint32_t> fallback = std::nullopt) {
    const auto it = config.find(key);
    if (it == config.end() || it->is_null()) {
      if (fallback) return *fallback;
      throw io_error(file.string() + ": \"" + key + "\" is missing (the GGUF arch needs it); nothing was written");
    }
    if (!it->is_number_integer() || it->get<std::int64_t>() <= 0 ||
        it->get<std::int64_t>() > std::int64_t(std::numeric_limits<std::uint32_t>::max()))
      throw io_error(file.string() + ": \"" + key + "\" must be a positive integer below 2^32, got " + it->dump());
    return std::uint32_t(it->get<std::int64_t>());
  }

  static float config_real(const ordered_json& config, const fs::path& file, const char* key, float fallback) {
    const auto it = config.find(key);
    if (it == config.end() || it->is_null()) return fallback;
    if (!it->is_number() || !std::isfinite(it->get<double>()) || !(it->get<double>() > 0))
      throw io_error(file.string() + ": \"" + key + "\" must be a finite number > 0, got " + it->dump());
    return float(it->get<double>());
  }

  /// The hyperparameters of a Llama-architecture config.json; refuses what arch "llama" as written
  /// here cannot represent (the BitNet architecture, rope scaling, biases, another activation or head size).
  gguf::llama_hparams llama_hparams_of(const fs::path& file) {
    const ordered_json config = read_json(file);
    if (!config.is_object()) throw io_error(file.string() + ": not a JSON object");
    std::vector<std::string> architectures;
    if (const auto it = config.find("architectures"); it != config.end() && it->is_array())
      for (const auto& a : *it)
        if (a.is_string()) architectures.push_back(a.get<std::string>());
    const auto text = [&](const char* key) {
      const auto it = config.find(key);
      return it != config.end() && it->is_string() ? it->get<std::string>() : std::string();
    };
    const std::string model_type = text("model_type");
    const auto has = [&](const char* name) {
      return std::find(architectures.begin(), architectures.end(), name) != architectures.end();
    };
    const bool bitnet = has("BitNetForCausalLM") || (architectures.empty() && model_type == "bitnet");
    if (bitnet && !(opt_.gguf_arch && gguf::is_bitnet_arch(*opt_.gguf_arch)))
      throw io_error(file.string() + ": a BitNet-architecture model (BitNetForCausalLM: attn_sub_norm / ffn_sub_norm, "
                     "relu2): the engines name its GGUF arch differently (mainline llama.cpp \"bitnet\", ik_llama.cpp "
                     "and bitnet.cpp \"bitnet-b1.58\" or \"bitnet-25\"); choose the target: --gguf-arch bitnet-b1.58 "
                     "(convert_options::gguf_arch, with I2_S) writes it for bitnet.cpp / ik_llama.cpp; mainline's "
                     "\"bitnet\" is not written; nothing was written");
    if (!bitnet && opt_.gguf_arch && gguf::is_bitnet_arch(*opt_.gguf_arch))
      throw io_error(file.string() + ": gguf_arch " + std::string(gguf::model_arch_name(*opt_.gguf_arch)) +
                     " is for BitNet-architecture folders (BitNetForCausalLM); "
                     "this one is not; nothing was written");
    if (!bitnet && !has("LlamaForCausalLM") && !(architectures.empty() && model_type == "llama"))
      throw io_error(file.string() + ": GGUF output supports Llama-architecture folders (\"architectures\": "
                     "[\"LlamaForCausalLM\"]); this one declares " +
                     (architectures.empty() ? "model_type \"" + model_type + "\"" : "\"" + architectures.front() + "\"") +
                     "; nothing was written");
    std::optional<gguf::llama3_rope_scaling> llama3_rope;
    if (const auto it = config.find("rope_scaling"); it != config.end() && !it->is_null()) {
      const auto kind = [&](const char* key) {
        const auto k = it->is_object() ? it->find(key) : it->end();
        return k != it->end() && k->is_string() ? k->get<std::string>() : std::string();
      };
      const std::string type = kind("rope_type").empty() ? kind("type") : kind("rope_type");
      if (bitnet || type != "llama3")
        throw io_error(file.string() + ": \"rope_scaling\" " + it->dump() + ": bitnet-convert writes only Llama 3.x's "
                       "(rope_type \"llama3\", arch llama: a rope_freqs tensor); the engine would need other keys for "
                       "this one; nothing was written");
      const auto number = [&](const char* key) {
        const auto k = it->find(key);
        if (k == it->end() || !k->is_number() || !std::isfinite(k->get<double>()) || !(k->get<double>() > 0))
          throw io_error(file.string() + ": \"rope_scaling\": \"" + key + "\" must be a finite number > 0 (llama3 "
                         "rope scaling needs factor, low_freq_factor, high_freq_factor and "
                         "original_max_position_embeddings), got " + (k == it->end() ? "nothing" : k->dump()) +
                         "; nothing was written");
        return k->get<double>();
      };
      llama3_rope = gguf::llama3_rope_scaling{number("factor"), number("low_freq_factor"), number("high_freq_factor"),
                                              number("original_max_position_embeddings")};
    }
    for (const char* key : {"attention_bias", "mlp_bias"})
      if (const auto it = config.find(key); it != config.end() && it->is_boolean() && it->get<bool>())
        throw io_error(file.string() + ": \"" + key + "\": true: the GGUF archs as written here have no biases; "
                       "nothing was written");
    const std::string expected_act = bitnet ? "relu2" : "silu";
    if (const std::string act = text("hidden_act"); (bitnet || !act.empty()) && act != expected_act)
      throw io_error(file.string() + ": \"hidden_act\" \"" + act + "\": arch " +
                     std::string(bitnet ? gguf::model_arch_name(*opt_.gguf_arch) : "llama") +
                     " computes " + (bitnet ? "relu^2 (\"relu2\")" : "SiLU") + "; nothing was written");
    gguf::llama_hparams h;
    h.arch = bitnet ? *opt_.gguf_arch : gguf::model_arch::llama;
    h.embedding_length = config_count(config, file, "hidden_size");
    h.block_count = config_count(config, file, "num_hidden_layers");
    h.feed_forward_length = config_count(config, file, "intermediate_size");
    h.head_count = config_count(config, file, "num_attention_heads");
    h.head_count_kv = config_count(config, file, "num_key_value_heads", h.head_count);
    h.vocab_size = config_count(config, file, "vocab_size");
    h.context_length = config_count(config, file, "max_position_embeddings", 2048u);
    h.rms_norm_eps = config_real(config, file, "rms_norm_eps", 1e-6f);
    h.rope_freq_base = config_real(config, file, "rope_theta", 10000.0f);
    h.name = report_.input.filename().string();
    if (const auto it = config.find("head_dim"); it != config.end() && !it->is_null() &&
                                                 h.embedding_length % h.head_count == 0 &&
                                                 !(it->is_number_integer() && it->get<std::int64_t>() == h.head_dim()))
      throw io_error(file.string() + ": \"head_dim\" " + it->dump() + " is not hidden_size / num_attention_heads (" +
                     std::to_string(h.head_dim()) + "): the GGUF arch as written here cannot say so; nothing was written");
    try {
      (void)gguf::llama_metadata(h);  // its checks (divisibility, even head size), named after the file
      rope_factors_ = llama3_rope ? gguf::llama3_rope_factors(h, *llama3_rope) : std::vector<float>{};
    } catch (const value_error& e) {
      throw io_error(file.string() + ": " + e.what());
    }
    if (llama3_rope)
      report_.notes.push_back("rope_scaling llama3 (factor " + std::to_string(llama3_rope->factor) +
                              "): written as the rope_freqs tensor llama.cpp reads (" +
                              std::to_string(rope_factors_.size()) + " factors)");
    return h;
  }

  /// Every tensor of the GGUF file, from the headers alone: names, shapes, types, which are ternary.
  std::vector<gguf_planned> plan_gguf(const hf::checkpoint& in, const gguf::llama_hparams& h) {
    // A packed BitNet folder (quant_method "bitnet", offline: microsoft/bitnet-b1.58-2B-4T as
    // published) is ternary already: its layers go into the file as they are, codes and scale exact.
    const auto& declared = in.quantization();
    const bool packed_input = declared && declared->quant_method == "bitnet" && declared->mode == hf::quantization_mode::offline;
    if (declared && !packed_input && !(declared->quant_method == "bitnet" && declared->mode == hf::quantization_mode::online))
      throw io_error(in.quantization_source() + " declares a quantization_config (quant_method \"" +
                     declared->quant_method + "\"): the model is already quantized; convert the dense model instead");
    const std::string arch(gguf::model_arch_name(h.arch));
    const bool bitnet = gguf::is_bitnet_arch(h.arch);  // sub-norms; NEOX rope: q / k rows kept in order
    std::map<std::string, const st::tensor_info*> by_gguf_name;
    for (const st::tensor_info* t : in.tensors()) {
      if (t->name.ends_with("rotary_emb.inv_freq")) {  // recomputed by every engine from rope_theta
        report_.notes.push_back(t->name + " is not written (llama.cpp computes it from rope.freq_base)");
        continue;
      }
      if (packed_input && t->name.ends_with(".weight_scale")) continue;  // read with its packed layer
      const std::optional<std::string> name = gguf::llama_tensor_name(t->name, h.arch);
      if (!name)
        throw io_error(in.shard_of(t->name).source_name() + ": tensor \"" + t->name + "\" has no place in GGUF arch " +
                       arch + " (the engine would not read it" +
                       (t->name.ends_with(".bias") ? ": arch " + arch + " has no biases" : std::string()) +
                       "); nothing was written");
      by_gguf_name[*name] = t;
    }
    const auto hidden = Index(h.embedding_length), ff = Index(h.feed_forward_length), hd = Index(h.head_dim());
    const auto q_rows = Index(h.head_count) * hd, kv_rows = Index(h.head_count_kv) * hd;
    std::vector<gguf_planned> plan;
    const auto add = [&](std::string name, Index rows, Index cols, bool norm, Index rope_heads) {
      plan.push_back({nullptr, std::move(name), rows, cols, norm, false, false, rope_heads, gguf::tensor_type::F32});
    };
    if (!rope_factors_.empty()) add("rope_freqs.weight", 1, Index(rope_factors_.size()), true, 0);  // computed, no source
    add("token_embd.weight", Index(h.vocab_size), hidden, false, 0);
    for (std::uint32_t b = 0; b < h.block_count; ++b) {
      const std::string blk = "blk." + std::to_string(b) + ".";
      add(blk + "attn_norm.weight", 1, hidden, true, 0);
      add(blk + "attn_q.weight", q_rows, hidden, false, bitnet ? 0 : Index(h.head_count));
      add(blk + "attn_k.weight", kv_rows, hidden, false, bitnet ? 0 : Index(h.head_count_kv));
      add(blk + "attn_v.weight", kv_rows, hidden, false, 0);
      if (bitnet) add(blk + "attn_sub_norm.weight", 1, q_rows, true, 0);
      add(blk + "attn_output.weight", hidden, q_rows, false, 0);
      add(blk + "ffn_norm.weight", 1, hidden, true, 0);
      add(blk + "ffn_gate.weight", ff, hidden, false, 0);
      add(blk + "ffn_up.weight", ff, hidden, false, 0);
      if (bitnet) add(blk + "ffn_sub_norm.weight", 1, ff, true, 0);
      add(blk + "ffn_down.weight", hidden, ff, false, 0);
    }
    add("output_norm.weight", 1, hidden, true, 0);
    if (by_gguf_name.contains("output.weight")) add("output.weight", Index(h.vocab_size), hidden, false, 0);
    else report_.notes.push_back("no lm_head tensor: the engine uses token_embd as the output (tied embeddings)");
    for (const auto& entry : by_gguf_name)
      if (std::none_of(plan.begin(), plan.end(), [&](const gguf_planned& p) { return p.gguf_name == entry.first; }))
        throw io_error(in.shard_of(entry.second->name).source_name() + ": tensor \"" + entry.second->name +
                       "\": its layer is beyond num_hidden_layers " + std::to_string(h.block_count) +
                       "; nothing was written");

    const gguf::tensor_type ternary_type = opt_.gguf_ternary_type;
    for (gguf_planned& p : plan) {
      if (p.gguf_name == "rope_freqs.weight") continue;  // F32, from config.json
      const auto found = by_gguf_name.find(p.gguf_name);
      if (found == by_gguf_name.end())
        throw io_error(report_.input.string() + ": the model has no tensor for " + p.gguf_name + " (arch " + arch +
                       " needs it); nothing was written");
      const st::tensor_info& t = *found->second;
      p.source = &t;
      const std::string where = in.shard_of(t.name).source_name() + ": tensor \"" + t.name + "\"";
      if (packed_input && t.type == st::dtype::U8 && !p.norm && p.gguf_name != "token_embd.weight") {
        // Codes and shape are checked when the layer is read (hf::load_bit_linear); here what fits the file.
        const weight_storage storage = in.quantization() ? in.quantization()->storage : weight_storage::two_bit;
        if (t.shape != hf::packed_weight_shape(storage, p.rows, p.cols))
          throw shape_error(where + " has packed shape " + safetensors::detail::shape_text(t.shape) + ", config.json says " +
                            std::to_string(p.rows) + " x " + std::to_string(p.cols) + " weights; nothing was written");
        if (std::uint64_t(p.cols) % gguf::row_multiple(opt_.gguf_ternary_type) != 0)
          throw io_error(where + ": in_features " + std::to_string(p.cols) + " is not a multiple of " +
                         std::to_string(gguf::row_multiple(opt_.gguf_ternary_type)) + " (" +
                         std::string(gguf::tensor_type_name(opt_.gguf_ternary_type)) +
                         " blocks), and a packed layer has no float weights to fall back to; nothing was written");
        p.ternary = p.packed = true;
        p.type = opt_.gguf_ternary_type;
        continue;
      }
      if (t.type != st::dtype::F32 && t.type != st::dtype::F16 && t.type != st::dtype::BF16)
        throw io_error(where + " is " + std::string(st::dtype_name(t.type)) + ", not F32, F16 or BF16; nothing was written");
      const bool fits = p.norm ? t.shape.size() == 1 && t.shape[0] == std::uint64_t(p.cols)
                               : t.shape == std::vector<std::uint64_t>{std::uint64_t(p.rows), std::uint64_t(p.cols)};
      if (!fits)
        throw shape_error(where + " has shape " + safetensors::detail::shape_text(t.shape) + ", config.json says [" +
                          (p.norm ? "" : std::to_string(p.rows) + ", ") + std::to_string(p.cols) + "]; nothing was written");
      const bool linear = !p.norm && p.gguf_name != "token_embd.weight";
      if (!linear && converts(t))
        report_.notes.push_back(t.name + " is kept as floats (an embedding or norm is no linear layer)");
      p.ternary = linear && converts(t);
      if (p.ternary && std::uint64_t(p.cols) % gguf::row_multiple(ternary_type) != 0) {
        p.ternary = false;  // what llama-quantize does for such rows: fall back to floats, and say so
        report_.notes.push_back("warning: " + module_of(t.name) + ": in_features " + std::to_string(p.cols) +
                                " is not a multiple of " + std::to_string(gguf::row_multiple(ternary_type)) + " (" +
                                std::string(gguf::tensor_type_name(ternary_type)) + " blocks): kept as floats");
      }
      const gguf::tensor_type own = t.type == st::dtype::F32   ? gguf::tensor_type::F32
                                    : t.type == st::dtype::F16 ? gguf::tensor_type::F16
                                                               : gguf::tensor_type::BF16;
      p.type = p.ternary ? ternary_type : p.norm ? gguf::tensor_type::F32 : opt_.gguf_float_type.value_or(own);
    }
    return plan;
  }

  /// Writes one planned tensor and records what the file must give back.
  void write_gguf_tensor(const hf::checkpoint& in, std::size_t index, const gguf_planned& p, gguf::writer& out,
                         const std::string& file) {
    if (!p.source) {  // rope_freqs: computed from config.json
      const Matrix<float> m = Eigen::Map<const Matrix<float>>(rope_factors_.data(), 1, Index(rope_factors_.size()));
      out.write_floats(p.gguf_name, m);
      fingerprint f;
      f.add(std::as_bytes(std::span(m.data(), std::size_t(m.size()))));
      gguf_records_.push_back({index, f.value, 0, 0, {}});
      tick(0, nullptr);
      return;
    }
    const std::string& name = p.source->name;
    const st::reader& shard = in.shard_of(name);
    gguf_record record;
    record.planned = index;
    fingerprint f;
    if (p.packed) {
      const std::string module = module_of(name);
      const BitLinear<float> layer = hf::load_bit_linear<float>(in, module, p.rows);
      if (layer.bias()) throw io_error(shard.source_name() + ": " + module + " has a bias; the GGUF archs here take none");
      const Matrix<std::int8_t> source_codes = layer.ternary_weight();
      const float s = layer.weight_scale();
      const Matrix<std::int8_t> codes = p.rope_heads ? gguf::permute_rope_rows(source_codes, p.rope_heads) : source_codes;
      const gguf::scale_rounding rounding = out.write_bit_linear(p.gguf_name, BitLinear<float>::from_ternary(codes, s));
      f.add(std::as_bytes(std::span(codes.data(), std::size_t(codes.size()))));
      record.d = float(rounding.stored);
      record.requested_d = rounding.requested;
      record.probe.seed = std::uint32_t(index + 1);
      record.probe.expected = layer.forward(probe_input(record.probe.seed, p.cols));
      const Index zeros = Index((source_codes.array() == 0).count());
      report_.layers.push_back({module, file, p.rows, p.cols, rounding.stored, rounding.stored / rounding.requested - 1,
                                double(zeros) / double(source_codes.size()), 0.0, false, p.gguf_name});
    } else if (p.ternary) {
      const Matrix<float> w = in.read_matrix<float>(name);
      require_finite(w, shard, name);
      const auto q = quantize_weights(w);
      const Matrix<std::int8_t> codes = p.rope_heads ? gguf::permute_rope_rows(q.values, p.rope_heads) : q.values;
      const gguf::scale_rounding rounding = out.write_bit_linear(p.gguf_name, BitLinear<float>::from_ternary(codes, q.scale));
      double error2 = 0, norm2 = 0;
      Index zeros = 0;
      for (Index i = 0; i < w.size(); ++i) {
        const double v = w.data()[i], r = double(q.values.data()[i]) / double(q.scale);
        error2 += (v - r) * (v - r);
        norm2 += v * v;
        zeros += q.values.data()[i] == 0;
      }
      f.add(std::as_bytes(std::span(codes.data(), std::size_t(codes.size()))));
      record.d = float(rounding.stored);
      record.requested_d = rounding.requested;
      record.probe.seed = std::uint32_t(index + 1);
      record.probe.expected = BitLinear<float>::from_ternary(q.values, q.scale).forward(probe_input(record.probe.seed, p.cols));
      report_.layers.push_back({module_of(name), file, p.rows, p.cols, rounding.stored,
                                rounding.stored / rounding.requested - 1, double(zeros) / double(w.size()),
                                norm2 > 0 ? std::sqrt(error2 / norm2) : 0.0, false, p.gguf_name});
    } else {
      Matrix<float> m = p.norm ? Matrix<float>(in.read_vector<float>(name).transpose()) : in.read_matrix<float>(name);
      require_finite(m, shard, name);
      if (p.rope_heads) m = gguf::permute_rope_rows(m, p.rope_heads);
      out.write_floats(p.gguf_name, m);
      // The values the file must give back: each rounded to the stored type, as that type defines it.
      const float_format format = p.type == gguf::tensor_type::F16 ? binary16 : p.type == gguf::tensor_type::BF16 ? bfloat16 : binary32;
      for (Index i = 0; i < m.size(); ++i) m.data()[i] = static_cast<float>(*round_to_format(m.data()[i], format));
      f.add(std::as_bytes(std::span(m.data(), std::size_t(m.size()))));
      report_.copied_tensors.push_back(name);
    }
    record.fingerprint = f.value;
    gguf_records_.push_back(std::move(record));
    tick(p.source->byte_size(), p.ternary ? &report_.layers.back() : nullptr);
  }

  /// Reopens the file with bitnet's GGUF reader (full validation) and checks every tensor: type and
  /// sizes; ternary ones their codes, that every block holds the recorded d (within the format's
  /// rounding of 1 / s), and that the layer as read computes the source layer's outputs within that
  /// rounding; float ones their values, element for element.
  void verify_gguf(const fs::path& file, const std::vector<gguf_planned>& plan) {
    const gguf::reader check(file);
    const std::string what = report_.output.string() + ": verification failed";
    if (check.tensors().size() != plan.size() ||
        check.get<std::string>("general.architecture") != std::string(gguf::model_arch_name(gguf_arch_)) ||
        !check.find_value(converter_metadata_key))
      throw io_error(what + ": the header read back differs");
    for (const gguf::metadata_entry& e : tokenizer_) {
      const gguf::value* stored = check.find_value(e.key);
      if (!stored || !(*stored == e.val)) throw io_error(what + ": tokenizer entry " + e.key + " differs");
    }
    for (const gguf_record& record : gguf_records_) {
      const gguf_planned& p = plan[record.planned];
      const gguf::tensor_info& t = check.info(p.gguf_name);
      const std::vector<std::uint64_t> ne = p.norm ? std::vector<std::uint64_t>{std::uint64_t(p.cols)}
                                                   : std::vector<std::uint64_t>{std::uint64_t(p.cols), std::uint64_t(p.rows)};
      if (t.type != p.type || t.ne != ne) throw io_error(what + " for tensor " + p.gguf_name + ": type or sizes differ");
      fingerprint f;
      if (!p.ternary) {
        const Matrix<float> m = check.read_matrix<float>(p.gguf_name);
        f.add(std::as_bytes(std::span(m.data(), std::size_t(m.size()))));
        if (f.value != record.fingerprint) throw io_error(what + " for tensor " + p.gguf_name + ": values differ");
        continue;
      }
      const gguf::ternary_tensor stored = check.read_ternary(p.gguf_name);
      f.add(std::as_bytes(std::span(stored.codes.data(), std::size_t(stored.codes.size()))));
      if (f.value != record.fingerprint) throw io_error(what + " for layer " + p.gguf_name + ": codes differ");
      const double allowed = p.type == gguf::tensor_type::I2_S ? 0x1p-24 : 0x1p-11;  // half an ulp of float32 / fp16
      if (!(std::fabs(double(record.d) / record.requested_d - 1) <= allowed * (1 + 1e-9)))
        throw io_error(what + " for layer " + p.gguf_name + ": d differs from 1 / s by more than the format rounds");
      for (std::size_t b = 0; b < stored.scales.size(); ++b)
        if (stored.scales[b] != record.d)
          throw io_error(what + " for layer " + p.gguf_name + ": block " + std::to_string(b) + " holds another scale");
      const BitLinear<float> loaded = check.read_bit_linear<float>(p.gguf_name);
      const Matrix<float> y = loaded.forward(probe_input(record.probe.seed, p.cols));
      const Matrix<float>& expected = record.probe.expected;
      const double rounding = std::fabs(double(record.d) / record.requested_d - 1);
      const Index hd = p.rope_heads ? p.rows / p.rope_heads : 0;
      for (Index r = 0; r < y.rows(); ++r)
        for (Index c = 0; c < p.rows; ++c) {
          // Source row c is file row (head, a, b) -> head * hd + 2b + a when permuted for rope.
          const Index at = hd ? (c / hd) * hd + 2 * ((c % hd) % (hd / 2)) + (c % hd) / (hd / 2) : c;
          const double e = expected(r, c), got = y(r, at);
          if (!(std::fabs(got - e) <= (rounding + 8 * double(std::numeric_limits<float>::epsilon())) * std::fabs(e)))
            throw io_error(what + " for layer " + p.gguf_name + ": output " + std::to_string(c) + " is " +
                           std::to_string(got) + " as the file is read, " + std::to_string(e) + " from the source");
        }
    }
  }

  /// The tokenizer.* entries of the GGUF file `source`, checked: a tokenizer model is named, and
  /// the token list (when there is one) has as many tokens as the model's vocabulary.
  std::vector<gguf::metadata_entry> tokenizer_entries(const fs::path& source, const gguf::llama_hparams& h) {
    const gguf::reader file(source);
    std::vector<gguf::metadata_entry> entries;
    for (const gguf::metadata_entry& e : file.metadata())
      if (e.key.starts_with("tokenizer.")) entries.push_back(e);
    const auto model = file.get<std::string>("tokenizer.ggml.model");
    if (!model)
      throw io_error(source.string() + ": no tokenizer.ggml.model: not a GGUF tokenizer source; nothing was written");
    std::size_t tokens = 0;
    if (const gguf::value* list = file.find_value("tokenizer.ggml.tokens")) {
      const auto* a = std::get_if<gguf::array>(&list->data);
      if (!a || a->element_type() != gguf::value_type::string)
        throw io_error(source.string() + ": tokenizer.ggml.tokens is not an array of strings; nothing was written");
      tokens = a->size();
      if (tokens != h.vocab_size)
        throw io_error(source.string() + ": " + std::to_string(tokens) + " tokens, the model's vocab_size is " +
                       std::to_string(h.vocab_size) + " (llama.cpp sizes token_embd by the token list): not this "
                       "model's tokenizer; nothing was written");
    } else if (*model != "none" && *model != "no_vocab") {
      throw io_error(source.string() + ": tokenizer.ggml.model \"" + *model + "\" without tokenizer.ggml.tokens; "
                     "nothing was written");
    }
    const auto pre = file.get<std::string>("tokenizer.ggml.pre");
    report_.notes.push_back("tokenizer: " + std::to_string(entries.size()) + " tokenizer.* entries copied from " +
                            source.string() + " (model \"" + *model + "\"" + (pre ? ", pre \"" + *pre + "\"" : "") +
                            ", " + std::to_string(tokens) + " tokens)");
    return entries;
  }

  /// An existing OUT file may be replaced when it is an earlier GGUF output of convert_model, or with force.
  static void refuse_foreign_gguf(const fs::path& out, bool force) {
    std::error_code ec;
    if (!fs::exists(out, ec)) return;
    if (fs::is_directory(out, ec)) throw io_error(out.string() + " is a folder; GGUF output is one file");
    if (force) return;
    bool ours = false;
    try {
      ours = gguf::reader(out).find_value(converter_metadata_key) != nullptr;
    } catch (const error&) {
      ours = false;
    }
    if (!ours)
      throw io_error(out.string() + " exists and is not an earlier bitnet-convert output: refusing to replace it "
                     "(choose another OUT, remove it, or pass --force / convert_options::force)");
  }

  /// A model folder (config.json) -> one GGUF file at OUT: staged beside OUT, verified, renamed into place.
  void convert_to_gguf() {
    const fs::path& in_path = report_.input;
    const fs::path& out_path = report_.output;
    std::error_code ec;
    if (!fs::exists(in_path, ec)) throw io_error(in_path.string() + ": no such file or folder");
    report_.folder = fs::is_directory(in_path, ec);
    if (!report_.folder)
      throw io_error(in_path.string() + ": GGUF output needs the model's hyperparameters: give the model folder "
                     "(config.json and the safetensors files), not a single file");
    if (fs::is_directory(out_path, ec)) throw io_error(out_path.string() + " is a folder; GGUF output is one file");
    if (is_inside(fs::weakly_canonical(out_path), fs::weakly_canonical(in_path)))
      throw io_error(out_path.string() + " is inside the input folder " + in_path.string() +
                     ": refusing to write into the source; choose OUT outside it");
    if (!fs::is_directory(out_path.parent_path(), ec))
      throw io_error(out_path.parent_path().string() + ": no such folder for " + out_path.filename().string());
    refuse_foreign_gguf(out_path, opt_.force);
    const hf::checkpoint in(in_path);
    for (const std::string& note : in.notes()) report_.notes.push_back(note);
    if (!in.config_path())
      throw io_error(in_path.string() + " has no config.json: GGUF output needs the model's hyperparameters");
    const gguf::llama_hparams h = llama_hparams_of(*in.config_path());
    gguf_arch_ = h.arch;
    const std::vector<gguf_planned> plan = plan_gguf(in, h);
    for (const st::reader& shard : in.shards()) {
      report_.bytes_in += shard.file_size();
      report_.tensors_in += shard.tensors().size();
      report_.model_files.push_back(fs::path(shard.source_name()).filename().string());
    }
    progress_.tensors_total = plan.size();
    for (const gguf_planned& p : plan) progress_.bytes_total += p.source ? p.source->byte_size() : 0;

    std::vector<gguf::metadata_entry> metadata = gguf::llama_metadata(h);
    metadata.push_back({std::string(converter_metadata_key), std::string("bitnet-convert")});
    if (opt_.gguf_ternary_type == gguf::tensor_type::I2_S)
      report_.notes.push_back("I2_S: bitnet.cpp's type; ik_llama.cpp reads it but has no I2_S matrix product (its "
                              "outputs would be zeros): there, run `llama-quantize --allow-requantize OUT.gguf "
                              "OUT-iq2bn.gguf IQ2_BN` first (docs/gguf.md)");
    if (opt_.gguf_tokenizer_from) {
      tokenizer_ = tokenizer_entries(*opt_.gguf_tokenizer_from, h);
      metadata.insert(metadata.end(), tokenizer_.begin(), tokenizer_.end());
    } else {
      metadata.push_back({"tokenizer.ggml.model", std::string("none")});
      report_.notes.push_back(
          "tokenizer: not carried; the file declares tokenizer.ggml.model \"none\" (llama.cpp loads the model but "
          "cannot tokenize text); the engine needs tokenizer.ggml.model, .pre, .tokens, .token_type, .merges and "
          ".bos_token_id / .eos_token_id as llama.cpp's convert_hf_to_gguf.py writes them from tokenizer.json: "
          "write them with `convert_hf_to_gguf.py --vocab-only` and pass that file as the tokenizer source "
          "(--gguf-tokenizer-from / convert_options::gguf_tokenizer_from)");
    }
    std::vector<gguf::tensor_spec> specs;
    for (const gguf_planned& p : plan)
      specs.push_back({p.gguf_name, p.type,
                       p.norm ? std::vector<std::uint64_t>{std::uint64_t(p.cols)}
                              : std::vector<std::uint64_t>{std::uint64_t(p.cols), std::uint64_t(p.rows)}});

    const fs::path staging = new_staging_path(out_path);
    const remove_on_exit remove_unless_committed{staging};
    {
      gguf::writer out(staging, std::move(metadata), std::move(specs));  // its temporary: staging + ".tmp-N"
      const std::string file = out_path.filename().string();
      for (std::size_t i = 0; i < plan.size(); ++i) write_gguf_tensor(in, i, plan[i], out, file);
      out.finish();
    }
    verify_gguf(staging, plan);
    report_.bytes_out = fs::file_size(staging);
    fs::rename(staging, out_path);  // atomic, also over an earlier output
  }

  /// Removes a staging file or folder unless the final rename took it.
  struct remove_on_exit {
    fs::path path;
    ~remove_on_exit() {
      std::error_code ignored;
      fs::remove_all(path, ignored);
    }
  };

  /// Where an output is built before it is renamed onto `target`: `.NAME.bitnet-convert-<pid>-<n>`
  /// beside it; stale ones of runs that no longer exist are removed first.
  fs::path new_staging_path(const fs::path& target) {
    const fs::path parent = target.parent_path();
    const std::string stem = "." + target.filename().string() + ".bitnet-convert-";
    remove_stale_staging(parent, stem);
    std::random_device rd;
#if __has_include(<unistd.h>)
    const long pid = long(getpid());
#else
    const long pid = 0;
#endif
    return parent / (stem + std::to_string(pid) + "-" + std::to_string(rd()));
  }

  /// Removes what a killed run left beside OUT (".OUT.bitnet-convert-<pid>-<n>" folders or GGUF
  /// files, and their ".tmp-<m>", of a process that no longer runs).
  void remove_stale_staging(const fs::path& parent, const std::string& stem) {
    std::error_code ec;
    for (const auto& entry : fs::directory_iterator(parent, ec)) {
      const std::string name = entry.path().filename().string();
      if (!name.starts_with(stem)) continue;
      const std::string rest = name.substr(stem.size());
      const auto dash = rest.find('-');
      if (dash == std::string::npos || dash == 0) continue;
      long pid = 0;
      try {
        pid = std::stol(rest.substr(0, dash));
      } catch (const std::exception&) {
        continue;
      }
#if defined(__linux__)
      if (pid > 0 && (kill(pid_t(pid), 0) == 0 || errno != ESRCH)) continue;  // that run is alive
#endif
      std::error_code removed;
      fs::remove_all(entry.path(), removed);
      if (!removed) report_.notes.push_back("removed " + entry.path().string() + ", left by an interrupted run");
    }
  }

  /// Copies the folder files that are not the model, following links (a linked file becomes a
  /// regular file of OUT; a linked folder is copied as a folder; a loop or a dangling link is an error).
  void copy_other_files(const fs::path& from, const fs::path& to, const std::set<std::string>& model_files,
                        const fs::path& relative, std::set<fs::path>& visited) {
    std::vector<fs::directory_entry> entries;
    for (const fs::directory_entry& entry : fs::directory_iterator(from)) entries.push_back(entry);
    std::sort(entries.begin(), entries.end());
    for (const fs::directory_entry& entry : entries) {
      const std::string name = entry.path().filename().string();
      const fs::path rel = relative / name;
      if (relative.empty() && model_files.contains(name)) continue;
      if (relative.empty() && name == ".git") {
        report_.notes.push_back(".git (version control data) was not copied");
        continue;
      }
      std::error_code ec;
      const fs::file_status status = fs::status(entry.path(), ec);  // through links
      if (ec || !fs::exists(status))
        throw io_error(entry.path().string() + ": a link to " +
                       (fs::is_symlink(entry.symlink_status()) ? fs::read_symlink(entry.path()).string() : "nothing") +
                       ", which does not exist: cannot copy it; nothing was written");
      if (fs::is_directory(status)) {
        const fs::path real = fs::canonical(entry.path());
        if (!visited.insert(real).second)
          throw io_error(entry.path().string() + ": linked folders form a loop; nothing was written");
        fs::create_directory(to / rel);
        copy_other_files(entry.path(), to, model_files, rel, visited);
        visited.erase(real);
      } else if (fs::is_regular_file(status)) {
        fs::copy_file(entry.path(), to / rel);  // reads through a link, writes a regular file
        report_.copied_files.push_back(rel.generic_string());
        if (relative.empty() && entry.path().extension() == ".safetensors")
          report_.notes.push_back(name + " is not part of the model (" + std::string(hf::index_file_name) +
                                  " does not list it): copied byte for byte, not converted");
        check_cancel();
      } else {
        throw io_error(entry.path().string() + ": not a regular file or folder; nothing was written");
      }
    }
  }

  void convert_folder(const hf::checkpoint& in) {
    const fs::path& target = report_.output;
    const fs::path staging = new_staging_path(target);
    const remove_on_exit remove_unless_committed{staging};
    fs::create_directories(staging);

    std::set<std::string> model_files{std::string(hf::config_file_name)};
    if (in.uses_index()) model_files.insert(std::string(hf::index_file_name));
    for (const st::reader& shard : in.shards()) {
      const std::string name = fs::path(shard.source_name()).filename().string();
      model_files.insert(name);
      convert_file(in, shard, staging / name);
    }
    std::set<fs::path> visited{fs::canonical(report_.input)};
    copy_other_files(report_.input, staging, model_files, {}, visited);

    const ordered_json block = ordered_json::parse(hf::to_json(report_.config));
    if (in.config_path()) {  // every key kept, quantization_config added
      ordered_json config = read_json(*in.config_path());
      if (!config.is_object()) throw io_error(in.config_path()->string() + ": not a JSON object");
      config["quantization_config"] = block;
      write_text(staging / hf::config_file_name, config.dump(2) + "\n");
    } else {
      report_.notes.push_back("warning: " + report_.input.string() +
                              " has no config.json; transformers needs one, with \"quantization_config\": " +
                              hf::to_json(report_.config));
    }
    if (in.uses_index()) write_index(in, staging);
    verify(staging);
    commit_folder(staging, target);
  }

  /// The input index with the converted tensor names: exactly what the input lists, in the same
  /// shards (unlisted files in the folder are not part of the model).
  void write_index(const hf::checkpoint& in, const fs::path& staging) {
    ordered_json index = read_json(report_.input / hf::index_file_name);
    if (!index.is_object()) throw io_error((report_.input / hf::index_file_name).string() + ": not a JSON object");
    std::map<std::string, std::string> weight_map;
    std::uint64_t total_size = 0;
    for (const st::reader& shard : in.shards()) {
      const std::string name = fs::path(shard.source_name()).filename().string();
      const st::reader written(staging / name);
      for (const st::tensor_info& t : written.tensors()) {
        weight_map[t.name] = name;
        total_size += t.byte_size();
      }
    }
    index["metadata"]["total_size"] = total_size;
    index["weight_map"] = weight_map;
    write_text(staging / hf::index_file_name, index.dump(2) + "\n");
  }

  /// Moves the finished folder to `target`: a rename, or an atomic exchange with an existing target
  /// (whose old contents are then removed with the staging folder).
  static void commit_folder(const fs::path& staging, const fs::path& target) {
    std::error_code ec;
    if (!fs::exists(target, ec)) {
      fs::rename(staging, target);
      return;
    }
#if defined(__linux__) && defined(RENAME_EXCHANGE)
    if (renameat2(AT_FDCWD, staging.c_str(), AT_FDCWD, target.c_str(), RENAME_EXCHANGE) != 0)
      throw io_error(target.string() + ": cannot replace the folder: " + std::strerror(errno));
#else
    const fs::path old = target.string() + ".old-" + staging.filename().string();
    fs::rename(target, old);
    fs::rename(staging, target);
    fs::rename(old, staging);
#endif
  }

  convert_options opt_;
  std::function<void(const convert_progress&)> on_progress_;
  convert_report report_;
  convert_progress progress_;
  std::vector<layer_record> records_;
  std::map<std::string, std::uint64_t> copies_;  // tensor name -> fingerprint of its bytes
  std::map<std::string, float> scales_;          // converted module -> the s its stored scale stands for
  std::vector<gguf_record> gguf_records_;
  std::vector<gguf::metadata_entry> tokenizer_;  // GGUF: copied from convert_options::gguf_tokenizer_from
  gguf::model_arch gguf_arch_ = gguf::model_arch::llama;  // GGUF: the arch written (verify_gguf checks it)
  std::vector<float> rope_factors_;  // GGUF: Llama 3.x's rope_freqs tensor, empty without rope_scaling
};

}  // namespace detail

/// Converts the safetensors checkpoint `input` (a .safetensors file, or a Hugging Face model folder:
/// config.json, model.safetensors or shards with model.safetensors.index.json, tokenizer and other
/// files) into the Hugging Face BitNet packed form at `output` (a file for a file, a folder for a
/// folder), or with options.format gguf a Llama-architecture folder into one GGUF file (arch
/// "llama", ternary layers as options.gguf_ternary_type; a BitNet folder as arch "bitnet-25" with
/// options.gguf_arch). Memory is bounded by the largest tensor. Throws io_error / value_error / shape_error
/// naming the file, tensor or layer and the reason; OUT is then as it was. `on_progress` is called
/// after every tensor (on the calling thread).
inline convert_report convert_model(const std::filesystem::path& input, const std::filesystem::path& output,
                                    const convert_options& options = {},
                                    std::function<void(const convert_progress&)> on_progress = {}) {
  if (options.mode == hf::quantization_mode::online && options.scale_convention != hf::scale_convention::autobitlinear)
    throw value_error("convert_model: online mode is transformers' AutoBitLinear: it needs the autobitlinear scale convention");
  if (options.scale_dtype != safetensors::dtype::F32 && options.scale_dtype != safetensors::dtype::BF16 &&
      options.scale_dtype != safetensors::dtype::F16)
    throw value_error("convert_model: scale_dtype must be F32, BF16 or F16, got " +
                      std::string(safetensors::dtype_name(options.scale_dtype)));
  for (const std::string& rule : options.exclude)
    if (rule.empty()) throw value_error("convert_model: an empty exclude rule would exclude every layer");
  if (options.weight_scales != weight_scaling::per_tensor) {
    bitnet::detail::check_unit_scaling(options.weight_scales, options.group_size, "convert_model");
    if (options.format != output_format::hf_packed || options.mode != hf::quantization_mode::offline ||
        options.scale_convention != hf::scale_convention::autobitlinear || options.scale_dtype != safetensors::dtype::F32)
      throw value_error("convert_model: per_row / per_group scales are written in bitnet's packed safetensors form "
                        "only (format hf_packed, mode offline), as F32 magnitudes (scale_convention autobitlinear, "
                        "scale_dtype F32)");
  } else if (options.group_size != 0) {
    throw value_error("convert_model: group_size " + std::to_string(options.group_size) + " needs weight_scales per_group");
  }
  if (options.storage != weight_storage::two_bit && options.storage != weight_storage::base3)
    throw value_error("convert_model: storage is not two_bit or base3");
  if (options.storage == weight_storage::base3 &&
      (options.weight_scales != weight_scaling::per_tensor || options.format != output_format::hf_packed ||
       options.mode != hf::quantization_mode::offline))
    throw value_error("convert_model: storage base3 is bitnet's packed safetensors form of per_tensor layers (format "
                      "hf_packed, mode offline, weight_scales per_tensor), got " +
                      (options.weight_scales != weight_scaling::per_tensor
                           ? "weight_scales " + bitnet::detail::scaling_name(options.weight_scales)
                           : options.format != output_format::hf_packed ? std::string("format gguf")
                                                                        : std::string("mode online")));
  if (options.activation_scales == activation_scaling::per_block && options.weight_scales != weight_scaling::per_group)
    throw value_error("convert_model: per_block activation scales need weight_scales per_group (the blocks are the groups)");
  if (options.weights == ternary_import::exact && options.weight_scales == weight_scaling::per_tensor)
    throw value_error("convert_model: ternary_import::exact needs weight_scales per_row or per_group (one scale per "
                      "tensor stores 1 / d, which does not reproduce d exactly)");
  if (options.format != output_format::gguf && (options.gguf_float_type || options.gguf_tokenizer_from || options.gguf_arch))
    throw value_error("convert_model: gguf_float_type / gguf_tokenizer_from / gguf_arch apply to GGUF output (format gguf) only");
  if (options.format == output_format::gguf) {
    if (options.mode != hf::quantization_mode::offline)
      throw value_error("convert_model: GGUF output stores ternary weights: online mode does not apply");
    if (options.scale_dtype != safetensors::dtype::F32)
      throw value_error("convert_model: GGUF output stores the scale as its ternary type defines it (fp16 d for "
                        "TQ2_0 / TQ1_0, float32 for I2_S): scale_dtype does not apply");
    if (!gguf::is_ternary(options.gguf_ternary_type))
      throw value_error("convert_model: gguf_ternary_type " +
                        std::string(gguf::tensor_type_name(options.gguf_ternary_type)) +
                        " is not a ternary GGUF type (TQ2_0, TQ1_0, Q2_0, PQ2_0, PTQ1_0 or I2_S)");
    if (const auto t = options.gguf_float_type;
        t && *t != gguf::tensor_type::F32 && *t != gguf::tensor_type::F16 && *t != gguf::tensor_type::BF16)
      throw value_error("convert_model: gguf_float_type " + std::string(gguf::tensor_type_name(*t)) +
                        " is not F32, F16 or BF16");
    if (options.gguf_arch && gguf::is_bitnet_arch(*options.gguf_arch) && options.gguf_ternary_type != gguf::tensor_type::I2_S)
      throw value_error("convert_model: gguf_arch " + std::string(gguf::model_arch_name(*options.gguf_arch)) +
                        " with gguf_ternary_type " +
                        std::string(gguf::tensor_type_name(options.gguf_ternary_type)) +
                        ": its engine (ik_llama.cpp) has no TQ2_0 / TQ1_0 kernels; use I2_S");
  }
  return detail::converter(input, output, options, std::move(on_progress)).run();
}

}  // namespace bitnet
