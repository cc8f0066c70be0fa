// A polymorphic tree that recognizes its Linear nodes but cannot build their replacements.
#include <bitnet/replace.hpp>

#include <memory>
#include <vector>

struct module {
  virtual ~module() = default;
};
struct dense : module {
  bitnet::Linear<float> linear{4, 4};
};
struct bit_dense : module {
  explicit bit_dense(bitnet::BitLinear<float> b) : bit(std::move(b)) {}
  bitnet::BitLinear<float> bit;
};
bitnet::linear_view<float> bitnet_linear(const dense& d) { return {d.linear.weight, d.linear.bias}; }
dense* bitnet_as_linear(module& m) noexcept { return dynamic_cast<dense*>(&m); }
#ifdef BITNET_FIXED
std::unique_ptr<module> bitnet_make_replacement(const dense&, bitnet::BitLinear<float>&& bit) {
  return std::make_unique<bit_dense>(std::move(bit));
}
#endif

int main() {
  std::vector<std::unique_ptr<module>> model;
  model.push_back(std::make_unique<dense>());
  bitnet::replace_linear(model);
}
