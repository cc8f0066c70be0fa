// bitnet-convert: turns the linear layers of a safetensors checkpoint into the Hugging Face
// BitNet packed form (quant_method "bitnet"), one tensor at a time.
//
//   bitnet-convert IN.safetensors OUT.safetensors [--exclude PATTERN ...] [--no-default-excludes]
//                  [--scale-convention bitlinear|autobitlinear] [--scale-dtype F32|BF16|F16]
//   bitnet-convert --generate OUT.safetensors [--layers N] [--divide D]
//   bitnet-convert                  (demo: generates a small BitNet-shaped checkpoint and converts it)
//
// Every 2-D F32/F16/BF16 tensor whose name ends in ".weight" is converted unless its name
// contains an excluded pattern (default: "embed", "norm", "lm_head"); everything else is copied
// byte for byte. The output is written under a temporary name and renamed into place, then
// reopened and checked against what was computed.
#include <bitnet/hf_model.hpp>
#include <bitnet/hf_safetensors.hpp>
#include <bitnet/safetensors.hpp>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cerrno>
#include <cstring>
#include <exception>
#include <fstream>
#include <filesystem>
#include <limits>
#include <map>
#include <optional>
#include <random>
#include <set>
#include <span>
#include <string>
#include <string_view>
#include <vector>

#include <nlohmann/json.hpp>

#if __has_include(<unistd.h>)
#include <unistd.h>
#endif
#if defined(__linux__)
#include <fcntl.h>  // AT_FDCWD
#endif

namespace {

namespace fs = std::filesystem;
namespace st = bitnet::safetensors;
namespace hf = bitnet::hf;
using bitnet::Index;
using bitnet::Matrix;

struct options {
  fs::path input, output;
  std::vector<std::string> excludes{"embed", "norm", "lm_head"};
  hf::scale_convention convention = hf::default_scale_convention;
  hf::quantization_mode mode = hf::quantization_mode::offline;
  st::dtype scale_type = st::dtype::F32;
};

bool stdout_is_terminal() {
#if __has_include(<unistd.h>)
  return isatty(STDOUT_FILENO) == 1;
#else
  return false;
#endif
}

/// FNV-1a over 8-byte words (then the tail bytes): lets the verification pass compare the file
/// with what was computed without keeping the tensors. Callers feed whole tensors in chunks that
/// are multiples of 8 bytes, so the result does not depend on the chunking.
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

/// Fingerprint of a tensor's bytes, read through a bounded buffer.
std::uint64_t fingerprint_of(const st::reader& file, const std::string& name) {
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

std::string human_bytes(double bytes) {
  const char* units[] = {"B", "KiB", "MiB", "GiB", "TiB"};
  int unit = 0;
  while (bytes >= 1024 && unit < 4) bytes /= 1024, ++unit;
  char text[32];
  std::snprintf(text, sizeof text, "%.1f %s", bytes, units[unit]);
  return text;
}

/// A progress bar on the last line of a terminal; report lines are printed above it.
class progress {
 public:
  progress(std::uint64_t total_bytes, std::size_t total_tensors)
      : enabled_(stdout_is_terminal()), total_bytes_(total_bytes), total_tensors_(total_tensors) {}
  void line(const std::string& text) {
    if (enabled_) std::printf("\r\033[K");
    std::printf("%s\n", text.c_str());
    draw();
  }
  void advance(std::uint64_t bytes) {
    done_bytes_ += bytes;
    ++done_tensors_;
    draw();
  }
  void finish() {
    if (enabled_) std::printf("\r\033[K");
    std::fflush(stdout);
  }

 private:
  void draw() {
    if (!enabled_) return;
    const double fraction = total_bytes_ ? double(done_bytes_) / double(total_bytes_) : 1.0;
    const int width = 40, filled = int(fraction * width);
    std::printf("\r\033[K[%s%s] %3d%%  %zu/%zu tensors  %s", std::string(std::size_t(filled), '#').c_str(),
                std::string(std::size_t(width - filled), '.').c_str(), int(fraction * 100), done_tensors_,
                total_tensors_, human_bytes(double(done_bytes_)).c_str());
    std::fflush(stdout);
  }
  bool enabled_;
  std::uint64_t total_bytes_, done_bytes_ = 0;
  std::size_t total_tensors_, done_tensors_ = 0;
};

/// `value` rounded as storing it in `type` (F32, BF16 or F16) rounds it.
float stored_value(float value, st::dtype type) {
  const bitnet::detail::float_format format = type == st::dtype::BF16  ? bitnet::detail::bfloat16
                                              : type == st::dtype::F16 ? bitnet::detail::binary16
                                                                       : bitnet::detail::binary32;
  const std::optional<double> rounded = bitnet::detail::round_to_format(value, format);
  if (!rounded || !(*rounded > 0))
    throw bitnet::value_error("weight_scale " + std::to_string(value) + " cannot be stored as " +
                              std::string(st::dtype_name(type)));
  return static_cast<float>(*rounded);
}

bool is_convertible(const st::tensor_info& t, const std::vector<std::string>& excludes) {
  const bool linear_weight = t.name.size() > 7 && t.name.ends_with(".weight") && t.shape.size() == 2 &&
                             t.shape[0] > 0 && t.shape[1] > 0 &&
                             (t.type == st::dtype::F32 || t.type == st::dtype::F16 || t.type == st::dtype::BF16);
  return linear_weight && std::none_of(excludes.begin(), excludes.end(), [&](const std::string& pattern) {
           return t.name.find(pattern) != std::string::npos;
         });
}

std::string prefix_of(const std::string& weight_name) { return weight_name.substr(0, weight_name.size() - 7); }

struct layer_record {
  std::string prefix;
  std::string shard;  // the output file that holds it
  Index out = 0, in = 0;
  float stored_scale = 0;
  std::uint64_t codes_fingerprint = 0;
};

struct conversion_summary {
  std::size_t converted = 0, copied = 0, files_copied = 0;
  std::uint64_t bytes_in = 0, bytes_out = 0;
  double seconds = 0;
};

/// What the whole conversion will do, decided from the headers alone before anything is written.
struct plan {
  hf::quantization_config config;
  std::vector<std::string> warnings;
};

bool is_inside(const fs::path& inner, const fs::path& outer) {
  const auto [o, i] = std::mismatch(outer.begin(), outer.end(), inner.begin(), inner.end());
  return o == outer.end();
}

/// IN and OUT must be different files or folders (also through symlinks and hard links), and
/// neither folder inside the other: checked before anything is written.
void refuse_same_place(const fs::path& in, const fs::path& out, bool folder) {
  std::error_code ec;
  const bool same = fs::exists(out, ec) && fs::equivalent(in, out, ec);
  if (same)
    throw bitnet::io_error(in.string() + " and " + out.string() +
                           " are the same " + (folder ? "folder" : "file") +
                           " (directly, through a symlink or a hard link): refusing to overwrite the source");
  if (folder) {
    const fs::path ci = fs::weakly_canonical(in), co = fs::weakly_canonical(out);
    if (is_inside(co, ci) || is_inside(ci, co))
      throw bitnet::io_error(in.string() + " and " + out.string() + ": one folder is inside the other; refusing");
    if (fs::exists(out, ec) && !fs::is_directory(out, ec))
      throw bitnet::io_error(out.string() + " exists and is not a folder");
  } else if (fs::is_directory(out, ec)) {
    throw bitnet::io_error(out.string() + " is a folder; the input is a single file");
  }
}

/// The first non-finite element of a weight, named by tensor, row and column.
void require_finite(const Matrix<float>& w, const st::reader& file, const std::string& name) {
  for (Index r = 0; r < w.rows(); ++r)
    for (Index c = 0; c < w.cols(); ++c)
      if (!std::isfinite(w(r, c)))
        throw bitnet::value_error(file.source_name() + ": tensor \"" + name + "\": non-finite value (" +
                                  (std::isnan(w(r, c)) ? "nan" : w(r, c) > 0 ? "inf" : "-inf") + ") at row " +
                                  std::to_string(r) + ", column " + std::to_string(c) + "; nothing was written");
}

/// Decides every layer, refuses converted input and settings transformers would misread.
plan make_plan(const hf::checkpoint& in, const options& opt) {
  // Latent weights declared for AutoBitLinear's online mode (microsoft/bitnet-b1.58-2B-4T-bf16) are
  // what we convert from; any other declaration means the weights are already quantized.
  if (const auto& declared = in.quantization();
      declared && !(declared->quant_method == "bitnet" && declared->mode == hf::quantization_mode::online))
    throw bitnet::io_error(in.quantization_source() + " declares a quantization_config (quant_method \"" +
                           declared->quant_method + "\"" +
                           (declared->quant_method == "bitnet" ? ", quantization_mode \"offline\"" : "") +
                           "): the model is already quantized" +
                           (declared->quant_method == "bitnet" ? " (converted by bitnet-convert?)" : "") +
                           "; convert the dense model instead");
  plan p;
  p.config.linear_class = opt.mode == hf::quantization_mode::online ? hf::scale_convention::autobitlinear : opt.convention;
  p.config.mode = opt.mode;
  std::vector<std::string> converted;
  for (const st::tensor_info* t : in.tensors()) {
    if (t->name.ends_with(".weight_scale")) {
      const std::string layer = t->name.substr(0, t->name.size() - std::string_view(".weight_scale").size());
      const st::tensor_info* weight = in.find(layer + ".weight");
      if (weight && weight->type == st::dtype::U8)
        throw bitnet::io_error(in.source_name() + ": " + layer + " is a packed BitNet layer (U8 weight + weight_scale): "
                               "the model is already converted; convert the dense model instead");
    }
    if (t->name.size() <= 7 || !t->name.ends_with(".weight") || t->shape.size() != 2) continue;
    if (is_convertible(*t, opt.excludes)) {
      converted.push_back(prefix_of(t->name));
      if (opt.mode == hf::quantization_mode::offline && t->shape[0] % 4 != 0) {
        p.config.out_features[prefix_of(t->name)] = Index(t->shape[0]);
        p.warnings.push_back("warning: " + prefix_of(t->name) + ": out_features " + std::to_string(t->shape[0]) +
                             " is not a multiple of 4: transformers' BitLinear / AutoBitLinear cannot load this "
                             "layer (they size the packed rows as out_features // 4); bitnet loads it (the file "
                             "records out_features)");
      }
    } else if (st::is_floating(t->type)) {
      p.config.modules_to_not_convert.push_back(prefix_of(t->name));
    }
  }
  std::sort(p.config.modules_to_not_convert.begin(), p.config.modules_to_not_convert.end());
  // transformers matches modules_to_not_convert as substrings of module names.
  if (opt.mode == hf::quantization_mode::offline)
    for (const std::string& layer : converted)
      for (const std::string& kept : p.config.modules_to_not_convert)
        if (layer.find(kept) != std::string::npos)
          throw bitnet::io_error("the kept-dense module \"" + kept + "\" is a substring of the converted layer \"" +
                                 layer + "\": transformers (which matches modules_to_not_convert as substrings) "
                                 "would leave it dense and fail to load its packed weight; exclude it as well");
  return p;
}

/// Converts (or, online, checks and copies) the tensors of one file into `output`.
void convert_file(const st::reader& in, const fs::path& output, const plan& p, const options& opt,
                  conversion_summary& summary, std::vector<layer_record>& layers,
                  std::map<std::string, std::uint64_t>& copies, progress& bar) {
  const bool offline = opt.mode == hf::quantization_mode::offline;
  std::vector<st::tensor_spec> specs;
  for (const st::tensor_info& t : in.tensors()) {
    if (offline && is_convertible(t, opt.excludes))
      hf::declare_packed_layer(specs, prefix_of(t.name), Index(t.shape[0]), Index(t.shape[1]), false, opt.scale_type);
    else
      specs.push_back({t.name, t.type, t.shape});
  }
  std::map<std::string, std::string> metadata(in.metadata().begin(), in.metadata().end());
  metadata.insert_or_assign(std::string(hf::metadata_key), hf::to_json(p.config));
  const std::string shard = output.filename().string();
  st::writer out(output, std::move(specs), std::move(metadata));
  for (const st::tensor_info& t : in.tensors()) {
    if (!is_convertible(t, opt.excludes)) {
      out.copy_tensor(t.name, in, t.name);
      copies[t.name] = fingerprint_of(in, t.name);
      ++summary.copied;
      bar.advance(t.byte_size());
      continue;
    }
    const Matrix<float> w = in.read_matrix<float>(t.name);
    require_finite(w, in, t.name);
    if (!offline) {  // the latent weights in their own dtype, byte for byte
      out.copy_tensor(t.name, in, t.name);
      copies[t.name] = fingerprint_of(in, t.name);
      ++summary.copied;
      bar.advance(t.byte_size());
      continue;
    }
    const auto q = bitnet::quantize_weights(w);
    const float mean = std::max(static_cast<float>(bitnet::detail::mean_abs(w)), bitnet::scale_floor<float>);
    // The scale as the file will hold it (BF16/F16 round it), and the s it stands for.
    const float stored =
        stored_value(opt.convention == hf::scale_convention::autobitlinear ? mean : q.scale, opt.scale_type);
    const double effective_scale =
        opt.convention == hf::scale_convention::autobitlinear ? 1.0 / double(stored) : double(stored);
    // Zero fraction and relative reconstruction error ||W - q/s|| / ||W||, in one pass.
    double error2 = 0, norm2 = 0;
    Index zeros = 0;
    for (Index i = 0; i < w.size(); ++i) {
      const double v = w.data()[i], r = double(q.values.data()[i]) / effective_scale;
      error2 += (v - r) * (v - r);
      norm2 += v * v;
      zeros += q.values.data()[i] == 0;
    }
    const std::string prefix = prefix_of(t.name);
    const hf::packed_layer<float> packed{hf::pack_weights(q.values), w.rows(), stored, std::nullopt, opt.convention};
    hf::write_packed_layer(out, prefix, packed);
    fingerprint f;
    f.add(std::as_bytes(std::span(q.values.data(), std::size_t(q.values.size()))));
    layers.push_back({prefix, shard, w.rows(), w.cols(), stored, f.value});
    ++summary.converted;
    char row[256];
    std::snprintf(row, sizeof row, "%-48s %6lldx%-6lld %12.6g %6.1f%% %9.4f", prefix.c_str(), (long long)w.rows(),
                  (long long)w.cols(), double(stored), 100.0 * double(zeros) / double(w.size()),
                  norm2 > 0 ? std::sqrt(error2 / norm2) : 0.0);
    bar.line(row);
    bar.advance(t.byte_size());
  }
  out.finish();
}

/// Reopens the output (full validation, index and config.json included) and checks it: the declared
/// convention is the one used, every converted layer unpacks to the computed codes and scale,
/// every copied tensor is byte-identical.
void verify(const fs::path& output, const plan& p, const std::vector<layer_record>& layers,
            const std::map<std::string, std::uint64_t>& copies, conversion_summary& summary) {
  const hf::checkpoint check(output);
  for (const st::reader& shard : check.shards()) summary.bytes_out += shard.file_size();
  const auto& declared = check.quantization();
  if (!declared || hf::to_json(*declared) != hf::to_json(p.config))
    throw bitnet::io_error(output.string() + ": verification failed: the quantization_config read back differs");
  for (const layer_record& layer : layers) {
    // The convention as any reader finds it: declared by the files, never passed in.
    const hf::packed_layer<float> packed =
        hf::read_packed_layer<float>(check.shard_of(layer.prefix + ".weight"), layer.prefix);
    const Matrix<std::int8_t> codes = hf::unpack_weights(packed.weight, layer.out);
    fingerprint f;
    f.add(std::as_bytes(std::span(codes.data(), std::size_t(codes.size()))));
    if (f.value != layer.codes_fingerprint || packed.weight_scale != layer.stored_scale || codes.cols() != layer.in ||
        packed.out_features != layer.out || packed.convention != *p.config.linear_class)
      throw bitnet::io_error(output.string() + ": verification failed for layer " + layer.prefix);
  }
  for (const auto& [name, expected] : copies)
    if (fingerprint_of(check.shard_of(name), name) != expected)
      throw bitnet::io_error(output.string() + ": verification failed for tensor " + name);
}

using ordered_json = nlohmann::ordered_json;

ordered_json read_json(const fs::path& path) {
  std::ifstream in(path, std::ios::binary);
  try {
    return ordered_json::parse(in);
  } catch (const nlohmann::json::exception& e) {
    throw bitnet::io_error(path.string() + ": invalid JSON: " + e.what());
  }
}

void write_text(const fs::path& path, const std::string& text) {
  std::ofstream out(path, std::ios::binary);
  out << text;
  out.close();
  if (!out) throw bitnet::io_error(path.string() + ": cannot write the file");
}

/// Removes a folder being built unless it was committed.
struct folder_guard {
  fs::path path;
  bool keep = false;
  ~folder_guard() {
    if (keep) return;
    std::error_code ec;
    fs::remove_all(path, ec);
  }
};

/// Moves the finished folder `built` to `target`: a rename, or an atomic exchange with an existing
/// target (whose old contents are then removed).
void commit_folder(const fs::path& built, const fs::path& target) {
  std::error_code ec;
  if (!fs::exists(target, ec)) {
    fs::rename(built, target);
    return;
  }
#if defined(__linux__) && defined(RENAME_EXCHANGE)
  if (renameat2(AT_FDCWD, built.c_str(), AT_FDCWD, target.c_str(), RENAME_EXCHANGE) != 0)
    throw bitnet::io_error(target.string() + ": cannot replace the folder: " + std::strerror(errno));
#else
  const fs::path old = target.string() + ".old-" + built.filename().string();
  fs::rename(target, old);
  fs::rename(built, target);
  fs::rename(old, built);
#endif
  fs::remove_all(built, ec);  // now the old target
}

conversion_summary convert(options opt) {
  const auto start = std::chrono::steady_clock::now();
  std::error_code ec;
  if (!fs::exists(opt.input, ec)) throw bitnet::io_error(opt.input.string() + ": no such file or folder");
  const bool folder = fs::is_directory(opt.input, ec);
  refuse_same_place(opt.input, opt.output, folder);
  const hf::checkpoint in(opt.input);
  if (const auto& declared = in.quantization())  // an online model's dense modules stay dense
    opt.excludes.insert(opt.excludes.end(), declared->modules_to_not_convert.begin(),
                        declared->modules_to_not_convert.end());
  const plan p = make_plan(in, opt);

  std::uint64_t total_bytes = 0;
  std::size_t total_tensors = 0;
  for (const st::reader& shard : in.shards()) {
    total_bytes += shard.file_size();
    total_tensors += shard.tensors().size();
  }
  std::printf("%s -> %s  (%zu file(s), %zu tensors, %s, mode %s, scale convention %s)\n", opt.input.string().c_str(),
              opt.output.string().c_str(), in.shards().size(), total_tensors, human_bytes(double(total_bytes)).c_str(),
              std::string(hf::mode_name(opt.mode)).c_str(),
              std::string(hf::convention_name(*p.config.linear_class)).c_str());
  for (const std::string& w : p.warnings) std::fprintf(stderr, "%s\n", w.c_str());
  if (opt.mode == hf::quantization_mode::offline)
    std::printf("%-48s %13s %12s %7s %9s\n", "layer", "shape", "weight_scale", "zeros", "rel.err");

  conversion_summary summary;
  summary.bytes_in = total_bytes;
  std::vector<layer_record> layers;
  std::map<std::string, std::uint64_t> copies;  // name -> fingerprint of the bytes
  progress bar(total_bytes, total_tensors);
  if (!folder) {
    convert_file(in.shards().front(), opt.output, p, opt, summary, layers, copies, bar);
    bar.finish();
    verify(opt.output, p, layers, copies, summary);
  } else {
    std::random_device rd;
    const fs::path target = fs::absolute(opt.output);
    folder_guard built{target.parent_path() / ("." + target.filename().string() + ".tmp-" + std::to_string(rd()))};
    fs::create_directories(built.path);
    std::set<std::string> model_files{std::string(hf::config_file_name), std::string(hf::index_file_name)};
    for (const st::reader& shard : in.shards()) {
      const std::string name = fs::path(shard.source_name()).filename().string();
      model_files.insert(name);
      convert_file(shard, built.path / name, p, opt, summary, layers, copies, bar);
    }
    bar.finish();
    // Every other file (tokenizer, generation config, README, ...) byte for byte.
    for (auto it = fs::recursive_directory_iterator(opt.input); it != fs::recursive_directory_iterator(); ++it) {
      const fs::path relative = fs::relative(it->path(), opt.input);
      if (it.depth() == 0 && model_files.contains(relative.string())) continue;
      if (it->is_symlink()) fs::copy_symlink(it->path(), built.path / relative);
      else if (it->is_directory()) fs::create_directories(built.path / relative);
      else fs::copy_file(it->path(), built.path / relative);
      if (!it->is_directory()) ++summary.files_copied;
    }
    const ordered_json block = ordered_json::parse(hf::to_json(p.config));
    if (in.config_path()) {  // every key kept, quantization_config added
      ordered_json config = read_json(*in.config_path());
      if (!config.is_object()) throw bitnet::io_error(in.config_path()->string() + ": not a JSON object");
      config["quantization_config"] = block;
      write_text(built.path / hf::config_file_name, config.dump(2) + "\n");
    } else {
      std::fprintf(stderr, "warning: %s has no config.json; transformers needs one, with \"quantization_config\": %s\n",
                   opt.input.string().c_str(), hf::to_json(p.config).c_str());
    }
    if (in.shards().size() > 1 || fs::exists(opt.input / hf::index_file_name)) {  // the same sharding, a new index
      ordered_json index = read_json(opt.input / hf::index_file_name);
      std::map<std::string, std::string> weight_map;
      std::uint64_t total_size = 0;
      for (const auto& entry : fs::directory_iterator(built.path)) {
        if (entry.path().extension() != ".safetensors") continue;
        const st::reader shard(entry.path());
        for (const st::tensor_info& t : shard.tensors()) {
          weight_map[t.name] = entry.path().filename().string();
          total_size += t.byte_size();
        }
      }
      index["metadata"]["total_size"] = total_size;
      index["weight_map"] = weight_map;
      write_text(built.path / hf::index_file_name, index.dump(2) + "\n");
    }
    verify(built.path, p, layers, copies, summary);
    commit_folder(built.path, target);
    built.keep = !fs::exists(built.path);
  }
  summary.seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
  std::printf("converted %zu layers, copied %zu tensors%s: %s -> %s in %.2f s (%s/s); output verified\n",
              summary.converted, summary.copied,
              folder ? (" and " + std::to_string(summary.files_copied) + " other files").c_str() : "",
              human_bytes(double(summary.bytes_in)).c_str(), human_bytes(double(summary.bytes_out)).c_str(),
              summary.seconds, human_bytes(double(summary.bytes_in) / std::max(summary.seconds, 1e-9)).c_str());
  std::printf("config.json: \"quantization_config\": %s\n", hf::to_json(p.config).c_str());
  return summary;
}

/// The demo's last step: every converted layer, loaded from the output as a BitLinear, computes
/// exactly what a BitLinear built from the source weights computes.
void reload_as_bit_linear(const options& opt) {
  const st::reader source(opt.input), converted(opt.output);
  std::mt19937 rng(7);
  std::normal_distribution<float> dist(0.0f, 1.0f);
  std::size_t identical = 0, total = 0;
  for (const st::tensor_info& t : source.tensors()) {
    if (!is_convertible(t, opt.excludes)) continue;
    const bitnet::BitLinear<float> reference(source.read_matrix<float>(t.name));
    const bitnet::BitLinear<float> loaded =
        hf::load_bit_linear<float>(converted, prefix_of(t.name), reference.out_features());
    Matrix<float> x(4, reference.in_features());
    for (Index i = 0; i < x.size(); ++i) x.data()[i] = dist(rng);
    identical += loaded.ternary_weight() == reference.ternary_weight() &&
                 loaded.weight_scale() == reference.weight_scale() && loaded.forward(x) == reference.forward(x);
    ++total;
  }
  std::printf("reloaded %zu layers as bitnet::BitLinear: %zu compute bit-identically to BitLinear of the source weights\n",
              total, identical);
  if (identical != total) throw bitnet::io_error("reloaded layers differ from the source layers");
}

/// Writes a BitNet-shaped BF16 checkpoint: microsoft/bitnet-b1.58-2B-4T's tensor names and
/// proportions (hidden 2560, intermediate 6912, 20 heads of 128 with 5 KV heads, vocabulary
/// 128256) with every dimension divided by `divide`, `layers` decoder layers and an lm_head.
/// With shards == 0, one file at `path`; otherwise a model folder at `path`: the tensors split in
/// order into `shards` files model-0000K-of-0000N.safetensors (or model.safetensors for 1) with
/// model.safetensors.index.json, a config.json and small tokenizer files. Tensors are generated
/// and written one row at a time.
void generate(const fs::path& path, int layers, int divide, int shards, const std::string& nan_tensor = {}) {
  const auto dim = [&](std::uint64_t full) { return std::max<std::uint64_t>(1, full / std::uint64_t(divide)); };
  const std::uint64_t hidden = dim(2560), intermediate = dim(6912), kv = dim(640), vocab = dim(128256);
  std::vector<st::tensor_spec> specs{{"model.embed_tokens.weight", st::dtype::BF16, {vocab, hidden}}};
  for (int l = 0; l < layers; ++l) {
    const std::string p = "model.layers." + std::to_string(l) + ".";
    const std::vector<std::pair<std::string, std::vector<std::uint64_t>>> shapes{
        {"input_layernorm.weight", {hidden}},
        {"self_attn.q_proj.weight", {hidden, hidden}},
        {"self_attn.k_proj.weight", {kv, hidden}},
        {"self_attn.v_proj.weight", {kv, hidden}},
        {"self_attn.attn_sub_norm.weight", {hidden}},
        {"self_attn.o_proj.weight", {hidden, hidden}},
        {"post_attention_layernorm.weight", {hidden}},
        {"mlp.gate_proj.weight", {intermediate, hidden}},
        {"mlp.up_proj.weight", {intermediate, hidden}},
        {"mlp.ffn_sub_norm.weight", {intermediate}},
        {"mlp.down_proj.weight", {hidden, intermediate}}};
    for (const auto& [name, shape] : shapes) specs.push_back({p + name, st::dtype::BF16, shape});
  }
  specs.push_back({"model.norm.weight", st::dtype::BF16, {hidden}});
  specs.push_back({"lm_head.weight", st::dtype::BF16, {vocab, hidden}});

  // Split in order into shards of about equal size.
  std::vector<std::vector<st::tensor_spec>> groups(std::size_t(std::max(shards, 1)));
  std::uint64_t total = 0, done = 0;
  for (const auto& spec : specs) total += st::tensor_info{spec.name, spec.type, spec.shape, 0, 0}.element_count() * 2;
  for (const auto& spec : specs) {
    const std::uint64_t size = st::tensor_info{spec.name, spec.type, spec.shape, 0, 0}.element_count() * 2;
    const auto group = std::min<std::size_t>(groups.size() - 1, std::size_t(done * groups.size() / total));
    groups[group].push_back(spec);
    done += size;
  }
  std::erase_if(groups, [](const auto& g) { return g.empty(); });
  if (shards > 0) fs::create_directories(path);
  const auto shard_name = [&](std::size_t k) {
    if (groups.size() == 1) return std::string(hf::single_file_name);
    char name[64];
    std::snprintf(name, sizeof name, "model-%05zu-of-%05zu.safetensors", k + 1, groups.size());
    return std::string(name);
  };
  std::mt19937 rng(2025);
  nlohmann::ordered_json weight_map = nlohmann::ordered_json::object();
  for (std::size_t k = 0; k < groups.size(); ++k) {
    const fs::path file = shards > 0 ? path / shard_name(k) : path;
    st::writer out(file, groups[k], {{"format", "pt"}, {"generator", "bitnet-convert --generate"}});
    for (const st::tensor_spec& spec : groups[k]) {
      weight_map[spec.name] = shard_name(k);
      // Norm weights near 1; matrices Gaussian with std 1/sqrt(in), as trained layers roughly are.
      const bool vector = spec.shape.size() == 1;
      const double sigma = vector ? 0.05 : 1.0 / std::sqrt(double(spec.shape[1]));
      std::normal_distribution<float> dist(0.0f, float(sigma));
      const std::uint64_t rows = vector ? 1 : spec.shape[0], row_length = vector ? spec.shape[0] : spec.shape[1];
      std::vector<float> row(static_cast<std::size_t>(row_length));  // one row at a time: nothing else is held
      for (std::uint64_t r = 0; r < rows; ++r) {
        for (float& v : row) v = (vector ? 1.0f : 0.0f) + dist(rng);
        if (spec.name == nan_tensor && r == 1) row[2] = std::numeric_limits<float>::quiet_NaN();  // --nan
        out.append_values<float>(spec.name, row);
      }
    }
    out.finish();
  }
  if (shards == 0) return;
  if (groups.size() > 1) {
    nlohmann::ordered_json index{{"metadata", {{"total_size", total}}}, {"weight_map", weight_map}};
    write_text(path / hf::index_file_name, index.dump(2) + "\n");
  }
  const nlohmann::ordered_json config{{"architectures", {"BitNetForCausalLM"}},
                                      {"model_type", "bitnet"},
                                      {"hidden_act", "relu2"},
                                      {"hidden_size", hidden},
                                      {"intermediate_size", intermediate},
                                      {"num_attention_heads", std::max<std::uint64_t>(1, 20 / std::uint64_t(divide))},
                                      {"num_key_value_heads", std::max<std::uint64_t>(1, 5 / std::uint64_t(divide))},
                                      {"num_hidden_layers", layers},
                                      {"vocab_size", vocab},
                                      {"max_position_embeddings", 4096},
                                      {"rms_norm_eps", 1e-05},
                                      {"rope_theta", 500000.0},
                                      {"tie_word_embeddings", false},
                                      {"torch_dtype", "bfloat16"},
                                      {"use_cache", true}};
  write_text(path / hf::config_file_name, config.dump(2) + "\n");
  write_text(path / "tokenizer.json", R"({"version": "1.0", "model": {"type": "BPE", "vocab": {"a": 0, "b": 1}}})" "\n");
  write_text(path / "generation_config.json", R"({"bos_token_id": 0, "eos_token_id": 1})" "\n");
}

int usage() {
  std::fprintf(stderr,
               "usage: bitnet-convert IN OUT [--exclude PATTERN ...] [--no-default-excludes] [--mode offline|online]\n"
               "                      [--scale-convention bitlinear|autobitlinear] [--scale-dtype F32|BF16|F16]\n"
               "         IN, OUT: .safetensors files, or model folders (config.json, model.safetensors or shards\n"
               "         with model.safetensors.index.json, tokenizer files)\n"
               "       bitnet-convert --generate OUT [--layers N] [--divide D] [--shards N] [--nan TENSOR]\n"
               "       bitnet-convert          (demo on a generated small BitNet-shaped checkpoint)\n");
  return 2;
}

int run(int argc, char** argv) {
  std::vector<std::string_view> args(argv + 1, argv + argc);
  if (args.empty()) {
    std::random_device rd;
    const fs::path dir = fs::temp_directory_path() / ("bitnet-convert-demo-" + std::to_string(rd()));
    fs::create_directories(dir);
    struct cleanup {
      fs::path dir;
      ~cleanup() {
        std::error_code ec;
        fs::remove_all(dir, ec);
      }
    } remove_later{dir};
    std::printf("demo: generating a BitNet-shaped checkpoint (2B-4T proportions / 40, 3 layers) in %s\n",
                dir.string().c_str());
    generate(dir / "model.safetensors", 3, 40, 0);
    options opt;
    opt.input = dir / "model.safetensors";
    opt.output = dir / "model.bitnet.safetensors";
    convert(opt);
    reload_as_bit_linear(opt);
    return 0;
  }
  if (args[0] == "--generate") {
    if (args.size() < 2) return usage();
    int layers = 2, divide = 1, shards = 0;
    std::string nan_tensor;
    for (std::size_t i = 2; i < args.size(); i += 2) {
      if (i + 1 >= args.size()) return usage();
      if (args[i] == "--layers") layers = std::stoi(std::string(args[i + 1]));
      else if (args[i] == "--divide") divide = std::stoi(std::string(args[i + 1]));
      else if (args[i] == "--shards") shards = std::stoi(std::string(args[i + 1]));
      else if (args[i] == "--nan") nan_tensor = std::string(args[i + 1]);  // tests: a NaN at row 1, column 2
      else return usage();
    }
    if (layers < 0 || divide < 1 || shards < 0) return usage();
    generate(fs::path(args[1]), layers, divide, shards, nan_tensor);
    std::printf("generated %s\n", std::string(args[1]).c_str());
    return 0;
  }
  options opt;
  bool default_excludes = true, convention_given = false;
  std::vector<std::string> excludes;
  std::vector<std::string_view> positional;
  for (std::size_t i = 0; i < args.size(); ++i) {
    const std::string_view a = args[i];
    const bool has_value = i + 1 < args.size();
    if (a == "--exclude" && has_value) excludes.emplace_back(args[++i]);
    else if (a == "--no-default-excludes") default_excludes = false;
    else if (a == "--mode" && has_value) {
      const std::string_view v = args[++i];
      if (v == "offline") opt.mode = hf::quantization_mode::offline;
      else if (v == "online") opt.mode = hf::quantization_mode::online;
      else return usage();
    } else if (a == "--scale-convention" && has_value) {
      convention_given = true;
      const std::string_view v = args[++i];
      if (v == "bitlinear") opt.convention = hf::scale_convention::bitlinear;
      else if (v == "autobitlinear") opt.convention = hf::scale_convention::autobitlinear;
      else return usage();
    } else if (a == "--scale-dtype" && has_value) {
      const auto type = st::parse_dtype(args[++i]);
      if (!type || (*type != st::dtype::F32 && *type != st::dtype::BF16 && *type != st::dtype::F16)) return usage();
      opt.scale_type = *type;
    } else if (a.starts_with("--")) {
      return usage();
    } else {
      positional.push_back(a);
    }
  }
  if (positional.size() != 2) return usage();
  if (opt.mode == hf::quantization_mode::online && convention_given && opt.convention != hf::scale_convention::autobitlinear) {
    std::fprintf(stderr, "bitnet-convert: --mode online is transformers' AutoBitLinear: it needs --scale-convention autobitlinear\n");
    return 2;
  }
  if (!default_excludes) opt.excludes.clear();
  opt.excludes.insert(opt.excludes.end(), excludes.begin(), excludes.end());
  opt.input = positional[0];
  opt.output = positional[1];
  convert(opt);
  return 0;
}

}  // namespace

int main(int argc, char** argv) {
  try {
    return run(argc, argv);
  } catch (const std::exception& e) {
    std::fprintf(stderr, "bitnet-convert: %s\n", e.what());
    return 1;
  }
}
