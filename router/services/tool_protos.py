"""Tools and tool calls: proto ↔ domain (router.tools), with the checks that need the proto's
field names."""

from __future__ import annotations

import json

from router.errors import InvalidArgument
from router.proto.irouter.v1 import inference_service_pb2 as pb
from router.tools import spec
from router.tools.spec import ToolCallDelta, Tools

_MODES = {
    pb.TOOL_CHOICE_MODE_UNSPECIFIED: "auto",
    pb.TOOL_CHOICE_MODE_AUTO: "auto",
    pb.TOOL_CHOICE_MODE_NONE: "none",
    pb.TOOL_CHOICE_MODE_REQUIRED: "required",
}


def tools_from_proto(message: pb.GenerateRequest | pb.CompleteRequest) -> Tools | None:
    """The call's tools and choice, checked; None when it offers none and asks for none."""
    has_choice = message.HasField("tool_choice")
    if not message.tools and not has_choice and not message.HasField("parallel_tool_calls"):
        return None
    choice, function = "auto", ""
    which = message.tool_choice.WhichOneof("choice") if has_choice else None
    if which == "function":
        choice, function = "function", message.tool_choice.function
    elif which == "mode":
        mode = _MODES.get(message.tool_choice.mode)
        if mode is None:
            raise InvalidArgument(
                f"tool_choice.mode={message.tool_choice.mode} is not a known ToolChoiceMode",
                field="tool_choice.mode",
            )
        choice = mode
    return spec.checked(
        Tools(
            tools=tuple(spec.Tool(t.name, t.description, t.parameters) for t in message.tools),
            choice=choice,
            function=function,
            parallel=message.parallel_tool_calls
            if message.HasField("parallel_tool_calls")
            else True,
        )
    )


def message_from_proto(m: pb.ChatMessage, i: int) -> dict[str, str]:
    """A chat turn with its tool-call history and images as serving.answer takes it."""
    out = {"role": m.role, "content": m.content}
    if m.parts:
        out.update(_parts(m, i))
    if m.tool_calls:
        if m.role != "assistant":
            raise InvalidArgument(
                f"chat.messages[{i}] has tool_calls but its role is {m.role!r}; only assistant "
                "turns make calls",
                field=f"chat.messages[{i}].tool_calls",
            )
        calls = []
        for j, c in enumerate(m.tool_calls):
            where = f"chat.messages[{i}].tool_calls[{j}]"
            if not c.id or not c.name:
                raise InvalidArgument(f"{where} needs an id and a name", field=where)
            try:
                json.loads(c.arguments)
            except ValueError as exc:
                raise InvalidArgument(
                    f"{where}.arguments is not valid JSON: {exc}", field=f"{where}.arguments"
                ) from None
            calls.append({"id": c.id, "name": c.name, "arguments": c.arguments})
        out["tool_calls"] = json.dumps(calls)
    if m.role == "tool":
        if not m.tool_call_id:
            raise InvalidArgument(
                f"chat.messages[{i}] is a tool result without tool_call_id",
                field=f"chat.messages[{i}].tool_call_id",
            )
        out["tool_call_id"] = m.tool_call_id
    return out


IMAGE_SCHEMES = ("http://", "https://", "data:")
IMAGE_DETAILS = ("", "auto", "low", "high")


def _parts(m: pb.ChatMessage, i: int) -> dict[str, str]:
    """`content` as the parts' text joined, and `parts` (the OpenAI API's form, as JSON text)
    when an image is among them."""
    where = f"chat.messages[{i}]"
    if m.content:
        raise InvalidArgument(
            f"{where} sets both content and parts; set one", field=f"{where}.parts"
        )
    texts: list[str] = []
    parts: list[dict[str, object]] = []
    for j, part in enumerate(m.parts):
        which = part.WhichOneof("part")
        if which == "text":
            texts.append(part.text)
            parts.append({"type": "text", "text": part.text})
        elif which == "image_url":
            image = part.image_url
            field = f"{where}.parts[{j}].image_url"
            if not image.url.startswith(IMAGE_SCHEMES):
                raise InvalidArgument(
                    f"{field}.url must be an http://, https:// or data: URL", field=f"{field}.url"
                )
            if image.detail not in IMAGE_DETAILS:
                raise InvalidArgument(
                    f"{field}.detail={image.detail!r} is not one of auto, low, high",
                    field=f"{field}.detail",
                )
            url: dict[str, str] = {"url": image.url}
            if image.detail:
                url["detail"] = image.detail
            parts.append({"type": "image_url", "image_url": url})
        else:
            raise InvalidArgument(f"{where}.parts[{j}] is empty", field=f"{where}.parts[{j}]")
    out = {"content": "".join(texts)}
    if len(texts) < len(parts):
        out["parts"] = json.dumps(parts)
    return out


def key_bytes(message: pb.GenerateRequest | pb.CompleteRequest) -> bytes:
    """The tool fields as the exact cache keys them (empty when none is set)."""
    if not message.tools and not message.HasField("tool_choice"):
        return b""
    copy = pb.CompleteRequest(tools=message.tools, tool_choice=message.tool_choice)
    if message.HasField("parallel_tool_calls"):
        copy.parallel_tool_calls = message.parallel_tool_calls
    return b"\0tools" + copy.SerializeToString(deterministic=True)


def delta_to_proto(d: ToolCallDelta) -> pb.ToolCallDelta:
    return pb.ToolCallDelta(index=d.index, id=d.id, name=d.name, arguments=d.arguments)
