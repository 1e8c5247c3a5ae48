// See q4_attention.h. Compiled with -ffp-contract=fast (native/CMakeLists.txt): the dot
// products and the weighted sums of values are fused multiply-adds in the clones that have them.
#include "q4_attention.h"

#include <immintrin.h>

#include <algorithm>
#include <cstring>

#include "q4_vector.h"

namespace irouter::q4 {
namespace {

// How keys and values are read: floats as they are; halves widened by F16C's or AVX-512's
// conversion instructions (GCC 12 converts a _Float16 vector element by element, and target
// intrinsics cannot be inlined into target-less templates): the half-precision kernels are the
// same templates compiled again under #pragma GCC target for x86-64-v4 and v3, chosen at load.
struct Floats {
  __attribute__((always_inline)) static inline v16 load(const float* p) { return q4::load(p); }
};

namespace generic {
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
#include "q4_attention_kernel.inc"
void attend(const float* q, size_t ldq, int R, int G, const _Float16* K, const _Float16* V,
            int p0, float scale, float* sc, float* acc, float* out, size_t ldo) {
  attend_kv<Halves>(q, ldq, R, G, K, V, p0, scale, sc, acc, out, ldo);
}
void store(_Float16* dst, const float* src, int n) {
  for (int i = 0; i < n; i += 16)
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(dst + i),
                        _mm512_cvtps_ph(_mm512_loadu_ps(src + i), _MM_FROUND_TO_NEAREST_INT));
}
}  // namespace v4
#pragma GCC pop_options

#pragma GCC push_options
#pragma GCC target("arch=x86-64-v3")
namespace v3 {
struct Halves {
  __attribute__((always_inline)) static inline v16 load(const _Float16* p) {
    const __m256 lo = _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
    const __m256 hi = _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p + 8)));
    v16 r;
    std::memcpy(&r, &lo, 32);
    std::memcpy(reinterpret_cast<char*>(&r) + 32, &hi, 32);
    return r;
  }
};
#include "q4_attention_kernel.inc"
void attend(const float* q, size_t ldq, int R, int G, const _Float16* K, const _Float16* V,
            int p0, float scale, float* sc, float* acc, float* out, size_t ldo) {
  attend_kv<Halves>(q, ldq, R, G, K, V, p0, scale, sc, acc, out, ldo);
}
void store(_Float16* dst, const float* src, int n) {
  for (int i = 0; i < n; i += 8)
    _mm_storeu_si128(reinterpret_cast<__m128i*>(dst + i),
                     _mm256_cvtps_ph(_mm256_loadu_ps(src + i), _MM_FROUND_TO_NEAREST_INT));
}
}  // namespace v3
#pragma GCC pop_options

bool has_v4() {
  __builtin_cpu_init();
  return __builtin_cpu_supports("x86-64-v4");
}

}  // namespace

bool half_kv_supported() {
  __builtin_cpu_init();
  return __builtin_cpu_supports("x86-64-v3");
}

IROUTER_CLONES void attend(const float* q, size_t ldq, int R, int G, const float* K, const float* V,
                           int p0, float scale, float* sc, float* acc, float* out, size_t ldo) {
  generic::attend_kv<Floats>(q, ldq, R, G, K, V, p0, scale, sc, acc, out, ldo);
}

void attend(const float* q, size_t ldq, int R, int G, const _Float16* K, const _Float16* V,
            int p0, float scale, float* sc, float* acc, float* out, size_t ldo, bool avx2) {
  static const auto best = has_v4() ? v4::attend : v3::attend;
  (avx2 ? v3::attend : best)(q, ldq, R, G, K, V, p0, scale, sc, acc, out, ldo);
}

void store_kv(float* dst, const float* src, int n) { std::memcpy(dst, src, sizeof(float) * n); }

void store_kv(_Float16* dst, const float* src, int n, bool avx2) {
  static const auto best = has_v4() ? v4::store : v3::store;
  (avx2 ? v3::store : best)(dst, src, n);
}

}  // namespace irouter::q4
