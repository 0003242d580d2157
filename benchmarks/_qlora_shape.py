"""A QLoRA model of a named shape built in-process from a config with random weights (no download).

GPU machines lent to this project cannot take large files (a call carries 64 MiB; the SmolLM2 GGUF
alone is 98 MB), so speed and memory figures at a real model's scale come from a model of that
model's *shape*: Llama-2-7B's config (4096 hidden, 11008 MLP, 32 layers, 32 heads, 32000 vocab)
with random bf16 weights, every decoder linear layer quantized to NF4 by bitsandbytes exactly as
``BitsAndBytesConfig(load_in_4bit, nf4, double quant)`` would load it, and a peft LoRA adapter on
all of them. Step time and memory depend on shapes, dtypes and kernels, not on the weights' values.

Used by ``benchmarks/gpu_check.py`` (and its CPU smoke test at toy sizes).
"""

from __future__ import annotations

import torch
from torch import nn

SHAPES = {
    # Llama-2-7B's published config (hidden, MLP, layers, heads, vocab)
    "llama2-7b": dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
                      num_key_value_heads=32, vocab_size=32000),
    # a small llama for the fused-clients figure (SmolLM2-135M's shape, 49152-token vocabulary)
    "smollm2-135m": dict(hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
                         num_key_value_heads=3, vocab_size=49152),
    # toy sizes: what the CPU smoke test runs
    "toy": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2, vocab_size=512),
}
ALL_LINEAR = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def quantize_linears(model: nn.Module, compute_dtype: torch.dtype, device: torch.device) -> int:
    """Replace every ``nn.Linear`` but the LM head by a bitsandbytes NF4 ``Linear4bit`` (double quant,
    blocksize 64: transformers' 4-bit loading), one layer at a time; returns how many."""
    import bitsandbytes as bnb  # noqa: PLC0415

    from fedllm.models.quant import use_exact_kernels  # noqa: PLC0415

    n = 0
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if not isinstance(child, nn.Linear) or name == "lm_head":
                continue
            q = bnb.nn.Linear4bit(child.in_features, child.out_features, bias=child.bias is not None,
                                  compute_dtype=compute_dtype, compress_statistics=True, quant_type="nf4",
                                  device="meta")
            q.weight = bnb.nn.Params4bit(child.weight.data, requires_grad=False, compress_statistics=True,
                                         quant_type="nf4", module=q)._quantize(device)
            if child.bias is not None:
                q.bias = nn.Parameter(child.bias.data, requires_grad=False)
            setattr(parent, name, q)
            del child
            n += 1
    use_exact_kernels(model)
    return n


def build_qlora(shape: str, device: str, r: int, seed: int = 0):
    """(peft model, its config) for ``shape``: random weights in the device's compute dtype, decoder
    linears in NF4, LoRA rank ``r`` (alpha 16, dropout 0.05) on all linear layers."""
    from peft import LoraConfig, get_peft_model  # noqa: PLC0415
    from transformers import LlamaConfig, LlamaForCausalLM  # noqa: PLC0415

    from fedllm.models.llm import compute_dtype  # noqa: PLC0415

    dtype = compute_dtype(device)
    config = LlamaConfig(max_position_embeddings=4096, tie_word_embeddings=False, **SHAPES[shape])
    torch.manual_seed(seed)
    default = torch.get_default_dtype()
    torch.set_default_dtype(dtype)  # built in the compute dtype: a 7B model never exists in fp32
    try:
        with torch.device(device):
            base = LlamaForCausalLM(config)
    finally:
        torch.set_default_dtype(default)
    quantize_linears(base, dtype, torch.device(device))
    base.requires_grad_(False)
    if device == "cuda":
        torch.cuda.empty_cache()
    model = get_peft_model(base, LoraConfig(r=r, lora_alpha=16, lora_dropout=0.05, target_modules=ALL_LINEAR,
                                            task_type="CAUSAL_LM"))
    return model, config


def random_batches(vocab: int, n: int, batch: int, seq: int, seed: int = 0) -> list[dict[str, torch.Tensor]]:
    """``n`` batches of random tokens; the first half of each row is prompt (label −100), the rest response."""
    gen = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        ids = torch.randint(3, vocab, (batch, seq), generator=gen)
        labels = ids.clone()
        labels[:, : seq // 2] = -100
        out.append({"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels})
    return out


def lora_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def nf4_bytes(model: nn.Module) -> int:
    """Bytes held by the 4-bit weights (packed nibbles; statistics not counted)."""
    from fedllm.models.quant import linear4bit_layers  # noqa: PLC0415

    return sum(layer.weight.numel() * layer.weight.element_size() for _, layer in linear4bit_layers(model))
