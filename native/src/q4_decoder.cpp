// See q4_decoder.h. Kernels: an AVX-512 VNNI and an AVX2 int4 x int8 tile, chosen at run time;
// the rest (norms, rotary, attention, SiLU) in GCC vector code cloned for AVX-512 and AVX2.
#include "irouter/q4_decoder.h"

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
// 8 steps x 2 pairs x 15 x 127 = 30,480 fits int16, so the int16 sums do not saturate.
template <int MR>
__attribute__((target("avx2,fma"))) void tile_avx2(const uint8_t* P, const float* PS, int nb,
                                                   const int8_t* aq, const float* as,
                                                   const int32_t* asum8, int K, float* C,
                                                   int ldc) {
  constexpr int CH = MR >= 4 ? 1 : 2;
  const __m256i low = _mm256_set1_epi8(15);
  const __m256i ones = _mm256_set1_epi16(1);
  for (int half = 0; half < 2; ++half) {
    __m256 acc[MR];
    for (int m = 0; m < MR; ++m) acc[m] = _mm256_setzero_ps();
    for (int b = 0; b < nb; ++b) {
      const uint8_t* p = P + static_cast<size_t>(b) * 256 + half * 32;
      __m256i w[8];
      for (int g = 0; g < 4; ++g) {
        const __m256i x = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p + g * 64));
        w[g] = _mm256_and_si256(x, low);
        w[g + 4] = _mm256_and_si256(_mm256_srli_epi16(x, 4), low);
      }
      const __m256 ws = _mm256_loadu_ps(PS + b * 16 + half * 8);
      __m256i dot[MR][CH];
      for (int m = 0; m < MR; ++m)
        for (int c = 0; c < CH; ++c) dot[m][c] = _mm256_setzero_si256();
      for (int g = 0; g < 8; ++g)
        for (int m = 0; m < MR; ++m) {
          int32_t a4;
          std::memcpy(&a4, aq + static_cast<size_t>(m) * K + b * 32 + g * 4, 4);
          dot[m][g % CH] = _mm256_add_epi16(
              dot[m][g % CH], _mm256_maddubs_epi16(w[g], _mm256_set1_epi32(a4)));
        }
      for (int m = 0; m < MR; ++m) {
        __m256i t = _mm256_madd_epi16(dot[m][0], ones);
        for (int c = 1; c < CH; ++c) t = _mm256_add_epi32(t, _mm256_madd_epi16(dot[m][c], ones));
        t = _mm256_sub_epi32(t, _mm256_set1_epi32(asum8[m * nb + b]));
        acc[m] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(t),
                                 _mm256_mul_ps(ws, _mm256_set1_ps(as[m * nb + b])), acc[m]);
      }
    }
    for (int m = 0; m < MR; ++m) _mm256_storeu_ps(C + static_cast<size_t>(m) * ldc + half * 8, acc[m]);
  }
}

constexpr int kMaxRows = 8;  // rows a tile call holds in registers
const Tile kVnni[kMaxRows + 1] = {nullptr,      tile_vnni<1>, tile_vnni<2>, tile_vnni<3>,
                                  tile_vnni<4>, tile_vnni<5>, tile_vnni<6>, tile_vnni<7>,
                                  tile_vnni<8>};
const Tile kAvx2[kMaxRows + 1] = {nullptr,      tile_avx2<1>, tile_avx2<2>, tile_avx2<3>,
                                  tile_avx2<4>, tile_avx2<5>, tile_avx2<6>, tile_avx2<7>,
                                  tile_avx2<8>};

// ---------------------------------------------------------------- per-row vector code
typedef float v16 __attribute__((vector_size(64)));
typedef int v16i __attribute__((vector_size(64)));

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

#define IROUTER_CLONES __attribute__((target_clones("avx512f", "avx2", "default")))

IROUTER_CLONES void quantize_row(const float* x, int K, int8_t* q, float* s, int32_t* sum8) {
  for (int b = 0; b < K / 32; ++b) {
    v16 a0, a1;
    std::memcpy(&a0, x + b * 32, 64);
    std::memcpy(&a1, x + b * 32 + 16, 64);
    v16 m0 = a0 < 0 ? -a0 : a0;
    const v16 m1 = a1 < 0 ? -a1 : a1;
    m0 = m0 > m1 ? m0 : m1;
    float mx = 0;
    for (int i = 0; i < 16; ++i) mx = m0[i] > mx ? m0[i] : mx;
    const float inv = mx > 0 ? 127.f / mx : 0.f;
    v16 r0 = a0 * inv, r1 = a1 * inv;
    r0 += r0 < 0 ? -0.5f : 0.5f;  // round half away from zero
    r1 += r1 < 0 ? -0.5f : 0.5f;
    const v16i i0 = __builtin_convertvector(r0, v16i), i1 = __builtin_convertvector(r1, v16i);
    int sum = 0;
    for (int i = 0; i < 16; ++i) {
      q[b * 32 + i] = static_cast<int8_t>(i0[i]);
      q[b * 32 + 16 + i] = static_cast<int8_t>(i1[i]);
      sum += i0[i] + i1[i];
    }
    s[b] = mx / 127.f;
    sum8[b] = 8 * sum;
  }
}

// out = x (+ add, stored back into x) normalised by its root mean square, times w.
IROUTER_CLONES void add_rms_norm_row(float* x, const float* add, const float* w, float eps, int H,
                                     float* out) {
  if (add)
    for (int i = 0; i < H; ++i) x[i] += add[i];
  float ss = 0;
  for (int i = 0; i < H; ++i) ss += x[i] * x[i];
  const float r = 1.f / std::sqrt(ss / H + eps);
  for (int i = 0; i < H; ++i) out[i] = x[i] * r * w[i];
}

IROUTER_CLONES void silu_mul_row(const float* gate, const float* up, int I, float* out) {
  for (int i = 0; i < I; i += 16) {
    v16 g, u;
    std::memcpy(&g, gate + i, 64);
    std::memcpy(&u, up + i, 64);
    const v16 r = g / (1.f + vexp(-g)) * u;
    std::memcpy(out + i, &r, 64);
  }
}

// Rotate-half rotary embedding of one head (D = 64) at the position of c/s.
IROUTER_CLONES void rope(float* v, const float* c, const float* s) {
  for (int i = 0; i < 32; ++i) {
    const float a = v[i], b = v[i + 32];
    v[i] = a * c[i] - b * s[i];
    v[i + 32] = b * c[i] + a * s[i];
  }
}

// The lane sums of 16 vectors: lane i of the result is the sum of a[i]'s lanes (a butterfly of
// shuffles and adds, ~3 operations a vector instead of 15 dependent scalar adds).
__attribute__((always_inline)) inline v16 lane_sums(const v16* a) {
  v16 b[8], c[4], d[2];
  for (int i = 0; i < 8; ++i)  // lanes 0-7: a[2i]'s partial sums, 8-15: a[2i + 1]'s
    b[i] = __builtin_shufflevector(a[2 * i], a[2 * i + 1], 0, 1, 2, 3, 4, 5, 6, 7, 16, 17, 18,
                                   19, 20, 21, 22, 23) +
           __builtin_shufflevector(a[2 * i], a[2 * i + 1], 8, 9, 10, 11, 12, 13, 14, 15, 24, 25,
                                   26, 27, 28, 29, 30, 31);
  for (int i = 0; i < 4; ++i)  // lanes 4k..4k+3: a[4i + k]'s
    c[i] = __builtin_shufflevector(b[2 * i], b[2 * i + 1], 0, 1, 2, 3, 8, 9, 10, 11, 16, 17, 18,
                                   19, 24, 25, 26, 27) +
           __builtin_shufflevector(b[2 * i], b[2 * i + 1], 4, 5, 6, 7, 12, 13, 14, 15, 20, 21,
                                   22, 23, 28, 29, 30, 31);
  for (int i = 0; i < 2; ++i)  // lanes 2k, 2k + 1: a[8i + k]'s
    d[i] = __builtin_shufflevector(c[2 * i], c[2 * i + 1], 0, 1, 4, 5, 8, 9, 12, 13, 16, 17, 20,
                                   21, 24, 25, 28, 29) +
           __builtin_shufflevector(c[2 * i], c[2 * i + 1], 2, 3, 6, 7, 10, 11, 14, 15, 18, 19,
                                   22, 23, 26, 27, 30, 31);
  return __builtin_shufflevector(d[0], d[1], 0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 26,
                                 28, 30) +
         __builtin_shufflevector(d[0], d[1], 1, 3, 5, 7, 9, 11, 13, 15, 17, 19, 21, 23, 25, 27,
                                 29, 31);
}

// One row's attention for one KV head: G query heads (q [G, 64]) over n keys and values
// ([n, 64] rows), each key and value read once for all G; out [G, 64]; sc: G * n floats
// (n rounded up to 16).
IROUTER_CLONES void attend(const float* q, int G, const float* K, const float* V, int n,
                           float scale, float* sc, float* out) {
  const int stride = (n + 15) / 16 * 16;
  v16 qv[4][4];
  for (int g = 0; g < G; ++g)
    for (int c = 0; c < 4; ++c) std::memcpy(&qv[g][c], q + g * 64 + c * 16, 64);
  for (int j0 = 0; j0 < n; j0 += 16) {  // scores of 16 keys at a time
    const int keys = std::min(16, n - j0);
    v16 a[4][16];
    for (int j = 0; j < 16; ++j) {
      if (j >= keys) {
        for (int g = 0; g < G; ++g) a[g][j] = v16{};
        continue;
      }
      v16 k[4];
      std::memcpy(k, K + static_cast<size_t>(j0 + j) * 64, 256);
      for (int g = 0; g < G; ++g)
        a[g][j] = qv[g][0] * k[0] + qv[g][1] * k[1] + qv[g][2] * k[2] + qv[g][3] * k[3];
    }
    for (int g = 0; g < G; ++g) {
      const v16 sums = lane_sums(a[g]) * scale;
      std::memcpy(sc + static_cast<size_t>(g) * stride + j0, &sums, 64);
    }
  }
  float inv[4];
  for (int g = 0; g < G; ++g) {
    float* e = sc + static_cast<size_t>(g) * stride;
    float mx = e[0];
    for (int j = 1; j < n; ++j) mx = e[j] > mx ? e[j] : mx;
    for (int j = n; j < stride; ++j) e[j] = -1e30f;  // padding: exp gives ~0, never summed
    v16 sum = {};
    for (int j = 0; j < stride; j += 16) {
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
    inv[g] = 1.f / total;
  }
  v16 o[4][4] = {};
  for (int t = 0; t < n; ++t) {  // each value row read once for the G heads
    v16 vv[4];
    std::memcpy(vv, V + static_cast<size_t>(t) * 64, 256);
    for (int g = 0; g < G; ++g) {
      const float p = sc[static_cast<size_t>(g) * stride + t];
      for (int c = 0; c < 4; ++c) o[g][c] += p * vv[c];
    }
  }
  for (int g = 0; g < G; ++g)
    for (int c = 0; c < 4; ++c) {
      const v16 r = o[g][c] * inv[g];
      std::memcpy(out + g * 64 + c * 16, &r, 64);
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
  if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
      __builtin_cpu_supports("avx512vnni"))
    return "avx512-vnni";
  if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) return "avx2";
  return "";
}

struct Q4Decoder::Impl {
  Q4DecoderShape shape;
  std::string kernel;
  const Tile* tiles = nullptr;
  std::vector<float> cos, sin, embedding, norms;
  std::vector<Weight> weights;
  Pool pool;
  std::vector<float> h, x, qkv, attn, gate_up, act, tmp;  // per-step buffers, grown once
  Quantized qa;
  Impl(int threads) : pool(threads) {}

  void quantize(const float* src, int m, int K) {
    quantize_row(src + static_cast<size_t>(m) * K, K, qa.q.data() + static_cast<size_t>(m) * K,
                 qa.s.data() + static_cast<size_t>(m) * (K / 32),
                 qa.sum8.data() + static_cast<size_t>(m) * (K / 32));
  }

  // C[rows, N] = (quantized activations) x w; column tiles split between the workers.
  void gemm(int rows, const Weight& w, float* C) {
    const int nb = w.K / 32, nt = w.N / 16, nw = pool.size();
    pool.run([&](int wi) {
      const int lo = static_cast<int>(static_cast<int64_t>(nt) * wi / nw);
      const int hi = static_cast<int>(static_cast<int64_t>(nt) * (wi + 1) / nw);
      for (int t = lo; t < hi; ++t)
        for (int m0 = 0; m0 < rows; m0 += kMaxRows) {
          const int mr = std::min(kMaxRows, rows - m0);
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
  if (k.empty()) throw std::invalid_argument("this CPU has neither AVX2 nor AVX-512 VNNI");
  if (k != "avx512-vnni" && k != "avx2")
    throw std::invalid_argument("unknown kernel '" + k + "': use avx512-vnni or avx2");
  if (k == "avx512-vnni" && best != "avx512-vnni")
    throw std::invalid_argument("this CPU has no AVX-512 VNNI");
  Impl& d = *impl_;
  d.shape = s;
  d.kernel = k;
  d.tiles = k == "avx2" ? kAvx2 : kVnni;
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
                     const int64_t* slots, const std::vector<float*>& keys,
                     const std::vector<float*>& values, int context, float* logits,
                     const int64_t* outputs, int num_outputs) {
  Impl& d = *impl_;
  const Q4DecoderShape& s = d.shape;
  const int H = s.hidden, D = s.head_dim, NH = s.heads, KVH = s.kv_heads, I = s.intermediate;
  const int G = NH / KVH, QKV = (NH + 2 * KVH) * D, L = s.layers;
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
  for (int l = 0; l < L; ++l) {
    d.each_row(rows, [&](int m) {
      // The previous layer's MLP output joins the residual stream here.
      add_rms_norm_row(h + m * H, l ? tmp + m * H : nullptr, d.norms.data() + 2 * l * H, s.eps,
                       H, x + m * H);
      d.quantize(x, m, H);
    });
    d.gemm(rows, d.weights[4 * l], qkv);
    // Every row's keys and values are stored before any row attends: rows of one slot at
    // consecutive positions (a prompt chunk) see each other's, causally.
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
        std::memcpy(keys[l] + at, r + (NH + kh) * D, sizeof(float) * D);
        std::memcpy(values[l] + at, r + (NH + KVH + kh) * D, sizeof(float) * D);
      }
    });
    d.pool.run([&](int wi) {
      thread_local std::vector<float> sc;
      const size_t need = static_cast<size_t>(G) * ((longest + 15) / 16 * 16);
      if (sc.size() < need) sc.resize(need);
      for (int t = wi; t < tasks; t += d.pool.size()) {
        const int m = t / KVH, kh = t % KVH;
        const size_t base = (static_cast<size_t>(slots[m]) * KVH + kh) * context * D;
        attend(qkv + static_cast<size_t>(m) * QKV + kh * G * D, G, keys[l] + base,
               values[l] + base, static_cast<int>(positions[m]) + 1, scale, sc.data(),
               attn + static_cast<size_t>(m) * NH * D + kh * G * D);
      }
    });
    d.each_row(rows, [&](int m) { d.quantize(attn, m, NH * D); });
    d.gemm(rows, d.weights[4 * l + 1], tmp);
    d.each_row(rows, [&](int m) {
      add_rms_norm_row(h + m * H, tmp + m * H, d.norms.data() + (2 * l + 1) * H, s.eps, H,
                       x + m * H);
      d.quantize(x, m, H);
    });
    d.gemm(rows, d.weights[4 * l + 2], gate_up);
    d.each_row(rows, [&](int m) {
      silu_mul_row(gate_up + m * 2 * I, gate_up + m * 2 * I + I, I, act + m * I);
      d.quantize(act, m, I);
    });
    d.gemm(rows, d.weights[4 * l + 3], tmp);
  }
  // Logits of the rows asked for only (a prompt chunk needs its last), compacted in order.
  const int k = outputs ? num_outputs : rows;
  d.each_row(k, [&](int j) {
    const int m = outputs ? static_cast<int>(outputs[j]) : j;
    add_rms_norm_row(h + m * H, tmp + m * H, d.norms.data() + 2 * L * H, s.eps, H, x + j * H);
    d.quantize(x, j, H);
  });
  if (k) d.gemm(k, d.weights[4 * L], logits);
}

}  // namespace irouter
