"""A model version: what an administrator may deploy, with its checked artifact (format,
sha256, size), token context limit, prices and tags; and the rules a caller's values must
follow (`validate_draft` and the field checks). Storing them is version_store.py."""

from __future__ import annotations

import dataclasses
import json
import re
from dataclasses import dataclass
from decimal import Decimal, InvalidOperation

from router.config import MODEL_KINDS
from router.errors import InvalidArgument, quote
from router.registry.artifacts import CheckedArtifact

ACTIVE = "active"
DEPRECATED = "deprecated"
NAME_RE = re.compile(r"[a-z0-9][a-z0-9._-]{0,63}")
VERSION_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,31}")
_TAG_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:-]{0,63}")
_CURRENCY_RE = re.compile(r"[A-Z]{3}")
MAX_TAGS = 32
MAX_DESCRIPTION = 4096
MAX_SCHEMA_BYTES = 64 * 1024
MAX_PRICE = Decimal(1_000_000)
UPDATABLE = (
    "description",
    "input_schema",
    "output_schema",
    "input_price_per_1k",
    "output_price_per_1k",
    "currency",
    "tags",
)
"""What UpdateModelVersion may change; the artifact, kind and context limit are the version."""


@dataclass(frozen=True, slots=True)
class ModelVersion:
    """One registered version (or, before registration, a draft with its artifact checked)."""

    name: str
    version: str
    kind: str
    """'generate' or 'embed'."""
    artifact: CheckedArtifact
    context_length: int
    """Tokens per sequence (generation) or text (embedding); at most the artifact's own."""
    description: str = ""
    input_schema: str = ""
    """JSON Schema text of the input, recorded for callers and tools ('' if none)."""
    output_schema: str = ""
    """JSON Schema text of the output ('' if none)."""
    input_price_per_1k: Decimal = Decimal(0)
    """Price of 1,000 prompt tokens in `currency`."""
    output_price_per_1k: Decimal = Decimal(0)
    """Price of 1,000 completion tokens in `currency`."""
    currency: str = "USD"
    tags: tuple[str, ...] = ()
    state: str = ACTIVE
    deprecation_reason: str = ""
    created_at: float = 0.0
    updated_at: float = 0.0
    created_by: str = ""
    generation: int = 0
    """1 when registered, one more with each change; 0 for a draft."""

    @property
    def key(self) -> str:
        """`name/version`, as the audit log names it."""
        return f"{self.name}/{self.version}"

    def cost(self, input_tokens: int, output_tokens: int) -> Decimal:
        """What a call with these token counts costs, in `currency`."""
        return (
            self.input_price_per_1k * input_tokens + self.output_price_per_1k * output_tokens
        ) / 1000


def check_name(name: str, field: str = "name") -> str:
    if not NAME_RE.fullmatch(name):
        raise InvalidArgument(
            f"{field} {quote(name)} is not a model name: 1-64 of a-z, 0-9, '.', '_', '-', "
            "starting with a letter or digit",
            field=field,
        )
    return name


def check_version(version: str, field: str = "version") -> str:
    if not VERSION_RE.fullmatch(version):
        raise InvalidArgument(
            f"{field} {quote(version)} is not a version: 1-32 of A-Z, a-z, 0-9, '.', '_', '-', "
            "starting with a letter or digit",
            field=field,
        )
    return version


def parse_price(text: str, field: str) -> Decimal:
    """A decimal price ('' is 0): finite, >= 0, at most 1,000,000 and 12 decimal places."""
    if not text:
        return Decimal(0)
    try:
        value = Decimal(text)
    except InvalidOperation:
        raise InvalidArgument(
            f"{field} {quote(text)} is not a decimal number", field=field
        ) from None
    if not value.is_finite() or value < 0 or value > MAX_PRICE:
        raise InvalidArgument(
            f"{field} {quote(text)} must be a number in [0, 1000000]", field=field
        )
    if -value.as_tuple().exponent > 12:  # type: ignore[operator]
        raise InvalidArgument(f"{field} {quote(text)} has more than 12 decimal places", field=field)
    return value


def price_text(value: Decimal) -> str:
    """A price as stored and returned: plain notation, no exponent, no trailing zeros."""
    text = format(value.normalize(), "f")
    return text if text != "-0" else "0"


def check_schema(text: str, field: str) -> str:
    if not text:
        return ""
    if len(text.encode()) > MAX_SCHEMA_BYTES:
        raise InvalidArgument(f"{field} is over {MAX_SCHEMA_BYTES} bytes", field=field)
    try:
        schema = json.loads(text)
    except json.JSONDecodeError as exc:
        raise InvalidArgument(f"{field} is not JSON: {exc}", field=field) from None
    if not isinstance(schema, dict):
        raise InvalidArgument(
            f"{field} must be a JSON Schema object, not {type(schema).__name__}", field=field
        )
    return text


def check_tags(tags: tuple[str, ...]) -> tuple[str, ...]:
    if len(tags) > MAX_TAGS:
        raise InvalidArgument(f"tags has {len(tags)} entries; at most {MAX_TAGS}", field="tags")
    for i, tag in enumerate(tags):
        if not _TAG_RE.fullmatch(tag):
            raise InvalidArgument(
                f"tags[{i}] {quote(tag)} is not a tag: 1-64 of A-Z, a-z, 0-9, '.', '_', ':', '-'",
                field="tags",
            )
    if len(set(tags)) != len(tags):
        raise InvalidArgument("tags has duplicates", field="tags")
    return tags


def check_text(value: str, field: str, limit: int) -> str:
    if len(value) > limit:
        raise InvalidArgument(f"{field} has {len(value)} characters; at most {limit}", field=field)
    return value


def check_currency(value: str) -> str:
    if not _CURRENCY_RE.fullmatch(value):
        raise InvalidArgument(
            f"currency {quote(value)} is not an ISO 4217 code such as 'USD'", field="currency"
        )
    return value


def validate_draft(draft: ModelVersion) -> ModelVersion:
    """The draft with its context limit settled (0: the artifact's own), or InvalidArgument
    naming the first field that is wrong."""
    check_name(draft.name, "model_version.name")
    check_version(draft.version, "model_version.version")
    if draft.kind not in MODEL_KINDS:
        raise InvalidArgument(
            f"model_version.kind {quote(draft.kind)}: use one of {MODEL_KINDS}",
            field="model_version.kind",
        )
    check_text(draft.description, "model_version.description", MAX_DESCRIPTION)
    check_schema(draft.input_schema, "model_version.input_schema")
    check_schema(draft.output_schema, "model_version.output_schema")
    check_currency(draft.currency)
    check_tags(draft.tags)
    own = draft.artifact.context_length
    limit = draft.context_length or own
    if limit <= 0:
        raise InvalidArgument(
            "model_version.context_length is required: the artifact does not say its own "
            "(remote artifacts never do)",
            field="model_version.context_length",
        )
    if own and limit > own:
        raise InvalidArgument(
            f"model_version.context_length={limit} is above the artifact's own limit of {own}",
            field="model_version.context_length",
        )
    return dataclasses.replace(draft, context_length=limit)
