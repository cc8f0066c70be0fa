// libFuzzer target for the GGUF reader (clang: -fsanitize=fuzzer,address,undefined). Every
// accepted input has its invariants re-checked by the harness; see docs/gguf.md.
#include "gguf_harness.hpp"

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) {
  harness::check_file(data, size);
  return 0;
}
