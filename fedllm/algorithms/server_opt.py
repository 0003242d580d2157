"""Server optimizers: treat the aggregated client delta Δ as a pseudo-gradient step.

Reddi et al., 2021, "Adaptive Federated Optimization" (ICLR), Algorithms 1 and 2. The server
receives Δ_t (the aggregated client delta, e.g. the mean of Δᵢ = θᵢ − θ_g) and updates

- FedAvgM (server momentum, Hsu et al., 2019): v ← βv + Δ;  θ ← θ + η v.
- FedAdagrad: m ← β1 m + (1−β1)Δ;  v ← v + Δ²;                          θ ← θ + η m/(√v + τ).
- FedAdam:    m ← β1 m + (1−β1)Δ;  v ← β2 v + (1−β2)Δ²;                 θ ← θ + η m/(√v + τ).
- FedYogi:    m ← β1 m + (1−β1)Δ;  v ← v − (1−β2)Δ² · sign(v − Δ²);     θ ← θ + η m/(√v + τ).

All products are element-wise; as in the paper there is no bias correction, and the second moment
starts at v₋₁ = τ² (the paper requires v₋₁ ≥ τ²) unless ``initial_accumulator`` says otherwise.
τ controls adaptivity: a larger τ makes the step closer to momentum SGD on Δ.

Each class implements :class:`~fedllm.algorithms.aggregate.ServerUpdate`; its optimizer state
(m, v, step count) is plain tensors and ints so the server state checkpoints and resumes exactly.
Non-floating entries (e.g. a BatchNorm ``num_batches_tracked`` counter) get θ + Δ unchanged.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from fedllm.algorithms.aggregate import ApplyDelta, ServerUpdate, build_named
from fedllm.types import StateDict


def _check_lr(lr: float) -> None:
    if not lr > 0:
        raise ValueError(f"server lr must be > 0, got {lr}")


def _check_beta(name: str, beta: float) -> None:
    if not 0.0 <= beta < 1.0:
        raise ValueError(f"{name} must be in [0, 1), got {beta}")


def _check_keys(owner: str, state: Mapping[str, torch.Tensor], delta: Mapping[str, torch.Tensor]) -> None:
    if state.keys() != delta.keys():
        missing = sorted(set(state) - set(delta))[:3]
        extra = sorted(set(delta) - set(state))[:3]
        raise ValueError(f"{owner}: delta keys differ from the global state: missing {missing}, "
                         f"unexpected {extra}")


def _moment_dtype(t: torch.Tensor) -> torch.dtype:
    """Optimizer moments are kept in at least float32 (a bf16 moment loses small updates)."""
    return torch.promote_types(t.dtype, torch.float32)


def _clone(tensors: Mapping[str, torch.Tensor]) -> StateDict:
    return {k: v.detach().clone() for k, v in tensors.items()}


class FedAvgM:
    """Server momentum (Hsu et al., 2019; Reddi et al., 2021): v ← βv + Δ;  θ ← θ + η v.

    With ``momentum=0`` and ``lr=1`` this is exactly :class:`ApplyDelta` (FedAvg's server step).
    """

    def __init__(self, lr: float = 1.0, momentum: float = 0.9) -> None:
        _check_lr(lr)
        _check_beta("momentum", momentum)
        self.lr, self.momentum = lr, momentum
        self.velocity: StateDict = {}

    def step(self, global_state: StateDict, delta: StateDict) -> StateDict:
        _check_keys("FedAvgM", global_state, delta)
        new: StateDict = {}
        for key, theta in global_state.items():
            d = delta[key].detach()
            if not theta.is_floating_point():
                new[key] = theta + d
                continue
            v = self.velocity.get(key)
            v = d.to(_moment_dtype(theta)) if v is None else self.momentum * v + d.to(v.dtype)
            self.velocity[key] = v
            new[key] = (theta.to(v.dtype) + self.lr * v).to(theta.dtype)
        return new

    def state_dict(self) -> dict[str, Any]:
        return {"velocity": _clone(self.velocity)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if "velocity" not in state:
            raise ValueError(f"FedAvgM state needs key 'velocity', got {sorted(state)}")
        self.velocity = _clone(state["velocity"])


class _AdaptiveServerOpt:
    """Shared Algorithm 2 of Reddi et al.; subclasses define the second-moment rule only."""

    name = "adaptive"

    def __init__(self, lr: float = 1e-2, beta1: float = 0.9, beta2: float = 0.99, tau: float = 1e-3,
                 initial_accumulator: float | None = None) -> None:
        _check_lr(lr)
        _check_beta("beta1", beta1)
        _check_beta("beta2", beta2)
        if not tau > 0:
            raise ValueError(f"tau must be > 0, got {tau}")
        v0 = tau**2 if initial_accumulator is None else initial_accumulator
        if v0 < 0:
            raise ValueError(f"initial_accumulator must be >= 0, got {v0}")
        self.lr, self.beta1, self.beta2, self.tau, self.v0 = lr, beta1, beta2, tau, float(v0)
        self.m: StateDict = {}
        self.v: StateDict = {}
        self.steps = 0

    def _second_moment(self, v: torch.Tensor, d2: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def step(self, global_state: StateDict, delta: StateDict) -> StateDict:
        _check_keys(type(self).__name__, global_state, delta)
        new: StateDict = {}
        for key, theta in global_state.items():
            if not theta.is_floating_point():
                new[key] = theta + delta[key]
                continue
            dtype = _moment_dtype(theta)
            d = delta[key].detach().to(dtype)
            m = self.m.get(key, torch.zeros_like(d))
            v = self.v.get(key, torch.full_like(d, self.v0))
            m = self.beta1 * m + (1.0 - self.beta1) * d
            v = self._second_moment(v, d * d)
            self.m[key], self.v[key] = m, v
            new[key] = (theta.to(dtype) + self.lr * m / (v.sqrt() + self.tau)).to(theta.dtype)
        self.steps += 1
        return new

    def state_dict(self) -> dict[str, Any]:
        return {"m": _clone(self.m), "v": _clone(self.v), "steps": self.steps}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        missing = {"m", "v", "steps"} - set(state)
        if missing:
            raise ValueError(f"{type(self).__name__} state is missing keys {sorted(missing)}")
        self.m, self.v, self.steps = _clone(state["m"]), _clone(state["v"]), int(state["steps"])


class FedAdagrad(_AdaptiveServerOpt):
    """FedAdagrad (Reddi et al., 2021): v ← v + Δ²; θ ← θ + η m/(√v + τ)."""

    def _second_moment(self, v: torch.Tensor, d2: torch.Tensor) -> torch.Tensor:
        return v + d2


class FedAdam(_AdaptiveServerOpt):
    """FedAdam (Reddi et al., 2021): v ← β2 v + (1−β2)Δ²; θ ← θ + η m/(√v + τ)."""

    def _second_moment(self, v: torch.Tensor, d2: torch.Tensor) -> torch.Tensor:
        return self.beta2 * v + (1.0 - self.beta2) * d2


class FedYogi(_AdaptiveServerOpt):
    """FedYogi (Reddi et al., 2021; Zaheer et al., 2018): v ← v − (1−β2)Δ² sign(v − Δ²).

    Unlike Adam, v moves towards Δ² additively, so it cannot grow or shrink as abruptly.
    """

    def _second_moment(self, v: torch.Tensor, d2: torch.Tensor) -> torch.Tensor:
        return v - (1.0 - self.beta2) * d2 * torch.sign(v - d2)


SERVER_UPDATES: dict[str, type] = {
    "none": ApplyDelta,
    "fedavgm": FedAvgM,
    "fedadam": FedAdam,
    "fedyogi": FedYogi,
    "fedadagrad": FedAdagrad,
}


def build_server_update(name: str, **kw: Any) -> ServerUpdate:
    """The server optimizer called ``name`` (one of :data:`SERVER_UPDATES`) built with ``kw``."""
    return build_named("server optimizer", SERVER_UPDATES, name, **kw)
