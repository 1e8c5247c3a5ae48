"""ResourceService: proto ↔ domain translation only (router/control/resources.py)."""

from __future__ import annotations

import asyncio
from typing import Any

import grpc

from router.control import resources
from router.proto.irouter.v1 import resource_service_pb2 as pb
from router.serving.catalog import Catalog

Context = grpc.aio.ServicerContext[Any, Any]


class ResourceServicer:
    def __init__(self, models: Catalog) -> None:
        self._models = models

    async def GetResources(
        self, request: pb.GetResourcesRequest, context: Context
    ) -> pb.GetResourcesResponse:
        # The first call probes OpenVINO and NVML (about a second): on a worker thread.
        host = await asyncio.to_thread(resources.host)
        held = resources.allocations(self._models)
        allocated = sum(a.memory_bytes for a in held)
        return pb.GetResourcesResponse(
            cpu_model=host.cpu_model,
            cpu_cores=host.cores,
            isa_features=list(host.isa_features),
            memory_total_bytes=host.memory_total_bytes,
            memory_available_bytes=host.memory_available_bytes,
            memory_allocatable_bytes=host.allocatable_bytes,
            memory_allocated_bytes=allocated,
            memory_free_bytes=max(0, host.allocatable_bytes - allocated),
            threads_allocated=sum(a.threads for a in held),
            devices=[
                pb.Device(
                    name=d.name, kind=d.kind, description=d.description, memory_bytes=d.memory_bytes
                )
                for d in host.devices
            ],
            absent=[pb.AbsentDevice(kind=kind, reason=why) for kind, why in host.absent],
            allocations=[
                pb.Allocation(
                    model=a.model,
                    replica=a.replica,
                    device=a.device,
                    threads=a.threads,
                    kv_bytes=a.kv_bytes,
                    weight_bytes=a.weight_bytes,
                )
                for a in held
            ],
        )
