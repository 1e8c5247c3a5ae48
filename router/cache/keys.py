"""How the caches key a generation call: its input as the exact cache hashes it, and what the
semantic cache compares (the question) within which namespace (everything else)."""

from __future__ import annotations

import hashlib
import json

from router.retrieval.rag import RagRequest
from router.scheduler.request import Request


def input_bytes(messages: list[dict[str, str]] | None, prompt: str | None) -> bytes:
    """The input as the exact cache keys it: the prompt, or the chat turns (role and content)."""
    if messages is None:
        return b"p" + (prompt or "").encode("utf-8", "surrogatepass")
    return b"c" + json.dumps([sorted(m.items()) for m in messages]).encode()


def semantic_text(
    messages: list[dict[str, str]] | None, prompt: str | None
) -> tuple[str, bytes] | None:
    """(the question, everything else) for the semantic cache: the prompt and no context, or a
    chat's last message when it is the user's and the earlier turns. None: not comparable."""
    if messages is None:
        return (prompt, b"") if prompt else None
    if not messages or messages[-1]["role"] != "user" or not messages[-1]["content"]:
        return None
    return messages[-1]["content"], json.dumps(messages[:-1]).encode()


def semantic_namespace(
    model_id: str, request: Request, context: bytes, rag: RagRequest | None
) -> bytes:
    """Prompts match semantically only within one namespace: same model build, sampling
    parameters, earlier turns and retrieval option."""
    h = hashlib.blake2b(digest_size=16)
    for part in (model_id.encode(), repr(request.params).encode(), context, repr(rag).encode()):
        h.update(part)
        h.update(b"\0")
    return h.digest()
