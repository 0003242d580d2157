"""Simulated Byzantine clients, for robustness studies of the aggregators in :mod:`.robust`.

A fixed, seeded subset of clients (``fraction`` of them) misbehaves in every round:

- ``sign_flip``: sends −s·Δᵢ (the update reversed and scaled).
- ``scale``: sends s·Δᵢ (model-replacement boosting; Bagdasaryan et al., 2020).
- ``noise``: sends Δᵢ + ε, ε ~ N(0, σ²) per entry, seeded by (seed, round, client id).
- ``label_flip``: trains honestly on flipped labels y ↦ C − 1 − y (:func:`flip_labels`, a data
  transform applied before training), so :func:`attack_update` leaves its update unchanged.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from fedllm.types import ClientUpdate

KINDS = ("label_flip", "sign_flip", "scale", "noise")


@dataclass(frozen=True)
class Attack:
    """Which attack, on what fraction of the clients, and how strong."""

    kind: str
    fraction: float
    scale: float = 10.0  # s for sign_flip and scale
    noise_std: float = 1.0  # σ for noise
    seed: int = 0

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


def attack_update(update: ClientUpdate, attack: Attack, round: int = 0) -> ClientUpdate:
    """``update`` as the attacker would send it (``label_flip`` acts on data: unchanged here)."""
    if attack.kind == "label_flip":
        return update
    if attack.kind == "sign_flip":
        delta = {k: -attack.scale * v for k, v in update.delta.items()}
    elif attack.kind == "scale":
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
