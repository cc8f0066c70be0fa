// The check shared by the libFuzzer target and the corpus replay: open a byte string as a
// safetensors file and, when the reader accepts it, re-check every invariant the reader promises
// against the raw bytes, independently of the reader's own code. A broken invariant aborts.
#pragma once

#include <bitnet/safetensors.hpp>

#include <cstddef>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <optional>
#include <set>
#include <string>
#include <vector>

namespace harness {

[[noreturn]] inline void violated(const char* what) {
  std::fprintf(stderr, "safetensors invariant violated: %s\n", what);
  std::abort();
}

inline void require(bool condition, const char* what) {
  if (!condition) violated(what);
}

/// Returns true when the reader accepts the bytes (after checking its invariants), false when it
/// rejects them with a bitnet::io_error. Any other outcome aborts.
inline bool check_file(const std::uint8_t* data, std::size_t size) {
  std::vector<std::byte> bytes(size);
  if (size) std::memcpy(bytes.data(), data, size);
  std::optional<bitnet::safetensors::reader> opened;
  try {
    opened.emplace(bitnet::safetensors::reader::from_bytes(bytes, "fuzz-input"));
  } catch (const bitnet::io_error& e) {
    require(std::string(e.what()).starts_with("safetensors: fuzz-input: "), "a rejection names the file");
    return false;
  }
  const bitnet::safetensors::reader& file = *opened;

  // Header: 8-byte length, at most 100,000,000, inside the file, starting with '{'.
  require(size >= 8, "accepted a file shorter than 8 bytes");
  std::uint64_t header_length = 0;
  for (int i = 7; i >= 0; --i) header_length = (header_length << 8) | data[i];
  require(header_length <= 100'000'000, "header length over the limit");
  require(header_length <= size - 8, "header past the end");
  require(file.data_offset() == 8 + header_length, "data offset is 8 + header length");
  require(file.file_size() == size, "file size");
  require(header_length > 0 && data[8] == '{', "header starts with '{'");

  // Tensors tile the data section: sorted, from 0, no gap, no overlap, to the last byte.
  const std::uint64_t data_size = size - file.data_offset();
  std::uint64_t expected = 0;
  std::set<std::string> names;
  for (const auto& t : file.tensors()) {
    require(t.begin == expected, "tensors tile the data section");
    require(t.end >= t.begin && t.end <= data_size, "tensor inside the data section");
    std::uint64_t count = 1;
    for (std::uint64_t d : t.shape) require(!__builtin_mul_overflow(count, d, &count), "element count fits 64 bits");
    std::uint64_t bytes = 0;
    require(!__builtin_mul_overflow(count, std::uint64_t(bitnet::safetensors::dtype_size(t.type)), &bytes),
            "byte size fits 64 bits");
    require(bytes == t.byte_size(), "end - begin == shape x dtype size");
    require(names.insert(t.name).second, "names are unique");
    require(file.find(t.name) == &t, "lookup by name finds the tensor");
    expected = t.end;
  }
  require(expected == data_size, "no trailing or missing bytes");

  // Reading gives the raw bytes; converting into double never fails, into int64 only by range.
  for (const auto& t : file.tensors()) {
    const std::vector<std::byte> raw = file.read_bytes(t.name);
    require(raw.size() == t.byte_size(), "read_bytes size");
    require(raw.empty() || std::memcmp(raw.data(), data + file.data_offset() + t.begin, raw.size()) == 0,
            "read_bytes gives the file's bytes");
    try {
      require(file.read_values<double>(t.name).size() == t.element_count(), "read_values size");
    } catch (const bitnet::value_error&) {
      require(t.type == bitnet::safetensors::dtype::BOOL, "only BOOL bytes other than 0/1 fail to convert to double");
    }
  }
  return true;
}

}  // namespace harness
