"""Several clients' LoRA adapters over one shared base: each example goes through its own client's factors.

The K clients of a round share the frozen 4-bit base; only their LoRA factors differ. A fused step
runs the base once on the concatenation of the clients' batches (one dequantization and one large
matmul per layer instead of K) and adds, to each client's rows only, that client's
``B_k · A_k · dropout(x_k) · scaling``. The LoRA part is computed per segment (rows of one client),
so client k's factors see exactly the activations and dropout masks they would see alone, and the
gradient that reaches them is the gradient of client k's own loss (the segments share no factor).

peft has a mixed-adapter batch forward (``adapter_names=``) that routes rows to named adapters
registered on the model; it is inference-oriented (one adapter per registered name, dropout drawn
from one global stream) and would need K adapters registered on the shared model. Here the factors
are plain leaf tensors owned by the fused fit, swapped in by patching each LoRA layer's ``forward``
for the duration of a ``with`` block, so the shared model is left exactly as it was.

Dropout: a client fit alone draws its LoRA-dropout masks from the global RNG, seeded per round
(:func:`fedllm.experiments.base.round_seed`), one mask of its own batch shape per layer, in forward
order. A :class:`Segment` carries that client's RNG state: the layer swaps it in, calls the layer's
own dropout module on the client's rows ``x[rows, :T_k]`` (its batch's shape, the same function),
and keeps the advanced state. The masks are therefore the same bits as alone, on CPU and CUDA.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass, field

import torch
from torch import nn


@dataclass
class Segment:
    """One client's rows of a fused batch: ``rows`` of the concatenation, its own width ``width``
    (its batch's sequence length; the fused batch is right-padded to the longest), its factors by
    layer name (``{name: (A, B)}``) and its RNG states (CPU and, on CUDA, the device's)."""

    rows: slice
    width: int
    factors: dict[str, tuple[torch.Tensor, torch.Tensor]]
    rng: dict[str, torch.Tensor] = field(default_factory=dict)


class RoutedBatch:
    """The segments of the current fused batch; set before each forward (layers read it)."""

    def __init__(self) -> None:
        self.segments: list[Segment] = []


def lora_layers(model: nn.Module, adapter: str = "default") -> dict[str, nn.Module]:
    """Name -> every peft LoRA layer holding ``adapter`` (the names are the model's module names)."""
    from peft.tuners.lora import LoraLayer

    return {n: m for n, m in model.named_modules() if isinstance(m, LoraLayer) and adapter in m.lora_A}


def rng_snapshot(device: torch.device) -> dict[str, torch.Tensor]:
    """The global RNG state a dropout call on ``device`` draws from (CPU, plus CUDA's on a GPU)."""
    snap = {"cpu": torch.get_rng_state()}
    if device.type == "cuda":
        snap["cuda"] = torch.cuda.get_rng_state(device)
    return snap


def rng_restore(snap: dict[str, torch.Tensor], device: torch.device) -> None:
    torch.set_rng_state(snap["cpu"])
    if "cuda" in snap:
        torch.cuda.set_rng_state(snap["cuda"], device)


def _own_dropout(dropout: nn.Module, x: torch.Tensor, seg: Segment) -> torch.Tensor:
    """``dropout(x)`` drawn from the segment's own RNG stream (identity: no draw, nothing swapped)."""
    if isinstance(dropout, nn.Identity) or not dropout.training or getattr(dropout, "p", 0.0) == 0:
        return dropout(x)
    outer = rng_snapshot(x.device)
    rng_restore(seg.rng, x.device)
    try:
        return dropout(x)
    finally:
        seg.rng = rng_snapshot(x.device)
        rng_restore(outer, x.device)


def _routed_forward(layer: nn.Module, name: str, batch: RoutedBatch, adapter: str):
    """A forward for ``layer`` that adds each segment's own LoRA term to its rows.

    Mirrors peft's vanilla LoRA forward (base output cloned, input cast to the factors' dtype, the
    term ``B(A(dropout(x))) · scaling`` cast back and added) per segment; rows past a client's width
    (the fused batch's right padding) get the base output only: under the causal mask they never
    reach that client's real tokens.
    """
    dropout, scaling = layer.lora_dropout[adapter], layer.scaling[adapter]
    factor_dtype = layer.lora_A[adapter].weight.dtype

    def forward(x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        result = layer.base_layer(x, *args, **kwargs).clone()
        convert = not torch.is_autocast_enabled()
        xin = x.to(factor_dtype) if convert and x.dtype != factor_dtype else x
        parts = []
        for seg in batch.segments:
            a, b = seg.factors[name]
            xs = xin[seg.rows, :seg.width]
            term = nn.functional.linear(nn.functional.linear(_own_dropout(dropout, xs, seg), a), b) * scaling
            if convert:
                term = term.to(result.dtype)
            pad = result.shape[1] - seg.width
            parts.append(nn.functional.pad(term, (0, 0, 0, pad)) if pad else term)
        return result + torch.cat(parts, dim=0)

    return forward


@contextlib.contextmanager
def routed_adapters(model: nn.Module, adapter: str = "default") -> Iterator[RoutedBatch]:
    """Within the block, every LoRA layer of ``model`` routes rows by the yielded :class:`RoutedBatch`.

    The layers' own factors are not used (nor changed); on exit their ``forward`` is restored.
    """
    batch = RoutedBatch()
    layers = lora_layers(model, adapter)
    if not layers:
        raise ValueError("the model has no LoRA layers to route")
    for name, layer in layers.items():
        layer.forward = _routed_forward(layer, name, batch, adapter)
    try:
        yield batch
    finally:
        for layer in layers.values():
            del layer.forward  # back to the class's forward
