"""Typed records that cross the client/server boundary, and helpers over state dicts.

Everything a client sends the server is a :class:`ClientUpdate`; everything the server sends a
client is a :class:`RoundInstruction`. Their payloads are plain ``dict[str, Tensor]`` state dicts
(the *trainable* state only: LoRA factors, or the weights of a small CNN), so the algorithm math
in :mod:`fedllm.algorithms` can stay pure and both engines (in-process, Flower) reuse it.

Communication is reported as the serialized size of those payloads (safetensors bytes), i.e.
what would actually travel, not a parameter count times four.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

import torch
from safetensors.torch import save as _safetensors_save

StateDict = dict[str, torch.Tensor]


@dataclass(frozen=True)
class RoundInstruction:
    """What the server sends one sampled client for one round."""

    round: int
    client_id: int
    global_state: StateDict
    local_steps: int
    seed: int
    config: Mapping[str, float] = field(default_factory=dict)


@dataclass(frozen=True)
class ClientUpdate:
    """What one client returns after local training.

    ``delta`` is θ_local − θ_global over the trainable state (GradualDiff-Fed's Δᵢ). Every built-in
    algorithm speaks in deltas; FedAvg's weighted mean of weights is θ_g + Σ wᵢ Δᵢ.
    ``grad_steps`` lets the engine tell a fit that trained from one whose gradients never reached
    a trainable parameter (:mod:`fedllm.federation.guard`).
    """

    client_id: int
    delta: StateDict
    num_examples: int
    local_steps: int
    train_loss: float
    bytes_up: int = 0
    metrics: Mapping[str, float] = field(default_factory=dict)
    grad_steps: int | None = None  # backward passes that left a non-zero gradient; None: not measured

    def is_finite(self) -> bool:
        """True when the reported loss and every delta entry are finite (no NaN/Inf)."""
        if not math.isfinite(self.train_loss):
            return False
        return all(bool(torch.isfinite(t).all()) for t in self.delta.values())


def serialized_bytes(state: Mapping[str, torch.Tensor]) -> int:
    """Size in bytes of ``state`` serialized as safetensors (what would cross the wire)."""
    if not state:
        return 0
    return len(_safetensors_save({k: v.detach().contiguous().cpu() for k, v in state.items()}))


def clone_state(state: Mapping[str, torch.Tensor]) -> StateDict:
    """A detached deep copy (so later in-place training cannot alias the server's copy)."""
    return {k: v.detach().clone() for k, v in state.items()}


def subtract(a: Mapping[str, torch.Tensor], b: Mapping[str, torch.Tensor]) -> StateDict:
    """``a − b`` key by key; both must have the same keys."""
    check_same_keys(a, b)
    return {k: a[k] - b[k] for k in a}


def add(a: Mapping[str, torch.Tensor], b: Mapping[str, torch.Tensor]) -> StateDict:
    """``a + b`` key by key; both must have the same keys."""
    check_same_keys(a, b)
    return {k: a[k] + b[k] for k in a}


def weighted_sum(states: Iterable[Mapping[str, torch.Tensor]], weights: Iterable[float]) -> StateDict:
    """Σ wᵢ·stateᵢ, accumulated in float64 then cast back to each tensor's dtype."""
    states, weights = list(states), list(weights)
    if not states:
        raise ValueError("weighted_sum needs at least one state")
    if len(states) != len(weights):
        raise ValueError(f"{len(states)} states but {len(weights)} weights")
    out: StateDict = {}
    for key, ref in states[0].items():
        acc = torch.zeros_like(ref, dtype=torch.float64)
        for state, w in zip(states, weights):
            acc += float(w) * state[key].to(torch.float64)
        out[key] = acc.to(ref.dtype)
    return out


def check_same_keys(a: Mapping[str, torch.Tensor], b: Mapping[str, torch.Tensor]) -> None:
    """Raise ``KeyError`` naming the first mismatching keys of two state dicts."""
    if a.keys() != b.keys():
        missing = sorted(set(b) - set(a))[:3]
        extra = sorted(set(a) - set(b))[:3]
        raise KeyError(f"state dicts differ: missing {missing}, unexpected {extra}")


def global_norm(state: Mapping[str, torch.Tensor]) -> float:
    """L2 norm of all entries of ``state`` taken together."""
    if not state:
        return 0.0
    return float(torch.sqrt(sum((v.double() ** 2).sum() for v in state.values())))
