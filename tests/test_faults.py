"""Fault-tolerant rounds: clients that raise, return NaN, drop out, straggle or send malformed updates.

What is checked (issue 6, items 2 and 3):

- ``recipes/tests/faults_30pct.yaml`` (about 30 % of sampled clients fault each round, in mixed
  ways) completes every round that has enough valid updates; each row counts what went wrong.
- **Same survivors.** A faulting client contributes nothing (error, NaN, dropout) or its partial
  work (straggler). So the faulty run must equal a *clean* run (no faults configured) whose server
  samples exactly the clients that survived each round, with the same step counts. The clean run
  is produced by the real engine with the sampler's plan replaced by the survivors. Because every
  client's training depends only on (seed, round, its data), the two runs are identical up to
  float summation order — the tolerance is 1e-12 (toy, float64) and 1e-6 on the eval loss of the
  tiny LLM (float32), i.e. no noise is allowed to hide a half-applied round.
- A round short of ``federation.min_clients`` valid updates leaves the global state bit-for-bit
  unchanged (``on_too_few: skip``) or is sampled again (``retry``), never applied half-way.
- Wrong keys, shapes or dtypes and norm-bound violations are rejected with their reason in the
  row's ``rejected`` dict, for every server configuration that processes updates on upload.

The error/NaN injection of :class:`~fedllm.experiments.lm.LMExperiment` is mirrored by
:class:`FaultyToy` (same ``faults.fires`` calls) so most checks run on the millisecond toy model;
one slow test runs the real tiny LLM.
"""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path

import pytest
import torch
import yaml

from fedllm.algorithms.aggregate import mean_delta
from fedllm.config import load_recipe
from fedllm.experiments.base import ClientFault
from fedllm.federation.modes import run_federated
from fedllm.federation.rundir import read_metrics
from fedllm.federation.server import FederatedServer, RoundPlan
from fedllm.types import ClientUpdate, add
from tests._toy import ToyExperiment, toy_recipe

ROOT = Path(__file__).resolve().parents[1]
FAULTS_RECIPE = ROOT / "recipes" / "tests" / "faults_30pct.yaml"


class FaultyToy(ToyExperiment):
    """The toy experiment with LMExperiment's fault injection (``faults.fires``) and optional
    malformed updates: ``malform[client_id](delta) -> delta``."""

    def __init__(self, recipe, malform=None, **kw) -> None:
        super().__init__(recipe, **kw)
        self.malform = malform or {}
        self.raised: list[tuple[int, int]] = []  # (round, client) of injected exceptions
        self.nans: list[tuple[int, int]] = []

    def fit(self, client_id, examples, start, rnd, steps, grad_term=None) -> ClientUpdate:
        if self.recipe.faults.fires(client_id, rnd, "error"):
            self.raised.append((rnd, client_id))
            raise ClientFault(f"injected failure of client {client_id} in round {rnd}")
        upd = super().fit(client_id, examples, start, rnd, steps, grad_term)
        delta = upd.delta
        if self.recipe.faults.fires(client_id, rnd, "nan"):
            self.nans.append((rnd, client_id))
            delta = {k: torch.full_like(v, float("nan")) for k, v in delta.items()}
        if client_id in self.malform:
            delta = self.malform[client_id](delta)
        return dataclasses.replace(upd, delta=delta)


def _groups(path: Path, *names: str) -> dict:
    values = yaml.safe_load(path.read_text(encoding="utf-8"))
    return {n: values[n] for n in names if n in values}


def _run(tmp_path: Path, exp) -> list[dict]:
    run_federated(exp, out=str(tmp_path))
    return read_metrics(tmp_path / exp.recipe.name / "federated")


def _clean_twin(recipe):
    """The same recipe with every injected fault switched off (straggler speed kept)."""
    f = recipe.faults
    faults = dataclasses.replace(f, error_prob=0.0, nan_prob=0.0, dropout_prob=0.0, straggler_fraction=0.0,
                                 error_clients=[], nan_clients=[])
    return dataclasses.replace(recipe, name=recipe.name + "_clean", faults=faults)


def _survivors(rows: list[dict]) -> dict[int, tuple[list[int], list[int]]]:
    """round -> (clients whose update was aggregated, which of them straggled)."""
    out = {}
    for r in rows[1:]:
        kept = r["aggregated_clients"] if r["applied"] else []
        out[r["round"]] = (kept, [k for k in r["stragglers"] if k in kept])
    return out


def _sample_exactly(monkeypatch, survivors) -> None:
    """Make the server sample exactly ``survivors[round]`` (with those stragglers), nobody else."""
    original = FederatedServer.begin_round

    def begin_round(self, key):
        plan = original(self, key)
        kept, slow = survivors[plan.round]
        return RoundPlan(plan.round, list(kept), {k: plan.steps.get(k, 1) for k in kept}, [], list(slow))

    monkeypatch.setattr(FederatedServer, "begin_round", begin_round)


# ----------------------------------------------------------------------------- 30 % faulty clients


def _toy_faults_recipe(**over):
    groups = _groups(FAULTS_RECIPE, "partition", "federation", "faults", "seed")
    fed = {**groups["federation"], "rounds": 8, **over.pop("federation", {})}
    return toy_recipe(name="faults30", seed=groups["seed"], partition=groups["partition"], federation=fed,
                      faults={**groups["faults"], **over.pop("faults", {})}, train={"local_steps": 2}, **over)


def test_faults_30pct_completes_every_round_and_counts_what_failed(tmp_path):
    # Prepare: the recipe's partition/federation/faults groups on the toy model, 8 rounds
    recipe = _toy_faults_recipe()
    exp = FaultyToy(recipe)
    # Execute
    rows = _run(tmp_path, exp)
    # Assert: every round applied (enough survivors after at most max_retries re-samples)
    trained = rows[1:]
    assert [r["round"] for r in trained] == list(range(1, 9))
    assert all(r["applied"] for r in trained)
    faulty = sampled = 0
    for r in trained:
        rnd = r["round"]
        raised = sorted(k for q, k in exp.raised if q == rnd and k in r["clients"])
        nan = sorted(k for q, k in exp.nans if q == rnd and k in r["clients"])
        # the row describes the attempt that was applied: its sample, failures, rejections, dropouts
        # (failed_clients of a retried round: see test_retried_round_reports_..._of_every_attempt)
        if r["attempts"] == 1:
            assert r["failed_clients"] == len(raised)
        assert sorted(int(k) for k in r["rejected"]) == nan  # JSON object keys are strings
        assert all("non-finite" in why for why in r["rejected"].values())
        assert r["skipped_nonfinite"] == len(nan) == r["rejected_updates"]
        expected = sorted(set(r["clients"]) - set(raised) - set(nan) - set(r["dropped_clients"]))
        assert r["aggregated_clients"] == expected and len(expected) >= recipe.federation.min_clients
        faulty += len(set(raised) | set(nan) | set(r["dropped_clients"]) | set(r["stragglers"]))
        sampled += len(r["clients"])
    # the recipe's promise: about 30 % of sampled clients fault (binomial, 80 draws: 0.30 +- 0.1)
    assert 0.2 <= faulty / sampled <= 0.45, faulty / sampled
    kinds = {"error": exp.raised, "nan": exp.nans,
             "dropout": [k for r in trained for k in r["dropped_clients"]],
             "straggler": [k for r in trained for k in r["stragglers"]]}
    assert all(kinds.values()), {k: len(v) for k, v in kinds.items()}  # every kind of fault happened
    assert all(math.isfinite(v) for s in [exp.saved] for t in s.values() for v in t.flatten().tolist())


def test_faulty_run_equals_a_clean_run_with_the_same_survivors(tmp_path, monkeypatch):
    # Prepare
    recipe = _toy_faults_recipe()
    faulty = FaultyToy(recipe)
    rows = _run(tmp_path, faulty)
    clean = FaultyToy(_clean_twin(recipe))
    _sample_exactly(monkeypatch, _survivors(rows))
    # Execute
    clean_rows = _run(tmp_path, clean)
    # Assert: same states after every round, no fault anywhere in the clean run
    assert not clean.raised and not clean.nans
    assert all(r["rejected"] == {} and r["failed_clients"] == 0 for r in clean_rows[1:])
    assert [r["aggregated_clients"] for r in clean_rows[1:]] == [r["aggregated_clients"] for r in rows[1:]]
    for a, b in zip(faulty.evaluated, clean.evaluated, strict=True):
        for k in a:
            torch.testing.assert_close(a[k], b[k], rtol=0, atol=1e-12)
    for a, b in zip(rows, clean_rows, strict=True):
        assert a["eval_loss"] == pytest.approx(b["eval_loss"], rel=1e-12)


# ----------------------------------------------------------------------------- too few valid updates


def test_too_few_valid_updates_skip_leaves_the_state_bit_for_bit(tmp_path):
    # Prepare: 4 clients, 3 needed; clients 0 and 1 raise / return NaN in round 2 only
    recipe = toy_recipe(name="skip", federation={"rounds": 3, "min_clients": 3, "on_too_few": "skip"},
                        faults={"error_clients": [0], "nan_clients": [1], "rounds": [2]})
    exp = FaultyToy(recipe)
    # Execute
    rows = _run(tmp_path, exp)
    # Assert: round 2 counted its failures and was not applied; rounds 1 and 3 were
    assert [r["applied"] for r in rows[1:]] == [True, False, True]
    r2 = rows[2]
    assert r2["failed_clients"] == 1 and list(r2["rejected"]) == ["1"] and r2["aggregated_clients"] == [2, 3]
    assert r2["attempts"] == 1
    for k, v in exp.evaluated[1].items():
        assert torch.equal(exp.evaluated[2][k], v)  # bit for bit: nothing of clients 2 and 3 leaked in
    assert rows[2]["eval_loss"] == rows[1]["eval_loss"]
    expected = add(exp.evaluated[2], mean_delta(exp.updates(3), weighted=True))
    for k, v in expected.items():
        torch.testing.assert_close(exp.evaluated[3][k], v, rtol=0, atol=1e-12)


def test_too_few_valid_updates_retry_resamples_and_applies_only_the_last_attempt(tmp_path):
    # Prepare: 8 clients, 4 sampled, all 4 must be valid: a sample holding a faulty client is re-drawn
    recipe = toy_recipe(name="retry", partition={"num_clients": 8},
                        federation={"rounds": 6, "fraction": 0.5, "min_clients": 4, "on_too_few": "retry",
                                    "max_retries": 20},
                        faults={"error_clients": [0], "nan_clients": [1]})
    exp = FaultyToy(recipe)
    # Execute
    rows = _run(tmp_path, exp)
    # Assert: some round needed a retry; every applied state is the previous one plus the mean of
    # exactly the applied attempt's updates (nothing from discarded attempts)
    assert any(r["attempts"] > 1 for r in rows[1:]), [r["attempts"] for r in rows[1:]]
    for r in rows[1:]:
        rnd = r["round"]
        assert r["applied"] and not {0, 1} & set(r["aggregated_clients"])
        last = [u for u in exp.updates(rnd) if u.client_id in r["aggregated_clients"]][-len(r["aggregated_clients"]):]
        assert sorted(u.client_id for u in last) == r["aggregated_clients"]
        expected = add(exp.evaluated[rnd - 1], mean_delta(last, weighted=True))
        for k, v in expected.items():
            torch.testing.assert_close(exp.evaluated[rnd][k], v, rtol=0, atol=1e-12)


def test_retried_round_reports_the_bytes_and_failures_of_every_attempt(tmp_path):
    # Prepare: uniform sampling of 4 of 8 clients; a sample holding client 0 or 1 is discarded
    recipe = toy_recipe(name="retry_bytes", partition={"num_clients": 8},
                        federation={"rounds": 6, "fraction": 0.5, "min_clients": 4, "on_too_few": "retry",
                                    "max_retries": 20},
                        faults={"error_clients": [0], "nan_clients": [1]})
    exp = FaultyToy(recipe)
    payload = exp.payload_bytes(exp.initial_state)
    # Execute
    rows = _run(tmp_path, exp)
    # Assert: every attempt's 4 sampled clients downloaded the model; every raise is counted
    retried = [r for r in rows[1:] if r["attempts"] > 1]
    assert retried
    for r in retried:
        assert r["bytes_down"] == r["attempts"] * 4 * payload
        assert r["failed_clients"] == sum(q == r["round"] for q, _ in exp.raised)


def test_retry_exhausted_skips_the_round(tmp_path):
    recipe = toy_recipe(name="exhausted", federation={"rounds": 2, "min_clients": 2, "on_too_few": "retry",
                                                      "max_retries": 2},
                        faults={"error_clients": [0, 1, 2], "rounds": [1]})
    exp = FaultyToy(recipe)
    rows = _run(tmp_path, exp)
    assert rows[1]["applied"] is False and rows[1]["attempts"] == 3 and rows[2]["applied"] is True
    for k, v in exp.initial_state.items():
        assert torch.equal(exp.evaluated[1][k], v)


# ----------------------------------------------------------------------------- malformed updates


def _extra_key(d):
    return {**d, "lin.extra": torch.zeros(2, dtype=torch.float64)}


def _missing_key(d):
    return {k: v for k, v in d.items() if k != "lin.bias"}


def _wrong_shape(d):
    return {**d, "lin.bias": torch.zeros(7, dtype=torch.float64)}


def _wrong_dtype(d):
    return {k: v.float() for k, v in d.items()}


def _huge(d):
    return {k: v + 1e6 for k, v in d.items()}


MALFORMED = {1: _extra_key, 2: _missing_key, 3: _wrong_shape, 4: _wrong_dtype, 5: _huge}
REASONS = {1: "keys differ", 2: "keys differ", 3: "lin.bias: shape (7,)", 4: "dtype torch.float32",
           5: "exceeds federation.reject_norm"}


def _malformed_recipe(name, **groups):
    return toy_recipe(name=name, partition={"num_clients": 7},
                      federation={"rounds": 2, "reject_norm": 1e3, **groups.pop("federation", {})}, **groups)


def test_malformed_updates_are_rejected_with_their_reason(tmp_path):
    # Prepare
    exp = FaultyToy(_malformed_recipe("malformed"), malform=MALFORMED)
    # Execute
    rows = _run(tmp_path, exp)
    # Assert: each bad client is in `rejected` with its reason; the rest is the plain mean
    for r in rows[1:]:
        assert sorted(int(k) for k in r["rejected"]) == sorted(MALFORMED)
        for k, why in r["rejected"].items():
            assert REASONS[int(k)] in why, (k, why)
        assert r["aggregated_clients"] == [0, 6] and r["rejected_updates"] == len(MALFORMED)
        good = [u for u in exp.updates(r["round"]) if u.client_id in (0, 6)]
        expected = add(exp.evaluated[r["round"] - 1], mean_delta(good, weighted=True))
        for k, v in expected.items():
            torch.testing.assert_close(exp.evaluated[r["round"]][k], v, rtol=0, atol=1e-12)


# Under client-level DP the huge update is clipped to privacy.clip before it leaves the client, so
# it satisfies the norm bound; under secure aggregation the server never sees an update's norm
# (reject_norm cannot be enforced there: that is what robust aggregators give up under SecAgg).
NORM_HIDDEN = {"client_dp", "secure_aggregation"}
SERVER_VARIANTS = {
    "q8_error_feedback": {"compression": {"codec": "q8", "error_feedback": True}},
    "topk": {"compression": {"codec": "topk", "topk_fraction": 0.5, "error_feedback": True}},
    "scaffold": {"federation": {"algorithm": "scaffold"}},
    "client_dp": {"federation": {"weighted": False}, "privacy": {"dp": "client", "clip": 10.0,
                                                                 "noise_multiplier": 0.1}},
    "secure_aggregation": {"federation": {"weighted": False},
                           "privacy": {"secure_aggregation": True, "secagg_threshold": 0.4}},
    "median": {"robust": {"aggregator": "median"}},
}


@pytest.mark.parametrize("variant", sorted(SERVER_VARIANTS))
def test_malformed_updates_never_crash_any_server_configuration(tmp_path, variant):
    """A malformed update is rejected as it arrives, before any upload-side transform (codecs, error
    feedback, SCAFFOLD controls, DP noise, masking) could crash on it; the norm bound is checked
    on what the server receives, so client DP clipping and secure aggregation hide it."""
    # Prepare
    exp = FaultyToy(_malformed_recipe(variant, **SERVER_VARIANTS[variant]), malform=MALFORMED)
    # Execute
    rows = _run(tmp_path, exp)
    # Assert
    bad = sorted(k for k in MALFORMED if not (k == 5 and variant in NORM_HIDDEN))
    for r in rows[1:]:
        assert r["applied"] and sorted(int(k) for k in r["rejected"]) == bad, r["rejected"]
        for k, why in r["rejected"].items():
            assert REASONS[int(k)] in why, (k, why)
        assert r["aggregated_clients"] == sorted({0, 5, 6} - set(bad))
    assert all(bool(torch.isfinite(v).all()) for v in exp.saved.values())


# ----------------------------------------------------------------------------- the real recipe, tiny LLM

LLM_OVERRIDES = ["partition.num_clients=4", "federation.rounds=1", "federation.min_clients=2",
                 "train.local_steps=1", "data.eval_size=4",
                 "faults.error_prob=0", "faults.nan_prob=0", "faults.dropout_prob=0",
                 "faults.straggler_fraction=0", "faults.error_clients=[0]", "faults.nan_clients=[2]",
                 "checkpoint.enabled=false", "output.save_adapter=false", "output.plots=false"]


@pytest.mark.slow
def test_tiny_llm_faults_equal_a_clean_run_with_the_same_survivors(tmp_path, monkeypatch):
    from fedllm.experiments.lm import LMExperiment

    # Prepare: the recipe on the tiny LLM; client 0 raises, client 2 returns NaN, every round
    # (a small JSONL instead of the built-in corpus, which takes seconds to build)
    data = tmp_path / "pairs.jsonl"
    data.write_text("".join(f'{{"prompt": "What colour is item {i}?", "response": "Item {i} is '
                            f'{("red", "blue", "green")[i % 3]}."}}\n' for i in range(40)), encoding="utf-8")
    recipe = load_recipe(FAULTS_RECIPE, [*LLM_OVERRIDES, "data.builtin=null", f"data.path={data}",
                                         "data.max_examples=null"])
    exp = LMExperiment(recipe)
    rows = _run(tmp_path, exp)
    # Assert (faulty run)
    for r in rows[1:]:
        assert r["applied"] and r["failed_clients"] == 1 and list(r["rejected"]) == ["2"]
        assert r["aggregated_clients"] == [1, 3]
    # Execute: the clean twin on the same model object, sampling exactly the survivors
    exp.recipe = _clean_twin(recipe)
    _sample_exactly(monkeypatch, _survivors(rows))
    clean_rows = _run(tmp_path, exp)
    # Assert: float32 on CPU, same operations in the same order: equal to 1e-6
    assert all(r["rejected"] == {} and r["failed_clients"] == 0 for r in clean_rows[1:])
    for a, b in zip(rows, clean_rows, strict=True):
        assert math.isfinite(a["eval_loss"])
        assert a["eval_loss"] == pytest.approx(b["eval_loss"], rel=1e-6, abs=1e-6)
