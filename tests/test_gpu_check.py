"""benchmarks/gpu_check.py runs where no GPU is: its --smoke form builds the shaped QLoRA model at toy
sizes (random weights, NF4 + LoRA on all linear layers), times fedllm's client step against a plain peft
loop, and a fused round of K clients against sequential — so a lent GPU's one short call does not fail
on a bug a CPU could have shown."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from tests.conftest import ROOT


@pytest.mark.slow
def test_gpu_check_smoke_runs_every_part_on_cpu():
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "gpu_check.py"), "--smoke"],
                          capture_output=True, text=True, timeout=900, cwd=ROOT)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    figures = {row["figure"]: row for row in (json.loads(line) for line in proc.stdout.splitlines()
                                              if line.startswith("{"))}
    qlora, fused = figures["qlora_toy"], figures["fused_k3_toy"]
    assert qlora["lora_params"] > 0 and qlora["fedllm_step_s"] > 0 and qlora["plain_step_s"] > 0
    assert fused["max_rel_delta_diff"] <= 1e-4  # fused clients' Δ equal their sequential fits
    assert fused["sequential_round_s"] > 0 and fused["fused_round_s"] > 0
    assert "gpu_check: ok (cpu)" in proc.stdout


def test_gpu_check_without_cuda_says_skipped():
    import torch

    if torch.cuda.is_available():
        pytest.skip("a CUDA device is present: the full check would run")
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "gpu_check.py")],
                          capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert proc.returncode == 0 and "skipped" in proc.stdout
