"""Privacy auditing in one training run: canaries, membership scores and a lower bound on ε.

An accountant's ε is an *upper* bound that holds if the code applies the mechanism it claims. An
audit measures the other side: it plants canaries, lets the run train, and asks how well someone
who sees what the server saw can tell which canaries were used. Any DP guarantee caps that skill,
so the skill measured gives a *lower* bound on ε; a lower bound above the claimed ε means the claim
is wrong (a bug), never that the audit is "too good".

- **One run, many canaries** (Steinke, Nasr & Jagielski, 2023, "Privacy auditing with one (1)
  training run", NeurIPS): each of m canaries is included independently with probability 1/2
  (Sᵢ ∈ {in, out}). The auditor ranks the canaries by a membership score, guesses "in" for the
  k₊ highest and "out" for the k₋ lowest (r = k₊ + k₋ guesses) and counts v correct ones. If the
  mechanism is (ε, δ)-DP in each canary, their Theorem 5.2 gives
  P[v correct] ≤ P[Binomial(r, e^ε/(1+e^ε)) ≥ v] + 2mδ·α (α the max over i of P[v > W ≥ v−i]/i),
  so the largest ε whose p-value stays below β is a lower bound at confidence 1 − β
  (:func:`epsilon_lower_bound`, their Algorithm 2). Every (k₊, k₋, view, attack) tried is one
  more test: :func:`audit_bound` splits β over them (Bonferroni), so the bound stays valid.
- **Example canaries** (DP-SGD's unit, one record) are random-secret records inserted into a
  client's data (:mod:`fedllm.data.canaries`); their score is a loss-based membership attack
  (Yeom et al., 2018), calibrated by a reference model's loss (the model before the update: the
  server always has it; Carlini et al., 2022, "Membership inference attacks from first
  principles") or by the secret's zlib entropy (Carlini et al., 2021, "Extracting training data
  from large language models").
- **Client canaries** (client-level DP's unit, a whole client) follow Andrew et al. (ICLR 2024,
  "One-shot empirical privacy estimation for federated learning"): canary client j's update is
  C·uⱼ, uⱼ a random unit direction of the trainable state; an included canary takes part in a
  round with the accountant's sampling rate q and its update joins the clipped sum *before* the
  noise, over the real clients' count (:class:`CanaryClients`), so each canary is exactly one more
  client of sensitivity C to the Gaussian mechanism. Its score is ⟨Δ, uⱼ⟩ on the released models.
"""

from __future__ import annotations

import math
import zlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from fedllm.data.canaries import CanaryPlan, plan_canaries
from fedllm.types import StateDict

__all__ = ["CanaryClients", "CanaryPlan", "attack_scores", "audit_bound", "auc", "auc_interval", "canary_direction",
           "epsilon_lower_bound", "guess_counts", "p_value", "plan_canaries", "roc_curve", "tpr_at_fpr", "zlib_bits"]

# ----------------------------------------------------------------------------- canary clients
# (the plan, who is in and whose data holds each canary, is fedllm.data.canaries.plan_canaries)


def canary_direction(template: Mapping[str, torch.Tensor], seed: int, j: int,
                     keys: Sequence[str] | None = None) -> StateDict:
    """uⱼ: a seeded uniformly random unit vector over ``keys`` of ``template`` (zeros elsewhere)."""
    gen = torch.Generator().manual_seed(int(seed) * 1_000_003 + 36_000 + j)
    use = set(template if keys is None else keys)
    out = {k: (torch.randn(v.shape, generator=gen, dtype=torch.float32) if k in use
               else torch.zeros(v.shape, dtype=torch.float32)) for k, v in template.items()}
    norm = math.sqrt(sum(float((t.double() ** 2).sum()) for t in out.values()))
    return {k: t / norm for k, t in out.items()}


class CanaryClients:
    """Client canaries (Andrew et al., 2024): canary j sends C·uⱼ in the rounds it takes part in.

    An included canary takes part in a round with probability ``rate`` (the accountant's q; 1 for
    full participation), drawn from (seed, round, j) so a resumed run draws the same. Its update is
    added to the round's mean as sum/``count`` with ``count`` the real clients' denominator, before
    any DP noise: the noised sum then protects it exactly as one more client of norm C.
    """

    def __init__(self, template: Mapping[str, torch.Tensor], plan: CanaryPlan, seed: int, rate: float = 1.0,
                 keys: Sequence[str] | None = None) -> None:
        if not 0 < rate <= 1:
            raise ValueError(f"rate must be in (0, 1], got {rate}")
        self.template = {k: torch.zeros(v.shape, dtype=torch.float32) for k, v in template.items()}
        self.plan, self.seed, self.rate = plan, seed, rate
        self.keys = list(keys) if keys is not None else None

    def direction(self, j: int) -> StateDict:
        return canary_direction(self.template, self.seed, j, self.keys)

    def sampled(self, rnd: int) -> list[int]:
        """The included canaries that take part in round ``rnd``."""
        draw = np.random.default_rng([self.seed, 36, 2, rnd]).random(self.plan.size)
        return [j for j, m in enumerate(self.plan.members) if m and (self.rate >= 1 or draw[j] < self.rate)]

    def add_to_mean(self, mean: Mapping[str, torch.Tensor], count: float, clip: float, rnd: int) -> StateDict:
        """``mean`` + Σⱼ C·uⱼ / ``count`` over this round's canaries (in ``mean``'s dtypes)."""
        if not count > 0:
            raise ValueError(f"count must be > 0, got {count}")
        total = {k: torch.zeros(v.shape, dtype=torch.float64) for k, v in mean.items()}
        for j in self.sampled(rnd):
            for k, u in self.direction(j).items():
                total[k] += u.double()
        scale = clip / count
        return {k: (v.double() + total[k].to(v.device) * scale).to(v.dtype) for k, v in mean.items()}

    def scores(self, delta: Mapping[str, torch.Tensor]) -> list[float]:
        """⟨Δ, uⱼ⟩ for every canary j (its membership score on a released change of the model)."""
        flat = {k: v.detach().double().cpu() for k, v in delta.items()}
        return [math.fsum(float((flat[k] * u.double()).sum()) for k, u in self.direction(j).items())
                for j in range(self.plan.size)]


# ----------------------------------------------------------------------------- attacks


def zlib_bits(text: str) -> int:
    """The secret's zlib entropy in bits (Carlini et al., 2021's reference-free calibration)."""
    return 8 * len(zlib.compress(text.encode("utf-8")))


def attack_scores(losses: Sequence[float], reference: Sequence[float] | None,
                  entropy: Sequence[float] | None = None) -> dict[str, list[float]]:
    """Membership scores (higher: more likely a member) from canary losses under the attacked model.

    ``loss``: −L (Yeom et al., 2018); ``ref``: L_ref − L, how much the update lowered the canary's
    loss against the model it was applied to; ``zlib``: −L / zlib bits of the secret.
    """
    out = {"loss": [-x for x in losses]}
    if reference is not None:
        out["ref"] = [r - x for r, x in zip(reference, losses)]
    if entropy is not None:
        out["zlib"] = [-x / max(e, 1.0) for x, e in zip(losses, entropy)]
    return out


def _split(scores: Sequence[float], members: Sequence[bool]) -> tuple[np.ndarray, np.ndarray]:
    s = np.asarray(scores, dtype=np.float64)
    m = np.asarray(members, dtype=bool)
    if s.shape != m.shape:
        raise ValueError(f"{len(s)} scores for {len(m)} canaries")
    return s[m], s[~m]


def auc(scores: Sequence[float], members: Sequence[bool]) -> float:
    """P(score of a member > score of a non-member), ties counting 1/2 (Mann–Whitney); nan if a side is empty."""
    pos, neg = _split(scores, members)
    if not len(pos) or not len(neg):
        return math.nan
    both = np.concatenate([pos, neg])
    order = both.argsort(kind="mergesort")
    ranks = np.empty(len(both))
    sorted_vals = both[order]
    i = 0
    while i < len(both):  # average ranks over ties
        j = i
        while j + 1 < len(both) and sorted_vals[j + 1] == sorted_vals[i]:
            j += 1
        ranks[order[i:j + 1]] = (i + j) / 2 + 1
        i = j + 1
    u = ranks[:len(pos)].sum() - len(pos) * (len(pos) + 1) / 2
    return float(u / (len(pos) * len(neg)))


def auc_interval(value: float, n_pos: int, n_neg: int, z: float = 1.96) -> tuple[float, float]:
    """A 95 % interval of an AUC from its Hanley & McNeil (1982) standard error."""
    if not (n_pos and n_neg) or math.isnan(value):
        return math.nan, math.nan
    q1, q2 = value / (2 - value), 2 * value ** 2 / (1 + value)
    var = (value * (1 - value) + (n_pos - 1) * (q1 - value ** 2) + (n_neg - 1) * (q2 - value ** 2)) / (n_pos * n_neg)
    se = math.sqrt(max(var, 0.0))
    return max(0.0, value - z * se), min(1.0, value + z * se)


def roc_curve(scores: Sequence[float], members: Sequence[bool]) -> tuple[list[float], list[float]]:
    """(FPR, TPR) at every threshold, from (0, 0) to (1, 1)."""
    pos, neg = _split(scores, members)
    cuts = np.unique(np.concatenate([pos, neg]))[::-1]
    fpr = [0.0] + [float((neg >= c).mean()) if len(neg) else 0.0 for c in cuts]
    tpr = [0.0] + [float((pos >= c).mean()) if len(pos) else 0.0 for c in cuts]
    return fpr, tpr


def tpr_at_fpr(scores: Sequence[float], members: Sequence[bool], fpr: float = 0.01) -> float:
    """The largest TPR of a threshold whose FPR is at most ``fpr`` (with fewer than 1/fpr
    non-members that is the members scored above every non-member)."""
    f, t = roc_curve(scores, members)
    return max(tp for fp, tp in zip(f, t) if fp <= fpr + 1e-12)


# ----------------------------------------------------------------------------- the one-run bound


def _log_binom_pmf(r: int, q: float) -> np.ndarray:
    k = np.arange(r + 1, dtype=np.float64)
    lg = np.vectorize(math.lgamma)
    log_c = math.lgamma(r + 1) - lg(k + 1) - lg(r - k + 1)
    with np.errstate(divide="ignore"):
        return log_c + k * math.log(q) + (r - k) * (math.log1p(-q) if q < 1 else -np.inf)


def p_value(m: int, r: int, v: int, eps: float, delta: float) -> float:
    """Steinke et al.'s p-value of v correct out of r guesses on m canaries under (ε, δ)-DP."""
    if not 0 <= v <= r <= m:
        raise ValueError(f"expected 0 <= v <= r <= m, got v={v}, r={r}, m={m}")
    q = 1 / (1 + math.exp(-eps))  # the accuracy of ε-DP randomized response
    pmf = np.exp(_log_binom_pmf(r, q)) if r else np.ones(1)
    beta = float(pmf[v:].sum())  # P[Binomial(r, q) >= v]
    alpha, total = 0.0, 0.0
    for i in range(1, v + 1):  # α = max_i P[v > W >= v - i] / i
        total += float(pmf[v - i])
        alpha = max(alpha, total / i)
    return min(1.0, beta + alpha * delta * 2 * m)


def epsilon_lower_bound(m: int, r: int, v: int, delta: float, beta: float) -> float:
    """The largest ε (to 1e-6) whose :func:`p_value` is below ``beta``: a lower bound on ε with
    confidence 1 − β (0 when v correct guesses are no evidence at all)."""
    if not 0 < beta < 1:
        raise ValueError(f"beta must be in (0, 1), got {beta}")
    if p_value(m, r, v, 0.0, delta) >= beta:
        return 0.0
    lo, hi = 0.0, 1.0
    while p_value(m, r, v, hi, delta) < beta:
        lo, hi = hi, hi * 2
        if hi > 1e3:
            return math.inf
    while hi - lo > 1e-6:
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if p_value(m, r, v, mid, delta) < beta else (lo, mid)
    return lo


def guess_counts(scores: Sequence[float], members: Sequence[bool], k_pos: int, k_neg: int) -> tuple[int, int]:
    """(r, v): guess "in" for the ``k_pos`` highest scores and "out" for the ``k_neg`` lowest."""
    order = np.argsort(np.asarray(scores, dtype=np.float64), kind="mergesort")
    mem = np.asarray(members, dtype=bool)
    k_pos, k_neg = min(k_pos, len(order)), min(k_neg, len(order) - min(k_pos, len(order)))
    top = order[len(order) - k_pos:] if k_pos else order[:0]
    bottom = order[:k_neg]
    return k_pos + k_neg, int(mem[top].sum() + (~mem[bottom]).sum())


def guess_grid(m: int) -> list[tuple[int, int]]:
    """(k₊, k₋) pairs tried: r in a geometric grid up to m, all "in" guesses or half and half."""
    sizes = sorted({max(1, round(m * f)) for f in (0.02, 0.05, 0.1, 0.2, 0.5, 1.0)})
    return [(r, 0) for r in sizes] + [(r - r // 2, r // 2) for r in sizes if r >= 2]


@dataclass(frozen=True)
class Bound:
    """The best lower bound found, and the guesses that gave it."""

    epsilon: float
    guesses: int
    correct: int
    k_pos: int
    k_neg: int
    tests: int  # (k₊, k₋) pairs tried, for the Bonferroni split of β

    def as_dict(self) -> dict[str, float]:
        return {"epsilon": self.epsilon, "guesses": self.guesses, "correct": self.correct,
                "k_pos": self.k_pos, "k_neg": self.k_neg, "tests": self.tests}


def audit_bound(scores: Sequence[float], members: Sequence[bool], delta: float, beta: float,
                families: int = 1) -> Bound:
    """The largest :func:`epsilon_lower_bound` over :func:`guess_grid`, at β / (grid × ``families``):
    valid at confidence 1 − β jointly over the grid and the ``families`` (views × attacks) tried."""
    m = len(scores)
    grid = guess_grid(m)
    level = beta / (len(grid) * max(1, families))
    best = Bound(0.0, 0, 0, 0, 0, len(grid))
    for k_pos, k_neg in grid:
        r, v = guess_counts(scores, members, k_pos, k_neg)
        eps = epsilon_lower_bound(m, r, v, delta, level)
        if eps > best.epsilon:
            best = Bound(eps, r, v, k_pos, k_neg, len(grid))
    return best
