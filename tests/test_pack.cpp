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

#include <bitnet/detail/aligned_allocator.hpp>

#include <cstdio>
#include <cstring>
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

std::uintptr_t address_of(const void* p) { return reinterpret_cast<std::uintptr_t>(p); }

/// Whether the small page at p is resident: 1 yes, 0 no, -1 not mapped at all.
int resident(const void* p) {
  unsigned char in_core = 0;
  void* const page = reinterpret_cast<void*>(reinterpret_cast<std::uintptr_t>(p) / 4096 * 4096);
  if (::mincore(page, 4096, &in_core) != 0) return -1;
  return in_core & 1;
}

using bitnet::detail::weight_arena;
constexpr std::size_t mib = std::size_t{1} << 20;

}  // namespace

TEST_CASE("packed weights from 64 KiB up share huge-page chunks end to end; smaller ones come cache-line aligned from the heap") {
  std::mt19937 rng(5);
  // A stack's layer sizes: 640 x 2560 (400 KiB), 2560 x 2560 (1.6 MiB), 3301 x 2560 (2.02 MiB).
  const packed_ternary first(random_codes(640, 2560, rng));
  const packed_ternary second(random_codes(2560, 2560, rng));
  const bitnet::packed_base3 third(random_codes(3301, 2560, rng));
  const packed_ternary tiny(random_codes(16, 64, rng));
  REQUIRE(first.size_bytes() >= weight_arena::min_block);
  REQUIRE(tiny.size_bytes() < weight_arena::min_block);
  const auto address = [](const void* p) { return reinterpret_cast<std::uintptr_t>(p); };
  // Each block follows the previous one's last cache line and its own header line, unless a new
  // chunk began (then it sits just after the chunk's and its own header lines).
  const auto follows = [&](const void* next, const void* previous, std::size_t previous_bytes) {
    return address(next) == address(previous) + round_up(Index(previous_bytes), 64) + 64 ||
           address(next) % (2 * mib) == 128;
  };
  CHECK(follows(second.data(), first.data(), first.size_bytes()));
  CHECK(follows(third.data(), second.data(), second.size_bytes()));
  for (const void* p : {first.data(), second.data(), third.data(), tiny.data()}) CHECK(address(p) % 64 == 0);
  const packed_ternary copy = second;  // copies allocate the same way
  CHECK(follows(copy.data(), third.data(), third.size_bytes()));
  CHECK(copy == second);
  if (kernel_takes_huge_page_advice()) {
    // " hg" in VmFlags: the range carries MADV_HUGEPAGE, small layers included.
    for (const void* p : {first.data(), second.data(), third.data(), copy.data()})
      CHECK(vm_flags_at(p).find(" hg") != std::string::npos);
    CHECK(vm_flags_at(tiny.data()).find(" hg") == std::string::npos);
  }
}

TEST_CASE("weight_arena: a freed block gives its whole pages back; a chunk whose blocks are all freed is unmapped") {
  weight_arena& arena = weight_arena::instance();
  SUBCASE("a block in a shared chunk") {
    auto* const block = static_cast<unsigned char*>(arena.allocate(3 * mib + 100));
    auto* const neighbour = static_cast<unsigned char*>(arena.allocate(mib));
    std::memset(block, 1, 3 * mib + 100);
    std::memset(neighbour, 2, mib);
    CHECK(resident(block + mib) == 1);
    weight_arena::deallocate(block, 3 * mib + 100);
    for (std::size_t offset : {std::size_t{4096}, mib, 3 * mib - 4096}) CHECK(resident(block + offset) == 0);
    CHECK(resident(neighbour) == 1);  // still mapped and holding its bytes
    CHECK(neighbour[0] == 2);
    CHECK(neighbour[mib - 1] == 2);
    weight_arena::deallocate(neighbour, mib);
  }
  SUBCASE("a block larger than half a chunk has a chunk of its own") {
    const std::size_t bytes = weight_arena::chunk_bytes / 2 + 1;
    auto* const block = static_cast<unsigned char*>(arena.allocate(bytes));
    CHECK(address_of(block) % (2 * mib) == 128);
    block[bytes - 1] = 7;
    CHECK(resident(block + bytes - 1) == 1);
    weight_arena::deallocate(block, bytes);
    CHECK(resident(block) == -1);
    CHECK(resident(block + bytes - 1) == -1);
  }
  SUBCASE("no address space: std::bad_alloc, and the arena carries on where it was") {
    auto* const before = static_cast<unsigned char*>(arena.allocate(weight_arena::min_block));
    using weights = bitnet::detail::weight_vector<std::uint8_t>;
    CHECK_THROWS_AS(weights(std::size_t{1} << 47), std::bad_alloc);  // all of a 47-bit user space
    auto* const after = static_cast<unsigned char*>(arena.allocate(weight_arena::min_block));
    CHECK((after == before + weight_arena::min_block + 64 || address_of(after) % (2 * mib) == 128));
    weight_arena::deallocate(before, weight_arena::min_block);
    weight_arena::deallocate(after, weight_arena::min_block);
  }
}
#endif
