"""NRA@x / CCA@x / CTA@x (HP-FL's cost-to-accuracy metrics) from metrics rows."""

import pytest

from fedllm.metrics.cost import cost_to_accuracy


def rows(accs, up=10, down=5, t=1.5):
    out = [{"round": 0, "accuracy": accs[0], "bytes_up": 0, "bytes_down": 0, "train_time_s": 0.0}]
    out += [{"round": r, "accuracy": a, "bytes_up": up, "bytes_down": down, "train_time_s": t}
            for r, a in enumerate(accs[1:], start=1)]
    return out


def test_first_round_reaching_each_target_and_cumulative_costs():
    # Prepare
    history = rows([0.1, 0.5, 0.72, 0.69, 0.81])
    # Execute
    cost = cost_to_accuracy(history, [0.7, 0.8, 0.9])
    # Assert
    assert cost["0.7"] == {"rounds": 2, "bytes": 30, "train_time_s": 3.0}
    assert cost["0.8"] == {"rounds": 4, "bytes": 60, "train_time_s": 6.0}
    assert cost["0.9"] == {"rounds": None, "bytes": None, "train_time_s": None}


def test_unevaluated_rounds_cost_but_cannot_reach():
    history = rows([0.1, None, None, 0.75])
    cost = cost_to_accuracy(history, [0.7])
    assert cost["0.7"] == {"rounds": 3, "bytes": 45, "train_time_s": 4.5}


def test_initial_model_above_target_costs_nothing_and_missing_fields_count_zero():
    cost = cost_to_accuracy([{"round": 0, "accuracy": 0.95}], [0.9])
    assert cost["0.9"] == {"rounds": 0, "bytes": 0, "train_time_s": 0.0}
    assert cost_to_accuracy([], [0.5])["0.5"]["rounds"] is None


def test_bad_target_is_rejected():
    with pytest.raises(ValueError, match="targets"):
        cost_to_accuracy(rows([0.1]), [70])


def test_report_adds_cost_to_accuracy_to_the_summary(tmp_path):
    """fedllm's report reads eval.targets from config.yaml and writes NRA/CCA/CTA into summary.json."""
    # Prepare: a finished run directory written by hand
    import json

    from fedllm.metrics.report import write_report

    rows = [{"round": r, "mode": "federated", "train_loss": None, "eval_loss": 1.0, "perplexity": 2.7,
             "bleu": None, "accuracy": acc, "round_time_s": 1.0, "train_time_s": 0.5, "aggregate_time_s": 0.0,
             "eval_time_s": 0.5, "bytes_up": 10 * (r > 0), "bytes_down": 5 * (r > 0), "clients": []}
            for r, acc in enumerate([0.1, 0.3, 0.55, 0.7])]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (tmp_path / "config.yaml").write_text("eval: {targets: [0.5, 0.9]}\n")
    (tmp_path / "summary.json").write_text(json.dumps({"name": "x", "total_bytes_up": 30, "total_bytes_down": 15,
                                                       "mean_round_time_s": 1.0, "skipped_updates": 0}))
    # Execute
    write_report(tmp_path, plots=False)
    # Assert
    cost = json.loads((tmp_path / "summary.json").read_text())["cost_to_accuracy"]
    assert cost["0.5"] == {"rounds": 2, "bytes": 30, "train_time_s": 1.5}
    assert cost["0.9"] == {"rounds": None, "bytes": None, "train_time_s": None}
    assert "| 0.5 | 2 | 30 | 1.5 |" in (tmp_path / "report.md").read_text()
