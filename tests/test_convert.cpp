// bitnet::convert_model on the folder shapes people download: hub cache snapshots (linked files),
// trailing slashes, files no index lists, tied embeddings, biases in both scale conventions
// (against transformers' own formulas), existing outputs, cancellation, leftovers of killed runs.
#include <bitnet/convert.hpp>

#include <cmath>
#include <cstdint>
#include <filesystem>
#include <fstream>
#include <map>
#include <random>
#include <regex>
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
namespace fs = std::filesystem;
using bitnet::Index;
using bitnet::Matrix;
using bitnet::Vector;

namespace {

using file_fixtures::read_text;
using file_fixtures::tree_of;
using file_fixtures::write_text;

struct scratch_dir : file_fixtures::scratch_dir {
  scratch_dir() : file_fixtures::scratch_dir("bitnet_convert_test_") {}
};

/// A small Llama-named model: tensor name -> shape (1-D or 2-D), written as F32 with values
/// drawn from `seed` (norm weights near 1, biases std 0.5, matrices std 1/sqrt(in)).
using tensor_list = std::vector<std::pair<std::string, std::vector<std::uint64_t>>>;

void write_shard(const fs::path& file, const tensor_list& tensors, unsigned seed) {
  std::vector<st::tensor_spec> specs;
  for (const auto& [name, shape] : tensors) specs.push_back({name, st::dtype::F32, shape});
  fs::create_directories(file.parent_path());
  st::writer out(file, specs, {{"format", "pt"}});
  std::mt19937 rng(seed);
  for (const auto& [name, shape] : tensors) {
    const bool vector = shape.size() == 1, bias = name.ends_with(".bias");
    std::normal_distribution<float> dist(0.0f, bias ? 0.5f : vector ? 0.05f : 1.0f / std::sqrt(float(shape[1])));
    std::vector<float> values(std::size_t(vector ? shape[0] : shape[0] * shape[1]));
    for (float& v : values) v = (vector && !bias ? 1.0f : 0.0f) + dist(rng);
    out.write_values<float>(name, values);
  }
  out.finish();
}

tensor_list llama_layer(int l, bool qkv_bias) {
  const std::string p = "model.layers." + std::to_string(l) + ".";
  tensor_list t{{p + "input_layernorm.weight", {8}},       {p + "self_attn.q_proj.weight", {8, 8}},
                {p + "self_attn.k_proj.weight", {4, 8}},   {p + "self_attn.v_proj.weight", {4, 8}},
                {p + "self_attn.o_proj.weight", {8, 8}},   {p + "post_attention_layernorm.weight", {8}},
                {p + "mlp.gate_proj.weight", {12, 8}},     {p + "mlp.up_proj.weight", {12, 8}},
                {p + "mlp.down_proj.weight", {8, 12}}};
  if (qkv_bias)
    for (const char* proj : {"q", "k", "v"})
      t.push_back({p + "self_attn." + proj + "_proj.bias", {std::string(proj) == "q" ? 8u : 4u}});
  return t;
}

struct model_spec {
  int layers = 2;
  bool tied = false, qkv_bias = false;
  int shards = 1;
};

/// A model folder: config.json, model.safetensors or `shards` shards with an index, tokenizer.json.
void write_model(const fs::path& dir, const model_spec& spec, unsigned seed = 1) {
  std::vector<tensor_list> shards(std::size_t(spec.shards));
  shards.front().push_back({"model.embed_tokens.weight", {16, 8}});
  for (int l = 0; l < spec.layers; ++l)
    for (auto& t : llama_layer(l, spec.qkv_bias)) shards[std::size_t(l % spec.shards)].push_back(t);
  shards.back().push_back({"model.norm.weight", {8}});
  if (!spec.tied) shards.back().push_back({"lm_head.weight", {16, 8}});
  nlohmann::json index{{"metadata", {{"total_size", 0}}}, {"weight_map", nlohmann::json::object()}};
  for (std::size_t k = 0; k < shards.size(); ++k) {
    const std::string name = spec.shards == 1 ? std::string("model.safetensors")
                                              : "model-0000" + std::to_string(k + 1) + "-of-0000" +
                                                    std::to_string(spec.shards) + ".safetensors";
    write_shard(dir / name, shards[k], seed + unsigned(k));
    for (const auto& [tensor, shape] : shards[k]) index["weight_map"][tensor] = name;
  }
  if (spec.shards > 1) write_text(dir / "model.safetensors.index.json", index.dump(2));
  write_text(dir / "config.json", nlohmann::json{{"architectures", {"LlamaForCausalLM"}},
                                                 {"model_type", "llama"},
                                                 {"hidden_size", 8},
                                                 {"tie_word_embeddings", spec.tied}}
                                      .dump(2));
  write_text(dir / "tokenizer.json", R"({"model": {"type": "BPE"}})");
}

nlohmann::json json_of(const fs::path& path) { return nlohmann::json::parse(read_text(path)); }

std::string error_of(auto&& action) {
  try {
    action();
  } catch (const bitnet::error& e) {
    return e.what();
  }
  FAIL("expected a bitnet::error");
  return {};
}

}  // namespace

TEST_CASE("convert: a hub cache snapshot (relative links into ../../blobs) converts into regular files") {
  scratch_dir dir;
  write_model(dir / "plain", {});
  // models--org--name/snapshots/<rev>/<file> -> ../../blobs/<hash>, as huggingface_hub lays it out.
  const fs::path repo = dir / "hub" / "models--org--name";
  fs::create_directories(repo / "blobs");
  fs::create_directories(repo / "snapshots" / "rev1");
  int n = 0;
  for (const auto& entry : fs::directory_iterator(dir / "plain")) {
    const std::string blob = "blob" + std::to_string(n++);
    fs::copy_file(entry.path(), repo / "blobs" / blob);
    fs::create_symlink(fs::path("../../blobs") / blob, repo / "snapshots" / "rev1" / entry.path().filename());
  }
  const auto before = tree_of(dir.path);
  const bitnet::convert_report report = bitnet::convert_model(repo / "snapshots" / "rev1", dir / "sub" / "out");
  CHECK(report.layers.size() == 14);
  // Everything written is under sub/out, and every file there is a regular file.
  auto after = tree_of(dir.path);
  for (const auto& [path, content] : before) CHECK(after.at(path) == content);
  std::set<std::string> added;
  for (const auto& [path, content] : after)
    if (!before.contains(path)) added.insert(path);
  CHECK(added == std::set<std::string>{"sub", "sub/out", "sub/out/config.json", "sub/out/model.safetensors",
                                       "sub/out/tokenizer.json"});
  for (const auto& entry : fs::directory_iterator(dir / "sub" / "out")) CHECK_FALSE(entry.is_symlink());
  CHECK(read_text(dir / "sub" / "out" / "tokenizer.json") == read_text(dir / "plain" / "tokenizer.json"));
  CHECK(hf::checkpoint(dir / "sub" / "out").quantization()->mode == hf::quantization_mode::offline);
}

TEST_CASE("convert: an absolutely linked input file is read through its link, never written beside OUT") {
  scratch_dir dir;
  write_model(dir / "in", {});
  fs::create_directories(dir / "elsewhere");
  fs::rename(dir / "in" / "tokenizer.json", dir / "elsewhere" / "tokenizer.json");
  fs::create_symlink(fs::absolute(dir / "elsewhere" / "tokenizer.json"), dir / "in" / "tokenizer.json");
  // A linked folder is copied as a folder.
  write_text(dir / "extras" / "notes.txt", "notes");
  fs::create_directory_symlink(fs::absolute(dir / "extras"), dir / "in" / "extras");
  bitnet::convert_model(dir / "in", dir / "sub" / "out");
  CHECK_FALSE(fs::exists(dir / "sub" / "elsewhere"));
  CHECK(fs::is_regular_file(fs::symlink_status(dir / "sub" / "out" / "tokenizer.json")));
  CHECK(read_text(dir / "sub" / "out" / "tokenizer.json") == R"({"model": {"type": "BPE"}})");
  CHECK(fs::is_directory(fs::symlink_status(dir / "sub" / "out" / "extras")));
  CHECK(read_text(dir / "sub" / "out" / "extras" / "notes.txt") == "notes");
}

TEST_CASE("convert: a dangling link or a loop of linked folders is an error naming it; nothing is written") {
  scratch_dir dir;
  write_model(dir / "in", {});
  fs::create_symlink(dir / "nowhere.json", dir / "in" / "special_tokens_map.json");
  auto before = tree_of(dir.path);
  CHECK(error_of([&] { bitnet::convert_model(dir / "in", dir / "out"); }).find("special_tokens_map.json") !=
        std::string::npos);
  CHECK(tree_of(dir.path) == before);
  fs::remove(dir / "in" / "special_tokens_map.json");
  fs::create_directory_symlink(fs::absolute(dir / "in"), dir / "in" / "loop");
  before = tree_of(dir.path);
  CHECK(error_of([&] { bitnet::convert_model(dir / "in", dir / "out"); }).find("loop") != std::string::npos);
  CHECK(tree_of(dir.path) == before);
}

TEST_CASE("convert: trailing slashes name the same folders; a failure leaves no OUT and no staging folder") {
  scratch_dir dir;
  write_model(dir / "in", {});
  bitnet::convert_model((dir / "in").string() + "/", (dir / "out").string() + "/");
  CHECK(fs::exists(dir / "out" / "model.safetensors"));
  // A NaN in a weight: refused, with a trailing slash too, and nothing left behind.
  write_model(dir / "bad", {});
  {
    std::vector<st::tensor_spec> specs{{"model.layers.0.mlp.up_proj.weight", st::dtype::F32, {2, 2}}};
    st::writer w(dir / "bad" / "model.safetensors", specs, {});
    const float values[] = {1, std::nanf(""), 3, 4};
    w.write_values<float>("model.layers.0.mlp.up_proj.weight", values);
    w.finish();
  }
  const auto before = tree_of(dir.path);
  CHECK(error_of([&] { bitnet::convert_model(dir / "bad/", (dir / "new").string() + "/"); })
            .find("non-finite value (nan) at row 0, column 1") != std::string::npos);
  CHECK(tree_of(dir.path) == before);
}

TEST_CASE("convert: the output index lists exactly what the input index lists; unlisted files are copied") {
  scratch_dir dir;
  write_model(dir / "in", {.layers = 2, .shards = 2});
  // Mistral ships consolidated.safetensors beside the shards, holding the same tensor names.
  write_shard(dir / "in" / "consolidated.safetensors", llama_layer(0, false), 7);
  const bitnet::convert_report report = bitnet::convert_model(dir / "in", dir / "out");
  const nlohmann::json in_index = json_of(dir / "in" / "model.safetensors.index.json");
  const nlohmann::json out_index = json_of(dir / "out" / "model.safetensors.index.json");
  std::set<std::string> expected;
  std::uint64_t total = 0;
  for (const auto& [name, shard] : in_index["weight_map"].items()) {
    CHECK(shard != "consolidated.safetensors");
    expected.insert(name);
    if (name.ends_with("proj.weight")) expected.insert(name.substr(0, name.size() - 7) + ".weight_scale");
  }
  std::set<std::string> listed;
  for (const auto& [name, shard] : out_index["weight_map"].items()) {
    listed.insert(name);
    CHECK(shard == in_index["weight_map"].value(name, in_index["weight_map"].value(name.substr(0, name.rfind('.')) + ".weight", std::string())));
    total += hf::checkpoint(dir / "out").info(name).byte_size();
  }
  CHECK(listed == expected);
  CHECK(out_index["metadata"]["total_size"].get<std::uint64_t>() == total);
  CHECK(read_text(dir / "out" / "consolidated.safetensors") == read_text(dir / "in" / "consolidated.safetensors"));
  CHECK(std::count(report.copied_files.begin(), report.copied_files.end(), "consolidated.safetensors") == 1);
  bool noted = false;
  for (const std::string& note : report.notes) noted |= note.starts_with("consolidated.safetensors is not part of the model");
  CHECK(noted);
}

TEST_CASE("convert: a folder with model.safetensors and an index uses model.safetensors, as transformers does") {
  scratch_dir dir;
  write_model(dir / "in", {.layers = 1});
  write_model(dir / "sharded", {.layers = 1, .shards = 2}, 9);
  for (const auto& entry : fs::directory_iterator(dir / "sharded"))
    if (entry.path().filename() != "config.json" && entry.path().filename() != "tokenizer.json")
      fs::copy_file(entry.path(), dir / "in" / entry.path().filename());
  const hf::checkpoint in(dir / "in");
  CHECK_FALSE(in.uses_index());
  REQUIRE(in.notes().size() == 1);
  CHECK(in.notes()[0].find("model.safetensors is the model, as transformers loads it") != std::string::npos);
  const bitnet::convert_report report = bitnet::convert_model(dir / "in", dir / "out");
  CHECK(report.model_files == std::vector<std::string>{"model.safetensors"});
  // The unused index and its shards are copied unchanged; the model is model.safetensors.
  CHECK(read_text(dir / "out" / "model.safetensors.index.json") == read_text(dir / "in" / "model.safetensors.index.json"));
  CHECK(hf::checkpoint(dir / "out").info("model.layers.0.mlp.up_proj.weight").type == st::dtype::U8);
}

namespace {

// transformers' two rules for modules_to_not_convert, written from their sources independently of
// the library: integrations/bitnet.py (4.4x-4.5x) keeps a module when a key is a substring of its
// dotted path or equals its own name; quantizers_utils.should_convert_module keeps it when
// re.match(key + "\.") or re.match(key) matches at the start, or the path ends with the key.
bool kept_by_substring_rule(const std::string& path, const std::vector<std::string>& keys) {
  const std::string name = path.substr(path.rfind('.') == std::string::npos ? 0 : path.rfind('.') + 1);
  for (const std::string& key : keys)
    if (path.find(key) != std::string::npos || name == key) return true;
  return false;
}
bool kept_by_prefix_rule(const std::string& path, const std::vector<std::string>& keys) {
  for (const std::string& key : keys) {
    if (std::regex_search(path, std::regex(key + "\\."), std::regex_constants::match_continuous) ||
        std::regex_search(path, std::regex(key), std::regex_constants::match_continuous) ||
        (path.size() >= key.size() && path.compare(path.size() - key.size(), key.size(), key) == 0))
      return true;
  }
  return false;
}

}  // namespace

TEST_CASE("convert: tied embeddings - modules_to_not_convert keeps the tied lm_head under transformers' rules") {
  scratch_dir dir;
  for (const bool tied : {true, false}) {
    CAPTURE(tied);
    const std::string name = tied ? "tied" : "untied";
    write_model(dir / name, {.layers = 2, .tied = tied});
    const bitnet::convert_report report = bitnet::convert_model(dir / name, dir / (name + "_out"));
    const nlohmann::json config = json_of(dir / (name + "_out") / "config.json");
    const auto keys = config["quantization_config"]["modules_to_not_convert"].get<std::vector<std::string>>();
    // The Linear modules transformers builds for a Llama model: every projection and lm_head
    // (tied or not: a tied head is a Linear that reads the embedding).
    std::set<std::string> converted;
    for (const auto& layer : report.layers) converted.insert(layer.name);
    std::vector<std::string> linears{"lm_head"};
    for (int l = 0; l < 2; ++l)
      for (const char* proj : {"self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
                               "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"})
        linears.push_back("model.layers." + std::to_string(l) + "." + proj);
    for (const std::string& module : linears) {
      CAPTURE(module);
      CHECK(kept_by_substring_rule(module, keys) == !converted.contains(module));
      CHECK(kept_by_prefix_rule(module, keys) == !converted.contains(module));
    }
    CHECK(std::find(keys.begin(), keys.end(), "lm_head") != keys.end());
  }
}

namespace {

// transformers' forward of a converted layer, from its sources (integrations/bitnet.py), on the raw
// tensors of the file: AutoBitLinear (offline) y = (ActQuant(x) . W^T + bias) * weight_scale with W
// the unpacked codes; BitLinear y = (xq . W^T) / (sx * weight_scale) + bias.
Matrix<double> transformers_forward(const hf::checkpoint& file, const std::string& module, hf::scale_convention convention,
                                    const Matrix<float>& x) {
  const Matrix<std::uint8_t> packed = file.read_matrix<std::uint8_t>(module + ".weight");
  const float weight_scale = file.read_values<float>(module + ".weight_scale").at(0);
  const Vector<float> bias = file.read_vector<float>(module + ".bias");
  const Matrix<std::int8_t> w = hf::unpack_weights(packed, bias.size());
  Matrix<double> y(x.rows(), w.rows());
  for (Index r = 0; r < x.rows(); ++r) {
    const float sx = reference::activation_scale(x, r);
    for (Index o = 0; o < w.rows(); ++o) {
      double fake = 0, integer = 0;
      for (Index i = 0; i < x.cols(); ++i) {
        const float code = reference::clamp(reference::round_half_even(x(r, i) * sx), -128.0f, 127.0f);
        fake += double(code / sx) * w(o, i);
        integer += double(code) * w(o, i);
      }
      y(r, o) = convention == hf::scale_convention::autobitlinear ? (fake + bias(o)) * weight_scale
                                                                  : integer / (double(sx) * weight_scale) + bias(o);
    }
  }
  return y;
}

}  // namespace

TEST_CASE("convert: biases (Qwen2 q/k/v) in both conventions compute what the source layer computes") {
  scratch_dir dir;
  write_model(dir / "in", {.layers = 1, .qkv_bias = true});
  const hf::checkpoint source(dir / "in");
  std::mt19937 rng(3);
  const Matrix<float> x = reference::random_matrix<float>(3, 8, rng, 1.0);
  for (const auto convention : {hf::scale_convention::autobitlinear, hf::scale_convention::bitlinear}) {
    CAPTURE(hf::convention_name(convention));
    const fs::path out = dir / std::string(hf::convention_name(convention));
    bitnet::convert_model(dir / "in", out, {.scale_convention = convention});
    const hf::checkpoint converted(out);
    for (const char* proj : {"q_proj", "k_proj", "v_proj"}) {
      const std::string module = std::string("model.layers.0.self_attn.") + proj;
      CAPTURE(module);
      const bitnet::BitLinear<float> reference_layer(source.read_matrix<float>(module + ".weight"),
                                                     source.read_vector<float>(module + ".bias"));
      const Matrix<float> expected = reference_layer.forward(x);
      const Matrix<double> theirs = transformers_forward(converted, module, convention, x);
      const Matrix<float> ours = hf::load_bit_linear<float>(converted, module).forward(x);
      const Vector<float> bias = source.read_vector<float>(module + ".bias");
      for (Index r = 0; r < x.rows(); ++r)
        for (Index o = 0; o < expected.cols(); ++o) {
          const double bound = 1e-5 * (std::fabs(expected(r, o)) + std::fabs(bias(o)) + 1);
          CHECK(std::fabs(theirs(r, o) - expected(r, o)) <= bound);
          CHECK(std::fabs(ours(r, o) - expected(r, o)) <= bound);
        }
      // The stored bias is the convention's: b * s for autobitlinear (b / mean|W|), b for bitlinear.
      const Vector<float> stored = converted.read_vector<float>(module + ".bias");
      if (convention == hf::scale_convention::bitlinear)
        CHECK(stored == bias);
      else
        CHECK(stored.isApprox(bias * reference_layer.weight_scale(), 1e-6f));
    }
  }
}

TEST_CASE("convert: an existing OUT is replaced only when it is an earlier output (or with force)") {
  scratch_dir dir;
  write_model(dir / "in", {.layers = 1});
  write_text(dir / "precious" / "thesis.tex", "years of work");
  const auto before = tree_of(dir.path);
  CHECK(error_of([&] { bitnet::convert_model(dir / "in", dir / "precious"); })
            .find("exists and is not an earlier bitnet-convert output") != std::string::npos);
  CHECK(tree_of(dir.path) == before);
  // An earlier output is replaced whole (a file added to it disappears).
  bitnet::convert_model(dir / "in", dir / "out");
  write_text(dir / "out" / "stale.txt", "old");
  bitnet::convert_model(dir / "in", dir / "out", {.scale_convention = hf::scale_convention::bitlinear});
  CHECK_FALSE(fs::exists(dir / "out" / "stale.txt"));
  // force replaces anything; an empty folder needs no force.
  bitnet::convert_model(dir / "in", dir / "precious", {.force = true});
  CHECK_FALSE(fs::exists(dir / "precious" / "thesis.tex"));
  fs::create_directories(dir / "empty");
  bitnet::convert_model(dir / "in", dir / "empty");
  // A single file: the same rule.
  write_shard(dir / "in.safetensors", llama_layer(0, false), 2);
  write_text(dir / "notes.safetensors", "not a model");
  CHECK(error_of([&] { bitnet::convert_model(dir / "in.safetensors", dir / "notes.safetensors"); })
            .find("not an earlier bitnet-convert output") != std::string::npos);
  CHECK(read_text(dir / "notes.safetensors") == "not a model");
  bitnet::convert_model(dir / "in.safetensors", dir / "one.safetensors");
  bitnet::convert_model(dir / "in.safetensors", dir / "one.safetensors");
}

TEST_CASE("convert: a cancelled conversion leaves nothing; staging folders of killed runs are removed") {
  scratch_dir dir;
  write_model(dir / "in", {.layers = 2, .shards = 2});
  const auto before = tree_of(dir.path);
  int calls = 0;
  bitnet::convert_options options;
  options.cancelled = [&] { return ++calls > 5; };
  CHECK(error_of([&] { bitnet::convert_model(dir / "in", dir / "out", options); }).find("cancelled") !=
        std::string::npos);
  CHECK(calls > 5);
  CHECK(tree_of(dir.path) == before);
  // A run killed with SIGKILL leaves its staging folder; the next run removes it (its pid is gone).
  write_text(dir / ".out.bitnet-convert-4194301-77" / "model.safetensors", "partial");
  const bitnet::convert_report report = bitnet::convert_model(dir / "in", dir / "out");
  CHECK_FALSE(fs::exists(dir / ".out.bitnet-convert-4194301-77"));
  bool noted = false;
  for (const std::string& note : report.notes) noted |= note.find("left by an interrupted run") != std::string::npos;
  CHECK(noted);
  std::size_t hidden = 0;
  for (const auto& entry : fs::directory_iterator(dir.path)) hidden += entry.path().filename().string().starts_with(".");
  CHECK(hidden == 0);
}

TEST_CASE("convert: the report says what each exclude rule matched (substrings, as transformers matches)") {
  scratch_dir dir;
  tensor_list tensors = llama_layer(1, false);
  for (auto& t : llama_layer(10, false)) tensors.push_back(t);
  for (auto& t : llama_layer(2, false)) tensors.push_back(t);
  write_shard(dir / "m.safetensors", tensors, 4);
  bitnet::convert_options options;
  options.exclude.push_back("layers.1");
  const bitnet::convert_report report = bitnet::convert_model(dir / "m.safetensors", dir / "o.safetensors", options);
  const auto& [rule, matched] = report.exclude_matches.back();
  CHECK(rule == "layers.1");
  CHECK(matched.size() == 14);  // layers 1 and 10: 7 projections each
  CHECK(std::count_if(matched.begin(), matched.end(), [](const std::string& m) { return m.starts_with("model.layers.10."); }) == 7);
  CHECK(report.layers.size() == 7);  // layer 2 only
}

TEST_CASE("convert: bad options are refused before anything is read") {
  scratch_dir dir;
  CHECK(error_of([&] {
          bitnet::convert_model(dir / "in", dir / "out",
                                {.mode = hf::quantization_mode::online, .scale_convention = hf::scale_convention::bitlinear});
        }).find("online mode") != std::string::npos);
  CHECK(error_of([&] { bitnet::convert_model(dir / "in", dir / "out", {.scale_dtype = st::dtype::I32}); })
            .find("scale_dtype") != std::string::npos);
  CHECK(error_of([&] { bitnet::convert_model(dir / "in", dir / "out", {.exclude = {""}}); }).find("empty exclude rule") !=
        std::string::npos);
  CHECK(error_of([&] { bitnet::convert_model(dir / "missing", dir / "out"); }).find("no such file or folder") !=
        std::string::npos);
}

namespace {

// A Ternary Bonsai-style unpacked folder: Qwen3 names, BF16 weights exactly {-d, 0, +d} per group of
// 128 inputs (d with 7 significant bits), q/k/v biases, hadamard_packing.json folding the MLP
// projections with explicit signs (block 64) and the embedding "inverse-after-lookup".
std::map<std::string, Matrix<float>> write_bonsai_folder(const fs::path& folder, const std::vector<std::int8_t>& signs256,
                                                         const std::vector<std::int8_t>& signs384) {
  std::mt19937 rng(4);
  std::uniform_int_distribution<int> code(-1, 1), mantissa(64, 127);
  std::map<std::string, Matrix<float>> weights;
  const auto ternary = [&](Index out, Index in) {
    Matrix<float> w(out, in);
    for (Index r = 0; r < out; ++r)
      for (Index first = 0; first < in; first += 128) {
        const float d = std::ldexp(float(mantissa(rng)), -12);
        for (Index c = first; c < first + 128; ++c) w(r, c) = float(code(rng)) * d;
      }
    return w;
  };
  const std::string p = "model.layers.0.";
  weights[p + "self_attn.q_proj.weight"] = ternary(256, 256);
  weights[p + "self_attn.k_proj.weight"] = ternary(128, 256);
  weights[p + "mlp.up_proj.weight"] = ternary(384, 256);
  weights[p + "mlp.down_proj.weight"] = ternary(256, 384);
  weights["model.embed_tokens.weight"] = ternary(16, 256);
  std::vector<st::tensor_spec> specs;
  for (const auto& [name, w] : weights)
    specs.push_back({name, st::dtype::BF16, {std::uint64_t(w.rows()), std::uint64_t(w.cols())}});
  specs.push_back({p + "self_attn.q_proj.bias", st::dtype::BF16, {256}});
  specs.push_back({"model.norm.weight", st::dtype::BF16, {256}});
  fs::create_directories(folder);
  st::writer out(folder / "model.safetensors", specs, {{"format", "pt"}});
  for (const auto& [name, w] : weights) out.write(name, w);
  out.write(p + "self_attn.q_proj.bias", Vector<float>::LinSpaced(256, -1.0f, 1.0f).unaryExpr([](float v) {
    return std::ldexp(std::nearbyint(std::ldexp(v, 6)), -6);  // exact in BF16
  }));
  out.write("model.norm.weight", Vector<float>::Ones(256));
  out.finish();
  write_text(folder / "config.json", R"({"architectures": ["Qwen3ForCausalLM"], "model_type": "qwen3", "tie_word_embeddings": true})");
  std::string packing = R"({"schema_version": 2, "kind": "hadamard-weight-fold", "status": "requires-matching-runtime", )"
                        R"("transform": {"name": "normalized-signed-sylvester-walsh-hadamard", "block_size": 64, )"
                        R"("sign_mode": "explicit"}, "signs": {)";
  for (const auto& [width, signs] : {std::pair{256, &signs256}, std::pair{384, &signs384}}) {
    packing += (width == 256 ? "\"" : ", \"") + std::to_string(width) + "\": [";
    for (std::size_t k = 0; k < signs->size(); ++k) packing += (k ? ", " : "") + std::to_string(int((*signs)[k]));
    packing += "]";
  }
  packing += R"(}, "tensors": [{"name": "model.layers.0.mlp.up_proj.weight", "axis": -1, "role": "fold-before-matmul"}, )"
             R"({"name": "model.layers.0.mlp.down_proj.weight", "axis": -1, "role": "fold-before-matmul"}, )"
             R"({"name": "model.embed_tokens.weight", "axis": -1, "role": "inverse-after-lookup"}]})";
  write_text(folder / "hadamard_packing.json", packing);
  return weights;
}

bitnet::convert_options bonsai_options() {
  bitnet::convert_options options;
  options.weight_scales = bitnet::weight_scaling::per_group;
  options.group_size = 128;
  options.activation_scales = bitnet::activation_scaling::per_block;
  options.weights = bitnet::ternary_import::exact;
  return options;
}

}  // namespace

TEST_CASE("convert: a Ternary Bonsai-style unpacked folder converts exactly to the packed group-scaled form") {
  scratch_dir dir;
  const auto r256 = bitnet::hadamard_rotation::random_signs(256, 64, 1), r384 = bitnet::hadamard_rotation::random_signs(384, 64, 2);
  const auto weights = write_bonsai_folder(dir / "in", r256.signs(), r384.signs());
  const bitnet::convert_report report = bitnet::convert_model(dir / "in", dir / "out", bonsai_options());
  REQUIRE(report.layers.size() == 4);  // the embedding stays dense (default exclude)
  for (const auto& layer : report.layers) CHECK(layer.relative_error == 0.0);
  const hf::checkpoint out(dir / "out");
  REQUIRE(out.quantization());
  const hf::quantization_config& declared = *out.quantization();
  CHECK(declared.weight_scales == bitnet::weight_scaling::per_group);
  CHECK(declared.group_size == 128);
  CHECK(declared.activation_scales == bitnet::activation_scaling::per_block);
  REQUIRE(declared.rotation);
  CHECK(declared.rotation->block_size == 64);
  CHECK(declared.rotation->layers ==
        std::vector<std::string>{"model.layers.0.mlp.down_proj", "model.layers.0.mlp.up_proj"});
  const nlohmann::json config = nlohmann::json::parse(read_text(dir / "out" / "config.json"));
  CHECK(config.at("quantization_config").at("bitnet_group_size") == 128);
  CHECK(config.at("model_type") == "qwen3");
  CHECK(read_text(dir / "out" / "hadamard_packing.json") == read_text(dir / "in" / "hadamard_packing.json"));
  // Codes x scales == the source weights, bit for bit; each layer with the rotation of its width.
  for (const auto& [name, w] : weights) {
    if (name.find("embed") != std::string::npos) continue;
    const std::string module = name.substr(0, name.size() - 7);
    const bitnet::BitLinear<float> layer = hf::load_bit_linear<float>(out, module);
    CHECK(layer.dequantized_weight() == w);
    CHECK(layer.unit_scales().cols() == w.cols() / 128);
    if (name.find("mlp") != std::string::npos) {
      REQUIRE(layer.options().rotation);
      CHECK(*layer.options().rotation == (w.cols() == 256 ? r256 : r384));
    } else {
      CHECK_FALSE(layer.options().rotation);
    }
  }
  // The bias is stored as it is added (unit layers): byte for byte.
  const st::reader in_file(dir / "in" / "model.safetensors"), out_file(dir / "out" / "model.safetensors");
  CHECK(out_file.read_bytes("model.layers.0.self_attn.q_proj.bias") == in_file.read_bytes("model.layers.0.self_attn.q_proj.bias"));
  CHECK(out_file.read_bytes("model.embed_tokens.weight") == in_file.read_bytes("model.embed_tokens.weight"));
}

TEST_CASE("convert: a non-exact unit or a rotation that cannot be applied is refused by name; nothing is written") {
  scratch_dir dir;
  const auto r256 = bitnet::hadamard_rotation::random_signs(256, 64, 1), r384 = bitnet::hadamard_rotation::random_signs(384, 64, 2);
  write_bonsai_folder(dir / "in", r256.signs(), r384.signs());
  // Break row 5, group 1 of up_proj: one weight twice its group's magnitude.
  {
    const st::reader in(dir / "in" / "model.safetensors");
    std::map<std::string, Matrix<float>> tensors;
    std::vector<st::tensor_spec> specs;
    for (const st::tensor_info& t : in.tensors()) {
      specs.push_back({t.name, t.type, t.shape});
      tensors[t.name] = t.shape.size() == 2 ? in.read_matrix<float>(t.name) : Matrix<float>(in.read_vector<float>(t.name).transpose());
    }
    Matrix<float>& up = tensors.at("model.layers.0.mlp.up_proj.weight");
    Index c = 128;
    while (up(5, c) == 0) ++c;
    up(5, c) *= 2;
    fs::create_directories(dir / "broken");
    st::writer out(dir / "broken" / "model.safetensors", specs, {{"format", "pt"}});
    for (const st::tensor_info& t : in.tensors()) {
      if (t.shape.size() == 2) out.write(t.name, tensors.at(t.name));
      else out.write(t.name, Vector<float>(tensors.at(t.name).transpose()));
    }
    out.finish();
    fs::copy_file(dir / "in" / "config.json", dir / "broken" / "config.json");
    fs::copy_file(dir / "in" / "hadamard_packing.json", dir / "broken" / "hadamard_packing.json");
  }
  const auto before = tree_of(dir.path);
  CHECK_THROWS_WITH_AS(bitnet::convert_model(dir / "broken", dir / "out", bonsai_options()),
                       doctest::Contains("tensor \"model.layers.0.mlp.up_proj.weight\": model.layers.0.mlp.up_proj: the weights "
                                         "are not ternary at row 5, group 1 (columns 128 to 255)"),
                       bitnet::value_error);
  CHECK(tree_of(dir.path) == before);  // no OUT, no staging folder
  // The same folder quantized (absmean per group) converts; exact import is what refuses.
  bitnet::convert_options quantize = bonsai_options();
  quantize.weights = bitnet::ternary_import::quantize;
  CHECK(bitnet::convert_model(dir / "broken", dir / "quantized", quantize).layers.size() == 4);
  // A declared role for a converted weight that a layer cannot apply, and options that do not fit.
  std::string packing = read_text(dir / "in" / "hadamard_packing.json");
  packing.replace(packing.find("\"role\": \"fold-before-matmul\""), 28, "\"role\": \"inverse-after-lookup\"");
  write_text(dir / "in" / "hadamard_packing.json", packing);
  const auto before_role = tree_of(dir.path);
  CHECK_THROWS_WITH_AS(bitnet::convert_model(dir / "in", dir / "out", bonsai_options()),
                       doctest::Contains("declares the linear weight \"model.layers.0.mlp.up_proj.weight\" "
                                         "inverse-after-lookup, which a converted layer cannot apply"),
                       bitnet::io_error);
  CHECK(tree_of(dir.path) == before_role);
  bitnet::convert_options bf16 = bonsai_options();
  bf16.scale_dtype = st::dtype::BF16;
  CHECK_THROWS_WITH_AS(bitnet::convert_model(dir / "in", dir / "out", bf16), doctest::Contains("as F32 magnitudes"),
                       bitnet::value_error);
  bitnet::convert_options exact_per_tensor;
  exact_per_tensor.weights = bitnet::ternary_import::exact;
  CHECK_THROWS_WITH_AS(bitnet::convert_model(dir / "in", dir / "out", exact_per_tensor),
                       doctest::Contains("ternary_import::exact needs weight_scales per_row or per_group"),
                       bitnet::value_error);
}

TEST_CASE("convert: --weight-storage base3 writes five codes a byte, declared; the layers equal the 2-bit output's") {
  scratch_dir dir;
  write_model(dir / "in", {.layers = 1, .qkv_bias = true});
  std::mt19937 rng(12);
  for (const auto convention : {hf::scale_convention::autobitlinear, hf::scale_convention::bitlinear}) {
    CAPTURE(hf::convention_name(convention));
    const std::string name(hf::convention_name(convention));
    bitnet::convert_model(dir / "in", dir / ("two_bit_" + name), {.scale_convention = convention});
    bitnet::convert_options options{.scale_convention = convention};
    options.storage = bitnet::weight_storage::base3;
    const bitnet::convert_report report = bitnet::convert_model(dir / "in", dir / ("base3_" + name), options);
    CHECK(report.layers.size() == 7);
    const hf::checkpoint base3(dir / ("base3_" + name)), two_bit(dir / ("two_bit_" + name));
    REQUIRE(base3.quantization());
    CHECK(base3.quantization()->storage == bitnet::weight_storage::base3);
    CHECK(two_bit.quantization()->storage == bitnet::weight_storage::two_bit);
    const nlohmann::json config = json_of(dir / ("base3_" + name) / "config.json");
    CHECK(config.at("quantization_config").at("bitnet_weight_storage") == "base3");
    CHECK(config.at("quantization_config").at("bitnet_in_features").at("model.layers.0.mlp.down_proj") == 12);
    CHECK_FALSE(config.at("quantization_config").contains("bitnet_out_features"));  // rows are exact
    CHECK_FALSE(json_of(dir / ("two_bit_" + name) / "config.json").at("quantization_config").contains("bitnet_weight_storage"));
    std::uint64_t base3_bytes = 0, two_bit_bytes = 0;
    for (const auto& layer : report.layers) {
      CAPTURE(layer.name);
      const st::tensor_info& weight = base3.info(layer.name + ".weight");
      CHECK(weight.shape == std::vector<std::uint64_t>{std::uint64_t(layer.out_features),
                                                       std::uint64_t((layer.in_features + 4) / 5)});
      base3_bytes += weight.byte_size();
      two_bit_bytes += two_bit.info(layer.name + ".weight").byte_size();
      const bitnet::BitLinear<float> ours = hf::load_bit_linear<float>(base3, layer.name);
      const bitnet::BitLinear<float> theirs = hf::load_bit_linear<float>(two_bit, layer.name);
      CHECK(ours.options().storage == bitnet::weight_storage::base3);
      CHECK(ours.ternary_weight() == theirs.ternary_weight());
      CHECK(ours.weight_scale() == theirs.weight_scale());
      CHECK(ours.bias() == theirs.bias());
      const Matrix<float> x = reference::random_matrix<float>(2, layer.in_features, rng, 1.0);
      CHECK(ours.forward(x) == theirs.forward(x));
    }
    // 8 and 12 inputs take 2 and 3 bytes a row (8 and 12 codes in 10 and 15 digits): at these widths
    // base 3 holds as many bytes as 2 bits; real widths (multiples of 20) take 0.8 (test_hf_base3.cpp).
    CHECK(base3_bytes == 120);
    CHECK(two_bit_bytes == 120);
  }
  // Only the packed safetensors form of per_tensor layers has a base-3 layout: refused before anything is written.
  const auto before = tree_of(dir.path);
  for (auto options : {bitnet::convert_options{.mode = hf::quantization_mode::online},
                       bitnet::convert_options{.format = bitnet::output_format::gguf},
                       bitnet::convert_options{.weight_scales = bitnet::weight_scaling::per_row}}) {
    options.storage = bitnet::weight_storage::base3;
    CHECK(error_of([&] { bitnet::convert_model(dir / "in", dir / "refused", options); })
              .find("storage base3 is bitnet's packed safetensors form of per_tensor layers") != std::string::npos);
  }
  CHECK(tree_of(dir.path) == before);
}
