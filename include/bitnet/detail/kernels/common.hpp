// What every kernel shares: the call's arguments, the packed tile geometry (pack.hpp), and the
// calling thread's reusable scratch memory.
#pragma once

#include <cstddef>
#include <cstdint>
#include <cstring>

#include <Eigen/Core>

#include "../aligned_allocator.hpp"
#include "cpu_features.hpp"

namespace bitnet::detail {

/// One product of packed ternary weights (pack.hpp) with int8 activations:
///   acc[b * rows + o] = sum_k x[b * x_stride + k] * w(o, k)   for the rows of the blocks asked for.
/// The kernels compute sum_k x * (w + 1) from the codes c = w + 1 and subtract x_sums[b] = sum_k x[b, k].
/// x rows are zero-padded to x_stride columns (packed_ternary::padded_cols) and 64-byte aligned.
///
/// Grouped calls (groups > 1, group-scaled layers): every group of G = 16 col_tiles columns of a
/// row block is a "virtual block" of its own. Virtual block v = rb * groups + j is group j of row
/// block rb: its tiles start at weights + v * col_tiles * 64 (the same formula: pack.hpp stores a
/// row block's groups one after the other), it multiplies columns [j G, (j + 1) G) of each token,
/// and subtracts x_sums[b * groups + j], the sum of those activations. rows = virtual rows =
/// row blocks * groups * 16, and acc[b * rows + v * 16 + r] is the group's exact int32 sum
/// (padding rows and all-padding groups included: they are 0 up to the x_sums subtracted).
struct gemm_args {
  const std::uint8_t* weights;  // packed_ternary::data()
  Eigen::Index col_tiles;       // 64-byte tiles per (virtual) block
  Eigen::Index rows;            // the real output rows, or the virtual rows of a grouped call (acc's row stride)
  const std::int8_t* x;
  Eigen::Index x_stride;
  const std::int32_t* x_sums;   // batch (ungrouped) or batch x groups
  Eigen::Index batch;
  std::int32_t* acc;            // batch x rows
  Eigen::Index groups = 1;      // virtual blocks per row block: padded_cols / G, or 1 (ungrouped)
};

/// Batch 1 of a group-scaled float layer with per-token activations, the rescale fused into the
/// product (ternary_gemv_grouped, kernels.hpp): for the rows of row blocks [begin, end)
///   y[o] = float( (sum over groups j ascending, from 0.0, of double(acc_j) * double(d[o, j])) / double(sx) ) + bias[o]
/// with acc_j the exact int32 sum of group j (x_sums[j] subtracted), the formula of
/// rescale_rows_grouped_scalar. The codes are those of a grouped gemm_args (row block rb's group j
/// at weights + (rb * groups + j) * col_tiles * 64); the scales are in the same order
/// (kernel_unit_scales): the 16 rows of row block rb and group j at (rb * groups + j) * 16.
struct grouped_gemv_args {
  const std::uint8_t* weights;  // packed_ternary::data() of a per_group layer
  Eigen::Index col_tiles;       // tiles per group: G / 16, a multiple of 4 (G >= 64)
  Eigen::Index groups;          // groups per row: padded_cols / G
  Eigen::Index rows;            // the layer's out_features
  const std::int8_t* x;         // the token's quantized row, zero-padded to groups * G
  const std::int32_t* x_sums;   // groups: the sum of each group's activation codes
  const void* scales;           // kernel_unit_scales::data(): binary16 if half_scales, else float
  bool half_scales;
  float sx;                     // the token's activation scale
  const float* bias;            // rows, or nullptr
  float* y;                     // rows
};

/// The column where virtual block v's activations start in a token's row (0 when ungrouped).
inline Eigen::Index group_column(const gemm_args& a, Eigen::Index v) noexcept {
  return a.groups == 1 ? 0 : v % a.groups * a.col_tiles * 16;
}

/// The activation sum virtual block v subtracts for `token`.
inline std::int32_t group_x_sum(const gemm_args& a, Eigen::Index v, Eigen::Index token) noexcept {
  return a.groups == 1 ? a.x_sums[token] : a.x_sums[token * a.groups + v % a.groups];
}

inline constexpr Eigen::Index tile_rows = 16;   // packed_ternary::block_rows
inline constexpr Eigen::Index tile_cols = 16;   // packed_ternary::tile_cols
inline constexpr Eigen::Index tile_bytes = 64;  // packed_ternary::tile_bytes
inline constexpr Eigen::Index group_cols = 4;   // columns of one plane of one row (a 32-bit lane)

inline std::int32_t load_u32(const void* p) noexcept {
  std::int32_t v;
  std::memcpy(&v, p, sizeof v);
  return v;
}

/// The scratch buffers a kernel call reuses, one of each per thread.
enum class scratch_slot {
  activations, scales, sums, accumulators, normed, interleaved, token_tail, unpacked,
  part_tokens,  // batch 1 over several threads: each part's own quantized token (kernels.hpp, part_tokens)
};

/// The calling thread's buffer `Slot`, at least `bytes` long and 64-byte aligned. It grows and
/// never shrinks, so calls of a steady shape allocate nothing; a failed growth throws bad_alloc and
/// leaves no buffer behind. The pointer is valid until the thread asks for the same slot again.
template <scratch_slot Slot>
std::byte* thread_scratch(std::size_t bytes) {
  thread_local aligned_vector<std::byte> buffer;
  if (buffer.size() < bytes) {
    aligned_vector<std::byte>().swap(buffer);
    buffer.resize(bytes);
  }
  return buffer.data();
}

template <class U, scratch_slot Slot>
U* thread_scratch_of(std::size_t count) {
  return reinterpret_cast<U*>(thread_scratch<Slot>(count * sizeof(U)));
}

}  // namespace bitnet::detail
