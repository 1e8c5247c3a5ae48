// Written by hand: glibc's vector exp (libmvec) is reached only through -ffast-math, which
// would also reorder the sampler's float32 arithmetic that must match NumPy bit for bit, and
// no vector math library is a dependency here. The method is the textbook one (Cody-Waite
// reduction by ln 2, then a degree-13 Taylor polynomial: its truncation error is below
// 5e-18 relative for |r| <= ln2 / 2, so Horner's rounding sets the accuracy).
#include "vector_math.h"

#include <cmath>

#if defined(__x86_64__)
#include <immintrin.h>
#endif

namespace irouter::sampling {

namespace {

constexpr double kLog2e = 1.4426950408889634;
constexpr double kLn2Hi = 6.93147180369123816490e-01;  // 32 trailing zero bits: k * it is exact
constexpr double kLn2Lo = 1.90821492927058770002e-10;
constexpr double kFloor = -708.0;  // exp(-708) ~ 3.3e-308: below it, 0
// 1 / i! for i = 13 down to 2 (Horner's order).
constexpr double kInvFact[] = {
    1.0 / 6227020800.0, 1.0 / 479001600.0, 1.0 / 39916800.0, 1.0 / 3628800.0,
    1.0 / 362880.0,     1.0 / 40320.0,     1.0 / 5040.0,     1.0 / 720.0,
    1.0 / 120.0,        1.0 / 24.0,        1.0 / 6.0,        1.0 / 2.0};

double exp_scalar(double x) { return x < kFloor ? 0.0 : std::exp(x); }

double exp_sum_scalar(const float* z, int64_t n, double m, double* e, int64_t from) {
  double s = 0.0;
  for (int64_t i = from; i < n; ++i) {
    e[i] = exp_scalar(static_cast<double>(z[i]) - m);
    s += e[i];
  }
  return s;
}

#if defined(__x86_64__)
__attribute__((target("avx512f"))) double exp_sum_avx512(const float* z, int64_t n, double m,
                                                          double* e) {
  const __m512d vm = _mm512_set1_pd(m), floor = _mm512_set1_pd(kFloor);
  __m512d s0 = _mm512_setzero_pd(), s1 = _mm512_setzero_pd();
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) {
    const __m512d x = _mm512_sub_pd(_mm512_cvtps_pd(_mm256_loadu_ps(z + i)), vm);
    const __mmask8 keep = _mm512_cmp_pd_mask(x, floor, _CMP_GE_OQ);  // -inf: not kept
    const __m512d xc = _mm512_max_pd(x, floor);
    const __m512d k = _mm512_roundscale_pd(_mm512_mul_pd(xc, _mm512_set1_pd(kLog2e)),
                                           _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    __m512d r = _mm512_fnmadd_pd(k, _mm512_set1_pd(kLn2Hi), xc);
    r = _mm512_fnmadd_pd(k, _mm512_set1_pd(kLn2Lo), r);
    __m512d p = _mm512_set1_pd(kInvFact[0]);
    for (int j = 1; j < 12; ++j) p = _mm512_fmadd_pd(p, r, _mm512_set1_pd(kInvFact[j]));
    p = _mm512_fmadd_pd(p, r, _mm512_set1_pd(1.0));
    p = _mm512_fmadd_pd(p, r, _mm512_set1_pd(1.0));
    const __m512d y = _mm512_maskz_mov_pd(keep, _mm512_scalef_pd(p, k));
    _mm512_storeu_pd(e + i, y);
    if (i & 8)
      s1 = _mm512_add_pd(s1, y);
    else
      s0 = _mm512_add_pd(s0, y);
  }
  return _mm512_reduce_add_pd(_mm512_add_pd(s0, s1)) + exp_sum_scalar(z, n, m, e, i);
}

__attribute__((target("avx2,fma"))) double exp_sum_avx2(const float* z, int64_t n, double m,
                                                        double* e) {
  const __m256d vm = _mm256_set1_pd(m), floor = _mm256_set1_pd(kFloor);
  __m256d s0 = _mm256_setzero_pd(), s1 = _mm256_setzero_pd();
  int64_t i = 0;
  for (; i + 4 <= n; i += 4) {
    const __m256d x = _mm256_sub_pd(_mm256_cvtps_pd(_mm_loadu_ps(z + i)), vm);
    const __m256d keep = _mm256_cmp_pd(x, floor, _CMP_GE_OQ);  // -inf: not kept
    const __m256d xc = _mm256_max_pd(x, floor);
    const __m256d k = _mm256_round_pd(_mm256_mul_pd(xc, _mm256_set1_pd(kLog2e)),
                                      _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    __m256d r = _mm256_fnmadd_pd(k, _mm256_set1_pd(kLn2Hi), xc);
    r = _mm256_fnmadd_pd(k, _mm256_set1_pd(kLn2Lo), r);
    __m256d p = _mm256_set1_pd(kInvFact[0]);
    for (int j = 1; j < 12; ++j) p = _mm256_fmadd_pd(p, r, _mm256_set1_pd(kInvFact[j]));
    p = _mm256_fmadd_pd(p, r, _mm256_set1_pd(1.0));
    p = _mm256_fmadd_pd(p, r, _mm256_set1_pd(1.0));
    // 2^k for k in [-1021, 0]: the exponent field k + 1023, a normal double.
    const __m256i bits = _mm256_slli_epi64(
        _mm256_add_epi64(_mm256_cvtepi32_epi64(_mm256_cvtpd_epi32(k)), _mm256_set1_epi64x(1023)),
        52);
    const __m256d y = _mm256_and_pd(keep, _mm256_mul_pd(p, _mm256_castsi256_pd(bits)));
    _mm256_storeu_pd(e + i, y);
    if (i & 4)
      s1 = _mm256_add_pd(s1, y);
    else
      s0 = _mm256_add_pd(s0, y);
  }
  alignas(32) double lanes[4];
  _mm256_store_pd(lanes, _mm256_add_pd(s0, s1));
  return (lanes[0] + lanes[1]) + (lanes[2] + lanes[3]) + exp_sum_scalar(z, n, m, e, i);
}

__attribute__((target("avx512f"))) void divide_avx512(const float* x, int64_t n, float d,
                                                       float* out) {
  const __m512 vd = _mm512_set1_ps(d);
  int64_t i = 0;
  for (; i + 16 <= n; i += 16) _mm512_storeu_ps(out + i, _mm512_div_ps(_mm512_loadu_ps(x + i), vd));
  for (; i < n; ++i) out[i] = x[i] / d;
}

__attribute__((target("avx2"))) void divide_avx2(const float* x, int64_t n, float d, float* out) {
  const __m256 vd = _mm256_set1_ps(d);
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) _mm256_storeu_ps(out + i, _mm256_div_ps(_mm256_loadu_ps(x + i), vd));
  for (; i < n; ++i) out[i] = x[i] / d;
}

enum class Isa { kScalar, kAvx2, kAvx512 };

Isa best_isa() {
  __builtin_cpu_init();
  if (__builtin_cpu_supports("avx512f")) return Isa::kAvx512;
  if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) return Isa::kAvx2;
  return Isa::kScalar;
}
#endif

}  // namespace

void divide(const float* x, int64_t n, float d, float* out) {
#if defined(__x86_64__)
  static const Isa isa = best_isa();
  if (isa == Isa::kAvx512) return divide_avx512(x, n, d, out);
  if (isa == Isa::kAvx2) return divide_avx2(x, n, d, out);
#endif
  for (int64_t i = 0; i < n; ++i) out[i] = x[i] / d;
}

double exp_sum(const float* z, int64_t n, double m, double* e) {
#if defined(__x86_64__)
  static const Isa isa = best_isa();
  if (isa == Isa::kAvx512) return exp_sum_avx512(z, n, m, e);
  if (isa == Isa::kAvx2) return exp_sum_avx2(z, n, m, e);
#endif
  return exp_sum_scalar(z, n, m, e, 0);
}

}  // namespace irouter::sampling
