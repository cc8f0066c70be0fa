// bitnet/bit_linear.hpp - the BitNet b1.58 linear layer.
//
//   forward(x) = (xq . wq^T) / (sx * sw) + b
//
// with xq the int8 per-row absmax quantization of norm(x), wq the ternary absmean quantization of
// the latent weight, int32 accumulation and one rescale per output. The ternary weights are
// quantized and packed (pack.hpp, 2 bits each) once, when the weights are set, never in forward();
// forward() runs the kernels chosen at run time (kernels.hpp).
//
// Scale granularity (bitlinear_options::weight_scales): per_tensor is the b1.58 layer above, sw =
// 1 / mean|W|. per_row and per_group give each unit (a row, or group_size consecutive inputs of a
// row; a ragged last group covers its real columns only) a magnitude d = max(mean |w| over the
// unit, 1e-5), the convention of the files (weight = code * d), and forward computes
//
//   y[b,o] = T( sum over groups j, ascending, of double(acc_j) * double(d[o,j]) / double(sx[b]) ) + b[o]
//
// with acc_j the int32 sum of group j (per_block activations: sx[b,j] inside the sum). unit_scales()
// gives the d; from_ternary(codes, unit_scales, ...) and from_exact_ternary() import them exactly.
// bitlinear_options::scale_update says whether new latent weights (set_weight) re-derive the scales
// by absmean (b1.58) or quantize against the scales the layer has (frozen: exact imports).
//
// Inference-only use: release_latent_weights() frees the float latent weights; the layer then
// holds the packed codes (2 bits per weight plus padding), the scale and the bias. from_ternary()
// builds a layer in that same state straight from codes and a scale (a loaded packed checkpoint):
// there never were latent weights. weight() is the only member that needs them: it throws
// state_error in both cases, and ternary_weight() / weight_scale() are then what the layer computes
// with. set_weight() gives the layer new latent weights, so it works in every state.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <optional>
#include <string>
#include <string_view>
#include <type_traits>
#include <utility>
#include <vector>

#include "detail/aligned_allocator.hpp"
#include "detail/validate.hpp"
#include "errors.hpp"
#include "kernels.hpp"
#include "kernels_base3.hpp"
#include "matrix.hpp"
#include "pack.hpp"
#include "pack_base3.hpp"
#include "quant.hpp"
#include "rotation.hpp"

namespace bitnet {

/// What happens to a layer's weight scales when it is given latent weights (constructor, set_weight).
enum class weight_scale_update {
  /// BitNet b1.58: the scales are the absmean of the latent weights (per tensor, row or group),
  /// derived again on every set_weight. The default.
  absmean,
  /// The scales stay those the layer has (from_ternary's, an exact import's, or the absmean of the
  /// weights the layer was first built with) and latent weights quantize against them:
  /// code = clamp(round(w / d), -1, 1) per unit (per_tensor: clamp(round(w * sw), -1, 1); a unit
  /// whose d is 0 gets codes 0). Fine-tuning an imported ternary model then starts from exactly the
  /// imported layer: set_weight(dequantized_weight()) changes nothing. Exact imports
  /// (from_exact_ternary, replace_options::weights = ternary_import::exact, group-scaled GGUF reads)
  /// always give frozen layers.
  frozen,
};

struct bitlinear_options {
  bool rms_norm = false;  // apply RMSNorm (no learnable weight) to the input before quantizing
  double rms_eps = 1e-6;  // RMSNorm epsilon, > 0; used in the layer's precision (float(1e-6) == 1e-6f)
  /// One weight scale per tensor (BitNet b1.58, the default), per output row, or per group of
  /// group_size consecutive inputs of a row (Ternary Bonsai: 128; TQ2_0: 256; Q2_0: 64).
  weight_scaling weight_scales = weight_scaling::per_tensor;
  /// per_group: 32, 64, 128 or 256. Must be 0 otherwise.
  Index group_size = 0;
  /// One int8 activation scale per token (b1.58), or per block of group_size inputs (needs per_group).
  activation_scaling activation_scales = activation_scaling::per_token;
  /// An input rotation R (rotation.hpp: signs, then the normalized Walsh-Hadamard transform per
  /// block), applied to the (normalized) input before its quantization: forward(x) multiplies the
  /// weights by R x. Rotated ternary models (Ternary Bonsai 2) store their weights in that basis; a
  /// dense layer converts to it with rotation->fold(W) (W R^T). Its in_features must be the layer's.
  std::optional<hadamard_rotation> rotation{};
  /// Re-derive the scales from the latent weights on every set_weight (absmean, b1.58) or keep
  /// them (frozen); see weight_scale_update.
  weight_scale_update scale_update = weight_scale_update::absmean;
  /// How the ternary codes are stored: 2 bits each (pack.hpp, the default) or five to a byte
  /// (base3: pack_base3.hpp, 1.6 bits, needs per_tensor scales). forward() is bit-identical for both.
  weight_storage storage = weight_storage::two_bit;
};

/// Tag of the BitLinear constructor that adopts the caller's buffers (see transfer::move).
struct adopt_buffers_t {
  explicit adopt_buffers_t() = default;
};
inline constexpr adopt_buffers_t adopt_buffers{};

template <real_scalar T>
class BitLinear {
 public:
  /// Takes the latent weight (out x in) and optional bias (out). Throws shape_error or
  /// value_error for empty, mis-shaped (in_features > max_in_features) or non-finite input;
  /// nothing is kept then.
  explicit BitLinear(Matrix<T> weight, std::optional<Vector<T>> bias = std::nullopt,
                     bitlinear_options options = {})
      : options_(validated(options)), quantized_(quantize_checked(weight, options_)), weight_(std::move(weight)),
        bias_(validated_bias(std::move(bias), out_features())) {}

  /// Takes over the buffers of `weight` and `bias` without copying them, and only once nothing can
  /// fail any more: if this throws (bad shapes, non-finite values, bad_alloc), `weight` and `bias`
  /// are untouched. On success they are left empty. release() gives the buffers back.
  BitLinear(adopt_buffers_t, Matrix<T>& weight, std::optional<Vector<T>>& bias, bitlinear_options options = {})
      : options_(validated(options)),
        quantized_((check_bias(bias, weight.rows()), quantize_checked(weight, options_))),
        weight_(std::move(weight)),
        bias_(std::move(bias)) {}

  /// A layer that computes with the ternary `codes` (out x in, each -1, 0 or +1) and the weight
  /// scale sw = `scale` (forward = (xq . codes^T) / (sx * sw) + b), without latent weights: the
  /// state after release_latent_weights(), and what a loaded packed checkpoint gives. forward() is
  /// bit-identical to that of any layer built from latent weights that quantize to these codes and
  /// this scale. Throws shape_error for empty codes, in_features > max_in_features or a bias of the
  /// wrong size, and value_error for a code outside {-1, 0, +1} (naming its row and column), a
  /// scale that is not finite and > 0, or a non-finite bias.
  template <class Derived>
  static BitLinear from_ternary(const Eigen::MatrixBase<Derived>& codes, T scale,
                                std::optional<Vector<T>> bias = std::nullopt, bitlinear_options options = {}) {
    static_assert(std::is_same_v<typename Derived::Scalar, std::int8_t>,
                  "BitLinear::from_ternary: codes must be an int8 matrix");
    options = validated(options);
    check_shape(codes, "BitLinear::from_ternary: codes");
    check_rotation(options, codes.cols(), "BitLinear::from_ternary");
    for (Index r = 0; r < codes.rows(); ++r)
      for (Index c = 0; c < codes.cols(); ++c)
        if (const int code = codes.coeff(r, c); code < -1 || code > 1)
          throw value_error("BitLinear::from_ternary: code " + std::to_string(code) + " at row " + std::to_string(r) +
                            ", column " + std::to_string(c) + " is not -1, 0 or +1");
    if (!std::isfinite(scale) || !(scale > 0))
      throw value_error("BitLinear::from_ternary: scale " + std::to_string(scale) + " is not finite and > 0");
    if (options.weight_scales != weight_scaling::per_tensor)
      throw value_error("BitLinear::from_ternary: one scale sw needs options.weight_scales per_tensor; a " +
                        detail::scaling_name(options.weight_scales) + " layer takes a matrix of unit scales");
    check_bias(bias, codes.rows());
    return BitLinear(ternary_tag{}, options, packed_per_tensor(codes, scale, options), std::move(bias));
  }

  /// A unit-scaled layer (options.weight_scales per_row or per_group) that computes with `codes`
  /// (out x in, each -1, 0 or +1) times `unit_scales` (out x groups magnitudes d, groups = 1 per
  /// row or ceil(in / group_size): weight(o, c) = codes(o, c) * d(o, c / group_size)), without
  /// latent weights. Throws value_error for per_tensor options (use the scale overload), a bad
  /// group_size, a code outside {-1, 0, +1} or a scale that is not finite and >= 0 (each naming its
  /// row and column / group; a zero scale is a unit of zero weights, as files store it), and
  /// shape_error for empty codes, unit_scales of the wrong shape or a bias of the wrong size.
  template <class Derived>
  static BitLinear from_ternary(const Eigen::MatrixBase<Derived>& codes, Matrix<T> unit_scales,
                                std::optional<Vector<T>> bias = std::nullopt, bitlinear_options options = {}) {
    static_assert(std::is_same_v<typename Derived::Scalar, std::int8_t>,
                  "BitLinear::from_ternary: codes must be an int8 matrix");
    options = validated(options);
    if (options.weight_scales == weight_scaling::per_tensor)
      throw value_error("BitLinear::from_ternary: unit scales need options.weight_scales per_row or per_group; a "
                        "per_tensor layer takes one scale sw (the other overload)");
    check_shape(codes, "BitLinear::from_ternary: codes");
    check_rotation(options, codes.cols(), "BitLinear::from_ternary");
    const Index unit_cols = detail::unit_columns(options.weight_scales, options.group_size, codes.cols());
    const Index groups = detail::unit_count(codes.cols(), unit_cols);
    if (unit_scales.rows() != codes.rows() || unit_scales.cols() != groups)
      throw shape_error("BitLinear::from_ternary: unit_scales is " +
                        detail::shape_string(unit_scales.rows(), unit_scales.cols()) + ", the codes (" +
                        detail::shape_string(codes.rows(), codes.cols()) + ") need " +
                        detail::shape_string(codes.rows(), groups) + " (one scale per row and group)");
    for (Index r = 0; r < unit_scales.rows(); ++r)
      for (Index g = 0; g < groups; ++g)
        if (const T d = unit_scales(r, g); !std::isfinite(d) || d < T(0))
          throw value_error("BitLinear::from_ternary: unit scale " + detail::format_value(d) + " at " +
                            detail::unit_position(r, g, unit_cols, codes.cols()) + " is not finite and >= 0");
    check_bias(bias, codes.rows());
    packed_ternary packed(codes, col_alignment(options));  // throws value_error naming a code outside {-1, 0, +1}
    return BitLinear(ternary_tag{}, options, unit_quantized(std::move(packed), std::move(unit_scales), options),
                     std::move(bias));
  }

  /// The exact import of weights that are already ternary per unit (every nonzero |w| within a row
  /// or group is the same d, as in Ternary Bonsai's unpacked FP16 / BF16 folders): the layer of
  /// from_ternary(codes, unit_scales) with codes = sign(w) and d read off with no rounding, so
  /// codes * d reproduce `weight` exactly (a -0 weight becomes code 0). Throws value_error naming
  /// the row, group, columns and the two differing magnitudes if the weights are not ternary per
  /// unit (never re-quantized), plus the checks of from_ternary; `what` starts the message (a
  /// layer's path, say). The imported scales are the model, so the layer is always
  /// weight_scale_update::frozen (options.scale_update is set): it has no latent weights, and
  /// set_weight(dequantized_weight()) gives it some for fine-tuning without changing a bit of it.
  static BitLinear from_exact_ternary(const Matrix<T>& weight, std::optional<Vector<T>> bias = std::nullopt,
                                      bitlinear_options options = {},
                                      std::string_view what = "BitLinear::from_exact_ternary") {
    options = validated(options);
    options.scale_update = weight_scale_update::frozen;
    if (options.weight_scales == weight_scaling::per_tensor)
      throw value_error(std::string(what) + ": an exact import needs options.weight_scales per_row or per_group "
                                            "(a per_tensor layer stores 1 / d, which does not reproduce d exactly)");
    check_shape(weight, what);
    check_rotation(options, weight.cols(), what);
    detail::require_finite(weight, what);
    unit_ternary_weights<T> split = detail::split_finite_ternary_units(
        weight, detail::unit_columns(options.weight_scales, options.group_size, weight.cols()), what);
    return from_ternary(split.values, std::move(split.scales), std::move(bias), options);
  }

  /// Gives the latent weight and bias buffers back (the inverse of the adopting constructor). The
  /// layer is left empty: only destroy it or assign to it afterwards.
  std::pair<Matrix<T>, std::optional<Vector<T>>> release() && noexcept {
    return {std::move(weight_), std::move(bias_)};
  }

  Index in_features() const noexcept { return base3() ? quantized_.base3.cols() : quantized_.packed.cols(); }
  Index out_features() const noexcept { return base3() ? quantized_.base3.rows() : quantized_.packed.rows(); }
  const bitlinear_options& options() const noexcept { return options_; }

  /// Latent (master) weights, out x in, exactly as given. Throws state_error when the layer has none:
  /// after release_latent_weights(), or when it was built by from_ternary() (the message says which).
  const Matrix<T>& weight() const {
    if (!has_latent_weights())
      throw state_error(never_had_latent_weights_
                            ? "BitLinear::weight: the layer was built from ternary weights (from_ternary, e.g. "
                              "loaded from a packed checkpoint) and has no latent weights; its weights are "
                              "ternary_weight() / weight_scale()"
                            : "BitLinear::weight: the latent weights were released (release_latent_weights); "
                              "only the ternary weights remain (ternary_weight(), weight_scale())");
    return weight_;
  }
  const std::optional<Vector<T>>& bias() const noexcept { return bias_; }

  /// Ternary codes {-1, 0, +1} (out x in), unpacked, and the scale sw: weight ~ ternary_weight() / weight_scale().
  Matrix<std::int8_t> ternary_weight() const { return base3() ? quantized_.base3.unpack() : quantized_.packed.unpack(); }
  /// The per-tensor scale sw. Throws state_error for a per_row / per_group layer (see unit_scales()).
  T weight_scale() const {
    if (options_.weight_scales != weight_scaling::per_tensor)
      throw state_error("BitLinear::weight_scale: the layer has one scale per " + unit_name() +
                        ", not one per tensor; use unit_scales()");
    return quantized_.scale;
  }
  /// The unit scales d (out x groups; per_row: out x 1), magnitudes: weight ~ ternary_weight()(o, c) *
  /// unit_scales()(o, c / group_size). Throws state_error for a per_tensor layer (see weight_scale()).
  const Matrix<T>& unit_scales() const {
    if (options_.weight_scales == weight_scaling::per_tensor)
      throw state_error("BitLinear::unit_scales: the layer has one scale per tensor (b1.58); use weight_scale()");
    return quantized_.unit_scales;
  }
  /// Scales per output row: 1 for per_tensor and per_row, ceil(in / group_size) for per_group.
  Index groups() const noexcept {
    return options_.weight_scales == weight_scaling::per_group ? detail::unit_count(in_features(), options_.group_size) : 1;
  }
  /// The weights forward() computes with, in T: codes / sw (per_tensor) or codes * d (exact).
  Matrix<T> dequantized_weight() const {
    const Matrix<std::int8_t> codes = ternary_weight();
    if (options_.weight_scales == weight_scaling::per_tensor)
      return (codes.template cast<T>().array() / quantized_.scale).matrix();
    return dequantize(unit_ternary_weights<T>{codes, quantized_.unit_scales, unit_cols()});
  }
  /// The 2-bit packed codes forward() reads. Throws state_error for a layer stored in base 3
  /// (options().storage == weight_storage::base3: base3_weight()).
  const packed_ternary& packed_weight() const {
    if (base3())
      throw state_error("BitLinear::packed_weight: the layer stores its codes in base 3 (storage base3); use "
                        "base3_weight()");
    return quantized_.packed;
  }
  /// The base-3 packed codes forward() reads. Throws state_error for a 2-bit layer (packed_weight()).
  const packed_base3& base3_weight() const {
    if (!base3())
      throw state_error("BitLinear::base3_weight: the layer stores its codes in 2 bits (storage two_bit); use "
                        "packed_weight()");
    return quantized_.base3;
  }
  /// The bytes of the packed codes forward() reads, in either storage (padding included).
  std::size_t packed_bytes() const noexcept {
    return base3() ? quantized_.base3.size_bytes() : quantized_.packed.size_bytes();
  }

  /// Whether the latent weights are held (false after release_latent_weights() and for from_ternary()).
  bool has_latent_weights() const noexcept { return weight_.size() != 0; }
  /// Frees the latent weights for inference-only use; forward() is unchanged.
  void release_latent_weights() noexcept { Matrix<T>().swap(weight_); }

  /// Heap bytes the layer holds: packed codes, latent weights (if held) and bias.
  std::size_t memory_bytes() const noexcept {
    return quantized_.packed.capacity_bytes() + quantized_.base3.capacity_bytes() + quantized_.kernel_scales.bytes() +
           std::size_t(weight_.size() + quantized_.unit_scales.size()) * sizeof(T) +
           (bias_ ? std::size_t(bias_->size()) * sizeof(T) : 0);
  }

  /// Replaces the latent weight (same shape), re-quantizes and re-packs; after a release or
  /// from_ternary() this gives the layer latent weights. With options().scale_update absmean the
  /// scales are derived again from `weight`; with frozen they are kept and only the codes change.
  /// Strong guarantee.
  void set_weight(Matrix<T> weight) {
    if (weight.rows() != out_features() || weight.cols() != in_features())
      throw shape_error("BitLinear::set_weight: weight is " + detail::shape_string(weight.rows(), weight.cols()) +
                        ", the layer is " + detail::shape_string(out_features(), in_features()));
    quantized_weights quantized = options_.scale_update == weight_scale_update::frozen
                                      ? quantize_with_scales(weight, "BitLinear::set_weight: weight")
                                      : quantize_checked(weight, options_);
    quantized_ = std::move(quantized);
    weight_ = std::move(weight);
    never_had_latent_weights_ = false;
  }

  /// Replaces the bias (or removes it with std::nullopt). Strong guarantee.
  void set_bias(std::optional<Vector<T>> bias) { bias_ = validated_bias(std::move(bias), out_features()); }

  /// x: batch x in  ->  batch x out. Throws shape_error for a wrong feature count and value_error
  /// for a non-finite input. A batch of 0 rows gives 0 rows. Safe to call from several threads at
  /// once: the scratch memory is the calling thread's own.
  template <class Derived>
  Matrix<T> forward(const Eigen::MatrixBase<Derived>& x) const {
    Matrix<T> y;
    forward(x, y);
    return y;
  }

  /// forward(x) into y, resized to batch x out only if its shape differs: with a y of the right
  /// shape and a batch seen before on this thread, the call allocates nothing. y may be the
  /// matrix x refers to (x is read whole before y is written). On an exception y is unchanged.
  template <class Derived>
  void forward(const Eigen::MatrixBase<Derived>& x, Matrix<T>& y) const {
    static_assert(std::is_same_v<typename Derived::Scalar, T>,
                  "BitLinear<T>::forward: the input's scalar type must be T");
    if (x.cols() != in_features())
      throw shape_error("BitLinear::forward: input has " + std::to_string(x.cols()) +
                        " features, the layer expects " + std::to_string(in_features()));
    const Index batch = x.rows();
    if (batch == 0) {
      Matrix<T> empty(0, out_features());
      return y.swap(empty);
    }

    const Eigen::Ref<const Matrix<T>, 0, Eigen::OuterStride<>> input(x.derived());
    using detail::scratch_slot;
    const T* rows = input.data();
    Index row_stride = input.outerStride();
    if (options_.rms_norm) {
      detail::require_finite(input, "BitLinear::forward: input");  // throws, naming the element
      T* normed = detail::thread_scratch_of<T, scratch_slot::normed>(std::size_t(batch * in_features()));
      for (Index b = 0; b < batch; ++b)
        detail::rms_norm_row(rows + b * row_stride, in_features(), T(options_.rms_eps), normed + b * in_features());
      rows = normed;
      row_stride = in_features();
    }
    if (options_.rotation) {  // R x, in place when the rows are the normalized copy already
      T* rotated = detail::thread_scratch_of<T, scratch_slot::normed>(std::size_t(batch * in_features()));
      options_.rotation->apply_rows(active_isa(), rows, batch, row_stride, rotated, in_features(), num_threads());
      rows = rotated;
      row_stride = in_features();
    }
    if (options_.weight_scales != weight_scaling::per_tensor) return forward_units(input, rows, row_stride, y);

    const isa kernels = active_isa();
    const int threads = num_threads();
    const packed_ternary& packed = quantized_.packed;
    // base3: 20-column tiles, the activation rows padded on to a multiple of 64 like pack.hpp's.
    const Index x_stride =
        base3() ? (quantized_.base3.padded_cols() + packed_ternary::block_cols - 1) / packed_ternary::block_cols *
                      packed_ternary::block_cols
                : packed.padded_cols();
    std::int32_t* acc =
        detail::thread_scratch_of<std::int32_t, scratch_slot::accumulators>(std::size_t(batch * out_features()));
    // One token: the kernel call quantizes it in each of its parts, on the part's own thread
    // (kernels.hpp, token_quantizer). More: quantize_rows shares the rows out over the threads first.
    const bool one_token = batch == 1;
    std::int8_t* xq = nullptr;
    T* scales = nullptr;
    std::int32_t* sums = nullptr;
    if (!one_token) {
      xq = detail::thread_scratch_of<std::int8_t, scratch_slot::activations>(std::size_t(batch * x_stride));
      scales = detail::thread_scratch_of<T, scratch_slot::scales>(std::size_t(batch));
      sums = detail::thread_scratch_of<std::int32_t, scratch_slot::sums>(std::size_t(batch));
      if (!detail::quantize_rows(kernels, rows, row_stride, batch, in_features(), xq, x_stride, scales, sums, threads))
        not_finite(input);
    }
    const detail::token_quantization<T> token{kernels, rows, in_features(), x_stride, 0, false};
    const detail::token_quantizer quantizer = one_token ? token.quantizer() : detail::token_quantizer{};

    // The rescale runs on each kernel thread for the rows it computed, straight into the output
    // (a new matrix if y's shape differs, swapped in only once nothing can fail).
    Matrix<T> shaped;
    const bool reshape = y.rows() != batch || y.cols() != out_features();
    if (reshape) shaped = Matrix<T>(batch, out_features());  // not y.resize: Eigen's is not exception-safe
    Matrix<T>& out = reshape ? shaped : y;
    const rescale_job rescale{kernels, acc, batch, out_features(), scales, quantized_.scale,
                              bias_ ? bias_->data() : nullptr, out.data(), out.outerStride()};
    bool finite;
    if (base3()) {
      const packed_base3& codes = quantized_.base3;
      const detail::gemm_args args{codes.data(), codes.col_tiles(), out_features(), xq, x_stride, sums, batch, acc};
      finite = detail::ternary_gemm_base3(kernels, args, codes.row_blocks(), threads, detail::min_work_per_thread,
                                          {rescale_job::run, &rescale}, quantizer);
    } else {
      const detail::gemm_args args{packed.data(), packed.col_tiles(), out_features(), xq, x_stride, sums, batch, acc};
      finite = detail::ternary_gemm(kernels, args, packed.row_blocks(), threads, detail::min_work_per_thread,
                                    {rescale_job::run, &rescale}, quantizer);
    }
    // Every part quantized the same token with the same code, so when one failed all did and none
    // wrote its rows: y is untouched.
    if (!finite) not_finite(input);
    if (reshape) y.swap(shaped);
  }

 private:
  /// forward() of a per_row / per_group layer from its (normalized) input rows, through the grouped
  /// kernels: per_group multiplies each group of G columns on its own (virtual blocks, kernels.hpp),
  /// per_row is the ungrouped product; the epilogue applies the unit scales (the formula at the top).
  template <class Input>
  void forward_units(const Input& input, const T* rows, Index row_stride, Matrix<T>& y) const {
    const isa kernels = active_isa();
    const int threads = num_threads();
    const Index batch = input.rows(), out = out_features(), in = in_features();
    const packed_ternary& packed = quantized_.packed;
    const Index x_stride = packed.padded_cols();
    const bool grouped = options_.weight_scales == weight_scaling::per_group;
    const bool per_block = options_.activation_scales == activation_scaling::per_block;
    const Index groups = this->groups();
    const Index kernel_groups = grouped ? x_stride / options_.group_size : 1;  // > groups only for G = 32
    const Index acc_rows = grouped ? packed.row_blocks() * kernel_groups * packed_ternary::block_rows : out;
    using detail::scratch_slot;
    const detail::kernel_unit_scales& kernel_scales = quantized_.kernel_scales;
    const bool fused = batch == 1 && grouped && !per_block && !kernel_scales.empty() &&
                       detail::fused_grouped_gemv(kernels, options_.group_size);
    std::int32_t* acc = fused ? nullptr
                              : detail::thread_scratch_of<std::int32_t, scratch_slot::accumulators>(
                                    std::size_t(batch * acc_rows));
    // One token: quantized by each part of the kernel call on its own thread, as forward's.
    const bool one_token = batch == 1;
    std::int8_t* xq = nullptr;
    T* scales = nullptr;
    std::int32_t* sums = nullptr;
    if (!one_token) {
      xq = detail::thread_scratch_of<std::int8_t, scratch_slot::activations>(std::size_t(batch * x_stride));
      scales = detail::thread_scratch_of<T, scratch_slot::scales>(std::size_t(batch * (per_block ? groups : 1)));
      sums = detail::thread_scratch_of<std::int32_t, scratch_slot::sums>(std::size_t(batch * kernel_groups));
      const bool finite =
          grouped ? detail::quantize_rows_grouped(kernels, rows, row_stride, batch, in, options_.group_size, per_block,
                                                  xq, x_stride, scales, sums, threads)
                  : detail::quantize_rows(kernels, rows, row_stride, batch, in, xq, x_stride, scales, sums, threads);
      if (!finite) not_finite(input);
    }
    const detail::token_quantization<T> token{kernels, rows, in, x_stride, grouped ? options_.group_size : 0, per_block};
    const detail::token_quantizer quantizer = one_token ? token.quantizer() : detail::token_quantizer{};

    Matrix<T> shaped;
    const bool reshape = y.rows() != batch || y.cols() != out;
    if (reshape) shaped = Matrix<T>(batch, out);  // not y.resize: Eigen's is not exception-safe
    Matrix<T>& result = reshape ? shaped : y;
    if constexpr (std::is_same_v<T, float>) {
      if (fused) {  // one token, per-token activations: the rescale fused into the product, same bits
        const detail::grouped_gemv_args args{packed.data(), options_.group_size / packed_ternary::tile_cols,
                                             kernel_groups,  out,
                                             nullptr,        nullptr,
                                             kernel_scales.data(), kernel_scales.half(),
                                             0.0f,           bias_ ? bias_->data() : nullptr,
                                             result.data()};
        if (!detail::ternary_gemv_grouped(kernels, args, packed.row_blocks(), threads, detail::min_work_per_thread,
                                          quantizer))
          not_finite(input);  // every part failed alike: none wrote its rows
        if (reshape) y.swap(shaped);
        return;
      }
    }
    const detail::grouped_rescale<T> rescale{kernels,   acc,      acc_rows,
                                             batch,     out,      kernel_groups,
                                             groups,    quantized_.unit_scales.data(),
                                             scales,    per_block, bias_ ? bias_->data() : nullptr,
                                             result.data(), result.outerStride()};
    detail::gemm_args args{packed.data(), grouped ? options_.group_size / packed_ternary::tile_cols : packed.col_tiles(),
                           acc_rows, xq, x_stride, sums, batch, acc};
    args.groups = kernel_groups;
    if (!detail::ternary_gemm(kernels, args, packed.row_blocks() * kernel_groups, threads, detail::min_work_per_thread,
                              rescale.epilogue(), quantizer))
      not_finite(input);  // every part failed alike: none wrote its rows
    if (reshape) y.swap(shaped);
  }

  /// The rescale of output columns [begin, end) of one forward call (the gemm epilogue).
  struct rescale_job {
    isa which;
    const std::int32_t* acc;
    Index batch, out;
    const T* scales;  // batch, or nullptr when each part quantized the token (token_scales)
    T weight_scale;
    const T* bias;
    T* y;
    Index y_stride;

    static void run(const void* self, const void* token_scales, Index begin, Index end) noexcept {
      const rescale_job& r = *static_cast<const rescale_job*>(self);
      const T* sx = token_scales ? static_cast<const T*>(token_scales) : r.scales;
      detail::rescale_rows(r.which, r.acc + begin, r.out, r.batch, end - begin, sx, r.weight_scale,
                           r.bias ? r.bias + begin : nullptr, r.y + begin, r.y_stride);
    }
  };

  struct quantized_weights {
    packed_ternary packed;  // storage two_bit (empty for base3)
    T scale;                // per_tensor: sw
    Matrix<T> unit_scales;  // per_row / per_group: out x groups magnitudes d; empty for per_tensor
    packed_base3 base3{};   // storage base3 (empty for two_bit)
    // per_group float layers with G >= 64: unit_scales in the fused batch-1 kernel's order (kernels.hpp)
    detail::kernel_unit_scales kernel_scales = {};
  };

  bool base3() const noexcept { return options_.storage == weight_storage::base3; }

  /// A per_tensor layer's codes packed in the options' storage (validated options).
  template <class Derived>
  static quantized_weights packed_per_tensor(const Eigen::MatrixBase<Derived>& codes, T scale,
                                             const bitlinear_options& options) {
    if (options.storage == weight_storage::base3) return {packed_ternary{}, scale, {}, packed_base3(codes)};
    return {packed_ternary(codes), scale, {}, {}};
  }

  /// The quantized weights of a unit layer, with the fused kernel's copy of the scales where it runs.
  static quantized_weights unit_quantized(packed_ternary packed, Matrix<T> unit_scales, const bitlinear_options& options) {
    quantized_weights q{std::move(packed), T(0), std::move(unit_scales)};
    if constexpr (std::is_same_v<T, float>)
      if (options.weight_scales == weight_scaling::per_group && options.group_size >= 64)
        q.kernel_scales = detail::kernel_unit_scales(q.unit_scales.data(), q.unit_scales.rows(), q.unit_scales.cols(),
                                                     q.packed.padded_cols() / options.group_size);
    return q;
  }

  struct ternary_tag {};
  BitLinear(ternary_tag, bitlinear_options options, quantized_weights quantized, std::optional<Vector<T>> bias) noexcept
      : options_(options), quantized_(std::move(quantized)), bias_(std::move(bias)), never_had_latent_weights_(true) {}

  /// The quantizer saw a non-finite value: the input's (named), or a finite input that the rotation
  /// took past the largest T.
  template <class Input>
  [[noreturn]] void not_finite(const Input& input) const {
    detail::require_finite(input, "BitLinear::forward: input");  // throws, naming the element
    throw value_error("BitLinear::forward: the rotated input overflowed (a value near the largest finite T grows "
                      "by up to sqrt(block size) in the rotation)");
  }

  static void check_rotation(const bitlinear_options& options, Index in_features, std::string_view what) {
    if (options.rotation && options.rotation->in_features() != in_features)
      throw shape_error(std::string(what) + ": the rotation is for " + std::to_string(options.rotation->in_features()) +
                        " inputs, the layer has " + std::to_string(in_features));
  }

  static bitlinear_options validated(bitlinear_options options) {
    if (!(options.rms_eps > 0) || !std::isfinite(options.rms_eps))
      throw value_error("BitLinear: rms_eps must be finite and > 0, got " + std::to_string(options.rms_eps));
    if (options.weight_scales == weight_scaling::per_tensor) {
      if (options.group_size != 0)
        throw value_error("BitLinear: group_size must be 0 with per_tensor scales, got " +
                          std::to_string(options.group_size));
    } else {
      detail::check_unit_scaling(options.weight_scales, options.group_size, "BitLinear");
    }
    if (options.storage != weight_storage::two_bit && options.storage != weight_storage::base3)
      throw value_error("BitLinear: storage is not two_bit or base3");
    if (options.storage == weight_storage::base3 && options.weight_scales != weight_scaling::per_tensor)
      throw value_error("BitLinear: storage base3 needs per_tensor weight scales, got " +
                        detail::scaling_name(options.weight_scales) +
                        " (the grouped kernels read pack.hpp's 2-bit tiles; a group of inputs is not a whole number "
                        "of base 3's 20-column tiles): use storage two_bit");
    if (options.activation_scales == activation_scaling::per_block) {
      if (options.weight_scales != weight_scaling::per_group)
        throw value_error("BitLinear: per_block activation scales need per_group weight scales (the blocks are the "
                          "weight groups)");
    } else if (options.activation_scales != activation_scaling::per_token) {
      throw value_error("BitLinear: activation_scales is not per_token or per_block");
    }
    if (options.scale_update != weight_scale_update::absmean && options.scale_update != weight_scale_update::frozen)
      throw value_error("BitLinear: scale_update is not absmean or frozen");
    return options;
  }

  // Columns pad to max(64, G) for per_group so every row block holds whole groups (pack.hpp).
  static Index col_alignment(const bitlinear_options& options) noexcept {
    return std::max(packed_ternary::block_cols,
                    options.weight_scales == weight_scaling::per_group ? options.group_size : Index{0});
  }

  std::string unit_name() const {
    return options_.weight_scales == weight_scaling::per_row ? "output row"
                                                             : "group of " + std::to_string(options_.group_size) + " inputs";
  }
  Index unit_cols() const noexcept {
    return detail::unit_columns(options_.weight_scales, options_.group_size, in_features());
  }

  template <class Derived>
  static void check_shape(const Eigen::MatrixBase<Derived>& weight, std::string_view what) {
    detail::require_non_empty(weight, what);
    if (weight.cols() > max_in_features)
      throw shape_error(std::string(what) + ": in_features " + std::to_string(weight.cols()) +
                        " exceeds the exact-accumulation limit max_in_features = " + std::to_string(max_in_features));
  }

  // frozen: the codes of `weight` against the layer's own scales (see weight_scale_update); the same
  // comparisons as the absmean quantizers, so training's W~ and forward agree code for code.
  quantized_weights quantize_with_scales(const Matrix<T>& weight, std::string_view what) const {
    detail::require_finite(weight, what);
    Matrix<std::int8_t> codes(weight.rows(), weight.cols());
    const auto code_of = [](T v) { return static_cast<std::int8_t>(int(v > T(0.5)) - int(v < T(-0.5))); };
    if (options_.weight_scales == weight_scaling::per_tensor) {
      const T sw = quantized_.scale;
      for (Index r = 0; r < weight.rows(); ++r)
        for (Index c = 0; c < weight.cols(); ++c) codes(r, c) = code_of(weight(r, c) * sw);
      return packed_per_tensor(codes, sw, options_);
    }
    const Matrix<T>& d = quantized_.unit_scales;
    const Index unit = unit_cols();
    for (Index r = 0; r < weight.rows(); ++r)
      for (Index c = 0; c < weight.cols(); ++c) {
        const T scale = d(r, c / unit);
        codes(r, c) = scale > T(0) ? code_of(weight(r, c) / scale) : std::int8_t{0};
      }
    return unit_quantized(packed_ternary(codes, col_alignment(options_)), d, options_);
  }

  static quantized_weights quantize_checked(const Matrix<T>& weight, const bitlinear_options& options) {
    check_shape(weight, "BitLinear: weight");
    check_rotation(options, weight.cols(), "BitLinear");
    detail::require_finite(weight, "BitLinear: weight");
    if (options.weight_scales != weight_scaling::per_tensor) {
      unit_ternary_weights<T> units = detail::quantize_finite_weight_units(
          weight, detail::unit_columns(options.weight_scales, options.group_size, weight.cols()));
      return unit_quantized(packed_ternary(units.values, col_alignment(options)), std::move(units.scales), options);
    }
    ternary_weights<T> ternary = detail::quantize_finite_weights(weight, "BitLinear: weight");
    return packed_per_tensor(ternary.values, ternary.scale, options);
  }

  static std::optional<Vector<T>> validated_bias(std::optional<Vector<T>> bias, Index out_features) {
    check_bias(bias, out_features);
    return bias;
  }

  static void check_bias(const std::optional<Vector<T>>& bias, Index out_features) {
    if (bias) {
      if (bias->size() != out_features)
        throw shape_error("BitLinear: bias has " + std::to_string(bias->size()) +
                          " elements, the weight has " + std::to_string(out_features) + " rows");
      detail::require_finite(*bias, "BitLinear: bias");
    }
  }

  bitlinear_options options_;
  quantized_weights quantized_;
  Matrix<T> weight_;  // empty once released, and for from_ternary()
  std::optional<Vector<T>> bias_;
  bool never_had_latent_weights_ = false;  // from_ternary() and no set_weight() since: says why weight_ is empty
};

static_assert(std::is_nothrow_move_constructible_v<BitLinear<float>> &&
              std::is_nothrow_move_assignable_v<BitLinear<float>> &&
              std::is_copy_constructible_v<BitLinear<float>>,
              "BitLinear must be copyable and nothrow-movable (replace_linear commits with noexcept swaps)");

}  // namespace bitnet
