#include "irouter/sampler.h"

#include "vector_math.h"

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <functional>
#include <memory>
#include <mutex>
#include <limits>
#include <numeric>
#include <stdexcept>
#include <string>
#include <thread>
#include <vector>

#if defined(__SSE2__)
#include <emmintrin.h>
#endif

namespace irouter {

namespace {

constexpr uint64_t kGolden = 0x9E3779B97F4A7C15ull;

// Scratch space reused across calls; one per thread so rows can run in
// parallel. Sized to the vocabulary on first use.
struct Workspace {
  std::vector<float> z;        // penalised, temperature-scaled logits
  std::vector<float> allowed;  // a masked row's logits, -inf where its mask says no
  std::vector<double> e;       // exp(z - m) for candidates
  std::vector<int32_t> order;  // token ids, sorted prefix first
  std::vector<int32_t> by_index;  // selection buffer, then candidates by index
  std::vector<int32_t> counts;  // output-token counts, kept all-zero between rows
  std::vector<uint8_t> mark;    // 1 = token in context, kept all-zero between rows

  void reserve(int64_t vocab) {
    const size_t v = static_cast<size_t>(vocab);
    if (z.size() < v) {
      z.resize(v);
      allowed.resize(v);
      e.resize(v);
      order.resize(v);
      by_index.resize(v);
      counts.assign(v, 0);
      mark.assign(v, 0);
    }
  }
};

// Workspaces outlive the short-lived threads of one call, so a call does not
// pay for allocating and zeroing vocabulary-sized buffers again.
class WorkspacePool {
 public:
  std::unique_ptr<Workspace> take() {
    std::lock_guard<std::mutex> lock(mu_);
    if (free_.empty()) return std::make_unique<Workspace>();
    auto ws = std::move(free_.back());
    free_.pop_back();
    return ws;
  }
  void give(std::unique_ptr<Workspace> ws) {
    std::lock_guard<std::mutex> lock(mu_);
    free_.push_back(std::move(ws));
  }

 private:
  std::mutex mu_;
  std::vector<std::unique_ptr<Workspace>> free_;
};

WorkspacePool& pool() {
  static WorkspacePool* p = new WorkspacePool();  // leaked: no exit-time teardown
  return *p;
}

#if defined(__SSE2__)
// Explicit SSE: without -ffast-math the compiler keeps a float max reduction
// scalar, which is ~10x slower than NumPy's argmax. Assumes no NaN.
float max_value(const float* x, int64_t n) {
  const float ninf = -std::numeric_limits<float>::infinity();
  __m128 m0 = _mm_set1_ps(ninf), m1 = m0, m2 = m0, m3 = m0;
  int64_t i = 0;
  for (; i + 16 <= n; i += 16) {
    m0 = _mm_max_ps(m0, _mm_loadu_ps(x + i));
    m1 = _mm_max_ps(m1, _mm_loadu_ps(x + i + 4));
    m2 = _mm_max_ps(m2, _mm_loadu_ps(x + i + 8));
    m3 = _mm_max_ps(m3, _mm_loadu_ps(x + i + 12));
  }
  alignas(16) float lanes[4];
  _mm_store_ps(lanes, _mm_max_ps(_mm_max_ps(m0, m1), _mm_max_ps(m2, m3)));
  float m = std::max(std::max(lanes[0], lanes[1]), std::max(lanes[2], lanes[3]));
  for (; i < n; ++i) m = x[i] > m ? x[i] : m;
  return m;
}

int64_t first_equal(const float* x, int64_t n, float v) {
  const __m128 vv = _mm_set1_ps(v);
  int64_t i = 0;
  for (; i + 4 <= n; i += 4) {
    const int mask = _mm_movemask_ps(_mm_cmpeq_ps(_mm_loadu_ps(x + i), vv));
    if (mask) return i + __builtin_ctz(static_cast<unsigned>(mask));
  }
  for (; i < n; ++i)
    if (x[i] == v) return i;
  return 0;
}
#else
float max_value(const float* x, int64_t n) {
  float m = -std::numeric_limits<float>::infinity();
  for (int64_t i = 0; i < n; ++i) m = x[i] > m ? x[i] : m;
  return m;
}

int64_t first_equal(const float* x, int64_t n, float v) {
  for (int64_t i = 0; i < n; ++i)
    if (x[i] == v) return i;
  return 0;
}
#endif

// Lowest index among the maxima.
int64_t argmax(const float* x, int64_t n) { return first_equal(x, n, max_value(x, n)); }

// Writes the first `want` tokens of sorted order (z desc, index asc) to
// idx[0..want), sorted. `buf` needs room for V indices.
//
// Small `want` (the usual top-k / nucleus prefix): one streaming pass keeps
// a buffer of the best tokens seen so far; once it holds `cap` of them it is
// cut back to the best `want` and their worst value becomes a threshold.
// Tokens arrive in index order, so a later token equal to the threshold
// ranks below every kept one: only z > threshold can still enter, and for
// typical logits almost every token fails that single comparison.
void select_top(const float* z, int64_t V, int64_t want, int32_t* buf, int32_t* idx) {
  auto before = [z](int32_t a, int32_t b) { return z[a] > z[b] || (z[a] == z[b] && a < b); };
  if (want * 4 > V) {
    std::iota(buf, buf + V, 0);
    if (want < V) std::nth_element(buf, buf + (want - 1), buf + V, before);
    std::sort(buf, buf + want, before);
    std::copy(buf, buf + want, idx);
    return;
  }
  const int64_t cap = std::min<int64_t>(V, want + std::max<int64_t>(want, 1024));
  int64_t n = 0;
  int64_t i = 0;
  auto cut = [&]() {
    std::nth_element(buf, buf + (want - 1), buf + n, before);
    n = want;
    return z[buf[want - 1]];
  };
  for (; i < V && n < cap; ++i) buf[n++] = static_cast<int32_t>(i);
  if (n == cap && i < V) {
    float threshold = cut();
#if defined(__SSE2__)
    for (; i + 4 <= V; i += 4) {
      int mask = _mm_movemask_ps(_mm_cmpgt_ps(_mm_loadu_ps(z + i), _mm_set1_ps(threshold)));
      while (mask) {
        const int lane = __builtin_ctz(static_cast<unsigned>(mask));
        mask &= mask - 1;
        const float v = z[i + lane];
        if (!(v > threshold)) continue;  // the threshold rose within this group
        buf[n++] = static_cast<int32_t>(i + lane);
        if (n == cap) threshold = cut();
      }
    }
#endif
    for (; i < V; ++i) {
      if (z[i] > threshold) {
        buf[n++] = static_cast<int32_t>(i);
        if (n == cap) threshold = cut();
      }
    }
  }
  if (n > want) std::nth_element(buf, buf + (want - 1), buf + n, before);
  std::sort(buf, buf + want, before);
  std::copy(buf, buf + want, idx);
}

struct RowParams {
  float temperature, top_p, min_p, rep, presence, frequency;
  int32_t top_k;
  uint64_t seed;
  const int64_t* ctx;
  int64_t ctx_len, prompt_len;
};

// Applies the penalties in place to the listed context tokens of z, reading
// the original value from x and finishing with `finish` (identity or
// division by the temperature). Each distinct token is rewritten once.
template <class Finish>
void apply_penalties(const float* x, float* z, const RowParams& p, Workspace& ws,
                     Finish finish) {
  for (int64_t i = 0; i < p.ctx_len; ++i) {
    const int64_t t = p.ctx[i];
    ws.mark[t] = 1;
    if (i >= p.prompt_len) ws.counts[t] += 1;
  }
  for (int64_t i = 0; i < p.ctx_len; ++i) {
    const int64_t t = p.ctx[i];
    if (!ws.mark[t]) continue;  // already rewritten
    float v = x[t];
    v = v > 0.0f ? v / p.rep : v * p.rep;
    const int32_t n = ws.counts[t];
    if (n > 0) v = v - (p.presence + p.frequency * static_cast<float>(n));
    z[t] = finish(v);
    ws.mark[t] = 0;
    ws.counts[t] = 0;
  }
}

// Copies x to ws.allowed with every token the mask does not allow at -inf.
const float* apply_mask(const float* x, int64_t V, const uint32_t* mask, Workspace& ws) {
  float* out = ws.allowed.data();
  const float ninf = -std::numeric_limits<float>::infinity();
  for (int64_t w = 0; w * 32 < V; ++w) {
    const uint32_t bits = mask[w];
    const int64_t base = w * 32;
    const int64_t n = std::min<int64_t>(32, V - base);
    if (bits == 0xFFFFFFFFu && n == 32) {
      std::copy(x + base, x + base + 32, out + base);
    } else if (bits == 0) {
      std::fill(out + base, out + base + n, ninf);
    } else {
      for (int64_t i = 0; i < n; ++i) out[base + i] = (bits >> i) & 1u ? x[base + i] : ninf;
    }
  }
  return out;
}

int64_t sample_row(const float* x, int64_t V, const RowParams& p, Workspace& ws) {
  const bool penalised =
      p.ctx_len > 0 && (p.rep != 1.0f || p.presence != 0.0f || p.frequency != 0.0f);
  float* z = ws.z.data();

  if (p.temperature == 0.0f) {
    if (!penalised) return argmax(x, V);
    std::copy(x, x + V, z);
    apply_penalties(x, z, p, ws, [](float v) { return v; });
    return argmax(z, V);
  }

  const float temp = p.temperature;
  sampling::divide(x, V, temp, z);
  if (penalised) apply_penalties(x, z, p, ws, [temp](float v) { return v / temp; });

  // Sorted order: z desc, index asc. Only a prefix of it is ever built;
  // `sorted` grows geometrically as the walks below reach further.
  int32_t* order = ws.order.data();
  int64_t sorted = 0;
  int64_t ncand = V;
  auto ensure_sorted = [&](int64_t j) {  // order[0..j] sorted
    if (j < sorted) return;
    sorted = std::min<int64_t>(ncand, std::max<int64_t>({j + 1, 4 * sorted, 64}));
    select_top(z, V, sorted, ws.by_index.data(), order);
  };

  double* e = ws.e.data();
  double S = 0.0;
  if (p.top_k > 0 && p.top_k < V) {
    ncand = p.top_k;
    ensure_sorted(ncand - 1);
    const double m = z[order[0]];
    if (m == -std::numeric_limits<double>::infinity()) return order[0];
    int32_t* by_index = ws.by_index.data();
    std::copy(order, order + ncand, by_index);
    std::sort(by_index, by_index + ncand);
    for (int64_t j = 0; j < ncand; ++j) {
      const int32_t t = by_index[j];
      e[t] = std::exp(static_cast<double>(z[t]) - m);
      S += e[t];
    }
  } else {
    const float mf = max_value(z, V);
    if (mf == -std::numeric_limits<float>::infinity()) return 0;
    S = sampling::exp_sum(z, V, mf, e);
  }

  int64_t n_keep = ncand;
  double kept_sum = 0.0;  // sorted-order sum of e over order[0..n_keep)
  if (p.top_p < 1.0f) {
    const double target = static_cast<double>(p.top_p) * S;
    double cum = 0.0;
    for (int64_t j = 0; j < ncand; ++j) {
      ensure_sorted(j);
      cum += e[order[j]];
      if (cum >= target) {
        n_keep = j + 1;
        break;
      }
    }
  }
  if (p.min_p > 0.0f) {
    const double threshold = p.min_p;
    for (int64_t j = 0; j < n_keep; ++j) {
      ensure_sorted(j);
      if (e[order[j]] < threshold) {
        n_keep = j;
        break;
      }
    }
  }
  double T = S;
  if (n_keep < ncand) {
    for (int64_t j = 0; j < n_keep; ++j) kept_sum += e[order[j]];
    T = kept_sum;
  }

  const int64_t step = p.ctx_len - p.prompt_len;
  const double target = uniform_draw(p.seed, static_cast<uint64_t>(step)) * T;
  double cum = 0.0;
  for (int64_t j = 0; j < n_keep; ++j) {
    ensure_sorted(j);
    cum += e[order[j]];
    if (cum > target) return order[j];
  }
  ensure_sorted(n_keep - 1);
  return order[n_keep - 1];
}

[[noreturn]] void bad_row(const char* name, int64_t b, const std::string& value,
                          const char* rule) {
  throw std::invalid_argument(std::string(name) + "[" + std::to_string(b) + "]=" + value +
                              " " + rule);
}

std::string fmt(float v) {
  char buf[32];
  std::snprintf(buf, sizeof buf, "%g", static_cast<double>(v));
  return buf;
}

}  // namespace

uint64_t splitmix64(uint64_t z) {
  z += kGolden;
  z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
  z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
  return z ^ (z >> 31);
}

double uniform_draw(uint64_t seed, uint64_t step) {
  const uint64_t x = splitmix64(seed ^ (step * kGolden));
  return static_cast<double>(x >> 11) * 0x1.0p-53;
}

void validate(const SamplingBatch& in) {
  if (in.batch > 0 && in.vocab < 1)
    throw std::invalid_argument("logits must have a vocabulary of at least 1 token");
  if (in.vocab > std::numeric_limits<int32_t>::max())
    throw std::invalid_argument("logits vocabulary of " + std::to_string(in.vocab) +
                                " tokens exceeds 2^31 - 1");
  if (in.masks != nullptr) {
    if (in.mask_words * 32 < in.vocab)
      throw std::invalid_argument("masks must have at least ceil(V / 32) = " +
                                  std::to_string((in.vocab + 31) / 32) + " words per row, got " +
                                  std::to_string(in.mask_words));
    for (int64_t b = 0; b < in.batch; ++b) {
      const int32_t k = in.mask_rows[b];
      if (k < -1 || k >= in.num_masks)
        bad_row("mask_rows", b, std::to_string(k),
                ("must be -1 (free) or a row of masks in [0, " + std::to_string(in.num_masks) +
                 ")").c_str());
      if (k < 0) continue;
      const uint32_t* m = in.masks + k * in.mask_words;
      bool any = false;
      for (int64_t w = 0; w * 32 < in.vocab && !any; ++w) {
        const int64_t n = std::min<int64_t>(32, in.vocab - w * 32);
        any = (m[w] & (n == 32 ? 0xFFFFFFFFu : ((1u << n) - 1u))) != 0;
      }
      if (!any) bad_row("mask_rows", b, std::to_string(k), "names a mask that allows no token");
    }
  }
  if (in.offsets[0] < 0 || in.offsets[in.batch] > in.num_tokens)
    throw std::invalid_argument("offsets must lie within [0, len(tokens)=" +
                                std::to_string(in.num_tokens) + "]");
  for (int64_t b = 0; b < in.batch; ++b) {
    const float t = in.temperature[b];
    if (!(t >= 0.0f) || std::isinf(t)) bad_row("temperature", b, fmt(t), "must be finite and >= 0");
    if (in.top_k[b] < 0) bad_row("top_k", b, std::to_string(in.top_k[b]), "must be >= 0 (0 = off)");
    const float tp = in.top_p[b];
    if (!(tp > 0.0f && tp <= 1.0f)) bad_row("top_p", b, fmt(tp), "must be in (0, 1] (1 = off)");
    const float mp = in.min_p[b];
    if (!(mp >= 0.0f && mp <= 1.0f)) bad_row("min_p", b, fmt(mp), "must be in [0, 1] (0 = off)");
    const float rp = in.repetition_penalty[b];
    if (!(rp > 0.0f) || std::isinf(rp))
      bad_row("repetition_penalty", b, fmt(rp), "must be finite and > 0 (1 = off)");
    if (!std::isfinite(in.presence_penalty[b]))
      bad_row("presence_penalty", b, fmt(in.presence_penalty[b]), "must be finite");
    if (!std::isfinite(in.frequency_penalty[b]))
      bad_row("frequency_penalty", b, fmt(in.frequency_penalty[b]), "must be finite");
    const int64_t len = in.offsets[b + 1] - in.offsets[b];
    if (len < 0)
      throw std::invalid_argument("offsets must be non-decreasing, but offsets[" +
                                  std::to_string(b + 1) + "] < offsets[" + std::to_string(b) +
                                  "]");
    if (in.prompt_lens[b] < 0 || in.prompt_lens[b] > len)
      bad_row("prompt_lens", b, std::to_string(in.prompt_lens[b]),
              ("must be in [0, " + std::to_string(len) + "], the row's context length").c_str());
    for (int64_t i = in.offsets[b]; i < in.offsets[b + 1]; ++i)
      if (in.tokens[i] < 0 || in.tokens[i] >= in.vocab)
        bad_row("tokens", i, std::to_string(in.tokens[i]),
                ("is not a token id in [0, " + std::to_string(in.vocab) + ")").c_str());
  }
}

void sample(const SamplingBatch& in, int64_t* out) {
  validate(in);
  auto run_rows = [&in, out](int64_t begin, int64_t end) {
    std::unique_ptr<Workspace> owned = pool().take();
    Workspace& ws = *owned;
    ws.reserve(in.vocab);
    for (int64_t b = begin; b < end; ++b) {
      RowParams p{in.temperature[b],        in.top_p[b],
                  in.min_p[b],              in.repetition_penalty[b],
                  in.presence_penalty[b],   in.frequency_penalty[b],
                  in.top_k[b],              in.seeds[b],
                  in.tokens + in.offsets[b], in.offsets[b + 1] - in.offsets[b],
                  in.prompt_lens[b]};
      const float* x = in.logits + b * in.vocab;
      if (in.masks != nullptr && in.mask_rows[b] >= 0)
        x = apply_mask(x, in.vocab, in.masks + in.mask_rows[b] * in.mask_words, ws);
      out[b] = sample_row(x, in.vocab, p, ws);
    }
    pool().give(std::move(owned));
  };

  // Threads only pay off once a call does well over their start-up cost
  // (~20-50 us each). Rough cost in element passes: a greedy row is one
  // vector pass over V, a stochastic row (divide, exp, select) ~16.
  int64_t cost = 0;
  for (int64_t b = 0; b < in.batch; ++b) cost += (in.temperature[b] != 0.0f ? 16 : 1) * in.vocab;
  const unsigned hw = std::max(1u, std::thread::hardware_concurrency());
  int64_t nthreads = std::min<int64_t>({static_cast<int64_t>(hw), in.batch, 8});
  if (cost < (int64_t{1} << 19)) nthreads = 1;
  if (nthreads <= 1) {
    run_rows(0, in.batch);
    return;
  }
  std::vector<std::thread> threads;
  threads.reserve(nthreads - 1);
  const int64_t per = (in.batch + nthreads - 1) / nthreads;
  for (int64_t k = 1; k < nthreads; ++k) {
    const int64_t begin = std::min(in.batch, k * per);
    const int64_t end = std::min(in.batch, begin + per);
    threads.emplace_back(run_rows, begin, end);
  }
  run_rows(0, std::min(in.batch, per));
  for (auto& t : threads) t.join();
}

}  // namespace irouter
