from __future__ import annotations

import math

import pytest

from backends.base import SamplingParams
from router.errors import InvalidArgument
from router.scheduler.request import Request, RequestStatus, validate_sampling


def test_status_order_makes_finished_a_comparison() -> None:
    assert not RequestStatus.PREEMPTED.is_finished
    assert all(
        s.is_finished
        for s in (
            RequestStatus.FINISHED_STOPPED,
            RequestStatus.FINISHED_LENGTH,
            RequestStatus.FINISHED_CANCELLED,
            RequestStatus.FINISHED_ERROR,
        )
    )


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"temperature": -0.1}, "sampling.temperature"),
        ({"temperature": math.nan}, "sampling.temperature"),
        ({"top_p": 0.0}, "sampling.top_p"),
        ({"top_p": 1.01}, "sampling.top_p"),
        ({"min_p": -1.0}, "sampling.min_p"),
        ({"repetition_penalty": 2.5}, "sampling.repetition_penalty"),
        ({"frequency_penalty": -2.5}, "sampling.frequency_penalty"),
        ({"top_k": 50_000}, "sampling.top_k"),
        ({"max_tokens": 0}, "sampling.max_tokens"),
        ({"stop": ("",)}, "sampling.stop"),
        ({"stop": tuple("abcdefghijklmnopq")}, "sampling.stop"),
        ({"stop_token_ids": (49_152,)}, "sampling.stop_token_ids"),
    ],
)
def test_validate_names_the_field(kwargs: dict[str, object], field: str) -> None:
    with pytest.raises(InvalidArgument) as info:
        validate_sampling(SamplingParams(**kwargs), vocab_size=49_152)  # type: ignore[arg-type]
    assert info.value.field == field
    assert field in str(info.value)


def test_defaults_are_valid() -> None:
    assert validate_sampling(SamplingParams(), vocab_size=10) == SamplingParams()


def test_request_token_buffer() -> None:
    req = Request("r", 1, [5, 6, 7], SamplingParams(max_tokens=2))
    req.append(9)
    assert (req.num_prompt, req.num_output, req.output_ids.tolist()) == (3, 1, [9])
    assert req.tokens[: req.num_tokens].tolist() == [5, 6, 7, 9]
