"""Bring your own model: every supported causal-LM family, from a local directory, end to end.

For each family (tests/_families.py: a tiny random model built from its transformers config, saved
with the tiny tokenizer) the family's example recipe (recipes/examples/families/) is validated and
run for one federated round of 2 clients in NF4 with LoRA on ``all-linear``; the run is exported
with ``--merge``, the merged directory is reloaded with plain transformers and must give the logits
of fedllm's merged model and of the run's own model (NF4 base + adapter), and both fedllm and plain
transformers generate from it. Full precision (``quantization: none``) is checked per family on the
loader. The recipes' placeholder paths are refused by name.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from fedllm.cli import main
from fedllm.config import ModelConfig, RecipeError, load_recipe
from tests._families import ALL_LINEAR, FAMILIES, build_family, family_model

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = ROOT / "recipes" / "examples" / "families"
FAST = ["data.max_examples=12", "data.eval_size=2", "data.max_length=128", "partition.method=iid",
        "partition.column=null", "partition.num_clients=2", "federation.rounds=1", "train.local_steps=1",
        "train.batch_size=2", "train.lr=0.01", "lora.r=4", "eval.batch_size=2", "eval.bleu_samples=0",
        "eval.max_new_tokens=4", "checkpoint.enabled=false", "output.plots=false"]
QUESTION = "How can I sleep better?"


@pytest.fixture(scope="module")
def family_dir(tmp_path_factory):
    """``family -> directory`` of its tiny model, built once per test module."""
    built: dict[str, Path] = {}

    def get(family: str) -> Path:
        if family not in built:
            built[family] = build_family(family, tmp_path_factory.mktemp(family) / "base")
        return built[family]

    return get


def test_one_recipe_per_family():
    assert sorted(p.stem for p in EXAMPLES.glob("*.yaml")) == sorted(FAMILIES)


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_placeholder_path_is_refused_by_name(family, capsys):
    recipe = EXAMPLES / f"{family}.yaml"
    placeholder = next(line for line in recipe.read_text().splitlines() if line.startswith("model:"))
    placeholder = placeholder.split("path: ", 1)[1].split(",", 1)[0]
    assert main(["validate", str(recipe)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "model.path" in err[0] and placeholder in err[0], err


def _ids(tokenizer) -> torch.Tensor:
    return torch.tensor([tokenizer(f"{QUESTION} Rest, light and routine.")["input_ids"]])


@pytest.mark.slow
@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_family_round_export_reload_generate(family, family_dir, tmp_path):
    """One federated round in NF4 on all-linear, export --merge, same logits in plain transformers, generate."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from fedllm.export import merged_model
    from fedllm.serve import load_run_model

    model = family_dir(family)
    recipe, overrides = str(EXAMPLES / f"{family}.yaml"), [f"model.path={model}", *FAST]
    assert main(["validate", recipe, f"model.path={model}"]) == 0  # the recipe as shipped, with a real path
    assert main(["run", recipe, *overrides, "--out", str(tmp_path / "runs")]) == 0
    run = tmp_path / "runs" / family / "federated"
    summary = json.loads((run / "summary.json").read_text())
    machine = summary["machine"]
    assert summary["status"] == "ok"
    assert machine["model_type"] == FAMILIES[family][3]
    assert machine["lora_target_modules"] == ALL_LINEAR[family]  # resolved all-linear, written in the run files
    assert machine["linear4bit_layers"] == 2 * len(ALL_LINEAR[family])  # NF4: every block linear, not the head
    adapter_cfg = json.loads((run / "adapter" / "adapter_config.json").read_text())
    assert sorted(adapter_cfg["target_modules"]) == ALL_LINEAR[family]

    assert main(["export", str(run), "--out", str(tmp_path / "merged"), "--merge"]) == 0
    plain = AutoModelForCausalLM.from_pretrained(tmp_path / "merged", dtype=torch.float32).eval()
    tok = AutoTokenizer.from_pretrained(tmp_path / "merged")
    ids = _ids(tok)
    r = load_recipe(run / "config.yaml")
    ours, _ = merged_model(r, run / "adapter")
    _, run_model, _ = load_run_model(run)
    base = AutoModelForCausalLM.from_pretrained(model, dtype=torch.float32).eval()
    with torch.no_grad():
        got, want, trained, before = (m(input_ids=ids).logits for m in (plain, ours, run_model, base))
    assert torch.allclose(got, want, rtol=0, atol=1e-5), (got - want).abs().max()
    assert torch.allclose(got, trained, rtol=0, atol=1e-4), (got - trained).abs().max()
    assert (got - before).abs().max() > 1e-4  # the adapter was trained and merged in

    answers = tmp_path / "answers.jsonl"
    assert main(["generate", str(run), "--prompt", QUESTION, "--max-new-tokens", "4", "--out", str(answers)]) == 0
    assert json.loads(answers.read_text().splitlines()[0])["prompt"] == QUESTION
    out = plain.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=4, do_sample=False,
                         min_new_tokens=4, pad_token_id=tok.pad_token_id)
    assert out.shape[1] == ids.shape[1] + 4


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_family_loads_in_full_precision(family, family_dir):
    """``quantization: none``: fedllm's loader gives transformers' own logits, and LoRA on all-linear trains."""
    from transformers import AutoModelForCausalLM

    from fedllm.config import LoraConfig
    from fedllm.models.llm import add_lora, load_base

    path = family_dir(family)
    base, tok = load_base(ModelConfig(path=str(path), quantization="none", device="cpu"), seed=0)
    plain = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    ids = _ids(tok)
    with torch.no_grad():
        assert torch.equal(base(input_ids=ids).logits, plain(input_ids=ids).logits)
    model = add_lora(base, LoraConfig(r=2, target_modules="all-linear", dropout=0.0), seed=0)
    model(input_ids=ids, labels=ids).loss.backward()
    grads = {n: p.grad for n, p in model.named_parameters() if p.requires_grad}
    assert len(grads) == 2 * 2 * len(ALL_LINEAR[family])  # A and B of every block linear
    assert all(g is not None for g in grads.values())


# ----------------------------------------------------------------------------- LoRA targets


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_presets_per_family(family):
    from fedllm.models.targets import _by_position, linear_layers, resolve_targets

    model = family_model(family)
    every = resolve_targets(model, "all-linear")
    attention, mlp = resolve_targets(model, "attention"), resolve_targets(model, "mlp")
    assert every == ALL_LINEAR[family]
    assert sorted(attention + mlp) == every and not set(attention) & set(mlp)
    layers = linear_layers(model)  # the family's name map agrees with where the layers sit
    assert sorted(set(_by_position(layers, "attention"))) == attention
    assert sorted(set(_by_position(layers, "mlp"))) == mlp
    assert resolve_targets(model, every[-1:]) == every[-1:]  # an explicit list is used as written


def test_unmatched_target_names_the_linear_layers():
    from fedllm.models.targets import resolve_targets

    with pytest.raises(RecipeError) as err:
        resolve_targets(family_model("phi3"), ["q_proj", "v_proj"])
    text = str(err.value)
    assert "\n" not in text and text.startswith("lora.target_modules:") and "['q_proj', 'v_proj']" in text
    assert "down_proj, gate_up_proj, o_proj, qkv_proj" in text and "all-linear" in text


def test_validate_names_an_unmatched_target_before_loading(family_dir, capsys):
    """``fedllm validate`` builds the model on the meta device: a typo is one line, with the layers there are."""
    recipe, path = str(EXAMPLES / "gpt_neox.yaml"), family_dir("gpt_neox")
    capsys.readouterr()  # the model's save progress bars
    assert main(["validate", recipe, f"model.path={path}", *FAST, "lora.target_modules=[q_proj]"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "lora.target_modules" in err[0] and "query_key_value" in err[0], err
    assert main(["validate", recipe, f"model.path={path}", *FAST, "lora.target_modules=mlp"]) == 0


def test_unknown_family_presets_by_position():
    from fedllm.models.targets import resolve_targets

    model = family_model("llama")
    model.config.model_type = "some_new_family"
    assert resolve_targets(model, "attention") == ["k_proj", "o_proj", "q_proj", "v_proj"]
    assert resolve_targets(model, "mlp") == ["down_proj", "gate_proj", "up_proj"]


def test_target_presets_in_recipes():
    tiny = ROOT / "recipes" / "tiny.yaml"
    assert load_recipe(tiny, ["lora.target_modules=all-linear"]).lora.target_modules == "all-linear"
    assert load_recipe(tiny).lora.target_modules == ["q_proj", "v_proj"]  # lists stay lists
    with pytest.raises(RecipeError, match="lora.target_modules"):
        load_recipe(tiny, ["lora.target_modules=everything"])
