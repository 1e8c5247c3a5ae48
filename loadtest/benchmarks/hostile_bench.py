"""Heavy input against a real `irouter serve` (default config; issue 17): how long other calls
wait while it is refused or processed. Each figure is ListModels latency against ListModels on
the same idle router, measured in the same run.

- 16 prompts of 3.9 MB (just under max_message_bytes) at once, again and again: ListModels p99
  meanwhile (goal: at most 50 ms), and every huge call's status;
- one Upsert of a 120 KB document (chunked and embedded): ListModels p99 meanwhile, and how long
  the Upsert took.

    python -m loadtest.benchmarks.hostile_bench [--quick]
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import multiprocessing
import tempfile
import time
from multiprocessing.queues import Queue
from multiprocessing.synchronize import Event
from pathlib import Path

import grpc

from loadtest.benchmarks.serve_bench import EMB, GEN, line, router_process
from router.proto.irouter.v1 import inference_service_pb2 as pb
from router.proto.irouter.v1 import inference_service_pb2_grpc as pb_grpc
from router.proto.irouter.v1 import retrieval_service_pb2 as rpb
from router.proto.irouter.v1 import retrieval_service_pb2_grpc as rpb_grpc

HUGE_BYTES = 3_900_000
DOCUMENT_BYTES = 120_000
OPTIONS = [("grpc.max_send_message_length", 8 * 1024 * 1024)]


def p99_ms(samples: list[float]) -> float:
    ordered = sorted(samples)
    return ordered[min(len(ordered) - 1, int(len(ordered) * 0.99))] * 1000


def _probe(target: str, ready: Event, stop: Event, out: Queue) -> None:  # type: ignore[type-arg]
    """In its own process and connection, so the figure is the server's wait, not the huge
    calls' client or their bytes on a shared connection: ListModels back to back (10 ms
    apart) until `stop` is set; the latencies go to `out`."""
    samples = []
    with grpc.insecure_channel(target) as channel:
        stub = pb_grpc.InferenceServiceStub(channel)
        stub.ListModels(pb.ListModelsRequest(), timeout=120)  # connected before the clock runs
        ready.set()
        while not stop.is_set():
            started = time.perf_counter()
            stub.ListModels(pb.ListModelsRequest(), timeout=120)
            samples.append(time.perf_counter() - started)
            time.sleep(0.01)
    out.put(samples)


class Prober:
    """ListModels latencies from another process while the block runs."""

    def __init__(self, target: str) -> None:
        context = multiprocessing.get_context("spawn")
        self._ready = context.Event()
        self._stop = context.Event()
        self._out: Queue = context.Queue()  # type: ignore[type-arg]
        self._process = context.Process(
            target=_probe, args=(target, self._ready, self._stop, self._out)
        )
        self.samples: list[float] = []

    def __enter__(self) -> Prober:
        self._process.start()
        if not self._ready.wait(timeout=120):
            raise RuntimeError("the ListModels probe did not connect within 120 s")
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self.samples = self._out.get(timeout=120)
        self._process.join(timeout=30)


async def _status(call: object) -> str:
    try:
        await call  # type: ignore[misc]
    except grpc.aio.AioRpcError as error:
        return error.code().name
    return "OK"


async def run(target: str, quick: bool) -> None:
    async with grpc.aio.insecure_channel(target, options=OPTIONS) as channel:
        stub = pb_grpc.InferenceServiceStub(channel)
        with Prober(target) as probe:
            await asyncio.sleep(3 if quick else 6)
        idle = probe.samples
        line("ListModels p99, idle router", p99_ms(idle), "ms")

        huge = "All work and no play makes Jack a dull boy. " * (HUGE_BYTES // 44)
        statuses: collections.Counter[str] = collections.Counter()
        with Prober(target) as probe:
            for _ in range(2 if quick else 5):
                calls = [
                    stub.Complete(pb.CompleteRequest(model=GEN, prompt=huge), timeout=120)
                    for _ in range(16)
                ]
                statuses.update(await asyncio.gather(*(_status(c) for c in calls)))
        during = probe.samples
        line(
            "ListModels p99 while 16 x 3.9 MB prompts are refused",
            p99_ms(during),
            "ms",
            p99_ms(idle),
            "goal <= 50 ms",
        )
        print(f"  statuses of the huge calls: {dict(statuses)}")

        retrieval = rpb_grpc.RetrievalServiceStub(channel)
        config = rpb.CollectionConfig(name="hostile-bench", embedding_model=EMB)
        await retrieval.CreateCollection(rpb.CreateCollectionRequest(config=config))
        text = (Path(__file__).resolve().parents[2] / "README.md").read_text()
        document = (text * (DOCUMENT_BYTES // len(text) + 1))[:DOCUMENT_BYTES]
        with Prober(target) as probe:
            started = time.perf_counter()
            await retrieval.Upsert(
                rpb.UpsertRequest(
                    collection="hostile-bench", documents=[rpb.Document(id="d", text=document)]
                ),
                timeout=600,
            )
            took = time.perf_counter() - started
        during = probe.samples
        described = await retrieval.DescribeCollection(
            rpb.DescribeCollectionRequest(name="hostile-bench")
        )
        line(
            "ListModels p99 during a 120 KB Upsert",
            p99_ms(during),
            "ms",
            p99_ms(idle),
        )
        count = described.collection.document_count
        line(f"  the Upsert ({count} chunks)", took, "s")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args()
    print(f"# hostile-input benchmark, {time.strftime('%Y-%m-%d %H:%M')}", flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        config = Path(tmp) / "config.yaml"
        config.write_text(f"retrieval:\n  data_dir: {Path(tmp) / 'collections'}\n  fsync: false\n")
        with router_process(config=config) as target:
            asyncio.run(run(target, args.quick))


if __name__ == "__main__":
    main()
