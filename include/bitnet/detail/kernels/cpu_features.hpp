// CPU feature detection for the run-time kernel choice (x86-64: cpuid + xgetbv, so a feature
// counts only when the OS also saves its registers; AArch64: what the OS reports, getauxval on
// Linux, sysctl on macOS).
#pragma once

#if defined(__x86_64__) || defined(__i386__)
#include <cpuid.h>
#define BITNET_X86 1
#if defined(__linux__) && defined(__x86_64__)
#include <sys/syscall.h>
#include <unistd.h>
#endif
#endif

// Little-endian AArch64 with the GCC/Clang vector extensions; elsewhere (big-endian, MSVC) the
// scalar kernels run.
#if defined(__aarch64__) && !defined(__AARCH64EB__) && (defined(__GNUC__) || defined(__clang__))
#define BITNET_ARM64 1
#if defined(__linux__)
#include <sys/auxv.h>
#elif defined(__APPLE__)
#include <sys/sysctl.h>

#include <cstddef>
#endif
#endif

// Kernel symbols live in an inline namespace named after the translation unit's baseline ISA, so
// translation units built with different -m flags never share (and never merge) a kernel symbol.
#if defined(__AVX512F__)
#define BITNET_TU_ISA tu_avx512
#elif defined(__AVX2__)
#define BITNET_TU_ISA tu_avx2
#elif defined(__ARM_FEATURE_MATMUL_INT8)
#define BITNET_TU_ISA tu_i8mm
#elif defined(__ARM_FEATURE_DOTPROD)
#define BITNET_TU_ISA tu_dotprod
#else
#define BITNET_TU_ISA tu_baseline
#endif

namespace bitnet::detail {

struct cpu_features {
  bool avx2 = false;
  bool avx512_vnni = false;  // AVX-512 F + BW + VL + VNNI
  bool avx512_vbmi = false;  // and VBMI (vpermi2b: the 1.6-bit kernels' byte table, kernels/base3.hpp)
  bool amx_int8 = false;     // AMX-TILE + AMX-INT8 reported by the CPU (the OS must still allow it)
  bool neon = false;         // AArch64 Advanced SIMD
  bool dotprod = false;      // SDOT/UDOT (FEAT_DotProd, Armv8.2)
  bool i8mm = false;         // SMMLA (FEAT_I8MM, Armv8.6)
};

#ifdef BITNET_ARM64
/// Linux reports AArch64 features in the auxiliary vector (bit numbers from the kernel's
/// uapi/asm/hwcap.h, spelled out in case the libc headers predate them); macOS by sysctl names.
inline void probe_arm_features(cpu_features& f) noexcept {
#if defined(__linux__)
  constexpr unsigned long hwcap_asimd = 1ul << 1, hwcap_asimddp = 1ul << 20, hwcap2_i8mm = 1ul << 13;
  const unsigned long hwcap = getauxval(AT_HWCAP), hwcap2 = getauxval(AT_HWCAP2);
  f.neon = (hwcap & hwcap_asimd) != 0;
  f.dotprod = f.neon && (hwcap & hwcap_asimddp) != 0;
  f.i8mm = f.dotprod && (hwcap2 & hwcap2_i8mm) != 0;
#elif defined(__APPLE__)
  f.neon = true;  // every Apple arm64 CPU has Advanced SIMD
  const auto has = [](const char* name) {
    int value = 0;
    std::size_t size = sizeof value;
    return sysctlbyname(name, &value, &size, nullptr, 0) == 0 && value != 0;
  };
  f.dotprod = has("hw.optional.arm.FEAT_DotProd");
  f.i8mm = f.dotprod && has("hw.optional.arm.FEAT_I8MM");
#endif
}
#endif

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
  f.avx512_vbmi = f.avx512_vnni && ((c >> 1) & 1);
  f.amx_int8 = ((d >> 24) & 1) && ((d >> 25) & 1);
#elif defined(BITNET_ARM64)
  probe_arm_features(f);
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
