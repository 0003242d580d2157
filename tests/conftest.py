"""Shared fixtures: one tiny three-mode run reused by the end-to-end tests (keeps CI fast)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "recipes" / "tiny.yaml"

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(scope="session")
def tiny_recipe():
    from fedllm.config import load_recipe

    return load_recipe(TINY)


@pytest.fixture(scope="session")
def tiny_experiment(tiny_recipe):
    from fedllm.federation.experiment import LMExperiment

    return LMExperiment(tiny_recipe)


@pytest.fixture(scope="session")
def tiny_compare(tmp_path_factory):
    """`fedllm compare recipes/tiny.yaml` once, through the real CLI entry point."""
    from fedllm.cli import main

    out = tmp_path_factory.mktemp("runs")
    assert main(["compare", str(TINY), "--out", str(out)]) == 0
    return out / "tiny"
