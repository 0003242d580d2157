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
