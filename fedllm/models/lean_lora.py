"""The lean bf16 LoRA step on a CPU: each LoRA layer as one autograd function over a bf16 copy of its frozen base.

Under ``train.precision: bf16`` on a CPU, a LoRA layer's step is the base matmul in bf16 plus the
small fp32 LoRA term. Run through peft and bitsandbytes it also costs, per layer and step: the NF4
weight dequantized twice (forward, and again in ``MatMul4Bit``'s backward), peft's Python forward,
the dropout's mask multiplied as a bool tensor (a slow, unvectorized promotion on CPU), the scaling
applied as its own pass, and the sum as another. Measured on the study recipe (SmolLM2 NF4, LoRA
r 16 on all seven linear kinds, batch 4 × 128; docs/benchmarks.md) those are about a fifth of a
bf16 step. :func:`lean_lora` replaces each eligible layer's forward, for the duration of a fit, by
:class:`LoRALinear`:

- the frozen base weight is dequantized **once per fit** to bf16 (:func:`frozen_weight`; the same
  bits bitsandbytes' per-call dequantization gives, so the base's products are unchanged);
- ``y = x W_bf16ᵀ + c · (x ⊙ m) Aᵀ Bᵀ`` with the LoRA term added inside the GEMM (``addmm_``), where
  ``m`` is the {0, 1} keep mask and ``c`` = scaling / keep rate folds dropout's rescaling into the
  GEMM's ``alpha``;
- backward by hand: ``∂x = ∂y W + c ((∂y B) A) ⊙ m``, ``∂A = c (∂y B)ᵀ (x ⊙ m)``, ``∂B = c ∂yᵀ h``
  with ``h = (x ⊙ m) Aᵀ`` saved from forward; ``x ⊙ m`` is recomputed rather than stored.

The LoRA factors, their gradients and AdamW's state stay fp32, and so does the LoRA term's
arithmetic; only the base multiplies in bf16, as on the peft path under ``bf16``.

Dropout masks come from :func:`keep_mask`: 16 random bits per element (four per 64-bit draw of
torch's generator, ~3× cheaper than ``rand``), kept where the bits are at or above a threshold, so
an element is kept with probability 1 − t/65536, t = round(p · 65536) (p = 0.1: 0.899994 instead of
0.9), and the kept values are scaled by the inverse of that exact rate: dropout's expectation is
unchanged. :class:`FastDropout` draws the same masks for layers this path does not take over.

Only a plain LoRA layer is taken over (one active adapter, no DoRA or other variant, not merged,
no LoRA bias, a ``Linear4bit`` or ``nn.Linear`` base); any other layer keeps peft's forward. The
original forwards are restored when the block exits, so evaluation stays on the exact fp32 path.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch import nn

from fedllm.models.quant import is_linear4bit

KEEP_LEVELS = 1 << 16  # a mask element is 16 random bits


def keep_mask(shape: torch.Size | tuple[int, ...], p: float,
              device: torch.device | str = "cpu") -> tuple[torch.Tensor, float]:
    """A {0, 1} fp32 keep mask of ``shape`` for dropout ``p`` and the exact inverse keep rate.

    An element is dropped when its 16 random bits, read as a signed integer, fall below
    ``t − 32768`` with ``t = round(p · 65536)``; so P(keep) = 1 − t/65536 and the rescaling that
    keeps dropout's expectation is 65536 / (65536 − t). Draws from torch's global generator.
    """
    n = 1
    for s in shape:
        n *= s
    t = round(p * KEEP_LEVELS)
    if t >= KEEP_LEVELS:
        raise ValueError(f"dropout p={p} drops everything")
    words = torch.randint(-(1 << 63), (1 << 63) - 1, ((n + 3) // 4,), dtype=torch.int64, device=device)
    bits = words.view(torch.int16)[:n].view(shape)
    # bits >= t − 32768  <=>  bits − (t − 32769) >= 1; clamping the integer-valued difference to [0, 1]
    # gives the mask as floats directly (a bool mask's promotion is several times slower on CPU)
    return bits.float().sub_(t - KEEP_LEVELS // 2 - 1).clamp_(0, 1), KEEP_LEVELS / (KEEP_LEVELS - t)


class FastDropout(nn.Module):
    """Inverted dropout with :func:`keep_mask`'s masks (used under ``bf16`` where peft's forward stays)."""

    def __init__(self, p: float) -> None:
        super().__init__()
        self.p = p

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.p == 0.0:
            return x
        mask, inv = keep_mask(x.shape, self.p, x.device)
        return x * mask.to(x.dtype) * inv


class LoRALinear(torch.autograd.Function):
    """``x W_bf16ᵀ (+ bias) + c · ((x ⊙ mask) Aᵀ) Bᵀ`` with its backward by hand (module docstring)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, a: torch.Tensor, b: torch.Tensor, weight: torch.Tensor,
                bias: torch.Tensor | None, mask: torch.Tensor | None, c: float) -> torch.Tensor:
        shape = x.shape
        x2 = x.reshape(-1, shape[-1])
        y = nn.functional.linear(x2.to(weight.dtype), weight).to(x.dtype)
        if bias is not None:
            y.add_(bias.to(y.dtype))
        xm = x2 * mask.reshape(x2.shape) if mask is not None else x2
        h = xm @ a.t()
        y.addmm_(h, b.t(), alpha=c)
        ctx.save_for_backward(x2, a, b, mask, h)
        ctx.weight, ctx.c, ctx.shape = weight, c, shape
        return y.view(*shape[:-1], y.shape[-1])

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        x2, a, b, mask, h = ctx.saved_tensors
        weight, c = ctx.weight, ctx.c
        g = grad.reshape(-1, grad.shape[-1])
        gh = g @ b  # [N, r]
        gx = ga = gb = None
        if ctx.needs_input_grad[2]:
            gb = (g.t() @ h).mul_(c)
        if ctx.needs_input_grad[1]:
            xm = x2 * mask.reshape(x2.shape) if mask is not None else x2
            ga = (gh.t() @ xm).mul_(c)
        if ctx.needs_input_grad[0]:
            gx = (g.to(weight.dtype) @ weight).to(grad.dtype)
            lora = gh @ a
            if mask is not None:
                lora.mul_(mask.reshape(lora.shape))
            gx = gx.add_(lora, alpha=c).view(ctx.shape)
        return gx, ga, gb, None, None, None, None


def frozen_weight(base: nn.Module, dtype: torch.dtype) -> torch.Tensor:
    """The base layer's frozen weight ``[out, in]`` in ``dtype``: a ``Linear4bit`` dequantized by
    bitsandbytes (nested absmax included) and rounded to ``dtype`` (the same bits its forward multiplies
    with in that compute dtype; tested), an ``nn.Linear`` cast."""
    if is_linear4bit(base):
        from bitsandbytes.functional import dequantize_4bit  # noqa: PLC0415

        return dequantize_4bit(base.weight.data, base.weight.quant_state).to(dtype)
    return base.weight.detach().to(dtype)


class LeanForward:
    """The forward a taken-over LoRA layer runs inside :func:`lean_lora` (inspectable: ``weight``, ``calls``)."""

    def __init__(self, layer: nn.Module, adapter: str, dtype: torch.dtype) -> None:
        self.layer, self.adapter = layer, adapter
        self.weight = frozen_weight(layer.base_layer, dtype)
        self.calls = 0

    def __call__(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        layer, name = self.layer, self.adapter
        if args or kwargs or x.dtype != torch.float32 or torch.is_autocast_enabled(x.device.type):
            return type(layer).forward(layer, x, *args, **kwargs)  # not the case this path is for
        self.calls += 1
        p = layer.lora_dropout[name].p if isinstance(layer.lora_dropout[name], nn.Dropout | FastDropout) else 0.0
        mask, inv = keep_mask(x.shape, p, x.device) if layer.training and p > 0 else (None, 1.0)
        return LoRALinear.apply(x, layer.lora_A[name].weight, layer.lora_B[name].weight, self.weight,
                                layer.base_layer.bias, mask, layer.scaling[name] * inv)


def eligible(layer: nn.Module, adapter: str) -> bool:
    """Whether ``layer`` is a plain LoRA linear layer this path computes exactly as peft does."""
    from peft.tuners.lora import LoraLayer  # noqa: PLC0415

    if not isinstance(layer, LoraLayer) or adapter not in layer.lora_A:
        return False
    plain_base = is_linear4bit(layer.base_layer) or type(layer.base_layer) is nn.Linear
    return (plain_base and list(layer.active_adapters) == [adapter] and not layer.merged
            and not layer.disable_adapters and adapter not in getattr(layer, "lora_variant", {})
            and not getattr(layer, "use_dora", {}).get(adapter, False)
            and layer.lora_A[adapter].bias is None and layer.lora_B[adapter].bias is None
            and not getattr(layer, "fan_in_fan_out", False)
            and isinstance(layer.lora_dropout[adapter], nn.Dropout | nn.Identity | FastDropout))


@contextlib.contextmanager
def lean_lora(model: nn.Module, on: bool, dtype: torch.dtype = torch.bfloat16,
              adapter: str = "default") -> Iterator[list[LeanForward]]:
    """Inside the block every eligible LoRA layer of ``model`` runs :class:`LoRALinear` over its base
    weight in ``dtype`` (dequantized once, here); yields the installed forwards; restored after."""
    installed: list[LeanForward] = []
    if on:
        for module in model.modules():
            if eligible(module, adapter):
                fwd = LeanForward(module, adapter, dtype)
                module.forward = fwd
                installed.append(fwd)
    try:
        yield installed
    finally:
        for fwd in installed:
            del fwd.layer.forward  # back to the class's forward
