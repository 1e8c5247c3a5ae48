// Continuous-batching scheduler over fixed KV-cache slots.
//
// The decoder keeps each running sequence's KV cache in one slot (max_slots
// slots of up to max_context tokens each). The scheduler only decides which
// tokens are computed next; it never runs a model and never sees token ids:
// the caller holds the token lists, the scheduler holds counts.
//
// Engine loop: out = schedule(); run the model on out; append_tokens(ids whose
// row had sample=true and produced a token); finish_requests(ids that stopped).
//
// Every public method takes an internal mutex: the bindings release the GIL,
// so calls from several Python threads are serialised rather than racing.
#pragma once

#include <cstdint>
#include <mutex>
#include <set>
#include <unordered_map>
#include <vector>

namespace irouter {

// Ordered life cycle, so "is finished" would be a comparison. Finished
// requests are forgotten at once, so only the first two live here.
enum class SeqStatus : int32_t { Waiting = 0, Running = 1 };

struct Sequence {
  int64_t id = 0;
  int32_t priority = 0;     // higher = more urgent
  uint64_t arrival = 0;     // admission order, smaller = earlier
  int32_t num_tokens = 0;   // prompt + generated so far
  int32_t num_computed = 0; // tokens whose KV is in the slot
  int32_t max_total = 0;    // prompt + max_new_tokens
  int32_t slot = -1;        // -1 while waiting
  SeqStatus status = SeqStatus::Waiting;
};

// One step's plan; all vectors but `preempted` have one entry per row.
struct SchedulerOutput {
  std::vector<int64_t> request_ids;
  std::vector<int32_t> slots;
  std::vector<int32_t> starts;  // num_computed before this step
  std::vector<int32_t> counts;  // tokens to compute this step
  std::vector<uint8_t> sample;  // 1 when this row's logits give the next token
  std::vector<int64_t> preempted;
};

class Scheduler {
 public:
  // Throws std::invalid_argument on non-positive sizes.
  Scheduler(int32_t max_slots, int32_t token_budget, int32_t max_waiting,
            int32_t max_context);

  // False when the waiting queue already holds max_waiting requests.
  // Throws std::invalid_argument on a duplicate id, num_prompt_tokens < 1,
  // max_new_tokens < 1, prompt + max_new_tokens > max_context, or
  // num_cached outside 0..num_prompt_tokens - 1.
  //
  // num_cached: prompt tokens whose KV the caller places in the slot when the
  // request is admitted (a cached prefix), so its first row starts there. A
  // request preempted later starts again from 0 (its slot was given away).
  bool add_request(int64_t request_id, int32_t num_prompt_tokens,
                   int32_t max_new_tokens, int32_t priority = 0,
                   int32_t num_cached = 0);

  // budget: tokens this step may compute, at most token_budget; 0 or less
  // means token_budget. The caller lowers it to keep a step short while
  // sequences are decoding (prefill chunks then wait for later steps).
  SchedulerOutput schedule(int32_t budget = 0);

  // Each listed sequence received one sampled token. Unknown ids (e.g.
  // cancelled while the step ran) are ignored. Throws std::invalid_argument
  // when a sequence would exceed prompt + max_new_tokens; nothing is applied
  // then.
  void append_tokens(const int64_t* request_ids, size_t n);

  // Forget the listed sequences and free their slots; unknown ids are ignored.
  void finish_requests(const int64_t* request_ids, size_t n);

  int32_t num_waiting() const;
  int32_t num_running() const;
  int32_t num_free_slots() const;
  int32_t max_slots() const { return max_slots_; }
  bool has_unfinished() const;

 private:
  // Orders by priority desc, then arrival asc: begin() is the most urgent.
  struct Urgency {
    bool operator()(const Sequence* a, const Sequence* b) const {
      if (a->priority != b->priority) return a->priority > b->priority;
      return a->arrival < b->arrival;
    }
  };

  void insert_running(Sequence* seq);
  void erase_running(Sequence* seq);
  void release_slot(Sequence* seq);

  int32_t max_slots_;
  int32_t token_budget_;
  int32_t max_waiting_;
  int32_t max_context_;
  uint64_t next_arrival_ = 0;

  std::unordered_map<int64_t, Sequence> seqs_;
  std::set<Sequence*, Urgency> waiting_;
  std::vector<Sequence*> running_;  // sorted by Urgency; back() = next victim
  std::vector<int32_t> free_slots_; // LIFO; slot 0 is handed out first
  mutable std::mutex mu_;
};

}  // namespace irouter
