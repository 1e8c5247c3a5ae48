#include "irouter/scheduler.h"

#include <algorithm>
#include <functional>
#include <stdexcept>
#include <string>

namespace irouter {

namespace {

// Tokens a sequence still has to compute before it can sample. A sequence
// that already holds prompt + max_new_tokens tokens is done and only waits
// for finish_requests(), so it needs nothing.
inline int32_t pending(const Sequence& s) {
  return s.num_tokens >= s.max_total ? 0 : s.num_tokens - s.num_computed;
}

}  // namespace

Scheduler::Scheduler(int32_t max_slots, int32_t token_budget,
                     int32_t max_waiting, int32_t max_context)
    : max_slots_(max_slots),
      token_budget_(token_budget),
      max_waiting_(max_waiting),
      max_context_(max_context) {
  if (max_slots < 1)
    throw std::invalid_argument("max_slots=" + std::to_string(max_slots) +
                                " must be at least 1");
  if (token_budget < 1)
    throw std::invalid_argument("token_budget=" + std::to_string(token_budget) +
                                " must be at least 1");
  if (max_waiting < 0)
    throw std::invalid_argument("max_waiting=" + std::to_string(max_waiting) +
                                " must be at least 0");
  if (max_context < 2)
    throw std::invalid_argument("max_context=" + std::to_string(max_context) +
                                " must be at least 2 (one prompt token and one new token)");
  free_slots_.reserve(max_slots);
  for (int32_t s = max_slots - 1; s >= 0; --s) free_slots_.push_back(s);
  running_.reserve(max_slots);
}

bool Scheduler::add_request(int64_t request_id, int32_t num_prompt_tokens,
                            int32_t max_new_tokens, int32_t priority,
                            int32_t num_cached) {
  std::lock_guard<std::mutex> lock(mu_);
  const std::string id = "request " + std::to_string(request_id);
  if (num_prompt_tokens < 1)
    throw std::invalid_argument(id + ": num_prompt_tokens=" +
                                std::to_string(num_prompt_tokens) + " must be at least 1");
  if (max_new_tokens < 1)
    throw std::invalid_argument(id + ": max_new_tokens=" + std::to_string(max_new_tokens) +
                                " must be at least 1");
  if (int64_t{num_prompt_tokens} + max_new_tokens > max_context_)
    throw std::invalid_argument(
        id + ": max_new_tokens=" + std::to_string(max_new_tokens) +
        " exceeds the context limit of " + std::to_string(max_context_) +
        " tokens including the " + std::to_string(num_prompt_tokens) + "-token prompt");
  if (num_cached < 0 || num_cached >= num_prompt_tokens)
    throw std::invalid_argument(id + ": num_cached=" + std::to_string(num_cached) +
                                " must be in 0.." + std::to_string(num_prompt_tokens - 1) +
                                " (at least one prompt token is computed)");
  if (seqs_.count(request_id))
    throw std::invalid_argument(id + " is already scheduled (duplicate request_id)");
  if (static_cast<int64_t>(waiting_.size()) >= max_waiting_) return false;

  Sequence& s = seqs_[request_id];
  s.id = request_id;
  s.priority = priority;
  s.arrival = next_arrival_++;
  s.num_tokens = num_prompt_tokens;
  s.num_computed = num_cached;
  s.max_total = num_prompt_tokens + max_new_tokens;
  s.slot = -1;
  s.status = SeqStatus::Waiting;
  waiting_.insert(&s);
  return true;
}

void Scheduler::insert_running(Sequence* seq) {
  running_.insert(std::upper_bound(running_.begin(), running_.end(), seq, Urgency{}), seq);
}

void Scheduler::erase_running(Sequence* seq) {
  // (priority, arrival) is unique, so lower_bound lands on seq itself.
  auto it = std::lower_bound(running_.begin(), running_.end(), seq, Urgency{});
  running_.erase(it);
}

void Scheduler::release_slot(Sequence* seq) {
  // Kept in descending order, so back() is the lowest free slot: a batched decode spans slots
  // 0..highest in use, so a lone stream left in slot 15 after a burst decoded 16 rows a step
  // (measured: 10 instead of 80 tokens/s on 2 cores) where slot 0 decodes one.
  free_slots_.insert(std::upper_bound(free_slots_.begin(), free_slots_.end(), seq->slot,
                                      std::greater<int32_t>()),
                     seq->slot);
  seq->slot = -1;
}

SchedulerOutput Scheduler::schedule(int32_t step_budget) {
  // One step spends at most token_budget tokens; a decode row costs 1, a
  // prefill chunk its length. There are no separate prefill/decode phases:
  // every sequence just has num_tokens - num_computed tokens to catch up on.
  //
  //  1. Running sequences with exactly one pending token (decodes), in
  //     urgency order (priority desc, arrival asc), while budget remains.
  //  2. Running sequences with more pending tokens (prefill not finished),
  //     same order, each chunked to the remaining budget.
  //  3. Waiting sequences in urgency order while budget remains: admitted
  //     into a free slot with a first chunk of min(pending, budget) tokens.
  //     With no slot free, if the waiting head has strictly higher priority
  //     than the least urgent running sequence (lowest priority, latest
  //     arrival), that one is preempted by recompute: its slot is freed,
  //     num_computed = 0, it returns to the waiting queue (keeping its
  //     arrival, so it goes ahead of later arrivals of its priority) and is
  //     reported in `preempted`; any row it got in steps 1-2 is withdrawn
  //     and its tokens go back to the budget. Otherwise admission stops:
  //     nothing behind the head may overtake it.
  //
  // num_computed advances optimistically by each row's count (vLLM v1): the
  // caller is expected to run exactly this plan. A row samples when it
  // reaches num_tokens; that sequence then has nothing pending until
  // append_tokens() delivers the sampled token.
  std::lock_guard<std::mutex> lock(mu_);
  struct Row {
    Sequence* seq;
    int32_t start;
    int32_t count;
  };
  std::vector<Row> rows;
  rows.reserve(running_.size() + 4);
  SchedulerOutput out;
  int32_t budget =
      step_budget > 0 ? std::min(step_budget, token_budget_) : token_budget_;

  auto add_row = [&](Sequence* s, int32_t count) {
    rows.push_back({s, s->num_computed, count});
    s->num_computed += count;
    budget -= count;
  };

  for (Sequence* s : running_) {
    if (budget == 0) break;
    if (pending(*s) == 1) add_row(s, 1);
  }
  for (Sequence* s : running_) {
    if (budget == 0) break;
    const int32_t need = pending(*s);
    if (need > 1) add_row(s, std::min(need, budget));
  }

  for (auto it = waiting_.begin(); budget > 0 && it != waiting_.end();) {
    Sequence* w = *it;
    const int32_t need = pending(*w);
    if (need == 0) {  // already complete, waiting to be finished
      ++it;
      continue;
    }
    if (free_slots_.empty()) {
      Sequence* victim = running_.back();
      if (w->priority <= victim->priority) break;
      for (Row& r : rows) {
        if (r.seq == victim) {
          budget += r.count;
          r.seq = nullptr;
        }
      }
      erase_running(victim);
      release_slot(victim);
      victim->num_computed = 0;
      victim->status = SeqStatus::Waiting;
      waiting_.insert(victim);  // sorts after w: lower priority
      out.preempted.push_back(victim->id);
    }
    it = waiting_.erase(it);
    w->slot = free_slots_.back();
    free_slots_.pop_back();
    w->status = SeqStatus::Running;
    insert_running(w);
    add_row(w, std::min(need, budget));
  }

  const size_t n = rows.size();
  out.request_ids.reserve(n);
  out.slots.reserve(n);
  out.starts.reserve(n);
  out.counts.reserve(n);
  out.sample.reserve(n);
  for (const Row& r : rows) {
    if (r.seq == nullptr) continue;
    out.request_ids.push_back(r.seq->id);
    out.slots.push_back(r.seq->slot);
    out.starts.push_back(r.start);
    out.counts.push_back(r.count);
    out.sample.push_back(r.start + r.count == r.seq->num_tokens);
  }
  return out;
}

void Scheduler::append_tokens(const int64_t* request_ids, size_t n) {
  std::lock_guard<std::mutex> lock(mu_);
  // Validate everything first so a bad id leaves no partial update behind.
  std::vector<int64_t> ids(request_ids, request_ids + n);
  std::sort(ids.begin(), ids.end());
  for (size_t i = 0; i < ids.size();) {
    size_t j = i;
    while (j < ids.size() && ids[j] == ids[i]) ++j;
    auto found = seqs_.find(ids[i]);
    if (found != seqs_.end()) {
      const Sequence& s = found->second;
      if (s.num_tokens + static_cast<int64_t>(j - i) > s.max_total)
        throw std::invalid_argument(
            "request " + std::to_string(s.id) + " already has " +
            std::to_string(s.num_tokens) + " tokens, its limit (prompt + max_new_tokens); "
            "finish it instead of appending");
    }
    i = j;
  }
  for (int64_t id : ids) {
    auto found = seqs_.find(id);
    if (found != seqs_.end()) found->second.num_tokens += 1;
  }
}

void Scheduler::finish_requests(const int64_t* request_ids, size_t n) {
  std::lock_guard<std::mutex> lock(mu_);
  for (size_t i = 0; i < n; ++i) {
    auto found = seqs_.find(request_ids[i]);
    if (found == seqs_.end()) continue;
    Sequence* s = &found->second;
    if (s->status == SeqStatus::Running) {
      erase_running(s);
      release_slot(s);
    } else {
      waiting_.erase(s);
    }
    seqs_.erase(found);
  }
}

int32_t Scheduler::num_waiting() const {
  std::lock_guard<std::mutex> lock(mu_);
  return static_cast<int32_t>(waiting_.size());
}

int32_t Scheduler::num_running() const {
  std::lock_guard<std::mutex> lock(mu_);
  return static_cast<int32_t>(running_.size());
}

int32_t Scheduler::num_free_slots() const {
  std::lock_guard<std::mutex> lock(mu_);
  return static_cast<int32_t>(free_slots_.size());
}

bool Scheduler::has_unfinished() const {
  std::lock_guard<std::mutex> lock(mu_);
  return !seqs_.empty();
}

}  // namespace irouter
