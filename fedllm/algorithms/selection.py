"""Client selection and availability: which clients train in a round, and how much they finish.

Every random choice uses a numpy ``Generator`` seeded from (seed, round[, client id]), so a round's
selection is a pure function of the configuration and the round number: reproducible, independent of
Python's global ``random`` and of torch's RNG, and identical after resuming from a checkpoint.
``state_dict()`` holds what decides the outcome (the seed; Power-of-Choice's last known losses).

- ``UniformSampler``: m = max(1, ⌊C·K⌋) clients uniformly without replacement (McMahan et al., 2017).
- ``PoissonSampler``: each client independently with probability C (the sampling DP-FedAvg's
  Poisson accountant assumes; a round may have no client at all).
- ``RoundRobinSampler``: the next ``per_round`` clients in id order, wrapping around; round t starts
  at position t·per_round, so every client is picked within ⌈K/per_round⌉ consecutive rounds.
- ``ImportanceSampler``: m clients without replacement, with probability ∝ number of examples.
- ``PowerOfChoiceSampler`` (Cho et al., 2020, "Client Selection in Federated Learning: Convergence
  Analysis and Power-of-Choice Selection Strategies"): draw d candidates without replacement ∝ pᵢ
  (data fraction), keep the m with the highest current local loss (unknown loss counts as +∞).
- ``Availability``: per (round, client), a client drops out with probability ``dropout_prob``;
  otherwise it is a straggler with probability ``straggler_fraction`` and, at the deadline, has done
  ⌊local_steps·speed_factor⌋ steps. A straggler left with 0 steps counts as dropped.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np

from fedllm.algorithms.aggregate import build_named
from fedllm.algorithms.diversity import DiversitySampler

Losses = Mapping[int, float] | Callable[[list[int]], Mapping[int, float]]


class ClientSampler(Protocol):
    """Picks the round's participants (sorted ids) from the available ``client_ids``."""

    def sample(self, round: int, client_ids: Sequence[int]) -> list[int]: ...

    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: dict[str, Any]) -> None: ...


def _rng(seed: int, *parts: int) -> np.random.Generator:
    words = [int(seed), *(int(p) for p in parts)]
    if min(words) < 0:
        raise ValueError(f"seed, round and client ids must be >= 0 to seed an RNG, got {words}")
    return np.random.default_rng(words)


def _ids(client_ids: Sequence[int]) -> list[int]:
    ids = sorted(int(c) for c in client_ids)
    if not ids:
        raise ValueError("no clients to sample from")
    if len(set(ids)) != len(ids):
        raise ValueError(f"client ids must be unique, got {list(client_ids)}")
    return ids


def _check_fraction(fraction: float) -> None:
    if not 0.0 < fraction <= 1.0:
        raise ValueError(f"fraction must be in (0, 1], got {fraction}")


def _count(fraction: float, n: int) -> int:
    return max(1, math.floor(fraction * n + 1e-9))


def _check_round(round: int) -> None:
    if round < 0:
        raise ValueError(f"round must be >= 0, got {round}")


def _probabilities(ids: list[int], num_examples: Mapping[int, int] | None) -> np.ndarray:
    if num_examples is None:
        return np.full(len(ids), 1.0 / len(ids))
    missing = [c for c in ids if c not in num_examples]
    if missing:
        raise ValueError(f"num_examples lacks clients {missing[:5]}")
    counts = np.array([float(num_examples[c]) for c in ids])
    if (counts < 0).any() or counts.sum() <= 0:
        raise ValueError("num_examples must be >= 0 with a positive total")
    return counts / counts.sum()


def _weighted_without_replacement(rng: np.random.Generator, ids: list[int], p: np.ndarray,
                                  m: int) -> list[int]:
    m = min(m, int((p > 0).sum()))  # clients without data are never picked
    return [int(c) for c in rng.choice(ids, size=m, replace=False, p=p)]


class _SeededFraction:
    """A sampler whose outcome is a function of (seed, round) and a ``fraction``; the seed is its state."""

    def __init__(self, fraction: float = 1.0, seed: int = 0) -> None:
        _check_fraction(fraction)
        self.fraction, self.seed = fraction, int(seed)

    def state_dict(self) -> dict[str, Any]:
        return {"seed": self.seed}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.seed = int(state["seed"])


class UniformSampler(_SeededFraction):
    """max(1, ⌊fraction·K⌋) clients uniformly at random without replacement."""

    def sample(self, round: int, client_ids: Sequence[int]) -> list[int]:
        _check_round(round)
        ids = _ids(client_ids)
        picked = _rng(self.seed, round).choice(ids, size=_count(self.fraction, len(ids)), replace=False)
        return sorted(int(c) for c in picked)


class PoissonSampler(_SeededFraction):
    """Each client joins the round independently with probability ``fraction`` (possibly none)."""

    def sample(self, round: int, client_ids: Sequence[int]) -> list[int]:
        _check_round(round)
        ids = _ids(client_ids)
        draws = _rng(self.seed, round, 1).random(len(ids))
        return [c for c, u in zip(ids, draws) if u < self.fraction]


class RoundRobinSampler:
    """``per_round`` consecutive clients (in id order) per round, starting at round·per_round."""

    def __init__(self, per_round: int = 1) -> None:
        if per_round < 1:
            raise ValueError(f"per_round must be >= 1, got {per_round}")
        self.per_round = per_round

    def sample(self, round: int, client_ids: Sequence[int]) -> list[int]:
        _check_round(round)
        ids = _ids(client_ids)
        n, k = len(ids), min(self.per_round, len(ids))
        start = (round * self.per_round) % n
        return sorted(ids[(start + j) % n] for j in range(k))

    def state_dict(self) -> dict[str, Any]:
        return {}  # the cursor is round·per_round: nothing else to save

    def load_state_dict(self, state: dict[str, Any]) -> None:
        return None


class ImportanceSampler:
    """max(1, ⌊fraction·K⌋) clients without replacement, P(pick) ∝ number of examples."""

    def __init__(self, fraction: float, seed: int = 0, num_examples: Mapping[int, int] | None = None) -> None:
        _check_fraction(fraction)
        if num_examples is None:
            raise ValueError("ImportanceSampler needs num_examples (client id -> number of examples)")
        self.fraction, self.seed = fraction, int(seed)
        self.num_examples = {int(k): int(v) for k, v in num_examples.items()}

    def sample(self, round: int, client_ids: Sequence[int]) -> list[int]:
        _check_round(round)
        ids = _ids(client_ids)
        p = _probabilities(ids, self.num_examples)
        return sorted(_weighted_without_replacement(_rng(self.seed, round), ids, p,
                                                    _count(self.fraction, len(ids))))

    def state_dict(self) -> dict[str, Any]:
        return {"seed": self.seed}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.seed = int(state["seed"])


class PowerOfChoiceSampler:
    """Power-of-Choice (Cho et al., 2020): d candidates ∝ data size, keep the m highest-loss ones.

    Losses come from ``sample(..., losses=...)`` (a mapping or a callback on the candidate ids, e.g.
    one that evaluates them), else from the last known losses given to :meth:`record_losses`.
    """

    def __init__(self, d: int, m: int, seed: int = 0, num_examples: Mapping[int, int] | None = None) -> None:
        if m < 1 or d < m:
            raise ValueError(f"Power-of-Choice needs 1 <= m <= d, got d={d}, m={m}")
        self.d, self.m, self.seed = d, m, int(seed)
        self.num_examples = (None if num_examples is None
                             else {int(k): int(v) for k, v in num_examples.items()})
        self.losses: dict[int, float] = {}

    def record_losses(self, losses: Mapping[int, float]) -> None:
        """Remember each client's latest local loss (e.g. the train loss it just reported)."""
        self.losses.update({int(k): float(v) for k, v in losses.items()})

    def sample(self, round: int, client_ids: Sequence[int], losses: Losses | None = None) -> list[int]:
        _check_round(round)
        ids = _ids(client_ids)
        rng = _rng(self.seed, round)
        candidates = sorted(_weighted_without_replacement(rng, ids, _probabilities(ids, self.num_examples),
                                                          min(self.d, len(ids))))
        known = self.losses if losses is None else losses(candidates) if callable(losses) else losses
        loss = {c: float(known.get(c, math.inf)) for c in candidates}
        ranked = sorted(candidates, key=lambda c: (-loss[c], c))  # highest loss first, ties by id
        return sorted(ranked[: self.m])

    def state_dict(self) -> dict[str, Any]:
        return {"seed": self.seed, "losses": dict(self.losses)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.seed = int(state["seed"])
        self.losses = {int(k): float(v) for k, v in state["losses"].items()}


@dataclass(frozen=True)
class RoundAvailability:
    """Who of the sampled clients reports this round, and how many local steps each completes."""

    dropped: list[int]
    stragglers: list[int]
    steps: dict[int, int]  # client id -> local steps completed, for every client that reports


class Availability:
    """Seeded dropouts and deadline stragglers (see the module docstring)."""

    def __init__(self, dropout_prob: float = 0.0, seed: int = 0, straggler_fraction: float = 0.0,
                 speed_factor: float = 1.0) -> None:
        for name, value in (("dropout_prob", dropout_prob), ("straggler_fraction", straggler_fraction)):
            if not 0.0 <= value <= 1.0:
                raise ValueError(f"{name} must be in [0, 1], got {value}")
        if not 0.0 < speed_factor <= 1.0:
            raise ValueError(f"speed_factor must be in (0, 1], got {speed_factor}")
        self.dropout_prob, self.seed = dropout_prob, int(seed)
        self.straggler_fraction, self.speed_factor = straggler_fraction, speed_factor

    def decide(self, round: int, client_ids: Sequence[int], local_steps: int) -> RoundAvailability:
        """Each client's fate depends only on (seed, round, its id), not on who else was sampled."""
        _check_round(round)
        if local_steps < 1:
            raise ValueError(f"local_steps must be >= 1, got {local_steps}")
        dropped, stragglers, steps = [], [], {}
        slow_steps = math.floor(local_steps * self.speed_factor + 1e-9)
        for cid in _ids(client_ids) if client_ids else []:  # a Poisson draw may pick nobody
            u_drop, u_slow = _rng(self.seed, round, cid).random(2)
            if u_drop < self.dropout_prob or (u_slow < self.straggler_fraction and slow_steps == 0):
                dropped.append(cid)
            elif u_slow < self.straggler_fraction:
                stragglers.append(cid)
                steps[cid] = slow_steps
            else:
                steps[cid] = local_steps
        return RoundAvailability(dropped, stragglers, steps)

    def state_dict(self) -> dict[str, Any]:
        return {"seed": self.seed}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.seed = int(state["seed"])


SAMPLERS: dict[str, type] = {
    "uniform": UniformSampler,
    "poisson": PoissonSampler,
    "round_robin": RoundRobinSampler,
    "importance": ImportanceSampler,
    "power_of_choice": PowerOfChoiceSampler,
    "diversity": DiversitySampler,  # label coverage (fedllm.algorithms.diversity)
}


def build_sampler(name: str, **kw: Any) -> ClientSampler:
    """The client sampler called ``name`` (one of :data:`SAMPLERS`) built with ``kw``."""
    return build_named("client sampler", SAMPLERS, name, **kw)
