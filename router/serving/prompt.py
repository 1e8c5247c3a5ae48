"""A generation call's input as the model sees it: chat messages rendered through the model's
template (or a raw prompt), tokenized with its BOS rule, and checked against its context into a
scheduler Request. Pure functions of the served model and the call."""

from __future__ import annotations

import dataclasses
import random

from backends.base import SamplingParams
from router.errors import InvalidArgument
from router.models.chat_template import render_chat
from router.scheduler.request import Priority, Request, validate_sampling
from router.serving import tokenize
from router.serving.model import ServedModel
from router.structured.compiler import GrammarCompiler
from router.structured.grammar import FIELD, field
from router.tools import prompt as tool_prompt
from router.tools.spec import Tools

CHAT_ROLES = ("system", "user", "assistant", "tool")


def check_messages(messages: list[dict[str, str]]) -> None:
    """A conversation has turns, each of a known role; InvalidArgument naming the field."""
    if not messages:
        raise InvalidArgument("chat.messages is empty", field="chat.messages")
    for i, m in enumerate(messages):
        if m["role"] not in CHAT_ROLES:
            raise InvalidArgument(
                f"chat.messages[{i}].role={m['role']!r} is not one of {CHAT_ROLES}",
                field=f"chat.messages[{i}].role",
            )


def render(
    model: ServedModel,
    *,
    prompt: str | None,
    messages: list[dict[str, str]] | None,
    tools: Tools | None = None,
) -> str:
    """The prompt text the model sees: chat messages through its template, or the prompt. A
    template that takes tools gets them and the tool history (router.serving.tooling has put
    them into the messages for one that does not)."""
    if messages is not None:
        check_messages(messages)
        template = model.manifest["chat_template"]
        try:
            if tool_prompt.takes_tools(template):
                return render_chat(
                    template,
                    tool_prompt.structured_history(messages),
                    tools=tool_prompt.template_tools(tools),
                )
            return render_chat(template, messages)
        except ValueError as exc:
            raise InvalidArgument(str(exc), field="chat.messages") from None
    if prompt:
        return prompt
    if prompt is not None:
        raise InvalidArgument("prompt is empty", field="prompt")
    raise InvalidArgument("set one of prompt or chat", field="input")


def check_input_size(
    model: ServedModel, *, prompt: str | None, messages: list[dict[str, str]] | None
) -> None:
    """Refuse, before any guardrail, template or tokenizer sees it, an input whose bytes alone
    prove it cannot fit the model's context (see router.serving.tokenize.check_fits). Chat
    templates add text around the messages, so their contents' bytes are a lower bound too."""
    if messages is not None:
        texts = [m["content"] for m in messages]
        field = "chat.messages"
    else:
        texts = [prompt or ""]
        field = "prompt"
    tokenize.check_fits(
        texts,
        limit_tokens=model.context_length - 1,
        token_bytes=model.max_token_bytes,
        what=f"model {model.name!r}",
        field=field,
    )


def check_input_bytes(model: ServedModel, nbytes: int, field: str) -> None:
    """`check_input_size` for an input of `nbytes` text bytes counted on the wire
    (router.services.wire_text), before its strings are decoded."""
    tokenize.check_bytes(
        nbytes,
        limit_tokens=model.context_length - 1,
        token_bytes=model.max_token_bytes,
        what=f"model {model.name!r}",
        field=field,
    )


def encode(model: ServedModel, text: str) -> list[int]:
    """A rendered prompt's token ids (BOS added when the model wants one). On the loop only for
    short texts; `encode_async` picks."""
    assert model.tokenizer is not None
    if len(text) <= tokenize.OFF_LOOP_CHARS and model.pieces is not None:
        ids = model.pieces.encode(text)
    else:
        ids = tokenize.encode_text(model.tokenizer, text, add_special_tokens=False).ids
    bos = model.manifest.get("bos_token_id")
    if model.manifest.get("add_bos_token") and bos is not None and ids[:1] != [bos]:
        ids.insert(0, int(bos))
    if not ids:
        raise InvalidArgument("the input tokenizes to no tokens", field="prompt")
    return ids


async def encode_async(model: ServedModel, text: str) -> list[int]:
    """`encode`, on the tokenizing worker when the text is long (the loop keeps serving)."""
    return await tokenize.off_loop(len(text), lambda: encode(model, text))


def prompt_ids(
    model: ServedModel,
    *,
    prompt: str | None,
    messages: list[dict[str, str]] | None,
) -> list[int]:
    return encode(model, render(model, prompt=prompt, messages=messages))


async def build_request(
    model: ServedModel,
    request_id: str,
    *,
    engine_id: int,
    text: str,
    params: SamplingParams,
    max_tokens_set: bool,
    priority: Priority,
) -> Request:
    """Tokenize a rendered prompt (see `render`) and validate; raise InvalidArgument naming
    what is wrong."""
    ids = await encode_async(model, text)
    context = model.context_length
    room = context - len(ids)
    if room < 1:
        raise InvalidArgument(
            f"the prompt has {len(ids)} tokens; model {model.name!r} allows at most "
            f"{context - 1} so that at least one token can be generated",
            field="prompt",
        )
    vocab = int(model.manifest["vocab_size"])
    if max_tokens_set:
        if params.max_tokens > room:
            raise InvalidArgument(
                f"max_tokens={params.max_tokens} exceeds the context limit of model "
                f"{model.name!r} ({context} tokens including the {len(ids)}-token prompt)",
                field="sampling.max_tokens",
            )
    else:
        params = dataclasses.replace(params, max_tokens=min(model.config.default_max_tokens, room))
    validate_sampling(params, vocab)
    seed = params.seed if params.seed is not None else random.getrandbits(63)
    return Request(
        request_id=request_id,
        engine_id=engine_id,
        prompt_ids=ids,
        params=params,
        priority=priority,
        seed=seed,
        prompt_text=text,
    )


async def constrain(model: ServedModel, request: Request) -> None:
    """Make `request` honour its structured output: compiled for the model's tokenizer when the
    router enforces it, or left to an engine that enforces it itself; InvalidArgument when no
    engine behind `model` can, or when the spec does not compile."""
    spec = request.params.structured
    if spec is None:
        return
    if request.params.ignore_eos:
        raise InvalidArgument(
            f"sampling.ignore_eos cannot be combined with {FIELD}: the output ends with the "
            "model's end token once it is complete",
            field="sampling.ignore_eos",
        )
    assert model.engine is not None
    who = model.engine.structured_output
    if not who:
        raise InvalidArgument(
            f"model {model.name!r} is served by a backend that cannot enforce {FIELD}",
            field=field(spec),
        )
    if who != "router":
        return
    compiler = model.grammars
    if compiler is None:
        assert model.tokenizer is not None
        compiler = model.grammars = GrammarCompiler(
            model.name,
            model.tokenizer,
            int(model.manifest["vocab_size"]),
            [int(i) for i in model.manifest["stop_token_ids"]],
        )
    request.grammar = await compiler.compile(spec)
