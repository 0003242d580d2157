"""The privacy audit's math (fedllm.algorithms.audit) on mechanisms whose ε is known exactly.

Randomized response with ε is pure ε-DP and tight: the one-run bound of Steinke et al. (2023) must
stay below ε on every seed and come close to it with many canaries. The Gaussian mechanism's exact
(ε, δ) curve (Balle & Wang, 2018) caps the bound too. Canary clients pushed through fedllm's own
DP aggregator give a bound below the accountant's ε, and a mechanism that adds less noise than it
claims is caught.
"""

from __future__ import annotations

import math
from statistics import NormalDist

import numpy as np
import pytest
import torch

from fedllm.algorithms.audit import (
    CanaryClients,
    auc,
    auc_interval,
    audit_bound,
    epsilon_lower_bound,
    guess_counts,
    p_value,
    plan_canaries,
    tpr_at_fpr,
)


def randomized_response(members: np.ndarray, eps: float, rng) -> list[float]:
    """Each canary's bit reported truthfully with probability e^ε / (1 + e^ε) (tie-broken by noise)."""
    keep = rng.random(len(members)) < math.exp(eps) / (1 + math.exp(eps))
    return (np.where(keep, members, ~members) + 1e-3 * rng.random(len(members))).tolist()


def gaussian_epsilon(sigma: float, delta: float) -> float:
    """Exact ε(δ) of the Gaussian mechanism with sensitivity 1 and noise σ (Balle & Wang, 2018, Thm 8)."""
    phi = NormalDist().cdf

    def delta_of(eps: float) -> float:
        return phi(-eps * sigma + 1 / (2 * sigma)) - math.exp(eps) * phi(-eps * sigma - 1 / (2 * sigma))

    lo, hi = 0.0, 200.0
    for _ in range(200):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if delta_of(mid) > delta else (lo, mid)
    return hi


def test_randomized_response_bound_is_below_epsilon_and_close_with_many_canaries():
    # Prepare: ε = 2 randomized response on 6,000 canaries
    rng = np.random.default_rng(0)
    members = rng.random(6000) < 0.5
    # Execute
    bound = audit_bound(randomized_response(members, 2.0, rng), members.tolist(), 0.0, 0.05)
    # Assert: valid and tight (Steinke et al.'s Fig. 1: the bound approaches ε as m grows)
    assert 1.7 < bound.epsilon <= 2.0  # 1.88


def test_randomized_response_bound_never_exceeds_epsilon_over_seeds():
    for seed in range(15):
        rng = np.random.default_rng(100 + seed)
        members = rng.random(400) < 0.5
        assert audit_bound(randomized_response(members, 1.0, rng), members.tolist(), 0.0, 0.05).epsilon <= 1.0


@pytest.mark.parametrize(("sigma", "at_least"), [(0.4, 3.5), (1.0, 1.5)])
def test_gaussian_mechanism_on_canaries_bound_is_below_its_exact_epsilon(sigma, at_least):
    rng = np.random.default_rng(1)
    members = rng.random(4000) < 0.5
    scores = (members + rng.normal(0, sigma, len(members))).tolist()
    bound = audit_bound(scores, members.tolist(), 1e-5, 0.05)
    assert at_least < bound.epsilon <= gaussian_epsilon(sigma, 1e-5)  # σ = 1: 1.98 of an exact 4.38


def test_p_value_and_bound_edge_cases():
    assert p_value(10, 0, 0, 1.0, 0.0) == 1.0  # no guesses: no evidence
    assert epsilon_lower_bound(100, 10, 5, 1e-5, 0.05) == 0.0  # chance level
    assert epsilon_lower_bound(1000, 100, 100, 0.0, 0.05) > epsilon_lower_bound(1000, 50, 50, 0.0, 0.05) > 0
    assert guess_counts([0.1, 0.9, 0.5, 0.2], [False, True, True, False], 1, 1) == (2, 2)


def test_auc_interval_and_tpr():
    members = [True] * 50 + [False] * 50
    perfect = list(range(100, 50, -1)) + list(range(50))
    assert auc(perfect, members) == 1.0 and tpr_at_fpr(perfect, members) == 1.0
    assert auc([0.0] * 100, members) == 0.5  # ties count one half
    lo, hi = auc_interval(0.7, 50, 50)
    assert lo < 0.7 < hi and hi - lo < 0.25


def test_plan_is_seeded_half_members_dealt_over_clients():
    plan = plan_canaries(1000, 7, [2, 5])
    assert plan == plan_canaries(1000, 7, [2, 5]) and plan != plan_canaries(1000, 8, [2, 5])
    assert 450 < sum(plan.members) < 550 and set(plan.clients) == {2, 5}
    assert plan.clients.count(2) == 500
    with pytest.raises(ValueError):
        plan_canaries(1, 0)


def _dp_round(sigma_applied: float, m: int = 600, d: int = 20_000):
    """One round of fedllm's server-side DP-FedAvg over 4 real clients plus m canary clients; the
    canaries' scores ⟨Δ, uⱼ⟩ on the released mean (× count / C: one canary is worth 1)."""
    from fedllm.algorithms.aggregate import MeanAggregator
    from fedllm.algorithms.privacy import DPAggregator, DPConfig
    from fedllm.types import ClientUpdate

    template = {"w": torch.zeros(d)}
    canaries = CanaryClients(template, plan_canaries(m, 3), seed=3)
    dp = DPAggregator(MeanAggregator(weighted=False), DPConfig(noise_multiplier=sigma_applied, clip_norm=1.0),
                      num_sampled=4, seed=11)
    gen = torch.Generator().manual_seed(5)
    updates = [ClientUpdate(k, {"w": torch.randn(d, generator=gen)}, 10, 1, 0.0) for k in range(4)]
    clipped = [ClientUpdate(u.client_id, dp.clip_update(u.delta), 10, 1, 0.0) for u in updates]
    released = dp.release(canaries.add_to_mean(dp.inner(clipped), 4, 1.0, rnd=1), [1.0] * 4)
    return [s * 4 for s in canaries.scores(released)], list(canaries.plan.members)


def test_canary_clients_through_dp_aggregator_stay_below_the_accountant():
    from fedllm.algorithms.privacy import PrivacyLedger

    ledger = PrivacyLedger(1.0, 1.0, 1e-5, sampling="full")
    ledger.step()
    scores, members = _dp_round(1.0)
    bound = audit_bound(scores, members, 1e-5, 0.05)
    assert 1.2 < bound.epsilon <= ledger.epsilon()  # 1.52 of the accountant's 4.73
    assert auc(scores, members) > 0.6


def test_a_mechanism_noisier_on_paper_than_in_code_is_caught():
    # the accountant is told σ = 3 but the aggregator applies σ = 0.1: the audit's bound exceeds the claim
    from fedllm.algorithms.privacy import PrivacyLedger

    claimed = PrivacyLedger(3.0, 1.0, 1e-5, sampling="full")
    claimed.step()
    scores, members = _dp_round(0.1)
    assert audit_bound(scores, members, 1e-5, 0.05).epsilon > claimed.epsilon()  # 3.93 > 1.39
