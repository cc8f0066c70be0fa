// The check shared by the GGUF libFuzzer target and the corpus replay: open a byte string as a GGUF
// file and, when the reader accepts it, re-check every invariant the reader promises against the
// raw bytes, independently of the reader's own code; then decode every tensor it can. A broken
// invariant aborts.
#pragma once

#include <bitnet/gguf.hpp>

#include <algorithm>
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
  std::fprintf(stderr, "gguf invariant violated: %s\n", what);
  std::abort();
}

inline void require(bool condition, const char* what) {
  if (!condition) violated(what);
}

inline std::uint64_t raw_u64(const std::uint8_t* p) {
  std::uint64_t v = 0;
  for (int i = 7; i >= 0; --i) v = (v << 8) | p[i];
  return v;
}

/// Returns true when the reader accepts the bytes (after checking its invariants), false when it
/// rejects them with a bitnet::io_error. Any other outcome aborts.
inline bool check_file(const std::uint8_t* data, std::size_t size) {
  namespace gguf = bitnet::gguf;
  std::vector<std::byte> bytes(size);
  if (size) std::memcpy(bytes.data(), data, size);
  std::optional<gguf::reader> opened;
  try {
    opened.emplace(gguf::reader::from_bytes(bytes, "fuzz-input"));
  } catch (const bitnet::io_error& e) {
    require(std::string(e.what()).starts_with("gguf: fuzz-input: "), "a rejection names the file");
    return false;
  }
  const gguf::reader& file = *opened;

  // Header: magic, version 2 or 3, the counts the reader reports.
  require(size >= 24, "accepted a file shorter than the fixed header");
  require(std::memcmp(data, "GGUF", 4) == 0, "magic");
  const std::uint32_t version = std::uint32_t(data[4]) | std::uint32_t(data[5]) << 8 | std::uint32_t(data[6]) << 16 |
                                std::uint32_t(data[7]) << 24;
  require((version == 2 || version == 3) && file.version() == version, "version");
  require(raw_u64(data + 8) == file.tensors().size(), "tensor count");
  require(raw_u64(data + 16) == file.metadata().size(), "key-value count");
  const std::uint64_t alignment = file.alignment();
  require(alignment > 0 && (alignment & (alignment - 1)) == 0, "alignment is a power of 2");
  require(file.data_offset() <= size, "data section inside the file");
  if (!file.tensors().empty()) require(file.data_offset() % alignment == 0, "data section aligned");

  std::set<std::string> keys;
  for (const auto& entry : file.metadata()) {
    require(!entry.key.empty() && keys.insert(entry.key).second, "keys non-empty and unique");
    require(file.find_value(entry.key) == &entry.val, "lookup by key");
  }

  // Tensors: names, sizes from ne and the type (computed here again), aligned, inside, disjoint.
  const std::uint64_t data_size = size - file.data_offset();
  std::set<std::string> names;
  std::vector<std::pair<std::uint64_t, std::uint64_t>> extents;
  for (const auto& t : file.tensors()) {
    require(!t.name.empty() && t.name.size() <= 63 && names.insert(t.name).second, "names valid and unique");
    require(file.find(t.name) == &t, "lookup by name");
    require(t.ne.size() <= 4, "at most 4 dimensions");
    std::uint64_t count = 1;
    if (std::find(t.ne.begin(), t.ne.end(), 0) != t.ne.end()) count = 0;
    else
      for (std::uint64_t n : t.ne) require(!__builtin_mul_overflow(count, n, &count), "element count fits 64 bits");
    require(count <= std::uint64_t(INT64_MAX), "element count fits int64");
    const gguf::type_traits traits = gguf::traits_of(t.type);
    require((t.ne.empty() ? 1 : t.ne[0]) % traits.block_size == 0, "rows of whole blocks");
    std::uint64_t expected = 0;
    if (t.type == gguf::tensor_type::I2_S) expected = count / 4 + 32;
    else require(!__builtin_mul_overflow(count / traits.block_size, traits.block_bytes, &expected), "byte size fits");
    require(expected == t.byte_size, "byte size from ne and type");
    require(t.offset % alignment == 0, "offset aligned");
    require(t.offset <= data_size && t.byte_size <= data_size - t.offset, "tensor inside the data section");
    if (t.byte_size) extents.emplace_back(t.offset, t.offset + t.byte_size);
  }
  std::sort(extents.begin(), extents.end());
  for (std::size_t i = 1; i < extents.size(); ++i) require(extents[i].first >= extents[i - 1].second, "tensors disjoint");

  // Reading gives the file's bytes; decoding either works or throws a bitnet::error.
  for (const auto& t : file.tensors()) {
    if (t.byte_size > (1u << 20)) continue;
    const std::vector<std::byte> raw = file.read_bytes(t.name);
    require(raw.size() == t.byte_size, "read_bytes size");
    require(raw.empty() || std::memcmp(raw.data(), data + file.data_offset() + t.offset, raw.size()) == 0,
            "read_bytes gives the file's bytes");
    try {
      if (gguf::is_block_ternary(t.type)) {
        const gguf::block_tensor raw = file.read_blocks(t.name);
        require(std::uint64_t(raw.codes.cols()) == t.ne[0], "raw columns are ne[0]");
        require((raw.codes.array() >= -1).all() && (raw.codes.array() <= 2).all(), "raw codes are -1..+2");
        require(raw.scales.cols() * raw.block_size == raw.codes.cols(), "one scale per block");
      }
      if (gguf::is_ternary(t.type)) {
        const gguf::ternary_tensor decoded = file.read_ternary(t.name);
        require(std::uint64_t(decoded.codes.cols()) == t.ne[0], "decoded columns are ne[0]");
        require((decoded.codes.array().abs() <= 1).all(), "decoded codes are ternary");
        if (decoded.blocks_per_row > 0) {
          const gguf::ternary_tensor_groups groups = gguf::to_groups(decoded, "fuzz-input", t.name);
          require((groups.codes.array().abs() <= 1).all(), "group codes are ternary");
          require((groups.unit_scales.array() >= 0).all(), "unit scales are >= 0");
          const auto layer = gguf::to_group_bit_linear<float>(groups);
          require(layer.ternary_weight() == groups.codes, "a group-scaled layer keeps the codes");
        }
        (void)gguf::to_bit_linear<float>(decoded, "fuzz-input", t.name);
      } else {
        (void)file.read_matrix<double>(t.name);
      }
    } catch (const bitnet::error&) {
    }
  }
  return true;
}

}  // namespace harness
