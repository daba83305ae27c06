"""Which model names a list of names and globs (`gpt-4o*`, `*`) covers: one rule for ALLOWED_MODELS, a key's
`models`, and the models an upstream serves. A leaf module (the standard library only), so that
proxy/config.py can check UPSTREAMS_FILE against DEFAULT_MODEL without importing the upstream clients."""

from __future__ import annotations

from collections.abc import Iterable
from fnmatch import fnmatchcase


def model_allowed(patterns: Iterable[str], model: str) -> bool:
    """`model` matches one of `patterns`; every model does when there are none (no restriction)."""
    patterns = tuple(patterns)
    return not patterns or any(fnmatchcase(model, pattern) for pattern in patterns)


def serves(models: Iterable[str], model_map: Iterable[tuple[str, str]], model: str) -> bool:
    """An upstream serves the names its `model_map` gives and whatever its `models` globs match (all, when
    it lists none)."""
    return any(model == name for name, _own in model_map) or model_allowed(models, model)
