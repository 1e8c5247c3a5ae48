"""router.serving.tokenize: long texts are tokenized off the event loop, and a text too big to
fit is refused from its size alone."""

from __future__ import annotations

import asyncio
import random
import threading
from pathlib import Path

import pytest
from tokenizers import AddedToken, Tokenizer

from router.errors import InvalidArgument
from router.serving import tokenize

GEN = "smollm2-135m-instruct"


async def test_a_long_text_is_tokenized_while_the_loop_keeps_serving() -> None:
    loop_ran = threading.Event()

    def work() -> str:
        # Inline on the loop this would wait for a task that cannot run, and time out.
        assert loop_ran.wait(timeout=10), "the loop was blocked while tokenizing"
        return threading.current_thread().name

    async def other_call() -> None:
        loop_ran.set()

    task = asyncio.get_running_loop().create_task(other_call())
    thread = await tokenize.off_loop(tokenize.OFF_LOOP_CHARS + 1, work)
    await task
    assert thread.startswith("irouter-offload")


async def test_a_short_text_is_tokenized_inline() -> None:
    thread = await tokenize.off_loop(10, lambda: threading.current_thread().name)
    assert thread == threading.current_thread().name


def test_encode_text_matches_encode_short_and_long(model_cache: Path) -> None:
    tokenizer = Tokenizer.from_file(str(model_cache / GEN / "tokenizer.json"))
    text = "Hello, world. " * 50 + "naïve café 東京"
    for sample in (text, text * (tokenize.OFF_LOOP_CHARS // len(text) + 1)):
        one = tokenize.encode_text(tokenizer, sample, add_special_tokens=False)
        assert one.ids == tokenizer.encode(sample, add_special_tokens=False).ids


def test_no_text_has_more_bytes_per_token_than_the_bound(model_cache: Path) -> None:
    tokenizer = Tokenizer.from_file(str(model_cache / GEN / "tokenizer.json"))
    bound = tokenize.max_token_bytes(tokenizer)
    for text in (" " * 5000, "a" * 5000, "\n" * 3000, "=" * 4000, "东京" * 1000, "0" * 999):
        ids = tokenizer.encode(text, add_special_tokens=False).ids
        assert len(text.encode()) <= len(ids) * bound, text[:10]


def test_check_fits_refuses_from_the_size_alone() -> None:
    fits = "a" * 1000
    tokenize.check_fits([fits], limit_tokens=100, token_bytes=10, what="model 'm'", field="prompt")
    with pytest.raises(
        InvalidArgument, match=r"prompt has at least 1001 bytes, hence at least 101 tokens"
    ) as e:
        tokenize.check_fits(
            [fits[:500], "a" * 501],
            limit_tokens=100,
            token_bytes=10,
            what="model 'm'",
            field="prompt",
        )
    assert e.value.field == "prompt"
    tokenize.check_fits(["x" * 10**6], limit_tokens=1, token_bytes=0, what="m", field="f")
    # Multi-byte text: counted in bytes, not characters (334 x 3 bytes > 1000).
    with pytest.raises(InvalidArgument, match="at least 1002 bytes"):
        tokenize.check_fits(["東" * 334], limit_tokens=100, token_bytes=10, what="m", field="f")


def _chat_texts(seed: int, count: int) -> list[str]:
    """Rendered-prompt-like texts: turn markers around varied content, markers inside words
    and side by side, spaces and newlines at every edge, digits, accents, CJK, emoji."""
    rng = random.Random(seed)
    words = ["Hello", " world", "  ", "\n", "\t", "12:05", "naïve", "東京", "🙂", "a", "'s", "?"]
    markers = ["<|im_start|>", "<|im_end|>", "<|endoftext|>"]
    texts = []
    for _ in range(count):
        parts = []
        for _ in range(rng.randint(1, 12)):
            parts.append(rng.choice(markers) if rng.random() < 0.3 else "")
            parts.append("".join(rng.choice(words) for _ in range(rng.randint(0, 8))))
        texts.append("".join(parts))
    return texts


def test_the_piece_cache_encodes_as_the_tokenizer_does(model_cache: Path) -> None:
    tokenizer = Tokenizer.from_file(str(model_cache / GEN / "tokenizer.json"))
    pieces = tokenize.PieceCache.create(tokenizer)
    assert pieces is not None
    system = "You are a helpful assistant. " * 20
    chats = [
        f"<|im_start|>system\n{system}<|im_end|>\n<|im_start|>user\n{q}<|im_end|>\n"
        "<|im_start|>assistant\n"
        for q in ("Hi!", " Hi!", "Hi!\n", "")
    ]
    for text in [*chats, *_chat_texts(0, 300)] * 2:  # each encoded from new pieces, then kept
        assert pieces.encode(text) == tokenizer.encode(text, add_special_tokens=False).ids, text


def test_the_piece_cache_keeps_a_bounded_number_of_characters(
    model_cache: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    tokenizer = Tokenizer.from_file(str(model_cache / GEN / "tokenizer.json"))
    pieces = tokenize.PieceCache.create(tokenizer)
    assert pieces is not None
    monkeypatch.setattr(pieces, "MAX_CHARS", 200)
    for text in _chat_texts(1, 200):
        assert pieces.encode(text) == tokenizer.encode(text, add_special_tokens=False).ids
        assert pieces._chars == sum(map(len, pieces._pieces)) <= 200


def test_no_piece_cache_where_an_added_token_takes_its_neighbours_spaces(
    model_cache: Path,
) -> None:
    tokenizer = Tokenizer.from_file(str(model_cache / GEN / "tokenizer.json"))
    tokenizer.add_special_tokens([AddedToken("<|tool|>", lstrip=True)])
    # Split at the marker, " a" and "b" would lose their space to it: not the same ids.
    assert tokenize.PieceCache.create(tokenizer) is None
    tokenizer = Tokenizer.from_file(str(model_cache / GEN / "tokenizer.json"))
    tokenizer.encode_special_tokens = True  # markers encoded as text: no split at all
    assert tokenize.PieceCache.create(tokenizer) is None
    # HF splits on normalized added tokens in a second pass: "<tool_call>" is "<tool" then
    # text for it, "ol_call>" for a single split.
    tokenizer = Tokenizer.from_file(str(model_cache / GEN / "tokenizer.json"))
    tokenizer.add_tokens([AddedToken("<tool", normalized=True)])
    tokenizer.add_special_tokens([AddedToken("ol_call>", normalized=False)])
    assert tokenize.PieceCache.create(tokenizer) is None


def test_no_piece_cache_where_the_whole_text_is_truncated(model_cache: Path) -> None:
    # The embedding model's tokenizer cuts a text at 256 tokens; pieces cut alone would not.
    tokenizer = Tokenizer.from_file(str(model_cache / "all-minilm-l6-v2" / "tokenizer.json"))
    assert tokenizer.truncation is not None
    assert tokenize.PieceCache.create(tokenizer) is None
