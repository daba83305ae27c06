"""proxy/prices.py: PRICES_FILE's price table, its validation and its arithmetic."""

from __future__ import annotations

from pathlib import Path

import pytest

from proxy.config import Config, ConfigError
from proxy.prices import PriceEntry, PricesFileError, PriceTable
from proxy.usage import TokenUsage
from tests.conftest import ACCESS_KEY, UPSTREAM_KEY

TABLE = """
# per million tokens
[[prices]]
model = "gpt-4o-mini"
input = 0.15
output = 0.6
cached_input = 0.075

[[prices]]
model = "gpt-4o*"
input = 2.5
output = 10

[[prices]]
model = "*"
input = 1
output = 2
"""


def table(tmp_path: Path, text: str = TABLE) -> PriceTable:
    path = tmp_path / "prices.toml"
    path.write_text(text)
    return PriceTable.load(path)


def test_first_matching_entry_wins_in_file_order(tmp_path: Path) -> None:
    """An exact name before a glob that also matches it wins; a later catch-all prices the rest."""
    prices = table(tmp_path)
    assert prices.price_of("gpt-4o-mini").input == 0.15  # type: ignore[union-attr]
    assert prices.price_of("gpt-4o-2024-08-06").input == 2.5  # type: ignore[union-attr]
    assert prices.price_of("deepseek-chat").input == 1  # type: ignore[union-attr]


@pytest.mark.parametrize(("model", "usage", "cost"), [
    ("gpt-4o-mini", TokenUsage(1_000_000, 1_000_000, 2_000_000, True), 0.75),
    ("gpt-4o-mini", TokenUsage(1_000_000, 0, 1_000_000, True, cached=500_000), 0.1125),
    ("gpt-4o", TokenUsage(1000, 500, 1500, True, cached=1000), 0.0075),  # cached price defaults to input
    ("gpt-4o", TokenUsage(10, 0, 10, True, cached=99), 0.000025),  # cached never more than the prompt
    ("other", TokenUsage(0, 0, 0, True), 0.0),
])
def test_cost(tmp_path: Path, model: str, usage: TokenUsage, cost: float) -> None:
    """Prompt tokens at the input price (cached ones at the cached price), completion at the output price."""
    assert table(tmp_path).cost(model, usage) == pytest.approx(cost)


def test_estimate_is_the_upper_bound(tmp_path: Path) -> None:
    """The estimate prices every prompt token at the full input price and the whole output cap."""
    assert table(tmp_path).estimate("gpt-4o-mini", 1000, 4096) == pytest.approx((1000 * 0.15 + 4096 * 0.6) / 1e6)


def test_unpriced_model_has_no_price(tmp_path: Path) -> None:
    """No entry matches: None from both cost and estimate (not zero: nothing is known)."""
    prices = table(tmp_path, '[[prices]]\nmodel = "gpt-*"\ninput = 1\noutput = 1\n')
    assert prices.cost("claude-x", TokenUsage(1, 1, 2, True)) is None
    assert prices.estimate("claude-x", 1, 1) is None
    assert PriceTable().cost("gpt-4o", TokenUsage(1, 1, 2, True)) is None


@pytest.mark.parametrize(("text", "message"), [
    ("[[prices]\n", "is not valid TOML"),
    ("currency = 'EUR'\n", "unknown top-level entries ['currency']; write [[prices]] tables"),
    ("prices = 3\n", "'prices' must be [[prices]] tables"),
    ("prices = [1]\n", "prices entry 1 must be a table with model, input and output"),
    ('[[prices]]\nmodel = "a"\ninput = 1\noutput = 1\n[[prices]]\nmodel = "b"\ninput = -1\noutput = 1\n',
     "prices entry 2 ('b'): 'input' must be a number of at least 0 (a price per million tokens)"),
    ('[[prices]]\nmodel = "a"\ninput = "1"\noutput = 1\n', "prices entry 1 ('a'): 'input' must be a number"),
    ('[[prices]]\nmodel = "a"\ninput = 1\noutput = nan\n', "prices entry 1 ('a'): 'output' must be a number"),
    ('[[prices]]\nmodel = "a"\ninput = 1\n', "prices entry 1 ('a'): 'output' must be a number"),
    ('[[prices]]\nmodel = ""\ninput = 1\noutput = 1\n', "prices entry 1 (''): 'model' must be a model name"),
    ('[[prices]]\nmodel = "a"\ninput = 1\noutput = 1\ncached_input = -2\n', "'cached_input' must be a number"),
    ('[[prices]]\nmodel = "a"\ninput = 1\noutput = 1\ncurrency = "USD"\n',
     "prices entry 1 ('a'): unknown field(s) currency"),
])
def test_bad_price_files_name_the_file_and_entry(tmp_path: Path, text: str, message: str) -> None:
    """Every problem is one line naming the file and the entry (by number and model)."""
    path = tmp_path / "prices.toml"
    path.write_text(text)
    with pytest.raises(PricesFileError) as caught:
        PriceTable.load(path)
    assert str(path) in str(caught.value) and message in str(caught.value)


def test_whole_numbers_are_prices_too(tmp_path: Path) -> None:
    """TOML integers (output = 10) are accepted as prices, as the README's example writes them."""
    assert table(tmp_path).price_of("gpt-4o").output == 10.0  # type: ignore[union-attr]
    assert set(PriceEntry.messages()) == {"model", "input", "output", "cached_input"}


def test_prices_file_setting(tmp_path: Path) -> None:
    """PRICES_FILE is read at start-up into Config.prices; a broken one stops start-up naming the setting."""
    path = tmp_path / "prices.toml"
    path.write_text(TABLE)
    env = {"AUTHORIZATION_KEY": ACCESS_KEY, "OPENAI_API_KEY": UPSTREAM_KEY, "PRICES_FILE": str(path)}
    assert Config.from_env(env).prices.price_of("gpt-4o-mini") is not None
    path.write_text("[[prices]]\nmodel = 3\n")
    with pytest.raises(ConfigError, match=r"^PRICES_FILE: .*prices entry 1: 'model' must be"):
        Config.from_env(env)


def test_readme_price_example_is_valid(tmp_path: Path) -> None:
    """The README's price table example loads as written and prices what it says."""
    readme = (Path(__file__).resolve().parents[2] / "README.md").read_text()
    block = next(part for part in readme.split("```toml\n")[1:] if "[[prices]]" in part).split("```")[0]
    prices = table(tmp_path, block)
    assert prices.price_of("deepseek-chat").output == 1.10  # type: ignore[union-attr]
    assert prices.cost("gpt-4o-mini", TokenUsage(1_000_000, 0, 1_000_000, True, cached=1_000_000)) == 0.075
