// Writes tests/data/ggml_reference.gguf with ggml's own code: ternary tensors quantized by
// ggml_quantize_chunk (Q2_0, TQ2_0, TQ1_0) and, next to each, ggml's own dequantization of it
// (the type's to_float) as an F32 tensor "<name>.dequantized", in a GGUF written by ggml's gguf API.
// tests/test_gguf.cpp reads the file with bitnet's reader and checks its codes x scales against
// ggml's dequantized values bit for bit. Not built by CMake: run by hand against ggml-org/ggml
// (checked with commit d99724f2, the first with Q2_0), building only ggml-base:
//
//   git clone https://github.com/ggml-org/ggml && cd ggml && git checkout d99724f2
//   cmake -S . -B build -G Ninja -DCMAKE_BUILD_TYPE=Release -DBUILD_SHARED_LIBS=OFF \
//         -DGGML_BUILD_TESTS=OFF -DGGML_BUILD_EXAMPLES=OFF -DGGML_NATIVE=OFF
//   ninja -C build ggml-base
//   c++ -std=c++17 -O2 -I include tests/data/make_ggml_reference.cpp build/src/libggml-base.a -lm -pthread \
//       -o make_ggml_reference && ./make_ggml_reference tests/data/ggml_reference.gguf
//
// The inputs are deterministic (a 64-bit LCG), so the file is the same on every run and machine.
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <string>
#include <vector>

#include "ggml.h"
#include "gguf.h"

namespace {

std::uint64_t state = 0x2545F4914F6CDD1Dull;

// Uniform in [-1, 1), with a per-row magnitude so blocks carry different scales.
float next_value(float magnitude) {
  state = state * 6364136223846793005ull + 1442695040888963407ull;
  return magnitude * float(double(state >> 11) / double(1ull << 53) * 2.0 - 1.0);
}

struct spec {
  const char* name;
  ggml_type type;
  int64_t rows, cols;
};

}  // namespace

int main(int argc, char** argv) {
  if (argc != 2) {
    std::fprintf(stderr, "usage: %s OUT.gguf\n", argv[0]);
    return 2;
  }
  const spec specs[] = {
      {"q2_0", GGML_TYPE_Q2_0, 3, 192},    // 3 blocks of 64 per row
      {"tq2_0", GGML_TYPE_TQ2_0, 2, 512},  // 2 blocks of 256 per row
      {"tq1_0", GGML_TYPE_TQ1_0, 2, 256},
  };
  ggml_init_params params{16 * 1024 * 1024, nullptr, false};
  ggml_context* ctx = ggml_init(params);
  gguf_context* out = gguf_init_empty();
  gguf_set_val_str(out, "general.architecture", "bitnet-test");
  gguf_set_val_str(out, "general.name", "ternary blocks written by ggml d99724f2 (tests/data/make_ggml_reference.cpp)");
  for (const spec& s : specs) {
    std::vector<float> source(size_t(s.rows * s.cols));
    for (int64_t r = 0; r < s.rows; ++r)
      for (int64_t c = 0; c < s.cols; ++c) source[size_t(r * s.cols + c)] = next_value(0.25f * float(r + 1) + 0.01f * float(c / 64));
    ggml_tensor* q = ggml_new_tensor_2d(ctx, s.type, s.cols, s.rows);
    ggml_set_name(q, s.name);
    const size_t bytes = ggml_quantize_chunk(s.type, source.data(), q->data, 0, s.rows, s.cols, nullptr);
    if (bytes != ggml_nbytes(q)) {
      std::fprintf(stderr, "%s: ggml_quantize_chunk wrote %zu bytes, the tensor has %zu\n", s.name, bytes, ggml_nbytes(q));
      return 1;
    }
    ggml_tensor* dq = ggml_new_tensor_2d(ctx, GGML_TYPE_F32, s.cols, s.rows);
    ggml_set_name(dq, (std::string(s.name) + ".dequantized").c_str());
    const ggml_type_traits* traits = ggml_get_type_traits(s.type);
    for (int64_t r = 0; r < s.rows; ++r)
      traits->to_float(static_cast<const char*>(q->data) + r * q->nb[1], static_cast<float*>(dq->data) + r * s.cols, s.cols);
    gguf_add_tensor(out, q);
    gguf_add_tensor(out, dq);
  }
  if (!gguf_write_to_file(out, argv[1], false)) {
    std::fprintf(stderr, "cannot write %s\n", argv[1]);
    return 1;
  }
  gguf_free(out);
  ggml_free(ctx);
  return 0;
}
