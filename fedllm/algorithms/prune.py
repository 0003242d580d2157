"""Pruning masks over state dicts: lottery-ticket magnitude pruning, SNIP, random masks, and the
wire format for masks and masked (sparse) updates.

A *mask* is a ``dict[str, BoolTensor]`` keyed like the state dict, holding an entry only for the
prunable tensors (weight matrices and conv kernels: floating tensors with ``ndim >= 2``); keys it
does not hold (biases, norm scales) are never pruned. ``True`` marks a surviving weight.

Iterative magnitude pruning (Frankle & Carbin, 2019, "The Lottery Ticket Hypothesis: Finding
Sparse, Trainable Neural Networks"): train θ from θ₀, then with m ← m ⊙ 1[|θ| > τ], where τ is
chosen so that a fraction p of the weights that still survive is removed, and rewind the
survivors θ ← m ⊙ θ₀. After n rounds a fraction (1 − p)ⁿ survives.

SNIP (Lee et al., 2019, "SNIP: Single-shot Network Pruning based on Connection Sensitivity"):
with c the connection gates (θ ⊙ c, c = 1), the saliency is s = |∂L/∂c| = |∂L/∂θ ⊙ θ| on one
mini-batch; keep the κ connections with the largest s over the whole network.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence

import numpy as np
import torch
from torch import nn

from fedllm.types import StateDict, serialized_bytes

Mask = dict[str, torch.Tensor]

TAG_BITMAP = 0
TAG_VARINT = 1


def prunable_keys(state: Mapping[str, torch.Tensor]) -> list[str]:
    """Keys of weight matrices and conv kernels (floating, ``ndim >= 2``); never biases or norms."""
    return [k for k, v in state.items() if v.ndim >= 2 and v.is_floating_point()]


def full_mask(state: Mapping[str, torch.Tensor]) -> Mask:
    """A mask keeping every prunable weight."""
    return {k: torch.ones_like(state[k], dtype=torch.bool) for k in prunable_keys(state)}


def check_mask(state: Mapping[str, torch.Tensor], mask: Mapping[str, torch.Tensor]) -> None:
    """Raise ``ValueError`` unless every mask entry is a bool tensor shaped like its state entry."""
    for k, m in mask.items():
        if k not in state:
            raise ValueError(f"mask key {k!r} is not in the state dict")
        if m.dtype != torch.bool:
            raise ValueError(f"mask[{k!r}] has dtype {m.dtype}, expected torch.bool")
        if m.shape != state[k].shape:
            raise ValueError(f"mask[{k!r}] has shape {tuple(m.shape)}, expected {tuple(state[k].shape)}")


def apply_mask(state: Mapping[str, torch.Tensor], mask: Mapping[str, torch.Tensor]) -> StateDict:
    """A copy of ``state`` with pruned entries set to exactly zero (unmasked keys are copied as is)."""
    check_mask(state, mask)
    return {k: (v.detach().masked_fill(~mask[k].to(v.device), 0) if k in mask else v.detach().clone())
            for k, v in state.items()}


def remaining_rate(mask: Mapping[str, torch.Tensor]) -> float:
    """Fraction of the masked (prunable) weights that survive."""
    total = sum(m.numel() for m in mask.values())
    if total == 0:
        raise ValueError("remaining_rate needs a non-empty mask")
    return sum(int(m.sum()) for m in mask.values()) / total


def _prune_smallest(scores: torch.Tensor, alive: torch.Tensor, n_prune: int) -> torch.Tensor:
    """Flat ``alive`` with the ``n_prune`` smallest-score survivors switched off (ties: lowest index)."""
    alive = alive.detach().flatten().cpu()
    scores = scores.detach().flatten().to("cpu", torch.float64).abs().masked_fill(~alive, math.inf)
    out = alive.clone()
    out[torch.argsort(scores, stable=True)[:n_prune]] = False
    return out


def magnitude_prune(state: Mapping[str, torch.Tensor], mask: Mapping[str, torch.Tensor], rate: float,
                    scope: str = "layer") -> Mask:
    """One lottery-ticket pruning step: remove ``round(rate · surviving)`` smallest-|w| survivors.

    ``scope="layer"`` prunes that fraction in every masked tensor separately (Frankle & Carbin's
    fully connected setting); ``"global"`` ranks all masked weights together.
    """
    if not 0.0 <= rate <= 1.0:
        raise ValueError(f"prune rate must be in [0, 1], got {rate}")
    check_mask(state, mask)
    keys = list(mask)
    if scope == "layer":
        return {k: _prune_smallest(state[k], mask[k], round(rate * int(mask[k].sum()))).view_as(mask[k])
                for k in keys}
    if scope != "global":
        raise ValueError(f"scope must be 'layer' or 'global', got {scope!r}")
    if not keys:
        return {}
    scores = torch.cat([state[k].detach().flatten().to("cpu", torch.float64) for k in keys])
    alive = torch.cat([mask[k].flatten().cpu() for k in keys])
    flat = _prune_smallest(scores, alive, round(rate * int(alive.sum())))
    sizes = [mask[k].numel() for k in keys]
    return {k: part.view_as(mask[k]) for k, part in zip(keys, torch.split(flat, sizes))}


def rewind(init_state: Mapping[str, torch.Tensor], mask: Mapping[str, torch.Tensor]) -> StateDict:
    """θ ← m ⊙ θ₀: survivors back to their initial values, pruned entries zero, the rest at θ₀."""
    return apply_mask(init_state, mask)


def random_mask(state: Mapping[str, torch.Tensor], remaining: float, seed: int) -> Mask:
    """A uniformly random mask keeping ``round(remaining · n)`` weights of every prunable tensor."""
    if not 0.0 <= remaining <= 1.0:
        raise ValueError(f"remaining must be in [0, 1], got {remaining}")
    gen = torch.Generator().manual_seed(seed)
    out: Mask = {}
    for k in prunable_keys(state):
        n = state[k].numel()
        flat = torch.zeros(n, dtype=torch.bool)
        flat[torch.randperm(n, generator=gen)[:round(remaining * n)]] = True
        out[k] = flat.view(state[k].shape)
    return out


def snip_scores(model: nn.Module, inputs: torch.Tensor, targets: torch.Tensor,
                loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]) -> dict[str, torch.Tensor]:
    """SNIP saliency |∂L/∂θ ⊙ θ| of every prunable parameter on one mini-batch.

    Uses ``torch.autograd.grad``, so the model's ``.grad`` fields are left untouched.
    """
    params = {n: p for n, p in model.named_parameters() if p.ndim >= 2 and p.is_floating_point()}
    if not params:
        raise ValueError("the model has no prunable (ndim >= 2) parameters")
    loss = loss_fn(model(inputs), targets)
    grads = torch.autograd.grad(loss, list(params.values()), allow_unused=True)
    return {n: (torch.zeros_like(p) if g is None else (g * p).abs()).detach()
            for (n, p), g in zip(params.items(), grads)}


def snip_mask(scores: Mapping[str, torch.Tensor], keep: float) -> Mask:
    """Keep the global top ``κ = round(keep · total)`` connections by score (at least one)."""
    if not 0.0 < keep <= 1.0:
        raise ValueError(f"keep must be in (0, 1], got {keep}")
    keys = list(scores)
    if not keys:
        raise ValueError("snip_mask needs at least one score tensor")
    flat = torch.cat([scores[k].detach().flatten().to(torch.float64) for k in keys])
    kappa = max(1, round(keep * flat.numel()))
    alive = torch.zeros(flat.numel(), dtype=torch.bool)
    alive[torch.argsort(flat, descending=True, stable=True)[:kappa]] = True
    sizes = [scores[k].numel() for k in keys]
    return {k: part.view(scores[k].shape) for k, part in zip(keys, torch.split(alive, sizes))}


# ---------------------------------------------------------------------------- wire format


def _varint_encode(values: np.ndarray) -> bytes:
    """Unsigned LEB128: 7 bits a byte, high bit set on every byte but a value's last."""
    v = values.astype(np.uint64)
    if v.size == 0:
        return b""
    j = np.arange(10, dtype=np.uint64)
    lengths = 1 + (v[:, None] >= (np.uint64(1) << (7 * j[1:]))).sum(axis=1)
    groups = ((v[:, None] >> (7 * j)) & np.uint64(0x7F)).astype(np.uint8)
    jj = np.arange(10)[None, :]
    groups[jj < (lengths - 1)[:, None]] |= 0x80
    return groups[jj < lengths[:, None]].tobytes()


def _varint_decode(data: bytes) -> np.ndarray:
    b = np.frombuffer(data, dtype=np.uint8)
    if b.size == 0:
        return np.zeros(0, dtype=np.uint64)
    if b[-1] & 0x80:
        raise ValueError("mask bytes end inside a varint (truncated payload)")
    ends = np.flatnonzero(b < 0x80)
    starts = np.concatenate(([0], ends[:-1] + 1))
    pos = np.arange(b.size) - np.repeat(starts, ends - starts + 1)
    if pos.max() >= 10:
        raise ValueError("varint longer than 10 bytes in mask payload")
    vals = (b & 0x7F).astype(np.uint64) << (7 * pos).astype(np.uint64)
    return np.add.reduceat(vals, starts)


def encode_mask(mask: Mapping[str, torch.Tensor]) -> bytes:
    """Serialize a mask (keys in sorted order) as the smaller of two encodings, after a 1-byte tag.

    Tag 0: the concatenated bits, ``np.packbits`` (⌈n/8⌉ bytes). Tag 1: the sorted indices of the
    survivors as gaps (idxᵢ − idxᵢ₋₁ − 1) in LEB128 varints, which wins for sparse masks.
    Shapes are not included: the receiver already knows the model (see :func:`decode_mask`).
    """
    flat = np.concatenate([mask[k].detach().cpu().flatten().numpy().astype(bool) for k in sorted(mask)]
                          or [np.zeros(0, dtype=bool)])
    bitmap = bytes([TAG_BITMAP]) + np.packbits(flat).tobytes()
    idx = np.flatnonzero(flat).astype(np.int64)
    gaps = np.diff(idx, prepend=-1) - 1
    varint = bytes([TAG_VARINT]) + _varint_encode(gaps)
    return varint if len(varint) < len(bitmap) else bitmap


def decode_mask(data: bytes, shapes: Mapping[str, Sequence[int]]) -> Mask:
    """Inverse of :func:`encode_mask`; ``shapes`` gives every key's shape (taken in sorted order)."""
    if not data:
        raise ValueError("empty mask payload: expected at least the 1-byte encoding tag")
    keys = sorted(shapes)
    sizes = [math.prod(shapes[k]) for k in keys]
    n = sum(sizes)
    tag, body = data[0], data[1:]
    if tag == TAG_BITMAP:
        if len(body) != (n + 7) // 8:
            raise ValueError(f"bitmap mask has {len(body)} bytes, expected {(n + 7) // 8} for {n} weights")
        flat = np.unpackbits(np.frombuffer(body, dtype=np.uint8), count=n).astype(bool)
    elif tag == TAG_VARINT:
        idx = np.cumsum(_varint_decode(body).astype(np.int64) + 1) - 1
        if idx.size and idx[-1] >= n:
            raise ValueError(f"mask index {int(idx[-1])} out of range for {n} weights")
        flat = np.zeros(n, dtype=bool)
        flat[idx] = True
    else:
        raise ValueError(f"unknown mask encoding tag {tag}; expected {TAG_BITMAP} (bitmap) or {TAG_VARINT}")
    parts = np.split(flat, np.cumsum(sizes)[:-1]) if keys else []
    return {k: torch.from_numpy(p.copy()).view(tuple(shapes[k])) for k, p in zip(keys, parts)}


def masked_values(state: Mapping[str, torch.Tensor], mask: Mapping[str, torch.Tensor]) -> StateDict:
    """The survivors of each masked key as a 1-D tensor (row-major order); unmasked keys as is."""
    check_mask(state, mask)
    return {k: (v.detach()[mask[k]].clone() if k in mask else v.detach().clone()) for k, v in state.items()}


def unmask_values(values: Mapping[str, torch.Tensor], mask: Mapping[str, torch.Tensor],
                  like_state: Mapping[str, torch.Tensor]) -> StateDict:
    """Inverse of :func:`masked_values`: scatter survivors into zeros shaped like ``like_state``."""
    check_mask(like_state, mask)
    if values.keys() != like_state.keys():
        raise ValueError(f"values keys differ from like_state: {sorted(set(values) ^ set(like_state))[:3]}")
    out: StateDict = {}
    for k, like in like_state.items():
        if k in mask:
            count = int(mask[k].sum())
            if values[k].numel() != count:
                raise ValueError(f"values[{k!r}] has {values[k].numel()} entries, mask keeps {count}")
            full = torch.zeros_like(like, dtype=values[k].dtype)
            full[mask[k]] = values[k].flatten()
            out[k] = full
        else:
            out[k] = values[k].reshape(like.shape).clone()
    return out


def masked_update_bytes(state: Mapping[str, torch.Tensor], mask: Mapping[str, torch.Tensor],
                        send_mask: bool = True) -> int:
    """Real size of a sparse update: safetensors bytes of the survivors, plus the encoded mask."""
    size = serialized_bytes(masked_values(state, mask))
    return size + (len(encode_mask(mask)) if send_mask else 0)
