// AArch64 kernels: NEON (every AArch64 CPU), SDOT (Armv8.2 dotprod) and SMMLA (i8mm) int8 x
// ternary products, NEON activation quantization and rescale. docs/kernels.md ("ARM") has the
// instruction model per multiply-add and the compiled inner loops.
//
// All three read the tile layout of pack.hpp a quarter tile at a time: one 128-bit load is 4 rows
// x 4 bytes, and plane p of it ((v >> 2p) & 3) is 4 rows x 4 consecutive columns 4p..4p+3 of the
// tile, which multiplies 4-byte group p of the tile's 16 activations of a token (one 128-bit load).
//
//   * neon:    SMLAL / SMLAL2 (int8 x int8 -> int16, accumulating) on the group broadcast by DUP;
//              the int16 lanes are widened (SADDLP, ADDP) every neon_tiles_per_int16 tiles.
//   * dotprod: SDOT by element: vdotq_laneq_s32(acc, plane, x16, p) is the whole plane product,
//              no broadcast. Batch 1 extracts planes 1 and 2 as 4c and 16c (one AND each, no
//              shift) into their own accumulators, folded back with exact shifts.
//   * i8mm:    SMMLA (2x8 by 8x2 -> 2x2 int32): planes p and p+1 of rows j, j+1 zipped are 2 rows x
//              8 consecutive columns, multiplied with 8 columns of 2 tokens; half a row block
//              against 8 tokens per pass; batch > 1 only (the dotprod kernel runs batch 1, where a
//              second token would be zeros).
//
// Each kernel is its own symbol compiled with its own target attribute, so a program built for
// plain armv8-a still runs SDOT/SMMLA where the CPU has them. GCC (10 and later) accepts
// target("arch=armv8.2-a+dotprod") and its arm_neon.h declares the intrinsics for such functions;
// Clang 14's arm_neon.h declares vdotq/vmmlaq only when the translation unit itself enables the
// feature (-march=armv8.2-a+dotprod, +i8mm), so with Clang those kernels exist only then and
// isa_supported() reports the rest unavailable (NEON runs instead).
#pragma once

#include "common.hpp"
#include "scalar.hpp"

#ifdef BITNET_ARM64
#include <arm_neon.h>

#include <algorithm>
#include <cmath>
#include <cstdint>

#if defined(__clang__)
#if defined(__ARM_FEATURE_DOTPROD)
#define BITNET_HAS_DOTPROD_KERNEL 1
#define BITNET_TARGET_DOTPROD
#if defined(__ARM_FEATURE_MATMUL_INT8)
#define BITNET_HAS_I8MM_KERNEL 1
#define BITNET_TARGET_I8MM
#endif
#endif
#elif defined(__GNUC__) && __GNUC__ >= 10
#define BITNET_HAS_DOTPROD_KERNEL 1
#define BITNET_HAS_I8MM_KERNEL 1
#define BITNET_TARGET_DOTPROD __attribute__((target("arch=armv8.2-a+dotprod")))
#define BITNET_TARGET_I8MM __attribute__((target("arch=armv8.2-a+dotprod+i8mm")))
#endif

namespace bitnet::detail {
inline namespace BITNET_TU_ISA {

/// Row blocks per cache block for batch > 1: about 32 KiB of packed weights, reused by every token
/// group from L1/L2.
inline Eigen::Index arm_blocks_per_chunk(Eigen::Index col_tiles) noexcept {
  return std::max<Eigen::Index>(1, 32768 / (col_tiles * tile_bytes));
}

/// Writes 4 int32 row sums (rows first_row..first_row + 3) minus the token's activation sum over
/// the (virtual) block's columns (x_sum).
inline void store_rows_arm(const gemm_args& a, int32x4_t sums, Eigen::Index first_row, Eigen::Index token,
                           std::int32_t x_sum) noexcept {
  std::int32_t lanes[4];
  vst1q_s32(lanes, sums);
  for (Eigen::Index j = 0; j < 4 && first_row + j < a.rows; ++j) a.acc[token * a.rows + first_row + j] = lanes[j] - x_sum;
}

// ---------------------------------------------------------------------------------------------
// NEON baseline.

/// Tiles summed in int16 lanes before widening. An int16 lane (one row, one column slot c) gains
/// one product c x per plane, 4 per tile, each in [2 * -128, 2 * 127] = [-256, 254]: after 32 tiles
/// it lies in [-32768, 32512], inside int16 (the worst case -32768 is reached exactly by x = -128
/// against codes 2 and is tested).
inline constexpr Eigen::Index neon_tiles_per_int16 = 32;

/// Row block g against Tokens (1 or 2) tokens starting at `token`: each quarter tile unpacked once
/// (three USHR, three AND) and multiplied with every token's broadcast group.
template <int Tokens>
inline void gemm_block_neon(const gemm_args& a, Eigen::Index g, Eigen::Index token) noexcept {
  const uint8x16_t mask = vdupq_n_u8(3);
  const std::uint8_t* w = a.weights + g * a.col_tiles * tile_bytes;
  const std::int8_t* x[Tokens];
  int32x4_t acc[Tokens][4];
  for (int t = 0; t < Tokens; ++t) {
    x[t] = a.x + (token + t) * a.x_stride + group_column(a, g);
    for (int q = 0; q < 4; ++q) acc[t][q] = vdupq_n_s32(0);
  }
  for (Eigen::Index remaining = a.col_tiles; remaining > 0;) {
    const Eigen::Index run = std::min(remaining, neon_tiles_per_int16);
    remaining -= run;
    int16x8_t s[Tokens][4][2];
    for (int t = 0; t < Tokens; ++t)
      for (int q = 0; q < 4; ++q) s[t][q][0] = s[t][q][1] = vdupq_n_s16(0);
    for (const std::uint8_t* const run_end = w + run * tile_bytes; w != run_end; w += tile_bytes) {
      int32x4_t xv[Tokens];
#pragma GCC unroll 2
      for (int t = 0; t < Tokens; ++t) {
        xv[t] = vreinterpretq_s32_s8(vld1q_s8(x[t]));
        x[t] += tile_cols;
      }
#pragma GCC unroll 4
      for (int q = 0; q < 4; ++q) {
        const uint8x16_t v = vld1q_u8(w + 16 * q);
        const int8x16_t planes[4] = {vreinterpretq_s8_u8(vandq_u8(v, mask)),
                                     vreinterpretq_s8_u8(vandq_u8(vshrq_n_u8(v, 2), mask)),
                                     vreinterpretq_s8_u8(vandq_u8(vshrq_n_u8(v, 4), mask)),
                                     vreinterpretq_s8_u8(vshrq_n_u8(v, 6))};
#pragma GCC unroll 2
        for (int t = 0; t < Tokens; ++t) {
          const int8x16_t g0 = vreinterpretq_s8_s32(vdupq_laneq_s32(xv[t], 0));
          const int8x16_t g1 = vreinterpretq_s8_s32(vdupq_laneq_s32(xv[t], 1));
          const int8x16_t g2 = vreinterpretq_s8_s32(vdupq_laneq_s32(xv[t], 2));
          const int8x16_t g3 = vreinterpretq_s8_s32(vdupq_laneq_s32(xv[t], 3));
          int16x8_t lo = s[t][q][0], hi = s[t][q][1];
          lo = vmlal_s8(lo, vget_low_s8(planes[0]), vget_low_s8(g0));
          hi = vmlal_high_s8(hi, planes[0], g0);
          lo = vmlal_s8(lo, vget_low_s8(planes[1]), vget_low_s8(g1));
          hi = vmlal_high_s8(hi, planes[1], g1);
          lo = vmlal_s8(lo, vget_low_s8(planes[2]), vget_low_s8(g2));
          hi = vmlal_high_s8(hi, planes[2], g2);
          lo = vmlal_s8(lo, vget_low_s8(planes[3]), vget_low_s8(g3));
          hi = vmlal_high_s8(hi, planes[3], g3);
          s[t][q][0] = lo;
          s[t][q][1] = hi;
        }
      }
    }
    // lo holds rows 0-1 x 4 column slots, hi rows 2-3: pairwise sums twice give the 4 row sums.
    for (int t = 0; t < Tokens; ++t)
      for (int q = 0; q < 4; ++q)
        acc[t][q] = vaddq_s32(acc[t][q], vpaddq_s32(vpaddlq_s16(s[t][q][0]), vpaddlq_s16(s[t][q][1])));
  }
  for (int t = 0; t < Tokens; ++t)
    for (int q = 0; q < 4; ++q) store_rows_arm(a, acc[t][q], g * tile_rows + 4 * q, token + t, group_x_sum(a, g, token + t));
}

inline void ternary_gemm_neon(const gemm_args& a, Eigen::Index block_begin, Eigen::Index block_end) noexcept {
  const Eigen::Index chunk = arm_blocks_per_chunk(a.col_tiles);
  for (Eigen::Index g0 = block_begin; g0 < block_end; g0 += chunk) {
    const Eigen::Index g1 = std::min(g0 + chunk, block_end);
    for (Eigen::Index token = 0; token < a.batch; token += 2)
      for (Eigen::Index g = g0; g < g1; ++g)
        if (a.batch - token >= 2)
          gemm_block_neon<2>(a, g, token);
        else
          gemm_block_neon<1>(a, g, token);
  }
}

// ---------------------------------------------------------------------------------------------
// dotprod (SDOT).

#ifdef BITNET_HAS_DOTPROD_KERNEL

/// Batch-1 tiles per fold. Plane 2 is extracted as 16c: a lane of its accumulator gains 4
/// products 16 c x per tile, |16 c x| <= 4096, so 2^16 tiles stay within 2^30. Planes 0 and 3
/// (c as it is) and 1 (4c) are smaller.
inline constexpr Eigen::Index dotprod_tiles_per_fold = Eigen::Index{1} << 16;

/// Batch 1, row block g: per quarter tile three AND and one USHR, four SDOT.
BITNET_TARGET_DOTPROD inline void gemv_block_dotprod(const gemm_args& a, Eigen::Index g) noexcept {
  const uint8x16_t m1 = vdupq_n_u8(0x03), m4 = vdupq_n_u8(0x0c), m16 = vdupq_n_u8(0x30);
  const std::uint8_t* w = a.weights + g * a.col_tiles * tile_bytes;
  const std::int8_t* x = a.x + group_column(a, g);
  int32x4_t total[4];
  for (int q = 0; q < 4; ++q) total[q] = vdupq_n_s32(0);
  for (Eigen::Index remaining = a.col_tiles; remaining > 0;) {
    const Eigen::Index run = std::min(remaining, dotprod_tiles_per_fold);
    remaining -= run;
    int32x4_t s1[4], s4[4], s16[4];  // sums of c x, 4 c x and 16 c x
    for (int q = 0; q < 4; ++q) s1[q] = s4[q] = s16[q] = vdupq_n_s32(0);
    for (const std::uint8_t* const run_end = w + run * tile_bytes; w != run_end; w += tile_bytes, x += tile_cols) {
      const int8x16_t xv = vld1q_s8(x);
#pragma GCC unroll 4
      for (int q = 0; q < 4; ++q) {
        const uint8x16_t v = vld1q_u8(w + 16 * q);
        s1[q] = vdotq_laneq_s32(s1[q], vreinterpretq_s8_u8(vandq_u8(v, m1)), xv, 0);
        s4[q] = vdotq_laneq_s32(s4[q], vreinterpretq_s8_u8(vandq_u8(v, m4)), xv, 1);
        s16[q] = vdotq_laneq_s32(s16[q], vreinterpretq_s8_u8(vandq_u8(v, m16)), xv, 2);
        s1[q] = vdotq_laneq_s32(s1[q], vreinterpretq_s8_u8(vshrq_n_u8(v, 6)), xv, 3);
      }
    }
    // s4 and s16 are exact multiples of 4 and 16: the arithmetic shifts are exact divisions.
    for (int q = 0; q < 4; ++q)
      total[q] = vaddq_s32(vaddq_s32(total[q], s1[q]), vaddq_s32(vshrq_n_s32(s4[q], 2), vshrq_n_s32(s16[q], 4)));
  }
  const std::int32_t x_sum = group_x_sum(a, g, 0);
  for (int q = 0; q < 4; ++q) store_rows_arm(a, total[q], g * tile_rows + 4 * q, 0, x_sum);
}

/// Batch > 1: half `half` (rows 8 half .. 8 half + 7) of row block g against Tokens (1-8) tokens;
/// each quarter tile unpacked once (three USHR, three AND) and multiplied by 4 SDOT per token.
/// Half a block at a time leaves registers for 8 tokens (16 accumulators, 8 activation vectors).
template <int Tokens>
BITNET_TARGET_DOTPROD void gemm_half_dotprod(const gemm_args& a, Eigen::Index g, int half,
                                           Eigen::Index token) noexcept {
  const uint8x16_t mask = vdupq_n_u8(3);
  const std::uint8_t* w = a.weights + g * a.col_tiles * tile_bytes + 32 * half;
  const std::uint8_t* const w_end = w + a.col_tiles * tile_bytes;
  const std::int8_t* x = a.x + token * a.x_stride + group_column(a, g);
  int32x4_t acc[Tokens][2];
  for (int t = 0; t < Tokens; ++t) acc[t][0] = acc[t][1] = vdupq_n_s32(0);
  for (; w != w_end; w += tile_bytes, x += tile_cols) {
    int8x16_t xv[Tokens];
#pragma GCC unroll 8
    for (int t = 0; t < Tokens; ++t) xv[t] = vld1q_s8(x + t * a.x_stride);
#pragma GCC unroll 2
    for (int q = 0; q < 2; ++q) {
      const uint8x16_t v = vld1q_u8(w + 16 * q);
      const int8x16_t c0 = vreinterpretq_s8_u8(vandq_u8(v, mask));
      const int8x16_t c1 = vreinterpretq_s8_u8(vandq_u8(vshrq_n_u8(v, 2), mask));
      const int8x16_t c2 = vreinterpretq_s8_u8(vandq_u8(vshrq_n_u8(v, 4), mask));
      const int8x16_t c3 = vreinterpretq_s8_u8(vshrq_n_u8(v, 6));
#pragma GCC unroll 8
      for (int t = 0; t < Tokens; ++t) {
        acc[t][q] = vdotq_laneq_s32(acc[t][q], c0, xv[t], 0);
        acc[t][q] = vdotq_laneq_s32(acc[t][q], c1, xv[t], 1);
        acc[t][q] = vdotq_laneq_s32(acc[t][q], c2, xv[t], 2);
        acc[t][q] = vdotq_laneq_s32(acc[t][q], c3, xv[t], 3);
      }
    }
  }
  for (int t = 0; t < Tokens; ++t)
    for (int q = 0; q < 2; ++q)
      store_rows_arm(a, acc[t][q], g * tile_rows + 8 * half + 4 * q, token + t, group_x_sum(a, g, token + t));
}

inline constexpr int dotprod_token_group = 8;

BITNET_TARGET_DOTPROD inline void ternary_gemm_dotprod(const gemm_args& a, Eigen::Index block_begin,
                                                       Eigen::Index block_end) noexcept {
  if (a.batch == 1) {
    for (Eigen::Index g = block_begin; g < block_end; ++g) gemv_block_dotprod(a, g);
    return;
  }
  const Eigen::Index chunk = arm_blocks_per_chunk(a.col_tiles);
  for (Eigen::Index g0 = block_begin; g0 < block_end; g0 += chunk) {
    const Eigen::Index g1 = std::min(g0 + chunk, block_end);
    for (Eigen::Index token = 0; token < a.batch; token += dotprod_token_group) {
      const Eigen::Index tokens = std::min<Eigen::Index>(dotprod_token_group, a.batch - token);
      for (Eigen::Index g = g0; g < g1; ++g)
        for (int half = 0; half < 2 && g * tile_rows + 8 * half < a.rows; ++half) switch (tokens) {
            case 8: gemm_half_dotprod<8>(a, g, half, token); break;
            case 7: gemm_half_dotprod<7>(a, g, half, token); break;
            case 6: gemm_half_dotprod<6>(a, g, half, token); break;
            case 5: gemm_half_dotprod<5>(a, g, half, token); break;
            case 4: gemm_half_dotprod<4>(a, g, half, token); break;
            case 3: gemm_half_dotprod<3>(a, g, half, token); break;
            case 2: gemm_half_dotprod<2>(a, g, half, token); break;
            default: gemm_half_dotprod<1>(a, g, half, token); break;
          }
    }
  }
}

#endif  // BITNET_HAS_DOTPROD_KERNEL

// ---------------------------------------------------------------------------------------------
// i8mm (SMMLA).

#ifdef BITNET_HAS_I8MM_KERNEL

/// Half `half` (rows 8 half .. 8 half + 7) of row block g against Pairs (1-4) pairs of tokens
/// from `token`; `tokens` of them are real (a missing second token of the last pair repeats the
/// first, and its results are not stored). Per quarter tile (rows 4q..4q+3): s = v >> 2;
/// zip1(v, s) is rows 4q, 4q+1 with planes 0 and 1 side by side (columns 0-7 after & 3) and planes
/// 2 and 3 after >> 4 & 3 (columns 8-15); zip2(v, s) the same for rows 4q+2, 4q+3. Nine
/// instructions feed 4 SMMLA per token pair; half a block at a time leaves registers for 8 tokens.
template <int Pairs>
BITNET_TARGET_I8MM void gemm_half_i8mm(const gemm_args& a, Eigen::Index g, int half, Eigen::Index token,
                                       Eigen::Index tokens) noexcept {
  const uint8x16_t mask = vdupq_n_u8(3);
  const std::uint8_t* w = a.weights + g * a.col_tiles * tile_bytes + 32 * half;
  const std::uint8_t* const w_end = w + a.col_tiles * tile_bytes;
  const std::int8_t* x[2 * Pairs];
#pragma GCC unroll 8
  for (int t = 0; t < 2 * Pairs; ++t)
    x[t] = a.x + (token + std::min<Eigen::Index>(t, tokens - 1)) * a.x_stride + group_column(a, g);
  int32x4_t acc[Pairs][2][2];  // [pair][quarter][rows 4q, 4q+1 | 4q+2, 4q+3]: (row0 t0, row0 t1, row1 t0, row1 t1)
  for (int m = 0; m < Pairs; ++m)
    for (int q = 0; q < 2; ++q) acc[m][q][0] = acc[m][q][1] = vdupq_n_s32(0);
  for (Eigen::Index k = 0; w != w_end; w += tile_bytes, k += tile_cols) {
    int8x16_t b_lo[Pairs], b_hi[Pairs];  // columns 0-7 / 8-15 of the pair's two tokens
#pragma GCC unroll 4
    for (int m = 0; m < Pairs; ++m) {
      const int64x2_t t0 = vreinterpretq_s64_s8(vld1q_s8(x[2 * m] + k));
      const int64x2_t t1 = vreinterpretq_s64_s8(vld1q_s8(x[2 * m + 1] + k));
      b_lo[m] = vreinterpretq_s8_s64(vzip1q_s64(t0, t1));
      b_hi[m] = vreinterpretq_s8_s64(vzip2q_s64(t0, t1));
    }
#pragma GCC unroll 2
    for (int q = 0; q < 2; ++q) {
      const uint32x4_t v = vreinterpretq_u32_u8(vld1q_u8(w + 16 * q));
      const uint32x4_t s = vreinterpretq_u32_u8(vshrq_n_u8(vreinterpretq_u8_u32(v), 2));
      const uint8x16_t z01 = vreinterpretq_u8_u32(vzip1q_u32(v, s)), z23 = vreinterpretq_u8_u32(vzip2q_u32(v, s));
      const int8x16_t a01_lo = vreinterpretq_s8_u8(vandq_u8(z01, mask));
      const int8x16_t a23_lo = vreinterpretq_s8_u8(vandq_u8(z23, mask));
      const int8x16_t a01_hi = vreinterpretq_s8_u8(vandq_u8(vshrq_n_u8(z01, 4), mask));
      const int8x16_t a23_hi = vreinterpretq_s8_u8(vandq_u8(vshrq_n_u8(z23, 4), mask));
#pragma GCC unroll 4
      for (int m = 0; m < Pairs; ++m) {
        acc[m][q][0] = vmmlaq_s32(vmmlaq_s32(acc[m][q][0], a01_lo, b_lo[m]), a01_hi, b_hi[m]);
        acc[m][q][1] = vmmlaq_s32(vmmlaq_s32(acc[m][q][1], a23_lo, b_lo[m]), a23_hi, b_hi[m]);
      }
    }
  }
  for (int m = 0; m < Pairs; ++m)
    for (int q = 0; q < 2; ++q)
      for (int h = 0; h < 2; ++h) {
        std::int32_t lanes[4];
        vst1q_s32(lanes, acc[m][q][h]);
        for (int i = 0; i < 2; ++i) {
          const Eigen::Index row = g * tile_rows + 8 * half + 4 * q + 2 * h + i;
          for (int j = 0; j < 2 && 2 * m + j < tokens && row < a.rows; ++j) {
            const Eigen::Index t = token + 2 * m + j;
            a.acc[t * a.rows + row] = lanes[2 * i + j] - group_x_sum(a, g, t);
          }
        }
      }
}

inline constexpr int i8mm_token_group = 8;

/// Batch 1 runs gemv_block_dotprod: SMMLA would multiply a second token of zeros.
BITNET_TARGET_I8MM inline void ternary_gemm_i8mm(const gemm_args& a, Eigen::Index block_begin,
                                                 Eigen::Index block_end) noexcept {
  if (a.batch == 1) {
    for (Eigen::Index g = block_begin; g < block_end; ++g) gemv_block_dotprod(a, g);
    return;
  }
  const Eigen::Index chunk = arm_blocks_per_chunk(a.col_tiles);
  for (Eigen::Index g0 = block_begin; g0 < block_end; g0 += chunk) {
    const Eigen::Index g1 = std::min(g0 + chunk, block_end);
    for (Eigen::Index token = 0; token < a.batch; token += i8mm_token_group) {
      const Eigen::Index tokens = std::min<Eigen::Index>(i8mm_token_group, a.batch - token);
      for (Eigen::Index g = g0; g < g1; ++g)
        for (int half = 0; half < 2 && g * tile_rows + 8 * half < a.rows; ++half) switch ((tokens + 1) / 2) {
            case 4: gemm_half_i8mm<4>(a, g, half, token, tokens); break;
            case 3: gemm_half_i8mm<3>(a, g, half, token, tokens); break;
            case 2: gemm_half_i8mm<2>(a, g, half, token, tokens); break;
            default: gemm_half_i8mm<1>(a, g, half, token, tokens); break;
          }
    }
  }
}

#endif  // BITNET_HAS_I8MM_KERNEL

// ---------------------------------------------------------------------------------------------
// Activation quantization and rescale (plain NEON, used by every ARM ISA).

/// rescale_rows_scalar<float>, vectorized: SXTL + SCVTF (exact), the same double product, FCVTN
/// (round to nearest even, as the conversion), the same float addition.
inline void rescale_rows_neon(const std::int32_t* acc, Eigen::Index acc_stride, Eigen::Index batch, Eigen::Index out,
                              const float* sx, float sw, const float* bias, float* y, Eigen::Index y_stride) noexcept {
  for (Eigen::Index b = 0; b < batch; ++b) {
    const double inverse_scale = 1.0 / (double(sx[b]) * double(sw));
    const float64x2_t vscale = vdupq_n_f64(inverse_scale);
    const std::int32_t* row_acc = acc + b * acc_stride;
    float* row_y = y + b * y_stride;
    Eigen::Index o = 0;
    for (; o + 4 <= out; o += 4) {
      const int32x4_t v = vld1q_s32(row_acc + o);
      const float64x2_t lo = vmulq_f64(vcvtq_f64_s64(vmovl_s32(vget_low_s32(v))), vscale);
      const float64x2_t hi = vmulq_f64(vcvtq_f64_s64(vmovl_high_s32(v)), vscale);
      float32x4_t r = vcvt_high_f32_f64(vcvt_f32_f64(lo), hi);
      if (bias) r = vaddq_f32(r, vld1q_f32(bias + o));
      vst1q_f32(row_y + o, r);
    }
    for (; o < out; ++o) {
      const float scaled = static_cast<float>(double(row_acc[o]) * inverse_scale);
      row_y[o] = bias ? scaled + bias[o] : scaled;
    }
  }
}

/// rescale_rows_grouped_scalar<float>, 2 rows per vector of doubles: per lane the same products
/// (exact: an int32 of at most 2^15 in magnitude times a float, so FMLA contraction changes
/// nothing), the same divisions and sums in the same order, one rounding to float (FCVTN), the same
/// float addition of the bias. An odd first or last row goes the scalar way.
inline void rescale_rows_grouped_neon(const std::int32_t* acc, Eigen::Index acc_stride, Eigen::Index batch,
                                      Eigen::Index row_begin, Eigen::Index row_end, Eigen::Index kernel_groups,
                                      Eigen::Index groups, const float* d, const float* sx, bool per_block,
                                      const float* bias, float* y, Eigen::Index y_stride) noexcept {
  const Eigen::Index head = std::min(row_end, (row_begin + 1) / 2 * 2);
  const Eigen::Index body = std::max(head, row_end / 2 * 2);
  for (Eigen::Index b = 0; b < batch; ++b) {
    const std::int32_t* row_acc = acc + b * acc_stride;
    const float* token_sx = sx + (per_block ? b * groups : b);
    float* row_y = y + b * y_stride;
    rescale_rows_grouped_scalar(row_acc, acc_stride, 1, row_begin, head, kernel_groups, groups, d, token_sx, per_block,
                                bias, row_y, y_stride);
    for (Eigen::Index o = head; o < body; o += 2) {
      const std::int32_t* unit = row_acc + o / tile_rows * kernel_groups * tile_rows + o % tile_rows;
      const float* row_d = d + o * groups;
      float64x2_t sum = vdupq_n_f64(0.0);
      for (Eigen::Index j = 0; j < groups; ++j) {
        const float64x2_t scales = vcvt_f64_f32(vset_lane_f32(row_d[groups + j], vdup_n_f32(row_d[j]), 1));
        const float64x2_t products = vmulq_f64(vcvtq_f64_s64(vmovl_s32(vld1_s32(unit + j * tile_rows))), scales);
        sum = vaddq_f64(sum, per_block ? vdivq_f64(products, vdupq_n_f64(double(token_sx[j]))) : products);
      }
      if (!per_block) sum = vdivq_f64(sum, vdupq_n_f64(double(token_sx[0])));
      float32x2_t v = vcvt_f32_f64(sum);
      if (bias) v = vadd_f32(v, vld1_f32(bias + o));
      vst1_f32(row_y + o, v);
    }
    rescale_rows_grouped_scalar(row_acc, acc_stride, 1, body, row_end, kernel_groups, groups, d, token_sx, per_block,
                                bias, row_y, y_stride);
  }
}

/// The sum of n int8 codes (n a multiple of 16): SADDLV per 16 (at most 16 x 128 in magnitude).
inline std::int32_t sum_codes_neon(const std::int8_t* q, Eigen::Index n) noexcept {
  std::int32_t sum = 0;
  for (Eigen::Index k = 0; k < n; k += 16) sum += vaddlvq_s8(vld1q_s8(q + k));
  return sum;
}

/// quantize_row_scalar<float>, vectorized: same absmax, same scale, same products; FCVTNS
/// (vcvtnq_s32_f32) rounds half to even as std::nearbyint does. Clamping before rounding equals
/// rounding before clamping: the bounds are integers.
inline bool quantize_row_neon(const float* x, Eigen::Index cols, Eigen::Index padded, std::int8_t* q, float& scale,
                              std::int32_t& sum) noexcept {
  const uint32x4_t largest_finite = vdupq_n_u32(0x7f7fffff);
  float32x4_t vmax = vdupq_n_f32(0.0f);
  uint32x4_t nonfinite = vdupq_n_u32(0);
  Eigen::Index c = 0;
  for (; c + 4 <= cols; c += 4) {
    const float32x4_t v = vabsq_f32(vld1q_f32(x + c));
    nonfinite = vorrq_u32(nonfinite, vcgtq_u32(vreinterpretq_u32_f32(v), largest_finite));
    vmax = vmaxq_f32(vmax, v);
  }
  if (vmaxvq_u32(nonfinite) != 0) return false;
  float absmax = vmaxvq_f32(vmax);
  for (; c < cols; ++c) {
    if (!std::isfinite(x[c])) return false;
    absmax = std::max(absmax, std::abs(x[c]));
  }
  scale = activation_scale_of(absmax);

  const float32x4_t vscale = vdupq_n_f32(scale), lo = vdupq_n_f32(-128.0f), hi = vdupq_n_f32(127.0f);
  int32x4_t vsum = vdupq_n_s32(0);
  c = 0;
  for (; c + 16 <= cols; c += 16) {
    int32x4_t i[4];
    for (int k = 0; k < 4; ++k) {
      const float32x4_t v = vmulq_f32(vld1q_f32(x + c + 4 * k), vscale);
      i[k] = vcvtnq_s32_f32(vminq_f32(vmaxq_f32(v, lo), hi));
      vsum = vaddq_s32(vsum, i[k]);
    }
    const int16x8_t h0 = vcombine_s16(vmovn_s32(i[0]), vmovn_s32(i[1]));
    const int16x8_t h1 = vcombine_s16(vmovn_s32(i[2]), vmovn_s32(i[3]));
    vst1q_s8(q + c, vcombine_s8(vmovn_s16(h0), vmovn_s16(h1)));
  }
  sum = vaddvq_s32(vsum);
  for (; c < cols; ++c) {
    q[c] = static_cast<std::int8_t>(std::clamp(round_half_even(x[c] * scale), -128.0f, 127.0f));
    sum += q[c];
  }
  std::fill(q + cols, q + padded, std::int8_t{0});
  return true;
}

}  // namespace BITNET_TU_ISA
}  // namespace bitnet::detail

#endif  // BITNET_ARM64
