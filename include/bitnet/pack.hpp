// bitnet/pack.hpp - the packed ternary weight format the kernels read (2 bits per weight).
//
// A ternary matrix W (out x in, values {-1, 0, +1}) is stored as codes c = w + 1 in {0, 1, 2}:
//
//   * rows are grouped in blocks of 16 (block_rows); the last block is padded with zero weights;
//   * columns are padded with zero weights to a multiple of col_alignment(): 64 (block_cols) by
//     default; a group-scaled layer (group size G) packs with max(64, G), so every group of G
//     columns is a whole number of tiles and every row block has the same number of groups;
//   * a tile is 16 rows x 16 columns in 64 bytes: byte 4 * j + c (row j of the block, c in 0..3)
//     holds the code of the tile's column 4 * p + c in bits 2p and 2p + 1 ("plane" p = 0..3);
//   * the tiles of a row block follow each other along the columns, so each row block is one
//     sequential stream, and the row blocks follow each other.
//
// Why: one 512-bit load is a whole tile, one 32-bit lane per row. Plane p, extracted with a shift
// and an AND, is 16 rows x 4 consecutive columns: exactly what vpdpbusd (or SDOT, per 128 bits)
// multiplies with one broadcast 4-byte group of a token's activations, so a token's activations
// are read 4 bytes at a time and shared by 16 rows, and an unpacked plane is shared by every token.
// Sixteen unpacked planes (64 columns) are also one AMX-INT8 B tile as they stand.
//
// Byte of (row r, column k):  (r / 16 * (padded_cols / 16) + k / 16) * 64 + r % 16 * 4 + k % 4,
// bits 2 * (k % 16 / 4) and up. Storage: padded_rows * padded_cols / 4 bytes, 64-byte aligned.
//
// Groups: the tiles of a row block follow each other along the columns, so group j (columns
// [j G, (j + 1) G)) of row block rb is tiles [j G / 16, (j + 1) G / 16) of its stream: the kernels
// read each group as a "virtual block" of G / 16 tiles (kernels.hpp, docs/kernels.md) with no
// change to the layout.
#pragma once

#include <cstddef>
#include <cstdint>
#include <string>
#include <type_traits>

#include <Eigen/Core>

#include "detail/aligned_allocator.hpp"
#include "detail/validate.hpp"
#include "errors.hpp"
#include "matrix.hpp"

namespace bitnet {

class packed_ternary {
 public:
  static constexpr Index block_rows = 16;
  static constexpr Index block_cols = 64;
  static constexpr Index tile_cols = 16;   // columns of one 64-byte tile
  static constexpr Index group_cols = 4;   // consecutive columns of a row in one plane (one byte each when unpacked)
  static constexpr Index tile_bytes = block_rows * tile_cols / 4;

  /// An empty (0 x 0) matrix.
  packed_ternary() = default;

  /// The largest column alignment: the largest group size of a group-scaled layer.
  static constexpr Index max_col_alignment = 256;

  /// Packs ternary codes (out x in, each -1, 0 or +1), columns padded to a multiple of
  /// col_alignment (a power of two in [64, 256]). Throws shape_error for an empty matrix and
  /// value_error naming the first code outside {-1, 0, +1} or a bad alignment.
  template <class Derived>
  explicit packed_ternary(const Eigen::MatrixBase<Derived>& codes, Index col_alignment = block_cols) {
    static_assert(std::is_same_v<typename Derived::Scalar, std::int8_t>,
                  "packed_ternary: codes must be an int8 matrix");
    if (col_alignment < block_cols || col_alignment > max_col_alignment || (col_alignment & (col_alignment - 1)) != 0)
      throw value_error("packed_ternary: column alignment " + std::to_string(col_alignment) +
                        " is not a power of two in [64, 256]");
    detail::require_non_empty(codes, "packed_ternary: codes");
    col_alignment_ = col_alignment;
    rows_ = codes.rows();
    cols_ = codes.cols();
    // Padding holds code 1 (weight 0): 0b01010101 per byte.
    bytes_.assign(std::size_t(padded_rows() * padded_cols() / 4), std::uint8_t{0x55});
    // One pass, a byte (4 codes of one row, one per plane) at a time; a code outside {-1, 0, 1}
    // is noted and reported after the pass (this runs after every optimizer step when fine-tuning).
    const Index full_tiles = cols_ / tile_cols;
    bool all_ternary = true;
    for (Index r = 0; r < rows_; ++r) {
      std::uint8_t* lane = bytes_.data() + r / block_rows * col_tiles() * tile_bytes + r % block_rows * group_cols;
      for (Index kt = 0; kt < full_tiles; ++kt, lane += tile_bytes)
        for (Index c = 0; c < group_cols; ++c) {
          unsigned byte = 0;
          for (int p = 0; p < 4; ++p) {
            const unsigned code = unsigned(codes.coeff(r, kt * tile_cols + p * group_cols + c) + 1);
            all_ternary = all_ternary && code <= 2;
            byte |= (code & 3) << (2 * p);
          }
          lane[c] = std::uint8_t(byte);
        }
      for (Index col = full_tiles * tile_cols; col < cols_; ++col) {  // the last, partial tile
        const unsigned code = unsigned(codes.coeff(r, col) + 1);
        all_ternary = all_ternary && code <= 2;
        std::uint8_t& byte = lane[col % group_cols];
        const int shift = shift_of(col);
        byte = std::uint8_t((byte & ~(3u << shift)) | ((code & 3) << shift));
      }
    }
    if (!all_ternary)
      for (Index r = 0; r < codes.rows(); ++r)
        for (Index c = 0; c < codes.cols(); ++c)
          if (const int v = codes.coeff(r, c); v < -1 || v > 1)
            throw value_error("packed_ternary: code " + std::to_string(v) + " at row " + std::to_string(r) +
                              ", column " + std::to_string(c) + " is not -1, 0 or +1");
  }

  Index rows() const noexcept { return rows_; }
  Index cols() const noexcept { return cols_; }
  Index padded_rows() const noexcept { return round_up(rows_, block_rows); }
  Index padded_cols() const noexcept { return round_up(cols_, col_alignment_); }
  /// The multiple the columns are padded to: 64, or a group-scaled layer's max(64, G).
  Index col_alignment() const noexcept { return col_alignment_; }
  Index row_blocks() const noexcept { return padded_rows() / block_rows; }
  /// Tiles per row block (padded_cols / 16).
  Index col_tiles() const noexcept { return padded_cols() / tile_cols; }

  /// The packed bytes in the layout above (size_bytes() of them).
  const std::uint8_t* data() const noexcept { return bytes_.data(); }
  std::size_t size_bytes() const noexcept { return bytes_.size(); }
  /// Heap bytes held (the buffer's capacity).
  std::size_t capacity_bytes() const noexcept { return bytes_.capacity(); }

  /// The code -1, 0 or +1 at (row, col); both must be in range.
  std::int8_t operator()(Index row, Index col) const noexcept {
    return std::int8_t(((bytes_[offset(row, col)] >> shift_of(col)) & 3) - 1);
  }

  /// The ternary codes, out x in: the exact inverse of the packing constructor.
  Matrix<std::int8_t> unpack() const {
    Matrix<std::int8_t> codes(rows_, cols_);
    for (Index r = 0; r < rows_; ++r)
      for (Index c = 0; c < cols_; ++c) codes(r, c) = (*this)(r, c);
    return codes;
  }

  friend bool operator==(const packed_ternary&, const packed_ternary&) = default;

 private:
  static Index round_up(Index n, Index block) noexcept { return (n + block - 1) / block * block; }
  static int shift_of(Index col) noexcept { return int(col % tile_cols / group_cols) * 2; }
  std::size_t offset(Index row, Index col) const noexcept {
    return std::size_t((row / block_rows * col_tiles() + col / tile_cols) * tile_bytes +
                       row % block_rows * group_cols + col % group_cols);
  }

  Index rows_ = 0;
  Index cols_ = 0;
  Index col_alignment_ = block_cols;
  detail::weight_vector<std::uint8_t> bytes_;
};

}  // namespace bitnet
