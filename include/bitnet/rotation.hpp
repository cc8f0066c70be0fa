// bitnet/rotation.hpp - the blockwise Walsh-Hadamard input rotation of rotated ternary models
// (Ternary Bonsai 2; QuaRot, BitNet v2), applied with a fast Walsh-Hadamard transform.
//
//   R = blockdiag(H_b / sqrt(b), ..., H_b / sqrt(b)) * diag(s)      (n x n, n = in_features)
//
// H_b is the Sylvester-ordered Hadamard matrix (H_1 = [1], H_2k = [[H_k, H_k], [H_k, -H_k]], so
// H_b[i][j] = (-1)^popcount(i & j)), b a power of two that divides n, s a vector of n signs +-1.
// The sign flip comes FIRST, then the normalized Hadamard transform of each block of b consecutive
// inputs: R x = H (s . x), the convention of PrismML's llama.cpp fork (docs/rotation.md has the
// sources and how GGUF files and Hugging Face folders declare it). R is orthogonal and
// R^{-1} = R^T = diag(s) * blockdiag(H_b / sqrt(b)): H_b is symmetric and H_b^2 = b I.
//
// A model stored in the rotated basis holds W' = W R^T (fold()); its layer computes
// y = W' (R x) = W x, so the runtime rotates each token with apply() before the product.
// The transform costs n log2(b) additions and 2n multiplications per token, never a dense matrix;
// detail/kernels/fwht.hpp has the exact operation order, which every ISA follows bit for bit.
#pragma once

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <string>
#include <string_view>
#include <type_traits>
#include <utility>
#include <vector>

#include "detail/kernels/fwht.hpp"
#include "detail/kernels/thread_pool.hpp"
#include "detail/validate.hpp"
#include "errors.hpp"
#include "kernels.hpp"
#include "matrix.hpp"

namespace bitnet {

namespace detail {
inline namespace BITNET_TU_ISA {

/// One row of the transform on the kernels of `which` (x86: avx2, avx512 and amx use the AVX2 and
/// AVX-512 code; ARM: neon, dotprod and i8mm the NEON code).
template <class T>
void fwht_row(isa which, const T* x, T* out, Index n, Index b, const T* scale, bool inverse) noexcept {
#ifdef BITNET_X86
  if (which == isa::avx512 || which == isa::amx) {
    if constexpr (std::is_same_v<T, float>) return fwht_row_avx512<fwht_avx512_f32>(x, out, n, b, scale, inverse);
    else return fwht_row_avx512<fwht_avx512_f64>(x, out, n, b, scale, inverse);
  }
  if (which == isa::avx2) {
    if constexpr (std::is_same_v<T, float>) return fwht_row_avx2<fwht_avx2_f32>(x, out, n, b, scale, inverse);
    else return fwht_row_avx2<fwht_avx2_f64>(x, out, n, b, scale, inverse);
  }
#elif defined(BITNET_ARM64)
  if (which == isa::neon || which == isa::dotprod || which == isa::i8mm) {
    if constexpr (std::is_same_v<T, float>) return fwht_row_neon<fwht_neon_f32>(x, out, n, b, scale, inverse);
    else return fwht_row_neon<fwht_neon_f64>(x, out, n, b, scale, inverse);
  }
#endif
  fwht_row_scalar(x, out, n, b, scale, inverse);
}

/// fwht_row for `rows` rows, shared out over up to `threads` threads when each gets enough values
/// (each row is transformed whole by one thread, so the split never changes a result).
template <class T>
void fwht_rows(isa which, const T* x, Index rows, Index x_stride, T* out, Index out_stride, Index n, Index b,
               const T* scale, bool inverse, int threads) noexcept {
  struct split {
    isa which;
    const T* x;
    Index x_stride;
    T* out;
    Index out_stride, n, b;
    const T* scale;
    bool inverse;
    Index rows, per_part;
    void range(Index begin, Index end) const noexcept {
      for (Index r = begin; r < end; ++r) fwht_row(which, x + r * x_stride, out + r * out_stride, n, b, scale, inverse);
    }
    static void run_part(const void* self, Index part) noexcept {
      const split& s = *static_cast<const split*>(self);
      s.range(part * s.per_part, std::min((part + 1) * s.per_part, s.rows));
    }
  };
  // A part below ~64K values costs more to hand over than it saves (as for quantize_rows).
  const Index parts = std::clamp<Index>(rows * n / (Index{1} << 16), 1, std::max<Index>(1, std::min<Index>(threads, rows)));
  const split job{which, x, x_stride, out, out_stride, n, b, scale, inverse, rows, (rows + parts - 1) / parts};
  if (parts == 1) return job.range(0, rows);
  thread_pool::instance().run((rows + job.per_part - 1) / job.per_part, split::run_part, &job);
}

}  // namespace BITNET_TU_ISA
}  // namespace detail

/// The rotation R = blockdiag(H_b / sqrt(b)) * diag(signs) of a layer's n inputs (see the top of
/// this file). A value type: copyable, comparable, immutable once built.
class hadamard_rotation {
 public:
  static constexpr Index min_block_size = 2;
  static constexpr Index max_block_size = 32768;

  /// R with these signs (in_features = signs.size()). Throws value_error if block_size is not a
  /// power of two in [2, 32768] or a sign is not +1 or -1 (naming its index), shape_error if there
  /// are no signs or their count is not a multiple of block_size: the transform works on whole
  /// blocks, and a ragged last block would not be a Hadamard transform (the published models pick
  /// a block that divides every width, e.g. 1024 for 5120, 6144 and 17408).
  hadamard_rotation(Index block_size, std::vector<std::int8_t> signs)
      : block_size_(block_size), signs_(std::move(signs)) {
    if (block_size_ < min_block_size || block_size_ > max_block_size || (block_size_ & (block_size_ - 1)) != 0)
      throw value_error("hadamard_rotation: block size " + std::to_string(block_size_) +
                        " is not a power of two in [2, 32768]");
    const Index n = in_features();
    if (n == 0) throw shape_error("hadamard_rotation: no signs (in_features must be a positive multiple of the block size)");
    if (n % block_size_ != 0)
      throw shape_error("hadamard_rotation: in_features " + std::to_string(n) + " is not a multiple of block size " +
                        std::to_string(block_size_) + " (a blockwise rotation needs whole blocks; use a block size that divides " +
                        std::to_string(n) + ")");
    for (std::size_t k = 0; k < signs_.size(); ++k)
      if (signs_[k] != 1 && signs_[k] != -1)
        throw value_error("hadamard_rotation: sign " + std::to_string(k) + " is " + std::to_string(int(signs_[k])) +
                          ", must be +1 or -1");
    const double norm = 1.0 / std::sqrt(double(block_size_));
    scale_f_.resize(signs_.size());
    scale_d_.resize(signs_.size());
    for (std::size_t k = 0; k < signs_.size(); ++k) {
      scale_d_[k] = signs_[k] * norm;
      scale_f_[k] = signs_[k] * float(norm);
    }
  }

  /// R with every sign +1 (a file's sign_mode "identity").
  static hadamard_rotation identity_signs(Index in_features, Index block_size) {
    if (in_features <= 0)
      throw shape_error("hadamard_rotation::identity_signs: in_features must be positive, got " + std::to_string(in_features));
    return hadamard_rotation(block_size, std::vector<std::int8_t>(std::size_t(in_features), 1));
  }

  /// R with pseudo-random signs (QuaRot's randomized Hadamard transform), the same on every
  /// platform for a seed: sign k is -1 when the top bit of the k-th output of SplitMix64 (Steele,
  /// Lea and Flood 2014) started at `seed` is set.
  static hadamard_rotation random_signs(Index in_features, Index block_size, std::uint64_t seed) {
    if (in_features <= 0)
      throw shape_error("hadamard_rotation::random_signs: in_features must be positive, got " + std::to_string(in_features));
    std::vector<std::int8_t> signs(static_cast<std::size_t>(in_features));
    std::uint64_t state = seed;
    for (std::int8_t& s : signs) {
      std::uint64_t z = (state += 0x9e3779b97f4a7c15ull);
      z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
      z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
      z ^= z >> 31;
      s = (z >> 63) != 0 ? std::int8_t(-1) : std::int8_t(1);
    }
    return hadamard_rotation(block_size, std::move(signs));
  }

  Index block_size() const noexcept { return block_size_; }
  Index in_features() const noexcept { return Index(signs_.size()); }
  const std::vector<std::int8_t>& signs() const noexcept { return signs_; }

  /// out_r = R x_r for `rows` rows of in_features() values (row strides x_stride, out_stride),
  /// on the kernels of `which` (every ISA gives the same bits), over up to `threads` threads.
  /// The hot path, unchecked: `which` must be supported by this CPU (isa_supported), strides
  /// >= in_features(), out either equal to x (in place) or not overlapping it. Non-finite inputs
  /// propagate through their block; a finite input can overflow only past max(T) / sqrt(b).
  template <real_scalar T>
  void apply_rows(isa which, const T* x, Index rows, Index x_stride, T* out, Index out_stride,
                  int threads = 1) const noexcept {
    detail::fwht_rows(which, x, rows, x_stride, out, out_stride, in_features(), block_size_, scale_of<T>(), false, threads);
  }

  /// out_r = R^T z_r (the inverse), same contract as apply_rows.
  template <real_scalar T>
  void inverse_rows(isa which, const T* z, Index rows, Index z_stride, T* out, Index out_stride,
                    int threads = 1) const noexcept {
    detail::fwht_rows(which, z, rows, z_stride, out, out_stride, in_features(), block_size_, scale_of<T>(), true, threads);
  }

  /// Every row x_r of a batch (batch x in_features) rotated: x R^T, i.e. R x_r per row. On the
  /// active kernels (kernels.hpp) and thread count. Throws shape_error for a column count other
  /// than in_features(), value_error naming the first non-finite input, or an output that
  /// overflowed T.
  template <real_scalar T>
  Matrix<T> apply(const Matrix<T>& x) const {
    return transformed(x, "hadamard_rotation::apply: input", false);
  }

  /// The inverse of apply: z R, i.e. R^T z_r per row. Same checks.
  template <real_scalar T>
  Matrix<T> inverse(const Matrix<T>& z) const {
    return transformed(z, "hadamard_rotation::inverse: input", true);
  }

  /// A dense layer's weights (out x in_features) in the rotated basis: W R^T, so that
  /// (W R^T)(R x) = W x. Row o of W R^T is R w_o: the forward transform of each row.
  /// `what` names the layer in errors. Same checks as apply.
  template <real_scalar T>
  Matrix<T> fold(const Matrix<T>& weight, std::string_view what = "weight") const {
    return transformed(weight, "hadamard_rotation::fold: " + std::string(what), false);
  }

  /// The converse of fold: W' R, the weights of the original basis from rotated ones.
  template <real_scalar T>
  Matrix<T> unfold(const Matrix<T>& weight, std::string_view what = "weight") const {
    return transformed(weight, "hadamard_rotation::unfold: " + std::string(what), true);
  }

  friend bool operator==(const hadamard_rotation& a, const hadamard_rotation& b) noexcept {
    return a.block_size_ == b.block_size_ && a.signs_ == b.signs_;
  }

 private:
  template <class T>
  const T* scale_of() const noexcept {
    if constexpr (std::is_same_v<T, float>) return scale_f_.data();
    else return scale_d_.data();
  }

  template <class T>
  Matrix<T> transformed(const Matrix<T>& x, const std::string& what, bool inverse) const {
    if (x.cols() != in_features())
      throw shape_error(what + " has " + std::to_string(x.cols()) + " columns, the rotation has in_features " +
                        std::to_string(in_features()));
    detail::require_finite(x, what);
    Matrix<T> out(x.rows(), x.cols());
    if (x.rows() == 0) return out;
    detail::fwht_rows(active_isa(), x.data(), x.rows(), x.cols(), out.data(), out.cols(), in_features(), block_size_,
                      scale_of<T>(), inverse, num_threads());
    if (!out.allFinite())
      throw value_error(what + ": the rotated values overflow (an input magnitude is near the largest finite value)");
    return out;
  }

  Index block_size_;
  std::vector<std::int8_t> signs_;
  std::vector<float> scale_f_;   // signs_[k] * float(1 / sqrt(b)): the forward pre-scale, the inverse post-scale
  std::vector<double> scale_d_;  // the same in double
};

}  // namespace bitnet
