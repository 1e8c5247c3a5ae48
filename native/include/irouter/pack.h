// Right-padded batch packing of ragged token rows (encoder inputs).
#pragma once

#include <cstdint>
#include <vector>

namespace irouter {

struct PackedBatch {
  int64_t batch = 0;
  int64_t length = 0;
  std::vector<int64_t> input_ids;       // [batch, length], row-major
  std::vector<int64_t> attention_mask;  // [batch, length], 1 = real token
};

// Row b is tokens[offsets[b] : offsets[b+1]]; num_offsets = batch + 1.
// length = max(longest row, pad_to). Throws std::invalid_argument when
// offsets are not non-decreasing within [0, num_tokens], when a row is empty
// (an empty encoder input is a caller bug, not something to pad), or when
// pad_to < 0.
PackedBatch pack(const int64_t* tokens, int64_t num_tokens, const int64_t* offsets,
                 int64_t num_offsets, int64_t pad_id, int64_t pad_to);

}  // namespace irouter
