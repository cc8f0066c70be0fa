// A sequential model whose layers are std::variant slots: a Linear now, a BitLinear after
// replace_linear. Activations are alternatives of the same variant, so the model stays a plain
// std::vector the library walks with no user code at all (children "0", "1", ...).
#include <bitnet/bitnet.hpp>

#include <cmath>
#include <iostream>
#include <random>
#include <variant>
#include <vector>

namespace {

using bitnet::BitLinear;
using bitnet::Index;
using bitnet::Linear;
using bitnet::Matrix;

struct relu {
  Matrix<float> forward(const Matrix<float>& x) const { return x.cwiseMax(0.0f); }
};

using layer = std::variant<Linear<float>, BitLinear<float>, relu>;

Linear<float> pretrained(Index in, Index out, std::mt19937& rng) {
  std::normal_distribution<float> weight(0.0f, 1.0f / std::sqrt(float(in)));
  Linear<float> l(in, out);
  for (Index i = 0; i < l.weight.size(); ++i) l.weight.data()[i] = weight(rng);
  l.bias->setConstant(0.01f);
  return l;
}

Matrix<float> forward(const std::vector<layer>& model, const Matrix<float>& x) {
  Matrix<float> h = x;
  for (const auto& l : model) h = std::visit([&](const auto& f) { return Matrix<float>(f.forward(h)); }, l);
  return h;
}

}  // namespace

int main() {
  std::mt19937 rng(7);
  std::vector<layer> model{pretrained(64, 256, rng), relu{}, pretrained(256, 256, rng), relu{}, pretrained(256, 10, rng)};
  const Matrix<float> w0 = std::get<Linear<float>>(model[0]).weight;

  std::vector<Matrix<float>> probes{Matrix<float>::Random(32, 64)};
  const auto run = [](const std::vector<layer>& m, const Matrix<float>& x) { return forward(m, x); };
  const auto before = bitnet::record_outputs(model, run, probes);

  const bitnet::replace_report report = bitnet::replace_linear(model);  // transfer::checked
  std::cout << report << "\n";
  const bitnet::output_difference d = bitnet::compare_outputs(before, model, run);
  std::cout << "model output: " << d << "\n";

  const bool ok = report.layers.size() == 3 && std::holds_alternative<BitLinear<float>>(model[4]) &&
                  std::holds_alternative<relu>(model[1]) && std::get<BitLinear<float>>(model[0]).weight() == w0;
  std::cout << (ok ? "layers 0, 2 and 4 are BitLinear layers holding their pretrained weights\n" : "error\n");
  return ok ? 0 : 1;
}
