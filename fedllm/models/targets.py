"""Which layers get LoRA adapters: ``lora.target_modules`` as a list of names, or a preset.

- a list (``[q_proj, v_proj]``): used exactly as written, as before (peft matches each name against
  the last part of a module's dotted name); a name that matches no module is one line naming the
  linear layers the model has;
- ``all-linear``: every linear layer (``nn.Linear``, bitsandbytes' ``Linear4bit``, transformers'
  ``Conv1D``) except the LM head (the model's output embedding, and the head's name in each family:
  ``lm_head``, gpt-neox's ``embed_out``). This is QLoRA's recommendation (Dettmers et al. 2023, §4:
  adapters on every linear layer are needed to match full fine-tuning) and what peft's own
  ``"all-linear"`` selects; fedllm resolves it itself so that the run files list the names;
- ``attention`` / ``mlp``: the attention or feed-forward projections, by a name map per family
  (``config.model_type``); a family not in the map is classified by where each linear layer sits
  (a parent named ``*attn*``/``*attention*`` or ``*mlp*``/``*feed_forward*``/``*ffn*``).

The resolved names are what peft receives, what the adapter's ``adapter_config.json`` stores and
what ``summary.json`` records (``machine.lora_target_modules``).
"""

from __future__ import annotations

from pathlib import Path

from torch import nn

from fedllm.config import RecipeError

PRESETS = ("all-linear", "attention", "mlp")

_LLAMA_LIKE = {"attention": ("q_proj", "k_proj", "v_proj", "o_proj"), "mlp": ("gate_proj", "up_proj", "down_proj")}
# Per tested family (transformers' config.model_type; tests/test_families.py): the attention and MLP
# projections of one decoder layer. Other families are classified by position (_by_position).
FAMILY_MODULES: dict[str, dict[str, tuple[str, ...]]] = {
    **{family: _LLAMA_LIKE for family in ("llama", "mistral", "qwen2", "qwen3", "gemma2", "gemma3_text")},
    "phi3": {"attention": ("qkv_proj", "o_proj"), "mlp": ("gate_up_proj", "down_proj")},
    "gpt_neox": {"attention": ("query_key_value", "dense"), "mlp": ("dense_h_to_4h", "dense_4h_to_h")},
}
HEAD_NAMES = ("lm_head", "embed_out")  # never adapted by a preset (the head's name in the families above)
_PARENTS = {"attention": ("attn", "attention"), "mlp": ("mlp", "feed_forward", "ffn")}


def _linear_types() -> tuple[type, ...]:
    kinds: list[type] = [nn.Linear]
    try:
        from bitsandbytes.nn import Linear4bit  # noqa: PLC0415

        kinds.append(Linear4bit)  # a subclass of nn.Linear today; named in case that changes
    except ImportError:
        pass
    try:
        from transformers.pytorch_utils import Conv1D  # noqa: PLC0415  (GPT-2-style fused linears)

        kinds.append(Conv1D)
    except ImportError:
        pass
    return tuple(kinds)


def linear_layers(model: nn.Module) -> dict[str, nn.Module]:
    """Every linear layer of ``model`` but its LM head, by dotted name."""
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    kinds = _linear_types()
    return {name: module for name, module in model.named_modules()
            if isinstance(module, kinds) and module is not head and name.rsplit(".", 1)[-1] not in HEAD_NAMES}


def model_type(model: nn.Module) -> str:
    return str(getattr(getattr(model, "config", None), "model_type", "unknown"))


def _leaf(name: str) -> str:
    return name.rsplit(".", 1)[-1]


def _by_position(layers: dict[str, nn.Module], preset: str) -> list[str]:
    """The linear layers whose parent modules name them attention or MLP (families not in the map)."""
    words = _PARENTS[preset]
    return [_leaf(n) for n in layers if any(w in part.lower() for part in n.split(".")[:-1] for w in words)]


def resolve_targets(model: nn.Module, spec: list[str] | str) -> list[str]:
    """The module names peft should adapt for ``lora.target_modules`` = ``spec`` (see module doc)."""
    layers = linear_layers(model)
    present = sorted({_leaf(n) for n in layers})
    if isinstance(spec, list):
        names = {_leaf(n) for n, _ in model.named_modules()}
        missing = [t for t in spec if t not in names]
        if missing:
            raise RecipeError("lora.target_modules", f"{missing} matches no module of this {model_type(model)} "
                              f"model; its linear layers are {', '.join(present)} (or use one of {', '.join(PRESETS)})")
        return list(spec)
    if spec not in PRESETS:
        raise RecipeError("lora.target_modules", f"expected a list of module names or one of {PRESETS}, got {spec!r}")
    if spec == "all-linear":
        chosen = present
    elif model_type(model) in FAMILY_MODULES:
        chosen = [n for n in FAMILY_MODULES[model_type(model)][spec] if n in present]
    else:
        chosen = _by_position(layers, spec)
    chosen = sorted(set(chosen))
    if not chosen:
        raise RecipeError("lora.target_modules", f"{spec!r} matches no linear layer of this {model_type(model)} "
                          f"model; its linear layers are {', '.join(present) or 'none'}: list the ones to adapt")
    _check_unambiguous(model, chosen, layers)
    return chosen


def _check_unambiguous(model: nn.Module, chosen: list[str], layers: dict[str, nn.Module]) -> None:
    """peft matches a name against every module ending in it: none of ``chosen`` may also name the
    head or a module that is not a linear layer, or peft would wrap that too."""
    for name, module in model.named_modules():
        if _leaf(name) in chosen and name not in layers:
            raise RecipeError("lora.target_modules", f"{_leaf(name)!r} names both linear layers and {name} "
                              f"({type(module).__name__}) in this {model_type(model)} model; list the "
                              "layers to adapt by name instead")


def targets_text(spec: list[str] | str) -> str:
    """``lora.target_modules`` for a sentence: ``q_proj, v_proj`` or ``all-linear``."""
    return spec if isinstance(spec, str) else ", ".join(spec)


def lora_info(model: nn.Module) -> dict:
    """What ``summary.json`` records of a peft model: the family and the layers that carry adapters."""
    config = getattr(model, "peft_config", {}).get("default")
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    targets = getattr(config, "target_modules", None)
    return {"model_type": model_type(base),
            "lora_target_modules": sorted(targets) if isinstance(targets, (set, list, tuple)) else targets}


def check_targets(model_path: Path, spec: list[str] | str) -> list[str]:
    """:func:`resolve_targets` against the model in ``model_path`` built on the meta device from its
    config.json (no weights read), so ``fedllm validate`` names a target that matches nothing before
    a run loads anything. A directory transformers cannot build a model from is left to the
    loader, which names it when the run starts (returns [])."""
    import torch  # noqa: PLC0415
    from transformers import AutoConfig, AutoModelForCausalLM  # noqa: PLC0415

    try:
        config = AutoConfig.from_pretrained(model_path)
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(config)
    except Exception:  # noqa: BLE001  (any failure here is reported by the real load, with its file)
        return []
    return resolve_targets(model, spec)
