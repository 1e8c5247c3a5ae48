"""Native blocklist matcher vs Python ``re`` and the pure-Python reference, same run.

    python -m loadtest.benchmarks.matcher_bench

1,000 terms drawn from words of the standard library's docstrings, matched over
1 MB of those docstrings. One line per figure: median time per call of native and
baseline, and the speed-up ratio baseline/native. Goal: find_all >= 20x a ``re``
alternation of the escaped terms (finditer). The two do not count the same matches:
``re`` reports leftmost non-overlapping ones, the matcher every occurrence.
"""

from __future__ import annotations

import os
import random
import re
import statistics
import time
from collections.abc import Callable
from pathlib import Path

from loadtest.benchmarks.native_reference import find_all_reference
from router import _native

NUM_TERMS = 1_000
TEXT_CHARS = 1_000_000
CHUNK_CHARS = 4  # about one token
STREAM_CHARS = 100_000
DOCSTRING = re.compile(r'"""(.*?)"""', re.S)


def median_seconds(fn: Callable[[], object], repeat: int, warm_up: bool = True) -> float:
    if warm_up:  # the seconds-long baselines have nothing to warm
        fn()
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def report(name: str, native_s: float, baseline: str, baseline_s: float) -> None:
    print(
        f"{name:<48} native {native_s * 1e3:9.2f} ms   {baseline} {baseline_s * 1e3:9.2f} ms"
        f"   ratio {baseline_s / native_s:7.1f}x",
        flush=True,
    )


def corpus() -> tuple[list[str], str]:
    """(terms, text): real words and real prose from the stdlib's docstrings."""
    root = Path(os.__file__).parent
    docs = "\n".join(
        doc
        for path in sorted(root.glob("*.py"))
        for doc in DOCSTRING.findall(path.read_text(encoding="utf-8", errors="replace"))
    )
    vocabulary = sorted(set(re.findall(r"[A-Za-z]{5,}", docs)))
    terms = random.Random(0).sample(vocabulary, NUM_TERMS)
    text = (docs * (TEXT_CHARS // len(docs) + 1))[:TEXT_CHARS]
    return terms, text


def bench_find_all(terms: list[str], text: str) -> None:
    matcher = _native.Matcher(terms)
    alternation = re.compile("|".join(map(re.escape, terms)))
    native = median_seconds(lambda: matcher.find_all(text), 10)
    baseline = median_seconds(lambda: list(alternation.finditer(text)), 3, warm_up=False)
    print(
        f"# {len(terms)} terms, {len(text):,} chars: {len(matcher.find_all(text)):,} matches "
        f"(all occurrences), re finds {sum(1 for _ in alternation.finditer(text)):,} "
        "(non-overlapping)"
    )
    report("find_all vs re alternation finditer", native, "re", baseline)

    reference = median_seconds(lambda: find_all_reference(text, terms), 1, warm_up=False)
    report("find_all vs reference (str.find per term)", native, "reference", reference)

    # A '#' (in no term) over the first character of every match leaves none:
    # contains() then scans the whole text, the same walk as find_all.
    chars = list(text)
    for start, _, _ in matcher.find_all(text):
        chars[start] = "#"
    absent = "".join(chars)
    assert not matcher.contains(absent)
    native = median_seconds(lambda: matcher.contains(absent), 10)
    baseline = median_seconds(lambda: alternation.search(absent), 1, warm_up=False)
    report("contains (no match) vs re search", native, "re", baseline)


def bench_options(terms: list[str], text: str) -> None:
    matcher = _native.Matcher(terms, case_insensitive=True, whole_words=True)
    pattern = re.compile(r"\b(?:" + "|".join(map(re.escape, terms)) + r")\b", re.IGNORECASE)
    native = median_seconds(lambda: matcher.find_all(text), 10)
    baseline = median_seconds(lambda: list(pattern.finditer(text)), 1, warm_up=False)
    report("find_all ci + whole words vs re \\b(?:..)\\b, I", native, "re", baseline)


def bench_stream(terms: list[str], text: str) -> None:
    """Token-sized chunks; the Python baseline re-searches the last longest-term
    characters plus each chunk, which is what finding split terms takes without
    an automaton that carries its state."""
    matcher = _native.Matcher(terms)
    alternation = re.compile("|".join(map(re.escape, terms)))
    text = text[:STREAM_CHARS]
    chunks = [text[i : i + CHUNK_CHARS] for i in range(0, len(text), CHUNK_CHARS)]
    overlap = max(map(len, terms)) - 1

    def native() -> None:
        stream = matcher.stream()
        for chunk in chunks:
            stream.feed(chunk)
        stream.finish()

    def baseline() -> None:
        window = ""
        for chunk in chunks:
            window = window[-overlap:] + chunk
            list(alternation.finditer(window))

    report(
        f"stream {len(chunks):,} feeds of {CHUNK_CHARS} chars vs re window",
        median_seconds(native, 5),
        "re",
        median_seconds(baseline, 1, warm_up=False),
    )


def main() -> None:
    terms, text = corpus()
    bench_find_all(terms, text)
    bench_options(terms, text)
    bench_stream(terms, text)


if __name__ == "__main__":
    main()
