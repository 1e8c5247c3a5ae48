"""OpenAI request bodies → irouter protos: reading the JSON body under a size limit and checking
each field's type, naming the field and the accepted values when one is wrong."""

from __future__ import annotations

import json
from typing import Any

import orjson
from starlette.requests import Request

from router.proto.irouter.v1 import inference_service_pb2 as pb
from router.rest import openai_tools
from router.rest.body import read_body
from router.rest.errors import bad_request, refuse_unknown, type_error
from router.rest.openai_params import STREAM_OPTIONS, refuse_unhonoured

Body = dict[str, Any]

_UINT32 = 2**32 - 1
_UINT64 = 2**64 - 1
# OpenAI's roles → the chat template's; "developer" is OpenAI's newer name for "system".
_ROLES = {
    "system": "system",
    "developer": "system",
    "user": "user",
    "assistant": "assistant",
    "tool": "tool",
}


async def read_json(request: Request, max_bytes: int) -> Body:
    """The body as a JSON object; 413 past `max_bytes` (checked before reading when the client
    sends Content-Length), 400 for anything that is not a JSON object."""
    raw = await read_body(request, max_bytes)
    if not raw:
        raise bad_request("the request body is empty; send a JSON object", code="invalid_json")
    try:
        body = orjson.loads(raw)  # NaN and Infinity, invalid UTF-8 and lone surrogates refused
    except ValueError as exc:  # orjson.JSONDecodeError
        raise bad_request(
            f"the request body is not valid JSON: {exc}", code="invalid_json"
        ) from None
    if not isinstance(body, dict):
        raise bad_request(
            f"the request body must be a JSON object, got {type(body).__name__}",
            code="invalid_json",
        )
    return body


def get_str(body: Body, name: str, *, required: bool = False) -> str | None:
    value = body.get(name)
    if value is None:
        if required:
            raise bad_request(f"'{name}' is required", param=name, code="missing_required_field")
        return None
    if not isinstance(value, str):
        raise type_error(name, "a string", value)
    return value


def get_bool(body: Body, name: str) -> bool:
    value = body.get(name)
    if value is None:
        return False
    if not isinstance(value, bool):
        raise type_error(name, "true or false", value)
    return value


def get_int(body: Body, name: str, lo: int, hi: int) -> int | None:
    value = body.get(name)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int):
        raise type_error(name, "an integer", value)
    if not lo <= value <= hi:
        raise bad_request(
            f"'{name}'={value} is out of range [{lo}, {hi}]", param=name, code="invalid_value"
        )
    return value


def get_float(body: Body, name: str) -> float | None:
    value = body.get(name)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise type_error(name, "a number", value)
    return float(value)


def get_model(body: Body) -> str:
    model = get_str(body, "model", required=True)
    assert model is not None
    return model


def get_stream(body: Body) -> tuple[bool, bool]:
    """(stream, include_usage)."""
    stream = get_bool(body, "stream")
    options = body.get("stream_options")
    if options is None:
        return stream, False
    if not isinstance(options, dict):
        raise type_error("stream_options", "an object", options)
    refuse_unhonoured(options, STREAM_OPTIONS, "stream_options.")
    return stream, get_bool(options, "include_usage")


def sampling(body: Body) -> pb.SamplingParams:
    """The sampling fields shared by chat and text completions. Ranges are the router's to check,
    so the proxy and gRPC clients get the same messages."""
    out = pb.SamplingParams()
    n = get_int(body, "n", 1, _UINT32)
    if n is not None and n != 1:
        raise bad_request(f"'n'={n} is not supported; only n=1", param="n", code="unsupported")
    max_tokens = get_int(body, "max_completion_tokens", 0, _UINT32)
    if max_tokens is None:
        max_tokens = get_int(body, "max_tokens", 0, _UINT32)
    if max_tokens is not None:
        out.max_tokens = max_tokens
    for name in (
        "temperature",
        "top_p",
        "min_p",
        "repetition_penalty",
        "presence_penalty",
        "frequency_penalty",
    ):
        value = get_float(body, name)
        if value is not None:
            setattr(out, name, value)
    top_k = get_int(body, "top_k", -1, _UINT32)
    if top_k is not None:
        out.top_k = max(top_k, 0)  # vLLM's -1 means "disabled", as 0 does here
    seed = get_int(body, "seed", 0, _UINT64)
    if seed is not None:
        out.seed = seed
    out.ignore_eos = get_bool(body, "ignore_eos")  # vLLM's extension, for benchmarks
    stop = body.get("stop")
    if isinstance(stop, str):
        out.stop.append(stop)
    elif isinstance(stop, list) and all(isinstance(s, str) for s in stop):
        out.stop.extend(stop)
    elif stop is not None:
        raise type_error("stop", "a string or a list of strings", stop)
    structured = structured_output(body)
    if structured is not None:
        out.structured_output.CopyFrom(structured)
    return out


_JSON_SCHEMA_FIELDS = frozenset({"name", "description", "schema", "strict"})


def structured_output(body: Body) -> pb.StructuredOutput | None:
    """`response_format` as the router's StructuredOutput: `json_object` (any JSON object) or
    `json_schema` (its `schema`, enforced whether or not `strict` is set: an output that
    validates is what a non-strict request hopes for too); `text` or none: no constraint."""
    value = body.get("response_format")
    if value is None:
        return None
    if not isinstance(value, dict) or not isinstance(value.get("type"), str):
        raise type_error("response_format", "an object with a string 'type'", value)
    kind = value["type"]
    extra = sorted(set(value) - {"type", "json_schema"})
    if extra or (kind != "json_schema" and "json_schema" in value):
        name = extra[0] if extra else "json_schema"
        raise bad_request(
            f"unrecognized argument 'response_format.{name}' for type {kind!r}",
            param=f"response_format.{name}",
            code="unknown_parameter",
        )
    if kind == "text":
        return None
    if kind == "json_object":
        return pb.StructuredOutput(json_object=True)
    if kind != "json_schema":
        raise bad_request(
            f"'response_format.type'={json.dumps(kind)} is not supported; use one of text, "
            "json_object, json_schema",
            param="response_format.type",
            code="invalid_value",
        )
    spec = value.get("json_schema")
    if not isinstance(spec, dict):
        raise type_error("response_format.json_schema", "an object with 'name' and 'schema'", spec)
    refuse_unknown("response_format.json_schema", spec, _JSON_SCHEMA_FIELDS)
    name = spec.get("name")
    if not isinstance(name, str) or not name:
        raise type_error("response_format.json_schema.name", "a non-empty string", name)
    strict = spec.get("strict")
    if strict is not None and not isinstance(strict, bool):
        raise type_error("response_format.json_schema.strict", "a boolean", strict)
    schema = spec.get("schema", {})  # OpenAI: absent means any JSON value of the schema {}
    if not isinstance(schema, dict):
        raise type_error("response_format.json_schema.schema", "a JSON Schema object", schema)
    return pb.StructuredOutput(json_schema=json.dumps(schema))


def chat_messages(body: Body) -> pb.ChatMessages:
    raw = body.get("messages")
    if raw is None:
        raise bad_request("'messages' is required", param="messages", code="missing_required_field")
    if not isinstance(raw, list) or not raw:
        raise type_error("messages", "a non-empty list of messages", raw)
    out = pb.ChatMessages()
    for i, message in enumerate(raw):
        where = f"messages[{i}]"
        if not isinstance(message, dict):
            raise type_error(where, "an object with 'role' and 'content'", message)
        role = message.get("role")
        if role not in _ROLES:
            raise bad_request(
                f"'{where}.role'={json.dumps(role)} is not supported; "
                f"use one of {', '.join(_ROLES)}",
                param=f"{where}.role",
                code="invalid_value",
            )
        calls = openai_tools.history_calls(message, where) if role == "assistant" else []
        content = message.get("content")
        if content is None and calls:  # an assistant turn that only called tools
            content = ""
        text, parts = _content(content, where)
        turn = out.messages.add(role=_ROLES[role], content=text, parts=parts)
        turn.tool_calls.extend(calls)
        if role == "tool":
            call_id = message.get("tool_call_id")
            if not isinstance(call_id, str):
                raise type_error(f"{where}.tool_call_id", "a string", call_id)
            turn.tool_call_id = call_id
    return out


def _content(content: object, where: str) -> tuple[str, list[pb.ContentPart]]:
    """A string, or a list of text parts (joined) and image_url parts (as parts, when there is
    one: the router refuses them unless the model's server reads images); audio and files are
    refused."""
    if isinstance(content, str):
        return content, []
    name = f"{where}.content"
    if not isinstance(content, list):
        raise type_error(name, "a string or a list of text and image_url parts", content)
    texts: list[str] = []
    parts: list[pb.ContentPart] = []
    for j, part in enumerate(content):
        kind = part.get("type") if isinstance(part, dict) else type(part).__name__
        if kind == "text":
            text = part.get("text")
            if not isinstance(text, str):
                raise type_error(f"{name}[{j}].text", "a string", text)
            texts.append(text)
            parts.append(pb.ContentPart(text=text))
        elif kind == "image_url":
            parts.append(pb.ContentPart(image_url=_image_url(part, f"{name}[{j}]")))
        else:
            raise bad_request(
                f"'{name}' has a part of type {json.dumps(kind)}; only text and image_url are "
                "supported",
                param=name,
                code="unsupported_content",
            )
    if len(texts) == len(parts):
        return "".join(texts), []
    return "", parts


def _image_url(part: dict[str, Any], where: str) -> pb.ImageUrl:
    image = part.get("image_url")
    if isinstance(image, str):  # some clients send the URL itself
        return pb.ImageUrl(url=image)
    if not isinstance(image, dict):
        raise type_error(f"{where}.image_url", "an object with 'url'", image)
    refuse_unknown(f"{where}.image_url", image, frozenset({"url", "detail"}))
    url, detail = image.get("url"), image.get("detail", "")
    if not isinstance(url, str):
        raise type_error(f"{where}.image_url.url", "a string", url)
    if not isinstance(detail, str):
        raise type_error(f"{where}.image_url.detail", "a string", detail)
    return pb.ImageUrl(url=url, detail=detail)


def prompt(body: Body) -> str:
    """A completion's prompt: a string, or a list holding exactly one string."""
    raw = body.get("prompt")
    if raw is None:
        raise bad_request("'prompt' is required", param="prompt", code="missing_required_field")
    if isinstance(raw, list) and len(raw) == 1:
        raw = raw[0]
    if not isinstance(raw, str):
        raise type_error("prompt", "a string (token arrays and batches are not supported)", raw)
    return raw


def embedding_input(body: Body) -> list[str]:
    raw = body.get("input")
    if raw is None:
        raise bad_request("'input' is required", param="input", code="missing_required_field")
    if isinstance(raw, str):
        return [raw]
    if isinstance(raw, list) and raw and all(isinstance(t, str) for t in raw):
        return raw
    raise type_error("input", "a string or a non-empty list of strings", raw)


def encoding_format(body: Body) -> str:
    value = get_str(body, "encoding_format") or "float"
    if value not in ("float", "base64"):
        raise bad_request(
            f"'encoding_format'={json.dumps(value)} is not supported; use 'float' or 'base64'",
            param="encoding_format",
            code="invalid_value",
        )
    return value
