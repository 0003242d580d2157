"""A server no client can poison or crash: a huge finite update, lying counts, a codec that overflows
and a non-finite aggregate each cost one update (or one round), never the global model or the run."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch

from fedllm.config import RecipeError
from fedllm.federation.modes import run_federated
from fedllm.federation.screening import check_counts, relative_norm_violations
from fedllm.federation.server import FederatedServer
from fedllm.types import ClientUpdate
from tests._toy import ToyExperiment, toy_recipe


class Liar(ToyExperiment):
    """Client 0 rewrites its honest update with ``lie(update) -> update``."""

    def __init__(self, recipe, lie, **kw) -> None:
        super().__init__(recipe, **kw)
        self.lie = lie

    def fit(self, client_id, examples, start, rnd, steps, grad_term=None):
        upd = super().fit(client_id, examples, start, rnd, steps, grad_term)
        return self.lie(upd) if client_id == 0 else upd


def _finite(state) -> bool:
    return all(bool(torch.isfinite(v).all()) for v in state.values())


def _run(exp, tmp_path):
    summary = run_federated(exp, out=str(tmp_path))
    rows = [r for r in exp_rows(tmp_path)]
    return summary, rows


def exp_rows(tmp_path):
    from fedllm.federation.rundir import read_metrics

    return read_metrics(next(tmp_path.glob("*/federated")))


def test_a_huge_finite_update_is_rejected_by_the_median_rule(tmp_path):
    # Prepare: 4 clients, client 0 sends 3e38 in every coordinate (finite in float64 and float32)
    exp = Liar(toy_recipe(), lambda u: dataclasses.replace(u, delta={k: torch.full_like(v, 3e38)
                                                                      for k, v in u.delta.items()}))
    # Execute
    summary, rows = _run(exp, tmp_path)
    # Assert: rejected every round, the rounds applied with the others, the model stays finite
    for r in rows[1:]:
        assert "0" in r["rejected"] and "median" in r["rejected"]["0"] and r["applied"]
    assert _finite(exp.saved) and max(float(v.abs().max()) for v in exp.saved.values()) < 1e3
    assert math.isfinite(summary["final"]["eval_loss"])


def test_the_sign_codec_cannot_carry_a_blow_up(tmp_path):
    recipe = toy_recipe(compression={"codec": "sign", "error_feedback": False})
    exp = Liar(recipe, lambda u: dataclasses.replace(u, delta={k: v * 1e30 for k, v in u.delta.items()}))
    _, rows = _run(exp, tmp_path)
    assert all("0" in r["rejected"] for r in rows[1:]) and _finite(exp.saved)


@pytest.mark.parametrize(("lie", "reason"), [
    (lambda u: dataclasses.replace(u, num_examples=10 ** 9), "num_examples=1000000000, but the server knows"),
    (lambda u: dataclasses.replace(u, num_examples=-5), "num_examples=-5"),
    (lambda u: dataclasses.replace(u, local_steps=0), "local_steps=0"),
])
def test_lying_counts_are_rejected(lie, reason, tmp_path):
    # FedAvg weighs by examples and FedNova divides by steps: both would be bent or crash
    for algorithm in ("fedavg", "fednova"):
        exp = Liar(toy_recipe(name=algorithm, federation={"algorithm": algorithm}), lie)
        out = tmp_path / algorithm
        run_federated(exp, out=str(out))
        rows = exp_rows(out)
        assert all(reason in r["rejected"]["0"] for r in rows[1:]), rows[1]["rejected"]
        assert all(r["applied"] for r in rows[1:]) and _finite(exp.saved)


def test_an_fp16_overflow_is_one_rejected_update_not_a_crash(tmp_path):
    exp = Liar(toy_recipe(compression={"codec": "fp16"}),
               lambda u: dataclasses.replace(u, delta={k: v * 0 + 1e6 for k, v in u.delta.items()}))
    _, rows = _run(exp, tmp_path)
    assert all("could not encode it" in r["rejected"]["0"] and "float16" in r["rejected"]["0"] for r in rows[1:])
    assert _finite(exp.saved) and all(r["applied"] for r in rows[1:])


def test_a_non_finite_aggregate_rejects_the_round_and_keeps_the_model():
    # Prepare: two clients (too few for the median rule) whose finite float32 deltas sum past float32's max
    recipe = toy_recipe(partition={"num_clients": 2}, federation={"algorithm": "gradualdiff", "weighted": False})
    state = {"w": torch.zeros(3, dtype=torch.float32)}
    server = FederatedServer(recipe, state, [5, 5])
    plan = server.begin_round(1)
    for k in plan.training:
        server.upload(1, ClientUpdate(k, {"w": torch.full((3,), 3e38)}, 5, plan.steps[k], 1.0), state)
    # Execute: the weighted sum is accumulated in float64 then cast: 3e38 fits, but apply 2x
    new, metrics = server.finish_round(1, {"w": torch.full((3,), 3e38)})
    # Assert
    assert not metrics["applied"] and "non-finite global state" in metrics["round_rejected"]
    assert torch.equal(new["w"], torch.full((3,), 3e38))


def test_two_clients_one_liar_the_change_bound_rejects_the_round(tmp_path):
    """With the norm rules off (no median of two, no history: reject_norm_factor null), the bound on
    the global change still holds. (With them on, the liar alone is left out: test_site_bounds.py.)"""
    # Prepare: a LoRA toy (its A factors give the global state a norm), client 0 sends 3e38
    recipe = toy_recipe(partition={"method": "iid", "num_clients": 2},
                        federation={"rounds": 2, "reject_norm_factor": None})
    exp = Liar(recipe, lambda u: dataclasses.replace(u, delta={k: torch.full_like(v, 3e38)
                                                                for k, v in u.delta.items()}), lora=True)
    start = {k: v.clone() for k, v in exp.initial_state.items()}
    # Execute
    summary, rows = _run(exp, tmp_path)
    # Assert: every round rejected as a whole, the model is the initial one, the run says so
    for r in rows[1:]:
        assert not r["applied"] and "max_change_ratio" in r["round_rejected"], r
    assert all(torch.equal(exp.saved[k], start[k]) for k in start)
    assert summary["status"] != "ok"


def test_the_change_bound_is_a_ratio_of_the_old_norm_and_can_be_switched_off():
    from fedllm.federation.screening import global_change_problem

    old = {"w": torch.tensor([3.0, 4.0])}  # norm 5
    assert global_change_problem(old, {"w": torch.tensor([3.0, 54.0])}, 10.0) is None  # change 50 = 10 x 5
    assert "max_change_ratio (10) x its norm 5" in global_change_problem(old, {"w": torch.tensor([3.0, 54.1])}, 10.0)
    assert global_change_problem(old, {"w": torch.tensor([3.0, 1e30])}, None) is None
    assert "non-finite" in global_change_problem(old, {"w": torch.tensor([3.0, math.inf])}, None)
    assert global_change_problem({"w": torch.zeros(2)}, {"w": torch.tensor([1e9, 0.0])}, 10.0) is None  # no scale
    with pytest.raises(RecipeError, match="federation.max_change_ratio"):
        toy_recipe(federation={"max_change_ratio": 0})


def test_pure_rules():
    ups = [ClientUpdate(i, {"w": torch.tensor([1.0 + i])}, 1, 1, 0.0) for i in range(4)]
    assert relative_norm_violations(ups, 100.0) == {}
    big = [*ups, ClientUpdate(9, {"w": torch.tensor([1e9])}, 1, 1, 0.0)]
    assert set(relative_norm_violations(big, 100.0)) == {9}
    assert relative_norm_violations(big[:2] + big[-1:], None) == {}
    assert relative_norm_violations(big[-2:], 100.0) == {}  # two updates: no median to speak of
    zeros = [ClientUpdate(i, {"w": torch.tensor([0.0])}, 1, 1, 0.0) for i in range(3)]
    assert relative_norm_violations([*zeros, ups[0]], 100.0) == {}  # a zero median gives no scale
    assert check_counts(ups[0], 1) is None and "knows 2" in check_counts(ups[0], 2)


def test_a_trimmed_mean_that_trims_nothing_is_refused():
    with pytest.raises(RecipeError, match="robust.trim_ratio: .* would exclude nothing"):
        toy_recipe(robust={"aggregator": "trimmed_mean", "trim_ratio": 0.1}, partition={"num_clients": 3})


def test_a_run_that_applied_no_round_says_so_and_the_cli_exits_3(tmp_path, capsys):
    from fedllm.cli import EXIT_UNTRUSTED, _verdict

    class Broken(ToyExperiment):
        def fit(self, *args, **kwargs):
            raise RuntimeError("site down")

    summary = run_federated(Broken(toy_recipe()), out=str(tmp_path))
    assert summary["status"].startswith("no round was applied")
    assert _verdict({"federated": summary}) == EXIT_UNTRUSTED
    assert "fedllm: error: federated: no round was applied" in capsys.readouterr().err


def test_nan_is_shown_as_nan_not_as_missing(tmp_path, capsys):
    from fedllm.cli import _print_table
    from fedllm.federation.rundir import summarize

    rows = [{"round": 0, "mode": "federated", "eval_loss": 2.0, "perplexity": 7.4, "bleu": None,
             "bytes_up": 0, "bytes_down": 0, "round_time_s": 0.0},
            {"round": 1, "mode": "federated", "eval_loss": float("nan"), "perplexity": float("nan"), "bleu": None,
             "bytes_up": 5, "bytes_down": 5, "round_time_s": 1.0, "applied": True, "train_loss": 1.0}]
    summary = summarize(rows)
    assert summary["nonfinite_final"] == ["eval_loss", "perplexity"]
    assert summary["status"] == "the final eval loss is not finite"
    _print_table({"federated": summary})
    out = capsys.readouterr().out
    assert "2.000 → NaN" in out and "NaN" in out
