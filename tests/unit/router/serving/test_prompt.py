"""serving.prompt over the real SmolLM2 artifact (its tokenizer and chat template), no engine:
what a call's input becomes, and every refusal naming its field."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from backends.base import SamplingParams, StructuredOutput
from router.config import ModelConfig
from router.errors import InvalidArgument
from router.scheduler.request import Priority, Request
from router.serving import loader, prompt
from router.serving.model import ServedModel

GEN = "smollm2-135m-instruct"


@pytest.fixture(scope="module")
def model(model_cache: Path) -> ServedModel:
    config = ModelConfig(
        name="smol", kind="generate", artifact=GEN, max_context=64, default_max_tokens=16
    )
    served = ServedModel(config, model_cache / GEN)
    loader.load_artifact(served)
    served.context_length = config.max_context
    return served


def build(
    model: ServedModel, text: str, *, max_tokens: int | None = None, **params: object
) -> Request:
    sampling = SamplingParams(max_tokens=max_tokens or 1, **params)  # type: ignore[arg-type]
    return asyncio.run(
        prompt.build_request(
            model,
            "r1",
            engine_id=7,
            text=text,
            params=sampling,
            max_tokens_set=max_tokens is not None,
            priority=Priority.HIGH,
        )
    )


def test_chat_goes_through_the_models_template(model: ServedModel) -> None:
    text = prompt.render(model, prompt=None, messages=[{"role": "user", "content": "Hi there"}])
    assert "<|im_start|>user\nHi there<|im_end|>" in text
    assert text.endswith("<|im_start|>assistant\n")  # the generation prompt


def test_a_raw_prompt_is_sent_as_is(model: ServedModel) -> None:
    assert prompt.render(model, prompt="Once upon", messages=None) == "Once upon"


@pytest.mark.parametrize(
    ("prompt_text", "messages", "field"),
    [
        (None, [], "chat.messages"),
        (None, [{"role": "function", "content": "x"}], "chat.messages[0].role"),
        ("", None, "prompt"),
        (None, None, "input"),
    ],
)
def test_bad_input_names_its_field(
    model: ServedModel,
    prompt_text: str | None,
    messages: list[dict[str, str]] | None,
    field: str,
) -> None:
    with pytest.raises(InvalidArgument) as info:
        prompt.render(model, prompt=prompt_text, messages=messages)
    assert info.value.field == field


def test_request_carries_ids_params_and_priority(model: ServedModel) -> None:
    request = build(model, "The capital of France is", max_tokens=5, temperature=0.0, seed=3)
    assert model.tokenizer is not None
    expected = model.tokenizer.encode("The capital of France is", add_special_tokens=False).ids
    assert request.prompt_ids == expected
    assert (request.engine_id, request.request_id, request.priority) == (7, "r1", Priority.HIGH)
    assert (request.params.max_tokens, request.seed) == (5, 3)
    assert request.prompt_text == "The capital of France is"


def test_unset_max_tokens_takes_the_default_within_the_room_left(model: ServedModel) -> None:
    assert build(model, "Hello").params.max_tokens == 16  # default_max_tokens
    long = " ".join(["word"] * 55)
    n = len(prompt.encode(model, long))
    assert build(model, long).params.max_tokens == 64 - n  # what the context leaves


def test_max_tokens_past_the_context_is_refused(model: ServedModel) -> None:
    with pytest.raises(InvalidArgument, match="max_tokens=100 exceeds the context limit") as info:
        build(model, "Hello", max_tokens=100)
    assert info.value.field == "sampling.max_tokens"


def test_a_prompt_that_fills_the_context_is_refused(model: ServedModel) -> None:
    with pytest.raises(InvalidArgument, match="allows at most 63") as info:
        build(model, " ".join(["word"] * 80))
    assert info.value.field == "prompt"


def test_sampling_is_validated_against_the_vocabulary(model: ServedModel) -> None:
    with pytest.raises(InvalidArgument) as info:
        build(model, "Hello", stop_token_ids=(10**6,))
    assert info.value.field == "sampling.stop_token_ids"


def test_an_unseeded_request_gets_a_seed_of_its_own(model: ServedModel) -> None:
    seeds = {build(model, "Hello").seed for _ in range(8)}
    assert len(seeds) > 1


class _Engine:
    def __init__(self, who: str) -> None:
        self.structured_output = who


def constrain(model: ServedModel, who: str, **params: object) -> Request:
    request = build(model, "Hello", **params)
    model.engine = _Engine(who)  # type: ignore[assignment]
    try:
        asyncio.run(prompt.constrain(model, request))
    finally:
        model.engine = None
    return request


def test_the_router_compiles_a_structured_output_for_its_own_step_loop(
    model: ServedModel,
) -> None:
    spec = StructuredOutput("regex", "[0-9]+")
    request = constrain(model, "router", structured=spec)
    assert request.grammar is not None and request.grammar.spec == spec
    assert constrain(model, "router").grammar is None  # no structured output: nothing compiled


def test_an_engine_that_enforces_it_itself_gets_no_grammar(model: ServedModel) -> None:
    request = constrain(model, "engine", structured=StructuredOutput("json_object"))
    assert request.grammar is None and request.params.structured is not None


def test_a_structured_output_no_engine_can_enforce_is_refused(model: ServedModel) -> None:
    with pytest.raises(InvalidArgument, match=r"cannot enforce sampling\.structured_output") as e:
        constrain(model, "", structured=StructuredOutput("json_object"))
    assert e.value.field == "sampling.structured_output.json_object"


def test_ignore_eos_with_a_structured_output_is_refused(model: ServedModel) -> None:
    with pytest.raises(InvalidArgument, match="cannot be combined") as e:
        constrain(model, "router", structured=StructuredOutput("json_object"), ignore_eos=True)
    assert e.value.field == "sampling.ignore_eos"
