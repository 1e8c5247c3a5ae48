// The Q4 decoder's per-row vector code: GCC vector types (one v16 is a zmm register where the
// CPU has AVX-512; below it GCC keeps a v16 in memory and works on it piece by piece, so the
// attention's x86-64-v3 code uses a pair of 8-float registers instead: q4_attention.cpp) and
// the helpers every clone of its callers inlines.
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

// exp's reduction and polynomial for x already clamped, given fn = floor(x * log2(e) + 0.5).
template <class V, class VI>
__attribute__((always_inline)) inline V vexp_reduced(V x, V fn) {
  const VI n = __builtin_convertvector(fn, VI);
  x = x - fn * 0.693359375f + fn * 2.12194440e-4f;
  const V z = x * x;
  const V y = (((((1.9875691500E-4f * x + 1.3981999507E-3f) * x + 8.3334519073E-3f) * x +
                  4.1665795894E-2f) * x + 1.6666665459E-1f) * x + 5.0000001201E-1f) * z +
              x + 1.f;
  const VI e = (n + 127) << 23;
  V scale;
  std::memcpy(&scale, &e, sizeof(V));
  return y * scale;
}

// exp, Cephes' single-precision polynomial (~1 ulp); inlined into each clone of its callers.
// V: a GCC float vector, VI: the int vector of its width.
template <class V, class VI>
__attribute__((always_inline)) inline V vexp_lanes(V x) {
  const V lo = V{} - 87.3f, hi = V{} + 88.3f;
  x = x < lo ? lo : x;
  x = x > hi ? hi : x;
  V fx = x * 1.44269504088896341f + 0.5f;
  V fn = __builtin_convertvector(__builtin_convertvector(fx, VI), V);
  fn = fn > fx ? fn - 1.f : fn;  // floor
  return vexp_reduced<V, VI>(x, fn);
}
__attribute__((always_inline)) inline v16 vexp(v16 x) { return vexp_lanes<v16, v16i>(x); }

// The larger of each lane (b's where they are equal).
__attribute__((always_inline)) inline v16 vmax(v16 a, v16 b) { return a > b ? a : b; }

}  // namespace irouter::q4
