"""``eval.client_holdout``: each client keeps a seeded slice of its own data; rows score the global
model on every client's slice (and each local model on its own), with the spread in the report."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from fedllm.cli import main
from fedllm.config import RecipeError, load_recipe
from fedllm.data.build import split_client_holdout

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "recipes" / "tiny.yaml"
SMALL = ["partition.num_clients=2", "federation.rounds=2", "train.local_steps=2", "eval.bleu_samples=0",
         "data.max_examples=56", "data.eval_size=8", "output.save_adapter=false", "output.plots=false"]


def test_each_client_keeps_a_seeded_disjoint_slice_of_its_own_examples():
    clients = [list(range(0, 10)), list(range(10, 13)), [13], []]
    before = [list(c) for c in clients]
    held = split_client_holdout(clients, 0.25, seed=3)
    assert [len(h) for h in held] == [2, 1, 0, 0]  # max(1, round(0.25 n)) of n >= 2, one left to train on
    for k in range(4):
        assert sorted(clients[k] + held[k]) == before[k] and not set(clients[k]) & set(held[k])
    again = [list(c) for c in before]
    assert split_client_holdout(again, 0.25, seed=3) == held  # seeded
    untouched = [list(c) for c in before]
    assert split_client_holdout(untouched, 0.0, seed=3) == [] and untouched == before


def test_rows_score_the_models_on_each_clients_own_slice(tmp_path):
    # Execute (one round: rows 0 and 1 score the initial and a trained model, all that is asserted)
    assert main(["compare", str(TINY), *SMALL, "federation.rounds=1", "eval.client_holdout=0.25",
                 "--out", str(tmp_path)]) == 0
    root = tmp_path / "tiny"
    part = json.loads((root / "federated" / "partition.json").read_text())
    fed = [json.loads(x) for x in (root / "federated" / "metrics.jsonl").read_text().splitlines()]
    local = [json.loads(x) for x in (root / "local" / "metrics.jsonl").read_text().splitlines()]
    summary = json.loads((root / "federated" / "summary.json").read_text())
    # Assert: the slices are the clients' own rows, never trained on and not in the global split
    for k in ("0", "1"):
        own, train = set(part["client_eval"][k]), set(part["clients"][k])
        assert own and not own & train and not own & set(part["eval"])
    # every federated row scores the global model on both slices; local rows score model k on slice k
    for row in fed + local:
        assert set(row["client_eval_loss"]) == {"0", "1"}
        losses = list(row["client_eval_loss"].values())
        assert row["client_eval_loss_min"] == min(losses) and row["client_eval_loss_max"] == max(losses)
    assert local[-1]["client_eval_loss"] != fed[-1]["client_eval_loss"]
    assert summary["final"]["client_eval_loss"] == fed[-1]["client_eval_loss"]
    assert "own held-out slice" in (root / "federated" / "report.md").read_text()


def test_without_a_holdout_nothing_changes_and_vision_or_flower_refuse_it(tmp_path):
    assert main(["run", str(TINY), *SMALL, "federation.rounds=1", "--out", str(tmp_path)]) == 0
    row = json.loads((tmp_path / "tiny" / "federated" / "metrics.jsonl").read_text().splitlines()[-1])
    assert "client_eval_loss" not in row
    with pytest.raises(RecipeError, match="eval.client_holdout"):
        load_recipe(ROOT / "recipes" / "vision" / "lenet_centralized.yaml", ["eval.client_holdout=0.2"])
    with pytest.raises(RecipeError, match="eval.client_holdout"):
        load_recipe(TINY, ["eval.client_holdout=0.2", "federation.engine=flower"])
    with pytest.raises(RecipeError, match="eval.client_holdout"):
        load_recipe(TINY, ["eval.client_holdout=0.9"])
