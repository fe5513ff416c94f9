"""The package layout (issue 14): no import circle anywhere in the tree, counting imports inside
functions too; the JAX network does not import its loader; the application reaches hy3dgen's
private ``_export`` and the shipped model through one place each. Static (``ast``): imports nothing."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = {"timi_core": ROOT / "timi_core", "timi": ROOT / "timi", "timi_torch": ROOT / "adapters/torch/timi_torch",
            "timi_jax": ROOT / "adapters/jax/timi_jax"}


def _modules() -> dict[str, Path]:
    out = {}
    for name, folder in PACKAGES.items():
        for path in folder.rglob("*.py"):
            parts = path.relative_to(folder).with_suffix("").parts
            parts = parts[:-1] if parts[-1] == "__init__" else parts
            out[".".join((name, *parts))] = path
    return out


def import_graph() -> dict[str, set[str]]:
    """Module -> the project modules it imports (anywhere in its body)."""
    modules = _modules()
    graph = {m: set() for m in modules}
    for mod, path in modules.items():
        package = mod if path.name == "__init__.py" else mod.rpartition(".")[0]
        for node in ast.walk(ast.parse(path.read_text())):
            targets = []
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                    base = ".".join(anchor + ([base] if base else []))
                targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in modules else base for a in node.names]
            for t in targets:
                while t and t not in modules:
                    t = t.rpartition(".")[0]
                if t and t != mod:
                    graph[mod].add(t)
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(m):
        state[m] = 1
        stack.append(m)
        for n in sorted(graph[m]):
            if state.get(n) == 1:
                return stack[stack.index(n):] + [n]
            if n not in state:
                found = visit(n)
                if found:
                    return found
        stack.pop()
        state[m] = 2
        return None

    for m in sorted(graph):
        if m not in state:
            found = visit(m)
            if found:
                return found
    return None


def test_no_import_circle():
    cycle = find_cycle(import_graph())
    assert cycle is None, " -> ".join(cycle)


def test_jax_network_does_not_import_its_loader():
    graph = import_graph()
    assert "timi_jax.params" not in graph["timi_jax.modeling"]
    assert "timi_jax.modeling" in graph["timi_jax.params"]


def _calling(name: str) -> list[str]:
    """Modules with a call of ``name`` (a function or a method)."""
    out = []
    for mod, path in _modules().items():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Call) and name in (getattr(node.func, "id", None), getattr(node.func, "attr", None)):
                out.append(mod)
                break
    return sorted(out)


def test_one_place_for_export_and_the_shipped_model():
    assert _calling("_export") == ["timi_torch.frontend"]
    assert [m for m in _calling("default_model_path") if m.startswith("timi.")] == ["timi.pipelines"]
    assert _calling("_stack_tokens") == []
    assert [m for m in _calling("encode_cond")] == ["timi_torch.frontend"]
