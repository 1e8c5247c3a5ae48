"""The router's gRPC API as a load-test target: Generate (streamed), Complete, Embed, Search,
ListModels, over one grpc.aio channel per client process."""

from __future__ import annotations

import asyncio
import time
from typing import TYPE_CHECKING

import grpc
from google.rpc import error_details_pb2
from grpc_status import rpc_status

from loadtest.harness.record import RequestRecord
from loadtest.harness.scenario import Scenario
from loadtest.harness.targets.call import Call
from router.proto.irouter.v1 import inference_service_pb2 as pb
from router.proto.irouter.v1 import inference_service_pb2_grpc as pb_grpc
from router.proto.irouter.v1 import retrieval_service_pb2 as rpb
from router.proto.irouter.v1 import retrieval_service_pb2_grpc as rpb_grpc

if TYPE_CHECKING:
    from router.proto.irouter.v1.inference_service_pb2_grpc import InferenceServiceAsyncStub
    from router.proto.irouter.v1.retrieval_service_pb2_grpc import RetrievalServiceAsyncStub

_CONNECT_TIMEOUT_S = 10.0


class GrpcTarget:
    def __init__(self, scenario: Scenario) -> None:
        self._s = scenario
        self._channel: grpc.aio.Channel | None = None
        self._inference: InferenceServiceAsyncStub | None = None
        self._retrieval: RetrievalServiceAsyncStub | None = None

    async def start(self) -> None:
        self._channel = grpc.aio.insecure_channel(self._s.address)
        try:
            await asyncio.wait_for(self._channel.channel_ready(), _CONNECT_TIMEOUT_S)
        except TimeoutError:
            raise ConnectionError(
                f"no gRPC server answered at {self._s.address} in {_CONNECT_TIMEOUT_S:g} s"
            ) from None
        self._inference = pb_grpc.InferenceServiceStub(self._channel)
        self._retrieval = rpb_grpc.RetrievalServiceStub(self._channel)

    async def aclose(self) -> None:
        if self._channel is not None:
            await self._channel.close()

    def _chat(self, call: Call) -> pb.ChatMessages:
        return pb.ChatMessages(
            messages=[pb.ChatMessage(role=r, content=c) for r, c in call.prompt.messages]
        )

    def _sampling(self, call: Call) -> pb.SamplingParams:
        return pb.SamplingParams(
            max_tokens=call.max_tokens,
            temperature=self._s.temperature,
            ignore_eos=self._s.ignore_eos,
        )

    async def call(self, call: Call) -> RequestRecord:
        assert self._inference is not None and self._retrieval is not None, "start() first"
        record = RequestRecord(call.method, time.perf_counter())
        timeout = self._s.timeout_s
        try:
            if call.method == "Generate":
                await self._generate(call, record)
            elif call.method == "Complete":
                answer = await self._inference.Complete(
                    pb.CompleteRequest(
                        model=self._s.model, chat=self._chat(call), sampling=self._sampling(call)
                    ),
                    timeout=timeout,
                )
                record.end = time.perf_counter()
                record.ttft = record.end - record.start
                record.input_tokens = answer.usage.prompt_tokens
                record.output_tokens = answer.usage.completion_tokens
            elif call.method == "Embed":
                embedded = await self._inference.Embed(
                    pb.EmbedRequest(model=self._s.embed_model, texts=[call.prompt.text]),
                    timeout=timeout,
                )
                record.input_tokens = embedded.usage.prompt_tokens
            elif call.method == "Search":
                assert self._s.collection is not None
                await self._retrieval.Search(
                    rpb.SearchRequest(
                        collection=self._s.collection, text=call.prompt.text, top_k=self._s.top_k
                    ),
                    timeout=timeout,
                )
            elif call.method == "ListModels":
                await self._inference.ListModels(pb.ListModelsRequest(), timeout=timeout)
            else:
                raise ValueError(f"unknown gRPC method {call.method!r}")
        except grpc.aio.AioRpcError as exc:
            record.status = f"grpc:{exc.code().name}"
            record.error = (exc.details() or "")[:200]
            record.retry_after = _retry_delay(exc)
        except Exception as exc:
            record.status = f"client:{type(exc).__name__}"
            record.error = str(exc)[:200]
        if not record.end:
            record.end = time.perf_counter()
        return record

    async def _generate(self, call: Call, record: RequestRecord) -> None:
        assert self._inference is not None
        request = pb.GenerateRequest(
            model=self._s.model,
            chat=self._chat(call),
            sampling=self._sampling(call),
            return_token_ids=True,  # exact tokens per chunk, for the output token count
        )
        last = 0.0
        tokens = 0
        async for chunk in self._inference.Generate(request, timeout=self._s.timeout_s):
            now = time.perf_counter()
            if chunk.text or chunk.token_ids:
                if record.ttft is None:
                    record.ttft = now - record.start
                else:
                    record.itl.append(now - last)
                last = now
                tokens += len(chunk.token_ids)
            if chunk.finish_reason:
                record.input_tokens = chunk.usage.prompt_tokens
                tokens = chunk.usage.completion_tokens or tokens
        record.end = time.perf_counter()
        record.output_tokens = tokens


def _retry_delay(error: grpc.aio.AioRpcError) -> float | None:
    """The google.rpc.RetryInfo delay of a failed call, if the server sent one."""
    status = rpc_status.from_call(error)  # type: ignore[arg-type]
    if status is None:
        return None
    for detail in status.details:
        if detail.Is(error_details_pb2.RetryInfo.DESCRIPTOR):
            info = error_details_pb2.RetryInfo()
            detail.Unpack(info)
            return info.retry_delay.ToTimedelta().total_seconds()
    return None
