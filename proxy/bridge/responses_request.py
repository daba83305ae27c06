"""A Responses API request (`POST /v1/responses`) as a chat completions request: pure, no I/O.

The rules, each one a small function below (tests/unit/test_bridge_responses_request.py is their table):

- `input`: a string is one user message. Message items (`input_text`, `output_text`, `refusal` and
  `input_image` parts) keep their role, except `developer`, which becomes `system` (chat-only servers rarely
  know `developer`); `instructions` and the leading system/developer messages become ONE system message, since
  several chat templates (vLLM, Ollama) accept a system message only at the start. `function_call` and
  `custom_tool_call` items become an assistant message's `tool_calls` (consecutive calls, and the assistant
  text just before them, share one message); `function_call_output` and `custom_tool_call_output` become
  `tool` messages. A reasoning item's text (its `reasoning_text` content, else its summary) becomes the
  `reasoning_content` of the assistant message that follows it: DeepSeek's thinking mode refuses a
  conversation whose tool-calling turns lost it (400), Kimi's reads it, and servers that do not reason
  never produced reasoning to send back. A reasoning item followed by no assistant output, an encrypted-only
  one, and the items of built-in tools that were never sent upstream (`web_search_call`...) are dropped.
  `additional_tools` items add tools.
- `tools`: function tools as chat function tools; custom (free-form) tools such as Codex's `apply_patch` as a
  function taking one string, `{"input": "..."}`, turned back into a `custom_tool_call` on the way out;
  namespaced tools as functions named `<namespace>__<name>`. Built-in tools the upstream cannot run
  (`web_search`, `file_search`, `code_interpreter`, `image_generation`, `local_shell`, `mcp`...) are left
  out and named in `dropped_tools` (the access log shows them); a `tool_choice` forcing one is a 400.
- `max_output_tokens` -> `max_tokens` (what every chat-only server reads; `max_completion_tokens` is
  OpenAI's newer name, and OpenAI upstreams are served natively, never bridged).
- `reasoning.effort` -> `reasoning_effort` (OpenAI-compatible servers that reason read it; the others
  ignore it); `reasoning.summary` has no chat equivalent and is ignored.
- `text.format` `json_schema`/`json_object` -> `response_format`; `text.verbosity` is ignored.
- `temperature`, `top_p`, `parallel_tool_calls`, `stream` as they are (streams ask for the usage chunk).
- `store`, `include`, `prompt_cache_key`, `metadata`, `client_metadata`, `user`, `safety_identifier`,
  `service_tier`, `truncation`, `max_tool_calls`, `top_logprobs`, `prompt_cache_retention` are dropped: they
  are about OpenAI's own storage, caching and accounting. The Response object echoes `metadata` and `store`.
- `previous_response_id` and `conversation` (server-side conversation state), `background` and `prompt`
  (stored prompt templates) are refused with a 400: the bridge keeps no state, so clients send the whole
  input every time (Codex does: it sends `store: false`).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any, Literal

import orjson

from proxy.errors import BadRequest

NAMESPACE_SEPARATOR = "__"
# The one argument of the function a custom (free-form) tool becomes.
CUSTOM_INPUT = "input"
# Item types a chat upstream cannot read and the answer does not need: dropped from the history.
DROPPED_ITEMS = frozenset({"web_search_call", "file_search_call", "image_generation_call",
                           "code_interpreter_call", "computer_call", "computer_call_output", "local_shell_call",
                           "local_shell_call_output", "shell_call", "shell_call_output", "apply_patch_call",
                           "apply_patch_call_output", "mcp_list_tools", "mcp_approval_request",
                           "mcp_approval_response", "mcp_call", "compaction", "tool_search_call",
                           "tool_search_output"})
REFUSED_FIELDS = {
    "previous_response_id": "this relay serves this model through a chat completions upstream and keeps no "
                            "responses: send the whole conversation in 'input' instead of 'previous_response_id'",
    "conversation": "this relay serves this model through a chat completions upstream and keeps no "
                    "conversations: send the whole conversation in 'input' instead of 'conversation'",
    "prompt": "stored prompt templates ('prompt') are not available for this model on this relay",
}
TEXT_PARTS = frozenset({"input_text", "output_text", "text", "summary_text", "reasoning_text"})


@dataclass(frozen=True)
class ToolName:
    """What a chat function name stands for on the Responses side."""

    kind: Literal["function", "custom"]
    name: str
    namespace: str | None = None


@dataclass
class ToolTable:
    """The chat function names of one request's tools, so that a tool call maps back to its own kind."""

    names: dict[str, ToolName] = field(default_factory=dict)

    def add(self, kind: Literal["function", "custom"], name: str, namespace: str | None = None) -> str:
        chat_name = chat_tool_name(name, namespace)
        self.names.setdefault(chat_name, ToolName(kind, name, namespace))
        return chat_name

    def lookup(self, chat_name: str) -> ToolName:
        """The tool a chat function name stands for; an unknown name (a model inventing one) is a function."""
        return self.names.get(chat_name) or ToolName("function", chat_name)


def chat_tool_name(name: str, namespace: str | None) -> str:
    return f"{namespace}{NAMESPACE_SEPARATOR}{name}" if namespace else name


@dataclass(frozen=True)
class BridgedRequest:
    """A Responses request translated: the chat body, what the Response object echoes, the tool names."""

    model: str
    stream: bool
    chat: dict[str, Any]
    echo: dict[str, Any]
    tools: ToolTable
    dropped_tools: tuple[str, ...]


def map_request(body: dict[str, Any]) -> BridgedRequest:
    """The chat completions request for a Responses request; BadRequest for what cannot be bridged."""
    refuse_stateful(body)
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise BadRequest("'model' must be a non-empty string")
    table = ToolTable()
    tools, dropped = map_tools([*_list(body.get("tools"), "tools"), *_additional_tools(body.get("input"))], table)
    chat: dict[str, Any] = {"model": model,
                            "messages": map_input(body.get("input"), body.get("instructions"), table)}
    stream = body.get("stream") is True
    if stream:
        chat["stream"] = True
        chat["stream_options"] = {"include_usage": True}
    if tools:
        chat["tools"] = tools
        choice = map_tool_choice(body.get("tool_choice"), table)
        if choice is not None:
            chat["tool_choice"] = choice
        if isinstance(body.get("parallel_tool_calls"), bool):
            chat["parallel_tool_calls"] = body["parallel_tool_calls"]
    else:
        map_tool_choice(body.get("tool_choice"), table)  # still refuses forcing a dropped tool
    chat.update(map_options(body))
    return BridgedRequest(model, stream, chat, echo_fields(body), table, tuple(dropped))


def refuse_stateful(body: dict[str, Any]) -> None:
    """Server-side state the bridge does not keep is refused, not silently ignored."""
    for name, message in REFUSED_FIELDS.items():
        if body.get(name) not in (None, ""):
            raise BadRequest(message, kind="bridge_untranslatable")
    if body.get("background") is True:
        raise BadRequest("background responses are not available for this model on this relay",
                         kind="bridge_untranslatable")


def map_options(body: dict[str, Any]) -> dict[str, Any]:
    """Sampling, length, reasoning and output-format options."""
    out: dict[str, Any] = {name: body[name] for name in ("temperature", "top_p") if body.get(name) is not None}
    if body.get("max_output_tokens") is not None:
        out["max_tokens"] = body["max_output_tokens"]
    reasoning = body.get("reasoning")
    if isinstance(reasoning, dict) and isinstance(reasoning.get("effort"), str):
        out["reasoning_effort"] = reasoning["effort"]
    text = body.get("text")
    response_format = map_text_format(text.get("format")) if isinstance(text, dict) else None
    if response_format is not None:
        out["response_format"] = response_format
    return out


def map_text_format(format_: Any) -> dict[str, Any] | None:
    """`text.format` as chat's `response_format` (None for plain text)."""
    if not isinstance(format_, dict) or format_.get("type") in (None, "text"):
        return None
    if format_["type"] == "json_object":
        return {"type": "json_object"}
    if format_["type"] == "json_schema":
        schema = {name: format_[name] for name in ("name", "schema", "description", "strict")
                  if format_.get(name) is not None}
        return {"type": "json_schema", "json_schema": schema}
    raise BadRequest(f"'text.format' of type '{shown(format_['type'])}' is not available for this model on this relay",
                     kind="bridge_untranslatable")


def echo_fields(body: dict[str, Any]) -> dict[str, Any]:
    """The request's fields a Response object repeats, with OpenAI's defaults."""
    return {
        "instructions": body.get("instructions"),
        "max_output_tokens": body.get("max_output_tokens"),
        "metadata": body.get("metadata") or {},
        "parallel_tool_calls": body.get("parallel_tool_calls", True),
        "reasoning": body.get("reasoning") if isinstance(body.get("reasoning"), dict) else None,
        "store": body.get("store", True),
        "temperature": body.get("temperature"),
        "text": body.get("text") if isinstance(body.get("text"), dict) else {"format": {"type": "text"}},
        "tool_choice": body.get("tool_choice", "auto"),
        "tools": body.get("tools") or [],
        "top_p": body.get("top_p"),
        "truncation": body.get("truncation") or "disabled",
        "user": body.get("user"),
    }


# --- tools -----------------------------------------------------------------------------------------------

def map_tools(tools: Iterable[Any], table: ToolTable) -> tuple[list[dict[str, Any]], list[str]]:
    """Chat function tools for the Responses tools, and the built-in tools left out (by type)."""
    chat_tools: list[dict[str, Any]] = []
    dropped: list[str] = []
    for tool in tools:
        if not isinstance(tool, dict):
            raise BadRequest("each entry of 'tools' must be an object")
        kind = tool.get("type")
        if kind == "namespace":
            namespace = _name(tool, "tools")
            for inner in _list(tool.get("tools"), "tools[].tools"):
                if isinstance(inner, dict) and inner.get("type") in ("function", "custom"):
                    chat_tools.append(_chat_tool(inner, table, namespace))
                else:
                    dropped.append(shown(f"{namespace}.{inner.get('type') if isinstance(inner, dict) else '?'}"))
        elif kind in ("function", "custom"):
            chat_tools.append(_chat_tool(tool, table, None))
        else:
            dropped.append(shown(kind))
    return chat_tools, dropped


def _chat_tool(tool: dict[str, Any], table: ToolTable, namespace: str | None) -> dict[str, Any]:
    name = _name(tool, "tools")
    function: dict[str, Any] = {"name": table.add(tool["type"], name, namespace)}
    description = tool.get("description")
    if tool["type"] == "custom":
        function["description"] = _custom_description(description, tool.get("format"))
        function["parameters"] = {"type": "object", "properties": {CUSTOM_INPUT: {"type": "string"}},
                                  "required": [CUSTOM_INPUT], "additionalProperties": False}
        return {"type": "function", "function": function}
    if isinstance(description, str) and description:
        function["description"] = description
    parameters = tool.get("parameters")
    function["parameters"] = parameters if isinstance(parameters, dict) else {"type": "object", "properties": {}}
    if tool.get("strict") is True:
        function["strict"] = True
    return {"type": "function", "function": function}


def _custom_description(description: Any, format_: Any) -> str:
    """A free-form tool's description, telling the model to put its whole input in the one argument (and,
    for a grammar-constrained tool, which grammar that input follows)."""
    text = str(description) if isinstance(description, str) else ""
    text += f"\n\nPut the tool's whole free-form input, as plain text, in the '{CUSTOM_INPUT}' argument."
    if isinstance(format_, dict) and format_.get("type") == "grammar" and isinstance(format_.get("definition"), str):
        text += f"\nThe input must follow this {format_.get('syntax', '')} grammar:\n{format_['definition']}"
    return text.strip()


def map_tool_choice(choice: Any, table: ToolTable) -> Any:
    """Chat's `tool_choice` for the Responses one (None: leave it out); forcing a dropped tool is a 400."""
    if choice is None or choice in ("auto", "none", "required"):
        return choice
    if not isinstance(choice, dict):
        raise BadRequest("'tool_choice' must be 'auto', 'none', 'required' or an object")
    kind = choice.get("type")
    if kind in ("function", "custom"):
        name = _name(choice, "tool_choice")
        chat_name = chat_tool_name(name, choice.get("namespace"))
        if chat_name not in table.names:
            raise BadRequest(f"'tool_choice' names the tool '{shown(name)}', which is not in 'tools'")
        return {"type": "function", "function": {"name": chat_name}}
    if kind == "allowed_tools":
        return "required" if choice.get("mode") == "required" else "auto"
    named = choice.get("name") if kind == "mcp" else None
    raise BadRequest(f"'tool_choice' forces the built-in tool '{shown(named or kind)}', which this relay cannot "
                     "run for this model (its upstream speaks chat completions); offer it without forcing it",
                     kind="bridge_untranslatable")


def _additional_tools(input_: Any) -> list[Any]:
    """Tools Codex announces inside `input` (`additional_tools` items)."""
    if not isinstance(input_, list):
        return []
    return [tool for item in input_ if isinstance(item, dict) and item.get("type") == "additional_tools"
            for tool in _list(item.get("tools"), "input[].tools")]


# --- input -----------------------------------------------------------------------------------------------

def map_input(input_: Any, instructions: Any, table: ToolTable) -> list[dict[str, Any]]:
    """The chat messages for `instructions` and `input`, the leading system text merged into one message."""
    messages = Messages()
    if isinstance(instructions, str) and instructions:
        messages.system(instructions)
    elif instructions is not None and not isinstance(instructions, str):
        raise BadRequest("'instructions' must be a string")
    if isinstance(input_, str):
        messages.add({"role": "user", "content": input_})
    elif isinstance(input_, list):
        for item in input_:
            map_item(item, messages, table)
    else:
        raise BadRequest("'input' must be a string or an array of items")
    if not messages.items:
        raise BadRequest("'input' holds no message a chat model can read")
    return messages.items


class Messages:
    """Chat messages being built: leading system text merged; tool calls joined to the assistant turn."""

    def __init__(self) -> None:
        self.items: list[dict[str, Any]] = []
        self.reasoning: str | None = None  # a reasoning item's text, for the assistant message it led to

    def system(self, text: str) -> None:
        if self.items and self.items[-1]["role"] == "system" and len(self.items) == 1:
            self.items[0]["content"] += "\n\n" + text
        else:
            self.items.append({"role": "system", "content": text})

    def add(self, message: dict[str, Any]) -> None:
        if message["role"] == "assistant" and self.reasoning:
            message["reasoning_content"] = self.reasoning
        self.reasoning = None  # reasoning followed by no answer of the model's has nothing to go with
        self.items.append(message)

    def tool_call(self, call: dict[str, Any]) -> None:
        last = self.items[-1] if self.items else None
        if last is not None and last["role"] == "assistant":
            last.setdefault("tool_calls", []).append(call)
            if self.reasoning and "reasoning_content" not in last:
                last["reasoning_content"] = self.reasoning
            self.reasoning = None
        else:
            self.add({"role": "assistant", "content": None, "tool_calls": [call]})

    def reasoned(self, text: str | None) -> None:
        if text:
            self.reasoning = f"{self.reasoning}\n\n{text}" if self.reasoning else text


def map_item(item: Any, messages: Messages, table: ToolTable) -> None:
    """One input item onto the chat messages."""
    if not isinstance(item, dict):
        raise BadRequest("each item of 'input' must be an object")
    kind = item.get("type", "message")
    if kind == "message":
        _message_item(item, messages)
    elif kind in ("function_call", "custom_tool_call"):
        messages.tool_call(_tool_call(item, table))
    elif kind == "reasoning":
        messages.reasoned(reasoning_text(item))
    elif kind in ("function_call_output", "custom_tool_call_output"):
        messages.add({"role": "tool", "tool_call_id": _call_id(item), "content": tool_output_text(item.get("output"))})
    elif kind == "item_reference":
        raise BadRequest("'item_reference' items need stored responses, which this relay does not keep for this "
                         "model: send the items themselves", kind="bridge_untranslatable")
    elif kind not in DROPPED_ITEMS and kind != "additional_tools":
        raise BadRequest(f"input items of type '{shown(kind)}' are not available for this model on this relay",
                         kind="bridge_untranslatable")


def _message_item(item: dict[str, Any], messages: Messages) -> None:
    role = item.get("role")
    if role not in ("user", "assistant", "system", "developer"):
        raise BadRequest("a message item's 'role' must be 'user', 'assistant', 'system' or 'developer'")
    content = message_content(item.get("content"), role)
    if role in ("system", "developer"):
        text = content if isinstance(content, str) else orjson.dumps(content).decode()
        if all(message["role"] == "system" for message in messages.items):
            messages.system(text)
        else:
            messages.add({"role": "system", "content": text})
        return
    messages.add({"role": role, "content": content})


def message_content(content: Any, role: str) -> str | list[dict[str, Any]]:
    """A message's content: plain text when it is only text (what every chat server reads), else parts."""
    if isinstance(content, str):
        return content
    if not isinstance(content, list):
        raise BadRequest("a message item's 'content' must be a string or an array of parts")
    parts = [_content_part(part) for part in content]
    if all(part["type"] == "text" for part in parts) or role == "assistant":
        return "\n\n".join(part["text"] for part in parts if part["type"] == "text")
    return parts


def _content_part(part: Any) -> dict[str, Any]:
    if not isinstance(part, dict):
        raise BadRequest("each content part must be an object")
    kind = part.get("type")
    if kind in TEXT_PARTS:
        return {"type": "text", "text": _string(part.get("text"), "text")}
    if kind == "refusal":
        return {"type": "text", "text": _string(part.get("refusal"), "refusal")}
    if kind == "input_image":
        url = part.get("image_url")
        if not isinstance(url, str) or not url:
            raise BadRequest("an 'input_image' part needs an 'image_url' (uploaded files are not available "
                             "for this model on this relay)", kind="bridge_untranslatable")
        image: dict[str, Any] = {"url": url}
        if part.get("detail") in ("low", "high", "auto"):
            image["detail"] = part["detail"]
        return {"type": "image_url", "image_url": image}
    raise BadRequest(f"content parts of type '{shown(kind)}' are not available for this model on this relay",
                     kind="bridge_untranslatable")


def _tool_call(item: dict[str, Any], table: ToolTable) -> dict[str, Any]:
    name = _name(item, "input")
    namespace = item.get("namespace") if isinstance(item.get("namespace"), str) else None
    if item["type"] == "custom_tool_call":
        arguments = orjson.dumps({CUSTOM_INPUT: _string(item.get("input"), "input")}).decode()
    else:
        arguments = str(item["arguments"]) if isinstance(item.get("arguments"), str) else "{}"
    return {"id": _call_id(item), "type": "function",
            "function": {"name": chat_tool_name(name, namespace), "arguments": arguments}}


def reasoning_text(item: dict[str, Any]) -> str | None:
    """A reasoning item's readable text: its raw reasoning, else its summary (None for an encrypted-only
    item, which only OpenAI can read)."""
    for field_name in ("content", "summary"):
        parts = item.get(field_name)
        texts = [part["text"] for part in parts if isinstance(part, dict) and isinstance(part.get("text"), str)
                 and part["text"]] if isinstance(parts, list) else []
        if texts:
            return "\n\n".join(texts)
    return None


def tool_output_text(output: Any) -> str:
    """A tool's output as the text of a `tool` message (chat servers read only text there)."""
    if isinstance(output, str):
        return output
    if isinstance(output, list):
        texts = []
        for part in output:
            if isinstance(part, dict) and isinstance(part.get("text"), str):
                texts.append(part["text"])
            elif isinstance(part, dict):
                texts.append(f"[{shown(part.get('type', 'part'))} omitted: this model's upstream reads only text here]")
        return "\n\n".join(texts)
    if output is None:
        return ""
    return orjson.dumps(output).decode()


def _call_id(item: dict[str, Any]) -> str:
    call_id = item.get("call_id")
    if not isinstance(call_id, str) or not call_id:
        raise BadRequest(f"a '{shown(item.get('type'))}' item needs a 'call_id'")
    return call_id


def _name(obj: dict[str, Any], where: str) -> str:
    name = obj.get("name")
    if not isinstance(name, str) or not name:
        raise BadRequest(f"every tool in '{where}' needs a 'name'")
    return name


SHOWN_CHARACTERS = 60  # a client's value is echoed (in an error, the access log) only this far


def shown(value: Any) -> str:
    """A client-supplied name as echoed in a message or the log: a string, cut short."""
    text = str(value)
    return text if len(text) <= SHOWN_CHARACTERS else text[:SHOWN_CHARACTERS] + "..."


def as_dict(value: Any) -> dict[str, Any]:
    """`value` when it is an object, else an empty one (for optional nested fields)."""
    return value if isinstance(value, dict) else {}


def _string(value: Any, name: str) -> str:
    if not isinstance(value, str):
        raise BadRequest(f"'{name}' must be a string")
    return value


def _list(value: Any, name: str) -> list[Any]:
    if value is None:
        return []
    if not isinstance(value, list):
        raise BadRequest(f"'{name}' must be an array")
    return value
