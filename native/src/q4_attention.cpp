// See q4_attention.h. Compiled with -ffp-contract=fast (native/CMakeLists.txt): the dot
// products and the weighted sums of values are fused multiply-adds in the clones that have them.
#include "q4_attention.h"

#include <algorithm>
#include <cstring>

#include "q4_vector.h"

namespace irouter::q4 {
namespace {

// The lane sums of 16 vectors a[0..16) (lane i of the result: the sum of a[i]'s lanes) by a
// butterfly of shuffles and adds, ~3 operations a vector instead of 15 dependent scalar adds.
// Level 1 pairs a[2i] and a[2i + 1] (lanes 0-7: a[2i]'s partial sums, 8-15: a[2i + 1]'s),
// level 2 those pairs (lanes 4k..4k+3: a[4i + k]'s), level 3 those (lanes 2k, 2k + 1), level 4
// the last two. Callers apply levels 1-2 to each 4 vectors as they come, keeping few live.
__attribute__((always_inline)) inline v16 level1(v16 x, v16 y) {
  return __builtin_shufflevector(x, y, 0, 1, 2, 3, 4, 5, 6, 7, 16, 17, 18, 19, 20, 21, 22, 23) +
         __builtin_shufflevector(x, y, 8, 9, 10, 11, 12, 13, 14, 15, 24, 25, 26, 27, 28, 29, 30,
                                 31);
}
__attribute__((always_inline)) inline v16 level2(v16 x, v16 y) {
  return __builtin_shufflevector(x, y, 0, 1, 2, 3, 8, 9, 10, 11, 16, 17, 18, 19, 24, 25, 26, 27) +
         __builtin_shufflevector(x, y, 4, 5, 6, 7, 12, 13, 14, 15, 20, 21, 22, 23, 28, 29, 30,
                                 31);
}
__attribute__((always_inline)) inline v16 level3(v16 x, v16 y) {
  return __builtin_shufflevector(x, y, 0, 1, 4, 5, 8, 9, 12, 13, 16, 17, 20, 21, 24, 25, 28, 29) +
         __builtin_shufflevector(x, y, 2, 3, 6, 7, 10, 11, 14, 15, 18, 19, 22, 23, 26, 27, 30,
                                 31);
}
__attribute__((always_inline)) inline v16 level4(v16 x, v16 y) {
  return __builtin_shufflevector(x, y, 0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 26, 28, 30) +
         __builtin_shufflevector(x, y, 1, 3, 5, 7, 9, 11, 13, 15, 17, 19, 21, 23, 25, 27, 29, 31);
}

// Scaled scores of G query heads (qv) for keys K[0..keys) of a group of 16, each key read once
// for the G heads: dst[g][0..16) (lanes from `keys` on are 0).
template <int G>
__attribute__((always_inline)) inline void scores16(const v16 (&qv)[G][4], const float* K,
                                                    int keys, float scale, float* const* dst) {
  v16 c[G][4];
  for (int i = 0; i < 4; ++i) {
    v16 a[G][4];
    for (int j = 0; j < 4; ++j) {
      if (4 * i + j >= keys) {
        for (int g = 0; g < G; ++g) a[g][j] = v16{};
        continue;
      }
      v16 k[4];
      for (int c = 0; c < 4; ++c) k[c] = load(K + (4 * i + j) * 64 + c * 16);
      for (int g = 0; g < G; ++g)
        a[g][j] = qv[g][0] * k[0] + qv[g][1] * k[1] + qv[g][2] * k[2] + qv[g][3] * k[3];
    }
    for (int g = 0; g < G; ++g)
      c[g][i] = level2(level1(a[g][0], a[g][1]), level1(a[g][2], a[g][3]));
  }
  for (int g = 0; g < G; ++g) {
    const v16 sums = level4(level3(c[g][0], c[g][1]), level3(c[g][2], c[g][3])) * scale;
    std::memcpy(dst[g], &sums, 64);
  }
}

// Turns row scores e[0..n) into exp(e - max) in place (padded with ~0 to a multiple of 16);
// returns 1 / their sum.
__attribute__((always_inline)) inline float softmax_terms(float* e, int n) {
  const int whole = n / 16 * 16;
  v16 m16 = v16{} + e[0];
  for (int j = 0; j < whole; j += 16) {
    v16 v;
    std::memcpy(&v, e + j, 64);
    m16 = v > m16 ? v : m16;
  }
  float mx = e[0];  // the maximum is exact whatever the order
  for (int i = 0; i < 16; ++i) mx = m16[i] > mx ? m16[i] : mx;
  for (int j = whole; j < n; ++j) mx = e[j] > mx ? e[j] : mx;
  const int padded = (n + 15) / 16 * 16;
  for (int j = n; j < padded; ++j) e[j] = -1e30f;  // padding: exp gives ~0, never summed
  v16 sum = {};
  for (int j = 0; j < padded; j += 16) {
    v16 v;
    std::memcpy(&v, e + j, 64);
    v = vexp(v - mx);
    std::memcpy(e + j, &v, 64);
    if (j + 16 <= n) {
      sum += v;
    } else {
      for (int i = 0; i < n - j; ++i) sum[i] += v[i];
    }
  }
  float total = 0;
  for (int i = 0; i < 16; ++i) total += sum[i];
  return 1.f / total;
}

template <int G>
__attribute__((always_inline)) inline void attend_heads(const float* q, size_t ldq, int R,
                                                        const float* K, const float* V, int p0,
                                                        float scale, float* sc, float* acc,
                                                        float* out, size_t ldo) {
  constexpr int kBlock = 64;  // keys a block: 16 KB of keys or of values, kept in L1
  const int stride = (p0 + R + 15) / 16 * 16;
  auto scores = [&](int r, int g) { return sc + static_cast<size_t>(r * G + g) * stride; };
  for (int b0 = 0; b0 < p0 + R; b0 += kBlock)
    for (int r = std::max(0, b0 - p0); r < R; ++r) {  // the rows that see key b0
      const int n = p0 + r + 1, b1 = std::min(b0 + kBlock, n);
      v16 qv[G][4];
      for (int g = 0; g < G; ++g)
        for (int c = 0; c < 4; ++c) qv[g][c] = load(q + r * ldq + g * 64 + c * 16);
      for (int j0 = b0; j0 < b1; j0 += 16) {
        float* dst[G];
        for (int g = 0; g < G; ++g) dst[g] = scores(r, g) + j0;
        scores16<G>(qv, K + static_cast<size_t>(j0) * 64, std::min(16, n - j0), scale, dst);
      }
    }
  float inv[kMaxRun][G];
  for (int r = 0; r < R; ++r)
    for (int g = 0; g < G; ++g) inv[r][g] = softmax_terms(scores(r, g), p0 + r + 1);
  for (int b0 = 0; b0 < p0 + R; b0 += kBlock)
    for (int r = std::max(0, b0 - p0); r < R; ++r) {
      const int b1 = std::min(b0 + kBlock, p0 + r + 1);
      v16 o[G][4];
      float* kept = acc + static_cast<size_t>(r) * G * 64;
      for (int g = 0; g < G; ++g)
        for (int c = 0; c < 4; ++c) o[g][c] = b0 ? load(kept + g * 64 + c * 16) : v16{};
      for (int t = b0; t < b1; ++t) {  // each value row read once for the G heads
        v16 vv[4];
        for (int c = 0; c < 4; ++c) vv[c] = load(V + static_cast<size_t>(t) * 64 + c * 16);
        for (int g = 0; g < G; ++g) {
          const float p = scores(r, g)[t];
          for (int c = 0; c < 4; ++c) o[g][c] += p * vv[c];
        }
      }
      for (int g = 0; g < G; ++g)
        for (int c = 0; c < 4; ++c) store(kept + g * 64 + c * 16, o[g][c]);
    }
  for (int r = 0; r < R; ++r)
    for (int g = 0; g < G; ++g)
      for (int c = 0; c < 4; ++c) {
        v16 v;
        std::memcpy(&v, acc + static_cast<size_t>(r * G + g) * 64 + c * 16, 64);
        const v16 res = v * inv[r][g];
        std::memcpy(out + r * ldo + g * 64 + c * 16, &res, 64);
      }
}

}  // namespace

IROUTER_CLONES void attend(const float* q, size_t ldq, int R, int G, const float* K, const float* V,
                           int p0, float scale, float* sc, float* acc, float* out, size_t ldo) {
  switch (G) {  // the query heads' loops unrolled, their vectors in registers
    case 1:
      return attend_heads<1>(q, ldq, R, K, V, p0, scale, sc, acc, out, ldo);
    case 2:
      return attend_heads<2>(q, ldq, R, K, V, p0, scale, sc, acc, out, ldo);
    case 3:
      return attend_heads<3>(q, ldq, R, K, V, p0, scale, sc, acc, out, ldo);
    default:
      return attend_heads<4>(q, ldq, R, K, V, p0, scale, sc, acc, out, ldo);
  }
}

}  // namespace irouter::q4
