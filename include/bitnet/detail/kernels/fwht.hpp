// The blockwise fast Walsh-Hadamard transform of rotation.hpp: a scalar reference and AVX2,
// AVX-512 and NEON versions that give the same bits.
//
// The definition (every ISA computes exactly these operations, in T, per element):
//   forward  out = H_b (s . x) per block:  v_k = x_k * scale_k  (scale_k = sign_k * T(1/sqrt(b)),
//            one rounding), then the butterfly stages h = 1, 2, 4, ..., b/2 in that order, each
//            replacing every pair (v_j, v_{j+h}) with j & h == 0 (offsets inside a block of b
//            consecutive values) by (v_j + v_{j+h}, v_j - v_{j+h});
//   inverse  out = s . H_b z per block: the same stages on z first, then v_k * scale_k.
// Within a stage the pairs are independent, so the order in which a SIMD kernel visits them (and
// two stages fused in registers) changes no result: the sequence of operations producing each
// element is the one above. Lanes exchanged inside a register compute partner + (+-self) (a sign
// flip by xor, or an FMA with +-1, whose product is exact): partner + self = self + partner
// exactly (IEEE addition commutes) and partner + (-self) is partner - self exactly (IEEE defines
// subtraction so), so they equal the reference's a + c and a - c.
//
// x and out are one row of n values (n a multiple of b); out may be x (in place), not otherwise
// overlap it. Non-finite values propagate (through their block).
#pragma once

#include <cstdint>
#include <cstring>

#include "common.hpp"

#ifdef BITNET_X86
#include <immintrin.h>
#endif
#ifdef BITNET_ARM64
#include <arm_neon.h>
#endif

namespace bitnet::detail {
inline namespace BITNET_TU_ISA {

/// The butterfly stages on one block of b values, in place.
template <class T>
void fwht_block_scalar(T* v, Eigen::Index b) noexcept {
  for (Eigen::Index h = 1; h < b; h *= 2)
    for (Eigen::Index i = 0; i < b; i += 2 * h)
      for (Eigen::Index j = i; j < i + h; ++j) {
        const T a = v[j], c = v[j + h];
        v[j] = a + c;
        v[j + h] = a - c;
      }
}

/// The reference: one row of n values (a multiple of b).
template <class T>
void fwht_row_scalar(const T* x, T* out, Eigen::Index n, Eigen::Index b, const T* scale, bool inverse) noexcept {
  if (!inverse)
    for (Eigen::Index k = 0; k < n; ++k) out[k] = x[k] * scale[k];
  else if (out != x)
    std::memcpy(out, x, std::size_t(n) * sizeof(T));
  for (Eigen::Index s = 0; s < n; s += b) fwht_block_scalar(out + s, b);
  if (inverse)
    for (Eigen::Index k = 0; k < n; ++k) out[k] *= scale[k];
}

// The SIMD kernels share one body, instantiated per ISA by BITNET_FWHT_ROW_KERNEL: a function
// template cannot carry a target attribute chosen by its template argument, and GCC and Clang
// refuse to inline target-specific operations into a function compiled without that target.
// Ops (one struct per ISA and T) gives: T, V, lanes, load, store, add, sub, mul, and
// in_register(v, b), the stages h < min(b, lanes) on one register.
//
//   pass 1   runs of `regs` consecutive registers (regs = 4 when b >= 4 lanes, 2 when b = 2 lanes,
//            else 1): forward times scale, the in-register stages on each register, then the
//            stages h = lanes and 2 lanes between the run's registers; a row tail shorter than a
//            register (only when b < lanes: whole blocks) runs the reference;
//   pass 2   the stages h >= regs * lanes per block, two at a time (loads of v_j, v_{j+h},
//            v_{j+2h}, v_{j+3h}, both stages in registers), then one alone if one is left;
//   pass 3   inverse: times scale.
#define BITNET_FWHT_ROW_KERNEL(TARGET, NAME)                                                                        \
  template <class Ops>                                                                                              \
  TARGET void NAME(const typename Ops::T* x, typename Ops::T* out, Eigen::Index n, Eigen::Index b,                   \
                   const typename Ops::T* scale, bool inverse) noexcept {                                          \
    using V = typename Ops::V;                                                                                      \
    constexpr Eigen::Index lanes = Ops::lanes;                                                                      \
    const Eigen::Index regs = b >= 4 * lanes ? 4 : (b == 2 * lanes ? 2 : 1);                                        \
    const Eigen::Index full = n - n % lanes;                                                                        \
    if (regs == 4)                                                                                                  \
      for (Eigen::Index k = 0; k < n; k += 4 * lanes) {                                                             \
        V a0 = Ops::load(x + k), a1 = Ops::load(x + k + lanes);                                                     \
        V a2 = Ops::load(x + k + 2 * lanes), a3 = Ops::load(x + k + 3 * lanes);                                     \
        if (!inverse) {                                                                                             \
          a0 = Ops::mul(a0, Ops::load(scale + k)), a1 = Ops::mul(a1, Ops::load(scale + k + lanes));                 \
          a2 = Ops::mul(a2, Ops::load(scale + k + 2 * lanes)), a3 = Ops::mul(a3, Ops::load(scale + k + 3 * lanes)); \
        }                                                                                                           \
        a0 = Ops::in_register(a0, b), a1 = Ops::in_register(a1, b);                                                 \
        a2 = Ops::in_register(a2, b), a3 = Ops::in_register(a3, b);                                                 \
        const V s0 = Ops::add(a0, a1), d0 = Ops::sub(a0, a1), s1 = Ops::add(a2, a3), d1 = Ops::sub(a2, a3);         \
        Ops::store(out + k, Ops::add(s0, s1));                                                                      \
        Ops::store(out + k + lanes, Ops::add(d0, d1));                                                              \
        Ops::store(out + k + 2 * lanes, Ops::sub(s0, s1));                                                          \
        Ops::store(out + k + 3 * lanes, Ops::sub(d0, d1));                                                          \
      }                                                                                                             \
    else if (regs == 2)                                                                                             \
      for (Eigen::Index k = 0; k < n; k += 2 * lanes) {                                                             \
        V a0 = Ops::load(x + k), a1 = Ops::load(x + k + lanes);                                                     \
        if (!inverse) a0 = Ops::mul(a0, Ops::load(scale + k)), a1 = Ops::mul(a1, Ops::load(scale + k + lanes));     \
        a0 = Ops::in_register(a0, b), a1 = Ops::in_register(a1, b);                                                 \
        Ops::store(out + k, Ops::add(a0, a1));                                                                      \
        Ops::store(out + k + lanes, Ops::sub(a0, a1));                                                              \
      }                                                                                                             \
    else                                                                                                            \
      for (Eigen::Index k = 0; k < full; k += lanes) {                                                              \
        V a0 = Ops::load(x + k);                                                                                    \
        if (!inverse) a0 = Ops::mul(a0, Ops::load(scale + k));                                                      \
        Ops::store(out + k, Ops::in_register(a0, b));                                                               \
      }                                                                                                             \
    if (full < n) fwht_row_scalar(x + full, out + full, n - full, b, scale + full, inverse);                        \
    for (Eigen::Index s = 0; b > regs * lanes && s < n; s += b) {                                                   \
      typename Ops::T* v = out + s;                                                                                 \
      Eigen::Index h = regs * lanes;                                                                                \
      for (; 4 * h <= b; h *= 4)                                                                                    \
        for (Eigen::Index i = 0; i < b; i += 4 * h)                                                                 \
          for (Eigen::Index j = i; j < i + h; j += lanes) {                                                         \
            const V a0 = Ops::load(v + j), a1 = Ops::load(v + j + h);                                               \
            const V a2 = Ops::load(v + j + 2 * h), a3 = Ops::load(v + j + 3 * h);                                   \
            const V s0 = Ops::add(a0, a1), d0 = Ops::sub(a0, a1), s1 = Ops::add(a2, a3), d1 = Ops::sub(a2, a3);     \
            Ops::store(v + j, Ops::add(s0, s1));                                                                    \
            Ops::store(v + j + h, Ops::add(d0, d1));                                                                \
            Ops::store(v + j + 2 * h, Ops::sub(s0, s1));                                                            \
            Ops::store(v + j + 3 * h, Ops::sub(d0, d1));                                                            \
          }                                                                                                         \
      if (h < b)                                                                                                    \
        for (Eigen::Index j = 0; j < h; j += lanes) {                                                               \
          const V a = Ops::load(v + j), c = Ops::load(v + j + h);                                                   \
          Ops::store(v + j, Ops::add(a, c));                                                                        \
          Ops::store(v + j + h, Ops::sub(a, c));                                                                    \
        }                                                                                                           \
    }                                                                                                               \
    if (inverse)                                                                                                    \
      for (Eigen::Index k = 0; k < full; k += lanes) Ops::store(out + k, Ops::mul(Ops::load(out + k), Ops::load(scale + k))); \
  }

#ifdef BITNET_X86

// GCC 12 warns (-Wmaybe-uninitialized) about its own avx512fintrin.h helpers once they are inlined
// here (as in avx512.hpp); users building with -Werror must not see it.
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wuninitialized"
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#endif

#define BITNET_TARGET_FWHT_AVX2 __attribute__((target("avx2")))
#define BITNET_INLINE_FWHT_AVX2 __attribute__((target("avx2"), always_inline)) inline
// AVX-512 F only (every CPU the avx512 kernels run on has it); its FMA is part of AVX-512 F. The
// AVX2 code uses no FMA: the avx2 ISA is detected without checking for FMA3.
// tests/avx512_emulation.hpp predefines it empty (SIMDe) so the AVX-512 transform also runs, emulated,
// on CPUs without AVX-512.
#ifndef BITNET_TARGET_FWHT_AVX512
#define BITNET_TARGET_FWHT_AVX512 __attribute__((target("avx2,avx512f")))
#define BITNET_INLINE_FWHT_AVX512 __attribute__((target("avx2,avx512f"), always_inline)) inline
#endif

/// self ^ sign (the lanes whose offset has bit h set negated) plus partner: one stage in a register.
struct fwht_avx2_f32 {
  using T = float;
  using V = __m256;
  static constexpr Eigen::Index lanes = 8;
  static BITNET_INLINE_FWHT_AVX2 V load(const float* p) noexcept { return _mm256_loadu_ps(p); }
  static BITNET_INLINE_FWHT_AVX2 void store(float* p, V v) noexcept { _mm256_storeu_ps(p, v); }
  static BITNET_INLINE_FWHT_AVX2 V add(V a, V b) noexcept { return _mm256_add_ps(a, b); }
  static BITNET_INLINE_FWHT_AVX2 V sub(V a, V b) noexcept { return _mm256_sub_ps(a, b); }
  static BITNET_INLINE_FWHT_AVX2 V mul(V a, V b) noexcept { return _mm256_mul_ps(a, b); }
  static BITNET_INLINE_FWHT_AVX2 V stage(V v, V partner, int high_lanes) noexcept {
    const __m256i bits = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
    const __m256i high = _mm256_cmpeq_epi32(_mm256_and_si256(bits, _mm256_set1_epi32(high_lanes)), _mm256_set1_epi32(high_lanes));
    const V sign = _mm256_castsi256_ps(_mm256_and_si256(high, _mm256_set1_epi32(std::int32_t(0x80000000u))));
    return _mm256_add_ps(partner, _mm256_xor_ps(v, sign));
  }
  static BITNET_INLINE_FWHT_AVX2 V in_register(V v, Eigen::Index b) noexcept {
    v = stage(v, _mm256_permute_ps(v, 0xB1), 1);  // b >= 2: h = 1 always
    if (b > 2) v = stage(v, _mm256_permute_ps(v, 0x4E), 2);
    if (b > 4) v = stage(v, _mm256_permute2f128_ps(v, v, 0x01), 4);
    return v;
  }
};

struct fwht_avx2_f64 {
  using T = double;
  using V = __m256d;
  static constexpr Eigen::Index lanes = 4;
  static BITNET_INLINE_FWHT_AVX2 V load(const double* p) noexcept { return _mm256_loadu_pd(p); }
  static BITNET_INLINE_FWHT_AVX2 void store(double* p, V v) noexcept { _mm256_storeu_pd(p, v); }
  static BITNET_INLINE_FWHT_AVX2 V add(V a, V b) noexcept { return _mm256_add_pd(a, b); }
  static BITNET_INLINE_FWHT_AVX2 V sub(V a, V b) noexcept { return _mm256_sub_pd(a, b); }
  static BITNET_INLINE_FWHT_AVX2 V mul(V a, V b) noexcept { return _mm256_mul_pd(a, b); }
  static BITNET_INLINE_FWHT_AVX2 V stage(V v, V partner, int high_lanes) noexcept {
    const __m256i bits = _mm256_setr_epi64x(0, 1, 2, 3);
    const __m256i high = _mm256_cmpeq_epi64(_mm256_and_si256(bits, _mm256_set1_epi64x(high_lanes)), _mm256_set1_epi64x(high_lanes));
    const V sign = _mm256_castsi256_pd(_mm256_and_si256(high, _mm256_set1_epi64x(std::int64_t(0x8000000000000000ull))));
    return _mm256_add_pd(partner, _mm256_xor_pd(v, sign));
  }
  static BITNET_INLINE_FWHT_AVX2 V in_register(V v, Eigen::Index b) noexcept {
    v = stage(v, _mm256_permute_pd(v, 0x5), 1);
    if (b > 2) v = stage(v, _mm256_permute2f128_pd(v, v, 0x01), 2);
    return v;
  }
};

/// One stage in a register: self * (+1 or -1, -1 where the lane's offset has bit h set) + partner
/// in one FMA. The product is exact, so the single rounding gives partner + self or partner - self
/// exactly as the reference's a + c and a - c (on Zen 4 this beats the add and masked subtract).
struct fwht_avx512_f32 {
  using T = float;
  using V = __m512;
  static constexpr Eigen::Index lanes = 16;
  static BITNET_INLINE_FWHT_AVX512 V load(const float* p) noexcept { return _mm512_loadu_ps(p); }
  static BITNET_INLINE_FWHT_AVX512 void store(float* p, V v) noexcept { _mm512_storeu_ps(p, v); }
  static BITNET_INLINE_FWHT_AVX512 V add(V a, V b) noexcept { return _mm512_add_ps(a, b); }
  static BITNET_INLINE_FWHT_AVX512 V sub(V a, V b) noexcept { return _mm512_sub_ps(a, b); }
  static BITNET_INLINE_FWHT_AVX512 V mul(V a, V b) noexcept { return _mm512_mul_ps(a, b); }
  static BITNET_INLINE_FWHT_AVX512 V stage(V v, V partner, __mmask16 high) noexcept {
    const V sign = _mm512_mask_blend_ps(high, _mm512_set1_ps(1.0f), _mm512_set1_ps(-1.0f));
    return _mm512_fmadd_ps(v, sign, partner);
  }
  static BITNET_INLINE_FWHT_AVX512 V in_register(V v, Eigen::Index b) noexcept {
    v = stage(v, _mm512_permute_ps(v, 0xB1), 0xAAAA);
    if (b > 2) v = stage(v, _mm512_permute_ps(v, 0x4E), 0xCCCC);
    if (b > 4) v = stage(v, _mm512_shuffle_f32x4(v, v, 0xB1), 0xF0F0);
    if (b > 8) v = stage(v, _mm512_shuffle_f32x4(v, v, 0x4E), 0xFF00);
    return v;
  }
};

struct fwht_avx512_f64 {
  using T = double;
  using V = __m512d;
  static constexpr Eigen::Index lanes = 8;
  static BITNET_INLINE_FWHT_AVX512 V load(const double* p) noexcept { return _mm512_loadu_pd(p); }
  static BITNET_INLINE_FWHT_AVX512 void store(double* p, V v) noexcept { _mm512_storeu_pd(p, v); }
  static BITNET_INLINE_FWHT_AVX512 V add(V a, V b) noexcept { return _mm512_add_pd(a, b); }
  static BITNET_INLINE_FWHT_AVX512 V sub(V a, V b) noexcept { return _mm512_sub_pd(a, b); }
  static BITNET_INLINE_FWHT_AVX512 V mul(V a, V b) noexcept { return _mm512_mul_pd(a, b); }
  static BITNET_INLINE_FWHT_AVX512 V stage(V v, V partner, __mmask8 high) noexcept {
    const V sign = _mm512_mask_blend_pd(high, _mm512_set1_pd(1.0), _mm512_set1_pd(-1.0));
    return _mm512_fmadd_pd(v, sign, partner);
  }
  static BITNET_INLINE_FWHT_AVX512 V in_register(V v, Eigen::Index b) noexcept {
    v = stage(v, _mm512_permute_pd(v, 0x55), 0xAA);
    if (b > 2) v = stage(v, _mm512_shuffle_f64x2(v, v, 0xB1), 0xCC);
    if (b > 4) v = stage(v, _mm512_shuffle_f64x2(v, v, 0x4E), 0xF0);
    return v;
  }
};

BITNET_FWHT_ROW_KERNEL(BITNET_TARGET_FWHT_AVX2, fwht_row_avx2)
BITNET_FWHT_ROW_KERNEL(BITNET_TARGET_FWHT_AVX512, fwht_row_avx512)

#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC diagnostic pop
#endif

#endif  // BITNET_X86

#ifdef BITNET_ARM64

struct fwht_neon_f32 {
  using T = float;
  using V = float32x4_t;
  static constexpr Eigen::Index lanes = 4;
  static V load(const float* p) noexcept { return vld1q_f32(p); }
  static void store(float* p, V v) noexcept { vst1q_f32(p, v); }
  static V add(V a, V b) noexcept { return vaddq_f32(a, b); }
  static V sub(V a, V b) noexcept { return vsubq_f32(a, b); }
  static V mul(V a, V b) noexcept { return vmulq_f32(a, b); }
  static V stage(V v, V partner, uint32x4_t sign) noexcept {
    return vaddq_f32(partner, vreinterpretq_f32_u32(veorq_u32(vreinterpretq_u32_f32(v), sign)));
  }
  static V in_register(V v, Eigen::Index b) noexcept {
    constexpr std::uint32_t s = 0x80000000u;
    const std::uint32_t odd[4] = {0, s, 0, s}, upper[4] = {0, 0, s, s};
    v = stage(v, vrev64q_f32(v), vld1q_u32(odd));
    if (b > 2) v = stage(v, vextq_f32(v, v, 2), vld1q_u32(upper));
    return v;
  }
};

struct fwht_neon_f64 {
  using T = double;
  using V = float64x2_t;
  static constexpr Eigen::Index lanes = 2;
  static V load(const double* p) noexcept { return vld1q_f64(p); }
  static void store(double* p, V v) noexcept { vst1q_f64(p, v); }
  static V add(V a, V b) noexcept { return vaddq_f64(a, b); }
  static V sub(V a, V b) noexcept { return vsubq_f64(a, b); }
  static V mul(V a, V b) noexcept { return vmulq_f64(a, b); }
  static V in_register(V v, Eigen::Index) noexcept {  // lanes = 2 <= b: the stage h = 1 only
    const std::uint64_t odd[2] = {0, 0x8000000000000000ull};
    return vaddq_f64(vextq_f64(v, v, 1), vreinterpretq_f64_u64(veorq_u64(vreinterpretq_u64_f64(v), vld1q_u64(odd))));
  }
};

BITNET_FWHT_ROW_KERNEL(, fwht_row_neon)

#endif  // BITNET_ARM64

#undef BITNET_FWHT_ROW_KERNEL

}  // namespace BITNET_TU_ISA
}  // namespace bitnet::detail
