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
of a distinct client (:mod:`fedllm.federation.clustered`), and ``farthest`` chooses those k clients
far apart (:func:`farthest_first`).

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


def cosine_distance(a: StateDict, b: StateDict) -> float:
    """1 − cos(a, b) over the whole flattened state, in float64 (in [0, 2]; 1 when either is all zero)."""
    dot = na = nb = 0.0
    for key, v in a.items():
        x, y = v.detach().to(torch.float64).flatten(), b[key].detach().to(torch.float64).flatten().to(v.device)
        dot, na, nb = dot + float(x @ y), na + float(x @ x), nb + float(y @ y)
    return 1.0 if na == 0 or nb == 0 else 1.0 - dot / math.sqrt(na * nb)


def farthest_first(signatures: Sequence[StateDict], k: int, first: int) -> tuple[list[int], list[float]]:
    """The k warm-start clients of ``cluster_init: farthest``, in the order chosen, and the distance
    at which each was chosen (0 for ``first``).

    k-means++ seeding (Arthur & Vassilvitskii 2007, "k-means++: The Advantages of Careful Seeding")
    made deterministic: the first center is ``first`` (the caller draws it with the seed), and each
    next one is the client whose signature is farthest from its nearest chosen center,
    argmax_i min_{c chosen} d(sᵢ, s_c) (k-means++ draws i with probability ∝ that distance squared;
    taking the argmax is Gonzalez's 1985 farthest-first traversal, a 2-approximation of the k-center
    cost under a metric; the cosine distance is not one, so here it is a heuristic with the same
    intent). Ties go to the lowest client index; a chosen client is never chosen again.

    The signature sᵢ is client i's update Δᵢ from one local fit of the shared initial state, and d is
    the cosine distance 1 − cos(Δᵢ, Δⱼ). Why the update and not a loss signature: before the k models
    exist the only model the server could score losses on is θ₀, one number per client that says how
    hard its data is, not which population it belongs to; the update is what an IFCA client uploads
    every round anyway (so the server learns nothing new), and its direction is the client's descent
    direction, which CFL (Sattler et al. 2020) splits clients by for the same reason. Why cosine and
    not L2: an update's norm grows with the client's loss level and step count, so the L2-farthest
    client is often just the one with the most loss left, while two clients of one population point
    the same way.
    """
    n = len(signatures)
    if not 1 <= k <= n or not 0 <= first < n:
        raise ValueError(f"farthest_first: expected 1 <= k <= {n} and first in [0, {n}), got k={k}, first={first}")
    chosen, at = [first], [0.0]
    nearest = [cosine_distance(s, signatures[first]) for s in signatures]
    while len(chosen) < k:
        nxt = max((i for i in range(n) if i not in chosen), key=lambda i: (nearest[i], -i))
        chosen.append(nxt)
        at.append(nearest[nxt])
        nearest = [min(d, cosine_distance(s, signatures[nxt])) for d, s in zip(nearest, signatures)]
    return chosen, at
