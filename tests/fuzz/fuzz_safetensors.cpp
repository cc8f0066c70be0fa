// libFuzzer target for the safetensors reader (clang: -fsanitize=fuzzer,address,undefined).
// Every accepted input has its invariants re-checked by the harness; see docs/safetensors.md.
#include "safetensors_harness.hpp"

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) {
  harness::check_file(data, size);
  return 0;
}
