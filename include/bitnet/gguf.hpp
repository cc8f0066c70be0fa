// bitnet/gguf.hpp - read and write GGUF v3 files (ggml's model format, read by llama.cpp,
// ik_llama.cpp and bitnet.cpp), and the ternary formats TQ2_0, TQ1_0, Q2_0, PQ2_0, PTQ1_0 and I2_S.
//
//   "GGUF", u32 version (3), u64 tensor count, u64 key-value count
//   key-value pairs:  string key, u32 value type, value (strings: u64 length + bytes; arrays:
//                     u32 element type, u64 count, elements)
//   tensor infos:     string name, u32 dims, u64 ne[dims] (ne[0] is the row length), u32 ggml type,
//                     u64 offset into the data section
//   padding to general.alignment (u32 key, default 32), then the data section
//
// The reader validates the whole header when it opens a file: every count, length, size, offset,
// dimension and type id is checked before it is used, and every rejection is a bitnet::io_error
// "gguf: FILE: [key "K" | tensor "T":] RULE" (docs/gguf.md lists the rules). Tensor data is read on
// demand. The writer declares the metadata and tensors up front, writes each tensor when it has it,
// and renames a temporary file into place in finish(), as the safetensors writer does.
//
// Ternary weights: a BitLinear computes y = (xq . codes^T) / (sx * sw); ggml stores weights as
// code * d. So d = 1 / sw: TQ2_0 / TQ1_0 keep one fp16 d per 256 weights (rounded: relative error
// at most 2^-11), I2_S one float32 d per tensor (chosen so that 1/d rounds back to sw exactly when
// such a float exists). The codes are always exact. Block formats whose blocks carry different d
// (Q2_0: 64 weights, PQ2_0 / PTQ1_0: 128, TQ2_0 / TQ1_0: 256) are group-scaled tensors: codes and
// one magnitude d per row and block (ternary_tensor_groups), exact both ways. A Hadamard rotation
// the file declares (prism.hadamard.*) is validated on open and refused by key when not understood;
// read_bit_linear gives a declared-rotated tensor's layer that rotation, and the writer declares
// (hadamard_metadata) and checks the rotations of the layers it writes.
// Needs only the core target (no JSON).
#pragma once

#include <algorithm>
#include <array>
#include <bit>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <functional>
#include <limits>
#include <map>
#include <memory>
#include <optional>
#include <set>
#include <span>
#include <string>
#include <string_view>
#include <type_traits>
#include <utility>
#include <variant>
#include <vector>

#include "bit_linear.hpp"
#include "detail/file_io.hpp"
#include "detail/float_formats.hpp"
#include "detail/validate.hpp"
#include "errors.hpp"
#include "matrix.hpp"
#include "rotation.hpp"

namespace bitnet::gguf {

inline constexpr std::uint32_t format_version = 3;
inline constexpr std::uint32_t default_alignment = 32;
/// ggml keeps names in char[64] with the terminating NUL: longer names are refused by its reader.
inline constexpr std::size_t max_tensor_name_length = 63;
inline constexpr std::size_t max_dimensions = 4;
/// Arrays of arrays deeper than this are refused (the format allows nesting; ggml reads none).
inline constexpr int max_array_depth = 8;

// ---------------------------------------------------------------------------------------------
// Metadata values

/// The value types of the key-value section, with their ids in the file.
enum class value_type : std::uint32_t {
  uint8 = 0, int8 = 1, uint16 = 2, int16 = 3, uint32 = 4, int32 = 5, float32 = 6, boolean = 7,
  string = 8, array = 9, uint64 = 10, int64 = 11, float64 = 12
};
inline constexpr std::uint32_t value_type_count = 13;

constexpr std::string_view value_type_name(value_type type) noexcept {
  constexpr std::array<std::string_view, value_type_count> names{
      "UINT8", "INT8", "UINT16", "INT16", "UINT32", "INT32", "FLOAT32", "BOOL", "STRING", "ARRAY", "UINT64", "INT64", "FLOAT64"};
  const auto i = static_cast<std::uint32_t>(type);
  return i < value_type_count ? names[i] : std::string_view("unknown");
}

struct array;

/// The elements of an array, one std::vector per element type; the alternative's index is the
/// element type's id (vector<array> for arrays of arrays).
using array_items =
    std::variant<std::vector<std::uint8_t>, std::vector<std::int8_t>, std::vector<std::uint16_t>,
                 std::vector<std::int16_t>, std::vector<std::uint32_t>, std::vector<std::int32_t>, std::vector<float>,
                 std::vector<bool>, std::vector<std::string>, std::vector<array>, std::vector<std::uint64_t>,
                 std::vector<std::int64_t>, std::vector<double>>;

/// A typed array value.
struct array {
  array_items items;

  array() = default;
  template <class T>
  explicit array(std::vector<T> elements) : items(std::move(elements)) {}

  value_type element_type() const noexcept { return static_cast<value_type>(items.index()); }
  std::size_t size() const noexcept {
    return std::visit([](const auto& v) { return v.size(); }, items);
  }
  friend bool operator==(const array&, const array&) = default;
};

using value_data = std::variant<std::uint8_t, std::int8_t, std::uint16_t, std::int16_t, std::uint32_t, std::int32_t,
                                float, bool, std::string, array, std::uint64_t, std::int64_t, double>;

/// One metadata value; the alternative's index is the value type's id.
struct value {
  value_data data;

  value() = default;
  template <class T>
    requires(!std::is_same_v<std::remove_cvref_t<T>, value> && std::is_constructible_v<value_data, T>)
  value(T&& v) : data(std::forward<T>(v)) {}  // NOLINT: implicit, so metadata reads as {"key", 3u}

  value_type type() const noexcept { return static_cast<value_type>(data.index()); }
  friend bool operator==(const value&, const value&) = default;
};

/// One key-value pair, in file order.
struct metadata_entry {
  std::string key;
  value val;
  friend bool operator==(const metadata_entry&, const metadata_entry&) = default;
};

// ---------------------------------------------------------------------------------------------
// Tensor types

/// ggml's tensor types with their ids in the file (ggml.h; I2_S = 36 is bitnet.cpp's and
/// ik_llama.cpp's, an id mainline ggml retired; PQ2_0 = 142 and PTQ1_0 = 143 are PrismML's fork's,
/// which mainline does not read).
enum class tensor_type : std::uint32_t {
  F32 = 0, F16 = 1, Q4_0 = 2, Q4_1 = 3, Q5_0 = 6, Q5_1 = 7, Q8_0 = 8, Q8_1 = 9, Q2_K = 10, Q3_K = 11,
  Q4_K = 12, Q5_K = 13, Q6_K = 14, Q8_K = 15, IQ2_XXS = 16, IQ2_XS = 17, IQ3_XXS = 18, IQ1_S = 19,
  IQ4_NL = 20, IQ3_S = 21, IQ2_S = 22, IQ4_XS = 23, I8 = 24, I16 = 25, I32 = 26, I64 = 27, F64 = 28,
  IQ1_M = 29, BF16 = 30, TQ1_0 = 34, TQ2_0 = 35, I2_S = 36, MXFP4 = 39, NVFP4 = 40, Q1_0 = 41, Q2_0 = 42,
  PQ2_0 = 142, PTQ1_0 = 143
};

/// Elements per block and bytes per block (sizeof the block struct in ggml-common.h).
struct type_traits {
  tensor_type type;
  std::string_view name;
  std::uint64_t block_size;
  std::uint64_t block_bytes;
};

inline constexpr std::array<type_traits, 38> all_tensor_types{{
    {tensor_type::F32, "F32", 1, 4},          {tensor_type::F16, "F16", 1, 2},
    {tensor_type::Q4_0, "Q4_0", 32, 18},      {tensor_type::Q4_1, "Q4_1", 32, 20},
    {tensor_type::Q5_0, "Q5_0", 32, 22},      {tensor_type::Q5_1, "Q5_1", 32, 24},
    {tensor_type::Q8_0, "Q8_0", 32, 34},      {tensor_type::Q8_1, "Q8_1", 32, 36},
    {tensor_type::Q2_K, "Q2_K", 256, 84},     {tensor_type::Q3_K, "Q3_K", 256, 110},
    {tensor_type::Q4_K, "Q4_K", 256, 144},    {tensor_type::Q5_K, "Q5_K", 256, 176},
    {tensor_type::Q6_K, "Q6_K", 256, 210},    {tensor_type::Q8_K, "Q8_K", 256, 292},
    {tensor_type::IQ2_XXS, "IQ2_XXS", 256, 66}, {tensor_type::IQ2_XS, "IQ2_XS", 256, 74},
    {tensor_type::IQ3_XXS, "IQ3_XXS", 256, 98}, {tensor_type::IQ1_S, "IQ1_S", 256, 50},
    {tensor_type::IQ4_NL, "IQ4_NL", 32, 18},  {tensor_type::IQ3_S, "IQ3_S", 256, 110},
    {tensor_type::IQ2_S, "IQ2_S", 256, 82},   {tensor_type::IQ4_XS, "IQ4_XS", 256, 136},
    {tensor_type::I8, "I8", 1, 1},            {tensor_type::I16, "I16", 1, 2},
    {tensor_type::I32, "I32", 1, 4},          {tensor_type::I64, "I64", 1, 8},
    {tensor_type::F64, "F64", 1, 8},          {tensor_type::IQ1_M, "IQ1_M", 256, 56},
    {tensor_type::BF16, "BF16", 1, 2},        {tensor_type::TQ1_0, "TQ1_0", 256, 54},
    {tensor_type::TQ2_0, "TQ2_0", 256, 66},   {tensor_type::I2_S, "I2_S", 1, 1},  // size: see tensor_byte_size
    {tensor_type::MXFP4, "MXFP4", 32, 17},    {tensor_type::NVFP4, "NVFP4", 64, 36},
    {tensor_type::Q1_0, "Q1_0", 128, 18},     {tensor_type::Q2_0, "Q2_0", 64, 18},
    {tensor_type::PQ2_0, "PQ2_0", 128, 34},   {tensor_type::PTQ1_0, "PTQ1_0", 128, 28},
}};

/// The traits of type id `id`, or nullopt for an id no engine defines.
constexpr std::optional<type_traits> find_tensor_type(std::uint32_t id) noexcept {
  for (const type_traits& t : all_tensor_types)
    if (static_cast<std::uint32_t>(t.type) == id) return t;
  return std::nullopt;
}

constexpr type_traits traits_of(tensor_type type) noexcept {
  for (const type_traits& t : all_tensor_types)
    if (t.type == type) return t;
  return {type, "unknown", 0, 0};  // unreachable for the enumerators
}

constexpr std::string_view tensor_type_name(tensor_type type) noexcept { return traits_of(type).name; }

inline constexpr std::uint64_t tq_block_weights = 256;
inline constexpr std::size_t tq2_0_block_bytes = 66;  // 64 code bytes, fp16 d
inline constexpr std::size_t tq1_0_block_bytes = 54;  // qs[48], qh[4], fp16 d
inline constexpr std::uint64_t i2_s_group_weights = 128;
inline constexpr std::uint64_t i2_s_trailer_bytes = 32;  // float32 d, then zeros

/// The block formats of ternary weights with one fp16 scale d per block (weight = code * d):
/// TQ2_0 / TQ1_0 (256 weights, mainline ggml), Q2_0 (64, mainline ggml; its 2-bit code 3 is +2 d,
/// not ternary), PQ2_0 / PTQ1_0 (128, PrismML's fork). The block size is traits_of(type).block_size.
constexpr bool is_block_ternary(tensor_type type) noexcept {
  return type == tensor_type::TQ1_0 || type == tensor_type::TQ2_0 || type == tensor_type::Q2_0 ||
         type == tensor_type::PQ2_0 || type == tensor_type::PTQ1_0;
}

/// The types a BitLinear loads from and writes to: the block formats and I2_S (one float32 scale
/// per tensor, weights in groups of 128).
constexpr bool is_ternary(tensor_type type) noexcept { return is_block_ternary(type) || type == tensor_type::I2_S; }

/// Weights per row must be a multiple of this to write or decode the type (I2_S: 128, its group).
constexpr std::uint64_t row_multiple(tensor_type type) noexcept {
  return type == tensor_type::I2_S ? i2_s_group_weights : traits_of(type).block_size;
}

/// Element count of `ne`, or nullopt when the product exceeds INT64_MAX (ggml counts in int64).
inline std::optional<std::uint64_t> element_count(std::span<const std::uint64_t> ne) noexcept {
  std::optional<std::uint64_t> count = 1;
  for (std::uint64_t d : ne)
    if (!(count = detail::checked_multiply(*count, d))) return std::nullopt;
  if (*count > std::uint64_t(std::numeric_limits<std::int64_t>::max())) return std::nullopt;
  return count;
}

/// Bytes of a tensor of `type` and `ne` (ne[0] a multiple of the block size, checked by the
/// caller), or nullopt on overflow. I2_S holds count / 4 code bytes and a 32-byte trailer, as
/// ggml_nbytes computes it in bitnet.cpp and ik_llama.cpp.
inline std::optional<std::uint64_t> tensor_byte_size(tensor_type type, std::span<const std::uint64_t> ne) noexcept {
  const std::optional<std::uint64_t> count = element_count(ne);
  if (!count) return std::nullopt;
  if (type == tensor_type::I2_S) return *count / 4 + i2_s_trailer_bytes;
  const type_traits t = traits_of(type);
  return detail::checked_multiply(*count / t.block_size, t.block_bytes);
}

/// One tensor of a file.
struct tensor_info {
  std::string name;
  tensor_type type = tensor_type::F32;
  std::vector<std::uint64_t> ne;  // ggml order: ne[0] is the row length
  std::uint64_t offset = 0;       // into the data section
  std::uint64_t byte_size = 0;

  std::uint64_t element_count() const noexcept { return *gguf::element_count(ne); }  // checked when read
};

/// A tensor to be written: name, type and ggml-ordered sizes (an out x in matrix is {in, out}).
struct tensor_spec {
  std::string name;
  tensor_type type = tensor_type::F32;
  std::vector<std::uint64_t> ne;
};

// ---------------------------------------------------------------------------------------------
// Ternary blocks

/// What fp16 / float32 storage did to a scale d = 1 / sw.
struct scale_rounding {
  double requested = 0;  // the d asked for (1 / sw computed in double)
  double stored = 0;     // the d in the file
  /// |stored - requested| / requested.
  double relative_error() const noexcept { return requested == 0 ? 0 : std::fabs(stored - requested) / requested; }
};

/// Ternary codes and the block scales of a tensor, as stored.
struct ternary_tensor {
  Matrix<std::int8_t> codes;  // out x in (rows = ne[1], columns = ne[0]), each -1, 0 or +1
  std::vector<float> scales;  // d of each block, row-major over blocks (I2_S: one for the tensor)
  Index blocks_per_row = 0;   // 0 for I2_S (one scale for the whole tensor)
  Index block_size = 0;       // weights a block (0 for I2_S)
};

/// A block-format tensor as the format's own decoder reads it: codes -1, 0, +1 and, where the
/// format has it (Q2_0's and TQ2_0's 2-bit code 3), +2; one d per block.
struct block_tensor {
  Matrix<std::int8_t> codes;  // out x in
  Matrix<float> scales;       // out x blocks per row: d of each block (weight = code * d)
  Index block_size = 0;
};

/// What a group-scaled BitLinear is made of (weight_scaling::per_group, group = the format's
/// block): ternary codes and one magnitude d >= 0 per row and group, weight = code * d exactly.
struct ternary_tensor_groups {
  Matrix<std::int8_t> codes;  // out x in, each -1, 0 or +1
  Matrix<float> unit_scales;  // out x groups, each finite and >= 0 (0: a group of zero weights)
  Index group_size = 0;
};

/// Encoded blocks of a whole tensor and what happened to the scale.
struct encoded_ternary {
  std::vector<std::byte> bytes;
  scale_rounding scale;
};

namespace detail {

using bitnet::detail::binary16;
using bitnet::detail::binary32;
using bitnet::detail::bfloat16;
using bitnet::detail::checked_multiply;
using bitnet::detail::encode_bfloat16;
using bitnet::detail::encode_half;
using bitnet::detail::half_to_float;
using bitnet::detail::bfloat16_to_float;
using bitnet::detail::invalid_utf8_at;
using bitnet::detail::load_little_endian;
using bitnet::detail::round_to_format;
using bitnet::detail::store_little_endian;

/// A name in double quotes, bytes outside printable ASCII as \xNN (names come from untrusted files).
inline std::string quote(std::string_view text) {
  std::string out = "\"";
  for (const char c : text) {
    const auto u = static_cast<unsigned char>(c);
    if (u >= 0x20 && u < 0x7f && c != '"' && c != '\\') {
      out += c;
    } else {
      char escaped[8];
      std::snprintf(escaped, sizeof escaped, "\\x%02x", u);
      out += escaped;
    }
  }
  return out + "\"";
}

inline std::string number_text(double v) {
  char text[32];
  std::snprintf(text, sizeof text, "%.9g", v);
  return text;
}

inline std::string ne_text(std::span<const std::uint64_t> ne) {
  std::string text = "[";
  for (std::size_t i = 0; i < ne.size(); ++i) text += (i ? ", " : "") + std::to_string(ne[i]);
  return text + "]";
}

enum class subject : unsigned char { none, key, tensor };

/// "gguf: FILE: key|tensor "NAME": RULE" - the form of every message of this header.
inline std::string message(std::string_view file, subject what, std::string_view name, std::string_view rule) {
  std::string text = "gguf: " + std::string(file) + ": ";
  if (what == subject::key) text += "key " + quote(name) + ": ";
  if (what == subject::tensor) text += "tensor " + quote(name) + ": ";
  return text + std::string(rule);
}

[[noreturn]] inline void fail(std::string_view file, std::string_view rule) {
  throw io_error(message(file, subject::none, {}, rule));
}
[[noreturn]] inline void fail_key(std::string_view file, std::string_view key, std::string_view rule) {
  throw io_error(message(file, subject::key, key, rule));
}
[[noreturn]] inline void fail_tensor(std::string_view file, std::string_view tensor, std::string_view rule) {
  throw io_error(message(file, subject::tensor, tensor, rule));
}

/// Bytes a value of `type` takes at least in the file (strings: the length; arrays: type + count).
constexpr std::uint64_t min_value_bytes(value_type type) noexcept {
  switch (type) {
    case value_type::uint8: case value_type::int8: case value_type::boolean: return 1;
    case value_type::uint16: case value_type::int16: return 2;
    case value_type::uint32: case value_type::int32: case value_type::float32: return 4;
    case value_type::string: case value_type::uint64: case value_type::int64: case value_type::float64: return 8;
    case value_type::array: return 12;
  }
  return 1;
}

/// Sequential reading of the header through a window, each read checked against the file size.
class cursor {
 public:
  explicit cursor(const bitnet::detail::byte_source& source) : source_(source) {}

  std::uint64_t position() const noexcept { return position_; }
  std::uint64_t remaining() const noexcept { return source_.size() - position_; }

  /// Fails with "truncated" unless `n` more bytes exist; `what` names the item being read.
  void need(std::uint64_t n, const std::string& what) const {
    if (n > remaining())
      fail(source_.name(), "truncated: " + what + " needs " + std::to_string(n) + " bytes at byte " +
                               std::to_string(position_) + ", the file has " + std::to_string(source_.size()));
  }

  void read(std::span<std::byte> out, const std::string& what) {
    need(out.size(), what);
    std::size_t done = 0;
    while (done < out.size()) {
      if (position_ < window_start_ || position_ >= window_start_ + window_.size()) refill();
      const auto at = static_cast<std::size_t>(position_ - window_start_);
      const std::size_t n = std::min(out.size() - done, window_.size() - at);
      std::copy_n(window_.data() + at, n, out.data() + done);
      done += n;
      position_ += n;
    }
  }

  template <class U>
  U read(const std::string& what) {
    std::array<std::byte, sizeof(U)> bytes;
    read(bytes, what);
    return load_little_endian<U>(bytes.data());
  }

  /// A u64 length and that many bytes, the length checked against the rest of the file first.
  std::string read_string(const std::string& what) {
    const auto length = read<std::uint64_t>(what + " (its length)");
    if (length > remaining())
      fail(source_.name(), what + ": string length " + std::to_string(length) + " runs past the end of the file (" +
                               std::to_string(remaining()) + " bytes left at byte " + std::to_string(position_) + ")");
    std::string text(static_cast<std::size_t>(length), '\0');
    read(std::as_writable_bytes(std::span(text)), what);
    return text;
  }

 private:
  void refill() {
    window_start_ = position_;
    window_.resize(static_cast<std::size_t>(std::min<std::uint64_t>(window_bytes, remaining())));
    source_.read_at(window_start_, window_);
  }

  static constexpr std::uint64_t window_bytes = 1 << 16;
  const bitnet::detail::byte_source& source_;
  std::uint64_t position_ = 0;
  std::uint64_t window_start_ = 0;
  std::vector<std::byte> window_;
};

/// Reads one value of `type` for key `key` (arrays recursively, up to max_array_depth).
inline value read_value(cursor& in, std::string_view file, const std::string& key, value_type type, int depth);

template <class T>
T read_scalar(cursor& in, std::string_view file, const std::string& key) {
  const std::string what = "the value of key " + quote(key);
  if constexpr (std::is_same_v<T, bool>) {
    const auto byte = in.read<std::uint8_t>(what);
    if (byte > 1) fail_key(file, key, "BOOL value " + std::to_string(byte) + " is not 0 or 1");
    return byte == 1;
  } else {
    return in.read<T>(what);
  }
}

inline array read_array(cursor& in, std::string_view file, const std::string& key, int depth) {
  if (depth >= max_array_depth)
    fail_key(file, key, "arrays nested deeper than " + std::to_string(max_array_depth) + " levels");
  const auto element_id = in.read<std::uint32_t>("the array element type of key " + quote(key));
  if (element_id >= value_type_count)
    fail_key(file, key, "unknown array element type " + std::to_string(element_id) + " (valid: 0-12)");
  const auto element = static_cast<value_type>(element_id);
  const auto count = in.read<std::uint64_t>("the array length of key " + quote(key));
  // Bounds the allocation by the file: every element takes at least min_value_bytes.
  if (count > in.remaining() / min_value_bytes(element))
    fail_key(file, key, "array of " + std::to_string(count) + " " + std::string(value_type_name(element)) +
                            " elements cannot fit in the " + std::to_string(in.remaining()) + " bytes left");
  array result;
  auto fill = [&]<class T>(std::vector<T> items) {
    items.reserve(static_cast<std::size_t>(count));
    for (std::uint64_t i = 0; i < count; ++i) {
      if constexpr (std::is_same_v<T, std::string>)
        items.push_back(in.read_string("element " + std::to_string(i) + " of key " + quote(key)));
      else if constexpr (std::is_same_v<T, array>)
        items.push_back(read_array(in, file, key, depth + 1));
      else
        items.push_back(read_scalar<T>(in, file, key));
    }
    result.items = std::move(items);
  };
  switch (element) {
    case value_type::uint8: fill(std::vector<std::uint8_t>{}); break;
    case value_type::int8: fill(std::vector<std::int8_t>{}); break;
    case value_type::uint16: fill(std::vector<std::uint16_t>{}); break;
    case value_type::int16: fill(std::vector<std::int16_t>{}); break;
    case value_type::uint32: fill(std::vector<std::uint32_t>{}); break;
    case value_type::int32: fill(std::vector<std::int32_t>{}); break;
    case value_type::float32: fill(std::vector<float>{}); break;
    case value_type::boolean: fill(std::vector<bool>{}); break;
    case value_type::string: fill(std::vector<std::string>{}); break;
    case value_type::array: fill(std::vector<array>{}); break;
    case value_type::uint64: fill(std::vector<std::uint64_t>{}); break;
    case value_type::int64: fill(std::vector<std::int64_t>{}); break;
    case value_type::float64: fill(std::vector<double>{}); break;
  }
  return result;
}

inline value read_value(cursor& in, std::string_view file, const std::string& key, value_type type, int depth) {
  switch (type) {
    case value_type::uint8: return read_scalar<std::uint8_t>(in, file, key);
    case value_type::int8: return read_scalar<std::int8_t>(in, file, key);
    case value_type::uint16: return read_scalar<std::uint16_t>(in, file, key);
    case value_type::int16: return read_scalar<std::int16_t>(in, file, key);
    case value_type::uint32: return read_scalar<std::uint32_t>(in, file, key);
    case value_type::int32: return read_scalar<std::int32_t>(in, file, key);
    case value_type::float32: return read_scalar<float>(in, file, key);
    case value_type::boolean: return read_scalar<bool>(in, file, key);
    case value_type::string: return in.read_string("the value of key " + quote(key));
    case value_type::array: return read_array(in, file, key, depth);
    case value_type::uint64: return read_scalar<std::uint64_t>(in, file, key);
    case value_type::int64: return read_scalar<std::int64_t>(in, file, key);
    case value_type::float64: return read_scalar<double>(in, file, key);
  }
  fail_key(file, key, "unknown value type");
}

/// Serializes values for the writer.
class byte_writer {
 public:
  std::vector<std::byte> bytes;

  template <class U>
  void put(U v) {
    std::array<std::byte, sizeof(U)> b;
    store_little_endian(b.data(), v);
    bytes.insert(bytes.end(), b.begin(), b.end());
  }
  void put_string(std::string_view text) {
    put<std::uint64_t>(text.size());
    const auto* p = reinterpret_cast<const std::byte*>(text.data());
    bytes.insert(bytes.end(), p, p + text.size());
  }
  void put_payload(const value& v) {
    std::visit([&](const auto& x) { put_one(x); }, v.data);
  }

 private:
  template <class T>
  void put_one(const T& x) {
    if constexpr (std::is_same_v<T, std::string>) put_string(x);
    else if constexpr (std::is_same_v<T, array>) put_array(x);
    else if constexpr (std::is_same_v<T, bool>) put<std::uint8_t>(x ? 1 : 0);
    else put<T>(x);
  }
  void put_array(const array& a) {
    put<std::uint32_t>(static_cast<std::uint32_t>(a.element_type()));
    put<std::uint64_t>(a.size());
    std::visit(
        [&](const auto& items) {
          for (const auto& item : items) {
            if constexpr (std::is_same_v<std::decay_t<decltype(items)>, std::vector<bool>>) put<std::uint8_t>(item ? 1 : 0);
            else put_one(item);
          }
        },
        a.items);
  }
};

inline int array_depth(const array& a) {
  if (const auto* nested = std::get_if<std::vector<array>>(&a.items)) {
    int deepest = 0;
    for (const array& inner : *nested) deepest = std::max(deepest, array_depth(inner));
    return 1 + deepest;
  }
  return 1;
}

/// The d to store for a layer scale sw, and the check that it can be stored.
inline void check_d(double d, std::string_view what) {
  if (!std::isfinite(d) || d < 0)
    throw value_error(std::string(what) + ": scale d = " + number_text(d) + " is not finite and >= 0");
}

}  // namespace detail

/// The weight scale sw = 1 / d a BitLinear<T> gets from a stored d (the reciprocal in double,
/// rounded once to T).
template <real_scalar T>
T scale_from_d(double d) noexcept {
  return static_cast<T>(1.0 / d);
}

// The block codecs below take codes already checked to be -1, 0 or +1 (encode_ternary does).
namespace detail {

// --- Q2_0 (64 weights, mainline ggml) and PQ2_0 (128, PrismML's fork): fp16 d first, then one
// byte per 4 weights: weight j sits in byte j / 4, bits 2 (j % 4) and 2 (j % 4) + 1 (low bits
// first), as code + 1; code 3 is +2 d (ggml-common.h block_q2_0, ggml-quants.c dequantize_row_q2_0).
//
// --- TQ2_0 (256): 64 code bytes then fp16 d. Byte 32 h + m holds the weights 128 h + 32 n + m
// (n = 0..3) in bits 2n, 2n + 1, as code + 1 (ggml-quants.c dequantize_row_tq2_0).
//
// --- TQ1_0 (256, mainline) and PTQ1_0 (128, PrismML's fork): base-3. A byte holds up to 5 trits
// t0..t4 (code + 1) as ceil((t0 * 81 + t1 * 27 + t2 * 9 + t3 * 3 + t4) * 256 / 243); trit k is read
// back as ((uint8)(byte * 3^k) * 3) >> 8. The qs bytes come in stages: a stage of c bytes starting
// at weight w holds 5c weights, trit n of its byte m being weight w + n c + m (position-major:
// consecutive weights sit in consecutive bytes, not in consecutive trits of one byte). Then the qh
// bytes: trit n (n < 4) of qh[h] is weight w + n H + h (H qh bytes), trit 4 is 0. Then fp16 d.
// TQ1_0: stages of 32 and 16 bytes, 4 qh bytes. PTQ1_0: 16 and 8 bytes, 2 qh bytes.

struct trit_stage {
  std::size_t first_byte, bytes, first_weight;
};
struct trit_layout {
  std::array<trit_stage, 2> stages;
  trit_stage qh;
  std::size_t d_byte;
};
inline constexpr trit_layout tq1_0_layout{{{{0, 32, 0}, {32, 16, 160}}}, {48, 4, 240}, 52};
inline constexpr trit_layout ptq1_0_layout{{{{0, 16, 0}, {16, 8, 80}}}, {24, 2, 120}, 26};

inline std::byte pack_trits(std::span<const unsigned, 5> trits) noexcept {
  unsigned q = 0;
  for (const unsigned t : trits) q = q * 3 + t;
  return std::byte((q * 256 + 242) / 243);
}
inline unsigned trit(std::byte byte, unsigned k) noexcept {
  static constexpr std::array<unsigned, 5> pow3{1, 3, 9, 27, 81};
  const unsigned q = (unsigned(byte) * pow3[k]) & 0xff;
  return (q * 3) >> 8;
}

inline void encode_trits(const trit_layout& l, std::span<const std::int8_t> codes, std::uint16_t d_bits,
                         std::span<std::byte> out) noexcept {
  std::array<unsigned, 5> t{};
  for (const trit_stage& s : l.stages)
    for (std::size_t m = 0; m < s.bytes; ++m) {
      for (std::size_t n = 0; n < 5; ++n) t[n] = unsigned(codes[s.first_weight + n * s.bytes + m] + 1);
      out[s.first_byte + m] = pack_trits(t);
    }
  for (std::size_t h = 0; h < l.qh.bytes; ++h) {
    for (std::size_t n = 0; n < 4; ++n) t[n] = unsigned(codes[l.qh.first_weight + n * l.qh.bytes + h] + 1);
    t[4] = 0;
    out[l.qh.first_byte + h] = pack_trits(t);
  }
  store_little_endian(out.data() + l.d_byte, d_bits);
}

inline void decode_trits(const trit_layout& l, std::span<const std::byte> in, std::span<std::int8_t> codes,
                         std::uint16_t& d_bits) noexcept {
  for (const trit_stage& s : l.stages)
    for (std::size_t m = 0; m < s.bytes; ++m)
      for (unsigned n = 0; n < 5; ++n)
        codes[s.first_weight + n * s.bytes + m] = std::int8_t(int(trit(in[s.first_byte + m], n)) - 1);
  for (std::size_t h = 0; h < l.qh.bytes; ++h)
    for (unsigned n = 0; n < 4; ++n)
      codes[l.qh.first_weight + n * l.qh.bytes + h] = std::int8_t(int(trit(in[l.qh.first_byte + h], n)) - 1);
  d_bits = load_little_endian<std::uint16_t>(in.data() + l.d_byte);
}

/// Encodes one block of `type` (codes in {-1, 0, +1}, traits_of(type).block_size of them) with fp16
/// scale bits `d_bits` into traits_of(type).block_bytes bytes.
inline void encode_block(tensor_type type, std::span<const std::int8_t> codes, std::uint16_t d_bits,
                         std::span<std::byte> out) noexcept {
  switch (type) {
    case tensor_type::Q2_0:
    case tensor_type::PQ2_0:
      store_little_endian(out.data(), d_bits);
      for (std::size_t k = 0; k < codes.size() / 4; ++k) {
        unsigned byte = 0;
        for (std::size_t i = 0; i < 4; ++i) byte |= unsigned(codes[4 * k + i] + 1) << (2 * i);
        out[2 + k] = std::byte(byte);
      }
      return;
    case tensor_type::TQ2_0:
      for (std::size_t h = 0; h < 2; ++h)
        for (std::size_t m = 0; m < 32; ++m) {
          unsigned byte = 0;
          for (std::size_t n = 0; n < 4; ++n) byte |= unsigned(codes[128 * h + 32 * n + m] + 1) << (2 * n);
          out[32 * h + m] = std::byte(byte);
        }
      store_little_endian(out.data() + 64, d_bits);
      return;
    case tensor_type::TQ1_0: encode_trits(tq1_0_layout, codes, d_bits, out); return;
    default: encode_trits(ptq1_0_layout, codes, d_bits, out); return;  // PTQ1_0
  }
}

/// Decodes one block of `type` into codes as ggml reads them (-1, 0, +1, and +2 for a 2-bit code
/// 3) and the fp16 bits of d. Returns the index of the first +2, or nullopt when every code is
/// ternary (the base-3 formats always are).
inline std::optional<std::size_t> decode_block(tensor_type type, std::span<const std::byte> in,
                                               std::span<std::int8_t> codes, std::uint16_t& d_bits) noexcept {
  std::optional<std::size_t> plus_two;
  auto put = [&](std::size_t i, unsigned code) {
    if (code == 3 && (!plus_two || i < *plus_two)) plus_two = i;
    codes[i] = static_cast<std::int8_t>(int(code) - 1);
  };
  switch (type) {
    case tensor_type::Q2_0:
    case tensor_type::PQ2_0:
      d_bits = load_little_endian<std::uint16_t>(in.data());
      for (std::size_t j = 0; j < codes.size(); ++j) put(j, (unsigned(in[2 + j / 4]) >> (2 * (j % 4))) & 3);
      return plus_two;
    case tensor_type::TQ2_0:
      for (std::size_t h = 0; h < 2; ++h)
        for (std::size_t m = 0; m < 32; ++m)
          for (std::size_t n = 0; n < 4; ++n) put(128 * h + 32 * n + m, (unsigned(in[32 * h + m]) >> (2 * n)) & 3);
      d_bits = load_little_endian<std::uint16_t>(in.data() + 64);
      return plus_two;
    case tensor_type::TQ1_0: decode_trits(tq1_0_layout, in, codes, d_bits); return std::nullopt;
    default: decode_trits(ptq1_0_layout, in, codes, d_bits); return std::nullopt;  // PTQ1_0
  }
}

// --- I2_S (bitnet.cpp's x86 layout, as ik_llama.cpp's dequantize_row_ms_i2s reads it): the whole
// tensor's weights in row-major order, in groups of 128; group g is 32 bytes at 32 g, and weight
// 128 g + 32 k + m sits in byte 32 g + m, bits 6 - 2k and 7 - 2k (code + 1). After the count / 4
// code bytes: float32 d, then 28 zero bytes (the tensor is count / 4 + 32 bytes).

/// Encodes the codes (rows x cols, cols a multiple of 128) of one tensor as I2_S with scale d.
template <class Derived>
std::vector<std::byte> encode_i2_s(const Eigen::MatrixBase<Derived>& codes, float d) {
  const auto count = static_cast<std::size_t>(codes.rows() * codes.cols());
  std::vector<std::byte> out(count / 4 + i2_s_trailer_bytes, std::byte{0});
  std::size_t e = 0;
  for (Index r = 0; r < codes.rows(); ++r)
    for (Index c = 0; c < codes.cols(); ++c, ++e) {
      const unsigned code = unsigned(codes.coeff(r, c) + 1);
      const std::size_t byte = e / 128 * 32 + e % 32;
      out[byte] |= std::byte(code << (6 - 2 * (e % 128 / 32)));
    }
  store_little_endian(out.data() + count / 4, d);
  return out;
}

}  // namespace detail

// ---------------------------------------------------------------------------------------------
// Whole ternary tensors

namespace detail {

/// fp16 bits of a block scale d (finite, >= 0), rounded to nearest; `all_zero` says the block's
/// codes are all 0, where any d gives the same weights and one that rounds to 0 is fine.
inline std::uint16_t block_scale_bits(double d, bool all_zero, std::string_view what) {
  const auto rounded = round_to_format(d, binary16);
  if (!rounded) throw value_error(std::string(what) + ": scale d = " + number_text(d) + " overflows fp16 (max 65504)");
  if (d > 0 && *rounded == 0 && !all_zero)
    throw value_error(std::string(what) + ": scale d = " + number_text(d) + " rounds to 0 in fp16 (smallest 5.96e-8)");
  return encode_half(*rounded);
}

template <class Derived>
void check_ternary_codes(const Eigen::MatrixBase<Derived>& codes, const std::string& what) {
  static_assert(std::is_same_v<typename Derived::Scalar, std::int8_t>, "gguf: codes must be int8");
  bitnet::detail::require_non_empty(codes, what + ": codes");
  for (Index r = 0; r < codes.rows(); ++r)
    for (Index c = 0; c < codes.cols(); ++c)
      if (const int v = codes.coeff(r, c); v < -1 || v > 1)
        throw value_error(what + ": code " + std::to_string(v) + " at row " + std::to_string(r) + ", column " +
                          std::to_string(c) + " is not -1, 0 or +1");
}

/// Encodes codes (rows x cols, cols a multiple of the block) block by block with d of block (r, b)
/// from `d_of(r, b)`; returns the bytes and the block whose fp16 d is relatively furthest off.
template <class Derived, class ScaleOf>
encoded_ternary encode_blocks(tensor_type type, const Eigen::MatrixBase<Derived>& codes, ScaleOf d_of,
                              const std::string& what) {
  const type_traits t = traits_of(type);
  const auto block = Index(t.block_size);
  const Index blocks_per_row = codes.cols() / block;
  encoded_ternary result;
  result.bytes.resize(std::size_t(codes.rows() * blocks_per_row) * t.block_bytes);
  std::vector<std::int8_t> codes_of_block(std::size_t(block), 0);
  std::byte* out = result.bytes.data();
  for (Index r = 0; r < codes.rows(); ++r)
    for (Index b = 0; b < blocks_per_row; ++b, out += t.block_bytes) {
      bool all_zero = true;
      for (Index i = 0; i < block; ++i) {
        codes_of_block[std::size_t(i)] = codes.coeff(r, b * block + i);
        all_zero = all_zero && codes_of_block[std::size_t(i)] == 0;
      }
      const double d = d_of(r, b);
      const std::string where = what + " (row " + std::to_string(r) + ", block " + std::to_string(b) + ")";
      check_d(d, where);
      const std::uint16_t bits = block_scale_bits(d, all_zero, where);
      const scale_rounding rounding{d, half_to_float(bits)};
      if ((r == 0 && b == 0) || rounding.relative_error() > result.scale.relative_error()) result.scale = rounding;
      encode_block(type, codes_of_block, bits, std::span<std::byte>(out, t.block_bytes));
    }
  return result;
}

}  // namespace detail

/// Encodes an out x in matrix of codes as `type` with one scale d for every block (block formats:
/// fp16, rounded to nearest; I2_S: the float32 `d_f32` when given, else d rounded to nearest).
/// Throws shape_error when in is not a multiple of row_multiple(type), value_error for a code
/// outside {-1, 0, +1}, a d that is not finite and >= 0, one too large for the format, or a
/// positive d that rounds to 0 (the layer would vanish).
template <class Derived>
encoded_ternary encode_ternary(tensor_type type, const Eigen::MatrixBase<Derived>& codes, double d,
                               std::optional<float> d_f32 = std::nullopt) {
  static_assert(std::is_same_v<typename Derived::Scalar, std::int8_t>, "gguf::encode_ternary: codes must be int8");
  const std::string what = "gguf::encode_ternary(" + std::string(tensor_type_name(type)) + ")";
  if (!is_ternary(type)) throw value_error(what + ": not a ternary type");
  bitnet::detail::require_non_empty(codes, what + ": codes");
  if (std::uint64_t(codes.cols()) % row_multiple(type) != 0)
    throw shape_error(what + ": rows of " + std::to_string(codes.cols()) + " weights are not a multiple of " +
                      std::to_string(row_multiple(type)));
  detail::check_ternary_codes(codes, what);
  detail::check_d(d, what);
  if (type == tensor_type::I2_S) {
    encoded_ternary result;
    result.scale.requested = d;
    const auto rounded = detail::round_to_format(d, detail::binary32);
    if (!d_f32 && !rounded) throw value_error(what + ": scale d = " + detail::number_text(d) + " overflows float32");
    const float stored = d_f32 ? *d_f32 : static_cast<float>(*rounded);
    detail::check_d(stored, what);
    if (d > 0 && stored == 0) throw value_error(what + ": scale d = " + detail::number_text(d) + " rounds to 0 in float32");
    result.scale.stored = stored;
    result.bytes = detail::encode_i2_s(codes, stored);
    return result;
  }
  // One d for the tensor: its fp16 rounding must not vanish even where a block is all zero.
  (void)detail::block_scale_bits(d, false, what);
  return detail::encode_blocks(type, codes, [d](Index, Index) { return d; }, what);
}

/// Encodes codes (out x in) with one scale per row and group (`unit_scales`, out x groups, the
/// magnitudes d of weight = code * d) as a block format whose block is `group_size` (Q2_0: 64,
/// PQ2_0 / PTQ1_0: 128, TQ2_0 / TQ1_0: 256). Each d is rounded to fp16 (nearest); the result's
/// scale reports the block rounded relatively the most. A block whose codes are all 0 may have
/// any d >= 0 (ggml's quantizers write 0 there). `layer` names the layer in messages. Throws
/// value_error when the type is not a block format or its block is not `group_size` (naming the
/// layer and both sizes), for a code outside {-1, 0, +1} or a d that is not finite and >= 0 or
/// does not fit fp16; shape_error when in is not a multiple of the block or unit_scales is not
/// out x (in / group_size).
template <class Derived, class ScalesDerived>
encoded_ternary encode_ternary_groups(tensor_type type, const Eigen::MatrixBase<Derived>& codes,
                                      const Eigen::MatrixBase<ScalesDerived>& unit_scales, Index group_size,
                                      std::string_view layer = {}) {
  static_assert(std::is_same_v<typename Derived::Scalar, std::int8_t>, "gguf::encode_ternary_groups: codes must be int8");
  static_assert(real_scalar<typename ScalesDerived::Scalar>, "gguf::encode_ternary_groups: scales must be float or double");
  const std::string what = "gguf::encode_ternary_groups(" + std::string(tensor_type_name(type)) +
                           (layer.empty() ? std::string() : ", layer " + detail::quote(layer)) + ")";
  if (!is_block_ternary(type))
    throw value_error(what + ": not a block format with one scale per block (Q2_0, PQ2_0, PTQ1_0, TQ2_0, TQ1_0)");
  const auto block = Index(traits_of(type).block_size);
  if (group_size != block)
    throw value_error(what + ": the layer's scale groups are " + std::to_string(group_size) + " weights, a " +
                      std::string(tensor_type_name(type)) + " block is " + std::to_string(block) +
                      " (choose the format whose block is the group: Q2_0 64, PQ2_0 / PTQ1_0 128, TQ2_0 / TQ1_0 256)");
  bitnet::detail::require_non_empty(codes, what + ": codes");
  if (codes.cols() % block != 0)
    throw shape_error(what + ": rows of " + std::to_string(codes.cols()) + " weights are not a multiple of the block " +
                      std::to_string(block));
  if (unit_scales.rows() != codes.rows() || unit_scales.cols() != codes.cols() / block)
    throw shape_error(what + ": unit scales are " + std::to_string(unit_scales.rows()) + "x" +
                      std::to_string(unit_scales.cols()) + ", the codes need " + std::to_string(codes.rows()) + "x" +
                      std::to_string(codes.cols() / block));
  detail::check_ternary_codes(codes, what);
  return detail::encode_blocks(
      type, codes, [&](Index r, Index b) { return double(unit_scales.coeff(r, b)); }, what);
}

/// Decodes the bytes of a `rows` x `cols` block-format tensor as ggml's dequantize_row_* does:
/// every code (a 2-bit code 3 is +2) and every block's d, nothing refused. `file` and `tensor`
/// name it in messages. Throws io_error when `type` is not a block format, for a row length that
/// is not a multiple of the block or a byte count that does not match.
inline block_tensor decode_blocks(tensor_type type, std::span<const std::byte> bytes, Index rows, Index cols,
                                  std::string_view file = "<memory>", std::string_view tensor = {}) {
  if (!is_block_ternary(type))
    detail::fail_tensor(file, tensor, "is " + std::string(tensor_type_name(type)) +
                                          ", not a ternary block format (Q2_0, PQ2_0, PTQ1_0, TQ2_0, TQ1_0)");
  const type_traits t = traits_of(type);
  if (rows <= 0 || cols <= 0 || std::uint64_t(cols) % t.block_size != 0)
    detail::fail_tensor(file, tensor, "a " + std::string(t.name) + " tensor needs rows of a multiple of " +
                                          std::to_string(t.block_size) + " weights, got " + std::to_string(rows) + "x" +
                                          std::to_string(cols));
  const std::array<std::uint64_t, 2> ne{std::uint64_t(cols), std::uint64_t(rows)};
  const std::optional<std::uint64_t> expected = tensor_byte_size(type, ne);
  if (!expected || *expected != bytes.size())
    detail::fail_tensor(file, tensor, "holds " + std::to_string(bytes.size()) + " bytes, " + std::string(t.name) + " " +
                                          detail::ne_text(ne) + " needs " +
                                          (expected ? std::to_string(*expected) : std::string("more than 2^64")));
  const auto block = Index(t.block_size);
  block_tensor result;
  result.block_size = block;
  result.codes.resize(rows, cols);
  result.scales.resize(rows, cols / block);
  std::vector<std::int8_t> codes_of_block(static_cast<std::size_t>(block));
  const std::byte* in = bytes.data();
  for (Index r = 0; r < rows; ++r)
    for (Index b = 0; b < cols / block; ++b, in += t.block_bytes) {
      std::uint16_t d_bits = 0;
      (void)detail::decode_block(type, std::span<const std::byte>(in, t.block_bytes), codes_of_block, d_bits);
      for (Index i = 0; i < block; ++i) result.codes(r, b * block + i) = codes_of_block[std::size_t(i)];
      result.scales(r, b) = detail::half_to_float(d_bits);
    }
  return result;
}

/// Decodes the bytes of a `rows` x `cols` ternary tensor of `type`. `file` and `tensor` name it in
/// messages. Throws io_error for a byte count that does not match, a row length that is not a
/// multiple of row_multiple(type), or a 2-bit code 3 (+2 d in Q2_0 and TQ2_0, no ternary value;
/// the message names its row, column and block). decode_blocks reads such a tensor whole.
inline ternary_tensor decode_ternary(tensor_type type, std::span<const std::byte> bytes, Index rows, Index cols,
                                     std::string_view file = "<memory>", std::string_view tensor = {}) {
  if (!is_ternary(type))
    detail::fail_tensor(file, tensor, "is " + std::string(tensor_type_name(type)) + ", not a ternary type");
  ternary_tensor result;
  auto bad_code = [&](Index r, Index c, const std::string& where) {
    detail::fail_tensor(file, tensor, "the 2-bit code at row " + std::to_string(r) + ", column " + std::to_string(c) +
                                          " (" + where + ") is 3, not a ternary code (0, 1, 2 for -1, 0, +1)" +
                                          (type == tensor_type::I2_S ? "" : "; ggml reads it as +2 d"));
  };
  if (type == tensor_type::I2_S) {
    if (rows <= 0 || cols <= 0 || std::uint64_t(cols) % i2_s_group_weights != 0)
      detail::fail_tensor(file, tensor, "a I2_S tensor needs rows of a multiple of " + std::to_string(i2_s_group_weights) +
                                            " weights, got " + std::to_string(rows) + "x" + std::to_string(cols));
    const std::array<std::uint64_t, 2> ne{std::uint64_t(cols), std::uint64_t(rows)};
    const std::optional<std::uint64_t> expected = tensor_byte_size(type, ne);
    if (!expected || *expected != bytes.size())
      detail::fail_tensor(file, tensor, "holds " + std::to_string(bytes.size()) + " bytes, I2_S " + detail::ne_text(ne) +
                                            " needs " + (expected ? std::to_string(*expected) : std::string("more than 2^64")));
    result.codes.resize(rows, cols);
    const std::size_t count = std::size_t(rows * cols);
    std::size_t e = 0;
    for (Index r = 0; r < rows; ++r)
      for (Index c = 0; c < cols; ++c, ++e) {
        const unsigned code = (unsigned(bytes[e / 128 * 32 + e % 32]) >> (6 - 2 * (e % 128 / 32))) & 3;
        if (code == 3) bad_code(r, c, "group " + std::to_string(e / 128) + " of the tensor");
        result.codes(r, c) = std::int8_t(int(code) - 1);
      }
    result.scales.push_back(detail::load_little_endian<float>(bytes.data() + count / 4));
    return result;
  }
  block_tensor blocks = decode_blocks(type, bytes, rows, cols, file, tensor);
  for (Index r = 0; r < rows; ++r)
    for (Index c = 0; c < cols; ++c)
      if (blocks.codes(r, c) == 2) bad_code(r, c, "block " + std::to_string(c / blocks.block_size) + " of the row");
  result.codes = std::move(blocks.codes);
  result.blocks_per_row = blocks.scales.cols();
  result.block_size = blocks.block_size;
  result.scales.assign(blocks.scales.data(), blocks.scales.data() + blocks.scales.size());  // row-major
  return result;
}

/// The codes and per-block magnitudes of a decoded block-format tensor, for a group-scaled
/// BitLinear with group = the block: exact, weight = code * d for every weight of the file. A
/// block with d = 0 (ggml's quantizers write it for an all-zero block) holds zero weights: its
/// codes become 0 and d stays 0. A negative d flips the block's codes (code * d is unchanged).
/// Throws io_error for I2_S (one scale per tensor: to_bit_linear) or a d that is not finite,
/// naming the tensor, row and block.
inline ternary_tensor_groups to_groups(const ternary_tensor& tensor, std::string_view file = "<memory>",
                                       std::string_view name = {}) {
  if (tensor.blocks_per_row <= 0 || tensor.block_size <= 0)
    detail::fail_tensor(file, name, "has one scale for the whole tensor (I2_S), no scale groups");
  ternary_tensor_groups groups;
  groups.group_size = tensor.block_size;
  groups.codes = tensor.codes;
  groups.unit_scales.resize(tensor.codes.rows(), tensor.blocks_per_row);
  for (Index r = 0; r < tensor.codes.rows(); ++r)
    for (Index b = 0; b < tensor.blocks_per_row; ++b) {
      const float d = tensor.scales[std::size_t(r * tensor.blocks_per_row + b)];
      if (!std::isfinite(d))
        detail::fail_tensor(file, name, "scale d = " + detail::number_text(d) + " of row " + std::to_string(r) + ", block " +
                                            std::to_string(b) + " is not finite");
      auto block_codes = groups.codes.row(r).segment(b * tensor.block_size, tensor.block_size);
      if (d == 0) block_codes.setZero();
      else if (d < 0) block_codes = -block_codes;
      groups.unit_scales(r, b) = std::fabs(d);  // -0 becomes +0
    }
  return groups;
}

/// A group-scaled BitLinear (weight_scaling::per_group, group = the format's block) computing with
/// the codes and per-block scales of `groups` (to_groups): weight = code * d exactly. The options'
/// weight_scales and group_size come from the file, and scale_update is frozen (an exact import:
/// fine-tuning keeps the file's scales); the caller's others (rms_norm, activation_scales,
/// rotation) are kept.
template <real_scalar T>
BitLinear<T> to_group_bit_linear(const ternary_tensor_groups& groups, std::optional<Vector<T>> bias = std::nullopt,
                                 bitlinear_options options = {}) {
  options.weight_scales = weight_scaling::per_group;
  options.group_size = groups.group_size;
  options.scale_update = weight_scale_update::frozen;
  return BitLinear<T>::from_ternary(groups.codes, Matrix<T>(groups.unit_scales.template cast<T>()), std::move(bias),
                                    options);
}

/// A BitLinear computing with the decoded codes and sw = 1 / d, when every block has the same d
/// (as converters write BitNet models). Throws io_error naming the first block whose d differs
/// from block 0's (to_groups gives such a tensor's codes and per-block scales), or a d that cannot
/// be a layer scale (not finite and > 0).
template <real_scalar T>
BitLinear<T> to_bit_linear(const ternary_tensor& tensor, std::string_view file = "<memory>",
                           std::string_view name = {}, std::optional<Vector<T>> bias = std::nullopt,
                           bitlinear_options options = {}) {
  if (tensor.scales.empty()) detail::fail_tensor(file, name, "has no block scales");
  const float d = tensor.scales.front();
  auto block_text = [&](std::size_t i) {
    if (tensor.blocks_per_row == 0) return std::string("the tensor");
    const auto per_row = std::size_t(tensor.blocks_per_row);
    const auto size = std::size_t(tensor.block_size);
    const std::size_t first = i % per_row * size;
    return "block " + std::to_string(i) + " (row " + std::to_string(i / per_row) + ", columns " +
           std::to_string(first) + "-" + std::to_string(first + size - 1) + ")";
  };
  for (std::size_t i = 1; i < tensor.scales.size(); ++i)
    if (std::bit_cast<std::uint32_t>(tensor.scales[i]) != std::bit_cast<std::uint32_t>(d))
      detail::fail_tensor(file, name, "block scales differ: " + block_text(i) + " has d = " +
                                          detail::number_text(tensor.scales[i]) + ", block 0 has d = " +
                                          detail::number_text(d) +
                                          " (one scale per tensor here; to_groups / reader::read_ternary_groups give "
                                          "the codes and per-block scales of a group-scaled layer)");
  if (!std::isfinite(d) || !(d > 0))
    detail::fail_tensor(file, name, "scale d = " + detail::number_text(d) + " of " + block_text(0) +
                                        " is not finite and > 0, so 1 / d is no layer scale");
  const T sw = scale_from_d<T>(d);
  if (!std::isfinite(sw) || !(sw > 0))
    detail::fail_tensor(file, name, "scale d = " + detail::number_text(d) + " gives sw = 1 / d out of range");
  return BitLinear<T>::from_ternary(tensor.codes, sw, std::move(bias), options);
}

/// The float32 d to store for sw (I2_S): among the float nearest 1 / sw and its two neighbours, the
/// first whose scale_from_d<T> gives back sw exactly, else the nearest. No other float can: one
/// that reciprocates to sw lies within about an ulp of 1 / sw. For about 1 float sw in 6 none does
/// (reciprocals skip floats where 1/d^2 > 2), and the reloaded sw is then 1 ulp off.
template <real_scalar T>
float i2_s_scale_for(T sw) {
  const double exact = 1.0 / double(sw);
  const auto nearest = detail::round_to_format(exact, detail::binary32);
  if (!nearest) throw value_error("gguf: 1 / sw = " + detail::number_text(exact) + " overflows float32");
  const auto d = static_cast<float>(*nearest);
  for (const float candidate : {d, std::nextafter(d, 0.0f), std::nextafter(d, std::numeric_limits<float>::infinity())})
    if (scale_from_d<T>(candidate) == sw) return candidate;
  return d;
}

/// A BitLinear's codes and scales as a tensor of `type`, with what the storage did to the scale (the
/// block rounded relatively the most). per_tensor: one d = 1 / sw in every block (a block format or
/// I2_S); per_group: encode_ternary_groups (a block format whose block is the group, else a
/// value_error naming `layer` and both sizes); per_row: every block of a row gets the row's d (a
/// block format; reading it back gives a per_group layer with the same weights). Throws
/// shape_error when in_features is not a multiple of the block, value_error when a d does not fit
/// fp16 or the type cannot hold the layer's scales (I2_S: one per tensor).
template <real_scalar T>
encoded_ternary encode_bit_linear(const BitLinear<T>& layer, tensor_type type, std::string_view layer_name = {}) {
  switch (layer.options().weight_scales) {
    case weight_scaling::per_group:
      return encode_ternary_groups(type, layer.ternary_weight(), layer.unit_scales(), layer.options().group_size,
                                   layer_name);
    case weight_scaling::per_row: {
      const std::string what = "gguf::encode_bit_linear(" + std::string(tensor_type_name(type)) +
                               (layer_name.empty() ? std::string() : ", layer " + detail::quote(layer_name)) + ")";
      if (!is_block_ternary(type))
        throw value_error(what + ": a per_row layer needs a block format (one d per block), not " +
                          std::string(tensor_type_name(type)));
      const Matrix<std::int8_t> codes = layer.ternary_weight();
      if (std::uint64_t(codes.cols()) % row_multiple(type) != 0)
        throw shape_error(what + ": rows of " + std::to_string(codes.cols()) + " weights are not a multiple of " +
                          std::to_string(row_multiple(type)));
      const Matrix<T>& d = layer.unit_scales();
      return detail::encode_blocks(type, codes, [&d](Index r, Index) { return double(d(r, 0)); }, what);
    }
    case weight_scaling::per_tensor: break;
  }
  const T sw = layer.weight_scale();
  const double d = 1.0 / double(sw);
  if (type == tensor_type::I2_S) return encode_ternary(type, layer.ternary_weight(), d, i2_s_scale_for(sw));
  return encode_ternary(type, layer.ternary_weight(), d);
}

// ---------------------------------------------------------------------------------------------
// Rotations a file declares

/// A Hadamard rotation declared by a file with PrismML's keys (llama.cpp fork, src/llama-model.cpp
/// load_hparams; Ternary Bonsai 2 files). The tensors named in weight_names are stored as
/// W' = W diag(s) H: the runtime computes W' (H (s * x)) with H the normalized Sylvester
/// Walsh-Hadamard matrix of block_size applied blockwise along the input (ne[0]) and s the sign
/// vector of the input width (all +1 for sign mode "identity"). inverse_weight_names are tables
/// whose rows are stored rotated (token_embd). Everything else about a declaration is refused
/// when the file opens (reader::hadamard()), never assumed.
struct hadamard_declaration {
  std::uint32_t block_size = 0;
  bool explicit_signs = false;                                // "explicit"; "identity": no sign flip
  std::map<std::uint64_t, std::vector<std::int8_t>> signs;    // by input width, each +1 / -1
  std::vector<std::string> weight_names;                      // stored W diag(s) H
  std::vector<std::string> inverse_weight_names;              // rows stored rotated
  bool gdn_v_grouped = false;  // the fork permutes ssm_out's input from tiled to grouped heads first

  bool rotates(std::string_view tensor) const noexcept {
    return std::find(weight_names.begin(), weight_names.end(), tensor) != weight_names.end();
  }
  bool inverse(std::string_view tensor) const noexcept {
    return std::find(inverse_weight_names.begin(), inverse_weight_names.end(), tensor) != inverse_weight_names.end();
  }
  /// The signs s for a tensor whose rows are `width` long (all +1 in identity mode). Throws io_error
  /// naming the tensor when width is not a multiple of block_size or, in explicit mode, the file
  /// declares no signs of that width.
  std::vector<std::int8_t> signs_for(std::uint64_t width, std::string_view file = "<memory>",
                                     std::string_view tensor = {}) const;
};

namespace detail {

inline constexpr std::string_view hadamard_prefix = "prism.hadamard.";

/// The declaration in `metadata`, or nullopt when it has no prism.hadamard.* key. Refuses (io_error
/// naming the key) a version other than 1, a transform, axis or sign mode other than the fork's,
/// a key the fork does not define, a type other than the one the fork reads, a block size that is
/// not a power of 2 from 2 to 32768, an empty or repeated weight list, signs that are not +-1 or
/// do not add up.
inline std::optional<hadamard_declaration> parse_hadamard(const std::vector<metadata_entry>& metadata,
                                                          std::string_view file) {
  std::map<std::string_view, const value*> keys;
  for (const metadata_entry& e : metadata)
    if (e.key.starts_with(hadamard_prefix)) keys.emplace(e.key, &e.val);
  if (keys.empty()) return std::nullopt;
  static constexpr std::array<std::string_view, 10> known{
      "prism.hadamard.version",      "prism.hadamard.block_size",  "prism.hadamard.transform",
      "prism.hadamard.axis",         "prism.hadamard.sign_mode",   "prism.hadamard.weight_names",
      "prism.hadamard.inverse_weight_names", "prism.hadamard.sign_widths", "prism.hadamard.sign_values",
      "prism.hadamard.gdn_v_grouped"};
  for (const auto& [key, v] : keys)
    if (std::find(known.begin(), known.end(), key) == known.end())
      fail_key(file, key, "is not a key of the Hadamard rotation this reader implements (prism.hadamard version 1): "
                          "refused rather than ignored");
  auto get = [&](std::string_view key, value_type type, bool required) -> const value* {
    const auto it = keys.find(key);
    if (it == keys.end()) {
      if (required) fail_key(file, key, "missing: the file declares a Hadamard rotation (prism.hadamard.*) without it");
      return nullptr;
    }
    if (it->second->type() != type)
      fail_key(file, key, "is " + std::string(value_type_name(it->second->type())) + ", the rotation needs " +
                              std::string(value_type_name(type)));
    return it->second;
  };
  auto get_array = [&](std::string_view key, value_type element, bool required) -> const array* {
    const value* v = get(key, value_type::array, required);
    if (!v) return nullptr;
    const array& a = std::get<array>(v->data);
    if (a.element_type() != element)
      fail_key(file, key, "is an array of " + std::string(value_type_name(a.element_type())) + ", the rotation needs " +
                              std::string(value_type_name(element)));
    return &a;
  };
  auto expect_string = [&](std::string_view key, std::initializer_list<std::string_view> allowed) {
    const std::string& text = std::get<std::string>(get(key, value_type::string, true)->data);
    for (std::string_view a : allowed)
      if (text == a) return text;
    fail_key(file, key, quote(text) + " is not a rotation this reader implements (expected " + quote(*allowed.begin()) +
                            (allowed.size() > 1 ? " or " + quote(*(allowed.begin() + 1)) : std::string()) + ")");
  };
  hadamard_declaration h;
  if (const auto version = std::get<std::uint32_t>(get("prism.hadamard.version", value_type::uint32, true)->data);
      version != 1)
    fail_key(file, "prism.hadamard.version", "version " + std::to_string(version) +
                                                 " of the Hadamard rotation is not one this reader implements (1)");
  h.block_size = std::get<std::uint32_t>(get("prism.hadamard.block_size", value_type::uint32, true)->data);
  if (h.block_size == 0 || (h.block_size & (h.block_size - 1)) != 0)
    fail_key(file, "prism.hadamard.block_size", "block size " + std::to_string(h.block_size) + " is not a power of 2");
  if (h.block_size < 2 || h.block_size > 32768)  // hadamard_rotation's range (rotation.hpp)
    fail_key(file, "prism.hadamard.block_size", "block size " + std::to_string(h.block_size) +
                                                    " is outside the 2 to 32768 this library's rotation implements");
  (void)expect_string("prism.hadamard.transform", {"normalized-sylvester-walsh-hadamard"});
  (void)expect_string("prism.hadamard.axis", {"input-last-dimension"});
  h.explicit_signs = expect_string("prism.hadamard.sign_mode", {"identity", "explicit"}) == "explicit";
  h.weight_names = std::get<std::vector<std::string>>(get_array("prism.hadamard.weight_names", value_type::string, true)->items);
  if (h.weight_names.empty()) fail_key(file, "prism.hadamard.weight_names", "is empty: a rotation of no tensor");
  if (const array* inv = get_array("prism.hadamard.inverse_weight_names", value_type::string, false))
    h.inverse_weight_names = std::get<std::vector<std::string>>(inv->items);
  std::set<std::string_view> seen;
  for (const std::string& name : h.weight_names)
    if (!seen.insert(name).second) fail_key(file, "prism.hadamard.weight_names", "names tensor " + quote(name) + " twice");
  for (const std::string& name : h.inverse_weight_names)
    if (seen.contains(name))
      fail_key(file, "prism.hadamard.inverse_weight_names", "names tensor " + quote(name) + ", also in weight_names");
  if (const value* g = get("prism.hadamard.gdn_v_grouped", value_type::boolean, false)) h.gdn_v_grouped = std::get<bool>(g->data);
  const array* widths = get_array("prism.hadamard.sign_widths", value_type::int32, h.explicit_signs);
  const array* values = get_array("prism.hadamard.sign_values", value_type::int32, h.explicit_signs);
  if (!h.explicit_signs) {
    if (widths || values)
      fail_key(file, widths ? "prism.hadamard.sign_widths" : "prism.hadamard.sign_values",
               "signs given with sign mode \"identity\" (which has none)");
    return h;
  }
  const auto& w = std::get<std::vector<std::int32_t>>(widths->items);
  const auto& v = std::get<std::vector<std::int32_t>>(values->items);
  if (w.empty()) fail_key(file, "prism.hadamard.sign_widths", "is empty with sign mode \"explicit\"");
  std::size_t offset = 0;
  for (const std::int32_t width : w) {
    if (width <= 0 || std::uint32_t(width) % h.block_size != 0 || std::size_t(width) > v.size() - offset)
      fail_key(file, "prism.hadamard.sign_widths", "width " + std::to_string(width) + " is not a positive multiple of the block " +
                                                       std::to_string(h.block_size) + " within the " + std::to_string(v.size()) +
                                                       " sign values");
    std::vector<std::int8_t> signs;
    signs.reserve(std::size_t(width));
    for (std::size_t i = offset; i < offset + std::size_t(width); ++i) {
      if (v[i] != 1 && v[i] != -1)
        fail_key(file, "prism.hadamard.sign_values", "value " + std::to_string(i) + " is " + std::to_string(v[i]) + ", not +1 or -1");
      signs.push_back(std::int8_t(v[i]));
    }
    if (!h.signs.emplace(std::uint64_t(width), std::move(signs)).second)
      fail_key(file, "prism.hadamard.sign_widths", "width " + std::to_string(width) + " appears twice");
    offset += std::size_t(width);
  }
  if (offset != v.size())
    fail_key(file, "prism.hadamard.sign_values", "holds " + std::to_string(v.size()) + " values, the widths add up to " +
                                                     std::to_string(offset));
  return h;
}

}  // namespace detail

inline std::vector<std::int8_t> hadamard_declaration::signs_for(std::uint64_t width, std::string_view file,
                                                                std::string_view tensor) const {
  if (block_size == 0 || width % block_size != 0)
    detail::fail_tensor(file, tensor, "rows of " + std::to_string(width) + " weights are not a multiple of the Hadamard block " +
                                          std::to_string(block_size) + " (prism.hadamard.block_size)");
  if (!explicit_signs) return std::vector<std::int8_t>(std::size_t(width), 1);
  const auto it = signs.find(width);
  if (it == signs.end())
    detail::fail_tensor(file, tensor, "is rotated with explicit signs, but prism.hadamard.sign_widths has no width " +
                                          std::to_string(width));
  return it->second;
}

/// The prism.hadamard.* keys that declare the tensors of `rotated` (GGUF name, the rotation of the
/// layer written there) stored in a rotated basis, as PrismML's converter writes them: version 1,
/// the block size, sign mode "explicit" with one sign vector per input width (sign_widths
/// ascending, sign_values concatenated in that order), or "identity" when every sign is +1. Put
/// them in the writer's metadata: writer::write_bit_linear writes a rotated layer only into a
/// tensor declared with its rotation, and reader::read_bit_linear gives it back. Throws value_error
/// for an empty list, an empty or repeated name, block sizes that differ (a file has one) or two
/// rotations of one width with different signs (a file has one vector per width), naming them.
inline std::vector<metadata_entry> hadamard_metadata(const std::vector<std::pair<std::string, hadamard_rotation>>& rotated) {
  constexpr std::string_view what = "gguf::hadamard_metadata: ";
  if (rotated.empty()) throw value_error(std::string(what) + "no rotated tensor");
  const Index block = rotated.front().second.block_size();
  std::map<Index, std::pair<std::string_view, const std::vector<std::int8_t>*>> by_width;
  std::set<std::string_view> seen;
  std::vector<std::string> names;
  bool all_plus = true;
  for (const auto& [name, rotation] : rotated) {
    if (name.empty()) throw value_error(std::string(what) + "a tensor name is empty");
    if (!seen.insert(name).second) throw value_error(std::string(what) + "tensor " + detail::quote(name) + " is listed twice");
    if (rotation.block_size() != block)
      throw value_error(std::string(what) + "tensor " + detail::quote(name) + " is rotated in blocks of " +
                        std::to_string(rotation.block_size()) + ", tensor " + detail::quote(rotated.front().first) +
                        " in blocks of " + std::to_string(block) + " (a file declares one block size)");
    const auto [it, inserted] = by_width.emplace(rotation.in_features(), std::pair{std::string_view(name), &rotation.signs()});
    if (!inserted && *it->second.second != rotation.signs())
      throw value_error(std::string(what) + "tensors " + detail::quote(it->second.first) + " and " + detail::quote(name) +
                        " both have " + std::to_string(rotation.in_features()) +
                        " inputs but different signs (a file declares one sign vector per width)");
    all_plus = all_plus && std::all_of(rotation.signs().begin(), rotation.signs().end(), [](std::int8_t v) { return v == 1; });
    names.push_back(name);
  }
  std::vector<metadata_entry> keys{
      {"prism.hadamard.version", std::uint32_t{1}},
      {"prism.hadamard.block_size", std::uint32_t(block)},
      {"prism.hadamard.transform", std::string("normalized-sylvester-walsh-hadamard")},
      {"prism.hadamard.axis", std::string("input-last-dimension")},
      {"prism.hadamard.sign_mode", std::string(all_plus ? "identity" : "explicit")},
      {"prism.hadamard.weight_names", array(std::move(names))}};
  if (!all_plus) {
    std::vector<std::int32_t> widths, values;
    for (const auto& [width, entry] : by_width) {
      widths.push_back(std::int32_t(width));
      values.insert(values.end(), entry.second->begin(), entry.second->end());
    }
    keys.push_back({"prism.hadamard.sign_widths", array(std::move(widths))});
    keys.push_back({"prism.hadamard.sign_values", array(std::move(values))});
  }
  return keys;
}

// ---------------------------------------------------------------------------------------------
// Reader

/// A validated GGUF file; tensors are read on demand. Copies share the open file; reads are
/// thread-safe.
class reader {
 public:
  /// Opens and validates `file` (the header only is read). Throws io_error for a missing or
  /// malformed file.
  explicit reader(const std::filesystem::path& file)
      : reader(std::make_shared<const bitnet::detail::file_source>("gguf", file)) {}

  /// Validates an in-memory file image; `label` stands for the file name in messages.
  static reader from_bytes(std::vector<std::byte> bytes, std::string label = "<memory>") {
    return reader(std::make_shared<const bitnet::detail::memory_source>("gguf", std::move(bytes), std::move(label)));
  }

  const std::string& source_name() const noexcept { return source_->name(); }
  std::uint64_t file_size() const noexcept { return source_->size(); }
  std::uint32_t version() const noexcept { return version_; }
  std::uint32_t alignment() const noexcept { return alignment_; }
  /// Where the data section starts (the end of the header rounded up to the alignment).
  std::uint64_t data_offset() const noexcept { return data_offset_; }

  /// The key-value pairs in file order.
  const std::vector<metadata_entry>& metadata() const noexcept { return metadata_; }
  const value* find_value(std::string_view key) const noexcept {
    const auto it = keys_.find(key);
    return it == keys_.end() ? nullptr : &metadata_[it->second].val;
  }
  /// The value of `key` as T (the exact stored type); nullopt when the key is absent. Throws
  /// io_error when the key holds another type.
  template <class T>
  std::optional<T> get(std::string_view key) const {
    const value* v = find_value(key);
    if (!v) return std::nullopt;
    if (const T* x = std::get_if<T>(&v->data)) return *x;
    detail::fail_key(source_name(), key, "is " + std::string(value_type_name(v->type())) + ", not the type asked for");
  }

  /// The tensors in file (tensor-info) order.
  const std::vector<tensor_info>& tensors() const noexcept { return tensors_; }
  const tensor_info* find(std::string_view name) const noexcept {
    const auto it = index_.find(name);
    return it == index_.end() ? nullptr : &tensors_[it->second];
  }
  const tensor_info& info(std::string_view name) const {
    if (const tensor_info* t = find(name)) return *t;
    detail::fail_tensor(source_name(), name, "no such tensor in the file");
  }

  /// The raw bytes of a tensor.
  std::vector<std::byte> read_bytes(std::string_view name) const {
    const tensor_info& t = info(name);
    std::vector<std::byte> bytes(static_cast<std::size_t>(t.byte_size));
    source_->read_at(data_offset_ + t.offset, bytes);
    return bytes;
  }

  /// A F32 / F16 / BF16 / F64 tensor of 1 or 2 dimensions (trailing dims of 1 ignored) as a
  /// row-major matrix: rows = ne[1], columns = ne[0]. Exact except F64 into float (nearest even).
  /// Throws io_error for a tensor the file declares stored rotated (read_bytes reads it as stored).
  template <real_scalar T>
  Matrix<T> read_matrix(std::string_view name) const {
    const tensor_info& t = info(name);
    refuse_rotated(name);
    const auto [rows, cols] = matrix_shape(t);
    std::size_t element_bytes = 0;
    switch (t.type) {
      case tensor_type::F32: element_bytes = 4; break;
      case tensor_type::F16: case tensor_type::BF16: element_bytes = 2; break;
      case tensor_type::F64: element_bytes = 8; break;
      default:
        detail::fail_tensor(source_name(), name, "is " + std::string(tensor_type_name(t.type)) +
                                                     ", not a float tensor (F32, F16, BF16, F64)");
    }
    const std::vector<std::byte> bytes = read_bytes(name);
    Matrix<T> m(rows, cols);
    T* out = m.data();
    for (std::size_t i = 0; i < std::size_t(rows * cols); ++i) {
      const std::byte* p = bytes.data() + i * element_bytes;
      switch (t.type) {
        case tensor_type::F32: out[i] = static_cast<T>(detail::load_little_endian<float>(p)); break;
        case tensor_type::F16: out[i] = static_cast<T>(detail::half_to_float(detail::load_little_endian<std::uint16_t>(p))); break;
        case tensor_type::BF16:
          out[i] = static_cast<T>(detail::bfloat16_to_float(detail::load_little_endian<std::uint16_t>(p)));
          break;
        default: out[i] = static_cast<T>(detail::load_little_endian<double>(p)); break;
      }
    }
    return m;
  }

  /// A ternary tensor (a block format or I2_S) of 2 dimensions: codes out x in and its block scales.
  /// Throws io_error for a 2-bit code 3 (read_blocks reads it).
  ternary_tensor read_ternary(std::string_view name) const {
    const tensor_info& t = info(name);
    if (!is_ternary(t.type))
      detail::fail_tensor(source_name(), name, "is " + std::string(tensor_type_name(t.type)) +
                                                   ", not a ternary type (Q2_0, PQ2_0, PTQ1_0, TQ2_0, TQ1_0, I2_S)");
    const auto [rows, cols] = matrix_shape(t);
    return decode_ternary(t.type, read_bytes(name), rows, cols, source_name(), name);
  }

  /// A block-format tensor as ggml decodes it, Q2_0's +2 codes included (decode_blocks).
  block_tensor read_blocks(std::string_view name) const {
    const tensor_info& t = info(name);
    const auto [rows, cols] = matrix_shape(t);
    return decode_blocks(t.type, read_bytes(name), rows, cols, source_name(), name);
  }

  /// The codes and per-block scales of a block-format tensor for a group-scaled BitLinear (group =
  /// the block; to_groups), whatever its scales. A tensor the file declares rotated is stored as
  /// W diag(s) H: hadamard() says how its input must be rotated.
  ternary_tensor_groups read_ternary_groups(std::string_view name) const {
    return to_groups(read_ternary(name), source_name(), name);
  }

  /// A BitLinear from a ternary tensor (shape from the file), exactly as stored. With per_tensor
  /// options (the default): one scale sw = 1 / d when every block's d is the same, as converters
  /// write BitNet models, else a group-scaled layer (per_group, group = the format's block, the
  /// blocks' d as unit scales). With per_group options: always group-scaled (group_size 0 or the
  /// block; frozen scales, to_group_bit_linear). The caller's other options are kept. A tensor the
  /// file declares Hadamard-rotated (prism.hadamard.weight_names) gets the declared rotation as
  /// options.rotation (block_size, the signs of its input width): the layer computes
  /// W_stored (R x), as the fork does. Throws io_error for per_row options, a group_size that is not
  /// the block, per_group from I2_S (one scale per tensor), a code or scale no layer can hold, a
  /// rotation a BitLinear cannot represent (ssm_out with gdn_v_grouped: a head permutation first;
  /// a table stored with rotated rows, inverse_weight_names) and an options.rotation that differs
  /// from the declared one.
  template <real_scalar T>
  BitLinear<T> read_bit_linear(std::string_view name, std::optional<Vector<T>> bias = std::nullopt,
                               bitlinear_options options = {}) const {
    apply_declared_rotation(name, options);
    const ternary_tensor tensor = read_ternary(name);
    const bool equal_scales = std::all_of(tensor.scales.begin(), tensor.scales.end(), [&](float d) {
      return std::bit_cast<std::uint32_t>(d) == std::bit_cast<std::uint32_t>(tensor.scales.front());
    });
    switch (options.weight_scales) {
      case weight_scaling::per_row:
        detail::fail_tensor(source_name(), name, "stores one scale per block, not per row: read it with per_tensor or "
                                                 "per_group options");
      case weight_scaling::per_group:
        if (tensor.block_size == 0)
          detail::fail_tensor(source_name(), name, "is I2_S, one scale for the whole tensor: no per_group layer");
        if (options.group_size != 0 && options.group_size != tensor.block_size)
          detail::fail_tensor(source_name(), name, "options ask for groups of " + std::to_string(options.group_size) +
                                                       " weights, its " + std::string(tensor_type_name(info(name).type)) +
                                                       " blocks are " + std::to_string(tensor.block_size));
        break;
      case weight_scaling::per_tensor:
        if (equal_scales || tensor.block_size == 0)
          return to_bit_linear<T>(tensor, source_name(), name, std::move(bias), options);
        break;
    }
    return to_group_bit_linear<T>(to_groups(tensor, source_name(), name), std::move(bias), options);
  }

  /// The Hadamard rotation the file declares (validated when the file opened), if any.
  const std::optional<hadamard_declaration>& hadamard() const noexcept { return hadamard_; }

 private:
  explicit reader(std::shared_ptr<const bitnet::detail::byte_source> source) : source_(std::move(source)) { parse(); }

  // The rotation the file declares for tensor `name` (a linear layer's input), into options.
  void apply_declared_rotation(std::string_view name, bitlinear_options& options) const {
    if (!hadamard_ || hadamard_->inverse(name)) return refuse_rotated(name);
    if (!hadamard_->rotates(name)) return;
    if (hadamard_->gdn_v_grouped && name.find("ssm_out") != std::string_view::npos)
      detail::fail_tensor(source_name(), name,
                          "is rotated after a permutation of its input heads (prism.hadamard.gdn_v_grouped: tiled to "
                          "grouped value heads, then signs and the Hadamard transform), which a BitLinear's rotation "
                          "cannot represent");
    const tensor_info& t = info(name);
    const std::uint64_t width = t.ne.empty() ? 1 : t.ne[0];
    hadamard_rotation declared(Index(hadamard_->block_size), hadamard_->signs_for(width, source_name(), name));
    if (options.rotation && *options.rotation != declared)
      detail::fail_tensor(source_name(), name,
                          "options.rotation (block " + std::to_string(options.rotation->block_size()) + ", " +
                              std::to_string(options.rotation->in_features()) +
                              " inputs) is not the rotation the file declares for it (block " +
                              std::to_string(hadamard_->block_size) + ", the signs of width " + std::to_string(width) +
                              "); leave options.rotation empty to take the file's");
    options.rotation = std::move(declared);
  }

  void refuse_rotated(std::string_view name) const {
    if (!hadamard_) return;
    const bool forward = hadamard_->rotates(name);
    if (!forward && !hadamard_->inverse(name)) return;
    detail::fail_tensor(source_name(), name,
                        std::string("is stored in a Hadamard-rotated basis (") +
                            (forward ? "prism.hadamard.weight_names" : "prism.hadamard.inverse_weight_names") +
                            ", block " + std::to_string(hadamard_->block_size) +
                            ") and this read does not undo the rotation: read_ternary_groups / read_bytes with hadamard() "
                            "give the stored values and the transform");
  }

  std::pair<Index, Index> matrix_shape(const tensor_info& t) const {
    for (std::size_t i = 2; i < t.ne.size(); ++i)
      if (t.ne[i] != 1)
        detail::fail_tensor(source_name(), t.name, "has sizes " + detail::ne_text(t.ne) + ", not a matrix or vector");
    const std::uint64_t cols = t.ne.empty() ? 1 : t.ne[0];
    const std::uint64_t rows = t.ne.size() < 2 ? 1 : t.ne[1];
    if (rows == 0 || cols == 0) detail::fail_tensor(source_name(), t.name, "is empty " + detail::ne_text(t.ne));
    // Both fit Index: their product is a checked element count <= INT64_MAX.
    return {Index(rows), Index(cols)};
  }

  void parse() {
    const std::string& file = source_name();
    detail::cursor in(*source_);
    std::array<std::byte, 4> magic;
    in.read(magic, "the magic");
    if (magic != std::array{std::byte{'G'}, std::byte{'G'}, std::byte{'U'}, std::byte{'F'}}) {
      char text[128];
      std::snprintf(text, sizeof text, "not a GGUF file: the magic is %02x %02x %02x %02x, expected 47 47 55 46 (\"GGUF\")",
                    unsigned(magic[0]), unsigned(magic[1]), unsigned(magic[2]), unsigned(magic[3]));
      detail::fail(file, text);
    }
    version_ = in.read<std::uint32_t>("the version");
    if (version_ != 2 && version_ != 3)
      detail::fail(file, "version " + std::to_string(version_) + " is not supported (2 and 3 are" +
                             ((version_ & 0xffff) == 0 ? "; a big-endian file?)" : ")"));
    const auto tensor_count = in.read<std::uint64_t>("the tensor count");
    const auto kv_count = in.read<std::uint64_t>("the key-value count");
    // Each pair takes at least 14 bytes (key length, a 1-byte key, type, a 1-byte value).
    if (kv_count > in.remaining() / 14)
      detail::fail(file, "key-value count " + std::to_string(kv_count) + " cannot fit in the " +
                             std::to_string(in.remaining()) + " bytes left (each pair takes at least 14)");
    metadata_.reserve(static_cast<std::size_t>(kv_count));
    for (std::uint64_t i = 0; i < kv_count; ++i) {
      std::string key = in.read_string("key " + std::to_string(i));
      if (key.empty()) detail::fail(file, "key " + std::to_string(i) + " is empty");
      if (const auto at = detail::invalid_utf8_at(key))
        detail::fail_key(file, key, "the key is not valid UTF-8 (byte " + std::to_string(*at) + ")");
      if (keys_.contains(key)) detail::fail_key(file, key, "the key appears twice");
      const auto type_id = in.read<std::uint32_t>("the value type of key " + detail::quote(key));
      if (type_id >= value_type_count)
        detail::fail_key(file, key, "unknown value type " + std::to_string(type_id) + " (valid: 0-12)");
      value v = detail::read_value(in, file, key, static_cast<value_type>(type_id), 0);
      keys_.emplace(key, metadata_.size());
      metadata_.push_back({std::move(key), std::move(v)});
    }
    if (const value* a = find_value("general.alignment")) {
      const auto* x = std::get_if<std::uint32_t>(&a->data);
      if (!x) detail::fail_key(file, "general.alignment", "is " + std::string(value_type_name(a->type())) + ", must be UINT32");
      if (*x == 0 || (*x & (*x - 1)) != 0)
        detail::fail_key(file, "general.alignment", "alignment " + std::to_string(*x) + " is not a power of 2");
      alignment_ = *x;
    }

    // Each tensor info takes at least 25 bytes (name length, a 1-byte name, dims, type, offset).
    if (tensor_count > in.remaining() / 25)
      detail::fail(file, "tensor count " + std::to_string(tensor_count) + " cannot fit in the " +
                             std::to_string(in.remaining()) + " bytes left (each tensor info takes at least 25)");
    tensors_.reserve(static_cast<std::size_t>(tensor_count));
    for (std::uint64_t i = 0; i < tensor_count; ++i) tensors_.push_back(read_tensor_info(in, i));

    data_offset_ = in.position();
    if (tensor_count > 0) data_offset_ += (alignment_ - data_offset_ % alignment_) % alignment_;
    if (data_offset_ > file_size())
      detail::fail(file, "truncated: the data section starts at byte " + std::to_string(data_offset_) +
                             ", past the end of the file (" + std::to_string(file_size()) + " bytes)");
    const std::uint64_t data_size = file_size() - data_offset_;
    // Id 42 is mainline's Q2_0 (18 bytes per 64 weights); some PrismML builds wrote 34 bytes per 128
    // under the same id, which then overlap or overrun: say so where that is the likely cause.
    auto q2_0_hint = [](const tensor_info& t) {
      return t.type == tensor_type::Q2_0 ? std::string(" (Q2_0 is read as mainline's 18 bytes per 64 weights; some "
                                                       "PrismML builds wrote 34 bytes per 128 under the same id 42)")
                                         : std::string();
    };
    for (const tensor_info& t : tensors_) {
      if (t.offset % alignment_ != 0)
        detail::fail_tensor(file, t.name, "offset " + std::to_string(t.offset) + " is not a multiple of the alignment " +
                                              std::to_string(alignment_));
      if (t.offset > data_size || t.byte_size > data_size - t.offset)
        detail::fail_tensor(file, t.name, "bytes [" + std::to_string(t.offset) + ", +" + std::to_string(t.byte_size) +
                                              ") run past the end of the data section (" + std::to_string(data_size) +
                                              " bytes)" + q2_0_hint(t));
    }
    std::vector<const tensor_info*> by_offset;
    by_offset.reserve(tensors_.size());
    for (const tensor_info& t : tensors_)
      if (t.byte_size > 0) by_offset.push_back(&t);
    std::sort(by_offset.begin(), by_offset.end(),
              [](const tensor_info* a, const tensor_info* b) { return a->offset < b->offset; });
    for (std::size_t i = 1; i < by_offset.size(); ++i)
      if (by_offset[i]->offset < by_offset[i - 1]->offset + by_offset[i - 1]->byte_size)
        detail::fail_tensor(file, by_offset[i]->name, "bytes [" + std::to_string(by_offset[i]->offset) + ", +" +
                                                          std::to_string(by_offset[i]->byte_size) + ") overlap tensor " +
                                                          detail::quote(by_offset[i - 1]->name) +
                                                          q2_0_hint(*by_offset[i - 1]));
    hadamard_ = detail::parse_hadamard(metadata_, file);
  }

  tensor_info read_tensor_info(detail::cursor& in, std::uint64_t i) {
    const std::string& file = source_name();
    tensor_info t;
    t.name = in.read_string("the name of tensor " + std::to_string(i));
    if (t.name.empty()) detail::fail(file, "the name of tensor " + std::to_string(i) + " is empty");
    if (t.name.size() > max_tensor_name_length)
      detail::fail_tensor(file, t.name, "the name has " + std::to_string(t.name.size()) + " bytes, over ggml's limit of " +
                                            std::to_string(max_tensor_name_length));
    if (const auto at = detail::invalid_utf8_at(t.name))
      detail::fail_tensor(file, t.name, "the name is not valid UTF-8 (byte " + std::to_string(*at) + ")");
    if (index_.contains(t.name)) detail::fail_tensor(file, t.name, "the name appears twice");
    const auto dims = in.read<std::uint32_t>("the dimension count of tensor " + detail::quote(t.name));
    if (dims > max_dimensions)
      detail::fail_tensor(file, t.name, std::to_string(dims) + " dimensions, more than ggml's " + std::to_string(max_dimensions));
    for (std::uint32_t k = 0; k < dims; ++k) {
      const auto n = in.read<std::uint64_t>("dimension " + std::to_string(k) + " of tensor " + detail::quote(t.name));
      if (n > std::uint64_t(std::numeric_limits<std::int64_t>::max()))
        detail::fail_tensor(file, t.name, "dimension " + std::to_string(k) + " is " + std::to_string(n) + ", over INT64_MAX");
      t.ne.push_back(n);
    }
    if (!element_count(t.ne))
      detail::fail_tensor(file, t.name, "sizes " + detail::ne_text(t.ne) + " hold more than INT64_MAX elements");
    const auto type_id = in.read<std::uint32_t>("the type of tensor " + detail::quote(t.name));
    const std::optional<type_traits> traits = find_tensor_type(type_id);
    if (!traits) detail::fail_tensor(file, t.name, "unknown ggml type id " + std::to_string(type_id));
    t.type = traits->type;
    const std::uint64_t row = t.ne.empty() ? 1 : t.ne[0];
    if (row % traits->block_size != 0)
      detail::fail_tensor(file, t.name, "rows of " + std::to_string(row) + " elements are not a multiple of the " +
                                            std::string(traits->name) + " block size " + std::to_string(traits->block_size));
    const std::optional<std::uint64_t> bytes = tensor_byte_size(t.type, t.ne);
    if (!bytes)
      detail::fail_tensor(file, t.name, "sizes " + detail::ne_text(t.ne) + " of " + std::string(traits->name) +
                                            " take more than 2^64 bytes");
    t.byte_size = *bytes;
    t.offset = in.read<std::uint64_t>("the offset of tensor " + detail::quote(t.name));
    index_.emplace(t.name, std::size_t(i));
    return t;
  }

  std::shared_ptr<const bitnet::detail::byte_source> source_;
  std::uint32_t version_ = 0;
  std::uint32_t alignment_ = default_alignment;
  std::uint64_t data_offset_ = 0;
  std::vector<metadata_entry> metadata_;
  std::map<std::string, std::size_t, std::less<>> keys_;
  std::vector<tensor_info> tensors_;
  std::map<std::string, std::size_t, std::less<>> index_;
  std::optional<hadamard_declaration> hadamard_;
};

// ---------------------------------------------------------------------------------------------
// Writer

/// Writes a GGUF v3 file. Metadata and tensors are declared up front (the header comes first);
/// tensors are laid out in declaration order, each at the running sum of the previous sizes padded
/// to the alignment (what ggml's reader requires), and may then be written in any order, each
/// exactly once. The file is assembled under a temporary name next to `path` and renamed into
/// place by finish(): an existing file at `path` is replaced whole or not at all.
class writer {
 public:
  /// Validates the declarations and writes the header. The alignment is general.alignment when the
  /// metadata has it (UINT32, a power of 2), else 32. Throws value_error for a bad declaration
  /// (empty, duplicate or non-UTF-8 key or name, a name over 63 bytes, 0 or more than 4 sizes, a
  /// row length that is not a multiple of the block size, sizes that overflow, arrays nested
  /// deeper than max_array_depth), io_error when the temporary file cannot be written.
  writer(std::filesystem::path path, std::vector<metadata_entry> metadata, std::vector<tensor_spec> tensors)
      : path_(std::move(path)) {
    std::set<std::string_view> keys;
    for (const metadata_entry& entry : metadata) {
      if (entry.key.empty()) throw value_error(message({}, "a metadata key is empty"));
      if (detail::invalid_utf8_at(entry.key)) throw value_error(message({}, "key " + detail::quote(entry.key) + " is not valid UTF-8"));
      if (!keys.insert(entry.key).second) throw value_error(message({}, "key " + detail::quote(entry.key) + " declared twice"));
      if (const auto* a = std::get_if<array>(&entry.val.data); a && detail::array_depth(*a) > max_array_depth)
        throw value_error(message({}, "key " + detail::quote(entry.key) + ": arrays nested deeper than " +
                                          std::to_string(max_array_depth) + " levels"));
      if (entry.key == "general.alignment") {
        const auto* x = std::get_if<std::uint32_t>(&entry.val.data);
        if (!x || *x == 0 || (*x & (*x - 1)) != 0)
          throw value_error(message({}, "general.alignment must be a UINT32 power of 2"));
        alignment_ = *x;
      }
    }
    try {  // a declared rotation must be one the reader accepts (and write_bit_linear checks layers against it)
      hadamard_ = detail::parse_hadamard(metadata, path_.string());
    } catch (const io_error& e) {
      throw value_error(e.what());
    }
    std::set<std::string> names;  // copies: the specs' names are moved into layout_ below
    std::uint64_t offset = 0;
    for (tensor_spec& spec : tensors) {
      if (spec.name.empty()) throw value_error(message({}, "a tensor name is empty"));
      if (spec.name.size() > max_tensor_name_length)
        throw value_error(message(spec.name, "the name has " + std::to_string(spec.name.size()) + " bytes, over ggml's limit of " +
                                                 std::to_string(max_tensor_name_length)));
      if (detail::invalid_utf8_at(spec.name)) throw value_error(message(spec.name, "the name is not valid UTF-8"));
      if (!names.insert(spec.name).second) throw value_error(message(spec.name, "declared twice"));
      if (spec.ne.empty() || spec.ne.size() > max_dimensions)
        throw value_error(message(spec.name, "needs 1 to 4 sizes, got " + std::to_string(spec.ne.size())));
      const type_traits traits = traits_of(spec.type);
      if (traits.block_size == 0) throw value_error(message(spec.name, "unknown tensor type"));
      if (spec.ne[0] % row_multiple(spec.type) != 0)
        throw value_error(message(spec.name, "rows of " + std::to_string(spec.ne[0]) + " elements are not a multiple of " +
                                                 std::to_string(row_multiple(spec.type)) + " (" + std::string(traits.name) + ")"));
      const std::optional<std::uint64_t> bytes = tensor_byte_size(spec.type, spec.ne);
      if (!bytes) throw value_error(message(spec.name, "sizes " + detail::ne_text(spec.ne) + " overflow"));
      const std::uint64_t padded = *bytes + (alignment_ - *bytes % alignment_) % alignment_;
      if (padded < *bytes || padded > std::numeric_limits<std::uint64_t>::max() - offset)
        throw value_error(message(spec.name, "the file would exceed 2^64 bytes"));
      layout_.push_back({std::move(spec.name), spec.type, std::move(spec.ne), offset, *bytes});
      offset += padded;
    }
    data_size_ = offset;
    for (std::size_t i = 0; i < layout_.size(); ++i) index_.emplace(layout_[i].name, i);
    written_.assign(layout_.size(), false);

    detail::byte_writer header;
    for (const char c : std::string_view("GGUF")) header.put<std::uint8_t>(std::uint8_t(c));
    header.put<std::uint32_t>(format_version);
    header.put<std::uint64_t>(layout_.size());
    header.put<std::uint64_t>(metadata.size());
    for (const metadata_entry& entry : metadata) {
      header.put_string(entry.key);
      header.put<std::uint32_t>(static_cast<std::uint32_t>(entry.val.type()));
      header.put_payload(entry.val);
    }
    for (const tensor_info& t : layout_) {
      header.put_string(t.name);
      header.put<std::uint32_t>(std::uint32_t(t.ne.size()));
      for (const std::uint64_t n : t.ne) header.put<std::uint64_t>(n);
      header.put<std::uint32_t>(static_cast<std::uint32_t>(t.type));
      header.put<std::uint64_t>(t.offset);
    }
    if (!layout_.empty()) header.bytes.resize(header.bytes.size() + (alignment_ - header.bytes.size() % alignment_) % alignment_);
    data_offset_ = header.bytes.size();

    temporary_ = bitnet::detail::temporary_name(path_);
    try {
      out_.open(temporary_, std::ios::binary | std::ios::trunc);
      if (!out_) throw io_error(message({}, "cannot create the temporary file " + temporary_.string()));
      out_.write(reinterpret_cast<const char*>(header.bytes.data()), static_cast<std::streamsize>(header.bytes.size()));
      check_stream("writing the header");
    } catch (...) {  // the destructor does not run for a throwing constructor: clean up here
      out_.close();
      std::error_code ignored;
      std::filesystem::remove(temporary_, ignored);
      throw;
    }
  }

  writer(const writer&) = delete;
  writer& operator=(const writer&) = delete;

  /// Discards the temporary file unless finish() succeeded; the target file is untouched then.
  ~writer() {
    if (!finished_) {
      out_.close();
      std::error_code ignored;
      std::filesystem::remove(temporary_, ignored);
    }
  }

  const std::filesystem::path& path() const noexcept { return path_; }
  std::uint32_t alignment() const noexcept { return alignment_; }
  /// The tensors with their offsets in the data section, in declaration order.
  const std::vector<tensor_info>& layout() const noexcept { return layout_; }

  /// Writes a tensor's bytes (exactly its size).
  void write_bytes(std::string_view name, std::span<const std::byte> bytes) {
    const std::size_t i = claim(name);
    if (bytes.size() != layout_[i].byte_size)
      throw shape_error(message(name, "got " + std::to_string(bytes.size()) + " bytes, declared " +
                                          std::to_string(layout_[i].byte_size)));
    out_.seekp(static_cast<std::streamoff>(data_offset_ + layout_[i].offset));
    out_.write(reinterpret_cast<const char*>(bytes.data()), static_cast<std::streamsize>(bytes.size()));
    check_stream("writing tensor " + detail::quote(name));
    written_[i] = true;
  }

  /// Writes a float tensor (declared F32, F16, BF16 or F64) from a row-major matrix or vector whose
  /// size matches the declaration (rows x columns = ne[1] x ne[0]), rounding to nearest even.
  /// Throws value_error naming an element too large for the type.
  template <class Derived>
    requires real_scalar<typename Derived::Scalar>
  void write_floats(std::string_view name, const Eigen::DenseBase<Derived>& values) {
    const std::size_t i = claim(name);
    const tensor_info& t = layout_[i];
    const std::uint64_t cols = t.ne[0], rows = t.ne.size() > 1 ? t.ne[1] : 1;
    const bool matrix_fits = t.element_count() == std::uint64_t(values.size()) &&
                             std::uint64_t(values.rows()) == rows && std::uint64_t(values.cols()) == cols;
    const bool vector_fits = t.ne.size() == 1 && (values.rows() == 1 || values.cols() == 1) &&
                             std::uint64_t(values.size()) == cols;
    const bool fits = matrix_fits || vector_fits;
    if (!fits)
      throw shape_error(message(name, "got a " + std::to_string(values.rows()) + "x" + std::to_string(values.cols()) +
                                          " matrix, declared sizes " + detail::ne_text(t.ne)));
    std::size_t element_bytes = 0;
    std::optional<bitnet::detail::float_format> format;
    switch (t.type) {
      case tensor_type::F32: element_bytes = 4; format = detail::binary32; break;
      case tensor_type::F16: element_bytes = 2; format = detail::binary16; break;
      case tensor_type::BF16: element_bytes = 2; format = detail::bfloat16; break;
      case tensor_type::F64: element_bytes = 8; break;
      default: throw value_error(message(name, "is declared " + std::string(tensor_type_name(t.type)) + ", not a float type"));
    }
    std::vector<std::byte> bytes(std::size_t(values.size()) * element_bytes);
    std::size_t k = 0;
    for (Index r = 0; r < values.rows(); ++r)
      for (Index c = 0; c < values.cols(); ++c, ++k) {
        const double v = static_cast<double>(values.derived().coeff(r, c));
        std::byte* p = bytes.data() + k * element_bytes;
        if (!format) {
          detail::store_little_endian(p, v);
          continue;
        }
        const std::optional<double> rounded = detail::round_to_format(v, *format);
        if (!rounded)
          throw value_error(message(name, "element " + std::to_string(k) + " (" + detail::number_text(v) +
                                              ") cannot be stored as " + std::string(tensor_type_name(t.type))));
        if (t.type == tensor_type::F32) detail::store_little_endian(p, static_cast<float>(*rounded));
        else if (t.type == tensor_type::F16) detail::store_little_endian(p, detail::encode_half(*rounded));
        else detail::store_little_endian(p, detail::encode_bfloat16(*rounded));
      }
    write_bytes(name, bytes);
  }

  /// Writes a BitLinear's codes and scales into a tensor declared with a ternary type and sizes
  /// {in_features, out_features} (encode_bit_linear: per_group layers need a block format whose
  /// block is the group); returns what the storage did to the scale. A layer with an input rotation
  /// goes only into a tensor the metadata declares rotated with that rotation (hadamard_metadata),
  /// and a tensor declared rotated only takes such a layer: value_error otherwise, since the
  /// reader rebuilds the rotation from the declaration.
  template <real_scalar T>
  scale_rounding write_bit_linear(std::string_view name, const BitLinear<T>& layer) {
    check_rotation(name, layer);
    const tensor_info& t = layout_[claim(name)];
    if (!is_ternary(t.type))
      throw value_error(message(name, "is declared " + std::string(tensor_type_name(t.type)) + ", not a ternary type"));
    if (t.ne.size() != 2 || t.ne[0] != std::uint64_t(layer.in_features()) || t.ne[1] != std::uint64_t(layer.out_features()))
      throw shape_error(message(name, "declared sizes " + detail::ne_text(t.ne) + ", the layer is " +
                                          std::to_string(layer.out_features()) + "x" + std::to_string(layer.in_features()) +
                                          " (sizes [" + std::to_string(layer.in_features()) + ", " +
                                          std::to_string(layer.out_features()) + "])"));
    encoded_ternary encoded = encode_bit_linear(layer, t.type, name);
    write_bytes(name, encoded.bytes);
    return encoded.scale;
  }

  /// Writes ternary codes (out x in) with one scale per row and group of `group_size` inputs into a
  /// tensor declared with a block format whose block is the group and sizes {in, out}
  /// (encode_ternary_groups); returns the block whose fp16 d is relatively furthest off.
  template <class Derived, class ScalesDerived>
  scale_rounding write_ternary_groups(std::string_view name, const Eigen::MatrixBase<Derived>& codes,
                                      const Eigen::MatrixBase<ScalesDerived>& unit_scales, Index group_size) {
    const tensor_info& t = layout_[claim(name)];
    if (t.ne.size() != 2 || t.ne[0] != std::uint64_t(codes.cols()) || t.ne[1] != std::uint64_t(codes.rows()))
      throw shape_error(message(name, "declared sizes " + detail::ne_text(t.ne) + ", the codes are " +
                                          std::to_string(codes.rows()) + "x" + std::to_string(codes.cols())));
    encoded_ternary encoded = encode_ternary_groups(t.type, codes, unit_scales, group_size, name);
    write_bytes(name, encoded.bytes);
    return encoded.scale;
  }

  /// Checks every declared tensor was written, pads the data section to its full size, closes the
  /// file and renames it into place.
  void finish() {
    if (finished_) throw io_error(message({}, "finish() called twice"));
    for (std::size_t i = 0; i < layout_.size(); ++i)
      if (!written_[i]) throw io_error(message(layout_[i].name, "declared but never written"));
    // ggml reads the data section whole, padding after the last tensor included.
    if (!layout_.empty()) {
      const tensor_info& last = layout_.back();
      const std::uint64_t end = last.offset + last.byte_size;
      const std::vector<char> zeros(static_cast<std::size_t>(data_size_ - end), '\0');
      out_.seekp(static_cast<std::streamoff>(data_offset_ + end));
      out_.write(zeros.data(), static_cast<std::streamsize>(zeros.size()));
    }
    out_.flush();
    check_stream("flushing");
    out_.close();
    if (out_.fail()) throw io_error(message({}, "closing the temporary file failed"));
    std::error_code ec;
    std::filesystem::rename(temporary_, path_, ec);
    if (ec) throw io_error(message({}, "cannot rename the temporary file into place: " + ec.message()));
    finished_ = true;
  }

 private:
  std::string message(std::string_view tensor, std::string_view rule) const {
    return detail::message(path_.string(), tensor.empty() ? detail::subject::none : detail::subject::tensor, tensor, rule);
  }

  template <real_scalar T>
  void check_rotation(std::string_view name, const BitLinear<T>& layer) const {
    const std::optional<hadamard_rotation>& rotation = layer.options().rotation;
    const bool declared = hadamard_ && hadamard_->rotates(name);
    if (!rotation) {
      if (declared)
        throw value_error(message(name, "is declared rotated (prism.hadamard.weight_names), the layer has no rotation"));
      return;
    }
    const std::string layer_rotation = "the layer's rotation (block " + std::to_string(rotation->block_size()) + ", " +
                                       std::to_string(rotation->in_features()) + " inputs)";
    if (!declared)
      throw value_error(message(name, layer_rotation + " is not declared: list the tensor in the metadata's "
                                                       "prism.hadamard.* keys (gguf::hadamard_metadata)"));
    const auto width = std::uint64_t(rotation->in_features());
    const auto signs = hadamard_->signs.find(width);
    if (Index(hadamard_->block_size) != rotation->block_size() || (hadamard_->explicit_signs && signs == hadamard_->signs.end()) ||
        (hadamard_->explicit_signs ? signs->second != rotation->signs()
                                   : !std::all_of(rotation->signs().begin(), rotation->signs().end(),
                                                  [](std::int8_t v) { return v == 1; })))
      throw value_error(message(name, layer_rotation + " is not the one the metadata declares for width " +
                                          std::to_string(width) + " (block " + std::to_string(hadamard_->block_size) +
                                          ", sign mode " + (hadamard_->explicit_signs ? "explicit" : "identity") + ")"));
  }

  std::size_t claim(std::string_view name) const {
    if (finished_) throw io_error(message(name, "the file is already finished"));
    const auto it = index_.find(name);
    if (it == index_.end()) throw io_error(message(name, "was not declared"));
    if (written_[it->second]) throw io_error(message(name, "written twice"));
    return it->second;
  }

  void check_stream(const std::string& what) {
    if (!out_) throw io_error(message({}, what + " failed in " + temporary_.string()));
  }

  std::filesystem::path path_;
  std::filesystem::path temporary_;
  std::ofstream out_;
  std::uint32_t alignment_ = default_alignment;
  std::uint64_t data_offset_ = 0;
  std::uint64_t data_size_ = 0;
  std::vector<tensor_info> layout_;
  std::map<std::string, std::size_t, std::less<>> index_;
  std::vector<bool> written_;
  bool finished_ = false;
  std::optional<hadamard_declaration> hadamard_;
};


// ---------------------------------------------------------------------------------------------
// Whole models: arch "llama" (llama.cpp's loader, convert_hf_to_gguf.py LlamaModel, gguf-py names)
// and arch "bitnet-25" (bitnet-b1.58-2B-4T's graph as ik_llama.cpp and bitnet.cpp name it)

/// The model graphs written here. llama: Llama (SiLU FFN, q / k rows permuted for llama.cpp's
/// interleaved rope). bitnet_b158 and bitnet_25: the BitNet b1.58 2B-4T graph (relu^2 FFN,
/// attn_sub_norm before attn_output, ffn_sub_norm before ffn_down, NEOX rope: rows kept in order)
/// under its two arch names, "bitnet-b1.58" (what bitnet.cpp's converter writes since 2B-4T's
/// re-release) and "bitnet-25" (the first one); ik_llama.cpp reads both with one loader and graph
/// (src/llama-arch.cpp, build_bitnet_158). Mainline llama.cpp names its BitNet graph "bitnet", a
/// different arch in ik_llama.cpp (1bitLLM's graph), so one file cannot serve both engines: the
/// target is the caller's choice.
enum class model_arch { llama, bitnet_b158, bitnet_25 };

inline std::string_view model_arch_name(model_arch arch) noexcept {
  return arch == model_arch::bitnet_b158 ? "bitnet-b1.58" : arch == model_arch::bitnet_25 ? "bitnet-25" : "llama";
}

/// Whether `arch` is one of the BitNet b1.58 graph's names.
inline bool is_bitnet_arch(model_arch arch) noexcept { return arch != model_arch::llama; }

/// What llama.cpp reads for arch "llama" (and the same keys under "bitnet-25"), with the
/// config.json field each comes from.
struct llama_hparams {
  std::uint32_t context_length = 0;       // max_position_embeddings
  std::uint32_t embedding_length = 0;     // hidden_size
  std::uint32_t block_count = 0;          // num_hidden_layers
  std::uint32_t feed_forward_length = 0;  // intermediate_size
  std::uint32_t head_count = 0;           // num_attention_heads
  std::uint32_t head_count_kv = 0;        // num_key_value_heads (== head_count without GQA)
  std::uint32_t vocab_size = 0;           // vocab_size
  float rms_norm_eps = 1e-6f;             // rms_norm_eps
  float rope_freq_base = 10000.0f;        // rope_theta
  std::string name;                       // general.name (left out when empty)
  model_arch arch = model_arch::llama;    // the key prefix, general.architecture and the tensor plan

  std::uint32_t head_dim() const noexcept { return head_count ? embedding_length / head_count : 0; }
};

/// The key-value pairs of arch "llama" for `h`, typed exactly as the loader checks them (counts
/// UINT32, epsilon and rope base FLOAT32). head_count_kv and rope.freq_base are always written: the
/// loader silently falls back to defaults when they are missing. Throws value_error naming the
/// field for a zero count, a hidden size that the heads do not divide, kv heads that do not divide
/// the heads, an odd head size (rope rotates pairs), or an epsilon / rope base not finite and > 0.
inline std::vector<metadata_entry> llama_metadata(const llama_hparams& h) {
  auto require = [](bool ok, const std::string& what) {
    if (!ok) throw value_error("gguf::llama_metadata: " + what);
  };
  require(h.context_length > 0, "context_length is 0");
  require(h.embedding_length > 0, "embedding_length is 0");
  require(h.block_count > 0, "block_count is 0");
  require(h.feed_forward_length > 0, "feed_forward_length is 0");
  require(h.head_count > 0, "head_count is 0");
  require(h.head_count_kv > 0, "head_count_kv is 0");
  require(h.vocab_size > 0, "vocab_size is 0");
  require(h.embedding_length % h.head_count == 0, "embedding_length " + std::to_string(h.embedding_length) +
                                                      " is not a multiple of head_count " + std::to_string(h.head_count));
  require(h.head_count % h.head_count_kv == 0, "head_count " + std::to_string(h.head_count) +
                                                   " is not a multiple of head_count_kv " + std::to_string(h.head_count_kv));
  require(h.head_dim() % 2 == 0, "the head size " + std::to_string(h.head_dim()) + " is odd (rope rotates pairs)");
  require(std::isfinite(h.rms_norm_eps) && h.rms_norm_eps > 0, "rms_norm_eps is not finite and > 0");
  require(std::isfinite(h.rope_freq_base) && h.rope_freq_base > 0, "rope_freq_base is not finite and > 0");
  const std::string arch(model_arch_name(h.arch));
  std::vector<metadata_entry> m{{"general.architecture", arch}};
  if (!h.name.empty()) m.push_back({"general.name", h.name});
  m.push_back({"general.quantization_version", std::uint32_t(2)});
  m.push_back({arch + ".context_length", h.context_length});
  m.push_back({arch + ".embedding_length", h.embedding_length});
  m.push_back({arch + ".block_count", h.block_count});
  m.push_back({arch + ".feed_forward_length", h.feed_forward_length});
  m.push_back({arch + ".rope.dimension_count", h.head_dim()});
  m.push_back({arch + ".attention.head_count", h.head_count});
  m.push_back({arch + ".attention.head_count_kv", h.head_count_kv});
  m.push_back({arch + ".attention.layer_norm_rms_epsilon", h.rms_norm_eps});
  m.push_back({arch + ".rope.freq_base", h.rope_freq_base});
  m.push_back({arch + ".vocab_size", h.vocab_size});
  return m;
}

/// Llama 3.x's rope scaling (config.json "rope_scaling" with rope_type "llama3"): long wavelengths
/// are stretched by `factor`, short ones kept, the band between blended.
struct llama3_rope_scaling {
  double factor = 8.0;
  double low_freq_factor = 1.0;
  double high_freq_factor = 4.0;
  double original_context_length = 8192.0;  // original_max_position_embeddings
};

/// The "rope_freqs.weight" tensor llama.cpp multiplies the wavelengths of arch llama's rope by (one
/// F32 per pair of a head, head_dim / 2 of them), as transformers' llama3 rope defines it and
/// convert_hf_to_gguf.py writes it: for pair i, wavelength w = 2 pi base^(2i / head_dim); 1 when w <
/// original / high_freq_factor, factor when w > original / low_freq_factor, else
/// 1 / ((1 - m) / factor + m) with m = (original / w - low_freq_factor) / (high_freq_factor -
/// low_freq_factor). Computed in double, rounded once to float (the converter computes in float32
/// with torch: the two agree within an ulp or two). Throws value_error for a factor not finite and
/// > 0, low_freq_factor >= high_freq_factor, or an original context not > 0.
inline std::vector<float> llama3_rope_factors(const llama_hparams& h, const llama3_rope_scaling& s) {
  const auto positive = [](double v) { return std::isfinite(v) && v > 0; };
  if (!positive(s.factor) || !positive(s.low_freq_factor) || !positive(s.high_freq_factor) ||
      !positive(s.original_context_length) || !(s.low_freq_factor < s.high_freq_factor))
    throw value_error("gguf::llama3_rope_factors: factor " + std::to_string(s.factor) + ", low_freq_factor " +
                      std::to_string(s.low_freq_factor) + ", high_freq_factor " + std::to_string(s.high_freq_factor) +
                      ", original context " + std::to_string(s.original_context_length) +
                      ": each must be finite and > 0, and low_freq_factor < high_freq_factor");
  const double pi = 3.14159265358979323846;
  const std::uint32_t hd = h.head_dim();
  std::vector<float> factors(hd / 2);
  const double short_wavelength = s.original_context_length / s.high_freq_factor;
  const double long_wavelength = s.original_context_length / s.low_freq_factor;
  for (std::uint32_t i = 0; i < hd / 2; ++i) {
    const double wavelength = 2 * pi * std::pow(double(h.rope_freq_base), 2.0 * i / hd);
    double f = 1;
    if (wavelength > long_wavelength) {
      f = s.factor;
    } else if (wavelength >= short_wavelength) {
      const double m = (s.original_context_length / wavelength - s.low_freq_factor) / (s.high_freq_factor - s.low_freq_factor);
      f = 1 / ((1 - m) / s.factor + m);
    }
    factors[i] = float(f);
  }
  return factors;
}

/// The GGUF name of a Hugging Face Llama (or, for the BitNet archs, BitNet) tensor (gguf-py's tensor
/// map), or nullopt for a name the arch has no tensor for.
inline std::optional<std::string> llama_tensor_name(std::string_view hf, model_arch arch = model_arch::llama) {
  if (hf == "model.embed_tokens.weight") return "token_embd.weight";
  if (hf == "model.norm.weight") return "output_norm.weight";
  if (hf == "lm_head.weight") return "output.weight";
  constexpr std::string_view prefix = "model.layers.";
  if (!hf.starts_with(prefix)) return std::nullopt;
  hf.remove_prefix(prefix.size());
  const std::size_t dot = hf.find('.');
  const std::string_view block = hf.substr(0, dot);
  if (dot == std::string_view::npos || block.empty() || block.size() > 9 || (block.size() > 1 && block[0] == '0') ||
      !std::all_of(block.begin(), block.end(), [](char c) { return c >= '0' && c <= '9'; }))
    return std::nullopt;
  static constexpr std::array<std::pair<std::string_view, std::string_view>, 9> parts{{
      {"input_layernorm.weight", "attn_norm.weight"},
      {"self_attn.q_proj.weight", "attn_q.weight"},
      {"self_attn.k_proj.weight", "attn_k.weight"},
      {"self_attn.v_proj.weight", "attn_v.weight"},
      {"self_attn.o_proj.weight", "attn_output.weight"},
      {"post_attention_layernorm.weight", "ffn_norm.weight"},
      {"mlp.gate_proj.weight", "ffn_gate.weight"},
      {"mlp.up_proj.weight", "ffn_up.weight"},
      {"mlp.down_proj.weight", "ffn_down.weight"},
  }};
  static constexpr std::array<std::pair<std::string_view, std::string_view>, 2> sub_norms{{
      {"self_attn.attn_sub_norm.weight", "attn_sub_norm.weight"},
      {"mlp.ffn_sub_norm.weight", "ffn_sub_norm.weight"},
  }};
  for (const auto& [from, to] : parts)
    if (hf.substr(dot + 1) == from) return "blk." + std::string(block) + "." + std::string(to);
  if (is_bitnet_arch(arch))
    for (const auto& [from, to] : sub_norms)
      if (hf.substr(dot + 1) == from) return "blk." + std::string(block) + "." + std::string(to);
  return std::nullopt;
}

/// The rows of a q or k projection reordered as llama.cpp's rope expects for arch "llama": within
/// each of `heads` heads of size hd, row a * hd / 2 + b moves to 2 b + a (the converters' permute;
/// k uses the kv head count). Exact: it only moves rows. Throws shape_error when the rows are not
/// `heads` heads of an even size.
template <class Derived>
Matrix<typename Derived::Scalar> permute_rope_rows(const Eigen::MatrixBase<Derived>& rows, Index heads) {
  if (heads <= 0 || rows.rows() % heads != 0 || (rows.rows() / heads) % 2 != 0)
    throw shape_error("gguf::permute_rope_rows: " + std::to_string(rows.rows()) + " rows are not " + std::to_string(heads) +
                      " heads of an even size");
  const Index hd = rows.rows() / heads;
  Matrix<typename Derived::Scalar> out(rows.rows(), rows.cols());
  for (Index h = 0; h < heads; ++h)
    for (Index a = 0; a < 2; ++a)
      for (Index b = 0; b < hd / 2; ++b) out.row(h * hd + 2 * b + a) = rows.row(h * hd + a * hd / 2 + b);
  return out;
}

/// One tensor of a model, by its Hugging Face name: a ternary layer or float weights (a norm
/// weight as a 1 x n or n x 1 matrix).
template <real_scalar T>
struct model_tensor {
  std::string name;
  std::variant<std::reference_wrapper<const BitLinear<T>>, std::reference_wrapper<const Matrix<T>>> value;
};

struct model_options {
  // TQ2_0 / TQ1_0 / Q2_0 (mainline), PQ2_0 / PTQ1_0 (PrismML's fork), I2_S (ik_llama.cpp)
  tensor_type ternary_type = tensor_type::TQ2_0;
  tensor_type float_type = tensor_type::F16;      // 2-D float tensors (F32, F16, BF16); norms are always F32
  /// tokenizer.ggml.* entries as the converters write them; when empty the file declares
  /// tokenizer.ggml.model = "none" (the engine then loads the model but cannot tokenize text).
  std::vector<metadata_entry> tokenizer;
};

/// What was written for one tensor.
struct model_tensor_report {
  std::string source_name;
  std::string gguf_name;
  tensor_type type = tensor_type::F32;
  std::vector<std::uint64_t> ne;
  std::optional<scale_rounding> scale;  // ternary tensors: what the storage did to d = 1 / sw
};

/// Writes a whole model of arch h.arch: the metadata of `h` (llama_metadata) and the tokenizer
/// entries, then token_embd, each block (attn_norm, attn_q, attn_k, attn_v, attn_output, ffn_norm,
/// ffn_gate, ffn_up, ffn_down; the BitNet archs also attn_sub_norm and ffn_sub_norm), output_norm and
/// output (optional: the engines tie it to token_embd when absent). Arch llama: q and k rows are
/// permuted for rope (permute_rope_rows). The BitNet archs take I2_S ternary layers only: ik_llama.cpp,
/// its engine, has no TQ2_0 / TQ1_0 kernels. Every name, shape and type is checked before anything
/// is written (value_error / shape_error naming the tensor), and the file appears only when
/// complete (writer). Returns one report per tensor, in file order.
template <real_scalar T>
std::vector<model_tensor_report> write_llama_model(const std::filesystem::path& path, const llama_hparams& h,
                                                   const std::vector<model_tensor<T>>& tensors,
                                                   const model_options& options = {}) {
  std::vector<metadata_entry> metadata = llama_metadata(h);
  if (!is_ternary(options.ternary_type))
    throw value_error("gguf::write_llama_model: ternary_type " + std::string(tensor_type_name(options.ternary_type)) +
                      " is not a ternary type (TQ2_0, TQ1_0, Q2_0, PQ2_0, PTQ1_0, I2_S)");
  if (options.float_type != tensor_type::F32 && options.float_type != tensor_type::F16 &&
      options.float_type != tensor_type::BF16)
    throw value_error("gguf::write_llama_model: float_type " + std::string(tensor_type_name(options.float_type)) +
                      " is not F32, F16 or BF16");
  const std::string arch(model_arch_name(h.arch));
  if (is_bitnet_arch(h.arch) && options.ternary_type != tensor_type::I2_S)
    throw value_error("gguf::write_llama_model: arch " + arch + " with ternary_type " +
                      std::string(tensor_type_name(options.ternary_type)) +
                      ": its engine (ik_llama.cpp) has no TQ2_0 / TQ1_0 kernels; write I2_S");
  bool has_tokenizer_model = false;
  for (const metadata_entry& e : options.tokenizer) {
    if (!e.key.starts_with("tokenizer."))
      throw value_error("gguf::write_llama_model: tokenizer entry " + detail::quote(e.key) + " is not a tokenizer.* key");
    has_tokenizer_model = has_tokenizer_model || e.key == "tokenizer.ggml.model";
  }
  metadata.insert(metadata.end(), options.tokenizer.begin(), options.tokenizer.end());
  if (!has_tokenizer_model) metadata.push_back({"tokenizer.ggml.model", std::string("none")});

  auto fail = [](const std::string& name, const std::string& what) -> void {
    throw value_error("gguf::write_llama_model: tensor " + detail::quote(name) + ": " + what);
  };
  std::map<std::string, const model_tensor<T>*> by_gguf_name;
  for (const model_tensor<T>& t : tensors) {
    const std::optional<std::string> gguf_name = llama_tensor_name(t.name, h.arch);
    if (!gguf_name) fail(t.name, "not a tensor of arch " + arch);
    if (!by_gguf_name.emplace(*gguf_name, &t).second) fail(t.name, "given twice");
  }
  const auto hidden = Index(h.embedding_length), ff = Index(h.feed_forward_length), hd = Index(h.head_dim());
  struct planned {
    std::string gguf_name;
    Index rows, cols;
    bool norm, linear;
    Index rope_heads;  // 0: not permuted
  };
  const bool bitnet = is_bitnet_arch(h.arch);  // sub-norms; NEOX rope keeps q / k rows in order
  std::vector<planned> plan{{"token_embd.weight", Index(h.vocab_size), hidden, false, false, 0}};
  for (std::uint32_t b = 0; b < h.block_count; ++b) {
    const std::string blk = "blk." + std::to_string(b) + ".";
    plan.push_back({blk + "attn_norm.weight", 1, hidden, true, false, 0});
    plan.push_back({blk + "attn_q.weight", Index(h.head_count) * hd, hidden, false, true, bitnet ? 0 : Index(h.head_count)});
    plan.push_back({blk + "attn_k.weight", Index(h.head_count_kv) * hd, hidden, false, true, bitnet ? 0 : Index(h.head_count_kv)});
    plan.push_back({blk + "attn_v.weight", Index(h.head_count_kv) * hd, hidden, false, true, 0});
    if (bitnet) plan.push_back({blk + "attn_sub_norm.weight", 1, Index(h.head_count) * hd, true, false, 0});
    plan.push_back({blk + "attn_output.weight", hidden, Index(h.head_count) * hd, false, true, 0});
    plan.push_back({blk + "ffn_norm.weight", 1, hidden, true, false, 0});
    plan.push_back({blk + "ffn_gate.weight", ff, hidden, false, true, 0});
    plan.push_back({blk + "ffn_up.weight", ff, hidden, false, true, 0});
    if (bitnet) plan.push_back({blk + "ffn_sub_norm.weight", 1, ff, true, false, 0});
    plan.push_back({blk + "ffn_down.weight", hidden, ff, false, true, 0});
  }
  plan.push_back({"output_norm.weight", 1, hidden, true, false, 0});
  if (by_gguf_name.contains("output.weight")) plan.push_back({"output.weight", Index(h.vocab_size), hidden, false, true, 0});
  for (const auto& entry : by_gguf_name)  // (Clang 14 cannot capture a structured binding)
    if (std::none_of(plan.begin(), plan.end(), [&](const planned& p) { return p.gguf_name == entry.first; }))
      fail(entry.second->name, "block index beyond block_count " + std::to_string(h.block_count));

  std::vector<tensor_spec> specs;
  std::vector<const model_tensor<T>*> sources;
  for (const planned& p : plan) {
    const auto it = by_gguf_name.find(p.gguf_name);
    if (it == by_gguf_name.end())
      throw value_error("gguf::write_llama_model: the model has no " + detail::quote(p.gguf_name) + " (arch " + arch + " needs it)");
    const model_tensor<T>& t = *it->second;
    const std::string expected = std::to_string(p.rows) + "x" + std::to_string(p.cols);
    tensor_type type = p.norm ? tensor_type::F32 : options.float_type;
    if (const auto* layer = std::get_if<0>(&t.value)) {
      const BitLinear<T>& l = layer->get();
      if (!p.linear) fail(t.name, "is a BitLinear, arch " + arch + " stores it as float weights");
      if (l.out_features() != p.rows || l.in_features() != p.cols)
        fail(t.name, "is " + std::to_string(l.out_features()) + "x" + std::to_string(l.in_features()) + ", expected " + expected);
      if (l.bias()) fail(t.name, "has a bias; arch " + arch + " here takes none");
      if (std::uint64_t(p.cols) % row_multiple(options.ternary_type) != 0)
        fail(t.name, "rows of " + std::to_string(p.cols) + " weights are not a multiple of " +
                         std::to_string(row_multiple(options.ternary_type)) + " (" +
                         std::string(tensor_type_name(options.ternary_type)) + ")");
      type = options.ternary_type;
    } else {
      const Matrix<T>& m = std::get<1>(t.value).get();
      const bool fits = p.norm ? m.size() == p.cols && (m.rows() == 1 || m.cols() == 1)
                               : m.rows() == p.rows && m.cols() == p.cols;
      if (!fits) fail(t.name, "is " + std::to_string(m.rows()) + "x" + std::to_string(m.cols()) + ", expected " + expected);
    }
    specs.push_back({p.gguf_name, type, p.norm ? std::vector<std::uint64_t>{std::uint64_t(p.cols)}
                                               : std::vector<std::uint64_t>{std::uint64_t(p.cols), std::uint64_t(p.rows)}});
    sources.push_back(&t);
  }

  writer out(path, std::move(metadata), specs);
  std::vector<model_tensor_report> report;
  for (std::size_t i = 0; i < plan.size(); ++i) {
    const planned& p = plan[i];
    const model_tensor<T>& t = *sources[i];
    model_tensor_report r{t.name, p.gguf_name, out.layout()[i].type, out.layout()[i].ne, std::nullopt};
    if (const auto* layer = std::get_if<0>(&t.value)) {
      const BitLinear<T>& l = layer->get();
      if (p.rope_heads) r.scale = out.write_bit_linear(p.gguf_name, BitLinear<T>::from_ternary(
                                                          permute_rope_rows(l.ternary_weight(), p.rope_heads), l.weight_scale()));
      else r.scale = out.write_bit_linear(p.gguf_name, l);
    } else {
      const Matrix<T>& m = std::get<1>(t.value).get();
      if (p.rope_heads) out.write_floats(p.gguf_name, permute_rope_rows(m, p.rope_heads));
      else if (p.norm) out.write_floats(p.gguf_name, m.reshaped().eval());
      else out.write_floats(p.gguf_name, m);
    }
    report.push_back(std::move(r));
  }
  out.finish();
  return report;
}

}  // namespace bitnet::gguf
