// The instruction set the CPU kernels run with, chosen at run time.
//
// The library is compiled for baseline x86-64 (or whatever the target is);
// each kernel body is compiled several times, for AVX-512, for AVX2+FMA and
// portably, under GCC target pragmas (see the kernels' *_body.inc), and the
// handlers pick one per call from `current_isa()`. cpu_isa.cc detects the CPU
// at load and exports the setter that ffi.py calls (JAX_SERVE_CPU_ISA).

#pragma once

#include <atomic>

#if defined(__x86_64__) && !defined(JAX_SERVE_PORTABLE_ONLY)
#define JAX_SERVE_X86 1
// AVX-VNNI (vpdpbusd on ymm, VEX) needs GCC 11 / its avxvnniintrin.h; older
// compilers build the AVX2 path with vpmaddubsw only.
#if defined(__has_include) && !defined(JAX_SERVE_NO_AVX_VNNI)
#if __has_include(<avxvnniintrin.h>)
#define JAX_SERVE_AVX_VNNI 1
#endif
#endif
#endif

namespace jax_serve {

// Code paths, best last.
enum IsaLevel : int { kScalar = 0, kAvx2 = 1, kAvx512 = 2 };

// CPU features (bits of jax_serve_cpu_features()).
enum CpuFeature : int {
  kFeatAvx2 = 1,        // avx2 + fma (with the OS saving ymm state)
  kFeatAvxVnni = 2,     // AVX-VNNI: vpdpbusd on ymm, VEX-encoded
  kFeatAvx512 = 4,      // avx512f + bw + vl + dq (with the OS saving zmm state)
  kFeatAvx512Vnni = 8,  // AVX512-VNNI
};

struct Isa {
  int level;  // IsaLevel
  bool vnni;  // use the level's VNNI int8 dot product
};

// level | vnni << 8, so one load gives a consistent pair.
extern std::atomic<int> g_isa;

inline Isa current_isa() {
  const int v = g_isa.load(std::memory_order_relaxed);
  return Isa{v & 0xff, ((v >> 8) & 1) != 0};
}

}  // namespace jax_serve
