"""The streamed output of a call with tools, split into text and tool-call deltas.

The grammar (router/tools/grammar.py) makes the output either text that does not open a call, or
one or more lines `<tool_call>{"name": "f", "arguments": {...}}</tool_call>` joined by "\\n",
written compactly; so this is a small state machine over that exact form rather than a JSON
parser: it holds back only what may still be the start of a call, and streams each call's
arguments as their characters arrive (a depth count over the JSON object, aware of strings, says
where they end). Hand-written: no library streams partial JSON of a known envelope this way.
"""

from __future__ import annotations

import itertools
import os

from router.tools.grammar import CLOSE, OPEN
from router.tools.spec import ToolCall, ToolCallDelta

_HEAD = OPEN + '{"name": "'
_MIDDLE = '", "arguments": '
_TAIL = "}" + CLOSE
_ids = itertools.count(1)
_prefix = os.urandom(4).hex()


def new_call_id() -> str:
    """OpenAI-shaped (`call_...`), unique in this process and across processes."""
    return f"call_{_prefix}{next(_ids):08x}"


class ToolCallParser:
    """Feed the answer's text in pieces; get back (text, deltas) for each."""

    def __init__(self) -> None:
        self._mode = "detect"  # detect, text, head, name, middle, arguments, tail, between
        self._pending = ""  # detect and literal modes: what matched so far
        self._name = ""
        self._call_id = ""
        self._arguments: list[str] = []  # the current call's, whole
        self._chunk: list[str] = []  # the current call's, since the last delta
        self._depth = 0
        self._in_string = False
        self._escaped = False
        self.calls: list[ToolCall] = []

    @property
    def called(self) -> bool:
        """Whether the answer is calls (one has started), not text."""
        return self._mode not in ("detect", "text")

    def feed(self, text: str) -> tuple[str, list[ToolCallDelta]]:
        out: list[str] = []
        deltas: list[ToolCallDelta] = []
        for ch in text:
            mode = self._mode
            if mode == "text":
                out.append(ch)
            elif mode == "detect":
                self._pending += ch
                if not OPEN.startswith(self._pending):
                    self._mode = "text"
                    out.append(self._pending)
                    self._pending = ""
                elif self._pending == OPEN:
                    self._mode = "head"
            elif mode in ("head", "middle", "tail"):
                self._literal(ch, deltas)
            elif mode == "name":
                if ch == '"':
                    self._mode, self._pending = "middle", ch
                else:
                    self._name += ch
            elif mode == "arguments":
                self._arguments.append(ch)
                self._chunk.append(ch)
                self._scan(ch)
                if self._depth == 0:
                    self._flush(deltas)
                    arguments = "".join(self._arguments)
                    self.calls.append(ToolCall(self._call_id, self._name, arguments))
                    self._mode, self._pending = "tail", ""
            elif mode == "between" and ch == "\n":  # the next call's line
                self._mode, self._pending = "head", ""
        self._flush(deltas)
        return "".join(out), deltas

    def finish(self) -> str:
        """Text held back at the end: a start of `<tool_call>` that went no further."""
        if self._mode != "detect":
            return ""
        tail, self._pending = self._pending, ""
        return tail

    def _flush(self, deltas: list[ToolCallDelta]) -> None:
        if self._mode == "arguments" and self._chunk:
            deltas.append(ToolCallDelta(len(self.calls), arguments="".join(self._chunk)))
            self._chunk.clear()

    def _literal(self, ch: str, deltas: list[ToolCallDelta]) -> None:
        expected = {"head": _HEAD, "middle": _MIDDLE, "tail": _TAIL}[self._mode]
        self._pending += ch
        if not expected.startswith(self._pending):
            raise ValueError(f"tool call output does not follow its grammar at {self._pending!r}")
        if self._pending != expected:
            return
        self._pending = ""
        if self._mode == "head":
            self._mode, self._name = "name", ""
        elif self._mode == "middle":
            self._mode, self._call_id = "arguments", new_call_id()
            self._arguments, self._chunk = [], []
            self._depth, self._in_string, self._escaped = 0, False, False
            deltas.append(ToolCallDelta(len(self.calls), id=self._call_id, name=self._name))
        else:
            self._mode = "between"

    def _scan(self, ch: str) -> None:
        if self._in_string:
            if self._escaped:
                self._escaped = False
            elif ch == "\\":
                self._escaped = True
            elif ch == '"':
                self._in_string = False
        elif ch == '"':
            self._in_string = True
        elif ch in "{[":
            self._depth += 1
        elif ch in "}]":
            self._depth -= 1
