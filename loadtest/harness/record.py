"""One request's measurements, and the column layout they take in the results JSON."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from loadtest.harness.scenario import STREAMING_METHODS

OK = "OK"


@dataclass(slots=True)
class RequestRecord:
    """Times are seconds; `start`/`end` are relative to the stage's common start instant once the
    runner has shifted them (targets fill in absolute `time.perf_counter()` values)."""

    method: str
    """Method name as in the scenario mix."""
    start: float
    """When the request was sent."""
    end: float = 0.0
    """When the last byte of the answer arrived (or the error)."""
    status: str = OK
    """'OK', 'grpc:<CODE>', 'http:<status>', 'stream:error' or 'client:<exception>'."""
    ttft: float | None = None
    """Time to first token (first content chunk; the whole answer when not streamed)."""
    itl: list[float] = field(default_factory=list)
    """Gaps between consecutive content chunks of a stream."""
    input_tokens: int = 0
    """Prompt tokens as reported by the server (0 when it reports none)."""
    output_tokens: int = 0
    """Completion tokens as reported by the server (chunks counted when it reports none)."""
    lag: float = 0.0
    """Open loop: how late the request left after its scheduled arrival (client saturation)."""
    error: str = ""
    """First 200 characters of the error message."""
    retry_after: float | None = None
    """The delay a shed call was told to wait before retrying (RetryInfo), if any."""
    process: int = 0
    """Client process that sent it."""

    @property
    def ok(self) -> bool:
        return self.status == OK

    @property
    def e2e(self) -> float:
        return self.end - self.start

    @property
    def tpot(self) -> float | None:
        """Time per output token after the first: (e2e - ttft) / (output_tokens - 1); streams
        only (a whole answer's tokens all arrive at once)."""
        if self.ttft is None or self.output_tokens < 2 or self.method not in STREAMING_METHODS:
            return None
        return (self.e2e - self.ttft) / (self.output_tokens - 1)

    def shifted(self, t0: float) -> RequestRecord:
        self.start -= t0
        self.end -= t0
        return self


_COLUMNS = (
    "method",
    "start",
    "end",
    "status",
    "ttft",
    "input_tokens",
    "output_tokens",
    "lag",
    "process",
)


def _round(x: float | None) -> float | None:
    return None if x is None else round(x, 7)


def records_to_columns(records: list[RequestRecord]) -> dict[str, list[Any]]:
    """Columns (one list per field) keep the JSON compact; errors are kept for failures only."""
    cols: dict[str, list[Any]] = {name: [] for name in (*_COLUMNS, "itl", "error")}
    for r in records:
        cols["method"].append(r.method)
        cols["start"].append(_round(r.start))
        cols["end"].append(_round(r.end))
        cols["status"].append(r.status)
        cols["ttft"].append(_round(r.ttft))
        cols["input_tokens"].append(r.input_tokens)
        cols["output_tokens"].append(r.output_tokens)
        cols["lag"].append(_round(r.lag))
        cols["process"].append(r.process)
        cols["itl"].append([round(x, 7) for x in r.itl])
        cols["error"].append(r.error)
    return cols


def records_from_columns(cols: dict[str, list[Any]]) -> list[RequestRecord]:
    n = len(cols["method"])
    return [
        RequestRecord(
            method=cols["method"][i],
            start=cols["start"][i],
            end=cols["end"][i],
            status=cols["status"][i],
            ttft=cols["ttft"][i],
            itl=list(cols["itl"][i]),
            input_tokens=cols["input_tokens"][i],
            output_tokens=cols["output_tokens"][i],
            lag=cols["lag"][i],
            error=cols["error"][i],
            process=cols["process"][i] if "process" in cols else 0,
        )
        for i in range(n)
    ]
