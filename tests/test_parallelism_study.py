"""The data-parallelism study's plumbing on its quick settings (points run through the engine's own
runners, are recorded, are not re-run, render the report and the README block) and its numbers:
steps-to-result, the c₁/B + c₂ fit, the regimes, the learning-rate search."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from fedllm.studies import parallelism as par

needs_data = pytest.mark.skipif(not Path("/usr/share/datasets/fashion-mnist/t10k-labels-idx1-ubyte.gz").is_file(),
                                reason="dataset-fashion-mnist is not installed")


@needs_data
def test_quick_points_run_record_resume_and_render(tmp_path):
    # Prepare
    out, runs, readme = tmp_path / "doc", tmp_path / "runs", tmp_path / "README.md"
    readme.write_text(f"intro\n{par.MARK_START}\nold\n{par.MARK_END}\ntail\n")
    args = ["--out", str(out), "--runs", str(runs), "--quick", "--readme", str(readme)]
    # Execute: two shards, as two parallel processes would, then the whole grid again
    assert par.main([*args, "--shard", "0/2"]) == 0
    assert par.main([*args, "--shard", "1/2"]) == 0
    stamps = {p.name: p.stat().st_mtime_ns for p in (out / "parts_quick").iterdir()}
    assert par.main(args) == 0  # every point recorded for the same recipe and search: nothing re-runs
    # Assert: one part per point of the quick grid, kept as it was
    points = par.plan(quick=True)
    assert sorted(stamps) == sorted(f"{par.part_name(*p)}.json" for p in points)
    assert stamps == {p.name: p.stat().st_mtime_ns for p in (out / "parts_quick").iterdir()}
    doc = json.loads((out / "parallelism.json").read_text())
    assert doc["meta"]["done"] == doc["meta"]["planned"] == len(points) and doc["meta"]["ran_now"] == 0
    for point in points:
        rec = doc["results"][par.part_name(*point)]
        s = rec["search"]
        assert "k_star" in rec and len(rec["trials"]) == len(s["lrs"]) == par.QUICK["trials"]
        ks = [t["k"] for t in rec["trials"] if t["k"] is not None]
        assert rec["k_star"] == (min(ks) if ks else None)
        assert all(t["cap"] <= s["cap"] and t["status"] in ("reached", "never", "not before the best so far")
                   for t in rec["trials"])
        # K* is the engine's own: the best trial's run, read back from its metrics.jsonl
        if rec["k_star"] is not None:
            i = [t["k"] for t in rec["trials"]].index(rec["k_star"])
            name = f"parallelism_{par.part_name(*point)}_t{i}"
            rows = [json.loads(line) for line in (runs / name / point[0] / "metrics.jsonl").read_text().splitlines()]
            assert par.steps_to_result(rows, s["target"], s["per_round"]) == rec["k_star"]
    assert any(r["k_star"] is not None for r in doc["results"].values())
    assert set(doc["fits"]) == {"centralized", "federated"}
    # the report, the plot and the README block are rendered from the JSON
    text = readme.read_text()
    assert text.startswith("intro\n") and text.endswith("tail\n") and "old" not in text
    assert par.readme_block(doc) in text and f"{len(points)} of {len(points)} points finished" in text
    assert (out / "parallelism.png").stat().st_size > 0 and (out / "parallelism.md").is_file()
    assert par.table(doc, "centralized") in (out / "parallelism.md").read_text()


@needs_data
def test_a_point_interrupted_midway_reuses_its_finished_trials(tmp_path, monkeypatch):
    # Prepare: run one quick point, then forget its part (as if the process died before writing it)
    out, runs = tmp_path / "doc", tmp_path / "runs"
    args = ["--out", str(out), "--runs", str(runs), "--quick", "--part", "centralized:128:0"]
    assert par.main(args) == 0
    first = json.loads((out / "parts_quick" / "centralized_b0128_sp0000.json").read_text())
    (out / "parts_quick" / "centralized_b0128_sp0000.json").unlink()
    from fedllm.federation import modes

    def no_training(*a, **kw):
        raise AssertionError("a finished trial ran again")

    monkeypatch.setitem(modes.RUNNERS, "centralized", no_training)
    # Execute
    assert par.main(args) == 0
    # Assert: the same result, read from the finished runs
    again = json.loads((out / "parts_quick" / "centralized_b0128_sp0000.json").read_text())
    assert again["k_star"] == first["k_star"] and [t["k"] for t in again["trials"]] == [t["k"] for t in first["trials"]]


def test_steps_to_result_is_the_first_evaluation_that_reaches_the_target():
    rows = [{"round": 0, "accuracy": 0.9},  # the initial state never counts
            {"round": 1, "accuracy": 0.5}, {"round": 2, "accuracy": None}, {"round": 3, "accuracy": float("nan")},
            {"round": 4, "accuracy": 0.81}, {"round": 5, "accuracy": 0.7}, {"round": 6, "accuracy": 0.9}]
    assert par.steps_to_result(rows, 0.8, per_round=25) == 100.0
    assert par.steps_to_result(rows, 0.81) == 4.0  # reaching it exactly counts
    assert par.steps_to_result(rows, 0.95, per_round=25) == math.inf
    assert par.steps_to_result([], 0.1) == math.inf


def test_fit_recovers_known_constants_and_regimes():
    batches = [2, 4, 8, 16, 32, 64, 128, 256, 512, 1024]
    c1, c2 = 9000.0, 380.0
    fit = par.fit_scaling(batches, [c1 / b + c2 for b in batches])
    assert fit == pytest.approx((c1, c2), rel=1e-9)
    # points that never reached the target (∞, None) are left out of the fit
    assert par.fit_scaling([*batches, 4096], [c1 / b + c2 for b in batches] + [math.inf]) == pytest.approx((c1, c2))
    assert par.fit_scaling([8, 16], [c1 / 8 + c2, None]) is None  # one point fits nothing
    # pure linear scaling (no c₂) and a flat curve (no c₁) stay non-negative
    assert par.fit_scaling(batches, [1000 / b for b in batches]) == pytest.approx((1000, 0), abs=1e-6)
    assert par.fit_scaling(batches, [50.0] * len(batches)) == pytest.approx((0, 50), abs=1e-6)
    reg = par.regimes(c1, c2)
    crit = c1 / c2
    assert reg == pytest.approx({"critical": crit, "linear_until": crit / 4, "maximal_from": 4 * crit})
    for b, slope in ((reg["linear_until"], par.LINEAR_SLOPE), (reg["maximal_from"], par.FLAT_SLOPE)):
        assert -(c1 / b) / (c1 / b + c2) == pytest.approx(slope)  # the fit's log-log slope at the bound
    assert par.regimes(1000, 0)["linear_until"] == math.inf


def test_learning_rate_search_is_seeded_stratified_and_middle_out():
    point = ("centralized", 64, 0.9)
    lrs = par.lr_trials(point, quick=False)
    assert lrs == par.lr_trials(point, quick=False) != par.lr_trials(("centralized", 128, 0.9), quick=False)
    lo, hi = par.LR_RANGE
    octave = [math.floor(math.log(lr / lo, hi / lo) * par.TRIALS) for lr in lrs]
    assert octave == [3, 4, 2, 5, 1, 6, 0, 7]  # one draw per stratum, the middle first


def test_plan_caps_and_part_names():
    points = par.plan(quick=False)
    assert len(points) == len(par.BATCHES) * len(par.SPARSITIES) + len(par.CLIENTS) * len(par.FED_SPARSITIES)
    assert len({par.part_name(*p) for p in points}) == len(points)
    every, rounds = par.cap(("centralized", 64, 0.98), quick=False)
    assert rounds == par.ROUNDS and every * rounds >= 60000 / 64 + 1600
    r = par.point_recipe(("federated", 8, 0.9), quick=False)
    assert r.mode == "federated" and r.clients_per_round == 8 and r.train.local_steps == par.FED_LOCAL_STEPS
    assert r.prune.method == "snip" and r.prune.remaining == pytest.approx(0.1)
    assert par.parse_part("federated:8:0") == ("federated", 8, 0.0)


@pytest.mark.parametrize("bad", ["centralized:64", "centralized:x:0.9", "centralized:3:0.9", "federated:8:0.98",
                                 "serverless:64:0"])
def test_bad_part_is_a_clear_argparse_error(bad, capsys):
    with pytest.raises(SystemExit) as exc:
        par.main(["--part", bad, "--report-only"])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert "--part" in err and ("MODE:DEGREE:SPARSITY" in err or "no point" in err)


def test_bad_shard_is_a_clear_argparse_error(capsys):
    with pytest.raises(SystemExit) as exc:
        par.main(["--shard", "2/2", "--report-only"])
    assert exc.value.code == 2 and "0 <= I < N" in capsys.readouterr().err
