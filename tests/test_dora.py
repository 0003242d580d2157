"""``lora.method: dora``: peft's weight-decomposed LoRA, whose per-layer magnitude vectors travel
with the factors and are aggregated as they are (GradualDiff: the global plus the clients' mean Δ)."""

from __future__ import annotations

from pathlib import Path

import torch

from fedllm.config import load_recipe
from fedllm.experiments.lm import LMExperiment
from fedllm.federation.modes import run_federated

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "recipes" / "tiny.yaml"


def test_dora_magnitudes_are_trained_exchanged_and_averaged(tmp_path):
    recipe = load_recipe(TINY, ["lora.method=dora", "federation.rounds=1", "train.local_steps=2", "eval.bleu_samples=0",
                                "output.plots=false", "partition.num_clients=2"])
    exp = LMExperiment(recipe)
    magnitudes = [k for k in exp.initial_state if "lora_magnitude_vector" in k]
    assert len(magnitudes) == 2 * len(exp.model.get_base_model().model.layers)  # q and v of every layer
    start = {k: v.clone() for k, v in exp.initial_state.items()}
    seen = []
    fit = exp.fit

    def recording(*args, **kwargs):
        seen.append(fit(*args, **kwargs))
        return seen[-1]

    exp.fit = recording
    run_federated(exp, out=str(tmp_path))
    assert len(seen) == 2 and all(float(u.delta[k].abs().max()) > 0 for u in seen for k in magnitudes)
    from safetensors.torch import load_file

    saved = load_file(str(tmp_path / recipe.name / "federated" / "adapter" / "adapter_model.safetensors"))
    for k in magnitudes + [k for k in start if "lora_B" in k][:2]:
        want = start[k] + (seen[0].delta[k] + seen[1].delta[k]) / 2
        torch.testing.assert_close(saved[k], want, rtol=0, atol=1e-7)
    from peft import PeftConfig

    assert PeftConfig.from_pretrained(str(tmp_path / recipe.name / "federated" / "adapter")).use_dora
