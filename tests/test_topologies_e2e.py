"""Gossip and clustered FL end to end on the tiny 4-bit LoRA model, through the real CLI: ``fedllm
compare`` on a gossip recipe, ``fedllm run`` on an IFCA recipe and ``fedllm export --cluster``.
A few steps each (the update rules themselves are checked by hand in ``tests/test_topologies.py``)."""

from __future__ import annotations

import json

from fedllm.cli import main
from tests.conftest import TINY

SMALL = ["federation.rounds=1", "train.local_steps=1", "eval.bleu_samples=0", "data.max_examples=60",
         "data.eval_size=4", "partition.method=iid"]


def _rows(path) -> list[dict]:
    return [json.loads(line) for line in (path / "metrics.jsonl").read_text().splitlines() if line.strip()]


def test_gossip_compare_on_the_tiny_model(tmp_path):
    assert main(["compare", str(TINY), "--out", str(tmp_path), *SMALL, "partition.num_clients=4",
                 "federation.topology=gossip", "checkpoint.enabled=false"]) == 0
    root = tmp_path / "tiny"
    last = _rows(root / "federated")[-1]
    assert last["clients"] == [0, 1, 2, 3] and last["bytes_down"] == 0
    assert last["consensus_distance"] < last["consensus_distance_trained"]  # a ring of 4 mixes, not averages
    assert (root / "federated" / "personal" / "client_3" / "adapter_config.json").is_file()
    comparison = json.loads((root / "comparison.json").read_text())
    assert {"federated", "centralized", "local"} <= set(json.dumps(comparison).split('"'))


def test_ifca_run_and_export_of_one_cluster(tmp_path, capsys):
    assert main(["run", str(TINY), "--out", str(tmp_path), *SMALL, "partition.num_clients=3",
                 "federation.clusters=2", "eval.client_holdout=0.25", "checkpoint.enabled=false"]) == 0
    run = tmp_path / "tiny" / "federated"
    last = _rows(run)[-1]
    assert sum(last["cluster_sizes"]) == 3 and set(last["cluster_assignment"]) == {"0", "1", "2"}
    assert len(last["cluster_eval_loss"]) == 2 and last["eval_cluster"] in (0, 1)
    assert set(last["personal_eval_loss"]) == {"0", "1", "2"}  # each client under its cluster's model
    clusters = json.loads((run / "clusters.json").read_text())
    assert clusters["clusters"] == 2 and len(clusters["rounds"][0]["probe_losses"]["0"]) == 2
    assert main(["export", str(run), "--out", str(tmp_path / "c1"), "--cluster", "1"]) == 0
    info = json.loads((tmp_path / "c1" / "fedllm_export.json").read_text())
    assert info["cluster"] == 1 and info["run_final_eval_loss"] == last["cluster_eval_loss"][1]
    capsys.readouterr()
    assert main(["export", str(run), "--out", str(tmp_path / "c9"), "--cluster", "9"]) == 2
    assert "--cluster: expected a cluster in [0, 2)" in capsys.readouterr().err
