from __future__ import annotations

from pathlib import Path

import pytest
from tokenizers import Tokenizer

from router.scheduler.detokenizer import Detokenizer

TEXTS = [
    "Hello, world! Ça va? 東京タワー 🙂👍🏽 naïve café — ∑x² ≠ 0",
    "def f(x):\n    return x**2  # 🐍\n\n\tdone",
    "emoji family 👨‍👩‍👧‍👦 and flags 🇫🇷🇯🇵",
]


@pytest.fixture(scope="module")
def tokenizer(model_cache: Path) -> Tokenizer:
    return Tokenizer.from_file(str(model_cache / "smollm2-135m-instruct" / "tokenizer.json"))


def stream(
    tokenizer: Tokenizer, ids: list[int], stop: tuple[str, ...] = ()
) -> tuple[list[str], bool]:
    detok = Detokenizer(tokenizer, stop)
    pieces = []
    hit = False
    for token in ids:
        text, hit = detok.add(token)
        pieces.append(text)
        if hit:
            break
    if not hit:
        pieces.append(detok.flush())
    return pieces, hit


@pytest.mark.parametrize("text", TEXTS)
def test_pieces_are_whole_characters_and_add_up(tokenizer: Tokenizer, text: str) -> None:
    ids = tokenizer.encode(text, add_special_tokens=False).ids
    assert len(ids) > len(text.split())  # multi-token characters are really exercised
    pieces, hit = stream(tokenizer, ids)
    assert not hit
    assert all("\ufffd" not in p for p in pieces)
    assert "".join(pieces) == text


def test_a_character_cut_by_the_end_is_flushed_as_the_whole_decode_gives_it(
    tokenizer: Tokenizer,
) -> None:
    ids = tokenizer.encode("Tokyo 東京", add_special_tokens=False).ids
    cut = ids[:-1]  # the last character's final byte never came (max_tokens ended it)
    assert tokenizer.decode(cut).endswith("\ufffd")
    pieces, hit = stream(tokenizer, cut)
    assert not hit and "".join(pieces) == tokenizer.decode(cut)
    assert "\ufffd" in pieces[-1]  # from flush(), not before


def test_stop_string_cuts_before_it_and_is_never_emitted(tokenizer: Tokenizer) -> None:
    text = "The answer is 42. Stop here. More text follows."
    ids = tokenizer.encode(text, add_special_tokens=False).ids
    pieces, hit = stream(tokenizer, ids, stop=("Stop here",))
    assert hit
    assert "".join(pieces) == "The answer is 42. "


def test_stop_string_spanning_tokens_and_unicode(tokenizer: Tokenizer) -> None:
    text = "Numbers: 1, 2, 3 東京 4, 5"
    ids = tokenizer.encode(text, add_special_tokens=False).ids
    pieces, hit = stream(tokenizer, ids, stop=("zzz", "3 東"))
    assert hit and "".join(pieces) == "Numbers: 1, 2, "


def test_held_back_prefix_is_released_when_no_stop_follows(tokenizer: Tokenizer) -> None:
    text = "abc Sto"
    ids = tokenizer.encode(text, add_special_tokens=False).ids
    pieces, hit = stream(tokenizer, ids, stop=("Stop",))
    assert not hit and "".join(pieces) == text
