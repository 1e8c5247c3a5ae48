"""router.serving.tokenize: long texts are tokenized off the event loop, and a text too big to
fit is refused from its size alone."""

from __future__ import annotations

import asyncio
import threading
from pathlib import Path

import pytest
from tokenizers import Tokenizer

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
