"""The library's layout: no import cycles between modules, and no package importing one above it.

Imports are read from the source (top-level and inside functions alike: a lazy import is still an arrow),
so the test needs nothing installed beyond the standard library.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

pytestmark = pytest.mark.unit

LIBRARY = Path(__file__).resolve().parent.parent / "platform" / "visuray"

# Bottom to top. A package may import its own modules and those of any lower layer; packages of one layer
# do not import each other (the task packages stand side by side). The README's layout section says why.
LAYERS: list[set[str]] = [
    {"visuray", "errors"},  # the version, the error every message-only failure derives from
    {"config"},
    {"images", "cluster"},
    {"storage"},
    {"catalog", "checkpoint", "evaluation"},
    {"models"},
    {"train"},
    {"ssl", "metric_learning", "fusion", "attributes"},
    {"predictors"},
    {"index"},
    {"serving"},
    {"jobspec"},
    {"submission", "infra", "sweep"},
    {"status"},
    {"demo"},
    {"cli"},
]


def module_name(path: Path) -> str:
    parts = ["visuray", *path.relative_to(LIBRARY).with_suffix("").parts]
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def library_modules() -> dict[str, Path]:
    return {module_name(p): p for p in LIBRARY.rglob("*.py")}


def imports_of(path: Path, modules: dict[str, Path]) -> set[str]:
    """The library modules ``path`` imports (``from a.b import c`` counts as ``a.b.c`` when that is a module)."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("visuray"):
            for alias in node.names:
                target = f"{node.module}.{alias.name}"
                found.add(target if target in modules else node.module)
        elif isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name.startswith("visuray"))
    return found & set(modules)


def package_of(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "visuray"


def import_graph() -> dict[str, set[str]]:
    modules = library_modules()
    return {name: imports_of(path, modules) for name, path in modules.items()}


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in graph:
        if v not in index:
            visit(v)
    return found


def layering_violations(graph: dict[str, set[str]]) -> list[str]:
    layer = {package: i for i, packages in enumerate(LAYERS) for package in packages}
    problems = []
    for module, targets in graph.items():
        source = package_of(module)
        if source not in layer:
            problems.append(f"{module}: package {source!r} has no layer in tests/test_layout.py")
            continue
        for target in sorted(targets):
            dest = package_of(target)
            if dest != source and layer.get(dest, len(LAYERS)) >= layer[source]:
                problems.append(f"{module} imports {target} ({dest} is not below {source})")
    return problems


def test_no_import_cycles() -> None:
    assert cycles(import_graph()) == []


def test_packages_import_only_downwards() -> None:
    assert layering_violations(import_graph()) == []


def test_the_checks_catch_what_they_are_for() -> None:
    """A cycle and an upward import, added to the real graph, are both reported."""
    graph = import_graph()
    graph["visuray.models.backbone"] = graph["visuray.models.backbone"] | {"visuray.serving.args"}
    graph["visuray.serving.args"] = graph["visuray.serving.args"] | {"visuray.models.backbone"}
    assert any({"visuray.models.backbone", "visuray.serving.args"} <= set(c) for c in cycles(graph))
    assert "visuray.models.backbone imports visuray.serving.args (serving is not below models)" in (
        layering_violations(graph)
    )
