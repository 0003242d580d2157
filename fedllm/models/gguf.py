"""Any local GGUF file as a base model (``model.path: some.gguf``), dequantized once into fedllm's cache.

GGUF is llama.cpp's single-file format: metadata (architecture, sizes, the tokenizer's vocabulary
and merges) and tensors, usually block-quantized (Q4_0, Q4_K, Q8_0...). transformers reads the
architectures it maps to its own classes (``from_pretrained(..., gguf_file=)``, which dequantizes
every tensor to the requested dtype). fedllm does that once per file, exactly as for the SmolLM2
preset (:func:`fedllm.models.llm.smollm2_dir`): the fp32 weights and the tokenizer are saved as a
safetensors checkpoint under the cache (``gguf-<name>-<key>``, the key hashing the file's absolute
path, size and mtime, so a replaced file gets a new cache) and every later run quantizes to NF4 from
there. The tokenizer alone has its own cache, so ``fedllm validate`` never dequantizes weights.

A file that is not GGUF, or whose architecture this transformers cannot read, is a one-line
RecipeError on ``model.path``; a damaged cache is rebuilt (:mod:`fedllm.models.files`).
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch

from fedllm.config import RecipeError
from fedllm.models.files import cached_dir

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json")


def is_gguf(path: str | Path | None) -> bool:
    """Whether ``model.path`` names a GGUF file (by its suffix, as the recipe check does)."""
    return path is not None and str(path).strip().lower().endswith(".gguf")


def supported_architectures() -> list[str]:
    """The GGUF ``general.architecture`` values this transformers maps to a model class."""
    from transformers.modeling_gguf_pytorch_utils import GGUF_SUPPORTED_ARCHITECTURES  # noqa: PLC0415

    return [a for a in GGUF_SUPPORTED_ARCHITECTURES if a not in ("general", "tokenizer")]  # sections, not models


def architecture(path: Path) -> str:
    """``general.architecture`` of the GGUF file (a one-line RecipeError when it is not GGUF)."""
    from gguf import GGUFReader  # noqa: PLC0415

    try:
        field = GGUFReader(path).fields["general.architecture"]
        return bytes(field.parts[field.data[0]]).decode("utf-8")
    except KeyError:
        raise RecipeError("model.path", f"{path} has no general.architecture; expected a GGUF model file") from None
    except Exception as exc:  # the reader raises ValueError, struct/numpy errors or OSError on a bad file
        raise RecipeError("model.path", f"{path} is not a readable GGUF file ({type(exc).__name__}: {exc})") from None


@contextmanager
def _reading(path: Path, what: str) -> Iterator[None]:
    """Turn transformers' failure to read ``path`` into one line naming the file and architecture."""
    import transformers  # noqa: PLC0415

    arch = architecture(path)
    try:
        yield
    except RecipeError:
        raise
    except Exception as exc:  # ValueError (unsupported), KeyError/NotImplementedError (a missing mapping)
        if "not supported" in str(exc) or arch not in supported_architectures():
            raise RecipeError("model.path", f"{path}: GGUF architecture {arch!r} cannot be read by transformers "
                              f"{transformers.__version__} (it reads {', '.join(supported_architectures())}); "
                              "convert the model to a Hugging Face directory and set model.path to it") from None
        raise RecipeError("model.path", f"could not read the {what} of {path} (architecture {arch!r}; "
                          f"{type(exc).__name__}: {exc})") from None


def cache_name(path: Path) -> str:
    """``gguf-<stem>-<key>``: the key hashes the absolute path, size and mtime of the file."""
    st = path.stat()
    key = hashlib.sha256(f"{path.resolve()}\0{st.st_size}\0{st.st_mtime_ns}".encode()).hexdigest()[:12]
    stem = re.sub(r"[^A-Za-z0-9._-]+", "-", path.stem)[:60]
    return f"gguf-{stem}-{key}"


def tokenizer_dir(path: Path, root: Path) -> Path:
    """The GGUF's tokenizer, saved once as a Hugging Face tokenizer under ``root``."""

    def fill(tmp: Path) -> None:
        from transformers import AutoTokenizer  # noqa: PLC0415

        with _reading(path, "tokenizer"):
            AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name).save_pretrained(tmp)

    return cached_dir(root / f"{cache_name(path)}-tokenizer", fill, TOKENIZER_FILES)


def model_dir(path: Path, root: Path) -> Path:
    """The GGUF dequantized to an fp32 safetensors checkpoint (model + tokenizer) under ``root``."""

    def fill(tmp: Path) -> None:
        from transformers import AutoModelForCausalLM, AutoTokenizer  # noqa: PLC0415

        with _reading(path, "weights"):
            model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32)
        model.hf_quantizer = None  # the weights are dequantized; save them as plain fp32
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        model.save_pretrained(tmp)
        AutoTokenizer.from_pretrained(tokenizer_dir(path, root)).save_pretrained(tmp)

    return cached_dir(root / cache_name(path), fill, ("config.json", *TOKENIZER_FILES))
