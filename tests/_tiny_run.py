"""One short trained tiny run shared by the export and generate/chat tests (one per test process).

``fedllm run recipes/tiny.yaml --mode centralized`` for one round of 8 steps at lr 0.05: far from a
good model, but enough that the trained adapter's greedy answers differ from the base's. BLEU is
off (``eval.bleu_samples=0``) to keep it at about half a minute on CPU. Tests reach it through
conftest's session fixtures ``tiny_run_dir`` (the directory) and ``tiny_run_model`` (its model, loaded once).
"""

from __future__ import annotations

import functools
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "recipes" / "tiny.yaml"
OVERRIDES = ["federation.rounds=1", "eval.bleu_samples=0", "train.lr=0.05", "train.local_steps=8"]


@functools.cache
def tiny_run(root: Path) -> Path:
    """Train the run under ``root`` once per process; returns its run directory."""
    from fedllm.cli import main

    assert main(["run", str(TINY), "--mode", "centralized", "--out", str(root), *OVERRIDES]) == 0
    return root / "tiny" / "centralized"
