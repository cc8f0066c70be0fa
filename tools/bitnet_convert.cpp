// bitnet-convert: turns the linear layers of a safetensors checkpoint (a file or a Hugging Face
// model folder) into the Hugging Face BitNet packed form (quant_method "bitnet"), or a Llama-
// architecture folder into one GGUF file (--to gguf). A front end over bitnet::convert_model
// (bitnet/convert.hpp), which holds the conversion, its guards and its checks.
//
//   bitnet-convert IN OUT [--exclude PATTERN ...] [--no-default-excludes] [--mode offline|online]
//                  [--scale-convention bitlinear|autobitlinear] [--scale-dtype F32|BF16|F16] [--force]
//                  [--weight-scales per_row|per_group --group-size G [--activation-scales per_block] [--exact]]
//                  [--weight-storage two_bit|base3]
//   bitnet-convert IN OUT.gguf --to gguf [--gguf-type TQ2_0|TQ1_0|I2_S] [--gguf-float-type F32|F16|BF16]
//                  [--gguf-tokenizer-from VOCAB.gguf] [--exclude PATTERN ...] [--no-default-excludes] [--force]
//   bitnet-convert --generate OUT [--layers N] [--divide D] [--shards N] [--nan TENSOR] [--tied] [--qkv-bias]
//                  [--llama]
//   bitnet-convert                  (demo: generates a small BitNet-shaped checkpoint and converts it)
#include <bitnet/convert.hpp>
#include <bitnet/hf_model.hpp>
#include <bitnet/hf_safetensors.hpp>
#include <bitnet/safetensors.hpp>

#include <algorithm>
#include <atomic>
#include <csignal>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <exception>
#include <filesystem>
#include <fstream>
#include <limits>
#include <random>
#include <string>
#include <string_view>
#include <vector>

#include <nlohmann/json.hpp>

#if __has_include(<unistd.h>)
#include <unistd.h>
#endif

namespace {

namespace fs = std::filesystem;
namespace st = bitnet::safetensors;
namespace hf = bitnet::hf;
namespace gguf = bitnet::gguf;
using bitnet::Index;
using bitnet::Matrix;

volatile std::sig_atomic_t stop_signal = 0;

extern "C" void request_stop(int signal) { stop_signal = signal; }

bool stdout_is_terminal() {
#if __has_include(<unistd.h>)
  return isatty(STDOUT_FILENO) == 1;
#else
  return false;
#endif
}

std::string human_bytes(double bytes) {
  const char* units[] = {"B", "KiB", "MiB", "GiB", "TiB"};
  int unit = 0;
  while (bytes >= 1024 && unit < 4) bytes /= 1024, ++unit;
  char text[32];
  std::snprintf(text, sizeof text, "%.1f %s", bytes, units[unit]);
  return text;
}

/// The report's rows as layers are converted, and a progress bar on the last line of a terminal.
class progress_printer {
 public:
  progress_printer() : bar_(stdout_is_terminal()) {}
  void operator()(const bitnet::convert_progress& p) {
    if (bar_) std::printf("\r\033[K");
    if (p.layer) {
      const bitnet::converted_layer& l = *p.layer;
      if (!l.gguf_name.empty())  // GGUF: the block scale d = 1 / s as stored, and what its storage rounded
        std::printf("%-32s %6lldx%-6lld %12.6g %+10.2e %6.1f%% %9.4f\n", l.gguf_name.c_str(), (long long)l.out_features,
                    (long long)l.in_features, l.weight_scale, l.scale_rounding, 100.0 * l.zero_fraction, l.relative_error);
      else
        std::printf("%-48s %6lldx%-6lld %12.6g %6.1f%% %9.4f%s\n", l.name.c_str(), (long long)l.out_features,
                    (long long)l.in_features, l.weight_scale, 100.0 * l.zero_fraction, l.relative_error,
                    l.has_bias ? "  bias" : "");
    }
    if (bar_) {
      const double fraction = p.bytes_total ? double(p.bytes_done) / double(p.bytes_total) : 1.0;
      const int width = 40, filled = int(fraction * width);
      std::printf("[%s%s] %3d%%  %zu/%zu tensors  %s", std::string(std::size_t(filled), '#').c_str(),
                  std::string(std::size_t(width - filled), '.').c_str(), int(fraction * 100), p.tensors_done,
                  p.tensors_total, human_bytes(double(p.bytes_done)).c_str());
    }
    std::fflush(stdout);
  }
  void finish() {
    if (bar_) std::printf("\r\033[K");
    std::fflush(stdout);
  }

 private:
  bool bar_;
};

struct options {
  fs::path input, output;
  bitnet::convert_options convert;
};

/// Runs the conversion with the report printed as it goes; Ctrl-C / SIGTERM cancel it cleanly.
bitnet::convert_report convert(const options& opt) {
  const bool to_gguf = opt.convert.format == bitnet::output_format::gguf;
  if (to_gguf) {
    std::printf("%s -> %s  (GGUF arch llama, ternary %s, floats %s)\n", opt.input.string().c_str(),
                opt.output.string().c_str(), std::string(gguf::tensor_type_name(opt.convert.gguf_ternary_type)).c_str(),
                opt.convert.gguf_float_type ? std::string(gguf::tensor_type_name(*opt.convert.gguf_float_type)).c_str()
                                            : "in their own type");
    std::printf("%-32s %13s %12s %10s %7s %9s\n", "tensor", "shape", "d (stored)", "rounding", "zeros", "rel.err");
  } else {
    std::printf("%s -> %s  (mode %s, scale convention %s)\n", opt.input.string().c_str(), opt.output.string().c_str(),
                std::string(hf::mode_name(opt.convert.mode)).c_str(),
                std::string(hf::convention_name(opt.convert.scale_convention)).c_str());
  }
  if (!to_gguf && opt.convert.mode == hf::quantization_mode::offline)
    std::printf("%-48s %13s %12s %7s %9s\n", "layer", "shape", "weight_scale", "zeros", "rel.err");
  bitnet::convert_options convert_options = opt.convert;
  convert_options.cancelled = [] { return stop_signal != 0; };
  progress_printer printer;
  const auto previous_int = std::signal(SIGINT, request_stop);
  const auto previous_term = std::signal(SIGTERM, request_stop);
  struct restore {
    decltype(previous_int) on_int, on_term;
    ~restore() {
      std::signal(SIGINT, on_int);
      std::signal(SIGTERM, on_term);
    }
  } restore_signals{previous_int, previous_term};
  bitnet::convert_report report;
  try {
    report = bitnet::convert_model(opt.input, opt.output, convert_options, std::ref(printer));
  } catch (...) {
    printer.finish();
    throw;
  }
  printer.finish();
  for (const std::string& note : report.notes) std::fprintf(stderr, "%s\n", note.c_str());
  for (const auto& [rule, matched] : report.exclude_matches) {
    std::printf("--exclude \"%s\" kept %zu layer(s) dense", rule.c_str(), matched.size());
    for (std::size_t i = 0; i < matched.size() && i < 6; ++i) std::printf("%s %s", i ? "," : ":", matched[i].c_str());
    std::printf("%s\n", matched.size() > 6 ? ", ..." : "");
  }
  if (to_gguf) {
    double worst = 0;
    for (const bitnet::converted_layer& l : report.layers) worst = std::max(worst, std::fabs(l.scale_rounding));
    std::printf("converted %zu layers to %s, wrote %zu float tensors: %s -> %s in %.2f s; largest scale rounding "
                "%.2e; output verified\n",
                report.layers.size(), std::string(gguf::tensor_type_name(opt.convert.gguf_ternary_type)).c_str(),
                report.copied_tensors.size(), human_bytes(double(report.bytes_in)).c_str(),
                human_bytes(double(report.bytes_out)).c_str(), report.seconds, worst);
    return report;
  }
  std::printf("converted %zu layers, copied %zu tensors%s: %s -> %s in %.2f s (%s/s); output verified\n",
              report.layers.size(), report.copied_tensors.size(),
              report.folder ? (" and " + std::to_string(report.copied_files.size()) + " other files").c_str() : "",
              human_bytes(double(report.bytes_in)).c_str(), human_bytes(double(report.bytes_out)).c_str(),
              report.seconds, human_bytes(double(report.bytes_in) / std::max(report.seconds, 1e-9)).c_str());
  std::printf("config.json: \"quantization_config\": %s\n", hf::to_json(report.config).c_str());
  return report;
}

void write_text(const fs::path& path, const std::string& text) {
  std::ofstream out(path, std::ios::binary);
  out << text;
  out.close();
  if (!out) throw bitnet::io_error(path.string() + ": cannot write the file");
}

/// Whether the conversion converted tensor `t` (a 2-D float "*.weight" that no rule excludes).
bool is_converted(const st::tensor_info& t, const std::vector<std::string>& excludes) {
  return bitnet::detail::is_linear_weight(t) && std::none_of(excludes.begin(), excludes.end(), [&](const std::string& rule) {
           return t.name.find(rule) != std::string::npos;
         });
}

/// The demo's last step: every converted layer, loaded from the output as a BitLinear, computes
/// exactly what a BitLinear built from the source weights computes.
void reload_as_bit_linear(const options& opt) {
  const st::reader source(opt.input), converted(opt.output);
  std::mt19937 rng(7);
  std::normal_distribution<float> dist(0.0f, 1.0f);
  std::size_t identical = 0, total = 0;
  for (const st::tensor_info& t : source.tensors()) {
    if (!is_converted(t, opt.convert.exclude)) continue;
    const bitnet::BitLinear<float> reference(source.read_matrix<float>(t.name));
    const bitnet::BitLinear<float> loaded =
        hf::load_bit_linear<float>(converted, t.name.substr(0, t.name.size() - 7), reference.out_features());
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
/// model.safetensors.index.json, a config.json and small tokenizer files. `shape.tied`: no lm_head
/// tensor, tie_word_embeddings true (as 2B-4T, Llama 3.2 1B); `shape.qkv_bias`: q/k/v biases (as
/// Qwen2). Tensors are generated and written one row at a time.
struct model_shape {
  bool tied = false, qkv_bias = false;
  bool llama = false;  // LlamaForCausalLM: no sub-norms, SiLU, kv rows = kv heads x head size
};
void generate(const fs::path& path, int layers, int divide, int shards, const std::string& nan_tensor = {},
              model_shape shape = {}) {
  const auto dim = [&](std::uint64_t full) { return std::max<std::uint64_t>(1, full / std::uint64_t(divide)); };
  const std::uint64_t hidden = dim(2560), intermediate = dim(6912), vocab = dim(128256);
  const std::uint64_t heads = std::max<std::uint64_t>(1, 20 / std::uint64_t(divide)),
                      kv_heads = std::max<std::uint64_t>(1, 5 / std::uint64_t(divide));
  const std::uint64_t kv = shape.llama ? kv_heads * (hidden / heads) : dim(640);
  std::vector<st::tensor_spec> specs{{"model.embed_tokens.weight", st::dtype::BF16, {vocab, hidden}}};
  for (int l = 0; l < layers; ++l) {
    const std::string p = "model.layers." + std::to_string(l) + ".";
    const std::vector<std::pair<std::string, std::vector<std::uint64_t>>> shapes{
        {"input_layernorm.weight", {hidden}},
        {"self_attn.q_proj.weight", {hidden, hidden}},
        {"self_attn.k_proj.weight", {kv, hidden}},
        {"self_attn.v_proj.weight", {kv, hidden}},
        {"self_attn.q_proj.bias", {hidden}},
        {"self_attn.k_proj.bias", {kv}},
        {"self_attn.v_proj.bias", {kv}},
        {"self_attn.attn_sub_norm.weight", {hidden}},
        {"self_attn.o_proj.weight", {hidden, hidden}},
        {"post_attention_layernorm.weight", {hidden}},
        {"mlp.gate_proj.weight", {intermediate, hidden}},
        {"mlp.up_proj.weight", {intermediate, hidden}},
        {"mlp.ffn_sub_norm.weight", {intermediate}},
        {"mlp.down_proj.weight", {hidden, intermediate}}};
    for (const auto& [name, dims] : shapes)
      if ((shape.qkv_bias || !name.ends_with(".bias")) && !(shape.llama && name.find("sub_norm") != std::string::npos))
        specs.push_back({p + name, st::dtype::BF16, dims});
  }
  specs.push_back({"model.norm.weight", st::dtype::BF16, {hidden}});
  if (!shape.tied) specs.push_back({"lm_head.weight", st::dtype::BF16, {vocab, hidden}});

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
      // Norm weights near 1, biases near 0 (std 0.5); matrices Gaussian with std 1/sqrt(in), as
      // trained layers roughly are.
      const bool vector = spec.shape.size() == 1, bias = spec.name.ends_with(".bias");
      const double sigma = bias ? 0.5 : vector ? 0.05 : 1.0 / std::sqrt(double(spec.shape[1]));
      std::normal_distribution<float> dist(0.0f, float(sigma));
      const std::uint64_t rows = vector ? 1 : spec.shape[0], row_length = vector ? spec.shape[0] : spec.shape[1];
      std::vector<float> row(static_cast<std::size_t>(row_length));  // one row at a time: nothing else is held
      for (std::uint64_t r = 0; r < rows; ++r) {
        for (float& v : row) v = (vector && !bias ? 1.0f : 0.0f) + dist(rng);
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
  const nlohmann::ordered_json config{{"architectures", {shape.llama ? "LlamaForCausalLM" : "BitNetForCausalLM"}},
                                      {"model_type", shape.llama ? "llama" : "bitnet"},
                                      {"hidden_act", shape.llama ? "silu" : "relu2"},
                                      {"hidden_size", hidden},
                                      {"intermediate_size", intermediate},
                                      {"num_attention_heads", heads},
                                      {"num_key_value_heads", kv_heads},
                                      {"num_hidden_layers", layers},
                                      {"vocab_size", vocab},
                                      {"max_position_embeddings", 4096},
                                      {"rms_norm_eps", 1e-05},
                                      {"rope_theta", 500000.0},
                                      {"tie_word_embeddings", shape.tied},
                                      {"torch_dtype", "bfloat16"},
                                      {"use_cache", true}};
  write_text(path / hf::config_file_name, config.dump(2) + "\n");
  write_text(path / "tokenizer.json", R"({"version": "1.0", "model": {"type": "BPE", "vocab": {"a": 0, "b": 1}}})" "\n");
  write_text(path / "generation_config.json", R"({"bos_token_id": 0, "eos_token_id": 1})" "\n");
}

int usage() {
  std::fprintf(stderr,
               "usage: bitnet-convert IN OUT [--exclude PATTERN ...] [--no-default-excludes] [--mode offline|online]\n"
               "                      [--scale-convention bitlinear|autobitlinear] [--scale-dtype F32|BF16|F16] [--force]\n"
               "                      [--weight-scales per_row|per_group --group-size G [--activation-scales per_block]\n"
               "                       [--exact]] [--weight-storage two_bit|base3]\n"
               "         IN, OUT: .safetensors files, or model folders (config.json, model.safetensors or shards\n"
               "         with model.safetensors.index.json, tokenizer files). An existing OUT is replaced only\n"
               "         when it is an earlier bitnet-convert output, or with --force.\n"
               "         --weight-scales: bitnet's group-scaled packed form (F32 [out, groups] scales; transformers\n"
               "         cannot load it). --exact: the weights are already ternary per unit (Ternary Bonsai's unpacked\n"
               "         folders): imported with no rounding, checked, any other layer refused. A folder's\n"
               "         hadamard_packing.json rotation is applied to the layers it folds.\n"
               "         --weight-storage base3: five codes a byte (1.6 bits, U8 [out, ceil(in/5)], per-tensor scales;\n"
               "         bitnet reads it, transformers cannot).\n"
               "       bitnet-convert IN OUT.gguf --to gguf [--gguf-type TQ2_0|TQ1_0|I2_S] [--gguf-float-type F32|F16|BF16]\n"
               "                      [--gguf-tokenizer-from VOCAB.gguf] [--gguf-arch llama|bitnet-b1.58|bitnet-25]\n"
               "                      [--exclude PATTERN ...] [--no-default-excludes] [--force]\n"
               "         IN: a Llama-architecture model folder (config.json); OUT: one GGUF file (arch llama).\n"
               "         A BitNet folder (BitNetForCausalLM) needs --gguf-arch bitnet-b1.58 (or bitnet-25) --gguf-type I2_S:\n"
               "         the arch bitnet.cpp and ik_llama.cpp read (mainline llama.cpp's \"bitnet\" is not written).\n"
               "         TQ2_0 / TQ1_0 (default TQ2_0) are read by mainline llama.cpp, I2_S by ik_llama.cpp and\n"
               "         bitnet.cpp; other tensors keep their own float type unless --gguf-float-type is given.\n"
               "         The tokenizer.* entries are copied from VOCAB.gguf (convert_hf_to_gguf.py --vocab-only);\n"
               "         without it the file has no tokenizer (tokenizer.ggml.model \"none\").\n"
               "       bitnet-convert --generate OUT [--layers N] [--divide D] [--shards N] [--nan TENSOR] [--tied]\n"
               "                      [--qkv-bias] [--llama]\n"
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
    model_shape shape;
    for (std::size_t i = 2; i < args.size(); ++i) {
      if (args[i] == "--tied") shape.tied = true;
      else if (args[i] == "--llama") shape.llama = true;
      else if (args[i] == "--qkv-bias") shape.qkv_bias = true;
      else if (i + 1 >= args.size()) return usage();
      else if (args[i] == "--layers") layers = std::stoi(std::string(args[++i]));
      else if (args[i] == "--divide") divide = std::stoi(std::string(args[++i]));
      else if (args[i] == "--shards") shards = std::stoi(std::string(args[++i]));
      else if (args[i] == "--nan") nan_tensor = std::string(args[++i]);  // tests: a NaN at row 1, column 2
      else return usage();
    }
    if (layers < 0 || divide < 1 || shards < 0) return usage();
    generate(fs::path(args[1]), layers, divide, shards, nan_tensor, shape);
    std::printf("generated %s\n", std::string(args[1]).c_str());
    return 0;
  }
  options opt;
  bool default_excludes = true, convention_given = false, gguf_option_given = false;
  std::vector<std::string> excludes;
  std::vector<std::string_view> positional;
  for (std::size_t i = 0; i < args.size(); ++i) {
    const std::string_view a = args[i];
    const bool has_value = i + 1 < args.size();
    if (a == "--exclude" && has_value) excludes.emplace_back(args[++i]);
    else if (a == "--no-default-excludes") default_excludes = false;
    else if (a == "--mode" && has_value) {
      const std::string_view v = args[++i];
      if (v == "offline") opt.convert.mode = hf::quantization_mode::offline;
      else if (v == "online") opt.convert.mode = hf::quantization_mode::online;
      else return usage();
    } else if (a == "--scale-convention" && has_value) {
      convention_given = true;
      const std::string_view v = args[++i];
      if (v == "bitlinear") opt.convert.scale_convention = hf::scale_convention::bitlinear;
      else if (v == "autobitlinear") opt.convert.scale_convention = hf::scale_convention::autobitlinear;
      else return usage();
    } else if (a == "--scale-dtype" && has_value) {
      const auto type = st::parse_dtype(args[++i]);
      if (!type || (*type != st::dtype::F32 && *type != st::dtype::BF16 && *type != st::dtype::F16)) return usage();
      opt.convert.scale_dtype = *type;
    } else if (a == "--weight-scales" && has_value) {
      const std::string_view v = args[++i];
      if (v == "per_row") opt.convert.weight_scales = bitnet::weight_scaling::per_row;
      else if (v == "per_group") opt.convert.weight_scales = bitnet::weight_scaling::per_group;
      else if (v == "per_tensor") opt.convert.weight_scales = bitnet::weight_scaling::per_tensor;
      else return usage();
    } else if (a == "--group-size" && has_value) {
      opt.convert.group_size = std::stoi(std::string(args[++i]));
    } else if (a == "--activation-scales" && has_value) {
      const std::string_view v = args[++i];
      if (v == "per_block") opt.convert.activation_scales = bitnet::activation_scaling::per_block;
      else if (v == "per_token") opt.convert.activation_scales = bitnet::activation_scaling::per_token;
      else return usage();
    } else if (a == "--weight-storage" && has_value) {
      const std::string_view v = args[++i];
      if (v == "base3") opt.convert.storage = bitnet::weight_storage::base3;
      else if (v == "two_bit") opt.convert.storage = bitnet::weight_storage::two_bit;
      else return usage();
    } else if (a == "--exact") {
      opt.convert.weights = bitnet::ternary_import::exact;
    } else if (a == "--to" && has_value) {
      const std::string_view v = args[++i];
      if (v == "gguf") opt.convert.format = bitnet::output_format::gguf;
      else if (v == "safetensors") opt.convert.format = bitnet::output_format::hf_packed;
      else return usage();
    } else if (a == "--gguf-type" && has_value) {
      gguf_option_given = true;
      const std::string_view v = args[++i];
      if (v == "TQ2_0") opt.convert.gguf_ternary_type = gguf::tensor_type::TQ2_0;
      else if (v == "TQ1_0") opt.convert.gguf_ternary_type = gguf::tensor_type::TQ1_0;
      else if (v == "I2_S") opt.convert.gguf_ternary_type = gguf::tensor_type::I2_S;
      else return usage();
    } else if (a == "--gguf-float-type" && has_value) {
      gguf_option_given = true;
      const std::string_view v = args[++i];
      if (v == "F32") opt.convert.gguf_float_type = gguf::tensor_type::F32;
      else if (v == "F16") opt.convert.gguf_float_type = gguf::tensor_type::F16;
      else if (v == "BF16") opt.convert.gguf_float_type = gguf::tensor_type::BF16;
      else return usage();
    } else if (a == "--gguf-arch" && has_value) {
      gguf_option_given = true;
      const std::string_view v = args[++i];
      if (v == "llama") opt.convert.gguf_arch = gguf::model_arch::llama;
      else if (v == "bitnet-b1.58") opt.convert.gguf_arch = gguf::model_arch::bitnet_b158;
      else if (v == "bitnet-25") opt.convert.gguf_arch = gguf::model_arch::bitnet_25;
      else return usage();
    } else if (a == "--gguf-tokenizer-from" && has_value) {
      gguf_option_given = true;
      opt.convert.gguf_tokenizer_from = fs::path(args[++i]);
    } else if (a == "--force") {
      opt.convert.force = true;
    } else if (a.starts_with("--")) {
      return usage();
    } else {
      positional.push_back(a);
    }
  }
  if (positional.size() != 2) return usage();
  if (opt.convert.mode == hf::quantization_mode::online && convention_given &&
      opt.convert.scale_convention != hf::scale_convention::autobitlinear) {
    std::fprintf(stderr, "bitnet-convert: --mode online is transformers' AutoBitLinear: it needs --scale-convention autobitlinear\n");
    return 2;
  }
  if (gguf_option_given && opt.convert.format != bitnet::output_format::gguf) {
    std::fprintf(stderr, "bitnet-convert: --gguf-type / --gguf-float-type / --gguf-tokenizer-from need --to gguf\n");
    return 2;
  }
  if (!default_excludes) opt.convert.exclude.clear();
  opt.convert.exclude.insert(opt.convert.exclude.end(), excludes.begin(), excludes.end());
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
