"""Content detectors for guardrails: personal data, secrets and a prompt-injection heuristic.

Every detector is a pure function `text -> [(start, end, kind)]` with character offsets and
`kind` equal to its name in `DETECTORS`. Each one finds candidates with a regular expression and
then verifies them (Luhn, IBAN mod-97, address ranges, entropy), because a guardrail that fires
on order numbers and version strings gets switched off. Deliberate choices, each pinned by a test:

- credit_card: 13-19 digits, optionally in groups of 4-6 separated by one space or dash, a known
  card-network prefix, a valid Luhn check digit, and not a single repeated digit.
- phone: '+' country code with 8-15 digits (E.164), or a national number written with
  separators: North American '(415) 555-2671' / '415.555.2671', or trunk-prefixed '020 7946 0958'.
  Undelimited digit runs, years and dates are not phone numbers.
- ipv4: four decimal octets 0-255 without leading zeros. Loopback, 0.0.0.0 and 255.x.x.x (masks,
  broadcast) are not personal data and are skipped. '1.2.3.4' alone is a valid address and
  matches; after 'v', 'version' or 'release' it is a version string and does not.
- ipv6: anything `ipaddress.IPv6Address` accepts with at least 4 hex digits, so '::1' and
  C++/Rust 'a::b' paths are not flagged; MAC addresses and times fail validation.
- secret: well-known key formats (AWS, OpenAI/Anthropic-style 'sk-', Stripe, GitHub, Slack,
  Google, JWT, PEM private-key headers) plus generic tokens: 32+ base64 characters mixing upper,
  lower and digits with Shannon entropy >= 4.0 bits/char, or 32+ hex characters next to a word
  such as 'key', 'token' or 'secret' (so bare commit hashes and digests pass).
"""

from __future__ import annotations

import ipaddress
import math
import re
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Protocol

Span = tuple[int, int, str]


class Detector(Protocol):
    """Finds spans that start at or after `start`; look-behinds and context checks still see
    the text before it (an output stream passes the already-sent text as context)."""

    def __call__(self, text: str, start: int = 0, /) -> list[Span]: ...


# Python's re only skips ahead fast when a pattern starts with a literal or a character class,
# so patterns below consume their first character before the look-behind that checks what
# precedes it, and use [0-9] rather than the slower \d. That makes them 2-3x faster on prose.
_DIGIT = re.compile(r"[0-9]")

# ------------------------------------------------------------------------------------ e-mail

# Found from each '@' (a literal, so re skips to it fast) with the local part read backwards:
# a regex that starts on the local part tries every letter of the text and costs 10x more.
_EMAIL_DOMAIN = re.compile(
    r"@(?:[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?\.)+([A-Za-z]{2,24})(?![\w-])"
)
_LOCAL_CHARS = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789_%+-.")
# 'icon@2x.png' is an image name, not an address.
_FILE_TLDS = frozenset({"png", "jpg", "jpeg", "gif", "svg", "webp", "bmp", "ico", "pdf"})


def find_emails(text: str, start: int = 0) -> list[Span]:
    spans: list[Span] = []
    for m in _EMAIL_DOMAIN.finditer(text, start):
        at = begin = m.start()
        while begin > 0 and at - begin <= 64 and text[begin - 1] in _LOCAL_CHARS:
            begin -= 1
        local = text[begin:at]
        if (
            begin >= start
            and 0 < len(local) <= 64
            and not (begin > 0 and (text[begin - 1].isalnum() or text[begin - 1] == "_"))
            and local[0] != "."
            and local[-1] != "."
            and ".." not in local
            and m.group(1).lower() not in _FILE_TLDS
        ):
            spans.append((begin, m.end(), "email"))
    return spans


# ------------------------------------------------------------------------------------- phone

_NUMBER_END = r"(?![\w]|[.-][0-9])"  # not the prefix of a longer number or word
_PHONE_INTL = re.compile(
    r"\+(?<![\w+]\+)[1-9][0-9]{0,2}(?:[ .-]?(?:\([0-9]{1,4}\)|[0-9]{1,5})){1,7}" + _NUMBER_END
)
_PHONE_NANP = re.compile(  # 415-555-2671, 415.555.2671, 1-800-555-1234
    r"[1-9](?<![\w.+(-][1-9])(?:(?<=1)[ .-][2-9][0-9]{2}|(?<=[2-9])[0-9]{2})"
    r"[ .-][2-9][0-9]{2}[ .-][0-9]{4}" + _NUMBER_END
)
_PHONE_NANP_AREA = re.compile(  # (415) 555-2671
    r"\((?<![\w.+(-]\()[2-9][0-9]{2}\) ?[2-9][0-9]{2}[ .-][0-9]{4}" + _NUMBER_END
)
_PHONE_TRUNK = re.compile(r"0(?<![\w.+-]0)[0-9]{1,4}(?:[ .-][0-9]{2,4}){2,4}" + _NUMBER_END)


def find_phones(text: str, start: int = 0) -> list[Span]:
    if not _DIGIT.search(text, start):
        return []
    spans: list[Span] = []
    for m in _PHONE_INTL.finditer(text, start):
        digits = sum(c.isdigit() for c in m.group(0))
        if 8 <= digits <= 15:
            spans.append((m.start(), m.end(), "phone"))
    for pattern in (_PHONE_NANP, _PHONE_NANP_AREA, _PHONE_TRUNK):
        for m in pattern.finditer(text, start):
            digits = sum(c.isdigit() for c in m.group(0))
            # A separator style must be consistent, or '2024-01.15 10' style data slips in.
            seps = {c for c in m.group(0) if c in ".-"}
            if 9 <= digits <= 12 and len(seps) <= 1:
                spans.append((m.start(), m.end(), "phone"))
    return _dedupe(spans)


# ------------------------------------------------------------------------------- credit card

_CARD = re.compile(r"[0-9](?<![\w.-][0-9])(?:[ -]?[0-9]){12,18}" + _NUMBER_END)
_CARD_PREFIX = re.compile(r"4|5[1-5]|2[2-7]|3[47]|3[068]|35|6(?:011|5|4[4-9]|2)")


def luhn_valid(digits: str) -> bool:
    total = 0
    for i, ch in enumerate(reversed(digits)):
        d = ord(ch) - 48
        if i % 2:
            d = d * 2 - 9 if d > 4 else d * 2
        total += d
    return total % 10 == 0


def find_credit_cards(text: str, start: int = 0) -> list[Span]:
    spans: list[Span] = []
    for m in _CARD.finditer(text, start):
        raw = m.group(0)
        digits = raw.replace(" ", "").replace("-", "")
        if len(digits) != len(raw):
            # Written cards are grouped 4-4-4-4(-3) or 4-6-5 with one separator style.
            groups = re.split(r"[ -]", raw)
            if len({c for c in raw if c in " -"}) > 1 or any(
                not 4 <= len(g) <= 6 for g in groups[:-1]
            ):
                continue
        if (
            _CARD_PREFIX.match(digits)
            and digits.count(digits[0]) != len(digits)
            and luhn_valid(digits)
        ):
            spans.append((m.start(), m.end(), "credit_card"))
    return spans


# -------------------------------------------------------------------------------------- IBAN

# Lengths from the SWIFT IBAN registry; an unknown country code is not an IBAN.
_IBAN_LENGTHS: Mapping[str, int] = {
    "AD": 24, "AE": 23, "AL": 28, "AT": 20, "AZ": 28, "BA": 20, "BE": 16, "BG": 22, "BH": 22,
    "BR": 29, "BY": 28, "CH": 21, "CR": 22, "CY": 28, "CZ": 24, "DE": 22, "DK": 18, "DO": 28,
    "EE": 20, "EG": 29, "ES": 24, "FI": 18, "FO": 18, "FR": 27, "GB": 22, "GE": 22, "GI": 23,
    "GL": 18, "GR": 27, "GT": 28, "HR": 21, "HU": 28, "IE": 22, "IL": 23, "IQ": 23, "IS": 26,
    "IT": 27, "JO": 30, "KW": 30, "KZ": 20, "LB": 28, "LC": 32, "LI": 21, "LT": 20, "LU": 20,
    "LV": 21, "MC": 27, "MD": 24, "ME": 22, "MK": 19, "MR": 27, "MT": 31, "MU": 30, "NL": 18,
    "NO": 15, "PK": 24, "PL": 28, "PS": 29, "PT": 25, "QA": 29, "RO": 24, "RS": 22, "SA": 24,
    "SC": 31, "SE": 24, "SI": 19, "SK": 24, "SM": 27, "ST": 25, "SV": 28, "TL": 23, "TN": 24,
    "TR": 26, "UA": 29, "VA": 22, "VG": 24, "XK": 20,
}  # fmt: skip
# Greedy candidate; the country's length then decides where the IBAN really ends, so a
# trailing capitalised word ('... 32 THE') does not spoil the checksum.
_IBAN = re.compile(r"[A-Z](?<![A-Za-z0-9][A-Z])[A-Z][0-9]{2}(?: ?[A-Z0-9]{1,4})+")


def iban_valid(iban: str) -> bool:
    if _IBAN_LENGTHS.get(iban[:2]) != len(iban):
        return False
    rearranged = iban[4:] + iban[:4]
    return int("".join(str(int(c, 36)) for c in rearranged)) % 97 == 1


def find_ibans(text: str, start: int = 0) -> list[Span]:
    spans: list[Span] = []
    for m in _IBAN.finditer(text, start):
        length = _IBAN_LENGTHS.get(m.group(0)[:2])
        if length is None:
            continue
        raw = m.group(0)
        # Where the country's length-th non-space character ends, if the candidate has that many.
        ends = [i + 1 for i, ch in enumerate(raw) if ch != " "]
        if len(ends) < length:
            continue
        end = m.start() + ends[length - 1]
        if text[end : end + 1].isalnum():
            continue
        if iban_valid(text[m.start() : end].replace(" ", "")):
            spans.append((m.start(), end, "iban"))
    return spans


# -------------------------------------------------------------------------------- IP address

_IPV4 = re.compile(r"[0-9](?<![\w.][0-9])[0-9]{0,2}(?:\.[0-9]{1,3}){3}(?![\w]|\.[0-9])")
_VERSION_BEFORE = re.compile(r"(?:\bv|\bversion|\bver\.?|\brelease|\brev\.?)\s*\Z", re.IGNORECASE)
_IPV6 = re.compile(
    r"(?<![\w:.])(?:[0-9A-Fa-f]{0,4}:){2,7}(?:(?:\d{1,3}\.){3}\d{1,3}|[0-9A-Fa-f]{1,4})?"
    r"(?![\w:]|\.\d)"
)


def find_ipv4(text: str, start: int = 0) -> list[Span]:
    spans: list[Span] = []
    for m in _IPV4.finditer(text, start):
        octets = m.group(0).split(".")
        if any((len(o) > 1 and o[0] == "0") or int(o) > 255 for o in octets):
            continue
        address = ipaddress.IPv4Address(m.group(0))
        if address.is_loopback or address.is_unspecified or octets[0] == "255":
            continue
        if _VERSION_BEFORE.search(text, max(0, m.start() - 12), m.start()):
            continue
        spans.append((m.start(), m.end(), "ipv4"))
    return spans


def find_ipv6(text: str, start: int = 0) -> list[Span]:
    if text.find("::", start) < 0 and text.count(":", start) < 7:
        return []
    spans: list[Span] = []
    for m in _IPV6.finditer(text, start):
        candidate = m.group(0)
        # '::1' and 'a::b' are valid but far more often a C++/Rust path than someone's address.
        if sum(c != ":" for c in candidate) < 4:
            continue
        try:
            ipaddress.IPv6Address(candidate)
        except ValueError:
            continue
        spans.append((m.start(), m.end(), "ipv6"))
    return spans


# ------------------------------------------------------------------------------------ secret

_SECRET_FORMATS = re.compile(
    r"(?<![A-Za-z0-9])(?:"
    r"(?:AKIA|ASIA|AGPA|AIDA|AROA|AIPA|ANPA|ANVA|APKA)[A-Z0-9]{16}"
    r"|sk-(?:[a-z]+-)*[A-Za-z0-9_-]{20,}"
    r"|[sr]k_(?:live|test)_[A-Za-z0-9]{16,}"
    r"|gh[pousr]_[A-Za-z0-9]{36,255}"
    r"|github_pat_[A-Za-z0-9_]{22,255}"
    r"|xox[abprs]-[A-Za-z0-9-]{10,}"
    r"|AIza[0-9A-Za-z_-]{35}"
    r"|eyJ[A-Za-z0-9_-]{8,}\.eyJ[A-Za-z0-9_-]{8,}\.[A-Za-z0-9_-]{8,}"
    r"|-----BEGIN (?:RSA |EC |DSA |OPENSSH |ENCRYPTED )?PRIVATE KEY-----"
    r")(?![A-Za-z0-9])"
)
_TOKEN = re.compile(
    r"[A-Za-z0-9+/_-](?<![\w+/=-][A-Za-z0-9+/_-])[A-Za-z0-9+/_-]{31,}={0,2}(?![\w+/=-])"
)
_HEX = re.compile(r"[0-9a-fA-F]+")
_KEYWORD_BEFORE = re.compile(
    r"(?:key|token|secret|passw(?:or)?d|pwd|auth|bearer|credential|signature)\W{0,4}\Z",
    re.IGNORECASE,
)
ENTROPY_THRESHOLD = 4.0  # bits per character; random base64 of 32+ chars scores ~4.6-5.0


def shannon_entropy(s: str) -> float:
    n = len(s)
    return -sum(c / n * math.log2(c / n) for c in Counter(s).values())


def _generic_secret(token: str, before: str) -> bool:
    if _HEX.fullmatch(token):
        # Hex is only 4 bits/char at best and commit hashes are everywhere: need a keyword.
        return _KEYWORD_BEFORE.search(before) is not None and shannon_entropy(token) >= 3.0
    classes = (
        any(c.isupper() for c in token)
        + any(c.islower() for c in token)
        + any(c.isdigit() for c in token)
    )
    return classes == 3 and shannon_entropy(token) >= ENTROPY_THRESHOLD


def find_secrets(text: str, start: int = 0) -> list[Span]:
    # Every format but the PEM header needs 15+ characters without whitespace; split() runs in
    # C and spares the regexes most prose.
    if "-----BEGIN" not in text and max(map(len, text[start:].split()), default=0) < 15:
        return []
    spans = [
        (m.start(), m.end(), "secret")
        for m in _SECRET_FORMATS.finditer(text, start)
        # 'sk-learn-is-a-library' is prose; real 'sk-' keys always carry digits.
        if not m.group(0).startswith("sk-") or any(c.isdigit() for c in m.group(0))
    ]
    for m in _TOKEN.finditer(text, start):
        if _generic_secret(m.group(0), text[max(0, m.start() - 24) : m.start()]):
            spans.append((m.start(), m.end(), "secret"))
    return _dedupe(spans)


def _dedupe(spans: list[Span]) -> list[Span]:
    """Sorted by start; a span inside another one of the same kind is dropped."""
    spans.sort(key=lambda s: (s[0], -s[1]))
    out: list[Span] = []
    for span in spans:
        if out and span[1] <= out[-1][1] and span[2] == out[-1][2]:
            continue
        out.append(span)
    return out


DETECTORS: Mapping[str, Detector] = {
    "email": find_emails,
    "phone": find_phones,
    "credit_card": find_credit_cards,
    "iban": find_ibans,
    "ipv4": find_ipv4,
    "ipv6": find_ipv6,
    "secret": find_secrets,
}
"""Detector name (as used in GuardrailPolicy.pii) -> detector."""

# ---------------------------------------------------------------------------- prompt injection

INJECTION_KIND = "prompt_injection"

# A heuristic, not a classifier: weighted phrases typical of injection and jailbreak attempts.
# Each signal counts once however often it occurs, so one suspicious phrase in a long benign
# text ("you are now logged in") stays below the default threshold of 1.0, while the classic
# "ignore all previous instructions" reaches it alone. Paraphrases, other languages, homoglyphs
# and zero-width characters get past it; treat a clean result as "no obvious attack" only.
_SIGNALS = (
    (
        1.0,
        "ignore disregard forget override bypass skip",
        r"\b(?:ignore|disregard|forget|override|bypass|skip)\s+(?:(?:all|any|the|your|my|of|"
        r"everything)\s+)*(?:previous|prior|above|earlier|preceding|former|initial|original|"
        r"system)\s+(?:instructions?|prompts?|rules|directions|guidelines|messages?|context)",
    ),
    (0.9, "disregard", r"\bdisregard\s+(?:(?:all|everything|the)\s+)*(?:above|previous|prior)\b"),
    (
        0.8,
        "prompt instructions",
        r"\b(?:reveal|show|print|repeat|output|leak|tell)\s+(?:me\s+)?(?:your|the)\s+"
        r"(?:system\s+prompt|(?:initial|hidden|original|secret)\s+(?:instructions|prompt))",
    ),
    (
        0.8,
        "pretend",
        r"\bpretend\s+(?:that\s+)?you\s+(?:are|have)\s+(?:no|not\s+bound\s+by)\s+"
        r"(?:restrictions|rules|limits|filters|guidelines)",
    ),
    (
        0.7,
        "act",
        r"\bact\s+as\s+(?:an?\s+)?(?:unfiltered|uncensored|unrestricted|evil|jailbroken)",
    ),
    (0.7, "<| inst] sys>>", r"<\|(?:im_start|im_end|system|endoftext)\|>|\[/?INST\]|<</?SYS>>"),
    (0.6, "longer", r"\bno\s+longer\s+(?:bound|restricted)\s+by\b"),
    (0.6, "dan anything", r"(?-i:\bDAN\b)|\bdo\s+anything\s+now\b"),  # not the name 'Dan'
    (0.5, "now", r"\byou\s+are\s+now\b"),
    (0.5, "jailbr", r"\bjailbr(?:eak|oken)\b"),
    (0.5, "developer god sudo unrestricted", r"\b(?:developer|god|sudo|unrestricted)\s+mode\b"),
    (0.5, "new", r"\bnew\s+(?:instructions|rules)\s*:"),
    (0.4, "prompt", r"\b(?:system|developer)\s+prompt\b"),
    (0.4, "without", r"\bwithout\s+any\s+(?:restrictions|filters|limitations|censorship)\b"),
    (0.4, "system assistant", r"(?m)^\s*(?:system|assistant)\s*:"),
    (
        0.6,
        "decode base64",
        r"\b(?:decode|base64)\b[^\n]{0,60}?\b(?:follow|execute|run|obey|do\s+what)\b",
    ),
    (0.4, "", r"[A-Za-z0-9+/](?<![A-Za-z0-9+/]{2})[A-Za-z0-9+/]{39,}={0,2}(?![A-Za-z0-9+/])"),
)
# (weight, trigger words, pattern): a case-insensitive regex costs ~40 us per 1,000 characters
# in Python's re, so each one runs only when one of its trigger words occurs in the text (the
# base64 one only when some run of 40+ characters has no whitespace).
_INJECTION_SIGNALS: tuple[tuple[float, tuple[str, ...], re.Pattern[str]], ...] = tuple(
    (weight, tuple(triggers.split()), re.compile(pattern, re.IGNORECASE))
    for weight, triggers, pattern in _SIGNALS
)


@dataclass(frozen=True, slots=True)
class InjectionScore:
    score: float
    """Sum of the weights of the distinct signals found."""
    spans: tuple[tuple[int, int], ...]
    """Where each signal first occurs, sorted; what a 'redact' action replaces."""


def score_injection(text: str) -> InjectionScore:
    lowered = text.lower()
    long_run = max(map(len, text.split()), default=0) >= 40  # for the base64 signal
    score = 0.0
    spans: list[tuple[int, int]] = []
    for weight, triggers, pattern in _INJECTION_SIGNALS:
        if not (any(t in lowered for t in triggers) if triggers else long_run):
            continue
        m = pattern.search(text)
        if m:
            score += weight
            spans.append(m.span())
    return InjectionScore(round(score, 6), tuple(sorted(spans)))
