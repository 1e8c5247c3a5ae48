from __future__ import annotations

import json
from pathlib import Path

import pytest

from router.models.chat_template import render_chat

SIMPLE = "{% for m in messages %}[{{ m['role'] }}]{{ m['content'] }}{% endfor %}"


@pytest.fixture(scope="module")
def smollm_template(prepared_models: dict[str, Path]) -> str:
    manifest = json.loads((prepared_models["smollm2-135m-instruct"] / "manifest.json").read_text())
    template: str = manifest["chat_template"]
    return template


def test_smollm2_adds_default_system_prompt(smollm_template: str) -> None:
    text = render_chat(
        smollm_template, [{"role": "user", "content": "What is the capital of France?"}]
    )
    assert text == (
        "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face"
        "<|im_end|>\n<|im_start|>user\nWhat is the capital of France?<|im_end|>\n"
        "<|im_start|>assistant\n"
    )


def test_smollm2_keeps_given_system_and_history(smollm_template: str) -> None:
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello!"},
    ]
    text = render_chat(smollm_template, messages, add_generation_prompt=False)
    assert text == (
        "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n"
        "<|im_start|>assistant\nHello!<|im_end|>\n"
    )


def test_special_tokens_reach_the_template() -> None:
    assert render_chat("{{ bos_token }}x", [], bos_token="<s>") == "<s>x"


def test_unknown_role_is_rejected() -> None:
    with pytest.raises(ValueError, match="role='wizard'"):
        render_chat(SIMPLE, [{"role": "wizard", "content": "x"}])


def test_syntax_error_is_a_value_error() -> None:
    with pytest.raises(ValueError, match="not valid Jinja"):
        render_chat("{% for m in messages %}", [])


def test_template_raise_exception_is_a_value_error() -> None:
    with pytest.raises(ValueError, match="only users"):
        render_chat("{{ raise_exception('only users') }}", [{"role": "user", "content": "x"}])


def test_sandbox_blocks_python_internals() -> None:
    with pytest.raises(ValueError, match="failed to render"):
        render_chat("{{ ''.__class__.__mro__[1].__subclasses__() }}", [])


def test_sandbox_is_immutable() -> None:
    with pytest.raises(ValueError, match="failed to render"):
        render_chat("{{ messages.append(1) }}", [])
