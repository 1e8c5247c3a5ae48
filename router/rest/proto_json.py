"""Requests from JSON, path and query values under protobuf's canonical JSON mapping, with
errors that name the offending field.

Unknown fields are rejected, in the body and in the query string: a misspelt field
("max_token") would otherwise be dropped silently and the request served with a default. Both the
proto name (`max_tokens`) and the JSON name (`maxTokens`) of a field are accepted; `null` means
the field's default. Conversions are json_format's own; this module only finds *where* a value
is wrong, by re-checking the body field by field once json_format has refused it."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, cast

from google.protobuf import json_format, message_factory
from google.protobuf.descriptor import Descriptor, FieldDescriptor
from google.protobuf.message import Message

# Messages whose JSON form is not an object of their fields (json_format handles them).
_SPECIAL = "google.protobuf."
_MAX_DEPTH = 64


class FieldError(ValueError):
    """A request value that cannot be mapped; `field` is its path as the client wrote it."""

    def __init__(self, field: str, description: str) -> None:
        super().__init__(f"{field}: {description}")
        self.field = field
        self.description = description


def _kind(value: object) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, int | float):
        return "a number"
    if isinstance(value, str):
        return "a string"
    return "an array" if isinstance(value, list) else "an object"


def _fields(desc: Descriptor) -> dict[str, FieldDescriptor]:
    return {**{f.json_name: f for f in desc.fields}, **{f.name: f for f in desc.fields}}


def merge_json(value: object, message: Message, where: str = "") -> None:
    """Merge a JSON value (an object for the message) into `message`; FieldError otherwise."""
    if not isinstance(value, dict):
        raise FieldError(where or "body", f"must be a JSON object, got {_kind(value)}")
    try:
        json_format.ParseDict(value, message, max_recursion_depth=_MAX_DEPTH)
    except (json_format.ParseError, RecursionError) as exc:
        desc = cast(Descriptor, message.DESCRIPTOR)  # the stubs also allow upb's type
        found = _locate(value, desc, where, 0)
        if found is not None:
            raise found from None
        raise FieldError(where or "body", _reason(str(exc))) from None


def _reason(text: str) -> str:
    """json_format's innermost complaint, without its "Failed to parse x field: " chain."""
    while text.startswith("Failed to parse ") and ": " in text:
        text = text.split(": ", 1)[1]
    return text.rstrip(".") or "invalid value"


def _check_leaf(desc: Descriptor, key: str, value: object, where: str) -> FieldError | None:
    try:
        json_format.ParseDict({key: value}, message_factory.GetMessageClass(desc)())
    except (json_format.ParseError, RecursionError) as exc:
        return FieldError(where, _reason(str(exc)))
    return None


def _locate(value: object, desc: Descriptor, where: str, depth: int) -> FieldError | None:
    """The first value in `value` that json_format refuses, with its path."""
    if depth > _MAX_DEPTH:
        return FieldError(where, f"nesting deeper than {_MAX_DEPTH} levels")
    if not isinstance(value, dict):
        return FieldError(where or "body", f"must be a JSON object, got {_kind(value)}")
    fields = _fields(desc)
    oneofs: dict[str, str] = {}
    for key, item in value.items():
        path = f"{where}.{key}" if where else key
        field = fields.get(key)
        if field is None:
            known = ", ".join(f.json_name for f in desc.fields) or "none"
            return FieldError(path, f"unknown field in {desc.name} (its fields: {known})")
        if item is None:
            continue
        oneof = field.containing_oneof
        if oneof is not None and not getattr(oneof, "is_synthetic", False):
            if oneof.name in oneofs:
                return FieldError(
                    path,
                    f"only one of the '{oneof.name}' fields may be set; got {oneofs[oneof.name]}",
                )
            oneofs[oneof.name] = key
        found = _locate_field(desc, field, key, item, path, depth)
        if found is not None:
            return found
    return None


def _locate_field(
    desc: Descriptor, field: FieldDescriptor, key: str, item: object, path: str, depth: int
) -> FieldError | None:
    sub = field.message_type
    if sub is not None and sub.GetOptions().map_entry:
        if not isinstance(item, dict):
            return FieldError(path, f"must be a JSON object (a map), got {_kind(item)}")
        value_field = sub.fields_by_name["value"]
        for k, v in item.items():
            if value_field.message_type is not None and not _special(value_field.message_type):
                found = _locate(v, value_field.message_type, f"{path}.{k}", depth + 1)
            else:
                found = _check_leaf(desc, key, {k: v}, f"{path}.{k}")
            if found is not None:
                return found
        return None
    if field.is_repeated:
        if not isinstance(item, list):
            return FieldError(path, f"must be a JSON array, got {_kind(item)}")
        for i, element in enumerate(item):
            if sub is not None and not _special(sub):
                found = _locate(element, sub, f"{path}[{i}]", depth + 1)
            else:
                found = _check_leaf(desc, key, [element], f"{path}[{i}]")
            if found is not None:
                return found
        return None
    if sub is not None and not _special(sub):
        return _locate(item, sub, path, depth + 1)
    return _check_leaf(desc, key, item, path)


def _special(desc: Descriptor) -> bool:
    return desc.full_name.startswith(_SPECIAL)


def resolve_path(desc: Descriptor, dotted: str) -> list[FieldDescriptor]:
    """The fields along a dotted path of proto or JSON names; FieldError if one is unknown."""
    chain: list[FieldDescriptor] = []
    current: Descriptor | None = desc
    for name in dotted.split("."):
        field = _fields(current).get(name) if current is not None else None
        if field is None:
            raise FieldError(dotted, f"unknown field of {desc.name}")
        chain.append(field)
        current = field.message_type
    return chain


def _scalar(field: FieldDescriptor, raw: str, where: str) -> object:
    """A path or query string as the JSON value json_format expects for the field."""
    if field.type == FieldDescriptor.TYPE_BOOL:
        if raw in ("true", "false"):
            return raw == "true"
        raise FieldError(where, f"must be true or false, got {raw!r}")
    if field.type == FieldDescriptor.TYPE_ENUM and raw.lstrip("-").isdigit():
        return int(raw)
    return raw  # json_format parses numbers, 64-bit integers and bytes from strings


def set_from_strings(
    message: Message,
    chain: Sequence[FieldDescriptor],
    values: list[str],
    where: str,
    *,
    conflict_check: bool = False,
) -> None:
    """Set the scalar (or repeated scalar) field at the end of `chain` from path or query
    strings. With `conflict_check`, a different value already set (from the body) is an error."""
    leaf = chain[-1]
    if leaf.message_type is not None and leaf.message_type.full_name in _STRING_WKTS:
        _set_well_known(message, chain, values, where)
        return
    if leaf.message_type is not None:
        raise FieldError(where, "is a message; set its fields instead (e.g. a.b=1)")
    if not leaf.is_repeated and len(values) > 1:
        raise FieldError(where, f"is a single value but was given {len(values)} times")
    parent = message
    for field in chain[:-1]:
        if field.is_repeated:
            raise FieldError(where, f"crosses the repeated field {field.name!r}")
        parent = getattr(parent, field.name)
    converted: Any = [_scalar(leaf, v, where) for v in values]
    if not leaf.is_repeated:
        converted = converted[0]
    parent_desc = cast(Descriptor, parent.DESCRIPTOR)
    probe = message_factory.GetMessageClass(parent_desc)()
    try:
        json_format.ParseDict({leaf.name: converted}, probe)
    except json_format.ParseError as exc:
        raise FieldError(where, _reason(str(exc))) from None
    new = getattr(probe, leaf.name)
    if leaf.is_repeated:
        target = getattr(parent, leaf.name)
        del target[:]
        target.extend(new)
        return
    if conflict_check and _is_set(parent, leaf) and getattr(parent, leaf.name) != new:
        raise FieldError(
            where, f"is {new!r} in the path but {getattr(parent, leaf.name)!r} in the body"
        )
    setattr(parent, leaf.name, new)


_STRING_WKTS = {
    "google.protobuf.FieldMask",
    "google.protobuf.Timestamp",
    "google.protobuf.Duration",
}
"""Well-known message types whose JSON form is one string: set from a path or query value as
that string (`?update_mask=description,tags`), as grpc-gateway does."""


def _set_well_known(
    message: Message, chain: Sequence[FieldDescriptor], values: list[str], where: str
) -> None:
    leaf = chain[-1]
    assert leaf.message_type is not None
    if leaf.is_repeated:
        raise FieldError(where, "is a repeated message; send it in the body")
    parent = message
    for field in chain[:-1]:
        if field.is_repeated:
            raise FieldError(where, f"crosses the repeated field {field.name!r}")
        parent = getattr(parent, field.name)
    # A FieldMask given as ?mask=a&mask=b means both paths.
    text = ",".join(values) if leaf.message_type.full_name == "google.protobuf.FieldMask" else None
    if text is None:
        if len(values) > 1:
            raise FieldError(where, f"is a single value but was given {len(values)} times")
        text = values[0]
    probe = message_factory.GetMessageClass(cast(Descriptor, parent.DESCRIPTOR))()
    try:
        json_format.ParseDict({leaf.name: text}, probe)
    except json_format.ParseError as exc:
        raise FieldError(where, _reason(str(exc))) from None
    getattr(parent, leaf.name).CopyFrom(getattr(probe, leaf.name))


def _is_set(message: Message, field: FieldDescriptor) -> bool:
    if field.has_presence:
        return message.HasField(field.name)
    return bool(getattr(message, field.name) != field.default_value)


def to_json(message: Message) -> dict[str, Any]:
    """Canonical JSON: lowerCamelCase names, 64-bit integers as strings, enums by name, fields
    at their default value omitted."""
    return json_format.MessageToDict(message)
