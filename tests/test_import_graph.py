"""No import circles inside the foundation's subpackages (issue 13.16): every ``import`` in a
module, lazy ones inside functions included, read from the source with ``ast``, so a circle
cannot hide behind an import deferred into a function body (``if TYPE_CHECKING:`` imports,
which never run, are left out)."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PKG = Path(__file__).resolve().parents[1] / "python" / "aios_fast"
SUBPACKAGES = ["engines", "probe", "cards", "lora", "learn", "kernels", "extract"]


def _module_name(path: Path) -> str:
    rel = path.relative_to(PKG.parent).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _imports(path: Path) -> set[str]:
    """Absolute names of the aios_fast modules ``path`` imports (anywhere in the file)."""
    mod = _module_name(path)
    pkg = mod if path.name == "__init__.py" else mod.rpartition(".")[0]
    out: set[str] = set()
    for node in _runtime_nodes(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = pkg.split(".")
                base = base[:len(base) - (node.level - 1)]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            if target.startswith("aios_fast"):
                out.add(target)
                out.update(f"{target}.{a.name}" for a in node.names)  # `from . import x`
        elif isinstance(node, ast.Import):
            out.update(a.name for a in node.names if a.name.startswith("aios_fast"))
    return out


def _runtime_nodes(tree: ast.AST):
    """Every node except those under ``if TYPE_CHECKING:`` (type-only imports never run)."""
    stack = [tree]
    while stack:
        node = stack.pop()
        yield node
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.If) and "TYPE_CHECKING" in ast.unparse(child.test):
                stack.extend(child.orelse)
                continue
            stack.append(child)


@pytest.mark.parametrize("sub", SUBPACKAGES)
def test_no_import_cycle_between_modules_of(sub):
    files = {_module_name(p): p for p in (PKG / sub).glob("*.py") if p.name != "__init__.py"}
    graph = {m: {t for t in _imports(p) if t in files and t != m} for m, p in files.items()}
    state: dict[str, int] = {}

    def visit(m: str, path: list[str]) -> None:
        state[m] = 1
        for t in sorted(graph[m]):
            if state.get(t) == 1:
                cycle = path[path.index(t):] + [t] if t in path else [m, t]
                raise AssertionError(f"import circle: {' -> '.join(cycle)}")
            if t not in state:
                visit(t, path + [t])
        state[m] = 2

    for m in sorted(graph):
        if m not in state:
            visit(m, [m])


def test_the_two_known_circles_are_gone():
    eng, probe = PKG / "engines", PKG / "probe"
    assert "aios_fast.engines.converter" not in _imports(eng / "checkpoints.py")
    assert "aios_fast.probe.heatmap" not in _imports(probe / "render.py")
