"""SharedGate: many holders of the same key at once, or one exclusive holder.

hnswlib keeps `ef` on the index, not per query, so searches can only run together when they
want the same ef: the key is the ef, and the first holder of a new key sets it. `resize_index`
must not run beside anything, so it holds the gate exclusively. A waiter for another key (or for
exclusive use) stops new holders of the current key from entering, so nobody starves."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager


class SharedGate:
    def __init__(self, on_switch: Callable[[int], None]) -> None:
        self._on_switch = on_switch
        self._cond = asyncio.Condition()
        self._key: int | None = None
        self._holders = 0
        self._exclusive = False
        self._exclusive_waiting = 0
        self._switch_waiting = 0

    def _may_enter(self, key: int, switching: bool) -> bool:
        if self._exclusive or self._exclusive_waiting:
            return False
        if self._holders == 0:
            return True
        return key == self._key and not switching and not self._switch_waiting

    @asynccontextmanager
    async def shared(self, key: int) -> AsyncIterator[None]:
        async with self._cond:
            switching = self._holders > 0 and self._key != key
            self._switch_waiting += switching
            try:
                await self._cond.wait_for(lambda: self._may_enter(key, switching))
            finally:
                self._switch_waiting -= switching
            if self._key != key:
                self._on_switch(key)
                self._key = key
            self._holders += 1
        try:
            yield
        finally:
            async with self._cond:
                self._holders -= 1
                self._cond.notify_all()

    @asynccontextmanager
    async def exclusive(self) -> AsyncIterator[None]:
        async with self._cond:
            self._exclusive_waiting += 1
            try:
                await self._cond.wait_for(lambda: not self._exclusive and self._holders == 0)
            finally:
                self._exclusive_waiting -= 1
            self._exclusive = True
        try:
            yield
        finally:
            async with self._cond:
                self._exclusive = False
                self._cond.notify_all()
