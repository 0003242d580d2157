"""bf16 compute for client training (``train.precision: bf16``), only where the hardware has it.

Under ``bf16`` the 4-bit base dequantizes its NF4 weights straight to bf16 and multiplies in bf16
(bitsandbytes ``Linear4bit.compute_dtype``): the base's matmuls are nearly all of a step's
arithmetic. On a GPU, Lightning's ``bf16-mixed`` autocast also runs the other matmuls (LoRA factors,
attention, the LM head) in bf16. On a CPU the rest stays fp32, without autocast: there bf16 gains
nothing measurable on those small matmuls (:func:`fedllm.client.fit.lightning_precision`). The trainable LoRA weights, their gradients and
AdamW's state stay fp32 either way.

On a CPU a bf16 fit also takes every plain LoRA layer over with :func:`fedllm.models.lean_lora.lean_lora`:
the base weight dequantized to bf16 once per fit instead of twice per step, and the layer's forward
and backward as one function (no peft/bitsandbytes Python per call, dropout's rescaling and the
LoRA sum folded into the GEMM); LoRA dropout masks there, and under bf16 everywhere, are 16-bit
draws (:func:`fedllm.models.lean_lora.keep_mask`).

The base is loaded in fp32 compute as always (:func:`fedllm.models.llm.load_base`); a bf16 fit
switches the layers to bf16 for its duration only (:func:`base_compute`, :func:`lean_lora`), so
evaluation and the default ``32`` path keep the exact fp32 numerics bit for bit.

bf16 is refused where the CPU has no bf16 instructions (AVX512-BF16 or AMX-BF16): there oneDNN
emulates bf16 matmuls, slower than fp32 (docs/benchmarks.md, "bf16 compute and the lean step",
measures it by capping oneDNN below AVX512-BF16) and less precise — a setting with no upside.
bitsandbytes' packed AVX512-BF16 *inference* layout stays off either way (:mod:`fedllm.models.quant`).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch import nn

from fedllm.config import RecipeError
from fedllm.models.lean_lora import FastDropout
from fedllm.models.quant import cpu_flag, cpu_has_avx512_bf16, linear4bit_layers

# Measured with oneDNN capped below AVX512-BF16 (ONEDNN_MAX_CPU_ISA=AVX512_CORE): docs/benchmarks.md.
EMULATED_BF16_COST = ("bf16 matmuls are emulated there, slower than fp32 (measured: 1.0-1.4x fp32's time "
                      "on AVX512 without BF16, 2.3-3.5x on AVX2)")


def cpu_has_amx_bf16() -> bool:
    """Whether this CPU advertises AMX-BF16 (Sapphire Rapids and later; oneDNN uses it for bf16)."""
    return cpu_flag("amx_bf16")


def cpu_has_bf16() -> bool:
    """Whether this CPU has native bf16 matmul instructions (AVX512-BF16 or AMX-BF16)."""
    return cpu_has_avx512_bf16() or cpu_has_amx_bf16()


def check_precision(precision: str, device: str) -> None:
    """Refuse ``train.precision: bf16`` where the device has no native bf16 (RecipeError, one line)."""
    if precision != "bf16":
        return
    if device == "cuda":
        if not torch.cuda.is_bf16_supported():
            raise RecipeError("train.precision", "bf16 needs a GPU with bf16 support (Ampere or later); use 32 or 16-mixed")
        return
    if not cpu_has_bf16():
        raise RecipeError("train.precision", f"bf16 needs a CPU with AVX512-BF16 or AMX-BF16 and this one has "
                          f"neither: {EMULATED_BF16_COST}; use 32 (the exact path)")


def train_dtype(precision: str) -> torch.dtype | None:
    """The 4-bit base's compute dtype while a client trains under ``precision`` (None: as loaded)."""
    return torch.bfloat16 if precision == "bf16" else None


@contextlib.contextmanager
def base_compute(model: nn.Module, dtype: torch.dtype | None) -> Iterator[int]:
    """Every ``Linear4bit`` dequantizes to and multiplies in ``dtype`` inside the block; restored after.

    ``compute_type_is_set`` is pinned too: bitsandbytes otherwise resets ``compute_dtype`` to the
    input's dtype (fp32) at a layer's first forward. Yields how many layers were switched.
    """
    if dtype is None:
        yield 0
        return
    saved = [(layer, layer.compute_dtype, layer.compute_type_is_set) for _, layer in linear4bit_layers(model)]
    for layer, _, _ in saved:
        layer.compute_dtype, layer.compute_type_is_set = dtype, True
    try:
        yield len(saved)
    finally:
        for layer, old, was_set in saved:
            layer.compute_dtype, layer.compute_type_is_set = old, was_set


@contextlib.contextmanager
def fast_dropout(model: nn.Module, on: bool) -> Iterator[int]:
    """Inside the block every LoRA ``lora_dropout`` ``nn.Dropout`` is a
    :class:`fedllm.models.lean_lora.FastDropout` (16-bit masks, ~3x cheaper draws); restored after."""
    swapped = []
    if on:
        for module in model.modules():
            drops = getattr(module, "lora_dropout", None)
            if isinstance(drops, nn.ModuleDict):
                for name, drop in list(drops.items()):
                    if type(drop) is nn.Dropout and drop.p > 0:
                        drops[name] = FastDropout(drop.p).train(drop.training)
                        swapped.append((drops, name, drop))
    try:
        yield len(swapped)
    finally:
        for drops, name, drop in swapped:
            drops[name] = drop


def precision_info(precision: str, head_positions: str, device: str) -> dict:
    """What the run files record about training's and evaluation's numerics."""
    bf16 = precision == "bf16"
    train_dt = "bfloat16" if bf16 else ("float32" if device != "cuda" else "bfloat16")
    return {"train_precision": precision,
            "train_base_compute_dtype": train_dt,
            "train_autocast": None if (bf16 and device != "cuda") else
            {"bf16": "bfloat16", "bf16-mixed": "bfloat16", "16-mixed": "float16"}.get(precision),
            "train_head_positions": resolve_head_positions(head_positions, precision),
            "train_lora_path": "lean" if (bf16 and device != "cuda") else "peft",
            "eval_base_compute_dtype": "float32" if device != "cuda" else "bfloat16",
            "eval_autocast": None,
            "cpu_amx_bf16": cpu_has_amx_bf16()}


def resolve_head_positions(head_positions: str, precision: str) -> str:
    """``train.head_positions: auto`` -> ``labeled`` under bf16 (whose numbers are new anyway), else ``all``."""
    if head_positions != "auto":
        return head_positions
    return "labeled" if precision == "bf16" else "all"
