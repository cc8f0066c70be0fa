// A variant slot that lists a linear layer but no BitLinear alternative to put in its place.
#include <bitnet/replace.hpp>

#include <variant>
#include <vector>

#ifdef BITNET_FIXED
using slot = std::variant<bitnet::Linear<float>, bitnet::BitLinear<float>>;
#else
using slot = std::variant<bitnet::Linear<float>, int>;
#endif

int main() {
  std::vector<slot> model{bitnet::Linear<float>(4, 4)};
  bitnet::replace_linear(model);
}
