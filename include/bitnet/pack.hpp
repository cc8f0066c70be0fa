// bitnet/pack.hpp - the packed ternary weight format the kernels read (2 bits per weight).
//
// A ternary matrix W (out x in, values {-1, 0, +1}) is stored as codes c = w + 1 in {0, 1, 2}:
//
//   * rows are grouped in blocks of 4 (block_rows); the last block is padded with zero weights;
//   * columns are grouped in blocks of 128 (block_cols); the last block is padded with zero weights;
//   * one (row block, column block) tile is 4 x 32 bytes, row after row, and the tiles of a row block
//     follow each other, so each row block is one sequential stream;
//   * inside a row's 32 bytes, byte i holds the codes of columns i, i+32, i+64 and i+96 of the
//     column block in bits 0-1, 2-3, 4-5 and 6-7 ("planes"): a 32-byte vector load, a shift and an
//     AND give 32 consecutive codes, which meet 32 consecutive int8 activations.
//
// Byte of (row r, column k):  ((r / 4 * column_blocks + k / 128) * 4 + r % 4) * 32 + k % 32,
// bits 2 * (k % 128 / 32) and up. Storage: padded_rows * padded_cols / 4 bytes, 64-byte aligned.
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
  static constexpr Index block_rows = 4;
  static constexpr Index block_cols = 128;
  static constexpr Index plane_cols = 32;  // columns per 2-bit plane = bytes per row of a tile
  static constexpr Index tile_bytes = block_rows * plane_cols;

  /// An empty (0 x 0) matrix.
  packed_ternary() = default;

  /// Packs ternary codes (out x in, each -1, 0 or +1). Throws shape_error for an empty matrix and
  /// value_error naming the first code outside {-1, 0, +1}.
  template <class Derived>
  explicit packed_ternary(const Eigen::MatrixBase<Derived>& codes) {
    static_assert(std::is_same_v<typename Derived::Scalar, std::int8_t>,
                  "packed_ternary: codes must be an int8 matrix");
    detail::require_non_empty(codes, "packed_ternary: codes");
    for (Index r = 0; r < codes.rows(); ++r)
      for (Index c = 0; c < codes.cols(); ++c) {
        const int v = codes.coeff(r, c);
        if (v < -1 || v > 1)
          throw value_error("packed_ternary: code " + std::to_string(v) + " at row " + std::to_string(r) +
                            ", column " + std::to_string(c) + " is not -1, 0 or +1");
      }
    rows_ = codes.rows();
    cols_ = codes.cols();
    // Padding holds code 1 (weight 0): 0b01010101 per byte.
    bytes_.assign(std::size_t(padded_rows() * padded_cols() / 4), std::uint8_t{0x55});
    for (Index r = 0; r < rows_; ++r)
      for (Index c = 0; c < cols_; ++c) {
        std::uint8_t& byte = bytes_[offset(r, c)];
        const int shift = shift_of(c);
        byte = std::uint8_t((byte & ~(3 << shift)) | ((codes.coeff(r, c) + 1) << shift));
      }
  }

  Index rows() const noexcept { return rows_; }
  Index cols() const noexcept { return cols_; }
  Index padded_rows() const noexcept { return round_up(rows_, block_rows); }
  Index padded_cols() const noexcept { return round_up(cols_, block_cols); }
  Index row_blocks() const noexcept { return padded_rows() / block_rows; }
  Index col_blocks() const noexcept { return padded_cols() / block_cols; }

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
  static int shift_of(Index col) noexcept { return int(col % block_cols / plane_cols) * 2; }
  std::size_t offset(Index row, Index col) const noexcept {
    return std::size_t(((row / block_rows * col_blocks() + col / block_cols) * block_rows + row % block_rows) *
                           plane_cols +
                       col % plane_cols);
  }

  Index rows_ = 0;
  Index cols_ = 0;
  detail::aligned_vector<std::uint8_t> bytes_;
};

}  // namespace bitnet
