"""A byte-bounded LRU map with a time to live, the in-process layer of every cache.

Written by hand because aiocache's memory backend has neither a size bound nor an eviction
order (it keeps one `call_later` timer per key instead); an OrderedDict with lazy expiry is a few
lines and costs one dict move per hit."""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Callable
from typing import Generic, TypeVar

V = TypeVar("V")


class ByteLRU(Generic[V]):
    """Maps keys to values with a size in bytes each. Inserting beyond `max_bytes` evicts the
    least recently used entries; an entry older than `ttl_s` (0: never) is gone on its next
    read. `on_evict(n)` hears how many entries each insert pushed out."""

    def __init__(
        self,
        max_bytes: int,
        ttl_s: float = 0.0,
        *,
        on_evict: Callable[[int], None] | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if max_bytes < 1:
            raise ValueError(f"max_bytes={max_bytes} must be at least 1")
        if ttl_s < 0:
            raise ValueError(f"ttl_s={ttl_s} must not be negative")
        self.max_bytes = max_bytes
        self.ttl_s = ttl_s
        self.bytes = 0
        self._entries: OrderedDict[bytes, tuple[V, int, float]] = OrderedDict()
        self._on_evict = on_evict
        self._clock = clock

    def __len__(self) -> int:
        return len(self._entries)

    def get(self, key: bytes) -> V | None:
        entry = self._entries.get(key)
        if entry is None:
            return None
        value, size, expires = entry
        if expires and self._clock() >= expires:
            del self._entries[key]
            self.bytes -= size
            return None
        self._entries.move_to_end(key)
        return value

    def put(self, key: bytes, value: V, size: int) -> bool:
        """Store `value`; False (and nothing stored) when it alone exceeds the bound."""
        size += len(key)
        if size > self.max_bytes:
            return False
        old = self._entries.pop(key, None)
        if old is not None:
            self.bytes -= old[1]
        expires = self._clock() + self.ttl_s if self.ttl_s else 0.0
        self._entries[key] = (value, size, expires)
        self.bytes += size
        evicted = 0
        while self.bytes > self.max_bytes:
            _, (_, gone, _) = self._entries.popitem(last=False)
            self.bytes -= gone
            evicted += 1
        if evicted and self._on_evict is not None:
            self._on_evict(evicted)
        return True

    def pop(self, key: bytes) -> None:
        entry = self._entries.pop(key, None)
        if entry is not None:
            self.bytes -= entry[1]

    def clear(self) -> None:
        self._entries.clear()
        self.bytes = 0
