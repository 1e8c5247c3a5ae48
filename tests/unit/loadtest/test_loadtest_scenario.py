"""Scenario files and flags: what is accepted, and bad input refused with the field named."""

from __future__ import annotations

import random
import time
from pathlib import Path
from typing import Any

import pytest

from loadtest.harness.cli import _fill, scenario_mapping
from loadtest.harness.prompts import load_prompts
from loadtest.harness.runner import split_stage
from loadtest.harness.scenario import (
    Scenario,
    ScenarioError,
    Stage,
    TokenDist,
    load_scenario_file,
    parse_max_tokens,
    scenario_from_dict,
)

BASE: dict[str, Any] = {
    "target": "grpc://127.0.0.1:50051",
    "mix": {"Generate": 3, "Embed": 1},
    "load": {"mode": "closed", "concurrency": 8},
    "duration_s": 10,
}


def _with(**changes: Any) -> dict[str, Any]:
    spec = dict(BASE)
    for key, value in changes.items():
        if value is None:
            spec.pop(key, None)
        else:
            spec[key] = value
    return spec


def test_yaml_file_with_every_kind_of_field(tmp_path: Path) -> None:
    path = tmp_path / "s.yaml"
    path.write_text(
        """
target: http://127.0.0.1:8080
mix: {chat-stream: 2, embeddings: 1}
load: {mode: sweep, rate: [1, 2.5, 5], max_concurrency: 32}
requests: 200
processes: 2
max_tokens: {dist: normal, mean: 64, std: 16, min: 8, max: 128}
temperature: 0.7
ignore_eos: true
slo: {ttft_ms: 200, e2e_ms: 2000}
seed: 7
"""
    )
    s = scenario_from_dict(load_scenario_file(path))
    assert s.protocol == "http" and s.address == "http://127.0.0.1:8080"
    assert s.mix == (("chat-stream", 2.0), ("embeddings", 1.0))
    assert s.stages() == [
        Stage(rate=1.0, max_concurrency=32),
        Stage(rate=2.5, max_concurrency=32),
        Stage(rate=5.0, max_concurrency=32),
    ]
    assert s.requests == 200 and s.duration_s is None
    assert s.max_tokens == TokenDist("normal", 8, 128, mean=64.0, std=16.0)
    assert dict(s.slo) == {"ttft_ms": 200.0, "e2e_ms": 2000.0}
    # The results file stores the scenario as a mapping that reads back the same.
    assert scenario_from_dict(s.to_dict()) == s


@pytest.mark.parametrize(
    ("spec", "field"),
    [
        (_with(target=None), "target"),
        (_with(target="127.0.0.1:50051"), "target"),
        (_with(target="ftp://host:1"), "target"),
        (_with(mix={"Generate": 0}), "mix.Generate"),
        (_with(mix="chat"), "mix"),  # an HTTP method on a gRPC target
        (_with(mix={}), "mix"),
        (_with(load={"mode": "closed", "concurrency": 0}), "load.concurrency"),
        (_with(load={"mode": "closed", "rate": 3}), "load.rate"),
        (_with(load={"mode": "open"}), "load.rate"),
        (_with(load={"mode": "open", "rate": -1}), "load.rate"),
        (_with(load={"mode": "burst", "rate": 1}), "load.mode"),
        (_with(load={"mode": "sweep", "concurrency": [1, "x"]}), "load.concurrency[1]"),
        (_with(load={"mode": "sweep"}), "load"),
        (_with(load={"mode": "closed", "concurrency": 2, "conc": 3}), "load.conc"),
        (_with(duration_s=None), "duration_s"),
        (_with(duration_s=0), "duration_s"),
        (_with(requests=1.5), "requests"),
        (_with(processes=0), "processes"),
        (_with(max_tokens=0), "max_tokens"),
        (_with(max_tokens={"dist": "uniform", "min": 10, "max": 5}), "max_tokens.max"),
        (_with(max_tokens={"dist": "zipf"}), "max_tokens.dist"),
        (_with(max_tokens={"dist": "normal", "mean": 64, "std": -1}), "max_tokens.std"),
        (_with(temperature=3), "temperature"),
        (_with(slo={"latency_ms": 5}), "slo.latency_ms"),
        (_with(slo={"ttft_ms": "fast"}), "slo.ttft_ms"),
        (_with(mix="Search"), "collection"),
        (_with(concurency=3), "concurency"),
        (_with(requests=1, processes=2), "requests"),
        (_with(honor_retry_info="yes"), "honor_retry_info"),
    ],
)
def test_bad_input_names_the_field(spec: dict[str, Any], field: str) -> None:
    with pytest.raises(ScenarioError) as info:
        scenario_from_dict(spec)
    assert str(info.value).startswith(f"{field}:"), str(info.value)


def test_max_tokens_distributions_stay_in_range() -> None:
    rng = random.Random(0)
    assert parse_max_tokens(64).sample(rng) == 64
    uniform = parse_max_tokens("uniform:4:12")
    values = [uniform.sample(rng) for _ in range(2000)]
    assert set(values) == set(range(4, 13))
    normal = parse_max_tokens("normal:64:16:40:80")
    values = [normal.sample(rng) for _ in range(4000)]
    assert min(values) == 40 and max(values) == 80  # clipped at both ends
    assert 60 < sum(values) / len(values) < 68
    with pytest.raises(ScenarioError, match=r"^max_tokens: 'lots'"):
        parse_max_tokens("lots")


def test_flags_override_the_scenario_file(tmp_path: Path) -> None:
    path = tmp_path / "s.yaml"
    path.write_text("target: grpc://10.0.0.1:1\nmix: Complete\nload: {mode: open, rate: 5}\n")
    parser = __import__("argparse").ArgumentParser()
    _fill(parser)
    args = parser.parse_args(
        ["run", "--scenario", str(path), "--sweep-concurrency", "1,2,4", "--slo", "e2e_ms=900"]
    )
    s = scenario_from_dict(scenario_mapping(args))
    assert s.target == "grpc://10.0.0.1:1" and s.mix == (("Complete", 1.0),)
    assert [st.concurrency for st in s.stages()] == [1, 2, 4]
    assert s.duration_s == 10.0  # the default when neither duration nor requests is set
    assert dict(s.slo) == {"e2e_ms": 900.0}
    bad = parser.parse_args(["run", "--slo", "ttft_ms"])
    with pytest.raises(ScenarioError, match=r"^slo"):
        scenario_mapping(bad)


def test_load_is_split_evenly_between_processes() -> None:
    s = scenario_from_dict(_with(processes=3, requests=10))
    shares = split_stage(s, Stage(concurrency=8))
    assert [sh.concurrency for sh in shares] == [3, 3, 2]
    assert [sh.requests for sh in shares] == [4, 3, 3]
    open_shares = split_stage(s, Stage(rate=30.0, max_concurrency=10))
    assert [sh.rate for sh in open_shares] == [10.0, 10.0, 10.0]
    assert all(sh.max_concurrency == 4 for sh in open_shares)
    # Never more processes than requests in flight.
    assert len(split_stage(s, Stage(concurrency=2))) == 2


def test_builtin_prompts_are_real_and_varied() -> None:
    prompts = load_prompts("builtin")
    assert len(prompts) >= 50
    assert {p.category for p in prompts} >= {"question", "code", "long_passage", "chat"}
    lengths = sorted(len(p.text) for p in prompts)
    assert lengths[0] < 60 and lengths[-1] > 700
    assert len({p.text for p in prompts}) == len(prompts)
    assert any(len(p.messages) > 2 for p in prompts)  # multi-turn conversations


def test_user_prompt_file_and_its_errors(tmp_path: Path) -> None:
    good = tmp_path / "p.jsonl"
    good.write_text('{"prompt": "hi"}\n\n{"messages": [{"role": "user", "content": "yo"}]}\n')
    assert [p.messages for p in load_prompts(str(good))] == [
        (("user", "hi"),),
        (("user", "yo"),),
    ]
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "hi"}\n{"text": 3}\n')
    with pytest.raises(ScenarioError, match=r"^prompts: .*bad.jsonl line 2"):
        load_prompts(str(bad))
    with pytest.raises(ScenarioError, match=r"^prompts: cannot read"):
        load_prompts(str(tmp_path / "missing.jsonl"))


def test_scenario_defaults_serve_the_builtin_models() -> None:
    s: Scenario = scenario_from_dict(BASE)
    assert s.model == "smollm2-135m-instruct" and s.embed_model == "all-minilm-l6-v2"
    assert s.processes == 1 and s.prompts == "builtin"


async def test_a_closed_loop_client_honours_retry_info_when_asked() -> None:
    """A shed call's client waits the server's RetryInfo delay before its next call."""
    from loadtest.harness.prompts import Prompt
    from loadtest.harness.record import RequestRecord
    from loadtest.harness.runner import Share, Tally, drive

    class Shedding:
        async def call(self, call: object) -> RequestRecord:
            now = time.perf_counter()
            return RequestRecord("Generate", now, now, "grpc:RESOURCE_EXHAUSTED", retry_after=0.2)

    for honor, most in ((True, 3), (False, 10**6)):
        scenario = scenario_from_dict({**BASE, "duration_s": 0.5, "honor_retry_info": honor})
        share = Share(0, 1, None, None, None)
        records = await drive(
            scenario, share, Shedding(), [Prompt((("user", "hi"),))], time.perf_counter(), Tally()
        )  # type: ignore[arg-type]
        assert 1 <= len(records) <= most, (honor, len(records))
        if not honor:
            assert len(records) > 10  # calls again at once
