"""Tool calling: functions a model may call, offered in its prompt, enforced by a grammar and
parsed out of its output.

spec.py checks the tools, the choice and the history a call carries; prompt.py puts them into the
conversation (the model's own chat template when it takes `tools`, else the documented format
below); grammar.py turns the choice into a structured output (router.structured enforces it);
parser.py turns the streamed text back into calls.

The documented format (Hermes-style, which Qwen and many fine-tunes also write): the tools are
listed as JSON in a system message, and each call the model makes is one line

    <tool_call>{"name": "get_weather", "arguments": {"city": "Paris"}}</tool_call>

with several calls (parallel_tool_calls) one per line. Earlier calls in the history are rendered
the same way in their assistant turn; a tool's result is a user turn
`<tool_response>{"tool_call_id": ..., "name": ..., "content": ...}</tool_response>`.
"""
