// Force-included (-include) into bitnet_x86_emulated_tests after avx512_emulation.hpp: runs the
// AMX-INT8 kernel of detail/kernels/amx.hpp on any x86-64 CPU by replacing the tile intrinsics
// with a plain model of the tile registers, so the kernel's logic (tile configuration, block
// pairs, token tiles, the zero-padded batch tail, the B-tile ring, stores of partial tiles) is
// checked against the scalar reference where no AMX hardware (or no OS permission) exists. The
// model follows the ISA reference: a tile is up to 16 rows of up to 64 bytes; TDPBSSD adds, to
// each int32 of C, the signed dot products of A's row with four signed bytes of each B row;
// every use of an unconfigured tile, or shapes that do not fit, stops the program as the
// hardware's #UD would. The real kernel runs on AMX CPUs in bitnet_tests.
#pragma once

#include <immintrin.h>  // the compiler's AMX declarations first, so the macros below replace them

#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>

#define BITNET_TEST_EMULATED_AMX 1
#define BITNET_TARGET_AMX

namespace bitnet_test_amx {

struct tile_state {
  bool configured = false;
  std::uint8_t rows[8] = {};
  std::uint16_t bytes_per_row[8] = {};
  alignas(64) std::uint8_t data[8][16][64] = {};
};

inline tile_state& tiles() noexcept {
  thread_local tile_state state;
  return state;
}

[[noreturn]] inline void fault(const char* what, int tile) noexcept {
  std::fprintf(stderr, "emulated AMX: %s (tile %d): the hardware would raise #UD\n", what, tile);
  std::abort();
}

inline void check_tile(int t) noexcept {
  if (t < 0 || t > 7) fault("no such tile register", t);
  if (!tiles().configured) fault("tile used before LDTILECFG", t);
  if (tiles().rows[t] == 0 || tiles().bytes_per_row[t] == 0) fault("tile not configured", t);
}

// The 64-byte layout of LDTILECFG's operand: palette, start_row, 14 reserved bytes, 16 x 16-bit
// bytes-per-row, 16 x 8-bit rows; palette 1 has 8 tiles of at most 16 rows x 64 bytes.
inline void load_config(const void* config) noexcept {
  const auto* bytes = static_cast<const std::uint8_t*>(config);
  tile_state& s = tiles();
  if (bytes[0] != 1) fault("palette is not 1", -1);
  for (int t = 0; t < 8; ++t) {
    std::memcpy(&s.bytes_per_row[t], bytes + 16 + 2 * t, 2);
    s.rows[t] = bytes[48 + t];
    if (s.rows[t] > 16 || s.bytes_per_row[t] > 64 || (s.rows[t] == 0) != (s.bytes_per_row[t] == 0))
      fault("tile shape out of range", t);
  }
  s.configured = true;
  std::memset(s.data, 0, sizeof s.data);
}

inline void release() noexcept { tiles() = tile_state{}; }

inline void zero(int t) noexcept {
  check_tile(t);
  std::memset(tiles().data[t], 0, sizeof tiles().data[t]);
}

inline void load(int t, const void* base, long stride) noexcept {
  check_tile(t);
  tile_state& s = tiles();
  std::memset(s.data[t], 0, sizeof s.data[t]);
  for (int r = 0; r < s.rows[t]; ++r)
    std::memcpy(s.data[t][r], static_cast<const std::uint8_t*>(base) + r * stride, s.bytes_per_row[t]);
}

inline void store(int t, void* base, long stride) noexcept {
  check_tile(t);
  const tile_state& s = tiles();
  for (int r = 0; r < s.rows[t]; ++r)
    std::memcpy(static_cast<std::uint8_t*>(base) + r * stride, s.data[t][r], s.bytes_per_row[t]);
}

// C (M x N int32) += A (M x K int8) . B (K/4 x N groups of 4 int8): C[m][n] += sum over k of
// A[m][4k + i] * B[k][4n + i], i = 0..3.
inline void dpbssd(int c, int a, int b) noexcept {
  check_tile(c);
  check_tile(a);
  check_tile(b);
  tile_state& s = tiles();
  const int m_rows = s.rows[c], n_groups = s.bytes_per_row[c] / 4, k_groups = s.bytes_per_row[a] / 4;
  if (s.rows[a] != m_rows || s.rows[b] != k_groups || s.bytes_per_row[b] != s.bytes_per_row[c] ||
      s.bytes_per_row[c] % 4 != 0 || s.bytes_per_row[a] % 4 != 0)
    fault("TDPBSSD operand shapes do not match", c);
  for (int m = 0; m < m_rows; ++m)
    for (int n = 0; n < n_groups; ++n) {
      std::int32_t sum;
      std::memcpy(&sum, s.data[c][m] + 4 * n, 4);
      for (int k = 0; k < k_groups; ++k)
        for (int i = 0; i < 4; ++i)
          sum += std::int32_t(std::int8_t(s.data[a][m][4 * k + i])) * std::int32_t(std::int8_t(s.data[b][k][4 * n + i]));
      std::memcpy(s.data[c][m] + 4 * n, &sum, 4);
    }
}

}  // namespace bitnet_test_amx

#undef _tile_loadd
#undef _tile_stored
#undef _tile_zero
#undef _tile_dpbssd
#define _tile_loadconfig(config) ::bitnet_test_amx::load_config(config)
#define _tile_release() ::bitnet_test_amx::release()
#define _tile_zero(t) ::bitnet_test_amx::zero(t)
#define _tile_loadd(t, base, stride) ::bitnet_test_amx::load(t, base, long(stride))
#define _tile_stored(t, base, stride) ::bitnet_test_amx::store(t, base, long(stride))
#define _tile_dpbssd(c, a, b) ::bitnet_test_amx::dpbssd(c, a, b)
