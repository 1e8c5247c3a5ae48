"""OpenAPI paths and schemas of the OpenAI-compatible routes (openai_routes.py): the fields the
proxy honours (openai_params.py), not the whole of OpenAI's API. Any other field is refused with
a 400 naming it, unless its value asks for nothing (`logprobs: false`, `n: 1`...), so the request
schemas allow no additional properties."""

from __future__ import annotations

from typing import Any

Schema = dict[str, Any]


def _ref(name: str) -> Schema:
    return {"$ref": f"#/components/schemas/{name}"}


def sse_events(data: Schema | None) -> Schema:
    """A text/event-stream body, described (as OpenAPI tools read it) event by event; `data`
    is the schema of the JSON each event's data line carries (None: not always JSON)."""
    line: Schema = {"type": "string"}
    if data is not None:
        line.update(contentMediaType="application/json", contentSchema=data)
    return {
        "type": "object",
        "properties": {
            "event": {"type": "string"},
            "data": line,
            "id": {"type": "string"},
            "retry": {"type": "integer"},
        },
        "required": ["data"],
    }


_ERROR = {
    "description": "An error in OpenAI's shape",
    "content": {"application/json": {"schema": _ref("openai.Error")}},
}
_SESSION: Schema = {
    name: {"type": "string", "description": "Routing session key: same key, same replica"}
    for name in ("prompt_cache_key", "safety_identifier", "user")
}
_SAMPLING: Schema = {
    "model": {"type": "string"},
    "max_tokens": {"type": "integer", "minimum": 0, "maximum": 2**32 - 1},
    "max_completion_tokens": {"type": "integer", "minimum": 0, "maximum": 2**32 - 1},
    "temperature": {"type": "number"},
    "top_p": {"type": "number"},
    "top_k": {"type": "integer", "minimum": -1},
    "min_p": {"type": "number"},
    "repetition_penalty": {"type": "number"},
    "presence_penalty": {"type": "number"},
    "frequency_penalty": {"type": "number"},
    "seed": {"type": "integer", "minimum": 0, "maximum": 2**64 - 1},
    "stop": {"oneOf": [{"type": "string"}, {"type": "array", "items": {"type": "string"}}]},
    "n": {"type": "integer", "enum": [1]},
    "ignore_eos": {"type": "boolean"},
    "response_format": {
        "description": "Structured output: any JSON object, or JSON valid for a schema",
        "oneOf": [
            {
                "type": "object",
                "properties": {"type": {"enum": ["text", "json_object"]}},
                "required": ["type"],
                "additionalProperties": False,
            },
            {
                "type": "object",
                "properties": {
                    "type": {"const": "json_schema"},
                    "json_schema": {
                        "type": "object",
                        "properties": {
                            "name": {"type": "string", "minLength": 1},
                            "description": {"type": "string"},
                            "schema": {"type": "object"},
                            "strict": {"type": "boolean"},
                        },
                        "required": ["name"],
                        "additionalProperties": False,
                    },
                },
                "required": ["type", "json_schema"],
                "additionalProperties": False,
            },
        ],
    },
    "stream": {"type": "boolean"},
    "stream_options": {
        "type": "object",
        "properties": {"include_usage": {"type": "boolean"}},
        "additionalProperties": False,
    },
    **_SESSION,
}
_USAGE: Schema = {
    "type": "object",
    "properties": {
        "prompt_tokens": {"type": "integer"},
        "completion_tokens": {"type": "integer"},
        "total_tokens": {"type": "integer"},
    },
}
_FINISH: Schema = {
    "type": ["string", "null"],
    "enum": ["stop", "length", "content_filter", "tool_calls", None],
}
_TOOL_CALL: Schema = {
    "type": "object",
    "properties": {
        "id": {"type": "string"},
        "type": {"const": "function"},
        "function": {
            "type": "object",
            "properties": {"name": {"type": "string"}, "arguments": {"type": "string"}},
            "required": ["name", "arguments"],
        },
    },
    "required": ["id", "type", "function"],
}
_TOOLS: Schema = {
    "tools": {
        "type": "array",
        "maxItems": 128,
        "items": {
            "type": "object",
            "properties": {
                "type": {"const": "function"},
                "function": {
                    "type": "object",
                    "properties": {
                        "name": {"type": "string", "pattern": "^[A-Za-z_][A-Za-z0-9_-]{0,63}$"},
                        "description": {"type": "string"},
                        "parameters": {"type": "object"},
                        "strict": {"type": "boolean"},
                    },
                    "required": ["name"],
                    "additionalProperties": False,
                },
            },
            "required": ["type", "function"],
            "additionalProperties": False,
        },
    },
    "tool_choice": {
        "oneOf": [
            {"type": "string", "enum": ["auto", "none", "required"]},
            {
                "type": "object",
                "properties": {
                    "type": {"const": "function"},
                    "function": {
                        "type": "object",
                        "properties": {"name": {"type": "string"}},
                        "required": ["name"],
                    },
                },
                "required": ["type", "function"],
            },
        ]
    },
    "parallel_tool_calls": {"type": "boolean"},
}

OPENAI_SCHEMAS: dict[str, Schema] = {
    "openai.Error": {
        "type": "object",
        "properties": {
            "error": {
                "type": "object",
                "properties": {
                    "message": {"type": "string"},
                    "type": {"type": "string"},
                    "param": {"type": ["string", "null"]},
                    "code": {"type": ["string", "null"]},
                },
                "required": ["message", "type"],
            }
        },
        "required": ["error"],
    },
    "openai.ChatCompletionRequest": {
        "type": "object",
        "properties": {
            **_SAMPLING,
            "messages": {
                "type": "array",
                "minItems": 1,
                "items": {
                    "type": "object",
                    "properties": {
                        "role": {
                            "type": "string",
                            "enum": ["system", "developer", "user", "assistant", "tool"],
                        },
                        "tool_calls": {"type": "array", "items": _TOOL_CALL},
                        "tool_call_id": {"type": "string"},
                        "content": {
                            "oneOf": [
                                {"type": "null"},
                                {"type": "string"},
                                {
                                    "type": "array",
                                    "items": {
                                        "type": "object",
                                        "properties": {
                                            "type": {"const": "text"},
                                            "text": {"type": "string"},
                                        },
                                        "additionalProperties": False,
                                        "required": ["type", "text"],
                                    },
                                },
                            ]
                        },
                    },
                    "required": ["role"],
                },
            },
            **_TOOLS,
        },
        "required": ["model", "messages"],
    },
    "openai.CompletionRequest": {
        "type": "object",
        "properties": {
            **_SAMPLING,
            "prompt": {
                "oneOf": [
                    {"type": "string"},
                    {"type": "array", "items": {"type": "string"}, "minItems": 1, "maxItems": 1},
                ]
            },
        },
        "additionalProperties": False,
        "required": ["model", "prompt"],
    },
    "openai.EmbeddingRequest": {
        "type": "object",
        "properties": {
            "model": {"type": "string"},
            "input": {
                "oneOf": [
                    {"type": "string"},
                    {"type": "array", "items": {"type": "string"}, "minItems": 1},
                ]
            },
            "encoding_format": {"type": "string", "enum": ["float", "base64"]},
            **_SESSION,
        },
        "additionalProperties": False,
        "required": ["model", "input"],
    },
    "openai.ChatCompletion": {
        "type": "object",
        "properties": {
            "id": {"type": "string"},
            "object": {"const": "chat.completion"},
            "created": {"type": "integer"},
            "model": {"type": "string"},
            "choices": {
                "type": "array",
                "items": {
                    "type": "object",
                    "properties": {
                        "index": {"type": "integer"},
                        "message": {
                            "type": "object",
                            "properties": {
                                "role": {"const": "assistant"},
                                "content": {"type": ["string", "null"]},
                                "tool_calls": {"type": "array", "items": _TOOL_CALL},
                            },
                        },
                        "finish_reason": _FINISH,
                    },
                },
            },
            "usage": _USAGE,
        },
    },
    "openai.Completion": {
        "type": "object",
        "properties": {
            "id": {"type": "string"},
            "object": {"const": "text_completion"},
            "created": {"type": "integer"},
            "model": {"type": "string"},
            "choices": {
                "type": "array",
                "items": {
                    "type": "object",
                    "properties": {
                        "index": {"type": "integer"},
                        "text": {"type": "string"},
                        "finish_reason": _FINISH,
                    },
                },
            },
            "usage": _USAGE,
        },
    },
    "openai.EmbeddingList": {
        "type": "object",
        "properties": {
            "object": {"const": "list"},
            "data": {
                "type": "array",
                "items": {
                    "type": "object",
                    "properties": {
                        "object": {"const": "embedding"},
                        "index": {"type": "integer"},
                        "embedding": {
                            "oneOf": [
                                {"type": "array", "items": {"type": "number"}},
                                {"type": "string", "contentEncoding": "base64"},
                            ]
                        },
                    },
                },
            },
            "model": {"type": "string"},
            "usage": _USAGE,
        },
    },
    "openai.ModelList": {
        "type": "object",
        "properties": {
            "object": {"const": "list"},
            "data": {
                "type": "array",
                "items": {
                    "type": "object",
                    "properties": {
                        "id": {"type": "string"},
                        "object": {"const": "model"},
                        "created": {"type": "integer"},
                        "owned_by": {"type": "string"},
                    },
                },
            },
        },
    },
}


def _post(operation_id: str, request: str, response: str, streams: bool) -> Schema:
    content: Schema = {"application/json": {"schema": _ref(response)}}
    if streams:
        # Each event is a JSON chunk, except the final "[DONE]".
        content["text/event-stream"] = {"schema": sse_events(None)}
    return {
        "post": {
            "operationId": operation_id,
            "tags": ["OpenAI"],
            "requestBody": {
                "required": True,
                "content": {"application/json": {"schema": _ref(request)}},
            },
            "responses": {
                "200": {
                    "description": "The answer; with `stream: true`, Server-Sent Events "
                    "ending with `data: [DONE]`"
                    if streams
                    else "The answer",
                    "content": content,
                },
                "default": _ERROR,
            },
        }
    }


OPENAI_PATHS: dict[str, Schema] = {
    "/v1/chat/completions": _post(
        "openai_chat_completions", "openai.ChatCompletionRequest", "openai.ChatCompletion", True
    ),
    "/v1/completions": _post(
        "openai_completions", "openai.CompletionRequest", "openai.Completion", True
    ),
    "/v1/embeddings": _post(
        "openai_embeddings", "openai.EmbeddingRequest", "openai.EmbeddingList", False
    ),
    "/v1/models": {
        "get": {
            "operationId": "openai_models",
            "tags": ["OpenAI"],
            "responses": {
                "200": {
                    "description": "The served models",
                    "content": {"application/json": {"schema": _ref("openai.ModelList")}},
                },
                "default": _ERROR,
            },
        }
    },
}
