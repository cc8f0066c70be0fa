// A tiny app using bitnet the way a user would: one include, one target, no test framework.
#include <bitnet/bitnet.hpp>
#include <bitnet/gguf.hpp>  // the file headers are included on their own

#include <cstdio>
#include <cstdlib>

int main() {
  bitnet::Matrix<float> w(2, 4);
  w << 1, -1, 0, 2,
       -2, 1, 1, 0;
  bitnet::Vector<float> b(2);
  b << 0.5f, -1.0f;
  const bitnet::BitLinear<float> layer(w, b);
  bitnet::Matrix<float> x(1, 4);
  x << 127, -127, 62.5f, 0;
  const bitnet::Matrix<float> y = layer.forward(x);
  std::printf("y = [%g, %g]\n", double(y(0, 0)), double(y(0, 1)));
  // Built without -march flags, the app still runs the best kernels the CPU has.
  std::printf("kernels: %s (best on this CPU: %s)\n", bitnet::isa_name(bitnet::last_isa()).data(),
              bitnet::isa_name(bitnet::best_isa()).data());
  const bool best_kernels = std::getenv("BITNET_ISA") != nullptr || bitnet::last_isa() == bitnet::best_isa();
  // GGUF comes with the core target (no JSON needed): TQ2_0 is ggml's type 35.
  const bool gguf_found = bitnet::gguf::find_tensor_type(35)->name == "TQ2_0";
  return (y(0, 0) == 254.5f && y(0, 1) == -193.0f && best_kernels && gguf_found) ? 0 : 1;
}
