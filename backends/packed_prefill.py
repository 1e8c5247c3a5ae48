"""The prompts of several KV slots in one call of a packed-attention graph.

The graph's contract is router.models.packed_attention's (where the graph is built): new tokens
of every sequence one after the other, their pasts likewise, and index maps that lay out each
sequence's queries and keys (in position order, padding after the last) for one attention
batch. This module builds those inputs from the decoder's KV slot buffers
([max_slots, kv_heads, max_context, head_dim] per layer, shared with the decode graph), runs the
call and stores the new tokens' keys and values back into the slots.

Why batch prompts: a call reads every weight once, whatever its number of tokens (int8 graph,
AMD EPYC Zen 4: 8.5 ms for 1 token, 17 ms for 16), and ONNX Runtime's GroupQueryAttention takes
one sequence with a past per call.
"""

from __future__ import annotations

from collections.abc import Hashable, Sequence

import numpy as np
import numpy.typing as npt
import onnxruntime as ort

FloatArray = npt.NDArray[np.float32]

NEG = -1e30
"""The attention bias of a key a query may not see: exp(NEG - max) is exactly 0 (also when
every key of a padded query is hidden: the weights are then uniform, and finite)."""


class PackedPrefill:
    """Runs the packed graph over the slot buffers `keys` and `values` (one per layer)."""

    def __init__(
        self,
        session: ort.InferenceSession,
        keys: Sequence[FloatArray],
        values: Sequence[FloatArray],
        group: int,
    ) -> None:
        self._session = session
        self._keys = keys
        self._values = values
        self._group = group
        """Query heads per KV head."""
        _, self._kv_heads, _, self._head_dim = keys[0].shape
        self._outputs = [o.name for o in session.get_outputs()]

    def run(
        self,
        slots: Sequence[int],
        chunks: Sequence[npt.NDArray[np.int64]],
        starts: Sequence[int],
        shared: Sequence[Sequence[Hashable]] = (),
        block_size: int = 0,
    ) -> FloatArray:
        """Compute chunks[b] at positions starts[b].. in slots[b] (positions before starts[b]
        already computed there); logits [B, V] of each chunk's last token.

        shared[b] (optional) names the blocks of `block_size` positions that begin row b's
        past: rows naming the same block hold the same keys and values there (a cached prefix
        loaded in this step), and the call carries them once (16 prompts on one 300-token
        system prompt carried it 16 times: 14 MB of copies each)."""
        kv, dim = self._kv_heads, self._head_dim
        # The packed past: (slot, first position, length) copied in order; each row's past as
        # indices into it.
        pieces: list[tuple[int, int, int]] = []
        packed_at: dict[Hashable, int] = {}
        pasts: list[npt.NDArray[np.int64]] = []
        size = 0
        for row, (slot, start) in enumerate(zip(slots, starts, strict=True)):
            parts = []
            names = shared[row] if shared else ()
            for k, name in enumerate(names):
                if name not in packed_at:
                    packed_at[name] = size
                    pieces.append((slot, k * block_size, block_size))
                    size += block_size
                parts.append(np.arange(packed_at[name], packed_at[name] + block_size))
            own = len(names) * block_size
            if start > own:
                pieces.append((slot, own, start - own))
                parts.append(np.arange(size, size + start - own))
                size += start - own
            pasts.append(np.concatenate(parts) if parts else np.zeros(0, np.int64))
        feeds = self._layout(chunks, starts, pasts, size)
        for i in range(len(self._keys)):
            past_keys = np.empty((kv, size, dim), np.float32)
            past_values = np.empty((kv, size, dim + 1), np.float32)
            past_values[:, :, dim] = 1.0
            at = 0
            for slot, first, n in pieces:
                past_keys[:, at : at + n] = self._keys[i][slot, :, first : first + n]
                past_values[:, at : at + n, :dim] = self._values[i][slot, :, first : first + n]
                at += n
            feeds[f"past_key_values.{i}.key"] = past_keys
            feeds[f"past_key_values.{i}.value"] = past_values
        out = dict(zip(self._outputs, self._session.run(self._outputs, feeds), strict=True))
        offset = 0
        for slot, chunk, start in zip(slots, chunks, starts, strict=True):
            end, n = start + len(chunk), len(chunk)
            for i in range(len(self._keys)):
                new_keys = out[f"present.{i}.key"][offset : offset + n]
                new_values = out[f"present.{i}.value"][offset : offset + n]
                self._keys[i][slot, :, start:end] = new_keys.transpose(1, 0, 2)
                self._values[i][slot, :, start:end] = new_values.transpose(1, 0, 2)
            offset += n
        logits: FloatArray = out["logits"]
        return logits

    def _layout(
        self,
        chunks: Sequence[npt.NDArray[np.int64]],
        starts: Sequence[int],
        pasts: Sequence[npt.NDArray[np.int64]],
        past: int,
    ) -> dict[str, npt.NDArray[np.generic]]:
        """Every input but the pasts (`past` tokens; row b's at indices pasts[b]): the tokens
        and the index maps of the contract."""
        b = len(chunks)
        lengths = np.array([len(c) for c in chunks], np.int64)
        first = np.array(starts, np.int64)
        n = int(lengths.sum())
        s, t = int(lengths.max()), int((first + lengths).max())
        new_at = np.concatenate(([0], np.cumsum(lengths)[:-1]))  # each chunk's first new token
        position = np.arange(t)[None, :]
        # Key t of sequence b: its past token t, then its new tokens; index 0 after its last.
        key_index = np.zeros((b, t), np.int64)
        for row, (indices, start, length) in enumerate(zip(pasts, first, lengths, strict=True)):
            key_index[row, :start] = indices
            key_index[row, start : start + length] = past + new_at[row] + np.arange(length)
        query = np.arange(s)[None, :]
        real = query < lengths[:, None]
        query_index = np.where(real, new_at[:, None] + query, 0)
        # Query s of sequence b sits at position start + s and sees keys up to there.
        visible = position[:, None, :] <= (first[:, None] + query)[:, :, None]  # [B, S, T]
        bias = np.where(visible, np.float32(0.0), np.float32(NEG)).astype(np.float32)
        group_bias = np.broadcast_to(bias[:, None], (b, self._group, s, t))
        ids = np.concatenate(chunks).astype(np.int64, copy=False)
        positions = np.concatenate(
            [np.arange(a, a + k) for a, k in zip(first, lengths, strict=True)]
        )
        return {
            "input_ids": ids.reshape(1, n),
            "position_ids": positions.reshape(1, n),
            "new_ones": np.ones((self._kv_heads, n, 1), np.float32),
            "key_index": key_index,
            "query_index": query_index,
            "attention_bias": np.ascontiguousarray(group_bias).reshape(1, b, self._group * s, t),
            "output_index": (np.arange(b)[:, None] * s + query)[real],
            "last_index": new_at + lengths - 1,
        }


PAD_SLACK = 16384
"""Query-key pairs of padding a packed call may add beyond half its real ones: about what one
more call costs (one pair is ~35 k multiply-adds over SmolLM2's 30 layers and 9 heads: 0.5 us on
2 cores; a call's fixed cost is ~8 ms)."""


def packed_groups(lengths: Sequence[int], starts: Sequence[int]) -> list[list[int]]:
    """Rows (chunks of `lengths` tokens after `starts` computed ones) in groups to compute one
    call each. A call pads every row's queries to its longest chunk and its keys to its longest
    sequence, so a long new prompt beside short chunks after long pasts computed ~2.4x the work
    of separate calls (480 fresh tokens with 32 after 1,900: 1.6 s against 0.66 s), and sixteen
    such rows 9x and 2.4 GiB more: a row joins a group while the group's padded attention stays
    within 1.5x its real attention plus PAD_SLACK. Longest chunks first."""
    order = sorted(range(len(lengths)), key=lambda r: (-lengths[r], -starts[r]))
    groups: list[list[int]] = []
    queries = keys = real = 0
    for row in order:
        n, t = lengths[row], starts[row] + lengths[row]
        if groups:
            padded = (len(groups[-1]) + 1) * max(queries, n) * max(keys, t)
            if padded <= 1.5 * (real + n * t) + PAD_SLACK:
                groups[-1].append(row)
                queries, keys, real = max(queries, n), max(keys, t), real + n * t
                continue
        groups.append([row])
        queries, keys, real = n, t, n * t
    return groups
