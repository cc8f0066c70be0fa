// Exact conversions between double and the small floating-point formats of checkpoint files
// (IEEE binary16 "F16", bfloat16 "BF16", binary32, and the two 8-bit formats F8_E4M3 / F8_E5M2).
//
// Decoding is exact (every value of these formats is a float). Encoding rounds to nearest, ties
// to even, directly from the double, so there is no double rounding; a finite value too large for
// the format is reported (the caller names the tensor), never silently turned into infinity.
#pragma once

#include <algorithm>
#include <bit>
#include <cmath>
#include <cstdint>
#include <limits>
#include <optional>

namespace bitnet::detail {

/// A binary floating-point format: `mantissa_bits` stored fraction bits, exponent bias, and the
/// largest unbiased exponent of a finite value.
struct float_format {
  int mantissa_bits;
  int exponent_bits;
  int max_exponent;  // of the largest finite value
};

inline constexpr float_format binary16{10, 5, 15};
inline constexpr float_format bfloat16{7, 8, 127};
inline constexpr float_format binary32{23, 8, 127};

/// Rounds x to the nearest value of `format` (ties to even), with gradual underflow. Returns
/// nullopt when a finite x rounds beyond the largest finite value. NaN and infinities pass through.
inline std::optional<double> round_to_format(double x, float_format format) {
  if (!std::isfinite(x) || x == 0) return x;
  const int min_exponent = 2 - (1 << (format.exponent_bits - 1));  // of the smallest normal
  const int exponent = std::max(std::ilogb(x), min_exponent);
  // x scaled so that one unit is one step of the format at this exponent: exact (power of 2).
  const double steps = std::nearbyint(std::ldexp(x, format.mantissa_bits - exponent));
  const double rounded = std::ldexp(steps, exponent - format.mantissa_bits);
  const double largest =
      std::ldexp(2.0 - std::ldexp(1.0, -format.mantissa_bits), format.max_exponent);
  if (std::fabs(rounded) > largest) return std::nullopt;
  return rounded;
}

inline float half_to_float(std::uint16_t h) noexcept {
  const std::uint32_t sign = std::uint32_t(h >> 15) << 31;
  const std::uint32_t exponent = (h >> 10) & 0x1f;
  const std::uint32_t mantissa = h & 0x3ff;
  if (exponent == 0) {  // zero or subnormal: mantissa * 2^-24, exact in float
    const float magnitude = std::ldexp(float(mantissa), -24);
    return sign ? -magnitude : magnitude;
  }
  if (exponent == 31) return std::bit_cast<float>(sign | 0x7f800000u | (mantissa << 13));
  return std::bit_cast<float>(sign | ((exponent + 127 - 15) << 23) | (mantissa << 13));
}

inline float bfloat16_to_float(std::uint16_t b) noexcept {
  return std::bit_cast<float>(std::uint32_t(b) << 16);
}

/// F8_E5M2 is the upper byte of a binary16.
inline float f8_e5m2_to_float(std::uint8_t v) noexcept { return half_to_float(std::uint16_t(v << 8)); }

/// F8_E4M3 in its "fn" variant (as PyTorch's float8_e4m3fn): bias 7, no infinities, and
/// S.1111.111 is NaN.
inline float f8_e4m3_to_float(std::uint8_t v) noexcept {
  const bool negative = v & 0x80;
  const int exponent = (v >> 3) & 0xf;
  const int mantissa = v & 0x7;
  float magnitude;
  if (exponent == 0xf && mantissa == 0x7)
    magnitude = std::numeric_limits<float>::quiet_NaN();
  else if (exponent == 0)
    magnitude = std::ldexp(float(mantissa), -9);
  else
    magnitude = std::ldexp(float(8 + mantissa), exponent - 7 - 3);
  return negative ? -magnitude : magnitude;
}

/// Encodes a value already representable in binary16 (from round_to_format) or a NaN/infinity.
inline std::uint16_t encode_half(double v) noexcept {
  const std::uint16_t sign = std::signbit(v) ? 0x8000 : 0;
  if (std::isnan(v)) return sign | 0x7e00;
  if (std::isinf(v)) return sign | 0x7c00;
  const double magnitude = std::fabs(v);
  if (magnitude == 0) return sign;
  const int exponent = std::ilogb(magnitude);
  if (exponent < -14) return sign | std::uint16_t(std::ldexp(magnitude, 24));  // subnormal
  const auto fraction = std::uint16_t(std::ldexp(magnitude, 10 - exponent) - 1024);
  return sign | std::uint16_t((exponent + 15) << 10) | fraction;
}

/// Encodes a value already representable in bfloat16 (from round_to_format) or a NaN/infinity.
inline std::uint16_t encode_bfloat16(double v) noexcept {
  if (std::isnan(v)) return std::signbit(v) ? 0xffc0 : 0x7fc0;
  return std::uint16_t(std::bit_cast<std::uint32_t>(static_cast<float>(v)) >> 16);
}

}  // namespace bitnet::detail
