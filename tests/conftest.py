"""Shared fixtures: one tiny three-mode run reused by the end-to-end tests (keeps CI fast)."""

from __future__ import annotations

import logging
import os
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "recipes" / "tiny.yaml"

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def pytest_sessionstart(session):
    """Print the machine first (also under ``-q``, which hides pytest's own header)."""
    reporter = session.config.pluginmanager.get_plugin("terminalreporter")
    if reporter is not None:
        for line in _machine_lines():
            reporter.write_line(line)


def _machine_lines() -> list[str]:
    """The machine a failure happened on: CPU flags that change bitsandbytes' kernels, and the kernel used."""
    from fedllm.models.quant import bnb_says_avx512_bf16, kernel_info

    info = kernel_info()
    flags = [f for f in ("avx512f", "avx512_bf16", "amx_bf16") if f in _cpu_flags()]
    return [f"fedllm machine: CPU flags {' '.join(flags) or 'none of avx512f/avx512_bf16/amx_bf16'}; "
            f"bitsandbytes {info['bitsandbytes']} sees AVX512-BF16: {bnb_says_avx512_bf16()}; "
            f"CUDA: {info['cuda'] or 'none'}; torch {info['torch']}",
            "fedllm 4-bit kernel: exact (bitsandbytes' AVX512-BF16 packing is switched off by fedllm's loader)"]


def _cpu_flags() -> set[str]:
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        return set()
    return {f for line in lines if line.startswith("flags") for f in line.split(":", 1)[1].split()}


@pytest.fixture(scope="session")
def tiny_recipe():
    from fedllm.config import load_recipe

    return load_recipe(TINY)


@pytest.fixture(scope="session")
def tiny_experiment(tiny_recipe):
    from fedllm.experiments.lm import LMExperiment

    return LMExperiment(tiny_recipe)


@pytest.fixture(scope="session")
def tiny_compare(tmp_path_factory):
    """`fedllm compare recipes/tiny.yaml` once, through the real CLI entry point."""
    from fedllm.cli import main

    out = tmp_path_factory.mktemp("runs")
    assert main(["compare", str(TINY), "--out", str(out)]) == 0
    return out / "tiny"


@pytest.fixture(scope="session")
def tiny_run_dir(tmp_path_factory) -> Path:
    """The short trained tiny run of tests/_tiny_run.py, shared by the export, generate and chat tests."""
    from tests._tiny_run import tiny_run

    return tiny_run(tmp_path_factory.getbasetemp() / "usage_run")


@pytest.fixture(scope="session")
def tiny_run_model(tiny_run_dir):
    """``(recipe, model, tokenizer)`` of that run as ``fedllm chat`` loads it (NF4 base + adapter), loaded
    once per session: the tests that share it only read it (generation, forward passes)."""
    from fedllm.serve import load_run_model

    return load_run_model(tiny_run_dir)


@pytest.fixture(autouse=True)
def _fedllm_log_level():
    """Each test starts with the ``fedllm`` logger's level as the session had it: a study's entry
    point run in-process (``quiet_process``) sets it to ERROR, which would hide the warnings a later
    test reads through ``caplog``."""
    logger = logging.getLogger("fedllm")
    level = logger.level
    yield
    logger.setLevel(level)

