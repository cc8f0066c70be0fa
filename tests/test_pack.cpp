#include <bitnet/pack.hpp>

#include <cstdint>
#include <random>
#include <type_traits>

#include <doctest/doctest.h>

using bitnet::Index;
using bitnet::Matrix;
using bitnet::packed_ternary;

namespace {

Matrix<std::int8_t> random_codes(Index rows, Index cols, std::mt19937& rng) {
  std::uniform_int_distribution<int> dist(-1, 1);
  Matrix<std::int8_t> codes(rows, cols);
  for (Index r = 0; r < rows; ++r)
    for (Index c = 0; c < cols; ++c) codes(r, c) = std::int8_t(dist(rng));
  return codes;
}

Index round_up(Index n, Index block) { return (n + block - 1) / block * block; }

}  // namespace

static_assert(std::is_nothrow_move_constructible_v<packed_ternary> && std::is_copy_constructible_v<packed_ternary>);

TEST_CASE("packed_ternary: pack then unpack is the identity for every ragged shape") {
  std::mt19937 rng(11);
  for (Index rows : {1, 2, 3, 4, 5, 7, 8, 9, 15, 16, 17, 31, 33, 65}) {
    for (Index cols : {1, 2, 3, 4, 5, 15, 16, 17, 31, 32, 33, 63, 64, 65, 127, 128, 129, 255, 257, 383, 640}) {
      CAPTURE(rows);
      CAPTURE(cols);
      const Matrix<std::int8_t> codes = random_codes(rows, cols, rng);
      const packed_ternary packed(codes);
      REQUIRE(packed.rows() == rows);
      REQUIRE(packed.cols() == cols);
      CHECK(packed.padded_rows() == round_up(rows, 16));
      CHECK(packed.padded_cols() == round_up(cols, 64));
      CHECK(packed.col_tiles() == round_up(cols, 64) / 16);
      // 2 bits per (padded) weight, nothing else
      CHECK(packed.size_bytes() == std::size_t(round_up(rows, 16) * round_up(cols, 64) / 4));
      CHECK(reinterpret_cast<std::uintptr_t>(packed.data()) % 64 == 0);
      CHECK(packed.unpack() == codes);
      bool every_element = true;
      for (Index r = 0; r < rows; ++r)
        for (Index c = 0; c < cols; ++c) every_element = every_element && packed(r, c) == codes(r, c);
      CHECK(every_element);
    }
  }
}

// The layout written out in pack.hpp, checked bit by bit: a kernel and the writer must agree.
// Every byte and plane of the buffer is decoded back to its (row, column) by the inverse formula.
TEST_CASE("packed_ternary: each weight sits at the documented byte and bits; padding holds weight 0") {
  const Index rows = 19, cols = 83;  // 2 row blocks (16 + 3), 128 padded columns (5 full tiles + 3 columns)
  const Index col_tiles = 128 / 16;
  for (Index r = 0; r < rows; r += 2)
    for (Index c = 0; c < cols; c += 5) {
      Matrix<std::int8_t> codes = Matrix<std::int8_t>::Constant(rows, cols, -1);  // code 0 everywhere
      codes(r, c) = 1;                                                           // code 2 here
      const packed_ternary packed(codes);
      REQUIRE(packed.size_bytes() == std::size_t(32 * 128 / 4));
      const Index byte = (r / 16 * col_tiles + c / 16) * 64 + r % 16 * 4 + c % 4;
      const int shift = int(c % 16 / 4) * 2;
      bool only_there = true;
      for (Index i = 0; i < Index(packed.size_bytes()); ++i) {
        const Index tile = i / 64, row = tile / col_tiles * 16 + i % 64 / 4;
        for (int plane = 0; plane < 4; ++plane) {
          const Index col = tile % col_tiles * 16 + 4 * plane + i % 4;
          const int code = (packed.data()[i] >> (2 * plane)) & 3;
          const bool padding = row >= rows || col >= cols;
          const int expected = padding ? 1 : (row == r && col == c) ? 2 : 0;
          only_there = only_there && code == expected && (row != r || col != c || (i == byte && 2 * plane == shift));
        }
      }
      CAPTURE(r);
      CAPTURE(c);
      CHECK(only_there);
    }
}

TEST_CASE("packed_ternary: rejects codes outside {-1, 0, 1} and empty matrices") {
  Matrix<std::int8_t> codes = Matrix<std::int8_t>::Zero(3, 5);
  codes(2, 4) = 2;
  CHECK_THROWS_WITH_AS(packed_ternary{codes}, doctest::Contains("code 2 at row 2, column 4 is not -1, 0 or +1"),
                       bitnet::value_error);
  codes(2, 4) = -128;
  CHECK_THROWS_AS(packed_ternary{codes}, bitnet::value_error);
  CHECK_THROWS_WITH_AS(packed_ternary{Matrix<std::int8_t>(0, 3)}, doctest::Contains("packed_ternary: codes: empty"),
                       bitnet::shape_error);
  const packed_ternary empty;
  CHECK(empty.rows() == 0);
  CHECK(empty.size_bytes() == 0);
  CHECK(empty.unpack().size() == 0);
}

TEST_CASE("packed_ternary: copies are deep and compare equal") {
  std::mt19937 rng(2);
  const Matrix<std::int8_t> codes = random_codes(9, 200, rng);
  const packed_ternary packed(codes);
  const packed_ternary copy = packed;
  CHECK(copy == packed);
  CHECK(copy.data() != packed.data());
  Matrix<std::int8_t> other = codes;
  other(8, 199) = std::int8_t(other(8, 199) == 1 ? 0 : 1);
  CHECK_FALSE(packed_ternary(other) == packed);
}

// Group-scaled layers pack with the columns aligned to max(64, G): every group of G columns is then
// G / 16 whole tiles at tile j G / 16 of its row block's stream (the kernels' virtual block j).
TEST_CASE("packed_ternary: column alignment for groups; group j of a row block starts at tile j G / 16") {
  std::mt19937 rng(3);
  for (Index alignment : {64, 128, 256})
    for (Index cols : {1, 44, 64, 65, 128, 129, 300, 513}) {
      CAPTURE(alignment);
      CAPTURE(cols);
      const Index rows = 19;
      const Matrix<std::int8_t> codes = random_codes(rows, cols, rng);
      const packed_ternary packed(codes, alignment);
      CHECK(packed.col_alignment() == alignment);
      CHECK(packed.padded_cols() == round_up(cols, alignment));
      CHECK(packed.col_tiles() == round_up(cols, alignment) / 16);
      CHECK(packed.size_bytes() == std::size_t(32 * round_up(cols, alignment) / 4));
      CHECK(packed.unpack() == codes);
      // The documented byte of (row, column), with the aligned padded_cols; padding is weight 0.
      const Index groups = packed.padded_cols() / alignment, tiles_per_group = alignment / 16;
      bool documented = true;
      for (Index r = 0; r < 32; ++r)
        for (Index j = 0; j < groups; ++j)
          for (Index k = 0; k < alignment; ++k) {
            const Index col = j * alignment + k;
            const Index virtual_block = r / 16 * groups + j;  // the kernels' block: tiles_per_group tiles
            const std::size_t byte =
                std::size_t((virtual_block * tiles_per_group + k / 16) * 64 + r % 16 * 4 + k % 4);
            const int code = ((packed.data()[byte] >> (2 * (k % 16 / 4))) & 3) - 1;
            documented = documented && code == (r < rows && col < cols ? codes(r, col) : 0);
          }
      CHECK(documented);
    }
  const Matrix<std::int8_t> codes = random_codes(3, 100, rng);
  CHECK_FALSE(packed_ternary(codes, 128) == packed_ternary(codes));  // same codes, another layout
  CHECK(packed_ternary(codes, 64) == packed_ternary(codes));
  for (Index bad : {0, 32, 96, 512, -64})
    CHECK_THROWS_WITH_AS(packed_ternary(codes, bad), doctest::Contains("is not a power of two in [64, 256]"),
                         bitnet::value_error);
}

#if defined(__linux__) && defined(__x86_64__)
// Native Linux only: qemu-user (the AArch64 stage) may accept madvise without applying it.
#include <bitnet/pack_base3.hpp>

#include <cstdio>
#include <fstream>
#include <sstream>
#include <string>

#include <sys/mman.h>

namespace {

/// The VmFlags of the mapping of /proc/self/smaps that contains address p ("" if none).
std::string vm_flags_at(const void* p) {
  std::ifstream smaps("/proc/self/smaps");
  const auto address = reinterpret_cast<std::uintptr_t>(p);
  bool inside = false;
  for (std::string line; std::getline(smaps, line);) {
    unsigned long begin = 0, end = 0;
    if (std::sscanf(line.c_str(), "%lx-%lx ", &begin, &end) == 2 && line.find(':') > line.find(' '))
      inside = address >= begin && address < end;
    else if (inside && line.rfind("VmFlags:", 0) == 0)
      return line;
  }
  return "";
}

/// Whether this kernel takes MADV_HUGEPAGE advice at all (CONFIG_TRANSPARENT_HUGEPAGE).
bool kernel_takes_huge_page_advice() {
  const std::size_t bytes = std::size_t{4} << 20;
  void* const p = ::mmap(nullptr, bytes, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
  if (p == MAP_FAILED) return false;
  const bool taken = ::madvise(p, bytes, MADV_HUGEPAGE) == 0;
  ::munmap(p, bytes);
  return taken;
}

}  // namespace

TEST_CASE("packed weights of 2 MiB and more are 2 MiB aligned and advised as huge pages; smaller ones cache-line aligned") {
  std::mt19937 rng(5);
  const packed_ternary large(random_codes(3301, 2560, rng));  // 2.02 MiB: one huge page and a tail
  const packed_ternary small(random_codes(640, 2560, rng));
  const bitnet::packed_base3 large_base3(random_codes(6912, 2560, rng));
  REQUIRE(large.size_bytes() >= (std::size_t{2} << 20));
  REQUIRE(small.size_bytes() < (std::size_t{2} << 20));
  REQUIRE(large_base3.size_bytes() >= (std::size_t{2} << 20));
  CHECK(reinterpret_cast<std::uintptr_t>(large.data()) % (std::uintptr_t{2} << 20) == 0);
  CHECK(reinterpret_cast<std::uintptr_t>(large_base3.data()) % (std::uintptr_t{2} << 20) == 0);
  CHECK(reinterpret_cast<std::uintptr_t>(small.data()) % 64 == 0);
  const packed_ternary copy = large;  // copies allocate the same way
  CHECK(reinterpret_cast<std::uintptr_t>(copy.data()) % (std::uintptr_t{2} << 20) == 0);
  if (kernel_takes_huge_page_advice()) {
    // " hg" in VmFlags: the range carries MADV_HUGEPAGE.
    CHECK(vm_flags_at(large.data()).find(" hg") != std::string::npos);
    CHECK(vm_flags_at(large_base3.data()).find(" hg") != std::string::npos);
    CHECK(vm_flags_at(copy.data()).find(" hg") != std::string::npos);
  }
}
#endif
