// A plain struct model: members declared as bitnet::linear_slot, listed once with BITNET_LAYERS.
// One layer is the user's own type (a std::vector<float> plus dimensions) exposed with
// bitnet_linear. A dry run first shows what would change; transfer::move then takes the weight
// buffers of bitnet::Linear layers instead of copying them.
#include <bitnet/bitnet.hpp>

#include <iostream>
#include <vector>

namespace app {

// The user's own dense layer, stored row-major in a flat vector.
struct flat_linear {
  bitnet::Index in = 0, out = 0;
  std::vector<float> weight;  // out * in
  std::vector<float> bias;    // out
};
inline bitnet::linear_view<float> bitnet_linear(const flat_linear& l) {
  return {Eigen::Map<const bitnet::Matrix<float>>(l.weight.data(), l.out, l.in),
          Eigen::Map<const bitnet::Vector<float>>(l.bias.data(), l.out)};
}

struct encoder {
  bitnet::linear_slot<bitnet::Linear<float>> query, key, value;
  bitnet::linear_slot<flat_linear> output;  // becomes a BitLinear<float>
};
BITNET_LAYERS(encoder, query, key, value, output);

}  // namespace app

int main() {
  const auto dense = [](bitnet::Index in, bitnet::Index out) {
    bitnet::Linear<float> l(in, out);
    l.weight.setRandom();
    return l;
  };
  app::flat_linear output{16, 8, std::vector<float>(16 * 8), std::vector<float>(8, 0.5f)};
  for (std::size_t i = 0; i < output.weight.size(); ++i) output.weight[i] = float(int(i % 7) - 3) / 10;
  app::encoder model{dense(16, 16), dense(16, 16), dense(16, 16), output};

  bitnet::replace_options options;
  options.dry_run = true;
  std::cout << bitnet::replace_linear(model, options) << "\n";
  const bool unchanged = std::holds_alternative<bitnet::Linear<float>>(model.query);

  const float* query_buffer = std::get<bitnet::Linear<float>>(model.query).weight.data();
  options.dry_run = false;
  const auto report = bitnet::replace_linear<bitnet::transfer::move>(model, options);
  std::cout << report << "\n";

  const auto& query = std::get<bitnet::BitLinear<float>>(model.query);
  const auto& out = std::get<bitnet::BitLinear<float>>(model.output);
  const bool moved = query.weight().data() == query_buffer;
  std::cout << "dry run left the model unchanged: " << (unchanged ? "yes" : "no") << "\n"
            << "query's weight buffer was moved, not copied: " << (moved ? "yes" : "no") << "\n"
            << "output (a flat_linear) was copied: weight(1, 2) = " << out.weight()(1, 2) << "\n";
  return unchanged && moved && out.weight()(1, 2) == output.weight[1 * 16 + 2] ? 0 : 1;
}
