// Whole models: a Llama-named checkpoint through the user's own types (norm weights and embeddings
// as parameters, projections in empty BitLinear slots), model folders with shards, index and
// config.json, strict loads that account for every key, saves bit for bit, and the scale
// convention carried by the folder.
#include <bitnet/hf_model.hpp>
#include <bitnet/state_dict.hpp>

#include <cstdint>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <optional>
#include <random>
#include <set>
#include <string>
#include <vector>

#include <doctest/doctest.h>
#include <nlohmann/json.hpp>

#include "reference.hpp"

namespace st = bitnet::safetensors;
namespace hf = bitnet::hf;
namespace fs = std::filesystem;
using bitnet::BitLinear;
using bitnet::Index;
using bitnet::Matrix;
using bitnet::Vector;

// The user's model, written as a user would: no shapes anywhere, every tensor from the file.
namespace llama {
struct rms_norm {
  Vector<float> weight;  // an Eigen child: a parameter named "<path>.weight"
};
BITNET_LAYERS(rms_norm, weight);

struct embedding {
  Matrix<float> table;  // stored as "weight": named by the bitnet_parameters hook
};
template <class Visit>
void bitnet_parameters(embedding& e, Visit& visit) {
  visit("weight", e.table);
}

using proj = std::optional<BitLinear<float>>;  // empty until loaded
struct attention {
  proj q_proj, k_proj, v_proj, o_proj;
  rms_norm attn_sub_norm;
};
BITNET_LAYERS(attention, q_proj, k_proj, v_proj, o_proj, attn_sub_norm);
struct mlp {
  proj gate_proj, up_proj, down_proj;
  rms_norm ffn_sub_norm;
};
BITNET_LAYERS(mlp, gate_proj, up_proj, down_proj, ffn_sub_norm);
struct decoder_layer {
  rms_norm input_layernorm;
  attention self_attn;
  rms_norm post_attention_layernorm;
  struct mlp mlp;
};
BITNET_LAYERS(decoder_layer, input_layernorm, self_attn, post_attention_layernorm, mlp);
struct body {
  embedding embed_tokens;
  std::vector<decoder_layer> layers;
  rms_norm norm;
};
BITNET_LAYERS(body, embed_tokens, layers, norm);
struct lm_head_t {
  Matrix<float> weight;  // kept in float
};
BITNET_LAYERS(lm_head_t, weight);
struct causal_lm {
  body model;
  lm_head_t lm_head;
};
BITNET_LAYERS(causal_lm, model, lm_head);

causal_lm empty(std::size_t layers) {
  causal_lm m;
  m.model.layers.resize(layers);
  return m;
}

std::vector<proj*> projections(causal_lm& m) {
  std::vector<proj*> out;
  for (auto& l : m.model.layers)
    for (proj* p : {&l.self_attn.q_proj, &l.self_attn.k_proj, &l.self_attn.v_proj, &l.self_attn.o_proj,
                    &l.mlp.gate_proj, &l.mlp.up_proj, &l.mlp.down_proj})
      out.push_back(p);
  return out;
}
}  // namespace llama

namespace {

struct scratch_dir {
  fs::path path;
  scratch_dir() {
    std::random_device rd;
    path = fs::temp_directory_path() / ("bitnet_hf_model_test_" + std::to_string(rd()) + std::to_string(rd()));
    fs::create_directories(path);
  }
  ~scratch_dir() {
    std::error_code ec;
    fs::remove_all(path, ec);
  }
  fs::path operator/(const std::string& name) const { return path / name; }
};

void write_text(const fs::path& path, const std::string& text) { std::ofstream(path, std::ios::binary) << text; }

// A Llama-named dense F32 checkpoint: hidden 12, intermediate 18 and KV 6 (not multiples of 4), vocab
// 10, 2 layers. Tensor name -> values (row-major), with the shapes transformers uses.
struct dense_tensor {
  std::string name;
  std::vector<std::uint64_t> shape;
  std::vector<float> values;
};
std::vector<dense_tensor> llama_tensors(unsigned seed) {
  std::mt19937 rng(seed);
  std::normal_distribution<float> dist(0.0f, 0.3f);
  const std::uint64_t hidden = 12, intermediate = 18, kv = 6, vocab = 10;
  std::vector<dense_tensor> out;
  const auto add = [&](std::string name, std::vector<std::uint64_t> shape) {
    std::uint64_t n = 1;
    for (auto d : shape) n *= d;
    dense_tensor t{std::move(name), std::move(shape), std::vector<float>(n)};
    for (float& v : t.values) v = dist(rng);
    out.push_back(std::move(t));
  };
  add("model.embed_tokens.weight", {vocab, hidden});
  for (int l = 0; l < 2; ++l) {
    const std::string p = "model.layers." + std::to_string(l) + ".";
    add(p + "input_layernorm.weight", {hidden});
    add(p + "self_attn.q_proj.weight", {hidden, hidden});
    add(p + "self_attn.k_proj.weight", {kv, hidden});
    add(p + "self_attn.v_proj.weight", {kv, hidden});
    add(p + "self_attn.o_proj.weight", {hidden, hidden});
    add(p + "self_attn.attn_sub_norm.weight", {hidden});
    add(p + "post_attention_layernorm.weight", {hidden});
    add(p + "mlp.gate_proj.weight", {intermediate, hidden});
    add(p + "mlp.up_proj.weight", {intermediate, hidden});
    add(p + "mlp.down_proj.weight", {hidden, intermediate});
    add(p + "mlp.ffn_sub_norm.weight", {intermediate});
  }
  add("model.norm.weight", {hidden});
  add("lm_head.weight", {vocab, hidden});
  return out;
}

// Writes `tensors` as a model folder: `shards` files (split in order) + index + config.json.
void write_folder(const fs::path& dir, const std::vector<dense_tensor>& tensors, std::size_t shards,
                  const std::string& quantization = "") {
  fs::create_directories(dir);
  std::string weight_map;
  for (std::size_t k = 0; k < shards; ++k) {
    const std::string file = shards == 1 ? std::string("model.safetensors")
                                         : "model-0000" + std::to_string(k + 1) + "-of-0000" + std::to_string(shards) +
                                               ".safetensors";
    std::vector<st::tensor_spec> specs;
    for (std::size_t i = k; i < tensors.size(); i += shards) {
      specs.push_back({tensors[i].name, st::dtype::F32, tensors[i].shape});
      weight_map += (weight_map.empty() ? "" : ", ") + st::detail::quote(tensors[i].name) + ": \"" + file + "\"";
    }
    st::writer out(dir / file, specs, {{"format", "pt"}});
    for (std::size_t i = k; i < tensors.size(); i += shards) out.write_values<float>(tensors[i].name, tensors[i].values);
    out.finish();
  }
  if (shards > 1) write_text(dir / "model.safetensors.index.json", "{\"metadata\": {}, \"weight_map\": {" + weight_map + "}}");
  write_text(dir / "config.json", R"({"model_type": "bitnet", "num_hidden_layers": 2)" +
                                      (quantization.empty() ? std::string() : ", \"quantization_config\": " + quantization) +
                                      "}");
}

std::vector<unsigned char> raw(const st::reader& file, const std::string& name) {
  const auto bytes = file.read_bytes(name);
  std::vector<unsigned char> out(bytes.size());
  std::memcpy(out.data(), bytes.data(), bytes.size());
  return out;
}
std::vector<unsigned char> raw(const std::vector<float>& values) {
  std::vector<unsigned char> out(values.size() * sizeof(float));
  std::memcpy(out.data(), values.data(), out.size());
  return out;
}

// Codes and scale bits of every projection.
std::vector<std::pair<Matrix<std::int8_t>, float>> ternary_of(llama::causal_lm& m) {
  std::vector<std::pair<Matrix<std::int8_t>, float>> out;
  for (auto* p : llama::projections(m)) out.emplace_back((*p)->ternary_weight(), (*p)->weight_scale());
  return out;
}

}  // namespace

TEST_CASE("hf model: a sharded Llama-named dense folder loads strictly into empty slots, every key accounted for") {
  scratch_dir dir;
  const auto tensors = llama_tensors(1);
  write_folder(dir / "dense", tensors, 3);
  llama::causal_lm m = llama::empty(2);
  const bitnet::state_dict_report report = bitnet::load_state_dict(m, dir / "dense");
  CHECK(report.loaded.size() == tensors.size());  // every tensor of the checkpoint has its place
  CHECK(report.missing.empty());
  CHECK(report.unexpected.empty());
  // Values, independently: the parameters hold the file's floats; projections are BitLinear layers
  // built from the latent weights (their weight() is the file's matrix).
  const auto value = [&](const std::string& name) {
    for (const auto& t : tensors)
      if (t.name == name) return t;
    FAIL("no tensor " << name);
    return tensors.front();
  };
  const auto k_proj = value("model.layers.1.self_attn.k_proj.weight");
  const BitLinear<float>& k = *m.model.layers[1].self_attn.k_proj;
  CHECK(k.out_features() == 6);
  CHECK(k.in_features() == 12);
  CHECK(std::memcmp(k.weight().data(), k_proj.values.data(), k_proj.values.size() * sizeof(float)) == 0);
  const auto embed = value("model.embed_tokens.weight");
  CHECK(m.model.embed_tokens.table.rows() == 10);
  CHECK(m.model.embed_tokens.table.cols() == 12);
  CHECK(m.model.embed_tokens.table(3, 5) == embed.values[3 * 12 + 5]);
  const auto norm = value("model.layers.0.mlp.ffn_sub_norm.weight");
  CHECK(m.model.layers[0].mlp.ffn_sub_norm.weight.size() == 18);
  CHECK(m.model.layers[0].mlp.ffn_sub_norm.weight(17) == norm.values[17]);

  // save_state_dict takes the const model and writes every tensor back bit for bit.
  const llama::causal_lm& view = m;
  bitnet::save_state_dict(view, dir / "saved.safetensors");
  const st::reader saved(dir / "saved.safetensors");
  CHECK(saved.tensors().size() == tensors.size());
  for (const auto& t : tensors) {
    CAPTURE(t.name);
    REQUIRE(saved.contains(t.name));
    CHECK(saved.info(t.name).shape == t.shape);
    CHECK(raw(saved, t.name) == raw(t.values));
  }

  // A key the model has no place for fails a strict load, and the model is unchanged.
  {
    std::vector<dense_tensor> extra = tensors;
    extra.push_back({"model.rotary_emb.inv_freq", {6}, std::vector<float>(6, 1.0f)});
    write_folder(dir / "extra", extra, 2);
    llama::causal_lm fresh = llama::empty(2);
    CHECK_THROWS_WITH_AS(bitnet::load_state_dict(fresh, dir / "extra"),
                         doctest::Contains("unexpected key \"model.rotary_emb.inv_freq\""), bitnet::io_error);
    CHECK_FALSE(fresh.model.layers[0].self_attn.q_proj.has_value());
    CHECK(fresh.model.embed_tokens.table.size() == 0);
  }
  // A parameter of fixed shape must match the file.
  {
    llama::causal_lm sized = llama::empty(2);
    sized.model.norm.weight = Vector<float>::Zero(5);
    CHECK_THROWS_WITH_AS(bitnet::load_state_dict(sized, dir / "dense"),
                         doctest::Contains("size mismatch for \"model.norm.weight\": the file has F32 [12]"),
                         bitnet::io_error);
    CHECK(sized.model.norm.weight == Vector<float>::Zero(5));
  }
  // An empty slot cannot be saved.
  llama::causal_lm hollow = llama::empty(1);
  CHECK_THROWS_WITH_AS(bitnet::save_state_dict(hollow, dir / "hollow.safetensors"),
                       doctest::Contains("\"model.layers.0.self_attn.q_proj\" holds no layer"), bitnet::state_error);
  CHECK_FALSE(fs::exists(dir / "hollow.safetensors"));
}

TEST_CASE("hf model: a packed checkpoint fills empty BitLinear slots, out_features from the file's declaration") {
  scratch_dir dir;
  write_folder(dir / "dense", llama_tensors(2), 1);
  llama::causal_lm source = llama::empty(2);
  bitnet::load_state_dict(source, dir / "dense");
  bitnet::save_state_dict(source, dir / "packed.safetensors",
                          {.scale_convention = hf::scale_convention::bitlinear,
                           .bit_linear = bitnet::bit_linear_storage::hf_packed});
  const st::reader packed(dir / "packed.safetensors");
  CHECK(packed.info("model.layers.0.self_attn.k_proj.weight").type == st::dtype::U8);
  CHECK(packed.info("model.layers.0.self_attn.k_proj.weight").shape == std::vector<std::uint64_t>{2, 12});  // ceil(6/4)
  const hf::quantization_config declared = *hf::declared_quantization(packed);
  CHECK(declared.out_features.at("model.layers.0.self_attn.k_proj") == 6);
  CHECK(declared.out_features.at("model.layers.1.mlp.gate_proj") == 18);
  CHECK_FALSE(declared.out_features.contains("model.layers.0.self_attn.q_proj"));  // 12: the rows tell

  llama::causal_lm loaded = llama::empty(2);
  const auto report = bitnet::load_state_dict(loaded, packed);
  CHECK(report.loaded.size() == packed.tensors().size());
  CHECK(ternary_of(loaded) == ternary_of(source));
  CHECK(loaded.model.layers[0].self_attn.k_proj->out_features() == 6);
  CHECK_FALSE(loaded.model.layers[0].self_attn.k_proj->has_latent_weights());
  std::mt19937 rng(3);
  const Matrix<float> x = reference::random_matrix<float>(2, 12, rng);
  CHECK(loaded.model.layers[1].self_attn.v_proj->forward(x) == source.model.layers[1].self_attn.v_proj->forward(x));
  CHECK(loaded.lm_head.weight == source.lm_head.weight);

  // Without the declaration the packed rows alone give 4 x rows (transformers' rule): 8, not 6.
  {
    std::vector<st::tensor_spec> specs;
    for (const auto& t : packed.tensors()) specs.push_back({t.name, t.type, t.shape});
    hf::quantization_config bare;
    bare.linear_class = hf::scale_convention::bitlinear;
    st::writer out(dir / "undeclared.safetensors", specs, {hf::metadata_entry(bare)});
    for (const auto& t : packed.tensors()) out.copy_tensor(t.name, packed, t.name);
    out.finish();
    llama::causal_lm guess = llama::empty(2);
    bitnet::load_state_dict(guess, dir / "undeclared.safetensors");
    CHECK(guess.model.layers[0].self_attn.k_proj->out_features() == 8);
    CHECK(guess.model.layers[0].self_attn.q_proj->out_features() == 12);
    // A graph that already holds the layer tells: the declared-less file loads into it with out = 6.
    bitnet::load_state_dict(source, dir / "undeclared.safetensors");
    CHECK(source.model.layers[0].self_attn.k_proj->out_features() == 6);
  }
}

TEST_CASE("hf model: round trip bitlinear <-> autobitlinear of every layer keeps codes, scale bits and outputs") {
  scratch_dir dir;
  write_folder(dir / "dense", llama_tensors(4), 1);
  llama::causal_lm original = llama::empty(2);
  bitnet::load_state_dict(original, dir / "dense");
  const auto expected = ternary_of(original);
  llama::causal_lm current = original;
  const hf::scale_convention order[] = {hf::scale_convention::bitlinear, hf::scale_convention::autobitlinear,
                                        hf::scale_convention::bitlinear, hf::scale_convention::autobitlinear};
  std::mt19937 rng(5);
  const Matrix<float> x12 = reference::random_matrix<float>(3, 12, rng);
  for (std::size_t step = 0; step < 4; ++step) {
    CAPTURE(step);
    const fs::path file = dir / ("step" + std::to_string(step) + ".safetensors");
    bitnet::save_state_dict(current, file, {.scale_convention = order[step], .bit_linear = bitnet::bit_linear_storage::hf_packed});
    CHECK(hf::declared_quantization(st::reader(file))->linear_class == order[step]);
    llama::causal_lm next = llama::empty(2);
    bitnet::load_state_dict(next, file);  // the convention comes from the file
    CHECK(ternary_of(next) == expected);
    for (std::size_t l = 0; l < 2; ++l)
      CHECK(next.model.layers[l].self_attn.q_proj->forward(x12) == original.model.layers[l].self_attn.q_proj->forward(x12));
    current = std::move(next);
  }
}

TEST_CASE("hf model: folders are validated and config.json declares the convention with the files") {
  scratch_dir dir;
  write_folder(dir / "dense", llama_tensors(6), 1);
  llama::causal_lm source = llama::empty(2);
  bitnet::load_state_dict(source, dir / "dense");
  bitnet::save_state_dict(source, dir / "packed.safetensors",
                          {.scale_convention = hf::scale_convention::bitlinear,
                           .bit_linear = bitnet::bit_linear_storage::hf_packed});
  const st::reader packed(dir / "packed.safetensors");
  // Split the packed file into two shards with the same metadata, plus an index and a config.json.
  const auto make_folder = [&](const fs::path& folder, const std::string& config_block, bool drop_from_index) {
    fs::create_directories(folder);
    std::vector<st::tensor_spec> a, b;
    std::string map;
    std::size_t i = 0;
    for (const auto& t : packed.tensors()) {
      const bool first = i++ % 2 == 0;
      (first ? a : b).push_back({t.name, t.type, t.shape});
      if (drop_from_index && t.name == "lm_head.weight") continue;
      map += (map.empty() ? "" : ", ") + st::detail::quote(t.name) + ": \"" + (first ? "a.safetensors" : "b.safetensors") + "\"";
    }
    const std::map<std::string, std::string> metadata(packed.metadata().begin(), packed.metadata().end());
    for (const auto& [name, specs] : {std::pair{"a.safetensors", &a}, std::pair{"b.safetensors", &b}}) {
      st::writer out(folder / name, *specs, metadata);
      for (const auto& s : *specs) out.copy_tensor(s.name, packed, s.name);
      out.finish();
    }
    write_text(folder / "model.safetensors.index.json", "{\"weight_map\": {" + map + "}}");
    write_text(folder / "config.json", "{\"num_hidden_layers\": 2, \"quantization_config\": " + config_block + "}");
  };
  make_folder(dir / "good", R"({"quant_method": "bitnet", "linear_class": "bitlinear"})", false);
  const hf::checkpoint good(dir / "good");
  CHECK(good.is_folder());
  CHECK(good.shards().size() == 2);
  CHECK(good.convention(std::nullopt) == hf::scale_convention::bitlinear);
  llama::causal_lm loaded = llama::empty(2);
  bitnet::load_state_dict(loaded, good);
  CHECK(ternary_of(loaded) == ternary_of(source));

  // One layer straight from the folder: its shard, the folder's convention, the declared out_features.
  const BitLinear<float> k = hf::load_bit_linear<float>(good, "model.layers.1.self_attn.k_proj");
  CHECK(k.out_features() == 6);
  CHECK(k.ternary_weight() == source.model.layers[1].self_attn.k_proj->ternary_weight());
  CHECK(k.weight_scale() == source.model.layers[1].self_attn.k_proj->weight_scale());
  CHECK_THROWS_WITH_AS(
      hf::load_bit_linear<float>(good, "model.layers.1.self_attn.k_proj", 0, hf::scale_convention::autobitlinear),
      doctest::Contains("but the caller asked for the scale convention \"autobitlinear\""), bitnet::io_error);

  make_folder(dir / "conflict", R"({"quant_method": "bitnet", "linear_class": "autobitlinear"})", false);
  CHECK_THROWS_WITH_AS((void)hf::checkpoint(dir / "conflict"),
                       doctest::Contains("declares linear_class \"autobitlinear\", but"), bitnet::io_error);
  make_folder(dir / "unlisted", R"({"quant_method": "bitnet", "linear_class": "bitlinear"})", true);
  CHECK_THROWS_WITH_AS((void)hf::checkpoint(dir / "unlisted"),
                       doctest::Contains("holds tensor \"lm_head.weight\", which"), bitnet::io_error);
  fs::create_directories(dir / "empty");
  CHECK_THROWS_WITH_AS((void)hf::checkpoint(dir / "empty"), doctest::Contains("not a Hugging Face model folder"),
                       bitnet::io_error);
  // An index naming a shard that holds another tensor set.
  fs::create_directories(dir / "wrong");
  fs::copy_file(dir / "good" / "a.safetensors", dir / "wrong" / "a.safetensors");
  write_text(dir / "wrong" / "model.safetensors.index.json", R"({"weight_map": {"lm_head.weight": "a.safetensors", "x": "a.safetensors"}})");
  CHECK_THROWS_AS((void)hf::checkpoint(dir / "wrong"), bitnet::io_error);
  write_text(dir / "wrong" / "model.safetensors.index.json", R"({"weight_map": {"x": "../a.safetensors"}})");
  CHECK_THROWS_WITH_AS((void)hf::checkpoint(dir / "wrong"), doctest::Contains("file names in the folder"),
                       bitnet::io_error);
}

TEST_CASE("hf model: the quantization_config block has exactly BitNetQuantConfig's keys, in its domain") {
  // transformers' BitNetQuantConfig.__init__(modules_to_not_convert=None, linear_class="bitlinear",
  // quantization_mode="offline", use_rms_norm=False, rms_norm_eps=1e-6) plus quant_method "bitnet";
  // linear_class in {bitlinear, autobitlinear}, quantization_mode in {online, offline}.
  const std::set<std::string> expected{"quant_method",  "linear_class", "quantization_mode",
                                       "modules_to_not_convert", "use_rms_norm", "rms_norm_eps"};
  for (const auto convention : {hf::scale_convention::bitlinear, hf::scale_convention::autobitlinear})
    for (const auto mode : {hf::quantization_mode::offline, hf::quantization_mode::online}) {
      hf::quantization_config config;
      config.linear_class = convention;
      config.mode = mode;
      const auto block = nlohmann::json::parse(hf::to_json(config));
      std::set<std::string> keys;
      for (const auto& [key, value] : block.items()) keys.insert(key);
      CHECK(keys == expected);
      CHECK(block["quant_method"] == "bitnet");
      CHECK(block["linear_class"] == (convention == hf::scale_convention::bitlinear ? "bitlinear" : "autobitlinear"));
      CHECK(block["quantization_mode"] == (mode == hf::quantization_mode::online ? "online" : "offline"));
      CHECK(block["modules_to_not_convert"].is_null());
      CHECK(block["use_rms_norm"] == false);
      CHECK(block["rms_norm_eps"].get<double>() == 1e-6);
    }
  hf::quantization_config kept;
  kept.modules_to_not_convert = {"lm_head"};
  kept.out_features = {{"a.b", 7}};
  const auto block = nlohmann::json::parse(hf::to_json(kept));
  CHECK(block["modules_to_not_convert"] == nlohmann::json::array({"lm_head"}));
  CHECK(block["bitnet_out_features"]["a.b"] == 7);  // the one extra key, which BitNetQuantConfig's **kwargs takes
}

namespace units_case {
struct one_layer {
  std::optional<BitLinear<float>> fc;
};
BITNET_LAYERS(one_layer, fc);
}  // namespace units_case

TEST_CASE("hf model: a folder's declarations of unit scales and rotations must agree, and its hadamard_packing.json is read") {
  const fs::path dir = fs::temp_directory_path() / ("bitnet_hf_model_units_" + std::to_string(std::random_device{}()));
  struct cleanup {
    fs::path path;
    ~cleanup() {
      std::error_code ec;
      fs::remove_all(path, ec);
    }
  } remove_later{dir};
  fs::create_directories(dir);
  // A per_group 64 layer saved packed; config.json then declares group 128: the folder contradicts itself.
  bitnet::bitlinear_options options;
  options.weight_scales = bitnet::weight_scaling::per_group;
  options.group_size = 64;
  units_case::one_layer layer;
  layer.fc.emplace(Matrix<float>::Ones(4, 128), std::nullopt, options);
  bitnet::save_state_dict(layer, dir / "model.safetensors", {.bit_linear = bitnet::bit_linear_storage::hf_packed});
  hf::quantization_config config;
  config.weight_scales = bitnet::weight_scaling::per_group;
  config.group_size = 128;
  std::ofstream(dir / "config.json") << R"({"quantization_config": )" << hf::to_json(config) << "}";
  const std::string conflict = "config.json declares bitnet_weight_scales / bitnet_group_size \"per_group 128\", but " +
                               (dir / "model.safetensors").string() + " declares \"per_group 64\"";
  CHECK_THROWS_WITH_AS(hf::checkpoint{dir}, doctest::Contains(conflict.c_str()), bitnet::io_error);
  config.group_size = 64;
  std::ofstream(dir / "config.json") << R"({"quantization_config": )" << hf::to_json(config) << "}";
  const hf::checkpoint model(dir);
  CHECK(model.quantization()->group_size == 64);
  CHECK(hf::load_bit_linear<float>(model, "fc").unit_scales() == Matrix<float>::Ones(4, 2));
  // hadamard_packing.json: identity signs, one folded tensor; then one it does not hold.
  std::ofstream(dir / "hadamard_packing.json")
      << R"({"schema_version": 1, "kind": "hadamard-weight-fold", "transform": {"name": )"
      << R"("normalized-signed-sylvester-walsh-hadamard", "block_size": 32, "sign_mode": "identity"}, )"
      << R"("tensors": [{"name": "fc.weight", "axis": -1, "role": "fold-before-matmul"}]})";
  const hf::checkpoint folded(dir);
  CHECK(folded.folded_role("fc.weight") == "fold-before-matmul");
  CHECK(folded.folded_role("fc.weight_scale").empty());
  CHECK(*folded.folded_rotation("fc.weight", 128) == bitnet::hadamard_rotation::identity_signs(128, 32));
  std::ofstream(dir / "hadamard_packing.json")
      << R"({"schema_version": 1, "kind": "hadamard-weight-fold", "transform": {"name": )"
      << R"("normalized-signed-sylvester-walsh-hadamard", "block_size": 32, "sign_mode": "identity"}, )"
      << R"("tensors": [{"name": "lm_head.weight", "axis": -1, "role": "fold-before-matmul"}]})";
  CHECK_THROWS_WITH_AS(hf::checkpoint{dir}, doctest::Contains("lists tensor \"lm_head.weight\", which the model does not hold"),
                       bitnet::io_error);
  std::ofstream(dir / "hadamard_packing.json")
      << R"({"schema_version": 3, "kind": "hadamard-weight-fold", "transform": {"name": )"
      << R"("normalized-signed-sylvester-walsh-hadamard", "block_size": 32, "sign_mode": "identity"}, "tensors": []})";
  CHECK_THROWS_WITH_AS(hf::checkpoint{dir}, doctest::Contains("hadamard_packing.json: schema_version must be 1 or 2"),
                       bitnet::io_error);
}
