"""``output.loggers: [csv, tensorboard]``: every round metric and every client step loss reach
Lightning's own CSV and TensorBoard loggers; the run directory stays the source of truth."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import pytest

from fedllm.cli import main
from fedllm.config import RecipeError, load_recipe

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "recipes" / "tiny.yaml"
SMALL = ["partition.num_clients=2", "federation.rounds=2", "train.local_steps=2", "eval.bleu_samples=0",
         "data.max_examples=48", "data.eval_size=8", "output.save_adapter=false", "output.plots=false"]


def _scalars(folder: Path) -> dict[str, list[tuple[int, float]]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(folder))
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def test_every_round_metric_and_client_step_loss_reach_tensorboard_and_csv(tmp_path):
    pytest.importorskip("tensorboard")
    # Execute
    assert main(["run", str(TINY), *SMALL, "output.loggers=[csv, tensorboard]", "--out", str(tmp_path)]) == 0
    run = tmp_path / "tiny" / "federated"
    rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    scalars = _scalars(run / "logs" / "tensorboard")
    # Assert: each numeric metric of each row, at step = round, with the row's value
    for row in rows:
        for key, value in row.items():
            if key == "round" or isinstance(value, bool) or not isinstance(value, (int, float)):
                continue
            points = dict(scalars[f"round/{key}"])
            assert points[row["round"]] == pytest.approx(value, rel=1e-6, abs=1e-6) or (
                math.isnan(value) and math.isnan(points[row["round"]])), (key, row["round"])
    # each client's step losses: 2 rounds x 2 steps, on its own step axis
    for k in (0, 1):
        steps = [s for s, _ in scalars[f"client/{k}/step_loss"]]
        assert steps == [0, 1, 2, 3]
    with (run / "logs" / "csv" / "metrics.csv").open() as fh:
        table = list(csv.DictReader(fh))
    evals = [float(r["round/eval_loss"]) for r in table if r.get("round/eval_loss")]
    assert evals == pytest.approx([r["eval_loss"] for r in rows], rel=1e-6)


def test_without_loggers_no_logs_folder_and_bad_names_are_refused(tmp_path):
    assert main(["run", str(TINY), *SMALL, "federation.rounds=1", "--out", str(tmp_path)]) == 0
    assert not (tmp_path / "tiny" / "federated" / "logs").exists()
    with pytest.raises(RecipeError, match="output.loggers"):
        load_recipe(TINY, ["output.loggers=[wandb]"])
