"""Simulated Byzantine clients, for robustness studies of the aggregators in :mod:`.robust`.

A fixed, seeded subset of clients (``fraction`` of them) misbehaves in every round:

- ``sign_flip``: sends −s·Δᵢ (the update reversed and scaled).
- ``scale``: sends s·Δᵢ (model-replacement boosting; Bagdasaryan et al., 2020).
- ``noise``: sends Δᵢ + ε, ε ~ N(0, σ²) per entry, seeded by (seed, round, client id).
- ``label_flip``: trains honestly on flipped labels y ↦ C − 1 − y (:func:`flip_labels`, a data
  transform applied before training), so :func:`attack_update` leaves its update unchanged.
- ``backdoor``: model replacement (Bagdasaryan et al., 2020, "How To Backdoor Federated Learning"):
  the attacker trains on data with a trigger relabelled to a target class
  (:mod:`fedllm.algorithms.backdoor`) and sends γ·Δᵢ, γ = n/η, so that the mean
  θ + (η/n) Σ Δ lands on its own model (the honest updates nearly cancel near convergence).

Two colluding attacks (:func:`collude`) are built from the round's honest updates, which the
attackers are assumed to see (the omniscient form, the stronger threat); every attacker sends the
same vector:

- ``alie`` — "A Little Is Enough" (Baruch, Baruch & Goldberg, NeurIPS 2019): μ − z·σ per
  coordinate (mean and standard deviation of the honest deltas), with the paper's
  z_max = Φ⁻¹((n − s)/n), s = ⌊n/2 + 1⌋ − m, for n clients of which m attack: small enough per
  coordinate to pass median/trimmed/Krum-style filters, consistent enough to drag the model.
- ``ipm`` — inner-product manipulation (Xie, Koyejo & Gupta, UAI 2020, "Fall of Empires"):
  −ε·μ, which makes the aggregate's inner product with the true gradient negative.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from dataclasses import dataclass
from statistics import NormalDist

import numpy as np
import torch

from fedllm.types import ClientUpdate, StateDict

KINDS = ("label_flip", "sign_flip", "scale", "noise", "alie", "ipm", "backdoor")
COLLUDING = ("alie", "ipm")


@dataclass(frozen=True)
class Attack:
    """Which attack, on what fraction of the clients, and how strong."""

    kind: str
    fraction: float
    scale: float = 10.0  # s for sign_flip and scale; γ for backdoor
    noise_std: float = 1.0  # σ for noise
    seed: int = 0
    ipm_epsilon: float = 0.5  # ε for ipm
    alie_z: float | None = None  # z for alie (None: the paper's z_max)
    rounds: tuple[int, ...] | None = None  # backdoor: the rounds it attacks in (None: every round)

    def active(self, round: int) -> bool:
        """Whether the attackers attack in ``round`` (a backdoor attacker is honest outside its rounds)."""
        return self.rounds is None or round in self.rounds

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"unknown attack kind {self.kind!r}; expected one of {list(KINDS)}")
        if not 0.0 <= self.fraction <= 1.0:
            raise ValueError(f"attack fraction must be in [0, 1], got {self.fraction}")
        if self.noise_std < 0:
            raise ValueError(f"noise_std must be >= 0, got {self.noise_std}")
        if self.seed < 0:
            raise ValueError(f"attack seed must be >= 0, got {self.seed}")


def attackers(client_ids: Sequence[int], attack: Attack) -> set[int]:
    """The ⌊fraction·K⌋ attacking clients: a seeded permutation of the sorted ids, same every call."""
    ids = sorted(int(c) for c in client_ids)
    k = math.floor(attack.fraction * len(ids) + 1e-9)
    order = np.random.default_rng([attack.seed]).permutation(len(ids))
    return {ids[i] for i in order[:k]}


def _noise_generator(attack: Attack, round: int, client_id: int) -> torch.Generator:
    seed = np.random.default_rng([attack.seed, round, client_id]).integers(2**63 - 1)
    return torch.Generator().manual_seed(int(seed))


def alie_z(num_clients: int, num_attackers: int) -> float:
    """Baruch et al.'s z_max = Φ⁻¹((n − s)/n) with s = ⌊n/2 + 1⌋ − m (0 when that quantile is undefined)."""
    n, m = num_clients, num_attackers
    s = math.floor(n / 2 + 1) - m
    q = (n - s) / n if n > 0 else 0.5
    return NormalDist().inv_cdf(q) if 0 < q < 1 else 0.0


def collude(attack: Attack, honest: Sequence[StateDict], num_attackers: int) -> StateDict:
    """The delta every colluding attacker sends (``alie`` or ``ipm``), from the round's honest deltas."""
    if attack.kind not in COLLUDING:
        raise ValueError(f"{attack.kind!r} is not a colluding attack; expected one of {list(COLLUDING)}")
    if not honest:
        raise ValueError("a colluding attack needs at least one honest update to imitate")
    out = {}
    for key, ref in honest[0].items():
        x = torch.stack([h[key].detach().to(torch.float64) for h in honest])
        mean = x.mean(dim=0)
        if attack.kind == "ipm":
            out[key] = (-attack.ipm_epsilon * mean).to(ref.dtype)
        else:
            z = attack.alie_z if attack.alie_z is not None else alie_z(len(honest) + num_attackers, num_attackers)
            std = x.std(dim=0, unbiased=False) if len(honest) > 1 else torch.zeros_like(mean)
            out[key] = (mean - z * std).to(ref.dtype)
    return out


def attack_update(update: ClientUpdate, attack: Attack, round: int = 0) -> ClientUpdate:
    """``update`` as the attacker would send it (``label_flip`` acts on data: unchanged here;
    the colluding kinds need the other updates: :func:`collude`)."""
    if attack.kind == "label_flip" or not attack.active(round):
        return update
    if attack.kind in COLLUDING:
        raise ValueError(f"{attack.kind} colludes: build it from the round's honest updates with collude()")
    if attack.kind == "sign_flip":
        delta = {k: -attack.scale * v for k, v in update.delta.items()}
    elif attack.kind in ("scale", "backdoor"):  # backdoor: trained on poisoned data, boosted by γ
        delta = {k: attack.scale * v for k, v in update.delta.items()}
    else:
        gen = _noise_generator(attack, round, update.client_id)
        delta = {k: v + attack.noise_std * torch.randn(v.shape, generator=gen, dtype=v.dtype).to(v.device)
                 if v.is_floating_point() else v for k, v in update.delta.items()}
    return dataclasses.replace(update, delta=delta)


def flip_labels(y: torch.Tensor, num_classes: int) -> torch.Tensor:
    """y ↦ num_classes − 1 − y (the label-flipping attack's data transform)."""
    if num_classes < 2:
        raise ValueError(f"num_classes must be >= 2, got {num_classes}")
    if y.numel() and (int(y.min()) < 0 or int(y.max()) >= num_classes):
        raise ValueError(f"labels must lie in [0, {num_classes}), got range [{int(y.min())}, {int(y.max())}]")
    return num_classes - 1 - y
