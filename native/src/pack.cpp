#include "irouter/pack.h"

#include <algorithm>
#include <stdexcept>
#include <string>

namespace irouter {

PackedBatch pack(const int64_t* tokens, int64_t num_tokens, const int64_t* offsets,
                 int64_t num_offsets, int64_t pad_id, int64_t pad_to) {
  if (num_offsets < 1)
    throw std::invalid_argument("offsets must hold batch + 1 >= 1 entries, got shape (0,)");
  if (pad_to < 0)
    throw std::invalid_argument("pad_to=" + std::to_string(pad_to) + " must be >= 0");
  if (offsets[0] < 0 || offsets[num_offsets - 1] > num_tokens)
    throw std::invalid_argument(
        "offsets must lie within [0, len(tokens)=" + std::to_string(num_tokens) +
        "], got offsets[0]=" + std::to_string(offsets[0]) +
        " and offsets[-1]=" + std::to_string(offsets[num_offsets - 1]));

  PackedBatch out;
  out.batch = num_offsets - 1;
  int64_t longest = 0;
  for (int64_t b = 0; b < out.batch; ++b) {
    const int64_t len = offsets[b + 1] - offsets[b];
    if (len < 0)
      throw std::invalid_argument("offsets must be non-decreasing, but offsets[" +
                                  std::to_string(b + 1) + "] < offsets[" +
                                  std::to_string(b) + "]");
    if (len == 0)
      throw std::invalid_argument("row " + std::to_string(b) +
                                  " is empty (offsets[" + std::to_string(b) + "] == offsets[" +
                                  std::to_string(b + 1) + "]); every row needs a token");
    longest = std::max(longest, len);
  }
  out.length = std::max(longest, pad_to);

  const size_t total = static_cast<size_t>(out.batch * out.length);
  out.input_ids.resize(total);
  out.attention_mask.resize(total);
  for (int64_t b = 0; b < out.batch; ++b) {
    const int64_t len = offsets[b + 1] - offsets[b];
    int64_t* ids = out.input_ids.data() + b * out.length;
    int64_t* mask = out.attention_mask.data() + b * out.length;
    std::copy(tokens + offsets[b], tokens + offsets[b + 1], ids);
    std::fill(ids + len, ids + out.length, pad_id);
    std::fill(mask, mask + len, int64_t{1});
    std::fill(mask + len, mask + out.length, int64_t{0});
  }
  return out;
}

}  // namespace irouter
