// bitnet/kernels.hpp - run-time choice of the int8 x ternary kernels, and their thread count.
//
// The kernel ISA is chosen at run time from the CPU, once, so a program built with plain -O2 and
// no -march flags still runs the AVX2 or AVX-512 VNNI kernels. Order of precedence:
//   force_isa(...)  >  environment variable BITNET_ISA (scalar | avx2 | avx512)  >  best_isa().
// Threads: set_num_threads(n)  >  BITNET_NUM_THREADS  >  std::thread::hardware_concurrency().
// Every ISA and every thread count gives bit-identical results: the accumulators are exact int32.
#pragma once

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <cstdlib>
#include <optional>
#include <string>
#include <string_view>
#include <thread>
#include <type_traits>

#include "detail/cpu_features.hpp"
#include "detail/kernels_avx2.hpp"
#include "detail/kernels_avx512.hpp"
#include "detail/kernels_scalar.hpp"
#include "detail/thread_pool.hpp"
#include "errors.hpp"
#include "matrix.hpp"

namespace bitnet {

/// The largest in_features computed exactly. The kernels accumulate sum_k x_k * (w_k + 1) with
/// |x_k| <= 128 and w_k + 1 <= 2 over the columns padded to a multiple of 128, in int32:
/// 256 * (2^23 - 128) < 2^31.
inline constexpr Index max_in_features = (Index{1} << 23) - 128;

enum class isa { scalar, avx2, avx512 };

inline std::string_view isa_name(isa which) noexcept {
  switch (which) {
    case isa::avx2: return "avx2";
    case isa::avx512: return "avx512";
    default: return "scalar";
  }
}

/// Whether this CPU (and OS) can run the kernels of `which`; scalar always can.
inline bool isa_supported(isa which) noexcept {
  const detail::cpu_features& cpu = detail::host_cpu_features();
  switch (which) {
    case isa::avx2: return cpu.avx2;
    case isa::avx512: return cpu.avx512_vnni;
    default: return true;
  }
}

/// The fastest ISA this CPU supports.
inline isa best_isa() noexcept {
  return isa_supported(isa::avx512) ? isa::avx512 : isa_supported(isa::avx2) ? isa::avx2 : isa::scalar;
}

namespace detail {

inline constexpr int no_forced_isa = -1;
inline std::atomic<int> forced_isa{no_forced_isa};
inline std::atomic<int> requested_threads{0};
inline thread_local isa last_run_isa = isa::scalar;

inline std::optional<isa> parse_isa(std::string_view name) noexcept {
  for (isa which : {isa::scalar, isa::avx2, isa::avx512})
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
      r.error = std::string("BITNET_ISA=") + value + " names no kernel ISA (use scalar, avx2 or avx512)";
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

/// Below this many multiply-adds per thread a thread costs more than it saves.
inline constexpr double min_work_per_thread = 1 << 21;

inline void run_gemm_range(isa which, const gemm_args& a, Index begin, Index end) noexcept {
  switch (which) {
#ifdef BITNET_X86
    case isa::avx512: ternary_gemm_avx512(a, begin, end); break;
    case isa::avx2: ternary_gemm_avx2(a, begin, end); break;
#endif
    default: ternary_gemm_scalar(a, begin, end); break;
  }
}

/// One kernel call's share-out over the pool: part i computes row blocks
/// [i * per_part, min((i + 1) * per_part, row_blocks)).
struct gemm_split {
  isa which;
  const gemm_args* args;
  Index per_part, row_blocks;

  static void run_part(const void* self, Index part) noexcept {
    const gemm_split& s = *static_cast<const gemm_split*>(self);
    const Index begin = part * s.per_part;
    run_gemm_range(s.which, *s.args, begin, std::min(begin + s.per_part, s.row_blocks));
  }
};

/// The product of gemm_args for the row blocks, split into contiguous row ranges over at most
/// `threads` threads (the caller's and the pool's, detail/thread_pool.hpp), each given at least
/// min_work multiply-adds. Every output is computed whole by one thread, so the split never
/// changes a result.
inline void run_gemm_split(isa which, const gemm_args& a, Index row_blocks, int threads, double min_work) {
  const double work = double(a.batch) * double(row_blocks) * double(a.col_blocks) * 512.0;
  const Index by_work = min_work > 0 ? Index(std::min(work / min_work, 1e9)) : row_blocks;
  const Index parts = std::clamp<Index>(by_work, 1, std::min<Index>(threads, row_blocks));
  if (parts == 1) return run_gemm_range(which, a, 0, row_blocks);  // the pool is not even created
  const Index per_part = (row_blocks + parts - 1) / parts;
  const gemm_split split{which, &a, per_part, row_blocks};
  thread_pool::instance().run((row_blocks + per_part - 1) / per_part, gemm_split::run_part, &split);
}

/// The product of gemm_args for all row_blocks on the kernels of `which` (see run_gemm_split).
inline void ternary_gemm(isa which, const gemm_args& a, Index row_blocks, int threads,
                         double min_work = min_work_per_thread) {
  last_run_isa = which;
#ifdef BITNET_X86
  aligned_vector<std::int8_t> doubled;
  if (which == isa::avx512) {  // the AVX-512 kernels read every activation plane twice side by side
    doubled = duplicate_planes_avx512(a);
    gemm_args widened = a;
    widened.x = doubled.data();
    widened.x_stride = 2 * a.x_stride;
    run_gemm_split(which, widened, row_blocks, threads, min_work);
    return;
  }
#endif
  run_gemm_split(which, a, row_blocks, threads, min_work);
}

/// quantize_activations for `rows` rows of x (row stride x_stride), into q (row stride
/// q_stride, zero-padded after cols), scales and per-row code sums. Returns false if any input
/// is not finite.
template <class T>
bool quantize_rows(isa which, const T* x, Index x_stride, Index rows, Index cols, std::int8_t* q, Index q_stride,
                   T* scales, std::int32_t* sums) noexcept {
  last_run_isa = which;
  for (Index r = 0; r < rows; ++r) {
    bool finite;
#ifdef BITNET_X86
    if constexpr (std::is_same_v<T, float>) {
      if (which != isa::scalar)
        finite = quantize_row_avx2(x + r * x_stride, cols, q_stride, q + r * q_stride, scales[r], sums[r]);
      else
        finite = quantize_row_scalar(x + r * x_stride, cols, q_stride, q + r * q_stride, scales[r], sums[r]);
    } else
#endif
      finite = quantize_row_scalar(x + r * x_stride, cols, q_stride, q + r * q_stride, scales[r], sums[r]);
    if (!finite) return false;
  }
  return true;
}

}  // namespace BITNET_TU_ISA
}  // namespace detail
}  // namespace bitnet
