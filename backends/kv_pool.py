"""The prefix KV block pool of a decoder's slot cache (backends.base.PrefixKVStore).

Blocks of `block_size` positions of one slot's keys and values, copied out of a slot once
computed and back into any slot at the same positions (keys carry their rotary position).
Used by OnnxDecoder, whose slot buffers are [max_slots, kv_heads, max_context, head_dim] per
layer.
"""

from __future__ import annotations

import threading
from collections.abc import Sequence
from typing import Any

import numpy as np
import numpy.typing as npt

from backends._kernels import kv_copy_prefix, kv_load_blocks, kv_save_blocks

KVArray = npt.NDArray[np.floating[Any]]
"""Keys or values: float32 (the graphs'), or float16 where the native kernels compute every step."""


def touched(shape: tuple[int, ...], dtype: type[np.floating[Any]] = np.float32) -> KVArray:
    """A zeroed array whose pages are all resident (written, not only mapped)."""
    array = np.empty(shape, dtype)
    array.fill(0.0)
    return array


class SlotKVPool:
    """PrefixKVStore over the slot buffers `_keys` and `_values` of the class using it."""

    _keys: list[KVArray]
    _values: list[KVArray]
    _num_layers: int
    _lengths: npt.NDArray[np.int64]
    _lock: threading.Lock
    max_context: int
    max_slots: int

    def _check_slot(self, slot: int) -> int:
        if not 0 <= slot < self.max_slots:
            raise ValueError(f"slot={slot} is out of range 0..{self.max_slots - 1}")
        return int(slot)

    def _init_pool(self) -> None:
        self._pool_keys: list[KVArray] = []
        self._pool_values: list[KVArray] = []
        self._block_size = 0
        self._pool_writes = 0
        self._loaded: dict[int, tuple[int, tuple[int, ...]]] = {}
        """Slot -> (pool writes at its load, the blocks loaded into it and not overwritten since):
        slots loaded from the same blocks between two pool writes hold the same tokens there."""
        self._borrowed: dict[int, tuple[int, int]] = {}
        """Slot -> (slot, n): its positions 0..n-1 were read from that slot by a prompt chunk
        (PrefixBorrowing) and are not copied into it yet: `_settle` copies them before any
        write to either slot, or any read of them, and `settle` once a step is delivered."""
        self._unsettled: set[int] = set()
        """Slots whose borrowed prefix could not be copied: refused by every call until released
        or written from position 0 again (their requests fail alone; the others go on)."""

    def _borrowings(
        self,
        rows: list[int],
        starts: list[int],
        ends: list[int],
        prefixes: Sequence[tuple[int, int] | None] | None,
        allowed: bool,
    ) -> dict[int, tuple[int, int]]:
        """Slot -> (slot it reads its prefix from, positions): a prefill call's `prefixes`
        (backends.base.PrefixBorrowing) checked against its rows (slots, chunk starts and ends)
        and what the lenders hold (under the lock). `allowed`: the engine reads them."""
        if prefixes is None:
            return {}
        if len(prefixes) != len(rows):
            raise ValueError(f"prefixes has {len(prefixes)} entries for {len(rows)} rows")
        borrowed: dict[int, tuple[int, int]] = {}
        for slot, start, prefix in zip(rows, starts, prefixes, strict=True):
            if prefix is None:
                continue
            if not allowed:
                raise ValueError(
                    "prefixes are read from other slots only where the native kernels compute "
                    "every step (prefill_graph: native)"
                )
            source, n = self._check_slot(prefix[0]), int(prefix[1])
            if source == slot or n != start or n < 1:
                raise ValueError(
                    f"slot {slot}'s prefix ({source}, {n}) must be another slot's first "
                    f"positions, up to where its chunk starts ({start})"
                )
            borrowed[slot] = (source, n)
        if any(source in borrowed for source, _ in borrowed.values()):
            raise ValueError("a slot reading its prefix elsewhere cannot lend one in the same call")
        after = dict(zip(rows, ends, strict=True))
        for slot, (source, n) in borrowed.items():
            holds = max(int(self._lengths[source]), after.get(source, 0))
            if holds < n:
                raise ValueError(
                    f"slot {slot} reads {n} positions from slot {source}, which holds {holds} "
                    "after this call"
                )
        return borrowed

    def _lent(self, borrowed: dict[int, tuple[int, int]]) -> None:
        """A prefill call computed the rows of `borrowed` (from `_borrowings`; under the lock)."""
        for slot in borrowed:
            self._loaded.pop(slot, None)
        self._borrowed.update(borrowed)

    def settle(self) -> None:
        if not self._borrowed:  # every step calls this; most borrow nothing
            return
        with self._lock:
            self._settle()

    def _settle(self) -> None:
        """Copy the borrowed prefixes into the slots that read them (under the lock): one
        call for the slots that read the same positions of one slot (a burst's followers),
        two threads where it is large (15 followers of a 344-token prefix: ~14 ms in NumPy,
        one thread)."""
        if not self._borrowed:
            return
        readers: dict[tuple[int, int], list[int]] = {}
        for slot, prefix in self._borrowed.items():
            readers.setdefault(prefix, []).append(slot)
        self._borrowed.clear()  # a failed copy must not fail every later call too
        buffers = [*self._keys, *self._values]
        for (source, n), slots in readers.items():
            try:
                kv_copy_prefix(buffers, source, np.array(slots, np.int64), n)
            except Exception:
                self._unsettled.update(slots)
                raise

    def _check_settled(
        self, slots: Sequence[int] | npt.NDArray[np.int64], starts: Sequence[int] | None = None
    ) -> None:
        """Refuse slots whose borrowed prefix was lost (unless a prompt rewrites it from 0)."""
        if not self._unsettled:  # every step comes here; a lost prefix is an accident
            return
        for i, slot in enumerate(slots):
            if slot in self._unsettled:
                if starts is not None and starts[i] == 0:
                    self._unsettled.discard(slot)
                    continue
                raise ValueError(f"slot {slot} lost the prefix it read from another slot")

    def _shared_blocks(self, slot: int, start: int) -> list[tuple[int, int]]:
        """Names of the loaded blocks that begin the past of a prefill of `slot` from `start`
        (the same names in two slots: the same keys and values). The prefill overwrites the
        slot from `start`: blocks past it are forgotten."""
        self._forget_from(slot, start)
        writes, blocks = self._loaded.get(slot, (0, ()))
        return [(writes, block) for block in blocks]

    def _forget_from(self, slot: int, position: int) -> None:
        """`slot` is (re)written from `position`: its loaded blocks from there on are not the
        pool's any more."""
        writes, blocks = self._loaded.get(slot, (0, ()))
        whole = min(len(blocks), position // self._block_size) if blocks else 0
        if whole < len(blocks):
            self._loaded[slot] = (writes, blocks[:whole])

    def kv_bytes_per_token(self) -> int:
        _, kv_heads, _, head_dim = self._keys[0].shape
        return int(2 * self._num_layers * kv_heads * head_dim * self._keys[0].itemsize)

    def open_pool(self, num_blocks: int, block_size: int) -> None:
        if num_blocks < 1 or block_size < 1:
            raise ValueError(f"num_blocks={num_blocks} and block_size={block_size} must be >= 1")
        _, kv_heads, _, head_dim = self._keys[0].shape
        shape = (num_blocks, kv_heads, block_size, head_dim)
        with self._lock:
            # Touched now, so the pool's resident memory is its budget from the start instead
            # of growing as blocks are first written.
            dtype = self._keys[0].dtype.type
            self._pool_keys = [touched(shape, dtype) for _ in range(self._num_layers)]
            self._pool_values = [touched(shape, dtype) for _ in range(self._num_layers)]
            self._block_size = block_size

    def _check_block(self, block: int) -> int:
        if not self._pool_keys:
            raise ValueError("no prefix block pool: call open_pool first")
        if not 0 <= block < len(self._pool_keys[0]):
            raise ValueError(f"block={block} is out of range 0..{len(self._pool_keys[0]) - 1}")
        return int(block)

    def _buffers(self) -> tuple[list[KVArray], list[KVArray]]:
        """The slot buffers and the pool buffers, in the same order (backends._kernels)."""
        return [*self._keys, *self._values], [*self._pool_keys, *self._pool_values]

    def _check_blocks(self, blocks: Sequence[int]) -> npt.NDArray[np.int64]:
        if not self._pool_keys:
            raise ValueError("no prefix block pool: call open_pool first")
        return np.asarray([self._check_block(block) for block in blocks], dtype=np.int64)

    def save_blocks(self, blocks: Sequence[int], slot: int, start: int) -> None:
        slot, index = self._check_slot(slot), self._check_blocks(blocks)
        end = start + len(blocks) * self._block_size
        with self._lock:
            if slot in self._borrowed and start < self._borrowed[slot][1]:
                self._settle()
            self._check_settled([slot])
            if not 0 <= start <= end <= self._lengths[slot]:
                raise ValueError(
                    f"positions {start}..{end} of slot {slot} are not all computed "
                    f"({int(self._lengths[slot])} are)"
                )
            self._pool_writes += 1
            kv_save_blocks(*self._buffers(), slot, start, index)

    def load_blocks(self, slot: int, blocks: Sequence[int]) -> None:
        slot, index = self._check_slot(slot), self._check_blocks(blocks)
        n = len(blocks) * self._block_size
        if n > self.max_context:
            raise ValueError(f"{len(blocks)} blocks hold {n} tokens, beyond max_context")
        with self._lock:
            self._settle()
            kv_load_blocks(*self._buffers(), slot, index)
            self._unsettled.discard(slot)
            self._lengths[slot] = n
            self._loaded[slot] = (self._pool_writes, tuple(int(b) for b in blocks))
