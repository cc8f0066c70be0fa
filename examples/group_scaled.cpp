// A group-scaled ternary model, as Ternary Bonsai ships it: an "unpacked" BF16 folder with Qwen3's
// names whose projections are exactly {-d, 0, +d} per group of 128 inputs. The example writes such a
// folder, loads it into a graph of plain Linear layers, imports every projection exactly (codes and
// scales read off, transfer::checked proving codes x scales == the BF16 weights bit for bit), runs
// it, fine-tunes it a few steps (straight-through estimator against the imported scales, which an
// exact import freezes: step 0 is the imported model, bit for bit), saves the latent weights and
// reloads them into a fresh import of the folder, which then computes the same outputs bit for bit.
#include <bitnet/hf_model.hpp>
#include <bitnet/replace.hpp>
#include <bitnet/state_dict.hpp>
#include <bitnet/training.hpp>

#include <cmath>
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <map>
#include <random>
#include <string>
#include <vector>

using bitnet::BitLinear;
using bitnet::Linear;
using bitnet::Matrix;

namespace qwen3 {
using proj = bitnet::linear_slot<Linear<float>>;  // a Linear until replace_linear swaps in a BitLinear
struct attention {
  proj q_proj, k_proj, v_proj, o_proj;
};
BITNET_LAYERS(attention, q_proj, k_proj, v_proj, o_proj);
struct mlp {
  proj gate_proj, up_proj, down_proj;
};
BITNET_LAYERS(mlp, gate_proj, up_proj, down_proj);
struct decoder_layer {
  attention self_attn;
  struct mlp mlp;
};
BITNET_LAYERS(decoder_layer, self_attn, mlp);
struct body {
  std::vector<decoder_layer> layers;
};
BITNET_LAYERS(body, layers);
struct causal_lm {
  body model;
};
BITNET_LAYERS(causal_lm, model);

constexpr bitnet::Index hidden = 256, kv = 128, intermediate = 384, layers = 2;

// An empty model of Qwen3's shape: the projections' weights come from the checkpoint.
causal_lm make() {
  causal_lm m;
  for (int l = 0; l < layers; ++l) {
    auto linear = [](bitnet::Index in, bitnet::Index out) { return proj(Linear<float>(in, out, false)); };
    m.model.layers.push_back({{linear(hidden, hidden), linear(hidden, kv), linear(hidden, kv), linear(hidden, hidden)},
                              {linear(hidden, intermediate), linear(hidden, intermediate), linear(intermediate, hidden)}});
  }
  return m;
}
}  // namespace qwen3

namespace {

constexpr bitnet::Index group = 128;

// Ternary per group of 128 inputs, d in BF16's range of exact values: what an unpacked folder holds.
Matrix<float> ternary_g128(bitnet::Index out, bitnet::Index in, std::mt19937& rng) {
  std::uniform_int_distribution<int> code(-1, 1), mantissa(64, 127);
  Matrix<float> w(out, in);
  for (bitnet::Index r = 0; r < out; ++r)
    for (bitnet::Index first = 0; first < in; first += group) {
      const float d = std::ldexp(float(mantissa(rng)), -13);  // 7 significant bits: exact in BF16
      for (bitnet::Index c = first; c < first + group; ++c) w(r, c) = float(code(rng)) * d;
    }
  return w;
}

void write_unpacked_folder(const std::filesystem::path& folder) {
  std::filesystem::create_directories(folder);
  qwen3::causal_lm m = qwen3::make();
  std::mt19937 rng(2026);
  for (qwen3::decoder_layer& layer : m.model.layers)
    for (qwen3::proj* p : {&layer.self_attn.q_proj, &layer.self_attn.k_proj, &layer.self_attn.v_proj,
                           &layer.self_attn.o_proj, &layer.mlp.gate_proj, &layer.mlp.up_proj, &layer.mlp.down_proj}) {
      Linear<float>& l = std::get<Linear<float>>(*p);
      l.weight = ternary_g128(l.weight.rows(), l.weight.cols(), rng);
    }
  bitnet::save_state_dict(m, folder / "model.safetensors", {.dtype = bitnet::safetensors::dtype::BF16});
  std::ofstream(folder / "config.json") << R"({"architectures": ["Qwen3ForCausalLM"], "model_type": "qwen3", )"
                                        << R"("hidden_size": 256, "intermediate_size": 384, "num_hidden_layers": 2})"
                                        << "\n";
}

// The model's projections applied to one input each (enough to show what the layers compute).
Matrix<float> run(qwen3::causal_lm& m, const Matrix<float>& x_hidden, const Matrix<float>& x_inter) {
  Matrix<float> all(x_hidden.rows(), 0);
  bitnet::for_each_bit_linear(m, [&](std::string_view, const BitLinear<float>& layer) {
    const Matrix<float> y = layer.forward(layer.in_features() == qwen3::hidden ? x_hidden : x_inter);
    Matrix<float> grown(all.rows(), all.cols() + y.cols());
    grown << all, y;
    all.swap(grown);
  });
  return all;
}

}  // namespace

int main() {
  const auto root = std::filesystem::temp_directory_path() / ("bitnet_group_scaled_" + std::to_string(std::random_device{}()));
  struct cleanup {
    std::filesystem::path dir;
    ~cleanup() {
      std::error_code ec;
      std::filesystem::remove_all(dir, ec);
    }
  } remove_at_exit{root};
  const auto unpacked = root / "Ternary-Bonsai-tiny-unpacked";
  write_unpacked_folder(unpacked);

  // 1. Load the BF16 folder into Linear layers and import every projection exactly.
  qwen3::causal_lm model = qwen3::make();
  bitnet::load_state_dict(model, bitnet::hf::checkpoint(unpacked));
  bitnet::replace_options options;
  options.layer_options.weight_scales = bitnet::weight_scaling::per_group;
  options.layer_options.group_size = group;
  options.layer_options.activation_scales = bitnet::activation_scaling::per_block;
  options.weights = bitnet::ternary_import::exact;
  const bitnet::replace_report report = bitnet::replace_linear(model, options);  // transfer::checked
  std::printf("%s", report.to_string().c_str());

  // 2. Run.
  std::mt19937 rng(7);
  std::normal_distribution<float> normal(0.0f, 1.0f);
  Matrix<float> x_hidden(4, qwen3::hidden), x_inter(4, qwen3::intermediate);
  for (float& v : x_hidden.reshaped()) v = normal(rng);
  for (float& v : x_inter.reshaped()) v = normal(rng);
  const Matrix<float> imported = run(model, x_hidden, x_inter);

  // 3. Fine-tune a few steps: the layers get latent weights (codes x scales: with the imported
  //    scales frozen this changes nothing), then the STE drives each projection towards a target
  //    (here: its imported output + 0.1), quantizing against the imported scales.
  bitnet::for_each_bit_linear(model, [](std::string_view, BitLinear<float>& layer) {
    layer.set_weight(layer.dequantized_weight());
  });
  if (run(model, x_hidden, x_inter) != imported) {
    std::printf("giving the imported layers latent weights changed the model\n");
    return 1;
  }
  // The scales are the imported d (0.008 to 0.016 here): a code moves once its latent weight crosses
  // +-d/2, so the step must move weights by a fraction of d within a few steps.
  const float learning_rate = 2.0f;
  double first_loss = 0, last_loss = 0;
  for (int step = 0; step < 5; ++step) {
    double loss = 0;
    bitnet::for_each_bit_linear(model, [&](std::string_view, BitLinear<float>& layer) {
      const Matrix<float>& x = layer.in_features() == qwen3::hidden ? x_hidden : x_inter;
      auto [y, tape] = bitnet::train_forward(layer, x, 1.0f);
      const Matrix<float> target = Matrix<float>::Constant(y.rows(), y.cols(), 0.1f);
      const Matrix<float> dy = (y - target) * (2.0f / float(y.size()));
      loss += double((y - target).squaredNorm()) / double(y.size());
      const auto grads = bitnet::backward(tape, dy);
      layer.set_weight(layer.weight() - learning_rate * grads.weight);
    });
    (step == 0 ? first_loss : last_loss) = loss;
  }
  std::printf("fine-tuning, 5 steps: loss %.5f -> %.5f\n", first_loss, last_loss);
  const Matrix<float> tuned = run(model, x_hidden, x_inter);

  // 4. Save the latent weights. The scales are the folder's (frozen), so a reload is: import the
  //    folder again, then give each layer its saved latent weights (set_weight keeps the scales).
  bitnet::save_state_dict(model, root / "tuned.safetensors");
  qwen3::causal_lm checkpoint = qwen3::make();  // plain Linear layers holding the saved latent weights
  bitnet::load_state_dict(checkpoint, root / "tuned.safetensors");
  bitnet::replace_options hold = options;       // BitLinear layers keep their latent weights bit for bit:
  hold.weights = bitnet::ternary_import::quantize;  // a way to read them back by path
  bitnet::replace_linear<bitnet::transfer::move>(checkpoint, hold);
  std::map<std::string, Matrix<float>, std::less<>> saved;
  bitnet::for_each_bit_linear(checkpoint, [&](std::string_view path, BitLinear<float>& layer) {
    saved.emplace(std::string(path), layer.weight());
  });
  qwen3::causal_lm reloaded = qwen3::make();
  bitnet::load_state_dict(reloaded, bitnet::hf::checkpoint(unpacked));
  bitnet::replace_linear(reloaded, options);
  bitnet::for_each_bit_linear(reloaded, [&](std::string_view path, BitLinear<float>& layer) {
    layer.set_weight(saved.at(std::string(path)));
  });
  const bool same = run(reloaded, x_hidden, x_inter) == tuned;
  std::printf("imported outputs changed by fine-tuning: %s; reloaded model computes the same outputs bit for bit: %s\n",
              imported == tuned ? "no" : "yes", same ? "yes" : "no");
  return same && imported != tuned && last_loss < first_loss ? 0 : 1;
}
