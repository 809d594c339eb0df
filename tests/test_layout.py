"""The house rules, read from the code: three floors with arrows only downward, and no import cycle.

Every import counts, including those inside functions: a function-level import is still an arrow.
"""

from __future__ import annotations

import ast
from collections import defaultdict
from pathlib import Path

from tests.support.paths import REPO

KERNEL = {"kernel"}
SERVICES = {"gateway", "streams", "warehouse"}
ASSEMBLY = {"callstream"}
PRODUCT = KERNEL | SERVICES | ASSEMBLY


def _module_name(path: Path) -> str:
    parts = path.relative_to(REPO).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: Path) -> set[str]:
    """Every module name `path` imports from a product package, at any depth of the file."""
    out: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            # `from pkg import mod` may name a submodule: keep both spellings, resolved below.
            names = [node.module, *(f"{node.module}.{a.name}" for a in node.names)]
        else:
            continue
        out |= {n for n in names if n.split(".")[0] in PRODUCT}
    return out


def _graph() -> dict[str, set[str]]:
    files = {_module_name(p): p for pkg in PRODUCT for p in (REPO / pkg).rglob("*.py")}
    graph: dict[str, set[str]] = defaultdict(set)
    for mod, path in files.items():
        for name in _imports(path):
            while name and name not in files:  # `from a.b import func` names a.b
                name = name.rpartition(".")[0]
            if name and name != mod:
                graph[mod].add(name)
        graph.setdefault(mod, set())
    return graph


def _floor(mod: str) -> int:
    top = mod.split(".")[0]
    return 0 if top in KERNEL else 1 if top in SERVICES else 2


def test_arrows_only_point_down_and_services_never_import_each_other() -> None:
    wrong = []
    for mod, deps in sorted(_graph().items()):
        for dep in sorted(deps):
            same_package = mod.split(".")[0] == dep.split(".")[0]
            if _floor(dep) > _floor(mod) or (_floor(mod) == _floor(dep) == 1 and not same_package):
                wrong.append(f"{mod} -> {dep}")
    assert not wrong, "imports against the floors:\n" + "\n".join(wrong)


def test_no_import_cycle() -> None:
    graph = _graph()
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    cycles: list[str] = []

    def visit(mod: str, path: list[str]) -> None:
        state[mod] = 1
        for dep in sorted(graph.get(mod, ())):
            if state.get(dep) == 1:
                cycles.append(" -> ".join([*path[path.index(dep) :], dep]))
            elif dep not in state:
                visit(dep, [*path, dep])
        state[mod] = 2

    for mod in sorted(graph):
        if mod not in state:
            visit(mod, [mod])
    assert not cycles, "import cycles:\n" + "\n".join(cycles)


def test_nothing_outside_tests_imports_tests_and_nothing_imports_a_conftest() -> None:
    wrong = []
    for path in REPO.rglob("*.py"):
        rel = path.relative_to(REPO)
        if rel.parts[0].startswith(".") or rel.parts[0] in {"data", "build"}:
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module:
                names = [node.module]
            elif isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            else:
                continue
            for name in names:
                if name.endswith("conftest") or (name.split(".")[0] == "tests" and rel.parts[0] != "tests"):
                    wrong.append(f"{rel}:{node.lineno} imports {name}")
    assert not wrong, "\n".join(wrong)


def test_functions_stay_under_about_sixty_lines() -> None:
    long = []
    for pkg in sorted(PRODUCT):
        for path in sorted((REPO / pkg).rglob("*.py")):
            for node in ast.walk(ast.parse(path.read_text())):
                if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                    size = (node.end_lineno or node.lineno) - node.lineno + 1
                    if size > 60:
                        long.append(f"{path.relative_to(REPO)}:{node.lineno} {node.name} ({size} lines)")
    assert not long, "functions over 60 lines:\n" + "\n".join(long)
