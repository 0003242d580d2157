"""Issue 34's machinery: local epochs as the unit of a round, the validation split with its best
round and early stopping, and the paired perplexity ratio of every comparison."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from fedllm.config import RecipeError, load_recipe
from fedllm.federation import build
from fedllm.federation.convergence import Watch, mean_nll, paired_log_ratio, ratio_with_interval

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "recipes" / "tiny.yaml"
FAST = ["eval.bleu_samples=0", "output.plots=false", "data.max_examples=60", "data.eval_size=8"]


def _rows(path: Path) -> list[dict]:
    return [json.loads(x) for x in (path / "metrics.jsonl").read_text().splitlines()]


# ----------------------------------------------------------------------------- 1. local epochs


def test_local_epochs_and_an_explicit_local_steps_are_exclusive():
    with pytest.raises(RecipeError, match="train.local_steps.*either"):
        load_recipe(TINY, ["train.local_epochs=1"])  # tiny.yaml sets local_steps: 3
    assert load_recipe(TINY, ["train.local_steps=10", "train.local_epochs=0.25"]).train.local_epochs == 0.25
    with pytest.raises(RecipeError, match="train.local_epochs"):
        load_recipe(TINY, ["train.local_steps=10", "train.local_epochs=0"])


def test_an_epoch_is_every_example_once_in_each_mode():
    r = load_recipe(TINY, ["train.local_steps=10", "train.local_epochs=1", "train.batch_size=4"])
    assert build.steps_per_epoch(r, 30) == 8 and build.local_steps(r, 30) == 8  # ceil(30 / 4) batches
    assert build.centralized_steps(r, [30, 27, 26]) == 21  # the pooled 83 examples once, not 8 + 7 + 7
    assert build.data_passes(r, 30, 8) == 1.0
    two = load_recipe(TINY, ["train.local_steps=10", "train.local_epochs=2", "train.grad_accum=3"])
    assert build.local_steps(two, 30) == 2 * 3  # 8 batches = 3 optimizer steps (the last one short)
    quarter = load_recipe(TINY, ["train.local_steps=10", "train.local_epochs=0.25"])
    assert build.local_steps(quarter, 30) == 2 and build.data_passes(quarter, 30, 2) == 0.25
    steps = load_recipe(TINY)  # local_steps recipes keep their numbers: centralized = the clients' sum
    assert build.centralized_steps(steps, [30, 27, 26]) == 9 and build.local_steps(steps, 30) == 3


# ----------------------------------------------------------------------------- 2. validation


def test_the_validation_split_comes_from_the_clients_training_data(tiny_experiment):
    from fedllm.data.build import build_text_data

    r = load_recipe(TINY, ["data.validation_fraction=0.2"])
    data = build_text_data(r, tiny_experiment.tokenizer)
    plain = tiny_experiment.data
    assert data.eval_idx == plain.eval_idx  # the held-out split is untouched
    train = [i for part in data.clients for i in part]
    assert data.val_idx and not set(data.val_idx) & set(train) and not set(data.val_idx) & set(data.eval_idx)
    assert sorted(train + data.val_idx) == sorted(i for part in plain.clients for i in part)
    for part, before in zip(data.clients, plain.clients):  # a fifth of every client's examples
        assert len(before) - len(part) == max(1, round(0.2 * len(before)))
    assert build_text_data(r, tiny_experiment.tokenizer).val_idx == data.val_idx  # seeded
    assert "validation" in data.partition_json() and "validation" not in plain.partition_json()
    with pytest.raises(RecipeError, match="eval.patience"):
        load_recipe(TINY, ["eval.patience=2"])  # early stopping needs the split


def test_watch_finds_the_lowest_validation_loss_and_counts_patience():
    w = Watch(patience=2)
    assert w.see(0, 3.0) and not w.see(1, None)  # a round without evaluation counts for nothing
    assert w.see(2, 2.0) and not w.see(3, 2.0) and not w.stopped  # equal is not better
    assert not w.see(4, float("nan")) and w.stopped and w.best_round == 2 and w.best_val == 2.0


def test_every_mode_keeps_its_best_validation_round_and_stops_on_patience(tmp_path, tiny_experiment):
    from fedllm.experiments.lm import LMExperiment
    from fedllm.federation.modes import run_centralized, run_federated, run_local

    r = load_recipe(TINY, [*FAST, "train.local_steps=10", "train.local_epochs=1", "train.lr=0.02",
                           "data.validation_fraction=0.2", "eval.patience=1", "federation.rounds=3"])
    exp = LMExperiment(r)
    for run in (run_federated, run_centralized, run_local):
        summary = run(exp, out=str(tmp_path))
        path = tmp_path / "tiny" / summary["mode"]
        rows = _rows(path)
        epochs = [row["epochs"] for row in rows]
        if summary["mode"] == "local":  # the mean over clients; a client that stopped adds no more passes
            assert epochs[:2] == pytest.approx([0.0, 1.0]) and epochs == sorted(epochs) and epochs[-1] <= len(rows) - 1
        else:
            assert epochs == pytest.approx([float(i) for i in range(len(rows))])
        vals = [(row["val_loss"], row["round"]) for row in rows]
        best = min(vals)[1] if summary["mode"] != "local" else None
        nll = json.loads((path / "eval_nll.json").read_text())
        final = nll["final"]
        assert math.isclose(sum(final["sums"]) / sum(final["counts"]), rows[-1]["eval_loss"], rel_tol=1e-9)
        assert summary["train_unit"]["unit"] == "epochs" and summary["train_unit"]["epochs"] == epochs[-1]
        if best is not None:
            assert summary["best"]["round"] == best and summary["best"]["eval_loss"] == rows[best]["eval_loss"]
            assert math.isclose(sum(nll["best"]["sums"]) / sum(nll["best"]["counts"]), rows[best]["eval_loss"],
                                rel_tol=1e-9)
            assert (path / "adapter_best" / "adapter_model.safetensors").is_file()
            if "stopped_early" in summary:  # stopped after one evaluation without a new best
                assert rows[-1]["round"] == best + 1
        else:
            assert set(summary["best"]["round"]) == {"0", "1", "2"}
            assert (path / "adapter_best" / "client_0" / "adapter_model.safetensors").is_file()


def test_patience_stops_a_run_that_no_longer_improves(tmp_path):
    from fedllm.cli import main

    assert main(["run", str(TINY), "--mode", "centralized", "--out", str(tmp_path), *FAST, "train.lr=0",
                 "train.noop_guard=warn", "data.validation_fraction=0.2", "eval.patience=2",
                 "federation.rounds=6", "output.save_adapter=false"]) == 0
    rows = _rows(tmp_path / "tiny" / "centralized")
    summary = json.loads((tmp_path / "tiny" / "centralized" / "summary.json").read_text())
    assert [row["round"] for row in rows] == [0, 1, 2]  # lr 0: round 0 stays best, two evaluations later it stops
    assert summary["best"]["round"] == 0 and summary["stopped_early"] == {"round": 2, "patience": 2}


# ----------------------------------------------------------------------------- 5. the paired ratio


def test_the_paired_ratio_is_the_perplexity_ratio_with_its_interval():
    a = {"sums": [3.0, 8.0, 1.0], "counts": [2, 4, 1]}
    b = {"sums": [2.0, 6.0, 1.5], "counts": [2, 4, 1]}
    r = ratio_with_interval(a, b)
    assert math.isclose(r["ratio"], math.exp(12 / 7 - 9.5 / 7), rel_tol=1e-12)
    assert r["lo"] < r["ratio"] < r["hi"] and r["examples"] == 3
    assert paired_log_ratio(a, b)[0] == r["log_ratio"]
    with pytest.raises(ValueError, match="different examples"):
        ratio_with_interval(a, {"sums": [1.0], "counts": [1]})
    # local mode: the mean over clients' sums has the mean of their token-weighted losses
    m = mean_nll([a, b])
    assert math.isclose(sum(m["sums"]) / 7, (12 / 7 + 9.5 / 7) / 2, rel_tol=1e-12)


def test_compare_prints_and_writes_the_ratios(tiny_compare, capsys):
    from fedllm.cli import _print_ratios

    table = json.loads((tiny_compare / "comparison.json").read_text())
    assert set(table) == {"federated", "centralized", "local"}  # still one row per mode
    fed, cen, loc = table["federated"], table["centralized"], table["local"]
    assert fed["ppl_ratio_of"] == "federated/centralized" and loc["ppl_ratio_of"] == "local/federated"
    assert math.isclose(fed["ppl_ratio"], fed["final_perplexity"] / cen["final_perplexity"], rel_tol=1e-9)
    assert math.isclose(loc["ppl_ratio"], loc["final_perplexity"] / fed["final_perplexity"], rel_tol=1e-9)
    assert fed["ppl_ratio_lo"] <= fed["ppl_ratio"] <= fed["ppl_ratio_hi"]
    assert "ppl_ratio" not in cen
    md = (tiny_compare / "comparison.md").read_text()
    assert f"federated/centralized perplexity: {fed['ppl_ratio']:.4f} (95 % paired interval" in md
    _print_ratios(tiny_compare)  # what `fedllm compare` prints after its table
    out = capsys.readouterr().out
    assert f"federated/centralized perplexity: {fed['ppl_ratio']:.4f}" in out and "local/federated" in out
