// bitnet/kernels.hpp - run-time choice of the int8 x ternary kernels, and their thread count.
//
// The kernel ISA is chosen at run time from the CPU, once, so a program built with plain -O2 and
// no -march flags still runs the AVX2, AVX-512 VNNI or AMX kernels (x86-64), or the NEON, SDOT or
// SMMLA kernels (AArch64). Order of precedence:
//   force_isa(...)  >  environment variable BITNET_ISA (scalar | avx2 | avx512 | amx | neon |
//   dotprod | i8mm)  >  best_isa().
// Threads: set_num_threads(n)  >  BITNET_NUM_THREADS  >  std::thread::hardware_concurrency().
// Every ISA and every thread count gives bit-identical results: the accumulators are exact int32.
#pragma once

#include <algorithm>
#include <array>
#include <atomic>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <optional>
#include <string>
#include <string_view>
#include <thread>
#include <type_traits>

#include "detail/aligned_allocator.hpp"
#include "detail/float_formats.hpp"
#include "detail/kernels/amx.hpp"
#include "detail/kernels/avx2.hpp"
#include "detail/kernels/avx512.hpp"
#include "detail/kernels/common.hpp"
#include "detail/kernels/cpu_features.hpp"
#include "detail/kernels/neon.hpp"
#include "detail/kernels/scalar.hpp"
#include "detail/kernels/thread_pool.hpp"
#include "errors.hpp"
#include "matrix.hpp"

namespace bitnet {

/// The largest in_features computed exactly. The kernels accumulate sum_k x_k * (w_k + 1) with
/// |x_k| <= 128 and w_k + 1 <= 2 over the columns padded to a multiple of 128, in int32:
/// 256 * (2^23 - 128) < 2^31.
inline constexpr Index max_in_features = (Index{1} << 23) - 128;

/// The kernel families. amx is avx512 plus AMX-INT8 tiles for batches of 16 tokens and more;
/// neon, dotprod (SDOT) and i8mm (SMMLA, batch > 1; SDOT for batch 1) are AArch64's.
enum class isa { scalar, avx2, avx512, amx, neon, dotprod, i8mm };

/// Every ISA, for loops over them (tests, benchmarks); isa_supported says which this CPU runs.
inline constexpr std::array<isa, 7> all_isas{isa::scalar, isa::avx2,    isa::avx512, isa::amx,
                                             isa::neon,   isa::dotprod, isa::i8mm};

inline std::string_view isa_name(isa which) noexcept {
  switch (which) {
    case isa::avx2: return "avx2";
    case isa::avx512: return "avx512";
    case isa::amx: return "amx";
    case isa::neon: return "neon";
    case isa::dotprod: return "dotprod";
    case isa::i8mm: return "i8mm";
    default: return "scalar";
  }
}

/// Whether this CPU (and OS) can run the kernels of `which`; scalar always can.
inline bool isa_supported(isa which) noexcept {
  const detail::cpu_features& cpu = detail::host_cpu_features();
  switch (which) {
    case isa::avx2: return cpu.avx2;
    case isa::avx512: return cpu.avx512_vnni;
#ifdef BITNET_HAS_AMX_KERNEL
    case isa::amx: return cpu.avx512_vnni && detail::amx_int8_usable();
#else
    case isa::amx: return false;
#endif
#ifdef BITNET_ARM64
    case isa::neon: return cpu.neon;
#ifdef BITNET_HAS_DOTPROD_KERNEL
    case isa::dotprod: return cpu.neon && cpu.dotprod;
#endif
#ifdef BITNET_HAS_I8MM_KERNEL
    case isa::i8mm: return cpu.neon && cpu.dotprod && cpu.i8mm;
#endif
#endif
    case isa::scalar: return true;
    default: return false;  // an ISA of another architecture, or one this compiler cannot build
  }
}

/// The fastest ISA this CPU supports.
inline isa best_isa() noexcept {
  for (isa which : {isa::amx, isa::avx512, isa::avx2, isa::i8mm, isa::dotprod, isa::neon})
    if (isa_supported(which)) return which;
  return isa::scalar;
}

namespace detail {

/// A group-scaled float layer's unit scales d in the order the fused batch-1 kernel reads them,
/// which is the order of the packed codes: the 16 rows of row block rb and group j at
/// (rb * kernel_groups + j) * 16 (padding rows 0). binary16 (2 bytes: 0.125 bit a weight at G = 128)
/// when every d is a binary16 value, as every scale read from a GGUF file or an FP16 folder is;
/// float otherwise. Either way the kernel computes with d itself: nothing is rounded.
class kernel_unit_scales {
 public:
  kernel_unit_scales() = default;

  /// d: out x groups magnitudes, row-major; kernel_groups >= groups (the packed padded_cols / G).
  kernel_unit_scales(const float* d, Index out, Index groups, Index kernel_groups) {
    half_ = std::all_of(d, d + out * groups, [](float v) {
      const std::optional<double> rounded = round_to_format(double(v), binary16);
      return rounded && *rounded == double(v);
    });
    const Index row_blocks = (out + tile_rows - 1) / tile_rows;
    bytes_.assign(std::size_t(row_blocks * kernel_groups * tile_rows) * (half_ ? 2 : 4), std::byte{0});
    for (Index o = 0; o < out; ++o)
      for (Index j = 0; j < groups; ++j) {
        const std::size_t at = std::size_t((o / tile_rows * kernel_groups + j) * tile_rows + o % tile_rows);
        if (half_) {
          const std::uint16_t h = encode_half(double(d[o * groups + j]));
          std::memcpy(bytes_.data() + 2 * at, &h, 2);
        } else {
          std::memcpy(bytes_.data() + 4 * at, d + o * groups + j, 4);
        }
      }
  }

  bool empty() const noexcept { return bytes_.empty(); }
  bool half() const noexcept { return half_; }
  const void* data() const noexcept { return bytes_.data(); }
  std::size_t bytes() const noexcept { return bytes_.size(); }

 private:
  aligned_vector<std::byte> bytes_;
  bool half_ = false;
};

inline constexpr int no_forced_isa = -1;
inline std::atomic<int> forced_isa{no_forced_isa};
inline std::atomic<int> requested_threads{0};
inline thread_local isa last_run_isa = isa::scalar;

inline std::optional<isa> parse_isa(std::string_view name) noexcept {
  for (isa which : all_isas)
    if (name == isa_name(which)) return which;
  return std::nullopt;
}

/// The ISA named by BITNET_ISA (read once), or best_isa() if it is unset or empty. A value that
/// names no ISA, or one this CPU lacks, is an error reported by every kernel call.
struct env_isa_choice {
  isa choice = isa::scalar;
  std::string error;
};

inline const env_isa_choice& env_isa() {
  static const env_isa_choice resolved = [] {
    env_isa_choice r{best_isa(), {}};
    const char* value = std::getenv("BITNET_ISA");
    if (value == nullptr || *value == '\0') return r;
    const std::optional<isa> named = parse_isa(value);
    if (!named)
      r.error = std::string("BITNET_ISA=") + value +
                " names no kernel ISA (use scalar, avx2, avx512, amx, neon, dotprod or i8mm)";
    else if (!isa_supported(*named))
      r.error = std::string("BITNET_ISA=") + value + ": this CPU does not support it";
    else
      r.choice = *named;
    return r;
  }();
  return resolved;
}

inline int env_threads() {
  static const int resolved = [] {
    const char* value = std::getenv("BITNET_NUM_THREADS");
    if (value == nullptr || *value == '\0') return int(std::max(1u, std::thread::hardware_concurrency()));
    char* end = nullptr;
    const long n = std::strtol(value, &end, 10);
    if (*end != '\0' || n < 1 || n > 4096) return -1;
    return int(n);
  }();
  if (resolved < 0)
    throw value_error(std::string("BITNET_NUM_THREADS=") + std::getenv("BITNET_NUM_THREADS") +
                      " is not a thread count in [1, 4096]");
  return resolved;
}

}  // namespace detail

/// Makes every later kernel call (on any thread) use `which`. Throws value_error if this CPU
/// cannot run it; nothing changes then.
inline void force_isa(isa which) {
  if (!isa_supported(which))
    throw value_error("force_isa: this CPU does not support " + std::string(isa_name(which)));
  detail::forced_isa.store(int(which));
}

/// Undoes force_isa: back to BITNET_ISA or the best ISA.
inline void clear_forced_isa() noexcept { detail::forced_isa.store(detail::no_forced_isa); }

/// The ISA the next kernel call will use. Throws value_error if BITNET_ISA is invalid (and no
/// ISA is forced).
inline isa active_isa() {
  const int forced = detail::forced_isa.load();
  if (forced != detail::no_forced_isa) return isa(forced);
  const detail::env_isa_choice& env = detail::env_isa();
  if (!env.error.empty()) throw value_error(env.error);
  return env.choice;
}

/// The ISA of the last kernel call made by the calling thread (scalar before any call).
inline isa last_isa() noexcept { return detail::last_run_isa; }

/// The most threads one kernel call uses. Throws value_error if BITNET_NUM_THREADS is invalid
/// (and no count was set).
inline int num_threads() {
  const int requested = detail::requested_threads.load();
  return requested > 0 ? requested : detail::env_threads();
}

/// Sets the thread count for later kernel calls; 0 restores the default. Throws value_error
/// for a negative count.
inline void set_num_threads(int n) {
  if (n < 0) throw value_error("set_num_threads: thread count must be >= 0, got " + std::to_string(n));
  detail::requested_threads.store(n);
}

namespace detail {
inline namespace BITNET_TU_ISA {

/// Below this many multiply-adds per thread a thread costs more than it saves (2^19: a 640 x 2560
/// k / v projection splits in two at batch 1; docs/kernels.md, "Threads").
inline constexpr double min_work_per_thread = 1 << 19;

/// Copies the activations of each token tile of `tile` tokens (the last may be shorter, n tokens)
/// into dst interleaved by 4-byte groups: group q of the tile's token t at (q * n + t) * 4 from the
/// tile's start, t0 * x_stride. The SIMD products then broadcast every group from one pointer.
inline void interleave_tokens(const gemm_args& a, Index tile, std::int8_t* dst) noexcept {
  const Index groups = a.x_stride / group_cols;
  for (Index t0 = 0; t0 < a.batch; t0 += tile) {
    const Index n = std::min(tile, a.batch - t0);
    std::int8_t* to = dst + t0 * a.x_stride;
    for (Index t = 0; t < n; ++t) {
      const std::int8_t* from = a.x + (t0 + t) * a.x_stride;
      for (Index q = 0; q < groups; ++q) std::memcpy(to + (q * n + t) * group_cols, from + q * group_cols, group_cols);
    }
  }
}

/// What a kernel call does next with the rows it has just computed, on the same thread, so it is
/// shared out over the threads with them (BitLinear's rescale): run(context, token_scales,
/// row_begin, row_end). The rows are output rows: for a grouped call (gemm_args::groups > 1) whole
/// row blocks, [16 rb_begin, 16 rb_end), which may run past the layer's last row into its block's
/// padding (grouped_rescale clamps them). token_scales: the activation scales (T) the part's token
/// was quantized with when the call quantizes its token in every part (token_quantizer), else
/// nullptr, and the context's own scales apply.
struct gemm_epilogue {
  void (*run)(const void* context, const void* token_scales, Index row_begin, Index row_end) noexcept = nullptr;
  const void* context = nullptr;
};

/// How a batch-1 kernel call quantizes its token itself: run(context, codes, sums, scales) writes
/// code_bytes zero-padded int8 codes, sum_count code sums and scale_bytes of activation scales, and
/// returns false (having written nothing the caller reads) if the token is not finite.
///
/// Split over threads, every part runs it on its own thread, before its kernel range, rather than
/// the caller quantizing once for all: the same code on the same input gives every part the same
/// bits, and no thread then reads codes another core has just written (the cache lines that bounce
/// between the cores cost more than quantizing the token again: docs/kernels.md, "Threads").
struct token_quantizer {
  bool (*run)(const void* context, std::int8_t* codes, std::int32_t* sums, void* scales) noexcept = nullptr;
  const void* context = nullptr;
  Index code_bytes = 0, sum_count = 0, scale_bytes = 0;
};

/// The quantized tokens of one kernel call that quantizes per part: one block per part (codes,
/// sums, scales, each starting a 128-byte line pair of its own) in the calling thread's scratch,
/// allocated before any work starts, so a bad_alloc throws before anything is written. A part's
/// block is written and read by the thread that runs the part: in a steady decode the same thread,
/// call after call, so its lines stay in that core's cache.
class part_tokens {
 public:
  part_tokens(const token_quantizer& quantizer, Index parts)
      : quantizer_(quantizer),
        sums_at_(padded(quantizer.code_bytes)),
        scales_at_(sums_at_ + padded(quantizer.sum_count * Index(sizeof(std::int32_t)))),
        block_bytes_(scales_at_ + padded(quantizer.scale_bytes)),
        blocks_(thread_scratch<scratch_slot::part_tokens>(std::size_t(parts * block_bytes_))) {}

  /// Quantizes the token into part's block and points codes, sums and scales at it. False if the
  /// token is not finite: failed() then, and the part must write nothing.
  bool quantize(Index part, const std::int8_t*& codes, const std::int32_t*& sums, const void*& scales) const noexcept {
    std::byte* block = blocks_ + part * block_bytes_;
    auto* q = reinterpret_cast<std::int8_t*>(block);
    auto* s = reinterpret_cast<std::int32_t*>(block + sums_at_);
    if (!quantizer_.run(quantizer_.context, q, s, block + scales_at_)) {
      failed_.store(true, std::memory_order_relaxed);  // read by the caller after thread_pool::run returns
      return false;
    }
    codes = q;
    sums = s;
    scales = block + scales_at_;
    return true;
  }

  bool failed() const noexcept { return failed_.load(std::memory_order_relaxed); }

 private:
  static Index padded(Index bytes) noexcept { return (bytes + 127) / 128 * 128; }

  token_quantizer quantizer_;
  Index sums_at_, scales_at_, block_bytes_;
  std::byte* blocks_;
  mutable std::atomic<bool> failed_{false};
};

/// One kernel call, prepared for its ISA and shared out over the pool: part i computes (virtual)
/// row blocks [i * per_part, min((i + 1) * per_part, row_blocks)), then runs the epilogue on their
/// rows. For a grouped call per_part is a multiple of groups: a part owns whole output rows. With
/// tokens, each part first quantizes the token itself (token_quantizer).
struct gemm_job {
  isa which;
  gemm_args args;
  const std::int8_t* interleaved;  // avx2 / avx512 batch > 1: the activations by token tile; else args.x
  const std::int8_t* token_tail;   // amx: the last partial token tile, zero-padded to 16 rows
  std::int8_t* unpacked;           // amx: unpacked B tiles, unpacked_bytes per part
  Index unpacked_bytes;
  Index per_part, row_blocks;
  gemm_epilogue epilogue;
  const part_tokens* tokens = nullptr;

  void run_range(Index part, Index begin, Index end) const noexcept {
    if (!tokens) return run_range(args, interleaved, nullptr, part, begin, end);
    gemm_args own = args;  // batch 1: the token's codes are also what the kernels take as interleaved
    const void* scales;
    if (tokens->quantize(part, own.x, own.x_sums, scales)) run_range(own, own.x, scales, part, begin, end);
  }

  void run_range(const gemm_args& a, const std::int8_t* xi, const void* token_scales, Index part, Index begin,
                 Index end) const noexcept {
    run_kernel(a, xi, part, begin, end);
    if (!epilogue.run) return;
    if (a.groups == 1)
      return epilogue.run(epilogue.context, token_scales, begin * tile_rows, std::min(end * tile_rows, a.rows));
    epilogue.run(epilogue.context, token_scales, begin / a.groups * tile_rows, end / a.groups * tile_rows);
  }

  void run_kernel(const gemm_args& a, [[maybe_unused]] const std::int8_t* xi, [[maybe_unused]] Index part,
                  Index begin, Index end) const noexcept {
    switch (which) {
#ifdef BITNET_X86
#ifdef BITNET_HAS_AMX_KERNEL
      case isa::amx:
        if (a.batch >= amx_min_batch) {
          ternary_gemm_amx(a, token_tail, begin, end, unpacked + part * unpacked_bytes);
          break;
        }
        [[fallthrough]];
#endif
      case isa::avx512: ternary_gemm_avx512(a, xi, begin, end); break;
      case isa::avx2: ternary_gemm_avx2(a, xi, begin, end); break;
#endif
#ifdef BITNET_ARM64
#ifdef BITNET_HAS_I8MM_KERNEL
      case isa::i8mm: ternary_gemm_i8mm(a, begin, end); break;
#endif
#ifdef BITNET_HAS_DOTPROD_KERNEL
      case isa::dotprod: ternary_gemm_dotprod(a, begin, end); break;
#endif
      case isa::neon: ternary_gemm_neon(a, begin, end); break;
#endif
      default: ternary_gemm_scalar(a, begin, end); break;
    }
  }

  static void run_part(const void* self, Index part) noexcept {
    const gemm_job& job = *static_cast<const gemm_job*>(self);
    const Index begin = part * job.per_part;
    job.run_range(part, begin, std::min(begin + job.per_part, job.row_blocks));
  }
};

/// The product of gemm_args for all row_blocks on the kernels of `which` (then the epilogue on
/// each range's rows, by the thread that computed them), split into contiguous row ranges over at
/// most `threads` threads (the caller's and the pool's, thread_pool.hpp), each
/// given at least min_work multiply-adds. Every output is computed whole by one thread, so the
/// split never changes a result. A grouped call (a.groups > 1) passes row_blocks = real row
/// blocks * groups virtual blocks and is split on whole real row blocks. Scratch memory is the calling thread's (common.hpp): a call of a
/// shape seen before allocates nothing. Throws bad_alloc only before any work starts.
///
/// With a quantizer (batch 1: a.x and a.x_sums are then ignored), every part quantizes the token
/// itself before its range (token_quantizer), and the epilogue gets the part's scales. Returns
/// false if the token is not finite: no part ran its epilogue then. Without one, always true.
inline bool ternary_gemm(isa which, const gemm_args& a, Index row_blocks, int threads,
                         double min_work = min_work_per_thread, gemm_epilogue epilogue = {},
                         const token_quantizer& quantizer = {}) {
  last_run_isa = which;
  gemm_job job{which, a, a.x, nullptr, nullptr, 0, row_blocks, row_blocks, epilogue};
  // Parts start at multiples of `granule` virtual blocks: whole row blocks (all their groups), and
  // pairs of them for the AMX kernel.
  Index granule = a.groups;
#ifdef BITNET_X86
  const bool amx_tiles = which == isa::amx && a.batch >= 16;
  if (amx_tiles) {
    granule = 2 * a.groups;
    if (const Index tail = a.batch % 16; tail != 0) {
      std::int8_t* rows = thread_scratch_of<std::int8_t, scratch_slot::token_tail>(std::size_t(16 * a.x_stride));
      std::memcpy(rows, a.x + (a.batch - tail) * a.x_stride, std::size_t(tail * a.x_stride));
      std::memset(rows + tail * a.x_stride, 0, std::size_t((16 - tail) * a.x_stride));
      job.token_tail = rows;
    }
  } else if (which != isa::scalar && a.batch > 1) {
    std::int8_t* xi = thread_scratch_of<std::int8_t, scratch_slot::interleaved>(std::size_t(a.batch * a.x_stride));
    interleave_tokens(a, which == isa::avx2 ? avx2_token_tile : avx512_token_tile, xi);
    job.interleaved = xi;
  }
#endif
  const double work = double(a.batch) * double(row_blocks) * double(a.col_tiles) * double(tile_rows * tile_cols);
  const Index by_work = min_work > 0 ? Index(std::min(work / min_work, 1e9)) : row_blocks;
  const Index parts = std::clamp<Index>(by_work, 1, std::min<Index>(threads, row_blocks / a.groups));
  job.per_part = ((row_blocks + parts - 1) / parts + granule - 1) / granule * granule;
  const Index used_parts = (row_blocks + job.per_part - 1) / job.per_part;
#ifdef BITNET_HAS_AMX_KERNEL
  if (amx_tiles) {
    job.unpacked_bytes = 4 * amx_tile_bytes;
    job.unpacked = thread_scratch_of<std::int8_t, scratch_slot::unpacked>(std::size_t(used_parts * job.unpacked_bytes));
  }
#endif
  std::optional<part_tokens> tokens;
  if (quantizer.run) job.tokens = &tokens.emplace(quantizer, used_parts);
  if (used_parts == 1) {
    job.run_range(0, 0, row_blocks);  // the pool is not even created
  } else {
    thread_pool::instance().run(used_parts, gemm_job::run_part, &job);
  }
  return !tokens || !tokens->failed();
}

/// Whether ternary_gemv_grouped runs on `which` for groups of group_size columns: the AVX-512
/// kernels (AMX's batch 1 is AVX-512's) and G >= 64 (whole 4-tile steps). Elsewhere a grouped
/// forward takes the virtual blocks and grouped_rescale, which compute the same bits.
inline bool fused_grouped_gemv(isa which, Index group_size) noexcept {
#ifdef BITNET_X86
  return (which == isa::avx512 || which == isa::amx) && group_size >= 64;
#else
  (void)which;
  (void)group_size;
  return false;
#endif
}

/// The fused batch-1 product of a group-scaled float layer (grouped_gemv_args: y written
/// directly) for `row_blocks` row blocks, split into contiguous row-block ranges over at most
/// `threads` threads with at least min_work multiply-adds each, as ternary_gemm splits. Needs
/// fused_grouped_gemv(which, G); every row is computed whole by one thread. With a quantizer
/// (a.x, a.x_sums and a.sx then ignored), every part quantizes the token itself, as in
/// ternary_gemm; false if the token is not finite (nothing written to y then), else true.
inline bool ternary_gemv_grouped(isa which, const grouped_gemv_args& a, Index row_blocks, int threads,
                                 double min_work = min_work_per_thread, const token_quantizer& quantizer = {}) {
  last_run_isa = which;
  struct job {
    const grouped_gemv_args& args;
    Index row_blocks, per_part;
    const part_tokens* tokens;
    void range(Index part, Index begin, Index end) const noexcept {
      if (!tokens) return range(args, begin, end);
      grouped_gemv_args own = args;
      const void* scales;
      if (!tokens->quantize(part, own.x, own.x_sums, scales)) return;
      own.sx = *static_cast<const float*>(scales);
      range(own, begin, end);
    }
    static void range([[maybe_unused]] const grouped_gemv_args& a, [[maybe_unused]] Index begin,
                      [[maybe_unused]] Index end) noexcept {
#ifdef BITNET_X86
      if (a.half_scales) return gemv_grouped_avx512<true>(a, begin, end);
      gemv_grouped_avx512<false>(a, begin, end);
#endif
    }
    static void run_part(const void* self, Index part) noexcept {
      const job& j = *static_cast<const job*>(self);
      const Index begin = part * j.per_part;
      j.range(part, begin, std::min(begin + j.per_part, j.row_blocks));
    }
  };
  const double work = double(row_blocks) * double(a.groups * a.col_tiles) * double(tile_rows * tile_cols);
  const Index by_work = min_work > 0 ? Index(std::min(work / min_work, 1e9)) : row_blocks;
  const Index parts = std::clamp<Index>(by_work, 1, std::min<Index>(threads, row_blocks));
  const Index per_part = (row_blocks + parts - 1) / parts;
  const Index used_parts = (row_blocks + per_part - 1) / per_part;
  std::optional<part_tokens> tokens;
  const job split{a, row_blocks, per_part, quantizer.run ? &tokens.emplace(quantizer, used_parts) : nullptr};
  if (used_parts == 1) {
    split.range(0, 0, row_blocks);
  } else {
    thread_pool::instance().run(used_parts, job::run_part, &split);
  }
  return !tokens || !tokens->failed();
}

/// quantize_row_scalar on the kernels of `which` (bit-identical for every ISA).
template <class T>
bool quantize_row(isa which, const T* x, Index cols, Index padded, std::int8_t* q, T& scale,
                  std::int32_t& sum) noexcept {
#ifdef BITNET_X86
  if constexpr (std::is_same_v<T, float>) {
    if (which != isa::scalar) return quantize_row_avx2(x, cols, padded, q, scale, sum);
  }
#elif defined(BITNET_ARM64)
  if constexpr (std::is_same_v<T, float>) {
    if (which != isa::scalar) return quantize_row_neon(x, cols, padded, q, scale, sum);
  }
#endif
  (void)which;
  return quantize_row_scalar(x, cols, padded, q, scale, sum);
}

/// The sum of n int8 codes, n a multiple of 32 (a group of a quantized row).
inline std::int32_t sum_codes(isa which, const std::int8_t* q, Index n) noexcept {
#ifdef BITNET_X86
  if (which != isa::scalar) return sum_codes_avx2(q, n);
#elif defined(BITNET_ARM64)
  if (which != isa::scalar) return sum_codes_neon(q, n);
#endif
  (void)which;
  std::int32_t sum = 0;
  for (Index k = 0; k < n; ++k) sum += q[k];
  return sum;
}

/// row(r) -> bool for r in [0, rows), shared out over up to `threads` threads when there are
/// enough values (rows x cols) for it; false if any call returned false.
template <class Row>
bool split_rows(Index rows, Index cols, int threads, const Row& row) noexcept {
  struct split {
    const Row& row;
    Index rows, per_part;
    mutable std::atomic<bool> ok{true};

    bool range(Index begin, Index end) const noexcept {
      for (Index r = begin; r < end; ++r)
        if (!row(r)) return false;
      return true;
    }
    static void run_part(const void* self, Index part) noexcept {
      const split& s = *static_cast<const split*>(self);
      const Index begin = part * s.per_part;
      if (!s.range(begin, std::min(begin + s.per_part, s.rows))) s.ok.store(false);
    }
  };
  // A part below ~64K values costs more to hand over than it saves.
  const Index parts = std::clamp<Index>(rows * cols / (Index{1} << 16), 1, std::min<Index>(threads, rows));
  split job{row, rows, (rows + parts - 1) / parts};
  if (parts == 1) return job.range(0, rows);
  thread_pool::instance().run((rows + job.per_part - 1) / job.per_part, split::run_part, &job);
  return job.ok.load();
}

/// quantize_activations for `rows` rows of x (row stride x_stride), into q (row stride
/// q_stride, zero-padded after cols), scales and per-row code sums, on the kernels of `which`;
/// rows are shared out over up to `threads` threads when there are enough of them (each row is
/// quantized whole by one thread, so the split never changes a result). Returns false if any
/// input is not finite.
template <class T>
bool quantize_rows(isa which, const T* x, Index x_stride, Index rows, Index cols, std::int8_t* q, Index q_stride,
                   T* scales, std::int32_t* sums, int threads = 1) noexcept {
  last_run_isa = which;
  return split_rows(rows, cols, threads, [&](Index r) noexcept {
    return quantize_row(which, x + r * x_stride, cols, q_stride, q + r * q_stride, scales[r], sums[r]);
  });
}

/// One row of quantize_rows_grouped (below): row's cols values into q_stride codes row_q, its
/// scales (one, or one per group when per_block) and kernel_groups = q_stride / G code sums.
template <class T>
bool quantize_row_grouped(isa which, const T* row, Index cols, Index group_size, bool per_block, std::int8_t* row_q,
                          Index q_stride, T* scales, std::int32_t* row_sums) noexcept {
  const Index groups = (cols + group_size - 1) / group_size, kernel_groups = q_stride / group_size;
  if (per_block) {
    for (Index j = 0; j < groups; ++j) {
      const Index first = j * group_size, width = std::min(group_size, cols - first);
      const Index padded = j + 1 == groups ? q_stride - first : group_size;  // the last pads the row
      if (!quantize_row(which, row + first, width, padded, row_q + first, scales[j], row_sums[j])) return false;
    }
  } else {
    std::int32_t total;
    if (!quantize_row(which, row, cols, q_stride, row_q, scales[0], total)) return false;
    for (Index j = 0; j < groups; ++j) row_sums[j] = sum_codes(which, row_q + j * group_size, group_size);
  }
  std::fill(row_sums + groups, row_sums + kernel_groups, 0);
  return true;
}

/// The activations of a group-scaled layer (group size G, a power of two dividing q_stride, the
/// packed padded_cols): quantize_rows, then per group. With groups = ceil(cols / G) and
/// kernel_groups = q_stride / G (the gemm_args::groups of the product; more than groups only when
/// G = 32 and the 64-column padding adds all-padding groups):
///   * per token (per_block false): each row quantized whole as quantize_rows does, scales[r];
///   * per block (per_block true): each group j of a row (its real columns [j G, min((j + 1) G,
///     cols))) quantized on its own with the same formula over its own absmax, scales[r * groups + j];
/// and sums[r * kernel_groups + j] the sum of group j's codes (0 for all-padding groups), what the
/// grouped product subtracts. q rows are zero-padded after cols. Returns false if any input is not
/// finite (outputs unspecified then).
template <class T>
bool quantize_rows_grouped(isa which, const T* x, Index x_stride, Index rows, Index cols, Index group_size,
                           bool per_block, std::int8_t* q, Index q_stride, T* scales, std::int32_t* sums,
                           int threads = 1) noexcept {
  last_run_isa = which;
  const Index groups = (cols + group_size - 1) / group_size, kernel_groups = q_stride / group_size;
  return split_rows(rows, cols, threads, [&](Index r) noexcept {
    return quantize_row_grouped(which, x + r * x_stride, cols, group_size, per_block, q + r * q_stride, q_stride,
                                scales + r * (per_block ? groups : 1), sums + r * kernel_groups);
  });
}

/// A layer's one token (x, cols values) quantized as quantize_rows (group_size 0: one scale, one
/// sum) or quantize_rows_grouped (group_size G) quantize it, as a kernel call's token_quantizer:
/// the batch-1 calls that quantize in every part (ternary_gemm, ternary_gemm_base3,
/// ternary_gemv_grouped).
template <class T>
struct token_quantization {
  isa which;
  const T* x;
  Index cols, q_stride;
  Index group_size;  // 0: ungrouped
  bool per_block;

  static bool run(const void* self, std::int8_t* q, std::int32_t* sums, void* scales) noexcept {
    const token_quantization& t = *static_cast<const token_quantization*>(self);
    T* sx = static_cast<T*>(scales);
    if (t.group_size == 0) return quantize_row(t.which, t.x, t.cols, t.q_stride, q, *sx, sums[0]);
    return quantize_row_grouped(t.which, t.x, t.cols, t.group_size, t.per_block, q, t.q_stride, sx, sums);
  }

  token_quantizer quantizer() const noexcept {
    const Index scale_count = group_size != 0 && per_block ? (cols + group_size - 1) / group_size : 1;
    return {run, this, q_stride, group_size == 0 ? 1 : q_stride / group_size, scale_count * Index(sizeof(T))};
  }
};

/// rescale_rows_scalar on the kernels of `which` (bit-identical for every ISA).
template <class T>
void rescale_rows(isa which, const std::int32_t* acc, Index acc_stride, Index batch, Index cols, const T* sx, T sw,
                  const T* bias, T* y, Index y_stride) noexcept {
#ifdef BITNET_X86
  if constexpr (std::is_same_v<T, float>) {
    // AVX2 for every SIMD ISA: the rescale is a small part of a call, and 8 lanes of doubles suffice.
    if (which != isa::scalar) return rescale_rows_avx2(acc, acc_stride, batch, cols, sx, sw, bias, y, y_stride);
  }
#elif defined(BITNET_ARM64)
  if constexpr (std::is_same_v<T, float>) {
    if (which != isa::scalar) return rescale_rows_neon(acc, acc_stride, batch, cols, sx, sw, bias, y, y_stride);
  }
#endif
  (void)which;
  rescale_rows_scalar(acc, acc_stride, batch, cols, sx, sw, bias, y, y_stride);
}

/// rescale_rows_grouped_scalar (scalar.hpp: the formulas) on the kernels of `which`
/// (bit-identical for every ISA).
template <class T>
void rescale_rows_grouped(isa which, const std::int32_t* acc, Index acc_stride, Index batch, Index row_begin,
                          Index row_end, Index kernel_groups, Index groups, const T* d, const T* sx, bool per_block,
                          const T* bias, T* y, Index y_stride) noexcept {
#ifdef BITNET_X86
  if constexpr (std::is_same_v<T, float>) {
    // AVX2 for every SIMD ISA, as rescale_rows.
    if (which != isa::scalar)
      return rescale_rows_grouped_avx2(acc, acc_stride, batch, row_begin, row_end, kernel_groups, groups, d, sx,
                                       per_block, bias, y, y_stride);
  }
#elif defined(BITNET_ARM64)
  if constexpr (std::is_same_v<T, float>) {
    if (which != isa::scalar)
      return rescale_rows_grouped_neon(acc, acc_stride, batch, row_begin, row_end, kernel_groups, groups, d, sx,
                                       per_block, bias, y, y_stride);
  }
#endif
  (void)which;
  rescale_rows_grouped_scalar(acc, acc_stride, batch, row_begin, row_end, kernel_groups, groups, d, sx, per_block,
                              bias, y, y_stride);
}

/// The epilogue of a grouped ternary_gemm: rescale_rows_grouped of the rows each part computed,
/// clamped to the layer's `out` rows. acc's row stride is the call's virtual rows.
template <class T>
struct grouped_rescale {
  isa which;
  const std::int32_t* acc;
  Index acc_stride, batch, out, kernel_groups, groups;
  const T* d;      // out x groups unit scales, row-major
  const T* sx;     // batch (per token) or batch x groups (per block); a part's own when it quantized its token
  bool per_block;
  const T* bias;   // out, or nullptr
  T* y;
  Index y_stride;

  static void run(const void* self, const void* token_scales, Index row_begin, Index row_end) noexcept {
    const grouped_rescale& r = *static_cast<const grouped_rescale*>(self);
    const T* sx = token_scales ? static_cast<const T*>(token_scales) : r.sx;
    rescale_rows_grouped(r.which, r.acc, r.acc_stride, r.batch, row_begin, std::min(row_end, r.out), r.kernel_groups,
                         r.groups, r.d, sx, r.per_block, r.bias, r.y, r.y_stride);
  }
  gemm_epilogue epilogue() const noexcept { return {run, this}; }
};

}  // namespace BITNET_TU_ISA
}  // namespace detail
}  // namespace bitnet
