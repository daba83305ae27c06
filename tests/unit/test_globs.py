"""proxy/globs.py: the one rule for which model names a list of names and globs covers."""

from __future__ import annotations

import pytest

from proxy.globs import model_allowed, serves


@pytest.mark.parametrize(("patterns", "model", "allowed"), [
    ((), "anything", True),  # no list: no restriction
    (("gpt-4o*",), "gpt-4o-mini", True),
    (("gpt-4o*",), "GPT-4o-mini", False),  # case matters: model names are case-sensitive upstream
    (("gpt-4o", "claude-*"), "claude-sonnet-4", True),
    (("gpt-4o",), "gpt-4o-mini", False),  # a plain name is exact
    (("llama?",), "llama3", True),
])
def test_model_allowed(patterns: tuple[str, ...], model: str, allowed: bool) -> None:
    """ALLOWED_MODELS and a key's `models`: globs matched case-sensitively, an empty list allows every model."""
    assert model_allowed(patterns, model) is allowed


@pytest.mark.parametrize(("models", "model_map", "model", "served"), [
    (("gpt-*",), (), "gpt-4o", True),
    (("gpt-*",), (("fast", "llama-3-8b"),), "fast", True),  # a model_map name is served whatever the globs
    (("gpt-*",), (("fast", "llama-3-8b"),), "llama-3-8b", False),  # the upstream's own name is not a client's
    ((), (), "any", True),
])
def test_serves(models: tuple[str, ...], model_map: tuple[tuple[str, str], ...], model: str, served: bool) -> None:
    """What an upstream serves, for routing and for the DEFAULT_MODEL start-up check alike."""
    assert serves(models, model_map, model) is served


def test_one_glob_rule() -> None:
    """Model globs are matched in proxy/globs.py (and the price table's first match, one glob per row) only:
    ALLOWED_MODELS, key lists, routing and the start-up check cannot drift apart."""
    from pathlib import Path

    package = Path(__file__).resolve().parents[2] / "proxy"
    users = sorted(path.name for path in package.rglob("*.py") if "fnmatch" in path.read_text())
    assert users == ["globs.py", "prices.py"]
