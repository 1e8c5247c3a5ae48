"""Prefix caching: requests that share a prefix (a system prompt, the earlier turns of a
conversation) reuse its KV instead of computing it again.

KV is kept in whole blocks of BLOCK_TOKENS positions, in a pool the step engine holds
(backends.base.PrefixKVStore) under a byte budget. A block is known by its parent block and its
own token ids, so a block stands for exactly one prefix: two prompts share a block only when all
their tokens up to its end are equal (the dict compares the ids; no hash can collide). When a
request is queued, the longest cached run of blocks of its prompt (leaving at least one prompt
token to compute, whose logits give the first new token) is pinned and handed to the scheduler
as computed; the runner copies those blocks into the request's slot when it is admitted, and
unpins them. Prompt blocks are saved as prefill chunks finish, copying the slot's KV into free
blocks, or into the least recently used unpinned ones, whose descendants go with them (a child
keyed by a reused parent id would stand for the wrong prefix).

Generated tokens are cached too, since a conversation's next turn holds them, but not as the
decode steps computed them: that KV rounds differently from a prompt's computation (the int4
decode graph, or int8 prompts against int4 decode steps), so reusing it would change later
greedy answers. Once the engine is idle, a finished request's reply is computed again through
the prompt graph into the slot it left, in chunks of FILL_TOKENS (engine.py), and its whole
blocks saved (scheduler.ReplyFill); any new plan drops what is left of that work with the slot.
The next turn then computes only its new question, as long as it arrives after the engine had
that idle time (a person reading the reply; a client sending the next turn at once finds as
much as was computed by then).

Copying costs ~23 KB per token for SmolLM2-135M with float16 KV (~0.65 ms to load a 336-token
prefix in blocks of 4: backends._kernels.kv_load_blocks), where computing it costs ~0.6 ms per
token on 2 AMD EPYC Zen 4 cores.

Why by hand: the pool lives in the engine's own KV layout (one contiguous buffer per slot, which
the batched decode graph needs), which no prefix-cache library manages; the bookkeeping is
vLLM's (block hashes chained through the parent, reference counts, LRU of unpinned blocks).
"""

from __future__ import annotations

import collections
from collections.abc import Sequence

import numpy as np
import numpy.typing as npt

from backends.base import PrefixKVStore

BLOCK_TOKENS = 4
"""Positions per cached block: prefixes are matched in whole blocks, so a request computes again
up to BLOCK_TOKENS - 1 tokens it shares. vLLM pages KV by 16 for its attention kernels; this
pool is copied into slots, so small blocks cost only bookkeeping (SGLang's radix cache matches
single tokens). 16 requests sharing a ~300-token system prompt cached by one request first, AMD
EPYC Zen 4, alternating runs: TTFT max 338-347 ms with blocks of 16, 247-264 with blocks of 4
(medians of 6 bursts)."""

MIN_COMPUTED = 2
"""Prompt tokens always computed: the last one's logits give the first new token, and the chunk
is never a lone token (which the runner computes with the token before it anyway: a one-row call
of the int4 graph takes another kernel path), so the logits are the ones a full prefill gives
and the cache never changes an answer."""

_Key = tuple[int, bytes]
"""(parent block or -1 at the root, this block's token ids as bytes)."""


class PrefixCache:
    """Block bookkeeping over a PrefixKVStore's pool; used by the engine thread only."""

    def __init__(
        self, store: PrefixKVStore, num_blocks: int, block_size: int = BLOCK_TOKENS
    ) -> None:
        if num_blocks < 1:
            raise ValueError(f"num_blocks={num_blocks} must be >= 1")
        self.block_size = block_size
        self.num_blocks = num_blocks
        self._store = store
        self._index: dict[_Key, int] = {}
        self._key: list[_Key | None] = [None] * num_blocks
        self._children: list[set[int]] = [set() for _ in range(num_blocks)]
        self._refs = [0] * num_blocks
        self._unpinned: collections.OrderedDict[int, None] = collections.OrderedDict()
        """Cached blocks no request holds, least recently used first: the eviction order."""
        self._free = list(range(num_blocks - 1, -1, -1))
        self.hit_tokens = 0
        """Prompt tokens found cached, since start."""
        self.queried_tokens = 0
        """Prompt tokens looked up, since start."""

    @property
    def cached_blocks(self) -> int:
        return self.num_blocks - len(self._free)

    def _walk(self, tokens: npt.NDArray[np.int64], limit: int) -> list[int]:
        """The cached blocks of the longest prefix of tokens[:limit], root first."""
        size, parent, path = self.block_size, -1, []
        for start in range(0, limit - size + 1, size):
            block = self._index.get((parent, tokens[start : start + size].tobytes()))
            if block is None:
                break
            path.append(block)
            parent = block
        return path

    def cached_tokens(self, tokens: npt.NDArray[np.int64], num_prompt: int) -> int:
        """How many of the prompt tokens[:num_prompt] `match` would find cached now (nothing
        pinned, nothing counted)."""
        return len(self._walk(tokens, num_prompt - MIN_COMPUTED)) * self.block_size

    def match(self, tokens: npt.NDArray[np.int64], num_prompt: int) -> list[int]:
        """Pin and return the blocks of the longest cached prefix of the prompt
        tokens[:num_prompt], leaving at least its last MIN_COMPUTED tokens to compute. `load`
        them into the request's slot (the runner does; that unpins them) or `release` them."""
        path = self._walk(tokens, num_prompt - MIN_COMPUTED)
        for block in path:
            self._pin(block)
        self.queried_tokens += num_prompt
        self.hit_tokens += len(path) * self.block_size
        return path

    def count_shared(self, num_prompt: int, shared: int) -> None:
        """A prompt found its first `shared` tokens in another request's slot instead (it read
        them there: shared_prefix.py); counted as a hit, as `match` counts one."""
        self.queried_tokens += num_prompt
        self.hit_tokens += shared

    def load(self, slot: int, blocks: Sequence[int]) -> None:
        """Copy `blocks` (from `match`) into `slot` as its first computed tokens, and unpin
        them, also when the copy fails."""
        try:
            self._store.load_blocks(slot, blocks)
        finally:
            self.release(blocks)

    def release(self, blocks: Sequence[int]) -> None:
        """Unpin `blocks` (from `match`); leaf first, so the root ends most recently used and a
        prefix's blocks are evicted from its end."""
        for block in reversed(blocks):
            self._refs[block] -= 1
            if self._refs[block] == 0:
                self._unpinned[block] = None

    def _pin(self, block: int) -> None:
        if self._refs[block] == 0:
            self._unpinned.pop(block, None)
        self._refs[block] += 1

    def save(self, slot: int, tokens: npt.NDArray[np.int64], computed: int) -> None:
        """Keep the whole blocks of tokens[:computed], whose KV `slot` holds, that are not
        cached yet (as many as free or evictable blocks allow), copied in one call."""
        size, parent = self.block_size, -1
        path: list[int] = []  # pinned while we walk, so no eviction takes a block of this path
        new: list[tuple[int, _Key]] = []  # past the first block not cached, every one is new
        first = 0
        try:
            for start in range(0, computed - size + 1, size):
                key = (parent, tokens[start : start + size].tobytes())
                block = None if new else self._index.get(key)
                if block is None:
                    block = self._allocate()
                    if block is None:
                        break  # every block is pinned
                    first = first if new else start
                    new.append((block, key))  # allocated, so no eviction takes it either
                else:
                    self._pin(block)
                    path.append(block)
                parent = block
            if not new:
                return
            try:
                self._store.save_blocks([block for block, _ in new], slot, first)
            except BaseException:
                self._free.extend(block for block, _ in reversed(new))
                raise
            for block, key in new:
                self._index[key] = block
                self._key[block] = key
                if key[0] >= 0:
                    self._children[key[0]].add(block)
                self._pin(block)
                path.append(block)
        finally:
            self.release(path)

    def _allocate(self) -> int | None:
        if not self._free and self._unpinned:
            self._evict(next(iter(self._unpinned)))
        return self._free.pop() if self._free else None

    def _evict(self, block: int) -> None:
        """Forget `block` and its descendants (unpinned too: a pinned block's whole prefix is
        pinned), freeing them. Iterative: a long prompt's chain of blocks is deeper than
        Python's recursion limit."""
        subtree, todo = [], [block]
        while todo:
            subtree.append(todo.pop())
            todo.extend(self._children[subtree[-1]])
        for each in reversed(subtree):  # children before their parents
            key = self._key[each]
            assert key is not None and self._refs[each] == 0
            del self._index[key]
            if key[0] >= 0:
                self._children[key[0]].discard(each)
            self._key[each] = None
            self._unpinned.pop(each, None)
            self._free.append(each)
