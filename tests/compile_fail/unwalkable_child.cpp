// A child type the library cannot walk, deep inside an otherwise valid graph.
#include <bitnet/replace.hpp>

#include <vector>

struct attention {
  bitnet::linear_slot<bitnet::Linear<float>> q{bitnet::Linear<float>(4, 4)};
};
#ifdef BITNET_FIXED
BITNET_LAYERS(attention, q);
#endif

struct block {
  attention attn;
};
BITNET_LAYERS(block, attn);

int main() {
  std::vector<block> model(2);
  bitnet::replace_linear(model);
}
