"""Gossip averaging without a server: the graph, Metropolis–Hastings weights, one mixing step.

Decentralized SGD (Lian et al. 2017, "Can Decentralized Algorithms Outperform Centralized
Algorithms?"; Koloskova et al. 2020, "A Unified Theory of Decentralized SGD with Changing Topology
and Local Updates"): client i holds its own model xᵢ. Each round it trains from xᵢ (local steps,
xᵢ^{t+½} = xᵢ^t + Δᵢ), then replaces its model by a weighted average of its own and its graph
neighbours' trained models::

    xᵢ^{t+1} = Σⱼ Wᵢⱼ xⱼ^{t+½}

W is the Metropolis–Hastings matrix of the graph (Xiao & Boyd 2004, "Fast linear iterations for
distributed averaging"): Wᵢⱼ = 1 / (1 + max(dᵢ, dⱼ)) for each edge {i, j}, Wᵢᵢ = 1 − Σ_{j≠i} Wᵢⱼ,
0 elsewhere (dᵢ: the degree of i). It is symmetric and doubly stochastic, so one step keeps the
clients' mean x̄ = (1/n) Σ xᵢ unchanged and, on a connected graph, shrinks the disagreement.
That disagreement is reported as the consensus distance Ξ² = (1/n) Σᵢ ‖xᵢ − x̄‖² (squared L2
over the whole trainable state; Kong et al. 2021, "Consensus Control for Decentralized Deep
Learning", use the same quantity).

Pure functions over state dicts: no Lightning, no Flower; :mod:`fedllm.federation.gossip` drives them.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from fedllm.types import StateDict

Edge = tuple[int, int]


def normalize_edges(n: int, edges: Sequence[Sequence[int]]) -> list[Edge]:
    """Undirected edges as sorted, de-duplicated ``(i, j)`` pairs with i < j; ValueError on a bad one."""
    out = set()
    for edge in edges:
        if len(edge) != 2:
            raise ValueError(f"edge {list(edge)}: expected two client ids")
        i, j = int(edge[0]), int(edge[1])
        if i == j or not (0 <= i < n and 0 <= j < n):
            raise ValueError(f"edge [{i}, {j}]: expected two different client ids in [0, {n})")
        out.add((min(i, j), max(i, j)))
    return sorted(out)


def ring(n: int) -> list[Edge]:
    """Client i linked to i − 1 and i + 1 (mod n): one edge for n = 2, none for n = 1."""
    return normalize_edges(n, [(i, (i + 1) % n) for i in range(n)]) if n > 1 else []


def unreachable(n: int, edges: Sequence[Edge]) -> list[int]:
    """Clients no path of ``edges`` connects to client 0 (empty: the graph is connected)."""
    nbrs = neighbours(n, edges)
    seen, todo = {0}, [0]
    while todo:
        for j in nbrs[todo.pop()]:
            if j not in seen:
                seen.add(j)
                todo.append(j)
    return [i for i in range(n) if i not in seen]


def random_k(n: int, k: int, seed: int, max_draws: int = 1000) -> list[Edge]:
    """Each client links to ``min(k, n − 1)`` others drawn uniformly (seeded); the union of those links,
    undirected, so degrees are >= k. Redrawn with the next draw key until the graph is connected."""
    k = min(k, n - 1)
    for draw in range(max_draws):
        rng = np.random.default_rng([seed, 0x60551B, draw])
        edges = [(i, int(j)) for i in range(n)
                 for j in rng.choice([c for c in range(n) if c != i], size=k, replace=False)] if k > 0 else []
        edges = normalize_edges(n, edges)
        if not unreachable(n, edges):
            return edges
    raise ValueError(f"no connected random-{k} graph over {n} clients in {max_draws} draws; raise graph_k")


def neighbours(n: int, edges: Sequence[Edge]) -> list[list[int]]:
    """Each client's neighbours, in id order."""
    out: list[list[int]] = [[] for _ in range(n)]
    for i, j in edges:
        out[i].append(j)
        out[j].append(i)
    return [sorted(v) for v in out]


def metropolis_weights(n: int, edges: Sequence[Edge]) -> torch.Tensor:
    """The n × n Metropolis–Hastings mixing matrix (float64): Wᵢⱼ = 1/(1 + max(dᵢ, dⱼ)) on edges,
    Wᵢᵢ = 1 − Σ_{j≠i} Wᵢⱼ."""
    deg = [len(v) for v in neighbours(n, edges)]
    w = torch.zeros(n, n, dtype=torch.float64)
    for i, j in edges:
        w[i, j] = w[j, i] = 1.0 / (1 + max(deg[i], deg[j]))
    w += torch.diag(1.0 - w.sum(dim=1))
    return w


def mix(states: Sequence[StateDict], weights: torch.Tensor) -> list[StateDict]:
    """One gossip step: client i's new model is Σⱼ Wᵢⱼ xⱼ (computed in float64, cast back)."""
    n = len(states)
    if tuple(weights.shape) != (n, n):
        raise ValueError(f"mixing matrix of shape {tuple(weights.shape)} for {n} models")
    out: list[StateDict] = [{} for _ in range(n)]
    for key, ref in states[0].items():
        stacked = torch.stack([s[key].detach().to(torch.float64).reshape(-1) for s in states])
        mixed = weights.to(stacked.device) @ stacked
        for i in range(n):
            out[i][key] = mixed[i].reshape(ref.shape).to(ref.dtype)
    return out


def mean_state(states: Sequence[StateDict]) -> StateDict:
    """x̄ = (1/n) Σ xᵢ (float64 sum, cast back): the mean client model gossip is evaluated on."""
    return {key: (sum(s[key].to(torch.float64) for s in states) / len(states)).to(ref.dtype)
            for key, ref in states[0].items()}


def consensus_distance(states: Sequence[StateDict]) -> float:
    """Ξ² = (1/n) Σᵢ ‖xᵢ − x̄‖², the squared L2 norm taken over every tensor of the state together."""
    total = 0.0
    for key in states[0]:
        stacked = torch.stack([s[key].to(torch.float64) for s in states])
        total += float(((stacked - stacked.mean(dim=0)) ** 2).sum())
    return total / len(states)
