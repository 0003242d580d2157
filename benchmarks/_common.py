"""Shared set-up for the benchmarks: the demo recipe with overrides, and a quiet process."""

from __future__ import annotations

import logging
import os
import sys
import warnings
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def quiet() -> None:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    warnings.filterwarnings("ignore")
    import lightning.pytorch  # noqa: F401

    for name in ("lightning", "lightning.pytorch", "transformers", "peft"):
        logging.getLogger(name).setLevel(logging.ERROR)


def demo_recipe(*overrides: str):
    from fedllm.config import load_recipe

    return load_recipe(ROOT / "recipes" / "demo.yaml", list(overrides))
