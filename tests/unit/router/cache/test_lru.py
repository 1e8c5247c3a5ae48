from __future__ import annotations

import pytest

from router.cache.lru import ByteLRU


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_least_recently_used_entries_go_first_within_the_byte_bound() -> None:
    evicted: list[int] = []
    lru: ByteLRU[str] = ByteLRU(100, on_evict=evicted.append)
    for key in (b"a", b"b", b"c"):
        assert lru.put(key, key.decode(), 29)  # 30 bytes with the key
    assert lru.bytes == 90
    assert lru.get(b"a") == "a"  # a is now the most recent
    lru.put(b"d", "d", 29)
    assert lru.get(b"b") is None and lru.get(b"a") == "a" and lru.get(b"d") == "d"
    assert evicted == [1]
    assert lru.bytes == 90 and len(lru) == 3


def test_replacing_a_key_accounts_its_old_size() -> None:
    lru: ByteLRU[int] = ByteLRU(1000)
    lru.put(b"k", 1, 499)
    lru.put(b"k", 2, 99)
    assert lru.bytes == 100 and lru.get(b"k") == 2
    lru.pop(b"k")
    assert lru.bytes == 0 and lru.get(b"k") is None


def test_an_entry_larger_than_the_bound_is_refused_without_evicting() -> None:
    lru: ByteLRU[int] = ByteLRU(50)
    lru.put(b"small", 1, 10)
    assert not lru.put(b"big", 2, 100)
    assert lru.get(b"small") == 1 and lru.get(b"big") is None


def test_entries_expire_after_the_ttl() -> None:
    clock = Clock()
    lru: ByteLRU[int] = ByteLRU(1000, ttl_s=10, clock=clock)
    lru.put(b"k", 1, 10)
    clock.now += 9.9
    assert lru.get(b"k") == 1
    clock.now += 0.2
    assert lru.get(b"k") is None
    assert lru.bytes == 0


def test_bad_bounds_are_named() -> None:
    with pytest.raises(ValueError, match="max_bytes=0"):
        ByteLRU(0)
    with pytest.raises(ValueError, match="ttl_s=-1"):
        ByteLRU(10, ttl_s=-1)
