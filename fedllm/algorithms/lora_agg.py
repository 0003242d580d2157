"""Aggregating LoRA factors: averaging A and B separately is not averaging the updates BA.

A LoRA layer adds (α/r)·B A to a frozen weight, with A ∈ R^{r×in} (``…lora_A.weight``) and
B ∈ R^{out×r} (``…lora_B.weight``); keys are paired by their common prefix. Client i holds
Bᵢ = B_g + ΔBᵢ and Aᵢ = A_g + ΔAᵢ, and the ideal aggregate of the layer update is the (weighted)
mean product M = Σ wᵢ BᵢAᵢ. Three modes:

- ``factorwise``: B ← mean Bᵢ, A ← mean Aᵢ (GradualDiff-Fed's mean of deltas, also FedIT). Then
  B A = (Σ wᵢBᵢ)(Σ wⱼAⱼ) ≠ Σ wᵢ BᵢAᵢ in general: the cross terms BᵢAⱼ leak in.
- ``svd`` (formerly ``exact``): form M (without materialising it), take the truncated SVD M ≈ U_r S_r V_rᵀ and set
  B ← U_r √S_r, A ← √S_r V_rᵀ. Exact when rank(M) ≤ r; otherwise the residual is the Eckart–Young
  optimum √(Σ_{j>r} σ_j²). M = [w₁B₁ … w_KB_K]·[A₁; …; A_K] has rank ≤ Kr, so we QR-factor both
  sides and take the SVD of a small (≤Kr)×(≤Kr) core instead of the out×in matrix.
  (FLoRA-style stacking and FedEx-LoRA are exact by growing the rank or folding the residual into
  the base; here the rank stays r, so this is the best rank-r answer, exact only when rank M ≤ r.)
- ``frozen_a``: A stays at a shared initialisation (FFA-LoRA, Sun et al., 2024), so ΔAᵢ ≡ 0 and
  mean Bᵢ · A = mean(BᵢA): averaging B is exact. A non-zero ΔA is an error.

Keys that are not LoRA factors are averaged as plain deltas with the same weights. The error we
report is ‖M − B_new A_new‖_F / ‖M‖_F over all pairs together (squares summed over pairs before the
square root). peft's α/r scaling multiplies every product alike, so it does not change that ratio.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence

import torch

from fedllm.algorithms.aggregate import client_weights
from fedllm.types import ClientUpdate, StateDict, weighted_sum

MODES = ("factorwise", "svd", "frozen_a")

# "…q_proj.lora_A.weight" (get_peft_model_state_dict) or "…q_proj.lora_A.default.weight" (state_dict)
_A_KEY = re.compile(r"^(?P<prefix>.*)lora_A(?P<adapter>\.[^.]+)?\.weight$")


def lora_pairs(state: Mapping[str, torch.Tensor]) -> list[tuple[str, str]]:
    """(A key, B key) for every LoRA factor pair in ``state``, in key order."""
    pairs = []
    for key in state:
        match = _A_KEY.match(key)
        if match is None:
            continue
        b_key = f"{match['prefix']}lora_B{match['adapter'] or ''}.weight"
        if b_key not in state:
            raise ValueError(f"LoRA factor {key!r} has no partner {b_key!r} in the state")
        a, b = state[key], state[b_key]
        if a.dim() != 2 or b.dim() != 2 or b.shape[1] != a.shape[0]:
            raise ValueError(f"LoRA pair {key!r} {tuple(a.shape)} / {b_key!r} {tuple(b.shape)}: expected "
                             "A of shape r×in and B of shape out×r")
        pairs.append((key, b_key))
    return pairs


def _product(state: Mapping[str, torch.Tensor], a_key: str, b_key: str) -> torch.Tensor:
    return state[b_key].detach().to(torch.float64) @ state[a_key].detach().to(torch.float64)


def aggregation_error(global_new: Mapping[str, torch.Tensor],
                      client_states: Sequence[Mapping[str, torch.Tensor]],
                      weights: Sequence[float] | None = None) -> float:
    """‖M − B_g A_g‖_F / ‖M‖_F over all LoRA pairs, M = Σ wᵢ BᵢAᵢ (uniform weights by default).

    0.0 when the state has no LoRA pairs or every product is zero; ``inf`` when M = 0 ≠ B_g A_g.
    """
    if not client_states:
        raise ValueError("aggregation_error needs at least one client state")
    w = [1.0 / len(client_states)] * len(client_states) if weights is None else list(weights)
    if len(w) != len(client_states):
        raise ValueError(f"{len(client_states)} client states but {len(w)} weights")
    num = den = 0.0
    for a_key, b_key in lora_pairs(global_new):
        mean = sum(wi * _product(s, a_key, b_key) for wi, s in zip(w, client_states))
        num += float(((mean - _product(global_new, a_key, b_key)) ** 2).sum())
        den += float((mean**2).sum())
    if den == 0.0:
        return 0.0 if num == 0.0 else float("inf")
    return (num / den) ** 0.5


def _svd_pair(global_state: Mapping[str, torch.Tensor], updates: Sequence[ClientUpdate], w: list[float],
                a_key: str, b_key: str) -> tuple[torch.Tensor, torch.Tensor]:
    """New (A, B) from the rank-r truncated SVD of M = Σ wᵢ BᵢAᵢ, computed via QR of the stacks."""
    a_g, b_g = global_state[a_key], global_state[b_key]
    r = a_g.shape[0]
    f64 = torch.float64
    bs = torch.cat([wi * (b_g.to(f64) + u.delta[b_key].to(f64)) for wi, u in zip(w, updates)], dim=1)
    as_ = torch.cat([a_g.to(f64) + u.delta[a_key].to(f64) for u in updates], dim=0)
    q_b, r_b = torch.linalg.qr(bs)  # out×k1, k1×Kr
    q_a, r_a = torch.linalg.qr(as_.T)  # in×k2, k2×Kr
    u, s, vh = torch.linalg.svd(r_b @ r_a.T, full_matrices=False)
    k = min(r, s.numel())
    root = s[:k].sqrt()
    new_b = torch.zeros(b_g.shape, dtype=f64, device=bs.device)
    new_a = torch.zeros(a_g.shape, dtype=f64, device=bs.device)
    new_b[:, :k] = (q_b @ u[:, :k]) * root
    new_a[:k] = root[:, None] * (vh[:k] @ q_a.T)
    return new_a, new_b


def _check_frozen_a(updates: Sequence[ClientUpdate], pairs: list[tuple[str, str]]) -> None:
    for u in updates:
        for a_key, _ in pairs:
            if bool(u.delta[a_key].ne(0).any()):
                raise ValueError(f"frozen_a: client {u.client_id} changed {a_key!r}; expected ΔA ≡ 0 "
                                 "(freeze lora_A at the shared initialisation)")


def lora_aggregate(global_state: Mapping[str, torch.Tensor], updates: Sequence[ClientUpdate], mode: str,
                   weighted: bool = False) -> tuple[StateDict, float]:
    """(aggregated delta, aggregation error) of the clients' LoRA deltas under ``mode``."""
    if mode not in MODES:
        raise ValueError(f"unknown LoRA aggregation mode {mode!r}; expected one of {list(MODES)}")
    w = client_weights(updates, weighted)
    for u in updates:
        if u.delta.keys() != global_state.keys():
            raise ValueError(f"client {u.client_id}'s delta keys differ from the global state's")
    pairs = lora_pairs(global_state)
    if mode == "frozen_a":
        _check_frozen_a(updates, pairs)
    delta = weighted_sum([u.delta for u in updates], w)
    if mode == "svd":
        for a_key, b_key in pairs:
            new_a, new_b = _svd_pair(global_state, updates, w, a_key, b_key)
            delta[a_key] = (new_a - global_state[a_key].to(torch.float64)).to(global_state[a_key].dtype)
            delta[b_key] = (new_b - global_state[b_key].to(torch.float64)).to(global_state[b_key].dtype)
    lora_keys = [k for pair in pairs for k in pair]  # the error only reads the factors
    new_global = {k: global_state[k] + delta[k] for k in lora_keys}
    clients = [{k: global_state[k] + u.delta[k] for k in lora_keys} for u in updates]
    return delta, aggregation_error(new_global, clients, w)
