// bitnet/safetensors.hpp - read and write safetensors files (Hugging Face's checkpoint format).
//
//   8 bytes     N, little-endian u64: length of the header
//   N bytes     UTF-8 JSON object: {"name": {"dtype": "F32", "shape": [2, 3], "data_offsets": [b, e]},
//               ..., "__metadata__": {"key": "value", ...}}   (padded with spaces)
//   the rest    the data section; tensor bytes [b, e) relative to its start, little-endian, C order
//
// The reader validates the whole header when it opens a file (see docs/safetensors.md for the
// rules; every rejection is a bitnet::io_error naming the file, the tensor and the rule) and then
// reads tensors on demand, by name, converting to the element type you ask for. The writer is
// streaming: declare the tensors (names, dtypes, shapes) up front, then write each one when you
// have it; the file is assembled under a temporary name and renamed into place by finish().
//
// This header needs nlohmann/json (CMake target bitnet::safetensors).
#pragma once

#include <algorithm>
#include <array>
#include <bit>
#include <concepts>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <limits>
#include <map>
#include <memory>
#include <optional>
#include <set>
#include <span>
#include <string>
#include <string_view>
#include <tuple>
#include <type_traits>
#include <utility>
#include <vector>

#include <nlohmann/json.hpp>

#include "detail/file_io.hpp"
#include "detail/float_formats.hpp"
#include "errors.hpp"
#include "matrix.hpp"

namespace bitnet::safetensors {

/// The element types of the format, in the order of the reference implementation.
enum class dtype : std::uint8_t { BOOL, U8, I8, F8_E5M2, F8_E4M3, I16, U16, F16, BF16, I32, U32, F32, F64, I64, U64 };

inline constexpr std::array<dtype, 15> all_dtypes{
    dtype::BOOL, dtype::U8,  dtype::I8,  dtype::F8_E5M2, dtype::F8_E4M3, dtype::I16, dtype::U16, dtype::F16,
    dtype::BF16, dtype::I32, dtype::U32, dtype::F32,     dtype::F64,     dtype::I64, dtype::U64};

constexpr std::string_view dtype_name(dtype type) noexcept {
  constexpr std::array<std::string_view, 15> names{"BOOL", "U8",   "I8",  "F8_E5M2", "F8_E4M3",
                                                   "I16",  "U16",  "F16", "BF16",    "I32",
                                                   "U32",  "F32",  "F64", "I64",     "U64"};
  return names[static_cast<std::size_t>(type)];
}

/// Bytes per element.
constexpr std::size_t dtype_size(dtype type) noexcept {
  switch (type) {
    case dtype::BOOL: case dtype::U8: case dtype::I8: case dtype::F8_E5M2: case dtype::F8_E4M3: return 1;
    case dtype::I16: case dtype::U16: case dtype::F16: case dtype::BF16: return 2;
    case dtype::I32: case dtype::U32: case dtype::F32: return 4;
    case dtype::F64: case dtype::I64: case dtype::U64: return 8;
  }
  return 0;
}

constexpr bool is_floating(dtype type) noexcept {
  return type == dtype::F8_E5M2 || type == dtype::F8_E4M3 || type == dtype::F16 || type == dtype::BF16 ||
         type == dtype::F32 || type == dtype::F64;
}

/// The dtype spelled `name` ("F32", "BF16", ...), or nullopt for an unknown name.
constexpr std::optional<dtype> parse_dtype(std::string_view name) noexcept {
  for (dtype type : all_dtypes)
    if (dtype_name(type) == name) return type;
  return std::nullopt;
}

/// The largest header the reader accepts, as the reference implementation.
inline constexpr std::uint64_t max_header_length = 100'000'000;

/// The C++ types a tensor can be read into or written from.
template <class T>
concept element = real_scalar<T> || (std::integral<T> && !std::same_as<T, bool> && sizeof(T) <= 8);

/// The dtype that stores T without conversion.
template <element T>
constexpr dtype dtype_of() noexcept {
  if constexpr (std::same_as<T, float>) return dtype::F32;
  else if constexpr (std::same_as<T, double>) return dtype::F64;
  else if constexpr (sizeof(T) == 1) return std::is_signed_v<T> ? dtype::I8 : dtype::U8;
  else if constexpr (sizeof(T) == 2) return std::is_signed_v<T> ? dtype::I16 : dtype::U16;
  else if constexpr (sizeof(T) == 4) return std::is_signed_v<T> ? dtype::I32 : dtype::U32;
  else return std::is_signed_v<T> ? dtype::I64 : dtype::U64;
}

/// One tensor of a file: where its bytes are and how to read them.
struct tensor_info {
  std::string name;
  dtype type = dtype::F32;
  std::vector<std::uint64_t> shape;  // empty for a scalar
  std::uint64_t begin = 0;           // byte offsets in the data section: [begin, end)
  std::uint64_t end = 0;

  /// Product of the shape (checked not to overflow when the file was read or declared).
  std::uint64_t element_count() const noexcept {
    std::uint64_t count = 1;
    for (std::uint64_t d : shape) count *= d;
    return count;
  }
  std::uint64_t byte_size() const noexcept { return end - begin; }
};

/// A tensor to be written: its name, dtype and shape.
struct tensor_spec {
  std::string name;
  dtype type = dtype::F32;
  std::vector<std::uint64_t> shape;
};

namespace detail {

using bitnet::detail::bfloat16;
using bitnet::detail::bfloat16_to_float;
using bitnet::detail::binary16;
using bitnet::detail::binary32;
using bitnet::detail::encode_bfloat16;
using bitnet::detail::encode_half;
using bitnet::detail::f8_e4m3_to_float;
using bitnet::detail::f8_e5m2_to_float;
using bitnet::detail::half_to_float;
using bitnet::detail::round_to_format;
using bitnet::detail::byte_source;
using bitnet::detail::checked_multiply;
using bitnet::detail::file_source;
using bitnet::detail::invalid_utf8_at;
using bitnet::detail::load_little_endian;
using bitnet::detail::memory_source;
using bitnet::detail::store_little_endian;

inline std::string quote(std::string_view text) {
  return nlohmann::json(std::string(text)).dump(-1, ' ', false, nlohmann::json::error_handler_t::replace);
}

inline std::string shape_text(const std::vector<std::uint64_t>& shape) {
  std::string text = "[";
  for (std::size_t i = 0; i < shape.size(); ++i) text += (i ? ", " : "") + std::to_string(shape[i]);
  return text + "]";
}

/// "safetensors: FILE: tensor "NAME": RULE" - the form of every message of this header.
inline std::string message(std::string_view file, std::string_view tensor, std::string_view rule) {
  std::string text = "safetensors: " + std::string(file);
  if (!tensor.empty()) text += ": tensor " + quote(tensor);
  return text + ": " + std::string(rule);
}

[[noreturn]] inline void fail(std::string_view file, std::string_view tensor, std::string_view rule) {
  throw io_error(message(file, tensor, rule));
}

/// Byte size of `shape` elements of `type`, or nullopt when the product overflows 64 bits.
inline std::optional<std::uint64_t> checked_byte_size(const std::vector<std::uint64_t>& shape, dtype type) {
  std::optional<std::uint64_t> count = 1;
  for (std::uint64_t d : shape)
    if (!(count = checked_multiply(*count, d))) return std::nullopt;
  return checked_multiply(*count, dtype_size(type));
}

/// Converts one stored element to T. Returns false when the value does not fit T.
template <element T>
bool decode_element(dtype type, const std::byte* p, T& out) {
  if constexpr (real_scalar<T>) {
    switch (type) {
      case dtype::F32: out = static_cast<T>(load_little_endian<float>(p)); return true;
      case dtype::F16: out = static_cast<T>(half_to_float(load_little_endian<std::uint16_t>(p))); return true;
      case dtype::BF16: out = static_cast<T>(bfloat16_to_float(load_little_endian<std::uint16_t>(p))); return true;
      case dtype::F8_E5M2: out = static_cast<T>(f8_e5m2_to_float(load_little_endian<std::uint8_t>(p))); return true;
      case dtype::F8_E4M3: out = static_cast<T>(f8_e4m3_to_float(load_little_endian<std::uint8_t>(p))); return true;
      case dtype::F64: {
        const double v = load_little_endian<double>(p);
        if constexpr (std::same_as<T, double>) {
          out = v;
        } else {
          const std::optional<double> rounded = round_to_format(v, binary32);
          if (!rounded) return false;
          out = static_cast<float>(*rounded);
        }
        return true;
      }
      default: break;
    }
  }
  std::int64_t signed_value = 0;
  std::uint64_t unsigned_value = 0;
  bool is_signed = true;
  switch (type) {
    case dtype::BOOL: {
      const auto v = load_little_endian<std::uint8_t>(p);
      if (v > 1) return false;
      signed_value = v;
      break;
    }
    case dtype::U8: signed_value = load_little_endian<std::uint8_t>(p); break;
    case dtype::I8: signed_value = load_little_endian<std::int8_t>(p); break;
    case dtype::U16: signed_value = load_little_endian<std::uint16_t>(p); break;
    case dtype::I16: signed_value = load_little_endian<std::int16_t>(p); break;
    case dtype::U32: signed_value = load_little_endian<std::uint32_t>(p); break;
    case dtype::I32: signed_value = load_little_endian<std::int32_t>(p); break;
    case dtype::I64: signed_value = load_little_endian<std::int64_t>(p); break;
    case dtype::U64: unsigned_value = load_little_endian<std::uint64_t>(p); is_signed = false; break;
    default: return false;  // a floating dtype into an integer type: rejected by the caller first
  }
  if constexpr (real_scalar<T>) {
    out = is_signed ? static_cast<T>(signed_value) : static_cast<T>(unsigned_value);
    return true;
  } else {
    if (is_signed ? !std::in_range<T>(signed_value) : !std::in_range<T>(unsigned_value)) return false;
    out = is_signed ? static_cast<T>(signed_value) : static_cast<T>(unsigned_value);
    return true;
  }
}

/// Stores one element of T as `type`. Returns false when the value does not fit the dtype.
template <element T>
bool encode_element(dtype type, T value, std::byte* p) {
  if constexpr (real_scalar<T>) {
    const double v = value;
    switch (type) {
      case dtype::F64: store_little_endian(p, v); return true;
      case dtype::F32: {
        const auto rounded = round_to_format(v, binary32);
        if (!rounded) return false;
        store_little_endian(p, static_cast<float>(*rounded));
        return true;
      }
      case dtype::F16: {
        const auto rounded = round_to_format(v, binary16);
        if (!rounded) return false;
        store_little_endian(p, encode_half(*rounded));
        return true;
      }
      case dtype::BF16: {
        const auto rounded = round_to_format(v, bfloat16);
        if (!rounded) return false;
        store_little_endian(p, encode_bfloat16(*rounded));
        return true;
      }
      default: return false;
    }
  } else {
    auto store = [&]<class U>(std::type_identity<U>) {
      if (!std::in_range<U>(value)) return false;
      store_little_endian(p, static_cast<U>(value));
      return true;
    };
    switch (type) {
      case dtype::BOOL: return (value == 0 || value == 1) && store(std::type_identity<std::uint8_t>{});
      case dtype::U8: return store(std::type_identity<std::uint8_t>{});
      case dtype::I8: return store(std::type_identity<std::int8_t>{});
      case dtype::U16: return store(std::type_identity<std::uint16_t>{});
      case dtype::I16: return store(std::type_identity<std::int16_t>{});
      case dtype::U32: return store(std::type_identity<std::uint32_t>{});
      case dtype::I32: return store(std::type_identity<std::int32_t>{});
      case dtype::U64: return store(std::type_identity<std::uint64_t>{});
      case dtype::I64: return store(std::type_identity<std::int64_t>{});
      default: return false;
    }
  }
}

/// Whether values of `type` can be read as T: floating dtypes only into float/double; integer
/// dtypes into anything (range-checked per element).
template <element T>
constexpr bool convertible(dtype type) noexcept {
  return real_scalar<T> || !is_floating(type);
}

template <element T>
std::string_view type_name() noexcept {
  if constexpr (std::same_as<T, float>) return "float";
  else if constexpr (std::same_as<T, double>) return "double";
  else return dtype_name(dtype_of<T>());
}

/// One header entry as the parser saw it, before any rule is checked (check_entry checks them).
struct raw_entry {
  bool is_object = false;
  std::set<std::string> fields;                   // every field name
  std::optional<std::string> dtype_text;          // the "dtype" field, when it is a string
  bool shape_is_array = false;
  std::vector<std::uint64_t> shape;               // its non-negative integer elements
  std::optional<std::string> bad_dimension;       // its first other element, as JSON text
  bool offsets_is_array = false;
  std::size_t offsets_count = 0;
  std::array<std::optional<std::uint64_t>, 2> offsets;  // its first two elements, when non-negative integers
};

/// The header as the parser saw it. Ordered maps, so the rules are checked in the order of the
/// keys (as nlohmann::json, whose objects are std::map, would iterate them).
struct raw_header {
  std::map<std::string, raw_entry> entries;
  bool has_metadata = false;
  bool metadata_is_object = false;
  std::map<std::string, std::optional<std::string>> metadata;  // value when it is a string
  std::optional<std::string> duplicate_key;                    // the first key an object repeats
  std::optional<std::string> syntax_error;                     // nlohmann::json's parse_error text
};

/// A SAX handler (nlohmann::json::sax_parse) that records what the header rules need into a
/// raw_header and builds no nlohmann::json value: ~basic_json allocates when it destroys a non-empty
/// object or array (nlohmann/json 3.11 flattens the tree onto a heap stack), so a std::bad_alloc
/// while parsing into a DOM, or while freeing one, could reach a noexcept destructor and
/// std::terminate. Everything held here is freed without allocating.
class header_parser {
 public:
  using json = nlohmann::json;

  explicit header_parser(raw_header& out) : out_(out) {}

  bool null() { return scalar(nullptr); }
  bool boolean(bool value) { return scalar(value); }
  bool number_integer(json::number_integer_t value) { return scalar(value); }
  bool number_unsigned(json::number_unsigned_t value) { return scalar(value); }
  bool number_float(json::number_float_t value, const json::string_t&) { return scalar(value); }
  bool string(json::string_t& value) { return scalar(value); }
  bool binary(json::binary_t&) { return scalar(nullptr); }  // never called for JSON text

  bool start_object(std::size_t) {
    open(place(container::object));
    keys_.emplace_back();
    return true;
  }
  bool end_object() {
    keys_.pop_back();
    --depth_;
    return true;
  }
  bool start_array(std::size_t) {
    open(place(container::array));
    return true;
  }
  bool end_array() {
    --depth_;
    return true;
  }

  bool key(json::string_t& key) {
    if (!keys_.back().insert(key).second && !out_.duplicate_key) out_.duplicate_key = key;
    switch (parent()) {
      case role::top:
        name_ = key;
        if (key == "__metadata__") out_.has_metadata = true;
        else entry_ = &out_.entries[key];
        break;
      case role::metadata: field_ = key; break;
      case role::entry:
        field_ = key;
        entry_->fields.insert(key);
        break;
      default: break;
    }
    return true;
  }

  bool parse_error(std::size_t, const std::string&, const nlohmann::detail::exception& e) {
    out_.syntax_error = e.what();
    return false;
  }

 private:
  // What an open container is to the header; roles_[d] is that of the container at depth d.
  enum class role : unsigned char { none, ignored, top, metadata, entry, shape, offsets };
  enum class container : unsigned char { none, object, array };
  static constexpr std::size_t tracked_depth = 3;  // top object > entry > shape or data_offsets

  role parent() const noexcept {
    return depth_ == 0 ? role::none : depth_ <= tracked_depth ? roles_[depth_] : role::ignored;
  }

  void open(role r) {
    ++depth_;
    if (depth_ <= tracked_depth) roles_[depth_] = r;
  }

  // Records a value that starts at the current position (a container when `opening` is not none;
  // a scalar otherwise, in `unsigned_value` / `text`) and returns the role of the container it opens.
  role place(container opening, std::optional<std::uint64_t> unsigned_value = std::nullopt,
             const std::string* text = nullptr, const std::string* as_json = nullptr) {
    const bool object = opening == container::object, array = opening == container::array;
    switch (parent()) {
      case role::none: return object ? role::top : role::ignored;
      case role::top:
        if (name_ == "__metadata__") {
          out_.metadata_is_object = object;
          return object ? role::metadata : role::ignored;
        }
        entry_->is_object = object;
        return object ? role::entry : role::ignored;
      case role::metadata:
        out_.metadata[field_] = text ? std::optional<std::string>(*text) : std::nullopt;
        return role::ignored;
      case role::entry:
        if (field_ == "dtype") entry_->dtype_text = text ? std::optional<std::string>(*text) : std::nullopt;
        if (field_ == "shape") entry_->shape_is_array = array;
        if (field_ == "data_offsets") entry_->offsets_is_array = array;
        if (!array) return role::ignored;
        return field_ == "shape" ? role::shape : field_ == "data_offsets" ? role::offsets : role::ignored;
      case role::shape:
        if (unsigned_value) entry_->shape.push_back(*unsigned_value);
        else if (!entry_->bad_dimension) entry_->bad_dimension = object ? "an object" : array ? "an array" : *as_json;
        return role::ignored;
      case role::offsets:
        if (entry_->offsets_count < 2) entry_->offsets[entry_->offsets_count] = unsigned_value;
        ++entry_->offsets_count;
        return role::ignored;
      default: return role::ignored;
    }
  }

  template <class Value>
  bool scalar(const Value& value) {
    std::optional<std::uint64_t> unsigned_value;
    const std::string* text = nullptr;
    if constexpr (std::is_same_v<Value, json::number_unsigned_t>) unsigned_value = value;
    if constexpr (std::is_same_v<Value, json::string_t>) text = &value;
    // The JSON text of a rejected shape element, for the message (a scalar json frees without allocating).
    std::string as_json;
    if (parent() == role::shape && !unsigned_value && !entry_->bad_dimension) as_json = json(value).dump();
    place(container::none, unsigned_value, text, &as_json);
    return true;
  }

  raw_header& out_;
  std::size_t depth_ = 0;
  std::array<role, tracked_depth + 1> roles_{};
  std::vector<std::set<std::string>> keys_;  // the keys of each open object
  std::string name_;                         // the current top-level key
  std::string field_;                        // the current key one level below
  raw_entry* entry_ = nullptr;               // the entry of name_ (not __metadata__)
};

/// Checks the "dtype", "shape" and "data_offsets" of one header entry and gives its tensor_info.
inline tensor_info check_entry(std::string_view file, const std::string& name, const raw_entry& entry) {
  if (!entry.is_object) fail(file, name, "the header entry is not a JSON object");
  for (const std::string& field : entry.fields)
    if (field != "dtype" && field != "shape" && field != "data_offsets")
      fail(file, name, "unknown field " + quote(field) + " (allowed: dtype, shape, data_offsets)");
  for (const char* required : {"dtype", "shape", "data_offsets"})
    if (!entry.fields.contains(required)) fail(file, name, std::string("missing field \"") + required + "\"");

  tensor_info info;
  info.name = name;
  if (!entry.dtype_text) fail(file, name, "dtype is not a string");
  const std::optional<dtype> parsed = parse_dtype(*entry.dtype_text);
  if (!parsed) fail(file, name, "unknown dtype " + quote(*entry.dtype_text));
  info.type = *parsed;

  if (!entry.shape_is_array) fail(file, name, "shape is not an array");
  if (entry.bad_dimension) fail(file, name, "shape holds " + *entry.bad_dimension + ", not a non-negative integer");
  info.shape = entry.shape;

  if (!entry.offsets_is_array || entry.offsets_count != 2)
    fail(file, name, "data_offsets is not an array of two integers");
  if (!entry.offsets[0] || !entry.offsets[1])
    fail(file, name, "data_offsets holds a value that is not a non-negative integer");
  info.begin = *entry.offsets[0];
  info.end = *entry.offsets[1];
  if (info.end < info.begin)
    fail(file, name, "data_offsets end " + std::to_string(info.end) + " is before begin " + std::to_string(info.begin));

  const std::optional<std::uint64_t> bytes = checked_byte_size(info.shape, info.type);
  if (!bytes)
    fail(file, name, "shape " + shape_text(info.shape) + " of " + std::string(dtype_name(info.type)) +
                         " overflows 64 bits");
  if (info.byte_size() != *bytes)
    fail(file, name, "data_offsets [" + std::to_string(info.begin) + ", " + std::to_string(info.end) + ") hold " +
                         std::to_string(info.byte_size()) + " bytes, shape " + shape_text(info.shape) + " of " +
                         std::string(dtype_name(info.type)) + " needs " + std::to_string(*bytes));
  return info;
}

}  // namespace detail

/// A validated safetensors file, read tensor by tensor on demand. Copies share the open file.
/// Reads are thread-safe.
class reader {
 public:
  /// Opens and validates `file` (the header only is read). Throws io_error for a missing or
  /// malformed file.
  explicit reader(const std::filesystem::path& file)
      : reader(std::make_shared<const detail::file_source>("safetensors", file)) {}

  /// Validates an in-memory file image; `label` stands for the file name in messages.
  static reader from_bytes(std::vector<std::byte> bytes, std::string label = "<memory>") {
    return reader(std::make_shared<const detail::memory_source>("safetensors", std::move(bytes), std::move(label)));
  }

  const std::string& source_name() const noexcept { return source_->name(); }
  std::uint64_t file_size() const noexcept { return source_->size(); }
  /// Where the data section starts: 8 + header length.
  std::uint64_t data_offset() const noexcept { return data_offset_; }

  /// Every tensor, in data order (by offset).
  const std::vector<tensor_info>& tensors() const noexcept { return tensors_; }
  /// The "__metadata__" map (empty when the file has none).
  const std::map<std::string, std::string, std::less<>>& metadata() const noexcept { return metadata_; }

  bool contains(std::string_view name) const noexcept { return find(name) != nullptr; }
  const tensor_info* find(std::string_view name) const noexcept {
    const auto it = index_.find(name);
    return it == index_.end() ? nullptr : &tensors_[it->second];
  }
  /// The tensor called `name`; throws io_error when the file has none.
  const tensor_info& info(std::string_view name) const {
    if (const tensor_info* t = find(name)) return *t;
    detail::fail(source_name(), name, "no such tensor in the file");
  }

  /// The raw little-endian bytes of a tensor.
  std::vector<std::byte> read_bytes(std::string_view name) const {
    const tensor_info& t = info(name);
    std::vector<std::byte> bytes(static_cast<std::size_t>(t.byte_size()));
    source_->read_at(data_offset_ + t.begin, bytes);
    return bytes;
  }

  /// `out.size()` raw bytes of a tensor starting `offset` bytes into it (for streaming copies).
  void read_bytes(std::string_view name, std::uint64_t offset, std::span<std::byte> out) const {
    const tensor_info& t = info(name);
    if (offset > t.byte_size() || out.size() > t.byte_size() - offset)
      throw shape_error(detail::message(source_name(), name, "bytes [" + std::to_string(offset) + ", +" +
                                                                 std::to_string(out.size()) + ") are outside the tensor"));
    source_->read_at(data_offset_ + t.begin + offset, out);
  }

  /// The elements of a tensor of any shape, in C order, converted to T. F16, BF16, F8 and
  /// integers convert exactly into float/double; F64 into float rounds to nearest even. Integer
  /// dtypes convert into integer types when every value fits. Throws io_error when the dtype
  /// cannot be read as T and value_error when a value does not fit T.
  template <element T>
  std::vector<T> read_values(std::string_view name) const {
    const tensor_info& t = info(name);
    std::vector<T> values(checked_count(t));
    convert_into(t, values.data());
    return values;
  }

  /// A 2-D tensor as a row-major matrix (rows = shape[0]). Throws shape_error for another rank.
  template <element T>
  Matrix<T> read_matrix(std::string_view name) const {
    const tensor_info& t = info(name);
    if (t.shape.size() != 2)
      throw shape_error(detail::message(source_name(), name, "has shape " + detail::shape_text(t.shape) +
                                                                 ", expected a 2-D tensor"));
    checked_count(t);
    Matrix<T> m(static_cast<Index>(t.shape[0]), static_cast<Index>(t.shape[1]));
    convert_into(t, m.data());
    return m;
  }

  /// A 1-D tensor as a vector. Throws shape_error for another rank.
  template <element T>
  Vector<T> read_vector(std::string_view name) const {
    const tensor_info& t = info(name);
    if (t.shape.size() != 1)
      throw shape_error(detail::message(source_name(), name, "has shape " + detail::shape_text(t.shape) +
                                                                 ", expected a 1-D tensor"));
    Vector<T> v(static_cast<Index>(checked_count(t)));
    convert_into(t, v.data());
    return v;
  }

 private:
  explicit reader(std::shared_ptr<const detail::byte_source> source) : source_(std::move(source)) { parse(); }

  // Element counts are bounded by the file size (validated), so they fit std::size_t and Index.
  std::size_t checked_count(const tensor_info& t) const {
    const std::uint64_t count = t.element_count();
    if (count > static_cast<std::uint64_t>(std::numeric_limits<Index>::max()))
      detail::fail(source_name(), t.name, "has more elements than this platform can index");
    return static_cast<std::size_t>(count);
  }

  template <element T>
  void convert_into(const tensor_info& t, T* out) const {
    if (!detail::convertible<T>(t.type))
      detail::fail(source_name(), t.name, "is " + std::string(dtype_name(t.type)) + ", which cannot be read as " +
                                             std::string(detail::type_name<T>()));
    const std::size_t element_size = dtype_size(t.type);
    const std::size_t count = static_cast<std::size_t>(t.element_count());
    // Reads through a bounded buffer so converting never holds the tensor twice.
    const std::size_t chunk_elements = std::max<std::size_t>(1, (std::size_t{1} << 20) / element_size);
    std::vector<std::byte> chunk(std::min(count, chunk_elements) * element_size);
    for (std::size_t first = 0; first < count; first += chunk_elements) {
      const std::size_t n = std::min(chunk_elements, count - first);
      source_->read_at(data_offset_ + t.begin + first * element_size, std::span(chunk.data(), n * element_size));
      for (std::size_t i = 0; i < n; ++i)
        if (!detail::decode_element(t.type, chunk.data() + i * element_size, out[first + i]))
          throw value_error(detail::message(source_name(), t.name,
                                            "element " + std::to_string(first + i) + " does not fit " +
                                                std::string(detail::type_name<T>())));
    }
  }

  void parse() {
    const std::string& file = source_name();
    const std::uint64_t size = source_->size();
    if (size < 8) detail::fail(file, {}, "the file has " + std::to_string(size) + " bytes, fewer than the 8-byte header length");
    std::array<std::byte, 8> prefix;
    source_->read_at(0, prefix);
    const auto header_length = detail::load_little_endian<std::uint64_t>(prefix.data());
    if (header_length > max_header_length)
      detail::fail(file, {}, "header length " + std::to_string(header_length) + " exceeds the limit of " +
                                 std::to_string(max_header_length) + " bytes");
    if (header_length > size - 8)
      detail::fail(file, {}, "header length " + std::to_string(header_length) + " runs past the end of the file (" +
                                 std::to_string(size) + " bytes)");
    data_offset_ = 8 + header_length;

    std::string header(static_cast<std::size_t>(header_length), '\0');
    source_->read_at(8, std::as_writable_bytes(std::span(header)));
    if (const auto at = detail::invalid_utf8_at(header))
      detail::fail(file, {}, "the header is not valid UTF-8 (byte " + std::to_string(*at) + " of the header)");
    if (header.empty() || header.front() != '{') detail::fail(file, {}, "the header does not start with '{'");

    // JSON never holds a raw NUL byte, but the JSON library stops reading at one.
    if (const auto nul = header.find('\0'); nul != std::string::npos)
      detail::fail(file, {}, "the header is not valid JSON: a NUL byte at byte " + std::to_string(nul) + " of the header");
    detail::raw_header raw;
    detail::header_parser parser(raw);
    nlohmann::json::sax_parse(header, &parser);
    if (raw.syntax_error) detail::fail(file, {}, "the header is not valid JSON: " + *raw.syntax_error);
    if (raw.duplicate_key) detail::fail(file, *raw.duplicate_key, "the header repeats the key");

    // In key order, __metadata__ among the tensors, as a JSON object iterates.
    const auto metadata_position = raw.entries.lower_bound("__metadata__");
    for (auto it = raw.entries.begin();; ++it) {
      if (it == metadata_position && raw.has_metadata) {
        if (!raw.metadata_is_object) detail::fail(file, {}, "__metadata__ is not a JSON object");
        for (const auto& [key, value] : raw.metadata) {
          if (!value) detail::fail(file, {}, "__metadata__ value of " + detail::quote(key) + " is not a string");
          metadata_.emplace(key, *value);
        }
      }
      if (it == raw.entries.end()) break;
      tensors_.push_back(detail::check_entry(file, it->first, it->second));
    }

    std::sort(tensors_.begin(), tensors_.end(), [](const tensor_info& a, const tensor_info& b) {
      return std::tie(a.begin, a.end, a.name) < std::tie(b.begin, b.end, b.name);
    });
    const std::uint64_t data_size = size - data_offset_;
    std::uint64_t expected = 0;
    const tensor_info* previous = nullptr;
    for (const tensor_info& t : tensors_) {
      if (t.begin < expected)
        detail::fail(file, t.name, "bytes [" + std::to_string(t.begin) + ", " + std::to_string(t.end) +
                                       ") overlap tensor " + detail::quote(previous->name));
      if (t.begin > expected)
        detail::fail(file, t.name, "a gap of " + std::to_string(t.begin - expected) + " bytes precedes it (starts at " +
                                       std::to_string(t.begin) + ", expected " + std::to_string(expected) + ")");
      if (t.end > data_size)
        detail::fail(file, t.name, "ends at byte " + std::to_string(t.end) + " but the data section has only " +
                                       std::to_string(data_size) + " bytes (missing bytes)");
      expected = t.end;
      previous = &t;
    }
    if (expected != data_size)
      detail::fail(file, {}, std::to_string(data_size - expected) + " trailing bytes after the last tensor (data section " +
                                 std::to_string(data_size) + " bytes, tensors cover " + std::to_string(expected) + ")");
    for (std::size_t i = 0; i < tensors_.size(); ++i) index_.emplace(tensors_[i].name, i);
  }

  std::shared_ptr<const detail::byte_source> source_;
  std::uint64_t data_offset_ = 0;
  std::vector<tensor_info> tensors_;
  std::map<std::string, std::size_t, std::less<>> index_;
  std::map<std::string, std::string, std::less<>> metadata_;
};

/// Writes a safetensors file tensor by tensor. The tensors are declared up front (so the header
/// can be written first) and may then be written in any order, each exactly once; nothing else
/// is held in memory. The data goes to a temporary file next to `path`, which finish() renames
/// into place: an existing file at `path` is replaced whole or not at all.
class writer {
 public:
  /// Validates the declarations (unique valid UTF-8 names, no "__metadata__", sizes without
  /// overflow) and writes the header. Throws value_error for bad declarations, io_error when the
  /// temporary file cannot be written.
  writer(std::filesystem::path path, std::vector<tensor_spec> tensors,
         std::map<std::string, std::string> metadata = {})
      : path_(std::move(path)) {
    std::set<std::string_view> names;
    for (const tensor_spec& spec : tensors) {
      if (detail::invalid_utf8_at(spec.name)) throw value_error(message(spec.name, "the name is not valid UTF-8"));
      if (spec.name == "__metadata__") throw value_error(message(spec.name, "the name is reserved for the metadata"));
      if (!names.insert(spec.name).second) throw value_error(message(spec.name, "declared twice"));
      if (!detail::checked_byte_size(spec.shape, spec.type))
        throw value_error(message(spec.name, "shape " + detail::shape_text(spec.shape) + " overflows 64 bits"));
    }
    for (const auto& [key, value] : metadata)
      if (detail::invalid_utf8_at(key) || detail::invalid_utf8_at(value))
        throw value_error(message({}, "__metadata__ entry " + detail::quote(key) + " is not valid UTF-8"));

    // Wider elements first keeps every tensor aligned to its element size (as the reference
    // writer does); the declaration order is kept within one element size.
    std::vector<std::size_t> order(tensors.size());
    for (std::size_t i = 0; i < order.size(); ++i) order[i] = i;
    std::stable_sort(order.begin(), order.end(), [&](std::size_t a, std::size_t b) {
      return dtype_size(tensors[a].type) > dtype_size(tensors[b].type);
    });
    // The header is written as text, exactly as nlohmann::json::dump() writes an object (compact,
    // keys sorted): a nlohmann::json tree's destructor allocates (see detail::header_parser).
    std::map<std::string, std::string> header;  // key -> the JSON text of its value
    if (!metadata.empty()) {
      std::string object;
      for (const auto& [key, value] : metadata)
        object += (object.empty() ? "{" : ",") + detail::quote(key) + ":" + detail::quote(value);
      header.emplace("__metadata__", object + "}");
    }
    std::uint64_t offset = 0;
    for (std::size_t i : order) {
      tensor_spec& spec = tensors[i];
      const std::uint64_t bytes = *detail::checked_byte_size(spec.shape, spec.type);
      if (bytes > std::numeric_limits<std::uint64_t>::max() - offset)
        throw value_error(message(spec.name, "the file would exceed 2^64 bytes"));
      std::string shape;
      for (const std::uint64_t dimension : spec.shape) (shape += shape.empty() ? "" : ",") += std::to_string(dimension);
      header.emplace(spec.name, "{\"data_offsets\":[" + std::to_string(offset) + "," + std::to_string(offset + bytes) +
                                    "],\"dtype\":\"" + std::string(dtype_name(spec.type)) + "\",\"shape\":[" + shape +
                                    "]}");
      layout_.push_back({std::move(spec.name), spec.type, std::move(spec.shape), offset, offset + bytes});
      offset += bytes;
    }
    for (std::size_t i = 0; i < layout_.size(); ++i) index_.emplace(layout_[i].name, i);
    written_.assign(layout_.size(), false);
    appended_.assign(layout_.size(), 0);

    std::string text = "{";
    for (const auto& [key, value] : header) ((text += text.size() > 1 ? "," : "") += detail::quote(key) + ":") += value;
    text += '}';
    text.append((8 - text.size() % 8) % 8, ' ');
    if (text.size() > max_header_length)
      throw value_error(message({}, "the header would have " + std::to_string(text.size()) + " bytes, over the limit of " +
                                        std::to_string(max_header_length)));
    data_offset_ = 8 + text.size();

    temporary_ = bitnet::detail::temporary_name(path_);
    try {
      // open() creates the file before it allocates its buffer, which may throw std::bad_alloc.
      out_.open(temporary_, std::ios::binary | std::ios::trunc);
      if (!out_) throw io_error(message({}, "cannot create the temporary file " + temporary_.string()));
      std::array<std::byte, 8> length;
      detail::store_little_endian<std::uint64_t>(length.data(), text.size());
      out_.write(reinterpret_cast<const char*>(length.data()), 8);
      out_.write(text.data(), static_cast<std::streamsize>(text.size()));
      if (!out_) throw io_error(message({}, "writing the header failed in " + temporary_.string()));
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
  /// The tensors with the offsets they get in the file, in data order.
  const std::vector<tensor_info>& layout() const noexcept { return layout_; }

  /// Writes a tensor's raw little-endian bytes (exactly its declared size).
  void write_bytes(std::string_view name, std::span<const std::byte> bytes) {
    const std::size_t i = claim(name);
    if (bytes.size() != layout_[i].byte_size())
      throw shape_error(message(name, "got " + std::to_string(bytes.size()) + " bytes, declared " +
                                          std::to_string(layout_[i].byte_size())));
    seek_to(layout_[i]);
    out_.write(reinterpret_cast<const char*>(bytes.data()), static_cast<std::streamsize>(bytes.size()));
    check_stream("writing tensor " + detail::quote(name));
    written_[i] = true;
  }

  /// Copies tensor `from_name` of `from` into tensor `name`, which must be declared with the same
  /// dtype and shape, through a bounded buffer (never the whole tensor in memory).
  void copy_tensor(std::string_view name, const reader& from, std::string_view from_name) {
    const std::size_t i = claim(name);
    const tensor_info& t = layout_[i];
    const tensor_info& source = from.info(from_name);
    if (source.type != t.type || source.shape != t.shape)
      throw shape_error(message(name, "declared " + std::string(dtype_name(t.type)) + " " + detail::shape_text(t.shape) +
                                          ", the source is " + std::string(dtype_name(source.type)) + " " +
                                          detail::shape_text(source.shape)));
    std::vector<std::byte> chunk(static_cast<std::size_t>(std::min<std::uint64_t>(t.byte_size(), 1 << 20)));
    seek_to(t);
    for (std::uint64_t done = 0; done < t.byte_size(); done += chunk.size()) {
      const auto n = static_cast<std::size_t>(std::min<std::uint64_t>(chunk.size(), t.byte_size() - done));
      from.read_bytes(from_name, done, std::span(chunk.data(), n));
      out_.write(reinterpret_cast<const char*>(chunk.data()), static_cast<std::streamsize>(n));
    }
    check_stream("writing tensor " + detail::quote(name));
    written_[i] = true;
  }

  /// Writes a tensor from values in C order, converted to its declared dtype (floating values to
  /// F16/BF16/F32/F64 rounding to nearest even; integers to integer dtypes when they fit).
  /// Throws value_error naming the element that does not fit.
  template <element T>
  void write_values(std::string_view name, std::span<const T> values) {
    const std::size_t i = claim(name);
    if (values.size() != layout_[i].element_count())
      throw shape_error(message(name, "got " + std::to_string(values.size()) + " values, declared shape " +
                                          detail::shape_text(layout_[i].shape)));
    append_values(name, values);
  }

  /// Writes the next values of a tensor in C order, for tensors produced piece by piece; the
  /// tensor is complete when all its elements have been appended. Conversion as write_values.
  template <element T>
  void append_values(std::string_view name, std::span<const T> values) {
    const std::size_t i = claim(name);
    const tensor_info& t = layout_[i];
    const std::uint64_t first_element = appended_[i];
    if (values.size() > t.element_count() - first_element)
      throw shape_error(message(name, "appending " + std::to_string(values.size()) + " values after " +
                                          std::to_string(first_element) + " exceeds the declared shape " +
                                          detail::shape_text(t.shape)));
    const std::size_t element_size = dtype_size(t.type);
    const std::size_t chunk_elements = std::max<std::size_t>(1, (std::size_t{1} << 20) / element_size);
    std::vector<std::byte> chunk(std::min(values.size(), chunk_elements) * element_size);
    out_.seekp(static_cast<std::streamoff>(data_offset_ + t.begin + first_element * element_size));
    for (std::size_t first = 0; first < values.size(); first += chunk_elements) {
      const std::size_t n = std::min(chunk_elements, values.size() - first);
      for (std::size_t k = 0; k < n; ++k)
        if (!detail::encode_element(t.type, values[first + k], chunk.data() + k * element_size))
          throw value_error(message(name, "element " + std::to_string(first_element + first + k) + " (" +
                                              value_text(values[first + k]) + ") cannot be stored as " +
                                              std::string(dtype_name(t.type))));
      out_.write(reinterpret_cast<const char*>(chunk.data()), static_cast<std::streamsize>(n * element_size));
    }
    check_stream("writing tensor " + detail::quote(name));
    appended_[i] += values.size();
    written_[i] = appended_[i] == t.element_count();
  }

  /// Writes a matrix (for a 2-D declaration, same rows and columns) or a vector (for a 1-D one).
  template <class Derived>
    requires element<typename Derived::Scalar>
  void write(std::string_view name, const Eigen::DenseBase<Derived>& values) {
    using T = typename Derived::Scalar;
    const tensor_info& t = declared(name);
    const bool vector_fits = t.shape.size() == 1 && (values.cols() == 1 || values.rows() == 1) &&
                             std::uint64_t(values.size()) == t.shape[0];
    const bool matrix_fits = t.shape.size() == 2 && std::uint64_t(values.rows()) == t.shape[0] &&
                             std::uint64_t(values.cols()) == t.shape[1];
    if (!vector_fits && !matrix_fits)
      throw shape_error(message(name, "got a " + std::to_string(values.rows()) + "x" + std::to_string(values.cols()) +
                                          " matrix, declared shape " + detail::shape_text(t.shape)));
    if constexpr (std::is_same_v<Derived, Matrix<T>> || std::is_same_v<Derived, Vector<T>>) {
      // Already contiguous in C order: written without a copy.
      write_values<T>(name, std::span<const T>(values.derived().data(), static_cast<std::size_t>(values.size())));
    } else {
      const Matrix<T> row_major = values;
      write_values<T>(name, std::span<const T>(row_major.data(), static_cast<std::size_t>(row_major.size())));
    }
  }

  /// Checks every declared tensor was written, closes the file and renames it into place.
  void finish() {
    if (finished_) throw io_error(message({}, "finish() called twice"));
    for (std::size_t i = 0; i < layout_.size(); ++i)
      if (!written_[i]) throw io_error(message(layout_[i].name, "declared but never written"));
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
  template <element T>
  static std::string value_text(T value) {
    if constexpr (real_scalar<T>) return nlohmann::json(double(value)).dump();
    else return std::to_string(value);
  }

  std::string message(std::string_view tensor, std::string_view rule) const {
    return detail::message(path_.string(), tensor, rule);
  }

  const tensor_info& declared(std::string_view name) const {
    const auto it = index_.find(name);
    if (it == index_.end()) throw io_error(message(name, "was not declared"));
    return layout_[it->second];
  }

  std::size_t claim(std::string_view name) const {
    if (finished_) throw io_error(message(name, "the file is already finished"));
    const std::size_t i = static_cast<std::size_t>(&declared(name) - layout_.data());
    if (written_[i]) throw io_error(message(name, "written twice"));
    return i;
  }

  void seek_to(const tensor_info& t) {
    out_.seekp(static_cast<std::streamoff>(data_offset_ + t.begin));
    check_stream("seeking to tensor " + detail::quote(t.name));
  }

  void check_stream(const std::string& what) {
    if (!out_) throw io_error(message({}, what + " failed in " + temporary_.string()));
  }

  std::filesystem::path path_;
  std::filesystem::path temporary_;
  std::ofstream out_;
  std::uint64_t data_offset_ = 0;
  std::vector<tensor_info> layout_;
  std::map<std::string, std::size_t, std::less<>> index_;
  std::vector<bool> written_;
  std::vector<std::uint64_t> appended_;  // elements written so far by append_values
  bool finished_ = false;
};

}  // namespace bitnet::safetensors
