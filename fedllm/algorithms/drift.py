"""Client-drift corrections for heterogeneous (non-IID) clients: FedProx, SCAFFOLD, FedNova.

- FedProx (Li et al., 2020, "Federated Optimization in Heterogeneous Networks"): each client
  minimizes Fᵢ(w) + (μ/2)‖w − w_g‖², whose extra gradient is μ(w − w_g) (not μ/2, not 2μ).
- SCAFFOLD (Karimireddy et al., 2020, "SCAFFOLD: Stochastic Controlled Averaging for Federated
  Learning"): each local step uses g(w) + c − cᵢ; after K steps of lr η, option II sets
  cᵢ⁺ = cᵢ − c + (θ_g − θᵢ)/(Kη) = cᵢ − c − Δᵢ/(Kη), and the server sets
  c ← c + (|S|/N)·mean_{i∈S}(cᵢ⁺ − cᵢ) = c + (1/N) Σ_{i∈S}(cᵢ⁺ − cᵢ).
- FedNova (Wang et al., 2020, "Tackling the Objective Inconsistency Problem in Heterogeneous
  Federated Optimization"): clients that ran τᵢ local steps are normalized before averaging,
  Δ = τ_eff Σ pᵢ Δᵢ/τᵢ with τ_eff = Σ pᵢ τᵢ (vanilla local SGD, where aᵢ = τᵢ; with momentum or a
  proximal term ‖aᵢ‖₁ differs and is not modelled here).

Everything is a pure function over ``dict[str, Tensor]``; :class:`ScaffoldState` is the one
stateful piece and checkpoints as plain tensors.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from fedllm.algorithms.aggregate import client_weights, register_aggregator
from fedllm.types import ClientStates, ClientUpdate, RunningSum, StateDict, weighted_sum


def _same_keys(what: str, a: Mapping[str, torch.Tensor], b: Mapping[str, torch.Tensor]) -> None:
    if a.keys() != b.keys():
        missing, extra = sorted(set(a) - set(b))[:3], sorted(set(b) - set(a))[:3]
        raise ValueError(f"{what}: keys differ from the reference state: missing {missing}, "
                         f"unexpected {extra}")


# ---------------------------------------------------------------------------- FedProx


def _global_for(params: Mapping[str, torch.Tensor], global_params: Mapping[str, torch.Tensor],
                ) -> dict[str, torch.Tensor]:
    missing = sorted(set(params) - set(global_params))
    if missing:
        raise ValueError(f"FedProx: global_params lacks {missing[:3]}; expected every trainable key")
    return {k: global_params[k].detach().to(device=w.device, dtype=w.dtype) for k, w in params.items()}


def _check_mu(mu: float) -> None:
    if not mu >= 0:
        raise ValueError(f"FedProx mu must be >= 0, got {mu}")


def prox_gradient(params: Mapping[str, torch.Tensor], global_params: Mapping[str, torch.Tensor],
                  mu: float) -> StateDict:
    """μ(w − w_g) per key: the gradient of (μ/2)‖w − w_g‖², to add to each parameter's gradient."""
    _check_mu(mu)
    anchors = _global_for(params, global_params)
    return {k: mu * (w.detach() - anchors[k]) for k, w in params.items()}


def prox_penalty(params: Mapping[str, torch.Tensor], global_params: Mapping[str, torch.Tensor],
                 mu: float) -> torch.Tensor:
    """(μ/2)‖w − w_g‖² as a scalar tensor that keeps autograd, to add to the client's loss."""
    _check_mu(mu)
    anchors = _global_for(params, global_params)
    if not params:
        return torch.zeros(())
    total = sum(((w - anchors[k]) ** 2).sum() for k, w in params.items())
    return 0.5 * mu * total


# ---------------------------------------------------------------------------- what a client adds to its gradients


@dataclass(frozen=True)
class Proximal:
    """FedProx's term for one client and round: μ(w − anchor) added to each gradient.

    ``anchor`` is the state the client started from (the global, or its region's, model).
    """

    mu: float
    anchor: StateDict

    def __post_init__(self) -> None:
        _check_mu(self.mu)

    def __call__(self, params: Mapping[str, torch.Tensor]) -> StateDict:
        return prox_gradient(params, self.anchor, self.mu)


@dataclass(frozen=True)
class Correction:
    """A constant per-key gradient correction for one client and round (SCAFFOLD's c − cᵢ)."""

    tensors: StateDict

    def __call__(self, params: Mapping[str, torch.Tensor]) -> StateDict:
        return self.tensors


DriftTerm = Proximal | Correction
"""What the server hands a client to add to its gradients after every backward pass.

Typed, so that an engine can ship it (a μ and an anchor, or a set of tensors) without knowing
which algorithm asked for it; the client calls it with its named trainable parameters.
"""


# ---------------------------------------------------------------------------- SCAFFOLD


def scaffold_correction(c: Mapping[str, torch.Tensor], c_i: Mapping[str, torch.Tensor]) -> StateDict:
    """c − cᵢ: added to the gradient at every local step of client i."""
    _same_keys("SCAFFOLD c_i", c, c_i)
    return {k: c[k] - c_i[k] for k in c}


def scaffold_client_control(c_i: Mapping[str, torch.Tensor], c: Mapping[str, torch.Tensor],
                            delta: Mapping[str, torch.Tensor], local_steps: int, lr: float) -> StateDict:
    """Option II: cᵢ⁺ = cᵢ − c − Δᵢ/(K·η), where Δᵢ = θᵢ − θ_g after K local steps of lr η."""
    if local_steps <= 0:
        raise ValueError(f"SCAFFOLD needs local_steps > 0, got {local_steps}")
    if not lr > 0:
        raise ValueError(f"SCAFFOLD needs a local lr > 0, got {lr}")
    _same_keys("SCAFFOLD c", c_i, c)
    _same_keys("SCAFFOLD delta", c_i, delta)
    scale = 1.0 / (local_steps * lr)
    return {k: c_i[k] - c[k] - scale * delta[k].to(c_i[k].dtype) for k in c_i}


class ScaffoldState:
    """The server control c and every client's control cᵢ (zeros until a client first reports).

    ``template`` fixes the keys, shapes and dtypes (the trainable state); controls live on the CPU,
    in ``clients`` (in memory by default; the server passes a store on disk, loaded per client).
    """

    def __init__(self, template: Mapping[str, torch.Tensor], clients: ClientStates | None = None) -> None:
        self.c: StateDict = {k: torch.zeros_like(v, device="cpu") for k, v in template.items()}
        self.clients = ClientStates() if clients is None else clients

    def client_control(self, client_id: int) -> StateDict:
        """cᵢ for ``client_id`` (zeros if it has never been updated)."""
        found = self.clients.get(client_id)
        return {k: v.clone() for k, v in (found or self._zeros()).items()}

    def server_update(self, client_ids: Sequence[int], new_controls: Iterable[Mapping[str, torch.Tensor]],
                      num_clients_total: int) -> None:
        """c ← c + (|S|/N)·mean(cᵢ⁺ − cᵢ), and store each cᵢ⁺.

        ``new_controls`` may be a generator: each control is folded into the sum and stored as it
        comes, so the server never holds more than one client's control besides c.
        """
        ids = list(client_ids)
        if len(set(ids)) != len(ids):
            raise ValueError(f"client ids must be unique, got {ids}")
        if num_clients_total < len(ids) or num_clients_total <= 0:
            raise ValueError(f"num_clients_total={num_clients_total} must be >= the {len(ids)} "
                             "participating clients and > 0")
        total, controls = RunningSum(), iter(new_controls)
        for cid in ids:
            if (new := next(controls, None)) is None:
                raise ValueError(f"{len(ids)} client ids but fewer new controls")
            _same_keys(f"SCAFFOLD control of client {cid}", self.c, new)
            new_cpu = {k: v.detach().to(device="cpu", dtype=self.c[k].dtype) for k, v in new.items()}
            old = self.clients.get(cid) or self._zeros()
            # (|S|/N) · mean over S  ==  (1/N) · sum over S
            total.add({k: new_cpu[k] - old[k] for k in self.c}, 1.0 / num_clients_total)
            self.clients[cid] = new_cpu
        if next(controls, None) is not None:
            raise ValueError(f"{len(ids)} client ids but more new controls")
        if ids:
            step = total.result()
            self.c = {k: self.c[k] + step[k] for k in self.c}

    def _zeros(self) -> StateDict:
        return {k: torch.zeros_like(v) for k, v in self.c.items()}

    def state_dict(self) -> dict[str, Any]:
        return {"c": {k: v.clone() for k, v in self.c.items()}, "clients": self.clients.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if set(state) != {"c", "clients"}:
            raise ValueError(f"ScaffoldState needs keys ['c', 'clients'], got {sorted(state)}")
        _same_keys("ScaffoldState c", self.c, state["c"])
        self.c = {k: v.clone() for k, v in state["c"].items()}
        self.clients.load_state_dict(state["clients"])


# ---------------------------------------------------------------------------- FedNova


def fednova_aggregate(updates: Sequence[ClientUpdate], weighted: bool = True) -> StateDict:
    """Δ = τ_eff Σ pᵢ Δᵢ/τᵢ, τ_eff = Σ pᵢ τᵢ, with pᵢ = nᵢ/n (or 1/K) and τᵢ = local_steps."""
    return weighted_sum([u.delta for u in updates], fednova_coefficients(updates, weighted))


def fednova_coefficients(updates: Sequence[ClientUpdate], weighted: bool = True,
                         max_weight: float | None = None) -> list[float]:
    """Each update's coefficient τ_eff pᵢ/τᵢ in FedNova's sum (from the counts alone); ``max_weight``
    caps each pᵢ first (``federation.max_client_weight``)."""
    p = client_weights(updates, weighted, max_weight)
    for u in updates:
        if u.local_steps <= 0:
            raise ValueError(f"FedNova: client {u.client_id} reports local_steps={u.local_steps}; "
                             "expected > 0")
    tau_eff = sum(pi * u.local_steps for pi, u in zip(p, updates))
    return [tau_eff * pi / u.local_steps for pi, u in zip(p, updates)]


@register_aggregator("fednova", options=lambda recipe: {"weighted": recipe.federation.is_weighted,
                                                        "max_weight": recipe.federation.max_client_weight})
class FedNovaAggregator:
    """FedNova's normalized averaging as an :class:`~fedllm.algorithms.aggregate.Aggregator`."""

    def __init__(self, weighted: bool = True, max_weight: float | None = None) -> None:
        self.weighted, self.max_weight = weighted, max_weight

    def __call__(self, updates: Sequence[ClientUpdate]) -> StateDict:
        return weighted_sum([u.delta for u in updates],
                            fednova_coefficients(updates, self.weighted, self.max_weight))
