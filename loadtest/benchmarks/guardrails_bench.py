"""Guardrails cost per output token and per prompt.

    python -m loadtest.benchmarks.guardrails_bench

Output filtering runs once per generated token, so its figure is microseconds per
`StreamFilter.feed()` over a 2,000-token stream with a typical policy (500 blocked terms,
'redact', plus every PII detector). The baseline, measured in the same run, is the naive filter
that rescans all text so far on every token; the ratio shows what scanning only the unsent
window buys. `InputGuard.check()` is timed on a 1,000-character prompt.
"""

from __future__ import annotations

import random
import statistics
import time
from collections.abc import Callable

from router.guard.guardrails import InputGuard, OutputGuard
from router.guard.guardrails_config import GuardrailPolicy, GuardrailsConfig
from router.guard.pii import DETECTORS

_WORDS = (
    "the", "of", "and", "to", "in", "is", "that", "for", "it", "as", "was", "with", "be", "by",
    "on", "not", "he", "this", "are", "or", "his", "from", "at", "which", "but", "have", "an",
    "they", "you", "were", "her", "she", "there", "been", "one", "all", "we", "their", "has",
    "would", "when", "if", "so", "no", "will", "model", "request", "server", "token", "stream",
    "latency", "batch", "cache", "router", "policy", "deployment", "replica",
)  # fmt: skip
_PII = (
    " mail jane.roe@example.com", " card 4111 1111 1111 1111", " call +44 20 7946 0958",
    " host 10.20.30.40", " IBAN DE89 3704 0044 0532 0130 00", " key AKIAIOSFODNN7EXAMPLE",
)  # fmt: skip


def make_terms(rng: random.Random, n: int) -> tuple[str, ...]:
    letters = "abcdefghijklmnopqrstuvwxyz"
    return tuple("".join(rng.choice(letters) for _ in range(rng.randint(5, 12))) for _ in range(n))


def make_tokens(rng: random.Random, terms: tuple[str, ...], n: int) -> list[str]:
    """Prose-like deltas of 1-6 characters, as a BPE tokenizer emits them, with a few PII items
    and blocked terms mixed in."""
    tokens: list[str] = []
    while len(tokens) < n:
        roll = rng.random()
        if roll < 0.01:
            word = rng.choice(_PII)
        elif roll < 0.02:
            word = " " + rng.choice(terms)
        else:
            word = " " + rng.choice(_WORDS) + ("." if rng.random() < 0.08 else "")
        while word:
            cut = rng.randint(1, 6)
            tokens.append(word[:cut])
            word = word[cut:]
    return tokens[:n]


def time_stream(feed_all: Callable[[], object], feeds: int, repeat: int) -> float:
    """Median microseconds per feed."""
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        feed_all()
        times.append((time.perf_counter() - start) / feeds * 1e6)
    return statistics.median(times)


def main() -> None:
    rng = random.Random(0)
    terms = make_terms(rng, 500)
    config = GuardrailsConfig(
        policies=(
            GuardrailPolicy(name="blocklist", terms=terms, action="redact"),
            GuardrailPolicy(name="pii", pii=dict.fromkeys(DETECTORS, "redact")),
        )
    ).validate()
    output, input_guard = OutputGuard(config), InputGuard(config)
    tokens = make_tokens(rng, terms, 2000)

    def filtered() -> None:
        stream = output.new_stream()
        for token in tokens:
            stream.feed(token)
        stream.finish()

    def rescanning() -> None:
        # The naive filter: check everything received so far on every token.
        text = ""
        for token in tokens:
            text += token
            input_guard.check(text)

    per_feed = time_stream(filtered, len(tokens), repeat=7)
    naive = time_stream(rescanning, len(tokens), repeat=1)
    print(f"output: 2,000-token stream, 500 terms + {len(DETECTORS)} PII detectors")
    print(
        f"  StreamFilter.feed      {per_feed:8.1f} us/token   rescan-all baseline "
        f"{naive:8.1f} us/token   ratio {naive / per_feed:6.1f}x"
    )
    for label, policy in (
        ("terms only (500)", config.policies[0]),
        ("terms only (5,000)", GuardrailPolicy(name="big", terms=make_terms(rng, 5000))),
        ("PII only", config.policies[1]),
    ):
        guard = OutputGuard(GuardrailsConfig(policies=(policy,)))

        def run(guard: OutputGuard = guard) -> None:
            stream = guard.new_stream()
            for token in tokens:
                stream.feed(token)
            stream.finish()

        print(f"    {label:<20} {time_stream(run, len(tokens), repeat=7):8.1f} us/token")

    prompt = "".join(tokens)[:1000]
    check_us = time_stream(lambda: input_guard.check(prompt), 1, repeat=200)
    print("input: 1,000-character prompt, same policies + injection heuristic")
    print(f"  InputGuard.check       {check_us:8.1f} us/prompt")


if __name__ == "__main__":
    main()
