"""Geometric median of the client deltas: RFA (Pillutla, Kakade, Harchaoui, 2022, "Robust
Aggregation for Federated Learning", IEEE TSP).

The aggregate is v* = argmin_v Σᵢ αᵢ ‖v − Δᵢ‖₂ over the whole flattened delta (all keys together),
with uniform αᵢ: like the other robust rules it ignores the example counts a client reports. It
is found by the smoothed Weiszfeld iteration of the paper's Algorithm 2,

    βᵢ = αᵢ / max(ν, ‖v − Δᵢ‖₂),   v ← Σᵢ βᵢ Δᵢ / Σᵢ βᵢ,

started from the coordinate-wise median (the iteration converges to the same minimizer from any
start, since the objective is convex; from the mean, one enormous update would leave it crawling
back linearly) and stopped when a step moves v by less than ``tol`` times the points' spread or
after ``max_iter`` steps; ν > 0 keeps a step defined when v sits on a Δᵢ. Its breakdown point is
1/2: fewer than half of the updates cannot move it arbitrarily far, however large they are.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from fedllm.algorithms.aggregate import register_aggregator
from fedllm.types import ClientUpdate, StateDict


def _flatten(updates: Sequence[ClientUpdate]) -> tuple[torch.Tensor, list[tuple[str, torch.Size, torch.dtype]]]:
    if not updates:
        raise ValueError("cannot aggregate zero updates")
    layout = [(k, v.shape, v.dtype) for k, v in updates[0].delta.items()]
    for u in updates[1:]:
        if u.delta.keys() != updates[0].delta.keys():
            raise ValueError(f"client {u.client_id} sent keys that differ from client "
                             f"{updates[0].client_id}'s; expected the same trainable state")
    rows = [torch.cat([u.delta[k].detach().cpu().reshape(-1).to(torch.float64) for k, _, _ in layout])
            for u in updates]
    return torch.stack(rows), layout


def geometric_median(points: torch.Tensor, nu: float = 1e-6, max_iter: int = 100,
                     tol: float = 1e-9) -> tuple[torch.Tensor, int]:
    """(v*, iterations) for the rows of ``points`` (K × d, float64) by smoothed Weiszfeld.

    Stops when a step moves v by at most ``tol`` times the points' spread (or after ``max_iter``).
    """
    k = len(points)
    s = points.sort(dim=0).values
    v = s[k // 2] if k % 2 else 0.5 * (s[k // 2 - 1] + s[k // 2])  # the coordinate-wise median
    scale = max(float((points - v).norm(dim=1).median()), 1e-300)
    for it in range(1, max_iter + 1):
        beta = 1.0 / (points - v).norm(dim=1).clamp_min(nu)
        v_next = (beta[:, None] * points).sum(dim=0) / beta.sum()
        step = float((v_next - v).norm())
        v = v_next
        if step <= tol * scale:
            return v, it
    return v, max_iter


@register_aggregator("geomed")
class GeometricMedian:
    """RFA's geometric median of the deltas (uniform weights; smoothed Weiszfeld)."""

    def __init__(self, nu: float = 1e-6, max_iter: int = 100, tol: float = 1e-9) -> None:
        if not nu > 0:
            raise ValueError(f"geometric median nu must be > 0, got {nu}")
        if max_iter < 1:
            raise ValueError(f"geometric median max_iter must be >= 1, got {max_iter}")
        self.nu, self.max_iter, self.tol = nu, max_iter, tol
        self.last_iterations = 0

    def __call__(self, updates: Sequence[ClientUpdate]) -> StateDict:
        points, layout = _flatten(updates)
        v, self.last_iterations = geometric_median(points, self.nu, self.max_iter, self.tol)
        out, start = {}, 0
        for key, shape, dtype in layout:
            n = shape.numel()
            out[key] = v[start:start + n].reshape(shape).to(dtype)
            start += n
        return out
