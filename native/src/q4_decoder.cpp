// See q4_decoder.h. Kernels: an AVX-512 VNNI and an AVX2 int4 x int8 tile, chosen at run time,
// and AMX for rows in groups of 16 (q4_amx.cpp) where the CPU has it;
// the rest (norms, rotary, attention, SiLU) in GCC vector code cloned for AVX-512 and AVX2.
#include "irouter/q4_decoder.h"

#include "q4_amx.h"
#include "q4_attention.h"
#include "q4_vector.h"

#include <immintrin.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <condition_variable>
#include <cstring>
#include <exception>
#include <functional>
#include <mutex>
#include <stdexcept>
#include <thread>
#include <type_traits>

namespace irouter {
namespace {

// ---------------------------------------------------------------- workers
// A step has ~210 parallel sections (7 a layer) microseconds apart: workers spin between them
// and sleep once a step is over, so they do not take a core from the event loop between steps.
class Pool {
 public:
  explicit Pool(int n) : n_(std::max(1, n)) {
    for (int i = 1; i < n_; ++i) workers_.emplace_back([this, i] { loop(i); });
  }
  ~Pool() {
    {
      std::lock_guard<std::mutex> g(m_);
      stop_ = true;
      gen_.fetch_add(1);
    }
    cv_.notify_all();
    for (auto& t : workers_) t.join();
  }
  int size() const { return n_; }
  // Runs fn(worker) once on each of size() workers (the caller is worker 0); returns when all
  // are done, rethrowing the first exception any of them raised (std::bad_alloc).
  void run(const std::function<void(int)>& fn) {
    if (n_ == 1) return fn(0);
    fn_ = &fn;
    error_ = nullptr;
    pending_.store(n_ - 1, std::memory_order_relaxed);
    {
      std::lock_guard<std::mutex> g(m_);
      gen_.fetch_add(1, std::memory_order_release);
    }
    cv_.notify_all();
    std::exception_ptr mine;
    try {
      fn(0);
    } catch (...) {
      mine = std::current_exception();
    }
    while (pending_.load(std::memory_order_acquire) != 0) _mm_pause();
    if (mine) std::rethrow_exception(mine);
    if (error_) std::rethrow_exception(error_);
  }

 private:
  static constexpr int kSpins = 4000;  // ~0.1 ms of pause instructions
  void loop(int i) {
    unsigned seen = 0;
    for (;;) {
      for (int s = 0; s < kSpins && gen_.load(std::memory_order_acquire) == seen; ++s) _mm_pause();
      if (gen_.load(std::memory_order_acquire) == seen) {
        std::unique_lock<std::mutex> g(m_);
        cv_.wait(g, [&] { return gen_.load() != seen; });
      }
      seen = gen_.load(std::memory_order_acquire);
      if (stop_) return;
      try {
        (*fn_)(i);
      } catch (...) {
        std::lock_guard<std::mutex> g(m_);
        if (!error_) error_ = std::current_exception();
      }
      pending_.fetch_sub(1, std::memory_order_acq_rel);
    }
  }
  int n_;
  std::vector<std::thread> workers_;
  std::mutex m_;
  std::condition_variable cv_;
  std::atomic<unsigned> gen_{0};
  std::atomic<int> pending_{0};
  const std::function<void(int)>* fn_ = nullptr;
  std::exception_ptr error_;  // a worker's exception in the current run (under m_)
  bool stop_ = false;
};

// ---------------------------------------------------------------- int4 weights
// Packed for the tiles: [N / 16][K / 32][4][64] bytes; in byte (g, column c, j) the low nibble
// is code k = 4g + j of column c in the block, the high nibble code k = 4(g + 4) + j. Scales
// [N / 16][K / 32][16].
struct Weight {
  int K = 0, N = 0;
  std::vector<uint8_t> codes;
  std::vector<float> scales;
};

Weight pack(const uint8_t* B, const float* S, int N, int K) {
  Weight w;
  w.K = K;
  w.N = N;
  const int nb = K / 32;
  w.codes.resize(static_cast<size_t>(N) * K / 2);
  w.scales.resize(static_cast<size_t>(N) * nb);
  for (int t = 0; t < N / 16; ++t)
    for (int b = 0; b < nb; ++b) {
      uint8_t* dst = w.codes.data() + (static_cast<size_t>(t) * nb + b) * 256;
      for (int c = 0; c < 16; ++c) {
        const int n = t * 16 + c;
        const uint8_t* src = B + (static_cast<size_t>(n) * nb + b) * 16;
        uint8_t q[32];
        for (int i = 0; i < 16; ++i) {
          q[2 * i] = src[i] & 15;
          q[2 * i + 1] = src[i] >> 4;
        }
        for (int g = 0; g < 4; ++g)
          for (int j = 0; j < 4; ++j)
            dst[g * 64 + c * 4 + j] = static_cast<uint8_t>(q[4 * g + j] | (q[4 * (g + 4) + j] << 4));
        w.scales[(static_cast<size_t>(t) * nb + b) * 16 + c] = S[static_cast<size_t>(n) * nb + b];
      }
    }
  return w;
}

// Activations as int8 per 32-block: value ~ q * s; sum8 = 8 * sum(q), the zero point's share.
struct Quantized {
  std::vector<int8_t> q;
  std::vector<float> s;
  std::vector<int32_t> sum8;
};

// Output columns [16 t, 16 t + 16) of MR rows. Each row's 8 dot steps a block run as CH
// independent chains: dpbusd's latency would otherwise bound a lone row (integer sums: the
// chain count never changes a result).
using Tile = void (*)(const uint8_t*, const float*, int, const int8_t*, const float*,
                      const int32_t*, int, float*, int);

template <int MR>
__attribute__((target("avx512f,avx512bw,avx512vnni"))) void tile_vnni(
    const uint8_t* P, const float* PS, int nb, const int8_t* aq, const float* as,
    const int32_t* asum8, int K, float* C, int ldc) {
  constexpr int CH = MR >= 4 ? 1 : (MR == 1 ? 4 : 2);
  __m512 acc[MR];
  for (int m = 0; m < MR; ++m) acc[m] = _mm512_setzero_ps();
  const __m512i low = _mm512_set1_epi8(15);
  for (int b = 0; b < nb; ++b) {
    const uint8_t* p = P + static_cast<size_t>(b) * 256;
    __m512i w[8];
    for (int g = 0; g < 4; ++g) {
      const __m512i x = _mm512_loadu_si512(p + g * 64);
      w[g] = _mm512_and_si512(x, low);
      w[g + 4] = _mm512_and_si512(_mm512_srli_epi16(x, 4), low);
    }
    const __m512 ws = _mm512_loadu_ps(PS + b * 16);
    __m512i dot[MR][CH];
    for (int m = 0; m < MR; ++m)
      for (int c = 0; c < CH; ++c) dot[m][c] = _mm512_setzero_si512();
    for (int g = 0; g < 8; ++g)
      for (int m = 0; m < MR; ++m) {
        int32_t a4;
        std::memcpy(&a4, aq + static_cast<size_t>(m) * K + b * 32 + g * 4, 4);
        dot[m][g % CH] = _mm512_dpbusd_epi32(dot[m][g % CH], w[g], _mm512_set1_epi32(a4));
      }
    for (int m = 0; m < MR; ++m) {
      __m512i t = dot[m][0];
      for (int c = 1; c < CH; ++c) t = _mm512_add_epi32(t, dot[m][c]);
      t = _mm512_sub_epi32(t, _mm512_set1_epi32(asum8[m * nb + b]));
      acc[m] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(t),
                               _mm512_mul_ps(ws, _mm512_set1_ps(as[m * nb + b])), acc[m]);
    }
  }
  for (int m = 0; m < MR; ++m) _mm512_storeu_ps(C + static_cast<size_t>(m) * ldc, acc[m]);
}

// AVX2 has no u8 x s8 dot with a 32-bit sum: maddubs (pairs to int16) then madd (to int32).
// 8 steps x 2 pairs x 15 x 127 = 30,480 fits int16, so the int16 sums do not saturate. Both
// 8-column halves are computed in one pass, so each activation broadcast serves 16 columns, and
// each 64-byte group of codes gives its low and high nibbles at once.
template <int MR>
__attribute__((target("avx2,fma"))) void tile_avx2(const uint8_t* P, const float* PS, int nb,
                                                   const int8_t* aq, const float* as,
                                                   const int32_t* asum8, int K, float* C,
                                                   int ldc) {
  const __m256i low = _mm256_set1_epi8(15);
  const __m256i ones = _mm256_set1_epi16(1);
  __m256 acc[MR][2];
  for (int m = 0; m < MR; ++m) acc[m][0] = acc[m][1] = _mm256_setzero_ps();
  for (int b = 0; b < nb; ++b) {
    const uint8_t* p = P + static_cast<size_t>(b) * 256;
    __m256i dot[MR][2];
#pragma GCC unroll 4
    for (int g = 0; g < 4; ++g) {
      const __m256i x0 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p + g * 64));
      const __m256i x1 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p + g * 64 + 32));
      // Codes 4g..4g+3 of each column (low nibbles), then 4(g+4).. (high), for both halves.
      const __m256i w[2][2] = {
          {_mm256_and_si256(x0, low), _mm256_and_si256(x1, low)},
          {_mm256_and_si256(_mm256_srli_epi16(x0, 4), low),
           _mm256_and_si256(_mm256_srli_epi16(x1, 4), low)}};
#pragma GCC unroll 2
      for (int h = 0; h < 2; ++h)
#pragma GCC unroll 8
        for (int m = 0; m < MR; ++m) {
          int32_t a4;
          std::memcpy(&a4, aq + static_cast<size_t>(m) * K + b * 32 + (g + 4 * h) * 4, 4);
          const __m256i a = _mm256_set1_epi32(a4);
          for (int c = 0; c < 2; ++c) {
            const __m256i d = _mm256_maddubs_epi16(w[h][c], a);
            dot[m][c] = g == 0 && h == 0 ? d : _mm256_add_epi16(dot[m][c], d);
            // Integer adds may be reordered, and GCC then computed every product first and
            // kept them on the stack (~25% slower than this tile). An empty asm needing the
            // sum in a register here keeps each sum a running one.
            asm("" : "+x"(dot[m][c]));
          }
        }
    }
    const __m256 ws[2] = {_mm256_loadu_ps(PS + b * 16), _mm256_loadu_ps(PS + b * 16 + 8)};
    for (int m = 0; m < MR; ++m) {
      const __m256i z = _mm256_set1_epi32(asum8[m * nb + b]);
      const __m256 s = _mm256_set1_ps(as[m * nb + b]);
      for (int c = 0; c < 2; ++c) {
        const __m256i t = _mm256_sub_epi32(_mm256_madd_epi16(dot[m][c], ones), z);
        acc[m][c] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(t), _mm256_mul_ps(ws[c], s), acc[m][c]);
      }
    }
  }
  for (int m = 0; m < MR; ++m)
    for (int c = 0; c < 2; ++c) _mm256_storeu_ps(C + static_cast<size_t>(m) * ldc + c * 8, acc[m][c]);
}

// Rows a tile call holds in registers; measured on a Zen 4 (microbenchmark of the
// tiles over the step's weight shapes, 592 rows), the VNNI tile ran 5-15% faster with 6 rows a
// call than with 8 (fewer registers spilled). The AVX2 tile (both halves a pass) keeps its
// dot sums, codes and a broadcast in the 16 YMM registers up to 5 rows (its float sums go to
// the stack once a block); 4 and 5 measured alike, 6 spilled. Only the tiles a call can take
// are built.
constexpr int kVnniRows = 6, kAvx2Rows = 4;
const Tile kVnni[kVnniRows + 1] = {nullptr,      tile_vnni<1>, tile_vnni<2>, tile_vnni<3>,
                                   tile_vnni<4>, tile_vnni<5>, tile_vnni<6>};
const Tile kAvx2[kAvx2Rows + 1] = {nullptr, tile_avx2<1>, tile_avx2<2>, tile_avx2<3>,
                                   tile_avx2<4>};

// ---------------------------------------------------------------- per-row vector code
using q4::v16;
using q4::v16i;
using q4::vexp;


// Written over W-float GCC vectors and compiled for x86-64-v4 (W = 16) and v3 (W = 8): below
// AVX-512 GCC keeps a 16-float vector in memory, and these ran 6-8x slower there (BENCHMARKS.md,
// 2026-12-07). Every lane does the same operations at either width, and the sums keep the
// 16-lane order, so both give the same bits.
template <int W>
struct Lanes {
  typedef float f __attribute__((vector_size(4 * W)));
  typedef float fu __attribute__((vector_size(4 * W), aligned(4)));
  typedef int i __attribute__((vector_size(4 * W)));
  typedef signed char c __attribute__((vector_size(W)));
  static f load(const float* p) { return *reinterpret_cast<const fu*>(p); }
  static void store(float* p, f v) { *reinterpret_cast<fu*>(p) = v; }
};

// Lane 0 of v after halving steps that combine each lane with another by `op`, so it holds
// op over all lanes (for max and integer sums: exact in any order).
template <int W, class V, class Op>
__attribute__((always_inline)) inline auto fold_lanes(V v, Op op) {
  if constexpr (W == 16) {
    v = op(v, __builtin_shufflevector(v, v, 8, 9, 10, 11, 12, 13, 14, 15, 0, 1, 2, 3, 4, 5, 6, 7));
    v = op(v, __builtin_shufflevector(v, v, 4, 5, 6, 7, 0, 1, 2, 3, 12, 13, 14, 15, 8, 9, 10, 11));
    v = op(v, __builtin_shufflevector(v, v, 2, 3, 0, 1, 6, 7, 4, 5, 10, 11, 8, 9, 14, 15, 12, 13));
    v = op(v, __builtin_shufflevector(v, v, 1, 0, 3, 2, 5, 4, 7, 6, 9, 8, 11, 10, 13, 12, 15, 14));
  } else {
    v = op(v, __builtin_shufflevector(v, v, 4, 5, 6, 7, 0, 1, 2, 3));
    v = op(v, __builtin_shufflevector(v, v, 2, 3, 0, 1, 6, 7, 4, 5));
    v = op(v, __builtin_shufflevector(v, v, 1, 0, 3, 2, 5, 4, 7, 6));
  }
  return v[0];
}

template <int W>
__attribute__((always_inline)) inline void quantize_row_t(const float* x, int K, int8_t* q,
                                                          float* s, int32_t* sum8) {
  using L = Lanes<W>;
  constexpr int N = 32 / W;  // vectors a block
  for (int b = 0; b < K / 32; ++b) {
    typename L::f a[N], m = {};
    for (int k = 0; k < N; ++k) {
      a[k] = L::load(x + b * 32 + k * W);
      const typename L::f v = a[k] < 0 ? -a[k] : a[k];
      m = k ? (m > v ? m : v) : v;
    }
    m = m > 0 ? m : typename L::f{};  // a block of zeros (either sign) has maximum +0
    const float mx = fold_lanes<W>(m, [](auto x, auto y) { return x > y ? x : y; });
    const float inv = mx > 0 ? 127.f / mx : 0.f;
    typename L::i t = {}, n[N];  // integer sums: exact in any order
    for (int k = 0; k < N; ++k) {
      typename L::f r = a[k] * inv;
      r += r < 0 ? -0.5f : 0.5f;  // round half away from zero
      n[k] = __builtin_convertvector(r, typename L::i);
      t += n[k];
    }
    if constexpr (W == 16) {  // AVX-512 narrows each vector in one instruction (vpmovdb)
      for (int k = 0; k < N; ++k) {
        const typename L::c c = __builtin_convertvector(n[k], typename L::c);
        std::memcpy(q + b * 32 + k * W, &c, W);
      }
    } else {
      // Below AVX-512 GCC narrowed lane by lane through general registers (~6% of a prompt
      // step's time). Each |n| <= 127, so its low byte is the int8: two byte shuffles pick
      // them (GCC: vpshufb and a few blends and permutes).
      typedef char c32 __attribute__((vector_size(32)));
      typedef char c16 __attribute__((vector_size(16)));
      for (int k = 0; k < N; k += 2) {
        const c32 x = reinterpret_cast<c32>(n[k]), y = reinterpret_cast<c32>(n[k + 1]);
        const c16 c = __builtin_shufflevector(x, y, 0, 4, 8, 12, 16, 20, 24, 28, 32, 36, 40, 44,
                                              48, 52, 56, 60);
        std::memcpy(q + b * 32 + k * W, &c, 16);
      }
    }
    s[b] = mx / 127.f;
    sum8[b] = 8 * fold_lanes<W>(t, [](auto x, auto y) { return x + y; });
  }
}

// out = x (+ add, stored back into x) normalised by its root mean square, times w.
template <int W>
__attribute__((always_inline)) inline void add_rms_norm_row_t(float* x, const float* add,
                                                              const float* w, float eps, int H,
                                                              float* out) {
  using L = Lanes<W>;
  constexpr int N = 16 / W;
  typename L::f ss[N] = {};  // 16 partial sums of squares (H is a multiple of 32), then in order
  for (int i = 0; i < H; i += 16)
    for (int k = 0; k < N; ++k) {
      typename L::f v = L::load(x + i + k * W);
      if (add) {
        v += L::load(add + i + k * W);
        L::store(x + i + k * W, v);
      }
      ss[k] += v * v;
    }
  float total = 0;
  for (int k = 0; k < N; ++k)
    for (int j = 0; j < W; ++j) total += ss[k][j];
  const float r = 1.f / std::sqrt(total / H + eps);
  for (int i = 0; i < H; ++i) out[i] = x[i] * r * w[i];
}

template <int W>
__attribute__((always_inline)) inline void silu_mul_row_t(const float* gate, const float* up,
                                                          int I, float* out) {
  using L = Lanes<W>;
  for (int i = 0; i < I; i += W) {
    const typename L::f g = L::load(gate + i), u = L::load(up + i);
    L::store(out + i, g / (1.f + q4::vexp_lanes<typename L::f, typename L::i>(-g)) * u);
  }
}

struct RowCode {
  void (*quantize_row)(const float*, int, int8_t*, float*, int32_t*);
  void (*add_rms_norm_row)(float*, const float*, const float*, float, int, float*);
  void (*silu_mul_row)(const float*, const float*, int, float*);
};

#define IROUTER_ROW_CODE(TARGET, W, NAME)                                                      \
  __attribute__((target(TARGET))) void quantize_row_##NAME(const float* x, int K, int8_t* q,  \
                                                          float* s, int32_t* sum8) {          \
    quantize_row_t<W>(x, K, q, s, sum8);                                                      \
  }                                                                                           \
  __attribute__((target(TARGET))) void add_rms_norm_row_##NAME(                               \
      float* x, const float* add, const float* w, float eps, int H, float* out) {             \
    add_rms_norm_row_t<W>(x, add, w, eps, H, out);                                            \
  }                                                                                           \
  __attribute__((target(TARGET))) void silu_mul_row_##NAME(const float* gate, const float* up, \
                                                          int I, float* out) {                \
    silu_mul_row_t<W>(gate, up, I, out);                                                      \
  }                                                                                           \
  const RowCode kRows_##NAME = {quantize_row_##NAME, add_rms_norm_row_##NAME, silu_mul_row_##NAME};
IROUTER_ROW_CODE("arch=x86-64-v4", 16, v4)
IROUTER_ROW_CODE("arch=x86-64-v3", 8, v3)
#undef IROUTER_ROW_CODE

// Rotate-half rotary embedding of one head (D = 64) at the position of c/s.
IROUTER_CLONES void rope(float* v, const float* c, const float* s) {
  for (int i = 0; i < 32; ++i) {
    const float a = v[i], b = v[i + 32];
    v[i] = a * c[i] - b * s[i];
    v[i + 32] = b * c[i] + a * s[i];
  }
}

}  // namespace

WeightShape q4_weight_shape(const Q4DecoderShape& s, int i) {
  switch (i == 4 * s.layers ? 4 : i % 4) {
    case 0:
      return {(s.heads + 2 * s.kv_heads) * s.head_dim, s.hidden};
    case 1:
      return {s.hidden, s.heads * s.head_dim};
    case 2:
      return {2 * s.intermediate, s.hidden};
    case 3:
      return {s.hidden, s.intermediate};
    default:
      return {s.vocab, s.hidden};
  }
}

std::string q4_best_kernel() {
  __builtin_cpu_init();
  // x86-64-v3 at least (AVX2, FMA, F16C: every AVX2 and AVX-512 CPU): the attention's clones
  // and its half-precision keys and values need no other check once a decoder exists.
  if (!q4::half_kv_supported()) return "";
  if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
      __builtin_cpu_supports("avx512vnni"))
    return q4::amx_usable() ? "amx-int8" : "avx512-vnni";
  if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) return "avx2";
  return "";
}

struct Q4Decoder::Impl {
  Q4DecoderShape shape;
  std::string kernel;
  const Tile* tiles = nullptr;
  // The x86-64-v3 (AVX2) build of the per-row and attention code, where the AVX2 tile runs (as
  // an AVX2 host does; the same bits) or the CPU lacks x86-64-v4; else the v4 build.
  bool v3 = false;
  const RowCode* rows = nullptr;
  int tile_rows = 0;  // rows a tile call takes
  bool amx = false;   // rows in groups of 16 on AMX tiles (the rest on the VNNI tile)
  std::vector<float> cos, sin, embedding, norms;
  std::vector<Weight> weights;
  Pool pool;
  std::vector<float> h, x, qkv, attn, gate_up, act, tmp;  // per-step buffers, grown once
  Quantized qa;
  Impl(int threads) : pool(threads) {}

  void quantize(const float* src, int m, int K) {
    rows->quantize_row(src + static_cast<size_t>(m) * K, K, qa.q.data() + static_cast<size_t>(m) * K,
                 qa.s.data() + static_cast<size_t>(m) * (K / 32),
                 qa.sum8.data() + static_cast<size_t>(m) * (K / 32));
  }

  // C[rows, N] = (quantized activations) x w; column tiles split between the workers.
  void gemm(int rows, const Weight& w, float* C) {
    const int nb = w.K / 32, nt = w.N / 16, nw = pool.size();
    const int groups = amx ? rows / 16 : 0;  // rows [0, 16 groups) on AMX
    pool.run([&](int wi) {
      const int lo = static_cast<int>(static_cast<int64_t>(nt) * wi / nw);
      const int hi = static_cast<int>(static_cast<int64_t>(nt) * (wi + 1) / nw);
      if (groups && lo < hi)
        q4::amx_tiles(w.codes.data(), w.scales.data(), nb, lo, hi, groups, qa.q.data(),
                      qa.s.data(), w.K, C, w.N);
      for (int t = lo; t < hi; ++t)
        for (int m0 = groups * 16; m0 < rows; m0 += tile_rows) {
          const int mr = std::min(tile_rows, rows - m0);
          tiles[mr](w.codes.data() + static_cast<size_t>(t) * nb * 256,
                    w.scales.data() + static_cast<size_t>(t) * nb * 16, nb,
                    qa.q.data() + static_cast<size_t>(m0) * w.K, qa.s.data() + m0 * nb,
                    qa.sum8.data() + m0 * nb, w.K, C + static_cast<size_t>(m0) * w.N + t * 16,
                    w.N);
        }
    });
  }

  // f(row) for every row, rows split between the workers.
  template <class F>
  void each_row(int rows, F f) {
    if (rows == 1) return f(0);
    pool.run([&](int wi) {
      for (int m = wi; m < rows; m += pool.size()) f(m);
    });
  }
};

Q4Decoder::Q4Decoder(const Q4DecoderShape& s, const float* cos, const float* sin,
                     const float* embedding, const float* norms,
                     const std::vector<const uint8_t*>& codes,
                     const std::vector<const float*>& scales, int threads,
                     const std::string& kernel)
    : impl_(std::make_unique<Impl>(threads)) {
  if (s.head_dim != 64 || s.heads % s.kv_heads || s.hidden % 32 || s.intermediate % 32 ||
      s.vocab % 16 || s.heads / s.kv_heads > 4 || (s.heads + 2 * s.kv_heads) * 64 % 16)
    throw std::invalid_argument(
        "Q4Decoder supports head_dim 64, up to 4 query heads a KV head, and hidden, "
        "intermediate and vocab sizes in multiples of 32, 32 and 16");
  if (static_cast<int>(codes.size()) != 4 * s.layers + 1 || codes.size() != scales.size())
    throw std::invalid_argument("Q4Decoder needs 4 * layers + 1 weights (codes and scales)");
  const std::string best = q4_best_kernel();
  const std::string k = kernel.empty() ? best : kernel;
  if (best.empty()) throw std::invalid_argument("this CPU has neither AVX2 nor AVX-512 VNNI");
  if (k != "amx-int8" && k != "avx512-vnni" && k != "avx2")
    throw std::invalid_argument("unknown kernel '" + k + "': use amx-int8, avx512-vnni or avx2");
  if (k == "amx-int8" && best != "amx-int8")
    throw std::invalid_argument("this CPU (or its kernel) gives this process no AMX int8 tiles");
  if (k == "avx512-vnni" && best == "avx2")
    throw std::invalid_argument("this CPU has no AVX-512 VNNI");
  Impl& d = *impl_;
  d.shape = s;
  d.kernel = k;
  d.tiles = k == "avx2" ? kAvx2 : kVnni;
  d.tile_rows = k == "avx2" ? kAvx2Rows : kVnniRows;
  d.amx = k == "amx-int8";
  d.v3 = k == "avx2" || !__builtin_cpu_supports("x86-64-v4");
  d.rows = d.v3 ? &kRows_v3 : &kRows_v4;
  const size_t half = static_cast<size_t>(s.rope_positions) * s.head_dim / 2;
  d.cos.assign(cos, cos + half);
  d.sin.assign(sin, sin + half);
  d.embedding.assign(embedding, embedding + static_cast<size_t>(s.vocab) * s.hidden);
  d.norms.assign(norms, norms + static_cast<size_t>(2 * s.layers + 1) * s.hidden);
  for (int i = 0; i < 4 * s.layers + 1; ++i) {
    const WeightShape w = q4_weight_shape(s, i);
    d.weights.push_back(pack(codes[i], scales[i], w.N, w.K));
  }
}

Q4Decoder::~Q4Decoder() = default;

const std::string& Q4Decoder::kernel() const { return impl_->kernel; }
const Q4DecoderShape& Q4Decoder::shape() const { return impl_->shape; }

void Q4Decoder::step(int rows, const int64_t* tokens, const int64_t* positions,
                     const int64_t* slots, const KVBuffers& kv, float* logits,
                     const int64_t* outputs, int num_outputs, const int64_t* prefix_slots,
                     const int64_t* prefix_lengths) {
  Impl& d = *impl_;
  const Q4DecoderShape& s = d.shape;
  const int H = s.hidden, D = s.head_dim, NH = s.heads, KVH = s.kv_heads, I = s.intermediate;
  const int G = NH / KVH, QKV = (NH + 2 * KVH) * D, L = s.layers, context = kv.context;
  auto grow = [](std::vector<float>& v, size_t n) {
    if (v.size() < n) v.resize(n);
  };
  const size_t R = static_cast<size_t>(rows);
  grow(d.h, R * H);
  grow(d.x, R * H);
  grow(d.qkv, R * QKV);
  grow(d.attn, R * NH * D);
  grow(d.gate_up, R * 2 * I);
  grow(d.act, R * I);
  grow(d.tmp, R * H);
  const size_t widest = static_cast<size_t>(std::max({H, I, NH * D}));
  if (d.qa.q.size() < R * widest) {
    d.qa.q.resize(R * widest);
    d.qa.s.resize(R * widest / 32);
    d.qa.sum8.resize(R * widest / 32);
  }
  float *h = d.h.data(), *x = d.x.data(), *qkv = d.qkv.data(), *attn = d.attn.data();
  float *gate_up = d.gate_up.data(), *act = d.act.data(), *tmp = d.tmp.data();
  for (int m = 0; m < rows; ++m)
    std::memcpy(h + m * H, d.embedding.data() + tokens[m] * H, sizeof(float) * H);
  const float scale = 1.f / std::sqrt(static_cast<float>(D));
  int longest = 0;
  for (int m = 0; m < rows; ++m) longest = std::max(longest, static_cast<int>(positions[m]) + 1);
  std::vector<std::pair<int, int>> runs;  // (first row, rows) of each attention run
  for (int m = 0; m < rows; ++m)
    if (!runs.empty() && runs.back().second < q4::kMaxRun && slots[m] == slots[m - 1] &&
        positions[m] == positions[m - 1] + 1)
      ++runs.back().second;
    else
      runs.emplace_back(m, 1);
  int widest_run = 0;  // sizes the attention's score scratch (decode steps: runs of one)
  for (const auto& run : runs) widest_run = std::max(widest_run, run.second);
  // The last layer computes past its keys and values only the rows whose logits are asked
  // for (a prompt chunk's last): the others' attention, MLP and residual feed nothing. Each of
  // those rows attends alone (a run of one), its result the same bits as in its run; the rows
  // after the attention are compacted in output order (j: outputs[j]).
  const int k = outputs ? num_outputs : rows;
  std::vector<std::pair<int, int>> output_runs;
  if (k < rows)
    for (int j = 0; j < k; ++j) output_runs.emplace_back(static_cast<int>(outputs[j]), 1);
  // One layer's rotary embedding, KV stores and attention over its keys and values (float or
  // _Float16 buffers). Every row's keys and values are stored before any row attends: rows of
  // one slot at consecutive positions (a prompt chunk) see each other's, causally. `which`:
  // the runs that attend; `compact`: run i's output goes to row i of attn (else its own rows).
  const auto attention = [&](auto* keys, auto* values,
                             const std::vector<std::pair<int, int>>& which, bool compact) {
    constexpr bool half = std::is_same_v<std::remove_pointer_t<decltype(keys)>, _Float16>;
    const int tasks = rows * KVH;
    d.pool.run([&](int wi) {
      for (int t = wi; t < tasks; t += d.pool.size()) {
        const int m = t / KVH, kh = t % KVH;
        const int64_t p = positions[m];
        float* r = qkv + static_cast<size_t>(m) * QKV;
        const float* c = d.cos.data() + p * (D / 2);
        const float* sn = d.sin.data() + p * (D / 2);
        for (int g = 0; g < G; ++g) rope(r + (kh * G + g) * D, c, sn);
        rope(r + (NH + kh) * D, c, sn);
        const size_t at = ((static_cast<size_t>(slots[m]) * KVH + kh) * context + p) * D;
        if constexpr (half) {
          q4::store_kv(keys + at, r + (NH + kh) * D, D, d.v3);
          q4::store_kv(values + at, r + (NH + KVH + kh) * D, D, d.v3);
        } else {
          q4::store_kv(keys + at, r + (NH + kh) * D, D);
          q4::store_kv(values + at, r + (NH + KVH + kh) * D, D);
        }
      }
    });
    // By runs (rows of one slot at consecutive positions, at most q4::kMaxRun), each with
    // every KV head, handed out to whichever worker is free.
    std::atomic<int> next{0};
    d.pool.run([&](int) {
      thread_local std::vector<float> sc, acc;
      const size_t need = static_cast<size_t>(widest_run) * G * ((longest + 15) / 16 * 16);
      if (sc.size() < need) sc.resize(need);
      if (acc.size() < static_cast<size_t>(q4::kMaxRun) * G * D) acc.resize(q4::kMaxRun * G * D);
      for (int t = next++; t < static_cast<int>(which.size()) * KVH; t = next++) {
        const int m = which[t / KVH].first, R = which[t / KVH].second, kh = t % KVH;
        const size_t base = (static_cast<size_t>(slots[m]) * KVH + kh) * context * D;
        const float* q = qkv + static_cast<size_t>(m) * QKV + kh * G * D;
        const size_t row = compact ? static_cast<size_t>(t / KVH) : static_cast<size_t>(m);
        float* out = attn + row * NH * D + kh * G * D;
        const int p0 = static_cast<int>(positions[m]);
        using T = std::remove_pointer_t<decltype(keys)>;
        q4::KVPrefix<T> prefix;
        if (prefix_slots && prefix_slots[m] >= 0) {
          const size_t from = (static_cast<size_t>(prefix_slots[m]) * KVH + kh) * context * D;
          prefix = {keys + from, values + from, static_cast<int>(prefix_lengths[m])};
        }
        if constexpr (half)
          q4::attend(q, QKV, R, G, keys + base, values + base, p0, scale, sc.data(), acc.data(),
                     out, NH * D, d.v3, prefix);
        else
          q4::attend(q, QKV, R, G, keys + base, values + base, p0, scale, sc.data(), acc.data(),
                     out, NH * D, prefix);
      }
    });
  };
  for (int l = 0; l < L; ++l) {
    d.each_row(rows, [&](int m) {
      // The previous layer's MLP output joins the residual stream here.
      d.rows->add_rms_norm_row(h + m * H, l ? tmp + m * H : nullptr, d.norms.data() + 2 * l * H, s.eps,
                       H, x + m * H);
      d.quantize(x, m, H);
    });
    d.gemm(rows, d.weights[4 * l], qkv);
    const bool pruned = l == L - 1 && k < rows;  // rows j: outputs[j]
    const int n = pruned ? k : rows;
    const auto& which = pruned ? output_runs : runs;
    if (kv.half)
      attention(static_cast<_Float16*>(kv.keys[l]), static_cast<_Float16*>(kv.values[l]), which,
                pruned);
    else
      attention(static_cast<float*>(kv.keys[l]), static_cast<float*>(kv.values[l]), which, pruned);
    d.each_row(n, [&](int j) { d.quantize(attn, j, NH * D); });
    d.gemm(n, d.weights[4 * l + 1], tmp);
    d.each_row(n, [&](int j) {
      const int m = pruned ? static_cast<int>(outputs[j]) : j;
      d.rows->add_rms_norm_row(h + m * H, tmp + j * H, d.norms.data() + (2 * l + 1) * H, s.eps, H,
                       x + j * H);
      d.quantize(x, j, H);
    });
    d.gemm(n, d.weights[4 * l + 2], gate_up);
    d.each_row(n, [&](int j) {
      d.rows->silu_mul_row(gate_up + j * 2 * I, gate_up + j * 2 * I + I, I, act + j * I);
      d.quantize(act, j, I);
    });
    d.gemm(n, d.weights[4 * l + 3], tmp);
  }
  // Logits of the rows asked for only (a prompt chunk needs its last), compacted in order.
  const bool compacted = k < rows;  // the last layer's MLP output is by j already
  d.each_row(k, [&](int j) {
    const int m = outputs ? static_cast<int>(outputs[j]) : j;
    d.rows->add_rms_norm_row(h + m * H, tmp + (compacted ? j : m) * H, d.norms.data() + 2 * L * H,
                             s.eps, H, x + j * H);
    d.quantize(x, j, H);
  });
  if (k) d.gemm(k, d.weights[4 * L], logits);
}

}  // namespace irouter
