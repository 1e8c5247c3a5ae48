"""Token-based chunking of texts longer than the embedding model's window.

A text whose tokens (special tokens included) fit the window is embedded whole. A longer one is
cut into spans of `window - specials` tokens (room for the tokenizer's [CLS]/[SEP] or whatever
its post-processor adds), each starting `CHUNK_OVERLAP` tokens before the previous one ended. Each
chunk's text is the original text sliced by the tokenizer's character offsets, and its embedding
input is the span's token ids wrapped in the special tokens, so it always fits the window (
re-tokenizing a slice that starts inside a word could take more tokens than the span).

A model served with no local tokenizer (a remote server, no artifact) is cut by the documented
estimate instead (`split_estimated`, router.serving.passthrough: 4 UTF-8 bytes a token): chunks of
at most three quarters of the window by that estimate, a quarter's margin for text denser in
tokens than English prose (a server refusing a chunk still too long fails the upsert with its
message, nothing stored), cut after whitespace where some lies in a chunk's last eighth, else at
a character boundary.

The proto has no chunking field, so the overlap is a module constant; the chunk size follows the
collection's embedding model."""

from __future__ import annotations

from dataclasses import dataclass

from tokenizers import Tokenizer

CHUNK_OVERLAP = 32  # tokens shared by consecutive chunks
ESTIMATED_FILL = 0.75  # of the window, by the estimate, that a chunk of split_estimated holds
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


def split_estimated(
    texts: list[str], window: int, *, bytes_per_token: int, overlap: int = CHUNK_OVERLAP
) -> list[list[Piece]]:
    """`split` for a model with no local tokenizer: windows of UTF-8 bytes standing for
    ESTIMATED_FILL of `window` tokens at `bytes_per_token` (see the module docstring); each
    Piece has no ids and its estimated tokens."""
    size = int(window * ESTIMATED_FILL)
    if size <= overlap:
        raise ValueError(f"window={window} leaves {size} tokens per chunk, not > overlap={overlap}")
    limit, back = size * bytes_per_token, overlap * bytes_per_token

    def piece(data: bytes) -> Piece:
        return Piece(data.decode("utf-8"), [], max(1, -(-len(data) // bytes_per_token)))

    out: list[list[Piece]] = []
    for text in texts:
        data = text.encode("utf-8")
        if len(data) <= limit:
            out.append([piece(data)])
            continue
        pieces = []
        start = 0
        while True:
            end = len(data) if start + limit >= len(data) else _cut(data, start + limit, limit // 8)
            pieces.append(piece(data[start:end]))
            if end == len(data):
                break
            # The next chunk starts `overlap` tokens back, after whitespace where some is near.
            start = _next_char(data, max(_after_space(data, end - back, back // 4, end), start + 1))
        out.append(pieces)
    return out


_SPACE = frozenset(b" \t\n\r\f\v")


def _cut(data: bytes, end: int, reach: int) -> int:
    """Where a chunk ending at most at `end` ends: after the last whitespace in the `reach`
    bytes before `end`, else at the character boundary at or before `end`."""
    for i in range(end - 1, end - 1 - reach, -1):
        if data[i] in _SPACE:
            return i + 1
    return _char_start(data, end)


def _after_space(data: bytes, start: int, reach: int, end: int) -> int:
    """Just after the first whitespace in the `reach` bytes from `start` (before `end`), else
    `start`."""
    for i in range(start, min(start + reach, end - 1)):
        if data[i] in _SPACE:
            return i + 1
    return start


def _next_char(data: bytes, i: int) -> int:
    """The start of the first UTF-8 character at or after byte `i`."""
    while i < len(data) and data[i] & 0xC0 == 0x80:
        i += 1
    return i


def _char_start(data: bytes, i: int) -> int:
    """The start of the UTF-8 character holding byte `i` (continuation bytes are 10xxxxxx)."""
    while 0 < i < len(data) and data[i] & 0xC0 == 0x80:
        i -= 1
    return i
