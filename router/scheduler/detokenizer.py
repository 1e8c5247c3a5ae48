"""Incremental detokenization with stop strings.

A character can span several byte-level BPE tokens, so decoding one token at a time would emit
broken UTF-8. Like vLLM and transformers' TextStreamer we decode a short window of tokens and only
release text once it no longer ends in U+FFFD (an incomplete character). Stop strings are matched on
the text; the tail that could still become a stop string is held back until it cannot.
"""

from __future__ import annotations

from typing import Protocol, runtime_checkable


class TokenDecoder(Protocol):
    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str: ...


class Encoding(Protocol):
    @property
    def ids(self) -> list[int]: ...


@runtime_checkable
class TokenCodec(TokenDecoder, Protocol):
    """A tokenizer (tokenizers.Tokenizer): decodes and encodes."""

    def encode(self, sequence: str, add_special_tokens: bool = True) -> Encoding: ...


class StopStrings:
    """Cuts a text stream at the first stop string, holding back a tail that could still begin
    one until it cannot."""

    __slots__ = ("_held", "_hold", "_stop")

    def __init__(self, stop: tuple[str, ...] = ()) -> None:
        self._stop = stop
        self._hold = max((len(s) for s in stop), default=1) - 1
        self._held = ""  # text received but not yet emitted (could begin a stop string)

    def feed(self, delta: str) -> tuple[str, bool]:
        """Feed new text; return (text safe to emit now, whether a stop string was hit)."""
        text = self._held + delta
        if self._stop:
            cut = min((i for i in (text.find(s) for s in self._stop) if i >= 0), default=-1)
            if cut >= 0:
                self._held = ""
                return text[:cut], True
            if self._hold:
                self._held = text[-self._hold :]
                return text[: -self._hold], False
        return text, False

    def flush(self) -> str:
        """Text still held back at the end of the sequence."""
        held, self._held = self._held, ""
        return held


class Detokenizer:
    __slots__ = ("_decoder", "_ids", "_prefix", "_read", "_stops")

    def __init__(self, decoder: TokenDecoder, stop: tuple[str, ...] = ()) -> None:
        self._decoder = decoder
        self._ids: list[int] = []
        self._prefix = 0  # window start
        self._read = 0  # tokens whose text is already released into _stops
        self._stops = StopStrings(stop)

    def add(self, token: int) -> tuple[str, bool]:
        """Feed one token; return (text safe to emit now, whether a stop string was hit)."""
        self._ids.append(token)
        window = self._ids[self._prefix :]
        new_text = self._decoder.decode(window)
        if new_text.endswith("\ufffd"):
            return "", False  # wait for the rest of the character
        return self._release(new_text)

    def _release(self, window_text: str) -> tuple[str, bool]:
        """Pass on the text of the window's tokens not released yet (`window_text`: all the
        window's); the window then starts at the first of them."""
        prefix_text = self._decoder.decode(self._ids[self._prefix : self._read])
        delta = window_text[len(prefix_text) :]
        self._prefix = self._read
        self._read = len(self._ids)
        if not delta:
            return "", False
        return self._stops.feed(delta)

    def flush(self) -> str:
        """Text still held back at the end of the sequence: a tail that could have begun a
        stop string, and the tokens of a character the sequence ended inside (as U+FFFD, as
        decoding all its tokens gives them: nothing generated goes unsaid)."""
        released, hit = "", False
        if self._read < len(self._ids):
            released, hit = self._release(self._decoder.decode(self._ids[self._prefix :]))
        return released if hit else released + self._stops.flush()
