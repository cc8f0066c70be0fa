// AVX-512 VNNI kernels: vpdpbusd multiplies unsigned codes c in {0, 1, 2} by int8 activations and
// adds groups of four straight into int32 lanes, so there is no int16 intermediate at all. One
// 512-bit load covers two rows of a row block (32 bytes each); the activation tile is broadcast to
// both halves. Activation quantization reuses the AVX2 routine (every AVX-512 CPU has AVX2).
#pragma once

#include "cpu_features.hpp"
#include "kernels_avx2.hpp"
#include "kernels_scalar.hpp"

#ifdef BITNET_X86
#include <immintrin.h>

#include <algorithm>
#include <cstdint>

// GCC 12 warns (-Wuninitialized) about its own avx512fintrin.h helpers once they are inlined here;
// users building with -Werror must not see it.
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wuninitialized"
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#endif

#define BITNET_TARGET_AVX512 __attribute__((target("avx2,avx512f,avx512bw,avx512vl,avx512vnni")))
#define BITNET_INLINE_AVX512 __attribute__((target("avx2,avx512f,avx512bw,avx512vl,avx512vnni"), always_inline)) inline

namespace bitnet::detail {
inline namespace BITNET_TU_ISA {

/// The 32-byte activation plane at p, in both 256-bit halves.
BITNET_INLINE_AVX512 __m512i broadcast_plane_avx512(const std::int8_t* p) noexcept {
  return _mm512_broadcast_i64x4(_mm256_load_si256(reinterpret_cast<const __m256i*>(p)));
}

/// Horizontal sums of the lower (first row) and upper (second row) halves.
BITNET_INLINE_AVX512 void hsum_halves_avx512(__m512i v, std::int32_t& low, std::int32_t& high) noexcept {
  const __m256i lo = _mm512_castsi512_si256(v), hi = _mm512_extracti64x4_epi64(v, 1);
  __m128i s = _mm_hadd_epi32(_mm_add_epi32(_mm256_castsi256_si128(lo), _mm256_extracti128_si256(lo, 1)),
                             _mm_add_epi32(_mm256_castsi256_si128(hi), _mm256_extracti128_si256(hi, 1)));
  s = _mm_hadd_epi32(s, s);  // [low, high, low, high]
  low = _mm_cvtsi128_si32(s);
  high = _mm_extract_epi32(s, 1);
}

/// Batch 1: a row block (two 512-bit row pairs) per pass; one accumulator per plane and pair
/// keeps eight independent vpdpbusd chains in flight.
BITNET_TARGET_AVX512 inline void gemv_block_avx512(const gemm_args& a, Eigen::Index g) noexcept {
  const __m512i mask = _mm512_set1_epi8(3);
  const std::uint8_t* w = a.weights + g * a.col_blocks * tile_cols;
  const std::int8_t* x = a.x;
  __m512i acc01[4], acc23[4];
  for (int p = 0; p < 4; ++p) acc01[p] = acc23[p] = _mm512_setzero_si512();
  for (Eigen::Index kb = 0; kb < a.col_blocks; ++kb, w += tile_cols, x += tile_cols) {
    const __m512i rows01 = _mm512_load_si512(w), rows23 = _mm512_load_si512(w + 64);
    const __m512i x0 = broadcast_plane_avx512(x), x1 = broadcast_plane_avx512(x + 32),
                  x2 = broadcast_plane_avx512(x + 64), x3 = broadcast_plane_avx512(x + 96);
    acc01[0] = _mm512_dpbusd_epi32(acc01[0], _mm512_and_si512(rows01, mask), x0);
    acc23[0] = _mm512_dpbusd_epi32(acc23[0], _mm512_and_si512(rows23, mask), x0);
    acc01[1] = _mm512_dpbusd_epi32(acc01[1], _mm512_and_si512(_mm512_srli_epi16(rows01, 2), mask), x1);
    acc23[1] = _mm512_dpbusd_epi32(acc23[1], _mm512_and_si512(_mm512_srli_epi16(rows23, 2), mask), x1);
    acc01[2] = _mm512_dpbusd_epi32(acc01[2], _mm512_and_si512(_mm512_srli_epi16(rows01, 4), mask), x2);
    acc23[2] = _mm512_dpbusd_epi32(acc23[2], _mm512_and_si512(_mm512_srli_epi16(rows23, 4), mask), x2);
    acc01[3] = _mm512_dpbusd_epi32(acc01[3], _mm512_and_si512(_mm512_srli_epi16(rows01, 6), mask), x3);
    acc23[3] = _mm512_dpbusd_epi32(acc23[3], _mm512_and_si512(_mm512_srli_epi16(rows23, 6), mask), x3);
  }
  const __m512i s01 = _mm512_add_epi32(_mm512_add_epi32(acc01[0], acc01[1]), _mm512_add_epi32(acc01[2], acc01[3]));
  const __m512i s23 = _mm512_add_epi32(_mm512_add_epi32(acc23[0], acc23[1]), _mm512_add_epi32(acc23[2], acc23[3]));
  std::int32_t sums[4];
  hsum_halves_avx512(s01, sums[0], sums[1]);
  hsum_halves_avx512(s23, sums[2], sums[3]);
  for (Eigen::Index r = 0; r < tile_rows && g * tile_rows + r < a.rows; ++r)
    a.acc[g * tile_rows + r] = sums[r] - a.x_sums[0];
}

/// Batch > 1: a row pair (rows 2 * pair, 2 * pair + 1 of block g) against Tokens tokens.
template <int Tokens>
BITNET_TARGET_AVX512 void gemm_pair_avx512(const gemm_args& a, Eigen::Index g, int pair, Eigen::Index token) noexcept {
  const __m512i mask = _mm512_set1_epi8(3);
  const std::uint8_t* w = a.weights + (g * a.col_blocks * tile_rows + 2 * pair) * plane_bytes;
  const std::int8_t* x = a.x + token * a.x_stride;
  __m512i acc[Tokens];
  for (int t = 0; t < Tokens; ++t) acc[t] = _mm512_setzero_si512();
  for (Eigen::Index kb = 0; kb < a.col_blocks; ++kb, w += tile_rows * plane_bytes, x += tile_cols) {
    const __m512i packed = _mm512_load_si512(w);
    const __m512i c0 = _mm512_and_si512(packed, mask);
    const __m512i c1 = _mm512_and_si512(_mm512_srli_epi16(packed, 2), mask);
    const __m512i c2 = _mm512_and_si512(_mm512_srli_epi16(packed, 4), mask);
    const __m512i c3 = _mm512_and_si512(_mm512_srli_epi16(packed, 6), mask);
#pragma GCC unroll 8
    for (int t = 0; t < Tokens; ++t) {
      const std::int8_t* xt = x + t * a.x_stride;
      acc[t] = _mm512_dpbusd_epi32(acc[t], c0, broadcast_plane_avx512(xt));
      acc[t] = _mm512_dpbusd_epi32(acc[t], c1, broadcast_plane_avx512(xt + 32));
      acc[t] = _mm512_dpbusd_epi32(acc[t], c2, broadcast_plane_avx512(xt + 64));
      acc[t] = _mm512_dpbusd_epi32(acc[t], c3, broadcast_plane_avx512(xt + 96));
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
