// Byte-level pieces shared by the file formats (safetensors.hpp, gguf.hpp): little-endian loads
// and stores, random access to a file or an in-memory image, UTF-8 validation, overflow-checked
// products and the temporary name an atomic writer renames into place. Needs only the standard
// library; every failure is a bitnet::io_error "FORMAT: FILE: RULE".
#pragma once

#include <algorithm>
#include <array>
#include <bit>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <limits>
#include <mutex>
#include <optional>
#include <random>
#include <span>
#include <string>
#include <string_view>
#include <system_error>
#include <utility>
#include <vector>

#include "../errors.hpp"

namespace bitnet::detail {

inline std::optional<std::uint64_t> checked_multiply(std::uint64_t a, std::uint64_t b) noexcept {
  if (a != 0 && b > std::numeric_limits<std::uint64_t>::max() / a) return std::nullopt;
  return a * b;
}

/// Index of the first byte that breaks UTF-8 (overlong forms, surrogates and code points above
/// U+10FFFF are errors, as in Rust's str::from_utf8), or nullopt for valid text.
inline std::optional<std::size_t> invalid_utf8_at(std::string_view text) noexcept {
  const auto* s = reinterpret_cast<const unsigned char*>(text.data());
  const std::size_t n = text.size();
  std::size_t i = 0;
  while (i < n) {
    const unsigned char c = s[i];
    std::size_t length;
    unsigned char low = 0x80, high = 0xbf;  // allowed range of the second byte
    if (c < 0x80) { ++i; continue; }
    if (c >= 0xc2 && c <= 0xdf) length = 2;
    else if (c >= 0xe0 && c <= 0xef) {
      length = 3;
      if (c == 0xe0) low = 0xa0;
      if (c == 0xed) high = 0x9f;
    } else if (c >= 0xf0 && c <= 0xf4) {
      length = 4;
      if (c == 0xf0) low = 0x90;
      if (c == 0xf4) high = 0x8f;
    } else {
      return i;
    }
    if (i + length > n) return i;
    if (s[i + 1] < low || s[i + 1] > high) return i;
    for (std::size_t k = 2; k < length; ++k)
      if (s[i + k] < 0x80 || s[i + k] > 0xbf) return i;
    i += length;
  }
  return std::nullopt;
}

template <class U>
U load_little_endian(const std::byte* p) noexcept {
  U value;
  std::memcpy(&value, p, sizeof(U));
  if constexpr (std::endian::native == std::endian::big && sizeof(U) > 1) {
    auto bytes = std::bit_cast<std::array<std::byte, sizeof(U)>>(value);
    std::reverse(bytes.begin(), bytes.end());
    value = std::bit_cast<U>(bytes);
  }
  return value;
}

template <class U>
void store_little_endian(std::byte* p, U value) noexcept {
  if constexpr (std::endian::native == std::endian::big && sizeof(U) > 1) {
    auto bytes = std::bit_cast<std::array<std::byte, sizeof(U)>>(value);
    std::reverse(bytes.begin(), bytes.end());
    value = std::bit_cast<U>(bytes);
  }
  std::memcpy(p, &value, sizeof(U));
}

/// Random access to the bytes of a file (or of a buffer, for tests and fuzzing). `format` and
/// `name` start every message: "FORMAT: NAME: RULE".
class byte_source {
 public:
  byte_source(std::string format, std::string name) : format_(std::move(format)), name_(std::move(name)) {}
  virtual ~byte_source() = default;
  byte_source(const byte_source&) = delete;
  byte_source& operator=(const byte_source&) = delete;

  const std::string& name() const noexcept { return name_; }
  virtual std::uint64_t size() const noexcept = 0;
  /// Reads exactly out.size() bytes at `offset`; throws io_error on a short read.
  virtual void read_at(std::uint64_t offset, std::span<std::byte> out) const = 0;

 protected:
  [[noreturn]] void fail(std::string_view rule) const {
    throw io_error(format_ + ": " + name_ + ": " + std::string(rule));
  }

 private:
  std::string format_;
  std::string name_;
};

class file_source final : public byte_source {
 public:
  file_source(std::string format, const std::filesystem::path& path) : byte_source(std::move(format), path.string()) {
    std::error_code ec;
    if (!std::filesystem::is_regular_file(path, ec)) fail("not a regular file (or missing)");
    size_ = std::filesystem::file_size(path, ec);
    if (ec) fail("cannot get the file size: " + ec.message());
    in_.open(path, std::ios::binary);
    if (!in_) fail("cannot open the file for reading");
  }
  std::uint64_t size() const noexcept override { return size_; }
  void read_at(std::uint64_t offset, std::span<std::byte> out) const override {
    if (offset > size_ || out.size() > size_ - offset) fail("read past the end of the file");
    const std::lock_guard lock(mutex_);
    in_.clear();
    in_.seekg(static_cast<std::streamoff>(offset));
    in_.read(reinterpret_cast<char*>(out.data()), static_cast<std::streamsize>(out.size()));
    if (!in_ || static_cast<std::size_t>(in_.gcount()) != out.size())
      fail("short read at byte " + std::to_string(offset) + " (was the file changed?)");
  }

 private:
  std::uint64_t size_ = 0;
  mutable std::mutex mutex_;
  mutable std::ifstream in_;
};

class memory_source final : public byte_source {
 public:
  memory_source(std::string format, std::vector<std::byte> bytes, std::string name)
      : byte_source(std::move(format), std::move(name)), bytes_(std::move(bytes)) {}
  std::uint64_t size() const noexcept override { return bytes_.size(); }
  void read_at(std::uint64_t offset, std::span<std::byte> out) const override {
    if (offset > bytes_.size() || out.size() > bytes_.size() - offset) fail("read past the end of the buffer");
    if (!out.empty()) std::memcpy(out.data(), bytes_.data() + offset, out.size());
  }

 private:
  std::vector<std::byte> bytes_;
};

/// A fresh name next to `path` ("PATH.tmp-RANDOM") for a file that is renamed into place when complete.
inline std::filesystem::path temporary_name(const std::filesystem::path& path) {
  std::random_device entropy;
  const std::uint64_t tag = (std::uint64_t(entropy()) << 32) ^ entropy();
  std::filesystem::path temporary = path;
  temporary += ".tmp-" + std::to_string(tag);
  return temporary;
}

}  // namespace bitnet::detail
