"""Adaptive Federated Averaging (AFA): Muñoz-González, Co & Lupu, 2019, "Byzantine-Robust Federated
Machine Learning through Adaptive Model Averaging" (arXiv:1909.05125), their Algorithm 1.

Each round, over the clients not blocked (the good set G, at first every arrival):

1. the aggregate Δ_G = Σ_{k∈G} p_k n_k Δ_k / Σ_{k∈G} p_k n_k (p_k the client's reputation, n_k its
   example count, which the server validates against the sizes it knows);
2. each k ∈ G scores s_k = cos(Δ_G, Δ_k); with μ̂, μ̄ and σ the mean, median and (population) standard
   deviation of the scores, the clients on the heavy side of the median are removed from G: when
   μ̂ < μ̄ (a tail of low similarities) those with s_k < μ̄ − ξσ, otherwise those with s_k > μ̄ + ξσ;
3. ξ ← ξ + Δξ (fewer false positives as the set shrinks), and back to 1 until no client is removed.

The round's delta is Δ_G over the final G. Reputation is a Beta posterior per client, α_k += 1 when k
stayed in G, β_k += 1 when it was removed, p_k = α_k / (α_k + β_k); a client is blocked for good
when P(p < 1/2) = I_{1/2}(α_k, β_k) ≥ δ (the Beta CDF at one half). The paper's values: ξ₀ = 2,
Δξ = 0.5, α₀ = β₀ = 3, δ = 0.95. With integer α, β the CDF is exact: I_x(a, b) = P(Bin(a + b − 1, x) ≥ a).

The reputations and the blocked set carry across rounds (:meth:`AFA.state_dict`, in the server's
checkpoint). ``last_report`` names the clients ``excluded`` this round (removed or already blocked)
and every ``blocked`` one.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Sequence
from typing import Any

import torch

from fedllm.algorithms.aggregate import register_aggregator
from fedllm.types import ClientUpdate, StateDict


def beta_cdf_half(a: int, b: int) -> float:
    """I_{1/2}(a, b), the Beta(a, b) CDF at 1/2, for integers a, b >= 1: P(Binomial(a + b − 1, 1/2) >= a)."""
    if a < 1 or b < 1:
        raise ValueError(f"Beta parameters must be integers >= 1, got ({a}, {b})")
    n = a + b - 1
    return sum(math.comb(n, j) for j in range(a, n + 1)) / 2.0**n


def _flat(update: ClientUpdate) -> torch.Tensor:
    return torch.cat([v.detach().reshape(-1).to(torch.float64) for v in update.delta.values()])


def _cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    na, nb = float(a.norm()), float(b.norm())
    return float(a @ b) / (na * nb) if na > 0 and nb > 0 else 0.0


def afa_filter(flats: dict[int, torch.Tensor], weights: dict[int, float], xi0: float,
               delta_xi: float) -> tuple[list[int], list[int]]:
    """(good, removed) client ids after AFA's iterative cosine filter (steps 1-3 of the docstring)."""
    good, removed = list(flats), []
    xi = xi0
    while len(good) > 1:
        total = sum(weights[k] for k in good)
        agg = sum(weights[k] * flats[k] for k in good) / total
        sims = {k: _cosine(agg, flats[k]) for k in good}
        mean, median = statistics.fmean(sims.values()), statistics.median(sims.values())
        std = statistics.pstdev(sims.values())
        if mean < median:
            bad = [k for k in good if sims[k] < median - xi * std]
        else:
            bad = [k for k in good if sims[k] > median + xi * std]
        if not bad:
            break
        good = [k for k in good if k not in bad]
        removed += bad
        xi += delta_xi
    return good, removed


@register_aggregator("afa")
class AFA:
    """AFA (Muñoz-González et al., 2019): iterative cosine filter, Beta reputations, blocking."""

    def __init__(self, xi0: float = 2.0, delta_xi: float = 0.5, alpha0: int = 3, beta0: int = 3,
                 block: float = 0.95) -> None:
        if not (xi0 > 0 and delta_xi >= 0):
            raise ValueError(f"AFA needs xi0 > 0 and delta_xi >= 0, got {xi0}, {delta_xi}")
        if int(alpha0) != alpha0 or int(beta0) != beta0 or alpha0 < 1 or beta0 < 1:
            raise ValueError(f"AFA's prior alpha0, beta0 must be integers >= 1, got {alpha0}, {beta0}")
        if not 0.5 < block <= 1:
            raise ValueError(f"AFA's blocking threshold must be in (0.5, 1], got {block}")
        self.xi0, self.delta_xi, self.block = xi0, delta_xi, block
        self.alpha0, self.beta0 = int(alpha0), int(beta0)
        self.counts: dict[int, list[int]] = {}  # client -> [alpha, beta]
        self.blocked: set[int] = set()
        self.last_report: dict[str, Any] = {}

    def reputation(self, client_id: int) -> float:
        """p_k = α_k / (α_k + β_k), the posterior mean of the client's Beta reputation."""
        a, b = self.counts.get(client_id, [self.alpha0, self.beta0])
        return a / (a + b)

    def __call__(self, updates: Sequence[ClientUpdate]) -> StateDict:
        if not updates:
            raise ValueError("cannot aggregate zero updates")
        ref = updates[0].delta
        active = [u for u in updates if u.client_id not in self.blocked]
        flats = {u.client_id: _flat(u) for u in active}
        weights = {u.client_id: self.reputation(u.client_id) * u.num_examples for u in active}
        good, removed = afa_filter(flats, weights, self.xi0, self.delta_xi) if active else ([], [])
        for k in good + removed:
            ab = self.counts.setdefault(k, [self.alpha0, self.beta0])
            ab[0 if k in good else 1] += 1
            if beta_cdf_half(*ab) >= self.block:
                self.blocked.add(k)
        self.last_report = {"excluded": sorted(u.client_id for u in updates if u.client_id not in good),
                            "blocked": sorted(self.blocked)}
        if not good:  # every client of the round is blocked: the model stays where it is
            return {k: torch.zeros_like(v) for k, v in ref.items()}
        total = sum(weights[k] for k in good)
        by_id = {u.client_id: u for u in active}
        return {key: (sum(weights[k] * by_id[k].delta[key].detach().to(torch.float64) for k in good)
                      / total).to(t.dtype) for key, t in ref.items()}

    def state_dict(self) -> dict[str, Any]:
        return {"counts": {k: list(v) for k, v in self.counts.items()}, "blocked": sorted(self.blocked)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.counts = {int(k): [int(a), int(b)] for k, (a, b) in state.get("counts", {}).items()}
        self.blocked = {int(k) for k in state.get("blocked", [])}
