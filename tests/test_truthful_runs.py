"""Runs that tell the truth about themselves: one writer per run directory, no resume onto another
split, and numbers written the way users write them."""

from __future__ import annotations

import pytest

from fedllm.config import RecipeError
from fedllm.federation.modes import run_federated
from fedllm.federation.rundir import RunLock
from tests._toy import ToyExperiment, toy_recipe


def test_a_second_writer_of_a_run_directory_gets_one_line(tmp_path):
    first = RunLock(tmp_path / "tiny" / "federated")
    with pytest.raises(RecipeError, match=r"--out: .*federated is being written by fedllm pid \d+"):
        RunLock(tmp_path / "tiny" / "federated")
    RunLock(tmp_path / "tiny" / "local").release()  # another mode of the same run is another directory
    first.release()
    RunLock(tmp_path / "tiny" / "federated").release()  # free again once released


def test_a_run_in_progress_locks_its_directory(tmp_path):
    class Peek(ToyExperiment):
        def fit(self, *args, **kwargs):
            with pytest.raises(RecipeError, match="being written"):
                RunLock(tmp_path / "toy" / "federated")
            return super().fit(*args, **kwargs)

    run_federated(Peek(toy_recipe(federation={"rounds": 1})), out=str(tmp_path))
    RunLock(tmp_path / "toy" / "federated").release()  # released when the run finished


def test_resume_refuses_a_changed_split(tmp_path):
    # Prepare: a run with checkpoints, then the same recipe over data of other sizes
    recipe = toy_recipe(checkpoint={"enabled": True}, federation={"rounds": 2})
    run_federated(ToyExperiment(recipe), out=str(tmp_path))
    (tmp_path / "toy" / "federated" / "summary.json").unlink()  # as if it had been killed
    changed = ToyExperiment(recipe, sizes=[9, 9, 9, 9])
    # Execute / Assert
    with pytest.raises(RecipeError, match="--resume: the data split differs"):
        run_federated(changed, out=str(tmp_path), resume=True)
    run_federated(ToyExperiment(recipe), out=str(tmp_path), resume=True)  # the same split resumes


def test_floats_as_users_write_them():
    assert toy_recipe(train={"lr": "1e-4"}).train.lr == 1e-4  # YAML 1.1 reads 1e-4 as a string
    assert toy_recipe(federation={"reject_norm": "2E3"}).federation.reject_norm == 2000.0
    with pytest.raises(RecipeError, match="train.lr: expected float"):
        toy_recipe(train={"lr": "fast"})


def test_a_comparison_says_when_its_modes_come_from_different_invocations(tiny_compare, tmp_path):
    import json
    import shutil

    from fedllm.metrics.report import write_comparison

    # Prepare: a copy of one `fedllm compare` (its three modes share one invocation id)
    root = tmp_path / "tiny"
    shutil.copytree(tiny_compare, root)
    ids = {m: json.loads((root / m / "summary.json").read_text())["invocation"]
           for m in ("federated", "centralized", "local")}
    assert len(set(ids.values())) == 1 and "Stale" not in (root / "comparison.md").read_text()
    # Execute: the local mode is rerun alone later (its summary carries no compare invocation)
    summary = json.loads((root / "local" / "summary.json").read_text())
    del summary["invocation"]
    (root / "local" / "summary.json").write_text(json.dumps(summary))
    table = write_comparison(root, ["federated", "centralized", "local"], plots=False)
    # Assert
    assert table["local"]["invocation"] is None and table["federated"]["invocation"] == ids["federated"]
    assert "**Stale comparison:**" in (root / "comparison.md").read_text()
