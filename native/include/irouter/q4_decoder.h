// One decode step of a llama-architecture decoder over int4 weights, on the CPU.
//
// Why by hand: ONNX Runtime's int4 MatMulNBits and GroupQueryAttention kernels took 34-41 ms for
// a 16-row step of SmolLM2-135M on a 2-core AMD EPYC Zen 4, against 18.6 ms for OpenVINO's, and
// neither library runs a step under the router's own scheduler, KV slots and prefix cache. This
// step reads the ONNX graph's weights as they are (MatMulNBits: 4-bit codes, blocks of 32 along
// K, one float scale a block, zero point 8), quantizes activations to int8 per 32-block as
// MatMulNBits' accuracy level 4 does, and updates KV slot buffers laid out as the graphs' (float32,
// or float16 where it computes every step).
//
// A row's result depends only on that row (its token, position and slot contents), never on the
// other rows of the step or on the number of threads: integer sums are exact, and each row's float
// operations run in one fixed order.
#pragma once

#include <cstdint>
#include <memory>
#include <string>
#include <vector>

namespace irouter {

struct Q4DecoderShape {
  int layers = 0, hidden = 0, heads = 0, kv_heads = 0, head_dim = 0, intermediate = 0, vocab = 0;
  int rope_positions = 0;  // rows of the cos/sin caches
  float eps = 1e-5f;
};

// The best kernel this CPU runs: "amx-int8" (the VNNI tile, and AMX tiles for rows in groups of
// 16: the same bits; where Linux grants the process the tile state), "avx512-vnni" or "avx2";
// else "" (no kernel: use the graph).
std::string q4_best_kernel();

// (N, K) of weight i of a decoder of this shape: per layer the fused QKV projection, the output
// projection, the fused gate-up projection and the down projection, then the LM head.
struct WeightShape {
  int N = 0, K = 0;
};
WeightShape q4_weight_shape(const Q4DecoderShape& shape, int i);

class Q4Decoder {
 public:
  // cos/sin: [rope_positions, head_dim / 2] (rotate-half rotary); embedding: [vocab, hidden];
  // norms: [2 * layers + 1, hidden] (attention and MLP norm of each layer, then the final one);
  // codes/scales: 4 * layers + 1 MatMulNBits weights, per layer the fused QKV projection
  // (N = (heads + 2 kv_heads) * head_dim), the output projection, the fused gate-up projection
  // (N = 2 * intermediate, gate first) and the down projection, then the LM head; codes
  // [N, K / 32, 16] bytes, scales [N, K / 32]. Everything is copied. kernel: "amx-int8",
  // "avx512-vnni", "avx2" or "" for the best; throws std::invalid_argument for a kernel this CPU
  // lacks.
  Q4Decoder(const Q4DecoderShape& shape, const float* cos, const float* sin,
            const float* embedding, const float* norms, const std::vector<const uint8_t*>& codes,
            const std::vector<const float*>& scales, int threads, const std::string& kernel);
  ~Q4Decoder();
  Q4Decoder(const Q4Decoder&) = delete;
  Q4Decoder& operator=(const Q4Decoder&) = delete;

  // The KV slots a step reads and writes: per layer, keys and values [slots, kv_heads, context,
  // head_dim], float or (half) _Float16.
  struct KVBuffers {
    std::vector<void*> keys, values;
    bool half = false;
    int context = 0;
  };

  // Row r: token tokens[r] at position positions[r] of KV slot slots[r], whose positions before
  // it are computed there or by earlier rows of this call (a prompt chunk: rows of one slot at
  // consecutive positions); writes its keys and values there (rounded to half precision in
  // half buffers, and read back so by every row alike). Logits [num_outputs, vocab] of rows
  // outputs[0..num_outputs) (nullptr: every row). The caller checks ranges (tokens < vocab,
  // positions < min(context, rope_positions), slots valid, outputs strictly increasing rows).
  //
  // prefix_slots / prefix_lengths (nullptr: none): row r with prefix_slots[r] >= 0 reads
  // positions [0, prefix_lengths[r]) from that slot instead of its own (which need not hold
  // them): a prompt sharing its first tokens with another slot's, computed there before or by
  // that slot's rows of this call, computes only its own rows. The same bits as if its slot
  // held them. Every row of one slot names the same prefix, and prefix_lengths[r] <=
  // positions[r] (the caller checks).
  void step(int rows, const int64_t* tokens, const int64_t* positions, const int64_t* slots,
            const KVBuffers& kv, float* logits, const int64_t* outputs = nullptr,
            int num_outputs = 0, const int64_t* prefix_slots = nullptr,
            const int64_t* prefix_lengths = nullptr);

  const std::string& kernel() const;
  const Q4DecoderShape& shape() const;

 private:
  struct Impl;
  std::unique_ptr<Impl> impl_;
};

}  // namespace irouter
