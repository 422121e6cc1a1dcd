"""The packages point one way and no module imports itself back (STYLE.md, pattern 1).

``pallas_kernels`` and ``sharding`` <- ``model`` <- ``serving``: reads every
import statement (function-local ones included) of ``model/``,
``pallas_kernels/`` and ``sharding/`` with ``ast``, so nothing is imported.
"""

from __future__ import annotations

import ast
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
PACKAGES = ("model", "pallas_kernels", "sharding")
# package -> the first-party packages it may import
ALLOWED = {
    "pallas_kernels": {"pallas_kernels"},
    "sharding": {"sharding"},
    "model": {"model", "pallas_kernels", "sharding"},
}
FIRST_PARTY = {"model", "pallas_kernels", "serving", "sharding", "tools"}


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(REPO).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _imports(path: Path, modules: frozenset = frozenset()) -> set[str]:
    """First-party names ``path`` imports.

    ``from a import b`` counts as ``a.b`` when that is one of ``modules`` (a
    sub-module), else as ``a``.
    """
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            subs = [f"{node.module}.{a.name}" for a in node.names]
            names = [n if n in modules else node.module for n in subs]
        else:
            continue
        out.update(n for n in names if n.split(".")[0] in FIRST_PARTY)
    return out


def _graph() -> dict[str, set[str]]:
    files = [p for pkg in PACKAGES for p in (REPO / pkg).rglob("*.py")]
    modules = {_module_name(p): p for p in files}
    names = frozenset(modules)
    return {name: {m for m in _imports(path, names) if m in modules and m != name}
            for name, path in modules.items()}


def test_packages_point_one_way():
    bad = []
    for module, path in ((_module_name(p), p) for pkg in PACKAGES
                         for p in (REPO / pkg).rglob("*.py")):
        pkg = module.split(".")[0]
        for target in _imports(path):
            if target.split(".")[0] not in ALLOWED[pkg]:
                bad.append(f"{module} imports {target}")
    assert not bad, bad


def test_no_import_cycles():
    graph = _graph()
    state: dict[str, int] = {}
    cycles = []

    def visit(node, stack):
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                cycles.append(stack[stack.index(nxt):] + [nxt])
            elif nxt not in state:
                visit(nxt, stack)
        stack.pop()
        state[node] = 2

    for node in sorted(graph):
        if node not in state:
            visit(node, [])
    assert not cycles, cycles
