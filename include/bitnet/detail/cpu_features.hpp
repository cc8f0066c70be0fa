// CPU feature detection for the run-time kernel choice (x86-64: cpuid + xgetbv, so a feature
// counts only when the OS also saves its registers).
#pragma once

#if defined(__x86_64__) || defined(__i386__)
#include <cpuid.h>
#define BITNET_X86 1
#endif

// Kernel symbols live in an inline namespace named after the translation unit's baseline ISA, so
// translation units built with different -m flags never share (and never merge) a kernel symbol.
#if defined(__AVX512F__)
#define BITNET_TU_ISA tu_avx512
#elif defined(__AVX2__)
#define BITNET_TU_ISA tu_avx2
#else
#define BITNET_TU_ISA tu_baseline
#endif

namespace bitnet::detail {

struct cpu_features {
  bool avx2 = false;
  bool avx512_vnni = false;  // AVX-512 F + BW + VL + VNNI
};

inline cpu_features probe_cpu_features() noexcept {
  cpu_features f;
#ifdef BITNET_X86
  unsigned a = 0, b = 0, c = 0, d = 0;
  if (!__get_cpuid(1, &a, &b, &c, &d)) return f;
  const bool osxsave = (c >> 27) & 1, avx = (c >> 28) & 1;
  if (!osxsave || !avx) return f;
  unsigned xcr0_low = 0, xcr0_high = 0;
  __asm__ volatile("xgetbv" : "=a"(xcr0_low), "=d"(xcr0_high) : "c"(0));
  const bool ymm_state = (xcr0_low & 0x6) == 0x6;     // SSE + AVX state
  const bool zmm_state = (xcr0_low & 0xe6) == 0xe6;   // + opmask, ZMM0-15 high, ZMM16-31
  if (!ymm_state || !__get_cpuid_count(7, 0, &a, &b, &c, &d)) return f;
  f.avx2 = (b >> 5) & 1;
  const bool avx512f = (b >> 16) & 1, avx512bw = (b >> 30) & 1, avx512vl = (b >> 31) & 1;
  const bool avx512vnni = (c >> 11) & 1;
  f.avx512_vnni = f.avx2 && zmm_state && avx512f && avx512bw && avx512vl && avx512vnni;
#endif
  return f;
}

/// Probed once per process.
inline const cpu_features& host_cpu_features() noexcept {
  static const cpu_features features = probe_cpu_features();
  return features;
}

}  // namespace bitnet::detail
