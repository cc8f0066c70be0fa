// AVX2 kernels (no VNNI): int8 x ternary products with vpmaddubsw, activation quantization and
// the rescale.
//
// Both products read the tile layout of pack.hpp half a tile (8 rows, 32 bytes) at a time: plane p
// of a half, unpacked, is 8 rows x 4 consecutive columns, multiplied by one broadcast 4-byte group
// of a token's activations (vpbroadcastd from memory: a load, no shuffle).
//
// Accumulator bound: vpmaddubsw multiplies unsigned codes by int8 activations and adds pairs into
// saturating int16 lanes. With codes c in {0, 1, 2} and x in [-128, 127] a pair c0 x0 + c1 x1 lies
// in [-512, 508]; with codes extracted as 4c (planes 1 and 3 of the batch-1 kernel) in
// [-2048, 2032], brought back to [-512, 508] per pair by an exact shift before they reach an
// accumulator. Each int16 lane (a pair of one row) gains at most 4 * 512 per tile, so the kernels
// widen to int32 (vpmaddwd) after 8 tiles: [-16384, 16256], no lane saturates or wraps. The int32
// bound is max_in_features.
#pragma once

#include "common.hpp"
#include "scalar.hpp"

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

BITNET_INLINE_AVX2 __m256i broadcast_group_avx2(const std::int8_t* p) noexcept { return _mm256_set1_epi32(load_u32(p)); }

/// Tiles summed in int16 lanes before widening (see the bound above).
inline constexpr Eigen::Index avx2_tiles_per_int16 = 8;

/// Writes the 8 int32 row sums of half a (virtual) block, minus the token's activation sum over
/// the block's columns (x_sum).
BITNET_INLINE_AVX2 void store_rows_avx2(const gemm_args& a, __m256i sums, Eigen::Index first_row, Eigen::Index token,
                                        std::int32_t x_sum) noexcept {
  alignas(32) std::int32_t lanes[8];
  _mm256_store_si256(reinterpret_cast<__m256i*>(lanes), sums);
  for (Eigen::Index j = 0; j < 8 && first_row + j < a.rows; ++j) a.acc[token * a.rows + first_row + j] = lanes[j] - x_sum;
}

/// Batch 1: (virtual) block g, both halves at once. Per half and tile one shift and four ANDs unpack the
/// planes (1 and 3 as 4c, shifted back after the products), four vpmaddubsw.
BITNET_TARGET_AVX2 inline void gemv_block_avx2(const gemm_args& a, Eigen::Index g) noexcept {
  const __m256i low = _mm256_set1_epi8(0x03), high = _mm256_set1_epi8(0x0c), ones = _mm256_set1_epi16(1);
  const std::uint8_t* w = a.weights + g * a.col_tiles * tile_bytes;
  const std::int8_t* x = a.x + group_column(a, g);
  __m256i acc[2] = {_mm256_setzero_si256(), _mm256_setzero_si256()};
  for (Eigen::Index remaining = a.col_tiles; remaining > 0;) {
    const Eigen::Index run = std::min(remaining, avx2_tiles_per_int16);
    remaining -= run;
    const std::uint8_t* const run_end = w + run * tile_bytes;
    __m256i s[2] = {_mm256_setzero_si256(), _mm256_setzero_si256()};
    do {
      // The row blocks follow each other, so batch 1 is one sequential stream, left to the hardware
      // prefetchers (software prefetch 4 KiB ahead measured slower: gemv_steps_avx512).
      const __m256i x0 = broadcast_group_avx2(x), x1 = broadcast_group_avx2(x + 4),
                    x2 = broadcast_group_avx2(x + 8), x3 = broadcast_group_avx2(x + 12);
#pragma GCC unroll 2
      for (int h = 0; h < 2; ++h) {
        const __m256i packed = load_avx2(w + 32 * h);
        const __m256i shifted = _mm256_srli_epi16(packed, 4);
        const __m256i even = _mm256_add_epi16(_mm256_maddubs_epi16(_mm256_and_si256(packed, low), x0),
                                              _mm256_maddubs_epi16(_mm256_and_si256(shifted, low), x2));
        const __m256i odd = _mm256_add_epi16(_mm256_maddubs_epi16(_mm256_and_si256(packed, high), x1),
                                             _mm256_maddubs_epi16(_mm256_and_si256(shifted, high), x3));
        s[h] = _mm256_add_epi16(s[h], _mm256_add_epi16(even, _mm256_srai_epi16(odd, 2)));
      }
      w += tile_bytes;
      x += tile_cols;
    } while (w != run_end);
    for (int h = 0; h < 2; ++h) acc[h] = _mm256_add_epi32(acc[h], _mm256_madd_epi16(s[h], ones));
  }
  const std::int32_t x_sum = group_x_sum(a, g, 0);
  store_rows_avx2(a, acc[0], g * tile_rows, 0, x_sum);
  store_rows_avx2(a, acc[1], g * tile_rows + 8, 0, x_sum);
}

inline constexpr int avx2_token_tile = 4;

/// Batch > 1: half h of (virtual) block g against Tokens tokens whose activations are interleaved
/// by 4-byte groups (interleave_tokens; xi at the block's first column): each half tile is unpacked once (three shifts, four ANDs) and
/// used by every token, and every activation group is one broadcast load.
template <int Tokens>
BITNET_TARGET_AVX2 void gemm_half_avx2(const gemm_args& a, const std::int8_t* xi, Eigen::Index g, int h,
                                       Eigen::Index token) noexcept {
  const __m256i mask = _mm256_set1_epi8(3), ones = _mm256_set1_epi16(1);
  const std::uint8_t* w = a.weights + g * a.col_tiles * tile_bytes + 32 * h;
  __m256i acc[Tokens];
  for (int t = 0; t < Tokens; ++t) acc[t] = _mm256_setzero_si256();
  for (Eigen::Index remaining = a.col_tiles; remaining > 0;) {
    const Eigen::Index run = std::min(remaining, avx2_tiles_per_int16);
    remaining -= run;
    const std::uint8_t* const run_end = w + run * tile_bytes;
    __m256i s[Tokens];
    for (int t = 0; t < Tokens; ++t) s[t] = _mm256_setzero_si256();
    do {
      const __m256i packed = load_avx2(w);
      const __m256i shifted[4] = {packed, _mm256_srli_epi16(packed, 2), _mm256_srli_epi16(packed, 4),
                                  _mm256_srli_epi16(packed, 6)};
#pragma GCC unroll 4
      for (int p = 0; p < 4; ++p) {
        const __m256i codes = _mm256_and_si256(shifted[p], mask);
#pragma GCC unroll 4
        for (int t = 0; t < Tokens; ++t)
          s[t] = _mm256_add_epi16(s[t], _mm256_maddubs_epi16(codes, broadcast_group_avx2(xi + (p * Tokens + t) * 4)));
      }
      w += tile_bytes;
      xi += tile_cols * Tokens;
    } while (w != run_end);
    for (int t = 0; t < Tokens; ++t) acc[t] = _mm256_add_epi32(acc[t], _mm256_madd_epi16(s[t], ones));
  }
  for (int t = 0; t < Tokens; ++t)
    store_rows_avx2(a, acc[t], g * tile_rows + 8 * h, token + t, group_x_sum(a, g, token + t));
}

/// Row blocks per cache block: about 32 KiB of packed weights, reused by every token tile from L1/L2.
inline Eigen::Index blocks_per_chunk(Eigen::Index col_tiles) noexcept {
  return std::max<Eigen::Index>(1, 32768 / (col_tiles * tile_bytes));
}

/// xi: the activations interleaved for token tiles of avx2_token_tile (ignored for batch 1).
BITNET_TARGET_AVX2 inline void ternary_gemm_avx2(const gemm_args& a, const std::int8_t* xi, Eigen::Index block_begin,
                                                 Eigen::Index block_end) noexcept {
  if (a.batch == 1) {
    for (Eigen::Index g = block_begin; g < block_end; ++g) gemv_block_avx2(a, g);
    return;
  }
  const Eigen::Index chunk = blocks_per_chunk(a.col_tiles);
  for (Eigen::Index g0 = block_begin; g0 < block_end; g0 += chunk) {
    const Eigen::Index g1 = std::min(g0 + chunk, block_end);
    for (Eigen::Index token = 0; token < a.batch; token += avx2_token_tile) {
      const Eigen::Index tokens = std::min<Eigen::Index>(avx2_token_tile, a.batch - token);
      const std::int8_t* xt = xi + token * a.x_stride;
      for (Eigen::Index g = g0; g < g1; ++g) {
        const std::int8_t* xg = xt + group_column(a, g) * tokens;
        for (int h = 0; h < 2 && g * tile_rows + 8 * h < a.rows; ++h) switch (tokens) {
            case 4: gemm_half_avx2<4>(a, xg, g, h, token); break;
            case 3: gemm_half_avx2<3>(a, xg, g, h, token); break;
            case 2: gemm_half_avx2<2>(a, xg, g, h, token); break;
            default: gemm_half_avx2<1>(a, xg, g, h, token); break;
          }
      }
    }
  }
}

/// rescale_rows_scalar<float>, vectorized: the same double products, the same rounding to float
/// (vcvtpd2ps rounds to nearest even like the conversion), the same float addition.
BITNET_TARGET_AVX2 inline void rescale_rows_avx2(const std::int32_t* acc, Eigen::Index acc_stride, Eigen::Index batch,
                                                 Eigen::Index out, const float* sx, float sw, const float* bias,
                                                 float* y, Eigen::Index y_stride) noexcept {
  for (Eigen::Index b = 0; b < batch; ++b) {
    const double inverse_scale = 1.0 / (double(sx[b]) * double(sw));
    const __m256d vscale = _mm256_set1_pd(inverse_scale);
    const std::int32_t* row_acc = acc + b * acc_stride;
    float* row_y = y + b * y_stride;
    Eigen::Index o = 0;
    for (; o + 8 <= out; o += 8) {
      const __m128i lo = _mm_loadu_si128(reinterpret_cast<const __m128i*>(row_acc + o));
      const __m128i hi = _mm_loadu_si128(reinterpret_cast<const __m128i*>(row_acc + o + 4));
      __m256 v = _mm256_set_m128(_mm256_cvtpd_ps(_mm256_mul_pd(_mm256_cvtepi32_pd(hi), vscale)),
                                 _mm256_cvtpd_ps(_mm256_mul_pd(_mm256_cvtepi32_pd(lo), vscale)));
      if (bias) v = _mm256_add_ps(v, _mm256_loadu_ps(bias + o));
      _mm256_storeu_ps(row_y + o, v);
    }
    for (; o < out; ++o) {
      const float scaled = static_cast<float>(double(row_acc[o]) * inverse_scale);
      row_y[o] = bias ? scaled + bias[o] : scaled;
    }
  }
}

/// rescale_rows_grouped_scalar<float>, 4 rows per vector of doubles: per lane the same products
/// (exact: an int32 of at most 2^15 in magnitude times a float), the same divisions and sums in
/// the same order (j ascending from 0.0), one rounding to float (vcvtpd2ps), the same float
/// addition of the bias. Rows before the first multiple of 4 and after the last go the scalar way.
BITNET_TARGET_AVX2 inline void rescale_rows_grouped_avx2(const std::int32_t* acc, Eigen::Index acc_stride,
                                                         Eigen::Index batch, Eigen::Index row_begin, Eigen::Index row_end,
                                                         Eigen::Index kernel_groups, Eigen::Index groups, const float* d,
                                                         const float* sx, bool per_block, const float* bias, float* y,
                                                         Eigen::Index y_stride) noexcept {
  const Eigen::Index head = std::min(row_end, (row_begin + 3) / 4 * 4);
  const Eigen::Index body = std::max(head, row_end / 4 * 4);
  for (Eigen::Index b = 0; b < batch; ++b) {
    const std::int32_t* row_acc = acc + b * acc_stride;
    const float* token_sx = sx + (per_block ? b * groups : b);
    float* row_y = y + b * y_stride;
    rescale_rows_grouped_scalar(row_acc, acc_stride, 1, row_begin, head, kernel_groups, groups, d, token_sx, per_block,
                                bias, row_y, y_stride);
    for (Eigen::Index o = head; o < body; o += 4) {
      const std::int32_t* unit = row_acc + o / tile_rows * kernel_groups * tile_rows + o % tile_rows;
      const float* row_d = d + o * groups;
      __m256d sum = _mm256_setzero_pd();
      for (Eigen::Index j = 0; j < groups; ++j) {
        const __m256d products =
            _mm256_mul_pd(_mm256_cvtepi32_pd(_mm_loadu_si128(reinterpret_cast<const __m128i*>(unit + j * tile_rows))),
                          _mm256_set_pd(row_d[3 * groups + j], row_d[2 * groups + j], row_d[groups + j], row_d[j]));
        sum = _mm256_add_pd(sum, per_block ? _mm256_div_pd(products, _mm256_set1_pd(double(token_sx[j]))) : products);
      }
      if (!per_block) sum = _mm256_div_pd(sum, _mm256_set1_pd(double(token_sx[0])));
      __m128 v = _mm256_cvtpd_ps(sum);
      if (bias) v = _mm_add_ps(v, _mm_loadu_ps(bias + o));
      _mm_storeu_ps(row_y + o, v);
    }
    rescale_rows_grouped_scalar(row_acc, acc_stride, 1, body, row_end, kernel_groups, groups, d, token_sx, per_block,
                                bias, row_y, y_stride);
  }
}

/// The sum of n int8 codes (n a multiple of 32): vpsadbw on the codes offset to unsigned.
BITNET_TARGET_AVX2 inline std::int32_t sum_codes_avx2(const std::int8_t* q, Eigen::Index n) noexcept {
  const __m256i offset = _mm256_set1_epi8(static_cast<char>(0x80));
  __m256i sums = _mm256_setzero_si256();
  for (Eigen::Index k = 0; k < n; k += 32)
    sums = _mm256_add_epi64(sums, _mm256_sad_epu8(_mm256_xor_si256(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(q + k)), offset),
                                                  _mm256_setzero_si256()));
  alignas(32) std::int64_t lanes[4];
  _mm256_store_si256(reinterpret_cast<__m256i*>(lanes), sums);
  return std::int32_t(lanes[0] + lanes[1] + lanes[2] + lanes[3] - 128 * n);
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
