"""Typed records that cross the client/server boundary, and helpers over state dicts.

Everything a client sends the server is a :class:`ClientUpdate`; everything the server sends a
client is a :class:`RoundInstruction`. Their payloads are plain ``dict[str, Tensor]`` state dicts
(the *trainable* state only: LoRA factors, or the weights of a small CNN), so the algorithm math
in :mod:`fedllm.algorithms` can stay pure and both engines (in-process, Flower) reuse it.

Communication is reported as the serialized size of those payloads (safetensors bytes), i.e.
what would actually travel, not a parameter count times four.
"""

from __future__ import annotations

import functools
import math
import os
from collections.abc import Iterable, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np
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


_TILE = 1 << 16  # entries per tile: a tile of the float64 sum stays in cache while every state passes
_NUMPY_FOLD = (torch.float32, torch.float64)  # dtypes the compiled fold reads (CPU); others go through torch


@functools.cache
def _compiled_fold():
    """``acc[i] += w * float64(x[i])`` compiled by numba: one pass over ``x`` instead of torch's three
    (convert, multiply, add). IEEE multiply then add, no fused multiply-add (numba contracts
    nothing without ``fastmath``), so the bits equal the torch path's."""
    import numba  # noqa: PLC0415  (compiled on first use, cached on disk)

    @numba.njit(cache=True, nogil=True)
    def fold(acc, x, w):  # pragma: no cover (runs compiled)
        for i in range(acc.shape[0]):
            acc[i] += w * np.float64(x[i])

    return fold


def _fold(acc: torch.Tensor, value: torch.Tensor, weight: float, scratch: torch.Tensor) -> None:
    """``acc += weight · value`` in float64 (1-D ``acc``/``value`` of one length): the conversion is
    exact, then one rounding for the product and one for the sum — ``acc += w * value.double()``,
    without allocating (compiled for float32/float64 CPU tensors, else through ``scratch``)."""
    if acc.device.type == "cpu" and value.device.type == "cpu" and value.dtype in _NUMPY_FOLD:
        _compiled_fold()(acc.numpy(), value.detach().numpy(), weight)
        return
    scratch.copy_(value)
    scratch.mul_(weight)
    acc.add_(scratch)


class RunningSum:
    """Σ wᵢ·stateᵢ folded one state at a time: a float64 accumulator per key, cast back at the end.

    Each entry sees the same operations in the same order as :func:`weighted_sum` over the whole
    list (``acc += w·x`` in float64, one state after another), so the result is bit-identical to
    it while the states themselves can be dropped as they are folded: the server's memory for a
    mean is one float64 copy of the state (plus a scratch tensor the size of its largest entry),
    whatever the number of clients.
    """

    def __init__(self) -> None:
        self._acc: StateDict = {}
        self._dtypes: dict[str, torch.dtype] = {}
        self._scratch: dict[torch.device, torch.Tensor] = {}
        self.count = 0

    def add(self, state: Mapping[str, torch.Tensor], weight: float) -> None:
        if self.count and state.keys() != self._acc.keys():
            check_same_keys(state, self._acc)
        for key, value in state.items():
            if not self.count:
                self._acc[key] = torch.zeros_like(value, dtype=torch.float64)
                self._dtypes[key] = value.dtype
            acc = self._acc[key].view(-1)
            scratch = self._scratch.get(acc.device)
            if scratch is None or scratch.numel() < acc.numel():
                scratch = self._scratch[acc.device] = torch.empty(acc.numel(), dtype=torch.float64, device=acc.device)
            _fold(acc, value.reshape(-1), float(weight), scratch[:acc.numel()])
        self.count += 1

    def scale(self, factor: float) -> None:
        """Multiply the sum so far by ``factor`` (in float64)."""
        for acc in self._acc.values():
            acc *= float(factor)

    def result(self) -> StateDict:
        """The sum, each entry in the dtype of the states folded."""
        if not self.count:
            raise ValueError("weighted_sum needs at least one state")
        return {k: acc.to(self._dtypes[k]) for k, acc in self._acc.items()}


def weighted_sum(states: Iterable[Mapping[str, torch.Tensor]], weights: Iterable[float]) -> StateDict:
    """Σ wᵢ·stateᵢ, accumulated in float64 then cast back to each tensor's dtype.

    Tile by tile (:data:`_TILE` entries of one key at a time, every state folded into it before the
    next tile) so that the accumulator stays in cache while the states stream past: the same
    operations per entry, in the same order, as :class:`RunningSum` — the same bits. Large sums
    fold their tiles on torch's number of threads.
    """
    states, weights = list(states), [float(w) for w in weights]
    if not states:
        raise ValueError("weighted_sum needs at least one state")
    if len(states) != len(weights):
        raise ValueError(f"{len(states)} states but {len(weights)} weights")
    out: StateDict = {}
    jobs = []  # (tile of the float64 sum, the states' slices of it): independent, so they may run in parallel
    for key, ref in states[0].items():
        flats = [state[key].detach().reshape(-1) for state in states]
        acc = torch.zeros(ref.numel(), dtype=torch.float64, device=ref.device)
        compiled = ref.device.type == "cpu" and all(f.device.type == "cpu" and f.dtype in _NUMPY_FOLD for f in flats)
        total, arrays = (acc.numpy(), [f.numpy() for f in flats]) if compiled else (acc, flats)
        for start in range(0, ref.numel(), _TILE):
            jobs.append((compiled, total[start:start + _TILE], [x[start:start + _TILE] for x in arrays]))
        out[key] = acc
    pool = _fold_pool(os.getpid()) if len(jobs) > 1 and len(states) * sum(t.numel() for t in out.values()) >= _PARALLEL_FROM else None
    list(pool.map(lambda job: _fold_tile(*job, weights), jobs) if pool else (_fold_tile(*j, weights) for j in jobs))
    return {key: acc.view(states[0][key].shape).to(states[0][key].dtype) for key, acc in out.items()}


_PARALLEL_FROM = 1 << 24  # entries × states from which the tiles are folded on several threads


@functools.cache
def _fold_pool(pid: int) -> ThreadPoolExecutor:
    """Threads for :func:`weighted_sum`'s tiles (as many as torch's intra-op threads; the compiled
    fold releases the GIL), one pool per process (``pid``: a forked child makes its own). Each tile
    is one thread's alone: the bits do not depend on the split."""
    return ThreadPoolExecutor(max_workers=max(1, torch.get_num_threads()), thread_name_prefix="fedllm-fold")


def _fold_tile(compiled: bool, tile, slices, weights: list[float]) -> None:
    """Every state's slice folded into one tile of the sum, in the states' order."""
    if compiled:
        fold = _compiled_fold()
        for x, w in zip(slices, weights):
            fold(tile, x, w)
        return
    scratch = torch.empty_like(tile)
    for x, w in zip(slices, weights):
        _fold(tile, x, w, scratch)


class ClientStates(dict[int, StateDict]):
    """Per-client state dicts (SCAFFOLD controls, error-feedback residuals, personal factors) in
    memory: the default for the algorithms, whose checkpoints clone every client.

    :class:`fedllm.federation.store.DiskStates` is the same mapping on disk, whose checkpoint is a
    reference to files written only for the clients of each round.
    """

    def state_dict(self) -> dict[int, StateDict]:
        return {int(c): clone_state(s) for c, s in self.items()}

    def load_state_dict(self, state: Mapping[int, Mapping[str, torch.Tensor]]) -> None:
        self.clear()
        self.update({int(c): clone_state(s) for c, s in state.items()})


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
