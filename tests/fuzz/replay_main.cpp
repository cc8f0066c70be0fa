// Replays a corpus through a fuzz harness on every build (any compiler):
//   safetensors_replay VALID_DIR INVALID_DIR     (gguf_replay: the same with gguf_harness.hpp)
// every file in VALID_DIR must be accepted and every file in INVALID_DIR rejected with an
// io_error; the harness aborts on any broken invariant.
#ifndef BITNET_FUZZ_HARNESS
#define BITNET_FUZZ_HARNESS "safetensors_harness.hpp"
#endif
#include BITNET_FUZZ_HARNESS

#include <algorithm>
#include <filesystem>
#include <fstream>
#include <iterator>

namespace fs = std::filesystem;

int main(int argc, char** argv) {
  if (argc != 3) {
    std::fprintf(stderr, "usage: %s VALID_DIR INVALID_DIR\n", argv[0]);
    return 2;
  }
  int failures = 0, replayed = 0;
  for (int expect_valid = 1; expect_valid >= 0; --expect_valid) {
    std::vector<fs::path> files;
    for (const auto& entry : fs::directory_iterator(argv[expect_valid ? 1 : 2]))
      if (entry.is_regular_file()) files.push_back(entry.path());
    std::sort(files.begin(), files.end());
    for (const fs::path& file : files) {
      std::ifstream in(file, std::ios::binary);
      const std::vector<char> bytes((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
      const bool accepted = harness::check_file(reinterpret_cast<const std::uint8_t*>(bytes.data()), bytes.size());
      ++replayed;
      if (accepted != bool(expect_valid)) {
        ++failures;
        std::fprintf(stderr, "%s: %s, expected %s\n", file.string().c_str(), accepted ? "accepted" : "rejected",
                     expect_valid ? "accepted" : "rejected");
      }
    }
  }
  std::printf("replayed %d corpus files, %d unexpected results\n", replayed, failures);
  return failures == 0 && replayed > 0 ? 0 : 1;
}
