"""Diversity sampling: pick the round's clients so that their data covers the label space.

Submodular facility location over the clients' label histograms, in the spirit of DivFL
(Balakrishnan et al., 2022, "Diverse Client Selection for Federated Learning via Submodular
Maximization", ICLR), which maximizes the same objective over gradient similarities; here the
features are the clients' label distributions hᵢ (class shares), so the chosen set S covers the
label/topic space:

    F(S) = Σ_{i ∈ all clients} max_{j ∈ S} sim(i, j),   sim(i, j) = Σ_c min(hᵢ[c], hⱼ[c])

(histogram intersection, 1 − total-variation distance: in [0, 1], 1 for identical mixes). F is
monotone submodular, so greedy selection is within 1 − 1/e of the best m-subset (Nemhauser et al.,
1978). Plain greedy would pick the same m clients every round and leave the others out forever, so
each greedy step scores only a random candidate subset of size ⌈(K/m)·ln(1/ε)⌉ (stochastic greedy,
Mirzasoleiman et al., 2015, "Lazier Than Lazy Greedy": 1 − 1/e − ε in expectation), drawn from a
generator seeded by (seed, round): every client gets picked over the rounds, the choice is still
reproducible and resumes identically. Ties (frequent: clients with the same label mix) are broken
by the same generator, so equivalent clients take turns; without a generator, the lowest index wins.

Under differential privacy the choice is refused by the recipe's rules (``fedllm.config``): who is
picked depends on every client's data, outside the noise, and the accountant's amplification by
subsampling assumes a data-independent uniform or Poisson draw.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np


def label_shares(histograms: Mapping[int, Sequence[float]]) -> dict[int, np.ndarray]:
    """Each client's histogram as shares summing to 1 (a client without examples: all zeros)."""
    out = {}
    for k, h in histograms.items():
        v = np.asarray(h, dtype=np.float64)
        if v.ndim != 1 or (v < 0).any() or not np.isfinite(v).all():
            raise ValueError(f"client {k}: expected a 1-D histogram of counts >= 0, got {list(h)[:5]}")
        out[int(k)] = v / v.sum() if v.sum() > 0 else v
    lengths = {len(v) for v in out.values()}
    if len(lengths) > 1:
        raise ValueError(f"label histograms have different lengths {sorted(lengths)}")
    return out


def similarity(shares: dict[int, np.ndarray], ids: Sequence[int]) -> np.ndarray:
    """sim[i, j] = Σ_c min(hᵢ[c], hⱼ[c]) over ``ids`` (histogram intersection)."""
    h = np.stack([shares[k] for k in ids])
    return np.minimum(h[:, None, :], h[None, :, :]).sum(axis=2)


def facility_location_greedy(sim: np.ndarray, m: int, rng: np.random.Generator | None = None,
                             epsilon: float = 0.1) -> list[int]:
    """Indices of m rows chosen greedily for F(S) = Σ_i max_{j∈S} sim[i, j]; with ``rng``, each step
    scores a random candidate subset of size ⌈(n/m)·ln(1/ε)⌉ (stochastic greedy)."""
    n = sim.shape[0]
    m = min(m, n)
    covered = np.zeros(n)  # max_{j in S} sim[i, j] so far (0 for the empty set: sim >= 0)
    chosen: list[int] = []
    size = n if rng is None else min(n, math.ceil(n / m * math.log(1 / epsilon)))
    for _ in range(m):
        left = [j for j in range(n) if j not in chosen]
        pool = left if rng is None or size >= len(left) else sorted(rng.choice(left, size=size, replace=False).tolist())
        gains = np.array([float(np.maximum(covered, sim[:, j]).sum() - covered.sum()) for j in pool])
        ties = [pool[i] for i in np.flatnonzero(gains >= gains.max() - 1e-12)]
        best = ties[0] if rng is None else int(rng.choice(ties))
        chosen.append(best)
        covered = np.maximum(covered, sim[:, best])
    return chosen


class DiversitySampler:
    """m = max(1, ⌊fraction·K⌋) clients by stochastic-greedy facility location over label shares."""

    def __init__(self, fraction: float, seed: int = 0, label_histograms: Mapping[int, Sequence[float]] | None = None,
                 epsilon: float = 0.1) -> None:
        if not 0.0 < fraction <= 1.0:
            raise ValueError(f"fraction must be in (0, 1], got {fraction}")
        if not label_histograms:
            raise ValueError("the diversity sampler needs each client's label histogram (a classification task)")
        if not 0 < epsilon < 1:
            raise ValueError(f"epsilon must be in (0, 1), got {epsilon}")
        self.fraction, self.seed, self.epsilon = fraction, int(seed), epsilon
        self.shares = label_shares(label_histograms)

    def sample(self, round: int, client_ids: Sequence[int]) -> list[int]:
        if round < 0:
            raise ValueError(f"round must be >= 0, got {round}")
        ids = sorted(int(c) for c in client_ids)
        if not ids or len(set(ids)) != len(ids) or any(c not in self.shares for c in ids):
            raise ValueError(f"client ids must be unique and have a label histogram, got {list(client_ids)}")
        m = max(1, math.floor(self.fraction * len(ids) + 1e-9))
        rng = np.random.default_rng([self.seed, round, 2])
        return sorted(ids[i] for i in facility_location_greedy(similarity(self.shares, ids), m, rng, self.epsilon))

    def state_dict(self) -> dict[str, Any]:
        return {"seed": self.seed}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.seed = int(state["seed"])
