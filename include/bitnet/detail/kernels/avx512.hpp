// AVX-512 VNNI kernels: vpdpbusd multiplies unsigned codes c in {0, 1, 2} by int8 activations and
// adds groups of four straight into int32 lanes, so there is no int16 intermediate at all.
//
// Both products read a whole 64-byte tile of pack.hpp per load: one 32-bit lane per row of the
// 16-row block. Plane p of the tile is 16 rows x 4 consecutive columns, so one vpdpbusd multiplies
// it with a broadcast 4-byte group of one token's activations ({1to16} from memory: a load, no
// shuffle). A token's activations are read 4 bytes per 64 multiply-adds, and an unpacked plane is
// reused by every token of a tile: activations come from L1, not duplicated planes from L2.
//
// Two ways to unpack a plane (docs/kernels.md has the counts):
//   * per-plane accumulators (batch 1 to 4): plane p is extracted with one AND alone, as 4^p c,
//     into an accumulator of its own. A lane gains at most 4 * 128 * 128 = 2^16 per tile (p = 3),
//     so a run of per_plane_tiles_per_run = 2^14 tiles stays below 2^30 before the planes are
//     scaled back (an exact arithmetic shift: every term is a multiple of 4^p) and summed;
//   * shift and AND (batch 5 and more): one accumulator per token and row block, the three shifts
//     per tile shared by every token. A lane gains at most 4 * 4 * 256 per tile; the int32 bound
//     is max_in_features.
// Activation quantization reuses the AVX2 routine (every AVX-512 CPU has AVX2).
#pragma once

#include "../float_formats.hpp"
#include "avx2.hpp"
#include "common.hpp"
#include "scalar.hpp"

#ifdef BITNET_X86
#include <immintrin.h>

#include <algorithm>
#include <cstdint>
#include <utility>

// GCC 12 warns (-Wuninitialized) about its own avx512fintrin.h helpers once they are inlined here;
// users building with -Werror must not see it.
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wuninitialized"
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#endif

// tests/avx512_emulation.hpp predefines these (and routes the intrinsics through SIMDe) so the
// kernels below also run, emulated, in CI on CPUs without AVX-512.
#ifndef BITNET_TARGET_AVX512
#define BITNET_TARGET_AVX512 __attribute__((target("avx2,avx512f,avx512bw,avx512vl,avx512vnni")))
#define BITNET_INLINE_AVX512 __attribute__((target("avx2,avx512f,avx512bw,avx512vl,avx512vnni"), always_inline)) inline
#endif

namespace bitnet::detail {
inline namespace BITNET_TU_ISA {

BITNET_INLINE_AVX512 __m512i load_avx512(const void* p) noexcept { return _mm512_load_si512(p); }

BITNET_INLINE_AVX512 __m512i broadcast_group_avx512(const std::int8_t* p) noexcept {
  return _mm512_set1_epi32(load_u32(p));
}

/// acc + the dot products of groups of four u8 codes and s8 activations (vpdpbusd). Inline assembly
/// where it is real AVX-512: GCC 12 wraps every vpdpbusd intrinsic in a register move to and from
/// a copy of the accumulator (two moves per multiply in the compiled loops); the asm names the
/// accumulator as read and written in place, so the moves are gone.
BITNET_INLINE_AVX512 __m512i dpbusd_avx512(__m512i acc, __m512i codes, __m512i x) noexcept {
#if defined(BITNET_TEST_EMULATED_AVX512)
  return _mm512_dpbusd_epi32(acc, codes, x);
#else
  __asm__("vpdpbusd %2, %1, %0" : "+v"(acc) : "v"(codes), "v"(x));
  return acc;
#endif
}

/// v >> shift (arithmetic): once per run of tiles (per group for a grouped call). Per 256-bit half
/// in the emulated test: SIMDe 0.7.4 has no _mm512_srai_epi32.
BITNET_INLINE_AVX512 __m512i shift_right_avx512(__m512i v, int shift) noexcept {
#if defined(BITNET_TEST_EMULATED_AVX512)
  const __m256i low = _mm256_srai_epi32(_mm512_castsi512_si256(v), shift);
  const __m256i high = _mm256_srai_epi32(_mm512_extracti64x4_epi64(v, 1), shift);
  return _mm512_inserti64x4(_mm512_castsi256_si512(low), high, 1);
#else
  return _mm512_srai_epi32(v, unsigned(shift));
#endif
}

/// Writes the 16 int32 row sums of (virtual) block g for one token, minus the token's activation
/// sum over the block's columns (group_x_sum).
BITNET_INLINE_AVX512 void store_rows_avx512(const gemm_args& a, __m512i sums, Eigen::Index g, Eigen::Index token,
                                            std::int32_t offset) noexcept {
  const Eigen::Index first = g * tile_rows, count = std::min(tile_rows, a.rows - first);
  std::int32_t* out = a.acc + token * a.rows + first;
  if (count == tile_rows) return _mm512_storeu_si512(out, _mm512_sub_epi32(sums, _mm512_set1_epi32(offset)));
  alignas(64) std::int32_t lanes[tile_rows];
  _mm512_store_si512(lanes, sums);
  for (Eigen::Index j = 0; j < count; ++j) out[j] = lanes[j] - offset;
}

inline constexpr Eigen::Index per_plane_tiles_per_run = Eigen::Index{1} << 14;

/// Blocks row blocks g .. g + Blocks - 1 against Tokens tokens (activations interleaved by 4-byte
/// groups, interleave_tokens; for one token that is the row itself; xi at the blocks' first
/// column), with per-plane accumulators. Blocks > 1 only for ungrouped calls: the blocks share xi.
template <int Blocks, int Tokens>
BITNET_TARGET_AVX512 void gemm_per_plane_avx512(const gemm_args& a, const std::int8_t* xi, Eigen::Index g,
                                                Eigen::Index token) noexcept {
  const std::uint8_t* w = a.weights + g * a.col_tiles * tile_bytes;
  const Eigen::Index stream = a.col_tiles * tile_bytes;  // bytes from one row block to the next
  // The run totals live in memory, touched once per run, so the loop keeps its registers for the
  // accumulators (GCC 12 otherwise spills accumulators inside the loop).
  alignas(64) std::int32_t total[Blocks][Tokens][tile_rows] = {};
  for (Eigen::Index remaining = a.col_tiles; remaining > 0;) {
    const Eigen::Index run = std::min(remaining, per_plane_tiles_per_run);
    remaining -= run;
    const std::uint8_t* const run_end = w + run * tile_bytes;
    __m512i acc[Blocks][Tokens][4];
    for (int r = 0; r < Blocks; ++r)
      for (int t = 0; t < Tokens; ++t)
        for (int p = 0; p < 4; ++p) acc[r][t][p] = _mm512_setzero_si512();
    do {
#pragma GCC unroll 4
      for (int r = 0; r < Blocks; ++r) {
        const __m512i tile = load_avx512(w + r * stream);
#pragma GCC unroll 4
        for (int p = 0; p < 4; ++p) {
          const __m512i codes = _mm512_and_si512(tile, _mm512_set1_epi8(static_cast<char>(3 << (2 * p))));
#pragma GCC unroll 4
          for (int t = 0; t < Tokens; ++t)
            acc[r][t][p] = dpbusd_avx512(acc[r][t][p], codes, broadcast_group_avx512(xi + (p * Tokens + t) * 4));
        }
      }
      w += tile_bytes;
      xi += tile_cols * Tokens;
    } while (w != run_end);
    for (int r = 0; r < Blocks; ++r)
      for (int t = 0; t < Tokens; ++t) {
        const __m512i unscaled =
            _mm512_add_epi32(_mm512_add_epi32(acc[r][t][0], shift_right_avx512(acc[r][t][1], 2)),
                             _mm512_add_epi32(shift_right_avx512(acc[r][t][2], 4), shift_right_avx512(acc[r][t][3], 6)));
        _mm512_store_si512(total[r][t], _mm512_add_epi32(load_avx512(total[r][t]), unscaled));
      }
  }
  for (int r = 0; r < Blocks; ++r)
    if ((g + r) * tile_rows < a.rows)
      for (int t = 0; t < Tokens; ++t)
        store_rows_avx512(a, load_avx512(total[r][t]), g + r, token + t, group_x_sum(a, g + r, token + t));
}

/// The batch-1 inner loop shared by gemv_steps_avx512 and gemv_grouped_avx512: the tiles [w, w_end)
/// of one row block against the token x, Step tiles an iteration, into per-plane accumulators (plane p extracted as 4^p c by one AND) for even and odd
/// tiles (8 independent vpdpbusd chains), then folded to the 16 rows' sums sum_p plane_p / 4^p.
/// The caller bounds the tiles so that no chain passes 2^31. Advances w and x past the tiles.
template <int Step>
BITNET_INLINE_AVX512 __m512i per_plane_row_sums_avx512(const std::uint8_t*& w, const std::uint8_t* const w_end,
                                                      const std::int8_t*& x) noexcept {
  __m512i acc[2][4];
  for (int h = 0; h < 2; ++h)
    for (int p = 0; p < 4; ++p) acc[h][p] = _mm512_setzero_si512();
  do {
#pragma GCC unroll 4
    for (int t = 0; t < Step; ++t) {
      const __m512i tile = load_avx512(w + t * tile_bytes);
#pragma GCC unroll 4
      for (int p = 0; p < 4; ++p) {
        const __m512i codes = _mm512_and_si512(tile, _mm512_set1_epi8(static_cast<char>(3 << (2 * p))));
        acc[t % 2][p] = dpbusd_avx512(acc[t % 2][p], codes, broadcast_group_avx512(x + t * tile_cols + p * group_cols));
      }
    }
    w += Step * tile_bytes;
    x += Step * tile_cols;
  } while (w != w_end);
  const __m512i planes[4] = {_mm512_add_epi32(acc[0][0], acc[1][0]), _mm512_add_epi32(acc[0][1], acc[1][1]),
                             _mm512_add_epi32(acc[0][2], acc[1][2]), _mm512_add_epi32(acc[0][3], acc[1][3])};
  return _mm512_add_epi32(_mm512_add_epi32(planes[0], shift_right_avx512(planes[1], 2)),
                          _mm512_add_epi32(shift_right_avx512(planes[2], 4), shift_right_avx512(planes[3], 6)));
}

/// Batch 1: (virtual) blocks [begin, end) one after the other, so the weights are read as one
/// sequential stream (the blocks of pack.hpp follow each other, and so do the groups of a row
/// block) with no software prefetch: on huge pages (weight_allocator) the hardware prefetchers keep
/// the stream at the DRAM read floor, and prefetch instructions 4 KiB ahead measured 15-18% slower
/// (docs/benchmarks.md, session 8). Per-plane accumulators (plane p extracted as 4^p c by one AND)
/// for even and odd tiles: 8 independent vpdpbusd chains from one stream, Step tiles per iteration
/// (4; 2 for the 2-tile blocks of 32-column groups). Each run of at most
/// per_plane_tiles_per_run tiles, and each block, is scaled back before the next (the bound of
/// gemm_per_plane_avx512).
template <int Step>
BITNET_TARGET_AVX512 void gemv_steps_avx512(const gemm_args& a, Eigen::Index begin, Eigen::Index end) noexcept {
  const std::uint8_t* w = a.weights + begin * a.col_tiles * tile_bytes;
  const Eigen::Index group_width = a.col_tiles * tile_cols;
  Eigen::Index group = begin % a.groups;  // block g's group, counted along (no division per block)
  for (Eigen::Index g = begin; g < end; ++g) {
    const std::int8_t* x = a.x + group * group_width;
    __m512i total = _mm512_setzero_si512();
    for (Eigen::Index remaining = a.col_tiles; remaining > 0;) {
      // col_tiles is a multiple of Step, and so is every run.
      const Eigen::Index run = std::min(remaining, per_plane_tiles_per_run);
      remaining -= run;
      // A plane's even and odd tiles together gain at most 2^14 tiles x 2^16: below 2^31.
      total = _mm512_add_epi32(total, per_plane_row_sums_avx512<Step>(w, w + run * tile_bytes, x));
    }
    store_rows_avx512(a, total, g, 0, a.x_sums[group]);
    if (++group == a.groups) group = 0;
  }
}

BITNET_TARGET_AVX512 inline void gemv_avx512(const gemm_args& a, Eigen::Index begin, Eigen::Index end) noexcept {
  if (a.col_tiles % 4 == 0) return gemv_steps_avx512<4>(a, begin, end);
  gemv_steps_avx512<2>(a, begin, end);  // 32-column groups: 2 tiles per block
}

/// The 16 unit scales at scales + index (binary16 or float, kernel_unit_scales), as floats (exact).
template <bool HalfScales>
BITNET_INLINE_AVX512 __m512 load_unit_scales_avx512(const void* scales, Eigen::Index index) noexcept {
  if constexpr (HalfScales) {
    const std::uint16_t* half = static_cast<const std::uint16_t*>(scales) + index;
#if defined(BITNET_TEST_EMULATED_AVX512)
    alignas(64) float lanes[tile_rows];  // SIMDe 0.7.4 has no _mm512_cvtph_ps
    for (Eigen::Index r = 0; r < tile_rows; ++r) lanes[r] = half_to_float(half[r]);
    return _mm512_load_ps(lanes);
#else
    return _mm512_cvtph_ps(_mm256_load_si256(reinterpret_cast<const __m256i*>(half)));
#endif
  } else {
    return _mm512_load_ps(static_cast<const float*>(scales) + index);
  }
}

/// How far ahead the fused kernel prefetches its scale stream: 8 groups of 16 binary16 scales.
inline constexpr Eigen::Index scale_prefetch_bytes = 256;

/// grouped_gemv_args for row blocks [begin, end): the weights of a thread's range read as one
/// sequential stream, as gemv_steps_avx512<4> reads them (the same 8 vpdpbusd chains),
/// the kernel-ordered scales as a second stream 1/16 as long. Each group's 16 int32 sums are
/// folded, converted to double (exact) and multiplied by their 16 scales into two vectors of 8
/// double row sums; a fused multiply-add is the product then the sum exactly, because |acc_j| <= 2^15
/// times a float (24 bits) is exact in double. The groups in ascending order, then the division by
/// sx, the rounding to float (vcvtpd2ps: nearest even, as the cast) and the bias: the operations of
/// rescale_rows_grouped_scalar, lane by lane.
template <bool HalfScales>
BITNET_TARGET_AVX512 void gemv_grouped_avx512(const grouped_gemv_args& a, Eigen::Index begin,
                                              Eigen::Index end) noexcept {
  constexpr int step = 4;  // col_tiles is a multiple of 4
  const Eigen::Index scale_bytes = HalfScales ? 2 : 4;
  const std::uint8_t* w = a.weights + begin * a.groups * a.col_tiles * tile_bytes;
  const __m512d sx = _mm512_set1_pd(double(a.sx));
  for (Eigen::Index rb = begin; rb < end; ++rb) {
    __m512d low = _mm512_setzero_pd(), high = _mm512_setzero_pd();  // rows 0-7 and 8-15 of the block
    const std::int8_t* x = a.x;
    for (Eigen::Index j = 0; j < a.groups; ++j) {
      const Eigen::Index scale_index = (rb * a.groups + j) * tile_rows;
      _mm_prefetch(static_cast<const char*>(a.scales) + scale_index * scale_bytes + scale_prefetch_bytes, _MM_HINT_T0);
      // A group is at most 16 tiles: each plane's chains gain at most 2^20, far below 2^31.
      const __m512i sums = _mm512_sub_epi32(per_plane_row_sums_avx512<step>(w, w + a.col_tiles * tile_bytes, x),
                                            _mm512_set1_epi32(a.x_sums[j]));
      const __m512d d = _mm512_castps_pd(load_unit_scales_avx512<HalfScales>(a.scales, scale_index));
      low = _mm512_fmadd_pd(_mm512_cvtepi32_pd(_mm512_castsi512_si256(sums)),
                            _mm512_cvtps_pd(_mm256_castpd_ps(_mm512_castpd512_pd256(d))), low);
      high = _mm512_fmadd_pd(_mm512_cvtepi32_pd(_mm512_extracti64x4_epi64(sums, 1)),
                             _mm512_cvtps_pd(_mm256_castpd_ps(_mm512_extractf64x4_pd(d, 1))), high);
    }
    const __m256 rows_low = _mm512_cvtpd_ps(_mm512_div_pd(low, sx));
    const __m256 rows_high = _mm512_cvtpd_ps(_mm512_div_pd(high, sx));
    alignas(64) float lanes[tile_rows];
    _mm256_store_ps(lanes, rows_low);
    _mm256_store_ps(lanes + 8, rows_high);
    const Eigen::Index first = rb * tile_rows, count = std::min(tile_rows, a.rows - first);
    if (a.bias)
      for (Eigen::Index r = 0; r < count; ++r) a.y[first + r] = lanes[r] + a.bias[first + r];
    else
      for (Eigen::Index r = 0; r < count; ++r) a.y[first + r] = lanes[r];
  }
}

/// Row block g against Tokens tokens (interleaved activations, xi at the block's first column),
/// planes unpacked by shift and AND once per tile for all tokens.
template <int Tokens>
BITNET_TARGET_AVX512 void gemm_shared_planes_avx512(const gemm_args& a, const std::int8_t* xi, Eigen::Index g,
                                                    Eigen::Index token) noexcept {
  const __m512i mask = _mm512_set1_epi8(3);
  const std::uint8_t* w = a.weights + g * a.col_tiles * tile_bytes;
  const std::uint8_t* const end = w + a.col_tiles * tile_bytes;
  __m512i acc[Tokens];
  for (int t = 0; t < Tokens; ++t) acc[t] = _mm512_setzero_si512();
  for (; w != end; w += tile_bytes, xi += tile_cols * Tokens) {
    const __m512i tile = load_avx512(w);
    // Immediate shift counts spelled out: SIMDe (the emulated test) under Clang needs constants.
    const __m512i shifted[4] = {tile, _mm512_srli_epi16(tile, 2), _mm512_srli_epi16(tile, 4), _mm512_srli_epi16(tile, 6)};
#pragma GCC unroll 4
    for (int p = 0; p < 4; ++p) {
      const __m512i codes = _mm512_and_si512(shifted[p], mask);
#pragma GCC unroll 16
      for (int t = 0; t < Tokens; ++t)
        acc[t] = dpbusd_avx512(acc[t], codes, broadcast_group_avx512(xi + (p * Tokens + t) * 4));
    }
  }
  for (int t = 0; t < Tokens; ++t) store_rows_avx512(a, acc[t], g, token + t, group_x_sum(a, g, token + t));
}

inline constexpr int avx512_token_tile = 16;

/// Row blocks [begin, end) against one token tile of `tokens` (1 to 16) tokens.
template <int Tokens>
BITNET_TARGET_AVX512 void gemm_token_tile_avx512(const gemm_args& a, const std::int8_t* xt, Eigen::Index begin,
                                                 Eigen::Index end, Eigen::Index token) noexcept {
  if constexpr (Tokens <= 4) {
    // Independent vpdpbusd chains: 4 planes x Tokens x blocks (8 to 16; two blocks for 1 token were
    // measured faster than four, which GCC 12 cannot keep in registers).
    // The virtual blocks of a grouped call read different columns: one block at a time.
    constexpr int blocks = Tokens <= 2 ? 2 : 1;
    Eigen::Index g = begin;
    if (a.groups == 1)
      for (; g + blocks <= end; g += blocks) gemm_per_plane_avx512<blocks, Tokens>(a, xt, g, token);
    for (; g < end; ++g) gemm_per_plane_avx512<1, Tokens>(a, xt + group_column(a, g) * Tokens, g, token);
  } else {
    for (Eigen::Index g = begin; g < end; ++g)
      gemm_shared_planes_avx512<Tokens>(a, xt + group_column(a, g) * Tokens, g, token);
  }
}

template <int... Tokens>
BITNET_TARGET_AVX512 void gemm_any_tile_avx512(std::integer_sequence<int, Tokens...>, int tokens, const gemm_args& a,
                                               const std::int8_t* xt, Eigen::Index begin, Eigen::Index end,
                                               Eigen::Index token) noexcept {
  ((tokens == Tokens + 1 ? gemm_token_tile_avx512<Tokens + 1>(a, xt, begin, end, token) : void()), ...);
}

/// Row blocks per cache block: about 256 KiB of packed weights, kept in L2 for every token tile.
inline Eigen::Index avx512_blocks_per_chunk(Eigen::Index col_tiles) noexcept {
  return std::max<Eigen::Index>(4, (Eigen::Index{1} << 18) / (col_tiles * tile_bytes));
}

/// xi: the activations interleaved for token tiles of avx512_token_tile (for batch 1, a.x itself).
BITNET_TARGET_AVX512 inline void ternary_gemm_avx512(const gemm_args& a, const std::int8_t* xi,
                                                     Eigen::Index block_begin, Eigen::Index block_end) noexcept {
  if (a.batch == 1) return gemv_avx512(a, block_begin, block_end);
  const Eigen::Index chunk = avx512_blocks_per_chunk(a.col_tiles);
  for (Eigen::Index g0 = block_begin; g0 < block_end; g0 += chunk) {
    const Eigen::Index g1 = std::min(g0 + chunk, block_end);
    for (Eigen::Index token = 0; token < a.batch; token += avx512_token_tile) {
      const int tokens = int(std::min<Eigen::Index>(avx512_token_tile, a.batch - token));
      gemm_any_tile_avx512(std::make_integer_sequence<int, avx512_token_tile>{}, tokens, a, xi + token * a.x_stride,
                           g0, g1, token);
    }
  }
}

}  // namespace BITNET_TU_ISA
}  // namespace bitnet::detail

#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC diagnostic pop
#endif

#endif  // BITNET_X86
