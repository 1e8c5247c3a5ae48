"""tokenizer.json built from GGUF metadata vs an independent pure-Python byte-level BPE."""

from __future__ import annotations

import functools
import itertools
import unicodedata
from pathlib import Path

import pytest
from gguf import GGUFReader
from tokenizers import Tokenizer

from router.models.prepare import smollm2_gguf_path

TRICKY = [
    "Hello, world!",
    "1234567890 3.14159 -42 1e10 2026-11-25",
    "héllo wörld ñandú 日本語のテキスト Привет мир",
    "emoji 🎉👍🏽 family 👨‍👩‍👧 flags 🇫🇷",
    "def f(x):\n    return x ** 2  # square\n\n\tif a!=b: pass",
    "a  b   c\t\td\n\n\ne    ",
    "   leading spaces and trailing   ",
    "I'm sure you'll see we've DON'T they'd",
    "<|im_start|>user\nWhat is 2+2?<|im_end|>\n<|im_start|>assistant\n",
    "<|endoftext|><repo_name>x<file_sep>y<|im_end|>",
    "non\u00a0breaking\u2003em-space\u200bzero-width",
    "",
    "```python\nprint('hi')\n```",
]


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible byte → printable character table."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(0xA1, 0xAD)) + list(range(0xAE, 0x100))
    cs = list(bs)
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return {b: chr(c) for b, c in zip(bs, cs, strict=True)}


def _kind(ch: str) -> str:
    if ch.isspace():
        return "s"
    cat = unicodedata.category(ch)
    return "L" if cat.startswith("L") else "N" if cat.startswith("N") else "o"


def _gpt2_split(text: str) -> list[str]:
    """The GPT-2 pre-tokenizer regex, hand-written:
    's|'t|'re|'ve|'m|'ll|'d| ?\\p{L}+| ?\\p{N}+| ?[^\\s\\p{L}\\p{N}]+|\\s+(?!\\S)|\\s+"""
    out: list[str] = []
    i, n = 0, len(text)
    while i < n:
        for suffix in ("re", "ve", "ll", "s", "t", "m", "d"):
            if text[i] == "'" and text.startswith(suffix, i + 1):
                out.append(text[i : i + 1 + len(suffix)])
                i += 1 + len(suffix)
                break
        else:
            j = i + 1 if text[i] == " " and i + 1 < n and _kind(text[i + 1]) != "s" else i
            kind = _kind(text[j])
            if kind != "s":
                k = j + 1
                while k < n and _kind(text[k]) == kind:
                    k += 1
                out.append(text[i:k])
                i = k
                continue
            k = i
            while k < n and _kind(text[k]) == "s":
                k += 1
            # \s+(?!\S): leave the last space to prefix the next word, unless at the end.
            take = k - i if k == n or k - i == 1 else k - i - 1
            out.append(text[i : i + take])
            i += take
    return out


class ReferenceBPE:
    def __init__(self, tokens: list[str], merges: list[str], specials: list[str]) -> None:
        self.ids = {t: i for i, t in enumerate(tokens)}
        self.ranks = {tuple(m.split(" ", 1)): r for r, m in enumerate(merges)}
        self.specials = sorted(specials, key=len, reverse=True)
        self.byte_map = _bytes_to_unicode()

    @functools.cache  # noqa: B019 - the instance lives for the test session
    def _bpe(self, word: str) -> tuple[str, ...]:
        parts = list(word)
        while len(parts) > 1:
            pairs = [
                (self.ranks.get(pair, 1 << 30), i)
                for i, pair in enumerate(itertools.pairwise(parts))
            ]
            rank, i = min(pairs)
            if rank == 1 << 30:
                break
            parts[i : i + 2] = [parts[i] + parts[i + 1]]
        return tuple(parts)

    def encode(self, text: str) -> list[int]:
        ids: list[int] = []
        i = 0
        start = 0
        while i <= len(text):
            special = next((s for s in self.specials if text.startswith(s, i)), None)
            if special is not None or i == len(text):
                ids.extend(self._encode_plain(text[start:i]))
                if special is None:
                    break
                ids.append(self.ids[special])
                i += len(special)
                start = i
            else:
                i += 1
        return ids

    def _encode_plain(self, text: str) -> list[int]:
        ids: list[int] = []
        # SmolLM's pre-tokenizer: every digit alone first, then the GPT-2 regex.
        pieces: list[str] = []
        buf = ""
        for ch in text:
            if _kind(ch) == "N" and unicodedata.category(ch) in ("Nd", "Nl", "No"):
                if buf:
                    pieces.append(buf)
                pieces.append(ch)
                buf = ""
            else:
                buf += ch
        if buf:
            pieces.append(buf)
        for piece in pieces:
            for word in _gpt2_split(piece):
                mapped = "".join(self.byte_map[b] for b in word.encode("utf-8"))
                ids.extend(self.ids[t] for t in self._bpe(mapped))
        return ids


@pytest.fixture(scope="module")
def reference() -> ReferenceBPE:
    reader = GGUFReader(str(smollm2_gguf_path()))
    tokens = list(reader.fields["tokenizer.ggml.tokens"].contents())
    types = list(reader.fields["tokenizer.ggml.token_type"].contents())
    merges = list(reader.fields["tokenizer.ggml.merges"].contents())
    return ReferenceBPE(tokens, merges, [t for t, ty in zip(tokens, types, strict=True) if ty == 3])


@pytest.fixture(scope="module")
def tokenizer(prepared_models: dict[str, Path]) -> Tokenizer:
    return Tokenizer.from_file(str(prepared_models["smollm2-135m-instruct"] / "tokenizer.json"))


def test_reference_splitter_matches_known_gpt2_behaviour() -> None:
    # Guards the hand-written regex itself, so a shared bug cannot hide in both tokenizers.
    assert _gpt2_split("Hello  world's 42!!") == ["Hello", " ", " world", "'s", " 42", "!!"]
    assert _gpt2_split("a \n b  ") == ["a", " \n", " b", "  "]


@pytest.mark.parametrize("text", TRICKY)
def test_ids_equal_reference_bpe(tokenizer: Tokenizer, reference: ReferenceBPE, text: str) -> None:
    assert tokenizer.encode(text).ids == reference.encode(text)


@pytest.mark.parametrize("text", TRICKY)
def test_decode_round_trips(tokenizer: Tokenizer, text: str) -> None:
    ids = tokenizer.encode(text).ids
    assert tokenizer.decode(ids, skip_special_tokens=False) == text


def test_chat_tags_are_single_ids(tokenizer: Tokenizer) -> None:
    assert tokenizer.encode("<|im_start|>").ids == [1]
    assert tokenizer.encode("<|im_end|>").ids == [2]
    assert tokenizer.encode("<|endoftext|>").ids == [0]
    assert tokenizer.encode("x<|im_end|>y").ids[1] == 2


def test_digits_are_split_one_by_one(tokenizer: Tokenizer) -> None:
    assert tokenizer.encode("2026").tokens == ["2", "0", "2", "6"]
