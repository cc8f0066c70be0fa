#include <bitnet/safetensors.hpp>

#include <algorithm>
#include <bit>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <limits>
#include <map>
#include <random>
#include <string>
#include <vector>

#include <doctest/doctest.h>

using namespace std::string_literals;
namespace st = bitnet::safetensors;
namespace fs = std::filesystem;
using bitnet::Index;
using bitnet::Matrix;
using bitnet::Vector;

namespace {

std::vector<std::byte> bytes_of(std::initializer_list<int> values) {
  std::vector<std::byte> out;
  for (int v : values) out.push_back(std::byte(v));
  return out;
}

/// A file image: 8-byte little-endian length, the header text as given, then `data`.
std::vector<std::byte> file_image(const std::string& header, const std::vector<std::byte>& data = {},
                                  std::uint64_t declared_length = std::numeric_limits<std::uint64_t>::max()) {
  const std::uint64_t length = declared_length == std::numeric_limits<std::uint64_t>::max() ? header.size() : declared_length;
  std::vector<std::byte> out(8);
  for (int i = 0; i < 8; ++i) out[std::size_t(i)] = std::byte((length >> (8 * i)) & 0xff);
  for (char c : header) out.push_back(std::byte(c));
  out.insert(out.end(), data.begin(), data.end());
  return out;
}

std::vector<std::byte> zeros(std::size_t n) { return std::vector<std::byte>(n); }

/// Expects the image to be rejected with an io_error whose message names the file label, the
/// tensor (when given) and contains `rule`.
void check_rejected(const std::vector<std::byte>& image, const std::string& rule, const std::string& tensor = {}) {
  CAPTURE(rule);
  try {
    (void)st::reader::from_bytes(image, "bad.safetensors");
    FAIL("accepted a malformed file");
  } catch (const bitnet::io_error& e) {
    const std::string what = e.what();
    CAPTURE(what);
    CHECK(what.find("bad.safetensors") != std::string::npos);
    CHECK(what.find(rule) != std::string::npos);
    if (!tensor.empty()) CHECK(what.find("tensor \"" + tensor + "\"") != std::string::npos);
  }
}

struct temp_dir {
  fs::path path;
  temp_dir() {
    std::random_device rd;
    path = fs::temp_directory_path() / ("bitnet_st_test_" + std::to_string(rd()) + std::to_string(rd()));
    fs::create_directories(path);
  }
  ~temp_dir() {
    std::error_code ec;
    fs::remove_all(path, ec);
  }
  std::size_t file_count() const {
    std::size_t n = 0;
    for ([[maybe_unused]] const auto& entry : fs::directory_iterator(path)) ++n;
    return n;
  }
};

std::vector<std::byte> read_file(const fs::path& p) {
  std::ifstream in(p, std::ios::binary);
  std::vector<char> chars((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
  std::vector<std::byte> out(chars.size());
  std::memcpy(out.data(), chars.data(), chars.size());
  return out;
}

void write_file(const fs::path& p, const std::vector<std::byte>& bytes) {
  std::ofstream out(p, std::ios::binary);
  out.write(reinterpret_cast<const char*>(bytes.data()), std::streamsize(bytes.size()));
}

}  // namespace

TEST_CASE("safetensors: reads the reference implementation's serialization test vector") {
  // safetensors (Rust) tensor.rs test_serialization: {"attn.0": F32 [1, 2, 3] = 0..5}.
  const auto image = bytes_of({64, 0, 0, 0, 0, 0, 0, 0, 123, 34, 97, 116, 116, 110, 46, 48, 34, 58, 123, 34, 100,
                               116, 121, 112, 101, 34, 58, 34, 70, 51, 50, 34, 44, 34, 115, 104, 97, 112, 101, 34,
                               58, 91, 49, 44, 50, 44, 51, 93, 44, 34, 100, 97, 116, 97, 95, 111, 102, 102, 115,
                               101, 116, 115, 34, 58, 91, 48, 44, 50, 52, 93, 125, 125, 0, 0, 0, 0, 0, 0, 128, 63,
                               0, 0, 0, 64, 0, 0, 64, 64, 0, 0, 128, 64, 0, 0, 160, 64});
  const auto file = st::reader::from_bytes(image);
  REQUIRE(file.tensors().size() == 1);
  const st::tensor_info& t = file.info("attn.0");
  CHECK(t.type == st::dtype::F32);
  CHECK(t.shape == std::vector<std::uint64_t>{1, 2, 3});
  CHECK(file.data_offset() == 72);
  CHECK(file.read_values<float>("attn.0") == std::vector<float>{0, 1, 2, 3, 4, 5});
  CHECK(file.read_values<double>("attn.0") == std::vector<double>{0, 1, 2, 3, 4, 5});
}

TEST_CASE("safetensors: the writer produces the reference implementation's bytes for empty files") {
  temp_dir dir;
  {
    st::writer out(dir.path / "empty.safetensors", {});
    out.finish();
  }
  // tensor.rs test_empty: "{}" padded with six spaces.
  CHECK(read_file(dir.path / "empty.safetensors") == bytes_of({8, 0, 0, 0, 0, 0, 0, 0, 123, 125, 32, 32, 32, 32, 32, 32}));
  {
    st::writer out(dir.path / "meta.safetensors", {}, {{"framework", "pt"}});
    out.finish();
  }
  CHECK(read_file(dir.path / "meta.safetensors") ==
        bytes_of({40, 0,   0,   0,   0,   0,  0,   0,   123, 34,  95,  95,  109, 101, 116, 97, 100,
                  97, 116, 97,  95,  95,  34, 58,  123, 34,  102, 114, 97,  109, 101, 119, 111, 114,
                  107, 34, 58,  34,  112, 116, 34, 125, 125, 32,  32,  32,  32,  32}));
  const st::reader meta(dir.path / "meta.safetensors");
  CHECK(meta.tensors().empty());
  CHECK(meta.metadata().at("framework") == "pt");
}

TEST_CASE("safetensors: the writer's header is what nlohmann::json dumps for the same object") {
  // The writer writes the header text itself (no nlohmann::json tree): it must be the compact,
  // key-sorted JSON that dump() gives, escapes included, with names sorting on both sides of
  // __metadata__ and tensors of several widths (laid out widest first).
  temp_dir dir;
  const std::vector<st::tensor_spec> specs{{"z.weight", st::dtype::F32, {2, 3}},
                                           {"A\"quote\\back\nline", st::dtype::U8, {5}},
                                           {"caf\xc3\xa9.bias", st::dtype::F64, {1}},
                                           {"scalar", st::dtype::BF16, {}},
                                           {"_", st::dtype::I64, {0, 4}}};
  const std::map<std::string, std::string> metadata{{"format", "pt"}, {"tab\there", "\x01" "ctl"}};
  {
    st::writer out(dir.path / "h.safetensors", specs, metadata);
    for (const st::tensor_spec& spec : specs) {
      std::uint64_t count = 1;
      for (const std::uint64_t d : spec.shape) count *= d;
      out.write_bytes(spec.name, std::vector<std::byte>(std::size_t(count * st::dtype_size(spec.type))));
    }
    out.finish();
  }
  nlohmann::json expected = nlohmann::json::object();
  expected["__metadata__"] = metadata;
  const st::reader file(dir.path / "h.safetensors");
  for (const st::tensor_info& t : file.tensors())
    expected[t.name] = {{"dtype", st::dtype_name(t.type)}, {"shape", t.shape}, {"data_offsets", {t.begin, t.end}}};
  std::string text = expected.dump();
  text.append((8 - text.size() % 8) % 8, ' ');
  const std::vector<std::byte> bytes = read_file(dir.path / "h.safetensors");
  REQUIRE(bytes.size() >= 8 + text.size());
  CHECK(std::string(reinterpret_cast<const char*>(bytes.data()) + 8, text.size()) == text);
  CHECK(file.data_offset() == 8 + text.size());
  // Widest first: F64, I64, F32, BF16, U8.
  std::vector<std::string> order;
  for (const st::tensor_info& t : file.tensors()) order.push_back(t.name);
  CHECK(order == std::vector<std::string>{"caf\xc3\xa9.bias", "_", "z.weight", "scalar", "A\"quote\\back\nline"});
  CHECK(std::equal(file.metadata().begin(), file.metadata().end(), metadata.begin(), metadata.end()));
}

TEST_CASE_TEMPLATE("safetensors: round trip of every floating dtype", T, float, double) {
  temp_dir dir;
  // Values exactly representable in every format written (F16 has the narrowest range).
  Matrix<T> m(3, 5);
  m << 0, -0.5, 1, 2.25, -3, 65504, -65504, 0.099609375, 1.0 / 1024, -1.0 / 16384, std::ldexp(1.0, -24),
      -std::ldexp(1.0, -14), 7, 8, 1024;
  const fs::path path = dir.path / "floats.safetensors";
  {
    st::writer out(path, {{"f64", st::dtype::F64, {3, 5}}, {"f32", st::dtype::F32, {3, 5}},
                          {"f16", st::dtype::F16, {3, 5}}, {"bf16", st::dtype::BF16, {3, 5}}});
    for (const char* name : {"f64", "f32", "f16", "bf16"}) out.write(name, m);
    out.finish();
  }
  const st::reader in(path);
  // BF16 keeps 8 significant bits: the values above that need more are rounded to nearest even.
  Matrix<T> bf16_expected = m;
  bf16_expected(1, 0) = 65536;   // 65504 = 0xffe0 -> 1.1111111111b x 2^15 rounds up to 2^16
  bf16_expected(1, 1) = -65536;
  bf16_expected(1, 2) = T(0.099609375);  // 0.099609375 = 0x3dcc0000, already 8 bits
  for (const char* name : {"f64", "f32", "f16"}) {
    CAPTURE(name);
    CHECK(in.read_matrix<T>(name) == m);
  }
  CHECK(in.read_matrix<T>("bf16") == bf16_expected);
  // Every element is 8-byte aligned within the file for F64, 4 for F32, 2 for F16/BF16.
  for (const st::tensor_info& t : in.tensors()) CHECK((in.data_offset() + t.begin) % st::dtype_size(t.type) == 0);
  CHECK(in.data_offset() % 8 == 0);
}

TEST_CASE("safetensors: F16 and BF16 encoding rounds to nearest even, exactly") {
  temp_dir dir;
  const fs::path path = dir.path / "rounding.safetensors";
  // 1 + 2^-11 is halfway between 1 and 1 + 2^-10 in F16: ties to even -> 1.
  // 1 + 3 * 2^-11 is halfway between 1 + 2^-10 and 1 + 2^-9: ties to even -> 1 + 2^-9.
  // 1 + 2^-11 + 2^-30 is just above the tie -> 1 + 2^-10 (a double-rounding trap via float).
  const std::vector<double> values{1 + std::ldexp(1.0, -11), 1 + 3 * std::ldexp(1.0, -11),
                                   1 + std::ldexp(1.0, -11) + std::ldexp(1.0, -30), std::ldexp(1.0, -25),
                                   std::ldexp(3.0, -26)};
  {
    st::writer out(path, {{"h", st::dtype::F16, {5}}, {"b", st::dtype::BF16, {5}}});
    out.write_values<double>("h", values);
    out.write_values<double>("b", values);
    out.finish();
  }
  const st::reader in(path);
  const auto raw = in.read_bytes("h");
  auto half = [&](std::size_t i) { return std::uint16_t(std::uint16_t(raw[2 * i]) | std::uint16_t(raw[2 * i + 1]) << 8); };
  CHECK(half(0) == 0x3c00);
  CHECK(half(1) == 0x3c02);
  CHECK(half(2) == 0x3c01);
  CHECK(half(3) == 0x0000);  // 2^-25 is the tie between 0 and the smallest subnormal 2^-24: even -> 0
  CHECK(half(4) == 0x0001);  // 1.5 * 2^-25 is above the tie -> 2^-24
  const auto b = in.read_values<double>("b");
  CHECK(b[0] == 1.0);  // BF16 step at 1 is 2^-7: all three are below the first tie
  CHECK(b[1] == 1.0);
  CHECK(b[2] == 1.0);
  CHECK(b[3] == std::ldexp(1.0, -25));
  CHECK(b[4] == std::ldexp(3.0, -26));
}

TEST_CASE("safetensors: every F16 bit pattern decodes to its IEEE value; F16 and BF16 patterns re-encode to themselves") {
  for (std::uint32_t bits = 0; bits < 65536; ++bits) {
    const auto h = std::uint16_t(bits);
    const float got = bitnet::detail::half_to_float(h);
    // Independent formula: (-1)^s * 2^(e-15) * (1 + m/1024), subnormals 2^-14 * m/1024.
    const int e = (h >> 10) & 31, mant = h & 1023;
    const double sign = (h & 0x8000) ? -1.0 : 1.0;
    if (e == 31) {
      CHECK((mant ? std::isnan(got) : std::isinf(got)));
      continue;
    }
    const double expected = e == 0 ? sign * std::ldexp(double(mant), -24) : sign * std::ldexp(1024.0 + mant, e - 25);
    REQUIRE(double(got) == expected);
    REQUIRE(std::signbit(got) == bool(h & 0x8000));
    // Encoding the decoded value gives back the same bits.
    REQUIRE(bitnet::detail::encode_half(*bitnet::detail::round_to_format(double(got), bitnet::detail::binary16)) == h);
    const float bf = bitnet::detail::bfloat16_to_float(h);
    if (!std::isnan(bf))
      REQUIRE(bitnet::detail::encode_bfloat16(*bitnet::detail::round_to_format(double(bf), bitnet::detail::bfloat16)) == h);
  }
}

TEST_CASE("safetensors: round trip of every integer dtype, with range checks") {
  temp_dir dir;
  const fs::path path = dir.path / "ints.safetensors";
  const std::vector<std::int64_t> small{0, 1, -1, 127, -128};
  const std::vector<std::int64_t> wide{0, std::numeric_limits<std::int64_t>::min(), std::numeric_limits<std::int64_t>::max(), 42};
  const std::vector<std::uint64_t> unsigned_wide{0, std::numeric_limits<std::uint64_t>::max(), 7};
  const std::vector<std::uint8_t> bytes{0, 1, 200, 255};
  const std::vector<std::int32_t> ints{std::numeric_limits<std::int32_t>::min(), -5, 70000, std::numeric_limits<std::int32_t>::max()};
  const std::vector<std::int16_t> shorts{-32768, 32767};
  const std::vector<std::uint16_t> ushorts{0, 65535};
  const std::vector<std::uint32_t> uints{0, 4294967295u};
  const std::vector<std::int8_t> flags{0, 1, 1};
  {
    st::writer out(path, {{"i8", st::dtype::I8, {5}},   {"i64", st::dtype::I64, {4}}, {"u64", st::dtype::U64, {3}},
                          {"u8", st::dtype::U8, {2, 2}}, {"i32", st::dtype::I32, {4}}, {"i16", st::dtype::I16, {2}},
                          {"u16", st::dtype::U16, {2}},  {"u32", st::dtype::U32, {2}}, {"bool", st::dtype::BOOL, {3}}});
    out.write_values<std::int64_t>("i8", small);
    out.write_values<std::int64_t>("i64", wide);
    out.write_values<std::uint64_t>("u64", unsigned_wide);
    out.write_values<std::uint8_t>("u8", bytes);
    out.write_values<std::int32_t>("i32", ints);
    out.write_values<std::int16_t>("i16", shorts);
    out.write_values<std::uint16_t>("u16", ushorts);
    out.write_values<std::uint32_t>("u32", uints);
    out.write_values<std::int8_t>("bool", flags);
    out.finish();
  }
  const st::reader in(path);
  CHECK(in.read_values<std::int8_t>("i8") == std::vector<std::int8_t>{0, 1, -1, 127, -128});
  CHECK(in.read_values<std::int64_t>("i64") == wide);
  CHECK(in.read_values<std::uint64_t>("u64") == unsigned_wide);
  CHECK(in.read_matrix<std::uint8_t>("u8") == (Matrix<std::uint8_t>(2, 2) << 0, 1, 200, 255).finished());
  CHECK(in.read_values<std::int32_t>("i32") == ints);
  CHECK(in.read_values<std::int16_t>("i16") == shorts);
  CHECK(in.read_values<std::uint16_t>("u16") == ushorts);
  CHECK(in.read_values<std::uint32_t>("u32") == uints);
  CHECK(in.read_values<std::int8_t>("bool") == flags);
  CHECK(in.read_values<double>("i32") == std::vector<double>{-2147483648.0, -5, 70000, 2147483647.0});
  CHECK(in.read_values<float>("bool") == std::vector<float>{0, 1, 1});
  // Values that do not fit the requested type are reported, never wrapped.
  CHECK_THROWS_AS(in.read_values<std::int8_t>("u8"), bitnet::value_error);
  CHECK_THROWS_AS(in.read_values<std::uint32_t>("i32"), bitnet::value_error);
  CHECK_THROWS_AS(in.read_values<std::int64_t>("u64"), bitnet::value_error);
  // A floating dtype is not silently truncated into integers.
  temp_dir other;
  {
    st::writer out(other.path / "f.safetensors", {{"w", st::dtype::F32, {1}}});
    out.write_values<float>("w", std::vector<float>{1.5f});
    out.finish();
  }
  CHECK_THROWS_AS(st::reader(other.path / "f.safetensors").read_values<std::int32_t>("w"), bitnet::io_error);
}

TEST_CASE("safetensors: F8 dtypes decode exactly") {
  // F8_E4M3 (fn): 0x38 = 1.0, 0x7e = 448 (largest), 0x01 = 2^-9 (smallest subnormal), 0xff = NaN.
  // F8_E5M2: 0x3c = 1.0, 0x7b = 57344, 0x01 = 2^-16, 0x7c = inf.
  const std::string header =
      R"({"a":{"dtype":"F8_E4M3","shape":[4],"data_offsets":[0,4]},"b":{"dtype":"F8_E5M2","shape":[4],"data_offsets":[4,8]}})";
  const auto file = st::reader::from_bytes(file_image(header, bytes_of({0x38, 0x7e, 0x01, 0xff, 0x3c, 0x7b, 0x01, 0x7c})));
  const auto a = file.read_values<double>("a");
  CHECK(a[0] == 1.0);
  CHECK(a[1] == 448.0);
  CHECK(a[2] == std::ldexp(1.0, -9));
  CHECK(std::isnan(a[3]));
  const auto b = file.read_values<float>("b");
  CHECK(b[0] == 1.0f);
  CHECK(b[1] == 57344.0f);
  CHECK(b[2] == std::ldexp(1.0f, -16));
  CHECK(std::isinf(b[3]));
}

TEST_CASE("safetensors: F64 into float rounds, and reports values beyond float's range") {
  temp_dir dir;
  const fs::path path = dir.path / "f64.safetensors";
  {
    st::writer out(path, {{"ok", st::dtype::F64, {2}}, {"big", st::dtype::F64, {1}}});
    out.write_values<double>("ok", std::vector<double>{0.1, 1 + std::ldexp(1.0, -24)});
    out.write_values<double>("big", std::vector<double>{1e39});
    out.finish();
  }
  const st::reader in(path);
  CHECK(in.read_values<float>("ok") == std::vector<float>{0.1f, 1.0f});  // 1 + 2^-24 is a tie -> even 1
  CHECK_THROWS_AS(in.read_values<float>("big"), bitnet::value_error);
  CHECK(in.read_values<double>("big")[0] == 1e39);
}

TEST_CASE("safetensors: every validation rule rejects its handcrafted bad file") {
  const std::string ok_entry = R"("t":{"dtype":"F32","shape":[2],"data_offsets":[0,8]})";
  SUBCASE("a valid file of the same family is accepted") {
    CHECK(st::reader::from_bytes(file_image("{" + ok_entry + "}", zeros(8))).tensors().size() == 1);
  }
  SUBCASE("file shorter than 8 bytes") { check_rejected(bytes_of({1, 0, 0}), "fewer than the 8-byte header length"); }
  SUBCASE("header length over 100,000,000") {
    check_rejected(file_image("{}", {}, 100'000'001), "exceeds the limit of 100000000 bytes");
  }
  SUBCASE("header length past the end of the file") { check_rejected(file_image("{}", {}, 3), "runs past the end"); }
  SUBCASE("header length of 2^64 - 2 (no overflow in the bound check)") {
    check_rejected(file_image("{}", {}, std::numeric_limits<std::uint64_t>::max() - 1), "exceeds the limit");
  }
  SUBCASE("invalid UTF-8") {
    check_rejected(file_image("{\"\xc3\x28\":1}"), "not valid UTF-8");
    check_rejected(file_image("{\"\xed\xa0\x80\":1}"), "not valid UTF-8");  // a surrogate
    check_rejected(file_image("{\"\xc0\xaf\":1}"), "not valid UTF-8");      // an overlong '/'
  }
  SUBCASE("header not starting with '{'") { check_rejected(file_image(" {}"), "does not start with '{'"); }
  SUBCASE("empty header") { check_rejected(file_image(""), "does not start with '{'"); }
  SUBCASE("invalid JSON") {
    check_rejected(file_image("{\"t\":"), "not valid JSON");
    check_rejected(file_image("{} x"), "not valid JSON");
    check_rejected(file_image("{}\0\0"s), "not valid JSON");
  }
  SUBCASE("duplicate tensor name") {
    check_rejected(file_image("{" + ok_entry + "," + ok_entry + "}", zeros(8)), "repeats the key", "t");
  }
  SUBCASE("duplicate field inside an entry") {
    check_rejected(file_image(R"({"t":{"dtype":"F32","dtype":"F32","shape":[2],"data_offsets":[0,8]}})", zeros(8)),
                   "repeats the key", "dtype");
  }
  SUBCASE("entry is not an object") { check_rejected(file_image(R"({"t":[1]})"), "not a JSON object", "t"); }
  SUBCASE("unknown field") {
    check_rejected(file_image(R"({"t":{"dtype":"F32","shape":[2],"data_offsets":[0,8],"x":1}})", zeros(8)),
                   "unknown field \"x\"", "t");
  }
  SUBCASE("missing field") {
    check_rejected(file_image(R"({"t":{"dtype":"F32","shape":[2]}})"), "missing field \"data_offsets\"", "t");
  }
  SUBCASE("dtype not a string") {
    check_rejected(file_image(R"({"t":{"dtype":4,"shape":[1],"data_offsets":[0,4]}})", zeros(4)), "dtype is not a string", "t");
  }
  SUBCASE("unknown dtype") {
    check_rejected(file_image(R"({"t":{"dtype":"F31","shape":[1],"data_offsets":[0,4]}})", zeros(4)), "unknown dtype \"F31\"", "t");
    check_rejected(file_image(R"({"t":{"dtype":"f32","shape":[1],"data_offsets":[0,4]}})", zeros(4)), "unknown dtype", "t");
  }
  SUBCASE("shape not an array of non-negative integers") {
    check_rejected(file_image(R"({"t":{"dtype":"F32","shape":2,"data_offsets":[0,8]}})", zeros(8)), "shape is not an array", "t");
    check_rejected(file_image(R"({"t":{"dtype":"F32","shape":[-2],"data_offsets":[0,8]}})", zeros(8)), "not a non-negative integer", "t");
    check_rejected(file_image(R"({"t":{"dtype":"F32","shape":[2.0],"data_offsets":[0,8]}})", zeros(8)), "not a non-negative integer", "t");
    check_rejected(file_image(R"({"t":{"dtype":"F32","shape":[18446744073709551616],"data_offsets":[0,8]}})", zeros(8)),
                   "not a non-negative integer", "t");
  }
  SUBCASE("data_offsets malformed") {
    check_rejected(file_image(R"({"t":{"dtype":"F32","shape":[2],"data_offsets":[0]}})", zeros(8)), "not an array of two integers", "t");
    check_rejected(file_image(R"({"t":{"dtype":"F32","shape":[2],"data_offsets":[0,8,8]}})", zeros(8)), "not an array of two integers", "t");
    check_rejected(file_image(R"({"t":{"dtype":"F32","shape":[2],"data_offsets":[-8,0]}})", zeros(8)), "not a non-negative integer", "t");
    check_rejected(file_image(R"({"t":{"dtype":"F32","shape":[2],"data_offsets":"0,8"}})", zeros(8)), "not an array of two integers", "t");
  }
  SUBCASE("end before begin") {
    check_rejected(file_image(R"({"t":{"dtype":"F32","shape":[0],"data_offsets":[8,0]}})", zeros(8)), "is before begin", "t");
  }
  SUBCASE("shape product overflows") {
    check_rejected(file_image(R"({"t":{"dtype":"F32","shape":[4294967296,4294967296],"data_offsets":[0,0]}})"),
                   "overflows 64 bits", "t");
  }
  SUBCASE("shape x dtype size overflows") {
    check_rejected(file_image(R"({"t":{"dtype":"F64","shape":[2305843009213693952],"data_offsets":[0,0]}})"),
                   "overflows 64 bits", "t");
  }
  SUBCASE("end - begin differs from shape x dtype size") {
    check_rejected(file_image(R"({"t":{"dtype":"F32","shape":[3],"data_offsets":[0,8]}})", zeros(8)), "needs 12", "t");
  }
  SUBCASE("gap before a tensor") {
    check_rejected(file_image(R"({"t":{"dtype":"F32","shape":[2],"data_offsets":[4,12]}})", zeros(12)), "gap of 4 bytes", "t");
  }
  SUBCASE("overlapping tensors") {
    check_rejected(file_image(R"({"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]},)"
                              R"("b":{"dtype":"F32","shape":[1],"data_offsets":[4,8]}})", zeros(8)),
                   "overlap tensor \"a\"", "b");
  }
  SUBCASE("tensor past the end of the data (missing bytes)") {
    check_rejected(file_image("{" + ok_entry + "}", zeros(4)), "missing bytes", "t");
  }
  SUBCASE("trailing bytes") { check_rejected(file_image("{" + ok_entry + "}", zeros(9)), "1 trailing bytes"); }
  SUBCASE("trailing bytes with no tensor at all") { check_rejected(file_image("{}", zeros(1)), "trailing bytes"); }
  SUBCASE("__metadata__ not an object") { check_rejected(file_image(R"({"__metadata__":"x"})"), "__metadata__ is not a JSON object"); }
  SUBCASE("__metadata__ value not a string") {
    check_rejected(file_image(R"({"__metadata__":{"format":"pt","n":1}})"), "__metadata__ value of \"n\" is not a string");
  }
  SUBCASE("a huge claimed tensor in a tiny file allocates nothing") {
    // 2^40 bytes declared, 8 present: rejected from the header alone.
    check_rejected(file_image(R"({"t":{"dtype":"U8","shape":[1099511627776],"data_offsets":[0,1099511627776]}})", zeros(8)),
                   "missing bytes", "t");
  }
}

TEST_CASE("safetensors: the header parser - nesting, rule order, messages") {
  // Values the rules ignore may nest arbitrarily deep (no recursion, no tree is built).
  const std::string deep = std::string(100000, '[') + std::string(100000, ']');
  check_rejected(file_image(R"({"t":)" + deep + "}"), "not a JSON object", "t");
  check_rejected(file_image(R"({"t":{"dtype":"F32","shape":[2],"data_offsets":[0,8],"x":)" + deep + "}}", zeros(8)),
                 "unknown field \"x\"", "t");
  check_rejected(file_image(R"({"__metadata__":{"k":)" + deep + "}}"), "__metadata__ value of \"k\" is not a string");
  // Nested shape elements and duplicate keys at any depth.
  check_rejected(file_image(R"({"t":{"dtype":"F32","shape":[[2]],"data_offsets":[0,8]}})", zeros(8)),
                 "shape holds an array, not a non-negative integer", "t");
  check_rejected(file_image(R"({"t":{"dtype":"F32","shape":[2,"2"],"data_offsets":[0,8]}})", zeros(8)),
                 "shape holds \"2\", not a non-negative integer", "t");
  check_rejected(file_image(R"({"t":{"dtype":"F32","shape":[2],"data_offsets":[0,8],"x":[{"a":1,"a":2}]}})", zeros(8)),
                 "repeats the key", "a");
  // A syntax error anywhere comes first, then a repeated key, then the entries in key order with
  // __metadata__ among them.
  check_rejected(file_image(R"({"t":[1],"t":2,"u":})"), "not valid JSON");
  check_rejected(file_image(R"({"t":[1],"b":{"dtype":"F32","dtype":"F32"}})"), "repeats the key", "dtype");
  check_rejected(file_image(R"({"b":1,"a":{"dtype":"F31","shape":[1],"data_offsets":[0,4]}})", zeros(4)),
                 "unknown dtype \"F31\"", "a");
  check_rejected(file_image(R"({"b":1,"__metadata__":2})"), "__metadata__ is not a JSON object");
  check_rejected(file_image(R"({"A":1,"__metadata__":2})"), "not a JSON object", "A");
  // Within an entry the rules keep their order whatever the field order.
  check_rejected(file_image(R"({"t":{"data_offsets":[0],"shape":[-1],"dtype":4}})"), "dtype is not a string", "t");
  check_rejected(file_image(R"({"t":{"data_offsets":[0],"shape":[-1],"dtype":"F32"}})"), "shape holds -1", "t");
}

TEST_CASE("safetensors: reader API - lookup, metadata, zero-size tensors, errors naming the tensor") {
  const std::string header =
      R"({"__metadata__":{"format":"pt"},"b":{"dtype":"I8","shape":[0,3],"data_offsets":[4,4]},)"
      R"("a":{"dtype":"U8","shape":[2,2],"data_offsets":[0,4]},"s":{"dtype":"U8","shape":[],"data_offsets":[4,5]}})";
  const auto file = st::reader::from_bytes(file_image(header, bytes_of({1, 2, 3, 4, 9})), "api.safetensors");
  REQUIRE(file.tensors().size() == 3);
  CHECK(file.tensors()[0].name == "a");  // data order
  CHECK(file.metadata().at("format") == "pt");
  CHECK(file.contains("b"));
  CHECK_FALSE(file.contains("c"));
  CHECK(file.find("c") == nullptr);
  CHECK(file.read_matrix<float>("b").rows() == 0);
  CHECK(file.read_matrix<float>("b").cols() == 3);
  CHECK(file.read_values<int>("s") == std::vector<int>{9});
  CHECK(file.read_matrix<double>("a") == (Matrix<double>(2, 2) << 1, 2, 3, 4).finished());
  CHECK_THROWS_WITH_AS(file.info("c"), doctest::Contains("api.safetensors: tensor \"c\": no such tensor"), bitnet::io_error);
  CHECK_THROWS_AS(file.read_vector<float>("a"), bitnet::shape_error);
  CHECK_THROWS_AS(file.read_matrix<float>("s"), bitnet::shape_error);
  CHECK_THROWS_AS(st::reader("/nonexistent/bitnet.safetensors"), bitnet::io_error);
}

TEST_CASE("safetensors: the writer replaces a file whole or not at all") {
  temp_dir dir;
  const fs::path path = dir.path / "model.safetensors";
  const std::vector<std::byte> original = bytes_of({1, 2, 3});
  write_file(path, original);
  SUBCASE("a value that does not fit the dtype: error, original kept, no temporary left") {
    {
      st::writer out(path, {{"w", st::dtype::F16, {2}}});
      CHECK_THROWS_WITH_AS(out.write_values<float>("w", std::vector<float>{1.0f, 1e6f}),
                           doctest::Contains("element 1"), bitnet::value_error);
    }
    CHECK(read_file(path) == original);
    CHECK(dir.file_count() == 1);
  }
  SUBCASE("a tensor never written: finish() refuses, original kept") {
    {
      st::writer out(path, {{"a", st::dtype::F32, {1}}, {"b", st::dtype::F32, {1}}});
      out.write_values<float>("a", std::vector<float>{1.0f});
      CHECK_THROWS_WITH_AS(out.finish(), doctest::Contains("\"b\": declared but never written"), bitnet::io_error);
    }
    CHECK(read_file(path) == original);
    CHECK(dir.file_count() == 1);
  }
  SUBCASE("misuse is reported") {
    st::writer out(path, {{"a", st::dtype::F32, {2, 2}}});
    CHECK_THROWS_AS(out.write_values<float>("zzz", std::vector<float>{1.0f}), bitnet::io_error);
    CHECK_THROWS_AS(out.write_values<float>("a", std::vector<float>{1.0f}), bitnet::shape_error);
    CHECK_THROWS_AS(out.write("a", Matrix<float>::Zero(1, 4)), bitnet::shape_error);
    CHECK_THROWS_AS(out.write("a", Matrix<std::int32_t>::Zero(2, 2)), bitnet::value_error);  // ints into F32
    out.write("a", Matrix<float>::Ones(2, 2));
    CHECK_THROWS_AS(out.write("a", Matrix<float>::Ones(2, 2)), bitnet::io_error);  // twice
    out.finish();
    CHECK(st::reader(path).read_matrix<float>("a") == Matrix<float>::Ones(2, 2));
  }
  SUBCASE("bad declarations") {
    CHECK_THROWS_AS(st::writer(path, {{"a", st::dtype::F32, {1}}, {"a", st::dtype::F32, {1}}}), bitnet::value_error);
    CHECK_THROWS_AS(st::writer(path, {{"__metadata__", st::dtype::F32, {1}}}), bitnet::value_error);
    CHECK_THROWS_AS(st::writer(path, {{"\xff", st::dtype::F32, {1}}}), bitnet::value_error);
    CHECK_THROWS_AS(st::writer(path, {{"a", st::dtype::F64, {1ull << 62, 4}}}), bitnet::value_error);
    CHECK_THROWS_AS(st::writer(dir.path / "no_such_folder" / "m.safetensors", {}), bitnet::io_error);
    CHECK(read_file(path) == original);
    CHECK(dir.file_count() == 1);
  }
  SUBCASE("success replaces the file, tensors written in any order") {
    Matrix<float> a(2, 3);
    a << 1, 2, 3, 4, 5, 6;
    Vector<double> b(2);
    b << -1, 0.5;
    {
      st::writer out(path, {{"a", st::dtype::BF16, {2, 3}}, {"b", st::dtype::F64, {2}}, {"c", st::dtype::U8, {0}}});
      out.write("b", b);
      out.write_values<std::uint8_t>("c", {});
      out.write("a", a);
      out.finish();
    }
    CHECK(dir.file_count() == 1);
    const st::reader in(path);
    CHECK(in.read_matrix<float>("a") == a);
    CHECK(in.read_vector<double>("b") == b);
    CHECK(in.info("b").begin == 0);  // the 8-byte dtype first keeps alignment
    CHECK(in.file_size() == in.data_offset() + 16 + 12);
  }
}

TEST_CASE("safetensors: write() takes Eigen expressions, in C order") {
  temp_dir dir;
  Matrix<double> m(2, 3);
  m << 1, 2, 3, 4, 5, 6;
  const Eigen::Matrix<double, 3, 2> column_major = m.transpose();
  {
    st::writer out(dir.path / "e.safetensors", {{"t", st::dtype::F32, {3, 2}}, {"c", st::dtype::F64, {3, 2}},
                                                {"row", st::dtype::F64, {3}}, {"block", st::dtype::F16, {2, 2}}});
    out.write("t", m.transpose());
    out.write("c", column_major);
    out.write("row", m.row(1));
    out.write("block", m.block(0, 1, 2, 2));
    out.finish();
  }
  const st::reader in(dir.path / "e.safetensors");
  CHECK(in.read_values<double>("t") == std::vector<double>{1, 4, 2, 5, 3, 6});
  CHECK(in.read_values<double>("c") == std::vector<double>{1, 4, 2, 5, 3, 6});
  CHECK(in.read_values<double>("row") == std::vector<double>{4, 5, 6});
  CHECK(in.read_values<double>("block") == std::vector<double>{2, 3, 5, 6});
}

TEST_CASE("safetensors: copy_tensor streams a tensor from another file, partial reads are bounded") {
  temp_dir dir;
  std::vector<std::uint16_t> values(3 << 19);  // 3 MiB of U16: three chunks
  for (std::size_t i = 0; i < values.size(); ++i) values[i] = std::uint16_t(i * 2654435761u >> 7);
  {
    st::writer out(dir.path / "a.safetensors", {{"v", st::dtype::U16, {3, 1 << 19}}});
    out.write_values<std::uint16_t>("v", values);
    out.finish();
  }
  const st::reader a(dir.path / "a.safetensors");
  {
    st::writer out(dir.path / "b.safetensors", {{"copy", st::dtype::U16, {3, 1 << 19}}, {"bad", st::dtype::U8, {1}}});
    CHECK_THROWS_AS(out.copy_tensor("bad", a, "v"), bitnet::shape_error);
    out.copy_tensor("copy", a, "v");
    out.write_values<std::uint8_t>("bad", std::vector<std::uint8_t>{1});
    out.finish();
  }
  CHECK(st::reader(dir.path / "b.safetensors").read_values<std::uint16_t>("copy") == values);
  std::vector<std::byte> two(2);
  a.read_bytes("v", 2 * 5, two);
  CHECK(std::uint16_t(std::uint16_t(two[0]) | std::uint16_t(two[1]) << 8) == values[5]);
  CHECK_THROWS_AS(a.read_bytes("v", a.info("v").byte_size() - 1, two), bitnet::shape_error);
}

TEST_CASE("safetensors: large random round trip through the chunked reader and writer") {
  temp_dir dir;
  const fs::path path = dir.path / "big.safetensors";
  std::mt19937 rng(5);
  std::normal_distribution<float> dist(0.0f, 1.0f);
  Matrix<float> m(700, 1031);  // > 1 MiB of F32 and of BF16: several chunks, a ragged last one
  for (Index i = 0; i < m.size(); ++i) m.data()[i] = dist(rng);
  {
    st::writer out(path, {{"f32", st::dtype::F32, {700, 1031}}, {"bf16", st::dtype::BF16, {700, 1031}}});
    out.write("f32", m);
    out.write("bf16", m);
    out.finish();
  }
  const st::reader in(path);
  CHECK(in.read_matrix<float>("f32") == m);
  const Matrix<float> bf = in.read_matrix<float>("bf16");
  for (Index i = 0; i < m.size(); ++i) {
    // Independent RNE to 8 significant bits through the integer representation.
    std::uint32_t bits = std::bit_cast<std::uint32_t>(m.data()[i]);
    bits += 0x7fff + ((bits >> 16) & 1);
    REQUIRE(bf.data()[i] == std::bit_cast<float>(bits & 0xffff0000u));
  }
}
