// A transfer policy of your own: everything transfer::checked does, plus a rule of yours. When a
// layer breaks it, replace_linear throws and the model is left exactly as it was.
#include <bitnet/bitnet.hpp>

#include <iostream>
#include <string>
#include <vector>

namespace {

// Refuses layers that would lose too much: most of their ternary weights zero.
struct max_sparsity : bitnet::transfer::checked {
  double limit = 0.6;
  std::vector<std::string> log;

  template <bitnet::real_scalar T>
  void verify(const bitnet::layer_source<T>& source, const bitnet::BitLinear<T>& layer) {
    checked::verify(source, layer);  // bit-identical weights and a matching probe output first
    const auto& codes = layer.ternary_weight();
    const double zeros = double((codes.array() == 0).count()) / double(codes.size());
    if (zeros > limit)
      throw bitnet::transfer_error(std::string(source.path()) + ": " + std::to_string(int(100 * zeros)) +
                                   "% of its weights would be zero (limit " + std::to_string(int(100 * limit)) + "%)");
    log.push_back(std::string(source.path()) + " ok, " + std::to_string(int(100 * zeros)) + "% zeros");
  }
};

}  // namespace

int main() {
  std::vector<bitnet::linear_slot<bitnet::Linear<float>>> model;
  for (int i = 0; i < 3; ++i) {
    bitnet::Linear<float> l(32, 32);
    l.weight.setRandom();
    model.push_back(std::move(l));
  }
  // layer 2 holds one large outlier: mean |w| is tiny, so almost every weight rounds to 0
  auto& outlier = std::get<bitnet::Linear<float>>(model[2]);
  outlier.weight *= 0.001f;
  outlier.weight(0, 0) = 50.0f;

  max_sparsity policy;
  try {
    bitnet::replace_linear(model, {}, policy);
    std::cout << "error: the outlier layer was accepted\n";
    return 1;
  } catch (const bitnet::transfer_error& e) {
    std::cout << "refused: " << e.what() << "\n";
  }
  for (const auto& line : policy.log) std::cout << "  checked before the refusal: " << line << "\n";
  const bool untouched = std::holds_alternative<bitnet::Linear<float>>(model[0]) &&
                         std::holds_alternative<bitnet::Linear<float>>(model[1]);
  std::cout << "layers 0 and 1 are still dense: " << (untouched ? "yes" : "no") << "\n";

  // Keep the outlier layer dense and convert the rest.
  bitnet::replace_options options;
  options.exclude = {bitnet::exclude_rule::exact("2")};
  policy.log.clear();
  std::cout << bitnet::replace_linear(model, options, policy);
  return untouched && policy.log.size() == 2 ? 0 : 1;
}
