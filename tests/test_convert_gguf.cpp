// bitnet::convert_model with format gguf: a generated Llama-named folder into one GGUF file (arch
// "llama"), read back with bitnet's GGUF reader and compared with the source weights through the
// naive reference (tests/reference.hpp), with the packed safetensors path, and with the rope row
// order written out by hand; refusals leave the file system exactly as it was.
#include <bitnet/convert.hpp>
#include <bitnet/gguf.hpp>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <filesystem>
#include <fstream>
#include <map>
#include <random>
#include <set>
#include <sstream>
#include <string>
#include <vector>

#include <doctest/doctest.h>

#include <nlohmann/json.hpp>

#include "file_fixtures.hpp"
#include "reference.hpp"

namespace st = bitnet::safetensors;
namespace hf = bitnet::hf;
namespace gguf = bitnet::gguf;
namespace fs = std::filesystem;
using bitnet::Index;
using bitnet::Matrix;

namespace {

using file_fixtures::read_text;
using file_fixtures::tree_of;
using file_fixtures::write_text;

struct scratch : file_fixtures::scratch_dir {
  scratch() : file_fixtures::scratch_dir("bitnet_convert_gguf_test_") {}
};

constexpr int hidden = 256, heads = 4, kv_heads = 2, head_dim = hidden / heads, vocab = 32;

struct llama_folder {
  int layers = 2;
  int ff = 512;
  bool lm_head = true;
  st::dtype type = st::dtype::F32;
  nlohmann::json config_extra = nlohmann::json::object();
  std::string extra_tensor{};  // e.g. a bias arch llama has no place for
  bool bitnet = false;         // BitNetForCausalLM: sub-norms, relu2
};

/// A Llama-named model folder: config.json and model.safetensors with values drawn from a seed.
void write_llama(const fs::path& dir, const llama_folder& spec) {
  std::vector<std::pair<std::string, std::vector<std::uint64_t>>> tensors{{"model.embed_tokens.weight", {vocab, hidden}}};
  for (int l = 0; l < spec.layers; ++l) {
    const std::string p = "model.layers." + std::to_string(l) + ".";
    const std::uint64_t h = hidden, kv = kv_heads * head_dim, ff = std::uint64_t(spec.ff);
    for (auto t : std::vector<std::pair<std::string, std::vector<std::uint64_t>>>{
             {"input_layernorm.weight", {h}},          {"self_attn.q_proj.weight", {h, h}},
             {"self_attn.k_proj.weight", {kv, h}},     {"self_attn.v_proj.weight", {kv, h}},
             {"self_attn.o_proj.weight", {h, h}},      {"post_attention_layernorm.weight", {h}},
             {"mlp.gate_proj.weight", {ff, h}},        {"mlp.up_proj.weight", {ff, h}},
             {"mlp.down_proj.weight", {h, ff}}})
      tensors.push_back({p + t.first, t.second});
    if (spec.bitnet) {
      tensors.push_back({p + "self_attn.attn_sub_norm.weight", {h}});
      tensors.push_back({p + "mlp.ffn_sub_norm.weight", {ff}});
    }
  }
  tensors.push_back({"model.norm.weight", {hidden}});
  if (spec.lm_head) tensors.push_back({"lm_head.weight", {vocab, hidden}});
  if (!spec.extra_tensor.empty()) tensors.push_back({spec.extra_tensor, {hidden}});
  std::vector<st::tensor_spec> specs;
  for (const auto& [name, shape] : tensors) specs.push_back({name, spec.type, shape});
  fs::create_directories(dir);
  st::writer out(dir / "model.safetensors", specs, {{"format", "pt"}});
  std::mt19937 rng(11);
  for (const auto& [name, shape] : tensors) {
    const bool vector = shape.size() == 1;
    std::normal_distribution<float> dist(0.0f, vector ? 0.05f : 1.0f / std::sqrt(float(shape[1])));
    std::vector<float> values(std::size_t(vector ? shape[0] : shape[0] * shape[1]));
    for (float& v : values) v = (vector ? 1.0f : 0.0f) + dist(rng);
    out.write_values<float>(name, values);
  }
  out.finish();
  nlohmann::json config{{"architectures", {spec.bitnet ? "BitNetForCausalLM" : "LlamaForCausalLM"}},
                        {"model_type", spec.bitnet ? "bitnet" : "llama"},
                        {"hidden_size", hidden},
                        {"intermediate_size", spec.ff},
                        {"num_hidden_layers", spec.layers},
                        {"num_attention_heads", heads},
                        {"num_key_value_heads", kv_heads},
                        {"vocab_size", vocab},
                        {"max_position_embeddings", 4096},
                        {"rms_norm_eps", 1e-5},
                        {"rope_theta", 500000.0},
                        {"hidden_act", spec.bitnet ? "relu2" : "silu"},
                        {"tie_word_embeddings", !spec.lm_head}};
  config.update(spec.config_extra);
  write_text(dir / "config.json", config.dump(2));
  write_text(dir / "tokenizer.json", R"({"model": {"type": "BPE", "vocab": {"a": 0}}})");
}

bitnet::convert_options gguf_options(gguf::tensor_type type = gguf::tensor_type::TQ2_0) {
  bitnet::convert_options o;
  o.format = bitnet::output_format::gguf;
  o.gguf_ternary_type = type;
  return o;
}

std::string error_of(auto&& action) {
  try {
    action();
  } catch (const bitnet::error& e) {
    return e.what();
  }
  FAIL("expected a bitnet::error");
  return {};
}

/// The source row that file row `r` of a q / k projection holds: within a head of size hd, file
/// row 2b + a is source row a * hd / 2 + b (llama's interleaved rope pairs).
Index source_row(Index r, Index rope_heads, Index rows) {
  if (rope_heads == 0) return r;
  const Index hd = rows / rope_heads, h = r / hd, i = r % hd;
  return h * hd + (i % 2) * (hd / 2) + i / 2;
}

}  // namespace

TEST_CASE("convert to GGUF: a Llama-named folder becomes arch llama; codes, block scales and floats match the source") {
  for (const gguf::tensor_type type : {gguf::tensor_type::TQ2_0, gguf::tensor_type::TQ1_0, gguf::tensor_type::I2_S}) {
    CAPTURE(std::string(gguf::tensor_type_name(type)));
    scratch dir;
    write_llama(dir / "Llama-tiny", {});
    std::vector<bitnet::convert_progress> progress;
    const bitnet::convert_report report = bitnet::convert_model(
        dir / "Llama-tiny", dir / "tiny.gguf", gguf_options(type), [&](const bitnet::convert_progress& p) { progress.push_back(p); });
    // Nothing beside OUT but OUT.
    std::set<std::string> entries;
    for (const auto& e : fs::directory_iterator(dir.path)) entries.insert(e.path().filename().string());
    CHECK(entries == std::set<std::string>{"Llama-tiny", "tiny.gguf"});
    REQUIRE(report.layers.size() == 14);  // 7 projections x 2 blocks; lm_head excluded by default
    CHECK(progress.size() == 1 + 2 * 9 + 2);
    CHECK(progress.back().tensors_done == progress.back().tensors_total);

    const gguf::reader file(dir / "tiny.gguf");
    CHECK(file.get<std::string>("general.architecture") == "llama");
    CHECK(file.get<std::uint32_t>("llama.embedding_length") == 256u);
    CHECK(file.get<std::uint32_t>("llama.block_count") == 2u);
    CHECK(file.get<std::uint32_t>("llama.feed_forward_length") == 512u);
    CHECK(file.get<std::uint32_t>("llama.attention.head_count") == 4u);
    CHECK(file.get<std::uint32_t>("llama.attention.head_count_kv") == 2u);
    CHECK(file.get<std::uint32_t>("llama.rope.dimension_count") == 64u);
    CHECK(file.get<std::uint32_t>("llama.context_length") == 4096u);
    CHECK(file.get<float>("llama.rope.freq_base") == 500000.0f);
    CHECK(file.get<float>("llama.attention.layer_norm_rms_epsilon") == 1e-5f);
    CHECK(file.get<std::string>("tokenizer.ggml.model") == "none");
    CHECK(file.tensors().size() == 1 + 2 * 9 + 2);

    const hf::checkpoint source(dir / "Llama-tiny");
    for (const bitnet::converted_layer& layer : report.layers) {
      CAPTURE(layer.gguf_name);
      const Matrix<float> w = source.read_matrix<float>(layer.name + ".weight");
      const float s = reference::weight_scale(w);
      const Matrix<std::int8_t> codes = reference::weight_codes(w, s);
      const gguf::ternary_tensor stored = file.read_ternary(layer.gguf_name);
      CHECK(file.info(layer.gguf_name).type == type);
      const Index rope = layer.gguf_name.find("attn_q") != std::string::npos   ? heads
                         : layer.gguf_name.find("attn_k") != std::string::npos ? kv_heads
                                                                               : 0;
      REQUIRE(stored.codes.rows() == w.rows());
      REQUIRE(stored.codes.cols() == w.cols());
      bool same_codes = true;
      for (Index r = 0; r < w.rows(); ++r)
        same_codes = same_codes && stored.codes.row(r) == codes.row(source_row(r, rope, w.rows()));
      CHECK(same_codes);
      // d = mean|W| = 1 / s: fp16 (TQ, every block the same) or float32 (I2_S).
      const double d = 1.0 / double(s);
      const double allowed = type == gguf::tensor_type::I2_S ? 1e-7 : 0x1p-11;
      for (const float block_d : stored.scales) CHECK(std::fabs(block_d / d - 1) <= allowed);
      CHECK(layer.weight_scale == double(stored.scales.front()));
      CHECK(std::fabs(layer.scale_rounding - (double(stored.scales.front()) / d - 1)) < 1e-12);
    }
    // Floats in their own type (F32 here): exact; norms 1-D F32; q / k rows permuted for rope.
    CHECK(file.read_matrix<float>("token_embd.weight") == source.read_matrix<float>("model.embed_tokens.weight"));
    CHECK(file.read_matrix<float>("output.weight") == source.read_matrix<float>("lm_head.weight"));
    CHECK(file.info("blk.1.ffn_norm.weight").ne == std::vector<std::uint64_t>{256});
    CHECK(file.read_matrix<float>("blk.1.ffn_norm.weight") ==
          Matrix<float>(source.read_vector<float>("model.layers.1.post_attention_layernorm.weight").transpose()));
  }
}

TEST_CASE("convert to GGUF: each layer read back computes what the packed safetensors path's layer computes") {
  scratch dir;
  write_llama(dir / "m", {.layers = 1});
  bitnet::convert_model(dir / "m", dir / "packed", {});
  bitnet::convert_model(dir / "m", dir / "m.gguf", gguf_options());
  const hf::checkpoint packed(dir / "packed");
  const gguf::reader file(dir / "m.gguf");
  std::mt19937 rng(5);
  for (const auto& names : std::vector<std::pair<std::string, std::string>>{
           {"model.layers.0.self_attn.v_proj", "blk.0.attn_v.weight"},
           {"model.layers.0.mlp.down_proj", "blk.0.ffn_down.weight"},
           {"model.layers.0.self_attn.q_proj", "blk.0.attn_q.weight"}}) {
    const std::string& module = names.first;
    const std::string& gguf_name = names.second;  // (Clang 14 cannot capture a structured binding)
    CAPTURE(gguf_name);
    const bitnet::BitLinear<float> from_packed =
        hf::to_bit_linear(hf::read_packed_layer<float>(packed, module));
    const bitnet::BitLinear<float> from_gguf = file.read_bit_linear<float>(gguf_name);
    const Index rope = gguf_name.find("attn_q") != std::string::npos ? heads : 0;
    const Matrix<float> x = reference::random_matrix<float>(3, from_packed.in_features(), rng);
    const Matrix<float> a = from_packed.forward(x), b = from_gguf.forward(x);
    // The only difference: d in fp16 (relative error <= 2^-11), the same for every output.
    const double rounding = std::fabs(double(from_packed.weight_scale()) / double(from_gguf.weight_scale()) - 1);
    CHECK(rounding <= 0x1p-11 * 1.0001);
    for (Index r = 0; r < a.rows(); ++r)
      for (Index c = 0; c < a.cols(); ++c)
        CHECK(std::fabs(b(r, c) - a(r, source_row(c, rope, a.cols()))) <=
              (rounding + 1e-6) * std::fabs(a(r, source_row(c, rope, a.cols()))) + 1e-30);
    const Matrix<std::int8_t> gguf_codes = from_gguf.ternary_weight(), packed_codes = from_packed.ternary_weight();
    bool same_codes = true;
    for (Index r = 0; r < a.cols(); ++r) same_codes = same_codes && gguf_codes.row(r) == packed_codes.row(source_row(r, rope, a.cols()));
    CHECK(same_codes);
  }
}

TEST_CASE("convert to GGUF: float type, tied output, rows that do not fit the blocks, replacing an earlier output") {
  scratch dir;
  write_llama(dir / "m", {.layers = 1, .ff = 320, .lm_head = false, .type = st::dtype::BF16});
  bitnet::convert_options options = gguf_options();
  options.gguf_float_type = gguf::tensor_type::F16;
  const bitnet::convert_report report = bitnet::convert_model(dir / "m", dir / "m.gguf", options);
  const gguf::reader file(dir / "m.gguf");
  CHECK(file.find("output.weight") == nullptr);  // llama.cpp ties it to token_embd
  CHECK(file.info("token_embd.weight").type == gguf::tensor_type::F16);
  CHECK(file.info("blk.0.attn_norm.weight").type == gguf::tensor_type::F32);
  // down_proj: 320 inputs are no whole number of 256-weight blocks: kept as floats, and said so.
  CHECK(file.info("blk.0.ffn_down.weight").type == gguf::tensor_type::F16);
  CHECK(report.layers.size() == 6);
  const auto has_note = [&](const std::string& text) {
    return std::any_of(report.notes.begin(), report.notes.end(), [&](const std::string& n) { return n.find(text) != std::string::npos; });
  };
  CHECK(has_note("model.layers.0.mlp.down_proj: in_features 320 is not a multiple of 256"));
  CHECK(has_note("tokenizer: not carried"));
  // BF16 values into F16: each the nearest fp16 (these are small normal values: relative error <= 2^-11).
  const hf::checkpoint source(dir / "m");
  const Matrix<float> embd = source.read_matrix<float>("model.embed_tokens.weight");
  const Matrix<float> stored = file.read_matrix<float>("token_embd.weight");
  for (Index i = 0; i < embd.size(); ++i)
    CHECK(std::fabs(stored.data()[i] - embd.data()[i]) <= 0x1p-11 * std::fabs(embd.data()[i]));

  // An earlier output is replaced (no force needed); a foreign file only with force.
  const std::string before = read_text(dir / "m.gguf");
  options.gguf_float_type = gguf::tensor_type::F32;
  bitnet::convert_model(dir / "m", dir / "m.gguf", options);
  CHECK(gguf::reader(dir / "m.gguf").info("token_embd.weight").type == gguf::tensor_type::F32);
  write_text(dir / "other.gguf", "not mine");
  CHECK(error_of([&] { bitnet::convert_model(dir / "m", dir / "other.gguf", options); })
            .find("is not an earlier bitnet-convert output") != std::string::npos);
  CHECK(read_text(dir / "other.gguf") == "not mine");
  options.force = true;
  bitnet::convert_model(dir / "m", dir / "other.gguf", options);
  CHECK(gguf::reader(dir / "other.gguf").find("token_embd.weight") != nullptr);
}

TEST_CASE("convert to GGUF: refusals name the reason and leave the file system exactly as it was") {
  scratch dir;
  write_llama(dir / "llama", {.layers = 1});
  write_llama(dir / "bitnet", {.layers = 1, .config_extra = {{"architectures", {"BitNetForCausalLM"}}, {"model_type", "bitnet"}}});
  write_llama(dir / "scaled", {.layers = 1, .config_extra = {{"rope_scaling", {{"rope_type", "llama3"}, {"factor", 8.0}}}}});
  write_llama(dir / "bias", {.layers = 1, .extra_tensor = "model.layers.0.self_attn.q_proj.bias"});
  write_llama(dir / "mistral", {.layers = 1, .config_extra = {{"architectures", {"MistralForCausalLM"}}}});
  write_llama(dir / "short", {.layers = 1, .config_extra = {{"num_hidden_layers", 2}}});
  write_text(dir / "taken.gguf", "someone else's file");
  const auto refused = [&](const fs::path& in, const fs::path& out, const std::string& expected,
                           bitnet::convert_options options = gguf_options()) {
    CAPTURE(expected);
    const auto before = tree_of(dir.path);
    CHECK(error_of([&] { bitnet::convert_model(in, out, options); }).find(expected) != std::string::npos);
    CHECK(tree_of(dir.path) == before);
  };
  refused(dir / "bitnet", dir / "b.gguf", "engines name its GGUF arch differently");
  refused(dir / "scaled", dir / "s.gguf", "\"rope_scaling\"");
  refused(dir / "bias", dir / "b.gguf", "has no place in GGUF arch llama");
  refused(dir / "mistral", dir / "m.gguf", "supports Llama-architecture folders");
  refused(dir / "short", dir / "m.gguf", "has no tensor for blk.1.attn_norm.weight");
  refused(dir / "llama" / "model.safetensors", dir / "m.gguf", "give the model folder");
  refused(dir / "llama", dir / "llama" / "m.gguf", "inside the input folder");
  refused(dir / "llama", dir / "taken.gguf", "is not an earlier bitnet-convert output");
  refused(dir / "llama", dir / "llama", "is a folder; GGUF output is one file");
  refused(dir / "llama", dir / "no-such-folder" / "m.gguf", "no such folder");
  // Failures while writing (a cancel after the third tensor; a NaN) leave no OUT and no staging file.
  bitnet::convert_options cancel = gguf_options();
  int ticks = 0;
  cancel.cancelled = [&] { return ++ticks == 3; };
  refused(dir / "llama", dir / "c.gguf", "conversion cancelled", cancel);
  {
    const st::reader f(dir / "llama" / "model.safetensors");
    std::vector<st::tensor_spec> specs;
    for (const auto& t : f.tensors()) specs.push_back({t.name, t.type, t.shape});
    fs::create_directories(dir / "nan");
    st::writer out(dir / "nan" / "model.safetensors", specs, {});
    for (const auto& t : f.tensors()) {
      std::vector<float> v = f.read_values<float>(t.name);
      if (t.name == "model.layers.0.mlp.up_proj.weight") v[7] = std::nanf("");
      out.write_values<float>(t.name, v);
    }
    out.finish();
    fs::copy_file(dir / "llama" / "config.json", dir / "nan" / "config.json");
  }
  refused(dir / "nan", dir / "n.gguf", "non-finite value (nan) at row 0, column 7");
  // Options that do not apply to GGUF are refused before anything is read.
  bitnet::convert_options bad = gguf_options(gguf::tensor_type::Q4_0);
  refused(dir / "llama", dir / "m.gguf", "is not a ternary GGUF type", bad);
  bad = gguf_options();
  bad.scale_dtype = st::dtype::F16;
  refused(dir / "llama", dir / "m.gguf", "scale_dtype does not apply", bad);
  bad = gguf_options();
  bad.gguf_float_type = gguf::tensor_type::Q8_0;
  refused(dir / "llama", dir / "m.gguf", "is not F32, F16 or BF16", bad);
  bad = {};
  bad.gguf_tokenizer_from = dir / "vocab.gguf";
  refused(dir / "llama", dir / "packed", "apply to GGUF output (format gguf) only", bad);
}

namespace {

/// A vocabulary-only GGUF as llama.cpp's converter writes one (no tensors): `tokens` tokens.
void write_vocab(const fs::path& path, std::size_t tokens, bool with_model = true) {
  std::vector<std::string> list;
  std::vector<std::int32_t> types;
  for (std::size_t i = 0; i < tokens; ++i) {
    list.push_back(i == 0 ? "<|begin_of_text|>" : "t" + std::to_string(i));
    types.push_back(i == 0 ? 3 : 1);  // CONTROL, NORMAL
  }
  std::vector<gguf::metadata_entry> m{{"general.architecture", std::string("llama")}};
  if (with_model) m.push_back({"tokenizer.ggml.model", std::string("gpt2")});
  m.push_back({"tokenizer.ggml.pre", std::string("llama-bpe")});
  m.push_back({"tokenizer.ggml.tokens", gguf::array(list)});
  m.push_back({"tokenizer.ggml.token_type", gguf::array(types)});
  m.push_back({"tokenizer.ggml.merges", gguf::array(std::vector<std::string>{"t 1", "t 2"})});
  m.push_back({"tokenizer.ggml.bos_token_id", std::uint32_t(0)});
  m.push_back({"tokenizer.ggml.eos_token_id", std::uint32_t(1)});
  gguf::writer out(path, std::move(m), {});
  out.finish();
}

}  // namespace

TEST_CASE("convert to GGUF: tokenizer entries copied verbatim from a vocabulary GGUF of the same vocabulary size") {
  scratch dir;
  write_llama(dir / "m", {.layers = 1});
  write_vocab(dir / "vocab.gguf", vocab);
  bitnet::convert_options options = gguf_options();
  options.gguf_tokenizer_from = dir / "vocab.gguf";
  const bitnet::convert_report report = bitnet::convert_model(dir / "m", dir / "m.gguf", options);
  const gguf::reader source(dir / "vocab.gguf"), file(dir / "m.gguf");
  std::size_t copied = 0;
  for (const gguf::metadata_entry& e : source.metadata()) {
    if (!e.key.starts_with("tokenizer.")) continue;
    CAPTURE(e.key);
    REQUIRE(file.find_value(e.key) != nullptr);
    CHECK(*file.find_value(e.key) == e.val);
    ++copied;
  }
  CHECK(copied == 7);
  CHECK(file.get<std::string>("tokenizer.ggml.model") == "gpt2");
  CHECK(std::any_of(report.notes.begin(), report.notes.end(), [](const std::string& n) {
    return n.find("tokenizer: 7 tokenizer.* entries copied") != std::string::npos && n.find("32 tokens") != std::string::npos;
  }));

  // Another vocabulary size, or no tokenizer model: refused, nothing written.
  write_vocab(dir / "other.gguf", vocab + 1);
  write_vocab(dir / "nomodel.gguf", vocab, false);
  const auto before = tree_of(dir.path);
  options.gguf_tokenizer_from = dir / "other.gguf";
  CHECK(error_of([&] { bitnet::convert_model(dir / "m", dir / "x.gguf", options); }).find("33 tokens, the model's vocab_size is 32") !=
        std::string::npos);
  options.gguf_tokenizer_from = dir / "nomodel.gguf";
  CHECK(error_of([&] { bitnet::convert_model(dir / "m", dir / "x.gguf", options); }).find("no tokenizer.ggml.model") !=
        std::string::npos);
  CHECK(tree_of(dir.path) == before);
}

TEST_CASE("convert to GGUF: a BitNet folder becomes arch bitnet-b1.58 or bitnet-25 (bitnet.cpp / ik_llama.cpp) only when asked for") {
  scratch dir;
  write_llama(dir / "BitNet-tiny", {.bitnet = true});
  const auto before = tree_of(dir.path);
  // No target named: the engines disagree on the arch, so nothing is guessed.
  CHECK(error_of([&] { bitnet::convert_model(dir / "BitNet-tiny", dir / "b.gguf", gguf_options(gguf::tensor_type::I2_S)); })
            .find("--gguf-arch bitnet-b1.58") != std::string::npos);
  bitnet::convert_options o = gguf_options(gguf::tensor_type::TQ2_0);
  o.gguf_arch = gguf::model_arch::bitnet_b158;
  CHECK(error_of([&] { bitnet::convert_model(dir / "BitNet-tiny", dir / "b.gguf", o); }).find("use I2_S") != std::string::npos);
  o.gguf_ternary_type = gguf::tensor_type::I2_S;
  write_llama(dir / "Llama-tiny", {});
  CHECK(error_of([&] { bitnet::convert_model(dir / "Llama-tiny", dir / "b.gguf", o); }).find("not") != std::string::npos);
  write_llama(dir / "BitNet-silu", {.config_extra = {{"hidden_act", "silu"}}, .bitnet = true});
  CHECK(error_of([&] { bitnet::convert_model(dir / "BitNet-silu", dir / "b.gguf", o); }).find("relu2") != std::string::npos);
  fs::remove_all(dir / "Llama-tiny");
  fs::remove_all(dir / "BitNet-silu");
  CHECK(tree_of(dir.path) == before);

  const bitnet::convert_report report = bitnet::convert_model(dir / "BitNet-tiny", dir / "b.gguf", o);
  REQUIRE(report.layers.size() == 14);
  const gguf::reader file(dir / "b.gguf");
  CHECK(file.get<std::string>("general.architecture") == "bitnet-b1.58");
  CHECK(file.get<std::uint32_t>("bitnet-b1.58.embedding_length") == 256u);
  CHECK(file.get<std::uint32_t>("bitnet-b1.58.block_count") == 2u);
  CHECK(file.get<std::uint32_t>("bitnet-b1.58.feed_forward_length") == 512u);
  CHECK(file.get<std::uint32_t>("bitnet-b1.58.attention.head_count_kv") == 2u);
  CHECK(file.get<float>("bitnet-b1.58.rope.freq_base") == 500000.0f);
  CHECK(!file.find_value("llama.block_count"));
  {  // the older name of the same graph: only the name and key prefix differ
    bitnet::convert_options older = o;
    older.gguf_arch = gguf::model_arch::bitnet_25;
    bitnet::convert_model(dir / "BitNet-tiny", dir / "b25.gguf", older);
    const gguf::reader b25(dir / "b25.gguf");
    CHECK(b25.get<std::string>("general.architecture") == "bitnet-25");
    CHECK(b25.get<std::uint32_t>("bitnet-25.block_count") == 2u);
    CHECK(b25.tensors().size() == file.tensors().size());
  }
  CHECK(file.tensors().size() == 1 + 2 * 11 + 2);
  const hf::checkpoint source(dir / "BitNet-tiny");
  // NEOX rope: q and k rows stay in the source order (arch llama permutes them).
  for (const bitnet::converted_layer& layer : report.layers) {
    CAPTURE(layer.gguf_name);
    const Matrix<float> w = source.read_matrix<float>(layer.name + ".weight");
    CHECK(file.read_ternary(layer.gguf_name).codes == reference::weight_codes(w, reference::weight_scale(w)));
  }
  for (const int b : {0, 1}) {
    const std::string blk = "blk." + std::to_string(b) + ".", hf_blk = "model.layers." + std::to_string(b) + ".";
    CHECK(file.info(blk + "attn_sub_norm.weight").ne == std::vector<std::uint64_t>{256});
    CHECK(file.info(blk + "ffn_sub_norm.weight").ne == std::vector<std::uint64_t>{512});
    CHECK(file.read_matrix<float>(blk + "attn_sub_norm.weight") ==
          Matrix<float>(source.read_vector<float>(hf_blk + "self_attn.attn_sub_norm.weight").transpose()));
    CHECK(file.read_matrix<float>(blk + "ffn_sub_norm.weight") ==
          Matrix<float>(source.read_vector<float>(hf_blk + "mlp.ffn_sub_norm.weight").transpose()));
    // The order ik_llama.cpp's loader does not care about, but the file's: sub-norm before its projection.
    const auto& t = file.tensors();
    const auto at = [&](const std::string& n) {
      return std::find_if(t.begin(), t.end(), [&](const gguf::tensor_info& i) { return i.name == n; }) - t.begin();
    };
    CHECK(at(blk + "attn_sub_norm.weight") + 1 == at(blk + "attn_output.weight"));
    CHECK(at(blk + "ffn_sub_norm.weight") + 1 == at(blk + "ffn_down.weight"));
  }
}

TEST_CASE("convert to GGUF: Llama 3.x rope scaling becomes the rope_freqs tensor llama.cpp reads") {
  scratch dir;
  const nlohmann::json llama3{{"rope_type", "llama3"},       {"factor", 8.0},
                              {"low_freq_factor", 1.0},      {"high_freq_factor", 4.0},
                              {"original_max_position_embeddings", 8192}};
  write_llama(dir / "Llama-3-tiny", {.layers = 1, .config_extra = {{"rope_scaling", llama3}}});
  const bitnet::convert_report report = bitnet::convert_model(dir / "Llama-3-tiny", dir / "l3.gguf", gguf_options());
  const gguf::reader file(dir / "l3.gguf");
  REQUIRE(file.info("rope_freqs.weight").type == gguf::tensor_type::F32);
  REQUIRE(file.info("rope_freqs.weight").ne == std::vector<std::uint64_t>{32});  // head_dim 64 / 2
  const Matrix<float> f = file.read_matrix<float>("rope_freqs.weight");
  // By hand, rope_theta 500000, head_dim 64: pair i's wavelength 2 pi 500000^(i / 32) is below
  // 8192 / 4 for i <= 14 (kept), above 8192 / 1 for i >= 18 (stretched by 8), between for 15..17.
  for (Index i = 0; i <= 14; ++i) CHECK(f(0, i) == 1.0f);
  for (Index i = 18; i < 32; ++i) CHECK(f(0, i) == 8.0f);
  // The band as transformers computes it: the new inverse frequency blends inv_freq / factor and
  // inv_freq, and the file holds their ratio.
  for (Index i = 15; i <= 17; ++i) {
    const double inv_freq = 1.0 / std::pow(500000.0, double(2 * i) / 64.0);
    const double smooth = (8192.0 * inv_freq / (2 * 3.14159265358979323846) - 1.0) / (4.0 - 1.0);
    const double blended = (1 - smooth) * inv_freq / 8.0 + smooth * inv_freq;
    CHECK(f(0, i) > 1.0f);
    CHECK(f(0, i) < 8.0f);
    CHECK(double(f(0, i)) == doctest::Approx(inv_freq / blended).epsilon(1e-6));
  }
  CHECK(std::any_of(report.notes.begin(), report.notes.end(),
                    [](const std::string& n) { return n.find("rope_freqs") != std::string::npos; }));

  // Other scalings, or llama3 without its parameters, are refused and write nothing.
  write_llama(dir / "linear", {.layers = 1, .config_extra = {{"rope_scaling", {{"type", "linear"}, {"factor", 2.0}}}}});
  nlohmann::json partial = llama3;
  partial.erase("high_freq_factor");
  write_llama(dir / "partial", {.layers = 1, .config_extra = {{"rope_scaling", partial}}});
  const auto before = tree_of(dir.path);
  CHECK(error_of([&] { bitnet::convert_model(dir / "linear", dir / "x.gguf", gguf_options()); })
            .find("writes only Llama 3.x's") != std::string::npos);
  CHECK(error_of([&] { bitnet::convert_model(dir / "partial", dir / "x.gguf", gguf_options()); })
            .find("\"high_freq_factor\" must be a finite number > 0") != std::string::npos);
  CHECK(tree_of(dir.path) == before);
}

TEST_CASE("convert to GGUF: a packed BitNet folder (as 2B-4T is published) goes in exactly, nothing re-quantized") {
  for (const bool bitnet_arch : {true, false}) {
    CAPTURE(bitnet_arch);
    scratch dir;
    write_llama(dir / "dense", {.bitnet = bitnet_arch});
    bitnet::convert_model(dir / "dense", dir / "packed");  // the packed safetensors form, quantization_config offline
    bitnet::convert_options o = gguf_options(gguf::tensor_type::I2_S);
    if (bitnet_arch) o.gguf_arch = gguf::model_arch::bitnet_b158;
    const bitnet::convert_report from_dense = bitnet::convert_model(dir / "dense", dir / "dense.gguf", o);
    const bitnet::convert_report from_packed = bitnet::convert_model(dir / "packed", dir / "packed.gguf", o);
    // The same folder packed in base 3 (bitnet_weight_storage "base3") gives the same GGUF tensors.
    bitnet::convert_options base3;
    base3.storage = bitnet::weight_storage::base3;
    bitnet::convert_model(dir / "dense", dir / "packed_base3", base3);
    bitnet::convert_model(dir / "packed_base3", dir / "packed_base3.gguf", o);
    REQUIRE(from_packed.layers.size() == from_dense.layers.size());
    const gguf::reader a(dir / "dense.gguf"), b(dir / "packed.gguf"), c(dir / "packed_base3.gguf");
    REQUIRE(a.tensors().size() == b.tensors().size());
    for (const bitnet::converted_layer& layer : from_packed.layers) {
      CAPTURE(layer.gguf_name);
      CHECK(layer.relative_error == 0);  // nothing quantized: the codes are the file's
      const gguf::ternary_tensor x = a.read_ternary(layer.gguf_name), y = b.read_ternary(layer.gguf_name);
      CHECK(x.codes == y.codes);  // same codes, in the same (rope) row order
      const gguf::ternary_tensor z = c.read_ternary(layer.gguf_name);
      CHECK(z.codes == y.codes);
      CHECK(z.scales == y.scales);
      for (std::size_t k = 0; k < x.scales.size(); ++k)
        CHECK(std::fabs(double(y.scales[k]) / double(x.scales[k]) - 1) <= 0x1p-23);  // d through the F32 weight_scale
    }
  }
  // A packed layer has no floats to fall back to: rows that are no whole number of blocks are refused.
  scratch dir;
  write_llama(dir / "dense", {.ff = 320, .bitnet = true});
  bitnet::convert_model(dir / "dense", dir / "packed");
  bitnet::convert_options o = gguf_options(gguf::tensor_type::I2_S);
  o.gguf_arch = gguf::model_arch::bitnet_b158;
  const auto before = tree_of(dir.path);
  CHECK(error_of([&] { bitnet::convert_model(dir / "packed", dir / "p.gguf", o); })
            .find("in_features 320 is not a multiple of 128") != std::string::npos);
  CHECK(tree_of(dir.path) == before);
}
