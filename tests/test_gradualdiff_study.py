"""The headline study's machinery: the evaluation it relies on (per-example NLL, its standard error,
the head only where the loss needs it), every mode evaluating at the same rounds, and
``python -m fedllm.studies.gradualdiff --quick`` end to end, resumable by part, with the README's
tables rendered from the committed JSON."""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch
import torch.nn.functional as F

from fedllm.client.evaluate import IGNORE, example_nll, loss_standard_error, response_nll
from fedllm.data.text import collate
from fedllm.studies import gradualdiff

ROOT = Path(__file__).resolve().parents[1]


def _naive_sums(model, examples, pad_id):
    """Each example alone, every position's logits, the plain shifted cross-entropy."""
    out = []
    with torch.no_grad():
        for e in examples:
            b = collate([e], pad_id)
            logits = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits[:, :-1].float()
            labels = b["labels"][:, 1:]
            out.append((float(F.cross_entropy(logits[0], labels[0], ignore_index=IGNORE, reduction="sum")),
                        int((labels != IGNORE).sum())))
    return out


def test_windowed_length_sorted_nll_equals_scoring_each_example_alone(tiny_experiment):
    exp = tiny_experiment
    exp.model.eval()
    examples = exp.data.eval_examples[:11]
    sums, counts = example_nll(exp.model, examples, exp.tokenizer.pad_token_id, batch_size=4)
    naive = _naive_sums(exp.model, examples, exp.tokenizer.pad_token_id)
    assert counts == [n for _, n in naive] and all(n > 0 for n in counts)  # input order kept
    for got, (want, _) in zip(sums, naive):
        assert math.isclose(got, want, rel_tol=1e-5)
    total, count = response_nll(exp.model, examples, exp.tokenizer.pad_token_id, 3)
    assert count == sum(counts) and math.isclose(total, sum(s for s, _ in naive), rel_tol=1e-5)


def test_standard_error_is_the_ratio_estimators():
    # equal lengths: the token-weighted mean is the mean of per-example means, its SE the usual s/sqrt(m)
    means = [1.0, 2.0, 3.0, 6.0]
    se = loss_standard_error([10 * m for m in means], [10] * 4)
    mu = sum(means) / 4
    want = math.sqrt(sum((m - mu) ** 2 for m in means) / 3 / 4)
    assert math.isclose(se, want, rel_tol=1e-12)
    # identical per-token losses have no spread whatever the lengths; one example has no SE
    assert loss_standard_error([2.0, 6.0, 10.0], [1, 3, 5]) == 0.0
    assert loss_standard_error([1.0], [3]) is None and loss_standard_error([1.0, 2.0], [0, 4]) is None


def test_paired_log_ratio_is_the_difference_of_the_two_token_weighted_losses():
    fed = {"sums": [3.0, 8.0, 1.0], "counts": [2, 4, 1]}
    cen = {"sums": [2.0, 6.0, 1.5], "counts": [2, 4, 1]}
    diff, se = gradualdiff.paired_log_ratio(fed, cen)
    assert math.isclose(diff, 12 / 7 - 9.5 / 7, rel_tol=1e-12)
    assert math.isclose(se, loss_standard_error([1.0, 2.0, -0.5], [2, 4, 1]), rel_tol=1e-12)
    # a constant per-token gap has no spread: the pairing removes the examples' own difficulty
    assert gradualdiff.paired_log_ratio({"sums": [2.0, 4.0], "counts": [1, 2]},
                                        {"sums": [1.0, 2.0], "counts": [1, 2]})[1] == 0.0


def test_every_mode_evaluates_at_the_same_rounds(tmp_path):
    from fedllm.cli import main

    tiny = ROOT / "recipes" / "tiny.yaml"
    assert main(["compare", str(tiny), "federation.rounds=3", "eval.every=2", "train.local_steps=1",
                 "eval.bleu_samples=0", "data.max_examples=40", "data.eval_size=6", "partition.num_clients=2",
                 "output.plots=false", "output.save_adapter=false", "--out", str(tmp_path)]) == 0
    for mode in ("federated", "centralized", "local"):
        rows = [json.loads(x) for x in (tmp_path / "tiny" / mode / "metrics.jsonl").read_text().splitlines()]
        evaluated = [r["round"] for r in rows if r["eval_loss"] is not None]
        assert evaluated == [0, 2, 3], mode  # every 2 rounds and the last
        if mode != "local":  # local rows are a mean over the clients' models
            assert all(r["eval_loss_se"] > 0 for r in rows if r["eval_loss"] is not None)
        assert all(r["train_loss"] is not None for r in rows[1:])  # trained every round regardless


def test_quick_study_runs_resumes_by_part_and_renders_its_tables(tmp_path, capsys):
    out, runs = tmp_path / "out", tmp_path / "runs"
    args = ["--quick", "--seeds", "0,1", "--partition", "iid", "--out", str(out), "--runs", str(runs)]
    # one part alone first, as a parallel worker would
    assert gradualdiff.main([*args, "--part", "iid:1:federated"]) == 0
    assert "1 of 5 parts finished" in capsys.readouterr().out
    assert gradualdiff.main(args) == 0
    text = capsys.readouterr().out
    assert "iid      seed 1 federated    finished earlier (same recipe): kept" in text
    assert "5 of 5 parts finished" in text
    doc = json.loads((out / "gradualdiff_study.json").read_text())
    seeds = doc["results"]["iid"]
    assert set(seeds) == {"0", "1"} and set(seeds["0"]) == {"federated", "centralized", "local"}
    assert set(seeds["1"]) == {"federated", "centralized"}
    fed = seeds["0"]["federated"]["rows"]
    assert fed[-1]["round"] == 2 and fed[-1]["perplexity"] < fed[0]["perplexity"]  # it trained
    assert seeds["0"]["centralized"]["rows"][-1]["local_steps"] == 5  # matched: 5 clients x 1 step
    assert (out / "loss_iid.png").stat().st_size > 0
    # the paired comparison: both final adapters re-scored per example, from their saved adapter files
    for seed in ("0", "1"):
        pair = doc["paired"]["iid"][seed]
        fed_ppl = seeds[seed]["federated"]["rows"][-1]["perplexity"]
        cen_ppl = seeds[seed]["centralized"]["rows"][-1]["perplexity"]
        assert math.isclose(pair["ratio"], fed_ppl / cen_ppl, rel_tol=1e-4)
        assert pair["ratio_95"][0] < pair["ratio"] < pair["ratio_95"][1] and pair["se"] > 0
    md = (out / "gradualdiff_study.md").read_text()
    assert gradualdiff.main_table(doc["results"]) in md and "| iid | federated |" in md
    ratio = seeds["0"]["federated"]["rows"][-1]["perplexity"] / seeds["0"]["centralized"]["rows"][-1]["perplexity"]
    assert f"{ratio:.3f}" in gradualdiff.goals_table({"iid": {"0": seeds["0"]}}, {})
    readme = tmp_path / "README.md"
    readme.write_text(f"# x\n{gradualdiff.MARK_START}\nold\n{gradualdiff.MARK_END}\ntail\n")
    gradualdiff.update_readme(readme, doc)
    assert readme.read_text() == f"# x\n{gradualdiff.readme_block(doc)}\ntail\n"



def test_the_readme_tables_are_the_committed_jsons():
    """The study's docs page (where its documented ``--readme`` points) holds the block rendered from the JSON."""
    doc = json.loads((ROOT / "docs" / "gradualdiff_study" / "gradualdiff_study.json").read_text())
    assert gradualdiff.readme_block(doc) in (ROOT / "docs" / "results" / "gradualdiff.md").read_text()
