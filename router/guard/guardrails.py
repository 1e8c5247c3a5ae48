"""Content guardrails: policies of blocked terms, regular expressions, PII detectors and a
prompt-injection heuristic, applied to prompts (`InputGuard`) and to streamed output
(`OutputGuard`). Actions: 'reject' refuses the prompt or stops the stream, 'redact' replaces
the match, 'log' only records a `Finding`. Findings carry offsets, never the matched text, so
they can go to audit logs as they are."""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import grpc

from router import _native
from router.errors import RouterError
from router.guard.guardrails_config import GuardrailPolicy, GuardrailsConfig, compile_regex
from router.guard.pii import DETECTORS, INJECTION_KIND, Detector, score_injection

TERM_KIND = "term"
REGEX_KIND = "regex"
_CONTEXT = 32  # emitted characters kept so detectors' look-behinds see past a cut


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
