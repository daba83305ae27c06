"""What an answer cost in tokens: read once from the upstream's reported usage, for the budgets (limits),
the metrics and a WebSocket connection's running total."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class TokenUsage:
    prompt: int = 0
    completion: int = 0
    total: int = 0
    reported: bool = False  # from the upstream's usage; otherwise the content deltas counted as completion
    cached: int = 0  # of the prompt tokens, those read from the provider's prompt cache (priced lower)

    @classmethod
    def of_answer(cls, usage: dict[str, Any] | None, deltas: int) -> TokenUsage:
        """The upstream's usage (`prompt_tokens`, `completion_tokens`, `total_tokens`); the number of
        content deltas as completion tokens when it reported none."""
        if usage:
            prompt, completion, total = (usage.get(name) for name in
                                         ("prompt_tokens", "completion_tokens", "total_tokens"))
            if isinstance(prompt, int) and isinstance(completion, int):
                return cls(prompt, completion, total if isinstance(total, int) else prompt + completion, True,
                           cached_tokens(usage))
            if isinstance(total, int):
                return cls(0, total, total, True)
        return cls(0, deltas, deltas, False)

    def __add__(self, other: TokenUsage) -> TokenUsage:
        return TokenUsage(self.prompt + other.prompt, self.completion + other.completion,
                          self.total + other.total, self.reported or other.reported, self.cached + other.cached)

    def as_upstream_usage(self) -> dict[str, int]:
        """In the upstream's own shape, as a connection's running total is kept."""
        return {"prompt_tokens": self.prompt, "completion_tokens": self.completion, "total_tokens": self.total}


def cached_tokens(usage: dict[str, Any]) -> int:
    """The prompt tokens served from the cache, where the upstream says: OpenAI's chat
    (`prompt_tokens_details`) and Responses (`input_tokens_details`) shapes, the flat `cached_tokens` of
    forwarding's chat-shaped usage, Anthropic's `cache_read_input_tokens` and DeepSeek's
    `prompt_cache_hit_tokens`; 0 when it does not."""
    return (_detail(usage, ("prompt_tokens_details", "input_tokens_details"), "cached_tokens")
            or _count(usage.get("cached_tokens")) or _count(usage.get("cache_read_input_tokens"))
            or _count(usage.get("prompt_cache_hit_tokens")))


def reasoning_tokens(usage: dict[str, Any]) -> int:
    """The completion tokens spent reasoning, where the upstream says (its details, or the flat name)."""
    return (_detail(usage, ("completion_tokens_details", "output_tokens_details"), "reasoning_tokens")
            or _count(usage.get("reasoning_tokens")))


def _count(value: Any) -> int:
    return value if isinstance(value, int) and not isinstance(value, bool) and value > 0 else 0


def _detail(usage: dict[str, Any], parents: tuple[str, ...], name: str) -> int:
    for parent in parents:
        details = usage.get(parent)
        if isinstance(details, dict) and _count(details.get(name)):
            return _count(details.get(name))
    return 0
