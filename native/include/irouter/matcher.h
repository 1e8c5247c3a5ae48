// Multi-pattern matcher for guardrail blocklists: an Aho-Corasick automaton
// over UTF-8 bytes, for whole texts and for streams fed chunk by chunk.
//
// Semantics (the Python reference in loadtest/benchmarks/native_reference.py
// follows them literally):
//  - Every occurrence of every pattern is a match, overlapping ones included;
//    duplicate patterns each report their own id. Offsets are CHARACTER (code
//    point) offsets, start inclusive, end exclusive. Results are ordered by end,
//    then pattern id.
//  - case_insensitive folds ASCII A-Z only, in patterns and text alike. No
//    Unicode case folding: "É" does not match "é".
//  - whole_words: a match counts only if the character before it and the one
//    after it are not ASCII word characters [A-Za-z0-9_], or are the start/end
//    of the text. Every non-ASCII character counts as a non-word character, so
//    "caf" matches whole in "café". Only the neighbours are checked, not the
//    pattern's own characters.
//
// Streams: a pattern split across chunks is found when its last byte arrives,
// with offsets counted from the start of the stream. With whole_words a match
// that ends exactly at the end of what has been fed cannot be decided yet; it
// is held and reported by the next non-empty feed() (when that chunk starts
// with a non-word character) or by finish(), never provisionally.
//
// Texts must be valid UTF-8 (Python str always is). Matching on bytes is then
// the same as matching on code points: a pattern starts with a lead byte and
// ends with a complete character, so a byte match never cuts a character.
//
// Memory: the transition table is dense over byte classes (the bytes that
// occur in some pattern, plus one class for all others), 4 bytes per state and
// class; 1,000 English terms take about 6,000 states x 40 classes = 1 MB.
#pragma once

#include <cstdint>
#include <memory>
#include <string>
#include <string_view>
#include <vector>

namespace irouter {

struct Match {
  int64_t start;  // character offsets
  int64_t end;
  int32_t pattern_id;
};

struct Automaton;  // defined in matcher.cpp; immutable once built
class MatcherStream;

// Immutable after construction, so one Matcher may be used from many threads.
class Matcher {
 public:
  // Patterns are UTF-8. Throws std::invalid_argument naming the index of an
  // empty pattern, std::length_error when the automaton would not fit 32-bit
  // transition offsets (hundreds of MB of patterns).
  Matcher(const std::vector<std::string>& patterns, bool case_insensitive, bool whole_words);

  int64_t num_patterns() const;
  bool case_insensitive() const;
  bool whole_words() const;

  std::vector<Match> find_all(std::string_view text) const;
  // Stops at the first match; the same answer as !find_all(text).empty().
  bool contains(std::string_view text) const;
  MatcherStream stream() const;

 private:
  std::shared_ptr<const Automaton> automaton_;
};

// One stream of chunks (e.g. a model's output tokens). It shares the
// automaton with its Matcher and outlives it if need be. Not thread-safe:
// feed a stream from one thread at a time.
class MatcherStream {
 public:
  explicit MatcherStream(std::shared_ptr<const Automaton> automaton);

  // Matches completed (and, with whole_words, decided) by this chunk.
  // Throws std::logic_error after finish().
  std::vector<Match> feed(std::string_view chunk);
  // End of stream: the matches held for whole_words; idempotent.
  std::vector<Match> finish();

  // Characters at the end of the stream so far that may still belong to a
  // match not reported yet: the longest suffix that is a proper prefix of a
  // pattern, extended (whole_words) to cover a held match. An output filter
  // withholds them so a redaction never leaks half a term. 0 after finish().
  int64_t holdback() const;
  int64_t position() const { return position_; }  // characters fed so far
  bool finished() const { return finished_; }

 private:
  std::shared_ptr<const Automaton> automaton_;
  uint32_t row_ = 0;         // automaton state, as its row offset in the table
  int64_t position_ = 0;     // characters fed so far
  int64_t bytes_ = 0;        // bytes fed so far
  std::string tail_;         // whole_words: the last bytes fed, enough to see the
                             // byte before any match that starts in the past
  std::vector<Match> held_;  // whole_words: matches ending at position_
  bool finished_ = false;
};

}  // namespace irouter
