"""Asynchronous edge learning: the schedule (lag, never-return), the protocol on tiny data, the
edge recipe and ``fedllm edge``, the report, and the reduced study end to end."""

import json
import math
from pathlib import Path

import pytest
import torch

from fedllm.cli import main as cli
from fedllm.config import RecipeError
from fedllm.data.vision import FILES, VisionData
from fedllm.edge.recipe import EdgeLag, EdgeRecipe, load_edge_recipe
from fedllm.edge.vision import (
    EdgeSchedule,
    make_splits,
    run_edge_learning,
    run_sync_fedavg,
    train_core,
    train_edge,
)
from fedllm.metrics.edge_report import summarize, write_edge_report
from fedllm.studies.edge import describe, main, run_edge_study, study_variants
from fedllm.types import global_norm, subtract

ROOT = Path(__file__).resolve().parents[1]
STUDY_RECIPE = ROOT / "recipes" / "edge" / "fashion_mnist_cloned_kd.yaml"
REAL_ROOT = Path("/usr/share/datasets/fashion-mnist")
needs_real = pytest.mark.skipif(not (REAL_ROOT / FILES["train_x"]).is_file(),
                                reason="dataset-fashion-mnist is not installed")


@pytest.fixture(autouse=True)
def one_thread():
    """LeNet steps are tiny: one thread avoids oversubscription on shared CI cores."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def toy_data(n_train=400, n_test=100, seed=0):
    """Ten classes, each a bright 4×4 patch at its own place plus faint noise: learnable in a few steps."""
    g = torch.Generator().manual_seed(seed)

    def make(n):
        y = torch.arange(n) % 10
        x = 0.1 * torch.rand(n, 1, 28, 28, generator=g)
        for i, c in enumerate(y.tolist()):
            r, col = 4 * (c // 5) + 6, 4 * (c % 5) + 4
            x[i, 0, r:r + 4, col:col + 4] = 1.0
        return x, y

    (tx, ty), (vx, vy) = make(n_train), make(n_test)
    return VisionData(tx, ty, vx, vy)


TOY = load_edge_recipe(None, ["edges.count=4", "core.fraction=0.2", "core.steps=20", "edges.steps=5",
                              "distill.steps=5", "train.batch_size=16", "train.lr=0.05", "study.seeds=[0]"])


def test_schedule_lag_and_never_return():
    # Prepare: edge 1 returns two arrivals late, edge 3 never returns
    schedule = EdgeSchedule((0, 1, 2, 3), lag={1: 2}, never=frozenset({3}))
    # Execute
    events = schedule.events()
    # Assert
    assert events == [(0, "send", 0), (0, "return", 0), (1, "send", 1), (2, "send", 2), (2, "return", 2),
                      (3, "send", 3), (3, "return", 1)]


def test_schedule_late_past_the_stream_and_same_step_order():
    late = EdgeSchedule((0, 1, 2), lag={0: 5}).events()
    assert late[-1] == (5, "return", 0)
    assert [e for _, kind, e in late if kind == "return"] == [1, 2, 0]
    # two edges due at step 2: the on-time edge first, then by increasing lag
    crowd = EdgeSchedule((0, 1, 2), lag={0: 2, 1: 1}).events()
    assert crowd == [(0, "send", 0), (1, "send", 1), (2, "send", 2), (2, "return", 2), (2, "return", 1),
                     (2, "return", 0)]


def test_schedule_follows_arrival_order_from_the_recipe():
    cfg = TOY.with_values({"edges.arrival": [2, 0, 3, 1], "edges.never_return": [0]})
    events = EdgeSchedule.from_recipe(cfg).events()
    assert [e for _, kind, e in events if kind == "send"] == [2, 0, 3, 1]
    assert [e for _, kind, e in events if kind == "return"] == [2, 3, 1]


@pytest.mark.parametrize("change, field", [
    ({"edges.lags": [{"edge": 7, "by": 1}]}, "edges.lags"),
    ({"edges.lags": [{"edge": 1, "by": -1}]}, "edges.lags"),
    ({"edges.noisy": [{"edge": 0, "p": 1.5}]}, "edges.noisy"),
    ({"edges.arrival": [0, 1, 2, 2]}, "edges.arrival"),
    ({"distill.teacher_init": "random"}, "distill.teacher_init"),
    ({"distill.memory": 0}, "distill.memory"),
    ({"core.fraction": 1.0}, "core.fraction"),
])
def test_config_rejects_bad_values(change, field):
    with pytest.raises(RecipeError) as caught:
        TOY.with_values(change)
    assert caught.value.where == field and len(str(caught.value).splitlines()) == 1


def test_splits_are_disjoint_and_cover_the_pool():
    data = toy_data()
    cut = TOY.with_values({"vision.max_train_examples": 300, "vision.max_test_examples": 50})
    splits = make_splits(cut, data)
    parts = [splits.core, *splits.edges]
    union = torch.cat(parts)
    assert len(splits.core) == 60 and [len(p) for p in splits.edges] == [60] * 4
    assert len(union) == len(set(union.tolist())) == 300
    assert len(splits.test) == 50
    skewed = make_splits(TOY.with_values({"edges.alpha": 0.3}), data)
    assert torch.equal(skewed.core, make_splits(TOY, data).core)  # the core does not depend on the skew


def test_downlink_is_a_clone_or_an_independent_init():
    # Prepare: an almost zero learning rate, so the returned model is where it started
    data, cfg = toy_data(), TOY.with_values({"train.lr": 1e-9, "edges.steps": 1})
    splits = make_splits(cfg, data)
    core = train_core(cfg, data, splits)
    # Execute
    (clone,), _ = train_edge(cfg, data, splits, 0, core)
    (indep,), _ = train_edge(cfg.with_values({"distill.teacher_init": "independent"}), data, splits, 0, core)
    (ens_a, ens_b), _ = train_edge(TOY.with_values({"distill.ensemble": 2}), data, splits, 0, core)
    # Assert
    assert global_norm(subtract(clone, core)) < 1e-5
    assert global_norm(subtract(indep, core)) > 1.0
    assert global_norm(subtract(ens_a, ens_b)) > 0  # different batch orders, different models


def test_run_edge_learning_rows_follow_the_schedule_and_are_reproducible():
    data = toy_data()
    cfg = TOY.with_values({"edges.lags": [{"edge": 1, "by": 2}], "edges.never_return": [3], "distill.memory": 2,
                           "edges.noisy": [{"edge": 2, "p": 1.0}]})
    core = train_core(cfg, data, make_splits(cfg, data))
    rows = run_edge_learning(cfg, data, core_state=core)
    again = run_edge_learning(cfg, data, core_state=core)
    assert [r["edge"] for r in rows] == [0, 2, 1]
    assert [r["lag"] for r in rows] == [0, 0, 2]
    assert [r["noise_p"] for r in rows] == [0.0, 1.0, 0.0]
    assert [r["teachers"] for r in rows] == [1, 2, 2]
    assert rows[1]["acc_before"] == rows[0]["acc"]
    assert all(0.0 <= r["acc"] <= 1.0 and 0.0 <= r["consensus_iou"] <= 1.0 for r in rows)
    assert [r["acc"] for r in rows] == [r["acc"] for r in again]


def test_edges_teach_the_core_on_learnable_data():
    data, cfg = toy_data(), TOY.with_values({"core.steps": 3, "edges.steps": 40, "distill.steps": 20})
    rows = run_edge_learning(cfg, data)
    assert rows[-1]["acc"] > rows[0]["acc_before"] + 0.2


def test_sync_fedavg_rows():
    data = toy_data()
    rows = run_sync_fedavg(TOY, data, rounds=2)
    assert [r["round"] for r in rows] == [1, 2]
    assert [r["edge_visits"] for r in rows] == [4, 8]
    with pytest.raises(ValueError, match="rounds"):
        run_sync_fedavg(TOY, data, rounds=0)


def test_study_variants_cover_the_papers_figures():
    variants = study_variants(EdgeRecipe())
    groups = {g for g, _, _ in variants}
    assert groups == {"transfer", "lag", "noise", "non-iid"}
    inits = {c.distill.teacher_init for g, _, c in variants if g == "transfer"}
    assert inits == {"clone", "independent", "independent_pretrained"}
    assert any(c.edges.never_return for _, _, c in variants) and any(c.edges.lags for _, _, c in variants)


def test_single_run_study_and_report_from_files(tmp_path):
    # Prepare: one configured run (lagged edge, memory 2) on toy data, two seeds
    cfg = TOY.with_values({"edges.lags": [{"edge": 1, "by": 1}], "distill.memory": 2, "study.seeds": [0, 1],
                           "study.fedavg_rounds": 1, "study.kind": "single"})
    # Execute
    result = run_edge_study(cfg, toy_data())
    (tmp_path / "edge_study.json").write_text(json.dumps(result))
    table = write_edge_report(tmp_path).read_text()
    # Assert: the run, the core-only and FedAvg baselines, per seed; report built from the file alone
    assert describe(cfg) == "CPP + memory M=2 + edge 1 lagged by 1"
    assert [v["variant"] for v in result["variants"]] == [describe(cfg)]
    summary = {s["variant"]: s for s in summarize(result["rows"])}
    assert summary[describe(cfg)]["points"] == 4 and summary[describe(cfg)]["seeds"] == 2
    assert summary["core only (Phase 0)"]["points"] == 1
    assert f"| run | {describe(cfg)} | 4 |" in table
    assert (tmp_path / "edge_study.png").stat().st_size > 0


def test_study_recipe_is_the_default_study():
    recipe = load_edge_recipe(STUDY_RECIPE)
    assert recipe == EdgeRecipe(name="fashion_mnist_cloned_kd")
    assert load_edge_recipe(STUDY_RECIPE, ["edges.lags=[{edge: 2, by: 4}]"]).edges.lags == [EdgeLag(edge=2, by=4)]


@pytest.mark.parametrize("override, field", [
    ("distill.memry=3", "distill.memry"),                   # unknown key (nearest one suggested)
    ("edges.lags=[{edge: 12, by: 1}]", "edges.lags"),       # edge id out of range
    ("edges.noisy=[{edge: 1, p: 2}]", "edges.noisy"),       # probability out of range
    ("edges.arrival=[0, 1, 1]", "edges.arrival"),           # not a permutation
    ("distill.teacher_init=cloned", "distill.teacher_init"),
    ("workload=lm", None),                                  # valid: the tiny-llama defaults
])
def test_fedllm_edge_check_names_the_field(override, field, capsys):
    code = cli(["edge", str(STUDY_RECIPE), override, "--check"])
    err = capsys.readouterr().err.strip().splitlines()
    if field is None:
        assert code == 0 and not err
    else:
        assert code == 2 and len(err) == 1 and field in err[0]


def test_study_module_bad_override_exits_2(tmp_path, capsys):
    assert main(["--out", str(tmp_path), "core.fraction=1.5"]) == 2
    assert "core.fraction" in capsys.readouterr().err


@pytest.mark.slow
@needs_real
def test_quick_study_end_to_end(tmp_path):
    # Execute: the user's command (`fedllm edge RECIPE --quick`), reduced size
    assert cli(["edge", str(STUDY_RECIPE), "--quick", "--out", str(tmp_path)]) == 0
    # Assert: all files, every variant with finite accuracies, the omitted edge missing from its curve
    for name in ("edge_study.json", "edge_study.md", "edge_study.png"):
        assert (tmp_path / name).stat().st_size > 0
    result = json.loads((tmp_path / "edge_study.json").read_text())
    names = {r["variant"] for r in result["rows"]}
    assert {v["variant"] for v in result["variants"]} <= names
    summary = {s["variant"]: s for s in result["summary"]}
    assert all(math.isfinite(s["final_acc"]) and 0 < s["final_acc"] <= 1 for s in summary.values())
    omitted = next(n for n in summary if n.endswith("omitted"))
    assert summary[omitted]["points"] == 8 and summary["no delay"]["points"] == 9
    table = (tmp_path / "edge_study.md").read_text()
    for row in ("| transfer | CPP: clone of the core |", "| transfer | IsPP: independent init |",
                "| transfer | IPP: independent init, core-pretrained |", "| transfer | CPP + memory M=3 |",
                "| transfer | CPP + ensemble n=3 |", "| lag | edge 2 lagged by 4, used |",
                "| lag | edge 2 lagged, omitted |", "| noise | edge 4 noisy p=0.5 |", "| noise | edge 4 noisy p=1.0 |",
                "| non-iid | Dirichlet α=0.3: CPP + memory M=3 |", "| baseline | sync FedAvg"):
        assert row in table, row
