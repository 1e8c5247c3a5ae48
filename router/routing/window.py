"""Event counts over a sliding time window, shared by the circuit breaker and the retry budget."""

from __future__ import annotations


class WindowCounts:
    """Counts of `fields` kinds of event over the last `window_s` seconds.

    The window is cut into `buckets` equal slices kept in a ring; a slice older than the window
    is dropped lazily when its slot is reused or skipped when summing, so the window slides in
    steps of window_s / buckets and nothing runs between calls.
    """

    __slots__ = ("_counts", "_epochs", "_width")

    def __init__(self, window_s: float, *, fields: int = 2, buckets: int = 10) -> None:
        if window_s <= 0 or buckets < 1 or fields < 1:
            raise ValueError(f"window_s={window_s}, buckets={buckets}, fields={fields} must be > 0")
        self._width = window_s / buckets
        self._epochs = [-1] * buckets
        self._counts = [[0] * fields for _ in range(buckets)]

    def add(self, now: float, field: int, n: int = 1) -> None:
        epoch = int(now // self._width)
        slot = epoch % len(self._epochs)
        counts = self._counts[slot]
        if self._epochs[slot] != epoch:  # the slot held an older slice: start it afresh
            self._epochs[slot] = epoch
            counts[:] = [0] * len(counts)
        counts[field] += n

    def totals(self, now: float) -> list[int]:
        """Sum of each field over the slices inside the window ending at `now`."""
        oldest = int(now // self._width) - len(self._epochs)
        sums = [0] * len(self._counts[0])
        for epoch, counts in zip(self._epochs, self._counts, strict=True):
            if epoch > oldest:
                for i, count in enumerate(counts):
                    sums[i] += count
        return sums

    def clear(self) -> None:
        for i in range(len(self._epochs)):
            self._epochs[i] = -1
