// bitnet/kernels_base3.hpp - the run-time dispatch of the 1.6-bit kernels (pack_base3.hpp,
// detail/kernels/base3.hpp), with the ISA choice and thread count of kernels.hpp.
//
// Which kernel each ISA runs:
//   scalar                 ternary_gemm_base3_scalar (the plain digits)
//   avx2                   ternary_gemm_base3_avx2
//   avx512, amx            ternary_gemm_base3_avx512 where the CPU has AVX-512 VBMI (vpermi2b), else
//                          the AVX2 kernel; AMX tiles are not used (every batch runs per token)
//   dotprod, i8mm          ternary_gemm_base3_dotprod (SDOT; SMMLA is not used)
//   neon                   ternary_gemm_base3_neon (TBL / TBX decode into the 2-bit byte, SMLAL)
// Batch > 1: AVX-512 decodes each tile once for a tile of up to 16 tokens (interleaved activations,
// as kernels.hpp's batch kernels), SDOT once for up to 4 tokens, NEON once for 2, each over chunks of
// row blocks that stay in L1 / L2; AVX2 runs its batch-1 kernel once per token over such chunks,
// paying the decode once per token (docs/kernels.md).
#pragma once

#include <algorithm>
#include <optional>

#include "detail/kernels/base3.hpp"
#include "kernels.hpp"

namespace bitnet::detail {
inline namespace BITNET_TU_ISA {

/// Whether isa::avx512 / isa::amx run the AVX-512 base-3 kernel (needs VBMI) rather than the AVX2 one.
inline bool base3_avx512_usable() noexcept {
#if defined(BITNET_TEST_EMULATED_AVX512)
  return true;  // tests/avx512_emulation.hpp: SIMDe emulates VBMI too
#else
  return host_cpu_features().avx512_vbmi;
#endif
}

/// One 1.6-bit kernel call shared out over the pool: part i computes row blocks
/// [i * per_part, min((i + 1) * per_part, row_blocks)), then runs the epilogue on their rows. With
/// tokens, each part first quantizes the token itself (token_quantizer, kernels.hpp).
struct base3_gemm_job {
  isa which;
  gemm_args args;
  const std::int8_t* interleaved;  // AVX-512 batch > 1: the activations by token tile; else args.x
  Index per_part, row_blocks;
  gemm_epilogue epilogue;
  const part_tokens* tokens = nullptr;

  void run_range(Index part, Index begin, Index end) const noexcept {
    if (!tokens) return run_range(args, interleaved, nullptr, begin, end);
    gemm_args own = args;  // batch 1: the token's codes are also what the AVX-512 kernel takes as interleaved
    const void* scales;
    if (tokens->quantize(part, own.x, own.x_sums, scales)) run_range(own, own.x, scales, begin, end);
  }

  void run_range(const gemm_args& a, [[maybe_unused]] const std::int8_t* xi, const void* token_scales, Index begin,
                 Index end) const noexcept {
    switch (which) {
#ifdef BITNET_X86
      case isa::amx:
      case isa::avx512:
        if (base3_avx512_usable()) {
          ternary_gemm_base3_avx512(a, xi, begin, end);
          break;
        }
        [[fallthrough]];
      case isa::avx2: ternary_gemm_base3_avx2(a, begin, end); break;
#endif
#ifdef BITNET_ARM64
#ifdef BITNET_HAS_DOTPROD_KERNEL
      case isa::i8mm:
      case isa::dotprod: ternary_gemm_base3_dotprod(a, begin, end); break;
#endif
      case isa::neon: ternary_gemm_base3_neon(a, begin, end); break;
#endif
      default: ternary_gemm_base3_scalar(a, begin, end); break;
    }
    if (epilogue.run)
      epilogue.run(epilogue.context, token_scales, begin * tile_rows, std::min(end * tile_rows, a.rows));
  }

  static void run_part(const void* self, Index part) noexcept {
    const base3_gemm_job& job = *static_cast<const base3_gemm_job*>(self);
    const Index begin = part * job.per_part;
    job.run_range(part, begin, std::min(begin + job.per_part, job.row_blocks));
  }
};

/// ternary_gemm for the 1.6-bit layout: a.weights is packed_base3::data(), a.col_tiles its 20-column
/// tiles per row block, a.x zero-padded to at least 20 * col_tiles columns, a.groups 1. Split into
/// contiguous row ranges as ternary_gemm splits them (bit-identical for any thread count). With a
/// quantizer (batch 1), every part quantizes the token itself, as in ternary_gemm: false if the
/// token is not finite (no epilogue ran then), else true.
inline bool ternary_gemm_base3(isa which, const gemm_args& a, Index row_blocks, int threads,
                               double min_work = min_work_per_thread, gemm_epilogue epilogue = {},
                               const token_quantizer& quantizer = {}) {
  last_run_isa = which;
  base3_gemm_job job{which, a, a.x, row_blocks, row_blocks, epilogue};
#ifdef BITNET_X86
  if ((which == isa::avx512 || which == isa::amx) && a.batch > 1 && base3_avx512_usable()) {
    std::int8_t* xi = thread_scratch_of<std::int8_t, scratch_slot::interleaved>(std::size_t(a.batch * a.x_stride));
    interleave_tokens(a, avx512_token_tile, xi);
    job.interleaved = xi;
  }
#endif
  const double work =
      double(a.batch) * double(row_blocks) * double(a.col_tiles) * double(tile_rows * base3_tile_cols);
  const Index by_work = min_work > 0 ? Index(std::min(work / min_work, 1e9)) : row_blocks;
  const Index parts = std::clamp<Index>(by_work, 1, std::min<Index>(threads, row_blocks));
  job.per_part = (row_blocks + parts - 1) / parts;
  const Index used_parts = (row_blocks + job.per_part - 1) / job.per_part;
  std::optional<part_tokens> tokens;
  if (quantizer.run) job.tokens = &tokens.emplace(quantizer, used_parts);
  if (used_parts == 1) {
    job.run_range(0, 0, row_blocks);
  } else {
    thread_pool::instance().run(used_parts, base3_gemm_job::run_part, &job);
  }
  return !tokens || !tokens->failed();
}

}  // namespace BITNET_TU_ISA
}  // namespace bitnet::detail
