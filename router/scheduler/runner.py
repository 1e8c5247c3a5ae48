"""The model runner: executes one SchedulerOutput on a step engine and samples.

For each step: release the KV slots of requests that ended, copy cached prefixes into the slots
of requests admitted with one (prefix_cache.py), decode every generated-token row in one batched
call, prefill the prompt chunks (in one call where the backend batches prompts), then sample the
rows whose logits give their next token
(the native sampler, one call for the whole batch, on the step's logits in place where they
are its rows in order; the GIL is released for large batches only; rows with a structured output
draw only what their grammar allows, router.structured.masks). A prompt chunk whose first
positions another row of the step computes in its own slot (a follower joining its leader:
shared_prefix.py) reads them there; the backend copies them into its slot once the step is
delivered (`settle`). Results come back by row, and so do failures: a batched call that raises
is retried row by row, so one bad request fails alone and the others of the step keep their
tokens (a follower fails with the leader whose prefix it reads).
"""

from __future__ import annotations

import logging

import numpy as np
import numpy.typing as npt

from backends.base import BatchedPrefill, DecoderStepEngine, PrefixBorrowing
from router import _native
from router.scheduler.prefix_cache import PrefixCache
from router.scheduler.request import Request
from router.scheduler.scheduler import RunnerOutput, SchedulerOutput
from router.structured import masks

logger = logging.getLogger(__name__)

FloatArray = npt.NDArray[np.float32]


def _chunk_start(start: int, end: int) -> int:
    """Where to compute the prompt chunk [start, end) from: a one-token chunk is computed with
    the token before it again. The int4 graph computes a one-row call on another kernel path, so
    its KV (and any block or reply cached over it) would differ from what a longer chunk
    computes; two tokens from start - 1 leave position start - 1 as it was, bit for bit (any
    chunk of two or more is exact)."""
    return start - 1 if end - start == 1 and start > 0 else start


class ModelRunner:
    def __init__(
        self, name: str, backend: DecoderStepEngine, prefix_cache: PrefixCache | None = None
    ) -> None:
        self.name = name
        self._backend = backend
        self._prefix_cache = prefix_cache
        # The backend's optional protocols, checked once (a runtime protocol check per step
        # costs microseconds the one-stream step cannot spare).
        self._batched = backend if isinstance(backend, BatchedPrefill) else None
        self._borrower = backend if isinstance(backend, PrefixBorrowing) else None
        self.mixed_steps = bool(getattr(backend, "mixed_steps", False)) and bool(self._batched)
        """The backend computes decode rows and prompt chunks alike, in one call a step (and a
        decoded token's KV as a prompt's)."""
        if not (self.mixed_steps and self._borrower and self._borrower.borrows_prefixes):
            self._borrower = None
        self.borrows_prefixes = self._borrower is not None
        """Prompt chunks may read their prefix from another slot (SchedulerOutput.prefixes)."""

    def execute(self, output: SchedulerOutput) -> RunnerOutput:
        result = RunnerOutput()
        self.release(output.freed_slots)
        plan, reqs = output.plan, output.requests
        if not reqs:
            return result
        if output.loads:
            self._load(output, result)
        if output.prefixes and result.errors:  # a lender whose load failed lends nothing
            lost = {int(plan.slots[row]) for row in result.errors}
            for row, (lender, _) in output.prefixes.items():
                if lender in lost:
                    result.errors[row] = "loading the prefix it shares failed"
        logits: dict[int, FloatArray] = {}
        # A row computing a generated token decodes; a row of prompt tokens prefills, also a
        # chunk of one: the decode graph rounds differently from the prompt graph, whose packed
        # form computes a prompt the same however it was chunked.
        prompts = np.fromiter((r.num_prompt for r in reqs), np.int64, count=len(reqs))
        decoding = (plan.counts == 1) & (plan.starts >= prompts)
        decode_rows = np.flatnonzero(decoding)
        prefill_rows = [r for r in np.flatnonzero(~decoding).tolist() if r not in result.errors]
        if result.errors:
            decode_rows = np.array([r for r in decode_rows if r not in result.errors], np.intp)
        if (
            len(decode_rows)
            and prefill_rows
            and self._mixed(reqs, decode_rows, prefill_rows, output, logits)
        ):
            decode_rows, prefill_rows = decode_rows[:0], []
        if len(decode_rows):
            self._decode(reqs, decode_rows, plan.slots, plan.starts, logits, result)
        if prefill_rows:
            self._prefill(reqs, prefill_rows, output, logits, result)
        rows = [r for r in np.flatnonzero(plan.sample).tolist() if r in logits]
        if rows:
            self._sample(reqs, rows, logits, result)
        return result

    def _load(self, output: SchedulerOutput, result: RunnerOutput) -> None:
        """Copy each newly admitted request's cached prefix into its slot."""
        assert self._prefix_cache is not None
        for row, blocks in output.loads:
            try:
                self._prefix_cache.load(int(output.plan.slots[row]), blocks)
            except Exception:
                req = output.requests[row]
                logger.exception("engine %s: prefix load failed for %s", self.name, req.request_id)
                result.errors[row] = "loading its cached prefix failed"

    def fill(self, slot: int, tokens: npt.NDArray[np.int64], start: int, end: int) -> None:
        """Compute tokens[start:end] into `slot` as a prompt chunk and cache its whole blocks
        (a finished reply: scheduler.ReplyFill)."""
        assert self._prefix_cache is not None
        start = _chunk_start(start, end)
        self._backend.prefill(slot, tokens[start:end], start)
        self._prefix_cache.save(slot, tokens, end)

    def settle(self) -> None:
        """Copy the prefixes this step's prompt chunks read from other slots into their own
        slots (the engine calls this once the step's tokens are delivered; the backend would
        copy them before its next use of those slots anyway)."""
        if self._borrower is not None:
            self._borrower.settle()

    def _prefill_rows(
        self,
        slots: list[int],
        chunks: list[npt.NDArray[np.int64]],
        starts: list[int],
        prefixes: list[tuple[int, int] | None],
    ) -> FloatArray:
        """One prefill_batch call; with `prefixes` only where a row reads one."""
        if any(prefixes):
            assert self._borrower is not None
            return self._borrower.prefill_batch(slots, chunks, starts, prefixes)
        assert self._batched is not None
        return self._batched.prefill_batch(slots, chunks, starts)

    def release(self, slots: list[int]) -> None:
        """The KV slots of requests that ended may be reused."""
        for slot in slots:
            self._backend.release(slot)

    def _prefill(
        self,
        reqs: list[Request],
        rows: list[int],
        output: SchedulerOutput,
        logits: dict[int, FloatArray],
        result: RunnerOutput,
    ) -> None:
        """The prompt chunks of `rows`: in one call where the backend batches prompts."""
        plan = output.plan
        slots = [int(plan.slots[r]) for r in rows]
        ends = [int(plan.starts[r] + plan.counts[r]) for r in rows]
        prefixes = [output.prefixes.get(r) for r in rows]
        # (A chunk reading its prefix elsewhere is its whole remaining prompt, two tokens at
        # least (shared_prefix.join_leaders): _chunk_start leaves it where the prefix ends.)
        starts = [_chunk_start(int(plan.starts[r]), end) for r, end in zip(rows, ends, strict=True)]
        chunks = [
            reqs[r].tokens[start:end] for r, start, end in zip(rows, starts, ends, strict=True)
        ]
        if len(rows) > 1 and self._batched is not None:
            try:
                out = self._prefill_rows(slots, chunks, starts, prefixes)
            except Exception:
                # Find the culprit: one failing request must fail alone, not its whole batch.
                logger.warning(
                    "engine %s: batched prefill failed; retrying rows alone",
                    self.name,
                    exc_info=True,
                )
            else:
                logits.update(zip(rows, out, strict=True))
                return
        failed: set[int] = set()  # slots whose chunk failed: no prefix is read from them
        for row, slot, chunk, start, prefix in zip(
            rows, slots, chunks, starts, prefixes, strict=True
        ):
            try:
                if prefix is not None:
                    if prefix[0] in failed:
                        raise RuntimeError(f"the prompt it shares failed in slot {prefix[0]}")
                    logits[row] = self._prefill_rows([slot], [chunk], [start], [prefix])[0]
                else:
                    logits[row] = self._backend.prefill(slot, chunk, start)
            except Exception:
                req = reqs[row]
                logger.exception("engine %s: prefill failed for %s", self.name, req.request_id)
                result.errors[row] = "prefill failed for this request"
                failed.add(slot)

    def _mixed(
        self,
        reqs: list[Request],
        decode_rows: npt.NDArray[np.intp],
        prefill_rows: list[int],
        output: SchedulerOutput,
        logits: dict[int, FloatArray],
    ) -> bool:
        """Decode rows and prompt chunks in one call where the backend computes both alike
        (`mixed_steps`: one pass over the weights a step); False to run them apart, as where
        the call fails (a failing row then fails alone)."""
        if not self.mixed_steps:
            return False
        plan = output.plan
        rows = [*decode_rows.tolist(), *prefill_rows]
        starts = [int(plan.starts[r]) for r in rows]
        chunks = [
            reqs[r].tokens[start : start + int(plan.counts[r])]
            for r, start in zip(rows, starts, strict=True)
        ]
        prefixes = [output.prefixes.get(r) for r in rows]
        try:
            out = self._prefill_rows([int(plan.slots[r]) for r in rows], chunks, starts, prefixes)
        except Exception:
            logger.warning(
                "engine %s: mixed step failed; running its rows apart", self.name, exc_info=True
            )
            return False
        logits.update(zip(rows, out, strict=True))
        return True

    def _decode(
        self,
        reqs: list[Request],
        rows: npt.NDArray[np.intp],
        slots: npt.NDArray[np.int32],
        starts: npt.NDArray[np.int32],
        logits: dict[int, FloatArray],
        result: RunnerOutput,
    ) -> None:
        tokens = np.fromiter(
            (reqs[r].tokens[starts[r]] for r in rows), dtype=np.int64, count=len(rows)
        )
        try:
            out = self._backend.decode(
                slots[rows].astype(np.int64), tokens, starts[rows].astype(np.int64)
            )
        except Exception:
            if len(rows) == 1:
                req = reqs[int(rows[0])]
                logger.exception("engine %s: decode failed for %s", self.name, req.request_id)
                result.errors[int(rows[0])] = "decode failed for this request"
                return
            # Find the culprit: one failing request must fail alone, not its whole batch.
            logger.warning("engine %s: batched decode failed; retrying rows alone", self.name)
            for k in range(len(rows)):
                self._decode(reqs, rows[k : k + 1], slots, starts, logits, result)
            return
        for k, row in enumerate(rows.tolist()):
            logits[row] = out[k]

    def _sample(
        self,
        reqs: list[Request],
        rows: list[int],
        logits: dict[int, FloatArray],
        result: RunnerOutput,
    ) -> None:
        batch = [reqs[r] for r in rows]
        try:
            tokens = sample(batch, [logits[r] for r in rows])
        except Exception as exc:
            if len(rows) == 1:
                if isinstance(exc, masks.ConstraintError):
                    result.errors[rows[0]] = str(exc)
                    return
                logger.exception(
                    "engine %s: sampling failed for %s", self.name, batch[0].request_id
                )
                result.errors[rows[0]] = "sampling failed for this request"
                return
            logger.warning("engine %s: batched sampling failed; retrying rows alone", self.name)
            for row in rows:
                self._sample(reqs, [row], logits, result)
            return
        for k, error in masks.advance(batch, tokens).items():
            result.errors[rows[k]] = error
            tokens[k] = -1
        result.tokens.update((r, t) for r, t in zip(rows, tokens, strict=True) if t >= 0)


def _as_block(rows: list[FloatArray]) -> FloatArray:
    """The rows as one C-contiguous [n, vocab] float32 array: a view where they already lie
    back to back in one array (a decode step's logits, in order), else a copy. Stacking 16 rows
    of SmolLM2's 49,152 logits copied 3 MB a step: ~250 us (Intel Xeon), 1-2% of a decode
    step."""
    first = rows[0]
    base = first.base
    vocab = first.shape[0] if first.ndim == 1 else -1
    if (
        vocab > 0
        and isinstance(base, np.ndarray)
        and base.dtype == np.float32
        and base.flags.c_contiguous
    ):
        pitch = vocab * base.itemsize
        start = first.__array_interface__["data"][0]
        origin = base.__array_interface__["data"][0]
        if (start - origin) % base.itemsize == 0 and all(
            row.base is base
            and row.dtype == np.float32
            and row.shape == first.shape
            and row.flags.c_contiguous
            and row.__array_interface__["data"][0] == start + k * pitch
            for k, row in enumerate(rows)
        ):
            offset = (start - origin) // base.itemsize
            flat = base.reshape(-1)  # a view: the base is contiguous
            return flat[offset : offset + len(rows) * vocab].reshape(len(rows), vocab)
    return np.ascontiguousarray(np.stack(rows), dtype=np.float32)


def _plain_greedy(req: Request) -> bool:
    """Greedy with no penalty and no grammar: the native sampler's choice is the first
    largest logit, NumPy's argmax."""
    p = req.params
    return (
        p.temperature == 0.0
        and p.repetition_penalty == 1.0
        and p.presence_penalty == 0.0
        and p.frequency_penalty == 0.0
        and req.grammar is None
    )


def sample(reqs: list[Request], logits: list[FloatArray]) -> list[int]:
    """One token per request from its logits row, with its sampling parameters and seed, over
    its token history (penalties): the native sampler, one call for the batch. Plain greedy
    float32 rows take each row's argmax instead: the same tokens without the history and
    parameter arrays the native call needs. At one stream that Python ran cold after each step
    (the weights just streamed through the caches): the engine thread held the GIL ~21% less
    with this path (py-spy), though tokens a second moved within noise."""
    if all(_plain_greedy(r) for r in reqs) and all(
        row.dtype == np.float32 and row.ndim == 1 for row in logits
    ):
        picked = [int(row.argmax()) for row in logits]
        if not any(row[t] != row[t] for row, t in zip(logits, picked, strict=True)):
            return picked  # (a NaN row goes to the native sampler, as it always did)
    n = len(reqs)
    stacked = _as_block(logits)
    p = [r.params for r in reqs]
    lengths = np.fromiter((r.num_tokens for r in reqs), dtype=np.int64, count=n)
    offsets = np.zeros(n + 1, dtype=np.int64)
    np.cumsum(lengths, out=offsets[1:])
    history = np.concatenate([r.tokens[: r.num_tokens] for r in reqs])
    allowed = masks.fill(reqs, stacked.shape[1])
    tokens = _native.sample(
        logits=stacked,
        temperature=np.array([x.temperature for x in p], dtype=np.float32),
        top_k=np.array([x.top_k for x in p], dtype=np.int32),
        top_p=np.array([x.top_p for x in p], dtype=np.float32),
        min_p=np.array([x.min_p for x in p], dtype=np.float32),
        repetition_penalty=np.array([x.repetition_penalty for x in p], dtype=np.float32),
        presence_penalty=np.array([x.presence_penalty for x in p], dtype=np.float32),
        frequency_penalty=np.array([x.frequency_penalty for x in p], dtype=np.float32),
        seeds=np.array([r.seed for r in reqs], dtype=np.uint64),
        tokens=history,
        offsets=offsets,
        prompt_lens=np.array([r.num_prompt for r in reqs], dtype=np.int64),
        masks=None if allowed is None else allowed[0],
        mask_rows=None if allowed is None else allowed[1],
    )
    out: list[int] = tokens.tolist()
    return out
