"""The load-test harness against the real in-process router (SmolLM2 + MiniLM) and the REST proxy
in front of it: closed and open loops, two client processes, every method, errors, the CLI."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import socket
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest
import uvicorn

from loadtest.harness.cli import main
from loadtest.harness.record import RequestRecord, records_from_columns
from loadtest.harness.results import run_scenario
from loadtest.harness.scenario import scenario_from_dict
from router.proto.irouter.v1 import retrieval_service_pb2 as rpb
from router.proto.irouter.v1 import retrieval_service_pb2_grpc as rpb_grpc
from router.rest import create_app
from router.server import RouterServer
from tests.integration.conftest import EMB

MAX_TOKENS = 8


def _scenario(router: RouterServer, **spec: Any) -> dict[str, Any]:
    base: dict[str, Any] = {
        "target": f"grpc://127.0.0.1:{router.port}",
        "max_tokens": MAX_TOKENS,
        "ignore_eos": True,
        "timeout_s": 60,
    }
    return base | spec


def _records(result: dict[str, Any], stage: int = 0) -> list[RequestRecord]:
    return records_from_columns(result["stages"][stage]["records"])


def _check_streams(records: list[RequestRecord]) -> None:
    for r in records:
        assert r.ttft is not None and 0 < r.ttft <= r.e2e
        assert r.output_tokens == MAX_TOKENS  # ignore_eos: exactly max_tokens
        assert r.input_tokens > 0
        assert 1 <= len(r.itl) + 1 <= MAX_TOKENS  # one gap between consecutive content chunks
        assert sum(r.itl) <= r.e2e - r.ttft + 1e-6


async def test_closed_loop_mix_of_generate_and_embed(router: RouterServer) -> None:
    scenario = scenario_from_dict(
        _scenario(
            router,
            mix={"Generate": 2, "Embed": 1},
            load={"mode": "closed", "concurrency": 4},
            requests=12,
            seed=1,
        )
    )
    result = await run_scenario(scenario)
    records = _records(result)
    summary = result["stages"][0]["summary"]
    assert len(records) == 12 and summary["completed"] == 12, summary["errors"]
    generate = [r for r in records if r.method == "Generate"]
    embed = [r for r in records if r.method == "Embed"]
    assert generate and embed
    _check_streams(generate)
    assert all(r.input_tokens > 0 and r.output_tokens == 0 and r.ttft is None for r in embed)
    # Never more than 4 in flight: at any send, fewer than 4 others are still running.
    for r in records:
        assert sum(o.start <= r.start < o.end for o in records if o is not r) < 4
    assert summary["output_tokens"] == MAX_TOKENS * len(generate)
    assert summary["output_token_throughput"] == pytest.approx(
        summary["output_tokens"] / summary["duration_s"]
    )
    assert summary["ttft_ms"]["p50"] > 0 and summary["itl_ms"]["p99"] > 0


async def test_open_loop_sends_poisson_arrivals_without_waiting(
    router: RouterServer, tmp_path: Path
) -> None:
    prompts = tmp_path / "short.jsonl"
    prompts.write_text(
        "".join(
            json.dumps({"prompt": q}) + "\n"
            # Distinct prompts: the response cache would answer repeats in ~1 ms, and then the
            # requests might never overlap.
            for q in (f"What is {i} + {i}?" for i in range(48))
        )
    )
    scenario = scenario_from_dict(
        _scenario(
            router,
            mix="Complete",
            # The cap keeps the client under the router's 16 admitted requests on a slow machine.
            load={"mode": "open", "rate": 20, "max_concurrency": 8},
            duration_s=1.0,
            max_tokens=2,
            prompts=str(prompts),
            seed=3,
        )
    )
    result = await run_scenario(scenario)
    records = _records(result)
    # Poisson(20) arrivals in one second: 20 +- 4.5; 8..36 is beyond 2.5 sigma both ways.
    assert 8 <= len(records) <= 36
    assert all(r.ok for r in records), {r.error for r in records}
    # Arrivals were scheduled inside the one-second window (sends may lag behind the cap).
    due = sorted(r.start - r.lag for r in records)
    assert due[0] > 0 and due[-1] < 1.0
    # Open loop: sends do not wait for earlier answers, so requests overlap ...
    by_start = sorted(records, key=lambda r: r.start)
    assert any(b.start < a.end for a, b in itertools.pairwise(by_start))
    # ... and a unary answer's TTFT is its whole latency.
    assert all(r.ttft == pytest.approx(r.e2e, abs=1e-6) and r.output_tokens == 2 for r in records)
    assert all(r.lag >= -1e-6 for r in records)
    assert result["stages"][0]["summary"]["send_lag_ms"] is not None


async def test_two_client_processes_merge_into_one_result(router: RouterServer) -> None:
    scenario = scenario_from_dict(
        _scenario(
            router,
            mix="Generate",
            load={"mode": "closed", "concurrency": 4},
            requests=8,
            processes=2,
        )
    )
    result = await run_scenario(scenario)
    records = _records(result)
    assert len(records) == 8, result["stages"][0]["summary"]["errors"]
    assert all(r.ok for r in records)
    _check_streams(records)
    # One time base: every process started at the common instant 0 and the runs overlap.
    duration = result["stages"][0]["summary"]["duration_s"]
    outside = [(r.start, r.end) for r in records if not 0 <= r.start < r.end <= duration]
    assert not outside, (outside, duration)
    assert max(r.start for r in records) < max(r.end for r in records)
    # Each process sent its half of the requests, and both halves are in the merged records.
    assert sorted(r.process for r in records) == [0, 0, 0, 0, 1, 1, 1, 1]


async def test_search_against_a_collection(router: RouterServer) -> None:
    import grpc

    async with grpc.aio.insecure_channel(f"127.0.0.1:{router.port}") as channel:
        retrieval = rpb_grpc.RetrievalServiceStub(channel)
        config = rpb.CollectionConfig(name="loadtest", embedding_model=EMB)
        await retrieval.CreateCollection(rpb.CreateCollectionRequest(config=config))
        await retrieval.Upsert(
            rpb.UpsertRequest(
                collection="loadtest",
                documents=[
                    rpb.Document(id="paris", text="Paris is the capital of France."),
                    rpb.Document(id="sky", text="The sky looks blue because of scattering."),
                ],
            )
        )
    scenario = scenario_from_dict(
        _scenario(
            router,
            mix={"Search": 1},
            collection="loadtest",
            load={"mode": "closed", "concurrency": 2},
            requests=6,
        )
    )
    result = await run_scenario(scenario)
    assert result["stages"][0]["summary"]["completed"] == 6
    missing = scenario_from_dict(
        _scenario(
            router,
            mix="Search",
            collection="no-such-collection",
            load={"mode": "closed", "concurrency": 1},
            requests=2,
        )
    )
    summary = (await run_scenario(missing))["stages"][0]["summary"]
    assert summary["errors"] == {"grpc:NOT_FOUND": 2}


async def test_failures_are_counted_by_status_with_their_message(router: RouterServer) -> None:
    scenario = scenario_from_dict(
        _scenario(
            router,
            mix={"Generate": 1, "Embed": 1},
            model="no-such-model",
            load={"mode": "closed", "concurrency": 2},
            requests=6,
            seed=2,
        )
    )
    result = await run_scenario(scenario)
    summary = result["stages"][0]["summary"]
    generate = summary["methods"]["Generate"]["requests"]
    assert summary["completed"] == 6 - generate and summary["failed"] == generate > 0
    (code,) = summary["errors"]
    assert code.startswith("grpc:") and summary["errors"][code] == generate
    failed = [r for r in _records(result) if not r.ok]
    assert all("no-such-model" in r.error for r in failed)


# ---- the OpenAI proxy ---------------------------------------------------------------------------


class _Server(uvicorn.Server):
    """uvicorn without its signal handlers: pytest owns the process's signals."""

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield


@pytest.fixture(scope="module")
async def proxy_url(router: RouterServer) -> AsyncIterator[str]:
    app = create_app(f"127.0.0.1:{router.port}", timeout_s=60)
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind(("127.0.0.1", 0))
    server = _Server(uvicorn.Config(app, lifespan="on", log_level="warning", ws="none"))
    task = asyncio.ensure_future(server.serve(sockets=[sock]))
    while not server.started:
        assert not task.done(), "the proxy failed to start"
        await asyncio.sleep(0.01)
    yield f"http://127.0.0.1:{sock.getsockname()[1]}"
    server.should_exit = True
    await task
    sock.close()


async def test_rest_target_every_route(router: RouterServer, proxy_url: str) -> None:
    methods = ("chat-stream", "chat", "completions-stream", "completions", "embeddings")
    scenario = scenario_from_dict(
        _scenario(
            router,
            target=proxy_url,
            mix=dict.fromkeys(methods, 1),
            load={"mode": "closed", "concurrency": 3},
            requests=15,
            seed=1,  # its 15 picks cover all five routes
        )
    )
    result = await run_scenario(scenario)
    records = _records(result)
    assert all(r.ok for r in records), result["stages"][0]["summary"]["errors"]
    by_method = {m: [r for r in records if r.method == m] for m in methods}
    assert all(by_method.values()), {m: len(v) for m, v in by_method.items()}
    _check_streams(by_method["chat-stream"] + by_method["completions-stream"])
    for r in by_method["chat"] + by_method["completions"]:
        assert (
            r.output_tokens == MAX_TOKENS and r.ttft == pytest.approx(r.e2e, abs=1e-6) and not r.itl
        )
    assert all(r.input_tokens > 0 for r in by_method["embeddings"])
    bad = scenario_from_dict(
        _scenario(
            router,
            target=proxy_url,
            mix="chat-stream",
            model="no-such-model",
            load={"mode": "closed", "concurrency": 1},
            requests=2,
        )
    )
    assert (await run_scenario(bad))["stages"][0]["summary"]["errors"] == {"http:404": 2}


async def test_cli_writes_json_and_html_then_compares(
    router: RouterServer, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    common = [
        "--target",
        f"grpc://127.0.0.1:{router.port}",
        "--method",
        "Generate=3",
        "--method",
        "Embed=1",
        "--requests",
        "4",
        "--max-tokens",
        "uniform:2:8",
        "--slo",
        "ttft_ms=60000",
        "--no-progress",
    ]
    sweep = [*common, "--sweep-concurrency", "1,2", "--out", str(tmp_path / "a.json")]
    # The CLI runs its own event loop: give it a thread while this loop keeps serving.
    assert await asyncio.to_thread(main, ["run", *sweep]) == 0
    out = capsys.readouterr().out
    assert "concurrency=1" in out and "concurrency=2" in out and "goodput (req/s)" in out
    result = json.loads((tmp_path / "a.json").read_text())
    assert [s["label"] for s in result["stages"]] == ["concurrency=1", "concurrency=2"]
    assert all(s["summary"]["completed"] == 4 for s in result["stages"])
    page = (tmp_path / "a.html").read_text()
    assert "Throughput vs concurrency" in page and page.count("<svg") >= 4
    again = [*common, "--sweep-concurrency", "1,2", "--out", str(tmp_path / "b.json"), "--no-html"]
    assert await asyncio.to_thread(main, ["run", *again]) == 0
    assert not (tmp_path / "b.html").exists()
    capsys.readouterr()
    assert main(["compare", str(tmp_path / "a.json"), str(tmp_path / "b.json")]) == 0
    assert "b/a" in capsys.readouterr().out
    assert main(["run", *common, "--concurrency", "0", "--out", str(tmp_path / "c.json")]) == 2
    assert "load.concurrency" in capsys.readouterr().err
