// A transfer policy that does not follow the protocol.
#include <bitnet/replace.hpp>

#include <vector>

struct my_policy {
#ifdef BITNET_FIXED
  static constexpr bool takes_buffers = false;
  void prepare(const bitnet::layer_source<float>&) {}
  void verify(const bitnet::layer_source<float>&, const bitnet::BitLinear<float>&) {}
#else
  void check(const bitnet::BitLinear<float>&) {}
#endif
};

int main() {
  std::vector<bitnet::linear_slot<bitnet::Linear<float>>> model{bitnet::Linear<float>(4, 4)};
  bitnet::replace_linear(model, {}, my_policy{});
}
