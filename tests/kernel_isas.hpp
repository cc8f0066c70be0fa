// The kernel ISAs a kernel test compares: what this CPU runs, plus AVX-512 and AMX wherever the
// test is built with tests/avx512_emulation.hpp and tests/amx_emulation.hpp.
#pragma once

#include <vector>

#include <bitnet/kernels.hpp>

namespace kernel_isas {

#ifdef BITNET_TEST_EMULATED_AVX512
inline constexpr bool emulated_avx512 = true;
#else
inline constexpr bool emulated_avx512 = false;
#endif
#ifdef BITNET_TEST_EMULATED_AMX
inline constexpr bool emulated_amx = true;
#else
inline constexpr bool emulated_amx = false;
#endif

// The SIMD ISAs this CPU runs (the scalar kernel is always compared too); AVX-512 and AMX always
// where this file is built with the emulation headers.
inline std::vector<bitnet::isa> runnable_isas() {
  using bitnet::isa;
  std::vector<isa> isas{isa::scalar};
  for (isa which : bitnet::all_isas)
    if (which != isa::scalar && (bitnet::isa_supported(which) || (which == isa::avx512 && emulated_avx512) ||
                                 (which == isa::amx && emulated_amx)))
      isas.push_back(which);
  return isas;
}

}  // namespace kernel_isas
