"""The signal-propagation study's plumbing on its quick settings: parts run through the engine's
centralized path, record the JSV the run itself wrote, are not re-run, and render the README block."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import pytest

from fedllm.studies import signal

needs_data = pytest.mark.skipif(not Path("/usr/share/datasets/fashion-mnist/t10k-labels-idx1-ubyte.gz").is_file(),
                                reason="dataset-fashion-mnist is not installed")


@needs_data
def test_quick_parts_run_record_and_render(tmp_path):
    # Prepare
    out, runs, readme = tmp_path / "doc", tmp_path / "runs", tmp_path / "README.md"
    readme.write_text(f"intro\n{signal.MARK_START}\nold\n{signal.MARK_END}\ntail\n")
    args = ["--out", str(out), "--runs", str(runs), "--quick", "--models", "lenet300100", "--readme", str(readme)]
    # Execute
    assert signal.main(args) == 0
    stamps = {p.name: p.stat().st_mtime_ns for p in (out / "parts_quick").iterdir()}
    assert signal.main(args) == 0  # every part recorded for the same recipe: nothing re-runs
    # Assert: four parts (dense and 98 % random, plain and isometry), kept as they were
    assert len(stamps) == 4
    assert stamps == {p.name: p.stat().st_mtime_ns for p in (out / "parts_quick").iterdir()}
    doc = json.loads((out / "signal_study.json").read_text())
    assert doc["meta"]["done"] == doc["meta"]["planned"] == 4 and doc["meta"]["ran_now"] == 0
    res = {tuple(d["part"][1:4]): d for d in doc["results"].values()}
    for d in res.values():
        assert set(d["jsv"]) == {"body.1.weight", "body.3.weight", "head.weight"}
        assert all(set(s) == {"mean", "min", "max"} for s in d["jsv"].values())
        assert [r["round"] for r in d["rows"]] == [0, 1, 2] and 0 <= d["final_accuracy"] <= 1
    # the JSV are the engine's own: the run's summary.json machine.signal
    name = signal.part_name("lenet300100", 0.98, "random", "isometry", 0)
    summary = json.loads((runs / f"signal_{name}" / "centralized" / "summary.json").read_text())
    assert res[(0.98, "random", "isometry")]["jsv"] == summary["machine"]["signal"]["after"]
    dense, pruned = res[(0.0, "none", "plain")]["jsv"], res[(0.98, "random", "plain")]["jsv"]
    iso = res[(0.98, "random", "isometry")]["jsv"]
    for k in dense:
        assert pruned[k]["mean"] < dense[k]["mean"]  # pruning shrinks every layer's singular values
        assert abs(iso[k]["mean"] - 1) < abs(pruned[k]["mean"] - 1)  # isometry brings them back toward 1
    assert signal.mean_jsv(res[(0.0, "none", "isometry")]["jsv"]) == pytest.approx(1.0, abs=1e-3)
    # the README block and the docs are rendered from the JSON
    text = readme.read_text()
    assert text.startswith("intro\n") and text.endswith("tail\n") and "old" not in text
    assert signal.readme_block(doc) in text and "4 of 4 parts finished" in text
    assert f"{signal.mean_jsv(iso):.3f}" in text and "| 98% | random | isometry |" in text
    assert (out / "signal_study.png").is_file() and (out / "signal_study.md").is_file()


def test_plan_and_part_names():
    parts = signal.plan(["lenet300100", "cnn"], [0, 1])
    assert len(parts) == 2 * 2 * (2 + 4 * 2 * 2)  # seeds × models × (dense × 2 inits + 4 sparsities × 2 masks × 2)
    assert len({signal.part_name(*p) for p in parts}) == len(parts)
    assert signal.parse_part("cnn:0.99:snip:isometry:1") == ("cnn", 0.99, "snip", "isometry", 1)
    assert "prune.remaining=0.01" in signal.part_overrides(("cnn", 0.99, "snip", "isometry", 1), False)
    with pytest.raises(argparse.ArgumentTypeError):
        signal.parse_part("cnn:0:snip:plain:0")  # sparsity 0 has no mask
