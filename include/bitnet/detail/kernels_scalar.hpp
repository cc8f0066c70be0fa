// The scalar kernels. ternary_gemm_reference defines the answer on plain int8 codes; the packed
// scalar kernel and every SIMD kernel must reproduce it exactly (int32, bit for bit).
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>

#include <Eigen/Core>

#include "../quant.hpp"
#include "cpu_features.hpp"

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

/// One product of packed ternary weights (see pack.hpp) with int8 activations:
///   acc[b * rows + o] = sum_k x[b * x_stride + k] * w(o, k)   for the rows of blocks [begin, end).
/// The kernels compute sum_k x * (w + 1) from the codes and subtract x_sums[b] = sum_k x[b, k].
/// x rows are zero-padded to col_blocks * 128 and 64-byte aligned (x_stride a multiple of 64).
struct gemm_args {
  const std::uint8_t* weights;  // packed_ternary::data()
  Eigen::Index col_blocks;
  Eigen::Index rows;            // the real output rows (acc's row stride)
  const std::int8_t* x;
  Eigen::Index x_stride;
  const std::int32_t* x_sums;
  Eigen::Index batch;
  std::int32_t* acc;            // batch x rows
};

inline constexpr Eigen::Index tile_cols = 128;  // packed_ternary::block_cols
inline constexpr Eigen::Index tile_rows = 4;    // packed_ternary::block_rows
inline constexpr Eigen::Index plane_bytes = 32; // packed_ternary::plane_cols

inline namespace BITNET_TU_ISA {

inline void ternary_gemm_scalar(const gemm_args& a, Eigen::Index block_begin, Eigen::Index block_end) noexcept {
  for (Eigen::Index g = block_begin; g < block_end; ++g)
    for (Eigen::Index r = 0; r < tile_rows && g * tile_rows + r < a.rows; ++r)
      for (Eigen::Index b = 0; b < a.batch; ++b) {
        const std::int8_t* x = a.x + b * a.x_stride;
        std::int32_t sum = 0;  // |sum| <= 2 * 128 * padded in < 2^31 (max_in_features)
        for (Eigen::Index kb = 0; kb < a.col_blocks; ++kb) {
          const std::uint8_t* tile = a.weights + ((g * a.col_blocks + kb) * tile_rows + r) * plane_bytes;
          for (int plane = 0; plane < 4; ++plane)
            for (Eigen::Index i = 0; i < plane_bytes; ++i)
              sum += std::int32_t((tile[i] >> (2 * plane)) & 3) * x[kb * tile_cols + plane * plane_bytes + i];
        }
        a.acc[b * a.rows + g * tile_rows + r] = sum - a.x_sums[b];
      }
}

/// quantize_activations for one row, into q[0, padded) (zeros after cols), with its scale and
/// the sum of its codes. Returns false, leaving the outputs unspecified, if the row is not finite.
template <class T>
bool quantize_row_scalar(const T* x, Eigen::Index cols, Eigen::Index padded, std::int8_t* q, T& scale,
                         std::int32_t& sum) noexcept {
  T absmax = 0;
  for (Eigen::Index c = 0; c < cols; ++c) {
    if (!std::isfinite(x[c])) return false;
    absmax = std::max(absmax, std::abs(x[c]));
  }
  scale = activation_scale_of(absmax);
  sum = 0;
  for (Eigen::Index c = 0; c < cols; ++c) {
    q[c] = static_cast<std::int8_t>(std::clamp(round_half_even(x[c] * scale), T(-128), T(127)));
    sum += q[c];
  }
  std::fill(q + cols, q + padded, std::int8_t{0});
  return true;
}

}  // namespace BITNET_TU_ISA
}  // namespace bitnet::detail
