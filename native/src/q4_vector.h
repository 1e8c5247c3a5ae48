// The Q4 decoder's per-row vector code: GCC vector types (one v16 is a zmm register where the
// CPU has AVX-512, two ymm under AVX2) and the helpers every clone of its callers inlines.
#pragma once

#include <cstring>

namespace irouter::q4 {

// Each function marked so is compiled three times and chosen by the CPU at load: AVX-512 (the
// x86-64-v4 level), AVX2 with FMA (v3) and plain x86-64.
#define IROUTER_CLONES \
  __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))

typedef float v16 __attribute__((vector_size(64)));
typedef int v16i __attribute__((vector_size(64)));
typedef float v16u __attribute__((vector_size(64), aligned(4)));  // v16 at any float's address

// Whole-vector loads and stores (a memcpy into an array of v16 can leave the array in memory).
__attribute__((always_inline)) inline v16 load(const float* p) {
  return *reinterpret_cast<const v16u*>(p);
}
__attribute__((always_inline)) inline void store(float* p, v16 v) {
  *reinterpret_cast<v16u*>(p) = v;
}

// exp, Cephes' single-precision polynomial (~1 ulp); inlined into each clone of its callers.
__attribute__((always_inline)) inline v16 vexp(v16 x) {
  const v16 lo = v16{} - 87.3f, hi = v16{} + 88.3f;
  x = x < lo ? lo : x;
  x = x > hi ? hi : x;
  v16 fx = x * 1.44269504088896341f + 0.5f;
  v16 fn = __builtin_convertvector(__builtin_convertvector(fx, v16i), v16);
  fn = fn > fx ? fn - 1.f : fn;  // floor
  const v16i n = __builtin_convertvector(fn, v16i);
  x = x - fn * 0.693359375f + fn * 2.12194440e-4f;
  const v16 z = x * x;
  const v16 y = (((((1.9875691500E-4f * x + 1.3981999507E-3f) * x + 8.3334519073E-3f) * x +
                   4.1665795894E-2f) * x + 1.6666665459E-1f) * x + 5.0000001201E-1f) * z +
                x + 1.f;
  const v16i e = (n + 127) << 23;
  v16 scale;
  std::memcpy(&scale, &e, 64);
  return y * scale;
}

}  // namespace irouter::q4
