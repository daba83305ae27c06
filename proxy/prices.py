"""What tokens cost: the price table of PRICES_FILE (TOML), for the money budgets (`proxy/budgets.py`) and
whoever needs the cost of an answer (`PriceTable.cost`).

    # /etc/relay/prices.toml: prices per million tokens, in whatever currency you bill in
    [[prices]]
    model = "gpt-4o-mini"     # a model name or a glob ("deepseek-*"); the first entry that matches wins
    input = 0.15
    output = 0.60
    cached_input = 0.075      # optional; default: the input price

The relay ships no prices: providers change them, and a stale table would quietly mis-charge. A model no
entry matches has no known price (`None`); a key with a spend limit cannot use it (`proxy/budgets.py`).
The file is read at start-up; a price change takes a restart (`systemctl restart relay`).
"""

from __future__ import annotations

import tomllib
from dataclasses import dataclass
from fnmatch import fnmatchcase
from pathlib import Path
from typing import Annotated, ClassVar

from pydantic import Field, StringConstraints

from proxy.usage import TokenUsage
from proxy.validation import EntryError, FileEntry, Says

PER = 1_000_000  # prices are per million tokens
_PRICE = "must be a number of at least 0 (a price per million tokens)"


class PricesFileError(ValueError):
    """The price table cannot be used; the message names the file and the entry."""


class PriceEntry(FileEntry):
    """One `[[prices]]` table of PRICES_FILE."""

    NOT_A_TABLE: ClassVar[str] = "{where} must be a table with model, input and output"

    model: Annotated[str, StringConstraints(min_length=1, max_length=200),
                     Says("'model' must be a model name or glob such as \"gpt-4o*\"")]
    input: Annotated[float, Field(ge=0, allow_inf_nan=False), Says(f"'input' {_PRICE}")]
    output: Annotated[float, Field(ge=0, allow_inf_nan=False), Says(f"'output' {_PRICE}")]
    cached_input: Annotated[float | None, Field(ge=0, allow_inf_nan=False), Says(f"'cached_input' {_PRICE}")] = None


@dataclass(frozen=True)
class Price:
    """One model's (or glob's) prices per million tokens."""

    model: str
    input: float
    output: float
    cached_input: float

    def cost(self, usage: TokenUsage) -> float:
        cached = min(max(usage.cached, 0), usage.prompt)
        return ((usage.prompt - cached) * self.input + cached * self.cached_input
                + usage.completion * self.output) / PER


@dataclass(frozen=True)
class PriceTable:
    """The price entries in file order; empty when PRICES_FILE is not set (no price is known)."""

    entries: tuple[Price, ...] = ()

    @classmethod
    def load(cls, path: Path) -> PriceTable:
        """Parse and validate PRICES_FILE; raise PricesFileError naming the file and the entry."""
        try:
            document = tomllib.loads(path.read_text(encoding="utf-8"))
        except OSError as exc:
            # Not the path: whatever was pasted into PRICES_FILE (a key, say) would be echoed.
            raise PricesFileError(f"cannot read the file it names ({exc.strerror or type(exc).__name__})") from None
        except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
            raise PricesFileError(f"{path} is not valid TOML: {exc}") from None
        unknown = sorted(set(document) - {"prices"})
        if unknown:
            raise PricesFileError(f"{path}: unknown top-level entries {unknown}; write [[prices]] tables")
        entries = document.get("prices", [])
        if not isinstance(entries, list):
            raise PricesFileError(f"{path}: 'prices' must be [[prices]] tables")
        return cls(tuple(_price(path, number, entry) for number, entry in enumerate(entries, start=1)))

    def price_of(self, model: str) -> Price | None:
        """The first entry whose model name or glob matches `model`."""
        return next((price for price in self.entries if fnmatchcase(model, price.model)), None)

    def cost(self, model: str, usage: TokenUsage) -> float | None:
        """What `usage` of `model` costs; None when no entry prices the model. Cached prompt tokens (part of
        `usage.prompt`) are charged at the cached-input price."""
        price = self.price_of(model)
        return price.cost(usage) if price is not None else None

    def estimate(self, model: str, prompt_tokens: int, max_output_tokens: int) -> float | None:
        """The most a request can cost if the upstream keeps to its output cap: every prompt token at the
        full input price, every allowed output token at the output price; None when the model has no price."""
        price = self.price_of(model)
        if price is None:
            return None
        return (prompt_tokens * price.input + max_output_tokens * price.output) / PER


def _price(path: Path, number: int, entry: object) -> Price:
    model = entry.get("model") if isinstance(entry, dict) else None
    where = f"{path}: prices entry {number}" + (f" ({model!r})" if isinstance(model, str) else "")
    try:
        checked = PriceEntry.check(entry, where)
    except EntryError as exc:
        raise PricesFileError(str(exc)) from None
    cached = checked.cached_input if checked.cached_input is not None else checked.input
    return Price(checked.model, checked.input, checked.output, cached)


def load_prices(path: Path | None) -> PriceTable:
    """PRICES_FILE's table, or the empty one (nothing priced) when it is not set."""
    return PriceTable.load(path) if path is not None else PriceTable()
