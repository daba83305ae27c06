"""The one reader of token usage (proxy/usage.py) that limits, prices and the ledger share."""

from __future__ import annotations

from typing import Any

import pytest

from proxy.usage import TokenUsage, cached_tokens, reasoning_tokens

BASE = {"prompt_tokens": 100, "completion_tokens": 20, "total_tokens": 120}


@pytest.mark.parametrize(("usage", "cached"), [
    ({**BASE, "prompt_tokens_details": {"cached_tokens": 64}}, 64),  # OpenAI chat
    ({**BASE, "input_tokens_details": {"cached_tokens": 32}}, 32),  # OpenAI Responses
    ({**BASE, "cached_tokens": 16}, 16),  # forwarding's flat chat-shaped usage
    ({**BASE, "cache_read_input_tokens": 8}, 8),  # Anthropic
    ({**BASE, "prompt_cache_hit_tokens": 90, "prompt_cache_miss_tokens": 10}, 90),  # DeepSeek
    ({**BASE, "prompt_tokens_details": {"cached_tokens": True}}, 0),  # not a count
    (BASE, 0),
])
def test_cached_prompt_tokens_in_every_provider_s_shape(usage: dict[str, Any], cached: int) -> None:
    """Each provider's way of saying how much of the prompt came from its cache is read as one number."""
    assert cached_tokens(usage) == cached
    assert TokenUsage.of_answer(usage, 0).cached == cached


@pytest.mark.parametrize(("usage", "reasoning"), [
    ({**BASE, "completion_tokens_details": {"reasoning_tokens": 12}}, 12),
    ({**BASE, "output_tokens_details": {"reasoning_tokens": 7}}, 7),
    ({**BASE, "reasoning_tokens": 3}, 3),
    (BASE, 0),
])
def test_reasoning_tokens_in_every_shape(usage: dict[str, Any], reasoning: int) -> None:
    """Reasoning tokens from the details objects or the flat name."""
    assert reasoning_tokens(usage) == reasoning


@pytest.mark.parametrize(("usage", "tokens", "expected"), [
    ({"prompt_tokens": 3, "completion_tokens": 5, "total_tokens": 8}, 2, TokenUsage(3, 5, 8, True)),
    (None, 4, TokenUsage(0, 4, 4, False)),
])
def test_stream_stats_token_usage(usage: dict[str, int] | None, tokens: int, expected: TokenUsage) -> None:
    """What the budgets, metrics and a WebSocket charge read of a stream: its reported usage, else its deltas."""
    from proxy.pump import StreamStats

    assert StreamStats(usage=usage, tokens=tokens).token_usage() == expected
