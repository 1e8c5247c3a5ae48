"""The OpenAPI 3.1 document of the proxy: the transcoded routes generated from the proto
descriptors (JSON Schema per protobuf's canonical JSON mapping) plus the OpenAI routes."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from google.protobuf.descriptor import Descriptor, EnumDescriptor, FieldDescriptor

from router.rest.http_rule import Binding
from router.rest.openai_openapi import OPENAI_PATHS, OPENAI_SCHEMAS, sse_events

Schema = dict[str, Any]

STATUS = "google.rpc.Status"
_UINT32 = 2**32 - 1
_INT32 = 2**31

_STATUS_SCHEMA: Schema = {
    "type": "object",
    "description": "An error: the gRPC status code, a message naming the problem, and "
    "google.rpc details (BadRequest field violations, RetryInfo, ...).",
    "properties": {
        "code": {"type": "integer", "description": "gRPC status code (3 = INVALID_ARGUMENT)"},
        "message": {"type": "string"},
        "details": {
            "type": "array",
            "items": {
                "type": "object",
                "properties": {"@type": {"type": "string"}},
                "required": ["@type"],
                "additionalProperties": True,
            },
        },
    },
    "required": ["code", "message", "details"],
}


def _int64(fmt: str, lo: int, hi: int) -> Schema:
    # Canonical JSON writes 64-bit integers as decimal strings; numbers are accepted on input.
    return {
        "type": ["string", "integer"],
        "format": fmt,
        "pattern": "^-?[0-9]+$",
        "minimum": lo,
        "maximum": hi,
    }


_SCALARS: dict[int, Schema] = {
    FieldDescriptor.TYPE_DOUBLE: {"type": "number", "format": "double"},
    FieldDescriptor.TYPE_FLOAT: {"type": "number", "format": "float"},
    FieldDescriptor.TYPE_INT32: {
        "type": "integer",
        "format": "int32",
        "minimum": -_INT32,
        "maximum": _INT32 - 1,
    },
    FieldDescriptor.TYPE_SINT32: {
        "type": "integer",
        "format": "int32",
        "minimum": -_INT32,
        "maximum": _INT32 - 1,
    },
    FieldDescriptor.TYPE_SFIXED32: {
        "type": "integer",
        "format": "int32",
        "minimum": -_INT32,
        "maximum": _INT32 - 1,
    },
    FieldDescriptor.TYPE_UINT32: {
        "type": "integer",
        "format": "uint32",
        "minimum": 0,
        "maximum": _UINT32,
    },
    FieldDescriptor.TYPE_FIXED32: {
        "type": "integer",
        "format": "uint32",
        "minimum": 0,
        "maximum": _UINT32,
    },
    FieldDescriptor.TYPE_INT64: _int64("int64", -(2**63), 2**63 - 1),
    FieldDescriptor.TYPE_SINT64: _int64("int64", -(2**63), 2**63 - 1),
    FieldDescriptor.TYPE_SFIXED64: _int64("int64", -(2**63), 2**63 - 1),
    FieldDescriptor.TYPE_UINT64: _int64("uint64", 0, 2**64 - 1),
    FieldDescriptor.TYPE_FIXED64: _int64("uint64", 0, 2**64 - 1),
    FieldDescriptor.TYPE_BOOL: {"type": "boolean"},
    FieldDescriptor.TYPE_STRING: {"type": "string"},
    FieldDescriptor.TYPE_BYTES: {"type": "string", "contentEncoding": "base64"},
}


def _ref(name: str) -> Schema:
    return {"$ref": f"#/components/schemas/{name}"}


class _Schemas:
    """Component schemas, each message and enum once (recursive messages by reference)."""

    def __init__(self) -> None:
        self.components: dict[str, Schema] = {}

    def enum(self, desc: EnumDescriptor) -> Schema:
        if desc.full_name not in self.components:
            self.components[desc.full_name] = {
                "type": "string",
                "enum": [v.name for v in desc.values],
                "description": "Enum value by name (numbers are accepted on input).",
            }
        return _ref(desc.full_name)

    def message(self, desc: Descriptor) -> Schema:
        if desc.full_name.startswith("google.protobuf."):
            return {}  # well-known types have their own JSON forms; none is used today
        name = desc.full_name
        if name in self.components:
            return _ref(name)
        self.components[name] = {}  # a placeholder stops recursion
        properties = {f.json_name: self.field(f) for f in desc.fields}
        schema: Schema = {
            "type": "object",
            "properties": properties,
            "additionalProperties": False,
        }
        oneofs = [o for o in desc.oneofs if not getattr(o, "is_synthetic", False)]
        if oneofs:
            schema["description"] = "; ".join(
                f"at most one of {', '.join(f.json_name for f in o.fields)}" for o in oneofs
            )
        self.components[name] = schema
        return _ref(name)

    def field(self, field: FieldDescriptor) -> Schema:
        sub = field.message_type
        if sub is not None and sub.GetOptions().map_entry:
            return {
                "type": "object",
                "additionalProperties": self.field(sub.fields_by_name["value"]),
            }
        base = self.single(field)
        return {"type": "array", "items": base} if field.is_repeated else base

    def single(self, field: FieldDescriptor) -> Schema:
        if field.message_type is not None:
            return self.message(field.message_type)
        if field.enum_type is not None:
            return self.enum(field.enum_type)
        return dict(_SCALARS[field.type])


def _leaf(desc: Descriptor, dotted: tuple[str, ...]) -> FieldDescriptor:
    field = desc.fields_by_name[dotted[0]]
    for name in dotted[1:]:
        assert field.message_type is not None  # http_rule checked the path
        field = field.message_type.fields_by_name[name]
    return field


def _query_fields(
    desc: Descriptor, prefix: tuple[str, ...], skip: set[tuple[str, ...]], depth: int = 0
) -> list[tuple[str, FieldDescriptor]]:
    """Leaf fields a query parameter may set (dotted JSON names), nested messages included."""
    out: list[tuple[str, FieldDescriptor]] = []
    for field in desc.fields:
        path = (*prefix, field.name)
        if path in skip:
            continue
        sub = field.message_type
        if sub is None:
            out.append((".".join((*prefix, field.json_name)), field))
        elif not field.is_repeated and depth < 3 and not sub.full_name.startswith("google."):
            out += _query_fields(sub, (*prefix, field.json_name), skip, depth + 1)
    return out


def _operation(binding: Binding, schemas: _Schemas, operation_ids: set[str]) -> Schema:
    method = binding.method
    request = method.input_type
    service = method.containing_service.name
    operation_id = f"{service}_{method.name}"
    n = 1
    while operation_id in operation_ids:
        n += 1
        operation_id = f"{service}_{method.name}_{n}"
    operation_ids.add(operation_id)
    bound = {v.field_path for v in binding.template.variables}
    parameters: list[Schema] = [
        {
            "name": ".".join(path),
            "in": "path",
            "required": True,
            "schema": schemas.single(_leaf(request, path)),
        }
        for path in (v.field_path for v in binding.template.variables)
    ]
    operation: Schema = {
        "operationId": operation_id,
        "tags": [service],
        "summary": f"{method.containing_service.full_name}.{method.name}",
    }
    if binding.body == "*":
        body = schemas.message(request)
    elif binding.body:
        body = schemas.field(request.fields_by_name[binding.body])
    if binding.body:
        operation["requestBody"] = {
            "required": True,
            "content": {"application/json": {"schema": body}},
        }
    if binding.body != "*":
        skip = bound | ({(binding.body,)} if binding.body else set())
        for name, field in _query_fields(request, (), skip):
            parameters.append(
                {
                    "name": name,
                    "in": "query",
                    "required": False,
                    "schema": schemas.field(field),
                    **({"explode": True} if field.is_repeated else {}),
                }
            )
    if parameters:
        operation["parameters"] = parameters
    response = method.output_type
    answer = (
        schemas.field(response.fields_by_name[binding.response_body])
        if binding.response_body
        else schemas.message(response)
    )
    if method.server_streaming:
        # A failure after the first message arrives in the stream as the last item.
        late_error: Schema = {
            "type": "object",
            "properties": {"error": _ref(STATUS)},
            "required": ["error"],
            "additionalProperties": False,
        }
        content: Schema = {
            "application/x-ndjson": {"schema": {"oneOf": [answer, late_error]}},
            "text/event-stream": {"schema": sse_events({"oneOf": [answer, _ref(STATUS)]})},
        }
        description = (
            "One message per line (application/x-ndjson, the default) or per `data:` event "
            '(text/event-stream); a late failure ends the stream with `{"error": Status}` '
            "(NDJSON) or an `event: error` carrying the Status (SSE)"
        )
    else:
        content = {"application/json": {"schema": answer}}
        description = "OK"
    operation["responses"] = {
        "200": {"description": description, "content": content},
        "default": {
            "description": "google.rpc.Status",
            "content": {"application/json": {"schema": _ref(STATUS)}},
        },
    }
    return operation


def openapi_document(
    bindings: Sequence[Binding], *, title: str = "irouter", version: str = "0.1.0"
) -> Schema:
    """The whole document; built once at startup."""
    schemas = _Schemas()
    paths: dict[str, dict[str, Schema]] = {}
    operation_ids: set[str] = set()
    for binding in bindings:
        item = paths.setdefault(binding.template.openapi_path(), {})
        item[binding.http_method.lower()] = _operation(binding, schemas, operation_ids)
    schemas.components[STATUS] = _STATUS_SCHEMA
    for path, item in OPENAI_PATHS.items():
        paths[path] = item
    return {
        "openapi": "3.1.0",
        "info": {
            "title": title,
            "version": version,
            "description": "REST face of the irouter gRPC router: every RPC transcoded from its "
            "google.api.http rule (canonical protobuf JSON, errors as google.rpc.Status) and "
            "the OpenAI-compatible routes (errors in OpenAI's shape).",
        },
        "paths": paths,
        "components": {"schemas": {**schemas.components, **OPENAI_SCHEMAS}},
    }
