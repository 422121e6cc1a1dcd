"""The import graph: no cycle between modules or packages, layers point one way.

Every ``import``/``from ... import`` is counted, also those inside functions
(a lazy import is still a dependency). Packages: ``pallas_kernels`` and
``sharding`` <- ``model`` <- ``serving`` (STYLE.md); nothing below
``serving`` imports it, and the host side of ``serving.engine`` imports no jax.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("pallas_kernels", "sharding", "model", "serving")
# package -> the packages it may import
ALLOWED = {"pallas_kernels": set(), "sharding": set(),
           "model": {"pallas_kernels", "sharding"},
           "serving": {"pallas_kernels", "sharding", "model"}}
HOST_ONLY = ("serving/engine/scheduler.py", "serving/engine/block_manager.py",
             "serving/engine/sequence.py", "serving/engine/types.py",
             "serving/engine/errors.py", "serving/engine/protocol.py",
             "serving/engine/sampling_tensors.py", "serving/engine/pipeline.py",
             "serving/engine/buckets.py")


def _modules() -> dict[str, Path]:
    out = {}
    for pkg in PACKAGES:
        for path in (ROOT / pkg).rglob("*.py"):
            parts = path.relative_to(ROOT).with_suffix("").parts
            if parts[-1] == "__init__":
                parts = parts[:-1]
            out[".".join(parts)] = path
    return out


def _imports(path: Path, name: str, modules: dict[str, Path]) -> set[str]:
    """The project modules ``path`` imports (a package import counts as its __init__)."""
    found = set()
    is_pkg = path.name == "__init__.py"
    for node in ast.walk(ast.parse(path.read_text())):
        targets = []
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = name.split(".") if is_pkg else name.split(".")[:-1]
                anchor = anchor[:len(anchor) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            targets = [f"{base}.{a.name}" for a in node.names] + [base]
        for t in targets:
            while t and t not in modules:
                t = t.rpartition(".")[0]
            if t and t != name:
                found.add(t)
    return found


def _graph():
    modules = _modules()
    return {m: _imports(p, m, modules) for m, p in modules.items()}


def _cycle(graph: dict[str, set[str]]):
    """One cycle of ``graph`` as a list of nodes, or None."""
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(n):
        state[n] = 1
        stack.append(n)
        for m in sorted(graph.get(n, ())):
            if state.get(m) == 1:
                return stack[stack.index(m):] + [m]
            if m not in state:
                found = visit(m)
                if found:
                    return found
        stack.pop()
        state[n] = 2
        return None

    for n in sorted(graph):
        if n not in state:
            found = visit(n)
            if found:
                return found
    return None


def test_no_import_cycle_between_modules():
    graph = _graph()
    # a package's __init__ re-exporting its own modules is not a cycle
    graph = {m: {d for d in deps if not m.startswith(d + ".")} for m, deps in graph.items()}
    assert _cycle(graph) is None, " -> ".join(_cycle(graph))


@pytest.mark.parametrize("pkg", PACKAGES)
def test_packages_point_one_way(pkg):
    bad = sorted(f"{m} imports {d}" for m, deps in _graph().items() if m.split(".")[0] == pkg
                 for d in deps if d.split(".")[0] not in ALLOWED[pkg] | {pkg})
    assert not bad, bad


@pytest.mark.parametrize("rel", HOST_ONLY)
def test_host_side_imports_no_jax(rel):
    tree = ast.parse((ROOT / rel).read_text())
    names = [a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names]
    names += [n.module or "" for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)]
    assert not [n for n in names if n.split(".")[0] in ("jax", "jaxlib", "flax")], names
