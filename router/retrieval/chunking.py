"""Token-based chunking of texts longer than the embedding model's window.

A text whose tokens (special tokens included) fit the window is embedded whole. A longer one is
cut into spans of `window - specials` tokens (room for the tokenizer's [CLS]/[SEP] or whatever
its post-processor adds), each starting `CHUNK_OVERLAP` tokens before the previous one ended. Each
chunk's text is the original text sliced by the tokenizer's character offsets, and its embedding
input is the span's token ids wrapped in the special tokens, so it always fits the window (
re-tokenizing a slice that starts inside a word could take more tokens than the span).

The proto has no chunking field, so the overlap is a module constant; the chunk size follows the
collection's embedding model."""

from __future__ import annotations

from dataclasses import dataclass

from tokenizers import Tokenizer

CHUNK_OVERLAP = 32  # tokens shared by consecutive chunks
CHUNK_SEPARATOR = "#"  # chunk n of parent P has id f"{P}#{n}"
PARENT_KEY = "parent_id"  # string metadata naming a chunk's parent document

_PROBE = "probe"


@dataclass(frozen=True, slots=True)
class Piece:
    """A text to embed: its token ids (special tokens included) and the text they stand for."""

    text: str
    ids: list[int]
    tokens: int = -1
    """Tokens it stands for when there are no ids (a model with no local tokenizer: the
    estimate of router.serving.passthrough); -1: len(ids)."""

    @property
    def num_tokens(self) -> int:
        return len(self.ids) if self.tokens < 0 else self.tokens


def chunk_id(parent: str, n: int) -> str:
    return f"{parent}{CHUNK_SEPARATOR}{n}"


def special_tokens(tokenizer: Tokenizer) -> tuple[list[int], list[int]]:
    """The ids the tokenizer puts before and after a single text's tokens."""
    bare = tokenizer.encode(_PROBE, add_special_tokens=False).ids
    full = tokenizer.encode(_PROBE).ids
    for start in range(len(full) - len(bare) + 1):
        if full[start : start + len(bare)] == bare:
            return full[:start], full[start + len(bare) :]
    raise ValueError("the tokenizer's special tokens surround the text in an unexpected way")


def split(
    tokenizer: Tokenizer, texts: list[str], window: int, *, overlap: int = CHUNK_OVERLAP
) -> list[list[Piece]]:
    """For each text, one Piece when it fits `window` tokens, else its overlapping chunks."""
    prefix, suffix = special_tokens(tokenizer)
    size = window - len(prefix) - len(suffix)
    if size <= overlap:
        raise ValueError(f"window={window} leaves {size} tokens per chunk, not > overlap={overlap}")
    out: list[list[Piece]] = []
    for text, enc in zip(
        texts, tokenizer.encode_batch(texts, add_special_tokens=False), strict=True
    ):
        ids, offsets = enc.ids, enc.offsets
        if len(ids) <= size:
            out.append([Piece(text, prefix + ids + suffix)])
            continue
        pieces = []
        start = 0
        while True:
            end = min(start + size, len(ids))
            span = text[offsets[start][0] : offsets[end - 1][1]]
            pieces.append(Piece(span, prefix + ids[start:end] + suffix))
            if end == len(ids):
                break
            start = end - overlap
        out.append(pieces)
    return out
