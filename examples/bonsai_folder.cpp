// A rotated, group-scaled ternary model folder as Ternary Bonsai 2 ships it "unpacked": BF16 weights
// with Qwen3's names that are exactly {-d, 0, +d} per group of 128 inputs, stored in a rotated basis
// that the folder declares in hadamard_packing.json (block, signs per input width, folded tensors).
//
// The example writes such a folder, loads it straight into empty BitLinear slots with the exact
// import (codes and scales read off, never re-quantized; each layer gets the rotation the folder
// declares for its width), checks every projection against a float reference of the same weights
// (within the activation-quantization bound), fine-tunes a few steps, saves the model in bitnet's
// packed group-scaled form (codes, [out, groups] scales, the rotation's signs, all declared in the
// file's quantization_config) and reloads it into a fresh model: the same codes, scales, rotations
// and outputs, bit for bit.
#include <bitnet/hf_model.hpp>
#include <bitnet/state_dict.hpp>
#include <bitnet/training.hpp>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <map>
#include <optional>
#include <random>
#include <string>
#include <vector>

using bitnet::BitLinear;
using bitnet::Index;
using bitnet::Matrix;
using bitnet::Vector;

namespace qwen3 {
struct rms_norm {
  Vector<float> weight;
};
BITNET_LAYERS(rms_norm, weight);
using proj = std::optional<BitLinear<float>>;  // filled from the folder, with the folder's shapes
struct attention {
  proj q_proj, k_proj, v_proj, o_proj;
  rms_norm q_norm, k_norm;
};
BITNET_LAYERS(attention, q_proj, k_proj, v_proj, o_proj, q_norm, k_norm);
struct mlp {
  proj gate_proj, up_proj, down_proj;
};
BITNET_LAYERS(mlp, gate_proj, up_proj, down_proj);
struct decoder_layer {
  rms_norm input_layernorm;
  attention self_attn;
  rms_norm post_attention_layernorm;
  struct mlp mlp;
};
BITNET_LAYERS(decoder_layer, input_layernorm, self_attn, post_attention_layernorm, mlp);
struct embedding {
  Matrix<float> weight;
};
BITNET_LAYERS(embedding, weight);
struct body {
  embedding embed_tokens;
  std::vector<decoder_layer> layers;
  rms_norm norm;
};
BITNET_LAYERS(body, embed_tokens, layers, norm);
struct head {
  Matrix<float> weight;
};
BITNET_LAYERS(head, weight);
struct causal_lm {
  body model;
  head lm_head;
};
BITNET_LAYERS(causal_lm, model, lm_head);

constexpr Index hidden = 256, head_dim = 64, kv = 128, intermediate = 512, vocab = 64, layers = 2;
}  // namespace qwen3

namespace {

namespace st = bitnet::safetensors;
constexpr Index group = 128, block = 256;

// Ternary per group of 128 inputs, d with 7 significant bits (exact in BF16).
Matrix<float> ternary_g128(Index out, Index in, std::mt19937& rng) {
  std::uniform_int_distribution<int> code(-1, 1), mantissa(64, 127);
  Matrix<float> w(out, in);
  for (Index r = 0; r < out; ++r)
    for (Index first = 0; first < in; first += group) {
      const float d = std::ldexp(float(mantissa(rng)), -13);
      for (Index c = first; c < first + group; ++c) w(r, c) = float(code(rng)) * d;
    }
  return w;
}

// The folder: model.safetensors (BF16), config.json (plain Qwen3: it declares no quantization) and
// hadamard_packing.json (the rotation folded into every projection). Returns the projections' weights.
std::map<std::string, Matrix<float>> write_folder(const std::filesystem::path& folder,
                                                  const std::map<Index, bitnet::hadamard_rotation>& rotations) {
  using qwen3::hidden, qwen3::kv, qwen3::intermediate;
  std::filesystem::create_directories(folder);
  std::mt19937 rng(2026);
  std::normal_distribution<float> normal(0.0f, 0.5f);
  std::map<std::string, Matrix<float>> tensors, projections;
  const auto dense = [&](Index rows, Index cols) {
    Matrix<float> m(rows, cols);
    for (float& v : m.reshaped()) v = normal(rng);
    return m;
  };
  tensors["model.embed_tokens.weight"] = dense(qwen3::vocab, hidden);
  tensors["model.norm.weight"] = dense(1, hidden);
  tensors["lm_head.weight"] = dense(qwen3::vocab, hidden);
  for (Index l = 0; l < qwen3::layers; ++l) {
    const std::string p = "model.layers." + std::to_string(l) + ".";
    for (const auto& [name, shape] : std::vector<std::pair<std::string, std::pair<Index, Index>>>{
             {"self_attn.q_proj", {hidden, hidden}}, {"self_attn.k_proj", {kv, hidden}},
             {"self_attn.v_proj", {kv, hidden}},     {"self_attn.o_proj", {hidden, hidden}},
             {"mlp.gate_proj", {intermediate, hidden}}, {"mlp.up_proj", {intermediate, hidden}},
             {"mlp.down_proj", {hidden, intermediate}}})
      projections[p + name + ".weight"] = tensors[p + name + ".weight"] = ternary_g128(shape.first, shape.second, rng);
    for (const char* norm : {"input_layernorm", "post_attention_layernorm"}) tensors[p + norm + ".weight"] = dense(1, hidden);
    for (const char* norm : {"self_attn.q_norm", "self_attn.k_norm"}) tensors[p + norm + ".weight"] = dense(1, qwen3::head_dim);
  }
  std::vector<st::tensor_spec> specs;
  for (const auto& [name, values] : tensors)
    specs.push_back({name, st::dtype::BF16,
                     values.rows() == 1 ? std::vector<std::uint64_t>{std::uint64_t(values.cols())}
                                        : std::vector<std::uint64_t>{std::uint64_t(values.rows()), std::uint64_t(values.cols())}});
  st::writer out(folder / "model.safetensors", specs, {{"format", "pt"}});
  for (const auto& [name, values] : tensors) out.write(name, values);  // every value is exact in BF16
  out.finish();
  std::ofstream(folder / "config.json") << R"({"architectures": ["Qwen3ForCausalLM"], "model_type": "qwen3", )"
                                        << R"("hidden_size": 256, "intermediate_size": 512, "num_hidden_layers": 2, )"
                                        << R"("torch_dtype": "bfloat16"})" << "\n";
  std::ofstream packing(folder / "hadamard_packing.json");
  packing << R"({"schema_version": 1, "kind": "hadamard-weight-fold", "status": "requires-matching-runtime", )"
          << R"("transform": {"name": "normalized-signed-sylvester-walsh-hadamard", "block_size": )" << block
          << R"(, "sign_mode": "explicit"}, "signs": {)";
  bool first = true;
  for (const auto& [width, rotation] : rotations) {
    packing << (first ? "" : ", ") << '"' << width << "\": [";
    for (std::size_t k = 0; k < rotation.signs().size(); ++k) packing << (k ? ", " : "") << int(rotation.signs()[k]);
    packing << ']';
    first = false;
  }
  packing << R"(}, "tensors": [)";
  first = true;
  for (const auto& [name, w] : projections) {
    packing << (first ? "" : ", ") << R"({"name": ")" << name << R"(", "axis": -1, "role": "fold-before-matmul"})";
    first = false;
  }
  packing << "]}\n";
  return projections;
}

template <class F>
void for_each_projection(qwen3::causal_lm& m, F&& fn) {
  for (std::size_t l = 0; l < m.model.layers.size(); ++l) {
    qwen3::decoder_layer& layer = m.model.layers[l];
    const std::string p = "model.layers." + std::to_string(l) + ".";
    fn(p + "self_attn.q_proj", *layer.self_attn.q_proj);
    fn(p + "self_attn.k_proj", *layer.self_attn.k_proj);
    fn(p + "self_attn.v_proj", *layer.self_attn.v_proj);
    fn(p + "self_attn.o_proj", *layer.self_attn.o_proj);
    fn(p + "mlp.gate_proj", *layer.mlp.gate_proj);
    fn(p + "mlp.up_proj", *layer.mlp.up_proj);
    fn(p + "mlp.down_proj", *layer.mlp.down_proj);
  }
}

Matrix<float> input_of(Index rows, Index width, std::uint32_t seed) {
  std::mt19937 rng(seed);
  std::normal_distribution<float> normal(0.0f, 1.0f);
  Matrix<float> x(rows, width);
  for (float& v : x.reshaped()) v = normal(rng);
  x.col(3) *= 20.0f;  // an outlier channel, as LLM activations have
  return x;
}

// The float reference: y = W (R x) in double from the folder's weights, and the bound of per-block
// int8 activation quantization: each input of block j is off by at most absmax_j / 254 (half a step).
bool matches_reference(const BitLinear<float>& layer, const Matrix<float>& w, const Matrix<float>& x, double& worst) {
  const Matrix<float> rotated = layer.options().rotation->apply(x);
  const Matrix<float> y = layer.forward(x);
  for (Index b = 0; b < x.rows(); ++b)
    for (Index o = 0; o < w.rows(); ++o) {
      double exact = 0, bound = 0;
      for (Index first = 0; first < w.cols(); first += group) {
        double absmax = 0, weight_sum = 0;
        for (Index c = first; c < first + group; ++c) {
          exact += double(w(o, c)) * double(rotated(b, c));
          absmax = std::max(absmax, std::fabs(double(rotated(b, c))));
          weight_sum += std::fabs(double(w(o, c)));
        }
        bound += absmax / 254.0 * weight_sum;
      }
      const double error = std::fabs(double(y(b, o)) - exact);
      worst = std::max(worst, error / (bound + 1e-30));
      if (error > bound * (1 + 1e-5) + 1e-6 * std::fabs(exact)) return false;
    }
  return true;
}

}  // namespace

int main() {
  const auto root = std::filesystem::temp_directory_path() / ("bitnet_bonsai_folder_" + std::to_string(std::random_device{}()));
  struct cleanup {
    std::filesystem::path dir;
    ~cleanup() {
      std::error_code ec;
      std::filesystem::remove_all(dir, ec);
    }
  } remove_at_exit{root};
  std::map<Index, bitnet::hadamard_rotation> rotations;  // one sign vector per input width, as the folder stores them
  for (const Index width : {qwen3::hidden, qwen3::intermediate})
    rotations.emplace(width, bitnet::hadamard_rotation::random_signs(width, block, std::uint64_t(width)));
  const auto folder = root / "Ternary-Bonsai-2-tiny-unpacked";
  const std::map<std::string, Matrix<float>> source = write_folder(folder, rotations);

  // 1. Load into empty slots, importing exactly: per group of 128, activations per block; the
  //    folder itself declares the rotations (hadamard_packing.json), so each layer gets its own.
  qwen3::causal_lm model;
  model.model.layers.resize(qwen3::layers);
  bitnet::state_dict_options load;
  load.new_layers.weight_scales = bitnet::weight_scaling::per_group;
  load.new_layers.group_size = group;
  load.new_layers.activation_scales = bitnet::activation_scaling::per_block;
  load.weights = bitnet::ternary_import::exact;
  const bitnet::state_dict_report loaded = bitnet::load_state_dict(model, folder, load);  // strict
  bool ok = true;
  double worst = 0;
  for_each_projection(model, [&](const std::string& name, const BitLinear<float>& layer) {
    const Matrix<float>& w = source.at(name + ".weight");
    ok = ok && layer.dequantized_weight() == w;  // codes x scales == the BF16 weights, bit for bit
    ok = ok && layer.options().rotation && *layer.options().rotation == rotations.at(layer.in_features());
    ok = ok && matches_reference(layer, w, input_of(4, layer.in_features(), 7), worst);
  });
  std::printf("imported %zu tensors exactly (%s); every projection within the activation-quantization bound of "
              "W (R x): %s (worst error / bound %.3f)\n",
              loaded.loaded.size(), ok ? "codes x scales == BF16 weights" : "MISMATCH", ok ? "yes" : "no", worst);

  // 2. Fine-tune a few steps: the imported layers are frozen (weight_scale_update::frozen), so latent
  //    weights from codes x scales change nothing, the STE moves codes against the imported scales,
  //    and the rotation stays fixed (gradients flow through it). Step 0 is the imported model.
  for_each_projection(model, [&](const std::string&, BitLinear<float>& layer) {
    const Matrix<float> x = input_of(4, layer.in_features(), 11);
    const Matrix<float> before = layer.forward(x);
    layer.set_weight(layer.dequantized_weight());
    ok = ok && layer.options().scale_update == bitnet::weight_scale_update::frozen &&
         bitnet::train_forward(layer, x, 1.0f).output == before;
  });
  double first_loss = 0, last_loss = 0;
  for (int step = 0; step < 6; ++step) {
    double loss = 0;
    for_each_projection(model, [&](const std::string&, BitLinear<float>& layer) {
      const Matrix<float> x = input_of(4, layer.in_features(), 11);
      auto [y, tape] = bitnet::train_forward(layer, x, 1.0f);
      const Matrix<float> target = Matrix<float>::Constant(y.rows(), y.cols(), 0.1f);
      loss += double((y - target).squaredNorm()) / double(y.size());
      const auto grads = bitnet::backward(tape, ((y - target) * (2.0f / float(y.size()))).eval());
      layer.set_weight(layer.weight() - 0.3f * grads.weight);  // large enough to move codes across +-d/2
    });
    (step == 0 ? first_loss : last_loss) = loss;
  }
  // (A toy objective on random inputs; docs/fine-tuning.md has the training checks against PyTorch
  // and naive references. The loss must fall: codes moved, the scales did not.)
  std::printf("fine-tuning, 6 steps from the imported model (scales frozen): loss %.5f -> %.5f\n", first_loss, last_loss);
  ok = ok && std::isfinite(last_loss) && last_loss < first_loss;

  // 3. Save packed (2-bit codes, [out, 2] unit scales, the signs; quantization_config declares
  //    per_group 128, per_block activations and the rotation) and reload into a fresh model.
  const auto packed = root / "tuned-packed";
  std::filesystem::create_directories(packed);
  bitnet::save_state_dict(model, packed / "model.safetensors", {.bit_linear = bitnet::bit_linear_storage::hf_packed});
  qwen3::causal_lm reloaded;
  reloaded.model.layers.resize(qwen3::layers);
  bitnet::load_state_dict(reloaded, packed);  // every layer's form comes from the file's declaration
  bool same = true;
  std::vector<std::pair<std::string, const BitLinear<float>*>> saved;
  for_each_projection(model, [&](const std::string& name, const BitLinear<float>& layer) { saved.emplace_back(name, &layer); });
  std::size_t i = 0;
  for_each_projection(reloaded, [&](const std::string&, const BitLinear<float>& back) {
    const BitLinear<float>& layer = *saved[i++].second;
    const Matrix<float> x = input_of(3, layer.in_features(), 5);
    same = same && back.ternary_weight() == layer.ternary_weight() && back.unit_scales() == layer.unit_scales() &&
           back.options().rotation == layer.options().rotation && back.options().group_size == group &&
           back.options().activation_scales == bitnet::activation_scaling::per_block && back.forward(x) == layer.forward(x);
  });
  std::printf("packed, reloaded: same codes, unit scales, rotations and outputs bit for bit: %s\n", same ? "yes" : "no");
  return ok && same ? 0 : 1;
}
