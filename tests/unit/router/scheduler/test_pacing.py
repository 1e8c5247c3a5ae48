"""StepPacer: budgets from measured step times (fed by hand here)."""

from __future__ import annotations

from router.scheduler.pacing import MIN_PREFILL, STEP_FACTOR, StepPacer


def test_nothing_decoding_or_nothing_measured_means_the_whole_budget() -> None:
    pacer = StepPacer(token_budget=512)
    assert pacer.budget(decoding=0) == 0
    assert pacer.budget(decoding=16) == 0  # no rates yet
    pacer.observe(decode_rows=16, prefill_tokens=0, seconds=0.13)
    assert pacer.budget(decoding=16) == 0  # the prefill rate is still unknown
    pacer.observe(decode_rows=0, prefill_tokens=100, seconds=0.5)
    assert pacer.budget(decoding=0) == 0


def test_a_paced_step_carries_the_prefill_that_fits_in_one_more_decode_step() -> None:
    pacer = StepPacer(token_budget=512)
    pacer.observe(decode_rows=16, prefill_tokens=0, seconds=0.13)  # 130 ms per decode step
    pacer.observe(decode_rows=0, prefill_tokens=100, seconds=0.5)  # 5 ms per prompt token
    # (STEP_FACTOR - 1) x 130 ms of prefill at 5 ms a token, plus the 16 decode rows.
    allowance = round((STEP_FACTOR - 1) * 0.13 / 0.005)
    assert pacer.budget(decoding=16) == 16 + allowance
    # A mixed step teaches the prefill rate too: 16 rows (130 ms) + 52 tokens in 0.39 s.
    pacer.observe(decode_rows=16, prefill_tokens=52, seconds=0.39)
    assert pacer.budget(decoding=16) == 16 + allowance  # still 5 ms a token
    # With one decode size measured only, the nearest one stands in for the others.
    assert pacer.budget(decoding=15) == 15 + allowance


def test_slow_decodes_or_fast_prefill_never_exceed_the_budget_and_never_starve_prompts() -> None:
    pacer = StepPacer(token_budget=64)
    pacer.observe(decode_rows=4, prefill_tokens=0, seconds=10.0)
    pacer.observe(decode_rows=0, prefill_tokens=100, seconds=0.1)
    assert pacer.budget(decoding=4) == 64
    pacer = StepPacer(token_budget=512)
    pacer.observe(decode_rows=4, prefill_tokens=0, seconds=0.001)
    pacer.observe(decode_rows=0, prefill_tokens=10, seconds=1.0)
    assert pacer.budget(decoding=4) == 4 + MIN_PREFILL


def test_the_time_unit_is_the_decoding_streams_while_they_are_half_the_running_or_more() -> None:
    pacer = StepPacer(token_budget=512)
    pacer.observe(decode_rows=8, prefill_tokens=0, seconds=0.02)  # 20 ms for 8 rows
    pacer.observe(decode_rows=16, prefill_tokens=0, seconds=0.04)  # 40 ms for 16 rows
    pacer.observe(decode_rows=0, prefill_tokens=100, seconds=0.1)  # 1 ms a prompt token
    per_8, per_16 = round((STEP_FACTOR - 1) * 20), round((STEP_FACTOR - 1) * 40)
    # 8 decoding, 2 more in their prompts: the 8 are the ones a long step holds up, and only
    # they take a token each (the 2 prompts' share is prefill, within the allowance).
    assert pacer.budget(decoding=8, running=10) == 8 + per_8
    assert pacer.budget(decoding=8, running=16) == 8 + per_8  # still half
    # A burst: 1 stream decodes beside 15 prompts; paced to the whole batch's decode step.
    assert pacer.budget(decoding=1, running=16) == 1 + per_16
    assert pacer.budget(decoding=0, running=16) == 0  # nothing decoding: the whole budget


def test_a_bursts_first_finishers_do_not_hold_back_the_rest_of_the_burst() -> None:
    pacer = StepPacer(token_budget=512)
    pacer.observe(decode_rows=16, prefill_tokens=0, seconds=0.04)
    pacer.observe(decode_rows=0, prefill_tokens=100, seconds=0.1)
    # 13 of a 16-prompt burst have their first token, 3 are still in their prompts: the 3
    # waited as long, so the step takes their prompts whole (the 13's second token comes later).
    assert pacer.budget(decoding=13, running=16, fresh=13) == 0
    # One stream decoding from before: its pace is kept.
    per_16 = round((STEP_FACTOR - 1) * 40)
    assert pacer.budget(decoding=14, running=16, fresh=13) == 14 + per_16
