"""PrefixCache bookkeeping over a fake store whose "KV" at a position is the token there, so a
wrong block copied into a slot shows as wrong tokens."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pytest

from backends.base import PrefixKVStore
from router.scheduler.prefix_cache import PrefixCache

B = 4


class TokenStore:
    """Slots hold token ids where a real engine holds their KV."""

    def __init__(self, slots: int = 4, context: int = 64) -> None:
        self.slots = np.full((slots, context), -1, np.int64)
        self.lengths = [0] * slots
        self.pool = np.full((0, B), -1, np.int64)
        self.saved = 0

    def kv_bytes_per_token(self) -> int:
        return 8

    def open_pool(self, num_blocks: int, block_size: int) -> None:
        self.pool = np.full((num_blocks, block_size), -1, np.int64)

    def compute(self, slot: int, tokens: np.ndarray) -> None:
        """What a prefill of `tokens` from position 0 leaves in the slot."""
        self.slots[slot, : len(tokens)] = tokens
        self.lengths[slot] = len(tokens)

    def save_blocks(self, blocks: Sequence[int], slot: int, start: int) -> None:
        assert start + len(blocks) * B <= self.lengths[slot]
        for i, block in enumerate(blocks):
            self.pool[block] = self.slots[slot, start + i * B : start + (i + 1) * B]
        self.saved += len(blocks)

    def load_blocks(self, slot: int, blocks: Sequence[int]) -> None:
        self.slots[slot, : len(blocks) * B] = self.pool[list(blocks)].reshape(-1)
        self.lengths[slot] = len(blocks) * B

    def slot_length(self, slot: int) -> int:
        return self.lengths[slot]


def make(num_blocks: int = 8) -> tuple[PrefixCache, TokenStore]:
    store = TokenStore()
    store.open_pool(num_blocks, B)
    return PrefixCache(store, num_blocks, block_size=B), store


def ids(*values: int) -> np.ndarray:
    return np.array(values, np.int64)


def test_the_fake_store_is_a_prefix_store() -> None:
    assert isinstance(TokenStore(), PrefixKVStore)


def test_a_shared_prefix_is_found_in_whole_blocks_and_loads_the_right_kv() -> None:
    cache, store = make()
    first = np.arange(100, 111)  # 11 tokens: blocks of 100..103 and 104..107
    store.compute(0, first)
    cache.save(0, first, len(first))
    assert cache.cached_blocks == 2
    second = np.concatenate([first[:9], ids(7, 7, 7)])  # shares 9 tokens: 2 whole blocks
    blocks = cache.match(second, len(second))
    assert len(blocks) == 2 and cache.hit_tokens == 8
    store.load_blocks(1, blocks)
    assert store.slots[1, :8].tolist() == second[:8].tolist()
    cache.release(blocks)


def test_a_prompt_that_is_all_cached_still_computes_its_last_two_tokens() -> None:
    cache, store = make()
    prompt = np.arange(12)
    store.compute(0, prompt)
    cache.save(0, prompt, 12)
    assert len(cache.match(prompt, 8)) == 1  # 6 tokens may come from the cache: one block
    assert len(cache.match(prompt, 9)) == 1
    assert len(cache.match(prompt, 10)) == 2


def test_a_block_is_its_whole_prefix_not_only_its_own_tokens() -> None:
    cache, store = make()
    a = ids(1, 1, 1, 1, 5, 6, 7, 8, 0)
    store.compute(0, a)
    cache.save(0, a, 8)
    b = ids(2, 2, 2, 2, 5, 6, 7, 8, 0)  # same second block, different first: no match
    assert cache.match(b, len(b)) == []


def test_eviction_takes_the_least_recent_unpinned_blocks_and_their_descendants() -> None:
    cache, store = make(num_blocks=4)
    a, b = np.arange(0, 10), np.arange(50, 60)
    store.compute(0, a)
    cache.save(0, a, 8)  # blocks a0, a1
    store.compute(1, b)
    cache.save(1, b, 8)  # blocks b0, b1: the pool is full
    pinned = cache.match(b, 10)  # b is in use, and a is now the least recently used
    c = np.arange(70, 80)
    store.compute(2, c)
    cache.save(2, c, 8)  # needs two blocks: a's root goes, and its child with it
    assert cache.match(a, 10) == []
    assert cache.match(b, 10) == pinned  # pinned blocks survived
    loaded = cache.match(c, 10)
    store.load_blocks(3, loaded)
    assert store.slots[3, :8].tolist() == c[:8].tolist()


def test_pinned_blocks_are_never_evicted_and_saving_stops_when_all_are() -> None:
    cache, store = make(num_blocks=2)
    a = np.arange(0, 10)
    store.compute(0, a)
    cache.save(0, a, 8)
    pinned = cache.match(a, 10)
    c = np.arange(70, 80)
    store.compute(1, c)
    saved = store.saved
    cache.save(1, c, 8)  # nothing free, nothing evictable
    assert store.saved == saved and cache.match(c, 10) == []
    cache.release(pinned)
    cache.release(cache.match(a, 10))
    cache.save(1, c, 8)  # now a's blocks can go
    assert len(cache.match(c, 10)) == 2


def test_a_reused_block_id_never_matches_an_orphaned_child() -> None:
    cache, store = make(num_blocks=3)
    a = np.arange(0, 10)
    store.compute(0, a)
    cache.save(0, a, 8)  # a0, a1 (a1 a child of a0)
    c = ids(9, 9, 9, 9, 0, 0)
    store.compute(1, c)
    cache.save(1, c, 4)  # c0: the pool is full
    d = ids(8, 8, 8, 8, 0, 0)
    store.compute(2, d)
    cache.save(2, d, 4)  # evicts a0, and a1 with it, so d0 may take a0's id
    probe = np.concatenate([d[:4], a[4:8], ids(0, 0)])
    blocks = cache.match(probe, len(probe))
    assert len(blocks) == 1  # d0 only: a1's tokens under d0's id are not a1


@pytest.mark.parametrize("num_blocks", [0, -1])
def test_a_cache_needs_a_block(num_blocks: int) -> None:
    with pytest.raises(ValueError, match="num_blocks"):
        PrefixCache(TokenStore(), num_blocks)


def test_a_failed_copy_caches_nothing_and_frees_its_blocks() -> None:
    cache, store = make(num_blocks=4)
    a = np.arange(0, 14)
    store.compute(0, a)
    cache.save(0, a, 4)  # a0 cached; a1..a2 will be new

    def broken(blocks: Sequence[int], slot: int, start: int) -> None:
        raise RuntimeError("copy failed")

    store.save_blocks = broken  # type: ignore[method-assign]
    with pytest.raises(RuntimeError):
        cache.save(0, a, 12)
    assert cache.cached_blocks == 1 and len(cache.match(a, 14)) == 1
    assert all(refs == 0 for refs in cache._refs[1:])


def test_eviction_frees_a_chain_longer_than_the_recursion_limit() -> None:
    n = 1500
    cache, store = make(num_blocks=n)
    store.slots = np.full((1, (n + 1) * B), -1, np.int64)
    store.lengths = [0]
    long = np.arange(n * B + 2) % 1000 + 10
    store.compute(0, long)
    cache.save(0, long, n * B)
    path = cache.match(long, len(long))
    assert len(path) == cache.cached_blocks == n
    cache.release(path)
    cache._evict(path[0])  # the root (least recently used goes first: here its last block)
    assert cache.cached_blocks == 0 and cache.match(long, len(long)) == []
