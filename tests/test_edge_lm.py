"""Cloned KD for causal LMs (workload: lm) on the tiny llama: adapter swapping, downlink inits,
distillation towards the teacher, the edge stream with a lagged edge, and the report."""

import json
import math
from pathlib import Path

import pytest
import torch

from fedllm.algorithms.distill import soft_kl
from fedllm.data.text import collate
from fedllm.edge.lm import LMEdgeLearning, run_edge_lm
from fedllm.edge.recipe import load_edge_recipe
from fedllm.metrics.edge_report import LM_JSON, write_lm_report
from fedllm.types import global_norm, subtract

RECIPE = Path(__file__).resolve().parents[1] / "recipes" / "edge" / "tiny_lm_cloned_kd.yaml"
SMALL = ["lm.data.eval_size=4", "lm.data.max_length=64", "lm.data.max_examples=null", "lm.partition.method=iid",
         "lm.partition.column=null", "edges.count=2", "edges.lags=[{edge: 0, by: 1}]", "core.fraction=0.25",
         "core.steps=2", "edges.steps=2", "distill.steps=2", "distill.memory=2", "train.batch_size=2",
         "train.lr=0.01"]
COLOURS = ["red", "blue", "green", "white", "black"]


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A 40-pair JSONL corpus (coralmap takes ~10 s to build; not needed to test the mechanics)."""
    data = tmp_path_factory.mktemp("edge_lm") / "pairs.jsonl"
    data.write_text("".join(json.dumps({"prompt": f"What colour is item {i}?",
                                        "response": f"Item {i} is {COLOURS[i % 5]}."}) + "\n" for i in range(40)))
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield LMEdgeLearning(load_edge_recipe(RECIPE, [*SMALL, "lm.data.builtin=null", f"lm.data.path={data}"]))
    torch.set_num_threads(before)


def test_splits_core_is_taken_from_the_edges(run):
    core = {e.index for e in run.core}
    edges = [{e.index for e in part} for part in run.edges]
    assert len(core) == round(0.25 * (40 - 4)) == 9 and all(edges)
    assert not core & (edges[0] | edges[1]) and not edges[0] & edges[1]
    assert not {e.index for e in run.eval} & (core | edges[0] | edges[1])


def test_downlink_clone_or_independent_adapter(run):
    core = {k: v + 0.01 for k, v in run.initial.items()}
    assert run.edge_start(0, core) is core  # CPP: the core's own adapter
    fresh = run.fresh_adapter(seed=7)
    assert fresh.keys() == run.initial.keys()
    assert all(float(v.abs().max()) == 0 for k, v in fresh.items() if "lora_B" in k)  # the base model
    a_keys = [k for k in fresh if "lora_A" in k]
    assert a_keys and all(not torch.equal(fresh[k], run.initial[k]) for k in a_keys)


def test_teacher_logits_restore_the_student_and_kd_pulls_towards_the_teacher(run):
    # Prepare: a core adapter and a teacher trained from it on edge 0's examples
    core, _ = run.train(run.initial, run.core, 2, seed=1)
    teacher, _ = run.train(core, run.edges[0], 4, seed=2)
    batch = collate(run.core[:4], run.tokenizer.pad_token_id)
    mask = batch["labels"][:, 1:] != -100

    def kl_to_teacher(student):
        run.state.set(student)
        (z_t,) = run._teacher_logits([teacher], batch)
        assert global_norm(subtract(run.state.get(), student)) == 0  # the student's adapter is back
        run.model.eval()
        with torch.no_grad():
            z_s = run._logits(batch)
        return float(soft_kl(z_s[:, :-1][mask], z_t[:, :-1][mask], 1.0).mean())

    # Execute: distill the core from the teacher on the core examples
    before = kl_to_teacher(core)
    student, loss = run.train(core, run.core, 4, seed=3, teachers=[teacher])
    # Assert
    assert before > 0 and math.isfinite(loss)
    assert kl_to_teacher(student) < before


def test_edge_stream_rows_and_report(run, tmp_path):
    # Execute: edge 0 returns one arrival late, so edge 1 teaches first
    result = run_edge_lm(run.recipe, run)
    (tmp_path / LM_JSON).write_text(json.dumps(result))
    table = write_lm_report(tmp_path).read_text()
    rows = result["rows"]
    # Assert
    assert [r["edge"] for r in rows] == [1, 0] and [r["lag"] for r in rows] == [0, 1]
    assert [r["teachers"] for r in rows] == [1, 2]  # temporal memory M = 2
    assert rows[1]["loss_before"] == rows[0]["eval_loss"] and rows[0]["loss_before"] == result["core"]["eval_loss"]
    for r in rows:
        assert all(math.isfinite(r[k]) for k in ("teacher_loss", "eval_loss", "edge_train_loss"))
        assert r["perplexity"] == pytest.approx(math.exp(r["eval_loss"]))
    assert result["core"]["eval_loss"] != result["base"]["eval_loss"]  # Phase 0 trained the core
    assert result["core_only"]["steps"] == 2 * 2 and math.isfinite(result["core_only"]["eval_loss"])
    assert table.count("\n| ") == 3 and "Control (no teachers)" in table
    assert (tmp_path / "edge_lm.png").stat().st_size > 0
