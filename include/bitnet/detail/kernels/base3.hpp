// Kernels of the 1.6-bit layout (pack_base3.hpp): five codes per byte in base 3, tiles of 16 rows x
// 20 columns in 64 bytes. The same gemm_args as pack.hpp's kernels (common.hpp), with col_tiles the
// 20-column tiles per row block and x zero-padded to at least col_tiles * 20 columns; ungrouped only.
// Every kernel returns exactly the int32 sums of ternary_gemm_reference.
//
// Decoding a byte v = c0 + 3 c1 + 9 c2 + 27 c3 + 81 c4 without a byte multiply:
//   * r = v mod 81 by two steps r = min_u8(r, r - 81) (a wrapped r - 81 is above r, so the minimum
//     keeps r until it is below 81); v - r = 81 c4;
//   * AVX-512 (VBMI): one vpermi2b looks r up in a 128-entry byte table as c0 | c1 << 2 | c2 << 4 |
//     c3 << 6, a byte of pack.hpp, whose planes are one AND each (4^p c, per-plane accumulators as in
//     avx512.hpp); plane 4 is 81 c4 as it stands, divided out exactly at the end (a multiply by the
//     inverse of 81 modulo 2^32: the sum is a multiple of 81 that fits in int32);
//   * AVX2 (vpshufb has 16 entries): the same two steps for 27 and 9, then c4 = (v - r) & 3
//     (81 = 0b1010001, 162 = 0b10100010), c3 by vpshufb of r - s in {0, 27, 54} (low nibbles 0, 11,
//     6), c2 = (s - u) & 3 (9, 18), c0 and c1 by vpshufb of u < 9;
//   * AArch64 (plain NEON and SDOT, split_base3_arm): r as above on 16 bytes (4 rows), then the same
//     table as AVX-512 by a 4-register TBL (entries 0-63) and a 2-register TBX (64-80) into the 2-bit
//     byte, whose planes are extracted as the 2-bit NEON kernels do (USHR, AND), and c4 = (v - r) & 3;
//     SDOT: five SDOT by element into one int32 accumulator; NEON: ten SMLAL / SMLAL2 into int16 lanes.
#pragma once

#include <algorithm>
#include <array>
#include <cstdint>
#include <utility>

#include <Eigen/Core>

#include "avx2.hpp"
#include "avx512.hpp"
#include "common.hpp"
#include "neon.hpp"

namespace bitnet::detail {

inline constexpr Eigen::Index base3_tile_cols = 20;

/// The 2-bit byte c0 | c1 << 2 | c2 << 4 | c3 << 6 of r = c0 + 3 c1 + 9 c2 + 27 c3 (r < 81; 0 above).
inline constexpr std::array<std::uint8_t, 128> base3_low_digits = [] {
  std::array<std::uint8_t, 128> table{};
  for (int r = 0; r < 81; ++r) table[std::size_t(r)] = std::uint8_t(r % 3 | r / 3 % 3 << 2 | r / 9 % 3 << 4 | r / 27 << 6);
  return table;
}();

/// 81 * inverse_of_81 = 1 modulo 2^32: plane 4's sum, exactly 81 S, times this is S.
inline constexpr std::int32_t inverse_of_81 = std::int32_t(0x781948b1u);

inline namespace BITNET_TU_ISA {

/// The layout read the plain way: digit p of byte 4 j + b of tile t is the code of column 20 t + 4 p + b.
inline void ternary_gemm_base3_scalar(const gemm_args& a, Eigen::Index block_begin, Eigen::Index block_end) noexcept {
  for (Eigen::Index g = block_begin; g < block_end; ++g)
    for (Eigen::Index j = 0; j < tile_rows && g * tile_rows + j < a.rows; ++j)
      for (Eigen::Index b = 0; b < a.batch; ++b) {
        const std::int8_t* x = a.x + b * a.x_stride;
        std::int32_t sum = 0;  // |sum| <= 2 * 128 * padded in < 2^31 (max_in_features)
        for (Eigen::Index t = 0; t < a.col_tiles; ++t) {
          const std::uint8_t* lane = a.weights + (g * a.col_tiles + t) * tile_bytes + j * group_cols;
          for (int c = 0; c < group_cols; ++c)
            for (int p = 0, v = lane[c]; p < 5; ++p, v /= 3)
              sum += std::int32_t(v % 3) * x[t * base3_tile_cols + p * group_cols + c];
        }
        a.acc[b * a.rows + g * tile_rows + j] = sum - a.x_sums[b];
      }
}

/// Row blocks per pass of the batch > 1 loops: each token decodes them again, from L1 / L2.
inline Eigen::Index base3_blocks_per_chunk(Eigen::Index col_tiles) noexcept {
  return std::max<Eigen::Index>(1, (Eigen::Index{1} << 15) / (col_tiles * tile_bytes));
}

#ifdef BITNET_X86

/// v mod m for bytes v < 3 m: two steps of v = min_u8(v, v - m).
BITNET_INLINE_AVX2 __m256i reduce_base3_avx2(__m256i v, __m256i m) noexcept {
  v = _mm256_min_epu8(v, _mm256_sub_epi8(v, m));
  return _mm256_min_epu8(v, _mm256_sub_epi8(v, m));
}

/// Batch 1 on AVX2, row block g against token `token`: each half tile (8 rows) decoded into its five
/// code planes (20 ops), five vpmaddubsw with broadcast groups into int16 lanes, widened every
/// avx2_tiles_per_int16 tiles (a lane gains at most 5 x 512 per tile: 8 tiles stay below 2^15).
BITNET_TARGET_AVX2 inline void gemv_block_base3_avx2(const gemm_args& a, Eigen::Index g, Eigen::Index token) noexcept {
  const __m256i k81 = _mm256_set1_epi8(81), k27 = _mm256_set1_epi8(27), k9 = _mm256_set1_epi8(9);
  const __m256i three = _mm256_set1_epi8(3), ones = _mm256_set1_epi16(1);
  // c3 from r - s in {0, 27, 54} (indexed by the low nibble: 0, 11, 6); c0 and c1 from u < 9.
  const __m256i digit3 = _mm256_setr_epi8(0, 0, 0, 0, 0, 0, 2, 0, 0, 0, 0, 1, 0, 0, 0, 0,  //
                                          0, 0, 0, 0, 0, 0, 2, 0, 0, 0, 0, 1, 0, 0, 0, 0);
  const __m256i digit0 = _mm256_setr_epi8(0, 1, 2, 0, 1, 2, 0, 1, 2, 0, 0, 0, 0, 0, 0, 0,  //
                                          0, 1, 2, 0, 1, 2, 0, 1, 2, 0, 0, 0, 0, 0, 0, 0);
  const __m256i digit1 = _mm256_setr_epi8(0, 0, 0, 1, 1, 1, 2, 2, 2, 0, 0, 0, 0, 0, 0, 0,  //
                                          0, 0, 0, 1, 1, 1, 2, 2, 2, 0, 0, 0, 0, 0, 0, 0);
  const std::uint8_t* w = a.weights + g * a.col_tiles * tile_bytes;
  const std::int8_t* x = a.x + token * a.x_stride;
  __m256i total[2] = {_mm256_setzero_si256(), _mm256_setzero_si256()};
  for (Eigen::Index t0 = 0; t0 < a.col_tiles; t0 += avx2_tiles_per_int16) {
    const Eigen::Index t1 = std::min(a.col_tiles, t0 + avx2_tiles_per_int16);
    __m256i acc[2] = {_mm256_setzero_si256(), _mm256_setzero_si256()};
    for (Eigen::Index t = t0; t < t1; ++t, w += tile_bytes, x += base3_tile_cols) {
      const __m256i groups[5] = {broadcast_group_avx2(x), broadcast_group_avx2(x + 4), broadcast_group_avx2(x + 8),
                                 broadcast_group_avx2(x + 12), broadcast_group_avx2(x + 16)};
#pragma GCC unroll 2
      for (int h = 0; h < 2; ++h) {
        const __m256i v = load_avx2(w + 32 * h);
        const __m256i r = reduce_base3_avx2(v, k81), s = reduce_base3_avx2(r, k27), u = reduce_base3_avx2(s, k9);
        const __m256i codes[5] = {_mm256_shuffle_epi8(digit0, u), _mm256_shuffle_epi8(digit1, u),
                                  _mm256_and_si256(_mm256_sub_epi8(s, u), three),
                                  _mm256_shuffle_epi8(digit3, _mm256_sub_epi8(r, s)),
                                  _mm256_and_si256(_mm256_sub_epi8(v, r), three)};
        __m256i sum = _mm256_maddubs_epi16(codes[0], groups[0]);
#pragma GCC unroll 4
        for (int p = 1; p < 5; ++p) sum = _mm256_add_epi16(sum, _mm256_maddubs_epi16(codes[p], groups[p]));
        acc[h] = _mm256_add_epi16(acc[h], sum);
      }
    }
    for (int h = 0; h < 2; ++h) total[h] = _mm256_add_epi32(total[h], _mm256_madd_epi16(acc[h], ones));
  }
  for (int h = 0; h < 2; ++h) store_rows_avx2(a, total[h], g * tile_rows + 8 * h, token, a.x_sums[token]);
}

BITNET_TARGET_AVX2 inline void ternary_gemm_base3_avx2(const gemm_args& a, Eigen::Index block_begin,
                                                       Eigen::Index block_end) noexcept {
  const Eigen::Index chunk = a.batch == 1 ? block_end - block_begin : base3_blocks_per_chunk(a.col_tiles);
  for (Eigen::Index g0 = block_begin; g0 < block_end; g0 += chunk)
    for (Eigen::Index token = 0; token < a.batch; ++token)
      for (Eigen::Index g = g0; g < std::min(g0 + chunk, block_end); ++g) gemv_block_base3_avx2(a, g, token);
}

// tests/avx512_emulation.hpp predefines these, as for avx512.hpp.
#ifndef BITNET_TARGET_AVX512_VBMI
#define BITNET_TARGET_AVX512_VBMI __attribute__((target("avx2,avx512f,avx512bw,avx512vl,avx512vnni,avx512vbmi")))
#define BITNET_INLINE_AVX512_VBMI \
  __attribute__((target("avx2,avx512f,avx512bw,avx512vl,avx512vnni,avx512vbmi"), always_inline)) inline
#endif

/// One tile of 16 rows x 20 columns into the five plane accumulators: planes 0-3 as 4^p c, plane 4 as 81 c.
BITNET_INLINE_AVX512_VBMI void base3_tile_avx512(const std::uint8_t* w, const std::int8_t* x, __m512i (&acc)[5],
                                                 __m512i table_low, __m512i table_high) noexcept {
  const __m512i k81 = _mm512_set1_epi8(81);
  const __m512i v = load_avx512(w);
  __m512i r = _mm512_min_epu8(v, _mm512_sub_epi8(v, k81));
  r = _mm512_min_epu8(r, _mm512_sub_epi8(r, k81));
  const __m512i high = _mm512_sub_epi8(v, r);
  const __m512i low = _mm512_permutex2var_epi8(table_low, r, table_high);
#pragma GCC unroll 4
  for (int p = 0; p < 4; ++p)
    acc[p] = dpbusd_avx512(acc[p], _mm512_and_si512(low, _mm512_set1_epi8(static_cast<char>(3 << (2 * p)))),
                           broadcast_group_avx512(x + p * group_cols));
  acc[4] = dpbusd_avx512(acc[4], high, broadcast_group_avx512(x + 16));
}

/// Batch 1 (and each token of a larger batch): row blocks [begin, end) one after the other (one
/// sequential stream, no software prefetch: see gemv_steps_avx512), even and odd tiles into their own five
/// plane accumulators (10 vpdpbusd chains). A lane of plane 4 gains at most 4 x 162 x 128 per tile,
/// so runs of per_plane_tiles_per_run (2^14) tiles stay below 2^31 before the planes are scaled back.
BITNET_TARGET_AVX512_VBMI inline void gemv_base3_avx512(const gemm_args& a, Eigen::Index begin, Eigen::Index end,
                                                        Eigen::Index token) noexcept {
  const __m512i table_low = _mm512_loadu_si512(base3_low_digits.data());
  const __m512i table_high = _mm512_loadu_si512(base3_low_digits.data() + 64);
  const __m512i inverse = _mm512_set1_epi32(inverse_of_81);
  const std::uint8_t* w = a.weights + begin * a.col_tiles * tile_bytes;
  for (Eigen::Index g = begin; g < end; ++g) {
    const std::int8_t* x = a.x + token * a.x_stride;
    __m512i total = _mm512_setzero_si512();
    for (Eigen::Index remaining = a.col_tiles; remaining > 0;) {
      const Eigen::Index run = std::min(remaining, per_plane_tiles_per_run);
      remaining -= run;
      __m512i even[5], odd[5];
      for (int p = 0; p < 5; ++p) even[p] = odd[p] = _mm512_setzero_si512();
      const std::uint8_t* const pairs_end = w + run / 2 * 2 * tile_bytes;
      for (; w != pairs_end; w += 2 * tile_bytes, x += 2 * base3_tile_cols) {
        base3_tile_avx512(w, x, even, table_low, table_high);
        base3_tile_avx512(w + tile_bytes, x + base3_tile_cols, odd, table_low, table_high);
      }
      if (run % 2 != 0) {
        base3_tile_avx512(w, x, even, table_low, table_high);
        w += tile_bytes;
        x += base3_tile_cols;
      }
      __m512i planes[5];
      for (int p = 0; p < 5; ++p) planes[p] = _mm512_add_epi32(even[p], odd[p]);
      const __m512i low = _mm512_add_epi32(_mm512_add_epi32(planes[0], shift_right_avx512(planes[1], 2)),
                                           _mm512_add_epi32(shift_right_avx512(planes[2], 4), shift_right_avx512(planes[3], 6)));
      total = _mm512_add_epi32(total, _mm512_add_epi32(low, _mm512_mullo_epi32(planes[4], inverse)));
    }
    store_rows_avx512(a, total, g, token, a.x_sums[token]);
  }
}

/// Batch > 1: row block g against Tokens tokens (activations interleaved by 4-byte groups in tiles of
/// avx512_token_tile tokens, interleave_tokens: group q of token t at (q Tokens + t) 4), each tile
/// decoded once into its five planes as plain codes (planes 1-3 by a shift and an AND, plane 4 as
/// (v - r) & 3: 81 = 0b1010001, 162 = 0b10100010) and multiplied by 5 x Tokens vpdpbusd.
template <int Tokens>
BITNET_TARGET_AVX512_VBMI void gemm_shared_base3_avx512(const gemm_args& a, const std::int8_t* xi, Eigen::Index g,
                                                        Eigen::Index token) noexcept {
  const __m512i table_low = _mm512_loadu_si512(base3_low_digits.data());
  const __m512i table_high = _mm512_loadu_si512(base3_low_digits.data() + 64);
  const __m512i k81 = _mm512_set1_epi8(81), three = _mm512_set1_epi8(3);
  const std::uint8_t* w = a.weights + g * a.col_tiles * tile_bytes;
  const std::uint8_t* const end = w + a.col_tiles * tile_bytes;
  __m512i acc[Tokens];
  for (int t = 0; t < Tokens; ++t) acc[t] = _mm512_setzero_si512();
  for (; w != end; w += tile_bytes, xi += base3_tile_cols * Tokens) {
    const __m512i v = load_avx512(w);
    __m512i r = _mm512_min_epu8(v, _mm512_sub_epi8(v, k81));
    r = _mm512_min_epu8(r, _mm512_sub_epi8(r, k81));
    const __m512i low = _mm512_permutex2var_epi8(table_low, r, table_high);
    // Immediate shift counts spelled out: SIMDe (the emulated test) under Clang needs constants.
    const __m512i planes[5] = {_mm512_and_si512(low, three), _mm512_and_si512(_mm512_srli_epi16(low, 2), three),
                               _mm512_and_si512(_mm512_srli_epi16(low, 4), three),
                               _mm512_and_si512(_mm512_srli_epi16(low, 6), three),
                               _mm512_and_si512(_mm512_sub_epi8(v, r), three)};
#pragma GCC unroll 5
    for (int p = 0; p < 5; ++p)
#pragma GCC unroll 16
      for (int t = 0; t < Tokens; ++t)
        acc[t] = dpbusd_avx512(acc[t], planes[p], broadcast_group_avx512(xi + (p * Tokens + t) * 4));
  }
  for (int t = 0; t < Tokens; ++t) store_rows_avx512(a, acc[t], g, token + t, a.x_sums[token + t]);
}

template <int... Tokens>
BITNET_TARGET_AVX512_VBMI void gemm_any_tile_base3_avx512(std::integer_sequence<int, Tokens...>, int tokens,
                                                          const gemm_args& a, const std::int8_t* xt, Eigen::Index g,
                                                          Eigen::Index token) noexcept {
  ((tokens == Tokens + 1 ? gemm_shared_base3_avx512<Tokens + 1>(a, xt, g, token) : void()), ...);
}

/// xi: for batch > 1, the activations interleaved for token tiles of avx512_token_tile (for batch 1, a.x).
BITNET_TARGET_AVX512_VBMI inline void ternary_gemm_base3_avx512(const gemm_args& a, const std::int8_t* xi,
                                                                Eigen::Index block_begin,
                                                                Eigen::Index block_end) noexcept {
  if (a.batch == 1) return gemv_base3_avx512(a, block_begin, block_end, 0);
  const Eigen::Index chunk = base3_blocks_per_chunk(a.col_tiles);
  for (Eigen::Index g0 = block_begin; g0 < block_end; g0 += chunk)
    for (Eigen::Index token = 0; token < a.batch; token += avx512_token_tile) {
      const int tokens = int(std::min<Eigen::Index>(avx512_token_tile, a.batch - token));
      for (Eigen::Index g = g0; g < std::min(g0 + chunk, block_end); ++g)
        gemm_any_tile_base3_avx512(std::make_integer_sequence<int, avx512_token_tile>{}, tokens, a,
                                   xi + token * a.x_stride, g, token);
    }
}

#endif  // BITNET_X86

#ifdef BITNET_ARM64

/// base3_low_digits in NEON registers: entries 0-63 for a 4-register TBL, 64-95 for a 2-register TBX.
struct base3_table_arm {
  uint8x16x4_t first;
  uint8x16x2_t rest;
};

inline base3_table_arm load_base3_table_arm() noexcept {
  const std::uint8_t* t = base3_low_digits.data();
  return {{{vld1q_u8(t), vld1q_u8(t + 16), vld1q_u8(t + 32), vld1q_u8(t + 48)}},
          {{vld1q_u8(t + 64), vld1q_u8(t + 80)}}};
}

/// 16 bytes of a tile (4 rows x 4 bytes) in the 2-bit form: low = c0 | c1 << 2 | c2 << 4 | c3 << 6, a
/// byte of pack.hpp (planes 0-3 as the 2-bit kernels extract them), and c4, plane 4's code.
struct base3_split_arm {
  uint8x16_t low, c4;
};

/// r = v mod 81 by two steps r = min_u8(r, r - 81); low = TBL of r over entries 0-63, then TBX of
/// r - 64 over entries 64-95 (for r < 64, r - 64 wraps above 191: out of range, TBX keeps the TBL
/// byte); c4 = (v - r) & 3 (81 c4 is 0, 0b1010001 or 0b10100010). Nine instructions, plain NEON.
__attribute__((always_inline)) inline base3_split_arm split_base3_arm(uint8x16_t v,
                                                                     const base3_table_arm& table) noexcept {
  const uint8x16_t k81 = vdupq_n_u8(81), k64 = vdupq_n_u8(64);
  uint8x16_t r = vminq_u8(v, vsubq_u8(v, k81));
  r = vminq_u8(r, vsubq_u8(r, k81));
  const uint8x16_t low = vqtbx2q_u8(vqtbl4q_u8(table.first, r), table.rest, vsubq_u8(r, k64));
  return {low, vandq_u8(vsubq_u8(v, r), vdupq_n_u8(3))};
}

/// The five code planes (plain codes 0-2) of 16 bytes: the 2-bit byte's planes by USHR and AND, as
/// gemm_block_neon and gemm_half_dotprod extract them, and c4.
__attribute__((always_inline)) inline void base3_planes_arm(uint8x16_t v, const base3_table_arm& table,
                                                           int8x16_t (&planes)[5]) noexcept {
  const uint8x16_t three = vdupq_n_u8(3);
  const base3_split_arm split = split_base3_arm(v, table);
  planes[0] = vreinterpretq_s8_u8(vandq_u8(split.low, three));
  planes[1] = vreinterpretq_s8_u8(vandq_u8(vshrq_n_u8(split.low, 2), three));
  planes[2] = vreinterpretq_s8_u8(vandq_u8(vshrq_n_u8(split.low, 4), three));
  planes[3] = vreinterpretq_s8_u8(vshrq_n_u8(split.low, 6));
  planes[4] = vreinterpretq_s8_u8(split.c4);
}

/// Tiles summed in int16 lanes by the NEON base-3 kernel. A lane (one row, one column slot b) gains
/// five products c x per tile, each in [2 * -128, 2 * 127]: after 25 tiles it lies in [-32000,
/// 31750], inside int16 (26 tiles of x = -128 against codes 2 would reach -33280).
inline constexpr Eigen::Index neon_base3_tiles_per_int16 = 25;

/// Quarter tiles [first, first + 4 / Tokens) of row block g (rows 4 first ..) against Tokens (1 or 2)
/// tokens from `token`: each quarter tile (4 rows, 16 bytes) decoded once into its five code planes
/// (base3_planes_arm, 15 instructions), then per token SMLAL / SMLAL2 of each plane with its
/// broadcast activation group (10 per quarter tile) into int16 lanes, widened every
/// neon_base3_tiles_per_int16 tiles as in gemm_block_neon. Two tokens take half a block per pass:
/// the whole block's 16 accumulators and the decode table would not fit in the 32 registers.
template <int Tokens>
inline void gemm_quarters_base3_neon(const gemm_args& a, Eigen::Index g, int first, Eigen::Index token) noexcept {
  constexpr int quarters = 4 / Tokens;
  const base3_table_arm table = load_base3_table_arm();
  const std::uint8_t* w = a.weights + g * a.col_tiles * tile_bytes + 16 * first;
  const std::int8_t* x[Tokens];
  int32x4_t acc[Tokens][quarters];
  for (int t = 0; t < Tokens; ++t) {
    x[t] = a.x + (token + t) * a.x_stride;
    for (int q = 0; q < quarters; ++q) acc[t][q] = vdupq_n_s32(0);
  }
  for (Eigen::Index remaining = a.col_tiles; remaining > 0;) {
    const Eigen::Index run = std::min(remaining, neon_base3_tiles_per_int16);
    remaining -= run;
    int16x8_t s[Tokens][quarters][2];  // [token][quarter][rows 4q, 4q+1 | rows 4q+2, 4q+3]
#pragma GCC unroll 2
    for (int t = 0; t < Tokens; ++t)
#pragma GCC unroll 4
      for (int q = 0; q < quarters; ++q) s[t][q][0] = s[t][q][1] = vdupq_n_s16(0);
    for (const std::uint8_t* const run_end = w + run * tile_bytes; w != run_end; w += tile_bytes) {
      int32x4_t xv[Tokens], x_high[Tokens];  // groups 0-3; group 4 is x_high's lane 3
#pragma GCC unroll 2
      for (int t = 0; t < Tokens; ++t) {
        xv[t] = vreinterpretq_s32_s8(vld1q_s8(x[t]));
        x_high[t] = vreinterpretq_s32_s8(vld1q_s8(x[t] + 4));
        x[t] += base3_tile_cols;
      }
#pragma GCC unroll 4
      for (int q = 0; q < quarters; ++q) {
        int8x16_t planes[5];
        base3_planes_arm(vld1q_u8(w + 16 * q), table, planes);
#pragma GCC unroll 2
        for (int t = 0; t < Tokens; ++t) {
          const int8x16_t groups[5] = {vreinterpretq_s8_s32(vdupq_laneq_s32(xv[t], 0)),
                                       vreinterpretq_s8_s32(vdupq_laneq_s32(xv[t], 1)),
                                       vreinterpretq_s8_s32(vdupq_laneq_s32(xv[t], 2)),
                                       vreinterpretq_s8_s32(vdupq_laneq_s32(xv[t], 3)),
                                       vreinterpretq_s8_s32(vdupq_laneq_s32(x_high[t], 3))};
          int16x8_t lo = s[t][q][0], hi = s[t][q][1];
#pragma GCC unroll 5
          for (int p = 0; p < 5; ++p) {
            lo = vmlal_s8(lo, vget_low_s8(planes[p]), vget_low_s8(groups[p]));
            hi = vmlal_high_s8(hi, planes[p], groups[p]);
          }
          s[t][q][0] = lo;
          s[t][q][1] = hi;
        }
      }
    }
#pragma GCC unroll 2
    for (int t = 0; t < Tokens; ++t)
#pragma GCC unroll 4
      for (int q = 0; q < quarters; ++q)
        acc[t][q] = vaddq_s32(acc[t][q], vpaddq_s32(vpaddlq_s16(s[t][q][0]), vpaddlq_s16(s[t][q][1])));
  }
  for (int t = 0; t < Tokens; ++t)
    for (int q = 0; q < quarters; ++q)
      store_rows_arm(a, acc[t][q], g * tile_rows + 4 * (first + q), token + t, a.x_sums[token + t]);
}

/// Plain NEON: batch 1 one row block after the other; batch > 1 two tokens per decode (half a block
/// per pass), over chunks of row blocks that stay in L1 / L2.
inline void ternary_gemm_base3_neon(const gemm_args& a, Eigen::Index block_begin, Eigen::Index block_end) noexcept {
  const Eigen::Index chunk = a.batch == 1 ? block_end - block_begin : base3_blocks_per_chunk(a.col_tiles);
  for (Eigen::Index g0 = block_begin; g0 < block_end; g0 += chunk)
    for (Eigen::Index token = 0; token < a.batch; token += 2)
      for (Eigen::Index g = g0; g < std::min(g0 + chunk, block_end); ++g)
        if (a.batch - token >= 2) {
          gemm_quarters_base3_neon<2>(a, g, 0, token);
          if (g * tile_rows + 8 < a.rows) gemm_quarters_base3_neon<2>(a, g, 2, token);
        } else {
          gemm_quarters_base3_neon<1>(a, g, 0, token);
        }
}

#ifdef BITNET_HAS_DOTPROD_KERNEL

/// Row block g against token `token`: per quarter tile (4 rows, 16 bytes) the five code planes
/// (base3_planes_arm), five SDOT by element with the tile's 20 activations (two 16-byte loads).
BITNET_TARGET_DOTPROD inline void gemv_block_base3_dotprod(const gemm_args& a, Eigen::Index g,
                                                           Eigen::Index token) noexcept {
  const base3_table_arm table = load_base3_table_arm();
  const std::uint8_t* w = a.weights + g * a.col_tiles * tile_bytes;
  const std::int8_t* x = a.x + token * a.x_stride;
  int32x4_t acc[4];
#pragma GCC unroll 4
  for (int q = 0; q < 4; ++q) acc[q] = vdupq_n_s32(0);
  for (Eigen::Index t = 0; t < a.col_tiles; ++t, w += tile_bytes, x += base3_tile_cols) {
    const int8x16_t x_low = vld1q_s8(x), x_high = vld1q_s8(x + 4);  // groups 0-3; group 4 is x_high's lane 3
#pragma GCC unroll 4
    for (int q = 0; q < 4; ++q) {
      int8x16_t planes[5];
      base3_planes_arm(vld1q_u8(w + 16 * q), table, planes);
      int32x4_t sum = vdotq_laneq_s32(acc[q], planes[0], x_low, 0);
      sum = vdotq_laneq_s32(sum, planes[1], x_low, 1);
      sum = vdotq_laneq_s32(sum, planes[2], x_low, 2);
      sum = vdotq_laneq_s32(sum, planes[3], x_low, 3);
      acc[q] = vdotq_laneq_s32(sum, planes[4], x_high, 3);
    }
  }
#pragma GCC unroll 4
  for (int q = 0; q < 4; ++q) store_rows_arm(a, acc[q], g * tile_rows + 4 * q, token, a.x_sums[token]);
}

/// Batch > 1: half `half` (rows 8 half .. 8 half + 7) of row block g against Tokens (2-4) tokens from
/// `token`: each quarter tile decoded once (base3_planes_arm) for 5 x Tokens SDOT. Half a block and
/// 4 tokens a pass: 8 accumulators, 8 activation vectors and the 6-register table fit the 32 registers.
template <int Tokens>
BITNET_TARGET_DOTPROD void gemm_half_base3_dotprod(const gemm_args& a, Eigen::Index g, int half,
                                                   Eigen::Index token) noexcept {
  const base3_table_arm table = load_base3_table_arm();
  const std::uint8_t* w = a.weights + g * a.col_tiles * tile_bytes + 32 * half;
  const std::uint8_t* const w_end = w + a.col_tiles * tile_bytes;
  const std::int8_t* x = a.x + token * a.x_stride;
  int32x4_t acc[Tokens][2];
#pragma GCC unroll 4
  for (int t = 0; t < Tokens; ++t) acc[t][0] = acc[t][1] = vdupq_n_s32(0);
  for (; w != w_end; w += tile_bytes, x += base3_tile_cols) {
    int8x16_t x_low[Tokens], x_high[Tokens];  // groups 0-3; group 4 is x_high's lane 3
#pragma GCC unroll 4
    for (int t = 0; t < Tokens; ++t) {
      x_low[t] = vld1q_s8(x + t * a.x_stride);
      x_high[t] = vld1q_s8(x + t * a.x_stride + 4);
    }
#pragma GCC unroll 2
    for (int q = 0; q < 2; ++q) {
      int8x16_t planes[5];
      base3_planes_arm(vld1q_u8(w + 16 * q), table, planes);
#pragma GCC unroll 4
      for (int t = 0; t < Tokens; ++t) {
        int32x4_t sum = vdotq_laneq_s32(acc[t][q], planes[0], x_low[t], 0);
        sum = vdotq_laneq_s32(sum, planes[1], x_low[t], 1);
        sum = vdotq_laneq_s32(sum, planes[2], x_low[t], 2);
        sum = vdotq_laneq_s32(sum, planes[3], x_low[t], 3);
        acc[t][q] = vdotq_laneq_s32(sum, planes[4], x_high[t], 3);
      }
    }
  }
#pragma GCC unroll 4
  for (int t = 0; t < Tokens; ++t)
#pragma GCC unroll 2
    for (int q = 0; q < 2; ++q)
      store_rows_arm(a, acc[t][q], g * tile_rows + 8 * half + 4 * q, token + t, a.x_sums[token + t]);
}

inline constexpr int base3_dotprod_token_group = 4;

/// Batch 1: gemv_block_base3_dotprod per row block. Batch > 1: groups of up to 4 tokens share each
/// decode (gemm_half_base3_dotprod; a group of 1 runs the batch-1 loop), over chunks of row blocks
/// that stay in L1 / L2.
BITNET_TARGET_DOTPROD inline void ternary_gemm_base3_dotprod(const gemm_args& a, Eigen::Index block_begin,
                                                             Eigen::Index block_end) noexcept {
  if (a.batch == 1) {
    for (Eigen::Index g = block_begin; g < block_end; ++g) gemv_block_base3_dotprod(a, g, 0);
    return;
  }
  const Eigen::Index chunk = base3_blocks_per_chunk(a.col_tiles);
  for (Eigen::Index g0 = block_begin; g0 < block_end; g0 += chunk)
    for (Eigen::Index token = 0; token < a.batch; token += base3_dotprod_token_group) {
      const Eigen::Index tokens = std::min<Eigen::Index>(base3_dotprod_token_group, a.batch - token);
      for (Eigen::Index g = g0; g < std::min(g0 + chunk, block_end); ++g) {
        if (tokens == 1) {
          gemv_block_base3_dotprod(a, g, token);
          continue;
        }
        for (int half = 0; half < 2 && g * tile_rows + 8 * half < a.rows; ++half) switch (tokens) {
            case 4: gemm_half_base3_dotprod<4>(a, g, half, token); break;
            case 3: gemm_half_base3_dotprod<3>(a, g, half, token); break;
            default: gemm_half_base3_dotprod<2>(a, g, half, token); break;
          }
      }
    }
}

#endif  // BITNET_HAS_DOTPROD_KERNEL

#endif  // BITNET_ARM64

}  // namespace BITNET_TU_ISA
}  // namespace bitnet::detail
