"""Privacy through the engine: run_federated + FederatedServer with DP, the ledger and secure aggregation.

The pure math has unit tests (test_privacy: clipping, noise, adaptive clip, accountants, DP-SGD;
test_secure: Shamir, fixed point, masks, 1-of-5 dropout after masking, masked-update
independence). Here each ``privacy:`` option of a recipe is driven through real rounds on the toy
experiment (tests/_toy.py; one slow test on the tiny LLM) and what comes out (metrics.jsonl rows,
the global state) is compared with opacus' own accountant, with the run without the option, or
with the pure function applied to the very updates the clients returned.
"""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path

import pytest
import torch
from opacus.accountants import PRVAccountant, RDPAccountant
from opacus.accountants.utils import get_noise_multiplier

from fedllm.algorithms.aggregate import MeanAggregator
from fedllm.algorithms.privacy import DPAggregator, DPConfig
from fedllm.algorithms.secure import fixed_point_error_bound
from fedllm.cli import main
from fedllm.config import RecipeError
from fedllm.experiments.base import ClientFault
from fedllm.federation.modes import run_federated
from fedllm.federation.rundir import read_metrics
from fedllm.federation.server import SECAGG_SCALE_BITS, FederatedServer
from fedllm.types import add, subtract
from tests._toy import ToyExperiment, toy_recipe

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "recipes" / "tiny.yaml"
UNIFORM = {"algorithm": "gradualdiff", "weighted": False}
# the mean of K masked inputs is off by at most 2^-(s+1) per coordinate (K·2^-(s+1) on the sum, /K)
MEAN_BOUND = fixed_point_error_bound(1, SECAGG_SCALE_BITS)


def rounds_bound(rounds: int) -> float:
    """Fixed-point error after ``rounds`` secure rounds: one MEAN_BOUND per round, carried through
    local least-squares SGD steps, which do not amplify it at the toy's learning rate."""
    return rounds * MEAN_BOUND + 1e-15


class FaultyToy(ToyExperiment):
    """The toy with LMExperiment's fault injection: ``faults.error_clients`` raise in ``fit``."""

    def fit(self, client_id, examples, start, rnd, steps, grad_term=None):
        if self.recipe.faults.fires(client_id, rnd, "error"):
            raise ClientFault(f"injected failure of client {client_id} in round {rnd}")
        return super().fit(client_id, examples, start, rnd, steps, grad_term)


class Interrupted(ToyExperiment):
    """Dies (like a killed process: not an ``Exception``, so no client-failure handling) in ``round``."""

    def __init__(self, recipe, round: int) -> None:
        super().__init__(recipe)
        self.die_in = round

    def fit(self, client_id, examples, start, rnd, steps, grad_term=None):
        if rnd == self.die_in:
            raise KeyboardInterrupt
        return super().fit(client_id, examples, start, rnd, steps, grad_term)


def run(tmp_path: Path, recipe, cls=ToyExperiment, **kw) -> tuple[ToyExperiment, list[dict]]:
    exp = cls(recipe, **kw)
    run_federated(exp, out=str(tmp_path))
    return exp, read_metrics(tmp_path / recipe.name / "federated")


def private(name: str, rounds: int = 3, fraction: float = 1.0, **privacy) -> object:
    return toy_recipe(name=name, federation={**UNIFORM, "rounds": rounds, "fraction": fraction},
                      privacy=privacy)


def max_abs_diff(a, b) -> float:
    assert a.keys() == b.keys()
    return max(float((a[k] - b[k]).abs().max()) for k in a)


def opacus_epsilons(accountant, sigma: float, q: float, rounds: int, delta: float) -> list[float]:
    """ε after each round, from opacus' own accountant stepped once per round."""
    acc, out = accountant(), []
    for _ in range(rounds):
        acc.step(noise_multiplier=sigma, sample_rate=q)
        out.append(acc.get_epsilon(delta=delta))
    return out


# ----------------------------------------------------------------------------- accounting


def wor_epsilons(sigma: float, n: int, m: int, rounds: int, delta: float) -> list[float]:
    """ε after each round of m-of-n sampling without replacement, from dp_accounting directly."""
    import dp_accounting
    from dp_accounting.rdp import rdp_privacy_accountant

    out = []
    for t in range(1, rounds + 1):
        acc = rdp_privacy_accountant.RdpAccountant(neighboring_relation=dp_accounting.NeighboringRelation.REPLACE_ONE)
        acc.compose(dp_accounting.SampledWithoutReplacementDpEvent(n, m, dp_accounting.GaussianDpEvent(sigma)), t)
        out.append(acc.get_epsilon(delta))
    return out


# For every sampler x DP mode the validator accepts: the ε fedllm writes, next to an independent
# computation (opacus or dp_accounting) for the mechanism the run really applied. 4 clients, σ 1.1,
# δ 1e-4, 2 rounds. opacus' ε for q < 1 costs ~1 s per call, so the cases stay few.
SIGMA, DELTA = 1.1, 1e-4
SCHEMES = {
    # the default sampler draws 2 of 4 without replacement: RDP for that sampling (replace-one)
    "uniform-2of4-server": (dict(fraction=0.5, dp="server"), {},
                            lambda: wor_epsilons(SIGMA, 4, 2, 2, DELTA), None),
    # every client every round: no amplification, opacus at q = 1 (PRV too)
    "uniform-all-client-secagg-prv": (dict(fraction=1.0, dp="client", secure_aggregation=True, accountant="prv"), {},
                                      lambda: opacus_epsilons(PRVAccountant, SIGMA, 1.0, 2, DELTA), None),
    # client DP, no secure aggregation: the server sees each upload with sigma/sqrt(m) of noise;
    # round-robin is deterministic: q = 1
    "round-robin-client-local": (dict(fraction=0.5, dp="client"), {"method": "round_robin"},
                                 lambda: opacus_epsilons(RDPAccountant, SIGMA / math.sqrt(2), 1.0, 2, DELTA),
                                 lambda: opacus_epsilons(RDPAccountant, SIGMA, 1.0, 2, DELTA)),
    # importance sampling (size-weighted): no amplification claimed, q = 1
    "importance-server": (dict(fraction=0.5, dp="server"), {"method": "importance"},
                          lambda: opacus_epsilons(RDPAccountant, SIGMA, 1.0, 2, DELTA), None),
    # client DP under secure aggregation, 2 of 4: the aggregate's sigma holds against the server
    "uniform-2of4-client-secagg": (dict(fraction=0.5, dp="client", secure_aggregation=True), {},
                                   lambda: wor_epsilons(SIGMA, 4, 2, 2, DELTA), None),
    # client DP, 2 of 4 uniformly: without-replacement RDP at the upload's sigma/sqrt(2)
    "uniform-2of4-client-local": (dict(fraction=0.5, dp="client"), {},
                                  lambda: wor_epsilons(SIGMA / math.sqrt(2), 4, 2, 2, DELTA),
                                  lambda: wor_epsilons(SIGMA, 4, 2, 2, DELTA)),
}


@pytest.mark.parametrize("case", list(SCHEMES))
def test_epsilon_in_every_row_is_the_independent_answer_for_the_real_sampler(tmp_path, case):
    groups, selection, expected, central = SCHEMES[case]
    groups = dict(groups)
    fraction = groups.pop("fraction", 1.0)
    recipe = toy_recipe(name="eps", federation={**UNIFORM, "rounds": 2, "fraction": fraction},
                        privacy={"clip": 0.5, "noise_multiplier": SIGMA, "delta": DELTA, **groups},
                        selection=selection)
    # Execute
    _, rows = run(tmp_path, recipe)
    # Assert: every trained row carries sigma and the independent epsilon after that many rounds
    trained = rows[1:]
    assert all(r["applied"] and r["noise_multiplier"] == SIGMA for r in trained)
    for r, eps in zip(trained, expected()):
        assert r["epsilon"] == pytest.approx(eps, rel=0.01), case
    if central is None:
        assert all("epsilon_central" not in r for r in trained)
    else:  # the aggregate-only epsilon is reported beside it, and is smaller
        for r, eps in zip(trained, central()):
            assert r["epsilon_central"] == pytest.approx(eps, rel=0.01) and r["epsilon_central"] < r["epsilon"]
    summary = json.loads((tmp_path / recipe.name / "federated" / "summary.json").read_text())
    assert summary["privacy"]["sampling"] in ("without_replacement", "full")
    assert "server" in summary["privacy"]["epsilon_holds_against"]
    assert 0 < trained[0]["epsilon"] < trained[-1]["epsilon"]  # composition spends more each round


def test_poisson_sampling_is_accounted_as_poisson_with_a_fixed_denominator(tmp_path):
    # Prepare: 6 clients, each joins a round with probability 0.3 (some rounds may have none)
    recipe = toy_recipe(name="poisson", partition={"method": "iid", "num_clients": 6},
                        federation={**UNIFORM, "rounds": 4, "fraction": 0.3}, selection={"method": "poisson"},
                        privacy={"dp": "server", "clip": 0.5, "noise_multiplier": SIGMA, "delta": DELTA})
    # Execute
    _, rows = run(tmp_path, recipe)
    # Assert: every round is charged as one Poisson-subsampled Gaussian at q = 0.3 (opacus directly),
    # whether or not anyone was drawn; the sampled sets differ in size
    for r, eps in zip(rows[1:], opacus_epsilons(RDPAccountant, SIGMA, 0.3, 4, DELTA)):
        assert r["epsilon"] == pytest.approx(eps, rel=1e-9)
    assert len({len(r["clients"]) for r in rows[1:]}) > 1
    # the server's DP mean divides the clipped sum by the expected count qK = 1.8, not by the count
    from fedllm.algorithms.aggregate import MeanAggregator as Mean
    from fedllm.types import ClientUpdate

    agg = DPAggregator(Mean(weighted=False), DPConfig(noise_multiplier=0.0, clip_norm=10.0), 1, 0, expected=1.8)
    ups = [ClientUpdate(i, {"w": torch.tensor([float(i + 1)])}, 1, 1, 0.0) for i in range(3)]
    assert float(agg(ups)["w"]) == pytest.approx((1 + 2 + 3) / 1.8)


@pytest.mark.parametrize(("privacy", "selection", "field"), [
    ({"dp": "server", "accountant": "prv"}, {}, "privacy.accountant"),  # PRV models Poisson, not 2-of-4
    ({"dp": "client"}, {"method": "power_of_choice"}, "selection.method"),  # picks by loss: data-dependent
    ({"dp": "client"}, {"method": "poisson"}, "selection.method"),  # no fixed denominator for client noise
])
def test_a_sampler_no_accountant_bounds_is_refused_with_one_line(privacy, selection, field):
    with pytest.raises(RecipeError, match=field.replace(".", r"\.")):
        toy_recipe(federation={**UNIFORM, "fraction": 0.5}, selection=selection,
                   privacy={"clip": 0.5, "noise_multiplier": 1.0, **privacy})


def test_target_epsilon_derives_sigma_that_stays_within_the_target(tmp_path):
    # Prepare: no noise_multiplier given; the server solves for sigma over the 5 planned rounds
    target, delta, rounds, q = 2.0, 1e-5, 5, 1.0
    recipe = private("target", rounds=rounds, fraction=1.0, dp="server", clip=0.5, target_epsilon=target,
                     delta=delta)
    # Execute
    _, rows = run(tmp_path, recipe)
    # Assert: sigma is opacus' own solution; the final epsilon is at most the target, and within the
    # search tolerance (0.01) of it, so sigma is not needlessly large
    sigma = get_noise_multiplier(target_epsilon=target, target_delta=delta, sample_rate=q, steps=rounds,
                                 accountant="rdp")
    final = rows[-1]["epsilon"]
    assert all(r["noise_multiplier"] == pytest.approx(sigma, rel=1e-12) for r in rows[1:])
    assert final <= target
    assert final > target - 0.02
    assert final == pytest.approx(opacus_epsilons(RDPAccountant, sigma, q, rounds, delta)[-1], abs=1e-6)


def test_ledger_resumes_with_the_server_state(tmp_path):
    # Prepare: a run killed in round 3 of 4, with checkpoints, and the same run uninterrupted
    recipe = dataclasses.replace(private("resume", rounds=4, fraction=1.0, dp="server", clip=0.3,
                                         noise_multiplier=0.9),
                                 checkpoint=dataclasses.replace(toy_recipe().checkpoint, enabled=True))
    full, full_rows = run(tmp_path / "full", recipe)
    killed = Interrupted(recipe, round=3)
    with pytest.raises(KeyboardInterrupt):
        run_federated(killed, out=str(tmp_path / "killed"))
    # Execute: resume from the round-2 checkpoint with a fresh process' experiment
    resumed = ToyExperiment(recipe)
    run_federated(resumed, out=str(tmp_path / "killed"), resume=True)
    rows = read_metrics(tmp_path / "killed" / recipe.name / "federated")
    # Assert: same epsilon in every row and the same final state (the DP noise generator resumed too)
    assert len(rows) == 5 and [r.get("epsilon") for r in rows] == [r.get("epsilon") for r in full_rows]
    assert rows[-1]["epsilon"] == pytest.approx(opacus_epsilons(RDPAccountant, 0.9, 1.0, 4, 1e-5)[-1], abs=1e-6)
    assert all(torch.equal(resumed.saved[k], full.saved[k]) for k in full.saved)


def test_server_state_dict_round_trip_keeps_epsilon():
    # Prepare: a server that has accounted two rounds
    recipe = private("sd", rounds=5, fraction=1.0, dp="server", clip=0.3, noise_multiplier=0.7, accountant="prv")
    exp = ToyExperiment(recipe)
    sizes = exp.data.sizes
    server, state = FederatedServer(recipe, exp.initial_state, sizes), exp.initial_state
    for rnd in (1, 2):
        plan = server.begin_round(rnd)
        for k in plan.training:
            server.upload(rnd, exp.fit(k, exp.data.client_examples(k), state, rnd, 2), state)
        state, metrics = server.finish_round(rnd, state)
    # Execute: save, then load into a fresh server
    fresh = FederatedServer(recipe, exp.initial_state, sizes)
    assert fresh.ledger.epsilon() == 0.0
    fresh.load_state_dict(server.state_dict())
    # Assert
    assert fresh.ledger.rounds == 2
    assert fresh.ledger.epsilon() == server.ledger.epsilon() == metrics["epsilon"]
    assert metrics["epsilon"] == pytest.approx(opacus_epsilons(PRVAccountant, 0.7, 1.0, 2, 1e-5)[-1], abs=1e-6)


def test_epsilon_is_in_the_round_zero_row_and_the_summary(tmp_path):
    # Prepare
    recipe = private("summary", rounds=2, dp="server", clip=0.5, noise_multiplier=1.0)
    # Execute
    _, rows = run(tmp_path, recipe)
    summary = json.loads((tmp_path / recipe.name / "federated" / "summary.json").read_text())
    # Assert: nothing spent before training; the summary states the final epsilon
    assert rows[0].get("epsilon") == 0.0
    assert summary["final"].get("epsilon", summary.get("epsilon")) == rows[-1]["epsilon"]


def test_every_attempt_that_released_noised_uploads_is_charged(tmp_path):
    # Prepare: client DP without secure aggregation (the server sees each noised upload), 4 clients,
    # min_clients 3; clients 1 and 2 fail in round 2, in every attempt; 2 retries
    recipe = dataclasses.replace(
        toy_recipe(name="retry", federation={**UNIFORM, "rounds": 2, "min_clients": 3, "on_too_few": "retry",
                                             "max_retries": 2},
                   privacy={"dp": "client", "clip": 0.5, "noise_multiplier": 1.0}),
        faults=dataclasses.replace(toy_recipe().faults, error_clients=[1, 2], rounds=[2]))
    # Execute
    _, rows = run(tmp_path, recipe, cls=FaultyToy)
    # Assert: round 2 applied nothing in 3 attempts, yet clients 0 and 3 uploaded noised updates
    # in each: 1 + 3 releases in all, each at the upload's sigma/sqrt(4) = 0.5, q = 1
    assert rows[2]["attempts"] == 3 and rows[2]["applied"] is False
    assert rows[2]["epsilon"] == pytest.approx(opacus_epsilons(RDPAccountant, 0.5, 1.0, 4, 1e-5)[-1], rel=1e-9)
    assert rows[2]["epsilon"] > rows[1]["epsilon"]


def test_a_round_that_is_not_applied_spends_no_epsilon(tmp_path):
    # Prepare: 4 clients, secure aggregation threshold 3; clients 1 and 2 fail in round 2 only
    recipe = dataclasses.replace(private("skip", rounds=3, dp="client", clip=0.5, noise_multiplier=1.0,
                                         secure_aggregation=True),
                                 faults=dataclasses.replace(toy_recipe().faults, error_clients=[1, 2], rounds=[2]))
    # Execute
    exp, rows = run(tmp_path, recipe, cls=FaultyToy)
    # Assert: round 2 leaves the model alone and releases nothing, so the ledger does not move
    assert [r["applied"] for r in rows[1:]] == [True, False, True]
    assert rows[2]["failed_clients"] == 2
    assert rows[2]["epsilon"] == rows[1]["epsilon"] > 0
    assert torch.equal(exp.evaluated[2]["lin.weight"], exp.evaluated[1]["lin.weight"])
    assert rows[3]["epsilon"] == pytest.approx(opacus_epsilons(RDPAccountant, 1.0, 1.0, 2, 1e-5)[-1], abs=1e-6)


# ----------------------------------------------------------------------------- DP-FedAvg


@pytest.mark.parametrize("dp", ["server", "client"])
def test_dp_with_no_noise_and_a_clip_that_never_binds_equals_plain_fedavg_exactly(tmp_path, dp):
    # Prepare
    plain = toy_recipe(name="plain", federation={**UNIFORM, "rounds": 3})
    dp0 = private(f"dp0_{dp}", dp=dp, clip=1e6, noise_multiplier=0.0)
    # Execute
    e_plain, _ = run(tmp_path, plain)
    e_dp, rows = run(tmp_path, dp0)
    # Assert: bit-identical global state; sigma 0 is no privacy at all: epsilon is inf, written as null
    assert all(torch.equal(e_dp.saved[k], e_plain.saved[k]) for k in e_plain.saved)
    assert all(r["noise_multiplier"] == 0.0 and r["epsilon"] is None for r in rows[1:])


def test_server_dp_round_is_the_pure_dp_aggregator_on_the_clients_updates(tmp_path):
    # Prepare: a binding clip and real noise
    recipe = private("dp_pure", rounds=1, dp="server", clip=0.05, noise_multiplier=1.0)
    # Execute
    exp, rows = run(tmp_path, recipe)
    # Assert: the round applied DP(mean) to exactly what the clients returned, with the server's seed
    updates = exp.updates(1)
    cfg = DPConfig(noise_multiplier=1.0, clip_norm=0.05, mode="server", delta=1e-5)
    expected = add(exp.initial_state, DPAggregator(MeanAggregator(weighted=False), cfg, 4, recipe.seed)(updates))
    assert all(torch.equal(exp.saved[k], expected[k]) for k in expected)
    assert rows[1]["dp_clip"] == 0.05 and rows[1]["dp_unclipped_fraction"] == 0.0
    assert rows[1]["dp_noise_std"] == pytest.approx(1.0 * 0.05 / 4)


class DpsgdToy(ToyExperiment):
    """Reports a cumulative per-example ε the way VisionExperiment's DP-SGD clients do."""

    def fit(self, client_id, examples, start, rnd, steps, grad_term=None):
        upd = super().fit(client_id, examples, start, rnd, steps, grad_term)
        return dataclasses.replace(upd, metrics={**upd.metrics, "dpsgd_epsilon": rnd * (1.0 + client_id)})


def test_dpsgd_epsilon_reaches_every_row_and_the_summary(tmp_path):
    # Prepare: 4 clients, 2 per round; client k's per-example epsilon after round t is t(1 + k)
    recipe = toy_recipe(name="dpsgd_rows", federation={**UNIFORM, "rounds": 3, "fraction": 0.5})
    # Execute
    exp, rows = run(tmp_path, recipe, cls=DpsgdToy)
    summary = json.loads((tmp_path / recipe.name / "federated" / "summary.json").read_text())
    # Assert: each row carries the worst client's epsilon so far (never decreasing), the summary the last
    worst, expected = {}, []
    for r in rows[1:]:
        for k in r["aggregated_clients"]:
            worst[k] = r["round"] * (1.0 + k)
        expected.append(max(worst.values()))
    assert [r["epsilon_dpsgd"] for r in rows[1:]] == expected
    assert expected == sorted(expected) and summary["final"]["epsilon_dpsgd"] == expected[-1]


# ----------------------------------------------------------------------------- secure aggregation


def test_secure_aggregation_equals_plain_mean_within_the_fixed_point_bound(tmp_path):
    # Prepare
    plain = toy_recipe(name="plain1", federation={**UNIFORM, "rounds": 1})
    secure = toy_recipe(name="sec1", federation={**UNIFORM, "rounds": 1}, privacy={"secure_aggregation": True})
    # Execute
    e_plain, _ = run(tmp_path, plain)
    e_sec, rows = run(tmp_path, secure)
    # Assert: one round differs by at most 2^-31 per coordinate; the masked bytes went over the wire
    diff = max_abs_diff(e_sec.saved, e_plain.saved)
    assert 0 < diff <= MEAN_BOUND + 1e-15
    assert rows[1]["secagg_overhead_bytes"] > 0
    assert rows[1]["aggregated_clients"] == [0, 1, 2, 3]


def test_a_client_dropping_after_masking_is_recovered_from_the_survivors_shares(tmp_path):
    # Prepare: 4 clients, threshold 3; client 3 sends its masked update in round 1, then does not
    # answer the unmasking request (its masked input is in the sum: the survivors' shares of its
    # self-mask seed remove that mask, Bonawitz et al. 2017)
    faults = {"unmask_dropout_clients": [3], "rounds": [1]}
    plain = toy_recipe(name="plain_late", federation={**UNIFORM, "rounds": 2})
    late = toy_recipe(name="late", federation={**UNIFORM, "rounds": 2}, privacy={"secure_aggregation": True},
                      faults=faults)
    on_time = toy_recipe(name="on_time", federation={**UNIFORM, "rounds": 2}, privacy={"secure_aggregation": True})
    # Execute
    e_plain, _ = run(tmp_path, plain)
    e_late, rows = run(tmp_path, late)
    _, rows_on_time = run(tmp_path, on_time)
    # Assert: the unmask path ran with a late dropout (client 3 revealed no shares: fewer protocol
    # bytes than the same round without it); the model is the plain mean of every client whose
    # masked input arrived, within the fixed-point bound
    assert rows[1]["unmask_dropouts"] == [3] and rows[1]["applied"]
    assert rows[1]["secagg_overhead_bytes"] < rows_on_time[1]["secagg_overhead_bytes"]
    assert rows[2]["secagg_overhead_bytes"] == rows_on_time[2]["secagg_overhead_bytes"]
    assert rows[1]["aggregated_clients"] == [0, 1, 2, 3] and "unmask_dropouts" not in rows[2]
    assert max_abs_diff(e_late.saved, e_plain.saved) <= rounds_bound(2)


def test_too_few_survivors_to_unmask_is_a_round_not_applied(tmp_path):
    # Prepare: two of four clients drop after masking in round 1: 2 survivors < threshold 3
    recipe = toy_recipe(name="late2", federation={**UNIFORM, "rounds": 2}, privacy={"secure_aggregation": True},
                        faults={"unmask_dropout_clients": [2, 3], "rounds": [1]})
    # Execute
    exp, rows = run(tmp_path, recipe)
    # Assert: round 1 is not applied (no crash, model unchanged), round 2 is
    assert [r["applied"] for r in rows[1:]] == [False, True]
    assert rows[1]["unmask_dropouts"] == [2, 3]
    assert torch.equal(exp.evaluated[1]["lin.weight"], exp.evaluated[0]["lin.weight"])


def test_secure_aggregation_over_rounds_and_with_client_dp(tmp_path):
    # Prepare: client-side DP noise under secure aggregation (the distributed-DP composition)
    dp = {"dp": "client", "clip": 0.5, "noise_multiplier": 1.0}
    plain = private("cdp", rounds=3, **dp)
    secure = private("cdp_sec", rounds=3, **dp, secure_aggregation=True)
    # Execute
    e_plain, r_plain = run(tmp_path, plain)
    e_sec, r_sec = run(tmp_path, secure)
    # Assert: same noisy model up to the accumulated fixed-point error. The epsilon that holds
    # against the server is the aggregate's only under secure aggregation; without it the server
    # sees each upload with sigma/sqrt(4) of noise, and the aggregate's epsilon is reported beside
    assert max_abs_diff(e_sec.saved, e_plain.saved) <= rounds_bound(3)
    assert [r["epsilon"] for r in r_sec[1:]] == [r["epsilon_central"] for r in r_plain[1:]]
    assert all(p["epsilon"] > s["epsilon"] for p, s in zip(r_plain[1:], r_sec[1:]))
    assert r_plain[-1]["epsilon"] == pytest.approx(opacus_epsilons(RDPAccountant, 0.5, 1.0, 3, 1e-5)[-1], rel=1e-9)
    assert r_sec[-1]["epsilon"] > 0 and "epsilon_central" not in r_sec[-1]


def test_secure_aggregation_survives_a_failing_client(tmp_path):
    # Prepare: 4 clients each round (threshold ceil(0.6 * 4) = 3); client 2 raises in training
    faults = dataclasses.replace(toy_recipe().faults, error_clients=[2])
    plain = dataclasses.replace(toy_recipe(name="fplain", federation={**UNIFORM, "rounds": 2}), faults=faults)
    secure = dataclasses.replace(toy_recipe(name="fsec", federation={**UNIFORM, "rounds": 2},
                                            privacy={"secure_aggregation": True}), faults=faults)
    # Execute
    e_plain, _ = run(tmp_path, plain, cls=FaultyToy)
    e_sec, rows = run(tmp_path, secure, cls=FaultyToy)
    # Assert: every round applied the survivors' mean (the dropped client's pairwise masks rebuilt
    # from Shamir shares), equal to the plain survivors' mean within the fixed-point bound
    for r in rows[1:]:
        assert r["applied"] and r["failed_clients"] == 1 and r["aggregated_clients"] == [0, 1, 3]
    assert max_abs_diff(e_sec.saved, e_plain.saved) <= rounds_bound(2)
    assert max_abs_diff(e_sec.saved, e_plain.initial_state) > 1e-3  # it did train


def test_server_dp_with_secure_aggregation_clips_and_noises_or_is_rejected(tmp_path):
    """dp: server + secure_aggregation must either be rejected by the validator or really be DP."""
    # Prepare
    try:
        clipped = private("sdp_clip", rounds=1, dp="server", clip=1e-3, noise_multiplier=0.0,
                          secure_aggregation=True)
        noised = private("sdp_noise", rounds=1, dp="server", clip=1e6, noise_multiplier=1.0,
                         secure_aggregation=True)
    except RecipeError as err:  # a validator rule is an acceptable fix
        assert err.where.startswith("privacy.")
        return
    plain = private("sdp_plain", rounds=1, secure_aggregation=True)
    # Execute
    e_clip, _ = run(tmp_path, clipped)
    e_noise, _ = run(tmp_path, noised)
    e_plain, _ = run(tmp_path, plain)
    # Assert: the mean of updates clipped to C has norm <= C; sigma 1 with C = 1e6 moves the model
    step = subtract(e_clip.saved, e_clip.initial_state)
    assert math.sqrt(sum(float((v ** 2).sum()) for v in step.values())) <= 1e-3 * (1 + 1e-6)
    assert max_abs_diff(e_noise.saved, e_plain.saved) > 1.0


@pytest.mark.slow
def test_tiny_llm_secure_aggregation_with_client_dp_and_a_failing_client(tiny_experiment, tiny_recipe, tmp_path):
    """The real LoRA client: 3 clients, client 1 raises; secagg + client DP still aggregates 2."""
    # Prepare
    r = tiny_recipe
    recipe = dataclasses.replace(
        r, name="tiny_secagg",
        federation=dataclasses.replace(r.federation, rounds=1, fraction=1.0, weighted=False),
        train=dataclasses.replace(r.train, local_steps=1),
        eval=dataclasses.replace(r.eval, bleu_samples=0),
        privacy=dataclasses.replace(r.privacy, dp="client", clip=0.5, noise_multiplier=0.8, secure_aggregation=True),
        faults=dataclasses.replace(r.faults, error_clients=[1]),
        checkpoint=dataclasses.replace(r.checkpoint, enabled=False),
        output=dataclasses.replace(r.output, save_adapter=False))
    old, tiny_experiment.recipe = tiny_experiment.recipe, recipe
    try:
        # Execute
        run_federated(tiny_experiment, out=str(tmp_path))
    finally:
        tiny_experiment.recipe = old
    rows = read_metrics(tmp_path / "tiny_secagg" / "federated")
    # Assert
    row = rows[1]
    assert row["applied"] and row["failed_clients"] == 1 and row["aggregated_clients"] == [0, 2]
    assert row["epsilon"] == pytest.approx(opacus_epsilons(RDPAccountant, 0.8, 1.0, 1, 1e-5)[-1], abs=1e-6)
    assert row["eval_loss"] != rows[0]["eval_loss"]


# ----------------------------------------------------------------------------- the validator


@pytest.mark.parametrize("command", ["validate", "run"])
@pytest.mark.parametrize("overrides,field,words", [
    (["privacy.secure_aggregation=true", "robust.aggregator=median"], "privacy.secure_aggregation", "sum"),
    (["privacy.dp=server", "federation.weighted=true"], "federation.weighted", "sensitivity"),
    (["privacy.dp=client", "robust.aggregator=trimmed_mean"], "privacy.dp", "mean"),
    (["privacy.dpsgd=true", "federation.algorithm=fedprox"], "privacy.dpsgd", "gradient term"),
])
def test_incompatible_privacy_recipes_exit_2_with_one_line(capsys, tmp_path, command, overrides, field, words):
    # Execute
    argv = [command, str(TINY), *overrides] + (["--out", str(tmp_path)] if command == "run" else [])
    code = main(argv)
    # Assert: exit 2, one line on stderr naming the field and the reason; run wrote nothing
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1, err
    assert field in err[0] and words in err[0]
    assert not any(tmp_path.iterdir())


# ----------------------------------------------------------------------------- DP-SGD on LoRA (a finding)


@pytest.mark.slow
def test_opacus_per_sample_gradients_work_for_lora_over_a_4bit_base():
    """Pins what the privacy.dpsgd rejection for LMs must not claim: opacus' hooks sit on the
    trainable nn.Linear factors (lora_A/lora_B) only, and their per-sample gradients through the
    frozen bitsandbytes NF4 base equal per-example autograd exactly. What is missing is the LoRA
    client's DP-SGD loop (Lightning module + DPOptimizer + Poisson sampling), not opacus support."""
    from opacus import GradSampleModule

    from fedllm.config import load_recipe
    from fedllm.models.llm import add_lora, load_base

    # Prepare: the tiny llama in NF4 with LoRA on q/v, B made non-zero so A gets gradients too
    recipe = load_recipe(TINY, ["lora.dropout=0.0"])
    base, _ = load_base(recipe.model, recipe.seed)
    model = add_lora(base, recipe.lora, recipe.seed).train()
    assert "Linear4bit" in type(model.base_model.model.model.layers[0].self_attn.q_proj.base_layer).__name__
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.02, generator=torch.Generator().manual_seed(0))
    params = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    ids = torch.randint(0, 1000, (2, 12), generator=torch.Generator().manual_seed(1))

    def nll(logits, targets):
        return torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]),
                                                 targets[:, 1:].reshape(-1), reduction="sum")

    # Execute: opacus' per-sample gradients of a batch of 2, then plain autograd one example at a time
    gsm = GradSampleModule(model, batch_first=True, loss_reduction="sum")
    try:
        nll(gsm(input_ids=ids).logits, ids).backward()
        per_sample = {n: p.grad_sample.detach().clone() for n, p in params}
    finally:
        gsm._close()
    single = [torch.autograd.grad(nll(model(input_ids=ids[i:i + 1]).logits, ids[i:i + 1]), [p for _, p in params])
              for i in range(2)]
    # Assert
    assert len(params) == 8  # A and B of q_proj and v_proj in 2 layers
    for j, (name, _) in enumerate(params):
        for i in range(2):
            torch.testing.assert_close(per_sample[name][i], single[i][j], rtol=1e-5, atol=1e-6, msg=name)
        assert per_sample[name].abs().max() > 0


def test_the_lora_dpsgd_step_is_clip_sum_noise_over_the_expected_batch():
    """DPSGDLMModule's gradient, checked against per-example autograd: Σᵢ clip_C(gᵢ) + N(0, σ²C²), / B."""
    from fedllm.client.lm import DPSGDLMModule, per_example_loss
    from fedllm.config import load_recipe
    from fedllm.models.llm import add_lora, load_base
    from fedllm.models.state import TrainableState

    # Prepare: the tiny llama in NF4 + LoRA, B non-zero (so A has gradients), a batch of 3
    recipe = load_recipe(TINY, ["lora.dropout=0.0"])
    base, _ = load_base(recipe.model, recipe.seed)
    model = add_lora(base, recipe.lora, recipe.seed).train()
    with torch.no_grad():
        for name, prm in model.named_parameters():
            if "lora_B" in name:
                prm.normal_(0, 0.02, generator=torch.Generator().manual_seed(0))
    state = TrainableState(model)
    params = [prm for prm in state.parameters() if prm.requires_grad]
    ids = torch.randint(0, 1000, (3, 10), generator=torch.Generator().manual_seed(1))
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()}
    clip, sigma, expected_batch = 0.05, 0.7, 4
    single = [torch.autograd.grad(per_example_loss(model(input_ids=ids[i:i + 1]).logits, ids[i:i + 1]).sum(), params)
              for i in range(3)]
    # Execute
    module = DPSGDLMModule(model, state, recipe.train, 1, sigma, clip, expected_batch, seed=5)
    try:
        module.training_step(batch, 0).backward()
        module.on_after_backward()
        got = [prm.grad.clone() for prm in params]
    finally:
        module.close()
    # Assert
    gen = torch.Generator().manual_seed(5)
    norms = [torch.sqrt(sum(g.double().square().sum() for g in gi)) for gi in single]
    assert max(norms) > clip  # the clip binds for some example
    for j, prm in enumerate(params):
        clipped = sum(single[i][j] * min(1.0, clip / (float(norms[i]) + 1e-6)) for i in range(3))
        noise = torch.randn(prm.shape, generator=gen, dtype=torch.float32) * (sigma * clip)
        torch.testing.assert_close(got[j], (clipped + noise) / expected_batch, rtol=1e-4, atol=1e-7)
    assert module.raw_grad_steps == 1
    assert all(getattr(prm, "grad_sample", None) is None for prm in model.parameters())


def test_dpsgd_on_the_tiny_4bit_lora_recipe_reports_opacus_epsilon_per_round(tmp_path):
    from fedllm.config import load_recipe

    # Prepare: 2 clients of 24 examples, batch 4 (q = 1/6), 2 steps a round, 2 rounds
    overrides = ["privacy.dpsgd=true", "privacy.dpsgd_noise=1.0", "privacy.dpsgd_clip=1.0",
                 "federation.algorithm=gradualdiff", "federation.rounds=2", "partition.num_clients=2",
                 "train.local_steps=2", "train.batch_size=4", "eval.bleu_samples=0", "data.max_examples=56",
                 "data.eval_size=8", "output.save_adapter=false"]
    recipe = load_recipe(TINY, overrides)
    # Execute
    assert main(["run", str(TINY), *overrides, "--out", str(tmp_path)]) == 0
    rows = read_metrics(tmp_path / recipe.name / "federated")
    summary = json.loads((tmp_path / recipe.name / "federated" / "summary.json").read_text())
    # Assert: every client trained both rounds: its epsilon is opacus' RDP for Poisson q over 4 steps
    sizes = {int(k): len(v) for k, v in json.loads((tmp_path / recipe.name / "federated" /
                                                    "partition.json").read_text())["clients"].items()}
    for r, steps in zip(rows[1:], (2, 4)):
        expected = []
        for n in sizes.values():
            acc = RDPAccountant()
            acc.history = [(1.0, 4 / n, steps)]
            expected.append(acc.get_epsilon(1e-5))
        assert r["epsilon_dpsgd"] == pytest.approx(max(expected), rel=1e-9)
        assert r["applied"] and r["eval_loss"] != rows[0]["eval_loss"]
    assert summary["final"]["epsilon_dpsgd"] == rows[-1]["epsilon_dpsgd"] and summary["status"] == "ok"
