"""The layout stays a map: no import cycles between packages, and the scheduling core
imports no strategy, no asyncio and no gRPC."""

from __future__ import annotations

import ast
from collections import defaultdict
from pathlib import Path

import buildfleet

ROOT = Path(buildfleet.__file__).parent


def imports() -> dict[str, set[str]]:
    """Module name -> the buildfleet modules it imports (at run time or for typing)."""
    found: dict[str, set[str]] = {}
    for path in ROOT.rglob("*.py"):
        relative = path.relative_to(ROOT.parent).with_suffix("")
        parts = list(relative.parts)
        if "_proto" in parts:
            continue
        if parts[-1] == "__init__":
            parts.pop()
        module = ".".join(parts)
        names: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                names.add(node.module)
                names.update(f"{node.module}.{alias.name}" for alias in node.names)
            elif isinstance(node, ast.Import):
                names.update(alias.name for alias in node.names)
        found[module] = {name for name in names if name.startswith("buildfleet.")}
    return found


def unit(module: str, depth: int) -> str:
    """The package a module belongs to, `depth` levels below `buildfleet`."""
    return ".".join(module.split(".")[:depth + 1])


def graph(depth: int, within: str = "buildfleet") -> dict[str, set[str]]:
    modules = imports()
    edges: dict[str, set[str]] = defaultdict(set)
    for module, targets in modules.items():
        if not module.startswith(within + ".") or module.count(".") < depth:
            continue
        for target in targets:
            if not target.startswith(within + "."):
                continue
            real = target if target in modules else target.rsplit(".", 1)[0]
            if real not in modules or real.count(".") < depth:
                continue
            a, b = unit(module, depth), unit(real, depth)
            if a != b:
                edges[a].add(b)
    return edges


def cycle(edges: dict[str, set[str]]) -> list[str] | None:
    """One cycle of the graph, if any."""
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for successor in sorted(edges.get(node, ())):
            if state.get(successor) == 1:
                return stack[stack.index(successor):] + [successor]
            if successor not in state:
                found = visit(successor)
                if found:
                    return found
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(edges):
        if node not in state:
            found = visit(node)
            if found:
                return found
    return None


def test_no_import_cycles_between_packages() -> None:
    assert cycle(graph(1)) is None, " -> ".join(cycle(graph(1)) or [])


def test_no_import_cycles_inside_the_scheduler() -> None:
    inner = graph(2, "buildfleet.scheduler")
    assert inner, "the scheduler's parts were not found"
    assert cycle(inner) is None, " -> ".join(cycle(inner) or [])


def test_the_core_knows_no_strategy_no_asyncio_and_no_grpc() -> None:
    for path in (ROOT / "scheduler" / "rules").glob("*.py"):
        tree = ast.parse(path.read_text())
        names = {alias.name for node in ast.walk(tree) if isinstance(node, ast.Import)
                 for alias in node.names}
        names |= {node.module or "" for node in ast.walk(tree)
                  if isinstance(node, ast.ImportFrom)}
        forbidden = {name for name in names
                     if name.split(".")[0] in ("asyncio", "grpc", "psycopg", "sqlite3")
                     or name.startswith(("buildfleet.scheduler.embedded",
                                         "buildfleet.scheduler.replicated",
                                         "buildfleet.storage", "buildfleet.server"))}
        assert not forbidden, f"{path.name} imports {sorted(forbidden)}"


def test_the_cycle_finder_finds_cycles() -> None:
    assert cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert cycle({"a": {"b"}, "b": {"c"}}) is None
