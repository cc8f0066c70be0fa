// The scalar reference kernels. They define the answer every SIMD kernel must reproduce exactly.
#pragma once

#include <cstdint>

#include <Eigen/Core>

namespace bitnet::detail {

/// acc[b * out + o] = sum_k x[b * in + k] * w[o * in + k], exact int32 accumulation.
/// x: batch x in int8 activations, w: out x in ternary codes {-1, 0, +1}, both row-major.
/// Exact while in <= max_in_features (|acc| <= 128 * in < 2^31).
inline void ternary_gemm_reference(const std::int8_t* x, Eigen::Index batch, const std::int8_t* w,
                                   Eigen::Index out, Eigen::Index in, std::int32_t* acc) noexcept {
  for (Eigen::Index b = 0; b < batch; ++b)
    for (Eigen::Index o = 0; o < out; ++o) {
      std::int32_t sum = 0;
      for (Eigen::Index k = 0; k < in; ++k)
        sum += std::int32_t(x[b * in + k]) * std::int32_t(w[o * in + k]);
      acc[b * out + o] = sum;
    }
}

}  // namespace bitnet::detail
