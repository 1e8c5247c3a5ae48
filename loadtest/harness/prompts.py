"""Prompt sets: the built-in set of real prompts shipped with the package (questions, instructions,
code tasks, reasoning, long passages, multi-turn chats), or a user JSONL file with one object per
line holding "prompt" (a string) or "messages" (a list of {role, content})."""

from __future__ import annotations

import json
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

from loadtest.harness.scenario import ScenarioError

BUILTIN = "builtin"


@dataclass(frozen=True)
class Prompt:
    """One input: chat messages (a raw prompt is one user message)."""

    messages: tuple[tuple[str, str], ...]
    """(role, content) pairs, oldest first."""
    category: str = ""
    """Free-form label from the file (question, code, long_passage, ...)."""

    @property
    def text(self) -> str:
        """The content of every message joined: the raw prompt, the text to embed or search."""
        return "\n\n".join(content for _, content in self.messages)


def _parse_line(where: str, line: str) -> Prompt:
    try:
        obj = json.loads(line)
    except json.JSONDecodeError as exc:
        raise ScenarioError(f"prompts: {where}: not JSON ({exc.msg})") from None
    if not isinstance(obj, dict):
        raise ScenarioError(f"prompts: {where}: must be a JSON object, got {line[:60]!r}")
    category = str(obj.get("category", ""))
    if isinstance(obj.get("prompt"), str) and obj["prompt"]:
        return Prompt((("user", obj["prompt"]),), category)
    messages = obj.get("messages")
    if isinstance(messages, list) and messages:
        pairs = []
        for m in messages:
            if not (
                isinstance(m, dict)
                and isinstance(m.get("role"), str)
                and isinstance(m.get("content"), str)
            ):
                raise ScenarioError(
                    f"prompts: {where}: each message needs string 'role' and 'content', got {m!r}"
                )
            pairs.append((m["role"], m["content"]))
        return Prompt(tuple(pairs), category)
    raise ScenarioError(f"prompts: {where}: needs a non-empty 'prompt' string or 'messages' list")


def parse_prompts(text: str, source: str) -> list[Prompt]:
    prompts = [
        _parse_line(f"{source} line {n}", line)
        for n, line in enumerate(text.splitlines(), 1)
        if line.strip()
    ]
    if not prompts:
        raise ScenarioError(f"prompts: {source} holds no prompts")
    return prompts


def load_prompts(spec: str) -> list[Prompt]:
    """'builtin' or the path of a JSONL file."""
    if spec == BUILTIN:
        data = resources.files("loadtest.harness").joinpath("data/prompts.jsonl").read_text()
        return parse_prompts(data, "built-in prompts")
    path = Path(spec)
    try:
        data = path.read_text()
    except OSError as exc:
        raise ScenarioError(f"prompts: cannot read {spec!r}: {exc.strerror}") from None
    return parse_prompts(data, str(path))
