// See q4_attention.h. Compiled with -ffp-contract=fast (native/CMakeLists.txt): the dot
// products and the weighted sums of values are fused multiply-adds in the clones that have them.
#include "q4_attention.h"

#include <immintrin.h>

#include <algorithm>
#include <cstring>
#include <vector>

#include "q4_vector.h"

namespace irouter::q4 {
namespace {

// How keys and values are read: floats as they are (Floats, q4_attention_kernel.inc); halves
// widened by F16C's or AVX-512's conversion instructions (GCC 12 converts a _Float16 vector
// element by element, and target intrinsics cannot be inlined into target-less templates): the
// half-precision kernels are the same templates compiled again under #pragma GCC target for
// x86-64-v4 and v3, chosen at load.

namespace generic {
constexpr bool kWidenRuns = false;
#include "q4_attention_kernel.inc"
}  // namespace generic

#pragma GCC push_options
#pragma GCC target("arch=x86-64-v4")
namespace v4 {
struct Halves {
  __attribute__((always_inline)) static inline v16 load(const _Float16* p) {
    const __m512 x = _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
    v16 r;
    std::memcpy(&r, &x, 64);
    return r;
  }
};
constexpr bool kWidenRuns = false;
#include "q4_attention_kernel.inc"
void attend(const float* q, size_t ldq, int R, int G, const _Float16* K, const _Float16* V,
            int p0, float scale, float* sc, float* acc, float* out, size_t ldo,
            const KVPrefix<_Float16>& prefix) {
  attend_kv<Halves>(q, ldq, R, G, K, V, p0, scale, sc, acc, out, ldo, prefix);
}
void store_half(_Float16* dst, const float* src, int n) {
  for (int i = 0; i < n; i += 16)
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(dst + i),
                        _mm512_cvtps_ph(_mm512_loadu_ps(src + i), _MM_FROUND_TO_NEAREST_INT));
}
}  // namespace v4
#pragma GCC pop_options

#pragma GCC push_options
#pragma GCC target("arch=x86-64-v3")
namespace v3 {
// GCC has no 16-float register below AVX-512 and keeps each GCC v16 in memory here, worked on
// piece by piece: the attention ran ~11x slower than under v4 (BENCHMARKS.md, 2026-12-07). So
// the templates are instantiated here over a pair of 8-float registers; each lane does the same
// operations as v4's, so the results are the same bits (tests).
typedef float v8 __attribute__((vector_size(32)));
typedef int v8i __attribute__((vector_size(32)));
typedef float v8u __attribute__((vector_size(32), aligned(4)));
struct v16 {
  v8 l, h;
  float operator[](int i) const { return i < 8 ? l[i] : h[i - 8]; }
  float& operator[](int i) { return reinterpret_cast<float*>(this)[i]; }  // vectors alias floats
};
#define IROUTER_V3_AI __attribute__((always_inline)) inline
IROUTER_V3_AI v16 operator+(v16 a, v16 b) { return {a.l + b.l, a.h + b.h}; }
IROUTER_V3_AI v16 operator*(v16 a, v16 b) { return {a.l * b.l, a.h * b.h}; }
IROUTER_V3_AI v16 operator+(v16 a, float b) { return {a.l + b, a.h + b}; }
IROUTER_V3_AI v16 operator-(v16 a, float b) { return {a.l - b, a.h - b}; }
IROUTER_V3_AI v16 operator*(v16 a, float b) { return {a.l * b, a.h * b}; }
IROUTER_V3_AI v16 operator*(float a, v16 b) { return {a * b.l, a * b.h}; }
IROUTER_V3_AI v16& operator+=(v16& a, v16 b) { return a = a + b; }
IROUTER_V3_AI v16 load(const float* p) {
  return {*reinterpret_cast<const v8u*>(p), *reinterpret_cast<const v8u*>(p + 8)};
}
IROUTER_V3_AI void store(float* p, v16 v) {
  *reinterpret_cast<v8u*>(p) = v.l;
  *reinterpret_cast<v8u*>(p + 8) = v.h;
}
// vexp_lanes' operations, with its clamps and floor as AVX's max, min and round: GCC makes
// those selects compares and variable blends (3 uops each on Intel cores). Each gives the same
// lanes as the select it replaces (max(lo, x) and min(hi, x) return x where x is NaN, as the
// selects do; the floor is exact either way): the same bits. Measured as the widening in
// q4_attention_kernel.inc: 82-86 -> 77-81 us.
IROUTER_V3_AI v8 vexp8(v8 x) {
  x = _mm256_min_ps(_mm256_set1_ps(88.3f), _mm256_max_ps(_mm256_set1_ps(-87.3f), x));
  return vexp_reduced<v8, v8i>(x, _mm256_floor_ps(x * 1.44269504088896341f + 0.5f));
}
IROUTER_V3_AI v16 vexp(v16 x) { return {vexp8(x.l), vexp8(x.h)}; }
IROUTER_V3_AI v16 vmax(v16 a, v16 b) { return {a.l > b.l ? a.l : b.l, a.h > b.h ? a.h : b.h}; }
// The butterfly's levels (q4_attention_kernel.inc) on the halves: lane i of the result adds the
// same two values as there. Levels 3 and 4 pair lanes within each 128-bit half (vshufps), then
// put the 64-bit pairs in order (vpermpd): GCC's cross-lane permutes, with their index vectors
// reloaded, took ~3% longer over a burst follower's run (81.2 against 83.6 us, medians of 6).
IROUTER_V3_AI v8 pairs(v8 a, v8 b, int level) {
  switch (level) {
    case 2:
      return __builtin_shufflevector(a, b, 0, 1, 2, 3, 8, 9, 10, 11) +
             __builtin_shufflevector(a, b, 4, 5, 6, 7, 12, 13, 14, 15);
    case 3: {  // a0 + a2, a1 + a3, a4 + a6, a5 + a7, then b's
      const v8 s = _mm256_add_ps(_mm256_shuffle_ps(a, b, 0x44), _mm256_shuffle_ps(a, b, 0xEE));
      return _mm256_castpd_ps(_mm256_permute4x64_pd(_mm256_castps_pd(s), 0xD8));
    }
    default: {  // a0 + a1, a2 + a3, a4 + a5, a6 + a7, then b's
      const v8 s = _mm256_add_ps(_mm256_shuffle_ps(a, b, 0x88), _mm256_shuffle_ps(a, b, 0xDD));
      return _mm256_castpd_ps(_mm256_permute4x64_pd(_mm256_castps_pd(s), 0xD8));
    }
  }
}
IROUTER_V3_AI v16 level1(v16 x, v16 y) { return {x.l + x.h, y.l + y.h}; }
IROUTER_V3_AI v16 level2(v16 x, v16 y) { return {pairs(x.l, x.h, 2), pairs(y.l, y.h, 2)}; }
IROUTER_V3_AI v16 level3(v16 x, v16 y) { return {pairs(x.l, x.h, 3), pairs(y.l, y.h, 3)}; }
IROUTER_V3_AI v16 level4(v16 x, v16 y) { return {pairs(x.l, x.h, 4), pairs(y.l, y.h, 4)}; }
#undef IROUTER_V3_AI
#define IROUTER_Q4_LEVELS
struct Halves {
  __attribute__((always_inline)) static inline v16 load(const _Float16* p) {
    return {_mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))),
            _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p + 8)))};
  }
};
constexpr bool kWidenRuns = true;
#include "q4_attention_kernel.inc"
#undef IROUTER_Q4_LEVELS
void attend(const float* q, size_t ldq, int R, int G, const _Float16* K, const _Float16* V,
            int p0, float scale, float* sc, float* acc, float* out, size_t ldo,
            const KVPrefix<_Float16>& prefix) {
  attend_kv<Halves>(q, ldq, R, G, K, V, p0, scale, sc, acc, out, ldo, prefix);
}
void store_half(_Float16* dst, const float* src, int n) {
  for (int i = 0; i < n; i += 8)
    _mm_storeu_si128(reinterpret_cast<__m128i*>(dst + i),
                     _mm256_cvtps_ph(_mm256_loadu_ps(src + i), _MM_FROUND_TO_NEAREST_INT));
}
}  // namespace v3
#pragma GCC pop_options

}  // namespace

bool half_kv_supported() {
  __builtin_cpu_init();
  return __builtin_cpu_supports("x86-64-v3");
}

IROUTER_CLONES void attend(const float* q, size_t ldq, int R, int G, const float* K, const float* V,
                           int p0, float scale, float* sc, float* acc, float* out, size_t ldo,
                           const KVPrefix<float>& prefix) {
  generic::attend_kv<generic::Floats>(q, ldq, R, G, K, V, p0, scale, sc, acc, out, ldo, prefix);
}

void attend(const float* q, size_t ldq, int R, int G, const _Float16* K, const _Float16* V,
            int p0, float scale, float* sc, float* acc, float* out, size_t ldo, bool avx2,
            const KVPrefix<_Float16>& prefix) {
  (avx2 ? v3::attend : v4::attend)(q, ldq, R, G, K, V, p0, scale, sc, acc, out, ldo, prefix);
}

void store_kv(float* dst, const float* src, int n) { std::memcpy(dst, src, sizeof(float) * n); }

void store_kv(_Float16* dst, const float* src, int n, bool avx2) {
  (avx2 ? v3::store_half : v4::store_half)(dst, src, n);
}

}  // namespace irouter::q4
