// replace_linear on a type with no hooks: our static_assert says what to provide.
#include <bitnet/replace.hpp>

struct encoder {
  bitnet::linear_slot<bitnet::Linear<float>> proj{bitnet::Linear<float>(4, 4)};
};
#ifdef BITNET_FIXED
BITNET_LAYERS(encoder, proj);
#endif

int main() {
  encoder model;
  bitnet::replace_linear(model);
}
