"""``federation.personalize: shared_a`` (FedSA-LoRA): the clients share A, each keeps and resumes its
own B, and every evaluation scores each personal model on its own client's held-out slice."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from fedllm.cli import main
from fedllm.config import RecipeError, load_recipe

ROOT = Path(__file__).resolve().parents[1]
RECIPE = ROOT / "recipes" / "examples" / "fedsa_lora.yaml"
SHORT = ["eval.bleu_samples=0", "output.plots=false", "train.lr=0.01"]


def _rows(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").open()]


def _adapter(path: Path) -> dict[str, torch.Tensor]:
    return load_file(str(path / "adapter_model.safetensors"))


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("fedsa")
    assert main(["run", str(RECIPE), "--out", str(out), *SHORT]) == 0
    return out / "fedsa_lora" / "federated"


def test_personal_models_are_scored_on_their_own_slices_beside_the_global_one(run):
    rows = _rows(run)
    for row in rows[1:]:
        assert set(row["personal_eval_loss"]) == set(row["client_eval_loss"]) == {"0", "1", "2"}
        assert row["personal_eval_loss_min"] <= row["personal_eval_loss_mean"] <= row["personal_eval_loss_max"]
        assert row["personal_eval_loss"] != row["client_eval_loss"]  # personal B differs from the global B
    summary = json.loads((run / "summary.json").read_text())
    assert summary["final"]["personal_eval_loss"] == rows[-1]["personal_eval_loss"]
    assert rows[-1]["personal_eval_loss_mean"] < rows[0]["client_eval_loss_mean"]  # they learned


def test_a_is_shared_b_is_each_clients_own_and_the_global_b_is_their_mean(run):
    glob = _adapter(run / "adapter")
    personal = [_adapter(run / "personal" / f"client_{k}") for k in range(3)]
    a_keys = [k for k in glob if "lora_A" in k]
    b_keys = [k for k in glob if "lora_B" in k]
    assert a_keys and b_keys
    for p in personal:  # one shared A
        assert all(torch.equal(p[k], glob[k]) for k in a_keys)
    for i in range(3):  # B is personal
        for j in range(i + 1, 3):
            assert any(not torch.equal(personal[i][k], personal[j][k]) for k in b_keys)
    # gradualdiff with every client each round: the server's B is the mean of the clients' latest B
    for k in b_keys:
        torch.testing.assert_close(glob[k], sum(p[k] for p in personal) / 3, rtol=0, atol=1e-6)


def test_personal_adapters_resume_to_the_uninterrupted_result(run, tmp_path):
    copy = tmp_path / "fedsa_lora" / "federated"
    shutil.copytree(run, copy)
    (copy / "checkpoints" / "ckpt_3.pt").unlink()  # as if killed during round 3
    shutil.rmtree(copy / "personal")
    assert main(["run", str(RECIPE), "--out", str(tmp_path), "--resume", *SHORT]) == 0
    assert _rows(copy)[-1]["personal_eval_loss"] == _rows(run)[-1]["personal_eval_loss"]
    for k in range(3):
        want, got = _adapter(run / "personal" / f"client_{k}"), _adapter(copy / "personal" / f"client_{k}")
        assert all(torch.equal(want[key], got[key]) for key in want)


@pytest.mark.parametrize(("overrides", "field"), [
    (["eval.client_holdout=0"], "eval.client_holdout"),
    (["federation.lora_aggregation=frozen_a"], "federation.lora_aggregation"),
    (["federation.lora_aggregation=svd"], "federation.lora_aggregation"),
    (["federation.personalize=local_b"], "federation.personalize"),
])
def test_bad_personalization_names_the_field(overrides, field):
    with pytest.raises(RecipeError) as err:
        load_recipe(RECIPE, overrides)
    assert err.value.where == field
