// See kv_blocks.h.
#include "irouter/kv_blocks.h"

#include <cstring>
#include <exception>
#include <thread>

namespace irouter {
namespace {

// A load of at least this many bytes (a 300-token prefix of SmolLM2-135M: ~7 MB) is copied by
// two threads, half the buffers each: one thread's block-sized copies ran at ~7 GB/s where two memcpy threads
// reach ~18 (Intel Xeon, 2 cores); a thread costs ~50 us to start.
constexpr size_t kTwoThreadBytes = 1 << 20;

// Bytes from the start of a slot buffer to (slot, head, position); of a pool buffer to
// (block, head).
inline int64_t slot_offset(const KVBlockShape& s, int64_t slot, int64_t head, int64_t pos) {
  return ((slot * s.heads + head) * s.context + pos) * s.head_dim * s.item_bytes;
}
inline int64_t block_offset(const KVBlockShape& s, int64_t block, int64_t head) {
  return (block * s.heads + head) * s.block_size * s.head_dim * s.item_bytes;
}

// copy(first, last) over buffers [first, last): by two threads, half the buffers each, from
// kTwoThreadBytes on (and where a thread can be had), else by this one.
template <class Copy>
void split_buffers(const Copy& copy, size_t buffers, size_t bytes) {
  if (bytes < kTwoThreadBytes || buffers < 2) return copy(0, buffers);
  std::thread helper;
  try {
    helper = std::thread(copy, buffers / 2, buffers);
  } catch (const std::exception&) {  // no thread to be had (or its state): copy it all here
    return copy(0, buffers);
  }
  copy(0, buffers / 2);
  helper.join();
}

}  // namespace

void kv_load_blocks(const std::vector<void*>& slot_buffers,
                    const std::vector<const void*>& pool_buffers, const KVBlockShape& shape,
                    int64_t slot, const int64_t* blocks, int64_t n) {
  const size_t run = static_cast<size_t>(shape.block_size * shape.head_dim * shape.item_bytes);
  const auto copy = [&](size_t first, size_t last) {
    for (size_t i = first; i < last; ++i) {
      char* dst = static_cast<char*>(slot_buffers[i]);
      const char* src = static_cast<const char*>(pool_buffers[i]);
      for (int64_t h = 0; h < shape.heads; ++h) {
        char* to = dst + slot_offset(shape, slot, h, 0);
        for (int64_t j = 0; j < n; ++j, to += run)
          std::memcpy(to, src + block_offset(shape, blocks[j], h), run);
      }
    }
  };
  const size_t buffers = slot_buffers.size();
  split_buffers(copy, buffers, run * static_cast<size_t>(n * shape.heads) * buffers);
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

void kv_copy_prefix(const std::vector<void*>& buffers, const KVBlockShape& shape, int64_t from,
                    const int64_t* to, int64_t k, int64_t n) {
  const size_t run = static_cast<size_t>(n * shape.head_dim * shape.item_bytes);
  const auto copy = [&](size_t first, size_t last) {
    for (size_t i = first; i < last; ++i) {
      char* buffer = static_cast<char*>(buffers[i]);
      for (int64_t h = 0; h < shape.heads; ++h) {
        const char* src = buffer + slot_offset(shape, from, h, 0);
        for (int64_t j = 0; j < k; ++j)
          std::memcpy(buffer + slot_offset(shape, to[j], h, 0), src, run);
      }
    }
  };
  split_buffers(copy, buffers.size(), run * static_cast<size_t>(shape.heads * k) * buffers.size());
}

}  // namespace irouter
