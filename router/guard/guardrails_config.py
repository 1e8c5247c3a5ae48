"""The `guard.guardrails` section: policies of blocked terms, regular expressions, PII detectors
and the prompt-injection heuristic, each validated at load time with the key and the fix."""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType

from router.guard.pii import DETECTORS

ACTIONS = ("reject", "redact", "log")
DIRECTIONS = ("input", "output", "both")
MIN_WINDOW = 64
"""An IBAN or card number written with spaces must fit in the stream window."""


@dataclass(frozen=True)
class GuardrailPolicy:
    name: str
    """Names the policy in errors, stop reasons and findings."""
    terms: tuple[str, ...] = ()
    """Blocked words or phrases, matched by the native Aho-Corasick matcher (thousands are fine)."""
    case_insensitive: bool = True
    """Terms only: ignore ASCII case (no Unicode folding, 'É' does not match 'é')."""
    whole_words: bool = True
    """Terms only: match where the neighbouring characters are not ASCII [A-Za-z0-9_]."""
    regexes: tuple[str, ...] = ()
    """Python regular expressions; use inline flags such as (?i). See StreamFilter on spans."""
    pii: Mapping[str, str] = field(default_factory=dict)
    """Detector name (router.guard.pii.DETECTORS) -> action for what it finds."""
    injection: str | None = None
    """Action when the prompt-injection heuristic fires; None turns it off. Prompts only."""
    injection_threshold: float = 1.0
    """Score at which the heuristic fires (router.guard.pii.score_injection)."""
    action: str = "reject"
    """Action for terms and regexes: 'reject', 'redact' or 'log'."""
    applies_to: str = "both"
    """'input' (prompts), 'output' (generated text) or 'both'."""

    def __post_init__(self) -> None:
        # Freeze what YAML hands over as lists and dicts, so a loaded policy cannot change.
        object.__setattr__(self, "terms", tuple(self.terms))
        object.__setattr__(self, "regexes", tuple(self.regexes))
        object.__setattr__(self, "pii", MappingProxyType(dict(self.pii)))

    def validate(self) -> None:
        where = f"guardrails.policies[{self.name!r}]"
        if not isinstance(self.name, str) or not self.name:
            raise ValueError(f"guardrails.policies[].name={self.name!r} must be a non-empty string")
        _check_choice(f"{where}.action", self.action, ACTIONS)
        _check_choice(f"{where}.applies_to", self.applies_to, DIRECTIONS)
        for key in ("case_insensitive", "whole_words"):
            if not isinstance(getattr(self, key), bool):
                raise ValueError(f"{where}.{key}={getattr(self, key)!r} must be true or false")
        for i, term in enumerate(self.terms):
            if not isinstance(term, str) or not term.strip():
                raise ValueError(f"{where}.terms[{i}]={term!r} must be a non-blank string")
        for i, pattern in enumerate(self.regexes):
            compile_regex(pattern, f"{where}.regexes[{i}]")
        for name, action in self.pii.items():
            if name not in DETECTORS:
                raise ValueError(
                    f"{where}.pii has unknown detector {name!r}; known: {sorted(DETECTORS)}"
                )
            _check_choice(f"{where}.pii[{name!r}]", action, ACTIONS)
        if self.injection is not None:
            _check_choice(f"{where}.injection", self.injection, ACTIONS)
            if self.applies_to == "output":
                raise ValueError(
                    f"{where}.injection={self.injection!r} scores prompts, but applies_to="
                    "'output'; use applies_to 'input' or 'both', or drop injection"
                )
        if not self.injection_threshold > 0:
            raise ValueError(f"{where}.injection_threshold={self.injection_threshold} must be > 0")
        if not (self.terms or self.regexes or self.pii or self.injection):
            raise ValueError(f"{where} matches nothing: give it terms, regexes, pii or injection")


@dataclass(frozen=True)
class GuardrailsConfig:
    policies: tuple[GuardrailPolicy, ...] = ()
    """Every policy applies; on a prompt the first 'reject' finding by position decides."""
    redaction: str = "[REDACTED:{kind}]"
    """What 'redact' writes in place of a match; may use {kind} and {policy}."""
    stream_window: int = 256
    """Most characters OutputGuard holds back for a regex or PII match still growing."""

    def validate(self) -> GuardrailsConfig:
        names = [p.name for p in self.policies]
        duplicates = sorted({n for n in names if names.count(n) > 1})
        if duplicates:
            raise ValueError(f"guardrails.policies has duplicate names {duplicates}")
        for policy in self.policies:
            policy.validate()
        try:
            self.redaction.format(kind="k", policy="p")
        except (KeyError, IndexError, ValueError) as exc:
            raise ValueError(
                f"guardrails.redaction={self.redaction!r} is not a valid template ({exc!r}); "
                "it may use {kind} and {policy}"
            ) from None
        if self.stream_window < MIN_WINDOW:
            raise ValueError(
                f"guardrails.stream_window={self.stream_window} must be at least {MIN_WINDOW}"
            )
        return self


def compile_regex(pattern: str, where: str) -> re.Pattern[str]:
    try:
        compiled = re.compile(pattern)
    except (re.error, TypeError) as exc:
        raise ValueError(f"{where}={pattern!r} is not a valid regular expression: {exc}") from None
    if compiled.search("") is not None:
        # An empty match is everywhere: it would reject every text or redact nothing.
        raise ValueError(f"{where}={pattern!r} matches the empty string; it must match something")
    return compiled


def _check_choice(where: str, value: object, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ValueError(f"{where}={value!r} is unknown; use one of {choices}")
