"""Centralized and local runs resume too, to what an uninterrupted run writes.

A convergence study's centralized and local parts take an hour or more on SmolLM2; before this,
an interrupted one started over. Each run here is the tiny model with a validation split, early
stopping and local epochs (what the study runs), stopped by a hook that raises, then resumed:
the rows (but the timings), ``eval_nll.json`` (every round's per-example losses: what the study's
ratio curve pairs) and the summary's best round must equal the uninterrupted run's, and nothing
that had finished trains again.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from fedllm.config import load_recipe
from fedllm.federation.modes import Hooks, run_centralized, run_federated, run_local
from tests._resume import Cut, at_round, stop, untimed, whole_and_resumed

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "recipes" / "tiny.yaml"
OVERRIDES = ["model.quantization=none", "partition.method=iid", "partition.column=null", "partition.num_clients=3",
             "data.max_examples=36", "data.eval_size=6", "data.max_length=96", "data.validation_fraction=0.2",
             "federation.rounds=4", "train.local_steps=10", "train.local_epochs=0.5", "train.lr=0.01", "eval.patience=2",
             "eval.bleu_samples=0", "output.plots=false", "output.save_adapter=false"]


@pytest.fixture(scope="module")
def exp():
    from fedllm.experiments import make_experiment

    exp = make_experiment(load_recipe(TINY, OVERRIDES))
    fits = []
    inner = exp.fit

    def fit(client_id, examples, start, rnd, steps, *args, **kwargs):
        fits.append((client_id, rnd))
        return inner(client_id, examples, start, rnd, steps, *args, **kwargs)

    exp.fit, exp.fits = fit, fits
    return exp


def _files(run: Path) -> tuple[list[dict], dict, dict]:
    rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    strip = untimed(rows)
    for r in strip:
        for v in (r.get("per_client") or {}).values():
            v.pop("train_time_s", None)
    summary = json.loads((run / "summary.json").read_text())
    return strip, json.loads((run / "eval_nll.json").read_text()), summary.get("best")


@pytest.mark.parametrize("runner, mode, cut_off", [
    (run_centralized, "centralized", at_round(3)),
    (run_federated, "federated", at_round(3)),
    (run_local, "local", Hooks(on_client=lambda k: stop(k == 2))),
])
def test_an_interrupted_run_resumes_to_the_uninterrupted_files(exp, tmp_path, runner, mode, cut_off):
    # Prepare: one experiment, its record of fits cleared for each run
    def make():
        exp.fits.clear()
        return exp

    # Execute: whole; and stopped partway (federated/centralized at round 3, local before its third client), resumed
    whole_and_resumed(make, tmp_path, cut_off, runner)
    # Assert: the same files; only what had not finished trained again
    whole = _files(tmp_path / "whole" / "tiny" / mode)
    assert _files(tmp_path / "cut" / "tiny" / mode) == whole
    assert len(whole[1]["rounds"]) >= 3  # the ratio curve's rounds, those before the stop included
    if mode == "local":
        assert {k for k, _ in exp.fits} == {2}
    else:
        assert {r for _, r in exp.fits} <= {3, 4}


def test_local_resume_without_a_checkpoint_starts_fresh_and_a_finished_one_is_kept(exp, tmp_path):
    # Execute: --resume on nothing is a fresh run; on a finished run, nothing trains again
    first = run_local(exp, out=str(tmp_path), resume=True)
    exp.fits.clear()
    again = run_local(exp, out=str(tmp_path), resume=True)
    # Assert
    assert exp.fits == []
    assert again["best"] == first["best"]



def test_every_evaluated_round_is_on_disk_before_its_checkpoint(tmp_path):
    """A round that is not a new best still reaches eval_nll.json at once (a resume reads it back)."""
    from types import SimpleNamespace

    from fedllm.federation.convergence import RunWatch

    # Prepare
    exp = SimpleNamespace(recipe=load_recipe(TINY, OVERRIDES), data=SimpleNamespace(client_examples=lambda k: [0]))
    watch = RunWatch(exp, tmp_path)
    nll = lambda x: {"sums": [x, x], "counts": [1, 1]}  # noqa: E731
    # Execute: round 1 validates worse than round 0
    watch.observe({"round": 0, "val_loss": 1.0}, nll(1.0), None)
    watch.observe({"round": 1, "val_loss": 2.0}, nll(2.0), None)
    # Assert
    on_disk = json.loads((tmp_path / "eval_nll.json").read_text())
    assert on_disk["rounds"] == {"0": [1.0, 1.0], "1": [2.0, 2.0]}
    assert on_disk["final"]["round"] == 1 and on_disk["best"]["round"] == 0
    assert RunWatch(exp, tmp_path, [{"round": 0, "val_loss": 1.0}, {"round": 1, "val_loss": 2.0}]).nll == on_disk


def test_an_interrupted_compare_resumes_keeping_its_finished_modes(tmp_path, monkeypatch):
    """``fedllm compare --resume``: the modes that finished are kept as they are, the rest run, and the
    comparison is one invocation's (not stale); a changed recipe reruns the modes it would change."""
    import fedllm
    from fedllm.cli import main
    from fedllm.federation import modes

    # Prepare: a compare cut off when the local mode starts
    args = ["federation.rounds=1", "train.local_steps=1", "eval.bleu_samples=0", "output.plots=false",
            "output.save_adapter=false", "data.max_examples=40", "data.eval_size=6"]
    real_local = modes.RUNNERS["local"]

    def cut(*a, **k):
        raise Cut

    monkeypatch.setitem(modes.RUNNERS, "local", cut)
    with pytest.raises(Cut):
        fedllm.compare(TINY, *args, out=tmp_path, progress=False)
    monkeypatch.setitem(modes.RUNNERS, "local", real_local)
    root = tmp_path / "tiny"
    kept = {m: (root / m / "summary.json").read_bytes() for m in ("federated", "centralized")}
    assert not (root / "local" / "summary.json").exists() and not (root / "comparison.md").exists()
    # Execute
    code = main(["compare", str(TINY), *args, "--resume", "--out", str(tmp_path), "--quiet"])
    # Assert: the finished modes untouched, one invocation, a comparison that is not stale
    assert code == 0
    assert {m: (root / m / "summary.json").read_bytes() for m in kept} == kept
    ids = {json.loads((root / m / "summary.json").read_text())["invocation"] for m in ("federated", "centralized", "local")}
    assert len(ids) == 1 and "Stale" not in (root / "comparison.md").read_text()
    # Execute: --resume with another learning rate keeps nothing: the checkpoints are another recipe's
    code = main(["compare", str(TINY), *args, "train.lr=0.002", "--resume", "--out", str(tmp_path), "--quiet"])
    # Assert: one line, exit 2, nothing finished was replaced
    assert code == 2
    assert {m: (root / m / "summary.json").read_bytes() for m in kept} == kept
