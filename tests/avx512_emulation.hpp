// Force-included (-include) into bitnet_x86_emulated_tests: runs the AVX-512 VNNI kernels of
// detail/kernels/avx512.hpp on any x86-64 CPU by routing their intrinsics through SIMDe's portable
// implementations, so their logic (tiles, tails, row pairs, token tiles, horizontal sums) is
// checked against the scalar reference even where no AVX-512 hardware exists. The real kernels
// run on AVX-512 CPUs in bitnet_tests; this catches logic errors, not code generation ones. The
// file is built with -mavx2, so only AVX-512 is emulated (SIMDe 0.7.4's AVX2 emulation of
// _mm256_testz_si256 is wrong, and the AVX2 code runs natively anyway).
#pragma once

#include <immintrin.h>  // the compiler's own declarations first, so SIMDe reuses its vector types

#include <cstdint>
#include <cstring>

#define SIMDE_ENABLE_NATIVE_ALIASES
#include <simde/x86/avx512.h>

// Plain code generation for the kernels: the emulation must not emit AVX-512 instructions itself.
#define BITNET_TARGET_AVX512
#define BITNET_INLINE_AVX512 inline
#define BITNET_TARGET_AVX512_VBMI
#define BITNET_INLINE_AVX512_VBMI inline
#define BITNET_TARGET_FWHT_AVX512
#define BITNET_INLINE_FWHT_AVX512 inline

#define BITNET_TEST_EMULATED_AVX512 1

// SIMDe 0.7.4 has no masked 32-bit store (the AMX kernel's partial tiles use it): lanes whose
// mask bit is set are stored, the others leave memory untouched.
inline void bitnet_test_mask_storeu_epi32(void* to, __mmask16 mask, simde__m512i v) noexcept {
  std::int32_t lanes[16];
  simde_mm512_storeu_si512(lanes, v);
  for (int i = 0; i < 16; ++i)
    if ((mask >> i) & 1) std::memcpy(static_cast<char*>(to) + 4 * i, &lanes[i], 4);
}
#define _mm512_mask_storeu_epi32(to, mask, v) bitnet_test_mask_storeu_epi32(to, mask, v)

// SIMDe 0.7.4 gives these no native alias (the FWHT's in-register stages use them): permute_ps is
// shuffle_ps of a vector with itself (the same 2-bit selectors in every 128-bit lane), permute_pd
// picks element j from its pair by bit j of the immediate.
inline simde__m512d bitnet_test_permute_pd(simde__m512d v, int imm) noexcept {
  double in[8], out[8];
  simde_mm512_storeu_pd(in, v);
  for (int j = 0; j < 8; ++j) out[j] = in[(j & ~1) + ((imm >> j) & 1)];
  return simde_mm512_loadu_pd(out);
}
// Clang's and unoptimized GCC's headers define these four as macros already: replace them.
#undef _mm512_shuffle_f32x4
#undef _mm512_shuffle_f64x2
#undef _mm512_permute_ps
#undef _mm512_permute_pd
#define _mm512_shuffle_f32x4(a, b, imm) simde_mm512_shuffle_f32x4(a, b, imm)
#define _mm512_shuffle_f64x2(a, b, imm) simde_mm512_shuffle_f64x2(a, b, imm)
#define _mm512_permute_ps(v, imm) simde_mm512_shuffle_ps(v, v, imm)
#define _mm512_permute_pd(v, imm) bitnet_test_permute_pd(v, imm)

// SIMDe 0.7.4 has no 512-bit conversions between int32, float and double (the fused grouped
// kernel uses them): lane by lane, with C++'s conversions (int32 and float to double are exact;
// double to float rounds to nearest even, as vcvtpd2ps in the default MXCSR mode).
inline simde__m512d bitnet_test_cvtepi32_pd(__m256i v) noexcept {
  std::int32_t in[8];
  double out[8];
  std::memcpy(in, &v, sizeof in);
  for (int j = 0; j < 8; ++j) out[j] = double(in[j]);
  return simde_mm512_loadu_pd(out);
}
inline simde__m512d bitnet_test_cvtps_pd(__m256 v) noexcept {
  float in[8];
  double out[8];
  std::memcpy(in, &v, sizeof in);
  for (int j = 0; j < 8; ++j) out[j] = double(in[j]);
  return simde_mm512_loadu_pd(out);
}
inline __m256 bitnet_test_cvtpd_ps(simde__m512d v) noexcept {
  double in[8];
  float out[8];
  simde_mm512_storeu_pd(in, v);
  for (int j = 0; j < 8; ++j) out[j] = float(in[j]);
  __m256 result;
  std::memcpy(&result, out, sizeof out);
  return result;
}
#undef _mm512_cvtepi32_pd
#undef _mm512_cvtps_pd
#undef _mm512_cvtpd_ps
#define _mm512_cvtepi32_pd(v) bitnet_test_cvtepi32_pd(v)
#define _mm512_cvtps_pd(v) bitnet_test_cvtps_pd(v)
#define _mm512_cvtpd_ps(v) bitnet_test_cvtpd_ps(v)

// SIMDe 0.7.4's portable _mm512_mullo_epi32 multiplies signed ints, which overflows (undefined
// behaviour, caught by UBSan) where vpmulld wraps: the base-3 kernel's exact division by 81 is a
// multiplication by 81's inverse modulo 2^32. Lane by lane in uint32, wrapping as the hardware does.
inline simde__m512i bitnet_test_mullo_epi32(simde__m512i a, simde__m512i b) noexcept {
  std::uint32_t x[16], y[16];
  simde_mm512_storeu_si512(x, a);
  simde_mm512_storeu_si512(y, b);
  for (int j = 0; j < 16; ++j) x[j] *= y[j];
  return simde_mm512_loadu_si512(x);
}
#undef _mm512_mullo_epi32
#define _mm512_mullo_epi32(a, b) bitnet_test_mullo_epi32(a, b)
