"""Content guardrails: policies of blocked terms, regular expressions, PII detectors and a
prompt-injection heuristic, applied to prompts (`InputGuard`) and to streamed output
(`OutputGuard`). Actions: 'reject' refuses the prompt or stops the stream, 'redact' replaces
the match, 'log' only records a `Finding`. Findings carry offsets, never the matched text, so
they can go to audit logs as they are."""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field, fields
from types import MappingProxyType
from typing import Any

import grpc

from router import _native
from router.errors import RouterError
from router.guard.pii import DETECTORS, INJECTION_KIND, Detector, score_injection

ACTIONS = ("reject", "redact", "log")
DIRECTIONS = ("input", "output", "both")
TERM_KIND = "term"
REGEX_KIND = "regex"
_MIN_WINDOW = 64  # an IBAN or card number written with spaces must fit in the stream window
_CONTEXT = 32  # emitted characters kept so detectors' look-behinds see past a cut


# ------------------------------------------------------------------------------ configuration


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
        if self.stream_window < _MIN_WINDOW:
            raise ValueError(
                f"guardrails.stream_window={self.stream_window} must be at least {_MIN_WINDOW}"
            )
        return self

    @classmethod
    def from_mapping(cls, data: Mapping[str, Any]) -> GuardrailsConfig:
        """Build from parsed YAML (lists become tuples) and validate it."""
        _check_keys(data, {f.name for f in fields(cls)}, "guardrails")
        entries = data.get("policies", [])
        if not isinstance(entries, list):
            raise ValueError("guardrails.policies must be a list of policies")
        policies = []
        for i, entry in enumerate(entries):
            where = f"guardrails.policies[{i}]"
            _check_keys(entry, {f.name for f in fields(GuardrailPolicy)}, where)
            values = dict(entry)
            for key in ("terms", "regexes"):
                value = values.get(key, [])
                if not isinstance(value, list | tuple) or not all(
                    isinstance(v, str) for v in value
                ):
                    raise ValueError(f"{where}.{key}={value!r} must be a list of strings")
            if not isinstance(values.get("pii", {}), Mapping):
                raise ValueError(f"{where}.pii must map detector names to actions")
            try:
                policies.append(GuardrailPolicy(**values))
            except TypeError as exc:  # 'name' is missing
                raise ValueError(f"{where}: {exc}") from None
        rest = {k: data[k] for k in ("redaction", "stream_window") if k in data}
        return cls(policies=tuple(policies), **rest).validate()


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


def _check_keys(data: object, known: set[str], where: str) -> None:
    if not isinstance(data, Mapping):
        raise ValueError(f"{where} must be a mapping, got {type(data).__name__}")
    unknown = sorted(set(data) - known)
    if unknown:
        raise ValueError(f"{where} has unknown keys {unknown}; known keys: {sorted(known)}")


# ------------------------------------------------------------------------- findings and errors


@dataclass(frozen=True, slots=True)
class Finding:
    policy: str
    """The policy that matched."""
    kind: str
    """'term', 'regex', a detector name (e.g. 'credit_card') or 'prompt_injection'."""
    action: str
    """What the policy did about it: 'reject', 'redact' or 'log'."""
    start: int
    """Character offset in the checked text (for streams: in the whole unfiltered stream)."""
    end: int
    """End offset, exclusive."""
    pattern: int | None = None
    """Index into the policy's terms or regexes; None for detectors."""


class GuardrailViolation(RouterError):
    """A prompt matched a 'reject' policy. The message names the policy and the kind of match,
    never the matched text, which may be the very secret the policy protects."""

    code = grpc.StatusCode.INVALID_ARGUMENT

    def __init__(self, policy: str, kind: str, findings: Sequence[Finding] = ()) -> None:
        super().__init__(f"blocked by guardrail policy {policy!r}: {kind}")
        self.policy = policy
        self.kind = kind
        self.findings = tuple(findings)


# ---------------------------------------------------------------------------------- matching

_Owner = tuple[str, str, int]  # policy, action, index of the term in the policy


class _Rules:
    """The policies of one direction, compiled once and shared by every check and stream."""

    def __init__(self, policies: Iterable[GuardrailPolicy], *, with_injection: bool) -> None:
        # Terms of every policy with the same flags share one automaton: one pass per text
        # however many policies there are. Equal terms share a pattern id.
        groups: dict[tuple[bool, bool], tuple[dict[str, int], list[list[_Owner]]]] = {}
        self.regexes: list[tuple[re.Pattern[str], str, str, int]] = []
        detectors: dict[str, list[tuple[str, str]]] = {}
        self.injection: list[tuple[str, str, float]] = []
        for p in policies:
            ids, owners = groups.setdefault((p.case_insensitive, p.whole_words), ({}, []))
            for i, term in enumerate(p.terms):
                key = term.lower() if p.case_insensitive and term.isascii() else term
                if key not in ids:
                    ids[key] = len(owners)
                    owners.append([])
                owners[ids[key]].append((p.name, p.action, i))
            for i, pattern in enumerate(p.regexes):
                self.regexes.append(
                    (compile_regex(pattern, f"{p.name}.regexes[{i}]"), p.name, p.action, i)
                )
            for name, action in p.pii.items():
                detectors.setdefault(name, []).append((p.name, action))
            if with_injection and p.injection is not None:
                self.injection.append((p.name, p.injection, p.injection_threshold))
        self.detectors: list[tuple[Detector, list[tuple[str, str]]]] = [
            (DETECTORS[name], owners) for name, owners in detectors.items()
        ]
        self.matchers: list[tuple[_native.Matcher, list[list[_Owner]]]] = []
        for (ci, ww), (ids, owners) in groups.items():
            if ids:
                self.matchers.append((_new_matcher(list(ids), ci, ww), owners))

    @property
    def empty(self) -> bool:
        return not (self.matchers or self.regexes or self.detectors or self.injection)

    @property
    def scans(self) -> bool:
        return bool(self.regexes or self.detectors)

    def scan(self, text: str, offset: int = 0, min_end: int = 0, start: int = 0) -> list[Finding]:
        """Regex and detector findings in `text` (which starts at stream offset `offset`) that
        start at or after `start` and end after stream offset `min_end`."""
        found: list[Finding] = []
        for compiled, policy, action, index in self.regexes:
            for m in compiled.finditer(text, start):
                if m.end() > m.start() and m.end() + offset > min_end:
                    found.append(
                        Finding(
                            policy, REGEX_KIND, action, m.start() + offset, m.end() + offset, index
                        )
                    )
        for detector, owners in self.detectors:
            for begin, end, kind in detector(text, start):
                if end + offset > min_end:
                    for policy, action in owners:
                        found.append(Finding(policy, kind, action, begin + offset, end + offset))
        return found


def _new_matcher(patterns: list[str], case_insensitive: bool, whole_words: bool) -> _native.Matcher:
    try:
        matcher_type = _native.Matcher
    except AttributeError:  # an extension built before the matcher landed
        raise RuntimeError(
            "guardrail terms need router._native.Matcher; rebuild the native extension "
            "(make native)"
        ) from None
    return matcher_type(patterns, case_insensitive=case_insensitive, whole_words=whole_words)


def _term_findings(
    owners: list[list[_Owner]], matches: Iterable[tuple[int, int, int]]
) -> list[Finding]:
    return [
        Finding(policy, TERM_KIND, action, start, end, index)
        for start, end, pid in matches
        for policy, action, index in owners[pid]
    ]


def _redact(text: str, findings: Iterable[Finding], offset: int, template: str) -> str:
    """`text` (starting at stream offset `offset`) with every 'redact' finding replaced; spans
    are clipped to the text and overlapping ones merged into one replacement."""
    spans = sorted(
        (max(f.start - offset, 0), min(f.end - offset, len(text)), f.kind, f.policy)
        for f in findings
        if f.action == "redact"
    )
    if not spans:
        return text
    out: list[str] = []
    pos = 0
    cur_start, cur_end, kind, policy = spans[0]
    for start, end, k, p in [*spans[1:], (len(text) + 1, 0, "", "")]:
        if start < cur_end:
            cur_end = max(cur_end, end)
            continue
        out.append(text[pos:cur_start])
        out.append(template.format(kind=kind, policy=policy))
        pos = cur_end
        cur_start, cur_end, kind, policy = start, end, k, p
    out.append(text[pos:])
    return "".join(out)


# ------------------------------------------------------------------------------------ prompts


@dataclass(frozen=True, slots=True)
class InputResult:
    text: str
    """The prompt to use: the original, or with 'redact' findings replaced."""
    findings: list[Finding]
    """Everything the policies found, by position; offsets refer to the original prompt."""


class InputGuard:
    """Checks prompts against the policies that apply to input."""

    def __init__(self, config: GuardrailsConfig) -> None:
        config.validate()
        self._rules = _Rules(
            (p for p in config.policies if p.applies_to != "output"), with_injection=True
        )
        self._redaction = config.redaction

    @property
    def enabled(self) -> bool:
        """False when no policy applies to input, so the caller can skip the call."""
        return not self._rules.empty

    def check(self, text: str) -> InputResult:
        """The prompt as it may be used. Raises GuardrailViolation for the first 'reject'
        finding by position; the exception carries every finding for the audit log."""
        found = self._rules.scan(text)
        for matcher, owners in self._rules.matchers:
            found += _term_findings(owners, matcher.find_all(text))
        if self._rules.injection:
            score = score_injection(text)
            for policy, action, threshold in self._rules.injection:
                if score.score >= threshold:
                    found += [Finding(policy, INJECTION_KIND, action, s, e) for s, e in score.spans]
        found.sort(key=lambda f: (f.start, f.end))
        for f in found:
            if f.action == "reject":
                raise GuardrailViolation(f.policy, f.kind, found)
        return InputResult(_redact(text, found, 0, self._redaction), found)


# ------------------------------------------------------------------------------------ streams


@dataclass(frozen=True, slots=True)
class FilterResult:
    text: str
    """Text that is safe to send to the client now (may be empty)."""
    stop: bool = False
    """True when a 'reject' policy stopped the stream; send nothing more after `text`."""
    reason: str | None = None
    """'policy:kind' of the match that stopped the stream."""


class OutputGuard:
    """Filters generated text, token by token, against the policies that apply to output."""

    def __init__(self, config: GuardrailsConfig) -> None:
        config.validate()
        self._rules = _Rules(
            (p for p in config.policies if p.applies_to != "input"), with_injection=False
        )
        self._redaction = config.redaction
        self._window = config.stream_window

    @property
    def enabled(self) -> bool:
        """False when no policy applies to output, so the caller can skip filtering."""
        return not self._rules.empty

    def new_stream(self) -> StreamFilter:
        """A filter for one response; not shared between responses or threads."""
        return StreamFilter(self._rules, self._redaction, self._window)


_NOTHING = FilterResult("")


class StreamFilter:
    """One response's output filter: feed() each delta, finish() at the end, send `.text`.

    Text is emitted only once no match can still cover it. What is held back is the larger of
    - for terms: `MatcherStream.holdback()`, the exact tail that could still become a term
      (phrases and terms split across any number of deltas included), and
    - for regexes and detectors: the last word (text after the last whitespace), extended back
      over digit groups separated by single spaces ('4111 1111 1111', '+44 20 7946',
      'DE89 3704'), at most `stream_window` characters.
    A found match that reaches into the held tail is held whole, since it may still grow.
    So a PII match or a regex match within one word or number is never emitted in part. A
    regex matching across ordinary words ('project\\s+x') can have its beginning emitted before
    its end arrives: 'reject' still stops the stream there, 'redact' covers only what was not
    yet sent. Use terms for phrases. A single token longer than `stream_window` (a huge JWT)
    is emitted in pieces, each redacted once detectors see it.

    Each feed scans only the unsent text (from the start of the word it begins in), with up to
    `_CONTEXT` sent characters before it visible to look-behinds, never the whole response, and
    skips the scan while nothing can be sent. The concatenated output of a stream with no
    findings equals its input exactly. Offsets in `findings` count characters of the
    unfiltered stream.
    """

    def __init__(self, rules: _Rules, redaction: str, window: int) -> None:
        self._rules = rules
        self._redaction = redaction
        self._window = window
        self._streams = [(m.stream(), owners) for m, owners in rules.matchers]
        self._scans = rules.scans
        self._pending = ""  # received, not yet sent
        self._base = 0  # stream offset of _pending[0]
        self._context = ""  # the last characters before _pending
        self._terms: list[Finding] = []  # term matches reported by the matcher, not yet sent
        self._reason: str | None = None
        self._finished = False
        self.findings: list[Finding] = []
        """Every finding sent (or that stopped the stream), for the audit log."""

    def feed(self, delta: str) -> FilterResult:
        if self._reason is not None or self._finished:
            return FilterResult("", self._reason is not None, self._reason)
        self._pending += delta
        for stream, owners in self._streams:
            self._terms += _term_findings(owners, stream.feed(delta))
        return self._advance(final=False)

    def finish(self) -> FilterResult:
        """The rest of the text once the model is done; call it exactly once per stream."""
        if self._reason is not None or self._finished:
            return FilterResult("", self._reason is not None, self._reason)
        self._finished = True
        for stream, owners in self._streams:
            self._terms += _term_findings(owners, stream.finish())
        return self._advance(final=True)

    def _advance(self, *, final: bool) -> FilterResult:
        # Runs once per token: plain loops and an early return keep it to a few microseconds.
        pending, base = self._pending, self._base
        n = len(pending)
        term_hold = 0
        for stream, _ in self._streams:
            term_hold = max(term_hold, stream.holdback())
        hold = 0
        if not final:
            hold = term_hold
            if self._scans:
                hold = max(hold, _tail_holdback(pending, self._window))
            if hold >= n:
                return _NOTHING  # nothing can be sent yet, so nothing to scan
        limit = base + n - hold
        found = self._terms
        if self._scans:
            # Scan from the start of the word the unsent text begins in (usually its own first
            # character); the sent context before it serves look-behinds only.
            context = self._context
            start = len(context)
            while start > 0 and not context[start - 1].isspace():
                start -= 1
            found = found + self._rules.scan(context + pending, base - len(context), base, start)
        used = limit - base
        text = pending[:used]
        if found:
            if not final:
                limit = self._hold_growing(found, limit, base + n - max(term_hold, self._window))
                used = limit - base
            sent = sorted((f for f in found if f.end <= limit), key=lambda f: (f.start, f.end))
            out_end = limit
            for f in sent:
                if f.action == "reject":
                    self._reason = f"{f.policy}:{f.kind}"
                    out_end = max(f.start, base)
                    used = n
                    break
            text = _redact(pending[: out_end - base], sent, base, self._redaction)
            self.findings += sent
            self._terms = [f for f in self._terms if f.end > base + used]
        self._context = (self._context + pending[:used])[-_CONTEXT:]
        self._pending = pending[used:]
        self._base = base + used
        return FilterResult(text, self._reason is not None, self._reason)

    @staticmethod
    def _hold_growing(found: list[Finding], limit: int, forced: int) -> int:
        """Move `limit` back to the start of any match that reaches past it (it may still
        grow), but never below `forced`: past the window a match is taken as it stands."""
        changed = True
        while changed:
            changed = False
            for f in found:
                if f.start < limit < f.end:
                    limit = f.start
                    changed = True
        if limit < forced:
            limit = max([forced, *(f.end for f in found if f.start < forced < f.end)])
        return limit


_GROUP_CHARS = frozenset("0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZ+()-.")


def _is_group(word: str) -> bool:
    """A piece of a number written in groups: '4111', '(415)', '+44', '555-', 'DE89', 'WEST'."""
    return (
        0 < len(word) <= 8
        and all(c in _GROUP_CHARS for c in word)
        and (len(word) <= 4 or any(c.isdigit() for c in word))
    )


def _tail_holdback(text: str, window: int) -> int:
    """How many trailing characters of unsent `text` may still be part of a regex or PII match:
    the last word, and the digit groups before it while the last word is one (or empty)."""
    n = len(text)
    low = max(0, n - window)
    i = n
    while i > low and not text[i - 1].isspace():
        i -= 1
    if i < n and not _is_group(text[i:]):
        return n - i
    # Numbers written in groups: one whitespace character between groups, no more.
    while i - 1 > low and not text[i - 2].isspace():
        j = i - 1
        k = j
        while k > low and not text[k - 1].isspace():
            k -= 1
        if not _is_group(text[k:j]):
            break
        i = k
    return n - i
