// AMX-INT8 kernel (Sapphire Rapids and later) for batches of 16 tokens and more.
//
// One TDPBSSD multiplies a tile A of 16 tokens x 64 activations (row-major, as quantized) by a
// tile B of 16 groups of 4 columns x 16 output rows, where B's row q is 16 rows x 4 consecutive
// columns: exactly plane q % 4 of packed tile q / 4 of a row block (pack.hpp), unpacked with a
// shift and an AND per 64 codes. So B tiles need no transposition, only 16 stores of 64 bytes.
// Per 64 columns the loop is 2 A loads, 2 B loads and 4 TDPBSSD on 2 x 2 C tiles (32 tokens x
// 32 rows): 65536 multiply-adds. Codes are c = w + 1 as everywhere: C holds sum x * c, and the
// token's activation sum is subtracted on the way out. The int32 bound is max_in_features.
//
// The tile registers are configured per call of the kernel on the thread that runs it, and
// released before it returns, so threads that never run it keep no AMX state.
//
// Grouped calls (gemm_args::groups > 1): the two blocks of a pair share their A tiles, so a pair is
// group j of two row blocks (virtual blocks v and v + groups), both multiplying columns
// [j G, (j + 1) G); the call's ranges are whole pairs of row blocks (ternary_gemm). 32-column groups
// take one half-depth step: A tiles of 32 bytes a row, B tiles of 8 rows.
#pragma once

#include "avx512.hpp"
#include "common.hpp"

// tests/amx_emulation.hpp predefines BITNET_TARGET_AMX and replaces the tile intrinsics with a
// model of the tile registers, so that this kernel also runs (over emulated AVX-512) on CPUs
// without AMX.
#if defined(BITNET_X86) && (!defined(BITNET_TEST_EMULATED_AVX512) || defined(BITNET_TEST_EMULATED_AMX))
#define BITNET_HAS_AMX_KERNEL 1
#include <immintrin.h>

#include <algorithm>
#include <cstdint>

#ifndef BITNET_TARGET_AMX
#define BITNET_TARGET_AMX __attribute__((target("avx2,avx512f,avx512bw,avx512vl,avx512vnni,amx-tile,amx-int8")))
#endif

namespace bitnet::detail {
inline namespace BITNET_TU_ISA {

inline constexpr Eigen::Index amx_min_batch = 16;
inline constexpr Eigen::Index amx_tokens = 16;      // rows of an A tile
inline constexpr Eigen::Index amx_step_cols = 64;   // columns per TDPBSSD
inline constexpr Eigen::Index amx_tile_bytes = 1024;

struct alignas(64) amx_tile_config {
  std::uint8_t palette = 1;
  std::uint8_t start_row = 0;
  std::uint8_t reserved[14] = {};
  std::uint16_t bytes_per_row[16] = {};
  std::uint8_t rows[16] = {};
};

/// Unpacks the `tiles` (4, or 2 for 32-column groups) packed tiles of block g that cover columns
/// [64 s, 64 s + 16 tiles) of the block into one B tile: plane p of packed tile q is B's 64-byte
/// row 4 q + p.
BITNET_TARGET_AMX inline void unpack_step_amx(const gemm_args& a, Eigen::Index g, Eigen::Index s, int tiles,
                                              std::int8_t* to) noexcept {
  const __m512i mask = _mm512_set1_epi8(3);
  const std::uint8_t* w = a.weights + (g * a.col_tiles + 4 * s) * tile_bytes;
#pragma GCC unroll 4
  for (int q = 0; q < tiles; ++q, w += tile_bytes, to += 4 * tile_bytes) {
    const __m512i tile = _mm512_load_si512(w);
    _mm512_store_si512(to, _mm512_and_si512(tile, mask));
    _mm512_store_si512(to + 64, _mm512_and_si512(_mm512_srli_epi16(tile, 2), mask));
    _mm512_store_si512(to + 128, _mm512_and_si512(_mm512_srli_epi16(tile, 4), mask));
    _mm512_store_si512(to + 192, _mm512_and_si512(_mm512_srli_epi16(tile, 6), mask));
  }
}

/// Token tile `tile`'s A rows: from a.x, or from the zero-padded copy of the last, partial tile.
inline const std::int8_t* amx_token_rows(const gemm_args& a, const std::int8_t* x_tail, Eigen::Index tile) noexcept {
  return (tile + 1) * amx_tokens <= a.batch ? a.x + tile * amx_tokens * a.x_stride : x_tail;
}

/// Writes C (16 tokens x 16 rows of block g, int32, 64-byte rows) minus each token's activation
/// sum (over the block's columns), for the tokens and rows that exist.
BITNET_TARGET_AMX inline void store_tile_amx(const gemm_args& a, const std::int32_t* c, Eigen::Index token0,
                                             Eigen::Index g) noexcept {
  const Eigen::Index first = g * tile_rows;
  if (first >= a.rows || token0 >= a.batch) return;
  const Eigen::Index rows = std::min(tile_rows, a.rows - first), tokens = std::min(amx_tokens, a.batch - token0);
  const __mmask16 lanes = __mmask16((1u << rows) - 1);
  for (Eigen::Index t = 0; t < tokens; ++t)
    _mm512_mask_storeu_epi32(a.acc + (token0 + t) * a.rows + first, lanes,
                             _mm512_sub_epi32(_mm512_load_si512(c + t * tile_rows), _mm512_set1_epi32(group_x_sum(a, g, token0 + t))));
}

/// Row blocks [block_begin, block_end), two at a time (a missing second block is computed from
/// the first again and not stored; for a grouped call, group j of two row blocks at a time),
/// against every token, two token tiles at a time. x_tail: the
/// last token tile zero-padded to 16 rows (row stride a.x_stride), when a.batch is not a multiple
/// of 16. The B tiles of each 64-column step are unpacked right before their TDPBSSDs (into a
/// 4 KiB ring in `unpacked`, which stays in L1), so unpacking overlaps the tile multiplies.
BITNET_TARGET_AMX inline void ternary_gemm_amx(const gemm_args& a, const std::int8_t* x_tail, Eigen::Index block_begin,
                                               Eigen::Index block_end, std::int8_t* unpacked) noexcept {
  // Depth of one TDPBSSD step: 64 columns, or the 32 of a 32-column group (2 packed tiles).
  const int step_cols = int(std::min<Eigen::Index>(amx_step_cols, a.col_tiles * tile_cols));
  amx_tile_config config;
  for (int t = 0; t < 8; ++t) {
    config.rows[t] = 16;
    config.bytes_per_row[t] = 64;
  }
  config.bytes_per_row[4] = config.bytes_per_row[5] = std::uint16_t(step_cols);  // A: 16 tokens x step_cols
  config.rows[6] = config.rows[7] = std::uint8_t(step_cols / 4);                 // B: step_cols / 4 rows
  _tile_loadconfig(&config);
  const Eigen::Index steps = a.col_tiles * tile_cols / step_cols;
  const int step_tiles = step_cols / int(tile_cols);
  const Eigen::Index token_tiles = (a.batch + amx_tokens - 1) / amx_tokens;
  alignas(64) std::int32_t c[4][tile_rows * amx_tokens];
  const Eigen::Index pair = 2 * a.groups;  // a pair of row blocks, in virtual blocks
  for (Eigen::Index first = block_begin; first < block_end; first += pair)
    for (Eigen::Index j = 0; j < a.groups; ++j) {
      const Eigen::Index g = first + j;
      const Eigen::Index g1 = first + a.groups + j < block_end ? first + a.groups + j : g;
      const Eigen::Index column = group_column(a, g);
      for (Eigen::Index tt = 0; tt < token_tiles; tt += 2) {
        const std::int8_t* x0 = amx_token_rows(a, x_tail, tt) + column;
        const std::int8_t* x1 = tt + 1 < token_tiles ? amx_token_rows(a, x_tail, tt + 1) + column : x0;
        _tile_zero(0);
        _tile_zero(1);
        _tile_zero(2);
        _tile_zero(3);
        for (Eigen::Index s = 0; s < steps; ++s) {
          std::int8_t* b0 = unpacked + (s % 2) * 2 * amx_tile_bytes;
          std::int8_t* b1 = b0 + amx_tile_bytes;
          unpack_step_amx(a, g, s, step_tiles, b0);
          unpack_step_amx(a, g1, s, step_tiles, b1);
          _tile_loadd(4, x0 + s * step_cols, a.x_stride);
          _tile_loadd(5, x1 + s * step_cols, a.x_stride);
          _tile_loadd(6, b0, 64);
          _tile_loadd(7, b1, 64);
          _tile_dpbssd(0, 4, 6);
          _tile_dpbssd(1, 4, 7);
          _tile_dpbssd(2, 5, 6);
          _tile_dpbssd(3, 5, 7);
        }
        _tile_stored(0, c[0], 64);
        _tile_stored(1, c[1], 64);
        _tile_stored(2, c[2], 64);
        _tile_stored(3, c[3], 64);
        store_tile_amx(a, c[0], tt * amx_tokens, g);
        if (tt + 1 < token_tiles) store_tile_amx(a, c[2], (tt + 1) * amx_tokens, g);
        if (g1 != g) {
          store_tile_amx(a, c[1], tt * amx_tokens, g1);
          if (tt + 1 < token_tiles) store_tile_amx(a, c[3], (tt + 1) * amx_tokens, g1);
        }
      }
    }
  _tile_release();
}

}  // namespace BITNET_TU_ISA
}  // namespace bitnet::detail

#endif
