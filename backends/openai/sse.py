"""Server-sent events (the `text/event-stream` format of the WHATWG HTML spec), decoded line by
line: what OpenAI-compatible servers stream completions in.

Only `data` matters to those servers; `event`, `id` and `retry` are read past, and comment
lines (a leading ':', e.g. sse-starlette's pings) are skipped.
"""

from __future__ import annotations


class SSEDecoder:
    """Feed it the lines of a stream (without their line ending); it returns each event's data.

    An event ends at a blank line; its data is the values of its `data:` lines joined by
    newlines. An event with no `data` line is dropped, as the spec says.
    """

    __slots__ = ("_data",)

    def __init__(self) -> None:
        self._data: list[str] = []

    def feed(self, line: str) -> str | None:
        """The data of the event this line completes, or None."""
        if not line:
            return self.flush()
        if line.startswith("data:"):
            value = line[5:]
            self._data.append(value[1:] if value.startswith(" ") else value)
        # Comments (":...") and the other fields carry nothing a completion needs.
        return None

    def flush(self) -> str | None:
        """The data gathered since the last event, or None; called at a blank line, and at the
        end of the stream for an event the server did not terminate (the spec drops that one;
        the OpenAI client reads it, and so does our engine)."""
        if not self._data:
            return None
        data = "\n".join(self._data)
        self._data.clear()
        return data
