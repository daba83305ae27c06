"""A chat completion as a Responses API `Response` object: pure, no I/O.

Shared by the whole answer (`response_of_completion`) and the stream (proxy/bridge/responses_stream.py),
which builds the same object for `response.created` and `response.completed`.
"""

from __future__ import annotations

import secrets
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import orjson

from proxy.bridge.responses_request import CUSTOM_INPUT, BridgedRequest, ToolTable, as_dict
from proxy.usage import cached_tokens, reasoning_tokens

IdMaker = Callable[[str], str]


def random_id(prefix: str) -> str:
    """An id in OpenAI's style (`resp_...`, `msg_...`, `fc_...`)."""
    return f"{prefix}_{secrets.token_hex(24)}"


@dataclass(frozen=True)
class ResponseFrame:
    """What every Response object of one answer shares: its id, creation time, model and echoed request."""

    id: str
    created_at: int
    model: str
    echo: dict[str, Any]

    def response(self, status: str, output: list[dict[str, Any]], usage: dict[str, Any] | None = None,
                 incomplete_reason: str | None = None, error: dict[str, Any] | None = None) -> dict[str, Any]:
        return {"id": self.id, "object": "response", "created_at": self.created_at, "status": status,
                "background": False, "error": error,
                "incomplete_details": {"reason": incomplete_reason} if incomplete_reason else None,
                "model": self.model, "output": output, "previous_response_id": None, **self.echo,
                "usage": usage}


def frame_for(request: BridgedRequest, created_at: int, new_id: IdMaker = random_id) -> ResponseFrame:
    return ResponseFrame(new_id("resp"), created_at, request.model, request.echo)


def responses_usage(usage: dict[str, Any] | None) -> dict[str, Any] | None:
    """Chat usage (`prompt_tokens`...) in the Responses shape (`input_tokens`... with their details)."""
    if not isinstance(usage, dict):
        return None
    prompt = _count(usage.get("prompt_tokens"))
    completion = _count(usage.get("completion_tokens"))
    total = usage.get("total_tokens")
    # DeepSeek names its cache hits `prompt_cache_hit_tokens`; proxy/usage.py reads the other shapes.
    cached = cached_tokens(usage) or _count(usage.get("prompt_cache_hit_tokens"))
    return {"input_tokens": prompt, "input_tokens_details": {"cached_tokens": cached, "cache_write_tokens": 0},
            "output_tokens": completion, "output_tokens_details": {"reasoning_tokens": reasoning_tokens(usage)},
            "total_tokens": total if isinstance(total, int) else prompt + completion}


def _count(value: Any) -> int:
    return value if isinstance(value, int) and not isinstance(value, bool) else 0


def status_of(finish_reason: str | None) -> tuple[str, str | None]:
    """The Response status (and incomplete reason) for a chat finish reason."""
    if finish_reason == "length":
        return "incomplete", "max_output_tokens"
    if finish_reason == "content_filter":
        return "incomplete", "content_filter"
    return "completed", None


# --- output items (the stream builds the same ones) -------------------------------------------------------

def message_item(item_id: str, text: str, status: str = "completed") -> dict[str, Any]:
    return {"id": item_id, "type": "message", "status": status, "role": "assistant",
            "content": [output_text_part(text)] if status == "completed" or text else []}


def output_text_part(text: str) -> dict[str, Any]:
    return {"type": "output_text", "text": text, "annotations": [], "logprobs": []}


def reasoning_item(item_id: str, text: str, status: str = "completed") -> dict[str, Any]:
    """Raw reasoning (`reasoning_content`) is a reasoning item's `reasoning_text` content, not a summary."""
    item: dict[str, Any] = {"id": item_id, "type": "reasoning", "summary": [], "status": status}
    item["content"] = [{"type": "reasoning_text", "text": text}] if text else []
    return item


def tool_call_item(item_id: str, call_id: str, chat_name: str, arguments: str, tools: ToolTable,
                   status: str = "completed") -> dict[str, Any]:
    """A `function_call` item, or a `custom_tool_call` when the function stands for a custom tool."""
    tool = tools.lookup(chat_name)
    item: dict[str, Any]
    if tool.kind == "custom":
        item = {"id": item_id, "type": "custom_tool_call", "status": status, "call_id": call_id,
                "name": tool.name, "input": custom_input(arguments) if status == "completed" else ""}
    else:
        item = {"id": item_id, "type": "function_call", "status": status, "call_id": call_id,
                "name": tool.name, "arguments": arguments}
    if tool.namespace:
        item["namespace"] = tool.namespace
    return item


def custom_input(arguments: str) -> str:
    """A custom tool's free-form input from the arguments of the function it became (`{"input": "..."}`);
    arguments the model did not shape so are passed on whole rather than lost."""
    try:
        parsed = orjson.loads(arguments) if arguments else {}
    except orjson.JSONDecodeError:
        return arguments
    if isinstance(parsed, dict) and isinstance(parsed.get(CUSTOM_INPUT), str):
        return str(parsed[CUSTOM_INPUT])
    if isinstance(parsed, dict) and len(parsed) == 1 and isinstance(next(iter(parsed.values())), str):
        return str(next(iter(parsed.values())))
    return arguments


# --- the whole answer ------------------------------------------------------------------------------------

def response_of_completion(completion: dict[str, Any], request: BridgedRequest, frame: ResponseFrame,
                           new_id: IdMaker = random_id) -> dict[str, Any]:
    """The Response object for a non-streaming chat completion."""
    choices = completion.get("choices")
    choice = as_dict(choices[0]) if isinstance(choices, list) and choices else {}
    message = as_dict(choice.get("message"))
    output: list[dict[str, Any]] = []
    reasoning = message.get("reasoning_content") or message.get("reasoning")
    if isinstance(reasoning, str) and reasoning:
        output.append(reasoning_item(new_id("rs"), reasoning))
    content = message.get("content")
    if isinstance(content, str) and content:
        output.append(message_item(new_id("msg"), content))
    for call in message.get("tool_calls") or []:
        function = as_dict(as_dict(call).get("function"))
        if function:
            arguments = function.get("arguments")
            output.append(tool_call_item(new_id("fc"), call.get("id") or new_id("call"), str(function.get("name")),
                                         arguments if isinstance(arguments, str) else "{}", request.tools))
    status, reason = status_of(choice.get("finish_reason"))
    return frame.response(status, output, responses_usage(completion.get("usage")), reason)
