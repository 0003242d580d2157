"""Centered clipping: Karimireddy, He & Jaggi, 2021, "Learning from History for Byzantine Robust
Optimization" (ICML), the aggregator of their Algorithm 2.

Starting from the previous round's aggregate v (the server's momentum of the history; 0 in the
first round), each of L iterations moves v by the mean of the clients' offsets from it, each offset
clipped to L2 norm τ:

    v ← v + (1/K) Σᵢ (Δᵢ − v) · min(1, τ / ‖Δᵢ − v‖₂),

over the whole flattened delta, with uniform weights (like the other robust rules it ignores
example counts). An attacker can then move the aggregate by at most τ/K per iteration whatever it
sends, and honest updates near v pass unchanged. The aggregate carried between rounds is part of
the server's checkpoint (:meth:`CenteredClipping.state_dict`), so a resumed run continues from it.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from fedllm.algorithms.aggregate import register_aggregator
from fedllm.types import ClientUpdate, StateDict


@register_aggregator("centered_clip", options=lambda recipe: {"tau": recipe.robust.clip_radius,
                                                              "iterations": recipe.robust.clip_iterations})
class CenteredClipping:
    """Centered clipping around the last aggregate (radius τ, L iterations); stateful across rounds."""

    def __init__(self, tau: float = 1.0, iterations: int = 1) -> None:
        if not tau > 0:
            raise ValueError(f"centered clipping tau must be > 0, got {tau}")
        if iterations < 1:
            raise ValueError(f"centered clipping iterations must be >= 1, got {iterations}")
        self.tau, self.iterations = tau, iterations
        self.center: StateDict | None = None  # the previous round's aggregate
        self.last_report: dict[str, Any] = {}

    def __call__(self, updates: Sequence[ClientUpdate]) -> StateDict:
        if not updates:
            raise ValueError("cannot aggregate zero updates")
        ref = updates[0].delta
        if self.center is None or self.center.keys() != ref.keys():
            v = {k: torch.zeros_like(t, dtype=torch.float64) for k, t in ref.items()}
        else:
            v = {k: t.to(torch.float64) for k, t in self.center.items()}
        deltas = [{k: u.delta[k].detach().to(torch.float64) for k in ref} for u in updates]
        scales: list[float] = []
        for _ in range(self.iterations):
            offsets = [{k: d[k] - v[k] for k in ref} for d in deltas]
            norms = [float(sum((o[k] ** 2).sum() for k in ref)) ** 0.5 for o in offsets]
            scales = [min(1.0, self.tau / n) if n > 0 else 1.0 for n in norms]
            v = {k: v[k] + sum(s * o[k] for s, o in zip(scales, offsets)) / len(updates) for k in ref}
        self.center = {k: t.clone() for k, t in v.items()}
        self.last_report = {"clipped": {u.client_id: s for u, s in zip(updates, scales) if s < 1.0}}
        return {k: v[k].to(t.dtype) for k, t in ref.items()}

    def state_dict(self) -> dict[str, Any]:
        return {"center": None if self.center is None else {k: t.clone() for k, t in self.center.items()}}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        center = state.get("center")
        self.center = None if center is None else {k: t.to(torch.float64) for k, t in center.items()}
