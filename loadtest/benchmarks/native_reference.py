"""Plain NumPy/Python references for the native kernels in ``router._native``.

Each function follows the semantics written down in ``native/include/irouter/*.h``
step by step, favouring obviousness over speed. The native tests compare against
them and ``native_bench`` measures the native speed-up over them.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import numpy.typing as npt

GOLDEN = 0x9E3779B97F4A7C15
MASK64 = (1 << 64) - 1


def splitmix64(z: int) -> int:
    z = (z + GOLDEN) & MASK64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & MASK64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & MASK64
    return z ^ (z >> 31)


def uniform_draw(seed: int, step: int) -> float:
    """The sampler's uniform in [0, 1) for a row with this seed after ``step`` outputs."""
    x = splitmix64(int(seed) ^ ((int(step) * GOLDEN) & MASK64))
    return float(x >> 11) * 2.0**-53


# --------------------------------------------------------------------------- sampler


def _rel_gap(a: float, b: float) -> float:
    return abs(a - b) / max(abs(a), abs(b), 1e-300)


def sample_row_reference(
    logits: npt.NDArray[np.float32],
    *,
    temperature: float,
    top_k: int,
    top_p: float,
    min_p: float,
    repetition_penalty: float,
    presence_penalty: float,
    frequency_penalty: float,
    seed: int,
    context: npt.NDArray[np.int64],
    prompt_len: int,
) -> tuple[int, float]:
    """One row of ``sample``; returns (token, margin).

    ``margin`` is the smallest relative distance between a cumulative sum or
    probability and a cut (top-p target, min-p threshold, u * T): native and
    reference may only disagree when it is at the level of exp() rounding.
    """
    z = np.array(logits, dtype=np.float32, copy=True)
    rep = np.float32(repetition_penalty)
    presence = np.float32(presence_penalty)
    frequency = np.float32(frequency_penalty)
    if context.size:
        seen = np.unique(context)
        v = z[seen]
        z[seen] = np.where(v > 0, v / rep, v * rep)
        output = context[prompt_len:]
        if output.size:
            toks, counts = np.unique(output, return_counts=True)
            z[toks] = z[toks] - (presence + frequency * counts.astype(np.float32))

    if temperature == 0.0:
        return int(np.argmax(z)), np.inf

    z = z / np.float32(temperature)
    vocab = z.size
    order = np.lexsort((np.arange(vocab), -z))  # z desc, then index asc
    cand = order[:top_k] if 0 < top_k < vocab else order
    m = np.float64(z[cand[0]])
    if m == -np.inf:
        return int(cand[0]), np.inf
    e = np.exp(z[cand].astype(np.float64) - m)
    total = float(np.cumsum(e[np.argsort(cand)])[-1])  # sequential, token index order
    cum = np.cumsum(e)  # sequential, sorted order
    margin = np.inf

    n_keep = cand.size
    if top_p < 1.0:
        target = np.float64(np.float32(top_p)) * total
        hits = np.flatnonzero(cum >= target)
        if hits.size:
            n_keep = int(hits[0]) + 1
            margin = min(margin, _rel_gap(cum[hits[0]], target))
            if hits[0] > 0:
                margin = min(margin, _rel_gap(cum[hits[0] - 1], target))
    if min_p > 0.0:
        threshold = np.float64(np.float32(min_p))
        below = np.flatnonzero(e[:n_keep] < threshold)
        if below.size:
            n_keep = int(below[0])
        near = e[: min(n_keep + 1, cand.size)]
        margin = min(margin, float(np.min(np.abs(near - threshold))) / threshold)

    kept_total = total if n_keep == cand.size else float(cum[n_keep - 1])
    target = uniform_draw(seed, context.size - prompt_len) * kept_total
    hits = np.flatnonzero(cum[:n_keep] > target)
    j = int(hits[0]) if hits.size else n_keep - 1
    margin = min(margin, _rel_gap(cum[j], target))
    if j > 0:
        margin = min(margin, _rel_gap(cum[j - 1], target))
    return int(cand[j]), margin


def sample_reference(
    logits: npt.NDArray[np.float32],
    temperature: npt.NDArray[np.float32],
    top_k: npt.NDArray[np.int32],
    top_p: npt.NDArray[np.float32],
    min_p: npt.NDArray[np.float32],
    repetition_penalty: npt.NDArray[np.float32],
    presence_penalty: npt.NDArray[np.float32],
    frequency_penalty: npt.NDArray[np.float32],
    seeds: npt.NDArray[np.uint64],
    tokens: npt.NDArray[np.int64],
    offsets: npt.NDArray[np.int64],
    prompt_lens: npt.NDArray[np.int64],
) -> tuple[npt.NDArray[np.int64], npt.NDArray[np.float64]]:
    """Reference for ``router._native.sample``: (tokens, per-row margins)."""
    out = np.empty(logits.shape[0], dtype=np.int64)
    margins = np.empty(logits.shape[0], dtype=np.float64)
    for b in range(logits.shape[0]):
        out[b], margins[b] = sample_row_reference(
            logits[b],
            temperature=float(temperature[b]),
            top_k=int(top_k[b]),
            top_p=float(top_p[b]),
            min_p=float(min_p[b]),
            repetition_penalty=float(repetition_penalty[b]),
            presence_penalty=float(presence_penalty[b]),
            frequency_penalty=float(frequency_penalty[b]),
            seed=int(seeds[b]),
            context=tokens[offsets[b] : offsets[b + 1]],
            prompt_len=int(prompt_lens[b]),
        )
    return out, margins


# --------------------------------------------------------------------------- pack


def pack_reference(
    tokens: npt.NDArray[np.int64], offsets: npt.NDArray[np.int64], pad_id: int, pad_to: int = 0
) -> tuple[npt.NDArray[np.int64], npt.NDArray[np.int64]]:
    """Reference for ``router._native.pack`` (right padding)."""
    rows = [tokens[offsets[b] : offsets[b + 1]] for b in range(len(offsets) - 1)]
    length = max([len(r) for r in rows] + [pad_to])
    input_ids = np.full((len(rows), length), pad_id, dtype=np.int64)
    mask = np.zeros((len(rows), length), dtype=np.int64)
    for b, row in enumerate(rows):
        input_ids[b, : len(row)] = row
        mask[b, : len(row)] = 1
    return input_ids, mask


# --------------------------------------------------------------------------- scheduler


@dataclass
class _Seq:
    id: int
    priority: int
    arrival: int
    num_tokens: int
    max_total: int
    num_computed: int = 0
    slot: int = -1

    @property
    def urgency(self) -> tuple[int, int]:
        return (-self.priority, self.arrival)

    @property
    def pending(self) -> int:
        return 0 if self.num_tokens >= self.max_total else self.num_tokens - self.num_computed


@dataclass
class ReferenceOutput:
    request_ids: list[int] = field(default_factory=list)
    slots: list[int] = field(default_factory=list)
    starts: list[int] = field(default_factory=list)
    counts: list[int] = field(default_factory=list)
    sample: list[bool] = field(default_factory=list)
    preempted: list[int] = field(default_factory=list)


class ReferenceScheduler:
    """Pure-Python twin of ``router._native.Scheduler`` (see schedule() in scheduler.cpp)."""

    def __init__(self, max_slots: int, token_budget: int, max_waiting: int, max_context: int):
        self.max_slots = max_slots
        self.token_budget = token_budget
        self.max_waiting = max_waiting
        self.max_context = max_context
        self.seqs: dict[int, _Seq] = {}
        self.waiting: list[_Seq] = []
        self.running: list[_Seq] = []
        self.free_slots = list(range(max_slots - 1, -1, -1))
        self._arrivals = 0

    def add_request(
        self, request_id: int, num_prompt_tokens: int, max_new_tokens: int, priority: int = 0
    ) -> bool:
        if num_prompt_tokens < 1 or max_new_tokens < 1:
            raise ValueError("bad token counts")
        if num_prompt_tokens + max_new_tokens > self.max_context:
            raise ValueError("too long")
        if request_id in self.seqs:
            raise ValueError("duplicate")
        if len(self.waiting) >= self.max_waiting:
            return False
        seq = _Seq(
            request_id,
            priority,
            self._arrivals,
            num_prompt_tokens,
            num_prompt_tokens + max_new_tokens,
        )
        self._arrivals += 1
        self.seqs[request_id] = seq
        self.waiting.append(seq)
        return True

    def schedule(self) -> ReferenceOutput:
        budget = self.token_budget
        rows: list[list[_Seq | int | None]] = []  # [seq or None, start, count]
        self.running.sort(key=lambda s: s.urgency)
        self.waiting.sort(key=lambda s: s.urgency)
        out = ReferenceOutput()

        def add_row(seq: _Seq, count: int) -> None:
            nonlocal budget
            rows.append([seq, seq.num_computed, count])
            seq.num_computed += count
            budget -= count

        for seq in self.running:
            if budget and seq.pending == 1:
                add_row(seq, 1)
        for seq in self.running:
            if budget and seq.pending > 1:
                add_row(seq, min(seq.pending, budget))
        i = 0
        while budget and i < len(self.waiting):
            w = self.waiting[i]
            if w.pending == 0:
                i += 1
                continue
            if not self.free_slots:
                victim = self.running[-1]
                if w.priority <= victim.priority:
                    break
                for row in rows:
                    if row[0] is victim:
                        budget += row[2]  # type: ignore[operator]
                        row[0] = None
                self.running.remove(victim)
                self._free(victim.slot)
                victim.slot, victim.num_computed = -1, 0
                self.waiting.append(victim)
                self.waiting.sort(key=lambda s: s.urgency)
                out.preempted.append(victim.id)
            self.waiting.remove(w)
            w.slot = self.free_slots.pop()
            self.running.append(w)
            self.running.sort(key=lambda s: s.urgency)
            add_row(w, min(w.pending, budget))
        for seq, start, count in rows:
            if isinstance(seq, _Seq):
                assert isinstance(start, int) and isinstance(count, int)
                out.request_ids.append(seq.id)
                out.slots.append(seq.slot)
                out.starts.append(start)
                out.counts.append(count)
                out.sample.append(start + count == seq.num_tokens)
        return out

    def append_tokens(self, request_ids: list[int]) -> None:
        for rid in request_ids:
            if rid in self.seqs:
                self.seqs[rid].num_tokens += 1

    def finish_requests(self, request_ids: list[int]) -> None:
        for rid in request_ids:
            seq = self.seqs.pop(rid, None)
            if seq is None:
                continue
            if seq in self.running:
                self.running.remove(seq)
                self._free(seq.slot)
            else:
                self.waiting.remove(seq)

    @property
    def num_waiting(self) -> int:
        return len(self.waiting)

    @property
    def num_running(self) -> int:
        return len(self.running)

    def _free(self, slot: int) -> None:
        """Descending, so pop() gives the lowest free slot (as the native core does)."""
        self.free_slots.append(slot)
        self.free_slots.sort(reverse=True)

    @property
    def num_free_slots(self) -> int:
        return len(self.free_slots)


# --------------------------------------------------------------------------- matcher

_ASCII_LOWER = str.maketrans("ABCDEFGHIJKLMNOPQRSTUVWXYZ", "abcdefghijklmnopqrstuvwxyz")
_WORD_CHARS = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789_")


def _fold(s: str, case_insensitive: bool) -> str:
    """ASCII-only case folding; str.lower() would also fold (and resize) non-ASCII."""
    return s.translate(_ASCII_LOWER) if case_insensitive else s


def _check_patterns(patterns: list[str]) -> None:
    for i, p in enumerate(patterns):
        if not p:
            raise ValueError(f"patterns[{i}] is empty; every pattern needs at least one character")


def find_all_reference(
    text: str, patterns: list[str], *, case_insensitive: bool = False, whole_words: bool = False
) -> list[tuple[int, int, int]]:
    """``Matcher(patterns, ...).find_all(text)``: every occurrence of every pattern.

    (start, end, pattern_id) in character offsets, sorted by end then pattern_id.
    whole_words: the characters just outside the match must not be ASCII [A-Za-z0-9_].
    """
    _check_patterns(patterns)
    folded = _fold(text, case_insensitive)
    out = []
    for pid, pattern in enumerate(patterns):
        needle = _fold(pattern, case_insensitive)
        start = folded.find(needle)
        while start != -1:
            end = start + len(needle)
            if not whole_words or (
                (start == 0 or text[start - 1] not in _WORD_CHARS)
                and (end == len(text) or text[end] not in _WORD_CHARS)
            ):
                out.append((start, end, pid))
            start = folded.find(needle, start + 1)
    out.sort(key=lambda m: (m[1], m[2]))
    return out


def holdback_reference(
    fed: str, patterns: list[str], *, case_insensitive: bool = False, whole_words: bool = False
) -> int:
    """``MatcherStream.holdback()`` after feeding ``fed`` (not finished).

    The longest suffix of ``fed`` that is a proper prefix of some pattern; with
    whole_words, at least as long as any match ending at the end of ``fed`` whose
    left side is a boundary (it is held until the next character is known).
    """
    _check_patterns(patterns)
    folded = _fold(fed, case_insensitive)
    hold = 0
    for pattern in patterns:
        needle = _fold(pattern, case_insensitive)
        for k in range(min(len(needle) - 1, len(folded)), hold, -1):
            if folded.endswith(needle[:k]):
                hold = k
                break
    if whole_words:
        for start, end, _ in find_all_reference(
            fed, patterns, case_insensitive=case_insensitive, whole_words=True
        ):
            if end == len(fed):
                hold = max(hold, end - start)
    return hold
