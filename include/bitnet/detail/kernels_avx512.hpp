// AVX-512 VNNI kernels: vpdpbusd multiplies unsigned codes c in {0, 1, 2} by int8 activations and
// adds groups of four straight into int32 lanes, so there is no int16 intermediate at all. One
// 512-bit load covers two rows of a row block (32 bytes each), so the kernels read activations
// laid out with every 32-byte plane twice side by side (duplicate_planes_avx512, done once per
// call by the dispatcher): vpdpbusd then takes them as a plain memory operand, no broadcast.
// Activation quantization reuses the AVX2 routine (every AVX-512 CPU has AVX2).
//
// Accumulator bound (batch 1): plane p is extracted with an AND alone, as 4^p * c, into an int32
// accumulator of its own; a lane gains at most 4 * 128 * 2 * 4^p per tile, 2^16 for p = 3, so a
// run of gemv_tiles_per_run = 2^14 tiles stays below 2^30 before the planes are scaled back
// (an exact arithmetic shift: every term is a multiple of 4^p) and summed.
#pragma once

#include "aligned_allocator.hpp"
#include "cpu_features.hpp"
#include "kernels_avx2.hpp"
#include "kernels_scalar.hpp"

#ifdef BITNET_X86
#include <immintrin.h>

#include <algorithm>
#include <cstdint>
#include <cstring>

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

/// a.x re-laid with each 32-byte plane of each row written twice: row stride 2 * a.x_stride.
inline aligned_vector<std::int8_t> duplicate_planes_avx512(const gemm_args& a) {
  aligned_vector<std::int8_t> doubled(std::size_t(2 * a.batch * a.x_stride));
  const std::int8_t* from = a.x;
  std::int8_t* to = doubled.data();
  for (Eigen::Index plane = 0; plane < a.batch * a.x_stride / plane_bytes; ++plane, from += plane_bytes) {
    std::memcpy(to, from, plane_bytes);
    std::memcpy(to + plane_bytes, from, plane_bytes);
    to += 2 * plane_bytes;
  }
  return doubled;
}

BITNET_INLINE_AVX512 __m512i load_avx512(const void* p) noexcept { return _mm512_load_si512(p); }

/// Horizontal sums of two 256-bit int32 vectors.
BITNET_INLINE_AVX512 void hsum_pair_avx512(__m256i first, __m256i second, std::int32_t& first_sum,
                                           std::int32_t& second_sum) noexcept {
  __m128i s = _mm_hadd_epi32(_mm_add_epi32(_mm256_castsi256_si128(first), _mm256_extracti128_si256(first, 1)),
                             _mm_add_epi32(_mm256_castsi256_si128(second), _mm256_extracti128_si256(second, 1)));
  s = _mm_hadd_epi32(s, s);  // [first, second, first, second]
  first_sum = _mm_cvtsi128_si32(s);
  second_sum = _mm_extract_epi32(s, 1);
}

/// Horizontal sums of the lower (first row) and upper (second row) halves.
BITNET_INLINE_AVX512 void hsum_halves_avx512(__m512i v, std::int32_t& low, std::int32_t& high) noexcept {
  hsum_pair_avx512(_mm512_castsi512_si256(v), _mm512_extracti64x4_epi64(v, 1), low, high);
}

/// a0 + a1 / 4 + a2 / 16 + a3 / 64, exactly: each ap is a multiple of 4^p.
BITNET_INLINE_AVX512 __m256i unscaled_sum_avx512(__m256i a0, __m256i a1, __m256i a2, __m256i a3) noexcept {
  return _mm256_add_epi32(_mm256_add_epi32(a0, _mm256_srai_epi32(a1, 2)),
                          _mm256_add_epi32(_mm256_srai_epi32(a2, 4), _mm256_srai_epi32(a3, 6)));
}

/// Adds the per-plane accumulators of a row pair, scaled back, to the pair's two rows.
BITNET_INLINE_AVX512 void add_unscaled_avx512(const __m512i (&acc)[4], __m256i& first, __m256i& second) noexcept {
  first = _mm256_add_epi32(first, unscaled_sum_avx512(_mm512_castsi512_si256(acc[0]), _mm512_castsi512_si256(acc[1]),
                                                      _mm512_castsi512_si256(acc[2]), _mm512_castsi512_si256(acc[3])));
  second = _mm256_add_epi32(second, unscaled_sum_avx512(
                                        _mm512_extracti64x4_epi64(acc[0], 1), _mm512_extracti64x4_epi64(acc[1], 1),
                                        _mm512_extracti64x4_epi64(acc[2], 1), _mm512_extracti64x4_epi64(acc[3], 1)));
}

inline constexpr Eigen::Index gemv_tiles_per_run = Eigen::Index{1} << 14;

/// Batch 1 (a.x with duplicated planes): a row block (two 512-bit row pairs) per pass; one
/// accumulator per plane and pair keeps eight independent vpdpbusd chains in flight, and no
/// plane needs a shift (see the accumulator bound above).
BITNET_TARGET_AVX512 inline void gemv_block_avx512(const gemm_args& a, Eigen::Index g) noexcept {
  const __m512i mask[4] = {_mm512_set1_epi8(0x03), _mm512_set1_epi8(0x0c), _mm512_set1_epi8(0x30),
                           _mm512_set1_epi8(static_cast<char>(0xc0))};
  const std::uint8_t* w = a.weights + g * a.col_blocks * tile_cols;
  const std::int8_t* x = a.x;
  __m256i total[tile_rows];
  for (int r = 0; r < tile_rows; ++r) total[r] = _mm256_setzero_si256();
  for (Eigen::Index remaining = a.col_blocks; remaining > 0;) {
    const Eigen::Index run = std::min(remaining, gemv_tiles_per_run);
    remaining -= run;
    const std::uint8_t* const run_end = w + run * tile_cols;
    __m512i acc01[4], acc23[4];
    for (int p = 0; p < 4; ++p) acc01[p] = acc23[p] = _mm512_setzero_si512();
    do {
      const __m512i rows01 = load_avx512(w), rows23 = load_avx512(w + 64);
#pragma GCC unroll 4
      for (int p = 0; p < 4; ++p) {
        const __m512i xp = load_avx512(x + 2 * p * plane_bytes);
        acc01[p] = _mm512_dpbusd_epi32(acc01[p], _mm512_and_si512(rows01, mask[p]), xp);
        acc23[p] = _mm512_dpbusd_epi32(acc23[p], _mm512_and_si512(rows23, mask[p]), xp);
      }
      w += tile_cols;
      x += 2 * tile_cols;
    } while (w != run_end);
    add_unscaled_avx512(acc01, total[0], total[1]);
    add_unscaled_avx512(acc23, total[2], total[3]);
  }
  std::int32_t sums[4];
  hsum_pair_avx512(total[0], total[1], sums[0], sums[1]);
  hsum_pair_avx512(total[2], total[3], sums[2], sums[3]);
  for (Eigen::Index r = 0; r < tile_rows && g * tile_rows + r < a.rows; ++r)
    a.acc[g * tile_rows + r] = sums[r] - a.x_sums[0];
}

/// Batch > 1 (a.x with duplicated planes): a row pair (rows 2 * pair, 2 * pair + 1 of block g)
/// against Tokens tokens; each tile is unpacked once (shifts and ANDs) for all of them.
template <int Tokens>
BITNET_TARGET_AVX512 void gemm_pair_avx512(const gemm_args& a, Eigen::Index g, int pair, Eigen::Index token) noexcept {
  const __m512i mask = _mm512_set1_epi8(3);
  const std::uint8_t* w = a.weights + (g * a.col_blocks * tile_rows + 2 * pair) * plane_bytes;
  const std::int8_t* x = a.x + token * a.x_stride;
  __m512i acc[Tokens];
  for (int t = 0; t < Tokens; ++t) acc[t] = _mm512_setzero_si512();
  for (Eigen::Index kb = 0; kb < a.col_blocks; ++kb, w += tile_rows * plane_bytes, x += 2 * tile_cols) {
    const __m512i packed = load_avx512(w);
    const __m512i c0 = _mm512_and_si512(packed, mask);
    const __m512i c1 = _mm512_and_si512(_mm512_srli_epi16(packed, 2), mask);
    const __m512i c2 = _mm512_and_si512(_mm512_srli_epi16(packed, 4), mask);
    const __m512i c3 = _mm512_and_si512(_mm512_srli_epi16(packed, 6), mask);
#pragma GCC unroll 8
    for (int t = 0; t < Tokens; ++t) {
      const std::int8_t* xt = x + t * a.x_stride;
      acc[t] = _mm512_dpbusd_epi32(acc[t], c0, load_avx512(xt));
      acc[t] = _mm512_dpbusd_epi32(acc[t], c1, load_avx512(xt + 64));
      acc[t] = _mm512_dpbusd_epi32(acc[t], c2, load_avx512(xt + 128));
      acc[t] = _mm512_dpbusd_epi32(acc[t], c3, load_avx512(xt + 192));
    }
  }
  const Eigen::Index row = g * tile_rows + 2 * pair;
  for (int t = 0; t < Tokens; ++t) {
    std::int32_t first = 0, second = 0;
    hsum_halves_avx512(acc[t], first, second);
    const std::int32_t offset = a.x_sums[token + t];
    if (row < a.rows) a.acc[(token + t) * a.rows + row] = first - offset;
    if (row + 1 < a.rows) a.acc[(token + t) * a.rows + row + 1] = second - offset;
  }
}

inline constexpr int avx512_token_tile = 8;

BITNET_TARGET_AVX512 inline void ternary_gemm_avx512(const gemm_args& a, Eigen::Index block_begin,
                                                     Eigen::Index block_end) noexcept {
  if (a.batch == 1) {
    for (Eigen::Index g = block_begin; g < block_end; ++g) gemv_block_avx512(a, g);
    return;
  }
  const Eigen::Index chunk = blocks_per_chunk(a.col_blocks);
  for (Eigen::Index g0 = block_begin; g0 < block_end; g0 += chunk) {
    const Eigen::Index g1 = std::min(g0 + chunk, block_end);
    for (Eigen::Index token = 0; token < a.batch; token += avx512_token_tile) {
      const Eigen::Index tokens = std::min<Eigen::Index>(avx512_token_tile, a.batch - token);
      for (Eigen::Index g = g0; g < g1; ++g)
        for (int pair = 0; pair < 2 && g * tile_rows + 2 * pair < a.rows; ++pair) switch (tokens) {
            case 8: gemm_pair_avx512<8>(a, g, pair, token); break;
            case 7: gemm_pair_avx512<7>(a, g, pair, token); break;
            case 6: gemm_pair_avx512<6>(a, g, pair, token); break;
            case 5: gemm_pair_avx512<5>(a, g, pair, token); break;
            case 4: gemm_pair_avx512<4>(a, g, pair, token); break;
            case 3: gemm_pair_avx512<3>(a, g, pair, token); break;
            case 2: gemm_pair_avx512<2>(a, g, pair, token); break;
            default: gemm_pair_avx512<1>(a, g, pair, token); break;
          }
    }
  }
}

}  // namespace BITNET_TU_ISA
}  // namespace bitnet::detail

#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC diagnostic pop
#endif

#endif  // BITNET_X86
