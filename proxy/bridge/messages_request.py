"""Anthropic Messages request -> chat completions request: pure functions, no I/O.

The rules, each one a small function below (tests/unit/test_bridge_messages_request.py is their table):

- `system` (a string or text blocks) becomes the first `system` message; a `system` role message inside
  `messages` (Claude Code sends its environment that way) stays a `system` message where it stands.
- Text-only content becomes one string (blocks joined by a blank line), which every chat server reads;
  content with images becomes content parts (`text` and `image_url`; base64 sources as `data:` URLs).
- An assistant's `tool_use` blocks become its `tool_calls` (input JSON-encoded as `arguments`); a user's
  `tool_result` blocks become `tool` messages, placed before the rest of that user message as chat
  requires. A result's text blocks are joined; `is_error` prefixes it with "Error: " (chat has no such
  flag); its images follow in a user message, since chat's tool messages carry text only; a
  `tool_reference` (Claude Code's tool search) becomes a line naming the tool.
- Dropped because nothing upstream can use them and nothing is lost for the answer: `cache_control`
  markers, `thinking`/`redacted_thinking` blocks of earlier turns (their signatures mean nothing to
  another model), `metadata`, `top_k`, `context_management`, `output_config.effort`, `service_tier`,
  `container`, `mcp_servers`, and `thinking` itself: whether the upstream model reasons is chosen by which
  model the relay maps the name to (`model_map`, e.g. to `deepseek-reasoner`), as chat has no common switch.
- Any other content block type (a PDF `document`, a `search_result`...) is refused with a 400 naming it:
  silently losing part of what the user sent would give answers about something else.
- `tools` with `input_schema` become function tools; a tool with another `type` (Anthropic's server tools,
  which only Anthropic runs: `web_search_...`, `code_execution_...`) is left out and named in
  `ChatRequest.dropped_tools`, and a `tool_choice` forcing one is refused. `tool_choice` auto/any/tool/none
  become auto/required/{function}/none; `disable_parallel_tool_use` becomes `parallel_tool_calls: false`.
- `max_tokens`, `stop_sequences` (as `stop`), `temperature`, `top_p` carry over; `output_config.format`
  (a JSON schema) becomes `response_format`; `stream` asks for the usage chunk too.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import orjson


class MessagesRefused(ValueError):
    """The request cannot be translated faithfully; the message says what to change (a 400)."""


@dataclass
class ChatRequest:
    """The chat completions body, and what was left out of it (for the access log)."""

    body: dict[str, Any]
    dropped_tools: list[str] = field(default_factory=list)  # Anthropic server tools left out, by name


SAFE_TO_DROP_BLOCKS = frozenset({"thinking", "redacted_thinking"})
CARRIED_OPTIONS = (("max_tokens", "max_tokens"), ("temperature", "temperature"), ("top_p", "top_p"))


def to_chat_request(body: dict[str, Any], model: str) -> ChatRequest:
    """The chat completions request for a Messages request `body`, asking for `model` (the client's name:
    each upstream's `model_map` renames it as the request leaves)."""
    messages = system_messages(body.get("system"))
    for message in _list(body.get("messages"), "messages"):
        messages.extend(chat_messages(message))
    chat: dict[str, Any] = {"model": model, "messages": messages}
    for theirs, ours in CARRIED_OPTIONS:
        if body.get(theirs) is not None:
            chat[ours] = body[theirs]
    stop = body.get("stop_sequences")
    if stop:
        chat["stop"] = list(_list(stop, "stop_sequences"))
    request = ChatRequest(chat)
    tools = chat_tools(body.get("tools"), request.dropped_tools)
    if tools:
        chat["tools"] = tools
    choice = body.get("tool_choice")
    if choice is not None:
        chat.update(chat_tool_choice(choice, request.dropped_tools, bool(tools)))
    response_format = chat_response_format(body.get("output_config"))
    if response_format is not None:
        chat["response_format"] = response_format
    if body.get("stream") is True:
        chat["stream"] = True
        chat["stream_options"] = {"include_usage": True}
    return request


def system_messages(system: Any) -> list[dict[str, Any]]:
    """The top-level `system` (a string or text blocks) as chat's leading system message, if any."""
    if system is None or system == "" or system == []:
        return []
    text = system if isinstance(system, str) else block_text(_list(system, "system"), "system")
    return [{"role": "system", "content": text}]


# The roles a Messages message may have here: Anthropic's two, and `system` (Claude Code sends its
# environment that way). openapi.yaml's AnthropicMessage states the same list (proxy/shaping.py's schemas).
MESSAGE_ROLES = ("user", "assistant", "system")


def chat_messages(message: Any) -> list[dict[str, Any]]:
    """One Messages message as one or more chat messages."""
    if not isinstance(message, dict):
        raise MessagesRefused("each item of 'messages' must be an object with a 'role' and 'content'")
    role, content = message.get("role"), message.get("content")
    if role not in MESSAGE_ROLES:
        raise MessagesRefused(f"a message's role must be 'user' or 'assistant' (or 'system'), not {role!r}")
    if isinstance(content, str):
        return [{"role": role, "content": content}]
    blocks = list(_list(content, f"the content of a '{role}' message"))
    if role == "assistant":
        return [assistant_message(blocks)]
    if role == "user":
        return user_messages(blocks)
    return [{"role": "system", "content": block_text(blocks, "a system message")}]


def assistant_message(blocks: list[Any]) -> dict[str, Any]:
    """An assistant turn: its text, and its `tool_use` blocks as `tool_calls`."""
    texts: list[str] = []
    calls: list[dict[str, Any]] = []
    for block in blocks:
        kind = _block_type(block)
        if kind == "text":
            texts.append(_text(block))
        elif kind == "tool_use":
            arguments = orjson.dumps(block.get("input") or {}).decode()
            calls.append({"id": block.get("id"), "type": "function",
                          "function": {"name": block.get("name"), "arguments": arguments}})
        elif kind not in SAFE_TO_DROP_BLOCKS:
            raise _unsupported(kind, "an assistant message")
    message: dict[str, Any] = {"role": "assistant", "content": "\n\n".join(texts) if texts else None}
    if calls:
        message["tool_calls"] = calls
    elif message["content"] is None:
        message["content"] = ""  # a turn of thinking only: chat wants some content
    return message


def user_messages(blocks: list[Any]) -> list[dict[str, Any]]:
    """A user turn: `tool` messages for its tool results first (chat wants them right after the assistant's
    tool calls), then its own content, then any images the tool results held."""
    tools: list[dict[str, Any]] = []
    parts: list[dict[str, Any]] = []
    result_images: list[dict[str, Any]] = []
    for block in blocks:
        kind = _block_type(block)
        if kind == "tool_result":
            text, images = tool_result_content(block)
            tools.append({"role": "tool", "tool_call_id": block.get("tool_use_id"), "content": text})
            result_images.extend(images)
        elif kind in SAFE_TO_DROP_BLOCKS:
            continue
        else:
            parts.append(content_part(block, "a user message"))
    messages = tools
    if parts:
        messages.append({"role": "user", "content": parts_content(parts)})
    if result_images:
        note = {"type": "text", "text": "(the images the tool results above returned)"}
        messages.append({"role": "user", "content": [note, *result_images]})
    return messages


def tool_result_content(block: dict[str, Any]) -> tuple[str, list[dict[str, Any]]]:
    """A tool result's text (with "Error: " before a failed tool's) and the image parts it held."""
    content = block.get("content")
    texts: list[str] = []
    images: list[dict[str, Any]] = []
    if isinstance(content, str):
        texts.append(content)
    elif content is not None:
        for item in _list(content, "a tool_result's content"):
            kind = _block_type(item)
            if kind == "tool_reference":
                texts.append(f"(tool {item.get('tool_name')} is now available)")
                continue
            part = content_part(item, "a tool_result")
            if part["type"] == "text":
                texts.append(part["text"])
            else:
                images.append(part)
    text = "\n\n".join(texts)
    if block.get("is_error") is True:
        text = f"Error: {text}"
    return text, images


def content_part(block: Any, where: str) -> dict[str, Any]:
    """A text or image block as a chat content part; other blocks are refused, naming their type."""
    kind = _block_type(block)
    if kind == "text":
        return {"type": "text", "text": _text(block)}
    if kind == "image":
        return {"type": "image_url", "image_url": {"url": image_url(block.get("source"))}}
    if kind == "document":
        source = block.get("source")
        if isinstance(source, dict) and source.get("type") == "text":
            return {"type": "text", "text": str(source.get("data", ""))}
    raise _unsupported(kind, where)


def image_url(source: Any) -> str:
    """An image source as the URL chat's `image_url` takes: a base64 source as a `data:` URL."""
    if isinstance(source, dict) and source.get("type") == "base64":
        return f"data:{source.get('media_type')};base64,{source.get('data')}"
    if isinstance(source, dict) and source.get("type") == "url" and isinstance(source.get("url"), str):
        return str(source["url"])
    kind = source.get("type") if isinstance(source, dict) else None
    raise MessagesRefused(f"image sources of type {kind!r} cannot be sent to this model's upstream "
                          "(it speaks chat completions): send the image as base64 or a URL")


def parts_content(parts: list[dict[str, Any]]) -> str | list[dict[str, Any]]:
    """Text parts only: one string (what every chat server reads); with images: the parts."""
    if all(part["type"] == "text" for part in parts):
        return "\n\n".join(part["text"] for part in parts)
    return parts


def block_text(blocks: Iterable[Any], where: str) -> str:
    """Text blocks joined by a blank line (the system prompt's blocks); any other block is refused."""
    texts = []
    for block in blocks:
        part = content_part(block, where)
        if part["type"] != "text":
            raise _unsupported(_block_type(block), where)
        texts.append(part["text"])
    return "\n\n".join(texts)


def chat_tools(tools: Any, dropped: list[str]) -> list[dict[str, Any]]:
    """Client tools (those with an `input_schema`) as function tools; server tools left out, their names
    added to `dropped`."""
    out = []
    for tool in _list(tools or [], "tools"):
        if not isinstance(tool, dict):
            raise MessagesRefused("each tool must be an object")
        if tool.get("type") not in (None, "custom") or "input_schema" not in tool:
            dropped.append(str(tool.get("name") or tool.get("type")))
            continue
        function: dict[str, Any] = {"name": tool.get("name"), "parameters": tool["input_schema"]}
        if tool.get("description"):
            function["description"] = tool["description"]
        out.append({"type": "function", "function": function})
    return out


def chat_tool_choice(choice: Any, dropped: list[str], has_tools: bool) -> dict[str, Any]:
    """`tool_choice` as chat's `tool_choice` (and `parallel_tool_calls`), given the tools that went up."""
    if not isinstance(choice, dict):
        raise MessagesRefused("'tool_choice' must be an object such as {\"type\": \"auto\"}")
    kind = choice.get("type")
    if kind == "tool" and choice.get("name") in dropped:
        raise MessagesRefused(f"tool_choice forces the tool {choice.get('name')!r}, which only Anthropic's own "
                              "servers can run; this model's upstream speaks chat completions")
    if not has_tools:
        return {}  # chat refuses a tool_choice without tools
    mapped: dict[str, Any] = {}
    if kind == "auto":
        mapped["tool_choice"] = "auto"
    elif kind == "any":
        mapped["tool_choice"] = "required"
    elif kind == "none":
        mapped["tool_choice"] = "none"
    elif kind == "tool":
        mapped["tool_choice"] = {"type": "function", "function": {"name": choice.get("name")}}
    else:
        raise MessagesRefused(f"unknown tool_choice type {kind!r}: use auto, any, tool or none")
    if choice.get("disable_parallel_tool_use") is True:
        mapped["parallel_tool_calls"] = False
    return mapped


def chat_response_format(output_config: Any) -> dict[str, Any] | None:
    """`output_config.format` (a JSON schema) as chat's `response_format`; `effort` is dropped."""
    if not isinstance(output_config, dict):
        return None
    output_format = output_config.get("format")
    if not isinstance(output_format, dict) or output_format.get("type") != "json_schema":
        return None
    return {"type": "json_schema",
            "json_schema": {"name": "output", "schema": output_format.get("schema") or {}, "strict": True}}


def estimate_input_tokens(body: dict[str, Any]) -> int:
    """An ESTIMATE of a request's input tokens (about four characters a token, over the system prompt,
    messages and tools as JSON), for `count_tokens` and `message_start` where the upstream cannot count."""
    counted = orjson.dumps([body.get("system"), body.get("messages"), body.get("tools")])
    return max(1, len(counted) // 4)


def _list(value: Any, what: str) -> list[Any]:
    if not isinstance(value, list):
        raise MessagesRefused(f"{what} must be a list")
    return value


def _text(block: dict[str, Any]) -> str:
    text = block.get("text")
    if not isinstance(text, str):
        raise MessagesRefused("a text block's 'text' must be a string")
    return text


def _block_type(block: Any) -> str:
    if not isinstance(block, dict) or not isinstance(block.get("type"), str):
        raise MessagesRefused("each content block must be an object with a 'type'")
    return str(block["type"])


def _unsupported(kind: str, where: str) -> MessagesRefused:
    return MessagesRefused(f"content blocks of type '{kind}' in {where} cannot be sent to this model's "
                           "upstream, which speaks chat completions; leave them out or use another model")
