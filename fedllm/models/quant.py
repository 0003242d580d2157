"""The bitsandbytes 4-bit kernel fedllm runs on, made explicit and the same on every CPU.

bitsandbytes 0.50 chooses its CPU kernel by machine: on a CPU with AVX512-BF16 the first forward
of a ``Linear4bit`` in eval mode without grad repacks the weight into a bf16 inference layout
(``_convert_weight_packed_for_cpu``), and from then on ``matmul_4bit`` calls ``gemv_4bit``, which
has no backward to its input. On such a machine fedllm's round-0 evaluation used to cut every
later LoRA gradient (training silently did nothing) and evaluated in bf16 (logits off by up to
0.84 on SmolLM2), so the same recipe gave different numbers on different CPUs.

fedllm therefore switches the packing off on every ``Linear4bit`` as the model is loaded
(:func:`use_exact_kernels`): training and evaluation take the exact dequantize-then-matmul path in
the compute dtype on every CPU. The repacking is not invertible bit for bit (it rounds the
absmax statistics to bf16), so a packed layer is an error at training start
(:func:`check_exact_kernels`), never something to undo quietly.
"""

from __future__ import annotations

import functools
from collections.abc import Iterator

import torch
from torch import nn

from fedllm.errors import IntegrityError

EXACT = "exact"  # dequantize to the compute dtype, then a dense matmul (autograd through it)


class KernelError(IntegrityError):
    """A 4-bit layer is set up for (or already in) bitsandbytes' packed CPU inference layout."""


@functools.cache
def cpu_flag(flag: str) -> bool:
    """Whether this CPU advertises ``flag`` in /proc/cpuinfo (False where it cannot be read)."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as fh:
            return any(flag in line.split() for line in fh if line.startswith("flags"))
    except OSError:
        return False


def cpu_has_avx512_bf16() -> bool:
    """Whether this CPU advertises AVX512-BF16 (the flag bitsandbytes' packed kernel keys on)."""
    return cpu_flag("avx512_bf16")


def bnb_says_avx512_bf16() -> bool:
    """bitsandbytes' own probe (its native library); False where bitsandbytes is missing."""
    try:
        from bitsandbytes.functional import has_avx512bf16  # noqa: PLC0415
    except ImportError:
        return False
    return bool(has_avx512bf16())


def is_linear4bit(module: nn.Module) -> bool:
    """Whether ``module`` is a bitsandbytes ``Linear4bit`` (False when bitsandbytes is not installed)."""
    try:
        from bitsandbytes.nn import Linear4bit  # noqa: PLC0415
    except ImportError:
        return False
    return isinstance(module, Linear4bit)


def linear4bit_layers(model: nn.Module) -> Iterator[tuple[str, nn.Module]]:
    """Every bitsandbytes ``Linear4bit`` in ``model`` (none when bitsandbytes is not installed)."""
    try:
        from bitsandbytes.nn import Linear4bit  # noqa: PLC0415
    except ImportError:
        return
    for name, module in model.named_modules():
        if isinstance(module, Linear4bit):
            yield name, module


def is_packed(layer: nn.Module) -> bool:
    """Whether the layer's weight is already in the packed CPU inference layout."""
    state = getattr(layer.weight, "quant_state", None)
    return bool(getattr(state, "packing_format_for_cpu", False))


def use_exact_kernels(model: nn.Module) -> int:
    """Switch bitsandbytes' AVX512-BF16 CPU packing off on every ``Linear4bit``; returns how many."""
    n = 0
    for _, layer in linear4bit_layers(model):
        layer.support_avx512bf16_for_cpu = False
        n += 1
    return n


def check_exact_kernels(model: nn.Module) -> int:
    """Raise :class:`KernelError` unless every ``Linear4bit`` is on the exact path; returns the count.

    Called at the start of every client fit: a layer that could pack (or did) would cut the LoRA
    gradients and change the numerics, so training must not start on it.
    """
    n = 0
    for name, layer in linear4bit_layers(model):
        if is_packed(layer):
            raise KernelError(f"4-bit layer {name} is in bitsandbytes' packed AVX512-BF16 inference layout: "
                              "it has no backward to its input and computes in bf16; load models with "
                              "fedllm.models.llm.load_base, which keeps every layer on the exact path")
        if getattr(layer, "support_avx512bf16_for_cpu", False):
            raise KernelError(f"4-bit layer {name} would switch to bitsandbytes' packed CPU kernel at its next "
                              "no-grad eval forward (support_avx512bf16_for_cpu is on); call "
                              "fedllm.models.quant.use_exact_kernels(model) after loading")
        n += 1
    return n


def kernel_info(model: nn.Module | None = None) -> dict:
    """What the run files record about the numeric path: machine flags, versions and the kernel."""
    import importlib.metadata as md  # noqa: PLC0415

    def version(pkg: str) -> str | None:
        try:
            return md.version(pkg)
        except md.PackageNotFoundError:
            return None

    info = {"torch": torch.__version__, "bitsandbytes": version("bitsandbytes"),
            "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
            "cpu_avx512_bf16": cpu_has_avx512_bf16()}
    if model is not None:
        layers = [layer for _, layer in linear4bit_layers(model)]
        info["linear4bit_layers"] = len(layers)
        if layers:
            info["4bit_kernel"] = EXACT if not any(is_packed(x) or x.support_avx512bf16_for_cpu
                                                   for x in layers) else "packed_bf16"
    return info
