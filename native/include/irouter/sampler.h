// Batched next-token sampler with exactly reproducible semantics.
//
// For row b with logits x (float32[V]), context c = tokens[offsets[b] :
// offsets[b+1]], prompt = c[:prompt_lens[b]], output = c[prompt_lens[b]:]:
//
//  0. Allowed tokens (structured outputs): when masks are given and
//     mask_rows[b] = k >= 0, token t may be drawn only if bit t % 32 of
//     masks[k][t / 32] is set (LSB first: llguidance's and xgrammar's layout);
//     every other token's logit is -inf from here on. A row whose mask allows
//     no token is an error. mask_rows[b] = -1: the row is free.
//  1. Penalties, in float32 arithmetic, each touched token once:
//     - repetition (HF/vLLM), for every distinct token t in prompt + output:
//         z[t] = z[t] > 0 ? z[t] / rep : z[t] * rep          (rep = 1: off)
//     - presence/frequency (OpenAI), for every distinct t in output, with
//       n = its count in output:  z[t] = z[t] - (presence + frequency * n)
//  2. temperature == 0: return argmax z (lowest index on ties). Done.
//  3. z = z / temperature (float32 division).
//  4. Order tokens by z desc, then index asc ("sorted order"). Candidates C:
//     the first top_k tokens of that order if 0 < top_k < V, else all V.
//     m = z of the first candidate (float64); if m == -inf, return it.
//  5. e[t] = exp(float64(z[t]) - m) for t in C (so the first e is 1.0), and
//     S = float64 sum of e over C in token index order. With no top_k both
//     run vectorized (vector_math.h): e within 1 ULP, 0 where z[t] - m < -708,
//     S summed in lanes; with top_k, libm's exp and a sequential sum.
//  6. Keep a prefix of C in sorted order, n_keep = |C| initially:
//     - top_p < 1: n_keep = 1 + the first j with (sequential float64 sum of
//       e over the first j+1 sorted candidates) >= float64(top_p) * S;
//       if no j qualifies, all of C stays.
//     - min_p > 0: additionally stop the prefix at the first j with
//       e[j] < float64(min_p), i.e. drop p < min_p * p_max (e[0] = 1, so
//       at least one token stays).
//  7. Renormalise: T = S if n_keep == |C|, else the sequential float64 sum of
//     e over the kept prefix in sorted order.
//  8. Draw: step = len(output) (row length - prompt_len),
//       x = splitmix64(seed ^ (step * 0x9E3779B97F4A7C15 mod 2^64)),
//       u = (x >> 11) * 2^-53   in [0, 1),
//     and return the first kept candidate j (sorted order) whose sequential
//     float64 sum of e over candidates 0..j is > u * T; the last kept one if
//     rounding leaves none. splitmix64(z): z += 0x9E3779B97F4A7C15;
//     z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9;
//     z = (z ^ (z >> 27)) * 0x94D049BB133111EB; return z ^ (z >> 31).
//
// The draw depends only on the row's own data, seed and step, never on the
// batch it is in. Native and a NumPy reference that follows these steps agree
// token for token unless a cut (top_p target, min_p threshold or u * T) falls
// within exp()'s and the sums' rounding (~1e-12 relative) of a cumulative sum. Logits must be finite or -inf (no NaN/+inf).
#pragma once

#include <cstdint>

namespace irouter {

struct SamplingBatch {
  const float* logits = nullptr;  // [batch, vocab], row-major
  int64_t batch = 0;
  int64_t vocab = 0;
  const float* temperature = nullptr;  // each array has `batch` entries
  const int32_t* top_k = nullptr;
  const float* top_p = nullptr;
  const float* min_p = nullptr;
  const float* repetition_penalty = nullptr;
  const float* presence_penalty = nullptr;
  const float* frequency_penalty = nullptr;
  const uint64_t* seeds = nullptr;
  const int64_t* tokens = nullptr;  // flat context tokens
  int64_t num_tokens = 0;
  const int64_t* offsets = nullptr;  // batch + 1 entries
  const int64_t* prompt_lens = nullptr;
  const uint32_t* masks = nullptr;  // [num_masks, mask_words] allowed-token bits, or null
  int64_t num_masks = 0;
  int64_t mask_words = 0;  // at least ceil(vocab / 32)
  const int32_t* mask_rows = nullptr;  // [batch]: -1 free, else a row of masks
};

uint64_t splitmix64(uint64_t z);

// The uniform draw in [0, 1) for a row with this seed after `step` outputs.
double uniform_draw(uint64_t seed, uint64_t step);

// Checks the per-row parameters, offsets and token ids; throws
// std::invalid_argument naming the argument and row. Shapes are the caller's
// job (the bindings check them against the arrays they were given).
void validate(const SamplingBatch& in);

// Writes one token per row to out[batch]. Calls validate() first. The
// logits are never modified. Rows may be spread over a few threads when the
// batch is large enough to pay for them.
void sample(const SamplingBatch& in, int64_t* out);

}  // namespace irouter
