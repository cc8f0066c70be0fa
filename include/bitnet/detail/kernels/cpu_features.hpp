// CPU feature detection for the run-time kernel choice (x86-64: cpuid + xgetbv, so a feature
// counts only when the OS also saves its registers).
#pragma once

#if defined(__x86_64__) || defined(__i386__)
#include <cpuid.h>
#define BITNET_X86 1
#if defined(__linux__) && defined(__x86_64__)
#include <sys/syscall.h>
#include <unistd.h>
#endif
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
  bool amx_int8 = false;     // AMX-TILE + AMX-INT8 reported by the CPU (the OS must still allow it)
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
  f.amx_int8 = ((d >> 24) & 1) && ((d >> 25) & 1);
#endif
  return f;
}

/// Probed once per process.
inline const cpu_features& host_cpu_features() noexcept {
  static const cpu_features features = probe_cpu_features();
  return features;
}

/// Whether this process may use the AMX tiles: Linux hands out the 8 KiB tile state only to a
/// process that asks for it (arch_prctl ARCH_REQ_XCOMP_PERM for XTILEDATA, once per process), and
/// then XCR0 must show the tile state enabled. Elsewhere (other systems, older kernels) AMX is
/// reported unusable and the AVX-512 kernels run instead.
inline bool amx_int8_usable() noexcept {
  static const bool usable = [] {
#if defined(BITNET_X86) && defined(__linux__) && defined(__x86_64__) && defined(SYS_arch_prctl)
    if (!host_cpu_features().amx_int8) return false;
    constexpr long arch_req_xcomp_perm = 0x1023, xfeature_xtiledata = 18;
    if (syscall(SYS_arch_prctl, arch_req_xcomp_perm, xfeature_xtiledata) != 0) return false;
    unsigned xcr0_low = 0, xcr0_high = 0;
    __asm__ volatile("xgetbv" : "=a"(xcr0_low), "=d"(xcr0_high) : "c"(0));
    return (xcr0_low & 0x60000) == 0x60000;  // XTILECFG and XTILEDATA
#else
    return false;
#endif
  }();
  return usable;
}

}  // namespace bitnet::detail
