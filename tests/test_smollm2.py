"""One short real run: SmolLM2-135M-Instruct from its GGUF wheel, 4-bit NF4 + LoRA, two clients."""

import json
import math

import pytest

from fedllm.cli import main
from tests.conftest import ROOT


@pytest.mark.slow
def test_smollm2_4bit_federated_round(tmp_path):
    code = main(["run", str(ROOT / "recipes/demo.yaml"), "name=smol", "federation.rounds=1",
                 "partition.num_clients=2", "train.local_steps=2", "train.batch_size=2",
                 "data.max_length=64", "data.max_examples=60", "data.eval_size=4",
                 "eval.bleu_samples=2", "eval.max_new_tokens=8", "--out", str(tmp_path)])
    assert code == 0
    rows = [json.loads(x) for x in (tmp_path / "smol/federated/metrics.jsonl").read_text().splitlines()]
    assert [r["round"] for r in rows] == [0, 1]
    # a real instruct model on real text: far below the uniform baseline ln(49,152) ≈ 10.8
    assert rows[0]["eval_loss"] < 0.75 * math.log(49152)
    assert rows[1]["bytes_up"] > 0 and rows[1]["train_loss"] is not None
    from fedllm.config import ModelConfig
    from fedllm.models.llm import load_base

    base, _ = load_base(ModelConfig(), 0)
    assert type(base.model.layers[0].self_attn.q_proj).__name__ == "Linear4bit"


@pytest.mark.slow
def test_smollm2_dpsgd_one_round(tmp_path):
    code = main(["run", str(ROOT / "recipes/demo.yaml"), "name=smol_dpsgd", "federation.rounds=1",
                 "federation.algorithm=gradualdiff", "partition.num_clients=2", "train.local_steps=2",
                 "train.batch_size=2", "data.max_length=64", "data.max_examples=60", "data.eval_size=4",
                 "eval.bleu_samples=0", "privacy.dpsgd=true", "privacy.dpsgd_noise=1.0",
                 "privacy.dpsgd_clip=1.0", "--out", str(tmp_path)])
    assert code == 0
    rows = [json.loads(x) for x in (tmp_path / "smol_dpsgd/federated/metrics.jsonl").read_text().splitlines()]
    summary = json.loads((tmp_path / "smol_dpsgd/federated/summary.json").read_text())
    assert rows[1]["applied"] and 0 < rows[1]["epsilon_dpsgd"] < math.inf
    assert summary["final"]["epsilon_dpsgd"] == rows[1]["epsilon_dpsgd"]
    assert rows[1]["eval_loss"] != rows[0]["eval_loss"]  # the noised LoRA update moved the model
