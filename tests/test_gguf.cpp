#include <bitnet/gguf.hpp>

#include <algorithm>
#include <bit>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <functional>
#include <iterator>
#include <limits>
#include <map>
#include <random>
#include <string>
#include <vector>

#include <doctest/doctest.h>

#include "reference.hpp"

namespace gguf = bitnet::gguf;
namespace fs = std::filesystem;
using bitnet::BitLinear;
using bitnet::Index;
using bitnet::Matrix;
using bitnet::Vector;
using gguf::tensor_type;

namespace {

struct temp_dir {
  fs::path path;
  temp_dir() {
    std::random_device rd;
    path = fs::temp_directory_path() / ("bitnet_gguf_test_" + std::to_string(rd()) + std::to_string(rd()));
    fs::create_directories(path);
  }
  ~temp_dir() {
    std::error_code ec;
    fs::remove_all(path, ec);
  }
  /// Every file in the folder with its bytes: what "the file system as it was" means here.
  std::map<std::string, std::string> snapshot() const {
    std::map<std::string, std::string> files;
    for (const auto& entry : fs::directory_iterator(path)) {
      std::ifstream in(entry.path(), std::ios::binary);
      files[entry.path().filename().string()] = std::string(std::istreambuf_iterator<char>(in), {});
    }
    return files;
  }
};

/// A GGUF image assembled byte by byte from the format's definition (not by the writer).
struct image {
  std::vector<std::byte> bytes;

  image& u8(unsigned v) {
    bytes.push_back(std::byte(v & 0xff));
    return *this;
  }
  image& u16(std::uint16_t v) { return u8(v).u8(v >> 8); }
  image& u32(std::uint32_t v) { return u16(std::uint16_t(v)).u16(std::uint16_t(v >> 16)); }
  image& u64(std::uint64_t v) { return u32(std::uint32_t(v)).u32(std::uint32_t(v >> 32)); }
  image& f32(float v) {
    std::uint32_t bits;
    std::memcpy(&bits, &v, 4);
    return u32(bits);
  }
  image& str(std::string_view text) {
    u64(text.size());
    for (char c : text) u8(static_cast<unsigned char>(c));
    return *this;
  }
  image& header(std::uint64_t tensors, std::uint64_t kvs, std::uint32_t version = 3) {
    u8('G').u8('G').u8('U').u8('F');
    return u32(version).u64(tensors).u64(kvs);
  }
  image& tensor(std::string_view name, std::vector<std::uint64_t> ne, std::uint32_t type, std::uint64_t offset) {
    str(name).u32(std::uint32_t(ne.size()));
    for (auto n : ne) u64(n);
    return u32(type).u64(offset);
  }
  image& pad(std::size_t alignment = 32) {
    while (bytes.size() % alignment) u8(0);
    return *this;
  }
  image& zeros(std::size_t n) {
    bytes.insert(bytes.end(), n, std::byte{0});
    return *this;
  }
  gguf::reader open() const { return gguf::reader::from_bytes(bytes, "test.gguf"); }
};

/// The io_error message of opening `file`, or "" when it opens.
std::string rejection(const image& file) {
  try {
    file.open();
  } catch (const bitnet::io_error& e) {
    return e.what();
  }
  return "";
}

void check_rejected(const image& file, const std::string& expected) {
  const std::string message = rejection(file);
  INFO("message: " << message);
  CHECK(message.rfind("gguf: test.gguf: ", 0) == 0);
  CHECK(message.find(expected) != std::string::npos);
}

Matrix<std::int8_t> zero_codes(Index rows, Index cols) { return Matrix<std::int8_t>::Zero(rows, cols); }

std::vector<std::byte> bytes_of(std::initializer_list<unsigned> values) {
  std::vector<std::byte> out;
  for (unsigned v : values) out.push_back(std::byte(v));
  return out;
}

Matrix<float> random_matrix(Index rows, Index cols, unsigned seed) {
  std::mt19937 rng(seed);
  std::normal_distribution<float> dist(0.0f, 1.0f);
  Matrix<float> m(rows, cols);
  for (Index i = 0; i < m.size(); ++i) m.data()[i] = dist(rng);
  return m;
}

}  // namespace

// ---------------------------------------------------------------------------------------------
// Block formats against bytes worked out by hand from ggml's definitions (ggml-common.h,
// ggml-quants.c quantize_row_*_ref / dequantize_row_*, ik_llama.cpp dequantize_row_ms_i2s).

TEST_CASE("gguf: TQ2_0 block, by hand") {
  // Byte 32h + m holds weights 128h + 32n + m in bits 2n (code + 1); an all-zero block is 0x55.
  // w0 = +1, w32 = -1 -> byte 0 = 10 | 00<<2 | 01<<4 | 01<<6 = 0x52; w127 = +1 (h0 n3 m31) ->
  // byte 31 = 0x95; w128 = -1 (h1 n0 m0) -> byte 32 = 0x54; w255 = -1 (h1 n3 m31) -> byte 63 = 0x15;
  // d = 0.5 = fp16 0x3800 -> bytes 64, 65 = 00 38.
  Matrix<std::int8_t> codes = zero_codes(1, 256);
  codes(0, 0) = 1, codes(0, 32) = -1, codes(0, 127) = 1, codes(0, 128) = -1, codes(0, 255) = -1;
  std::vector<std::byte> expected(66, std::byte{0x55});
  expected[0] = std::byte{0x52}, expected[31] = std::byte{0x95}, expected[32] = std::byte{0x54};
  expected[63] = std::byte{0x15}, expected[64] = std::byte{0x00}, expected[65] = std::byte{0x38};
  const gguf::encoded_ternary encoded = gguf::encode_ternary(tensor_type::TQ2_0, codes, 0.5);
  CHECK(encoded.bytes == expected);
  CHECK(encoded.scale.stored == 0.5);

  const gguf::ternary_tensor decoded = gguf::decode_ternary(tensor_type::TQ2_0, expected, 1, 256);
  CHECK(decoded.codes == codes);
  CHECK(decoded.scales == std::vector<float>{0.5f});
  CHECK(decoded.blocks_per_row == 1);
}

TEST_CASE("gguf: TQ2_0 blocks of a 2 x 512 tensor follow each other row by row") {
  Matrix<std::int8_t> codes = zero_codes(2, 512);
  codes(1, 256 + 33) = 1;  // row 1, block 1, weight 33 = h0 n1 m1: byte 1 bits 2-3 = 2 -> 0x59
  const auto encoded = gguf::encode_ternary(tensor_type::TQ2_0, codes, 1.0);
  REQUIRE(encoded.bytes.size() == 4 * 66);
  CHECK(encoded.bytes[3 * 66 + 1] == std::byte{0x59});
  CHECK(std::count(encoded.bytes.begin(), encoded.bytes.end(), std::byte{0x55}) == 4 * 64 - 1);
  CHECK(encoded.bytes[3 * 66 + 65] == std::byte{0x3c});  // fp16 1.0 = 0x3c00
  CHECK(gguf::decode_ternary(tensor_type::TQ2_0, encoded.bytes, 2, 512).codes == codes);
}

TEST_CASE("gguf: TQ2_0 code 3 is refused with its row and column") {
  std::vector<std::byte> bytes(2 * 66, std::byte{0x55});
  bytes[66 + 33] = std::byte{0x57};  // row 1, byte 33 (h1 m1), bits 0-1 = 3 -> weight 128 + 1 = 129
  try {
    gguf::decode_ternary(tensor_type::TQ2_0, bytes, 2, 256, "f.gguf", "blk.0.ffn_up.weight");
    FAIL("accepted code 3");
  } catch (const bitnet::io_error& e) {
    CHECK(std::string(e.what()) ==
          "gguf: f.gguf: tensor \"blk.0.ffn_up.weight\": the 2-bit code at row 1, column 129 (block 0 of the row) is "
          "3, not a ternary code (0, 1, 2 for -1, 0, +1); ggml reads it as +2 d");
  }
}

TEST_CASE("gguf: TQ1_0 block, by hand") {
  // A byte holds trits t0..t4 (code + 1) as ceil((81 t0 + 27 t1 + 9 t2 + 3 t3 + t4) * 256 / 243).
  // All zero codes: qs bytes ceil(121 * 256 / 243) = 128, qh bytes (t4 = 0) ceil(120 * 256 / 243) = 127.
  // qs[0]: w0 = +1, w32 = -1: q = 162 + 0 + 9 + 3 + 1 = 175 -> ceil(44800 / 243) = 185 = 0xb9
  // qs[31]: w159 = +1 (n4 m31): q = 122 -> 129 = 0x81
  // qs[32]: w160 = -1 (second part, n0 m0): q = 40 -> ceil(10240 / 243) = 43 = 0x2b
  // qs[47]: w239 = +1 (160 + 16 * 4 + 15): q = 122 -> 0x81
  // qh[0]: w240 = +1 (240 + 4n + j, n0 j0): q = 162 + 27 + 9 + 3 = 201 -> ceil(51456 / 243) = 212 = 0xd4
  // qh[3]: w255 = -1 (n3 j3): q = 81 + 27 + 9 + 0 = 117 -> ceil(29952 / 243) = 124 = 0x7c
  // d = 0.5 -> bytes 52, 53 = 00 38.
  Matrix<std::int8_t> codes = zero_codes(1, 256);
  codes(0, 0) = 1, codes(0, 32) = -1, codes(0, 159) = 1, codes(0, 160) = -1, codes(0, 239) = 1;
  codes(0, 240) = 1, codes(0, 255) = -1;
  std::vector<std::byte> expected(54, std::byte{128});
  for (int j = 48; j < 52; ++j) expected[std::size_t(j)] = std::byte{127};
  expected[0] = std::byte{0xb9}, expected[31] = std::byte{0x81}, expected[32] = std::byte{0x2b};
  expected[47] = std::byte{0x81}, expected[48] = std::byte{0xd4}, expected[51] = std::byte{0x7c};
  expected[52] = std::byte{0x00}, expected[53] = std::byte{0x38};
  const auto encoded = gguf::encode_ternary(tensor_type::TQ1_0, codes, 0.5);
  CHECK(encoded.bytes == expected);

  const gguf::ternary_tensor decoded = gguf::decode_ternary(tensor_type::TQ1_0, expected, 1, 256);
  CHECK(decoded.codes == codes);
  CHECK(decoded.scales == std::vector<float>{0.5f});
}

TEST_CASE("gguf: TQ1_0 decodes every byte value as ggml does") {
  // ggml reads trit k of byte b as ((uint8)(b * 3^k) * 3) >> 8: 0x00 is five -1s, 0xff five +1s, and
  // 185 = 0xb9 is (+1, -1, 0, 0, 0) (see the block above).
  std::vector<std::byte> bytes(54, std::byte{128});
  bytes[0] = std::byte{0x00}, bytes[1] = std::byte{0xff}, bytes[2] = std::byte{0xb9};
  const Matrix<std::int8_t> codes = gguf::decode_ternary(tensor_type::TQ1_0, bytes, 1, 256).codes;
  for (int n = 0; n < 5; ++n) {
    CHECK(codes(0, 32 * n) == -1);
    CHECK(codes(0, 32 * n + 1) == 1);
  }
  CHECK(codes(0, 2) == 1);
  CHECK(codes(0, 34) == -1);
  CHECK(codes(0, 66) == 0);
  CHECK(codes(0, 98) == 0);
  CHECK(codes(0, 130) == 0);
}

TEST_CASE("gguf: every 5-trit group survives TQ1_0 (243 values per byte position)") {
  Matrix<std::int8_t> codes = zero_codes(243, 256);
  for (int v = 0; v < 243; ++v)
    for (int n = 0, rest = v; n < 5; ++n, rest /= 3) {
      codes(v, 32 * n + 7) = std::int8_t(rest % 3 - 1);         // qs[7]
      codes(v, 160 + 16 * n + 3) = std::int8_t(rest % 3 - 1);   // qs[35]
      if (n < 4) codes(v, 240 + 4 * n + 2) = std::int8_t(rest % 3 - 1);  // qh[2]
    }
  const auto encoded = gguf::encode_ternary(tensor_type::TQ1_0, codes, 1.0);
  CHECK(gguf::decode_ternary(tensor_type::TQ1_0, encoded.bytes, 243, 256).codes == codes);
}

TEST_CASE("gguf: I2_S, by hand") {
  // Weights in row-major order in groups of 128, 32 bytes each: weight 128g + 32k + m in byte
  // 32g + m, bits 6 - 2k (code + 1); an all-zero byte is 0x55. w0 = +1, w32 = -1 -> byte 0 =
  // 10 00 01 01 = 0x85; w97 = +1 (k3 m1) -> byte 1 = 0x56; w127 = -1 (k3 m31) -> byte 31 = 0x54;
  // row 1, column 0 = w128 = +1 -> byte 32 = 0x95. Then float32 d = 0.25 (00 00 80 3e) and 28 zeros.
  Matrix<std::int8_t> codes = zero_codes(2, 128);
  codes(0, 0) = 1, codes(0, 32) = -1, codes(0, 97) = 1, codes(0, 127) = -1, codes(1, 0) = 1;
  std::vector<std::byte> expected(64, std::byte{0x55});
  expected[0] = std::byte{0x85}, expected[1] = std::byte{0x56}, expected[31] = std::byte{0x54};
  expected[32] = std::byte{0x95};
  const auto trailer = bytes_of({0x00, 0x00, 0x80, 0x3e});
  expected.insert(expected.end(), trailer.begin(), trailer.end());
  expected.resize(64 + 32, std::byte{0});
  const auto encoded = gguf::encode_ternary(tensor_type::I2_S, codes, 0.25);
  CHECK(encoded.bytes == expected);

  const auto decoded = gguf::decode_ternary(tensor_type::I2_S, expected, 2, 128);
  CHECK(decoded.codes == codes);
  CHECK(decoded.scales == std::vector<float>{0.25f});
  CHECK(decoded.blocks_per_row == 0);

  expected[5] = std::byte{0x57};  // group 0, m5, k3: code 3 at row 0, column 101
  CHECK_THROWS_WITH_AS(gguf::decode_ternary(tensor_type::I2_S, expected, 2, 128),
                       doctest::Contains("row 0, column 101 (group 0 of the tensor) is 3"), bitnet::io_error);
}

TEST_CASE("gguf: ternary encoding refuses what the formats cannot hold") {
  CHECK_THROWS_AS(gguf::encode_ternary(tensor_type::TQ2_0, zero_codes(1, 128), 1.0), bitnet::shape_error);
  CHECK_THROWS_AS(gguf::encode_ternary(tensor_type::I2_S, zero_codes(1, 64), 1.0), bitnet::shape_error);
  CHECK_THROWS_AS(gguf::encode_ternary(tensor_type::F16, zero_codes(1, 256), 1.0), bitnet::value_error);
  Matrix<std::int8_t> two = zero_codes(1, 256);
  two(0, 9) = 2;
  CHECK_THROWS_WITH_AS(gguf::encode_ternary(tensor_type::TQ2_0, two, 1.0), doctest::Contains("row 0, column 9"),
                       bitnet::value_error);
  CHECK_THROWS_AS(gguf::encode_ternary(tensor_type::TQ2_0, zero_codes(1, 256), 70000.0), bitnet::value_error);
  CHECK_THROWS_AS(gguf::encode_ternary(tensor_type::TQ1_0, zero_codes(1, 256), std::nan("")), bitnet::value_error);
  CHECK_THROWS_AS(gguf::encode_ternary(tensor_type::TQ1_0, zero_codes(1, 256), -1.0), bitnet::value_error);
  CHECK_THROWS_WITH_AS(gguf::encode_ternary(tensor_type::TQ2_0, zero_codes(1, 256), 1e-9), doctest::Contains("rounds to 0 in fp16"),
                       bitnet::value_error);
  CHECK_THROWS_WITH_AS(gguf::encode_ternary(tensor_type::I2_S, zero_codes(1, 128), 1e-50), doctest::Contains("rounds to 0 in float32"),
                       bitnet::value_error);
  CHECK(gguf::encode_ternary(tensor_type::TQ2_0, zero_codes(1, 256), 6e-8).scale.stored == std::ldexp(1.0, -24));  // subnormal
  CHECK_THROWS_AS(gguf::decode_ternary(tensor_type::TQ2_0, std::vector<std::byte>(65), 1, 256), bitnet::io_error);
}

// ---------------------------------------------------------------------------------------------
// Group-scaled block formats: one fp16 d per block of 64 (Q2_0), 128 (PQ2_0, PTQ1_0) or 256
// (TQ2_0, TQ1_0), bytes worked out by hand from the formats' definitions (mainline ggml-common.h /
// ggml-quants.c for Q2_0, PrismML's llama.cpp fork for PQ2_0 / PTQ1_0; docs/gguf.md).

namespace {

std::vector<std::byte> repeated(std::size_t n, unsigned byte) { return std::vector<std::byte>(n, std::byte(byte)); }

std::vector<std::byte> concat(std::initializer_list<std::vector<std::byte>> parts) {
  std::vector<std::byte> out;
  for (const auto& p : parts) out.insert(out.end(), p.begin(), p.end());
  return out;
}

Matrix<float> scales_of(Index rows, Index cols, std::initializer_list<float> values) {
  Matrix<float> m(rows, cols);
  std::copy(values.begin(), values.end(), m.data());
  return m;
}

}  // namespace

TEST_CASE("gguf: Q2_0 block, by hand: fp16 d first, 4 weights a byte from the low bits, code 3 is +2 d") {
  // d = 0.5 (0x3800); weights 0-3 = -1, 0, +1, +2: codes 0, 1, 2, 3 -> 0 | 1 << 2 | 2 << 4 | 3 << 6 = 0xe4;
  // weights 4-7 = +1, +1, -1, 0: 2 | 2 << 2 | 0 << 4 | 1 << 6 = 0x4a; every other weight 0 (0x55).
  const auto bytes = concat({bytes_of({0x00, 0x38, 0xe4, 0x4a}), repeated(14, 0x55)});
  const gguf::block_tensor raw = gguf::decode_blocks(tensor_type::Q2_0, bytes, 1, 64);
  Matrix<std::int8_t> expected = zero_codes(1, 64);
  const std::int8_t first[8] = {-1, 0, 1, 2, 1, 1, -1, 0};
  for (Index j = 0; j < 8; ++j) expected(0, j) = first[j];
  CHECK(raw.codes == expected);
  CHECK(raw.block_size == 64);
  CHECK(raw.scales == scales_of(1, 1, {0.5f}));
  // +2 is no ternary code: a BitLinear refuses it, naming the tensor, row, column and block.
  CHECK_THROWS_WITH_AS(gguf::decode_ternary(tensor_type::Q2_0, bytes, 1, 64, "f.gguf", "blk.0.attn_k.weight"),
                       "gguf: f.gguf: tensor \"blk.0.attn_k.weight\": the 2-bit code at row 0, column 3 (block 0 of the "
                       "row) is 3, not a ternary code (0, 1, 2 for -1, 0, +1); ggml reads it as +2 d",
                       bitnet::io_error);
  // Encoding: weight 3 = 0 instead gives 0 | 1 << 2 | 2 << 4 | 1 << 6 = 0x64.
  expected(0, 3) = 0;
  const auto encoded = gguf::encode_ternary_groups(tensor_type::Q2_0, expected, scales_of(1, 1, {0.5f}), 64);
  CHECK(encoded.bytes == concat({bytes_of({0x00, 0x38, 0x64, 0x4a}), repeated(14, 0x55)}));
  CHECK(encoded.scale.relative_error() == 0);
}

TEST_CASE("gguf: PQ2_0 block, by hand: Q2_0's codec, 128 weights, d first") {
  // d = 0x3555 = 1.3330078125 * 2^-2; byte 0 = 0x06: weights 0-3 codes 2, 1, 0, 0 (+1, 0, -1, -1);
  // byte 31 = 0x95: weights 124-126 code 1, weight 127 code 2 (+1).
  const auto bytes = concat({bytes_of({0x55, 0x35, 0x06}), repeated(30, 0x55), bytes_of({0x95})});
  Matrix<std::int8_t> expected = zero_codes(1, 128);
  expected(0, 0) = 1, expected(0, 2) = -1, expected(0, 3) = -1, expected(0, 127) = 1;
  const gguf::ternary_tensor decoded = gguf::decode_ternary(tensor_type::PQ2_0, bytes, 1, 128);
  CHECK(decoded.codes == expected);
  REQUIRE(decoded.scales.size() == 1);
  CHECK(decoded.scales[0] == 0.33325195f);
  CHECK(decoded.block_size == 128);
  CHECK(gguf::encode_ternary_groups(tensor_type::PQ2_0, expected, scales_of(1, 1, {0.33325195f}), 128).bytes == bytes);
}

TEST_CASE("gguf: PTQ1_0 block, by hand: TQ1_0's trits position-major in stages of 16 and 8 bytes") {
  // qs[m] (m < 16): trit n is weight 16 n + m; qs[16 + m] (m < 8): weight 80 + 8 n + m; qh[h]: trit n
  // (n < 4) is weight 120 + 2 n + h. A byte of trits t0..t4 (code + 1, t0 most significant) is
  // ceil((81 t0 + 27 t1 + 9 t2 + 3 t3 + t4) 256 / 243). Weights 1 = +1, 16 = -1, 81 = +1, 120 = +1,
  // 127 = -1, the rest 0:
  //   qs[0]: weights 0, 16, 32, 48, 64 -> trits 1 0 1 1 1 -> 94 -> ceil(24064 / 243) = 100 = 0x64
  //   qs[1]: weights 1, 17, 33, 49, 65 -> 2 1 1 1 1 -> 202 -> ceil(51712 / 243) = 213 = 0xd5
  //   qs[17]: weights 81, 89, 97, 105, 113 -> 2 1 1 1 1 -> 0xd5; other qs: 1 1 1 1 1 -> 121 -> 0x80
  //   qh[0]: weights 120, 122, 124, 126, then 0 -> 2 1 1 1 0 -> 201 -> ceil(51456 / 243) = 212 = 0xd4
  //   qh[1]: weights 121, 123, 125, 127, then 0 -> 1 1 1 0 0 -> 117 -> ceil(29952 / 243) = 124 = 0x7c
  // then d = 0.25 (0x3400). Reading trits carrier-major (weight 5 m + n) would put weight 1's +1 at 5.
  const auto bytes = concat({bytes_of({0x64, 0xd5}), repeated(15, 0x80), bytes_of({0xd5}), repeated(6, 0x80),
                             bytes_of({0xd4, 0x7c, 0x00, 0x34})});
  REQUIRE(bytes.size() == 28);
  Matrix<std::int8_t> expected = zero_codes(1, 128);
  expected(0, 1) = 1, expected(0, 16) = -1, expected(0, 81) = 1, expected(0, 120) = 1, expected(0, 127) = -1;
  const gguf::block_tensor decoded = gguf::decode_blocks(tensor_type::PTQ1_0, bytes, 1, 128);
  CHECK(decoded.codes == expected);
  CHECK(decoded.codes(0, 5) == 0);
  CHECK(decoded.scales == scales_of(1, 1, {0.25f}));
  CHECK(gguf::encode_ternary_groups(tensor_type::PTQ1_0, expected, scales_of(1, 1, {0.25f}), 128).bytes == bytes);
}

TEST_CASE("gguf: every code of every position survives PTQ1_0") {
  // 3 rows whose weights cycle through -1, 0, +1 with different phases, each block its own d.
  Matrix<std::int8_t> codes(3, 256);
  for (Index r = 0; r < 3; ++r)
    for (Index c = 0; c < 256; ++c) codes(r, c) = std::int8_t((c * 7 + r) % 3 - 1);
  const Matrix<float> d = scales_of(3, 2, {0.5f, 0.25f, 1.0f, 2.0f, 0.125f, 3.0f});
  const auto encoded = gguf::encode_ternary_groups(tensor_type::PTQ1_0, codes, d, 128);
  REQUIRE(encoded.bytes.size() == 6 * 28);
  const gguf::block_tensor decoded = gguf::decode_blocks(tensor_type::PTQ1_0, encoded.bytes, 3, 256);
  CHECK(decoded.codes == codes);
  CHECK(decoded.scales == d);
}

TEST_CASE("gguf: TQ2_0 / TQ1_0 with a d per block, by hand") {
  // TQ2_0, 1 x 512: block 0 weight 0 = +1 (byte 0 = 0x56), d = 1 (0x3c00); block 1 weight 128 = -1
  // (byte 32 = 0x54: h = 1, m = 0, n = 0), d = 2 (0x4000).
  const auto tq2 = concat({bytes_of({0x56}), repeated(63, 0x55), bytes_of({0x00, 0x3c}), repeated(32, 0x55),
                           bytes_of({0x54}), repeated(31, 0x55), bytes_of({0x00, 0x40})});
  const gguf::ternary_tensor t2 = gguf::decode_ternary(tensor_type::TQ2_0, tq2, 1, 512);
  const gguf::ternary_tensor_groups g2 = gguf::to_groups(t2);
  Matrix<std::int8_t> expected = zero_codes(1, 512);
  expected(0, 0) = 1, expected(0, 384) = -1;
  CHECK(g2.codes == expected);
  CHECK(g2.group_size == 256);
  CHECK(g2.unit_scales == scales_of(1, 2, {1.0f, 2.0f}));
  CHECK(gguf::encode_ternary_groups(tensor_type::TQ2_0, expected, g2.unit_scales, 256).bytes == tq2);
  // TQ1_0, 1 x 512: block 1 weight 256 = +1 (qs[0] trits 2 1 1 1 1 = 0xd5), zeros are 0x80 / 0x7f.
  const auto tq1 = concat({repeated(48, 0x80), repeated(4, 0x7f), bytes_of({0x00, 0x38, 0xd5}), repeated(47, 0x80),
                           repeated(4, 0x7f), bytes_of({0x00, 0x34})});
  const gguf::ternary_tensor_groups g1 = gguf::to_groups(gguf::decode_ternary(tensor_type::TQ1_0, tq1, 1, 512));
  expected.setZero();
  expected(0, 256) = 1;
  CHECK(g1.codes == expected);
  CHECK(g1.unit_scales == scales_of(1, 2, {0.5f, 0.25f}));
  CHECK(gguf::encode_ternary_groups(tensor_type::TQ1_0, expected, g1.unit_scales, 256).bytes == tq1);
  // One d for every block still makes a per-tensor layer, whatever the block format.
  const auto same = gguf::encode_ternary(tensor_type::PQ2_0, expected, 0.5);
  CHECK(gguf::to_bit_linear<float>(gguf::decode_ternary(tensor_type::PQ2_0, same.bytes, 1, 512)).weight_scale() == 2.0f);
}

TEST_CASE("gguf: to_groups keeps code * d exact: zero and negative d, refusals") {
  gguf::ternary_tensor t;
  t.codes = zero_codes(2, 256);
  t.codes(0, 0) = 1, t.codes(0, 128) = -1, t.codes(1, 1) = 1;
  t.block_size = 128, t.blocks_per_row = 2;
  t.scales = {0.5f, -0.25f, 0.0f, 1.0f};
  const gguf::ternary_tensor_groups g = gguf::to_groups(t);
  CHECK(g.codes(0, 0) == 1);
  CHECK(g.codes(0, 128) == 1);  // -1 * -0.25 = +1 * 0.25
  CHECK(g.codes(1, 1) == 0);    // a block with d = 0 holds zero weights
  CHECK(g.unit_scales == scales_of(2, 2, {0.5f, 0.25f, 0.0f, 1.0f}));
  t.scales[2] = -0.0f;
  CHECK_FALSE(std::signbit(gguf::to_groups(t).unit_scales(1, 0)));
  t.scales[3] = std::numeric_limits<float>::infinity();
  CHECK_THROWS_WITH_AS(gguf::to_groups(t, "f.gguf", "w"),
                       "gguf: f.gguf: tensor \"w\": scale d = inf of row 1, block 1 is not finite", bitnet::io_error);
  gguf::ternary_tensor i2s;
  i2s.codes = zero_codes(1, 128);
  i2s.scales = {1.0f};
  CHECK_THROWS_WITH_AS(gguf::to_groups(i2s), doctest::Contains("one scale for the whole tensor (I2_S)"), bitnet::io_error);
}

TEST_CASE("gguf: group encoding refuses what the formats cannot hold, naming the layer") {
  const Matrix<std::int8_t> codes = zero_codes(2, 256);
  const Matrix<float> four = Matrix<float>::Constant(2, 4, 0.5f);
  CHECK_THROWS_WITH_AS(gguf::encode_ternary_groups(tensor_type::PQ2_0, codes, four, 64, "blk.0.ffn_up.weight"),
                       "gguf::encode_ternary_groups(PQ2_0, layer \"blk.0.ffn_up.weight\"): the layer's scale groups are 64 "
                       "weights, a PQ2_0 block is 128 (choose the format whose block is the group: Q2_0 64, PQ2_0 / "
                       "PTQ1_0 128, TQ2_0 / TQ1_0 256)",
                       bitnet::value_error);
  CHECK_THROWS_WITH_AS(gguf::encode_ternary_groups(tensor_type::I2_S, codes, four, 64), doctest::Contains("not a block format"),
                       bitnet::value_error);
  CHECK_THROWS_AS(gguf::encode_ternary_groups(tensor_type::Q2_0, codes, Matrix<float>::Constant(2, 3, 0.5f), 64),
                  bitnet::shape_error);
  CHECK_THROWS_AS(gguf::encode_ternary_groups(tensor_type::TQ2_0, zero_codes(2, 128), Matrix<float>::Ones(2, 1), 256),
                  bitnet::shape_error);
  Matrix<std::int8_t> two = codes;
  two(1, 70) = 2;
  CHECK_THROWS_WITH_AS(gguf::encode_ternary_groups(tensor_type::Q2_0, two, four, 64), doctest::Contains("row 1, column 70"),
                       bitnet::value_error);
  Matrix<float> bad = four;
  bad(1, 2) = std::nanf("");
  CHECK_THROWS_WITH_AS(gguf::encode_ternary_groups(tensor_type::Q2_0, codes, bad, 64), doctest::Contains("(row 1, block 2)"),
                       bitnet::value_error);
  bad(1, 2) = 70000.0f;
  CHECK_THROWS_WITH_AS(gguf::encode_ternary_groups(tensor_type::Q2_0, codes, bad, 64), doctest::Contains("overflows fp16"),
                       bitnet::value_error);
  // A d that rounds to 0 in fp16 vanishes the weights of a block with codes, not of an all-zero one.
  bad(1, 2) = 1e-9f;
  CHECK(gguf::encode_ternary_groups(tensor_type::Q2_0, codes, bad, 64).bytes.size() == 8 * 18);
  two(1, 70) = 0;
  two(1, 130) = 1;
  CHECK_THROWS_WITH_AS(gguf::encode_ternary_groups(tensor_type::Q2_0, two, bad, 64), doctest::Contains("rounds to 0 in fp16"),
                       bitnet::value_error);
  // The report names the block fp16 rounded relatively the most.
  const Matrix<float> d = scales_of(1, 2, {0.5f, 0.1f});
  const auto rounded = gguf::encode_ternary_groups(tensor_type::Q2_0, zero_codes(1, 128), d, 64);
  CHECK(rounded.scale.requested == double(0.1f));
  CHECK(rounded.scale.stored == 0.0999755859375);  // fp16 0x2e66
}

TEST_CASE("gguf: group-scaled tensors through a file: writer, read_ternary_groups, read_blocks") {
  temp_dir dir;
  const fs::path path = dir.path / "groups.gguf";
  std::mt19937 rng(20);
  std::uniform_int_distribution<int> code(-1, 1);
  Matrix<std::int8_t> codes(3, 256);
  for (Index i = 0; i < codes.size(); ++i) codes.data()[i] = std::int8_t(code(rng));
  // fp16-exact scales: the file keeps them bit for bit.
  const Matrix<float> pq = scales_of(3, 2, {0.5f, 0.375f, 1.25f, 0.0625f, 3.0f, 0.75f});
  const Matrix<float> q2 = Matrix<float>::Constant(3, 4, 0.5f) + Matrix<float>::Identity(3, 4);
  {
    gguf::writer w(path, {{"general.architecture", std::string("llama")}},
                   {{"pq", tensor_type::PQ2_0, {256, 3}}, {"ptq", tensor_type::PTQ1_0, {256, 3}},
                    {"q2", tensor_type::Q2_0, {256, 3}}});
    CHECK(w.write_ternary_groups("pq", codes, pq, 128).relative_error() == 0);
    CHECK(w.write_ternary_groups("ptq", codes, pq, 128).relative_error() == 0);
    CHECK_THROWS_WITH_AS(w.write_ternary_groups("q2", codes, pq, 128), doctest::Contains("a Q2_0 block is 64"),
                         bitnet::value_error);
    w.write_ternary_groups("q2", codes, q2, 64);
    w.finish();
  }
  const gguf::reader r(path);
  for (const char* name : {"pq", "ptq"}) {
    const gguf::ternary_tensor_groups g = r.read_ternary_groups(name);
    CHECK(g.codes == codes);
    CHECK(g.unit_scales == pq);
    CHECK(g.group_size == 128);
    // Unequal block scales: read_bit_linear makes a group-scaled layer, group = the block.
    const BitLinear<float> layer = r.read_bit_linear<float>(name);
    CHECK(layer.options().weight_scales == bitnet::weight_scaling::per_group);
    CHECK(layer.options().group_size == 128);
    CHECK(layer.ternary_weight() == codes);
    CHECK(layer.unit_scales() == pq);
  }
  CHECK(r.read_ternary_groups("q2").unit_scales == q2);
  CHECK(r.read_ternary_groups("q2").group_size == 64);
  CHECK(r.read_blocks("q2").codes == codes);
  CHECK_THROWS_WITH_AS(r.read_blocks("missing"), doctest::Contains("no such tensor"), bitnet::io_error);
}

TEST_CASE_TEMPLATE("gguf: group-scaled and per-row BitLinear -> GGUF -> BitLinear, exact", T, float, double) {
  temp_dir dir;
  const fs::path path = dir.path / "layers.gguf";
  std::mt19937 rng(3);
  std::uniform_int_distribution<int> code(-1, 1);
  Matrix<std::int8_t> codes(4, 256);
  for (Index i = 0; i < codes.size(); ++i) codes.data()[i] = std::int8_t(code(rng));
  Matrix<T> d128(4, 2), d64(4, 4), row(4, 1);
  for (Index i = 0; i < d128.size(); ++i) d128.data()[i] = T(0.25) * T(i + 1);  // fp16-exact
  for (Index i = 0; i < d64.size(); ++i) d64.data()[i] = T(1) / T(1 << (i % 5));
  row << T(0.5), T(1.5), T(2), T(0.125);
  bitnet::bitlinear_options g128, g64, per_row;
  g128.weight_scales = g64.weight_scales = bitnet::weight_scaling::per_group;
  g128.group_size = 128, g64.group_size = 64;
  per_row.weight_scales = bitnet::weight_scaling::per_row;
  const Vector<T> bias = Vector<T>::LinSpaced(4, -1, 1);
  const auto a = BitLinear<T>::from_ternary(codes, d128, bias, g128);
  const auto b = BitLinear<T>::from_ternary(codes, d64, std::nullopt, g64);
  const auto c = BitLinear<T>::from_ternary(codes, row, std::nullopt, per_row);
  {
    gguf::writer w(path, {}, {{"a.pq2", tensor_type::PQ2_0, {256, 4}}, {"a.ptq1", tensor_type::PTQ1_0, {256, 4}},
                              {"b.q2", tensor_type::Q2_0, {256, 4}}, {"c.tq2", tensor_type::TQ2_0, {256, 4}},
                              {"bad", tensor_type::Q2_0, {256, 4}}, {"i2s", tensor_type::I2_S, {256, 4}}});
    CHECK(w.write_bit_linear("a.pq2", a).relative_error() == 0);
    CHECK(w.write_bit_linear("a.ptq1", a).relative_error() == 0);
    CHECK(w.write_bit_linear("b.q2", b).relative_error() == 0);
    CHECK(w.write_bit_linear("c.tq2", c).relative_error() == 0);
    CHECK_THROWS_WITH_AS(w.write_bit_linear("bad", a),
                         "gguf::encode_ternary_groups(Q2_0, layer \"bad\"): the layer's scale groups are 128 weights, a "
                         "Q2_0 block is 64 (choose the format whose block is the group: Q2_0 64, PQ2_0 / PTQ1_0 128, "
                         "TQ2_0 / TQ1_0 256)",
                         bitnet::value_error);
    w.write_bit_linear("bad", b);
    w.write_bit_linear("i2s", BitLinear<T>::from_ternary(codes, T(2)));
    w.finish();
  }
  const gguf::reader r(path);
  for (const char* name : {"a.pq2", "a.ptq1"}) {
    const BitLinear<T> back = r.read_bit_linear<T>(name, bias);
    CHECK(back.options().group_size == 128);
    CHECK(back.ternary_weight() == codes);
    CHECK(back.unit_scales() == d128);
    CHECK(back.bias() == a.bias());
  }
  CHECK(r.read_bit_linear<T>("b.q2").unit_scales() == d64);
  // A per-row layer is stored with its row's d in every block and comes back per block, same weights.
  const BitLinear<T> rows = r.read_bit_linear<T>("c.tq2");
  CHECK(rows.options().group_size == 256);
  CHECK(rows.dequantized_weight() == c.dequantized_weight());
  // Options: per_group takes the file's block or none; per_row and I2_S-per_group are refused.
  bitnet::bitlinear_options ask = g64;
  const std::string mismatch =
      "gguf: " + path.string() + ": tensor \"a.pq2\": options ask for groups of 64 weights, its PQ2_0 blocks are 128";
  CHECK_THROWS_WITH_AS(r.read_bit_linear<T>("a.pq2", std::nullopt, ask), mismatch.c_str(), bitnet::io_error);
  ask.group_size = 0;
  CHECK(r.read_bit_linear<T>("a.pq2", std::nullopt, ask).unit_scales() == d128);
  CHECK_THROWS_WITH_AS(r.read_bit_linear<T>("a.pq2", std::nullopt, per_row), doctest::Contains("not per row"),
                       bitnet::io_error);
  CHECK_THROWS_WITH_AS(r.read_bit_linear<T>("i2s", std::nullopt, g128), doctest::Contains("is I2_S, one scale for the whole"),
                       bitnet::io_error);
  CHECK(r.read_bit_linear<T>("i2s").weight_scale() == T(2));
  CHECK_THROWS_WITH_AS(gguf::encode_bit_linear(c, tensor_type::I2_S, "c"), doctest::Contains("needs a block format"),
                       bitnet::value_error);
}

TEST_CASE("gguf: a Q2_0 file with a +2 code: read_blocks reads it, a BitLinear refuses it by name") {
  image file;
  file.header(1, 0).tensor("blk.1.ffn_gate.weight", {128, 1}, 42, 0).pad();
  const auto block0 = concat({bytes_of({0x00, 0x3c}), repeated(16, 0x55)});
  const auto block1 = concat({bytes_of({0x00, 0x38}), repeated(5, 0x55), bytes_of({0xd5}), repeated(10, 0x55)});
  file.bytes.insert(file.bytes.end(), block0.begin(), block0.end());
  file.bytes.insert(file.bytes.end(), block1.begin(), block1.end());
  const gguf::reader r = file.open();
  const gguf::block_tensor raw = r.read_blocks("blk.1.ffn_gate.weight");
  CHECK(raw.codes(0, 64 + 23) == 2);  // byte 5 of block 1, bits 6-7 = 3: weight 4 * 5 + 3
  CHECK(raw.scales == scales_of(1, 2, {1.0f, 0.5f}));
  CHECK_THROWS_WITH_AS(r.read_ternary_groups("blk.1.ffn_gate.weight"),
                       "gguf: test.gguf: tensor \"blk.1.ffn_gate.weight\": the 2-bit code at row 0, column 87 (block 1 "
                       "of the row) is 3, not a ternary code (0, 1, 2 for -1, 0, +1); ggml reads it as +2 d",
                       bitnet::io_error);
  CHECK_THROWS_AS(r.read_bit_linear<float>("blk.1.ffn_gate.weight"), bitnet::io_error);
}

TEST_CASE("gguf: malformed files of the group-scaled types") {
  check_rejected(image{}.header(1, 0).tensor("w", {100, 1}, 142, 0).pad().zeros(34),
                 "tensor \"w\": rows of 100 elements are not a multiple of the PQ2_0 block size 128");
  check_rejected(image{}.header(1, 0).tensor("w", {32, 1}, 42, 0).pad().zeros(18),
                 "tensor \"w\": rows of 32 elements are not a multiple of the Q2_0 block size 64");
  check_rejected(image{}.header(1, 0).tensor("w", {128, 2}, 143, 0).pad().zeros(55),
                 "tensor \"w\": bytes [0, +56) run past the end of the data section (55 bytes)");
  check_rejected(image{}.header(1, 0).tensor("w", {256, 1}, 142, 0).pad().zeros(67), "bytes [0, +68) run past the end");
  check_rejected(image{}.header(1, 0).tensor("w", {128, 1}, 144, 0).pad().zeros(34), "unknown ggml type id 144");
  // 34-byte blocks of 128 under id 42 (a PrismML build's Q2_0) overrun mainline's 18 per 64.
  check_rejected(image{}.header(2, 0).tensor("a", {128, 1}, 42, 0).tensor("b", {128, 1}, 42, 64).pad().zeros(64 + 34),
                 "tensor \"b\": bytes [64, +36) run past the end of the data section (98 bytes) (Q2_0 is read as "
                 "mainline's 18 bytes per 64 weights; some PrismML builds wrote 34 bytes per 128 under the same id 42)");
  check_rejected(image{}.header(2, 0).tensor("a", {256, 1}, 42, 0).tensor("b", {128, 1}, 42, 64).pad().zeros(128),
                 "tensor \"b\": bytes [64, +36) overlap tensor \"a\" (Q2_0 is read as mainline's");
  CHECK(rejection(image{}.header(1, 0).tensor("w", {128, 2}, 143, 0).pad().zeros(56)).empty());
  CHECK_THROWS_WITH_AS(gguf::decode_blocks(tensor_type::PQ2_0, std::vector<std::byte>(33), 1, 128, "f.gguf", "w"),
                       "gguf: f.gguf: tensor \"w\": holds 33 bytes, PQ2_0 [128, 1] needs 34", bitnet::io_error);
  CHECK_THROWS_WITH_AS(gguf::decode_blocks(tensor_type::PTQ1_0, std::vector<std::byte>(28), 1, 64),
                       doctest::Contains("needs rows of a multiple of 128 weights, got 1x64"), bitnet::io_error);
  CHECK_THROWS_WITH_AS(gguf::decode_blocks(tensor_type::I2_S, std::vector<std::byte>(64), 1, 128),
                       doctest::Contains("not a ternary block format"), bitnet::io_error);
}

// ---------------------------------------------------------------------------------------------
// Rotations a file declares (PrismML's prism.hadamard.* keys)

namespace {

/// A file with a PTQ1_0 tensor "blk.0.ffn_down.weight" (2 x 256, zero weights), a F32 vector
/// "output.weight" and the prism.hadamard.* keys of a valid explicit-sign declaration (which
/// set / erase change).
struct hadamard_file {
  struct kv {
    std::string key;
    std::function<void(image&)> put;  // type and value
  };
  std::vector<kv> keys;

  hadamard_file() {
    auto u32 = [](std::uint32_t v) { return [v](image& i) { i.u32(4).u32(v); }; };
    auto text = [](std::string v) { return [v](image& i) { i.u32(8).str(v); }; };
    auto names = [](std::vector<std::string> v) {
      return [v](image& i) {
        i.u32(9).u32(8).u64(v.size());
        for (const auto& s : v) i.str(s);
      };
    };
    auto ints = [](std::vector<std::int32_t> v) {
      return [v](image& i) {
        i.u32(9).u32(5).u64(v.size());
        for (auto x : v) i.u32(std::uint32_t(x));
      };
    };
    std::vector<std::int32_t> signs(256 + 128, 1);
    signs[1] = -1, signs[256] = -1;
    keys = {{"prism.hadamard.version", u32(1)},
            {"prism.hadamard.block_size", u32(128)},
            {"prism.hadamard.transform", text("normalized-sylvester-walsh-hadamard")},
            {"prism.hadamard.axis", text("input-last-dimension")},
            {"prism.hadamard.sign_mode", text("explicit")},
            {"prism.hadamard.weight_names", names({"blk.0.ffn_down.weight", "output.weight"})},
            {"prism.hadamard.inverse_weight_names", names({"token_embd.weight"})},
            {"prism.hadamard.sign_widths", ints({256, 128})},
            {"prism.hadamard.sign_values", ints(signs)},
            {"prism.hadamard.gdn_v_grouped", [](image& i) { i.u32(7).u8(0); }}};
  }
  hadamard_file& set(const std::string& key, std::function<void(image&)> put) {
    for (kv& k : keys)
      if (k.key == key) return k.put = std::move(put), *this;
    keys.push_back({key, std::move(put)});
    return *this;
  }
  hadamard_file& erase(const std::string& key) {
    std::erase_if(keys, [&](const kv& k) { return k.key == key; });
    return *this;
  }
  image build() const {
    image file;
    file.header(2, keys.size());
    for (const kv& k : keys) {
      file.str(k.key);
      k.put(file);
    }
    file.tensor("blk.0.ffn_down.weight", {256, 2}, 143, 0).tensor("output.weight", {4}, 0, 128).pad();
    for (int b = 0; b < 4; ++b) {
      const auto block = concat({repeated(24, 0x80), repeated(2, 0x7f), bytes_of({0x00, 0x3c})});
      file.bytes.insert(file.bytes.end(), block.begin(), block.end());
    }
    return file.pad().f32(1).f32(2).f32(3).f32(4);
  }
};

}  // namespace

TEST_CASE("gguf: a declared Hadamard rotation is read as the fork declares it") {
  const gguf::reader r = hadamard_file{}.build().open();
  REQUIRE(r.hadamard());
  const gguf::hadamard_declaration& h = *r.hadamard();
  CHECK(h.block_size == 128);
  CHECK(h.explicit_signs);
  CHECK(h.rotates("blk.0.ffn_down.weight"));
  CHECK_FALSE(h.rotates("blk.0.ffn_up.weight"));
  CHECK(h.inverse("token_embd.weight"));
  CHECK_FALSE(h.gdn_v_grouped);
  const std::vector<std::int8_t> s256 = h.signs_for(256);
  REQUIRE(s256.size() == 256);
  CHECK(s256[0] == 1);
  CHECK(s256[1] == -1);
  CHECK(std::count(s256.begin(), s256.end(), -1) == 1);
  const std::vector<std::int8_t> s128 = h.signs_for(128);
  CHECK(s128[0] == -1);  // the values are the widths' vectors one after the other
  CHECK_THROWS_WITH_AS(h.signs_for(512, "f.gguf", "w"), doctest::Contains("has no width 512"), bitnet::io_error);
  CHECK_THROWS_WITH_AS(h.signs_for(192), doctest::Contains("not a multiple of the Hadamard block 128"), bitnet::io_error);
  // The stored weights are W diag(s) H: the layer gets the declared rotation (block, the signs of its width).
  const BitLinear<float> down = r.read_bit_linear<float>("blk.0.ffn_down.weight");
  REQUIRE(down.options().rotation);
  CHECK(*down.options().rotation == bitnet::hadamard_rotation(128, s256));
  bitnet::bitlinear_options other;
  other.rotation = bitnet::hadamard_rotation::identity_signs(256, 128);
  CHECK_THROWS_WITH_AS(r.read_bit_linear<float>("blk.0.ffn_down.weight", std::nullopt, other),
                       doctest::Contains("tensor \"blk.0.ffn_down.weight\": options.rotation (block 128, 256 inputs) is "
                                         "not the rotation the file declares for it"),
                       bitnet::io_error);
  other.rotation = bitnet::hadamard_rotation(128, s256);
  CHECK(*r.read_bit_linear<float>("blk.0.ffn_down.weight", std::nullopt, other).options().rotation == *other.rotation);
  CHECK(r.read_ternary_groups("blk.0.ffn_down.weight").codes == zero_codes(2, 256));
  CHECK_THROWS_WITH_AS(r.read_matrix<float>("output.weight"), doctest::Contains("Hadamard-rotated basis"), bitnet::io_error);
  CHECK(r.read_bytes("output.weight").size() == 16);
  const gguf::reader identity = hadamard_file{}
                                    .set("prism.hadamard.sign_mode", [](image& i) { i.u32(8).str("identity"); })
                                    .erase("prism.hadamard.sign_widths")
                                    .erase("prism.hadamard.sign_values")
                                    .build()
                                    .open();
  CHECK(identity.hadamard()->signs_for(384) == std::vector<std::int8_t>(384, 1));
  CHECK_FALSE(image{}.header(0, 0).open().hadamard());
}

TEST_CASE("gguf: a rotation the reader does not implement is refused by name when the file opens") {
  auto text = [](std::string v) { return [v](image& i) { i.u32(8).str(v); }; };
  auto u32 = [](std::uint32_t v) { return [v](image& i) { i.u32(4).u32(v); }; };
  auto ints = [](std::vector<std::int32_t> v) {
    return [v](image& i) {
      i.u32(9).u32(5).u64(v.size());
      for (auto x : v) i.u32(std::uint32_t(x));
    };
  };
  check_rejected(hadamard_file{}.set("prism.hadamard.version", u32(2)).build(),
                 "key \"prism.hadamard.version\": version 2 of the Hadamard rotation is not one this reader implements");
  check_rejected(hadamard_file{}.set("prism.hadamard.version", [](image& i) { i.u32(10).u64(1); }).build(),
                 "key \"prism.hadamard.version\": is UINT64, the rotation needs UINT32");
  check_rejected(hadamard_file{}.set("prism.hadamard.transform", text("randomized-hadamard")).build(),
                 "key \"prism.hadamard.transform\": \"randomized-hadamard\" is not a rotation this reader implements");
  check_rejected(hadamard_file{}.set("prism.hadamard.axis", text("output-first-dimension")).build(),
                 "key \"prism.hadamard.axis\"");
  check_rejected(hadamard_file{}.set("prism.hadamard.sign_mode", text("random")).build(), "key \"prism.hadamard.sign_mode\"");
  check_rejected(hadamard_file{}.set("prism.hadamard.permutation", u32(1)).build(),
                 "key \"prism.hadamard.permutation\": is not a key of the Hadamard rotation this reader implements");
  check_rejected(hadamard_file{}.erase("prism.hadamard.version").build(), "key \"prism.hadamard.version\": missing");
  check_rejected(hadamard_file{}.erase("prism.hadamard.block_size").build(), "key \"prism.hadamard.block_size\": missing");
  check_rejected(hadamard_file{}.set("prism.hadamard.block_size", u32(96)).build(), "block size 96 is not a power of 2");
  check_rejected(hadamard_file{}.set("prism.hadamard.block_size", u32(65536)).build(),
                 "block size 65536 is outside the 2 to 32768 this library's rotation implements");
  check_rejected(hadamard_file{}.set("prism.hadamard.weight_names", ints({1})).build(),
                 "key \"prism.hadamard.weight_names\": is an array of INT32, the rotation needs STRING");
  check_rejected(hadamard_file{}.set("prism.hadamard.sign_widths", ints({256, 100})).build(),
                 "width 100 is not a positive multiple of the block 128");
  check_rejected(hadamard_file{}.set("prism.hadamard.sign_widths", ints({256})).build(),
                 "key \"prism.hadamard.sign_values\": holds 384 values, the widths add up to 256");
  std::vector<std::int32_t> zero(384, 1);
  zero[7] = 0;
  check_rejected(hadamard_file{}.set("prism.hadamard.sign_values", ints(zero)).build(), "value 7 is 0, not +1 or -1");
  check_rejected(hadamard_file{}.erase("prism.hadamard.sign_values").build(), "key \"prism.hadamard.sign_values\": missing");
  check_rejected(hadamard_file{}.set("prism.hadamard.sign_mode", text("identity")).build(),
                 "signs given with sign mode \"identity\"");
}

namespace {

// Codes in {-1, 0, +1} and per-group magnitudes exact in fp16 (k * 2^-12, k < 2048).
struct group_weights {
  Matrix<std::int8_t> codes;
  Matrix<float> scales;
};
group_weights random_group_weights(Index out, Index in, Index group, std::mt19937& rng) {
  std::uniform_int_distribution<int> code(-1, 1), step(1, 2047);
  group_weights g{Matrix<std::int8_t>(out, in), Matrix<float>(out, in / group)};
  for (Index r = 0; r < out; ++r) {
    for (Index c = 0; c < in; ++c) g.codes(r, c) = std::int8_t(code(rng));
    for (Index j = 0; j < in / group; ++j) g.scales(r, j) = std::ldexp(float(step(rng)), -12);
  }
  return g;
}

// R x by the definition, densely and in long double: block j of R x is H_b / sqrt(b) times block j
// of s . x, with H_b[i][k] = (-1)^popcount(i & k).
Matrix<long double> dense_rotation(const Matrix<float>& x, const bitnet::hadamard_rotation& rotation) {
  const Index b = rotation.block_size(), n = x.cols();
  Matrix<long double> y = Matrix<long double>::Zero(x.rows(), n);
  for (Index r = 0; r < x.rows(); ++r)
    for (Index i = 0; i < n; ++i) {
      const Index first = i / b * b;
      long double sum = 0;
      for (Index k = first; k < first + b; ++k) {
        const int sign = (std::popcount(std::uint64_t((i - first) & (k - first))) % 2) ? -1 : 1;
        sum += sign * rotation.signs()[std::size_t(k)] * (long double)x(r, k);
      }
      y(r, i) = sum / std::sqrt((long double)b);
    }
  return y;
}

}  // namespace

TEST_CASE("gguf: a rotated group layer written and read back computes the float reference of its weights on R x") {
  temp_dir dir;
  std::mt19937 rng(71);
  const Index out = 5, in = 512;
  struct config {
    const char* tensor;
    tensor_type type;
    Index group;
    bitnet::hadamard_rotation rotation;
  };
  const config configs[] = {
      {"blk.0.ffn_up.weight", tensor_type::PQ2_0, 128, bitnet::hadamard_rotation::random_signs(in, 256, 5)},
      {"blk.0.ffn_up.weight", tensor_type::PTQ1_0, 128, bitnet::hadamard_rotation::random_signs(in, 512, 6)},
      {"blk.0.attn_q.weight", tensor_type::Q2_0, 64, bitnet::hadamard_rotation::identity_signs(in, 64)},
  };
  for (const config& c : configs) {
    INFO(gguf::tensor_type_name(c.type));
    const group_weights g = random_group_weights(out, in, c.group, rng);
    bitnet::bitlinear_options options;
    options.weight_scales = bitnet::weight_scaling::per_group;
    options.group_size = c.group;
    options.rotation = c.rotation;
    const Vector<float> bias = reference::random_matrix<float>(out, 1, rng, 0.1);
    const auto layer = BitLinear<float>::from_ternary(g.codes, g.scales, bias, options);
    const fs::path path = dir.path / "rotated.gguf";
    const std::vector<gguf::metadata_entry> declared = gguf::hadamard_metadata({{c.tensor, c.rotation}});
    {
      gguf::writer w(path, declared, {{c.tensor, c.type, {std::uint64_t(in), std::uint64_t(out)}}});
      w.write_bit_linear(c.tensor, layer);
      w.finish();
    }
    const gguf::reader r(path);
    REQUIRE(r.hadamard());
    CHECK(r.hadamard()->explicit_signs == (c.rotation.signs() != std::vector<std::int8_t>(std::size_t(in), 1)));
    const BitLinear<float> back = r.read_bit_linear<float>(c.tensor, bias);
    REQUIRE(back.options().rotation);
    CHECK(*back.options().rotation == c.rotation);
    CHECK(back.options().group_size == c.group);
    CHECK(back.options().scale_update == bitnet::weight_scale_update::frozen);
    CHECK(back.ternary_weight() == g.codes);
    CHECK(back.unit_scales() == g.scales);

    // The float reference of the same weights (codes x scales) on R x, R built densely from its
    // definition: within the activation-quantization bound (per token, |R x - xq / sx| <= max|R x| / 254
    // for each input) plus rounding.
    const Matrix<float> x = reference::random_matrix<float>(3, in, rng, 2.0);
    const Matrix<float> y = back.forward(x);
    CHECK(y == layer.forward(x));
    const Matrix<long double> rx = dense_rotation(x, c.rotation);
    for (Index b = 0; b < x.rows(); ++b) {
      const long double step = rx.row(b).cwiseAbs().maxCoeff() / 254;
      for (Index o = 0; o < out; ++o) {
        long double exact = bias(o), weight_sum = 0, magnitude = std::fabs((long double)bias(o));
        for (Index k = 0; k < in; ++k) {
          const long double w = (long double)g.codes(o, k) * (long double)g.scales(o, k / c.group);
          exact += w * rx(b, k);
          weight_sum += std::fabs(w);
          magnitude += std::fabs(w * rx(b, k));
        }
        const long double bound = weight_sum * step * (1 + 1e-5L) + 1e-5L * magnitude;
        CHECK(std::fabs((long double)y(b, o) - exact) <= bound);
      }
    }
  }
}

TEST_CASE("gguf: fine-tuned frozen layers save and reload as they are") {
  temp_dir dir;
  std::mt19937 rng(73);
  const Index out = 4, in = 256;
  const group_weights g = random_group_weights(out, in, 128, rng);
  bitnet::bitlinear_options options;
  options.weight_scales = bitnet::weight_scaling::per_group;
  options.group_size = 128;
  options.rotation = bitnet::hadamard_rotation::random_signs(in, 128, 9);
  // An exact import, then a "fine-tuning step" that moves some codes (the scales stay: frozen).
  Matrix<float> w(out, in);
  for (Index r = 0; r < out; ++r)
    for (Index c = 0; c < in; ++c) w(r, c) = float(g.codes(r, c)) * g.scales(r, c / 128);
  BitLinear<float> layer = BitLinear<float>::from_exact_ternary(w, std::nullopt, options);
  REQUIRE(layer.options().scale_update == bitnet::weight_scale_update::frozen);
  Matrix<float> stepped = w;
  stepped(0, 0) = g.scales(0, 0) * (g.codes(0, 0) == 0 ? 0.75f : 0.25f);  // the code changes
  stepped(3, 200) = -g.scales(3, 1);
  layer.set_weight(stepped);
  CHECK(layer.unit_scales() == g.scales);
  CHECK(layer.ternary_weight() != g.codes);
  const fs::path path = dir.path / "tuned.gguf";
  {
    gguf::writer out_file(path, gguf::hadamard_metadata({{"blk.3.ffn_down.weight", *options.rotation}}),
                          {{"blk.3.ffn_down.weight", tensor_type::PQ2_0, {std::uint64_t(in), std::uint64_t(out)}}});
    out_file.write_bit_linear("blk.3.ffn_down.weight", layer);
    out_file.finish();
  }
  BitLinear<float> reloaded = gguf::reader(path).read_bit_linear<float>("blk.3.ffn_down.weight");
  CHECK(reloaded.options().scale_update == bitnet::weight_scale_update::frozen);
  CHECK(*reloaded.options().rotation == *options.rotation);
  CHECK(reloaded.ternary_weight() == layer.ternary_weight());
  CHECK(reloaded.unit_scales() == layer.unit_scales());
  const Matrix<float> x = reference::random_matrix<float>(2, in, rng);
  CHECK(reloaded.forward(x) == layer.forward(x));
  // Fine-tuning goes on from the reloaded layer without a jump.
  reloaded.set_weight(reloaded.dequantized_weight());
  CHECK(reloaded.forward(x) == layer.forward(x));
}

TEST_CASE("gguf: the writer declares rotations and refuses layers that do not match the declaration") {
  temp_dir dir;
  const auto r8 = bitnet::hadamard_rotation::random_signs(256, 64, 1);
  const auto other_signs = bitnet::hadamard_rotation::random_signs(256, 64, 2);
  const auto block128 = bitnet::hadamard_rotation::random_signs(512, 128, 3);
  CHECK_THROWS_WITH_AS(gguf::hadamard_metadata({}), "gguf::hadamard_metadata: no rotated tensor", bitnet::value_error);
  CHECK_THROWS_WITH_AS(gguf::hadamard_metadata({{"a", r8}, {"b", block128}}),
                       "gguf::hadamard_metadata: tensor \"b\" is rotated in blocks of 128, tensor \"a\" in blocks of 64 "
                       "(a file declares one block size)",
                       bitnet::value_error);
  CHECK_THROWS_WITH_AS(gguf::hadamard_metadata({{"a", r8}, {"b", other_signs}}),
                       doctest::Contains("tensors \"a\" and \"b\" both have 256 inputs but different signs"),
                       bitnet::value_error);
  CHECK_THROWS_WITH_AS(gguf::hadamard_metadata({{"a", r8}, {"a", r8}}), doctest::Contains("\"a\" is listed twice"),
                       bitnet::value_error);
  // What the keys say, as PrismML's converter writes them.
  const auto keys = gguf::hadamard_metadata({{"blk.1.ffn_up.weight", r8}, {"blk.0.ffn_up.weight", r8}});
  std::map<std::string, gguf::value> by_key;
  for (const auto& e : keys) by_key[e.key] = e.val;
  CHECK(by_key.at("prism.hadamard.version") == gguf::value(std::uint32_t{1}));
  CHECK(by_key.at("prism.hadamard.block_size") == gguf::value(std::uint32_t{64}));
  CHECK(by_key.at("prism.hadamard.sign_mode") == gguf::value(std::string("explicit")));
  CHECK(by_key.at("prism.hadamard.sign_widths") == gguf::value(gguf::array(std::vector<std::int32_t>{256})));
  CHECK(by_key.at("prism.hadamard.sign_values") ==
        gguf::value(gguf::array(std::vector<std::int32_t>(r8.signs().begin(), r8.signs().end()))));
  CHECK(by_key.at("prism.hadamard.weight_names") ==
        gguf::value(gguf::array(std::vector<std::string>{"blk.1.ffn_up.weight", "blk.0.ffn_up.weight"})));
  CHECK(gguf::hadamard_metadata({{"a", bitnet::hadamard_rotation::identity_signs(256, 64)}})[4].val ==
        gguf::value(std::string("identity")));

  Matrix<std::int8_t> codes = Matrix<std::int8_t>::Ones(2, 256);
  bitnet::bitlinear_options rotated;
  rotated.rotation = r8;
  const auto with_r8 = BitLinear<float>::from_ternary(codes, 1.0f, std::nullopt, rotated);
  rotated.rotation = other_signs;
  const auto with_other = BitLinear<float>::from_ternary(codes, 1.0f, std::nullopt, rotated);
  const auto plain = BitLinear<float>::from_ternary(codes, 1.0f);
  const fs::path path = dir.path / "w.gguf";
  const auto before = dir.snapshot();
  {
    gguf::writer w(path, gguf::hadamard_metadata({{"rot", r8}}),
                   {{"rot", tensor_type::TQ2_0, {256, 2}}, {"plain", tensor_type::TQ2_0, {256, 2}}});
    CHECK_THROWS_WITH_AS(w.write_bit_linear("plain", with_r8),
                         doctest::Contains("tensor \"plain\": the layer's rotation (block 64, 256 inputs) is not "
                                           "declared: list the tensor in the metadata's prism.hadamard.* keys"),
                         bitnet::value_error);
    CHECK_THROWS_WITH_AS(w.write_bit_linear("rot", plain),
                         doctest::Contains("tensor \"rot\": is declared rotated (prism.hadamard.weight_names), the layer "
                                           "has no rotation"),
                         bitnet::value_error);
    CHECK_THROWS_WITH_AS(w.write_bit_linear("rot", with_other),
                         doctest::Contains("tensor \"rot\": the layer's rotation (block 64, 256 inputs) is not the one "
                                           "the metadata declares for width 256 (block 64, sign mode explicit)"),
                         bitnet::value_error);
  }  // never finished: the file system is as it was
  CHECK(dir.snapshot() == before);
  // A declaration the reader would refuse is refused by the writer (here: an unknown key).
  std::vector<gguf::metadata_entry> bad = gguf::hadamard_metadata({{"rot", r8}});
  bad.push_back({"prism.hadamard.permutation", std::uint32_t{1}});
  CHECK_THROWS_WITH_AS(gguf::writer(path, bad, {}),
                       doctest::Contains("key \"prism.hadamard.permutation\": is not a key of the Hadamard rotation"),
                       bitnet::value_error);
}

TEST_CASE("gguf: rotations a BitLinear cannot represent are refused by tensor name") {
  temp_dir dir;
  const auto rotation = bitnet::hadamard_rotation::random_signs(256, 128, 4);
  std::vector<gguf::metadata_entry> keys =
      gguf::hadamard_metadata({{"blk.0.ssm_out.weight", rotation}, {"blk.0.attn_qkv.weight", rotation}});
  keys.push_back({"prism.hadamard.gdn_v_grouped", true});
  bitnet::bitlinear_options options;
  options.rotation = rotation;
  const auto layer = BitLinear<float>::from_ternary(Matrix<std::int8_t>::Ones(2, 256), 1.0f, std::nullopt, options);
  const fs::path path = dir.path / "gdn.gguf";
  {
    gguf::writer w(path, keys,
                   {{"blk.0.ssm_out.weight", tensor_type::TQ2_0, {256, 2}}, {"blk.0.attn_qkv.weight", tensor_type::TQ2_0, {256, 2}}});
    w.write_bit_linear("blk.0.ssm_out.weight", layer);
    w.write_bit_linear("blk.0.attn_qkv.weight", layer);
    w.finish();
  }
  const gguf::reader r(path);
  CHECK_THROWS_WITH_AS(r.read_bit_linear<float>("blk.0.ssm_out.weight"),
                       doctest::Contains("tensor \"blk.0.ssm_out.weight\": is rotated after a permutation of its input "
                                         "heads (prism.hadamard.gdn_v_grouped"),
                       bitnet::io_error);
  CHECK(*r.read_bit_linear<float>("blk.0.attn_qkv.weight").options().rotation == rotation);
  // A float tensor declared rotated is still refused by read_matrix: its values are not the model's.
  const gguf::reader prism = hadamard_file{}.build().open();
  CHECK_THROWS_WITH_AS(prism.read_matrix<float>("output.weight"), doctest::Contains("Hadamard-rotated basis"),
                       bitnet::io_error);
}

TEST_CASE("gguf: Q2_0 / TQ2_0 / TQ1_0 written by ggml's own code load exactly (tests/data/ggml_reference.gguf)") {
  // Made by tests/data/make_ggml_reference.cpp against ggml d99724f2: ggml_quantize_chunk's blocks,
  // ggml's gguf writer, and ggml's own dequantization (to_float) of each tensor stored next to it.
  const gguf::reader file(BITNET_TEST_DATA_DIR "/ggml_reference.gguf");
  struct expected {
    const char* name;
    tensor_type type;
    Index rows, cols, block;
  };
  const expected tensors[] = {{"q2_0", tensor_type::Q2_0, 3, 192, 64},
                              {"tq2_0", tensor_type::TQ2_0, 2, 512, 256},
                              {"tq1_0", tensor_type::TQ1_0, 2, 256, 256}};
  std::mt19937 rng(79);
  for (const expected& e : tensors) {
    INFO(e.name);
    REQUIRE(file.info(e.name).type == e.type);
    const Matrix<float> ggml = file.read_matrix<float>(std::string(e.name) + ".dequantized");
    REQUIRE(ggml.rows() == e.rows);
    REQUIRE(ggml.cols() == e.cols);
    // Codes x scales, decoded by bitnet, are ggml's values bit for bit (a zero is a zero of either sign).
    const gguf::ternary_tensor_groups groups = file.read_ternary_groups(e.name);
    CHECK(groups.group_size == e.block);
    Index nonzero = 0;
    for (Index r = 0; r < e.rows; ++r)
      for (Index c = 0; c < e.cols; ++c) {
        const float ours = float(groups.codes(r, c)) * groups.unit_scales(r, c / e.block);
        CHECK((std::bit_cast<std::uint32_t>(ours) == std::bit_cast<std::uint32_t>(ggml(r, c)) ||
               (ours == 0 && ggml(r, c) == 0)));
        nonzero += groups.codes(r, c) != 0;
      }
    CHECK(nonzero > e.rows * e.cols / 4);  // the codes are not trivially zero
    // The layer read from the file computes with exactly those weights, and its output is the float
    // layer of ggml's values within the per-token activation-quantization bound.
    const BitLinear<float> layer = file.read_bit_linear<float>(e.name);
    CHECK(layer.dequantized_weight() == ggml);
    CHECK(layer.options().weight_scales == bitnet::weight_scaling::per_group);  // the blocks' d differ
    CHECK(layer.options().scale_update == bitnet::weight_scale_update::frozen);
    const Matrix<float> x = reference::random_matrix<float>(4, e.cols, rng, 2.0);
    const Matrix<float> y = layer.forward(x);
    for (Index b = 0; b < x.rows(); ++b) {
      const long double step = (long double)x.row(b).cwiseAbs().maxCoeff() / 254;
      for (Index o = 0; o < e.rows; ++o) {
        long double exact = 0, weight_sum = 0, magnitude = 0;
        for (Index k = 0; k < e.cols; ++k) {
          exact += (long double)ggml(o, k) * (long double)x(b, k);
          weight_sum += std::fabs((long double)ggml(o, k));
          magnitude += std::fabs((long double)ggml(o, k) * (long double)x(b, k));
        }
        CHECK(std::fabs((long double)y(b, o) - exact) <= weight_sum * step * (1 + 1e-5L) + 1e-5L * magnitude);
      }
    }
  }
  // Written back by bitnet in the same type, the bytes are ggml's bytes.
  temp_dir dir;
  const fs::path path = dir.path / "again.gguf";
  {
    std::vector<gguf::tensor_spec> specs;
    for (const expected& e : tensors) specs.push_back({e.name, e.type, {std::uint64_t(e.cols), std::uint64_t(e.rows)}});
    gguf::writer w(path, {}, specs);
    for (const expected& e : tensors) w.write_bit_linear(e.name, file.read_bit_linear<float>(e.name));
    w.finish();
  }
  const gguf::reader again(path);
  for (const expected& e : tensors) CHECK(again.read_bytes(e.name) == file.read_bytes(e.name));
}

// ---------------------------------------------------------------------------------------------
// Scales: d = 1 / sw

TEST_CASE("gguf: fp16 rounds d = 1 / sw to nearest, and the report says by how much") {
  // sw = 3: 1/3 in fp16 is 0x3555 = 1365 / 4096 = 0.333251953125 (below 1/3 by 8.1e-5 / 0.333 = 2.44e-4).
  const BitLinear<float> layer = BitLinear<float>::from_ternary(zero_codes(2, 256), 3.0f);
  const gguf::encoded_ternary encoded = gguf::encode_bit_linear(layer, tensor_type::TQ2_0);
  CHECK(encoded.scale.requested == 1.0 / 3.0);
  CHECK(encoded.scale.stored == 1365.0 / 4096.0);
  CHECK(encoded.bytes[64] == std::byte{0x55});
  CHECK(encoded.bytes[65] == std::byte{0x35});
  CHECK(encoded.scale.relative_error() == doctest::Approx(std::fabs(1365.0 / 4096.0 * 3.0 - 1.0)));
  CHECK(encoded.scale.relative_error() <= std::ldexp(1.0, -11));
  // Loaded back, sw = 1 / d rounded once to float: 4096 / 1365 = 3.000732...
  const BitLinear<float> back = gguf::to_bit_linear<float>(gguf::decode_ternary(tensor_type::TQ2_0, encoded.bytes, 2, 256));
  CHECK(back.weight_scale() == static_cast<float>(4096.0 / 1365.0));
}

TEST_CASE("gguf: I2_S stores the float32 d that reciprocates back to sw whenever one exists") {
  std::mt19937 rng(7);
  std::uniform_real_distribution<float> dist(0.5f, 500.0f);
  int exact = 0;
  const int trials = 2000;
  for (int i = 0; i < trials; ++i) {
    const float sw = dist(rng);
    const float d = gguf::i2_s_scale_for(sw);
    CHECK(std::fabs(double(d) * sw - 1.0) <= std::ldexp(1.0, -22));
    if (gguf::scale_from_d<float>(d) == sw) {
      ++exact;
      continue;
    }
    // None of the floats within 4 ulps of 1 / sw reciprocates to sw, and the reload is 1 ulp off.
    float candidate = static_cast<float>(1.0 / sw);
    for (int k = 0; k < 4; ++k) candidate = std::nextafter(candidate, 0.0f);
    for (int k = 0; k < 9; ++k, candidate = std::nextafter(candidate, 1e30f))
      CHECK(gguf::scale_from_d<float>(candidate) != sw);
    const float back = gguf::scale_from_d<float>(d);
    CHECK((back == std::nextafter(sw, 0.0f) || back == std::nextafter(sw, 1e30f)));
  }
  INFO("exact: " << exact << " of " << trials);
  CHECK(exact > trials * 3 / 4);
  CHECK(gguf::scale_from_d<float>(gguf::i2_s_scale_for(3.0f)) == 3.0f);  // 1/3 = 0x3eaaaaab reciprocates to 3
}

// ---------------------------------------------------------------------------------------------
// BitLinear in and out

TEST_CASE("gguf: unequal block scales are refused, naming the first differing block") {
  Matrix<std::int8_t> codes = zero_codes(2, 512);
  auto encoded = gguf::encode_ternary(tensor_type::TQ2_0, codes, 0.5);
  encoded.bytes[2 * 66 + 64] = std::byte{0x01};  // block 2 = row 1, columns 0-255: d = 0x3801
  const auto decoded = gguf::decode_ternary(tensor_type::TQ2_0, encoded.bytes, 2, 512);
  CHECK_THROWS_WITH_AS(gguf::to_bit_linear<float>(decoded, "f.gguf", "blk.3.attn_q.weight"),
                       "gguf: f.gguf: tensor \"blk.3.attn_q.weight\": block scales differ: block 2 (row 1, columns "
                       "0-255) has d = 0.500488281, block 0 has d = 0.5 (one scale per tensor here; to_groups / "
                       "reader::read_ternary_groups give the codes and per-block scales of a group-scaled layer)",
                       bitnet::io_error);
  const auto zero = gguf::decode_ternary(tensor_type::TQ2_0, gguf::encode_ternary(tensor_type::TQ2_0, codes, 0.0).bytes, 2, 512);
  CHECK_THROWS_WITH_AS(gguf::to_bit_linear<float>(zero), doctest::Contains("is not finite and > 0"), bitnet::io_error);
}

TEST_CASE_TEMPLATE("gguf: BitLinear -> GGUF file -> BitLinear keeps codes, scale and outputs", T, float, double) {
  temp_dir dir;
  const fs::path path = dir.path / "model.gguf";
  // Latent weights for TQ types (scale rounded through fp16) and exact scales for a bit-identical trip.
  const BitLinear<T> latent(random_matrix(5, 512, 3).template cast<T>());
  Matrix<std::int8_t> codes = latent.ternary_weight();
  const BitLinear<T> exact_tq = BitLinear<T>::from_ternary(codes, T(8));  // d = 1/8 is an fp16
  const Matrix<T> x = random_matrix(4, 512, 4).template cast<T>();
  {
    gguf::writer out(path, {{"general.architecture", std::string("llama")}},
                     {{"a.weight", tensor_type::TQ2_0, {512, 5}},
                      {"b.weight", tensor_type::TQ1_0, {512, 5}},
                      {"c.weight", tensor_type::I2_S, {512, 5}},
                      {"d.weight", tensor_type::TQ2_0, {512, 5}},
                      {"norm.weight", tensor_type::F32, {512}}});
    const gguf::scale_rounding a = out.write_bit_linear("a.weight", latent);
    CHECK(a.requested == 1.0 / double(latent.weight_scale()));
    CHECK(a.relative_error() <= std::ldexp(1.0, -11));
    out.write_bit_linear("b.weight", latent);
    const gguf::scale_rounding c = out.write_bit_linear("c.weight", latent);
    CHECK(c.relative_error() <= std::ldexp(1.0, -22));
    out.write_bit_linear("d.weight", exact_tq);
    out.write_floats("norm.weight", Vector<float>::LinSpaced(512, -1.0f, 1.0f));
    out.finish();
  }
  const gguf::reader file(path);
  for (const char* name : {"a.weight", "b.weight", "c.weight", "d.weight"}) {
    const BitLinear<T> back = file.read_bit_linear<T>(name);
    CHECK(back.ternary_weight() == codes);
    CHECK(back.in_features() == 512);
    CHECK(back.out_features() == 5);
  }
  const BitLinear<T> i2s = file.read_bit_linear<T>("c.weight");
  CHECK(i2s.weight_scale() == gguf::scale_from_d<T>(gguf::i2_s_scale_for(latent.weight_scale())));
  CHECK(i2s.forward(x) == BitLinear<T>::from_ternary(codes, i2s.weight_scale()).forward(x));
  const BitLinear<T> tq = file.read_bit_linear<T>("d.weight");
  CHECK(tq.weight_scale() == T(8));
  CHECK(tq.forward(x) == exact_tq.forward(x));
  const BitLinear<T> rounded = file.read_bit_linear<T>("a.weight");
  const double d16 = file.read_ternary("a.weight").scales.front();
  CHECK(rounded.weight_scale() == gguf::scale_from_d<T>(d16));
  CHECK(file.read_matrix<float>("norm.weight") == Vector<float>::LinSpaced(512, -1.0f, 1.0f).transpose());
}

TEST_CASE("gguf: a BitLinear whose in_features no block fits is refused by the writer") {
  temp_dir dir;
  gguf::writer out(dir.path / "m.gguf", {}, {{"w", tensor_type::TQ2_0, {256, 2}}});
  const BitLinear<float> narrow = BitLinear<float>::from_ternary(zero_codes(2, 128), 1.0f);
  CHECK_THROWS_AS(out.write_bit_linear("w", narrow), bitnet::shape_error);
  CHECK_THROWS_AS(gguf::encode_bit_linear(narrow, tensor_type::TQ1_0), bitnet::shape_error);
}

// ---------------------------------------------------------------------------------------------
// The writer's file, checked byte by byte against the format

TEST_CASE("gguf: the writer lays out the header, padding and offsets as ggml's reader requires") {
  temp_dir dir;
  const fs::path path = dir.path / "m.gguf";
  Matrix<float> norm(1, 3);
  norm << 1.0f, -2.0f, 0.5f;
  {
    gguf::writer out(path, {{"k", std::uint32_t(7)}},
                     {{"n", tensor_type::F32, {3}}, {"h", tensor_type::F16, {2}}});
    out.write_floats("h", Vector<double>::Constant(2, 1.0));
    out.write_floats("n", norm);
    out.finish();
  }
  image expected;
  expected.header(2, 1).str("k").u32(4).u32(7);
  expected.tensor("n", {3}, 0, 0).tensor("h", {2}, 1, 32).pad();
  expected.f32(1.0f).f32(-2.0f).f32(0.5f).zeros(20);  // "n", padded to 32
  expected.u16(0x3c00).u16(0x3c00).zeros(28);         // "h", padded to 32 (the data section ends padded)
  std::ifstream in(path, std::ios::binary);
  const std::string written(std::istreambuf_iterator<char>(in), {});
  REQUIRE(written.size() == expected.bytes.size());
  CHECK(std::memcmp(written.data(), expected.bytes.data(), written.size()) == 0);
}

TEST_CASE("gguf: every metadata value type round-trips, arrays of strings and of arrays included") {
  temp_dir dir;
  const fs::path path = dir.path / "m.gguf";
  std::vector<gguf::metadata_entry> metadata{
      {"u8", std::uint8_t(200)},
      {"i8", std::int8_t(-100)},
      {"u16", std::uint16_t(60000)},
      {"i16", std::int16_t(-30000)},
      {"u32", std::uint32_t(4000000000u)},
      {"i32", std::int32_t(-2000000000)},
      {"f32", 1.5f},
      {"bool", true},
      {"str", std::string("caf\xc3\xa9")},
      {"u64", std::uint64_t(1) << 63},
      {"i64", std::int64_t(-1) << 62},
      {"f64", 0.1},
      {"tokens", gguf::array(std::vector<std::string>{"<s>", "", "\xe2\x96\x81the"})},
      {"flags", gguf::array(std::vector<bool>{true, false, true})},
      {"nested", gguf::array(std::vector<gguf::array>{gguf::array(std::vector<std::int32_t>{1, -2}),
                                                      gguf::array(std::vector<std::string>{"x"})})},
      {"empty", gguf::array(std::vector<float>{})}};
  {
    gguf::writer out(path, metadata, {});
    out.finish();
  }
  const gguf::reader file(path);
  CHECK(file.metadata() == metadata);
  CHECK(file.version() == 3);
  CHECK(file.tensors().empty());
  CHECK(file.get<std::uint32_t>("u32") == 4000000000u);
  CHECK_FALSE(file.get<std::uint32_t>("absent").has_value());
  CHECK_THROWS_WITH_AS(file.get<std::uint64_t>("u32"), doctest::Contains("key \"u32\": is UINT32"), bitnet::io_error);
  CHECK(file.find_value("tokens")->type() == gguf::value_type::array);
}

TEST_CASE("gguf: general.alignment sets the padding") {
  temp_dir dir;
  const fs::path path = dir.path / "m.gguf";
  {
    gguf::writer out(path, {{"general.alignment", std::uint32_t(64)}},
                     {{"a", tensor_type::I8, {3}}, {"b", tensor_type::I8, {1}}});
    out.write_bytes("a", bytes_of({1, 2, 3}));
    out.write_bytes("b", bytes_of({4}));
    out.finish();
  }
  const gguf::reader file(path);
  CHECK(file.alignment() == 64);
  CHECK(file.data_offset() % 64 == 0);
  CHECK(file.info("b").offset == 64);
  CHECK(file.file_size() == file.data_offset() + 128);
  CHECK(file.read_bytes("b") == bytes_of({4}));
  CHECK_THROWS_AS((gguf::writer(dir.path / "x.gguf", {{"general.alignment", std::uint32_t(48)}}, {})), bitnet::value_error);
  CHECK_THROWS_AS((gguf::writer(dir.path / "x.gguf", {{"general.alignment", std::uint64_t(64)}}, {})), bitnet::value_error);
}

TEST_CASE("gguf: float tensors: F16 / BF16 round to nearest even, too large is refused") {
  temp_dir dir;
  const fs::path path = dir.path / "m.gguf";
  Matrix<double> values(2, 2);
  values << 1.0 + std::ldexp(1.0, -11), 1.0 + 3 * std::ldexp(1.0, -11), -65504.0, 1e-8;  // ties to even
  {
    gguf::writer out(path, {}, {{"h", tensor_type::F16, {2, 2}}, {"b", tensor_type::BF16, {2, 2}}, {"d", tensor_type::F64, {2, 2}}});
    out.write_floats("h", values);
    out.write_floats("b", values);
    out.write_floats("d", values);
    CHECK_THROWS_AS(out.write_floats("h", values), bitnet::io_error);  // written twice
    out.finish();
  }
  const gguf::reader file(path);
  Matrix<double> halves(2, 2);
  halves << 1.0, 1.0 + std::ldexp(1.0, -9), -65504.0, std::ldexp(1.0, -24) * std::nearbyint(1e-8 / std::ldexp(1.0, -24));
  CHECK(file.read_matrix<double>("h") == halves);
  CHECK(file.read_matrix<double>("d") == values);
  CHECK(file.read_matrix<double>("b")(1, 0) == -65536.0);
  gguf::writer out(dir.path / "big.gguf", {}, {{"h", tensor_type::F16, {1}}});
  CHECK_THROWS_WITH_AS(out.write_floats("h", Vector<float>::Constant(1, 70000.0f)),
                       doctest::Contains("element 0 (70000) cannot be stored as F16"), bitnet::value_error);
  CHECK_THROWS_WITH_AS(file.read_matrix<float>("missing"), doctest::Contains("no such tensor"), bitnet::io_error);
}

TEST_CASE("gguf: writer refusals leave the file system as it was") {
  temp_dir dir;
  const fs::path path = dir.path / "model.gguf";
  {
    std::ofstream existing(path, std::ios::binary);
    existing << "the previous model";
  }
  const auto before = dir.snapshot();
  const std::vector<gguf::tensor_spec> good{{"w", tensor_type::TQ2_0, {256, 1}}};
  // Bad declarations: nothing is created.
  CHECK_THROWS_AS((gguf::writer(path, {{"", 1u}}, good)), bitnet::value_error);
  CHECK_THROWS_AS((gguf::writer(path, {{"k", 1u}, {"k", 2u}}, good)), bitnet::value_error);
  CHECK_THROWS_AS((gguf::writer(path, {{"bad\xff", 1u}}, good)), bitnet::value_error);
  CHECK_THROWS_AS((gguf::writer(path, {}, {{"w", tensor_type::TQ2_0, {100, 1}}})), bitnet::value_error);
  CHECK_THROWS_AS((gguf::writer(path, {}, {{std::string(64, 'n'), tensor_type::F32, {1}}})), bitnet::value_error);
  CHECK_THROWS_AS((gguf::writer(path, {}, {{"w", tensor_type::F32, {1}}, {"w", tensor_type::F32, {1}}})), bitnet::value_error);
  CHECK_THROWS_AS((gguf::writer(path, {}, {{"w", tensor_type::F32, {}}})), bitnet::value_error);
  CHECK_THROWS_AS((gguf::writer(path, {}, {{"w", tensor_type::F32, {1, 1, 1, 1, 1}}})), bitnet::value_error);
  CHECK_THROWS_AS((gguf::writer(path, {}, {{"w", tensor_type::F64, {std::uint64_t(1) << 62, 4}}})), bitnet::value_error);
  gguf::array deep(std::vector<std::uint8_t>{1});
  for (int i = 0; i < gguf::max_array_depth; ++i) deep = gguf::array(std::vector<gguf::array>{deep});
  CHECK_THROWS_AS((gguf::writer(path, {{"deep", deep}}, good)), bitnet::value_error);
  CHECK(dir.snapshot() == before);
  // A tensor never written: finish() refuses, the destructor removes the temporary file.
  {
    gguf::writer out(path, {}, good);
    CHECK_THROWS_WITH_AS(out.finish(), doctest::Contains("\"w\": declared but never written"), bitnet::io_error);
  }
  CHECK(dir.snapshot() == before);
  // Abandoned after a write (an exception in the caller): same.
  {
    gguf::writer out(path, {}, good);
    out.write_bytes("w", std::vector<std::byte>(66));
    CHECK_THROWS_AS(out.write_bytes("x", std::vector<std::byte>(1)), bitnet::io_error);
    CHECK_THROWS_AS(out.write_bytes("w", std::vector<std::byte>(66)), bitnet::io_error);
  }
  CHECK(dir.snapshot() == before);
  {
    gguf::writer out(path, {}, good);
    CHECK_THROWS_AS(out.write_bytes("w", std::vector<std::byte>(65)), bitnet::shape_error);
  }
  CHECK(dir.snapshot() == before);
  // And a finished file replaces the old one whole.
  {
    gguf::writer out(path, {}, good);
    out.write_bytes("w", std::vector<std::byte>(66));
    out.finish();
  }
  const auto after = dir.snapshot();
  REQUIRE(after.size() == 1);
  CHECK(gguf::reader(path).info("w").byte_size == 66);
}

// ---------------------------------------------------------------------------------------------
// Malformed files: one per validation rule

TEST_CASE("gguf: a valid hand-made file opens, with ggml's layout") {
  image file;
  file.header(2, 2).str("general.architecture").u32(8).str("llama").str("general.alignment").u32(4).u32(16);
  file.tensor("w", {256, 1}, 35, 0).tensor("n", {4}, 0, 80).pad(16);
  std::vector<std::byte> block(66, std::byte{0x55});
  block[64] = std::byte{0x00}, block[65] = std::byte{0x3c};
  file.bytes.insert(file.bytes.end(), block.begin(), block.end());
  file.zeros(14).f32(1).f32(2).f32(3).f32(4);
  const gguf::reader r = file.open();
  CHECK(r.alignment() == 16);
  CHECK(r.get<std::string>("general.architecture") == "llama");
  CHECK(r.info("w").type == tensor_type::TQ2_0);
  CHECK(r.info("w").ne == std::vector<std::uint64_t>{256, 1});
  CHECK(r.info("n").byte_size == 16);
  CHECK(r.read_bit_linear<float>("w").weight_scale() == 1.0f);
  CHECK(r.read_matrix<float>("n") == Vector<float>::LinSpaced(4, 1, 4).transpose());
  CHECK_THROWS_WITH_AS(r.read_ternary("n"), doctest::Contains("not a ternary type"), bitnet::io_error);
  CHECK_THROWS_WITH_AS(r.read_matrix<float>("w"), doctest::Contains("not a float tensor"), bitnet::io_error);
}

TEST_CASE("gguf: malformed headers") {
  check_rejected(image{}, "truncated: the magic needs 4 bytes at byte 0, the file has 0");
  image magic;
  magic.u8('G').u8('G').u8('M').u8('L').u32(3).u64(0).u64(0);
  check_rejected(magic, "not a GGUF file: the magic is 47 47 4d 4c");
  check_rejected(image{}.header(0, 0, 1), "version 1 is not supported");
  check_rejected(image{}.header(0, 0, 0x30000), "version 196608 is not supported (2 and 3 are; a big-endian file?)");
  image truncated = image{}.header(0, 0);
  truncated.bytes.resize(20);
  check_rejected(truncated, "truncated: the key-value count needs 8 bytes at byte 16");
  check_rejected(image{}.header(0, 1), "key-value count 1 cannot fit in the 0 bytes left");
  check_rejected(image{}.header(0, std::uint64_t(1) << 60).zeros(100), "key-value count 1152921504606846976 cannot fit");
  check_rejected(image{}.header(std::uint64_t(-1), 0).zeros(100), "tensor count 18446744073709551615 cannot fit");
  CHECK(rejection(image{}.header(0, 0)).empty());
  CHECK(rejection(image{}.header(0, 0, 2)).empty());
}

TEST_CASE("gguf: malformed key-value pairs") {
  auto one_kv = [] { return image{}.header(0, 1); };
  check_rejected(one_kv().str("").u32(0).u8(1).zeros(8), "key 0 is empty");
  check_rejected(image{}.header(0, 2).str("a").u32(0).u8(1).str("a").u32(0).u8(1), "key \"a\": the key appears twice");
  check_rejected(one_kv().str("a\xc3").u32(0).u8(1), "key \"a\\xc3\": the key is not valid UTF-8");
  check_rejected(one_kv().str("a").u32(13).u8(1).zeros(20), "key \"a\": unknown value type 13");
  check_rejected(one_kv().str("a").u32(7).u8(2), "key \"a\": BOOL value 2 is not 0 or 1");
  check_rejected(one_kv().str("a").u32(4).u8(1).u8(2), "truncated: the value of key \"a\" needs 4 bytes");
  check_rejected(one_kv().str("a").u32(8).u64(std::uint64_t(-1)).zeros(8),
                 "the value of key \"a\": string length 18446744073709551615 runs past the end of the file");
  check_rejected(one_kv().u64(std::uint64_t(1) << 63).zeros(16), "key 0: string length 9223372036854775808 runs past");
  check_rejected(one_kv().str("a").u32(9).u32(4).u64(5).u32(1).u32(2),
                 "key \"a\": array of 5 UINT32 elements cannot fit in the 8 bytes left");
  check_rejected(one_kv().str("a").u32(9).u32(8).u64(std::uint64_t(1) << 62).zeros(64),
                 "key \"a\": array of 4611686018427387904 STRING elements cannot fit");
  check_rejected(one_kv().str("a").u32(9).u32(8).u64(2).str("x").u64(100).u8('y'),
                 "element 1 of key \"a\": string length 100 runs past the end of the file");
  check_rejected(one_kv().str("a").u32(9).u32(14).u64(0).zeros(8), "key \"a\": unknown array element type 14");
  check_rejected(one_kv().str("a").u32(9).u32(7).u64(2).u8(1).u8(3), "key \"a\": BOOL value 3 is not 0 or 1");
  image deep = one_kv().str("a").u32(9);
  for (int i = 0; i < gguf::max_array_depth; ++i) deep.u32(9).u64(1);
  deep.u32(0).u64(0).zeros(64);
  check_rejected(deep, "key \"a\": arrays nested deeper than 8 levels");
  image nested = one_kv().str("a").u32(9);
  for (int i = 0; i < gguf::max_array_depth - 1; ++i) nested.u32(9).u64(1);
  nested.u32(0).u64(1).u8(5);
  CHECK(rejection(nested).empty());
  check_rejected(one_kv().str("general.alignment").u32(10).u64(32), "key \"general.alignment\": is UINT64, must be UINT32");
  check_rejected(one_kv().str("general.alignment").u32(4).u32(24), "alignment 24 is not a power of 2");
  check_rejected(one_kv().str("general.alignment").u32(4).u32(0), "alignment 0 is not a power of 2");
}

TEST_CASE("gguf: malformed tensor infos") {
  auto one_tensor = [] { return image{}.header(1, 0); };
  auto with_data = [](image file, std::size_t data_bytes = 64) { return file.pad().zeros(data_bytes); };
  check_rejected(with_data(one_tensor().tensor("", {4}, 0, 0)), "the name of tensor 0 is empty");
  check_rejected(with_data(one_tensor().tensor(std::string(64, 'x'), {4}, 0, 0)), "the name has 64 bytes, over ggml's limit of 63");
  CHECK(rejection(with_data(one_tensor().tensor(std::string(63, 'x'), {4}, 0, 0))).empty());
  check_rejected(with_data(one_tensor().tensor("\xff", {4}, 0, 0)), "tensor \"\\xff\": the name is not valid UTF-8");
  check_rejected(with_data(image{}.header(2, 0).tensor("t", {4}, 0, 0).tensor("t", {4}, 0, 32)),
                 "tensor \"t\": the name appears twice");
  check_rejected(with_data(one_tensor().tensor("t", {1, 1, 1, 1, 1}, 0, 0)), "tensor \"t\": 5 dimensions, more than ggml's 4");
  check_rejected(with_data(one_tensor().tensor("t", {std::uint64_t(1) << 63}, 0, 0)), "dimension 0 is 9223372036854775808, over INT64_MAX");
  check_rejected(with_data(one_tensor().tensor("t", {std::uint64_t(1) << 32, std::uint64_t(1) << 32}, 0, 0)),
                 "sizes [4294967296, 4294967296] hold more than INT64_MAX elements");
  check_rejected(with_data(one_tensor().tensor("t", {4}, 5, 0)), "tensor \"t\": unknown ggml type id 5");
  check_rejected(with_data(one_tensor().tensor("t", {4}, 99, 0)), "unknown ggml type id 99");
  check_rejected(with_data(one_tensor().tensor("t", {100, 2}, 35, 0)), "rows of 100 elements are not a multiple of the TQ2_0 block size 256");
  check_rejected(with_data(one_tensor().tensor("t", {std::uint64_t(1) << 62}, 28, 0)),
                 "sizes [4611686018427387904] of F64 take more than 2^64 bytes");
  check_rejected(with_data(one_tensor().tensor("t", {4}, 0, 16)), "offset 16 is not a multiple of the alignment 32");
  check_rejected(with_data(one_tensor().tensor("t", {17}, 0, 0)), "bytes [0, +68) run past the end of the data section (64 bytes)");
  check_rejected(with_data(one_tensor().tensor("t", {4}, 0, std::uint64_t(-32))), "run past the end of the data section");
  check_rejected(with_data(image{}.header(2, 0).tensor("a", {16}, 0, 0).tensor("b", {4}, 0, 32), 64),
                 "tensor \"b\": bytes [32, +16) overlap tensor \"a\"");
  image no_data = one_tensor().tensor("t", {4}, 0, 0);
  check_rejected(no_data, "truncated: the data section starts at byte 64, past the end of the file");
  image cut = one_tensor().tensor("t", {4}, 0, 0);
  cut.bytes.resize(cut.bytes.size() - 3);
  check_rejected(cut, "truncated: the offset of tensor \"t\" needs 8 bytes");
  // Zero-size tensors take no bytes and overlap nothing.
  CHECK(rejection(with_data(image{}.header(2, 0).tensor("a", {0}, 0, 0).tensor("b", {4}, 0, 0), 16)).empty());
}

TEST_CASE("gguf: tensor byte sizes of ggml's types (sizeof the block structs of ggml-common.h)") {
  // block_q4_0: fp16 d + 16 bytes for 32 weights = 18; block_q8_0: 2 + 32 = 34; block_q4_K: 2 fp16 +
  // 12 scale bytes + 128 = 144 per 256; block_q6_K: 128 + 64 + 16 + 2 = 210; block_tq1_0: 48 + 4 + 2 = 54;
  // block_tq2_0: 64 + 2 = 66; block_iq4_nl: 2 + 16 = 18 per 32; block_mxfp4: 1 + 16 = 17 per 32;
  // block_q2_0: 2 + 64 / 4 = 18 per 64; PrismML's block_pq2_0: 2 + 32 = 34 and block_ptq1_0:
  // 24 + 2 + 2 = 28 per 128.
  struct expectation {
    tensor_type type;
    std::uint64_t row, bytes_per_row;
  };
  for (const expectation& e : {expectation{tensor_type::F32, 3, 12}, {tensor_type::F16, 3, 6}, {tensor_type::BF16, 3, 6},
                               {tensor_type::F64, 3, 24}, {tensor_type::I8, 3, 3}, {tensor_type::Q4_0, 64, 36},
                               {tensor_type::Q8_0, 64, 68}, {tensor_type::Q4_K, 256, 144}, {tensor_type::Q6_K, 512, 420},
                               {tensor_type::TQ1_0, 512, 108}, {tensor_type::TQ2_0, 256, 66}, {tensor_type::IQ4_NL, 32, 18},
                               {tensor_type::MXFP4, 64, 34}, {tensor_type::Q2_0, 128, 36},
                               {tensor_type::PQ2_0, 256, 68}, {tensor_type::PTQ1_0, 384, 84}}) {
    const std::vector<std::uint64_t> ne{e.row, 5};
    CHECK(gguf::tensor_byte_size(e.type, ne) == 5 * e.bytes_per_row);
  }
  // I2_S: the whole tensor, count / 4 code bytes + 32 (float32 d and padding), as ggml_nbytes.
  CHECK(gguf::tensor_byte_size(tensor_type::I2_S, std::vector<std::uint64_t>{128, 5}) == 160 + 32);
  CHECK(gguf::find_tensor_type(35)->name == "TQ2_0");
  CHECK(gguf::find_tensor_type(36)->name == "I2_S");
  CHECK(gguf::find_tensor_type(42)->name == "Q2_0");
  CHECK(gguf::find_tensor_type(142)->name == "PQ2_0");  // PrismML's fork, ggml.h
  CHECK(gguf::find_tensor_type(143)->name == "PTQ1_0");
  for (std::uint32_t retired : {4u, 5u, 31u, 32u, 33u, 37u, 38u, 43u, 134u}) CHECK_FALSE(gguf::find_tensor_type(retired));
}

TEST_CASE("gguf: the reader opens files and names them in messages") {
  temp_dir dir;
  CHECK_THROWS_WITH_AS(gguf::reader(dir.path / "missing.gguf"), doctest::Contains("not a regular file"), bitnet::io_error);
  const fs::path path = dir.path / "short.gguf";
  {
    std::ofstream out(path, std::ios::binary);
    out << "GGUF";
  }
  CHECK_THROWS_WITH_AS(gguf::reader{path}, ("gguf: " + path.string() + ": truncated: the version needs 4 bytes at byte 4, the file has 4").c_str(),
                       bitnet::io_error);
}

// ---------------------------------------------------------------------------------------------
// Whole models: arch "llama"

TEST_CASE("gguf: Hugging Face Llama names map to llama.cpp's") {
  CHECK(gguf::llama_tensor_name("model.embed_tokens.weight") == "token_embd.weight");
  CHECK(gguf::llama_tensor_name("model.norm.weight") == "output_norm.weight");
  CHECK(gguf::llama_tensor_name("lm_head.weight") == "output.weight");
  CHECK(gguf::llama_tensor_name("model.layers.0.input_layernorm.weight") == "blk.0.attn_norm.weight");
  CHECK(gguf::llama_tensor_name("model.layers.12.self_attn.q_proj.weight") == "blk.12.attn_q.weight");
  CHECK(gguf::llama_tensor_name("model.layers.3.self_attn.k_proj.weight") == "blk.3.attn_k.weight");
  CHECK(gguf::llama_tensor_name("model.layers.3.self_attn.v_proj.weight") == "blk.3.attn_v.weight");
  CHECK(gguf::llama_tensor_name("model.layers.3.self_attn.o_proj.weight") == "blk.3.attn_output.weight");
  CHECK(gguf::llama_tensor_name("model.layers.3.post_attention_layernorm.weight") == "blk.3.ffn_norm.weight");
  CHECK(gguf::llama_tensor_name("model.layers.3.mlp.gate_proj.weight") == "blk.3.ffn_gate.weight");
  CHECK(gguf::llama_tensor_name("model.layers.3.mlp.up_proj.weight") == "blk.3.ffn_up.weight");
  CHECK(gguf::llama_tensor_name("model.layers.3.mlp.down_proj.weight") == "blk.3.ffn_down.weight");
  for (const char* other : {"model.layers.3.self_attn.rotary_emb.inv_freq", "model.layers.x.mlp.up_proj.weight",
                            "model.layers.03.mlp.up_proj.weight", "model.layers..mlp.up_proj.weight",
                            "model.layers.3.mlp.up_proj.bias", "model.layers.3", "lm_head.bias", ""})
    CHECK_FALSE(gguf::llama_tensor_name(other).has_value());
}

TEST_CASE("gguf: q / k rows are permuted for rope as the converters do, by hand") {
  // Within a head of size hd, row a * hd/2 + b moves to 2b + a. hd = 6: rows 0..5 -> 0 3 1 4 2 5;
  // two heads of 4: 0 2 1 3 | 4 6 5 7.
  Matrix<int> six(6, 2), eight(8, 1);
  for (int r = 0; r < 6; ++r) six(r, 0) = r, six(r, 1) = 10 * r;
  for (int r = 0; r < 8; ++r) eight(r, 0) = r;
  const Matrix<int> p6 = gguf::permute_rope_rows(six, 1);
  const std::vector<int> want6{0, 3, 1, 4, 2, 5}, want8{0, 2, 1, 3, 4, 6, 5, 7};
  for (int r = 0; r < 6; ++r) {
    CHECK(p6(r, 0) == want6[std::size_t(r)]);
    CHECK(p6(r, 1) == 10 * want6[std::size_t(r)]);
  }
  const Matrix<int> p8 = gguf::permute_rope_rows(eight, 2);
  for (int r = 0; r < 8; ++r) CHECK(p8(r, 0) == want8[std::size_t(r)]);
  CHECK_THROWS_AS(gguf::permute_rope_rows(eight, 3), bitnet::shape_error);
  CHECK_THROWS_AS(gguf::permute_rope_rows(six, 2), bitnet::shape_error);  // heads of 3: odd
}

namespace {

gguf::llama_hparams tiny_llama() {
  gguf::llama_hparams h;
  h.context_length = 128, h.embedding_length = 256, h.block_count = 2, h.feed_forward_length = 512;
  h.head_count = 4, h.head_count_kv = 2, h.vocab_size = 16, h.rms_norm_eps = 1e-5f, h.rope_freq_base = 500000.0f;
  h.name = "tiny";
  return h;
}

/// A tiny Llama-named model: ternary projections with power-of-two scales (d exact in fp16), float
/// embeddings, norms and lm_head.
struct tiny_model {
  std::map<std::string, BitLinear<float>> layers;
  std::map<std::string, Matrix<float>> floats;

  explicit tiny_model(const gguf::llama_hparams& h) {
    unsigned seed = 11;
    auto add_layer = [&](const std::string& name, Index out, Index in) {
      Matrix<std::int8_t> codes(out, in);
      std::mt19937 rng(seed++);
      for (Index i = 0; i < codes.size(); ++i) codes.data()[i] = std::int8_t(int(rng() % 3) - 1);
      layers.emplace(name, BitLinear<float>::from_ternary(codes, std::ldexp(1.0f, int(seed % 5))));
    };
    const Index hidden = h.embedding_length, ff = h.feed_forward_length, hd = h.head_dim();
    floats.emplace("model.embed_tokens.weight", random_matrix(h.vocab_size, hidden, seed++));
    floats.emplace("model.norm.weight", random_matrix(1, hidden, seed++));
    floats.emplace("lm_head.weight", random_matrix(h.vocab_size, hidden, seed++));
    for (std::uint32_t b = 0; b < h.block_count; ++b) {
      const std::string p = "model.layers." + std::to_string(b) + ".";
      floats.emplace(p + "input_layernorm.weight", random_matrix(hidden, 1, seed++));
      floats.emplace(p + "post_attention_layernorm.weight", random_matrix(1, hidden, seed++));
      add_layer(p + "self_attn.q_proj.weight", h.head_count * hd, hidden);
      add_layer(p + "self_attn.k_proj.weight", h.head_count_kv * hd, hidden);
      add_layer(p + "self_attn.v_proj.weight", h.head_count_kv * hd, hidden);
      add_layer(p + "self_attn.o_proj.weight", hidden, hidden);
      add_layer(p + "mlp.gate_proj.weight", ff, hidden);
      add_layer(p + "mlp.up_proj.weight", ff, hidden);
      add_layer(p + "mlp.down_proj.weight", hidden, ff);
    }
  }

  std::vector<gguf::model_tensor<float>> tensors() const {
    std::vector<gguf::model_tensor<float>> out;
    for (const auto& [name, layer] : layers) out.push_back({name, std::cref(layer)});
    for (const auto& [name, m] : floats) out.push_back({name, std::cref(m)});
    return out;
  }
};

}  // namespace

TEST_CASE("gguf: llama metadata: the keys and types llama.cpp's loader reads") {
  const auto m = gguf::llama_metadata(tiny_llama());
  const std::vector<gguf::metadata_entry> expected{
      {"general.architecture", std::string("llama")},
      {"general.name", std::string("tiny")},
      {"general.quantization_version", std::uint32_t(2)},
      {"llama.context_length", std::uint32_t(128)},
      {"llama.embedding_length", std::uint32_t(256)},
      {"llama.block_count", std::uint32_t(2)},
      {"llama.feed_forward_length", std::uint32_t(512)},
      {"llama.rope.dimension_count", std::uint32_t(64)},
      {"llama.attention.head_count", std::uint32_t(4)},
      {"llama.attention.head_count_kv", std::uint32_t(2)},
      {"llama.attention.layer_norm_rms_epsilon", 1e-5f},
      {"llama.rope.freq_base", 500000.0f},
      {"llama.vocab_size", std::uint32_t(16)}};
  CHECK(m == expected);
  auto bad = tiny_llama();
  bad.head_count_kv = 3;
  CHECK_THROWS_WITH_AS(gguf::llama_metadata(bad), doctest::Contains("head_count 4 is not a multiple of head_count_kv 3"),
                       bitnet::value_error);
  bad = tiny_llama();
  bad.embedding_length = 250;
  CHECK_THROWS_AS(gguf::llama_metadata(bad), bitnet::value_error);
  bad = tiny_llama();
  bad.rms_norm_eps = 0;
  CHECK_THROWS_AS(gguf::llama_metadata(bad), bitnet::value_error);
  bad = tiny_llama();
  bad.block_count = 0;
  CHECK_THROWS_AS(gguf::llama_metadata(bad), bitnet::value_error);
}

TEST_CASE("gguf: a Llama-named model written whole and read back") {
  temp_dir dir;
  const fs::path path = dir.path / "tiny.gguf";
  const gguf::llama_hparams h = tiny_llama();
  const tiny_model model(h);
  gguf::model_options options;
  options.tokenizer = {{"tokenizer.ggml.model", std::string("gpt2")},
                       {"tokenizer.ggml.tokens", gguf::array(std::vector<std::string>(16, "t"))}};
  const auto report = gguf::write_llama_model(path, h, model.tensors(), options);
  REQUIRE(report.size() == 1 + 2 * 9 + 2);
  CHECK(report.front().gguf_name == "token_embd.weight");
  CHECK(report.front().type == tensor_type::F16);
  CHECK(report[2].gguf_name == "blk.0.attn_q.weight");
  CHECK(report[2].source_name == "model.layers.0.self_attn.q_proj.weight");
  CHECK(report[2].ne == std::vector<std::uint64_t>{256, 256});
  REQUIRE(report[2].scale.has_value());
  CHECK(report[2].scale->relative_error() == 0);  // power-of-two scales: d exact in fp16
  CHECK(report.back().gguf_name == "output.weight");

  const gguf::reader file(path);
  CHECK(file.get<std::string>("general.architecture") == "llama");
  CHECK(file.get<std::uint32_t>("llama.attention.head_count_kv") == 2u);
  CHECK(file.get<float>("llama.rope.freq_base") == 500000.0f);
  CHECK(file.get<std::string>("tokenizer.ggml.model") == "gpt2");
  CHECK(file.tensors().size() == report.size());
  const auto& q = model.layers.at("model.layers.1.self_attn.q_proj.weight");
  const auto& k = model.layers.at("model.layers.1.self_attn.k_proj.weight");
  const auto& v = model.layers.at("model.layers.1.self_attn.v_proj.weight");
  const auto& down = model.layers.at("model.layers.1.mlp.down_proj.weight");
  CHECK(file.read_ternary("blk.1.attn_q.weight").codes == gguf::permute_rope_rows(q.ternary_weight(), 4));
  CHECK(file.read_ternary("blk.1.attn_k.weight").codes == gguf::permute_rope_rows(k.ternary_weight(), 2));
  CHECK(file.read_ternary("blk.1.attn_v.weight").codes == v.ternary_weight());
  const BitLinear<float> down_back = file.read_bit_linear<float>("blk.1.ffn_down.weight");
  const Matrix<float> x = random_matrix(3, 512, 99);
  CHECK(down_back.weight_scale() == down.weight_scale());
  CHECK(down_back.forward(x) == down.forward(x));
  CHECK(file.info("blk.0.attn_norm.weight").type == tensor_type::F32);
  CHECK(file.read_matrix<float>("blk.0.attn_norm.weight") ==
        model.floats.at("model.layers.0.input_layernorm.weight").transpose());
  const Matrix<float> embd = file.read_matrix<float>("token_embd.weight");
  const Matrix<float>& embd_source = model.floats.at("model.embed_tokens.weight");
  CHECK(embd.rows() == 16);
  CHECK((embd - embd_source).cwiseAbs().maxCoeff() <= embd_source.cwiseAbs().maxCoeff() * std::ldexp(1.0f, -11));
}

TEST_CASE("gguf: arch bitnet-25: its keys, the two sub-norms per block, q / k rows in source order, I2_S only") {
  temp_dir dir;
  const fs::path path = dir.path / "bitnet.gguf";
  gguf::llama_hparams h = tiny_llama();
  h.arch = gguf::model_arch::bitnet_25;
  tiny_model model(h);
  for (const std::string b : {"0", "1"}) {
    model.floats.emplace("model.layers." + b + ".self_attn.attn_sub_norm.weight", random_matrix(1, 256, 70));
    model.floats.emplace("model.layers." + b + ".mlp.ffn_sub_norm.weight", random_matrix(512, 1, 71));
  }
  const auto m = gguf::llama_metadata(h);
  CHECK(m.front() == gguf::metadata_entry{"general.architecture", std::string("bitnet-25")});
  CHECK(std::count_if(m.begin(), m.end(), [](const auto& e) { return e.key.starts_with("bitnet-25."); }) == 10);
  CHECK(std::none_of(m.begin(), m.end(), [](const auto& e) { return e.key.starts_with("llama."); }));
  CHECK(gguf::llama_tensor_name("model.layers.3.mlp.ffn_sub_norm.weight", h.arch) == "blk.3.ffn_sub_norm.weight");
  CHECK(!gguf::llama_tensor_name("model.layers.3.mlp.ffn_sub_norm.weight"));  // arch llama has no sub-norms

  CHECK_THROWS_WITH_AS(gguf::write_llama_model(path, h, model.tensors()), doctest::Contains("write I2_S"),
                       bitnet::value_error);
  gguf::model_options options;
  options.ternary_type = tensor_type::I2_S;
  auto tensors = model.tensors();
  tensors.erase(std::find_if(tensors.begin(), tensors.end(),
                             [](const auto& t) { return t.name == "model.layers.1.mlp.ffn_sub_norm.weight"; }));
  CHECK_THROWS_WITH_AS(gguf::write_llama_model(path, h, tensors, options),
                       doctest::Contains("no \"blk.1.ffn_sub_norm.weight\" (arch bitnet-25 needs it)"), bitnet::value_error);
  CHECK(!fs::exists(path));

  const auto report = gguf::write_llama_model(path, h, model.tensors(), options);
  REQUIRE(report.size() == 1 + 2 * 11 + 2);
  CHECK(report[5].gguf_name == "blk.0.attn_sub_norm.weight");
  CHECK(report[6].gguf_name == "blk.0.attn_output.weight");
  CHECK(report[10].gguf_name == "blk.0.ffn_sub_norm.weight");
  CHECK(report[11].gguf_name == "blk.0.ffn_down.weight");
  const gguf::reader file(path);
  CHECK(file.get<std::uint32_t>("bitnet-25.attention.head_count_kv") == 2u);
  CHECK(file.read_ternary("blk.1.attn_q.weight").codes ==
        model.layers.at("model.layers.1.self_attn.q_proj.weight").ternary_weight());
  CHECK(file.read_ternary("blk.1.attn_k.weight").codes ==
        model.layers.at("model.layers.1.self_attn.k_proj.weight").ternary_weight());
  CHECK(file.info("blk.1.ffn_sub_norm.weight").ne == std::vector<std::uint64_t>{512});
  CHECK(file.read_matrix<float>("blk.1.ffn_sub_norm.weight") ==
        model.floats.at("model.layers.1.mlp.ffn_sub_norm.weight").transpose());
}

TEST_CASE("gguf: write_llama_model refuses an incomplete or mis-shaped model and writes nothing") {
  temp_dir dir;
  const fs::path path = dir.path / "tiny.gguf";
  const gguf::llama_hparams h = tiny_llama();
  const tiny_model model(h);
  auto without = [&](const std::string& name) {
    auto t = model.tensors();
    t.erase(std::remove_if(t.begin(), t.end(), [&](const auto& x) { return x.name == name; }), t.end());
    return t;
  };
  CHECK_THROWS_WITH_AS(gguf::write_llama_model(path, h, without("model.layers.1.mlp.up_proj.weight")),
                       doctest::Contains("the model has no \"blk.1.ffn_up.weight\""), bitnet::value_error);
  const auto no_output = gguf::write_llama_model(path, h, without("lm_head.weight"));  // tied embeddings
  CHECK(no_output.back().gguf_name == "output_norm.weight");
  CHECK(gguf::reader(path).get<std::string>("tokenizer.ggml.model") == "none");
  fs::remove(path);

  auto extra = model.tensors();
  const Matrix<float> norm = Matrix<float>::Ones(1, 256);
  extra.push_back({"model.layers.2.input_layernorm.weight", std::cref(norm)});
  CHECK_THROWS_WITH_AS(gguf::write_llama_model(path, h, extra), doctest::Contains("block index beyond block_count 2"),
                       bitnet::value_error);
  auto unknown = model.tensors();
  unknown.push_back({"model.layers.0.self_attn.rotary_emb.inv_freq", std::cref(norm)});
  CHECK_THROWS_WITH_AS(gguf::write_llama_model(path, h, unknown), doctest::Contains("not a tensor of arch llama"),
                       bitnet::value_error);
  auto swapped = without("model.layers.0.self_attn.k_proj.weight");
  swapped.push_back({"model.layers.0.self_attn.k_proj.weight", std::cref(model.layers.at("model.layers.0.self_attn.q_proj.weight"))});
  CHECK_THROWS_WITH_AS(gguf::write_llama_model(path, h, swapped), doctest::Contains("is 256x256, expected 128x256"),
                       bitnet::value_error);
  auto float_norm_as_layer = without("model.norm.weight");
  float_norm_as_layer.push_back({"model.norm.weight", std::cref(model.layers.at("model.layers.0.mlp.up_proj.weight"))});
  CHECK_THROWS_WITH_AS(gguf::write_llama_model(path, h, float_norm_as_layer), doctest::Contains("is a BitLinear"),
                       bitnet::value_error);
  gguf::model_options i2s;
  i2s.ternary_type = tensor_type::F16;
  CHECK_THROWS_AS(gguf::write_llama_model(path, h, model.tensors(), i2s), bitnet::value_error);
  CHECK(dir.snapshot().empty());
}
