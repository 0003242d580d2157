"""IFCA, the Iterative Federated Clustering Algorithm (Ghosh et al. 2020, "An Efficient Framework
for Clustered Federated Learning"): k cluster models, each client trains the one that fits it best.

Round t, with cluster models θ₁ … θ_k (Algorithm 1, the model-averaging variant)::

    every sampled client i:  ĵᵢ = argmin_j Fᵢ(θ_j)       (its empirical loss on its own training data)
                             Δᵢ = local training from θ_ĵᵢ  (the usual local steps)
    server, each cluster j:  θ_j ← θ_j + mean_{i : ĵᵢ = j} Δᵢ

The mean is GradualDiff-Fed's (1/|S_j|) Σ Δᵢ, or example-weighted (FedAvg) when the recipe weighs; a
cluster no client chose keeps its model. Ties in the argmin go to the lowest cluster index, and a
non-finite loss never wins (a client whose k losses are all non-finite picks cluster 0).

Initialization: the paper draws the k models at random; fine-tuning starts from one pretrained
base, so here θ_j = θ₀ + σ·ε_j with ε_j ~ N(0, I) seeded by (seed, j) on every tensor, or, for a
LoRA state, on the B factors only (A keeps its shared random init; with B = 0 at θ₀ the clusters
would otherwise all be the base model and tie). ``federation.cluster_init_scale`` is σ. Noise around
one pretrained base can leave every client preferring the same model (then IFCA is FedAvg with
k − 1 idle models); ``federation.cluster_init: clients`` instead starts model j from one local fit
of a distinct client (:mod:`fedllm.federation.clustered`).

Pure functions over state dicts and loss tables; :mod:`fedllm.federation.clustered` drives them.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import torch

from fedllm.algorithms.aggregate import client_weights
from fedllm.types import ClientUpdate, StateDict, weighted_sum


def perturbed_inits(state: StateDict, k: int, scale: float, seed: int) -> list[StateDict]:
    """The k cluster models' initial states: ``state`` plus seeded N(0, scale²) noise (LoRA: B only)."""
    lora = any(".lora_B" in key for key in state)
    out = []
    for j in range(k):
        gen = torch.Generator().manual_seed((seed * 1_000_003 + 7_907 * (j + 1)) % (2**63 - 1))
        model = {}
        for key, v in state.items():
            if lora and ".lora_B" not in key:
                model[key] = v.detach().clone()
                continue
            noise = torch.randn(v.shape, generator=gen, dtype=torch.float64)
            model[key] = (v.detach().to(torch.float64) + scale * noise.to(v.device)).to(v.dtype)
        out.append(model)
    return out


def assign(losses: Sequence[float]) -> int:
    """ĵ = argmin_j losses[j]: ties to the lowest index, non-finite losses never chosen (0 if all are)."""
    best, best_loss = 0, math.inf
    for j, loss in enumerate(losses):
        if math.isfinite(loss) and loss < best_loss:
            best, best_loss = j, loss
    return best


def cluster_means(updates: Sequence[ClientUpdate], cluster_of: Mapping[int, int], k: int, weighted: bool = False,
                  max_weight: float | None = None) -> dict[int, StateDict]:
    """cluster j -> the mean Δ of the updates of the clients that chose j (only clusters with some)."""
    members: dict[int, list[ClientUpdate]] = {}
    for u in updates:
        j = cluster_of[u.client_id]
        if not 0 <= j < k:
            raise ValueError(f"client {u.client_id} assigned to cluster {j}, expected [0, {k})")
        members.setdefault(j, []).append(u)
    return {j: weighted_sum([u.delta for u in ups], client_weights(ups, weighted, max_weight))
            for j, ups in sorted(members.items())}


def representative(sizes: Sequence[int]) -> int:
    """The cluster serving the most clients (ties: the lowest index): the run's headline model."""
    return max(range(len(sizes)), key=lambda j: (sizes[j], -j))
