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

**Heterogeneous ranks** (:class:`RankLayout`, recipe ``lora.client_ranks``): client k holds only the
first r_k ≤ r slots of the global rank-r adapter (slot j = row j of A, column j of B) and starts
from the global state truncated to them, so its local product is Bᵢ Aᵢ of rank ≤ r_k and its
update lives in its own slots. The two rules are the two modes above, fed each client's own start:

- ``factorwise`` is HetLoRA's zero-padding (Cho et al., "Heterogeneous LoRA for Federated
  Fine-tuning of On-Device Foundation Models", EMNLP 2024) in delta form: every client's delta is
  padded with zeros to rank r and the deltas are averaged, so a slot held by few clients moves by
  their share of the mean; a rank-r_k client then receives the first r_k slots (truncation).
- ``svd`` is FlexLoRA (Bai et al., "Federated Fine-tuning of Large Language Models under
  Heterogeneous Tasks and Client Resources", NeurIPS 2024): M = Σ wᵢ BᵢAᵢ over the clients'
  products, its best rank-r factorization becomes the global adapter with slots in singular-value
  order, and a rank-r_k client receives the best rank-r_k part of it.

Besides ``aggregation_error`` (what the global adapter loses against M), heterogeneous runs report
the truncation error ‖P − P_{r_k}‖_F / ‖P‖_F of the global product P that a rank-r_k client
receives (:meth:`RankLayout.truncation_error`). peft scales every client's product by the global
α/r (one padded model serves every rank). With equal ranks nothing of this runs.
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
              a_key: str, b_key: str, starts: Sequence[Mapping[str, torch.Tensor]]) -> tuple[torch.Tensor, torch.Tensor]:
    """New (A, B) from the rank-r truncated SVD of M = Σ wᵢ BᵢAᵢ, computed via QR of the stacks;
    client i's factors are ``starts[i] + Δᵢ``."""
    a_g, b_g = global_state[a_key], global_state[b_key]
    r = a_g.shape[0]
    f64 = torch.float64
    bs = torch.cat([wi * (s[b_key].to(f64) + u.delta[b_key].to(f64)) for wi, u, s in zip(w, updates, starts)], dim=1)
    as_ = torch.cat([s[a_key].to(f64) + u.delta[a_key].to(f64) for u, s in zip(updates, starts)], dim=0)
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
                   weighted: bool = False,
                   starts: Sequence[Mapping[str, torch.Tensor]] | None = None,
                   max_weight: float | None = None) -> tuple[StateDict, float]:
    """(aggregated delta, aggregation error) of the clients' LoRA deltas under ``mode``.

    ``starts[i]``: the state client i trained from (its rank's truncation of the global state under
    heterogeneous ranks); the global state itself when omitted. ``max_weight``: the cap on one
    client's share (``federation.max_client_weight``, :func:`~fedllm.algorithms.aggregate.cap_weights`).
    """
    starts = [global_state] * len(updates) if starts is None else list(starts)
    if len(starts) != len(updates):
        raise ValueError(f"{len(updates)} updates but {len(starts)} start states")
    if mode not in MODES:
        raise ValueError(f"unknown LoRA aggregation mode {mode!r}; expected one of {list(MODES)}")
    w = client_weights(updates, weighted, max_weight)
    for u in updates:
        if u.delta.keys() != global_state.keys():
            raise ValueError(f"client {u.client_id}'s delta keys differ from the global state's")
    pairs = lora_pairs(global_state)
    if mode == "frozen_a":
        _check_frozen_a(updates, pairs)
    delta = weighted_sum([u.delta for u in updates], w)
    if mode == "svd":
        for a_key, b_key in pairs:
            new_a, new_b = _svd_pair(global_state, updates, w, a_key, b_key, starts)
            delta[a_key] = (new_a - global_state[a_key].to(torch.float64)).to(global_state[a_key].dtype)
            delta[b_key] = (new_b - global_state[b_key].to(torch.float64)).to(global_state[b_key].dtype)
    lora_keys = [k for pair in pairs for k in pair]  # the error only reads the factors
    new_global = {k: global_state[k] + delta[k] for k in lora_keys}
    clients = [{k: s[k] + u.delta[k] for k in lora_keys} for u, s in zip(updates, starts)]
    return delta, aggregation_error(new_global, clients, w)


class RankLayout:
    """Heterogeneous LoRA ranks: client k holds the first ``ranks[k]`` of the global adapter's r slots.

    Slot j is row j of every A (r×in) and column j of every B (out×r). A state truncated to rank
    r_k has the other slots zero, and training keeps them zero: ∂L/∂B[:, j] ∝ A[j]·x and
    ∂L/∂A[j] ∝ B[:, j]ᵀ·g both vanish when row and column are zero, and AdamW moves a parameter
    with zero gradient and zero value nowhere. So one padded model serves every rank, and
    :meth:`truncate` applied to an arriving delta only enforces what an honest client sends anyway.
    """

    def __init__(self, state: Mapping[str, torch.Tensor], ranks: Sequence[int]) -> None:
        self.pairs = lora_pairs(state)
        if not self.pairs:
            raise ValueError("heterogeneous ranks need a LoRA state (no lora_A/lora_B pairs found)")
        self.r = state[self.pairs[0][0]].shape[0]
        self.ranks = [int(x) for x in ranks]
        if any(not 1 <= x <= self.r for x in self.ranks):
            raise ValueError(f"client ranks {self.ranks} must lie in [1, {self.r}] (the global adapter's rank)")

    def rank(self, client_id: int) -> int:
        return self.ranks[client_id]

    def truncate(self, state: Mapping[str, torch.Tensor], client_id: int) -> StateDict:
        """``state`` with every slot beyond client ``client_id``'s rank set to zero (a new dict)."""
        rk, out = self.rank(client_id), dict(state)
        if rk == self.r:
            return out
        for a_key, b_key in self.pairs:
            a, b = state[a_key].clone(), state[b_key].clone()
            a[rk:] = 0
            b[:, rk:] = 0
            out[a_key], out[b_key] = a, b
        return out

    def wire(self, state: Mapping[str, torch.Tensor], client_id: int) -> StateDict:
        """What crosses the network for client ``client_id``: its r_k slots only (for byte counts)."""
        rk, out = self.rank(client_id), dict(state)
        for a_key, b_key in self.pairs:
            out[a_key], out[b_key] = state[a_key][:rk].contiguous(), state[b_key][:, :rk].contiguous()
        return out

    def truncation_error(self, state: Mapping[str, torch.Tensor]) -> dict[int, float]:
        """rank -> ‖P − P_rank‖_F / ‖P‖_F over all pairs, P = B A of ``state`` and P_rank its first
        ``rank`` slots: what a client of that rank loses of the global product (0.0 when P = 0)."""
        errors = {}
        for rk in sorted(set(self.ranks)):
            num = den = 0.0
            for a_key, b_key in self.pairs:
                a, b = state[a_key].detach().to(torch.float64), state[b_key].detach().to(torch.float64)
                full = b @ a
                num += float(((b[:, rk:] @ a[rk:]) ** 2).sum())
                den += float((full**2).sum())
            errors[rk] = (num / den) ** 0.5 if den > 0 else 0.0
        return errors
