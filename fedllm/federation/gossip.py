"""Gossip FL in the federated round loop: every client keeps its own adapter, nobody holds a global one.

``federation.topology: gossip`` swaps :class:`~fedllm.federation.server.FederatedServer` for a
:class:`GossipPeers` with the same round protocol, so :func:`fedllm.federation.modes.run_federated`
(the rows, checkpoints, ``--resume``, ``fedllm compare``) runs unchanged. One round
(decentralized SGD, :mod:`fedllm.algorithms.gossip` has the update rule and its sources)::

    every client i trains from its own xᵢ             start_state(i) = xᵢ
    xᵢ ← xᵢ + Δᵢ   (a rejected or failed update: xᵢ stays)
    every client sends xᵢ to each neighbour; xᵢ ← Σⱼ Wᵢⱼ xⱼ   (Metropolis–Hastings W)

What the loop calls the global state is the clients' mean x̄ = (1/n) Σ xᵢ, a model no party holds:
it is what the row's held-out metrics (``eval_loss``, BLEU, ...) and ``adapter/`` are of. Each
client's own model is scored on its own held-out slice (``personal_eval_loss``, with
``eval.client_holdout``) and saved under ``personal/client_<i>/``. The row adds
``consensus_distance`` Ξ² = (1/n) Σ ‖xᵢ − x̄‖² after mixing (squared L2 over the whole trainable
state; ``consensus_distance_trained`` the same before mixing), ``bytes_up`` = the bytes every
client sent its neighbours (one model per directed edge; ``bytes_down`` is 0: there is no server).

Arrivals are checked as the server checks them (structure, finiteness, counts, ``reject_norm``,
``reject_norm_factor`` against the round's median). The models live in memory (n adapters).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch

from fedllm.algorithms.drift import DriftTerm, Proximal
from fedllm.algorithms.gossip import (
    consensus_distance,
    mean_state,
    metropolis_weights,
    mix,
    neighbours,
    normalize_edges,
    random_k,
    ring,
    unreachable,
)
from fedllm.config import FederationConfig, Recipe, RecipeError
from fedllm.federation.screening import check_counts, relative_norm_violations, validate_update
from fedllm.federation.server import RoundPlan
from fedllm.types import ClientUpdate, StateDict, add, clone_state, serialized_bytes

log = logging.getLogger(__name__)


def graph_edges(fed: FederationConfig, n: int, seed: int) -> list[tuple[int, int]]:
    """The recipe's graph (ring, random-k or its edge list); a graph that leaves a client unreachable
    is a recipe error: its models could never agree."""
    if fed.graph == "ring":
        return ring(n)
    if fed.graph == "random-k":
        try:
            return random_k(n, fed.graph_k, seed)
        except ValueError as exc:
            raise RecipeError("federation.graph_k", str(exc)) from None
    try:
        edges = normalize_edges(n, fed.graph)
    except ValueError as exc:
        raise RecipeError("federation.graph", str(exc)) from None
    if n > 1 and (cut := unreachable(n, edges)):
        raise RecipeError("federation.graph", f"clients {cut[:8]} have no path to client 0; gossip over a "
                          "graph that is not connected never reaches consensus")
    return edges


class GossipPeers:
    """The n clients' models and the graph they mix over, behind the server's round protocol."""

    def __init__(self, recipe: Recipe, initial_state: StateDict, client_sizes: Sequence[int],
                 payload_bytes: Callable[[Mapping[str, torch.Tensor]], int] | None = None) -> None:
        self.recipe, n = recipe, len(client_sizes)
        self.client_sizes = [int(s) for s in client_sizes]
        self.edges = graph_edges(recipe.federation, n, recipe.seed)
        self.degree = [len(v) for v in neighbours(n, self.edges)]
        self.weights = metropolis_weights(n, self.edges)
        self.template = clone_state(initial_state)
        self.models = [clone_state(initial_state) for _ in range(n)]
        self.model_bytes = (payload_bytes or serialized_bytes)(self.template)
        # every client's own model is scored on its own held-out slice (and saved as personal/client_i)
        self.personal_keys = list(initial_state) if recipe.eval.client_holdout > 0 else []
        self.personal = list(range(n))
        self._arrived: dict[int, ClientUpdate] = {}
        self._rejected: dict[int, str] = {}
        log.info("gossip over %d clients, %d edges (%s)", n, len(self.edges),
                 recipe.federation.graph if isinstance(recipe.federation.graph, str) else "edge list")

    def begin_round(self, rnd: int) -> RoundPlan:
        """Every client trains (decentralized SGD); nobody downloads anything from a server."""
        self._arrived, self._rejected = {}, {}
        everyone = list(range(len(self.models)))
        return RoundPlan(rnd, everyone, {k: self.recipe.train.local_steps for k in everyone})

    def start_state(self, client_id: int, global_state: StateDict | None) -> StateDict:
        return self.models[client_id]

    def grad_term(self, client_id: int, start: StateDict) -> DriftTerm | None:
        fed = self.recipe.federation
        return Proximal(fed.mu, start) if fed.algorithm == "fedprox" and fed.mu > 0 else None

    def upload(self, rnd: int, update: ClientUpdate, start: StateDict) -> None:
        k, fed = update.client_id, self.recipe.federation
        known = self.client_sizes[k] if 0 <= k < len(self.models) else None
        reason = (validate_update(update, self.template, fed.reject_norm)
                  or check_counts(update, known, fed.max_client_examples))
        if reason is None and k in self._arrived:
            reason = "a second update from this client in one round"
        if reason is not None:
            log.warning("round %d: update of client %d rejected: %s", rnd, k, reason)
            self._rejected[k] = reason
            return
        self._arrived[k] = update

    def finish_round(self, rnd: int, global_state: StateDict) -> tuple[StateDict, dict[str, Any]]:
        """Apply each valid update to its client's model, mix over the graph; x̄ is the new 'global' state."""
        outliers = relative_norm_violations(list(self._arrived.values()), self.recipe.federation.reject_norm_factor)
        for k, why in outliers.items():
            log.warning("round %d: update of client %d rejected: %s", rnd, k, why)
            self._rejected[k] = why
        valid = sorted(k for k in self._arrived if k not in outliers)
        trained = [add(x, self._arrived[k].delta) if k in valid else x for k, x in enumerate(self.models)]
        before = consensus_distance(trained)
        self.models = mix(trained, self.weights)
        self._arrived = {}
        metrics = {"rejected": dict(sorted(self._rejected.items())), "aggregated_clients": valid, "applied": True,
                   "bytes_up": sum(self.degree) * self.model_bytes, "bytes_down": 0,
                   "rejected_updates": len(self._rejected), "consensus_distance": consensus_distance(self.models),
                   "consensus_distance_trained": before}
        return mean_state(self.models), metrics

    def eval_state(self, global_state: StateDict) -> StateDict:
        return global_state

    def personal_state(self, client_id: int, global_state: StateDict) -> StateDict:
        """Client ``client_id``'s own model."""
        return self.models[client_id]

    def state_dict(self) -> dict[str, Any]:
        return {"models": [clone_state(x) for x in self.models], "edges": [list(e) for e in self.edges]}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        if [tuple(e) for e in state["edges"]] != self.edges or len(state["models"]) != len(self.models):
            raise ValueError("the checkpoint's gossip graph is not this recipe's")
        for x in state["models"]:
            if x.keys() != self.template.keys():
                raise KeyError("a checkpointed client model's keys differ from the adapter's")
        self.models = [clone_state(x) for x in state["models"]]
