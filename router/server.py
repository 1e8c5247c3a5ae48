"""Build and run the grpc.aio server: services, health, reflection, metrics, model loading,
graceful shutdown, and N worker processes sharing one port."""

from __future__ import annotations

import asyncio
import contextlib
import copyreg
import gc
import logging
import multiprocessing
import multiprocessing.connection
import os
import signal
import socket
import types
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from router import logs
from router.cache.embedding import Embedder
from router.cache.response import ResponseCache
from router.cache.semantic import SemanticCache
from router.config import ConfigError, RouterConfig
from router.errors import Unavailable
from router.guard.setup import Guard
from router.proto.irouter.v1 import deployment_service_pb2 as deployment_pb
from router.proto.irouter.v1 import inference_service_pb2 as pb
from router.proto.irouter.v1 import model_service_pb2 as model_pb
from router.proto.irouter.v1 import resource_service_pb2 as resource_pb
from router.proto.irouter.v1 import retrieval_service_pb2 as retrieval_pb
from router.proto.irouter.v1 import usage_service_pb2 as usage_pb
from router.retrieval.rag import Retriever
from router.retrieval.store import CollectionStore
from router.services.inference import InferenceServicer
from router.services.retrieval import RetrievalServicer
from router.services.rpc import add_service
from router.serving.answer import Answering
from router.serving.catalog import Catalog
from router.serving.lifecycle import Lifecycle
from router.telemetry import Metrics
from router.tls import CertificateReloader

if TYPE_CHECKING:
    from sqlalchemy.engine import Engine

    from router.control.deployments import DeploymentController
    from router.control.usage import UsageRecorder
    from router.guard.chain import GuardChain

logger = logging.getLogger(__name__)

INFERENCE_SERVICE = pb.DESCRIPTOR.services_by_name["InferenceService"]
RETRIEVAL_SERVICE = retrieval_pb.DESCRIPTOR.services_by_name["RetrievalService"]
MODEL_SERVICE = model_pb.DESCRIPTOR.services_by_name["ModelService"]
DEPLOYMENT_SERVICE = deployment_pb.DESCRIPTOR.services_by_name["DeploymentService"]
RESOURCE_SERVICE = resource_pb.DESCRIPTOR.services_by_name["ResourceService"]
USAGE_SERVICE = usage_pb.DESCRIPTOR.services_by_name["UsageService"]
"""Longest sleep of the health-check loop between two looks at what is due."""
SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


class RouterServer:
    """One router process. `start()` binds and begins loading models in the background;
    health turns SERVING per model as each is warm."""

    def __init__(self, config: RouterConfig, *, worker: int = 0) -> None:
        self.config = config
        self.metrics = Metrics()
        self.models = Catalog(config.models, config.model_cache, self.metrics, config.routing)
        # Deployments may also be created at run time: replicas are watched from the start.
        self.metrics.watch_replicas(self.models.replica_samples)
        self.health = health.aio.HealthServicer()
        self.serving = Lifecycle(self.models, self.health, self.metrics)
        """Models and deployments added, scaled and removed while serving."""
        self.models.on_routing_change = self.serving.routing_changed
        self.port = 0
        self.tls: CertificateReloader | None = None
        self._worker = worker
        self._loading: asyncio.Task[None] | None = None
        s = config.server
        options = [
            ("grpc.max_receive_message_length", s.max_message_bytes),
            ("grpc.max_send_message_length", 64 * 1024 * 1024),
            # Two routers on one port by mistake would split traffic silently; only --workers
            # shares a port on purpose.
            ("grpc.so_reuseport", 1 if s.workers > 1 else 0),
        ]
        self.guard = (
            Guard(config.guard, self.metrics, config.registry) if config.guard.active else None
        )
        self.server = grpc.aio.server(options=options)
        chain = self.guard.chain if self.guard is not None else None
        self._housekeeping: asyncio.Task[None] | None = None
        self.collections: CollectionStore | None = None
        cache = config.cache
        self.embedder = Embedder(cache.embedding, self.metrics)
        self.responses = (
            ResponseCache(cache.response, self.metrics) if cache.response.enabled else None
        )
        semantic = SemanticCache(cache.semantic, self.metrics) if cache.semantic.enabled else None
        self._services = [INFERENCE_SERVICE.full_name]
        r = config.retrieval
        if r.enabled and s.workers > 1:
            # Each worker would hold its own index and append to the same write-ahead log.
            logger.warning(
                "RetrievalService is off with --workers %d: collections live in one process "
                "(run a single worker, or a dedicated retrieval router)",
                s.workers,
            )
        elif r.enabled:
            self.collections = CollectionStore(
                r.data_dir, compact_after=r.compact_after, fsync=r.fsync
            )
            add_service(
                self.server,
                RETRIEVAL_SERVICE,
                RetrievalServicer(
                    self.collections, self.models, self.embedder, max_text_bytes=r.max_text_bytes
                ),
                self.metrics,
                chain,
            )
            self._services.append(RETRIEVAL_SERVICE.full_name)
        self.registry: Engine | None = None
        self.control: DeploymentController | None = None
        self.usage: UsageRecorder | None = None
        self._metering: asyncio.Task[None] | None = None
        self._reconciling: asyncio.Task[None] | None = None
        if config.registry.enabled:
            self._serve_control_plane(chain)
        retriever = Retriever(r.rag, self.collections, self.models, self.embedder)
        answering = Answering(self.embedder, self.responses, semantic, retriever)
        # The wrapped handlers, for callers in this process (serve --http-port's OpenAI routes).
        self.local_handlers = add_service(
            self.server,
            INFERENCE_SERVICE,
            InferenceServicer(
                self.models,
                self.metrics,
                answering,
                on_finished=None if self.usage is None else self.usage.record,
            ),
            self.metrics,
            chain,
        )
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.server)
        reflection.enable_server_reflection(
            (*self._services, health.SERVICE_NAME, reflection.SERVICE_NAME), self.server
        )

    def _serve_control_plane(self, chain: GuardChain | None) -> None:
        """ModelService, DeploymentService, ResourceService and UsageService over the registry
        database; usage metering of every call."""
        from router.control.deployments import DeploymentController
        from router.control.usage import UsageRecorder
        from router.registry.database import create_engine
        from router.registry.deployments import DeploymentStore
        from router.registry.version_store import ModelVersionStore
        from router.services.deployments import DeploymentServicer
        from router.services.models import ModelServicer
        from router.services.resources import ResourceServicer
        from router.services.usage import UsageServicer

        # Connects (and migrates, in start()) lazily: nothing blocks here.
        self.registry = create_engine(self.config.registry.resolved_url())
        versions = ModelVersionStore(self.registry)
        self.usage = UsageRecorder(self.registry, self.metrics)
        self.control = DeploymentController(
            self.serving,
            self.config.model_cache,
            versions,
            DeploymentStore(self.registry),
            self.usage,
            guarded=self.config.guard.auth.enabled,
            guard_limiter=self.guard.limiter if self.guard is not None else None,
        )
        for service, servicer in (
            (MODEL_SERVICE, ModelServicer(versions)),
            (DEPLOYMENT_SERVICE, DeploymentServicer(self.control)),
            (RESOURCE_SERVICE, ResourceServicer(self.models)),
            (USAGE_SERVICE, UsageServicer(self.usage)),
        ):
            add_service(self.server, service, servicer, self.metrics, chain)
            self._services.append(service.full_name)

    async def start(self) -> int:
        s = self.config.server
        address = f"{s.host}:{s.port}"
        try:
            if s.tls.enabled:
                self.tls = CertificateReloader(s.tls)
                self.port = self.server.add_secure_port(address, self.tls.credentials())
            else:
                self.port = self.server.add_insecure_port(address)
        except RuntimeError:  # grpc >= 1.6x raises instead of returning 0
            self.port = 0
        if self.port == 0:
            raise OSError(f"cannot bind {s.host}:{s.port}: in use, or not an address of this host")
        if self.control is not None:
            self.control.owner = f"{socket.gethostname()}:{self.port}"
        if self.collections is not None:
            await self.collections.load()
        if self.registry is not None:
            from router.registry.database import open_schema

            # Unavailable (naming the database) when it cannot be reached: the router does not
            # start with a control plane it cannot keep.
            await asyncio.to_thread(open_schema, self.registry)
            assert self.usage is not None
            self._metering = asyncio.get_running_loop().create_task(self.usage.run())
        if self.guard is not None:
            await self.guard.start()
            self._housekeeping = asyncio.get_running_loop().create_task(self._flush_audit())
        await self.server.start()
        for model in self.models:
            await self.health.set(model.name, NOT_SERVING)
        await self.health.set("", NOT_SERVING)
        await self.health.set(INFERENCE_SERVICE.full_name, NOT_SERVING)
        if self.collections is not None:
            await self.health.set(RETRIEVAL_SERVICE.full_name, SERVING)
        if self.registry is not None:
            await self.health.set(MODEL_SERVICE.full_name, SERVING)
            await self.health.set(DEPLOYMENT_SERVICE.full_name, SERVING)
            await self.health.set(RESOURCE_SERVICE.full_name, SERVING)
            await self.health.set(USAGE_SERVICE.full_name, SERVING)
        if s.metrics_port:
            self.metrics.serve(s.metrics_port + self._worker, s.host)
        self._loading = asyncio.get_running_loop().create_task(self._load_all())
        logger.info("serving gRPC on %s:%d", s.host, self.port)
        return self.port

    async def _flush_audit(self) -> None:
        assert self.guard is not None
        while True:
            await asyncio.sleep(1.0)
            self.guard.recorder.flush()

    async def _load_all(self) -> None:
        await self.serving.load_all()
        if self.control is not None:
            from router.control.reconcile import Reconciler
            from router.registry.routers import RouterBook

            assert self.registry is not None
            reconciler = Reconciler(self.control, self.serving, RouterBook(self.registry))
            await reconciler.restore()  # the deployments created at run time before
            # Then follow the registry: changes made through other routers sharing it.
            self._reconciling = asyncio.get_running_loop().create_task(reconciler.run())
        if self.models.dispatcher is not None:
            self.serving.check_replicas()
        if all(m.ready for m in self.models):
            await self.health.set("", SERVING)
            await self.health.set(INFERENCE_SERVICE.full_name, SERVING)

    async def wait_ready(self) -> None:
        if self._loading is not None:
            await self._loading

    async def stop(self, grace: float | None = None) -> None:
        """Health NOT_SERVING, refuse new calls, let in-flight ones finish within the grace."""
        await self.health.enter_graceful_shutdown()
        grace = self.config.server.grace_seconds if grace is None else grace
        await self.server.stop(grace)
        if self._reconciling is not None:
            self._reconciling.cancel()
        if self.control is not None:
            await self.control.rollouts.stop()
        if self._loading is not None and not self._loading.done():
            self._loading.cancel()
        self.serving.stop()
        await self.models.stop()
        if self.collections is not None:
            await self.collections.close()
        if self._metering is not None:
            self._metering.cancel()  # writes what is pending on its way out
            with contextlib.suppress(asyncio.CancelledError):
                await self._metering
        if self.registry is not None:
            self.registry.dispose()
        if self.responses is not None:
            await self.responses.close()
        if self._housekeeping is not None:
            self._housekeeping.cancel()
        if self.guard is not None:
            self.guard.recorder.flush()
            await self.guard.close()


ConfigSource = Callable[[], RouterConfig]
"""Reads the configuration again (file, environment, flags), for SIGHUP."""


async def freeze_when_ready(router: RouterServer) -> None:
    """Once loaded, move what the process holds for good out of the garbage collector's
    generations, so a full collection no longer walks it (gateway calls at 1 in flight: mean
    1.16-1.29 ms against 1.25-1.38 ms without, within this machine's noise). Process entry
    points only: a test session starting many routers would keep their cyclic garbage."""
    await asyncio.shield(router.wait_ready())  # cancelling this must not cancel the loading
    gc.freeze()


async def serve(
    config: RouterConfig, *, worker: int = 0, reload: ConfigSource | None = None
) -> None:
    router = RouterServer(config, worker=worker)
    await router.start()
    frozen = asyncio.get_running_loop().create_task(freeze_when_ready(router))
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    if reload is not None:
        loop.add_signal_handler(signal.SIGHUP, lambda: loop.create_task(_reload(router, reload)))
    await stop.wait()
    frozen.cancel()
    logger.info("shutting down: in-flight calls get %.1fs", config.server.grace_seconds)
    await router.stop()
    # The SIGHUP handler holds the router: drop it, so the router and its engines' native
    # objects are freed now, not reported as leaked by nanobind at interpreter teardown.
    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        loop.remove_signal_handler(sig)
    thaw()


def thaw() -> None:
    """Undo freeze_when_ready and collect: the stopped router's cycles (its engines' native
    objects among them) are freed now, not reported as leaked by nanobind at teardown."""
    gc.unfreeze()
    gc.collect()


async def _reload(router: RouterServer, reload: ConfigSource) -> None:
    """SIGHUP: read the configuration again and apply its routing section; anything wrong is
    logged and the running routing kept."""
    try:
        config = reload()
        changes = await router.serving.reload_routing(config.routing)
    except ConfigError as exc:
        logger.error("SIGHUP: routing not reloaded: %s", exc)
        return
    logger.info("SIGHUP: routing reloaded: %s", "; ".join(changes) or "nothing changed")


def _run_one(config: RouterConfig, worker: int, reload: ConfigSource | None = None) -> None:
    import uvloop

    logs.configure(
        config.server.log_level,
        config.server.library_log_level,
        f"%(asctime)s %(levelname)s [w{worker}] %(name)s: %(message)s",
    )
    try:
        uvloop.run(serve(config, worker=worker, reload=reload))
    except Unavailable as exc:  # the registry database cannot be reached at start
        raise SystemExit(f"irouter: {exc}") from None


def _tell(procs: Sequence[multiprocessing.process.BaseProcess], signum: int) -> None:
    for p in procs:
        if p.pid is not None and p.is_alive():
            os.kill(p.pid, signum)


# Worker processes receive the config pickled (spawn). Config sections freeze their mappings in
# MappingProxyType, which pickle refuses; send them as a plain dict and re-freeze on arrival.
def _frozen(data: dict[object, object]) -> types.MappingProxyType[object, object]:
    return types.MappingProxyType(data)


copyreg.pickle(types.MappingProxyType, lambda m: (_frozen, (dict(m),)))


def run(config: RouterConfig, reload: ConfigSource | None = None) -> int:
    """Run the router; with workers > 1, N processes share the port via SO_REUSEPORT.
    `reload` (picklable) re-reads the configuration on SIGHUP, which is passed on to every
    worker. Returns the exit status: non-zero when a worker died on its own."""
    workers = config.server.workers
    if workers == 1:
        _run_one(config, 0, reload)
        return 0
    ctx = multiprocessing.get_context("spawn")
    procs = [
        ctx.Process(target=_run_one, args=(config, i, reload), name=f"irouter-w{i}")
        for i in range(workers)
    ]
    for p in procs:
        p.start()

    stopping = False

    def forward(signum: int, _frame: object) -> None:
        nonlocal stopping
        stopping = True
        for p in procs:
            if p.pid is not None and p.is_alive():
                os.kill(p.pid, signum)

    signal.signal(signal.SIGTERM, forward)
    signal.signal(signal.SIGINT, forward)
    signal.signal(signal.SIGHUP, lambda signum, _frame: _tell(procs, signum))
    status = 0
    alive = list(procs)
    while alive:
        multiprocessing.connection.wait([p.sentinel for p in alive])
        for p in [p for p in alive if not p.is_alive()]:
            alive.remove(p)
            if not stopping:
                # A worker that dies on its own would leave the port half served: stop them all.
                logger.error("worker %s exited with %s; stopping the others", p.name, p.exitcode)
                status = 1
                forward(signal.SIGTERM, None)
    return status
