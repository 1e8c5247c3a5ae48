"""Step pacing: how many tokens the next engine step may compute, so that sequences already
decoding keep their pace while new prompts are prefilled.

A step that carries a prefill chunk lasts longer than a decode-only step, and every decoding
sequence waits for it: on a 2-core AVX2 CPU a 512-token chunk (the default token_budget) ran
~2.5 s against ~130 ms for 16 decode rows, so each running stream's next token came ~20 times
later than its usual gap. While sequences are decoding, a step's prefill is limited to what fits
in (STEP_FACTOR - 1) decode steps of time, from two measured rates: the decode-only step time at
that many rows and the prefill time per token (moving averages). A step with nothing decoding
gets the whole token_budget: no one is waiting, and first tokens come sooner.

Why by hand: the rates are this engine's own, measured per step; no scheduling library sees them.
"""

from __future__ import annotations

STEP_FACTOR = 2.2
"""A paced step may last about this many decode-only steps. Below the goal of 3 because a
paced step's length varies around its estimate (the prompt's attention grows with its past,
other threads share the cores, and the prefill rate is an average over chunks of every size:
a 24-token chunk beside 8 decode rows cost ~0.65 ms a token where it said ~0.5). Mixed steps
are ~5% of steps in the arrivals scenario, so the ITL p99 falls among them and the median
stays a decode-only step. With native decode steps (AMD EPYC Zen 4, 25 s runs, 5 alternating
pairs): 2.5 gave ITL p99 / median 2.58 / 3.01 / 2.65 / 3.02 / 3.06, 2.2 gave 2.93 / 2.53 /
2.48 / 2.74 / 2.53. A prompt arriving while streams decode gets ~20% fewer tokens a step."""
MIN_PREFILL = 16
"""Prefill tokens a paced step still carries, so that new prompts always progress."""
ALPHA = 0.2
"""Weight of the newest step in the moving averages."""


def _average(old: float | None, new: float) -> float:
    return new if old is None else old + ALPHA * (new - old)


class StepPacer:
    """Budgets for the engine thread (used by it only)."""

    def __init__(self, token_budget: int) -> None:
        self._token_budget = token_budget
        self._decode_s: dict[int, float] = {}
        """Decode-only step seconds by number of rows."""
        self._prefill_s: float | None = None
        """Seconds per prefill token (beyond the decode rows of the same step)."""

    def budget(self, decoding: int, running: int = 0, fresh: int = 0) -> int:
        """Tokens the next step may compute with `decoding` sequences decoding (one token each)
        among `running` holding a slot (the others still in their prompts); 0 means the whole
        token_budget (nothing decoding, or nothing measured yet).

        The time unit is the decode step of the decoding sequences while they are at least
        half of those running: they are the callers a long step would hold up. Otherwise (a
        burst, most callers still waiting for a first token) it is the decode step of all
        running, what each will see once all decode: paced to a first stream's short steps, a
        burst's other prompts progress a few tokens a step (16 prompts at once, in process,
        AMD EPYC Zen 4: last first token 281 ms against 196, medians of 4 rounds).

        `fresh` of the decoding sequences have only their first token. While all of them are so,
        they are a burst's first to finish their prompts, and the rest of the burst, which
        waited as long, gets the whole budget: each stream's second token comes one long step
        later, instead of the burst's last first tokens several paced steps later. (A prompt
        queued after their slots is not of their burst: Scheduler.decoding() then counts none
        fresh.)"""
        if decoding in (0, fresh) or self._prefill_s is None or not self._decode_s:
            return 0
        size = decoding if 2 * decoding >= running else running
        rows = min(self._decode_s, key=lambda n: abs(n - size))  # the nearest size measured
        allowance = (STEP_FACTOR - 1) * self._decode_s[rows] / self._prefill_s
        return min(self._token_budget, decoding + max(MIN_PREFILL, int(allowance)))

    def observe(self, decode_rows: int, prefill_tokens: int, seconds: float) -> None:
        """A step ran `decode_rows` one-token rows and `prefill_tokens` prompt tokens."""
        if prefill_tokens == 0:
            if decode_rows:
                self._decode_s[decode_rows] = _average(self._decode_s.get(decode_rows), seconds)
            return
        decode_part = self._decode_s.get(decode_rows, 0.0) if decode_rows else 0.0
        if decode_rows and decode_rows not in self._decode_s:
            return  # the decode part of this step is not known yet
        rest = seconds - decode_part
        if rest > 0:
            self._prefill_s = _average(self._prefill_s, rest / prefill_tokens)
