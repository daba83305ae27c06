"""The shape of the `proxy` package itself: which of its modules import which, and how long its functions are."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[2] / "proxy"
LONGEST_FUNCTION_LINES = 60  # the team's rule (docs/architecture.md): a longer function is split


def module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {module_name(path): path for path in PACKAGE.rglob("*.py")}


def imported_by(name: str, path: Path) -> set[str]:
    """The proxy modules `name` imports: at module level and inside functions alike (an import moved into a
    function to dodge a cycle is still that cycle), but not those under `if TYPE_CHECKING:` (types only),
    nor the packages holding `name` (Python imports them first, whatever `name` says)."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: set[str] = set()

    def visit(node: ast.AST) -> None:
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            for child in node.orelse:
                visit(child)
            return
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*anchor, base] if base else anchor)
            found.add(base)
            found.update(f"{base}.{alias.name}" for alias in node.names)  # `from proxy.routes import chat`
        for inner in ast.iter_child_nodes(node):
            visit(inner)

    visit(ast.parse(path.read_text()))
    ancestors = {".".join(name.split(".")[:depth]) for depth in range(1, name.count(".") + 1)}
    return {module for module in found if module in MODULES and module != name and module not in ancestors}


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected groups of more than one module (Tarjan's algorithm)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    groups: list[list[str]] = []

    def connect(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        for target in sorted(graph[node]):
            if target not in index:
                connect(target)
                low[node] = min(low[node], low[target])
            elif target in stack:
                low[node] = min(low[node], index[target])
        if low[node] == index[node]:
            group = []
            while True:
                member = stack.pop()
                group.append(member)
                if member == node:
                    break
            if len(group) > 1:
                groups.append(sorted(group))

    for node in sorted(graph):
        if node not in index:
            connect(node)
    return groups


def test_no_import_cycle_among_proxy_modules() -> None:
    """No proxy module imports, directly or through others, a module that imports it back (function-level
    imports count; an importing package's implicit parent does not)."""
    graph = {name: imported_by(name, path) for name, path in MODULES.items()}
    assert cycles(graph) == []


@pytest.mark.parametrize(("graph", "expected"), [
    ({"a": {"b"}, "b": {"c"}, "c": set()}, []),
    ({"a": {"b"}, "b": {"c"}, "c": {"a"}}, [["a", "b", "c"]]),
    ({"a": {"b"}, "b": {"a"}, "c": {"a"}}, [["a", "b"]]),
])
def test_cycle_finder_finds_cycles(graph: dict[str, set[str]], expected: list[list[str]]) -> None:
    """The checker above would see a cycle: a chain is none, a loop of three or two is one."""
    assert cycles(graph) == expected


def test_imports_are_read_where_they_hide(tmp_path: Path) -> None:
    """A function-level import is read; one under `if TYPE_CHECKING:` is not; relative imports resolve."""
    source = ("from typing import TYPE_CHECKING\nfrom . import errors\nif TYPE_CHECKING:\n"
              "    from proxy.pump import StreamStats\ndef late() -> None:\n    from proxy.relay import Relay\n")
    path = tmp_path / "fake.py"
    path.write_text(source)
    assert imported_by("proxy.fake", path) == {"proxy.errors", "proxy.relay"}


def test_no_function_longer_than_the_rule() -> None:
    """Every function in proxy/ stays under the team's limit of about 60 lines (split, not grown)."""
    long = [f"{module_name(path)}.{node.name}: {node.end_lineno - node.lineno + 1} lines"
            for path in sorted(PACKAGE.rglob("*.py"))
            for node in ast.walk(ast.parse(path.read_text()))
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef) and node.end_lineno is not None
            and node.end_lineno - node.lineno + 1 > LONGEST_FUNCTION_LINES]
    assert long == []


# Where an answer's reported usage is turned into tokens: the reader itself, the stream's stats (what the budgets,
# the metrics and a WebSocket's charge read), the ledger's row (which adds reasoning tokens), and a WebSocket
# connection's running total (its log line's sum of the answers already counted).
USAGE_READERS = {"proxy.usage", "proxy.pump", "proxy.ledger.row", "proxy.routes.websocket"}


def test_usage_is_counted_in_one_place() -> None:
    """No other module reads tokens out of an upstream's usage (`TokenUsage.of_answer`): a new consumer reads
    `StreamStats.token_usage()`, so the limits, metrics and ledger never count one answer differently."""
    readers = {name for name, path in MODULES.items() if "TokenUsage.of_answer(" in path.read_text()}
    assert readers <= USAGE_READERS


def test_views_and_bridges_import_no_view() -> None:
    """What several views share lives outside proxy/routes (proxy/chat_stream.py, proxy/forwarded_answer.py):
    no module but the app's wiring (proxy/__init__.py) imports a view's module."""
    importers = sorted(name for name, path in MODULES.items() if name != "proxy"
                       for imported in imported_by(name, path) if imported.startswith("proxy.routes."))
    assert importers == []


def test_per_request_state_lives_on_one_object() -> None:
    """Flask's `g` is touched by proxy/request_state.py alone (`keep_request_state`, `request_state`): no
    module keeps loose per-request attributes on it."""
    users = sorted(name for name, path in MODULES.items()
                   for node in ast.walk(ast.parse(path.read_text()))
                   if isinstance(node, ast.ImportFrom) and node.module == "flask"
                   and any(alias.name == "g" for alias in node.names))
    assert users == ["proxy.request_state"]


# An upstream's answers, not the relay's: the in-process stand-in answers an unknown path as OpenAI does.
ERROR_OBJECT_BUILDERS = {"proxy.encoders", "proxy.standin"}


def test_error_objects_are_built_in_one_place() -> None:
    """Every error object the relay sends (`{"error": {...}}` in OpenAI's and Anthropic's shapes: bodies,
    error events, records) is built by proxy/encoders.py's `openai_error` / `anthropic_error`: no module
    writes the shape out again."""
    builders = {name for name, path in MODULES.items()
                for node in ast.walk(ast.parse(path.read_text())) if isinstance(node, ast.Dict)
                for key, value in zip(node.keys, node.values, strict=True)
                if isinstance(key, ast.Constant) and key.value == "error" and isinstance(value, ast.Dict)}
    assert builders <= ERROR_OBJECT_BUILDERS
