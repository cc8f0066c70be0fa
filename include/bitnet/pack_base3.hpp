// bitnet/pack_base3.hpp - the 1.6-bit packed ternary format: five codes per byte (3^5 = 243 <= 256).
//
// The same codes c = w + 1 in {0, 1, 2} as pack.hpp, five to a byte in base 3:
//
//   * rows are grouped in blocks of 16 (block_rows); the last block is padded with zero weights;
//   * columns are padded with zero weights to a multiple of 20 (tile_cols);
//   * a tile is 16 rows x 20 columns in 64 bytes: byte 4 * j + b (row j of the block, b in 0..3) is
//       v = c(4 * 0 + b) + 3 c(4 * 1 + b) + 9 c(4 * 2 + b) + 27 c(4 * 3 + b) + 81 c(4 * 4 + b)
//     of the tile's columns: digit p ("plane" p = 0..4) holds column 4 p + b;
//   * the tiles of a row block follow each other along the columns, and the row blocks follow
//     each other (one sequential stream, as in pack.hpp).
//
// Why: one 512-bit load is a whole tile, one 32-bit lane per row, as in pack.hpp. Plane p is 16
// rows x 4 consecutive columns, what vpdpbusd (or SDOT, per 128 bits) multiplies with one
// broadcast 4-byte group of a token's activations. The kernels reduce v mod 81 (two subtract-and-
// minimum steps), look the four low digits up as one 2-bit byte of pack.hpp (a 128-entry byte
// table: c0 | c1 << 2 | c2 << 4 | c3 << 6, planes 0-3 by an AND each) and take v - (v mod 81) =
// 81 c4 as plane 4 (docs/kernels.md, "1.6-bit storage").
//
// Byte of (row r, column k):  (r / 16 * (padded_cols / 20) + k / 20) * 64 + r % 16 * 4 + k % 4,
// digit k % 20 / 4. Storage: padded_rows * padded_cols / 5 bytes (1.6 bits per weight when the
// columns are a multiple of 20), 64-byte aligned. Group-scaled layers keep pack.hpp's layout: a
// group of 32 to 256 columns is not a whole number of 20-column tiles.
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

/// How a BitLinear stores its ternary codes (bitlinear_options::storage).
enum class weight_storage {
  two_bit,  // pack.hpp: 4 codes a byte, 2 bits per weight (the default)
  base3,    // pack_base3.hpp: 5 codes a byte, 1.6 bits per weight
};

inline std::string storage_name(weight_storage s) { return s == weight_storage::base3 ? "base3" : "two_bit"; }

class packed_base3 {
 public:
  static constexpr Index block_rows = 16;
  static constexpr Index tile_cols = 20;  // columns of one 64-byte tile: 5 planes of 4
  static constexpr Index group_cols = 4;  // consecutive columns of a row in one plane
  static constexpr Index planes = 5;
  static constexpr Index tile_bytes = 64;
  static constexpr std::uint8_t zero_byte = 1 + 3 + 9 + 27 + 81;  // five codes 1 (weight 0)

  /// An empty (0 x 0) matrix.
  packed_base3() = default;

  /// Packs ternary codes (out x in, each -1, 0 or +1). Throws shape_error for an empty matrix and
  /// value_error naming the first code outside {-1, 0, +1}.
  template <class Derived>
  explicit packed_base3(const Eigen::MatrixBase<Derived>& codes) {
    static_assert(std::is_same_v<typename Derived::Scalar, std::int8_t>, "packed_base3: codes must be an int8 matrix");
    detail::require_non_empty(codes, "packed_base3: codes");
    rows_ = codes.rows();
    cols_ = codes.cols();
    bytes_.assign(std::size_t(padded_rows() * padded_cols() / 5), zero_byte);
    // One byte (five codes of one row) at a time; a code outside {-1, 0, 1} is reported by position.
    for (Index r = 0; r < rows_; ++r) {
      std::uint8_t* lane = bytes_.data() + r / block_rows * col_tiles() * tile_bytes + r % block_rows * group_cols;
      for (Index t = 0; t < col_tiles(); ++t, lane += tile_bytes)
        for (Index b = 0; b < group_cols; ++b) {
          int v = 0;
          for (Index p = planes - 1; p >= 0; --p) {
            const Index k = t * tile_cols + p * group_cols + b;
            const int code = k < cols_ ? codes.coeff(r, k) : 0;
            if (code < -1 || code > 1)
              throw value_error("packed_base3: code " + std::to_string(code) + " at row " + std::to_string(r) +
                                ", column " + std::to_string(k) + " is not -1, 0 or +1");
            v = 3 * v + code + 1;
          }
          lane[b] = std::uint8_t(v);
        }
    }
  }

  Index rows() const noexcept { return rows_; }
  Index cols() const noexcept { return cols_; }
  Index padded_rows() const noexcept { return round_up(rows_, block_rows); }
  Index padded_cols() const noexcept { return round_up(cols_, tile_cols); }
  Index row_blocks() const noexcept { return padded_rows() / block_rows; }
  /// Tiles per row block (padded_cols / 20).
  Index col_tiles() const noexcept { return padded_cols() / tile_cols; }

  /// The packed bytes in the layout above (size_bytes() of them).
  const std::uint8_t* data() const noexcept { return bytes_.data(); }
  std::size_t size_bytes() const noexcept { return bytes_.size(); }
  /// Heap bytes held (the buffer's capacity).
  std::size_t capacity_bytes() const noexcept { return bytes_.capacity(); }

  /// The code -1, 0 or +1 at (row, col); both must be in range.
  std::int8_t operator()(Index row, Index col) const noexcept {
    return std::int8_t(bytes_[offset(row, col)] / power_of_3(col) % 3 - 1);
  }

  /// The ternary codes, out x in: the exact inverse of the packing constructor.
  Matrix<std::int8_t> unpack() const {
    Matrix<std::int8_t> codes(rows_, cols_);
    for (Index r = 0; r < rows_; ++r)
      for (Index c = 0; c < cols_; ++c) codes(r, c) = (*this)(r, c);
    return codes;
  }

  friend bool operator==(const packed_base3&, const packed_base3&) = default;

 private:
  static Index round_up(Index n, Index block) noexcept { return (n + block - 1) / block * block; }
  static int power_of_3(Index col) noexcept {
    constexpr int powers[planes] = {1, 3, 9, 27, 81};
    return powers[col % tile_cols / group_cols];
  }
  std::size_t offset(Index row, Index col) const noexcept {
    return std::size_t((row / block_rows * col_tiles() + col / tile_cols) * tile_bytes + row % block_rows * group_cols +
                       col % group_cols);
  }

  Index rows_ = 0;
  Index cols_ = 0;
  detail::weight_vector<std::uint8_t> bytes_;
};

}  // namespace bitnet
