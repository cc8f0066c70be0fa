// AVX2 kernels (no VNNI): int8 x ternary products with vpmaddubsw, and activation quantization.
//
// Accumulator bound: vpmaddubsw multiplies unsigned codes by int8 activations and adds pairs into
// saturating int16 lanes. With codes c in {0, 1, 2} and x in [-128, 127] a pair c0 x0 + c1 x1 lies
// in [-512, 508]; with codes extracted as 4c (gemv_block_avx2) in [-2048, 2032], and those are
// brought back to [-512, 508] per pair by an exact shift before they reach an accumulator. Each
// kernel widens its int16 lanes to int32 (vpmaddwd) after at most 8 tiles, 32 pairs per lane:
// [-16384, 16256], so no lane ever saturates or wraps. The int32 bound is max_in_features.
#pragma once

#include "cpu_features.hpp"
#include "kernels_scalar.hpp"

#ifdef BITNET_X86
#include <immintrin.h>

#include <algorithm>
#include <cmath>
#include <cstdint>

#define BITNET_TARGET_AVX2 __attribute__((target("avx2")))
#define BITNET_INLINE_AVX2 __attribute__((target("avx2"), always_inline)) inline

namespace bitnet::detail {
inline namespace BITNET_TU_ISA {

BITNET_INLINE_AVX2 std::int32_t hsum_avx2(__m256i v) noexcept {
  __m128i s = _mm_add_epi32(_mm256_castsi256_si128(v), _mm256_extracti128_si256(v, 1));
  s = _mm_add_epi32(s, _mm_shuffle_epi32(s, _MM_SHUFFLE(1, 0, 3, 2)));
  s = _mm_add_epi32(s, _mm_shuffle_epi32(s, _MM_SHUFFLE(2, 3, 0, 1)));
  return _mm_cvtsi128_si32(s);
}

BITNET_INLINE_AVX2 __m256i load_avx2(const void* p) noexcept {
  return _mm256_load_si256(static_cast<const __m256i*>(p));
}

/// Column tiles the batch-1 kernel sums in int16 lanes before widening. It extracts planes 1 and
/// 3 as 4 * code (an AND without a shift): their products, pairs in [-2048, 2032], are added
/// (within [-4096, 4064]) and shifted right by 2, exactly, since each is a multiple of 4. A lane
/// then gains at most 4 * 512 per tile, so 8 tiles stay inside [-16384, 16256].
inline constexpr Eigen::Index gemv_tiles_per_int16 = 8;

/// Batch 1: the four rows of block g in one sequential pass, each row's tile unpacked with one
/// shift and four ANDs. The activations are memory operands of vpmaddubsw.
BITNET_TARGET_AVX2 inline void gemv_block_avx2(const gemm_args& a, Eigen::Index g) noexcept {
  const __m256i low = _mm256_set1_epi8(0x03), high = _mm256_set1_epi8(0x0c), ones = _mm256_set1_epi16(1);
  const std::uint8_t* w = a.weights + g * a.col_blocks * tile_cols;
  const std::int8_t* x = a.x;
  __m256i acc[tile_rows];
  for (int r = 0; r < tile_rows; ++r) acc[r] = _mm256_setzero_si256();
  for (Eigen::Index remaining = a.col_blocks; remaining > 0;) {
    const Eigen::Index run = std::min(remaining, gemv_tiles_per_int16);
    remaining -= run;
    const std::uint8_t* const run_end = w + run * tile_cols;
    __m256i s[tile_rows];
    for (int r = 0; r < tile_rows; ++r) s[r] = _mm256_setzero_si256();
    do {
#pragma GCC unroll 4
      for (int r = 0; r < tile_rows; ++r) {
        const __m256i packed = load_avx2(w + r * plane_bytes);
        const __m256i shifted = _mm256_srli_epi16(packed, 4);
        const __m256i odd = _mm256_add_epi16(
            _mm256_maddubs_epi16(_mm256_and_si256(packed, high), load_avx2(x + 32)),
            _mm256_maddubs_epi16(_mm256_and_si256(shifted, high), load_avx2(x + 96)));
        const __m256i even = _mm256_add_epi16(
            _mm256_maddubs_epi16(_mm256_and_si256(packed, low), load_avx2(x)),
            _mm256_maddubs_epi16(_mm256_and_si256(shifted, low), load_avx2(x + 64)));
        s[r] = _mm256_add_epi16(s[r], _mm256_add_epi16(even, _mm256_srai_epi16(odd, 2)));
      }
      w += tile_cols;
      x += tile_cols;
    } while (w != run_end);
    for (int r = 0; r < tile_rows; ++r) acc[r] = _mm256_add_epi32(acc[r], _mm256_madd_epi16(s[r], ones));
  }
  for (Eigen::Index r = 0; r < tile_rows && g * tile_rows + r < a.rows; ++r)
    a.acc[g * tile_rows + r] = hsum_avx2(acc[r]) - a.x_sums[0];
}

/// Column tiles the batch > 1 kernel sums in int16 lanes before widening: 8 tiles of 4 planes,
/// 32 pairs in [-512, 508], stay inside [-16384, 16256].
inline constexpr Eigen::Index tiles_per_int16 = 8;

/// Batch > 1: one row against Tokens tokens; each row tile is unpacked once and used Tokens times.
template <int Tokens>
BITNET_TARGET_AVX2 void gemm_row_avx2(const gemm_args& a, Eigen::Index row, Eigen::Index token) noexcept {
  const __m256i mask = _mm256_set1_epi8(3), ones = _mm256_set1_epi16(1);
  const std::uint8_t* w = a.weights + ((row / tile_rows) * a.col_blocks * tile_rows + row % tile_rows) * plane_bytes;
  const std::int8_t* x = a.x + token * a.x_stride;
  const Eigen::Index stride = a.x_stride;
  __m256i acc[Tokens];
  for (int t = 0; t < Tokens; ++t) acc[t] = _mm256_setzero_si256();
  // One pointer and one end per run keep GCC from spilling loop counters to the stack.
  for (Eigen::Index remaining = a.col_blocks; remaining > 0;) {
    const Eigen::Index run = std::min(remaining, tiles_per_int16);
    remaining -= run;
    const std::uint8_t* const run_end = w + run * tile_rows * plane_bytes;
    __m256i s[Tokens];
    for (int t = 0; t < Tokens; ++t) s[t] = _mm256_setzero_si256();
    do {
      const __m256i packed = load_avx2(w);
      const __m256i c0 = _mm256_and_si256(packed, mask);
      const __m256i c1 = _mm256_and_si256(_mm256_srli_epi16(packed, 2), mask);
      const __m256i c2 = _mm256_and_si256(_mm256_srli_epi16(packed, 4), mask);
      const __m256i c3 = _mm256_and_si256(_mm256_srli_epi16(packed, 6), mask);
#pragma GCC unroll 8
      for (int t = 0; t < Tokens; ++t) {
        const std::int8_t* xt = x + t * stride;
        s[t] = _mm256_add_epi16(s[t], _mm256_maddubs_epi16(c0, load_avx2(xt)));
        s[t] = _mm256_add_epi16(s[t], _mm256_maddubs_epi16(c1, load_avx2(xt + 32)));
        s[t] = _mm256_add_epi16(s[t], _mm256_maddubs_epi16(c2, load_avx2(xt + 64)));
        s[t] = _mm256_add_epi16(s[t], _mm256_maddubs_epi16(c3, load_avx2(xt + 96)));
      }
      w += tile_rows * plane_bytes;
      x += tile_cols;
    } while (w != run_end);
    for (int t = 0; t < Tokens; ++t) acc[t] = _mm256_add_epi32(acc[t], _mm256_madd_epi16(s[t], ones));
  }
  for (int t = 0; t < Tokens; ++t)
    a.acc[(token + t) * a.rows + row] = hsum_avx2(acc[t]) - a.x_sums[token + t];
}

inline constexpr int avx2_token_tile = 4;
/// Row blocks per cache block: about 8 KiB of packed weights, reused by every token tile from L1.
inline Eigen::Index blocks_per_chunk(Eigen::Index col_blocks) noexcept {
  return std::max<Eigen::Index>(1, 8192 / (col_blocks * tile_rows * plane_bytes));
}

BITNET_TARGET_AVX2 inline void ternary_gemm_avx2(const gemm_args& a, Eigen::Index block_begin,
                                                 Eigen::Index block_end) noexcept {
  if (a.batch == 1) {
    for (Eigen::Index g = block_begin; g < block_end; ++g) gemv_block_avx2(a, g);
    return;
  }
  const Eigen::Index chunk = blocks_per_chunk(a.col_blocks);
  for (Eigen::Index g0 = block_begin; g0 < block_end; g0 += chunk) {
    const Eigen::Index row_end = std::min(std::min(g0 + chunk, block_end) * tile_rows, a.rows);
    for (Eigen::Index token = 0; token < a.batch; token += avx2_token_tile) {
      const Eigen::Index tokens = std::min<Eigen::Index>(avx2_token_tile, a.batch - token);
      for (Eigen::Index row = g0 * tile_rows; row < row_end; ++row) switch (tokens) {
          case 4: gemm_row_avx2<4>(a, row, token); break;
          case 3: gemm_row_avx2<3>(a, row, token); break;
          case 2: gemm_row_avx2<2>(a, row, token); break;
          default: gemm_row_avx2<1>(a, row, token); break;
        }
    }
  }
}

/// quantize_row_scalar<float>, vectorized: same absmax, same scale, same products, and
/// cvtps2dq rounds half to even in the default MXCSR mode as std::nearbyint does.
BITNET_TARGET_AVX2 inline bool quantize_row_avx2(const float* x, Eigen::Index cols, Eigen::Index padded,
                                                 std::int8_t* q, float& scale, std::int32_t& sum) noexcept {
  const __m256 abs_mask = _mm256_castsi256_ps(_mm256_set1_epi32(0x7fffffff));
  const __m256i largest_finite = _mm256_set1_epi32(0x7f7fffff);
  __m256 vmax = _mm256_setzero_ps();
  __m256i nonfinite = _mm256_setzero_si256();
  Eigen::Index c = 0;
  for (; c + 8 <= cols; c += 8) {
    const __m256 v = _mm256_and_ps(_mm256_loadu_ps(x + c), abs_mask);
    nonfinite = _mm256_or_si256(nonfinite, _mm256_cmpgt_epi32(_mm256_castps_si256(v), largest_finite));
    vmax = _mm256_max_ps(vmax, v);
  }
  if (!_mm256_testz_si256(nonfinite, nonfinite)) return false;
  alignas(32) float lanes[8];
  _mm256_store_ps(lanes, vmax);
  float absmax = 0;
  for (float lane : lanes) absmax = std::max(absmax, lane);
  for (; c < cols; ++c) {
    if (!std::isfinite(x[c])) return false;
    absmax = std::max(absmax, std::abs(x[c]));
  }
  scale = activation_scale_of(absmax);

  const __m256 vscale = _mm256_set1_ps(scale), lo = _mm256_set1_ps(-128.0f), hi = _mm256_set1_ps(127.0f);
  const __m256i dword_order = _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7);
  __m256i vsum = _mm256_setzero_si256();
  c = 0;
  for (; c + 32 <= cols; c += 32) {
    __m256i i[4];
    for (int k = 0; k < 4; ++k) {
      // Clamping before rounding equals rounding before clamping: the bounds are integers.
      const __m256 v = _mm256_mul_ps(_mm256_loadu_ps(x + c + 8 * k), vscale);
      i[k] = _mm256_cvtps_epi32(_mm256_min_ps(_mm256_max_ps(v, lo), hi));
      vsum = _mm256_add_epi32(vsum, i[k]);
    }
    const __m256i bytes = _mm256_packs_epi16(_mm256_packs_epi32(i[0], i[1]), _mm256_packs_epi32(i[2], i[3]));
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(q + c), _mm256_permutevar8x32_epi32(bytes, dword_order));
  }
  sum = hsum_avx2(vsum);
  for (; c < cols; ++c) {
    q[c] = static_cast<std::int8_t>(std::clamp(round_half_even(x[c] * scale), -128.0f, 127.0f));
    sum += q[c];
  }
  std::fill(q + cols, q + padded, std::int8_t{0});
  return true;
}

}  // namespace BITNET_TU_ISA
}  // namespace bitnet::detail

#endif  // BITNET_X86
