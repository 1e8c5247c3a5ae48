// See kv_blocks.h.
#include "irouter/kv_blocks.h"

#include <cstring>

namespace irouter {
namespace {

// Bytes from the start of a slot buffer to (slot, head, position); of a pool buffer to
// (block, head).
inline int64_t slot_offset(const KVBlockShape& s, int64_t slot, int64_t head, int64_t pos) {
  return ((slot * s.heads + head) * s.context + pos) * s.head_dim * s.item_bytes;
}
inline int64_t block_offset(const KVBlockShape& s, int64_t block, int64_t head) {
  return (block * s.heads + head) * s.block_size * s.head_dim * s.item_bytes;
}

}  // namespace

void kv_load_blocks(const std::vector<void*>& slot_buffers,
                    const std::vector<const void*>& pool_buffers, const KVBlockShape& shape,
                    int64_t slot, const int64_t* blocks, int64_t n) {
  const size_t run = static_cast<size_t>(shape.block_size * shape.head_dim * shape.item_bytes);
  for (size_t i = 0; i < slot_buffers.size(); ++i) {
    char* dst = static_cast<char*>(slot_buffers[i]);
    const char* src = static_cast<const char*>(pool_buffers[i]);
    for (int64_t h = 0; h < shape.heads; ++h) {
      char* to = dst + slot_offset(shape, slot, h, 0);
      for (int64_t j = 0; j < n; ++j, to += run)
        std::memcpy(to, src + block_offset(shape, blocks[j], h), run);
    }
  }
}

void kv_save_blocks(const std::vector<const void*>& slot_buffers,
                    const std::vector<void*>& pool_buffers, const KVBlockShape& shape,
                    int64_t slot, int64_t start, const int64_t* blocks, int64_t n) {
  const size_t run = static_cast<size_t>(shape.block_size * shape.head_dim * shape.item_bytes);
  for (size_t i = 0; i < slot_buffers.size(); ++i) {
    const char* src = static_cast<const char*>(slot_buffers[i]);
    char* dst = static_cast<char*>(pool_buffers[i]);
    for (int64_t h = 0; h < shape.heads; ++h) {
      const char* from = src + slot_offset(shape, slot, h, start);
      for (int64_t j = 0; j < n; ++j, from += run)
        std::memcpy(dst + block_offset(shape, blocks[j], h), from, run);
    }
  }
}

}  // namespace irouter
