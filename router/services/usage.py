"""UsageService: proto ↔ domain translation only (router/control/usage.py)."""

from __future__ import annotations

import time
from typing import Any

import grpc

from router.control import usage
from router.control.usage import UsageRecorder
from router.proto.irouter.v1 import usage_service_pb2 as pb
from router.registry.database import call

Context = grpc.aio.ServicerContext[Any, Any]
DAY_S = 86_400.0


class UsageServicer:
    def __init__(self, recorder: UsageRecorder) -> None:
        self._recorder = recorder

    async def GetUsage(self, request: pb.GetUsageRequest, context: Context) -> pb.GetUsageResponse:
        end = request.end_time.ToNanoseconds() / 1e9 if request.HasField("end_time") else None
        end = time.time() + 60 if end is None else end  # this minute included
        start = (
            request.start_time.ToNanoseconds() / 1e9
            if request.HasField("start_time")
            else end - DAY_S
        )
        await self._recorder.flush()  # what this router counted so far is included
        rows = await call(usage.query, self._recorder.engine, start, end, list(request.group_by))
        return pb.GetUsageResponse(
            rows=[
                pb.UsageRow(
                    tenant=r.tenant,
                    key=r.key,
                    deployment=r.deployment,
                    model=r.model,
                    version=r.version,
                    day=r.day,
                    currency=r.currency,
                    calls=r.calls,
                    input_tokens=r.input_tokens,
                    output_tokens=r.output_tokens,
                    cost=format(r.cost.normalize(), "f"),
                )
                for r in rows
            ]
        )
