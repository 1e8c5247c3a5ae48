#include "irouter/matcher.h"

#include <algorithm>
#include <array>
#include <limits>
#include <stdexcept>
#include <utility>

namespace irouter {

// The automaton is a DFA: delta already contains the failure transitions, so
// the scan is one table load per byte. Rows are premultiplied (a state is its
// row offset state * stride) and states that end at least one pattern are
// numbered last, so "is there a match here" is a single comparison,
// row >= first_output_row. The patterns ending at a state are its own
// terminal ids followed by those of the dict_link chain (nearest proper
// suffixes that end a pattern).
struct Automaton {
  std::array<uint8_t, 256> byte_class{};  // raw text byte -> class (ASCII-folded if asked)
  uint32_t stride = 1;                    // number of classes
  std::vector<uint32_t> delta;            // [state * stride + class] -> next row
  uint32_t first_output_row = 0;

  // Per state (index row / stride):
  std::vector<uint32_t> terminal_begin;  // ids ending here: terminal_ids[begin[s] .. begin[s+1])
  std::vector<int32_t> terminal_ids;
  std::vector<uint32_t> dict_link;   // state, or kNone
  std::vector<int32_t> depth_bytes;  // length of the state's string
  std::vector<int32_t> hold_chars;   // chars of its longest suffix that is a proper prefix

  std::vector<int32_t> pattern_bytes;
  std::vector<int32_t> pattern_chars;
  bool case_insensitive = false;
  bool whole_words = false;

  static constexpr uint32_t kNone = std::numeric_limits<uint32_t>::max();
};

namespace {

inline uint8_t fold(uint8_t b, bool ci) { return ci && b >= 'A' && b <= 'Z' ? b + 32 : b; }

inline bool is_word(uint8_t b) {
  return (b >= 'a' && b <= 'z') || (b >= 'A' && b <= 'Z') || (b >= '0' && b <= '9') || b == '_';
}

inline bool is_lead(uint8_t b) { return (b & 0xC0) != 0x80; }

int32_t count_chars(std::string_view s) {
  int32_t n = 0;
  for (char c : s) n += is_lead(static_cast<uint8_t>(c));
  return n;
}

// Byte offsets of increasing match ends -> character offsets, counting lead
// bytes only over the stretch since the previous end.
class CharCounter {
 public:
  explicit CharCounter(const uint8_t* p) : p_(p) {}
  int64_t at(size_t end) {
    int64_t n = 0;
    for (size_t i = byte_; i < end; ++i) n += is_lead(p_[i]);
    byte_ = end;
    return chars_ += n;
  }

 private:
  const uint8_t* p_;
  size_t byte_ = 0;
  int64_t chars_ = 0;
};

// The hot loop: from p[i], follows transitions until a state that ends some
// pattern or the end of the text; returns the index after the last byte read.
// Kept out of line so that the match handling inlined into scan() cannot push
// `row` out of a register (a stack round trip per byte costs ~2x).
__attribute__((noinline)) size_t advance(const uint32_t* delta, const uint8_t* cls,
                                         uint32_t first_output, const uint8_t* p, size_t i,
                                         size_t n, uint32_t& row) {
  uint32_t r = row;
  while (i < n) {
    r = delta[r + cls[p[i++]]];
    if (r >= first_output) break;
  }
  row = r;
  return i;
}

// Calls on_end(end, row) after every byte that leaves the automaton in a
// state ending some pattern, end being the byte offset just past it; stops
// when it returns true. Returns the final row.
template <class OnEnd>
uint32_t scan(const Automaton& a, const uint8_t* p, size_t n, uint32_t row, OnEnd&& on_end) {
  size_t i = 0;
  while (i < n) {
    i = advance(a.delta.data(), a.byte_class.data(), a.first_output_row, p, i, n, row);
    if (row >= a.first_output_row && on_end(i, row)) break;
  }
  return row;
}

// Appends to ids every pattern ending at this state, in ascending id order.
void patterns_at(const Automaton& a, uint32_t state, std::vector<int32_t>& ids) {
  ids.clear();
  int groups = 0;
  for (uint32_t s = state; s != Automaton::kNone; s = a.dict_link[s]) {
    const auto b = a.terminal_ids.begin();
    if (a.terminal_begin[s] == a.terminal_begin[s + 1]) continue;
    ids.insert(ids.end(), b + a.terminal_begin[s], b + a.terminal_begin[s + 1]);
    ++groups;
  }
  if (groups > 1) std::sort(ids.begin(), ids.end());
}

std::shared_ptr<const Automaton> build(const std::vector<std::string>& patterns, bool ci,
                                       bool whole_words) {
  auto a = std::make_shared<Automaton>();
  a->case_insensitive = ci;
  a->whole_words = whole_words;
  if (patterns.size() > static_cast<size_t>(std::numeric_limits<int32_t>::max()))
    throw std::length_error("too many patterns: " + std::to_string(patterns.size()));

  // Byte classes: one per byte value used by a (folded) pattern, class 0 for the rest.
  std::array<bool, 256> used{};
  for (size_t i = 0; i < patterns.size(); ++i) {
    if (patterns[i].empty())
      throw std::invalid_argument("patterns[" + std::to_string(i) +
                                  "] is empty; every pattern needs at least one character");
    for (char c : patterns[i]) used[fold(static_cast<uint8_t>(c), ci)] = true;
    a->pattern_bytes.push_back(static_cast<int32_t>(patterns[i].size()));
    a->pattern_chars.push_back(count_chars(patterns[i]));
  }
  std::array<uint8_t, 256> folded_class{};
  uint32_t stride = 1;
  for (int b = 0; b < 256; ++b)
    if (used[b]) folded_class[b] = static_cast<uint8_t>(stride++);
  for (int b = 0; b < 256; ++b) a->byte_class[b] = folded_class[fold(static_cast<uint8_t>(b), ci)];
  a->stride = stride;

  // Trie, in a dense table over classes (0 = no child yet: the root is never a child).
  std::vector<uint32_t> next(stride, 0);
  std::vector<std::vector<int32_t>> ends(1);
  std::vector<int32_t> depth(1, 0), depth_chars(1, 0);
  std::vector<bool> has_child(1, false);
  for (size_t i = 0; i < patterns.size(); ++i) {
    uint32_t s = 0;
    for (char c : patterns[i]) {
      const uint8_t b = static_cast<uint8_t>(c);
      const uint32_t k = folded_class[fold(b, ci)];
      if (next[size_t{s} * stride + k] == 0) {
        const size_t n = ends.size();
        if ((n + 1) * stride >= Automaton::kNone)
          throw std::length_error("patterns too large for the automaton (" +
                                  std::to_string(n) + " states x " + std::to_string(stride) +
                                  " byte classes)");
        next.resize((n + 1) * stride, 0);
        ends.emplace_back();
        depth.push_back(depth[s] + 1);
        depth_chars.push_back(depth_chars[s] + is_lead(b));
        has_child.push_back(false);
        has_child[s] = true;
        next[size_t{s} * stride + k] = static_cast<uint32_t>(n);
      }
      s = next[size_t{s} * stride + k];
    }
    ends[s].push_back(static_cast<int32_t>(i));
  }
  const size_t num_states = ends.size();

  // Breadth-first: failure links, DFA transitions, dict links and hold depths.
  // A state's failure is shallower, so it is complete before the state itself.
  std::vector<uint32_t> fail(num_states, 0), dict(num_states, Automaton::kNone);
  std::vector<int32_t> hold(num_states, 0);
  std::vector<uint32_t> order;
  order.reserve(num_states);
  order.push_back(0);
  for (size_t head = 0; head < order.size(); ++head) {
    const uint32_t u = order[head];
    for (uint32_t k = 0; k < stride; ++k) {
      uint32_t& t = next[size_t{u} * stride + k];
      const uint32_t via_fail = u == 0 ? 0 : next[size_t{fail[u]} * stride + k];
      if (t == 0) {
        t = via_fail;
        continue;
      }
      const uint32_t v = t;
      fail[v] = via_fail;
      dict[v] = !ends[via_fail].empty() ? via_fail : dict[via_fail];
      hold[v] = has_child[v] ? depth_chars[v] : hold[via_fail];
      order.push_back(v);
    }
  }

  // Renumber: states without output first (root stays 0), then the rest.
  std::vector<uint32_t> new_id(num_states);
  uint32_t count = 0;
  for (bool output : {false, true})
    for (uint32_t s = 0; s < num_states; ++s)
      if ((!ends[s].empty() || dict[s] != Automaton::kNone) == output) new_id[s] = count++;
  uint32_t num_plain = 0;
  for (uint32_t s = 0; s < num_states; ++s)
    num_plain += ends[s].empty() && dict[s] == Automaton::kNone;
  a->first_output_row = num_plain * stride;

  a->delta.resize(num_states * stride);
  a->terminal_begin.assign(num_states + 1, 0);
  a->dict_link.resize(num_states);
  a->depth_bytes.resize(num_states);
  a->hold_chars.resize(num_states);
  std::vector<uint32_t> old_of(num_states);
  for (uint32_t s = 0; s < num_states; ++s) old_of[new_id[s]] = s;
  for (uint32_t ns = 0; ns < num_states; ++ns) {
    const uint32_t s = old_of[ns];
    for (uint32_t k = 0; k < stride; ++k)
      a->delta[size_t{ns} * stride + k] = new_id[next[size_t{s} * stride + k]] * stride;
    a->terminal_ids.insert(a->terminal_ids.end(), ends[s].begin(), ends[s].end());
    a->terminal_begin[ns + 1] = static_cast<uint32_t>(a->terminal_ids.size());
    a->dict_link[ns] = dict[s] == Automaton::kNone ? Automaton::kNone : new_id[dict[s]];
    a->depth_bytes[ns] = depth[s];
    a->hold_chars[ns] = hold[s];
  }
  return a;
}

}  // namespace

Matcher::Matcher(const std::vector<std::string>& patterns, bool case_insensitive,
                 bool whole_words)
    : automaton_(build(patterns, case_insensitive, whole_words)) {}

int64_t Matcher::num_patterns() const {
  return static_cast<int64_t>(automaton_->pattern_bytes.size());
}
bool Matcher::case_insensitive() const { return automaton_->case_insensitive; }
bool Matcher::whole_words() const { return automaton_->whole_words; }

std::vector<Match> Matcher::find_all(std::string_view text) const {
  const Automaton& a = *automaton_;
  const auto* p = reinterpret_cast<const uint8_t*>(text.data());
  const size_t n = text.size();
  std::vector<Match> out;
  std::vector<int32_t> ids;
  CharCounter chars(p);
  scan(a, p, n, 0, [&](size_t end, uint32_t row) {
    if (a.whole_words && end < n && is_word(p[end])) return false;
    patterns_at(a, row / a.stride, ids);
    const int64_t end_char = chars.at(end);
    for (int32_t id : ids) {
      const size_t start = end - static_cast<size_t>(a.pattern_bytes[id]);
      if (a.whole_words && start > 0 && is_word(p[start - 1])) continue;
      out.push_back({end_char - a.pattern_chars[id], end_char, id});
    }
    return false;
  });
  return out;
}

bool Matcher::contains(std::string_view text) const {
  const Automaton& a = *automaton_;
  const auto* p = reinterpret_cast<const uint8_t*>(text.data());
  const size_t n = text.size();
  bool found = false;
  std::vector<int32_t> ids;
  scan(a, p, n, 0, [&](size_t end, uint32_t row) {
    if (!a.whole_words) return found = true;
    if (end < n && is_word(p[end])) return false;
    patterns_at(a, row / a.stride, ids);
    for (int32_t id : ids) {
      const size_t start = end - static_cast<size_t>(a.pattern_bytes[id]);
      if (start == 0 || !is_word(p[start - 1])) return found = true;
    }
    return false;
  });
  return found;
}

MatcherStream Matcher::stream() const { return MatcherStream(automaton_); }

MatcherStream::MatcherStream(std::shared_ptr<const Automaton> automaton)
    : automaton_(std::move(automaton)) {}

std::vector<Match> MatcherStream::feed(std::string_view chunk) {
  if (finished_) throw std::logic_error("MatcherStream.feed() after finish()");
  const Automaton& a = *automaton_;
  const auto* p = reinterpret_cast<const uint8_t*>(chunk.data());
  const size_t n = chunk.size();
  std::vector<Match> out;
  if (n == 0) return out;

  // Held matches end where this chunk starts: its first byte decides them.
  if (!held_.empty() && !is_word(p[0])) out = std::move(held_);
  held_.clear();

  std::vector<int32_t> ids;
  CharCounter chars(p);
  const int64_t base = position_;
  row_ = scan(a, p, n, row_, [&](size_t end, uint32_t row) {
    if (a.whole_words && end < n && is_word(p[end])) return false;
    patterns_at(a, row / a.stride, ids);
    const int64_t end_char = base + chars.at(end);
    for (int32_t id : ids) {
      const Match m{end_char - a.pattern_chars[id], end_char, id};
      if (!a.whole_words) {
        out.push_back(m);
        continue;
      }
      // Byte before the match, relative to this chunk; negative: in tail_.
      const int64_t before = static_cast<int64_t>(end) - a.pattern_bytes[id] - 1;
      if (bytes_ + before >= 0) {
        const uint8_t b = before >= 0 ? p[before] : static_cast<uint8_t>(tail_[tail_.size() + before]);
        if (is_word(b)) continue;
      }
      (end < n ? out : held_).push_back(m);
    }
    return false;
  });
  position_ = base + chars.at(n);
  bytes_ += static_cast<int64_t>(n);

  // Any later match that starts before the end of this chunk starts within
  // the current state's string, so its byte and the one before suffice.
  if (a.whole_words) {
    const size_t keep = std::min<size_t>(a.depth_bytes[row_ / a.stride] + 1, bytes_);
    if (keep <= n) {
      tail_.assign(chunk.substr(n - keep));
    } else {
      tail_ = tail_.substr(tail_.size() - (keep - n));
      tail_.append(chunk);
    }
  }
  return out;
}

std::vector<Match> MatcherStream::finish() {
  finished_ = true;
  return std::exchange(held_, {});
}

int64_t MatcherStream::holdback() const {
  if (finished_) return 0;
  int64_t hold = automaton_->hold_chars[row_ / automaton_->stride];
  for (const Match& m : held_) hold = std::max(hold, position_ - m.start);
  return hold;
}

}  // namespace irouter
