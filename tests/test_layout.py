"""The tree's shape: no import circles, packages only import downwards, and docs/modules.md names
every module (a map that is kept true)."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

# Lowest first: a package may import only packages listed before it (or itself).
LAYERS = [
    {"errors", "_proto", "limits"},
    {"pop"},
    {"models"},
    {"config"},
    {"engine"},
    {"calib", "disagg"},
    {"server", "bench", "eval"},
    {"commands", "protos_build"},
    {"cli"},
]


def _modules() -> dict[str, Path]:
    mods = {}
    for f in (ROOT / "pop_disagg").rglob("*.py"):
        parts = list(f.relative_to(ROOT).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        mods[".".join(parts)] = f
    return mods


def _imports(mods: dict[str, Path]) -> dict[str, set[str]]:
    """Every project import of every module, at module level or inside functions."""
    graph: dict[str, set[str]] = {m: set() for m in mods}
    for mod, path in mods.items():
        package = mod.split(".") if path.name == "__init__.py" else mod.split(".")[:-1]
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom):
                base = package[: len(package) - node.level + 1] if node.level else []
                target = ".".join(base + ([node.module] if node.module else []))
                names = [f"{target}.{a.name}" for a in node.names]
            elif isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            else:
                continue
            for name in names:
                while name and name not in mods:
                    name = name.rpartition(".")[0]
                if name and name != mod:
                    graph[mod].add(name)
    return graph


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                found.append(sorted(comp))

    for v in graph:
        if v not in index:
            visit(v)
    return found


def _package(mod: str) -> str:
    return mod.split(".")[1] if "." in mod else mod


def test_no_import_cycles():
    assert _cycles(_imports(_modules())) == []


def test_packages_import_only_downwards():
    rank = {pkg: i for i, layer in enumerate(LAYERS) for pkg in layer}
    graph = _imports(_modules())
    assert set(map(_package, graph)) - {"pop_disagg"} <= set(rank), "a new package needs a place in LAYERS"
    upward = sorted(
        f"{a} -> {b}"
        for a, targets in graph.items()
        for b in targets
        if a != "pop_disagg"
        and _package(a) != _package(b)
        and rank[_package(b)] >= rank[_package(a)]
        and not (rank[_package(b)] == rank[_package(a)] and {_package(a), _package(b)} <= {"server", "bench"})
    )
    assert upward == []


def test_cycle_finder_sees_a_cycle():
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_module_map_names_every_module():
    text = (ROOT / "docs" / "modules.md").read_text()
    files = [p for d in ("pop_disagg", "tests", "benchmarks") for p in (ROOT / d).rglob("*.py")]
    files = [p for p in files if p.name != "__init__.py" and "_proto" not in p.parts and "results" not in p.parts]
    missing = []
    for f in files:
        rel = f.relative_to(ROOT).as_posix()
        parent = f.parent.relative_to(ROOT).as_posix()
        if rel not in text and not (f"`{f.name}`" in text and f"`{parent}/`" in text):
            missing.append(rel)
    assert missing == []
