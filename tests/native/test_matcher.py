from __future__ import annotations

import gc
import random
import sys
import threading
import time
from collections.abc import Callable

import pytest

from loadtest.benchmarks.native_reference import find_all_reference, holdback_reference
from router import _native

Match = tuple[int, int, int]

# Small alphabets so that random patterns occur, overlap and straddle chunk
# boundaries often; multi-byte characters of every UTF-8 length.
ASCII = "abhers_ 1."
MIXED = "abAB_ .éÉ東京😀"
PLACES = ["he", "she", "his", "hers", "東京", "é", "😀", "a😀b", "É"]


def make_text(rng: random.Random, alphabet: str, length: int) -> str:
    return "".join(rng.choice(alphabet) for _ in range(length))


def make_patterns(rng: random.Random, alphabet: str, text: str, count: int) -> list[str]:
    """Random short patterns, some cut from the text so that they surely occur."""
    patterns = []
    for _ in range(count):
        if text and rng.random() < 0.5:
            start = rng.randrange(len(text))
            patterns.append(text[start : start + rng.randint(1, 6)])
        else:
            patterns.append(make_text(rng, alphabet, rng.randint(1, 4)))
    return patterns


def make_chunks(rng: random.Random, text: str) -> list[str]:
    chunks, i = [], 0
    while i < len(text):
        size = rng.choice([0, 1, 1, 2, 3, 5, 8])
        chunks.append(text[i : i + size])
        i += size
    return chunks


def expected_feeds(
    chunks: list[str], patterns: list[str], *, case_insensitive: bool, whole_words: bool
) -> tuple[list[list[Match]], list[Match]]:
    """What each feed() and then finish() should return: a match is reported by the
    chunk holding its last character, or with whole_words by the first non-empty
    chunk after it (which shows the next character), or by finish() at the end."""
    text = "".join(chunks)
    matches = find_all_reference(
        text, patterns, case_insensitive=case_insensitive, whole_words=whole_words
    )
    feeds, before = [], 0
    for chunk in chunks:
        after = before + len(chunk)
        if whole_words:
            feeds.append([m for m in matches if chunk and before <= m[1] < after])
        else:
            feeds.append([m for m in matches if before < m[1] <= after])
        before = after
    finish = [m for m in matches if whole_words and m[1] == len(text)]
    return feeds, finish


def check_stream(
    chunks: list[str], patterns: list[str], *, case_insensitive: bool, whole_words: bool
) -> None:
    options = {"case_insensitive": case_insensitive, "whole_words": whole_words}
    stream = _native.Matcher(patterns, **options).stream()
    feeds, finish = expected_feeds(chunks, patterns, **options)
    fed = ""
    for chunk, expected in zip(chunks, feeds, strict=True):
        assert stream.feed(chunk) == expected, (chunks, fed, chunk)
        fed += chunk
        assert stream.position == len(fed)
        assert stream.holdback() == holdback_reference(fed, patterns, **options), (chunks, fed)
    assert stream.finish() == finish
    assert stream.holdback() == 0


# ------------------------------------------------------------------ find_all / contains


@pytest.mark.parametrize("whole_words", [False, True])
@pytest.mark.parametrize("case_insensitive", [False, True])
@pytest.mark.parametrize("alphabet", [ASCII, MIXED], ids=["ascii", "unicode"])
@pytest.mark.parametrize("seed", range(40))
def test_find_all_matches_reference(
    seed: int, alphabet: str, case_insensitive: bool, whole_words: bool
) -> None:
    rng = random.Random(seed)
    text = make_text(rng, alphabet, rng.randint(0, 200))
    patterns = make_patterns(rng, alphabet, text, rng.randint(1, 30))
    matcher = _native.Matcher(patterns, case_insensitive=case_insensitive, whole_words=whole_words)
    expected = find_all_reference(
        text, patterns, case_insensitive=case_insensitive, whole_words=whole_words
    )
    assert matcher.find_all(text) == expected
    assert matcher.contains(text) is bool(expected)


def test_overlapping_patterns_all_reported_sorted_by_end_then_id() -> None:
    matcher = _native.Matcher(["hers", "he", "she", "his"])
    assert matcher.num_patterns == 4
    assert matcher.find_all("ushers") == [(2, 4, 1), (1, 4, 2), (2, 6, 0)]


def test_offsets_are_characters_not_bytes() -> None:
    matcher = _native.Matcher(PLACES)
    text = "東京 é 😀 a😀b"
    assert matcher.find_all(text) == find_all_reference(text, PLACES)
    assert matcher.find_all(text) == [(0, 2, 4), (3, 4, 5), (5, 6, 6), (8, 9, 6), (7, 10, 7)]


def test_case_insensitive_folds_ascii_only() -> None:
    matcher = _native.Matcher(["Café", "東京"], case_insensitive=True)
    assert matcher.find_all("CAFé cafÉ café 東京") == [(0, 4, 0), (10, 14, 0), (15, 17, 1)]
    assert not _native.Matcher(["abc"]).contains("ABC")


def test_whole_words_checks_ascii_word_neighbours() -> None:
    matcher = _native.Matcher(["cat", "a b"], whole_words=True)
    text = "cat concat cats cat_ _cat 9cat cat. (cat) a b ab café cat"
    starts = [s for s, _, pid in matcher.find_all(text) if pid == 0]
    assert [text[s - 1 : s + 4] for s in starts[1:]] == [" cat.", "(cat)", " cat"]
    assert starts[0] == 0
    assert [m for m in matcher.find_all(text) if m[2] == 1] == [(42, 45, 1)]
    # Non-ASCII characters are boundaries (no Unicode word classes).
    assert _native.Matcher(["caf"], whole_words=True).find_all("café") == [(0, 3, 0)]


def test_duplicate_patterns_report_every_id() -> None:
    matcher = _native.Matcher(["ab", "b", "ab"])
    assert matcher.find_all("xab") == [(1, 3, 0), (2, 3, 1), (1, 3, 2)]


def test_no_patterns_never_match() -> None:
    matcher = _native.Matcher([])
    assert matcher.num_patterns == 0
    assert matcher.find_all("anything 東京") == []
    assert not matcher.contains("anything")
    stream = matcher.stream()
    assert stream.feed("abc") == [] and stream.holdback() == 0


def test_large_text_uses_the_same_semantics() -> None:
    """Texts above the GIL-release threshold take the copying path."""
    rng = random.Random(7)
    text = make_text(rng, MIXED, 60_000)
    patterns = ["ab", "東京😀", "a a", "É_"]
    for options in [{}, {"case_insensitive": True, "whole_words": True}]:
        matcher = _native.Matcher(patterns, **options)
        expected = find_all_reference(text, patterns, **options)
        assert len(expected) > 100
        assert matcher.find_all(text) == expected
        assert matcher.contains(text)
        stream = matcher.stream()
        got = stream.feed(text[:50_001]) + stream.feed(text[50_001:]) + stream.finish()
        assert got == expected


# ------------------------------------------------------------------------- streaming


@pytest.mark.parametrize("whole_words", [False, True])
@pytest.mark.parametrize("case_insensitive", [False, True])
def test_stream_split_at_every_pair_of_positions(case_insensitive: bool, whole_words: bool) -> None:
    text = "she sells his hers 東京😀a😀b Éé ushers"
    patterns = [*PLACES, "hers ", "s h", "Ushers"]
    for i in range(len(text) + 1):
        for j in range(i, len(text) + 1):
            check_stream(
                [text[:i], text[i:j], text[j:]],
                patterns,
                case_insensitive=case_insensitive,
                whole_words=whole_words,
            )


@pytest.mark.parametrize("whole_words", [False, True])
@pytest.mark.parametrize("case_insensitive", [False, True])
@pytest.mark.parametrize("alphabet", [ASCII, MIXED], ids=["ascii", "unicode"])
@pytest.mark.parametrize("seed", range(25))
def test_stream_random_chunks_match_reference(
    seed: int, alphabet: str, case_insensitive: bool, whole_words: bool
) -> None:
    rng = random.Random(1000 + seed)
    text = make_text(rng, alphabet, rng.randint(0, 120))
    patterns = make_patterns(rng, alphabet, text, rng.randint(1, 12))
    check_stream(
        make_chunks(rng, text),
        patterns,
        case_insensitive=case_insensitive,
        whole_words=whole_words,
    )


def test_stream_holds_back_a_term_until_it_is_decided() -> None:
    stream = _native.Matcher(["secret", "sec"], whole_words=True).stream()
    assert stream.feed("the sec") == []
    assert stream.holdback() == 3  # "sec" may become "secret" or stand alone
    assert stream.feed("re") == []
    assert stream.holdback() == 5
    assert stream.feed("t") == []
    assert stream.holdback() == 6  # "secret" is complete but "secrets" would not count
    assert stream.feed("!") == [(4, 10, 0)]
    assert stream.holdback() == 0
    assert stream.feed("sec") == []
    assert stream.finish() == [(11, 14, 1)]


def test_stream_without_whole_words_reports_at_once() -> None:
    stream = _native.Matcher(["bad"]).stream()
    assert stream.feed("ba") == [] and stream.holdback() == 2
    assert stream.feed("d") == [(0, 3, 0)]
    assert stream.holdback() == 0  # reported, and no longer pattern starts here
    assert stream.finish() == []


def test_stream_finish_is_final() -> None:
    stream = _native.Matcher(["a"]).stream()
    stream.feed("a")
    assert stream.finish() == [] and stream.finish() == []
    with pytest.raises(RuntimeError, match="after finish"):
        stream.feed("a")
    assert stream.position == 1


def test_stream_outlives_its_matcher() -> None:
    matcher = _native.Matcher(["東京"])
    stream = matcher.stream()
    del matcher
    gc.collect()
    assert stream.feed("東") == [] and stream.feed("京") == [(0, 2, 0)]


def test_streams_are_independent() -> None:
    matcher = _native.Matcher(["abc"])
    first, second = matcher.stream(), matcher.stream()
    first.feed("ab")
    assert second.feed("c") == []
    assert first.feed("c") == [(0, 3, 0)]


# ------------------------------------------------------------------------- bad input


def test_empty_pattern_names_its_index() -> None:
    with pytest.raises(ValueError, match=r"patterns\[2\] is empty"):
        _native.Matcher(["a", "b", "", "c"])


@pytest.mark.parametrize("patterns", ["abc", ["a", 1], [b"a"], None])
def test_patterns_must_be_a_sequence_of_str(patterns: object) -> None:
    with pytest.raises(TypeError):
        _native.Matcher(patterns)  # type: ignore[arg-type]


def test_text_must_be_str() -> None:
    matcher = _native.Matcher(["a"])
    for call in (matcher.find_all, matcher.contains, matcher.stream().feed):
        with pytest.raises(TypeError):
            call(b"a")  # type: ignore[arg-type]
        with pytest.raises(TypeError):
            call(None)  # type: ignore[arg-type]


def test_lone_surrogates_are_rejected() -> None:
    with pytest.raises(UnicodeEncodeError):
        _native.Matcher(["a"]).find_all("a\ud800")
    with pytest.raises(UnicodeEncodeError):
        _native.Matcher(["\udc00"])


def test_stream_cannot_be_constructed_directly() -> None:
    with pytest.raises(TypeError):
        _native.MatcherStream()


# ------------------------------------------------------------------------------- GIL


def runs_other_threads(call: Callable[[], object]) -> bool:
    """Whether another Python thread ran while call() was inside native code.

    With a huge switch interval the interpreter never takes the GIL away from this
    thread; the ticker can only run while the GIL is released (by call(), or by its
    own time.sleep(0) once it holds it). So ticks during call() mean call() released it.
    """
    stop = threading.Event()
    ticks = 0

    def ticker() -> None:
        nonlocal ticks
        while not stop.is_set():
            ticks += 1
            time.sleep(0)

    interval = sys.getswitchinterval()
    thread = threading.Thread(target=ticker)
    sys.setswitchinterval(1000.0)
    try:
        thread.start()
        for _ in range(20):  # the OS may not schedule the ticker within one call
            before = ticks
            call()
            if ticks != before:
                return True
        return False
    finally:
        stop.set()
        thread.join()
        sys.setswitchinterval(interval)


@pytest.mark.parametrize("method", ["find_all", "contains", "feed"])
def test_large_inputs_release_the_gil(method: str) -> None:
    matcher = _native.Matcher(["never present", "zzz"])
    text = "the quick brown fox jumps over the lazy dog. " * 100_000  # 4.5 MB
    call = {
        "find_all": lambda: matcher.find_all(text),
        "contains": lambda: matcher.contains(text),
        "feed": lambda: matcher.stream().feed(text),
    }[method]
    assert runs_other_threads(call)


def test_one_matcher_from_many_threads() -> None:
    matcher = _native.Matcher(["fox", "dog", "the"], whole_words=True)
    text = "the quick brown fox jumps over the lazy dog. " * 2_000
    expected = matcher.find_all(text)
    results: list[list[Match]] = []

    def work() -> None:
        results.append(matcher.find_all(text))

    threads = [threading.Thread(target=work) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(expected) == 4 * 2_000 and results == [expected] * 4
