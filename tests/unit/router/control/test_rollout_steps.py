"""A rollout's pure parts: traffic shares per step, the verdict on a step, tokenizer checks,
and what a restart does to a rollout it cut short."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest

from router.control.rollout import (
    IDLE_WEIGHT,
    interrupted,
    judge,
    same_tokenizer,
    target_replicas,
    weights,
)
from router.errors import InvalidArgument
from router.registry.deployments import Deployment, ReplicaSpec, Rollout, check_rollout
from router.routing.replica_stats import Window

R = Rollout(target_version="2", from_version="1", max_error_rate=0.1, max_ttft_p95_s=0.5)
D = Deployment(
    name="chat",
    model_name="smol",
    model_version="1",
    replicas=(ReplicaSpec("r0"), ReplicaSpec("r1"), ReplicaSpec("r2", model_version="2")),
    rollout=R,
)


def test_weights_split_the_traffic_between_the_versions() -> None:
    assert weights(D, "2", 10) == {"r2": 10.0, "r0": 45.0, "r1": 45.0}
    assert weights(D, "2", 100) == {"r2": 100.0, "r0": IDLE_WEIGHT, "r1": IDLE_WEIGHT}


def test_a_step_fails_on_errors_slow_first_tokens_or_too_few_calls() -> None:
    assert judge(R, Window(attempts=100, failures=10, ttft_p95_s=0.5)) == ""
    assert "11 of 100 attempts" in judge(R, Window(100, 11, 0.1))
    assert "TTFT p95 of 0.600 s" in judge(R, Window(100, 0, 0.6))
    assert judge(R, Window(0, 0, 0.0)) == ""  # no calls, nothing against it...
    needs = dataclasses.replace(R, min_calls=5)
    assert "only 0 call(s)" in judge(needs, Window(0, 0, 0.0))  # ...unless calls are required


def test_rollout_parameters_are_checked_by_name() -> None:
    assert check_rollout(R) is R
    for fields, words in [
        ({"steps": ()}, "ending at 100"),
        ({"steps": (50, 50, 100)}, "must increase"),
        ({"steps": (0, 100)}, r"in \(0, 100\]"),
        ({"step_interval_s": 0.0}, "step_interval_s"),
        ({"max_error_rate": -0.1}, "max_error_rate"),
        ({"max_ttft_p95_s": float("nan")}, "max_ttft_p95_s"),
        ({"min_calls": -1}, "min_calls"),
        ({"target_version": "v 2"}, "target_version"),
    ]:
        with pytest.raises(InvalidArgument, match=words):
            check_rollout(dataclasses.replace(R, **fields))  # type: ignore[arg-type]


def test_a_restart_rolls_back_the_rollout_this_router_ran() -> None:
    mine = dataclasses.replace(D, rollout=dataclasses.replace(R, owner="host:1"))
    back = interrupted(mine, "host:1")
    assert [r.name for r in back.replicas] == ["r0", "r1"]
    assert back.rollout is not None and back.rollout.state == "rolled_back"
    assert "restart" in back.rollout.reason
    assert interrupted(mine, "host:2") is mine  # another router's: left to it
    done = dataclasses.replace(D, rollout=dataclasses.replace(R, state="completed"))
    assert interrupted(done, "host:1") is done


def test_target_replicas_copy_the_first_or_a_template_and_take_free_names() -> None:
    made = target_replicas(D, "2")
    assert [(r.name, r.model_version) for r in made] == [("r3", "2"), ("r4", "2"), ("r5", "2")]
    on_gpu = target_replicas(D, "2", ReplicaSpec("x", backend="openvino", device="GPU"))
    assert {(r.backend, r.device, r.model_version) for r in on_gpu} == {("openvino", "GPU", "2")}
    assert [r.name for r in on_gpu] == ["r3", "r4", "r5"]


def test_same_tokenizer_compares_the_tokenizer_and_chat_template(tmp_path: Path) -> None:
    a, b = tmp_path / "a", tmp_path / "b"
    for folder, template in ((a, "{{x}}"), (b, "{{x}}")):
        folder.mkdir()
        (folder / "tokenizer.json").write_text('{"v": 1}')
        (folder / "manifest.json").write_text(json.dumps({"chat_template": template}))
    assert same_tokenizer(a, b) == ""
    (b / "manifest.json").write_text(json.dumps({"chat_template": "{{y}}"}))
    assert "chat_template differ" in same_tokenizer(a, b)
    (b / "tokenizer.json").write_text('{"v": 2}')
    assert "tokenizer.json differ" in same_tokenizer(a, b)
