"""Tokenizing without stalling the event loop, and the cheap bound that refuses a text too big
to fit before any tokenizing.

HF tokenizers' `encode` holds the GIL for its whole run (measured: a 900 KB text, 0.73 s, and a
ticking thread got 3 ticks instead of ~680); `encode_batch` releases it (636 of ~650). A 1 MB
prompt tokenized on the loop therefore froze every other call for about a second, and sixteen
of them for half a minute. Texts longer than OFF_LOOP_CHARS are tokenized with `encode_batch`
on the process's worker thread (router.offload): big tokenizations queue behind each other there
(bounding their memory, ~200 bytes per token, and their CPU), while the loop keeps serving.
"""

from __future__ import annotations

import collections
import math
import re
import threading
from collections.abc import Callable, Sequence
from typing import TypeVar

from tokenizers import Encoding, Tokenizer

from router import offload
from router.errors import InvalidArgument

T = TypeVar("T")

OFF_LOOP_CHARS = 16_384
"""Texts up to this long are tokenized inline (about 10 ms at most); longer ones on the worker."""


async def off_loop(chars: int, fn: Callable[[], T]) -> T:
    """`fn()` (tokenizing `chars` characters) inline when short, else on the tokenizing
    worker, with the loop free meanwhile."""
    if chars <= OFF_LOOP_CHARS:
        return fn()
    return await offload.run(fn)


def encode_text(tokenizer: Tokenizer, text: str, *, add_special_tokens: bool) -> Encoding:
    """One text's encoding: a long one (the worker's) through `encode_batch`, which releases
    the GIL (see the module); a short one through `encode`, ~5 µs cheaper per call."""
    if len(text) <= OFF_LOOP_CHARS:
        return tokenizer.encode(text, add_special_tokens=add_special_tokens)
    return tokenizer.encode_batch([text], add_special_tokens=add_special_tokens)[0]


class PieceCache:
    """A rendered prompt's token ids with its pieces between added tokens (a chat template's
    turn markers) encoded once each and kept: a system prompt, or a conversation's earlier
    turns, come again call after call. Encoding them was a call's biggest cost on the event
    loop (py-spy over 16-call bursts sharing a ~300-token system prompt: 27% of the loop's
    samples; `encode` takes ~380 µs for those 356 tokens, AMD EPYC Zen 4).

    Exact because HF tokenizers splits the same way: it extracts added tokens first, then
    normalizes, pre-tokenizes and encodes each piece between them on its own. `create` makes
    one only where that split is plain (no added token strips its neighbours' spaces or
    matches whole words only, none matched after normalizing, special tokens not encoded as
    text, no truncation or padding of the whole) and a mixed sample encodes the same both
    ways; else None, and prompts are encoded whole. Why by hand: the tokenizers library has no
    cache across calls beyond its BPE word cache, which still pre-tokenizes and merges every
    call."""

    MAX_CHARS = 1 << 20
    """Characters of the pieces kept (~40 bytes of ids a token, ~4 characters a token: ~10 MB),
    least recently used dropped first."""

    def __init__(self, tokenizer: Tokenizer) -> None:
        added = tokenizer.get_added_tokens_decoder()
        self._tokenizer = tokenizer
        self._ids = {token.content: i for i, token in added.items()}
        contents = sorted(self._ids, key=len, reverse=True)  # longest first at one position
        self._split = re.compile("(" + "|".join(map(re.escape, contents)) + ")")
        self._pieces: collections.OrderedDict[str, list[int]] = collections.OrderedDict()
        self._chars = 0
        self._lock = threading.Lock()  # RAG's fitting tokenizes on the worker thread

    @classmethod
    def create(cls, tokenizer: Tokenizer) -> PieceCache | None:
        added = tokenizer.get_added_tokens_decoder().values()
        if (
            not added
            or tokenizer.encode_special_tokens
            or tokenizer.truncation is not None  # of the whole text, not of each piece
            or tokenizer.padding is not None
            # HF splits on normalized added tokens in a second pass: overlapping markers would
            # split differently.
            or any(t.lstrip or t.rstrip or t.single_word or t.normalized for t in added)
        ):
            return None
        cache = cls(tokenizer)
        markers = sorted(cache._ids)[:4]
        sample = f"{markers[0]} Héllo  wörld, 12345!\n{markers[-1]}\n\t{''.join(markers)} end "
        whole = tokenizer.encode(sample, add_special_tokens=False).ids
        return cache if cache.encode(sample) == whole else None

    def encode(self, text: str) -> list[int]:
        """`tokenizer.encode(text, add_special_tokens=False).ids`, from kept pieces."""
        ids: list[int] = []
        for i, piece in enumerate(self._split.split(text)):
            if i % 2:
                ids.append(self._ids[piece])
            elif piece:
                with self._lock:
                    kept = self._pieces.get(piece)
                    if kept is not None:
                        self._pieces.move_to_end(piece)
                if kept is None:
                    kept = self._tokenizer.encode(piece, add_special_tokens=False).ids
                    self._keep(piece, kept)
                ids.extend(kept)
        return ids

    def _keep(self, piece: str, ids: list[int]) -> None:
        if len(piece) > self.MAX_CHARS // 4:
            return
        with self._lock:
            if piece in self._pieces:
                return
            self._pieces[piece] = ids
            self._chars += len(piece)
            while self._chars > self.MAX_CHARS:
                self._chars -= len(self._pieces.popitem(last=False)[0])


def max_token_bytes(tokenizer: Tokenizer) -> int:
    """The most UTF-8 bytes one token stands for (a decoded token, plus 4 for a leading space
    a decoder may strip): a text of n bytes is at least n / this many tokens."""
    size = tokenizer.get_vocab_size(with_added_tokens=True)
    return 4 + max(
        len(tokenizer.decode([i], skip_special_tokens=False).encode()) for i in range(size)
    )


def check_fits(
    texts: Sequence[str], *, limit_tokens: int, token_bytes: int, what: str, field: str
) -> None:
    """Refuse texts whose UTF-8 bytes together prove they cannot fit `limit_tokens` whatever
    their tokens, without tokenizing them (a multi-megabyte prompt costs its parse, not a
    second of tokenizing). Characters are a lower bound on bytes and 4 x characters an upper
    one, so a text is encoded to count its bytes only when its length falls between."""
    if token_bytes <= 0:
        return
    limit = limit_tokens * token_bytes
    nbytes = sum(map(len, texts))
    if nbytes * 4 <= limit:
        return
    if nbytes <= limit:
        nbytes = sum(len(text.encode("utf-8", "replace")) for text in texts)
    check_bytes(nbytes, limit_tokens=limit_tokens, token_bytes=token_bytes, what=what, field=field)


def check_bytes(nbytes: int, *, limit_tokens: int, token_bytes: int, what: str, field: str) -> None:
    """`check_fits` for texts of `nbytes` UTF-8 bytes in all."""
    limit = limit_tokens * token_bytes
    if token_bytes <= 0 or nbytes <= limit:
        return
    raise InvalidArgument(
        f"{field} has at least {nbytes} bytes, hence at least "
        f"{math.ceil(nbytes / token_bytes)} tokens (the longest token of {what} is "
        f"{token_bytes} bytes); {what} takes at most {limit_tokens}",
        field=field,
    )
