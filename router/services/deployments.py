"""DeploymentService: proto ↔ domain translation only. What a change does is router/control/,
what is stored router/registry/deployments.py."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import grpc

from router.control.deployments import DeploymentController
from router.errors import InvalidArgument, NotFound
from router.guard.limits.config import TierLimits
from router.proto.irouter.v1 import deployment_service_pb2 as pb
from router.registry.deployments import Deployment, ReplicaSpec, Rollout
from router.registry.model_versions import check_name
from router.services.models import actor

Context = grpc.aio.ServicerContext[Any, Any]
_ROLLOUT_STATES = {
    "running": pb.ROLLOUT_STATE_RUNNING,
    "completed": pb.ROLLOUT_STATE_COMPLETED,
    "rolled_back": pb.ROLLOUT_STATE_ROLLED_BACK,
}


WATCH_POLL_S = 0.25
"""How often a watch looks at its deployment (the registry, and this router's replicas)."""


def _changed(before: pb.Deployment, after: pb.Deployment) -> bool:
    return before.generation != after.generation or list(before.replica_states) != list(
        after.replica_states
    )


def deployment_from_pb(m: pb.Deployment) -> Deployment:
    return Deployment(
        name=m.name,
        model_name=m.model_name,
        model_version=m.model_version,
        replicas=tuple(
            ReplicaSpec(
                name=r.name,
                backend=r.backend or "onnxruntime",
                device=r.device,
                url=r.url,
                remote_model=r.remote_model,
                weight=r.weight or 1.0,
                dialect=r.dialect,
                api_key_env=r.api_key_env,
                api_version=r.api_version,
            )
            for r in m.replicas
        ),
        threads=m.threads or 2,
        max_slots=m.max_slots or 16,
        max_context=m.max_context,
        prefix_cache_mb=m.prefix_cache_mb if m.HasField("prefix_cache_mb") else 128,
        prefill_graph=m.prefill_graph or "auto",
        decode_kernel=m.decode_kernel or "auto",
        require_auth=m.require_auth,
        limits={
            t.tier: TierLimits(t.requests_per_minute, t.tokens_per_minute, t.max_concurrent_streams)
            for t in m.limits
        },
    )


class DeploymentServicer:
    """Deployments over gRPC (and REST, transcoded)."""

    def __init__(self, control: DeploymentController) -> None:
        self._control = control

    def _pb(self, d: Deployment) -> pb.Deployment:
        message = pb.Deployment(
            name=d.name,
            model_name=d.model_name,
            model_version=d.model_version,
            replicas=[
                pb.Replica(
                    name=r.name,
                    backend=r.backend,
                    device=r.device,
                    url=r.url,
                    remote_model=r.remote_model,
                    weight=r.weight,
                    model_version=r.model_version,
                    dialect=r.dialect,
                    api_key_env=r.api_key_env,
                    api_version=r.api_version,
                )
                for r in d.replicas
            ],
            threads=d.threads,
            max_slots=d.max_slots,
            max_context=d.max_context,
            prefix_cache_mb=d.prefix_cache_mb,
            prefill_graph=d.prefill_graph,
            decode_kernel=d.decode_kernel,
            replica_states=[
                pb.ReplicaState(name=s.name, ready=s.ready, error=s.error)
                for s in self._control.status(d)
            ],
            generation=d.generation,
            created_by=d.created_by,
            require_auth=d.require_auth,
            limits=[
                pb.TierLimit(
                    tier=tier,
                    requests_per_minute=lim.requests_per_minute,
                    tokens_per_minute=lim.tokens_per_minute,
                    max_concurrent_streams=lim.max_concurrent_streams,
                )
                for tier, lim in sorted(d.limits.items())
            ],
        )
        message.create_time.FromNanoseconds(int(d.created_at * 1e9))
        message.update_time.FromNanoseconds(int(d.updated_at * 1e9))
        r = d.rollout
        if r is not None:
            message.rollout.CopyFrom(
                pb.Rollout(
                    target_version=r.target_version,
                    from_version=r.from_version,
                    steps=list(r.steps),
                    step=r.step,
                    step_interval_s=r.step_interval_s,
                    max_error_rate=r.max_error_rate,
                    max_ttft_p95_s=r.max_ttft_p95_s,
                    min_calls=r.min_calls,
                    state=_ROLLOUT_STATES[r.state],
                    reason=r.reason,
                    owner=r.owner,
                )
            )
        return message

    async def RolloutDeployment(
        self, request: pb.RolloutDeploymentRequest, context: Context
    ) -> pb.RolloutDeploymentResponse:
        check_name(request.name)
        given: dict[str, Any] = {
            "max_ttft_p95_s": request.max_ttft_p95_s,
            "min_calls": request.min_calls,
        }
        if request.steps:
            given["steps"] = tuple(request.steps)
        if request.step_interval_s:
            given["step_interval_s"] = request.step_interval_s
        if request.HasField("max_error_rate"):
            given["max_error_rate"] = request.max_error_rate
        rollout = Rollout(target_version=request.target_version, **given)
        template = None
        if request.HasField("target_replica"):
            t = request.target_replica
            template = ReplicaSpec(
                name="r0",
                backend=t.backend or "onnxruntime",
                device=t.device,
                url=t.url,
                remote_model=t.remote_model,
                weight=t.weight or 1.0,
                dialect=t.dialect,
                api_key_env=t.api_key_env,
                api_version=t.api_version,
            )
        started = await self._control.rollout(
            request.name,
            rollout,
            actor(),
            expected_generation=request.expected_generation,
            template=template,
        )
        return pb.RolloutDeploymentResponse(deployment=self._pb(started))

    async def CreateDeployment(
        self, request: pb.CreateDeploymentRequest, context: Context
    ) -> pb.CreateDeploymentResponse:
        if not request.HasField("deployment"):
            raise InvalidArgument("deployment is required", field="deployment")
        created = await self._control.create(deployment_from_pb(request.deployment), actor())
        return pb.CreateDeploymentResponse(deployment=self._pb(created))

    async def GetDeployment(
        self, request: pb.GetDeploymentRequest, context: Context
    ) -> pb.GetDeploymentResponse:
        check_name(request.name)
        return pb.GetDeploymentResponse(deployment=self._pb(await self._control.get(request.name)))

    async def ListDeployments(
        self, request: pb.ListDeploymentsRequest, context: Context
    ) -> pb.ListDeploymentsResponse:
        found = await self._control.all()
        return pb.ListDeploymentsResponse(deployments=[self._pb(d) for d in found])

    async def ScaleDeployment(
        self, request: pb.ScaleDeploymentRequest, context: Context
    ) -> pb.ScaleDeploymentResponse:
        check_name(request.name)
        scaled = await self._control.scale(
            request.name,
            request.replica_count,
            actor(),
            expected_generation=request.expected_generation,
        )
        return pb.ScaleDeploymentResponse(deployment=self._pb(scaled))

    async def WatchDeployment(
        self, request: pb.WatchDeploymentRequest, context: Context
    ) -> AsyncIterator[pb.WatchDeploymentResponse]:
        check_name(request.name)
        last: pb.Deployment | None = None
        while True:
            try:
                d = await self._control.get(request.name)
            except NotFound:
                if last is None:
                    raise
                return  # deleted: the watch is over
            now = self._pb(d)
            if last is None or _changed(last, now):
                yield pb.WatchDeploymentResponse(deployment=now)
                last = now
            await asyncio.sleep(WATCH_POLL_S)

    async def DeleteDeployment(
        self, request: pb.DeleteDeploymentRequest, context: Context
    ) -> pb.DeleteDeploymentResponse:
        check_name(request.name)
        await self._control.delete(request.name, actor())
        return pb.DeleteDeploymentResponse()
