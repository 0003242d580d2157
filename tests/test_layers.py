"""Imports flow one way (ARCHITECTURE.md): lower layers never import higher ones, and no module
imports itself back through others (lazy imports inside functions count too)."""

import ast
from pathlib import Path

PKG = Path(__file__).resolve().parents[1] / "fedllm"
ORDER = ["types", "config", "data", "models", "algorithms", "client", "experiments", "federation", "edge",
         "metrics", "studies", "cli"]
RANK = {"errors": 0, "types": 0, "config": 1, "data": 2, "models": 2, "algorithms": 3, "client": 4,
        "experiments": 5, "federation": 6, "edge": 6, "metrics": 7, "studies": 8, "cli": 8, "api": 8}


def layer(module: str) -> str | None:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 and parts[0] == "fedllm" and parts[1] in RANK else None


def test_imports_flow_downwards():
    bad = []
    for path in PKG.rglob("*.py"):
        rel = path.relative_to(PKG.parent).with_suffix("")
        own = layer(".".join(rel.parts))
        if own is None:
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else (
                [node.module] if isinstance(node, ast.ImportFrom) and node.module else [])
            for name in names:
                other = layer(name)
                if other and RANK[other] > RANK[own]:
                    bad.append(f"{rel}: imports {name}")
    assert not bad, "\n".join(bad)


def _modules() -> dict[str, Path]:
    """Dotted module name -> file, for every module of the package (a package is its __init__)."""
    out = {}
    for path in PKG.rglob("*.py"):
        parts = path.relative_to(PKG.parent).with_suffix("").parts
        out[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return out


def import_graph() -> dict[str, set[str]]:
    """Module -> the fedllm modules it imports anywhere in its body (``from a import b`` names
    ``a.b`` when that is a module, else ``a``; relative imports are resolved)."""
    mods = _modules()
    graph: dict[str, set[str]] = {}
    for name, path in mods.items():
        package = name.split(".") if path.name == "__init__.py" else name.split(".")[:-1]
        deps = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                deps |= {a.name for a in node.names if a.name in mods}
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    base = ".".join(package[: len(package) - node.level + 1] + ([base] if base else []))
                for a in node.names:
                    if f"{base}.{a.name}" in mods:
                        deps.add(f"{base}.{a.name}")
                    elif base in mods:
                        deps.add(base)
        deps.discard(name)
        graph[name] = deps
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import circle (``[a, b, ..., a]``) of the graph, or None (depth-first search)."""
    done: set[str] = set()

    def visit(node: str, path: list[str]) -> list[str] | None:
        if node in path:
            return path[path.index(node):] + [node]
        if node in done:
            return None
        for nxt in sorted(graph.get(node, ())):
            found = visit(nxt, [*path, node])
            if found:
                return found
        done.add(node)
        return None

    for root in sorted(graph):
        found = visit(root, [])
        if found:
            return found
    return None


def test_no_import_circle_between_modules():
    cycle = find_cycle(import_graph())
    assert cycle is None, "import circle: " + " -> ".join(cycle)


def test_the_circle_finder_sees_a_lazy_circle():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b", "c"}, "b": {"c"}, "c": set()}) is None


def test_algorithms_import_neither_lightning_nor_flower():
    for path in (PKG / "algorithms").glob("*.py"):
        src = path.read_text()
        assert "import lightning" not in src and "flwr" not in src, path
