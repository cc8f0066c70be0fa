// The main job: take a small transformer-like model whose layers hold "pretrained" dense weights,
// turn every Linear into a BitLinear with replace_linear (all or nothing, every weight bit kept and
// checked), and show what the conversion did: the per-layer report (shapes, weight scales, zero
// fractions, reconstruction error, memory), each layer's output difference on the activations it
// really sees, and the whole model's output difference.
#include <bitnet/bitnet.hpp>

#include <cmath>
#include <cstdio>
#include <iostream>
#include <map>
#include <random>
#include <string>
#include <vector>

namespace {

using bitnet::Index;
using bitnet::Linear;
using bitnet::Matrix;
using slot = bitnet::linear_slot<Linear<float>>;  // a Linear now, a BitLinear<float> after the swap

struct attention {
  slot q, k, v, o;
};
BITNET_LAYERS(attention, q, k, v, o);

struct feed_forward {
  slot up, down;
};
BITNET_LAYERS(feed_forward, up, down);

struct block {
  attention attn;
  feed_forward mlp;
};
BITNET_LAYERS(block, attn, mlp);

struct model {
  std::vector<block> blocks;
  slot lm_head;
};
BITNET_LAYERS(model, blocks, lm_head);

// Gaussian weights with std 1/sqrt(in) (as trained layers roughly have) and small biases.
Linear<float> pretrained(Index in, Index out, std::mt19937& rng) {
  std::normal_distribution<float> weight(0.0f, 1.0f / std::sqrt(float(in)));
  std::normal_distribution<float> bias(0.0f, 0.02f);
  Linear<float> layer(in, out);
  for (Index i = 0; i < layer.weight.size(); ++i) layer.weight.data()[i] = weight(rng);
  for (Index i = 0; i < out; ++i) (*layer.bias)(i) = bias(rng);
  return layer;
}

model make_model(Index dim, Index hidden, Index vocab, int depth, std::mt19937& rng) {
  model m{{}, pretrained(dim, vocab, rng)};
  for (int i = 0; i < depth; ++i)
    m.blocks.push_back({{pretrained(dim, dim, rng), pretrained(dim, dim, rng), pretrained(dim, dim, rng),
                         pretrained(dim, dim, rng)},
                        {pretrained(dim, hidden, rng), pretrained(hidden, dim, rng)}});
  return m;
}

// Each layer's input and output during a forward pass, by path.
struct layer_trace {
  std::map<std::string, Matrix<float>> inputs, outputs;
};

Matrix<float> run(const slot& layer, const Matrix<float>& x, const std::string& path, layer_trace* trace) {
  Matrix<float> y = std::visit([&](const auto& l) { return Matrix<float>(l.forward(x)); }, layer);
  if (trace) {
    trace->inputs[path] = x;
    trace->outputs[path] = y;
  }
  return y;
}

Matrix<float> norm(const Matrix<float>& x) { return bitnet::rms_norm(x); }

// A pre-norm transformer over a sequence of tokens (rows): single-head attention, ReLU MLP.
Matrix<float> forward(const model& m, const Matrix<float>& tokens, layer_trace* trace = nullptr) {
  Matrix<float> h = tokens;
  for (std::size_t i = 0; i < m.blocks.size(); ++i) {
    const block& b = m.blocks[i];
    const std::string at = "blocks." + std::to_string(i) + ".";
    const Matrix<float> x = norm(h);
    const Matrix<float> q = run(b.attn.q, x, at + "attn.q", trace), k = run(b.attn.k, x, at + "attn.k", trace),
                        v = run(b.attn.v, x, at + "attn.v", trace);
    Matrix<float> scores = (q * k.transpose()) / std::sqrt(float(q.cols()));
    for (Index r = 0; r < scores.rows(); ++r) {
      scores.row(r) = (scores.row(r).array() - scores.row(r).maxCoeff()).exp();
      scores.row(r) /= scores.row(r).sum();
    }
    h += run(b.attn.o, scores * v, at + "attn.o", trace);
    const Matrix<float> up = run(b.mlp.up, norm(h), at + "mlp.up", trace).cwiseMax(0.0f);
    h += run(b.mlp.down, up, at + "mlp.down", trace);
  }
  return run(m.lm_head, norm(h), "lm_head", trace);
}

std::map<std::string, const slot*> layers_by_path(const model& m) {
  std::map<std::string, const slot*> layers{{"lm_head", &m.lm_head}};
  for (std::size_t i = 0; i < m.blocks.size(); ++i) {
    const block& b = m.blocks[i];
    const std::string at = "blocks." + std::to_string(i) + ".";
    layers[at + "attn.q"] = &b.attn.q;
    layers[at + "attn.k"] = &b.attn.k;
    layers[at + "attn.v"] = &b.attn.v;
    layers[at + "attn.o"] = &b.attn.o;
    layers[at + "mlp.up"] = &b.mlp.up;
    layers[at + "mlp.down"] = &b.mlp.down;
  }
  return layers;
}

}  // namespace

int main() {
  std::mt19937 rng(2026);
  model m = make_model(/*dim=*/128, /*hidden=*/512, /*vocab=*/256, /*depth=*/3, rng);

  std::normal_distribution<float> normal(0.0f, 1.0f);
  std::vector<Matrix<float>> probes(2, Matrix<float>(16, 128));
  for (auto& p : probes)
    for (Index i = 0; i < p.size(); ++i) p.data()[i] = normal(rng);

  // Before: the dense model's outputs, and what every layer sees and produces.
  const auto forward_fn = [](const model& mm, const Matrix<float>& x) { return forward(mm, x); };
  const bitnet::output_snapshot<float> before = bitnet::record_outputs(m, forward_fn, probes);
  layer_trace dense;
  forward(m, probes[0], &dense);

  // The swap. lm_head stays dense, as in Hugging Face's modules_to_not_convert.
  bitnet::replace_options options;
  options.exclude = {"lm_head"};
  const bitnet::replace_report report = bitnet::replace_linear(m, options);  // transfer::checked
  std::cout << report << "\n";

  // Each layer alone, on the activations it saw in the dense model.
  std::printf("%-18s %16s %18s\n", "layer", "output rel.err", "cosine similarity");
  const auto layers = layers_by_path(m);
  for (const auto& row : report.layers) {
    const Matrix<float> y = run(*layers.at(row.path), dense.inputs.at(row.path), row.path, nullptr);
    const bitnet::output_difference d = bitnet::compare_outputs(dense.outputs.at(row.path), y);
    std::printf("%-18s %16.4f %18.4f\n", row.path.c_str(), d.relative_error, d.cosine_similarity);
  }

  // The whole model, before and after, on the same probes.
  const bitnet::output_difference whole = bitnet::compare_outputs(before, m, forward_fn);
  std::cout << "\nwhole model: " << whole << "\n";

  // The point of it all: each BitLinear computes with its layer's pretrained weights.
  if (report.layers.size() != 18 || report.kept.size() != 1 || !(whole.cosine_similarity > 0.5)) {
    std::printf("error: unexpected conversion result\n");
    return 1;
  }
  std::printf("18 layers converted; every BitLinear holds its layer's weights and bias bit for bit (checked)\n");
  return 0;
}
