"""A remote KServe v2 (Open Inference Protocol) gRPC server as a RequestEngine: KServe's
ModelServer, Triton (TensorRT-LLM or vLLM backends), or any server of the `inference`
GRPCInferenceService (backends/kserve/grpc_predict_v2.proto).

Two ways to generate, chosen by KServeConfig.stream:
- ModelStreamInfer (Triton's bidirectional stream, for decoupled models): one request is written,
  the sending side closed, and each response is a piece of text until the server ends the stream
  (or marks a response `triton_final_response`);
- ModelInfer (the protocol's unary call, all that KServe's own ModelServer offers): the whole
  text in one answer, which must come within read_timeout_s.
'auto' asks the server once, on the first request, whether it has ModelStreamInfer (a stream
opened and closed with no request in it: UNIMPLEMENTED means no), and uses the stream if so.
The probe sends nothing: writing a request into a stream the server has already refused
races with the refusal in grpc, which then reports INTERNAL 'Internal error from Core' instead
of UNIMPLEMENTED (about 1 time in 100 against KServe's ModelServer).

Like OpenAIHttpEngine, chunks carry text (the router rendered the prompt and sends its text);
the last one is a RemoteChunk with the finish reason and the model's token counts when it
returns them. Failures raise a RemoteError naming the server; `retryable` is True only while
nothing was emitted and the fault is the server's or the network's (UNAVAILABLE, connection
refused, timeouts, RESOURCE_EXHAUSTED, ABORTED). INVALID_ARGUMENT from the server is a
RemoteStatusError whose `request_fault` makes the router answer INVALID_ARGUMENT.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncGenerator

import grpc

from backends.base import Capabilities, GenerationChunk, GenerationRequest
from backends.kserve import grpc_predict_v2_pb2 as pb
from backends.kserve import grpc_predict_v2_pb2_grpc as pb_grpc
from backends.kserve.config import KServeConfig
from backends.kserve.wire import (
    finish_reason,
    infer_request,
    read_response,
    status_error,
    utf8_decoder,
)
from backends.remote import RemoteChunk, RemoteError, RemoteStatusError, RemoteTimeout

logger = logging.getLogger(__name__)

_INCONCLUSIVE = frozenset(
    {
        grpc.StatusCode.UNAVAILABLE,
        grpc.StatusCode.DEADLINE_EXCEEDED,
        grpc.StatusCode.CANCELLED,
        grpc.StatusCode.INTERNAL,
        grpc.StatusCode.UNKNOWN,
    }
)
"""Probe outcomes that say nothing about whether ModelStreamInfer exists."""


class _StreamUnimplemented(Exception):
    """The server has no ModelStreamInfer."""


class KServeEngine:
    """RequestEngine on a remote KServe v2 gRPC server (see the module docstring)."""

    def __init__(self, config: KServeConfig, *, max_slots: int = 64) -> None:
        self.config = config.validate().require_endpoint()
        cfg = self.config
        self.capabilities = Capabilities(
            generate=True,
            embed=False,
            stream=cfg.stream != "off",
            device=f"remote grpc://{cfg.target}",
            max_batch=max_slots,
            context_length=cfg.context_length,
            text_output=True,
            stop_strings=False,  # the protocol has no stop strings: the router cuts them
        )
        self.vocab_size = cfg.vocab_size
        self.max_slots = max_slots
        self.max_context = cfg.context_length
        self._channel: grpc.aio.Channel | None = None
        self._stub: pb_grpc.GRPCInferenceServiceAsyncStub | None = None
        self._closing: asyncio.Task[None] | None = None
        self._active = 0
        self.streaming: bool | None = False if cfg.stream == "off" else None
        """Whether requests use ModelStreamInfer: False for stream 'off', else whether the
        server has it, learned by the first request (None until then)."""

    @property
    def num_active(self) -> int:
        """Requests in flight now."""
        return self._active

    def start(self) -> None:
        """Open the channel (one HTTP/2 connection for every request); sends nothing."""
        if self._channel is not None:
            return
        # No transparent retries: a retry is the router's decision (another replica). A local
        # subchannel pool gives the engine its own connection, whose state _connect() reads,
        # rather than one shared with every channel of this process to the same address.
        self._channel = grpc.aio.insecure_channel(
            self.config.target,
            options=[("grpc.enable_retries", 0), ("grpc.use_local_subchannel_pool", 1)],
        )
        self._stub = pb_grpc.GRPCInferenceServiceStub(self._channel)

    async def aclose(self) -> None:
        """Close the channel, cancelling calls in flight."""
        channel, self._channel, self._stub = self._channel, None, None
        if channel is not None:
            await channel.close()

    def stop(self) -> None:
        """Close the channel: scheduled on the running loop (await aclose() to wait for it)."""
        if self._channel is None:
            return
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            self._channel = self._stub = None  # no loop to close on; it goes with the process
            return
        self._closing = loop.create_task(self.aclose())

    @property
    def stub(self) -> pb_grpc.GRPCInferenceServiceAsyncStub:
        if self._stub is None:
            self.start()
        assert self._stub is not None
        return self._stub

    async def _connect(self) -> None:
        """Return once the channel is connected or has failed to (then the call fails at once
        with UNAVAILABLE); RemoteTimeout when neither happens within connect_timeout_s, e.g. a
        server that accepts TCP connections but never answers."""
        self.start()
        channel = self._channel
        assert channel is not None
        state = channel.get_state(try_to_connect=True)
        settled = (
            grpc.ChannelConnectivity.READY,
            grpc.ChannelConnectivity.TRANSIENT_FAILURE,
            grpc.ChannelConnectivity.SHUTDOWN,
        )
        if state in settled:
            return

        async def settle() -> None:
            current = state
            while current not in settled:
                await channel.wait_for_state_change(current)
                current = channel.get_state(try_to_connect=True)

        try:
            await asyncio.wait_for(settle(), self.config.connect_timeout_s)
        except TimeoutError:
            raise RemoteTimeout(
                f"grpc://{self.config.target}",
                f"no connection within connect_timeout_s={self.config.connect_timeout_s}",
                retryable=True,
            ) from None

    async def ready(self, timeout_s: float | None = None) -> bool:
        """Whether ServerReady and ModelReady (config.model) both answer true: a health probe
        that never raises and waits at most timeout_s per step (None: connect_timeout_s)."""
        cfg = self.config
        wait = cfg.connect_timeout_s if timeout_s is None else timeout_s
        try:
            await self._connect()
            server = await self.stub.ServerReady(pb.ServerReadyRequest(), timeout=wait)
            if not server.ready:
                logger.info("grpc://%s is not ready", cfg.target)
                return False
            model = await self.stub.ModelReady(
                pb.ModelReadyRequest(name=cfg.model, version=cfg.model_version), timeout=wait
            )
        except (grpc.aio.AioRpcError, RemoteError) as exc:
            logger.info("grpc://%s is not ready: %s", cfg.target, exc)
            return False
        if not model.ready:
            logger.warning("grpc://%s: model %r is not ready", cfg.target, cfg.model)
            return False
        return True

    async def generate(self, request: GenerationRequest) -> AsyncGenerator[GenerationChunk, None]:
        """Stream `request`. Its first step, before any I/O, refuses fields the model cannot
        take (UnsupportedParameter). Closing the iterator (or cancelling the task awaiting it)
        cancels the call, which the server sees as a cancelled RPC."""
        # Validated up front so that a refused field never reaches the server.
        message = infer_request(request, self.config, stream=self.streaming is not False)
        url = f"grpc://{self.config.target}"
        self._active += 1
        try:
            await self._connect()
            if self.streaming is None:
                self.streaming = await self._probe_stream(url)
                if self.streaming is False:
                    message = infer_request(request, self.config, stream=False)
            if self.streaming is False and self.config.stream == "on":
                raise RemoteStatusError(
                    url,
                    "UNIMPLEMENTED: the server has no ModelStreamInfer, which stream='on' "
                    "requires; use stream 'auto' or 'off'",
                    code=grpc.StatusCode.UNIMPLEMENTED,
                    retryable=False,
                )
            if self.streaming is not False:
                try:
                    # aclosing: closing this iterator closes the stream's at once (its call).
                    async with contextlib.aclosing(self._streamed(message, request, url)) as s:
                        async for chunk in s:
                            yield chunk
                    return
                except _StreamUnimplemented:
                    logger.info("%s has no ModelStreamInfer: using ModelInfer from now on", url)
                    self.streaming = False
                    message = infer_request(request, self.config, stream=False)
            yield await self._unary(message, request, url)
        except RemoteError as exc:
            logger.warning("request %s failed: %s", request.request_id, exc)
            raise
        finally:
            self._active -= 1

    async def _probe_stream(self, url: str) -> bool | None:
        """Whether the server has ModelStreamInfer: a stream with no request in it ends OK (or
        with another answer of the method) where it does, UNIMPLEMENTED where it does not;
        None when the probe is inconclusive (unreachable, timed out)."""
        call = self.stub.ModelStreamInfer(timeout=self.config.connect_timeout_s)
        try:
            # Fails only if the call has ended already; its status below says how.
            with contextlib.suppress(Exception):
                await call.done_writing()
            code = await call.code()
        finally:
            call.cancel()
        if code == grpc.StatusCode.UNIMPLEMENTED:
            logger.info("%s has no ModelStreamInfer: using ModelInfer", url)
            return False
        if code in _INCONCLUSIVE:
            logger.info("%s: ModelStreamInfer probe inconclusive (%s)", url, code.name)
            return None
        return True

    async def _unary(
        self, message: pb.ModelInferRequest, request: GenerationRequest, url: str
    ) -> GenerationChunk:
        call = self.stub.ModelInfer(message, timeout=self.config.read_timeout_s)
        try:
            response = await call
        except grpc.aio.AioRpcError as exc:
            raise status_error(url, exc, emitted=False) from None
        finally:
            call.cancel()  # a no-op once answered; stops the server's work when we were cancelled
        piece = read_response(url, response, self.config, emitted=False)
        return RemoteChunk(
            token_ids=(),
            text=piece.text.decode("utf-8", errors="replace"),
            finish_reason=finish_reason(
                piece.finish_reason, piece.completion_tokens, 0, request.max_tokens
            ),
            prompt_tokens=piece.prompt_tokens,
            completion_tokens=piece.completion_tokens,
        )

    async def _streamed(
        self, message: pb.ModelInferRequest, request: GenerationRequest, url: str
    ) -> AsyncGenerator[GenerationChunk, None]:
        """ModelStreamInfer for one request. Raises _StreamUnimplemented, before yielding, when
        the server lacks it and stream is 'auto'."""
        cfg = self.config
        call = self.stub.ModelStreamInfer()
        decoder = utf8_decoder()
        pieces = 0
        reason: str | None = None
        counts: tuple[int | None, int | None] = (None, None)
        try:
            await call.write(message)
            await call.done_writing()
            while True:
                try:
                    response = await asyncio.wait_for(call.read(), cfg.read_timeout_s)
                except TimeoutError:
                    raise RemoteTimeout(
                        url,
                        f"read timeout: no response within read_timeout_s={cfg.read_timeout_s}",
                        retryable=pieces == 0,
                    ) from None
                if response is grpc.aio.EOF:
                    break
                self.streaming = True  # 'auto' has its answer: the server streams
                assert isinstance(response, pb.ModelStreamInferResponse)
                if response.error_message:
                    detail = " ".join(response.error_message.split())[:300]
                    raise RemoteStatusError(
                        url,
                        f"error in stream: {detail}",
                        code=grpc.StatusCode.UNKNOWN,
                        retryable=False,
                    )
                piece = read_response(url, response.infer_response, cfg, emitted=pieces > 0)
                reason = piece.finish_reason or reason
                counts = (
                    piece.prompt_tokens if piece.prompt_tokens is not None else counts[0],
                    piece.completion_tokens if piece.completion_tokens is not None else counts[1],
                )
                text = decoder.decode(piece.text)
                if piece.text:
                    pieces += 1
                if text:
                    yield GenerationChunk(token_ids=(), text=text)
                if piece.final:
                    break
        except grpc.aio.AioRpcError as exc:
            if exc.code() == grpc.StatusCode.UNIMPLEMENTED and cfg.stream == "auto" and pieces == 0:
                raise _StreamUnimplemented from None
            raise status_error(url, exc, emitted=pieces > 0) from None
        finally:
            call.cancel()
        yield RemoteChunk(
            token_ids=(),
            text=decoder.decode(b"", final=True),
            finish_reason=finish_reason(reason, counts[1], pieces, request.max_tokens),
            prompt_tokens=counts[0],
            completion_tokens=counts[1],
        )
