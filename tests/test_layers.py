"""Imports flow one way (ARCHITECTURE.md): lower layers never import higher ones."""

import ast
from pathlib import Path

PKG = Path(__file__).resolve().parents[1] / "fedllm"
ORDER = ["types", "config", "data", "models", "algorithms", "client", "federation", "metrics", "cli"]
RANK = {"errors": 0, "types": 0, "config": 1, "data": 2, "models": 2, "algorithms": 3, "client": 4, "federation": 5,
        "metrics": 6, "studies": 7, "cli": 7}


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


def test_algorithms_import_neither_lightning_nor_flower():
    for path in (PKG / "algorithms").glob("*.py"):
        src = path.read_text()
        assert "import lightning" not in src and "flwr" not in src, path
