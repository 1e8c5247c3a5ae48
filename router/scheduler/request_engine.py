"""Serving over a request engine (backends.base.RequestEngine): a backend that schedules whole
requests itself, e.g. OpenVINO GenAI's continuous batching.

The adapter gives it the same face as DecoderEngine, so the services cannot tell them apart:
it sheds load (router.scheduler.admission), admits at most max_slots requests into the engine at
once (the others wait here, highest priority first, so priority means the same as with the
router's own scheduler and a request cancelled while waiting never reaches the engine), turns
the router's Request into a GenerationRequest, and the engine's chunks back into Chunks. What the
engine leaves to the router is done here, identically for every engine: detokenizing ids into
whole UTF-8 text, stop strings, stop tokens and max_tokens (checked again even when the engine
honours them, so a chunk never runs past the point where the router's own engine would stop).
"""

from __future__ import annotations

import asyncio
import dataclasses
import heapq
import itertools
import logging
import time
from collections.abc import AsyncGenerator, Sequence

from backends.base import (
    GenerationChunk,
    GenerationRequest,
    RequestEngine,
    SamplingParams,
    UnsupportedParameter,
)
from backends.remote import RemoteError
from router.errors import (
    Internal,
    InvalidArgument,
    RouterError,
)
from router.scheduler.admission import Admission
from router.scheduler.detokenizer import Detokenizer, StopStrings, TokenDecoder
from router.scheduler.generation import Chunk, EngineLimits
from router.scheduler.remote_errors import remote_error
from router.scheduler.request import Priority, Request, RequestStatus

logger = logging.getLogger(__name__)


_SAMPLING_FIELDS = tuple(f.name for f in dataclasses.fields(SamplingParams) if f.name != "seed")


def generation_request(request: Request) -> GenerationRequest:
    """The engine's view of a router Request (seed already drawn, max_tokens already set)."""
    p = request.params
    return GenerationRequest(
        request_id=request.request_id,
        prompt_ids=tuple(request.prompt_ids),
        prompt=request.prompt_text,
        seed=request.seed,
        chat=request.chat,
        stream=not request.unary,
        **{name: getattr(p, name) for name in _SAMPLING_FIELDS},
    )


class _Output:
    """One request's output side: the engine's chunks in, the router's Chunks out."""

    def __init__(
        self,
        request: Request,
        decoder: TokenDecoder | None,
        stop_ids: frozenset[int],
        engine_text: bool,
        engine_stops: bool,
    ) -> None:
        self._request = request
        self._stop_ids = frozenset() if request.params.ignore_eos else stop_ids
        self._extra_stops = frozenset(request.params.stop_token_ids)
        stop = () if engine_stops else request.params.stop
        if not engine_text:
            assert decoder is not None, "an engine that streams ids needs the model's tokenizer"
        self._detok = None if engine_text or decoder is None else Detokenizer(decoder, stop)
        self._stops = StopStrings(stop) if engine_text else None
        self._counted = 0  # tokens reported so far for a text-only stream

    def feed(self, piece: GenerationChunk) -> Chunk:
        req = self._request
        status = RequestStatus.RUNNING
        tokens: list[int] = []
        texts: list[str] = []
        for token in piece.token_ids:
            if req.num_output >= req.params.max_tokens:
                status = RequestStatus.FINISHED_LENGTH  # the engine ran past max_tokens
                break
            req.append(token)
            tokens.append(token)
            if token in self._stop_ids or token in self._extra_stops:
                status = RequestStatus.FINISHED_STOPPED
                break
            if self._detok is not None:
                text, hit = self._detok.add(token)
                texts.append(text)
                if hit:
                    status = RequestStatus.FINISHED_STOPPED
                    break
            if req.num_output >= req.params.max_tokens:
                status = RequestStatus.FINISHED_LENGTH
                break
        if self._stops is not None and piece.text and status != RequestStatus.FINISHED_STOPPED:
            text, hit = self._stops.feed(piece.text)
            texts.append(text)
            if hit:
                status = RequestStatus.FINISHED_STOPPED
        filtered = ""
        if status == RequestStatus.RUNNING and piece.finish_reason is not None:
            length = piece.finish_reason == "length"
            status = RequestStatus.FINISHED_LENGTH if length else RequestStatus.FINISHED_STOPPED
            if piece.finish_reason == "content_filter":
                filtered = "the remote server's content filter"
        if status.is_finished:
            # Text held back only because it might have begun a stop string is released.
            if self._detok is not None:
                texts.append(self._detok.flush())
            if self._stops is not None:
                texts.append(self._stops.flush())
        req.status = status
        counted = -1
        if self._stops is not None and not piece.token_ids:
            # A text-only stream: one event per token (llama.cpp, vLLM, trtllm-serve stream so),
            # corrected to the server's own count when its last chunk reports one.
            reported = getattr(piece, "completion_tokens", None)
            event = piece.tokens if piece.tokens >= 0 else int(bool(piece.text or piece.tool_calls))
            total = reported if reported is not None else self._counted + event
            counted, self._counted = max(0, total - self._counted), max(total, self._counted)
        prompt = getattr(piece, "prompt_tokens", None) if status.is_finished else None
        return Chunk(
            tuple(tokens),
            "".join(texts),
            status,
            tokens=counted,
            tool_calls=piece.tool_calls,
            prompt_tokens=-1 if prompt is None else prompt,
            filter_reason=filtered,
        )


class RequestEngineAdapter:
    """GenerationEngine over a RequestEngine (see the module docstring)."""

    def __init__(
        self,
        name: str,
        engine: RequestEngine,
        decoder: TokenDecoder | None,
        limits: EngineLimits,
        stop_ids: Sequence[int],
    ) -> None:
        self.name = name
        self.limits = limits
        self._engine = engine
        self._decoder = decoder
        self._stop_ids = frozenset(stop_ids)
        self._live: set[int] = set()
        self._admission = Admission(name, limits)
        self._admitted = 0
        # (-priority, arrival, future): the future is resolved when a slot passes to it.
        self._waiting: list[tuple[int, int, asyncio.Future[None]]] = []
        self._arrivals = itertools.count()
        self.last_output_at = 0.0

    def start(self) -> None:
        self._engine.start()

    def stop(self) -> None:
        self._engine.stop()

    @property
    def num_unfinished(self) -> int:
        return len(self._live)

    async def _admit(self, request: Request) -> None:
        """Return once the request holds one of the engine's max_slots places."""
        if self._admitted < self.limits.max_slots and not self._waiting:
            self._admitted += 1
            return
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        entry = (-int(request.priority), next(self._arrivals), future)
        heapq.heappush(self._waiting, entry)
        try:
            if self.limits.max_wait_s:
                try:
                    await asyncio.wait_for(future, self._admission.slot_wait_s)
                except TimeoutError:
                    raise self._admission.timed_out(request.priority) from None
            else:
                await future
        except BaseException:
            if future.done() and not future.cancelled():
                self._release()  # admitted just as it left: pass the place on
            else:
                self._waiting.remove(entry)
                heapq.heapify(self._waiting)
            raise

    def _release(self) -> None:
        while self._waiting:
            _, _, future = heapq.heappop(self._waiting)
            if not future.done():
                future.set_result(None)  # the place passes to it
                return
        self._admitted -= 1

    def check_admission(self, priority: Priority) -> None:
        self._admission.check(priority)

    @property
    def num_active(self) -> int:
        return self._engine.num_active

    @property
    def structured_output(self) -> str:
        return "engine" if self._engine.capabilities.structured_output else ""

    async def ready(self, timeout_s: float | None = None) -> bool:
        """The backend's own probe when it has one (remote servers), else True."""
        probe = getattr(self._engine, "ready", None)
        if probe is None:
            return True
        try:
            return bool(await probe(timeout_s))
        except Exception:
            logger.exception("model %s: readiness probe raised", self.name)
            return False

    async def generate(self, request: Request) -> AsyncGenerator[Chunk, None]:
        """Yield chunks until the request finishes. Closing the iterator early (client gone,
        deadline passed, a stop string) closes the engine's iterator, which cancels it there."""
        caps = self._engine.capabilities
        output = _Output(
            request, self._decoder, self._stop_ids, caps.text_output, caps.stop_strings
        )
        self._admission.admit(request.priority)
        self._live.add(request.engine_id)
        try:
            await self._admit(request)
        except BaseException:
            self._live.discard(request.engine_id)
            self._admission.depart(request.priority, held_slot=False)
            request.status = RequestStatus.FINISHED_CANCELLED
            raise
        stream = self._engine.generate(generation_request(request))
        request.slot_at = time.monotonic()
        closed = False
        first = True

        async def close() -> None:
            # Closing the engine's iterator cancels the request there if it had not finished;
            # the engine place passes on at once, not when the caller next resumes us.
            nonlocal closed
            if not closed:
                closed = True
                self._live.discard(request.engine_id)
                try:
                    await stream.aclose()
                finally:
                    self._release()
                    self._admission.depart(request.priority)

        try:
            while True:
                try:
                    piece = await anext(stream)
                except StopAsyncIteration:
                    raise Internal(
                        f"model {self.name!r} ended request {request.request_id} without a "
                        "finish reason"
                    ) from None
                self.last_output_at = now = time.monotonic()
                if first:  # how long a first token takes here once a call has its place
                    self._admission.first_token(now - request.slot_at)
                    first = False
                chunk = output.feed(piece)
                if chunk.status.is_finished:
                    await close()
                    yield chunk
                    return
                yield chunk
        except RemoteError as exc:
            raise remote_error(self.name, exc) from None
        except UnsupportedParameter as exc:
            request.status = RequestStatus.FINISHED_ERROR
            raise InvalidArgument(
                f"sampling.{exc.field}: model {self.name!r} cannot honour it: {exc}",
                field=f"sampling.{exc.field}",
            ) from None
        except ValueError as exc:
            request.status = RequestStatus.FINISHED_ERROR
            raise InvalidArgument(f"model {self.name!r} refused the request: {exc}") from None
        except RouterError:
            request.status = RequestStatus.FINISHED_ERROR
            raise
        except Exception:
            request.status = RequestStatus.FINISHED_ERROR
            logger.exception("engine %s failed request %s", self.name, request.request_id)
            raise Internal(f"model {self.name!r} failed this request") from None
        finally:
            if not request.status.is_finished:
                request.status = RequestStatus.FINISHED_CANCELLED
            await close()
