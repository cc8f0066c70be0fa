// The scalar kernels. ternary_gemm_reference defines the answer on plain int8 codes; the packed
// scalar kernel and every SIMD kernel must reproduce it exactly (int32, bit for bit).
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>

#include <Eigen/Core>

#include "../../quant.hpp"
#include "common.hpp"

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

inline namespace BITNET_TU_ISA {

/// The packed layout read the plain way: row j of block g, plane p of tile kt, byte c is the code
/// of column 16 kt + 4 p + c (of the block's group, for a grouped call).
inline void ternary_gemm_scalar(const gemm_args& a, Eigen::Index block_begin, Eigen::Index block_end) noexcept {
  for (Eigen::Index g = block_begin; g < block_end; ++g)
    for (Eigen::Index j = 0; j < tile_rows && g * tile_rows + j < a.rows; ++j)
      for (Eigen::Index b = 0; b < a.batch; ++b) {
        const std::int8_t* x = a.x + b * a.x_stride + group_column(a, g);
        std::int32_t sum = 0;  // |sum| <= 2 * 128 * padded in < 2^31 (max_in_features)
        for (Eigen::Index kt = 0; kt < a.col_tiles; ++kt) {
          const std::uint8_t* lane = a.weights + (g * a.col_tiles + kt) * tile_bytes + j * group_cols;
          for (int p = 0; p < 4; ++p)
            for (int c = 0; c < group_cols; ++c)
              sum += std::int32_t((lane[c] >> (2 * p)) & 3) * x[kt * tile_cols + p * group_cols + c];
        }
        a.acc[b * a.rows + g * tile_rows + j] = sum - group_x_sum(a, g, b);
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

/// y[b, o] = T(double(acc[b, o]) / (double(sx[b]) * double(sw))) + bias[o] for o in [0, cols), the
/// one rescale of BitLinear: the product of the scales in double is exact for float scales, one
/// rounding to T, then the bias added in T. acc's rows are acc_stride apart, y's y_stride (a
/// column range of a call's outputs is acc + c, bias + c, y + c). The SIMD rescales compute
/// exactly this.
template <class T>
void rescale_rows_scalar(const std::int32_t* acc, Eigen::Index acc_stride, Eigen::Index batch, Eigen::Index cols,
                         const T* sx, T sw, const T* bias, T* y, Eigen::Index y_stride) noexcept {
  for (Eigen::Index b = 0; b < batch; ++b) {
    const double inverse_scale = 1.0 / (double(sx[b]) * double(sw));
    const std::int32_t* row_acc = acc + b * acc_stride;
    T* row_y = y + b * y_stride;
    if (bias)
      for (Eigen::Index o = 0; o < cols; ++o) row_y[o] = static_cast<T>(double(row_acc[o]) * inverse_scale) + bias[o];
    else
      for (Eigen::Index o = 0; o < cols; ++o) row_y[o] = static_cast<T>(double(row_acc[o]) * inverse_scale);
  }
}

/// The rescale of a group-scaled layer (units of G columns, virtual blocks of kernels.hpp), output
/// rows [row_begin, row_end) of `batch` tokens. acc: a grouped call's accumulators (row stride
/// acc_stride = virtual rows; group j of row o at (o / 16 * kernel_groups + j) * 16 + o % 16);
/// d: the unit scales (magnitudes), out x groups row-major; groups = ceil(in / G) <= kernel_groups
/// (the groups past it are all padding). In double, j ascending from 0.0 (docs/quantization.md,
/// "Group scales: kernels"):
///   per token (sx[b]):      y[b, o] = T((sum_j acc_j d[o, j]) / sx[b]) + bias[o]
///   per block (sx[b, j]):   y[b, o] = T(sum_j (acc_j d[o, j]) / sx[b * groups + j]) + bias[o]
/// The products acc_j d are exact (an int32 times a float, or a double-rounded bf16 / half), the
/// sums are not: the fixed order makes every ISA and thread count give the same bits.
template <class T>
void rescale_rows_grouped_scalar(const std::int32_t* acc, Eigen::Index acc_stride, Eigen::Index batch,
                                 Eigen::Index row_begin, Eigen::Index row_end, Eigen::Index kernel_groups,
                                 Eigen::Index groups, const T* d, const T* sx, bool per_block, const T* bias, T* y,
                                 Eigen::Index y_stride) noexcept {
  for (Eigen::Index b = 0; b < batch; ++b) {
    const std::int32_t* row_acc = acc + b * acc_stride;
    for (Eigen::Index o = row_begin; o < row_end; ++o) {
      const std::int32_t* unit = row_acc + o / tile_rows * kernel_groups * tile_rows + o % tile_rows;
      const T* row_d = d + o * groups;
      double sum = 0.0;
      if (per_block)
        for (Eigen::Index j = 0; j < groups; ++j)
          sum += double(unit[j * tile_rows]) * double(row_d[j]) / double(sx[b * groups + j]);
      else {
        for (Eigen::Index j = 0; j < groups; ++j) sum += double(unit[j * tile_rows]) * double(row_d[j]);
        sum /= double(sx[b]);
      }
      y[b * y_stride + o] = bias ? static_cast<T>(sum) + bias[o] : static_cast<T>(sum);
    }
  }
}

}  // namespace BITNET_TU_ISA
}  // namespace bitnet::detail
