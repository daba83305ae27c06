"""A chat completion -> an Anthropic message (the non-streaming answer): pure functions, no I/O.

- `reasoning_content` (or `reasoning`) becomes a `thinking` block first, with an empty signature (the relay
  cannot sign; Anthropic's SDKs only carry the field); the text a `text` block; each tool call a `tool_use`
  block whose `input` is the parsed arguments (arguments that are not a JSON object become `{}`: the tool
  then reports the missing input, as it would for a model's malformed call).
- `stop_reason`: `tool_calls` (or tool calls present whatever the reason) -> `tool_use`, `length` ->
  `max_tokens`, `content_filter` -> `refusal`, `stop` -> `end_turn`, or `stop_sequence` with the sequence
  when the upstream names the one it matched (vLLM's `stop_reason`); OpenAI does not, so a stop
  sequence there reads as `end_turn`.
- `usage`: `input_tokens` is the prompt minus its cached part, which is `cache_read_input_tokens`
  (OpenAI's `prompt_tokens_details.cached_tokens`, DeepSeek's `prompt_cache_hit_tokens`), as Anthropic
  counts them; `output_tokens` is `completion_tokens`.
"""

from __future__ import annotations

import secrets
from collections.abc import Sequence
from typing import Any

import orjson

STOP_REASONS = {"stop": "end_turn", "tool_calls": "tool_use", "function_call": "tool_use",
                "length": "max_tokens", "content_filter": "refusal"}


def message_id() -> str:
    return f"msg_{secrets.token_hex(12)}"


def tool_use_id(upstream_id: Any) -> str:
    """The upstream's tool call id as it is (the client sends it back in its tool_result, which goes
    upstream as `tool_call_id`), or a new one when the upstream gave none."""
    return upstream_id if isinstance(upstream_id, str) and upstream_id else f"toolu_{secrets.token_hex(12)}"


def stop_reason(finish_reason: str | None, had_tool_calls: bool, matched: Any,
                stop_sequences: Sequence[str]) -> tuple[str, str | None]:
    """Anthropic's `stop_reason` and `stop_sequence` for a chat finish reason."""
    if had_tool_calls:
        return "tool_use", None
    if finish_reason == "stop" and isinstance(matched, str) and matched in stop_sequences:
        return "stop_sequence", matched
    return STOP_REASONS.get(finish_reason or "stop", "end_turn"), None


def anthropic_usage(usage: Any) -> dict[str, int] | None:
    """Chat usage in Anthropic's terms; None when the upstream reported none."""
    if not isinstance(usage, dict):
        return None
    prompt = _int(usage.get("prompt_tokens"))
    details = usage.get("prompt_tokens_details")
    cached = _int(details.get("cached_tokens")) if isinstance(details, dict) else 0
    cached = cached or _int(usage.get("prompt_cache_hit_tokens"))
    cached = min(cached, prompt)
    return {"input_tokens": prompt - cached, "output_tokens": _int(usage.get("completion_tokens")),
            "cache_creation_input_tokens": 0, "cache_read_input_tokens": cached}


def tool_input(arguments: Any) -> dict[str, Any]:
    """A tool call's JSON arguments as the object Anthropic's `input` is; `{}` when they are not one."""
    if isinstance(arguments, dict):
        return arguments
    try:
        parsed = orjson.loads(arguments) if isinstance(arguments, str | bytes) and arguments else {}
    except orjson.JSONDecodeError:
        return {}
    return parsed if isinstance(parsed, dict) else {}


def to_anthropic_message(completion: dict[str, Any], model: str, stop_sequences: Sequence[str] = ()
                         ) -> dict[str, Any]:
    """The Anthropic message for a whole chat completion, under the client's model name."""
    choices = completion.get("choices")
    choice = as_dict(choices[0]) if isinstance(choices, list) and choices else {}
    answer = as_dict(choice.get("message"))
    content: list[dict[str, Any]] = []
    reasoning = answer.get("reasoning_content") or answer.get("reasoning")
    if isinstance(reasoning, str) and reasoning:
        content.append({"type": "thinking", "thinking": reasoning, "signature": ""})
    text = answer.get("content")
    if isinstance(text, str) and text:
        content.append({"type": "text", "text": text})
    calls = [as_dict(call) for call in answer.get("tool_calls") or () if isinstance(call, dict)]
    for call in calls:
        function = as_dict(call.get("function"))
        content.append({"type": "tool_use", "id": tool_use_id(call.get("id")), "name": function.get("name"),
                        "input": tool_input(function.get("arguments"))})
    reason, sequence = stop_reason(choice.get("finish_reason"), bool(calls), choice.get("stop_reason"),
                                   stop_sequences)
    usage = anthropic_usage(completion.get("usage")) or {"input_tokens": 0, "output_tokens": 0}
    return {"id": message_id(), "type": "message", "role": "assistant", "model": model, "content": content,
            "stop_reason": reason, "stop_sequence": sequence, "usage": usage}


def as_dict(value: Any) -> dict[str, Any]:
    """`value` if it is a JSON object, else an empty one (an upstream's answer is read defensively)."""
    return value if isinstance(value, dict) else {}


def _int(value: Any) -> int:
    return value if isinstance(value, int) and not isinstance(value, bool) and value > 0 else 0
