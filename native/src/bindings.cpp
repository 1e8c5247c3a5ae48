// Python glue for the C++ core: argument checking that needs array shapes,
// GIL release around work long enough to be worth it (not the scheduler's
// microseconds), and zero-copy NumPy results. No logic here.
#include <nanobind/nanobind.h>
#include <nanobind/ndarray.h>
#include <nanobind/stl/optional.h>
#include <nanobind/stl/pair.h>
#include <nanobind/stl/vector.h>

#include <optional>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

#include "binding_util.h"
#include "irouter/matcher.h"
#include "irouter/pack.h"
#include "irouter/sampler.h"
#include "irouter/scheduler.h"

namespace nb = nanobind;
using namespace nb::literals;
using irouter_bindings::expect_shape;
using irouter_bindings::In;
using irouter_bindings::Out;

namespace {

// Hands a vector's heap buffer to NumPy without copying; the capsule frees it.
template <class T, class Elem = T>
Out<Elem> to_numpy(std::vector<T>&& v, std::initializer_list<size_t> shape) {
  if (v.empty()) v.reserve(1);  // a non-null data pointer even for size 0
  auto* heap = new std::vector<T>(std::move(v));
  nb::capsule owner(heap, [](void* p) noexcept { delete static_cast<std::vector<T>*>(p); });
  return Out<Elem>(reinterpret_cast<Elem*>(heap->data()), shape.size(), shape.begin(), owner);
}

struct PySchedulerOutput {
  Out<int64_t> request_ids;
  Out<int32_t> slots;
  Out<int32_t> starts;
  Out<int32_t> counts;
  Out<bool> sample;
  Out<int64_t> preempted;
};

PySchedulerOutput wrap(irouter::SchedulerOutput&& o) {
  const size_t n = o.request_ids.size();
  const size_t np = o.preempted.size();
  static_assert(sizeof(bool) == sizeof(uint8_t));
  return PySchedulerOutput{
      to_numpy(std::move(o.request_ids), {n}), to_numpy(std::move(o.slots), {n}),
      to_numpy(std::move(o.starts), {n}),      to_numpy(std::move(o.counts), {n}),
      to_numpy<uint8_t, bool>(std::move(o.sample), {n}),
      to_numpy(std::move(o.preempted), {np})};
}

std::pair<Out<int64_t>, Out<int64_t>> py_pack(In<int64_t> tokens, In<int64_t> offsets,
                                              int64_t pad_id, int64_t pad_to) {
  expect_shape(tokens, "tokens", {-1}, "(N,)");
  expect_shape(offsets, "offsets", {-1}, "(B + 1,)");
  irouter::PackedBatch packed;
  {
    nb::gil_scoped_release release;
    packed = irouter::pack(tokens.data(), static_cast<int64_t>(tokens.shape(0)), offsets.data(),
                           static_cast<int64_t>(offsets.shape(0)), pad_id, pad_to);
  }
  const size_t b = static_cast<size_t>(packed.batch), l = static_cast<size_t>(packed.length);
  return {to_numpy(std::move(packed.input_ids), {b, l}),
          to_numpy(std::move(packed.attention_mask), {b, l})};
}

// Element passes over the logits (a greedy row: 1 a token, a stochastic row ~16) below which
// sampling keeps the GIL: ~0.5 ms of work.
constexpr int64_t kReleaseGilPasses = int64_t{1} << 21;

Out<int64_t> py_sample(In<float> logits, In<float> temperature, In<int32_t> top_k,
                       In<float> top_p, In<float> min_p, In<float> repetition_penalty,
                       In<float> presence_penalty, In<float> frequency_penalty,
                       In<uint64_t> seeds, In<int64_t> tokens, In<int64_t> offsets,
                       In<int64_t> prompt_lens, std::optional<In<uint32_t>> masks,
                       std::optional<In<int32_t>> mask_rows) {
  expect_shape(logits, "logits", {-1, -1}, "(B, V)");
  const int64_t B = static_cast<int64_t>(logits.shape(0));
  expect_shape(temperature, "temperature", {B}, "(B,) with B = logits.shape[0]");
  expect_shape(top_k, "top_k", {B}, "(B,) with B = logits.shape[0]");
  expect_shape(top_p, "top_p", {B}, "(B,) with B = logits.shape[0]");
  expect_shape(min_p, "min_p", {B}, "(B,) with B = logits.shape[0]");
  expect_shape(repetition_penalty, "repetition_penalty", {B}, "(B,) with B = logits.shape[0]");
  expect_shape(presence_penalty, "presence_penalty", {B}, "(B,) with B = logits.shape[0]");
  expect_shape(frequency_penalty, "frequency_penalty", {B}, "(B,) with B = logits.shape[0]");
  expect_shape(seeds, "seeds", {B}, "(B,) with B = logits.shape[0]");
  expect_shape(tokens, "tokens", {-1}, "(N,)");
  expect_shape(offsets, "offsets", {B + 1}, "(B + 1,) with B = logits.shape[0]");
  expect_shape(prompt_lens, "prompt_lens", {B}, "(B,) with B = logits.shape[0]");

  irouter::SamplingBatch in;
  in.logits = logits.data();
  in.batch = B;
  in.vocab = static_cast<int64_t>(logits.shape(1));
  in.temperature = temperature.data();
  in.top_k = top_k.data();
  in.top_p = top_p.data();
  in.min_p = min_p.data();
  in.repetition_penalty = repetition_penalty.data();
  in.presence_penalty = presence_penalty.data();
  in.frequency_penalty = frequency_penalty.data();
  in.seeds = seeds.data();
  in.tokens = tokens.data();
  in.num_tokens = static_cast<int64_t>(tokens.shape(0));
  in.offsets = offsets.data();
  in.prompt_lens = prompt_lens.data();
  if (masks.has_value() != mask_rows.has_value())
    throw nb::value_error("masks and mask_rows go together: pass both or neither");
  if (masks) {
    expect_shape(*masks, "masks", {-1, -1}, "(M, W)");
    expect_shape(*mask_rows, "mask_rows", {B}, "(B,) with B = logits.shape[0]");
    in.masks = masks->data();
    in.num_masks = static_cast<int64_t>(masks->shape(0));
    in.mask_words = static_cast<int64_t>(masks->shape(1));
    in.mask_rows = mask_rows->data();
  }

  std::vector<int64_t> out(static_cast<size_t>(B));
  // The GIL is kept for a small batch (a greedy row is ~13 us; 16 of them ~0.2 ms): released,
  // the engine thread got it back only once the event loop's Python in between was done, and
  // at one stream its sampling took ~110 us a step instead of ~30 (Intel Xeon).
  int64_t passes = 0;
  for (int64_t b = 0; b < B; ++b) passes += (in.temperature[b] != 0.0f ? 16 : 1) * in.vocab;
  if (passes < kReleaseGilPasses) {
    irouter::sample(in, out.data());
  } else {
    nb::gil_scoped_release release;
    irouter::sample(in, out.data());
  }
  return to_numpy(std::move(out), {static_cast<size_t>(B)});
}

// ----------------------------------------------------------------- matcher

// Below this many UTF-8 bytes (tens of microseconds of scanning) the GIL is
// kept: releasing it costs a copy of the text and, when other threads are
// busy, a wait of up to the switch interval to get it back.
constexpr size_t kReleaseGilBytes = 32 * 1024;

// The str's own UTF-8 buffer (cached on the str by CPython); valid while the
// str lives, to be read only with the GIL held. Lone surrogates raise
// UnicodeEncodeError (a ValueError).
std::string_view utf8(const nb::str& s) {
  Py_ssize_t size = 0;
  const char* data = PyUnicode_AsUTF8AndSize(s.ptr(), &size);
  if (!data) throw nb::python_error();
  return {data, static_cast<size_t>(size)};
}

// Runs work(utf8 bytes of text), without the GIL on a private copy when the
// text is large enough to be worth it.
template <class Work>
auto on_text(const nb::str& text, Work&& work) {
  const std::string_view view = utf8(text);
  if (view.size() < kReleaseGilBytes) return work(view);
  const std::string copy(view);
  nb::gil_scoped_release release;
  return work(std::string_view(copy));
}

using MatchList = nb::typed<nb::list, nb::typed<nb::tuple, int, int, int>>;

MatchList to_python(const std::vector<irouter::Match>& matches) {
  nb::list out = nb::steal<nb::list>(PyList_New(static_cast<Py_ssize_t>(matches.size())));
  if (!out.is_valid()) throw nb::python_error();
  for (size_t i = 0; i < matches.size(); ++i) {
    const irouter::Match& m = matches[i];
    nb::tuple t = nb::make_tuple(m.start, m.end, m.pattern_id);
    PyList_SET_ITEM(out.ptr(), static_cast<Py_ssize_t>(i), t.release().ptr());
  }
  return out;
}

// A stream's methods release the GIL for large chunks, so a second thread
// could otherwise enter the same (single-threaded) stream meanwhile. `busy`
// is only read and written with the GIL held.
struct PyMatcherStream {
  irouter::MatcherStream stream;
  bool busy = false;
};

class Exclusive {
 public:
  explicit Exclusive(PyMatcherStream& s) : s_(s) {
    if (s_.busy)
      throw std::runtime_error(
          "MatcherStream used from two threads at once; feed each stream from one thread");
    s_.busy = true;
  }
  ~Exclusive() { s_.busy = false; }
  Exclusive(const Exclusive&) = delete;
  Exclusive& operator=(const Exclusive&) = delete;

 private:
  PyMatcherStream& s_;
};


}  // namespace

NB_MODULE(_native, m) {
  m.doc() =
      "irouter's C++ core: KV-slot scheduler, batch packing, token sampler and "
      "multi-pattern matcher.";

  nb::class_<PySchedulerOutput>(m, "SchedulerOutput",
                                "One step's plan; row i computes counts[i] tokens of "
                                "request_ids[i] from position starts[i] in KV slot slots[i].")
      // The arrays own their buffers (capsules), so they are handed out as
      // further views of the same memory rather than tied to this object.
      .def_ro("request_ids", &PySchedulerOutput::request_ids, nb::rv_policy::reference,
              "int64[n]")
      .def_ro("slots", &PySchedulerOutput::slots, nb::rv_policy::reference,
              "int32[n] KV slot of each row")
      .def_ro("starts", &PySchedulerOutput::starts, nb::rv_policy::reference,
              "int32[n] num_computed before this step")
      .def_ro("counts", &PySchedulerOutput::counts, nb::rv_policy::reference,
              "int32[n] tokens to compute this step")
      .def_ro("sample", &PySchedulerOutput::sample, nb::rv_policy::reference,
              "bool[n] True when this row's logits give the next token")
      .def_ro("preempted", &PySchedulerOutput::preempted, nb::rv_policy::reference,
              "int64[k] requests that lost their slot this step (recompute later)")
      .def("__len__", [](const PySchedulerOutput& o) { return o.request_ids.shape(0); });

  // The scheduler's calls keep the GIL: each takes microseconds, and a thread that releases the
  // GIL gets it back only once any other thread's Python in between is done (the event loop's
  // delivering tokens, ~100 us): the engine thread waited there every step.
  using irouter::Scheduler;
  nb::class_<Scheduler>(m, "Scheduler",
                        "Continuous batching over fixed KV slots; decides, never runs a model.")
      .def(nb::init<int32_t, int32_t, int32_t, int32_t>(), "max_slots"_a, "token_budget"_a,
           "max_waiting"_a, "max_context"_a)
      .def("add_request", &Scheduler::add_request, "request_id"_a, "num_prompt_tokens"_a,
           "max_new_tokens"_a, "priority"_a = 0, "num_cached"_a = 0,
           "Queue a request; False when the waiting queue is full (shed load). "
           "num_cached prompt tokens come from a prefix cache: its first row starts there. "
           "Raises ValueError on a duplicate id or a request that cannot fit.")
      .def(
          "schedule",
          [](Scheduler& s, int32_t budget) {
            return wrap(s.schedule(budget));
          },
          "budget"_a = 0,
          "Plan the next step and advance num_computed by it; budget (tokens this step, at "
          "most token_budget; 0: token_budget) keeps a step short while sequences decode.")
      .def(
          "append_tokens",
          [](Scheduler& s, In<int64_t> request_ids) {
            expect_shape(request_ids, "request_ids", {-1}, "(n,)");
            s.append_tokens(request_ids.data(), request_ids.shape(0));
          },
          "request_ids"_a, "Each listed request received one sampled token.")
      .def(
          "append_tokens",
          [](Scheduler& s, const std::vector<int64_t>& request_ids) {
            s.append_tokens(request_ids.data(), request_ids.size());
          },
          "request_ids"_a)
      .def(
          "finish_requests",
          [](Scheduler& s, In<int64_t> request_ids) {
            expect_shape(request_ids, "request_ids", {-1}, "(n,)");
            s.finish_requests(request_ids.data(), request_ids.shape(0));
          },
          "request_ids"_a,
          "Forget finished, cancelled or failed requests and free their slots now; "
          "unknown ids are ignored.")
      .def(
          "finish_requests",
          [](Scheduler& s, const std::vector<int64_t>& request_ids) {
            s.finish_requests(request_ids.data(), request_ids.size());
          },
          "request_ids"_a)
      .def("has_unfinished", &Scheduler::has_unfinished)
      .def_prop_ro("num_waiting", [](const Scheduler& s) { return s.num_waiting(); })
      .def_prop_ro("num_running", [](const Scheduler& s) { return s.num_running(); })
      .def_prop_ro("num_free_slots", [](const Scheduler& s) { return s.num_free_slots(); })
      .def_prop_ro("max_slots", [](const Scheduler& s) { return s.max_slots(); });


  m.def("pack", &py_pack, "tokens"_a, "offsets"_a, "pad_id"_a, "pad_to"_a = 0,
        "Right-pad ragged rows tokens[offsets[b]:offsets[b+1]] into "
        "(input_ids, attention_mask), both int64[B, max(longest row, pad_to)].");

  m.def("sample", &py_sample, "logits"_a.noconvert(), "temperature"_a, "top_k"_a, "top_p"_a,
        "min_p"_a, "repetition_penalty"_a, "presence_penalty"_a, "frequency_penalty"_a,
        "seeds"_a, "tokens"_a, "offsets"_a, "prompt_lens"_a, "masks"_a = nb::none(),
        "mask_rows"_a = nb::none(),
        "One token per row of logits (float32[B, V], never modified). masks (uint32[M, W], "
        "bit t of a row allows token t) with mask_rows (int32[B], -1: free) restrict rows to "
        "the tokens a grammar allows. Exact semantics and RNG are documented in "
        "native/include/irouter/sampler.h.");

  using irouter::Matcher;
  nb::class_<Matcher>(m, "Matcher",
                      "Aho-Corasick blocklist matcher over UTF-8. Offsets are character (code "
                      "point) offsets; every occurrence is reported, overlapping ones and "
                      "duplicate patterns included. Exact semantics in "
                      "native/include/irouter/matcher.h.")
      .def(
          "__init__",
          [](Matcher* self, const std::vector<nb::str>& patterns, bool case_insensitive,
             bool whole_words) {
            std::vector<std::string> utf8_patterns;
            utf8_patterns.reserve(patterns.size());
            for (const nb::str& p : patterns) utf8_patterns.emplace_back(utf8(p));
            std::optional<Matcher> built;
            {
              nb::gil_scoped_release release;
              built.emplace(utf8_patterns, case_insensitive, whole_words);
            }
            new (self) Matcher(std::move(*built));
          },
          "patterns"_a, "case_insensitive"_a = false, "whole_words"_a = false,
          "case_insensitive folds ASCII letters only (no Unicode case folding). "
          "whole_words: a match counts only where the characters around it are not ASCII "
          "[A-Za-z0-9_] (non-ASCII characters count as boundaries). Raises ValueError "
          "naming the index of an empty pattern.")
      .def_prop_ro("num_patterns", &Matcher::num_patterns)
      .def_prop_ro("case_insensitive", &Matcher::case_insensitive)
      .def_prop_ro("whole_words", &Matcher::whole_words)
      .def(
          "find_all",
          [](const Matcher& self, const nb::str& text) {
            return to_python(on_text(text, [&](std::string_view t) { return self.find_all(t); }));
          },
          "text"_a,
          "Every match as (start, end, pattern_id), character offsets, sorted by end then "
          "pattern_id.")
      .def(
          "contains",
          [](const Matcher& self, const nb::str& text) {
            return on_text(text, [&](std::string_view t) { return self.contains(t); });
          },
          "text"_a, "Whether find_all(text) would be non-empty; stops at the first match.")
      .def(
          "stream", [](const Matcher& self) { return PyMatcherStream{self.stream()}; },
          "A new stream for matching text that arrives in chunks.");

  nb::class_<PyMatcherStream>(
      m, "MatcherStream",
      "Incremental matching over a sequence of chunks (from Matcher.stream()). Offsets "
      "count characters from the start of the stream; a pattern split across chunks is "
      "reported by the chunk that completes it. With whole_words, a match ending exactly "
      "at the end of what was fed is held until the next non-empty chunk or finish() "
      "shows what follows it. Use each stream from one thread at a time.")
      .def(
          "feed",
          [](PyMatcherStream& self, const nb::str& chunk) {
            Exclusive exclusive(self);
            return to_python(
                on_text(chunk, [&](std::string_view c) { return self.stream.feed(c); }));
          },
          "chunk"_a,
          "Matches completed (and, with whole_words, decided) by this chunk. Raises "
          "RuntimeError after finish().")
      .def(
          "finish",
          [](PyMatcherStream& self) {
            Exclusive exclusive(self);
            return to_python(self.stream.finish());
          },
          "End of stream: the matches held for whole_words. Idempotent.")
      .def(
          "holdback",
          [](PyMatcherStream& self) {
            Exclusive exclusive(self);
            return self.stream.holdback();
          },
          "Trailing characters of the stream so far that may still belong to an unreported "
          "match (the longest suffix that is a proper prefix of a pattern, or a held "
          "whole_words match): withhold them from output so a redaction never leaks half a "
          "term. 0 after finish().")
      .def_prop_ro(
          "position",
          [](PyMatcherStream& self) {
            Exclusive exclusive(self);
            return self.stream.position();
          },
          "Characters fed so far.");
}
