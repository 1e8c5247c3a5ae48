// Python glue for the backends' CPU kernels (backends._kernels): argument checks that need
// array shapes, and the GIL released around the work. No logic here.
#include <nanobind/nanobind.h>
#include <nanobind/ndarray.h>
#include <nanobind/stl/optional.h>
#include <nanobind/stl/string.h>
#include <nanobind/stl/vector.h>

#include <algorithm>
#include <optional>
#include <string>
#include <vector>

#include "binding_util.h"
#include "irouter/kv_blocks.h"
#include "irouter/q4_decoder.h"

namespace nb = nanobind;
using namespace nb::literals;
using irouter_bindings::expect_shape;
using irouter_bindings::In;

namespace {

// Q4Decoder: the arrays' shapes are checked here, once, so the C++ step may trust them.
// Keys and values: float32 or float16 (checked in q4_step, all alike).
using KVList = std::vector<nb::ndarray<nb::c_contig, nb::device::cpu>>;

irouter::Q4Decoder* make_q4_decoder(int layers, int hidden, int heads, int kv_heads, int head_dim,
                                    int intermediate, int vocab, float eps, In<float> cos,
                                    In<float> sin, In<float> embedding, In<float> norms,
                                    const std::vector<In<uint8_t>>& codes,
                                    const std::vector<In<float>>& scales, int threads,
                                    const std::string& kernel) {
  irouter::Q4DecoderShape s;
  s.layers = layers;
  s.hidden = hidden;
  s.heads = heads;
  s.kv_heads = kv_heads;
  s.head_dim = head_dim;
  s.intermediate = intermediate;
  s.vocab = vocab;
  s.eps = eps;
  if (layers < 1 || hidden < 1 || heads < 1 || kv_heads < 1 || intermediate < 1 || vocab < 1 ||
      threads < 1)
    throw nb::value_error(
        "layers, hidden, heads, kv_heads, intermediate, vocab and threads must be >= 1");
  expect_shape(cos, "cos", {-1, head_dim / 2}, "(positions, head_dim / 2)");
  expect_shape(sin, "sin", {static_cast<int64_t>(cos.shape(0)), head_dim / 2},
               "like cos");
  s.rope_positions = static_cast<int>(cos.shape(0));
  expect_shape(embedding, "embedding", {vocab, hidden}, "(vocab, hidden)");
  expect_shape(norms, "norms", {2 * layers + 1, hidden}, "(2 * layers + 1, hidden)");
  if (codes.size() != static_cast<size_t>(4 * layers + 1) || scales.size() != codes.size())
    throw nb::value_error("codes and scales must hold 4 * layers + 1 weights each");
  std::vector<const uint8_t*> c;
  std::vector<const float*> sc;
  for (int i = 0; i < 4 * layers + 1; ++i) {
    const irouter::WeightShape w = irouter::q4_weight_shape(s, i);
    const std::string name = "codes[" + std::to_string(i) + "]";
    expect_shape(codes[i], name.c_str(), {w.N, w.K / 32, 16}, "(N, K / 32, 16)");
    expect_shape(scales[i], ("scales[" + std::to_string(i) + "]").c_str(), {w.N, w.K / 32},
                 "(N, K / 32)");
    c.push_back(codes[i].data());
    sc.push_back(scales[i].data());
  }
  try {
    return new irouter::Q4Decoder(s, cos.data(), sin.data(), embedding.data(), norms.data(), c,
                                  sc, threads, kernel);
  } catch (const std::invalid_argument& e) {
    throw nb::value_error(e.what());
  }
}

void q4_step(irouter::Q4Decoder& d, In<int64_t> slots, In<int64_t> tokens, In<int64_t> positions,
             const KVList& keys, const KVList& values,
             nb::ndarray<float, nb::c_contig, nb::device::cpu> logits,
             std::optional<In<int64_t>> outputs, std::optional<In<int64_t>> prefix_slots,
             std::optional<In<int64_t>> prefix_lengths) {
  const irouter::Q4DecoderShape& s = d.shape();
  expect_shape(slots, "slots", {-1}, "(n,)");
  const int64_t n = static_cast<int64_t>(slots.shape(0));
  expect_shape(tokens, "tokens", {n}, "like slots");
  expect_shape(positions, "positions", {n}, "like slots");
  if (n < 1) throw nb::value_error("slots is empty");
  if (keys.size() != static_cast<size_t>(s.layers) || values.size() != keys.size())
    throw nb::value_error("keys and values must hold one array a layer");
  if (keys[0].ndim() != 4 || keys[0].shape(1) != static_cast<size_t>(s.kv_heads) ||
      keys[0].shape(3) != static_cast<size_t>(s.head_dim))
    throw nb::value_error("keys[i] must have shape (slots, kv_heads, context, head_dim)");
  const size_t num_slots = keys[0].shape(0), context = keys[0].shape(2);
  const nb::dlpack::dtype kind = keys[0].dtype();
  irouter::Q4Decoder::KVBuffers kv;
  kv.context = static_cast<int>(context);
  kv.half = kind == nb::dtype<float>() ? false
            : kind.code == static_cast<uint8_t>(nb::dlpack::dtype_code::Float) &&
                    kind.bits == 16 && kind.lanes == 1
                ? true
                : throw nb::value_error("keys and values must be float32 or float16");
  for (size_t i = 0; i < keys.size(); ++i) {
    for (const auto* a : {&keys[i], &values[i]}) {
      if (a->ndim() != 4 || a->shape(0) != num_slots || a->shape(1) != keys[0].shape(1) ||
          a->shape(2) != context || a->shape(3) != keys[0].shape(3))
        throw nb::value_error("every keys[i] and values[i] must have keys[0]'s shape");
      if (a->dtype() != kind)
        throw nb::value_error("every keys[i] and values[i] must have keys[0]'s dtype");
    }
    kv.keys.push_back(keys[i].data());
    kv.values.push_back(values[i].data());
  }
  int64_t wanted = n;
  if (outputs) {
    expect_shape(*outputs, "outputs", {-1}, "(k,)");
    wanted = static_cast<int64_t>(outputs->shape(0));
    // Increasing rows: each at most once (the step normalises a row's residual in place).
    for (int64_t j = 0; j < wanted; ++j) {
      const int64_t row = outputs->data()[j];
      if (row < 0 || row >= n || (j && row <= outputs->data()[j - 1]))
        throw nb::value_error(("outputs[" + std::to_string(j) + "] = " + std::to_string(row) +
                               ": outputs must be increasing rows in 0.." +
                               std::to_string(n - 1))
                                  .c_str());
    }
  }
  if (logits.ndim() != 2 || logits.shape(0) < static_cast<size_t>(wanted) ||
      logits.shape(1) != static_cast<size_t>(s.vocab))
    throw nb::value_error("logits must have shape (>= rows with logits, vocab)");
  const int64_t limit = std::min<int64_t>(static_cast<int64_t>(context), s.rope_positions);
  std::vector<int64_t> last(num_slots, -1);  // the position a slot's previous row computes
  for (int64_t r = 0; r < n; ++r) {
    const int64_t slot = slots.data()[r], token = tokens.data()[r], pos = positions.data()[r];
    if (slot < 0 || slot >= static_cast<int64_t>(num_slots))
      throw nb::value_error(("slot " + std::to_string(slot) + " is out of range").c_str());
    if (token < 0 || token >= s.vocab)
      throw nb::value_error(
          ("token " + std::to_string(token) + " is outside the vocabulary").c_str());
    if (pos < 0 || pos >= limit)
      throw nb::value_error(("position " + std::to_string(pos) + " is outside 0.." +
                             std::to_string(limit - 1))
                                .c_str());
    if (last[slot] >= 0 && pos != last[slot] + 1)
      throw nb::value_error(("rows of slot " + std::to_string(slot) +
                             " must be at consecutive positions, in order")
                                .c_str());
    last[slot] = pos;
  }
  if (prefix_slots.has_value() != prefix_lengths.has_value())
    throw nb::value_error("prefix_slots and prefix_lengths come together");
  if (prefix_slots) {
    expect_shape(*prefix_slots, "prefix_slots", {n}, "like slots");
    expect_shape(*prefix_lengths, "prefix_lengths", {n}, "like slots");
    // A slot's rows form one prompt: they must name one prefix (the step reads it by runs).
    std::vector<std::pair<int64_t, int64_t>> named(num_slots, {-2, 0});
    for (int64_t r = 0; r < n; ++r) {
      const int64_t slot = slots.data()[r], from = prefix_slots->data()[r];
      const int64_t length = prefix_lengths->data()[r], pos = positions.data()[r];
      const auto row = [r] { return "row " + std::to_string(r) + ": "; };  // on errors only
      if (from >= 0) {
        if (from >= static_cast<int64_t>(num_slots) || from == slot)
          throw nb::value_error((row() + "prefix slot " + std::to_string(from) +
                                 " must be another slot in range").c_str());
        if (length < 1 || length > pos)
          throw nb::value_error((row() + "prefix length " + std::to_string(length) +
                                 " must be in 1.." + std::to_string(pos) + " (its position)")
                                    .c_str());
      } else if (from != -1) {
        throw nb::value_error((row() + "prefix slot " + std::to_string(from) +
                               " must be -1 (none) or a slot").c_str());
      }
      const std::pair<int64_t, int64_t> mine{from, from >= 0 ? length : 0};
      if (named[slot].first != -2 && named[slot] != mine)
        throw nb::value_error(("rows of slot " + std::to_string(slot) +
                               " must name the same prefix")
                                  .c_str());
      named[slot] = mine;
    }
    for (int64_t r = 0; r < n; ++r) {  // a lender holds its own first positions
      const int64_t from = prefix_slots->data()[r];
      if (from >= 0 && named[from].first >= 0)
        throw nb::value_error(("slot " + std::to_string(from) +
                               " reads its own prefix elsewhere: it cannot lend one")
                                  .c_str());
    }
  }
  nb::gil_scoped_release release;
  d.step(static_cast<int>(n), tokens.data(), positions.data(), slots.data(), kv, logits.data(),
         outputs ? outputs->data() : nullptr, static_cast<int>(wanted),
         prefix_slots ? prefix_slots->data() : nullptr,
         prefix_lengths ? prefix_lengths->data() : nullptr);
}

// KV block copies: every shape and range checked here, so the copies may trust them.
// Every buffer of `list` (the argument `name`) 4-dimensional, with list[0]'s dtype and shape.
void expect_alike(const KVList& list, const char* name) {
  const auto& a = list[0];
  for (const auto& b : list) {
    if (b.ndim() != 4 || b.dtype() != a.dtype())
      throw nb::value_error(
          (std::string("every buffer must have ") + name + "[0]'s dtype and 4 dimensions").c_str());
    for (size_t d = 0; d < 4; ++d)
      if (b.shape(d) != a.shape(d))
        throw nb::value_error((std::string("every buffer must have the shape of the first of its "
                                           "list (") + name + "[0]'s shape)").c_str());
  }
}

irouter::KVBlockShape kv_block_shape(const KVList& slot_buffers, const KVList& pool_buffers,
                                     int64_t slot, int64_t start, In<int64_t> blocks) {
  if (slot_buffers.empty() || slot_buffers.size() != pool_buffers.size())
    throw nb::value_error("slot_buffers and pool_buffers must be as many, at least one");
  const auto& a = slot_buffers[0];
  const auto& p = pool_buffers[0];
  if (a.ndim() != 4 || p.ndim() != 4 || p.shape(1) != a.shape(1) || p.shape(3) != a.shape(3))
    throw nb::value_error(
        "slot buffers must be (slots, heads, context, head_dim) and pool buffers "
        "(blocks, heads, block_size, head_dim)");
  expect_alike(slot_buffers, "slot_buffers");
  expect_alike(pool_buffers, "pool_buffers");
  if (p.dtype() != a.dtype())
    throw nb::value_error("every buffer must have slot_buffers[0]'s dtype and 4 dimensions");
  irouter::KVBlockShape s{};
  s.slots = static_cast<int64_t>(a.shape(0));
  s.heads = static_cast<int64_t>(a.shape(1));
  s.context = static_cast<int64_t>(a.shape(2));
  s.head_dim = static_cast<int64_t>(a.shape(3));
  s.blocks = static_cast<int64_t>(p.shape(0));
  s.block_size = static_cast<int64_t>(p.shape(2));
  s.item_bytes = static_cast<int64_t>(a.itemsize());
  if (s.block_size < 1) throw nb::value_error("pool buffers must hold blocks of >= 1 position");
  expect_shape(blocks, "blocks", {-1}, "(n,)");
  const int64_t n = static_cast<int64_t>(blocks.shape(0));
  if (slot < 0 || slot >= s.slots)
    throw nb::value_error(("slot " + std::to_string(slot) + " is out of range").c_str());
  // Compared without forming start + n * block_size, which a huge start would overflow.
  if (start < 0 || start > s.context || n > (s.context - start) / s.block_size)
    throw nb::value_error(("positions from " + std::to_string(start) + ", " +
                           std::to_string(n) + " blocks of " + std::to_string(s.block_size) +
                           ", are outside 0.." + std::to_string(s.context))
                              .c_str());
  for (int64_t j = 0; j < n; ++j)
    if (blocks.data()[j] < 0 || blocks.data()[j] >= s.blocks)
      throw nb::value_error(
          ("block " + std::to_string(blocks.data()[j]) + " is out of range").c_str());
  return s;
}

void kv_load_blocks(const KVList& slot_buffers, const KVList& pool_buffers, int64_t slot,
                    In<int64_t> blocks) {
  const irouter::KVBlockShape s = kv_block_shape(slot_buffers, pool_buffers, slot, 0, blocks);
  std::vector<void*> to;
  std::vector<const void*> from;
  for (size_t i = 0; i < slot_buffers.size(); ++i) {
    to.push_back(slot_buffers[i].data());
    from.push_back(pool_buffers[i].data());
  }
  nb::gil_scoped_release release;
  irouter::kv_load_blocks(to, from, s, slot, blocks.data(),
                          static_cast<int64_t>(blocks.shape(0)));
}

void kv_save_blocks(const KVList& slot_buffers, const KVList& pool_buffers, int64_t slot,
                    int64_t start, In<int64_t> blocks) {
  const irouter::KVBlockShape s =
      kv_block_shape(slot_buffers, pool_buffers, slot, start, blocks);
  std::vector<const void*> from;
  std::vector<void*> to;
  for (size_t i = 0; i < slot_buffers.size(); ++i) {
    from.push_back(slot_buffers[i].data());
    to.push_back(pool_buffers[i].data());
  }
  nb::gil_scoped_release release;
  irouter::kv_save_blocks(from, to, s, slot, start, blocks.data(),
                          static_cast<int64_t>(blocks.shape(0)));
}

void kv_copy_prefix(const KVList& buffers, int64_t from, In<int64_t> to, int64_t n) {
  if (buffers.empty()) throw nb::value_error("buffers must hold at least one slot buffer");
  expect_alike(buffers, "buffers");
  const auto& a = buffers[0];
  irouter::KVBlockShape s{static_cast<int64_t>(a.shape(0)), static_cast<int64_t>(a.shape(1)),
                          static_cast<int64_t>(a.shape(2)), static_cast<int64_t>(a.shape(3)),
                          0, 0, static_cast<int64_t>(a.itemsize())};
  expect_shape(to, "to", {-1}, "(k,)");
  const auto slot_ok = [&](int64_t slot) { return 0 <= slot && slot < s.slots; };
  if (!slot_ok(from))
    throw nb::value_error(("from=" + std::to_string(from) + " is not a slot").c_str());
  for (size_t j = 0; j < to.shape(0); ++j)
    if (!slot_ok(to.data()[j]) || to.data()[j] == from)
      throw nb::value_error(("to[" + std::to_string(j) + "]=" + std::to_string(to.data()[j]) +
                             " must be another slot than from")
                                .c_str());
  if (n < 0 || n > s.context)
    throw nb::value_error(("n=" + std::to_string(n) + " must be in 0.." +
                           std::to_string(s.context) + " (the context)")
                              .c_str());
  std::vector<void*> all;
  for (const auto& b : buffers) all.push_back(b.data());
  nb::gil_scoped_release release;
  irouter::kv_copy_prefix(all, s, from, to.data(), static_cast<int64_t>(to.shape(0)), n);
}

}  // namespace

NB_MODULE(_kernels, m) {
  m.doc() = "irouter's CPU kernels for the backends: the int4 decoder step, KV block copies.";
  m.def("q4_best_kernel", &irouter::q4_best_kernel,
        "The int4 decode kernel this CPU runs: 'amx-int8' (the VNNI tile, and AMX for rows in "
        "groups of 16), 'avx512-vnni', 'avx2', or '' (none).");
  nb::class_<irouter::Q4Decoder>(
      m, "Q4Decoder",
      "A llama decoder's decode step over MatMulNBits int4 weights (native/include/irouter/"
      "q4_decoder.h); each row's result independent of the others and of the thread count.")
      .def(nb::new_(&make_q4_decoder), "layers"_a, "hidden"_a, "heads"_a, "kv_heads"_a,
           "head_dim"_a, "intermediate"_a, "vocab"_a, "eps"_a, "cos"_a, "sin"_a,
           "embedding"_a, "norms"_a, "codes"_a, "scales"_a, "threads"_a, "kernel"_a = "",
           "Copies every array. kernel: 'amx-int8', 'avx512-vnni', 'avx2' or '' for the CPU's "
           "best.")
      // noconvert: a converted copy of a KV buffer or of logits would take the writes.
      .def("step", &q4_step, "slots"_a, "tokens"_a, "positions"_a, "keys"_a.noconvert(),
           "values"_a.noconvert(), "logits"_a.noconvert(), "outputs"_a = nb::none(),
           "prefix_slots"_a = nb::none(), "prefix_lengths"_a = nb::none(),
           "Row r: tokens[r] at positions[r] of KV slot slots[r] (earlier positions computed "
           "there or by earlier rows: a prompt chunk is rows of one slot at consecutive "
           "positions); writes its keys and values (float32, or float16: rounded so), and "
           "logits[j] of row outputs[j] (every row's without outputs). Row r with "
           "prefix_slots[r] >= 0 (-1: none) reads positions 0..prefix_lengths[r]-1 from that "
           "slot instead of its own (computed there, or by its rows in this call), the same "
           "bits as if its own held them; a slot's rows name one prefix.")
      .def_prop_ro("kernel", &irouter::Q4Decoder::kernel);
  // noconvert: a converted copy of a buffer would take the writes.
  m.def("kv_load_blocks", &kv_load_blocks, "slot_buffers"_a.noconvert(),
        "pool_buffers"_a.noconvert(), "slot"_a, "blocks"_a,
        "Copy pool blocks blocks[0..n) into positions 0..n * block_size of `slot` in every "
        "slot buffer (slot_buffers[i] from pool_buffers[i]; slot buffers (slots, heads, "
        "context, head_dim), pool buffers (blocks, heads, block_size, head_dim), one dtype).");
  m.def("kv_save_blocks", &kv_save_blocks, "slot_buffers"_a.noconvert(),
        "pool_buffers"_a.noconvert(), "slot"_a, "start"_a, "blocks"_a,
        "Copy positions start..start + n * block_size of `slot` into pool blocks "
        "blocks[0..n) (shapes as kv_load_blocks).");
  m.def("kv_copy_prefix", &kv_copy_prefix, "buffers"_a.noconvert(), "from_slot"_a, "to"_a,
        "n"_a,
        "Copy positions 0..n of slot from_slot into the same positions of each slot in `to`, "
        "in every slot buffer (slots, heads, context, head_dim), all of one shape and dtype.");
}
