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
#include <bitnet/hf_safetensors.hpp>
#include <bitnet/safetensors.hpp>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <exception>
#include <filesystem>
#include <map>
#include <optional>
#include <random>
#include <span>
#include <string>
#include <string_view>
#include <vector>

#if __has_include(<unistd.h>)
#include <unistd.h>
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
  Index out = 0, in = 0;
  float stored_scale = 0;
  std::uint64_t codes_fingerprint = 0;
};

struct conversion_summary {
  std::size_t converted = 0, copied = 0;
  std::uint64_t bytes_in = 0, bytes_out = 0;
  double seconds = 0;
};

conversion_summary convert(const options& opt) {
  const auto start = std::chrono::steady_clock::now();
  const st::reader in(opt.input);

  // Plan: the output's tensors, in the input's data order.
  std::vector<st::tensor_spec> specs;
  std::vector<const st::tensor_info*> order;
  std::uint64_t total_bytes = 0;
  for (const st::tensor_info& t : in.tensors()) {
    total_bytes += t.byte_size();
    order.push_back(&t);
    if (is_convertible(t, opt.excludes)) {
      const std::string prefix = prefix_of(t.name);
      if (in.contains(prefix + ".weight_scale"))
        throw bitnet::io_error(opt.input.string() + ": " + prefix + ".weight_scale already exists; is the layer already converted?");
      hf::declare_packed_layer(specs, prefix, Index(t.shape[0]), Index(t.shape[1]), false, opt.scale_type);
    } else {
      specs.push_back({t.name, t.type, t.shape});
    }
  }
  std::map<std::string, std::string> metadata(in.metadata().begin(), in.metadata().end());
  metadata["quantization_config"] = hf::quantization_config_json(opt.convention);

  std::printf("%s -> %s  (%zu tensors, %s, scale convention %s)\n", opt.input.string().c_str(),
              opt.output.string().c_str(), in.tensors().size(), human_bytes(double(total_bytes)).c_str(),
              std::string(hf::convention_name(opt.convention)).c_str());
  std::printf("%-48s %13s %12s %7s %9s\n", "layer", "shape", "weight_scale", "zeros", "rel.err");

  conversion_summary summary;
  std::vector<layer_record> layers;
  std::map<std::string, std::uint64_t> copies;  // name -> fingerprint of the bytes
  progress bar(total_bytes, order.size());
  {
    st::writer out(opt.output, std::move(specs), std::move(metadata));
    for (const st::tensor_info* t : order) {
      if (!is_convertible(*t, opt.excludes)) {
        out.copy_tensor(t->name, in, t->name);
        copies[t->name] = fingerprint_of(in, t->name);
        ++summary.copied;
        bar.advance(t->byte_size());
        continue;
      }
      const Matrix<float> w = in.read_matrix<float>(t->name);
      const auto q = bitnet::quantize_weights(w);
      const float mean = std::max(static_cast<float>(bitnet::detail::mean_abs(w)), bitnet::scale_floor<float>);
      // The scale as the file will hold it (BF16/F16 round it), and the s it stands for.
      const float stored = stored_value(opt.convention == hf::scale_convention::autobitlinear ? mean : q.scale,
                                        opt.scale_type);
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
      const std::string prefix = prefix_of(t->name);
      const hf::packed_layer<float> packed{hf::pack_weights(q.values), w.rows(), stored, std::nullopt, opt.convention};
      hf::write_packed_layer(out, prefix, packed);
      fingerprint f;
      f.add(std::as_bytes(std::span(q.values.data(), std::size_t(q.values.size()))));
      layers.push_back({prefix, w.rows(), w.cols(), stored, f.value});
      ++summary.converted;
      char row[256];
      std::snprintf(row, sizeof row, "%-48s %6lldx%-6lld %12.6g %6.1f%% %9.4f", prefix.c_str(), (long long)w.rows(),
                    (long long)w.cols(), double(stored), 100.0 * double(zeros) / double(w.size()),
                    norm2 > 0 ? std::sqrt(error2 / norm2) : 0.0);
      bar.line(row);
      bar.advance(t->byte_size());
    }
    out.finish();
  }
  bar.finish();
  summary.bytes_in = in.file_size();

  // Verification: the written file reopens (full validation), every converted layer unpacks to
  // the codes that were computed with the scale that was computed, every copy is byte-identical.
  const st::reader check(opt.output);
  summary.bytes_out = check.file_size();
  for (const layer_record& layer : layers) {
    // The convention as a reader finds it: declared by the file, never passed in.
    const hf::packed_layer<float> packed = hf::read_packed_layer<float>(check, layer.prefix, layer.out);
    if (packed.convention != opt.convention)
      throw bitnet::io_error(opt.output.string() + ": verification failed: the file declares another scale convention");
    const Matrix<std::int8_t> codes = hf::unpack_weights(packed.weight, layer.out);
    fingerprint f;
    f.add(std::as_bytes(std::span(codes.data(), std::size_t(codes.size()))));
    if (f.value != layer.codes_fingerprint || packed.weight_scale != layer.stored_scale || codes.cols() != layer.in)
      throw bitnet::io_error(opt.output.string() + ": verification failed for layer " + layer.prefix);
  }
  for (const auto& [name, expected] : copies) {
    if (fingerprint_of(check, name) != expected) throw bitnet::io_error(opt.output.string() + ": verification failed for tensor " + name);
  }
  summary.seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
  std::printf("converted %zu layers, copied %zu tensors: %s -> %s in %.2f s (%s/s); output verified\n",
              summary.converted, summary.copied, human_bytes(double(summary.bytes_in)).c_str(),
              human_bytes(double(summary.bytes_out)).c_str(), summary.seconds,
              human_bytes(double(summary.bytes_in) / std::max(summary.seconds, 1e-9)).c_str());
  std::printf("config.json: \"quantization_config\": %s\n", hf::quantization_config_json(opt.convention).c_str());
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
/// Tensors are generated and written one at a time.
void generate(const fs::path& path, int layers, int divide) {
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

  st::writer out(path, specs, {{"format", "pt"}, {"generator", "bitnet-convert --generate"}});
  std::mt19937 rng(2025);
  for (const st::tensor_spec& spec : specs) {
    // Norm weights near 1; matrices Gaussian with std 1/sqrt(in), as trained layers roughly are.
    const bool vector = spec.shape.size() == 1;
    const double sigma = vector ? 0.05 : 1.0 / std::sqrt(double(spec.shape[1]));
    std::normal_distribution<float> dist(0.0f, float(sigma));
    const std::uint64_t rows = vector ? 1 : spec.shape[0], row_length = vector ? spec.shape[0] : spec.shape[1];
    std::vector<float> row(static_cast<std::size_t>(row_length));  // one row at a time: nothing else is held
    for (std::uint64_t r = 0; r < rows; ++r) {
      for (float& v : row) v = (vector ? 1.0f : 0.0f) + dist(rng);
      out.append_values<float>(spec.name, row);
    }
  }
  out.finish();
}

int usage() {
  std::fprintf(stderr,
               "usage: bitnet-convert IN.safetensors OUT.safetensors [--exclude PATTERN ...] [--no-default-excludes]\n"
               "                      [--scale-convention bitlinear|autobitlinear] [--scale-dtype F32|BF16|F16]\n"
               "       bitnet-convert --generate OUT.safetensors [--layers N] [--divide D]\n"
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
    generate(dir / "model.safetensors", 3, 40);
    options opt;
    opt.input = dir / "model.safetensors";
    opt.output = dir / "model.bitnet.safetensors";
    convert(opt);
    reload_as_bit_linear(opt);
    return 0;
  }
  if (args[0] == "--generate") {
    if (args.size() < 2) return usage();
    int layers = 2, divide = 1;
    for (std::size_t i = 2; i < args.size(); i += 2) {
      if (i + 1 >= args.size()) return usage();
      if (args[i] == "--layers") layers = std::stoi(std::string(args[i + 1]));
      else if (args[i] == "--divide") divide = std::stoi(std::string(args[i + 1]));
      else return usage();
    }
    if (layers < 0 || divide < 1) return usage();
    generate(fs::path(args[1]), layers, divide);
    std::printf("generated %s (%s)\n", std::string(args[1]).c_str(), human_bytes(double(fs::file_size(args[1]))).c_str());
    return 0;
  }
  options opt;
  bool default_excludes = true;
  std::vector<std::string> excludes;
  std::vector<std::string_view> positional;
  for (std::size_t i = 0; i < args.size(); ++i) {
    const std::string_view a = args[i];
    const bool has_value = i + 1 < args.size();
    if (a == "--exclude" && has_value) excludes.emplace_back(args[++i]);
    else if (a == "--no-default-excludes") default_excludes = false;
    else if (a == "--scale-convention" && has_value) {
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
