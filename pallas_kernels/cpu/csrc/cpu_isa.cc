// CPU feature detection and the exported ISA setter (see cpu_isa.h).

#include "cpu_isa.h"

#ifdef JAX_SERVE_X86
#include <cpuid.h>
#endif

namespace jax_serve {
namespace {

int detect_features() {
  int f = 0;
#ifdef JAX_SERVE_X86
  // libgcc's checks include the OS's xgetbv state bits for ymm / zmm.
  __builtin_cpu_init();
  if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) f |= kFeatAvx2;
  if ((f & kFeatAvx2) && __builtin_cpu_supports("avx512f") &&
      __builtin_cpu_supports("avx512bw") && __builtin_cpu_supports("avx512vl") &&
      __builtin_cpu_supports("avx512dq"))
    f |= kFeatAvx512;
  if ((f & kFeatAvx512) && __builtin_cpu_supports("avx512vnni")) f |= kFeatAvx512Vnni;
#ifdef JAX_SERVE_AVX_VNNI
  // AVX-VNNI is CPUID.(EAX=7, ECX=1):EAX bit 4 (older compilers lack the
  // __builtin_cpu_supports name); it needs only the ymm state checked above.
  // Reported only when this build has the code for it.
  unsigned a = 0, b = 0, c = 0, d = 0;
  if ((f & kFeatAvx2) && __get_cpuid_count(7, 1, &a, &b, &c, &d) && (a & (1u << 4)))
    f |= kFeatAvxVnni;
#endif
#endif
  return f;
}

const int kFeatures = detect_features();

bool runnable(int level, bool vnni) {
  switch (level) {
    case kScalar: return !vnni;
    case kAvx2: return (kFeatures & kFeatAvx2) && (!vnni || (kFeatures & kFeatAvxVnni));
    case kAvx512: return (kFeatures & kFeatAvx512) && (!vnni || (kFeatures & kFeatAvx512Vnni));
    default: return false;
  }
}

int best() {
  if (kFeatures & kFeatAvx512) return kAvx512 | ((kFeatures & kFeatAvx512Vnni) ? 1 << 8 : 0);
  if (kFeatures & kFeatAvx2) return kAvx2 | ((kFeatures & kFeatAvxVnni) ? 1 << 8 : 0);
  return kScalar;
}

}  // namespace

std::atomic<int> g_isa{best()};

}  // namespace jax_serve

extern "C" {

// Bits of jax_serve::CpuFeature the CPU (and OS) support.
int jax_serve_cpu_features() { return jax_serve::kFeatures; }

// Forces a path for calls that start afterwards; -1 (no change) if the CPU
// cannot run it. level: 0 scalar, 1 avx2, 2 avx512; vnni: 0 or 1.
int jax_serve_set_isa(int level, int vnni) {
  if (!jax_serve::runnable(level, vnni != 0)) return -1;
  jax_serve::g_isa.store(level | (vnni ? 1 << 8 : 0), std::memory_order_relaxed);
  return 0;
}

// The current path, level | vnni << 8.
int jax_serve_get_isa() { return jax_serve::g_isa.load(std::memory_order_relaxed); }

}  // extern "C"
