// A whole Hugging Face model through your own types: a Llama/BitNet-named model whose norm weights,
// embeddings and float lm_head are plain Eigen members, and whose projections are empty
// std::optional<BitLinear<float>> slots that a packed checkpoint fills with its own shapes. The
// load is strict: every tensor of the folder must find its place, and the scale convention comes
// from the folder (config.json and the files' __metadata__), never from a default.
//
//   hf_model                 builds a small dense model folder, converts it to the packed form in
//                            a folder with config.json, and loads that strictly into an empty model
//   hf_model MODEL_FOLDER    loads a model folder (e.g. bitnet-convert's output) strictly
#include <bitnet/hf_model.hpp>
#include <bitnet/state_dict.hpp>

#include <cstdio>
#include <filesystem>
#include <fstream>
#include <optional>
#include <random>
#include <string>
#include <vector>

#include <nlohmann/json.hpp>

using bitnet::BitLinear;
using bitnet::Matrix;
using bitnet::Vector;
namespace hf = bitnet::hf;

namespace llama {
struct rms_norm {
  Vector<float> weight;  // a parameter: an Eigen member is named by its path, "...input_layernorm.weight"
};
BITNET_LAYERS(rms_norm, weight);
struct embedding {
  Matrix<float> table;
};
// A member whose name differs from the checkpoint's: the bitnet_parameters hook names it.
template <class Visit>
void bitnet_parameters(embedding& e, Visit& visit) {
  visit("weight", e.table);
}
using proj = std::optional<BitLinear<float>>;  // no layer until the checkpoint fills it
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
struct head {
  Matrix<float> weight;  // kept in float (modules_to_not_convert)
};
BITNET_LAYERS(head, weight);
struct causal_lm {
  body model;
  head lm_head;
};
BITNET_LAYERS(causal_lm, model, lm_head);
}  // namespace llama

namespace {

std::size_t layer_count(const std::filesystem::path& folder) {
  std::ifstream in(folder / "config.json");
  return nlohmann::json::parse(in).at("num_hidden_layers").get<std::size_t>();
}

int load(const std::filesystem::path& folder) {
  llama::causal_lm model;
  model.model.layers.resize(layer_count(folder));
  const hf::checkpoint checkpoint(folder);
  const bitnet::state_dict_report report = bitnet::load_state_dict(model, checkpoint);  // strict
  std::printf("%s: %zu file(s), scale convention %s (declared in %s); %zu tensors loaded, none missing, none "
              "unexpected\n",
              folder.string().c_str(), checkpoint.shards().size(),
              std::string(hf::convention_name(checkpoint.convention(std::nullopt))).c_str(),
              checkpoint.quantization_source().c_str(), report.loaded.size());
  const BitLinear<float>& down = *model.model.layers[0].mlp.down_proj;
  std::printf("model.layers.0.mlp.down_proj: %lld x %lld ternary, weight_scale %g, latent weights: %s\n",
              (long long)down.out_features(), (long long)down.in_features(), double(down.weight_scale()),
              down.has_latent_weights() ? "yes" : "no");
  return report.loaded.size() == checkpoint.tensors().size() ? 0 : 1;
}

// Writes a small dense model folder with the Llama names (the shape of what users download).
void write_dense(const std::filesystem::path& folder) {
  namespace st = bitnet::safetensors;
  std::filesystem::create_directories(folder);
  const std::uint64_t hidden = 16, intermediate = 44, kv = 8, vocab = 32;
  std::vector<st::tensor_spec> specs{{"model.embed_tokens.weight", st::dtype::F32, {vocab, hidden}}};
  for (int l = 0; l < 2; ++l) {
    const std::string p = "model.layers." + std::to_string(l) + ".";
    for (const auto& [name, shape] : std::vector<std::pair<std::string, std::vector<std::uint64_t>>>{
             {"input_layernorm.weight", {hidden}},           {"self_attn.q_proj.weight", {hidden, hidden}},
             {"self_attn.k_proj.weight", {kv, hidden}},      {"self_attn.v_proj.weight", {kv, hidden}},
             {"self_attn.o_proj.weight", {hidden, hidden}},  {"self_attn.attn_sub_norm.weight", {hidden}},
             {"post_attention_layernorm.weight", {hidden}},  {"mlp.gate_proj.weight", {intermediate, hidden}},
             {"mlp.up_proj.weight", {intermediate, hidden}}, {"mlp.down_proj.weight", {hidden, intermediate}},
             {"mlp.ffn_sub_norm.weight", {intermediate}}})
      specs.push_back({p + name, st::dtype::F32, shape});
  }
  specs.push_back({"model.norm.weight", st::dtype::F32, {hidden}});
  specs.push_back({"lm_head.weight", st::dtype::F32, {vocab, hidden}});
  std::mt19937 rng(1);
  std::normal_distribution<float> dist(0.0f, 0.2f);
  st::writer out(folder / "model.safetensors", specs, {{"format", "pt"}});
  for (const st::tensor_spec& spec : specs) {
    std::vector<float> values(spec.shape.size() == 1 ? spec.shape[0] : spec.shape[0] * spec.shape[1]);
    for (float& v : values) v = dist(rng);
    out.write_values<float>(spec.name, values);
  }
  out.finish();
  std::ofstream(folder / "config.json") << R"({"model_type": "bitnet", "num_hidden_layers": 2})" << "\n";
}

}  // namespace

int main(int argc, char** argv) {
  if (argc == 2) return load(argv[1]);
  const auto root = std::filesystem::temp_directory_path() / ("bitnet_hf_model_" + std::to_string(std::random_device{}()));
  struct cleanup {
    std::filesystem::path dir;
    ~cleanup() {
      std::error_code ec;
      std::filesystem::remove_all(dir, ec);
    }
  } remove_later{root};
  write_dense(root / "dense");

  // Dense in: the empty slots take BitLinear layers built from the latent weights.
  llama::causal_lm model;
  model.model.layers.resize(2);
  bitnet::load_state_dict(model, root / "dense");
  // Packed out, with the quantization_config transformers reads next to it in config.json.
  std::filesystem::create_directories(root / "packed");
  bitnet::save_state_dict(model, root / "packed" / "model.safetensors",
                          {.bit_linear = bitnet::bit_linear_storage::hf_packed});  // records autobitlinear
  hf::quantization_config config;
  config.modules_to_not_convert = {"lm_head", "model.embed_tokens"};
  std::ofstream(root / "packed" / "config.json")
      << R"({"model_type": "bitnet", "num_hidden_layers": 2, "quantization_config": )" << hf::to_json(config) << "}\n";
  return load(root / "packed");
}
