// The Q4 decoder's attention: one KV head of a run of rows of one slot.
#pragma once

#include <cstddef>

namespace irouter::q4 {

// Rows one attend() call takes at most (the decoder splits longer prompt chunks).
constexpr int kMaxRun = 32;

// Attention for one KV head of R <= kMaxRun rows of one slot at consecutive positions p0,
// p0 + 1, ... (a prompt chunk; R = 1: a decode row): row r's G <= 4 query heads (q + r * ldq,
// [G, 64]) over the keys and values at positions [0, p0 + r] (K, V: [positions, 64] rows);
// writes out + r * ldo, [G, 64]. Each key and value is read once for the G heads, and in blocks
// that stay in L1 while every row of the run uses them; yet each row's sums run in one fixed
// order whatever R is, so a row's result never depends on the rows beside it.
// sc: R * G * stride floats (stride: p0 + R rounded up to 16); acc: R * G * 64 floats.
// K and V in float or half precision (the decoder's KV dtype; half needs half_kv_supported()).
// Half-precision K and V: `avx2` runs the x86-64-v3 (AVX2) build, else the x86-64-v4 one, which
// the CPU must run (the caller chooses once; both give the same bits).
// `prefix`: positions [0, prefix.length) are read from its K and V instead (another slot that
// holds the same tokens' keys and values: a prompt sharing them computes only its own rows);
// the same bits as if K and V held them.
template <class T>
struct KVPrefix {
  const T* K = nullptr;
  const T* V = nullptr;
  int length = 0;  // 0: none; at most p0
};
void attend(const float* q, size_t ldq, int R, int G, const float* K, const float* V, int p0,
            float scale, float* sc, float* acc, float* out, size_t ldo,
            const KVPrefix<float>& prefix = {});
void attend(const float* q, size_t ldq, int R, int G, const _Float16* K, const _Float16* V,
            int p0, float scale, float* sc, float* acc, float* out, size_t ldo, bool avx2,
            const KVPrefix<_Float16>& prefix = {});

// Whether this CPU reads half-precision KV (x86-64-v3: AVX2 with F16C, or better).
bool half_kv_supported();

// dst[0..n) = src[0..n) (n a multiple of 16), rounded to the KV dtype (to nearest even).
void store_kv(float* dst, const float* src, int n);
void store_kv(_Float16* dst, const float* src, int n, bool avx2);  // avx2: as attend's

}  // namespace irouter::q4
