"""Byzantine-robust aggregators: each maps the round's client deltas to one delta.

- ``Median`` — coordinate-wise median (Yin et al., 2018, "Byzantine-Robust Distributed Learning:
  Towards Optimal Statistical Rates"): Δ[j] = median_i Δᵢ[j] (mean of the two middle values when
  K is even).
- ``TrimmedMean(β)`` — coordinate-wise trimmed mean (same paper): per coordinate, sort the K values,
  drop the k = ⌊βK⌋ smallest and k largest, average the K − 2k left.
- ``Krum(f, m)`` — Blanchard et al., 2017, "Machine Learning with Adversaries: Byzantine Tolerant
  Gradient Descent": score(i) = Σ of the squared L2 distances from Δᵢ to its K − f − 2 nearest other
  deltas (each delta flattened to one vector); Krum returns the delta of lowest score, multi-Krum the
  plain mean of the m lowest-scoring ones. Needs K > 2f + 2.
- ``Bulyan(f)`` — El Mhamdi, Guerraoui & Rouault, 2018, "The Hidden Vulnerability of Distributed
  Learning in Byzantium": pick θ = K − 2f deltas one at a time, each the Krum winner among those
  not picked yet, then per coordinate average the β = θ − 2f picked values closest to their
  median. Needs K ≥ 4f + 3.
- ``NormBound(C, inner)`` — clip each delta to ‖Δᵢ‖₂ ≤ C, then aggregate with ``inner`` (Sun et al.,
  2019, "Can You Really Backdoor Federated Learning?").

Robust rules ignore example counts (a Byzantine client could lie about them). After each call,
``last_report`` says what the rule did to whom (client ids): Krum and Bulyan the updates they
``excluded``; median and trimmed mean each client's ``cut_share`` (the fraction of its coordinates
outside the band that was averaged); the norm bound the ``clipped`` clients with their scale.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping, Sequence
from typing import Any

import torch

from fedllm.algorithms.aggregate import (
    Aggregator,
    MeanAggregator,
    aggregators,
    build_named,
    register_aggregator,
)
from fedllm.config import krum_min_updates
from fedllm.types import ClientUpdate, StateDict, global_norm


def _check_nonempty(updates: Sequence[ClientUpdate]) -> None:
    if not updates:
        raise ValueError("cannot aggregate zero updates")
    keys = updates[0].delta.keys()
    for u in updates[1:]:
        if u.delta.keys() != keys:
            raise ValueError(f"client {u.client_id} sent keys that differ from client "
                             f"{updates[0].client_id}'s; expected the same trainable state")


def _sorted_stack(updates: Sequence[ClientUpdate], key: str) -> torch.Tensor:
    """The K values of ``key`` stacked on dim 0 (float64) and sorted per coordinate."""
    return torch.stack([u.delta[key].detach().to(torch.float64) for u in updates]).sort(dim=0).values


def coordinate_median(updates: Sequence[ClientUpdate]) -> StateDict:
    """Coordinate-wise median of the deltas (mean of the two middle values for even K)."""
    _check_nonempty(updates)
    k = len(updates)
    out: StateDict = {}
    for key, ref in updates[0].delta.items():
        s = _sorted_stack(updates, key)
        mid = s[k // 2] if k % 2 else 0.5 * (s[k // 2 - 1] + s[k // 2])
        out[key] = mid.to(ref.dtype)
    return out


def cut_shares(updates: Sequence[ClientUpdate], cut: int) -> dict[int, float]:
    """client -> fraction of its coordinates among the ``cut`` smallest or ``cut`` largest values
    (ties broken by client order, as a stable sort does): what a trimmed rule left out of it."""
    counts, total = torch.zeros(len(updates), dtype=torch.float64), 0
    if cut > 0:
        for key in updates[0].delta:
            x = torch.stack([u.delta[key].detach().reshape(-1).to(torch.float64) for u in updates])
            ranks = x.argsort(dim=0, stable=True).argsort(dim=0)
            counts += ((ranks < cut) | (ranks >= len(updates) - cut)).sum(dim=1)
            total += x.shape[1]
    else:
        total = 1
    return {u.client_id: float(c) / total for u, c in zip(updates, counts)}


@register_aggregator("median")
class Median:
    """Coordinate-wise median (Yin et al., 2018)."""

    def __init__(self) -> None:
        self.last_report: dict[str, Any] = {}

    def __call__(self, updates: Sequence[ClientUpdate]) -> StateDict:
        self.last_report = {"cut_share": cut_shares(updates, (len(updates) - 1) // 2)}
        return coordinate_median(updates)


@register_aggregator("trimmed_mean", options=lambda recipe: {"beta": recipe.robust.trim_ratio})
class TrimmedMean:
    """Coordinate-wise β-trimmed mean (Yin et al., 2018): drop ⌊βK⌋ values at each end."""

    def __init__(self, beta: float = 0.1) -> None:
        if not 0.0 <= beta < 0.5:
            raise ValueError(f"trimmed mean beta must be in [0, 0.5), got {beta}")
        self.beta = beta
        self.last_report: dict[str, Any] = {}

    def __call__(self, updates: Sequence[ClientUpdate]) -> StateDict:
        _check_nonempty(updates)
        n = len(updates)
        k = math.floor(self.beta * n)
        if n - 2 * k < 1:
            raise ValueError(f"trimming {k} of {n} updates at each end leaves nothing; lower beta")
        self.last_report = {"cut_share": cut_shares(updates, k)}
        return {key: _sorted_stack(updates, key)[k:n - k].mean(dim=0).to(ref.dtype)
                for key, ref in updates[0].delta.items()}


def _pairwise_sq_distances(updates: Sequence[ClientUpdate]) -> torch.Tensor:
    """K×K squared L2 distances between the flattened deltas (accumulated key by key, float64)."""
    n = len(updates)
    dist = torch.zeros(n, n, dtype=torch.float64)
    for key in updates[0].delta:
        x = torch.stack([u.delta[key].detach().cpu().flatten().to(torch.float64) for u in updates])
        # the direct-difference mode, not ‖a‖²+‖b‖²−2ab, which cancels badly for close deltas
        dist += torch.cdist(x, x, compute_mode="donot_use_mm_for_euclid_dist") ** 2
    return dist


def krum_select(updates: Sequence[ClientUpdate], num_byzantine: int, multi: int = 1) -> list[int]:
    """Indices (into ``updates``) of the ``multi`` deltas with the lowest Krum score, best first."""
    _check_nonempty(updates)
    n, f = len(updates), num_byzantine
    if n < krum_min_updates(f):
        raise ValueError(f"Krum needs more than 2f + 2 = {2 * f + 2} updates for f={f}, got {n}")
    if not 1 <= multi <= n:
        raise ValueError(f"multi-Krum m must be in [1, {n}], got {multi}")
    dist = _pairwise_sq_distances(updates)
    dist.fill_diagonal_(float("inf"))
    nearest = dist.sort(dim=1).values[:, : n - f - 2]
    scores = nearest.sum(dim=1)
    return [int(i) for i in torch.argsort(scores, stable=True)[:multi]]


@register_aggregator("krum", options=lambda recipe: {"num_byzantine": recipe.robust.byzantine, "multi": 1},
                     needs=lambda recipe: krum_min_updates(recipe.robust.byzantine))
class Krum:
    """Krum (m=1) and multi-Krum (mean of the m best) of Blanchard et al., 2017.

    ``multi=None`` takes m = K − f, the usual multi-Krum choice.
    """

    def __init__(self, num_byzantine: int, multi: int | None = 1) -> None:
        if num_byzantine < 0:
            raise ValueError(f"num_byzantine must be >= 0, got {num_byzantine}")
        if multi is not None and multi < 1:
            raise ValueError(f"multi must be >= 1 (or None for K − f), got {multi}")
        self.num_byzantine, self.multi = num_byzantine, multi
        self.last_report: dict[str, Any] = {}

    def __call__(self, updates: Sequence[ClientUpdate]) -> StateDict:
        m = len(updates) - self.num_byzantine if self.multi is None else self.multi
        chosen = krum_select(updates, self.num_byzantine, m)
        self.last_report = {"excluded": sorted(u.client_id for i, u in enumerate(updates) if i not in chosen)}
        return MeanAggregator(weighted=False)([updates[i] for i in chosen])


def bulyan_min_updates(byzantine: int) -> int:
    """Fewest updates Bulyan can combine with f Byzantine clients: K ≥ 4f + 3."""
    return 4 * byzantine + 3


@register_aggregator("bulyan", options=lambda recipe: {"num_byzantine": recipe.robust.byzantine},
                     needs=lambda recipe: bulyan_min_updates(recipe.robust.byzantine))
class Bulyan:
    """Bulyan (El Mhamdi et al., 2018): θ = K − 2f deltas picked by repeated Krum, then per coordinate
    the mean of the β = θ − 2f picked values closest to their coordinate-wise median."""

    def __init__(self, num_byzantine: int) -> None:
        if num_byzantine < 0:
            raise ValueError(f"num_byzantine must be >= 0, got {num_byzantine}")
        self.num_byzantine = num_byzantine
        self.last_report: dict[str, Any] = {}

    def __call__(self, updates: Sequence[ClientUpdate]) -> StateDict:
        _check_nonempty(updates)
        n, f = len(updates), self.num_byzantine
        if n < bulyan_min_updates(f):
            raise ValueError(f"Bulyan needs at least 4f + 3 = {bulyan_min_updates(f)} updates for f={f}, got {n}")
        left, picked = list(range(n)), []
        full = _pairwise_sq_distances(updates)
        for _ in range(n - 2 * f):  # Krum over what is left, with its own neighbour count
            dist = full[left][:, left].clone()
            dist.fill_diagonal_(float("inf"))
            nearest = max(len(left) - f - 2, 1)
            scores = dist.sort(dim=1).values[:, :nearest].sum(dim=1)
            best = left[int(torch.argsort(scores, stable=True)[0])]
            picked.append(best)
            left.remove(best)
        beta = len(picked) - 2 * f
        chosen = [updates[i] for i in sorted(picked)]
        self.last_report = {"excluded": sorted(updates[i].client_id for i in left)}
        out: StateDict = {}
        for key, ref in updates[0].delta.items():
            x = torch.stack([u.delta[key].detach().to(torch.float64) for u in chosen])
            med = x.median(dim=0).values if len(chosen) % 2 else x.sort(dim=0).values[
                len(chosen) // 2 - 1:len(chosen) // 2 + 1].mean(dim=0)
            closest = (x - med).abs().argsort(dim=0, stable=True)[:beta]
            out[key] = x.gather(0, closest).mean(dim=0).to(ref.dtype)
        return out


def clip_update(update: ClientUpdate, max_norm: float) -> ClientUpdate:
    """``update`` with its delta scaled by min(1, C/‖Δ‖₂) (global L2 norm over all keys)."""
    norm = global_norm(update.delta)
    if norm <= max_norm:
        return update
    scale = max_norm / norm
    return dataclasses.replace(update, delta={k: v * scale for k, v in update.delta.items()})


class NormBound:
    """Clip each delta to L2 norm ``max_norm``, then delegate to ``inner`` (plain mean by default)."""

    def __init__(self, max_norm: float, inner: Aggregator | None = None) -> None:
        if not max_norm > 0:
            raise ValueError(f"max_norm must be > 0, got {max_norm}")
        self.max_norm = max_norm
        self.inner: Aggregator = inner if inner is not None else MeanAggregator()
        self.last_report: dict[str, Any] = {}

    def __call__(self, updates: Sequence[ClientUpdate]) -> StateDict:
        norms = {u.client_id: global_norm(u.delta) for u in updates}
        out = self.inner([clip_update(u, self.max_norm) for u in updates])
        self.last_report = {**getattr(self.inner, "last_report", {}),
                            "norm_clipped": {k: self.max_norm / n for k, n in norms.items() if n > self.max_norm}}
        return out


@register_aggregator("multi_krum",
                     options=lambda recipe: {"num_byzantine": recipe.robust.byzantine, "multi": recipe.robust.multi},
                     needs=lambda recipe: krum_min_updates(recipe.robust.byzantine, recipe.robust.multi))
def _multi_krum(num_byzantine: int, multi: int | None = None) -> Krum:
    return Krum(num_byzantine, multi)


class _Registry(Mapping):
    """name -> factory of every registered aggregator (a live view: see ``aggregate.aggregators``)."""

    def __getitem__(self, name: str):
        return aggregators()[name].factory

    def __iter__(self):
        return iter(aggregators())

    def __len__(self) -> int:
        return len(aggregators())


AGGREGATORS: Mapping[str, Any] = _Registry()


def build_aggregator(name: str, max_norm: float | None = None, **kw: Any) -> Aggregator:
    """The aggregator called ``name`` (one of :data:`AGGREGATORS`) built with ``kw``.

    ``weighted`` goes to "mean" and "fednova"; ``max_norm`` wraps any of them in :class:`NormBound`.
    """
    agg = build_named("aggregator", AGGREGATORS, name, **kw)
    return agg if max_norm is None else NormBound(max_norm, agg)
