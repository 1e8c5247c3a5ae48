// Copies between a decoder's per-slot KV buffers and its prefix-cache block pool
// (backends/kv_pool.py). A slot buffer is [slots, heads, context, head_dim] and a pool buffer
// [blocks, heads, block_size, head_dim], one of each per layer for keys and one for values,
// all of one element type: a block is block_size positions of one slot, copied as one run of
// block_size * head_dim elements per head. Why by hand: NumPy does it as a gather into a
// temporary and a strided copy per buffer, ~2.5x slower for 4-position blocks (AMD EPYC Zen 4).
#pragma once

#include <cstdint>
#include <vector>

namespace irouter {

struct KVBlockShape {
  int64_t slots, heads, context, head_dim;  // a slot buffer's shape
  int64_t blocks, block_size;               // a pool buffer's first and third dimensions
  int64_t item_bytes;                       // bytes per element
};

// Pool blocks blocks[0..n) into positions 0..n * block_size of `slot` in every slot buffer
// (slot_buffers[i] takes pool_buffers[i]); from 1 MiB on, two threads copy half the buffers
// each, so no two buffers may overlap. Shapes and ranges are the caller's to check.
void kv_load_blocks(const std::vector<void*>& slot_buffers,
                    const std::vector<const void*>& pool_buffers, const KVBlockShape& shape,
                    int64_t slot, const int64_t* blocks, int64_t n);

// Positions start..start + n * block_size of `slot` into pool blocks blocks[0..n).
void kv_save_blocks(const std::vector<const void*>& slot_buffers,
                    const std::vector<void*>& pool_buffers, const KVBlockShape& shape,
                    int64_t slot, int64_t start, const int64_t* blocks, int64_t n);

// Positions 0..n of slot `from` into the same positions of slots to[0..k), in every buffer
// (slot buffers, as above): a prompt chunk read its prefix from another slot and the prefix is
// settled into its own (backends/kv_pool.py). Two threads as kv_load_blocks. Shapes, ranges
// and to[i] != from are the caller's to check.
void kv_copy_prefix(const std::vector<void*>& buffers, const KVBlockShape& shape, int64_t from,
                    const int64_t* to, int64_t k, int64_t n);

}  // namespace irouter
