"""Render a model's Jinja chat template in a sandbox."""

from __future__ import annotations

import functools
from collections.abc import Mapping, Sequence
from typing import Any

import jinja2
from jinja2.sandbox import ImmutableSandboxedEnvironment

ALLOWED_ROLES = frozenset({"system", "user", "assistant", "tool"})


def _raise_exception(message: str) -> None:
    # Hugging Face templates call raise_exception(...) to reject a conversation.
    raise ValueError(f"chat template rejected the conversation: {message}")


@functools.lru_cache(maxsize=16)
def _compile(template: str) -> jinja2.Template:
    # Templates come from model files: the immutable sandbox stops them from touching Python
    # objects; trim/lstrip match how Hugging Face renders chat templates.
    env = ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, keep_trailing_newline=True
    )
    env.globals["raise_exception"] = _raise_exception
    try:
        return env.from_string(template)
    except jinja2.TemplateSyntaxError as exc:
        raise ValueError(
            f"chat template is not valid Jinja (line {exc.lineno}): {exc.message}"
        ) from exc


def render_chat(
    template: str,
    messages: Sequence[Mapping[str, Any]],
    add_generation_prompt: bool = True,
    **special: Any,
) -> str:
    """The prompt text for `messages`.

    `special` (bos_token=..., eos_token=...) are passed to the template as variables.
    """
    for i, message in enumerate(messages):
        role = message.get("role")
        if role not in ALLOWED_ROLES:
            raise ValueError(
                f"messages[{i}].role={role!r} is not allowed; "
                f"accepted: {', '.join(sorted(ALLOWED_ROLES))}"
            )
        if not isinstance(message.get("content"), str):
            raise ValueError(f"messages[{i}].content must be a string")
    compiled = _compile(template)
    try:
        return compiled.render(
            messages=messages, add_generation_prompt=add_generation_prompt, **special
        )
    except ValueError:
        raise
    except jinja2.TemplateError as exc:
        raise ValueError(f"chat template failed to render: {exc}") from exc
